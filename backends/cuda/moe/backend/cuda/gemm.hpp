#pragma once
// GEMM and grouped GEMM on the device, with the semantics, shape checks and messages of
// moe/backend/cpu/gemm.hpp. gemm calls cuBLAS; the grouped kernels are one launch each of a
// shared-memory tiled GEMM with a fixed summation order (deterministic, no atomics): for fp32
// (and fp64) the exact kernels below, on CUDA cores; for Precision::bf16 and Precision::tf32 the
// tensor-core kernels of moe/backend/cuda/tensor_core_gemm.hpp where the device and the build
// allow them (sm_80 and newer), else the exact kernels with the operands rounded as they load.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/gemm.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/backend/cuda/device_matrix.hpp"
#include "moe/backend/cuda/tensor_core_gemm.hpp"
#include "moe/error.hpp"
#include "moe/op.hpp"
#include "moe/precision.hpp"
#include "moe/view.hpp"

namespace moe::backend::cuda {

namespace detail {

// Scalars the GEMMs take. Each accumulates in its own precision; a bf16 input type would map
// to float accumulation here (and to cublasGemmEx in gemm) when it is added.
template <class S>
concept GemmScalar = std::is_same_v<S, float> || std::is_same_v<S, double>;

template <class S>
struct Accumulator;
template <>
struct Accumulator<float> {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};

// Correctly rounded device arithmetic, spelled out so that no compiler flag (-fmad) can change
// how an element is computed.
__device__ __forceinline__ float fma_rn(float x, float y, float z) { return __fmaf_rn(x, y, z); }
__device__ __forceinline__ double fma_rn(double x, double y, double z) { return __fma_rn(x, y, z); }
__device__ __forceinline__ float mul_rn(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double mul_rn(double x, double y) { return __dmul_rn(x, y); }
__device__ __forceinline__ float add_rn(float x, float y) { return __fadd_rn(x, y); }
__device__ __forceinline__ double add_rn(double x, double y) { return __dadd_rn(x, y); }

// ---- gemm (cuBLAS) ----------------------------------------------------------------------------

[[nodiscard]] inline cublasOperation_t blas_op(Op op) { return op == Op::none ? CUBLAS_OP_N : CUBLAS_OP_T; }

// cuBLAS sees a row-major view as its column-major transpose, with leading dimension = the row
// stride, and requires ld >= max(1, cols). A view of at most one row may carry any stride
// (e.g. 0): only row 0 is read, so any valid ld will do. Views whose rows overlap (stride < cols
// over several rows) cannot be expressed and are refused.
template <class T>
[[nodiscard]] std::int64_t leading_dim(MatrixView<T> v, const char* name) {
  if (v.rows <= 1) return std::max<Index>(1, v.cols);
  ::moe::detail::require(v.stride >= v.cols, "gemm: ", name, " has row stride ", v.stride, " < ", v.cols,
                         " columns over ", v.rows, " rows, which cuBLAS cannot address");
  return v.stride;
}

inline void blas_gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n,
                      std::int64_t k, const float* alpha, const float* a, std::int64_t lda, const float* b,
                      std::int64_t ldb, const float* beta, float* c, std::int64_t ldc) {
  MOE_CUBLAS_CHECK(cublasSgemm_64(handle, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

inline void blas_gemm(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n,
                      std::int64_t k, const double* alpha, const double* a, std::int64_t lda, const double* b,
                      std::int64_t ldb, const double* beta, double* c, std::int64_t ldc) {
  MOE_CUBLAS_CHECK(cublasDgemm_64(handle, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

inline constexpr int kScaleThreads = 256;

// c = beta * c over a strided view; beta == 0 writes zeros whatever c held (NaN included).
template <class S>
__global__ void scale_kernel(MatrixView<S> c, S beta) {
  const Index count = c.rows * c.cols;
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index e = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += step) {
    S& x = c.data[(e / c.cols) * c.stride + e % c.cols];
    x = beta == S(0) ? S(0) : mul_rn(beta, x);
  }
}

template <class S>
void scale(const Context& ctx, MatrixView<S> c, S beta) {
  const Index count = c.rows * c.cols;
  if (count == 0 || beta == S(1)) return;
  const auto blocks =
      static_cast<unsigned>(std::min<Index>((count + kScaleThreads - 1) / kScaleThreads, Index{1} << 16));
  scale_kernel<S><<<blocks, kScaleThreads, 0, ctx.stream()>>>(c, beta);
  MOE_CUDA_CHECK_LAUNCH();
}

// ---- grouped kernels --------------------------------------------------------------------------

// Output tiles of kTile x kTile elements, reduced in slices of kDepth; kThreads threads as a
// 16 x 16 grid, each owning a 4 x 4 micro-tile strided by 16 (rows ty + 16 i, cols tx + 16 j), so
// shared-memory reads are broadcasts or consecutive and global stores are coalesced.
inline constexpr int kTile = 64;
inline constexpr int kDepth = 16;
inline constexpr int kThreads = 256;
inline constexpr int kSide = 16;
inline constexpr int kMicro = kTile / kSide;
static_assert(kSide * kSide == kThreads && kMicro * kSide == kTile);

// The largest grid.y (and grid.z) CUDA accepts.
inline constexpr Index kMaxGridY = 65535;

// acc(i, j) += sum over kk < depth of as[kk][i] * bs[kk][j], kk ascending, one rounding per step.
template <class Acc>
__device__ __forceinline__ void multiply_tile(const Acc (&as)[kDepth][kTile + 1], const Acc (&bs)[kDepth][kTile + 1],
                                              int depth, int tx, int ty, Acc (&acc)[kMicro][kMicro]) {
  auto step = [&](int kk) {
    Acc av[kMicro];
    Acc bv[kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) av[i] = as[kk][ty + kSide * i];
#pragma unroll
    for (int j = 0; j < kMicro; ++j) bv[j] = bs[kk][tx + kSide * j];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = fma_rn(av[i], bv[j], acc[i][j]);
  };
  if (depth == kDepth) {
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) step(kk);
  } else {
    for (int kk = 0; kk < depth; ++kk) step(kk);
  }
}

// An operand as the tile multiply sees it: rounded to bfloat16 or TF32 for Precision::bf16 or
// Precision::tf32 (float data only), as is for Precision::fp32.
template <Precision P, class Acc, class T>
__device__ __forceinline__ Acc operand(T v) {
  if constexpr (P == Precision::bf16)
    return static_cast<Acc>(::moe::round_to_bf16(static_cast<float>(v)));
  else if constexpr (P == Precision::tf32)
    return static_cast<Acc>(::moe::round_to_tf32(static_cast<float>(v)));
  else
    return static_cast<Acc>(v);
}

// c rows of group g = a rows of group g * op(w_g). grid.x: row tiles (an upper bound on their
// number; blocks past the last exit), grid.y: column tiles, strided when there are more than
// grid.y of them.
template <class T, class Acc, Precision P>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_kernel(const Index* __restrict__ offsets, Index groups, bool transpose_w, ConstMatrixView<T> a,
                        ConstMatrixView<T> w, Index wr, MatrixView<T> c, Index k, Index n) {
  __shared__ Acc as[kDepth][kTile + 1];  // as[kk][i] = a(row0 + i, k0 + kk)
  __shared__ Acc bs[kDepth][kTile + 1];  // bs[kk][j] = op(w_g)(k0 + kk, col0 + j)
  Index row0 = 0;
  Index row_end = 0;
  Index group = 0;
  if (!locate_row_tile<kThreads, kTile>(offsets, groups, a.rows, static_cast<Index>(blockIdx.x), row0, row_end,
                                        group))
    return;
  const int m = static_cast<int>(min(Index{kTile}, row_end - row0));
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide;
  const int ty = tid / kSide;
  const T* wg = w.data + group * wr * w.stride;
  const Index col_tiles = (n + kTile - 1) / kTile;
  for (Index ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
    const Index col0 = ct * kTile;
    const int nt = static_cast<int>(min(Index{kTile}, n - col0));
    Acc acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = Acc(0);
    for (Index k0 = 0; k0 < k; k0 += kDepth) {
      const int depth = static_cast<int>(min(Index{kDepth}, k - k0));
      for (int e = tid; e < kTile * kDepth; e += kThreads) {
        const int i = e / kDepth;
        const int kk = e % kDepth;
        as[kk][i] = i < m && kk < depth ? operand<P, Acc>(a.data[(row0 + i) * a.stride + k0 + kk]) : Acc(0);
      }
      if (!transpose_w) {  // op(w_g)(kk, j) = w_g(kk, j): consecutive threads walk j
        for (int e = tid; e < kTile * kDepth; e += kThreads) {
          const int kk = e / kTile;
          const int j = e % kTile;
          bs[kk][j] = kk < depth && j < nt ? operand<P, Acc>(wg[(k0 + kk) * w.stride + col0 + j]) : Acc(0);
        }
      } else {  // op(w_g)(kk, j) = w_g(j, kk): consecutive threads walk kk
        for (int e = tid; e < kTile * kDepth; e += kThreads) {
          const int j = e / kDepth;
          const int kk = e % kDepth;
          bs[kk][j] = kk < depth && j < nt ? operand<P, Acc>(wg[(col0 + j) * w.stride + k0 + kk]) : Acc(0);
        }
      }
      __syncthreads();
      multiply_tile(as, bs, depth, tx, ty, acc);
      __syncthreads();  // before the next slice overwrites as / bs
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int r = ty + kSide * i;
      if (r >= m) continue;
      T* out = c.data + (row0 + r) * c.stride + col0;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int col = tx + kSide * j;
        if (col < nt) out[col] = static_cast<T>(acc[i][j]);
      }
    }
  }
}

// w_g = beta * w_g + a_g^T b_g. A 1-D grid strides over the (group, row tile of w_g, column
// tile of w_g) triples; each block reduces over its group's rows in order, kDepth at a time.
template <class T, class Acc, Precision P>
__global__ void __launch_bounds__(kThreads)
    grouped_wgrad_kernel(const Index* __restrict__ offsets, Index groups, ConstMatrixView<T> a, ConstMatrixView<T> b,
                         Acc beta, MatrixView<T> w, Index row_tiles, Index col_tiles) {
  __shared__ Acc as[kDepth][kTile + 1];  // as[kk][i] = a(r0 + kk, i0 + i)
  __shared__ Acc bs[kDepth][kTile + 1];  // bs[kk][j] = b(r0 + kk, j0 + j)
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kSide;
  const int ty = tid / kSide;
  const Index per_group = row_tiles * col_tiles;
  const Index total = groups * per_group;
  for (Index t = blockIdx.x; t < total; t += gridDim.x) {
    const Index g = t / per_group;
    const Index i0 = (t % per_group) / col_tiles * kTile;
    const Index j0 = (t % per_group) % col_tiles * kTile;
    const int mi = static_cast<int>(min(Index{kTile}, a.cols - i0));
    const int nj = static_cast<int>(min(Index{kTile}, b.cols - j0));
    Index begin = 0;
    Index end = 0;
    group_rows(offsets, g, a.rows, begin, end);
    // As on the CPU, an empty group's block is beta * w_g with no product added: beta 1 leaves it
    // as it is (not read, not written), another beta scales it (-0 stays -0); beta 0 writes the
    // zero product below. The branch is the same for the whole block.
    if (begin == end && beta != Acc(0)) {
      if (beta != Acc(1))
        for (int e = tid; e < mi * nj; e += kThreads) {
          T* p = w.data + (g * a.cols + i0 + e / nj) * w.stride + j0 + e % nj;
          *p = static_cast<T>(mul_rn(beta, static_cast<Acc>(*p)));
        }
      continue;
    }
    Acc acc[kMicro][kMicro];
#pragma unroll
    for (int i = 0; i < kMicro; ++i)
#pragma unroll
      for (int j = 0; j < kMicro; ++j) acc[i][j] = Acc(0);
    for (Index r0 = begin; r0 < end; r0 += kDepth) {
      const int depth = static_cast<int>(min(Index{kDepth}, end - r0));
      for (int e = tid; e < kTile * kDepth; e += kThreads) {
        const int kk = e / kTile;
        const int i = e % kTile;
        as[kk][i] = kk < depth && i < mi ? operand<P, Acc>(a.data[(r0 + kk) * a.stride + i0 + i]) : Acc(0);
        bs[kk][i] = kk < depth && i < nj ? operand<P, Acc>(b.data[(r0 + kk) * b.stride + j0 + i]) : Acc(0);
      }
      __syncthreads();
      multiply_tile(as, bs, depth, tx, ty, acc);
      __syncthreads();  // before the next slice (or tile) overwrites as / bs
    }
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int r = ty + kSide * i;
      if (r >= mi) continue;
      T* out = w.data + (g * a.cols + i0 + r) * w.stride + j0;
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int col = tx + kSide * j;
        if (col >= nj) continue;
        // As on the CPU: beta 0 overwrites (NaN included); otherwise (beta * w) + product, each
        // rounded (beta 1 adds exactly).
        const Acc product = acc[i][j];
        out[col] = static_cast<T>(beta == Acc(0) ? product : add_rn(mul_rn(beta, static_cast<Acc>(out[col])), product));
      }
    }
  }
}

}  // namespace detail

// c = alpha * op(a) * op(b) + beta * c on ctx.stream() (cuBLAS, true fp32 / fp64). Views are
// row-major device memory. m or n == 0: nothing; inner dimension 0: c = beta * c (beta 0 writes
// zeros even over NaN). Unlike the CPU version, alpha == 0 may skip reading a and b (cuBLAS), and
// views over several rows whose stride is below their column count are refused.
template <class S>
void gemm(const Context& ctx, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta,
          MatrixView<S> c) {
  static_assert(detail::GemmScalar<S>, "moe::backend::cuda::gemm supports float and double");
  const Index m = ta == Op::none ? a.rows : a.cols;
  const Index ka = ta == Op::none ? a.cols : a.rows;
  const Index kb = tb == Op::none ? b.rows : b.cols;
  const Index n = tb == Op::none ? b.cols : b.rows;
  ::moe::detail::require(ka == kb && c.rows == m && c.cols == n, "gemm: shapes do not agree: op(a) is ", m, " x ", ka,
                         ", op(b) is ", kb, " x ", n, ", c is ", c.rows, " x ", c.cols);
  if (m == 0 || n == 0) return;
  if (ka == 0) {
    detail::scale(ctx, c, beta);
    return;
  }
  // Row-major c (m x n) is column-major c^T (n x m): c^T = alpha * op(b)^T * op(a)^T + beta * c^T,
  // and a row-major operand is already its transpose in column-major terms, so b goes first
  // with b's own op, then a with a's.
  const std::int64_t lda = detail::leading_dim(a, "a");
  const std::int64_t ldb = detail::leading_dim(b, "b");
  const std::int64_t ldc = detail::leading_dim(c, "c");
  detail::blas_gemm(ctx.blas(), detail::blas_op(tb), detail::blas_op(ta), n, m, ka, &alpha, b.data, ldb, a.data, lda,
                    &beta, c.data, ldc);
}

namespace detail {

struct GroupedShape {
  Index wr, k, n;  // rows of each w_g, the reduction, the output columns
};

// The shape of grouped_gemm's c_g = a_g op(w_g), checked as cpu::grouped_gemm checks it (but the
// offsets, which stay on the device).
template <class A, class W, class C>
GroupedShape grouped_shape(Index groups, Op tw, MatrixView<A> a, MatrixView<W> w, MatrixView<C> c) {
  ::moe::detail::require(groups > 0 && w.rows % groups == 0, "grouped_gemm: ", w.rows,
                         " stacked weight rows do not split into ", groups, " groups");
  const Index wr = w.rows / groups;
  const Index k = tw == Op::none ? wr : w.cols;
  const Index n = tw == Op::none ? w.cols : wr;
  ::moe::detail::require(a.cols == k && c.cols == n && a.rows == c.rows, "grouped_gemm: shapes do not agree: a is ",
                         a.rows, " x ", a.cols, ", each op(w_g) is ", k, " x ", n, ", c is ", c.rows, " x ", c.cols);
  return {wr, k, n};
}

// grouped_gemm_wgrad's w_g = beta w_g + a_g^T b_g, checked likewise.
template <class A, class B2, class W>
void require_wgrad_shape(Index groups, MatrixView<A> a, MatrixView<B2> b, MatrixView<W> w) {
  ::moe::detail::require(groups > 0 && w.rows == groups * a.cols && w.cols == b.cols && a.rows == b.rows,
                         "grouped_gemm_wgrad: shapes do not agree: a is ", a.rows, " x ", a.cols, ", b is ", b.rows,
                         " x ", b.cols, ", w is ", w.rows, " x ", w.cols, " for ", groups, " groups");
}

// precision, refused unless it is Precision::fp32 or the data is float.
template <class S>
void check_precision(Precision precision, const char* who) {
  ::moe::detail::require(precision == Precision::fp32 || std::is_same_v<S, float>, who, ": Precision::",
                         to_string(precision), " needs float data, got ", sizeof(S) * 8, "-bit floating point");
}

// The exact kernels (CUDA cores), their operands rounded as `precision` rounds them: the fp32 and
// fp64 path, the bf16 / tf32 path where tensor cores are not available, and the reference the
// tensor-core kernels are tested against. Arguments as grouped_gemm's, already checked; wr, k, n
// as it derives them.
template <class S>
void grouped_gemm_exact(const Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<S> a,
                        ConstMatrixView<S> w, MatrixView<S> c, Precision precision) {
  const Index wr = w.rows / groups;
  const Index k = tw == Op::none ? wr : w.cols;
  const Index n = tw == Op::none ? w.cols : wr;
  if (c.rows == 0 || n == 0) return;
  // sum over g of ceil(rows_g / kTile) <= ceil(a.rows / kTile) + groups.
  const Index row_blocks = (a.rows + kTile - 1) / kTile + groups;
  ::moe::detail::require(row_blocks <= INT_MAX, "grouped_gemm: ", a.rows, " rows in ", groups,
                         " groups need more thread blocks than one launch allows");
  const Index col_tiles = (n + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(std::min(col_tiles, kMaxGridY)));
  using Acc = typename Accumulator<S>::type;
  const bool tw_t = tw == Op::transpose;
  if constexpr (std::is_same_v<S, float>) {
    if (precision == Precision::bf16) {
      grouped_gemm_kernel<S, Acc, Precision::bf16>
          <<<grid, kThreads, 0, ctx.stream()>>>(offsets, groups, tw_t, a, w, wr, c, k, n);
      MOE_CUDA_CHECK_LAUNCH();
      return;
    }
    if (precision == Precision::tf32) {
      grouped_gemm_kernel<S, Acc, Precision::tf32>
          <<<grid, kThreads, 0, ctx.stream()>>>(offsets, groups, tw_t, a, w, wr, c, k, n);
      MOE_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  check_precision<S>(precision, "grouped_gemm");
  grouped_gemm_kernel<S, Acc, Precision::fp32>
      <<<grid, kThreads, 0, ctx.stream()>>>(offsets, groups, tw_t, a, w, wr, c, k, n);
  MOE_CUDA_CHECK_LAUNCH();
}

// The exact weight-gradient kernel, as grouped_gemm_exact. Arguments as grouped_gemm_wgrad's,
// already checked.
template <class S>
void grouped_gemm_wgrad_exact(const Context& ctx, const Index* offsets, Index groups, ConstMatrixView<S> a,
                              ConstMatrixView<S> b, S beta, MatrixView<S> w, Precision precision) {
  if (w.rows == 0 || w.cols == 0) return;
  const Index row_tiles = (a.cols + kTile - 1) / kTile;
  const Index col_tiles = (b.cols + kTile - 1) / kTile;
  const Index tiles = groups * row_tiles * col_tiles;
  const auto blocks = static_cast<unsigned>(std::min<Index>(tiles, INT_MAX));
  using Acc = typename Accumulator<S>::type;
  if constexpr (std::is_same_v<S, float>) {
    if (precision == Precision::bf16) {
      grouped_wgrad_kernel<S, Acc, Precision::bf16><<<blocks, kThreads, 0, ctx.stream()>>>(
          offsets, groups, a, b, static_cast<Acc>(beta), w, row_tiles, col_tiles);
      MOE_CUDA_CHECK_LAUNCH();
      return;
    }
    if (precision == Precision::tf32) {
      grouped_wgrad_kernel<S, Acc, Precision::tf32><<<blocks, kThreads, 0, ctx.stream()>>>(
          offsets, groups, a, b, static_cast<Acc>(beta), w, row_tiles, col_tiles);
      MOE_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  check_precision<S>(precision, "grouped_gemm_wgrad");
  grouped_wgrad_kernel<S, Acc, Precision::fp32><<<blocks, kThreads, 0, ctx.stream()>>>(
      offsets, groups, a, b, static_cast<Acc>(beta), w, row_tiles, col_tiles);
  MOE_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

// For each group g with rows [offsets[g], offsets[g+1]) of a and c:
//   c_g = a_g * op(w_g), where w stacks the groups' matrices along its rows (groups * wr x w.cols).
// offsets (groups + 1 entries) lives in device memory and is read only by the kernel: the host
// never waits. So, unlike cpu::grouped_gemm, offsets[groups] == a.rows is not checked (the kernel
// clamps every group's rows into [0, a.rows)); the other shape checks are the CPU's. One launch.
// Precision::fp32: the exact kernel (fp32 or fp64 fused multiply-adds in a fixed order).
// Precision::bf16 / Precision::tf32 (float data only): the operands rounded to bfloat16 / TF32,
// products accumulated in fp32, on tensor cores where tensor_core_gemm_available(); the result
// differs from the CPU backend's emulation only in the order and rounding of the fp32 sums.
template <class S>
void grouped_gemm(const Context& ctx, const Index* offsets, Index groups, Op tw, ConstMatrixView<S> a,
                  ConstMatrixView<S> w, MatrixView<S> c, Precision precision = Precision::fp32) {
  static_assert(detail::GemmScalar<S>, "moe::backend::cuda::grouped_gemm supports float and double");
  const auto [wr, k, n] = detail::grouped_shape(groups, tw, a, w, c);
  detail::check_precision<S>(precision, "grouped_gemm");
  if (c.rows == 0 || n == 0) return;
  if constexpr (std::is_same_v<S, float>) {
    if (precision != Precision::fp32 && tensor_core_gemm_available()) {
      const bool bf16 = precision == Precision::bf16;
      if (tw == Op::none) {
        (bf16 ? detail::tc_launch_grouped_gemm<Precision::bf16, false, float, float>
              : detail::tc_launch_grouped_gemm<Precision::tf32, false, float, float>)(ctx, offsets, groups, a, w, wr, c, k, n);
      } else {
        (bf16 ? detail::tc_launch_grouped_gemm<Precision::bf16, true, float, float>
              : detail::tc_launch_grouped_gemm<Precision::tf32, true, float, float>)(ctx, offsets, groups, a, w, wr, c, k, n);
      }
      return;
    }
  }
  detail::grouped_gemm_exact(ctx, offsets, groups, tw, a, w, c, precision);
}

// For each group g: w_g = beta * w_g + a_g^T * b_g over the group's rows of a and b (w is
// groups * a.cols x b.cols). beta 0 overwrites (NaN included), beta 1 adds; an empty group gets
// beta * w_g with no product added, as on the CPU: zeros for beta 0, untouched for beta 1.
// offsets is device memory, read only by the kernel: offsets[groups] == a.rows is not checked
// (rows are clamped into [0, a.rows)); the other checks are cpu::grouped_gemm_wgrad's.
// One launch; each output element is reduced over its group's rows in order by one thread (one
// warp on tensor cores). Precisions as grouped_gemm's.
template <class S>
void grouped_gemm_wgrad(const Context& ctx, const Index* offsets, Index groups, ConstMatrixView<S> a,
                        ConstMatrixView<S> b, S beta, MatrixView<S> w, Precision precision = Precision::fp32) {
  static_assert(detail::GemmScalar<S>, "moe::backend::cuda::grouped_gemm_wgrad supports float and double");
  detail::require_wgrad_shape(groups, a, b, w);
  detail::check_precision<S>(precision, "grouped_gemm_wgrad");
  if (w.rows == 0 || w.cols == 0) return;
  if constexpr (std::is_same_v<S, float>) {
    if (precision != Precision::fp32 && tensor_core_gemm_available()) {
      (precision == Precision::bf16 ? detail::tc_launch_grouped_wgrad<Precision::bf16, float, float>
                                    : detail::tc_launch_grouped_wgrad<Precision::tf32, float, float>)(ctx, offsets, groups, a, b,
                                                                                         beta, w);
      return;
    }
  }
  detail::grouped_gemm_wgrad_exact(ctx, offsets, groups, a, b, beta, w, precision);
}

namespace detail {

template <class T>  // BFloat16 (a template: defined in every translation unit that uses it)
__global__ void widen_kernel(ConstMatrixView<T> src, float* __restrict__ dst) {
  const Index count = src.rows * src.cols;
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index e = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += step)
    dst[e] = to_float(src(e / src.cols, e % src.cols));
}

// A contiguous fp32 copy of a BFloat16 matrix (exact), for the exact kernels.
inline DeviceMatrix<float> widened(const Context& ctx, ConstMatrixView<BFloat16> m) {
  DeviceMatrix<float> out;
  out.resize(m.rows, m.cols);
  const Index count = m.rows * m.cols;
  if (count > 0) {
    widen_kernel<BFloat16><<<grid_stride_blocks(count), kFillThreads, 0, ctx.stream()>>>(m, out.data());
    MOE_CUDA_CHECK_LAUNCH();
  }
  return out;
}

inline void require_bf16(Precision precision, const char* who) {
  ::moe::detail::require(precision == Precision::bf16, who,
                         ": BFloat16 operands are multiplied as Precision::bf16, got Precision::", to_string(precision));
}

}  // namespace detail

// grouped_gemm on operands stored as BFloat16 (precision must be Precision::bf16, c is fp32):
// the tensor-core kernel reads them as they are, half the bytes of fp32 operands; the results
// are those of the fp32 overload on the same values. Without tensor cores the operands are
// widened into temporary fp32 copies for the exact kernel (freeing them waits for the device).
template <class S, BFloat16View A, BFloat16View W>
void grouped_gemm(const Context& ctx, const Index* offsets, Index groups, Op tw, A a_view, W w_view, MatrixView<S> c,
                  Precision precision) {
  const ConstMatrixView<BFloat16> a = a_view, w = w_view;
  static_assert(std::is_same_v<S, float>, "moe::backend::cuda::grouped_gemm: BFloat16 operands give a float result");
  detail::require_bf16(precision, "grouped_gemm");
  const auto [wr, k, n] = detail::grouped_shape(groups, tw, a, w, c);
  if (c.rows == 0 || n == 0) return;
  if (tensor_core_gemm_available()) {
    if (tw == Op::none)
      detail::tc_launch_grouped_gemm<Precision::bf16, false>(ctx, offsets, groups, a, w, wr, c, k, n);
    else
      detail::tc_launch_grouped_gemm<Precision::bf16, true>(ctx, offsets, groups, a, w, wr, c, k, n);
    return;
  }
  const DeviceMatrix<float> aw = detail::widened(ctx, a), ww = detail::widened(ctx, w);
  detail::grouped_gemm_exact<float>(ctx, offsets, groups, tw, aw.view(), ww.view(), c, Precision::bf16);
}

// grouped_gemm_wgrad on operands stored as BFloat16, as grouped_gemm above.
template <class S, BFloat16View A, BFloat16View B>
void grouped_gemm_wgrad(const Context& ctx, const Index* offsets, Index groups, A a_view, B b_view, S beta,
                        MatrixView<S> w, Precision precision) {
  const ConstMatrixView<BFloat16> a = a_view, b = b_view;
  static_assert(std::is_same_v<S, float>, "moe::backend::cuda::grouped_gemm_wgrad: BFloat16 operands give a float result");
  detail::require_bf16(precision, "grouped_gemm_wgrad");
  detail::require_wgrad_shape(groups, a, b, w);
  if (w.rows == 0 || w.cols == 0) return;
  if (tensor_core_gemm_available()) {
    detail::tc_launch_grouped_wgrad<Precision::bf16>(ctx, offsets, groups, a, b, beta, w);
    return;
  }
  const DeviceMatrix<float> aw = detail::widened(ctx, a), bw = detail::widened(ctx, b);
  detail::grouped_gemm_wgrad_exact<float>(ctx, offsets, groups, aw.view(), bw.view(), beta, w, Precision::bf16);
}

}  // namespace moe::backend::cuda
