// The seed statistics of the quality comparison (examples/support/seeds.hpp) against
// hand-computed values: the seed list parser and its rejections, mean / sample standard
// deviation / range, the range-overlap verdict (touching ranges are not a difference) and the
// seed-by-seed comparison.

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "../examples/support/seeds.hpp"

namespace test_example_seeds {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;

TEST_CASE("parse_seeds reads a list of distinct positive integers", "[examples]") {
  CHECK(examples::parse_seeds("1,2,3") == std::vector<std::uint64_t>{1, 2, 3});
  CHECK(examples::parse_seeds("7") == std::vector<std::uint64_t>{7});
  CHECK(examples::parse_seeds("3,1") == std::vector<std::uint64_t>{3, 1});  // order kept
}

TEST_CASE("parse_seeds rejects empty items, signs, zero, text and repeats",
          "[examples][bad_input]") {
  for (const char* bad : {"", ",", "1,", ",1", "1,,2", "-1", "+1", "0", "1,0", "a", "1.5", " 1",
                          "1234567890123456789"}) {
    INFO(bad);
    CHECK_THROWS_WITH(examples::parse_seeds(bad), Contains("--seeds") && Contains("positive"));
  }
  CHECK_THROWS_WITH(examples::parse_seeds("1,2,1"), Contains("seed 1 is listed twice"));
}

TEST_CASE("spread gives mean, sample standard deviation and range", "[examples]") {
  const examples::Spread s = examples::spread({1.0, 2.0, 4.0});
  CHECK(s.n == 3);
  CHECK(s.mean == Approx(7.0 / 3.0));
  CHECK(s.sd == Approx(std::sqrt(7.0 / 3.0)));  // ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3
  CHECK(s.min == 1.0);
  CHECK(s.max == 4.0);
  const examples::Spread one = examples::spread({2.5});
  CHECK(one.mean == 2.5);
  CHECK(one.sd == 0.0);
  CHECK(examples::format_spread(s, 2) == "2.33 ± 1.53 (1.00-4.00)");
}

TEST_CASE("compare calls a difference only when the ranges are apart", "[examples]") {
  const examples::Spread low = examples::spread({1.0, 1.5, 2.0});
  const examples::Spread high = examples::spread({2.5, 3.0});
  const examples::Spread touching = examples::spread({2.0, 2.2});
  const examples::Spread overlapping = examples::spread({1.8, 2.6});
  CHECK(examples::compare(high, low, true) == "better");
  CHECK(examples::compare(high, low, false) == "worse");
  CHECK(examples::compare(low, high, true) == "worse");
  CHECK(examples::compare(low, high, false) == "better");
  CHECK(examples::compare(touching, low, true) == "within spread");
  CHECK(examples::compare(overlapping, low, false) == "within spread");
  CHECK(examples::compare(overlapping, high, true) == "within spread");
}

TEST_CASE("compare_paired counts the seeds in which each setting wins", "[examples]") {
  // Lower is better (bits per character): a is worse by 0.1, 0.2 and 0.3.
  CHECK(examples::compare_paired({2.1, 2.7, 3.3}, {2.0, 2.5, 3.0}, false, 2) ==
        "+0.20, worse in every seed");
  CHECK(examples::compare_paired({2.0, 2.5, 3.0}, {2.1, 2.7, 3.3}, false, 2) ==
        "-0.20, better in every seed");
  CHECK(examples::compare_paired({2.0, 2.5, 3.0}, {2.1, 2.7, 3.3}, true, 2) ==
        "-0.20, worse in every seed");
  CHECK(examples::compare_paired({1.0, 3.0, 2.0}, {2.0, 1.0, 2.0}, false, 1) ==
        "+0.3, better in 1, worse in 1 of 3 seeds");
  CHECK(examples::compare_paired({1.0, 2.0}, {1.0, 2.0}, false, 1) == "equal in all 2 seeds");
  CHECK_THROWS_WITH(examples::compare_paired({1.0}, {1.0, 2.0}, false, 1),
                    Contains("compare_paired") && Contains("1 against 2"));
}

}  // namespace

}  // namespace test_example_seeds
