#pragma once
// Learning-rate schedules: small value types whose call operator gives the learning rate of a
// step, counted from 0 (the optimizer's steps() before the step). Each step of a training loop
// sets it first:
//
//   const moe::optim::WarmupCosine schedule{.lr = 3e-3, .warmup_steps = 100, .total_steps = 5000, .min_lr = 3e-4};
//   adam.set_lr(schedule(adam.steps()));
//   adam.step(layer.parameters());
//
// Reading the step from the optimizer keeps a resumed run on its schedule: a checkpoint restores
// the optimizer's step count (moe::io::save(layer, adam, path)). A schedule checks its fields at
// every call and throws moe::Error naming a bad one; so does a negative step.

#include <cmath>
#include <concepts>

#include "moe/error.hpp"

namespace moe {

namespace detail {

// (In moe::detail, not moe::optim::detail: the optimizers' headers name moe::detail's require
// as detail::require from inside moe::optim.)
inline void check_schedule_step(const char* who, long step) {
  require(step >= 0, who, ": step = ", step, ", expected >= 0");
}
inline void check_schedule_lr(const char* who, double lr) {
  require(std::isfinite(lr) && lr > 0, who, ": lr = ", lr, ", expected a finite value > 0");
}
inline void check_schedule_floor(const char* who, double min_lr, double lr) {
  require(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= lr, who, ": min_lr = ", min_lr,
          ", expected 0 <= min_lr <= lr = ", lr);
}

// From lr at step 0 of `steps` down to min_lr at step `steps` along half a cosine, then min_lr.
inline double cosine_schedule(double lr, double min_lr, long step, long steps) {
  if (step >= steps) return min_lr;
  const double progress = static_cast<double>(step) / static_cast<double>(steps);
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
}

}  // namespace detail

namespace optim {

// Anything that gives a learning rate for a step: the types below, or a lambda.
template <class F>
concept Schedule = requires(const F& f, long step) {
  { f(step) } -> std::convertible_to<double>;
};

// lr at every step.
struct Constant {
  double lr = 1e-3;

  [[nodiscard]] double operator()(long step) const {
    moe::detail::check_schedule_lr("optim::Constant", lr);
    moe::detail::check_schedule_step("optim::Constant", step);
    return lr;
  }
};

// A linear rise over the first warmup_steps steps, then lr: step s < warmup_steps has
// lr * (s + 1) / warmup_steps, so the first step moves the weights a little and step
// warmup_steps - 1 has lr. warmup_steps = 0: lr from the start.
struct LinearWarmup {
  double lr = 1e-3;
  long warmup_steps = 0;

  [[nodiscard]] double operator()(long step) const {
    moe::detail::check_schedule_lr("optim::LinearWarmup", lr);
    moe::detail::require(warmup_steps >= 0, "optim::LinearWarmup: warmup_steps = ", warmup_steps, ", expected >= 0");
    moe::detail::check_schedule_step("optim::LinearWarmup", step);
    if (step >= warmup_steps) return lr;
    return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
};

// Cosine decay (Loshchilov and Hutter's SGDR, without restarts): lr at step 0 down to min_lr
// at step decay_steps, min_lr + (lr - min_lr) (1 + cos(pi s / decay_steps)) / 2, then min_lr.
struct CosineDecay {
  double lr = 1e-3;
  long decay_steps = 1;
  double min_lr = 0;

  [[nodiscard]] double operator()(long step) const {
    moe::detail::check_schedule_lr("optim::CosineDecay", lr);
    moe::detail::require(decay_steps >= 1, "optim::CosineDecay: decay_steps = ", decay_steps, ", expected >= 1");
    moe::detail::check_schedule_floor("optim::CosineDecay", min_lr, lr);
    moe::detail::check_schedule_step("optim::CosineDecay", step);
    return moe::detail::cosine_schedule(lr, min_lr, step, decay_steps);
  }
};

// The usual transformer schedule: LinearWarmup over warmup_steps, then CosineDecay from lr (at
// step warmup_steps) to min_lr (at step total_steps), then min_lr.
struct WarmupCosine {
  double lr = 1e-3;
  long warmup_steps = 0;
  long total_steps = 1;
  double min_lr = 0;

  [[nodiscard]] double operator()(long step) const {
    moe::detail::check_schedule_lr("optim::WarmupCosine", lr);
    moe::detail::require(warmup_steps >= 0 && total_steps > warmup_steps, "optim::WarmupCosine: warmup_steps = ",
                         warmup_steps, ", total_steps = ", total_steps, ", expected 0 <= warmup_steps < total_steps");
    moe::detail::check_schedule_floor("optim::WarmupCosine", min_lr, lr);
    moe::detail::check_schedule_step("optim::WarmupCosine", step);
    if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    return moe::detail::cosine_schedule(lr, min_lr, step - warmup_steps, total_steps - warmup_steps);
  }
};

}  // namespace optim
}  // namespace moe
