#pragma once
/// \file experts/bank.hpp
/// `ExpertBank<S, Body>`: one bank of `num_experts` expert networks of the same shape, written
/// once for every expert body. The body (`GluBody<Act>` in glu.hpp, `FfnBody<Act>` in ffn.hpp)
/// is a small policy that lists its tensors and computes one expert (Eigen and packed forward,
/// `forward_train`, `backward`); the bank owns the storage, the initialisation, the packed
/// kernel copies, the checks, the setters and `edit()`, the gradients, the parameter visit and
/// the inference-only mode (the storage and the rules that keep it valid are
/// detail/bank_store.hpp's `BankStore`; this file is the API). `GluExperts`, `SwiGluExperts`,
/// `GeGluExperts` and `FfnExperts` are aliases of it.
///
/// Weights (the design, in one place):
/// - **Layout.** Expert `e`'s tensors are stored in moet's `(in, out)` layout (`y = x W`),
///   stacked row-wise: one contiguous row-major `(num_experts * in, out)` matrix per tensor.
/// - **Reading** hands out fixed-shape read-only views (`Eigen::Map<const ...>`): `tensor(t,
///   e)`, `stack(t)` and the body's named accessors (`gate_weights(e)`, `in_bias(e)`, ...).
///   Nothing hands out a resizable matrix or a writable view outside `edit()`.
/// - **Writing** goes through `set_tensor(t, e, w, layout)` and the body's named setters
///   (`set_gate_weights(e, w, layout)`, ...), which take moet's `(in, out)` or PyTorch's
///   `[out, in]` (`WeightLayout`), check the shape (a `moet::Error` naming the bank, setter,
///   expert, both shapes and the layout, "looks transposed" when it is) and finiteness, store
///   the weights and repack that one tensor; or through a scoped `edit()` whose views are
///   writable and which checks and repacks what it handed out when it ends. While the packed
///   copy is stale `forward` throws (`check_ready`): it never falls back to a slower path.
/// - **Optimisers** keep concepts.hpp's training protocol: `visit_parameters(f)` hands out the
///   stacks (and marks the packed copy stale), then `parameters_changed()` checks that every
///   weight is finite and repacks. A NaN or Inf is rejected by every writer: `set_*` (nothing
///   stored), the end of `edit()` and `parameters_changed()` (both throw and leave the bank
///   refusing to run until the value is fixed and `parameters_changed()` passes).
/// - **Initialisation** (`Options::init`): `kRandom` (the default: normal with standard
///   deviation `1 / sqrt(fan_in)`, each tensor kind from its own `detail::Rng` stream keyed on
///   `init_seed`; biases 0), `kZeros`, or `kNone` for loaders (nothing drawn; `forward` and
///   `forward_train` throw, naming the first expert and tensor not set yet, until every tensor
///   of every expert was set).
/// - **Inference-only** (`Options::inference_only`, float banks with `pack_weights`): no float
///   weight stacks and no gradients, only the packed copies (f32 or bf16) plus the small bias
///   rows; `set_*` packs straight from the caller's matrix (through at most one expert-tensor
///   temporary, for a layout or storage order that needs it), so the resident weights are the
///   packed bytes (tests/test_expert_weights.cpp measures the RSS). The training members
///   (`forward_train`, `backward`, `zero_grad`, `ensure_grad`, `visit_parameters`, `edit`) and
///   reading a packed weight throw `moet::Error` naming the mode.
/// - **Double banks and `pack_weights = false`** run Eigen's products on the stacks by design
///   (no packed copy, nothing can be stale).
///
/// `forward` is `const` and keeps its intermediates in the caller's `Scratch`, so one bank
/// serves any number of threads, each with its own scratch; a warmed-up scratch does not
/// allocate again for blocks up to the largest it has seen. Packed kernels (float banks with
/// `pack_weights`, the default) never allocate and give each row bits independent of the other
/// rows of the block; with `weight_format = kBf16` the packed copies hold the weights rounded
/// to bf16 (weight_format.hpp) while the float stacks stay the trainable weights.
///
/// \tparam S scalar type (float or double).
/// \tparam Body the expert body policy (`GluBody<Act>`, `FfnBody<Act>`).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/detail/bank_store.hpp"
#include "moet/detail/expert_bank.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

namespace moet {

/// A bank of `num_experts` experts with the body `Body` (see the file comment for the weight
/// API). Use it through its aliases:
///
/// ```cpp
/// moet::SwiGluExperts<float> experts({.model_dim = 512, .hidden_dim = 1024, .num_experts = 8});
/// loader.set_gate_weights(e, w1, moet::WeightLayout::kOutIn);  // PyTorch [out, in]
/// ```
///
/// \tparam S scalar type (float or double).
/// \tparam Body the expert body policy: its `Tensor` enum and `kTensors` table, `Scratch<S>`,
///   `Packed<W>`, the per-expert computations, and the `Views` / `Members` mixins that give the
///   tensors their names (`gate_weights(e)`, `set_gate_weights(e, w, layout)`, `gate_grad()`).
template <class S, class Body>
class ExpertBank : public Body::template Views<ExpertBank<S, Body>>,
                   public Body::template Members<ExpertBank<S, Body>> {
 public:
  using Scalar = S;
  using BodyType = Body;
  using Activation = typename Body::Activation;
  /// The body's tensor ids (`GluTensor`, `FfnTensor`).
  using Tensor = typename Body::Tensor;
  /// Per-thread workspace of `forward`, `forward_train` and `backward`.
  using Scratch = typename Body::template Scratch<S>;
  /// A bias row viewed in place, read-only, and writable (inside `edit()`).
  using ConstBiasMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  using BiasMap = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  /// Tensors per expert (biases included, present or not).
  static constexpr std::size_t kNumTensors = Body::kTensors.size();
  /// The optional hooks the bank has (concepts.hpp): the dispatchers call `check_ready`,
  /// `reserve`, `ensure_grad` and the staged forward (`column_split`), the optimisers
  /// `parameters_changed`.
  static constexpr Hooks kHooks{.parameters_changed = true,
                                .check_ready = true,
                                .reserve = true,
                                .ensure_grad = true,
                                .column_split = true,
                                .backward_split = true};

  /// Construction options. Designated initialisers must keep this order.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Width of the hidden layer, `f` (>= 1).
    Index hidden_dim = 0;
    /// Experts in the bank (>= 1).
    Index num_experts = 0;
    /// Whether the body's layers have biases (FFN: `b1`, `b2`, on by default; GLU bodies have
    /// none and reject `true`).
    bool bias = Body::kDefaultBias;
    /// How the weights start: random (default), zeros, or none (for loaders).
    WeightInit init = WeightInit::kRandom;
    /// Seed of the random initialisation.
    std::uint64_t init_seed = 0;
    /// Keep packed copies of the weights for the packed kernels (float banks only).
    bool pack_weights = true;
    /// Element type of the packed copies: `kBf16` needs a float bank with `pack_weights`.
    WeightFormat weight_format = WeightFormat::kF32;
    /// Keep only the packed copies (no float weights, no training): the resident weights are
    /// the packed bytes. Needs a float bank with `pack_weights`.
    bool inference_only = false;
  };

  class Edit;

  /// Builds the bank and initialises its weights (`Options::init`). Throws `moet::Error`
  /// unless `model_dim`, `hidden_dim` and `num_experts` are >= 1; for `WeightFormat::kBf16` or
  /// `inference_only` on a double bank or without `pack_weights`; and for `bias = true` on a
  /// body without biases.
  explicit ExpertBank(const Options& options)
      : options_(checked(options)),
        store_({options.model_dim, options.hidden_dim, options.num_experts, options.bias,
                options.inference_only, options.init, options.init_seed},
               options.pack_weights, options.weight_format) {}

  // --- sizes ----------------------------------------------------------------------------------

  /// Experts in the bank.
  Index num_experts() const { return options_.num_experts; }
  /// Width of a token, `d`.
  Index model_dim() const { return options_.model_dim; }
  /// Width of the hidden layer, `f`.
  Index hidden_dim() const { return options_.hidden_dim; }
  /// Whether the layers have biases (always false for GLU bodies).
  bool has_bias() const { return options_.bias; }
  /// Whether the bank keeps only the packed weights (`Options::inference_only`).
  bool inference_only() const { return options_.inference_only; }
  /// The options the bank was built with.
  const Options& options() const { return options_; }
  /// Parameters of one expert (biases included).
  Index params_per_expert() const {
    return Body::params_per_expert(model_dim(), hidden_dim(), has_bias());
  }
  /// FLOPs of one expert on one token: its products, `2 * in * out` each (elementwise work,
  /// activations and bias adds are not counted).
  double flops_per_token() const { return Body::flops_per_token(model_dim(), hidden_dim()); }
  /// Bytes of the packed kernel copies (padding included; 0 without them), the backward's
  /// transposed packs included (made per expert by its first packed `backward`; bf16 for a bf16
  /// bank, float otherwise).
  std::size_t packed_bytes() const {
    std::size_t bytes = store_.transposed_bytes();
    store_.packed.for_each([&](const auto& copy) { bytes += Body::packed_bytes(copy); });
    return bytes;
  }

  // --- reading --------------------------------------------------------------------------------

  /// Expert `e`'s tensor `t`, `(in, out)` (a bias is `(1, out)`), a read-only view into the
  /// stack. Throws `moet::Error` for an expert out of range, a bias of a bank without biases,
  /// and a packed weight of an inference-only bank (it has no float copy).
  Eigen::Map<const RowMatrix<S>> tensor(Tensor t, Index e) const {
    store_.require_readable("tensor", t);
    store_.require_expert("tensor", t, e);
    return store_.block(t, e);
  }

  /// The stack of tensor `t`, `(num_experts * in, out)` (biases `(num_experts, out)`, or
  /// `(0, out)` without biases), read-only. Throws like `tensor` for a packed weight of an
  /// inference-only bank.
  Eigen::Map<const RowMatrix<S>> stack(Tensor t) const {
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    detail::require(!inference_only() || spec.bias, kName, "stack: an inference_only bank keeps ",
                    "its ", spec.label, " only packed for the kernels (no float copy to read)");
    const RowMatrix<S>& s = store_.values[index(t)];
    return Eigen::Map<const RowMatrix<S>>(s.data(), s.rows(), s.cols());
  }

  /// Tensor `t`'s gradient, shaped like its stack (empty until allocated, or if inference-only).
  const RowMatrix<S>& grad(Tensor t) const { return store_.grads.materialised(index(t)); }

  // --- writing --------------------------------------------------------------------------------

  /// Sets expert `e`'s tensor `t` from `w`, given in `layout`: `(in, out)` for
  /// `WeightLayout::kInOut`, `[out, in]` for `kOutIn` (PyTorch's `nn.Linear.weight`). A bias
  /// takes any vector of `out` values (the layout does not apply). Checks everything before
  /// changing anything: throws `moet::Error` naming the bank, the setter, the expert, the
  /// expected and the given shape and the layout ("looks transposed" when `w` has the other
  /// layout's shape), or the first NaN/Inf (row, column, value). Then stores the tensor and
  /// repacks it when the packed copy is current (an inference-only bank packs `w` directly).
  /// Not while an `edit()` is open. Setters (`set_tensor`, `set_tensor_blocks` and the named
  /// ones) of *different* experts may run concurrently (a loader packs experts in parallel);
  /// nothing else may run on the bank meanwhile.
  ///
  /// ```cpp
  /// bank.set_tensor(moet::GluTensor::kDown, e, w2, moet::WeightLayout::kOutIn);
  /// ```
  template <class Derived>
  void set_tensor(Tensor t, Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    static_assert(std::is_same_v<typename Derived::Scalar, S>,
                  "set_tensor takes a matrix of the bank's Scalar type: cast it first "
                  "(w.template cast<float>())");
    store_.set_tensor(t, e, w, layout);
  }

  /// Sets expert `e`'s weight tensor `t` from ready blocks of ggml's block format `Block`
  /// (`detail::BlockQ8_0`, `BlockQ4_0`, `BlockQ4_1`), laid out as GGUF stores a weight `[out,
  /// in]`: `out` rows of `ceil(in / 32)` blocks (a slice of llama.cpp's `ffn_gate_exps`, `[n_ff]`
  /// rows of `n_embd / 32` blocks). The bank's `weight_format` must be the blocks' format: the
  /// blocks are packed as they are, never re-quantised (`PackedMatrix::pack_blocks`). A training
  /// bank also stores their dequantised values as its float weights. Throws `moet::Error`
  /// naming the bank, the expert and the tensor (nothing changed) for a bias, another format, a
  /// wrong block count or a non-finite block scale. Not while an `edit()` is open.
  ///
  /// ```cpp
  /// bank.set_tensor_blocks(moet::GluTensor::kGate, e, gguf.tensor(name).slice(e)
  ///                                                       .blocks<moet::detail::BlockQ8_0>());
  /// ```
  template <class Block>
  void set_tensor_blocks(Tensor t, Index e, std::span<const Block> blocks) {
    store_.set_tensor_blocks(t, e, blocks, options_.weight_format);
  }

  /// Opens a scoped edit of a training bank: the returned handle hands out writable
  /// fixed-shape views (`tensor(t, e)`, `stack(t)` and the body's named accessors), and when it
  /// ends (`commit()`, or its destructor) the bank checks that what it handed out is finite and
  /// repacks it. Until then `forward`, `forward_train`, `backward`, `set_*`, `visit_parameters`
  /// and `parameters_changed` throw. A non-finite value at the end is a `moet::Error` from
  /// `commit()` (a destructor cannot throw: then the next `forward` or `forward_train` throws
  /// it), and the bank refuses to run until the value is fixed and `parameters_changed()`
  /// passes. Do not move or copy the bank while the edit is open. Throws `moet::Error` for an
  /// inference-only bank or when an edit is already open.
  ///
  /// ```cpp
  /// {
  ///   auto edit = bank.edit();
  ///   edit.down_weights(1) *= 2.0f;  // writable (hidden_dim, model_dim) view
  /// }                                // checked and repacked here
  /// ```
  Edit edit() {
    store_.begin_edit();
    return Edit(this);
  }

  /// Tells the bank that its weights changed in place (after `visit_parameters`; the optimisers
  /// of train/optim.hpp call it after every step): checks that every weight is finite, then
  /// rebuilds the packed copies and makes `forward` run again. On a NaN or Inf it throws
  /// `moet::Error` naming the tensor, expert, row, column and value, and the bank refuses to
  /// run until a later call passes. A no-op for an inference-only bank (only `set_*` writes
  /// it). Throws while an `edit()` is open.
  void parameters_changed() {
    if (inference_only()) return;
    detail::require(!store_.editing.value, kName,
                    "parameters_changed: an edit() of this bank is open: end it (it repacks)");
    store_.check_and_repack("parameters_changed");
  }

  /// True when `forward` runs the packed kernels: a float bank with `pack_weights` whose packed
  /// copy is current.
  bool uses_packed_kernels() const { return store_.packed.current(); }

  /// Throws `moet::Error` naming the bank and the reason when `forward` (`training = false`)
  /// or `forward_train` / `backward` (`training = true`) cannot run now: a tensor never set
  /// (`WeightInit::kNone`; names the first expert and tensor), a NaN/Inf found by the end of an
  /// `edit()` or by `parameters_changed()`, an open `edit()`, a stale packed copy (after
  /// `visit_parameters`, until `parameters_changed()`; `forward` only), or an inference-only
  /// bank (training only). `forward` and the training members check this themselves; the
  /// dispatchers call it before their parallel regions, so that nothing throws inside one.
  void check_ready(bool training) const {
    store_.require_ready(training ? "forward_train" : "forward", training);
  }

  // --- inference ------------------------------------------------------------------------------

  /// Grows `scratch` for blocks of up to `max_rows` rows, so that `forward` on such blocks does
  /// not allocate. Optional: `forward` grows the scratch itself when needed.
  void reserve(Scratch& scratch, Index max_rows) const {
    Body::reserve(scratch, max_rows, model_dim(), hidden_dim(), options_.weight_format);
    store_.packed.reserve(scratch.kernel, max_rows, model_dim(), hidden_dim());
  }

  /// Writes expert `e` applied to every row of `in` `(n, model_dim)` into `out`
  /// `(n, model_dim)`: the packed kernels when the bank has them, Eigen's products otherwise
  /// (double banks, `pack_weights = false`). Throws `moet::Error` when `check_ready(false)`
  /// does. Preconditions (the dispatchers check them before calling; asserted in debug builds):
  /// `0 <= e < num_experts()`, the shapes above, `out` does not overlap `in`.
  void forward(Index e, const ConstRows<S>& in, Rows<S> out, Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "ExpertBank::forward shape mismatch");
    store_.require_ready("forward", false);
    if (in.rows() == 0) return;
    const ExpertRef x{store_, e};
    const auto packed = [&](const auto& p) { Body::forward_packed(x, p, in, out, scratch); };
    if (!store_.packed.run(e, packed)) Body::forward(x, in, out, scratch);
  }

  /// Column panels of stage `stage` (0: hidden activations, 1: output) of the packed forward;
  /// 0 when `forward` would not run the packed kernels now (then it runs alone or throws).
  Index stage_panels(int stage) const {
    Index panels = 0;
    if (num_experts() > 0 && store_.ready(false)) {
      store_.packed.run(0, [&](const auto& p) { panels = Body::stage_panels(p, stage); });
    }
    return panels;
  }

  /// One stage of `forward` on some column panels, so that threads can share one expert's
  /// columns when a call has fewer (expert, row block) tasks than threads (decode): stage 0
  /// writes the columns of panels `panels` of the hidden activations `out` `(n, hidden_dim())`
  /// from `in` `(n, model_dim())`; stage 1 writes those of the output `out` `(n, model_dim())`
  /// from the hidden activations `in`. Running stage 0 over all panels, then stage 1 over all
  /// panels, gives `forward`'s bits exactly, however the panels are split. Preconditions:
  /// `stage_panels(stage) > 0`, the shapes above, `panels` within `[0, stage_panels(stage))`,
  /// `out` does not overlap `in`; the scratch's `reserve` holds for `n` rows.
  void forward_stage(int stage, Index e, const ConstRows<S>& in, Rows<S> out, PanelRange panels,
                     Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.rows() == out.rows() && in.cols() == (stage == 0 ? model_dim() : hidden_dim()) &&
                    out.cols() == (stage == 0 ? hidden_dim() : model_dim()),
                "ExpertBank::forward_stage shape mismatch");
    if (in.rows() == 0) return;
    const ExpertRef x{store_, e};
    const bool packed = store_.packed.run(e, [&](const auto& p) {
      Body::forward_stage_packed(x, p, stage, in, out, panels, scratch);
    });
    detail::require(packed, "ExpertBank::forward_stage", "the bank has no current packed weights");
  }

  // --- training (concepts.hpp's `TrainableExperts`) -----------------------------------------

  /// Scalars `forward_train` keeps per routed row (the body's activations for `backward`).
  Index cache_width() const { return Body::cache_width(model_dim(), hidden_dim()); }

  /// `forward`, plus the row cache `cache` `(n, cache_width())` that `backward` needs: on a
  /// current f32 or bf16 packed copy, with `forward`'s bits; else Eigen's products on the float
  /// weights (double banks, no packing, block formats, a stale copy). Throws when
  /// `check_ready(true)` does. As `forward`, and `cache` has `n` rows and overlaps neither.
  void forward_train(Index e, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                     Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "ExpertBank::forward_train shape mismatch");
    MOET_ASSERT(cache.rows() == in.rows() && cache.cols() == cache_width(),
                "ExpertBank::forward_train cache shape mismatch");
    store_.require_ready("forward_train", true);
    if (in.rows() == 0) return;
    const ExpertRef x{store_, e};
    bool done = false;
    store_.packed.run(e, [&](const auto& p) {
      done = Body::forward_train_packed(x, p, in, out, cache, scratch);
    });
    if (!done) Body::forward_train(x, in, out, cache, scratch);
  }

  /// Backward of expert `e` on `n` rows: `in` and `cache` as given to / written by
  /// `forward_train`, `dout` = dL/dout `(n, model_dim)`. Accumulates expert `e`'s gradients
  /// (the body's formulas; the first call since `zero_grad` writes them) and **writes** `din` =
  /// dL/din `(n, model_dim)`: packed kernels on the float weights packed transposed per version
  /// (`detail::TransposedPacks`; a bf16 bank packs them as bf16 and runs every backward product
  /// on bf16 operands, float accumulation) when the packed copy is current, else Eigen's. Allocates
  /// on first use (call `zero_grad()` first when calls for different experts run concurrently;
  /// never two for one expert). Deterministic: each product's result depends only on its
  /// operands' shapes and values. Throws like `forward_train`.
  void backward(Index e, const ConstRows<S>& in, const ConstRows<S>& cache,
                const ConstRows<S>& dout, Rows<S> din, Scratch& scratch) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && cache.rows() == in.rows() &&
                    cache.cols() == cache_width() && dout.rows() == in.rows() &&
                    dout.cols() == model_dim() && din.rows() == in.rows() &&
                    din.cols() == model_dim(),
                "ExpertBank::backward shape mismatch");
    store_.require_ready("backward", true);
    ensure_grad();
    if (in.rows() == 0) return;
    const bool fresh = store_.grads.take_pending(e);
    if constexpr (std::is_same_v<S, float>) {
      if (store_.run_backward_packs(e, [&](const auto& packs) {
            Body::backward_packed(ExpertRef{store_, e}, GradRef{store_, e}, packs, in, cache, dout,
                                  din, !fresh, scratch);
          })) {
        return;
      }
    }
    if (fresh) store_.grads.zero_expert(e);
    Body::backward(ExpertRef{store_, e}, GradRef{store_, e}, in, cache, dout, din, scratch);
  }

  // --- the split backward (concepts.hpp's `BackwardSplitHook`) -------------------------------

  /// The packed `B` operand of one weight-gradient product for one block of an expert's rows.
  using BackwardPack = detail::BackwardRows;

  /// Weight-gradient products per expert of the split backward (`Body::kSplitProducts`), or 0
  /// when it cannot run now (double banks, no packing, a stale packed copy): the dispatcher then
  /// calls `backward`. `backward`'s formulas and products; every weight gradient one chain over
  /// the expert's rows in order, as `backward` on all of them in one call.
  int backward_split_products() const {
    if constexpr (std::is_same_v<S, float>) {
      return store_.packed.current() ? static_cast<int>(Body::kSplitProducts.size()) : 0;
    } else {
      return 0;
    }
  }
  /// Scalars per routed row that `backward_rows` keeps (`Body::split_width`).
  Index backward_split_width() const { return Body::split_width(model_dim(), hidden_dim()); }
  /// Rows of product `p`'s weight gradient (the slices of `backward_weights` split them).
  Index backward_grad_rows(int p) const {
    return store_.rows(Body::kSplitProducts[static_cast<std::size_t>(p)].tensor);
  }

  /// Once per expert with rows, before its other split calls, and never concurrently with
  /// another call for `e`: repacks `e`'s transposed weights if they changed, and returns whether
  /// its gradients accumulate (false for the first backward since `zero_grad`: written then).
  /// Allocates the gradients on first use. Throws like `backward`.
  bool backward_prepare(Index e) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    store_.require_ready("backward", true);
    ensure_grad();
    const bool current = store_.run_backward_packs(e, [](const auto& /*packs*/) {});
    detail::require(current, "ExpertBank::backward_prepare",
                    "the split backward needs current packed weights (backward_split_products() "
                    "is 0)");
    return !store_.grads.take_pending(e);
  }

  /// The row piece of the split backward for `n` of expert `e`'s rows (`in`, `cache`, `dout` as
  /// `backward` takes them): **writes** `din` `(n, model_dim)` and the kept `rows`
  /// `(n, backward_split_width())`. After `backward_prepare(e)`; pieces of one
  /// expert may run concurrently.
  void backward_rows(Index e, const ConstRows<S>& in, const ConstRows<S>& cache,
                     const ConstRows<S>& dout, Rows<S> din, Rows<S> rows, Scratch& scratch) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && cache.rows() == in.rows() &&
                    cache.cols() == cache_width() && dout.rows() == in.rows() &&
                    dout.cols() == model_dim() && din.rows() == in.rows() &&
                    din.cols() == model_dim() && rows.rows() == in.rows() &&
                    rows.cols() == backward_split_width(),
                "ExpertBank::backward_rows shape mismatch");
    if constexpr (std::is_same_v<S, float>) {
      if (in.rows() == 0) return;
      const bool ran = store_.run_backward_packs(e, [&](const auto& packs) {
        Body::backward_rows_packed(ExpertRef{store_, e}, packs, in, cache, dout, din, rows,
                                   scratch);
      });
      detail::require(ran, "ExpertBank::backward_rows", "the packed weights are not current");
    } else {
      static_cast<void>(scratch);
      detail::require(false, "ExpertBank::backward_rows", "the split backward is float only");
    }
  }

  /// Reserves `pack` for product `p`'s `B` on up to `rows` rows (packing them then allocates
  /// nothing).
  void backward_reserve_pack(int p, Index rows, BackwardPack& pack) const {
    const detail::SplitProduct& product = Body::kSplitProducts[static_cast<std::size_t>(p)];
    const Index cols = product.b < 0 ? model_dim() : hidden_dim();
    pack.reserve(rows, cols, options_.weight_format);
  }

  /// Packs product `p`'s `B` for a block of expert `e`'s rows (its `dout` and kept `rows`) into
  /// `pack` (allocating nothing when `backward_reserve_pack` reserved it for as many rows).
  /// After `backward_rows` of those rows.
  void backward_pack(Index e, int p, const ConstRows<S>& dout, const ConstRows<S>& rows,
                     BackwardPack& pack) {
    const detail::SplitProduct& product = Body::kSplitProducts[static_cast<std::size_t>(p)];
    const ConstRows<S> b = split_operand(product.b, dout, rows);
    if constexpr (std::is_same_v<S, float>) {
      store_.run_backward_packs(e, [&](const auto& packs) {
        const auto& wt = packs[product.tensor];
        pack.like(wt).pack(b, wt.isa());
      });
    } else {
      static_cast<void>(e);
      static_cast<void>(b);
      static_cast<void>(pack);
    }
  }

  /// Rows `[begin, end)` of product `p`'s weight gradient of expert `e` for one block of its
  /// rows, **written** (or, with `accumulate`, added): `A^T B` over the block's rows in order,
  /// `A` from the block's `in` or kept `rows`, `B` the block's `pack` (`backward_pack`). Called
  /// for the blocks in row order, the first with the expert's `accumulate` and the rest with
  /// true, every element is one chain over the expert's rows in order; slices of one product may
  /// run concurrently and any slicing gives the same bits. Then adds (or writes) the bias
  /// gradient of `p`, if any, when `begin == 0`: the column sum of `B` in row order.
  void backward_weights(Index e, int p, const ConstRows<S>& in, const ConstRows<S>& dout,
                        const ConstRows<S>& rows, const BackwardPack& pack, Index begin, Index end,
                        bool accumulate, Scratch& scratch) {
    const detail::SplitProduct& product = Body::kSplitProducts[static_cast<std::size_t>(p)];
    const ConstRows<S> a = split_operand(product.a, in, rows);
    MOET_ASSERT(begin >= 0 && begin <= end && end <= a.cols(),
                "ExpertBank::backward_weights slice out of range");
    if constexpr (std::is_same_v<S, float>) {
      auto grad = GradRef{store_, e}(static_cast<Tensor>(product.tensor));
      store_.run_backward_packs(e, [&](const auto& packs) {
        detail::gemm_packed_at(a.middleCols(begin, end - begin), pack.like(packs[product.tensor]),
                               grad.middleRows(begin, end - begin), accumulate, scratch.kernel);
      });
    } else {
      static_cast<void>(pack);
      static_cast<void>(scratch);
    }
    if (begin == 0 && product.bias != detail::kSplitNoBias && has_bias()) {
      const ConstRows<S> b = split_operand(product.b, dout, rows);
      auto db = GradRef{store_, e}(static_cast<Tensor>(product.bias));  // (1, cols)
      if (!accumulate) db.setZero();
      detail::add_rows(db, b);
    }
  }

  /// Sets every gradient to zero (allocating them on first use), writing nothing: an expert's
  /// first `backward` writes its gradients, readers (`grad`, `visit_parameters`) the zeros of
  /// experts that got no rows (detail/grad_stacks.hpp). Throws `moet::Error` if inference-only.
  void zero_grad() {
    store_.ensure_grad("zero_grad");
    store_.grads.zero();
  }

  /// Allocates the gradients (zero) if not yet; a no-op afterwards. Throws if inference-only.
  void ensure_grad() { store_.ensure_grad("ensure_grad"); }

  /// Calls `f(name, value, grad)` for every stacked parameter in the body's order (names and
  /// shapes in the body's comment; biases only with `has_bias()`). Allocates the gradients on
  /// first use. The visitor may write the values: the packed copy is stale (and `forward`
  /// throws) until `parameters_changed()`, which the optimisers call after their step. Throws
  /// `moet::Error` for an inference-only bank and while an `edit()` is open.
  template <class F>
  void visit_parameters(F&& f) {
    store_.require_training("visit_parameters");
    ensure_grad();
    detail::require(!store_.editing.value, kName,
                    "visit_parameters: an edit() of this bank is open");
    store_.packed.mark_stale();
    store_.grads.materialise();
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (store_.present(t))
        detail::visit_stack(f, Body::kTensors[t].name, store_.values[t], store_.grads[t]);
    }
  }

  /// The handle `edit()` returns: writable fixed-shape views of the bank's tensors while it is
  /// open (the body's named accessors too: `edit.gate_weights(e)`, `edit.in_bias(e)`), checked
  /// and repacked when it ends. Move-only; the views stay valid until it ends.
  class Edit : public Body::template Views<Edit> {
   public:
    Edit(const Edit&) = delete;
    Edit& operator=(const Edit&) = delete;
    Edit& operator=(Edit&&) = delete;
    /// Takes over `other`'s open edit.
    Edit(Edit&& other) noexcept : bank_(std::exchange(other.bank_, nullptr)) {}
    /// Ends the edit unless `commit()` did: checks and repacks; a non-finite value leaves the
    /// bank refusing to run (its `forward` and `forward_train` throw the reason).
    ~Edit() {
      if (bank_ != nullptr) std::exchange(bank_, nullptr)->store_.end_edit_nothrow();
    }

    /// Expert `e`'s tensor `t`, writable, `(in, out)` (a bias is `(1, out)`). Handing it out
    /// counts as setting it (`WeightInit::kNone`). Throws `moet::Error` after the edit ended.
    Eigen::Map<RowMatrix<S>> tensor(Tensor t, Index e) const {
      return open()->store_.edit_block(t, e);
    }
    /// The whole stack of tensor `t`, writable, `(num_experts * in, out)`.
    Eigen::Map<RowMatrix<S>> stack(Tensor t) const { return open()->store_.edit_stack(t); }

    /// Ends the edit now: throws `moet::Error` naming the first NaN or Inf among the tensors it
    /// handed out (expert, tensor, row, column, value), else repacks them. Either way the edit
    /// is over (the views must not be used any more).
    void commit() {
      ExpertBank* bank = open();
      bank_ = nullptr;
      bank->store_.end_edit();
    }

   private:
    friend class ExpertBank;
    explicit Edit(ExpertBank* bank) : bank_(bank) {}
    ExpertBank* open() const {
      detail::require(bank_ != nullptr, kName, "edit: this edit() has ended");
      return bank_;
    }
    ExpertBank* bank_;
  };

 private:
  static constexpr const char* kName = Body::kName;

  using Store = detail::BankStore<S, Body>;
  using ExpertRef = typename Store::ExpertRef;
  using GradRef = typename Store::GradRef;

  // Operand `which` of a split product (detail::SplitProduct): `kSplitIn` / `kSplitDout` is
  // `io`, `j >= 0` columns `[j f, (j + 1) f)` of the kept rows.
  ConstRows<S> split_operand(int which, const ConstRows<S>& io, const ConstRows<S>& rows) const {
    if (which < 0) return io;
    return rows.middleCols(static_cast<Index>(which) * hidden_dim(), hidden_dim());
  }

  static constexpr std::size_t index(Tensor t) { return static_cast<std::size_t>(t); }

  static const Options& checked(const Options& options) {
    detail::require_bank_options<S>(kName, options);
    detail::require(!options.bias || Body::kHasBias, kName, "bias = true, but ", kName,
                    " experts have no biases");
    return options;
  }

  Options options_;
  Store store_;
};

}  // namespace moet
