// Compiled with the default flags; native.cpp with -march=native. See mixed_isa.hpp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "mixed_isa.hpp"

namespace mixed_isa {

std::unique_ptr<Layer> make_layer_plain(moet::WeightFormat format) { return make_layer(format); }

moet::RowMatrix<float> forward_plain(const Layer& layer, const moet::RowMatrix<float>& x) {
  return const_cast<Layer&>(layer).forward(x);  // NOLINT: forward keeps stats in the layer
}

}  // namespace mixed_isa

namespace {

using moet::Index;
using MatrixD = Eigen::MatrixXd;

double round_bf16(double v) { return moet::detail::round_to_bf16(static_cast<float>(v)); }

// The layer's output by naive double loops from its weights: top-2 of softmax(x W_r),
// renormalised, SwiGLU experts. With bf16 weights the weights and each product's input rows are
// rounded to bf16 first, as the kernels do.
MatrixD reference(const mixed_isa::Layer& layer, const moet::RowMatrix<float>& x, bool bf16) {
  const auto& gate = layer.gate();
  const auto& ex = layer.experts();
  const Index n = x.rows();
  const Index d = ex.model_dim();
  const Index f = ex.hidden_dim();
  const Index num_e = ex.num_experts();
  const auto r = [&](double v) { return bf16 ? round_bf16(v) : v; };
  MatrixD y = MatrixD::Zero(n, d);
  for (Index t = 0; t < n; ++t) {
    std::vector<double> z(static_cast<std::size_t>(num_e), 0.0);
    for (Index e = 0; e < num_e; ++e) {
      for (Index c = 0; c < d; ++c) z[static_cast<std::size_t>(e)] += x(t, c) * gate.router()(c, e);
    }
    std::vector<Index> order(static_cast<std::size_t>(num_e));
    std::iota(order.begin(), order.end(), Index{0});
    std::sort(order.begin(), order.end(), [&](Index a, Index b) {
      return z[static_cast<std::size_t>(a)] > z[static_cast<std::size_t>(b)];
    });
    const double z0 = z[static_cast<std::size_t>(order[0])];
    const double w1 = std::exp(z[static_cast<std::size_t>(order[1])] - z0);
    for (int slot = 0; slot < 2; ++slot) {
      const Index e = order[static_cast<std::size_t>(slot)];
      const double w = (slot == 0 ? 1.0 : w1) / (1.0 + w1);
      std::vector<double> h(static_cast<std::size_t>(f));
      for (Index j = 0; j < f; ++j) {
        double g = 0.0;
        double u = 0.0;
        for (Index c = 0; c < d; ++c) {
          g += r(x(t, c)) * r(ex.gate_weights(e)(c, j));
          u += r(x(t, c)) * r(ex.up_weights(e)(c, j));
        }
        h[static_cast<std::size_t>(j)] = g / (1.0 + std::exp(-g)) * u;
      }
      for (Index c = 0; c < d; ++c) {
        double o = 0.0;
        for (Index j = 0; j < f; ++j) {
          o += r(static_cast<float>(h[static_cast<std::size_t>(j)])) * r(ex.down_weights(e)(j, c));
        }
        y(t, c) += w * o;
      }
    }
  }
  return y;
}

double relative_error(const moet::RowMatrix<float>& got, const MatrixD& want) {
  return (got.cast<double>() - want).norm() / want.norm();
}

}  // namespace

int main() {
  int failures = 0;
  const moet::RowMatrix<float> x = moet::RowMatrix<float>::Random(37, 48);
  for (const moet::WeightFormat format : {moet::WeightFormat::kF32, moet::WeightFormat::kBf16}) {
    const bool bf16 = format == moet::WeightFormat::kBf16;
    const double bound = bf16 ? 1e-2 : 1e-5;
    // Built in each unit, run from each unit, destroyed in this one.
    auto built_native = mixed_isa::make_layer_native(format);
    auto built_plain = mixed_isa::make_layer_plain(format);
    const struct {
      const char* name;
      const mixed_isa::Layer& layer;
      bool run_native;
    } cases[] = {{"native-built, plain-run", *built_native, false},
                 {"native-built, native-run", *built_native, true},
                 {"plain-built, plain-run", *built_plain, false},
                 {"plain-built, native-run", *built_plain, true}};
    for (const auto& c : cases) {
      const moet::RowMatrix<float> y = c.run_native ? mixed_isa::forward_native(c.layer, x)
                                                    : mixed_isa::forward_plain(c.layer, x);
      const double err = relative_error(y, reference(c.layer, x, bf16));
      const bool ok = std::isfinite(err) && err <= bound;
      std::printf("%s %-26s relative error %.3g (bound %.0e) %s\n",
                  moet::weight_format_name(format), c.name, err, bound, ok ? "ok" : "FAILED");
      failures += ok ? 0 : 1;
    }
  }
  std::printf("kernels %s: %d failed\n", moet::kernel_isa_name(moet::kernel_isa()), failures);
  return failures == 0 ? 0 : 1;
}
