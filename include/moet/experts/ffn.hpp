#pragma once
/// \file experts/ffn.hpp
/// `FfnExperts`: a bank of classic two-layer feed-forward experts with biases (the Transformer
/// FFN of fairseq, GShard, Switch and THOR).

#include <cstdint>
#include <utility>

#include "moet/detail/buffer.hpp"
#include "moet/detail/expert_bank.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/rng.hpp"
#include "moet/errors.hpp"
#include "moet/experts/activations.hpp"
#include "moet/experts/weight_format.hpp"
#include "moet/tensor.hpp"
#include "moet/train/grad.hpp"

namespace moet {

/// A bank of `num_experts` two-layer feed-forward experts:
/// ```
/// E_e(x) = Act(x W1_e + b1_e) W2_e + b2_e
/// ```
/// with `W1_e` `(model_dim, hidden_dim)`, `b1_e` `(hidden_dim)`, `W2_e` `(hidden_dim, model_dim)`
/// and `b2_e` `(model_dim)`. This is fairseq's `TransformerEncoderLayer` FFN that THOR's
/// experts use (`fc1`, activation, `fc2`, both with bias). `Options::bias = false` drops the
/// biases (Switch Transformer's experts).
///
/// Weights are stacked, one contiguous row-major matrix per kind: `W1` `(num_experts *
/// model_dim, hidden_dim)`, `W2` `(num_experts * hidden_dim, model_dim)`, `b1`
/// `(num_experts, hidden_dim)`, `b2` `(num_experts, model_dim)`; `in_weights(e)`, `in_bias(e)`,
/// `out_weights(e)` and `out_bias(e)` are expert `e`'s views.
///
/// Initialisation (deterministic in `Options::init_seed`): weights normal with standard
/// deviation `1 / sqrt(fan_in)` (`model_dim` for `W1`, `hidden_dim` for `W2`), biases 0 (as
/// fairseq initialises `nn.Linear` biases in its Transformer).
///
/// `forward` is `const` and keeps its intermediates in the caller's `Scratch`; a warmed-up
/// scratch does not allocate again.
///
/// Packed kernels (float only, `Options::pack_weights`, on by default), exactly as in
/// `GluExperts`: packed copies of `W1` and `W2` built at construction, `forward` runs
/// `gemm_packed` for both products (bias and activation in between); every non-const weight
/// accessor marks the copy stale (then `forward` uses Eigen's products) until
/// `parameters_changed()` repacks. Biases are read in place and need no repacking.
///
/// \tparam S scalar type (float or double).
/// \tparam Act hidden activation policy (see activations.hpp); `Gelu` by default (THOR).
///
/// ```cpp
/// moet::FfnExperts<float> experts({.model_dim = 512, .hidden_dim = 2048, .num_experts = 4});
/// ```
template <class S, class Act = Gelu>
class FfnExperts {
 public:
  using Scalar = S;
  using Activation = Act;
  /// A bias row viewed in place.
  using BiasMap = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  /// A bias row viewed in place, read-only.
  using ConstBiasMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;

  /// Construction options.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Width of the hidden layer, `f` (>= 1).
    Index hidden_dim = 0;
    /// Experts in the bank (>= 1).
    Index num_experts = 0;
    /// Whether the two layers have biases `b1`, `b2`.
    bool bias = true;
    /// Seed of the weight initialisation.
    std::uint64_t init_seed = 0;
    /// Keep packed copies of the weights for the packed kernels (float banks only).
    bool pack_weights = true;
    /// Element type of the packed copies: `kBf16` needs a float bank with `pack_weights`
    /// (then as in `GluExperts`: bf16 forward, float training; see weight_format.hpp).
    WeightFormat weight_format = WeightFormat::kF32;
  };

  /// Per-thread workspace of `forward`: the `(n, hidden_dim)` hidden activations and the
  /// packed kernels' workspace.
  struct Scratch {
    detail::Buffer<S> hidden;
    detail::Buffer<float> kernel;
  };

  /// Builds the bank and initialises its weights. Throws `moet::Error` unless `model_dim`,
  /// `hidden_dim` and `num_experts` are >= 1.
  explicit FfnExperts(const Options& options)
      : options_(options), packed_(options.pack_weights, options.weight_format) {
    detail::require_bank_options<S>(kOp, options_);
    const Index d = options_.model_dim;
    const Index f = options_.hidden_dim;
    const Index n = options_.num_experts;
    w1_.resize(n * d, f);  // (num_experts * model_dim, hidden_dim)
    w2_.resize(n * f, d);  // (num_experts * hidden_dim, model_dim)
    detail::fill_normal_fan_in(w1_, d, detail::hash_key(options_.init_seed, 0x666331U));
    detail::fill_normal_fan_in(w2_, f, detail::hash_key(options_.init_seed, 0x666332U));
    b1_ = RowMatrix<S>::Zero(options_.bias ? n : 0, f);  // (num_experts, hidden_dim)
    b2_ = RowMatrix<S>::Zero(options_.bias ? n : 0, d);  // (num_experts, model_dim)
    parameters_changed();
  }

  /// Rebuilds the packed copies of `W1` and `W2` from the stacks and makes `forward` use the
  /// packed kernels again (see the class comment). Call after writing weights in place; the
  /// optimisers do. A no-op for double banks and with `pack_weights = false`.
  void parameters_changed() {
    packed_.rebuild(num_experts(), [&](auto& packed, Index e) {
      packed.w1.pack(detail::expert_block(w1_, e, model_dim()));
      packed.w2.pack(detail::expert_block(w2_, e, hidden_dim()));
    });
  }

  /// True when `forward` runs the packed kernels: a float bank with `pack_weights` whose packed
  /// copy is current (no non-const weight accessor called since the last `parameters_changed()`).
  bool uses_packed_kernels() const { return packed_.current(); }

  /// Experts in the bank.
  Index num_experts() const { return options_.num_experts; }
  /// Width of a token, `d`.
  Index model_dim() const { return options_.model_dim; }
  /// Width of the hidden layer, `f`.
  Index hidden_dim() const { return options_.hidden_dim; }
  /// Whether the layers have biases.
  bool has_bias() const { return options_.bias; }
  /// The options the bank was built with.
  const Options& options() const { return options_; }
  /// Parameters of one expert: `2 * model_dim * hidden_dim`, plus `hidden_dim + model_dim`
  /// with biases.
  Index params_per_expert() const {
    const Index d = options_.model_dim;
    const Index f = options_.hidden_dim;
    return 2 * d * f + (options_.bias ? d + f : 0);
  }
  /// FLOPs of one expert on one token: the two products, `2 * 2 * model_dim * hidden_dim`
  /// (the `O(hidden_dim)` bias adds and activation are not counted).
  double flops_per_token() const {
    return 4.0 * static_cast<double>(options_.model_dim) * static_cast<double>(options_.hidden_dim);
  }

  /// Expert `e`'s first-layer weights `W1_e` `(model_dim, hidden_dim)`, a view into the stack.
  Eigen::Map<const RowMatrix<S>> in_weights(Index e) const {
    return detail::expert_block(w1_, e, model_dim());
  }
  /// (Non-const: marks the packed copy stale, see the class comment.)
  Eigen::Map<RowMatrix<S>> in_weights(Index e) {
    return detail::expert_block(packed_.mark_stale(w1_), e, model_dim());
  }
  /// Expert `e`'s second-layer weights `W2_e` `(hidden_dim, model_dim)`.
  Eigen::Map<const RowMatrix<S>> out_weights(Index e) const {
    return detail::expert_block(w2_, e, hidden_dim());
  }
  Eigen::Map<RowMatrix<S>> out_weights(Index e) {
    return detail::expert_block(packed_.mark_stale(w2_), e, hidden_dim());
  }
  /// Expert `e`'s first-layer bias `b1_e` `(1, hidden_dim)`. Only with `has_bias()`.
  ConstBiasMap in_bias(Index e) const { return bias_row<ConstBiasMap>(b1_, e); }
  BiasMap in_bias(Index e) { return bias_row<BiasMap>(b1_, e); }
  /// Expert `e`'s second-layer bias `b2_e` `(1, model_dim)`. Only with `has_bias()`.
  ConstBiasMap out_bias(Index e) const { return bias_row<ConstBiasMap>(b2_, e); }
  BiasMap out_bias(Index e) { return bias_row<BiasMap>(b2_, e); }

  /// The stacked first-layer weights `(num_experts * model_dim, hidden_dim)`. The non-const
  /// accessors let training update the parameters in place (keep the shapes); the weight ones
  /// mark the packed copy stale until `parameters_changed()`.
  const RowMatrix<S>& in_weights_stack() const { return w1_; }
  RowMatrix<S>& in_weights_stack() { return packed_.mark_stale(w1_); }
  /// The stacked second-layer weights `(num_experts * hidden_dim, model_dim)`.
  const RowMatrix<S>& out_weights_stack() const { return w2_; }
  RowMatrix<S>& out_weights_stack() { return packed_.mark_stale(w2_); }
  /// The stacked first-layer biases `(num_experts, hidden_dim)`; `(0, hidden_dim)` without bias.
  const RowMatrix<S>& in_bias_stack() const { return b1_; }
  RowMatrix<S>& in_bias_stack() { return b1_; }
  /// The stacked second-layer biases `(num_experts, model_dim)`; `(0, model_dim)` without bias.
  const RowMatrix<S>& out_bias_stack() const { return b2_; }
  RowMatrix<S>& out_bias_stack() { return b2_; }

  /// Grows `scratch` for blocks of up to `max_rows` rows, so that `forward` on such blocks
  /// does not allocate. Optional: `forward` grows the scratch itself when needed.
  void reserve(Scratch& scratch, Index max_rows) const {
    detail::reserve_aligned(scratch.hidden, max_rows, hidden_dim());
    packed_.reserve(scratch.kernel, max_rows, model_dim(), hidden_dim());
  }

  /// Writes expert `e` applied to every row of `in` `(n, model_dim)` into `out`
  /// `(n, model_dim)`. Preconditions (the dispatchers check them before calling; asserted in
  /// debug builds): `0 <= e < num_experts()`, the shapes above, `out` does not overlap `in`.
  void forward(Index e, const ConstRows<S>& in, Rows<S> out, Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "FfnExperts::forward shape mismatch");
    const Index n = in.rows();
    if (n == 0) return;
    auto h = detail::aligned_matrix(scratch.hidden, n, hidden_dim());  // (n, hidden_dim)
    const bool packed = packed_.run(e, [&](const auto& p) {
      detail::gemm_packed(in, p.w1, h, /*accumulate=*/false, scratch.kernel);
    });
    if (!packed) h.noalias() = in * in_weights(e);
    if (options_.bias) h.rowwise() += in_bias(e);
    apply_activation<Act>(h);
    const bool packed_out = packed && packed_.run(e, [&](const auto& p) {
      detail::gemm_packed(h, p.w2, out, /*accumulate=*/false, scratch.kernel);
    });
    if (!packed_out) out.noalias() = h * out_weights(e);
    if (options_.bias) out.rowwise() += out_bias(e);
  }

  // --- training (train/grad.hpp's `TrainableExperts`) --------------------------------------

  /// Scalars `forward_train` keeps per routed row: the pre-activation `x W1_e + b1_e`,
  /// `hidden_dim`.
  Index cache_width() const { return options_.hidden_dim; }

  /// `forward`, plus the row cache `cache` `(n, hidden_dim)` = `in W1_e + b1_e`. Same
  /// preconditions as `forward`, and `cache` has `in.rows()` rows and overlaps neither.
  void forward_train(Index e, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                     Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "FfnExperts::forward_train shape mismatch");
    MOET_ASSERT(cache.rows() == in.rows() && cache.cols() == cache_width(),
                "FfnExperts::forward_train cache shape mismatch");
    const Index n = in.rows();
    if (n == 0) return;
    cache.noalias() = in * in_weights(e);
    if (options_.bias) cache.rowwise() += in_bias(e);
    auto h = detail::aligned_matrix(scratch.hidden, n, hidden_dim());  // (n, hidden_dim)
    activate(cache, h);
    out.noalias() = h * out_weights(e);
    if (options_.bias) out.rowwise() += out_bias(e);
  }

  /// Backward of expert `e` on `n` rows: `in` `(n, model_dim)` and `cache` `(n, hidden_dim)`
  /// from `forward_train`, `dout` = dL/dout `(n, model_dim)`. With `a` the cached
  /// pre-activation, `h = Act(a)`, `da = (dout W2_e^T) ⊙ Act'(a)`: accumulates
  /// `dW2_e += h^T dout`, `db2_e += sum of dout's rows`, `dW1_e += in^T da`,
  /// `db1_e += sum of da's rows` and **writes** `din = da W1_e^T` `(n, model_dim)`. Reuses
  /// `scratch`'s `(n, hidden_dim)` buffer. Allocates the gradients on first use (call
  /// `zero_grad()` first when calls for different experts run concurrently). Deterministic.
  void backward(Index e, const ConstRows<S>& in, const ConstRows<S>& cache,
                const ConstRows<S>& dout, Rows<S> din, Scratch& scratch) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && cache.rows() == in.rows() &&
                    cache.cols() == cache_width() && dout.rows() == in.rows() &&
                    dout.cols() == model_dim() && din.rows() == in.rows() &&
                    din.cols() == model_dim(),
                "FfnExperts::backward shape mismatch");
    ensure_grad();
    const Index n = in.rows();
    const Index f = hidden_dim();
    if (n == 0) return;
    auto h = detail::aligned_matrix(scratch.hidden, n, f);  // (n, hidden_dim): h, then da
    activate(cache, h);
    // dW2_e (hidden_dim, model_dim)
    detail::expert_block(w2_grad_, e, f).noalias() += h.transpose() * dout;
    h.noalias() = dout * std::as_const(*this).out_weights(e).transpose();  // dh
    for (Index r = 0; r < n; ++r) {
      for (Index j = 0; j < f; ++j) h(r, j) *= Act::template derivative<S>(cache(r, j));  // da
    }
    detail::expert_block(w1_grad_, e, model_dim()).noalias() += in.transpose() * h;
    if (options_.bias) {
      // Column sums in row order (a fixed order, the same bits every run).
      for (Index r = 0; r < n; ++r) {
        b1_grad_.row(e) += h.row(r);
        b2_grad_.row(e) += dout.row(r);
      }
    }
    din.noalias() = h * std::as_const(*this).in_weights(e).transpose();
  }

  /// Sets every gradient to zero (allocating them on first use).
  void zero_grad() {
    ensure_grad();
    w1_grad_.setZero();
    w2_grad_.setZero();
    b1_grad_.setZero();
    b2_grad_.setZero();
  }

  /// Allocates the gradients (zero) if they are not yet; a no-op afterwards.
  void ensure_grad() {
    detail::ensure_grad_like(w1_grad_, w1_);
    detail::ensure_grad_like(w2_grad_, w2_);
    detail::ensure_grad_like(b1_grad_, b1_);
    detail::ensure_grad_like(b2_grad_, b2_);
  }

  /// Calls `f(name, value, grad)` for the stacked parameters, in this order: `in_weight`
  /// `(num_experts * model_dim, hidden_dim)`, `in_bias` `(num_experts, hidden_dim)`,
  /// `out_weight` `(num_experts * hidden_dim, model_dim)`, `out_bias` `(num_experts,
  /// model_dim)`; the biases only with `has_bias()`. Allocates the gradients on first use. Marks
  /// the packed copy stale, as `GluExperts::visit_parameters` does.
  template <class F>
  void visit_parameters(F&& f) {
    ensure_grad();
    packed_.mark_stale();  // the visitor may write the stacks: parameters_changed() repacks
    detail::visit_stack(f, "in_weight", w1_, w1_grad_);
    if (options_.bias) detail::visit_stack(f, "in_bias", b1_, b1_grad_);
    detail::visit_stack(f, "out_weight", w2_, w2_grad_);
    if (options_.bias) detail::visit_stack(f, "out_bias", b2_, b2_grad_);
  }

  /// The accumulated gradients, shaped like the stacks (empty before the first `zero_grad`,
  /// `backward` or `visit_parameters`).
  const RowMatrix<S>& in_weights_grad() const { return w1_grad_; }
  const RowMatrix<S>& out_weights_grad() const { return w2_grad_; }
  const RowMatrix<S>& in_bias_grad() const { return b1_grad_; }
  const RowMatrix<S>& out_bias_grad() const { return b2_grad_; }

 private:
  static constexpr const char* kOp = "FfnExperts";
  // Row e of a stacked bias matrix.
  template <class Map, class M>
  static Map bias_row(M& stack, Index e) {
    MOET_ASSERT(e >= 0 && e < stack.rows(), "no bias for this expert (bias = false?)");
    return Map(stack.data() + e * stack.cols(), stack.cols());
  }

  Options options_;
  RowMatrix<S> w1_;  // (num_experts * model_dim, hidden_dim)
  RowMatrix<S> w2_;  // (num_experts * hidden_dim, model_dim)
  RowMatrix<S> b1_;  // (num_experts, hidden_dim), or (0, hidden_dim) without bias
  RowMatrix<S> b2_;  // (num_experts, model_dim), or (0, model_dim) without bias
  // Training: the gradients (lazily allocated, the parameters' shapes).
  RowMatrix<S> w1_grad_;
  RowMatrix<S> w2_grad_;
  RowMatrix<S> b1_grad_;
  RowMatrix<S> b2_grad_;

  // h = Act(a) from the cached pre-activations `a` `(n, hidden_dim)`, one scalar at a time.
  template <class Cache, class H>
  static void activate(const Cache& cache, H& h) {
    for (Index r = 0; r < h.rows(); ++r) {
      for (Index j = 0; j < h.cols(); ++j) h(r, j) = Act::template apply<S>(cache(r, j));
    }
  }
  // One expert's packed copies for the float kernels: W1 (model_dim, hidden_dim), W2
  // (hidden_dim, model_dim).
  template <class W>
  struct PackedExpert {
    detail::PackedMatrix<W> w1;
    detail::PackedMatrix<W> w2;
  };
  // Stale after any non-const weight access until parameters_changed(). Members that hand out
  // the stacks for writing (parameter visitors) must mark it stale too.
  detail::PackedCopies<S, PackedExpert> packed_;
};

/// ReLU FFN experts (the original Transformer / Switch FFN).
template <class S>
using ReluFfnExperts = FfnExperts<S, Relu>;

/// GELU FFN experts (fairseq's `--activation-fn gelu`, THOR).
template <class S>
using GeluFfnExperts = FfnExperts<S, Gelu>;

}  // namespace moet
