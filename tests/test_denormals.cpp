// Subnormal floats in moet's parallel tasks (moet::set_flush_denormals, detail::DenormalGuard):
// with the flush on (the default) tasks see flush-to-zero and denormals-are-zero, produce no
// subnormal values and leave the caller's mode as it was; with it off they follow IEEE gradual
// underflow. The layer case is the one that motivated it: a saturated router whose second
// choice gets a subnormal combine weight. Its oracle is the same step with the flush off (IEEE):
// the two agree to within the subnormal range on every value.

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/train/optim.hpp"

namespace test_denormals {  // one per file: the unity build puts several files in one TU

#if MOET_HAS_MXCSR

namespace {

using moet::Index;
constexpr std::uint32_t kFlushBits = 0x8040;  // FTZ | DAZ

bool is_subnormal(float v) { return v != 0.0f && std::abs(v) < std::numeric_limits<float>::min(); }

// Restores the flush switch and the caller's MXCSR whatever a test does.
struct ModeScope {
  bool flush = moet::flush_denormals();
  std::uint32_t csr = _mm_getcsr();
  ~ModeScope() {
    moet::set_flush_denormals(flush);
    _mm_setcsr(csr);
  }
};

// 2^-100 * 2^-30 = 2^-130: subnormal under IEEE, zero with flush-to-zero. Also checks that a
// subnormal input reads as zero with denormals-are-zero.
struct TaskResult {
  float product = 1.0f;
  float from_subnormal = 1.0f;
};
TaskResult subnormal_arithmetic() {
  volatile float a = std::ldexp(1.0f, -100);
  volatile float b = std::ldexp(1.0f, -30);
  volatile float sub = std::ldexp(1.0f, -140);
  TaskResult r;
  r.product = a * b;
  r.from_subnormal = sub * 2.0f;
  return r;
}

std::vector<TaskResult> run_tasks(Index num_tasks) {
  std::vector<TaskResult> results(static_cast<std::size_t>(num_tasks));
  moet::detail::parallel_for(
      num_tasks, [&](Index i) { results[static_cast<std::size_t>(i)] = subnormal_arithmetic(); });
  return results;
}

}  // namespace

TEST_CASE("denormals: tasks flush by default and the caller's mode is kept", "[denormals]") {
  const ModeScope scope;
  _mm_setcsr(_mm_getcsr() & ~kFlushBits);  // the caller: IEEE
  REQUIRE(moet::flush_denormals());        // the default
  for (const Index num_tasks : {Index{1}, Index{2}, Index{7}}) {
    for (const bool flush : {true, false}) {
      moet::set_flush_denormals(flush);
      const auto results = run_tasks(num_tasks);
      for (const TaskResult& r : results) {
        if (flush) {
          CHECK(r.product == 0.0f);
          CHECK(r.from_subnormal == 0.0f);
        } else {
          CHECK(is_subnormal(r.product));
          CHECK(is_subnormal(r.from_subnormal));
        }
      }
      CHECK((_mm_getcsr() & kFlushBits) == 0);
      CHECK(is_subnormal(subnormal_arithmetic().product));
    }
  }
}

TEST_CASE("denormals: a caller that flushes itself keeps flushing", "[denormals]") {
  const ModeScope scope;
  moet::set_flush_denormals(true);
  _mm_setcsr(_mm_getcsr() | kFlushBits);
  run_tasks(3);
  CHECK((_mm_getcsr() & kFlushBits) == kFlushBits);
}

TEST_CASE("denormals: the guard puts back only its two bits", "[denormals]") {
  // The guard itself, on this thread: the status flags raised under it and the rounding mode
  // stay. (Across an OpenMP region the runtime may reset the status flags itself: LLVM's libomp
  // does, so this is not asserted through parallel_for.)
  const ModeScope scope;
  moet::set_flush_denormals(true);
  constexpr std::uint32_t kOverflow = 0x8;      // MXCSR OE
  constexpr std::uint32_t kRoundDown = 0x2000;  // RC = 01
  _mm_setcsr((_mm_getcsr() & ~(kFlushBits | kOverflow | 0x6000u)) | kRoundDown);
  {
    const moet::detail::DenormalGuard guard;
    CHECK((_mm_getcsr() & kFlushBits) == kFlushBits);
    volatile float big = 1e30f;
    volatile float product = big * big;
    static_cast<void>(product);
  }
  CHECK((_mm_getcsr() & kOverflow) != 0);
  CHECK((_mm_getcsr() & kFlushBits) == 0);
  CHECK((_mm_getcsr() & 0x6000u) == kRoundDown);
  moet::set_flush_denormals(false);
  {
    const moet::detail::DenormalGuard guard;  // off: changes nothing
    CHECK((_mm_getcsr() & kFlushBits) == 0);
  }
}

TEST_CASE("denormals: nested in the caller's own parallel region", "[denormals]") {
  const ModeScope scope;
  moet::set_flush_denormals(true);
  std::vector<TaskResult> results(2);
  std::vector<std::uint32_t> after(2, kFlushBits);
  std::vector<int> ran(2, 0);
#if MOET_HAS_OPENMP
#pragma omp parallel num_threads(2)
#endif
  {
    const int me = moet::detail::thread_id();
    _mm_setcsr(_mm_getcsr() & ~kFlushBits);
    moet::detail::parallel_for(
        1, [&](Index) { results[static_cast<std::size_t>(me)] = subnormal_arithmetic(); });
    after[static_cast<std::size_t>(me)] = _mm_getcsr() & kFlushBits;
    ran[static_cast<std::size_t>(me)] = 1;
  }
  REQUIRE(ran[0] == 1);
  for (std::size_t i = 0; i < 2; ++i) {
    if (ran[i] == 0) continue;
    CHECK(results[i].product == 0.0f);
    CHECK(after[i] == 0);
  }
}

namespace {

using Layer = moet::MoELayer<moet::TopKGate<float>, moet::SwiGluExperts<float>>;
constexpr Index kDim = 32;
constexpr Index kHidden = 48;
constexpr Index kExperts = 4;
constexpr Index kTokens = 24;

// Every value a training step produces: the output, the input gradient, every parameter's
// gradient, the combine weights, and the parameters after one AdamW step.
struct StepValues {
  std::vector<float> values;
  std::vector<float> params;
  std::vector<float> weights;
};

// Router column 0 is 95 / d and the others 0, inputs near 1: expert 0's logit is about 95
// above the rest, so the others' probabilities (about e^-95) are subnormal. Top-2 with
// renormalisation sends every token to expert 0 and, by the lower-id tie rule, expert 1.
StepValues saturated_step(bool flush) {
  moet::set_flush_denormals(flush);
  Layer layer(
      moet::TopKGate<float>(moet::TopKGate<float>::mixtral_options(kDim, kExperts)),
      moet::SwiGluExperts<float>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 3}));
  layer.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float> /*grad*/) {
        if (name.find("router") == std::string_view::npos) return;
        value.setZero();
        if (value.rows() == kDim) value.col(0).setConstant(95.0f / static_cast<float>(kDim));
      });
  layer.parameters_changed();
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  moet::RowMatrix<float> x(kTokens, kDim), dy(kTokens, kDim), y(kTokens, kDim), dx(kTokens, kDim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = 1.0f + 0.01f * normal(gen);
  for (Index i = 0; i < dy.size(); ++i) dy.data()[i] = normal(gen);
  Layer::Workspace ws;
  layer.zero_grad();
  layer.forward_train(x, y, {}, ws);
  layer.backward(x, dy, {}, ws, dx);
  StepValues out;
  out.weights.assign(ws.routing.weights().begin(), ws.routing.weights().end());
  out.values.assign(y.data(), y.data() + y.size());
  out.values.insert(out.values.end(), dx.data(), dx.data() + dx.size());
  layer.visit_parameters(
      [&](std::string_view, moet::ParamMap<float> /*value*/, moet::ParamMap<float> grad) {
        out.values.insert(out.values.end(), grad.data(), grad.data() + grad.size());
      });
  moet::AdamW<float> opt({.lr = 1e-3});
  opt.step(layer);
  layer.visit_parameters(
      [&](std::string_view, moet::ParamMap<float> value, moet::ParamMap<float> /*grad*/) {
        out.params.insert(out.params.end(), value.data(), value.data() + value.size());
      });
  return out;
}

Index count_subnormal(const std::vector<float>& v) {
  Index n = 0;
  for (const float x : v) n += is_subnormal(x) ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("denormals: a saturated router's training step", "[denormals]") {
  const ModeScope scope;
  _mm_setcsr(_mm_getcsr() & ~kFlushBits);
  const StepValues ieee = saturated_step(false);
  const StepValues flushed = saturated_step(true);
  CHECK((_mm_getcsr() & kFlushBits) == 0);  // the caller's mode after both

  // The scenario is real: under IEEE every second choice's weight is subnormal and the
  // step's values hold subnormals; with the flush, none.
  REQUIRE(ieee.weights.size() == static_cast<std::size_t>(2 * kTokens));
  for (std::size_t a = 1; a < ieee.weights.size(); a += 2) CHECK(is_subnormal(ieee.weights[a]));
  CHECK(count_subnormal(ieee.values) > 0);
  CHECK(count_subnormal(flushed.weights) == 0);
  CHECK(count_subnormal(flushed.values) == 0);

  // Everything else agrees: outputs and gradients differ only below the smallest normal float,
  // and the parameters after AdamW by at most lr / eps times that (AdamW divides a tiny first
  // moment by eps when the second moment underflows).
  const auto worst_difference = [](const std::vector<float>& a, const std::vector<float>& b) {
    REQUIRE(a.size() == b.size());
    double worst = 0.0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      REQUIRE(std::isfinite(b[i]));
      worst = std::max(worst, std::abs(double(a[i]) - double(b[i])));
    }
    return worst;
  };
  const double tiny = 64.0 * std::numeric_limits<float>::min();
  CHECK(worst_difference(ieee.values, flushed.values) <= tiny);
  CHECK(worst_difference(ieee.params, flushed.params) <= tiny * (1e-3 / 1e-8));
  CHECK(count_subnormal(ieee.params) + count_subnormal(flushed.params) == 0);
  for (std::size_t a = 0; a < ieee.weights.size(); a += 2) {
    CHECK(flushed.weights[a] == ieee.weights[a]);
  }
}

namespace {
// One float parameter and its gradient (train/optim.hpp's module concept).
struct OneFloat {
  float p = 0.0f;
  float g = 0.0f;
  void zero_grad() { g = 0.0f; }
  template <class F>
  void visit_parameters(F&& f) {
    f("p", moet::ParamMap<float>(&p, 1, 1), moet::ParamMap<float>(&g, 1, 1));
  }
};
}  // namespace

TEST_CASE("denormals: AdamW's pass flushes a subnormal parameter", "[denormals]") {
  const ModeScope scope;
  _mm_setcsr(_mm_getcsr() & ~kFlushBits);
  for (const bool flush : {true, false}) {
    moet::set_flush_denormals(flush);
    OneFloat module;
    module.p = std::ldexp(1.0f, -140);
    moet::AdamW<float> opt({.lr = 1e-3, .weight_decay = 0.5});
    opt.step(module);
    if (flush) {
      CHECK(module.p == 0.0f);
    } else {
      CHECK(is_subnormal(module.p));
    }
  }
}

#else

TEST_CASE("denormals: no MXCSR on this target", "[denormals]") {
  // The flush is x86 only; the switch still reads back what was set.
  const bool before = moet::flush_denormals();
  moet::set_flush_denormals(!before);
  CHECK(moet::flush_denormals() == !before);
  moet::set_flush_denormals(before);
}

#endif

}  // namespace test_denormals
