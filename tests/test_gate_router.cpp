// The public gate toolkit (gates/router.hpp): SoftmaxRouter's checks, probabilities, logits and
// weights, RankedSelection's ranking, keep rule, drops and weights. The gates built on it have
// their own tests; example 03's gate is checked by finite differences in
// test_grad_softmax_gates.cpp and by the conformance check in test_gate_conformance.cpp.
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/gates/router.hpp"

namespace test_gate_router {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;

RowMatrix<float> tokens(Index rows, Index cols) {
  RowMatrix<float> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>((i * 37) % 11) / 5 - 1;
  return x;
}

}  // namespace

TEST_CASE("SoftmaxRouter writes P = softmax(x W_r) with the bits of its logits", "[gate][router]") {
  const moet::SoftmaxRouter<float> router("MyGate", 6, 4, 9);
  CHECK(router.model_dim() == 6);
  CHECK(router.num_experts() == 4);
  const RowMatrix<float> x = tokens(70, 6);
  moet::Routing<float> plan;
  const auto probs = router.probabilities(x, plan);
  REQUIRE(plan.num_tokens() == 70);
  CHECK(plan.probs_are_distribution);
  RowMatrix<float> z(70, 4);
  router.logits(x, z);
  for (Index t = 0; t < 70; ++t) {  // max-subtracted, summed in order, times 1 / sum
    std::vector<float> p(4);
    float sum = 0.0f;
    for (Index e = 0; e < 4; ++e) {
      p[static_cast<std::size_t>(e)] = std::exp(z(t, e) - z.row(t).maxCoeff());
      sum += p[static_cast<std::size_t>(e)];
    }
    for (Index e = 0; e < 4; ++e) CHECK(probs(t, e) == p[static_cast<std::size_t>(e)] * (1 / sum));
  }
}

TEST_CASE("SoftmaxRouter checks its shape, x, z, weights and backward, naming the gate",
          "[gate][router]") {
  CHECK_THROWS_WITH(moet::SoftmaxRouter<float>("MyGate", 0, 4),
                    Contains("[moet::MyGate] model_dim must be >= 1"));
  CHECK_THROWS_WITH(moet::SoftmaxRouter<float>("MyGate", 3, 0),
                    Contains("[moet::MyGate] num_experts must be >= 1"));
  moet::SoftmaxRouter<float> router("MyGate", 3, 4);
  moet::Routing<float> plan;
  CHECK_THROWS_WITH(router.probabilities(tokens(5, 2), plan),
                    Contains("[moet::MyGate] x must have model_dim = 3 columns"));
  RowMatrix<float> x = tokens(5, 3);
  x(2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(router.probabilities(x, plan), Contains("at token 2, column 1"));
  RowMatrix<float> z(5, 3);
  CHECK_THROWS_WITH(router.logits(tokens(5, 3), z), Contains("z must be (5, 4)"));
  CHECK_THROWS_WITH(router.set_weights(RowMatrix<float>::Zero(4, 3), moet::WeightLayout::kInOut),
                    Contains("looks transposed"));
  router.set_weights(RowMatrix<float>::Ones(4, 3), moet::WeightLayout::kOutIn);
  CHECK(router.weights() == RowMatrix<float>::Ones(3, 4));

  router.probabilities(tokens(5, 3), plan);
  RowMatrix<float> dx = RowMatrix<float>::Zero(5, 3);
  const std::vector<float> too_few(1, 0.0f);
  CHECK_THROWS_WITH(router.backward(tokens(5, 3), plan, too_few, false, {}, dx),
                    Contains("[moet::MyGate::backward] d_weights must have one entry per"));
  CHECK_THROWS_WITH(router.backward_logits(tokens(5, 3), RowMatrix<float>::Zero(5, 3), dx),
                    Contains("[moet::MyGate::backward] x, dz and dx must be"));
}

TEST_CASE("RankedSelection keeps a prefix of each ranking, ties to the lower id",
          "[gate][router][select]") {
  // 3 tokens, 5 experts; token 1 has ties.
  RowMatrix<float> scores(3, 5);
  scores << 0.1f, 0.4f, 0.2f, 0.25f, 0.05f,  //
      0.3f, 0.1f, 0.3f, 0.0f, 0.3f,          //
      0.0f, 0.0f, 0.0f, 0.0f, 1.0f;
  moet::Routing<float> plan;
  plan.reset(3, 5);
  moet::RankedSelection<float> select(plan);
  const std::vector<Index> keep = {2, 3, 1};
  select.rank(
      scores, [](Index t) { return t == 2 ? Index{5} : Index{3}; },
      [&](Index t, std::span<const std::int32_t> ranked) {
        CHECK(static_cast<Index>(ranked.size()) == (t == 2 ? 5 : 3));
        return keep[static_cast<std::size_t>(t)];
      });
  CHECK(select.ranking(1)[0] == 0);  // ties: 0, 2, 4
  CHECK(select.ranking(1)[1] == 2);
  CHECK(select.ranking(1)[2] == 4);
  select.write(scores, /*renormalize=*/false);
  REQUIRE(plan.num_assignments() == 6);
  CHECK(std::vector<std::int32_t>(plan.experts().begin(), plan.experts().end()) ==
        std::vector<std::int32_t>{1, 3, 0, 2, 4, 4});
  CHECK(plan.weights(0)[1] == 0.25f);
  CHECK(plan.weights(2)[0] == 1.0f);
}

TEST_CASE("RankedSelection writes around dropped entries and renormalises the survivors",
          "[gate][router][select]") {
  RowMatrix<float> scores(2, 4);
  scores << 0.1f, 0.5f, 0.3f, 0.1f,  //
      0.0f, 0.0f, 0.0f, 0.0f;
  moet::Routing<float> plan;
  plan.reset(2, 4);
  moet::RankedSelection<float> select(plan, /*extra_ids=*/4);
  select.rank(scores, 2, [](Index, std::span<const std::int32_t>) { return 2; });
  select.ranking(0)[0] = -1;  // drop token 0's best expert (1)
  --select.counts()[0];
  select.write(scores, /*renormalize=*/true);
  REQUIRE(plan.k(0) == 1);
  CHECK(plan.experts(0)[0] == 2);
  CHECK(plan.weights(0)[0] == 1.0f);  // renormalised alone
  REQUIRE(plan.k(1) == 2);            // all-zero weights stay 0 (their sum is not positive)
  CHECK(plan.experts(1)[0] == 0);
  CHECK(plan.experts(1)[1] == 1);
  CHECK(plan.weights(1)[0] == 0.0f);
}

}  // namespace test_gate_router
