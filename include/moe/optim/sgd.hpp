#pragma once
// moe::optim::Sgd: stochastic gradient descent with optional momentum, on named parameters. The
// learning rate can change from step to step (set_lr, e.g. from a schedule of
// moe/optim/schedule.hpp), and the momentum goes into a checkpoint (moe::io::save(layer, sgd,
// path); see moe/optim/state.hpp).

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/optim/state.hpp"
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

  // Its name in a checkpoint.
  static constexpr const char* kind = "sgd";

  explicit Sgd(const Config& config) : config_(config), lr_(config.lr) {
    detail::require(config.lr > 0, "optim::Sgd: lr = ", config.lr, ", expected > 0");
    detail::require(config.momentum >= 0 && config.momentum < 1, "optim::Sgd: momentum = ", config.momentum,
                    ", expected 0 <= momentum < 1");
  }

  // p <- p - lr * v, v <- momentum * v + grad (v = grad without momentum).
  void step(const std::vector<Parameter<S>>& params) {
    ++t_;
    typename B::Context ctx = make_context<B>(config_.threads);
    const S lr = static_cast<S>(lr_), mu = static_cast<S>(config_.momentum);
    for (const auto& p : params) {
      detail::require(p.value.contiguous() && p.grad.contiguous(), "optim::Sgd: parameter ", p.name,
                      " is not contiguous");
      S* value = p.value.data;
      const S* grad = p.grad.data;
      S* vel = velocity(p).data;
      B::for_each(ctx, p.size(), [=] MOE_HD(Index i) {
        vel[i] = mu * vel[i] + grad[i];
        value[i] -= lr * vel[i];
      });
      p.changed();
    }
  }

  [[nodiscard]] const Config& config() const { return config_; }
  // The steps taken (for a schedule: sgd.set_lr(schedule(sgd.steps())) before each step).
  [[nodiscard]] long steps() const { return t_; }
  void set_steps(long steps) {
    detail::require(steps >= 0, "optim::Sgd: steps = ", steps, ", expected >= 0");
    t_ = steps;
  }
  // The learning rate of the next steps: Config::lr until set_lr changes it (0 is allowed).
  [[nodiscard]] double lr() const { return lr_; }
  void set_lr(double lr) {
    detail::require(std::isfinite(lr) && lr >= 0, "optim::Sgd: set_lr(", lr, "), expected a finite lr >= 0");
    lr_ = lr;
  }

  // For moe::io's checkpoints (moe/optim/state.hpp): with momentum, each parameter's velocity
  // ("momentum"); plain SGD keeps nothing from step to step.
  [[nodiscard]] std::vector<StateTensor> state_tensors() const {
    if (config_.momentum == 0) return {};
    return {{"momentum", false}};
  }
  [[nodiscard]] std::vector<MatrixView<S>> state(const Parameter<S>& p) {
    if (config_.momentum == 0) return {};
    return {velocity(p)};
  }
  [[nodiscard]] std::vector<Setting> settings() const { return {{"momentum", config_.momentum}}; }

 private:
  // p's velocity, zeros before its first step.
  MatrixView<S> velocity(const Parameter<S>& p) {
    auto& v = velocity_[p.value.data];
    if (v.size() != p.size()) v.resize(p.value.rows, p.value.cols, S(0));
    return v.view();
  }

  Config config_;
  double lr_;
  long t_ = 0;
  // Keyed by the parameter's storage: two layers' parameters share names, never storage.
  std::map<const S*, typename B::template Buffer<S>> velocity_;
};

}  // namespace moe::optim
