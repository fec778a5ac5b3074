// The committed fixtures (tests/fixtures, written by make_checkpoints.py and make_gguf.py) read
// back through moet's readers: every tensor's dtype, shape and values (sums, first and last
// against the manifests the scripts wrote), the config.json and GGUF architecture keys, which
// layers are MoE by each family's rule, and the reference outputs recomputed here in double
// from the tensors as read, by a second port of each family's routing written in C++ (so the
// Python ports, the fixtures' layout and the readers' conversions check one another).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "moet/errors.hpp"
#include "moet/io/gguf.hpp"
#include "moet/io/npy.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/tensor.hpp"

namespace test_io_fixtures {  // one per file: the unity build puts several files in one TU

namespace {

namespace fs = std::filesystem;
using moet::Index;
using Json = nlohmann::json;
using Mat = moet::RowMatrix<double>;

const fs::path kFixtures = MOET_FIXTURES_DIR;

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return Json::parse(in);
}

template <class View>
void check_values(const View& t, const Json& expect) {
  const moet::RowMatrix<float> m = t.to_matrix();
  double sum = 0.0;
  double abs_sum = 0.0;
  for (Index i = 0; i < m.size(); ++i) {
    sum += static_cast<double>(m.data()[i]);
    abs_sum += std::abs(static_cast<double>(m.data()[i]));
  }
  const double abs_expect = expect.at("abs_sum").get<double>();
  CHECK(sum == Approx(expect.at("sum").get<double>()).margin(1e-9 * abs_expect));
  CHECK(abs_sum == Approx(abs_expect).epsilon(1e-12));
  CHECK(static_cast<double>(m.data()[0]) == expect.at("first").get<double>());
  CHECK(static_cast<double>(m.data()[m.size() - 1]) == expect.at("last").get<double>());
}

// --- a second port of the families' MoE blocks, in double -------------------------------------
Mat mat(const moet::TensorView& t) { return t.to_matrix().cast<double>(); }
Mat mat(const moet::GgufTensor& t) { return t.to_matrix().cast<double>(); }

struct Glu {
  Mat gate, up, down;  // [ff, embd], [ff, embd], [embd, ff], as nn.Linear stores them
};

Mat swiglu(const Mat& x, const Glu& g) {
  const Mat h = x * g.gate.transpose();  // (T, ff)
  const Mat u = x * g.up.transpose();    // (T, ff)
  Mat a(h.rows(), h.cols());
  for (Index i = 0; i < h.size(); ++i) {
    const double v = h.data()[i];
    a.data()[i] = v / (1.0 + std::exp(-v)) * u.data()[i];
  }
  return a * g.down.transpose();  // (T, embd)
}

struct Choice {
  std::vector<Index> ids;
  std::vector<double> weights;
};

std::vector<Index> top(const std::vector<double>& s, Index k) {
  std::vector<Index> idx(s.size());
  std::iota(idx.begin(), idx.end(), Index{0});
  std::stable_sort(idx.begin(), idx.end(), [&](Index a, Index b) {
    return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
  });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

std::vector<double> row(const Mat& m, Index t) {
  return {m.row(t).data(), m.row(t).data() + m.cols()};
}

std::vector<double> softmax(std::vector<double> z) {
  const double mx = *std::max_element(z.begin(), z.end());
  double sum = 0.0;
  for (double& v : z) sum += (v = std::exp(v - mx));
  for (double& v : z) v /= sum;
  return z;
}

// Mixtral / Qwen / OLMoE / llama.cpp softmax routing: top-k of the probabilities.
Choice softmax_topk(const std::vector<double>& logits, Index k, bool renormalise) {
  const auto p = softmax(logits);
  Choice c{top(p, k), {}};
  for (const Index e : c.ids) c.weights.push_back(p[static_cast<std::size_t>(e)]);
  if (renormalise) {
    const double s = std::accumulate(c.weights.begin(), c.weights.end(), 0.0);
    for (double& w : c.weights) w /= s;
  }
  return c;
}

// DeepSeek: scores (softmax or sigmoid), a selection bias, groups ranked by their best score
// (V2's group_limited_greedy) or the sum of their top-2 biased scores (V3's noaux_tc), top-k
// inside the kept groups, weights from the unbiased scores, then renormalised or scaled.
struct DeepSeekRule {
  bool sigmoid;
  bool top2_sum;
  Index n_group, topk_group, k;
  bool normalise_then_scale;  // V3: normalise (if norm) then scale; V2: normalise or scale
  bool norm;
  double scale;
};
Choice deepseek(const std::vector<double>& logits, const std::vector<double>& bias,
                const DeepSeekRule& r) {
  std::vector<double> scores = logits;
  if (r.sigmoid) {
    for (double& v : scores) v = 1.0 / (1.0 + std::exp(-v));
  } else {
    scores = softmax(logits);
  }
  std::vector<double> choice = scores;
  for (std::size_t e = 0; e < choice.size(); ++e) choice[e] += bias.empty() ? 0.0 : bias[e];
  const Index per = static_cast<Index>(scores.size()) / r.n_group;
  std::vector<double> group(static_cast<std::size_t>(r.n_group));
  for (Index g = 0; g < r.n_group; ++g) {
    std::vector<double> members(choice.begin() + g * per, choice.begin() + (g + 1) * per);
    std::sort(members.rbegin(), members.rend());
    group[static_cast<std::size_t>(g)] = r.top2_sum ? members[0] + members[1] : members[0];
  }
  const auto kept = top(group, r.topk_group);
  std::vector<double> masked(choice.size(), 0.0);  // masked experts score 0, as the reference
  for (const Index g : kept) {
    for (Index e = g * per; e < (g + 1) * per; ++e) {
      masked[static_cast<std::size_t>(e)] = choice[static_cast<std::size_t>(e)];
    }
  }
  Choice c{top(masked, r.k), {}};
  for (const Index e : c.ids) c.weights.push_back(scores[static_cast<std::size_t>(e)]);
  const double s = std::accumulate(c.weights.begin(), c.weights.end(), 0.0);
  for (double& w : c.weights) {
    if (r.normalise_then_scale) {
      w = (r.norm ? w / (s + 1e-20) : w) * r.scale;
    } else {
      w = (r.k > 1 && r.norm) ? w / (s + 1e-20) : w * r.scale;
    }
  }
  return c;
}

// y_t = sum_j w_tj E_{e_tj}(x_t)
Mat combine(const Mat& x, const std::vector<Glu>& experts, const std::vector<Choice>& choices) {
  Mat y = Mat::Zero(x.rows(), x.cols());
  for (Index t = 0; t < x.rows(); ++t) {
    const auto& c = choices[static_cast<std::size_t>(t)];
    for (std::size_t j = 0; j < c.ids.size(); ++j) {
      y.row(t) += c.weights[j] * swiglu(x.row(t), experts[static_cast<std::size_t>(c.ids[j])]);
    }
  }
  return y;
}

void check_output(const Mat& y, const moet::RowMatrix<float>& reference) {
  REQUIRE(y.rows() == reference.rows());
  REQUIRE(y.cols() == reference.cols());
  double worst = 0.0;
  for (Index i = 0; i < y.size(); ++i) {
    const double want = static_cast<double>(reference.data()[i]);
    worst = std::max(worst, std::abs(y.data()[i] - want) / (std::abs(want) + 1e-3));
  }
  INFO("largest relative difference " << worst);
  CHECK(worst <= 1e-5);
}

std::vector<Index> chosen_ids(const Choice& c) {
  std::vector<Index> ids = c.ids;
  std::sort(ids.begin(), ids.end());
  return ids;
}

void check_routing(const std::vector<Choice>& choices, const Json& expect_ids) {
  REQUIRE(expect_ids.size() == choices.size());
  for (std::size_t t = 0; t < choices.size(); ++t) {
    auto want = expect_ids[t].get<std::vector<Index>>();
    std::sort(want.begin(), want.end());
    CHECK(chosen_ids(choices[t]) == want);
  }
}

// Which layers of a checkpoint have a MoE block, by each family's published rule.
bool is_moe_layer(const Json& cfg, Index layer) {
  const auto type = cfg.at("model_type").get<std::string>();
  if (type == "mixtral" || type == "olmoe") return true;
  if (type == "qwen2_moe" || type == "qwen3_moe") {
    const auto only = cfg.value("mlp_only_layers", std::vector<Index>{});
    return std::find(only.begin(), only.end(), layer) == only.end() &&
           cfg.at("num_experts").get<Index>() > 0 &&
           (layer + 1) % cfg.value("decoder_sparse_step", Index{1}) == 0;
  }
  return layer >= cfg.at("first_k_dense_replace").get<Index>() &&
         layer % cfg.value("moe_layer_freq", Index{1}) == 0;
}

Mat family_output(const std::string& family, const Json& cfg,
                  const moet::SafetensorsCheckpoint& ckpt, Index layer, const Mat& x,
                  std::vector<Choice>& choices) {
  const auto type = cfg.at("model_type").get<std::string>();
  const bool mixtral = type == "mixtral";
  const std::string p =
      "model.layers." + std::to_string(layer) + (mixtral ? ".block_sparse_moe" : ".mlp");
  const Index num_experts = mixtral ? cfg.at("num_local_experts").get<Index>()
                            : type.rfind("deepseek", 0) == 0
                                ? cfg.at("n_routed_experts").get<Index>()
                                : cfg.at("num_experts").get<Index>();
  const Index k = cfg.at("num_experts_per_tok").get<Index>();
  const auto glu = [&](const std::string& prefix) {
    if (mixtral) {
      return Glu{mat(ckpt.tensor(prefix + ".w1.weight")), mat(ckpt.tensor(prefix + ".w3.weight")),
                 mat(ckpt.tensor(prefix + ".w2.weight"))};
    }
    return Glu{mat(ckpt.tensor(prefix + ".gate_proj.weight")),
               mat(ckpt.tensor(prefix + ".up_proj.weight")),
               mat(ckpt.tensor(prefix + ".down_proj.weight"))};
  };
  std::vector<Glu> experts;
  for (Index e = 0; e < num_experts; ++e)
    experts.push_back(glu(p + ".experts." + std::to_string(e)));
  const moet::TensorView router = ckpt.require(p + ".gate.weight", {num_experts, x.cols()});
  const Mat logits = x * mat(router).transpose();  // (T, E)

  choices.clear();
  std::vector<double> bias;
  if (ckpt.contains(p + ".gate.e_score_correction_bias")) {
    const Mat b = mat(ckpt.require(p + ".gate.e_score_correction_bias", {num_experts}));
    bias.assign(b.data(), b.data() + b.size());
  }
  for (Index t = 0; t < x.rows(); ++t) {
    if (type == "deepseek_v2" || type == "deepseek_v3") {
      const bool v3 = type == "deepseek_v3";
      const DeepSeekRule rule{cfg.at("scoring_func") == "sigmoid",
                              cfg.at("topk_method") == "noaux_tc",
                              cfg.at("n_group").get<Index>(),
                              cfg.at("topk_group").get<Index>(),
                              k,
                              v3,
                              cfg.at("norm_topk_prob").get<bool>(),
                              cfg.at("routed_scaling_factor").get<double>()};
      choices.push_back(deepseek(row(logits, t), bias, rule));
    } else {
      const bool renorm = mixtral || cfg.value("norm_topk_prob", false);
      choices.push_back(softmax_topk(row(logits, t), k, renorm));
    }
  }
  Mat y = combine(x, experts, choices);
  if (type == "qwen2_moe") {
    const Mat gate = mat(ckpt.require(p + ".shared_expert_gate.weight", {1, x.cols()}));
    const Mat s = swiglu(x, glu(p + ".shared_expert"));
    for (Index t = 0; t < x.rows(); ++t) {
      const double g = 1.0 / (1.0 + std::exp(-x.row(t).dot(gate.row(0))));
      y.row(t) += g * s.row(t);
    }
  } else if (type == "deepseek_v2" || type == "deepseek_v3") {
    const Index width =
        cfg.at("n_shared_experts").get<Index>() * cfg.at("moe_intermediate_size").get<Index>();
    CHECK(ckpt.tensor(p + ".shared_experts.gate_proj.weight").dim(0) == width);
    y += swiglu(x, glu(p + ".shared_experts"));
  }
  (void)family;
  return y;
}

}  // namespace

TEST_CASE("Every fixture checkpoint reads back as its script wrote it", "[io][fixtures]") {
  const std::string family = GENERATE(as<std::string>{}, "mixtral", "qwen2_moe", "qwen3_moe",
                                      "olmoe", "deepseek_v2", "deepseek_v3");
  INFO("family " << family);
  const fs::path dir = kFixtures / "checkpoints" / family;
  const Json manifest = read_json(dir / "manifest.json");
  const Json cfg = read_json(dir / "config.json");
  const auto ckpt = moet::SafetensorsCheckpoint::open(dir);

  CHECK(ckpt.sharded() == manifest.at("sharded").get<bool>());
  CHECK(cfg.at("model_type") == manifest.at("model_type"));
  CHECK(cfg.at("hidden_size").get<Index>() == 64);

  // The tensors: exactly the manifest's, each with its dtype, shape, shard and values.
  std::set<std::string> listed;
  for (const auto& [name, t] : manifest.at("tensors").items()) listed.insert(name);
  const auto names = ckpt.names();
  CHECK(std::set<std::string>(names.begin(), names.end()) == listed);
  CHECK_NOTHROW(ckpt.open_all());
  std::set<std::string> dtypes;
  for (const auto& [name, expect] : manifest.at("tensors").items()) {
    INFO("tensor " << name);
    const moet::TensorView t = ckpt.tensor(name);
    CHECK(moet::dtype_name(t.dtype()) == expect.at("dtype").get<std::string>());
    dtypes.insert(moet::dtype_name(t.dtype()));
    const auto shape = expect.at("shape").get<std::vector<Index>>();
    CHECK_NOTHROW(t.require_shape(shape));
    CHECK(fs::path(t.file()).filename() == expect.at("file").get<std::string>());
    check_values(t, expect);
  }
  CHECK(dtypes.contains("F32"));  // every family mixes F32 with BF16 or F16
  CHECK(dtypes.size() >= 2);

  // The MoE and dense layers, by the family's rule from config.json.
  const Index layers = cfg.at("num_hidden_layers").get<Index>();
  std::vector<Index> moe, dense;
  for (Index l = 0; l < layers; ++l) (is_moe_layer(cfg, l) ? moe : dense).push_back(l);
  CHECK(moe == manifest.at("moe_layers").get<std::vector<Index>>());
  CHECK(dense == manifest.at("dense_layers").get<std::vector<Index>>());
  for (const Index l : dense) {
    const std::string p = "model.layers." + std::to_string(l) + ".mlp.";
    const Index inter = cfg.at("intermediate_size").get<Index>();
    CHECK_NOTHROW(ckpt.require(p + "gate_proj.weight", {inter, 64}));
    CHECK_NOTHROW(ckpt.require(p + "down_proj.weight", {64, inter}));
  }

  // The reference outputs, recomputed from the tensors as read.
  const Json routing = read_json(dir / "reference" / "routing.json");
  for (const auto& ref : manifest.at("references")) {
    const Index layer = ref.at("layer").get<Index>();
    INFO("layer " << layer);
    const Mat x = moet::read_npy(dir / ref.at("x").get<std::string>()).matrix().cast<double>();
    const auto y_ref = moet::read_npy(dir / ref.at("y").get<std::string>()).matrix();
    CHECK(x.rows() == manifest.at("tokens").get<Index>());
    std::vector<Choice> choices;
    const Mat y = family_output(family, cfg, ckpt, layer, x, choices);
    check_routing(choices, routing.at(std::to_string(layer)).at("topk_ids"));
    check_output(y, y_ref);
  }
}

TEST_CASE("The family-specific config keys are the families' own", "[io][fixtures]") {
  const auto cfg = [](const char* family) {
    return read_json(kFixtures / "checkpoints" / family / "config.json");
  };
  const Json mixtral = cfg("mixtral");
  CHECK(mixtral.at("architectures")[0] == "MixtralForCausalLM");
  CHECK(mixtral.at("num_local_experts") == 4);
  CHECK(mixtral.at("num_experts_per_tok") == 2);
  const Json qwen2 = cfg("qwen2_moe");
  CHECK(qwen2.at("shared_expert_intermediate_size") == 32);
  CHECK(qwen2.at("norm_topk_prob") == false);
  CHECK(qwen2.at("mlp_only_layers") == Json::array({0}));
  const Json qwen3 = cfg("qwen3_moe");
  CHECK(qwen3.at("decoder_sparse_step") == 2);
  CHECK(qwen3.at("norm_topk_prob") == true);
  CHECK(qwen3.at("moe_intermediate_size") == 8);
  const Json olmoe = cfg("olmoe");
  CHECK(olmoe.at("norm_topk_prob") == false);
  CHECK(olmoe.at("num_experts") == 4);
  const Json v2 = cfg("deepseek_v2");
  CHECK(v2.at("topk_method") == "group_limited_greedy");
  CHECK(v2.at("scoring_func") == "softmax");
  CHECK(v2.at("n_group") == 4);
  CHECK(v2.at("topk_group") == 2);
  CHECK(v2.at("routed_scaling_factor") == 16.0);
  CHECK(v2.at("n_shared_experts") == 2);
  CHECK(v2.at("first_k_dense_replace") == 1);
  const Json v3 = cfg("deepseek_v3");
  CHECK(v3.at("topk_method") == "noaux_tc");
  CHECK(v3.at("scoring_func") == "sigmoid");
  CHECK(v3.at("norm_topk_prob") == true);
  CHECK(v3.at("routed_scaling_factor") == 2.5);
  CHECK(v3.at("n_routed_experts") == 16);
  const Json index =
      read_json(kFixtures / "checkpoints" / "qwen2_moe" / "model.safetensors.index.json");
  CHECK(index.at("weight_map").size() == 20);
  std::uint64_t total = 0;
  const auto ckpt = moet::SafetensorsCheckpoint::open(kFixtures / "checkpoints" / "qwen2_moe");
  for (const auto& name : ckpt.names()) total += ckpt.tensor(name).bytes().size();
  CHECK(index.at("metadata").at("total_size").get<std::uint64_t>() == total);
  CHECK(ckpt.shard_names().size() == 2);
}

TEST_CASE("Every fixture GGUF file reads back as its script wrote it", "[io][fixtures][gguf]") {
  const Json all = read_json(kFixtures / "gguf" / "manifest.json");
  const std::string name =
      GENERATE(as<std::string>{}, "qwen2moe_float", "deepseek2_q8_0", "olmoe_q4_0");
  INFO("file " << name);
  const Json& m = all.at(name);
  const auto f = moet::GgufFile::open(kFixtures / "gguf" / m.at("file").get<std::string>());
  CHECK(f.version() == 3);
  CHECK(f.alignment() == m.at("alignment").get<std::uint64_t>());

  for (const auto& [key, value] : m.at("keys").items()) {
    INFO("key " << key);
    const moet::GgufValue* v = f.find(key);
    REQUIRE(v != nullptr);
    if (value.is_boolean()) {
      CHECK(v->to_bool() == value.get<bool>());
    } else if (value.is_string()) {
      CHECK(v->to_string() == value.get<std::string>());
    } else if (value.is_number_integer()) {
      CHECK(v->to_uint() == value.get<std::uint64_t>());
    } else {
      CHECK(v->to_double() == Approx(value.get<double>()));
    }
  }

  CHECK(f.num_tensors() == static_cast<Index>(m.at("tensors").size()));
  std::set<std::string> types;
  for (const auto& [tname, expect] : m.at("tensors").items()) {
    INFO("tensor " << tname);
    const moet::GgufTensor t = f.tensor(tname);
    CHECK(moet::ggml_type_name(t.type()) == expect.at("type").get<std::string>());
    types.insert(moet::ggml_type_name(t.type()));
    const auto ne = expect.at("ne").get<std::vector<Index>>();
    REQUIRE(t.n_dims() == static_cast<int>(ne.size()));
    for (int i = 0; i < t.n_dims(); ++i) CHECK(t.ne(i) == ne[static_cast<std::size_t>(i)]);
    CHECK(t.offset() % f.alignment() == 0);
    check_values(t, expect);
    // The block spans hold what the dequantised rows say.
    if (t.type() == moet::GgmlType::kQ8_0 || t.type() == moet::GgmlType::kQ4_0) {
      const moet::RowMatrix<float> deq = t.to_matrix();
      for (Index b = 0; b < deq.size() / 32; b += 7) {
        for (Index i = 0; i < 32; ++i) {
          const float v =
              t.type() == moet::GgmlType::kQ8_0
                  ? moet::detail::block_value(
                        t.blocks<moet::detail::BlockQ8_0>()[static_cast<std::size_t>(b)], i)
                  : moet::detail::block_value(
                        t.blocks<moet::detail::BlockQ4_0>()[static_cast<std::size_t>(b)], i);
          CHECK(v == deq.data()[b * 32 + i]);
        }
      }
    }
  }

  // The reference output by llama.cpp's build_moe_ffn, recomputed from the tensors as read.
  const auto arch = f.architecture();
  CHECK(arch.name == m.at("architecture").get<std::string>());
  REQUIRE(arch.expert_count.has_value());
  REQUIRE(arch.expert_used_count.has_value());
  const Index blk = m.at("routing").at("block").get<Index>();
  const std::string p = "blk." + std::to_string(blk) + ".";
  const Index n_exp = *arch.expert_count;
  const Index n_embd = *arch.embedding_length;
  const auto gate = f.tensor(p + "ffn_gate_exps.weight");
  const auto up = f.tensor(p + "ffn_up_exps.weight");
  const auto down = f.tensor(p + "ffn_down_exps.weight");
  const Index n_ff = *arch.expert_feed_forward_length;
  gate.require_dims({n_embd, n_ff, n_exp});
  down.require_dims({n_ff, n_embd, n_exp});
  std::vector<Glu> experts;
  for (Index e = 0; e < n_exp; ++e) {
    experts.push_back({mat(gate.slice(e)), mat(up.slice(e)), mat(down.slice(e))});
  }
  const Mat x =
      moet::read_npy(kFixtures / "gguf" / m.at("x").get<std::string>()).matrix().cast<double>();
  const auto y_ref = moet::read_npy(kFixtures / "gguf" / m.at("y").get<std::string>()).matrix();
  const auto router = f.tensor(p + "ffn_gate_inp.weight");
  router.require_dims({n_embd, n_exp});
  const Mat logits = x * mat(router).transpose();  // (T, E)
  std::vector<double> bias;
  if (f.has_tensor(p + "exp_probs_b.bias")) {
    const Mat b = mat(f.tensor(p + "exp_probs_b.bias"));
    bias.assign(b.data(), b.data() + b.size());
  }
  const bool sigmoid = arch.expert_gating_func.value_or(1) == 2;
  const bool norm = arch.expert_weights_norm.value_or(false);
  const double scale = arch.expert_weights_scale.value_or(1.0f);
  std::vector<Choice> choices;
  for (Index t = 0; t < x.rows(); ++t) {
    // llama.cpp: one group, scores by the gating function, the bias for selection only.
    const DeepSeekRule rule{sigmoid, false, 1, 1, *arch.expert_used_count, true, norm, scale};
    choices.push_back(deepseek(row(logits, t), bias, rule));
  }
  check_routing(choices, m.at("routing").at("topk_ids"));
  Mat y = combine(x, experts, choices);
  if (f.has_tensor(p + "ffn_gate_shexp.weight")) {
    const Glu shared{mat(f.tensor(p + "ffn_gate_shexp.weight")),
                     mat(f.tensor(p + "ffn_up_shexp.weight")),
                     mat(f.tensor(p + "ffn_down_shexp.weight"))};
    const Mat s = swiglu(x, shared);
    if (f.has_tensor(p + "ffn_gate_inp_shexp.weight")) {             // qwen2moe: a sigmoid gate
      const Mat g = mat(f.tensor(p + "ffn_gate_inp_shexp.weight"));  // (1, n_embd)
      for (Index t = 0; t < x.rows(); ++t) {
        y.row(t) += s.row(t) / (1.0 + std::exp(-x.row(t).dot(g.row(0))));
      }
    } else {
      y += s;
    }
  }
  check_output(y, y_ref);
  if (name == "qwen2moe_float") {
    CHECK(types == std::set<std::string>{"F32", "F16", "BF16"});
    const auto tokens = f.find("tokenizer.ggml.tokens");
    REQUIRE(tokens != nullptr);
    CHECK(tokens->size() == 4);
    CHECK(tokens->at(3).to_string() == "t\xc3\xa9st");
  }
  if (name == "deepseek2_q8_0") CHECK(arch.leading_dense_block_count == 1);
}

}  // namespace test_io_fixtures
