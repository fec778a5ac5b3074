#pragma once
/// \file gates/importance.hpp
/// `ImportanceGate`: a reconstruction of DA-MoE's attention-driven expert allocation ("Towards
/// Dynamic Expert Allocation for MoE Models", Aghdam, Jin, Wu, arXiv 2409.06669).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "moet/concepts.hpp"
#include "moet/context.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/gates/router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// How `ImportanceGate` maps token importance to a number of experts `K` (see `ImportanceGate`).
enum class ImportanceNorm {
  /// `K = clamp(ceil(imp / max(imp) * k_max - 1e-6), k_min, k_max)`.
  kMax,
  /// `u = (imp - min) / (max - min)`, `K = clamp(k_min + ceil(u * (k_max - k_min) - 1e-6),
  /// k_min, k_max)`: the least important token gets `k_min`, the most important `k_max`.
  kMinMax,
  /// `K = clamp(ceil(k_avg * imp / mean(imp) - 1e-6), k_min, k_max)`: about `k_avg` experts per
  /// token on average (before clamping).
  kBudget,
};

namespace detail {

/// Slack below an integer before `ceil` moves up, so that a ratio that should be exactly an
/// integer (the maximum token: `u * k_max = k_max`) is not pushed one higher by rounding.
inline constexpr double kImportanceCeilSlack = 1e-6;

/// Writes into `k_out[0..n)` (integers) the experts per token of one group (one sequence) of `n`
/// tokens with importance `imp` (finite, >= 0); `valid` (or null: all valid) marks pads with 0.
/// Pads get 0; the statistics (max, min, mean) are over the valid tokens only. Constant importance
/// (including all zero) gives `u = 1`: `k_max` for `kMax` and `kMinMax`, `round(k_avg)`
/// (half away from zero) for `kBudget`, each clamped to `[k_min, k_max]`. Computed in double.
template <class S, class K>
void experts_from_importance(const S* imp, const std::uint8_t* valid, Index n, ImportanceNorm norm,
                             Index k_min, Index k_max, double k_avg, K* k_out) {
  double max = -std::numeric_limits<double>::infinity();
  double min = std::numeric_limits<double>::infinity();
  double sum = 0.0;
  Index count = 0;
  for (Index i = 0; i < n; ++i) {
    if (valid != nullptr && valid[i] == 0) continue;
    const auto v = static_cast<double>(imp[i]);
    max = std::max(max, v);
    min = std::min(min, v);
    sum += v;
    ++count;
  }
  const bool constant = !(max > min);
  const double mean = count > 0 ? sum / static_cast<double>(count) : 0.0;
  const auto lo = static_cast<double>(k_min);
  const auto hi = static_cast<double>(k_max);
  for (Index i = 0; i < n; ++i) {
    if (valid != nullptr && valid[i] == 0) {
      k_out[i] = 0;
      continue;
    }
    const auto v = static_cast<double>(imp[i]);
    double k = hi;
    if (constant) {
      k = norm == ImportanceNorm::kBudget ? std::round(k_avg) : hi;
    } else if (norm == ImportanceNorm::kMax) {
      k = std::ceil(v / max * hi - kImportanceCeilSlack);
    } else if (norm == ImportanceNorm::kMinMax) {
      k = lo + std::ceil((v - min) / (max - min) * (hi - lo) - kImportanceCeilSlack);
    } else {
      k = std::ceil(k_avg * v / mean - kImportanceCeilSlack);
    }
    k_out[i] = static_cast<K>(std::clamp(k, lo, hi));
  }
}

}  // namespace detail

/// Importance-driven top-K routing (docs/algorithms.md §6): each token gets a number of experts
/// `K_t` that grows with its importance, then takes its top-`K_t` experts of `P = softmax(x W_r)`.
///
/// **This is a reconstruction, not the paper's exact method.** DA-MoE (Aghdam, Jin, Wu 2024,
/// arXiv 2409.06669) states that token importance comes from the attention weights and that a
/// router allocates "the optimal number of experts (K)" per token, but its method section, and
/// so its formula, is not public and no code is released. Every choice below is a documented
/// design choice, switchable where it matters:
///
/// - **Importance.** `ctx.importance` `(num_tokens)`, finite and >= 0, when given (it wins when
///   both are given); else it is computed from `ctx.attention` `[batch, heads, L, L]` (query
///   major; `batch * L` must equal the number of tokens, values finite and >= 0): the attention
///   *received* by token `j`, averaged over heads and over valid queries, `imp_j = sum_h sum_i
///   A[h, i, j] / (heads * #valid queries)`. With `attention.causal`, column `j` is divided by
///   the number of valid queries `i >= j` instead (otherwise early tokens would be favoured).
///   Pad tokens (`ctx.valid[t] == 0`) are not queries, get importance 0 and `K = 0` (routed
///   nowhere). Neither given is an `Error`.
/// - **Groups.** Importance is normalised per sequence: over the attention's `batch` rows, or
///   over `ctx.sequence_length` tokens with `ctx.importance` (the whole batch when it is 0).
///   Column means make the importance of a sequence sum to about 1, so a batch-wide maximum
///   would hand long sequences fewer experts. Statistics use valid tokens only.
/// - **K.** `norm` selects the mapping (`ImportanceNorm`): `kMax` (the default), `kMinMax` or
///   `kBudget`, then clamps to `[k_min, k_max]`; constant importance (all zero included) gives
///   `u = 1`, i.e. `k_max`, or `round(k_avg)` for `kBudget`. `k_max > num_experts` is an
///   `Error` (not clamped).
/// - **Experts and weights.** The top-`K` of `P`, best first, ties to the lower id; weights are
///   `P_e` (Switch convention), or `P_e / sum of the selected P` with `renormalize`. No capacity.
/// - **Gradient** (`backward`, docs/algorithms.md §6.5). Importance and `K` are detached (constants
///   for training; `backward` reads them from the plan and ignores `ctx`), and so is the
///   selection; only the weights depend on the router: `w = P_e` (`dL/dP_e += dL/dw`) or, with
///   `renormalize`, a softmax over the selected logits (`dz_e += w_e (dw_e - sum_j w_j dw_j)`),
///   then through `P = softmax(x W_r)`. Pads (`K = 0`) get gradient only from
///   `loss_grad.d_probs`. `visit_parameters` visits `router.weight`.
///
/// \tparam S scalar of the router, the probabilities and the combine weights.
///
/// ```cpp
/// moet::ImportanceGate<float> gate({.model_dim = 512, .num_experts = 8, .k_max = 4});
/// moet::RouteContext ctx;  ctx.attention = {att.data(), batch, heads, seq_len};
/// gate.route(x, ctx, plan);
/// ```
template <class S>
class ImportanceGate : public SoftmaxGateBase<S> {
 public:
  /// Construction options (validated by the constructor).
  struct Options {
    /// Columns of `x`; >= 1.
    Index model_dim = 0;
    /// Number of experts `E`; >= 1.
    Index num_experts = 0;
    /// Fewest experts a valid token gets, `1 <= k_min <= k_max`.
    Index k_min = 1;
    /// Most experts a token gets, `k_min <= k_max <= num_experts`.
    Index k_max = 4;
    /// Importance-to-K mapping.
    ImportanceNorm norm = ImportanceNorm::kMax;
    /// Target mean K for `kBudget`, finite and in `[k_min, k_max]` (checked, and used, only
    /// with `kBudget`).
    double k_avg = 2.0;
    /// Divide the selected probabilities by their sum.
    bool renormalize = false;
    /// Seed of the router initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Validates `options` (throws `Error`) and initialises `W_r` normal with standard deviation
  /// `1 / sqrt(model_dim)` from `init_seed`.
  explicit ImportanceGate(const Options& options)
      : SoftmaxGateBase<S>(
            SoftmaxRouter<S>(kOp, options.model_dim, options.num_experts, options.init_seed)),
        options_(validated(options)) {}

  const Options& options() const { return options_; }

  /// Routes the rows of `x` `(num_tokens, model_dim)` into `out` using `ctx.importance` or
  /// `ctx.attention` (and `ctx.valid`). Throws `Error` on a bad `x`, a non-finite logit, missing
  /// or malformed importance/attention, or a `ctx.valid` of the wrong size.
  ///
  /// `ctx.overrides.k_max` and `ctx.overrides.k_avg` (when set) route this call as a gate built
  /// with those values would (validated alike); other override fields are errors.
  void route(const ConstRows<S>& x, const RouteContext& ctx, Routing<S>& out) const {
    this->router_.check_input(x);
    const Options o = call_options(ctx);
    const Index num_tokens = x.rows();
    if (num_tokens == 0) {
      this->router_.probabilities(input_checked, x, out);
      return;
    }
    detail::require(ctx.valid.empty() || static_cast<Index>(ctx.valid.size()) == num_tokens, kOp,
                    "ctx.valid must have one entry per token (", num_tokens, "), got ",
                    ctx.valid.size());
    const std::uint8_t* valid = ctx.valid.empty() ? nullptr : ctx.valid.data();
    S* imp = out.scratch_values.data(num_tokens);  // (num_tokens)
    const Index group = token_importance(ctx, num_tokens, valid, imp);

    const auto probs = this->router_.probabilities(input_checked, x, out);  // (num_tokens, E)
    const auto k_of = out.counts();  // K per token, then the counts of the plan
    detail::parallel_for(num_tokens / group, [&](Index g) {
      detail::experts_from_importance(imp + g * group,
                                      valid == nullptr ? nullptr : valid + g * group, group, o.norm,
                                      o.k_min, o.k_max, o.k_avg, k_of.data() + g * group);
    });
    RankedSelection<S> select(out);
    const auto k = [&](Index t, auto&&...) { return k_of[static_cast<std::size_t>(t)]; };
    select.rank(probs, k, k);
    select.write(probs, options_.renormalize);
  }

  /// Backward of `route(x, ctx, routing)` (see the class notes for the gradient treatment):
  /// `x` and `ctx` are those of the `route` call, `d_weights` holds dL/dw per assignment
  /// (routing order, `routing.num_assignments()` values), `loss_grad` the optional auxiliary
  /// inputs (`SoftmaxLossGrad`). Accumulates into the gradient of `W_r` and adds dL/dx into `dx`
  /// `(num_tokens, model_dim)`. The same bits for any thread count. Throws `Error` naming
  /// `ImportanceGate::backward` on any size mismatch or a plan that is not from this gate and
  /// this `x`.
  void backward(const ConstRows<S>& x, const RouteContext& /*ctx*/, const Routing<S>& routing,
                std::span<const S> d_weights, const SoftmaxLossGrad<S>& loss_grad, Rows<S> dx) {
    // Importance and K are detached: the plan holds them.
    this->router_.backward(x, routing, d_weights, options_.renormalize, loss_grad, dx);
  }

 private:
  static constexpr const char* kOp = "ImportanceGate";
  /// Keys per attention-reduction task (fixed: thread-count independent).
  static constexpr Index kKeyBlock = 64;

  /// Writes each token's importance into `imp` `(num_tokens)` (0 for pads) and returns the
  /// length of the groups (sequences) normalised together.
  Index token_importance(const RouteContext& ctx, Index num_tokens, const std::uint8_t* valid,
                         S* imp) const {
    detail::require(ctx.sequence_length >= 0, kOp, "ctx.sequence_length must be >= 0, got ",
                    ctx.sequence_length);
    if (!ctx.importance.empty()) {
      detail::require(static_cast<Index>(ctx.importance.size()) == num_tokens, kOp,
                      "ctx.importance must have one entry per token (", num_tokens, "), got ",
                      ctx.importance.size());
      for (Index t = 0; t < num_tokens; ++t) {
        const float v = ctx.importance[static_cast<std::size_t>(t)];
        detail::require(std::isfinite(v) && v >= 0.0f, kOp,
                        "ctx.importance must be finite and >= 0, got ", v, " at token ", t);
        imp[t] = (valid != nullptr && valid[t] == 0) ? S(0) : static_cast<S>(v);
      }
      const Index group = ctx.sequence_length > 0 ? ctx.sequence_length : num_tokens;
      detail::require(num_tokens % group == 0, kOp, "ctx.sequence_length (", group,
                      ") must divide the number of tokens (", num_tokens, ")");
      return group;
    }
    if (ctx.attention.empty()) {
      detail::fail(kOp, "needs ctx.importance or ctx.attention");
    }
    const AttentionView& att = ctx.attention;
    detail::require(att.batch >= 1 && att.heads >= 1 && att.seq_len >= 1 &&
                        att.batch * att.seq_len == num_tokens,
                    kOp, "ctx.attention [batch, heads, L, L] = [", att.batch, ", ", att.heads, ", ",
                    att.seq_len, ", ", att.seq_len,
                    "] must cover batch * L = num_tokens, but x is (", num_tokens, ", ",
                    options_.model_dim, ")");
    detail::require(ctx.sequence_length == 0 || ctx.sequence_length == att.seq_len, kOp,
                    "ctx.sequence_length (", ctx.sequence_length,
                    ") must be 0 or the attention's L (", att.seq_len, ")");
    const Index len = att.seq_len;
    const Index heads = att.heads;
    const Index key_blocks = (len + kKeyBlock - 1) / kKeyBlock;
    std::atomic<bool> bad{false};
    detail::parallel_for(att.batch * key_blocks, [&](Index task) {
      const Index b = task / key_blocks;
      const Index jb = (task % key_blocks) * kKeyBlock;
      const Index je = std::min(len, jb + kKeyBlock);
      const std::uint8_t* valid_b = valid == nullptr ? nullptr : valid + b * len;
      const auto is_valid = [&](Index i) { return valid_b == nullptr || valid_b[i] != 0; };
      double acc[kKeyBlock] = {};
      // Valid queries per key: all of them, or (causal) those at i >= j, as a suffix count.
      Index queries[kKeyBlock] = {};
      Index suffix = 0;
      for (Index i = len - 1; i >= (att.causal ? jb : 0); --i) {
        suffix += is_valid(i) ? 1 : 0;
        if (att.causal && i < je) queries[i - jb] = suffix;
      }
      if (!att.causal) std::fill(queries, queries + (je - jb), suffix);
      bool ok = true;
      for (Index h = 0; h < heads; ++h) {
        for (Index i = 0; i < len; ++i) {
          const float* a = att.data + ((b * heads + h) * len + i) * len;
          const bool query = is_valid(i);
          for (Index j = jb; j < je; ++j) {
            const float v = a[j];
            if (!(v >= 0.0f && v <= std::numeric_limits<float>::max())) {
              ok = false;
            } else if (query && (!att.causal || i >= j)) {
              acc[j - jb] += static_cast<double>(v);
            }
          }
        }
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
      for (Index j = jb; j < je; ++j) {
        const Index n = queries[j - jb];
        imp[b * len + j] = (is_valid(j) && n > 0)
                               ? static_cast<S>(acc[j - jb] / (static_cast<double>(heads) *
                                                               static_cast<double>(n)))
                               : S(0);
      }
    });
    if (bad.load()) {
      const Index size = att.batch * heads * len * len;
      for (Index a = 0; a < size; ++a) {
        const float v = att.data[a];
        detail::require(std::isfinite(v) && v >= 0.0f, kOp,
                        "ctx.attention must be finite and >= 0, got ", v, " at [",
                        a / (heads * len * len), ", ", (a / (len * len)) % heads, ", ",
                        (a / len) % len, ", ", a % len, "]");
      }
    }
    return len;
  }

  /// The options of this call: `k_max` and `k_avg` from `ctx.overrides` when set, checked as
  /// the constructor checks them.
  Options call_options(const RouteContext& ctx) const {
    const auto apply = [](Options& o, const RoutingOverrides& v) {
      if (v.k_max != 0) o.k_max = v.k_max;
      if (v.k_avg != 0.0) {
        detail::require(o.norm == ImportanceNorm::kBudget, kOp,
                        "ctx.overrides.k_avg applies to norm kBudget only, this gate's norm is ",
                        o.norm == ImportanceNorm::kMax ? "kMax" : "kMinMax");
        o.k_avg = v.k_avg;
      }
    };
    return detail::call_options(kOp, ctx.overrides, {.k_max = true, .k_avg = true}, options_, apply,
                                validated);
  }

  static Options validated(const Options& o) {
    detail::require(o.k_min >= 1 && o.k_min <= o.k_max, kOp,
                    "k_min must be in [1, k_max = ", o.k_max, "], got ", o.k_min);
    detail::require(o.k_max <= o.num_experts, kOp, "k_max must be <= num_experts = ", o.num_experts,
                    ", got ", o.k_max);
    detail::require(o.norm == ImportanceNorm::kMax || o.norm == ImportanceNorm::kMinMax ||
                        o.norm == ImportanceNorm::kBudget,
                    kOp, "norm must be kMax, kMinMax or kBudget, got ", static_cast<int>(o.norm));
    detail::require(o.norm != ImportanceNorm::kBudget ||
                        (std::isfinite(o.k_avg) && o.k_avg >= static_cast<double>(o.k_min) &&
                         o.k_avg <= static_cast<double>(o.k_max)),
                    kOp, "k_avg must be finite and in [k_min = ", o.k_min, ", k_max = ", o.k_max,
                    "], got ", o.k_avg);
    return o;
  }

  Options options_;
};

}  // namespace moet
