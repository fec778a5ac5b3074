#pragma once
// Seeded standard-normal matrices for the tests' inputs, filled in storage (row-major) order.
#include <cstdint>
#include <random>

#include "moet/tensor.hpp"

namespace moet_test {

inline moet::RowMatrix<float> random_rows(moet::Index rows, moet::Index cols, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  moet::RowMatrix<float> m(rows, cols);
  for (moet::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(gen);
  return m;
}

}  // namespace moet_test
