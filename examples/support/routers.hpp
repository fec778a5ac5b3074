#pragma once
/// \file examples/support/routers.hpp
/// The training examples' routers, from moet's router grammar (`moet::with_gate_options`,
/// moet/gates/spec.hpp: `name[:key=value[,key=value...]]`, every key of `gate_spec_help()`),
/// with three example conventions on top where the spec does not say otherwise:
/// `top_k:k=K` renormalises when K >= 2 (GShard, Mixtral; K = 1 is Switch's raw P),
/// `top_any` starts with half its slots live and runs the DeepSpeed cycle with period
/// `dynmoe_period`, and every layer gets its own seed (router weights: `seed * 100 + layer`;
/// `stochastic`: stream `stream + layer`).

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include <moet/moet.hpp>

namespace examples {

/// Calls `f(std::type_identity<Gate>{}, make_gate)` for the router `spec`, where
/// `make_gate(layer)` builds layer `layer`'s gate over `num_experts` experts of width
/// `model_dim`, and returns what `f` returns. Throws `moet::Error` for a spec the grammar
/// rejects (the message lists the valid gates or keys).
template <class F>
auto with_router(const std::string& spec, moet::Index model_dim, moet::Index num_experts,
                 std::uint64_t seed, std::int64_t dynmoe_period, F&& f) {
  using S = float;
  const moet::GateSpec parsed = moet::parse_gate_spec(spec);
  const auto given = [&](const char* key, const char* alias) {
    return parsed.find(key) != nullptr || parsed.find(alias) != nullptr;
  };
  return moet::with_gate_options<S>(
      spec, model_dim, num_experts, 0, [&](auto identity, auto options) {
        using Gate = typename decltype(identity)::type;
        if constexpr (std::is_same_v<Gate, moet::TopKGate<S>>) {
          if (!given("renorm", "renormalize")) options.renormalize = options.k > 1;
        }
        if constexpr (std::is_same_v<Gate, moet::TopAnyGate<S>>) {
          if (!given("initial", "initial_experts")) {
            options.initial_experts = std::max<moet::Index>(1, num_experts / 2);
          }
          if (!given("period", "schedule_period")) options.schedule_period = dynmoe_period;
        }
        const std::uint64_t stream = [&] {
          if constexpr (requires { options.stream; }) {
            return options.stream;
          } else {
            return std::uint64_t{0};
          }
        }();
        return f(identity, [=](int layer) {
          auto o = options;
          if constexpr (requires { o.init_seed; }) {
            o.init_seed = seed * 100 + static_cast<std::uint64_t>(layer);
          }
          if constexpr (requires { o.stream; })
            o.stream = stream + static_cast<std::uint64_t>(layer);
          return Gate(o);
        });
      });
}

}  // namespace examples
