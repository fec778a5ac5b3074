// bf16 packed weights (detail/bf16.hpp, detail/gemm.hpp with W = Bf16): the rounding against
// an independent round-to-8-bits oracle, packing, gemm_packed and glu_packed against double
// products of the bf16-rounded operands (gemm_packed_at and pack_transposed too: the backward of a
// bf16 bank), row independence (bit-identical rows), accumulate
// mode and odd depths; then the expert banks with `WeightFormat::kBf16` against float banks
// (the accuracy the README quotes) and their option checks.
#include <bit>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/tensor.hpp"

#include "gemm_test_util.hpp"

namespace test_gemm_bf16 {  // one per file: the unity build puts several files in one TU

namespace {

using namespace moet_test;  // NOLINT(google-build-using-namespace)
using moet::detail::Bf16;

// Independent oracle: `v` rounded to 8 significant bits, ties to even, through frexp/ldexp in
// double (the default rounding mode of nearbyint is to nearest, ties to even).
double round8(double v) {
  if (v == 0.0 || !std::isfinite(v)) return v;
  int e = 0;
  const double frac = std::frexp(v, &e);  // |frac| in [0.5, 1)
  return std::ldexp(std::nearbyint(std::ldexp(frac, 8)), e - 8);
}

Matrix rounded(const Matrix& m) {
  Matrix r(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i) {
    for (Index j = 0; j < m.cols(); ++j) r(i, j) = static_cast<float>(round8(m(i, j)));
  }
  return r;
}

const std::vector<Index> kRows = {1, 2, 3, 5, 7, 8, 9, 13, 64, 150, 300};
const std::vector<Index> kInner = {1, 2, 3, 17, 256, 257, 520};
const std::vector<Index> kCols = {1, 15, 16, 31, 32, 33, 100};

}  // namespace

TEST_CASE("to_bf16 rounds to nearest even and keeps NaN and infinities", "[bf16]") {
  using moet::detail::from_bf16;
  using moet::detail::to_bf16;
  CHECK(to_bf16(1.0f).bits == 0x3f80);
  CHECK(to_bf16(-0.0f).bits == 0x8000);
  CHECK(to_bf16(0.0f).bits == 0x0000);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to the even mantissa (1).
  CHECK(to_bf16(1.0f + 0x1p-8f).bits == 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
  CHECK(to_bf16(1.0f + 3 * 0x1p-8f).bits == 0x3f82);
  // Just above a tie rounds up.
  CHECK(to_bf16(1.0f + 0x1p-8f + 0x1p-20f).bits == 0x3f81);
  CHECK(to_bf16(std::numeric_limits<float>::infinity()).bits == 0x7f80);
  CHECK(to_bf16(-std::numeric_limits<float>::infinity()).bits == 0xff80);
  // The largest float is beyond the largest bf16 (0x7f7f): IEEE rounding gives infinity.
  CHECK(to_bf16(std::numeric_limits<float>::max()).bits == 0x7f80);
  CHECK(std::isnan(from_bf16(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low 16 bits must not truncate to infinity.
  CHECK(std::isnan(from_bf16(to_bf16(std::bit_cast<float>(0x7f800001U)))));
  // Against the oracle on many values of every magnitude.
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> expo(-120, 120);
  for (int i = 0; i < 20000; ++i) {
    const float v = std::ldexp(mant(gen), expo(gen));
    INFO(v);
    REQUIRE(static_cast<double>(moet::detail::round_to_bf16(v)) == round8(v));
  }
}

TEST_CASE("bf16 packing holds the rounded weights, zero padded", "[bf16][gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  for (const Index k : {1, 2, 5, 64}) {
    for (const Index n : {1, 31, 33, 70}) {
      const Matrix b = random_matrix(k, n, static_cast<std::uint32_t>(k * 100 + n));
      const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
      INFO("k " << k << " n " << n);
      REQUIRE(packed.rows() == k);
      REQUIRE(packed.cols() == n);
      REQUIRE(packed.panel_width() == moet::detail::panel_width(isa));
      REQUIRE(packed.panel_stride() == (k + 1) / 2 * 2 * packed.panel_width());
      for (Index i = 0; i < k; ++i) {
        for (Index j = 0; j < n; ++j) {
          REQUIRE(static_cast<double>(packed.packed_coeff(i, j)) == round8(b(i, j)));
        }
      }
      // The pad row of an odd K and the columns past N read as zero.
      const Index padded_cols = packed.num_panels() * packed.panel_width();
      for (Index i = 0; i < (k + 1) / 2 * 2; ++i) {
        for (Index j = (i < k ? n : 0); j < padded_cols; ++j) {
          REQUIRE(packed.packed_coeff(i, j) == 0.0f);
        }
      }
    }
  }
}

TEST_CASE("bf16 packs of 8 MiB or more hold every rounded value and report a NaN",
          "[bf16][gemm][pack]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index nr = moet::detail::panel_width(isa);
  // Whole panels and a partial one, K odd (its last row has no pair): 8.4 MB and more, the size
  // from which float packs stream (bf16 ones keep plain stores, README); each GLU half alike.
  const Index rows = 2049;
  const Index cols = 2048 + nr + 3;
  Matrix w = random_matrix(rows, cols, 79);
  const Matrix u = random_matrix(rows, cols, 80);
  // Values where rounding is delicate, in whole panels and in the partial one: ties
  // (to even, down and up), a value rounding up into the next binade.
  const auto from_bits = [](std::uint32_t b) { return std::bit_cast<float>(b); };
  const std::vector<std::pair<Index, float>> special = {{1, from_bits(0x3f808000U)},
                                                        {2, from_bits(0x3f818000U)},
                                                        {nr + 5, from_bits(0x3fffffffU)},
                                                        {cols - 1, from_bits(0xbf818000U)}};
  for (const auto& [j, v] : special) w(rows - 1, j) = w(rows / 3, j) = v;
  for (const bool with_nan : {false, true}) {
    Matrix wb = w;
    if (with_nan) wb(rows / 2, nr + 1) = std::numeric_limits<float>::quiet_NaN();
    INFO("NaN " << with_nan);
    // Both packs, the transposing one's bytes and every value against the oracle (a NaN stays
    // a NaN), the GLU halves included.
    const auto same = [](float packed, float v) {
      return std::isnan(v) ? std::isnan(packed) : static_cast<double>(packed) == round8(v);
    };
    CHECK(check_large_pack<Bf16>(wb, u, isa, !with_nan, same) == 0);
  }
}

TEST_CASE("bf16 products of one row over an odd depth are exact (GCC 12 -O3 miscompiled this)",
          "[bf16][gemm]") {
  // [1 1 1] x [1 2 4]^T = 7, exact in bf16 and float; moet 0.1's portable loop gave 8 when GCC
  // 12.2 vectorised it at -O3 (plain Release builds).
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  Matrix b(3, 1);
  b << 1.0f, 2.0f, 4.0f;
  const Matrix a = Matrix::Ones(1, 3);
  const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
  moet::detail::Buffer<float> scratch;
  // A scratch full of non-zero garbage: the result must not depend on what it held.
  std::fill(scratch.data(1000), scratch.data(1000) + 1000, 3.0f);
  Matrix c(1, 1);
  moet::detail::gemm_packed(a, packed, c, false, scratch);
  CHECK(c(0, 0) == 7.0f);
  const moet::detail::PackedGluMatrix<Bf16> glu{moet::ConstRows<float>(b),
                                                moet::ConstRows<float>(b), isa};
  Matrix h(1, 1);
  moet::detail::glu_packed<moet::Relu>(a, glu, h, scratch);
  CHECK(h(0, 0) == 49.0f);  // relu(7) * 7
}

TEST_CASE("bf16 gemm_packed equals the double product of the rounded operands", "[bf16][gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 11;
  for (const Index k : kInner) {
    for (const Index n_cols : kCols) {
      const Matrix b = random_matrix(k, n_cols, seed++);
      const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
      for (const Index n : kRows) {
        const Matrix a = random_matrix(n, k, seed++);
        Matrix c(n, n_cols);
        moet::detail::gemm_packed(a, packed, c, /*accumulate=*/false, scratch);
        // Products of bf16 values are exact in float, so only the float summation differs
        // from the double oracle: within 1e-5 ||a_i|| ||b_j|| as for the float kernels.
        const Matrix ar = rounded(a);
        const Matrix br = rounded(b);
        INFO("n " << n << " k " << k << " cols " << n_cols);
        REQUIRE(scaled_error(c, naive_product(ar, br), ar, br) <= 1e-5);
        // Accumulate mode adds to the old C.
        const Matrix c0 = random_matrix(n, n_cols, seed++);
        Matrix acc = c0;
        moet::detail::gemm_packed(a, packed, acc, /*accumulate=*/true, scratch);
        REQUIRE(accumulate_error_ratio(acc, ar, br, c0) <= 1.0);
      }
    }
  }
}

// The bf16 backward of a bf16 bank: dW = X^T dY with the activations dY packed as bf16 rows
// (`gemm_packed_at`, K = tokens, odd K padded by a zero row) and dX = dY W^T on the weights
// packed transposed as bf16.
TEST_CASE("bf16 gemm_packed_at and pack_transposed equal products of the rounded operands",
          "[bf16][gemm][train]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  check_gemm_packed_at<Bf16>(isa, {1, 2, 7, 64, 301}, 700, rounded);
  // pack_transposed of b^T holds b's rounded values, as pack of b does, whole 8-row blocks of 4
  // lanes (the SSE path) and the rest.
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 800;
  for (const Index k : {1, 2, 7, 64, 301}) {
    for (const Index cols : {3, 33}) {
      INFO("K " << k << " cols " << cols);
      const Matrix b = random_matrix(k, cols, seed++);
      const Matrix br = rounded(b);
      const Matrix bt = b.transpose();
      moet::detail::PackedMatrix<Bf16> from_t;
      CHECK(from_t.pack_transposed(moet::ConstRows<float>(bt), isa));
      REQUIRE(from_t.rows() == k);
      REQUIRE(from_t.cols() == cols);
      for (Index i = 0; i < k; ++i) {
        for (Index j = 0; j < cols; ++j) {
          REQUIRE(from_t.packed_coeff(i, j) == static_cast<float>(br(i, j)));
        }
      }
      const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
      const Matrix a = random_matrix(5, k, seed++);
      Matrix c(5, cols);
      Matrix c2(5, cols);
      moet::detail::gemm_packed(a, from_t, c, false, scratch);
      moet::detail::gemm_packed(a, packed, c2, false, scratch);
      REQUIRE(bit_identical(c, c2));
    }
  }
}

TEST_CASE("bf16 glu_packed equals Act(A Wg) * (A Wu) of the rounded operands", "[bf16][gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 101;
  for (const Index k : {1, 3, 64, 257}) {
    for (const Index f : {1, 16, 17, 48}) {
      const Matrix wg = random_matrix(k, f, seed++);
      const Matrix wu = random_matrix(k, f, seed++);
      const moet::detail::PackedGluMatrix<Bf16> packed{moet::ConstRows<float>(wg),
                                                       moet::ConstRows<float>(wu), isa};
      for (const Index n : {1, 4, 8, 9, 40}) {
        const Matrix a = random_matrix(n, k, seed++);
        Matrix h(n, f);
        moet::detail::glu_packed<moet::Silu>(a, packed, h, scratch);
        INFO("n " << n << " k " << k << " f " << f);
        REQUIRE(glu_error_ratio(h, rounded(a), rounded(wg), rounded(wu), silu_ref) <= 1.0);
        moet::detail::glu_packed<moet::Gelu>(a, packed, h, scratch);
        REQUIRE(glu_error_ratio(h, rounded(a), rounded(wg), rounded(wu), gelu_ref) <= 1.0);
      }
    }
  }
}

TEST_CASE("bf16 rows are bit-identical alone and inside any block", "[bf16][gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  moet::detail::Buffer<float> scratch;
  const Index k = 300;
  const Matrix b = random_matrix(k, 70, 5);
  const Matrix wg = random_matrix(k, 40, 6);
  const Matrix wu = random_matrix(k, 40, 7);
  const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
  const moet::detail::PackedGluMatrix<Bf16> glu{moet::ConstRows<float>(wg),
                                                moet::ConstRows<float>(wu), isa};
  const Matrix a = random_matrix(200, k, 8);
  Matrix c_all(a.rows(), b.cols());
  Matrix h_all(a.rows(), wg.cols());
  moet::detail::gemm_packed(a, packed, c_all, false, scratch);
  moet::detail::glu_packed(a, glu, h_all, scratch);
  for (const Index n : {1, 3, 8, 9, 17, 150}) {
    for (const Index first : {Index{0}, Index{31}}) {
      Matrix c(n, b.cols());
      Matrix h(n, wg.cols());
      moet::detail::gemm_packed(a.middleRows(first, n), packed, c, false, scratch);
      moet::detail::glu_packed(a.middleRows(first, n), glu, h, scratch);
      INFO("rows " << n << " from " << first);
      REQUIRE(bit_identical(c, c_all.middleRows(first, n)));
      REQUIRE(bit_identical(h, h_all.middleRows(first, n)));
    }
  }
}

TEST_CASE("bf16 kernels of every level agree with the portable level to float summation",
          "[bf16][gemm]") {
  moet::detail::Buffer<float> scratch;
  const Matrix b = random_matrix(520, 100, 21);
  const moet::detail::PackedMatrix<Bf16> portable_b{moet::ConstRows<float>(b),
                                                    KernelIsa::kPortable};
  const Matrix ar_b = rounded(b);
  for (const KernelIsa isa : supported_isas()) {
    const moet::detail::PackedMatrix<Bf16> packed{moet::ConstRows<float>(b), isa};
    for (const Index n : {1, 6, 8, 64, 257}) {
      const Matrix a = random_matrix(n, 520, 22);
      Matrix got(n, 100);
      Matrix portable(n, 100);
      moet::detail::gemm_packed(a, packed, got, false, scratch);
      moet::detail::gemm_packed(a, portable_b, portable, false, scratch);
      INFO(kernel_isa_name(isa) << " n " << n);
      REQUIRE(scaled_error(got, portable.cast<double>(), rounded(a), ar_b) <= 2e-5);
    }
  }
}

namespace {

// Relative Frobenius error of a bf16 bank's forward against the float bank with the same
// weights, on `n` random rows of every expert; also returns the largest element error
// relative to the output's RMS.
template <class Bank>
double bf16_relative_error(const typename Bank::Options& options, Index n, double& worst_rel) {
  typename Bank::Options o32 = options;
  o32.weight_format = moet::WeightFormat::kF32;
  typename Bank::Options o16 = options;
  o16.weight_format = moet::WeightFormat::kBf16;
  const Bank f32(o32);
  const Bank bf16(o16);
  REQUIRE(f32.uses_packed_kernels());
  REQUIRE(bf16.uses_packed_kernels());
  typename Bank::Scratch scratch;
  double err2 = 0.0;
  double ref2 = 0.0;
  worst_rel = 0.0;
  for (Index e = 0; e < f32.num_experts(); ++e) {
    const Matrix x = random_matrix(n, f32.model_dim(), static_cast<std::uint32_t>(40 + e));
    Matrix y32(n, f32.model_dim());
    Matrix y16(n, f32.model_dim());
    f32.forward(e, x, y32, scratch);
    bf16.forward(e, x, y16, scratch);
    const double rms =
        std::sqrt(y32.cast<double>().squaredNorm() / static_cast<double>(y32.size()));
    err2 += (y16 - y32).cast<double>().squaredNorm();
    ref2 += y32.cast<double>().squaredNorm();
    worst_rel = std::max(worst_rel, (y16 - y32).cwiseAbs().maxCoeff() / rms);
  }
  return std::sqrt(err2 / ref2);
}

}  // namespace

TEST_CASE("bf16 expert banks stay within bf16 rounding of the float banks", "[bf16][experts]") {
  // S1's expert shape (d = 512, f = 1024), fewer experts. Rounding both operands of every
  // product to bf16 (relative error <= 2^-9 each) gives a relative output error of a few
  // 1e-3 for these random weights; the bounds below leave 2-3x headroom.
  double worst = 0.0;
  const double glu = bf16_relative_error<moet::SwiGluExperts<float>>(
      {.model_dim = 512, .hidden_dim = 1024, .num_experts = 2, .init_seed = 3}, 33, worst);
  WARN("SwiGLU bf16 vs f32: relative Frobenius error " << glu << ", worst element / RMS " << worst);
  CHECK(glu > 0.0);  // the formats really differ
  CHECK(glu < 1e-2);
  CHECK(worst < 0.1);
  const double ffn = bf16_relative_error<moet::FfnExperts<float, moet::Gelu>>(
      {.model_dim = 256, .hidden_dim = 512, .num_experts = 2, .init_seed = 4}, 20, worst);
  WARN("FFN-GELU bf16 vs f32: relative Frobenius error " << ffn << ", worst element / RMS "
                                                         << worst);
  CHECK(ffn > 0.0);
  CHECK(ffn < 1e-2);
  CHECK(worst < 0.1);
}

TEST_CASE("bf16 banks re-round after parameters_changed and reject what they cannot do",
          "[bf16][experts]") {
  moet::SwiGluExperts<float> bank({.model_dim = 40,
                                   .hidden_dim = 24,
                                   .num_experts = 3,
                                   .weight_format = moet::WeightFormat::kBf16});
  CHECK(bank.uses_packed_kernels());
  const Matrix x = random_matrix(5, 40, 9);
  Matrix y_before(5, 40);
  moet::SwiGluExperts<float>::Scratch scratch;
  bank.forward(1, x, y_before, scratch);
  // Expert 1's down weights (rows [24, 48) of the stack) doubled through the optimisers'
  // protocol: stale (forward would throw) until parameters_changed.
  bank.visit_parameters([](std::string_view name, moet::ParamMap<float> w, moet::ParamMap<float>) {
    if (name == "down") w.middleRows(24, 24) *= 2.0f;
  });
  CHECK_FALSE(bank.uses_packed_kernels());
  bank.parameters_changed();
  REQUIRE(bank.uses_packed_kernels());
  Matrix y_after(5, 40);
  bank.forward(1, x, y_after, scratch);
  // Doubling is exact in bf16, so the re-rounded copy gives exactly twice the output.
  CHECK(bit_identical(y_after, Matrix(2.0f * y_before)));

  CHECK_THROWS_WITH((moet::SwiGluExperts<double>({.model_dim = 4,
                                                  .hidden_dim = 4,
                                                  .num_experts = 1,
                                                  .weight_format = moet::WeightFormat::kBf16})),
                    Catch::Contains("GluExperts") && Catch::Contains("bf16"));
  CHECK_THROWS_WITH((moet::SwiGluExperts<float>({.model_dim = 4,
                                                 .hidden_dim = 4,
                                                 .num_experts = 1,
                                                 .pack_weights = false,
                                                 .weight_format = moet::WeightFormat::kBf16})),
                    Catch::Contains("pack_weights"));
  CHECK_THROWS_WITH(
      (moet::FfnExperts<double, moet::Relu>({.model_dim = 4,
                                             .hidden_dim = 4,
                                             .num_experts = 1,
                                             .weight_format = moet::WeightFormat::kBf16})),
      Catch::Contains("FfnExperts") && Catch::Contains("bf16"));
}

}  // namespace test_gemm_bf16
