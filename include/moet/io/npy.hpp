#pragma once
/// \file io/npy.hpp
/// NumPy `.npy` files of float32 in C order, 1-D or 2-D: what moet's tools and tests exchange
/// with Python (`numpy.save(path, x.astype(numpy.float32))`, `numpy.load(path)`).
///
/// The format: the magic `\x93NUMPY`, a major and minor version byte, the header length
/// (`u16` little-endian for version 1, `u32` for 2 and 3), the header (a Python dict literal
/// such as `{'descr': '<f4', 'fortran_order': False, 'shape': (7, 64), }`, padded with spaces
/// and ending in a newline), then the data. moet reads descr `<f4` only (little-endian
/// float32), C order (or a 1-D array marked Fortran order, the same bytes), and exactly the
/// shape's bytes; anything else is a `moet::Error` naming the file and what is wrong.
///
/// ```cpp
/// moet::RowMatrix<float> x = moet::read_npy("x.npy").matrix();  // (7, 64)
/// moet::write_npy("y.npy", y);
/// ```

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moet/errors.hpp"
#include "moet/io/bytes.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// A float32 array read from a `.npy` file: its shape (1 or 2 dimensions) and values in C
/// order.
struct NpyArray {
  std::vector<Index> shape;
  std::vector<float> values;

  /// The values as a matrix: `(shape[0], shape[1])`, or `(1, n)` for a 1-D array.
  RowMatrix<float> matrix() const {
    const Index rows = shape.size() == 2 ? shape[0] : 1;
    const Index cols = shape.size() == 2 ? shape[1] : shape[0];
    RowMatrix<float> m(rows, cols);
    if (m.size() > 0) std::memcpy(m.data(), values.data(), values.size() * sizeof(float));
    return m;
  }
};

namespace detail {

/// A strict reader of the header dict: single- or double-quoted keys, the three keys once
/// each, string / bool / tuple-of-integers values, an optional trailing comma.
class NpyHeaderParser {
 public:
  NpyHeaderParser(std::string_view text, const std::string& file) : s_(text), file_(file) {}

  struct Header {
    std::string descr;
    bool fortran_order = false;
    std::vector<Index> shape;
  };

  Header parse() {
    Header h;
    bool have_descr = false;
    bool have_order = false;
    bool have_shape = false;
    skip_space();
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        if (have_descr) fail("repeats 'descr'");
        h.descr = string_literal();
        have_descr = true;
      } else if (key == "fortran_order") {
        if (have_order) fail("repeats 'fortran_order'");
        h.fortran_order = boolean();
        have_order = true;
      } else if (key == "shape") {
        if (have_shape) fail("repeats 'shape'");
        h.shape = tuple();
        have_shape = true;
      } else {
        fail("has an unknown key '", key, "'");
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != '}') fail("expected ',' or '}' at ", pos_);
    }
    ++pos_;  // '}'
    skip_space();
    if (pos_ != s_.size()) fail("has text after the dict");
    if (!have_descr || !have_order || !have_shape) {
      fail("lacks one of 'descr', 'fortran_order', 'shape'");
    }
    return h;
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("npy", file_, ": header ", std::forward<Args>(args)...);
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }
  void expect(char c) {
    if (peek() != c) fail("expected '", c, "' at ", pos_);
    ++pos_;
  }
  std::string string_literal() {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("expected a quoted string at ", pos_);
    ++pos_;
    const std::size_t end = s_.find(quote, pos_);
    if (end == std::string_view::npos) fail("has an unterminated string");
    std::string out(s_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }
  bool boolean() {
    if (s_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (s_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("expected True or False at ", pos_);
  }
  std::vector<Index> tuple() {
    expect('(');
    std::vector<Index> out;
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (out.size() >= 32) fail("shape has too many dimensions");
      Index v = 0;
      bool any = false;
      while (peek() >= '0' && peek() <= '9') {
        const Index digit = peek() - '0';
        if (v > (std::numeric_limits<Index>::max() - digit) / 10) fail("shape entry overflows");
        v = v * 10 + digit;
        ++pos_;
        any = true;
      }
      if (!any) fail("expected a non-negative integer in the shape at ", pos_);
      out.push_back(v);
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != ')') fail("expected ',' or ')' in the shape at ", pos_);
    }
    ++pos_;
    return out;
  }

  std::string_view s_;
  const std::string& file_;
  std::size_t pos_ = 0;
};

template <class... Args>
[[noreturn]] void npy_fail(const std::string& name, Args&&... args) {
  fail("npy", name, ": ", std::forward<Args>(args)...);
}

}  // namespace detail

/// Parses a `.npy` file held in memory (`name` is for messages). Throws `moet::Error` for a
/// bad magic or version, a header length past the end, a header that is not the dict above,
/// a dtype other than `<f4`, Fortran order (2-D), 0 or more than 2 dimensions, and a data size
/// other than the shape's.
inline NpyArray parse_npy(std::span<const std::byte> bytes, const std::string& name = "<memory>") {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) {
    detail::npy_fail(name, "not a .npy file (no \\x93NUMPY magic)");
  }
  const int major = std::to_integer<int>(bytes[6]);
  std::size_t header_len = 0;
  std::size_t start = 0;
  if (major == 1) {
    header_len = detail::load_le<std::uint16_t>(bytes.data() + 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) detail::npy_fail(name, "file too short for its header length");
    header_len = detail::load_le<std::uint32_t>(bytes.data() + 8);
    start = 12;
  } else {
    detail::npy_fail(name, "unsupported format version ", major);
  }
  if (header_len > bytes.size() - start) {
    detail::npy_fail(name, "header length ", header_len, " runs past the end of the file (",
                     bytes.size(), " bytes)");
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + start), header_len);
  const auto header = detail::NpyHeaderParser(text, name).parse();
  if (header.descr != "<f4") {
    detail::npy_fail(name, "dtype '", header.descr, "' is not little-endian float32 ('<f4')");
  }
  if (header.shape.empty() || header.shape.size() > 2) {
    detail::npy_fail(name, "shape ", detail::shape_string(header.shape), " is not 1-D or 2-D");
  }
  if (header.fortran_order && header.shape.size() == 2)
    detail::npy_fail(name, "Fortran order is not supported");
  std::uint64_t n = 1;
  for (const Index d : header.shape) {
    if (!detail::extent_fits(header.shape) || !detail::mul_u64(n, static_cast<std::uint64_t>(d), n))
      detail::npy_fail(name, "shape overflows");
  }
  const std::size_t data = bytes.size() - start - header_len;
  std::uint64_t need = 0;
  if (!detail::mul_u64(n, 4, need) || need != data) {
    detail::npy_fail(name, "shape ", detail::shape_string(header.shape), " needs ", n,
                     " floats, the file holds ", data, " bytes of data");
  }
  NpyArray out;
  out.shape = header.shape;
  out.values.resize(static_cast<std::size_t>(n));
  const std::byte* p = bytes.data() + start + header_len;
  for (std::size_t i = 0; i < out.values.size(); ++i) out.values[i] = detail::load_f32(p + 4 * i);
  return out;
}

/// Reads the `.npy` file at `path` (see `parse_npy`).
inline NpyArray read_npy(const std::filesystem::path& path) {
  const MappedFile file = MappedFile::open(path);
  return parse_npy(file.bytes(), path.string());
}

/// The bytes of a `.npy` file (version 1.0, `<f4`, C order) holding `values` of `shape`
/// (1-D or 2-D; `values.size()` must be the shape's product).
inline std::vector<std::byte> npy_bytes(std::span<const Index> shape,
                                        std::span<const float> values) {
  std::uint64_t n = 1;
  for (const Index d : shape) {
    if (d < 0) detail::fail("npy", "negative dimension");
    n *= static_cast<std::uint64_t>(d);
  }
  if (shape.empty() || shape.size() > 2 || n != values.size()) {
    detail::fail("npy", "cannot write shape ", detail::shape_string(shape), " with ", values.size(),
                 " values");
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  header += std::to_string(shape[0]);
  header += shape.size() == 1 ? ",), }" : ", " + std::to_string(shape[1]) + "), }";
  // Pad with spaces so that magic + version + length + header + '\n' is a multiple of 64.
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::vector<std::byte> out;
  out.reserve(10 + header.size() + 4 * values.size());
  for (const char c : std::string_view("\x93NUMPY\x01\x00", 8))
    out.push_back(static_cast<std::byte>(c));
  out.push_back(static_cast<std::byte>(header.size() & 0xffU));
  out.push_back(static_cast<std::byte>((header.size() >> 8) & 0xffU));
  for (const char c : header) out.push_back(static_cast<std::byte>(c));
  for (const float v : values) {
    const auto bits = std::bit_cast<std::uint32_t>(v);
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<std::byte>((bits >> (8 * b)) & 0xffU));
  }
  return out;
}

namespace detail {
inline void write_file(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("npy", "cannot create ", path.string());
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.flush();
  if (!out) fail("npy", "cannot write ", path.string());
}
}  // namespace detail

/// Writes the matrix `m` `(rows, cols)` to `path` as a 2-D `.npy` file.
inline void write_npy(const std::filesystem::path& path, const ConstRows<float>& m) {
  std::vector<float> values(static_cast<std::size_t>(m.size()));
  for (Index r = 0; r < m.rows(); ++r) {
    for (Index c = 0; c < m.cols(); ++c)
      values[static_cast<std::size_t>(r * m.cols() + c)] = m(r, c);
  }
  const Index shape[2] = {m.rows(), m.cols()};
  detail::write_file(path, npy_bytes(shape, values));
}

/// Writes `v` to `path` as a 1-D `.npy` file.
inline void write_npy(const std::filesystem::path& path, std::span<const float> v) {
  const Index shape[1] = {static_cast<Index>(v.size())};
  detail::write_file(path, npy_bytes(shape, v));
}

}  // namespace moet
