// bench_kernels: moet's packed GEMM and fused SwiGLU kernels (detail/gemm.hpp) against Eigen's
// product and single-threaded OpenBLAS sgemm, on one core, at the expert shapes
//   S1 (d = 512, f = 1024), S2 (d = 1024, f = 3584), S3 (d = 1024, f = 512)
// for n = 1, 8, 32, 128, 512 rows (tokens routed to one expert).
//
// Operations (name prefix):
//   up      (n, d) x (d, f)                     moet: gemm_packed
//   down    (n, f) x (f, d)                     moet: gemm_packed
//   swiglu  silu(x Wg) * (x Wu), (n, f)         moet: glu_packed<Silu> (one fused pass)
//   expert  swiglu then x (f, d): a whole expert moet: glu_packed + gemm_packed
// Implementations: moet; moet_bf16 (the same kernels on bf16 weights, WeightFormat::kBf16:
// AVX512-BF16 dot products where compiled for, portable loops otherwise); eigen (what
// GluExperts::forward does today: Eigen products and the scalar Silu::apply); openblas
// (cblas_sgemm, epilogue with moet's vectorised SiLU).
//
// Counters: GFLOP/s (2 n K N per product; the O(n f) activation is not counted) and wGB/s, the
// weight bytes read per second (2 per weight for moet_bf16, 4 otherwise; the bound for few rows,
// where each expert's weights stream from memory once). Every iteration moves to the next of
// several copies of the expert so that the weights the timed loop cycles through exceed the L3
// cache, like an MoE layer cycling through its experts: few-row results measure DRAM streaming, not
// L3.
//
// Run:  env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 ./bench_kernels
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <benchmark/benchmark.h>

#if defined(MOET_BENCH_OPENBLAS)
#include <cblas.h>
#endif

#include "moet/activations.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/tensor.hpp"

#include "openblas_core.hpp"

namespace {

using moet::Index;
using Matrix = moet::RowMatrix<float>;

struct Shape {
  const char* name;
  Index d;  // model_dim
  Index f;  // hidden_dim
};
constexpr Shape kShapes[] = {{"S1", 512, 1024}, {"S2", 1024, 3584}, {"S3", 1024, 512}};
constexpr Index kRows[] = {1, 8, 32, 128, 512};

// Bytes of raw weights the timed loop cycles through (at least): 4x a 32 MiB L3.
constexpr double kWorkingSetBytes = 128.0 * 1024 * 1024;

// Deterministic uniform [-1, 1) fill (fast: the S2 sets hold ~10^8 floats).
void fill(Matrix& m, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  float* p = m.data();
  for (Index i = 0; i < m.size(); ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = static_cast<float>(static_cast<std::int64_t>(s >> 40) - (1LL << 23)) * 0x1p-23f;
  }
}

// The weights of `copies` experts of one shape, raw and packed.
struct ExpertSet {
  Shape shape{};
  Index copies = 0;
  std::vector<Matrix> gate, up, down;                       // (d, f), (d, f), (f, d)
  std::vector<moet::detail::PackedMatrix<float>> gate_p;    // Wg packed alone (the `up` op)
  std::vector<moet::detail::PackedGluMatrix<float>> glu_p;  // Wg and Wu interleaved
  std::vector<moet::detail::PackedMatrix<float>> down_p;    // Wd packed
  // The same three, as bf16.
  std::vector<moet::detail::PackedMatrix<moet::detail::Bf16>> gate_b;
  std::vector<moet::detail::PackedGluMatrix<moet::detail::Bf16>> glu_b;
  std::vector<moet::detail::PackedMatrix<moet::detail::Bf16>> down_b;
};

const ExpertSet& expert_set(int shape_id) {
  static std::unique_ptr<ExpertSet> cached;
  static int cached_id = -1;
  if (cached_id == shape_id) return *cached;
  cached.reset();
  auto set = std::make_unique<ExpertSet>();
  const Shape s = kShapes[shape_id];
  set->shape = s;
  const double bytes_per_expert = 3.0 * static_cast<double>(s.d * s.f) * sizeof(float);
  set->copies = std::max<Index>(1, static_cast<Index>(kWorkingSetBytes / bytes_per_expert + 0.999));
  for (Index e = 0; e < set->copies; ++e) {
    const auto seed =
        static_cast<std::uint64_t>(shape_id) * 1000 + static_cast<std::uint64_t>(e) * 3;
    set->gate.emplace_back(s.d, s.f);
    set->up.emplace_back(s.d, s.f);
    set->down.emplace_back(s.f, s.d);
    fill(set->gate.back(), seed);
    fill(set->up.back(), seed + 1);
    fill(set->down.back(), seed + 2);
    set->gate_p.emplace_back(set->gate.back());
    set->glu_p.emplace_back(set->gate.back(), set->up.back());
    set->down_p.emplace_back(set->down.back());
    set->gate_b.emplace_back(set->gate.back());
    set->glu_b.emplace_back(set->gate.back(), set->up.back());
    set->down_b.emplace_back(set->down.back());
  }
  cached = std::move(set);
  cached_id = shape_id;
  return *cached;
}

enum class Op { kUp, kDown, kSwiglu, kExpert };
enum class Impl { kMoet, kMoetBf16, kEigen, kOpenblas };

const char* op_name(Op op) {
  switch (op) {
    case Op::kUp:
      return "up";
    case Op::kDown:
      return "down";
    case Op::kSwiglu:
      return "swiglu";
    case Op::kExpert:
      return "expert";
  }
  return "?";
}
const char* impl_name(Impl impl) {
  switch (impl) {
    case Impl::kMoet:
      return "moet";
    case Impl::kMoetBf16:
      return "moet_bf16";
    case Impl::kEigen:
      return "eigen";
    case Impl::kOpenblas:
      return "openblas";
  }
  return "?";
}

#if defined(MOET_BENCH_OPENBLAS)
// c (n, cols) = a (n, inner) b (inner, cols), all row-major and contiguous.
void sgemm(const Matrix& a, const Matrix& b, Matrix& c) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(a.rows()),
              static_cast<blasint>(b.cols()), static_cast<blasint>(a.cols()), 1.0f, a.data(),
              static_cast<blasint>(a.cols()), b.data(), static_cast<blasint>(b.cols()), 0.0f,
              c.data(), static_cast<blasint>(c.cols()));
}
#endif

// g = silu(g) * u with moet's vectorised SiLU (the OpenBLAS epilogue).
void swiglu_epilogue(Matrix& g, const Matrix& u) {
  moet::detail::silu_array(g.data(), g.data(), g.size());
  g.array() *= u.array();
}

void run_benchmark(benchmark::State& state, Op op, Impl impl, int shape_id, Index n) {
  const ExpertSet& set = expert_set(shape_id);
  const Index d = set.shape.d;
  const Index f = set.shape.f;
  const bool down_only = op == Op::kDown;
  Matrix x(n, down_only ? f : d);
  fill(x, 77);
  Matrix g(n, f);
  Matrix u(n, f);
  Matrix y(n, d);
  moet::detail::Buffer<float> scratch;
  moet::detail::reserve_packed_scratch(scratch, n, std::max(d, f));

  const auto run = [&](Index e) {
    const auto ue = static_cast<std::size_t>(e);
    switch (impl) {
      case Impl::kMoet:
        switch (op) {
          case Op::kUp:
            moet::detail::gemm_packed(x, set.gate_p[ue], g, false, scratch);
            break;
          case Op::kDown:
            moet::detail::gemm_packed(x, set.down_p[ue], y, false, scratch);
            break;
          case Op::kSwiglu:
            moet::detail::glu_packed(x, set.glu_p[ue], g, scratch);
            break;
          case Op::kExpert:
            moet::detail::glu_packed(x, set.glu_p[ue], g, scratch);
            moet::detail::gemm_packed(g, set.down_p[ue], y, false, scratch);
            break;
        }
        break;
      case Impl::kMoetBf16:
        switch (op) {
          case Op::kUp:
            moet::detail::gemm_packed(x, set.gate_b[ue], g, false, scratch);
            break;
          case Op::kDown:
            moet::detail::gemm_packed(x, set.down_b[ue], y, false, scratch);
            break;
          case Op::kSwiglu:
            moet::detail::glu_packed(x, set.glu_b[ue], g, scratch);
            break;
          case Op::kExpert:
            moet::detail::glu_packed(x, set.glu_b[ue], g, scratch);
            moet::detail::gemm_packed(g, set.down_b[ue], y, false, scratch);
            break;
        }
        break;
      case Impl::kEigen:
        switch (op) {
          case Op::kUp:
            g.noalias() = x * set.gate[ue];
            break;
          case Op::kDown:
            y.noalias() = x * set.down[ue];
            break;
          case Op::kSwiglu:
          case Op::kExpert:
            g.noalias() = x * set.gate[ue];
            u.noalias() = x * set.up[ue];
            moet::apply_activation<moet::Silu>(g);
            g.array() *= u.array();
            if (op == Op::kExpert) y.noalias() = g * set.down[ue];
            break;
        }
        break;
      case Impl::kOpenblas:
#if defined(MOET_BENCH_OPENBLAS)
        switch (op) {
          case Op::kUp:
            sgemm(x, set.gate[ue], g);
            break;
          case Op::kDown:
            sgemm(x, set.down[ue], y);
            break;
          case Op::kSwiglu:
          case Op::kExpert:
            sgemm(x, set.gate[ue], g);
            sgemm(x, set.up[ue], u);
            swiglu_epilogue(g, u);
            if (op == Op::kExpert) sgemm(g, set.down[ue], y);
            break;
        }
#endif
        break;
    }
  };

  run(0);  // warm-up: grows scratch, faults pages in
  Index e = 0;
  for (auto _ : state) {  // NOLINT(clang-analyzer-deadcode.DeadStores)
    run(e);
    benchmark::ClobberMemory();
    e = e + 1 == set.copies ? 0 : e + 1;
  }
  benchmark::DoNotOptimize(y.data());
  benchmark::DoNotOptimize(g.data());

  const double products = op == Op::kUp || op == Op::kDown ? 1.0 : op == Op::kSwiglu ? 2.0 : 3.0;
  const double flops = 2.0 * static_cast<double>(n * d * f) * products;
  const double bytes_per_weight = impl == Impl::kMoetBf16 ? 2.0 : 4.0;
  const double weight_bytes = static_cast<double>(d * f) * bytes_per_weight * products;
  const auto iters = static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(flops * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["wGB/s"] =
      benchmark::Counter(weight_bytes * iters / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(impl == Impl::kMoet || impl == Impl::kMoetBf16
                     ? moet::kernel_isa_name(moet::kernel_isa())
                     : "");
}

}  // namespace

int main(int argc, char** argv) {
  moet::bench::choose_openblas_core(argv);
  Eigen::setNbThreads(1);
#if defined(MOET_BENCH_OPENBLAS)
  openblas_set_num_threads(1);
  const Impl impls[] = {Impl::kMoet, Impl::kMoetBf16, Impl::kEigen, Impl::kOpenblas};
#else
  const Impl impls[] = {Impl::kMoet, Impl::kMoetBf16, Impl::kEigen};
#endif
  for (int s = 0; s < 3; ++s) {
    for (const Op op : {Op::kUp, Op::kDown, Op::kSwiglu, Op::kExpert}) {
      for (const Index n : kRows) {
        for (const Impl impl : impls) {
          const std::string name = std::string(op_name(op)) + "/" + impl_name(impl) + "/" +
                                   kShapes[s].name + "/n:" + std::to_string(n);
          benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
            run_benchmark(state, op, impl, s, n);
          })->Unit(benchmark::kMicrosecond);
        }
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("moet_kernels", moet::kernel_isa_name(moet::kernel_isa()));
  benchmark::AddCustomContext("openblas_kernels", moet::bench::openblas_core());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
