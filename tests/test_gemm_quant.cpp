// Block-quantised weights (detail/quant.hpp, PackedMatrix<Q8_0/Q4_0/Q4_1>): half precision
// against the CPU's own conversion, the quantisers' rounding bounds and edge blocks, the packed
// layout against blocks quantised column by column, and gemm_packed / glu_packed on every
// kernel level against double products of the dequantised weights with the activations the
// level multiplies (8-bit block-quantised on the integer-dot level, float elsewhere), over odd
// depths, partial panels and 1-300 rows; rows bit-identical alone and inside a block.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <span>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "moet/detail/buffer.hpp"
#include "moet/detail/gemm.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"

#include "gemm_test_util.hpp"

namespace test_gemm_quant {  // one per file: the unity build puts several files in one TU

namespace {

using namespace moet_test;  // NOLINT(google-build-using-namespace)
using moet::detail::kQuantBlock;

#if defined(__x86_64__) || defined(__i386__)
// The CPU's own conversions (F16C), an oracle independent of quant.hpp.
__attribute__((target("f16c"))) std::uint16_t f16c_round(float v) {
  return static_cast<std::uint16_t>(
      _mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0));
}
__attribute__((target("f16c"))) float f16c_value(std::uint16_t h) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(static_cast<short>(h))));
}
#endif

// True when the kernel level multiplies block-format weights with 8-bit integer dot products
// (and so quantises the activations: vpdpbusd on the VNNI levels, vpmaddubsw + vpmaddwd on
// kAvx2 and kAvx512); the portable level dequantises the weights to float.
bool integer_dot(KernelIsa isa) { return isa != KernelIsa::kPortable; }

// The activations an integer-dot level multiplies: each row's blocks of 32 quantised to 8 bits
// with a float scale max|x| / 127, rounded half away from zero (written out independently of
// pack_quantized_row_groups).
Matrix quantized_activations(const Matrix& a) {
  Matrix out(a.rows(), a.cols());
  for (Index r = 0; r < a.rows(); ++r) {
    for (Index b0 = 0; b0 < a.cols(); b0 += kQuantBlock) {
      const Index len = std::min<Index>(kQuantBlock, a.cols() - b0);
      float amax = 0.0f;
      for (Index i = 0; i < len; ++i) amax = std::max(amax, std::abs(a(r, b0 + i)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      for (Index i = 0; i < len; ++i) out(r, b0 + i) = d * std::round(a(r, b0 + i) * id);
    }
  }
  return out;
}

template <class W>
Matrix dequantized(const moet::detail::PackedMatrix<W>& p) {
  Matrix out(p.rows(), p.cols());
  for (Index k = 0; k < p.rows(); ++k) {
    for (Index j = 0; j < p.cols(); ++j) out(k, j) = p.packed_coeff(k, j);
  }
  return out;
}

template <class W>
Matrix dequantized_glu(const moet::detail::PackedGluMatrix<W>& p, bool up) {
  Matrix out(p.rows(), p.cols());
  for (Index k = 0; k < p.rows(); ++k) {
    for (Index j = 0; j < p.cols(); ++j) out(k, j) = p.packed_coeff(k, j, up);
  }
  return out;
}

const std::vector<Index> kRows = {1, 2, 3, 5, 6, 7, 8, 9, 13, 64, 150, 300};
const std::vector<Index> kInner = {1, 31, 32, 33, 100, 256, 300, 520};
const std::vector<Index> kCols = {1, 15, 16, 17, 33, 100};

}  // namespace

TEST_CASE("to_f16 and from_f16 agree with the CPU's half conversions", "[quant][f16]") {
#if defined(__x86_64__) || defined(__i386__)
  // Every half value converts back exactly.
  for (std::uint32_t h = 0; h < 0x10000U; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float want = f16c_value(bits);
    const float got = moet::detail::from_f16(bits);
    if (std::isnan(want)) {
      REQUIRE(std::isnan(got));
    } else {
      INFO("half 0x" << std::hex << h);
      REQUIRE(std::bit_cast<std::uint32_t>(got) == std::bit_cast<std::uint32_t>(want));
    }
  }
  // Rounding: random floats of every magnitude, ties, the subnormal and overflow edges.
  std::mt19937 gen(5);
  std::uniform_int_distribution<std::uint32_t> any;
  std::vector<float> values = {0.0f,      -0.0f,     65504.0f, 65519.0f, 65520.0f, 1e10f,
                               0x1p-24f,  0x1p-25f,  0x1.8p-25f, 0x1p-26f, 0x1p-14f, 0x1.ffcp-15f,
                               1.0f + 0x1p-11f, 1.0f + 0x3p-11f, std::numeric_limits<float>::infinity()};
  for (int i = 0; i < 200000; ++i) {
    const float v = std::bit_cast<float>(any(gen));
    if (!std::isnan(v)) values.push_back(v);
  }
  for (const float v : values) {
    INFO("v = " << v);
    REQUIRE(moet::detail::to_f16(v) == f16c_round(v));
    REQUIRE(moet::detail::to_f16(-v) == f16c_round(-v));
  }
  CHECK(std::isnan(moet::detail::from_f16(moet::detail::to_f16(std::nanf("")))));
#else
  SUCCEED("no F16C oracle on this architecture");
#endif
}

TEMPLATE_TEST_CASE("Block quantisers stay within half a step and handle edge blocks",
                   "[quant]", moet::detail::BlockQ8_0, moet::detail::BlockQ4_0,
                   moet::detail::BlockQ4_1) {
  using Block = TestType;
  std::mt19937 gen(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    float x[kQuantBlock];
    // Scales whose half is a normal number (tiny blocks get subnormal half scales and lose
    // relative precision, as in GGUF files).
    const float scale = std::ldexp(1.0f, trial % 12 - 4);
    for (float& v : x) v = normal(gen) * scale;
    if (trial % 7 == 0) x[trial % kQuantBlock] *= 1000.0f;  // one huge weight
    Block block{};
    moet::detail::quantize_block(x, block);
    double m = 0.0;
    if constexpr (std::is_same_v<Block, moet::detail::BlockQ4_1>) {
      m = std::abs(moet::detail::from_f16(block.m));
    }
    const double d = std::abs(moet::detail::from_f16(block.d));
    if (!std::isfinite(d) || !std::isfinite(m)) continue;  // refused by the packer (below)
    for (Index i = 0; i < kQuantBlock; ++i) {
      const int code = moet::detail::block_code(block, i);
      const double got = moet::detail::block_value(block, i);
      const double err = std::abs(got - static_cast<double>(x[i]));
      // Half a step, plus the rounding of the scale to half precision (2^-11 relative) times
      // the largest code; the 4-bit formats may clamp the top code (a whole step).
      const double max_code = std::is_same_v<Block, moet::detail::BlockQ8_0> ? 127.0 : 16.0;
      const double bound = (code == 15 && !std::is_same_v<Block, moet::detail::BlockQ8_0> ? 1.0 : 0.5) * d +
                           std::ldexp(1.0, -10) * (d * max_code + m) + 1e-30;
      INFO("trial " << trial << " i " << i << " x " << x[i] << " value " << got << " d " << d);
      REQUIRE(err <= bound * (1.0 + 1e-6));
      if constexpr (std::is_same_v<Block, moet::detail::BlockQ8_0>) {
        REQUIRE((code >= -127 && code <= 127));
      } else {
        REQUIRE((code >= 0 && code <= 15));
      }
    }
  }
  // An all-zero block: scale 0, every value exactly 0.
  const float zeros[kQuantBlock] = {};
  Block block{};
  moet::detail::quantize_block(zeros, block);
  CHECK(moet::detail::from_f16(block.d) == 0.0f);
  for (Index i = 0; i < kQuantBlock; ++i) CHECK(moet::detail::block_value(block, i) == 0.0f);
}

TEMPLATE_TEST_CASE("Block-format packing holds each column's quantised blocks, every level",
                   "[quant][pack][every_level]", moet::detail::Q8_0, moet::detail::Q4_0,
                   moet::detail::Q4_1) {
  using W = TestType;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  for (const Index k : {1, 32, 33, 70}) {
    for (const Index n : {1, 15, 33}) {
      const Matrix b = random_matrix(k, n, static_cast<std::uint32_t>(k * 100 + n));
      const moet::detail::PackedMatrix<W> packed(b, isa);
      INFO("k " << k << " n " << n);
      REQUIRE(packed.rows() == k);
      REQUIRE(packed.cols() == n);
      for (Index j = 0; j < n; ++j) {
        for (Index b0 = 0; b0 < k; b0 += kQuantBlock) {
          float x[kQuantBlock] = {};
          for (Index i = 0; i < kQuantBlock && b0 + i < k; ++i) x[i] = b(b0 + i, j);
          typename W::Block block{};
          moet::detail::quantize_block(x, block);
          for (Index i = 0; i < kQuantBlock && b0 + i < k; ++i) {
            REQUIRE(packed.packed_coeff(b0 + i, j) == moet::detail::block_value(block, i));
          }
        }
      }
    }
  }
  // Non-finite weights are refused with the position, and so is a block whose scale (or
  // minimum) does not fit half precision.
  Matrix bad = random_matrix(40, 3, 1);
  bad(35, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(moet::detail::PackedMatrix<W>(bad, isa),
                    Catch::Contains("finite") && Catch::Contains("row 35, column 2"));
  Matrix huge = random_matrix(40, 3, 2);
  huge(3, 1) = -3e9f;
  CHECK_THROWS_WITH(moet::detail::PackedMatrix<W>(huge, isa),
                    Catch::Contains("half precision") && Catch::Contains("column 1"));
}

TEMPLATE_TEST_CASE(
    "Block-format gemm_packed and glu_packed equal double products of what the "
    "level multiplies",
    "[quant][gemm][every_level]", moet::detail::Q8_0, moet::detail::Q4_0, moet::detail::Q4_1) {
  using W = TestType;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa) << " " << W::kName);
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 17;
  for (const Index k : kInner) {
    for (const Index n_cols : kCols) {
      const Matrix b = random_matrix(k, n_cols, seed++);
      const Matrix wu = random_matrix(k, n_cols, seed++);
      const moet::detail::PackedMatrix<W> packed(b, isa);
      const moet::detail::PackedGluMatrix<W> glu(b, wu, isa);
      const Matrix bq = dequantized(packed);
      const Matrix gq = dequantized_glu(glu, false);
      const Matrix uq = dequantized_glu(glu, true);
      for (const Index n : kRows) {
        const Matrix a = random_matrix(n, k, seed++);
        const Matrix ax = integer_dot(isa) ? quantized_activations(a) : a;
        INFO("n " << n << " k " << k << " cols " << n_cols);
        Matrix c(n, n_cols);
        moet::detail::gemm_packed(a, packed, c, false, scratch);
        REQUIRE(scaled_error(c, naive_product(ax, bq), ax, bq) <= 1e-5);
        const Matrix c0 = random_matrix(n, n_cols, seed++);
        Matrix acc = c0;
        moet::detail::gemm_packed(a, packed, acc, true, scratch);
        REQUIRE(accumulate_error_ratio(acc, ax, bq, c0) <= 1.0);
        if (n % 3 == 0 || n < 3) {
          Matrix h(n, n_cols);
          moet::detail::glu_packed<moet::Silu>(a, glu, h, scratch);
          REQUIRE(glu_error_ratio(h, ax, gq, uq, silu_ref) <= 1.0);
          // An activation without a vector form (the epilogue's lane-by-lane path).
          moet::detail::glu_packed<moet::Gelu>(a, glu, h, scratch);
          REQUIRE(glu_error_ratio(h, ax, gq, uq, gelu_ref) <= 1.0);
        }
      }
    }
  }
}

// Packs `blocks` (`n_cols` columns of `k` rows each, GGUF's [out][in] order) for `isa` and
// checks gemm_packed against the double product of what the level multiplies, for `n` rows of
// +-1 activations (quantised to +-127), row r taking the signs of column (r * step) % n_cols so
// that every product of that column is positive: the largest sums the blocks can make.
template <class W>
void check_sign_aligned_rows(KernelIsa isa, const std::vector<typename W::Block>& blocks, Index k,
                             Index n_cols, std::initializer_list<Index> rows, Index step) {
  moet::detail::PackedMatrix<W> packed;
  packed.pack_blocks(std::span<const typename W::Block>(blocks), k, n_cols, isa);
  const Matrix bq = dequantized(packed);
  moet::detail::Buffer<float> scratch;
  for (const Index n : rows) {
    Matrix a(n, k);
    for (Index r = 0; r < n; ++r) {
      for (Index i = 0; i < k; ++i) a(r, i) = bq(i, (r * step) % n_cols) < 0.0f ? -1.0f : 1.0f;
    }
    const Matrix ax = integer_dot(isa) ? quantized_activations(a) : a;
    Matrix c(n, n_cols);
    moet::detail::gemm_packed(a, packed, c, false, scratch);
    INFO("rows " << n);
    CHECK(scaled_error(c, naive_product(ax, bq), ax, bq) <= 1e-5);
  }
}

TEST_CASE("8-bit blocks at the code extremes multiply exactly on every level",
          "[quant][gemm][every_level]") {
  // A file's q8_0 blocks may hold -128, which moet's own quantiser never writes, and rows of
  // +-127 against +-127 activations make the largest pair sums: 2 * 128 * 127 = 32512. A byte
  // dot product that saturates 16-bit pair sums (vpmaddubsw on unsigned codes q + 128) or
  // negates -128 in 8 bits would miss the double product here.
  using Block = moet::detail::BlockQ8_0;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index k = 96;  // 3 blocks
  const Index n_cols = 33;
  const Index nb = k / kQuantBlock;
  std::vector<Block> blocks(static_cast<std::size_t>(n_cols * nb));
  for (Index j = 0; j < n_cols; ++j) {
    for (Index blk = 0; blk < nb; ++blk) {
      Block& block = blocks[static_cast<std::size_t>(j * nb + blk)];
      block.d = moet::detail::to_f16(0.25f * static_cast<float>(1 + (j + blk) % 3));
      for (Index i = 0; i < kQuantBlock; ++i) {
        // Pairs of neighbours (the pairs vpmaddubsw sums): (-128, -128), (127, 127),
        // (-128, 127), (-127, 1 or -128), rotating with the pair, column and block.
        const Index pick = (i / 2 + j + blk) % 4;
        const bool second = i % 2 == 1;
        block.qs[i] = static_cast<std::int8_t>(pick == 0   ? -128
                                               : pick == 1 ? 127
                                               : pick == 2 ? (second ? 127 : -128)
                                               : second    ? (j % 2 == 0 ? -128 : 1)
                                                           : -127);
      }
    }
  }
  REQUIRE(moet::detail::block_value(blocks[0], 0) == -128.0f * 0.25f);
  check_sign_aligned_rows<moet::detail::Q8_0>(isa, blocks, k, n_cols, {1, 2, 3, 5, 9}, 7);
}

TEST_CASE("4-bit blocks at the code extremes multiply exactly on every level",
          "[quant][gemm][every_level]") {
  // Codes 15 (q = 7) or 0 (q = -8) throughout, against +-127 activations of the same sign: the
  // largest sums a block can make (32 * 15 * 127 = 60960 in unsigned codes), which a kernel
  // that keeps more than a block's pair sums in 16 bits would overflow.
  using Block = moet::detail::BlockQ4_0;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index k = 128;  // 4 blocks
  const Index n_cols = 17;
  const Index nb = k / kQuantBlock;
  std::vector<Block> blocks(static_cast<std::size_t>(n_cols * nb));
  for (Index j = 0; j < n_cols; ++j) {
    for (Index blk = 0; blk < nb; ++blk) {
      Block& block = blocks[static_cast<std::size_t>(j * nb + blk)];
      block.d = moet::detail::to_f16(0.5f);
      const bool high = (j + blk / 2) % 2 == 0;  // columns alternate between 15 and 0
      for (std::uint8_t& byte : block.qs) byte = high ? 0xff : 0x00;
    }
  }
  REQUIRE(moet::detail::block_value(blocks[0], 0) == 3.5f);
  REQUIRE(moet::detail::block_value(blocks[static_cast<std::size_t>(nb)], 0) == -4.0f);
  check_sign_aligned_rows<moet::detail::Q4_0>(isa, blocks, k, n_cols, {1, 4, 6}, 5);
}

TEMPLATE_TEST_CASE("Block-format rows are bit-identical alone and inside any block",
                   "[quant][gemm][determinism][every_level]", moet::detail::Q8_0,
                   moet::detail::Q4_0, moet::detail::Q4_1) {
  using W = TestType;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Matrix a = random_matrix(157, 600, 3);
  const Matrix b = random_matrix(600, 100, 4);
  const moet::detail::PackedMatrix<W> packed(b, isa);
  const moet::detail::PackedGluMatrix<W> glu(b, random_matrix(600, 100, 5), isa);
  moet::detail::Buffer<float> scratch;
  Matrix c_all(157, 100);
  Matrix h_all(157, 100);
  moet::detail::gemm_packed(a, packed, c_all, false, scratch);
  moet::detail::glu_packed(a, glu, h_all, scratch);
  for (const Index n : {1, 2, 3, 7, 8, 9, 13, 64}) {
    for (const Index first : {Index{0}, Index{5}, 157 - n}) {
      Matrix c(n, 100);
      Matrix h(n, 100);
      moet::detail::gemm_packed(a.middleRows(first, n), packed, c, false, scratch);
      moet::detail::glu_packed(a.middleRows(first, n), glu, h, scratch);
      INFO("rows " << n << " from " << first);
      REQUIRE(bit_identical(c, c_all.middleRows(first, n)));
      REQUIRE(bit_identical(h, h_all.middleRows(first, n)));
    }
  }
}

TEMPLATE_TEST_CASE("Every integer-dot level gives the bits of every other",
                   "[quant][gemm][determinism][every_level]", moet::detail::Q8_0,
                   moet::detail::Q4_0, moet::detail::Q4_1) {
  // vpmaddubsw + vpmaddwd (kAvx2, kAvx512) make the int32 block sums of vpdpbusd exactly and
  // every level then runs one float chain per output over the blocks in order, whatever its
  // width and tiles: the products must agree bit for bit (the first integer level this CPU
  // has is the reference). The double-product test above bounds each level; this one catches
  // a level whose integer sums are off by less than that bound (a saturated pair, a lost sign).
  using W = TestType;
  std::vector<KernelIsa> levels;
  for (const KernelIsa isa : supported_isas()) {
    if (integer_dot(isa)) levels.push_back(isa);
  }
  if (levels.size() < 2) {
    WARN("skipped: fewer than two integer-dot levels on this CPU");
    return;
  }
  moet::detail::Buffer<float> scratch;
  std::uint32_t seed = 40;
  for (const Index k : {Index{32}, Index{100}, Index{520}}) {
    for (const Index n_cols : {Index{17}, Index{100}}) {
      const Matrix b = random_matrix(k, n_cols, seed++);
      const Matrix wu = random_matrix(k, n_cols, seed++);
      for (const Index n : {Index{1}, Index{2}, Index{5}, Index{13}, Index{150}}) {
        const Matrix a = random_matrix(n, k, seed++);
        Matrix c_ref(n, n_cols);
        Matrix h_ref(n, n_cols);
        for (std::size_t i = 0; i < levels.size(); ++i) {
          const moet::detail::PackedMatrix<W> packed(b, levels[i]);
          const moet::detail::PackedGluMatrix<W> glu(b, wu, levels[i]);
          Matrix c(n, n_cols);
          Matrix h(n, n_cols);
          moet::detail::gemm_packed(a, packed, c, false, scratch);
          moet::detail::glu_packed(a, glu, h, scratch);
          if (i == 0) {
            c_ref = c;
            h_ref = h;
            continue;
          }
          INFO(kernel_isa_name(levels[i]) << " against " << kernel_isa_name(levels[0]) << ": n "
                                          << n << " k " << k << " cols " << n_cols);
          REQUIRE(bit_identical(c, c_ref));
          REQUIRE(bit_identical(h, h_ref));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("A product over some column panels writes exactly those columns, bit for bit",
                   "[gemm][quant][determinism][panels][every_level]", float, moet::detail::Bf16,
                   moet::detail::Q8_0, moet::detail::Q4_0, moet::detail::Q4_1) {
  using W = TestType;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  const Index n = GENERATE(1, 3, 130);
  INFO(kernel_isa_name(isa) << ", " << n << " rows");
  const Index k = 600;
  const Index cols = 100;  // a partial last panel at every level
  const Matrix a = random_matrix(n, k, 7);
  const moet::detail::PackedMatrix<W> packed(random_matrix(k, cols, 8), isa);
  const moet::detail::PackedGluMatrix<W> glu(random_matrix(k, cols, 9), random_matrix(k, cols, 10),
                                             isa);
  moet::detail::Buffer<float> scratch;
  Matrix c_all(n, cols);
  Matrix h_all(n, cols);
  moet::detail::gemm_packed(a, packed, c_all, false, scratch);
  moet::detail::glu_packed(a, glu, h_all, scratch);
  const Index sentinel_bits = 0x7fc01234;  // a NaN no kernel writes
  const float sentinel = std::bit_cast<float>(static_cast<std::uint32_t>(sentinel_bits));
  for (const auto* matrix : {"gemm", "glu"}) {
    const bool is_glu = std::string_view(matrix) == "glu";
    const Index panels = is_glu ? glu.num_panels() : packed.num_panels();
    const Index width = is_glu ? glu.panel_width() / 2 : packed.panel_width();
    // Every split into 1, 2, 3 and `panels` pieces, and an empty range.
    for (const Index pieces : {Index{1}, Index{2}, Index{3}, panels, panels + 1}) {
      Matrix out = Matrix::Constant(n, cols, sentinel);
      for (Index piece = 0; piece < pieces; ++piece) {
        const moet::PanelRange range{piece * panels / pieces, (piece + 1) * panels / pieces};
        Matrix before = out;
        if (is_glu) {
          moet::detail::glu_packed(a, glu, out, scratch, range);
        } else {
          moet::detail::gemm_packed(a, packed, out, false, scratch, range);
        }
        // Columns outside the range are untouched.
        const Index c0 = std::min(cols, range.begin * width);
        const Index c1 = std::min(cols, range.end * width);
        INFO(matrix << ": piece " << piece << " of " << pieces << ", columns [" << c0 << ", " << c1
                    << ")");
        REQUIRE(bit_identical(out.leftCols(c0), before.leftCols(c0)));
        REQUIRE(bit_identical(out.rightCols(cols - c1), before.rightCols(cols - c1)));
      }
      INFO(matrix << " in " << pieces << " pieces");
      REQUIRE(bit_identical(out, is_glu ? h_all : c_all));
    }
    // A range outside the panels is an error naming the product.
    Matrix out(n, cols);
    const auto bad = [&](moet::PanelRange range) {
      if (is_glu) {
        moet::detail::glu_packed(a, glu, out, scratch, range);
      } else {
        moet::detail::gemm_packed(a, packed, out, false, scratch, range);
      }
    };
    REQUIRE_THROWS_WITH(
        bad({0, panels + 1}),
        Catch::Contains(is_glu ? "glu_packed" : "gemm_packed") && Catch::Contains("panel range"));
    REQUIRE_THROWS_AS(bad({2, 1}), moet::Error);
    REQUIRE_THROWS_AS(bad({-1, 1}), moet::Error);
  }
}

namespace {

// A bank's expert `e` on rows `x` by naive double loops from the bank's float weights,
// quantised here to `W`'s blocks per column (PackedMatrix on the portable level, whose values
// the packing test above checks) and dequantised; the rows are 8-bit block-quantised first on
// the integer-dot level, as the kernels do. `Act` is SiLU (GLU) applied to the gate.
template <class W>
Matrix quantized_weights(const Eigen::Map<const moet::RowMatrix<float>>& w) {
  return dequantized(moet::detail::PackedMatrix<W>(w, KernelIsa::kPortable));
}

template <class W>
MatrixD glu_expert_reference(const moet::SwiGluExperts<float>& bank, Index e, const Matrix& x) {
  const bool idot = integer_dot(moet::kernel_isa());
  const Matrix wg = quantized_weights<W>(bank.gate_weights(e));
  const Matrix wu = quantized_weights<W>(bank.up_weights(e));
  const Matrix wd = quantized_weights<W>(bank.down_weights(e));
  const Matrix xq = idot ? quantized_activations(x) : x;
  const MatrixD g = naive_product(xq, wg);
  const MatrixD u = naive_product(xq, wu);
  Matrix h(x.rows(), wg.cols());
  for (Index i = 0; i < h.rows(); ++i) {
    for (Index j = 0; j < h.cols(); ++j) h(i, j) = static_cast<float>(silu_ref(g(i, j)) * u(i, j));
  }
  const Matrix hq = idot ? quantized_activations(h) : h;
  return naive_product(hq, wd);
}

}  // namespace

TEMPLATE_TEST_CASE("Block-format SwiGLU banks equal naive experts of their quantised weights",
                   "[quant][experts]", moet::detail::Q8_0, moet::detail::Q4_0,
                   moet::detail::Q4_1) {
  using W = TestType;
  const moet::WeightFormat format = std::is_same_v<W, moet::detail::Q8_0>   ? moet::WeightFormat::kQ8_0
                                    : std::is_same_v<W, moet::detail::Q4_0> ? moet::WeightFormat::kQ4_0
                                                                            : moet::WeightFormat::kQ4_1;
  INFO(W::kName << " on " << kernel_isa_name(moet::kernel_isa()));
  const moet::SwiGluExperts<float> bank(
      {.model_dim = 96, .hidden_dim = 160, .num_experts = 2, .init_seed = 5, .weight_format = format});
  REQUIRE(bank.uses_packed_kernels());
  moet::SwiGluExperts<float>::Scratch scratch;
  for (const Index n : {1, 7, 40}) {
    const Matrix x = random_matrix(n, 96, static_cast<std::uint32_t>(n));
    for (Index e = 0; e < 2; ++e) {
      Matrix y(n, 96);
      bank.forward(e, x, y, scratch);
      const MatrixD want = glu_expert_reference<W>(bank, e, x);
      // The hidden rows are rounded to float (and on the integer-dot level quantised from
      // float) once in either path; a code can flip at a rounding tie, so allow a few 1e-4 of
      // the output's scale.
      const double err = (y.cast<double>() - want).norm() / want.norm();
      INFO("n " << n << " expert " << e << " relative error " << err);
      CHECK(err <= 2e-3);
    }
  }
}

namespace {

// Relative Frobenius error of a bank of `format` against the float bank with the same weights,
// and the worst element relative to the output's RMS.
template <class Bank>
double format_error(typename Bank::Options options, moet::WeightFormat format, Index n,
                    double& worst_rel) {
  options.weight_format = moet::WeightFormat::kF32;
  const Bank f32(options);
  options.weight_format = format;
  const Bank other(options);
  typename Bank::Scratch scratch;
  double err2 = 0.0;
  double ref2 = 0.0;
  worst_rel = 0.0;
  for (Index e = 0; e < f32.num_experts(); ++e) {
    const Matrix x = random_matrix(n, f32.model_dim(), static_cast<std::uint32_t>(60 + e));
    Matrix y32(n, f32.model_dim());
    Matrix yq(n, f32.model_dim());
    f32.forward(e, x, y32, scratch);
    other.forward(e, x, yq, scratch);
    const double rms = std::sqrt(y32.cast<double>().squaredNorm() / static_cast<double>(y32.size()));
    err2 += (yq - y32).cast<double>().squaredNorm();
    ref2 += y32.cast<double>().squaredNorm();
    worst_rel = std::max(worst_rel, (yq - y32).cwiseAbs().maxCoeff() / rms);
  }
  return std::sqrt(err2 / ref2);
}

}  // namespace

TEST_CASE("Block-format banks against float banks with the same weights (README's accuracy)",
          "[quant][experts]") {
  // Random normal weights (the banks' initialisation); the README quotes these numbers.
  struct Bound {
    moet::WeightFormat format;
    double frobenius;
    double worst;
  };
  for (const Bound b : {Bound{moet::WeightFormat::kQ8_0, 0.03, 0.2},
                        Bound{moet::WeightFormat::kQ4_0, 0.25, 1.5},
                        Bound{moet::WeightFormat::kQ4_1, 0.25, 1.5}}) {
    double worst = 0.0;
    const double glu = format_error<moet::SwiGluExperts<float>>(
        {.model_dim = 512, .hidden_dim = 1024, .num_experts = 2, .init_seed = 3}, b.format, 33,
        worst);
    WARN("SwiGLU " << moet::weight_format_name(b.format) << " vs f32: relative Frobenius error "
                   << glu << ", worst element / RMS " << worst);
    CHECK(glu > 0.0);
    CHECK(glu < b.frobenius);
    CHECK(worst < b.worst);
    const double ffn = format_error<moet::FfnExperts<float, moet::Gelu>>(
        {.model_dim = 256, .hidden_dim = 512, .num_experts = 2, .init_seed = 4}, b.format, 20,
        worst);
    WARN("FFN-GELU " << moet::weight_format_name(b.format) << " vs f32: relative Frobenius error "
                     << ffn << ", worst element / RMS " << worst);
    CHECK(ffn > 0.0);
    CHECK(ffn < b.frobenius);
    CHECK(worst < b.worst);
  }
}

TEMPLATE_TEST_CASE("Ready blocks pack without re-quantising (GGUF's [out][in] rows of blocks)",
                   "[quant][pack][every_level]", moet::detail::Q8_0, moet::detail::Q4_0,
                   moet::detail::Q4_1) {
  using W = TestType;
  using Block = typename W::Block;
  const KernelIsa isa = GENERATE(from_range(supported_isas()));
  INFO(kernel_isa_name(isa));
  const Index k = 70;  // 3 blocks per column, the last partial
  const Index n = 37;
  const Index nb = 3;
  const Matrix b = random_matrix(k, n, 8);
  // The file's blocks: column j of the (K, N) matrix is row j of [N][K].
  std::vector<Block> blocks(static_cast<std::size_t>(n * nb));
  for (Index j = 0; j < n; ++j) {
    for (Index blk = 0; blk < nb; ++blk) {
      float x[kQuantBlock] = {};
      for (Index i = 0; i < kQuantBlock && blk * kQuantBlock + i < k; ++i) x[i] = b(blk * kQuantBlock + i, j);
      moet::detail::quantize_block(x, blocks[static_cast<std::size_t>(j * nb + blk)]);
    }
  }
  moet::detail::PackedMatrix<W> from_blocks;
  from_blocks.pack_blocks(std::span<const Block>(blocks), k, n, isa);
  const moet::detail::PackedMatrix<W> from_floats(b, isa);
  REQUIRE(from_blocks.bytes() == from_floats.bytes());
  CHECK(std::memcmp(from_blocks.data(), from_floats.data(), from_blocks.bytes()) == 0);
  // The GLU halves.
  moet::detail::PackedGluMatrix<W> glu;
  glu.reset(k, n, isa);
  glu.pack_gate_blocks(std::span<const Block>(blocks));
  glu.pack_up_blocks(std::span<const Block>(blocks));
  const moet::detail::PackedGluMatrix<W> glu_floats(b, b, isa);
  CHECK(std::memcmp(glu.data(), glu_floats.data(), glu.bytes()) == 0);
  // A wrong count and a non-finite scale are refused.
  CHECK_THROWS_WITH(from_blocks.pack_blocks(std::span<const Block>(blocks).first(10), k, n, isa),
                    Catch::Contains("blocks"));
  blocks[5].d = moet::detail::to_f16(std::numeric_limits<float>::infinity());
  CHECK_THROWS_WITH(from_blocks.pack_blocks(std::span<const Block>(blocks), k, n, isa),
                    Catch::Contains("non-finite scale"));
}

}  // namespace test_gemm_quant
