// Dispatchers: the reference against a hand-computed case, the grouped dispatcher against the
// reference, bit-identical results for any thread count, the dense (shared-expert) helper.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/routing.hpp"

namespace test_dispatch {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;

static_assert(moet::Dispatcher<moet::GroupedDispatch, moet::SwiGluExperts<float>>);
static_assert(moet::Dispatcher<moet::ReferenceDispatch, moet::FfnExperts<double>>);
static_assert(!moet::Dispatcher<int, moet::SwiGluExperts<float>>);

template <class S>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(normal(gen));
  }
  return m;
}

// Builds a plan from explicit per-token (expert, weight) lists.
template <class S>
moet::Routing<S> make_plan(const std::vector<std::vector<std::pair<int, S>>>& lists,
                           Index num_experts) {
  moet::Routing<S> r;
  r.reset(static_cast<Index>(lists.size()), num_experts);
  for (std::size_t t = 0; t < lists.size(); ++t) {
    r.counts()[t] = static_cast<Index>(lists[t].size());
  }
  r.commit_counts();
  for (std::size_t t = 0; t < lists.size(); ++t) {
    for (std::size_t j = 0; j < lists[t].size(); ++j) {
      r.experts(static_cast<Index>(t))[j] = lists[t][j].first;
      r.weights(static_cast<Index>(t))[j] = lists[t][j].second;
    }
  }
  return r;
}

enum class PlanKind {
  kRandom,     // k in 0..min(3, usable), distinct experts; every third expert never used
  kOneExpert,  // every token goes to expert E-1 only
  kEveryone,   // every token goes to every expert, in descending id order
};

// A seeded plan over `num_tokens` tokens and `num_experts` experts.
std::vector<std::vector<std::pair<int, float>>> plan_lists(Index num_tokens, Index num_experts,
                                                           std::uint64_t seed, PlanKind kind) {
  using moet::detail::hash_key;
  std::vector<std::vector<std::pair<int, float>>> lists(static_cast<std::size_t>(num_tokens));
  std::vector<int> usable;
  for (int e = 0; e < static_cast<int>(num_experts); ++e) {
    if (num_experts == 1 || e % 3 != 1) usable.push_back(e);
  }
  for (Index t = 0; t < num_tokens; ++t) {
    auto& list = lists[static_cast<std::size_t>(t)];
    const auto ut = static_cast<std::uint64_t>(t);
    if (kind == PlanKind::kOneExpert) {
      list.emplace_back(
          static_cast<int>(num_experts - 1),
          0.5f + 0.5f * static_cast<float>(moet::detail::uniform01(hash_key(seed, ut, 9))));
      continue;
    }
    if (kind == PlanKind::kEveryone) {
      for (int e = static_cast<int>(num_experts) - 1; e >= 0; --e) {
        list.emplace_back(e, static_cast<float>(moet::detail::uniform01(
                                 hash_key(seed, ut, 8, static_cast<std::uint64_t>(e)))));
      }
      continue;
    }
    const auto max_k = std::min<std::uint64_t>(3, usable.size());
    const auto k = moet::detail::uniform_below(hash_key(seed, ut, 1), max_k + 1);
    std::vector<int> pool = usable;
    for (std::uint64_t j = 0; j < k; ++j) {
      const auto pick = j + moet::detail::uniform_below(hash_key(seed, ut, 2, j), pool.size() - j);
      std::swap(pool[j], pool[pick]);
      const auto w = 0.1 + 0.9 * moet::detail::uniform01(hash_key(seed, ut, 3, j));
      list.emplace_back(pool[j], static_cast<float>(w));
    }
  }
  return lists;
}

// got ~ want: Frobenius-relative <= rel, and every element within rel * (|want| + rms(want)).
void check_close(const moet::RowMatrix<float>& got, const moet::RowMatrix<float>& want,
                 double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const Eigen::MatrixXd g = got.cast<double>();
  const Eigen::MatrixXd w = want.cast<double>();
  CHECK((g - w).norm() <= rel * w.norm());
  const double rms = w.size() > 0 ? w.norm() / std::sqrt(static_cast<double>(w.size())) : 0.0;
  int bad = 0;
  for (Index i = 0; i < w.rows(); ++i) {
    for (Index j = 0; j < w.cols(); ++j) {
      if (!(std::abs(g(i, j) - w(i, j)) <= rel * (std::abs(w(i, j)) + rms))) ++bad;
    }
  }
  CHECK(bad == 0);
}

// Bitwise equality (NaN-safe: compares representations).
bool bit_identical(const moet::RowMatrix<float>& a, const moet::RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data(),
                    [](float u, float v) { return std::memcmp(&u, &v, sizeof(float)) == 0; });
}

template <class D, class X>
moet::RowMatrix<float> run_dispatch(const D& dispatch, const X& experts,
                                    const moet::RowMatrix<float>& x,
                                    const moet::Routing<float>& plan) {
  typename D::template Workspace<X> ws;
  moet::RowMatrix<float> y(x.rows(), x.cols());
  y.setConstant(std::numeric_limits<float>::quiet_NaN());  // every row must be written
  dispatch.run(experts, x, plan, y, ws);
  return y;
}

// Restores the thread count when a test ends.
struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

}  // namespace

TEST_CASE("ReferenceDispatch matches a hand-computed case", "[dispatch][reference]") {
  // Two ReLU FFN experts, model_dim = hidden_dim = 2:
  //   expert 0: W1 = I, b1 = (0, -1), W2 = diag(2, 1), b2 = (0.5, 0)
  //   expert 1: W1 = [[1, 1], [1, -1]], b1 = 0, W2 = I, b2 = (0, 1)
  moet::ReluFfnExperts<double> experts({.model_dim = 2, .hidden_dim = 2, .num_experts = 2});
  {
    auto edit = experts.edit();
    edit.in_weights(0) << 1, 0, 0, 1;
    edit.in_bias(0) << 0, -1;
    edit.out_weights(0) << 2, 0, 0, 1;
    edit.out_bias(0) << 0.5, 0;
    edit.in_weights(1) << 1, 1, 1, -1;
    edit.in_bias(1) << 0, 0;
    edit.out_weights(1) << 1, 0, 0, 1;
    edit.out_bias(1) << 0, 1;
  }
  moet::RowMatrix<double> x(3, 2);
  x << 1, 2,  //
      -1, 3,  //
      5, 5;
  // Token 0 -> expert 1 (0.25) then expert 0 (0.75); token 1 -> expert 1 (1.0); token 2 -> none.
  const auto plan = make_plan<double>({{{1, 0.25}, {0, 0.75}}, {{1, 1.0}}, {}}, 2);
  // x0: E0: h = relu((1, 2) + (0, -1)) = (1, 1), out = (2, 1) + (0.5, 0) = (2.5, 1)
  //     E1: h = relu((3, -1)) = (3, 0), out = (3, 0) + (0, 1) = (3, 1)
  //     y0 = 0.25 (3, 1) + 0.75 (2.5, 1) = (2.625, 1)
  // x1: E1: h = relu((2, -4)) = (2, 0), out = (2, 1); y1 = (2, 1)
  // x2: routed nowhere, y2 = 0
  moet::ReferenceDispatch::Workspace<moet::ReluFfnExperts<double>> ws;
  moet::RowMatrix<double> y = moet::RowMatrix<double>::Constant(3, 2, 99.0);
  moet::ReferenceDispatch{}.run(experts, x, plan, y, ws);
  CHECK(y(0, 0) == Approx(2.625).epsilon(1e-15));
  CHECK(y(0, 1) == Approx(1.0).epsilon(1e-15));
  CHECK(y(1, 0) == Approx(2.0).epsilon(1e-15));
  CHECK(y(1, 1) == Approx(1.0).epsilon(1e-15));
  CHECK(y(2, 0) == 0.0);
  CHECK(y(2, 1) == 0.0);
  // The grouped dispatcher agrees on the same case.
  moet::GroupedDispatch::Workspace<moet::ReluFfnExperts<double>> gws;
  moet::RowMatrix<double> yg = moet::RowMatrix<double>::Constant(3, 2, 99.0);
  moet::GroupedDispatch{}.run(experts, x, plan, yg, gws);
  CHECK((yg - y).norm() <= 1e-14);
}

TEST_CASE("GroupedDispatch equals ReferenceDispatch on random plans", "[dispatch][grouped]") {
  const auto seed = GENERATE(1u, 2u);
  const auto num_tokens = GENERATE(Index{0}, Index{1}, Index{7}, Index{300});
  const auto num_experts = GENERATE(Index{1}, Index{3}, Index{8});
  const auto kind = GENERATE(PlanKind::kRandom, PlanKind::kOneExpert, PlanKind::kEveryone);
  CAPTURE(seed, num_tokens, num_experts, static_cast<int>(kind));
  moet::SwiGluExperts<float> experts(
      {.model_dim = 16, .hidden_dim = 24, .num_experts = num_experts, .init_seed = seed});
  const auto x = random_rows<float>(num_tokens, 16, seed + 10u);
  const auto plan = make_plan<float>(plan_lists(num_tokens, num_experts, seed, kind), num_experts);
  const auto want = run_dispatch(moet::ReferenceDispatch{}, experts, x, plan);
  const auto got = run_dispatch(moet::GroupedDispatch{}, experts, x, plan);
  check_close(got, want, 1e-5);
  // Small blocks: several tasks per expert.
  const auto got_small = run_dispatch(moet::GroupedDispatch({.block_rows = 5}), experts, x, plan);
  check_close(got_small, want, 1e-5);
  // Tokens routed nowhere get exactly 0.
  for (Index t = 0; t < num_tokens; ++t) {
    if (plan.k(t) == 0) {
      CHECK(got.row(t).isZero(0.0f));
      CHECK(want.row(t).isZero(0.0f));
    }
  }
}

TEST_CASE("Random plans cover idle experts, k = 0 and variable k", "[dispatch][grouped]") {
  // Guards the test above: its random plans really contain the edge cases it claims.
  const auto plan = make_plan<float>(plan_lists(300, 8, 1, PlanKind::kRandom), 8);
  moet::ExpertMajor view;
  view.build(plan);
  CHECK(view.load(1) == 0);
  CHECK(view.load(4) == 0);
  CHECK(view.load(0) > 0);
  std::vector<int> seen_k(4, 0);
  for (Index t = 0; t < 300; ++t) ++seen_k[static_cast<std::size_t>(plan.k(t))];
  for (const int c : seen_k) CHECK(c > 0);
}

TEST_CASE("GroupedDispatch handles FFN experts with biases and double", "[dispatch][grouped]") {
  const auto seed = GENERATE(3u, 4u);
  moet::FfnExperts<double> experts(
      {.model_dim = 12, .hidden_dim = 20, .num_experts = 5, .init_seed = seed});
  experts.edit().in_bias_stack() = random_rows<double>(5, 20, seed + 1u);
  experts.edit().out_bias_stack() = random_rows<double>(5, 12, seed + 2u);
  const auto x = random_rows<double>(150, 12, seed + 3u);
  const auto lists = plan_lists(150, 5, seed, PlanKind::kRandom);
  std::vector<std::vector<std::pair<int, double>>> dlists(lists.size());
  for (std::size_t t = 0; t < lists.size(); ++t) {
    for (const auto& [e, w] : lists[t]) dlists[t].emplace_back(e, static_cast<double>(w));
  }
  const auto plan = make_plan<double>(dlists, 5);
  moet::RowMatrix<double> want(150, 12);
  moet::RowMatrix<double> got(150, 12);
  moet::ReferenceDispatch::Workspace<moet::FfnExperts<double>> rws;
  moet::GroupedDispatch::Workspace<moet::FfnExperts<double>> gws;
  moet::ReferenceDispatch{}.run(experts, x, plan, want, rws);
  moet::GroupedDispatch({.block_rows = 16}).run(experts, x, plan, got, gws);
  CHECK((got - want).norm() <= 1e-12 * want.norm());
}

TEST_CASE("GroupedDispatch reuses its workspace across different plans", "[dispatch][grouped]") {
  moet::SwiGluExperts<float> experts({.model_dim = 8, .hidden_dim = 16, .num_experts = 4});
  moet::GroupedDispatch dispatch({.block_rows = 8});
  moet::GroupedDispatch::Workspace<moet::SwiGluExperts<float>> ws;
  for (const Index num_tokens : {Index{100}, Index{3}, Index{57}, Index{0}, Index{100}}) {
    const auto x = random_rows<float>(num_tokens, 8, static_cast<std::uint32_t>(num_tokens));
    const auto plan = make_plan<float>(
        plan_lists(num_tokens, 4, static_cast<std::uint64_t>(num_tokens), PlanKind::kRandom), 4);
    moet::RowMatrix<float> y(num_tokens, 8);
    dispatch.run(experts, x, plan, y, ws);
    check_close(y, run_dispatch(moet::ReferenceDispatch{}, experts, x, plan), 1e-5);
  }
}

TEST_CASE("GroupedDispatch is bit-identical for 1, 2 and 3 threads",
          "[dispatch][grouped][parallel]") {
  ThreadGuard guard;
  const auto kind = GENERATE(PlanKind::kRandom, PlanKind::kOneExpert);
  moet::SwiGluExperts<float> experts({.model_dim = 20, .hidden_dim = 36, .num_experts = 8});
  const auto x = random_rows<float>(700, 20, 5u);
  const auto plan = make_plan<float>(plan_lists(700, 8, 5, kind), 8);
  std::vector<moet::RowMatrix<float>> results;
  std::vector<moet::RowMatrix<float>> dense;
  for (const int threads : {1, 2, 3}) {
    moet::set_num_threads(threads);
    results.push_back(run_dispatch(moet::GroupedDispatch({.block_rows = 32}), experts, x, plan));
    moet::DenseWorkspace<moet::SwiGluExperts<float>> dws;
    moet::RowMatrix<float> y = moet::RowMatrix<float>::Zero(700, 20);
    moet::add_dense_expert(experts, 3, 0.5f, x, y, dws);
    dense.push_back(y);
  }
  CHECK(bit_identical(results[0], results[1]));
  CHECK(bit_identical(results[0], results[2]));
  CHECK(bit_identical(dense[0], dense[1]));
  CHECK(bit_identical(dense[0], dense[2]));
}

namespace {

// Runs `plan` through GroupedDispatch at 1, 2, 3 and 7 threads; checks every result against
// thread 1's bits and the reference, and that more threads than tasks took the column-split
// path (the only one that fills `ws.hidden`).
template <class X>
void check_column_split(const X& experts, const moet::RowMatrix<float>& x,
                        const moet::Routing<float>& plan, Index num_tasks) {
  ThreadGuard guard;
  const auto want = run_dispatch(moet::ReferenceDispatch{}, experts, x, plan);
  std::vector<moet::RowMatrix<float>> results;
  for (const int threads : {1, 2, 3, 7}) {
    moet::set_num_threads(threads);
    moet::GroupedDispatch::Workspace<X> ws;
    moet::RowMatrix<float> y = moet::RowMatrix<float>::Constant(
        x.rows(), x.cols(), std::numeric_limits<float>::quiet_NaN());
    moet::GroupedDispatch{}.run(experts, x, plan, y, ws);
    INFO(threads << " threads, " << num_tasks << " tasks");
    CHECK((ws.hidden.capacity() > 0) == (num_tasks > 0 && threads > num_tasks));
    check_close(y, want, 1e-5);
    results.push_back(y);
  }
  for (std::size_t i = 1; i < results.size(); ++i) {
    INFO("result " << i);
    CHECK(bit_identical(results[0], results[i]));
  }
}

}  // namespace

TEST_CASE("Fewer tasks than threads: experts' columns are split, bits unchanged",
          "[dispatch][grouped][parallel][split]") {
  const auto format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16,
                               moet::WeightFormat::kQ8_0, moet::WeightFormat::kQ4_0);
  const auto num_tokens = GENERATE(Index{1}, Index{2}, Index{5});
  CAPTURE(static_cast<int>(format), num_tokens);
  // Top-1 on a few tokens: one task per distinct expert.
  const auto lists = plan_lists(num_tokens, 8, 11, PlanKind::kOneExpert);
  const auto plan = make_plan<float>(lists, 8);
  const auto x = random_rows<float>(num_tokens, 96, 12u);
  // Several panels in both stages at every level, a partial last one.
  moet::SwiGluExperts<float> glu({.model_dim = 96,
                                  .hidden_dim = 200,
                                  .num_experts = 8,
                                  .init_seed = 13,
                                  .weight_format = format});
  check_column_split(glu, x, plan, 1);
  // Top-3 over distinct experts (k varies per token in the random plan: 0 to 3).
  const auto random_plan = make_plan<float>(plan_lists(num_tokens, 8, 14, PlanKind::kRandom), 8);
  moet::ExpertMajor view;
  view.build(random_plan);
  Index tasks = 0;
  for (Index e = 0; e < 8; ++e) tasks += view.load(e) > 0 ? 1 : 0;
  check_column_split(glu, x, random_plan, tasks);
  // A shared (dense) expert on every token: one row block, split the same way.
  {
    ThreadGuard guard;
    std::vector<moet::RowMatrix<float>> dense;
    for (const int threads : {1, 2, 3}) {
      moet::set_num_threads(threads);
      moet::DenseWorkspace<moet::SwiGluExperts<float>> dws;
      moet::RowMatrix<float> y = random_rows<float>(num_tokens, 96, 18u);
      moet::add_dense_expert(glu, 5, 0.75f, x, y, dws);
      INFO("dense, " << threads << " threads");
      CHECK((dws.hidden.capacity() > 0) == (threads > 1));
      dense.push_back(y);
    }
    // Against the expert run whole on each row.
    moet::SwiGluExperts<float>::Scratch scratch;
    moet::RowMatrix<float> want = random_rows<float>(num_tokens, 96, 18u);
    moet::RowMatrix<float> out(num_tokens, 96);
    glu.forward(5, x, out, scratch);
    want += 0.75f * out;
    CHECK(bit_identical(dense[0], want));
    CHECK(bit_identical(dense[1], want));
    CHECK(bit_identical(dense[2], want));
  }
  if (format == moet::WeightFormat::kF32) {
    // FFN with biases: the bias and the activation on each piece's columns only.
    moet::FfnExperts<float> ffn(
        {.model_dim = 96, .hidden_dim = 200, .num_experts = 8, .init_seed = 15});
    ffn.edit().in_bias_stack() = random_rows<float>(8, 200, 16u);
    ffn.edit().out_bias_stack() = random_rows<float>(8, 96, 17u);
    check_column_split(ffn, x, plan, 1);
  }
}

TEST_CASE("A bank's staged forward over any panel split equals its forward", "[experts][split]") {
  const auto format =
      GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16, moet::WeightFormat::kQ4_1);
  moet::SwiGluExperts<float> bank(
      {.model_dim = 70, .hidden_dim = 130, .num_experts = 2, .weight_format = format});
  const auto x = random_rows<float>(3, 70, 20u);
  moet::SwiGluExperts<float>::Scratch scratch;
  moet::RowMatrix<float> want(3, 70);
  bank.forward(1, x, want, scratch);
  const Index hidden_panels = bank.stage_panels(0);
  const Index out_panels = bank.stage_panels(1);
  REQUIRE(hidden_panels >= 2);
  REQUIRE(out_panels >= 2);
  moet::RowMatrix<float> h(3, 130);
  moet::RowMatrix<float> y(3, 70);
  // Stage 0 in reverse order of three pieces, stage 1 one panel at a time.
  for (Index piece = 2; piece >= 0; --piece) {
    bank.forward_stage(0, 1, x, h, {piece * hidden_panels / 3, (piece + 1) * hidden_panels / 3},
                       scratch);
  }
  for (Index p = 0; p < out_panels; ++p) bank.forward_stage(1, 1, h, y, {p, p + 1}, scratch);
  CHECK(bit_identical(y, want));
  // Banks without current packed weights have no stages: forward alone runs them.
  moet::SwiGluExperts<float> eigen_bank(
      {.model_dim = 70, .hidden_dim = 130, .num_experts = 2, .pack_weights = false});
  CHECK(eigen_bank.stage_panels(0) == 0);
  CHECK(moet::SwiGluExperts<double>({.model_dim = 4, .hidden_dim = 4, .num_experts = 1})
            .stage_panels(1) == 0);
}

TEST_CASE("add_dense_expert adds weight * expert(x) to every token", "[dispatch][dense]") {
  const auto seed = GENERATE(1u, 2u);
  const auto num_tokens = GENERATE(Index{0}, Index{1}, Index{300});
  moet::SwiGluExperts<float> experts(
      {.model_dim = 10, .hidden_dim = 18, .num_experts = 3, .init_seed = seed});
  const auto x = random_rows<float>(num_tokens, 10, seed);
  const auto y0 = random_rows<float>(num_tokens, 10, seed + 1u);
  moet::RowMatrix<float> y = y0;
  moet::DenseWorkspace<moet::SwiGluExperts<float>> ws;
  moet::add_dense_expert(experts, 2, 0.75f, x, y, ws);
  // Oracle: the plan "every token -> expert 2 with weight 0.75" through the reference.
  std::vector<std::vector<std::pair<int, float>>> lists(static_cast<std::size_t>(num_tokens),
                                                        {{2, 0.75f}});
  const auto routed =
      run_dispatch(moet::ReferenceDispatch{}, experts, x, make_plan<float>(lists, 3));
  const moet::RowMatrix<float> want = y0 + routed;
  check_close(y, want, 1e-5);
}

TEST_CASE("Dispatchers reject inconsistent shapes and plans", "[dispatch][errors]") {
  moet::SwiGluExperts<float> experts({.model_dim = 8, .hidden_dim = 16, .num_experts = 4});
  const auto x = random_rows<float>(5, 8, 1u);
  const auto plan = make_plan<float>(plan_lists(5, 4, 1, PlanKind::kRandom), 4);
  moet::GroupedDispatch::Workspace<moet::SwiGluExperts<float>> gws;
  moet::ReferenceDispatch::Workspace<moet::SwiGluExperts<float>> rws;
  moet::GroupedDispatch grouped;
  moet::ReferenceDispatch reference;

  moet::RowMatrix<float> y_bad(5, 7);
  CHECK_THROWS_WITH(
      grouped.run(experts, x, plan, y_bad, gws),
      Contains("[moet::GroupedDispatch]") && Contains("(5, 8)") && Contains("(5, 7)"));
  CHECK_THROWS_WITH(reference.run(experts, x, plan, y_bad, rws),
                    Contains("[moet::ReferenceDispatch]") && Contains("(5, 7)"));

  const auto x_bad = random_rows<float>(5, 9, 1u);
  moet::RowMatrix<float> y9(5, 9);
  CHECK_THROWS_WITH(
      grouped.run(experts, x_bad, plan, y9, gws),
      Contains("[moet::GroupedDispatch]") && Contains("model_dim = 8") && Contains("(5, 9)"));

  const auto x6 = random_rows<float>(6, 8, 1u);
  moet::RowMatrix<float> y6(6, 8);
  CHECK_THROWS_WITH(grouped.run(experts, x6, plan, y6, gws), Contains("[moet::GroupedDispatch]") &&
                                                                 Contains("5 tokens") &&
                                                                 Contains("6 rows"));

  const auto plan3 = make_plan<float>({{{0, 1.0f}}, {}, {}, {}, {}}, 3);
  moet::RowMatrix<float> y(5, 8);
  CHECK_THROWS_WITH(grouped.run(experts, x, plan3, y, gws),
                    Contains("3 experts") && Contains("has 4"));

  const auto plan_bad_id = make_plan<float>({{{0, 1.0f}}, {}, {{4, 1.0f}}, {}, {}}, 4);
  CHECK_THROWS_WITH(
      grouped.run(experts, x, plan_bad_id, y, gws),
      Contains("[moet::GroupedDispatch]") && Contains("expert id 4") && Contains("[0, 4)"));
  CHECK_THROWS_WITH(reference.run(experts, x, plan_bad_id, y, rws),
                    Contains("[moet::ReferenceDispatch]") && Contains("expert id 4"));

  moet::RowMatrix<float> xy = random_rows<float>(5, 8, 2u);
  CHECK_THROWS_WITH(grouped.run(experts, xy, plan, xy, gws), Contains("overlap"));

  moet::DenseWorkspace<moet::SwiGluExperts<float>> dws;
  CHECK_THROWS_WITH(moet::add_dense_expert(experts, 4, 1.0f, x, y, dws),
                    Contains("[moet::add_dense_expert]") && Contains("expert id 4"));
  CHECK_THROWS_WITH(moet::add_dense_expert(experts, 0, 1.0f, x, y_bad, dws),
                    Contains("[moet::add_dense_expert]") && Contains("(5, 7)"));
  CHECK_THROWS_WITH(moet::GroupedDispatch({.block_rows = 0}), Contains("[moet::GroupedDispatch]") &&
                                                                  Contains("block_rows") &&
                                                                  Contains("got 0"));
}

}  // namespace test_dispatch
