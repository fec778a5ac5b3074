// libFuzzer target: TopKGate (plain, renormalised, noisy, with capacity). The input decodes
// into the options (any k, capacity factor, min capacity, including invalid ones), x and the
// router weights (NaN, Inf, denormals, huge values, exact ties) and the context. Either the
// gate throws moet::Error, or the plan is valid: see check_plan plus the top-k rule below.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "moet/gates/top_k.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

double capacity_factor(Bytes& in) {
  switch (in.u8() % 8) {
    case 0:
      return 0.0;  // dropless
    case 1:
      return static_cast<double>(in.u8()) / 32.0;  // 0 .. 8, 0 included
    case 2:
      return -1.0;
    case 3:
      return std::numeric_limits<double>::quiet_NaN();
    case 4:
      return std::numeric_limits<double>::infinity();
    case 5:
      return 1e30;
    case 6:
      return 1e-30;
    default:
      return 0.25 * static_cast<double>(in.u8() % 8 + 1);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  const Index num_experts = in.flag() ? in.in_range(0, 600) : in.in_range(1, 12);
  moet::TopKGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = num_experts;
  options.k = in.in_range(-1, num_experts + 1);
  options.renormalize = in.flag();
  options.noisy = in.flag();
  options.capacity_factor = capacity_factor(in);
  options.min_capacity = in.in_range(-1, 6);
  options.init_seed = in.u8();
  moet::RouteContext ctx;
  ctx.training = in.flag();
  ctx.seed = in.u64();
  ctx.step = in.u8();
  const bool finite_only = (in.u8() % 8) != 0;

  const bool valid_options = num_experts >= 1 && options.k >= 1 && options.k <= num_experts &&
                             std::isfinite(options.capacity_factor) &&
                             options.capacity_factor >= 0.0 && options.min_capacity >= 0;
  bool constructed = false;
  try {
    moet::TopKGate<float> gate(options);
    constructed = true;
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    // Weights through the setters (non-finite ones are rejected there, not by route), in
    // either layout.
    const bool torch_layout = options.init_seed % 2 == 1;
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    const auto set_noise = [&](const auto& w, moet::WeightLayout l) {
      gate.set_noise_router(w, l);
    };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_experts, finite_only),
                                torch_layout)) {
      return 0;
    }
    if (options.noisy &&
        !moet_fuzz::set_weights(set_noise, in.matrix(model_dim, num_experts, finite_only),
                                torch_layout)) {
      return 0;
    }
    const bool small = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f) &&
                       (!options.noisy || moet_fuzz::all_small(gate.noise_router(), 1e3f));

    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!small, "routing small finite inputs threw");
      return 0;
    }
    const Index k = options.k;
    const bool capped = options.capacity_factor > 0.0;
    moet_fuzz::check_plan(plan, num_tokens, num_experts, capped ? 0 : k, k);
    MOET_FUZZ_CHECK(plan.num_assignments() + plan.dropped == num_tokens * k,
                    "assignments %ld + dropped %ld != T * k",
                    static_cast<long>(plan.num_assignments()), static_cast<long>(plan.dropped));
    if (capped && num_tokens > 0) {
      std::vector<Index> load(static_cast<std::size_t>(num_experts), 0);
      for (const auto e : plan.experts()) ++load[static_cast<std::size_t>(e)];
      const Index cap = gate.capacity(num_tokens);
      for (Index e = 0; e < num_experts; ++e) {
        MOET_FUZZ_CHECK(load[static_cast<std::size_t>(e)] <= cap,
                        "expert %ld load %ld > capacity %ld", static_cast<long>(e),
                        static_cast<long>(load[static_cast<std::size_t>(e)]),
                        static_cast<long>(cap));
      }
    }
    // Without noise the experts are the top-k of P (ties to the lower id), in that order
    // (a subsequence of it after capacity drops), weighted by P or P renormalised.
    const bool noisy = options.noisy && ctx.training;
    const auto probs = plan.probs();
    for (Index t = 0; t < num_tokens && !noisy; ++t) {
      const auto order = moet_fuzz::descending_order(probs.data() + t * num_experts, num_experts);
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      std::size_t j = 0;
      float sum = 0.0f;
      for (Index r = 0; r < k && j < ids.size(); ++r) {
        if (ids[j] == order[static_cast<std::size_t>(r)])
          ++j;
        else
          MOET_FUZZ_CHECK(capped, "token %ld slot %zu: expert %d, want %d", static_cast<long>(t), j,
                          ids[j], order[static_cast<std::size_t>(r)]);
      }
      MOET_FUZZ_CHECK(j == ids.size(), "token %ld: experts are not the top-k of P in order",
                      static_cast<long>(t));
      for (std::size_t a = 0; a < ids.size(); ++a) sum += probs(t, ids[a]);
      for (std::size_t a = 0; a < ids.size(); ++a) {
        const float p = probs(t, ids[a]);
        const float want = !options.renormalize ? p : (sum > 0.0f ? p / sum : 0.0f);
        MOET_FUZZ_CHECK(weights[a] == want, "token %ld slot %zu: weight %g, want %g",
                        static_cast<long>(t), a, static_cast<double>(weights[a]),
                        static_cast<double>(want));
      }
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error&) {
    // Only the constructor may throw here (route_both catches the routing errors).
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw");
  }
  return 0;
}
