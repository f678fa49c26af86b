#pragma once
// moe::gate::Softmax: dense softmax gating, G(x) = softmax(x W_g) (MATH.md 2). Every expert
// sees every token (k = n); a baseline to compare the sparse gates against.

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"

namespace moe::gate {

struct Softmax {
  struct Config {
    double w_importance = 1e-2;
    double w_load = 1e-2;     // the load is the count (T for every expert), so this term is 0
    double w_z = 0.0;         // router z-loss weight (0: off)
    double init_scale = 0.0;  // W_g uniform in (-s / sqrt(d), s / sqrt(d)]; 0 starts uniform
  };
  template <Backend B>
  class Policy;
};

template <Backend B>
class Softmax::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> logits;  // [T x n] x W_g
    Buffer<S> gate;    // [T x n] softmax
    Buffer<S> lse;     // [T x 1] (z-loss)
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts) {
    detail::require(n_experts >= 1, "gate::Softmax: n_experts = ", n_experts, ", expected at least 1");
    require_weights("gate::Softmax", config.w_importance, config.w_load, config.w_z);
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::Softmax: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                              d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0);
  }

  [[nodiscard]] Index k() const { return n_; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode, const GateNoise<S>&,
               GateRouting<B>& routing, Saved& saved) const {
    const Index t_count = x.rows, n = n_;
    saved.logits.resize(t_count, n);
    saved.gate.resize(t_count, n);
    saved.lse.resize(t_count, 1);
    routing.expert.resize(t_count, n);
    routing.gate.resize(t_count, n);
    w_gate_.logits(ctx, x, offsets, saved.logits.view());
    const S* l = saved.logits.data();
    S* g = saved.gate.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      S* row = g + t * n;
      softmax_row(l + t * n, n, row);
      for (Index i = 0; i < n; ++i) {
        out_gate[t * n + i] = row[i];
        out_expert[t * n + i] = i;
      }
    });
    routing.load_is_count = true;
    routing.load.resize(0, 0);
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    z_loss<B>(ctx, saved.logits.view(), config_.w_z, saved.lse.view(), routing);
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S*, S aux_scale, MatrixView<S> dx) {
    const Index t_count = x.rows, n = n_;
    dlogits_.resize(t_count, n);
    const S* g = saved.gate.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    S* dl = dlogits_.data();
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      for (Index i = 0; i < n; ++i) dl[t * n + i] = dg[t * dg_stride + i];
      softmax_row_backward(g + t * n, n, dl + t * n);
    });
    z_loss_backward<B>(ctx, saved.logits.view(), saved.lse.view(), config_.w_z, aux_scale, dlogits_.view());
    w_gate_.backward(ctx, x, offsets, dlogits_.view(), dx);
  }

  // The router's logits and probabilities softmax(logits) [R x n] of the rows x (for inspection).
  void scores(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> logits,
              MatrixView<S> probabilities) const {
    w_gate_.softmax_scores(ctx, x, offsets, logits, probabilities);
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() { return {w_gate_.parameter()}; }

 private:
  Config config_;
  Index n_;
  RouterWeight<B> w_gate_;
  Buffer<S> dlogits_;
};

}  // namespace moe::gate
