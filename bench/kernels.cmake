# bench_kernels: moet's packed GEMM / fused SwiGLU kernels (detail/gemm.hpp) against Eigen's
# product and, when OpenBLAS is found, single-threaded cblas_sgemm. Included from
# bench/CMakeLists.txt; needs Google Benchmark.
#
# Always built with -O3; with -march=native when MOET_BENCH_NATIVE (the kernels themselves are
# selected at run time either way: moet::kernel_isa()).
# Run single-threaded, OpenBLAS included (the environment may force an OpenBLAS core type):
#   env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 ./bench_kernels

find_package(benchmark REQUIRED)
find_package(OpenBLAS CONFIG QUIET)

add_executable(bench_kernels "${CMAKE_CURRENT_LIST_DIR}/bench_kernels.cpp")
target_link_libraries(bench_kernels PRIVATE moet::moet moet_bench_native moet_dev benchmark::benchmark)
target_compile_options(bench_kernels PRIVATE -O3)
if(OpenBLAS_FOUND AND OpenBLAS_LIBRARIES)
  target_include_directories(bench_kernels SYSTEM PRIVATE ${OpenBLAS_INCLUDE_DIRS})
  target_link_libraries(bench_kernels PRIVATE ${OpenBLAS_LIBRARIES})
  target_compile_definitions(bench_kernels PRIVATE MOET_BENCH_OPENBLAS=1)
  message(STATUS "bench_kernels: comparing with OpenBLAS ${OpenBLAS_VERSION}")
else()
  message(STATUS "bench_kernels: OpenBLAS not found, comparing with Eigen only")
endif()

# Smoke run (ctest label `bench`): the smallest shape, a few iterations.
add_test(NAME bench_kernels_smoke
  COMMAND bench_kernels --benchmark_filter=S1/n:8$ --benchmark_min_time=0.01)
set_tests_properties(bench_kernels_smoke PROPERTIES LABELS bench TIMEOUT 300
  ENVIRONMENT "OPENBLAS_NUM_THREADS=1;OMP_NUM_THREADS=1")
