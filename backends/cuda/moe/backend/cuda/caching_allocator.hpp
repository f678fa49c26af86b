#pragma once
// CachingAllocator: Thrust's temporary-storage allocator for the library stream. Freed blocks
// are kept per thread and per device, binned by size, and handed out again, so that repeated
// Thrust calls allocate no device memory in steady state. policy(ctx) is the Thrust policy to use.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/caching_allocator.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_runtime.h>
#include <thrust/system/cuda/execution_policy.h>

#include <bit>
#include <cstddef>
#include <map>
#include <new>
#include <unordered_map>
#include <utility>

#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"

namespace moe::backend::cuda {

// Blocks are handed back to Thrust as soon as an algorithm has *enqueued* its work, and may be
// handed out again at once. That is safe only because every user of one instance orders its
// work on the same stream (the calling thread's library stream, Context::stream()): use the
// allocator through policy(ctx) only, on the thread that owns it.
class CachingAllocator {
 public:
  using value_type = char;

  CachingAllocator() = default;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  ~CachingAllocator() { release_cached(); }

  // A block of at least num_bytes on the current device, from the cache when one fits. With
  // MOE_POISON_BUFFERS defined, every block handed out is 0xFF bytes (ordered on the library
  // stream), so a temporary read before it is written shows as garbage in a test, never as the
  // zeros a fresh allocation often happens to hold.
  char* allocate(std::ptrdiff_t num_bytes) {
    char* block = take(num_bytes);
#if defined(MOE_POISON_BUFFERS)
    if (num_bytes > 0)
      MOE_CUDA_CHECK(cudaMemsetAsync(block, 0xFF, static_cast<std::size_t>(num_bytes), Context{}.stream()));
#endif
    return block;
  }

  // Returns a block to the cache. Never throws (Thrust calls it from destructors).
  void deallocate(char* block, std::size_t /*num_bytes*/) noexcept {
    const auto it = live_.find(block);
    if (it == live_.end()) return;  // not from this allocator: not ours to free
    const Key key = it->second;
    live_.erase(it);
    try {
      free_.emplace(key, block);
    } catch (...) {
      free_block(key.device, block);  // no memory for the bookkeeping: give the block back instead
    }
  }

  // Frees every cached (not currently handed out) block. Never throws.
  void release_cached() noexcept {
    for (const auto& [key, block] : free_) free_block(key.device, block);
    free_.clear();
  }

  // Bytes held in the cache, not handed out.
  [[nodiscard]] std::size_t cached_bytes() const noexcept {
    std::size_t total = 0;
    for (const auto& entry : free_) total += entry.first.bytes;
    return total;
  }

 private:
  // A block of at least num_bytes: a cached one when one fits, else a fresh one.
  char* take(std::ptrdiff_t num_bytes) {
    const std::size_t bytes = bin_size(num_bytes <= 0 ? std::size_t{1} : static_cast<std::size_t>(num_bytes));
    int device = 0;
    MOE_CUDA_CHECK(cudaGetDevice(&device));
    // The smallest cached block of this device that holds the request; bins make exact hits
    // the rule, and a block more than twice too large is not used (allocate a fitting one).
    const auto hit = free_.lower_bound(Key{device, bytes});
    if (hit != free_.end() && hit->first.device == device && hit->first.bytes <= 2 * bytes) {
      const Key key = hit->first;
      char* block = hit->second;
      live_.emplace(block, key);
      free_.erase(hit);
      return block;
    }
    void* fresh = nullptr;
    cudaError_t status = cudaMalloc(&fresh, bytes);
    if (status == cudaErrorMemoryAllocation) {
      // Out of memory: give the cached blocks back to the driver and try once more.
      static_cast<void>(cudaGetLastError());
      release_cached();
      status = cudaMalloc(&fresh, bytes);
    }
    detail::check_cuda(status, "cudaMalloc(&fresh, bytes) in CachingAllocator::allocate", __FILE__, __LINE__);
    char* block = static_cast<char*>(fresh);
    try {
      live_.emplace(block, Key{device, bytes});
    } catch (...) {
      static_cast<void>(cudaFree(block));
      throw;
    }
    return block;
  }

  struct Key {
    int device;
    std::size_t bytes;
    friend bool operator<(const Key& x, const Key& y) {
      return x.device != y.device ? x.device < y.device : x.bytes < y.bytes;
    }
  };

  // Rounds up to 512 bytes, then to one of 2^e * {1, 1.25, 1.5, 1.75}: at most 25% waste,
  // and sizes that drift from call to call (token counts) land in few bins.
  [[nodiscard]] static std::size_t bin_size(std::size_t bytes) {
    constexpr std::size_t kMin = 512;
    if (bytes <= kMin) return kMin;
    const std::size_t top = std::bit_floor(bytes);  // 2^e <= bytes < 2^(e+1)
    const std::size_t quarter = top / 4;
    const std::size_t rounded = (bytes + quarter - 1) / quarter * quarter;
    return rounded < bytes ? bytes : rounded;  // (only on overflow, which cudaMalloc refuses anyway)
  }

  // Frees a block on the device it came from, leaving the current device as it was.
  static void free_block(int device, char* block) noexcept {
    int current = -1;
    const bool restore = cudaGetDevice(&current) == cudaSuccess && current != device;
    if (!restore || cudaSetDevice(device) == cudaSuccess) static_cast<void>(cudaFree(block));
    if (restore) static_cast<void>(cudaSetDevice(current));
    static_cast<void>(cudaGetLastError());
  }

  std::multimap<Key, char*> free_;
  std::unordered_map<char*, Key> live_;
};

// The calling thread's allocator; its cached blocks are freed at thread exit.
[[nodiscard]] inline CachingAllocator& caching_allocator() {
  thread_local CachingAllocator allocator;
  return allocator;
}

// The Thrust execution policy for library work: the library stream, no synchronization beyond
// what an algorithm needs (results of reductions still come back synchronously), temporary
// storage from caching_allocator().
[[nodiscard]] inline auto policy(const Context& ctx) {
  return thrust::cuda::par_nosync(caching_allocator()).on(ctx.stream());
}

}  // namespace moe::backend::cuda
