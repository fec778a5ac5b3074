#pragma once
/// \file experts/ffn.hpp
/// `FfnExperts`: a bank of classic two-layer feed-forward experts with biases (the Transformer
/// FFN of fairseq, GShard, Switch and THOR): `ExpertBank` (experts/bank.hpp) with the body
/// `FfnBody<Act>`.

#include <array>
#include <cstddef>
#include <span>
#include <type_traits>

#include "moet/activations.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/expert_bank.hpp"
#include "moet/detail/gather_scatter.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/transposed_packs.hpp"
#include "moet/experts/bank.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

namespace moet {

/// The tensors of an FFN expert, in `visit_parameters` order: `kInWeight` (`W1`, `(model_dim,
/// hidden_dim)`, visited as `"in_weight"`), `kInBias` (`b1`, `(1, hidden_dim)`, `"in_bias"`),
/// `kOutWeight` (`W2`, `(hidden_dim, model_dim)`, `"out_weight"`), `kOutBias` (`b2`,
/// `(1, model_dim)`, `"out_bias"`); the biases only with `Options::bias`. In PyTorch's layout
/// (fairseq's `fc1`, `fc2`) the weights are `[hidden_dim, model_dim]` and
/// `[model_dim, hidden_dim]`.
enum class FfnTensor { kInWeight, kInBias, kOutWeight, kOutBias };

/// The names of an FFN bank's tensors (a mixin of `ExpertBank` and of its `Edit` handle).
template <class Self>
class FfnViews {
 public:
  /// Expert `e`'s first-layer weights `W1_e` `(model_dim, hidden_dim)`, a view into the stack.
  auto in_weights(Index e) const { return self().tensor(FfnTensor::kInWeight, e); }
  /// Expert `e`'s second-layer weights `W2_e` `(hidden_dim, model_dim)`.
  auto out_weights(Index e) const { return self().tensor(FfnTensor::kOutWeight, e); }
  /// Expert `e`'s first-layer bias `b1_e` `(1, hidden_dim)`, a row vector. Only with
  /// `has_bias()` (`moet::Error` otherwise).
  auto in_bias(Index e) const { return detail::row_vector(self().tensor(FfnTensor::kInBias, e)); }
  /// Expert `e`'s second-layer bias `b2_e` `(1, model_dim)`. Only with `has_bias()`.
  auto out_bias(Index e) const { return detail::row_vector(self().tensor(FfnTensor::kOutBias, e)); }
  /// The stacked first-layer weights `(num_experts * model_dim, hidden_dim)`.
  auto in_weights_stack() const { return self().stack(FfnTensor::kInWeight); }
  /// The stacked second-layer weights `(num_experts * hidden_dim, model_dim)`.
  auto out_weights_stack() const { return self().stack(FfnTensor::kOutWeight); }
  /// The stacked first-layer biases `(num_experts, hidden_dim)`; `(0, hidden_dim)` without bias.
  auto in_bias_stack() const { return self().stack(FfnTensor::kInBias); }
  /// The stacked second-layer biases `(num_experts, model_dim)`; `(0, model_dim)` without bias.
  auto out_bias_stack() const { return self().stack(FfnTensor::kOutBias); }

 private:
  const Self& self() const { return static_cast<const Self&>(*this); }
};

/// The named setters and gradients of an FFN bank (a mixin of `ExpertBank`).
template <class Self>
class FfnMembers {
 public:
  /// Sets expert `e`'s first-layer weights from `w`: `(model_dim, hidden_dim)` with
  /// `WeightLayout::kInOut`, `[hidden_dim, model_dim]` with `kOutIn` (PyTorch's `fc1.weight`).
  /// See `ExpertBank::set_tensor` for the checks.
  template <class Derived>
  void set_in_weights(Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    self().set_tensor(FfnTensor::kInWeight, e, w, layout);
  }
  /// Sets expert `e`'s second-layer weights: `(hidden_dim, model_dim)` with `kInOut`,
  /// `[model_dim, hidden_dim]` with `kOutIn` (`fc2.weight`).
  template <class Derived>
  void set_out_weights(Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    self().set_tensor(FfnTensor::kOutWeight, e, w, layout);
  }
  /// Sets expert `e`'s first-layer bias from a vector of `hidden_dim` values (row or column).
  template <class Derived>
  void set_in_bias(Index e, const Eigen::MatrixBase<Derived>& b) {
    self().set_tensor(FfnTensor::kInBias, e, b, WeightLayout::kInOut);
  }
  /// Sets expert `e`'s second-layer bias from a vector of `model_dim` values.
  template <class Derived>
  void set_out_bias(Index e, const Eigen::MatrixBase<Derived>& b) {
    self().set_tensor(FfnTensor::kOutBias, e, b, WeightLayout::kInOut);
  }

  /// The accumulated gradients, shaped like the stacks (empty before the first `zero_grad`,
  /// `backward` or `visit_parameters`; the bias ones `(0, n)` without biases).
  decltype(auto) in_weights_grad() const { return self().grad(FfnTensor::kInWeight); }
  decltype(auto) out_weights_grad() const { return self().grad(FfnTensor::kOutWeight); }
  decltype(auto) in_bias_grad() const { return self().grad(FfnTensor::kInBias); }
  decltype(auto) out_bias_grad() const { return self().grad(FfnTensor::kOutBias); }

 private:
  Self& self() { return static_cast<Self&>(*this); }
  const Self& self() const { return static_cast<const Self&>(*this); }
};

/// The body of a two-layer feed-forward expert:
/// ```
/// E_e(x) = Act(x W1_e + b1_e) W2_e + b2_e
/// ```
/// with `W1_e` `(model_dim, hidden_dim)`, `b1_e` `(hidden_dim)`, `W2_e` `(hidden_dim,
/// model_dim)` and `b2_e` `(model_dim)`. This is fairseq's `TransformerEncoderLayer` FFN that
/// THOR's experts use (`fc1`, activation, `fc2`, both with bias). `Options::bias = false` drops
/// the biases (Switch Transformer's experts). Random initialisation leaves the biases 0 (as
/// fairseq initialises `nn.Linear` biases in its Transformer).
///
/// Packed kernels: `W1` and `W2` packed for `gemm_packed`, the bias and activation applied in
/// between; biases are read in place (never packed). Training keeps the pre-activation
/// `x W1 + b1` per routed row (`cache_width = hidden_dim`).
///
/// \tparam Act hidden activation policy (see activations.hpp).
template <class Act>
struct FfnBody {
  using Activation = Act;
  using Tensor = FfnTensor;
  static constexpr const char* kName = "FfnExperts";
  static constexpr bool kHasBias = true;
  static constexpr bool kDefaultBias = true;
  /// `FfnTensor` order; random streams as before the banks were merged (same weights).
  static constexpr std::array<detail::TensorSpec, 4> kTensors = {{
      {"in_weight", "first-layer weights", "set_in_weights", detail::BankDim::kModel,
       detail::BankDim::kHidden, false, detail::BankDim::kModel, 0x666331U},
      {"in_bias", "first-layer bias", "set_in_bias", detail::BankDim::kOne,
       detail::BankDim::kHidden, true, detail::BankDim::kOne, 0},
      {"out_weight", "second-layer weights", "set_out_weights", detail::BankDim::kHidden,
       detail::BankDim::kModel, false, detail::BankDim::kHidden, 0x666332U},
      {"out_bias", "second-layer bias", "set_out_bias", detail::BankDim::kOne,
       detail::BankDim::kModel, true, detail::BankDim::kOne, 0},
  }};

  template <class Self>
  using Views = FfnViews<Self>;
  template <class Self>
  using Members = FfnMembers<Self>;

  /// Per-thread workspace: the `(n, hidden_dim)` hidden activations and the packed kernels'
  /// workspace.
  template <class S>
  struct Scratch {
    detail::Buffer<S> hidden;
    detail::Buffer<float> kernel;
    detail::BackwardRows rows;  // the packed backward's activations
  };

  /// One expert's packed copies: `W1` `(model_dim, hidden_dim)`, `W2` `(hidden_dim,
  /// model_dim)`.
  template <class W>
  struct Packed {
    detail::PackedMatrix<W> w1;
    detail::PackedMatrix<W> w2;
  };

  /// Parameters of one expert: `2 * model_dim * hidden_dim`, plus `hidden_dim + model_dim`
  /// with biases.
  static Index params_per_expert(Index d, Index f, bool bias) {
    return 2 * d * f + (bias ? d + f : 0);
  }
  /// The two products, `2 * 2 * model_dim * hidden_dim` (the `O(hidden_dim)` bias adds and
  /// activation are not counted).
  static double flops_per_token(Index d, Index f) {
    return 4.0 * static_cast<double>(d) * static_cast<double>(f);
  }
  /// `forward_train` keeps the pre-activation `x W1 + b1`: `hidden_dim`.
  static Index cache_width(Index /*d*/, Index f) { return f; }

  template <class S>
  static void reserve(Scratch<S>& scratch, Index max_rows, Index d, Index f, WeightFormat format) {
    detail::reserve_aligned(scratch.hidden, max_rows, f);
    if constexpr (std::is_same_v<S, float>) {
      // The packed backward: its rows of activations, and gemm_packed_at's workspace (output
      // rows up to max(d, f), inner dimension max_rows).
      scratch.rows.reserve(max_rows, std::max(d, f), format);
      detail::reserve_packed_scratch(scratch.kernel, std::max(d, f), max_rows);
    }
  }

  // --- packing ---------------------------------------------------------------------------------

  template <class W>
  static void reset(Packed<W>& p, Index d, Index f) {
    p.w1.reset(d, f);
    p.w2.reset(f, d);
  }
  template <class W, class X>
  static bool pack(Packed<W>& p, const X& x) {
    const bool w1 = p.w1.pack(x(FfnTensor::kInWeight));
    return p.w2.pack(x(FfnTensor::kOutWeight)) && w1;
  }
  /// Packs weight tensor `t` (never a bias) from `src` `(in, out)`.
  template <class W>
  static void pack_tensor(Packed<W>& p, FfnTensor t, const ConstRows<float>& src) {
    MOET_ASSERT(t == FfnTensor::kInWeight || t == FfnTensor::kOutWeight, "biases are not packed");
    (t == FfnTensor::kInWeight ? p.w1 : p.w2).pack(src);
  }
  /// Packs weight `t` (`(in, out)`) alone from ready blocks, `out` rows of `ceil(in / 32)`
  /// (GGUF's `[out, in]`), for a `p` of the blocks' format (a no-op for the other formats).
  template <class W, class Block>
  static void pack_tensor_blocks(Packed<W>& p, FfnTensor t, std::span<const Block> blocks, Index in,
                                 Index out) {
    MOET_ASSERT(t == FfnTensor::kInWeight || t == FfnTensor::kOutWeight, "biases are not packed");
    if constexpr (std::is_same_v<W, typename detail::BlockFormat<Block>::Element>) {
      auto& m = t == FfnTensor::kInWeight ? p.w1 : p.w2;
      m.pack_blocks(blocks, in, out, m.isa());
    }
  }
  template <class W>
  static std::size_t packed_bytes(const Packed<W>& p) {
    return p.w1.bytes() + p.w2.bytes();
  }

  // --- one expert ------------------------------------------------------------------------------

  /// Packed forward of expert `x` on `in` `(n >= 1, model_dim)` into `out`: both products on
  /// the packed kernels, bias and activation in between.
  template <class X, class W>
  static void forward_packed(const X& x, const Packed<W>& p, const ConstRows<float>& in,
                             Rows<float> out, Scratch<float>& scratch) {
    auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // (n, f)
    forward_stage_packed(x, p, 0, in, h, {}, scratch);
    forward_stage_packed(x, p, 1, h, out, {}, scratch);
  }

  /// Column panels of the two stages of the packed forward (`stage` 0: the hidden activations,
  /// `hidden_dim` columns; 1: the output, `model_dim` columns), for splitting one expert's
  /// columns between threads (`ExpertBank::forward_stage`).
  template <class W>
  static Index stage_panels(const Packed<W>& p, int stage) {
    return stage == 0 ? p.w1.num_panels() : p.w2.num_panels();
  }

  /// Stage `stage` of the packed forward on the column panels `panels`: stage 0 writes those
  /// columns of `h = Act(in W1 + b1)` `(n, hidden_dim)` from `in` `(n, model_dim)`; stage 1
  /// writes those columns of `out = h W2 + b2` `(n, model_dim)` from `h`. The bias and the
  /// activation are elementwise, so every element has the same bits whatever the panels.
  template <class X, class W>
  static void forward_stage_packed(const X& x, const Packed<W>& p, int stage,
                                   const ConstRows<float>& in, Rows<float> out,
                                   detail::PanelRange panels, Scratch<float>& scratch) {
    const auto& w = stage == 0 ? p.w1 : p.w2;
    detail::gemm_packed(in, w, out, /*accumulate=*/false, scratch.kernel, panels);
    const auto [first, count] = detail::panel_span("FfnExperts", panels, w.num_panels());
    const Index c0 = std::min(out.cols(), first * w.panel_width());
    const Index c1 = std::min(out.cols(), (first + count) * w.panel_width());
    auto cols = out.middleCols(c0, c1 - c0);
    if (x.bias()) {
      const auto bias =
          detail::row_vector(x(stage == 0 ? FfnTensor::kInBias : FfnTensor::kOutBias));
      cols.rowwise() += bias.segment(c0, c1 - c0);
    }
    if (stage == 0) apply_activation<Act>(cols);
  }

  /// Eigen forward of expert `x` (double banks, `pack_weights = false`).
  template <class X, class S>
  static void forward(const X& x, const ConstRows<S>& in, Rows<S> out, Scratch<S>& scratch) {
    auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // (n, f)
    h.noalias() = in * x(FfnTensor::kInWeight);
    if (x.bias()) h.rowwise() += detail::row_vector(x(FfnTensor::kInBias));
    apply_activation<Act>(h);
    out.noalias() = h * x(FfnTensor::kOutWeight);
    if (x.bias()) out.rowwise() += detail::row_vector(x(FfnTensor::kOutBias));
  }

  /// `forward_packed` plus the cache (the pre-activation `in W1_e + b1_e`), on the packed
  /// kernels: `out` has `forward_packed`'s bits exactly. Returns false (and does nothing) for the
  /// block formats.
  template <class X, class W>
  static bool forward_train_packed(const X& x, const Packed<W>& p, const ConstRows<float>& in,
                                   Rows<float> out, Rows<float> cache, Scratch<float>& scratch) {
    if constexpr (detail::kIsQuantized<W>) {
      return false;  // block formats: Eigen on the float weights
    } else {
      detail::gemm_packed(in, p.w1, cache, /*accumulate=*/false, scratch.kernel);
      if (x.bias()) cache.rowwise() += detail::row_vector(x(FfnTensor::kInBias));
      auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // (n, f)
      activate(cache, h);
      forward_stage_packed(x, p, 1, h, out, {}, scratch);
      return true;
    }
  }

  /// `forward` plus the cache `(n, hidden_dim)` = `in W1_e + b1_e`. Eigen's products (double
  /// banks and banks without current packed weights).
  template <class X, class S>
  static void forward_train(const X& x, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                            Scratch<S>& scratch) {
    cache.noalias() = in * x(FfnTensor::kInWeight);
    if (x.bias()) cache.rowwise() += detail::row_vector(x(FfnTensor::kInBias));
    auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // (n, f)
    activate(cache, h);
    out.noalias() = h * x(FfnTensor::kOutWeight);
    if (x.bias()) out.rowwise() += detail::row_vector(x(FfnTensor::kOutBias));
  }

  /// Backward of expert `x` (gradients `g`): with `a` the cached pre-activation, `h = Act(a)`,
  /// `da = (dout W2_e^T) ⊙ Act'(a)`: accumulates `dW2_e += h^T dout`, `db2_e += sum of dout's
  /// rows`, `dW1_e += in^T da`, `db1_e += sum of da's rows` and **writes** `din = da W1_e^T`.
  /// Eigen's products (double banks, banks without current packed weights). Reuses the
  /// scratch's `(n, hidden_dim)` buffer.
  template <class X, class G, class S>
  static void backward(const X& x, const G& grads, const ConstRows<S>& in,
                       const ConstRows<S>& cache, const ConstRows<S>& dout, Rows<S> din,
                       Scratch<S>& scratch) {
    auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // h, then da
    activate(cache, h);
    grads(FfnTensor::kOutWeight).noalias() += h.transpose() * dout;  // (hidden_dim, model_dim)
    h.noalias() = dout * x(FfnTensor::kOutWeight).transpose();       // dh
    backward_rest(x, grads, cache, dout, h);
    grads(FfnTensor::kInWeight).noalias() += in.transpose() * h;
    din.noalias() = h * x(FfnTensor::kInWeight).transpose();
  }

  /// `backward` on the packed kernels (float banks with current packed weights): the products
  /// against the bank's transposed weights `wt` and the activations packed here, as in
  /// `GluBody::backward_packed` (gradients written instead of added when not `accumulate`).
  template <class X, class G, class T>
  static void backward_packed(const X& x, const G& grads, const T& wt, const ConstRows<float>& in,
                              const ConstRows<float>& cache, const ConstRows<float>& dout,
                              Rows<float> din, bool accumulate, Scratch<float>& scratch) {
    constexpr auto kIn = static_cast<std::size_t>(FfnTensor::kInWeight);
    constexpr auto kOut = static_cast<std::size_t>(FfnTensor::kOutWeight);
    const KernelIsa isa = wt[kOut].isa();
    auto& rows = scratch.rows.like(wt[kOut]);  // bf16 rows for bf16 weights
    auto h = detail::aligned_matrix(scratch.hidden, in.rows(), x.hidden_dim());  // h, then da
    activate(cache, h);
    rows.pack(dout, isa);
    detail::gemm_packed_at(h, rows, grads(FfnTensor::kOutWeight), accumulate, scratch.kernel);
    detail::gemm_packed(dout, wt[kOut], h, false, scratch.kernel);  // dh
    if (!accumulate && x.bias()) {  // the bias rows are tiny: zero them, then add as before
      grads(FfnTensor::kInBias).setZero();
      grads(FfnTensor::kOutBias).setZero();
    }
    backward_rest(x, grads, cache, dout, h);
    rows.pack(h, isa);
    detail::gemm_packed_at(in, rows, grads(FfnTensor::kInWeight), accumulate, scratch.kernel);
    detail::gemm_packed(h, wt[kIn], din, false, scratch.kernel);
  }

  /// The split backward (`BackwardSplitHook`): per routed row it keeps `[h | da]`
  /// (`2 hidden_dim`), and the gradients are `dW2 = h^T dout`, `db2 = sum dout`,
  /// `dW1 = in^T da`, `db1 = sum da`.
  static Index split_width(Index /*d*/, Index f) { return 2 * f; }
  static constexpr std::array<detail::SplitProduct, 2> kSplitProducts = {{
      {static_cast<std::size_t>(FfnTensor::kOutWeight), 0, detail::kSplitDout,
       static_cast<int>(FfnTensor::kOutBias)},
      {static_cast<std::size_t>(FfnTensor::kInWeight), detail::kSplitIn, 1,
       static_cast<int>(FfnTensor::kInBias)},
  }};

  /// The row piece of the split backward on the packed kernels: `backward_packed`'s formulas
  /// without the weight and bias gradients, writing `din` and `rows = [h | da]`
  /// `(n, 2 hidden_dim)`.
  template <class X, class T>
  static void backward_rows_packed(const X& x, const T& wt, const ConstRows<float>& in,
                                   const ConstRows<float>& cache, const ConstRows<float>& dout,
                                   Rows<float> din, Rows<float> rows, Scratch<float>& scratch) {
    static_cast<void>(in);
    constexpr auto kIn = static_cast<std::size_t>(FfnTensor::kInWeight);
    constexpr auto kOut = static_cast<std::size_t>(FfnTensor::kOutWeight);
    const Index f = x.hidden_dim();
    Rows<float> h = rows.leftCols(f);
    Rows<float> da = rows.rightCols(f);
    activate(cache, h);
    detail::gemm_packed(dout, wt[kOut], da, false, scratch.kernel);  // dh
    times_derivative(cache, da);                                     // da
    detail::gemm_packed(da, wt[kIn], din, false, scratch.kernel);
  }

 private:
  // Given `h = dh`: `h = da = dh ⊙ Act'(a)`, and the bias gradients (column sums in row order,
  // `detail::add_rows`, as the split backward's `backward_weights` sums them).
  template <class X, class G, class Cache, class Dout, class H>
  static void backward_rest(const X& x, const G& grads, const Cache& cache, const Dout& dout,
                            H& h) {
    times_derivative(cache, h);
    if (x.bias()) {
      detail::add_rows(grads(FfnTensor::kInBias), h);      // (1, hidden_dim)
      detail::add_rows(grads(FfnTensor::kOutBias), dout);  // (1, model_dim)
    }
  }

  // dh ⊙ Act'(a) in place, from the cached pre-activations `a`, one scalar at a time.
  template <class Cache, class H>
  static void times_derivative(const Cache& cache, H& dh) {
    using S = typename H::Scalar;
    for (Index r = 0; r < dh.rows(); ++r) {
      for (Index j = 0; j < dh.cols(); ++j) dh(r, j) *= Act::template derivative<S>(cache(r, j));
    }
  }

  // h = Act(a) from the cached pre-activations `a` `(n, hidden_dim)`, one scalar at a time.
  template <class Cache, class H>
  static void activate(const Cache& cache, H& h) {
    using S = typename H::Scalar;
    for (Index r = 0; r < h.rows(); ++r) {
      for (Index j = 0; j < h.cols(); ++j) h(r, j) = Act::template apply<S>(cache(r, j));
    }
  }
};

/// A bank of `num_experts` two-layer feed-forward experts: `ExpertBank` with `FfnBody<Act>`
/// (see both for the formula, the weight API and the modes). Tensors `FfnTensor`; named
/// accessors `in_weights(e)`, `in_bias(e)`, `out_weights(e)`, `out_bias(e)`, `*_stack()`,
/// setters `set_in_weights(e, w, layout)`, `set_in_bias(e, b)`, ..., gradients
/// `in_weights_grad()`, ...; visited as `in_weight`, `in_bias`, `out_weight`, `out_bias`.
///
/// \tparam S scalar type (float or double).
/// \tparam Act hidden activation policy (see activations.hpp); `Gelu` by default (THOR).
///
/// ```cpp
/// moet::FfnExperts<float> experts({.model_dim = 512, .hidden_dim = 2048, .num_experts = 4});
/// ```
template <class S, class Act = Gelu>
using FfnExperts = ExpertBank<S, FfnBody<Act>>;

/// ReLU FFN experts (the original Transformer / Switch FFN).
template <class S>
using ReluFfnExperts = FfnExperts<S, Relu>;

/// GELU FFN experts (fairseq's `--activation-fn gelu`, THOR).
template <class S>
using GeluFfnExperts = FfnExperts<S, Gelu>;

}  // namespace moet
