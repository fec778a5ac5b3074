#pragma once
/// \file examples/support/aux_loss.hpp
/// Each router's auxiliary losses (docs/algorithms.md §8, pairings §8.8), computed on the plan of a
/// training forward and handed to the MoE layer's backward as its gate's loss-gradient input:
/// - `TopKGate`, `ImportanceGate`: Switch load balance (alpha 1e-2, top-1 before dropping);
/// - `TopPGate`: load balance over all selections plus the entropy ("dynamic") loss (beta 1e-4),
///   Huang et al. 2024;
/// - `TopAnyGate`: DynMoE's diversity + simplicity + load balance + efficiency (coefficient 0.01);
/// - `StochasticGate` (THOR): none; its consistency loss is on the model's outputs.

#include <span>
#include <type_traits>

#include <moet/moet.hpp>
#include <moet/train/losses.hpp>
#include <moet/train/top_any_losses.hpp>

namespace examples {

/// Computes the auxiliary loss of `layer`'s gate on the plan in `ws` (the layer's last
/// `forward_train`), calls `run(loss_grad)` (which should call `layer.backward(..., loss_grad)`),
/// and returns the loss value. `scratch` holds the loss gradient during the call.
template <class Layer, class Run>
double backward_with_aux_loss(Layer& layer, typename Layer::Workspace& ws,
                              moet::RowMatrix<typename Layer::Scalar>& scratch, Run&& run) {
  using S = typename Layer::Scalar;
  using Gate = typename Layer::GateType;
  const moet::Routing<S>& plan = ws.routing;
  const auto view = [&] {
    return std::span<const S>(scratch.data(), static_cast<std::size_t>(scratch.size()));
  };
  if constexpr (std::is_same_v<Gate, moet::StochasticGate<S>>) {
    run(moet::NoLossGrad{});
    return 0.0;
  } else if constexpr (std::is_same_v<Gate, moet::TopAnyGate<S>>) {
    scratch.setZero(plan.num_tokens(), plan.num_experts());
    const auto loss = moet::top_any_aux_loss<S>(
        layer.gate(), plan, std::span<S>(scratch.data(), static_cast<std::size_t>(scratch.size())));
    run(moet::TopAnyLossGrad<S>{view()});
    return static_cast<double>(loss.value);
  } else {
    scratch.setZero(plan.num_tokens(), plan.num_experts());
    double value = 0.0;
    if constexpr (std::is_same_v<Gate, moet::TopPGate<S>>) {
      value += moet::load_balance_loss<S>(plan, scratch, moet::LoadBalanceOptions::top_p_options());
      value += moet::router_entropy_loss<S>(plan.probs(), scratch);
    } else {
      value +=
          moet::load_balance_loss<S>(plan, scratch, moet::LoadBalanceOptions::switch_options());
    }
    run(moet::SoftmaxLossGrad<S>{.d_probs = view()});
    return value;
  }
}

}  // namespace examples
