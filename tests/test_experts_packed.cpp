// The expert banks on packed weights (detail/gemm.hpp): float SwiGLU, GeGLU and FFN banks against
// naive double-precision experts written here, row bit-identity inside any block, the stale /
// parameters_changed() protocol, and the packed banks through GroupedDispatch and MoELayer
// against ReferenceDispatch at 1 and 2 threads. Built twice: portable (tests/) and with
// -march=native (test_experts_packed_native, bench/kernels.cmake), so the AVX2 / AVX-512 kernels
// are covered too.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/train/optim.hpp"

namespace test_experts_packed {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using Matrix = moet::RowMatrix<float>;
using MatrixD = moet::RowMatrix<double>;

Matrix random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = normal(gen);
  }
  return m;
}

// Written out independently of activations.hpp and the kernels.
double silu_ref(double v) { return v / (1.0 + std::exp(-v)); }
double gelu_ref(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// (n, K) x (K, N) in double loops.
MatrixD naive(const MatrixD& a, const MatrixD& b) {
  MatrixD c = MatrixD::Zero(a.rows(), b.cols());
  for (Index i = 0; i < a.rows(); ++i) {
    for (Index k = 0; k < a.cols(); ++k) {
      for (Index j = 0; j < b.cols(); ++j) c(i, j) += a(i, k) * b(k, j);
    }
  }
  return c;
}

// Expert e of a GLU bank in double: (act(x Wg) * (x Wu)) Wd.
template <class Bank, class Act>
MatrixD glu_reference(const Bank& bank, Index e, const Matrix& x, Act act) {
  const MatrixD xd = x.cast<double>();
  MatrixD g = naive(xd, bank.gate_weights(e).template cast<double>());
  const MatrixD u = naive(xd, bank.up_weights(e).template cast<double>());
  for (Index i = 0; i < g.rows(); ++i) {
    for (Index j = 0; j < g.cols(); ++j) g(i, j) = act(g(i, j)) * u(i, j);
  }
  return naive(g, bank.down_weights(e).template cast<double>());
}

// Expert e of an FFN bank in double: gelu(x W1 + b1) W2 + b2.
MatrixD ffn_reference(const moet::FfnExperts<float>& bank, Index e, const Matrix& x) {
  MatrixD h = naive(x.cast<double>(), bank.in_weights(e).cast<double>());
  for (Index i = 0; i < h.rows(); ++i) {
    for (Index j = 0; j < h.cols(); ++j) {
      const double b = bank.has_bias() ? static_cast<double>(bank.in_bias(e)(j)) : 0.0;
      h(i, j) = gelu_ref(h(i, j) + b);
    }
  }
  MatrixD y = naive(h, bank.out_weights(e).cast<double>());
  for (Index i = 0; i < y.rows(); ++i) {
    for (Index j = 0; j < y.cols(); ++j) {
      if (bank.has_bias()) y(i, j) += static_cast<double>(bank.out_bias(e)(j));
    }
  }
  return y;
}

// |got - want| <= rel * (|want| + rms(want)) everywhere.
void check_close(const Matrix& got, const MatrixD& want, double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double rms =
      want.size() > 0 ? want.norm() / std::sqrt(static_cast<double>(want.size())) : 0.0;
  int bad = 0;
  double worst = 0.0;
  for (Index i = 0; i < want.rows(); ++i) {
    for (Index j = 0; j < want.cols(); ++j) {
      const double err = std::abs(static_cast<double>(got(i, j)) - want(i, j));
      worst = std::max(worst, err / (std::abs(want(i, j)) + rms));
      if (!(err <= rel * (std::abs(want(i, j)) + rms))) ++bad;
    }
  }
  INFO("worst scaled error " << worst);
  CHECK(bad == 0);
}

bool bit_identical(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

template <class Bank>
Matrix run_expert(const Bank& bank, Index e, const Matrix& x) {
  typename Bank::Scratch scratch;
  Matrix y(x.rows(), bank.model_dim());
  y.setConstant(std::numeric_limits<float>::quiet_NaN());
  bank.forward(e, x, y, scratch);
  return y;
}

// Restores the thread count when a test ends.
struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

// Shapes that are not multiples of any panel width, and block sizes around the few-row and
// row-group limits.
struct Shape {
  Index d;
  Index f;
};
constexpr Shape kShapes[] = {{16, 32}, {13, 37}, {40, 72}, {70, 300}};
constexpr Index kRows[] = {1, 2, 5, 8, 9, 17, 40};

}  // namespace

TEST_CASE("Packed SwiGLU and GeGLU float experts equal a double-precision expert",
          "[experts][packed][glu]") {
  for (const Shape s : kShapes) {
    const moet::SwiGluExperts<float> swiglu(
        {.model_dim = s.d, .hidden_dim = s.f, .num_experts = 3, .init_seed = 5});
    const moet::GeGluExperts<float> geglu(
        {.model_dim = s.d, .hidden_dim = s.f, .num_experts = 2, .init_seed = 6});
    REQUIRE(swiglu.uses_packed_kernels());
    REQUIRE(geglu.uses_packed_kernels());
    for (const Index n : kRows) {
      INFO("d " << s.d << " f " << s.f << " n " << n << " kernels "
                << moet::kernel_isa_name(moet::kernel_isa()));
      const Matrix x = random_rows(n, s.d, static_cast<std::uint32_t>(n + s.f));
      check_close(run_expert(swiglu, 2, x), glu_reference(swiglu, 2, x, silu_ref), 2e-5);
      check_close(run_expert(geglu, 1, x), glu_reference(geglu, 1, x, gelu_ref), 2e-5);
    }
  }
}

TEST_CASE("Packed FFN float experts equal a double-precision expert", "[experts][packed][ffn]") {
  for (const Shape s : kShapes) {
    moet::FfnExperts<float> bank(
        {.model_dim = s.d, .hidden_dim = s.f, .num_experts = 2, .init_seed = 7});
    // Non-zero biases (initialised to 0): biases are read in place, no repacking needed.
    bank.edit().in_bias_stack() = random_rows(2, s.f, 11u);
    bank.edit().out_bias_stack() = random_rows(2, s.d, 12u);
    REQUIRE(bank.uses_packed_kernels());
    for (const Index n : kRows) {
      INFO("d " << s.d << " f " << s.f << " n " << n);
      const Matrix x = random_rows(n, s.d, static_cast<std::uint32_t>(3 * n + s.d));
      check_close(run_expert(bank, 1, x), ffn_reference(bank, 1, x), 2e-5);
    }
  }
}

TEST_CASE("A packed expert's row is bit-identical alone and inside any block",
          "[experts][packed]") {
  const moet::SwiGluExperts<float> glu(
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 2, .init_seed = 3});
  const moet::FfnExperts<float> ffn(
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 2, .init_seed = 4});
  const Matrix x = random_rows(150, 40, 9u);  // > one 144-row block
  const Matrix glu_block = run_expert(glu, 1, x);
  const Matrix ffn_block = run_expert(ffn, 0, x);
  for (const Index t : {Index{0}, Index{7}, Index{63}, Index{149}}) {
    const Matrix row = x.middleRows(t, 1);
    CHECK(bit_identical(run_expert(glu, 1, row), glu_block.middleRows(t, 1)));
    CHECK(bit_identical(run_expert(ffn, 0, row), ffn_block.middleRows(t, 1)));
  }
}

TEST_CASE("edit() repacks when it ends; visit_parameters stops forward until parameters_changed",
          "[experts][packed][stale]") {
  moet::SwiGluExperts<float> bank({.model_dim = 13, .hidden_dim = 37, .num_experts = 2});
  const Matrix x = random_rows(6, 13, 21u);
  const Matrix before = run_expert(bank, 1, x);

  // An edit: forward refuses to run while it is open, and the kernels see the change after.
  {
    auto edit = bank.edit();
    edit.gate_weights(1)(3, 5) += 0.75f;
    edit.down_stack()(37 + 2, 4) -= 0.5f;  // expert 1's down block starts at row hidden_dim
    CHECK_FALSE(bank.uses_packed_kernels());
    CHECK_THROWS_WITH(run_expert(bank, 1, x), Catch::Contains("[moet::GluExperts] forward") &&
                                                  Catch::Contains("edit() of this bank is open"));
  }
  REQUIRE(bank.uses_packed_kernels());
  const Matrix edited = run_expert(bank, 1, x);
  check_close(edited, glu_reference(bank, 1, x, silu_ref), 2e-5);
  CHECK_FALSE(bit_identical(edited, before));

  // The optimisers' protocol: visit_parameters hands the stacks out, forward throws (it never
  // falls back to the slower Eigen products) until parameters_changed repacks.
  bank.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name == "up") value(0, 0) = 2.0f;
      });
  CHECK_FALSE(bank.uses_packed_kernels());
  CHECK_THROWS_WITH(run_expert(bank, 0, x), Catch::Contains("packed weights are stale") &&
                                                Catch::Contains("parameters_changed()"));
  moet::notify_parameters_changed(bank);
  CHECK(bank.uses_packed_kernels());
  check_close(run_expert(bank, 0, x), glu_reference(bank, 0, x, silu_ref), 2e-5);

  moet::FfnExperts<float> ffn({.model_dim = 13, .hidden_dim = 37, .num_experts = 2});
  ffn.edit().out_weights(0)(1, 1) = 3.0f;
  CHECK(ffn.uses_packed_kernels());
  CHECK(ffn.out_weights(0)(1, 1) == 3.0f);
  check_close(run_expert(ffn, 0, x), ffn_reference(ffn, 0, x), 2e-5);
}

// forward_train on the packed kernels (float and bf16 copies): its output has forward's bits,
// its cache holds the pre-activations (against double products of the float weights; bf16
// rounds the operands, hence its bound), and a stale copy falls back to the float weights.
template <class Bank, class Pre>
void check_forward_train(const Bank& bank, Index e, const Matrix& x, double rel, Pre pre) {
  typename Bank::Scratch scratch;
  Matrix y(x.rows(), bank.model_dim());
  Matrix cache(x.rows(), bank.cache_width());
  y.setConstant(std::numeric_limits<float>::quiet_NaN());
  cache.setConstant(std::numeric_limits<float>::quiet_NaN());
  bank.forward_train(e, x, y, cache, scratch);
  CHECK(bit_identical(y, run_expert(bank, e, x)));
  check_close(cache, pre(bank, e, x), rel);
}

// [x Wg | x Wu] in double.
template <class Bank>
MatrixD glu_pre(const Bank& bank, Index e, const Matrix& x) {
  const MatrixD xd = x.cast<double>();
  MatrixD c(x.rows(), 2 * bank.hidden_dim());
  c << naive(xd, bank.gate_weights(e).template cast<double>()),
      naive(xd, bank.up_weights(e).template cast<double>());
  return c;
}

// x W1 + b1 in double.
MatrixD ffn_pre(const moet::FfnExperts<float>& bank, Index e, const Matrix& x) {
  MatrixD h = naive(x.cast<double>(), bank.in_weights(e).cast<double>());
  for (Index i = 0; i < h.rows(); ++i) h.row(i) += bank.in_bias(e).cast<double>();
  return h;
}

TEST_CASE("forward_train runs the packed kernels: forward's output bits, the pre-activations",
          "[experts][packed][train]") {
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const double rel = format == moet::WeightFormat::kF32 ? 2e-5 : 3e-2;
  INFO("weights " << moet::weight_format_name(format) << " kernels "
                  << moet::kernel_isa_name(moet::kernel_isa()));
  for (const Shape s : kShapes) {
    const moet::SwiGluExperts<float> swiglu({.model_dim = s.d,
                                             .hidden_dim = s.f,
                                             .num_experts = 3,
                                             .init_seed = 5,
                                             .weight_format = format});
    const moet::GeGluExperts<float> geglu({.model_dim = s.d,
                                           .hidden_dim = s.f,
                                           .num_experts = 2,
                                           .init_seed = 6,
                                           .weight_format = format});
    moet::FfnExperts<float> ffn({.model_dim = s.d,
                                 .hidden_dim = s.f,
                                 .num_experts = 2,
                                 .init_seed = 7,
                                 .weight_format = format});
    ffn.edit().in_bias_stack() = random_rows(2, s.f, 11u);
    ffn.edit().out_bias_stack() = random_rows(2, s.d, 12u);
    for (const Index n : kRows) {
      INFO("d " << s.d << " f " << s.f << " n " << n);
      const Matrix x = random_rows(n, s.d, static_cast<std::uint32_t>(n + 2 * s.f));
      check_forward_train(swiglu, 2, x, rel, glu_pre<moet::SwiGluExperts<float>>);
      check_forward_train(geglu, 1, x, rel, glu_pre<moet::GeGluExperts<float>>);
      check_forward_train(ffn, 1, x, rel, ffn_pre);
    }
  }

  // A stale copy: the Eigen products on the float weights, which already hold the change.
  moet::SwiGluExperts<float> bank(
      {.model_dim = 13, .hidden_dim = 37, .num_experts = 2, .weight_format = format});
  bank.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name == "gate") value(0, 0) = 2.0f;
      });
  REQUIRE_FALSE(bank.uses_packed_kernels());
  const Matrix x = random_rows(5, 13, 23u);
  moet::SwiGluExperts<float>::Scratch scratch;
  Matrix y(5, 13);
  Matrix cache(5, 74);
  bank.forward_train(0, x, y, cache, scratch);
  check_close(cache, glu_pre(bank, 0, x), 2e-5);
  check_close(y, glu_reference(bank, 0, x, silu_ref), 2e-5);
}

TEST_CASE("pack_weights = false and double banks use the Eigen products",
          "[experts][packed][stale]") {
  moet::SwiGluExperts<float> plain(
      {.model_dim = 13, .hidden_dim = 37, .num_experts = 2, .pack_weights = false});
  CHECK_FALSE(plain.uses_packed_kernels());
  plain.parameters_changed();
  CHECK_FALSE(plain.uses_packed_kernels());
  const Matrix x = random_rows(5, 13, 22u);
  check_close(run_expert(plain, 0, x), glu_reference(plain, 0, x, silu_ref), 2e-5);
  const moet::SwiGluExperts<double> wide({.model_dim = 4, .hidden_dim = 8, .num_experts = 1});
  CHECK_FALSE(wide.uses_packed_kernels());
}

TEST_CASE("GroupedDispatch on packed experts equals ReferenceDispatch at 1 and 2 threads",
          "[experts][packed][dispatch][parallel]") {
  ThreadGuard guard;
  // bf16 weights: the same dispatch, every product's operands rounded to bf16 (about 0.4%
  // relative on the output, see test_gemm_bf16), still bit-identical across dispatchers,
  // block sizes and thread counts.
  // The block formats: the same again, against the float oracle within their quantisation
  // error (the worst element: 8-bit about 6% of an output's scale, 4-bit about 40%; the
  // precise oracle of these formats is in test_gemm_quant).
  const auto format =
      GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16, moet::WeightFormat::kQ8_0,
               moet::WeightFormat::kQ4_0, moet::WeightFormat::kQ4_1);
  const double tolerance = format == moet::WeightFormat::kF32    ? 2e-5
                           : format == moet::WeightFormat::kBf16 ? 3e-2
                           : format == moet::WeightFormat::kQ8_0 ? 0.15
                                                                 : 1.0;
  INFO("weights " << moet::weight_format_name(format));
  const moet::SwiGluExperts<float> experts({.model_dim = 40,
                                            .hidden_dim = 72,
                                            .num_experts = 6,
                                            .init_seed = 8,
                                            .weight_format = format});
  const moet::TopKGate<float> gate({.model_dim = 40, .num_experts = 6, .k = 2, .init_seed = 2});
  const Index num_tokens = GENERATE(Index{1}, Index{7}, Index{300});
  const Matrix x = random_rows(num_tokens, 40, 31u);
  moet::Routing<float> plan;
  gate.route(x, moet::RouteContext{}, plan);

  // The independent oracle: every assignment through the double expert, combined in double.
  MatrixD want = MatrixD::Zero(num_tokens, 40);
  for (Index t = 0; t < num_tokens; ++t) {
    for (std::size_t j = 0; j < plan.experts(t).size(); ++j) {
      want.row(t) += static_cast<double>(plan.weights(t)[j]) *
                     glu_reference(experts, plan.experts(t)[j], x.middleRows(t, 1), silu_ref);
    }
  }

  std::vector<Matrix> grouped;
  for (const int threads : {1, 2}) {
    moet::set_num_threads(threads);
    for (const Index block_rows : {Index{5}, Index{128}}) {
      Matrix y(num_tokens, 40), y_ref(num_tokens, 40);
      y.setConstant(std::numeric_limits<float>::quiet_NaN());
      moet::GroupedDispatch::Workspace<moet::SwiGluExperts<float>> ws;
      moet::GroupedDispatch({.block_rows = block_rows}).run(experts, x, plan, y, ws);
      moet::ReferenceDispatch::Workspace<moet::SwiGluExperts<float>> rws;
      moet::ReferenceDispatch{}.run(experts, x, plan, y_ref, rws);
      check_close(y, want, tolerance);
      // A row's expert output does not depend on its block, and both combine in slot order.
      CHECK(bit_identical(y, y_ref));
      grouped.push_back(y);
    }
  }
  for (const Matrix& y : grouped) CHECK(bit_identical(y, grouped.front()));
}

TEST_CASE(
    "MoELayer on packed experts is bit-identical for 1 and 2 threads and matches the "
    "reference dispatch",
    "[experts][packed][layer][parallel]") {
  ThreadGuard guard;
  using Experts = moet::SwiGluExperts<float>;
  auto layer = moet::MoELayer(moet::TopPGate<float>({.model_dim = 24, .num_experts = 5, .p = 0.6}),
                              Experts({.model_dim = 24, .hidden_dim = 40, .num_experts = 5}),
                              Experts({.model_dim = 24, .hidden_dim = 16, .num_experts = 1}));
  auto reference = moet::MoELayer<moet::TopPGate<float>, Experts, moet::ReferenceDispatch>(
      moet::TopPGate<float>({.model_dim = 24, .num_experts = 5, .p = 0.6}),
      Experts({.model_dim = 24, .hidden_dim = 40, .num_experts = 5}),
      Experts({.model_dim = 24, .hidden_dim = 16, .num_experts = 1}));
  const Matrix x = random_rows(200, 24, 41u);
  std::vector<Matrix> outs;
  for (const int threads : {1, 2}) {
    moet::set_num_threads(threads);
    Matrix y(200, 24), y_ref(200, 24);
    typename decltype(layer)::Workspace ws;
    typename decltype(reference)::Workspace rws;
    layer.forward(x, y, moet::RouteContext{}, ws);
    reference.forward(x, y_ref, moet::RouteContext{}, rws);
    const MatrixD want = y_ref.cast<double>();
    check_close(y, want, 1e-5);
    outs.push_back(y);
  }
  CHECK(bit_identical(outs[0], outs[1]));
}

}  // namespace test_experts_packed
