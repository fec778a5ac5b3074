#pragma once
/// \file concepts.hpp
/// moet's protocol in one place: every extension point a user implements and every optional
/// hook moet calls, as named concepts. A new gate, expert bank or dispatcher satisfies its
/// concept and plugs into `MoELayer` without touching the others.
///
/// - Inference: `Gate`, `Experts`, `Dispatcher`, and the experts' `Activation` policies.
/// - Training: `TrainableGate` (with its `LossGrad`: `SoftmaxLossGrad`, `NoLossGrad` or the
///   gate's own), `TrainableExperts`, `TrainingDispatcher`, `ParameterModule` (what the
///   optimisers take).
/// - Optional hooks (`Hooks`, `HookCheck`): `TrainingForwardHook`, `ParametersChangedHook`,
///   `AdaptiveExpertsHook`, `ReadinessHook`, `ScratchReserveHook`, `LazyGradientHook`,
///   `ColumnSplitHook`, `BackwardSplitHook`, and
///   `ActivationValueAndDerivativeHook` for activation policies. A type
///   that declares `static constexpr moet::Hooks kHooks{...}` gets a compile error for a
///   declared hook it lacks (a misspelt name) and for a hook-named member it did not declare;
///   a type without `kHooks` gets one for a hook-named member that does not satisfy its concept
///   (a wrong signature), where moet would otherwise skip it silently.
///
/// Training conventions (every trainable component follows them; docs/algorithms.md §9):
/// - Gradients live next to the parameters, inside the component, allocated lazily by the first
///   `zero_grad()` or `backward` (an inference-only user never pays for them). They have the
///   parameters' shapes.
/// - `backward` **accumulates** (`+=`) into the gradients, so several backward calls between two
///   `zero_grad()` calls sum their gradients (gradient accumulation over micro-batches).
/// - `backward` **adds** its contribution to the input gradient `dx`; the caller zeroes `dx`.
/// - `visit_parameters(f)` calls `f(name, value, grad)` once per parameter tensor, in a fixed
///   order, with `value` and `grad` as `ParamMap<S>` of the same shape (vectors are `(1, n)`).
///   Names are dotted, lower case: `router.weight`, `experts.gate`, `thresholds`...; the layer
///   prefixes its parts with `gate.`, `experts.` and `shared.`.
/// - Every backward is deterministic: the same bits for any thread count (docs/algorithms.md
///   §10).

#include <concepts>
#include <span>
#include <string_view>
#include <utility>

#include "moet/context.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

// --- inference -------------------------------------------------------------------------------

/// A routing policy: scores the rows of `x` `(num_tokens, model_dim)` and fills a `Routing`.
/// `route` is `const` and keeps no per-call state in the gate, so one gate may route several
/// batches at once from different threads (each with its own `Routing`). The contract every
/// gate keeps (plan invariants, determinism, errors) is checked by
/// `moet::testing::check_gate` (moet/testing/gate_conformance.hpp).
template <class G>
concept Gate = requires(const G& g, const ConstRows<typename G::Scalar>& x, const RouteContext& ctx,
                        Routing<typename G::Scalar>& out) {
  typename G::Scalar;
  { g.num_experts() } -> std::convertible_to<Index>;
  { g.model_dim() } -> std::convertible_to<Index>;
  g.route(x, ctx, out);
};

/// A bank of `num_experts` networks with the same shape. `forward(e, in, out, scratch)` writes
/// expert `e` applied to every row of `in` `(n, model_dim)` into `out` `(n, model_dim)`;
/// `Scratch` is per-thread workspace the caller keeps alive and reuses.
template <class X>
concept Experts = requires(const X& experts, Index e, const ConstRows<typename X::Scalar>& in,
                           Rows<typename X::Scalar>& out, typename X::Scratch& scratch) {
  typename X::Scalar;
  typename X::Scratch;
  { experts.num_experts() } -> std::convertible_to<Index>;
  { experts.model_dim() } -> std::convertible_to<Index>;
  { experts.hidden_dim() } -> std::convertible_to<Index>;
  /// Parameters of one expert (what one activation of it touches).
  { experts.params_per_expert() } -> std::convertible_to<Index>;
  /// Floating-point operations of one expert on one token (multiply and add count as 2).
  { experts.flops_per_token() } -> std::convertible_to<double>;
  experts.forward(e, in, out, scratch);
};

/// Runs the experts a routing plan asks for and combines their outputs:
/// `y[t] = sum over t's slots of weight * expert(x[t])`, in slot order, and `y[t] = 0` for a
/// token routed nowhere. `Workspace<X>` holds everything reused between calls.
template <class D, class X>
concept Dispatcher = Experts<X> &&
    requires(const D& d, const X& experts, const ConstRows<typename X::Scalar>& x,
             const Routing<typename X::Scalar>& routing, Rows<typename X::Scalar>& y,
             typename D::template Workspace<X>& ws) {
  d.run(experts, x, routing, y, ws);
};

/// An activation policy of the expert bodies (activations.hpp: `Silu`, `Gelu`, `GeluTanh`,
/// `Relu`, or your own): `Act::apply<S>(x)` and its derivative `Act::derivative<S>(x)`,
/// elementwise, one scalar at a time (so a value never depends on its position in a block).
template <class Act, class S>
concept Activation = requires(S x) {
  { Act::template apply<S>(x) } -> std::convertible_to<S>;
  { Act::template derivative<S>(x) } -> std::convertible_to<S>;
};

/// Activation hook: `Act::value_and_derivative<S>(x, value, slope)` writes both at once,
/// sharing work (SiLU's sigmoid); the bodies' backward uses it when present
/// (`activation_value_and_derivative`), else `apply` and `derivative`.
template <class Act, class S>
concept ActivationValueAndDerivativeHook = requires(S x, S& value, S& slope) {
  Act::template value_and_derivative<S>(x, value, slope);
};

// --- parameters and loss gradients -----------------------------------------------------------

/// A parameter tensor and its gradient, as handed to a visitor.
template <class S>
using ParamMap = Eigen::Map<RowMatrix<S>>;

/// Loss-gradient inputs of the softmax-router gates (`TopKGate`, `TopPGate`, `ImportanceGate`
/// and gates built on `SoftmaxRouter`) besides the task's combine-weight gradient. Each span is
/// empty (no such loss) or holds the values below, row-major:
/// - `d_probs` `(num_tokens * num_experts)`: dL/dP on the full clean softmax probabilities
///   `P = softmax(x W_r)`, aligned with `Routing::probs()` (load balance, top-p entropy);
/// - `d_logits` `(num_tokens * num_experts)`: dL/dz on the router logits `z = x W_r` (router
///   z-loss, the `z` part of the noisy load loss);
/// - `d_weights` `(num_assignments)`, routing order: dL/dw from losses on the combine weights
///   (`importance_loss`), added to the task's combine-weight gradient;
/// - `d_noise_logits` `(num_tokens * num_experts)`: dL/dn on the noise logits `n = x W_noise`
///   (`noisy_load_loss`); only a noisy `TopKGate` accepts it.
template <class S>
struct SoftmaxLossGrad {
  std::span<const S> d_probs{};
  std::span<const S> d_logits{};
  std::span<const S> d_weights{};
  std::span<const S> d_noise_logits{};
};

/// No loss-gradient inputs (gates without trainable scores, such as `StochasticGate`).
struct NoLossGrad {};

namespace detail {
/// The visitor signature used in the concepts below.
template <class S>
struct ParamVisitorArchetype {
  void operator()(std::string_view /*name*/, ParamMap<S> /*value*/, ParamMap<S> /*grad*/) const {}
};

template <class G>
struct LossGradOf {
  using type = NoLossGrad;
};
template <class G>
requires requires { typename G::LossGrad; }
struct LossGradOf<G> {
  using type = typename G::LossGrad;
};
}  // namespace detail

/// The loss-gradient input type of gate `G`'s backward: `G::LossGrad`, or `NoLossGrad` when it
/// declares none.
template <class G>
using LossGradOf = typename detail::LossGradOf<G>::type;

/// Something whose parameters can be visited: `m.visit_parameters(f)` calls `f(name, value,
/// grad)` per tensor (a layer, a gate, an expert bank, or a user model that visits several of
/// them): what the optimisers of train/optim.hpp take.
template <class M, class S>
concept ParameterModule = requires(M& m, detail::ParamVisitorArchetype<S> visitor) {
  m.visit_parameters(visitor);
};

// --- training --------------------------------------------------------------------------------

/// A gate that can be trained. `backward(x, ctx, routing, d_weights, loss_grad, dx)` takes the
/// same `x` and `ctx` as the `route` call that produced `routing` (random choices are keyed on
/// `ctx.seed`/`ctx.step`, so they repeat exactly), the gradient of the loss with respect to every
/// combine weight (`d_weights[a]` for assignment `a`, routing order) and the gate's own
/// loss-gradient inputs, accumulates the gradients of its parameters and adds dL/dx into `dx`
/// `(num_tokens, model_dim)`. The selection itself is piecewise constant: it is held fixed,
/// except where a gate defines a surrogate (straight-through for `TopAnyGate`,
/// docs/algorithms.md §4.3; §9.1).
template <class G>
concept TrainableGate = Gate<G> &&
    requires(G& g, const ConstRows<typename G::Scalar>& x, const RouteContext& ctx,
             const Routing<typename G::Scalar>& routing,
             std::span<const typename G::Scalar> d_weights, const typename G::LossGrad& loss_grad,
             Rows<typename G::Scalar> dx,
             detail::ParamVisitorArchetype<typename G::Scalar> visitor) {
  typename G::LossGrad;
  g.backward(x, ctx, routing, d_weights, loss_grad, dx);
  g.zero_grad();
  g.visit_parameters(visitor);
};

/// An expert bank that can be trained.
/// - `cache_width()`: scalars kept per routed row by `forward_train` (the activations backward
///   needs, e.g. `2 * hidden_dim` pre-activations for a GLU expert).
/// - `forward_train(e, in, out, cache, scratch)` (const): `forward`, plus the row cache
///   `(n, cache_width())`.
/// - `backward(e, in, cache, dout, din, scratch)`: given `in` and `cache` from `forward_train`
///   and `dout` = dL/dout `(n, model_dim)`, accumulates expert `e`'s weight gradients and
///   **writes** `din` = dL/din `(n, model_dim)`. Calls for different experts may run
///   concurrently; calls for the same expert must not.
template <class X>
concept TrainableExperts = Experts<X> &&
    requires(X& mx, const X& x, Index e, const ConstRows<typename X::Scalar>& in,
             const ConstRows<typename X::Scalar>& cin, Rows<typename X::Scalar> rows,
             typename X::Scratch& scratch,
             detail::ParamVisitorArchetype<typename X::Scalar> visitor) {
  { x.cache_width() } -> std::convertible_to<Index>;
  x.forward_train(e, in, rows, rows, scratch);
  mx.backward(e, in, cin, in, rows, scratch);
  mx.zero_grad();
  mx.visit_parameters(visitor);
};

/// A dispatcher that can train: `forward_train(experts, x, routing, y, ws)` keeps the expert
/// outputs and caches in `ws`, `backward(experts, x, routing, dy, ws, d_weights, dx)` fills the
/// combine-weight gradients, accumulates the experts' gradients and writes dL/dx (see
/// `GroupedDispatch`).
template <class D, class X>
concept TrainingDispatcher = TrainableExperts<X> &&
    requires(const D& d, X& mx, const X& x, const ConstRows<typename X::Scalar>& in,
             const Routing<typename X::Scalar>& routing, Rows<typename X::Scalar> rows,
             typename D::template Workspace<X>& ws, std::span<typename X::Scalar> d_weights) {
  d.forward_train(x, in, routing, rows, ws);
  d.backward(mx, in, routing, in, ws, d_weights, rows);
};

// --- optional hooks --------------------------------------------------------------------------

/// Gate hook: `on_training_forward(x, routing)`, called by `MoELayer::forward_train` after every
/// training route with the gate input `x` `(num_tokens, model_dim)` and the plan (DynMoE's
/// recording and expert schedule).
template <class G>
concept TrainingForwardHook = requires(G& g, const ConstRows<typename G::Scalar>& x,
                                       const Routing<typename G::Scalar>& routing) {
  g.on_training_forward(x, routing);
};

/// Gate, expert-bank or model hook: `parameters_changed()`, called after the parameters were
/// changed in place (the optimisers' `step`, `MoELayer::parameters_changed`), for parts that
/// keep derived copies (packed kernel weights) or check their values.
template <class M>
concept ParametersChangedHook = requires(M& m) {
  m.parameters_changed();
};

/// Gate hook: adaptive updates of the expert count (DynMoE): `begin_recording()` starts
/// recording the plans, `update_experts()` switches experts on and off from the records and
/// stops recording, `recording()` says whether it records. A training loop may call them
/// itself (for example at epoch ends) for a gate that has them.
template <class G>
concept AdaptiveExpertsHook = requires(G& g, const G& cg) {
  g.begin_recording();
  g.update_experts();
  { cg.recording() } -> std::convertible_to<bool>;
};

/// Expert-bank hook: `check_ready(training)` throws `moet::Error` when the bank cannot run
/// `forward` (`training = false`) or `forward_train` / `backward` (`true`) now; the dispatchers
/// call it before their parallel regions, so that nothing throws inside one.
template <class X>
concept ReadinessHook = requires(const X& x, bool training) {
  x.check_ready(training);
};

/// Expert-bank hook: `reserve(scratch, max_rows)` grows a thread's `Scratch` for blocks of up to
/// `max_rows` rows before a parallel region, so that a warmed-up workspace never allocates.
template <class X>
concept ScratchReserveHook = requires(const X& x, typename X::Scratch& scratch, Index rows) {
  x.reserve(scratch, rows);
};

/// Expert-bank hook: `ensure_grad()` allocates the gradients (zero) if they are not yet; the
/// training dispatcher calls it before experts' backward calls run concurrently.
template <class X>
concept LazyGradientHook = requires(X& x) {
  x.ensure_grad();
};

/// Expert-bank hook: the packed forward in two stages over column panels, so that threads can
/// share one expert when a call has fewer tasks than threads (decode with few experts).
/// `stage_panels(stage)` gives the panels of stage 0 (the hidden activations) or 1 (the
/// output), 0 when the staged forward is unavailable now; `forward_stage(stage, e, in, out,
/// panels, scratch)` writes the columns of `panels` of that stage (stage 0: `in` `(n,
/// model_dim)`, `out` `(n, hidden_dim)`; stage 1: `in` `(n, hidden_dim)`, `out` `(n,
/// model_dim)`), and both stages over any split of their panels must give `forward`'s bits.
template <class X>
concept ColumnSplitHook = requires(const X& x, int stage, Index e,
                                   const ConstRows<typename X::Scalar>& in,
                                   Rows<typename X::Scalar> out, PanelRange panels,
                                   typename X::Scratch& scratch) {
  { x.stage_panels(stage) } -> std::convertible_to<Index>;
  { x.hidden_dim() } -> std::convertible_to<Index>;
  x.forward_stage(stage, e, in, out, panels, scratch);
};

/// Expert-bank hook: the backward in thread-count-independent pieces, so that every core works
/// however few experts got rows (a hot expert, two experts) while each weight gradient stays one
/// sum over the expert's rows in order. `backward_split_products()` is the number `P` of
/// weight-gradient products `dW = A^T B` of an expert (0 when the split is unavailable now: the
/// dispatcher then calls `backward`); `backward_split_width()` the scalars per routed row that the
/// row pieces keep for them; `backward_grad_rows(p)` the rows of product `p`'s gradient. Per
/// expert with rows, `backward_prepare(e)` runs once (no other call for `e` concurrently) and
/// returns whether its gradients accumulate (false: the first products since `zero_grad` write
/// them). Then, per block of rows, `backward_rows(e, in, cache, dout, din, rows, scratch)` writes
/// `din` and the kept `rows` `(n, backward_split_width())`, and `backward_pack(e, p, dout, rows,
/// pack)` packs each product's `B` for the block (`backward_reserve_pack(p, rows, pack)` sizes
/// a pack beforehand). Then, per slice `[begin, end)` of a
/// product's gradient rows, `backward_weights(e, p, in, dout, rows, pack, begin, end, accumulate,
/// scratch)` for every block in order. Calls for different pieces may run concurrently.
template <class X>
concept BackwardSplitHook = requires(X& x, const X& cx, Index e, int p, bool accumulate,
                                     const ConstRows<typename X::Scalar>& in,
                                     Rows<typename X::Scalar> out, typename X::BackwardPack& pack,
                                     const typename X::BackwardPack& cpack,
                                     typename X::Scratch& scratch) {
  { cx.backward_split_products() } -> std::convertible_to<int>;
  { cx.backward_split_width() } -> std::convertible_to<Index>;
  { cx.backward_grad_rows(p) } -> std::convertible_to<Index>;
  { x.backward_prepare(e) } -> std::convertible_to<bool>;
  x.backward_rows(e, in, in, in, out, out, scratch);
  cx.backward_reserve_pack(p, e, pack);
  x.backward_pack(e, p, in, in, pack);
  x.backward_weights(e, p, in, in, in, cpack, e, e, accumulate, scratch);
};

/// Which optional hooks a type has, declared as `static constexpr moet::Hooks kHooks{...};`.
/// Declaring is optional but recommended: a declared hook that the type does not satisfy
/// (a misspelt name, a wrong signature) and a hook-named member left undeclared are compile
/// errors (`HookCheck`).
///
/// ```cpp
/// template <class S>
/// class MyGate {
///  public:
///   static constexpr moet::Hooks kHooks{.training_forward = true};
///   void on_training_forward(const moet::ConstRows<S>& x, const moet::Routing<S>& routing);
///   ...
/// };
/// ```
struct Hooks {
  /// `TrainingForwardHook`: `on_training_forward(x, routing)`.
  bool training_forward = false;
  /// `ParametersChangedHook`: `parameters_changed()`.
  bool parameters_changed = false;
  /// `AdaptiveExpertsHook`: `begin_recording()`, `update_experts()`, `recording()`.
  bool adaptive_experts = false;
  /// `ReadinessHook`: `check_ready(training)`.
  bool check_ready = false;
  /// `ScratchReserveHook`: `reserve(scratch, max_rows)`.
  bool reserve = false;
  /// `LazyGradientHook`: `ensure_grad()`.
  bool ensure_grad = false;
  /// `ColumnSplitHook`: `stage_panels(stage)`, `forward_stage(stage, e, in, out, panels, scratch)`.
  bool column_split = false;
  /// `BackwardSplitHook`: `backward_split_products()`, `backward_prepare(e)`, `backward_rows`,
  /// `backward_pack`, `backward_weights`, ...
  bool backward_split = false;
};

namespace detail {
template <class T>
concept DeclaresHooks = requires {
  { T::kHooks } -> std::convertible_to<Hooks>;
};
template <class T>
constexpr Hooks declared_hooks() {
  if constexpr (DeclaresHooks<T>) {
    return T::kHooks;
  } else {
    return Hooks{};
  }
}
// "T has a member with the hook's name" (a single, non-template member function or data
// member; an overloaded name is not seen here, so only its declaration in kHooks checks it).
template <class T>
concept NamesTrainingForward = requires {
  &T::on_training_forward;
};
template <class T>
concept NamesParametersChanged = requires {
  &T::parameters_changed;
};
template <class T>
concept NamesAdaptiveExperts = requires {
  &T::update_experts;
}
|| requires { &T::begin_recording; };
template <class T>
concept NamesCheckReady = requires {
  &T::check_ready;
};
template <class T>
concept NamesReserve = requires {
  &T::reserve;
};
template <class T>
concept NamesEnsureGrad = requires {
  &T::ensure_grad;
};
template <class T>
concept NamesColumnSplit = requires {
  &T::forward_stage;
}
|| requires { &T::stage_panels; };
template <class T>
concept NamesBackwardSplit = requires {
  &T::backward_split_products;
}
|| requires { &T::backward_prepare; };

// Whether moet calls the hook: declared (kHooks), or, without kHooks, satisfied.
constexpr bool uses_hook(bool declares, bool declared, bool satisfied) {
  return declares ? declared : satisfied;
}
}  // namespace detail

/// The compile-time check of `T`'s optional hooks, and which of them moet calls (`kTrainingForward`
/// ...). Instantiated by `MoELayer` for its gate and expert banks and by every caller of a hook,
/// so a hook that would be skipped silently is a compile error that says why.
template <class T>
struct HookCheck {
 private:
  static constexpr bool kDeclares = detail::DeclaresHooks<T>;
  static constexpr Hooks kDeclared = detail::declared_hooks<T>();

 public:
  static_assert(!kDeclares || !kDeclared.training_forward || TrainingForwardHook<T>,
                "this type declares kHooks.training_forward, but has no on_training_forward(x, "
                "routing) callable with a ConstRows<Scalar> and a const Routing<Scalar>&: is the "
                "name misspelt or the signature wrong?");
  static_assert(!detail::NamesTrainingForward<T> || TrainingForwardHook<T>,
                "this type has a member named on_training_forward that cannot be called as "
                "on_training_forward(x, routing) with a ConstRows<Scalar> and a const "
                "Routing<Scalar>&, so moet would skip it: fix its signature");
  static_assert(!kDeclares || kDeclared.training_forward || !detail::NamesTrainingForward<T>,
                "this type has on_training_forward but its kHooks does not declare it: add "
                ".training_forward = true to kHooks");

  static_assert(!kDeclares || !kDeclared.parameters_changed || ParametersChangedHook<T>,
                "this type declares kHooks.parameters_changed, but has no parameters_changed() "
                "callable on a non-const object: is the name misspelt or the signature wrong?");
  static_assert(!detail::NamesParametersChanged<T> || ParametersChangedHook<T>,
                "this type has a member named parameters_changed that cannot be called as "
                "parameters_changed() on a non-const object, so moet would skip it: fix its "
                "signature");
  static_assert(!kDeclares || kDeclared.parameters_changed || !detail::NamesParametersChanged<T>,
                "this type has parameters_changed but its kHooks does not declare it: add "
                ".parameters_changed = true to kHooks");

  static_assert(!kDeclares || !kDeclared.adaptive_experts || AdaptiveExpertsHook<T>,
                "this type declares kHooks.adaptive_experts, but lacks begin_recording(), "
                "update_experts() or a const recording(): is a name misspelt?");
  static_assert(!detail::NamesAdaptiveExperts<T> || AdaptiveExpertsHook<T>,
                "this type has update_experts or begin_recording but not the whole adaptive "
                "hook (begin_recording(), update_experts() and a const recording() returning "
                "bool): complete or rename it");
  static_assert(!kDeclares || kDeclared.adaptive_experts || !detail::NamesAdaptiveExperts<T>,
                "this type has update_experts or begin_recording but its kHooks does not declare "
                "them: add .adaptive_experts = true to kHooks");

  static_assert(!kDeclares || !kDeclared.check_ready || ReadinessHook<T>,
                "this type declares kHooks.check_ready, but has no const check_ready(bool "
                "training): is the name misspelt or the signature wrong?");
  static_assert(!detail::NamesCheckReady<T> || ReadinessHook<T>,
                "this type has a member named check_ready that cannot be called as "
                "check_ready(training) on a const object, so moet would skip it: fix its "
                "signature");
  static_assert(!kDeclares || kDeclared.check_ready || !detail::NamesCheckReady<T>,
                "this type has check_ready but its kHooks does not declare it: add "
                ".check_ready = true to kHooks");

  static_assert(!kDeclares || !kDeclared.reserve || ScratchReserveHook<T>,
                "this type declares kHooks.reserve, but has no const reserve(Scratch&, Index "
                "max_rows): is the name misspelt or the signature wrong?");
  static_assert(!kDeclares || kDeclared.reserve || !detail::NamesReserve<T>,
                "this type has reserve but its kHooks does not declare it: add .reserve = true "
                "to kHooks");

  static_assert(!kDeclares || !kDeclared.ensure_grad || LazyGradientHook<T>,
                "this type declares kHooks.ensure_grad, but has no ensure_grad() callable on a "
                "non-const object: is the name misspelt or the signature wrong?");
  static_assert(!detail::NamesEnsureGrad<T> || LazyGradientHook<T>,
                "this type has a member named ensure_grad that cannot be called as "
                "ensure_grad() on a non-const object, so moet would skip it: fix its signature");
  static_assert(!kDeclares || kDeclared.ensure_grad || !detail::NamesEnsureGrad<T>,
                "this type has ensure_grad but its kHooks does not declare it: add "
                ".ensure_grad = true to kHooks");

  static_assert(!kDeclares || !kDeclared.column_split || ColumnSplitHook<T>,
                "this type declares kHooks.column_split, but lacks a const stage_panels(int), "
                "hidden_dim() or forward_stage(stage, e, in, out, panels, scratch): is a name "
                "misspelt or a signature wrong?");
  static_assert(!detail::NamesColumnSplit<T> || ColumnSplitHook<T>,
                "this type has forward_stage or stage_panels but not the whole column-split hook "
                "(const stage_panels(int), hidden_dim(), forward_stage(stage, e, in, out, "
                "panels, scratch)): complete or rename it");
  static_assert(!kDeclares || kDeclared.column_split || !detail::NamesColumnSplit<T>,
                "this type has forward_stage or stage_panels but its kHooks does not declare "
                "them: add .column_split = true to kHooks");

  static_assert(!kDeclares || !kDeclared.backward_split || BackwardSplitHook<T>,
                "this type declares kHooks.backward_split, but lacks one of "
                "backward_split_products(), backward_split_width(), backward_grad_rows(p), "
                "backward_prepare(e), backward_rows, backward_pack or backward_weights with the "
                "signatures of BackwardSplitHook: is a name misspelt or a signature wrong?");
  static_assert(!detail::NamesBackwardSplit<T> || BackwardSplitHook<T>,
                "this type has backward_split_products or backward_prepare but not the whole "
                "backward-split hook (BackwardSplitHook): complete or rename it");
  static_assert(!kDeclares || kDeclared.backward_split || !detail::NamesBackwardSplit<T>,
                "this type has backward_split_products or backward_prepare but its kHooks does "
                "not declare them: add .backward_split = true to kHooks");

  /// True once the checks above passed (naming it instantiates them).
  static constexpr bool kChecked = true;
  /// Whether moet calls each hook of `T` (declared in `kHooks`, or, without `kHooks`, present).
  static constexpr bool kTrainingForward =
      detail::uses_hook(kDeclares, kDeclared.training_forward, TrainingForwardHook<T>);
  static constexpr bool kParametersChanged =
      detail::uses_hook(kDeclares, kDeclared.parameters_changed, ParametersChangedHook<T>);
  static constexpr bool kAdaptiveExperts =
      detail::uses_hook(kDeclares, kDeclared.adaptive_experts, AdaptiveExpertsHook<T>);
  static constexpr bool kCheckReady =
      detail::uses_hook(kDeclares, kDeclared.check_ready, ReadinessHook<T>);
  static constexpr bool kReserve =
      detail::uses_hook(kDeclares, kDeclared.reserve, ScratchReserveHook<T>);
  static constexpr bool kEnsureGrad =
      detail::uses_hook(kDeclares, kDeclared.ensure_grad, LazyGradientHook<T>);
  static constexpr bool kColumnSplit =
      detail::uses_hook(kDeclares, kDeclared.column_split, ColumnSplitHook<T>);
  static constexpr bool kBackwardSplit =
      detail::uses_hook(kDeclares, kDeclared.backward_split, BackwardSplitHook<T>);
};

/// Calls `module.parameters_changed()` when `module` has that hook (see `HookCheck`): what the
/// optimisers do after every step, and `MoELayer::parameters_changed` for its parts.
template <class M>
void notify_parameters_changed(M& module) {
  if constexpr (HookCheck<M>::kParametersChanged) module.parameters_changed();
}

}  // namespace moet
