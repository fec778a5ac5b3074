#pragma once
/// \file examples/support/routers.hpp
/// Router specs of the training examples, `name` or `name:key=value`:
/// `top_k:k=K` (K = 1: Switch, raw P; K >= 2: renormalised, GShard/Mixtral), `top_p:p=P`,
/// `top_any` (DynMoE, half the slots live at the start, the DeepSpeed cycle with period
/// `dynmoe_period`), `importance:k_max=K` (DA-MoE reconstruction, k_min 1), `stochastic` (THOR).

#include <cstdint>
#include <string>
#include <type_traits>

#include <moet/moet.hpp>

namespace examples {

/// Calls `f(std::type_identity<Gate>{}, make_gate)` for the router `spec`, where
/// `make_gate(layer)` builds layer `layer`'s gate over `num_experts` experts of width
/// `model_dim` (seeded by `seed` and the layer), and returns what `f` returns. Throws
/// `moet::Error` naming `with_router` for an unknown spec.
template <class F>
auto with_router(const std::string& spec, moet::Index model_dim, moet::Index num_experts,
                 std::uint64_t seed, std::int64_t dynmoe_period, F&& f) {
  using S = float;
  const auto colon = spec.find(':'), eq = spec.find('=');
  const std::string name = spec.substr(0, colon);
  const std::string key = colon == std::string::npos ? "" : spec.substr(colon + 1, eq - colon - 1);
  const double value = eq == std::string::npos ? 0.0 : std::stod(spec.substr(eq + 1));
  const moet::Index d = model_dim, e = num_experts;
  const auto layer_seed = [seed](int l) { return seed * 100 + static_cast<std::uint64_t>(l); };
  if (name == "top_k" && (key.empty() || key == "k")) {
    const auto k = static_cast<moet::Index>(key.empty() ? 2.0 : value);
    return f(std::type_identity<moet::TopKGate<S>>{}, [=](int l) {
      return moet::TopKGate<S>({.model_dim = d, .num_experts = e, .k = k, .renormalize = k > 1,
                                .init_seed = layer_seed(l)});
    });
  }
  if (name == "top_p" && (key.empty() || key == "p")) {
    const double p = key.empty() ? 0.4 : value;
    return f(std::type_identity<moet::TopPGate<S>>{}, [=](int l) {
      return moet::TopPGate<S>({.model_dim = d, .num_experts = e, .p = p, .init_seed = layer_seed(l)});
    });
  }
  if (name == "top_any" && key.empty()) {
    return f(std::type_identity<moet::TopAnyGate<S>>{}, [=](int l) {
      return moet::TopAnyGate<S>({.model_dim = d, .num_experts = e,
                                  .initial_experts = std::max<moet::Index>(1, e / 2),
                                  .init_seed = layer_seed(l),
                                  .schedule_period = dynmoe_period});
    });
  }
  if (name == "importance" && (key.empty() || key == "k_max")) {
    const auto k_max = static_cast<moet::Index>(key.empty() ? 4.0 : value);
    return f(std::type_identity<moet::ImportanceGate<S>>{}, [=](int l) {
      return moet::ImportanceGate<S>({.model_dim = d, .num_experts = e, .k_min = 1,
                                      .k_max = k_max, .init_seed = layer_seed(l)});
    });
  }
  moet::detail::require(name == "stochastic" && key.empty(), "with_router", "unknown router '",
                        spec, "' (expected top_k:k=K, top_p:p=P, top_any, importance:k_max=K or "
                        "stochastic)");
  return f(std::type_identity<moet::StochasticGate<S>>{}, [=](int l) {
    return moet::StochasticGate<S>(
        {.model_dim = d, .num_experts = e, .stream = static_cast<std::uint64_t>(l)});
  });
}

}  // namespace examples
