// The layer over comm::Nccl on the CUDA backend: with one rank it is the layer of comm::Local
// (the same output, losses and gradients, bit for bit); with two devices or more, the layer
// sharded over two ranks (one thread and one device each) equals comm::Local on the
// concatenated batch. The sharded code itself is the code tests/layer_mpi.cpp runs over MPI.
// Exits 77 (Meson: SKIP), naming itself, when no CUDA device answers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "moe/backend/cuda.hpp"
#include "moe/comm/nccl.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
using Gpu = moe::backend::Cuda<float>;
using Sharded = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Gpu, 1, moe::comm::Nccl>;
using Reference = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Gpu, 1>;

int failures = 0;
void expect(bool ok, const std::string& what) {
  if (ok) return;
  ++failures;
  std::printf("FAIL: %s\n", what.c_str());
}

Reference::Config config() {
  Reference::Config c;
  c.d_model = 16;
  c.n_experts = 8;
  c.expert.hidden = 24;
  c.gate.k = 2;
  c.gate.w_z = 1e-2;
  c.seed = 5;
  return c;
}

std::vector<float> host_values(Index rows, Index cols, std::uint64_t seed) {
  const moe::CounterRandom r{seed};
  std::vector<float> v(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(r.symmetric_uniform(i, 0, 1));
  return v;
}

struct Step {
  std::vector<float> y, dx;
  std::vector<std::vector<float>> grads;  // every parameter, the experts' rows of this rank only
  float loss = 0;
};

// One training step on rows [first, first + count) of the batch of `total` tokens.
template <class L>
Step step(L& layer, Index first, Index count, Index total) {
  Gpu::Context ctx;
  const Index d = layer.config().d_model;
  const std::vector<float> x = host_values(total, d, 1), dy = host_values(total, d, 2);
  Gpu::Buffer<float> xd(count, d), dyd(count, d);
  Gpu::copy(ctx, moe::ConstMatrixView<float>{x.data() + first * d, count, d}, xd.view());
  Gpu::copy(ctx, moe::ConstMatrixView<float>{dy.data() + first * d, count, d}, dyd.view());
  moe::Rng rng(3);
  const auto f = layer.forward(xd.view(), moe::Mode::train, rng);
  layer.zero_grad();
  const auto b = layer.backward(f, dyd.view());
  Step s;
  s.y = moe::to_host<Gpu>(ctx, f.y());
  s.dx = moe::to_host<Gpu>(ctx, moe::ConstMatrixView<float>(b.dx.view()));
  s.loss = f.loss();
  for (auto& p : layer.parameters()) s.grads.push_back(moe::to_host<Gpu>(ctx, moe::ConstMatrixView<float>(p.grad)));
  return s;
}

double max_diff(const std::vector<float>& a, const float* b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

void one_rank() {
  Sharded over_nccl(config(), moe::comm::Nccl(moe::comm::nccl_unique_id(), 0, 1));
  Reference local(config());
  const Step a = step(over_nccl, 0, 40, 40), b = step(local, 0, 40, 40);
  expect(a.y == b.y, "one rank: the output equals comm::Local's");
  expect(a.dx == b.dx, "one rank: dx equals comm::Local's");
  expect(a.loss == b.loss, "one rank: the loss equals comm::Local's");
  expect(a.grads == b.grads, "one rank: every gradient equals comm::Local's");
}

void two_ranks() {
  const ncclUniqueId id = moe::comm::nccl_unique_id();
  const Index sizes[2] = {23, 17}, total = 40;
  Step got[2];
  std::string errors[2];
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        if (cudaSetDevice(r) != cudaSuccess) throw moe::Error("cudaSetDevice failed");
        Sharded layer(config(), moe::comm::Nccl(id, r, 2));
        got[r] = step(layer, r == 0 ? 0 : sizes[0], sizes[r], total);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) expect(errors[r].empty(), "two ranks: rank " + std::to_string(r) + ": " + errors[r]);
  if (!errors[0].empty() || !errors[1].empty()) return;
  cudaSetDevice(0);
  Reference local(config());
  const Step ref = step(local, 0, total, total);
  const Index d = config().d_model;
  for (int r = 0; r < 2; ++r) {
    const Index first = r == 0 ? 0 : sizes[0];
    expect(max_diff(got[r].y, ref.y.data() + first * d) <= 1e-5, "two ranks: rank " + std::to_string(r) + "'s output");
    expect(max_diff(got[r].dx, ref.dx.data() + first * d) <= 1e-5, "two ranks: rank " + std::to_string(r) + "'s dx");
    expect(std::abs(got[r].loss - ref.loss) <= 1e-5, "two ranks: the loss");
    // The gate's gradients (the first parameters) are replicated: equal to one process's.
    expect(max_diff(got[r].grads[0], ref.grads[0].data()) <= 1e-5, "two ranks: the gate's gradient");
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
    static_cast<void>(cudaGetLastError());
    std::printf("SKIPPED: layer_nccl: no CUDA device answered\n");
    return 77;
  }
  try {
    one_rank();
    if (devices >= 2)
      two_ranks();
    else
      std::printf("two ranks: not run (one device)\n");
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf(failures == 0 ? "all passed\n" : "%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
