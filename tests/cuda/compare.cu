// The CUDA backend against the CPU reference: every gate and expert at depth MOE_COMPARE_DEPTH
// (one executable per depth), float with fp32 and bf16 experts (and double at depth 1), with the
// shared comparison suite (tests/backend_compare.hpp).
// Built with MOE_POISON_BUFFERS: device and host buffers start as NaN. Exits 77 (Meson: SKIP),
// naming itself, when no CUDA device answers.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../backend_compare.hpp"
#include "moe/backend/cuda.hpp"

#ifndef MOE_COMPARE_DEPTH
#define MOE_COMPARE_DEPTH 1
#endif

using moe::Index;

TEST_CASE_TEMPLATE_DEFINE("Cuda matches the CPU reference (float, and bf16 experts)", Case, cuda_cases) {
  compare::check_case<moe::backend::Cuda<float>, Case>(1e-5);
}
TEST_CASE_TEMPLATE_APPLY(cuda_cases, compare::CasesAtDepth<MOE_COMPARE_DEPTH>);

#if MOE_COMPARE_DEPTH == 1
// Host memory passed where the layer's kernels read is refused at the call, by name, before any
// kernel faults on it; the layer stays usable.
TEST_CASE("Cuda refuses pageable host memory as x, noise and dy") {
  using Gpu = moe::backend::Cuda<float>;
  using Layer = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Gpu>;
  const Index t_count = 5, d = 4;
  Layer layer({.d_model = d, .n_experts = 4, .expert = {.hidden = 8}, .gate = {.k = 2}});
  std::vector<float> host(static_cast<std::size_t>(t_count * d), 0.25f);
  const moe::ConstMatrixView<float> x_host{host.data(), t_count, d};
  Gpu::Buffer<float> x(t_count, d, 0.25f);
  moe::Rng rng(3);
  CHECK_THROWS_WITH_AS(layer.forward(x_host, moe::Mode::inference),
                       doctest::Contains("moe::Layer::forward: input is pageable host memory"), moe::Error);
  std::vector<float> noise_host(static_cast<std::size_t>(t_count * layer.noise_columns()), 0.0f);
  CHECK_THROWS_WITH_AS(
      layer.forward(x.view(), moe::Mode::train,
                    moe::ConstMatrixView<float>{noise_host.data(), t_count, layer.noise_columns()}),
      doctest::Contains("moe::Layer::forward: noise is pageable host memory"), moe::Error);
  const auto f = layer.forward(x.view(), moe::Mode::train, rng);
  CHECK_THROWS_WITH_AS(layer.backward(f, x_host), doctest::Contains("moe::Layer::backward: dy is pageable host memory"),
                       moe::Error);
  const auto b = layer.backward(f, x.view());  // still usable
  CHECK(b.dx.rows() == t_count);
}

// The routing plan's primitives (a histogram without a sort, a radix sort on the keys' bits)
// against the CPU backend's, on keys in [0, bins) with bins on both sides of the shared-memory
// histogram's limit and of the digit boundaries, outputs poisoned first.
TEST_CASE("Cuda's routing primitives equal the CPU backend's") {
  using Gpu = moe::backend::Cuda<float>;
  using Cpu = moe::backend::Cpu<float>;
  Gpu::Context gctx;
  Cpu::Context cctx;
  for (const Index count : {0, 1, 7, 1000, 100000}) {
    for (const Index bins : {1, 2, 3, 66, 257, 4096, 4097, 70000}) {
      CAPTURE(count);
      CAPTURE(bins);
      std::vector<Index> keys(static_cast<std::size_t>(count));
      const moe::CounterRandom r{static_cast<std::uint64_t>(count * 7 + bins)};
      for (Index i = 0; i < count; ++i) {
        const double u = 0.5 * (1.0 + r.symmetric_uniform(static_cast<std::uint64_t>(i), 0u, 1u));
        // Skewed: half the keys in bin 0, so runs of equal keys test stability.
        keys[static_cast<std::size_t>(i)] = u < 0.5 ? 0 : std::min<Index>(bins - 1, static_cast<Index>(u * bins));
      }
      Gpu::Buffer<Index> dkeys(std::max<Index>(count, 1), 1), dcounts(bins, 1), dorder(std::max<Index>(count, 1), 1);
      if (count > 0) Gpu::copy(gctx, moe::ConstMatrixView<Index>{keys.data(), count, 1}, dkeys.view());
      Gpu::histogram(gctx, dkeys.data(), count, bins, dcounts.data());
      Gpu::stable_sort_by_key(gctx, dkeys.data(), count, bins, dorder.data());
      std::vector<Index> counts(static_cast<std::size_t>(bins)), order(static_cast<std::size_t>(count));
      Cpu::histogram(cctx, keys.data(), count, bins, counts.data());
      Cpu::stable_sort_by_key(cctx, keys.data(), count, bins, order.data());
      CHECK(moe::to_host<Gpu>(gctx, moe::ConstMatrixView<Index>{dcounts.data(), bins, 1}) == counts);
      if (count > 0) CHECK(moe::to_host<Gpu>(gctx, moe::ConstMatrixView<Index>{dorder.data(), count, 1}) == order);
    }
  }
}

// Cuda<double> at depth 1 (cuBLAS DGEMM and the kernels' double path), against Cpu<double>.
TEST_CASE_TEMPLATE_DEFINE("Cuda matches the CPU reference (double)", Case, cuda_double_cases) {
  compare::check_case<moe::backend::Cuda<double>, Case>(1e-10);
}
TEST_CASE_TEMPLATE_APPLY(cuda_double_cases, compare::CasesAtDepth<1>);
#endif

int main(int argc, char** argv) {
  if (!moe::backend::cuda::device_available()) {
    std::printf("SKIPPED: cuda_compare_depth%d: no CUDA device answered\n", MOE_COMPARE_DEPTH);
    return 77;
  }
  std::printf("device: %s\n", moe::backend::cuda::device_name().c_str());
  doctest::Context context(argc, argv);
  return context.run();
}
