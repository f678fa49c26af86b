#pragma once
// PinnedStaging: page-locked host memory for the device-to-host reads the layer makes (the
// routing plan's offsets, the balance statistics). A copy into pageable memory (a std::vector)
// is staged by the driver and returns only when it has landed: each one is a host wait of its
// own. Copies into pinned memory are truly asynchronous, so several reads queue behind the one
// synchronization that ends them, and are copied out to their vectors after it.
//
// One pool per thread, grow-only: blocks are allocated with cudaMallocHost the first time a
// size is needed and kept until the thread exits, so a block that a queued copy still writes is
// never freed. Regions are handed out and given back in stack order (moe::HostReads).

#if !defined(__CUDACC__)
#error "moe/backend/cuda/pinned_staging.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "moe/backend/cuda/check.hpp"

namespace moe::backend::cuda {

class PinnedStaging {
 public:
  // Where the pool stands: give it back to release every region taken after it.
  struct Mark {
    std::size_t block = 0, used = 0;
  };

  PinnedStaging() = default;
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;
  ~PinnedStaging() {
    for (const Block& b : blocks_) static_cast<void>(cudaFreeHost(b.data));  // never throws
    static_cast<void>(cudaGetLastError());
  }

  [[nodiscard]] Mark mark() const { return {current_, blocks_.empty() ? 0 : blocks_[current_].used}; }

  // bytes of pinned memory, 16-byte aligned, valid until the pool is released to an earlier mark.
  [[nodiscard]] char* take(std::size_t bytes) {
    bytes = (bytes + 15) / 16 * 16;
    while (current_ < blocks_.size() && blocks_[current_].used + bytes > blocks_[current_].size) {
      if (current_ + 1 == blocks_.size()) break;
      blocks_[++current_].used = 0;
    }
    if (blocks_.empty() || blocks_[current_].used + bytes > blocks_[current_].size) {
      const std::size_t size = std::max<std::size_t>({bytes, kMinBlock, blocks_.empty() ? 0 : 2 * blocks_.back().size});
      Block b;
      MOE_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&b.data), size));
      b.size = size;
      blocks_.push_back(b);
      current_ = blocks_.size() - 1;
    }
    Block& b = blocks_[current_];
    char* p = b.data + b.used;
    b.used += bytes;
    return p;
  }

  void release(Mark m) {
    if (blocks_.empty()) return;
    current_ = m.block;
    blocks_[current_].used = m.used;
  }

  // The calling thread's pool.
  static PinnedStaging& of_this_thread() {
    thread_local PinnedStaging pool;
    return pool;
  }

 private:
  static constexpr std::size_t kMinBlock = std::size_t{64} << 10;
  struct Block {
    char* data = nullptr;
    std::size_t size = 0, used = 0;
  };
  std::vector<Block> blocks_;
  std::size_t current_ = 0;
};

}  // namespace moe::backend::cuda
