// save_parameters / load_parameters (io/parameters.hpp): a trained layer saved and loaded into a
// fresh one of the same architecture gives bit-identical forwards; the file holds each parameter
// under its name and shape; mismatched files are clear errors.
#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/dispatch/shared_gate.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/io/parameters.hpp"
#include "moet/layer.hpp"
#include "moet/train/optim.hpp"

#include "io_test_util.hpp"

namespace test_io_parameters {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using moet::Index;
using Matrix = moet::RowMatrix<float>;

constexpr Index kDim = 24, kHidden = 40, kExperts = 6;

auto make_layer(std::uint64_t seed) {
  auto options = moet::GroupedTopKGate<float>::deepseek_v3_options(kDim, kExperts, 2, 3, 2, 2.5);
  options.init_seed = seed;
  return moet::MoELayer(
      moet::GroupedTopKGate<float>(options),
      moet::SwiGluExperts<float>(
          {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts, .init_seed = seed}),
      moet::SwiGluExperts<float>(
          {.model_dim = kDim, .hidden_dim = 16, .num_experts = 1, .init_seed = seed + 1}),
      moet::SharedExpertGate<float>({.model_dim = kDim, .init_seed = seed + 2}));
}

Matrix random_rows(Index rows, std::uint64_t seed) {
  moet::detail::Rng rng(seed);
  Matrix x(rows, kDim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(rng.normal());
  return x;
}

}  // namespace

TEST_CASE("A trained layer saved and loaded gives the same forward, bit for bit",
          "[io][parameters]") {
  io_test::TempDir tmp;
  auto layer = make_layer(1);
  // A few AdamW steps so the parameters are not the initialisation.
  moet::AdamW<float> opt({.lr = 1e-2});
  decltype(layer)::Workspace ws;
  const Matrix x = random_rows(40, 7);
  Matrix y(40, kDim), dx(40, kDim);
  for (int step = 0; step < 3; ++step) {
    layer.zero_grad();
    layer.forward_train(x, y, {.training = true}, ws);
    dx.setZero();
    layer.backward(x, y, {.training = true}, ws, dx);
    opt.step(layer);
  }
  moet::save_parameters(layer, tmp / "layer.safetensors");
  const Matrix want = layer.forward(x);  // still runs after the save's visit

  auto other = make_layer(2);
  CHECK(other.forward(x) != want);
  moet::load_parameters(other, tmp / "layer.safetensors");
  CHECK(other.forward(x) == want);

  // The file: one tensor per parameter, under its name and moet's shape, F32, moet metadata.
  const auto file = moet::SafetensorsFile::open(tmp / "layer.safetensors");
  CHECK(file.metadata().at("format") == "moet");
  std::vector<std::string> names;
  layer.visit_parameters([&](std::string_view name, auto value, auto) {
    names.emplace_back(name);
    const auto t = file.tensor(name);
    CHECK(t.dtype() == moet::Dtype::kF32);
    CHECK(t.to_matrix() == value);
  });
  std::sort(names.begin(), names.end());
  CHECK(names == file.names());  // sorted
  CHECK(file.contains("gate.router.weight"));
  CHECK(file.contains("experts.down"));
  CHECK(file.contains("shared_gate.weight"));

  // BF16: half the bytes, the values rounded.
  moet::save_parameters(layer, tmp / "bf16.safetensors", moet::Dtype::kBf16);
  auto rounded = make_layer(3);
  moet::load_parameters(rounded, tmp / "bf16.safetensors");
  const double err = double((rounded.forward(x) - want).norm() / want.norm());
  CHECK(err > 0.0);
  CHECK(err < 2e-2);
}

TEST_CASE("load_parameters refuses a file of another architecture", "[io][parameters][errors]") {
  io_test::TempDir tmp;
  auto layer = make_layer(1);
  moet::save_parameters(layer, tmp / "layer.safetensors");
  // Fewer experts: every expert stack has another shape.
  auto smaller = moet::MoELayer(
      moet::TopPGate<float>({.model_dim = kDim, .num_experts = 4}),
      moet::SwiGluExperts<float>({.model_dim = kDim, .hidden_dim = kHidden, .num_experts = 4}));
  CHECK_THROWS_WITH(moet::load_parameters(smaller, tmp / "layer.safetensors"),
                    Contains("gate.router.weight") && Contains("[24, 4]"));
  // No shared experts: the file has tensors the model does not.
  auto plain =
      moet::MoELayer(moet::GroupedTopKGate<float>(moet::GroupedTopKGate<float>::deepseek_v3_options(
                         kDim, kExperts, 2, 3, 2, 2.5)),
                     moet::SwiGluExperts<float>(
                         {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts}));
  CHECK_THROWS_WITH(moet::load_parameters(plain, tmp / "layer.safetensors"),
                    Contains("tensor 'shared.down' is not a parameter of this model (4 such"));
  // A model with more parameters than the file.
  moet::SafetensorsWriter w;
  w.add("gate.router.weight", Matrix::Zero(kDim, kExperts));
  w.write(tmp / "partial.safetensors");
  CHECK_THROWS_WITH(moet::load_parameters(layer, tmp / "partial.safetensors"),
                    Contains("experts.gate"));
  CHECK_THROWS_WITH(moet::load_parameters(layer, tmp / "missing.safetensors"),
                    Contains("missing.safetensors"));
}

}  // namespace test_io_parameters
