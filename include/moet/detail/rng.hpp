#pragma once
/// \file detail/rng.hpp
/// Counter-based randomness: every draw is a pure function of its key (seed, step, token,
/// stream, ...), so parallel code draws the same numbers whatever the thread schedule.

#include <cmath>
#include <cstdint>
#include <numbers>

namespace moet::detail {

/// SplitMix64's finaliser: a bijective 64-bit mixer.
constexpr std::uint64_t mix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Hashes any number of 64-bit words into one.
template <class... Words>
constexpr std::uint64_t hash_key(std::uint64_t first, Words... rest) {
  std::uint64_t h = mix64(first);
  ((h = mix64(h ^ static_cast<std::uint64_t>(rest))), ...);
  return h;
}

/// Uniform double in [0, 1) from 53 random bits.
inline double uniform01(std::uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

/// Uniform integer in [0, n) (Lemire's multiply-shift; bias below 2^-32 for n < 2^32).
inline std::uint64_t uniform_below(std::uint64_t bits, std::uint64_t n) {
  __extension__ using Wide = unsigned __int128;  // GCC/Clang extension: silences -Wpedantic
  return static_cast<std::uint64_t>((static_cast<Wide>(bits) * n) >> 64);
}

/// Standard normal from a key (Box-Muller on two derived uniforms).
inline double normal(std::uint64_t key) {
  const double u1 = 1.0 - uniform01(mix64(key ^ 0x5555555555555555ULL));  // (0, 1]
  const double u2 = uniform01(mix64(key ^ 0xaaaaaaaaaaaaaaaaULL));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

/// A small sequential generator for parameter initialisation (SplitMix64 stream).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() { return mix64(state_++ * 0x2545f4914f6cdd1dULL + 1); }
  double uniform() { return uniform01(next()); }
  double normal() { return detail::normal(next()); }

 private:
  std::uint64_t state_;
};

}  // namespace moet::detail
