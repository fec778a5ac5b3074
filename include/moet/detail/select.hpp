#pragma once
/// \file detail/select.hpp
/// Row kernels shared by the gates: stable softmax, ordering with ties to the lower id,
/// the parallel router product, finiteness checks.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "moet/detail/parallel.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Rows per router-product task: fixed so the split never depends on the thread count.
inline constexpr Index kRouterRowBlock = 64;

/// Numerically stable `log(1 + exp(v))`.
template <class S>
S softplus(S v) {
  return std::max(v, S(0)) + std::log1p(std::exp(-std::abs(v)));
}

/// In-place softmax of `n` values (max-subtracted; a row of equal values gives 1/n each).
template <class S>
void softmax_row(S* row, Index n) {
  if (n <= 0) return;
  const S max = *std::max_element(row, row + n);
  S sum = S(0);
  for (Index j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - max);
    sum += row[j];
  }
  const S inv = S(1) / sum;
  for (Index j = 0; j < n; ++j) row[j] *= inv;
}

/// Strict "comes first" order: larger value first, equal values by lower id (a stable
/// descending sort). Values must not be NaN.
template <class S>
struct DescendingThenId {
  const S* values;
  bool operator()(std::int32_t a, std::int32_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

/// Writes into `order[0..n)` the ids `0..n-1` sorted by descending value, ties to lower id.
template <class S>
void sort_descending(const S* values, Index n, std::int32_t* order) {
  std::iota(order, order + n, std::int32_t{0});
  std::sort(order, order + n, DescendingThenId<S>{values});
}

/// Writes into `order[0..k)` the `k` best ids in descending order, ties to lower id
/// (`order` must hold `n` entries).
template <class S>
void top_k_descending(const S* values, Index n, Index k, std::int32_t* order) {
  std::iota(order, order + n, std::int32_t{0});
  std::partial_sort(order, order + k, order + n, DescendingThenId<S>{values});
}

/// `out = x * w` computed in parallel over fixed blocks of token rows.
/// Shapes: x (num_tokens, model_dim), w (model_dim, num_experts), out (num_tokens, num_experts).
template <class S, class Out>
void router_product(const ConstRows<S>& x, const RowMatrix<S>& w, Out&& out) {
  parallel_blocks(x.rows(), kRouterRowBlock, [&](Index begin, Index end) {
    out.middleRows(begin, end - begin).noalias() = x.middleRows(begin, end - begin) * w;
  });
}

/// True when the `n` contiguous values at `p` are all finite: an OR over the exponent-all-ones
/// test of their bits (integer work the compiler vectorises; no early exit).
template <class S>
bool all_finite_span(const S* p, Index n) {
  static_assert(std::is_floating_point_v<S>, "float or double");
  using U = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
  constexpr U kExp = static_cast<U>(sizeof(S) == 4 ? 0x7f800000ULL : 0x7ff0000000000000ULL);
  U bad = 0;
  for (Index i = 0; i < n; ++i) {
    U bits;
    std::memcpy(&bits, p + i, sizeof bits);
    bad |= static_cast<U>((bits & kExp) == kExp);
  }
  return bad == 0;
}

/// `all_finite_span` over `n` values in parallel blocks (a training bank's check per step).
template <class S>
bool all_finite_parallel(const S* p, Index n) {
  std::atomic<bool> finite{true};
  parallel_blocks(n, 4 * kElementwiseBlock, [&](Index b, Index e) {
    if (!all_finite_span(p + b, e - b)) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load(std::memory_order_relaxed);
}

/// True when every entry is finite (no NaN, no Inf). Objects with direct access (matrices,
/// maps, refs, blocks) are scanned along their storage, one inner vector at a time (Eigen's
/// `allFinite` reduces a row-major matrix column by column: a strided, scalar pass).
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  if (m.size() == 0) return true;
  if constexpr ((Derived::Flags & Eigen::DirectAccessBit) != 0 &&
                std::is_floating_point_v<typename Derived::Scalar>) {
    const Derived& d = m.derived();
    if (d.innerStride() == 1) {
      const Index outer = d.outerSize();
      const Index inner = d.innerSize();
      for (Index o = 0; o < outer; ++o) {
        if (!all_finite_span(d.data() + o * d.outerStride(), inner)) return false;
      }
      return true;
    }
  }
  return m.derived().allFinite();
}

}  // namespace moet::detail
