#pragma once
// What an optimizer tells a checkpoint about itself (moe::io::save(layer, optimizer, path)):
// the tensors it keeps per parameter, its settings, its step count and its learning rate.
//
// An optimizer O over a backend with scalar S that checkpoints can store provides
//   O::kind                             its name in the file ("adam", "sgd")
//   state_tensors()                     the tensors it keeps per parameter (StateTensor), in order
//   state(p)                            those tensors of parameter p, writable views in backend
//                                       memory of p's shape (zeros before p's first step; created then)
//   settings()                          the settings a resumed run must share (not the learning rate)
//   steps(), set_steps(n)               the steps taken (Adam's bias correction counts them)
//   lr(), set_lr(lr)                    the learning rate of the next step

#include <concepts>
#include <string>
#include <string_view>
#include <vector>

#include "moe/parameter.hpp"

namespace moe::optim {

// One tensor an optimizer keeps per parameter. A checkpoint stores it as
// "optimizer.<name>.<tensor>" for each of the layer's tensors ("optimizer.m.experts.3.w1").
struct StateTensor {
  std::string name;          // letters, digits and '_': "m", "v", "momentum"
  bool nonnegative = false;  // every value is >= 0 (Adam's second moment); a load checks it
};

// A setting written to a checkpoint's metadata as "optimizer.<name>" and compared on load.
struct Setting {
  std::string name;
  double value = 0;
};

template <class O, class S>
concept CheckpointableOptimizer = requires(O& o, const O& co, const Parameter<S>& p, long n, double lr) {
  { std::string_view(O::kind) };
  { co.state_tensors() } -> std::same_as<std::vector<StateTensor>>;
  { o.state(p) } -> std::same_as<std::vector<MatrixView<S>>>;
  { co.settings() } -> std::same_as<std::vector<Setting>>;
  { co.steps() } -> std::convertible_to<long>;
  o.set_steps(n);
  { co.lr() } -> std::convertible_to<double>;
  o.set_lr(lr);
};

}  // namespace moe::optim
