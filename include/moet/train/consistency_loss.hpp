#pragma once
/// \file train/consistency_loss.hpp
/// THOR's consistency regulariser between the two passes of a step (Zuo et al. 2022,
/// docs/algorithms.md §8.7); see train/losses.hpp for the other losses.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"
#include "moet/train/loss_checks.hpp"

namespace moet {

// --- THOR consistency -------------------------------------------------------------------------

/// Options of `consistency_loss`.
struct ConsistencyOptions {
  /// Coefficient `alpha`; THOR's default `consistency_alpha` is 1.0 (its IWSLT'14 script uses
  /// 5.0).
  double alpha = 1.0;
  /// Optional per-row validity (0 = pad row, e.g. a pad target token): skipped.
  std::span<const std::uint8_t> valid{};
};

/// THOR's consistency regulariser (Zuo et al. 2022, docs/algorithms.md §8.7):
/// `CR = alpha * 1/2 * sum_rows sum_v (p_v - q_v)(log p_v - log q_v)` with `p = softmax(a)`,
/// `q = softmax(b)` per row of the two logits matrices `logits0 = a`, `logits1 = b`
/// `(rows, V)` (rows = tokens; THOR sums over non-pad target tokens, so scale `alpha` by
/// `1 / rows` for a mean). This is `1/2 (KL(p||q) + KL(q||p))` per row. Softmax and logs are
/// computed here in double, `log p` as `max(a - logsumexp(a), log 1e-30)` (the log-0 guard:
/// clamping `p` at 1e-30). Both sides get gradients (no stop-gradient), the exact gradient of
/// the guarded formula (a clamped log contributes no gradient): with `g = (lp - lq) / 2` and
/// `r = (p - q) / 2` on the unclamped entries (0 on clamped ones),
/// `dL/da = alpha (p (g - <p, g>) + r - p sum r)`, symmetrically for `b` with signs flipped.
/// Adds them into `d0` and `d1` (same shape) and returns `CR`. Runs in parallel over fixed row
/// blocks (same bits for any thread count). Throws `Error` naming `consistency_loss` on a
/// shape mismatch or a non-finite logit.
template <class S>
double consistency_loss(const ConstRows<S>& logits0, const ConstRows<S>& logits1, Rows<S> d0,
                        Rows<S> d1, const ConsistencyOptions& options = {}) {
  constexpr const char* op = "consistency_loss";
  const Index rows = logits0.rows();
  const Index cols = logits0.cols();
  detail::require_shape(op, "logits1", logits1, rows, cols);
  detail::require_shape(op, "d0", d0, rows, cols);
  detail::require_shape(op, "d1", d1, rows, cols);
  detail::require_finite(op, "logits0", logits0);
  detail::require_finite(op, "logits1", logits1);
  detail::count_valid(op, options.valid, rows);
  if (rows == 0 || cols == 0) return 0.0;
  constexpr Index kBlock = 32;  // rows per task (fixed: thread-count independent)
  const Index num_blocks = (rows + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<std::size_t>(num_blocks), 0.0);
  const double log_floor = std::log(detail::kLogFloor);
  const double alpha = options.alpha;
  // Per-thread row work arrays, allocated before the region: log p, log q, p, q (cols each).
  std::vector<double> work(static_cast<std::size_t>(detail::max_threads() * 4 * cols));
  detail::parallel_for(num_blocks, [&](Index b) {
    double* lp = work.data() +
                 static_cast<std::size_t>(detail::thread_id()) * static_cast<std::size_t>(4 * cols);
    double* lq = lp + cols;
    double* p = lq + cols;
    double* q = p + cols;
    const auto log_softmax = [&](const S* z, double* lz, double* pz) {
      double max = static_cast<double>(z[0]);
      for (Index v = 1; v < cols; ++v) max = std::max(max, static_cast<double>(z[v]));
      double sum = 0.0;
      for (Index v = 0; v < cols; ++v) sum += std::exp(static_cast<double>(z[v]) - max);
      const double lse = max + std::log(sum);
      for (Index v = 0; v < cols; ++v) {
        lz[v] = static_cast<double>(z[v]) - lse;
        pz[v] = std::exp(lz[v]);
      }
    };
    double acc = 0.0;
    const Index end = std::min(rows, (b + 1) * kBlock);
    for (Index t = b * kBlock; t < end; ++t) {
      if (!detail::is_valid(options.valid, t)) continue;
      log_softmax(logits0.data() + t * logits0.outerStride(), lp, p);
      log_softmax(logits1.data() + t * logits1.outerStride(), lq, q);
      double row = 0.0;
      double pg = 0.0, qg = 0.0, rp = 0.0, rq = 0.0;
      for (Index v = 0; v < cols; ++v) {
        const double lpv = std::max(lp[v], log_floor);
        const double lqv = std::max(lq[v], log_floor);
        const double g = 0.5 * (lpv - lqv);
        row += (p[v] - q[v]) * g;
        pg += p[v] * g;
        qg += q[v] * g;
        if (lp[v] >= log_floor) rp += 0.5 * (p[v] - q[v]);
        if (lq[v] >= log_floor) rq += 0.5 * (p[v] - q[v]);
      }
      acc += row;
      S* da = d0.data() + t * d0.outerStride();
      S* db = d1.data() + t * d1.outerStride();
      for (Index v = 0; v < cols; ++v) {
        const double g = 0.5 * (std::max(lp[v], log_floor) - std::max(lq[v], log_floor));
        const double r = 0.5 * (p[v] - q[v]);
        // a: dL/dp = g, dL/dlp = r (unclamped); b: dL/dq = -g, dL/dlq = -r (unclamped).
        const double ga = p[v] * (g - pg) + (lp[v] >= log_floor ? r : 0.0) - p[v] * rp;
        const double gb = q[v] * (-g + qg) - (lq[v] >= log_floor ? r : 0.0) + q[v] * rq;
        da[v] += static_cast<S>(alpha * ga);
        db[v] += static_cast<S>(alpha * gb);
      }
    }
    partial[static_cast<std::size_t>(b)] = acc;
  });
  double loss = 0.0;
  for (const double v : partial) loss += v;
  return alpha * loss;
}

}  // namespace moet
