#pragma once
/// \file io/gguf.hpp
/// Reading GGUF files (llama.cpp's format), versions 2 and 3: `GgufFile` maps the file and
/// parses its header, metadata and tensor infos; `GgufValue` is one metadata value;
/// `GgufTensor` is one tensor's type, dimensions and bytes, with its ggml blocks for the
/// quantised types moet packs (`Q8_0`, `Q4_0`, `Q4_1`: `detail::BlockQ8_0` ... in
/// detail/quant.hpp, the same bytes as ggml's) and float or bf16 rows for any readable type;
/// `GgufArchitecture` collects the MoE keys of `general.architecture`.
///
/// The format (little-endian): the magic `GGUF`, a `u32` version, `u64` tensor and metadata
/// counts, the metadata (each a string key, a `u32` value type, the value: integers, floats,
/// bools, `u64`-length strings, or arrays of a type with a `u64` length, nested arrays too),
/// the tensor infos (name, `u32` dimension count, `u64` dimensions `ne0` (fastest) first, the
/// `u32` ggml type, the `u64` offset into the data section), padding to `general.alignment`
/// (a `u32`, default 32), then the data section. A 2-D weight `ne = [K, N]` is `N` rows of `K`
/// (PyTorch's `[N, K]`); llama.cpp's stacked experts `blk.L.ffn_gate_exps.weight` are
/// `ne = [n_embd, n_ff, n_expert]`, `ffn_down_exps` `[n_ff, n_embd, n_expert]`, and
/// `ffn_gate_inp` `[n_embd, n_expert]`; the block formats run along `ne0`.
///
/// Everything is checked when the file is opened, and a malformed file is a `moet::Error`
/// naming the file and the key or tensor at fault: a bad magic or version (v1, big-endian,
/// newer), counts that cannot fit in the file, a string, array or value running past the end,
/// an unknown value or ggml type, a bool that is neither 0 nor 1, a repeated key or tensor, a
/// `general.alignment` that is not a `u32` power of two, more than 4 dimensions, element or
/// byte counts that overflow, rows that are not whole blocks, offsets that are misaligned, past
/// the data section, or overlapping.
///
/// ```cpp
/// auto gguf = moet::GgufFile::open("qwen3moe-q8_0.gguf");
/// moet::GgufArchitecture arch = gguf.architecture();  // arch.expert_count, ...
/// moet::GgufTensor up = gguf.tensor("blk.0.ffn_up_exps.weight");
/// std::span<const moet::detail::BlockQ8_0> blocks = up.slice(3).blocks<moet::detail::BlockQ8_0>();
/// ```

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
class GgufTensor {
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
  /// Reads rows `[row0, row0 + out.rows())` into `out` `(n, cols())`.
  void read_rows(Index row0, Rows<float> out) const {
    if (out.cols() != cols()) fail("has ", cols(), " columns, the output ", out.cols());
    read_block(row0, 0, out.rows(), out.cols(), out.data(), out.outerStride(), Index{1});
  }
  /// Reads the transpose of the block at `(row0, col0)` into `out` `(n_cols, n_rows)`:
  /// `out(j, i) = M(row0 + i, col0 + j)` (a `[K, N]` GGUF weight lands as moet's `(K, N)`).
  void read_block_transposed(Index row0, Index col0, Rows<float> out) const {
    read_block(row0, col0, out.cols(), out.rows(), out.data(), Index{1}, out.outerStride());
  }
  /// The whole matrix view `(rows(), cols())` as float (a copy: for small tensors and tests).
  RowMatrix<float> to_matrix() const {
    RowMatrix<float> m(rows(), cols());
    read_rows(0, m);
    return m;
  }

 private:
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

/// The MoE hyper-parameters llama.cpp stores under `general.architecture` (`<arch>.<key>`), as
/// present in the file (absent keys stay empty). See `GgufFile::architecture`.
struct GgufArchitecture {
  std::string name;                                 ///< `general.architecture`, e.g. "qwen2moe"
  std::optional<Index> block_count;                 ///< layers
  std::optional<Index> embedding_length;            ///< model_dim
  std::optional<Index> expert_feed_forward_length;  ///< routed experts' hidden_dim
  std::optional<Index> expert_shared_feed_forward_length;  ///< shared experts' hidden_dim
  std::optional<Index> expert_count;                       ///< routed experts
  std::optional<Index> expert_used_count;                  ///< k
  std::optional<Index> expert_shared_count;                ///< shared experts
  std::optional<Index> leading_dense_block_count;          ///< first layers with a dense MLP
  std::optional<Index> expert_group_count;                 ///< DeepSeek's n_group
  std::optional<Index> expert_group_used_count;            ///< DeepSeek's topk_group
  std::optional<bool> expert_weights_norm;                 ///< renormalise the top-k weights
  std::optional<float> expert_weights_scale;               ///< routed_scaling_factor
  /// llama.cpp's gating function: 1 softmax, 2 sigmoid (3 softmax over the chosen weights).
  std::optional<std::uint32_t> expert_gating_func;
};

namespace detail {
struct GgufTensorInfo {
  GgmlTypeInfo info;
  int n_dims;
  std::array<Index, 4> ne;
  std::uint64_t offset;  // in the data section
  std::uint64_t bytes;
};
}  // namespace detail

/// One GGUF file (v2 or v3), memory-mapped (or a caller's buffer), checked when opened. Its
/// metadata and tensors are looked up by name; immutable once opened, so several threads may
/// read it at once. Movable; the views it hands out stay valid while it (or what it moved to)
/// lives.
class GgufFile {
 public:
  /// Maps and checks the file at `path` (see the file comment for every check). Throws
  /// `moet::Error` naming the file and the key or tensor at fault.
  static GgufFile open(const std::filesystem::path& path);
  /// Parses a GGUF file held in memory, which must outlive the object (borrowed, not copied).
  static GgufFile from_bytes(std::span<const std::byte> bytes, std::string name = "<memory>");

  const std::string& name() const { return name_; }
  /// 2 or 3.
  std::uint32_t version() const { return version_; }
  /// `general.alignment` (32 when absent).
  std::uint64_t alignment() const { return alignment_; }
  /// Where the data section starts in the file.
  std::uint64_t data_offset() const { return data_offset_; }

  /// Metadata keys in file order.
  const std::vector<std::string>& keys() const { return key_order_; }
  /// The value of `key`, or null.
  const GgufValue* find(std::string_view key) const {
    const auto it = values_.find(key);
    return it == values_.end() ? nullptr : &it->second;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  /// The value of `key` as a non-negative integer; none when absent. Throws `moet::Error`
  /// naming the key when it is present with another type or a negative value.
  std::optional<std::uint64_t> get_uint(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto u = v->to_uint();
    if (!u) bad_key(key, *v, "a non-negative integer");
    return u;
  }
  /// The value of `key` as a double (floats and integers); none when absent; throws for
  /// another type.
  std::optional<double> get_float(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto d = v->to_double();
    if (!d) bad_key(key, *v, "a number");
    return d;
  }
  /// The value of `key` as a bool; none when absent; throws for another type.
  std::optional<bool> get_bool(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto b = v->to_bool();
    if (!b) bad_key(key, *v, "a bool");
    return b;
  }
  /// The value of `key` as a string; none when absent; throws for another type.
  std::optional<std::string_view> get_string(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto s = v->to_string();
    if (!s) bad_key(key, *v, "a string");
    return s;
  }

  /// `general.architecture` and its MoE keys (`<arch>.expert_count`, `.expert_used_count`,
  /// `.expert_shared_count`, `.expert_weights_norm`, `.expert_weights_scale`,
  /// `.expert_gating_func`, `.expert_group_count`, `.expert_group_used_count`,
  /// `.leading_dense_block_count`, `.block_count`, `.embedding_length`,
  /// `.expert_feed_forward_length`, `.expert_shared_feed_forward_length`). Throws
  /// `moet::Error` naming the key when `general.architecture` is missing or any of them has
  /// the wrong type or an impossible value (an integer past `Index`, more experts used than
  /// there are).
  GgufArchitecture architecture() const {
    GgufArchitecture a;
    const auto arch = get_string("general.architecture");
    if (!arch) detail::fail("GgufFile", name_, ": no key 'general.architecture'");
    a.name = std::string(*arch);
    const auto count = [&](const char* suffix) -> std::optional<Index> {
      const std::string key = a.name + "." + suffix;
      const auto v = get_uint(key);
      if (!v) return std::nullopt;
      if (*v > static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max())) {
        detail::fail("GgufFile", name_, ": key '", key, "' = ", *v, " is too large");
      }
      return static_cast<Index>(*v);
    };
    a.block_count = count("block_count");
    a.embedding_length = count("embedding_length");
    a.expert_feed_forward_length = count("expert_feed_forward_length");
    a.expert_shared_feed_forward_length = count("expert_shared_feed_forward_length");
    a.expert_count = count("expert_count");
    a.expert_used_count = count("expert_used_count");
    a.expert_shared_count = count("expert_shared_count");
    a.leading_dense_block_count = count("leading_dense_block_count");
    a.expert_group_count = count("expert_group_count");
    a.expert_group_used_count = count("expert_group_used_count");
    a.expert_weights_norm = get_bool(a.name + ".expert_weights_norm");
    if (const auto s = get_float(a.name + ".expert_weights_scale")) {
      a.expert_weights_scale = static_cast<float>(*s);
    }
    if (const auto g = count("expert_gating_func")) {
      a.expert_gating_func = static_cast<std::uint32_t>(*g);
    }
    if (a.expert_count && a.expert_used_count && *a.expert_used_count > *a.expert_count) {
      detail::fail("GgufFile", name_, ": key '", a.name,
                   ".expert_used_count' = ", *a.expert_used_count, " exceeds '", a.name,
                   ".expert_count' = ", *a.expert_count);
    }
    return a;
  }

  /// Number of tensors.
  Index num_tensors() const { return static_cast<Index>(tensor_order_.size()); }
  /// Tensor names in file order.
  const std::vector<std::string>& tensor_names() const { return tensor_order_; }
  bool has_tensor(std::string_view name) const { return tensors_.contains(name); }
  /// The tensor `name`, or none.
  std::optional<GgufTensor> find_tensor(std::string_view name) const;
  /// The tensor `name`; throws `moet::Error` naming the file and the tensor when absent.
  GgufTensor tensor(std::string_view name) const {
    auto t = find_tensor(name);
    if (!t) detail::fail("GgufFile", name_, ": no tensor '", name, "'");
    return *std::move(t);
  }

 private:
  friend class detail::GgufParser;
  GgufFile() = default;

  [[noreturn]] void bad_key(std::string_view key, const GgufValue& v, const char* want) const {
    detail::fail("GgufFile", name_, ": key '", key, "' is ",
                 v.is_array() ? "an array" : gguf_value_type_name(v.type()), ", expected ", want);
  }

  MappedFile map_;
  std::string name_;
  std::span<const std::byte> bytes_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = detail::kGgufDefaultAlignment;
  std::uint64_t data_offset_ = 0;
  std::vector<std::string> key_order_;
  std::map<std::string, GgufValue, std::less<>> values_;
  std::vector<std::string> tensor_order_;
  std::map<std::string, detail::GgufTensorInfo, std::less<>> tensors_;
};

namespace detail {

/// Reads a GGUF file front to back; every read is bounds-checked and every error names where
/// the parser is (the key or tensor being read).
class GgufParser {
 public:
  GgufParser(GgufFile& out, std::span<const std::byte> bytes) : out_(out), bytes_(bytes) {}

  void parse() {
    where_ = "header";
    if (bytes_.size() < 4) fail("the file is ", bytes_.size(), " bytes, too short for the magic");
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
      std::string shown;
      for (int i = 0; i < 4; ++i) {
        const auto c = std::to_integer<unsigned char>(bytes_[static_cast<std::size_t>(i)]);
        shown += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
      }
      fail("bad magic '", shown, "', expected 'GGUF'");
    }
    pos_ = 4;
    const auto version = read<std::uint32_t>("the version");
    if (version != 0 && (version & 0xffffU) == 0) {
      fail("version ", version, " looks byte-swapped: big-endian GGUF files are not supported");
    }
    if (version == 1) fail("GGUF version 1 is not supported (moet reads versions 2 and 3)");
    if (version < 2 || version > 3) {
      fail("unsupported GGUF version ", version, " (moet reads versions 2 and 3)");
    }
    out_.version_ = version;
    const auto n_tensors = read<std::uint64_t>("the tensor count");
    const auto n_kv = read<std::uint64_t>("the metadata count");
    // Each metadata entry takes at least 13 bytes (key length, value type, a 1-byte value),
    // each tensor info at least 24 (name length, dimension count, type, offset).
    if (n_kv > remaining() / 13) {
      fail("metadata count ", n_kv, " cannot fit in the ", remaining(), " bytes left");
    }
    if (n_tensors > remaining() / 24) {
      fail("tensor count ", n_tensors, " cannot fit in the ", remaining(), " bytes left");
    }

    out_.key_order_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      where_ = concat("metadata entry ", i);
      std::string key(read_string("the key"));
      if (key.empty()) fail("empty key");
      where_ = concat("key '", key, "'");
      if (out_.values_.contains(key)) fail("repeated key");
      const auto type = read_value_type("the value type");
      GgufValue value = read_value(type, 0);
      out_.values_.emplace(key, std::move(value));
      out_.key_order_.push_back(std::move(key));
    }

    if (const GgufValue* a = out_.find("general.alignment")) {
      where_ = "key 'general.alignment'";
      if (a->type() != GgufValueType::kU32) {
        fail("is ", a->is_array() ? "an array" : gguf_value_type_name(a->type()), ", expected u32");
      }
      const std::uint64_t alignment = *a->to_uint();
      if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        fail("alignment ", alignment, " is not a power of two");
      }
      out_.alignment_ = alignment;
    }

    out_.tensor_order_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      where_ = concat("tensor info ", i);
      std::string name(read_string("the tensor name"));
      if (name.empty()) fail("empty tensor name");
      where_ = concat("tensor '", name, "'");
      if (out_.tensors_.contains(name)) fail("repeated tensor name");
      out_.tensors_.emplace(name, read_tensor_info());
      out_.tensor_order_.push_back(std::move(name));
    }

    // The data section starts at the next multiple of the alignment.
    where_ = "data section";
    const std::uint64_t a = out_.alignment_;
    std::uint64_t start = 0;
    if (!add_u64(pos_, a - 1, start)) fail("start overflows");
    start = start / a * a;
    if (start > bytes_.size()) {
      if (n_tensors > 0) {
        fail("starts at ", start, ", past the end of the file (", bytes_.size(), " bytes)");
      }
      start = bytes_.size();
    }
    out_.data_offset_ = start;
    check_tensor_ranges(bytes_.size() - start);
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("GgufFile", out_.name_, ": ", where_, ": ", std::forward<Args>(args)...);
  }
  std::uint64_t remaining() const { return bytes_.size() - pos_; }
  void need(std::uint64_t n, const char* what) const {
    if (n > remaining()) {
      fail(what, " (", n, " bytes at offset ", pos_, ") runs past the end of the file (",
           bytes_.size(), " bytes)");
    }
  }
  template <class U>
  U read(const char* what) {
    need(sizeof(U), what);
    const U v = load_le<U>(bytes_.data() + pos_);
    pos_ += sizeof(U);
    return v;
  }
  std::string_view read_string(const char* what) {
    const auto n = read<std::uint64_t>(what);
    if (n > remaining()) {
      fail(what, ": string length ", n, " at offset ", pos_ - 8, " runs past the end of the file (",
           bytes_.size(), " bytes)");
    }
    const std::string_view s(reinterpret_cast<const char*>(bytes_.data() + pos_),
                             static_cast<std::size_t>(n));
    pos_ += n;
    return s;
  }
  GgufValueType read_value_type(const char* what) {
    const auto t = read<std::uint32_t>(what);
    if (t > 12) fail("unknown value type ", t);
    return static_cast<GgufValueType>(t);
  }
  void check_bools(std::span<const std::byte> raw) const {
    for (const std::byte b : raw) {
      const int v = std::to_integer<int>(b);
      if (v > 1) fail("bool value ", v, " is neither 0 nor 1");
    }
  }

  GgufValue read_value(GgufValueType type, int depth) {
    GgufValue v;
    v.type_ = type;
    const std::size_t width = gguf_value_size(type);
    if (width > 0) {
      need(width, gguf_value_type_name(type));
      v.raw_ = bytes_.subspan(static_cast<std::size_t>(pos_), width);
      pos_ += width;
      if (type == GgufValueType::kBool) check_bools(v.raw_);
      return v;
    }
    if (type == GgufValueType::kString) {
      v.text_ = read_string("the string");
      return v;
    }
    // An array: element type, length, elements.
    if (depth >= kGgufMaxArrayDepth) fail("arrays nested deeper than ", kGgufMaxArrayDepth);
    v.element_ = read_value_type("the array's element type");
    const auto count = read<std::uint64_t>("the array length");
    v.count_ = static_cast<std::size_t>(count);
    const std::size_t elem = gguf_value_size(v.element_);
    if (elem > 0) {
      if (count > remaining() / elem) {
        fail("array of ", count, " ", gguf_value_type_name(v.element_),
             " runs past the end of the file (", remaining(), " bytes left)");
      }
      v.raw_ =
          bytes_.subspan(static_cast<std::size_t>(pos_), static_cast<std::size_t>(count) * elem);
      pos_ += count * elem;
      if (v.element_ == GgufValueType::kBool) check_bools(v.raw_);
      return v;
    }
    // Strings take at least their 8-byte length, arrays their 12-byte type and length.
    const std::uint64_t min_bytes = v.element_ == GgufValueType::kString ? 8 : 12;
    if (count > remaining() / min_bytes) {
      fail("array of ", count, " ", gguf_value_type_name(v.element_),
           " runs past the end of the file (", remaining(), " bytes left)");
    }
    auto items = std::make_shared<std::vector<GgufValue>>();
    items->reserve(static_cast<std::size_t>(count));
    for (std::uint64_t i = 0; i < count; ++i) items->push_back(read_value(v.element_, depth + 1));
    v.items_ = std::move(items);
    return v;
  }

  GgufTensorInfo read_tensor_info() {
    GgufTensorInfo t{};
    const auto n_dims = read<std::uint32_t>("the dimension count");
    if (n_dims > 4) fail(n_dims, " dimensions (at most 4)");
    t.n_dims = static_cast<int>(n_dims);
    t.ne = {1, 1, 1, 1};
    std::uint64_t numel = 1;
    bool overflow = false;
    for (std::uint32_t j = 0; j < n_dims; ++j) {
      const auto d = read<std::uint64_t>("a dimension");
      if (d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
        fail("dimension ", j, " = ", d, " is too large");
      }
      t.ne[j] = static_cast<Index>(d);
      overflow = overflow || !mul_u64(numel, d, numel);
    }
    if (overflow ||
        !extent_fits(std::span<const Index>(t.ne.data(), static_cast<std::size_t>(n_dims)))) {
      fail("ne ", shape_string(std::span<const Index>(t.ne.data(), n_dims)),
           " has more elements than fit in 63 bits");
    }
    const auto type_id = read<std::uint32_t>("the ggml type");
    const auto info = ggml_type_info(type_id);
    if (!info) fail("unknown ggml type id ", type_id);
    t.info = *info;
    if (t.ne[0] % info->block != 0) {
      fail(t.ne[0], " elements per row is not a whole number of ", info->name, " blocks of ",
           info->block);
    }
    std::uint64_t row_bytes = 0;  // a row's bytes must fit Index even when the tensor is empty
    if (!mul_u64(static_cast<std::uint64_t>(t.ne[0] / info->block),
                 static_cast<std::uint64_t>(info->block_bytes), row_bytes) ||
        row_bytes > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
      fail("a row of ", t.ne[0], " ", info->name, " elements has more bytes than fit in 63 bits");
    }
    if (!mul_u64(numel / static_cast<std::uint64_t>(info->block),
                 static_cast<std::uint64_t>(info->block_bytes), t.bytes)) {
      fail("byte count overflows");
    }
    t.offset = read<std::uint64_t>("the data offset");
    return t;
  }

  void check_tensor_ranges(std::uint64_t data_size) {
    std::vector<std::pair<const std::string*, const GgufTensorInfo*>> order;
    for (const auto& [name, t] : out_.tensors_) {
      where_ = concat("tensor '", name, "'");
      if (t.offset % out_.alignment_ != 0) {
        fail("offset ", t.offset, " is not a multiple of the alignment ", out_.alignment_);
      }
      std::uint64_t end = 0;
      if (!add_u64(t.offset, t.bytes, end) || end > data_size) {
        fail(ggml_type_name(t.info.type), " data [", t.offset, ", ", t.offset, " + ", t.bytes,
             ") run past the end of the data section (", data_size,
             " bytes): the file is truncated or the offset or type is wrong");
      }
      if (t.bytes > 0) order.emplace_back(&name, &t);
    }
    std::sort(order.begin(), order.end(),
              [](const auto& x, const auto& y) { return x.second->offset < y.second->offset; });
    where_ = "data section";
    for (std::size_t i = 1; i < order.size(); ++i) {
      const auto& [prev_name, prev] = order[i - 1];
      const auto& [name, t] = order[i];
      if (t->offset < prev->offset + prev->bytes) {
        fail("tensors '", *prev_name, "' [", prev->offset, ", ", prev->offset + prev->bytes,
             ") and '", *name, "' [", t->offset, ", ", t->offset + t->bytes, ") overlap");
      }
    }
  }

  GgufFile& out_;
  std::span<const std::byte> bytes_;
  std::uint64_t pos_ = 0;
  std::string where_;
};

}  // namespace detail

inline GgufFile GgufFile::open(const std::filesystem::path& path) {
  GgufFile out;
  out.map_ = MappedFile::open(path);
  out.name_ = path.string();
  out.bytes_ = out.map_.bytes();
  detail::GgufParser(out, out.bytes_).parse();
  return out;
}

inline GgufFile GgufFile::from_bytes(std::span<const std::byte> bytes, std::string name) {
  GgufFile out;
  out.name_ = std::move(name);
  out.bytes_ = bytes;
  detail::GgufParser(out, out.bytes_).parse();
  return out;
}

inline std::optional<GgufTensor> GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) return std::nullopt;
  const auto& t = it->second;
  GgufTensor out;
  out.file_ = name_;
  out.name_ = it->first;
  out.info_ = t.info;
  out.n_dims_ = t.n_dims;
  out.ne_ = t.ne;
  out.offset_ = t.offset;
  out.bytes_ = bytes_.subspan(static_cast<std::size_t>(data_offset_ + t.offset),
                              static_cast<std::size_t>(t.bytes));
  return out;
}

}  // namespace moet
