#pragma once
/// \file io/checkpoint.hpp
/// Pretrained MoE checkpoints as moet layers: `Checkpoint` opens a Hugging Face directory
/// (`config.json` plus safetensors, sharded or not) or a llama.cpp GGUF file, describes every
/// decoder layer (`CheckpointInfo`: MoE or dense, experts, k, widths, shared experts, routing),
/// and `load_moe_layer<Gate>` builds one MoE block as a `MoELayer` (router, routed experts,
/// shared experts and their gate) with the checkpoint's weights, straight from the mapped file.
/// The families are rows of io/checkpoint_families.hpp: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
/// DeepSeek-V2, DeepSeek-V3 (safetensors) and llama (Mixtral), qwen2moe, qwen3moe, olmoe,
/// deepseek2 (GGUF).
///
/// ```cpp
/// const auto ckpt = moet::Checkpoint::open("Qwen1.5-MoE-A2.7B");        // or a .gguf file
/// auto layer = moet::load_moe_layer(ckpt, 3, {.weight_format = moet::WeightFormat::kBf16});
/// moet::RowMatrix<float> y = layer.forward(x);                          // x: (T, hidden_size)
/// // The same router weights driving a dynamic gate:
/// auto top_p = moet::load_moe_layer<moet::TopPGate<float>>(ckpt, 3, {}, {{.p = 0.5}});
/// ```

#include <concepts>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/io/checkpoint_families.hpp"
#include "moet/io/checkpoint_tensor.hpp"
#include "moet/io/gguf.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/layer.hpp"
#include "moet/tensor.hpp"
#include "moet/weight_format.hpp"

namespace moet {

/// The file format of a `Checkpoint`.
enum class CheckpointFormat { kSafetensors, kGguf };

/// What a checkpoint's configuration says about its layers.
struct CheckpointInfo {
  /// The path as opened.
  std::string path;
  CheckpointFormat format = CheckpointFormat::kSafetensors;
  /// `config.json`'s `model_type` (`"mixtral"`, `"deepseek_v3"`, ...) or the GGUF
  /// `general.architecture` (`"qwen2moe"`, ...).
  std::string family;
  /// Width of a token (`hidden_size`, `<arch>.embedding_length`).
  Index model_dim = 0;
  /// Every decoder layer, in order, dense ones included.
  std::vector<CheckpointLayer> layers;

  /// The indices of the MoE layers.
  std::vector<Index> moe_layers() const {
    std::vector<Index> out;
    for (const auto& l : layers) {
      if (l.moe) out.push_back(l.index);
    }
    return out;
  }
  /// Layer `l`; throws `moet::Error` when there is none.
  const CheckpointLayer& layer(Index l) const {
    detail::require(l >= 0 && l < static_cast<Index>(layers.size()), "Checkpoint", path,
                    ": there is no layer ", l, " (", layers.size(), " layers)");
    return layers[static_cast<std::size_t>(l)];
  }
};

/// A pretrained checkpoint, opened and described (see the file comment). Holds the file
/// mappings; the layers `load_moe_layer` builds do not refer to them.
class Checkpoint {
 public:
  /// Opens `path`: a `.gguf` file, or a Hugging Face directory (`config.json` and
  /// `model.safetensors` or its sharded index), or one of its safetensors or index files.
  /// Reads the configuration and describes every layer (the family's rules: which layers are
  /// MoE, experts, k, widths, routing). Throws `moet::Error` naming the path for a missing
  /// file, an unknown family, a missing or ill-typed key, or sizes that do not fit together
  /// (k above the experts, groups that do not divide them, ...). Tensors are checked when a
  /// layer is loaded.
  static Checkpoint open(const std::filesystem::path& path) {
    Checkpoint c;
    c.info_.path = path.string();
    if (path.extension() == ".gguf") {
      c.gguf_ = GgufFile::open(path);
      c.describe_gguf();
    } else {
      const std::filesystem::path dir =
          std::filesystem::is_directory(path) ? path : path.parent_path();
      std::ifstream in(dir / "config.json");
      detail::require(in.good(), "Checkpoint", c.info_.path, ": no config.json in ", dir.string());
      try {
        c.config_ = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        detail::fail("Checkpoint", c.info_.path, ": config.json is not JSON: ", e.what());
      }
      detail::require(c.config_.is_object(), "Checkpoint", c.info_.path,
                      ": config.json is not a JSON object");
      c.st_ = SafetensorsCheckpoint::open(path);
      c.describe_hf();
    }
    return c;
  }

  const CheckpointInfo& info() const { return info_; }
  /// The safetensors checkpoint (null for GGUF).
  const SafetensorsCheckpoint* safetensors() const { return st_ ? &*st_ : nullptr; }
  /// The GGUF file (null for safetensors).
  const GgufFile* gguf() const { return gguf_ ? &*gguf_ : nullptr; }
  /// `config.json` (an empty object for GGUF).
  const nlohmann::json& config() const { return config_; }

  // --- the tensors of MoE layer `l`, shape-checked -------------------------------------------

  /// The router `[num_experts, model_dim]`.
  CheckpointTensor router(Index l) const {
    const CheckpointLayer& m = moe_layer(l);
    if (gguf_) return gguf_matrix(block(l) + "ffn_gate_inp.weight", m.num_experts, model_dim());
    return hf_matrix(prefix(l) + "gate.weight", m.num_experts, model_dim());
  }
  /// The selection-only score bias `(1, num_experts)`, or none.
  std::optional<RowMatrix<float>> score_bias(Index l) const {
    const CheckpointLayer& m = moe_layer(l);
    if (!m.score_bias) return std::nullopt;
    if (gguf_) return gguf_matrix(block(l) + "exp_probs_b.bias", 1, m.num_experts).to_matrix();
    return hf_vector(prefix(l) + "gate.e_score_correction_bias", m.num_experts).to_matrix();
  }
  /// Routed expert `e`'s weight `t` as `[out, in]`: gate and up `[hidden_dim, model_dim]`,
  /// down `[model_dim, hidden_dim]`.
  CheckpointTensor expert(Index l, Index e, GluTensor t) const {
    const CheckpointLayer& m = moe_layer(l);
    detail::require(e >= 0 && e < m.num_experts, "Checkpoint", info_.path, ": layer ", l,
                    " has no expert ", e, " (", m.num_experts, " experts)");
    const auto [out, in] = out_in(t, m.hidden_dim);
    if (gguf_) {
      const GgufTensor stack = gguf_->tensor(block(l) + kGgufExperts[index(t)]);
      stack.require_dims({in, out, m.num_experts});
      return CheckpointTensor(stack.slice(e));
    }
    return hf_matrix(prefix(l) + "experts." + std::to_string(e) + "." +
                         family_->projections[index(t)] + ".weight",
                     out, in);
  }
  /// The shared experts' weight `t` as `[out, in]` (one MLP of width `shared_hidden_dim`).
  CheckpointTensor shared(Index l, GluTensor t) const {
    const CheckpointLayer& m = moe_layer(l);
    detail::require(m.shared_hidden_dim > 0, "Checkpoint", info_.path, ": layer ", l,
                    " has no shared experts");
    const auto [out, in] = out_in(t, m.shared_hidden_dim);
    if (gguf_) return gguf_matrix(block(l) + kGgufShared[index(t)], out, in);
    return hf_matrix(prefix(l) + family_->shared + "." + family_->projections[index(t)] + ".weight",
                     out, in);
  }
  /// The shared experts' gate `[1, model_dim]`.
  CheckpointTensor shared_gate(Index l) const {
    const CheckpointLayer& m = moe_layer(l);
    detail::require(m.shared_gate, "Checkpoint", info_.path, ": layer ", l,
                    " has no shared-expert gate");
    if (gguf_) return gguf_matrix(block(l) + "ffn_gate_inp_shexp.weight", 1, model_dim());
    return hf_matrix(prefix(l) + family_->shared_gate + ".weight", 1, model_dim());
  }

  /// The expert weight format that keeps layer `l`'s routed experts exactly as stored: the
  /// block format of GGUF Q8_0, Q4_0 and Q4_1 experts (their blocks are packed as they are),
  /// `kF32` otherwise (float tensors convert exactly).
  WeightFormat native_weight_format(Index l) const {
    const auto type = expert(l, 0, GluTensor::kGate).gguf_type();
    if (!type) return WeightFormat::kF32;
    switch (*type) {
      case GgmlType::kQ8_0:
        return WeightFormat::kQ8_0;
      case GgmlType::kQ4_0:
        return WeightFormat::kQ4_0;
      case GgmlType::kQ4_1:
        return WeightFormat::kQ4_1;
      default:
        return WeightFormat::kF32;
    }
  }

  /// Layer `l`, which must be a MoE layer (throws `moet::Error` naming the MoE layers
  /// otherwise).
  const CheckpointLayer& moe_layer(Index l) const {
    const CheckpointLayer& m = info_.layer(l);
    if (!m.moe) {
      std::string list;
      for (const Index i : info_.moe_layers())
        list += (list.empty() ? "" : ", ") + std::to_string(i);
      detail::fail("Checkpoint", info_.path, ": layer ", l, " is dense (an MLP of width ",
                   m.hidden_dim, "), not a MoE layer; the MoE layers are ", list);
    }
    return m;
  }

 private:
  static constexpr const char* kGgufExperts[3] = {"ffn_gate_exps.weight", "ffn_up_exps.weight",
                                                  "ffn_down_exps.weight"};
  static constexpr const char* kGgufShared[3] = {"ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                                                 "ffn_down_shexp.weight"};

  Checkpoint() = default;

  static std::size_t index(GluTensor t) { return static_cast<std::size_t>(t); }
  Index model_dim() const { return info_.model_dim; }
  // [out, in] of tensor t of an MLP of width `width`.
  std::pair<Index, Index> out_in(GluTensor t, Index width) const {
    return t == GluTensor::kDown ? std::pair{model_dim(), width} : std::pair{width, model_dim()};
  }
  std::string prefix(Index l) const {
    return "model.layers." + std::to_string(l) + "." + family_->block + ".";
  }
  static std::string block(Index l) { return "blk." + std::to_string(l) + "."; }

  CheckpointTensor hf_matrix(const std::string& name, Index rows, Index cols) const {
    return CheckpointTensor(st_->require(name, {rows, cols}));
  }
  CheckpointTensor hf_vector(const std::string& name, Index n) const {
    return CheckpointTensor(st_->require(name, {n}));
  }
  // A GGUF weight of PyTorch shape [rows, cols] (ne = [cols, rows]; a vector when rows = 1).
  CheckpointTensor gguf_matrix(const std::string& name, Index rows, Index cols) const {
    const GgufTensor t = gguf_->tensor(name);
    if (rows == 1 && t.n_dims() == 1) {
      t.require_dims({cols});
    } else {
      t.require_dims({cols, rows});
    }
    return CheckpointTensor(t);
  }

  void describe_hf() {
    const std::string& where = info_.path;
    const auto type = detail::config_string(config_, where, "model_type", "");
    family_ = &detail::hf_family(type, where);
    info_.format = CheckpointFormat::kSafetensors;
    info_.family = family_->model_type;
    info_.model_dim = detail::config_int(config_, where, "hidden_size");
    detail::require(info_.model_dim >= 1, "Checkpoint", where, ": hidden_size must be >= 1");
    const Index layers = detail::config_int(config_, where, "num_hidden_layers");
    const detail::MoeShape shape = family_->shape(config_, where);
    for (Index l = 0; l < layers; ++l) {
      CheckpointLayer m;
      m.index = l;
      m.moe = family_->is_moe(config_, where, l);
      if (m.moe) {
        detail::check_moe_shape(shape, where);
        fill_moe(m, shape);
      } else {
        m.hidden_dim = shape.dense_hidden_dim;
      }
      info_.layers.push_back(m);
    }
  }

  void describe_gguf() {
    const std::string& where = info_.path;
    const GgufArchitecture arch = gguf_->architecture();
    const detail::GgufFamily& family = detail::gguf_family(arch.name, where);
    info_.format = CheckpointFormat::kGguf;
    info_.family = arch.name;
    const auto key = [&](const std::optional<Index>& v, const char* name) {
      detail::require(v.has_value(), "Checkpoint", where, ": no key '", arch.name, ".", name, "'",
                      std::string(name) == "expert_count" ? " (not a MoE model)" : "");
      return *v;
    };
    info_.model_dim = key(arch.embedding_length, "embedding_length");
    detail::MoeShape s;
    s.num_experts = key(arch.expert_count, "expert_count");
    s.k = key(arch.expert_used_count, "expert_used_count");
    s.hidden_dim = arch.expert_feed_forward_length.value_or(0);
    auto& r = s.routing;
    r.num_experts = s.num_experts;
    r.k = s.k;
    // llama.cpp's build_moe_ffn: gating 1 softmax, 2 sigmoid, 3 softmax over the chosen
    // logits (= softmax top-k renormalised); groups ranked by their top-2 sum; the weights
    // normalised if asked, then scaled.
    const std::uint32_t gating = arch.expert_gating_func.value_or(1);
    detail::require(gating >= 1 && gating <= 3, "Checkpoint", where, ": ", arch.name,
                    ".expert_gating_func ", gating, " is not 1 (softmax), 2 (sigmoid) or 3");
    r.scoring = gating == 2 ? ExpertScoring::kSigmoid : ExpertScoring::kSoftmax;
    r.renormalize = gating == 3 || arch.expert_weights_norm.value_or(family.renormalize);
    r.scaling_factor = arch.expert_weights_scale.value_or(1.0f);
    r.num_groups = arch.expert_group_count.value_or(1);
    r.groups_kept = arch.expert_group_used_count.value_or(r.num_groups);
    r.group_score = GroupScore::kTopTwoSum;
    r.scaling = WeightScaling::kAfterNormalization;
    const Index dense = arch.leading_dense_block_count.value_or(0);
    const Index layers = key(arch.block_count, "block_count");
    for (Index l = 0; l < layers; ++l) {
      CheckpointLayer m;
      m.index = l;
      m.moe = l >= dense && gguf_->has_tensor(block(l) + "ffn_gate_inp.weight");
      if (!m.moe) {
        if (const auto t = gguf_->find_tensor(block(l) + "ffn_gate.weight"))
          m.hidden_dim = t->ne(1);
        info_.layers.push_back(m);
        continue;
      }
      detail::MoeShape layer_shape = s;
      if (layer_shape.hidden_dim == 0) {
        layer_shape.hidden_dim = gguf_->tensor(block(l) + kGgufExperts[0]).ne(1);
      }
      if (const auto t = gguf_->find_tensor(block(l) + kGgufShared[0])) {
        layer_shape.shared_hidden_dim = t->ne(1);
        layer_shape.num_shared = arch.expert_shared_count.value_or(1);
        layer_shape.shared_gate = gguf_->has_tensor(block(l) + "ffn_gate_inp_shexp.weight");
      }
      layer_shape.score_bias = gguf_->has_tensor(block(l) + "exp_probs_b.bias");
      detail::check_moe_shape(layer_shape, where);
      fill_moe(m, layer_shape);
      info_.layers.push_back(m);
    }
  }

  void fill_moe(CheckpointLayer& m, const detail::MoeShape& s) const {
    m.num_experts = s.num_experts;
    m.k = s.k;
    m.hidden_dim = s.hidden_dim;
    m.num_shared_experts = s.num_shared;
    m.shared_hidden_dim = s.shared_hidden_dim;
    m.shared_gate = s.shared_gate;
    m.score_bias = s.score_bias;
    m.routing = s.routing;
    m.routing.model_dim = info_.model_dim;
    m.routing.num_experts = s.num_experts;
    m.routing.k = s.k;
  }

  CheckpointInfo info_;
  nlohmann::json config_ = nlohmann::json::object();
  const detail::HfFamily* family_ = nullptr;
  std::optional<SafetensorsCheckpoint> st_;
  std::optional<GgufFile> gguf_;
};

/// How `load_moe_layer` builds the expert banks.
struct LoadOptions {
  /// Element type of the experts' packed weights; none: `Checkpoint::native_weight_format`
  /// (the GGUF block format of quantised experts, else `kF32`).
  std::optional<WeightFormat> weight_format = std::nullopt;
  /// Keep only the packed weights (no float copy, no training); false for a trainable layer.
  bool inference_only = true;
};

/// A gate `load_moe_layer` can build from a checkpoint's router: a float gate with
/// `Options{.model_dim, .num_experts}` and `set_router(w, layout)` (`TopKGate`, `TopPGate`,
/// `ImportanceGate`, `GroupedTopKGate`).
template <class G>
concept CheckpointRouterGate = Gate<G> && std::is_same_v<typename G::Scalar, float> &&
    requires(G& g, typename G::Options o, const ConstRows<float>& w) {
  o.model_dim = Index{1};
  o.num_experts = Index{1};
  g.set_router(w, WeightLayout::kOutIn);
};

/// The options `load_moe_layer<G>` builds layer `m`'s gate with when given none: the
/// checkpoint's own routing for `GroupedTopKGate`, its `k` and renormalisation for `TopKGate`,
/// the defaults otherwise; `model_dim` and `num_experts` always the layer's.
template <CheckpointRouterGate G>
typename G::Options checkpoint_gate_options(const CheckpointLayer& m,
                                            std::optional<typename G::Options> given = {}) {
  typename G::Options o{};
  if (given) {
    o = *given;
  } else if constexpr (std::is_same_v<G, GroupedTopKGate<float>>) {
    o = m.routing;
  } else if constexpr (std::is_same_v<G, TopKGate<float>>) {
    o.k = m.k;
    o.renormalize = m.routing.renormalize;
  }
  o.model_dim = m.routing.model_dim;
  o.num_experts = m.num_experts;
  return o;
}

namespace detail {

// Sets weight t of expert e of `bank` from `w` ([out, in]): ready blocks when the bank's format
// is the tensor's block format, else through one (in, out) float temporary in `scratch`.
template <class Bank>
void load_weight(Bank& bank, GluTensor t, Index e, const CheckpointTensor& w,
                 Buffer<float>& scratch) {
  const auto try_blocks = [&](auto tag) {
    using Block = decltype(tag);
    if (bank.options().weight_format != BlockFormat<Block>::kFormat) return false;
    const auto blocks = w.blocks<Block>();
    if (!blocks) return false;
    bank.set_tensor_blocks(t, e, *blocks);
    return true;
  };
  if (try_blocks(BlockQ8_0{}) || try_blocks(BlockQ4_0{}) || try_blocks(BlockQ4_1{})) return;
  auto in_out = scratch.matrix(w.cols(), w.rows());  // (in, out)
  w.read_transposed(in_out);
  bank.set_tensor(t, e, in_out, WeightLayout::kInOut);
}

// A bank of `num_experts` SwiGLU experts of width `width`, every weight from `weight(e, t)`.
// Every tensor is looked up (name, shape, dtype) first; then the experts are converted and
// packed in parallel, one task per expert with its own temporary, and the first failure (a
// non-finite weight) is rethrown after the parallel region.
template <class Weight>
SwiGluExperts<float> load_bank(Index model_dim, Index width, Index num_experts, WeightFormat format,
                               bool inference_only, Weight&& weight) {
  SwiGluExperts<float> bank({.model_dim = model_dim,
                             .hidden_dim = width,
                             .num_experts = num_experts,
                             .init = WeightInit::kNone,
                             .weight_format = format,
                             .inference_only = inference_only});
  constexpr GluTensor kTensors[3] = {GluTensor::kGate, GluTensor::kUp, GluTensor::kDown};
  std::vector<CheckpointTensor> tensors;
  tensors.reserve(static_cast<std::size_t>(3 * num_experts));
  for (Index e = 0; e < num_experts; ++e) {
    for (const GluTensor t : kTensors) {
      tensors.push_back(weight(e, t));
      tensors.back().require_readable();
    }
  }
  std::vector<Buffer<float>> scratch(static_cast<std::size_t>(max_threads()));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(num_experts));
  parallel_for(num_experts, [&](Index e) {
    try {
      auto& buffer = scratch[static_cast<std::size_t>(thread_id())];
      for (std::size_t i = 0; i < 3; ++i) {
        load_weight(bank, kTensors[i], e, tensors[static_cast<std::size_t>(3 * e) + i], buffer);
      }
    } catch (...) {
      errors[static_cast<std::size_t>(e)] = std::current_exception();
    }
  });
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return bank;
}

}  // namespace detail

/// Builds MoE layer `layer` of `ckpt` as a `MoELayer<G, SwiGluExperts<float>>`: the routed
/// experts (and the shared experts, gated by a `SharedExpertGate` for Qwen2-MoE) with the
/// checkpoint's weights in `options.weight_format`, and a gate `G` with the checkpoint's router
/// weights (and, for `GroupedTopKGate`, its score bias). `G` defaults to `GroupedTopKGate`,
/// which with `gate_options` left empty routes exactly as the checkpoint does
/// (`checkpoint_gate_options`); any `CheckpointRouterGate` (`TopKGate` at another k, `TopPGate`,
/// `ImportanceGate`) runs on the same router weights (their softmax over its logits; the
/// score bias and the scaling factor are the checkpoint's routing and not theirs).
///
/// Weights are read from the mapped file one expert tensor at a time: GGUF blocks of the
/// bank's block format are packed as they are; everything else goes through one float
/// `(in, out)` temporary per tensor, never a copy of the whole layer. No residual, no norm:
/// `forward(x)` is the MoE block's output. Throws `moet::Error` naming the file and the tensor
/// for a dense layer, a missing tensor, a wrong shape or dtype, or a non-finite weight.
template <CheckpointRouterGate G = GroupedTopKGate<float>>
MoELayer<G, SwiGluExperts<float>> load_moe_layer(
    const Checkpoint& ckpt, Index layer, const LoadOptions& options = {},
    std::optional<typename G::Options> gate_options = std::nullopt) {
  const CheckpointLayer& m = ckpt.moe_layer(layer);
  const Index d = ckpt.info().model_dim;
  G gate(checkpoint_gate_options<G>(m, gate_options));
  gate.set_router(ckpt.router(layer).to_matrix(), WeightLayout::kOutIn);
  const WeightFormat format =
      options.weight_format ? *options.weight_format : ckpt.native_weight_format(layer);
  if constexpr (std::is_same_v<G, GroupedTopKGate<float>>) {
    if (const auto bias = ckpt.score_bias(layer)) {
      gate.set_score_bias(
          std::span<const float>(bias->data(), static_cast<std::size_t>(bias->size())));
    }
  }
  auto experts = detail::load_bank(d, m.hidden_dim, m.num_experts, format, options.inference_only,
                                   [&](Index e, GluTensor t) { return ckpt.expert(layer, e, t); });
  if (m.shared_hidden_dim == 0) return {std::move(gate), std::move(experts)};
  auto shared = detail::load_bank(d, m.shared_hidden_dim, 1, format, options.inference_only,
                                  [&](Index, GluTensor t) { return ckpt.shared(layer, t); });
  if (!m.shared_gate) return {std::move(gate), std::move(experts), std::move(shared)};
  SharedExpertGate<float> shared_gate({.model_dim = d});
  shared_gate.set_weights(ckpt.shared_gate(layer).to_matrix(), WeightLayout::kOutIn);
  return {std::move(gate), std::move(experts), std::move(shared), std::move(shared_gate)};
}

}  // namespace moet
