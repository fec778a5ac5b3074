// Optimisers and gradient utilities (train/optim.hpp) against hand-computed steps and an
// independent scalar reference.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/train/optim.hpp"

namespace test_optim {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using moet::ParamMap;
using moet::RowMatrix;

// A module with two parameter tensors, a (2, 3) matrix and a (1, 4) vector.
struct TwoTensors {
  RowMatrix<double> w = RowMatrix<double>::Zero(2, 3);
  RowMatrix<double> b = RowMatrix<double>::Zero(1, 4);
  RowMatrix<double> gw = RowMatrix<double>::Zero(2, 3);
  RowMatrix<double> gb = RowMatrix<double>::Zero(1, 4);
  int changed = 0;
  bool grow = false;  // visit a third tensor (to test the shape checks)
  RowMatrix<double> extra = RowMatrix<double>::Zero(1, 1);
  RowMatrix<double> gextra = RowMatrix<double>::Zero(1, 1);

  void zero_grad() {
    gw.setZero();
    gb.setZero();
  }
  template <class F>
  void visit_parameters(F&& f) {
    f("w", ParamMap<double>(w.data(), w.rows(), w.cols()),
      ParamMap<double>(gw.data(), gw.rows(), gw.cols()));
    f("b", ParamMap<double>(b.data(), b.rows(), b.cols()),
      ParamMap<double>(gb.data(), gb.rows(), gb.cols()));
    if (grow) {
      f("extra", ParamMap<double>(extra.data(), 1, 1), ParamMap<double>(gextra.data(), 1, 1));
    }
  }
  void parameters_changed() { ++changed; }
};

// One parameter, one gradient: the scalar case used for hand computations.
struct Scalar1 {
  double p = 1.0;
  double g = 0.0;
  void zero_grad() { g = 0.0; }
  template <class F>
  void visit_parameters(F&& f) {
    f("p", ParamMap<double>(&p, 1, 1), ParamMap<double>(&g, 1, 1));
  }
};

}  // namespace

TEST_CASE("Sgd with momentum matches a hand-computed two-step trajectory", "[train][optim]") {
  // p0 = 1, constant gradient 2, lr 0.1, momentum 0.9:
  // v1 = 2, p1 = 1 - 0.2 = 0.8; v2 = 0.9 * 2 + 2 = 3.8, p2 = 0.8 - 0.38 = 0.42.
  Scalar1 m;
  moet::Sgd<double> opt({.lr = 0.1, .momentum = 0.9});
  m.g = 2.0;
  opt.step(m);
  CHECK(m.p == Approx(0.8).epsilon(1e-15));
  opt.step(m);
  CHECK(m.p == Approx(0.42).epsilon(1e-14));
  CHECK(opt.steps() == 2);
}

TEST_CASE("Sgd Nesterov and coupled weight decay follow PyTorch's formulas", "[train][optim]") {
  SECTION("nesterov: d = g + mu v") {
    // v1 = 2, d = 2 + 0.9 * 2 = 3.8, p1 = 1 - 0.38 = 0.62.
    Scalar1 m;
    moet::Sgd<double> opt({.lr = 0.1, .momentum = 0.9, .nesterov = true});
    m.g = 2.0;
    opt.step(m);
    CHECK(m.p == Approx(0.62).epsilon(1e-14));
  }
  SECTION("weight decay is added to the gradient") {
    // g' = 2 + 0.5 * 1 = 2.5, p1 = 1 - 0.25 = 0.75.
    Scalar1 m;
    moet::Sgd<double> opt({.lr = 0.1, .weight_decay = 0.5});
    m.g = 2.0;
    opt.step(m);
    CHECK(m.p == Approx(0.75).epsilon(1e-15));
  }
}

TEST_CASE("AdamW matches an independent scalar reference over several steps", "[train][optim]") {
  const double lr = 0.05, b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.1;
  TwoTensors m;
  for (Index i = 0; i < m.w.size(); ++i) m.w.data()[i] = 0.3 * static_cast<double>(i) - 0.7;
  for (Index i = 0; i < m.b.size(); ++i) m.b.data()[i] = 1.0 - 0.4 * static_cast<double>(i);
  // Reference state, flattened in visiting order.
  std::vector<double> p, mm, vv;
  for (Index i = 0; i < m.w.size(); ++i) p.push_back(m.w.data()[i]);
  for (Index i = 0; i < m.b.size(); ++i) p.push_back(m.b.data()[i]);
  mm.assign(p.size(), 0.0);
  vv.assign(p.size(), 0.0);

  moet::AdamW<double> opt({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  for (int step = 1; step <= 5; ++step) {
    // Gradient of 0.5 * sum (p - c)^2 with c = 0.25 * index, plus a step-dependent wiggle.
    std::vector<double> g(p.size());
    for (std::size_t i = 0; i < p.size(); ++i) {
      g[i] = p[i] - 0.25 * static_cast<double>(i) + 0.01 * step;
    }
    for (Index i = 0; i < m.w.size(); ++i) m.gw.data()[i] = g[static_cast<std::size_t>(i)];
    for (Index i = 0; i < m.b.size(); ++i) {
      m.gb.data()[i] = g[static_cast<std::size_t>(m.w.size() + i)];
    }
    opt.step(m);
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      mm[i] = b1 * mm[i] + (1 - b1) * g[i];
      vv[i] = b2 * vv[i] + (1 - b2) * g[i] * g[i];
      const double mhat = mm[i] / (1 - std::pow(b1, step));
      const double vhat = vv[i] / (1 - std::pow(b2, step));
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
    for (Index i = 0; i < m.w.size(); ++i) {
      CHECK(m.w.data()[i] == Approx(p[static_cast<std::size_t>(i)]).epsilon(1e-12));
    }
    for (Index i = 0; i < m.b.size(); ++i) {
      CHECK(m.b.data()[i] == Approx(p[static_cast<std::size_t>(m.w.size() + i)]).epsilon(1e-12));
    }
  }
  CHECK(m.changed == 5);  // the parameters_changed hook ran after every step
}

TEST_CASE("AdamW's first step moves each parameter by lr against its gradient's sign",
          "[train][optim]") {
  // With zero decay, m1 / (1 - b1) = g and v1 / (1 - b2) = g^2: the step is lr * g / (|g| + eps).
  Scalar1 m;
  moet::AdamW<double> opt({.lr = 0.01, .eps = 1e-12, .weight_decay = 0.0});
  m.g = -3.0;
  opt.step(m);
  CHECK(m.p == Approx(1.01).epsilon(1e-12));
}

TEST_CASE("AdamW minimises a quadratic", "[train][optim]") {
  TwoTensors m;
  moet::AdamW<double> opt({.lr = 0.05, .weight_decay = 0.0});
  for (int step = 0; step < 600; ++step) {
    m.zero_grad();
    for (Index i = 0; i < m.w.size(); ++i) m.gw.data()[i] = m.w.data()[i] - 2.0;
    for (Index i = 0; i < m.b.size(); ++i) m.gb.data()[i] = m.b.data()[i] + 1.0;
    opt.step(m);
  }
  CHECK((m.w.array() - 2.0).abs().maxCoeff() < 1e-3);
  CHECK((m.b.array() + 1.0).abs().maxCoeff() < 1e-3);
}

TEST_CASE("grad_norm and clip_grad_norm use the global L2 norm", "[train][optim]") {
  TwoTensors m;
  m.gw(0, 0) = 3.0;
  m.gb(0, 3) = 4.0;
  CHECK(moet::grad_norm<double>(m) == Approx(5.0));
  CHECK(moet::clip_grad_norm<double>(m, 10.0) == Approx(5.0));
  CHECK(m.gw(0, 0) == 3.0);  // below the bound: untouched
  CHECK(moet::clip_grad_norm<double>(m, 1.0) == Approx(5.0));
  CHECK(m.gw(0, 0) == Approx(0.6));
  CHECK(m.gb(0, 3) == Approx(0.8));
  CHECK(moet::grad_norm<double>(m) == Approx(1.0));
}

TEST_CASE("Optimisers reject bad options and a module whose parameters changed",
          "[train][optim][errors]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(moet::Sgd<double>({.lr = 0.0}), Contains("[moet::Sgd] lr must be positive"));
  CHECK_THROWS_WITH(moet::Sgd<double>({.lr = 0.1, .momentum = 1.0}),
                    Contains("momentum must be in [0, 1), got 1"));
  CHECK_THROWS_WITH(moet::Sgd<double>({.lr = 0.1, .nesterov = true}),
                    Contains("nesterov needs momentum > 0"));
  CHECK_THROWS_WITH(moet::AdamW<double>({.beta2 = 1.0}),
                    Contains("[moet::AdamW] beta2 must be in [0, 1), got 1"));
  CHECK_THROWS_WITH(moet::AdamW<double>({.eps = 0.0}), Contains("eps must be positive"));
  CHECK_THROWS_WITH(moet::AdamW<double>({.weight_decay = -1.0}),
                    Contains("weight_decay must be >= 0"));
  {
    TwoTensors m;
    CHECK_THROWS_WITH(moet::clip_grad_norm<double>(m, 0.0), Contains("[moet::clip_grad_norm]"));
    m.gw(1, 1) = std::nan("");
    CHECK_THROWS_WITH(moet::clip_grad_norm<double>(m, 1.0), Contains("NaN or Inf"));
  }
  {
    TwoTensors m;
    moet::AdamW<double> opt({});
    opt.step(m);
    m.grow = true;
    CHECK_THROWS_WITH(opt.step(m), Contains("[moet::AdamW] the module now visits more parameter "
                                            "tensors (3) than at the first step (2)"));
  }
  {
    TwoTensors m;
    moet::Sgd<double> opt({.lr = 0.1, .momentum = 0.5});
    opt.step(m);
    m.b.resize(1, 5);
    m.gb.setZero(1, 5);
    CHECK_THROWS_WITH(opt.step(m),
                      Contains("parameter 'b' changed shape from (1, 4) to (1, 5)"));
  }
}

namespace {

// One large float tensor (several elementwise blocks) with a fixed pseudo-random gradient.
struct BigTensor {
  RowMatrix<float> w;
  RowMatrix<float> g;
  explicit BigTensor(Index n) : w(3, n), g(3, n) {
    for (Index i = 0; i < w.size(); ++i) {
      w.data()[i] = std::sin(0.37f * static_cast<float>(i));
      g.data()[i] = std::cos(0.11f * static_cast<float>(i)) * 1e-2f;
    }
  }
  template <class F>
  void visit_parameters(F&& f) {
    f("w", ParamMap<float>(w.data(), w.rows(), w.cols()),
      ParamMap<float>(g.data(), g.rows(), g.cols()));
  }
};

template <class Opt>
RowMatrix<float> three_steps(int threads, typename Opt::Options options) {
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  BigTensor m(40000);  // 120k values: 8 elementwise blocks
  Opt opt(options);
  for (int s = 0; s < 3; ++s) opt.step(m);
  moet::set_num_threads(saved);
  return m.w;
}

}  // namespace

TEST_CASE("Optimiser steps are bit-identical for 1 and 2 threads", "[train][optim][parallel]") {
  const auto a1 = three_steps<moet::AdamW<float>>(1, {.lr = 1e-2});
  const auto a2 = three_steps<moet::AdamW<float>>(2, {.lr = 1e-2});
  CHECK(std::memcmp(a1.data(), a2.data(), sizeof(float) * static_cast<std::size_t>(a1.size())) == 0);
  CHECK((a1.array() != BigTensor(40000).w.array()).any());  // it moved
  const auto s1 = three_steps<moet::Sgd<float>>(1, {.lr = 1e-1, .momentum = 0.9, .nesterov = true});
  const auto s2 = three_steps<moet::Sgd<float>>(2, {.lr = 1e-1, .momentum = 0.9, .nesterov = true});
  CHECK(std::memcmp(s1.data(), s2.data(), sizeof(float) * static_cast<std::size_t>(s1.size())) == 0);
}

TEST_CASE("AdamW's float kernel matches a double reference on every kernel level",
          "[train][optim][kernel]") {
  // Coefficients of step 3 (bias corrections well away from 1) and inputs spanning signs,
  // zeros and magnitudes; 1000 + 13 values, so every level has a scalar tail.
  const double lr = 1e-3, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  const double c1 = 1.0 - std::pow(b1, 3), c2 = 1.0 - std::pow(b2, 3);
  const moet::detail::AdamWCoefficients<float> c{.decay = static_cast<float>(1.0 - lr * wd),
                                                 .b1 = 0.9f,
                                                 .one_minus_b1 = 1.0f - 0.9f,
                                                 .b2 = 0.999f,
                                                 .one_minus_b2 = 1.0f - 0.999f,
                                                 .c1 = static_cast<float>(c1),
                                                 .c2 = static_cast<float>(c2),
                                                 .lr = static_cast<float>(lr),
                                                 .eps = static_cast<float>(eps)};
  const std::size_t n = 1013;
  std::vector<float> p0(n), g(n), m0(n), v0(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto x = static_cast<float>(i);
    p0[i] = std::sin(0.37f * x) * (i % 7 == 0 ? 100.0f : 1.0f);
    g[i] =
        i % 11 == 0 ? 0.0f : std::cos(0.11f * x) * std::pow(10.0f, static_cast<float>(i % 9) - 6);
    m0[i] = 0.3f * g[i] + 1e-4f * std::sin(x);
    v0[i] = g[i] * g[i] * 0.5f + (i % 5 == 0 ? 0.0f : 1e-9f);
  }
  for (const moet::KernelIsa isa : moet::kAllKernelIsas) {
    if (!moet::kernel_isa_supported(isa)) continue;
    INFO("level " << moet::kernel_isa_name(isa));
    std::vector<float> p = p0, m = m0, v = v0;
    moet::detail::adamw_update(c, p.data(), g.data(), m.data(), v.data(), static_cast<Index>(n),
                               isa);
    double worst = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      // The same step in double from the same float inputs and coefficients.
      const double gi = g[i];
      const double mr = double{c.b1} * m0[i] + double{c.one_minus_b1} * gi;
      const double vr = double{c.b2} * v0[i] + double{c.one_minus_b2} * gi * gi;
      const double step =
          double{c.lr} * (mr / double{c.c1}) / (std::sqrt(vr / double{c.c2}) + double{c.eps});
      const double pr = double{p0[i]} * double{c.decay} - step;
      // A few roundings each: 4e-7 relative to the magnitudes involved.
      REQUIRE(std::abs(m[i] - mr) <= 4e-7 * (std::abs(m0[i]) + std::abs(gi)));
      REQUIRE(std::abs(v[i] - vr) <= 4e-7 * (std::abs(v0[i]) + gi * gi));
      const double scale = std::abs(double{p0[i]}) + std::abs(step);
      REQUIRE(std::abs(p[i] - pr) <= 4e-7 * scale);
      worst = std::max(worst, std::abs(p[i] - pr) / scale);
    }
    WARN("AdamW kernel, " << moet::kernel_isa_name(isa) << ": worst error " << worst
                          << " of |p| + |step|");
  }
}

}  // namespace test_optim
