#pragma once
// moe::backend::ThrustHost<S>: the CUDA backend's Thrust code on the host. The same primitives
// as moe::backend::Cuda (moe/backend/thrust.hpp), run with thrust::cpp's execution policy over
// host memory, with the CPU backend's GEMMs in place of cuBLAS and our grouped GEMM kernels.
// Any C++20 compiler builds it (Thrust's headers come with the CUDA toolkit's CCCL), so the
// routing, permutation, top-k, combine and reduction logic of the CUDA backend is tested
// against the CPU reference on a machine without a GPU.

#include <thrust/system/cpp/execution_policy.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "moe/backend/cpu/gemm.hpp"
#include "moe/backend/cpu/host_matrix.hpp"
#include "moe/backend/thrust.hpp"

namespace moe::backend {

struct ThrustHostSystem {
  template <class T>
  using Buffer = HostMatrix<T>;

  // Threads for the GEMMs (0: all that OpenMP offers); Thrust's cpp system runs on one.
  struct Context {
    int threads = 0;
  };

  // Temporary memory for one primitive call. Contents are unspecified: with MOE_POISON_BUFFERS
  // defined they are poisoned as HostMatrix's are (NaN bytes, 0x7F bytes for integers), so an
  // element read before it is written shows in a test instead of reading as a vector's zero.
  template <class T>
  class Scratch {
   public:
    Scratch(Context&, Index count) { data_.resize(count > 0 ? count : 0, 1); }
    [[nodiscard]] T* data() { return data_.data(); }

   private:
    HostMatrix<T> data_;
  };

  static auto policy(Context&) { return thrust::cpp::par; }
  // Host algorithms report nothing Thrust-specific: whatever they throw goes through as is.
  template <class F>
  static void checked(F&& f, const char*, const char*, int) {
    f();
  }

  template <class S>
  static void gemm(Context& ctx, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta,
                   MatrixView<S> c) {
    cpu::gemm(ctx.threads, ta, tb, alpha, a, b, beta, c);
  }
  template <class TA, class TW, class S>  // TA, TW: S, or BFloat16 for both
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<TA> a,
                           ConstMatrixView<TW> w, MatrixView<S> c, Precision precision) {
    cpu::grouped_gemm(ctx.threads, offsets, groups, tw, a, w, c, precision);
  }
  template <class TA, class TB, class S>  // TA, TB: S, or BFloat16 for both
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, ConstMatrixView<TA> a,
                                 ConstMatrixView<TB> b, S beta, MatrixView<S> w, Precision precision) {
    cpu::grouped_gemm_wgrad(ctx.threads, offsets, groups, a, b, beta, w, precision);
  }
  template <class T>
  static void copy(Context&, ConstMatrixView<T> src, MatrixView<T> dst) {
    for (Index r = 0; r < src.rows; ++r) std::copy_n(src.row(r), src.cols, dst.row(r));
  }
  // Nothing runs asynchronously on the host: synchronize only counts the calls, so a test can
  // count the host waits (device-to-host reads behind a synchronization) a layer call makes on
  // the CUDA backend, which runs the same code with a real wait at each of these calls.
  static void synchronize(Context&) { ++host_waits_; }
  // Calls of synchronize on this thread so far.
  [[nodiscard]] static std::int64_t host_waits() { return host_waits_; }

 private:
  static inline thread_local std::int64_t host_waits_ = 0;
};

template <class S>
using ThrustHost = Thrust<S, ThrustHostSystem>;

static_assert(moe::Backend<ThrustHost<float>>);
static_assert(moe::Backend<ThrustHost<double>>);

}  // namespace moe::backend
