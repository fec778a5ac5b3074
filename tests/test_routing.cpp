// Routing plan and its expert-major view.
#include <catch2/catch.hpp>

#include "moet/routing.hpp"
#include "moet/stats.hpp"

namespace test_routing {  // one per file: the unity build puts several files in one TU

namespace {

// Builds a plan from a list of per-token (expert, weight) lists.
moet::Routing<float> make_plan(const std::vector<std::vector<std::pair<int, float>>>& lists,
                               moet::Index num_experts) {
  moet::Routing<float> r;
  r.reset(static_cast<moet::Index>(lists.size()), num_experts);
  for (std::size_t t = 0; t < lists.size(); ++t) {
    r.counts()[t] = static_cast<moet::Index>(lists[t].size());
  }
  r.commit_counts();
  for (std::size_t t = 0; t < lists.size(); ++t) {
    for (std::size_t j = 0; j < lists[t].size(); ++j) {
      r.experts(static_cast<moet::Index>(t))[j] = lists[t][j].first;
      r.weights(static_cast<moet::Index>(t))[j] = lists[t][j].second;
    }
  }
  return r;
}

}  // namespace

TEST_CASE("Routing holds a variable number of experts per token", "[routing]") {
  const auto r = make_plan({{{2, 0.5f}, {0, 0.5f}}, {}, {{1, 1.0f}}}, 3);
  CHECK(r.num_tokens() == 3);
  CHECK(r.num_assignments() == 3);
  CHECK(r.k(0) == 2);
  CHECK(r.k(1) == 0);
  CHECK(r.k(2) == 1);
  CHECK(r.experts(0)[0] == 2);
  CHECK(r.experts(2)[0] == 1);
  CHECK(r.weights(2)[0] == 1.0f);
  CHECK(r.mean_k() == Approx(1.0));
}

TEST_CASE("ExpertMajor groups assignments per expert in token order", "[routing]") {
  const auto r = make_plan({{{2, 0.5f}, {0, 0.5f}}, {}, {{2, 1.0f}}, {{0, 0.3f}, {2, 0.7f}}}, 4);
  moet::ExpertMajor view;
  view.build(r);
  CHECK(view.load(0) == 2);
  CHECK(view.load(1) == 0);
  CHECK(view.load(2) == 3);
  CHECK(view.load(3) == 0);
  // Expert 2's tokens in token order: 0, 2, 3.
  const auto begin = static_cast<std::size_t>(view.offsets()[2]);
  CHECK(view.tokens()[begin] == 0);
  CHECK(view.tokens()[begin + 1] == 2);
  CHECK(view.tokens()[begin + 2] == 3);
  // position is the inverse of assignments.
  for (std::size_t j = 0; j < static_cast<std::size_t>(r.num_assignments()); ++j) {
    CHECK(view.position()[static_cast<std::size_t>(view.assignments()[j])] ==
          static_cast<moet::Index>(j));
  }
}

TEST_CASE("compute_stats counts load, k histogram and balance", "[routing][stats]") {
  const auto r = make_plan({{{0, 1.0f}}, {{0, 1.0f}}, {{1, 1.0f}}, {}}, 2);
  const auto s = moet::compute_stats(r);
  CHECK(s.load == std::vector<moet::Index>{2, 1});
  CHECK(s.k_histogram == std::vector<moet::Index>{1, 3, 0});
  CHECK(s.mean_k == Approx(0.75));
  CHECK(s.max_load == Approx(2.0));
  CHECK(s.mean_load == Approx(1.5));
  CHECK(s.max_mean_load_ratio == Approx(2.0 / 1.5));
  CHECK(s.load_cv == Approx(0.5 / 1.5));
}

}  // namespace test_routing
