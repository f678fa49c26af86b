#pragma once
// moe::optim::Sgd: stochastic gradient descent with optional momentum, on named parameters.

#include <map>
#include <string>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/parameter.hpp"

namespace moe::optim {

template <Backend B>
class Sgd {
  using S = typename B::Scalar;

 public:
  struct Config {
    double lr = 1e-2;
    double momentum = 0.0;  // 0: plain SGD
    int threads = 0;        // CPU threads, 0: all that OpenMP offers
  };

  explicit Sgd(const Config& config) : config_(config) {
    detail::require(config.lr > 0, "optim::Sgd: lr = ", config.lr, ", expected > 0");
    detail::require(config.momentum >= 0 && config.momentum < 1, "optim::Sgd: momentum = ", config.momentum,
                    ", expected 0 <= momentum < 1");
  }

  // p <- p - lr * v, v <- momentum * v + grad (v = grad without momentum).
  void step(const std::vector<Parameter<S>>& params) {
    typename B::Context ctx = make_context<B>(config_.threads);
    const S lr = static_cast<S>(config_.lr), mu = static_cast<S>(config_.momentum);
    for (const auto& p : params) {
      detail::require(p.value.contiguous() && p.grad.contiguous(), "optim::Sgd: parameter ", p.name,
                      " is not contiguous");
      auto& v = velocity_[p.value.data];
      if (v.size() != p.size()) v.resize(p.value.rows, p.value.cols, S(0));
      S* value = p.value.data;
      const S* grad = p.grad.data;
      S* vel = v.data();
      B::for_each(ctx, p.size(), [=] MOE_HD(Index i) {
        vel[i] = mu * vel[i] + grad[i];
        value[i] -= lr * vel[i];
      });
      p.changed();
    }
  }

 private:
  Config config_;
  // Keyed by the parameter's storage: two layers' parameters share names, never storage.
  std::map<const S*, typename B::template Buffer<S>> velocity_;
};

}  // namespace moe::optim
