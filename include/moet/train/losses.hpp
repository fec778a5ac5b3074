#pragma once
/// \file train/losses.hpp
/// Auxiliary routing losses and THOR's consistency loss, as free functions: each returns the
/// loss value (accumulated in double) and **adds** its gradient into caller buffers (the caller
/// zeroes them; several losses may add into the same buffer). Coefficients are option structs
/// with the papers' defaults. Formulas and sources: docs/algorithms.md §8: §8.3 (top-p), §8.7
/// (THOR), §8.1-8.5 (baselines). DynMoE's losses live in train/top_any_losses.hpp.
///
/// Where the gradient goes (see concepts.hpp, `SoftmaxLossGrad`):
/// | loss                  | input                        | adds into, then pass as            |
/// |-----------------------|------------------------------|------------------------------------|
/// | `load_balance_loss`   | `Routing` (plan, `probs()`)  | `d_probs` (T, E): `d_probs`        |
/// | `router_z_loss`       | logits `z` (T, E)            | `d_logits` (T, E): `d_logits`      |
/// | `router_entropy_loss` | probabilities `P` (T, E)     | `d_probs` (T, E): `d_probs`        |
/// | `importance_loss`     | `Routing` (combine weights)  | `d_weights` (assignments)          |
/// | `noisy_load_loss`     | `z`, `n`, `eps` (T, E) each  | `d_logits`; `d_noise_logits`       |
/// | `consistency_loss`    | two logits matrices (T, V)   | `d0`, `d1` (T, V), e.g. dL/dy     |
///
/// Token means divide by the number of valid tokens: `valid` (one byte per token, 0 = pad) is
/// optional in every option struct that has it; pads contribute nothing and get no gradient,
/// and a batch with no valid token gives 0. All losses run serially in a fixed order except
/// `consistency_loss` (fixed row blocks, partial sums added in block order): the same bits for
/// any thread count. Each call allocates a little scratch (`O(E)` values; `consistency_loss`
/// `O(threads * V)`): these are per-step functions, not per-token kernels.
///
/// ```cpp
/// RowMatrix<float> d_probs = RowMatrix<float>::Zero(T, E);
/// const auto opts = moet::LoadBalanceOptions::switch_options();
/// double lb = moet::load_balance_loss<float>(plan, d_probs, opts);
/// gate.backward(x, ctx, plan, d_weights, {.d_probs = {d_probs.data(), std::size_t(T * E)}}, dx);
/// ```

#include "moet/train/consistency_loss.hpp"
#include "moet/train/noisy_losses.hpp"
#include "moet/train/router_losses.hpp"
