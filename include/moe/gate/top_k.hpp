#pragma once
// moe::gate::TopK: the router of Mixtral-style models. G = softmax over the k largest logits of
// x W_g (equivalently: the full softmax, top k kept, renormalized over the kept k), no noise.
// It is NoisyTopK with noise off, with a randomly initialized router instead of a zero one
// (without noise, a zero router would tie every logit and send every token to experts 0..k-1).
// Its load is the hard count (MATH.md 3: no noise, no smooth estimator).

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moe/error.hpp"
#include "moe/gate/noisy_top_k.hpp"

namespace moe::gate {

struct TopK {
  struct Config {
    Index k = 2;
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
  using Inner = NoisyTopK::Policy<B>;

 public:
  using Saved = typename Inner::Saved;

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), inner_(make_inner(config, d_model, n_experts, seed, groups)) {
    detail::require(config.init_scale >= 0 && std::isfinite(config.init_scale),
                    "gate::TopK: init_scale = ", config.init_scale, ", expected a finite value >= 0");
    inner_.router() = RouterWeight<B>("gate.w_gate", d_model, n_experts, groups, seed,
                                      d_model > 0 ? config.init_scale / std::sqrt(static_cast<double>(d_model)) : 0.0);
  }

  [[nodiscard]] Index k() const { return inner_.k(); }
  [[nodiscard]] Index n_experts() const { return inner_.n_experts(); }
  [[nodiscard]] bool needs_noise(Mode) const { return false; }
  [[nodiscard]] BalanceWeights balance_weights() const { return inner_.balance_weights(); }
  [[nodiscard]] const Config& config() const { return config_; }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode mode,
               const GateNoise<S>& noise, GateRouting<B>& routing, Saved& saved) const {
    inner_.forward(ctx, x, offsets, mode, noise, routing, saved);
  }
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dgate, const S* dload, S aux_scale, MatrixView<S> dx) {
    inner_.backward(ctx, x, offsets, saved, dgate, dload, aux_scale, dx);
  }
  [[nodiscard]] std::vector<Parameter<S>> parameters() { return {inner_.router().parameter()}; }

 private:
  // NoisyTopK without noise; its configuration errors are reported as TopK's.
  static Inner make_inner(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups) {
    try {
      return Inner(NoisyTopK::Config{.k = config.k,
                                     .eps_noise = 0.0,
                                     .noisy = false,
                                     .w_importance = config.w_importance,
                                     .w_load = config.w_load,
                                     .w_z = config.w_z},
                   d_model, n_experts, seed, groups);
    } catch (const Error& e) {
      std::string message = e.what();
      const std::string from = "gate::NoisyTopK";
      if (message.rfind(from, 0) == 0) message = "gate::TopK" + message.substr(from.size());
      throw Error(message);
    }
  }

  Config config_;
  Inner inner_;
};

}  // namespace moe::gate
