// The packed GEMM and fused GLU kernels (detail/gemm.hpp) against naive double-precision
// products, row-independence (bit-identical rows), packing, edge shapes, and the vectorised
// SiLU's error bound (kernels/family.inl), on every kernel level the CPU has.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/activations.hpp"
#include "moet/detail/bf16.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/errors.hpp"
#include "moet/tensor.hpp"

#include "gemm_test_util.hpp"

namespace test_gemm {  // one per file: the unity build puts several files in one TU

namespace {

using namespace moet_test;  // NOLINT(google-build-using-namespace)

const std::vector<Index> kRows = {0, 1, 2, 3, 5, 7, 8, 9, 13, 64, 100, 257};
const std::vector<Index> kInner = {1, 3, 17, 256, 300, 520};
const std::vector<Index> kCols = {1, 15, 16, 17, 100};

}  // namespace

TEST_CASE("gemm_packed equals a double-precision product for every shape", "[gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 1;
  for (const Index k : kInner) {
    for (const Index n_cols : kCols) {
      const Matrix b = random_matrix(k, n_cols, seed++);
      const moet::detail::PackedMatrix<float> packed(b, isa);
      for (const Index n : kRows) {
        INFO(kernel_isa_name(isa) << " n=" << n << " K=" << k << " N=" << n_cols);
        const Matrix a = random_matrix(n, k, seed++);
        Matrix c = Matrix::Constant(n, n_cols, std::numeric_limits<float>::quiet_NaN());
        moet::detail::gemm_packed(a, packed, c, false, scratch);
        CHECK(scaled_error(c, naive_product(a, b), a, b) <= 1e-5);
      }
    }
  }
}

TEST_CASE("gemm_packed with accumulate adds A B to C", "[gemm]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 100;
  for (const Index k : {1, 17, 300}) {
    for (const Index n_cols : {15, 16, 100}) {
      const Matrix b = random_matrix(k, n_cols, seed++);
      const moet::detail::PackedMatrix<float> packed(b, isa);
      for (const Index n : {1, 3, 8, 13, 100}) {
        INFO(kernel_isa_name(isa) << " n=" << n << " K=" << k << " N=" << n_cols);
        const Matrix a = random_matrix(n, k, seed++);
        const Matrix c0 = random_matrix(n, n_cols, seed++);
        Matrix c = c0;
        moet::detail::gemm_packed(a, packed, c, true, scratch);
        CHECK(accumulate_error_ratio(c, a, b, c0) <= 1.0);
      }
    }
  }
}

TEST_CASE("glu_packed with SiLU equals a double-precision SwiGLU", "[gemm][glu]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 300;
  for (const Index k : kInner) {
    for (const Index f : kCols) {
      const Matrix wg = random_matrix(k, f, seed++);
      const Matrix wu = random_matrix(k, f, seed++);
      const moet::detail::PackedGluMatrix<float> packed(wg, wu, isa);
      for (const Index n : kRows) {
        INFO(kernel_isa_name(isa) << " n=" << n << " K=" << k << " F=" << f);
        const Matrix a = random_matrix(n, k, seed++);
        Matrix h = Matrix::Constant(n, f, std::numeric_limits<float>::quiet_NaN());
        moet::detail::glu_packed<moet::Silu>(a, packed, h, scratch);
        CHECK(glu_error_ratio(h, a, wg, wu, silu_ref) <= 1.0);
      }
    }
  }
}

TEST_CASE("glu_packed applies any activation policy, here exact GELU", "[gemm][glu]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 700;
  for (const Index k : {3, 300}) {
    for (const Index f : {15, 17, 100}) {
      const Matrix wg = random_matrix(k, f, seed++);
      const Matrix wu = random_matrix(k, f, seed++);
      const moet::detail::PackedGluMatrix<float> packed(wg, wu, isa);
      for (const Index n : {1, 2, 7, 13, 64}) {
        INFO(kernel_isa_name(isa) << " n=" << n << " K=" << k << " F=" << f);
        const Matrix a = random_matrix(n, k, seed++);
        Matrix h(n, f);
        moet::detail::glu_packed<moet::Gelu>(a, packed, h, scratch);
        CHECK(glu_error_ratio(h, a, wg, wu, gelu_ref) <= 1.0);
      }
    }
  }
}

TEST_CASE("A row's result is bit-identical alone and inside any block of rows",
          "[gemm][determinism]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const std::uint32_t seed = GENERATE(1u, 2u);
  const Index k = 520;       // three K blocks, the last one partial
  const Index n_cols = 100;  // a partial last panel
  const Index n = 257;
  const Matrix a = random_matrix(n, k, seed);
  const Matrix b = random_matrix(k, n_cols, seed + 10);
  const Matrix wu = random_matrix(k, n_cols, seed + 20);
  const moet::detail::PackedMatrix<float> packed(b, isa);
  const moet::detail::PackedGluMatrix<float> packed_glu(b, wu, isa);
  moet::detail::Buffer<float> scratch;
  INFO(kernel_isa_name(isa));

  Matrix full(n, n_cols);
  Matrix full_glu(n, n_cols);
  moet::detail::gemm_packed(a, packed, full, false, scratch);
  moet::detail::glu_packed<moet::Silu>(a, packed_glu, full_glu, scratch);

  // Every row alone (the few-row path).
  for (Index i = 0; i < n; ++i) {
    Matrix one(1, n_cols);
    Matrix one_glu(1, n_cols);
    moet::detail::gemm_packed(a.row(i), packed, one, false, scratch);
    moet::detail::glu_packed<moet::Silu>(a.row(i), packed_glu, one_glu, scratch);
    INFO("row " << i);
    REQUIRE(bit_identical(one, full.row(i)));
    REQUIRE(bit_identical(one_glu, full_glu.row(i)));
  }
  // Contiguous sub-blocks of every size class, at offsets that shift the row grouping.
  for (const Index m : {2, 3, 5, 6, 7, 8, 9, 13, 31, 64, 150}) {
    for (const Index start : {Index{0}, Index{1}, Index{5}, n - m}) {
      Matrix part(m, n_cols);
      Matrix part_glu(m, n_cols);
      moet::detail::gemm_packed(a.middleRows(start, m), packed, part, false, scratch);
      moet::detail::glu_packed<moet::Silu>(a.middleRows(start, m), packed_glu, part_glu, scratch);
      INFO("rows [" << start << ", " << start + m << ")");
      REQUIRE(bit_identical(part, full.middleRows(start, m)));
      REQUIRE(bit_identical(part_glu, full_glu.middleRows(start, m)));
    }
  }
  // Rows gathered in a scrambled order, next to different neighbours.
  std::vector<Index> order(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = (i * 37 + 11) % n;
  Matrix scrambled(n, k);
  for (Index i = 0; i < n; ++i) scrambled.row(i) = a.row(order[static_cast<std::size_t>(i)]);
  Matrix out(n, n_cols);
  moet::detail::gemm_packed(scrambled, packed, out, false, scratch);
  for (Index i = 0; i < n; ++i) {
    REQUIRE(bit_identical(out.row(i), full.row(order[static_cast<std::size_t>(i)])));
  }
}

TEST_CASE("Few-row calls with a very long inner dimension block K and stay exact",
          "[gemm][determinism]") {
  // 7 and 8 rows form two row groups; past kGemmFewRowsKc the few-row path blocks K.
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const Index k = moet::detail::kGemmFewRowsKc + 37;
  const Index n_cols = 40;  // a partial last panel on every instruction set
  const Matrix b = random_matrix(k, n_cols, 21);
  const Matrix wu = random_matrix(k, n_cols, 22);
  const moet::detail::PackedMatrix<float> packed(b, isa);
  const moet::detail::PackedGluMatrix<float> packed_glu(b, wu, isa);
  moet::detail::Buffer<float> scratch;
  for (const Index n : {1, 6, 7, 8, 9}) {
    INFO(kernel_isa_name(isa) << " n=" << n);
    const Matrix a = random_matrix(n, k, static_cast<std::uint32_t>(30 + n));
    const Matrix c0 = random_matrix(n, n_cols, 40);
    Matrix c(n, n_cols);
    Matrix c_acc = c0;
    Matrix h(n, n_cols);
    moet::detail::gemm_packed(a, packed, c, false, scratch);
    moet::detail::gemm_packed(a, packed, c_acc, true, scratch);
    moet::detail::glu_packed<moet::Silu>(a, packed_glu, h, scratch);
    CHECK(scaled_error(c, naive_product(a, b), a, b) <= 1e-5);
    CHECK(scaled_error(Matrix(c_acc - c0), naive_product(a, b), a, b) <= 1e-4);
    CHECK(glu_error_ratio(h, a, b, wu, silu_ref) <= 1.0);
    for (Index i = 0; i < n; ++i) {
      Matrix one(1, n_cols);
      Matrix one_acc = c0.row(i);
      Matrix one_glu(1, n_cols);
      moet::detail::gemm_packed(a.row(i), packed, one, false, scratch);
      moet::detail::gemm_packed(a.row(i), packed, one_acc, true, scratch);
      moet::detail::glu_packed<moet::Silu>(a.row(i), packed_glu, one_glu, scratch);
      REQUIRE(bit_identical(one, c.row(i)));
      REQUIRE(bit_identical(one_acc, c_acc.row(i)));
      REQUIRE(bit_identical(one_glu, h.row(i)));
    }
  }
}

TEST_CASE("Accumulate mode is bit-identical for a row alone and inside a block",
          "[gemm][determinism]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const Matrix a = random_matrix(40, 300, 5);
  const Matrix b = random_matrix(300, 33, 6);
  const Matrix c0 = random_matrix(40, 33, 7);
  const moet::detail::PackedMatrix<float> packed(b, isa);
  moet::detail::Buffer<float> scratch;
  Matrix full = c0;
  moet::detail::gemm_packed(a, packed, full, true, scratch);
  for (Index i = 0; i < a.rows(); ++i) {
    Matrix one = c0.row(i);
    moet::detail::gemm_packed(a.row(i), packed, one, true, scratch);
    REQUIRE(bit_identical(one, full.row(i)));
  }
}

TEST_CASE("Packing reads strided views and products write strided views", "[gemm][pack]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const Matrix big_b = random_matrix(320, 140, 11);
  const auto b_view = big_b.block(7, 9, 300, 100);  // outer stride 140
  const Matrix b = b_view;
  const moet::detail::PackedMatrix<float> packed(b_view, isa);
  REQUIRE(packed.rows() == 300);
  REQUIRE(packed.cols() == 100);
  REQUIRE(packed.isa() == isa);
  REQUIRE(packed.num_panels() == (100 + packed.panel_width() - 1) / packed.panel_width());
  REQUIRE(reinterpret_cast<std::uintptr_t>(packed.data()) % 64 == 0);
  for (Index k = 0; k < b.rows(); ++k) {
    for (Index j = 0; j < b.cols(); ++j) REQUIRE(packed.packed_coeff(k, j) == b(k, j));
  }

  const Matrix big_a = random_matrix(60, 310, 12);
  const auto a_view = big_a.block(3, 4, 50, 300);  // outer stride 310
  const Matrix a = a_view;
  Matrix big_c = Matrix::Constant(55, 120, -7.0f);
  auto c_view = big_c.block(2, 5, 50, 100);  // outer stride 120
  moet::detail::Buffer<float> scratch;
  moet::detail::gemm_packed(a_view, packed, c_view, false, scratch);
  CHECK(scaled_error(Matrix(c_view), naive_product(a, b), a, b) <= 1e-5);
  // Nothing outside the view was written.
  Matrix outside = big_c;
  outside.block(2, 5, 50, 100).setConstant(-7.0f);
  CHECK((outside.array() == -7.0f).all());

  // The same for the fused product: gate and up taken from strided views.
  const Matrix big_u = random_matrix(320, 140, 13);
  const auto u_view = big_u.block(1, 2, 300, 100);
  const moet::detail::PackedGluMatrix<float> packed_glu(b_view, u_view, isa);
  Matrix big_h = Matrix::Constant(50, 130, -7.0f);
  auto h_view = big_h.block(0, 30, 50, 100);
  moet::detail::glu_packed<moet::Silu>(a_view, packed_glu, h_view, scratch);
  CHECK(glu_error_ratio(Matrix(h_view), a, b, Matrix(u_view), silu_ref) <= 1.0);
  CHECK((big_h.leftCols(30).array() == -7.0f).all());

  // A copy of a packed matrix multiplies the same.
  // NOLINTNEXTLINE(performance-unnecessary-copy-initialization): the copy is under test
  const moet::detail::PackedMatrix<float> copy = packed;
  Matrix c1(50, 100);
  Matrix c2(50, 100);
  moet::detail::gemm_packed(a, packed, c1, false, scratch);
  moet::detail::gemm_packed(a, copy, c2, false, scratch);
  CHECK(bit_identical(c1, c2));
}

TEST_CASE("Empty shapes: no rows, no columns, no inner dimension", "[gemm][edge]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  moet::detail::Buffer<float> scratch;
  // K = 0: the product is zero; accumulate leaves C alone; H = silu(0) * 0 = 0.
  const moet::detail::PackedMatrix<float> empty_k(Matrix(0, 20), isa);
  const Matrix a(5, 0);
  Matrix c = Matrix::Constant(5, 20, 3.0f);
  moet::detail::gemm_packed(a, empty_k, c, true, scratch);
  CHECK((c.array() == 3.0f).all());
  moet::detail::gemm_packed(a, empty_k, c, false, scratch);
  CHECK((c.array() == 0.0f).all());
  const moet::detail::PackedGluMatrix<float> empty_glu(Matrix(0, 20), Matrix(0, 20), isa);
  Matrix h = Matrix::Constant(5, 20, 3.0f);
  moet::detail::glu_packed<moet::Silu>(a, empty_glu, h, scratch);
  CHECK((h.array() == 0.0f).all());
  // N = 0 and n = 0.
  const moet::detail::PackedMatrix<float> no_cols(Matrix(8, 0), isa);
  Matrix c0(4, 0);
  moet::detail::gemm_packed(random_matrix(4, 8, 1), no_cols, c0, false, scratch);
  const moet::detail::PackedMatrix<float> b(random_matrix(8, 3, 2), isa);
  Matrix none(0, 3);
  moet::detail::gemm_packed(Matrix(0, 8), b, none, false, scratch);
  CHECK(none.size() == 0);
}

TEST_CASE("Bad shapes and overlapping views throw moet::Error", "[gemm][errors]") {
  moet::detail::Buffer<float> scratch;
  const moet::detail::PackedMatrix<float> b(random_matrix(8, 5, 1));
  Matrix c(3, 5);
  CHECK_THROWS_AS(moet::detail::gemm_packed(random_matrix(3, 7, 2), b, c, false, scratch),
                  moet::Error);
  Matrix wrong(3, 6);
  CHECK_THROWS_WITH(moet::detail::gemm_packed(random_matrix(3, 8, 2), b, wrong, false, scratch),
                    Catch::Contains("[moet::gemm_packed]") && Catch::Contains("(3, 5)"));
  Matrix shared = random_matrix(3, 13, 3);
  CHECK_THROWS_AS(
      moet::detail::gemm_packed(shared.leftCols(8), b, shared.rightCols(5), false, scratch),
      moet::Error);
  CHECK_THROWS_AS(moet::detail::PackedGluMatrix<float>(Matrix(8, 5), Matrix(8, 6)), moet::Error);
  const moet::detail::PackedGluMatrix<float> w(random_matrix(8, 5, 4), random_matrix(8, 5, 5));
  Matrix h(3, 4);
  CHECK_THROWS_WITH(moet::detail::glu_packed(random_matrix(3, 8, 6), w, h, scratch),
                    Catch::Contains("[moet::glu_packed]"));
}

TEST_CASE("A reserved scratch does not grow for blocks up to the reserved size", "[gemm][alloc]") {
  const Index k = 520;
  const Matrix wg = random_matrix(k, 40, 1);
  const Matrix wu = random_matrix(k, 40, 2);
  moet::detail::Buffer<float> scratch;
  moet::detail::reserve_packed_scratch(scratch, 300, k);
  const Index reserved = scratch.capacity();
  for (const KernelIsa isa : supported_isas()) {
    const moet::detail::PackedMatrix<float> b(wg, isa);
    const moet::detail::PackedGluMatrix<float> w(wg, wu, isa);
    const moet::detail::PackedMatrix<moet::detail::Bf16> b16(wg, isa);
    const moet::detail::PackedGluMatrix<moet::detail::Bf16> w16(wg, wu, isa);
    for (const Index n : {1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 100, 299, 300}) {
      INFO(kernel_isa_name(isa) << " n=" << n);
      const Matrix a = random_matrix(n, k, 3);
      Matrix c(n, 40);
      moet::detail::gemm_packed(a, b, c, false, scratch);
      moet::detail::glu_packed(a, w, c, scratch);
      moet::detail::gemm_packed(a, b16, c, false, scratch);
      moet::detail::glu_packed(a, w16, c, scratch);
      CHECK(scratch.capacity() == reserved);
    }
  }
}

namespace {

// Checks silu_array on `xs` against the double-precision SiLU: relative error <= 1e-6 where
// x >= -87 and silu(x) is a normal float, one subnormal ulp where it is subnormal, absolute
// error <= 1.5e-36 for x < -87. Returns the worst relative error seen.
double check_silu(const std::vector<float>& xs, KernelIsa isa) {
  std::vector<float> ys(xs.size());
  moet::detail::silu_array(xs.data(), ys.data(), static_cast<Index>(xs.size()), isa);
  double worst = 0.0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double x = xs[i];
    const double want = silu_ref(x);
    const double got = ys[i];
    if (x >= -87.0 && std::abs(want) >= std::numeric_limits<float>::min()) {
      const double rel = std::abs(got - want) / std::abs(want);
      if (!(rel <= 1e-6)) {
        INFO("x = " << x << " got " << got << " want " << want);
        REQUIRE(rel <= 1e-6);
      }
      worst = std::max(worst, rel);
    } else {
      // Subnormal results (tiny |x|) carry no relative precision: one subnormal ulp, 2^-149.
      // Below -87 the kernels return -0 for a true value under 87 exp(-87).
      const double bound = x >= -87.0 ? std::numeric_limits<float>::denorm_min() : 1.5e-36;
      if (!(std::abs(got - want) <= bound)) {
        INFO("x = " << x << " got " << got << " want " << want);
        REQUIRE(std::abs(got - want) <= bound);
      }
    }
  }
  return worst;
}

// Checks every `step`-th float (by bit pattern) of [lo, 0] and [0, hi], a chunk at a time.
double check_silu_grid(float lo, float hi, std::uint32_t step, KernelIsa isa) {
  double worst = 0.0;
  std::vector<float> chunk;
  const auto flush = [&] {
    worst = std::max(worst, check_silu(chunk, isa));
    chunk.clear();
  };
  // Negative floats: the bit pattern grows with the magnitude.
  const std::uint32_t neg_end = std::bit_cast<std::uint32_t>(lo);
  for (std::uint64_t bits = std::bit_cast<std::uint32_t>(-0.0f); bits <= neg_end; bits += step) {
    chunk.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(bits)));
    if (chunk.size() == (1u << 20)) flush();
  }
  const std::uint32_t pos_end = std::bit_cast<std::uint32_t>(hi);
  for (std::uint64_t bits = 0; bits <= pos_end; bits += step) {
    chunk.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(bits)));
    if (chunk.size() == (1u << 20)) flush();
  }
  flush();
  return worst;
}

}  // namespace

TEST_CASE("The kernels' SiLU is within 1e-6 relative of a double-precision SiLU", "[simd][silu]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const double worst = check_silu_grid(-120.0f, 120.0f, 977, isa);
  // Around the places where the evaluation changes branch.
  std::vector<float> special;
  for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-7f, -1e-7f, 0.5f, -0.5f, 0.34657f, -0.34657f,
                  -86.999f, -87.0f, -87.001f, 87.0f, 88.8f, 1e30f, -1e30f}) {
    special.push_back(x);
  }
  check_silu(special, isa);
  WARN("worst relative error of silu_array (" << kernel_isa_name(isa) << "): " << worst);
  CHECK(worst <= 1e-6);
  // Non-finite inputs behave like Silu::apply.
  std::vector<float> odd = {std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  std::vector<float> out(odd.size());
  moet::detail::silu_array(odd.data(), out.data(), 3, isa);
  CHECK(out[0] == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(out[1]) == std::isnan(moet::Silu::apply(odd[1])));
  CHECK(std::isnan(out[2]));
}

TEST_CASE("The kernels' SiLU bound holds for every float in [-90, 90]", "[simd][silu][.slow]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const double worst = check_silu_grid(-90.0f, 90.0f, 1, isa);
  WARN("worst relative error over every float: " << worst);
  CHECK(worst <= 1e-6);
}

TEST_CASE("pack_transposed packs exactly what packing the explicit transpose packs",
          "[gemm][pack]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  for (const Index rows : {1, 33, 70}) {
    for (const Index cols : {1, 17, 64}) {
      const Matrix w = random_matrix(rows, cols, static_cast<std::uint32_t>(rows * 7 + cols));
      const Matrix wt = w.transpose();
      const auto same = [](const auto& x, const auto& y) {
        return x.bytes() == y.bytes() && std::memcmp(x.data(), y.data(), x.bytes()) == 0;
      };
      moet::detail::PackedMatrix<float> a;
      CHECK(a.pack_transposed(w, isa));  // every value finite
      CHECK(same(a, moet::detail::PackedMatrix<float>(wt, isa)));
      // A NaN or Inf anywhere (the 4 x 4 blocks of the x86 path or the rows and columns past
      // them) is reported, and packed as it is.
      for (const Index r : {Index{0}, rows / 2, rows - 1}) {
        for (const Index c : {Index{0}, cols - 1}) {
          for (const float bad :
               {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
            Matrix wb = w;
            wb(r, c) = bad;
            moet::detail::PackedMatrix<float> x;
            INFO("non-finite at (" << r << ", " << c << ")");
            CHECK_FALSE(x.pack_transposed(wb, isa));
            const Matrix wbt = wb.transpose();
            CHECK(same(x, moet::detail::PackedMatrix<float>(wbt, isa)));
          }
        }
      }
      moet::detail::PackedMatrix<moet::detail::Bf16> b;
      b.pack_transposed(w, isa);
      CHECK(same(b, moet::detail::PackedMatrix<moet::detail::Bf16>(wt, isa)));
      moet::detail::PackedMatrix<moet::detail::Q8_0> q;
      q.pack_transposed(w, isa);
      CHECK(same(q, moet::detail::PackedMatrix<moet::detail::Q8_0>(wt, isa)));
    }
  }
}

TEST_CASE("pack reports a NaN or Inf in any lane of any panel, whole or partial, transposed too",
          "[gemm][pack]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index nr = moet::detail::panel_width(isa);
  // Two whole panels (the fixed-width copy) and a partial one; rows split between threads.
  const Index rows = 37;
  const Index cols = 2 * nr + 3;
  const Matrix w = random_matrix(rows, cols, 21);
  moet::detail::PackedMatrix<float> clean;
  CHECK(clean.pack(w, isa));
  moet::detail::PackedMatrix<moet::detail::Bf16> clean_bf16;
  CHECK(clean_bf16.pack(w, isa));
  for (const Index r : {Index{0}, Index{18}, rows - 1}) {
    for (const Index c : {Index{0}, nr - 1, nr + 5, 2 * nr, cols - 1}) {
      // A quiet NaN, infinity, and a negative signalling NaN (bf16 must quieten it: truncated
      // it would read as -infinity).
      for (const float bad :
           {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
            std::bit_cast<float>(std::uint32_t{0xff800001u})}) {
        INFO("non-finite " << std::bit_cast<std::uint32_t>(bad) << " at (" << r << ", " << c
                           << ")");
        Matrix wb = w;
        wb(r, c) = bad;
        const Matrix wbt = wb.transpose();
        // pack of wb, and pack_transposed of its transpose (the backward's packs), float and
        // bf16: each says the source was not finite and holds every value as to_packed gives
        // it, the bad one bit for bit.
        moet::detail::PackedMatrix<float> x;
        moet::detail::PackedMatrix<float> xt;
        CHECK_FALSE(x.pack(wb, isa));
        CHECK_FALSE(xt.pack_transposed(wbt, isa));
        moet::detail::PackedMatrix<moet::detail::Bf16> xb;
        moet::detail::PackedMatrix<moet::detail::Bf16> xbt;
        CHECK_FALSE(xb.pack(wb, isa));
        CHECK_FALSE(xbt.pack_transposed(wbt, isa));
        const auto bits = [](float v) { return std::bit_cast<std::uint32_t>(v); };
        for (Index k = 0; k < rows; ++k) {
          for (Index j = 0; j < cols; ++j) {
            const float v = wb(k, j);
            const float vb = moet::detail::round_to_bf16(v);
            if (bits(x.packed_coeff(k, j)) != bits(v) || bits(xt.packed_coeff(k, j)) != bits(v) ||
                bits(xb.packed_coeff(k, j)) != bits(vb) ||
                bits(xbt.packed_coeff(k, j)) != bits(vb)) {
              FAIL_CHECK("(" << k << ", " << j << "): " << x.packed_coeff(k, j) << " "
                             << xt.packed_coeff(k, j) << " " << xb.packed_coeff(k, j) << " "
                             << xbt.packed_coeff(k, j) << ", expected " << v << " and " << vb);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("Packs of 8 MiB or more (streaming stores) hold every value and report a NaN",
          "[gemm][pack]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index nr = moet::detail::panel_width(isa);
  // Whole panels and a partial one, K odd: the float pack is 8.4 MB and more (the threshold
  // of the streaming stores); each GLU half alike.
  const Index rows = 1031;
  const Index cols = 2048 + nr + 3;
  const Matrix w = random_matrix(rows, cols, 77);
  const Matrix u = random_matrix(rows, cols, 78);
  const auto bits = [](float v) { return std::bit_cast<std::uint32_t>(v); };
  for (const bool with_nan : {false, true}) {
    Matrix wb = w;
    if (with_nan) wb(rows / 2, nr + 1) = std::numeric_limits<float>::quiet_NaN();
    // Both packs, the transposing one's bytes and every gate and up value of the GLU pack.
    const auto same = [&](float packed, float v) { return bits(packed) == bits(v); };
    CHECK(check_large_pack<float>(wb, u, isa, !with_nan, same) == 0);
  }
}

TEST_CASE("gemm_packed_at multiplies A given as its transpose, rows split freely",
          "[gemm][train]") {
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  check_gemm_packed_at<float>(isa, {1, 7, 64, 300}, 900, [](const Matrix& m) { return m; });
}

}  // namespace test_gemm
