#pragma once
// moe::backend::Thrust<S, System>: the backend primitives written once over Thrust algorithms,
// with the execution policy, the memory and the GEMMs supplied by a System:
//   Cuda<S>       = Thrust<S, CudaSystem>: thrust::cuda policy, device memory, cuBLAS and our
//                   grouped GEMM kernels (moe/backend/cuda.hpp, nvcc only);
//   ThrustHost<S> = Thrust<S, HostSystem>: thrust::cpp policy, host memory, the CPU backend's
//                   GEMMs (moe/backend/thrust_host.hpp, any C++20 compiler).
// The second runs the CUDA backend's routing, permutation, top-k, combine and reduction logic on
// the host, so it is tested against the CPU reference where no GPU answers.
//
// A System provides: Buffer<T>, Context, policy(ctx), Scratch<T> (temporary backend memory that
// costs no allocation in steady state), gemm, grouped_gemm, grouped_gemm_wgrad, copy, synchronize,
// and checked(f, call, file, line), which runs a Thrust call and turns its failure into a
// moe::Error naming the call, file and line.

// Runs one Thrust algorithm call through System::checked.
#define MOE_THRUST(System, ...) System::checked([&] { __VA_ARGS__; }, #__VA_ARGS__, __FILE__, __LINE__)

#include <thrust/binary_search.h>
#include <thrust/copy.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/scan.h>
#include <thrust/sequence.h>
#include <thrust/fill.h>
#include <thrust/sort.h>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/op.hpp"
#include "moe/view.hpp"

namespace moe::backend {

template <class S, class System>
class Thrust {
 public:
  using Scalar = S;
  template <class T>
  using Buffer = typename System::template Buffer<T>;
  using Context = typename System::Context;
  // The System's page-locked staging pool for reads to the host, or void (moe::HostReads).
  using Staging = typename StagingOf<System>::type;

  static void gemm(Context& ctx, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta,
                   MatrixView<S> c) {
    System::gemm(ctx, ta, tb, alpha, a, b, beta, c);
  }
  // offsets: [groups + 1] in backend memory. precision: see moe/precision.hpp.
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<S> a,
                           ConstMatrixView<S> w, MatrixView<S> c, Precision precision = Precision::fp32) {
    System::grouped_gemm(ctx, offsets, groups, tw, a, w, c, precision);
  }
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, ConstMatrixView<S> a,
                                 ConstMatrixView<S> b, S beta, MatrixView<S> w, Precision precision = Precision::fp32) {
    System::grouped_gemm_wgrad(ctx, offsets, groups, a, b, beta, w, precision);
  }
  // The same on operands stored as BFloat16 (float only); precision must be Precision::bf16.
  template <BFloat16View A, BFloat16View W>
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, A a, W w, MatrixView<S> c,
                           Precision precision) {
    System::grouped_gemm(ctx, offsets, groups, tw, ConstMatrixView<BFloat16>(a), ConstMatrixView<BFloat16>(w), c,
                         precision);
  }
  template <BFloat16View A, BFloat16View B2>
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, A a, B2 b, S beta, MatrixView<S> w,
                                 Precision precision) {
    System::grouped_gemm_wgrad(ctx, offsets, groups, ConstMatrixView<BFloat16>(a), ConstMatrixView<BFloat16>(b), beta,
                               w, precision);
  }

  // f(i) for every i in [0, count), one item per thread on a device; items write disjoint memory.
  template <class F>
  static void for_each(Context& ctx, Index count, F f) {
    if (count <= 0) return;
    MOE_THRUST(System, thrust::for_each_n(System::policy(ctx), thrust::counting_iterator<Index>(0), count, f));
  }

  // dst.row(i) = src.row(rows[i]), one item per element.
  static void gather_rows(Context& ctx, ConstMatrixView<S> src, const Index* rows, MatrixView<S> dst) {
    detail::require(src.cols == dst.cols, "gather_rows: source has ", src.cols, " columns, destination ", dst.cols);
    const Index cols = dst.cols;
    for_each(ctx, dst.rows * cols, [=] MOE_HD(Index i) {
      const Index r = i / cols, c = i % cols;
      dst(r, c) = src(rows[r], c);
    });
  }

  // out[c] = sum over rows r, in row order, of m(r, c): one item per column, so the order is
  // fixed and the bits are those of the CPU backend.
  static void sum_rows(Context& ctx, ConstMatrixView<S> m, S* out) {
    const Index rows = m.rows;
    for_each(ctx, m.cols, [=] MOE_HD(Index c) {
      S acc = 0;
      for (Index r = 0; r < rows; ++r) acc += m(r, c);
      out[c] = acc;
    });
  }

  // counts[b] = number of keys equal to b, for b in [0, bins): a sorted copy of the keys and one
  // binary search per bin (no atomics). Keys outside [0, bins) are not counted; the layer
  // checks a gate's routing at the call boundary, before any key is built from it.
  // A System may count without sorting (CudaSystem: integer atomics, exact in any order).
  static void histogram(Context& ctx, const Index* keys, Index count, Index bins, Index* counts) {
    if (bins <= 0) return;
    if constexpr (requires { System::histogram(ctx, keys, count, bins, counts); }) {
      System::histogram(ctx, keys, count, bins, counts);
      return;
    }
    typename System::template Scratch<Index> sorted(ctx, count), ends(ctx, bins + 1);
    const auto policy = System::policy(ctx);
    if (count > 0) {
      MOE_THRUST(System, thrust::copy_n(policy, keys, count, sorted.data()));
      MOE_THRUST(System, thrust::sort(policy, sorted.data(), sorted.data() + count));
    }
    Index* end = ends.data();
    const Index* first = sorted.data();
    // end[b + 1] = keys < b + 1 = keys <= b; end[0] = keys < 0.
    for_each(ctx, bins + 1, [=] MOE_HD(Index b) { end[b] = lower_bound(first, count, b); });
    for_each(ctx, bins, [=] MOE_HD(Index b) { counts[b] = end[b + 1] - end[b]; });
  }

  // out[0] = 0, out[i] = in[0] + ... + in[i-1]; out has count + 1 entries.
  static void exclusive_scan(Context& ctx, const Index* in, Index count, Index* out) {
    const auto policy = System::policy(ctx);
    MOE_THRUST(System, thrust::fill_n(policy, out, 1, Index{0}));
    if (count > 0) MOE_THRUST(System, thrust::inclusive_scan(policy, in, in + count, out + 1));
  }

  // order[p] = the position of the p-th key in stable ascending key order; keys lie in [0, bins).
  // A System may sort on only the bits bins needs (CudaSystem: a CUB radix sort).
  static void stable_sort_by_key(Context& ctx, const Index* keys, Index count, Index bins, Index* order) {
    if (count <= 0) return;
    if constexpr (requires { System::stable_sort_by_key(ctx, keys, count, bins, order); }) {
      System::stable_sort_by_key(ctx, keys, count, bins, order);
      return;
    }
    typename System::template Scratch<Index> sorted(ctx, count);
    const auto policy = System::policy(ctx);
    MOE_THRUST(System, thrust::copy_n(policy, keys, count, sorted.data()));
    MOE_THRUST(System, thrust::sequence(policy, order, order + count));
    MOE_THRUST(System, thrust::stable_sort_by_key(policy, sorted.data(), sorted.data() + count, order));
  }

  template <class T>
  static void fill(Context& ctx, MatrixView<T> m, T value) {
    const Index cols = m.cols;
    for_each(ctx, m.rows * cols, [=] MOE_HD(Index i) { m(i / cols, i % cols) = value; });
  }

  // Copies between backend memory and host memory, in either direction.
  template <class T>
  static void copy(Context& ctx, ConstMatrixView<T> src, MatrixView<T> dst) {
    detail::require(src.rows == dst.rows && src.cols == dst.cols, "copy: source is ", src.rows, " x ", src.cols,
                    ", destination ", dst.rows, " x ", dst.cols);
    if (src.rows == 0 || src.cols == 0) return;
    System::copy(ctx, src, dst);
  }

  static void synchronize(Context& ctx) { System::synchronize(ctx); }

  // Throws moe::Error, naming `what`, when the System's kernels cannot read p (the CUDA system:
  // pageable host memory); the host system reads anything.
  static void require_readable(const void* p, const char* what) {
    if constexpr (requires { System::require_readable(p, what); }) System::require_readable(p, what);
  }

 private:
  // The first position in sorted[0, count) whose key is not below value.
  MOE_HD static Index lower_bound(const Index* sorted, Index count, Index value) {
    Index lo = 0, hi = count;
    while (lo < hi) {
      const Index mid = lo + (hi - lo) / 2;
      if (sorted[mid] < value)
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  }
};

}  // namespace moe::backend
