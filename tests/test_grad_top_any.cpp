// TopAnyGate backward (docs/algorithms.md §4.3): the straight-through surrogate, checked by
// finite differences in double, plus bit-identity across thread counts and bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/detail/rng.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/train/top_any_losses.hpp"

namespace test_grad_top_any {  // one per file: the unity build puts several files in one TU

static_assert(moet::TrainableGate<moet::TopAnyGate<float>>, "TopAnyGate<float> is trainable");
static_assert(moet::TrainableGate<moet::TopAnyGate<double>>, "TopAnyGate<double> is trainable");

namespace {

using moet::Index;
using Mat = moet::RowMatrix<double>;
using Vec = moet::Vector<double>;

Mat random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  moet::detail::Rng rng(seed);
  Mat m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = scale * rng.normal();
  }
  return m;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// The documented surrogate, written independently with plain loops in double. The selection
// (`a0`, `k0`, whether Tutel divides, the fallback tokens) is frozen at the base point; `a`
// follows ST: a = r + (a0 - r0), so da/dr = 1.
struct Surrogate {
  moet::TopAnyVariant variant = moet::TopAnyVariant::kDeepSpeed;
  bool training = true;
  double tau = 1.0;
  Vec mask;
  Mat g;  // dL/dw scattered to (T, Emax), nonzero only on the plan's assignments
  Mat c;  // dL/da (T, Emax)
  // Frozen at the base point:
  Mat a0, r0;
  std::vector<int> k0;
  std::vector<int> fallback;  // the eval fallback expert, or -1
  bool divide = false;
  bool raw_fallback = false;

  struct Scores {
    Mat s, r;
  };
  Scores scores(const Mat& x, const Mat& w, const Vec& theta) const {
    const Index num_tokens = x.rows(), d = x.cols(), emax = w.cols();
    Scores out{Mat::Zero(num_tokens, emax), Mat::Zero(num_tokens, emax)};
    for (Index t = 0; t < num_tokens; ++t) {
      double xx = 0.0;
      for (Index i = 0; i < d; ++i) xx += x(t, i) * x(t, i);
      for (Index e = 0; e < emax; ++e) {
        double dot = 0.0, ww = 0.0;
        for (Index i = 0; i < d; ++i) {
          dot += x(t, i) * w(i, e);
          ww += w(i, e) * w(i, e);
        }
        const double cos = dot / (std::max(std::sqrt(xx), 1e-12) * std::max(std::sqrt(ww), 1e-12));
        out.s(t, e) = sigmoid(tau * cos) * mask[e];
        out.r(t, e) = std::max(out.s(t, e) - sigmoid(tau * theta[e]), 0.0);
      }
    }
    return out;
  }

  void freeze(const Mat& x, const Mat& w, const Vec& theta) {
    const auto sc = scores(x, w, theta);
    r0 = sc.r;
    a0 = Mat::Zero(r0.rows(), r0.cols());
    k0.assign(static_cast<std::size_t>(r0.rows()), 0);
    fallback.assign(static_cast<std::size_t>(r0.rows()), -1);
    int max_k = 0;
    for (Index t = 0; t < r0.rows(); ++t) {
      for (Index e = 0; e < r0.cols(); ++e) {
        if (r0(t, e) > 0.0) {
          a0(t, e) = 1.0;
          ++k0[static_cast<std::size_t>(t)];
        }
      }
      if (k0[static_cast<std::size_t>(t)] == 0 && !training) {
        int best = -1;
        for (Index e = 0; e < r0.cols(); ++e) {
          if (mask[e] != 0.0 && (best < 0 || sc.s(t, e) > sc.s(t, best))) best = int(e);
        }
        fallback[static_cast<std::size_t>(t)] = best;
      }
      max_k = std::max(max_k, std::max(k0[static_cast<std::size_t>(t)], 1));
    }
    divide = variant == moet::TopAnyVariant::kTutel && max_k >= 2;
    raw_fallback = variant == moet::TopAnyVariant::kTutel && max_k < 2;
  }

  double loss(const Mat& x, const Mat& w, const Vec& theta) const {
    const auto sc = scores(x, w, theta);
    double total = 0.0;
    for (Index t = 0; t < x.rows(); ++t) {
      const auto ts = static_cast<std::size_t>(t);
      std::vector<double> a(static_cast<std::size_t>(w.cols()));
      double sum_a = 0.0;
      for (Index e = 0; e < w.cols(); ++e) {
        a[static_cast<std::size_t>(e)] = sc.r(t, e) + (a0(t, e) - r0(t, e));
        sum_a += a[static_cast<std::size_t>(e)];
      }
      for (Index e = 0; e < w.cols(); ++e) {
        const double ae = a[static_cast<std::size_t>(e)];
        if (k0[ts] > 0 && a0(t, e) > 0.0) {
          const double weight = divide ? ae / sum_a : ae / double(k0[ts]);
          total += g(t, e) * weight;
        }
        total += c(t, e) * ae;
      }
      if (fallback[ts] >= 0) {
        const double weight = raw_fallback ? sc.s(t, fallback[ts]) : 1.0;
        total += g(t, fallback[ts]) * weight;
      }
    }
    return total;
  }
};

struct Case {
  Mat x;
  Mat w;
  Vec theta;
  Vec mask;
};

// Smallest |s - sigmoid(tau theta)| over active pairs: the selection must not flip under FD.
double margin(const Surrogate& sur, const Case& c) {
  const auto sc = sur.scores(c.x, c.w, c.theta);
  double m = 1e300;
  for (Index t = 0; t < c.x.rows(); ++t) {
    for (Index e = 0; e < c.w.cols(); ++e) {
      if (c.mask[e] == 0.0) continue;
      m = std::min(m, std::abs(sc.s(t, e) - sigmoid(sur.tau * c.theta[e])));
    }
  }
  return m;
}

struct Grads {
  Mat dw;
  Vec dtheta;
  Mat dx;
};

Grads finite_differences(const Surrogate& sur, const Case& c) {
  const double h = 1e-6;
  Grads fd{Mat::Zero(c.w.rows(), c.w.cols()), Vec::Zero(c.theta.size()),
           Mat::Zero(c.x.rows(), c.x.cols())};
  auto central = [&](double& p, auto&& eval) {
    const double saved = p;
    p = saved + h;
    const double up = eval();
    p = saved - h;
    const double down = eval();
    p = saved;
    return (up - down) / (2.0 * h);
  };
  Case v = c;
  auto eval = [&] { return sur.loss(v.x, v.w, v.theta); };
  for (Index i = 0; i < v.w.rows(); ++i) {
    for (Index e = 0; e < v.w.cols(); ++e) fd.dw(i, e) = central(v.w(i, e), eval);
  }
  for (Index e = 0; e < v.theta.size(); ++e) fd.dtheta[e] = central(v.theta[e], eval);
  for (Index t = 0; t < v.x.rows(); ++t) {
    for (Index i = 0; i < v.x.cols(); ++i) fd.dx(t, i) = central(v.x(t, i), eval);
  }
  return fd;
}

void check_close(const Mat& got, const Mat& want, const std::string& what) {
  INFO(what);
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double scale = std::max(want.cwiseAbs().maxCoeff(), 1e-3);
  for (Index i = 0; i < got.rows(); ++i) {
    for (Index j = 0; j < got.cols(); ++j) {
      INFO("entry (" << i << ", " << j << "): " << got(i, j) << " vs FD " << want(i, j));
      CHECK(std::abs(got(i, j) - want(i, j)) <= 1e-6 * scale + 1e-4 * std::abs(want(i, j)));
    }
  }
}

// Runs route + backward on `c` and compares with FD of the surrogate. Returns the plan's
// largest k so callers can assert which branch they covered.
Index check_against_surrogate(moet::TopAnyVariant variant, bool training, double tau, const Case& c,
                              std::uint64_t seed, bool with_d_gates,
                              bool trainable_temperature = false) {
  moet::TopAnyGate<double> gate({.model_dim = c.w.rows(),
                                 .num_experts = c.w.cols(),
                                 .initial_experts = 1,
                                 .variant = variant,
                                 .temperature = tau,
                                 .trainable_temperature = trainable_temperature});
  gate.set_gate_embeddings(c.w, moet::WeightLayout::kInOut);
  gate.set_thresholds(c.theta);
  gate.set_expert_mask(c.mask);
  moet::RouteContext ctx;
  ctx.training = training;
  moet::Routing<double> plan;
  gate.route(c.x, ctx, plan);

  Surrogate sur;
  sur.variant = variant;
  sur.training = training;
  sur.tau = gate.temperature();  // tau, or exp(min(log tau, log 100)) when trainable
  sur.mask = c.mask;
  const Index num_tokens = c.x.rows(), emax = c.w.cols();
  REQUIRE(margin(sur, c) > 1e-4);
  const Mat g_dense = random_matrix(num_tokens, emax, seed + 100);
  sur.g = Mat::Zero(num_tokens, emax);
  std::vector<double> d_weights;
  Index max_k = 0;
  for (Index t = 0; t < num_tokens; ++t) {
    max_k = std::max(max_k, plan.k(t));
    for (const auto e : plan.experts(t)) {
      d_weights.push_back(g_dense(t, e));
      sur.g(t, e) = g_dense(t, e);
    }
  }
  sur.c = with_d_gates ? random_matrix(num_tokens, emax, seed + 200) : Mat::Zero(num_tokens, emax);
  sur.freeze(c.x, c.w, c.theta);
  const std::vector<double> d_gates(sur.c.data(), sur.c.data() + sur.c.size());

  gate.zero_grad();
  Mat dx = Mat::Constant(num_tokens, c.x.cols(), 0.25);  // backward adds into dx
  moet::TopAnyLossGrad<double> loss_grad;
  if (with_d_gates) loss_grad.d_gates = d_gates;
  gate.backward(c.x, ctx, plan, d_weights, loss_grad, dx);
  dx.array() -= 0.25;

  const Grads fd = finite_differences(sur, c);
  check_close(gate.gate_embeddings_grad(), fd.dw, "dL/dW");
  check_close(gate.thresholds_grad().transpose(), fd.dtheta.transpose(), "dL/dtheta");
  check_close(dx, fd.dx, "dL/dx");
  if (trainable_temperature) {
    // FD in log_t, with tau = exp(min(log_t, log 100)).
    const double h = 1e-6, log_t = std::log(tau);
    Surrogate up = sur, down = sur;
    up.tau = std::exp(std::min(log_t + h, std::log(100.0)));
    down.tau = std::exp(std::min(log_t - h, std::log(100.0)));
    const double fd_log_t = (up.loss(c.x, c.w, c.theta) - down.loss(c.x, c.w, c.theta)) / (2.0 * h);
    INFO("dL/dlog_t " << gate.log_temperature_grad() << " vs FD " << fd_log_t);
    CHECK(std::abs(gate.log_temperature_grad() - fd_log_t) <=
          1e-6 * std::max(std::abs(fd_log_t), 1e-3));
    if (log_t < std::log(100.0)) CHECK(fd_log_t != 0.0);
  } else {
    CHECK(gate.log_temperature_grad() == 0.0);
  }

  // A second backward accumulates: the gradients double.
  const Mat dw_once = gate.gate_embeddings_grad();
  gate.backward(c.x, ctx, plan, d_weights, loss_grad, dx);
  CHECK((gate.gate_embeddings_grad() - 2.0 * dw_once).cwiseAbs().maxCoeff() <=
        1e-12 * (1.0 + dw_once.cwiseAbs().maxCoeff()));
  return max_k;
}

moet::RouteContext training_ctx() {
  moet::RouteContext ctx;
  ctx.training = true;
  return ctx;
}

Case random_case(std::uint64_t seed, Index num_tokens, Index d, Index emax, double theta_scale) {
  Case c;
  c.x = random_matrix(num_tokens, d, seed);
  c.w = random_matrix(d, emax, seed + 1, 0.7);  // column norms away from 1
  c.theta = random_matrix(emax, 1, seed + 2, theta_scale);
  c.mask = Vec::Ones(emax);
  c.mask[emax - 2] = 0.0;  // one inactive slot
  return c;
}

// The first seed from `seed` whose case keeps every score at least 1e-4 away from its
// threshold (so FD does not flip the selection).
Case well_separated_case(std::uint64_t seed, Index num_tokens, Index d, Index emax,
                         double theta_scale, double tau, const Vec* theta = nullptr) {
  Surrogate probe;
  probe.tau = tau;
  for (std::uint64_t s = seed;; s += 7) {
    Case c = random_case(s, num_tokens, d, emax, theta_scale);
    if (theta != nullptr) c.theta = *theta;
    probe.mask = c.mask;
    if (margin(probe, c) > 1e-3) return c;
  }
}

}  // namespace

TEST_CASE("TopAnyGate backward equals finite differences of the straight-through surrogate",
          "[gate][top_any][grad]") {
  const auto variant = GENERATE(moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel);
  const double tau = GENERATE(1.0, 2.5);
  const bool with_d_gates = GENERATE(false, true);
  const std::uint64_t seed = 11;
  const Case c = well_separated_case(seed, 9, 6, 5, 0.3, tau);
  const Index max_k = check_against_surrogate(variant, true, tau, c, seed, with_d_gates);
  CHECK(max_k >= 2);  // Tutel divides through sum(a) here
}

TEST_CASE("TopAnyGate backward with a trainable temperature equals FD in log_t",
          "[gate][top_any][grad][temperature]") {
  const auto variant = GENERATE(moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel);
  const bool training = GENERATE(true, false);
  const double tau = 2.5;
  const Case c = well_separated_case(41, 9, 6, 5, 0.3, tau);
  check_against_surrogate(variant, training, tau, c, 41, true, true);
}

TEST_CASE("TopAnyGate trainable temperature is clamped at 100 and passes no gradient above",
          "[gate][top_any][grad][temperature]") {
  moet::TopAnyGate<double> gate(
      {.model_dim = 4, .num_experts = 3, .temperature = 150.0, .trainable_temperature = true});
  CHECK(gate.temperature() == Approx(100.0).epsilon(1e-12));
  CHECK(gate.log_temperature() == Approx(std::log(150.0)).epsilon(1e-12));
  const Case c = well_separated_case(43, 6, 4, 3, 0.01, 100.0);
  check_against_surrogate(moet::TopAnyVariant::kDeepSpeed, true, 150.0, c, 43, true, true);
}

TEST_CASE("TopAnyGate backward: Tutel without a k >= 2 token does not divide",
          "[gate][top_any][grad]") {
  // Every slot but 0 has a threshold no cosine can beat (cos <= 1 < 1.5), so k <= 1 throughout.
  const bool training = GENERATE(true, false);
  const Vec theta = (Vec(4) << -0.1, 1.5, 1.5, 1.5).finished();
  const Case c = well_separated_case(21, 8, 5, 4, 0.2, 1.0, &theta);
  const Index max_k =
      check_against_surrogate(moet::TopAnyVariant::kTutel, training, 1.0, c, 21, true);
  CHECK(max_k == 1);
}

TEST_CASE("TopAnyGate backward in eval: fallback tokens pass the variant's gradient",
          "[gate][top_any][grad]") {
  // High thresholds on most slots: some tokens fire nothing and take the eval fallback.
  const auto variant = GENERATE(moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel);
  const bool single = GENERATE(true, false);  // no token with k >= 2 (Tutel raw weight) or some
  const Vec theta = single ? (Vec(4) << 0.4, 1.5, 1.5, 1.5).finished()
                           : (Vec(4) << 0.3, 0.6, 1.5, 0.2).finished();
  const Case c = well_separated_case(31, 16, 5, 4, 0.2, 1.0, &theta);
  moet::TopAnyGate<double> probe({.model_dim = 5, .num_experts = 4});
  probe.set_gate_embeddings(c.w, moet::WeightLayout::kInOut);
  probe.set_thresholds(c.theta);
  probe.set_expert_mask(c.mask);
  moet::Routing<double> train_plan;
  moet::RouteContext train_ctx;
  train_ctx.training = true;
  probe.route(c.x, train_ctx, train_plan);
  Index dropped = 0;
  for (Index t = 0; t < c.x.rows(); ++t) dropped += train_plan.k(t) == 0 ? 1 : 0;
  REQUIRE(dropped > 0);  // the fallback is exercised
  const Index max_k = check_against_surrogate(variant, false, 1.0, c, 31, true);
  CHECK((max_k == 1) == single);
}

TEST_CASE("TopAnyGate backward passes nothing for dropped tokens and inactive slots",
          "[gate][top_any][grad]") {
  moet::TopAnyGate<double> gate({.model_dim = 3, .num_experts = 3, .initial_experts = 2});
  Mat w(3, 3);
  w << 1, 0, 0,  //
      0, 1, 0,   //
      0, 0, 1;
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  gate.set_thresholds((Vec(3) << 0.5, 0.5, -2.0).finished());
  Mat x(2, 3);
  x << 1, 0.1, 0.2,  // cos 0.97 with slot 0: fires slot 0 only
      -1, -1, 1;     // cos < 0.5 everywhere active: dropped; slot 2 (inactive) would fire
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.k(0) == 1);
  REQUIRE(plan.k(1) == 0);
  const std::vector<double> d_weights{1.0};
  const std::vector<double> d_gates(6, 1.0);
  Mat dx = Mat::Zero(2, 3);
  gate.backward(x, ctx, plan, d_weights, {d_gates}, dx);
  CHECK(dx.row(1).isZero(0.0));
  CHECK(gate.gate_embeddings_grad().col(1).isZero(0.0));
  CHECK(gate.gate_embeddings_grad().col(2).isZero(0.0));
  CHECK(gate.thresholds_grad()[1] == 0.0);
  CHECK(gate.thresholds_grad()[2] == 0.0);
  CHECK(gate.thresholds_grad()[0] < 0.0);  // raising theta_0 lowers r, with dL/da = 2 > 0
  CHECK_FALSE(dx.row(0).isZero(0.0));
}

TEST_CASE("TopAnyGate visits embeddings and thresholds with their gradients",
          "[gate][top_any][grad]") {
  moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 3, .initial_experts = 2});
  CHECK(std::as_const(gate).gate_embeddings_grad().size() == 0);  // lazily allocated
  std::vector<std::string> names;
  gate.visit_parameters(
      [&](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float> grad) {
        names.emplace_back(name);
        CHECK(value.rows() == grad.rows());
        CHECK(value.cols() == grad.cols());
        CHECK(grad.isZero(0.0f));
        value(0, 1) = 0.5f;  // aliases the gate's state
      });
  REQUIRE(names == std::vector<std::string>{"embeddings", "thresholds"});
  CHECK(gate.gate_embeddings()(0, 1) == 0.5f);
  CHECK(gate.thresholds()[1] == 0.5f);
  CHECK(gate.gate_embeddings_grad().rows() == 4);
  CHECK(gate.gate_embeddings_grad().cols() == 3);
  CHECK(gate.thresholds_grad().size() == 3);

  moet::TopAnyGate<float> trained(
      {.model_dim = 4, .num_experts = 2, .temperature = 10.0f, .trainable_temperature = true});
  names.clear();
  trained.visit_parameters(
      [&](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        names.emplace_back(name);
        if (name == "log_temperature") {
          CHECK(value.rows() == 1);
          CHECK(value.cols() == 1);
          CHECK(value(0, 0) == Approx(std::log(10.0f)));
          value(0, 0) = std::log(3.0f);  // an optimiser step changes tau
        }
      });
  REQUIRE(names == std::vector<std::string>{"embeddings", "thresholds", "log_temperature"});
  CHECK(trained.temperature() == Approx(3.0f));
}

TEST_CASE("TopAnyGate backward is bit-identical with 1 and 2 threads",
          "[gate][top_any][grad][parallel]") {
  const auto variant = GENERATE(moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel);
  // 24 slots: the router's products on the packed kernels (from kPackedRouterMinExperts).
  const Index emax = GENERATE(Index{12}, Index{24});
  const Index num_tokens = 1300, d = 24;
  moet::TopAnyGate<float> gate(
      {.model_dim = d, .num_experts = emax, .initial_experts = emax - 2, .variant = variant});
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 0.1f));
  const moet::RowMatrix<float> x = random_matrix(num_tokens, d, 5).cast<float>();
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<float> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.num_assignments() > num_tokens);
  const Mat g = random_matrix(plan.num_assignments(), 1, 6);
  std::vector<float> d_weights(static_cast<std::size_t>(plan.num_assignments()));
  for (std::size_t a = 0; a < d_weights.size(); ++a) d_weights[a] = float(g(Index(a), 0));
  const moet::RowMatrix<float> c = random_matrix(num_tokens, emax, 7).cast<float>();
  const std::vector<float> d_gates(c.data(), c.data() + c.size());
  const int saved = moet::num_threads();
  auto run = [&](int threads) {
    moet::set_num_threads(threads);
    gate.zero_grad();
    moet::RowMatrix<float> dx = moet::RowMatrix<float>::Zero(num_tokens, d);
    gate.backward(x, ctx, plan, d_weights, {d_gates}, dx);
    return std::make_tuple(dx, gate.gate_embeddings_grad(), gate.thresholds_grad());
  };
  const auto one = run(1);
  const auto two = run(2);
  moet::set_num_threads(saved);
  CHECK(std::get<0>(one) == std::get<0>(two));
  CHECK(std::get<1>(one) == std::get<1>(two));
  CHECK(std::get<2>(one) == std::get<2>(two));
  CHECK_FALSE(std::get<1>(one).isZero(0.0f));
}

namespace {

// What CosineRouter<S>::backward gives for tokens `x`, dL/ds `ds` and dL/dr `dr` (double
// values, cast to S), after scoring `x`; with `stale`, W is handed out for writing first (the
// scalar pass on Eigen's products).
template <class S>
struct CosineGrads {
  moet::RowMatrix<S> dx, embeddings;
  moet::Vector<S> thresholds;
  S log_temperature = S(0);
};
template <class S>
CosineGrads<S> cosine_backward(moet::CosineRouter<S>& router, const Mat& x_d, const Mat& ds,
                               const Mat& dr, bool stale) {
  const Index num_tokens = x_d.rows();
  const Index emax = router.num_experts();
  const moet::RowMatrix<S> x = x_d.cast<S>();
  const std::vector<S> mask(static_cast<std::size_t>(emax), S(1));
  std::vector<S> slot(static_cast<std::size_t>(2 * emax));
  std::vector<std::int32_t> block_bad(
      static_cast<std::size_t>(num_tokens / moet::CosineRouter<S>::kTokenBlock + 1));
  moet::RowMatrix<S> scores(num_tokens, emax);
  router.score(x, mask.data(), Eigen::Map<moet::RowMatrix<S>>(scores.data(), num_tokens, emax),
               slot.data(), block_bad.data());
  if (stale) {
    router.visit_parameters([](std::string_view, moet::ParamMap<S>, moet::ParamMap<S>) {});
  }
  router.zero_grad();
  auto grads = router.score_grads(num_tokens);
  grads.d_scores = ds.cast<S>();
  grads.d_r = dr.cast<S>();
  const S* const level = router.fire_levels();
  moet::RowMatrix<S> dx = moet::RowMatrix<S>::Zero(num_tokens, x.cols());
  router.backward(x, scores, level, dx);
  return {dx, router.embeddings_grad(), router.thresholds_grad(), router.log_temperature_grad()};
}

template <class A>
double relative_error(const A& got, const Mat& want) {
  return (got.template cast<double>() - want).norm() / want.norm();
}

}  // namespace

TEST_CASE("CosineRouter backward on the packed kernels matches the double router",
          "[gate][top_any][grad]") {
  // 300 tokens (two token blocks, the second partial), d = 40 (a partial panel), 24 slots (a
  // partial panel), trainable temperature, nonzero thresholds; zeros in dL/ds (skipped pairs)
  // and one token with no gradient at all.
  constexpr Index num_tokens = 300, d = 40, emax = 24;
  const moet::CosineRouter<double>::Options options{
      .model_dim = d, .num_experts = emax, .temperature = 2.0, .trainable_temperature = true};
  moet::CosineRouter<double> router_d(options);
  moet::CosineRouter<float> router_f(
      {.model_dim = d, .num_experts = emax, .temperature = 2.0f, .trainable_temperature = true});
  const Mat w = random_matrix(d, emax, 11, 0.3);
  const Vec theta = 0.2 * random_matrix(emax, 1, 12);
  router_d.set_embeddings("test", w, moet::WeightLayout::kInOut);
  router_d.set_thresholds(theta);
  router_f.set_embeddings("test", w.cast<float>(), moet::WeightLayout::kInOut);
  router_f.set_thresholds(theta.cast<float>());
  const Mat x = random_matrix(num_tokens, d, 13);
  Mat ds = random_matrix(num_tokens, emax, 14);
  const Mat dr = random_matrix(num_tokens, emax, 15);
  for (Index i = 0; i < ds.size(); i += 5) ds.data()[i] = 0.0;
  ds.row(7).setZero();
  const bool vector_level = moet::kernel_isa() != moet::KernelIsa::kPortable;
  CHECK(router_f.packed_product() == vector_level);

  const auto want = cosine_backward(router_d, x, ds, dr, false);
  REQUIRE(want.embeddings.norm() > 0.0);
  REQUIRE(want.log_temperature != 0.0);
  for (const bool stale : {false, true}) {
    INFO((stale ? "Eigen's products (stale W)" : "the packed kernels"));
    const auto got = cosine_backward(router_f, x, ds, dr, stale);
    CHECK(relative_error(got.dx, want.dx) < 1e-5);
    CHECK(relative_error(got.embeddings, want.embeddings) < 1e-5);
    CHECK(relative_error(got.thresholds, want.thresholds) < 1e-5);
    CHECK(std::abs(double(got.log_temperature) - want.log_temperature) <
          1e-5 * std::abs(want.log_temperature));
    CHECK(got.dx.row(7).isZero(0.0f));
    router_f.parameters_changed();
  }
}

TEST_CASE("TopAnyGate backward rejects mismatched input", "[gate][top_any][grad][errors]") {
  using Catch::Contains;
  moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 3});
  const moet::RowMatrix<float> x = random_matrix(5, 4, 9).cast<float>();
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<float> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.num_assignments() > 0);
  const auto n = static_cast<std::size_t>(plan.num_assignments());
  std::vector<float> d_weights(n, 1.0f);
  std::vector<float> d_gates(15, 1.0f);
  moet::RowMatrix<float> dx = moet::RowMatrix<float>::Zero(5, 4);
  const moet::TopAnyLossGrad<float> none;

  const std::vector<float> short_weights(n - 1, 1.0f);
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, short_weights, none, dx),
                    Contains("[moet::TopAnyGate::backward]") && Contains("d_weights") &&
                        Contains("(" + std::to_string(n) + "), got " + std::to_string(n - 1)));
  const std::vector<float> bad_gates(14, 1.0f);
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, d_weights, {bad_gates}, dx),
                    Contains("d_gates") && Contains("= 15") && Contains("got 14"));
  moet::RowMatrix<float> bad_dx = moet::RowMatrix<float>::Zero(5, 3);
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, d_weights, none, bad_dx),
                    Contains("dx must be (5, 4), got (5, 3)"));
  const moet::RowMatrix<float> fewer = x.topRows(4);
  CHECK_THROWS_WITH(gate.backward(fewer, ctx, plan, d_weights, none, dx),
                    Contains("the plan has 5 tokens but x has 4 rows"));
  const moet::RowMatrix<float> wide = moet::RowMatrix<float>::Ones(5, 6);
  CHECK_THROWS_WITH(gate.backward(wide, ctx, plan, d_weights, none, dx),
                    Contains("model_dim = 4") && Contains("got 6"));
  moet::Routing<float> other;
  other.reset(5, 2);
  other.commit_counts();
  CHECK_THROWS_WITH(gate.backward(x, ctx, other, {}, none, dx),
                    Contains("num_experts = 3") && Contains("got 2"));
  moet::Routing<float> no_scores;
  no_scores.reset(5, 3);
  no_scores.commit_counts();
  CHECK_THROWS_WITH(gate.backward(x, ctx, no_scores, {}, none, dx),
                    Contains("scores must be (5, 3)") && Contains("got (0, 0)"));

  // A plan that no longer matches the gate: raise every threshold after routing.
  gate.zero_grad();
  gate.set_thresholds(moet::Vector<float>::Constant(gate.num_experts(), 5.0f));
  CHECK_THROWS_WITH(gate.backward(x, ctx, plan, d_weights, none, dx),
                    Contains("does not match the gate") && Contains("training plan"));
  CHECK(dx.isZero(0.0f));  // nothing was changed
  CHECK(gate.gate_embeddings_grad().isZero(0.0f));
}

// ---------------------------------------------------------------------------------------------
// Auxiliary losses (docs/algorithms.md §8.6), against naive double formulas.

namespace {

double naive_diversity(const Mat& w, const Vec& mask) {
  double sum = 0.0;
  for (Index i = 0; i < w.cols(); ++i) {
    for (Index j = 0; j < w.cols(); ++j) {
      if (mask[i] == 0.0 || mask[j] == 0.0) continue;
      double dot = 0.0, ii = 0.0, jj = 0.0;
      for (Index r = 0; r < w.rows(); ++r) {
        dot += w(r, i) * w(r, j);
        ii += w(r, i) * w(r, i);
        jj += w(r, j) * w(r, j);
      }
      const double c = dot / (std::max(std::sqrt(ii), 1e-12) * std::max(std::sqrt(jj), 1e-12));
      const double m = c - (i == j ? 1.0 : 0.0);
      sum += m * m;
    }
  }
  return std::sqrt(sum);
}

double naive_simplicity(const Mat& w) {
  double sum = 0.0;
  for (Index e = 0; e < w.cols(); ++e) {
    double ee = 0.0;
    for (Index r = 0; r < w.rows(); ++r) ee += w(r, e) * w(r, e);
    sum += std::sqrt(ee);
  }
  return sum / double(w.cols());
}

// Load balance + efficiency as a function of a real-valued gate matrix `a`; the routed set N
// and ce come from the frozen 0/1 matrix `sel` (no gradient through them).
double naive_load_balance(const Mat& a, const Mat& sel) {
  const Index num_tokens = a.rows(), emax = a.cols();
  std::vector<double> me(static_cast<std::size_t>(emax), 0.0), ce(me);
  int routed = 0;
  for (Index t = 0; t < num_tokens; ++t) {
    double sel_sum = 0.0, a_sum = 0.0;
    for (Index e = 0; e < emax; ++e) {
      sel_sum += sel(t, e);
      a_sum += a(t, e);
    }
    if (sel_sum == 0.0) continue;
    ++routed;
    for (Index e = 0; e < emax; ++e) {
      me[static_cast<std::size_t>(e)] += a(t, e) / a_sum;
      ce[static_cast<std::size_t>(e)] += sel(t, e);
    }
  }
  if (routed == 0) return 0.0;
  double lb = 0.0;
  for (std::size_t e = 0; e < me.size(); ++e) lb += (me[e] / routed) * (ce[e] / routed);
  return double(emax) * lb;
}

double naive_efficiency(const Mat& a) { return a.size() == 0 ? 0.0 : a.sum() / double(a.size()); }

Mat plan_matrix(const moet::Routing<double>& plan) {
  Mat a = Mat::Zero(plan.num_tokens(), plan.num_experts());
  for (Index t = 0; t < plan.num_tokens(); ++t) {
    for (const auto e : plan.experts(t)) a(t, e) = 1.0;
  }
  return a;
}

}  // namespace

TEST_CASE("DynMoE aux losses match hand-computed values", "[loss][top_any]") {
  // W columns (1, 0) and (1, 1): Wn^T Wn - I has 1/sqrt2 off the diagonal, so diversity is
  // sqrt(2 * 1/2) = 1 and simplicity (1 + sqrt2) / 2. Token 0 -> {0}, token 1 -> {0, 1}:
  // N = 2, ce = (1, 1/2), me = (3/4, 1/4), load balance 2 * (3/4 + 1/8) = 7/4, efficiency 3/4.
  moet::TopAnyGate<double> gate({.model_dim = 2, .num_experts = 2});
  gate.set_gate_embeddings((Mat(2, 2) << 1, 1, 0, 1).finished(), moet::WeightLayout::kInOut);
  gate.set_thresholds((Vec(2) << 0.5, 0.1).finished());
  // Slot e fires iff cos > theta_e (tau = 1). Token 0 (1, -0.95): cos 0.725 with slot 0 (fires),
  // 0.026 with slot 1 (does not). Token 1 (1, 0.9): cos 0.743 and 0.999 (both fire).
  Mat x(2, 2);
  x << 1, -0.95,  //
      1, 0.9;
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.k(0) == 1);
  REQUIRE(plan.k(1) == 2);
  std::vector<double> d_gates(4, 0.0);
  const auto loss =
      moet::top_any_aux_loss(gate, plan, std::span<double>(d_gates), {.coefficient = 1.0});
  CHECK(loss.diversity == Approx(1.0).epsilon(1e-12));
  CHECK(loss.simplicity == Approx((1.0 + std::sqrt(2.0)) / 2.0).epsilon(1e-12));
  CHECK(loss.load_balance == Approx(1.75).epsilon(1e-12));
  CHECK(loss.efficiency == Approx(0.75).epsilon(1e-12));
  CHECK(loss.value == Approx(1.0 + (1.0 + std::sqrt(2.0)) / 2.0 + 1.75 + 0.75).epsilon(1e-12));
}

TEST_CASE("DynMoE aux loss gradients equal finite differences of naive formulas",
          "[loss][top_any][grad]") {
  const auto variant = GENERATE(moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel);
  const bool training = GENERATE(true, false);
  const Index num_tokens = 12, d = 5, emax = 5;
  const double coef = 0.37;
  moet::TopAnyGate<double> gate(
      {.model_dim = d, .num_experts = emax, .initial_experts = 4, .variant = variant});
  const Mat w = random_matrix(d, emax, 3, 0.8);
  gate.set_gate_embeddings(w, moet::WeightLayout::kInOut);
  gate.set_thresholds((Vec(emax) << 0.2, 0.5, -0.1, 0.4, 0.0).finished());
  gate.set_expert_mask((Vec(emax) << 1, 0, 1, 1, 1).finished());  // slot 1 inactive
  const Mat x = random_matrix(num_tokens, d, 4);
  moet::RouteContext ctx;
  ctx.training = training;
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  const Mat sel = plan_matrix(plan);
  REQUIRE(sel.sum() > 0.0);

  gate.zero_grad();
  std::vector<double> d_gates(static_cast<std::size_t>(num_tokens * emax), 0.5);  // adds
  const auto loss =
      moet::top_any_aux_loss(gate, plan, std::span<double>(d_gates), {.coefficient = coef});
  const Vec& mask = gate.expert_mask();
  CHECK(loss.diversity == Approx(naive_diversity(w, mask)).epsilon(1e-12));
  CHECK(loss.simplicity == Approx(naive_simplicity(w)).epsilon(1e-12));
  CHECK(loss.load_balance == Approx(naive_load_balance(sel, sel)).epsilon(1e-12));
  CHECK(loss.efficiency == Approx(naive_efficiency(sel)).epsilon(1e-12));
  const bool ds = variant == moet::TopAnyVariant::kDeepSpeed;
  const double l_aux = naive_diversity(w, mask) + naive_simplicity(w) +
                       (ds ? naive_load_balance(sel, sel) + naive_efficiency(sel) : 0.0);
  CHECK(loss.value == Approx(coef * l_aux).epsilon(1e-12));

  const double h = 1e-6;
  // dW: diversity + simplicity (never the routing terms; those go through d_gates).
  Mat fd_w(d, emax);
  Mat wv = w;
  for (Index i = 0; i < d; ++i) {
    for (Index e = 0; e < emax; ++e) {
      const double saved = wv(i, e);
      wv(i, e) = saved + h;
      const double up = naive_diversity(wv, mask) + naive_simplicity(wv);
      wv(i, e) = saved - h;
      const double down = naive_diversity(wv, mask) + naive_simplicity(wv);
      wv(i, e) = saved;
      fd_w(i, e) = coef * (up - down) / (2.0 * h);
    }
  }
  check_close(gate.gate_embeddings_grad(), fd_w, "d(diversity + simplicity)/dW");
  CHECK(gate.thresholds_grad().isZero(0.0));

  // d_gates: d(load balance + efficiency)/da for DeepSpeed, untouched for Tutel.
  Mat fd_a = Mat::Zero(num_tokens, emax);
  if (ds) {
    Mat av = sel;
    for (Index t = 0; t < num_tokens; ++t) {
      for (Index e = 0; e < emax; ++e) {
        const double saved = av(t, e);
        av(t, e) = saved + h;
        const double up = naive_load_balance(av, sel) + naive_efficiency(av);
        av(t, e) = saved - h;
        const double down = naive_load_balance(av, sel) + naive_efficiency(av);
        av(t, e) = saved;
        fd_a(t, e) = coef * (up - down) / (2.0 * h);
      }
    }
  }
  Mat got_a = Eigen::Map<const Mat>(d_gates.data(), num_tokens, emax);
  got_a.array() -= 0.5;
  check_close(got_a, fd_a, "d(load balance + efficiency)/da");
}

TEST_CASE("DynMoE aux loss with every token dropped has load balance 0", "[loss][top_any][edge]") {
  moet::TopAnyGate<double> gate({.model_dim = 3, .num_experts = 3});
  gate.set_thresholds(moet::Vector<double>::Constant(gate.num_experts(), 4.0));
  const Mat x = random_matrix(4, 3, 8);
  moet::RouteContext ctx;
  ctx.training = true;
  moet::Routing<double> plan;
  gate.route(x, ctx, plan);
  REQUIRE(plan.num_assignments() == 0);
  std::vector<double> d_gates(12, 0.0);
  const auto loss =
      moet::top_any_aux_loss(gate, plan, std::span<double>(d_gates), {.coefficient = 1.0});
  CHECK(loss.load_balance == 0.0);
  CHECK(loss.efficiency == 0.0);
  for (const double g : d_gates) CHECK(g == Approx(1.0 / 12.0).epsilon(1e-12));  // efficiency
}

TEST_CASE("DynMoE aux loss rejects bad input", "[loss][top_any][errors]") {
  using Catch::Contains;
  moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 3});
  const moet::RowMatrix<float> x = random_matrix(5, 4, 9).cast<float>();
  moet::Routing<float> plan;
  gate.route(x, moet::RouteContext{}, plan);
  std::vector<float> d_gates(14, 0.0f);
  CHECK_THROWS_WITH(moet::top_any_aux_loss(gate, plan, std::span<float>(d_gates)),
                    Contains("[moet::top_any_aux_loss]") && Contains("= 15") && Contains("got 14"));
  CHECK_NOTHROW(moet::top_any_aux_loss(gate, plan, std::span<float>(), {.accumulate_grad = false}));
  d_gates.resize(15);
  CHECK_THROWS_WITH(
      moet::top_any_aux_loss(gate, plan, std::span<float>(d_gates), {.coefficient = -1.0f}),
      Contains("coefficient") && Contains("got -1"));
  moet::Routing<float> other;
  other.reset(5, 2);
  other.commit_counts();
  CHECK_THROWS_WITH(moet::top_any_aux_loss(gate, other, std::span<float>(d_gates)),
                    Contains("num_experts = 3") && Contains("got 2"));
}

TEST_CASE("DynMoE aux loss fed through backward equals FD of the whole surrogate",
          "[loss][top_any][grad]") {
  // total = sum g w + coef (diversity + simplicity + load balance + efficiency), with a on the
  // straight-through path (a = r + stopgrad(sign(r) - r)); N and ce frozen (no gradient).
  const double coef = 0.5;
  const Case c = well_separated_case(51, 10, 5, 5, 0.3, 1.0);
  moet::TopAnyGate<double> gate({.model_dim = 5, .num_experts = 5});
  gate.set_gate_embeddings(c.w, moet::WeightLayout::kInOut);
  gate.set_thresholds(c.theta);
  gate.set_expert_mask(c.mask);
  moet::Routing<double> plan;
  gate.route(c.x, training_ctx(), plan);
  const Mat sel = plan_matrix(plan);
  Surrogate sur;
  sur.tau = 1.0;
  sur.mask = c.mask;
  sur.g = Mat::Zero(10, 5);
  sur.c = Mat::Zero(10, 5);
  const Mat g_dense = random_matrix(10, 5, 52);
  std::vector<double> d_weights;
  for (Index t = 0; t < 10; ++t) {
    for (const auto e : plan.experts(t)) {
      d_weights.push_back(g_dense(t, e));
      sur.g(t, e) = g_dense(t, e);
    }
  }
  sur.freeze(c.x, c.w, c.theta);
  auto total = [&](const Mat& x, const Mat& w, const Vec& theta) {
    const auto sc = sur.scores(x, w, theta);
    const Mat a = sc.r + (sur.a0 - sur.r0);
    return sur.loss(x, w, theta) + coef * (naive_diversity(w, c.mask) + naive_simplicity(w) +
                                           naive_load_balance(a, sel) + naive_efficiency(a));
  };

  gate.zero_grad();
  std::vector<double> d_gates(50, 0.0);
  moet::top_any_aux_loss(gate, plan, std::span<double>(d_gates), {.coefficient = coef});
  Mat dx = Mat::Zero(10, 5);
  gate.backward(c.x, training_ctx(), plan, d_weights, {d_gates}, dx);

  const double h = 1e-6;
  Case v = c;
  auto central = [&](double& p) {
    const double saved = p;
    p = saved + h;
    const double up = total(v.x, v.w, v.theta);
    p = saved - h;
    const double down = total(v.x, v.w, v.theta);
    p = saved;
    return (up - down) / (2.0 * h);
  };
  Mat fd_w(5, 5), fd_x(10, 5);
  Vec fd_theta(5);
  for (Index i = 0; i < 5; ++i) {
    for (Index e = 0; e < 5; ++e) fd_w(i, e) = central(v.w(i, e));
  }
  for (Index e = 0; e < 5; ++e) fd_theta[e] = central(v.theta[e]);
  for (Index t = 0; t < 10; ++t) {
    for (Index i = 0; i < 5; ++i) fd_x(t, i) = central(v.x(t, i));
  }
  check_close(gate.gate_embeddings_grad(), fd_w, "dL/dW");
  check_close(gate.thresholds_grad().transpose(), fd_theta.transpose(), "dL/dtheta");
  check_close(dx, fd_x, "dL/dx");
}

TEST_CASE("TopAnyGate backward and aux loss accept an empty batch", "[gate][top_any][edge]") {
  moet::TopAnyGate<float> gate({.model_dim = 4, .num_experts = 3, .initial_experts = 2});
  const moet::RowMatrix<float> x(0, 4);
  moet::Routing<float> plan;
  gate.route(x, training_ctx(), plan);
  moet::RowMatrix<float> dx(0, 4);
  gate.zero_grad();
  gate.backward(x, training_ctx(), plan, {}, {}, dx);
  CHECK(gate.thresholds_grad().isZero(0.0f));
  const auto loss = moet::top_any_aux_loss(gate, plan, std::span<float>());
  CHECK(loss.load_balance == 0.0f);
  CHECK(loss.efficiency == 0.0f);
  gate.on_training_forward(x, plan);
  CHECK(gate.training_forwards() == 1);
}

}  // namespace test_grad_top_any
