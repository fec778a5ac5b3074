#pragma once
/// \file testing/gate_conformance.hpp
/// A conformance check of any `Gate` against the contract every gate keeps (concepts.hpp,
/// docs/algorithms.md §1.2, §1.4, §1.5, §10): valid plans, the same plan whatever the thread
/// count and however often it is asked for, an empty batch, and `moet::Error` for a NaN, an Inf
/// or a wrong width in `x`. Framework-free: `check_gate` returns a report of what failed, for
/// any test framework (or none).
///
/// ```cpp
/// #include <moet/testing/gate_conformance.hpp>
/// const moet::testing::GateReport report = moet::testing::check_gate(my_gate);
/// if (!report.ok()) std::puts(report.to_string().c_str());  // or CHECK(report.ok()) with INFO
/// ```

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet::testing {

/// What `check_gate` checks beyond the contract every gate keeps, and with which inputs.
struct GateCheckOptions {
  /// Tokens of the checked batches (more than one of the gates' 64-token blocks by default, so
  /// that the parallel splits are exercised).
  Index num_tokens = 150;
  /// Seed of the batches' tokens (standard normal entries).
  std::uint64_t seed = 1;
  /// The context to route `num_tokens` tokens with, for gates that need one (importance,
  /// sequence length): called with the batch's token count; the spans it returns must stay
  /// valid until `check_gate` returns. Default: `RouteContext{}`.
  std::function<RouteContext(Index num_tokens)> context{};
  /// Also check every property with `ctx.training = true` (noise, random draws, dropping).
  bool training = true;
  /// The gate promises weights >= 0.
  bool non_negative_weights = true;
  /// The gate promises that a token's weights sum to 1 whenever it has an expert.
  bool weights_sum_to_one = false;
  /// The gate promises at least one expert per token.
  bool at_least_one_expert = false;
  /// The gate promises that a token never goes to the same expert twice.
  bool distinct_experts = true;
  /// Tolerance of the sums to 1 (weights, probability rows).
  double sum_tolerance = 1e-4;
};

/// What `check_gate` found: one line per failed property (empty when the gate conforms).
struct GateReport {
  std::vector<std::string> failures;

  /// True when every property held.
  bool ok() const { return failures.empty(); }
  /// The failures, one per line.
  std::string to_string() const {
    std::string out;
    for (const auto& failure : failures) out += failure + "\n";
    return out;
  }
};

namespace detail {

template <class S>
RowMatrix<S> conformance_tokens(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  RowMatrix<S> x(rows, cols);  // (rows, cols)
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<S>(normal(gen));
  return x;
}

// Appends to `report` every broken invariant of `plan`, the plan of `num_tokens` tokens by a
// gate of `num_experts` experts; `what` names the call.
template <class S>
void check_plan(const Routing<S>& plan, Index num_tokens, Index num_experts,
                const GateCheckOptions& options, const std::string& what, GateReport& report) {
  const auto fail = [&](const std::string& why) { report.failures.push_back(what + ": " + why); };
  if (plan.num_tokens() != num_tokens || plan.num_experts() != num_experts) {
    fail(moet::detail::concat("the plan is over (", plan.num_tokens(), " tokens, ",
                              plan.num_experts(), " experts), expected (", num_tokens, ", ",
                              num_experts, ")"));
    return;
  }
  const auto offsets = plan.offsets();
  if (offsets.front() != 0 || offsets.back() != plan.num_assignments()) {
    fail(moet::detail::concat("offsets run from ", offsets.front(), " to ", offsets.back(),
                              ", expected 0 to num_assignments = ", plan.num_assignments()));
    return;
  }
  if (plan.experts().size() != plan.weights().size() ||
      static_cast<Index>(plan.experts().size()) != plan.num_assignments()) {
    fail("experts() and weights() must hold num_assignments entries each");
    return;
  }
  for (Index t = 0; t < num_tokens; ++t) {
    if (plan.k(t) < 0) {
      fail(moet::detail::concat("offsets decrease at token ", t));
      return;
    }
    if (options.at_least_one_expert && plan.k(t) == 0) {
      fail(moet::detail::concat("token ", t, " has no expert"));
    }
    const auto experts = plan.experts(t);
    const auto weights = plan.weights(t);
    double sum = 0.0;
    for (std::size_t j = 0; j < experts.size(); ++j) {
      const std::int32_t e = experts[j];
      if (e < 0 || e >= num_experts) {
        fail(moet::detail::concat("token ", t, " slot ", j, ": expert id ", e, " outside [0, ",
                                  num_experts, ")"));
      }
      for (std::size_t i = 0; options.distinct_experts && i < j; ++i) {
        if (experts[i] == e) fail(moet::detail::concat("token ", t, " has expert ", e, " twice"));
      }
      if (!std::isfinite(weights[j])) {
        fail(moet::detail::concat("token ", t, " slot ", j, ": weight ", weights[j]));
      } else if (options.non_negative_weights && weights[j] < S(0)) {
        fail(moet::detail::concat("token ", t, " slot ", j, ": negative weight ", weights[j]));
      }
      sum += static_cast<double>(weights[j]);
    }
    if (options.weights_sum_to_one && !experts.empty() &&
        !(std::abs(sum - 1.0) <= options.sum_tolerance)) {
      fail(moet::detail::concat("token ", t, "'s weights sum to ", sum, ", not 1"));
    }
  }
  if (plan.dropped < 0 || plan.live_experts < 0 || plan.live_experts > num_experts) {
    fail(moet::detail::concat("dropped = ", plan.dropped, " and live_experts = ", plan.live_experts,
                              " must be >= 0 and live_experts <= ", num_experts));
  }
  const auto probs = plan.probs();
  const bool no_probs = probs.rows() == 0 && probs.cols() == 0;
  if (!no_probs && (probs.rows() != num_tokens || probs.cols() != num_experts)) {
    fail(moet::detail::concat("probs() is (", probs.rows(), ", ", probs.cols(),
                              "), expected (0, 0) or (", num_tokens, ", ", num_experts, ")"));
  } else if (plan.probs_are_distribution && num_tokens > 0) {
    for (Index t = 0; t < num_tokens; ++t) {
      const double sum = probs.row(t).template cast<double>().sum();
      const bool in_range =
          (probs.row(t).array() >= S(0)).all() && (probs.row(t).array() <= S(1)).all();
      if (!in_range || !(std::abs(sum - 1.0) <= options.sum_tolerance)) {
        fail(moet::detail::concat("probs_are_distribution, but probs() row ", t, " sums to ", sum,
                                  in_range ? "" : " or leaves [0, 1]"));
        break;
      }
    }
  }
}

// True when the two plans have the same bits.
template <class S>
bool same_plan(const Routing<S>& a, const Routing<S>& b) {
  const auto equal_spans = [](auto x, auto y) {
    if (x.size() != y.size()) return false;
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (std::memcmp(&x[i], &y[i], sizeof(x[i])) != 0) return false;
    }
    return true;
  };
  if (a.num_tokens() != b.num_tokens() || a.num_experts() != b.num_experts() ||
      a.dropped != b.dropped || a.live_experts != b.live_experts ||
      a.probs_are_distribution != b.probs_are_distribution) {
    return false;
  }
  const auto pa = a.probs();
  const auto pb = b.probs();
  return equal_spans(a.offsets(), b.offsets()) && equal_spans(a.experts(), b.experts()) &&
         equal_spans(a.weights(), b.weights()) && pa.rows() == pb.rows() &&
         pa.cols() == pb.cols() &&
         equal_spans(std::span<const S>(pa.data(), static_cast<std::size_t>(pa.size())),
                     std::span<const S>(pb.data(), static_cast<std::size_t>(pb.size())));
}

// "" when `route` throws moet::Error, else what happened instead.
template <class Route>
std::string expect_error(Route&& route) {
  try {
    route();
  } catch (const Error&) {
    return "";
  } catch (const std::exception& e) {
    return std::string("threw a std::exception that is not moet::Error: ") + e.what();
  }
  return "did not throw";
}

}  // namespace detail

/// Checks `gate` against the `Gate` contract and returns what failed:
/// - every plan is valid: over `num_tokens` tokens and `gate.num_experts()` experts, offsets
///   from 0 to `num_assignments()` and non-decreasing, expert ids in range (and distinct per
///   token, unless `options.distinct_experts` is off), finite weights (non-negative, summing to
///   1, at least one expert per token: as `options` promise), `probs()` empty or `(num_tokens,
///   num_experts)` with rows that are distributions when `probs_are_distribution` says so;
/// - routing is deterministic: the same bits on a reused and on a fresh `Routing`, and with 1
///   and 2 threads (`moet::set_num_threads`; the caller's count is restored);
/// - an empty batch gives an empty plan;
/// - `x` with a NaN, with an Inf, or one column too many or too few throws `moet::Error`.
/// Each is checked in inference and, with `options.training`, in training (`ctx.training`).
///
/// \tparam G the gate type (`Gate` concept; its hooks must pass `HookCheck`).
template <Gate G>
GateReport check_gate(const G& gate, const GateCheckOptions& options = {}) {
  static_assert(HookCheck<G>::kChecked, "the gate's optional hooks pass HookCheck");
  using S = typename G::Scalar;
  GateReport report;
  const Index d = static_cast<Index>(gate.model_dim());
  const Index num_experts = static_cast<Index>(gate.num_experts());
  const Index n = options.num_tokens;
  const auto context = [&](Index tokens, bool training) {
    RouteContext ctx = options.context ? options.context(tokens) : RouteContext{};
    ctx.training = training;
    return ctx;
  };
  const auto route = [&](const RowMatrix<S>& x, const RouteContext& ctx, Routing<S>& plan,
                         const std::string& what) {
    try {
      gate.route(x, ctx, plan);
      return true;
    } catch (const std::exception& e) {
      report.failures.push_back(what + ": route threw on a valid batch: " + e.what());
      return false;
    }
  };
  const int saved_threads = num_threads();
  for (const bool training : {false, true}) {
    if (training && !options.training) break;
    const std::string mode = training ? "training" : "inference";
    const RouteContext ctx = context(n, training);
    const RowMatrix<S> x = detail::conformance_tokens<S>(n, d, options.seed);  // (n, d)

    Routing<S> first;
    Routing<S> again;
    Routing<S> fresh;
    set_num_threads(1);
    const bool routed = route(x, ctx, first, mode + ", 1 thread");
    set_num_threads(2);
    if (routed && route(x, ctx, again, mode + ", 2 threads") &&
        route(x, ctx, again, mode + ", 2 threads, reused plan")) {
      detail::check_plan(first, n, num_experts, options, mode, report);
      if (!detail::same_plan(first, again)) {
        report.failures.push_back(mode + ": the plan with 2 threads (on a reused Routing) " +
                                  "differs from the plan with 1 thread");
      }
      set_num_threads(1);
      if (route(x, ctx, fresh, mode + ", fresh plan") && !detail::same_plan(first, fresh)) {
        report.failures.push_back(mode + ": routing the same batch twice gave different plans");
      }
    }
    set_num_threads(saved_threads);

    Routing<S> empty;
    const RowMatrix<S> none(0, d);
    if (route(none, context(0, training), empty, mode + ", empty batch")) {
      if (empty.num_tokens() != 0 || empty.num_assignments() != 0) {
        report.failures.push_back(mode + ": an empty batch gave a plan with " +
                                  std::to_string(empty.num_tokens()) + " tokens and " +
                                  std::to_string(empty.num_assignments()) + " assignments");
      }
    }

    const auto bad_input = [&](const RowMatrix<S>& bad, const std::string& what) {
      Routing<S> plan;
      const std::string got = detail::expect_error([&] { gate.route(bad, ctx, plan); });
      if (!got.empty()) report.failures.push_back(mode + ": " + what + ": " + got);
    };
    RowMatrix<S> with_nan = x;
    with_nan(n / 2, d / 2) = std::numeric_limits<S>::quiet_NaN();
    bad_input(with_nan, "x with a NaN should throw moet::Error");
    RowMatrix<S> with_inf = x;
    with_inf(n - 1, d - 1) = -std::numeric_limits<S>::infinity();
    bad_input(with_inf, "x with an Inf should throw moet::Error");
    bad_input(detail::conformance_tokens<S>(n, d + 1, options.seed),
              "x one column too wide should throw moet::Error");
    if (d > 1) {
      bad_input(detail::conformance_tokens<S>(n, d - 1, options.seed),
                "x one column too narrow should throw moet::Error");
    }
  }
  return report;
}

}  // namespace moet::testing
