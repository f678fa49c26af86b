#pragma once
// Error checks for the CUDA backend: MOE_CUDA_CHECK, MOE_CUBLAS_CHECK and MOE_CUDA_CHECK_LAUNCH
// evaluate their expression once and turn a failure into moe::Error naming the code, the call
// and where it was made, e.g. "CUDA error cudaErrorMemoryAllocation (out of memory) in cudaMalloc(&p, n) at x.hpp:42".

#if !defined(__CUDACC__)
#error "moe/backend/cuda/check.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string_view>

#include "moe/error.hpp"

namespace moe::backend::cuda::detail {

// The file name without its directories, for shorter messages.
[[nodiscard]] constexpr std::string_view base_name(std::string_view path) {
  const auto slash = path.find_last_of("/\\");
  return slash == std::string_view::npos ? path : path.substr(slash + 1);
}

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  // Clears the runtime's last-error slot (for errors that are not sticky), so that a later
  // MOE_CUDA_CHECK_LAUNCH does not report this failure a second time.
  static_cast<void>(cudaGetLastError());
  ::moe::detail::fail("CUDA error ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ") in ", call, " at ",
                      base_name(file), ":", line);
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  ::moe::detail::fail("cuBLAS error ", cublasGetStatusName(status), " (", cublasGetStatusString(status), ") in ", call,
                      " at ", base_name(file), ":", line);
}

}  // namespace moe::backend::cuda::detail

// Evaluates a CUDA runtime call once; throws moe::Error unless it returned cudaSuccess.
#define MOE_CUDA_CHECK(expr) ::moe::backend::cuda::detail::check_cuda((expr), #expr, __FILE__, __LINE__)

// Evaluates a cuBLAS call once; throws moe::Error unless it returned CUBLAS_STATUS_SUCCESS.
#define MOE_CUBLAS_CHECK(expr) ::moe::backend::cuda::detail::check_cublas((expr), #expr, __FILE__, __LINE__)

// Checks the launch of the kernel just issued (bad configuration, missing image, ...). It does
// not wait for the kernel: faults during its execution surface at the next synchronizing call.
#define MOE_CUDA_CHECK_LAUNCH() \
  ::moe::backend::cuda::detail::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
