#pragma once
/// \file bench/svg.hpp
/// A small self-contained SVG writer for moet's benchmark and example plots (no dependencies
/// beyond the standard library): shapes and text in user units, and `Plot`, a panel with linear
/// or logarithmic axes, ticks, grid and labels. Not part of the library (bench/ only).
///
/// ```cpp
/// moet::bench::Svg svg(800, 400);
/// moet::bench::Plot plot(svg, {.x = 60, .y = 30, .width = 300, .height = 300}, {0, 4}, {1, 1e4},
///                        {.title = "tokens/s", .x_label = "mean k", .log_y = true});
/// svg.circle(plot.px(2.0), plot.py(250.0), 4, "#1f77b4");
/// svg.save("out.svg");
/// ```

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace moet::bench {

/// Escapes `&`, `<`, `>` and `"` for SVG text and attributes.
inline std::string svg_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

/// A colour of a 10-colour qualitative palette (Tableau 10), cycling.
inline const char* palette(std::size_t i) {
  static constexpr const char* kColours[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                             "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};
  return kColours[i % 10];
}

/// Formats a number compactly for tick labels (`1.5k`, `2M`, `0.25`).
inline std::string format_number(double v) {
  if (v == 0.0) v = 0.0;  // a tick at -0 (from rounding a negative axis start) prints as 0
  char buf[32];
  const double a = std::abs(v);
  if (a >= 1e9) {
    std::snprintf(buf, sizeof buf, "%gG", v / 1e9);
  } else if (a >= 1e6) {
    std::snprintf(buf, sizeof buf, "%gM", v / 1e6);
  } else if (a >= 1e4) {
    std::snprintf(buf, sizeof buf, "%gk", v / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%g", v);
  }
  return buf;
}

/// An SVG document being built; coordinates in pixels, y downwards.
class Svg {
 public:
  Svg(double width, double height) : width_(width), height_(height) {}

  /// A filled rectangle (`stroke` "none" for no outline).
  void rect(double x, double y, double w, double h, const std::string& fill,
            const std::string& stroke = "none", double opacity = 1.0) {
    body_ << "<rect x=\"" << x << "\" y=\"" << y << "\" width=\"" << std::max(w, 0.0)
          << "\" height=\"" << std::max(h, 0.0) << "\" fill=\"" << fill << "\" stroke=\"" << stroke
          << "\" fill-opacity=\"" << opacity << "\"/>\n";
  }
  /// A line segment; `dash` is an SVG `stroke-dasharray` ("" for solid).
  void line(double x1, double y1, double x2, double y2, const std::string& stroke,
            double width = 1.0, const std::string& dash = "") {
    body_ << "<line x1=\"" << x1 << "\" y1=\"" << y1 << "\" x2=\"" << x2 << "\" y2=\"" << y2
          << "\" stroke=\"" << stroke << "\" stroke-width=\"" << width << "\"";
    if (!dash.empty()) body_ << " stroke-dasharray=\"" << dash << "\"";
    body_ << "/>\n";
  }
  /// An open polyline through `points` (pixel coordinates).
  void polyline(const std::vector<std::pair<double, double>>& points, const std::string& stroke,
                double width = 1.0, const std::string& dash = "") {
    if (points.size() < 2) return;
    body_ << "<polyline fill=\"none\" stroke=\"" << stroke << "\" stroke-width=\"" << width << "\"";
    if (!dash.empty()) body_ << " stroke-dasharray=\"" << dash << "\"";
    body_ << " points=\"";
    for (const auto& [x, y] : points) body_ << x << "," << y << " ";
    body_ << "\"/>\n";
  }
  /// A filled circle.
  void circle(double cx, double cy, double r, const std::string& fill,
              const std::string& stroke = "none") {
    body_ << "<circle cx=\"" << cx << "\" cy=\"" << cy << "\" r=\"" << r << "\" fill=\"" << fill
          << "\" stroke=\"" << stroke << "\"/>\n";
  }
  /// A point marker of `size` pixels: shape 0 circle, 1 square, 2 triangle, 3 diamond (cycling).
  void marker(double cx, double cy, double size, int shape, const std::string& fill,
              const std::string& stroke = "#333") {
    const double r = size / 2;
    switch (shape % 4) {
      case 0:
        circle(cx, cy, r, fill, stroke);
        break;
      case 1:
        rect(cx - r, cy - r, size, size, fill, stroke);
        break;
      case 2:
        polygon({{cx, cy - r * 1.2}, {cx + r * 1.1, cy + r}, {cx - r * 1.1, cy + r}}, fill, stroke);
        break;
      default:
        polygon({{cx, cy - r * 1.3}, {cx + r, cy}, {cx, cy + r * 1.3}, {cx - r, cy}}, fill, stroke);
    }
  }
  /// A closed filled polygon through `points` (pixel coordinates).
  void polygon(const std::vector<std::pair<double, double>>& points, const std::string& fill,
               const std::string& stroke = "none") {
    body_ << "<polygon fill=\"" << fill << "\" stroke=\"" << stroke << "\" points=\"";
    for (const auto& [x, y] : points) body_ << x << "," << y << " ";
    body_ << "\"/>\n";
  }
  /// Text at `(x, y)` (baseline); `anchor` is start, middle or end; `rotate` in degrees about
  /// the anchor point.
  void text(double x, double y, const std::string& s, double size = 12.0,
            const std::string& anchor = "start", const std::string& fill = "#222",
            bool bold = false, double rotate = 0.0) {
    body_ << "<text x=\"" << x << "\" y=\"" << y << "\" font-size=\"" << size << "\" text-anchor=\""
          << anchor << "\" fill=\"" << fill << "\"";
    if (bold) body_ << " font-weight=\"bold\"";
    if (rotate != 0.0) body_ << " transform=\"rotate(" << rotate << " " << x << " " << y << ")\"";
    body_ << ">" << svg_escape(s) << "</text>\n";
  }

  double width() const { return width_; }
  double height() const { return height_; }

  /// The whole document.
  std::string str() const {
    std::ostringstream out;
    out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
        << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width_ << "\" height=\""
        << height_ << "\" viewBox=\"0 0 " << width_ << " " << height_
        << "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
        << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        << body_.str() << "</svg>\n";
    return out.str();
  }
  /// Writes the document to `path`; false when the file cannot be written.
  bool save(const std::string& path) const {
    std::ofstream out(path);
    if (!out) return false;
    out << str();
    return static_cast<bool>(out);
  }

 private:
  double width_;
  double height_;
  std::ostringstream body_;
};

/// Pixel rectangle of a plot's data area.
struct Frame {
  double x = 0;
  double y = 0;
  double width = 0;
  double height = 0;
};

/// Data range of one axis.
struct Range {
  double lo = 0;
  double hi = 1;
};

/// Labels and scales of a plot.
struct PlotLabels {
  std::string title;
  std::string x_label;
  std::string y_label;
  bool log_y = false;
  int x_ticks = 5;
  int y_ticks = 5;
};

/// A panel with axes: maps data to pixels (`px`, `py`) and draws frame, grid, ticks and labels
/// on construction. With `log_y` the y range must be positive (decades are ticked).
class Plot {
 public:
  Plot(Svg& svg, Frame frame, Range x, Range y, PlotLabels labels)
      : frame_(frame), x_(x), y_(y), labels_(std::move(labels)) {
    if (x_.hi <= x_.lo) x_.hi = x_.lo + 1;
    if (labels_.log_y) {
      y_.lo = std::max(y_.lo, 1e-300);
      y_.hi = std::max(y_.hi, y_.lo * 10);
    } else if (y_.hi <= y_.lo) {
      y_.hi = y_.lo + 1;
    }
    draw(svg);
  }

  /// Pixel x of data `x`.
  double px(double x) const { return frame_.x + (x - x_.lo) / (x_.hi - x_.lo) * frame_.width; }
  /// Pixel y of data `y`.
  double py(double y) const {
    double f = 0;
    if (labels_.log_y) {
      f = (std::log10(std::max(y, 1e-300)) - std::log10(y_.lo)) /
          (std::log10(y_.hi) - std::log10(y_.lo));
    } else {
      f = (y - y_.lo) / (y_.hi - y_.lo);
    }
    return frame_.y + frame_.height * (1.0 - f);
  }
  const Frame& frame() const { return frame_; }

  /// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks.
  static double nice_step(double range, int ticks) {
    const double raw = range / std::max(ticks, 1);
    const double p = std::pow(10.0, std::floor(std::log10(raw)));
    const double m = raw / p;
    return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
  }

 private:
  void draw(Svg& svg) const {
    const Frame& f = frame_;
    svg.rect(f.x, f.y, f.width, f.height, "#fafafa", "#888");
    // x ticks.
    const double xs = nice_step(x_.hi - x_.lo, labels_.x_ticks);
    for (double v = std::ceil(x_.lo / xs) * xs; v <= x_.hi + 1e-9 * xs; v += xs) {
      svg.line(px(v), f.y, px(v), f.y + f.height, "#e4e4e4");
      svg.text(px(v), f.y + f.height + 14, format_number(v), 11, "middle");
    }
    // y ticks.
    if (labels_.log_y) {
      for (double v = std::pow(10.0, std::ceil(std::log10(y_.lo))); v <= y_.hi * 1.0001; v *= 10) {
        svg.line(f.x, py(v), f.x + f.width, py(v), "#e4e4e4");
        svg.text(f.x - 4, py(v) + 4, format_number(v), 11, "end");
        for (int m = 2; m < 10; ++m) {
          if (v * m <= y_.hi) svg.line(f.x, py(v * m), f.x + 4, py(v * m), "#aaa");
        }
      }
    } else {
      const double ys = nice_step(y_.hi - y_.lo, labels_.y_ticks);
      for (double v = std::ceil(y_.lo / ys) * ys; v <= y_.hi + 1e-9 * ys; v += ys) {
        svg.line(f.x, py(v), f.x + f.width, py(v), "#e4e4e4");
        svg.text(f.x - 4, py(v) + 4, format_number(v), 11, "end");
      }
    }
    svg.text(f.x + f.width / 2, f.y - 8, labels_.title, 13, "middle", "#222", true);
    svg.text(f.x + f.width / 2, f.y + f.height + 32, labels_.x_label, 12, "middle");
    svg.text(f.x - 46, f.y + f.height / 2, labels_.y_label, 12, "middle", "#222", false, -90);
  }

  Frame frame_;
  Range x_;
  Range y_;
  PlotLabels labels_;
};

}  // namespace moet::bench
