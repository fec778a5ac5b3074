// No include guard: kernels/family.inl includes this file once per kernel level, inside that
// level's namespace and target region.
/// \file detail/kernels/elementwise.inl
/// One kernel level's elementwise training kernels.

/// AdamW's update of `n` float parameters (kernels/elementwise.hpp's `adamw_one` for each `j`:
/// `p[j]`, `m[j]`, `v[j]` updated in place from `g[j]`), `Traits::V::kWidth` lanes at a time;
/// the last `n % kWidth` values go through `adamw_one`. The arrays must not overlap. Each value
/// depends only on its own inputs, so splitting the range between threads keeps the bits.
///
/// A plain loop is not vectorised by the compilers (`std::sqrt` may set `errno`; GCC 12 keeps
/// it scalar unless `-fno-math-errno`): 155 ms against 40 ms for the 88 M parameters of an S2
/// bank on 2 threads, where the vector loop is bound by memory.
inline void adamw_update(const AdamWCoefficients<float>& c, float* p, const float* g, float* m,
                         float* v, Index n) {
  using Vv = Traits::V;
  constexpr Index kW = Vv::kWidth;
  const auto decay = Vv::set1(c.decay);
  const auto b1 = Vv::set1(c.b1);
  const auto one_minus_b1 = Vv::set1(c.one_minus_b1);
  const auto b2 = Vv::set1(c.b2);
  const auto one_minus_b2 = Vv::set1(c.one_minus_b2);
  const auto c1 = Vv::set1(c.c1);
  const auto c2 = Vv::set1(c.c2);
  const auto lr = Vv::set1(c.lr);
  const auto eps = Vv::set1(c.eps);
  Index j = 0;
  for (; j + kW <= n; j += kW) {
    const auto gj = Vv::load(g + j);
    const auto decayed = Vv::mul(Vv::load(p + j), decay);
    const auto mj = Vv::add(Vv::mul(b1, Vv::load(m + j)), Vv::mul(one_minus_b1, gj));
    const auto vj = Vv::add(Vv::mul(b2, Vv::load(v + j)), Vv::mul(Vv::mul(one_minus_b2, gj), gj));
    const auto denominator = Vv::add(Vv::sqrt(Vv::div(vj, c2)), eps);
    Vv::store(m + j, mj);
    Vv::store(v + j, vj);
    Vv::store(p + j, Vv::sub(decayed, Vv::div(Vv::mul(lr, Vv::div(mj, c1)), denominator)));
  }
  for (; j < n; ++j) adamw_one(c, p[j], g[j], m[j], v[j]);
}
