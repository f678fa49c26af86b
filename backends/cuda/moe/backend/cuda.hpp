#pragma once
// moe::backend::Cuda<S>: the layer on an NVIDIA GPU. The primitives are moe/backend/thrust.hpp's
// Thrust code with thrust::cuda's execution policy on the library stream (temporaries from a
// caching allocator), device memory in grow-only DeviceMatrix buffers, GEMMs on cuBLAS, and the
// experts' grouped GEMMs as kernels of ours that read the group offsets on the device, so a
// forward needs no host synchronization for them. Every CUDA and cuBLAS return code is checked
// and reported as moe::Error with file and line. Compile with nvcc (--extended-lambda).

#if !defined(__CUDACC__)
#error "moe/backend/cuda.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif
#if !defined(__CUDACC_EXTENDED_LAMBDA__)
#error "moe/backend/cuda.hpp needs nvcc's --extended-lambda: the layer's per-item functors are __host__ __device__ lambdas"
#endif

#include <cuda_runtime.h>
#include <thrust/system_error.h>

#include <new>
#include <type_traits>

#include "moe/backend.hpp"
#include "moe/backend/cuda/caching_allocator.hpp"
#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/backend/cuda/device_matrix.hpp"
#include "moe/backend/cuda/gemm.hpp"
#include "moe/backend/cuda/pinned_staging.hpp"
#include "moe/backend/cuda/routing.hpp"
#include "moe/backend/thrust.hpp"

namespace moe::backend {

struct CudaSystem {
  template <class T>
  using Buffer = DeviceMatrix<T>;
  using Context = cuda::Context;
  // Reads to the host go through page-locked memory, so that several queue behind one wait.
  using Staging = cuda::PinnedStaging;

  // Temporary device memory for one primitive call, from the per-thread caching allocator:
  // after the first call of each size, no cudaMalloc. Contents are unspecified (poisoned like
  // every buffer with MOE_POISON_BUFFERS: the allocator fills the blocks it hands out).
  template <class T>
  class Scratch {
   public:
    Scratch(Context&, Index count) : bytes_(static_cast<std::size_t>(count > 0 ? count : 0) * sizeof(T)) {
      if (bytes_ > 0) data_ = cuda::caching_allocator().allocate(static_cast<std::ptrdiff_t>(bytes_));
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() {
      if (data_ != nullptr) cuda::caching_allocator().deallocate(data_, bytes_);
    }
    [[nodiscard]] T* data() { return reinterpret_cast<T*>(data_); }

   private:
    std::size_t bytes_ = 0;
    char* data_ = nullptr;
  };

  static auto policy(Context& ctx) { return cuda::policy(ctx); }
  // Thrust reports CUDA and CUB failures as thrust::system_error (a launch, a sort's temporary
  // storage, a kernel fault seen at its synchronization); they come out as moe::Error with the
  // call, file and line. moe::Error (e.g. the caching allocator's) goes through as is.
  template <class F>
  static void checked(F&& f, const char* call, const char* file, int line) {
    try {
      f();
    } catch (const thrust::system_error& e) {
      ::moe::detail::fail("Thrust error (", e.what(), ") in ", call, " at ", file, ":", line);
    } catch (const std::bad_alloc& e) {
      ::moe::detail::fail("Thrust could not allocate (", e.what(), ") in ", call, " at ", file, ":", line);
    }
  }

  template <class S>
  static void gemm(Context& ctx, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta,
                   MatrixView<S> c) {
    cuda::gemm(ctx, ta, tb, alpha, a, b, beta, c);
  }
  template <class TA, class TW, class S>  // TA, TW: S, or BFloat16 for both
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<TA> a,
                           ConstMatrixView<TW> w, MatrixView<S> c, Precision precision) {
    cuda::grouped_gemm(ctx, offsets, groups, tw, a, w, c, precision);
  }
  template <class TA, class TB, class S>  // TA, TB: S, or BFloat16 for both
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, ConstMatrixView<TA> a,
                                 ConstMatrixView<TB> b, S beta, MatrixView<S> w, Precision precision) {
    cuda::grouped_gemm_wgrad(ctx, offsets, groups, a, b, beta, w, precision);
  }

  // Either direction between device and host memory (unified addressing), ordered on the stream.
  // Contiguous views (one row, or rows packed at stride == cols on both sides) go as one
  // cudaMemcpyAsync: cudaMemcpy2DAsync's pitch limit would refuse a single row over 2 GiB (a
  // checkpoint's whole tensor); strided views go as a 2-D copy.
  template <class T>
  static void copy(Context& ctx, ConstMatrixView<T> src, MatrixView<T> dst) {
    const std::size_t width = static_cast<std::size_t>(src.cols) * sizeof(T);
    const auto packed = [&](Index rows, Index cols, Index stride) { return rows <= 1 || stride == cols; };
    if (packed(src.rows, src.cols, src.stride) && packed(dst.rows, dst.cols, dst.stride)) {
      MOE_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, width * static_cast<std::size_t>(src.rows), cudaMemcpyDefault,
                                     ctx.stream()));
      return;
    }
    const std::size_t spitch = src.rows <= 1 ? width : static_cast<std::size_t>(src.stride) * sizeof(T);
    const std::size_t dpitch = dst.rows <= 1 ? width : static_cast<std::size_t>(dst.stride) * sizeof(T);
    MOE_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, dpitch, src.data, spitch, width, static_cast<std::size_t>(src.rows),
                                     cudaMemcpyDefault, ctx.stream()));
  }
  static void synchronize(Context& ctx) { ctx.synchronize(); }

  // The routing plan's histogram without a sort, and its stable sort on the keys' bits only.
  static void histogram(Context& ctx, const Index* keys, Index count, Index bins, Index* counts) {
    cuda::histogram(ctx, keys, count, bins, counts);
  }
  static void stable_sort_by_key(Context& ctx, const Index* keys, Index count, Index bins, Index* order) {
    cuda::stable_sort_by_key(ctx, keys, count, bins, order);
  }

  // Device, managed and pinned (page-locked, mapped) memory are readable by our kernels;
  // pageable host memory (a std::vector, new, malloc) is not: a kernel reading it faults, and
  // CUDA reports the fault later, at whatever call synchronizes next.
  static void require_readable(const void* p, const char* what) {
    if (p == nullptr) return;
    cudaPointerAttributes attributes{};
    MOE_CUDA_CHECK(cudaPointerGetAttributes(&attributes, p));
    ::moe::detail::require(attributes.type != cudaMemoryTypeUnregistered, what, " is pageable host memory (", p,
                           "), which the GPU cannot read: expected device memory (a Cuda<S>::Buffer, cudaMalloc), ",
                           "managed or pinned memory; copy host data in first (moe::from_host, Cuda<S>::copy)");
  }
};

template <class S>
using Cuda = Thrust<S, CudaSystem>;

static_assert(moe::Backend<Cuda<float>>);
static_assert(moe::Backend<Cuda<double>>);

}  // namespace moe::backend
