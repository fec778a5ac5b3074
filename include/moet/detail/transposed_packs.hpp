#pragma once
/// \file detail/transposed_packs.hpp
/// The backward's packed weights: every expert's weight tensors packed transposed (`W^T`, float,
/// from the float master weights whatever the bank's format), for the input-gradient products
/// `dX = dY W^T` on the packed kernels. Packed lazily, by the backward of each expert, once per
/// version of the weights (`PackedCopies::generation()`): a training step repacks each weight
/// once, in the task that runs that expert.
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "moet/config.hpp"
#include "moet/detail/kernels/packed.hpp"

namespace moet::detail {

/// `N` transposed packs per expert (indexed like the bank's tensors; biases stay empty).
template <std::size_t N>
class TransposedPacks {
 public:
  using Expert = std::array<PackedMatrix<float>, N>;

  /// Holds `num_experts` experts (new ones never packed). Not concurrently with `get`.
  void resize(Index num_experts) {
    experts_.resize(static_cast<std::size_t>(num_experts));
    generations_.resize(static_cast<std::size_t>(num_experts), kNever);
  }
  Index size() const { return static_cast<Index>(experts_.size()); }

  /// Expert `e`'s packs for the weights of version `generation`: calls `pack(expert)` first
  /// when they were packed from another version (or never). Calls for different experts may
  /// run concurrently; `0 <= e < size()`.
  template <class Pack>
  const Expert& get(Index e, Index generation, Pack&& pack) {
    const auto slot = static_cast<std::size_t>(e);
    if (generations_[slot] != generation) {
      pack(experts_[slot]);
      generations_[slot] = generation;
    }
    return experts_[slot];
  }

  /// Bytes held (part of `ExpertBank::packed_bytes`).
  std::size_t bytes() const {
    std::size_t total = 0;
    for (const Expert& x : experts_) {
      for (const PackedMatrix<float>& m : x) total += m.bytes();
    }
    return total;
  }

 private:
  static constexpr Index kNever = -1;
  std::vector<Expert> experts_;
  std::vector<Index> generations_;
};

}  // namespace moet::detail
