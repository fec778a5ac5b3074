#pragma once
/// \file io/gguf_types.hpp
/// The pieces of a GGUF file (see io/gguf.hpp): the ggml tensor types (`GgmlType` and their
/// block sizes), the metadata value types, `GgufValue` (one metadata value) and `GgufTensor`
/// (one tensor's type, dimensions and bytes, with its ggml blocks or float rows).

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/bytes.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {
/// ggml's tensor types, by their ids in GGUF files (ggml.h's `enum ggml_type`; 4, 5, 31-33 and
/// 36-38 were removed from the format). moet reads `kF32`, `kF16`, `kBf16`, `kQ8_0`, `kQ4_0`
/// and `kQ4_1`; the others are recognised, their sizes checked, and reading them is a
/// `moet::Error` naming the tensor and its type.
enum class GgmlType : std::uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2K = 10,
  kQ3K = 11,
  kQ4K = 12,
  kQ5K = 13,
  kQ6K = 14,
  kQ8K = 15,
  kIq2Xxs = 16,
  kIq2Xs = 17,
  kIq3Xxs = 18,
  kIq1S = 19,
  kIq4Nl = 20,
  kIq3S = 21,
  kIq2S = 22,
  kIq4Xs = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIq1M = 29,
  kBf16 = 30,
  kTq1_0 = 34,
  kTq2_0 = 35,
  kMxfp4 = 39,
};

/// A ggml type's name and storage: `block` elements (along `ne0`) take `block_bytes` bytes.
struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  Index block;
  Index block_bytes;
};

namespace detail {
// Block sizes and bytes from ggml's type traits (ggml.c) and block structs (ggml-common.h).
inline constexpr GgmlTypeInfo kGgmlTypes[] = {
    {GgmlType::kF32, "F32", 1, 4},
    {GgmlType::kF16, "F16", 1, 2},
    {GgmlType::kQ4_0, "Q4_0", 32, 18},
    {GgmlType::kQ4_1, "Q4_1", 32, 20},
    {GgmlType::kQ5_0, "Q5_0", 32, 22},
    {GgmlType::kQ5_1, "Q5_1", 32, 24},
    {GgmlType::kQ8_0, "Q8_0", 32, 34},
    {GgmlType::kQ8_1, "Q8_1", 32, 36},
    {GgmlType::kQ2K, "Q2_K", 256, 84},
    {GgmlType::kQ3K, "Q3_K", 256, 110},
    {GgmlType::kQ4K, "Q4_K", 256, 144},
    {GgmlType::kQ5K, "Q5_K", 256, 176},
    {GgmlType::kQ6K, "Q6_K", 256, 210},
    {GgmlType::kQ8K, "Q8_K", 256, 292},
    {GgmlType::kIq2Xxs, "IQ2_XXS", 256, 66},
    {GgmlType::kIq2Xs, "IQ2_XS", 256, 74},
    {GgmlType::kIq3Xxs, "IQ3_XXS", 256, 98},
    {GgmlType::kIq1S, "IQ1_S", 256, 50},
    {GgmlType::kIq4Nl, "IQ4_NL", 32, 18},
    {GgmlType::kIq3S, "IQ3_S", 256, 110},
    {GgmlType::kIq2S, "IQ2_S", 256, 82},
    {GgmlType::kIq4Xs, "IQ4_XS", 256, 136},
    {GgmlType::kI8, "I8", 1, 1},
    {GgmlType::kI16, "I16", 1, 2},
    {GgmlType::kI32, "I32", 1, 4},
    {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},
    {GgmlType::kIq1M, "IQ1_M", 256, 56},
    {GgmlType::kBf16, "BF16", 1, 2},
    {GgmlType::kTq1_0, "TQ1_0", 256, 54},
    {GgmlType::kTq2_0, "TQ2_0", 256, 66},
    {GgmlType::kMxfp4, "MXFP4", 32, 17},
};
/// The default of `general.alignment`.
inline constexpr std::uint64_t kGgufDefaultAlignment = 32;
/// Nested arrays deeper than this are refused (the format allows nesting; llama.cpp reads
/// none, and a bound keeps the recursive reader's stack small).
inline constexpr int kGgufMaxArrayDepth = 8;
}  // namespace detail

/// The type with id `id`, or none for an id ggml does not define (or removed).
inline std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id) {
  for (const auto& info : detail::kGgmlTypes) {
    if (static_cast<std::uint32_t>(info.type) == id) return info;
  }
  return std::nullopt;
}
/// ggml's name of `t` ("Q8_0").
inline const char* ggml_type_name(GgmlType t) {
  const auto info = ggml_type_info(static_cast<std::uint32_t>(t));
  return info ? info->name : "?";
}
/// Whether moet converts `t` to float and bf16 (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
constexpr bool ggml_type_readable(GgmlType t) {
  return t == GgmlType::kF32 || t == GgmlType::kF16 || t == GgmlType::kBf16 ||
         t == GgmlType::kQ8_0 || t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1;
}

/// GGUF metadata value types (`gguf_metadata_value_type`).
enum class GgufValueType : std::uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

/// The format's short name of `t` ("u32", "str", "arr").
inline const char* gguf_value_type_name(GgufValueType t) {
  constexpr const char* kNames[] = {"u8",   "i8",  "u16", "i16", "u32", "i32", "f32",
                                    "bool", "str", "arr", "u64", "i64", "f64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? kNames[i] : "?";
}

namespace detail {
/// Bytes of a fixed-size value type (0 for strings and arrays).
constexpr std::size_t gguf_value_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::kU8:
    case GgufValueType::kI8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kU16:
    case GgufValueType::kI16:
      return 2;
    case GgufValueType::kU32:
    case GgufValueType::kI32:
    case GgufValueType::kF32:
      return 4;
    case GgufValueType::kU64:
    case GgufValueType::kI64:
    case GgufValueType::kF64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return 0;
  }
  return 0;
}
class GgufParser;
}  // namespace detail

/// One metadata value: a number, a bool, a string, or an array of one value type (arrays of
/// strings and of arrays included). Strings are views into the file's bytes: a value must not
/// outlive its `GgufFile` (moving the file keeps it valid). Copies are cheap.
class GgufValue {
 public:
  GgufValueType type() const { return type_; }
  bool is_array() const { return type_ == GgufValueType::kArray; }
  /// Whether the value is an integer (of any width and sign).
  bool is_integer() const { return is_integer_type(type_); }

  /// The value as an unsigned integer: integer types with a non-negative value, else none.
  std::optional<std::uint64_t> to_uint() const {
    if (!is_integer()) return std::nullopt;
    if (is_signed(type_)) {
      const std::int64_t v = signed_value();
      if (v < 0) return std::nullopt;
      return static_cast<std::uint64_t>(v);
    }
    return unsigned_value();
  }
  /// The value as a signed integer: integer types whose value fits `std::int64_t`, else none.
  std::optional<std::int64_t> to_int() const {
    if (!is_integer()) return std::nullopt;
    if (is_signed(type_)) return signed_value();
    const std::uint64_t v = unsigned_value();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return std::nullopt;
    }
    return static_cast<std::int64_t>(v);
  }
  /// The value as a double: floats and integers, else none.
  std::optional<double> to_double() const {
    if (type_ == GgufValueType::kF32) return static_cast<double>(detail::load_f32(raw_.data()));
    if (type_ == GgufValueType::kF64) {
      return std::bit_cast<double>(detail::load_le<std::uint64_t>(raw_.data()));
    }
    if (!is_integer()) return std::nullopt;
    return is_signed(type_) ? static_cast<double>(signed_value())
                            : static_cast<double>(unsigned_value());
  }
  /// The value of a bool, else none.
  std::optional<bool> to_bool() const {
    if (type_ != GgufValueType::kBool) return std::nullopt;
    return std::to_integer<int>(raw_[0]) != 0;
  }
  /// The text of a string (UTF-8, as stored, not checked), else none.
  std::optional<std::string_view> to_string() const {
    if (type_ != GgufValueType::kString) return std::nullopt;
    return text_;
  }

  /// The element type of an array (throws `moet::Error` for a scalar).
  GgufValueType element_type() const {
    require_array();
    return element_;
  }
  /// The length of an array (throws `moet::Error` for a scalar).
  std::size_t size() const {
    require_array();
    return count_;
  }
  /// Element `i` of an array (throws `moet::Error` for a scalar or `i >= size()`).
  GgufValue at(std::size_t i) const {
    require_array();
    if (i >= count_) detail::fail("GgufValue", "index ", i, " past the array's ", count_);
    if (items_) return (*items_)[i];
    const std::size_t width = detail::gguf_value_size(element_);
    GgufValue v;
    v.type_ = element_;
    v.raw_ = raw_.subspan(i * width, width);
    return v;
  }

 private:
  friend class detail::GgufParser;

  static constexpr bool is_integer_type(GgufValueType t) {
    return t == GgufValueType::kU8 || t == GgufValueType::kI8 || t == GgufValueType::kU16 ||
           t == GgufValueType::kI16 || t == GgufValueType::kU32 || t == GgufValueType::kI32 ||
           t == GgufValueType::kU64 || t == GgufValueType::kI64;
  }
  static constexpr bool is_signed(GgufValueType t) {
    return t == GgufValueType::kI8 || t == GgufValueType::kI16 || t == GgufValueType::kI32 ||
           t == GgufValueType::kI64;
  }
  std::uint64_t unsigned_value() const {
    switch (raw_.size()) {
      case 1:
        return std::to_integer<std::uint8_t>(raw_[0]);
      case 2:
        return detail::load_le<std::uint16_t>(raw_.data());
      case 4:
        return detail::load_le<std::uint32_t>(raw_.data());
      default:
        return detail::load_le<std::uint64_t>(raw_.data());
    }
  }
  std::int64_t signed_value() const {
    switch (raw_.size()) {
      case 1:
        return static_cast<std::int8_t>(std::to_integer<std::uint8_t>(raw_[0]));
      case 2:
        return static_cast<std::int16_t>(detail::load_le<std::uint16_t>(raw_.data()));
      case 4:
        return static_cast<std::int32_t>(detail::load_le<std::uint32_t>(raw_.data()));
      default:
        return static_cast<std::int64_t>(detail::load_le<std::uint64_t>(raw_.data()));
    }
  }
  void require_array() const {
    if (!is_array())
      detail::fail("GgufValue", "a ", gguf_value_type_name(type_), " is not an array");
  }

  GgufValueType type_ = GgufValueType::kU8;
  GgufValueType element_ = GgufValueType::kU8;           // arrays: the element type
  std::span<const std::byte> raw_;                       // scalars; arrays of fixed-size values
  std::string_view text_;                                // strings
  std::size_t count_ = 0;                                // arrays: the length
  std::shared_ptr<const std::vector<GgufValue>> items_;  // arrays of strings or arrays
};

/// A read-only view of one GGUF tensor: its ggml type, dimensions (`ne(0)` fastest, up to 4)
/// and bytes in the file's mapping (the view must not outlive its `GgufFile`).
///
/// As a matrix it is `(rows(), cols())` with `cols() = ne(0)` and `rows() = ne(1) * ne(2) *
/// ne(3)`, row-major: the same matrix as the PyTorch tensor it came from (a `[N, K]` weight,
/// stored `ne = [K, N]`, is `(N, K)`). Rows of the block types are whole blocks (the file is
/// checked for that), so `blocks()` hands out each row's blocks as ggml stores them.
class GgufTensor : public detail::MatrixViewReads<GgufTensor> {
 public:
  const std::string& name() const { return name_; }
  /// The file it was read from (as opened; "<memory>" for a buffer).
  const std::string& file() const { return file_; }
  GgmlType type() const { return info_.type; }
  /// Block size and bytes of the type.
  const GgmlTypeInfo& type_info() const { return info_; }
  /// Number of dimensions (0 to 4).
  int n_dims() const { return n_dims_; }
  /// Dimension `i` (0 = fastest); 1 for `n_dims() <= i < 4`.
  Index ne(int i) const {
    if (i < 0 || i >= 4) fail("has no dimension ", i);
    return ne_[static_cast<std::size_t>(i)];
  }
  /// Elements in all.
  Index numel() const { return ne_[0] * ne_[1] * ne_[2] * ne_[3]; }
  /// Columns of the matrix view (`ne(0)`).
  Index cols() const { return ne_[0]; }
  /// Rows of the matrix view (`ne(1) * ne(2) * ne(3)`).
  Index rows() const { return ne_[1] * ne_[2] * ne_[3]; }
  /// Bytes per row (`cols() / block * block_bytes`).
  Index row_bytes() const { return ne_[0] / info_.block * info_.block_bytes; }
  /// The tensor's bytes, exactly `rows() * row_bytes()` of them.
  std::span<const std::byte> bytes() const { return bytes_; }
  /// The tensor's offset in the data section.
  std::uint64_t offset() const { return offset_; }

  /// Throws `moet::Error` naming the tensor and both types unless the type is `t`.
  void require_type(GgmlType t) const {
    if (info_.type != t) fail("has type ", info_.name, ", expected ", ggml_type_name(t));
  }
  /// Throws `moet::Error` naming the tensor and both shapes unless its dimensions are exactly
  /// `ne` (fastest first, as GGUF lists them).
  void require_dims(std::initializer_list<Index> ne) const {
    const std::span<const Index> have(ne_.data(), static_cast<std::size_t>(n_dims_));
    if (!std::equal(have.begin(), have.end(), ne.begin(), ne.end())) {
      fail("has ne ", detail::shape_string(have), ", expected ", detail::shape_string(ne));
    }
  }
  /// Throws `moet::Error` unless moet converts the type (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
  void require_readable() const {
    if (!ggml_type_readable(info_.type)) {
      fail("has type ", info_.name,
           ", which moet does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
    }
  }

  /// The sub-tensor at index `i` of the outermost dimension (`ne(n_dims() - 1)`), one
  /// dimension fewer: expert `i` of a stacked `[K, N, E]` tensor is `[K, N]`.
  GgufTensor slice(Index i) const {
    if (n_dims_ == 0) fail("has no dimensions to slice");
    const auto outer = static_cast<std::size_t>(n_dims_ - 1);
    if (i < 0 || i >= ne_[outer]) fail("has no slice ", i, " (outer dimension ", ne_[outer], ")");
    GgufTensor out = *this;
    out.name_ = name_ + "[" + std::to_string(i) + "]";
    out.ne_[outer] = 1;
    out.n_dims_ = n_dims_ - 1;
    const std::size_t part = static_cast<std::size_t>(out.rows() * out.row_bytes());
    out.bytes_ = bytes_.subspan(static_cast<std::size_t>(i) * part, part);
    out.offset_ = offset_ + static_cast<std::uint64_t>(i) * part;
    return out;
  }

  /// The blocks of a `Q8_0`, `Q4_0` or `Q4_1` tensor (`Block` = `detail::BlockQ8_0`, ...),
  /// `rows() * cols() / 32` of them, row after row, straight from the mapping. Throws
  /// `moet::Error` when the type is not the block's, or when the data are not aligned for
  /// `Block` in memory (for a file mapped by `open`, only when its `general.alignment` is 1).
  template <class Block>
  std::span<const Block> blocks() const {
    constexpr GgmlType kType = std::is_same_v<Block, detail::BlockQ8_0>   ? GgmlType::kQ8_0
                               : std::is_same_v<Block, detail::BlockQ4_0> ? GgmlType::kQ4_0
                                                                          : GgmlType::kQ4_1;
    static_assert(std::is_same_v<Block, detail::BlockQ8_0> ||
                      std::is_same_v<Block, detail::BlockQ4_0> ||
                      std::is_same_v<Block, detail::BlockQ4_1>,
                  "blocks<Block>() takes detail::BlockQ8_0, BlockQ4_0 or BlockQ4_1");
    require_type(kType);
    if (reinterpret_cast<std::uintptr_t>(bytes_.data()) % alignof(Block) != 0) {
      fail("data are not ", alignof(Block), "-byte aligned in memory; read them with read_rows");
    }
    // The bytes hold ggml's blocks; Block is the same trivially copyable layout (34, 18, 20
    // bytes, checked in detail/quant.hpp).
    return {reinterpret_cast<const Block*>(bytes_.data()), bytes_.size() / sizeof(Block)};
  }

  /// Writes the `(n_rows, n_cols)` block at `(row0, col0)` of the matrix view to
  /// `out[i * out_row_stride + j * out_col_stride]` as float (`T = float`, dequantised for
  /// the block types) or bf16 (`T = detail::Bf16`; BF16 copied, the rest rounded). Throws
  /// `moet::Error` for a type moet does not read or a block outside the matrix.
  template <class T>
  void read_block(Index row0, Index col0, Index n_rows, Index n_cols, T* out, Index out_row_stride,
                  Index out_col_stride) const {
    require_readable();
    if (row0 < 0 || col0 < 0 || n_rows < 0 || n_cols < 0 || row0 > rows() - n_rows ||
        col0 > cols() - n_cols) {
      fail("block (", n_rows, ", ", n_cols, ") at (", row0, ", ", col0,
           ") is outside its matrix view (", rows(), ", ", cols(), ")");
    }
    if (n_rows == 0 || n_cols == 0) return;
    detail::convert_block(codec(), bytes_.data(), row_bytes(), row0, col0, n_rows, n_cols, out,
                          out_row_stride, out_col_stride);
  }

 private:
  friend class detail::MatrixViewReads<GgufTensor>;
  friend class GgufFile;
  GgufTensor() = default;

  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("GgufTensor", file_, ": tensor '", name_, "' ", std::forward<Args>(args)...);
  }
  detail::ElementCodec codec() const {
    switch (info_.type) {
      case GgmlType::kF16:
        return detail::ElementCodec::kF16;
      case GgmlType::kBf16:
        return detail::ElementCodec::kBf16;
      case GgmlType::kQ8_0:
        return detail::ElementCodec::kQ8_0;
      case GgmlType::kQ4_0:
        return detail::ElementCodec::kQ4_0;
      case GgmlType::kQ4_1:
        return detail::ElementCodec::kQ4_1;
      default:
        return detail::ElementCodec::kF32;
    }
  }

  std::string file_;
  std::string name_;
  GgmlTypeInfo info_{GgmlType::kF32, "F32", 1, 4};
  int n_dims_ = 0;
  std::array<Index, 4> ne_{1, 1, 1, 1};
  std::uint64_t offset_ = 0;
  std::span<const std::byte> bytes_;
};

}  // namespace moet
