#pragma once
/// \file gates/top_any_adaptive.hpp
/// DynMoE's adaptive process (Guo et al., ICLR 2025, arXiv 2405.14297): records of the tokens
/// each expert slot received and of the tokens routed nowhere, the remove-then-add update of
/// the live slots, and the schedule that runs them. `TopAnyGate` (gates/top_any.hpp) owns one
/// and exposes it; specification: docs/algorithms.md §4.5-4.6.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include <Eigen/Core>

#include "moet/errors.hpp"
#include "moet/gates/cosine_router.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// When `TopAnyGate` runs DynMoE's adaptive process (docs/algorithms.md §4.5-4.6).
enum class TopAnySchedule {
  /// DeepSpeed's cycle over the gate's counter `n` of training forwards (counted by
  /// `on_training_forward`, read before the forward): begin recording when
  /// `n % period == 0 && (n / period) % 3 == 1`, update the experts after the forward when
  /// `n % period == 0 && (n / period) % 3 == 2` (`period` = `Options::schedule_period`, 300 in
  /// DeepSpeed). With 300: record forwards 300..600 inclusive (301 calls), update after 600,
  /// again 1200..1500, and so on.
  kDeepSpeedCycle,
  /// Only explicit `begin_recording()` / `update_experts()` calls (Tutel's GLUE script style,
  /// where the caller knows the epoch length).
  kManual,
};

/// What one `TopAnyGate::update_experts()` did.
struct TopAnyExpertUpdate {
  /// Slots switched off (they were active and received no token while recording).
  Index removed = 0;
  /// The slot switched on, or -1 when none was added.
  Index added = -1;
};

/// DynMoE's adaptive process over `num_experts` slots of width `model_dim` (docs/algorithms.md
/// §4.5-4.6): the records `R_E` (tokens per slot) and `R_S` (the sum of the inputs of tokens
/// routed nowhere), the recording flag, the counter of training forwards and the schedule.
/// It changes a gate's expert mask and `CosineRouter`, which the caller passes in.
///
/// \tparam S scalar type (float or double).
template <class S>
class TopAnyAdaptive {
 public:
  /// Empty records over `num_experts` slots and `model_dim` columns; `period` >= 1 (checked by
  /// the owner).
  TopAnyAdaptive(Index num_experts, Index model_dim, TopAnySchedule schedule, std::int64_t period)
      : schedule_(schedule), period_(period) {
    record_tokens_.assign(static_cast<std::size_t>(num_experts), 0);
    record_unrouted_ = Vector<S>::Zero(model_dim);
  }

  /// The schedule's part of `TopAnyGate::on_training_forward`, on a plan the gate has checked.
  /// In order: under `TopAnySchedule::kDeepSpeedCycle`, begins recording when the counter `n =
  /// training_forwards()` says so; while recording, adds the plan to the records (`R_E[e] +=
  /// tokens routed to e`, `R_S += x_t` for every token routed nowhere, in token order); under
  /// the cycle, updates the experts (`update_experts`) when `n` says so and a recording is still
  /// open (an explicit `update_experts()` earlier in the window closes it); then counts the
  /// forward (`++n`). Under `kManual` it only records (when recording) and counts.
  void after_training_forward(const ConstRows<S>& x, const Routing<S>& routing, Vector<S>& mask,
                              CosineRouter<S>& router) {
    const std::int64_t n = forwards_;
    const bool cycle = schedule_ == TopAnySchedule::kDeepSpeedCycle && n % period_ == 0;
    if (cycle && (n / period_) % 3 == 1) begin_recording();
    if (recording_) {
      for (Index t = 0; t < routing.num_tokens(); ++t) {
        if (routing.k(t) == 0) record_unrouted_ += x.row(t).transpose();
        for (const auto e : routing.experts(t)) ++record_tokens_[static_cast<std::size_t>(e)];
      }
    }
    if (cycle && (n / period_) % 3 == 2 && recording_) update_experts(mask, router);
    ++forwards_;
  }

  /// Resets the records and starts recording (DynMoE's start flag).
  void begin_recording() {
    std::fill(record_tokens_.begin(), record_tokens_.end(), Index{0});
    record_unrouted_.setZero();
    recording_ = true;
  }

  /// DynMoE's expert update (docs/algorithms.md §4.5), remove first, then add; stops
  /// recording. Remove: every slot live in `mask` that received no token while recording is
  /// switched off (its `W` column, threshold and the expert bank's weights stay as they are).
  /// Add: when `||R_S||_2 > 0` (the norm, where DeepSpeed tests `sum_i R_S[i] != 0`: a sum that
  /// cancels to 0 would skip a real add) and some slot is inactive, the lowest inactive slot `j`
  /// is switched on with `W[:, j] = R_S / ||R_S||_2` and `theta_j = 0` (`router.reset_slot`); at
  /// most one slot per update. The expert weights are not the gate's: the new slot reuses
  /// whatever the bank holds for slot `j` (possibly those of an expert removed in this very
  /// update), as DynMoE does. Optimiser state (momenta) for the slot's `W` column and threshold
  /// is not reset. A non-finite `R_S` (a float sum that overflowed) adds nothing. Throws
  /// `moet::Error` when not recording.
  TopAnyExpertUpdate update_experts(Vector<S>& mask, CosineRouter<S>& router) {
    detail::require(recording_, "TopAnyGate::update_experts",
                    "no recording to update from: call begin_recording() first (recording ",
                    "stops at every update), training forwards counted so far: ", forwards_);
    TopAnyExpertUpdate result;
    const Index emax = mask.size();
    for (Index e = 0; e < emax; ++e) {
      if (mask[e] != S(0) && record_tokens_[static_cast<std::size_t>(e)] == 0) {
        mask[e] = S(0);
        ++result.removed;
      }
    }
    const S norm = record_unrouted_.stableNorm();
    if (norm > S(0) && std::isfinite(norm) && detail::all_finite(record_unrouted_)) {
      for (Index j = 0; j < emax; ++j) {
        if (mask[j] != S(0)) continue;
        mask[j] = S(1);
        router.reset_slot(j, record_unrouted_, norm);
        result.added = j;
        break;
      }
    }
    recording_ = false;
    return result;
  }

  /// True between `begin_recording()` (or the cycle's begin) and the next update.
  bool recording() const { return recording_; }
  /// `R_E` `(num_experts)`: tokens routed to each slot since recording began.
  std::span<const Index> recorded_tokens() const { return record_tokens_; }
  /// `R_S` `(model_dim)`: the sum of the raw inputs of tokens routed nowhere since recording
  /// began.
  const Vector<S>& recorded_unrouted() const { return record_unrouted_; }
  /// The counter `n` of training forwards seen by `after_training_forward`.
  std::int64_t training_forwards() const { return forwards_; }
  /// Sets the counter (to resume a run); the caller checks `n >= 0`.
  void set_training_forwards(std::int64_t n) { forwards_ = n; }

 private:
  TopAnySchedule schedule_;
  std::int64_t period_;
  std::vector<Index> record_tokens_;  // R_E (num_experts)
  Vector<S> record_unrouted_;         // R_S (model_dim)
  bool recording_ = false;
  std::int64_t forwards_ = 0;  // training forwards counted by after_training_forward
};

}  // namespace moet
