// libFuzzer target: TopPGate. The input decodes into the options (any p, inclusive or strict,
// any max_k, including invalid ones), x and the router weights (NaN, Inf, denormals, huge
// values, exact ties). Either the gate throws moet::Error, or the plan is valid: check_plan,
// at least one expert per token, the experts a prefix of the descending order of P, the
// weights the raw P, and the prefix length the top-p rule's.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "moet/gates/top_p.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

double top_p(Bytes& in) {
  switch (in.u8() % 10) {
    case 0:
      return 1.0;
    case 1:
      return 0.0;
    case 2:
      return -0.5;
    case 3:
      return 1.0000001;
    case 4:
      return std::numeric_limits<double>::quiet_NaN();
    case 5:
      return 1e-30;
    case 6:
      return std::nextafter(1.0, 0.0);
    default:
      return static_cast<double>(in.u8()) / 255.0;  // [0, 1] on a grid: ties with P
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 12);
  const Index num_experts = in.flag() ? in.in_range(0, 600) : in.in_range(1, 12);
  moet::TopPGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = num_experts;
  options.p = top_p(in);
  options.inclusive = in.flag();
  options.max_k = in.flag() ? 0 : in.in_range(-1, num_experts + 1);
  options.init_seed = in.u8();
  const bool finite_only = (in.u8() % 8) != 0;
  const bool valid_options = num_experts >= 1 && options.p > 0.0 && options.p <= 1.0 &&
                             options.max_k >= 0 && options.max_k <= num_experts;
  bool constructed = false;
  try {
    moet::TopPGate<float> gate(options);
    constructed = true;
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    // Weights through the setter (non-finite ones are rejected there), in either layout.
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_experts, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    const bool small = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f);
    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, {}, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!small, "routing small finite inputs threw");
      return 0;
    }
    const Index cap = options.max_k == 0 ? num_experts : options.max_k;
    moet_fuzz::check_plan(plan, num_tokens, num_experts, 1, cap);
    const auto probs = plan.probs();
    const auto p = static_cast<float>(options.p);
    for (Index t = 0; t < num_tokens; ++t) {
      const auto order = moet_fuzz::descending_order(probs.data() + t * num_experts, num_experts);
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      // The rule: keep sorted position j while the fp32 cumulative sum before it is <= p
      // (strict) or < p (inclusive); then cap at max_k.
      Index want = num_experts;
      float cumsum = 0.0f;
      for (Index j = 0; j < num_experts; ++j) {
        if (options.inclusive ? !(cumsum < p) : cumsum > p) {
          want = j;
          break;
        }
        cumsum += probs(t, order[static_cast<std::size_t>(j)]);
      }
      want = std::min(want, cap);
      MOET_FUZZ_CHECK(static_cast<Index>(ids.size()) == want,
                      "token %ld keeps %zu experts, want %ld", static_cast<long>(t), ids.size(),
                      static_cast<long>(want));
      for (std::size_t j = 0; j < ids.size(); ++j) {
        MOET_FUZZ_CHECK(ids[j] == order[j], "token %ld slot %zu: expert %d, want %d",
                        static_cast<long>(t), j, ids[j], order[j]);
        MOET_FUZZ_CHECK(weights[j] == probs(t, ids[j]), "token %ld slot %zu: weight is not P",
                        static_cast<long>(t), j);
      }
    }
    moet_fuzz::check_reuse(gate, x, {}, plan);
  } catch (const moet::Error&) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw");
  }
  return 0;
}
