// The scalar math shared by every backend (noise, softplus, the guarded normal CDF, stable
// top-k) evaluated in a CUDA kernel must agree with the host: the same Philox bits exactly,
// the transcendental functions within a few ulps. Exits 77 (Meson: SKIP) without a device.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "moe/random.hpp"
#include "moe/scalar_math.hpp"
#include "moe/top_k.hpp"

namespace {

constexpr int kItems = 4096;
constexpr int kWidth = 9;

struct Sample {
  unsigned int bits[4];
  double normal;
  double softplus;
  double cdf;
  moe::Index top[kWidth];
};

MOE_HD void evaluate(int i, Sample& s) {
  const moe::CounterRandom stream{0x5eedULL};
  const auto block = stream.block(static_cast<std::uint64_t>(i), 3u, 7u);
  for (int w = 0; w < 4; ++w) s.bits[w] = block.v[w];
  s.normal = stream.normal(static_cast<std::uint64_t>(i), 1u, 2u);
  s.softplus = moe::detail::softplus(s.normal * 10.0);
  s.cdf = moe::detail::normal_cdf_scaled(s.normal, 0.25 + 0.001 * (i % 100));
  double v[kWidth];
  for (int j = 0; j < kWidth; ++j) v[j] = static_cast<double>((i * 7 + j * 13) % 5);  // many ties
  moe::top_k_stable(v, kWidth, kWidth, s.top);
}

__global__ void evaluate_all(Sample* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < kItems) evaluate(i, out[i]);
}

bool close(double a, double b) { return std::abs(a - b) <= 1e-13 * std::max(1.0, std::abs(b)); }

int check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(e));
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device answers; the device scalar math is unchecked\n");
    return 77;
  }
  Sample* d_out = nullptr;
  if (check(cudaMalloc(&d_out, sizeof(Sample) * kItems), "cudaMalloc")) return 1;
  evaluate_all<<<(kItems + 255) / 256, 256>>>(d_out);
  if (check(cudaGetLastError(), "kernel launch") || check(cudaDeviceSynchronize(), "kernel")) return 1;
  std::vector<Sample> gpu(kItems);
  if (check(cudaMemcpy(gpu.data(), d_out, sizeof(Sample) * kItems, cudaMemcpyDeviceToHost), "cudaMemcpy")) return 1;
  cudaFree(d_out);
  int bad = 0;
  for (int i = 0; i < kItems; ++i) {
    Sample host{};
    evaluate(i, host);
    bool ok = close(gpu[i].normal, host.normal) && close(gpu[i].softplus, host.softplus) && close(gpu[i].cdf, host.cdf);
    for (int w = 0; w < 4; ++w) ok = ok && gpu[i].bits[w] == host.bits[w];
    for (int j = 0; j < kWidth; ++j) ok = ok && gpu[i].top[j] == host.top[j];
    if (!ok && ++bad <= 5) std::fprintf(stderr, "item %d: device and host disagree\n", i);
  }
  std::printf("%d of %d items agree between device and host\n", kItems - bad, kItems);
  return bad == 0 ? 0 : 1;
}
