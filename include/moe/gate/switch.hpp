#pragma once
// moe::gate::Switch: the Switch Transformer router (Fedus, Zoph, Shazeer 2021, "Switch
// Transformers", arXiv 2101.03961). Top-1 routing with an expert capacity, no noise:
//   p = softmax(x W_g) over all n experts,  e(x) = argmax_i p_i (ties to the lower index),
//   gate = p_e (not renormalized),
// and per group of R_g rows each expert takes at most C = ceil(capacity_factor * R_g / n) of
// them: the first C rows (in row order) that chose it. The others are dropped (kNotRouted, gate
// 0): the layer outputs zeros for them, and a residual connection around it carries them on.
// The auxiliary loss (the paper's eq. 4) is, per group,
//   n * sum_i f_i P_i,   f_i = share of the group's rows whose argmax is i (before dropping),
//                        P_i = mean of p_i over the group's rows,
// summed over groups weighted by R_g / R (one group: the paper's formula), times w_aux. f is
// piecewise constant and has no gradient; P has one. The load is the hard count.

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"

namespace moe::gate {

struct Switch {
  struct Config {
    double capacity_factor = 1.25;  // expert capacity C = ceil(capacity_factor * R_g / n); finite, > 0
    double w_aux = 1e-2;            // weight of the auxiliary loss n sum_i f_i P_i (the paper's alpha)
    double w_z = 0.0;               // router z-loss weight (0: off)
    double init_scale = 1.0;        // W_g uniform in (-s / sqrt(d), s / sqrt(d)]
    double w_importance = 0.0;      // CV^2(Importance) of MATH.md 3, off by default
    double w_load = 0.0;            // CV^2 of the counts: reported, no gradient; off by default
  };
  template <Backend B>
  class Policy;

  // Expert capacity for a group of `rows` rows: ceil(capacity_factor * rows / n), where a product
  // within a relative 1e-9 above an integer counts as that integer (1.1 * 100 / 10 gives 11, not
  // the 12 that rounding in binary would give), and at most rows (more changes nothing). At
  // least 1 for rows >= 1; 0 for no rows.
  MOE_HD static Index capacity(double capacity_factor, Index rows, Index n) {
    const double c = capacity_factor * static_cast<double>(rows) / static_cast<double>(n);
    if (c >= static_cast<double>(rows)) return rows;
    const double whole = std::floor(c);
    return static_cast<Index>(c - whole <= 1e-9 * c ? whole : whole + 1.0);
  }
};

template <Backend B>
class Switch::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> logits;      // [R x n] x W_g
    Buffer<S> p;           // [R x n] softmax of the logits
    Buffer<S> lse;         // [R x 1] log-sum-exp of the logits (z-loss)
    Buffer<Index> choice;  // [R x 1] argmax of p
    Buffer<Index> expert;  // [R x 1] the kept expert, or kNotRouted
    Buffer<Index> count;   // [groups x n] rows whose argmax is i, per group (R_g f_i)
    Buffer<S> aux;         // [groups x 1] the group's n sum_i f_i P_i * R_g / R
    // Workspace of the capacity pass: each row's key group * n + argmax, the rows stably sorted by
    // key, where each key's rows start, each row's rank among its key's rows, and per group the
    // column sums of p (sum_r P_ri) with their partial sums.
    Buffer<Index> key, order, start, rank;
    Buffer<S> col, partial;
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts), groups_(groups) {
    detail::require(n_experts >= 1, "gate::Switch: n_experts = ", n_experts, ", expected at least 1");
    detail::require(config.capacity_factor > 0 && std::isfinite(config.capacity_factor),
                    "gate::Switch: capacity_factor = ", config.capacity_factor, ", expected a finite value > 0");
    detail::require(config.w_aux >= 0 && std::isfinite(config.w_aux), "gate::Switch: w_aux = ", config.w_aux,
                    ", expected a finite value >= 0");
    require_weights("gate::Switch", config.w_importance, config.w_load, config.w_z);
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::Switch: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                              d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0);
  }

  [[nodiscard]] Index k() const { return 1; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }
  // The capacity of each expert in a group of `rows` rows.
  [[nodiscard]] Index capacity(Index rows) const { return Switch::capacity(config_.capacity_factor, rows, n_); }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode, const GateNoise<S>&,
               GateRouting<B>& routing, Saved& saved) const {
    const Index rows = x.rows, n = n_, groups = groups_;
    saved.logits.resize(rows, n);
    saved.p.resize(rows, n);
    saved.lse.resize(rows, 1);
    saved.choice.resize(rows, 1);
    saved.expert.resize(rows, 1);
    saved.count.resize(groups, n);
    saved.aux.resize(groups, 1);
    routing.expert.resize(rows, 1);
    routing.gate.resize(rows, 1);
    w_gate_.logits(ctx, x, offsets, saved.logits.view());

    // Per row: the softmax and its argmax (strict >, so ties go to the lower index).
    const S* l = saved.logits.data();
    S* p = saved.p.data();
    Index* choice = saved.choice.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index r) { choice[r] = softmax_row(l + r * n, n, p + r * n); });

    // Capacity, in row order per group: a row is kept when fewer than C earlier rows of its group
    // chose its expert, i.e. when its rank among the group's rows with the same argmax (from a
    // stable sort by the key group * n + argmax) is below C. The argmax counts are the keys'
    // histogram. Every step is a parallel primitive: no row is walked by one thread.
    const double cf = config_.capacity_factor;
    const Index bins = groups * n;
    saved.key.resize(rows, 1);
    saved.order.resize(rows, 1);
    saved.rank.resize(rows, 1);
    saved.start.resize(bins + 1, 1);
    Index* key = saved.key.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index r) { key[r] = group_of_row(offsets, groups, r) * n + choice[r]; });
    Index* count = saved.count.data();
    B::histogram(ctx, key, rows, bins, count);
    B::exclusive_scan(ctx, count, bins, saved.start.data());
    B::stable_sort_by_key(ctx, key, rows, bins, saved.order.data());
    {
      const Index* order = saved.order.data();
      const Index* start = saved.start.data();
      Index* rank = saved.rank.data();
      B::for_each(ctx, rows, [=] MOE_HD(Index q) { rank[order[q]] = q - start[key[order[q]]]; });
    }
    Index* expert = saved.expert.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    {
      const Index* rank = saved.rank.data();
      B::for_each(ctx, rows, [=] MOE_HD(Index r) {
        const Index g = group_of_row(offsets, groups, r);
        const Index r_g = offsets != nullptr ? offsets[g + 1] - offsets[g] : rows;
        const Index e = choice[r];
        const bool keep = rank[r] < Switch::capacity(cf, r_g, n);
        expert[r] = keep ? e : kNotRouted;
        out_expert[r] = expert[r];
        out_gate[r] = keep ? p[r * n + e] : S(0);
      });
    }
    // The auxiliary loss n sum_i f_i P_i (weighted per group), summed with the layer's statistics.
    routing.load_is_count = true;
    routing.load.resize(0, 0);
    routing.loss_aux = S(0);
    switch_loss<B>(ctx, ConstMatrixView<S>(saved.p.view()), offsets, groups, count, config_.w_aux, saved.col,
                   saved.partial, saved.aux, routing);
    routing.loss_z = S(0);
    z_loss<B>(ctx, saved.logits.view(), config_.w_z, saved.lse.view(), routing);
  }

  // dp_ri = dgate_r at the kept expert (nothing for a dropped row) + aux_scale * w_aux * n * cnt_gi
  // / (R_g R); then the softmax backward, the z-loss, and the router.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S*, S aux_scale, MatrixView<S> dx) {
    const Index rows = x.rows, n = n_, groups = groups_;
    dlogits_.resize(rows, n);
    const S* p = saved.p.data();
    const Index* expert = saved.expert.data();
    const Index* count = saved.count.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    const S aux_coef =
        rows > 0 ? aux_scale * static_cast<S>(config_.w_aux) * static_cast<S>(n) / static_cast<S>(rows) : S(0);
    S* dl = dlogits_.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index r) {
      const Index g = group_of_row(offsets, groups, r);
      const Index r_g = offsets != nullptr ? offsets[g + 1] - offsets[g] : rows;
      const S c = aux_coef / static_cast<S>(r_g);
      const Index* cnt = count + g * n;
      const S* pr = p + r * n;
      S* dr = dl + r * n;
      for (Index i = 0; i < n; ++i) dr[i] = c * static_cast<S>(cnt[i]);
      if (expert[r] != kNotRouted) dr[expert[r]] += dg[r * dg_stride];
      softmax_row_backward(pr, n, dr);
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
  Index n_, groups_;
  RouterWeight<B> w_gate_;
  Buffer<S> dlogits_;  // backward workspace, reused across calls
};

}  // namespace moe::gate
