#pragma once
/// \file examples/support/progress.hpp
/// A terminal progress bar for the training examples: fraction done, elapsed time, ETA and the
/// running loss. On a terminal it redraws one line (`\r`); otherwise (a log file, ctest) it
/// prints a plain line at every tenth of the way, so logs stay short.
///
/// ```cpp
/// examples::Progress bar("top_k:k=2", num_steps);
/// for (step...) { ...; bar.update(step + 1, loss); }
/// bar.finish();
/// ```

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <utility>

namespace examples {

/// Formats seconds as `12.3s`, `4m05s` or `1h02m`.
inline std::string format_seconds(double s) {
  char buffer[32];
  if (!(s >= 0.0)) s = 0.0;
  if (s < 60.0) {
    std::snprintf(buffer, sizeof buffer, "%.1fs", s);
  } else if (s < 3600.0) {
    std::snprintf(buffer, sizeof buffer, "%dm%02ds", static_cast<int>(s / 60.0),
                  static_cast<int>(s) % 60);
  } else {
    std::snprintf(buffer, sizeof buffer, "%dh%02dm", static_cast<int>(s / 3600.0),
                  (static_cast<int>(s) / 60) % 60);
  }
  return buffer;
}

/// A progress bar over `total` steps, written to `out` (stderr by default).
class Progress {
 public:
  Progress(std::string label, long total, std::FILE* out = stderr)
      : label_(std::move(label)),
        total_(std::max(total, 1L)),
        out_(out),
        tty_(isatty(fileno(out)) != 0),
        start_(std::chrono::steady_clock::now()) {}

  /// Records that `done` steps are complete; `loss` is the running (e.g. smoothed) loss.
  void update(long done, double loss) {
    done_ = std::clamp(done, 0L, total_);
    loss_ = loss;
    const int tenth = static_cast<int>(10 * done_ / total_);
    if (tty_) {
      draw('\r');
    } else if (tenth > last_tenth_) {
      last_tenth_ = tenth;
      draw('\n');
    }
  }

  /// Ends the bar (a final newline on a terminal).
  void finish() {
    if (tty_) std::fputc('\n', out_);
    std::fflush(out_);
  }

  /// Seconds since the bar was made.
  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  void draw(char end) {
    constexpr int kWidth = 24;
    const double fraction = static_cast<double>(done_) / static_cast<double>(total_);
    const int filled = static_cast<int>(fraction * kWidth);
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.resize(kWidth, '.');
    const double spent = elapsed();
    const double eta = done_ > 0 ? spent * (1.0 - fraction) / fraction : 0.0;
    if (tty_) std::fputc('\r', out_);
    std::fprintf(out_, "%-22s [%s] %3d%% %s ETA %s loss %.4f", label_.c_str(), bar.c_str(),
                 static_cast<int>(100.0 * fraction), format_seconds(spent).c_str(),
                 format_seconds(eta).c_str(), loss_);
    if (end == '\n') std::fputc('\n', out_);
    std::fflush(out_);
  }

  std::string label_;
  long total_;
  std::FILE* out_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
  long done_ = 0;
  double loss_ = 0.0;
  int last_tenth_ = 0;
};

}  // namespace examples
