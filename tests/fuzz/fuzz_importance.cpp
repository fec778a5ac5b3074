// libFuzzer target: ImportanceGate. The input decodes into the options (any k_min, k_max, norm,
// k_avg, including invalid ones), x and the router weights (NaN, Inf, denormals, huge values,
// exact ties), and the context: no importance at all, a ctx.importance vector (any length, any
// values), or ctx.attention [batch, heads, L, L] (any shape, causal or not, any values), with
// an optional validity mask and sequence length. Either the gate throws moet::Error, or the
// plan is valid: check_plan, k in [k_min, k_max] for valid tokens and 0 for pads, the experts
// the top-k of P in order, the weights P (or P renormalised).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "moet/gates/importance.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using moet_fuzz::Bytes;

double k_avg(Bytes& in) {
  switch (in.u8() % 6) {
    case 0:
      return std::numeric_limits<double>::quiet_NaN();
    case 1:
      return std::numeric_limits<double>::infinity();
    case 2:
      return -1.0;
    default:
      return static_cast<double>(in.u8()) / 16.0;
  }
}

// A non-negative value most of the time; NaN, Inf or negative when `wild`.
float importance_value(Bytes& in, bool wild) {
  const float v = in.value();
  if (wild) return v;
  return std::isfinite(v) ? std::abs(v) : 0.0f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  const Index num_tokens = in.in_range(0, 40);
  const Index model_dim = in.in_range(1, 10);
  const Index num_experts = in.flag() ? in.in_range(0, 300) : in.in_range(1, 10);
  moet::ImportanceGate<float>::Options options;
  options.model_dim = model_dim;
  options.num_experts = num_experts;
  options.k_min = in.in_range(-1, std::min<Index>(num_experts, 6) + 1);
  options.k_max = in.in_range(-1, std::min<Index>(num_experts, 8) + 1);
  options.norm = static_cast<moet::ImportanceNorm>(in.in_range(0, 3));
  options.k_avg = k_avg(in);
  options.renormalize = in.flag();
  options.init_seed = in.u8();
  const bool finite_only = (in.u8() % 8) != 0;
  const bool wild = (in.u8() % 8) == 0;  // NaN / negative importance or attention allowed

  // Context.
  moet::RouteContext ctx;
  const std::uint8_t source = in.u8() % 3;  // 0 none, 1 importance, 2 attention
  std::vector<float> importance;
  std::vector<float> attention;
  std::vector<std::uint8_t> valid;
  ctx.sequence_length = in.flag() ? 0 : in.in_range(-1, num_tokens + 1);
  if (source == 1) {
    const Index n = in.flag() ? num_tokens : in.in_range(0, num_tokens + 1);
    for (Index t = 0; t < n; ++t) importance.push_back(importance_value(in, wild));
    ctx.importance = importance;
  } else if (source == 2) {
    const Index batch = in.in_range(0, 4);
    const Index heads = in.in_range(0, 3);
    Index len = in.in_range(0, 12);
    if (in.flag() && batch > 0 && num_tokens % batch == 0) len = num_tokens / batch;  // matching
    const Index total = batch * heads * len * len;
    for (Index a = 0; a < total; ++a) attention.push_back(importance_value(in, wild));
    ctx.attention = {attention.data(), batch, heads, len, in.flag()};
    if (total == 0 && in.flag()) ctx.attention.data = nullptr;  // "missing"
  }
  if (in.flag()) {
    const Index n = in.flag() ? num_tokens : in.in_range(0, num_tokens + 1);
    for (Index t = 0; t < n; ++t)
      valid.push_back(static_cast<std::uint8_t>(in.u8() % 3 == 0 ? 0 : 1));
    ctx.valid = valid;
  }

  const bool norm_ok = options.norm == moet::ImportanceNorm::kMax ||
                       options.norm == moet::ImportanceNorm::kMinMax ||
                       options.norm == moet::ImportanceNorm::kBudget;
  const bool valid_options =
      num_experts >= 1 && options.k_min >= 1 && options.k_min <= options.k_max &&
      options.k_max <= num_experts && norm_ok &&
      (options.norm != moet::ImportanceNorm::kBudget ||
       (std::isfinite(options.k_avg) && options.k_avg >= static_cast<double>(options.k_min) &&
        options.k_avg <= static_cast<double>(options.k_max)));
  bool constructed = false;
  try {
    moet::ImportanceGate<float> gate(options);
    constructed = true;
    const auto x = in.matrix(num_tokens, model_dim, finite_only);
    // Weights through the setter (non-finite ones are rejected there), in either layout.
    const auto set_router = [&](const auto& w, moet::WeightLayout l) { gate.set_router(w, l); };
    if (!moet_fuzz::set_weights(set_router, in.matrix(model_dim, num_experts, finite_only),
                                options.init_seed % 2 == 1)) {
      return 0;
    }
    // A well-formed call must route: small finite x and W, importance of the right length,
    // finite and >= 0, one sequence, no mask or a mask of the right length.
    bool well_formed = moet_fuzz::all_small(x, 1e3f) && moet_fuzz::all_small(gate.router(), 1e3f) &&
                       source == 1 && static_cast<Index>(importance.size()) == num_tokens &&
                       ctx.sequence_length == 0 &&
                       (valid.empty() || static_cast<Index>(valid.size()) == num_tokens);
    for (const float v : importance) well_formed = well_formed && std::isfinite(v) && v >= 0.0f;
    moet::Routing<float> plan;
    if (!moet_fuzz::route_both(gate, x, ctx, plan, moet_fuzz::use_two_threads(data, size))) {
      MOET_FUZZ_CHECK(!well_formed, "a well-formed call threw");
      return 0;
    }
    moet_fuzz::check_plan(plan, num_tokens, num_experts, 0, options.k_max);
    const auto probs = plan.probs();
    for (Index t = 0; t < num_tokens; ++t) {
      const auto ids = plan.experts(t);
      const auto weights = plan.weights(t);
      const bool pad = !valid.empty() && valid[static_cast<std::size_t>(t)] == 0;
      const auto k = static_cast<Index>(ids.size());
      MOET_FUZZ_CHECK(pad ? k == 0 : (k >= options.k_min && k <= options.k_max),
                      "token %ld (%s) has k = %ld outside [%ld, %ld]", static_cast<long>(t),
                      pad ? "pad" : "valid", static_cast<long>(k), static_cast<long>(options.k_min),
                      static_cast<long>(options.k_max));
      const auto order = moet_fuzz::descending_order(probs.data() + t * num_experts, num_experts);
      float sum = 0.0f;
      for (std::size_t j = 0; j < ids.size(); ++j) {
        MOET_FUZZ_CHECK(ids[j] == order[j], "token %ld slot %zu: expert %d, want %d",
                        static_cast<long>(t), j, ids[j], order[j]);
        sum += probs(t, ids[j]);
      }
      for (std::size_t j = 0; j < ids.size(); ++j) {
        const float p = probs(t, ids[j]);
        const float want = options.renormalize && sum > 0.0f ? p / sum : p;
        MOET_FUZZ_CHECK(weights[j] == want, "token %ld slot %zu: weight %g, want %g",
                        static_cast<long>(t), j, static_cast<double>(weights[j]),
                        static_cast<double>(want));
      }
    }
    moet_fuzz::check_reuse(gate, x, ctx, plan);
  } catch (const moet::Error&) {
    MOET_FUZZ_CHECK(!constructed && !valid_options, "valid options or a valid gate threw");
  }
  return 0;
}
