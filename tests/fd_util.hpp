#pragma once
// Shared by the finite-difference gradient tests (test_grad_experts.cpp, test_grad_layer.cpp):
// parameter tensors collected through `visit_parameters`, central differences in double over
// an input matrix or over every entry of a visited parameter, and the gradient comparison.
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/concepts.hpp"
#include "moet/tensor.hpp"

namespace moet_test {

using moet::Index;
using moet::RowMatrix;

// A parameter tensor as a model visits it: where its values live and a copy of its gradient.
struct Tensor {
  std::string name;
  double* value = nullptr;
  RowMatrix<double> grad;
};

// Every tensor `model.visit_parameters` names, in visiting order.
template <class Model>
std::vector<Tensor> collect(Model& model) {
  std::vector<Tensor> out;
  model.visit_parameters(
      [&](std::string_view name, moet::ParamMap<double> value, moet::ParamMap<double> grad) {
        REQUIRE(value.rows() == grad.rows());
        REQUIRE(value.cols() == grad.cols());
        out.push_back(Tensor{std::string(name), value.data(), grad});
      });
  return out;
}

// Central differences of `loss(x')` over every entry of `x` (x' = x with one entry moved by
// +-eps).
template <class Loss>
RowMatrix<double> fd_input(const RowMatrix<double>& x, double eps, Loss&& loss) {
  RowMatrix<double> fd(x.rows(), x.cols());
  for (Index i = 0; i < x.size(); ++i) {
    RowMatrix<double> plus = x;
    RowMatrix<double> minus = x;
    plus.data()[i] += eps;
    minus.data()[i] -= eps;
    fd.data()[i] = (loss(plus) - loss(minus)) / (2 * eps);
  }
  return fd;
}

// Central differences of `loss()` over every entry of `tensor`'s values (moved in place and
// restored), shaped like its gradient.
template <class Loss>
RowMatrix<double> fd_tensor(Tensor& tensor, double eps, Loss&& loss) {
  RowMatrix<double> fd(tensor.grad.rows(), tensor.grad.cols());
  for (Index i = 0; i < fd.size(); ++i) {
    const double saved = tensor.value[i];
    tensor.value[i] = saved + eps;
    const double up = loss();
    tensor.value[i] = saved - eps;
    const double down = loss();
    tensor.value[i] = saved;
    fd.data()[i] = (up - down) / (2 * eps);
  }
  return fd;
}

// Whether a zero finite-difference gradient passes (an idle expert's weights) or fails (the
// check would be vacuous).
enum class ZeroGradient { kAllowed, kFails };

// fd ~ analytic: Frobenius-relative <= 1e-4 and every entry within 1e-4 (|fd| + rms(fd)). A zero
// `fd` needs a zero `analytic` (`kAllowed`) or fails (`kFails`).
inline void check_gradient(const RowMatrix<double>& analytic, const RowMatrix<double>& fd,
                           const std::string& what, ZeroGradient zero) {
  INFO(what);
  REQUIRE(analytic.rows() == fd.rows());
  REQUIRE(analytic.cols() == fd.cols());
  if (fd.norm() == 0.0) {
    REQUIRE(zero == ZeroGradient::kAllowed);
    CHECK(analytic.norm() == 0.0);
    return;
  }
  CHECK((analytic - fd).norm() <= 1e-4 * fd.norm());
  const double rms = fd.norm() / std::sqrt(static_cast<double>(fd.size()));
  int bad = 0;
  for (Index i = 0; i < fd.size(); ++i) {
    const double want = fd.data()[i];
    if (!(std::abs(analytic.data()[i] - want) <= 1e-4 * (std::abs(want) + rms))) ++bad;
  }
  CHECK(bad == 0);
}

}  // namespace moet_test
