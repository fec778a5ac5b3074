# bench_kernels: moet's packed GEMM / fused SwiGLU kernels (detail/gemm.hpp) against Eigen's
# product and, when OpenBLAS is found, single-threaded cblas_sgemm. Included from
# bench/CMakeLists.txt; needs Google Benchmark.
#
# Always built with -O3 and moet::native (-march=native): the point is the SIMD kernels.
# Run single-threaded, OpenBLAS included (the environment may force an OpenBLAS core type):
#   env -u OPENBLAS_CORETYPE OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 ./bench_kernels
#
# Also defines test_gemm_native and test_experts_packed_native (when moet's tests are built):
# tests/test_gemm.cpp and tests/test_experts_packed.cpp compiled with moet::native, so that
# ctest covers the SIMD kernels and not only the portable ones.

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

if(TARGET moet_catch_main)
  find_package(Catch2 2.13 REQUIRED)  # imported targets are directory-scoped: find it here too
  add_executable(test_gemm_native "${CMAKE_CURRENT_LIST_DIR}/../tests/test_gemm.cpp"
    $<TARGET_OBJECTS:moet_catch_main>)
  target_link_libraries(test_gemm_native PRIVATE moet::moet moet_bench_native moet_dev Catch2::Catch2)
  add_test(NAME test_gemm_native COMMAND test_gemm_native --order rand --rng-seed 7 "~[.slow]")
  set_tests_properties(test_gemm_native PROPERTIES LABELS unit TIMEOUT 600)
  # The bf16 weights on AVX512-BF16 (where the machine has it; else the portable loops again).
  add_executable(test_gemm_bf16_native "${CMAKE_CURRENT_LIST_DIR}/../tests/test_gemm_bf16.cpp"
    $<TARGET_OBJECTS:moet_catch_main>)
  target_link_libraries(test_gemm_bf16_native PRIVATE
    moet::moet moet_bench_native moet_dev Catch2::Catch2)
  add_test(NAME test_gemm_bf16_native
    COMMAND test_gemm_bf16_native --order rand --rng-seed 7 "~[.slow]")
  set_tests_properties(test_gemm_bf16_native PROPERTIES LABELS unit TIMEOUT 600)
  # The packed expert banks through the dispatchers and the layer, on the SIMD kernels.
  add_executable(test_experts_packed_native
    "${CMAKE_CURRENT_LIST_DIR}/../tests/test_experts_packed.cpp" $<TARGET_OBJECTS:moet_catch_main>)
  target_link_libraries(test_experts_packed_native PRIVATE
    moet::moet moet_bench_native moet_dev Catch2::Catch2)
  add_test(NAME test_experts_packed_native
    COMMAND test_experts_packed_native --order rand --rng-seed 7 "~[.slow]")
  set_tests_properties(test_experts_packed_native PROPERTIES LABELS unit TIMEOUT 600)
endif()
