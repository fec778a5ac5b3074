// libFuzzer target: StochasticGate. The input decodes into the options (any num_experts and
// inference mode, including invalid ones), x (NaN, Inf, denormals, huge values), training or
// eval, seed, step and sequence length. Either the gate throws moet::Error, or the plan is
// valid: check_plan, one expert per token with weight 1 (every expert with weight 1/E in
// ensemble mode), the whole batch on `training_expert(seed, step)` in training, and one expert
// per position or per sequence in those modes.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "moet/gates/stochastic.hpp"

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using moet::Index;
  moet_fuzz::Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 60);
  const Index model_dim = in.in_range(1, 8);
  moet::StochasticGate<float>::Options options;
  options.model_dim = in.flag() ? model_dim : in.in_range(-1, 8);
  options.num_experts = in.flag() ? in.in_range(-1, 4) : in.in_range(1, 5000);
  options.inference = static_cast<moet::StochasticInference>(in.in_range(0, 3));
  options.stream = in.u64();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  ctx.seed = in.u64();
  ctx.step = in.u64();
  ctx.sequence_length = in.flag() ? 0 : in.in_range(-1, num_tokens + 1);
  const bool finite_only = (in.u8() % 8) != 0;
  const bool valid_options = options.model_dim >= 1 && options.num_experts >= 1;
  bool constructed = false;
  try {
    moet::StochasticGate<float> gate(options);
    constructed = true;
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    const bool well_formed = options.model_dim == model_dim && x.allFinite() &&
                             ctx.sequence_length >= 0 &&
                             (ctx.sequence_length == 0 || num_tokens % ctx.sequence_length == 0);
    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!well_formed, "a well-formed call threw");
      return 0;
    }
    MOET_FUZZ_CHECK(well_formed, "a malformed call routed");
    const Index e_count = options.num_experts;
    const bool ensemble =
        !ctx.training && options.inference == moet::StochasticInference::kEnsemble;
    moet_fuzz::check_plan(plan, num_tokens, e_count, ensemble ? e_count : 1,
                          ensemble ? e_count : 1);
    MOET_FUZZ_CHECK(plan.probs().size() == 0, "a stochastic plan has probabilities");
    const Index len = ctx.sequence_length == 0 ? num_tokens : ctx.sequence_length;
    for (Index t = 0; t < num_tokens; ++t) {
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      if (ensemble) {
        for (std::size_t j = 0; j < ids.size(); ++j) {
          MOET_FUZZ_CHECK(ids[j] == static_cast<std::int32_t>(j), "ensemble slot order");
          MOET_FUZZ_CHECK(weights[j] == 1.0f / static_cast<float>(e_count), "ensemble weight");
        }
        continue;
      }
      MOET_FUZZ_CHECK(weights[0] == 1.0f, "token %ld: weight %g", static_cast<long>(t),
                      static_cast<double>(weights[0]));
      if (ctx.training) {
        MOET_FUZZ_CHECK(ids[0] == gate.training_expert(ctx.seed, ctx.step),
                        "token %ld is not on the batch's training expert", static_cast<long>(t));
      } else if (options.inference == moet::StochasticInference::kPosition && t >= len) {
        MOET_FUZZ_CHECK(ids[0] == plan.experts(t - len)[0], "position %ld differs across sequences",
                        static_cast<long>(t % len));
      } else if (options.inference == moet::StochasticInference::kSequence && t % len != 0) {
        MOET_FUZZ_CHECK(ids[0] == plan.experts(t - 1)[0], "sequence %ld has two experts",
                        static_cast<long>(t / len));
      }
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error&) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw");
  }
  return 0;
}
