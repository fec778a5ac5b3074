#pragma once
/// \file experts/bank.hpp
/// `ExpertBank<S, Body>`: one bank of `num_experts` expert networks of the same shape, written
/// once for every expert body. The body (`GluBody<Act>` in glu.hpp, `FfnBody<Act>` in ffn.hpp)
/// is a small policy that lists its tensors and computes one expert (Eigen and packed forward,
/// `forward_train`, `backward`); the bank owns the storage, the initialisation, the packed
/// kernel copies, the checks, the setters and `edit()`, the gradients, the parameter visit and
/// the inference-only mode. `GluExperts`, `SwiGluExperts`, `GeGluExperts` and `FfnExperts` are
/// aliases of it.
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
///   writable and which checks and repacks what it handed out when it ends. `forward` never
///   reads weights that the packed copy has not caught up with: while the copy is stale it
///   throws (see `check_ready`), it never falls back to a slower path behind the caller's
///   back.
/// - **Optimisers** keep train/grad.hpp's protocol: `visit_parameters(f)` hands out the stacks
///   (and marks the packed copy stale), then `parameters_changed()` checks that every weight is
///   finite and repacks. A NaN or Inf is rejected by every writer: `set_*` (nothing stored),
///   the end of `edit()` and `parameters_changed()` (both throw and leave the bank refusing to
///   run until the value is fixed and `parameters_changed()` passes).
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

#include "moet/detail/expert_bank.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/experts/weight_format.hpp"
#include "moet/tensor.hpp"
#include "moet/train/grad.hpp"

namespace moet {

/// How an expert bank's weights start (`Options::init`).
enum class WeightInit {
  /// Normal with standard deviation `1 / sqrt(fan_in)`, from `init_seed`; biases 0. Draws every
  /// weight (seconds for a large bank): a loader should pass `kNone`.
  kRandom,
  /// Every tensor 0.
  kZeros,
  /// Nothing drawn or written (storage zeroed): for loaders. `forward` and `forward_train`
  /// throw until every tensor of every expert was set (`set_*`, or a view taken in `edit()`).
  kNone,
};

/// `"kRandom"`, `"kZeros"` or `"kNone"` (for messages).
constexpr const char* weight_init_name(WeightInit init) {
  return init == WeightInit::kZeros ? "kZeros" : init == WeightInit::kNone ? "kNone" : "kRandom";
}

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
  /// A bias row viewed in place, read-only.
  using ConstBiasMap = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  /// A bias row viewed in place (inside `edit()`).
  using BiasMap = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  /// Tensors per expert (biases included, present or not).
  static constexpr std::size_t kNumTensors = Body::kTensors.size();

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
      : options_(options), packed_(options.pack_weights, options.weight_format) {
    detail::require_bank_options<S>(kName, options_);
    detail::require(!options_.bias || Body::kHasBias, kName, "bias = true, but ", kName,
                    " experts have no biases");
    const Index n = num_experts();
    const bool random = options_.init == WeightInit::kRandom;
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      const detail::TensorSpec& spec = Body::kTensors[t];
      RowMatrix<S>& stack = values_[t];
      if (!present(t) || (inference_only() && !spec.bias)) {
        stack.resize(0, cols(t));  // absent bias, or a weight that lives only packed
        continue;
      }
      stack.resize(n * rows(t), cols(t));  // (num_experts * rows, cols)
      if (random && !spec.bias) {
        detail::Rng rng(detail::hash_key(options_.init_seed, spec.stream));
        detail::fill_normal_fan_in(rng, stack.data(), stack.size(), dim(spec.fan_in));
      } else {
        stack.setZero();
      }
    }
    if (options_.init == WeightInit::kNone) {
      unset_flags_.assign(static_cast<std::size_t>(n) * kNumTensors, 0);
      for (Index e = 0; e < n; ++e) {
        for (std::size_t t = 0; t < kNumTensors; ++t) {
          if (present(t)) {
            unset_flags_[flag(e, t)] = 1;
            ++unset_.value;
          }
        }
      }
    }
    if (inference_only()) {
      init_inference_only();
    } else {
      repack_all();
    }
  }

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
  /// Bytes of the packed kernel copies (padding included; 0 without them).
  std::size_t packed_bytes() const {
    std::size_t bytes = 0;
    packed_.for_each([&](const auto& copy) { bytes += Body::packed_bytes(copy); });
    return bytes;
  }

  // --- reading --------------------------------------------------------------------------------

  /// Expert `e`'s tensor `t`, `(in, out)` (a bias is `(1, out)`), a read-only view into the
  /// stack. Throws `moet::Error` for an expert out of range, a bias of a bank without biases,
  /// and a packed weight of an inference-only bank (it has no float copy).
  Eigen::Map<const RowMatrix<S>> tensor(Tensor t, Index e) const {
    require_readable("tensor", t);
    require_expert("tensor", t, e);
    return block(t, e);
  }

  /// The stack of tensor `t`, `(num_experts * in, out)` (biases `(num_experts, out)`, or
  /// `(0, out)` without biases), read-only. Throws like `tensor` for a packed weight of an
  /// inference-only bank.
  Eigen::Map<const RowMatrix<S>> stack(Tensor t) const {
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    detail::require(!inference_only() || spec.bias, kName, "stack: an inference_only bank keeps ",
                    "its ", spec.label, " only packed for the kernels (no float copy to read)");
    const RowMatrix<S>& s = values_[index(t)];
    return Eigen::Map<const RowMatrix<S>>(s.data(), s.rows(), s.cols());
  }

  /// The accumulated gradient of tensor `t`, shaped like its stack (empty before the first
  /// `zero_grad`, `backward` or `visit_parameters`, and always in an inference-only bank).
  const RowMatrix<S>& grad(Tensor t) const { return grads_[index(t)]; }

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
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    const char* setter = spec.setter;
    detail::require(present(index(t)), kName, setter, ": this bank has no biases (bias = false)");
    require_expert(setter, t, e);
    detail::require(!editing_.value, kName, setter,
                    ": an edit() of this bank is open: write through it, or end it first");
    const detail::WeightName name = weight_name(t, e);
    const Index r = rows(index(t));
    const Index c = cols(index(t));
    if (spec.bias) {
      detail::require(w.size() == c && (w.rows() == 1 || w.cols() == 1), kName, setter, ": ",
                      name.describe(), " must be a vector of ", detail::bank_dim_name(spec.cols),
                      " = ", c, " values, got (", w.rows(), ", ", w.cols(), ")");
    } else {
      detail::check_weight_shape(kName, setter, name, r, c, w.rows(), w.cols(), layout);
    }
    detail::check_weights_finite(kName, setter, name, w);
    if (spec.bias) {
      auto dst = wblock(t, e);  // (1, out)
      if (w.rows() == 1) {
        dst = w;
      } else {
        dst = w.transpose();
      }
    } else if (inference_only()) {
      if constexpr (kPackable) {
        // The caller's matrix, viewed (or, for a layout or storage order that needs it, copied
        // once) as a row-major (in, out) matrix, packed straight into the copy.
        if (layout == WeightLayout::kOutIn) {
          pack_one(t, e, ConstRows<float>(w.transpose()));
        } else {
          pack_one(t, e, ConstRows<float>(w.derived()));
        }
      }
    } else {
      auto dst = wblock(t, e);  // (in, out)
      if (layout == WeightLayout::kOutIn) {
        dst = w.transpose();
      } else {
        dst = w;
      }
      if constexpr (kPackable) {
        if (packed_.current()) pack_one(t, e, ConstRows<float>(dst));
      }
    }
    mark_set(e, index(t));
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
    using Format = detail::BlockFormat<Block>;
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    const char* setter = "set_tensor_blocks";
    detail::require(!spec.bias, kName, setter, ": ", spec.label, " are not packed (biases take ",
                    spec.setter, ")");
    require_expert(setter, t, e);
    detail::require(!editing_.value, kName, setter,
                    ": an edit() of this bank is open: write through it, or end it first");
    detail::require(options_.weight_format == Format::kFormat && packed_.enabled(), kName, setter,
                    ": ", weight_name(t, e).describe(), ": ", Format::kName,
                    " blocks need a bank with weight_format ", Format::kName, " (this one is ",
                    weight_format_name(options_.weight_format),
                    "); dequantise them and use set_tensor otherwise");
    const Index in = rows(index(t));
    const Index out = cols(index(t));
    const Index per_row = (in + detail::kQuantBlock - 1) / detail::kQuantBlock;
    detail::require(static_cast<Index>(blocks.size()) == out * per_row, kName, setter, ": ",
                    weight_name(t, e).describe(), " is ", detail::bank_dim_name(spec.cols), " = ",
                    out, " rows of ", per_row, " blocks (", detail::bank_dim_name(spec.rows), " = ",
                    in, "), ", out * per_row, " blocks, got ", blocks.size());
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      bool finite = std::isfinite(detail::from_f16(blocks[b].d));
      if constexpr (requires { blocks[b].m; }) {
        finite = finite && std::isfinite(detail::from_f16(blocks[b].m));
      }
      detail::require(finite, kName, setter, ": ", weight_name(t, e).describe(), ": block ",
                      b % static_cast<std::size_t>(per_row), " of row ",
                      b / static_cast<std::size_t>(per_row), " has a non-finite scale");
    }
    if constexpr (kPackable) {
      if (!inference_only()) {
        // The float weights: the blocks' values, (in, out); checked before anything changes.
        RowMatrix<S> values(in, out);
        for (Index j = 0; j < out; ++j) {
          for (Index i = 0; i < in; ++i) {
            values(i, j) = detail::block_value(
                blocks[static_cast<std::size_t>(j * per_row + i / detail::kQuantBlock)],
                i % detail::kQuantBlock);
          }
        }
        detail::check_weights_finite(kName, setter, weight_name(t, e), values);
        if (packed_.current()) pack_blocks_one(t, e, blocks);
        wblock(t, e) = values;
      } else {
        pack_blocks_one(t, e, blocks);
      }
    } else {
      static_cast<void>(blocks);
    }
    mark_set(e, index(t));
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
    require_training("edit");
    detail::require(!editing_.value, kName, "edit: an edit() of this bank is already open");
    editing_.value = true;
    edit_was_current_ = packed_.current();
    packed_.mark_stale();
    dirty_.assign(static_cast<std::size_t>(num_experts()) * kNumTensors, 0);
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
    detail::require(!editing_.value, kName,
                    "parameters_changed: an edit() of this bank is open: end it (it repacks)");
    check_all_finite("parameters_changed");
    repack_all();
  }

  /// True when `forward` runs the packed kernels: a float bank with `pack_weights` whose packed
  /// copy is current.
  bool uses_packed_kernels() const { return packed_.current(); }

  /// Throws `moet::Error` naming the bank and the reason when `forward` (`training = false`)
  /// or `forward_train` / `backward` (`training = true`) cannot run now: a tensor never set
  /// (`WeightInit::kNone`; names the first expert and tensor), a NaN/Inf found by the end of an
  /// `edit()` or by `parameters_changed()`, an open `edit()`, a stale packed copy (after
  /// `visit_parameters`, until `parameters_changed()`; `forward` only), or an inference-only
  /// bank (training only). `forward` and the training members check this themselves; the
  /// dispatchers call it before their parallel regions, so that nothing throws inside one.
  void check_ready(bool training) const {
    require_ready(training ? "forward_train" : "forward", training);
  }

  // --- inference ------------------------------------------------------------------------------

  /// Grows `scratch` for blocks of up to `max_rows` rows, so that `forward` on such blocks does
  /// not allocate. Optional: `forward` grows the scratch itself when needed.
  void reserve(Scratch& scratch, Index max_rows) const {
    Body::reserve(scratch, max_rows, model_dim(), hidden_dim());
    packed_.reserve(scratch.kernel, max_rows, model_dim(), hidden_dim());
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
    require_ready("forward", false);
    if (in.rows() == 0) return;
    const ExpertRef x{*this, e};
    if (packed_.run(e, [&](const auto& p) { Body::forward_packed(x, p, in, out, scratch); })) {
      return;
    }
    Body::forward(x, in, out, scratch);
  }

  // --- training (train/grad.hpp's `TrainableExperts`) -----------------------------------------

  /// Scalars `forward_train` keeps per routed row (the body's activations for `backward`).
  Index cache_width() const { return Body::cache_width(model_dim(), hidden_dim()); }

  /// `forward`, plus the row cache `cache` `(n, cache_width())` that `backward` needs, through
  /// Eigen's products on the float weights (not the packed kernels). Throws `moet::Error` when
  /// `check_ready(true)` does. Same preconditions as `forward`, and `cache` has `in.rows()`
  /// rows and overlaps neither.
  void forward_train(Index e, const ConstRows<S>& in, Rows<S> out, Rows<S> cache,
                     Scratch& scratch) const {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && out.cols() == model_dim() && out.rows() == in.rows(),
                "ExpertBank::forward_train shape mismatch");
    MOET_ASSERT(cache.rows() == in.rows() && cache.cols() == cache_width(),
                "ExpertBank::forward_train cache shape mismatch");
    require_ready("forward_train", true);
    if (in.rows() == 0) return;
    Body::forward_train(ExpertRef{*this, e}, in, out, cache, scratch);
  }

  /// Backward of expert `e` on `n` rows: `in` `(n, model_dim)` and `cache` `(n, cache_width())`
  /// as given to / written by `forward_train`, `dout` = dL/dout `(n, model_dim)`. Accumulates
  /// expert `e`'s gradients (the body's formulas) and **writes** `din` = dL/din
  /// `(n, model_dim)`. Allocates the gradients on first use (call `zero_grad()` first when
  /// calls for different experts run concurrently). Deterministic: each product's result
  /// depends only on its operands' shapes and values. Throws like `forward_train`.
  void backward(Index e, const ConstRows<S>& in, const ConstRows<S>& cache,
                const ConstRows<S>& dout, Rows<S> din, Scratch& scratch) {
    MOET_ASSERT(e >= 0 && e < num_experts(), "expert id out of range");
    MOET_ASSERT(in.cols() == model_dim() && cache.rows() == in.rows() &&
                    cache.cols() == cache_width() && dout.rows() == in.rows() &&
                    dout.cols() == model_dim() && din.rows() == in.rows() &&
                    din.cols() == model_dim(),
                "ExpertBank::backward shape mismatch");
    require_ready("backward", true);
    ensure_grad();
    if (in.rows() == 0) return;
    Body::backward(ExpertRef{*this, e}, GradRef{*this, e}, in, cache, dout, din, scratch);
  }

  /// Sets every gradient to zero (allocating them on first use). Throws `moet::Error` for an
  /// inference-only bank.
  void zero_grad() {
    require_training("zero_grad");
    ensure_grad();
    for (RowMatrix<S>& g : grads_) g.setZero();
  }

  /// Allocates the gradients (zero) if they are not yet; a no-op afterwards. Throws
  /// `moet::Error` for an inference-only bank.
  void ensure_grad() {
    require_training("ensure_grad");
    for (std::size_t t = 0; t < kNumTensors; ++t) detail::ensure_grad_like(grads_[t], values_[t]);
  }

  /// Calls `f(name, value, grad)` for every stacked parameter in the body's order (names and
  /// shapes in the body's comment; biases only with `has_bias()`). Allocates the gradients on
  /// first use. The visitor may write the values: the packed copy is stale (and `forward`
  /// throws) until `parameters_changed()`, which the optimisers call after their step. Throws
  /// `moet::Error` for an inference-only bank and while an `edit()` is open.
  template <class F>
  void visit_parameters(F&& f) {
    require_training("visit_parameters");
    ensure_grad();
    detail::require(!editing_.value, kName, "visit_parameters: an edit() of this bank is open");
    packed_.mark_stale();
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (present(t)) detail::visit_stack(f, Body::kTensors[t].name, values_[t], grads_[t]);
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
      if (bank_ != nullptr) std::exchange(bank_, nullptr)->end_edit_nothrow();
    }

    /// Expert `e`'s tensor `t`, writable, `(in, out)` (a bias is `(1, out)`). Handing it out
    /// counts as setting it (`WeightInit::kNone`). Throws `moet::Error` after the edit ended.
    Eigen::Map<RowMatrix<S>> tensor(Tensor t, Index e) const { return open()->edit_block(t, e); }
    /// The whole stack of tensor `t`, writable, `(num_experts * in, out)`.
    Eigen::Map<RowMatrix<S>> stack(Tensor t) const { return open()->edit_stack(t); }

    /// Ends the edit now: throws `moet::Error` naming the first NaN or Inf among the tensors it
    /// handed out (expert, tensor, row, column, value), else repacks them. Either way the edit
    /// is over (the views must not be used any more).
    void commit() {
      ExpertBank* bank = open();
      bank_ = nullptr;
      bank->end_edit();
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
  static constexpr bool kPackable = std::is_same_v<S, float>;

  // Expert e of this bank, as the body's computations see it: `x(t)` is its tensor `t`.
  struct ExpertRef {
    const ExpertBank& bank;
    Index e;
    Index model_dim() const { return bank.model_dim(); }
    Index hidden_dim() const { return bank.hidden_dim(); }
    bool bias() const { return bank.has_bias(); }
    Eigen::Map<const RowMatrix<S>> operator()(Tensor t) const { return bank.block(t, e); }
  };
  // Expert e's gradients: `g(t)` is the writable gradient block of tensor `t`.
  struct GradRef {
    ExpertBank& bank;
    Index e;
    Eigen::Map<RowMatrix<S>> operator()(Tensor t) const {
      return detail::expert_block(bank.grads_[index(t)], e, bank.rows(index(t)));
    }
  };

  static constexpr std::size_t index(Tensor t) { return static_cast<std::size_t>(t); }
  Index dim(detail::BankDim d) const { return detail::bank_dim(d, model_dim(), hidden_dim()); }
  Index rows(std::size_t t) const { return dim(Body::kTensors[t].rows); }
  Index cols(std::size_t t) const { return dim(Body::kTensors[t].cols); }
  bool present(std::size_t t) const { return !Body::kTensors[t].bias || options_.bias; }
  std::size_t flag(Index e, std::size_t t) const {
    return static_cast<std::size_t>(e) * kNumTensors + t;
  }
  detail::WeightName weight_name(Tensor t, Index e) const {
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    return {spec.label, e, detail::bank_dim_name(spec.rows), detail::bank_dim_name(spec.cols)};
  }

  Eigen::Map<const RowMatrix<S>> block(Tensor t, Index e) const {
    return detail::expert_block(values_[index(t)], e, rows(index(t)));
  }
  Eigen::Map<RowMatrix<S>> wblock(Tensor t, Index e) {
    return detail::expert_block(values_[index(t)], e, rows(index(t)));
  }

  void require_expert(const char* what, Tensor t, Index e) const {
    detail::require(e >= 0 && e < num_experts(), kName, what, ": expert ", e, " (",
                    Body::kTensors[index(t)].label, ") is outside [0, ", num_experts(), ")");
  }
  void require_readable(const char* what, Tensor t) const {
    const detail::TensorSpec& spec = Body::kTensors[index(t)];
    detail::require(present(index(t)), kName, what, ": this bank has no ", spec.label,
                    " (bias = false)");
    detail::require(!inference_only() || spec.bias, kName, what, ": an inference_only bank keeps ",
                    "its ", spec.label, " only packed for the kernels (no float copy to read)");
  }
  void require_training(const char* what) const {
    detail::require(!inference_only(), kName, what,
                    " needs a training bank: this one is inference_only (it keeps only the "
                    "packed weights)");
  }

  void require_ready(const char* what, bool training) const {
    if (ready(training)) [[likely]] {
      return;
    }
    fail_not_ready(what, training);
  }
  bool ready(bool training) const {
    if (unset_.value.load(std::memory_order_relaxed) > 0 || invalid_ || editing_.value) {
      return false;
    }
    if (training) return !inference_only();
    return !packed_.enabled() || packed_.current();
  }

  [[noreturn]] void fail_not_ready(const char* what, bool training) const {
    if (training) require_training(what);
    detail::require(!editing_.value, kName, what,
                    ": an edit() of this bank is open: end it first (commit() or its scope)");
    for (Index e = 0; e < num_experts() && unset_.value.load() > 0; ++e) {
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        detail::require(unset_flags_[flag(e, t)] == 0, kName, what, ": expert ", e, "'s ",
                        Body::kTensors[t].label, " was never set (init = WeightInit::kNone): ",
                        "set every tensor of every expert (", Body::kTensors[t].setter,
                        ", ...) before running the bank");
      }
    }
    if (invalid_) {
      check_all_finite(what);  // names the value
      detail::fail(kName, what,
                   ": a non-finite weight was found (edit() or parameters_changed()): call "
                   "parameters_changed() after fixing it");
    }
    detail::fail(kName, what,
                 ": the packed weights are stale: visit_parameters() handed the weights out for "
                 "writing; call parameters_changed() to check and repack them (the optimisers "
                 "do after their step)");
  }

  // Throws naming the first NaN/Inf of any present float tensor (`where` names the caller)
  // and marks the bank invalid; clears the mark when everything is finite.
  void check_all_finite(const char* where) {
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (!present(t) || values_[t].size() == 0 || values_[t].allFinite()) continue;
      invalid_ = true;
      packed_.mark_stale();
      const Tensor id = static_cast<Tensor>(t);
      for (Index e = 0; e < num_experts(); ++e) {
        detail::check_weights_finite(kName, where, weight_name(id, e), block(id, e));
      }
    }
    invalid_ = false;
  }
  // The same, for the const error path (does not change the state).
  void check_all_finite(const char* where) const {
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (!present(t)) continue;
      const Tensor id = static_cast<Tensor>(t);
      for (Index e = 0; e < num_experts() && values_[t].size() > 0; ++e) {
        detail::check_weights_finite(kName, where, weight_name(id, e), block(id, e));
      }
    }
  }

  void mark_set(Index e, std::size_t t) {
    if (!unset_flags_.empty() && unset_flags_[flag(e, t)] != 0) {
      unset_flags_[flag(e, t)] = 0;
      unset_.value.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  // Packs expert e's weight tensor t from `src` `(in, out)` into the copy (packed weights only).
  void pack_one(Tensor t, Index e, const ConstRows<float>& src) {
    packed_.update(e, [&](auto& copy) { Body::pack_tensor(copy, t, src); });
  }

  // Packs expert e's weight tensor t from ready blocks of the bank's block format.
  template <class Block>
  void pack_blocks_one(Tensor t, Index e, std::span<const Block> blocks) {
    packed_.update(e, [&](auto& copy) {
      Body::pack_tensor_blocks(copy, t, blocks, rows(index(t)), cols(index(t)));
    });
  }

  // Rebuilds every packed copy from the stacks (a no-op without packed copies).
  void repack_all() {
    packed_.rebuild(num_experts(), [&](auto& copy, Index e) {
      Body::pack(copy, ExpertRef{*this, e});
    });
  }

  // Inference-only construction: shapes the packed copies (zero), then packs the random draw
  // one expert tensor at a time through one temporary (the same values as a training bank's
  // stacks: each stack's stream continues from one expert's block to the next).
  void init_inference_only() {
    if constexpr (kPackable) {
      packed_.rebuild(num_experts(), [&](auto& copy, Index /*e*/) {
        Body::reset(copy, model_dim(), hidden_dim());
      });
      if (options_.init != WeightInit::kRandom) return;
      RowMatrix<float> draw;  // one expert's tensor (in, out)
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        const detail::TensorSpec& spec = Body::kTensors[t];
        if (spec.bias) continue;
        draw.resize(rows(t), cols(t));
        detail::Rng rng(detail::hash_key(options_.init_seed, spec.stream));
        for (Index e = 0; e < num_experts(); ++e) {
          detail::fill_normal_fan_in(rng, draw.data(), draw.size(), dim(spec.fan_in));
          pack_one(static_cast<Tensor>(t), e, draw);
        }
      }
    }
  }

  Eigen::Map<RowMatrix<S>> edit_block(Tensor t, Index e) {
    detail::require(present(index(t)), kName, "edit: this bank has no biases (bias = false)");
    require_expert("edit", t, e);
    dirty_[flag(e, index(t))] = 1;
    mark_set(e, index(t));
    return wblock(t, e);
  }
  Eigen::Map<RowMatrix<S>> edit_stack(Tensor t) {
    detail::require(present(index(t)), kName, "edit: this bank has no biases (bias = false)");
    for (Index e = 0; e < num_experts(); ++e) {
      dirty_[flag(e, index(t))] = 1;
      mark_set(e, index(t));
    }
    RowMatrix<S>& s = values_[index(t)];
    return Eigen::Map<RowMatrix<S>>(s.data(), s.rows(), s.cols());
  }

  // The end of an edit: checks what it handed out (or everything, when the packed copy was
  // already stale or the bank invalid), then repacks that (or everything).
  void end_edit() {
    editing_.value = false;
    const bool full = invalid_ || (packed_.enabled() && !edit_was_current_);
    if (full) {
      check_all_finite("edit() end");
      repack_all();
      return;
    }
    for (Index e = 0; e < num_experts(); ++e) {
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        if (dirty_[flag(e, t)] == 0) continue;
        const Tensor id = static_cast<Tensor>(t);
        if (!block(id, e).allFinite()) {
          invalid_ = true;
          detail::check_weights_finite(kName, "edit() end", weight_name(id, e), block(id, e));
        }
      }
    }
    if constexpr (kPackable) {
      if (!packed_.enabled()) return;
      for (Index e = 0; e < num_experts(); ++e) {
        for (std::size_t t = 0; t < kNumTensors; ++t) {
          if (dirty_[flag(e, t)] == 0 || Body::kTensors[t].bias) continue;
          const Tensor id = static_cast<Tensor>(t);
          pack_one(id, e, block(id, e));
        }
      }
      packed_.mark_current();
    }
  }
  void end_edit_nothrow() noexcept {
    try {
      end_edit();
    } catch (...) {  // NOLINT(bugprone-empty-catch): the bank stays invalid or stale, and says so
    }
  }

  Options options_;
  // One stack per tensor (num_experts * rows, cols); (0, cols) for an absent bias and, in an
  // inference-only bank, for the weights (they live only packed).
  std::array<RowMatrix<S>, kNumTensors> values_;
  // The gradients, lazily allocated with the stacks' shapes.
  std::array<RowMatrix<S>, kNumTensors> grads_;
  // WeightInit::kNone: 1 per (expert, tensor) not set yet, and how many.
  // (Each flag belongs to one expert, so setters of different experts may run at once.)
  std::vector<unsigned char> unset_flags_;
  detail::SharedCount unset_;
  // A NaN/Inf was found in the stacks (by parameters_changed or an edit's end).
  bool invalid_ = false;
  // edit(): open, whether the packed copy was current when it opened, what it handed out.
  detail::UncopiedFlag editing_;
  bool edit_was_current_ = false;
  std::vector<unsigned char> dirty_;
  // Stale after visit_parameters() and during edit(); see PackedCopies.
  detail::PackedCopies<S, Body::template Packed> packed_;
};

}  // namespace moet
