// What this shows: a pretrained MoE checkpoint (a Hugging Face directory or a llama.cpp .gguf
// file) as moet layers: one MoE layer with the checkpoint's own routing, then the same router
// weights driving top-p routing at several p, with a table of mean experts per token against
// the output's deviation from the checkpoint's routing. ctest runs it on the tiny Qwen3-MoE
// fixture (tests/fixtures); point --model at a real checkpoint to see real numbers.
// What to copy: Checkpoint::open, load_moe_layer (the gate type picks the routing), forward.
//
//   example_08_pretrained [--model tests/fixtures/checkpoints/qwen3_moe] [--layer -1 (first)]
//                         [--tokens 512] [--weights f32]
#include <cstdio>
#include <string>

#include <moet/io/checkpoint.hpp>
#include <moet/moet.hpp>

#include "support/cli.hpp"

using Matrix = moet::RowMatrix<float>;

// Relative Frobenius deviation of `y` from `reference`.
double deviation(const Matrix& y, const Matrix& reference) {
  return double((y - reference).norm() / reference.norm());
}

int main(int argc, char** argv) {
  std::string model = "tests/fixtures/checkpoints/qwen3_moe", weights = "f32";
  long layer = -1, tokens = 512;
  examples::Flags flags;
  flags.add("--model", model).add("--layer", layer).add("--tokens", tokens);
  flags.add("--weights", weights);
  if (!flags.parse(argc, argv)) return 2;

  const auto ckpt = moet::Checkpoint::open(model);  // a directory with config.json, or a .gguf
  const moet::CheckpointInfo& info = ckpt.info();
  const moet::Index l = layer >= 0 ? layer : info.moe_layers().front();
  const moet::CheckpointLayer& m = ckpt.moe_layer(l);
  std::printf("%s (%s): layer %ld of %zu, %ld experts of width %ld, %s\n", model.c_str(),
              info.family.c_str(), long(l), info.layers.size(), long(m.num_experts),
              long(m.hidden_dim), m.router_kind().c_str());

  // Hidden states stand-in: unit-variance rows (a real run would feed the layer's input).
  moet::detail::Rng rng(7);
  Matrix x(tokens, info.model_dim);
  for (moet::Index i = 0; i < x.size(); ++i) x.data()[i] = float(rng.normal());

  // The checkpoint's own routing (its router, k, renormalisation, groups, bias, scale).
  const moet::LoadOptions options{.weight_format = moet::parse_weight_format(weights)};
  auto own = moet::load_moe_layer(ckpt, l, options);
  const Matrix y = own.forward(x);  // (tokens, hidden_size): routed + shared experts
  std::printf("\n| gate | mean k | deviation from the checkpoint's routing |\n|---|---|---|\n");
  std::printf("| checkpoint (top-%ld) | %.3f | 0 |\n", long(m.k), own.stats().mean_k);

  // The same router weights and experts, routed by top-p: fewer or more experts per token.
  for (const double p : {0.3, 0.5, 0.7, 0.9, 1.0}) {
    auto top_p = moet::load_moe_layer<moet::TopPGate<float>>(ckpt, l, options, {{.p = p}});
    const Matrix y_p = top_p.forward(x);
    std::printf("| top_p:p=%.1f | %.3f | %.4f |\n", p, top_p.stats().mean_k, deviation(y_p, y));
  }
  // Top-k at another k, renormalised like the checkpoint.
  for (const moet::Index k : {moet::Index{1}, 2 * m.k}) {
    if (k > m.num_experts) continue;
    auto top_k = moet::load_moe_layer<moet::TopKGate<float>>(
        ckpt, l, options, {{.k = k, .renormalize = m.routing.renormalize}});
    const Matrix y_k = top_k.forward(x);
    std::printf("| top_k:k=%ld | %.3f | %.4f |\n", long(k), top_k.stats().mean_k,
                deviation(y_k, y));
  }
  return y.allFinite() ? 0 : 1;
}
