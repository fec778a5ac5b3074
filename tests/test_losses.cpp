// Auxiliary losses (train/losses.hpp): each value against a naive double formula written here,
// each gradient against central finite differences in double, plus the noisy top-k losses
// chained through TopKGate's backward, thread-count independence and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/train/losses.hpp"

namespace test_losses {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::RowMatrix;
using M = RowMatrix<double>;

M random_matrix(Index rows, Index cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  M m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = dist(gen);
  }
  return m;
}

// Central differences of f over every entry of m (restored afterwards).
M central_diff(Eigen::Ref<M> m, const std::function<double()>& f, double h = 1e-6) {
  M g(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) {
      const double saved = m(i, j);
      m(i, j) = saved + h;
      const double up = f();
      m(i, j) = saved - h;
      const double down = f();
      m(i, j) = saved;
      g(i, j) = (up - down) / (2.0 * h);
    }
  }
  return g;
}

double rel_error(const M& a, const M& ref) {
  return (a - ref).norm() / std::max(ref.norm(), 1e-300);
}

// Population CV^2 with the 1e-10 guard, naive.
double naive_cv2(const std::vector<double>& v) {
  double mean = 0.0;
  for (const double x : v) mean += x / static_cast<double>(v.size());
  double var = 0.0;
  for (const double x : v) var += (x - mean) * (x - mean) / static_cast<double>(v.size());
  return var / (mean * mean + 1e-10);
}

constexpr Index kTokens = 20;
constexpr Index kExperts = 5;
constexpr Index kDim = 4;

}  // namespace

TEST_CASE("load_balance_loss matches the Switch formula and its gradient",
          "[train][loss][load_balance]") {
  const M x = random_matrix(kTokens, kDim, 1, 1.5);
  auto o = moet::TopKGate<double>::gshard_options(kDim, kExperts);
  o.capacity_factor = 1.0;
  o.min_capacity = 0;
  moet::TopKGate<double> gate(o);
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  REQUIRE(plan.dropped > 0);  // kTop1 counts before dropping, kFirstSlot after
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(kTokens), 1);
  valid[2] = valid[7] = 0;

  const auto count = GENERATE(moet::LoadBalanceCount::kTop1, moet::LoadBalanceCount::kFirstSlot,
                              moet::LoadBalanceCount::kAllAssignments);
  const bool masked = GENERATE(false, true);
  moet::LoadBalanceOptions opts{.alpha = 0.03, .count = count};
  if (masked) opts.valid = valid;

  // Naive: f from the unperturbed plan (detached), P the free variable.
  const M probs0 = plan.probs();
  std::vector<double> f(kExperts, 0.0);
  double n = 0.0;
  for (Index t = 0; t < kTokens; ++t) {
    if (masked && valid[static_cast<std::size_t>(t)] == 0) continue;
    n += 1.0;
    if (count == moet::LoadBalanceCount::kTop1) {
      Index best = 0;
      for (Index e = 0; e < kExperts; ++e) best = probs0(t, e) > probs0(t, best) ? e : best;
      f[static_cast<std::size_t>(best)] += 1.0;
    } else {
      const auto ex = plan.experts(t);
      for (std::size_t j = 0; j < ex.size(); ++j) {
        if (count == moet::LoadBalanceCount::kFirstSlot && j > 0) break;
        f[static_cast<std::size_t>(ex[j])] += 1.0;
      }
    }
  }
  const auto naive = [&](const M& p) {
    double loss = 0.0;
    for (Index e = 0; e < kExperts; ++e) {
      double mean = 0.0;
      for (Index t = 0; t < kTokens; ++t) {
        if (!masked || valid[static_cast<std::size_t>(t)] != 0) mean += p(t, e) / n;
      }
      loss += f[static_cast<std::size_t>(e)] / n * mean;
    }
    return 0.03 * kExperts * loss;
  };
  M d_probs = M::Constant(kTokens, kExperts, 0.5);  // the gradient is added
  const double value = moet::load_balance_loss<double>(plan, d_probs, opts);
  CHECK(value == Approx(naive(probs0)).epsilon(1e-12));
  auto pm = plan.probs_mut();
  M probs = pm;
  const M fd = central_diff(probs, [&] { return naive(probs); });
  CHECK(rel_error(d_probs.array() - 0.5, fd) <= 1e-6);
  if (masked) CHECK(d_probs.row(2).isConstant(0.5));
  // And the library's own value moves as the naive one does (f held fixed at the test point).
  pm(0, 0) += 1e-3;
  M scratch = M::Zero(kTokens, kExperts);
  CHECK(moet::load_balance_loss<double>(plan, scratch, opts) == Approx(naive(pm)).epsilon(1e-12));
}

TEST_CASE("load_balance_loss is alpha for a uniform router with balanced top-1",
          "[train][loss][load_balance]") {
  moet::Routing<float> plan;
  plan.reset(4, 4);
  for (auto& c : plan.counts()) c = 1;
  plan.commit_counts();
  auto probs = plan.probs_mut();
  for (Index t = 0; t < 4; ++t) {
    for (Index e = 0; e < 4; ++e) probs(t, e) = e == t ? 0.25f + 1e-6f : 0.25f - 1e-6f / 3;
    plan.experts(t)[0] = static_cast<std::int32_t>(t);
  }
  RowMatrix<float> d(4, 4);
  d.setZero();
  const double v =
      moet::load_balance_loss<float>(plan, d, moet::LoadBalanceOptions::switch_options());
  CHECK(v == Approx(1e-2).epsilon(1e-5));
  CHECK(moet::LoadBalanceOptions::mixtral_options().alpha == 0.02);
}

TEST_CASE("router_z_loss matches c_z mean(logsumexp)^2 and its gradient", "[train][loss][z]") {
  M z = random_matrix(kTokens, kExperts, 2, 2.0);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(kTokens), 1);
  valid[0] = 0;
  const bool masked = GENERATE(false, true);
  moet::RouterZLossOptions opts{.c_z = 2e-3};
  if (masked) opts.valid = valid;
  const auto naive = [&] {
    double sum = 0.0, n = 0.0;
    for (Index t = 0; t < kTokens; ++t) {
      if (masked && valid[static_cast<std::size_t>(t)] == 0) continue;
      double s = 0.0;
      for (Index e = 0; e < kExperts; ++e) s += std::exp(z(t, e));
      sum += std::log(s) * std::log(s);
      n += 1.0;
    }
    return 2e-3 * sum / n;
  };
  M dz = M::Zero(kTokens, kExperts);
  CHECK(moet::router_z_loss<double>(z, dz, opts) == Approx(naive()).epsilon(1e-12));
  CHECK(rel_error(dz, central_diff(z, naive)) <= 1e-6);
  CHECK(moet::RouterZLossOptions{}.c_z == 1e-3);
}

TEST_CASE("router_entropy_loss matches the mean token entropy, guarded at P = 0",
          "[train][loss][entropy]") {
  M logits = random_matrix(kTokens, kExperts, 3);
  M p(kTokens, kExperts);
  for (Index t = 0; t < kTokens; ++t) {
    const double s = logits.row(t).array().exp().sum();
    for (Index e = 0; e < kExperts; ++e) p(t, e) = std::exp(logits(t, e)) / s;
  }
  const auto naive = [&] {
    double sum = 0.0;
    for (Index t = 0; t < kTokens; ++t) {
      for (Index e = 0; e < kExperts; ++e) sum -= p(t, e) * std::log(p(t, e));
    }
    return 1e-4 * sum / kTokens;
  };
  M dp = M::Zero(kTokens, kExperts);
  CHECK(moet::router_entropy_loss<double>(p, dp) == Approx(naive()).epsilon(1e-12));
  CHECK(rel_error(dp, central_diff(p, naive, 1e-8)) <= 1e-5);

  SECTION("a zero probability contributes 0 and a finite gradient") {
    M q = M::Zero(1, 3);
    q(0, 0) = 0.5;
    q(0, 1) = 0.5;
    M dq = M::Zero(1, 3);
    const double v = moet::router_entropy_loss<double>(q, dq, {.beta = 1.0});
    CHECK(v == Approx(std::log(2.0)).epsilon(1e-12));
    CHECK(dq.allFinite());
    CHECK(dq(0, 0) == Approx(-(std::log(0.5) + 1.0)));
  }
}

TEST_CASE("importance_loss matches w CV(sum_t G)^2 and its gradient on the weights",
          "[train][loss][noisy]") {
  const M x = random_matrix(kTokens, kDim, 4);
  moet::TopKGate<double> gate(moet::TopKGate<double>::gshard_options(kDim, kExperts));
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  M w(1, plan.num_assignments());
  for (Index a = 0; a < w.cols(); ++a) w(0, a) = plan.weights()[static_cast<std::size_t>(a)];
  const auto naive = [&] {
    std::vector<double> imp(kExperts, 0.0);
    for (Index a = 0; a < w.cols(); ++a) {
      imp[static_cast<std::size_t>(plan.experts()[static_cast<std::size_t>(a)])] += w(0, a);
    }
    return 0.1 * naive_cv2(imp);
  };
  std::vector<double> dw(static_cast<std::size_t>(plan.num_assignments()), 0.0);
  CHECK(moet::importance_loss<double>(plan, dw) == Approx(naive()).epsilon(1e-12));
  const M fd = central_diff(w, naive);
  const M got = Eigen::Map<const M>(dw.data(), 1, w.cols());
  CHECK(rel_error(got, fd) <= 1e-6);
}

namespace {

// Naive load loss: kth_excl by removing e and sorting the rest, Phi via erfc.
double naive_load(const M& z, const M& n, const M& eps, Index k, double w_load) {
  const Index num_tokens = z.rows();
  const Index num_experts = z.cols();
  std::vector<double> load(static_cast<std::size_t>(num_experts), 0.0);
  for (Index t = 0; t < num_tokens; ++t) {
    std::vector<double> h(static_cast<std::size_t>(num_experts));
    for (Index e = 0; e < num_experts; ++e) {
      h[static_cast<std::size_t>(e)] = z(t, e) + eps(t, e) * std::log1p(std::exp(n(t, e)));
    }
    for (Index e = 0; e < num_experts; ++e) {
      std::vector<double> others;
      for (Index j = 0; j < num_experts; ++j) {
        if (j != e) others.push_back(h[static_cast<std::size_t>(j)]);
      }
      std::sort(others.begin(), others.end(), std::greater<>());
      if (static_cast<Index>(others.size()) < k) {
        load[static_cast<std::size_t>(e)] += 1.0;
        continue;
      }
      const double thr = others[static_cast<std::size_t>(k - 1)];
      const double sd = std::log1p(std::exp(n(t, e)));
      load[static_cast<std::size_t>(e)] += 0.5 * std::erfc(-(z(t, e) - thr) / sd / std::sqrt(2.0));
    }
  }
  return w_load * naive_cv2(load);
}

}  // namespace

TEST_CASE("noisy_load_loss matches the Phi formula with kth_excl and its gradient",
          "[train][loss][noisy]") {
  M z = random_matrix(kTokens, kExperts, 5);
  M n = random_matrix(kTokens, kExperts, 6, 0.7);
  const M eps = random_matrix(kTokens, kExperts, 7);
  const Index k = GENERATE(1, 2, 5);
  const auto naive = [&] { return naive_load(z, n, eps, k, 0.1); };
  M dz = M::Zero(kTokens, kExperts);
  M dn = M::Zero(kTokens, kExperts);
  const double v = moet::noisy_load_loss<double>(z, n, eps, dz, dn, {.k = k});
  CHECK(v == Approx(naive()).epsilon(1e-10));
  if (k == kExperts) {
    CHECK(v == 0.0);  // every expert always in: equal loads
    CHECK(dz.norm() == 0.0);
  } else {
    CHECK(rel_error(dz, central_diff(z, naive)) <= 1e-5);
    CHECK(rel_error(dn, central_diff(n, naive)) <= 1e-5);
  }
}

TEST_CASE("Noisy top-k losses chain through TopKGate backward to W_r and W_noise",
          "[train][loss][noisy][grad]") {
  const M x = random_matrix(kTokens, kDim, 8);
  moet::RouteContext ctx;
  ctx.training = true;
  ctx.seed = 77;
  ctx.step = 1;
  moet::TopKGate<double> gate(moet::TopKGate<double>::noisy_top_k_options(kDim, kExperts, 2));
  gate.set_noise_router(random_matrix(kDim, kExperts, 9, 0.5), moet::WeightLayout::kInOut);

  // L = importance(G) + load(z, n, eps) + z_loss(z), every coefficient 1 to make it visible.
  const auto total = [&](M* dz, M* dn, std::vector<double>* dw) {
    moet::Routing<double> plan;
    gate.route(x, ctx, plan);
    M z(kTokens, kExperts), n(kTokens, kExperts), eps(kTokens, kExperts);
    gate.logits(x, z);
    gate.noise_logits(x, ctx, n, eps);
    M dz_local = M::Zero(kTokens, kExperts), dn_local = M::Zero(kTokens, kExperts);
    std::vector<double> dw_local(static_cast<std::size_t>(plan.num_assignments()), 0.0);
    double loss = moet::importance_loss<double>(plan, dw_local, {.w_importance = 1.0});
    loss += moet::noisy_load_loss<double>(z, n, eps, dz_local, dn_local, {.k = 2, .w_load = 1.0});
    loss += moet::router_z_loss<double>(z, dz_local, {.c_z = 1.0});
    if (dz != nullptr) *dz = dz_local;
    if (dn != nullptr) *dn = dn_local;
    if (dw != nullptr) *dw = dw_local;
    return loss;
  };
  M dz, dn;
  std::vector<double> dw;
  total(&dz, &dn, &dw);
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  gate.zero_grad();
  M dx = M::Zero(kTokens, kDim);
  gate.backward(
      x, ctx, plan, std::span<const double>(dw),
      {.d_logits = std::span<const double>(dz.data(), static_cast<std::size_t>(dz.size()))}, dx);
  gate.backward_noise_logits(x, dn, dx);
  const auto f = [&] { return total(nullptr, nullptr, nullptr); };
  // The weights in place, writable, as the optimisers see them (visit_parameters).
  double* w_r = nullptr;
  double* w_noise = nullptr;
  gate.visit_parameters(
      [&](std::string_view name, moet::ParamMap<double> value, moet::ParamMap<double>) {
        if (name == "router.weight") w_r = value.data();
        if (name == "router.noise_weight") w_noise = value.data();
      });
  REQUIRE(w_r != nullptr);
  REQUIRE(w_noise != nullptr);
  const M fd_w = central_diff(moet::ParamMap<double>(w_r, kDim, kExperts), f);
  const M fd_n = central_diff(moet::ParamMap<double>(w_noise, kDim, kExperts), f);
  INFO("dW_r " << rel_error(gate.router_grad(), fd_w) << ", dW_noise "
               << rel_error(gate.noise_router_grad(), fd_n));
  CHECK(rel_error(gate.router_grad(), fd_w) <= 1e-4);
  CHECK(rel_error(gate.noise_router_grad(), fd_n) <= 1e-4);
  CHECK(fd_n.norm() > 1e-3);

  // The same losses as SoftmaxLossGrad inputs (the way MoELayer::backward takes them): a zero
  // task gradient plus loss_grad.d_weights and loss_grad.d_noise_logits give the same result.
  const M grad_w = gate.router_grad(), grad_n = gate.noise_router_grad();
  gate.zero_grad();
  M dx2 = M::Zero(kTokens, kDim);
  const std::vector<double> zero(dw.size(), 0.0);
  gate.backward(x, ctx, plan, std::span<const double>(zero),
                {.d_logits = std::span<const double>(dz.data(), static_cast<std::size_t>(dz.size())),
                 .d_weights = std::span<const double>(dw),
                 .d_noise_logits =
                     std::span<const double>(dn.data(), static_cast<std::size_t>(dn.size()))},
                dx2);
  CHECK(rel_error(gate.router_grad(), grad_w) <= 1e-12);
  CHECK(rel_error(gate.noise_router_grad(), grad_n) <= 1e-12);
  CHECK(rel_error(dx2, dx) <= 1e-12);
  // Sizes are checked, and only a noisy gate takes d_noise_logits.
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, std::span<const double>(zero),
                                  {.d_weights = std::span<const double>(dw).first(1)}, dx2),
                    Catch::Matchers::Contains("loss_grad.d_weights must be empty or have one "
                                              "entry per assignment"));
  moet::TopKGate<double> plain(moet::TopKGate<double>::gshard_options(kDim, kExperts));
  moet::Routing<double> plain_plan;
  plain.route(x, {}, plain_plan);
  const std::vector<double> plain_dw(static_cast<std::size_t>(plain_plan.num_assignments()), 0.0);
  CHECK_THROWS_WITH(
      plain.backward(x, {}, plain_plan, std::span<const double>(plain_dw),
                     {.d_noise_logits =
                          std::span<const double>(dn.data(), static_cast<std::size_t>(dn.size()))},
                     dx2),
      Catch::Matchers::Contains("loss_grad.d_noise_logits needs a noisy gate"));
}

namespace {

double naive_consistency(const M& a, const M& b, double alpha) {
  double sum = 0.0;
  for (Index t = 0; t < a.rows(); ++t) {
    const double sa = a.row(t).array().exp().sum();
    const double sb = b.row(t).array().exp().sum();
    for (Index v = 0; v < a.cols(); ++v) {
      const double p = std::exp(a(t, v)) / sa;
      const double q = std::exp(b(t, v)) / sb;
      sum += 0.5 * (p - q) * (std::log(p) - std::log(q));
    }
  }
  return alpha * sum;
}

}  // namespace

TEST_CASE("consistency_loss is the symmetric KL of two softmaxes, with its gradients",
          "[train][loss][thor]") {
  M a = random_matrix(kTokens, 7, 10, 1.5);
  M b = random_matrix(kTokens, 7, 11, 1.5);
  M d0 = M::Zero(kTokens, 7), d1 = M::Zero(kTokens, 7);
  const double v = moet::consistency_loss<double>(a, b, d0, d1, {.alpha = 2.5});
  const auto naive = [&] { return naive_consistency(a, b, 2.5); };
  CHECK(v == Approx(naive()).epsilon(1e-12));
  CHECK(v > 0.0);
  CHECK(rel_error(d0, central_diff(a, naive)) <= 1e-6);
  CHECK(rel_error(d1, central_diff(b, naive)) <= 1e-6);
  // Identical distributions: 0, no gradient.
  M z0 = M::Zero(kTokens, 7), z1 = M::Zero(kTokens, 7);
  CHECK(moet::consistency_loss<double>(a, a, z0, z1) == 0.0);
  CHECK(z0.norm() == 0.0);

  SECTION("a masked row contributes nothing") {
    std::vector<std::uint8_t> valid(static_cast<std::size_t>(kTokens), 1);
    valid[4] = 0;
    M e0 = M::Zero(kTokens, 7), e1 = M::Zero(kTokens, 7);
    const double masked = moet::consistency_loss<double>(a, b, e0, e1, {.valid = valid});
    M a1 = a, b1 = b;
    a1.row(4).setZero();
    b1.row(4).setZero();
    CHECK(masked == Approx(naive_consistency(a1, b1, 1.0)).epsilon(1e-12));
    CHECK(e0.row(4).norm() == 0.0);
  }
  SECTION("log 0 is guarded: underflowing probabilities give a finite loss and gradient") {
    M u(1, 3), w(1, 3);
    u << 0.0, -2000.0, 1.0;  // p_1 = 0 in double
    w << 0.0, -3000.0, -1.0;
    M g0 = M::Zero(1, 3), g1 = M::Zero(1, 3);
    const double value = moet::consistency_loss<double>(u, w, g0, g1);
    CHECK(std::isfinite(value));
    CHECK(g0.allFinite());
    CHECK(g1.allFinite());
    // The underflowed entry is out of the sum: the loss equals the two-entry one.
    M u2(1, 2), w2(1, 2);
    u2 << 0.0, 1.0;
    w2 << 0.0, -1.0;
    CHECK(value == Approx(naive_consistency(u2, w2, 1.0)).epsilon(1e-12));
  }
}

TEST_CASE("consistency_loss gives the same bits at 1 and 2 threads", "[train][loss][parallel]") {
  std::mt19937 gen(12);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  RowMatrix<float> a(150, 33), b(150, 33);
  for (Index i = 0; i < a.size(); ++i) {
    a.data()[i] = dist(gen);
    b.data()[i] = dist(gen);
  }
  const int saved = moet::num_threads();
  RowMatrix<float> d0a = RowMatrix<float>::Zero(150, 33), d1a = d0a, d0b = d0a, d1b = d0a;
  moet::set_num_threads(1);
  const double one = moet::consistency_loss<float>(a, b, d0a, d1a);
  moet::set_num_threads(2);
  const double two = moet::consistency_loss<float>(a, b, d0b, d1b);
  moet::set_num_threads(saved);
  CHECK(one == two);
  CHECK(d0a == d0b);
  CHECK(d1a == d1b);
  CHECK(d0a.norm() > 0.0f);
}

TEST_CASE("Losses reject mismatched shapes and bad values", "[train][loss][bad_input]") {
  const M x = random_matrix(kTokens, kDim, 13);
  moet::TopPGate<double> gate({.model_dim = kDim, .num_experts = kExperts});
  moet::Routing<double> plan;
  gate.route(x, {}, plan);
  M wrong(kTokens, kExperts + 1);
  M right = M::Zero(kTokens, kExperts);
  CHECK_THROWS_WITH(
      moet::load_balance_loss<double>(plan, wrong),
      Contains("load_balance_loss") && Contains("d_probs must be (20, 5), got (20, 6)"));
  std::vector<std::uint8_t> short_valid(3, 1);
  CHECK_THROWS_WITH(moet::load_balance_loss<double>(plan, right, {.valid = short_valid}),
                    Contains("valid must be empty or have one entry per token (20), got 3"));
  moet::Routing<double> bare;
  bare.reset(kTokens, kExperts);
  bare.commit_counts();
  CHECK_THROWS_WITH(moet::load_balance_loss<double>(bare, right),
                    Contains("routing.probs() must be (20, 5), got (0, 0)"));
  CHECK_THROWS_WITH(moet::router_z_loss<double>(right, wrong),
                    Contains("router_z_loss") && Contains("d_logits must be (20, 5)"));
  M inf = right;
  inf(3, 1) = INFINITY;
  CHECK_THROWS_WITH(moet::router_z_loss<double>(inf, right),
                    Contains("logits must be finite") && Contains("at (3, 1)"));
  M not_prob = right;
  not_prob(0, 0) = 1.5;
  CHECK_THROWS_WITH(
      moet::router_entropy_loss<double>(not_prob, right),
      Contains("router_entropy_loss") && Contains("probs must be in [0, 1], got 1.5"));
  std::vector<double> dw(3);
  CHECK_THROWS_WITH(
      moet::importance_loss<double>(plan, dw),
      Contains("importance_loss") && Contains("d_weights must have one entry per assignment"));
  CHECK_THROWS_WITH(
      moet::noisy_load_loss<double>(right, right, right, right, right, {.k = 6}),
      Contains("noisy_load_loss") && Contains("k must be in [1, num_experts = 5], got 6"));
  CHECK_THROWS_WITH(moet::noisy_load_loss<double>(right, wrong, right, right, right, {}),
                    Contains("noise_logits must be (20, 5), got (20, 6)"));
  CHECK_THROWS_WITH(
      moet::consistency_loss<double>(right, wrong, right, right),
      Contains("consistency_loss") && Contains("logits1 must be (20, 5), got (20, 6)"));
  CHECK_THROWS_WITH(moet::consistency_loss<double>(right, right, right, wrong),
                    Contains("d1 must be (20, 5)"));
  CHECK_THROWS_WITH(moet::consistency_loss<double>(inf, right, right, right),
                    Contains("logits0 must be finite"));
  moet::TopKGate<double> plain(moet::TopKGate<double>::switch_options(kDim, kExperts));
  CHECK_THROWS_WITH(plain.noise_logits(x, {}, right, right), Contains("needs a noisy gate"));
  CHECK_THROWS_WITH(plain.backward_noise_logits(x, right, right),
                    Contains("TopKGate::backward_noise_logits") && Contains("needs a noisy gate"));
}

}  // namespace test_losses
