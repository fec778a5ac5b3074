#pragma once
/// \file io/checkpoint_families.hpp
/// The checkpoint families moet loads, one table row each: how a Hugging Face `config.json`
/// (by `model_type`) or a llama.cpp GGUF file (by `general.architecture`) describes its MoE
/// layers (which layers are MoE, experts, k, widths, shared experts, routing) and what its
/// tensors are called. `io/checkpoint.hpp` reads a checkpoint through these rows; a new family
/// is a new row, not a new code path.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moet/errors.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// One decoder layer of a checkpoint, as its configuration describes it.
struct CheckpointLayer {
  /// Layer index (0-based).
  Index index = 0;
  /// Whether the layer's feed-forward block is a MoE block (false: a dense MLP).
  bool moe = false;
  /// Routed experts (0 for a dense layer).
  Index num_experts = 0;
  /// Experts per token in the checkpoint's routing (0 for a dense layer).
  Index k = 0;
  /// Width of a routed expert; for a dense layer, the width of its MLP.
  Index hidden_dim = 0;
  /// Shared experts as the configuration counts them (DeepSeek's `n_shared_experts`; 1 for
  /// Qwen2-MoE's shared expert; 0 without). moet runs them as one bank of `num_shared_experts
  /// = 1` expert of width `shared_hidden_dim`, which is the same function (a SwiGLU MLP of
  /// concatenated widths is the sum of the parts), as the checkpoints store them.
  Index num_shared_experts = 0;
  /// Total width of the shared experts (0 without).
  Index shared_hidden_dim = 0;
  /// Whether the shared experts' output is scaled by `sigmoid(x w)` (Qwen2-MoE).
  bool shared_gate = false;
  /// Whether the router has a selection-only score bias (DeepSeek-V3's
  /// `e_score_correction_bias`, GGUF's `exp_probs_b`).
  bool score_bias = false;
  /// The checkpoint's own routing, as `GroupedTopKGate` options (`model_dim`, `num_experts` and
  /// `k` filled in).
  GroupedTopKGate<float>::Options routing{};

  /// A one-line description of the routing, e.g. `"softmax top-2, renormalised"` or
  /// `"sigmoid + bias, 8 groups keep 4 (top-2 sum), top-8, renormalised, x2.5"`.
  std::string router_kind() const {
    if (!moe) return "dense";
    const auto& r = routing;
    std::string s = r.scoring == ExpertScoring::kSoftmax ? "softmax" : "sigmoid";
    if (score_bias) s += " + bias";
    if (r.num_groups > 1) {
      s += ", " + std::to_string(r.num_groups) + " groups keep " + std::to_string(r.groups_kept) +
           (r.group_score == GroupScore::kMax ? " (best)" : " (top-2 sum)");
    }
    s += (r.num_groups > 1 ? ", top-" : " top-") + std::to_string(r.k);
    const bool v2 = r.scaling == WeightScaling::kInsteadOfNormalization;
    const bool normalises = r.renormalize && (!v2 || r.k > 1);
    if (normalises) s += ", renormalised";
    if (r.scaling_factor != 1.0 && (!v2 || !normalises)) {
      std::string factor = std::to_string(r.scaling_factor);
      factor.erase(factor.find_last_not_of('0') + 1);
      if (factor.back() == '.') factor.pop_back();
      s += ", x" + factor;
    }
    return s;
  }
};

namespace detail {

using Json = nlohmann::json;

/// Reads config key `key` as an integer (`fallback` when absent or null and `fallback >= 0`);
/// throws `moet::Error` naming the file and the key otherwise.
inline Index config_int(const Json& cfg, const std::string& where, const char* key,
                        Index fallback = -1) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) {
    require(fallback >= 0, "Checkpoint", where, ": config.json has no '", key, "'");
    return fallback;
  }
  require(it->is_number_integer() && it->get<std::int64_t>() >= 0, "Checkpoint", where,
          ": config.json key '", key, "' must be a non-negative integer, got ", it->dump());
  return static_cast<Index>(it->get<std::int64_t>());
}
inline bool config_bool(const Json& cfg, const std::string& where, const char* key, bool fallback) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  require(it->is_boolean(), "Checkpoint", where, ": config.json key '", key,
          "' must be true or false, got ", it->dump());
  return it->get<bool>();
}
inline double config_number(const Json& cfg, const std::string& where, const char* key,
                            double fallback) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  require(it->is_number(), "Checkpoint", where, ": config.json key '", key,
          "' must be a number, got ", it->dump());
  return it->get<double>();
}
inline std::string config_string(const Json& cfg, const std::string& where, const char* key,
                                 const char* fallback) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  require(it->is_string(), "Checkpoint", where, ": config.json key '", key,
          "' must be a string, got ", it->dump());
  return it->get<std::string>();
}

/// The layer-independent sizes of a family's MoE layers, read from its config.
struct MoeShape {
  Index num_experts = 0;
  Index k = 0;
  Index hidden_dim = 0;         // routed expert width
  Index dense_hidden_dim = 0;   // a dense layer's MLP width
  Index num_shared = 0;         // as the config counts them
  Index shared_hidden_dim = 0;  // total shared width
  bool shared_gate = false;
  bool score_bias = false;
  GroupedTopKGate<float>::Options routing{};
};

/// One Hugging Face family: its `model_type`, tensor names under `model.layers.L.<block>`, which
/// layers are MoE, and its sizes and routing from `config.json`.
struct HfFamily {
  const char* model_type;
  /// The MoE block's module: `block_sparse_moe` (Mixtral) or `mlp`.
  const char* block;
  /// The experts' gate, up and down projections (`w1`, `w3`, `w2` or `gate_proj`, ...).
  const char* projections[3];
  /// The shared experts' module (`shared_expert`, `shared_experts`) or "" (none).
  const char* shared;
  /// The shared experts' gate (`shared_expert_gate`) or "".
  const char* shared_gate;
  /// Whether layer `L` is a MoE layer.
  bool (*is_moe)(const Json& cfg, const std::string& where, Index layer);
  /// The sizes and routing.
  MoeShape (*shape)(const Json& cfg, const std::string& where);
};

inline bool every_layer_moe(const Json&, const std::string&, Index) { return true; }

/// Qwen2-MoE / Qwen3-MoE (`Qwen2MoeDecoderLayer`): not in `mlp_only_layers`, `num_experts > 0`
/// and `(L + 1) % decoder_sparse_step == 0`.
inline bool qwen_is_moe(const Json& cfg, const std::string& where, Index layer) {
  if (const auto it = cfg.find("mlp_only_layers"); it != cfg.end() && !it->is_null()) {
    require(it->is_array(), "Checkpoint", where,
            ": config.json key 'mlp_only_layers' must be a "
            "list of layer indices, got ",
            it->dump());
    for (const auto& l : *it) {
      if (l.is_number_integer() && l.get<Index>() == layer) return false;
    }
  }
  const Index step = config_int(cfg, where, "decoder_sparse_step", 1);
  require(step >= 1, "Checkpoint", where, ": config.json key 'decoder_sparse_step' must be >= 1");
  return config_int(cfg, where, "num_experts") > 0 && (layer + 1) % step == 0;
}

/// DeepSeek-V2/V3 (`DeepseekV2DecoderLayer`): `n_routed_experts` set, `L >= first_k_dense_replace`
/// and `L % moe_layer_freq == 0`.
inline bool deepseek_is_moe(const Json& cfg, const std::string& where, Index layer) {
  const Index freq = config_int(cfg, where, "moe_layer_freq", 1);
  require(freq >= 1, "Checkpoint", where, ": config.json key 'moe_layer_freq' must be >= 1");
  return config_int(cfg, where, "n_routed_experts", 0) > 0 &&
         layer >= config_int(cfg, where, "first_k_dense_replace", 0) && layer % freq == 0;
}

/// Softmax top-k families: `num_experts_key` experts of width `width_key`, renormalised always
/// (`renormalise_key` null: Mixtral) or when `renormalise_key` is true (default false).
inline MoeShape softmax_shape(const Json& cfg, const std::string& where,
                              const char* num_experts_key, const char* width_key,
                              const char* renormalise_key) {
  MoeShape s;
  s.num_experts = config_int(cfg, where, num_experts_key);
  s.k = config_int(cfg, where, "num_experts_per_tok");
  s.hidden_dim = config_int(cfg, where, width_key);
  s.dense_hidden_dim = config_int(cfg, where, "intermediate_size", 0);
  const bool renormalise =
      renormalise_key == nullptr || config_bool(cfg, where, renormalise_key, false);
  s.routing = GroupedTopKGate<float>::softmax_top_k_options(0, s.num_experts, s.k, renormalise);
  return s;
}

inline MoeShape mixtral_shape(const Json& cfg, const std::string& where) {
  return softmax_shape(cfg, where, "num_local_experts", "intermediate_size", nullptr);
}
inline MoeShape olmoe_shape(const Json& cfg, const std::string& where) {
  return softmax_shape(cfg, where, "num_experts", "intermediate_size", "norm_topk_prob");
}
inline MoeShape qwen3_moe_shape(const Json& cfg, const std::string& where) {
  return softmax_shape(cfg, where, "num_experts", "moe_intermediate_size", "norm_topk_prob");
}
inline MoeShape qwen2_moe_shape(const Json& cfg, const std::string& where) {
  MoeShape s = softmax_shape(cfg, where, "num_experts", "moe_intermediate_size", "norm_topk_prob");
  s.shared_hidden_dim = config_int(cfg, where, "shared_expert_intermediate_size", 0);
  s.num_shared = s.shared_hidden_dim > 0 ? 1 : 0;
  s.shared_gate = s.num_shared > 0;
  return s;
}

/// DeepSeek-V2 (`v3 = false`) and V3 (`modeling_deepseek.py`'s `MoEGate`): `scoring_func`,
/// `topk_method` (`greedy`, `group_limited_greedy`; V3: `noaux_tc`, with the score bias),
/// `n_group`, `topk_group`, `norm_topk_prob`, `routed_scaling_factor`, and `n_shared_experts`
/// shared experts of width `moe_intermediate_size`.
inline MoeShape deepseek_shape(const Json& cfg, const std::string& where, bool v3) {
  MoeShape s;
  s.num_experts = config_int(cfg, where, "n_routed_experts");
  s.k = config_int(cfg, where, "num_experts_per_tok");
  s.hidden_dim = config_int(cfg, where, "moe_intermediate_size");
  s.dense_hidden_dim = config_int(cfg, where, "intermediate_size", 0);
  s.num_shared = config_int(cfg, where, "n_shared_experts", 0);
  s.shared_hidden_dim = s.num_shared * s.hidden_dim;
  const std::string scoring = config_string(cfg, where, "scoring_func", v3 ? "sigmoid" : "softmax");
  require(scoring == "softmax" || scoring == "sigmoid", "Checkpoint", where,
          ": config.json scoring_func '", scoring, "' is not softmax or sigmoid");
  const std::string method = config_string(cfg, where, "topk_method", v3 ? "noaux_tc" : "greedy");
  const bool known =
      v3 ? method == "noaux_tc" : method == "greedy" || method == "group_limited_greedy";
  require(known, "Checkpoint", where, ": config.json topk_method '", method, "' is not one ",
          v3 ? "DeepSeek-V3's code runs (noaux_tc)"
             : "DeepSeek-V2's code runs (greedy, group_limited_greedy)");
  auto& r = s.routing;
  r.num_experts = s.num_experts;
  r.k = s.k;
  r.scoring = scoring == "softmax" ? ExpertScoring::kSoftmax : ExpertScoring::kSigmoid;
  if (method != "greedy") {
    r.num_groups = config_int(cfg, where, "n_group");
    r.groups_kept = config_int(cfg, where, "topk_group");
  }
  r.group_score = method == "noaux_tc" ? GroupScore::kTopTwoSum : GroupScore::kMax;
  r.renormalize = config_bool(cfg, where, "norm_topk_prob", false);
  r.scaling_factor = config_number(cfg, where, "routed_scaling_factor", 1.0);
  r.scaling = v3 ? WeightScaling::kAfterNormalization : WeightScaling::kInsteadOfNormalization;
  s.score_bias = method == "noaux_tc";
  return s;
}
inline MoeShape deepseek_v2_shape(const Json& cfg, const std::string& where) {
  return deepseek_shape(cfg, where, false);
}
inline MoeShape deepseek_v3_shape(const Json& cfg, const std::string& where) {
  return deepseek_shape(cfg, where, true);
}

inline constexpr const char* kHfProjections[3] = {"gate_proj", "up_proj", "down_proj"};

/// The Hugging Face families (`config.json`'s `model_type`).
inline constexpr HfFamily kHfFamilies[] = {
    {"mixtral", "block_sparse_moe", {"w1", "w3", "w2"}, "", "", every_layer_moe, mixtral_shape},
    {"qwen2_moe",
     "mlp",
     {"gate_proj", "up_proj", "down_proj"},
     "shared_expert",
     "shared_expert_gate",
     qwen_is_moe,
     qwen2_moe_shape},
    {"qwen3_moe",
     "mlp",
     {"gate_proj", "up_proj", "down_proj"},
     "",
     "",
     qwen_is_moe,
     qwen3_moe_shape},
    {"olmoe", "mlp", {"gate_proj", "up_proj", "down_proj"}, "", "", every_layer_moe, olmoe_shape},
    {"deepseek_v2",
     "mlp",
     {"gate_proj", "up_proj", "down_proj"},
     "shared_experts",
     "",
     deepseek_is_moe,
     deepseek_v2_shape},
    {"deepseek_v3",
     "mlp",
     {"gate_proj", "up_proj", "down_proj"},
     "shared_experts",
     "",
     deepseek_is_moe,
     deepseek_v3_shape},
};

/// One llama.cpp architecture (`general.architecture`): whether `build_moe_ffn` renormalises
/// its top-k weights when the file has no `<arch>.expert_weights_norm` key.
struct GgufFamily {
  const char* architecture;
  bool renormalize;
};

/// The GGUF architectures (llama.cpp stores Mixtral as `llama` with `llama.expert_count`).
inline constexpr GgufFamily kGgufFamilies[] = {
    {"llama", true},  {"qwen2moe", false},  {"qwen3moe", true},
    {"olmoe", false}, {"deepseek2", false},
};

/// The row of `model_type`; throws `moet::Error` naming the supported ones otherwise.
inline const HfFamily& hf_family(std::string_view model_type, const std::string& where) {
  std::string known;
  for (const HfFamily& f : kHfFamilies) {
    if (model_type == f.model_type) return f;
    known += known.empty() ? "" : ", ";
    known += f.model_type;
  }
  fail("Checkpoint", where, ": model_type '", model_type, "' is not a family moet loads (", known,
       ")");
}
inline const GgufFamily& gguf_family(std::string_view architecture, const std::string& where) {
  std::string known;
  for (const GgufFamily& f : kGgufFamilies) {
    if (architecture == f.architecture) return f;
    known += known.empty() ? "" : ", ";
    known += f.architecture;
  }
  fail("Checkpoint", where, ": GGUF architecture '", architecture, "' is not one moet loads (",
       known, ")");
}

/// Checks a family's sizes (from its config or GGUF keys) before anything is loaded: experts,
/// k and widths positive, k at most the experts, groups dividing the experts, groups kept at
/// most the groups, and k at most the experts of the kept groups.
inline void check_moe_shape(const MoeShape& s, const std::string& where) {
  const auto& r = s.routing;
  require(s.num_experts >= 1 && s.hidden_dim >= 1, "Checkpoint", where,
          ": a MoE layer needs experts >= 1 of width >= 1, got ", s.num_experts, " of width ",
          s.hidden_dim);
  require(s.k >= 1 && s.k <= s.num_experts, "Checkpoint", where, ": experts per token (", s.k,
          ") must be in [1, ", s.num_experts, "]");
  require(r.num_groups >= 1 && s.num_experts % r.num_groups == 0, "Checkpoint", where, ": ",
          r.num_groups, " expert groups do not divide ", s.num_experts, " experts");
  require(r.groups_kept >= 1 && r.groups_kept <= r.num_groups, "Checkpoint", where,
          ": groups kept (", r.groups_kept, ") must be in [1, ", r.num_groups, "]");
  require(s.k <= r.groups_kept * (s.num_experts / r.num_groups), "Checkpoint", where, ": ", s.k,
          " experts per token do not fit in ", r.groups_kept, " groups of ",
          s.num_experts / r.num_groups);
  require(r.group_score != GroupScore::kTopTwoSum || r.num_groups == 1 ||
              s.num_experts / r.num_groups >= 2,
          "Checkpoint", where, ": groups ranked by their top-2 sum need >= 2 experts each");
  require(std::isfinite(r.scaling_factor) && r.scaling_factor > 0.0, "Checkpoint", where,
          ": the routed scaling factor must be finite and > 0, got ", r.scaling_factor);
}

}  // namespace detail
}  // namespace moet
