#pragma once
// Shared by test_determinism.cpp and test_concurrency.cpp: every gate in the configurations
// that exercise its distinct code paths (capacity, noise, thresholds and fallback, importance
// from a vector and from attention, every stochastic mode), with the context each needs, and
// bit-exact comparisons of plans and outputs.
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moet/context.hpp"
#include "moet/gates/expert_choice.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/null_experts.hpp"
#include "moet/gates/relu.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace gate_cases {

using moet::Index;

inline constexpr Index kModelDim = 16;
inline constexpr Index kExperts = 6;
/// Sequence length of the contexts that need one; token counts are multiples of it.
inline constexpr Index kSeqLen = 10;

/// What a gate case needs in its context.
struct ContextSpec {
  bool training = false;
  bool importance = false;  // ctx.importance, one entry per token
  bool attention = false;   // ctx.attention [T / kSeqLen, 2, kSeqLen, kSeqLen], causal
  bool sequences = false;   // ctx.sequence_length = kSeqLen
};

/// A context and the storage its spans point into.
struct Context {
  std::vector<float> importance;
  std::vector<float> attention;
  moet::RouteContext ctx;
};

/// The context of `spec` for `num_tokens` tokens; values are a pure function of `seed`.
inline Context make_context(const ContextSpec& spec, Index num_tokens, std::uint32_t seed) {
  Context c;
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  c.ctx.training = spec.training;
  c.ctx.seed = 1000u + seed;
  c.ctx.step = 3;
  if (spec.importance) {
    c.importance.resize(static_cast<std::size_t>(num_tokens));
    for (auto& v : c.importance) v = uniform(gen);
    c.ctx.importance = c.importance;
  }
  if (spec.attention) {
    const Index batch = num_tokens / kSeqLen;
    const Index heads = 2;
    c.attention.assign(static_cast<std::size_t>(batch * heads * kSeqLen * kSeqLen), 0.0f);
    // Causal rows that sum to 1.
    for (Index r = 0; r < batch * heads * kSeqLen; ++r) {
      const Index i = r % kSeqLen;
      float* row = c.attention.data() + r * kSeqLen;
      float sum = 0.0f;
      for (Index j = 0; j <= i; ++j) sum += (row[j] = uniform(gen) + 0.01f);
      for (Index j = 0; j <= i; ++j) row[j] /= sum;
    }
    c.ctx.attention = {c.attention.data(), batch, heads, kSeqLen, true};
  }
  if (spec.sequences) c.ctx.sequence_length = kSeqLen;
  return c;
}

/// Normal tokens `(rows, kModelDim)` from `seed`.
inline moet::RowMatrix<float> tokens(Index rows, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  moet::RowMatrix<float> x(rows, kModelDim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  return x;
}

/// Calls `f(name, gate, spec)` for every gate case; `init_seed` seeds the routers.
template <class F>
void for_each_gate(std::uint64_t init_seed, F&& f) {
  using moet::GroupedTopKGate;
  using moet::ImportanceGate;
  using moet::StochasticGate;
  using moet::StochasticInference;
  using moet::TopAnyGate;
  using moet::TopKGate;
  using moet::TopPGate;
  const std::uint64_t s = init_seed;
  f(std::string("top-k switch"),
    TopKGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .k = 1, .init_seed = s}),
    ContextSpec{});
  f(std::string("top-k renormalised with capacity"),
    TopKGate<float>({.model_dim = kModelDim,
                     .num_experts = kExperts,
                     .k = 2,
                     .renormalize = true,
                     .capacity_factor = 0.75,
                     .min_capacity = 1,
                     .init_seed = s}),
    ContextSpec{});
  {
    auto options = TopKGate<float>::noisy_top_k_options(kModelDim, kExperts, 2);
    options.init_seed = s;
    TopKGate<float> noisy(options);
    // A non-zero noise router so that the noise scale differs per token and expert.
    std::mt19937 gen(static_cast<std::uint32_t>(s));
    std::normal_distribution<float> normal(0.0f, 0.3f);
    moet::RowMatrix<float> noise(kModelDim, kExperts);
    for (Index i = 0; i < noise.size(); ++i) noise.data()[i] = normal(gen);
    noisy.set_noise_router(noise, moet::WeightLayout::kInOut);
    f(std::string("top-k noisy, training"), noisy, ContextSpec{.training = true});
  }
  f(std::string("top-p"),
    TopPGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .p = 0.6, .init_seed = s}),
    ContextSpec{});
  f(std::string("top-p inclusive, max_k 3"),
    TopPGate<float>({.model_dim = kModelDim,
                     .num_experts = kExperts,
                     .p = 0.8,
                     .inclusive = true,
                     .max_k = 3,
                     .init_seed = s}),
    ContextSpec{});
  {
    TopAnyGate<float> gate({.model_dim = kModelDim,
                            .num_experts = kExperts,
                            .initial_experts = kExperts - 2,
                            .init_seed = s});
    moet::Vector<float> theta(kExperts);
    theta << 0.1f, -0.05f, 0.2f, 0.0f, 0.3f, 0.0f;
    gate.set_thresholds(theta);
    f(std::string("top-any eval (DeepSpeed fallback)"), gate, ContextSpec{});
    TopAnyGate<float> tutel({.model_dim = kModelDim,
                             .num_experts = kExperts,
                             .variant = moet::TopAnyVariant::kTutel,
                             .temperature = 2.0f,
                             .init_seed = s + 1});
    f(std::string("top-any Tutel, training"), tutel, ContextSpec{.training = true});
    TopAnyGate<float> tutel_eval = tutel;
    f(std::string("top-any Tutel, eval"), tutel_eval, ContextSpec{});
  }
  f(std::string("importance from ctx.importance (min-max)"),
    ImportanceGate<float>({.model_dim = kModelDim,
                           .num_experts = kExperts,
                           .k_min = 1,
                           .k_max = 4,
                           .norm = moet::ImportanceNorm::kMinMax,
                           .init_seed = s}),
    ContextSpec{.importance = true, .sequences = true});
  f(std::string("importance from causal attention (budget)"),
    ImportanceGate<float>({.model_dim = kModelDim,
                           .num_experts = kExperts,
                           .k_min = 1,
                           .k_max = 3,
                           .norm = moet::ImportanceNorm::kBudget,
                           .k_avg = 2.0,
                           .renormalize = true,
                           .init_seed = s}),
    ContextSpec{.attention = true});
  f(std::string("grouped top-k, softmax, best-score groups (DeepSeek-V2)"),
    GroupedTopKGate<float>({.model_dim = kModelDim,
                            .num_experts = kExperts,
                            .k = 2,
                            .num_groups = 3,
                            .groups_kept = 2,
                            .init_seed = s}),
    ContextSpec{});
  {
    GroupedTopKGate<float> v3({.model_dim = kModelDim,
                               .num_experts = kExperts,
                               .k = 3,
                               .scoring = moet::ExpertScoring::kSigmoid,
                               .num_groups = 3,
                               .groups_kept = 2,
                               .group_score = moet::GroupScore::kTopTwoSum,
                               .renormalize = true,
                               .init_seed = s});
    const std::vector<float> bias{0.05f, -0.1f, 0.0f, 0.2f, -0.05f, 0.1f};  // kExperts values
    v3.set_score_bias(bias);
    f(std::string("grouped top-k, sigmoid, top-2 groups, score bias (DeepSeek-V3)"), v3,
      ContextSpec{});
  }
  f(std::string("expert choice, capacity factor 1.5"),
    moet::ExpertChoiceGate<float>({.model_dim = kModelDim,
                                   .num_experts = kExperts,
                                   .capacity_factor = 1.5,
                                   .min_capacity = 1,
                                   .init_seed = s}),
    ContextSpec{});
  f(std::string("relu (ReMoE)"),
    moet::ReluGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .init_seed = s}),
    ContextSpec{});
  f(std::string("null experts (AdaMoE), k 3 of 6 + 4"),
    moet::NullExpertGate<float>(
        {.model_dim = kModelDim, .num_experts = kExperts, .num_null = 4, .k = 3, .init_seed = s}),
    ContextSpec{});
  f(std::string("stochastic, training"),
    StochasticGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .stream = s}),
    ContextSpec{.training = true});
  f(std::string("stochastic, per token"),
    StochasticGate<float>({.model_dim = kModelDim, .num_experts = kExperts, .stream = s}),
    ContextSpec{});
  f(std::string("stochastic, per position"),
    StochasticGate<float>({.model_dim = kModelDim,
                           .num_experts = kExperts,
                           .inference = StochasticInference::kPosition,
                           .stream = s}),
    ContextSpec{.sequences = true});
  f(std::string("stochastic, per sequence"),
    StochasticGate<float>({.model_dim = kModelDim,
                           .num_experts = kExperts,
                           .inference = StochasticInference::kSequence,
                           .stream = s}),
    ContextSpec{.sequences = true});
  f(std::string("stochastic, ensemble"),
    StochasticGate<float>({.model_dim = kModelDim,
                           .num_experts = kExperts,
                           .inference = StochasticInference::kEnsemble,
                           .stream = s}),
    ContextSpec{});
}

/// Bit-exact equality of two float matrices (shape and every bit, so -0 != 0 and NaN == NaN).
inline bool bit_identical(const moet::RowMatrix<float>& a, const moet::RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0);
}

/// A routing plan copied out of a `Routing` (which is a reusable workspace).
struct PlanCopy {
  std::vector<Index> offsets;
  std::vector<std::int32_t> experts;
  std::vector<float> weights;
  moet::RowMatrix<float> probs;
  Index dropped = 0;
  Index live_experts = 0;
  bool probs_are_distribution = false;

  explicit PlanCopy(const moet::Routing<float>& r)
      : offsets(r.offsets().begin(), r.offsets().end()),
        experts(r.experts().begin(), r.experts().end()),
        weights(r.weights().begin(), r.weights().end()),
        probs(r.probs()),
        dropped(r.dropped),
        live_experts(r.live_experts),
        probs_are_distribution(r.probs_are_distribution) {}

  /// Bit-exact equality (weights compared as bits).
  bool operator==(const PlanCopy& o) const {
    return offsets == o.offsets && experts == o.experts && weights.size() == o.weights.size() &&
           (weights.empty() ||
            std::memcmp(weights.data(), o.weights.data(), weights.size() * sizeof(float)) == 0) &&
           bit_identical(probs, o.probs) && dropped == o.dropped &&
           live_experts == o.live_experts && probs_are_distribution == o.probs_are_distribution;
  }
};

}  // namespace gate_cases
