// Checkpoints: train a Mixtral-style layer a few steps, save it (with its Adam-trained weights and
// its configuration) to a safetensors file, build a second layer from the file alone, and check
// that both compute the same output. Then the same weights stored as bf16, at half the size.
//
//   checkpoint [DIR]     (files go to a new directory in DIR, default the system's temporary one)

#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
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

int run(const std::filesystem::path& dir) {
  Moe layer({.d_model = 32, .n_experts = 8, .expert = {.hidden = 64}, .gate = {.k = 2}, .seed = 1});
  moe::optim::Adam<B> adam({.lr = 1e-2});
  moe::Rng noise(7);
  moe::backend::HostMatrix<float> x(64, 32);
  for (moe::Index t = 0; t < 64; ++t)
    for (moe::Index j = 0; j < 32; ++j) x.view()(t, j) = static_cast<float>((t * 7 + j * 3) % 11) / 11.0f - 0.5f;
  for (int step = 0; step < 5; ++step) {
    auto f = layer.forward(x.view(), moe::Mode::train, noise);
    moe::backend::HostMatrix<float> dy(64, 32, 1e-2f);
    layer.zero_grad();
    (void)layer.backward(f, dy.view());
    adam.step(layer.parameters());
  }

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
  return same && rel < 2e-2 ? 0 : 1;
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
