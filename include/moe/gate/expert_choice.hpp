#pragma once
// moe::gate::ExpertChoice: expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with
// Expert Choice Routing", arXiv 2202.09368). The experts choose the tokens instead of the
// tokens choosing experts:
//   S = softmax(x W_g) over the n experts of each row,
//   expert i takes the C rows of its group with the largest S[:, i], C = ceil(c R_g / n),
// so every expert processes exactly C rows (perfect balance by construction, no auxiliary loss)
// and a token is processed by 0..n experts, with gate S[row, i] for each expert that took it.
//
// Contract mapping: k() = n slots per row; slot j is expert j if expert j took the row, else
// kNotRouted (gate 0). A row no expert took is a dropped token (the layer outputs 0 for it).
// The load is the hard count. Which rows are taken is piecewise constant in x; the gradient flows
// through the taken S entries (softmax backward) and the optional router z-loss.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"
#include "moe/top_k.hpp"

namespace moe::detail {

// C = ceil(capacity_factor * rows / n), clamped to [0, rows]. A product within a relative 1e-9
// of an integer counts as that integer, so that decimal factors round as in exact arithmetic
// (1.1 * 50 / 5 is 11, not 12).
MOE_HD inline Index expert_choice_capacity(double capacity_factor, Index rows, Index n) {
  if (rows <= 0 || n <= 0) return 0;
  const double v = capacity_factor * static_cast<double>(rows) / static_cast<double>(n);
  const double c = std::ceil(v * (1.0 - 1e-9));
  if (!(c > 0)) return 0;
  return c >= static_cast<double>(rows) ? rows : static_cast<Index>(c);
}

// The c rows of [begin, begin + count) with the largest col[r * n] (larger first, ties to the lower
// row, NaN last), written unordered into out[0..c), by a bounded heap whose root is the kept row
// that ranks last: O(count log c), no memory besides out. One serial walk per (group, expert):
// the plain reference that ExpertChoice's parallel selection (Policy::rank_entries) is tested
// against.
template <class S>
MOE_HD void expert_choice_select(const S* col, Index n, Index begin, Index count, Index c, Index* out) {
  if (c >= count) {
    for (Index j = 0; j < count; ++j) out[j] = begin + j;
    return;
  }
  if (c <= 0) return;
  // Row a ranks before row b when ranks_before(col, a * n, b * n): the column is strided by n, and
  // a * n < b * n exactly when a < b, so ties still go to the lower row.
  Index size = 0;
  for (Index r = begin; r < begin + count; ++r) {
    if (size < c) {
      Index j = size++;
      out[j] = r;
      while (j > 0) {
        const Index parent = (j - 1) / 2;
        if (!ranks_before(col, out[parent] * n, out[j] * n)) break;  // out[j] ranks after its parent
        const Index tmp = out[j];
        out[j] = out[parent];
        out[parent] = tmp;
        j = parent;
      }
      continue;
    }
    if (!ranks_before(col, r * n, out[0] * n)) continue;
    out[0] = r;
    Index j = 0;
    while (true) {
      const Index left = 2 * j + 1;
      if (left >= c) break;
      Index worst = left;
      if (left + 1 < c && ranks_before(col, out[left] * n, out[left + 1] * n)) worst = left + 1;
      if (!ranks_before(col, out[j] * n, out[worst] * n)) break;
      const Index tmp = out[j];
      out[j] = out[worst];
      out[worst] = tmp;
      j = worst;
    }
  }
}

// The order of a value in expert_choice_select's ranking as an unsigned key: a value that ranks
// before another has the smaller key (larger first, -0 as +0, NaN last, after -infinity). Equal
// keys are equal values, whose ties a stable sort leaves in row order.
template <class S>
MOE_HD auto descending_key(S v) {
  using U = std::conditional_t<sizeof(S) == 4, std::uint32_t, std::uint64_t>;
  static_assert(sizeof(S) == sizeof(U));
  if (v != v) return ~U{0};
  if (v == S(0)) v = S(0);
  U u;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(S) == 4)
    u = __float_as_uint(v);
  else
    u = static_cast<U>(__double_as_longlong(v));
#else
  std::memcpy(&u, &v, sizeof u);
#endif
  constexpr U sign = U{1} << (sizeof(U) * 8 - 1);
  const U ascending = (u & sign) != 0 ? static_cast<U>(~u) : static_cast<U>(u | sign);
  return static_cast<U>(~ascending);
}

// Digits of descending_key per pass of expert choice's selection sort.
inline constexpr int kExpertChoiceDigitBits = 16;

}  // namespace moe::detail

namespace moe::gate {

struct ExpertChoice {
  struct Config {
    double capacity_factor = 2.0;  // c: the average number of experts per token, C = ceil(c R_g / n), > 0
    double w_z = 0.0;              // router z-loss weight (0: off)
    double init_scale = 1.0;       // W_g uniform in (-s / sqrt(d), s / sqrt(d)]; 0 ties every choice to the first rows
    double w_importance = 0.0;     // CV^2(Importance) weight; the loads are equal by construction
    double w_load = 0.0;           // the load is the count (C for every expert): reported, no gradient
  };
  template <Backend B>
  class Policy;
};

template <Backend B>
class ExpertChoice::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> logits;      // [R x n] x W_g
    Buffer<S> prob;        // [R x n] S = softmax(logits)
    Buffer<S> lse;         // [R x 1] (z-loss)
    Buffer<Index> chosen;  // [R x n] i where expert i took the row, else kNotRouted
    Buffer<Index> picks;   // [R x n] flat: each (group, expert)'s rows, best first, at n * begin_g + i * R_g
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts), groups_(groups) {
    detail::require(n_experts >= 1, "gate::ExpertChoice: n_experts = ", n_experts, ", expected at least 1");
    detail::require(groups >= 1, "gate::ExpertChoice: groups = ", groups, ", expected at least 1");
    detail::require(config.capacity_factor > 0 && std::isfinite(config.capacity_factor),
                    "gate::ExpertChoice: capacity_factor = ", config.capacity_factor, ", expected a finite value > 0");
    require_weights("gate::ExpertChoice", config.w_importance, config.w_load, config.w_z);
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::ExpertChoice: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    w_gate_ = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                              d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0);
  }

  [[nodiscard]] Index k() const { return n_; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] RouterWeight<B>& router() { return w_gate_; }
  // C: the rows each expert takes from a group of `rows` rows.
  [[nodiscard]] Index capacity(Index rows) const {
    return detail::expert_choice_capacity(config_.capacity_factor, rows, n_);
  }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode, const GateNoise<S>&,
               GateRouting<B>& routing, Saved& saved) const {
    const Index rows = x.rows, n = n_, groups = groups_;
    const double cf = config_.capacity_factor;
    saved.logits.resize(rows, n);
    saved.prob.resize(rows, n);
    saved.lse.resize(rows, 1);
    saved.chosen.resize(rows, n);
    saved.picks.resize(rows, n);
    routing.expert.resize(rows, n);
    routing.gate.resize(rows, n);
    w_gate_.logits(ctx, x, offsets, saved.logits.view());
    const S* l = saved.logits.data();
    S* p = saved.prob.data();
    Index* chosen = saved.chosen.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index t) {
      softmax_row(l + t * n, n, p + t * n);
      for (Index i = 0; i < n; ++i) chosen[t * n + i] = kNotRouted;
    });
    rank_entries(ctx, p, rows, offsets);
    // Segment (g, i) of the ranked entries holds expert i's column over group g's rows, best
    // first: its first C entries are the rows the expert takes (expert_choice_select's choice).
    Index* picks = saved.picks.data();
    const Index* ranked = order_.data();
    B::for_each(ctx, rows * n, [=] MOE_HD(Index j) {
      const Index t = ranked[j] / n, i = ranked[j] % n;
      const Index g = offsets != nullptr ? segment_of_row(offsets, groups, t) : 0;
      const Index begin = offsets != nullptr ? offsets[g] : 0;
      const Index count = (offsets != nullptr ? offsets[g + 1] : rows) - begin;
      picks[j] = t;
      if (j - (n * begin + i * count) < detail::expert_choice_capacity(cf, count, n)) chosen[t * n + i] = i;
    });
    B::for_each(ctx, rows, [=] MOE_HD(Index t) {
      for (Index i = 0; i < n; ++i) {
        const bool taken = chosen[t * n + i] != kNotRouted;
        out_expert[t * n + i] = taken ? i : kNotRouted;
        out_gate[t * n + i] = taken ? p[t * n + i] : S(0);
      }
    });
    routing.load_is_count = true;
    routing.load.resize(0, 0);
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    z_loss<B>(ctx, saved.logits.view(), config_.w_z, saved.lse.view(), routing);
  }

  // dS = dgate on the taken entries (0 elsewhere), through the softmax: dlogits = S (dS - <S, dS>).
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S*, S aux_scale, MatrixView<S> dx) {
    const Index rows = x.rows, n = n_;
    dlogits_.resize(rows, n);
    const S* p = saved.prob.data();
    const Index* chosen = saved.chosen.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    S* dl = dlogits_.data();
    B::for_each(ctx, rows, [=] MOE_HD(Index t) {
      for (Index i = 0; i < n; ++i) dl[t * n + i] = chosen[t * n + i] != kNotRouted ? dg[t * dg_stride + i] : S(0);
      softmax_row_backward(p + t * n, n, dl + t * n);
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

  // Sorts the entries e = t * n + i of prob (row t, expert i) into order_ by (group of t, i,
  // rank of prob[e] in expert_choice_select's order, t), in parallel and deterministically: a
  // stable sort (B::stable_sort_by_key) per 16-bit digit of detail::descending_key, lowest first,
  // then one by the (group, expert) segment; the entries start in row order, so equal values stay
  // in row order. Public only because a CUDA device lambda cannot live in a private member.
  // The ranked entries of the last rank_entries call, copied to host memory (tests).
  void copy_order(Index* out) const {
    typename B::Context ctx;
    const std::vector<Index> host = to_host<B>(ctx, ConstMatrixView<Index>(order_.view()));
    std::copy(host.begin(), host.end(), out);
  }

  void rank_entries(typename B::Context& ctx, const S* prob, Index rows, const Index* offsets) const {
    const Index n = n_, groups = groups_, entries = rows * n;
    order_.resize(entries, 1);
    next_.resize(entries, 1);
    keys_.resize(entries, 1);
    perm_.resize(entries, 1);
    Index* order = order_.data();
    B::for_each(ctx, entries, [=] MOE_HD(Index e) { order[e] = e; });
    constexpr int bits = detail::kExpertChoiceDigitBits;
    constexpr int passes = static_cast<int>(sizeof(S)) * 8 / bits;
    for (int pass = 0; pass <= passes; ++pass) {
      const Index* in = order_.data();
      Index* keys = keys_.data();
      if (pass < passes) {
        B::for_each(ctx, entries, [=] MOE_HD(Index j) {
          keys[j] = static_cast<Index>((detail::descending_key(prob[in[j]]) >> (pass * bits)) & ((1u << bits) - 1u));
        });
      } else {
        B::for_each(ctx, entries, [=] MOE_HD(Index j) {
          const Index t = in[j] / n;
          keys[j] = (offsets != nullptr ? segment_of_row(offsets, groups, t) : 0) * n + in[j] % n;
        });
      }
      B::stable_sort_by_key(ctx, keys_.data(), entries, pass < passes ? Index{1} << bits : groups * n, perm_.data());
      const Index* perm = perm_.data();
      Index* out = next_.data();
      B::for_each(ctx, entries, [=] MOE_HD(Index j) { out[j] = in[perm[j]]; });
      std::swap(order_, next_);
    }
  }

 private:
  Config config_;
  Index n_, groups_;
  RouterWeight<B> w_gate_;
  Buffer<S> dlogits_;  // backward workspace, reused across calls
  mutable Buffer<Index> order_, next_, keys_, perm_;  // rank_entries' workspace
};

}  // namespace moe::gate
