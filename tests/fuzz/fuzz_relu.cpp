// libFuzzer target: ReluGate (ReMoE). The input decodes into the options (any model_dim and
// expert count, including zero, negative and too large ones), x and the router weights (NaN,
// Inf, denormals, huge values, exact ties, either layout), the context (with or without
// overrides, which the gate must refuse) and the denormal-flush mode. Either the gate throws
// moet::Error, and only for invalid options or inputs, or the plan is valid: check_plan with 0
// to E experts per token, and the rule of docs/algorithms.md §16 checked independently: the
// logits z are x W (against double), probs() is R = relu(z), a token's experts are exactly those
// with R > 0, in descending R (ties to the lower id), each weighted by its R.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "moet/gates/relu.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  Index num_experts = in.flag() ? in.in_range(0, 600) : in.in_range(1, 12);
  moet::ReluGate<float>::Options options;
  options.model_dim = model_dim;
  switch (in.u8() % 32) {  // sometimes an invalid shape
    case 0:
      options.model_dim = in.in_range(-1, 0);
      break;
    case 1:
      num_experts = -1;
      break;
    case 2:
      num_experts = Index{std::numeric_limits<std::int32_t>::max()} + 1;
      break;
    default:
      break;
  }
  options.num_experts = num_experts;
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

  const bool valid_options = options.model_dim >= 1 && num_experts >= 1 &&
                             num_experts <= std::numeric_limits<std::int32_t>::max();
  bool constructed = false;
  try {
    moet::ReluGate<float> gate(options);
    constructed = true;
    MOET_FUZZ_CHECK(valid_options, "invalid options were accepted");
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
    // Weights and R are unbounded above (no softmax): only finite and >= 0.
    constexpr float kUnbounded = std::numeric_limits<float>::infinity();
    moet_fuzz::check_plan(plan, num_tokens, num_experts, 0, num_experts, kUnbounded, kUnbounded);
    MOET_FUZZ_CHECK(!plan.probs_are_distribution, "R is marked a distribution");
    const auto r = plan.probs();
    MOET_FUZZ_CHECK(r.rows() == num_tokens && r.cols() == num_experts, "probs() is not (T, E)");
    moet::RowMatrix<float> z(num_tokens, num_experts);
    if (num_tokens > 0) {
      gate.logits(x, z);  // the bits route starts from
      moet_fuzz::check_logits(x, gate.router(), z);
    }
    for (Index t = 0; t < num_tokens; ++t) {
      for (Index e = 0; e < num_experts; ++e) {
        const float want = z(t, e) > 0.0f ? z(t, e) : 0.0f;
        MOET_FUZZ_CHECK(r(t, e) == want, "R(%ld, %ld) = %g, relu(z) = %g", static_cast<long>(t),
                        static_cast<long>(e), static_cast<double>(r(t, e)),
                        static_cast<double>(want));
      }
      // The experts with a positive logit, by descending R, ties to the lower id.
      const auto order = moet_fuzz::descending_order(z.data() + t * num_experts, num_experts);
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      std::size_t j = 0;
      for (const std::int32_t e : order) {
        if (!(z(t, e) > 0.0f)) break;
        MOET_FUZZ_CHECK(j < ids.size() && ids[j] == e,
                        "token %ld slot %zu: expert %d, want %d (of %zu slots)",
                        static_cast<long>(t), j, j < ids.size() ? ids[j] : -1, e, ids.size());
        MOET_FUZZ_CHECK(weights[j] == z(t, e), "token %ld slot %zu: weight %g, want relu(z) %g",
                        static_cast<long>(t), j, static_cast<double>(weights[j]),
                        static_cast<double>(z(t, e)));
        ++j;
      }
      MOET_FUZZ_CHECK(j == ids.size(), "token %ld has %zu experts, %zu positive logits",
                      static_cast<long>(t), ids.size(), j);
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error& error) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw: %s",
                    error.what());
  }
  return 0;
}
