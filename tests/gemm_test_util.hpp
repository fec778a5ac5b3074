#pragma once
// Shared by the packed-kernel tests (test_gemm.cpp, test_gemm_bf16.cpp): random matrices,
// naive double-precision oracles, error measures scaled by the operands' norms, bit equality.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/kernel_isa.hpp"
#include "moet/tensor.hpp"

namespace moet_test {

using moet::Index;
using moet::RowMatrix;
using moet::KernelIsa;
using moet::kernel_isa_name;

using Matrix = RowMatrix<float>;
using MatrixD = RowMatrix<double>;

inline Matrix random_matrix(Index rows, Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = normal(gen);
  }
  return m;
}

// Written out independently of activations.hpp and the kernels.
inline double silu_ref(double v) { return v / (1.0 + std::exp(-v)); }
inline double gelu_ref(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// The oracle's loops are test code: the sanitizer builds leave them uninstrumented, so that their
// time goes to checking the kernels (test_gemm_quant under ASan: 88 s before, 67 s after, in a
// CI run that also changed how the tests are built; the oracle's own share was not measured).
#if defined(__GNUC__)  // g++ and clang++
#define MOET_TEST_UNSANITIZED __attribute__((no_sanitize("address", "thread", "undefined")))
#else
#define MOET_TEST_UNSANITIZED
#endif

// Naive (n, K) x (K, N) in double, over both row-major arrays.
MOET_TEST_UNSANITIZED inline MatrixD naive_product(const Matrix& a, const Matrix& b) {
  const Index n = a.rows(), k = a.cols(), m = b.cols();
  if (b.rows() != k) throw std::invalid_argument("naive_product: inner dimensions differ");
  MatrixD c = MatrixD::Zero(n, m);
  const float* pa = a.data();
  const float* pb = b.data();
  double* pc = c.data();
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < m; ++j) {
      double sum = 0.0;
      for (Index kk = 0; kk < k; ++kk) {
        sum += static_cast<double>(pa[i * k + kk]) * static_cast<double>(pb[kk * m + j]);
      }
      pc[i * m + j] = sum;
    }
  }
  return c;
}

inline std::vector<double> row_norms(const Matrix& a) {
  std::vector<double> out(static_cast<std::size_t>(a.rows()));
  for (Index i = 0; i < a.rows(); ++i)
    out[static_cast<std::size_t>(i)] = a.row(i).cast<double>().norm();
  return out;
}
inline std::vector<double> col_norms(const Matrix& b) {
  std::vector<double> out(static_cast<std::size_t>(b.cols()));
  for (Index j = 0; j < b.cols(); ++j)
    out[static_cast<std::size_t>(j)] = b.col(j).cast<double>().norm();
  return out;
}

// Largest |got - want| / (||a_i|| ||b_j||) over the matrix (0 when everything matches).
inline double scaled_error(const Matrix& got, const MatrixD& want, const Matrix& a,
                           const Matrix& b) {
  const auto ra = row_norms(a);
  const auto cb = col_norms(b);
  double worst = 0.0;
  for (Index i = 0; i < got.rows(); ++i) {
    for (Index j = 0; j < got.cols(); ++j) {
      const double scale =
          ra[static_cast<std::size_t>(i)] * cb[static_cast<std::size_t>(j)] + 1e-30;
      worst = std::max(worst, std::abs(static_cast<double>(got(i, j)) - want(i, j)) / scale);
    }
  }
  return worst;
}

// Largest |got - (c0 + a b)| / budget with budget = 1e-5 (||a_i|| ||b_j|| + |c0_ij|): the
// accumulate-mode bound (the old C adds at most |c0| to the sum). <= 1 passes.
inline double accumulate_error_ratio(const Matrix& got, const Matrix& a, const Matrix& b,
                                     const Matrix& c0) {
  const MatrixD want = c0.cast<double>() + naive_product(a, b);
  const auto ra = row_norms(a);
  const auto cb = col_norms(b);
  double worst = 0.0;
  for (Index i = 0; i < got.rows(); ++i) {
    for (Index j = 0; j < got.cols(); ++j) {
      const double budget =
          1e-5 *
          (ra[static_cast<std::size_t>(i)] * cb[static_cast<std::size_t>(j)] + std::abs(c0(i, j)));
      worst = std::max(worst, std::abs(static_cast<double>(got(i, j)) - want(i, j)) / budget);
    }
  }
  return worst;
}

inline bool bit_identical(const Matrix& x, const Matrix& y) {
  if (x.rows() != y.rows() || x.cols() != y.cols()) return false;
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      if (std::bit_cast<std::uint32_t>(x(i, j)) != std::bit_cast<std::uint32_t>(y(i, j))) {
        return false;
      }
    }
  }
  return true;
}

// Every kernel level this CPU runs (the kernel tests run each of them, whatever MOET_ISA says).
inline std::vector<KernelIsa> supported_isas() {
  std::vector<KernelIsa> out;
  for (const KernelIsa isa : moet::kAllKernelIsas) {
    if (moet::kernel_isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

// Naive H = Act(A Wg) * (A Wu) in double, and a per-entry error budget: the products may be
// off by 1e-5 ||a_i|| ||w_j|| each (the GEMM bound), |Act'| <= 1.1 for SiLU and 1.13 for GELU,
// plus 1e-6 relative for the activation itself.
template <class ActRef>
double glu_error_ratio(const Matrix& h, const Matrix& a, const Matrix& wg, const Matrix& wu,
                       ActRef act) {
  const MatrixD g = naive_product(a, wg);
  const MatrixD u = naive_product(a, wu);
  const auto ra = row_norms(a);
  const auto cg = col_norms(wg);
  const auto cu = col_norms(wu);
  double worst = 0.0;
  for (Index i = 0; i < h.rows(); ++i) {
    for (Index j = 0; j < h.cols(); ++j) {
      const double want = act(g(i, j)) * u(i, j);
      const double eg = 1e-5 * ra[static_cast<std::size_t>(i)] * cg[static_cast<std::size_t>(j)];
      const double eu = 1e-5 * ra[static_cast<std::size_t>(i)] * cu[static_cast<std::size_t>(j)];
      const double budget = 1.2 * eg * (std::abs(u(i, j)) + eu) + std::abs(act(g(i, j))) * eu +
                            1e-6 * std::abs(want) + 1e-30;
      worst = std::max(worst, std::abs(static_cast<double>(h(i, j)) - want) / budget);
    }
  }
  return worst;  // <= 1 passes
}

// gemm_packed_at (A given as its transpose `a_t` (K, n): the weight-gradient products, K the
// tokens) with B packed as `W`, for K in `depths`, n in {1, 5, 40, 150}, 3 and 33 columns:
// within the GEMM bound of the double product of the operands as the kernels see them
// (`round(m)`: `m` itself for float, rounded to bf16 for Bf16); bit-identical to gemm_packed on
// the explicit A; a block of A's rows (columns of a_t) alone gives the same rows; accumulate
// mode adds to the old C.
template <class W, class Round>
void check_gemm_packed_at(KernelIsa isa, const std::vector<Index>& depths, std::uint32_t seed,
                          Round round) {
  moet::detail::Buffer<float> scratch;
  for (const Index k : depths) {
    for (const Index n : {1, 5, 40, 150}) {
      for (const Index cols : {3, 33}) {
        const Matrix a_t = random_matrix(k, n, seed++);  // (K, n) = A^T
        const Matrix b = random_matrix(k, cols, seed++);
        const moet::detail::PackedMatrix<W> packed{moet::ConstRows<float>(b), isa};
        const Matrix a = a_t.transpose();
        const Matrix ar = round(a);
        const Matrix br = round(b);
        Matrix c(n, cols);
        moet::detail::gemm_packed_at(a_t, packed, c, false, scratch);
        INFO("K " << k << " n " << n << " cols " << cols);
        REQUIRE(scaled_error(c, naive_product(ar, br), ar, br) <= 1e-5);
        Matrix c2(n, cols);
        moet::detail::gemm_packed(a, packed, c2, false, scratch);
        REQUIRE(bit_identical(c, c2));
        if (n >= 5) {
          Matrix part(n - 3, cols);
          moet::detail::gemm_packed_at(a_t.rightCols(n - 3), packed, part, false, scratch);
          REQUIRE(bit_identical(part, c.bottomRows(n - 3)));
          Matrix acc = c;
          moet::detail::gemm_packed_at(a_t, packed, acc, true, scratch);
          REQUIRE(accumulate_error_ratio(acc, ar, br, c) <= 1.0);
        }
      }
    }
  }
}

// The checks of a large pack (8 MiB and more): packing `w` as `W` succeeds exactly when
// `valid` (a NaN fails it) and gives at least 8 MiB; the transposing pack of `w`'s transpose
// (another walk, plain stores) gives the same bytes; and every value of the row-major pack and
// of both halves of the GLU pack of (`w`, `u`) satisfies `same(packed, original)` (the caller's
// oracle: equal bits for float, round to 8 bits for bf16). Returns the number of values that do
// not.
template <class W, class Same>
Index check_large_pack(const Matrix& w, const Matrix& u, KernelIsa isa, bool valid, Same same) {
  moet::detail::PackedMatrix<W> x;
  CHECK(x.pack(w, isa) == valid);
  REQUIRE(x.bytes() >= (std::size_t{8} << 20));
  const Matrix wt = w.transpose();
  moet::detail::PackedMatrix<W> xt;
  CHECK(xt.pack_transposed(wt, isa) == valid);
  REQUIRE(x.bytes() == xt.bytes());
  CHECK(std::memcmp(x.data(), xt.data(), x.bytes()) == 0);
  const moet::detail::PackedGluMatrix<W> g(w, u, isa);
  Index wrong = 0;
  for (Index k = 0; k < w.rows(); ++k) {
    for (Index j = 0; j < w.cols(); ++j) {
      wrong += !same(x.packed_coeff(k, j), w(k, j));
      wrong += !same(g.packed_coeff(k, j, false), w(k, j));
      wrong += !same(g.packed_coeff(k, j, true), u(k, j));
    }
  }
  return wrong;
}

}  // namespace moet_test
