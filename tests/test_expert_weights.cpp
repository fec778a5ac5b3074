// The expert banks' weight API (experts/bank.hpp): set_* in moet's (in, out) and PyTorch's
// [out, in] layouts against naive double experts built from the same matrices, the checks of
// every setter, WeightInit, edit(), parameters_changed() on NaN, the inference-only mode (its
// members, its results, and its resident memory measured on /proc/self/statm), and the
// dispatchers refusing a bank that cannot run before their parallel regions.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__linux__)
#include <unistd.h>
#endif

#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
#include "moet/train/optim.hpp"

namespace test_expert_weights {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using moet::WeightLayout;
using Matrix = moet::RowMatrix<float>;
using MatrixD = moet::RowMatrix<double>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

template <class S = float>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed, double scale = 0.3) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

bool bit_identical(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

// Written out independently of activations.hpp.
double silu_ref(double v) { return v / (1.0 + std::exp(-v)); }
double gelu_ref(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
double relu_ref(double v) { return v > 0.0 ? v : 0.0; }

// One expert's tensors in moet's (in, out) layout, as the test generated them.
struct GluWeights {
  Matrix gate;  // (d, f)
  Matrix up;    // (d, f)
  Matrix down;  // (f, d)
};
struct FfnWeights {
  Matrix w1;  // (d, f)
  Matrix b1;  // (1, f)
  Matrix w2;  // (f, d)
  Matrix b2;  // (1, d)
};

std::vector<GluWeights> glu_weights(Index d, Index f, Index experts, std::uint32_t seed) {
  std::vector<GluWeights> w;
  for (Index e = 0; e < experts; ++e) {
    const auto s = seed + 10 * static_cast<std::uint32_t>(e);
    w.push_back({random_rows(d, f, s), random_rows(d, f, s + 1), random_rows(f, d, s + 2)});
  }
  return w;
}
std::vector<FfnWeights> ffn_weights(Index d, Index f, Index experts, std::uint32_t seed) {
  std::vector<FfnWeights> w;
  for (Index e = 0; e < experts; ++e) {
    const auto s = seed + 10 * static_cast<std::uint32_t>(e);
    w.push_back({random_rows(d, f, s), random_rows(1, f, s + 1), random_rows(f, d, s + 2),
                 random_rows(1, d, s + 3)});
  }
  return w;
}

// x (n, K) times w (K, N) in double loops.
MatrixD naive(const MatrixD& x, const Matrix& w) {
  MatrixD y = MatrixD::Zero(x.rows(), w.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index k = 0; k < x.cols(); ++k) {
      for (Index j = 0; j < w.cols(); ++j) y(i, j) += x(i, k) * static_cast<double>(w(k, j));
    }
  }
  return y;
}

// The oracles: the expert computed in double from the matrices the test generated.
MatrixD glu_oracle(const GluWeights& w, const Matrix& x, double (*act)(double)) {
  const MatrixD xd = x.cast<double>();
  MatrixD g = naive(xd, w.gate);
  const MatrixD u = naive(xd, w.up);
  for (Index i = 0; i < g.size(); ++i) g.data()[i] = act(g.data()[i]) * u.data()[i];
  return naive(g, w.down);
}
MatrixD ffn_oracle(const FfnWeights& w, const Matrix& x, double (*act)(double), bool bias) {
  MatrixD h = naive(x.cast<double>(), w.w1);
  for (Index i = 0; i < h.rows(); ++i) {
    for (Index j = 0; j < h.cols(); ++j) {
      h(i, j) = act(h(i, j) + (bias ? static_cast<double>(w.b1(0, j)) : 0.0));
    }
  }
  MatrixD y = naive(h, w.w2);
  if (bias) {
    for (Index i = 0; i < y.rows(); ++i) y.row(i) += w.b2.cast<double>();
  }
  return y;
}

// |got - want| <= rel * (|want| + rms(want)) everywhere.
void check_close(const Matrix& got, const MatrixD& want, double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double rms = want.norm() / std::sqrt(static_cast<double>(want.size()));
  int bad = 0;
  for (Index i = 0; i < want.size(); ++i) {
    const double err = std::abs(static_cast<double>(got.data()[i]) - want.data()[i]);
    if (!(err <= rel * (std::abs(want.data()[i]) + rms))) ++bad;
  }
  CHECK(bad == 0);
}

template <class Bank>
Matrix run_expert(const Bank& bank, Index e, const Matrix& x) {
  typename Bank::Scratch scratch;
  Matrix y(x.rows(), bank.model_dim());
  bank.forward(e, x, y, scratch);
  return y;
}

// Sets every tensor of experts [0, w.size()) of `bank` from `w`: even experts in moet's layout, odd
// ones in PyTorch's (from a column-major matrix for expert 1, so that the setter also sees another
// storage order).
template <class Bank>
void set_glu(Bank& bank, const std::vector<GluWeights>& w) {
  for (Index e = 0; e < static_cast<Index>(w.size()); ++e) {
    const GluWeights& we = w[static_cast<std::size_t>(e)];
    if (e % 2 == 0) {
      bank.set_gate_weights(e, we.gate, WeightLayout::kInOut);
      bank.set_up_weights(e, we.up, WeightLayout::kInOut);
      bank.set_down_weights(e, we.down, WeightLayout::kInOut);
    } else if (e == 1) {
      const Eigen::MatrixXf gate_t = we.gate.transpose();  // [f, d], column-major
      bank.set_gate_weights(e, gate_t, WeightLayout::kOutIn);
      bank.set_up_weights(e, Eigen::MatrixXf(we.up.transpose()), WeightLayout::kOutIn);
      bank.set_down_weights(e, Eigen::MatrixXf(we.down.transpose()), WeightLayout::kOutIn);
    } else {
      bank.set_gate_weights(e, Matrix(we.gate.transpose()), WeightLayout::kOutIn);
      bank.set_up_weights(e, Matrix(we.up.transpose()), WeightLayout::kOutIn);
      bank.set_down_weights(e, Matrix(we.down.transpose()), WeightLayout::kOutIn);
    }
  }
}
template <class Bank>
void set_ffn(Bank& bank, const std::vector<FfnWeights>& w) {
  for (Index e = 0; e < static_cast<Index>(w.size()); ++e) {
    const FfnWeights& we = w[static_cast<std::size_t>(e)];
    if (e % 2 == 0) {
      bank.set_in_weights(e, we.w1, WeightLayout::kInOut);
      bank.set_out_weights(e, we.w2, WeightLayout::kInOut);
    } else {
      bank.set_in_weights(e, Matrix(we.w1.transpose()), WeightLayout::kOutIn);
      bank.set_out_weights(e, Matrix(we.w2.transpose()), WeightLayout::kOutIn);
    }
    if (bank.has_bias()) {
      bank.set_in_bias(e, we.b1);                                    // a row
      bank.set_out_bias(e, moet::Vector<float>(we.b2.transpose()));  // a column, as from 1-D
    }
  }
}

// Resident set size of this process, from /proc/self/statm (0 where there is none).
std::size_t resident_bytes() {
#if defined(__linux__)
  std::ifstream statm("/proc/self/statm");
  std::size_t total_pages = 0;
  std::size_t resident_pages = 0;
  statm >> total_pages >> resident_pages;
  return resident_pages * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
#else
  return 0;
#endif
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

}  // namespace

TEST_CASE("set_* in either layout gives the forward of the experts built from those matrices",
          "[experts][weights]") {
  const Index d = 13;
  const Index f = 37;  // no panel width divides them
  const Index n = 9;
  const Matrix x = random_rows(n, d, 5u, 1.0);
  const auto format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const double rel = format == moet::WeightFormat::kBf16 ? 3e-2 : 2e-5;
  INFO("weights " << moet::weight_format_name(format));

  SECTION("SwiGLU") {
    const auto w = glu_weights(d, f, 3, 100u);
    moet::SwiGluExperts<float> bank({.model_dim = d,
                                     .hidden_dim = f,
                                     .num_experts = 3,
                                     .init = moet::WeightInit::kNone,
                                     .weight_format = format});
    set_glu(bank, w);
    REQUIRE(bank.uses_packed_kernels());
    // An inference-only bank packs straight from the caller's matrices: the same bits.
    moet::SwiGluExperts<float> packed_only({.model_dim = d,
                                            .hidden_dim = f,
                                            .num_experts = 3,
                                            .init = moet::WeightInit::kNone,
                                            .weight_format = format,
                                            .inference_only = true});
    set_glu(packed_only, w);
    for (Index e = 0; e < 3; ++e) {
      INFO("expert " << e);
      CHECK(bank.gate_weights(e) == w[static_cast<std::size_t>(e)].gate);
      CHECK(bank.down_weights(e) == w[static_cast<std::size_t>(e)].down);
      const Matrix y = run_expert(bank, e, x);
      check_close(y, glu_oracle(w[static_cast<std::size_t>(e)], x, silu_ref), rel);
      CHECK(bit_identical(run_expert(packed_only, e, x), y));
    }
  }
  SECTION("GELU FFN with biases, ReLU FFN without") {
    const auto w = ffn_weights(d, f, 2, 200u);
    moet::FfnExperts<float> bank({.model_dim = d,
                                  .hidden_dim = f,
                                  .num_experts = 2,
                                  .init = moet::WeightInit::kNone,
                                  .weight_format = format});
    set_ffn(bank, w);
    moet::ReluFfnExperts<float> nobias({.model_dim = d,
                                        .hidden_dim = f,
                                        .num_experts = 2,
                                        .bias = false,
                                        .init = moet::WeightInit::kNone,
                                        .weight_format = format,
                                        .inference_only = true});
    set_ffn(nobias, w);
    for (Index e = 0; e < 2; ++e) {
      const FfnWeights& we = w[static_cast<std::size_t>(e)];
      CHECK(bank.in_bias(e) == we.b1);
      CHECK(bank.out_bias(e) == we.b2);
      check_close(run_expert(bank, e, x), ffn_oracle(we, x, gelu_ref, true), rel);
      check_close(run_expert(nobias, e, x), ffn_oracle(we, x, relu_ref, false), rel);
    }
  }
}

TEST_CASE("Double banks and unpacked banks take the same setters", "[experts][weights]") {
  const auto w = glu_weights(6, 10, 2, 300u);
  moet::GeGluExperts<double> bank({.model_dim = 6, .hidden_dim = 10, .num_experts = 2});
  moet::GeGluExperts<float> unpacked(
      {.model_dim = 6, .hidden_dim = 10, .num_experts = 2, .pack_weights = false});
  for (Index e = 0; e < 2; ++e) {
    const GluWeights& we = w[static_cast<std::size_t>(e)];
    bank.set_gate_weights(e, MatrixD(we.gate.cast<double>().transpose()), WeightLayout::kOutIn);
    bank.set_up_weights(e, MatrixD(we.up.cast<double>()), WeightLayout::kInOut);
    bank.set_down_weights(e, MatrixD(we.down.cast<double>()), WeightLayout::kInOut);
    unpacked.set_gate_weights(e, we.gate, WeightLayout::kInOut);
    unpacked.set_up_weights(e, Matrix(we.up.transpose()), WeightLayout::kOutIn);
    unpacked.set_down_weights(e, Matrix(we.down.transpose()), WeightLayout::kOutIn);
  }
  CHECK_FALSE(unpacked.uses_packed_kernels());
  const Matrix x = random_rows(4, 6, 7u, 1.0);
  for (Index e = 0; e < 2; ++e) {
    moet::GeGluExperts<double>::Scratch scratch;
    MatrixD y(4, 6);
    bank.forward(e, x.cast<double>(), y, scratch);
    const MatrixD want = glu_oracle(w[static_cast<std::size_t>(e)], x, gelu_ref);
    CHECK((y - want).norm() <= 1e-12 * want.norm());
    check_close(run_expert(unpacked, e, x), want, 2e-5);
  }
}

TEST_CASE("Expert setters reject wrong shapes, transposed matrices and NaN/Inf, changing nothing",
          "[experts][weights][bad_input]") {
  moet::SwiGluExperts<float> glu({.model_dim = 4, .hidden_dim = 6, .num_experts = 3});
  const Matrix x = random_rows(5, 4, 9u, 1.0);
  const Matrix before = run_expert(glu, 2, x);
  const Matrix gate_before = glu.gate_weights(2);

  // PyTorch's [f, d] array passed as moet's layout: "looks transposed", both shapes, the layout.
  CHECK_THROWS_AS(glu.set_gate_weights(2, random_rows(6, 4, 1u), WeightLayout::kInOut),
                  moet::Error);
  CHECK_THROWS_WITH(glu.set_gate_weights(2, random_rows(6, 4, 1u), WeightLayout::kInOut),
                    Contains("[moet::GluExperts] set_gate_weights: expert 2's gate weights must "
                             "be (model_dim, hidden_dim) = (4, 6) in WeightLayout::kInOut") &&
                        Contains("got (6, 4): looks transposed") &&
                        Contains("pass WeightLayout::kOutIn"));
  CHECK_THROWS_WITH(glu.set_down_weights(1, random_rows(6, 4, 1u), WeightLayout::kOutIn),
                    Contains("[moet::GluExperts] set_down_weights: expert 1's down weights must "
                             "be [model_dim, hidden_dim] = [4, 6] in WeightLayout::kOutIn") &&
                        Contains("got (6, 4): looks transposed") &&
                        Contains("pass WeightLayout::kInOut"));
  CHECK_THROWS_WITH(glu.set_up_weights(0, random_rows(4, 5, 1u), WeightLayout::kInOut),
                    Contains("set_up_weights: expert 0's up weights") && Contains("got (4, 5)") &&
                        !Contains("transposed"));
  // NaN and Inf: named by row and column of the matrix as given.
  Matrix bad = random_rows(6, 4, 2u);
  bad(5, 1) = kNaN;
  CHECK_THROWS_WITH(glu.set_gate_weights(2, bad, WeightLayout::kOutIn),
                    Contains("[moet::GluExperts] set_gate_weights: expert 2's gate weights must "
                             "be finite, got nan at row 5, column 1"));
  bad(5, 1) = 0.0f;
  bad(0, 3) = -kInf;
  CHECK_THROWS_WITH(glu.set_gate_weights(2, bad, WeightLayout::kOutIn),
                    Contains("got -inf at row 0, column 3"));
  CHECK_THROWS_WITH(glu.set_gate_weights(3, random_rows(4, 6, 1u), WeightLayout::kInOut),
                    Contains("set_gate_weights: expert 3 (gate weights) is outside [0, 3)"));
  CHECK_THROWS_WITH(glu.set_gate_weights(-1, random_rows(4, 6, 1u), WeightLayout::kInOut),
                    Contains("expert -1"));
  // Nothing changed: the stack, the packed copy, the output.
  CHECK(glu.gate_weights(2) == gate_before);
  CHECK(glu.uses_packed_kernels());
  CHECK(bit_identical(run_expert(glu, 2, x), before));

  moet::FfnExperts<float> ffn({.model_dim = 4, .hidden_dim = 6, .num_experts = 2});
  CHECK_THROWS_WITH(ffn.set_in_bias(0, random_rows(1, 4, 1u)),
                    Contains("[moet::FfnExperts] set_in_bias: expert 0's first-layer bias must be "
                             "a vector of hidden_dim = 6 values, got (1, 4)"));
  CHECK_THROWS_WITH(ffn.set_out_bias(1, random_rows(2, 2, 1u)), Contains("got (2, 2)"));
  Matrix bias = random_rows(1, 4, 3u);
  bias(0, 2) = kInf;
  CHECK_THROWS_WITH(ffn.set_out_bias(1, bias),
                    Contains("expert 1's second-layer bias must be finite, got inf at row 0, "
                             "column 2"));
  CHECK(ffn.out_bias(1).isZero(0.0));
  moet::FfnExperts<float> nobias(
      {.model_dim = 4, .hidden_dim = 6, .num_experts = 2, .bias = false});
  CHECK_THROWS_WITH(nobias.set_in_bias(0, random_rows(1, 6, 1u)),
                    Contains("[moet::FfnExperts] set_in_bias: this bank has no biases"));
  CHECK_THROWS_WITH(nobias.in_bias(0), Contains("has no first-layer bias (bias = false)"));
  CHECK(nobias.in_bias_stack().rows() == 0);

  // Options a body or a mode cannot have.
  CHECK_THROWS_WITH(
      moet::SwiGluExperts<float>({.model_dim = 4, .hidden_dim = 6, .num_experts = 1, .bias = true}),
      Contains("[moet::GluExperts] bias = true, but GluExperts experts have no biases"));
  CHECK_THROWS_WITH(
      (moet::SwiGluExperts<double>(
          {.model_dim = 4, .hidden_dim = 6, .num_experts = 1, .inference_only = true})),
      Contains("inference_only") && Contains("float bank with pack_weights"));
  CHECK_THROWS_WITH(
      (moet::FfnExperts<float>({.model_dim = 4,
                                .hidden_dim = 6,
                                .num_experts = 1,
                                .pack_weights = false,
                                .inference_only = true})),
      Contains("[moet::FfnExperts] inference_only") && Contains("pack_weights = false"));
}

TEST_CASE("WeightInit: random is the seeded default, zeros gives zero, none refuses to run",
          "[experts][weights][init]") {
  using Bank = moet::SwiGluExperts<float>;
  const Matrix x = random_rows(7, 8, 11u, 1.0);
  const Bank by_default({.model_dim = 8, .hidden_dim = 12, .num_experts = 3, .init_seed = 4});
  const Bank random({.model_dim = 8,
                     .hidden_dim = 12,
                     .num_experts = 3,
                     .init = moet::WeightInit::kRandom,
                     .init_seed = 4});
  const Bank random_packed_only({.model_dim = 8,
                                 .hidden_dim = 12,
                                 .num_experts = 3,
                                 .init = moet::WeightInit::kRandom,
                                 .init_seed = 4,
                                 .inference_only = true});
  CHECK(by_default.gate_stack() == random.gate_stack());
  CHECK_FALSE(random.gate_stack().isZero(0.0));
  for (Index e = 0; e < 3; ++e) {
    const Matrix y = run_expert(random, e, x);
    CHECK(bit_identical(run_expert(by_default, e, x), y));
    // The inference-only bank draws the same stream, one expert tensor at a time.
    CHECK(bit_identical(run_expert(random_packed_only, e, x), y));
  }

  const Bank zeros(
      {.model_dim = 8, .hidden_dim = 12, .num_experts = 3, .init = moet::WeightInit::kZeros});
  CHECK(zeros.up_stack().isZero(0.0));
  CHECK(run_expert(zeros, 1, x).isZero(0.0));
  moet::FfnExperts<float> ffn_zeros(
      {.model_dim = 8, .hidden_dim = 12, .num_experts = 2, .init = moet::WeightInit::kZeros});
  CHECK(run_expert(ffn_zeros, 1, x).isZero(0.0));

  // None: nothing drawn; every run names the first expert and tensor not set yet.
  Bank none({.model_dim = 8, .hidden_dim = 12, .num_experts = 3, .init = moet::WeightInit::kNone});
  CHECK_THROWS_WITH(run_expert(none, 0, x),
                    Contains("[moet::GluExperts] forward: expert 0's gate weights was never set "
                             "(init = WeightInit::kNone)") &&
                        Contains("set_gate_weights"));
  const auto w = glu_weights(8, 12, 3, 400u);
  set_glu(none, {w[0]});  // only expert 0
  CHECK_THROWS_WITH(run_expert(none, 0, x), Contains("expert 1's gate weights was never set"));
  none.set_gate_weights(1, w[1].gate, WeightLayout::kInOut);
  none.set_up_weights(1, w[1].up, WeightLayout::kInOut);
  CHECK_THROWS_WITH(run_expert(none, 0, x), Contains("expert 1's down weights was never set"));
  moet::SwiGluExperts<float>::Scratch scratch;
  Matrix y(7, 8);
  Matrix cache(7, none.cache_width());
  CHECK_THROWS_WITH(none.forward_train(0, x, y, cache, scratch),
                    Contains("[moet::GluExperts] forward_train: expert 1's down weights"));
  // Through a layer: the dispatcher checks before its parallel region (no throw inside it).
  moet::MoELayer layer(moet::TopKGate<float>({.model_dim = 8, .num_experts = 3, .k = 2}), none);
  CHECK_THROWS_WITH(layer.forward(x), Contains("expert 1's down weights was never set"));
  set_glu(layer.experts(), w);
  const Matrix layer_y = layer.forward(x);
  CHECK(layer_y.allFinite());
  set_glu(none, w);
  check_close(run_expert(none, 2, x), glu_oracle(w[2], x, silu_ref), 2e-5);
}

TEST_CASE("edit() hands out writable views, then checks and repacks when it ends",
          "[experts][weights][edit]") {
  using Bank = moet::SwiGluExperts<float>;
  const auto w = glu_weights(8, 12, 2, 500u);
  const Matrix x = random_rows(6, 8, 13u, 1.0);
  Bank bank({.model_dim = 8, .hidden_dim = 12, .num_experts = 2});
  {
    auto edit = bank.edit();
    for (Index e = 0; e < 2; ++e) {
      edit.gate_weights(e) = w[static_cast<std::size_t>(e)].gate;
      edit.up_weights(e) = w[static_cast<std::size_t>(e)].up;
    }
    edit.down_stack() << w[0].down, w[1].down;
    // While it is open nothing runs or writes around it.
    CHECK_FALSE(bank.uses_packed_kernels());
    CHECK_THROWS_WITH(run_expert(bank, 0, x), Contains("edit() of this bank is open"));
    CHECK_THROWS_WITH(bank.set_up_weights(0, w[0].up, WeightLayout::kInOut),
                      Contains("an edit() of this bank is open"));
    CHECK_THROWS_WITH(bank.edit(), Contains("already open"));
    CHECK_THROWS_WITH(bank.parameters_changed(), Contains("edit() of this bank is open"));
  }
  // Repacked at the end of the scope: the packed kernels run, with the bits of a bank whose
  // weights were set (and packed) one tensor at a time.
  REQUIRE(bank.uses_packed_kernels());
  Bank set({.model_dim = 8, .hidden_dim = 12, .num_experts = 2, .init = moet::WeightInit::kNone});
  set_glu(set, w);
  for (Index e = 0; e < 2; ++e) {
    const Matrix y = run_expert(bank, e, x);
    CHECK(bit_identical(y, run_expert(set, e, x)));
    check_close(y, glu_oracle(w[static_cast<std::size_t>(e)], x, silu_ref), 2e-5);
  }

  // commit() ends it early and throws on a NaN, naming it; the bank then refuses to run,
  // forward_train included, until the value is fixed and parameters_changed() passes.
  auto edit = bank.edit();
  edit.down_weights(1)(7, 2) = kNaN;
  CHECK_THROWS_WITH(edit.commit(),
                    Contains("[moet::GluExperts] edit() end: expert 1's down weights must be "
                             "finite, got nan at row 7, column 2"));
  CHECK_THROWS_WITH(edit.down_weights(1), Contains("this edit() has ended"));
  CHECK_THROWS_WITH(run_expert(bank, 0, x), Contains("expert 1's down weights must be finite"));
  Bank::Scratch scratch;
  Matrix y(6, 8);
  Matrix cache(6, bank.cache_width());
  CHECK_THROWS_WITH(bank.forward_train(0, x, y, cache, scratch),
                    Contains("forward_train: expert 1's down weights must be finite"));
  CHECK_THROWS_WITH(bank.parameters_changed(),
                    Contains("parameters_changed: expert 1's down weights must be finite, got "
                             "nan at row 7, column 2"));
  {
    // A scope end cannot throw: a NaN written there is reported by the next run instead.
    auto again = bank.edit();
    again.down_weights(1)(7, 2) = 0.25f;
    again.gate_weights(0)(1, 1) = kInf;
  }
  CHECK_THROWS_WITH(run_expert(bank, 1, x),
                    Contains("expert 0's gate weights must be finite, got inf at row 1, column 1"));
  bank.edit().gate_weights(0)(1, 1) = 0.5f;
  REQUIRE(bank.uses_packed_kernels());
  GluWeights fixed = w[0];
  fixed.gate(1, 1) = 0.5f;
  check_close(run_expert(bank, 0, x), glu_oracle(fixed, x, silu_ref), 2e-5);

  // FFN biases are edited in place too (never packed).
  moet::FfnExperts<float> ffn({.model_dim = 8, .hidden_dim = 12, .num_experts = 2});
  ffn.edit().out_bias(1).setConstant(2.0f);
  CHECK(ffn.uses_packed_kernels());
  CHECK((ffn.out_bias(1).array() == 2.0f).all());
}

TEST_CASE("parameters_changed() rejects a NaN an optimiser wrote, and the bank stops running",
          "[experts][weights][train]") {
  moet::FfnExperts<float> bank({.model_dim = 5, .hidden_dim = 7, .num_experts = 3});
  const Matrix x = random_rows(4, 5, 17u, 1.0);
  bank.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name == "out_weight") value(7 + 3, 4) = kNaN;  // expert 1, row 3, column 4
      });
  CHECK_THROWS_WITH(run_expert(bank, 0, x), Contains("packed weights are stale"));
  CHECK_THROWS_WITH(moet::notify_parameters_changed(bank),
                    Contains("[moet::FfnExperts] parameters_changed: expert 1's second-layer "
                             "weights must be finite, got nan at row 3, column 4"));
  CHECK_THROWS_WITH(run_expert(bank, 0, x), Contains("must be finite"));
  bank.visit_parameters(
      [](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
        if (name == "out_weight") value(7 + 3, 4) = 1.0f;
      });
  bank.parameters_changed();
  CHECK(bank.uses_packed_kernels());
  CHECK(run_expert(bank, 0, x).allFinite());
}

// parameters_changed() checks float and bf16 copies in the repack's own pass, block formats and
// banks without copies before it: every path names the first non-finite value of each tensor,
// biases included, and the bank runs again once it is fixed.
TEST_CASE("parameters_changed() names a NaN or Inf in any tensor, with every weight format",
          "[experts][weights][train]") {
  struct Config {
    moet::WeightFormat format;
    bool pack;
  };
  const Config config =
      GENERATE(Config{moet::WeightFormat::kF32, true}, Config{moet::WeightFormat::kBf16, true},
               Config{moet::WeightFormat::kQ8_0, true}, Config{moet::WeightFormat::kF32, false});
  INFO(moet::weight_format_name(config.format) << (config.pack ? "" : ", pack_weights = false"));
  struct Case {
    const char* name;  // visit_parameters name
    Index row;         // in the stack
    Index col;
    const char* expected;
  };
  // 3 experts, d 5, f 7: expert 1's rows start at 5 (in_weight), 7 (out_weight), 1 (biases).
  const Case cases[] = {
      {"in_weight", 5 + 2, 6,
       "expert 1's first-layer weights must be finite, got nan at row 2, "
       "column 6"},
      {"out_weight", 7 + 3, 4,
       "expert 1's second-layer weights must be finite, got nan at row 3"
       ", column 4"},
      {"in_bias", 2, 3, "expert 2's first-layer bias must be finite, got nan"},
      {"out_bias", 0, 0, "expert 0's second-layer bias must be finite, got nan"},
  };
  const Matrix x = random_rows(4, 5, 17u, 1.0);
  for (const Case& c : cases) {
    INFO(c.name);
    moet::FfnExperts<float> bank({.model_dim = 5,
                                  .hidden_dim = 7,
                                  .num_experts = 3,
                                  .pack_weights = config.pack,
                                  .weight_format = config.format});
    const Matrix before = run_expert(bank, 1, x);
    float kept = 0.0f;
    const auto write = [&](float v) {
      bank.visit_parameters(
          [&](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float>) {
            if (name != c.name) return;
            if (std::isfinite(value(c.row, c.col))) kept = value(c.row, c.col);
            value(c.row, c.col) = v;
          });
    };
    write(kNaN);
    CHECK_THROWS_WITH(bank.parameters_changed(),
                      Contains("parameters_changed: ") && Contains(c.expected));
    CHECK_THROWS_WITH(run_expert(bank, 1, x), Contains("must be finite"));
    write(kInf);
    CHECK_THROWS_WITH(bank.parameters_changed(), Contains("must be finite, got inf"));
    write(kept);
    bank.parameters_changed();
    CHECK(bank.uses_packed_kernels() == config.pack);
    CHECK(bit_identical(run_expert(bank, 1, x), before));
  }
}

TEST_CASE("An inference-only bank has no float weights and no training members",
          "[experts][weights][inference_only]") {
  moet::FfnExperts<float> bank(
      {.model_dim = 4, .hidden_dim = 6, .num_experts = 2, .init_seed = 3, .inference_only = true});
  CHECK(bank.inference_only());
  CHECK(bank.uses_packed_kernels());
  // (The matchers hold references: each is built where it is used.)
  const auto op = [](const std::string& what) { return "[moet::FfnExperts] " + what; };
  CHECK_THROWS_WITH(bank.in_weights(0), Contains(op("tensor")) && Contains("inference_only"));
  CHECK_THROWS_WITH(bank.out_weights_stack(), Contains(op("stack")) && Contains("inference_only"));
  CHECK_THROWS_WITH(bank.edit(), Contains(op("edit")) && Contains("inference_only"));
  CHECK_THROWS_WITH(bank.zero_grad(), Contains(op("zero_grad")) && Contains("inference_only"));
  CHECK_THROWS_WITH(bank.ensure_grad(), Contains(op("ensure_grad")) && Contains("inference_only"));
  CHECK_THROWS_WITH(
      bank.visit_parameters([](std::string_view, moet::ParamMap<float>, moet::ParamMap<float>) {}),
      Contains(op("visit_parameters")) && Contains("inference_only"));
  moet::FfnExperts<float>::Scratch scratch;
  const Matrix x = random_rows(3, 4, 19u, 1.0);
  Matrix y(3, 4);
  Matrix cache(3, bank.cache_width());
  CHECK_THROWS_WITH(bank.forward_train(0, x, y, cache, scratch),
                    Contains(op("forward_train")) && Contains("inference_only"));
  CHECK_THROWS_WITH(bank.backward(0, x, cache, x, y, scratch),
                    Contains(op("backward")) && Contains("inference_only"));
  // Biases stay readable (they are not packed); parameters_changed has nothing to do.
  CHECK(bank.in_bias(1).isZero(0.0));
  bank.parameters_changed();
  // The same forward as a training bank of the same seed.
  const moet::FfnExperts<float> training(
      {.model_dim = 4, .hidden_dim = 6, .num_experts = 2, .init_seed = 3});
  CHECK(bit_identical(run_expert(bank, 1, x), run_expert(training, 1, x)));
  // Training through a layer is refused before any parallel region.
  moet::MoELayer layer(moet::TopKGate<float>({.model_dim = 4, .num_experts = 2}), bank);
  moet::MoELayer<moet::TopKGate<float>, moet::FfnExperts<float>>::Workspace ws;
  CHECK(layer.forward(x).allFinite());
  CHECK_THROWS_WITH(layer.forward_train(x, y, {}, ws),
                    Contains(op("forward_train")) && Contains("inference_only"));
}

TEST_CASE("An inference-only bank's resident memory is its packed weights",
          "[experts][weights][inference_only][memory]") {
  if (kSanitized || resident_bytes() == 0) {
    WARN("skipped: RSS is not measurable here (sanitizer allocator or no /proc/self/statm)");
    return;
  }
#if defined(__GLIBC__)
  // Large blocks straight from mmap and back on free (no dynamic threshold), so that a freed
  // setter temporary leaves no resident pages behind in the heap.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  malloc_trim(0);
#endif
  // S2's expert shape, two experts: 2 * 3 * 1024 * 3584 = 22M weights (88 MB f32, 44 MB bf16).
  const Index d = 1024;
  const Index f = 3584;
  const auto format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const std::size_t weight_bytes = format == moet::WeightFormat::kBf16 ? 2 : 4;
  INFO("weights " << moet::weight_format_name(format));
  // The sources: one (d, f) matrix, reused for every tensor (allocated before measuring).
  Matrix source(d, f);
  std::uint32_t state = 12345u;
  for (Index i = 0; i < source.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    source.data()[i] = static_cast<float>(state >> 8) * (1.0f / 16777216.0f) - 0.5f;
  }
  const Eigen::Map<const Matrix> source_t(source.data(), f, d);  // an [f, d] matrix
  const std::size_t before = resident_bytes();
  {
    moet::SwiGluExperts<float> bank({.model_dim = d,
                                     .hidden_dim = f,
                                     .num_experts = 2,
                                     .init = moet::WeightInit::kNone,
                                     .weight_format = format,
                                     .inference_only = true});
    // Expert 0 in moet's layout (no copy), expert 1 in PyTorch's (one transposed temporary
    // per call).
    bank.set_gate_weights(0, source, WeightLayout::kInOut);
    bank.set_up_weights(0, source, WeightLayout::kInOut);
    bank.set_down_weights(0, source_t, WeightLayout::kInOut);
    bank.set_gate_weights(1, source_t, WeightLayout::kOutIn);
    bank.set_up_weights(1, source_t, WeightLayout::kOutIn);
    bank.set_down_weights(1, source, WeightLayout::kOutIn);
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
    const std::size_t after = resident_bytes();
    const std::size_t packed = bank.packed_bytes();
    const auto expected = static_cast<std::size_t>(2 * 3 * d * f) * weight_bytes;
    const double growth = static_cast<double>(after) - static_cast<double>(before);
    INFO("packed " << packed << " bytes, RSS growth " << growth << " bytes ("
                   << growth / static_cast<double>(packed) << "x)");
    CHECK(packed == expected);  // these widths need no panel padding
    CHECK(growth <= 1.05 * static_cast<double>(packed));
    CHECK(growth >= 0.95 * static_cast<double>(packed));  // the measurement sees the weights
    const Matrix x = random_rows(2, d, 23u, 1.0);
    CHECK(run_expert(bank, 1, x).allFinite());
  }
}

namespace {

// The ggml blocks of a moet (in, out) matrix as GGUF stores the weight [out, in]: out rows of
// ceil(in / 32) blocks, quantised by the reference quantiser.
template <class Block>
std::vector<Block> gguf_blocks(const Matrix& w) {
  const Index in = w.rows();
  const Index nb = (in + 31) / 32;
  std::vector<Block> blocks(static_cast<std::size_t>(w.cols() * nb));
  for (Index j = 0; j < w.cols(); ++j) {
    for (Index b = 0; b < nb; ++b) {
      float x[32] = {};
      for (Index i = 0; i < 32 && b * 32 + i < in; ++i) x[i] = w(b * 32 + i, j);
      moet::detail::quantize_block(x, blocks[static_cast<std::size_t>(j * nb + b)]);
    }
  }
  return blocks;
}

}  // namespace

TEMPLATE_TEST_CASE("set_tensor_blocks packs ready ggml blocks as set_tensor packs their floats",
                   "[experts][weights][quant]", moet::detail::BlockQ8_0, moet::detail::BlockQ4_0,
                   moet::detail::BlockQ4_1) {
  using Block = TestType;
  const moet::WeightFormat format = moet::detail::BlockFormat<Block>::kFormat;
  const bool inference_only = GENERATE(false, true);
  INFO(moet::weight_format_name(format) << (inference_only ? ", inference only" : ", training"));
  const Index d = 40, f = 70, n = 3;  // partial last blocks in both directions
  const moet::SwiGluExperts<float>::Options options{.model_dim = d,
                                                    .hidden_dim = f,
                                                    .num_experts = n,
                                                    .init = moet::WeightInit::kNone,
                                                    .weight_format = format,
                                                    .inference_only = inference_only};
  moet::SwiGluExperts<float> from_blocks(options), from_floats(options);
  std::vector<Matrix> dequantised;
  for (Index e = 0; e < n; ++e) {
    const auto seed = static_cast<std::uint32_t>(10 * e);
    const Matrix gate = random_rows(d, f, seed + 1), up = random_rows(d, f, seed + 2),
                 down = random_rows(f, d, seed + 3);
    const auto gb = gguf_blocks<Block>(gate), ub = gguf_blocks<Block>(up),
               db = gguf_blocks<Block>(down);
    from_blocks.set_tensor_blocks(moet::GluTensor::kGate, e, std::span<const Block>(gb));
    from_blocks.set_tensor_blocks(moet::GluTensor::kUp, e, std::span<const Block>(ub));
    from_blocks.set_tensor_blocks(moet::GluTensor::kDown, e, std::span<const Block>(db));
    from_floats.set_gate_weights(e, gate, WeightLayout::kInOut);
    from_floats.set_up_weights(e, up, WeightLayout::kInOut);
    from_floats.set_down_weights(e, down, WeightLayout::kInOut);
    // The block values, as a training bank stores them.
    Matrix deq(d, f);
    for (Index j = 0; j < f; ++j) {
      for (Index i = 0; i < d; ++i) {
        deq(i, j) = moet::detail::block_value(gb[static_cast<std::size_t>(j * 2 + i / 32)], i % 32);
      }
    }
    dequantised.push_back(deq);
  }
  const Matrix x = random_rows(9, d, 99, 1.0);
  moet::SwiGluExperts<float>::Scratch scratch;
  for (Index e = 0; e < n; ++e) {
    Matrix a(9, d), b(9, d);
    from_blocks.forward(e, x, a, scratch);
    from_floats.forward(e, x, b, scratch);
    CHECK(bit_identical(a, b));
    if (!inference_only) CHECK(from_blocks.gate_weights(e) == dequantised[std::size_t(e)]);
  }

  // Errors: another format, a wrong count, a non-finite scale; nothing changes.
  const Matrix gate = random_rows(d, f, 5);
  auto blocks = gguf_blocks<Block>(gate);
  moet::SwiGluExperts<float> f32({.model_dim = d, .hidden_dim = f, .num_experts = n});
  CHECK_THROWS_WITH(
      f32.set_tensor_blocks(moet::GluTensor::kGate, 0, std::span<const Block>(blocks)),
      Contains("blocks need a bank with weight_format") && Contains("this one is f32"));
  CHECK_THROWS_WITH(
      from_blocks.set_tensor_blocks(moet::GluTensor::kGate, 0,
                                    std::span<const Block>(blocks).first(blocks.size() - 1)),
      Contains("expert 0's gate weights is hidden_dim = 70 rows of 2 blocks (model_dim = 40), 140 "
               "blocks, got 139"));
  CHECK_THROWS_WITH(
      from_blocks.set_tensor_blocks(moet::GluTensor::kUp, 3, std::span<const Block>(blocks)),
      Contains("expert 3"));
  blocks[7].d = moet::detail::to_f16(kInf);
  CHECK_THROWS_AS(
      from_blocks.set_tensor_blocks(moet::GluTensor::kGate, 1, std::span<const Block>(blocks)),
      moet::Error);
  Matrix a(9, d), b(9, d);
  from_blocks.forward(1, x, a, scratch);
  from_floats.forward(1, x, b, scratch);
  CHECK(bit_identical(a, b));
}

TEST_CASE("set_tensor_blocks refuses FFN biases", "[experts][weights][quant]") {
  moet::GeluFfnExperts<float> ffn({.model_dim = 32,
                                   .hidden_dim = 32,
                                   .num_experts = 1,
                                   .weight_format = moet::WeightFormat::kQ8_0});
  const std::vector<moet::detail::BlockQ8_0> blocks(32);
  CHECK_THROWS_WITH(ffn.set_tensor_blocks(moet::FfnTensor::kInBias, 0,
                                          std::span<const moet::detail::BlockQ8_0>(blocks)),
                    Contains("are not packed"));
}

}  // namespace test_expert_weights
