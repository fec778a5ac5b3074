#pragma once
/// \file examples/support/char_lm.hpp
/// The character-level language model of example 06: a small pre-norm transformer whose FFNs
/// are MoE layers, generic in the gate:
/// ```
/// h_0 = Embed(ids) + Pos(t mod seq_len)                     ids: [batch, seq_len], learned
/// positions m_b = h_b + Attn_b(RmsNorm(h_b))                          causal multi-head attention
/// h_{b+1} = m_b + MoE_b(RmsNorm(m_b))                       for every block b
/// logits = RmsNorm(h_B) W_out + b_out                       (batch * seq_len, vocab)
/// ```
/// Each MoE layer's `RouteContext` carries the attention probabilities of its own block's
/// attention sublayer (what `ImportanceGate` reads, docs/algorithms.md §6) and the sequence length.
/// `Layer` is the MoE layer type: `moet::MoELayer` by default, `moet::mpi::ExpertParallelLayer`
/// in example 09 (built by the constructor's `make_layer`).

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <moet/moet.hpp>

#include "aux_loss.hpp"
#include "nn.hpp"

namespace examples {

/// Sizes of the language model (`vocab` from the corpus).
struct CharLmShape {
  Index vocab = 0, model_dim = 64, heads = 4, hidden_dim = 128, experts = 8, blocks = 2;
  Index max_len = 256;  // longest window: rows of the learned position embedding
};

template <class Gate, class LayerType = moet::MoELayer<Gate, moet::SwiGluExperts<float>>>
class MoeCharLm {
 public:
  using S = float;
  using Scalar = S;
  using Layer = LayerType;
  using Bank = moet::SwiGluExperts<S>;
  using Attention = CausalSelfAttention<S>;

  /// One forward pass's activations (a THOR step keeps two).
  struct Pass {
    moet::RouteContext ctx;
    std::vector<int> ids, positions;
    std::vector<RowMatrix<S>> h, n1, m, n2, y;
    std::vector<typename Attention::Cache> att;
    std::vector<typename Layer::Workspace> ws;
    RowMatrix<S> final_norm, logits;
  };

  /// `make_gate(block)` builds each block's gate; the experts are drawn from `seed`.
  template <class MakeGate>
  MoeCharLm(const CharLmShape& shape, MakeGate&& make_gate, std::uint64_t seed)
      : MoeCharLm(shape, make_gate, seed, [](int, Gate gate, Bank experts) {
          return Layer(std::move(gate), std::move(experts));
        }) {}

  /// As above; `make_layer(block, gate, experts)` builds each MoE layer from its gate and all
  /// its experts (the same weights for any `Layer`).
  template <class MakeGate, class MakeLayer>
  MoeCharLm(const CharLmShape& shape, MakeGate&& make_gate, std::uint64_t seed,
            MakeLayer&& make_layer)
      : shape_(shape),
        embed_(shape.vocab, shape.model_dim, 1.0, seed),
        position_(shape.max_len, shape.model_dim, 0.1, seed + 2),
        final_norm_(shape.model_dim),
        head_(shape.model_dim, shape.vocab, seed + 1) {
    for (int b = 0; b < shape.blocks; ++b) {
      const auto ub = static_cast<std::uint64_t>(b);
      norm1_.emplace_back(shape.model_dim);
      norm2_.emplace_back(shape.model_dim);
      attention_.emplace_back(shape.model_dim, shape.heads, seed + 10 + ub);
      Gate gate = make_gate(b);
      const Index e = gate.num_experts();
      layers_.push_back(make_layer(b, std::move(gate),
                                   Bank({.model_dim = shape.model_dim,
                                         .hidden_dim = shape.hidden_dim,
                                         .num_experts = e,
                                         .init_seed = seed + 20 + ub})));
    }
  }

  /// Logits `(batch * seq_len, vocab)` of `ids` laid out `[batch, seq_len]`; keeps what
  /// `backward` needs in `p`. `ctx.training` selects training-mode routing and the layers'
  /// training forward.
  const RowMatrix<S>& forward(const std::vector<int>& ids, Index batch, Index seq_len,
                              const moet::RouteContext& ctx, Pass& p) {
    const auto blocks = static_cast<std::size_t>(shape_.blocks);
    p.ctx = ctx;
    p.ids = ids;
    p.h.resize(blocks + 1);
    p.n1.resize(blocks);
    p.m.resize(blocks);
    p.n2.resize(blocks);
    p.y.resize(blocks);
    p.att.resize(blocks);
    p.ws.resize(blocks);
    if (seq_len > shape_.max_len)
      throw std::invalid_argument("MoeCharLm: window longer than max_len");
    p.positions.resize(ids.size());
    for (std::size_t t = 0; t < ids.size(); ++t) p.positions[t] = int(Index(t) % seq_len);
    p.h[0] = embed_.forward(ids) + position_.forward(p.positions);  // token + learned position
    for (std::size_t b = 0; b < blocks; ++b) {
      p.n1[b] = norm1_[b].forward(p.h[b]);
      p.m[b] = p.h[b] + attention_[b].forward(p.n1[b], batch, seq_len, p.att[b]);
      p.n2[b] = norm2_[b].forward(p.m[b]);
      p.y[b].resize(p.n2[b].rows(), p.n2[b].cols());
      const moet::RouteContext c = block_context(p, b);
      if (ctx.training) {
        layers_[b].forward_train(p.n2[b], p.y[b], c, p.ws[b]);
        if (!aux_state_.loss_free.empty()) aux_state_.loss_free[b].record(p.ws[b].routing);
      } else {
        layers_[b].forward(p.n2[b], p.y[b], c, p.ws[b]);
      }
      p.h[b + 1] = p.m[b] + p.y[b];
    }
    p.final_norm = final_norm_.forward(p.h[blocks]);
    p.logits = head_.forward(p.final_norm);
    return p.logits;
  }

  /// Backward of `p` given dL/dlogits; adds every MoE layer's auxiliary loss (the sum of their
  /// values is returned) and accumulates every gradient.
  double backward(Pass& p, const RowMatrix<S>& d_logits) {
    aux_state_.begin_step();
    const auto blocks = static_cast<std::size_t>(shape_.blocks);
    double aux = 0.0;
    RowMatrix<S> dh = final_norm_.backward(p.h[blocks], head_.backward(p.final_norm, d_logits));
    RowMatrix<S> dn(dh.rows(), dh.cols());
    for (std::size_t b = blocks; b-- > 0;) {
      const moet::RouteContext c = block_context(p, b);
      aux += backward_with_aux_loss(layers_[b], p.ws[b], p.n2[b], aux_state_, d_aux_,
                                    [&](const auto& loss_grad) {
                                      layers_[b].backward(p.n2[b], dh, c, p.ws[b], dn, loss_grad);
                                    });
      dh += norm2_[b].backward(p.m[b], dn);  // dL/dm
      dh += norm1_[b].backward(p.h[b], attention_[b].backward(p.n1[b], dh, p.att[b]));
    }
    embed_.backward(p.ids, dh);
    position_.backward(p.positions, dh);
    return aux;
  }

  /// Trains the gates' selection-only score bias with auxiliary-loss-free balancing (Wang et
  /// al. 2024; DeepSeek-V3) at update rate `rate`, instead of a balance loss: each training
  /// forward records its loads and `end_step` moves the bias. Needs a gate with a score bias.
  void enable_loss_free_balancing(double rate) {
    static_assert(moet::ScoreBiasGate<Gate, S>, "loss-free balancing needs a score-bias gate");
    aux_state_.loss_free.assign(layers_.size(),
                                moet::LossFreeBalancer<float>({.update_rate = rate}));
  }
  /// DynMoE's auxiliary-loss coefficient for a `TopAnyGate` model (0.01 unless set; finite,
  /// >= 0, else `top_any_aux_loss` throws at the first backward).
  void set_dynmoe_coefficient(double c) { aux_state_.dynmoe_coefficient = static_cast<float>(c); }
  /// Call after each optimiser step: applies the loss-free balancers' bias updates (if any).
  void end_step() {
    if constexpr (moet::ScoreBiasGate<Gate, S>) {
      for (std::size_t b = 0; b < aux_state_.loss_free.size(); ++b) {
        aux_state_.loss_free[b].update(layers_[b].gate());
      }
    }
  }

  Layer& layer(int b) { return layers_[static_cast<std::size_t>(b)]; }
  const CharLmShape& shape() const { return shape_; }

  void zero_grad() {
    embed_.zero_grad();
    position_.zero_grad();
    final_norm_.zero_grad();
    head_.zero_grad();
    for (std::size_t b = 0; b < layers_.size(); ++b) {
      norm1_[b].zero_grad();
      norm2_[b].zero_grad();
      attention_[b].zero_grad();
      layers_[b].zero_grad();
    }
  }
  /// Zeroes every gradient but the routed experts' (what data parallelism replicates).
  void zero_replicated_grad() {
    embed_.zero_grad();
    position_.zero_grad();
    final_norm_.zero_grad();
    head_.zero_grad();
    for (std::size_t b = 0; b < layers_.size(); ++b) {
      norm1_[b].zero_grad();
      norm2_[b].zero_grad();
      attention_[b].zero_grad();
      layers_[b].gate().zero_grad();
    }
  }
  /// `visit_parameters` without the routed experts (`block<b>.moe.experts.*`), in the same
  /// order; the experts are not touched (visiting them would mark their packed copies stale).
  template <class F>
  void visit_replicated_parameters(F&& f) {
    embed_.visit_parameters(f, "embed.");
    position_.visit_parameters(f, "position.");
    for (std::size_t b = 0; b < layers_.size(); ++b) {
      const std::string p = "block" + std::to_string(b) + ".";
      norm1_[b].visit_parameters(f, p + "norm1.");
      attention_[b].visit_parameters(f, p + "attn.");
      norm2_[b].visit_parameters(f, p + "norm2.");
      layers_[b].gate().visit_parameters([&](std::string_view name, auto value, auto grad) {
        f(std::string_view(p + "moe.gate." + std::string(name)), value, grad);
      });
    }
    final_norm_.visit_parameters(f, "final_norm.");
    head_.visit_parameters(f, "head.");
  }
  template <class F>
  void visit_parameters(F&& f) {
    embed_.visit_parameters(f, "embed.");
    position_.visit_parameters(f, "position.");
    for (std::size_t b = 0; b < layers_.size(); ++b) {
      const std::string p = "block" + std::to_string(b) + ".";
      norm1_[b].visit_parameters(f, p + "norm1.");
      attention_[b].visit_parameters(f, p + "attn.");
      norm2_[b].visit_parameters(f, p + "norm2.");
      layers_[b].visit_parameters([&](std::string_view name, auto value, auto grad) {
        f(std::string_view(p + "moe." + std::string(name)), value, grad);
      });
    }
    final_norm_.visit_parameters(f, "final_norm.");
    head_.visit_parameters(f, "head.");
  }
  void parameters_changed() {
    for (auto& l : layers_) l.parameters_changed();
  }

 private:
  static moet::RouteContext block_context(const Pass& p, std::size_t b) {
    moet::RouteContext c = p.ctx;
    c.attention = p.att[b].attention();  // this block's attention, for ImportanceGate
    c.sequence_length = p.att[b].seq_len;
    return c;
  }

  CharLmShape shape_;
  Embedding<S> embed_, position_;
  std::vector<RmsNorm<S>> norm1_, norm2_;
  std::vector<Attention> attention_;
  std::vector<Layer> layers_;
  RmsNorm<S> final_norm_;
  Linear<S> head_;
  RowMatrix<S> d_aux_;
  AuxState aux_state_;  // ReMoE's adaptive coefficient, when the gate is ReluGate
};

}  // namespace examples
