#pragma once
/// \file io/tensor_view.hpp
/// The dtypes of safetensors files (`Dtype`, their names and sizes) and `TensorView`, one
/// tensor's dtype, shape and bytes in a mapped file, read as float or bf16 rows without a
/// whole-tensor copy. Part of io/safetensors.hpp (the format and its checks are described there).

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/bytes.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {
/// The element types of the safetensors format. Every one is recognised (so a file holding
/// integer or 8-bit float tensors opens), but moet converts only `kF32`, `kBf16` and `kF16`;
/// reading another as numbers is a `moet::Error` naming the tensor and its dtype.
enum class Dtype : std::uint8_t {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kI16,
  kU16,
  kF16,
  kBf16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kC64,
  kF4,
  kF6E2M3,
  kF6E3M2,
};

namespace detail {
struct DtypeInfo {
  Dtype dtype;
  const char* name;  // as the format spells it
  int bits;          // per element
};
inline constexpr DtypeInfo kDtypes[] = {
    {Dtype::kBool, "BOOL", 8},      {Dtype::kU8, "U8", 8},          {Dtype::kI8, "I8", 8},
    {Dtype::kF8E5M2, "F8_E5M2", 8}, {Dtype::kF8E4M3, "F8_E4M3", 8}, {Dtype::kF8E8M0, "F8_E8M0", 8},
    {Dtype::kI16, "I16", 16},       {Dtype::kU16, "U16", 16},       {Dtype::kF16, "F16", 16},
    {Dtype::kBf16, "BF16", 16},     {Dtype::kI32, "I32", 32},       {Dtype::kU32, "U32", 32},
    {Dtype::kF32, "F32", 32},       {Dtype::kF64, "F64", 64},       {Dtype::kI64, "I64", 64},
    {Dtype::kU64, "U64", 64},       {Dtype::kC64, "C64", 64},       {Dtype::kF4, "F4", 4},
    {Dtype::kF6E2M3, "F6_E2M3", 6}, {Dtype::kF6E3M2, "F6_E3M2", 6},
};
/// The largest header the reference implementation accepts (100 MB).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100'000'000;
}  // namespace detail

/// The format's spelling of `d` ("F32", "BF16", "F8_E4M3", ...).
inline const char* dtype_name(Dtype d) {
  for (const auto& info : detail::kDtypes) {
    if (info.dtype == d) return info.name;
  }
  return "?";
}
/// Bits per element of `d` (4 and 6 for the packed float formats).
inline int dtype_bits(Dtype d) {
  for (const auto& info : detail::kDtypes) {
    if (info.dtype == d) return info.bits;
  }
  return 0;
}
/// The dtype the format spells `name`, or none.
inline std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (const auto& info : detail::kDtypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}
/// Whether moet converts `d` to float: F32, BF16 and F16.
constexpr bool is_float_dtype(Dtype d) {
  return d == Dtype::kF32 || d == Dtype::kBf16 || d == Dtype::kF16;
}

/// A read-only view of one tensor of a checkpoint: its dtype, shape (row-major, outermost
/// first) and bytes, which live in the file's mapping (the view must not outlive the
/// `SafetensorsFile` or `SafetensorsCheckpoint` it came from; moving those keeps it valid).
///
/// As a matrix the tensor is `(rows(), cols())`: the last dimension is the columns, all others
/// the rows (a `[E, F, K]` tensor is `(E * F, K)`, a vector `[n]` is `(1, n)`, a scalar
/// `(1, 1)`). The readers convert F32, BF16 and F16 elements to float (exactly) or to bf16
/// (BF16 copied, others rounded to nearest even) straight from the mapped bytes, a block at a
/// time, with any output strides: a loader packs from them row by row, never through a float
/// copy of the whole tensor.
class TensorView : public detail::MatrixViewReads<TensorView> {
 public:
  /// A view of `bytes` as a `dtype` tensor of `shape`. Throws `moet::Error` when a dimension is
  /// negative or `bytes` is not exactly the tensor's size. `file` and `name` are for messages.
  TensorView(std::string file, std::string name, Dtype dtype, std::vector<Index> shape,
             std::span<const std::byte> bytes)
      : file_(std::move(file)),
        name_(std::move(name)),
        dtype_(dtype),
        shape_(std::move(shape)),
        bytes_(bytes) {
    if (!detail::extent_fits(shape_)) fail("shape ", detail::shape_string(shape_), " is invalid");
    std::uint64_t n = 1;
    for (const Index d : shape_) n *= static_cast<std::uint64_t>(d);
    std::uint64_t bits = 0;
    if (!detail::mul_u64(n, static_cast<std::uint64_t>(dtype_bits(dtype)), bits) ||
        bits / 8 != bytes.size() || bits % 8 != 0 ||
        n > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
      fail("shape ", detail::shape_string(shape_), " of ", dtype_name(dtype), " does not match ",
           bytes.size(), " bytes");
    }
    numel_ = static_cast<Index>(n);
  }

  /// The tensor's name in its file.
  const std::string& name() const { return name_; }
  /// The file it was read from (as opened; "<memory>" for a buffer).
  const std::string& file() const { return file_; }
  Dtype dtype() const { return dtype_; }
  /// Dimensions, outermost first (PyTorch's order).
  std::span<const Index> shape() const { return shape_; }
  Index rank() const { return static_cast<Index>(shape_.size()); }
  /// Dimension `i` (throws when `i` is not below `rank()`).
  Index dim(Index i) const {
    if (i < 0 || i >= rank()) fail("has no dimension ", i, " (rank ", rank(), ")");
    return shape_[static_cast<std::size_t>(i)];
  }
  /// Number of elements.
  Index numel() const { return numel_; }
  /// The raw little-endian bytes, exactly `numel() * dtype_bits(dtype()) / 8` of them.
  std::span<const std::byte> bytes() const { return bytes_; }

  /// Rows of the matrix view: the product of all dimensions but the last (1 for rank < 2).
  Index rows() const {
    if (shape_.size() < 2) return 1;
    Index r = 1;
    for (std::size_t i = 0; i + 1 < shape_.size(); ++i) r *= shape_[i];
    return r;
  }
  /// Columns of the matrix view: the last dimension (1 for a scalar).
  Index cols() const { return shape_.empty() ? 1 : shape_.back(); }

  /// Throws `moet::Error` naming the file, the tensor and both shapes unless the shape is
  /// `expected`.
  void require_shape(std::span<const Index> expected) const {
    if (!std::equal(shape_.begin(), shape_.end(), expected.begin(), expected.end())) {
      fail("shape ", detail::shape_string(shape_), ", expected ", detail::shape_string(expected));
    }
  }
  void require_shape(std::initializer_list<Index> expected) const {
    require_shape(std::span<const Index>(expected.begin(), expected.size()));
  }
  /// Throws `moet::Error` unless the dtype is one moet converts (F32, BF16, F16).
  void require_float() const {
    if (!is_float_dtype(dtype_)) {
      fail("dtype ", dtype_name(dtype_), " is not one moet reads as numbers (F32, BF16, F16)");
    }
  }

  /// The sub-tensor at index `i` of the first dimension (rank one lower), e.g. expert `i` of a
  /// stacked `[E, F, K]` weight. F32, BF16, F16 only.
  TensorView slice(Index i) const {
    require_float();
    if (shape_.empty()) fail("is a scalar and has no slices");
    if (i < 0 || i >= shape_[0]) fail("has no slice ", i, " (first dimension ", shape_[0], ")");
    const auto part =
        shape_[0] == 0 ? std::size_t{0} : bytes_.size() / static_cast<std::size_t>(shape_[0]);
    std::vector<Index> sub(shape_.begin() + 1, shape_.end());
    return TensorView(file_, concat_name(i), dtype_, std::move(sub),
                      bytes_.subspan(static_cast<std::size_t>(i) * part, part));
  }

  /// Element `i` in row-major order, as float (F32, BF16, F16).
  float at(Index i) const {
    require_float();
    if (i < 0 || i >= numel_) fail("has no element ", i, " (", numel_, " elements)");
    return detail::load_element(codec(), bytes_.data(), i);
  }

  /// Writes the `(rows, cols)` block at `(row0, col0)` of the matrix view to
  /// `out[i * out_row_stride + j * out_col_stride]`, as float (`T = float`) or bf16
  /// (`T = detail::Bf16`). Strides `(1, ld)` write the transpose. F32, BF16, F16 only; throws
  /// `moet::Error` when the block is not inside the matrix.
  template <class T>
  void read_block(Index row0, Index col0, Index n_rows, Index n_cols, T* out, Index out_row_stride,
                  Index out_col_stride) const {
    require_float();
    check_block(row0, col0, n_rows, n_cols);
    if (n_rows == 0 || n_cols == 0) return;
    detail::convert_block(codec(), bytes_.data(), cols() * dtype_bits(dtype_) / 8, row0, col0,
                          n_rows, n_cols, out, out_row_stride, out_col_stride);
  }

 private:
  friend class detail::MatrixViewReads<TensorView>;
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("TensorView", file_, ": tensor '", name_, "' ", std::forward<Args>(args)...);
  }
  std::string concat_name(Index i) const { return name_ + "[" + std::to_string(i) + "]"; }
  detail::ElementCodec codec() const {
    return dtype_ == Dtype::kF32    ? detail::ElementCodec::kF32
           : dtype_ == Dtype::kBf16 ? detail::ElementCodec::kBf16
                                    : detail::ElementCodec::kF16;
  }
  void check_block(Index row0, Index col0, Index n_rows, Index n_cols) const {
    if (row0 < 0 || col0 < 0 || n_rows < 0 || n_cols < 0 || row0 > rows() - n_rows ||
        col0 > cols() - n_cols) {
      fail("block (", n_rows, ", ", n_cols, ") at (", row0, ", ", col0,
           ") is outside its matrix view (", rows(), ", ", cols(), ")");
    }
  }

  std::string file_;
  std::string name_;
  Dtype dtype_;
  std::vector<Index> shape_;
  std::span<const std::byte> bytes_;
  Index numel_ = 0;
};

namespace detail {

/// `require(name, shape)` for a source of tensors with `tensor(name)` (`SafetensorsFile`,
/// `SafetensorsCheckpoint` derive from it): the tensor `name`, checked to be F32, BF16 or F16
/// and of `shape`; the errors name the file, the tensor and both shapes.
template <class Derived>
class RequireTensor {
 public:
  TensorView require(std::string_view name, std::span<const Index> shape) const {
    TensorView view = static_cast<const Derived&>(*this).tensor(name);
    view.require_float();
    view.require_shape(shape);
    return view;
  }
  TensorView require(std::string_view name, std::initializer_list<Index> shape) const {
    return require(name, std::span<const Index>(shape.begin(), shape.size()));
  }
};

}  // namespace detail

}  // namespace moet
