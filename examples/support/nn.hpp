#pragma once
/// \file examples/support/nn.hpp
/// The few dense layers the real-data examples need around their MoE layers, each with its
/// backward and the visitor protocol of moet's optimisers (concepts.hpp: `visit_parameters(f)`
/// calls `f(name, value, grad)`; gradients accumulate until `zero_grad()`):
///
/// - `Linear`: `y = x W + b`;
/// - `RmsNorm`: `y = x / sqrt(mean(x^2) + eps) * g` (Zhang & Sennrich 2019);
/// - `Embedding`: a lookup table;
/// - `CausalSelfAttention`: multi-head causal softmax attention over `[batch, seq_len]` token
///   rows, whose cache exposes the attention probabilities as a `moet::AttentionView` for
///   `ImportanceGate`;
/// - `softmax_cross_entropy`: the mean loss over rows and its gradient.
///
/// Plain Eigen code written for clarity (attention runs one task per sequence and head on moet's
/// thread pool); tests/test_example_nn.cpp checks every backward
/// against finite differences. Not part of the moet library (no API promise).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <moet/concepts.hpp>
#include <moet/moet.hpp>

namespace examples {

using moet::Index;
using moet::RowMatrix;

/// A normal `(rows, cols)` matrix with standard deviation `scale`, deterministic in `seed`.
template <class S>
RowMatrix<S> normal_matrix(Index rows, Index cols, double scale, std::uint64_t seed) {
  RowMatrix<S> m(rows, cols);
  moet::detail::Rng rng(seed);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(scale * rng.normal());
  return m;
}

/// Calls `f(prefix + name, value, grad)` for a matrix parameter and its gradient (allocating the
/// gradient as zeros on first use).
template <class S, class F>
void visit_matrix(F& f, std::string_view prefix, std::string_view name, RowMatrix<S>& value,
                  RowMatrix<S>& grad) {
  if (grad.rows() != value.rows() || grad.cols() != value.cols()) {
    grad.setZero(value.rows(), value.cols());
  }
  std::string full(prefix);
  full += name;
  f(std::string_view(full), moet::ParamMap<S>(value.data(), value.rows(), value.cols()),
    moet::ParamMap<S>(grad.data(), grad.rows(), grad.cols()));
}

/// `y = x W + b` with `W` `(in, out)` normal with standard deviation `1 / sqrt(in)` and `b = 0`.
template <class S>
struct Linear {
  RowMatrix<S> w, b, dw, db;  // (in, out), (1, out) and their gradients

  Linear() = default;
  Linear(Index in, Index out, std::uint64_t seed)
      : w(normal_matrix<S>(in, out, 1.0 / std::sqrt(static_cast<double>(in)), seed)),
        b(RowMatrix<S>::Zero(1, out)) {}

  /// `x` `(n, in)` -> `(n, out)`.
  RowMatrix<S> forward(const RowMatrix<S>& x) const {
    RowMatrix<S> y = x * w;
    y.rowwise() += b.row(0);
    return y;
  }
  /// Accumulates dW, db; returns dL/dx `(n, in)` for `dy` `(n, out)`.
  RowMatrix<S> backward(const RowMatrix<S>& x, const RowMatrix<S>& dy) {
    grads();
    dw.noalias() += x.transpose() * dy;
    db += dy.colwise().sum();
    return dy * w.transpose();
  }
  void grads() {
    if (dw.size() != w.size()) zero_grad();
  }
  void zero_grad() {
    dw.setZero(w.rows(), w.cols());
    db.setZero(b.rows(), b.cols());
  }
  template <class F>
  void visit_parameters(F&& f, std::string_view prefix = "") {
    visit_matrix<S>(f, prefix, "weight", w, dw);
    visit_matrix<S>(f, prefix, "bias", b, db);
  }
};

/// RMSNorm: `y_t = x_t / r_t * g` with `r_t = sqrt(mean_j x_tj^2 + eps)`, `g` starting at 1.
template <class S>
struct RmsNorm {
  RowMatrix<S> g, dg;  // (1, d)
  double eps = 1e-6;

  RmsNorm() = default;
  explicit RmsNorm(Index d) : g(RowMatrix<S>::Ones(1, d)) {}

  RowMatrix<S> forward(const RowMatrix<S>& x) const {
    RowMatrix<S> y(x.rows(), x.cols());
    for (Index t = 0; t < x.rows(); ++t) {
      const S r = rms(x, t);
      y.row(t) = x.row(t).cwiseProduct(g.row(0)) / r;
    }
    return y;
  }
  /// dL/dx for `dy`, with `dx = (g dy) / r - x (sum_j g_j dy_j x_j) / (d r^3)`.
  RowMatrix<S> backward(const RowMatrix<S>& x, const RowMatrix<S>& dy) {
    if (dg.size() != g.size()) zero_grad();
    RowMatrix<S> dx(x.rows(), x.cols());
    const auto d = static_cast<S>(x.cols());
    for (Index t = 0; t < x.rows(); ++t) {
      const S r = rms(x, t);
      dg.row(0) += dy.row(t).cwiseProduct(x.row(t)) / r;
      const auto gdy = dy.row(t).cwiseProduct(g.row(0));
      const S dot = gdy.dot(x.row(t));
      dx.row(t) = gdy / r - x.row(t) * (dot / (d * r * r * r));
    }
    return dx;
  }
  void zero_grad() { dg.setZero(g.rows(), g.cols()); }
  template <class F>
  void visit_parameters(F&& f, std::string_view prefix = "") {
    visit_matrix<S>(f, prefix, "scale", g, dg);
  }

 private:
  S rms(const RowMatrix<S>& x, Index t) const {
    return static_cast<S>(std::sqrt(
        static_cast<double>(x.row(t).squaredNorm()) / static_cast<double>(x.cols()) + eps));
  }
};

/// A `(vocab, d)` lookup table, normal with standard deviation `scale`.
template <class S>
struct Embedding {
  RowMatrix<S> table, dtable;

  Embedding() = default;
  Embedding(Index vocab, Index d, double scale, std::uint64_t seed)
      : table(normal_matrix<S>(vocab, d, scale, seed)) {}

  RowMatrix<S> forward(const std::vector<int>& ids) const {
    RowMatrix<S> y(static_cast<Index>(ids.size()), table.cols());
    for (std::size_t t = 0; t < ids.size(); ++t) y.row(static_cast<Index>(t)) = table.row(ids[t]);
    return y;
  }
  void backward(const std::vector<int>& ids, const RowMatrix<S>& dy) {
    if (dtable.size() != table.size()) zero_grad();
    for (std::size_t t = 0; t < ids.size(); ++t)
      dtable.row(ids[t]) += dy.row(static_cast<Index>(t));
  }
  void zero_grad() { dtable.setZero(table.rows(), table.cols()); }
  template <class F>
  void visit_parameters(F&& f, std::string_view prefix = "") {
    visit_matrix<S>(f, prefix, "table", table, dtable);
  }
};

/// Multi-head causal self-attention over tokens laid out `[batch, seq_len]` row-major:
/// `q, k, v = x Wq, x Wk, x Wv`; per sequence and head `A = softmax(q k^T / sqrt(d_head))` with
/// keys `j > i` masked; `o = A v`; `y = o Wo`. `forward` keeps what `backward` needs (q, k, v,
/// A, o) in the caller's `Cache` (so two passes, as in THOR, keep two caches);
/// `Cache::attention()` views `A` as `[batch, heads, seq_len, seq_len]` for `ImportanceGate`.
template <class S>
struct CausalSelfAttention {
  /// One forward's activations.
  struct Cache {
    Index batch = 0, seq_len = 0, heads = 1;
    RowMatrix<S> q, k, v, o;
    // [batch, heads, seq_len, seq_len], in Eigen-aligned storage: the softmax sums rows of it,
    // and Eigen's vectorised sum peels up to an aligned address, so storage whose alignment
    // changes from run to run would change the bits.
    std::vector<S, Eigen::aligned_allocator<S>> probs;

    S* prob(Index b, Index h) { return probs.data() + ((b * heads + h) * seq_len) * seq_len; }
    const S* prob(Index b, Index h) const {
      return probs.data() + ((b * heads + h) * seq_len) * seq_len;
    }
    /// The attention probabilities (float models only: `AttentionView` holds floats).
    moet::AttentionView attention() const {
      static_assert(std::is_same_v<S, float>, "AttentionView holds float probabilities");
      return {
          .data = probs.data(), .batch = batch, .heads = heads, .seq_len = seq_len, .causal = true};
    }
  };

  Index heads = 1;
  Linear<S> wq, wk, wv, wo;

  CausalSelfAttention() = default;
  CausalSelfAttention(Index d, Index num_heads, std::uint64_t seed)
      : heads(num_heads),
        wq(d, d, seed * 4 + 1),
        wk(d, d, seed * 4 + 2),
        wv(d, d, seed * 4 + 3),
        wo(d, d, seed * 4 + 4) {
    moet::detail::require(num_heads >= 1 && d % num_heads == 0, "CausalSelfAttention", "model_dim ",
                          d, " must be a positive multiple of heads ", num_heads);
  }

  /// `x` `(batch * seq_len, d)` -> `(batch * seq_len, d)`; fills `c`.
  RowMatrix<S> forward(const RowMatrix<S>& x, Index batch, Index seq_len, Cache& c) const {
    moet::detail::require(x.rows() == batch * seq_len, "CausalSelfAttention", "x has ", x.rows(),
                          " rows, expected batch * seq_len = ", batch, " * ", seq_len);
    c.batch = batch;
    c.seq_len = seq_len;
    c.heads = heads;
    c.q = wq.forward(x);
    c.k = wk.forward(x);
    c.v = wv.forward(x);
    const Index dh = x.cols() / heads;
    const S scale = static_cast<S>(1.0 / std::sqrt(static_cast<double>(dh)));
    c.probs.assign(static_cast<std::size_t>(batch * heads * seq_len * seq_len), S(0));
    c.o.resize(x.rows(), x.cols());
    // One task per (sequence, head): each writes its own probabilities and its own block of o.
    moet::detail::parallel_for(batch * heads, [&](Index task) {
      const Index b = task / heads, h = task % heads, r = b * seq_len, col = h * dh;
      Eigen::Map<RowMatrix<S>> a(c.prob(b, h), seq_len, seq_len);
      a.noalias() =
          scale * c.q.block(r, col, seq_len, dh) * c.k.block(r, col, seq_len, dh).transpose();
      for (Index i = 0; i < seq_len; ++i) {  // causal softmax of row i over keys j <= i
        auto row = a.row(i).head(i + 1);
        row = (row.array() - row.maxCoeff()).exp();
        row /= row.sum();
        a.row(i).tail(seq_len - i - 1).setZero();
      }
      c.o.block(r, col, seq_len, dh).noalias() = a * c.v.block(r, col, seq_len, dh);
    });
    return wo.forward(c.o);
  }

  /// dL/dx for `dy` `(batch * seq_len, d)` of the forward that filled `c`; accumulates the four
  /// projections' gradients.
  RowMatrix<S> backward(const RowMatrix<S>& x, const RowMatrix<S>& dy, const Cache& c) {
    const RowMatrix<S> d_o = wo.backward(c.o, dy);
    const Index dh = x.cols() / heads, len = c.seq_len;
    const S scale = static_cast<S>(1.0 / std::sqrt(static_cast<double>(dh)));
    RowMatrix<S> dq(x.rows(), x.cols()), dk(x.rows(), x.cols()), dv(x.rows(), x.cols());
    moet::detail::parallel_for(c.batch * heads, [&](Index task) {
      const Index b = task / heads, h = task % heads, r = b * len, col = h * dh;
      const Eigen::Map<const RowMatrix<S>> a(c.prob(b, h), len, len);
      const auto d_ob = d_o.block(r, col, len, dh);
      RowMatrix<S> ds = d_ob * c.v.block(r, col, len, dh).transpose();  // dL/dA (len, len)
      for (Index i = 0; i < len; ++i) {  // softmax backward: A (dA - <dA, A>), masked entries 0
        const S dot = ds.row(i).dot(a.row(i));
        ds.row(i) = (a.row(i).array() * (ds.row(i).array() - dot) * scale).matrix();
      }
      dv.block(r, col, len, dh).noalias() = a.transpose() * d_ob;
      dq.block(r, col, len, dh).noalias() = ds * c.k.block(r, col, len, dh);
      dk.block(r, col, len, dh).noalias() = ds.transpose() * c.q.block(r, col, len, dh);
    });
    RowMatrix<S> dx = wq.backward(x, dq);
    dx += wk.backward(x, dk);
    dx += wv.backward(x, dv);
    return dx;
  }

  void zero_grad() {
    wq.zero_grad();
    wk.zero_grad();
    wv.zero_grad();
    wo.zero_grad();
  }
  template <class F>
  void visit_parameters(F&& f, std::string_view prefix = "") {
    const std::string p(prefix);
    wq.visit_parameters(f, p + "q.");
    wk.visit_parameters(f, p + "k.");
    wv.visit_parameters(f, p + "v.");
    wo.visit_parameters(f, p + "o.");
  }
};

/// Mean softmax cross-entropy (nats) of `logits` `(n, classes)` against `labels`; writes
/// `d_logits` = dL/dlogits when non-null. Throws `moet::Error` naming `softmax_cross_entropy`
/// for a label count that differs from `n` or a label outside `[0, classes)`.
template <class S>
double softmax_cross_entropy(const RowMatrix<S>& logits, const std::vector<int>& labels,
                             RowMatrix<S>* d_logits) {
  constexpr const char* kOp = "softmax_cross_entropy";
  const Index n = logits.rows();
  moet::detail::require(static_cast<Index>(labels.size()) == n, kOp, labels.size(), " labels for ",
                        n, " rows");
  if (d_logits) d_logits->resize(n, logits.cols());
  double total = 0.0;
  for (Index t = 0; t < n; ++t) {
    const int y = labels[static_cast<std::size_t>(t)];
    moet::detail::require(y >= 0 && y < logits.cols(), kOp, "label ", y, " at row ", t,
                          " is outside [0, ", logits.cols(), ")");
    const double max = static_cast<double>(logits.row(t).maxCoeff());
    double sum = 0.0;
    for (Index c = 0; c < logits.cols(); ++c)
      sum += std::exp(static_cast<double>(logits(t, c)) - max);
    total += std::log(sum) + max - static_cast<double>(logits(t, y));
    if (d_logits) {
      for (Index c = 0; c < logits.cols(); ++c) {
        const double p = std::exp(static_cast<double>(logits(t, c)) - max) / sum;
        (*d_logits)(t, c) = static_cast<S>((p - (c == y ? 1.0 : 0.0)) / static_cast<double>(n));
      }
    }
  }
  return n == 0 ? 0.0 : total / static_cast<double>(n);
}

}  // namespace examples
