// zero_grad writes nothing (detail/grad_stacks.hpp): an expert's first backward since then
// writes its gradients, readers write the zeros of experts that got no rows. The oracle is a
// bank with the same weights whose gradients were really zero (freshly allocated) and which
// adds to them: every gradient must have the same bits, for packed f32, bf16 copies, Eigen
// (pack_weights = false) and an FFN bank with biases, including experts with no rows, an
// empty backward, and two backwards of one expert.
#include <cstdint>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"

#include "random_rows.hpp"

namespace test_lazy_grads {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using moet::RowMatrix;
using moet_test::random_rows;

template <class Bank>
std::vector<std::vector<float>> all_grads(Bank& bank) {
  std::vector<std::vector<float>> out;
  bank.visit_parameters(
      [&](std::string_view, moet::ParamMap<float> /*value*/, moet::ParamMap<float> grad) {
        out.emplace_back(grad.data(), grad.data() + grad.size());
      });
  return out;
}

// One backward of expert `e` on `rows` rows drawn from `seed`.
template <class Bank>
void backward_rows(Bank& bank, Index e, Index rows, std::uint32_t seed) {
  const Index d = bank.model_dim();
  const auto x = random_rows(rows, d, seed);
  const auto dy = random_rows(rows, d, seed + 1000u);
  RowMatrix<float> y(rows, d), dx(rows, d), cache(rows, bank.cache_width());
  typename Bank::Scratch scratch;
  bank.forward_train(e, x, y, cache, scratch);
  bank.backward(e, x, cache, dy, dx, scratch);
}

bool same_bits(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t t = 0; t < a.size(); ++t) {
    if (a[t].size() != b[t].size()) return false;
    if (std::memcmp(a[t].data(), b[t].data(), a[t].size() * sizeof(float)) != 0) return false;
  }
  return true;
}

template <class Bank>
void check_lazy_zero(const typename Bank::Options& options) {
  Bank lazy(options);
  Bank fresh(options);  // same seed: same weights
  const Index n = options.num_experts;
  // Non-zero gradients everywhere, then zero_grad: nothing written yet.
  for (Index e = 0; e < n; ++e) backward_rows(lazy, e, 9, 50u + static_cast<std::uint32_t>(e));
  lazy.zero_grad();

  // Expert 0: two backwards (the second adds); expert 1: an empty one, then 40 rows (more than
  // one block of some kernels); expert 2: an empty backward only; the rest: nothing.
  const auto run = [&](Bank& bank) {
    backward_rows(bank, 0, 5, 1u);
    backward_rows(bank, 0, 17, 2u);
    backward_rows(bank, 1, 0, 3u);
    backward_rows(bank, 1, 40, 4u);
    if (n > 2) backward_rows(bank, 2, 0, 5u);
  };
  fresh.ensure_grad();  // really zero
  run(fresh);
  run(lazy);
  const auto expected = all_grads(fresh);
  const auto got = all_grads(lazy);
  CHECK(same_bits(expected, got));
  // The oracle itself: experts 2.. of the fresh bank are zero, expert 0's are not.
  for (const auto& g : expected) {
    const std::size_t per_expert = g.size() / static_cast<std::size_t>(n);
    bool zero_tail = true;
    for (std::size_t i = 2 * per_expert; i < g.size(); ++i) zero_tail = zero_tail && g[i] == 0.0f;
    CHECK(zero_tail);
    bool any = false;
    for (std::size_t i = 0; i < per_expert; ++i) any = any || g[i] != 0.0f;
    CHECK(any);
  }

  // A second zero_grad, read through grad() (const) before any backward: all zero.
  lazy.zero_grad();
  for (const auto& g : all_grads(lazy)) {
    bool zero = true;
    for (const float v : g) zero = zero && v == 0.0f;
    CHECK(zero);
  }
}

}  // namespace

TEST_CASE("lazy zero_grad: SwiGLU banks give the bits of adding to zeros", "[lazy_grads]") {
  using Bank = moet::SwiGluExperts<float>;
  Bank::Options o{.model_dim = 24, .hidden_dim = 40, .num_experts = 4, .init_seed = 7};
  SECTION("packed f32") { check_lazy_zero<Bank>(o); }
  SECTION("bf16 copies") {
    o.weight_format = moet::WeightFormat::kBf16;
    check_lazy_zero<Bank>(o);
  }
  SECTION("Eigen (pack_weights = false)") {
    o.pack_weights = false;
    check_lazy_zero<Bank>(o);
  }
}

TEST_CASE("lazy zero_grad: FFN banks with biases", "[lazy_grads]") {
  using Bank = moet::FfnExperts<float>;
  Bank::Options o{
      .model_dim = 24, .hidden_dim = 40, .num_experts = 3, .bias = true, .init_seed = 8};
  SECTION("packed f32") { check_lazy_zero<Bank>(o); }
  SECTION("Eigen (pack_weights = false)") {
    o.pack_weights = false;
    check_lazy_zero<Bank>(o);
  }
}

TEST_CASE("lazy zero_grad: grad() reads zeros of experts without rows", "[lazy_grads]") {
  using Bank = moet::SwiGluExperts<float>;
  Bank bank({.model_dim = 16, .hidden_dim = 24, .num_experts = 3, .init_seed = 9});
  for (Index e = 0; e < 3; ++e) backward_rows(bank, e, 6, 70u + static_cast<std::uint32_t>(e));
  bank.zero_grad();
  backward_rows(bank, 1, 6, 80u);
  const Bank& cbank = bank;
  const RowMatrix<float>& g = cbank.gate_grad();  // (3 * 16, 24)
  CHECK(g.topRows(16).isZero(0.0f));
  CHECK(!g.middleRows(16, 16).isZero(0.0f));
  CHECK(g.bottomRows(16).isZero(0.0f));
  CHECK(cbank.down_grad().bottomRows(24).isZero(0.0f));
}

}  // namespace test_lazy_grads
