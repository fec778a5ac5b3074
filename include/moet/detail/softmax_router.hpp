#pragma once
/// \file detail/softmax_router.hpp
/// The kernels behind gates/router.hpp's `SoftmaxRouter` (and noisy top-k's noise weights): the
/// router matrix with its lazily allocated gradient (`RouterWeights`), its deterministic
/// initialisation, the checks of a router's shape, of `x` and of a gate's `backward`, the
/// softmax pass that writes `P = softmax(x W_r)` into the plan, and the backward row kernels.
///
/// Backward: per-token row kernels turn dL/dw (combine weights) and dL/dP into dL/dz through the
/// softmax, then `RouterProduct::backward` accumulates `dW += x^T dz` and adds `dx += dz W^T`
/// (on the packed kernels where the forward's product is, else `linear_backward`). Every split
/// is fixed (token blocks for `dx`, model-dim column blocks for `dW`, each block reducing over
/// all tokens in one product), so the bits do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet::detail {

/// Tokens per routing task in the gates' per-token passes. Fixed (not derived from the thread
/// count) so that the task split, and therefore every result, is the same for any thread count.
inline constexpr Index kGateTokenBlock = 64;

/// Rows of `W` (columns of `x`) per weight-gradient task: each task computes
/// `dW[c0:c1, :] += x[:, c0:c1]^T dz` over all tokens in one product, so the reduction over
/// tokens never depends on the thread count.
inline constexpr Index kGradColumnBlock = 16;

/// A normal `(rows, cols)` matrix with standard deviation `1 / sqrt(rows)`, drawn row-major from
/// `Rng(seed)`: the router initialisation every softmax gate uses (fan-in scaling, so the logits
/// of a unit-variance token start with unit variance).
template <class S>
RowMatrix<S> normal_fan_in(Index rows, Index cols, std::uint64_t seed) {
  RowMatrix<S> w(rows, cols);  // (rows, cols)
  Rng rng(seed);
  const double scale = rows > 0 ? 1.0 / std::sqrt(static_cast<double>(rows)) : 0.0;
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) w(i, j) = static_cast<S>(rng.normal() * scale);
  }
  return w;
}

/// Throws `Error` naming `op` unless `x` has `model_dim` columns and only finite entries.
template <class S>
void check_gate_input(const char* op, const ConstRows<S>& x, Index model_dim) {
  require(x.cols() == model_dim, op, "x must have model_dim = ", model_dim, " columns, got ",
          x.cols(), " (x is ", x.rows(), " x ", x.cols(), ")");
  if (all_finite(x)) return;
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index c = 0; c < x.cols(); ++c) {
      require(std::isfinite(x(t, c)), op, "x must be finite, got ", x(t, c), " at token ", t,
              ", column ", c);
    }
  }
}

/// Throws `Error` naming `op` unless `model_dim >= 1` and `1 <= num_experts <= INT32_MAX` (expert
/// ids are `int32`): the first checks of every softmax gate's `Options`.
inline void check_router_shape(const char* op, Index model_dim, Index num_experts) {
  require(model_dim >= 1, op, "model_dim must be >= 1, got ", model_dim);
  require(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  require(num_experts <= std::numeric_limits<std::int32_t>::max(), op,
          "num_experts must fit in int32, got ", num_experts);
}

/// Numerically stable logistic sigmoid `1 / (1 + exp(-v))` (the derivative of softplus).
template <class S>
S sigmoid(S v) {
  if (v >= S(0)) return S(1) / (S(1) + std::exp(-v));
  const S ev = std::exp(v);
  return ev / (S(1) + ev);
}

/// Softmax backward of one row: `dz[0..n) += p * (g - <p, g>)`, where `p = softmax(z)` and
/// `g = dL/dp`.
template <class S>
void softmax_backward_row(const S* p, const S* g, Index n, S* dz) {
  S dot = S(0);
  for (Index e = 0; e < n; ++e) dot += p[e] * g[e];
  for (Index e = 0; e < n; ++e) dz[e] += p[e] * (g[e] - dot);
}

/// Adds into `dz[0..n)` dL/ds for one token whose combine weights come from `q = softmax(s)`:
/// slot `j` goes to expert `experts[j]` with weight `q_e` (`renormalize = false`) or
/// `q_e / sum_{slots} q` (`renormalize = true`), and `dw[j]` is dL/dw of that slot.
/// - raw: `dL/dq_e = dw_j` on the selected experts, then the softmax backward:
///   `dz_e += q_e (dL/dq_e - sum_j q_{e_j} dw_j)` for every `e`;
/// - renormalised: the weights are a softmax over the selected scores, so
///   `dz_{e_j} += w_j (dw_j - sum_i w_i dw_i)` on the selected experts only, 0 elsewhere; a
///   sum of exactly 0 (weights 0, constant) contributes nothing.
template <class S>
void combine_weights_backward_row(const S* q, Index n, std::span<const std::int32_t> experts,
                                  std::span<const S> dw, bool renormalize, S* dz) {
  if (experts.empty()) return;
  if (!renormalize) {
    S dot = S(0);
    for (std::size_t j = 0; j < experts.size(); ++j) dot += q[experts[j]] * dw[j];
    for (Index e = 0; e < n; ++e) dz[e] -= q[e] * dot;
    for (std::size_t j = 0; j < experts.size(); ++j) dz[experts[j]] += q[experts[j]] * dw[j];
    return;
  }
  S sum = S(0);
  for (const std::int32_t e : experts) sum += q[e];
  if (!(sum > S(0))) return;
  S dot = S(0);
  for (std::size_t j = 0; j < experts.size(); ++j) dot += q[experts[j]] / sum * dw[j];
  for (std::size_t j = 0; j < experts.size(); ++j) {
    dz[experts[j]] += q[experts[j]] / sum * (dw[j] - dot);
  }
}

/// Writes into `dz[0..n)` (overwriting it) dL/ds of token `t` of `routing` through its combine
/// weights, which came from `q = softmax(s)` (the token's row of `n` scores):
/// `combine_weights_backward_row` of the plan's `d_weights` and then, when not empty, of a
/// loss's `loss_d_weights` (linear in dw: the second call adds the loss's part). Each holds one
/// value per assignment of `routing`.
template <class S>
void plan_weights_backward_row(const Routing<S>& routing, Index t, const S* q, Index n,
                               std::span<const S> d_weights, std::span<const S> loss_d_weights,
                               bool renormalize, S* dz) {
  std::fill(dz, dz + n, S(0));
  const auto a0 = static_cast<std::size_t>(routing.offsets()[static_cast<std::size_t>(t)]);
  const auto k = static_cast<std::size_t>(routing.k(t));
  combine_weights_backward_row(q, n, routing.experts(t), d_weights.subspan(a0, k), renormalize, dz);
  if (!loss_d_weights.empty()) {
    combine_weights_backward_row(q, n, routing.experts(t), loss_d_weights.subspan(a0, k),
                                 renormalize, dz);
  }
}

/// Adds into token `t`'s dL/dz `dz[0..n)` the losses on its clean scores: the softmax backward
/// of `loss_grad.d_probs` through `p` (the token's row of `P`), then `loss_grad.d_logits` as
/// is; each is skipped when empty, else holds `(num_tokens, n)` values.
template <class S>
void score_losses_backward_row(const SoftmaxLossGrad<S>& loss_grad, Index t, const S* p, Index n,
                               S* dz) {
  if (!loss_grad.d_probs.empty()) {
    softmax_backward_row(p, loss_grad.d_probs.data() + t * n, n, dz);
  }
  if (!loss_grad.d_logits.empty()) {
    const S* g = loss_grad.d_logits.data() + t * n;
    for (Index e = 0; e < n; ++e) dz[e] += g[e];
  }
}

/// Backward of the linear map `z = x W`: accumulates `dw += x^T dz` and adds `dx += dz W^T`.
/// Shapes: x (num_tokens, model_dim), w and dw (model_dim, num_experts), dz (num_tokens,
/// num_experts), dx (num_tokens, model_dim). Deterministic for any thread count: `dw` in fixed
/// blocks of `kGradColumnBlock` rows, each reducing over all tokens in one product; `dx` in
/// fixed token blocks.
template <class S>
void linear_backward(const ConstRows<S>& x, const RowMatrix<S>& w, const ConstRows<S>& dz,
                     RowMatrix<S>& dw, Rows<S> dx) {
  if (x.rows() == 0) return;
  parallel_blocks(x.cols(), kGradColumnBlock, [&](Index begin, Index end) {
    dw.middleRows(begin, end - begin).noalias() +=
        x.middleCols(begin, end - begin).transpose() * dz;
  });
  parallel_blocks(x.rows(), kRouterRowBlock, [&](Index begin, Index end) {
    dx.middleRows(begin, end - begin).noalias() +=
        dz.middleRows(begin, end - begin) * w.transpose();
  });
}

/// The argument checks of a softmax gate's `backward` (`op` names it in the `Error`): `x`
/// `(num_tokens, model_dim)` finite; `routing` from a `route` call on this `x` by a gate with
/// `num_experts` experts (same token and expert counts, probabilities `(num_tokens,
/// num_experts)`, expert ids in range); `d_weights` and `loss_grad.d_weights` (if any) one
/// value per assignment; `d_probs`, `d_logits` and `d_noise_logits` empty or `num_tokens *
/// num_experts`, and `d_noise_logits` empty unless `accepts_noise` (a noisy gate); `dx`
/// `(num_tokens, model_dim)`.
template <class S>
void check_softmax_backward(const char* op, const ConstRows<S>& x, Index model_dim,
                            Index num_experts, const Routing<S>& routing,
                            std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad,
                            const Rows<S>& dx, bool accepts_noise = false) {
  check_gate_input(op, x, model_dim);
  const Index num_tokens = x.rows();
  require(routing.num_tokens() == num_tokens && routing.num_experts() == num_experts, op,
          "routing must come from this gate's route on this x: it has ", routing.num_tokens(),
          " tokens and ", routing.num_experts(), " experts, x has ", num_tokens,
          " rows and the gate ", num_experts, " experts");
  require(routing.probs().rows() == num_tokens && routing.probs().cols() == num_experts, op,
          "routing.probs() must be (", num_tokens, ", ", num_experts, "), got (",
          routing.probs().rows(), ", ", routing.probs().cols(), ")");
  require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), op,
          "d_weights must have one entry per assignment (", routing.num_assignments(), "), got ",
          d_weights.size());
  const Index size = num_tokens * num_experts;
  require(loss_grad.d_probs.empty() || static_cast<Index>(loss_grad.d_probs.size()) == size, op,
          "loss_grad.d_probs must be empty or num_tokens * num_experts = ", num_tokens, " * ",
          num_experts, " = ", size, " values, got ", loss_grad.d_probs.size());
  require(loss_grad.d_logits.empty() || static_cast<Index>(loss_grad.d_logits.size()) == size, op,
          "loss_grad.d_logits must be empty or num_tokens * num_experts = ", num_tokens, " * ",
          num_experts, " = ", size, " values, got ", loss_grad.d_logits.size());
  require(loss_grad.d_weights.empty() ||
              static_cast<Index>(loss_grad.d_weights.size()) == routing.num_assignments(),
          op, "loss_grad.d_weights must be empty or have one entry per assignment (",
          routing.num_assignments(), "), got ", loss_grad.d_weights.size());
  require(loss_grad.d_noise_logits.empty() || accepts_noise, op,
          "loss_grad.d_noise_logits needs a noisy gate (noisy top-k), got ",
          loss_grad.d_noise_logits.size(), " values");
  require(loss_grad.d_noise_logits.empty() ||
              static_cast<Index>(loss_grad.d_noise_logits.size()) == size,
          op, "loss_grad.d_noise_logits must be empty or num_tokens * num_experts = ", num_tokens,
          " * ", num_experts, " = ", size, " values, got ", loss_grad.d_noise_logits.size());
  require(dx.rows() == num_tokens && dx.cols() == model_dim, op, "dx must be (", num_tokens, ", ",
          model_dim, ") like x, got (", dx.rows(), ", ", dx.cols(), ")");
  const auto experts = routing.experts();
  for (std::size_t a = 0; a < experts.size(); ++a) {
    require(experts[a] >= 0 && experts[a] < num_experts, op, "routing expert id ", experts[a],
            " at assignment ", a, " is outside [0, ", num_experts, ")");
  }
}

/// The fewest experts (columns of `W`) for which a float router keeps `W` packed and runs
/// `gemm_packed`: a kernel panel is 16 (AVX2) or 32 (AVX-512) columns wide, and with fewer than
/// 16 columns the padded panel and the packing of the rows of `x` cost more than Eigen's product
/// saves. `BM_router_product` (bench/bench_gates.cpp, d = 1024, one thread, medians of 5;
/// packed time over Eigen's SSE2 time at T = 1 / 32 / 512): on a Zen 3 EPYC (`avx2`,
/// 2026-12-07) 4 experts 1.03 / 1.65 / 1.32, 8 experts 0.84 / 1.37 / 2.71, 16 experts 1.10 /
/// 0.79 / 1.03, 64 experts 1.27 / 0.52 / 0.58; on an Intel Xeon with AVX-512 (a throwaway
/// program of the same loop, 2026-12-06) 4 and 8 experts 1.2-1.9, 16 experts 0.7-0.8, 64
/// experts 0.2-0.4.
inline constexpr Index kPackedRouterMinExperts = 16;

/// Panels of model-dim columns per task of the router's packed weight-gradient product
/// (`RouterProduct::backward`): each task packs the rows of `dz^T` once for its panels, so
/// fewer, wider tasks pack less (one panel per task: 1.1-1.8x slower than 8 at d = 1024, E =
/// 16 and 64, T = 32 and 512, one thread; AMD EPYC Zen 5 VM, `avx512bf16`, 2026-12-07).
inline constexpr Index kRouterGradPanels = 8;

/// The grow-only workspace of the calling thread for the router's packed products (the rows of
/// `x` packed for `gemm_packed`; one per thread, kept for the thread's life, so a warmed-up
/// thread does not allocate).
inline Buffer<float>& router_thread_scratch() {
  thread_local Buffer<float> scratch;
  return scratch;
}

/// The product `z = x W` of a router matrix `W` `(model_dim, num_experts)` (`RouterWeights`'
/// `W`, the cosine router's embeddings), with a packed copy of `W` for the runtime-selected
/// kernels when `W` is float with at least `kPackedRouterMinExperts` columns and the level is
/// not portable. The owner of `W` calls `repack(W)` whenever it writes `W` and `mark_stale()`
/// when it hands `W` out for writing; while the copy is not current, `forward` is Eigen's
/// product (`router_product`) on `W` itself: the same values, rounded as Eigen rounds.
template <class S>
class RouterProduct {
 public:
  /// Packs `w` (or drops the copy when `w` does not qualify); the copy is current afterwards.
  void repack(const RowMatrix<S>& w) {
    transposed_current_ = false;
    if constexpr (std::is_same_v<S, float>) {
      const KernelIsa isa = kernel_isa();
      if (isa != KernelIsa::kPortable && w.rows() > 0 && w.cols() >= kPackedRouterMinExperts) {
        packed_.pack(ConstRows<float>(w), isa);
        current_ = true;
        return;
      }
    }
    current_ = false;
  }
  /// `W` was handed out for writing: `forward` and `backward` take Eigen's products until
  /// `repack`.
  void mark_stale() {
    current_ = false;
    transposed_current_ = false;
  }
  /// Whether `forward` runs on the packed copy.
  bool current() const { return current_; }
  /// The kernel level of the packed copy (meaningful while `current()`).
  KernelIsa isa() const {
    if constexpr (std::is_same_v<S, float>) return packed_.isa();
    return KernelIsa::kPortable;
  }

  /// Writes `z = x w` `(num_tokens, num_experts)` into `z`; `w` must be the matrix last
  /// repacked while the copy is current. On the packed copy: `gemm_packed` in parallel over
  /// fixed blocks of `kRouterRowBlock` token rows (a row's bits depend on neither the other
  /// rows nor the thread count); otherwise `router_product` (Eigen).
  template <class Out>
  void forward(const ConstRows<S>& x, const RowMatrix<S>& w, Out&& z) const {
    if constexpr (std::is_same_v<S, float>) {
      if (current_) {
        parallel_blocks(x.rows(), kRouterRowBlock, [&](Index begin, Index end) {
          gemm_packed(ConstRows<float>(x.middleRows(begin, end - begin)), packed_,
                      Rows<float>(z.middleRows(begin, end - begin)), /*accumulate=*/false,
                      router_thread_scratch());
        });
        return;
      }
    }
    router_product(x, w, z);
  }

  /// Backward of `forward`: accumulates `dw += x^T dz` and adds `dx += dz w^T`, deterministic
  /// for any thread count. While the packed copy is current, both products run on the packed
  /// kernels of its level, split into fixed blocks:
  /// - `dx`: `gemm_packed` of `dz` on `w^T` (packed once per version of `w`) in blocks of
  ///   `kRouterRowBlock` token rows, each element one chain over the experts in order.
  /// - `dw`, from `num_experts` tokens up: `(dz^T x)^T`, the product with `x` packed as `B` (one
  ///   pass over `x`), in blocks of `kRouterGradPanels` panels of model-dim columns, each
  ///   element one chain over the tokens in order, added to `dw` through a transpose. Below
  ///   that (a few tokens, many experts): `x^T dz` with `dz` packed (`gemm_packed_at`), in
  ///   blocks of `kGradColumnBlock` rows of `dw`, each chain continuing from `dw`. Measured
  ///   (`BM_router_backward`, d = 1024, one thread) against Eigen's SSE2 product: see
  ///   bench/bench_gates.cpp.
  /// The packed operands' storage is kept, so a call on no more tokens than an earlier one
  /// allocates nothing. Otherwise (stale copy, double, few experts, portable level)
  /// `linear_backward` (Eigen).
  void backward(const ConstRows<S>& x, const RowMatrix<S>& w, const ConstRows<S>& dz,
                RowMatrix<S>& dw, Rows<S> dx) {
    if constexpr (std::is_same_v<S, float>) {
      if (current_) {
        if (x.rows() == 0) return;
        const KernelIsa isa = packed_.isa();
        const Index num_tokens = x.rows();
        const Index model_dim = x.cols();
        const Index num_experts = dz.cols();
        if (num_tokens >= num_experts) {
          x_packed_.pack(x, isa);  // (num_tokens, model_dim)
          auto dw_t = dw_t_.matrix(num_experts, model_dim);
          const Index width = x_packed_.panel_width();
          parallel_blocks(x_packed_.num_panels(), kRouterGradPanels, [&](Index p0, Index p1) {
            gemm_packed_at(dz, x_packed_, Rows<float>(dw_t), /*accumulate=*/false,
                           router_thread_scratch(), PanelRange{p0, p1});
            const Index c0 = p0 * width;
            const Index c1 = std::min(model_dim, p1 * width);
            dw.middleRows(c0, c1 - c0) += dw_t.middleCols(c0, c1 - c0).transpose();
          });
        } else {
          dz_packed_.pack(dz, isa);  // (num_tokens, num_experts)
          parallel_blocks(model_dim, kGradColumnBlock, [&](Index begin, Index end) {
            gemm_packed_at(ConstRows<float>(x.middleCols(begin, end - begin)), dz_packed_,
                           Rows<float>(dw.middleRows(begin, end - begin)), /*accumulate=*/true,
                           router_thread_scratch());
          });
        }
        if (!transposed_current_) {
          packed_t_.pack_transposed(ConstRows<float>(w), isa);  // W^T (num_experts, model_dim)
          transposed_current_ = true;
        }
        parallel_blocks(num_tokens, kRouterRowBlock, [&](Index begin, Index end) {
          gemm_packed(ConstRows<float>(dz.middleRows(begin, end - begin)), packed_t_,
                      Rows<float>(dx.middleRows(begin, end - begin)), /*accumulate=*/true,
                      router_thread_scratch());
        });
        return;
      }
    }
    linear_backward<S>(x, w, dz, dw, dx);
  }

 private:
  using Packed = std::conditional_t<std::is_same_v<S, float>, PackedMatrix<float>, std::monostate>;
  Packed packed_;       // W packed for `kernel_isa()` (float only; empty for double)
  Packed packed_t_;     // W^T for the backward's `dx` (packed on first use per version of W)
  Packed dz_packed_;    // the last backward's dz (few tokens)
  Packed x_packed_;     // the last backward's x (as many tokens as experts, or more)
  Buffer<float> dw_t_;  // (num_experts, model_dim): dz^T x before it is added to dw
  bool current_ = false;
  bool transposed_current_ = false;
};

/// One router matrix `W` `(model_dim, num_experts)` of a linear map `z = x W`, with its
/// gradient: the parameter handling shared by `SoftmaxRouter` (`W_r`) and noisy top-k's
/// `W_noise`. The gradient stays `(0, 0)` until first used; `grad()` then allocates it, zero,
/// with the shape of `W`.
///
/// Float weights with at least `kPackedRouterMinExperts` columns also keep a packed copy for
/// the selected kernel level (`PackedMatrix<float>`, packed by the constructor, `set`,
/// `set_zero` and `repack`), so `forward` and `backward` run the runtime selected kernels
/// (`gemm_packed`, `gemm_packed_at`) whatever flags the including unit was compiled with
/// (Eigen's product is only as wide as the unit's `-march`: SSE2 in a plain Release build).
/// `visit` hands the weights out for writing and marks the copy stale; until `repack`
/// (the gates' `parameters_changed`, which the optimisers and `load_parameters` call) `forward`
/// and `backward` compute with Eigen's products on the weights themselves: the same values,
/// rounded as Eigen rounds. Double weights, fewer columns, and the portable level always take
/// Eigen's products.
template <class S>
class RouterWeights {
 public:
  /// An empty `(0, 0)` matrix (a parameter the gate does not use, such as `W_noise` without
  /// noise).
  RouterWeights() = default;
  /// Takes `weights` `(model_dim, num_experts)` as `W`.
  explicit RouterWeights(RowMatrix<S> weights) : weights_(std::move(weights)) { repack(); }

  /// The weights `W` `(model_dim, num_experts)`.
  const RowMatrix<S>& weights() const { return weights_; }
  /// The weights as the gates hand them out: a read-only view of fixed shape.
  Eigen::Map<const RowMatrix<S>> view() const {
    return Eigen::Map<const RowMatrix<S>>(weights_.data(), weights_.rows(), weights_.cols());
  }

  /// Replaces `W` by `w` given in `layout` (`(model_dim, num_experts)` for
  /// `WeightLayout::kInOut`, `[num_experts, model_dim]` for `kOutIn`, PyTorch's
  /// `nn.Linear(model_dim, num_experts).weight`). Throws `Error` naming `op`, `setter` and
  /// `label` when the shape is wrong ("looks transposed" when `w` has the other layout's shape)
  /// or an entry is NaN or Inf; `W` is unchanged then. The gradient keeps its values.
  void set(const char* op, const char* setter, const char* label, const ConstRows<S>& w,
           WeightLayout layout, Index model_dim, Index num_experts) {
    const WeightName name{label, -1, "model_dim", "num_experts"};
    check_weight_shape(op, setter, name, model_dim, num_experts, w.rows(), w.cols(), layout);
    check_weights_finite(op, setter, name, w);
    if (layout == WeightLayout::kOutIn) {
      weights_ = w.transpose();
    } else {
      weights_ = w;
    }
    repack();
  }

  /// Makes `W` a zero `(rows, cols)` matrix (noisy top-k's initial `W_noise`).
  void set_zero(Index rows, Index cols) {
    weights_.setZero(rows, cols);
    repack();
  }

  /// Packs `W` again after it was written through `visit` (float weights of at least
  /// `kPackedRouterMinExperts` columns on a vector level; otherwise there is no copy and `forward`
  /// stays on Eigen's product).
  void repack() { product_.repack(weights_); }

  /// Whether `forward` runs on the packed copy (float weights, enough columns, a vector level,
  /// not stale).
  bool packed_current() const { return product_.current(); }

  /// The gradient of `W` `(model_dim, num_experts)`; `(0, 0)` until the first `zero_grad()`
  /// or backward.
  const RowMatrix<S>& grad() const { return grad_; }
  /// Allocates the gradient (zero) on first use and returns it.
  RowMatrix<S>& grad() {
    if (grad_.rows() != weights_.rows() || grad_.cols() != weights_.cols()) {
      grad_.setZero(weights_.rows(), weights_.cols());
    }
    return grad_;
  }
  /// Sets the gradient to zero (allocating it on first use).
  void zero_grad() { grad_.setZero(weights_.rows(), weights_.cols()); }

  /// Writes `z = x W` `(num_tokens, num_experts)` into `z`, every caller with the same bits:
  /// on the packed copy when it is current (`gemm_packed`, in parallel over fixed blocks of
  /// token rows; a row's bits depend on neither the other rows nor the thread count), otherwise
  /// with `router_product` (Eigen).
  template <class Out>
  void forward(const ConstRows<S>& x, Out&& z) const {
    product_.forward(x, weights_, z);
  }

  /// Backward of `forward`: accumulates `dW += x^T dz` and adds `dx += dz W^T`, allocating the
  /// gradient on first use: on the packed kernels while the packed copy is current, else
  /// `linear_backward` (`RouterProduct::backward`).
  void backward(const ConstRows<S>& x, const ConstRows<S>& dz, Rows<S> dx) {
    product_.backward(x, weights_, dz, grad(), dx);
  }

  /// Calls `f(name, W, dW)` (allocating the gradient on first use); `W` is handed out for
  /// writing, so the packed copy is stale until `repack`.
  template <class F>
  void visit(std::string_view name, F&& f) {
    product_.mark_stale();
    RowMatrix<S>& g = grad();
    f(name, ParamMap<S>(weights_.data(), weights_.rows(), weights_.cols()),
      ParamMap<S>(g.data(), g.rows(), g.cols()));
  }

 private:
  RowMatrix<S> weights_;  // (model_dim, num_experts)
  RowMatrix<S> grad_;     // (model_dim, num_experts), or (0, 0) before the first use
  RouterProduct<S> product_;  // z = x W, on a packed copy of W when it qualifies
};

/// Writes dL/dz `(num_tokens, num_experts)` into `dz` (overwriting it) for a plan whose weights
/// are the clean `P = routing.probs()` of its slots, renormalised or not: per token, the
/// combine-weight part (`plan_weights_backward_row` of `d_weights` and
/// `loss_grad.d_weights`), plus the softmax backward of `loss_grad.d_probs`, plus
/// `loss_grad.d_logits` (`score_losses_backward_row`). Parallel over fixed token blocks.
template <class S, class Dz>
void plan_logits_backward(const Routing<S>& routing, std::span<const S> d_weights, bool renormalize,
                          const SoftmaxLossGrad<S>& loss_grad, Dz& dz) {
  const Index num_tokens = routing.num_tokens();
  const Index num_experts = routing.num_experts();
  const auto probs = routing.probs();  // (num_tokens, num_experts)
  parallel_blocks(num_tokens, kGateTokenBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) {
      S* dz_row = dz.data() + t * num_experts;
      const S* p = probs.data() + t * num_experts;
      plan_weights_backward_row(routing, t, p, num_experts, d_weights, loss_grad.d_weights,
                                renormalize, dz_row);
      score_losses_backward_row(loss_grad, t, p, num_experts, dz_row);
    }
  });
}

/// Resets `out` to `(x.rows(), num_experts)` and writes `P = softmax(x W)` into
/// `out.probs_mut()`, in parallel over fixed token blocks; sets `probs_are_distribution` and
/// returns the probabilities. `x` must have passed `check_gate_input`. `pre_softmax(t, logits)`
/// runs on every token's logits row `(num_experts)` before the softmax and returns false when
/// it met a non-finite value. Throws `Error` naming `op` when a logit (or a value the hook
/// checked) is NaN or Inf, naming the first bad token.
template <class S, class PreSoftmax>
Eigen::Map<RowMatrix<S>> softmax_probabilities(const char* op, const RouterWeights<S>& weights,
                                               const ConstRows<S>& x, Routing<S>& out,
                                               PreSoftmax& pre_softmax) {
  const Index num_tokens = x.rows();
  const Index num_experts = weights.weights().cols();
  out.reset(num_tokens, num_experts);
  out.probs_are_distribution = true;
  auto probs = out.probs_mut();  // (num_tokens, num_experts), logits first
  if (num_tokens == 0) return probs;
  weights.forward(x, probs);
  std::atomic<bool> bad{false};
  parallel_blocks(num_tokens, kGateTokenBlock, [&](Index begin, Index end) {
    for (Index t = begin; t < end; ++t) {
      S* row = probs.data() + t * num_experts;
      bool ok = true;
      for (Index e = 0; e < num_experts; ++e) ok = ok && std::isfinite(row[e]);
      ok = pre_softmax(t, static_cast<const S*>(row)) && ok;
      if (!ok) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      softmax_row(row, num_experts);
    }
  });
  if (bad.load()) {
    // Name the first offending token; its row still holds the raw logits unless only the
    // hook's values were bad.
    for (Index t = 0; t < num_tokens; ++t) {
      if (!all_finite(probs.row(t))) {
        fail(op, "router logits must be finite, got NaN or Inf for token ", t,
             " (x too large, or non-finite router weights)");
      }
    }
    fail(op,
         "router logits must be finite, got NaN or Inf (x too large, or non-finite "
         "router weights)");
  }
  return probs;
}

}  // namespace moet::detail
