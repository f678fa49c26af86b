#pragma once
// moe::gate::Softmax: dense softmax gating, G(x) = softmax(x W_g) (MATH.md 2). Every expert
// sees every token (k = n); a baseline to compare the sparse gates against.

#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate_policy.hpp"

namespace moe::gate {

struct Softmax {
  struct Config {
    double w_importance = 1e-2;
    double w_load = 1e-2;     // the load is the count (T for every expert), so this term is 0
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
    Buffer<S> gate;  // [T x n]
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed)
      : config_(config), d_(d_model), n_(n_experts) {
    detail::require(n_experts >= 1, "gate::Softmax: n_experts = ", n_experts, ", expected at least 1");
    detail::require(config.w_importance >= 0 && config.w_load >= 0 && std::isfinite(config.w_importance) &&
                        std::isfinite(config.w_load),
                    "gate::Softmax: w_importance = ", config.w_importance, ", w_load = ", config.w_load,
                    ", expected both finite and >= 0");
    w_gate_.resize(d_model, n_experts, S(0));
    g_gate_.resize(d_model, n_experts, S(0));
    if (config.init_scale != 0.0 && d_model > 0) {
      typename B::Context ctx;
      detail::init_uniform<B>(ctx, w_gate_.view(), seed, "gate.w_gate",
                              config.init_scale / std::sqrt(static_cast<double>(d_model)));
    }
  }

  [[nodiscard]] Index k() const { return n_; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, Mode, const GateNoise<S>&, GateRouting<B>& routing,
               Saved& saved) const {
    const Index t_count = x.rows, n = n_;
    saved.gate.resize(t_count, n);
    routing.expert.resize(t_count, n);
    routing.gate.resize(t_count, n);
    B::gemm(ctx, Op::none, Op::none, S(1), x, w_gate_.view(), S(0), saved.gate.view());
    S* g = saved.gate.data();
    S* out_gate = routing.gate.data();
    Index* out_expert = routing.expert.data();
    B::for_each(ctx, t_count, [=](Index t) {
      S* row = g + t * n;
      S top = row[0];
      for (Index i = 1; i < n; ++i) top = row[i] > top ? row[i] : top;
      S sum = 0;
      for (Index i = 0; i < n; ++i) {
        row[i] = std::exp(row[i] - top);
        sum += row[i];
      }
      for (Index i = 0; i < n; ++i) {
        row[i] /= sum;
        out_gate[t * n + i] = row[i];
        out_expert[t * n + i] = i;
      }
    });
    routing.load_is_count = true;
    routing.load.clear();
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Saved& saved, ConstMatrixView<S> dgate, const S*,
                MatrixView<S> dx) {
    const Index t_count = x.rows, n = n_;
    dlogits_.resize(t_count, n);
    const S* g = saved.gate.data();
    const S* dg = dgate.data;
    const Index dg_stride = dgate.stride;
    S* dl = dlogits_.data();
    B::for_each(ctx, t_count, [=](Index t) {
      S dot = 0;
      for (Index i = 0; i < n; ++i) dot += g[t * n + i] * dg[t * dg_stride + i];
      for (Index i = 0; i < n; ++i) dl[t * n + i] = g[t * n + i] * (dg[t * dg_stride + i] - dot);
    });
    B::gemm(ctx, Op::transpose, Op::none, S(1), x, dlogits_.view(), S(1), g_gate_.view());
    B::gemm(ctx, Op::none, Op::transpose, S(1), dlogits_.view(), w_gate_.view(), S(1), dx);
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    return {{"gate.w_gate", {d_, n_}, w_gate_.view(), g_gate_.view()}};
  }

 private:
  Config config_;
  Index d_, n_;
  Buffer<S> w_gate_, g_gate_;
  Buffer<S> dlogits_;
};

}  // namespace moe::gate
