#pragma once
/// \file io/checkpoint_tensor.hpp
/// `CheckpointTensor`: one weight of a pretrained checkpoint (a safetensors `TensorView` or a
/// GGUF `GgufTensor`) seen as PyTorch's `[out, in]` matrix, read as float or handed out as ready
/// GGUF blocks (io/checkpoint.hpp loads expert banks from it).

#include <algorithm>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "moet/io/gguf.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// One weight of a checkpoint as a PyTorch-layout `[out, in]` matrix, in its file's mapping
/// (safetensors or GGUF; valid while its `Checkpoint` lives).
class CheckpointTensor {
 public:
  explicit CheckpointTensor(TensorView t) : t_(std::move(t)) {}
  explicit CheckpointTensor(GgufTensor t) : t_(std::move(t)) {}

  /// The tensor's name in its file (`"...experts.3.w1.weight"`, `"blk.1.ffn_up_exps.weight[3]"`).
  const std::string& name() const {
    return std::visit([](const auto& t) -> const std::string& { return t.name(); }, t_);
  }
  /// `out`, `in`.
  Index rows() const {
    return std::visit([](const auto& t) { return t.rows(); }, t_);
  }
  Index cols() const {
    return std::visit([](const auto& t) { return t.cols(); }, t_);
  }
  /// The whole matrix `(rows, cols)` as float (a copy: routers and vectors).
  RowMatrix<float> to_matrix() const {
    return std::visit([](const auto& t) { return t.to_matrix(); }, t_);
  }
  /// The transpose, moet's `(in, out)`, into `out` `(cols, rows)` (converted or dequantised).
  /// Reads `kTileRows` rows at a time into a small contiguous tile and transposes it from
  /// there: writing the transpose straight from the file would store every element of a row to
  /// a different page of `out`.
  void read_transposed(Rows<float> out) const {
    const Index rows = this->rows();
    const Index cols = this->cols();
    RowMatrix<float> tile(std::min(kTileRows, rows), cols);  // (tile rows, cols)
    for (Index r0 = 0; r0 < rows; r0 += kTileRows) {
      const Index n = std::min(kTileRows, rows - r0);
      std::visit([&](const auto& t) { t.read_block(r0, 0, n, cols, tile.data(), cols, Index{1}); },
                 t_);
      // out(i, r0 + r) = tile(r, i): one contiguous run of n floats per row of `out`, read
      // from the n tile rows (in L1).
      for (Index i = 0; i < cols; ++i) {
        float* dst = out.data() + i * out.outerStride() + r0;
        const float* src = tile.data() + i;
        for (Index r = 0; r < n; ++r) dst[r] = src[r * cols];
      }
    }
  }
  /// Rows per tile of `read_transposed` (16 rows of a 4096-wide weight: 256 KiB).
  static constexpr Index kTileRows = 16;
  /// Throws `moet::Error` naming the tensor unless moet converts its type (safetensors F32,
  /// BF16, F16; GGUF F32, F16, BF16, Q8_0, Q4_0, Q4_1).
  void require_readable() const {
    if (const auto* v = std::get_if<TensorView>(&t_)) {
      v->require_float();
    } else {
      std::get<GgufTensor>(t_).require_readable();
    }
  }
  /// The GGUF blocks when the tensor is a GGUF tensor of `Block`'s type (else none).
  template <class Block>
  std::optional<std::span<const Block>> blocks() const {
    const auto* g = std::get_if<GgufTensor>(&t_);
    if (g == nullptr || g->type() != block_type<Block>()) return std::nullopt;
    return g->template blocks<Block>();
  }
  /// The GGUF type, or none for a safetensors tensor.
  std::optional<GgmlType> gguf_type() const {
    const auto* g = std::get_if<GgufTensor>(&t_);
    return g == nullptr ? std::nullopt : std::optional<GgmlType>(g->type());
  }

 private:
  template <class Block>
  static constexpr GgmlType block_type() {
    return std::is_same_v<Block, detail::BlockQ8_0>   ? GgmlType::kQ8_0
           : std::is_same_v<Block, detail::BlockQ4_0> ? GgmlType::kQ4_0
                                                      : GgmlType::kQ4_1;
  }
  std::variant<TensorView, GgufTensor> t_;
};

}  // namespace moet
