#pragma once
// What the MPI test programs share: the rank and size of MPI_COMM_WORLD, and a Catch2 main
// (include this header in one file per program, after defining CATCH_CONFIG_RUNNER and
// including catch.hpp) that initialises MPI and fails on every rank when any rank failed.
#include <catch2/catch.hpp>
#include <mpi.h>

namespace mpi_test {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace mpi_test

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  const int result = Catch::Session().run(argc, argv);
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
