// Hashes (FNV-1a over the bits) the outputs of the expert banks and of four layers: the initial
// weights, forward, forward_train + cache, backward din / dx, every gradient, and a forward after
// an AdamW step, for SwiGLU/GeGLU/FFN banks in float (f32, bf16, unpacked) and double. It uses
// only API that exists both before and after the ExpertBank refactor (commit "One expert
// bank"), so the same file builds against either tree and the two outputs can be diffed:
//
//   g++ -std=c++20 -O2 [-march=native] -fopenmp -I<tree>/include -I/usr/include/eigen3
//       tests/tools/bank_hashes.cpp -o bank_hashes && ./bank_hashes > <tree>.txt
//
// Not built or run by ctest: a recorded comparison, not a test (the bits depend on the
// compiler and the instruction set, so there is no golden output to keep).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <string_view>

#include <moet/moet.hpp>

using moet::Index;

struct Hash {
  std::uint64_t h = 1469598103934665603ULL;
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ULL;
    }
  }
  template <class M>
  void mat(const M& m) {
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) {
        auto v = m(i, j);
        bytes(&v, sizeof v);
      }
  }
};

template <class S>
moet::RowMatrix<S> rnd(Index r, Index c, unsigned seed, double scale = 1.0) {
  std::mt19937 g(seed);
  std::normal_distribution<double> n(0.0, scale);
  moet::RowMatrix<S> m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(n(g));
  return m;
}

template <class Bank>
void bank_case(const char* name, const typename Bank::Options& o, bool set_biases) {
  using S = typename Bank::Scalar;
  Bank bank(o);
  Hash init;
  bank.visit_parameters(
      [&](std::string_view, moet::ParamMap<S> v, moet::ParamMap<S>) { init.mat(v); });
  if (set_biases) {  // non-zero biases through the visitor (biases start at 0)
    unsigned seed = 50;
    bank.visit_parameters([&](std::string_view n, moet::ParamMap<S> v, moet::ParamMap<S>) {
      if (n.find("bias") != std::string_view::npos) v = rnd<S>(v.rows(), v.cols(), seed++, 0.5);
    });
  }
  bank.parameters_changed();
  const Index n = 37, d = bank.model_dim();
  typename Bank::Scratch scratch;
  Hash fwd, ftr, bwd, grads;
  bank.zero_grad();
  for (Index e = 0; e < bank.num_experts(); ++e) {
    const auto x = rnd<S>(n, d, 100 + unsigned(e));
    moet::RowMatrix<S> y(n, d), yt(n, d), cache(n, bank.cache_width()), din(n, d);
    bank.forward(e, x, y, scratch);
    fwd.mat(y);
    bank.forward_train(e, x, yt, cache, scratch);
    ftr.mat(yt);
    ftr.mat(cache);
    const auto dy = rnd<S>(n, d, 200 + unsigned(e));
    bank.backward(e, x, cache, dy, din, scratch);
    bwd.mat(din);
  }
  bank.visit_parameters(
      [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { grads.mat(g); });
  bank.parameters_changed();
  std::printf("%-28s init %016llx fwd %016llx ftr %016llx bwd %016llx grad %016llx\n", name,
              static_cast<unsigned long long>(init.h), static_cast<unsigned long long>(fwd.h),
              static_cast<unsigned long long>(ftr.h), static_cast<unsigned long long>(bwd.h),
              static_cast<unsigned long long>(grads.h));
}

template <class Layer>
void layer_case(const char* name, Layer layer) {
  using S = typename Layer::Scalar;
  const Index n = 61, d = layer.model_dim();
  const auto x = rnd<S>(n, d, 300);
  const auto dy = rnd<S>(n, d, 301);
  typename Layer::Workspace ws;
  moet::RowMatrix<S> y(n, d), yt(n, d), dx(n, d);
  Hash fwd, ftr, bwd, grads, after;
  layer.forward(x, y, moet::RouteContext{}, ws);
  fwd.mat(y);
  const moet::RouteContext ctx{.training = true, .seed = 3, .step = 1};
  layer.zero_grad();
  layer.forward_train(x, yt, ctx, ws);
  ftr.mat(yt);
  layer.backward(x, dy, ctx, ws, dx);
  bwd.mat(dx);
  layer.visit_parameters(
      [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> g) { grads.mat(g); });
  moet::AdamW<S> opt({.lr = 1e-2});
  opt.step(layer);
  layer.forward(x, y, moet::RouteContext{}, ws);
  after.mat(y);
  std::printf("%-28s fwd %016llx ftr %016llx bwd %016llx grad %016llx step+fwd %016llx\n", name,
              static_cast<unsigned long long>(fwd.h), static_cast<unsigned long long>(ftr.h),
              static_cast<unsigned long long>(bwd.h), static_cast<unsigned long long>(grads.h),
              static_cast<unsigned long long>(after.h));
}

int main() {
  moet::set_num_threads(1);
  const auto bf16 = moet::WeightFormat::kBf16;
  bank_case<moet::SwiGluExperts<float>>(
      "swiglu f32", {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 1}, false);
  bank_case<moet::SwiGluExperts<float>>(
      "swiglu bf16",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 2, .weight_format = bf16},
      false);
  bank_case<moet::SwiGluExperts<float>>(
      "swiglu unpacked",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 3, .pack_weights = false},
      false);
  bank_case<moet::SwiGluExperts<double>>(
      "swiglu double", {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 4},
      false);
  bank_case<moet::GeGluExperts<float>>(
      "geglu f32", {.model_dim = 33, .hidden_dim = 50, .num_experts = 3, .init_seed = 5}, false);
  bank_case<moet::GeGluExperts<float>>(
      "geglu bf16",
      {.model_dim = 33, .hidden_dim = 50, .num_experts = 3, .init_seed = 6, .weight_format = bf16},
      false);
  bank_case<moet::GeGluExperts<double>>(
      "geglu double", {.model_dim = 33, .hidden_dim = 50, .num_experts = 3, .init_seed = 7}, false);
  bank_case<moet::FfnExperts<float>>(
      "ffn gelu bias f32", {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 8},
      true);
  bank_case<moet::FfnExperts<float>>(
      "ffn gelu bias bf16",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 9, .weight_format = bf16},
      true);
  bank_case<moet::ReluFfnExperts<float>>(
      "ffn relu nobias f32",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .bias = false, .init_seed = 10}, false);
  bank_case<moet::ReluFfnExperts<float>>("ffn relu nobias bf16",
                                         {.model_dim = 40,
                                          .hidden_dim = 72,
                                          .num_experts = 4,
                                          .bias = false,
                                          .init_seed = 11,
                                          .weight_format = bf16},
                                         false);
  bank_case<moet::FfnExperts<double>>(
      "ffn gelu bias double",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 12}, true);
  bank_case<moet::FfnExperts<float, moet::GeluTanh>>(
      "ffn gelutanh unpacked",
      {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 13, .pack_weights = false},
      true);
  layer_case("layer top_k swiglu f32+shared",
             moet::MoELayer(
                 moet::TopKGate<float>({.model_dim = 40, .num_experts = 4, .k = 2, .init_seed = 1}),
                 moet::SwiGluExperts<float>(
                     {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 14}),
                 moet::SwiGluExperts<float>(
                     {.model_dim = 40, .hidden_dim = 24, .num_experts = 1, .init_seed = 15})));
  layer_case("layer top_p swiglu bf16",
             moet::MoELayer(moet::TopPGate<float>(
                                {.model_dim = 40, .num_experts = 4, .p = 0.5, .init_seed = 2}),
                            moet::SwiGluExperts<float>({.model_dim = 40,
                                                        .hidden_dim = 72,
                                                        .num_experts = 4,
                                                        .init_seed = 16,
                                                        .weight_format = bf16})));
  layer_case(
      "layer top_k ffn double",
      moet::MoELayer(
          moet::TopKGate<double>({.model_dim = 40, .num_experts = 4, .k = 2, .init_seed = 3}),
          moet::FfnExperts<double>(
              {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 17})));
  layer_case(
      "layer top_any geglu f32",
      moet::MoELayer(moet::TopAnyGate<float>({.model_dim = 40, .num_experts = 4, .init_seed = 4}),
                     moet::GeGluExperts<float>(
                         {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 18})));
}
