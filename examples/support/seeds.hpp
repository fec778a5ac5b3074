#pragma once
/// \file examples/support/seeds.hpp
/// Repeating a quality comparison over several seeds: the seed list of `--seeds`, the mean and
/// spread of one metric over the seeds, and whether two routers differ by more than that
/// spread.
///
/// ```cpp
/// const std::vector<std::uint64_t> seeds = examples::parse_seeds("1,2,3");
/// const examples::Spread s = examples::spread({2.71, 2.70, 2.73});
/// examples::format_spread(s, 3);  // "2.713 ± 0.015 (2.700-2.730)"
/// examples::compare(a, b, /*higher_is_better=*/false);  // "better", "worse" or "within spread"
/// examples::compare_paired(a_values, b_values, false, 3);  // "+0.012, worse in every seed"
/// ```
///
/// Two routers count as different only when their ranges over the seeds do not overlap: every
/// seed of one is better than every seed of the other. With 3 seeds that is strict (it ignores
/// the pairing by seed) but needs no distribution assumption. Settings evaluated on the same
/// trained models (the k sweep) are compared seed by seed instead (`compare_paired`).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace examples {

/// The comma-separated seeds of `--seeds` ("1,2,3"): positive integers, each at most once.
/// Throws std::invalid_argument (naming the list) on anything else.
inline std::vector<std::uint64_t> parse_seeds(const std::string& list) {
  std::vector<std::uint64_t> seeds;
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t end = std::min(list.find(',', begin), list.size());
    const std::string item = list.substr(begin, end - begin);
    if (item.empty() || item.size() > 18 || item.find_first_not_of("0123456789") != item.npos ||
        std::stoull(item) == 0) {
      throw std::invalid_argument("--seeds: '" + list +
                                  "' is not a list of positive integers (for example 1,2,3)");
    }
    const std::uint64_t seed = std::stoull(item);
    if (std::find(seeds.begin(), seeds.end(), seed) != seeds.end()) {
      throw std::invalid_argument("--seeds: seed " + item + " is listed twice in '" + list + "'");
    }
    seeds.push_back(seed);
    begin = end + 1;
  }
  return seeds;
}

/// One metric over the seeds: mean, sample standard deviation (0 for one seed), range.
struct Spread {
  double mean = 0, sd = 0, min = 0, max = 0;
  std::size_t n = 0;
};

inline Spread spread(const std::vector<double>& values) {
  Spread s;
  s.n = values.size();
  if (values.empty()) return s;
  s.min = *std::min_element(values.begin(), values.end());
  s.max = *std::max_element(values.begin(), values.end());
  for (const double v : values) s.mean += v / double(values.size());
  if (values.size() > 1) {
    double ss = 0;
    for (const double v : values) ss += (v - s.mean) * (v - s.mean);
    s.sd = std::sqrt(ss / double(values.size() - 1));
  }
  return s;
}

/// "mean ± sd (min-max)" with `decimals` digits.
inline std::string format_spread(const Spread& s, int decimals) {
  char cell[128];
  std::snprintf(cell, sizeof cell, "%.*f ± %.*f (%.*f-%.*f)", decimals, s.mean, decimals, s.sd,
                decimals, s.min, decimals, s.max);
  return cell;
}

/// "better" when every seed of `a` beats every seed of `b`, "worse" for the reverse, otherwise
/// "within spread" (the ranges overlap, or touch).
inline std::string compare(const Spread& a, const Spread& b, bool higher_is_better) {
  const bool a_above = a.min > b.max, a_below = a.max < b.min;
  if (a_above) return higher_is_better ? "better" : "worse";
  if (a_below) return higher_is_better ? "worse" : "better";
  return "within spread";
}

/// For two settings measured on the same seeds (the same trained model evaluated two ways):
/// the mean of the per-seed differences `a - b` and in how many seeds `a` is better, as
/// "+0.012, worse in 3 of 3 seeds". Ties count as neither.
inline std::string compare_paired(const std::vector<double>& a, const std::vector<double>& b,
                                  bool higher_is_better, int decimals) {
  if (a.size() != b.size() || a.empty()) {
    throw std::invalid_argument("compare_paired: " + std::to_string(a.size()) + " against " +
                                std::to_string(b.size()) + " seeds");
  }
  double diff = 0;
  std::size_t better = 0, worse = 0;
  for (std::size_t s = 0; s < a.size(); ++s) {
    diff += (a[s] - b[s]) / double(a.size());
    if (a[s] == b[s]) continue;
    ((a[s] > b[s]) == higher_is_better ? better : worse) += 1;
  }
  char cell[128];
  const std::size_t n = a.size();
  if (better == 0 && worse == 0) {
    std::snprintf(cell, sizeof cell, "equal in all %zu seeds", n);
  } else if (better == n || worse == n) {
    std::snprintf(cell, sizeof cell, "%+.*f, %s in every seed", decimals, diff,
                  better == n ? "better" : "worse");
  } else {
    std::snprintf(cell, sizeof cell, "%+.*f, better in %zu, worse in %zu of %zu seeds", decimals,
                  diff, better, worse, n);
  }
  return cell;
}

}  // namespace examples
