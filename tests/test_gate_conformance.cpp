// The published gate conformance check (moet/testing/gate_conformance.hpp) on every shipped gate
// in every configuration of gate_cases.hpp, on example 03's ThresholdGate, and on gates that
// break the contract (the check must catch each).
#include <deque>
#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include "moet/testing/gate_conformance.hpp"

#include "example_03_gate.hpp"
#include "gate_cases.hpp"

namespace test_gate_conformance {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;

// Options whose context is the gate case's, for any token count.
moet::testing::GateCheckOptions options_for(const gate_cases::ContextSpec& spec) {
  moet::testing::GateCheckOptions options;
  options.num_tokens = 15 * gate_cases::kSeqLen;  // 150: three 64-token blocks
  auto storage = std::make_shared<std::deque<gate_cases::Context>>();
  options.context = [spec, storage](Index num_tokens) {
    storage->push_back(gate_cases::make_context(spec, num_tokens, 5));
    return storage->back().ctx;
  };
  return options;
}

// Routes token t to expert t % E with weight 1, or breaks one rule of the contract.
enum class Fault { kNone, kIdOutOfRange, kNegativeWeight, kThreadDependent, kNoNanCheck };

template <Fault kFault>
struct FaultyGate {
  using Scalar = float;
  Index num_experts() const { return 3; }
  Index model_dim() const { return 4; }
  void route(const moet::ConstRows<float>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<float>& out) const {
    if (x.cols() != 4) throw moet::Error("[FaultyGate] x must have 4 columns");
    if (kFault != Fault::kNoNanCheck && !x.allFinite()) throw moet::Error("[FaultyGate] NaN");
    out.reset(x.rows(), 3);
    for (auto& count : out.counts()) count = 1;
    out.commit_counts();
    for (Index t = 0; t < x.rows(); ++t) {
      out.experts(t)[0] = static_cast<std::int32_t>(kFault == Fault::kIdOutOfRange ? 3 : t % 3);
      out.weights(t)[0] = kFault == Fault::kNegativeWeight ? -1.0f : 1.0f;
      if (kFault == Fault::kThreadDependent)
        out.weights(t)[0] = 1.0f / static_cast<float>(moet::num_threads());
    }
  }
};

template <Fault kFault>
std::string failures_of() {
  return moet::testing::check_gate(FaultyGate<kFault>{}).to_string();
}

}  // namespace

TEST_CASE("Every shipped gate passes the gate conformance check", "[gate][conformance]") {
  gate_cases::for_each_gate(
      11, [](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        const moet::testing::GateReport report = moet::testing::check_gate(gate, options_for(spec));
        INFO(name << ":\n" << report.to_string());
        CHECK(report.ok());
      });
}

TEST_CASE("Example 03's ThresholdGate passes the gate conformance check", "[gate][conformance]") {
  moet::testing::GateCheckOptions options;
  options.weights_sum_to_one = true;
  options.at_least_one_expert = true;
  for (const float threshold : {0.05f, 0.2f, 0.9f}) {
    const moet::testing::GateReport report =
        moet::testing::check_gate(ThresholdGate<float>(24, 7, threshold, 2), options);
    INFO("threshold " << threshold << ":\n" << report.to_string());
    CHECK(report.ok());
  }
  const auto report = moet::testing::check_gate(ThresholdGate<double>(9, 3, 0.3, 4), options);
  INFO(report.to_string());
  CHECK(report.ok());
}

TEST_CASE("The gate conformance check catches gates that break the contract",
          "[gate][conformance]") {
  CHECK(failures_of<Fault::kNone>().empty());
  CHECK_THAT(failures_of<Fault::kIdOutOfRange>(), Catch::Matchers::Contains("expert id 3"));
  CHECK_THAT(failures_of<Fault::kNegativeWeight>(), Catch::Matchers::Contains("negative weight"));
#if MOET_HAS_OPENMP
  CHECK_THAT(failures_of<Fault::kThreadDependent>(), Catch::Matchers::Contains("2 threads"));
#endif
  CHECK_THAT(failures_of<Fault::kNoNanCheck>(),
             Catch::Matchers::Contains("x with a NaN should throw moet::Error: did not throw"));
  moet::testing::GateCheckOptions sums;
  sums.weights_sum_to_one = true;
  CHECK(moet::testing::check_gate(FaultyGate<Fault::kNone>{}, sums).ok());
}

}  // namespace test_gate_conformance
