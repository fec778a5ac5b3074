#pragma once
/// \file io/bytes.hpp
/// What moet's file readers share (internal, no API promise): little-endian loads that never
/// assume alignment, overflow-checked size arithmetic, and one element converter that reads a
/// block of a row-major matrix stored as F32, F16, BF16 or in ggml's Q8_0 / Q4_0 / Q4_1 blocks
/// into float or bf16 storage with any output strides (so a loader can write a transpose).

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// The unsigned integer stored little-endian at `p` (any alignment, any host byte order).
template <class U>
U load_le(const std::byte* p) {
  static_assert(std::is_unsigned_v<U>, "load_le reads unsigned integers");
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) {
    v = static_cast<U>(
        v | static_cast<U>(static_cast<U>(std::to_integer<std::uint8_t>(p[i])) << (8 * i)));
  }
  return v;
}

/// The IEEE binary32 stored little-endian at `p`.
inline float load_f32(const std::byte* p) {
  return std::bit_cast<float>(load_le<std::uint32_t>(p));
}

/// `a * b` into `out`; false when it overflows `std::uint64_t`.
inline bool mul_u64(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}
/// `a + b` into `out`; false when it overflows `std::uint64_t`.
inline bool add_u64(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_add_overflow(a, b, &out);
}

/// Whether the product of the dimensions, each counted as at least 1, fits `Index`: then the
/// element count and every partial product (rows of a matrix view) fit too, even for a tensor
/// with a zero dimension among huge ones.
template <class Range>
bool extent_fits(const Range& shape) {
  std::uint64_t p = 1;
  for (const auto d : shape) {
    if (d < 0) return false;
    const auto u = static_cast<std::uint64_t>(d);
    if (!mul_u64(p, u == 0 ? 1 : u, p)) return false;
  }
  return p <= static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
}

/// "[2, 3, 4]".
template <class Range>
std::string shape_string(const Range& shape) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (const auto d : shape) {
    out << (first ? "" : ", ") << d;
    first = false;
  }
  out << ']';
  return out.str();
}

/// How the elements of a stored matrix are encoded (the formats moet converts from).
enum class ElementCodec { kF32, kF16, kBf16, kQ8_0, kQ4_0, kQ4_1 };

/// Elements per storage block (32 for the block formats, else 1) and bytes per block.
constexpr Index codec_block(ElementCodec c) {
  return c == ElementCodec::kQ8_0 || c == ElementCodec::kQ4_0 || c == ElementCodec::kQ4_1
             ? kQuantBlock
             : 1;
}
constexpr Index codec_block_bytes(ElementCodec c) {
  switch (c) {
    case ElementCodec::kF32:
      return 4;
    case ElementCodec::kF16:
    case ElementCodec::kBf16:
      return 2;
    case ElementCodec::kQ8_0:
      return static_cast<Index>(sizeof(BlockQ8_0));
    case ElementCodec::kQ4_0:
      return static_cast<Index>(sizeof(BlockQ4_0));
    case ElementCodec::kQ4_1:
      return static_cast<Index>(sizeof(BlockQ4_1));
  }
  return 0;
}

/// The block of a quantised row starting at `p` (copied out, so `p` needs no alignment).
template <class Block>
Block load_block(const std::byte* p) {
  Block b;
  std::memcpy(&b, p, sizeof(Block));
  return b;
}

/// Converts element `j` of a row (at `row`, encoded as `c`) to float.
inline float load_element(ElementCodec c, const std::byte* row, Index j) {
  switch (c) {
    case ElementCodec::kF32:
      return load_f32(row + 4 * j);
    case ElementCodec::kF16:
      return from_f16(load_le<std::uint16_t>(row + 2 * j));
    case ElementCodec::kBf16:
      return from_bf16(Bf16{load_le<std::uint16_t>(row + 2 * j)});
    case ElementCodec::kQ8_0:
      return block_value(load_block<BlockQ8_0>(row + (j / kQuantBlock) * 34), j % kQuantBlock);
    case ElementCodec::kQ4_0:
      return block_value(load_block<BlockQ4_0>(row + (j / kQuantBlock) * 18), j % kQuantBlock);
    case ElementCodec::kQ4_1:
      return block_value(load_block<BlockQ4_1>(row + (j / kQuantBlock) * 20), j % kQuantBlock);
  }
  return 0.0f;
}

/// Writes elements `[col0, col0 + cols)` of rows `[row0, row0 + rows)` of a row-major matrix
/// stored at `data` (`row_bytes` bytes per row, elements encoded as `c`) to
/// `out[i * out_row_stride + j * out_col_stride]` (`i`, `j` counted from `row0`, `col0`), as
/// float or as bf16 (`T = Bf16`: BF16 storage is copied bit for bit, other formats round to
/// nearest even). The caller has checked the ranges; nothing here allocates.
template <class T>
void convert_block(ElementCodec c, const std::byte* data, Index row_bytes, Index row0, Index col0,
                   Index rows, Index cols, T* out, Index out_row_stride, Index out_col_stride) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, Bf16>,
                "convert_block writes float or Bf16");
  for (Index i = 0; i < rows; ++i) {
    const std::byte* row = data + (row0 + i) * row_bytes;
    T* dst = out + i * out_row_stride;
    if constexpr (std::is_same_v<T, Bf16>) {
      if (c == ElementCodec::kBf16) {
        for (Index j = 0; j < cols; ++j) {
          dst[j * out_col_stride] = Bf16{load_le<std::uint16_t>(row + 2 * (col0 + j))};
        }
        continue;
      }
    }
    switch (c) {  // the common formats get their own loops; the rest go element by element
      case ElementCodec::kF32:
        for (Index j = 0; j < cols; ++j) {
          const float v = load_f32(row + 4 * (col0 + j));
          if constexpr (std::is_same_v<T, float>) {
            dst[j * out_col_stride] = v;
          } else {
            dst[j * out_col_stride] = to_bf16(v);
          }
        }
        break;
      case ElementCodec::kBf16:  // float output (bf16 output was handled above)
        if constexpr (std::is_same_v<T, float>) {
          for (Index j = 0; j < cols; ++j) {
            dst[j * out_col_stride] = from_bf16(Bf16{load_le<std::uint16_t>(row + 2 * (col0 + j))});
          }
        }
        break;
      case ElementCodec::kF16:
        for (Index j = 0; j < cols; ++j) {
          const float v = from_f16(load_le<std::uint16_t>(row + 2 * (col0 + j)));
          if constexpr (std::is_same_v<T, float>) {
            dst[j * out_col_stride] = v;
          } else {
            dst[j * out_col_stride] = to_bf16(v);
          }
        }
        break;
      default:
        for (Index j = 0; j < cols; ++j) {
          const float v = load_element(c, row, col0 + j);
          if constexpr (std::is_same_v<T, float>) {
            dst[j * out_col_stride] = v;
          } else {
            dst[j * out_col_stride] = to_bf16(v);
          }
        }
        break;
    }
  }
}

/// The reads every file tensor's matrix view offers on top of its own `read_block(row0, col0,
/// n_rows, n_cols, out, out_row_stride, out_col_stride)`, `rows()`, `cols()` and `fail(...)`
/// (which may be private: `Derived` befriends this class). `TensorView` and `GgufTensor` derive
/// from it.
template <class Derived>
class MatrixViewReads {
 public:
  /// Reads rows `[row0, row0 + out.rows())` of the matrix view into `out` `(n, cols())`.
  void read_rows(Index row0, Rows<float> out) const {
    const Derived& d = self();
    if (out.cols() != d.cols()) d.fail("has ", d.cols(), " columns, the output ", out.cols());
    d.read_block(row0, 0, out.rows(), out.cols(), out.data(), out.outerStride(), Index{1});
  }
  /// Reads the transpose of the block at `(row0, col0)` into `out` `(n_cols, n_rows)`:
  /// `out(j, i) = M(row0 + i, col0 + j)`. A weight stored `[out, in]` (an `nn.Linear` weight, a
  /// GGUF `[K, N]` tensor) read this way lands as moet's `(in, out)`.
  void read_block_transposed(Index row0, Index col0, Rows<float> out) const {
    self().read_block(row0, col0, out.cols(), out.rows(), out.data(), Index{1},
                      out.outerStride());
  }
  /// The whole matrix view `(rows(), cols())` as float (a copy: for small tensors and tests).
  RowMatrix<float> to_matrix() const {
    RowMatrix<float> m(self().rows(), self().cols());
    read_rows(0, m);
    return m;
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace moet::detail
