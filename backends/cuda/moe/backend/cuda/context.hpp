#pragma once
// Context: what every CUDA backend call runs on. It is free to construct (the library makes one
// per call) and refers to per-thread, per-device resources created lazily once: the stream all
// library work is ordered on, and a cuBLAS handle bound to that stream.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/context.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <vector>

#include "moe/backend/cuda/check.hpp"

namespace moe::backend::cuda {

// Whether the CUDA runtime sees at least one device. Never throws: tests use it to skip.
[[nodiscard]] inline bool device_available() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    static_cast<void>(cudaGetLastError());  // "no device" / "no driver" is not sticky: clear it
    return false;
  }
  return count >= 1;
}

// The name of the current device, e.g. "NVIDIA H100 80GB HBM3".
[[nodiscard]] inline std::string device_name() {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp properties{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  return properties.name;
}

namespace detail {

// One cuBLAS handle per device for the calling thread, created on first use and destroyed at
// thread exit. Each is bound to cudaStreamPerThread and keeps true fp32 / fp64 arithmetic.
class BlasHandles {
 public:
  BlasHandles() = default;
  BlasHandles(const BlasHandles&) = delete;
  BlasHandles& operator=(const BlasHandles&) = delete;
  ~BlasHandles() {
    // Destructors never throw: failures (e.g. a runtime already shutting down) are ignored.
    int current = -1;
    const bool restore = cudaGetDevice(&current) == cudaSuccess;
    for (std::size_t d = 0; d < handles_.size(); ++d) {
      if (handles_[d] == nullptr) continue;
      if (cudaSetDevice(static_cast<int>(d)) == cudaSuccess) static_cast<void>(cublasDestroy(handles_[d]));
    }
    if (restore) static_cast<void>(cudaSetDevice(current));
    static_cast<void>(cudaGetLastError());
  }

  [[nodiscard]] cublasHandle_t get(int device) {
    const auto slot = static_cast<std::size_t>(device);
    if (slot >= handles_.size()) handles_.resize(slot + 1, nullptr);
    if (handles_[slot] == nullptr) handles_[slot] = create();
    return handles_[slot];
  }

 private:
  static cublasHandle_t create() {
    cublasHandle_t handle = nullptr;
    MOE_CUBLAS_CHECK(cublasCreate(&handle));
    try {
      MOE_CUBLAS_CHECK(cublasSetStream(handle, cudaStreamPerThread));
      // Default math: fp32 GEMMs stay fp32 (no TF32 tensor-op shortcut), fp64 stays fp64.
      MOE_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
      MOE_CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
      // Atomics off (the default, set explicitly): results are reproducible run to run.
      MOE_CUBLAS_CHECK(cublasSetAtomicsMode(handle, CUBLAS_ATOMICS_NOT_ALLOWED));
    } catch (...) {
      static_cast<void>(cublasDestroy(handle));
      throw;
    }
    return handle;
  }

  std::vector<cublasHandle_t> handles_;
};

[[nodiscard]] inline cublasHandle_t blas_handle(int device) {
  thread_local BlasHandles handles;
  return handles.get(device);
}

}  // namespace detail

// The stream is cudaStreamPerThread rather than a thread_local stream of our own, because:
//  - it exists for every (thread, device) pair without creation or destruction, so a Context
//    is free and there is no teardown-order hazard at thread or process exit;
//  - it is a blocking stream: it stays ordered with work a caller issues on the legacy default
//    stream (plain cudaMemcpy, kernels launched with <<<g, b>>>), so mixing library calls with
//    such code needs no extra synchronization. The price, no overlap with legacy-stream work,
//    is what we want for correctness.
// Every kernel, copy, cuBLAS call and Thrust algorithm of the library is issued on stream().
struct Context {
  [[nodiscard]] cudaStream_t stream() const noexcept { return cudaStreamPerThread; }

  // The calling thread's cuBLAS handle for the current device, bound to stream().
  [[nodiscard]] cublasHandle_t blas() const {
    int device = 0;
    MOE_CUDA_CHECK(cudaGetDevice(&device));
    return detail::blas_handle(device);
  }

  // Waits for all work issued on stream() and reports any asynchronous error.
  void synchronize() const { MOE_CUDA_CHECK(cudaStreamSynchronize(stream())); }
};

}  // namespace moe::backend::cuda
