// libFuzzer target: NullExpertGate (AdaMoE). The input decodes into the options (any expert
// count, null count and k, including zero, negative and too large ones, renormalised or not),
// x and the router weights [W_r | W_null] (NaN, Inf, denormals, huge values, exact ties, either
// layout), the context (ctx.overrides.k in or out of range, or a field the gate has not) and
// the denormal-flush mode. Either the gate throws moet::Error, and only for invalid options or
// inputs, or the plan is valid: check_plan with between k - N and min(k, E) experts per token,
// and the rule of docs/algorithms.md §17 checked independently: all_probabilities is the softmax
// of the logits over all E + N slots, probs() its real columns; a token's experts are the real
// slots among the top-k of P (ties to the lower slot, so a real expert before a null one), in
// rank order, weighted by P_e / (sum of the real picks' P) or by the raw P_e.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "moet/gates/null_experts.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

Index num_null(Bytes& in) {
  switch (in.u8() % 16) {
    case 0:
      return in.in_range(-1, 0);
    case 1:
      return std::numeric_limits<std::int32_t>::max();  // E + N > INT32_MAX
    case 2:
      return std::numeric_limits<Index>::max();  // E + N overflows Index
    case 3:
      return in.in_range(1, 300);
    default:
      return in.in_range(1, 8);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  const Index num_experts = in.flag() ? in.in_range(0, 300) : in.in_range(1, 8);
  moet::NullExpertGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = num_experts;
  options.num_null = num_null(in);
  Index num_slots = 0;  // E + N, saturated
  if (__builtin_add_overflow(num_experts, options.num_null, &num_slots)) {
    num_slots = std::numeric_limits<Index>::max();
  }
  options.k = in.in_range(-1, std::min<Index>(num_slots, 600) + 1);
  options.renormalize = in.flag();
  options.init_seed = in.u8();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  ctx.seed = in.u64();
  ctx.step = in.u8();
  switch (in.u8() % 8) {  // the gate takes ctx.overrides.k only
    case 0:
    case 1:
      ctx.overrides.k = in.in_range(-1, std::min<Index>(num_slots, 600) + 1);
      break;
    case 2:
      ctx.overrides.p = 0.5;
      break;
    case 3:
      ctx.overrides.k_max = 1;
      break;
    default:
      break;
  }
  moet::set_flush_denormals(in.u8() % 4 != 0);
  const bool finite_only = (in.u8() % 8) != 0;

  const auto in_k_range = [&](Index k) { return k >= 1 && k <= num_slots; };
  const bool valid_options = num_experts >= 1 && options.num_null >= 1 &&
                             num_slots <= std::numeric_limits<std::int32_t>::max() &&
                             in_k_range(options.k);
  const bool valid_call = ctx.overrides.p == 0.0 && ctx.overrides.k_max == 0 &&
                          (ctx.overrides.k == 0 || in_k_range(ctx.overrides.k));
  const Index k = ctx.overrides.k != 0 ? ctx.overrides.k : options.k;
  bool constructed = false;
  try {
    moet::NullExpertGate<float> gate(options);
    constructed = true;
    MOET_FUZZ_CHECK(valid_options, "invalid options were accepted");
    MOET_FUZZ_CHECK(gate.num_experts() == num_experts && gate.num_slots() == num_slots &&
                        gate.router().cols() == num_slots,
                    "num_experts, num_slots or the router's width is wrong");
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_slots, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    const bool small = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f);
    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!small || !valid_call, "routing small finite inputs threw");
      return 0;
    }
    MOET_FUZZ_CHECK(valid_call, "routed with an invalid override");
    const Index num_null_slots = options.num_null;
    moet_fuzz::check_plan(plan, num_tokens, num_experts, std::max<Index>(0, k - num_null_slots),
                          std::min(k, num_experts));
    MOET_FUZZ_CHECK(!plan.probs_are_distribution, "P[:, :E] is marked a distribution");
    const auto probs = plan.probs();
    MOET_FUZZ_CHECK(probs.rows() == num_tokens && probs.cols() == num_experts,
                    "probs() is not (T, E)");
    moet::RowMatrix<float> all(num_tokens, num_slots);
    if (num_tokens > 0) {
      moet::RowMatrix<float> z(num_tokens, num_slots);
      gate.logits(x, z);
      moet_fuzz::check_logits(x, gate.router(), z);
      gate.all_probabilities(x, all);
      moet_fuzz::check_softmax(z, all);
    }
    for (Index t = 0; t < num_tokens; ++t) {
      for (Index e = 0; e < num_experts; ++e) {
        MOET_FUZZ_CHECK(probs(t, e) == all(t, e), "probs(%ld, %ld) = %g, all_probabilities %g",
                        static_cast<long>(t), static_cast<long>(e),
                        static_cast<double>(probs(t, e)), static_cast<double>(all(t, e)));
      }
      // The top-k slots of P (stable: ties to the lower slot); the real ones, in rank order.
      const auto order = moet_fuzz::descending_order(all.data() + t * num_slots, num_slots);
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      std::size_t j = 0;
      float sum = 0.0f;
      for (Index r = 0; r < k; ++r) {
        const std::int32_t e = order[static_cast<std::size_t>(r)];
        if (e >= num_experts) continue;  // a null pick: not in the plan
        MOET_FUZZ_CHECK(j < ids.size() && ids[j] == e,
                        "token %ld slot %zu: expert %d, want %d (of %zu slots)",
                        static_cast<long>(t), j, j < ids.size() ? ids[j] : -1, e, ids.size());
        sum += all(t, e);
        ++j;
      }
      MOET_FUZZ_CHECK(j == ids.size(), "token %ld has %zu experts, %zu real picks",
                      static_cast<long>(t), ids.size(), j);
      for (std::size_t a = 0; a < ids.size(); ++a) {
        const float p = all(t, ids[a]);
        const float want = options.renormalize && sum > 0.0f ? p / sum : p;
        MOET_FUZZ_CHECK(weights[a] == want, "token %ld slot %zu: weight %g, want %g",
                        static_cast<long>(t), a, static_cast<double>(weights[a]),
                        static_cast<double>(want));
      }
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error& error) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw: %s",
                    error.what());
  }
  return 0;
}
