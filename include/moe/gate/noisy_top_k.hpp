#pragma once
// moe::gate::NoisyTopK: the paper's gate (MATH.md 2-3).
//   H = x W_g + z * (softplus(x W_noise) + eps),   G = softmax(KeepTopK(H, k))
// with the smooth load estimator P(x, i) computed from the top-(k+1) noisy logits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"
#include "moe/scalar_math.hpp"
#include "moe/top_k.hpp"

namespace moe::detail {
// MATH.md 3: the threshold of expert i is the (k+1)-th noisy logit when i is in the top k,
// else the k-th; top holds the top-(k+1) indices in order.
MOE_HD inline Index load_threshold(const Index* top, Index k, Index i) {
  return is_among(top, k, i) ? top[k] : top[k - 1];
}
}  // namespace moe::detail

namespace moe::gate {

struct NoisyTopK {
  struct Config {
    Index k = 2;              // experts per token, 1 <= k <= n_experts
    double eps_noise = 1e-2;  // MATH.md 2: added to softplus, the noise floor
    bool noisy = true;        // false: no noise even in training; load falls back to counts
    double w_importance = 1e-2;
    double w_load = 1e-2;
    double w_z = 0.0;  // router z-loss weight on the clean logits (0: off)
  };
  template <Backend B>
  class Policy;
};

template <Backend B>
class NoisyTopK::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> clean, raw, sigma, z, h, p;  // [T x n]: clean and noise logits, noise scale, noise, H, P(x, i)
    Buffer<S> gate;                        // [T x k]
    Buffer<Index> top;                     // [T x kk], kk = min(k + 1, n): the top-(k+1) of H
    Buffer<S> partial;                     // the load's partial sums (sum_rows_by_group)
    Buffer<S> lse;                         // [T x 1] log-sum-exp of the clean logits (z-loss)
    bool noise_active = false;
    bool smooth_load = false;
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t /*seed*/, Index groups = 1)
      : config_(config), d_(d_model), n_(n_experts), groups_(groups) {
    detail::require(n_experts >= 1, "gate::NoisyTopK: n_experts = ", n_experts, ", expected at least 1");
    detail::require(config.k >= 1 && config.k <= n_experts, "gate::NoisyTopK: k = ", config.k,
                    ", expected 1 <= k <= n_experts = ", n_experts);
    detail::require(config.eps_noise >= 0 && std::isfinite(config.eps_noise),
                    "gate::NoisyTopK: eps_noise = ", config.eps_noise, ", expected a finite value >= 0");
    require_weights("gate::NoisyTopK", config.w_importance, config.w_load, config.w_z);
    // MATH.md 2: W_g and W_noise start at zero ("no signal and some noise").
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, 0, 0.0);
    w_noise_ = RouterWeight<B>("gate.w_noise", d_model, n_experts, groups, 0, 0.0);
  }

  [[nodiscard]] Index k() const { return config_.k; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode mode) const { return config_.noisy && mode == Mode::train; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] RouterWeight<B>& router() { return w_gate_; }  // W_g

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode mode,
               const GateNoise<S>& noise, GateRouting<B>& routing, Saved& saved) const {
    const Index t_count = x.rows, n = n_, k = config_.k, kk = std::min(k + 1, n), groups = groups_;
    saved.noise_active = needs_noise(mode);
    // MATH.md 3: without noise, or with no (k+1)-th logit, the load is the count.
    saved.smooth_load = saved.noise_active && k < n;
    for (auto* b : {&saved.clean, &saved.raw, &saved.sigma, &saved.z, &saved.h, &saved.p}) b->resize(t_count, n);
    saved.gate.resize(t_count, k);
    saved.top.resize(t_count, kk);
    saved.lse.resize(t_count, 1);
    routing.expert.resize(t_count, k);
    routing.gate.resize(t_count, k);

    w_gate_.logits(ctx, x, offsets, saved.clean.view());
    if (saved.noise_active)
      w_noise_.logits(ctx, x, offsets, saved.raw.view());
    else
      B::fill(ctx, saved.raw.view(), S(0));

    const S* clean = saved.clean.data();
    const S* raw = saved.raw.data();
    S* sigma = saved.sigma.data();
    S* z = saved.z.data();
    S* h = saved.h.data();
    S* p = saved.p.data();
    Index* top = saved.top.data();
    S* gate = saved.gate.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    const bool active = saved.noise_active, smooth = saved.smooth_load;
    const S eps = static_cast<S>(config_.eps_noise);
    const GateNoise<S> nz = noise;
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      const S* c = clean + t * n;
      const S* r = raw + t * n;
      S* sr = sigma + t * n;
      S* zr = z + t * n;
      S* hr = h + t * n;
      const Index column = active ? group_of_row(offsets, groups, t) * n : 0;
      for (Index i = 0; i < n; ++i) {
        // MATH.md 2: sigma = softplus(raw) + eps in training, 0 at inference or without noise.
        sr[i] = active ? detail::softplus(r[i]) + eps : S(0);
        zr[i] = active ? nz.at(t, column + i) : S(0);
        hr[i] = c[i] + zr[i] * sr[i];
      }
      Index* tp = top + t * kk;
      top_k_stable(hr, n, kk, tp);
      // MATH.md 2: softmax over the k kept noisy logits; the first is the largest.
      S sum = 0;
      for (Index j = 0; j < k; ++j) {
        gate[t * k + j] = std::exp(hr[tp[j]] - hr[tp[0]]);
        sum += gate[t * k + j];
      }
      for (Index j = 0; j < k; ++j) {
        gate[t * k + j] /= sum;
        out_gate[t * k + j] = gate[t * k + j];
        out_expert[t * k + j] = tp[j];
      }
      if (!smooth) return;
      for (Index i = 0; i < n; ++i) {
        const Index th = detail::load_threshold(tp, k, i);
        p[t * n + i] = detail::normal_cdf_scaled(c[i] - hr[th], sr[i]);
      }
    });
    routing.load_is_count = !smooth;
    routing.load.resize(smooth ? groups : 0, n);
    if (smooth) sum_rows_by_group<B>(ctx, saved.p.view(), offsets, groups, routing.load.data(), &saved.partial);
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    z_loss<B>(ctx, saved.clean.view(), config_.w_z, saved.lse.view(), routing);
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S* dload, S aux_scale, MatrixView<S> dx) {
    const Index t_count = x.rows, n = n_, k = config_.k, kk = saved.top.cols(), groups = groups_;
    dclean_.resize(t_count, n);
    draw_.resize(t_count, n);
    const S* clean = saved.clean.data();
    const S* raw = saved.raw.data();
    const S* sigma = saved.sigma.data();
    const S* z = saved.z.data();
    const S* h = saved.h.data();
    const Index* top = saved.top.data();
    const S* gate = saved.gate.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    S* dc = dclean_.data();
    S* dr = draw_.data();
    const bool active = saved.noise_active;
    const bool smooth = saved.smooth_load && dload != nullptr;
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      const Index* tp = top + t * kk;
      const S* c = clean + t * n;
      const S* dl = dload != nullptr ? dload + group_of_row(offsets, groups, t) * n : nullptr;
      const S* hr = h + t * n;
      S* dh = dc + t * n;
      for (Index i = 0; i < n; ++i) dh[i] = 0;
      // MATH.md 5: dH_j = G_j (dG_j - sum_l G_l dG_l) for kept j.
      S dot = 0;
      for (Index j = 0; j < k; ++j) dot += gate[t * k + j] * dg[t * dg_stride + j];
      for (Index j = 0; j < k; ++j) dh[tp[j]] += gate[t * k + j] * (dg[t * dg_stride + j] - dot);
      // MATH.md 5: the threshold is another expert's noisy logit, and gradient flows into it.
      if (smooth)
        for (Index i = 0; i < n; ++i) {
          const Index th = detail::load_threshold(tp, k, i);
          dh[th] -= dl[i] * detail::normal_cdf_scaled_grad(c[i] - hr[th], sigma[t * n + i]).dz;
        }
      for (Index i = 0; i < n; ++i) {
        S dclean = dh[i];
        S dsigma = dh[i] * z[t * n + i];  // MATH.md 5: H = clean + z * sigma
        if (smooth) {
          const Index th = detail::load_threshold(tp, k, i);
          const auto g = detail::normal_cdf_scaled_grad(c[i] - hr[th], sigma[t * n + i]);
          dclean += dl[i] * g.dz;
          dsigma += dl[i] * g.dsigma;
        }
        dh[i] = dclean;
        dr[t * n + i] = active ? dsigma * detail::sigmoid(raw[t * n + i]) : S(0);
      }
    });
    z_loss_backward<B>(ctx, saved.clean.view(), saved.lse.view(), config_.w_z, aux_scale, dclean_.view());
    w_gate_.backward(ctx, x, offsets, dclean_.view(), dx);
    if (active) w_noise_.backward(ctx, x, offsets, draw_.view(), dx);
  }

  // The router's clean logits x W_g (no noise) and softmax(logits) [R x n] of the rows x (for inspection).
  void scores(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> logits,
              MatrixView<S> probabilities) const {
    w_gate_.softmax_scores(ctx, x, offsets, logits, probabilities);
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() { return {w_gate_.parameter(), w_noise_.parameter()}; }

 private:
  Config config_;
  Index d_, n_, groups_;
  RouterWeight<B> w_gate_, w_noise_;
  Buffer<S> dclean_, draw_;  // backward workspace, reused across calls
};

}  // namespace moe::gate
