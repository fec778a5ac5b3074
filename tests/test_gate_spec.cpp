// The router grammar (gates/spec.hpp): a gate built from a spec is the gate built from the
// same Options (same plan bits), the printed defaults are Options{}'s, the help text names every
// gate and key, errors list what is valid, lists split as the tools need, and a gate added
// outside the library registers with a table.
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/gates/spec.hpp"

namespace test_gate_spec {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Contains;
using moet::Index;
constexpr Index kDim = 12, kExperts = 6;
constexpr std::uint64_t kSeed = 5;

moet::RowMatrix<float> tokens(Index rows, unsigned seed) {
  moet::detail::Rng rng(seed);
  moet::RowMatrix<float> x(rows, kDim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(rng.normal());
  return x;
}

template <class T>
bool same_bits(const T* a, const T* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(T)) == 0;
}

bool same_plan(const moet::Routing<float>& a, const moet::Routing<float>& b) {
  return a.num_tokens() == b.num_tokens() && a.num_assignments() == b.num_assignments() &&
         same_bits(a.offsets().data(), b.offsets().data(), a.offsets().size()) &&
         same_bits(a.experts().data(), b.experts().data(), a.experts().size()) &&
         same_bits(a.weights().data(), b.weights().data(), a.weights().size()) &&
         a.probs().rows() == b.probs().rows() && a.probs().cols() == b.probs().cols() &&
         same_bits(a.probs().data(), b.probs().data(), std::size_t(a.probs().size())) &&
         a.live_experts == b.live_experts;
}

// Training and eval plans of two gates on the same batch (with token importance).
template <class G>
bool same_plans(const G& a, const G& b) {
  const auto x = tokens(40, 9);
  std::vector<float> importance(40);
  for (std::size_t t = 0; t < importance.size(); ++t) importance[t] = 0.1f + float(t % 7);
  moet::RouteContext ctx{.training = true, .seed = 3, .step = 2};
  ctx.importance = std::span<const float>(importance);
  bool same = true;
  for (const bool training : {true, false}) {
    ctx.training = training;
    moet::Routing<float> pa, pb;
    a.route(x, ctx, pa);
    b.route(x, ctx, pb);
    same = same && same_plan(pa, pb);
  }
  return same;
}

// with_gate's gate for `spec`, compared with `G(options)` (model_dim, num_experts, init_seed
// filled in as with_gate does).
template <class G>
void check_spec(const std::string& spec, typename G::Options options) {
  INFO(spec);
  options.model_dim = kDim;
  options.num_experts = kExperts;
  if constexpr (requires { options.init_seed; }) options.init_seed = kSeed;
  const G expected(options);
  const bool built = moet::with_gate<float>(spec, kDim, kExperts, kSeed, [&](auto gate) {
    if constexpr (std::is_same_v<decltype(gate), G>) {
      CHECK(same_plans(gate, expected));
      return true;
    } else {
      return false;
    }
  });
  CHECK(built);
}

}  // namespace

TEST_CASE("A gate built from a spec routes as the gate built from the same Options",
          "[gate][spec]") {
  using TopK = moet::TopKGate<float>;
  using TopP = moet::TopPGate<float>;
  using TopAny = moet::TopAnyGate<float>;
  using Importance = moet::ImportanceGate<float>;
  using Stochastic = moet::StochasticGate<float>;
  check_spec<TopK>("top_k", {});
  check_spec<TopK>("top_k:k=2", {.k = 2});
  check_spec<TopK>("top_k:k=2,renorm=1", {.k = 2, .renormalize = true});
  check_spec<TopK>(
      "top_k:k=3,renormalize=true,noisy=1,capacity=1.25,min_capacity=2",
      {.k = 3, .renormalize = true, .noisy = true, .capacity_factor = 1.25, .min_capacity = 2});
  check_spec<TopP>("top_p", {});
  check_spec<TopP>("top_p:p=0.6,inclusive=1,max_k=3", {.p = 0.6, .inclusive = true, .max_k = 3});
  check_spec<TopAny>("top_any", {});
  check_spec<TopAny>(
      "top_any:initial=3,variant=tutel,temperature=2.5",
      {.initial_experts = 3, .variant = moet::TopAnyVariant::kTutel, .temperature = 2.5f});
  check_spec<TopAny>("top_any:initial_experts=2,trainable_temperature=1,schedule=manual,period=7",
                     {.initial_experts = 2,
                      .trainable_temperature = true,
                      .schedule = moet::TopAnySchedule::kManual,
                      .schedule_period = 7});
  check_spec<Importance>("importance", {});
  check_spec<Importance>("importance:k_min=2,k_max=5,norm=budget,k_avg=3,renorm=1",
                         {.k_min = 2,
                          .k_max = 5,
                          .norm = moet::ImportanceNorm::kBudget,
                          .k_avg = 3.0,
                          .renormalize = true});
  check_spec<Importance>("importance:norm=minmax", {.norm = moet::ImportanceNorm::kMinMax});
  check_spec<Stochastic>("stochastic", {});
  check_spec<Stochastic>("stochastic:inference=ensemble,stream=4",
                         {.inference = moet::StochasticInference::kEnsemble, .stream = 4});
  check_spec<Stochastic>("stochastic:mode=sequence",
                         {.inference = moet::StochasticInference::kSequence});
  using Grouped = moet::GroupedTopKGate<float>;
  check_spec<Grouped>("grouped_top_k", {});
  check_spec<Grouped>(
      "grouped_top_k:k=2,scoring=sigmoid,groups=3,groups_kept=2,group_score=top2,renorm=1,"
      "scale=2.5,scaling=instead",
      {.k = 2,
       .scoring = moet::ExpertScoring::kSigmoid,
       .num_groups = 3,
       .groups_kept = 2,
       .group_score = moet::GroupScore::kTopTwoSum,
       .renormalize = true,
       .scaling_factor = 2.5,
       .scaling = moet::WeightScaling::kInsteadOfNormalization});
  check_spec<Grouped>("grouped_top_k:n_group=2,topk_group=1,k=2",
                      {.k = 2, .num_groups = 2, .groups_kept = 1});
  using ExpertChoice = moet::ExpertChoiceGate<float>;
  check_spec<ExpertChoice>("expert_choice", {});
  check_spec<ExpertChoice>("expert_choice:capacity=0.75,min_capacity=0",
                           {.capacity_factor = 0.75, .min_capacity = 0});
  check_spec<ExpertChoice>("expert_choice:capacity_factor=3", {.capacity_factor = 3.0});
  check_spec<moet::ReluGate<float>>("relu", {});
  using Null = moet::NullExpertGate<float>;
  check_spec<Null>("null_experts", {});
  check_spec<Null>("null_experts:k=3,null=4,renorm=0",
                   {.num_null = 4, .k = 3, .renormalize = false});
  check_spec<Null>("null_experts:num_null=2", {.num_null = 2});
}

TEST_CASE("with_gate_options hands out the Options before the gate is built", "[gate][spec]") {
  const auto options = moet::with_gate_options<float>(
      "top_any:initial=2", kDim, kExperts, kSeed, [](auto identity, auto o) {
        using G = typename decltype(identity)::type;
        if constexpr (std::is_same_v<G, moet::TopAnyGate<float>>) {
          return o;
        } else {
          FAIL("top_any built another gate");
          return moet::TopAnyGate<float>::Options{};
        }
      });
  CHECK(options.model_dim == kDim);
  CHECK(options.num_experts == kExperts);
  CHECK(options.initial_experts == 2);
  CHECK(options.init_seed == kSeed);
  CHECK(options.schedule_period == moet::TopAnyGate<float>::Options{}.schedule_period);
}

TEST_CASE("The printed defaults are Options{}'s and a spec of them builds the default gate",
          "[gate][spec]") {
  const std::string help = moet::gate_spec_help();
  CHECK_THAT(help, Contains("  k=1 ") && Contains("  renorm=0 ") && Contains("  min_capacity=4 ") &&
                       Contains("  p=0.4 ") && Contains("  initial=0 ") &&
                       Contains("  variant=deepspeed ") && Contains("  period=300 ") &&
                       Contains("  k_max=4 ") && Contains("  norm=max ") &&
                       Contains("  inference=token "));
  // Every key, at its printed default, gives back Options{}: the spec of all defaults routes
  // exactly as the default gate.
  const auto all_defaults = [&help](auto identity) {
    using G = typename decltype(identity)::type;
    using Traits = moet::GateSpecTraits<G>;
    const typename G::Options defaults{};
    std::string spec = Traits::name;
    char sep = ':';
    for (const auto& key : Traits::keys()) {
      CHECK_THAT(help, Contains("  " + key.name + "=" + key.get(defaults) + " "));
      spec += sep + key.name + "=" + key.get(defaults);
      sep = ',';
      typename G::Options parsed{};
      key.set(parsed, key.get(defaults));
      CHECK(key.get(parsed) == key.get(defaults));
    }
    check_spec<G>(spec, {});
    CHECK_THAT(help, Contains(std::string(Traits::name) + "  " + Traits::summary));
  };
  all_defaults(std::type_identity<moet::TopKGate<float>>{});
  all_defaults(std::type_identity<moet::TopPGate<float>>{});
  all_defaults(std::type_identity<moet::TopAnyGate<float>>{});
  all_defaults(std::type_identity<moet::ImportanceGate<float>>{});
  all_defaults(std::type_identity<moet::StochasticGate<float>>{});
  all_defaults(std::type_identity<moet::GroupedTopKGate<float>>{});
  all_defaults(std::type_identity<moet::ExpertChoiceGate<float>>{});
  all_defaults(std::type_identity<moet::ReluGate<float>>{});
  all_defaults(std::type_identity<moet::NullExpertGate<float>>{});
  CHECK(moet::gate_names() == std::vector<std::string>{"top_k", "top_p", "top_any", "importance",
                                                       "stochastic", "grouped_top_k",
                                                       "expert_choice", "relu", "null_experts"});
}

TEST_CASE("Spec errors name the spec and list what is valid", "[gate][spec][bad_input]") {
  const auto build = [](const std::string& spec) {
    moet::with_gate<float>(spec, kDim, kExperts, kSeed, [](auto gate) { static_cast<void>(gate); });
  };
  CHECK_THROWS_WITH(
      build("top_kk:k=2"),
      Contains("unknown gate 'top_kk' in 'top_kk:k=2'") &&
          Contains("valid gates: top_k, top_p, top_any, importance, stochastic, grouped_top_k, "
                   "expert_choice, relu, null_experts"));
  CHECK_THROWS_WITH(build("top_k:kk=2"),
                    Contains("unknown key 'kk' for gate top_k") &&
                        Contains("its keys: k, renorm, noisy, capacity, min_capacity"));
  CHECK_THROWS_WITH(build("top_any:max_experts=8"),
                    Contains("unknown key 'max_experts'") &&
                        Contains("initial, variant, temperature, trainable_temperature, "
                                 "schedule, period"));
  CHECK_THROWS_WITH(build("relu:k=2"),
                    Contains("unknown key 'k' for gate relu") && Contains("its keys: (none)"));
  CHECK_THROWS_WITH(build("top_k:k=two"),
                    Contains("key 'k' takes an integer, got 'two'") && Contains("'top_k:k=two'"));
  CHECK_THROWS_WITH(build("top_k:k=1.5"), Contains("key 'k' takes an integer, got '1.5'"));
  CHECK_THROWS_WITH(build("top_k:k=99999999999999999999"), Contains("out of range"));
  CHECK_THROWS_WITH(build("top_k:renorm=2"), Contains("key 'renorm' takes 0 or 1"));
  CHECK_THROWS_WITH(build("top_p:p=nan"), Contains("key 'p' takes a finite number, got 'nan'"));
  CHECK_THROWS_WITH(build("top_p:p=0.4x"), Contains("key 'p' takes a number, got '0.4x'"));
  CHECK_THROWS_WITH(build("stochastic:stream=-1"),
                    Contains("key 'stream' takes an integer >= 0, got '-1'"));
  CHECK_THROWS_WITH(build("importance:norm=median"),
                    Contains("key 'norm' takes max|minmax|budget, got 'median'"));
  // Out of range for the gate: its constructor's message, with the spec and the sizes.
  CHECK_THROWS_WITH(build("top_k:k=9"), Contains("'top_k:k=9' (model_dim 12, num_experts 6)") &&
                                            Contains("[moet::TopKGate]") && Contains("got 9"));
  CHECK_THROWS_WITH(build("top_p:p=1.5"), Contains("'top_p:p=1.5'") && Contains("got 1.5"));
  CHECK_THROWS_WITH(
      build("top_any:initial=7"),
      Contains("initial_experts must be in [0, num_experts = 6]") && Contains("got 7"));
  // Syntax.
  CHECK_THROWS_WITH(build(""), Contains("has no gate name"));
  CHECK_THROWS_WITH(build("top_k:"), Contains("nothing after ':'"));
  CHECK_THROWS_WITH(build("top_k:k"), Contains("'k' is not key=value"));
  CHECK_THROWS_WITH(build("top_k:k=2,k=3"), Contains("gives key 'k' twice"));
  CHECK_THROWS_WITH(build("top_k:renorm=1,renormalize=0"), Contains("gives key 'renorm' twice"));
  CHECK_THROWS_WITH(build("top_k: k=2"), Contains("contains a space"));
  CHECK_THROWS_AS(build("top_k:k=9"), moet::Error);
}

TEST_CASE("split_gate_specs splits lists on spaces and on commas that start a gate",
          "[gate][spec]") {
  using V = std::vector<std::string>;
  CHECK(moet::split_gate_specs("top_k:k=1,top_k:k=2,renorm=1,top_p:p=0.4,top_any,stochastic") ==
        V{"top_k:k=1", "top_k:k=2,renorm=1", "top_p:p=0.4", "top_any", "stochastic"});
  CHECK(moet::split_gate_specs("  top_k:k=2  top_p:p=0.4,max_k=2\ttop_any ") ==
        V{"top_k:k=2", "top_p:p=0.4,max_k=2", "top_any"});
  CHECK(moet::split_gate_specs("").empty());
  CHECK(moet::split_gate_specs(" , ").empty());
  const auto spec = moet::parse_gate_spec(" importance:k_max=3,norm=budget ");
  CHECK(spec.name == "importance");
  CHECK(spec.text == "importance:k_max=3,norm=budget");
  REQUIRE(spec.values.size() == 2);
  CHECK(*spec.find("norm") == "budget");
  CHECK(spec.find("k_min") == nullptr);
}

// A gate defined outside the library, registered with a table and its own list.
namespace {

template <class S>
class EveryExpertGate {
 public:
  using Scalar = S;
  struct Options {
    Index model_dim = 0;
    Index num_experts = 0;
    double weight = 1.0;
  };
  explicit EveryExpertGate(const Options& o) : o_(o) {}
  Index num_experts() const { return o_.num_experts; }
  double weight() const { return o_.weight; }

 private:
  Options o_;
};

}  // namespace
}  // namespace test_gate_spec

// The traits specialisation lives in moet's namespace.
template <class S>
struct moet::GateSpecTraits<test_gate_spec::EveryExpertGate<S>> {
  using O = typename test_gate_spec::EveryExpertGate<S>::Options;
  static constexpr const char* name = "every";
  static constexpr const char* summary = "every expert, one weight";
  static std::vector<moet::GateSpecKey<O>> keys() {
    return {moet::spec_field<&O::weight>("weight", "the weight of every expert")};
  }
};

namespace test_gate_spec {

TEST_CASE("A gate registers with a table and a GateList", "[gate][spec]") {
  using Gates = moet::GateList<moet::TopKGate, EveryExpertGate>;
  const double weight = moet::with_gate<float, Gates>(
      "every:weight=0.25", kDim, kExperts, kSeed, [](auto gate) -> double {
        if constexpr (std::is_same_v<decltype(gate), EveryExpertGate<float>>) {
          CHECK(gate.num_experts() == kExperts);
          return gate.weight();
        } else {
          return -1.0;
        }
      });
  CHECK(weight == 0.25);
  CHECK(moet::gate_names<Gates>() == std::vector<std::string>{"top_k", "every"});
  CHECK_THAT((moet::gate_spec_help<float, Gates>()),
             Contains("every  every expert, one weight") && Contains("  weight=1 "));
  CHECK_THROWS_WITH(
      (moet::with_gate<float, Gates>("top_p", kDim, kExperts, kSeed, [](auto) { return 0.0; })),
      Contains("valid gates: top_k, every"));
}

}  // namespace test_gate_spec
