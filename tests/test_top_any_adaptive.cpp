// TopAnyGate's adaptive process (docs/algorithms.md §4.5-4.6): records, remove-then-add, schedules.
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/stats.hpp"

namespace test_top_any_adaptive {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using Mat = moet::RowMatrix<double>;
using Vec = moet::Vector<double>;
using Gate = moet::TopAnyGate<double>;

moet::RouteContext training() {
  moet::RouteContext ctx;
  ctx.training = true;
  return ctx;
}

// Routes `x` in training mode and hands the plan to the hook, as a layer does.
void train_forward(Gate& gate, const Mat& x, moet::Routing<double>& plan) {
  gate.route(x, training(), plan);
  gate.on_training_forward(x, plan);
}

// d = 3, Emax = 4: slots 0..2 are the axes (active), slot 3 (1, 1, 0)/sqrt2 is inactive.
// theta = 0.5 everywhere, so slot e fires iff cos(x, W_e) > 0.5 (tau = 1).
Gate axis_gate(Index num_experts = 3) {
  Gate gate({.model_dim = 3,
             .num_experts = 4,
             .initial_experts = num_experts,
             .schedule = moet::TopAnySchedule::kManual});
  Mat w(3, 4);
  const double r = 1.0 / std::sqrt(2.0);
  w << 1, 0, 0, r,  //
      0, 1, 0, r,   //
      0, 0, 1, 0;
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  gate.set_thresholds(Vec::Constant(4, 0.5));
  return gate;
}

}  // namespace

TEST_CASE("TopAnyGate update removes idle experts, then adds one in the lowest free slot",
          "[gate][top_any][adaptive]") {
  Gate gate = axis_gate();
  // Hand-computed plan: t0 -> {0}, t1 -> {2}, t2 dropped (all cos < 0), t3 -> {0, 2},
  // t4 dropped (cos 0, -0.97, 0.24). Slot 1 gets nothing.
  Mat x(5, 3);
  x << 1, 0, 0.1,  //
      0.1, 0, 1,   //
      -1, -1, -1,  //
      1, 0, 1,     //
      0, -2, 0.5;
  gate.set_thresholds((Vec(4) << 0.5, 0.5, 0.5, 0.5).finished());
  const Mat w_before = gate.gate_embeddings();
  moet::Routing<double> plan;
  gate.begin_recording();
  train_forward(gate, x, plan);
  REQUIRE(plan.k(2) == 0);
  REQUIRE(plan.k(4) == 0);
  const std::vector<Index> want_tokens{2, 0, 2, 0};
  CHECK(std::vector<Index>(gate.recorded_tokens().begin(), gate.recorded_tokens().end()) ==
        want_tokens);
  const Vec r_s = (Vec(3) << -1, -3, -0.5).finished();  // t2 + t4
  CHECK(gate.recorded_unrouted() == r_s);

  // Remove slot 1 first, so the lowest free slot is 1 again: it is re-added with W = R_S/|R_S|.
  Vec theta = gate.thresholds();
  theta[1] = 0.3;  // the reset must set it to 0
  gate.set_thresholds(theta);
  const auto update = gate.update_experts();
  CHECK(update.removed == 1);
  CHECK(update.added == 1);
  CHECK(gate.expert_mask() == (Vec(4) << 1, 1, 1, 0).finished());
  const double norm = std::sqrt(1.0 + 9.0 + 0.25);
  CHECK(gate.gate_embeddings()(0, 1) == Approx(-1.0 / norm).epsilon(1e-14));
  CHECK(gate.gate_embeddings()(1, 1) == Approx(-3.0 / norm).epsilon(1e-14));
  CHECK(gate.gate_embeddings()(2, 1) == Approx(-0.5 / norm).epsilon(1e-14));
  CHECK(gate.thresholds()[1] == 0.0);
  for (const Index e : {0, 2, 3}) CHECK(gate.gate_embeddings().col(e) == w_before.col(e));
  CHECK(gate.thresholds()[0] == 0.5);
  CHECK_FALSE(gate.recording());
  CHECK(gate.num_active() == 3);
}

TEST_CASE("TopAnyGate adds at most one expert per update", "[gate][top_any][adaptive]") {
  Gate gate = axis_gate(2);  // slots 2 and 3 free
  Mat x(3, 3);
  x << 1, 0, 0,  //  -> {0}
      0, 1, 0,   //  -> {1}
      0, 0, 1;   //  dropped: slot 2, the only one it would fire, is inactive
  moet::Routing<double> plan;
  gate.begin_recording();
  train_forward(gate, x, plan);
  REQUIRE(plan.k(2) == 0);
  const auto update = gate.update_experts();
  CHECK(update.removed == 0);
  CHECK(update.added == 2);
  CHECK(gate.expert_mask() == (Vec(4) << 1, 1, 1, 0).finished());
  CHECK(gate.gate_embeddings().col(2) == (Vec(3) << 0, 0, 1).finished());

  // Every live slot busy and one still free: the next update again adds exactly one (slot 3).
  Mat y(4, 3);
  y << 1, 0, 0,    //
      0, 1, 0,     //
      0, 0, 1,     //
      -1, -1, -1;  // dropped
  gate.begin_recording();
  train_forward(gate, y, plan);
  const auto second = gate.update_experts();
  CHECK(second.removed == 0);
  CHECK(second.added == 3);
  CHECK(gate.num_active() == 4);
}

TEST_CASE("TopAnyGate update never exceeds num_experts", "[gate][top_any][adaptive]") {
  Gate gate = axis_gate(4);  // every slot active
  Mat x(4, 3);
  x << 1, 0, 0,    //
      0, 1, 0,     //  fires slots 1 and 3 (cos 0.707)
      0, 0, 1,     //
      -1, -1, -1;  // dropped: R_S != 0 but no free slot
  moet::Routing<double> plan;
  gate.begin_recording();
  train_forward(gate, x, plan);
  REQUIRE(plan.k(3) == 0);
  const auto update = gate.update_experts();
  CHECK(update.removed == 0);
  CHECK(update.added == -1);
  CHECK(gate.num_active() == 4);
}

TEST_CASE("TopAnyGate update adds nothing when R_S is zero, and tests its norm not its sum",
          "[gate][top_any][adaptive][edge]") {
  SECTION("nothing unrouted") {
    Gate gate = axis_gate(2);
    Mat x(2, 3);
    x << 1, 0, 0,  //
        0, 1, 0;
    moet::Routing<double> plan;
    gate.begin_recording();
    train_forward(gate, x, plan);
    CHECK(gate.recorded_unrouted().isZero(0.0));
    CHECK(gate.update_experts().added == -1);
    CHECK(gate.num_active() == 2);
  }
  SECTION("only an all-zero token unrouted") {
    Gate gate = axis_gate(2);
    const Mat x = Mat::Zero(1, 3);  // s = 0.5 < sigmoid(0.5): dropped, but adds 0 to R_S
    moet::Routing<double> plan;
    gate.begin_recording();
    train_forward(gate, x, plan);
    REQUIRE(plan.k(0) == 0);
    const auto update = gate.update_experts();
    CHECK(update.added == -1);
    CHECK(update.removed == 2);  // neither slot got a token
    CHECK(gate.num_active() == 0);
  }
  SECTION("R_S nonzero with elements summing to 0 (DeepSpeed's sum test would skip it)") {
    Gate gate = axis_gate(2);
    gate.set_thresholds(Vec::Constant(4, 0.9));
    Mat x(2, 3);
    x << 1, -1, 0,  // cos 0.707 and -0.707: dropped
        1, 0, 0;    // slot 0 (cos 1)
    moet::Routing<double> plan;
    gate.begin_recording();
    train_forward(gate, x, plan);
    REQUIRE(plan.k(0) == 0);
    const auto update = gate.update_experts();
    CHECK(update.removed == 1);  // slot 1
    CHECK(update.added == 1);
    const double r = 1.0 / std::sqrt(2.0);
    CHECK(gate.gate_embeddings().col(1).isApprox((Vec(3) << r, -r, 0).finished(), 1e-14));
  }
}

TEST_CASE("TopAnyGate records only while recording, and refuses eval plans",
          "[gate][top_any][adaptive]") {
  using Catch::Contains;
  Gate gate = axis_gate();
  Mat x(2, 3);
  x << 1, 0, 0,  //
      -1, -1, -1;
  moet::Routing<double> plan;
  train_forward(gate, x, plan);  // not recording yet
  CHECK(gate.training_forwards() == 1);
  gate.begin_recording();
  CHECK(gate.recorded_unrouted().isZero(0.0));
  CHECK(gate.recorded_tokens()[0] == 0);
  train_forward(gate, x, plan);
  train_forward(gate, x, plan);
  CHECK(gate.recorded_tokens()[0] == 2);
  CHECK(gate.recorded_unrouted() == (Vec(3) << -2, -2, -2).finished());

  // An eval forward: token 1 goes to its fallback expert. It must not reach the records.
  moet::Routing<double> eval_plan;
  gate.route(x, moet::RouteContext{}, eval_plan);
  REQUIRE(eval_plan.k(1) == 1);
  CHECK_THROWS_WITH(gate.on_training_forward(x, eval_plan),
                    Contains("[moet::TopAnyGate::on_training_forward]") &&
                        Contains("token 1 goes to expert") && Contains("eval-mode plan"));
  CHECK(gate.recorded_tokens()[0] == 2);
  CHECK(gate.recorded_unrouted() == (Vec(3) << -2, -2, -2).finished());
  CHECK(gate.training_forwards() == 3);
}

TEST_CASE("TopAnyGate follows the DeepSpeed cycle: record 300..600, update after 600",
          "[gate][top_any][adaptive][schedule]") {
  // Two slots; every token fires slot 0 only, so the update removes slot 1 and adds nothing.
  Gate gate({.model_dim = 2, .num_experts = 2});
  REQUIRE(gate.options().schedule == moet::TopAnySchedule::kDeepSpeedCycle);
  gate.set_gate_embeddings((Mat(2, 2) << 1, 0, 0, 1).finished(), moet::WeightLayout::kInOut);
  gate.set_thresholds(Vec::Constant(2, 0.5));
  const Mat x = (Mat(1, 2) << 1, 0.1).finished();
  moet::Routing<double> plan;
  for (int n = 0; n < 300; ++n) train_forward(gate, x, plan);
  CHECK_FALSE(gate.recording());
  train_forward(gate, x, plan);  // n = 300: begin, then record
  CHECK(gate.recording());
  CHECK(gate.recorded_tokens()[0] == 1);
  for (int n = 301; n < 600; ++n) train_forward(gate, x, plan);
  CHECK(gate.recording());
  CHECK(gate.recorded_tokens()[0] == 300);
  CHECK(gate.num_active() == 2);
  train_forward(gate, x, plan);  // n = 600: record, then update
  CHECK_FALSE(gate.recording());
  CHECK(gate.recorded_tokens()[0] == 301);  // the window is 301 forwards
  CHECK(gate.expert_mask() == (Vec(2) << 1, 0).finished());
  CHECK(gate.training_forwards() == 601);

  // The live count reaches the plan and the stats.
  train_forward(gate, x, plan);
  CHECK(plan.live_experts == 1);
  CHECK(moet::compute_stats(plan).live_experts == 1);
}

TEST_CASE("TopAnyGate cycle period is configurable and repeats every 3 periods",
          "[gate][top_any][adaptive][schedule]") {
  Gate gate({.model_dim = 2, .num_experts = 2, .schedule_period = 5});
  gate.set_gate_embeddings((Mat(2, 2) << 1, 0, 0, 1).finished(), moet::WeightLayout::kInOut);
  gate.set_thresholds(Vec::Constant(2, 0.5));
  const Mat x = (Mat(1, 2) << 1, 0.1).finished();
  moet::Routing<double> plan;
  std::vector<int> recorded_after;  // n whose forward left the gate recording
  std::vector<int> updates;         // n whose forward ran an update
  for (int n = 0; n < 32; ++n) {
    const bool was_recording = gate.recording();
    train_forward(gate, x, plan);
    if (gate.recording()) recorded_after.push_back(n);
    if (was_recording && !gate.recording()) updates.push_back(n);
  }
  CHECK(recorded_after == std::vector<int>{5, 6, 7, 8, 9, 20, 21, 22, 23, 24});
  CHECK(updates == std::vector<int>{10, 25});
}

TEST_CASE("TopAnyGate manual schedule never begins on its own", "[gate][top_any][adaptive]") {
  Gate gate({.model_dim = 2,
             .num_experts = 2,
             .schedule = moet::TopAnySchedule::kManual,
             .schedule_period = 1});
  const Mat x = (Mat(1, 2) << 1, 0.1).finished();
  moet::Routing<double> plan;
  for (int n = 0; n < 10; ++n) train_forward(gate, x, plan);
  CHECK_FALSE(gate.recording());
  CHECK(gate.training_forwards() == 10);
  gate.set_training_forwards(3);
  CHECK(gate.training_forwards() == 3);
}

TEST_CASE("TopAnyGate records and updates the same at 1 and 2 threads",
          "[gate][top_any][adaptive][parallel]") {
  const Index num_tokens = 1200, d = 16;
  moet::detail::Rng rng(17);
  moet::RowMatrix<float> x(num_tokens, d);
  for (Index t = 0; t < num_tokens; ++t) {
    for (Index i = 0; i < d; ++i) x(t, i) = static_cast<float>(rng.normal());
  }
  auto run = [&](int threads) {
    moet::set_num_threads(threads);
    moet::TopAnyGate<float> gate({.model_dim = d,
                                  .num_experts = 8,
                                  .initial_experts = 6,
                                  .init_seed = 3,
                                  .schedule = moet::TopAnySchedule::kManual});
    gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.3f));
    moet::Routing<float> plan;
    gate.begin_recording();
    for (int step = 0; step < 3; ++step) {
      gate.route(x, training(), plan);
      gate.on_training_forward(x, plan);
    }
    moet::Vector<float> r_s = gate.recorded_unrouted();
    std::vector<Index> r_e(gate.recorded_tokens().begin(), gate.recorded_tokens().end());
    const auto update = gate.update_experts();
    return std::make_tuple(r_s, r_e, update.added, moet::RowMatrix<float>(gate.gate_embeddings()));
  };
  const int saved = moet::num_threads();
  const auto one = run(1);
  const auto two = run(2);
  moet::set_num_threads(saved);
  CHECK(std::get<0>(one) == std::get<0>(two));
  CHECK(std::get<1>(one) == std::get<1>(two));
  CHECK(std::get<2>(one) == 6);  // something was unrouted, slot 6 is the lowest free one
  CHECK(std::get<2>(two) == 6);
  CHECK(std::get<3>(one) == std::get<3>(two));
}

TEST_CASE("TopAnyGate adaptive process rejects bad input", "[gate][top_any][adaptive][errors]") {
  using Catch::Contains;
  CHECK_THROWS_WITH(
      Gate({.model_dim = 2, .num_experts = 2, .schedule_period = 0}),
      Contains("[moet::TopAnyGate]") && Contains("schedule_period") && Contains("got 0"));
  Gate gate = axis_gate();
  CHECK_THROWS_WITH(gate.update_experts(),
                    Contains("[moet::TopAnyGate::update_experts]") && Contains("begin_recording"));
  const Mat x = Mat::Ones(2, 3);
  moet::Routing<double> plan;
  gate.route(x, training(), plan);
  gate.begin_recording();
  CHECK_THROWS_WITH(gate.on_training_forward(Mat::Ones(2, 4), plan),
                    Contains("model_dim = 3") && Contains("got 4"));
  CHECK_THROWS_WITH(gate.on_training_forward(Mat::Ones(3, 3), plan),
                    Contains("the plan has 2 tokens but x has 3 rows"));
  moet::Routing<double> other;
  other.reset(2, 5);
  other.commit_counts();
  CHECK_THROWS_WITH(gate.on_training_forward(x, other),
                    Contains("num_experts = 4") && Contains("got 5"));
  CHECK_THROWS_WITH(gate.set_training_forwards(-1), Contains("got -1"));
  // Nothing was recorded or counted by the failed calls.
  CHECK(gate.training_forwards() == 0);
  CHECK(gate.recorded_unrouted().isZero(0.0));
  gate.update_experts();
  CHECK_THROWS_WITH(gate.update_experts(), Contains("no recording"));
}

}  // namespace test_top_any_adaptive
