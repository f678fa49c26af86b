#pragma once
// The grouped GEMMs on tensor cores, for Precision::bf16 and Precision::tf32 on float data
// (sm_80 and newer), and the row-tile scheduling they share with the exact kernels of
// moe/backend/cuda/gemm.hpp (which includes this header and chooses between the two).
//
// Design (both kernels):
//  - a block of kTcThreads = 256 threads (8 warps) owns a kTcRows x kTcCols = 128 x 128 output
//    tile; the warps form a 2 x 4 grid, each owning a 64 x 32 sub-tile held as 4 x 2 WMMA
//    accumulator fragments (16 x 16, fp32);
//  - the reduction runs in slices of kTcDepth = 32: each slice of both operands is read from
//    global memory as fp32 (16-byte loads where the view's pointer and stride allow, scalar
//    loads otherwise and at ragged edges, zeros outside the matrices), rounded once to bf16 or
//    TF32 (moe::round_to_bf16 / moe::round_to_tf32, the functions the CPU backend emulates
//    with) and stored into shared memory; operands already stored as BFloat16 are read as
//    they are (8-byte loads: half the bytes) and stored unchanged; rows are padded by 16 bytes
//    against bank conflicts;
//  - two shared-memory stages, prefetched through registers: the loads of slice s + 1 are in
//    flight while the warps multiply slice s (bf16: m16n16k16 fragments, TF32: m16n16k8), then
//    the registers go into the other stage; one barrier per slice;
//  - the accumulators go through shared memory (reusing the stages) so the block writes its
//    tile to global memory row by row, coalesced, within bounds only.
// Each output element is reduced by one warp, its slices in order and its fragments' k steps
// in order: the same bits run after run (no split-K, no atomics).
//
// grouped_gemm: blocks map to (row tile of a group, column tile), the groups' row offsets read
// on the device (locate_row_tile). grouped_gemm_wgrad: blocks map to (group, row tile of w_g,
// column tile of w_g) and reduce over the group's rows, the K dimension, 32 rows at a time.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/tensor_core_gemm.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/error.hpp"
#include "moe/precision.hpp"
#include "moe/view.hpp"

namespace moe::backend::cuda {

namespace detail {

// ---- row tiles of the groups ------------------------------------------------------------------

// Rows [begin, end) of group g, clamped into [0, limit): malformed offsets can make results
// wrong but never make a kernel touch memory outside the views.
__device__ __forceinline__ void group_rows(const Index* __restrict__ offsets, Index g, Index limit, Index& begin,
                                           Index& end) {
  begin = min(max(offsets[g], Index{0}), limit);
  end = min(max(offsets[g + 1], begin), limit);
}

// Row tiles are numbered group by group, ceil(rows_g / RowTile) of them per group. Finds the
// group of row tile `tile` and that tile's rows [row_begin, row_end), reading offsets on the
// device (a block-wide scan over the groups, Threads at a time). False when tile is past the last
// one. Must be called by all Threads threads of the block; the result is the same in every thread.
template <int Threads, int RowTile>
__device__ inline bool locate_row_tile(const Index* __restrict__ offsets, Index groups, Index limit, Index tile,
                                       Index& row_begin, Index& row_end, Index& group) {
  using Scan = cub::BlockScan<Index, Threads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ Index found[3];  // group, first row of the tile, end of the group's rows
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) found[0] = -1;
  __syncthreads();
  Index before = 0;  // tiles of the groups already scanned
  for (Index g0 = 0; g0 < groups; g0 += Threads) {
    const Index g = g0 + tid;
    Index begin = 0;
    Index end = 0;
    if (g < groups) group_rows(offsets, g, limit, begin, end);
    const Index tiles = (end - begin + RowTile - 1) / RowTile;
    Index prefix = 0;
    Index total = 0;
    Scan(scan_storage).ExclusiveSum(tiles, prefix, total);
    const Index first = before + prefix;
    if (tile >= first && tile < first + tiles) {
      found[0] = g;
      found[1] = begin + (tile - first) * RowTile;
      found[2] = end;
    }
    before += total;
    __syncthreads();  // publishes found[] and frees scan_storage for the next round
    if (found[0] >= 0) break;
  }
  group = found[0];
  row_begin = found[1];
  row_end = found[2];
  return group >= 0;
}

// ---- tensor-core tiles ------------------------------------------------------------------------

inline constexpr int kTcRows = 128;    // output rows per block
inline constexpr int kTcCols = 128;    // output columns per block
inline constexpr int kTcDepth = 32;    // reduction slice
inline constexpr int kTcThreads = 256;  // 8 warps
inline constexpr int kTcWarpRows = 64;  // each warp's sub-tile
inline constexpr int kTcWarpCols = 32;
inline constexpr int kTcFragRows = kTcWarpRows / 16;  // accumulator fragments per warp
inline constexpr int kTcFragCols = kTcWarpCols / 16;
// Chunks of 4 consecutive elements each thread stages per operand tile (both are 4096 elements).
inline constexpr int kTcChunks = kTcRows * kTcDepth / 4 / kTcThreads;
static_assert((kTcRows / kTcWarpRows) * (kTcCols / kTcWarpCols) * 32 == kTcThreads);
static_assert(kTcCols * kTcDepth / 4 / kTcThreads == kTcChunks && kTcChunks * 4 * kTcThreads == kTcRows * kTcDepth);

// Whether the tile loads and stores of a view may access whole chunks of 4 elements at once
// (16 bytes of fp32, 8 of bfloat16): its pointer is aligned to a chunk and its stride a multiple
// of 4 elements (tiles start at multiples of 4 columns).
template <class T>
[[nodiscard]] bool vectorizable(const T* data, Index stride) {
  return reinterpret_cast<std::uintptr_t>(data) % (4 * sizeof(T)) == 0 && stride % 4 == 0;
}

// Four consecutive operand elements as a thread holds them between the global load and the
// shared-memory store: fp32 values (rounded when stored), or bfloat16 bits (stored as they are).
template <class T>
using TcChunk = std::conditional_t<std::is_same_v<T, BFloat16>, uint2, float4>;

struct TcVector {
  bool a = false;    // the first operand (a)
  bool b = false;    // the second operand (w, or b of wgrad)
  bool out = false;  // the output (c, or w of wgrad)
};

// The shared-memory layout of one kernel. The A operand (output rows x reduction) is staged as
// stored in global memory: rows x k (AKMajor false: grouped_gemm's a) or k x rows (true: wgrad's
// a, whose rows are the reduction); B (reduction x output columns) as k x cols (BNMajor false)
// or cols x k (true: grouped_gemm's w with Op::transpose). Two stages of both, then the fp32
// output tile reuses the same bytes.
template <Precision P, bool AKMajor, bool BNMajor>
struct TcLayout {
  static_assert(P == Precision::bf16 || P == Precision::tf32);
  using Element = std::conditional_t<P == Precision::bf16, __nv_bfloat16, float>;
  static constexpr int kStep = P == Precision::bf16 ? 16 : 8;  // k of one fragment
  static constexpr int kPad = 16 / static_cast<int>(sizeof(Element));
  static constexpr int kARows = AKMajor ? kTcDepth : kTcRows;
  static constexpr int kACols = AKMajor ? kTcRows : kTcDepth;
  static constexpr int kBRows = BNMajor ? kTcCols : kTcDepth;
  static constexpr int kBCols = BNMajor ? kTcDepth : kTcCols;
  static constexpr int kALd = kACols + kPad;
  static constexpr int kBLd = kBCols + kPad;
  static constexpr int kABytes = kARows * kALd * static_cast<int>(sizeof(Element));
  static constexpr int kBBytes = kBRows * kBLd * static_cast<int>(sizeof(Element));
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kOutLd = kTcCols + 4;
  static constexpr int kOutBytes = kTcRows * kOutLd * static_cast<int>(sizeof(float));
  static constexpr int kSharedBytes = std::max(2 * kStageBytes, kOutBytes);
  // WMMA loads and stores need 32-byte aligned fragment pointers: every offset below is one.
  static_assert(kABytes % 32 == 0 && kBBytes % 32 == 0);
  static_assert((16 * kALd * sizeof(Element)) % 32 == 0 && (16 * kBLd * sizeof(Element)) % 32 == 0);
  static_assert((kStep * kALd * sizeof(Element)) % 32 == 0 && (kStep * kBLd * sizeof(Element)) % 32 == 0);
  static_assert((kStep * sizeof(Element)) % 32 == 0 && (16 * kOutLd * sizeof(float)) % 32 == 0);

  __device__ static Element* a(unsigned char* shared, int stage) {
    return reinterpret_cast<Element*>(shared + stage * kStageBytes);
  }
  __device__ static Element* b(unsigned char* shared, int stage) {
    return reinterpret_cast<Element*>(shared + stage * kStageBytes + kABytes);
  }
  __device__ static float* out(unsigned char* shared) { return reinterpret_cast<float*>(shared); }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

// Element j (0..3) of a bfloat16 chunk set to the bits of x.
__device__ __forceinline__ void set_half(uint2& v, int j, std::uint16_t x) {
  std::uint32_t& word = j < 2 ? v.x : v.y;
  word = (j % 2 == 0) ? ((word & 0xFFFF0000u) | x) : ((word & 0x0000FFFFu) | (std::uint32_t{x} << 16));
}

// This thread's kTcChunks chunks of an R x C tile (C consecutive elements per row): chunk i of
// thread tid covers row tid / (C / 4) + i * (kTcThreads / (C / 4)), columns 4 (tid % (C / 4))
// + 0..3, so a warp reads whole rows (coalesced). Read from the row-major matrix at src (fp32 or
// BFloat16) with the given stride: elements at rows >= rows or columns >= cols read as 0 and are
// never touched. vec: one load per whole chunk (vectorizable(src, stride)).
template <int R, int C, class T>
__device__ __forceinline__ void load_chunks(TcChunk<T> (&v)[kTcChunks], const T* __restrict__ src, Index stride,
                                            int rows, int cols, bool vec, int tid) {
  constexpr int kPerRow = C / 4;
  constexpr int kRowStep = kTcThreads / kPerRow;
  static_assert(C % 4 == 0 && kTcThreads % kPerRow == 0 && kRowStep * kTcChunks == R);
  const int r0 = tid / kPerRow;
  const int c = (tid % kPerRow) * 4;
#pragma unroll
  for (int i = 0; i < kTcChunks; ++i) {
    const int r = r0 + i * kRowStep;
    TcChunk<T> x{};  // zeros (0.0f, or the bits of bfloat16 +0)
    if (r < rows && c < cols) {
      const T* p = src + static_cast<Index>(r) * stride + c;
      if (vec && c + 4 <= cols) {
        x = *reinterpret_cast<const TcChunk<T>*>(p);
      } else if constexpr (std::is_same_v<T, BFloat16>) {
        for (int j = 0; j < 4 && c + j < cols; ++j) set_half(x, j, p[j].bits);
      } else {
        x.x = p[0];
        if (c + 1 < cols) x.y = p[1];
        if (c + 2 < cols) x.z = p[2];
        if (c + 3 < cols) x.w = p[3];
      }
    }
    v[i] = x;
  }
}

// Rounds the chunks once to the operand precision and stores them into the shared tile
// (leading dimension Ld elements), at the places load_chunks read them from. bf16: the
// hardware's round-to-nearest-even conversion, the value of moe::round_to_bf16 for every input
// (a NaN stays a NaN, its payload aside); tf32: moe::round_to_tf32 (the hardware's
// cvt.rna.tf32.f32 rounds ties away from zero). Chunks of bfloat16 bits are stored as they are.
template <Precision P, int C, int Ld, class Element, class Chunk>
__device__ __forceinline__ void store_chunks(Element* tile, const Chunk (&v)[kTcChunks], int tid) {
  constexpr int kPerRow = C / 4;
  constexpr int kRowStep = kTcThreads / kPerRow;
  const int r0 = tid / kPerRow;
  const int c = (tid % kPerRow) * 4;
#pragma unroll
  for (int i = 0; i < kTcChunks; ++i) {
    Element* dst = tile + (r0 + i * kRowStep) * Ld + c;
    if constexpr (std::is_same_v<Chunk, uint2>) {
      static_assert(P == Precision::bf16, "bfloat16 operands are multiplied as Precision::bf16");
      *reinterpret_cast<uint2*>(dst) = v[i];
    } else if constexpr (P == Precision::bf16) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(v[i].x, v[i].y);  // .x (column c) at the lower address
      const __nv_bfloat162 hi = __floats2bfloat162_rn(v[i].z, v[i].w);
      uint2 packed;
      static_assert(sizeof(lo) == sizeof(packed.x));
      memcpy(&packed.x, &lo, sizeof lo);
      memcpy(&packed.y, &hi, sizeof hi);
      *reinterpret_cast<uint2*>(dst) = packed;
    } else {
      *reinterpret_cast<float4*>(dst) = make_float4(::moe::round_to_tf32(v[i].x), ::moe::round_to_tf32(v[i].y),
                                                    ::moe::round_to_tf32(v[i].z), ::moe::round_to_tf32(v[i].w));
    }
  }
}

template <Precision P>
using TcFragmentType = std::conditional_t<P == Precision::bf16, __nv_bfloat16, nvcuda::wmma::precision::tf32>;

template <Precision P>
using TcAccumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, TcLayout<P, false, false>::kStep, float>;

// acc += this warp's part of one slice: for each k step in order, its 4 x 2 fragments.
template <Precision P, bool AKMajor, bool BNMajor>
__device__ __forceinline__ void multiply_slice(const typename TcLayout<P, AKMajor, BNMajor>::Element* as,
                                               const typename TcLayout<P, AKMajor, BNMajor>::Element* bs,
                                               int warp_row, int warp_col,
                                               TcAccumulator<P> (&acc)[kTcFragRows][kTcFragCols]) {
  namespace wmma = nvcuda::wmma;
  using L = TcLayout<P, AKMajor, BNMajor>;
  using T = TcFragmentType<P>;
  using ALayout = std::conditional_t<AKMajor, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<BNMajor, wmma::col_major, wmma::row_major>;
  // Two k steps unrolled: all of a bf16 slice; more would make the compiler hoist a TF32 slice's
  // fragment loads past the register file (spills).
#pragma unroll 2
  for (int kk = 0; kk < kTcDepth; kk += L::kStep) {
    wmma::fragment<wmma::matrix_b, 16, 16, L::kStep, T, BLayout> bf[kTcFragCols];
#pragma unroll
    for (int j = 0; j < kTcFragCols; ++j) {
      const int col = warp_col + 16 * j;
      wmma::load_matrix_sync(bf[j], BNMajor ? bs + col * L::kBLd + kk : bs + kk * L::kBLd + col, L::kBLd);
    }
#pragma unroll
    for (int i = 0; i < kTcFragRows; ++i) {
      const int row = warp_row + 16 * i;
      wmma::fragment<wmma::matrix_a, 16, 16, L::kStep, T, ALayout> af;
      wmma::load_matrix_sync(af, AKMajor ? as + kk * L::kALd + row : as + row * L::kALd + kk, L::kALd);
#pragma unroll
      for (int j = 0; j < kTcFragCols; ++j) wmma::mma_sync(acc[i][j], af, bf[j], acc[i][j]);
    }
  }
}

// Writes rows [0, rows) x columns [0, cols) of the block's fp32 output tile (shared memory,
// leading dimension ld) to dst (row stride `stride`): dst = tile, or with Accumulate
// dst = beta * dst + tile (beta 0 overwrites, NaN included; beta 1 adds exactly), each rounded
// as the exact kernels round. vec: 16-byte accesses for whole chunks.
template <bool Accumulate>
__device__ __forceinline__ void write_tile(const float* tile, int ld, float* dst, Index stride, int rows, int cols,
                                           bool vec, float beta, int tid) {
  constexpr int kPerRow = kTcCols / 4;
  for (int e = tid; e < kTcRows * kPerRow; e += kTcThreads) {
    const int r = e / kPerRow;
    const int c = (e % kPerRow) * 4;
    if (r >= rows || c >= cols) continue;
    const float* t = tile + r * ld + c;
    float* p = dst + static_cast<Index>(r) * stride + c;
    if (vec && c + 4 <= cols) {
      float4 x = *reinterpret_cast<const float4*>(t);
      if constexpr (Accumulate) {
        if (beta != 0.0f) {
          const float4 old = *reinterpret_cast<const float4*>(p);
          x = make_float4(__fadd_rn(__fmul_rn(beta, old.x), x.x), __fadd_rn(__fmul_rn(beta, old.y), x.y),
                          __fadd_rn(__fmul_rn(beta, old.z), x.z), __fadd_rn(__fmul_rn(beta, old.w), x.w));
        }
      }
      *reinterpret_cast<float4*>(p) = x;
    } else {
      for (int q = 0; q < 4 && c + q < cols; ++q) {
        if constexpr (Accumulate)
          p[q] = beta == 0.0f ? t[q] : __fadd_rn(__fmul_rn(beta, p[q]), t[q]);
        else
          p[q] = t[q];
      }
    }
  }
}

// Stores the warps' accumulators into the shared output tile (after the last slice's barrier).
template <Precision P>
__device__ __forceinline__ void stage_output(float* tile, int ld, int warp_row, int warp_col,
                                             const TcAccumulator<P> (&acc)[kTcFragRows][kTcFragCols]) {
#pragma unroll
  for (int i = 0; i < kTcFragRows; ++i)
#pragma unroll
    for (int j = 0; j < kTcFragCols; ++j)
      nvcuda::wmma::store_matrix_sync(tile + (warp_row + 16 * i) * ld + warp_col + 16 * j, acc[i][j], ld,
                                      nvcuda::wmma::mem_row_major);
}

#endif  // __CUDA_ARCH__ >= 800

// The double-buffered slice loop of both kernels: slice 0 is loaded and stored into stage 0;
// then, for every slice s, the next slice's global loads are in flight (in registers) while s is
// multiplied out of stage s % 2, and are stored into the other stage, whose last reads came
// before the previous barrier. One barrier per slice.
template <class Load, class Store, class Multiply>
__device__ __forceinline__ void run_slices(Index slices, Load& load, Store& store, Multiply multiply) {
  if (slices > 0) {
    load(0);
    store(0);
    __syncthreads();
  }
  for (Index s = 0; s < slices; ++s) {
    const int stage = static_cast<int>(s & 1);
    if (s + 1 < slices) load(s + 1);
    multiply(stage);
    if (s + 1 < slices) store(stage ^ 1);
    __syncthreads();
  }
}

// c rows of group g = a rows of group g * op(w_g) on tensor cores. grid.x: row tiles of
// kTcRows (an upper bound on their number; blocks past the last exit), grid.y: column tiles,
// strided when there are more than grid.y of them. Dynamic shared memory:
// TcLayout<P, false, TransposeW>::kSharedBytes. TA, TW: float, or BFloat16 with P = bf16.
template <Precision P, bool TransposeW, class TA, class TW>
__global__ void __launch_bounds__(kTcThreads)
    tc_grouped_gemm_kernel(const Index* __restrict__ offsets, Index groups, ConstMatrixView<TA> a,
                           ConstMatrixView<TW> w, Index wr, MatrixView<float> c, Index k, Index n, TcVector vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = TcLayout<P, false, TransposeW>;
  extern __shared__ __align__(128) unsigned char tc_shared[];
  Index row0 = 0;
  Index row_end = 0;
  Index group = 0;
  if (!locate_row_tile<kTcThreads, kTcRows>(offsets, groups, a.rows, static_cast<Index>(blockIdx.x), row0, row_end,
                                            group))
    return;
  const int m = static_cast<int>(min(Index{kTcRows}, row_end - row0));
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int warp_row = (warp / (kTcCols / kTcWarpCols)) * kTcWarpRows;
  const int warp_col = (warp % (kTcCols / kTcWarpCols)) * kTcWarpCols;
  const TA* a_rows = a.data + row0 * a.stride;
  const TW* wg = w.data + group * wr * w.stride;
  const Index col_tiles = (n + kTcCols - 1) / kTcCols;
  const Index slices = (k + kTcDepth - 1) / kTcDepth;
  for (Index ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
    const Index col0 = ct * kTcCols;
    const int nt = static_cast<int>(min(Index{kTcCols}, n - col0));
    TcAccumulator<P> acc[kTcFragRows][kTcFragCols];
#pragma unroll
    for (int i = 0; i < kTcFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kTcFragCols; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    TcChunk<TA> ra[kTcChunks];
    TcChunk<TW> rb[kTcChunks];
    const auto load = [&](Index s) {
      const Index k0 = s * kTcDepth;
      const int depth = static_cast<int>(min(Index{kTcDepth}, k - k0));
      load_chunks<kTcRows, kTcDepth>(ra, a_rows + k0, a.stride, m, depth, vec.a, tid);
      if constexpr (TransposeW)  // op(w_g)(kk, j) = w_g(j, kk): staged as w_g's rows col0 + j
        load_chunks<kTcCols, kTcDepth>(rb, wg + col0 * w.stride + k0, w.stride, nt, depth, vec.b, tid);
      else
        load_chunks<kTcDepth, kTcCols>(rb, wg + k0 * w.stride + col0, w.stride, depth, nt, vec.b, tid);
    };
    const auto store = [&](int stage) {
      store_chunks<P, L::kACols, L::kALd>(L::a(tc_shared, stage), ra, tid);
      store_chunks<P, L::kBCols, L::kBLd>(L::b(tc_shared, stage), rb, tid);
    };
    run_slices(slices, load, store, [&](int stage) {
      multiply_slice<P, false, TransposeW>(L::a(tc_shared, stage), L::b(tc_shared, stage), warp_row, warp_col, acc);
    });
    stage_output<P>(L::out(tc_shared), L::kOutLd, warp_row, warp_col, acc);
    __syncthreads();
    write_tile<false>(L::out(tc_shared), L::kOutLd, c.data + row0 * c.stride + col0, c.stride, m, nt, vec.out, 0.0f,
                      tid);
    __syncthreads();  // before the next column tile's stages overwrite the output tile
  }
#else
  __trap();  // never launched: tensor_core_gemm_available() is false for code built below sm_80
#endif
}

// w_g = beta * w_g + a_g^T b_g on tensor cores. A 1-D grid strides over the (group, row tile of
// w_g, column tile of w_g) triples; each block reduces over its group's rows in order, kTcDepth
// at a time. Dynamic shared memory: TcLayout<P, true, false>::kSharedBytes. TA, TB: float, or
// BFloat16 with P = bf16.
template <Precision P, class TA, class TB>
__global__ void __launch_bounds__(kTcThreads)
    tc_grouped_wgrad_kernel(const Index* __restrict__ offsets, Index groups, ConstMatrixView<TA> a,
                            ConstMatrixView<TB> b, float beta, MatrixView<float> w, Index row_tiles,
                            Index col_tiles, TcVector vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = TcLayout<P, true, false>;
  extern __shared__ __align__(128) unsigned char tc_shared[];
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int warp_row = (warp / (kTcCols / kTcWarpCols)) * kTcWarpRows;
  const int warp_col = (warp % (kTcCols / kTcWarpCols)) * kTcWarpCols;
  const Index per_group = row_tiles * col_tiles;
  const Index total = groups * per_group;
  for (Index t = blockIdx.x; t < total; t += gridDim.x) {
    const Index g = t / per_group;
    const Index i0 = (t % per_group) / col_tiles * kTcRows;
    const Index j0 = (t % per_group) % col_tiles * kTcCols;
    const int mi = static_cast<int>(min(Index{kTcRows}, a.cols - i0));
    const int nj = static_cast<int>(min(Index{kTcCols}, b.cols - j0));
    Index begin = 0;
    Index end = 0;
    group_rows(offsets, g, a.rows, begin, end);
    // An empty group's block is beta * w_g, as in the exact kernel: untouched for beta 1, scaled
    // with no product added for another beta, the zero product written for beta 0 (below).
    if (begin == end && beta != 0.0f) {
      if (beta != 1.0f)
        for (int e = tid; e < mi * nj; e += kTcThreads) {
          float* p = w.data + (g * a.cols + i0 + e / nj) * w.stride + j0 + e % nj;
          *p = __fmul_rn(beta, *p);
        }
      continue;
    }
    const Index slices = (end - begin + kTcDepth - 1) / kTcDepth;
    TcAccumulator<P> acc[kTcFragRows][kTcFragCols];
#pragma unroll
    for (int i = 0; i < kTcFragRows; ++i)
#pragma unroll
      for (int j = 0; j < kTcFragCols; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    TcChunk<TA> ra[kTcChunks];
    TcChunk<TB> rb[kTcChunks];
    const auto load = [&](Index s) {
      const Index r0 = begin + s * kTcDepth;
      const int depth = static_cast<int>(min(Index{kTcDepth}, end - r0));
      load_chunks<kTcDepth, kTcRows>(ra, a.data + r0 * a.stride + i0, a.stride, depth, mi, vec.a, tid);
      load_chunks<kTcDepth, kTcCols>(rb, b.data + r0 * b.stride + j0, b.stride, depth, nj, vec.b, tid);
    };
    const auto store = [&](int stage) {
      store_chunks<P, L::kACols, L::kALd>(L::a(tc_shared, stage), ra, tid);
      store_chunks<P, L::kBCols, L::kBLd>(L::b(tc_shared, stage), rb, tid);
    };
    run_slices(slices, load, store, [&](int stage) {
      multiply_slice<P, true, false>(L::a(tc_shared, stage), L::b(tc_shared, stage), warp_row, warp_col, acc);
    });
    stage_output<P>(L::out(tc_shared), L::kOutLd, warp_row, warp_col, acc);
    __syncthreads();
    write_tile<true>(L::out(tc_shared), L::kOutLd, w.data + (g * a.cols + i0) * w.stride + j0, w.stride, mi, nj,
                     vec.out, beta, tid);
    __syncthreads();  // before the next tile's stages overwrite the output tile
  }
#else
  __trap();  // never launched: tensor_core_gemm_available() is false for code built below sm_80
#endif
}

// Devices whose per-kernel settings are remembered; others are set up on every call.
inline constexpr int kTcCachedDevices = 64;

// Raises a kernel's dynamic shared-memory limit to `bytes` on the current device, once per
// device per kernel (the setting lasts as long as the device's context). `done` is the
// kernel's own record.
template <class Kernel>
void allow_shared_memory(Kernel kernel, int bytes, std::array<std::atomic<bool>, kTcCachedDevices>& done) {
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kTcCachedDevices;
  if (cached && done[static_cast<std::size_t>(device)].load(std::memory_order_acquire)) return;
  MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (cached) done[static_cast<std::size_t>(device)].store(true, std::memory_order_release);
}

// The launches: arguments already checked by the public functions (gemm.hpp), c.rows > 0, n > 0.
template <Precision P, bool TransposeW, class TA, class TW>
void tc_launch_grouped_gemm(const Context& ctx, const Index* offsets, Index groups, ConstMatrixView<TA> a,
                            ConstMatrixView<TW> w, Index wr, MatrixView<float> c, Index k, Index n) {
  using L = TcLayout<P, false, TransposeW>;
  static std::array<std::atomic<bool>, kTcCachedDevices> done{};
  const auto kernel = tc_grouped_gemm_kernel<P, TransposeW, TA, TW>;
  allow_shared_memory(kernel, L::kSharedBytes, done);
  // sum over g of ceil(rows_g / kTcRows) <= ceil(a.rows / kTcRows) + groups.
  const Index row_blocks = (a.rows + kTcRows - 1) / kTcRows + groups;
  ::moe::detail::require(row_blocks <= INT_MAX, "grouped_gemm: ", a.rows, " rows in ", groups,
                         " groups need more thread blocks than one launch allows");
  const Index col_tiles = (n + kTcCols - 1) / kTcCols;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(std::min<Index>(col_tiles, 65535)));
  const TcVector vec{vectorizable(a.data, a.stride), vectorizable(w.data, w.stride), vectorizable(c.data, c.stride)};
  kernel<<<grid, kTcThreads, L::kSharedBytes, ctx.stream()>>>(offsets, groups, a, w, wr, c, k, n, vec);
  MOE_CUDA_CHECK_LAUNCH();
}

template <Precision P, class TA, class TB>
void tc_launch_grouped_wgrad(const Context& ctx, const Index* offsets, Index groups, ConstMatrixView<TA> a,
                             ConstMatrixView<TB> b, float beta, MatrixView<float> w) {
  using L = TcLayout<P, true, false>;
  static std::array<std::atomic<bool>, kTcCachedDevices> done{};
  const auto kernel = tc_grouped_wgrad_kernel<P, TA, TB>;
  allow_shared_memory(kernel, L::kSharedBytes, done);
  const Index row_tiles = (a.cols + kTcRows - 1) / kTcRows;
  const Index col_tiles = (b.cols + kTcCols - 1) / kTcCols;
  const auto blocks = static_cast<unsigned>(std::min<Index>(groups * row_tiles * col_tiles, INT_MAX));
  const TcVector vec{vectorizable(a.data, a.stride), vectorizable(b.data, b.stride), vectorizable(w.data, w.stride)};
  kernel<<<blocks, kTcThreads, L::kSharedBytes, ctx.stream()>>>(offsets, groups, a, b, beta, w, row_tiles, col_tiles,
                                                                 vec);
  MOE_CUDA_CHECK_LAUNCH();
}

}  // namespace detail

// Whether grouped_gemm and grouped_gemm_wgrad run their tensor-core kernels for Precision::bf16
// and Precision::tf32 on the current device: the device is sm_80 or newer and the code this
// build loads for it was compiled for sm_80 or newer (gpu_arch). Otherwise they round the
// operands the same way inside the exact kernels (the same numerics, CUDA-core speed). Asks the
// runtime once per device; needs no synchronization.
[[nodiscard]] inline bool tensor_core_gemm_available() {
  static std::array<std::atomic<int>, detail::kTcCachedDevices> known{};  // 0: not asked, 1: yes, 2: no
  int device = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < detail::kTcCachedDevices;
  if (cached) {
    const int k = known[static_cast<std::size_t>(device)].load(std::memory_order_relaxed);
    if (k != 0) return k == 1;
  }
  cudaFuncAttributes attributes{};
  bool available = false;
  if (cudaFuncGetAttributes(&attributes, detail::tc_grouped_wgrad_kernel<Precision::bf16, float, float>) == cudaSuccess) {
    // ptxVersion: the virtual architecture the loaded code was compiled from (a compute_75 PTX
    // JIT-compiled for an sm_90 device reports 75: its kernels hold no tensor-core code).
    available = attributes.ptxVersion >= 80 && attributes.binaryVersion >= 80;
  } else {
    static_cast<void>(cudaGetLastError());  // no image for this device: the exact kernels report it
  }
  if (cached) known[static_cast<std::size_t>(device)].store(available ? 1 : 2, std::memory_order_relaxed);
  return available;
}

}  // namespace moe::backend::cuda
