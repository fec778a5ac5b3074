#pragma once
/// \file detail/bank_store.hpp
/// The storage of experts/bank.hpp's `ExpertBank` and the rules that keep it valid, apart from
/// the bank's public API: one stacked matrix per tensor of the body and the lazily allocated
/// gradients, the seeded initialisation (or none, for loaders), the packed kernel copies, and
/// the state that decides whether the bank may run: tensors never set, a NaN/Inf found, an open
/// `edit()` and what it handed out, a stale packed copy. Every check throws `moet::Error` naming
/// the bank (`Body::kName`) and what to do.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "moet/detail/expert_bank.hpp"
#include "moet/detail/grad_stacks.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/transposed_packs.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

namespace moet::detail {

/// What a bank's storage needs of its options.
struct BankShape {
  Index model_dim = 0;
  Index hidden_dim = 0;
  Index num_experts = 0;
  bool bias = false;
  bool inference_only = false;
  WeightInit init = WeightInit::kRandom;
  std::uint64_t init_seed = 0;
};

/// The storage of an `ExpertBank<S, Body>` (see the file comment). Its data members are the
/// bank's state; the bank's public members read and change them only through these members or
/// under the rules stated next to each.
///
/// \tparam S the bank's scalar type.
/// \tparam Body the expert body policy (its `Tensor` enum, `kTensors` table and packing).
template <class S, class Body>
class BankStore {
 public:
  using Tensor = typename Body::Tensor;
  static constexpr std::size_t kNumTensors = Body::kTensors.size();
  static constexpr const char* kName = Body::kName;
  static constexpr bool kPackable = std::is_same_v<S, float>;

  /// Expert `e` as the body's computations see it: `x(t)` is its tensor `t`.
  struct ExpertRef {
    const BankStore& store;
    Index e;
    Index model_dim() const { return store.shape.model_dim; }
    Index hidden_dim() const { return store.shape.hidden_dim; }
    bool bias() const { return store.shape.bias; }
    Eigen::Map<const RowMatrix<S>> operator()(Tensor t) const { return store.block(t, e); }
  };
  /// Expert `e`'s gradients: `g(t)` is the writable gradient block of tensor `t`.
  struct GradRef {
    BankStore& store;
    Index e;
    Eigen::Map<RowMatrix<S>> operator()(Tensor t) const {
      return expert_block(store.grads[index(t)], e, store.rows(index(t)));
    }
  };

  /// Allocates and initialises the stacks (`shape.init`), the unset flags (`WeightInit::kNone`)
  /// and the packed copies. The options must have passed the bank's checks.
  BankStore(const BankShape& bank_shape, bool pack_weights, WeightFormat format)
      : shape(bank_shape), packed(pack_weights, format) {
    const Index n = shape.num_experts;
    const bool random = shape.init == WeightInit::kRandom;
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      const TensorSpec& spec = Body::kTensors[t];
      RowMatrix<S>& stack = values[t];
      if (!present(t) || (shape.inference_only && !spec.bias)) {
        stack.resize(0, cols(t));  // absent bias, or a weight that lives only packed
        continue;
      }
      stack.resize(n * rows(t), cols(t));  // (num_experts * rows, cols)
      if (random && !spec.bias) {
        Rng rng(hash_key(shape.init_seed, spec.stream));
        fill_normal_fan_in(rng, stack.data(), stack.size(), dim(spec.fan_in));
      } else {
        stack.setZero();
      }
    }
    if (shape.init == WeightInit::kNone) {
      unset_flags.assign(static_cast<std::size_t>(n) * kNumTensors, 0);
      for (Index e = 0; e < n; ++e) {
        for (std::size_t t = 0; t < kNumTensors; ++t) {
          if (present(t)) {
            unset_flags[flag(e, t)] = 1;
            ++unset.value;
          }
        }
      }
    }
    if (shape.inference_only) {
      init_inference_only();
    } else {
      repack_all();
    }
  }

  // --- shapes --------------------------------------------------------------------------------

  static constexpr std::size_t index(Tensor t) { return static_cast<std::size_t>(t); }
  Index dim(BankDim d) const { return bank_dim(d, shape.model_dim, shape.hidden_dim); }
  Index rows(std::size_t t) const { return dim(Body::kTensors[t].rows); }
  Index cols(std::size_t t) const { return dim(Body::kTensors[t].cols); }
  bool present(std::size_t t) const { return !Body::kTensors[t].bias || shape.bias; }
  Index num_experts() const { return shape.num_experts; }
  bool inference_only() const { return shape.inference_only; }
  std::size_t flag(Index e, std::size_t t) const {
    return static_cast<std::size_t>(e) * kNumTensors + t;
  }
  WeightName weight_name(Tensor t, Index e) const {
    const TensorSpec& spec = Body::kTensors[index(t)];
    return {spec.label, e, bank_dim_name(spec.rows), bank_dim_name(spec.cols)};
  }

  Eigen::Map<const RowMatrix<S>> block(Tensor t, Index e) const {
    return expert_block(values[index(t)], e, rows(index(t)));
  }
  Eigen::Map<RowMatrix<S>> wblock(Tensor t, Index e) {
    return expert_block(values[index(t)], e, rows(index(t)));
  }

  void require_expert(const char* what, Tensor t, Index e) const {
    require(e >= 0 && e < num_experts(), kName, what, ": expert ", e, " (",
            Body::kTensors[index(t)].label, ") is outside [0, ", num_experts(), ")");
  }
  void require_readable(const char* what, Tensor t) const {
    const TensorSpec& spec = Body::kTensors[index(t)];
    require(present(index(t)), kName, what, ": this bank has no ", spec.label, " (bias = false)");
    require(!inference_only() || spec.bias, kName, what, ": an inference_only bank keeps ", "its ",
            spec.label, " only packed for the kernels (no float copy to read)");
  }
  // The gradients (zero) and the transposed packs, sized on first use (`what`: the caller).
  void ensure_grad(const char* what) {
    require_training(what);
    grads.ensure_like(values, num_experts());
    if (!packed.enabled()) return;
    if (backward_in_bf16()) {
      transposed_bf16.resize(num_experts());
    } else {
      transposed.resize(num_experts());
    }
  }
  // Opens the bank's `edit()` (see `ExpertBank::edit`).
  void begin_edit() {
    require_training("edit");
    require(!editing.value, kName, "edit: an edit() of this bank is already open");
    editing.value = true;
    edit_was_current = packed.current();
    packed.mark_stale();
    dirty.assign(static_cast<std::size_t>(num_experts()) * kNumTensors, 0);
  }
  void require_training(const char* what) const {
    require(!inference_only(), kName, what,
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
    if (unset.value.load(std::memory_order_relaxed) > 0 || invalid || editing.value) return false;
    if (training) return !inference_only();
    return !packed.enabled() || packed.current();
  }

  [[noreturn]] void fail_not_ready(const char* what, bool training) const {
    if (training) require_training(what);
    require(!editing.value, kName, what,
            ": an edit() of this bank is open: end it first (commit() or its scope)");
    for (Index e = 0; e < num_experts() && unset.value.load() > 0; ++e) {
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        require(unset_flags[flag(e, t)] == 0, kName, what, ": expert ", e, "'s ",
                Body::kTensors[t].label,
                " was never set (init = WeightInit::kNone): ", "set every tensor of every expert (",
                Body::kTensors[t].setter, ", ...) before running the bank");
      }
    }
    if (invalid) {
      check_all_finite(what);  // names the value
      fail(kName, what,
           ": a non-finite weight was found (edit() or parameters_changed()): call "
           "parameters_changed() after fixing it");
    }
    fail(kName, what,
         ": the packed weights are stale: visit_parameters() handed the weights out for "
         "writing; call parameters_changed() to check and repack them (the optimisers "
         "do after their step)");
  }

  // Throws naming the first NaN/Inf of any present tensor (biases only without `weights`) and
  // marks the bank invalid (`where`: the caller); clears the mark when everything is finite.
  void check_all_finite(const char* where, bool weights = true) {
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (!present(t) || (!weights && !Body::kTensors[t].bias) || values[t].size() == 0 ||
          all_finite_parallel(values[t].data(), values[t].size())) {
        continue;
      }
      invalid = true;
      packed.mark_stale();
      const Tensor id = static_cast<Tensor>(t);
      for (Index e = 0; e < num_experts(); ++e) {
        check_weights_finite(kName, where, weight_name(id, e), block(id, e));
      }
    }
    invalid = false;
  }
  // The same, for the const error path (does not change the state).
  void check_all_finite(const char* where) const {
    for (std::size_t t = 0; t < kNumTensors; ++t) {
      if (!present(t)) continue;
      const Tensor id = static_cast<Tensor>(t);
      for (Index e = 0; e < num_experts() && values[t].size() > 0; ++e) {
        check_weights_finite(kName, where, weight_name(id, e), block(id, e));
      }
    }
  }

  void mark_set(Index e, std::size_t t) {
    if (!unset_flags.empty() && unset_flags[flag(e, t)] != 0) {
      unset_flags[flag(e, t)] = 0;
      unset.value.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  // Packs expert e's weight tensor t from `src` `(in, out)` into the copy (packed weights only).
  void pack_one(Tensor t, Index e, const ConstRows<float>& src) {
    packed.update(e, [&](auto& copy) { Body::pack_tensor(copy, t, src); });
  }

  // Packs expert e's weight tensor t from ready blocks of the bank's block format.
  template <class Block>
  void pack_blocks_one(Tensor t, Index e, std::span<const Block> blocks) {
    packed.update(e, [&](auto& copy) {
      Body::pack_tensor_blocks(copy, t, blocks, rows(index(t)), cols(index(t)));
    });
  }

  // Rebuilds every packed copy from the stacks (a no-op without packed copies); false when a
  // float or bf16 copy read a NaN or Inf.
  bool repack_all() {
    return packed.rebuild(num_experts(), [&](auto& copy, Index e) {
      return Body::pack(copy, ExpertRef{*this, e});
    });
  }
  // Checks every weight and repacks: in the repack's pass for float and bf16 copies (read again
  // only to name a NaN/Inf); first without copies or for a block format (its packer throws).
  void check_and_repack(const char* where) {
    const bool fused = packed.packing_reports_finiteness();
    if (!fused) check_all_finite(where);
    const bool finite = repack_all();
    if (fused) check_all_finite(where, /*weights=*/!finite);
  }

  // Inference-only construction: shapes the packed copies (zero), then packs the random draw
  // one expert tensor at a time through one temporary (the same values as a training bank's
  // stacks: each stack's stream continues from one expert's block to the next).
  void init_inference_only() {
    if constexpr (kPackable) {
      packed.rebuild(num_experts(), [&](auto& copy, Index /*e*/) {
        Body::reset(copy, shape.model_dim, shape.hidden_dim);
      });
      if (shape.init != WeightInit::kRandom) return;
      RowMatrix<float> draw;  // one expert's tensor (in, out)
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        const TensorSpec& spec = Body::kTensors[t];
        if (spec.bias) continue;
        draw.resize(rows(t), cols(t));
        Rng rng(hash_key(shape.init_seed, spec.stream));
        for (Index e = 0; e < num_experts(); ++e) {
          fill_normal_fan_in(rng, draw.data(), draw.size(), dim(spec.fan_in));
          pack_one(static_cast<Tensor>(t), e, draw);
        }
      }
    }
  }

  Eigen::Map<RowMatrix<S>> edit_block(Tensor t, Index e) {
    require(present(index(t)), kName, "edit: this bank has no biases (bias = false)");
    require_expert("edit", t, e);
    dirty[flag(e, index(t))] = 1;
    mark_set(e, index(t));
    return wblock(t, e);
  }
  Eigen::Map<RowMatrix<S>> edit_stack(Tensor t) {
    require(present(index(t)), kName, "edit: this bank has no biases (bias = false)");
    for (Index e = 0; e < num_experts(); ++e) {
      dirty[flag(e, index(t))] = 1;
      mark_set(e, index(t));
    }
    RowMatrix<S>& s = values[index(t)];
    return Eigen::Map<RowMatrix<S>>(s.data(), s.rows(), s.cols());
  }

  // The end of an edit: checks what it handed out (or everything, when the packed copy was
  // already stale or the bank invalid), then repacks that (or everything).
  void end_edit() {
    editing.value = false;
    const bool full = invalid || (packed.enabled() && !edit_was_current);
    if (full) return check_and_repack("edit() end");
    for (Index e = 0; e < num_experts(); ++e) {
      for (std::size_t t = 0; t < kNumTensors; ++t) {
        if (dirty[flag(e, t)] == 0) continue;
        const Tensor id = static_cast<Tensor>(t);
        if (!detail::all_finite(block(id, e))) {
          invalid = true;
          check_weights_finite(kName, "edit() end", weight_name(id, e), block(id, e));
        }
      }
    }
    if constexpr (kPackable) {
      if (!packed.enabled()) return;
      for (Index e = 0; e < num_experts(); ++e) {
        for (std::size_t t = 0; t < kNumTensors; ++t) {
          if (dirty[flag(e, t)] == 0 || Body::kTensors[t].bias) continue;
          const Tensor id = static_cast<Tensor>(t);
          pack_one(id, e, block(id, e));
        }
      }
      packed.mark_current();
    }
  }
  void end_edit_nothrow() noexcept {
    try {
      end_edit();
    } catch (...) {  // NOLINT(bugprone-empty-catch): the bank stays invalid or stale, and says so
    }
  }

  // --- writing -------------------------------------------------------------------------------

  /// `ExpertBank::set_tensor`: checks everything, then stores expert `e`'s tensor `t` from `w`
  /// given in `layout` and repacks it (or packs it straight, inference-only).
  template <class Derived>
  void set_tensor(Tensor t, Index e, const Eigen::MatrixBase<Derived>& w, WeightLayout layout) {
    const TensorSpec& spec = Body::kTensors[index(t)];
    const char* setter = spec.setter;
    require(present(index(t)), kName, setter, ": this bank has no biases (bias = false)");
    require_expert(setter, t, e);
    require(!editing.value, kName, setter,
            ": an edit() of this bank is open: write through it, or end it first");
    const WeightName name = weight_name(t, e);
    const Index r = rows(index(t));
    const Index c = cols(index(t));
    if (spec.bias) {
      require(w.size() == c && (w.rows() == 1 || w.cols() == 1), kName, setter, ": ",
              name.describe(), " must be a vector of ", bank_dim_name(spec.cols), " = ", c,
              " values, got (", w.rows(), ", ", w.cols(), ")");
    } else {
      check_weight_shape(kName, setter, name, r, c, w.rows(), w.cols(), layout);
    }
    check_weights_finite(kName, setter, name, w);
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
        if (packed.current()) pack_one(t, e, ConstRows<float>(dst));
      }
    }
    mark_set(e, index(t));
  }

  /// `ExpertBank::set_tensor_blocks`: checks everything (a bias, a bank `format` other than the
  /// blocks', the block count, non-finite scales), then packs the blocks as they are (and, in a
  /// training bank, stores their dequantised values).
  template <class Block>
  void set_tensor_blocks(Tensor t, Index e, std::span<const Block> blocks, WeightFormat format) {
    using Format = BlockFormat<Block>;
    const TensorSpec& spec = Body::kTensors[index(t)];
    const char* setter = "set_tensor_blocks";
    require(!spec.bias, kName, setter, ": ", spec.label, " are not packed (biases take ",
            spec.setter, ")");
    require_expert(setter, t, e);
    require(!editing.value, kName, setter,
            ": an edit() of this bank is open: write through it, or end it first");
    require(format == Format::kFormat && packed.enabled(), kName, setter, ": ",
            weight_name(t, e).describe(), ": ", Format::kName,
            " blocks need a bank with weight_format ", Format::kName, " (this one is ",
            weight_format_name(format), "); dequantise them and use set_tensor otherwise");
    const Index in = rows(index(t));
    const Index out = cols(index(t));
    const Index per_row = (in + kQuantBlock - 1) / kQuantBlock;
    require(static_cast<Index>(blocks.size()) == out * per_row, kName, setter, ": ",
            weight_name(t, e).describe(), " is ", bank_dim_name(spec.cols), " = ", out, " rows of ",
            per_row, " blocks (", bank_dim_name(spec.rows), " = ", in, "), ", out * per_row,
            " blocks, got ", blocks.size());
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      bool finite = std::isfinite(from_f16(blocks[b].d));
      if constexpr (requires { blocks[b].m; }) {
        finite = finite && std::isfinite(from_f16(blocks[b].m));
      }
      require(finite, kName, setter, ": ", weight_name(t, e).describe(), ": block ",
              b % static_cast<std::size_t>(per_row), " of row ",
              b / static_cast<std::size_t>(per_row), " has a non-finite scale");
    }
    if constexpr (kPackable) {
      if (!inference_only()) {
        // The float weights: the blocks' values, (in, out); checked before anything changes.
        RowMatrix<S> dequantised(in, out);
        for (Index j = 0; j < out; ++j) {
          for (Index i = 0; i < in; ++i) {
            dequantised(i, j) = block_value(
                blocks[static_cast<std::size_t>(j * per_row + i / kQuantBlock)], i % kQuantBlock);
          }
        }
        check_weights_finite(kName, setter, weight_name(t, e), dequantised);
        if (packed.current()) pack_blocks_one(t, e, blocks);
        wblock(t, e) = dequantised;
      } else {
        pack_blocks_one(t, e, blocks);
      }
    } else {
      static_cast<void>(blocks);
    }
    mark_set(e, index(t));
  }

  // --- state ---------------------------------------------------------------------------------

  BankShape shape;
  // One stack per tensor (num_experts * rows, cols); (0, cols) for an absent bias and, in an
  // inference-only bank, for the weights (they live only packed).
  std::array<RowMatrix<S>, kNumTensors> values;
  // The gradients, allocated on first use with the stacks' shapes and zeroed lazily.
  GradStacks<S, kNumTensors> grads;
  // WeightInit::kNone: 1 per (expert, tensor) not set yet, and how many. (Each flag belongs to
  // one expert, so setters of different experts may run at once.)
  std::vector<unsigned char> unset_flags;
  SharedCount unset;
  // A NaN/Inf was found in the stacks (by parameters_changed or an edit's end).
  bool invalid = false;
  // edit(): open, whether the packed copy was current when it opened, what it handed out.
  UncopiedFlag editing;
  bool edit_was_current = false;
  std::vector<unsigned char> dirty;
  // Stale after visit_parameters() and during edit(); see PackedCopies.
  PackedCopies<S, Body::template Packed> packed;
  // The backward's transposed weights (float banks that pack; bf16 packs for a bf16 bank, float
  // ones otherwise), sized by `ensure_grad`.
  TransposedPacks<kNumTensors, float> transposed;
  TransposedPacks<kNumTensors, Bf16> transposed_bf16;

  /// Whether the backward's transposed packs are bf16 (a bf16 bank) rather than float.
  bool backward_in_bf16() const { return packed.format() == WeightFormat::kBf16; }
  /// Bytes of the backward's transposed packs.
  std::size_t transposed_bytes() const { return transposed.bytes() + transposed_bf16.bytes(); }

  /// Calls `run(packs)` with expert `e`'s transposed weight packs (a `const std::array<
  /// PackedMatrix<W>, kNumTensors>&`, `W` bf16 for a bf16 bank, float otherwise), repacked first
  /// if the weights changed, and returns true; returns false without calling it when the
  /// backward runs Eigen's products (double banks, no packing, a stale copy). Concurrent calls
  /// for different experts are safe once the packs are sized (`ensure_grad`).
  template <class Run>
  bool run_backward_packs(Index e, Run&& run) {
    if constexpr (kPackable) {
      if (!packed.current()) return false;
      const auto with = [&](auto& packs) {
        if (e >= packs.size()) return false;
        run(packs.get(e, packed.generation(), [&](auto& expert) {
          for (std::size_t t = 0; t < kNumTensors; ++t) {
            if (!Body::kTensors[t].bias) {
              expert[t].pack_transposed(block(static_cast<Tensor>(t), e));
            }
          }
        }));
        return true;
      };
      return backward_in_bf16() ? with(transposed_bf16) : with(transposed);
    } else {
      static_cast<void>(e);
      static_cast<void>(run);
      return false;
    }
  }
};

}  // namespace moet::detail
