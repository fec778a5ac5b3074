#pragma once
/// \file examples/support/aux_loss.hpp
/// Each router's auxiliary losses (docs/algorithms.md §8, pairings §8.8), computed on the plan of a
/// training forward and handed to the MoE layer's backward as its gate's loss-gradient input:
/// - `TopKGate`, `ImportanceGate`: Switch load balance (alpha 1e-2, top-1 before dropping);
/// - `TopPGate`: load balance over all selections plus the entropy ("dynamic") loss (beta 1e-4),
///   Huang et al. 2024;
/// - `TopAnyGate`: DynMoE's diversity + simplicity + load balance + efficiency (coefficient
///   `AuxState::dynmoe_coefficient`, 0.01 by default);
/// - `StochasticGate` (THOR): none; its consistency loss is on the model's outputs;
/// - `ExpertChoiceGate`: none (every expert takes exactly C tokens);
/// - `ReluGate` (ReMoE): the load-balanced L1 term with the adaptive coefficient, one
///   `ReluSparsityController` per model (target k = 2), summed over the layers;
/// - `NullExpertGate` (AdaMoE): Switch's balance loss over real and null slots (alpha 1e-2);
/// - a gate with a selection-only score bias (`GroupedTopKGate`) trained with auxiliary-loss-free
///   balancing (`AuxState::loss_free`, DeepSeek-V3): none, the `LossFreeBalancer` of its layer
///   moves the bias after each step; without it, Switch load balance as for `TopKGate`.

#include <algorithm>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include <moet/moet.hpp>
#include <moet/train/bias_balance.hpp>
#include <moet/train/losses.hpp>
#include <moet/train/top_any_losses.hpp>

namespace examples {

/// The state of the auxiliary losses that adapt during training: ReMoE's coefficient, shared
/// by every MoE layer of a model (docs/algorithms.md §16).
struct AuxState {
  std::optional<moet::ReluSparsityController> relu;
  /// Auxiliary-loss-free balancing: one balancer per MoE layer (empty: off).
  std::vector<moet::LossFreeBalancer<float>> loss_free;
  /// DynMoE's auxiliary-loss coefficient (`TopAnyAuxLossOptions::coefficient`; its default
  /// 0.01 is the paper's and the code's).
  float dynmoe_coefficient = 0.01f;

  /// Call once per training step before the layers' backward: moves ReMoE's coefficient by the
  /// plans the previous step recorded (a no-op on the first step and for other gates).
  void begin_step() {
    if (relu) relu->update();
  }
};

/// Computes the auxiliary loss of `layer`'s gate on the plan in `ws` (the layer's last
/// `forward_train` on `x`), calls `run(loss_grad)` (which should call `layer.backward(...,
/// loss_grad)`), and returns the loss value. `scratch` holds the loss gradient during the call;
/// `state` the model's adaptive loss state.
template <class Layer, class Run>
double backward_with_aux_loss(Layer& layer, typename Layer::Workspace& ws,
                              const moet::ConstRows<typename Layer::Scalar>& x, AuxState& state,
                              moet::RowMatrix<typename Layer::Scalar>& scratch, Run&& run) {
  using S = typename Layer::Scalar;
  using Gate = typename Layer::GateType;
  const moet::Routing<S>& plan = ws.routing;
  const auto view = [&] {
    return std::span<const S>(scratch.data(), static_cast<std::size_t>(scratch.size()));
  };
  if constexpr (moet::ScoreBiasGate<Gate, S>) {
    if (!state.loss_free.empty()) {  // balanced by the score bias, not by a loss
      run(moet::SoftmaxLossGrad<S>{});
      return 0.0;
    }  // else Switch's loss, below
  }
  if constexpr (std::is_same_v<Gate, moet::StochasticGate<S>>) {
    run(moet::NoLossGrad{});
    return 0.0;
  } else if constexpr (std::is_same_v<Gate, moet::ExpertChoiceGate<S>>) {
    run(moet::SoftmaxLossGrad<S>{});
    return 0.0;
  } else if constexpr (std::is_same_v<Gate, moet::ReluGate<S>>) {
    const moet::Index experts = plan.num_experts();
    const double target = std::min(2.0, static_cast<double>(experts));
    if (!state.relu) {
      state.relu.emplace(
          moet::ReluSparsityController::Options{.target_k = target, .num_experts = experts});
    }
    scratch.setZero(plan.num_tokens(), experts);
    const double value = moet::relu_l1_loss<S>(
        plan, scratch, {.target_k = target, .coefficient = state.relu->coefficient()});
    state.relu->record(plan);
    run(moet::SoftmaxLossGrad<S>{.d_probs = view()});
    return value;
  } else if constexpr (std::is_same_v<Gate, moet::NullExpertGate<S>>) {
    const auto& gate = layer.gate();
    moet::RowMatrix<S> all(plan.num_tokens(), gate.num_slots());
    gate.all_probabilities(x, all);
    scratch.setZero(plan.num_tokens(), gate.num_slots());
    const double value =
        moet::null_expert_balance_loss<S>(plan, all, scratch, {.k = gate.options().k});
    run(moet::SoftmaxLossGrad<S>{.d_probs = view()});
    return value;
  } else if constexpr (std::is_same_v<Gate, moet::TopAnyGate<S>>) {
    scratch.setZero(plan.num_tokens(), plan.num_experts());
    const auto loss = moet::top_any_aux_loss<S>(
        layer.gate(), plan, std::span<S>(scratch.data(), static_cast<std::size_t>(scratch.size())),
        {.coefficient = static_cast<S>(state.dynmoe_coefficient)});
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
