// Pretrained checkpoints as moet layers (io/checkpoint.hpp): every fixture family and GGUF file
// through load_moe_layer against the reference outputs of tests/fixtures (float64 PyTorch ports
// and llama.cpp's build_moe_ffn on the dequantised weights), in f32, bf16 and the GGUF block
// formats; the layer descriptions (MoE and dense layers, router kinds); the checkpoints' routers
// driving TopPGate, TopKGate at another k and ImportanceGate; and every bad checkpoint.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "moet/gates/importance.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/io/checkpoint.hpp"
#include "moet/io/npy.hpp"
#include "moet/kernel_isa.hpp"

#include "io_test_util.hpp"

namespace test_io_checkpoint {  // one per file: the unity build puts several files in one TU

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using moet::Index;
using Json = nlohmann::json;
using Matrix = moet::RowMatrix<float>;

const fs::path kFixtures = MOET_FIXTURES_DIR;

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return Json::parse(in);
}

// max_i |y_i - want_i| / (|want_i| + rms(want)): each element relative to itself, with the
// output's RMS as the floor (float32 products leave absolute errors of a few 1e-7 of the terms'
// size on elements that cancel to near 0; the references are float64).
double elementwise_error(const Matrix& y, const Matrix& want) {
  REQUIRE(y.rows() == want.rows());
  REQUIRE(y.cols() == want.cols());
  const double rms = double(want.norm()) / std::sqrt(double(want.size()));
  double worst = 0.0;
  for (Index i = 0; i < y.size(); ++i) {
    const double w = want.data()[i];
    worst = std::max(worst, std::abs(double(y.data()[i]) - w) / (std::abs(w) + rms));
  }
  return worst;
}
// ||y - want|| / ||want|| (Frobenius).
double relative_error(const Matrix& y, const Matrix& want) {
  return double((y - want).norm() / want.norm());
}

std::vector<Index> sorted(std::span<const std::int32_t> ids) {
  std::vector<Index> out(ids.begin(), ids.end());
  std::sort(out.begin(), out.end());
  return out;
}

template <class Layer>
void check_routing(const Layer& layer, const Matrix& x, const Json& want_ids) {
  typename Layer::Workspace ws;
  Matrix y(x.rows(), x.cols());
  layer.forward(x, y, {}, ws);
  REQUIRE(want_ids.size() == std::size_t(x.rows()));
  for (Index t = 0; t < x.rows(); ++t) {
    auto want = want_ids[std::size_t(t)].get<std::vector<Index>>();
    std::sort(want.begin(), want.end());
    CHECK(sorted(ws.routing.experts(t)) == want);
  }
}

// True when the block-format kernels multiply 8-bit quantised activations: every x86 level
// (vpdpbusd with VNNI, vpmaddubsw + vpmaddwd on kAvx2 and kAvx512); the portable level
// dequantises the weights.
bool integer_dot() { return moet::kernel_isa() != moet::KernelIsa::kPortable; }

// Each row's blocks of 32 quantised to 8 bits (scale max|x| / 127, round half away from zero),
// as the integer-dot kernels do; unchanged on the other levels.
Matrix kernel_activations(const Matrix& a) {
  if (!integer_dot()) return a;
  Matrix out(a.rows(), a.cols());
  for (Index r = 0; r < a.rows(); ++r) {
    for (Index b0 = 0; b0 < a.cols(); b0 += 32) {
      const Index len = std::min<Index>(32, a.cols() - b0);
      float amax = 0.0f;
      for (Index i = 0; i < len; ++i) amax = std::max(amax, std::abs(a(r, b0 + i)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      for (Index i = 0; i < len; ++i) out(r, b0 + i) = d * std::round(a(r, b0 + i) * id);
    }
  }
  return out;
}

// One SwiGLU expert of moet-layout weights on row x, in double, with the kernels' activations.
Eigen::RowVectorXd expert_reference(const Matrix& x, const Matrix& g, const Matrix& u,
                                    const Matrix& dn) {
  const Eigen::RowVectorXd xq = kernel_activations(x).row(0).cast<double>();
  const Eigen::RowVectorXd gv = xq * g.cast<double>();
  const Eigen::RowVectorXd uv = xq * u.cast<double>();
  Matrix h(1, g.cols());
  for (Index j = 0; j < h.cols(); ++j) h(0, j) = float(gv(j) / (1.0 + std::exp(-gv(j))) * uv(j));
  return kernel_activations(h).row(0).cast<double>() * dn.cast<double>();
}

// Layer `l` of `ckpt` recomputed for `layer`'s plan on `x` from the stored weights (an f32
// training copy of the layer), the activations rounded as the kernels round them.
template <class Layer>
Matrix quantised_reference(const moet::Checkpoint& ckpt, Index l, const Layer& layer,
                           const Matrix& x) {
  const auto w = moet::load_moe_layer(
      ckpt, l, {.weight_format = moet::WeightFormat::kF32, .inference_only = false});
  typename Layer::Workspace ws;
  Matrix y(x.rows(), x.cols());
  layer.forward(x, y, {}, ws);
  Matrix out = Matrix::Zero(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    const Matrix xt = x.row(t);
    Eigen::RowVectorXd acc = Eigen::RowVectorXd::Zero(x.cols());
    for (std::size_t j = 0; j < ws.routing.experts(t).size(); ++j) {
      const Index e = ws.routing.experts(t)[j];
      const auto& b = w.experts();
      acc += double(ws.routing.weights(t)[j]) *
             expert_reference(xt, b.gate_weights(e), b.up_weights(e), b.down_weights(e));
    }
    if (w.has_shared_experts()) {
      const auto& s = w.shared_experts();
      double g = 1.0;
      if (w.has_shared_gate()) {
        g = 1.0 / (1.0 + std::exp(-double(xt.row(0).dot(w.shared_gate().weights().col(0)))));
      }
      acc += g * expert_reference(xt, s.gate_weights(0), s.up_weights(0), s.down_weights(0));
    }
    out.row(t) = acc.cast<float>();
  }
  return out;
}

const char* const kFamilies[] = {"mixtral", "qwen2_moe",   "qwen3_moe",
                                 "olmoe",   "deepseek_v2", "deepseek_v3"};

}  // namespace

TEST_CASE("Every fixture family's MoE layers match the reference outputs in f32 and bf16",
          "[io][checkpoint]") {
  for (const char* family : kFamilies) {
    INFO("family " << family);
    const fs::path dir = kFixtures / "checkpoints" / family;
    const Json manifest = read_json(dir / "manifest.json");
    const Json routing = read_json(dir / "reference" / "routing.json");
    const auto ckpt = moet::Checkpoint::open(dir);
    for (const auto& ref : manifest.at("references")) {
      const Index l = ref.at("layer").get<Index>();
      INFO("layer " << l);
      const Matrix x = moet::read_npy(dir / ref.at("x").get<std::string>()).matrix();
      const Matrix want = moet::read_npy(dir / ref.at("y").get<std::string>()).matrix();

      auto f32 = moet::load_moe_layer(ckpt, l, {.weight_format = moet::WeightFormat::kF32});
      const Matrix y = f32.forward(x);
      const double err = elementwise_error(y, want);
      INFO("f32: largest elementwise relative error " << err);
      CHECK(err <= 1e-5);
      CHECK(relative_error(y, want) <= 1e-5);
      WARN(family << " layer " << l << " f32: elementwise " << err << ", Frobenius "
                  << relative_error(y, want));  // for the report
      check_routing(f32, x, routing.at(std::to_string(l)).at("topk_ids"));

      auto bf16 = moet::load_moe_layer(ckpt, l, {.weight_format = moet::WeightFormat::kBf16});
      const double bf16_err = relative_error(bf16.forward(x), want);
      INFO("bf16: relative error " << bf16_err);
      CHECK(bf16_err <= 1e-2);
      WARN(family << " layer " << l << " bf16: Frobenius " << bf16_err);

      // A trainable (not inference-only) layer gives the f32 layer's bits.
      auto trainable = moet::load_moe_layer(
          ckpt, l, {.weight_format = moet::WeightFormat::kF32, .inference_only = false});
      CHECK(trainable.forward(x) == y);
    }
  }
}

TEST_CASE("Checkpoint describes every layer: MoE or dense, experts, k, widths, routing",
          "[io][checkpoint]") {
  for (const char* family : kFamilies) {
    INFO("family " << family);
    const fs::path dir = kFixtures / "checkpoints" / family;
    const Json manifest = read_json(dir / "manifest.json");
    const auto ckpt = moet::Checkpoint::open(dir);
    const moet::CheckpointInfo& info = ckpt.info();
    CHECK(info.family == manifest.at("model_type").get<std::string>());
    CHECK(info.model_dim == 64);
    CHECK(info.moe_layers() == manifest.at("moe_layers").get<std::vector<Index>>());
    for (const Index l : manifest.at("dense_layers").get<std::vector<Index>>()) {
      CHECK_FALSE(info.layer(l).moe);
      CHECK(info.layer(l).router_kind() == "dense");
      CHECK(info.layer(l).hidden_dim == 32);
      CHECK_THROWS_WITH(
          moet::load_moe_layer(ckpt, l),
          Contains("layer " + std::to_string(l) + " is dense") && Contains("the MoE layers are 1"));
    }
  }
  const auto layer = [](const char* family, Index l) {
    return moet::Checkpoint::open(kFixtures / "checkpoints" / family).info().layer(l);
  };
  CHECK(layer("mixtral", 0).router_kind() == "softmax top-2, renormalised");
  CHECK(layer("mixtral", 0).num_experts == 4);
  CHECK(layer("mixtral", 0).hidden_dim == 16);
  const auto qwen2 = layer("qwen2_moe", 1);
  CHECK(qwen2.router_kind() == "softmax top-2");
  CHECK(qwen2.shared_gate);
  CHECK(qwen2.num_shared_experts == 1);
  CHECK(qwen2.shared_hidden_dim == 32);
  CHECK(layer("qwen3_moe", 1).router_kind() == "softmax top-2, renormalised");
  CHECK(layer("qwen3_moe", 1).num_experts == 8);
  CHECK(layer("olmoe", 1).router_kind() == "softmax top-2");
  const auto v2 = layer("deepseek_v2", 1);
  CHECK(v2.router_kind() == "softmax, 4 groups keep 2 (best), top-3, x16");
  CHECK(v2.num_shared_experts == 2);
  CHECK(v2.shared_hidden_dim == 16);
  CHECK_FALSE(v2.shared_gate);
  const auto v3 = layer("deepseek_v3", 1);
  CHECK(v3.router_kind() ==
        "sigmoid + bias, 4 groups keep 2 (top-2 sum), top-4, renormalised, x2.5");
  CHECK(v3.score_bias);
  CHECK(v3.routing.scaling == moet::WeightScaling::kAfterNormalization);
  CHECK_THROWS_WITH(layer("mixtral", 2), Contains("there is no layer 2 (2 layers)"));
}

TEST_CASE("Every GGUF fixture matches its reference, blocks packed as they are",
          "[io][checkpoint][gguf]") {
  const Json all = read_json(kFixtures / "gguf" / "manifest.json");
  for (const char* name : {"qwen2moe_float", "deepseek2_q8_0", "olmoe_q4_0"}) {
    INFO("file " << name);
    const Json& m = all.at(name);
    const auto ckpt = moet::Checkpoint::open(kFixtures / "gguf" / m.at("file").get<std::string>());
    const Index l = m.at("routing").at("block").get<Index>();
    const Matrix x = moet::read_npy(kFixtures / "gguf" / m.at("x").get<std::string>()).matrix();
    const Matrix want = moet::read_npy(kFixtures / "gguf" / m.at("y").get<std::string>()).matrix();
    CHECK(ckpt.info().family == m.at("architecture").get<std::string>());
    CHECK(ckpt.info().format == moet::CheckpointFormat::kGguf);

    // The file's own format (blocks packed as they are for Q8_0 and Q4_0).
    auto native = moet::load_moe_layer(ckpt, l);
    check_routing(native, x, m.at("routing").at("topk_ids"));
    const moet::WeightFormat format = native.experts().options().weight_format;
    const Matrix y = native.forward(x);
    const double err = relative_error(y, want);
    INFO(moet::weight_format_name(format) << ": relative error " << err);
    WARN(name << " " << moet::weight_format_name(format) << " on "
              << moet::kernel_isa_name(moet::kernel_isa()) << ": Frobenius " << err
              << ", elementwise " << elementwise_error(y, want));
    if (format == moet::WeightFormat::kF32) {
      CHECK(elementwise_error(y, want) <= 1e-5);
      CHECK(err <= 1e-5);
    } else {
      // Against the same plan through the stored (dequantised) weights, with the activations
      // 8-bit block-quantised where the kernels do so (integer dot products): float rounding
      // only. The reference output itself is further off by the activation quantisation.
      const double q_err = relative_error(y, quantised_reference(ckpt, l, native, x));
      WARN(name << ": against the same weights with the kernels' activation rounding " << q_err);
      CHECK(q_err <= 1e-5);
      CHECK(err <= (integer_dot() ? 2e-2 : 1e-5));
    }
    // The same weights dequantised into an f32 bank: float rounding only.
    auto f32 = moet::load_moe_layer(ckpt, l, {.weight_format = moet::WeightFormat::kF32});
    const Matrix y32 = f32.forward(x);
    const double f32_err = elementwise_error(y32, want);
    INFO("dequantised into f32: elementwise error " << f32_err);
    CHECK(f32_err <= 1e-5);
    CHECK(relative_error(y32, want) <= 1e-5);
    WARN(name << " dequantised into f32: Frobenius " << relative_error(y32, want)
              << ", elementwise " << f32_err);
  }
  const auto q8 = moet::Checkpoint::open(kFixtures / "gguf" / "deepseek2_q8_0.gguf");
  CHECK(q8.native_weight_format(1) == moet::WeightFormat::kQ8_0);
  CHECK_FALSE(q8.info().layer(0).moe);
  CHECK(q8.info().layer(0).hidden_dim == 32);
  CHECK(q8.info().layer(1).router_kind() == "sigmoid + bias top-2, renormalised, x2.5");
  CHECK_THROWS_WITH(moet::load_moe_layer(q8, 0), Contains("layer 0 is dense"));
  const auto qwen = moet::Checkpoint::open(kFixtures / "gguf" / "qwen2moe_float.gguf");
  CHECK(qwen.info().layer(0).shared_gate);
  CHECK(moet::load_moe_layer(qwen, 0).has_shared_gate());
}

TEST_CASE("A checkpoint's router drives TopPGate, TopKGate at another k and ImportanceGate",
          "[io][checkpoint][top_p]") {
  const fs::path dir = kFixtures / "checkpoints" / "qwen3_moe";
  const auto ckpt = moet::Checkpoint::open(dir);
  const Matrix x = moet::read_npy(dir / "reference" / "layer1_x.npy").matrix();
  const Matrix router = ckpt.router(1).to_matrix();  // [E, d]
  auto own = moet::load_moe_layer(ckpt, 1, {.weight_format = moet::WeightFormat::kF32});

  for (const double p : {0.3, 0.6, 0.9}) {
    INFO("p = " << p);
    auto layer = moet::load_moe_layer<moet::TopPGate<float>>(
        ckpt, 1, {.weight_format = moet::WeightFormat::kF32}, {{.p = p}});
    CHECK(layer.gate().router() == router.transpose());
    CHECK(layer.gate().options().p == p);
    decltype(layer)::Workspace ws;
    Matrix y(x.rows(), x.cols());
    layer.forward(x, y, {}, ws);
    // Each token keeps the smallest prefix of its sorted softmax probabilities passing p,
    // weighted by those probabilities, run through the checkpoint's experts.
    moet::SwiGluExperts<float>::Scratch scratch;
    for (Index t = 0; t < x.rows(); ++t) {
      Eigen::RowVectorXd z = x.row(t).cast<double>() * router.transpose().cast<double>();
      Eigen::RowVectorXd prob = (z.array() - z.maxCoeff()).exp();
      prob /= prob.sum();
      std::vector<Index> order(std::size_t(prob.size()));
      std::iota(order.begin(), order.end(), Index{0});
      std::sort(order.begin(), order.end(), [&](Index a, Index b) { return prob(a) > prob(b); });
      double cum = 0.0;
      std::vector<Index> kept;
      for (const Index e : order) {
        if (cum > p) break;
        kept.push_back(e);
        cum += prob(e);
      }
      std::sort(kept.begin(), kept.end());
      CHECK(sorted(ws.routing.experts(t)) == kept);
      Eigen::RowVectorXf want = Eigen::RowVectorXf::Zero(x.cols());
      Matrix out(1, x.cols());
      for (const Index e : kept) {
        own.experts().forward(e, x.row(t), out, scratch);
        want += float(prob(e)) * out.row(0);
      }
      CHECK((y.row(t) - want).norm() <= 1e-5f * want.norm());
    }
    WARN("qwen3_moe layer 1, top-p " << p << ": mean k " << ws.stats.mean_k);
  }

  auto top3 = moet::load_moe_layer<moet::TopKGate<float>>(ckpt, 1, {}, {{.k = 3}});
  CHECK(top3.gate().options().k == 3);
  CHECK_FALSE(top3.gate().options().renormalize);
  CHECK(top3.forward(x).allFinite());
  auto own_top_k = moet::load_moe_layer<moet::TopKGate<float>>(ckpt, 1);
  CHECK(own_top_k.gate().options().k == 2);  // the checkpoint's k and renormalisation
  CHECK(own_top_k.gate().options().renormalize);
  CHECK((own_top_k.forward(x) - own.forward(x)).norm() <= 1e-5f * own.forward(x).norm());
  auto importance = moet::load_moe_layer<moet::ImportanceGate<float>>(ckpt, 1, {}, {{.k_max = 4}});
  std::vector<float> imp(std::size_t(x.rows()));
  for (Index t = 0; t < x.rows(); ++t) imp[std::size_t(t)] = x.row(t).norm();
  moet::RouteContext ctx;
  ctx.importance = imp;
  CHECK(importance.forward(x, ctx).allFinite());
  CHECK(importance.stats().mean_k > 1.0);
}

namespace {

// A tiny Mixtral-style checkpoint written here: `layers` MoE layers of 4 experts of width 8 on
// d = 32 (every tensor F32), with `edit` applied to the config first.
void write_tiny(const fs::path& dir, Json cfg, const std::vector<std::string>& skip = {},
                const std::string& transposed = "") {
  fs::create_directories(dir);
  moet::SafetensorsWriter w;
  moet::detail::Rng rng(5);
  const auto add = [&](const std::string& name, Index rows, Index cols) {
    if (std::find(skip.begin(), skip.end(), name) != skip.end()) return;
    Matrix m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal() * 0.2);
    if (name == transposed) m.transposeInPlace();
    w.add(name, m);
  };
  for (Index l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".block_sparse_moe.";
    add(p + "gate.weight", 4, 32);
    for (Index e = 0; e < 4; ++e) {
      const std::string q = p + "experts." + std::to_string(e) + ".";
      add(q + "w1.weight", 8, 32);
      add(q + "w3.weight", 8, 32);
      add(q + "w2.weight", 32, 8);
    }
  }
  w.write(dir / "model.safetensors");
  std::ofstream(dir / "config.json") << cfg.dump(2);
}

Json tiny_config() {
  return {{"model_type", "mixtral"}, {"hidden_size", 32},      {"num_hidden_layers", 2},
          {"intermediate_size", 8},  {"num_local_experts", 4}, {"num_experts_per_tok", 2}};
}

}  // namespace

TEST_CASE("Bad checkpoints are clear moet::Errors", "[io][checkpoint][errors]") {
  io_test::TempDir tmp;
  const auto open = [&](const std::string& name) { return moet::Checkpoint::open(tmp / name); };

  write_tiny(tmp / "good", tiny_config());
  CHECK(moet::load_moe_layer(open("good"), 1).forward(Matrix::Ones(3, 32)).allFinite());

  SECTION("a missing tensor") {
    write_tiny(tmp / "missing", tiny_config(),
               {"model.layers.1.block_sparse_moe.experts.2.w3.weight"});
    const auto ckpt = open("missing");
    CHECK_NOTHROW(moet::load_moe_layer(ckpt, 0));
    CHECK_THROWS_WITH(moet::load_moe_layer(ckpt, 1),
                      Contains("model.layers.1.block_sparse_moe.experts.2.w3.weight"));
  }
  SECTION("a wrong shape") {
    write_tiny(tmp / "shape", tiny_config(), {},
               "model.layers.0.block_sparse_moe.experts.1.w2.weight");
    CHECK_THROWS_WITH(moet::load_moe_layer(open("shape"), 0), Contains("experts.1.w2.weight") &&
                                                                  Contains("[8, 32]") &&
                                                                  Contains("[32, 8]"));
  }
  SECTION("a router of another width") {
    Json cfg = tiny_config();
    cfg["hidden_size"] = 16;
    write_tiny(tmp / "width", cfg);
    CHECK_THROWS_WITH(moet::load_moe_layer(open("width"), 0),
                      Contains("block_sparse_moe.gate.weight' shape [4, 32], expected [4, 16]"));
  }
  SECTION("inconsistent or incomplete configs") {
    Json cfg = tiny_config();
    cfg["num_experts_per_tok"] = 5;
    write_tiny(tmp / "k", cfg);
    CHECK_THROWS_WITH(open("k"), Contains("experts per token (5) must be in [1, 4]"));
    cfg = tiny_config();
    cfg.erase("num_local_experts");
    write_tiny(tmp / "no_experts", cfg);
    CHECK_THROWS_WITH(open("no_experts"), Contains("config.json has no 'num_local_experts'"));
    cfg = tiny_config();
    cfg["model_type"] = "llama";
    write_tiny(tmp / "family", cfg);
    CHECK_THROWS_WITH(open("family"), Contains("model_type 'llama' is not a family moet loads") &&
                                          Contains("deepseek_v3"));
    cfg = tiny_config();
    cfg["num_experts_per_tok"] = "two";
    write_tiny(tmp / "type", cfg);
    CHECK_THROWS_WITH(open("type"),
                      Contains("'num_experts_per_tok' must be a non-negative integer"));
    cfg = tiny_config();
    cfg["model_type"] = "deepseek_v3";
    cfg["n_routed_experts"] = 6;
    cfg["moe_intermediate_size"] = 8;
    cfg["n_group"] = 4;
    cfg["topk_group"] = 2;
    write_tiny(tmp / "groups", cfg);
    CHECK_THROWS_WITH(open("groups"), Contains("4 expert groups do not divide 6 experts"));
    cfg["n_routed_experts"] = 8;
    cfg["topk_method"] = "greedy";
    write_tiny(tmp / "method", cfg);
    CHECK_THROWS_WITH(open("method"), Contains("topk_method 'greedy'"));
    CHECK_THROWS_WITH(moet::Checkpoint::open(tmp / "nowhere"), Contains("no config.json"));
    fs::create_directories(tmp / "no_weights");
    std::ofstream(tmp / "no_weights" / "config.json") << tiny_config().dump();
    CHECK_THROWS_WITH(open("no_weights"), Contains("no model.safetensors"));
    std::ofstream(tmp / "no_weights" / "config.json") << "{not json";
    CHECK_THROWS_WITH(open("no_weights"), Contains("config.json is not JSON"));
  }
  SECTION("a non-finite weight") {
    write_tiny(tmp / "nan", tiny_config());
    moet::SafetensorsWriter w;
    Matrix m = Matrix::Zero(4, 32);
    m(2, 3) = std::numeric_limits<float>::quiet_NaN();
    // Rewrite the file with a NaN router for layer 0 (every other tensor as before).
    const auto old = moet::SafetensorsFile::open(tmp / "nan" / "model.safetensors");
    for (const auto& name : old.names()) {
      w.add(name, name == "model.layers.0.block_sparse_moe.gate.weight"
                      ? m
                      : old.tensor(name).to_matrix());
    }
    w.write(tmp / "nan" / "model2.safetensors");
    fs::rename(tmp / "nan" / "model2.safetensors", tmp / "nan" / "model.safetensors");
    CHECK_THROWS_WITH(moet::load_moe_layer(open("nan"), 0), Contains("must be finite"));
  }
  SECTION("an expert out of range and missing shared experts") {
    const auto ckpt = open("good");
    CHECK_THROWS_WITH(ckpt.expert(0, 4, moet::GluTensor::kUp), Contains("has no expert 4"));
    CHECK_THROWS_WITH(ckpt.shared(0, moet::GluTensor::kUp), Contains("has no shared experts"));
    CHECK_THROWS_WITH(ckpt.shared_gate(0), Contains("has no shared-expert gate"));
  }
}

TEST_CASE("Layers loaded on 1 and 2 threads are identical", "[io][checkpoint][parallel]") {
  const auto ckpt = moet::Checkpoint::open(kFixtures / "checkpoints" / "deepseek_v3");
  const Matrix x =
      moet::read_npy(kFixtures / "checkpoints" / "deepseek_v3" / "reference" / "layer1_x.npy")
          .matrix();
  const int saved = moet::num_threads();
  std::vector<Matrix> outputs;
  for (const int threads : {1, 2}) {
    moet::set_num_threads(threads);
    for (const auto format : {moet::WeightFormat::kF32, moet::WeightFormat::kBf16}) {
      outputs.push_back(moet::load_moe_layer(ckpt, 1, {.weight_format = format}).forward(x));
    }
  }
  moet::set_num_threads(saved);
  CHECK(outputs[0] == outputs[2]);
  CHECK(outputs[1] == outputs[3]);
}

}  // namespace test_io_checkpoint
