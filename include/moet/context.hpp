#pragma once
/// \file context.hpp
/// `RouteContext`: what a gate may know about the call besides the tokens themselves.

#include <cstdint>
#include <span>

#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Attention probabilities of the self-attention sublayer before the MoE layer, used by
/// `ImportanceGate`. Non-owning. Layout row-major `[batch, heads, seq_len, seq_len]`
/// (query-major: entry `[b, h, i, j]` is how much query `i` attends to key `j`), with tokens
/// ordered `t = b * seq_len + i` as in the `x` passed to the gate.
struct AttentionView {
  const float* data = nullptr;  ///< `batch * heads * seq_len * seq_len` floats, or null
  Index batch = 0;
  Index heads = 0;
  Index seq_len = 0;
  bool causal = false;  ///< queries only see keys `j <= i` (changes the column-mean divisor)

  bool empty() const { return data == nullptr; }
  Index num_tokens() const { return batch * seq_len; }
};

/// Per-call replacements for a gate's selection options: route one call as a gate built with
/// these values would, without rebuilding it (fewer or more experts for the same trained
/// model). A field left at 0 keeps the gate's own option; every set field must be one the gate
/// has and is validated like its constructor validates it (a `moet::Error` naming the gate,
/// the field and the value otherwise). Also settable per layer (`MoELayer::set_overrides`).
///
/// ```cpp
/// moet::RouteContext ctx;
/// ctx.overrides.k = 1;  // a top-2 TopKGate routes this call as top-1
/// ```
struct RoutingOverrides {
  /// Experts per token: `TopKGate::Options::k`, `GroupedTopKGate::Options::k`,
  /// `NullExpertGate::Options::k` (picks among real and null slots).
  Index k = 0;
  /// Cumulative-probability threshold: `TopPGate::Options::p`.
  double p = 0.0;
  /// Most experts per token: `ImportanceGate::Options::k_max`.
  Index k_max = 0;
  /// Target mean experts per token of the budget mapping: `ImportanceGate::Options::k_avg`.
  double k_avg = 0.0;

  /// True when no field is set.
  bool empty() const { return k == 0 && p == 0.0 && k_max == 0 && k_avg == 0.0; }
};

namespace detail {

/// Which `RoutingOverrides` fields a gate takes.
struct OverrideFields {
  bool k = false;
  bool p = false;
  bool k_max = false;
  bool k_avg = false;
};

/// Throws `moet::Error` naming `op` for a field of `o` set that the gate does not take (a gate
/// never ignores an override silently).
inline void check_override_fields(const char* op, const RoutingOverrides& o, OverrideFields takes) {
  const auto check = [&](bool set, bool taken, const char* name, auto value) {
    require(!set || taken, op, "has no option for ctx.overrides.", name, " (got ", value,
            "); this gate takes ", takes.k ? "k " : "", takes.p ? "p " : "",
            takes.k_max ? "k_max " : "", takes.k_avg ? "k_avg " : "",
            !takes.k && !takes.p && !takes.k_max && !takes.k_avg ? "no overrides" : "");
  };
  check(o.k != 0, takes.k, "k", o.k);
  check(o.p != 0.0, takes.p, "p", o.p);
  check(o.k_max != 0, takes.k_max, "k_max", o.k_max);
  check(o.k_avg != 0.0, takes.k_avg, "k_avg", o.k_avg);
}

/// The options of one call of a gate whose options are `own`: `own` itself when `o` is empty;
/// else checks that the gate takes every set field (`takes`), lets `apply(options, o)` write
/// the set fields into a copy and returns `validate(copy)` (the constructor's checks).
template <class Options, class Apply, class Validate>
Options call_options(const char* op, const RoutingOverrides& o, OverrideFields takes,
                     const Options& own, Apply&& apply, Validate&& validate) {
  if (o.empty()) [[likely]] {
    return own;
  }
  check_override_fields(op, o, takes);
  Options copy = own;
  apply(copy, o);
  return validate(copy);
}

}  // namespace detail

/// Per-call routing context. Default-constructed means: inference, seed 0, step 0, one
/// sequence, no importance information.
struct RouteContext {
  /// Training mode (noise, THOR's random expert, DynMoE's token dropping).
  bool training = false;
  /// Seed of every random choice; random draws key on `(seed, step, token)` so results do
  /// not depend on the thread count.
  std::uint64_t seed = 0;
  /// Training step or call counter: a new step gives new random draws.
  std::uint64_t step = 0;
  /// Tokens are laid out `[batch, sequence_length]` row-major; 0 means one sequence of all
  /// tokens. Used by `StochasticGate`'s `position` and `sequence` modes.
  Index sequence_length = 0;
  /// Optional per-token importance `(num_tokens)`, non-negative (for `ImportanceGate`).
  std::span<const float> importance{};
  /// Optional attention probabilities (for `ImportanceGate`).
  AttentionView attention{};
  /// Optional validity mask `(num_tokens)`, 0 marks a pad token. `ImportanceGate` gives pads
  /// no expert; other gates ignore it.
  std::span<const std::uint8_t> valid{};
  /// Selection options for this call only (`RoutingOverrides`); empty by default.
  RoutingOverrides overrides{};
};

}  // namespace moet
