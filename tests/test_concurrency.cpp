// Concurrency: the const workspace overload of MoELayer::forward, called from 4 std::threads at
// once on 4 different inputs (different sizes and contexts), equals the serial results bit for
// bit, for every gate (every configuration in gate_cases.hpp), with and without shared
// experts. Each caller repeats its call so that the calls really overlap, and reuses its
// workspace. Run under ThreadSanitizer by scripts/test.sh (preset tsan).
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/dispatch/reference.hpp"
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"

#include "gate_cases.hpp"

namespace test_concurrency {  // one per file: the unity build puts several files in one TU

namespace {

using gate_cases::bit_identical;
using moet::Index;

constexpr int kCallers = 4;
constexpr int kRepeats = 2;

moet::SwiGluExperts<float> experts(std::uint64_t seed) {
  return moet::SwiGluExperts<float>({.model_dim = gate_cases::kModelDim,
                                     .hidden_dim = 20,
                                     .num_experts = gate_cases::kExperts,
                                     .init_seed = seed});
}

// Runs `layer` serially on every input, then from kCallers threads at once, and compares.
template <class Layer>
void check_concurrent(const Layer& layer, const gate_cases::ContextSpec& spec) {
  std::vector<moet::RowMatrix<float>> inputs;
  std::vector<gate_cases::Context> contexts;
  std::vector<moet::RowMatrix<float>> serial;
  for (int i = 0; i < kCallers; ++i) {
    const Index rows = gate_cases::kSeqLen * (13 + 13 * i);  // 130, 260, 390, 520 tokens
    inputs.push_back(gate_cases::tokens(rows, static_cast<std::uint32_t>(40 + i)));
    contexts.push_back(gate_cases::make_context(spec, rows, static_cast<std::uint32_t>(50 + i)));
    typename Layer::Workspace ws;
    moet::RowMatrix<float> y(rows, gate_cases::kModelDim);
    layer.forward(inputs.back(), y, contexts.back().ctx, ws);
    serial.push_back(y);
  }
  std::vector<moet::RowMatrix<float>> concurrent(kCallers);
  std::vector<int> mismatches(kCallers, 0);
  std::vector<std::thread> callers;
  for (int i = 0; i < kCallers; ++i) {
    callers.emplace_back([&, i] {
      const auto index = static_cast<std::size_t>(i);
      const auto& x = inputs[index];
      typename Layer::Workspace ws;
      auto& y = concurrent[index];
      y.resize(x.rows(), x.cols());
      for (int repeat = 0; repeat < kRepeats; ++repeat) {
        layer.forward(x, y, contexts[index].ctx, ws);
        // No Catch2 assertions off the main thread: count and check after the join.
        if (!bit_identical(y, serial[index])) ++mismatches[index];
      }
    });
  }
  for (auto& caller : callers) caller.join();
  for (int i = 0; i < kCallers; ++i) {
    INFO("caller " << i);
    CHECK(mismatches[static_cast<std::size_t>(i)] == 0);
    CHECK(bit_identical(concurrent[static_cast<std::size_t>(i)],
                        serial[static_cast<std::size_t>(i)]));
  }
}

}  // namespace

TEST_CASE("Concurrent const forward calls equal serial calls for every gate",
          "[concurrency][layer][parallel]") {
  const bool shared = GENERATE(false, true);
  INFO((shared ? "with" : "without") << " shared experts");
  gate_cases::for_each_gate(
      61, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        INFO(name);
        using Gate = std::decay_t<decltype(gate)>;
        using Layer = moet::MoELayer<Gate, moet::SwiGluExperts<float>>;
        if (shared) {
          check_concurrent(Layer(gate, experts(4), experts(5)), spec);
        } else {
          check_concurrent(Layer(gate, experts(4)), spec);
        }
      });
}

TEST_CASE("Concurrent const forward calls equal serial calls with the reference dispatch",
          "[concurrency][layer][parallel]") {
  // The per-token oracle dispatcher keeps per-thread scratch in the workspace too.
  const moet::TopKGate<float> gate(
      moet::TopKGate<float>::gshard_options(gate_cases::kModelDim, gate_cases::kExperts));
  using Layer =
      moet::MoELayer<moet::TopKGate<float>, moet::SwiGluExperts<float>, moet::ReferenceDispatch>;
  check_concurrent(Layer(gate, experts(7)), gate_cases::ContextSpec{});
}

}  // namespace test_concurrency
