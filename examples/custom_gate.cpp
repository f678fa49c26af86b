// A user-defined gate: the top k of a softmax over all n experts, not renormalized over the kept k
// (as in the Switch Transformer, Fedus et al. 2021). Renormalized, it would be the softmax over the
// kept logits, i.e. NoisyTopK without noise; unnormalized, the task loss reaches the router even at
// k = 1, where NoisyTopK's only gate value is 1 (MATH.md 3). Its load is the router's probability mass
// sum_x p_i(x): smooth without noise, so the load loss has a gradient too.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "example_support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/moe.hpp"
#include "moe/testing/gradcheck.hpp"

namespace {

using moe::Index;

struct TopKSoftmax {
  struct Config {
    Index k = 1;
    double init_scale = 1.0;  // router uniform in (-s/sqrt(d), s/sqrt(d)]; at 0 every logit ties
    double w_importance = 1e-2, w_load = 1e-2;
  };
  template <moe::Backend B>
  class Policy;
};

template <moe::Backend B>
class TopKSoftmax::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> prob;     // [T x n] softmax over all experts
    Buffer<Index> top;  // [T x k] the kept experts
  };

  // `groups` stacked copies of the gate (a hierarchical MoE runs a level's groups together).
  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), n_(n_experts), groups_(groups) {
    if (config.k < 1 || config.k > n_experts)
      throw moe::Error("TopKSoftmax: k = " + std::to_string(config.k) +
                       ", expected 1 <= k <= n_experts = " + std::to_string(n_experts));
    // The library's stacked router weight: [d, n] (or [groups, d, n]), one (grouped) GEMM for the logits.
    router_ = moe::gate::RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                                         config.init_scale / std::sqrt(static_cast<double>(d_model)));
  }

  [[nodiscard]] Index k() const { return config_.k; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(moe::Mode) const { return false; }
  [[nodiscard]] moe::BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }

  // offsets: the row range of each group (null for one group).
  void forward(typename B::Context& ctx, moe::ConstMatrixView<S> x, const Index* offsets, moe::Mode mode,
               const moe::GateNoise<S>&, moe::GateRouting<B>& routing, Saved& saved) const {
    const Index t_count = x.rows, n = n_, k = config_.k;
    saved.prob.resize(t_count, n);
    saved.top.resize(t_count, k);
    routing.expert.resize(t_count, k);
    routing.gate.resize(t_count, k);
    router_.logits(ctx, x, offsets, saved.prob.view());
    S* prob = saved.prob.data();
    Index* top = saved.top.data();
    Index* expert = routing.expert.data();
    S* gate = routing.gate.data();
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      S* p = prob + t * n;
      moe::gate::softmax_row(p, n, p);  // in place: the logits become probabilities
      Index* kept = top + t * k;
      moe::top_k_stable(p, n, k, kept);  // the k largest in order, ties to the lower index
      for (Index j = 0; j < k; ++j) {
        expert[t * k + j] = kept[j];
        gate[t * k + j] = p[kept[j]];
      }
    });
    // As the built-in gates do, inference reports the hard counts. The load is per group: [groups x n].
    routing.load_is_count = mode == moe::Mode::inference;
    routing.load.resize(routing.load_is_count ? 0 : groups_, n);
    if (!routing.load_is_count)
      moe::gate::sum_rows_by_group<B>(ctx, saved.prob.view(), offsets, groups_, routing.load.data());
  }

  // dload: [groups x n] or null. This gate has no loss of its own, so aux_scale is unused.
  void backward(typename B::Context& ctx, moe::ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                moe::ConstMatrixView<S> dgate, const S* dload, S /*aux_scale*/, moe::MatrixView<S> dx) {
    const Index t_count = x.rows, n = n_, k = config_.k, groups = groups_;
    dlogits_.resize(t_count, n);
    const S* prob = saved.prob.data();
    const Index* top = saved.top.data();
    S* dlogits = dlogits_.data();
    B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
      const S* p = prob + t * n;
      S* dl = dlogits + t * n;
      // dp_i gathers the kept slots' dgate and, through load_i = sum_x p_i(x), dload_i.
      const S* dlg = dload != nullptr ? dload + moe::gate::group_of_row(offsets, groups, t) * n : nullptr;
      for (Index i = 0; i < n; ++i) dl[i] = dlg != nullptr ? dlg[i] : S(0);
      for (Index j = 0; j < k; ++j) dl[top[t * k + j]] += dgate(t, j);
      moe::gate::softmax_row_backward(p, n, dl);  // dlogit_i = p_i (dp_i - sum_l p_l dp_l)
    });
    router_.backward(ctx, x, offsets, dlogits_.view(), dx);  // gradient of W and of x
  }

  [[nodiscard]] std::vector<moe::Parameter<S>> parameters() { return {router_.parameter()}; }

 private:
  Config config_;
  Index n_, groups_;
  moe::gate::RouterWeight<B> router_;
  Buffer<S> dlogits_;  // backward workspace
};

using Cpu = moe::backend::Cpu<double>;
using example::eigen, example::expect, example::Matrix, example::random_matrix;
static_assert(moe::GatePolicy<TopKSoftmax::Policy<Cpu>, Cpu>);
static_assert(moe::GateFamily<TopKSoftmax, Cpu>);

void print_routing(const char* when, const auto& forward) {
  std::printf("%-26s tokens per expert", when);
  for (const Index c : forward.stats().tokens_per_expert) std::printf(" %4lld", static_cast<long long>(c));
  std::printf(", mean gate %.3f, CV^2 importance %.4f, load %.4f\n", eigen(forward.gates()).mean(),
              forward.stats().cv2_importance, forward.stats().cv2_load);
}

}  // namespace

int main() {
  try {
    constexpr Index kD = 8, kExperts = 4, kTokens = 16;
    using Model = moe::Layer<moe::expert::FeedForward, TopKSoftmax, Cpu>;
    Model layer({.d_model = kD, .n_experts = kExperts, .expert = {.hidden = 8}, .gate = {.k = 2}, .seed = 3});
    // The installed gradient checker: backward against central differences for the input and
    // every parameter (the router and the experts), the routing held fixed.
    Matrix x = random_matrix(kTokens, kD, 1);
    const Matrix dy = random_matrix(kTokens, kD, 2);
    const moe::testing::GradCheckReport report = moe::testing::check_gradients(layer, x.view(), dy.view());
    std::printf("%s", report.to_string().c_str());
    if (!expect(report.passed(), "relative errors below 1e-6")) return 1;

    // The balancing losses alone (dy = 0, weights raised) even out a skewed router through dload.
    Model skewed({.d_model = kD,
                  .n_experts = kExperts,
                  .expert = {.hidden = 8},
                  .gate = {.k = 1, .init_scale = 4.0, .w_importance = 1.0, .w_load = 1.0},
                  .seed = 13});
    const Matrix batch = random_matrix(2048, kD, 3), zero(2048, kD, 0.0);
    moe::optim::Adam<Cpu> adam({.lr = 0.05});
    const auto before = skewed.forward(batch.view(), moe::Mode::inference);
    print_routing("at initialization:", before);
    for (int step = 0; step < 50; ++step) {
      skewed.backward(skewed.forward(batch.view()), zero.view());
      adam.step(skewed.parameters());
      skewed.zero_grad();
    }
    const auto after = skewed.forward(batch.view(), moe::Mode::inference);
    print_routing("after 50 balancing steps:", after);
    return expect(after.stats().cv2_load < 0.25 * before.stats().cv2_load, "CV^2(load) falls below a quarter") ? 0 : 1;
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe::Error: %s\n", e.what());
    return 1;
  }
}
