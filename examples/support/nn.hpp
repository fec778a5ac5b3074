#pragma once
/// \file examples/support/nn.hpp
/// The few dense layers the real-data examples need around their MoE layers, each with its
/// backward and the visitor protocol of moet's optimisers (train/grad.hpp: `visit_parameters(f)`
/// calls `f(name, value, grad)`; gradients accumulate until `zero_grad()`):
///
/// - `Linear`: `y = x W + b`;
/// - `RmsNorm`: `y = x / sqrt(mean(x^2) + eps) * g` (Zhang & Sennrich 2019);
/// - `Embedding`: a lookup table;
/// - `CausalSelfAttention`: multi-head causal softmax attention over `[batch, seq_len]` token
///   rows, which also exposes its attention probabilities as a `moet::AttentionView` for
///   `ImportanceGate`;
/// - `softmax_cross_entropy`: the mean loss over rows and its gradient.
///
/// Plain serial Eigen code written for clarity; tests/test_example_nn.cpp checks every backward
/// against finite differences. Not part of the moet library (no API promise).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <moet/moet.hpp>
#include <moet/train/grad.hpp>

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
    return static_cast<S>(std::sqrt(static_cast<double>(x.row(t).squaredNorm()) /
                                        static_cast<double>(x.cols()) +
                                    eps));
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
    for (std::size_t t = 0; t < ids.size(); ++t) dtable.row(ids[t]) += dy.row(static_cast<Index>(t));
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
/// A, o); `attention()` views `A` as `[batch, heads, seq_len, seq_len]` for `ImportanceGate`.
template <class S>
struct CausalSelfAttention {
  Index heads = 1;
  Linear<S> wq, wk, wv, wo;

  CausalSelfAttention() = default;
  CausalSelfAttention(Index d, Index num_heads, std::uint64_t seed)
      : heads(num_heads),
        wq(d, d, seed * 4 + 1),
        wk(d, d, seed * 4 + 2),
        wv(d, d, seed * 4 + 3),
        wo(d, d, seed * 4 + 4) {
    moet::detail::require(num_heads >= 1 && d % num_heads == 0, "CausalSelfAttention",
                          "model_dim ", d, " must be a positive multiple of heads ", num_heads);
  }

  /// `x` `(batch * seq_len, d)` -> `(batch * seq_len, d)`.
  RowMatrix<S> forward(const RowMatrix<S>& x, Index batch, Index seq_len) {
    moet::detail::require(x.rows() == batch * seq_len, "CausalSelfAttention",
                          "x has ", x.rows(), " rows, expected batch * seq_len = ", batch, " * ",
                          seq_len);
    batch_ = batch;
    seq_len_ = seq_len;
    q_ = wq.forward(x);
    k_ = wk.forward(x);
    v_ = wv.forward(x);
    const Index dh = x.cols() / heads;
    const S scale = static_cast<S>(1.0 / std::sqrt(static_cast<double>(dh)));
    probs_.assign(static_cast<std::size_t>(batch * heads * seq_len * seq_len), S(0));
    o_.setZero(x.rows(), x.cols());
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < heads; ++h) {
        S* a = prob(b, h);
        for (Index i = 0; i < seq_len; ++i) {
          const Index ti = b * seq_len + i;
          S max = -std::numeric_limits<S>::infinity();
          for (Index j = 0; j <= i; ++j) {
            const Index tj = b * seq_len + j;
            a[i * seq_len + j] = scale * q_.row(ti).segment(h * dh, dh).dot(k_.row(tj).segment(h * dh, dh));
            max = std::max(max, a[i * seq_len + j]);
          }
          S sum = 0;
          for (Index j = 0; j <= i; ++j) sum += (a[i * seq_len + j] = std::exp(a[i * seq_len + j] - max));
          for (Index j = 0; j <= i; ++j) {
            a[i * seq_len + j] /= sum;
            o_.row(ti).segment(h * dh, dh) += a[i * seq_len + j] * v_.row(b * seq_len + j).segment(h * dh, dh);
          }
        }
      }
    }
    return wo.forward(o_);
  }

  /// dL/dx for `dy` `(batch * seq_len, d)`; accumulates the four projections' gradients.
  RowMatrix<S> backward(const RowMatrix<S>& x, const RowMatrix<S>& dy) {
    const RowMatrix<S> d_o = wo.backward(o_, dy);
    const Index dh = x.cols() / heads;
    const S scale = static_cast<S>(1.0 / std::sqrt(static_cast<double>(dh)));
    RowMatrix<S> dq = RowMatrix<S>::Zero(x.rows(), x.cols());
    RowMatrix<S> dk = RowMatrix<S>::Zero(x.rows(), x.cols());
    RowMatrix<S> dv = RowMatrix<S>::Zero(x.rows(), x.cols());
    std::vector<S> da(static_cast<std::size_t>(seq_len_));
    for (Index b = 0; b < batch_; ++b) {
      for (Index h = 0; h < heads; ++h) {
        const S* a = prob(b, h);
        for (Index i = 0; i < seq_len_; ++i) {
          const Index ti = b * seq_len_ + i;
          const auto doi = d_o.row(ti).segment(h * dh, dh);
          S dot = 0;  // sum_j dA_ij A_ij
          for (Index j = 0; j <= i; ++j) {
            const Index tj = b * seq_len_ + j;
            da[static_cast<std::size_t>(j)] = doi.dot(v_.row(tj).segment(h * dh, dh));
            dot += da[static_cast<std::size_t>(j)] * a[i * seq_len_ + j];
            dv.row(tj).segment(h * dh, dh) += a[i * seq_len_ + j] * doi;
          }
          for (Index j = 0; j <= i; ++j) {
            const Index tj = b * seq_len_ + j;
            const S ds = a[i * seq_len_ + j] * (da[static_cast<std::size_t>(j)] - dot) * scale;
            dq.row(ti).segment(h * dh, dh) += ds * k_.row(tj).segment(h * dh, dh);
            dk.row(tj).segment(h * dh, dh) += ds * q_.row(ti).segment(h * dh, dh);
          }
        }
      }
    }
    RowMatrix<S> dx = wq.backward(x, dq);
    dx += wk.backward(x, dk);
    dx += wv.backward(x, dv);
    return dx;
  }

  /// The attention probabilities of the last `forward`, `[batch, heads, seq_len, seq_len]`
  /// (float models only: `AttentionView` holds floats).
  moet::AttentionView attention() const {
    static_assert(std::is_same_v<S, float>, "AttentionView holds float probabilities");
    return {.data = probs_.data(), .batch = batch_, .heads = heads, .seq_len = seq_len_,
            .causal = true};
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

 private:
  S* prob(Index b, Index h) {
    return probs_.data() + ((b * heads + h) * seq_len_) * seq_len_;
  }
  const S* prob(Index b, Index h) const {
    return probs_.data() + ((b * heads + h) * seq_len_) * seq_len_;
  }

  Index batch_ = 0;
  Index seq_len_ = 0;
  RowMatrix<S> q_, k_, v_, o_;
  std::vector<S> probs_;
};

/// Mean softmax cross-entropy (nats) of `logits` `(n, classes)` against `labels`; writes
/// `d_logits` = dL/dlogits when non-null. Throws `moet::Error` naming `softmax_cross_entropy`
/// for a label count that differs from `n` or a label outside `[0, classes)`.
template <class S>
double softmax_cross_entropy(const RowMatrix<S>& logits, const std::vector<int>& labels,
                             RowMatrix<S>* d_logits) {
  constexpr const char* kOp = "softmax_cross_entropy";
  const Index n = logits.rows();
  moet::detail::require(static_cast<Index>(labels.size()) == n, kOp, labels.size(),
                        " labels for ", n, " rows");
  if (d_logits) d_logits->resize(n, logits.cols());
  double total = 0.0;
  for (Index t = 0; t < n; ++t) {
    const int y = labels[static_cast<std::size_t>(t)];
    moet::detail::require(y >= 0 && y < logits.cols(), kOp, "label ", y, " at row ", t,
                          " is outside [0, ", logits.cols(), ")");
    const double max = static_cast<double>(logits.row(t).maxCoeff());
    double sum = 0.0;
    for (Index c = 0; c < logits.cols(); ++c) sum += std::exp(static_cast<double>(logits(t, c)) - max);
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
