// Expert-bank training: forward_train equals forward and caches the pre-activations, backward's
// weight and input gradients equal central finite differences in double (every expert kind),
// gradients accumulate, din is written, visit_parameters names every tensor.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/activations.hpp"
#include "moet/concepts.hpp"
#include "moet/detail/kernels/packed.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

#include "fd_util.hpp"

namespace test_grad_experts {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using moet::RowMatrix;

static_assert(moet::TrainableExperts<moet::SwiGluExperts<float>>);
static_assert(moet::TrainableExperts<moet::GeGluExperts<double>>);
static_assert(moet::TrainableExperts<moet::GeluFfnExperts<float>>);
static_assert(moet::TrainableExperts<moet::ReluFfnExperts<double>>);

RowMatrix<double> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

using moet_test::check_gradient;
using moet_test::collect;
using moet_test::fd_input;
using moet_test::fd_tensor;
using moet_test::Tensor;
using moet_test::ZeroGradient;

// Loss L = sum(R ⊙ E_e(in)) through the inference `forward` (an independent path).
template <class Bank>
double loss(const Bank& bank, Index e, const RowMatrix<double>& in, const RowMatrix<double>& r) {
  typename Bank::Scratch scratch;
  RowMatrix<double> out(in.rows(), in.cols());
  bank.forward(e, in, out, scratch);
  return (out.array() * r.array()).sum();
}

template <class Bank>
void check_expert_gradients(Bank bank, const std::string& kind) {
  INFO(kind);
  constexpr double kEps = 1e-6;
  constexpr Index kRows = 5;
  constexpr Index kExpert = 1;
  const Index d = bank.model_dim();
  const RowMatrix<double> in = random_rows(kRows, d, 11);
  const RowMatrix<double> r = random_rows(kRows, d, 12);

  typename Bank::Scratch scratch;
  RowMatrix<double> out(kRows, d);
  RowMatrix<double> cache(kRows, bank.cache_width());
  RowMatrix<double> din = RowMatrix<double>::Constant(kRows, d, 123.0);  // must be overwritten
  bank.forward_train(kExpert, in, out, cache, scratch);
  RowMatrix<double> want(kRows, d);
  bank.forward(kExpert, in, want, scratch);
  CHECK((out - want).norm() <= 1e-12 * want.norm());

  bank.zero_grad();
  bank.backward(kExpert, in, cache, r, din, scratch);

  // Input gradient.
  const RowMatrix<double> fd_in =
      fd_input(in, kEps, [&](const RowMatrix<double>& x) { return loss(bank, kExpert, x, r); });
  check_gradient(din, fd_in, kind + " din", ZeroGradient::kFails);

  // Every parameter tensor, every entry (other experts' entries have gradient 0 both ways).
  for (Tensor& tensor : collect(bank)) {
    const RowMatrix<double> fd =
        fd_tensor(tensor, kEps, [&] { return loss(bank, kExpert, in, r); });
    check_gradient(tensor.grad, fd, kind + " " + tensor.name, ZeroGradient::kFails);
  }

  // A second backward accumulates: every gradient doubles (to rounding: the products add into
  // the gradient); din is written again.
  const std::vector<Tensor> once = collect(bank);
  din.setConstant(-7.0);
  bank.backward(kExpert, in, cache, r, din, scratch);
  CHECK((din - fd_in).norm() <= 1e-4 * fd_in.norm());
  const std::vector<Tensor> twice = collect(bank);
  REQUIRE(once.size() == twice.size());
  for (std::size_t i = 0; i < once.size(); ++i) {
    INFO(once[i].name);
    CHECK((twice[i].grad - 2.0 * once[i].grad).norm() <= 1e-12 * once[i].grad.norm());
  }

  // zero_grad clears; an empty block is a no-op.
  bank.zero_grad();
  RowMatrix<double> none_in(0, d), none_cache(0, bank.cache_width()), none_out(0, d);
  bank.backward(kExpert, none_in, none_cache, none_out, none_out, scratch);
  for (const Tensor& tensor : collect(bank)) CHECK(tensor.grad.isZero(0.0));
}

constexpr Index kDim = 6;
constexpr Index kHidden = 7;
constexpr Index kExperts = 3;

}  // namespace

TEST_CASE("SwiGLU expert gradients equal finite differences", "[experts][grad][glu]") {
  check_expert_gradients(
      moet::SwiGluExperts<double>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 3}),
      "swiglu");
}

TEST_CASE("GeGLU expert gradients equal finite differences", "[experts][grad][glu]") {
  check_expert_gradients(
      moet::GeGluExperts<double>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 4}),
      "geglu");
  check_expert_gradients(
      moet::GluExperts<double, moet::GeluTanh>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 5}),
      "geglu-tanh");
}

TEST_CASE("FFN expert gradients equal finite differences", "[experts][grad][ffn]") {
  // Non-zero biases, so their gradients and the pre-activation shift are exercised.
  auto with_biases = [](auto bank) {
    bank.edit().in_bias_stack() = random_rows(kExperts, kHidden, 21);
    bank.edit().out_bias_stack() = random_rows(kExperts, kDim, 22);
    return bank;
  };
  check_expert_gradients(
      with_biases(moet::GeluFfnExperts<double>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 6})),
      "ffn-gelu");
  check_expert_gradients(
      with_biases(moet::ReluFfnExperts<double>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 7})),
      "ffn-relu");
  check_expert_gradients(moet::GeluFfnExperts<double>({.model_dim = kDim,
                                                       .hidden_dim = kHidden,
                                                       .num_experts = kExperts,
                                                       .bias = false,
                                                       .init_seed = 8}),
                         "ffn-gelu-no-bias");
}

namespace {

// ||got - want|| <= rel ||want||, for a float result against the double one.
void check_near(const RowMatrix<float>& got, const RowMatrix<double>& want, double rel,
                const std::string& what) {
  INFO(what << ": relative error " << (got.cast<double>() - want).norm() / want.norm());
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  CHECK((got.cast<double>() - want).norm() <= rel * want.norm());
}

// The float bank's backward (the packed kernels when `packed`, else Eigen's products on its
// float weights) against a double bank's (Eigen, checked against finite differences above)
// holding the same weights: every gradient and din, for blocks of 1 to 40 rows.
template <class FBank, class DBank>
void check_against_double(FBank& fb, DBank& db, bool packed, double rel, const std::string& kind) {
  INFO(kind << (packed ? " packed" : " Eigen"));
  CHECK(fb.uses_packed_kernels() == packed);
  {
    auto edit = db.edit();
    for (std::size_t t = 0; t < FBank::kNumTensors; ++t) {
      const auto id = static_cast<typename FBank::Tensor>(t);
      if (fb.stack(id).size() > 0) edit.stack(id) = fb.stack(id).template cast<double>();
    }
  }
  const Index d = fb.model_dim();
  for (const Index n : {Index{1}, Index{5}, Index{17}, Index{40}}) {
    INFO("rows " << n);
    const RowMatrix<float> in = random_rows(n, d, static_cast<std::uint32_t>(40 + n)).cast<float>();
    const RowMatrix<float> dout =
        random_rows(n, d, static_cast<std::uint32_t>(80 + n)).cast<float>();
    typename FBank::Scratch fs;
    typename DBank::Scratch ds;
    RowMatrix<float> fout(n, d), fcache(n, fb.cache_width()), fdin(n, d);
    RowMatrix<double> dout_d(n, d), dcache(n, db.cache_width()), ddin(n, d);
    fb.zero_grad();
    db.zero_grad();
    fb.forward_train(1, in, fout, fcache, fs);
    db.forward_train(1, in.cast<double>(), dout_d, dcache, ds);
    fb.backward(1, in, fcache, dout, fdin, fs);
    db.backward(1, in.cast<double>(), dcache, dout.cast<double>(), ddin, ds);
    check_near(fdin, ddin, rel, "din");
    for (std::size_t t = 0; t < FBank::kNumTensors; ++t) {
      const auto id = static_cast<typename FBank::Tensor>(t);
      if (db.grad(id).size() == 0) continue;
      // Other experts' blocks are zero in both.
      check_near(fb.grad(id), db.grad(id), rel, "gradient " + std::to_string(t));
    }
  }
}

// Packed backward, then a stale copy (visit_parameters changed a weight: Eigen on the float
// weights, not the old transposed packs), then parameters_changed (packed on the new weights).
template <class FBank, class DBank>
void check_packed_backward(FBank fb, DBank db, double rel, const std::string& kind) {
  check_against_double(fb, db, true, rel, kind);
  fb.visit_parameters(
      [](std::string_view, moet::ParamMap<float> value, moet::ParamMap<float>) { value *= 1.5f; });
  check_against_double(fb, db, false, 1e-5, kind + " stale");
  fb.parameters_changed();
  check_against_double(fb, db, true, rel, kind + " repacked");
}

}  // namespace

TEST_CASE("backward on the packed kernels equals the double backward", "[experts][grad][packed]") {
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  // bf16: forward_train runs the bf16 copy (the cache holds bf16 products), the backward bf16
  // products (the weights packed transposed as bf16, each product's rows rounded to bf16).
  const double rel = format == moet::WeightFormat::kF32 ? 1e-5 : 2e-2;
  INFO("weights " << moet::weight_format_name(format));
  for (const auto& [d, f] : {std::pair<Index, Index>{16, 32}, {13, 37}, {40, 72}}) {
    INFO("d " << d << " f " << f);
    check_packed_backward(
        moet::SwiGluExperts<float>({.model_dim = d,
                                    .hidden_dim = f,
                                    .num_experts = 2,
                                    .init_seed = 3,
                                    .weight_format = format}),
        moet::SwiGluExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 2}), rel,
        "swiglu");
    check_packed_backward(
        moet::GeGluExperts<float>({.model_dim = d,
                                   .hidden_dim = f,
                                   .num_experts = 2,
                                   .init_seed = 4,
                                   .weight_format = format}),
        moet::GeGluExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 2}), rel,
        "geglu");
    moet::GeluFfnExperts<float> ffn({.model_dim = d,
                                     .hidden_dim = f,
                                     .num_experts = 2,
                                     .init_seed = 5,
                                     .weight_format = format});
    ffn.edit().in_bias_stack() = random_rows(2, f, 23).cast<float>();
    ffn.edit().out_bias_stack() = random_rows(2, d, 24).cast<float>();
    check_packed_backward(
        ffn, moet::GeluFfnExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 2}), rel,
        "ffn-gelu");
  }
}

TEST_CASE("packed_bytes counts the backward's transposed packs, per expert once it ran",
          "[experts][grad][packed]") {
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  INFO("weights " << moet::weight_format_name(format));
  constexpr Index d = 16;
  constexpr Index f = 40;
  moet::SwiGluExperts<float> bank(
      {.model_dim = d, .hidden_dim = f, .num_experts = 3, .weight_format = format});
  // Oracle: each weight of expert 1, transposed explicitly and packed in the backward's element
  // type (bf16 for a bf16 bank, float otherwise).
  std::size_t transposes = 0;
  for (const auto id : {moet::GluTensor::kGate, moet::GluTensor::kUp, moet::GluTensor::kDown}) {
    const RowMatrix<float> wt = bank.tensor(id, 1).transpose();
    transposes += format == moet::WeightFormat::kBf16
                      ? moet::detail::PackedMatrix<moet::detail::Bf16>(wt).bytes()
                      : moet::detail::PackedMatrix<float>(wt).bytes();
  }
  const std::size_t forward_only = bank.packed_bytes();
  const RowMatrix<float> in = random_rows(5, d, 61u).cast<float>();
  RowMatrix<float> out(5, d), cache(5, bank.cache_width()), din(5, d);
  moet::SwiGluExperts<float>::Scratch scratch;
  bank.zero_grad();
  CHECK(bank.packed_bytes() == forward_only);
  bank.forward_train(1, in, out, cache, scratch);
  bank.backward(1, in, cache, out, din, scratch);
  CHECK(bank.packed_bytes() == forward_only + transposes);
}

TEST_CASE("forward_train caches the pre-activations", "[experts][grad]") {
  const RowMatrix<double> in = random_rows(4, kDim, 31);
  moet::SwiGluExperts<double> glu(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 9});
  moet::SwiGluExperts<double>::Scratch glu_scratch;
  RowMatrix<double> out(4, kDim), cache(4, glu.cache_width());
  CHECK(glu.cache_width() == 2 * kHidden);
  glu.forward_train(2, in, out, cache, glu_scratch);
  CHECK((cache.leftCols(kHidden) - in * glu.gate_weights(2)).norm() <= 1e-12);
  CHECK((cache.rightCols(kHidden) - in * glu.up_weights(2)).norm() <= 1e-12);

  moet::GeluFfnExperts<double> ffn(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = 10});
  ffn.edit().in_bias_stack() = random_rows(kExperts, kHidden, 32);
  moet::GeluFfnExperts<double>::Scratch ffn_scratch;
  RowMatrix<double> ffn_cache(4, ffn.cache_width());
  CHECK(ffn.cache_width() == kHidden);
  ffn.forward_train(0, in, out, ffn_cache, ffn_scratch);
  const RowMatrix<double> pre = (in * ffn.in_weights(0)).rowwise() + ffn.in_bias(0);
  CHECK((ffn_cache - pre).norm() <= 1e-12);
}

TEST_CASE("Expert banks visit their parameters by name, in a fixed order", "[experts][grad]") {
  moet::SwiGluExperts<float> glu({.model_dim = 4, .hidden_dim = 5, .num_experts = 2});
  std::vector<std::string> names;
  std::vector<Index> rows;
  glu.visit_parameters(
      [&](std::string_view name, moet::ParamMap<float> value, moet::ParamMap<float> grad) {
        names.emplace_back(name);
        rows.push_back(value.rows());
        CHECK(grad.isZero(0.0f));  // allocated zero on first visit
      });
  CHECK(names == std::vector<std::string>{"gate", "up", "down"});
  CHECK(rows == std::vector<Index>{8, 8, 10});

  names.clear();
  moet::GeluFfnExperts<float> ffn({.model_dim = 4, .hidden_dim = 5, .num_experts = 2});
  ffn.visit_parameters([&](std::string_view name, moet::ParamMap<float>, moet::ParamMap<float>) {
    names.emplace_back(name);
  });
  CHECK(names == std::vector<std::string>{"in_weight", "in_bias", "out_weight", "out_bias"});

  names.clear();
  moet::GeluFfnExperts<float> bare(
      {.model_dim = 4, .hidden_dim = 5, .num_experts = 2, .bias = false});
  bare.visit_parameters([&](std::string_view name, moet::ParamMap<float>, moet::ParamMap<float>) {
    names.emplace_back(name);
  });
  CHECK(names == std::vector<std::string>{"in_weight", "out_weight"});
}

TEMPLATE_TEST_CASE("activation_value_and_derivative equals apply and derivative",
                   "[experts][activations][grad]", moet::Silu, moet::Gelu, moet::GeluTanh,
                   moet::Relu) {
  for (float v = -30.0F; v <= 30.0F; v += 0.37F) {
    float value = 0.0F;
    float slope = 0.0F;
    moet::activation_value_and_derivative<TestType>(v, value, slope);
    CHECK(value == TestType::apply(v));
    CHECK(slope == TestType::derivative(v));
  }
}

}  // namespace test_grad_experts
