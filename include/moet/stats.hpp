#pragma once
/// \file stats.hpp
/// `RoutingStats`: what a routing plan did, in numbers a person compares across routers.

#include <algorithm>
#include <cmath>
#include <vector>

#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

/// Summary of one routing plan.
struct RoutingStats {
  Index num_tokens = 0;
  Index num_experts = 0;
  /// Experts that could receive tokens (DynMoE's live slots, else `num_experts`).
  Index live_experts = 0;
  /// Assignments in the plan (after capacity drops).
  Index num_assignments = 0;
  /// Assignments removed by a capacity limit.
  Index dropped = 0;
  /// Tokens routed to each expert `(num_experts)`.
  std::vector<Index> load;
  /// `k_histogram[k]` tokens went to exactly `k` experts `(num_experts + 1)`.
  std::vector<Index> k_histogram;
  /// Mean experts per token.
  double mean_k = 0.0;
  /// Largest load, mean load over the live experts, and their ratio (1 = perfect balance;
  /// 0 when nothing was routed).
  double max_load = 0.0;
  double mean_load = 0.0;
  double max_mean_load_ratio = 0.0;
  /// Coefficient of variation of the load over the live experts (population std / mean).
  double load_cv = 0.0;
  /// Mean entropy (nats) of the router's per-token distribution; NaN when the gate has no
  /// distribution (`TopAnyGate`'s sigmoid scores, `StochasticGate`).
  double mean_entropy = 0.0;
};

/// Fills `stats` from `routing` (reusing its vectors).
template <class S>
void compute_stats(const Routing<S>& routing, RoutingStats& stats) {
  const Index num_experts = routing.num_experts();
  const Index num_tokens = routing.num_tokens();
  stats.num_tokens = num_tokens;
  stats.num_experts = num_experts;
  stats.live_experts = routing.live_experts;
  stats.num_assignments = routing.num_assignments();
  stats.dropped = routing.dropped;
  stats.mean_k = routing.mean_k();
  stats.load.assign(static_cast<std::size_t>(num_experts), 0);
  stats.k_histogram.assign(static_cast<std::size_t>(num_experts + 1), 0);
  for (const auto e : routing.experts()) ++stats.load[static_cast<std::size_t>(e)];
  for (Index t = 0; t < num_tokens; ++t) {
    const Index k = std::min(routing.k(t), num_experts);
    ++stats.k_histogram[static_cast<std::size_t>(k)];
  }
  const Index live = std::max<Index>(routing.live_experts, 1);
  double max_load = 0.0;
  for (const auto l : stats.load) max_load = std::max(max_load, static_cast<double>(l));
  const double mean = static_cast<double>(routing.num_assignments()) / static_cast<double>(live);
  // Variance over live experts: experts beyond the live set carry no load by construction,
  // so sum over all loads and count only `live` experts.
  double sq = 0.0;
  for (const auto l : stats.load) sq += (static_cast<double>(l) - mean) * (static_cast<double>(l) - mean);
  const Index idle = num_experts - live;  // dead slots contributed (0 - mean)^2 each; undo
  if (idle > 0) sq -= static_cast<double>(idle) * mean * mean;
  stats.max_load = max_load;
  stats.mean_load = mean;
  stats.max_mean_load_ratio = mean > 0.0 ? max_load / mean : 0.0;
  stats.load_cv = mean > 0.0 ? std::sqrt(std::max(sq, 0.0) / static_cast<double>(live)) / mean : 0.0;
  const auto probs = routing.probs();
  if (routing.probs_are_distribution && probs.rows() == num_tokens && num_tokens > 0) {
    double total = 0.0;
    for (Index t = 0; t < num_tokens; ++t) {
      double h = 0.0;
      for (Index e = 0; e < probs.cols(); ++e) {
        const double p = static_cast<double>(probs(t, e));
        if (p > 0.0) h -= p * std::log(p);
      }
      total += h;
    }
    stats.mean_entropy = total / static_cast<double>(num_tokens);
  } else {
    stats.mean_entropy = num_tokens > 0 ? std::nan("") : 0.0;
  }
}

/// Returns the stats of `routing`.
template <class S>
RoutingStats compute_stats(const Routing<S>& routing) {
  RoutingStats stats;
  compute_stats(routing, stats);
  return stats;
}

}  // namespace moet
