#pragma once
/// \file examples/support/report.hpp
/// Plots of the training examples' quality comparison, written as SVG with bench/svg.hpp: line
/// charts (a curve per router over training) and labelled scatter plots (one point per router).

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../../bench/svg.hpp"

namespace examples {

/// One named curve or point set, in data coordinates.
struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;
};

namespace detail {
inline void data_range(const std::vector<Series>& series, moet::bench::Range& x,
                       moet::bench::Range& y, bool zero_y) {
  x = {std::numeric_limits<double>::max(), std::numeric_limits<double>::lowest()};
  y = x;
  for (const Series& s : series) {
    for (const auto& [px, py] : s.points) {
      x.lo = std::min(x.lo, px);
      x.hi = std::max(x.hi, px);
      y.lo = std::min(y.lo, py);
      y.hi = std::max(y.hi, py);
    }
  }
  if (x.lo > x.hi) x = {0, 1};
  if (y.lo > y.hi) y = {0, 1};
  if (zero_y) y.lo = std::min(y.lo, 0.0);
  const double pad_x = 0.05 * std::max(x.hi - x.lo, 1e-9);
  const double pad_y = 0.08 * std::max(y.hi - y.lo, 1e-9);
  x = {x.lo - pad_x, x.hi + pad_x};
  y = {zero_y && y.lo >= 0 ? y.lo : y.lo - pad_y, y.hi + pad_y};
}

inline void legend(moet::bench::Svg& svg, const std::vector<Series>& series, double x, double y) {
  for (std::size_t i = 0; i < series.size(); ++i) {
    const double row = y + 18.0 * static_cast<double>(i);
    svg.rect(x, row - 9, 12, 10, moet::bench::palette(i));
    svg.text(x + 18, row, series[i].name, 12);
  }
}
}  // namespace detail

/// A line chart of every series (e.g. loss over training steps) with a legend on the right.
/// Returns false when `path` cannot be written.
inline bool save_line_chart(const std::string& path, const std::string& title,
                            const std::string& x_label, const std::string& y_label,
                            const std::vector<Series>& series, bool zero_y = false) {
  moet::bench::Svg svg(820, 420);
  moet::bench::Range x, y;
  detail::data_range(series, x, y, zero_y);
  moet::bench::Plot plot(svg, {.x = 70, .y = 36, .width = 540, .height = 320}, x, y,
                         {.title = title, .x_label = x_label, .y_label = y_label});
  for (std::size_t i = 0; i < series.size(); ++i) {
    std::vector<std::pair<double, double>> pixels;
    for (const auto& [px, py] : series[i].points) pixels.emplace_back(plot.px(px), plot.py(py));
    svg.polyline(pixels, moet::bench::palette(i), 2.0);
    if (pixels.size() == 1) svg.circle(pixels[0].first, pixels[0].second, 3, moet::bench::palette(i));
  }
  detail::legend(svg, series, 630, 50);
  return svg.save(path);
}

/// A scatter plot with one labelled point per series (its first point), e.g. accuracy against
/// activated parameters per router.
inline bool save_scatter_chart(const std::string& path, const std::string& title,
                               const std::string& x_label, const std::string& y_label,
                               const std::vector<Series>& series) {
  moet::bench::Svg svg(820, 420);
  moet::bench::Range x, y;
  detail::data_range(series, x, y, false);
  moet::bench::Plot plot(svg, {.x = 70, .y = 36, .width = 540, .height = 320}, x, y,
                         {.title = title, .x_label = x_label, .y_label = y_label});
  for (std::size_t i = 0; i < series.size(); ++i) {
    for (const auto& [px, py] : series[i].points) {
      svg.circle(plot.px(px), plot.py(py), 6, moet::bench::palette(i), "#333");
    }
  }
  detail::legend(svg, series, 630, 50);
  return svg.save(path);
}

}  // namespace examples
