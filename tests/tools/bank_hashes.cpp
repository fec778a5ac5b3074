// Hashes (FNV-1a over the bits) every output moet computes, so that a refactoring can be checked
// bit for bit: the expert banks (initial weights, forward, forward_train + cache, backward din,
// every gradient), every gate's routing plan (offsets, ids, weights, probabilities, drops) at 1
// and 2 threads over many options, every gate's backward (dx and the parameter gradients, with
// every loss-gradient input), the auxiliary losses (values and gradients), the layers (forward,
// forward_train, backward, gradients, forward after an AdamW step) and the plans of the
// benchmarks' gates on their seeded inputs (bench/bench_common.hpp). It uses only API that exists
// both before and after the refactorings it checked (commit "One expert bank"; issue 13's
// protocol and toolkit), so the same file builds against either tree and the outputs can be
// diffed:
//
//   g++ -std=c++20 -O2 [-march=native] -fopenmp -DEIGEN_MAX_ALIGN_BYTES=64
//       -DEIGEN_MAX_STATIC_ALIGN_BYTES=64 -I<tree>/include -I<tree> -I/usr/include/eigen3
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

#include "bench/bench_common.hpp"

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

template <class S>
void plan_into(Hash& h, const moet::Routing<S>& r) {
  for (const Index o : r.offsets()) h.bytes(&o, sizeof o);
  for (const std::int32_t e : r.experts()) h.bytes(&e, sizeof e);
  for (const S w : r.weights()) h.bytes(&w, sizeof w);
  h.mat(r.probs());
  const Index extra[3] = {r.dropped, r.live_experts, r.probs_are_distribution ? 1 : 0};
  h.bytes(extra, sizeof extra);
}

void print(const char* kind, const std::string& name, const Hash& h) {
  std::printf("%-6s %-44s %016llx\n", kind, name.c_str(), static_cast<unsigned long long>(h.h));
}

// The plan of `gate` on `x` with `ctx`, routed at 1 and at 2 threads (and a second time on the
// same workspace); prints one hash per thread count.
template <class G>
void plan_case(const std::string& name, const G& gate, const moet::RowMatrix<typename G::Scalar>& x,
               const moet::RouteContext& ctx) {
  using S = typename G::Scalar;
  for (const int threads : {1, 2}) {
    moet::set_num_threads(threads);
    moet::Routing<S> r;
    gate.route(x, ctx, r);
    gate.route(x, ctx, r);
    Hash h;
    plan_into(h, r);
    print("plan", name + (threads == 1 ? " t1" : " t2"), h);
  }
  moet::set_num_threads(1);
}

// Backward of a trainable gate on its own plan: random dL/dw, the given loss-gradient input,
// dx starting from a random matrix (backward adds); hashes dx and every gradient, at 1 and 2
// threads.
template <class G, class LossGradFn>
void backward_case(const std::string& name, G gate, const moet::RowMatrix<typename G::Scalar>& x,
                   const moet::RouteContext& ctx, LossGradFn&& loss_grad_of) {
  using S = typename G::Scalar;
  for (const int threads : {1, 2}) {
    moet::set_num_threads(threads);
    G g = gate;
    moet::Routing<S> r;
    g.route(x, ctx, r);
    const auto dw = rnd<S>(1, r.num_assignments(), 400);
    std::vector<S> storage;
    const auto loss_grad = loss_grad_of(g, r, storage);
    moet::RowMatrix<S> dx = rnd<S>(x.rows(), x.cols(), 401);
    g.zero_grad();
    g.backward(x, ctx, r, std::span<const S>(dw.data(), static_cast<std::size_t>(dw.size())),
               loss_grad, dx);
    Hash h;
    h.mat(dx);
    g.visit_parameters(
        [&](std::string_view, moet::ParamMap<S>, moet::ParamMap<S> grad) { h.mat(grad); });
    print("bwd", name + (threads == 1 ? " t1" : " t2"), h);
  }
  moet::set_num_threads(1);
}

// Softmax-gate loss-gradient input: every part filled with seeded values (d_noise_logits only
// for a noisy gate).
template <class S>
struct SoftmaxGrads {
  bool noise = false;
  template <class G>
  moet::SoftmaxLossGrad<S> operator()(const G&, const moet::Routing<S>& r,
                                      std::vector<S>& storage) const {
    const auto size = static_cast<std::size_t>(r.num_tokens() * r.num_experts());
    const auto na = static_cast<std::size_t>(r.num_assignments());
    storage.resize(3 * size + na);
    const auto v = rnd<S>(1, static_cast<Index>(storage.size()), 402, 0.3);
    std::copy(v.data(), v.data() + v.size(), storage.data());
    moet::SoftmaxLossGrad<S> g;
    g.d_probs = {storage.data(), size};
    g.d_logits = {storage.data() + size, size};
    g.d_weights = {storage.data() + 2 * size, na};
    if (noise) g.d_noise_logits = {storage.data() + 2 * size + na, size};
    return g;
  }
};

// Non-negative attention rows that sum to 1 ([batch, heads, L, L]).
std::vector<float> attention(Index batch, Index heads, Index len, unsigned seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> a(static_cast<std::size_t>(batch * heads * len * len));
  for (std::size_t row = 0; row < a.size(); row += static_cast<std::size_t>(len)) {
    float sum = 0.0f;
    for (Index j = 0; j < len; ++j) sum += a[row + static_cast<std::size_t>(j)] = u(g);
    for (Index j = 0; j < len; ++j) a[row + static_cast<std::size_t>(j)] /= sum;
  }
  return a;
}

void gate_cases() {
  const Index n = 150, d = 24, e = 7;
  const auto x = rnd<float>(n, d, 500);
  const auto xd = rnd<double>(n, d, 501);
  const moet::RouteContext eval{};
  const moet::RouteContext train{.training = true, .seed = 11, .step = 5};
  std::mt19937 g(502);
  std::lognormal_distribution<float> ln(0.0f, 1.0f);
  std::vector<float> imp(static_cast<std::size_t>(n));
  for (auto& v : imp) v = ln(g);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(n), 1);
  for (std::size_t t = 0; t < valid.size(); t += 7) valid[t] = 0;
  imp[3] = imp[4];  // a tie in importance

  using TopK = moet::TopKGate<float>;
  const std::vector<std::pair<std::string, TopK::Options>> top_k = {
      {"switch", {.model_dim = d, .num_experts = e, .k = 1, .init_seed = 1}},
      {"gshard", {.model_dim = d, .num_experts = e, .k = 2, .renormalize = true, .init_seed = 2}},
      {"k3 raw", {.model_dim = d, .num_experts = e, .k = 3, .init_seed = 3}},
      {"k7 renorm", {.model_dim = d, .num_experts = e, .k = 7, .renormalize = true}},
      {"cap k2 renorm",
       {.model_dim = d,
        .num_experts = e,
        .k = 2,
        .renormalize = true,
        .capacity_factor = 1.0,
        .min_capacity = 1,
        .init_seed = 4}},
      {"cap k1 raw",
       {.model_dim = d,
        .num_experts = e,
        .k = 1,
        .capacity_factor = 0.5,
        .min_capacity = 0,
        .init_seed = 5}},
      {"noisy k2",
       {.model_dim = d,
        .num_experts = e,
        .k = 2,
        .renormalize = true,
        .noisy = true,
        .init_seed = 6}},
      {"noisy k2 raw cap",
       {.model_dim = d,
        .num_experts = e,
        .k = 2,
        .noisy = true,
        .capacity_factor = 1.25,
        .min_capacity = 2,
        .init_seed = 7}},
  };
  for (const auto& [name, o] : top_k) {
    TopK gate(o);
    if (o.noisy) gate.set_noise_router(rnd<float>(d, e, 503, 0.2), moet::WeightLayout::kInOut);
    plan_case("top_k " + name + " eval", gate, x, eval);
    plan_case("top_k " + name + " train", gate, x, train);
    backward_case("top_k " + name + " eval", gate, x, eval, SoftmaxGrads<float>{o.noisy});
    backward_case("top_k " + name + " train", gate, x, train, SoftmaxGrads<float>{o.noisy});
  }
  {  // every probability equal: ties everywhere, broken by id
    TopK gate({.model_dim = d, .num_experts = e, .k = 3, .renormalize = true});
    gate.set_router(moet::RowMatrix<float>::Zero(d, e), moet::WeightLayout::kInOut);
    plan_case("top_k ties", gate, x, eval);
    moet::TopPGate<float> top_p({.model_dim = d, .num_experts = e, .p = 0.5});
    top_p.set_router(moet::RowMatrix<float>::Zero(d, e), moet::WeightLayout::kInOut);
    plan_case("top_p ties", top_p, x, eval);
  }
  plan_case("top_k double gshard",
            moet::TopKGate<double>({.model_dim = d, .num_experts = e, .k = 2, .renormalize = true}),
            xd, eval);
  backward_case("top_k double noisy",
                moet::TopKGate<double>({.model_dim = d,
                                        .num_experts = e,
                                        .k = 2,
                                        .renormalize = true,
                                        .noisy = true,
                                        .init_seed = 9}),
                xd, train, SoftmaxGrads<double>{true});

  using TopP = moet::TopPGate<float>;
  const std::vector<std::pair<std::string, TopP::Options>> top_p = {
      {"p0.4", {.model_dim = d, .num_experts = e, .p = 0.4, .init_seed = 1}},
      {"p0.9 inclusive", {.model_dim = d, .num_experts = e, .p = 0.9, .inclusive = true}},
      {"p0.7 max_k2", {.model_dim = d, .num_experts = e, .p = 0.7, .max_k = 2, .init_seed = 2}},
      {"p1", {.model_dim = d, .num_experts = e, .p = 1.0, .init_seed = 3}},
  };
  for (const auto& [name, o] : top_p) {
    plan_case("top_p " + name, TopP(o), x, eval);
    backward_case("top_p " + name, TopP(o), x, eval, SoftmaxGrads<float>{});
  }
  backward_case("top_p double", moet::TopPGate<double>({.model_dim = d, .num_experts = e}), xd,
                eval, SoftmaxGrads<double>{});

  using Imp = moet::ImportanceGate<float>;
  const std::vector<std::pair<std::string, Imp::Options>> importance = {
      {"max", {.model_dim = d, .num_experts = e, .k_max = 4, .init_seed = 1}},
      {"minmax renorm",
       {.model_dim = d,
        .num_experts = e,
        .k_min = 2,
        .k_max = 5,
        .norm = moet::ImportanceNorm::kMinMax,
        .renormalize = true,
        .init_seed = 2}},
      {"budget",
       {.model_dim = d,
        .num_experts = e,
        .k_min = 1,
        .k_max = 6,
        .norm = moet::ImportanceNorm::kBudget,
        .k_avg = 2.5,
        .init_seed = 3}},
  };
  const std::vector<float> att = attention(3, 2, 50, 504);
  for (const auto& [name, o] : importance) {
    moet::RouteContext with_imp;
    with_imp.importance = imp;
    plan_case("importance " + name + " imp", Imp(o), x, with_imp);
    backward_case("importance " + name + " imp", Imp(o), x, with_imp, SoftmaxGrads<float>{});
    with_imp.sequence_length = 50;
    with_imp.valid = valid;
    plan_case("importance " + name + " imp seq valid", Imp(o), x, with_imp);
    for (const bool causal : {false, true}) {
      moet::RouteContext with_att;
      with_att.attention = {att.data(), 3, 2, 50, causal};
      with_att.valid = valid;
      plan_case("importance " + name + (causal ? " att causal" : " att"), Imp(o), x, with_att);
    }
  }

  using Sto = moet::StochasticGate<float>;
  for (const auto mode :
       {moet::StochasticInference::kToken, moet::StochasticInference::kPosition,
        moet::StochasticInference::kSequence, moet::StochasticInference::kEnsemble}) {
    const Sto gate({.model_dim = d, .num_experts = e, .inference = mode, .stream = 3});
    moet::RouteContext ctx{.seed = 9, .step = 2, .sequence_length = 30};
    const std::string name = "stochastic mode " + std::to_string(static_cast<int>(mode));
    plan_case(name, gate, x, ctx);
    ctx.training = true;
    plan_case(name + " train", gate, x, ctx);
  }

  using Any = moet::TopAnyGate<float>;
  for (const auto variant : {moet::TopAnyVariant::kDeepSpeed, moet::TopAnyVariant::kTutel}) {
    Any::Options options;  // 5 live experts of e slots, in either tree's spelling
    options.model_dim = d;
#if __has_include(<moet/gates/top_any_adaptive.hpp>)  // after the TopAnyGate split
    options.num_experts = e;
    options.initial_experts = 5;
#else
    options.num_experts = 5;
    options.max_experts = e;
#endif
    options.variant = variant;
    options.init_seed = 8;
    Any gate(options);
    const std::string name =
        std::string("top_any ") + (variant == moet::TopAnyVariant::kTutel ? "tutel" : "deepspeed");
    plan_case(name + " eval", gate, x, eval);
    plan_case(name + " train", gate, x, train);
    backward_case(name + " train", gate, x, train,
                  [](const Any&, const moet::Routing<float>& r, std::vector<float>& storage) {
                    storage.assign(static_cast<std::size_t>(r.num_tokens() * r.num_experts()),
                                   0.0f);
                    const auto v = rnd<float>(1, static_cast<Index>(storage.size()), 505, 0.2);
                    std::copy(v.data(), v.data() + v.size(), storage.data());
                    return moet::TopAnyLossGrad<float>{storage};
                  });
  }
}

void loss_cases() {
  const Index n = 90, d = 16, e = 6;
  const auto x = rnd<float>(n, d, 600);
  moet::TopKGate<float> gate(
      {.model_dim = d, .num_experts = e, .k = 2, .renormalize = true, .noisy = true});
  gate.set_noise_router(rnd<float>(d, e, 601, 0.2), moet::WeightLayout::kInOut);
  const moet::RouteContext ctx{.training = true, .seed = 4, .step = 1};
  moet::Routing<float> r;
  gate.route(x, ctx, r);
  Hash h;
  moet::RowMatrix<float> dp = moet::RowMatrix<float>::Zero(n, e), z(n, e), dz(n, e), nl(n, e),
                         eps(n, e), dn(n, e);
  double v = moet::load_balance_loss<float>(r, dp, moet::LoadBalanceOptions::mixtral_options());
  v += moet::load_balance_loss<float>(r, dp);
  v += moet::router_entropy_loss<float>(r.probs(), dp);
  gate.logits(x, z);
  dz.setZero();
  v += moet::router_z_loss<float>(z, dz);
  std::vector<float> dw(static_cast<std::size_t>(r.num_assignments()), 0.0f);
  v += moet::importance_loss(r, std::span<float>(dw));
  gate.noise_logits(x, ctx, nl, eps);
  dn.setZero();
  v += moet::noisy_load_loss<float>(z, nl, eps, dz, dn, {.k = 2});
  const auto a = rnd<float>(n, 11, 602), b = rnd<float>(n, 11, 603);
  moet::RowMatrix<float> da = moet::RowMatrix<float>::Zero(n, 11), db = da;
  v += moet::consistency_loss<float>(a, b, da, db);
  h.bytes(&v, sizeof v);
  h.mat(dp);
  h.mat(dz);
  h.mat(dn);
  h.bytes(dw.data(), dw.size() * sizeof(float));
  h.mat(da);
  h.mat(db);
  moet::TopAnyGate<float> any({.model_dim = d, .num_experts = e});
  moet::Routing<float> ra;
  any.route(x, ctx, ra);
  std::vector<float> dg(static_cast<std::size_t>(n * e), 0.0f);
  any.zero_grad();
  const auto aux = moet::top_any_aux_loss(any, ra, std::span<float>(dg));
  h.bytes(&aux.value, sizeof aux.value);
  h.bytes(dg.data(), dg.size() * sizeof(float));
  any.visit_parameters(
      [&](std::string_view, moet::ParamMap<float>, moet::ParamMap<float> g) { h.mat(g); });
  print("loss", "all losses", h);
}

// The benchmarks' gates (moet-compare's defaults) on bench_gates' seeded inputs.
void bench_cases() {
  for (const char* shape_name : {"tiny", "S1", "S2", "S3"}) {
    setenv("MOET_BENCH_SHAPE", shape_name, 1);
    const moet::bench::Shape shape = moet::bench::bench_shape("S2");
    for (const Index tokens : {Index{1}, Index{32}, Index{512}}) {
      const auto x = moet::bench::random_tokens(tokens, shape.d, 7);
      const auto importance = moet::bench::random_importance(tokens, 8);
      moet::RouteContext ctx;
      ctx.seed = 42;
      ctx.importance = importance;
      const std::string suffix = std::string(" ") + shape_name + " T" + std::to_string(tokens);
      plan_case("bench top_k" + suffix, moet::bench::make_gate<moet::TopKGate<float>>(shape), x,
                ctx);
      plan_case("bench top_p" + suffix, moet::bench::make_gate<moet::TopPGate<float>>(shape), x,
                ctx);
      plan_case("bench top_any" + suffix, moet::bench::make_gate<moet::TopAnyGate<float>>(shape), x,
                ctx);
      plan_case("bench importance" + suffix,
                moet::bench::make_gate<moet::ImportanceGate<float>>(shape), x, ctx);
      plan_case("bench stochastic" + suffix,
                moet::bench::make_gate<moet::StochasticGate<float>>(shape), x, ctx);
    }
  }
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
  layer_case(
      "layer top_p ffn relu f32",
      moet::MoELayer(
          moet::TopPGate<float>({.model_dim = 40, .num_experts = 4, .p = 0.7, .init_seed = 5}),
          moet::ReluFfnExperts<float>(
              {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 19})));
  layer_case(
      "layer noisy top_k swiglu f32",
      moet::MoELayer(moet::TopKGate<float>({.model_dim = 40,
                                            .num_experts = 4,
                                            .k = 2,
                                            .renormalize = true,
                                            .noisy = true,
                                            .capacity_factor = 1.0,
                                            .init_seed = 6}),
                     moet::SwiGluExperts<float>(
                         {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 20})));
  layer_case(
      "layer stochastic swiglu f32",
      moet::MoELayer(moet::StochasticGate<float>({.model_dim = 40, .num_experts = 4}),
                     moet::SwiGluExperts<float>(
                         {.model_dim = 40, .hidden_dim = 72, .num_experts = 4, .init_seed = 21})));
  gate_cases();
  loss_cases();
  bench_cases();
}
