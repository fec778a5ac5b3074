#pragma once
/// \file experts/glu.hpp
/// `GluExperts`: a bank of gated-linear-unit feed-forward experts (SwiGLU, GeGLU), the expert of
/// ALGORITHMS.md section 0.

#include <cstdint>
#include <type_traits>
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

/// A bank of `num_experts` gated-linear-unit experts (Shazeer, "GLU Variants Improve
/// Transformer", 2020):
/// ```
/// E_e(x) = (Act(x Wg_e) ⊙ (x Wu_e)) Wd_e
/// ```
/// with `Wg_e, Wu_e` `(model_dim, hidden_dim)` and `Wd_e` `(hidden_dim, model_dim)`, no biases.
/// `Act = Silu` gives SwiGLU (Mixtral, DeepSeek, Qwen-MoE), `Act = Gelu` GeGLU.
///
/// The weights are stacked, one contiguous row-major matrix per kind: gate and up weights
/// `(num_experts * model_dim, hidden_dim)`, down weights `(num_experts * hidden_dim, model_dim)`;
/// expert `e`'s matrices are the row blocks returned by `gate_weights(e)`, `up_weights(e)` and
/// `down_weights(e)`.
///
/// Initialisation (deterministic in `Options::init_seed`): every weight is normal with
/// standard deviation `1 / sqrt(fan_in)` (`model_dim` for gate and up, `hidden_dim` for down),
/// each kind drawn from its own `detail::Rng` stream.
///
/// `forward` is `const` and keeps its intermediates in the caller's `Scratch`, so one bank
/// serves any number of threads, each with its own scratch. A warmed-up scratch does not
/// allocate again for blocks up to the largest it has seen.
///
/// Packed kernels (float only, `Options::pack_weights`, on by default): the bank also keeps
/// every expert's weights packed for detail/gemm.hpp (gate and up interleaved for the fused
/// `Act(x Wg) ⊙ (x Wu)` kernel, down in column panels), built at construction; this doubles the
/// weight memory. `forward` then runs `glu_packed` and `gemm_packed` (AVX-512 or AVX2 when the
/// including translation unit is compiled for them, portable loops otherwise), which never
/// allocate and give each row bits independent of the other rows of the block.
///
/// Keeping the packed copy in step with the weights: every non-const weight accessor
/// (`gate_weights(e)`, `gate_stack()`, ...) marks the packed copy stale, and while it is stale
/// `forward` uses the plain Eigen products on the stacked weights (correct, slower, and Eigen may
/// allocate packing buffers for large blocks). `parameters_changed()` repacks and makes the
/// kernels current again; the optimisers of train/optim.hpp call it after each step. Writes
/// through a view obtained *before* the last `parameters_changed()` are not seen by the packed
/// kernels: take the view again (or call `parameters_changed()` after writing). Double banks and
/// `pack_weights = false` always use the Eigen products.
///
/// bf16 kernel weights (`Options::weight_format = WeightFormat::kBf16`, float banks with
/// `pack_weights`): the packed copies hold the weights rounded to bf16 (1.5x the float weight
/// memory in all instead of 2x) and `forward` runs the bf16 kernels (see weight_format.hpp);
/// the float stacks stay the trainable weights, `forward_train` and `backward` use them, and
/// `parameters_changed()` re-rounds. While the copy is stale `forward` is the float Eigen path.
///
/// The packed layout depends on the instruction set the including translation unit is compiled
/// for (detail/simd.hpp): compile every translation unit that shares a float bank with the same
/// `-march` (a bank packed by a portable TU and run by an AVX-512 TU would compute garbage).
///
/// \tparam S scalar type (float or double).
/// \tparam Act gate activation policy (see activations.hpp).
///
/// ```cpp
/// moet::SwiGluExperts<float> experts({.model_dim = 512, .hidden_dim = 1024, .num_experts = 8});
/// ```
template <class S, class Act = Silu>
class GluExperts {
 public:
  using Scalar = S;
  using Activation = Act;

  /// Construction options.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Width of the hidden layer, `f` (>= 1).
    Index hidden_dim = 0;
    /// Experts in the bank (>= 1).
    Index num_experts = 0;
    /// Seed of the weight initialisation.
    std::uint64_t init_seed = 0;
    /// Keep packed copies of the weights for the packed kernels (float banks only).
    bool pack_weights = true;
    /// Element type of the packed copies: `kBf16` needs a float bank with `pack_weights`.
    WeightFormat weight_format = WeightFormat::kF32;
  };

  /// Per-thread workspace of `forward`: the `(n, hidden_dim)` gate and up activations (the
  /// packed path uses `gate` for the hidden activations) and the packed kernels' workspace.
  struct Scratch {
    detail::Buffer<S> gate;
    detail::Buffer<S> up;
    detail::Buffer<float> kernel;
  };

  /// Builds the bank and initialises its weights. Throws `moet::Error` unless `model_dim`,
  /// `hidden_dim` and `num_experts` are >= 1, and for `WeightFormat::kBf16` on a double bank
  /// or without `pack_weights`.
  explicit GluExperts(const Options& options)
      : options_(options), packed_(options.pack_weights, options.weight_format) {
    detail::require_bank_options<S>(kOp, options_);
    const Index d = options_.model_dim;
    const Index f = options_.hidden_dim;
    const Index n = options_.num_experts;
    gate_.resize(n * d, f);  // (num_experts * model_dim, hidden_dim)
    up_.resize(n * d, f);    // (num_experts * model_dim, hidden_dim)
    down_.resize(n * f, d);  // (num_experts * hidden_dim, model_dim)
    detail::fill_normal_fan_in(gate_, d, detail::hash_key(options_.init_seed, 0x676174U));
    detail::fill_normal_fan_in(up_, d, detail::hash_key(options_.init_seed, 0x7570U));
    detail::fill_normal_fan_in(down_, f, detail::hash_key(options_.init_seed, 0x646f776eU));
    parameters_changed();
  }

  /// Rebuilds the packed copies of the weights from the stacks and makes `forward` use the
  /// packed kernels again (see the class comment). Call after writing weights in place; the
  /// optimisers do. A no-op for double banks and with `pack_weights = false`.
  void parameters_changed() {
    packed_.rebuild(num_experts(), [&](auto& packed, Index e) {
      packed.gate_up.pack(detail::expert_block(gate_, e, model_dim()),
                          detail::expert_block(up_, e, model_dim()));
      packed.down.pack(detail::expert_block(down_, e, hidden_dim()));
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
  /// The options the bank was built with.
  const Options& options() const { return options_; }
  /// Parameters of one expert: `3 * model_dim * hidden_dim`.
  Index params_per_expert() const { return 3 * options_.model_dim * options_.hidden_dim; }
  /// FLOPs of one expert on one token: the three products, `2 * 3 * model_dim * hidden_dim`
  /// (the `O(hidden_dim)` activation and elementwise product are not counted).
  double flops_per_token() const {
    return 6.0 * static_cast<double>(options_.model_dim) * static_cast<double>(options_.hidden_dim);
  }

  /// Expert `e`'s gate weights `Wg_e` `(model_dim, hidden_dim)`, a view into the stack.
  Eigen::Map<const RowMatrix<S>> gate_weights(Index e) const {
    return detail::expert_block(gate_, e, model_dim());
  }
  /// (Non-const: marks the packed copy stale, see the class comment.)
  Eigen::Map<RowMatrix<S>> gate_weights(Index e) {
    return detail::expert_block(packed_.mark_stale(gate_), e, model_dim());
  }
  /// Expert `e`'s up weights `Wu_e` `(model_dim, hidden_dim)`.
  Eigen::Map<const RowMatrix<S>> up_weights(Index e) const {
    return detail::expert_block(up_, e, model_dim());
  }
  Eigen::Map<RowMatrix<S>> up_weights(Index e) {
    return detail::expert_block(packed_.mark_stale(up_), e, model_dim());
  }
  /// Expert `e`'s down weights `Wd_e` `(hidden_dim, model_dim)`.
  Eigen::Map<const RowMatrix<S>> down_weights(Index e) const {
    return detail::expert_block(down_, e, hidden_dim());
  }
  Eigen::Map<RowMatrix<S>> down_weights(Index e) {
    return detail::expert_block(packed_.mark_stale(down_), e, hidden_dim());
  }

  /// The stacked gate weights `(num_experts * model_dim, hidden_dim)`. The non-const
  /// accessors let training update the weights in place (keep the shapes); they mark the
  /// packed copy stale until `parameters_changed()`.
  const RowMatrix<S>& gate_stack() const { return gate_; }
  RowMatrix<S>& gate_stack() { return packed_.mark_stale(gate_); }
  /// The stacked up weights `(num_experts * model_dim, hidden_dim)`.
  const RowMatrix<S>& up_stack() const { return up_; }
  RowMatrix<S>& up_stack() { return packed_.mark_stale(up_); }
  /// The stacked down weights `(num_experts * hidden_dim, model_dim)`.
  const RowMatrix<S>& down_stack() const { return down_; }
  RowMatrix<S>& down_stack() { return packed_.mark_stale(down_); }

  /// Grows `scratch` for blocks of up to `max_rows` rows, so that `forward` on such blocks
  /// does not allocate. Optional: `forward` grows the scratch itself when needed.
  void reserve(Scratch& scratch, Index max_rows) const {
    detail::reserve_aligned(scratch.gate, max_rows, hidden_dim());
    detail::reserve_aligned(scratch.up, max_rows, hidden_dim());
    packed_.reserve(scratch.kernel, max_rows, model_dim(), hidden_dim());
  }

  /// Writes expert `e` applied to every row of `in` `(n, model_dim)` into `out`
  /// `(n, model_dim)`. Preconditions (the dispatchers check them before calling; asserted in
  /// debug builds): `0 <= e < num_experts()`, the shapes above, `out` does not overlap `in`.
  void forward(Index e, const ConstRows<S>& in, Rows<S> out, Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "GluExperts::forward shape mismatch");
    const Index n = in.rows();
    if (n == 0) return;
    const bool packed = packed_.run(e, [&](const auto& p) {
      auto h = detail::aligned_matrix(scratch.gate, n, hidden_dim());  // (n, hidden_dim)
      detail::glu_packed<Act>(in, p.gate_up, h, scratch.kernel);
      detail::gemm_packed(h, p.down, out, /*accumulate=*/false, scratch.kernel);
    });
    if (packed) return;
    auto g = detail::aligned_matrix(scratch.gate, n, hidden_dim());  // (n, hidden_dim)
    auto u = detail::aligned_matrix(scratch.up, n, hidden_dim());    // (n, hidden_dim)
    g.noalias() = in * gate_weights(e);
    u.noalias() = in * up_weights(e);
    apply_activation<Act>(g);
    g.array() *= u.array();  // Act(x Wg) ⊙ (x Wu)
    out.noalias() = g * down_weights(e);
  }

  // --- training (train/grad.hpp's `TrainableExperts`) --------------------------------------

  /// Scalars `forward_train` keeps per routed row: the pre-activations `x Wg_e` and `x Wu_e`,
  /// `2 * hidden_dim` (the hidden product `Act(x Wg) ⊙ (x Wu)` is recomputed by `backward`
  /// rather than stored).
  Index cache_width() const { return 2 * options_.hidden_dim; }

  /// `forward`, plus the row cache `cache` `(n, cache_width())`: columns `[0, hidden_dim)`
  /// hold `in Wg_e`, columns `[hidden_dim, 2 hidden_dim)` hold `in Wu_e`. Uses Eigen's
  /// products (not the inference kernel). Same preconditions as `forward`, and `cache` has
  /// `in.rows()` rows and does not overlap `in` or `out`.
  void forward_train(Index e, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                     Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "GluExperts::forward_train shape mismatch");
    MOET_ASSERT(cache.rows() == in.rows() && cache.cols() == cache_width(),
                "GluExperts::forward_train cache shape mismatch");
    const Index n = in.rows();
    const Index f = hidden_dim();
    if (n == 0) return;
    cache.leftCols(f).noalias() = in * gate_weights(e);
    cache.rightCols(f).noalias() = in * up_weights(e);
    auto h = detail::aligned_matrix(scratch.gate, n, f);  // (n, hidden_dim)
    glu_hidden(cache, h);
    out.noalias() = h * down_weights(e);
  }

  /// Backward of expert `e` on `n` rows: `in` `(n, model_dim)` and `cache` `(n, cache_width())`
  /// as given to / written by `forward_train`, `dout` = dL/dout `(n, model_dim)`. Accumulates
  /// `dWd_e += h^T dout`, `dWg_e += in^T dg`, `dWu_e += in^T du` (with `h = Act(g) ⊙ u`,
  /// `dh = dout Wd_e^T`, `dg = dh ⊙ u ⊙ Act'(g)`, `du = dh ⊙ Act(g)`) and **writes**
  /// `din = dg Wg_e^T + du Wu_e^T` `(n, model_dim)`. Reuses `scratch`'s two `(n, hidden_dim)`
  /// buffers. Allocates the gradients on first use (call `zero_grad()` first when calls for
  /// different experts run concurrently). Deterministic: each product's result depends only
  /// on its operands' shapes and values.
  void backward(Index e, const ConstRows<S>& in, const ConstRows<S>& cache,
                const ConstRows<S>& dout, Rows<S> din, Scratch& scratch) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && cache.rows() == in.rows() &&
                    cache.cols() == cache_width() && dout.rows() == in.rows() &&
                    dout.cols() == model_dim() && din.rows() == in.rows() &&
                    din.cols() == model_dim(),
                "GluExperts::backward shape mismatch");
    ensure_grad();
    const Index n = in.rows();
    const Index f = hidden_dim();
    if (n == 0) return;
    auto a = detail::aligned_matrix(scratch.gate, n, f);  // (n, hidden_dim): h, then dg
    auto b = detail::aligned_matrix(scratch.up, n, f);    // (n, hidden_dim): dh, then du
    if constexpr (std::is_same_v<Act, Silu>) {
      // SiLU: one vectorised sigmoid pass, kept in `a`; h, Act(g) and Act'(g) follow from it.
      const auto g = cache.leftCols(f).array();
      const auto u = cache.rightCols(f).array();
      a.array() = (S(1) + (-g).exp()).inverse();  // s = sigmoid(g)
      b.array() = a.array() * (g * u);            // h = s g u, as forward_train
      // dWd_e (hidden_dim, model_dim)
      detail::expert_block(down_grad_, e, f).noalias() += b.transpose() * dout;
      b.noalias() = dout * std::as_const(*this).down_weights(e).transpose();  // dh
      for (Index r = 0; r < n; ++r) {
        for (Index j = 0; j < f; ++j) {
          const S sg = a(r, j);
          const S gv = cache(r, j);
          const S dh = b(r, j);
          a(r, j) = dh * cache(r, f + j) * (sg * (S(1) + gv * (S(1) - sg)));  // dg
          b(r, j) = dh * (gv * sg);                                           // du
        }
      }
    } else {
      glu_hidden(cache, a);
      // dWd_e (hidden_dim, model_dim)
      detail::expert_block(down_grad_, e, f).noalias() += a.transpose() * dout;
      b.noalias() = dout * std::as_const(*this).down_weights(e).transpose();  // dh
      for (Index r = 0; r < n; ++r) {
        for (Index j = 0; j < f; ++j) {
          const S g = cache(r, j);
          const S u = cache(r, f + j);
          const S dh = b(r, j);
          S act = S(0);
          S slope = S(0);
          activation_value_and_derivative<Act>(g, act, slope);
          a(r, j) = dh * u * slope;  // dg
          b(r, j) = dh * act;        // du
        }
      }
    }
    // dWg_e and dWu_e, (model_dim, hidden_dim) each
    detail::expert_block(gate_grad_, e, model_dim()).noalias() += in.transpose() * a;
    detail::expert_block(up_grad_, e, model_dim()).noalias() += in.transpose() * b;
    din.noalias() = a * std::as_const(*this).gate_weights(e).transpose();
    din.noalias() += b * std::as_const(*this).up_weights(e).transpose();
  }

  /// Sets every weight gradient to zero (allocating them on first use).
  void zero_grad() {
    ensure_grad();
    gate_grad_.setZero();
    up_grad_.setZero();
    down_grad_.setZero();
  }

  /// Allocates the gradients (zero) if they are not yet; a no-op afterwards.
  void ensure_grad() {
    detail::ensure_grad_like(gate_grad_, gate_);
    detail::ensure_grad_like(up_grad_, up_);
    detail::ensure_grad_like(down_grad_, down_);
  }

  /// Calls `f(name, value, grad)` for the stacked weights, in this order: `gate`
  /// `(num_experts * model_dim, hidden_dim)`, `up` (same shape), `down` `(num_experts *
  /// hidden_dim, model_dim)`. Allocates the gradients on first use. Marks the packed copy stale
  /// (the visitor may write the weights): `forward` runs the Eigen path until
  /// `parameters_changed()` repacks (the optimisers call it after every step).
  template <class F>
  void visit_parameters(F&& f) {
    ensure_grad();
    packed_.mark_stale();  // the visitor may write the stacks: parameters_changed() repacks
    detail::visit_stack(f, "gate", gate_, gate_grad_);
    detail::visit_stack(f, "up", up_, up_grad_);
    detail::visit_stack(f, "down", down_, down_grad_);
  }

  /// The accumulated gradients, shaped like the stacks (empty before the first `zero_grad`,
  /// `backward` or `visit_parameters`).
  const RowMatrix<S>& gate_grad() const { return gate_grad_; }
  const RowMatrix<S>& up_grad() const { return up_grad_; }
  const RowMatrix<S>& down_grad() const { return down_grad_; }

 private:
  static constexpr const char* kOp = "GluExperts";

  Options options_;
  RowMatrix<S> gate_;  // (num_experts * model_dim, hidden_dim)
  RowMatrix<S> up_;    // (num_experts * model_dim, hidden_dim)
  RowMatrix<S> down_;  // (num_experts * hidden_dim, model_dim)
  // Training: the gradients (lazily allocated, the stacks' shapes).
  RowMatrix<S> gate_grad_;
  RowMatrix<S> up_grad_;
  RowMatrix<S> down_grad_;

  // h = Act(g) ⊙ u from a cache `(n, 2 hidden_dim)` = [g | u] into `h` `(n, hidden_dim)`,
  // one scalar at a time, except for SiLU: `sigmoid(g) * (g * u)` with Eigen's vectorised
  // `exp` (the same bits for the same rows at the same buffer offsets, which the dispatchers
  // fix independently of the thread count; within rounding of the scalar `forward`).
  template <class Cache, class H>
  void glu_hidden(const Cache& cache, H& h) const {
    const Index f = hidden_dim();
    if constexpr (std::is_same_v<Act, Silu>) {
      const auto g = cache.leftCols(f).array();
      h.array() = (S(1) + (-g).exp()).inverse() * (g * cache.rightCols(f).array());
      return;
    }
    for (Index r = 0; r < h.rows(); ++r) {
      for (Index j = 0; j < f; ++j) h(r, j) = Act::template apply<S>(cache(r, j)) * cache(r, f + j);
    }
  }
  // One expert's packed copies for the kernels: gate and up (model_dim, hidden_dim) each,
  // interleaved, and down (hidden_dim, model_dim).
  template <class W>
  struct PackedExpert {
    detail::PackedGluMatrix<W> gate_up;
    detail::PackedMatrix<W> down;
  };
  // Stale after any non-const weight access until parameters_changed(). Members that hand out
  // the stacks for writing (parameter visitors) must mark it stale too.
  detail::PackedCopies<S, PackedExpert> packed_;
};

/// SwiGLU experts: `GluExperts` with the SiLU gate.
template <class S>
using SwiGluExperts = GluExperts<S, Silu>;

/// GeGLU experts: `GluExperts` with the exact GELU gate.
template <class S>
using GeGluExperts = GluExperts<S, Gelu>;

}  // namespace moet
