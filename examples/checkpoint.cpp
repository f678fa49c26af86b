// Checkpoints: train a Mixtral-style layer a few steps, save it (with its Adam-trained weights and
// its configuration) to a safetensors file, build a second layer from the file alone, and check
// that both compute the same output. Then the same weights stored as bf16, at half the size.
// Then a training checkpoint: the layer with Adam's state and the noise generator's position,
// from which a fresh layer and optimizer resume and end, bit for bit, where a run that never
// stopped ends. Training clips the gradients' global norm and follows a warm-up + cosine schedule
// (docs/training.md).
//
//   checkpoint [DIR]     (files go to a new directory in DIR, default the system's temporary one)

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/moe.hpp"

namespace {

using B = moe::backend::Cpu<float>;
using Moe = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, B>;

std::vector<float> output(Moe& layer, const moe::backend::HostMatrix<float>& x) {
  const auto f = layer.forward(x.view(), moe::Mode::inference);
  return {f.y().data, f.y().data + f.y().rows * f.y().cols};
}

// Training steps until the optimizer has taken `until`: the learning rate from the schedule at
// the optimizer's step count (so a resumed run stays on it), the gradients' global norm clipped
// to 0.25. Returns the largest norm before clipping.
double train(Moe& layer, moe::optim::Adam<B>& adam, moe::Rng& noise, const moe::backend::HostMatrix<float>& x,
             long until) {
  const moe::optim::WarmupCosine schedule{.lr = 1e-2, .warmup_steps = 3, .total_steps = 10, .min_lr = 1e-3};
  double largest = 0;
  while (adam.steps() < until) {
    auto f = layer.forward(x.view(), moe::Mode::train, noise);
    moe::backend::HostMatrix<float> dy(64, 32, 1e-2f);
    layer.zero_grad();
    (void)layer.backward(f, dy.view());
    largest = std::max(largest, moe::optim::clip_grad_norm(layer, 0.25));
    adam.set_lr(schedule(adam.steps()));
    adam.step(layer.parameters());
  }
  return largest;
}

bool same_weights(Moe& a, Moe& b) {
  auto pa = a.parameters(), pb = b.parameters();
  bool same = pa.size() == pb.size();
  for (std::size_t i = 0; same && i < pa.size(); ++i)
    same = pa[i].size() == pb[i].size() &&
           std::memcmp(pa[i].value.data, pb[i].value.data, sizeof(float) * static_cast<std::size_t>(pa[i].size())) == 0;
  return same;
}

int run(const std::filesystem::path& dir) {
  const Moe::Config config{.d_model = 32, .n_experts = 8, .expert = {.hidden = 64}, .gate = {.k = 2}, .seed = 1};
  Moe layer(config);
  moe::optim::Adam<B> adam({.lr = 1e-2});
  moe::Rng noise(7);
  moe::backend::HostMatrix<float> x(64, 32);
  for (moe::Index t = 0; t < 64; ++t)
    for (moe::Index j = 0; j < 32; ++j) x.view()(t, j) = static_cast<float>((t * 7 + j * 3) % 11) / 11.0f - 0.5f;
  const double largest_norm = train(layer, adam, noise, x, 5);

  const auto file = dir / "moe-checkpoint-example.safetensors";
  moe::io::save(layer, file, {.metadata = {{"note", "5 Adam steps"}}});
  Moe restored = moe::io::load_layer<Moe>(file);  // configuration and weights from the file
  const bool same = output(layer, x) == output(restored, x);
  std::printf("saved %s (%ju bytes, %zu tensors); restored layer: %s output\n", file.c_str(),
              static_cast<std::uintmax_t>(std::filesystem::file_size(file)),
              moe::io::SafeTensors::open(file).tensors().size(), same ? "the same" : "ANOTHER");

  const auto half = dir / "moe-checkpoint-example-bf16.safetensors";
  moe::io::save(layer, half, {.dtype = moe::io::Dtype::BF16});
  Moe rounded = moe::io::load_layer<Moe>(half);
  const auto y = output(layer, x), yr = output(rounded, x);
  double err = 0, norm = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    err += (y[i] - yr[i]) * double(y[i] - yr[i]);
    norm += y[i] * double(y[i]);
  }
  const double rel = std::sqrt(err / norm);
  std::printf("bf16 copy: %ju bytes, output within %.2e of the fp32 layer's (relative)\n",
              static_cast<std::uintmax_t>(std::filesystem::file_size(half)), rel);

  // A training checkpoint: the weights, Adam's moments, step count and learning rate, and the
  // noise generator's position, in one file.
  const auto run_file = dir / "moe-checkpoint-example-run.safetensors";
  moe::io::save(layer, adam, run_file, {.noise = &noise});
  // A fresh process would start here: the layer from the file, then the optimizer and the noise.
  Moe resumed = moe::io::load_layer<Moe>(run_file);
  moe::optim::Adam<B> resumed_adam({.lr = 1e-2});
  moe::Rng resumed_noise(0);
  moe::io::load(resumed, resumed_adam, run_file, {.noise = &resumed_noise});
  train(resumed, resumed_adam, resumed_noise, x, 10);
  // The same 10 steps without a stop.
  Moe straight(config);
  moe::optim::Adam<B> straight_adam({.lr = 1e-2});
  moe::Rng straight_noise(7);
  train(straight, straight_adam, straight_noise, x, 10);
  const bool resumed_same = same_weights(resumed, straight);
  std::printf("training checkpoint after %ld steps (gradient norms up to %.3g, clipped to 0.25); resumed for 5 more: "
              "%s weights as 10 steps without a stop\n",
              adam.steps(), largest_norm, resumed_same ? "the same" : "OTHER");
  return same && rel < 2e-2 && resumed_same && largest_norm > 0.25 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A directory of this run's own (mkdtemp), removed at the end whatever happens.
  std::string dir = ((argc > 1 ? std::filesystem::path(argv[1]) : std::filesystem::temp_directory_path()) /
                     "moe-checkpoint-XXXXXX")
                        .string();
  if (mkdtemp(dir.data()) == nullptr) {
    std::fprintf(stderr, "checkpoint: cannot create a directory like %s\n", dir.c_str());
    return 1;
  }
  int status = 1;
  try {
    status = run(dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint: %s\n", e.what());
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return status;
}
