// Determinism: every gate's plan and every gate's layer output are bit-identical at 1, 2 and 3
// threads, across repeated runs of one object, across objects rebuilt from the same seeds, and
// with workspaces reused after a different batch. Random gates (noisy top-k, stochastic) draw
// from (seed, step) only, so the same seed gives the same plan and another step another one.
// The oracle is the 1-thread run of a freshly built object; comparisons are bit for bit.
#include <bit>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"

#include "gate_cases.hpp"

namespace test_determinism {  // one per file: the unity build puts several files in one TU

namespace {

using gate_cases::bit_identical;
using gate_cases::PlanCopy;
using moet::Index;

// 1030 tokens: several blocks of every parallel loop (64-token gate and router blocks, the
// 256-token top-any blocks, the 1024-token stochastic blocks, 128-row expert tasks).
constexpr Index kTokens = 1030;

struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

moet::SwiGluExperts<float> experts(std::uint64_t seed) {
  return moet::SwiGluExperts<float>({.model_dim = gate_cases::kModelDim,
                                     .hidden_dim = 24,
                                     .num_experts = gate_cases::kExperts,
                                     .init_seed = seed});
}

}  // namespace

TEST_CASE("Every gate's plan is bit-identical at 1, 2 and 3 threads and across repeated runs",
          "[determinism][gate][parallel]") {
  ThreadGuard guard;
  const auto x = gate_cases::tokens(kTokens, 5u);
  const auto other = gate_cases::tokens(2 * gate_cases::kSeqLen, 6u);
  gate_cases::for_each_gate(
      11, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        INFO(name);
        using Gate = std::decay_t<decltype(gate)>;
        const auto c = gate_cases::make_context(spec, kTokens, 7u);
        moet::set_num_threads(1);
        moet::Routing<float> first;
        gate.route(x, c.ctx, first);
        const PlanCopy want(first);
        REQUIRE(want.offsets.back() > 0);
        for (const int threads : {1, 2, 3}) {
          INFO("threads " << threads);
          moet::set_num_threads(threads);
          for (int repeat = 0; repeat < 2; ++repeat) {
            moet::Routing<float> fresh;
            gate.route(x, c.ctx, fresh);
            CHECK(PlanCopy(fresh) == want);
          }
          // A plan reused after a different (smaller) batch and context.
          moet::Routing<float> reused;
          const auto c_other = gate_cases::make_context(spec, other.rows(), 8u);
          gate.route(other, c_other.ctx, reused);
          gate.route(x, c.ctx, reused);
          CHECK(PlanCopy(reused) == want);
        }
        // A gate rebuilt from the same options (same init_seed) routes the same way.
        const Gate copy = gate;
        moet::Routing<float> rebuilt;
        copy.route(x, c.ctx, rebuilt);
        CHECK(PlanCopy(rebuilt) == want);
      });
}

TEST_CASE("Gates rebuilt from the same seeds give the same plans", "[determinism][gate]") {
  const auto x = gate_cases::tokens(200, 9u);
  std::vector<PlanCopy> first;
  std::vector<PlanCopy> second;
  for (auto* plans : {&first, &second}) {
    gate_cases::for_each_gate(
        21, [&](const std::string&, const auto& gate, const gate_cases::ContextSpec& spec) {
          const auto c = gate_cases::make_context(spec, x.rows(), 3u);
          moet::Routing<float> plan;
          gate.route(x, c.ctx, plan);
          plans->emplace_back(plan);
        });
  }
  REQUIRE(first.size() == second.size());
  for (std::size_t i = 0; i < first.size(); ++i) CHECK(first[i] == second[i]);
  // And another init seed gives other routers: the seed really reaches the gates (the
  // stochastic gates take it as their stream; the ensemble mode uses no randomness).
  std::size_t index = 0;
  gate_cases::for_each_gate(
      22, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        INFO(name);
        const auto c = gate_cases::make_context(spec, x.rows(), 3u);
        moet::Routing<float> plan;
        gate.route(x, c.ctx, plan);
        const bool same = PlanCopy(plan) == first[index++];
        CHECK(same == (name.find("ensemble") != std::string::npos));
      });
}

TEST_CASE("Random gates repeat for the same (seed, step) and change with the step",
          "[determinism][gate]") {
  const auto x = gate_cases::tokens(300, 4u);
  gate_cases::for_each_gate(
      31, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        // Only the gates whose plan depends on ctx.seed / ctx.step.
        const bool noisy = name.find("noisy") != std::string::npos;
        const bool stochastic = name.find("stochastic") != std::string::npos &&
                                name.find("ensemble") == std::string::npos;
        if (!noisy && !stochastic) return;
        INFO(name);
        auto c = gate_cases::make_context(spec, x.rows(), 2u);
        moet::Routing<float> a;
        moet::Routing<float> b;
        gate.route(x, c.ctx, a);
        gate.route(x, c.ctx, b);
        CHECK(PlanCopy(a) == PlanCopy(b));
        c.ctx.step += 1;
        gate.route(x, c.ctx, b);
        CHECK_FALSE(PlanCopy(a) == PlanCopy(b));
        c.ctx.step -= 1;
        c.ctx.seed += 1;
        gate.route(x, c.ctx, b);
        CHECK_FALSE(PlanCopy(a) == PlanCopy(b));
      });
}

TEST_CASE("Every gate's layer output is bit-identical at 1, 2 and 3 threads and across runs",
          "[determinism][layer][parallel]") {
  ThreadGuard guard;
  const auto x = gate_cases::tokens(kTokens, 12u);
  const auto other = gate_cases::tokens(3 * gate_cases::kSeqLen, 13u);
  gate_cases::for_each_gate(
      41, [&](const std::string& name, const auto& gate, const gate_cases::ContextSpec& spec) {
        INFO(name);
        using Gate = std::decay_t<decltype(gate)>;
        using Layer = moet::MoELayer<Gate, moet::SwiGluExperts<float>>;
        const auto c = gate_cases::make_context(spec, kTokens, 14u);
        const auto c_other = gate_cases::make_context(spec, other.rows(), 15u);
        const Layer layer(gate, experts(2), experts(3));  // with one shared expert bank
        moet::set_num_threads(1);
        typename Layer::Workspace ws;
        moet::RowMatrix<float> want(kTokens, gate_cases::kModelDim);
        layer.forward(x, want, c.ctx, ws);
        for (const int threads : {1, 2, 3}) {
          INFO("threads " << threads);
          moet::set_num_threads(threads);
          typename Layer::Workspace fresh;
          moet::RowMatrix<float> y(kTokens, gate_cases::kModelDim);
          layer.forward(x, y, c.ctx, fresh);
          CHECK(bit_identical(y, want));
          // The same workspace after a different batch.
          moet::RowMatrix<float> y_other(other.rows(), gate_cases::kModelDim);
          layer.forward(other, y_other, c_other.ctx, fresh);
          layer.forward(x, y, c.ctx, fresh);
          CHECK(bit_identical(y, want));
        }
        // A layer rebuilt from the same seeds.
        const Layer rebuilt(gate, experts(2), experts(3));
        typename Layer::Workspace ws2;
        moet::RowMatrix<float> y(kTokens, gate_cases::kModelDim);
        rebuilt.forward(x, y, c.ctx, ws2);
        CHECK(bit_identical(y, want));
      });
}

TEST_CASE(
    "Workspace buffers start on 64-byte boundaries, so reductions do not depend on where "
    "the allocator puts them",
    "[determinism][buffer]") {
  // Eigen's vectorised sum peels elements up to the next aligned address: the same values at
  // another alignment can sum in another order. Buffers are always 64-byte aligned, so a
  // reduction over a buffer's view gives the same bits in any allocation history.
  std::vector<moet::detail::Buffer<float>> buffers(7);
  std::vector<std::vector<char>> noise;  // shifts the heap between the allocations
  float first = 0.0f;
  for (std::size_t i = 0; i < buffers.size(); ++i) {
    noise.emplace_back(13 * i + 5);
    auto v = buffers[i].vector(1000 + static_cast<moet::Index>(i));
    REQUIRE(reinterpret_cast<std::uintptr_t>(v.data()) % 64 == 0);
    std::iota(v.data(), v.data() + 1000, 0.001f);
    const float sum = v.head(1000).sum();
    if (i == 0) first = sum;
    CHECK(std::bit_cast<std::uint32_t>(sum) == std::bit_cast<std::uint32_t>(first));
  }
  // Growing keeps the alignment.
  moet::detail::Buffer<double> grow;
  for (const moet::Index n : {1, 3, 100, 70000, 600000}) {
    REQUIRE(reinterpret_cast<std::uintptr_t>(grow.data(n)) % 64 == 0);
  }
}

}  // namespace test_determinism
