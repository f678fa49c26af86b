#pragma once
// moe::gate::TopK: the softmax top-k router of today's open models, without noise.
//   l = x W_g (+ b_g with router_bias: GPT-OSS),   p = softmax(l) over all n experts,
//   selection: the k largest logits (ties to the lower index); with expert_groups > 1, only among
//     the top_groups best of expert_groups contiguous groups, a group scored by its largest logit
//     (DeepSeek-V2's group-limited greedy selection; the largest p, as the softmax is monotonic),
//   gate of a chosen j: scale * p_j / sum over the chosen of p  (normalize: Mixtral, GPT-OSS,
//     Qwen/OLMoE with norm_topk_prob = true; equal to a softmax over the kept logits), or
//     scale * p_j  (normalize = false: OLMoE, Qwen2-MoE and Qwen3-MoE by default, DeepSeek-V2).
// Optional losses: Switch's balancing loss n sum_i f_i P_i with f counted over the k slots (w_aux,
// the auxiliary loss of Mixtral, Qwen-MoE and OLMoE), the router z-loss (w_z), and the paper's
// CV^2(Importance) (w_importance). The load is the hard count (no noise, no smooth estimator).
// With the defaults it is NoisyTopK with noise off, with a randomly initialized router (without
// noise, a zero router would tie every logit and send every token to experts 0..k-1).

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"
#include "moe/top_k.hpp"

namespace moe::gate {

struct TopK {
  struct Config {
    Index k = 2;               // experts per token, 1 <= k <= top_groups * (n_experts / expert_groups)
    bool normalize = true;     // divide the chosen p by their sum (false: the gates are scale * p_j)
    double scale = 1.0;        // every gate is multiplied by it (DeepSeek's routed_scaling_factor)
    Index expert_groups = 1;   // contiguous equal groups of experts; must divide n_experts
    Index top_groups = 1;      // groups a token may choose from, 1 <= top_groups <= expert_groups
    bool router_bias = false;  // logits = x W_g + b_g, b_g a trainable parameter "gate.b_gate" (zero at start)
    double w_aux = 0.0;        // Switch's balancing loss n sum_i f_i P_i over the k slots (0: off)
    double w_importance = 1e-2;
    double w_load = 1e-2;     // the load is a count: this term is reported but has no gradient
    double w_z = 0.0;         // router z-loss weight (0: off)
    double init_scale = 1.0;  // W_g uniform in (-s / sqrt(d), s / sqrt(d)]
  };
  template <Backend B>
  class Policy;
};

template <Backend B>
class TopK::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> logits;     // [R x n] x W_g (+ b_g)
    Buffer<S> p;          // [R x n] softmax over all n (only when full_softmax())
    Buffer<Index> top;    // [R x k] the chosen experts, largest logit first
    Buffer<S> kept;       // [R x k] each chosen expert's share before scale: p_j / sum, or p_j
    Buffer<S> lse;        // [R x 1] log-sum-exp of the logits (z-loss)
    Buffer<Index> count;  // [groups x n] slots routed to each expert (w_aux)
    Buffer<S> col, partial, aux;  // the balancing loss's column sums of p, their partial sums, each group's term
    Buffer<Index> key;            // scratch of the counts
    Buffer<S> group_score;        // [R x expert_groups] each group's largest logit (group-limited)
    Buffer<Index> kept_groups;    // [R x top_groups] the groups kept
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts), groups_(groups) {
    detail::require(n_experts >= 1, "gate::TopK: n_experts = ", n_experts, ", expected at least 1");
    detail::require(groups >= 1, "gate::TopK: groups = ", groups, ", expected at least 1");
    detail::require(config.expert_groups >= 1 && n_experts % config.expert_groups == 0,
                    "gate::TopK: expert_groups = ", config.expert_groups, ", expected a divisor of n_experts = ",
                    n_experts);
    detail::require(config.top_groups >= 1 && config.top_groups <= config.expert_groups,
                    "gate::TopK: top_groups = ", config.top_groups,
                    ", expected 1 <= top_groups <= expert_groups = ", config.expert_groups);
    const Index reachable = config.top_groups * (n_experts / config.expert_groups);
    if (config.expert_groups == 1)
      detail::require(config.k >= 1 && config.k <= n_experts, "gate::TopK: k = ", config.k,
                      ", expected 1 <= k <= n_experts = ", n_experts);
    else
      detail::require(config.k >= 1 && config.k <= reachable, "gate::TopK: k = ", config.k,
                      ", expected 1 <= k <= top_groups * (n_experts / expert_groups) = ", reachable);
    detail::require(config.scale > 0 && std::isfinite(config.scale), "gate::TopK: scale = ", config.scale,
                    ", expected a finite value > 0");
    detail::require(config.w_aux >= 0 && std::isfinite(config.w_aux), "gate::TopK: w_aux = ", config.w_aux,
                    ", expected a finite value >= 0");
    require_weights("gate::TopK", config.w_importance, config.w_load, config.w_z);
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::TopK: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                              d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0,
                              config.router_bias ? "gate.b_gate" : "");
  }

  [[nodiscard]] Index k() const { return config_.k; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] RouterWeight<B>& router() { return w_gate_; }  // W_g (and b_g)

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode, const GateNoise<S>&,
               GateRouting<B>& routing, Saved& saved) const {
    const Index rows = x.rows, n = n_, k = config_.k, groups = groups_;
    const Index eg = config_.expert_groups, tg = config_.top_groups, size = n / eg;
    const bool full = full_softmax(), normalize = config_.normalize;
    saved.logits.resize(rows, n);
    saved.p.resize(full ? rows : 0, n);
    saved.top.resize(rows, k);
    saved.kept.resize(rows, k);
    saved.lse.resize(rows, 1);
    saved.group_score.resize(eg > 1 ? rows : 0, eg);
    saved.kept_groups.resize(eg > 1 ? rows : 0, tg);
    routing.expert.resize(rows, k);
    routing.gate.resize(rows, k);
    w_gate_.logits(ctx, x, offsets, saved.logits.view());

    const S* l = saved.logits.data();
    S* p = saved.p.data();
    Index* top = saved.top.data();
    S* kept = saved.kept.data();
    S* gs = saved.group_score.data();
    Index* kg = saved.kept_groups.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    const S scale = static_cast<S>(config_.scale);
    B::for_each(ctx, rows, [=] MOE_HD(Index r) {
      const S* lr = l + r * n;
      Index* tr = top + r * k;
      if (eg == 1) {
        top_k_stable(lr, n, k, tr);
      } else {
        // Group-limited: each group scored by its largest logit, the best tg groups kept.
        S* gr = gs + r * eg;
        Index* kr = kg + r * tg;
        for (Index e = 0; e < eg; ++e) {
          Index best = 0;
          top_k_stable(lr + e * size, size, 1, &best);
          gr[e] = lr[e * size + best];
        }
        top_k_stable(gr, eg, tg, kr);
        top_k_in_groups(lr, n, size, kr, tg, k, tr);
      }
      S* kt = kept + r * k;
      if (full) softmax_row(lr, n, p + r * n);
      if (normalize) {
        // p_j / sum of the chosen p = the softmax over the chosen logits; the first is the largest.
        S sum = 0;
        for (Index j = 0; j < k; ++j) {
          kt[j] = std::exp(lr[tr[j]] - lr[tr[0]]);
          sum += kt[j];
        }
        for (Index j = 0; j < k; ++j) kt[j] /= sum;
      } else {
        for (Index j = 0; j < k; ++j) kt[j] = p[r * n + tr[j]];
      }
      for (Index j = 0; j < k; ++j) {
        out_expert[r * k + j] = tr[j];
        out_gate[r * k + j] = scale * kt[j];
      }
    });
    routing.load_is_count = true;
    routing.load.resize(0, 0);
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    if (config_.w_aux > 0) {
      saved.count.resize(groups, n);
      saved.key.resize(rows * k, 1);
      count_slots<B>(ctx, top, rows, k, offsets, groups, n, saved.key.data(), saved.count.data());
      switch_loss<B>(ctx, ConstMatrixView<S>(saved.p.view()), offsets, groups, saved.count.data(), config_.w_aux,
                     saved.col, saved.partial, saved.aux, routing);
    }
    z_loss<B>(ctx, saved.logits.view(), config_.w_z, saved.lse.view(), routing);
  }

  // Normalized: dlogit_j = scale q_j (dg_j - sum_l q_l dg_l) for a chosen j (q: the kept shares).
  // Unnormalized, and for the balancing loss: dp_i = scale dg_i at the chosen + aux_scale * w_aux *
  // n * count_gi / (R_g R), then the softmax backward over all n. Then the z-loss and the router.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S*, S aux_scale, MatrixView<S> dx) {
    const Index rows = x.rows, n = n_, k = config_.k, groups = groups_;
    const bool full = full_softmax(), normalize = config_.normalize, aux = config_.w_aux > 0;
    dlogits_.resize(rows, n);
    const S* p = saved.p.data();
    const Index* top = saved.top.data();
    const S* kept = saved.kept.data();
    const Index* count = aux ? saved.count.data() : nullptr;
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    const S scale = static_cast<S>(config_.scale);
    const S aux_coef =
        aux && rows > 0 ? aux_scale * static_cast<S>(config_.w_aux) * static_cast<S>(n) / static_cast<S>(rows) : S(0);
    S* dl = dlogits_.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index r) {
      S* dr = dl + r * n;
      const Index* tr = top + r * k;
      const S* kt = kept + r * k;
      const S* dgr = dg + r * dg_stride;
      for (Index i = 0; i < n; ++i) dr[i] = S(0);
      if (full) {
        if (count != nullptr) {
          const Index g = group_of_row(offsets, groups, r);
          const Index r_g = offsets != nullptr ? offsets[g + 1] - offsets[g] : rows;
          const S c = aux_coef / static_cast<S>(r_g);
          for (Index i = 0; i < n; ++i) dr[i] = c * static_cast<S>(count[g * n + i]);
        }
        if (!normalize)
          for (Index j = 0; j < k; ++j) dr[tr[j]] += scale * dgr[j];
        softmax_row_backward(p + r * n, n, dr);
      }
      if (normalize) {
        S dot = 0;
        for (Index j = 0; j < k; ++j) dot += kt[j] * dgr[j];
        for (Index j = 0; j < k; ++j) dr[tr[j]] += scale * kt[j] * (dgr[j] - dot);
      }
    });
    z_loss_backward<B>(ctx, saved.logits.view(), saved.lse.view(), config_.w_z, aux_scale, dlogits_.view());
    w_gate_.backward(ctx, x, offsets, dlogits_.view(), dx);
  }

  // The router's logits [R x n] and the probabilities p = softmax(logits) over all n [R x n] of
  // the rows x, as forward computes them (for inspection and comparison with other implementations).
  void scores(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> logits,
              MatrixView<S> probabilities) const {
    w_gate_.softmax_scores(ctx, x, offsets, logits, probabilities);
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() { return w_gate_.parameters(); }

 private:
  // Whether forward computes the softmax over all n: for the unnormalized gates and the balancing loss.
  [[nodiscard]] bool full_softmax() const { return !config_.normalize || config_.w_aux > 0; }

  Config config_;
  Index n_, groups_;
  RouterWeight<B> w_gate_;
  Buffer<S> dlogits_;  // backward workspace, reused across calls
};

}  // namespace moe::gate
