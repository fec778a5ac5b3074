// libFuzzer target: ExpertChoiceGate. The input decodes into the options (any capacity factor,
// including 0, negative, NaN, Inf, tiny, huge and half-way values, any min_capacity, any
// expert count), x and the router weights (NaN, Inf, denormals, huge values, exact ties, either
// layout), the context (with or without overrides, which the gate must refuse) and the
// denormal-flush mode. Either the gate throws moet::Error, and only for invalid options or
// inputs, or the plan is valid: check_plan with 0 to E experts per token, P the softmax of the
// logits, and the rule of docs/algorithms.md §15 checked independently: C is round(cf T / E)
// half to even, raised to min_capacity, at most T; every expert takes exactly the C tokens with
// the largest P[:, e] (ties to the lower token); a token's slots are its experts in descending
// P[t, :] (ties to the lower id), weighted by the raw P.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "moet/gates/expert_choice.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

double capacity_factor(Bytes& in) {
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
      return -std::numeric_limits<double>::infinity();
    case 5:
      return 1e-30;  // C rounds to 0
    case 6:
      return 1e30;  // C = T
    case 7:
      return std::numeric_limits<double>::max();  // cf T overflows to Inf: C = T
    case 8:
      return static_cast<double>(in.u8() % 17) / 2.0;  // 0 .. 8 in halves: half-way C values
    default:
      return static_cast<double>(in.u8()) / 32.0;  // 0 .. 8, 0 included
  }
}

Index min_capacity(Bytes& in) {
  switch (in.u8() % 8) {
    case 0:
      return -1;
    case 1:
      return 0;
    case 2:
      return std::numeric_limits<Index>::max();
    case 3:
      return std::numeric_limits<Index>::min();
    default:
      return in.in_range(0, 45);
  }
}

// The documented capacity, computed another way: round to nearest, half to even (std::nearbyint
// in the default rounding mode), then at least min_capacity, at most T.
Index want_capacity(Index num_tokens, Index num_experts, double cf, Index min_cap) {
  const double v =
      std::nearbyint(cf * static_cast<double>(num_tokens) / static_cast<double>(num_experts));
  const Index c = v >= static_cast<double>(num_tokens) ? num_tokens : static_cast<Index>(v);
  return std::min(std::max(c, min_cap), num_tokens);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  Index num_experts = in.flag() ? in.in_range(0, 600) : in.in_range(1, 12);
  if (in.u8() % 32 == 0) num_experts = Index{std::numeric_limits<std::int32_t>::max()} + 1;
  moet::ExpertChoiceGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = num_experts;
  options.capacity_factor = capacity_factor(in);
  options.min_capacity = min_capacity(in);
  options.init_seed = in.u8();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  ctx.seed = in.u64();
  ctx.step = in.u8();
  switch (in.u8() % 8) {  // the gate has no overrides: any set field is an error
    case 0:
      ctx.overrides.k = in.in_range(-1, 3);
      break;
    case 1:
      ctx.overrides.p = 0.5;
      break;
    case 2:
      ctx.overrides.k_max = 1;
      break;
    case 3:
      ctx.overrides.k_avg = 1.0;
      break;
    default:
      break;
  }
  moet::set_flush_denormals(in.u8() % 4 != 0);
  const bool finite_only = (in.u8() % 8) != 0;

  const bool valid_options = num_experts >= 1 &&
                             num_experts <= std::numeric_limits<std::int32_t>::max() &&
                             std::isfinite(options.capacity_factor) &&
                             options.capacity_factor > 0.0 && options.min_capacity >= 0;
  bool constructed = false;
  try {
    moet::ExpertChoiceGate<float> gate(options);
    constructed = true;
    MOET_FUZZ_CHECK(valid_options, "invalid options were accepted");
    const Index c =
        want_capacity(num_tokens, num_experts, options.capacity_factor, options.min_capacity);
    MOET_FUZZ_CHECK(gate.capacity(num_tokens) == c, "capacity(%ld) = %ld, want %ld",
                    static_cast<long>(num_tokens), static_cast<long>(gate.capacity(num_tokens)),
                    static_cast<long>(c));
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_experts, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    const bool small = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f);
    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!small || !ctx.overrides.empty(), "routing small finite inputs threw");
      return 0;
    }
    MOET_FUZZ_CHECK(ctx.overrides.empty(), "routed although ctx.overrides is set");
    moet_fuzz::check_plan(plan, num_tokens, num_experts, 0, num_experts);
    MOET_FUZZ_CHECK(plan.probs_are_distribution, "P is not marked a distribution");
    MOET_FUZZ_CHECK(plan.num_assignments() == c * num_experts, "%ld assignments, want C E = %ld",
                    static_cast<long>(plan.num_assignments()), static_cast<long>(c * num_experts));
    const auto probs = plan.probs();
    if (num_tokens > 0) {
      moet::RowMatrix<float> z(num_tokens, num_experts);
      gate.logits(x, z);
      moet_fuzz::check_logits(x, gate.router(), z);
      moet_fuzz::check_softmax(z, probs);
    }
    // Each expert's chosen tokens: a stable sort of all tokens by P[:, e], the first C.
    std::vector<std::uint8_t> taken(static_cast<std::size_t>(num_tokens * num_experts), 0);
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(num_tokens));
    for (Index e = 0; e < num_experts && c > 0; ++e) {
      for (Index t = 0; t < num_tokens; ++t) {
        tokens[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(t);
      }
      std::stable_sort(tokens.begin(), tokens.end(),
                       [&](std::int32_t a, std::int32_t b) { return probs(a, e) > probs(b, e); });
      for (Index j = 0; j < c; ++j) {
        taken[static_cast<std::size_t>(tokens[static_cast<std::size_t>(j)] * num_experts + e)] = 1;
      }
    }
    std::vector<Index> load(static_cast<std::size_t>(num_experts), 0);
    for (Index t = 0; t < num_tokens; ++t) {
      const auto order = moet_fuzz::descending_order(probs.data() + t * num_experts, num_experts);
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      std::size_t j = 0;
      for (const std::int32_t e : order) {
        if (taken[static_cast<std::size_t>(t * num_experts + e)] == 0) continue;
        MOET_FUZZ_CHECK(j < ids.size() && ids[j] == e,
                        "token %ld slot %zu: expert %d, want %d (of %zu slots)",
                        static_cast<long>(t), j, j < ids.size() ? ids[j] : -1, e, ids.size());
        MOET_FUZZ_CHECK(weights[j] == probs(t, e), "token %ld slot %zu: weight %g is not P %g",
                        static_cast<long>(t), j, static_cast<double>(weights[j]),
                        static_cast<double>(probs(t, e)));
        ++j;
      }
      MOET_FUZZ_CHECK(j == ids.size(), "token %ld has %zu experts, want %zu", static_cast<long>(t),
                      ids.size(), j);
      for (const auto e : ids) ++load[static_cast<std::size_t>(e)];
    }
    for (Index e = 0; e < num_experts; ++e) {
      MOET_FUZZ_CHECK(load[static_cast<std::size_t>(e)] == c,
                      "expert %ld takes %ld tokens, C = %ld", static_cast<long>(e),
                      static_cast<long>(load[static_cast<std::size_t>(e)]), static_cast<long>(c));
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error& error) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw: %s",
                    error.what());
  }
  return 0;
}
