// libFuzzer target: TopAnyGate. The input decodes into the options (any num_experts,
// initial_experts, temperature, variant, including invalid ones), x, the gate embeddings and the
// thresholds (NaN, Inf, denormals, huge values, exact ties, all thresholds far above 1), the
// expert mask (valid 0/1 masks, all zero, or an invalid entry) and training or eval. Either
// the gate throws moet::Error, or the plan is valid: check_plan, only active slots, ascending
// ids with weight 1/k, or the eval fallback (one expert, the best active score, weight 1 or the
// raw score).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "moet/gates/top_any.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

float temperature(Bytes& in) {
  switch (in.u8() % 8) {
    case 0:
      return 0.0f;
    case 1:
      return -1.0f;
    case 2:
      return std::numeric_limits<float>::infinity();
    case 3:
      return std::numeric_limits<float>::quiet_NaN();
    case 4:
      return 1e30f;
    case 5:
      return 1e-30f;
    default:
      return static_cast<float>(in.u8() + 1) / 16.0f;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  moet::TopAnyGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = in.flag() ? in.in_range(0, 300) : in.in_range(0, 10);
  options.initial_experts = in.flag() ? 0 : in.in_range(-1, options.num_experts + 4);
  options.variant = in.flag() ? moet::TopAnyVariant::kTutel : moet::TopAnyVariant::kDeepSpeed;
  options.temperature = temperature(in);
  options.init_seed = in.u8();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  const bool finite_only = (in.u8() % 8) != 0;
  const std::uint8_t threshold_mode = in.u8() % 4;
  const std::uint8_t mask_mode = in.u8() % 4;
  const bool valid_options = options.num_experts >= 1 && options.initial_experts >= 0 &&
                             options.initial_experts <= options.num_experts &&
                             std::isfinite(options.temperature) && options.temperature > 0.0f;
  bool constructed = false;
  bool state_set = false;
  try {
    moet::TopAnyGate<float> gate(options);
    constructed = true;
    const Index emax = gate.num_experts();
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    // Embeddings through the setter (non-finite ones are rejected there), in either layout.
    const auto set_embeddings = [&](const auto& w, moet::WeightLayout l) {
      gate.set_gate_embeddings(w, l);
    };
    if (in.flag() &&
        !moet_fuzz::set_weights(set_embeddings, in.matrix(model_dim, emax, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    // Thresholds: decoded values, all far above 1 (nothing fires), or all exactly 0.
    moet::Vector<float> theta(emax);
    for (Index e = 0; e < emax; ++e) {
      float v = in.value();
      if (finite_only && !std::isfinite(v)) v = 0.0f;
      if (threshold_mode == 1) v = std::isfinite(v) ? 1.5f + std::abs(v) : 50.0f;
      if (threshold_mode == 2) v = 0.0f;
      theta[e] = v;
    }
    try {
      gate.set_thresholds(theta);
    } catch (const moet::Error&) {
      MOET_FUZZ_CHECK(!theta.allFinite(), "set_thresholds rejected finite thresholds");
      return 0;  // documented: thresholds must be finite
    }
    if (mask_mode == 1 || mask_mode == 2) {
      moet::Vector<float> mask(emax);
      for (Index e = 0; e < emax; ++e) mask[e] = mask_mode == 2 ? 0.0f : (in.flag() ? 1.0f : 0.0f);
      gate.set_expert_mask(mask);
    } else if (mask_mode == 3 && emax > 0) {
      moet::Vector<float> mask = gate.expert_mask();
      mask[in.in_range(0, emax - 1)] = 0.5f;
      try {
        gate.set_expert_mask(mask);
      } catch (const moet::Error&) {
        return 0;  // documented: entries must be 0 or 1
      }
      MOET_FUZZ_CHECK(false, "set_expert_mask accepted 0.5");
    }
    state_set = true;
    const bool small = moet_fuzz::all_small(x, 1e3f) &&
                       moet_fuzz::all_small(gate.gate_embeddings(), 1e3f) &&
                       gate.thresholds().allFinite();

    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!small, "routing small finite inputs threw");
      return 0;
    }
    const Index active = gate.num_active();
    const bool fallback = !ctx.training && active > 0;
    moet_fuzz::check_plan(plan, num_tokens, emax, fallback ? 1 : 0, active);
    MOET_FUZZ_CHECK(plan.live_experts == active, "live_experts %ld, want %ld",
                    static_cast<long>(plan.live_experts), static_cast<long>(active));
    const auto& mask = gate.expert_mask();
    const auto scores = plan.probs();
    std::vector<float> fire(static_cast<std::size_t>(emax));  // sigmoid(tau theta), as the gate
    for (Index e = 0; e < emax; ++e) {
      fire[static_cast<std::size_t>(e)] =
          1.0f / (1.0f + std::exp(-(gate.temperature() * theta[e])));
    }
    Index batch_max_k = 0;  // tokens that fire two or more decide the Tutel fallback weight
    for (Index t = 0; t < num_tokens; ++t) {
      Index fired = 0;
      for (Index e = 0; e < emax; ++e) {
        if (mask[e] == 0.0f) {
          MOET_FUZZ_CHECK(scores(t, e) == 0.0f, "inactive slot %ld has a score",
                          static_cast<long>(e));
        }
        if (mask[e] != 0.0f && scores(t, e) > fire[static_cast<std::size_t>(e)]) {
          ++fired;
        }
      }
      batch_max_k = std::max(batch_max_k, fired);
    }
    for (Index t = 0; t < num_tokens; ++t) {
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      Index fired = 0;
      for (Index e = 0; e < emax; ++e) {
        if (mask[e] != 0.0f && scores(t, e) > fire[static_cast<std::size_t>(e)]) {
          MOET_FUZZ_CHECK(static_cast<std::size_t>(fired) < ids.size() &&
                              ids[static_cast<std::size_t>(fired)] == e,
                          "token %ld: expert %ld fires but is not in its slot",
                          static_cast<long>(t), static_cast<long>(e));
          ++fired;
        }
      }
      if (fired > 0) {
        MOET_FUZZ_CHECK(static_cast<Index>(ids.size()) == fired, "token %ld: extra experts",
                        static_cast<long>(t));
        for (const float w : weights) {
          MOET_FUZZ_CHECK(w == 1.0f / static_cast<float>(fired), "token %ld: weight is not 1/k",
                          static_cast<long>(t));
        }
      } else if (fallback) {
        MOET_FUZZ_CHECK(ids.size() == 1, "fallback token %ld has %zu experts", static_cast<long>(t),
                        ids.size());
        const std::int32_t best = ids[0];
        MOET_FUZZ_CHECK(mask[best] != 0.0f, "fallback to an inactive slot");
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] == 0.0f) continue;
          MOET_FUZZ_CHECK(
              scores(t, e) < scores(t, best) || (scores(t, e) == scores(t, best) && e >= best),
              "token %ld: fallback %d is not the first best active slot", static_cast<long>(t),
              best);
        }
        const bool raw = options.variant == moet::TopAnyVariant::kTutel && batch_max_k < 2;
        MOET_FUZZ_CHECK(weights[0] == (raw ? scores(t, best) : 1.0f), "token %ld: fallback weight",
                        static_cast<long>(t));
      } else {
        MOET_FUZZ_CHECK(ids.empty(), "token %ld fires nothing but is routed", static_cast<long>(t));
      }
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error&) {
    MOET_FUZZ_CHECK(!constructed && !state_set && !valid_options,
                    "valid options or a valid gate threw");
  }
  return 0;
}
