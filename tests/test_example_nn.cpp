// The real-data examples' dense layers (examples/support/nn.hpp): every backward against central
// finite differences in double, attention against a naive per-head loop, and the causal mask.

#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <vector>

#include "../examples/support/nn.hpp"

namespace test_example_nn {  // one per file: the unity build puts several files in one TU

namespace {

using examples::Index;
using examples::RowMatrix;
using M = RowMatrix<double>;

// Relative error between an analytic and a finite-difference gradient, over all entries.
double rel_error(const M& analytic, const M& numeric) {
  return (analytic - numeric).norm() / std::max(1e-12, numeric.norm());
}

// Central differences of `loss()` with respect to every entry of `p`.
M numeric_grad(M& p, const std::function<double()>& loss, double h = 1e-6) {
  M g(p.rows(), p.cols());
  for (Index i = 0; i < p.size(); ++i) {
    const double old = p.data()[i];
    p.data()[i] = old + h;
    const double up = loss();
    p.data()[i] = old - h;
    const double down = loss();
    p.data()[i] = old;
    g.data()[i] = (up - down) / (2 * h);
  }
  return g;
}

// The scalar L = sum(y .* r) used to test every layer: dL/dy = r.
double project(const M& y, const M& r) { return y.cwiseProduct(r).sum(); }

}  // namespace

TEST_CASE("Linear backward matches finite differences", "[examples][grad]") {
  examples::Linear<double> lin(5, 3, 1);
  lin.b = examples::normal_matrix<double>(1, 3, 1.0, 2);
  M x = examples::normal_matrix<double>(4, 5, 1.0, 3);
  const M r = examples::normal_matrix<double>(4, 3, 1.0, 4);
  lin.zero_grad();
  const M dx = lin.backward(x, r);
  auto loss = [&] { return project(lin.forward(x), r); };
  CHECK(rel_error(dx, numeric_grad(x, loss)) < 1e-7);
  const M dw = lin.dw, db = lin.db;
  CHECK(rel_error(dw, numeric_grad(lin.w, loss)) < 1e-7);
  CHECK(rel_error(db, numeric_grad(lin.b, loss)) < 1e-7);
  // Gradients accumulate until zero_grad.
  lin.backward(x, r);
  CHECK(rel_error(lin.dw, 2 * dw) < 1e-12);
}

TEST_CASE("RmsNorm normalises rows and its backward matches finite differences",
          "[examples][grad]") {
  examples::RmsNorm<double> norm(6);
  norm.g = examples::normal_matrix<double>(1, 6, 1.0, 5);
  M x = examples::normal_matrix<double>(3, 6, 2.0, 6);
  const M y = norm.forward(x);
  for (Index t = 0; t < 3; ++t) {
    const double r = std::sqrt(x.row(t).squaredNorm() / 6.0 + norm.eps);
    for (Index j = 0; j < 6; ++j) CHECK(y(t, j) == Approx(x(t, j) * norm.g(0, j) / r));
  }
  const M r = examples::normal_matrix<double>(3, 6, 1.0, 7);
  norm.zero_grad();
  const M dx = norm.backward(x, r);
  auto loss = [&] { return project(norm.forward(x), r); };
  CHECK(rel_error(dx, numeric_grad(x, loss)) < 1e-6);
  const M dg = norm.dg;
  CHECK(rel_error(dg, numeric_grad(norm.g, loss)) < 1e-6);
}

TEST_CASE("Embedding backward scatters into the looked-up rows", "[examples][grad]") {
  examples::Embedding<double> emb(5, 3, 1.0, 8);
  const std::vector<int> ids = {4, 1, 4, 0};
  const M r = examples::normal_matrix<double>(4, 3, 1.0, 9);
  emb.zero_grad();
  emb.backward(ids, r);
  const M dtable = emb.dtable;
  auto loss = [&] { return project(emb.forward(ids), r); };
  CHECK(rel_error(dtable, numeric_grad(emb.table, loss)) < 1e-7);
  CHECK(emb.dtable.row(2).norm() == 0.0);  // never looked up
}

TEST_CASE("CausalSelfAttention matches a naive loop, is causal, and its backward matches "
          "finite differences",
          "[examples][grad]") {
  constexpr Index kBatch = 2, kLen = 4, kDim = 6, kHeads = 2;
  examples::CausalSelfAttention<double> att(kDim, kHeads, 3);
  examples::CausalSelfAttention<double>::Cache cache;
  M x = examples::normal_matrix<double>(kBatch * kLen, kDim, 1.0, 10);
  const M y = att.forward(x, kBatch, kLen, cache);

  // Naive oracle: per sequence and head, explicit softmax over the visible keys.
  const M q = x * att.wq.w, k = x * att.wk.w, v = x * att.wv.w;
  M o = M::Zero(kBatch * kLen, kDim);
  const Index dh = kDim / kHeads;
  for (Index b = 0; b < kBatch; ++b) {
    for (Index h = 0; h < kHeads; ++h) {
      for (Index i = 0; i < kLen; ++i) {
        std::vector<double> s;
        double z = 0;
        for (Index j = 0; j <= i; ++j) {
          double dot = 0;
          for (Index c = 0; c < dh; ++c) dot += q(b * kLen + i, h * dh + c) * k(b * kLen + j, h * dh + c);
          s.push_back(std::exp(dot / std::sqrt(double(dh))));
          z += s.back();
        }
        for (Index j = 0; j <= i; ++j) {
          for (Index c = 0; c < dh; ++c) {
            o(b * kLen + i, h * dh + c) += s[std::size_t(j)] / z * v(b * kLen + j, h * dh + c);
          }
        }
      }
    }
  }
  CHECK(rel_error(y, o * att.wo.w) < 1e-12);

  // Causality: changing the last token of sequence 0 leaves its earlier outputs alone.
  M x2 = x;
  x2.row(kLen - 1).array() += 1.0;
  const M y2 = att.forward(x2, kBatch, kLen, cache);
  CHECK((y2.topRows(kLen - 1) - y.topRows(kLen - 1)).norm() == 0.0);
  CHECK((y2.row(kLen - 1) - y.row(kLen - 1)).norm() > 0.0);

  const M r = examples::normal_matrix<double>(kBatch * kLen, kDim, 1.0, 11);
  att.forward(x, kBatch, kLen, cache);
  att.zero_grad();
  const M dx = att.backward(x, r, cache);
  examples::CausalSelfAttention<double>::Cache scratch;
  auto loss = [&] { return project(att.forward(x, kBatch, kLen, scratch), r); };
  CHECK(rel_error(dx, numeric_grad(x, loss)) < 1e-6);
  const M dq = att.wq.dw, dk = att.wk.dw, dv = att.wv.dw, dout = att.wo.dw;
  CHECK(rel_error(dq, numeric_grad(att.wq.w, loss)) < 1e-6);
  CHECK(rel_error(dk, numeric_grad(att.wk.w, loss)) < 1e-6);
  CHECK(rel_error(dv, numeric_grad(att.wv.w, loss)) < 1e-6);
  CHECK(rel_error(dout, numeric_grad(att.wo.w, loss)) < 1e-6);
}

TEST_CASE("CausalSelfAttention exposes row-stochastic causal probabilities", "[examples]") {
  examples::CausalSelfAttention<float> att(8, 2, 4);
  examples::CausalSelfAttention<float>::Cache cache;
  const RowMatrix<float> x = examples::normal_matrix<float>(6, 8, 1.0, 12);
  att.forward(x, 2, 3, cache);
  const moet::AttentionView a = cache.attention();
  REQUIRE(a.batch == 2);
  REQUIRE(a.heads == 2);
  REQUIRE(a.seq_len == 3);
  CHECK(a.causal);
  for (Index row = 0; row < 2 * 2 * 3; ++row) {
    const Index i = row % 3;
    double sum = 0;
    for (Index j = 0; j < 3; ++j) {
      const float p = a.data[row * 3 + j];
      if (j > i) CHECK(p == 0.0f);
      sum += p;
    }
    CHECK(sum == Approx(1.0).epsilon(1e-6));
  }
  CHECK_THROWS_WITH(att.forward(x, 4, 2, cache), Catch::Matchers::Contains("expected batch * seq_len"));
}

TEST_CASE("softmax_cross_entropy matches its definition and finite differences",
          "[examples][grad]") {
  M logits = examples::normal_matrix<double>(3, 4, 2.0, 13);
  const std::vector<int> labels = {0, 3, 2};
  M d;
  const double loss = examples::softmax_cross_entropy(logits, labels, &d);
  double expected = 0;
  for (Index t = 0; t < 3; ++t) {
    double z = 0;
    for (Index c = 0; c < 4; ++c) z += std::exp(logits(t, c));
    expected -= std::log(std::exp(logits(t, labels[std::size_t(t)])) / z) / 3.0;
  }
  CHECK(loss == Approx(expected).epsilon(1e-12));
  auto f = [&] { return examples::softmax_cross_entropy<double>(logits, labels, nullptr); };
  CHECK(rel_error(d, numeric_grad(logits, f)) < 1e-7);
  CHECK_THROWS_WITH(examples::softmax_cross_entropy<double>(logits, {0, 4, 1}, nullptr),
                    Catch::Matchers::Contains("label 4 at row 1 is outside [0, 4)"));
  CHECK_THROWS_WITH(examples::softmax_cross_entropy<double>(logits, {0}, nullptr),
                    Catch::Matchers::Contains("1 labels for 3 rows"));
}

}  // namespace test_example_nn
