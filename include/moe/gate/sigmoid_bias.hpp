#pragma once
// moe::gate::SigmoidBias: the router of DeepSeek-V3 (auxiliary-loss-free load balancing), with
// the group-limited selection of DeepSeek-V2/V3.
//   s_i = sigmoid((x W_g)_i)
//   selection by s_i + b_i: keep the top_groups best of expert_groups contiguous groups (a
//   group's score: the sum of its best min(2, size) values of s + b), then the k best experts
//   of the kept groups (ties to the lower index, for groups and experts alike)
//   gate of a chosen j: scale * s_j / sum over the chosen of s (the bias is not in the gate), or
//   scale * s_j with normalize = false (DeepSeek-V3's norm_topk_prob = false)
// The bias b (one vector per stacked gate group) is not trained by the gradient: every training
// forward, after its selection, moves it by b_i += bias_rate * sign(mean count - count_i) over
// the rows of that group, so overloaded experts get chosen less and underloaded ones more
// without a balancing loss. Inference never changes it, so evaluate with Mode::inference, and
// use bias_rate = 0 where repeated training forwards must see the same gate (finite differences).
// The load is the hard count. With k = 1 every gate is the constant scale and the router gets no
// gradient. There is no router z-loss: unlike softmax, sigmoid scores are not invariant to a shift
// of the logits, so pushing the log-sum-exp down would change the routing, not just regularize it.

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"
#include "moe/scalar_math.hpp"
#include "moe/top_k.hpp"

namespace moe::gate {

struct SigmoidBias {
  struct Config {
    Index k = 2;                // experts per token, 1 <= k <= top_groups * (n_experts / expert_groups)
    Index expert_groups = 1;    // contiguous equal groups of experts; must divide n_experts
    Index top_groups = 1;       // groups a token may choose from, 1 <= top_groups <= expert_groups
    double bias_rate = 1e-3;    // bias step per training forward (0: the bias never moves)
    bool normalize = true;      // divide the chosen s by their sum (false: the gates are scale * s_j)
    double scale = 1.0;         // every gate is multiplied by it (DeepSeek's routed_scaling_factor)
    double init_scale = 1.0;    // W_g uniform in (-s / sqrt(d), s / sqrt(d)]
    double w_importance = 0.0;  // CV^2(Importance) weight; the bias balances without it
    double w_load = 0.0;        // the load is a count: this term is reported but has no gradient
  };
  template <Backend B>
  class Policy;
};

template <Backend B>
class SigmoidBias::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<Index> top;  // [R x k] chosen experts, in the order of s + b
    Buffer<S> chosen;   // [R x k] s of each chosen expert
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts), groups_(groups) {
    detail::require(n_experts >= 1, "gate::SigmoidBias: n_experts = ", n_experts, ", expected at least 1");
    detail::require(groups >= 1, "gate::SigmoidBias: groups = ", groups, ", expected at least 1");
    detail::require(config.expert_groups >= 1 && n_experts % config.expert_groups == 0,
                    "gate::SigmoidBias: expert_groups = ", config.expert_groups,
                    ", expected a divisor of n_experts = ", n_experts);
    detail::require(config.top_groups >= 1 && config.top_groups <= config.expert_groups,
                    "gate::SigmoidBias: top_groups = ", config.top_groups,
                    ", expected 1 <= top_groups <= expert_groups = ", config.expert_groups);
    const Index reachable = config.top_groups * (n_experts / config.expert_groups);
    detail::require(config.k >= 1 && config.k <= reachable, "gate::SigmoidBias: k = ", config.k,
                    ", expected 1 <= k <= top_groups * (n_experts / expert_groups) = ", reachable);
    detail::require(config.bias_rate >= 0 && std::isfinite(config.bias_rate),
                    "gate::SigmoidBias: bias_rate = ", config.bias_rate, ", expected a finite value >= 0");
    detail::require(config.scale > 0 && std::isfinite(config.scale), "gate::SigmoidBias: scale = ", config.scale,
                    ", expected a finite value > 0");
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::SigmoidBias: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    require_weights("gate::SigmoidBias", config.w_importance, config.w_load, 0.0);
    // Random start: a zero router would tie every score and send every token to the same experts.
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                              d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0);
    bias_.resize(groups, n_experts, S(0));
  }

  [[nodiscard]] Index k() const { return config_.k; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }

  // The selection bias [groups x n] in the backend's memory; not a parameter (no gradient).
  [[nodiscard]] ConstMatrixView<S> bias() const { return bias_.view(); }
  // Replaces the bias (e.g. to restore a checkpoint): b [groups x n] of finite values in host memory.
  void set_bias(ConstMatrixView<S> b) {
    detail::require(b.rows == groups_ && b.cols == n_, "gate::SigmoidBias::set_bias: bias is ", b.rows, " x ", b.cols,
                    ", expected [groups x n_experts] = ", groups_, " x ", n_);
    detail::require(b.data != nullptr, "gate::SigmoidBias::set_bias: bias has null data");
    detail::require(b.rows <= 1 || b.stride >= b.cols, "gate::SigmoidBias::set_bias: bias has the row stride ",
                    b.stride, ", expected at least its ", b.cols, " columns");
    typename B::Context ctx;
    const std::vector<S> host = to_host<B>(ctx, b);  // b lives in backend memory
    for (Index g = 0; g < b.rows; ++g)
      for (Index i = 0; i < b.cols; ++i) {
        const S v = host[static_cast<std::size_t>(g * b.cols + i)];
        detail::require(std::isfinite(static_cast<double>(v)), "gate::SigmoidBias::set_bias: bias(", g, ", ", i,
                        ") = ", v, ", expected a finite value");
      }
    B::copy(ctx, b, bias_.view());
  }

  // Selects and gates every row; in Mode::train then moves the bias by the counts of this forward
  // (one bias update per training forward).
  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode mode, const GateNoise<S>&,
               GateRouting<B>& routing, Saved& saved) {
    const Index rows = x.rows, n = n_, k = config_.k, groups = groups_;
    const Index eg = config_.expert_groups, tg = config_.top_groups, size = n / eg;
    const Index per_group = size < 2 ? size : 2;
    logits_.resize(rows, n);
    biased_.resize(rows, n);
    group_score_.resize(rows, eg);
    kept_.resize(rows, tg);
    saved.top.resize(rows, k);
    saved.chosen.resize(rows, k);
    routing.expert.resize(rows, k);
    routing.gate.resize(rows, k);
    w_gate_.logits(ctx, x, offsets, logits_.view());

    S* s = logits_.data();  // becomes s = sigmoid(logits) in place
    S* v = biased_.data();
    S* gs = group_score_.data();
    Index* kept = kept_.data();
    const S* b = bias_.data();
    Index* top = saved.top.data();
    S* chosen = saved.chosen.data();
    Index* out_expert = routing.expert.data();
    S* out_gate = routing.gate.data();
    const S scale = static_cast<S>(config_.scale);
    const bool normalize = config_.normalize;
    B::for_each(ctx, rows, [=] MOE_HD(Index r) {
      S* sr = s + r * n;
      S* vr = v + r * n;
      const S* br = b + group_of_row(offsets, groups, r) * n;
      for (Index i = 0; i < n; ++i) {
        sr[i] = detail::sigmoid(sr[i]);
        vr[i] = sr[i] + br[i];
      }
      // Group-limited: score each expert group by its best min(2, size) biased values, keep the best tg.
      S* gr = gs + r * eg;
      Index* kr = kept + r * tg;
      for (Index e = 0; e < eg; ++e) {
        Index best[2] = {0, 0};
        top_k_stable(vr + e * size, size, per_group, best);
        gr[e] = S(0);
        for (Index j = 0; j < per_group; ++j) gr[e] += vr[e * size + best[j]];
      }
      top_k_stable(gr, eg, tg, kr);
      // The k best biased values among the kept groups' experts (top_k_stable's order, restricted).
      Index* tr = top + r * k;
      top_k_in_groups(vr, n, size, kr, tg, k, tr);
      // Gates from s alone: scale * s_j / sum of the chosen s (scale / k where every s underflowed
      // to 0), or scale * s_j unnormalized.
      S sum = 0;
      for (Index j = 0; j < k; ++j) {
        chosen[r * k + j] = sr[tr[j]];
        sum += chosen[r * k + j];
      }
      for (Index j = 0; j < k; ++j) {
        out_expert[r * k + j] = tr[j];
        out_gate[r * k + j] = !normalize   ? scale * chosen[r * k + j]
                              : sum > S(0) ? scale * (chosen[r * k + j] / sum)
                                           : scale / static_cast<S>(k);
      }
    });
    routing.load_is_count = true;
    routing.load.resize(0, 0);
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    if (mode == Mode::train && config_.bias_rate > 0) update_bias(ctx, rows, offsets, top);
  }

  // With g_j = scale s_j / S, S = sum of the chosen s: ds_m = scale (dg_m S - sum_j s_j dg_j) / S^2
  // for a chosen m (0 otherwise; exactly 0 at k = 1, where the gate is the constant scale);
  // unnormalized, ds_m = scale dg_m. Then dlogit_m = ds_m s_m (1 - s_m). The bias has no gradient.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S*, S, MatrixView<S> dx) {
    const Index rows = x.rows, n = n_, k = config_.k;
    dlogits_.resize(rows, n);
    const Index* top = saved.top.data();
    const S* chosen = saved.chosen.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    const S scale = static_cast<S>(config_.scale);
    const bool normalize = config_.normalize;
    S* dl = dlogits_.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index r) {
      S* dr = dl + r * n;
      for (Index i = 0; i < n; ++i) dr[i] = S(0);
      const S* cr = chosen + r * k;
      if (!normalize) {
        for (Index j = 0; j < k; ++j) dr[top[r * k + j]] = scale * dg[r * dg_stride + j] * cr[j] * (S(1) - cr[j]);
        return;
      }
      S sum = 0;
      for (Index j = 0; j < k; ++j) sum += cr[j];
      if (!(sum > S(0))) return;  // the constant scale / k of forward
      S dot = 0;                  // sum_j s_j dg_j
      for (Index j = 0; j < k; ++j) dot += cr[j] * dg[r * dg_stride + j];
      const S c = scale / sum;
      for (Index j = 0; j < k; ++j) {
        const S ds = c * ((dg[r * dg_stride + j] * sum - dot) / sum);
        dr[top[r * k + j]] = ds * cr[j] * (S(1) - cr[j]);
      }
    });
    w_gate_.backward(ctx, x, offsets, dlogits_.view(), dx);
  }

  // The router's logits [R x n] and its scores sigmoid(logits) [R x n] (without the selection
  // bias) of the rows x (for inspection and comparison with other implementations).
  void scores(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> logits,
              MatrixView<S> probabilities) const {
    w_gate_.logits(ctx, x, offsets, logits);
    S* p = probabilities.data;
    const Index cols = logits.cols, stride = probabilities.stride;
    for_each_element<B>(ctx, logits.rows, cols,
                        [=] MOE_HD(Index r, Index c) { p[r * stride + c] = detail::sigmoid(logits(r, c)); });
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() { return {w_gate_.parameter()}; }

  // In a layer sharded across processes: the bias moves by the counts of the global batch, so it
  // stays the same on every rank.
  void set_reduction(GateReduction<S> reduction) { reduction_ = std::move(reduction); }

  // Per gate group: b_i += bias_rate * sign(rows * k / n - count_i), compared exactly in integers. A step of
  // forward, public only because a CUDA device lambda cannot live in a private member function.
  void update_bias(typename B::Context& ctx, Index rows, const Index* offsets, const Index* top) {
    const Index n = n_, k = config_.k, groups = groups_;
    // Per group: the count of each expert, then the group's slots. The counts are the backend's
    // histogram of the keys group * n + expert over every slot (no row walked by one thread).
    count_.resize(groups_, n + 1);
    key_.resize(rows * k, 1);
    hist_.resize(groups_ * n, 1);
    count_slots<B>(ctx, top, rows, k, offsets, groups, n, key_.data(), hist_.data());
    Index* count = count_.data();
    const Index* hist = hist_.data();
    B::for_each(ctx, groups * (n + 1), [=] MOE_HD(Index item) {
      const Index g = item / (n + 1), i = item % (n + 1);
      const Index begin = offsets != nullptr ? offsets[g] : 0, end = offsets != nullptr ? offsets[g + 1] : rows;
      count[item] = i < n ? hist[g * n + i] : (end - begin) * k;
    });
    S* b = bias_.data();
    const S rate = static_cast<S>(config_.bias_rate);
    if (reduction_) {
      std::vector<Index> host = to_host<B>(ctx, ConstMatrixView<Index>(count_.view()));
      reduction_.sum_index(host.data(), static_cast<Index>(host.size()));
      from_host<B>(ctx, host, count_);
      count = count_.data();
    }
    B::for_each(ctx, groups * n, [=] MOE_HD(Index item) {
      const Index g = item / n, i = item % n;
      const Index* c = count + g * (n + 1);
      const Index diff = c[n] - c[i] * n;  // n * (mean count - count_i)
      b[item] += diff > 0 ? rate : (diff < 0 ? -rate : S(0));
    });
  }


 private:
  Config config_;
  Index n_, groups_;
  RouterWeight<B> w_gate_;
  Buffer<S> bias_;                                     // [groups x n] selection bias
  Buffer<S> logits_, biased_, group_score_, dlogits_;  // workspaces, reused across calls
  Buffer<Index> kept_, count_, key_, hist_;
  GateReduction<S> reduction_;  // sums over the ranks of a sharded layer, or empty
};

}  // namespace moe::gate
