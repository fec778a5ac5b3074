#pragma once
// Shared by moet's libFuzzer targets: a byte decoder that turns arbitrary input into shapes,
// options and matrices (with NaN, +/-Inf, denormals, signed zeros, huge values and exact ties),
// and the plan invariants every gate must keep. A broken invariant prints what broke and
// aborts, which libFuzzer reports as a crash with the input that caused it.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet_fuzz {

using moet::Index;

/// Aborts with a message when `cond` is false (a fuzzer finding).
#define MOET_FUZZ_CHECK(cond, ...)                                                                \
  do {                                                                                            \
    if (!(cond)) {                                                                                \
      std::fprintf(stderr, "moet fuzz: check `%s` failed at %s:%d: ", #cond, __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                                                          \
      std::fprintf(stderr, "\n");                                                                 \
      std::abort();                                                                               \
    }                                                                                             \
  } while (false)

/// Reads the fuzzer's bytes front to back; past the end every read returns zeros, so any
/// input, the empty one included, decodes to something.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::uint8_t u8() { return pos_ < size_ ? data_[pos_++] : std::uint8_t{0}; }
  std::uint16_t u16() {
    const auto lo = static_cast<std::uint16_t>(u8());
    return static_cast<std::uint16_t>(lo | static_cast<std::uint16_t>(u8() << 8));
  }
  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(u8()) << (8 * i);
    return v;
  }
  std::uint64_t u64() {
    const std::uint64_t lo = u32();
    return lo | (static_cast<std::uint64_t>(u32()) << 32);
  }
  bool flag() { return (u8() & 1u) != 0; }
  /// An integer in `[lo, hi]` (inclusive).
  Index in_range(Index lo, Index hi) {
    const auto span = static_cast<std::uint64_t>(hi - lo) + 1;
    return lo + static_cast<Index>(u16() % span);
  }
  bool empty() const { return pos_ >= size_; }

  /// One float. The first byte picks a class: mostly an ordinary value of moderate size, but
  /// also exact specials (0, -0, 1, NaN, +/-Inf, denormals, FLT_MAX, the lowest normal) and
  /// raw bit patterns, so every corner the gates must handle is reachable.
  float value() {
    const std::uint8_t kind = u8();
    switch (kind % 16) {
      case 0:
        return 0.0f;
      case 1:
        return -0.0f;
      case 2:
        return 1.0f;
      case 3:
        return std::numeric_limits<float>::quiet_NaN();
      case 4:
        return std::numeric_limits<float>::infinity();
      case 5:
        return -std::numeric_limits<float>::infinity();
      case 6:
        return std::numeric_limits<float>::denorm_min() * static_cast<float>(u8() + 1);
      case 7:
        return -std::numeric_limits<float>::denorm_min() * static_cast<float>(u8() + 1);
      case 8:
        return std::numeric_limits<float>::max() * (flag() ? 1.0f : -1.0f);
      case 9:
        return std::numeric_limits<float>::min() * (flag() ? 1.0f : -1.0f);
      case 10: {  // raw bits: anything at all
        const std::uint32_t bits = u32();
        float v = 0.0f;
        std::memcpy(&v, &bits, sizeof v);
        return v;
      }
      case 11:  // a large but finite value
        return static_cast<float>(static_cast<std::int16_t>(u16())) * 1e30f;
      default:  // an ordinary value in about [-8, 8], on a coarse grid so ties are common
        return static_cast<float>(static_cast<std::int8_t>(u8())) / 16.0f;
    }
  }

  /// A `(rows, cols)` matrix of `value()`s. `finite_only` maps specials to 0; `tie_mode`
  /// (from the input) may make rows or columns exact copies of the first, or all zero, so that
  /// exact ties between experts occur.
  moet::RowMatrix<float> matrix(Index rows, Index cols, bool finite_only) {
    moet::RowMatrix<float> m(rows, cols);
    const std::uint8_t tie_mode = u8() % 4;
    for (Index i = 0; i < m.size(); ++i) {
      float v = empty() ? 0.0f : value();
      if (finite_only && !std::isfinite(v)) v = 0.0f;
      m.data()[i] = v;
    }
    if (m.size() == 0) return m;  // (Eigen's col() of an empty matrix offsets a null pointer)
    if (tie_mode == 1 && cols > 1) {
      for (Index c = 1; c < cols; ++c) m.col(c) = m.col(0);  // equal columns: equal scores
    } else if (tie_mode == 2 && rows > 1) {
      for (Index r = 1; r < rows; ++r) m.row(r) = m.row(0);  // equal rows
    } else if (tie_mode == 3 && cols > 2) {
      m.col(cols - 1) = m.col(0);  // one exact tie, with the highest id
    }
    return m;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

/// Hands `w` to a gate's weight setter, `set(matrix, layout)`, in moet's layout or (when
/// `torch_layout`) transposed in PyTorch's. The setter must throw `moet::Error` exactly when `w`
/// holds a NaN or Inf (nothing else is wrong with it). Returns whether it took `w`.
template <class Set>
bool set_weights(Set&& set, const moet::RowMatrix<float>& w, bool torch_layout) {
  const bool finite = w.allFinite();
  try {
    if (torch_layout) {
      set(moet::RowMatrix<float>(w.transpose()), moet::WeightLayout::kOutIn);
    } else {
      set(w, moet::WeightLayout::kInOut);
    }
  } catch (const moet::Error&) {
    MOET_FUZZ_CHECK(!finite, "a weight setter rejected finite weights");
    return false;
  }
  MOET_FUZZ_CHECK(finite, "a weight setter accepted non-finite weights");
  return true;
}

/// True when every entry of `m` is finite and at most `bound` in magnitude.
inline bool all_small(const moet::RowMatrix<float>& m, float bound) {
  for (Index i = 0; i < m.size(); ++i) {
    const float v = m.data()[i];
    if (!std::isfinite(v) || std::abs(v) > bound) return false;
  }
  return true;
}

/// The structural invariants of any valid plan over `num_tokens` tokens and `num_experts`
/// experts: offsets start at 0 and never decrease, end at `num_assignments`; every expert id is
/// in range and appears at most once per token; every weight is finite and in `[0, 1]`; every
/// `k(t)` lies in `[k_lo, k_hi]`; `probs()` (when present) is `(num_tokens, num_experts)`,
/// finite, in `[0, 1]`, and a distribution per row when the plan says so. `max_weight` and
/// `max_prob` raise the bounds of the weights and of `probs()` for a gate whose weights or
/// scores are not probabilities (`GroupedTopKGate`'s `scaling_factor`, `ReluGate`'s `R`).
inline void check_plan(const moet::Routing<float>& plan, Index num_tokens, Index num_experts,
                       Index k_lo, Index k_hi, float max_weight = 1.0f, float max_prob = 1.0f) {
  MOET_FUZZ_CHECK(plan.num_tokens() == num_tokens, "num_tokens %ld, want %ld",
                  static_cast<long>(plan.num_tokens()), static_cast<long>(num_tokens));
  MOET_FUZZ_CHECK(plan.num_experts() == num_experts, "num_experts %ld, want %ld",
                  static_cast<long>(plan.num_experts()), static_cast<long>(num_experts));
  const auto offsets = plan.offsets();
  MOET_FUZZ_CHECK(offsets.size() == static_cast<std::size_t>(num_tokens + 1), "offsets size");
  MOET_FUZZ_CHECK(offsets[0] == 0, "offsets[0] = %ld", static_cast<long>(offsets[0]));
  std::vector<std::uint8_t> seen(static_cast<std::size_t>(num_experts), 0);
  for (Index t = 0; t < num_tokens; ++t) {
    const Index k = plan.k(t);
    MOET_FUZZ_CHECK(k >= 0, "offsets decrease at token %ld", static_cast<long>(t));
    MOET_FUZZ_CHECK(k >= k_lo && k <= k_hi, "k(%ld) = %ld outside [%ld, %ld]", static_cast<long>(t),
                    static_cast<long>(k), static_cast<long>(k_lo), static_cast<long>(k_hi));
    const auto ids = plan.experts(t);
    const auto weights = plan.weights(t);
    for (std::size_t j = 0; j < ids.size(); ++j) {
      const std::int32_t e = ids[j];
      MOET_FUZZ_CHECK(e >= 0 && e < num_experts, "token %ld slot %zu: expert %d out of range",
                      static_cast<long>(t), j, e);
      MOET_FUZZ_CHECK(seen[static_cast<std::size_t>(e)] == 0, "token %ld: expert %d chosen twice",
                      static_cast<long>(t), e);
      seen[static_cast<std::size_t>(e)] = 1;
      const float w = weights[j];
      MOET_FUZZ_CHECK(std::isfinite(w) && w >= 0.0f && w <= max_weight * (1.0f + 1e-5f),
                      "token %ld slot %zu: weight %g not finite in [0, %g]", static_cast<long>(t),
                      j, static_cast<double>(w), static_cast<double>(max_weight));
    }
    for (const auto e : ids) seen[static_cast<std::size_t>(e)] = 0;
  }
  MOET_FUZZ_CHECK(offsets[static_cast<std::size_t>(num_tokens)] == plan.num_assignments(),
                  "last offset is not num_assignments");
  const auto probs = plan.probs();
  if (probs.size() > 0) {
    MOET_FUZZ_CHECK(probs.rows() == num_tokens && probs.cols() == num_experts, "probs shape");
    for (Index t = 0; t < num_tokens; ++t) {
      double sum = 0.0;
      for (Index e = 0; e < num_experts; ++e) {
        const float p = probs(t, e);
        MOET_FUZZ_CHECK(std::isfinite(p) && p >= 0.0f && p <= max_prob * (1.0f + 1e-5f),
                        "probs(%ld, %ld) = %g", static_cast<long>(t), static_cast<long>(e),
                        static_cast<double>(p));
        sum += static_cast<double>(p);
      }
      if (plan.probs_are_distribution) {
        MOET_FUZZ_CHECK(std::abs(sum - 1.0) < 1e-3, "probs row %ld sums to %g",
                        static_cast<long>(t), sum);
      }
    }
  }
}

/// Whether two plans are bit-identical (offsets, ids, weights, probs, counters).
inline bool same_plan(const moet::Routing<float>& a, const moet::Routing<float>& b) {
  const auto eq_bits = [](auto x, auto y) {
    return x.size() == y.size() &&
           (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(x[0])) == 0);
  };
  const auto pa = a.probs();
  const auto pb = b.probs();
  return a.num_tokens() == b.num_tokens() && a.num_experts() == b.num_experts() &&
         eq_bits(a.offsets(), b.offsets()) && eq_bits(a.experts(), b.experts()) &&
         eq_bits(a.weights(), b.weights()) && a.dropped == b.dropped &&
         a.live_experts == b.live_experts && pa.rows() == pb.rows() && pa.cols() == pb.cols() &&
         (pa.size() == 0 || std::memcmp(pa.data(), pb.data(),
                                        static_cast<std::size_t>(pa.size()) * sizeof(float)) == 0);
}

/// Whether this input also runs at 2 threads: a 2-thread region costs a thread hand-off, which
/// on a loaded machine dominates a tiny input, so only about one input in four (decided by the
/// input's bytes, hence reproducible) pays for it.
inline bool use_two_threads(const std::uint8_t* data, std::size_t size) {
  return size > 0 && (data[size - 1] & 3u) == 0;
}

/// Routes `x` with `gate` at 1 thread into `plan` and, when `two_threads`, again at 2 threads
/// into a fresh plan, and checks that both throw or both give bit-identical plans. Returns
/// false (and `plan` is unspecified) when routing threw a `moet::Error`; any other exception
/// escapes and is a finding.
template <class Gate>
bool route_both(const Gate& gate, const moet::ConstRows<float>& x, const moet::RouteContext& ctx,
                moet::Routing<float>& plan, bool two_threads) {
  bool threw_serial = false;
  moet::set_num_threads(1);
  try {
    gate.route(x, ctx, plan);
  } catch (const moet::Error&) {
    threw_serial = true;
  }
  if (two_threads) {
    moet::Routing<float> parallel;
    bool threw_parallel = false;
    moet::set_num_threads(2);
    try {
      gate.route(x, ctx, parallel);
    } catch (const moet::Error&) {
      threw_parallel = true;
    }
    moet::set_num_threads(1);
    MOET_FUZZ_CHECK(threw_serial == threw_parallel, "1 thread %s but 2 threads %s",
                    threw_serial ? "threw" : "routed", threw_parallel ? "threw" : "routed");
    if (!threw_serial) {
      MOET_FUZZ_CHECK(same_plan(parallel, plan), "plans differ between 1 and 2 threads");
    }
  }
  return !threw_serial;
}

/// Routes `x` once more into a plan that persists across fuzz inputs (so it holds whatever
/// the previous input left: other shapes, other gates) and checks that the result equals
/// `want` bit for bit: a reused `Routing` must not leak state between calls.
template <class Gate>
void check_reuse(const Gate& gate, const moet::ConstRows<float>& x, const moet::RouteContext& ctx,
                 const moet::Routing<float>& want) {
  static moet::Routing<float> reused;
  gate.route(x, ctx, reused);
  MOET_FUZZ_CHECK(same_plan(reused, want), "a reused plan differs from a fresh one");
}

/// The descending order of `values[0..n)` with ties to the lower id (the gates' rule), as an
/// independent stable sort.
inline std::vector<std::int32_t> descending_order(const float* values, Index n) {
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  for (Index e = 0; e < n; ++e) order[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
  std::stable_sort(order.begin(), order.end(),
                   [values](std::int32_t a, std::int32_t b) { return values[a] > values[b]; });
  return order;
}

/// `v` as moet's parallel tasks read and write it: a subnormal is 0 (of its sign) while
/// `moet::flush_denormals()` is on (x86 only: flush-to-zero and denormals-are-zero in every
/// task, docs/algorithms.md §10.5). A check that redoes a gate's float arithmetic outside those
/// tasks flushes each operand and result with it to get the gate's bits.
inline float flushed(float v) {
#if defined(__SSE__) || defined(__x86_64__)
  if (moet::flush_denormals() && v != 0.0f && std::abs(v) < std::numeric_limits<float>::min()) {
    return std::copysign(0.0f, v);
  }
#endif
  return v;
}

/// Checks a gate's router logits `z` `(T, n)` against `x` `(T, d)` times `w` `(d, n)` in double
/// (subnormal operands read as 0 when flushing): each within `1e-5` of the sum of `|x_i w_i|`,
/// plus a few `FLT_MIN` for flushed products.
template <class X, class W, class Z>
void check_logits(const X& x, const W& w, const Z& z) {
  MOET_FUZZ_CHECK(z.rows() == x.rows() && z.cols() == w.cols() && x.cols() == w.rows(),
                  "logits shape");
  const double tiny = static_cast<double>(std::numeric_limits<float>::min()) *
                      static_cast<double>(2 * (x.cols() + 1));
  for (Index t = 0; t < z.rows(); ++t) {
    for (Index e = 0; e < z.cols(); ++e) {
      double ref = 0.0;
      double mag = 0.0;
      for (Index i = 0; i < x.cols(); ++i) {
        const double term =
            static_cast<double>(flushed(x(t, i))) * static_cast<double>(flushed(w(i, e)));
        ref += term;
        mag += std::abs(term);
      }
      const double got = static_cast<double>(z(t, e));
      MOET_FUZZ_CHECK(std::isfinite(got) && std::abs(got - ref) <= 1e-5 * mag + tiny,
                      "logit (%ld, %ld) = %g, x W in double %g", static_cast<long>(t),
                      static_cast<long>(e), got, ref);
    }
  }
}

/// Checks that every row of `p` `(T, n)` is the softmax of the same row of `z` computed in
/// double (max-subtracted), within `1e-5` plus `n FLT_EPSILON` (the float sum of `n`
/// exponentials) plus `4 FLT_EPSILON max |z|` (the float softmax rounds `z_e - max z`, an
/// absolute error that grows with the logits).
template <class Z, class P>
void check_softmax(const Z& z, const P& p) {
  MOET_FUZZ_CHECK(p.rows() == z.rows() && p.cols() == z.cols(), "probabilities shape");
  std::vector<double> ex(static_cast<std::size_t>(z.cols()));
  for (Index t = 0; t < z.rows(); ++t) {
    double top = -std::numeric_limits<double>::infinity();
    double largest = 0.0;
    for (Index e = 0; e < z.cols(); ++e) {
      top = std::max(top, static_cast<double>(z(t, e)));
      largest = std::max(largest, std::abs(static_cast<double>(z(t, e))));
    }
    const auto eps = static_cast<double>(std::numeric_limits<float>::epsilon());
    const double tolerance = 1e-5 + static_cast<double>(z.cols()) * eps + 4.0 * eps * largest;
    double sum = 0.0;
    for (Index e = 0; e < z.cols(); ++e) {
      ex[static_cast<std::size_t>(e)] = std::exp(static_cast<double>(z(t, e)) - top);
      sum += ex[static_cast<std::size_t>(e)];
    }
    for (Index e = 0; e < z.cols(); ++e) {
      const double want = ex[static_cast<std::size_t>(e)] / sum;
      MOET_FUZZ_CHECK(std::abs(static_cast<double>(p(t, e)) - want) <= tolerance,
                      "P(%ld, %ld) = %g, softmax in double %g", static_cast<long>(t),
                      static_cast<long>(e), static_cast<double>(p(t, e)), want);
    }
  }
}

}  // namespace moet_fuzz

/// libFuzzer's start-up hook (one per target: each includes this header once). OpenMP threads
/// that spin after a region would starve the next input's thread on a loaded machine, so idle
/// workers sleep (unless the caller chose a policy).
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  setenv("OMP_WAIT_POLICY", "passive", 0);
  return 0;
}
