// After a warm-up step, MoELayer training (zero_grad, forward_train, backward) runs without
// touching the heap, like the inference path (harness as in test_no_alloc.cpp). Eigen's own
// allocations are caught by EIGEN_RUNTIME_NO_MALLOC (its assertion is redirected to a counter,
// since it is compiled out under NDEBUG), everything else (std::vector growth, Buffer growth) by
// counting calls to a replaced global operator new while a flag is set. The flag is cleared before
// any Catch2 assertion, which allocates itself.

// The replaced operator new/delete below pair malloc with free by design; GCC cannot see that
// through inlining and warns.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

// Both must come before any include that could pull in Eigen.
#define EIGEN_RUNTIME_NO_MALLOC
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace no_alloc {
inline std::atomic<bool> counting{false};
inline std::atomic<long> new_calls{0};
inline std::atomic<long> eigen_violations{0};
inline void eigen_assert_failed() { eigen_violations.fetch_add(1); }
}  // namespace no_alloc

#define eigen_assert(x) ((x) ? static_cast<void>(0) : ::no_alloc::eigen_assert_failed())
#include <cstdint>
#include <random>
#include <utility>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/layer.hpp"
// Replaced global allocation functions: count while `counting` is set.
void* operator new(std::size_t size) {
  if (no_alloc::counting.load(std::memory_order_relaxed)) no_alloc::new_calls.fetch_add(1);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, std::align_val_t align) {
  if (no_alloc::counting.load(std::memory_order_relaxed)) no_alloc::new_calls.fetch_add(1);
  const auto a = static_cast<std::size_t>(align);
  const std::size_t rounded = (size + a - 1) / a * a;
  if (void* p = std::aligned_alloc(a, rounded == 0 ? a : rounded)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t align) {
  return ::operator new(size, align);
}
// The nothrow forms too, so that every allocation the program frees came from malloc
// (Catch2 uses them; AddressSanitizer reports a mismatch otherwise).
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return ::operator new(size, std::nothrow);
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(size, align);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return ::operator new(size, align, std::nothrow);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using moet::Index;

// Opens a no-allocation window; `close()` ends it and returns what was counted.
struct Window {
  struct Counts {
    long new_calls = 0;
    long eigen_violations = 0;
  };
  void open() {
    no_alloc::new_calls = 0;
    no_alloc::eigen_violations = 0;
    Eigen::internal::set_is_malloc_allowed(false);
    no_alloc::counting = true;
  }
  Counts close() {
    no_alloc::counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
    return {no_alloc::new_calls.load(), no_alloc::eigen_violations.load()};
  }
};

template <class S>
moet::RowMatrix<S> random_rows(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  moet::RowMatrix<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(normal(gen));
  return m;
}

// Warm-up step, then three steps (zero_grad, forward_train, backward) in a no-allocation
// window. Small shapes: Eigen's product stays within its stack buffers.
template <class Layer>
void check_training_does_not_allocate(Layer layer, const moet::RouteContext& ctx) {
  const Index d = layer.model_dim();
  const auto x = random_rows<float>(48, d, 5u);
  const auto dy = random_rows<float>(48, d, 6u);
  moet::RowMatrix<float> y(48, d), dx(48, d);
  typename Layer::Workspace ws;
  layer.zero_grad();
  layer.forward_train(x, y, ctx, ws);
  layer.backward(x, dy, ctx, ws, dx);
  Window window;
  window.open();
  for (int repeat = 0; repeat < 3; ++repeat) {
    layer.zero_grad();
    layer.forward_train(x, y, ctx, ws);
    layer.backward(x, dy, ctx, ws, dx);
  }
  const auto counts = window.close();
  CHECK(counts.new_calls == 0);
  CHECK(counts.eigen_violations == 0);
}

}  // namespace

TEST_CASE("A warmed-up training step does not allocate: top-2, SwiGLU, shared experts",
          "[no_alloc][train]") {
  using Experts = moet::SwiGluExperts<float>;
  check_training_does_not_allocate(
      moet::MoELayer(moet::TopKGate<float>(moet::TopKGate<float>::mixtral_options(16, 6)),
                     Experts({.model_dim = 16, .hidden_dim = 24, .num_experts = 6}),
                     Experts({.model_dim = 16, .hidden_dim = 8, .num_experts = 1}),
                     moet::GroupedDispatch({.block_rows = 16})),
      {});
}

TEST_CASE("A warmed-up training step does not allocate: THOR, FFN experts", "[no_alloc][train]") {
  moet::RouteContext ctx;
  ctx.training = true;
  check_training_does_not_allocate(
      moet::MoELayer(
          moet::StochasticGate<float>({.model_dim = 16, .num_experts = 3}),
          moet::GeluFfnExperts<float>({.model_dim = 16, .hidden_dim = 24, .num_experts = 3})),
      ctx);
}
