// The splitting helpers of detail/parallel.hpp: every index once, in the ranges they promise.
#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/detail/parallel.hpp"

using moet::Index;

namespace {

// Calls parallel_ranges(n, granule) at `threads` threads; returns the ranges it made, sorted.
std::vector<std::pair<Index, Index>> ranges_of(Index n, Index granule, int threads) {
  const int saved = moet::num_threads();
  moet::set_num_threads(threads);
  std::vector<std::pair<Index, Index>> got;
  std::mutex lock;
  moet::detail::parallel_ranges(n, granule, [&](Index begin, Index end) {
    const std::lock_guard<std::mutex> hold(lock);
    got.emplace_back(begin, end);
  });
  moet::set_num_threads(saved);
  std::sort(got.begin(), got.end());
  return got;
}

}  // namespace

TEST_CASE("parallel_ranges covers [0, n) once, one range per thread, cut on the granule",
          "[parallel]") {
  for (const int threads : {1, 2, 3}) {
    for (const Index n : {1, 2, 7, 16, 17, 1000, 16385}) {
      for (const Index granule : {1, 2, 16, 16384}) {
        INFO("threads " << threads << ", n " << n << ", granule " << granule);
        const auto got = ranges_of(n, granule, threads);
        REQUIRE(!got.empty());
        // At most one range per thread, and never more than there are granules.
        const Index granules = (n + granule - 1) / granule;
        CHECK(static_cast<Index>(got.size()) <= std::min<Index>(threads, granules));
        // Contiguous, non-empty, in order, from 0 to n: every index exactly once.
        Index next = 0;
        for (const auto& [begin, end] : got) {
          CHECK(begin == next);
          CHECK(begin < end);
          // Every cut but the end of the array is on a multiple of the granule.
          CHECK(begin % granule == 0);
          if (end != n) CHECK(end % granule == 0);
          next = end;
        }
        CHECK(next == n);
      }
    }
  }
#if MOET_HAS_OPENMP
  // Two threads and enough granules: the work is split in two, the halves as equal as the
  // granule allows (here 3 granules of 16: 16 and 32 values).
  CHECK(ranges_of(48, 16, 2) == std::vector<std::pair<Index, Index>>{{0, 16}, {16, 48}});
  CHECK(ranges_of(1000, 1, 2) == std::vector<std::pair<Index, Index>>{{0, 500}, {500, 1000}});
#endif
}

TEST_CASE("parallel_ranges does nothing for an empty range and takes a granule below 1 as 1",
          "[parallel]") {
  CHECK(ranges_of(0, 16, 2).empty());
  CHECK(ranges_of(-3, 16, 2).empty());
  const auto got = ranges_of(5, 0, 1);
  CHECK(got == std::vector<std::pair<Index, Index>>{{0, 5}});
}
