#pragma once
/// \file experts/glu.hpp
/// `GluExperts`: a bank of gated-linear-unit feed-forward experts (SwiGLU, GeGLU), the expert of
/// docs/algorithms.md §2.1: `ExpertBank` (experts/bank.hpp) with the body `GluBody<Act>`.

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

/// The tensors of a GLU expert, in `visit_parameters` order: `kGate` (`Wg`, `(model_dim,
/// hidden_dim)`, visited as `"gate"`), `kUp` (`Wu`, same shape, `"up"`), `kDown` (`Wd`,
/// `(hidden_dim, model_dim)`, `"down"`). In PyTorch's layout (HF Mixtral's `w1`, `w3`, `w2`;
/// Qwen-MoE's `gate_proj`, `up_proj`, `down_proj`) they are `[hidden_dim, model_dim]`,
/// `[hidden_dim, model_dim]` and `[model_dim, hidden_dim]`.
enum class GluTensor { kGate, kUp, kDown };

/// The names of a GLU bank's tensors (a mixin of `ExpertBank` and of its `Edit` handle, which
/// hand out read-only and writable views respectively).
template <class Self>
class GluViews {
 public:
  /// Expert `e`'s gate weights `Wg_e` `(model_dim, hidden_dim)`, a view into the stack.
  auto gate_weights(Index e) const { return self().tensor(GluTensor::kGate, e); }
  /// Expert `e`'s up weights `Wu_e` `(model_dim, hidden_dim)`.
  auto up_weights(Index e) const { return self().tensor(GluTensor::kUp, e); }
  /// Expert `e`'s down weights `Wd_e` `(hidden_dim, model_dim)`.
  auto down_weights(Index e) const { return self().tensor(GluTensor::kDown, e); }
  /// The stacked gate weights `(num_experts * model_dim, hidden_dim)`.
  auto gate_stack() const { return self().stack(GluTensor::kGate); }
  /// The stacked up weights `(num_experts * model_dim, hidden_dim)`.
  auto up_stack() const { return self().stack(GluTensor::kUp); }
  /// The stacked down weights `(num_experts * hidden_dim, model_dim)`.
  auto down_stack() const { return self().stack(GluTensor::kDown); }

 private:
  const Self& self() const { return static_cast<const Self&>(*this); }
};

/// The named setters and gradients of a GLU bank (a mixin of `ExpertBank`).
template <class Self>
class GluMembers {
 public:
  /// Sets expert `e`'s gate weights from `w`: `(model_dim, hidden_dim)` with
  /// `WeightLayout::kInOut`, `[hidden_dim, model_dim]` with `kOutIn` (PyTorch). See
  /// `ExpertBank::set_tensor` for the checks.
  template <class Derived>
  void set_gate_weights(Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    self().set_tensor(GluTensor::kGate, e, w, layout);
  }
  /// Sets expert `e`'s up weights (shapes as `set_gate_weights`).
  template <class Derived>
  void set_up_weights(Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    self().set_tensor(GluTensor::kUp, e, w, layout);
  }
  /// Sets expert `e`'s down weights: `(hidden_dim, model_dim)` with `kInOut`,
  /// `[model_dim, hidden_dim]` with `kOutIn`.
  template <class Derived>
  void set_down_weights(Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    self().set_tensor(GluTensor::kDown, e, w, layout);
  }

  /// The accumulated gradients, shaped like the stacks (empty before the first `zero_grad`,
  /// `backward` or `visit_parameters`).
  decltype(auto) gate_grad() const { return self().grad(GluTensor::kGate); }
  decltype(auto) up_grad() const { return self().grad(GluTensor::kUp); }
  decltype(auto) down_grad() const { return self().grad(GluTensor::kDown); }

 private:
  Self& self() { return static_cast<Self&>(*this); }
  const Self& self() const { return static_cast<const Self&>(*this); }
};

/// The body of a gated-linear-unit expert (Shazeer, "GLU Variants Improve Transformer", 2020):
/// ```
/// E_e(x) = (Act(x Wg_e) ⊙ (x Wu_e)) Wd_e
/// ```
/// with `Wg_e, Wu_e` `(model_dim, hidden_dim)` and `Wd_e` `(hidden_dim, model_dim)`, no biases.
/// `Act = Silu` gives SwiGLU (Mixtral, DeepSeek, Qwen-MoE), `Act = Gelu` GeGLU.
///
/// Packed kernels: gate and up interleaved for the fused `Act(x Wg) ⊙ (x Wu)` kernel
/// (`glu_packed`), down in column panels (`gemm_packed`). Training keeps the pre-activations
/// `x Wg` and `x Wu` per routed row (`cache_width = 2 * hidden_dim`); `backward` recomputes
/// the hidden product.
///
/// \tparam Act gate activation policy (see activations.hpp).
template <class Act>
struct GluBody {
  using Activation = Act;
  using Tensor = GluTensor;
  static constexpr const char* kName = "GluExperts";
  /// GLU experts have no biases (`Options::bias = true` is an error).
  static constexpr bool kHasBias = false;
  static constexpr bool kDefaultBias = false;
  /// `GluTensor` order; random streams as before the banks were merged (same weights).
  static constexpr std::array<detail::TensorSpec, 3> kTensors = {{
      {"gate", "gate weights", "set_gate_weights", detail::BankDim::kModel,
       detail::BankDim::kHidden, false, detail::BankDim::kModel, 0x676174U},
      {"up", "up weights", "set_up_weights", detail::BankDim::kModel, detail::BankDim::kHidden,
       false, detail::BankDim::kModel, 0x7570U},
      {"down", "down weights", "set_down_weights", detail::BankDim::kHidden,
       detail::BankDim::kModel, false, detail::BankDim::kHidden, 0x646f776eU},
  }};

  template <class Self>
  using Views = GluViews<Self>;
  template <class Self>
  using Members = GluMembers<Self>;

  /// Per-thread workspace: the `(n, hidden_dim)` gate and up activations (the packed path uses
  /// `gate` for the hidden activations) and the packed kernels' workspace.
  template <class S>
  struct Scratch {
    detail::Buffer<S> gate;
    detail::Buffer<S> up;
    detail::Buffer<float> kernel;
    detail::BackwardRows rows;  // the packed backward's activations
  };

  /// One expert's packed copies: gate and up `(model_dim, hidden_dim)` each, interleaved, and
  /// down `(hidden_dim, model_dim)`.
  template <class W>
  struct Packed {
    detail::PackedGluMatrix<W> gate_up;
    detail::PackedMatrix<W> down;
  };

  /// Parameters of one expert: `3 * model_dim * hidden_dim`.
  static Index params_per_expert(Index d, Index f, bool /*bias*/) { return 3 * d * f; }
  /// The three products, `2 * 3 * model_dim * hidden_dim` (the `O(hidden_dim)` activation and
  /// elementwise product are not counted).
  static double flops_per_token(Index d, Index f) {
    return 6.0 * static_cast<double>(d) * static_cast<double>(f);
  }
  /// `forward_train` keeps `x Wg` and `x Wu`: `2 * hidden_dim`.
  static Index cache_width(Index /*d*/, Index f) { return 2 * f; }

  template <class S>
  static void reserve(Scratch<S>& scratch, Index max_rows, Index d, Index f, WeightFormat format) {
    detail::reserve_aligned(scratch.gate, max_rows, f);
    detail::reserve_aligned(scratch.up, max_rows, f);
    if constexpr (std::is_same_v<S, float>) {
      // forward_train's raw gate and up products (whole panels), the backward's dout, dg, du.
      const Index half = detail::panel_width(kernel_isa()) / 2;
      detail::reserve_aligned(scratch.up, max_rows, 2 * half * ((f + half - 1) / half));
      scratch.rows.reserve(max_rows, std::max(d, f), format);
      detail::reserve_packed_scratch(scratch.kernel, std::max(d, f), max_rows);  // gemm_packed_at
    }
  }

  // --- packing ---------------------------------------------------------------------------------

  /// Shapes `p` for a `(d, f)` expert, every element zero.
  template <class W>
  static void reset(Packed<W>& p, Index d, Index f) {
    p.gate_up.reset(d, f);
    p.down.reset(f, d);
  }
  /// Packs every tensor of expert `x` (`x(t)` its tensor `t`); returns whether every value
  /// was finite (float and bf16 pack a NaN or Inf as it is, block formats throw).
  template <class W, class X>
  static bool pack(Packed<W>& p, const X& x) {
    const bool gate_up = p.gate_up.pack(x(GluTensor::kGate), x(GluTensor::kUp));
    return p.down.pack(x(GluTensor::kDown)) && gate_up;
  }
  /// Packs tensor `t` alone from `src` `(in, out)` into an already shaped `p`.
  template <class W>
  static void pack_tensor(Packed<W>& p, GluTensor t, const ConstRows<float>& src) {
    if (t == GluTensor::kGate) {
      p.gate_up.pack_gate(src);
    } else if (t == GluTensor::kUp) {
      p.gate_up.pack_up(src);
    } else {
      p.down.pack(src);
    }
  }
  /// Packs tensor `t` (`(in, out)`) alone from ready blocks, `out` rows of `ceil(in / 32)`
  /// (GGUF's `[out, in]`), into an already shaped `p` of the blocks' format (a no-op for the
  /// copies of the other formats, which the bank never asks for).
  template <class W, class Block>
  static void pack_tensor_blocks(Packed<W>& p, GluTensor t, std::span<const Block> blocks, Index in,
                                 Index out) {
    if constexpr (std::is_same_v<W, typename detail::BlockFormat<Block>::Element>) {
      if (t == GluTensor::kGate) {
        p.gate_up.pack_gate_blocks(blocks);
      } else if (t == GluTensor::kUp) {
        p.gate_up.pack_up_blocks(blocks);
      } else {
        p.down.pack_blocks(blocks, in, out, p.down.isa());
      }
    }
  }
  template <class W>
  static std::size_t packed_bytes(const Packed<W>& p) {
    return p.gate_up.bytes() + p.down.bytes();
  }

  // --- one expert ------------------------------------------------------------------------------

  /// Packed forward of expert `x` on `in` `(n >= 1, model_dim)` into `out`.
  template <class X, class W>
  static void forward_packed(const X& x, const Packed<W>& p, const ConstRows<float>& in,
                             Rows<float> out, Scratch<float>& scratch) {
    auto h = detail::aligned_matrix(scratch.gate, in.rows(), x.hidden_dim());  // (n, hidden_dim)
    detail::glu_packed<Act>(in, p.gate_up, h, scratch.kernel);
    detail::gemm_packed(h, p.down, out, /*accumulate=*/false, scratch.kernel);
  }

  /// Column panels of the two stages of the packed forward (`stage` 0: the hidden activations,
  /// `hidden_dim` columns; 1: the output, `model_dim` columns), for splitting one expert's
  /// columns between threads (`ExpertBank::forward_stage`).
  template <class W>
  static Index stage_panels(const Packed<W>& p, int stage) {
    return stage == 0 ? p.gate_up.num_panels() : p.down.num_panels();
  }

  /// Stage `stage` of the packed forward on the column panels `panels`: stage 0 writes those
  /// columns of `h = Act(in Wg) ⊙ (in Wu)` `(n, hidden_dim)` from `in` `(n, model_dim)`; stage
  /// 1 writes those columns of `out = h Wd` `(n, model_dim)` from `h`. Every element has the
  /// bits of `forward_packed`'s.
  template <class X, class W>
  static void forward_stage_packed(const X& /*x*/, const Packed<W>& p, int stage,
                                   const ConstRows<float>& in, Rows<float> out,
                                   detail::PanelRange panels, Scratch<float>& scratch) {
    if (stage == 0) {
      detail::glu_packed<Act>(in, p.gate_up, out, scratch.kernel, panels);
    } else {
      detail::gemm_packed(in, p.down, out, /*accumulate=*/false, scratch.kernel, panels);
    }
  }

  /// Eigen forward of expert `x` (double banks, `pack_weights = false`).
  template <class X, class S>
  static void forward(const X& x, const ConstRows<S>& in, Rows<S> out, Scratch<S>& scratch) {
    const Index n = in.rows();
    auto g = detail::aligned_matrix(scratch.gate, n, x.hidden_dim());  // (n, hidden_dim)
    auto u = detail::aligned_matrix(scratch.up, n, x.hidden_dim());    // (n, hidden_dim)
    g.noalias() = in * x(GluTensor::kGate);
    u.noalias() = in * x(GluTensor::kUp);
    apply_activation<Act>(g);
    g.array() *= u.array();  // Act(x Wg) ⊙ (x Wu)
    out.noalias() = g * x(GluTensor::kDown);
  }

  /// `forward_packed` plus the cache (`forward_train`'s layout), on the packed kernels: the raw
  /// gate and up products (`glu_packed_raw`) are the cache, the hidden activations follow from
  /// them with the fused kernel's own SiLU (or `Act::apply`), so `out` has `forward_packed`'s
  /// bits exactly. Returns false (and does nothing) for the block formats.
  template <class X, class W>
  static bool forward_train_packed(const X& x, const Packed<W>& p, const ConstRows<float>& in,
                                   Rows<float> out, Rows<float> cache, Scratch<float>& scratch) {
    if constexpr (detail::kIsQuantized<W>) {
      return false;  // block formats: Eigen on the float weights
    } else {
      const Index n = in.rows();
      const Index f = x.hidden_dim();
      const Index half = p.gate_up.panel_width() / 2;
      auto wide = detail::aligned_matrix(scratch.up, n, 2 * half * p.gate_up.num_panels());
      detail::glu_packed_raw(in, p.gate_up, wide, scratch.kernel);
      auto h = detail::aligned_matrix(scratch.gate, n, f);  // (n, hidden_dim)
      for (Index r = 0; r < n; ++r) {
        const float* src = &wide(r, 0);
        float* g = &cache(r, 0);
        float* u = g + f;
        for (Index c0 = 0; c0 < f; c0 += half, src += 2 * half) {
          const Index w = std::min(half, f - c0);
          std::copy_n(src, w, g + c0);
          std::copy_n(src + half, w, u + c0);
        }
        float* hr = &h(r, 0);
        if constexpr (std::is_same_v<Act, Silu>) {
          detail::silu_array(g, hr, f, p.gate_up.isa());
          for (Index j = 0; j < f; ++j) hr[j] *= u[j];
        } else {
          for (Index j = 0; j < f; ++j) hr[j] = Act::template apply<float>(g[j]) * u[j];
        }
      }
      detail::gemm_packed(h, p.down, out, /*accumulate=*/false, scratch.kernel);
      return true;
    }
  }

  /// `forward` plus the cache: columns `[0, hidden_dim)` hold `in Wg_e`, columns
  /// `[hidden_dim, 2 hidden_dim)` hold `in Wu_e`. Eigen's products (double banks and banks
  /// without current packed weights).
  template <class X, class S>
  static void forward_train(const X& x, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                            Scratch<S>& scratch) {
    const Index f = x.hidden_dim();
    cache.leftCols(f).noalias() = in * x(GluTensor::kGate);
    cache.rightCols(f).noalias() = in * x(GluTensor::kUp);
    auto h = detail::aligned_matrix(scratch.gate, in.rows(), f);  // (n, hidden_dim)
    glu_hidden(cache, h, f);
    out.noalias() = h * x(GluTensor::kDown);
  }

  /// Backward of expert `x` (gradients `g`): with `h = Act(g) ⊙ u`, `dh = dout Wd_e^T`,
  /// `dg = dh ⊙ u ⊙ Act'(g)`, `du = dh ⊙ Act(g)`, accumulates `dWd_e += h^T dout`,
  /// `dWg_e += in^T dg`, `dWu_e += in^T du` and **writes** `din = dg Wg_e^T + du Wu_e^T`.
  /// Eigen's products (double banks, banks without current packed weights). Reuses the
  /// scratch's two `(n, hidden_dim)` buffers.
  template <class X, class G, class S>
  static void backward(const X& x, const G& grads, const ConstRows<S>& in,
                       const ConstRows<S>& cache, const ConstRows<S>& dout, Rows<S> din,
                       Scratch<S>& scratch) {
    const Index f = x.hidden_dim();
    auto a = detail::aligned_matrix(scratch.gate, in.rows(), f);  // sigmoid(g), then dg
    auto b = detail::aligned_matrix(scratch.up, in.rows(), f);    // h, dh, then du
    backward_hidden(cache, a, b, f);
    grads(GluTensor::kDown).noalias() += b.transpose() * dout;  // (hidden_dim, model_dim)
    b.noalias() = dout * x(GluTensor::kDown).transpose();       // dh
    backward_gates(cache, a, b, f);
    grads(GluTensor::kGate).noalias() += in.transpose() * a;  // (model_dim, hidden_dim)
    grads(GluTensor::kUp).noalias() += in.transpose() * b;
    din.noalias() = a * x(GluTensor::kGate).transpose();
    din.noalias() += b * x(GluTensor::kUp).transpose();
  }

  /// `backward` on the packed kernels (float banks with current packed weights): the same
  /// formulas, every product a `gemm_packed` against the bank's transposed weights `wt`
  /// (`dh`, `din`) or a `gemm_packed_at` against the activations packed here (the weight
  /// gradients, each a chain over the rows in order; written instead of added when not
  /// `accumulate`). Each result depends only on its operands, as in `backward`.
  template <class X, class G, class T>
  static void backward_packed(const X& x, const G& grads, const T& wt, const ConstRows<float>& in,
                              const ConstRows<float>& cache, const ConstRows<float>& dout,
                              Rows<float> din, bool accumulate, Scratch<float>& scratch) {
    constexpr auto kGate = static_cast<std::size_t>(GluTensor::kGate);
    constexpr auto kUp = static_cast<std::size_t>(GluTensor::kUp);
    constexpr auto kDown = static_cast<std::size_t>(GluTensor::kDown);
    const Index f = x.hidden_dim();
    const KernelIsa isa = wt[kDown].isa();
    auto& rows = scratch.rows.like(wt[kDown]);                    // bf16 rows for bf16 weights
    auto a = detail::aligned_matrix(scratch.gate, in.rows(), f);  // sigmoid(g), then dg
    auto b = detail::aligned_matrix(scratch.up, in.rows(), f);    // h, dh, then du
    backward_hidden(cache, a, b, f);
    rows.pack(dout, isa);
    detail::gemm_packed_at(b, rows, grads(GluTensor::kDown), accumulate, scratch.kernel);
    detail::gemm_packed(dout, wt[kDown], b, false, scratch.kernel);  // dh
    backward_gates(cache, a, b, f);
    rows.pack(a, isa);
    detail::gemm_packed_at(in, rows, grads(GluTensor::kGate), accumulate, scratch.kernel);
    rows.pack(b, isa);
    detail::gemm_packed_at(in, rows, grads(GluTensor::kUp), accumulate, scratch.kernel);
    detail::gemm_packed(a, wt[kGate], din, false, scratch.kernel);
    detail::gemm_packed(b, wt[kUp], din, true, scratch.kernel);
  }

  /// The split backward (`BackwardSplitHook`): per routed row it keeps `[h | dg | du]`
  /// (`3 hidden_dim`), and the weight gradients are `dWd = h^T dout`, `dWg = in^T dg`,
  /// `dWu = in^T du`.
  static Index split_width(Index /*d*/, Index f) { return 3 * f; }
  static constexpr std::array<detail::SplitProduct, 3> kSplitProducts = {{
      {static_cast<std::size_t>(GluTensor::kDown), 0, detail::kSplitDout, detail::kSplitNoBias},
      {static_cast<std::size_t>(GluTensor::kGate), detail::kSplitIn, 1, detail::kSplitNoBias},
      {static_cast<std::size_t>(GluTensor::kUp), detail::kSplitIn, 2, detail::kSplitNoBias},
  }};

  /// The row piece of the split backward on the packed kernels: `backward_packed`'s formulas
  /// without the weight gradients, writing `din` and `rows = [h | dg | du]` `(n, 3 hidden_dim)`.
  template <class X, class T>
  static void backward_rows_packed(const X& x, const T& wt, const ConstRows<float>& in,
                                   const ConstRows<float>& cache, const ConstRows<float>& dout,
                                   Rows<float> din, Rows<float> rows, Scratch<float>& scratch) {
    static_cast<void>(in);
    constexpr auto kGate = static_cast<std::size_t>(GluTensor::kGate);
    constexpr auto kUp = static_cast<std::size_t>(GluTensor::kUp);
    constexpr auto kDown = static_cast<std::size_t>(GluTensor::kDown);
    const Index f = x.hidden_dim();
    Rows<float> h = rows.leftCols(f);
    Rows<float> a = rows.middleCols(f, f);  // sigmoid(g), then dg
    Rows<float> b = rows.rightCols(f);      // dh, then du
    backward_hidden(cache, a, h, f);
    detail::gemm_packed(dout, wt[kDown], b, false, scratch.kernel);  // dh
    backward_gates(cache, a, b, f);
    detail::gemm_packed(a, wt[kGate], din, false, scratch.kernel);
    detail::gemm_packed(b, wt[kUp], din, true, scratch.kernel);
  }

 private:
  // The backward's first pass over the cache `[g | u]`: `b = h = Act(g) ⊙ u` and, for SiLU,
  // `a = sigmoid(g)` (one vectorised pass; `h = s g u`, within rounding of the forward's).
  template <class Cache, class M>
  static void backward_hidden(const Cache& cache, M& a, M& b, Index f) {
    using S = typename M::Scalar;
    if constexpr (std::is_same_v<Act, Silu>) {
      const auto g = cache.leftCols(f).array();
      a.array() = (S(1) + (-g).exp()).inverse();
      b.array() = a.array() * (g * cache.rightCols(f).array());
    } else {
      glu_hidden(cache, b, f);
    }
  }

  // Given `b = dh` (and `a` from `backward_hidden`): `a = dg = dh ⊙ u ⊙ Act'(g)`,
  // `b = du = dh ⊙ Act(g)`.
  template <class Cache, class M>
  static void backward_gates(const Cache& cache, M& a, M& b, Index f) {
    using S = typename M::Scalar;
    for (Index r = 0; r < a.rows(); ++r) {
      for (Index j = 0; j < f; ++j) {
        const S g = cache(r, j);
        const S u = cache(r, f + j);
        const S dh = b(r, j);
        if constexpr (std::is_same_v<Act, Silu>) {
          const S sg = a(r, j);
          a(r, j) = dh * u * (sg * (S(1) + g * (S(1) - sg)));
          b(r, j) = dh * (g * sg);
        } else {
          S act = S(0);
          S slope = S(0);
          activation_value_and_derivative<Act>(g, act, slope);
          a(r, j) = dh * u * slope;
          b(r, j) = dh * act;
        }
      }
    }
  }

  // h = Act(g) ⊙ u from a cache `(n, 2 f)` = [g | u] into `h` `(n, f)`, one scalar at a time,
  // except for SiLU: `sigmoid(g) * (g * u)` with Eigen's vectorised `exp` (the same bits for
  // the same rows at the same buffer offsets, which the dispatchers fix independently of the
  // thread count; within rounding of the scalar `forward`).
  template <class Cache, class H>
  static void glu_hidden(const Cache& cache, H& h, Index f) {
    using S = typename H::Scalar;
    if constexpr (std::is_same_v<Act, Silu>) {
      const auto g = cache.leftCols(f).array();
      h.array() = (S(1) + (-g).exp()).inverse() * (g * cache.rightCols(f).array());
      return;
    }
    for (Index r = 0; r < h.rows(); ++r) {
      for (Index j = 0; j < f; ++j) h(r, j) = Act::template apply<S>(cache(r, j)) * cache(r, f + j);
    }
  }
};

/// A bank of `num_experts` gated-linear-unit experts: `ExpertBank` with `GluBody<Act>` (see
/// both for the formula, the weight API and the modes). Tensors `GluTensor`; named accessors
/// `gate_weights(e)`, `up_weights(e)`, `down_weights(e)`, `*_stack()`, setters
/// `set_gate_weights(e, w, layout)`, ..., gradients `gate_grad()`, `up_grad()`,
/// `down_grad()`; visited as `gate`, `up`, `down`.
///
/// \tparam S scalar type (float or double).
/// \tparam Act gate activation policy (see activations.hpp).
///
/// ```cpp
/// moet::SwiGluExperts<float> experts({.model_dim = 512, .hidden_dim = 1024, .num_experts = 8});
/// ```
template <class S, class Act = Silu>
using GluExperts = ExpertBank<S, GluBody<Act>>;

/// SwiGLU experts: `GluExperts` with the SiLU gate.
template <class S>
using SwiGluExperts = GluExperts<S, Silu>;

/// GeGLU experts: `GluExperts` with the exact GELU gate.
template <class S>
using GeGluExperts = GluExperts<S, Gelu>;

}  // namespace moet
