// Activations and expert banks against naive double-precision implementations.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/activations.hpp"
#include "moet/concepts.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"

namespace test_experts {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;

// Closed forms written out independently of activations.hpp.
double silu_ref(double v) { return v / (1.0 + std::exp(-v)); }
double gelu_ref(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
double gelu_tanh_ref(double v) {
  const double pi = 3.14159265358979323846;
  return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (v + 0.044715 * v * v * v)));
}
double relu_ref(double v) { return v > 0.0 ? v : 0.0; }

template <class Act>
double act_ref(double v) {
  if constexpr (std::is_same_v<Act, moet::Silu>) return silu_ref(v);
  if constexpr (std::is_same_v<Act, moet::Gelu>) return gelu_ref(v);
  if constexpr (std::is_same_v<Act, moet::GeluTanh>) return gelu_tanh_ref(v);
  if constexpr (std::is_same_v<Act, moet::Relu>) return relu_ref(v);
}

template <class S>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(normal(gen));
  }
  return m;
}

// Naive GLU expert in double: one token row `x` (model_dim) -> (model_dim).
template <class Bank>
std::vector<double> naive_glu(const Bank& bank, Index e, const double* x) {
  using Act = typename Bank::Activation;
  const Index d = bank.model_dim();
  const Index f = bank.hidden_dim();
  const auto wg = bank.gate_weights(e);
  const auto wu = bank.up_weights(e);
  const auto wd = bank.down_weights(e);
  std::vector<double> h(static_cast<std::size_t>(f));
  for (Index j = 0; j < f; ++j) {
    double g = 0.0;
    double u = 0.0;
    for (Index i = 0; i < d; ++i) {
      g += x[i] * static_cast<double>(wg(i, j));
      u += x[i] * static_cast<double>(wu(i, j));
    }
    h[static_cast<std::size_t>(j)] = act_ref<Act>(g) * u;
  }
  std::vector<double> y(static_cast<std::size_t>(d), 0.0);
  for (Index c = 0; c < d; ++c) {
    for (Index j = 0; j < f; ++j) {
      y[static_cast<std::size_t>(c)] +=
          h[static_cast<std::size_t>(j)] * static_cast<double>(wd(j, c));
    }
  }
  return y;
}

// Naive FFN expert in double.
template <class Bank>
std::vector<double> naive_ffn(const Bank& bank, Index e, const double* x) {
  using Act = typename Bank::Activation;
  const Index d = bank.model_dim();
  const Index f = bank.hidden_dim();
  const auto w1 = bank.in_weights(e);
  const auto w2 = bank.out_weights(e);
  std::vector<double> h(static_cast<std::size_t>(f));
  for (Index j = 0; j < f; ++j) {
    double a = bank.has_bias() ? static_cast<double>(bank.in_bias(e)(j)) : 0.0;
    for (Index i = 0; i < d; ++i) a += x[i] * static_cast<double>(w1(i, j));
    h[static_cast<std::size_t>(j)] = act_ref<Act>(a);
  }
  std::vector<double> y(static_cast<std::size_t>(d));
  for (Index c = 0; c < d; ++c) {
    double a = bank.has_bias() ? static_cast<double>(bank.out_bias(e)(c)) : 0.0;
    for (Index j = 0; j < f; ++j)
      a += h[static_cast<std::size_t>(j)] * static_cast<double>(w2(j, c));
    y[static_cast<std::size_t>(c)] = a;
  }
  return y;
}

// Checks `got` (n, d) against `want` (n, d) in double: Frobenius-relative <= rel and every
// element within rel * (|want| + rms(want)).
template <class S>
void check_close(const moet::RowMatrix<S>& got, const Eigen::MatrixXd& want, double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const Eigen::MatrixXd g = got.template cast<double>();
  const double norm = want.norm();
  CHECK((g - want).norm() <= rel * norm);
  const double rms = want.size() > 0 ? norm / std::sqrt(static_cast<double>(want.size())) : 0.0;
  int bad = 0;
  for (Index i = 0; i < want.rows(); ++i) {
    for (Index j = 0; j < want.cols(); ++j) {
      if (!(std::abs(g(i, j) - want(i, j)) <= rel * (std::abs(want(i, j)) + rms))) ++bad;
    }
  }
  CHECK(bad == 0);
}

template <class Bank, class Naive>
void check_bank_against_naive(const Bank& bank, Index rows, std::uint32_t seed, Naive naive,
                              double rel) {
  using S = typename Bank::Scalar;
  const moet::RowMatrix<S> x = random_rows<S>(rows, bank.model_dim(), seed);
  const Eigen::MatrixXd xd = x.template cast<double>();
  typename Bank::Scratch scratch;
  for (Index e = 0; e < bank.num_experts(); ++e) {
    moet::RowMatrix<S> y(rows, bank.model_dim());
    y.setConstant(std::numeric_limits<S>::quiet_NaN());
    moet::Rows<S> y_ref(y);
    bank.forward(e, x, y_ref, scratch);
    Eigen::MatrixXd want(rows, bank.model_dim());
    for (Index t = 0; t < rows; ++t) {
      const Eigen::VectorXd xt = xd.row(t).transpose();
      const auto yt = naive(bank, e, xt.data());
      for (Index c = 0; c < bank.model_dim(); ++c) want(t, c) = yt[static_cast<std::size_t>(c)];
    }
    check_close(y, want, rel);
  }
}

}  // namespace

static_assert(moet::Experts<moet::SwiGluExperts<float>>);
static_assert(moet::Experts<moet::GeGluExperts<double>>);
static_assert(moet::Experts<moet::FfnExperts<float>>);
static_assert(moet::Experts<moet::ReluFfnExperts<double>>);
static_assert(!moet::Experts<int>);

TEST_CASE("Activations match their closed forms", "[experts][activations]") {
  for (double v = -8.0; v <= 8.0; v += 0.125) {
    CHECK(moet::Silu::apply(v) == Approx(silu_ref(v)).epsilon(1e-14).margin(1e-300));
    CHECK(moet::Gelu::apply(v) == Approx(gelu_ref(v)).epsilon(1e-14).margin(1e-300));
    CHECK(moet::GeluTanh::apply(v) == Approx(gelu_tanh_ref(v)).epsilon(1e-14).margin(1e-300));
    CHECK(moet::Relu::apply(v) == relu_ref(v));
    // float evaluation agrees with double to float precision.
    const auto vf = static_cast<float>(v);
    CHECK(moet::Silu::apply(vf) == Approx(silu_ref(v)).epsilon(1e-6).margin(1e-6));
    CHECK(moet::Gelu::apply(vf) == Approx(gelu_ref(v)).epsilon(1e-6).margin(1e-6));
  }
}

TEST_CASE("Gelu is the exact normal-CDF form at known values", "[experts][activations]") {
  // Phi(1) = 0.841344746068543, Phi(2) = 0.977249868051821 (standard normal CDF tables).
  CHECK(moet::Gelu::apply(1.0) == Approx(0.841344746068543).epsilon(1e-12));
  CHECK(moet::Gelu::apply(-1.0) == Approx(-(1.0 - 0.841344746068543)).epsilon(1e-12));
  CHECK(moet::Gelu::apply(2.0) == Approx(2.0 * 0.977249868051821).epsilon(1e-12));
  CHECK(moet::Gelu::apply(0.0) == 0.0);
  // The tanh form is an approximation: close to but not equal to the exact form.
  double max_diff = 0.0;
  for (double v = -6.0; v <= 6.0; v += 0.01) {
    max_diff = std::max(max_diff, std::abs(moet::Gelu::apply(v) - moet::GeluTanh::apply(v)));
  }
  CHECK(max_diff > 1e-5);
  CHECK(max_diff < 1e-3);
}

TEST_CASE("Silu stays finite for large arguments", "[experts][activations]") {
  CHECK(moet::Silu::apply(-1000.0f) == 0.0f);
  CHECK(moet::Silu::apply(1000.0f) == 1000.0f);
  CHECK(std::isfinite(moet::Silu::derivative(-1000.0f)));
  CHECK(moet::Silu::derivative(1000.0f) == 1.0f);
}

TEMPLATE_TEST_CASE("Activation derivatives match central finite differences",
                   "[experts][activations]", moet::Silu, moet::Gelu, moet::GeluTanh, moet::Relu) {
  const double h = 1e-6;
  for (double v = -5.0; v <= 5.0; v += 0.1875) {
    if (std::abs(v) < 1e-3) continue;  // Relu's kink
    const double fd = (TestType::apply(v + h) - TestType::apply(v - h)) / (2.0 * h);
    CHECK(TestType::derivative(v) == Approx(fd).epsilon(1e-6).margin(1e-8));
  }
}

TEST_CASE("Relu's derivative is 0 at the kink and below", "[experts][activations]") {
  CHECK(moet::Relu::derivative(0.0) == 0.0);
  CHECK(moet::Relu::derivative(-2.0f) == 0.0f);
  CHECK(moet::Relu::derivative(3.0f) == 1.0f);
}

TEST_CASE("apply_activation applies the policy to every entry", "[experts][activations]") {
  moet::RowMatrix<float> m = random_rows<float>(5, 13, 7u, 2.0);
  const moet::RowMatrix<float> before = m;
  moet::apply_activation<moet::Silu>(m);
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) CHECK(m(i, j) == moet::Silu::apply(before(i, j)));
  }
}

TEST_CASE("SwiGLU experts equal a naive double implementation", "[experts][glu]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  const auto rows = GENERATE(Index{1}, Index{5}, Index{70});
  moet::SwiGluExperts<float> bank(
      {.model_dim = 24, .hidden_dim = 40, .num_experts = 3, .init_seed = seed});
  check_bank_against_naive(
      bank, rows, seed + 100u,
      [](const auto& b, Index e, const double* x) { return naive_glu(b, e, x); }, 1e-5);
}

TEST_CASE("GeGLU experts equal a naive double implementation", "[experts][glu]") {
  const auto seed = GENERATE(4u, 5u);
  moet::GeGluExperts<float> bank(
      {.model_dim = 16, .hidden_dim = 48, .num_experts = 2, .init_seed = seed});
  check_bank_against_naive(
      bank, 33, seed + 100u,
      [](const auto& b, Index e, const double* x) { return naive_glu(b, e, x); }, 1e-5);
  moet::GeGluExperts<double> bank_d(
      {.model_dim = 16, .hidden_dim = 48, .num_experts = 2, .init_seed = seed});
  check_bank_against_naive(
      bank_d, 9, seed + 200u,
      [](const auto& b, Index e, const double* x) { return naive_glu(b, e, x); }, 1e-12);
}

TEST_CASE("FFN experts with biases equal a naive double implementation", "[experts][ffn]") {
  const auto seed = GENERATE(1u, 2u, 3u);
  moet::GeluFfnExperts<float> bank(
      {.model_dim = 20, .hidden_dim = 36, .num_experts = 3, .init_seed = seed});
  REQUIRE(bank.has_bias());
  // The biases start at 0; make them non-zero so that they are exercised.
  bank.edit().in_bias_stack() = random_rows<float>(3, 36, seed + 7u, 0.5);
  bank.edit().out_bias_stack() = random_rows<float>(3, 20, seed + 8u, 0.5);
  check_bank_against_naive(
      bank, 45, seed + 100u,
      [](const auto& b, Index e, const double* x) { return naive_ffn(b, e, x); }, 1e-5);
}

TEST_CASE("FFN experts without biases equal a naive double implementation", "[experts][ffn]") {
  const auto seed = GENERATE(1u, 2u);
  moet::ReluFfnExperts<float> bank(
      {.model_dim = 12, .hidden_dim = 30, .num_experts = 4, .bias = false, .init_seed = seed});
  CHECK_FALSE(bank.has_bias());
  CHECK(bank.in_bias_stack().rows() == 0);
  check_bank_against_naive(
      bank, 17, seed + 100u,
      [](const auto& b, Index e, const double* x) { return naive_ffn(b, e, x); }, 1e-5);
}

TEST_CASE("Expert weight views are blocks of the stacked matrices", "[experts][glu][ffn]") {
  moet::SwiGluExperts<float> glu({.model_dim = 4, .hidden_dim = 6, .num_experts = 3});
  CHECK(glu.gate_stack().rows() == 12);
  CHECK(glu.gate_stack().cols() == 6);
  CHECK(glu.down_stack().rows() == 18);
  CHECK(glu.down_stack().cols() == 4);
  for (Index e = 0; e < 3; ++e) {
    CHECK(glu.gate_weights(e).rows() == 4);
    CHECK(glu.gate_weights(e).cols() == 6);
    CHECK(glu.down_weights(e).rows() == 6);
    CHECK(glu.down_weights(e).cols() == 4);
    CHECK(glu.gate_weights(e) == glu.gate_stack().middleRows(e * 4, 4));
    CHECK(glu.up_weights(e) == glu.up_stack().middleRows(e * 4, 4));
    CHECK(glu.down_weights(e) == glu.down_stack().middleRows(e * 6, 6));
  }
  glu.edit().up_weights(1)(2, 3) = 42.0f;
  CHECK(glu.up_stack()(4 + 2, 3) == 42.0f);

  moet::FfnExperts<double> ffn({.model_dim = 3, .hidden_dim = 5, .num_experts = 2});
  {
    auto edit = ffn.edit();
    edit.in_bias(1)(4) = 7.0;
    edit.out_bias(0)(2) = -1.0;
  }
  CHECK(ffn.in_bias_stack()(1, 4) == 7.0);
  CHECK(ffn.out_bias_stack()(0, 2) == -1.0);
  CHECK(ffn.out_weights(1) == ffn.out_weights_stack().middleRows(5, 5));
}

TEST_CASE("Expert initialisation is deterministic with fan-in scaling", "[experts][glu][ffn]") {
  moet::SwiGluExperts<double> a(
      {.model_dim = 64, .hidden_dim = 256, .num_experts = 4, .init_seed = 9});
  moet::SwiGluExperts<double> b(
      {.model_dim = 64, .hidden_dim = 256, .num_experts = 4, .init_seed = 9});
  moet::SwiGluExperts<double> c(
      {.model_dim = 64, .hidden_dim = 256, .num_experts = 4, .init_seed = 10});
  CHECK(a.gate_stack() == b.gate_stack());
  CHECK(a.down_stack() == b.down_stack());
  CHECK(a.gate_stack() != c.gate_stack());
  CHECK(a.gate_stack() != a.up_stack());
  auto sample_std = [](const moet::RowMatrix<double>& m) {
    const double mean = m.mean();
    return std::sqrt((m.array() - mean).square().mean());
  };
  CHECK(sample_std(a.gate_stack()) == Approx(1.0 / 8.0).epsilon(0.03));
  CHECK(sample_std(a.up_stack()) == Approx(1.0 / 8.0).epsilon(0.03));
  CHECK(sample_std(a.down_stack()) == Approx(1.0 / 16.0).epsilon(0.03));
  moet::FfnExperts<double> ffn({.model_dim = 64, .hidden_dim = 256, .num_experts = 4});
  CHECK(sample_std(ffn.in_weights_stack()) == Approx(1.0 / 8.0).epsilon(0.03));
  CHECK(sample_std(ffn.out_weights_stack()) == Approx(1.0 / 16.0).epsilon(0.03));
  CHECK(ffn.in_bias_stack().isZero(0.0));
  CHECK(ffn.out_bias_stack().isZero(0.0));
}

TEST_CASE("Expert banks count parameters and FLOPs per token", "[experts]") {
  moet::SwiGluExperts<float> glu({.model_dim = 8, .hidden_dim = 20, .num_experts = 2});
  CHECK(glu.params_per_expert() == 3 * 8 * 20);
  CHECK(glu.flops_per_token() == Approx(2.0 * 3 * 8 * 20));
  moet::FfnExperts<float> ffn({.model_dim = 8, .hidden_dim = 20, .num_experts = 2});
  CHECK(ffn.params_per_expert() == 2 * 8 * 20 + 20 + 8);
  CHECK(ffn.flops_per_token() == Approx(2.0 * 2 * 8 * 20));
  moet::FfnExperts<float> nobias(
      {.model_dim = 8, .hidden_dim = 20, .num_experts = 2, .bias = false});
  CHECK(nobias.params_per_expert() == 2 * 8 * 20);
}

TEST_CASE("Expert banks reject empty shapes", "[experts][errors]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_AS(moet::SwiGluExperts<float>({.model_dim = 0, .hidden_dim = 8, .num_experts = 2}),
                  moet::Error);
  CHECK_THROWS_WITH(moet::SwiGluExperts<float>({.model_dim = 0, .hidden_dim = 8, .num_experts = 2}),
                    Contains("[moet::GluExperts]") && Contains("(0, 8, 2)"));
  CHECK_THROWS_WITH(moet::FfnExperts<float>({.model_dim = 4, .hidden_dim = 8, .num_experts = 0}),
                    Contains("[moet::FfnExperts]") && Contains("(4, 8, 0)"));
  CHECK_THROWS_WITH(moet::FfnExperts<float>({.model_dim = 4, .hidden_dim = -1, .num_experts = 3}),
                    Contains("[moet::FfnExperts]") && Contains("(4, -1, 3)"));
}

TEST_CASE("Expert forward on a block equals forward row by row", "[experts][glu]") {
  moet::SwiGluExperts<double> bank({.model_dim = 10, .hidden_dim = 14, .num_experts = 2});
  const moet::RowMatrix<double> x = random_rows<double>(9, 10, 3u);
  moet::SwiGluExperts<double>::Scratch scratch;
  moet::RowMatrix<double> block(9, 10);
  moet::Rows<double> block_ref(block);
  bank.forward(1, x, block_ref, scratch);
  for (Index t = 0; t < 9; ++t) {
    moet::RowMatrix<double> row(1, 10);
    moet::Rows<double> row_ref(row);
    bank.forward(1, x.middleRows(t, 1), row_ref, scratch);
    CHECK((row - block.middleRows(t, 1)).norm() <= 1e-12 * block.middleRows(t, 1).norm());
  }
  // Zero rows is a no-op.
  moet::RowMatrix<double> empty(0, 10);
  moet::Rows<double> empty_ref(empty);
  bank.forward(0, x.topRows(0), empty_ref, scratch);
  CHECK(empty.rows() == 0);
}

}  // namespace test_experts
