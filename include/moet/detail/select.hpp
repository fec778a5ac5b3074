#pragma once
/// \file detail/select.hpp
/// Row kernels shared by the gates: stable softmax, ordering with ties to the lower id,
/// the parallel router product, finiteness checks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>

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

/// True when every entry is finite (no NaN, no Inf).
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  return m.size() == 0 || m.derived().allFinite();
}

}  // namespace moet::detail
