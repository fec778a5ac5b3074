// libFuzzer target: GroupedTopKGate with its selection-only score bias, balanced by a
// LossFreeBalancer. The input decodes into the options (any expert count, groups, kept groups,
// k, softmax or sigmoid scores, max or top-2-sum group scores, renormalised or not, either
// scaling rule, any scaling factor: zero, negative, NaN, Inf, tiny, huge), the score bias (none,
// the wrong length, or any values: NaN, Inf, denormals, huge, ties), x and the router weights
// (NaN, Inf, denormals, huge values, exact ties, either layout), the context (ctx.overrides.k in
// or out of range, or a field the gate has not), the denormal-flush mode, and the balancer (any
// update rate: zero, negative, NaN, Inf, tiny, huge; plans of another expert count; one or two
// records per step; one to three route-record-update steps on the same x).
//
// Either moet::Error is thrown, and only for invalid options or inputs, or: check_plan with
// exactly k experts per token and weights up to the scale; the scores s the softmax or sigmoid of
// the logits; and the rule of docs/algorithms.md §13.1 redone independently: c = s + b, group
// scores (max or sum of the two best c), the groups_kept best groups (ties to the lower group),
// the top-k of c among their experts (ties to the lower id) in order, weights from the unbiased
// s, renormalised (+ 1e-20) and scaled per the WeightScaling rule. The balancer's loads are the
// plans' assignment counts, and update moves each bias by u sign(mean load - load) (§13.5), so
// the next step routes on the new bias.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "moet/gates/grouped_top_k.hpp"
#include "moet/train/bias_balance.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;
using moet_fuzz::flushed;
using Gate = moet::GroupedTopKGate<float>;

double scaling_factor(Bytes& in) {
  switch (in.u8() % 12) {
    case 0:
      return 0.0;
    case 1:
      return -1.0;
    case 2:
      return std::numeric_limits<double>::quiet_NaN();
    case 3:
      return std::numeric_limits<double>::infinity();
    case 4:
      return 1e-30;
    case 5:
      return 1e30;
    case 6:
      return 1e300;  // finite, beyond float
    case 7:
      return 2.5;  // DeepSeek-V3
    case 8:
      return 16.0;  // DeepSeek-V2
    default:
      return static_cast<double>(in.u8()) / 32.0;  // 0 .. 8, 1 and 0 included
  }
}

double update_rate(Bytes& in) {
  switch (in.u8() % 12) {
    case 0:
      return 0.0;
    case 1:
      return -1e-3;
    case 2:
      return std::numeric_limits<double>::quiet_NaN();
    case 3:
      return std::numeric_limits<double>::infinity();
    case 4:
      return -std::numeric_limits<double>::infinity();
    case 5:
      return 1e-30;
    case 6:
      return 1e30;
    case 7:
      return 1e39;  // finite, beyond float
    case 8:
      return 0.5;
    default:
      return 1e-3;  // the papers'
  }
}

// The documented experts of one token, best first (docs/algorithms.md §13.1), with the float
// arithmetic of moet's tasks (subnormals flushed when they are).
std::vector<std::int32_t> want_experts(const Gate::Options& o, Index k, const float* s,
                                       const float* bias) {
  const Index num_experts = o.num_experts;
  const Index size = num_experts / o.num_groups;
  std::vector<float> c(static_cast<std::size_t>(num_experts));
  for (Index e = 0; e < num_experts; ++e) {
    c[static_cast<std::size_t>(e)] = flushed(flushed(s[e]) + flushed(bias[e]));
  }
  std::vector<float> group(static_cast<std::size_t>(o.num_groups));
  for (Index g = 0; g < o.num_groups; ++g) {
    std::vector<float> members(c.begin() + g * size, c.begin() + (g + 1) * size);
    std::sort(members.begin(), members.end(), [](float a, float b) { return a > b; });
    if (o.group_score == moet::GroupScore::kMax) {
      group[static_cast<std::size_t>(g)] = members[0];
    } else {
      const float second = size >= 2 ? members[1] : -std::numeric_limits<float>::infinity();
      group[static_cast<std::size_t>(g)] = flushed(members[0] + second);
    }
  }
  const auto group_order = moet_fuzz::descending_order(group.data(), o.num_groups);
  std::vector<std::uint8_t> kept(static_cast<std::size_t>(o.num_groups), 0);
  for (Index j = 0; j < o.groups_kept; ++j)
    kept[static_cast<std::size_t>(group_order[static_cast<std::size_t>(j)])] = 1;
  std::vector<std::int32_t> want;
  for (const std::int32_t e : moet_fuzz::descending_order(c.data(), num_experts)) {
    if (static_cast<Index>(want.size()) == k) break;
    if (kept[static_cast<std::size_t>(e / size)] != 0) want.push_back(e);
  }
  return want;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  Gate::Options options;
  options.model_dim = model_dim;
  options.num_groups = in.in_range(-1, 6);
  const Index group_size = in.in_range(1, 5);
  switch (in.u8() % 4) {
    case 0:
      options.num_experts = in.in_range(0, 600);  // rarely a multiple of num_groups
      break;
    case 1:
      options.num_experts = std::max<Index>(options.num_groups, 1) * group_size + in.in_range(0, 2);
      break;
    default:
      options.num_experts = std::max<Index>(options.num_groups, 1) * group_size;
      break;
  }
  const Index num_experts = options.num_experts;
  options.groups_kept = in.in_range(-1, options.num_groups + 1);
  const Index selectable =
      options.num_groups >= 1 ? options.groups_kept * (num_experts / options.num_groups) : 0;
  options.k = in.in_range(-1, std::max<Index>(selectable, 1) + 1);
  options.scoring = in.flag() ? moet::ExpertScoring::kSigmoid : moet::ExpertScoring::kSoftmax;
  options.group_score = in.flag() ? moet::GroupScore::kTopTwoSum : moet::GroupScore::kMax;
  options.renormalize = in.flag();
  options.scaling = in.flag() ? moet::WeightScaling::kInsteadOfNormalization
                              : moet::WeightScaling::kAfterNormalization;
  options.scaling_factor = scaling_factor(in);
  options.init_seed = in.u8();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  ctx.seed = in.u64();
  ctx.step = in.u8();
  switch (in.u8() % 8) {  // the gate takes ctx.overrides.k only
    case 0:
    case 1:
      ctx.overrides.k = in.in_range(-1, std::max<Index>(selectable, 1) + 1);
      break;
    case 2:
      ctx.overrides.p = 0.5;
      break;
    case 3:
      ctx.overrides.k_avg = 1.0;
      break;
    default:
      break;
  }
  moet::set_flush_denormals(in.u8() % 4 != 0);
  const bool finite_only = (in.u8() % 8) != 0;
  const std::uint8_t bias_mode = in.u8() % 4;  // 0 none, 1 wrong length, else fuzzed values
  const bool use_balancer = in.u8() % 4 != 0;
  const double rate = update_rate(in);
  const Index steps = in.in_range(1, 3);

  const bool groups_ok =
      options.num_groups >= 1 && num_experts >= 1 && num_experts % options.num_groups == 0;
  const Index group_width = groups_ok ? num_experts / options.num_groups : 0;
  const bool kept_ok =
      groups_ok && options.groups_kept >= 1 && options.groups_kept <= options.num_groups;
  const auto k_ok = [&](Index k) {
    return kept_ok && k >= 1 && k <= options.groups_kept * group_width;
  };
  const bool valid_options = k_ok(options.k) &&
                             (options.group_score != moet::GroupScore::kTopTwoSum ||
                              options.num_groups == 1 || group_width >= 2) &&
                             std::isfinite(options.scaling_factor) &&
                             options.scaling_factor > 0.0 &&
                             std::isfinite(static_cast<float>(options.scaling_factor)) &&
                             static_cast<float>(options.scaling_factor) > 0.0f;
  const bool valid_call = ctx.overrides.p == 0.0 && ctx.overrides.k_avg == 0.0 &&
                          (ctx.overrides.k == 0 || k_ok(ctx.overrides.k));
  const Index k = ctx.overrides.k != 0 ? ctx.overrides.k : options.k;
  bool constructed = false;
  try {
    Gate gate(options);
    constructed = true;
    MOET_FUZZ_CHECK(valid_options,
                    "invalid options were accepted: E %ld, num_groups %ld, groups_kept %ld, k %ld, "
                    "group_score %s, scaling_factor %g",
                    static_cast<long>(num_experts), static_cast<long>(options.num_groups),
                    static_cast<long>(options.groups_kept), static_cast<long>(options.k),
                    options.group_score == moet::GroupScore::kMax ? "kMax" : "kTopTwoSum",
                    options.scaling_factor);
    // The bias: none (0), a wrong length (refused, nothing changed) or fuzzed values (refused
    // exactly when one is NaN or Inf).
    bool bias_set = false;
    if (bias_mode == 1) {
      const std::vector<float> wrong(static_cast<std::size_t>(num_experts + (in.flag() ? 1 : -1)),
                                     1.0f);
      bool threw = false;
      try {
        gate.set_score_bias(wrong);
      } catch (const moet::Error&) {
        threw = true;
      }
      MOET_FUZZ_CHECK(threw, "set_score_bias took %zu values for %ld experts", wrong.size(),
                      static_cast<long>(num_experts));
    } else if (bias_mode >= 2) {
      const auto b = in.matrix(1, num_experts, finite_only);
      bool threw = false;
      try {
        gate.set_score_bias(std::span<const float>(b.data(), static_cast<std::size_t>(b.size())));
      } catch (const moet::Error&) {
        threw = true;
      }
      MOET_FUZZ_CHECK(threw == !b.allFinite(), "set_score_bias %s a %s bias",
                      threw ? "refused" : "took", b.allFinite() ? "finite" : "non-finite");
      if (!threw) {
        MOET_FUZZ_CHECK(gate.score_bias() == b, "score_bias() is not the bias set");
      }
      bias_set = !threw;
    }
    MOET_FUZZ_CHECK(gate.score_bias().rows() == 1 && gate.score_bias().cols() == num_experts &&
                        (bias_set || gate.score_bias().isZero(0.0f)),
                    "score_bias() is not (1, E), or a refused bias changed it");
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_experts, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    const bool small = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f);

    std::optional<moet::LossFreeBalancer<float>> balancer;
    const bool rate_ok =
        std::isfinite(rate) && rate > 0.0 && std::isfinite(static_cast<float>(rate));
    if (use_balancer) {
      try {
        balancer.emplace(moet::LossFreeBalancer<float>::Options{.update_rate = rate});
      } catch (const moet::Error&) {
        MOET_FUZZ_CHECK(!rate_ok, "LossFreeBalancer refused the rate %g", rate);
      }
      MOET_FUZZ_CHECK(!balancer || rate_ok, "LossFreeBalancer took the rate %g", rate);
    }

    const bool normalizes = options.renormalize &&
                            (options.scaling == moet::WeightScaling::kAfterNormalization || k > 1);
    const bool scales = options.scaling == moet::WeightScaling::kAfterNormalization || !normalizes;
    const float scale = scales ? static_cast<float>(options.scaling_factor) : 1.0f;
    const bool softmax = options.scoring == moet::ExpertScoring::kSoftmax;
    moet::RowMatrix<float> z(num_tokens, num_experts);
    for (Index step = 0; step < steps; ++step) {
      moet::Routing<float> plan;
      if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
        MOET_FUZZ_CHECK(!small || !valid_call, "routing small finite inputs threw");
        return 0;
      }
      MOET_FUZZ_CHECK(valid_call, "routed with an invalid override");
      if (step == 0 && num_tokens > 0) {  // x and W_r stay: the logits too
        gate.logits(x, z);
        moet_fuzz::check_logits(x, gate.router(), z);
      }
      moet_fuzz::check_plan(plan, num_tokens, num_experts, k, k, std::max(1.0f, scale));
      MOET_FUZZ_CHECK(plan.probs_are_distribution == softmax,
                      "probs_are_distribution is %d for %s scores", plan.probs_are_distribution,
                      softmax ? "softmax" : "sigmoid");
      const auto s = plan.probs();
      if (softmax && num_tokens > 0) moet_fuzz::check_softmax(z, s);
      for (Index t = 0; t < num_tokens; ++t) {
        for (Index e = 0; e < num_experts && !softmax; ++e) {
          const double want = 1.0 / (1.0 + std::exp(-static_cast<double>(z(t, e))));
          MOET_FUZZ_CHECK(std::abs(static_cast<double>(s(t, e)) - want) <= 1e-5,
                          "s(%ld, %ld) = %g, sigmoid in double %g", static_cast<long>(t),
                          static_cast<long>(e), static_cast<double>(s(t, e)), want);
        }
        const float* row = s.data() + t * num_experts;
        const auto want = want_experts(options, k, row, gate.score_bias().data());
        const auto ids = plan.experts(t);
        const auto weights = plan.weights(t);
        float sum = 0.0f;
        for (std::size_t j = 0; j < want.size(); ++j) {
          MOET_FUZZ_CHECK(ids[j] == want[j], "step %ld token %ld slot %zu: expert %d, want %d",
                          static_cast<long>(step), static_cast<long>(t), j, ids[j], want[j]);
          sum = flushed(sum + row[want[j]]);
        }
        const float denominator = flushed(sum + 1e-20f);
        for (std::size_t j = 0; j < want.size(); ++j) {
          float w = row[want[j]];  // the unbiased score
          if (normalizes) w = flushed(w / denominator);
          w = flushed(w * scale);
          MOET_FUZZ_CHECK(weights[j] == w, "step %ld token %ld slot %zu: weight %g, want %g",
                          static_cast<long>(step), static_cast<long>(t), j,
                          static_cast<double>(weights[j]), static_cast<double>(w));
        }
      }
      moet_fuzz::check_reuse(gate, x, ctx, plan);
      if (!balancer) continue;

      // Record: a plan over another expert count first fixes that count (then the real plan and
      // the update are refused, nothing changed, and reset forgets it) or, once loads exist, is
      // refused; then the plan once or twice.
      if (in.u8() % 8 == 0) {
        moet::Routing<float> other;
        other.reset(0, num_experts + 1);
        other.commit_counts();
        if (balancer->loads().empty()) {
          balancer->record(other);
          bool threw = false;
          try {
            balancer->record(plan);
          } catch (const moet::Error&) {
            threw = true;
          }
          MOET_FUZZ_CHECK(threw, "record took a plan over another expert count");
          const moet::RowMatrix<float> before = gate.score_bias();
          threw = false;
          try {
            balancer->update(gate);
          } catch (const moet::Error&) {
            threw = true;
          }
          MOET_FUZZ_CHECK(threw && gate.score_bias() == before,
                          "update on a gate of another expert count %s",
                          threw ? "changed the bias" : "did not throw");
          balancer->reset();
        } else {
          bool threw = false;
          try {
            balancer->record(other);
          } catch (const moet::Error&) {
            threw = true;
          }
          MOET_FUZZ_CHECK(threw, "record took a plan over another expert count");
        }
      }
      std::vector<std::int64_t> loads(static_cast<std::size_t>(num_experts), 0);
      const Index records = in.in_range(1, 2);
      for (Index r = 0; r < records; ++r) {
        balancer->record(plan);
        for (const auto e : plan.experts()) ++loads[static_cast<std::size_t>(e)];
      }
      MOET_FUZZ_CHECK(balancer->loads().size() == loads.size() &&
                          std::equal(loads.begin(), loads.end(), balancer->loads().begin()),
                      "the recorded loads are not the plans' assignment counts");
      // The documented update: b_e += u sign(mean load - load_e), in double, stored as float.
      std::int64_t total = 0;
      for (const auto l : loads) total += l;
      const double mean = static_cast<double>(total) / static_cast<double>(num_experts);
      std::vector<float> want_bias(static_cast<std::size_t>(num_experts));
      bool overflows = false;  // a bias past float's range: documented error, nothing changed
      for (Index e = 0; e < num_experts; ++e) {
        const auto load = static_cast<double>(loads[static_cast<std::size_t>(e)]);
        const double sign = mean > load ? 1.0 : (mean < load ? -1.0 : 0.0);
        want_bias[static_cast<std::size_t>(e)] = static_cast<float>(
            static_cast<double>(gate.score_bias()(0, e)) + (total > 0 ? rate * sign : 0.0));
        overflows = overflows || !std::isfinite(want_bias[static_cast<std::size_t>(e)]);
      }
      if (overflows) {
        const std::vector<float> before(gate.score_bias().data(),
                                        gate.score_bias().data() + num_experts);
        bool threw = false;
        try {
          balancer->update(gate);
        } catch (const moet::Error&) {
          threw = true;
        }
        MOET_FUZZ_CHECK(threw, "update took a bias past float's range (u %g)", rate);
        for (Index e = 0; e < num_experts; ++e) {
          MOET_FUZZ_CHECK(gate.score_bias()(0, e) == before[static_cast<std::size_t>(e)],
                          "a refused update changed the bias of expert %ld", static_cast<long>(e));
        }
        MOET_FUZZ_CHECK(std::equal(loads.begin(), loads.end(), balancer->loads().begin()),
                        "a refused update changed the loads");
        return 0;
      }
      try {
        balancer->update(gate);
      } catch (const moet::Error&) {
        MOET_FUZZ_CHECK(false, "update threw for a gate of the plans' %ld experts (u %g)",
                        static_cast<long>(num_experts), rate);
      }
      for (Index e = 0; e < num_experts; ++e) {
        MOET_FUZZ_CHECK(gate.score_bias()(0, e) == want_bias[static_cast<std::size_t>(e)],
                        "bias of expert %ld after update %g, want %g (load %ld of %ld, u %g)",
                        static_cast<long>(e), static_cast<double>(gate.score_bias()(0, e)),
                        static_cast<double>(want_bias[static_cast<std::size_t>(e)]),
                        static_cast<long>(loads[static_cast<std::size_t>(e)]),
                        static_cast<long>(total), rate);
      }
      for (const auto l : balancer->loads()) MOET_FUZZ_CHECK(l == 0, "update left a load");
    }
  } catch (const moet::Error& error) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw: %s",
                    error.what());
  }
  return 0;
}
