#pragma once
// moe::optim::Adam (Kingma and Ba, 2015) with bias correction, on named parameters; with
// weight_decay, AdamW's decoupled decay. The learning rate can change from step to step
// (set_lr, e.g. from a schedule of moe/optim/schedule.hpp), and the whole state goes into a
// checkpoint (moe::io::save(layer, adam, path); see moe/optim/state.hpp).

#include <cmath>
#include <map>
#include <utility>
#include <string>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/optim/state.hpp"
#include "moe/parameter.hpp"

namespace moe::optim {

template <Backend B>
class Adam {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Config {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 0.0;  // decoupled (AdamW), 0: none
    int threads = 0;            // CPU threads, 0: all that OpenMP offers
  };

  // Its name in a checkpoint.
  static constexpr const char* kind = "adam";

  explicit Adam(const Config& config) : config_(config), lr_(config.lr) {
    detail::require(config.lr > 0, "optim::Adam: lr = ", config.lr, ", expected > 0");
    detail::require(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1,
                    "optim::Adam: beta1 = ", config.beta1, ", beta2 = ", config.beta2, ", expected both in [0, 1)");
    detail::require(config.eps > 0, "optim::Adam: eps = ", config.eps, ", expected > 0");
    detail::require(config.weight_decay >= 0, "optim::Adam: weight_decay = ", config.weight_decay, ", expected >= 0");
  }

  void step(const std::vector<Parameter<S>>& params) {
    ++t_;
    typename B::Context ctx = make_context<B>(config_.threads);
    const S lr = static_cast<S>(lr_), b1 = static_cast<S>(config_.beta1), b2 = static_cast<S>(config_.beta2);
    const S eps = static_cast<S>(config_.eps), wd = static_cast<S>(config_.weight_decay);
    const S c1 = S(1) - static_cast<S>(std::pow(config_.beta1, static_cast<double>(t_)));
    const S c2 = S(1) - static_cast<S>(std::pow(config_.beta2, static_cast<double>(t_)));
    for (const auto& p : params) {
      detail::require(p.value.contiguous() && p.grad.contiguous(), "optim::Adam: parameter ", p.name,
                      " is not contiguous");
      auto& st = state_[p.value.data];
      if (st.m.size() != p.size()) {
        st.m.resize(p.value.rows, p.value.cols, S(0));
        st.v.resize(p.value.rows, p.value.cols, S(0));
      }
      S* value = p.value.data;
      const S* grad = p.grad.data;
      S* m = st.m.data();
      S* v = st.v.data();
      B::for_each(ctx, p.size(), [=] MOE_HD(Index i) {
        m[i] = b1 * m[i] + (S(1) - b1) * grad[i];
        v[i] = b2 * v[i] + (S(1) - b2) * grad[i] * grad[i];
        value[i] -= lr * ((m[i] / c1) / (std::sqrt(v[i] / c2) + eps) + wd * value[i]);
      });
      p.changed();
    }
  }

  [[nodiscard]] long steps() const { return t_; }
  [[nodiscard]] const Config& config() const { return config_; }

  // The learning rate of the next steps: Config::lr until set_lr changes it. A schedule sets it
  // before each step: adam.set_lr(schedule(adam.steps())). 0 is allowed (a schedule may end there).
  [[nodiscard]] double lr() const { return lr_; }
  void set_lr(double lr) {
    detail::require(std::isfinite(lr) && lr >= 0, "optim::Adam: set_lr(", lr, "), expected a finite lr >= 0");
    lr_ = lr;
  }

  // For checkpoints: a parameter's first and second moments, in backend memory, as writable
  // views of its shape (zeros before its first step; created then), and the step count that the
  // bias correction uses. Restoring both, with the parameters, continues training exactly.
  [[nodiscard]] std::pair<MatrixView<S>, MatrixView<S>> moments(const Parameter<S>& p) {
    auto& st = state_[p.value.data];
    if (st.m.size() != p.size()) {
      st.m.resize(p.value.rows, p.value.cols, S(0));
      st.v.resize(p.value.rows, p.value.cols, S(0));
    }
    return {st.m.view(), st.v.view()};
  }
  void set_steps(long steps) {
    detail::require(steps >= 0, "optim::Adam: steps = ", steps, ", expected >= 0");
    t_ = steps;
  }

  // For moe::io's checkpoints (moe/optim/state.hpp): the moments m and v of each parameter, the
  // settings a resumed run must share.
  [[nodiscard]] std::vector<StateTensor> state_tensors() const { return {{"m", false}, {"v", true}}; }
  [[nodiscard]] std::vector<MatrixView<S>> state(const Parameter<S>& p) {
    const auto [m, v] = moments(p);
    return {m, v};
  }
  [[nodiscard]] std::vector<Setting> settings() const {
    return {{"beta1", config_.beta1}, {"beta2", config_.beta2}, {"eps", config_.eps},
            {"weight_decay", config_.weight_decay}};
  }

 private:
  struct Moments {
    Buffer<S> m, v;
  };
  Config config_;
  double lr_;
  long t_ = 0;
  // Keyed by the parameter's storage: two layers' parameters share names, never storage.
  std::map<const S*, Moments> state_;
};

}  // namespace moe::optim
