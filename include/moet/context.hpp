#pragma once
/// \file context.hpp
/// `RouteContext`: what a gate may know about the call besides the tokens themselves.

#include <cstdint>
#include <span>

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
};

}  // namespace moet
