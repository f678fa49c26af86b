#pragma once
// The routing plan's primitives on the device, sized to the keys: the T*k expert keys of a batch
// lie in [0, bins) with bins = n + 2, so a histogram needs no sort, and a stable radix sort needs
// only the bits that tell bins apart (ceil(log2(bins)): 8 bits for n <= 254), not all 64.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/routing.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "moe/backend/cuda/caching_allocator.hpp"
#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/view.hpp"

namespace moe::backend::cuda {

namespace detail {

inline constexpr int kHistogramThreads = 256;
// Bins counted in shared memory first (32-bit counters: 16 KiB), then added to the output once
// per block; more bins go straight to the output.
inline constexpr Index kSharedBins = 4096;

// counts[b] += number of keys equal to b, for b in [0, bins); other keys are not counted. Integer
// atomics: the counts are exact and the same whatever the order the additions land in. (The
// kernels are templates so that this header defines them in every translation unit without
// breaking the one-definition rule.)
template <int = 0>
__global__ void histogram_kernel(const Index* __restrict__ keys, Index count, Index bins,
                                 unsigned long long* __restrict__ counts) {
  __shared__ unsigned int local[kSharedBins];
  const bool shared = bins <= kSharedBins;
  if (shared)
    for (Index b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    const Index k = keys[i];
    if (k < 0 || k >= bins) continue;
    if (shared)
      atomicAdd(&local[k], 1u);
    else
      atomicAdd(&counts[k], 1ull);
  }
  if (!shared) return;
  __syncthreads();
  for (Index b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b] != 0) atomicAdd(&counts[b], static_cast<unsigned long long>(local[b]));
}

template <int = 0>
__global__ void sequence_kernel(Index* __restrict__ out, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) out[i] = i;
}

// Radix sort digits needed to order keys in [0, bins): the bit width of bins - 1 (at least 1).
[[nodiscard]] inline int key_bits(Index bins) {
  int bits = 1;
  while (bits < 63 && (Index{1} << bits) < bins) ++bits;
  return bits;
}

}  // namespace detail

// counts[b] = number of keys equal to b, for b in [0, bins), on ctx's stream; keys outside are
// not counted. One memset and one launch, no sort.
inline void histogram(const Context& ctx, const Index* keys, Index count, Index bins, Index* counts) {
  if (bins <= 0) return;
  static_assert(sizeof(Index) == sizeof(unsigned long long), "counts are added as 64-bit integers");
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  MOE_CUDA_CHECK(cudaMemsetAsync(out, 0, static_cast<std::size_t>(bins) * sizeof(Index), ctx.stream()));
  if (count <= 0) return;
  const Index blocks = std::min<Index>((count + detail::kHistogramThreads - 1) / detail::kHistogramThreads, 1024);
  detail::histogram_kernel<><<<static_cast<unsigned>(blocks), detail::kHistogramThreads, 0, ctx.stream()>>>(
      keys, count, bins, out);
  MOE_CUDA_CHECK_LAUNCH();
}

// order[p] = the position of the p-th key in stable ascending order of keys in [0, bins): a CUB
// radix sort of (key, position) pairs over the low key_bits(bins) bits only. Temporary memory
// from the caching allocator.
inline void stable_sort_by_key(const Context& ctx, const Index* keys, Index count, Index bins, Index* order) {
  if (count <= 0) return;
  const int bits = detail::key_bits(bins);
  // Keys are non-negative and below 2^bits: as unsigned integers they sort the same.
  const auto* in = reinterpret_cast<const unsigned long long*>(keys);
  const std::size_t n = static_cast<std::size_t>(count);
  auto& allocator = caching_allocator();
  // One allocation: sorted keys, the positions 0..count-1, then CUB's temporary storage.
  std::size_t temp_bytes = 0;
  MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, in, static_cast<unsigned long long*>(nullptr),
                                                 static_cast<const Index*>(nullptr), order, count, 0, bits,
                                                 ctx.stream()));
  const std::size_t keys_bytes = (n * sizeof(Index) + 255) / 256 * 256;
  const std::size_t bytes = 2 * keys_bytes + temp_bytes;
  char* block = allocator.allocate(static_cast<std::ptrdiff_t>(bytes));
  struct Release {
    CachingAllocator& a;
    char* p;
    std::size_t bytes;
    ~Release() { a.deallocate(p, bytes); }
  } release{allocator, block, bytes};
  auto* sorted = reinterpret_cast<unsigned long long*>(block);
  auto* positions = reinterpret_cast<Index*>(block + keys_bytes);
  const Index blocks = std::min<Index>((count + detail::kHistogramThreads - 1) / detail::kHistogramThreads, 4096);
  detail::sequence_kernel<><<<static_cast<unsigned>(blocks), detail::kHistogramThreads, 0, ctx.stream()>>>(positions, count);
  MOE_CUDA_CHECK_LAUNCH();
  MOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(block + 2 * keys_bytes, temp_bytes, in, sorted, positions, order,
                                                 count, 0, bits, ctx.stream()));
}

}  // namespace moe::backend::cuda
