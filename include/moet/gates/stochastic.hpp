#pragma once
/// \file gates/stochastic.hpp
/// `StochasticGate`: THOR's router-free random expert choice (Zuo et al., "Taming Sparsely
/// Activated Transformer with Stochastic Experts", ICLR 2022, arXiv 2110.04260). Specification:
/// docs/algorithms.md §7.

#include <cstdint>
#include <limits>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// How `StochasticGate` picks experts outside training (docs/algorithms.md §7.3).
enum class StochasticInference {
  /// An independent uniform expert for every token (THOR's `inference_level = 0`, the default).
  kToken,
  /// One uniform expert per position `i` within the sequence, shared by every sequence of the
  /// batch: what THOR's `inference_level = 1` ("sentence level") does with fairseq's
  /// time-major layout.
  kPosition,
  /// One uniform expert per sequence, shared by all its tokens: the per-sentence intent of
  /// `inference_level = 1`.
  kSequence,
  /// Every expert, each with weight `1 / num_experts` (slot order ascending id). Not in the
  /// released THOR code; offered as the ensemble/averaging option.
  kEnsemble,
};

/// THOR's stochastic expert choice (Zuo et al., ICLR 2022, arXiv 2110.04260): no router and no
/// router parameters; every choice is a uniform draw.
///
/// - Training (`ctx.training`): one expert id for the whole batch, drawn uniformly from
///   `hash_key(ctx.seed, ctx.step, stream)`. Every token gets `k = 1` and weight 1. THOR runs two
///   forward passes per step, each with its own draw: give the two passes different `ctx.step`
///   (or `ctx.seed`) values, e.g. `step = 2 * iteration + pass`, since equal keys give equal
///   draws.
/// - Inference: per `StochasticInference`. Tokens are laid out `[batch, L]` row-major with
///   `L = ctx.sequence_length` (0: one sequence of all tokens), so token `t` is position
///   `t % L` of sequence `t / L`. Each draw keys on `(seed, step, stream, mode, index)`.
///
/// Give each layer its own `Options::stream` so that layers draw independently, as THOR's
/// layers do. Draws depend only on their keys, never on the thread count. `route` leaves
/// `out.probs()` empty (there is no distribution; stats report NaN entropy).
///
/// \tparam S scalar type of the combine weights.
///
/// ```cpp
/// moet::StochasticGate<float> gate({.model_dim = 512, .num_experts = 2, .stream = layer});
/// ```
template <class S>
class StochasticGate {
 public:
  using Scalar = S;
  /// The gate has no scores and no losses: its backward takes no loss-gradient inputs.
  using LossGrad = NoLossGrad;

  /// Construction options.
  struct Options {
    /// Width of a token (>= 1); only used to check `x`.
    Index model_dim = 0;
    /// Number of experts (>= 1). THOR's default is 2.
    Index num_experts = 0;
    /// What inference does.
    StochasticInference inference = StochasticInference::kToken;
    /// Random stream of this gate: different layers take different streams.
    std::uint64_t stream = 0;
  };

  /// Tokens per fill task: fixed, so the split never depends on the thread count.
  static constexpr Index kTokenBlock = 1024;

  /// Builds the gate; throws `moet::Error` when `model_dim < 1` or `num_experts < 1`.
  explicit StochasticGate(const Options& options) : options_(options) {
    detail::require(options_.model_dim >= 1, kOp, "model_dim must be >= 1, got ",
                    options_.model_dim);
    detail::require(options_.num_experts >= 1, kOp, "num_experts must be >= 1, got ",
                    options_.num_experts);
    detail::require(options_.num_experts <= std::numeric_limits<std::int32_t>::max(), kOp,
                    "num_experts must fit a 32-bit expert id, got ", options_.num_experts);
  }

  /// Number of experts.
  Index num_experts() const { return options_.num_experts; }
  /// Width of a token.
  Index model_dim() const { return options_.model_dim; }
  /// The options the gate was built with.
  const Options& options() const { return options_; }

  /// The expert every token goes to in a training call with this `(seed, step)`.
  std::int32_t training_expert(std::uint64_t seed, std::uint64_t step) const {
    return draw(detail::hash_key(seed, step, options_.stream));
  }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` (see the class comment).
  /// Throws `moet::Error` when `x` has the wrong width or a non-finite entry, when
  /// `ctx.sequence_length < 0`, or when `ctx.sequence_length > 0` does not divide the number of
  /// tokens (checked in every mode).
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    if (!ctx.overrides.empty()) detail::check_override_fields(kOp, ctx.overrides, {});
    const Index num_experts = options_.num_experts;
    detail::require(x.cols() == model_dim(), kOp, "x must have model_dim = ", model_dim(),
                    " columns, got ", x.cols());
    detail::require(detail::all_finite(x), kOp, "x must be finite (found NaN or Inf)");
    const Index num_tokens = x.rows();
    detail::require(ctx.sequence_length >= 0, kOp, "sequence_length must be >= 0, got ",
                    ctx.sequence_length);
    detail::require(ctx.sequence_length == 0 || num_tokens % ctx.sequence_length == 0, kOp,
                    "the number of tokens must be a multiple of sequence_length, got ", num_tokens,
                    " tokens and sequence_length ", ctx.sequence_length);
    out.reset(num_tokens, num_experts);
    out.probs_are_distribution = false;
    out.live_experts = num_experts;
    if (num_tokens == 0) return;

    const bool ensemble = !ctx.training && options_.inference == StochasticInference::kEnsemble;
    const Index k = ensemble ? num_experts : 1;
    for (auto& count : out.counts()) count = k;
    out.commit_counts();

    if (ensemble) {
      const S weight = S(1) / static_cast<S>(num_experts);
      detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
        for (Index t = begin; t < end; ++t) {
          const auto experts = out.experts(t);
          const auto weights = out.weights(t);
          for (Index e = 0; e < num_experts; ++e) {
            experts[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
            weights[static_cast<std::size_t>(e)] = weight;
          }
        }
      });
      return;
    }

    const Index seq_len = ctx.sequence_length == 0 ? num_tokens : ctx.sequence_length;
    const std::int32_t batch_expert = ctx.training ? training_expert(ctx.seed, ctx.step) : 0;
    const StochasticInference mode = options_.inference;
    const std::uint64_t stream = options_.stream;
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      for (Index t = begin; t < end; ++t) {
        std::int32_t e = batch_expert;
        if (!ctx.training) {
          // The mode tag keeps the token, position and sequence streams apart.
          Index index = t;
          if (mode == StochasticInference::kPosition) index = t % seq_len;
          if (mode == StochasticInference::kSequence) index = t / seq_len;
          e = draw(detail::hash_key(ctx.seed, ctx.step, stream, mode_tag(mode),
                                    static_cast<std::uint64_t>(index)));
        }
        out.experts(t)[0] = e;
        out.weights(t)[0] = S(1);
      }
    });
  }

  // --- training (concepts.hpp's `TrainableGate`) -----------------------------------------

  /// Backward of `route`: THOR's gate has no parameters and its choice does not depend on
  /// `x` (docs/algorithms.md §7.4), so nothing is accumulated and nothing is added to `dx`. Checks
  /// the shapes: `x` `(num_tokens, model_dim)`, `routing` over `x.rows()` tokens, `d_weights`
  /// one value per assignment, `dx` `x`'s shape; throws `moet::Error` naming `StochasticGate`
  /// otherwise.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const LossGrad& /*loss_grad*/, Rows<S> dx) const {
    detail::require(x.cols() == model_dim(), kOp, "x must have model_dim = ", model_dim(),
                    " columns, got ", x.cols());
    detail::require(routing.num_tokens() == x.rows(), kOp, "the routing plan has ",
                    routing.num_tokens(), " tokens but x has ", x.rows(), " rows");
    detail::require(static_cast<Index>(d_weights.size()) == routing.num_assignments(), kOp,
                    "d_weights must hold one value per assignment (", routing.num_assignments(),
                    "), got ", d_weights.size());
    detail::require(dx.rows() == x.rows() && dx.cols() == x.cols(), kOp, "dx must have x's shape (",
                    x.rows(), ", ", x.cols(), "), got (", dx.rows(), ", ", dx.cols(), ")");
  }

  /// No gradients to clear.
  void zero_grad() {}

  /// No parameters: `f` is never called.
  template <class F>
  void visit_parameters(F&& /*f*/) {}

 private:
  static constexpr const char* kOp = "StochasticGate";

  static std::uint64_t mode_tag(StochasticInference mode) {
    return static_cast<std::uint64_t>(mode) + 1;  // 1 token, 2 position, 3 sequence
  }

  std::int32_t draw(std::uint64_t bits) const {
    return static_cast<std::int32_t>(
        detail::uniform_below(bits, static_cast<std::uint64_t>(options_.num_experts)));
  }

  Options options_;
};

}  // namespace moet
