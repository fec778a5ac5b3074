#pragma once
/// \file gates/spec.hpp
/// The router grammar: one spec string, `name[:key=value[,key=value...]]`, builds any shipped
/// gate. `with_gate<S>(spec, model_dim, num_experts, init_seed, f)` parses it, builds the gate
/// type it names with the keys applied to that gate's default `Options`, and calls `f(gate)`:
/// compile-time gates, chosen at run time. `gate_spec_help()` is the reference of every gate,
/// key and default (the defaults are read from `Options{}`, so they are the library's).
///
/// ```cpp
/// moet::with_gate<float>("top_k:k=2,renorm=1", 512, 8, /*init_seed=*/1, [&](auto gate) {
///   moet::MoELayer layer(std::move(gate), std::move(experts));
///   // ...
/// });
/// ```
///
/// Adding a gate: (1) give it a table, a `GateSpecTraits<MyGate<S>>` specialisation (see
/// gates/spec_keys.hpp; `spec_field` and `spec_choice` bind keys to `Options` fields), next to
/// the gate or below; (2) add `MyGate` to `ShippedGates` here (or pass your own `GateList` to
/// `with_gate`, `gate_names` and `gate_spec_help`). The gate needs `Options` with `model_dim`
/// and `num_experts` (and `init_seed`, when it draws weights) and a constructor from them.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moet/errors.hpp"
#include "moet/gates/expert_choice.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/null_experts.hpp"
#include "moet/gates/relu.hpp"
#include "moet/gates/spec_keys.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/tensor.hpp"

namespace moet {

// --- the shipped gates' tables -----------------------------------------------------------------

/// `top_k` (`TopKGate`).
template <class S>
struct GateSpecTraits<TopKGate<S>> {
  using O = typename TopKGate<S>::Options;
  static constexpr const char* name = "top_k";
  static constexpr const char* summary =
      "top-k softmax routing: Switch (k=1), GShard and Mixtral (k=2,renorm=1), noisy top-k";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::k>("k", "experts per token, 1..num_experts"),
            spec_field<&O::renormalize>(
                "renorm", "divide the kept probabilities by their sum (GShard)", "renormalize"),
            spec_field<&O::noisy>("noisy", "Shazeer et al.'s noisy top-k in training"),
            spec_field<&O::capacity_factor>("capacity", "capacity factor; 0 = dropless",
                                            "capacity_factor"),
            spec_field<&O::min_capacity>("min_capacity", "lower bound of the capacity, >= 0")};
  }
};

/// `top_p` (`TopPGate`).
template <class S>
struct GateSpecTraits<TopPGate<S>> {
  using O = typename TopPGate<S>::Options;
  static constexpr const char* name = "top_p";
  static constexpr const char* summary =
      "top-p routing (Huang et al. 2024): the fewest experts whose probabilities pass p";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::p>("p", "cumulative probability threshold, in (0, 1]"),
            spec_field<&O::inclusive>("inclusive", "stop at sum >= p instead of sum > p"),
            spec_field<&O::max_k>("max_k", "at most this many experts per token; 0 = no cap")};
  }
};

/// `top_any` (`TopAnyGate`, DynMoE).
template <class S>
struct GateSpecTraits<TopAnyGate<S>> {
  using O = typename TopAnyGate<S>::Options;
  static constexpr const char* name = "top_any";
  static constexpr const char* summary =
      "DynMoE top-any (Guo et al. 2025): every live expert whose cosine beats its threshold";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::initial_experts>(
                "initial", "slots live at the start (the first ones); 0 = all", "initial_experts"),
            spec_choice<&O::variant>(
                "variant", "eval fallback weight and gradient of that copy",
                {{"deepspeed", TopAnyVariant::kDeepSpeed}, {"tutel", TopAnyVariant::kTutel}}),
            spec_field<&O::temperature>("temperature", "logit scale tau, > 0"),
            spec_field<&O::trainable_temperature>(
                "trainable_temperature", "train log(tau), clamped at tau = 100 (Tutel's _t gate)"),
            spec_choice<&O::schedule>(
                "schedule", "adaptive add/remove: DeepSpeed's cycle or manual calls",
                {{"cycle", TopAnySchedule::kDeepSpeedCycle}, {"manual", TopAnySchedule::kManual}}),
            spec_field<&O::schedule_period>("period", "the cycle's period in training forwards",
                                            "schedule_period")};
  }
};

/// `importance` (`ImportanceGate`, DA-MoE reconstruction).
template <class S>
struct GateSpecTraits<ImportanceGate<S>> {
  using O = typename ImportanceGate<S>::Options;
  static constexpr const char* name = "importance";
  static constexpr const char* summary =
      "DA-MoE (reconstructed): K per token from its importance, then top-K; needs importance";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::k_min>("k_min", "fewest experts a token gets, >= 1"),
            spec_field<&O::k_max>("k_max", "most experts a token gets, <= num_experts"),
            spec_choice<&O::norm>("norm", "importance to K: by the max, min-max, or a budget",
                                  {{"max", ImportanceNorm::kMax},
                                   {"minmax", ImportanceNorm::kMinMax},
                                   {"budget", ImportanceNorm::kBudget}}),
            spec_field<&O::k_avg>("k_avg", "target mean K with norm=budget"),
            spec_field<&O::renormalize>("renorm", "divide the kept probabilities by their sum",
                                        "renormalize")};
  }
};

/// `stochastic` (`StochasticGate`, THOR).
template <class S>
struct GateSpecTraits<StochasticGate<S>> {
  using O = typename StochasticGate<S>::Options;
  static constexpr const char* name = "stochastic";
  static constexpr const char* summary =
      "THOR (Zuo et al. 2022): one random expert per batch in training; no router weights";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_choice<&O::inference>("inference", "what inference draws",
                                       {{"token", StochasticInference::kToken},
                                        {"position", StochasticInference::kPosition},
                                        {"sequence", StochasticInference::kSequence},
                                        {"ensemble", StochasticInference::kEnsemble}},
                                       "mode"),
            spec_field<&O::stream>("stream", "random stream (different layers, different ones)")};
  }
};

/// `grouped_top_k` (`GroupedTopKGate`, DeepSeek-V2/V3).
template <class S>
struct GateSpecTraits<GroupedTopKGate<S>> {
  using O = typename GroupedTopKGate<S>::Options;
  static constexpr const char* name = "grouped_top_k";
  static constexpr const char* summary =
      "DeepSeek-V2/V3: softmax or sigmoid scores, top-k inside the best groups of experts";
  static std::vector<GateSpecKey<O>> keys() {
    return {
        spec_field<&O::k>("k", "experts per token, 1..groups_kept * group size"),
        spec_choice<&O::scoring>(
            "scoring", "expert scores (scoring_func)",
            {{"softmax", ExpertScoring::kSoftmax}, {"sigmoid", ExpertScoring::kSigmoid}}),
        spec_field<&O::num_groups>("groups", "expert groups (n_group); divides num_experts",
                                   "n_group"),
        spec_field<&O::groups_kept>("groups_kept", "groups kept per token (topk_group)",
                                    "topk_group"),
        spec_choice<&O::group_score>("group_score", "a group's rank: best score or top-2 sum",
                                     {{"max", GroupScore::kMax}, {"top2", GroupScore::kTopTwoSum}}),
        spec_field<&O::renormalize>("renorm", "divide the kept scores by their sum", "renormalize"),
        spec_field<&O::scaling_factor>("scale", "routed_scaling_factor, > 0", "scaling_factor"),
        spec_choice<&O::scaling>("scaling", "when scale applies: always (V3) or unless renorm (V2)",
                                 {{"after", WeightScaling::kAfterNormalization},
                                  {"instead", WeightScaling::kInsteadOfNormalization}})};
  }
};

/// `expert_choice` (`ExpertChoiceGate`).
template <class S>
struct GateSpecTraits<ExpertChoiceGate<S>> {
  using O = typename ExpertChoiceGate<S>::Options;
  static constexpr const char* name = "expert_choice";
  static constexpr const char* summary =
      "expert choice (Zhou et al. 2022): each expert takes its C best tokens; not causal";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::capacity_factor>("capacity", "mean experts per token, > 0",
                                            "capacity_factor"),
            spec_field<&O::min_capacity>("min_capacity", "lower bound of C, >= 0")};
  }
};

/// `relu` (`ReluGate`, ReMoE).
template <class S>
struct GateSpecTraits<ReluGate<S>> {
  using O = typename ReluGate<S>::Options;
  static constexpr const char* name = "relu";
  static constexpr const char* summary =
      "ReMoE (Wang et al. 2025): the experts with relu(x W_r) > 0, weighted by it; no keys";
  static std::vector<GateSpecKey<O>> keys() { return {}; }
};

/// `null_experts` (`NullExpertGate`, AdaMoE).
template <class S>
struct GateSpecTraits<NullExpertGate<S>> {
  using O = typename NullExpertGate<S>::Options;
  static constexpr const char* name = "null_experts";
  static constexpr const char* summary =
      "AdaMoE (Zeng et al. 2024): top-k over real and null experts; null picks cost nothing";
  static std::vector<GateSpecKey<O>> keys() {
    return {spec_field<&O::k>("k", "picks per token among real and null slots"),
            spec_field<&O::num_null>("null", "null experts N, >= 1", "num_null"),
            spec_field<&O::renormalize>("renorm", "divide the real picks' P by their sum",
                                        "renormalize")};
  }
};

// --- the registry ------------------------------------------------------------------------------

/// A list of gate templates (each `Gate<S>` with a `GateSpecTraits` specialisation).
template <template <class> class... Gates>
struct GateList {};

/// The gates the grammar builds by default, in the order `gate_spec_help()` lists them.
using ShippedGates = GateList<TopKGate, TopPGate, TopAnyGate, ImportanceGate, StochasticGate,
                              GroupedTopKGate, ExpertChoiceGate, ReluGate, NullExpertGate>;

namespace detail {

/// What the grammar does over a `GateList`.
template <class Gates>
struct GateListOps;
template <template <class> class... Gs>
struct GateListOps<GateList<Gs...>> {
  static_assert(sizeof...(Gs) > 0, "a GateList names at least one gate");
  template <class S>
  using First = std::tuple_element_t<0, std::tuple<Gs<S>...>>;

  static std::vector<std::string> names() { return {GateSpecTraits<Gs<float>>::name...}; }
  template <class S, class F>
  static void each(F&& f) {
    (f(std::type_identity<Gs<S>>{}), ...);
  }
};

}  // namespace detail

/// The names of the gates in `Gates`, in order.
template <class Gates = ShippedGates>
std::vector<std::string> gate_names() {
  return detail::GateListOps<Gates>::names();
}

/// Applies `spec`'s keys to `options` (a `G::Options`): throws `moet::Error` for a key `G`'s
/// table does not have (listing the ones it has) or a value not of the key's type.
template <class G>
void apply_gate_spec(const GateSpec& spec, typename G::Options& options) {
  const auto keys = GateSpecTraits<G>::keys();
  std::vector<const GateSpecKey<typename G::Options>*> given;
  for (const auto& [key, value] : spec.values) {
    const GateSpecKey<typename G::Options>* row = nullptr;
    for (const auto& k : keys) {
      if (k.name == key || (!k.alias.empty() && k.alias == key)) row = &k;
    }
    detail::require(row == nullptr || std::find(given.begin(), given.end(), row) == given.end(),
                    "gate spec", "'", spec.text, "' gives key '", row ? row->name : key,
                    "' twice (under its name and its alias)");
    given.push_back(row);
    if (row == nullptr) {
      std::string valid;
      for (const auto& k : keys) valid += (valid.empty() ? "" : ", ") + k.name;
      detail::fail("gate spec", "unknown key '", key, "' for gate ", spec.name, " in '", spec.text,
                   "'; its keys: ", valid.empty() ? "(none)" : valid);
    }
    try {
      row->set(options, value);
    } catch (const Error& e) {
      throw Error(std::string(e.what()) + " (in '" + spec.text + "')");
    }
  }
}

namespace detail {

template <class S, class F, template <class> class G, template <class> class... Rest>
decltype(auto) with_gate_options(const GateSpec& spec, typename G<S>::Options options, F&& f) {
  if (spec.name == GateSpecTraits<G<S>>::name) {
    apply_gate_spec<G<S>>(spec, options);
    return std::forward<F>(f)(std::type_identity<G<S>>{}, std::move(options));
  }
  if constexpr (sizeof...(Rest) > 0) {
    using Next = typename std::tuple_element_t<0, std::tuple<Rest<S>...>>::Options;
    return detail::with_gate_options<S, F, Rest...>(spec, Next{}, std::forward<F>(f));
  } else {
    fail("gate spec", "unknown gate '", spec.name, "' in '", spec.text, "'");
  }
}

/// `G(options)`, with a constructor error prefixed by the spec it came from.
template <class G>
G build_gate(std::string_view spec, const typename G::Options& options) {
  try {
    return G(options);
  } catch (const Error& e) {
    throw Error(concat("[moet::gate spec] '", spec, "' (model_dim ", options.model_dim,
                       ", num_experts ", options.num_experts, "): ", e.what()));
  }
}

template <class S, class F, template <class> class... Gs>
decltype(auto) dispatch_gate(const GateSpec& spec, F& f, GateList<Gs...>) {
  using First = typename GateListOps<GateList<Gs...>>::template First<S>::Options;
  return with_gate_options<S, F&, Gs...>(spec, First{}, f);
}

}  // namespace detail

/// Parses `spec` and calls `f(std::type_identity<G>{}, options)` for the gate type `G<S>` it
/// names, with `options` its `G<S>::Options` from `Options{}`, `model_dim`, `num_experts` and,
/// where the gate has one, `init_seed`, then the spec's keys. `f` may change the options (a
/// per-layer seed) before building `G`; every call of `f` must return the same type. Throws
/// `moet::Error` for a malformed spec, an unknown gate (listing the valid names) or key
/// (listing the gate's keys) or a value of the wrong type.
template <class S, class Gates = ShippedGates, class F>
decltype(auto) with_gate_options(std::string_view spec_text, Index model_dim, Index num_experts,
                                 std::uint64_t init_seed, F&& f) {
  const GateSpec spec = parse_gate_spec(spec_text);
  const auto names = gate_names<Gates>();
  bool known = false;
  std::string valid;
  for (const auto& n : names) {
    known = known || n == spec.name;
    valid += (valid.empty() ? "" : ", ") + n;
  }
  detail::require(known, "gate spec", "unknown gate '", spec.name, "' in '", spec.text,
                  "'; valid gates: ", valid);
  const auto seeded = [&](auto identity, auto&& options) -> decltype(auto) {
    options.model_dim = model_dim;
    options.num_experts = num_experts;
    if constexpr (requires { options.init_seed; }) options.init_seed = init_seed;
    return f(identity, std::move(options));
  };
  return detail::dispatch_gate<S>(spec, seeded, Gates{});
}

/// Parses `spec`, builds the gate it names over `num_experts` experts of width `model_dim`
/// (router weights drawn from `init_seed`; `StochasticGate` has none, its key `stream` picks
/// its random stream) and returns `f(std::move(gate))`; every call of `f` must return the same
/// type. Throws `moet::Error` as `with_gate_options` does, and when the gate's constructor
/// rejects the options (a key out of range, e.g. `k` above `num_experts`), with the spec.
template <class S, class Gates = ShippedGates, class F>
decltype(auto) with_gate(std::string_view spec, Index model_dim, Index num_experts,
                         std::uint64_t init_seed, F&& f) {
  return with_gate_options<S, Gates>(spec, model_dim, num_experts, init_seed,
                                     [&](auto identity, const auto& options) -> decltype(auto) {
                                       using G = typename decltype(identity)::type;
                                       return f(detail::build_gate<G>(spec, options));
                                     });
}

/// The reference of the router grammar for the gates in `Gates`: the syntax, then per gate its
/// name, summary and every key with its default (from `Options{}`), type and meaning.
template <class S = float, class Gates = ShippedGates>
std::string gate_spec_help() {
  std::string out =
      "Router specs: name[:key=value[,key=value...]], e.g. top_k:k=2,renorm=1. A key not\n"
      "given takes the library's default (shown as key=default). Lists of specs are separated\n"
      "by spaces (or by commas, where the next piece has a ':' or no '=').\n";
  const auto table = [&](auto identity) {
    using G = typename decltype(identity)::type;
    using Traits = GateSpecTraits<G>;
    out += "\n";
    out += Traits::name;
    out += "  ";
    out += Traits::summary;
    out += "\n";
    const typename G::Options defaults{};
    for (const auto& key : Traits::keys()) {
      std::string left = "  " + key.name + "=" + key.get(defaults);
      left.resize(std::max<std::size_t>(left.size() + 2, 28), ' ');
      out += left + key.doc + " (" + key.type;
      if (!key.alias.empty()) out += "; alias " + key.alias;
      out += ")\n";
    }
  };
  detail::GateListOps<Gates>::template each<S>(table);
  return out;
}

}  // namespace moet
