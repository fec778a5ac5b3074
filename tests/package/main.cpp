// A minimal moet user, built by both packaging consumers (find_package and add_subdirectory):
// it fills a routing plan by hand, summarises it with compute_stats and checks the numbers.
#include <cstdio>
#include <cstring>

#include <moet/moet.hpp>

namespace {

int check(bool ok, const char* what) {
  if (!ok) std::fprintf(stderr, "consumer: FAILED: %s\n", what);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  // Two tokens over three experts: token 0 -> experts {0, 2}, token 1 -> expert {1}.
  moet::Routing<float> routing;
  routing.reset(2, 3);
  routing.counts()[0] = 2;
  routing.counts()[1] = 1;
  routing.commit_counts();
  routing.experts(0)[0] = 0;
  routing.experts(0)[1] = 2;
  routing.weights(0)[0] = 0.75f;
  routing.weights(0)[1] = 0.25f;
  routing.experts(1)[0] = 1;
  routing.weights(1)[0] = 1.0f;

  const moet::RoutingStats stats = moet::compute_stats(routing);
  std::printf(
      "moet %s: %lld tokens, %lld assignments, mean_k %.2f, max/mean load %.2f, "
      "threads %d\n",
      moet::kVersion, static_cast<long long>(stats.num_tokens),
      static_cast<long long>(stats.num_assignments), stats.mean_k, stats.max_mean_load_ratio,
      moet::num_threads());

  int failures = 0;
  failures += check(stats.num_tokens == 2 && stats.num_experts == 3, "plan sizes");
  failures += check(stats.num_assignments == 3, "three assignments");
  failures += check(stats.mean_k == 1.5, "mean_k == 1.5");
  failures += check(
      stats.load.size() == 3 && stats.load[0] == 1 && stats.load[1] == 1 && stats.load[2] == 1,
      "one assignment per expert");
  failures += check(stats.max_mean_load_ratio == 1.0, "perfect balance");
  failures += check(MOET_HAS_OPENMP == MOET_EXPECT_OPENMP, "OpenMP matches MOET_USE_OPENMP");
  failures += check(std::strcmp(moet::kVersion, MOET_EXPECT_VERSION) == 0,
                    "moet::kVersion matches the CMake package version");
  return failures == 0 ? 0 : 1;
}
