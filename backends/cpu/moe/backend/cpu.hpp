#pragma once
// moe::backend::Cpu<S>: the reference backend, on Eigen, with OpenMP over independent rows,
// row blocks and experts. Every other backend is tested against this one.

#include <algorithm>
#include <type_traits>

#include "moe/backend.hpp"
#include "moe/backend/cpu/eigen.hpp"
#include "moe/backend/cpu/gemm.hpp"
#include "moe/backend/cpu/host_matrix.hpp"
#include "moe/backend/cpu/parallel.hpp"
#include "moe/backend/cpu/permute.hpp"
#include "moe/backend/cpu/reduce.hpp"

namespace moe::backend {

template <class S>
class Cpu {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "moe::backend::Cpu supports float and double");

 public:
  using Scalar = S;
  template <class T>
  using Buffer = HostMatrix<T>;

  // Per-call state: how many threads to use (0: all that OpenMP offers).
  struct Context {
    int threads = 0;
  };

  static void gemm(Context& ctx, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta,
                   MatrixView<S> c) {
    cpu::gemm(ctx.threads, ta, tb, alpha, a, b, beta, c);
  }
  // precision: Precision::bf16 / tf32 round the operands to bfloat16 / TF32 (float only); see moe/precision.hpp.
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<S> a,
                           ConstMatrixView<S> w, MatrixView<S> c, Precision precision = Precision::fp32) {
    cpu::grouped_gemm(ctx.threads, offsets, groups, tw, a, w, c, precision);
  }
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, ConstMatrixView<S> a,
                                 ConstMatrixView<S> b, S beta, MatrixView<S> w, Precision precision = Precision::fp32) {
    cpu::grouped_gemm_wgrad(ctx.threads, offsets, groups, a, b, beta, w, precision);
  }
  // The same on operands stored as BFloat16; precision must be Precision::bf16.
  template <BFloat16View A, BFloat16View W>
  static void grouped_gemm(Context& ctx, const Index* offsets, Index groups, Op tw, A a, W w, MatrixView<S> c,
                           Precision precision) {
    cpu::grouped_gemm(ctx.threads, offsets, groups, tw, a, w, c, precision);
  }
  template <BFloat16View A, BFloat16View B2>
  static void grouped_gemm_wgrad(Context& ctx, const Index* offsets, Index groups, A a, B2 b, S beta, MatrixView<S> w,
                                 Precision precision) {
    cpu::grouped_gemm_wgrad(ctx.threads, offsets, groups, a, b, beta, w, precision);
  }
  // Light items (a token's gate, an element) go parallel only in chunks of at least this many.
  static constexpr Index kItemsPerThread = 256;

  // f(i) for every i in [0, count); items must write disjoint memory.
  template <class F>
  static void for_each(Context& ctx, Index count, F&& f) {
    cpu::parallel_for(ctx.threads, count, std::forward<F>(f), kItemsPerThread);
  }
  // f(r, c) for every element of a rows x cols grid (moe::for_each_element): rows in parallel,
  // each row's columns in one loop.
  template <class F>
  static void for_each_element(Context& ctx, Index rows, Index cols, F&& f) {
    if (cols <= 0) return;
    cpu::parallel_for(
        ctx.threads, rows,
        [&](Index r) {
          for (Index c = 0; c < cols; ++c) f(r, c);
        },
        std::max<Index>(1, kItemsPerThread / cols));
  }
  static void gather_rows(Context& ctx, ConstMatrixView<S> src, const Index* rows, MatrixView<S> dst) {
    cpu::gather_rows(ctx.threads, src, rows, dst);
  }
  static void sum_rows(Context&, ConstMatrixView<S> m, S* out) { cpu::sum_rows(m, out); }
  static void histogram(Context&, const Index* keys, Index count, Index bins, Index* counts) {
    cpu::histogram(keys, count, bins, counts);
  }
  static void exclusive_scan(Context&, const Index* in, Index count, Index* out) {
    cpu::exclusive_scan(in, count, out);
  }
  static void stable_sort_by_key(Context&, const Index* keys, Index count, Index bins, Index* order) {
    cpu::stable_sort_by_key(keys, count, bins, order);
  }
  template <class T>
  static void fill(Context&, MatrixView<T> m, T value) {
    for (Index r = 0; r < m.rows; ++r) std::fill_n(m.row(r), m.cols, value);
  }
  // Copies between backend memory and host memory (the same memory here).
  template <class T>
  static void copy(Context&, ConstMatrixView<T> src, MatrixView<T> dst) {
    detail::require(src.rows == dst.rows && src.cols == dst.cols, "copy: source is ", src.rows, " x ", src.cols,
                    ", destination ", dst.rows, " x ", dst.cols);
    for (Index r = 0; r < src.rows; ++r) std::copy_n(src.row(r), src.cols, dst.row(r));
  }
  static void synchronize(Context&) {}
};

template <class B>
inline constexpr bool is_cpu = false;
template <class S>
inline constexpr bool is_cpu<Cpu<S>> = true;

static_assert(moe::Backend<Cpu<float>>);
static_assert(moe::Backend<Cpu<double>>);

}  // namespace moe::backend
