#pragma once
/// \file bench/bench_common.hpp
/// Shared pieces of the Google Benchmark suites bench_gates, bench_dispatch and bench_layer and of
/// moet-compare: the shapes, seeded inputs, one gate factory per gate type (the defaults of
/// moet-compare), cached expert banks, and the OpenBLAS per-expert ceiling. Not part of the
/// library.
///
/// Shape selection: the environment variable `MOET_BENCH_SHAPE` (`S1`, `S2`, `S3` or `tiny`,
/// default per suite) picks the shape, so that ctest can smoke-run the suites on `tiny`.

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "moet/detail/parallel.hpp"
#include <moet/moet.hpp>

#if defined(MOET_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace moet::bench {

/// An MoE shape (SwiGLU experts).
struct Shape {
  std::string name;
  Index d = 0;  // model_dim
  Index f = 0;  // hidden_dim
  Index e = 0;  // num_experts
};

/// The shape named by `MOET_BENCH_SHAPE`, or `fallback` when unset.
inline Shape bench_shape(const char* fallback) {
  const char* env = std::getenv("MOET_BENCH_SHAPE");
  const std::string name = env != nullptr && *env != '\0' ? env : fallback;
  if (name == "S1") return {"S1", 512, 1024, 8};
  if (name == "S2") return {"S2", 1024, 3584, 8};
  if (name == "S3") return {"S3", 1024, 512, 64};
  return {"tiny", 32, 64, 4};
}

/// Standard normal `(rows, cols)` tokens from `seed`.
inline RowMatrix<float> random_tokens(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  RowMatrix<float> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
  return x;
}

/// Log-normal per-token importance (for `ImportanceGate`).
inline std::vector<float> random_importance(Index rows, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::lognormal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(rows));
  for (auto& x : v) x = dist(gen);
  return v;
}

/// Gate factories with moet-compare's default parameters.
template <class G>
G make_gate(const Shape& s);
template <>
inline TopKGate<float> make_gate(const Shape& s) {
  return TopKGate<float>(
      {.model_dim = s.d, .num_experts = s.e, .k = 2, .renormalize = true, .init_seed = 43});
}
template <>
inline TopPGate<float> make_gate(const Shape& s) {
  return TopPGate<float>({.model_dim = s.d, .num_experts = s.e, .p = 0.4, .init_seed = 43});
}
template <>
inline TopAnyGate<float> make_gate(const Shape& s) {
  return TopAnyGate<float>({.model_dim = s.d, .num_experts = s.e, .init_seed = 43});
}
template <>
inline ImportanceGate<float> make_gate(const Shape& s) {
  return ImportanceGate<float>(
      {.model_dim = s.d, .num_experts = s.e, .k_max = std::min<Index>(4, s.e), .init_seed = 43});
}
template <>
inline StochasticGate<float> make_gate(const Shape& s) {
  return StochasticGate<float>({.model_dim = s.d, .num_experts = s.e});
}

/// One SwiGLU bank per shape, built once per process (S2 holds 350 MB of weights plus the
/// packed copy).
inline const SwiGluExperts<float>& cached_bank(const Shape& s) {
  static std::map<std::string, std::unique_ptr<SwiGluExperts<float>>> banks;
  auto& slot = banks[s.name];
  if (!slot) {
    slot = std::make_unique<SwiGluExperts<float>>(SwiGluExperts<float>::Options{
        .model_dim = s.d, .hidden_dim = s.f, .num_experts = s.e, .init_seed = 42});
  }
  return *slot;
}

/// The same bank, mutable, for suites that move it into a layer and back (`MoELayer` owns its
/// experts; moving costs nothing, copying S2 would cost 700 MB).
inline SwiGluExperts<float>& shared_bank(const Shape& s) {
  return const_cast<SwiGluExperts<float>&>(cached_bank(s));  // NOLINT: built non-const above
}

/// The OpenBLAS ceiling of moet-compare: `rows` rows split equally over the experts, three
/// single-threaded sgemm per expert (gate, up, down), experts in parallel. Returns false when
/// built without OpenBLAS.
class Ceiling {
 public:
  Ceiling(const SwiGluExperts<float>& bank, Index rows)
      : bank_(bank),
        x_(random_tokens(rows, bank.model_dim(), 5)),
        g_(rows, bank.hidden_dim()),
        u_(rows, bank.hidden_dim()),
        y_(rows, bank.model_dim()) {
    const Index num = bank.num_experts();
    first_.assign(static_cast<std::size_t>(num + 1), 0);
    for (Index e = 0; e < num; ++e) {
      first_[static_cast<std::size_t>(e + 1)] =
          first_[static_cast<std::size_t>(e)] + rows / num + (e < rows % num ? 1 : 0);
      if (first_[static_cast<std::size_t>(e + 1)] > first_[static_cast<std::size_t>(e)]) {
        busy_.push_back(e);
      }
    }
  }
  static constexpr bool available() {
#if defined(MOET_BENCH_OPENBLAS)
    return true;
#else
    return false;
#endif
  }
  void run() {
#if defined(MOET_BENCH_OPENBLAS)
    openblas_set_num_threads(1);
    const int d = static_cast<int>(bank_.model_dim()), f = static_cast<int>(bank_.hidden_dim());
    detail::parallel_for(static_cast<Index>(busy_.size()), [&](Index i) {
      const Index e = busy_[static_cast<std::size_t>(i)];
      const Index r0 = first_[static_cast<std::size_t>(e)];
      const auto n = static_cast<int>(first_[static_cast<std::size_t>(e + 1)] - r0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, f, d, 1.0f, x_.row(r0).data(), d,
                  bank_.gate_weights(e).data(), f, 0.0f, g_.row(r0).data(), f);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, f, d, 1.0f, x_.row(r0).data(), d,
                  bank_.up_weights(e).data(), f, 0.0f, u_.row(r0).data(), f);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, f, 1.0f, g_.row(r0).data(), f,
                  bank_.down_weights(e).data(), d, 0.0f, y_.row(r0).data(), d);
    });
#endif
  }

 private:
  const SwiGluExperts<float>& bank_;
  RowMatrix<float> x_, g_, u_, y_;
  std::vector<Index> first_;
  std::vector<Index> busy_;
};

}  // namespace moet::bench
