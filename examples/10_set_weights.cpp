// What this shows: loading a Mixtral-style MoE layer from PyTorch arrays: an inference-only
// SwiGLU bank that holds only its packed (here bf16) weights, built with init = kNone so that
// nothing is drawn, every tensor set in PyTorch's [out, in] layout, the router likewise; the
// error a transposed array gives; and edit() on a training bank, which repacks when it ends.
// What to copy: the loader loop (one set_* per tensor, WeightLayout::kOutIn for nn.Linear
// weights) and the bank options.
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <vector>

#include <moet/moet.hpp>

using Matrix = moet::RowMatrix<float>;
using moet::WeightLayout;

// Stand-ins for the checkpoint's arrays (model.layers.0.block_sparse_moe.*), row-major as
// safetensors/numpy store them: experts.e.w1 and w3 are [f, d], w2 is [d, f], gate is [E, d].
struct Checkpoint {
  std::vector<Matrix> w1, w3, w2;
  Matrix gate;
};

Checkpoint fake_checkpoint(moet::Index d, moet::Index f, moet::Index num_experts) {
  Checkpoint c;
  for (moet::Index e = 0; e < num_experts; ++e) {
    c.w1.push_back(Matrix::Random(f, d) / std::sqrt(float(d)));
    c.w3.push_back(Matrix::Random(f, d) / std::sqrt(float(d)));
    c.w2.push_back(Matrix::Random(d, f) / std::sqrt(float(f)));
  }
  c.gate = Matrix::Random(num_experts, d);
  return c;
}

int main() {
  constexpr moet::Index kDim = 64, kHidden = 224, kExperts = 4;
  const Checkpoint ckpt = fake_checkpoint(kDim, kHidden, kExperts);

  // Inference only: packed bf16 weights and nothing else; init = kNone draws nothing (a forward
  // before every tensor is set is an error naming the first missing one).
  moet::SwiGluExperts<float> experts({.model_dim = kDim,
                                      .hidden_dim = kHidden,
                                      .num_experts = kExperts,
                                      .init = moet::WeightInit::kNone,  // draw nothing
                                      .weight_format = moet::WeightFormat::kBf16,
                                      .inference_only = true});  // packed weights only
  for (moet::Index e = 0; e < kExperts; ++e) {
    const std::size_t i = std::size_t(e);
    experts.set_gate_weights(e, ckpt.w1[i], WeightLayout::kOutIn);  // experts.e.w1 [f, d]
    experts.set_up_weights(e, ckpt.w3[i], WeightLayout::kOutIn);    // experts.e.w3 [f, d]
    experts.set_down_weights(e, ckpt.w2[i], WeightLayout::kOutIn);  // experts.e.w2 [d, f]
  }
  moet::TopKGate<float> gate(moet::TopKGate<float>::mixtral_options(kDim, kExperts));
  gate.set_router(ckpt.gate, WeightLayout::kOutIn);  // gate.weight [E, d]
  std::printf("packed expert weights: %zu bytes (bf16, %ld weights)\n", experts.packed_bytes(),
              long(3 * kDim * kHidden * kExperts));

  moet::MoELayer layer(std::move(gate), std::move(experts));
  const Matrix x = Matrix::Random(16, kDim);
  const Matrix y = layer.forward(x);
  std::printf("y: %ld x %ld, mean experts per token %.2f\n", long(y.rows()), long(y.cols()),
              layer.stats().mean_k);

  // The likeliest loading mistake, PyTorch's array passed as moet's layout, is an error that
  // says so (before, a router assigned this way overflowed the heap).
  try {
    layer.gate().set_router(ckpt.gate, WeightLayout::kInOut);
  } catch (const moet::Error& e) {
    std::printf("caught: %s\n", e.what());
  }

  // A training bank: write in place through a scoped edit(); it checks and repacks at the end.
  moet::SwiGluExperts<float> trainable(
      {.model_dim = kDim, .hidden_dim = kHidden, .num_experts = kExperts});
  {
    auto edit = trainable.edit();
    edit.down_weights(0) *= 0.5f;  // a writable (hidden_dim, model_dim) view
  }
  std::printf("after edit(): packed kernels %s\n",
              trainable.uses_packed_kernels() ? "current" : "stale");
  return y.allFinite() && trainable.uses_packed_kernels() ? 0 : 1;
}
