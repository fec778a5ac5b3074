// The public gate toolkit (gates/router.hpp): SoftmaxRouter's checks, probabilities, logits and
// weights, RankedSelection's ranking, keep rule, drops and weights. The gates built on it have
// their own tests; example 03's gate is checked by finite differences in
// test_grad_softmax_gates.cpp and by the conformance check in test_gate_conformance.cpp.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/gates/router.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/kernel_isa.hpp"

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

// Checks every entry of z against a double-precision x W: |z - x W| within the bound
// 2 K eps sum_k |x_k| |w_k| that any order of float multiply-adds meets.
void check_logits_near(const RowMatrix<float>& x, const RowMatrix<float>& w,
                       const RowMatrix<float>& z) {
  REQUIRE(z.rows() == x.rows());
  REQUIRE(z.cols() == w.cols());
  const double eps = std::numeric_limits<float>::epsilon();
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index e = 0; e < w.cols(); ++e) {
      double ref = 0.0;
      double mag = 0.0;
      for (Index k = 0; k < x.cols(); ++k) {
        ref += static_cast<double>(x(t, k)) * static_cast<double>(w(k, e));
        mag += std::abs(static_cast<double>(x(t, k)) * static_cast<double>(w(k, e)));
      }
      INFO("token " << t << " expert " << e);
      CHECK(std::abs(static_cast<double>(z(t, e)) - ref) <=
            2.0 * static_cast<double>(x.cols()) * eps * mag);
    }
  }
}

// The logits the packed kernels give for `w` (gemm_packed on a fresh PackedMatrix, one call).
RowMatrix<float> packed_logits(const RowMatrix<float>& x, const RowMatrix<float>& w) {
  const moet::detail::PackedMatrix<float> packed(w);
  moet::detail::Buffer<float> scratch;
  RowMatrix<float> z(x.rows(), w.cols());
  moet::detail::gemm_packed(x, packed, z, /*accumulate=*/false, scratch);
  return z;
}

bool same_bits(float a, float b) {
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

}  // namespace

TEST_CASE(
    "SoftmaxRouter's logits run the selected kernels on W_r packed, repacked by "
    "parameters_changed",
    "[gate][router]") {
  // Odd sizes: a partial panel of experts and a tail of the model dimension.
  moet::SoftmaxRouter<float> router("MyGate", 37, 19, 5);
  const RowMatrix<float> x = tokens(150, 37);  // three row blocks, the last partial
  const RowMatrix<float> w = router.weights();
  RowMatrix<float> z(150, 19);
  router.logits(x, z);
  check_logits_near(x, w, z);
  const bool vector_level = moet::kernel_isa() != moet::KernelIsa::kPortable;
  if (vector_level) {
    // The packed kernels' bits: the same as one gemm_packed call over all rows, and every row
    // computed alone has the bits it has inside the batch.
    const RowMatrix<float> expect = packed_logits(x, w);
    RowMatrix<float> one(1, 19);
    for (Index t = 0; t < 150; ++t) {
      router.logits(x.middleRows(t, 1), one);
      for (Index e = 0; e < 19; ++e) {
        INFO("token " << t << " expert " << e);
        CHECK(same_bits(z(t, e), expect(t, e)));
        CHECK(same_bits(one(0, e), z(t, e)));
      }
    }
  }

  // Writing W_r through visit_parameters: correct logits at once (Eigen's product on the new
  // weights), the packed kernels' bits again after parameters_changed.
  router.visit_parameters([](std::string_view, moet::ParamMap<float> value, moet::ParamMap<float>) {
    for (Index i = 0; i < value.size(); ++i) value.data()[i] = 0.5f * value.data()[i] - 0.01f;
  });
  const RowMatrix<float> w2 = router.weights();
  CHECK(w2(0, 0) != w(0, 0));
  router.logits(x, z);
  check_logits_near(x, w2, z);
  router.parameters_changed();
  router.logits(x, z);
  check_logits_near(x, w2, z);
  if (vector_level) {
    const RowMatrix<float> expect = packed_logits(x, w2);
    for (Index t = 0; t < 150; ++t) {
      for (Index e = 0; e < 19; ++e) CHECK(same_bits(z(t, e), expect(t, e)));
    }
  }

  // Fewer than kPackedRouterMinExperts experts stay on Eigen's product; double never packs.
  const Index few = moet::detail::kPackedRouterMinExperts;
  CHECK(!moet::detail::RouterWeights<float>(RowMatrix<float>::Ones(37, few - 1)).packed_current());
  CHECK(moet::detail::RouterWeights<float>(RowMatrix<float>::Ones(37, few)).packed_current() ==
        vector_level);
  CHECK(!moet::detail::RouterWeights<double>(RowMatrix<double>::Ones(37, few)).packed_current());

  // The optimisers and load_parameters reach it through the gates' hook.
  STATIC_REQUIRE(moet::ParametersChangedHook<moet::TopKGate<float>>);
  STATIC_REQUIRE(moet::ParametersChangedHook<moet::SoftmaxRouter<float>>);
}

namespace {

// RouterWeights<float>::backward of `num_tokens` tokens on a (37, 19) router (a partial panel
// of experts; several column blocks of dW with a tail; token blocks of dx, the last partial)
// against double, at 1 and 2 threads, on the packed kernels' bits, accumulating, and stale.
void check_router_backward(Index num_tokens) {
  constexpr Index dim = 37;
  constexpr Index experts = 19;
  RowMatrix<float> w(dim, experts);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<float>((i * 29) % 13) / 7 - 0.9f;
  const RowMatrix<float> x = tokens(num_tokens, dim);
  RowMatrix<float> dz(num_tokens, experts);
  for (Index i = 0; i < dz.size(); ++i) {
    dz.data()[i] = static_cast<float>((i * 17) % 23) / 11 - 1.05f;
  }
  RowMatrix<float> dx0(num_tokens, dim);  // what dx holds before: the backward adds to it
  for (Index i = 0; i < dx0.size(); ++i) dx0.data()[i] = static_cast<float>(i % 5) / 4 - 0.5f;
  const bool vector_level = moet::kernel_isa() != moet::KernelIsa::kPortable;

  // One backward on a fresh RouterWeights at `threads`, after `before(weights)`: dW (from 0,
  // then from one earlier call when `twice`) and dx (from dx0).
  const auto run = [&](int threads, bool twice, auto&& before, RowMatrix<float>& dw,
                       RowMatrix<float>& dx) {
    const int saved = moet::num_threads();
    moet::set_num_threads(threads);
    moet::detail::RouterWeights<float> weights(w);
    before(weights);
    dx = dx0;
    weights.backward(x, dz, dx);
    if (twice) {
      RowMatrix<float> unused = dx0;
      weights.backward(x, dz, unused);
    }
    dw = weights.grad();
    moet::set_num_threads(saved);
  };
  const auto nothing = [](moet::detail::RouterWeights<float>&) {};
  RowMatrix<float> dw1, dx1, dw2, dx2;
  run(1, false, nothing, dw1, dx1);
  run(2, false, nothing, dw2, dx2);

  // Against double: every entry within 2 K eps sum |terms| (K the length of its chain).
  const double eps = std::numeric_limits<float>::epsilon();
  for (Index i = 0; i < dim; ++i) {
    for (Index e = 0; e < experts; ++e) {
      double ref = 0.0;
      double mag = 0.0;
      for (Index t = 0; t < num_tokens; ++t) {
        ref += static_cast<double>(x(t, i)) * static_cast<double>(dz(t, e));
        mag += std::abs(static_cast<double>(x(t, i)) * static_cast<double>(dz(t, e)));
      }
      INFO("dW row " << i << " expert " << e);
      CHECK(std::abs(static_cast<double>(dw1(i, e)) - ref) <=
            2.0 * static_cast<double>(num_tokens) * eps * mag);
    }
  }
  for (Index t = 0; t < num_tokens; ++t) {
    for (Index i = 0; i < dim; ++i) {
      double ref = dx0(t, i);
      double mag = std::abs(ref);
      for (Index e = 0; e < experts; ++e) {
        ref += static_cast<double>(dz(t, e)) * static_cast<double>(w(i, e));
        mag += std::abs(static_cast<double>(dz(t, e)) * static_cast<double>(w(i, e)));
      }
      INFO("dx token " << t << " column " << i);
      CHECK(std::abs(static_cast<double>(dx1(t, i)) - ref) <= 2.0 * (experts + 1) * eps * mag);
    }
  }
  CHECK(dw1 == dw2);
  CHECK(dx1 == dx2);

  if (vector_level) {
    // The packed kernels' bits. dW from zero: from `experts` tokens up the product dz^T x on
    // x packed, transposed; below, x^T dz on dz packed (both one gemm_packed_at over all of
    // it). dx: one gemm_packed over all tokens on W^T packed.
    moet::detail::Buffer<float> scratch;
    RowMatrix<float> expect_dw = RowMatrix<float>::Zero(dim, experts);
    if (num_tokens >= experts) {
      const moet::detail::PackedMatrix<float> packed_x(x);
      RowMatrix<float> dw_t(experts, dim);
      moet::detail::gemm_packed_at(dz, packed_x, dw_t, /*accumulate=*/false, scratch);
      expect_dw = dw_t.transpose();
    } else {
      const moet::detail::PackedMatrix<float> packed_dz(dz);
      moet::detail::gemm_packed_at(x, packed_dz, expect_dw, /*accumulate=*/true, scratch);
    }
    moet::detail::PackedMatrix<float> packed_wt;
    packed_wt.pack_transposed(w);
    RowMatrix<float> expect_dx = dx0;
    moet::detail::gemm_packed(dz, packed_wt, expect_dx, /*accumulate=*/true, scratch);
    for (Index i = 0; i < dw1.size(); ++i) CHECK(same_bits(dw1.data()[i], expect_dw.data()[i]));
    for (Index i = 0; i < dx1.size(); ++i) CHECK(same_bits(dx1.data()[i], expect_dx.data()[i]));
  }

  // A second call adds to dW (twice the sum within rounding) and to a fresh dx the same bits.
  RowMatrix<float> dw_twice, dx_twice;
  run(2, true, nothing, dw_twice, dx_twice);
  CHECK(dx_twice == dx1);
  CHECK((dw_twice - 2.0f * dw1).norm() <= 1e-5f * dw1.norm());

  // Handed out for writing (stale), the backward takes Eigen's products on the weights
  // themselves: the same values within rounding; repacked, the kernels' bits again.
  RowMatrix<float> dw_stale, dx_stale, dw_repacked, dx_repacked;
  const auto stale = [](moet::detail::RouterWeights<float>& weights) {
    weights.visit("w", [](std::string_view, moet::ParamMap<float>, moet::ParamMap<float>) {});
    CHECK(!weights.packed_current());
  };
  run(2, false, stale, dw_stale, dx_stale);
  CHECK((dw_stale - dw1).norm() <= 1e-5f * dw1.norm());
  CHECK((dx_stale - dx1).norm() <= 1e-5f * dx1.norm());
  run(
      2, false,
      [&](moet::detail::RouterWeights<float>& weights) {
        stale(weights);
        weights.repack();
      },
      dw_repacked, dx_repacked);
  CHECK(dw_repacked == dw1);
  CHECK(dx_repacked == dx1);
}

}  // namespace

TEST_CASE(
    "RouterWeights' backward runs the selected kernels: dW += x^T dz and dx += dz W^T against "
    "double, the same bits at 1 and 2 threads",
    "[train][grad][gate][router]") {
  SECTION("150 tokens: dW as (dz^T x)^T on x packed") { check_router_backward(150); }
  SECTION("19 tokens, as many as experts") { check_router_backward(19); }
  SECTION("7 tokens: dW as x^T dz on dz packed") { check_router_backward(7); }
}

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
