// The row packers of every kernel level (kernels/row_pack.inl: bf16 rounding and 8-bit block
// quantisation of the left-hand rows, vectorised on the x86 levels) against the scalar forms of
// kernels/packed.hpp, bit for bit, over odd depths, every row-group size and the values where
// rounding is delicate: ties, NaN, infinities, subnormals, the largest finite floats.
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/detail/gemm.hpp"

#include "gemm_test_util.hpp"

namespace test_row_pack {  // one per file: the unity build puts several files in one TU

namespace {

using namespace moet_test;  // NOLINT(google-build-using-namespace)
using moet::detail::Bf16;
using moet::detail::kQuantBlock;

// Calls `f(bf16_packer, quant_packer)` with the packers of `isa`.
template <class F>
void with_level(KernelIsa isa, F&& f) {
  namespace d = moet::detail;
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case KernelIsa::kAvx512Bf16:
      return f(&d::isa_avx512bf16::pack_bf16_row_groups<>,
               &d::isa_avx512bf16::pack_quantized_rows<>);
    case KernelIsa::kAvx512Vnni:
      return f(&d::isa_avx512vnni::pack_bf16_row_groups<>,
               &d::isa_avx512vnni::pack_quantized_rows<>);
    case KernelIsa::kAvx512:
      return f(&d::isa_avx512::pack_bf16_row_groups<>, &d::isa_avx512::pack_quantized_rows<>);
    case KernelIsa::kAvx2Vnni:
      return f(&d::isa_avx2vnni::pack_bf16_row_groups<>, &d::isa_avx2vnni::pack_quantized_rows<>);
    case KernelIsa::kAvx2:
      return f(&d::isa_avx2::pack_bf16_row_groups<>, &d::isa_avx2::pack_quantized_rows<>);
#endif
    default:
      return f(&d::isa_portable::pack_bf16_row_groups<>, &d::isa_portable::pack_quantized_rows<>);
  }
}

// The float-row bf16 packer of `isa` (the rows of bf16 products on levels without
// `vdpbf16ps`).
using FloatRowPacker = void (*)(const float*, Index, Index, Index, Index, float*, Index);
FloatRowPacker float_row_packer(KernelIsa isa) {
  namespace d = moet::detail;
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case KernelIsa::kAvx512Bf16:
      return &d::isa_avx512bf16::pack_bf16_float_row_groups<>;
    case KernelIsa::kAvx512Vnni:
      return &d::isa_avx512vnni::pack_bf16_float_row_groups<>;
    case KernelIsa::kAvx512:
      return &d::isa_avx512::pack_bf16_float_row_groups<>;
    case KernelIsa::kAvx2Vnni:
      return &d::isa_avx2vnni::pack_bf16_float_row_groups<>;
    case KernelIsa::kAvx2:
      return &d::isa_avx2::pack_bf16_float_row_groups<>;
#endif
    default:
      return &d::isa_portable::pack_bf16_float_row_groups<>;
  }
}

// Rows of random floats of every magnitude mixed with the delicate values; with `quant`, finite
// multiples of 1/2 in [-127, 127] (see the quantisation case).
std::vector<float> test_rows(Index rows, Index k, std::uint32_t seed, bool quant) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::uint32_t> any;
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> special = {0.0f,
                                      -0.0f,
                                      1.0f + 0x1p-8f,
                                      1.0f + 0x3p-8f,
                                      -(1.0f + 0x1p-8f),
                                      0x1p-130f,
                                      -0x1p-140f,
                                      0x1.fffffep127f,
                                      -0x1.ffffp127f,
                                      inf,
                                      -inf,
                                      std::numeric_limits<float>::quiet_NaN(),
                                      std::bit_cast<float>(0x7f800001U),
                                      std::bit_cast<float>(0xffc00001U)};
  std::vector<float> a(static_cast<std::size_t>(rows * k));
  for (auto& v : a) {
    if (quant) {
      v = std::round(unit(gen) * 254.0f) * 0.5f;
    } else {
      const auto pick = any(gen) % 4;
      v = pick == 0   ? special[any(gen) % special.size()]
          : pick == 1 ? std::bit_cast<float>(any(gen))
                      : unit(gen);
    }
  }
  return a;
}

const std::vector<Index> kDepths = {1, 2, 15, 16, 17, 31, 32, 33, 255, 256, 257, 513, 1031};
const std::vector<Index> kRowCounts = {1, 2, 3, 5, 8, 13};

// Calls `f(first, m, r, kk)` for every row `r` of every packed row group (rows `first .. first +
// m`) of `rows` rows in `groups` groups, and every column `kk < depth`, with the group and the
// position in INFO.
template <class F>
void for_each_packed(Index rows, Index groups, Index depth, F&& f) {
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    moet::detail::row_group(rows, groups, g, first, m);
    for (Index r = 0; r < m; ++r) {
      for (Index kk = 0; kk < depth; ++kk) {
        INFO("group " << g << " row " << r << " column " << kk);
        f(first, m, r, kk);
      }
    }
  }
}

}  // namespace

TEST_CASE("bf16 row packing equals the scalar packing bit for bit on every level", "[gemm][bf16]") {
  for (const KernelIsa isa : supported_isas()) {
    with_level(isa, [&](auto bf16_packer, auto) {
      for (const Index k : kDepths) {
        for (const Index rows : kRowCounts) {
          for (const Index groups : {Index{1}, (rows + 1) / 2}) {
            const Index lda = k + 3;  // a row stride past the row
            const auto a = test_rows(rows, lda, static_cast<std::uint32_t>(k * 31 + rows), false);
            const Index size = rows * moet::detail::padded_depth<Bf16>(k);
            std::vector<Bf16> want(static_cast<std::size_t>(size), Bf16{0x5555});
            std::vector<Bf16> got(static_cast<std::size_t>(size), Bf16{0x7777});
            moet::detail::pack_row_groups(a.data(), lda, rows, k, groups, want.data());
            bf16_packer(a.data(), lda, rows, k, groups, got.data(), 1);
            INFO(kernel_isa_name(isa) << ": k " << k << " rows " << rows << " groups " << groups);
            REQUIRE(std::memcmp(want.data(), got.data(), want.size() * sizeof(Bf16)) == 0);
          }
        }
      }
    });
  }
}

TEST_CASE("bf16 row packing rounds like to_bf16 and keeps NaN a NaN", "[gemm][bf16]") {
  // An independent check of the values themselves (k = 16: one vector on the x86 levels).
  const std::vector<float> row = {1.0f + 0x1p-8f,
                                  1.0f + 0x3p-8f,
                                  -(1.0f + 0x1p-8f),
                                  0x1p-130f,
                                  std::numeric_limits<float>::infinity(),
                                  0x1.fffffep127f,
                                  std::bit_cast<float>(0x7f800001U),
                                  2.0f,
                                  0x1.fep0f,
                                  0x1.ff8p0f,
                                  -0.0f,
                                  3.0f,
                                  1.0f + 0x1p-7f + 0x1p-9f,
                                  5.0f,
                                  6.0f,
                                  7.0f};
  // Hand-rounded: ties go to the even mantissa, 0x1.ff8 rounds up to 2, the largest float to
  // infinity, the signalling NaN becomes a quiet one.
  const std::vector<std::uint16_t> want = {0x3f80, 0x3f82, 0xbf80, 0x0008, 0x7f80, 0x7f80,
                                           0x7fc0, 0x4000, 0x3fff, 0x4000, 0x8000, 0x4040,
                                           0x3f81, 0x40a0, 0x40c0, 0x40e0};
  for (const KernelIsa isa : supported_isas()) {
    with_level(isa, [&](auto bf16_packer, auto) {
      std::vector<Bf16> got(16);
      bf16_packer(row.data(), 16, 1, 16, 1, got.data(), 1);
      for (std::size_t i = 0; i < want.size(); ++i) {
        INFO(kernel_isa_name(isa) << " element " << i);
        CHECK(got[i].bits == want[i]);
      }
    });
  }
}

TEST_CASE("8-bit row quantisation equals the scalar quantisation bit for bit on every level",
          "[gemm][quant]") {
  for (const KernelIsa isa : supported_isas()) {
    with_level(isa, [&](auto, auto quant_packer) {
      for (const Index k : kDepths) {
        for (const Index rows : kRowCounts) {
          for (const Index groups : {Index{1}, (rows + 1) / 2}) {
            const Index lda = k + 5;
            auto a = test_rows(rows, lda, static_cast<std::uint32_t>(k * 17 + rows), true);
            const Index kp = (k + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
            const Index nb = kp / kQuantBlock;
            for (Index r = 0; r < rows; ++r) {
              for (Index b = 0; b < nb; ++b) {
                // Odd rows: a block maximum of 127 makes the scale 1, so the halves are ties.
                const Index at = r * lda + b * kQuantBlock;
                if (r % 2 == 1) a[static_cast<std::size_t>(at)] = -127.0f;
              }
              if (r % 4 == 0) {  // a zero block: scale 0, codes 0
                for (Index i = 0; i < std::min<Index>(k, kQuantBlock); ++i) {
                  a[static_cast<std::size_t>(r * lda + i)] = 0.0f;
                }
              }
            }
            std::vector<std::int8_t> want_q(static_cast<std::size_t>(rows * kp), 11);
            std::vector<std::int8_t> got_q(want_q.size(), 22);
            std::vector<float> want_d(static_cast<std::size_t>(rows * nb), -1.0f);
            std::vector<float> got_d(want_d.size(), -2.0f);
            std::vector<std::int32_t> want_s(want_d.size(), -1);
            std::vector<std::int32_t> got_s(want_d.size(), -2);
            moet::detail::pack_quantized_row_groups(a.data(), lda, rows, k, groups, want_q.data(),
                                                    want_d.data(), want_s.data());
            quant_packer(a.data(), lda, rows, k, groups, got_q.data(), got_d.data(), got_s.data(),
                         1);
            INFO(kernel_isa_name(isa) << ": k " << k << " rows " << rows << " groups " << groups);
            REQUIRE(want_q == got_q);
            REQUIRE(std::memcmp(want_d.data(), got_d.data(), want_d.size() * sizeof(float)) == 0);
            REQUIRE(want_s == got_s);
          }
        }
      }
    });
  }
}

TEST_CASE("8-bit row quantisation rounds halves away from zero", "[gemm][quant]") {
  // One block with max|x| = 127: the scale is 1 and the codes are x rounded half away from 0.
  std::vector<float> row(kQuantBlock, 0.0f);
  const std::vector<float> values = {127.0f, 0.5f, -0.5f, 1.5f, -2.5f, 2.4999998f, 126.5f, -126.5f};
  const std::vector<int> want = {127, 1, -1, 2, -3, 2, 127, -127};
  std::copy(values.begin(), values.end(), row.begin());
  for (const KernelIsa isa : supported_isas()) {
    with_level(isa, [&](auto, auto quant_packer) {
      std::vector<std::int8_t> q(kQuantBlock);
      float d = 0.0f;
      std::int32_t sum = 0;
      quant_packer(row.data(), kQuantBlock, 1, kQuantBlock, 1, q.data(), &d, &sum, 1);
      CHECK(d == 1.0f);
      int want_sum = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        INFO(kernel_isa_name(isa) << " element " << i);
        // Layout [block][4-row group][m = 1][4]: element i at i.
        CHECK(int{q[i]} == want[i]);
        want_sum += want[i];
      }
      CHECK(sum == want_sum);
    });
  }
}

TEST_CASE("bf16 float-row packing holds the bf16 pairs' values bit for bit on every level",
          "[gemm][bf16]") {
  // Element (kk, r) of a float-row group ([kp][m]) is from_bf16 of element (kk / 2, r, kk % 2)
  // of the scalar bf16 pair packing ([kp / 2][m][2]); the pad of an odd k is zero in both.
  for (const KernelIsa isa : supported_isas()) {
    const FloatRowPacker packer = float_row_packer(isa);
    for (const Index k : kDepths) {
      for (const Index rows : kRowCounts) {
        for (const Index k_stride : {Index{1}, rows + 2}) {
          const Index groups = (rows + 1) / 2;
          // k_stride 1: rows `lda` apart; otherwise column kk of row r at r + kk k_stride.
          const Index lda = k_stride == 1 ? k + 3 : 1;
          const auto a = test_rows(k_stride == 1 ? rows : k, k_stride == 1 ? lda : k_stride,
                                   static_cast<std::uint32_t>(k * 7 + rows), false);
          const Index kp = moet::detail::padded_depth<Bf16>(k);
          std::vector<Bf16> pairs(static_cast<std::size_t>(rows * kp), Bf16{0x5555});
          std::vector<float> got(static_cast<std::size_t>(rows * kp), 7.0f);
          moet::detail::pack_row_groups(a.data(), lda, rows, k, groups, pairs.data(), -1, k_stride);
          packer(a.data(), lda, rows, k, groups, got.data(), k_stride);
          INFO(kernel_isa_name(isa) << ": k " << k << " rows " << rows << " k_stride " << k_stride);
          for_each_packed(rows, groups, kp, [&](Index first, Index m, Index r, Index kk) {
            const Bf16 pair =
                pairs[static_cast<std::size_t>(first * kp + (kk / 2) * 2 * m + 2 * r + kk % 2)];
            const float want = moet::detail::from_bf16(pair);
            const float value = got[static_cast<std::size_t>(first * kp + kk * m + r)];
            REQUIRE(std::bit_cast<std::uint32_t>(value) == std::bit_cast<std::uint32_t>(want));
          });
        }
      }
    }
  }
}

TEST_CASE("row packing of A given as its transpose puts A(r, kk) where the layouts say", "[gemm]") {
  // The oracle is the layouts' definition (kernels/packed.hpp): float group g at
  // dst + first kp, element (kk, r) at kk m + r, columns [k, kp) zero; bf16 at
  // (kk / 2) 2 m + 2 r + kk % 2, an odd k's pad zero. A(r, kk) = a_t[kk k_stride + r].
  for (const Index k : {Index{1}, Index{2}, Index{7}, Index{33}, Index{130}}) {
    for (const Index rows : kRowCounts) {
      const Index k_stride = rows + 5;  // a row of the transpose longer than A's columns
      const auto a_t = test_rows(k, k_stride, static_cast<std::uint32_t>(k * 13 + rows), false);
      for (const Index groups : {Index{1}, (rows + 1) / 2, rows}) {
        const Index kp = k + 3;  // the float form's zero pad
        std::vector<float> f(static_cast<std::size_t>(rows * kp), 7.0f);
        moet::detail::pack_row_groups(a_t.data(), 1, rows, k, groups, f.data(), kp, k_stride);
        const Index kb = moet::detail::padded_depth<Bf16>(k);
        std::vector<Bf16> b(static_cast<std::size_t>(rows * kb), Bf16{0x5555});
        moet::detail::pack_row_groups(a_t.data(), 1, rows, k, groups, b.data(), -1, k_stride);
        INFO("k " << k << " rows " << rows << " groups " << groups);
        for_each_packed(rows, groups, kp, [&](Index first, Index m, Index r, Index kk) {
          const float want =
              kk < k ? a_t[static_cast<std::size_t>(kk * k_stride + first + r)] : 0.0f;
          REQUIRE(
              std::bit_cast<std::uint32_t>(f[static_cast<std::size_t>(first * kp + kk * m + r)]) ==
              std::bit_cast<std::uint32_t>(want));
          if (kk < kb) {
            const Bf16 got =
                b[static_cast<std::size_t>(first * kb + (kk / 2) * 2 * m + 2 * r + kk % 2)];
            REQUIRE(got.bits == moet::detail::to_bf16(want).bits);
          }
        });
      }
    }
  }
}

}  // namespace test_row_pack
