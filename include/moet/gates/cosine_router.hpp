#pragma once
/// \file gates/cosine_router.hpp
/// `CosineRouter`: DynMoE's router (Guo et al., ICLR 2025, arXiv 2405.14297): one trainable
/// embedding and one trainable threshold per expert slot, scores `sigmoid(tau cos(x, W_e))`
/// and their backward to the embeddings, the thresholds, the temperature and the input.
/// `TopAnyGate` (gates/top_any.hpp) selects on these scores. Specification: docs/algorithms.md
/// §4.1-4.3.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <variant>

#include <Eigen/Core>
#include <Eigen/QR>

#include "moet/concepts.hpp"
#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/detail/rng.hpp"
#include "moet/detail/select.hpp"
#include "moet/detail/softmax_router.hpp"
#include "moet/detail/weights.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/tensor.hpp"

namespace moet {

namespace detail {

/// DynMoE's gate embedding initialisation (docs/algorithms.md §4.1): PyTorch-style
/// `orthogonal_` on an `(num_experts, model_dim)` matrix, returned transposed as `(model_dim,
/// num_experts)`. The columns are orthonormal when `num_experts <= model_dim`, the rows
/// otherwise. Built from a Gaussian matrix drawn by `Rng(seed)` and its Householder QR in double,
/// with the signs of `Q`'s columns fixed so that `diag(R) >= 0` (so the result is a
/// deterministic function of `seed`).
template <class S>
RowMatrix<S> orthogonal_gate_embeddings(Index model_dim, Index num_experts, std::uint64_t seed) {
  const Index tall = std::max(model_dim, num_experts);
  const Index thin = std::min(model_dim, num_experts);
  Rng rng(seed);
  Eigen::MatrixXd gaussian(tall, thin);  // (tall, thin)
  for (Index i = 0; i < tall; ++i) {
    for (Index j = 0; j < thin; ++j) gaussian(i, j) = rng.normal();
  }
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(gaussian);
  Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(tall, thin);  // (tall, thin)
  for (Index j = 0; j < thin; ++j) {
    if (qr.matrixQR()(j, j) < 0.0) q.col(j) *= -1.0;
  }
  // num_experts <= model_dim: q is (model_dim, num_experts) with orthonormal columns, already
  // the transpose of the (num_experts, model_dim) matrix with orthonormal rows. Otherwise q is
  // (num_experts, model_dim) with orthonormal columns and the embeddings are its transpose.
  if (num_experts <= model_dim) return q.cast<S>();
  return q.transpose().cast<S>();
}

}  // namespace detail

/// DynMoE's cosine router (docs/algorithms.md §4.1-4.3): gate embeddings `W` `(model_dim,
/// num_experts)`, orthogonal at construction, thresholds `theta` `(num_experts)`, 0 at
/// construction, and the logit scale `tau`, fixed or trainable (`log_t`, clamped at 100):
/// ```
/// cos[t,e] = x_t . W_e / (max(||x_t||, 1e-12) * max(||W_e||, 1e-12))
/// s[t,e]   = sigmoid(tau * cos[t,e]) * m_e;   u_e = sigmoid(tau * theta_e)  (the fire level)
/// ```
/// It scores and differentiates; which slots fire and with what weight is the gate's
/// (`TopAnyGate`). Errors name the owner given at construction.
///
/// \tparam S scalar type (float or double).
///
/// ```cpp
/// moet::CosineRouter<float> router({.model_dim = 512, .num_experts = 16}, "MyGate");
/// ```
template <class S>
class CosineRouter {
 public:
  using Scalar = S;

  /// Construction options.
  struct Options {
    /// Width of a token, `d` (>= 1).
    Index model_dim = 0;
    /// Expert slots, `Emax` (>= 1, fits a 32-bit expert id).
    Index num_experts = 0;
    /// Logit scale `tau`, finite and > 0; the initial value when `trainable_temperature`.
    S temperature = S(1);
    /// Train `log_t = log(tau)`, with `tau = exp(min(log_t, log 100))`.
    bool trainable_temperature = false;
    /// Seed of the orthogonal embedding initialisation.
    std::uint64_t init_seed = 0;
  };

  /// Norm floor of `F.normalize` (PyTorch's default `eps`), applied to tokens and embeddings.
  static constexpr S kNormEps = S(1e-12);
  /// Tokens per task: fixed, so the split never depends on the thread count.
  static constexpr Index kTokenBlock = 256;
  /// Clamp of the trainable temperature: `tau <= 100` (`log(1 / 0.01)` in Tutel).
  static constexpr S kLogMaxTemperature = S(4.605170185988091368);

  /// Builds the router (docs/algorithms.md §4.1). `op` names the owner in error messages.
  /// Throws `moet::Error` when `model_dim < 1`, `num_experts < 1` or beyond a 32-bit id, or
  /// `temperature` is not finite and > 0.
  explicit CosineRouter(const Options& options, const char* op = "CosineRouter")
      : op_(op), trainable_temperature_(options.trainable_temperature) {
    detail::require(options.model_dim >= 1, op_, "model_dim must be >= 1, got ", options.model_dim);
    detail::require(options.num_experts >= 1, op_, "num_experts must be >= 1, got ",
                    options.num_experts);
    detail::require(options.num_experts <= std::numeric_limits<std::int32_t>::max(), op_,
                    "num_experts must fit a 32-bit expert id, got ", options.num_experts);
    check_temperature(options.temperature);
    temperature_ = options.temperature;
    log_temperature_ = std::log(options.temperature);
    embeddings_ = detail::orthogonal_gate_embeddings<S>(options.model_dim, options.num_experts,
                                                        options.init_seed);
    product_.repack(embeddings_);
    thresholds_ = Vector<S>::Zero(options.num_experts);
  }

  /// Expert slots, `Emax`.
  Index num_experts() const { return embeddings_.cols(); }
  /// Width of a token.
  Index model_dim() const { return embeddings_.rows(); }

  /// Gate embeddings `W` `(model_dim, num_experts)`: column `e` is slot `e`'s representation.
  Eigen::Map<const RowMatrix<S>> embeddings() const {
    return Eigen::Map<const RowMatrix<S>>(embeddings_.data(), embeddings_.rows(),
                                          embeddings_.cols());
  }
  /// Replaces `W` by `w`: `(model_dim, num_experts)` with `WeightLayout::kInOut`,
  /// `[num_experts, model_dim]` with `kOutIn`. `setter` names the call in messages. Throws
  /// `moet::Error` (nothing changed) on another shape ("looks transposed" for the other
  /// layout's) or a NaN/Inf entry.
  void set_embeddings(const char* setter, const ConstRows<S>& w, WeightLayout layout) {
    const detail::WeightName name{"gate embeddings", -1, "model_dim", "num_experts"};
    detail::check_weight_shape(op_, setter, name, model_dim(), num_experts(), w.rows(), w.cols(),
                               layout);
    detail::check_weights_finite(op_, setter, name, w);
    if (layout == WeightLayout::kOutIn) {
      embeddings_ = w.transpose();
    } else {
      embeddings_ = w;
    }
    product_.repack(embeddings_);
  }
  /// Thresholds `theta` `(num_experts)`.
  Eigen::Map<const Vector<S>> thresholds() const {
    return Eigen::Map<const Vector<S>>(thresholds_.data(), thresholds_.size());
  }
  /// Replaces the thresholds; throws `moet::Error` unless `theta` has `num_experts` finite
  /// entries.
  void set_thresholds(const Eigen::Ref<const Vector<S>>& theta) {
    detail::require(theta.size() == num_experts(), op_, "thresholds must have ", num_experts(),
                    " entries, got ", theta.size());
    detail::require(detail::all_finite(theta), op_, "thresholds must be finite");
    thresholds_ = theta;
  }
  /// Points slot `e` at `direction / norm` with threshold 0 (DynMoE's add, §4.5).
  void reset_slot(Index e, const Vector<S>& direction, S norm) {
    embeddings_.col(e) = direction / norm;
    thresholds_[e] = S(0);
    product_.repack(embeddings_);
  }

  /// The logit scale `tau` in use: the fixed one, or `exp(min(log_t, log 100))`.
  S temperature() const {
    if (!trainable_temperature_) return temperature_;
    return std::exp(std::min(log_temperature_, kLogMaxTemperature));
  }
  /// Sets `tau` (and `log_t = log(tau)`); throws `moet::Error` unless finite and > 0.
  void set_temperature(S tau) {
    check_temperature(tau);
    temperature_ = tau;
    log_temperature_ = std::log(tau);
  }
  /// The trainable parameter `log_t` (meaningful with `trainable_temperature`).
  S log_temperature() const { return log_temperature_; }
  /// dL/dlog_t (0 unless `trainable_temperature`).
  S log_temperature_grad() const { return grad_log_temperature_; }
  /// Whether `log_t` is a parameter.
  bool trainable_temperature() const { return trainable_temperature_; }

  /// The fire levels `u_e = sigmoid(tau theta_e)` `(num_experts)`, in router scratch.
  S* fire_levels() {
    const Index emax = num_experts();
    S* const level = slot_scratch_.data(3 * emax);
    const S tau = temperature();
    for (Index e = 0; e < emax; ++e) level[e] = sigmoid(tau * thresholds_[e]);
    return level;
  }

  /// Throws `moet::Error` when `x` has the wrong width or a non-finite entry, or when training
  /// left a non-finite embedding, threshold or temperature (what `score` checks first).
  void check_inputs(const ConstRows<S>& x) const {
    const Index d = model_dim();
    MOET_ASSERT(embeddings_.rows() == d && embeddings_.cols() == num_experts() &&
                    thresholds_.size() == num_experts(),
                "the setters keep the router's shapes");
    detail::require(x.cols() == d, op_, "x must have model_dim = ", d, " columns, got ", x.cols());
    detail::require(detail::all_finite(embeddings_), op_, "gate embeddings must be finite");
    detail::require(detail::all_finite(thresholds_), op_, "thresholds must be finite");
    detail::require(detail::all_finite(x), op_, "x must be finite (found NaN or Inf)");
    const S tau = temperature();
    detail::require(std::isfinite(tau) && tau > S(0), op_,
                    "temperature must be finite and > 0, got ", tau, " (log_temperature ",
                    log_temperature_, ")");
  }

  /// Writes `s` `(num_tokens, num_experts)` for the rows of `x` into `scores` and the fire
  /// levels `u` into `slot[num_experts, 2 num_experts)` (`slot[0, num_experts)` gets the
  /// floored embedding norms); `mask` `(num_experts)` is 0 or 1 per slot. `block_bad` holds a
  /// flag per `kTokenBlock` tokens. Throws `moet::Error` when `x` has the wrong width or a
  /// non-finite entry, when a parameter is not finite, or when a score is not finite (an
  /// overflowing token norm); `scores` is then unspecified.
  void score(const ConstRows<S>& x, const S* mask, Eigen::Map<RowMatrix<S>> scores, S* slot,
             std::int32_t* block_bad) const {
    check_inputs(x);
    const Index emax = num_experts();
    const S tau = temperature();
    const Index num_tokens = x.rows();
    S* const norm_w = slot;              // (num_experts)
    S* const threshold = norm_w + emax;  // (num_experts)
    S max_norm_w = kNormEps;             // largest active embedding norm
    for (Index e = 0; e < emax; ++e) {
      norm_w[e] = std::max(embeddings_.col(e).norm(), kNormEps);
      threshold[e] = sigmoid(tau * thresholds_[e]);
      if (mask[e] != S(0)) max_norm_w = std::max(max_norm_w, norm_w[e]);
    }
    if (num_tokens == 0) return;
    product_.forward(x, embeddings_, scores);  // raw x W, turned in place into s
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      bool bad = false;
      for (Index t = begin; t < end; ++t) {
        const S norm_x = std::max(x.row(t).norm(), kNormEps);
        // An overflowing norm product would silently turn the cosines into 0: flag it.
        bad = bad || !std::isfinite(norm_x * max_norm_w);
        S* const s = &scores(t, 0);
        for (Index e = 0; e < emax; ++e) {
          if (mask[e] == S(0)) {
            s[e] = S(0);
            continue;
          }
          s[e] = sigmoid(tau * (s[e] / (norm_x * norm_w[e])));
          bad = bad || !std::isfinite(s[e]);
        }
      }
      block_bad[begin / kTokenBlock] = bad ? 1 : 0;
    });
    for (Index b = 0; b < (num_tokens + kTokenBlock - 1) / kTokenBlock; ++b) {
      detail::require(block_bad[b] == 0, op_,
                      "scores must be finite (a token or gate embedding norm overflowed), got a "
                      "non-finite score in tokens [",
                      b * kTokenBlock, ", ", std::min(num_tokens, (b + 1) * kTokenBlock), ")");
    }
  }

  /// Scratch for `backward`: the caller writes dL/ds into `d_scores` and dL/dr (`r = relu(s -
  /// u)`, fired pairs only) into `d_r`, both `(num_tokens, num_experts)`, 0 elsewhere.
  struct ScoreGrads {
    Eigen::Map<RowMatrix<S>> d_scores;
    Eigen::Map<RowMatrix<S>> d_r;
  };
  /// The `backward` scratch for `num_tokens` tokens (contents unspecified).
  ScoreGrads score_grads(Index num_tokens) {
    const Index emax = num_experts();
    S* const data =
        token_scratch_.data(2 * num_tokens * emax + num_tokens + num_blocks(num_tokens));
    return {Eigen::Map<RowMatrix<S>>(data, num_tokens, emax),
            Eigen::Map<RowMatrix<S>>(data + num_tokens * emax, num_tokens, emax)};
  }

  /// Backward through the scores (docs/algorithms.md §4.3), from the `score_grads(T)` the
  /// caller filled: `dL/dcos = tau s (1 - s) dL/ds`, then through both normalisations into
  /// `dx` `(T, model_dim)` (added) and the embedding gradient; `dL/dtheta_e = -tau u_e (1 - u_e)
  /// sum_t dL/dr[t,e]`; with `trainable_temperature`, `dL/dlog_t = tau dL/dtau` below the clamp.
  /// `scores` are `s` as `score` wrote them, `level` the fire levels (`fire_levels()`).
  /// Parallel over tokens (for `dx`) and over slots (for `W`, `theta`), each value summed in a
  /// fixed order: the same bits for any thread count. Shapes are the caller's to check.
  void backward(const ConstRows<S>& x, const Eigen::Ref<const RowMatrix<S>>& scores, const S* level,
                Rows<S> dx) {
    const Index d = model_dim();
    const Index emax = num_experts();
    const Index num_tokens = x.rows();
    ensure_grads();
    if (num_tokens == 0) return;
    const S tau = temperature();
    // Per-slot constants: raw column norms of W and the normalised columns, transposed so that
    // each is contiguous.
    S* const raw_norm_w = slot_scratch_.data(3 * emax) + emax;  // (num_experts)
    S* const slot_d_tau = raw_norm_w + emax;  // (num_experts): dL/dtau through theta
    auto slot_rows = wn_scratch_.matrix(2 * emax, d);
    auto wn_t = slot_rows.topRows(emax);  // (num_experts, model_dim): Wn transposed
    for (Index e = 0; e < emax; ++e) {
      raw_norm_w[e] = embeddings_.col(e).norm();
      wn_t.row(e) = embeddings_.col(e).transpose() / std::max(raw_norm_w[e], kNormEps);
    }
    const ScoreGrads grads = score_grads(num_tokens);
    auto d_cos = grads.d_scores;  // dL/ds turned in place into dL/dcos
    auto d_r = grads.d_r;
    S* const inv_norm_x = d_r.data() + num_tokens * emax;  // (T)
    S* const block_d_tau = inv_norm_x + num_tokens;        // (num_blocks): dL/dtau through s

    // On the packed kernels (float, the raw product x W on its packed copy): Wn^T packed as
    // the B of dx's product.
    bool packed = false;
    S* y_rows = nullptr;  // (T, model_dim): y = dL/dcos Wn^T, packed only
    if constexpr (std::is_same_v<S, float>) {
      if (product_.current()) {
        packed = true;
        wn_packed_.pack(ConstRows<float>(wn_t), product_.isa());  // (num_experts, model_dim)
        y_rows = y_scratch_.data(num_tokens * d);  // pass 1's tasks write their rows of y
      }
    }

    // Pass 1, over token blocks: dL/dcos per (token, slot), and dx.
    detail::parallel_blocks(num_tokens, kTokenBlock, [&](Index begin, Index end) {
      S d_tau = S(0);  // sum_t,e dL/ds s (1 - s) cos = sum_t projection_t / tau
      if (packed) {
        token_block_backward_packed(x, scores, tau, d_cos, inv_norm_x, y_rows, begin, end, dx,
                                    d_tau);
      } else {
        for (Index t = begin; t < end; ++t) {
          const S raw_norm_x = x.row(t).norm();
          const S norm_x = std::max(raw_norm_x, kNormEps);
          inv_norm_x[t] = S(1) / norm_x;
          const bool any = token_d_cos(scores, tau, d_cos, t);
          S projection = S(0);  // sum_e dL/dcos[t,e] cos[t,e] = u . (dL/du)
          for (Index e = 0; any && e < emax; ++e) {
            const S dcos = d_cos(t, e);
            if (dcos == S(0)) continue;
            dx.row(t) += (dcos / norm_x) * wn_t.row(e);
            projection += dcos * (x.row(t).dot(wn_t.row(e)) / norm_x);
          }
          // d(x / ||x||)/dx = (I - u u^T) / ||x||; below the floor, x / eps has derivative I /
          // eps.
          if (any && raw_norm_x > kNormEps) {
            dx.row(t) -= (projection / (norm_x * norm_x)) * x.row(t);
          }
          d_tau += projection / tau;
        }
      }
      block_d_tau[begin / kTokenBlock] = d_tau;
    });

    // Pass 2, over slots: dL/dWn_e = sum_t dL/dcos[t,e] x_t / ||x_t|| in token order, then
    // through the column normalisation; dL/dtheta_e from sum_t dL/dr[t,e]. Packed: the sums
    // for every slot at once, (dz^T x) with dz = dL/dcos / ||x|| (pass 1 scaled it) and x
    // packed, in fixed blocks of panels of model-dim columns.
    auto g_wn_t = slot_rows.bottomRows(emax);  // (num_experts, model_dim): dL/dWn transposed
    if constexpr (std::is_same_v<S, float>) {
      if (packed) {
        x_packed_.pack(x, product_.isa());  // (num_tokens, model_dim)
        detail::parallel_blocks(
            x_packed_.num_panels(), detail::kRouterGradPanels, [&](Index p0, Index p1) {
              detail::gemm_packed_at(ConstRows<float>(d_cos), x_packed_, Rows<float>(g_wn_t),
                                     /*accumulate=*/false, detail::router_thread_scratch(),
                                     PanelRange{p0, p1});
            });
      }
    }
    detail::parallel_for(emax, [&](Index e) {
      auto acc = g_wn_t.row(e);
      if (!packed) acc.setZero();
      S sum_r = S(0);
      bool any = false;
      for (Index t = 0; t < num_tokens; ++t) {
        sum_r += d_r(t, e);
        const S c = d_cos(t, e);
        if (c == S(0)) continue;
        if (!packed) acc += (c * inv_norm_x[t]) * x.row(t);
        any = true;
      }
      const S thr = level[e];
      grad_thresholds_[e] += -tau * thr * (S(1) - thr) * sum_r;
      slot_d_tau[e] = -thr * (S(1) - thr) * thresholds_[e] * sum_r;
      if (!any) return;
      if (raw_norm_w[e] > kNormEps) {
        const S along = acc.dot(wn_t.row(e));
        grad_embeddings_.col(e) += ((acc - along * wn_t.row(e)) / raw_norm_w[e]).transpose();
      } else {
        grad_embeddings_.col(e) += (acc / kNormEps).transpose();
      }
    });

    // dL/dlog_t = tau dL/dtau below the clamp, summed in block and slot order.
    if (trainable_temperature_ && log_temperature_ < kLogMaxTemperature) {
      S d_tau = S(0);
      for (Index b = 0; b < num_blocks(num_tokens); ++b) d_tau += block_d_tau[b];
      for (Index e = 0; e < emax; ++e) d_tau += slot_d_tau[e];
      grad_log_temperature_ += tau * d_tau;
    }
  }

  /// Sets the gradients to zero (allocating them on the first call).
  void zero_grad() {
    ensure_grads();
    grad_embeddings_.setZero();
    grad_thresholds_.setZero();
    grad_log_temperature_ = S(0);
  }
  /// dL/dW `(model_dim, num_experts)`; `(0, 0)` before the first `zero_grad` or `backward`.
  const RowMatrix<S>& embeddings_grad() const { return grad_embeddings_; }
  /// dL/dW, allocated (zero) first when needed.
  RowMatrix<S>& embeddings_grad() {
    ensure_grads();
    return grad_embeddings_;
  }
  /// dL/dtheta `(num_experts)`; empty before the first `zero_grad` or `backward`.
  const Vector<S>& thresholds_grad() const { return grad_thresholds_; }
  /// dL/dtheta, allocated (zero) first when needed.
  Vector<S>& thresholds_grad() {
    ensure_grads();
    return grad_thresholds_;
  }

  /// Calls `f(name, value, grad)` for `embeddings` (`W`, `(model_dim, num_experts)`),
  /// `thresholds` (`theta`, `(1, num_experts)`) and, with `trainable_temperature`,
  /// `log_temperature` (`log_t`, `(1, 1)`), in that order (concepts.hpp).
  template <class F>
  void visit_parameters(F&& f) {
    product_.mark_stale();  // W is handed out for writing
    ensure_grads();
    const Index d = model_dim();
    const Index emax = num_experts();
    f(std::string_view("embeddings"), ParamMap<S>(embeddings_.data(), d, emax),
      ParamMap<S>(grad_embeddings_.data(), d, emax));
    f(std::string_view("thresholds"), ParamMap<S>(thresholds_.data(), 1, emax),
      ParamMap<S>(grad_thresholds_.data(), 1, emax));
    if (trainable_temperature_) {
      f(std::string_view("log_temperature"), ParamMap<S>(&log_temperature_, 1, 1),
        ParamMap<S>(&grad_log_temperature_, 1, 1));
    }
  }

  /// Repacks `W` for the selected kernels after it was written through `visit_parameters`
  /// (until then the raw products `x W` are Eigen's: the same values, other rounding; see
  /// `detail::RouterProduct`).
  void parameters_changed() { product_.repack(embeddings_); }
  /// Whether the raw products `x W` run on the packed copy of `W` (float, at least
  /// `detail::kPackedRouterMinExperts` slots, a vector kernel level, not written through
  /// `visit_parameters` since the last `parameters_changed()` or setter).
  bool packed_product() const { return product_.current(); }

  /// Throws `moet::Error` (as `op`) unless the parameters have their construction shapes.
  void check_shapes(const char* op) const {
    const Index d = model_dim(), emax = num_experts();
    detail::require(embeddings_.rows() == d && embeddings_.cols() == emax, op,
                    "gate embeddings must be (", d, ", ", emax, "), got (", embeddings_.rows(),
                    ", ", embeddings_.cols(), ")");
    detail::require(thresholds_.size() == emax, op, "thresholds must have ", emax, " entries, got ",
                    thresholds_.size());
  }

  /// `sigmoid(z) = 1 / (1 + exp(-z))`.
  static S sigmoid(S z) { return S(1) / (S(1) + std::exp(-z)); }

 private:
  static Index num_blocks(Index num_tokens) { return (num_tokens + kTokenBlock - 1) / kTokenBlock; }

  void check_temperature(S tau) const {
    detail::require(std::isfinite(tau) && tau > S(0), op_,
                    "temperature must be finite and > 0, got ", tau);
  }

  // Turns token t's dL/ds into dL/dcos = tau s (1 - s) dL/ds in place (zeros stay zeros);
  // true when any slot's dL/dcos is non-zero. Both passes of `backward` start from it.
  template <class DCos>
  static bool token_d_cos(const Eigen::Ref<const RowMatrix<S>>& scores, S tau, DCos& d_cos,
                          Index t) {
    bool any = false;
    for (Index e = 0; e < d_cos.cols(); ++e) {
      const S ds = d_cos(t, e);
      if (ds == S(0)) continue;
      const S s = scores(t, e);
      const S dcos = tau * s * (S(1) - s) * ds;
      d_cos(t, e) = dcos;
      any = any || dcos != S(0);
    }
    return any;
  }

  // Pass 1 of `backward` on the packed kernels for tokens [begin, end): turns dL/ds into
  // dL/dcos in `d_cos` (as the scalar pass does), then y = dL/dcos Wn^T for the block in one
  // `gemm_packed` on Wn^T packed (each value one chain over the slots in order), then per token
  // with p = x . y / ||x|| (= sum_e dL/dcos[t,e] cos[t,e]): dx += y / ||x|| - p x / ||x||^2 (the
  // second term above the norm floor only), and scales the token's dL/dcos by 1 / ||x|| for
  // pass 2's product. Adds sum_t p / tau to `d_tau`.
  template <class DCos>
  void token_block_backward_packed(const ConstRows<S>& x,
                                   const Eigen::Ref<const RowMatrix<S>>& scores, S tau, DCos& d_cos,
                                   S* inv_norm_x, S* y_rows, Index begin, Index end, Rows<S> dx,
                                   S& d_tau) {
    if constexpr (std::is_same_v<S, float>) {
      const Index d = model_dim();
      const Index rows = end - begin;
      std::array<S, kTokenBlock> norm_x;
      std::array<bool, kTokenBlock> any;
      for (Index t = begin; t < end; ++t) {
        const auto i = static_cast<std::size_t>(t - begin);
        norm_x[i] = std::max(x.row(t).norm(), kNormEps);
        inv_norm_x[t] = S(1) / norm_x[i];
        any[i] = token_d_cos(scores, tau, d_cos, t);
      }
      // y for the block, in rows [begin, end) of the (T, model_dim) scratch.
      auto y = Eigen::Map<RowMatrix<S>>(y_rows + begin * d, rows, d);
      detail::gemm_packed(ConstRows<float>(d_cos.middleRows(begin, rows)), wn_packed_,
                          Rows<float>(y), /*accumulate=*/false, detail::router_thread_scratch());
      for (Index t = begin; t < end; ++t) {
        const auto i = static_cast<std::size_t>(t - begin);
        const S inv = inv_norm_x[t];
        if (any[i]) {
          const auto y_t = y.row(t - begin);
          const S projection = x.row(t).dot(y_t) * inv;  // sum_e dL/dcos[t,e] cos[t,e]
          dx.row(t) += inv * y_t;
          // Above the norm floor (norm_x is the raw norm): the projection term of
          // d(x / ||x||)/dx = (I - u u^T) / ||x||.
          if (norm_x[i] > kNormEps) dx.row(t) -= (projection / (norm_x[i] * norm_x[i])) * x.row(t);
          d_tau += projection / tau;
        }
        d_cos.row(t) *= inv;
      }
    } else {
      static_cast<void>(x);
      static_cast<void>(scores);
      static_cast<void>(tau);
      static_cast<void>(d_cos);
      static_cast<void>(inv_norm_x);
      static_cast<void>(y_rows);
      static_cast<void>(begin);
      static_cast<void>(end);
      static_cast<void>(dx);
      static_cast<void>(d_tau);
    }
  }

  void ensure_grads() {
    const Index d = model_dim();
    const Index emax = num_experts();
    if (grad_embeddings_.rows() != d || grad_embeddings_.cols() != emax) {
      grad_embeddings_ = RowMatrix<S>::Zero(d, emax);
    }
    if (grad_thresholds_.size() != emax) grad_thresholds_ = Vector<S>::Zero(emax);
  }

  const char* op_;
  bool trainable_temperature_ = false;
  S temperature_ = S(1);          // the fixed tau
  S log_temperature_ = S(0);      // log_t, the parameter with trainable_temperature
  RowMatrix<S> embeddings_;       // (model_dim, num_experts)
  detail::RouterProduct<S> product_;  // x W, on a packed copy of W when it qualifies
  Vector<S> thresholds_;          // (num_experts)
  RowMatrix<S> grad_embeddings_;  // (model_dim, num_experts)
  Vector<S> grad_thresholds_;     // (num_experts)
  S grad_log_temperature_ = S(0);
  detail::Buffer<S> slot_scratch_;   // (3 * num_experts): fire levels, norms, dL/dtau per slot
  detail::Buffer<S> wn_scratch_;     // (2 * num_experts, model_dim)
  detail::Buffer<S> token_scratch_;  // (2 T num_experts + T + token blocks)
  // The packed backward (float, W packed): Wn^T, the last backward's x, y = dL/dcos Wn^T.
  using Packed =
      std::conditional_t<std::is_same_v<S, float>, detail::PackedMatrix<float>, std::monostate>;
  Packed wn_packed_;             // (num_experts, model_dim)
  Packed x_packed_;              // (num_tokens, model_dim)
  detail::Buffer<S> y_scratch_;  // (T, model_dim)
};

}  // namespace moet
