// No include guard: kernels/family.inl includes this file once per kernel level, inside that
// level's namespace and target region, after the level's `V`.
/// \file detail/kernels/row_pack.inl
/// The packing of the left-hand rows on one kernel level: bf16 rows and 8-bit quantised rows
/// in the layouts of `pack_row_groups` and `pack_quantized_row_groups` (kernels/packed.hpp),
/// equal to them bit for bit, with the rounding and the quantisation done `V::kWidth` lanes at
/// a time on levels whose `Vec` has `to_bf16` / `quantize_block`. The scalar forms cost
/// 1.2-1.8 ns (bf16) and 3.6-5.4 ns (8-bit, a `roundf` call per value) per element on the
/// project's machine, the vector ones 0.13-0.66 and 0.42-0.56 (README). Columns given with
/// a stride (`k_stride != 1`, the transposed products of training) and the other levels use the
/// packed.hpp forms.

template <class Vv = V>
inline constexpr bool kVectorBf16Pack = requires(const float* s, Bf16* d) {
  Vv::to_bf16(s, d);
};
template <class Vv = V>
inline constexpr bool kVectorQuantPack = requires(const float* s, std::int8_t* q,
                                                  std::int32_t& sum) {
  Vv::quantize_block(s, q, sum);
};

/// `dst[i] = to_bf16(src[i])` for `i < n`.
template <class Vv = V>
inline void round_to_bf16(const float* src, Index n, Bf16* dst) {
  Index i = 0;
  if constexpr (kVectorBf16Pack<Vv>) {
    for (; i + Vv::kWidth <= n; i += Vv::kWidth) Vv::to_bf16(src + i, dst + i);
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

/// `pack_row_groups` into bf16 (same arguments, same bits).
template <class Vv = V>
inline void pack_bf16_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                                 Bf16* dst, Index k_stride) {
  if (!kVectorBf16Pack<Vv> || k_stride != 1) {
    pack_row_groups(a, lda, rows, k, groups, dst, -1, k_stride);
    return;
  }
  const Index kp = padded_depth<Bf16>(k);
  constexpr Index kChunk = 256;  // even: no pair straddles two chunks
  Bf16 buf[kChunk + 1];
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    Bf16* group = dst + first * kp;
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      if (m == 1) {  // the layout [k / 2][1][2] is the row itself
        round_to_bf16<Vv>(src, k, group);
        if (kp != k) group[k] = Bf16{};
        continue;
      }
      for (Index c0 = 0; c0 < k; c0 += kChunk) {
        const Index len = std::min(kChunk, k - c0);
        round_to_bf16<Vv>(src + c0, len, buf);
        if (len % 2 != 0) buf[len] = Bf16{};  // the zero column of an odd k
        Bf16* out = group + c0 * m + 2 * r;   // pair c0 / 2 of row r
        for (Index p = 0; p < (len + 1) / 2; ++p) {
          std::memcpy(out + p * 2 * m, buf + 2 * p, 2 * sizeof(Bf16));
        }
      }
    }
  }
}

/// `pack_row_groups` into floats holding the bf16-rounded values, `from_bf16(to_bf16(x))`: the
/// rows of bf16 products on levels without `vdpbf16ps` (`kFloatRowsForBf16`). Group `g` at
/// `dst + first padded_depth<Bf16>(k)`, laid out `[padded_depth<Bf16>(k)][m]`, an odd `k`
/// padded with a zero row.
template <class Vv = V>
inline void pack_bf16_float_row_groups(const float* a, Index lda, Index rows, Index k, Index groups,
                                       float* dst, Index k_stride) {
  const Index kp = padded_depth<Bf16>(k);
  constexpr Index kChunk = 256;
  Bf16 buf[kChunk];
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    float* group = dst + first * kp;
    if (k_stride != 1) {  // A given as its transpose: along its rows (see pack_row_groups)
      for (Index kk = 0; kk < k; ++kk) {
        const float* src = a + first * lda + kk * k_stride;
        for (Index r = 0; r < m; ++r) group[kk * m + r] = from_bf16(to_bf16(src[r * lda]));
      }
      std::fill(group + k * m, group + kp * m, 0.0f);
      continue;
    }
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index c0 = 0; c0 < k; c0 += kChunk) {
        const Index len = std::min(kChunk, k - c0);
        round_to_bf16<Vv>(src + c0, len, buf);
        for (Index i = 0; i < len; ++i) group[(c0 + i) * m + r] = from_bf16(buf[i]);
      }
      for (Index kk = k; kk < kp; ++kk) group[kk * m + r] = 0.0f;
    }
  }
}

/// The vector form of `pack_quantized_rows` (levels with `Vv::quantize_block`).
template <class Vv>
inline void pack_quantized_vector(const float* a, Index lda, Index rows, Index k, Index groups,
                                  std::int8_t* codes, float* scales, std::int32_t* sums,
                                  Index k_stride) {
  if (k_stride != 1) {
    pack_quantized_row_groups(a, lda, rows, k, groups, codes, scales, sums, k_stride);
    return;
  }
  const Index kp = (k + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
  const Index nb = kp / kQuantBlock;
  float tail[kQuantBlock];
  std::int8_t q[kQuantBlock];
  for (Index g = 0; g < groups; ++g) {
    Index first = 0;
    Index m = 0;
    row_group(rows, groups, g, first, m);
    std::int8_t* group = codes + first * kp;
    for (Index r = 0; r < m; ++r) {
      const float* src = a + (first + r) * lda;
      for (Index b = 0; b < nb; ++b) {
        const Index len = std::min<Index>(kQuantBlock, k - b * kQuantBlock);
        const float* x = src + b * kQuantBlock;
        if (len < kQuantBlock) {  // zeros past k: they change neither max|x| nor the codes
          std::fill(tail, tail + kQuantBlock, 0.0f);
          std::copy(x, x + len, tail);
          x = tail;
        }
        std::int32_t sum = 0;
        const float d = Vv::quantize_block(x, q, sum);
        std::int8_t* block = group + b * kQuantBlock * m + 4 * r;
        for (Index w = 0; w < kQuantBlock / 4; ++w) std::memcpy(block + w * 4 * m, q + 4 * w, 4);
        scales[(first * nb) + b * m + r] = d;
        sums[(first * nb) + b * m + r] = sum;
      }
    }
  }
}

/// `pack_quantized_row_groups` (same arguments, same bits).
template <class Vv = V>
inline void pack_quantized_rows(const float* a, Index lda, Index rows, Index k, Index groups,
                                std::int8_t* codes, float* scales, std::int32_t* sums,
                                Index k_stride) {
  if constexpr (!kVectorQuantPack<Vv>) {
    pack_quantized_row_groups(a, lda, rows, k, groups, codes, scales, sums, k_stride);
  } else {
    pack_quantized_vector<Vv>(a, lda, rows, k, groups, codes, scales, sums, k_stride);
  }
}
