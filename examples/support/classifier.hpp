#pragma once
/// \file examples/support/classifier.hpp
/// The MoE image classifier of examples 04 (training) and 05 (inference):
/// ```
/// h0 = x W_in + b_in                                  x: (batch, pixels)
/// h1 = h0 + MoE_0(RmsNorm_0(h0))                      residual MoE blocks (pre-norm)
/// h2 = h1 + MoE_1(RmsNorm_1(h1))
/// logits = h2 W_out + b_out                           (batch, classes)
/// ```
/// generic in the gate, with each router's auxiliary losses (aux_loss.hpp).
///
/// `ImportanceGate` needs a token importance; an MLP has no attention, so the classifier passes
/// each image's hidden-state norm `||h_l||` as a stand-in (documented in the README).

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <moet/moet.hpp>

#include "aux_loss.hpp"
#include "nn.hpp"

namespace examples {

/// Sizes of the classifier.
struct ClassifierShape {
  Index inputs = 784, classes = 10, model_dim = 64, hidden_dim = 128, experts = 8;
};

template <class Gate>
class MoeClassifier {
 public:
  using S = float;
  using Layer = moet::MoELayer<Gate, moet::SwiGluExperts<S>>;
  static constexpr int kBlocks = 2;

  /// One forward pass's activations (a THOR step keeps two).
  struct Pass {
    moet::RouteContext ctx;
    RowMatrix<S> h[kBlocks + 1], n[kBlocks], y[kBlocks], logits;
    std::vector<float> importance[kBlocks];
    typename Layer::Workspace ws[kBlocks];
  };

  /// `make_gate(block)` builds block `block`'s gate (its `num_experts()` experts get built here).
  template <class MakeGate>
  MoeClassifier(const ClassifierShape& shape, MakeGate&& make_gate, std::uint64_t seed)
      : shape_(shape),
        in_(shape.inputs, shape.model_dim, seed),
        out_(shape.model_dim, shape.classes, seed + 1) {
    for (int l = 0; l < kBlocks; ++l) {
      norms_.emplace_back(shape.model_dim);
      Gate gate = make_gate(l);
      const Index e = gate.num_experts();
      layers_.emplace_back(std::move(gate),
                           moet::SwiGluExperts<S>({.model_dim = shape.model_dim,
                                                   .hidden_dim = shape.hidden_dim,
                                                   .num_experts = e,
                                                   .init_seed = seed + 10 + std::uint64_t(l)}));
    }
  }

  /// Forward of `x` `(batch, inputs)`; keeps what `backward` needs in `pass`. Training forwards
  /// (`ctx.training`) also run the gates' training hooks (DynMoE's recording).
  const RowMatrix<S>& forward(const RowMatrix<S>& x, const moet::RouteContext& ctx, Pass& pass) {
    pass.ctx = ctx;
    pass.h[0] = in_.forward(x);
    for (int l = 0; l < kBlocks; ++l) {
      const auto ul = static_cast<std::size_t>(l);
      pass.n[l] = norms_[ul].forward(pass.h[l]);
      pass.importance[l].resize(static_cast<std::size_t>(x.rows()));
      for (Index t = 0; t < x.rows(); ++t) {
        pass.importance[l][static_cast<std::size_t>(t)] = pass.h[l].row(t).norm();
      }
      moet::RouteContext c = ctx;
      c.importance = pass.importance[l];
      pass.y[l].resize(x.rows(), shape_.model_dim);
      if (ctx.training) {
        layers_[ul].forward_train(pass.n[l], pass.y[l], c, pass.ws[l]);
      } else {
        layers_[ul].forward(pass.n[l], pass.y[l], c, pass.ws[l]);
      }
      pass.h[l + 1] = pass.h[l] + pass.y[l];
    }
    pass.logits = out_.forward(pass.h[kBlocks]);
    return pass.logits;
  }

  /// Backward of `pass` given dL/dlogits; adds each block's auxiliary loss (scaled values are
  /// summed into the return value) and accumulates every gradient.
  double backward(const RowMatrix<S>& x, Pass& pass, const RowMatrix<S>& d_logits) {
    aux_state_.begin_step();
    double aux = 0.0;
    RowMatrix<S> dh = out_.backward(pass.h[kBlocks], d_logits);
    RowMatrix<S> dn(x.rows(), shape_.model_dim);
    for (int l = kBlocks - 1; l >= 0; --l) {
      const auto ul = static_cast<std::size_t>(l);
      moet::RouteContext c = pass.ctx;
      c.importance = pass.importance[l];
      aux += backward_with_aux_loss(
          layers_[ul], pass.ws[l], pass.n[l], aux_state_, d_aux_, [&](const auto& loss_grad) {
            layers_[ul].backward(pass.n[l], dh, c, pass.ws[l], dn, loss_grad);
          });
      dh += norms_[ul].backward(pass.h[l], dn);
    }
    in_.backward(x, dh);
    return aux;
  }

  Layer& layer(int l) { return layers_[static_cast<std::size_t>(l)]; }
  const ClassifierShape& shape() const { return shape_; }

  void zero_grad() {
    in_.zero_grad();
    out_.zero_grad();
    for (auto& n : norms_) n.zero_grad();
    for (auto& l : layers_) l.zero_grad();
  }
  template <class F>
  void visit_parameters(F&& f) {
    in_.visit_parameters(f, "in.");
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const std::string p = "block" + std::to_string(l) + ".";
      norms_[l].visit_parameters(f, p + "norm.");
      layers_[l].visit_parameters([&](std::string_view name, auto value, auto grad) {
        f(std::string_view(p + "moe." + std::string(name)), value, grad);
      });
    }
    out_.visit_parameters(f, "out.");
  }
  void parameters_changed() {
    for (auto& l : layers_) l.parameters_changed();
  }

 private:
  ClassifierShape shape_;
  Linear<S> in_, out_;
  std::vector<RmsNorm<S>> norms_;
  std::vector<Layer> layers_;
  RowMatrix<S> d_aux_;
  AuxState aux_state_;  // ReMoE's adaptive coefficient, when the gate is ReluGate
};

}  // namespace examples
