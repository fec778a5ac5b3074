// GroupedDispatch's split backward (dispatch/backward_split.hpp): float banks with current
// packed weights run their backward as row pieces, packs and slices of every weight gradient.
// Oracles: the same dispatch on a double bank holding the same weights (the per-expert backward
// in Eigen, itself checked against finite differences in test_grad_experts.cpp) for dx, the
// combine-weight gradients and every parameter gradient; a second backward adds the same
// gradients again; experts without rows keep zero gradients; and 1, 2 and 3 threads give the
// same bits, for a hot expert, an idle one and a two-expert layer; the dense (shared-expert)
// backward the same way for one and three experts; and split_backward_pieces with the
// expert-parallel layer's interleaved (rank-major) pieces gives the expert-major split's bits.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/config.hpp"
#include "moet/dispatch/backward_split.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/routing.hpp"

#include "random_rows.hpp"

namespace test_backward_split {  // one per file: the unity build puts several files in one TU

namespace {

using moet::Index;
using moet::RowMatrix;
using moet_test::random_rows;

// A plan over `tokens` tokens and `experts` experts where expert 0 is hot (about 3 of 4 tokens
// take it first), the last expert gets nothing (with more than 2 experts), and tokens take
// 1 or 2 experts. The weights are arbitrary positive values.
template <class S>
moet::Routing<S> skewed_plan(Index tokens, Index experts) {
  moet::Routing<S> r;
  r.reset(tokens, experts);
  const Index used = experts > 2 ? experts - 1 : experts;
  for (Index t = 0; t < tokens; ++t) r.counts()[static_cast<std::size_t>(t)] = 1 + t % 2;
  r.commit_counts();
  for (Index t = 0; t < tokens; ++t) {
    const auto ex = r.experts(t);
    const auto w = r.weights(t);
    ex[0] = static_cast<std::int32_t>(t % 4 == 3 ? (t / 4) % used : 0);
    w[0] = static_cast<S>(0.25 + 0.5 * static_cast<double>(t % 5) / 5.0);
    if (ex.size() > 1) {
      ex[1] = static_cast<std::int32_t>(1 + (t / 2) % (used - 1));
      if (ex[1] == ex[0]) ex[1] = static_cast<std::int32_t>((ex[1] + 1) % used);
      w[1] = static_cast<S>(0.6 - 0.1 * static_cast<double>(t % 3));
    }
  }
  return r;
}

template <class S>
moet::Routing<S> convert(const moet::Routing<float>& f) {
  moet::Routing<S> r;
  r.reset(f.num_tokens(), f.num_experts());
  for (Index t = 0; t < f.num_tokens(); ++t) r.counts()[static_cast<std::size_t>(t)] = f.k(t);
  r.commit_counts();
  for (Index t = 0; t < f.num_tokens(); ++t) {
    for (Index j = 0; j < f.k(t); ++j) {
      r.experts(t)[static_cast<std::size_t>(j)] = f.experts(t)[static_cast<std::size_t>(j)];
      r.weights(t)[static_cast<std::size_t>(j)] = f.weights(t)[static_cast<std::size_t>(j)];
    }
  }
  return r;
}

// Every gradient stack, read through the const `grad` (visit_parameters would mark the packed
// copy stale, and the next backward would not split).
template <class Bank>
std::vector<RowMatrix<double>> grads_of(const Bank& bank) {
  std::vector<RowMatrix<double>> out;
  for (std::size_t t = 0; t < Bank::kNumTensors; ++t) {
    const auto& g = bank.grad(static_cast<typename Bank::Tensor>(t));
    if (g.size() > 0) out.emplace_back(g.template cast<double>());
  }
  return out;
}

// Float banks must take the split path on every call of these tests.
template <class Bank>
void require_split(const Bank& bank) {
  if constexpr (std::is_same_v<typename Bank::Scalar, float>) {
    REQUIRE(bank.backward_split_products() > 0);
  } else {
    REQUIRE(bank.backward_split_products() == 0);  // the double oracle does not split
  }
}

// Everything one forward_train + `passes` backwards produce: y, dx, d_weights, the gradients.
struct Result {
  std::vector<RowMatrix<double>> tensors;
};

template <class Bank>
Result train(Bank& bank, const RowMatrix<float>& x, const RowMatrix<float>& dy,
             const moet::Routing<float>& plan, Index block_rows, int passes) {
  using S = typename Bank::Scalar;
  const moet::GroupedDispatch dispatch({.block_rows = block_rows});
  const RowMatrix<S> xs = x.cast<S>();
  const RowMatrix<S> dys = dy.cast<S>();
  const moet::Routing<S> routing = convert<S>(plan);
  typename moet::GroupedDispatch::Workspace<Bank> ws;
  RowMatrix<S> y(x.rows(), x.cols());
  RowMatrix<S> dx(x.rows(), x.cols());
  std::vector<S> d_weights(static_cast<std::size_t>(routing.num_assignments()));
  require_split(bank);
  bank.zero_grad();
  dispatch.forward_train(bank, xs, routing, y, ws);
  for (int i = 0; i < passes; ++i) dispatch.backward(bank, xs, routing, dys, ws, d_weights, dx);
  Result r;
  r.tensors.emplace_back(y.template cast<double>());
  r.tensors.emplace_back(dx.template cast<double>());
  RowMatrix<double> dw(1, static_cast<Index>(d_weights.size()));
  for (std::size_t i = 0; i < d_weights.size(); ++i) dw(0, static_cast<Index>(i)) = d_weights[i];
  r.tensors.emplace_back(dw);
  for (auto& g : grads_of(bank)) r.tensors.emplace_back(std::move(g));
  return r;
}

// Copies `fb`'s weights into `db` (the double oracle).
template <class FBank, class DBank>
void copy_weights(const FBank& fb, DBank& db) {
  auto edit = db.edit();
  for (std::size_t t = 0; t < FBank::kNumTensors; ++t) {
    const auto id = static_cast<typename FBank::Tensor>(t);
    if (fb.stack(id).size() > 0) edit.stack(id) = fb.stack(id).template cast<double>();
  }
}

bool same_bits(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * static_cast<std::size_t>(a.size())) == 0;
}

struct ThreadGuard {
  int saved = moet::num_threads();
  ~ThreadGuard() { moet::set_num_threads(saved); }
};

// The float bank's split backward against the double bank's per-expert backward, once and
// twice (the second pass adds the same gradients), with gradient tolerance `rel`.
template <class FBank, class DBank>
void check_split(FBank fb, DBank db, double rel, const std::string& kind) {
  INFO(kind);
  copy_weights(fb, db);
  const Index d = fb.model_dim();
  const Index experts = fb.num_experts();
  for (const Index tokens : {Index{1}, Index{7}, Index{61}}) {
    for (const int passes : {1, 2}) {
      INFO("tokens " << tokens << ", passes " << passes);
      const RowMatrix<float> x = random_rows(tokens, d, static_cast<std::uint32_t>(tokens));
      const RowMatrix<float> dy = random_rows(tokens, d, static_cast<std::uint32_t>(100 + tokens));
      const auto plan = skewed_plan<float>(tokens, experts);
      const Result got = train(fb, x, dy, plan, /*block_rows=*/8, passes);
      const Result want = train(db, x, dy, plan, /*block_rows=*/8, passes);
      REQUIRE(got.tensors.size() == want.tensors.size());
      for (std::size_t i = 0; i < got.tensors.size(); ++i) {
        INFO("tensor " << i << " (0 y, 1 dx, 2 d_weights, then the gradients)");
        const RowMatrix<double>& g = got.tensors[i];
        const RowMatrix<double>& w = want.tensors[i];
        REQUIRE(g.rows() == w.rows());
        REQUIRE(g.cols() == w.cols());
        const double err = (g - w).norm();
        // The combine-weight gradients dy_t . out_a of one or two tokens can cancel: their
        // error is bounded by |dy| times the outputs' (bf16 forward) error, not by their norm.
        const double scale = w.norm() + (i == 2 ? dy.cast<double>().norm() : 0.0);
        INFO("relative error " << err / (w.norm() + 1e-30));
        CHECK(err <= rel * scale + 1e-12);
      }
      // The idle expert's gradients are exactly zero (its rows of every gradient stack).
      if (experts > 2) {
        for (std::size_t i = 3; i < got.tensors.size(); ++i) {
          const RowMatrix<double>& g = got.tensors[i];
          const Index per = g.rows() / experts;
          CHECK(g.bottomRows(per).isZero(0.0));
        }
      }
    }
  }
}

// Every token through every expert (backward_dense_experts): y, dx (added to a non-zero dx)
// and the gradients.
template <class Bank>
Result train_dense(Bank& bank, const RowMatrix<float>& x, const RowMatrix<float>& dy) {
  using S = typename Bank::Scalar;
  const RowMatrix<S> xs = x.cast<S>();
  const RowMatrix<S> dys = dy.cast<S>();
  moet::DenseWorkspace<Bank> ws;
  RowMatrix<S> y = RowMatrix<S>::Zero(x.rows(), x.cols());
  RowMatrix<S> dx = RowMatrix<S>::Constant(x.rows(), x.cols(), S(0.5));
  require_split(bank);
  bank.zero_grad();
  moet::add_dense_experts_train(bank, xs, y, ws);
  moet::backward_dense_experts(bank, xs, dys, dx, ws);
  Result r;
  r.tensors.emplace_back(y.template cast<double>());
  r.tensors.emplace_back(dx.template cast<double>());
  for (auto& g : grads_of(bank)) r.tensors.emplace_back(std::move(g));
  return r;
}

// One split backward called directly (`call(ws, threads, din)`: split_backward or
// split_backward_pieces over `rows` rows in blocks of up to `block`), `passes` times on one
// workspace after `zero_grad`: din `(rows, model_dim)`, then every gradient stack.
template <class Bank, class Call>
std::vector<RowMatrix<double>> split_directly(Bank& bank, Index rows, Index block, int passes,
                                              Call&& call) {
  moet::detail::BackwardSplitWorkspace<Bank> ws;
  std::vector<moet::detail::ExpertThreadScratch<Bank>> threads;
  moet::detail::prepare_thread_scratch(bank, threads, block, /*gather=*/true, /*output=*/true);
  RowMatrix<float> din = RowMatrix<float>::Zero(rows, bank.model_dim());
  require_split(bank);
  bank.zero_grad();
  for (int i = 0; i < passes; ++i) REQUIRE(call(ws, threads, moet::Rows<float>(din)));
  std::vector<RowMatrix<double>> out;
  out.emplace_back(din.cast<double>());
  for (auto& g : grads_of(bank)) out.emplace_back(std::move(g));
  return out;
}

}  // namespace

TEST_CASE(
    "The dense backward's split equals the double backward, with the same bits at 1 and 2 "
    "threads",
    "[dispatch][grad][split][dense]") {
  const ThreadGuard guard;
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const double rel = format == moet::WeightFormat::kF32 ? 2e-5 : 2e-2;
  INFO("weights " << moet::weight_format_name(format));
  for (const Index experts : {Index{1}, Index{3}}) {
    for (const Index tokens : {Index{5}, Index{300}}) {  // 300: three row blocks of 128
      INFO("experts " << experts << ", tokens " << tokens);
      moet::SwiGluExperts<float> fb({.model_dim = 24,
                                     .hidden_dim = 280,
                                     .num_experts = experts,
                                     .init_seed = 11,
                                     .weight_format = format});
      moet::SwiGluExperts<double> db({.model_dim = 24, .hidden_dim = 280, .num_experts = experts});
      copy_weights(fb, db);
      const RowMatrix<float> x = random_rows(tokens, 24, 12);
      const RowMatrix<float> dy = random_rows(tokens, 24, 13);
      moet::set_num_threads(1);
      const Result one = train_dense(fb, x, dy);
      moet::set_num_threads(2);
      const Result two = train_dense(fb, x, dy);
      const Result want = train_dense(db, x, dy);
      REQUIRE(one.tensors.size() == want.tensors.size());
      for (std::size_t i = 0; i < one.tensors.size(); ++i) {
        INFO("tensor " << i << " (0 y, 1 dx, then the gradients)");
        CHECK(same_bits(one.tensors[i], two.tensors[i]));
        const double err = (one.tensors[i] - want.tensors[i]).norm();
        INFO("relative error " << err / want.tensors[i].norm());
        CHECK(err <= rel * want.tensors[i].norm());
      }
    }
  }
}

TEST_CASE("The split backward equals the double per-expert backward", "[dispatch][grad][split]") {
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const double rel = format == moet::WeightFormat::kF32 ? 2e-5 : 2e-2;
  INFO("weights " << moet::weight_format_name(format));
  for (const auto& [d, f] : {std::pair<Index, Index>{16, 32}, {13, 37}, {24, 300}}) {
    INFO("d " << d << " f " << f);
    check_split(moet::SwiGluExperts<float>({.model_dim = d,
                                            .hidden_dim = f,
                                            .num_experts = 4,
                                            .init_seed = 3,
                                            .weight_format = format}),
                moet::SwiGluExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 4}),
                rel, "swiglu");
    check_split(moet::GeGluExperts<float>({.model_dim = d,
                                           .hidden_dim = f,
                                           .num_experts = 2,
                                           .init_seed = 4,
                                           .weight_format = format}),
                moet::GeGluExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 2}),
                rel, "geglu, two experts");
    moet::GeluFfnExperts<float> ffn({.model_dim = d,
                                     .hidden_dim = f,
                                     .num_experts = 3,
                                     .init_seed = 5,
                                     .weight_format = format});
    ffn.edit().in_bias_stack() = random_rows(3, f, 23);
    ffn.edit().out_bias_stack() = random_rows(3, d, 24);
    check_split(ffn,
                moet::GeluFfnExperts<double>({.model_dim = d, .hidden_dim = f, .num_experts = 3}),
                rel, "ffn-gelu with biases");
  }
}

TEST_CASE("The split backward gives the same bits for 1, 2 and 3 threads",
          "[dispatch][grad][split][parallel]") {
  const ThreadGuard guard;
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  INFO("weights " << moet::weight_format_name(format));
  for (const Index experts : {Index{2}, Index{5}}) {
    INFO("experts " << experts);
    // hidden_dim 600: the down product's 600 gradient rows are 3 slices.
    moet::SwiGluExperts<float> glu({.model_dim = 40,
                                    .hidden_dim = 600,
                                    .num_experts = experts,
                                    .init_seed = 7,
                                    .weight_format = format});
    moet::ReluFfnExperts<float> ffn({.model_dim = 40,
                                     .hidden_dim = 520,
                                     .num_experts = experts,
                                     .init_seed = 8,
                                     .weight_format = format});
    ffn.edit().in_bias_stack() = random_rows(experts, 520, 25);
    const RowMatrix<float> x = random_rows(150, 40, 9);
    const RowMatrix<float> dy = random_rows(150, 40, 10);
    const auto plan = skewed_plan<float>(150, experts);
    const auto run = [&](auto bank, int threads) {
      moet::set_num_threads(threads);
      return train(bank, x, dy, plan, /*block_rows=*/16, /*passes=*/2);
    };
    for (int threads : {2, 3}) {
      INFO("threads " << threads);
      const Result one_glu = run(glu, 1);
      const Result many_glu = run(glu, threads);
      const Result one_ffn = run(ffn, 1);
      const Result many_ffn = run(ffn, threads);
      for (std::size_t i = 0; i < one_glu.tensors.size(); ++i) {
        INFO("glu tensor " << i);
        CHECK(same_bits(one_glu.tensors[i], many_glu.tensors[i]));
      }
      for (std::size_t i = 0; i < one_ffn.tensors.size(); ++i) {
        INFO("ffn tensor " << i);
        CHECK(same_bits(one_ffn.tensors[i], many_ffn.tensors[i]));
      }
    }
  }
}

TEST_CASE(
    "split_backward_pieces with interleaved (rank-major) pieces equals the expert-major split, "
    "bit for bit",
    "[dispatch][grad][split][pieces]") {
  const ThreadGuard guard;
  const moet::WeightFormat format = GENERATE(moet::WeightFormat::kF32, moet::WeightFormat::kBf16);
  const double rel = format == moet::WeightFormat::kF32 ? 2e-5 : 2e-2;
  INFO("weights " << moet::weight_format_name(format));
  constexpr Index kExperts = 4;
  constexpr Index kBlock = 8;
  constexpr int kPasses = 2;  // the second adds the same gradients (the accumulate path)
  // hidden_dim 288: the down product's 288 gradient rows are 2 slices.
  moet::SwiGluExperts<float> fb({.model_dim = 32,
                                 .hidden_dim = 288,
                                 .num_experts = kExperts,
                                 .init_seed = 19,
                                 .weight_format = format});
  const Index d = fb.model_dim();
  // Rows per (source rank, expert), as the expert-parallel layer receives them: rank-major,
  // expert 2 gets none. Each expert's segments but its last are whole blocks, so that its pieces
  // are cut as split_backward cuts its expert-major rows (37, 20, 0, 29 rows).
  const std::array<std::array<Index, kExperts>, 3> segments = {
      {{16, 8, 0, 0}, {8, 0, 0, 16}, {13, 12, 0, 13}}};
  std::vector<Index> offsets(kExperts + 1, 0);  // expert-major
  for (const auto& rank : segments) {
    for (std::size_t e = 0; e < kExperts; ++e) offsets[e + 1] += rank[e];
  }
  for (std::size_t e = 0; e < kExperts; ++e) offsets[e + 1] += offsets[e];
  const Index rows = offsets.back();
  std::vector<std::int32_t> active;
  for (std::size_t e = 0; e < kExperts; ++e) {
    if (offsets[e + 1] > offsets[e]) active.push_back(static_cast<std::int32_t>(e));
  }
  // The rank-major position of every expert-major row, and the pieces in the layer's order: for
  // each source rank, for each expert, its segment in blocks.
  std::vector<Index> position(static_cast<std::size_t>(rows));
  std::vector<std::array<Index, 3>> pieces;
  std::vector<Index> seen(kExperts, 0);
  Index next = 0;
  for (const auto& rank : segments) {
    for (std::size_t e = 0; e < kExperts; ++e) {
      for (Index i = 0; i < rank[e]; i += kBlock) {
        pieces.push_back({static_cast<Index>(e), next + i, std::min(kBlock, rank[e] - i)});
      }
      for (Index i = 0; i < rank[e]; ++i) {
        position[static_cast<std::size_t>(offsets[e] + seen[e]++)] = next++;
      }
    }
  }
  // The pieces interleave, and each expert's are split_backward's blocks, in row order.
  REQUIRE(pieces[2][0] == 1);
  REQUIRE(pieces[3][0] == 0);
  for (std::size_t e = 0; e < kExperts; ++e) {
    Index r = offsets[e];
    for (const auto& [pe, begin, n] : pieces) {
      if (pe != static_cast<Index>(e)) continue;
      REQUIRE(n == std::min(kBlock, offsets[e + 1] - r));
      REQUIRE(begin == position[static_cast<std::size_t>(r)]);
      r += n;
    }
    REQUIRE(r == offsets[e + 1]);
  }

  // Expert-major inputs and forward_train's cache, and the same rows rank-major.
  const RowMatrix<float> in = random_rows(rows, d, 41);
  const RowMatrix<float> dout = random_rows(rows, d, 42);
  RowMatrix<float> cache(rows, fb.cache_width());
  {
    RowMatrix<float> out(rows, d);
    typename moet::SwiGluExperts<float>::Scratch scratch;
    fb.reserve(scratch, rows);
    for (const std::int32_t e : active) {
      const Index begin = offsets[static_cast<std::size_t>(e)];
      const Index n = offsets[static_cast<std::size_t>(e) + 1] - begin;
      fb.forward_train(e, in.middleRows(begin, n), out.middleRows(begin, n),
                       cache.middleRows(begin, n), scratch);
    }
  }
  RowMatrix<float> in_ranks(rows, d);
  RowMatrix<float> dout_ranks(rows, d);
  RowMatrix<float> cache_ranks(rows, cache.cols());
  for (Index j = 0; j < rows; ++j) {
    const Index p = position[static_cast<std::size_t>(j)];
    in_ranks.row(p) = in.row(j);
    dout_ranks.row(p) = dout.row(j);
    cache_ranks.row(p) = cache.row(j);
  }

  const auto expert_major = [&](auto& ws, auto& threads, moet::Rows<float> din) {
    const auto fill = [&](Index begin, Index n, auto&& x, auto&& g) {
      x = in.middleRows(begin, n);
      g = dout.middleRows(begin, n);
    };
    return moet::detail::split_backward(fb, std::span<const Index>(offsets),
                                        std::span<const std::int32_t>(active), kBlock,
                                        moet::ConstRows<float>(cache), din, ws, threads, fill);
  };
  const auto interleaved = [&](auto& ws, auto& threads, moet::Rows<float> din) {
    ws.row_pieces.assign(pieces.begin(), pieces.end());
    const auto fill = [&](Index begin, Index n, auto&& x, auto&& g) {
      x = in_ranks.middleRows(begin, n);
      g = dout_ranks.middleRows(begin, n);
    };
    return moet::detail::split_backward_pieces(fb, rows, static_cast<Index>(pieces.size()), kBlock,
                                               moet::ConstRows<float>(cache_ranks), din, ws,
                                               threads, fill);
  };

  // The double oracle: the per-expert backward on each expert's rows in one call.
  moet::SwiGluExperts<double> db({.model_dim = 32, .hidden_dim = 288, .num_experts = kExperts});
  copy_weights(fb, db);
  std::vector<RowMatrix<double>> oracle;
  {
    const RowMatrix<double> ind = in.cast<double>();
    const RowMatrix<double> doutd = dout.cast<double>();
    RowMatrix<double> out(rows, d);
    RowMatrix<double> cached(rows, db.cache_width());
    RowMatrix<double> din = RowMatrix<double>::Zero(rows, d);
    typename moet::SwiGluExperts<double>::Scratch scratch;
    db.zero_grad();
    for (const std::int32_t e : active) {
      const Index begin = offsets[static_cast<std::size_t>(e)];
      const Index n = offsets[static_cast<std::size_t>(e) + 1] - begin;
      db.forward_train(e, ind.middleRows(begin, n), out.middleRows(begin, n),
                       cached.middleRows(begin, n), scratch);
      for (int i = 0; i < kPasses; ++i) {
        db.backward(e, ind.middleRows(begin, n), cached.middleRows(begin, n),
                    doutd.middleRows(begin, n), din.middleRows(begin, n), scratch);
      }
    }
    oracle.emplace_back(din);
    for (auto& g : grads_of(db)) oracle.emplace_back(std::move(g));
  }

  std::vector<RowMatrix<double>> first;
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    moet::set_num_threads(threads);
    const std::vector<RowMatrix<double>> want =
        split_directly(fb, rows, kBlock, kPasses, expert_major);
    std::vector<RowMatrix<double>> got = split_directly(fb, rows, kBlock, kPasses, interleaved);
    RowMatrix<double> din(rows, d);  // the interleaved din back in expert-major order
    for (Index j = 0; j < rows; ++j) din.row(j) = got[0].row(position[static_cast<std::size_t>(j)]);
    got[0] = din;
    if (first.empty()) first = want;
    REQUIRE(got.size() == want.size());
    REQUIRE(got.size() == oracle.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      INFO("tensor " << i << " (0 din, then the gradients)");
      CHECK(same_bits(got[i], want[i]));
      CHECK(same_bits(want[i], first[i]));
      const double err = (got[i] - oracle[i]).norm();
      INFO("relative error " << err / (oracle[i].norm() + 1e-30));
      CHECK(err <= rel * oracle[i].norm() + 1e-12);
      if (i > 0) {  // the idle expert's gradients stay exactly zero
        const Index per = got[i].rows() / kExperts;
        CHECK(got[i].middleRows(2 * per, per).isZero(0.0));
      }
    }
  }
}

}  // namespace test_backward_split
