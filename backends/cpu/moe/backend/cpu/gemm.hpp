#pragma once
// GEMM and grouped GEMM on Eigen, split into fixed blocks of output rows (never by thread
// count) so that every element is computed by the same instruction sequence on any thread count.

#include <algorithm>
#include <type_traits>

#include "moe/backend/cpu/eigen.hpp"
#include "moe/backend/cpu/host_matrix.hpp"
#include "moe/backend/cpu/parallel.hpp"
#include "moe/backend/cpu/stream_gemm.hpp"
#include "moe/error.hpp"
#include "moe/op.hpp"
#include "moe/precision.hpp"

namespace moe::backend::cpu {

inline constexpr Index kGemmRowBlock = 64;
// The grouped GEMMs' tiles (fixed, never by thread count; see grouped_gemm and grouped_gemm_wgrad).
inline constexpr Index kGroupRowTile = 512;
inline constexpr Index kWgradTileRows = 256, kWgradTileCols = 512;

// c = alpha * op(a) * op(b) + beta * c, for a block of rows [r0, r0 + m) of c.
template <class S>
void gemm_rows(Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta, MatrixView<S> c, Index r0,
               Index m) {
  auto cb = eigen(c).middleRows(r0, m);
  const auto am = eigen(a);
  const auto bm = eigen(b);
  auto product = [&](const auto& lhs) {
    if (tb == Op::none) {
      if (beta == S(0))
        cb.noalias() = alpha * (lhs * bm);
      else {
        cb *= beta;
        cb.noalias() += alpha * (lhs * bm);
      }
    } else {
      if (beta == S(0))
        cb.noalias() = alpha * (lhs * bm.transpose());
      else {
        cb *= beta;
        cb.noalias() += alpha * (lhs * bm.transpose());
      }
    }
  };
  if (ta == Op::none)
    product(am.middleRows(r0, m));
  else
    product(am.middleCols(r0, m).transpose());
}

template <class S>
void gemm(int threads, Op ta, Op tb, S alpha, ConstMatrixView<S> a, ConstMatrixView<S> b, S beta, MatrixView<S> c) {
  const Index m = ta == Op::none ? a.rows : a.cols;
  const Index ka = ta == Op::none ? a.cols : a.rows;
  const Index kb = tb == Op::none ? b.rows : b.cols;
  const Index n = tb == Op::none ? b.cols : b.rows;
  detail::require(ka == kb && c.rows == m && c.cols == n, "gemm: shapes do not agree: op(a) is ", m, " x ", ka,
                  ", op(b) is ", kb, " x ", n, ", c is ", c.rows, " x ", c.cols);
  if (m == 0 || n == 0) return;
  if (ka == 0) {
    auto cm = eigen(c);
    if (beta == S(0))
      cm.setZero();
    else
      cm *= beta;
    return;
  }
  const Index blocks = (m + kGemmRowBlock - 1) / kGemmRowBlock;
  parallel_for(threads_for_work(threads, m * n * ka), blocks, [&](Index blk) {
    const Index r0 = blk * kGemmRowBlock;
    gemm_rows(ta, tb, alpha, a, b, beta, c, r0, std::min(kGemmRowBlock, m - r0));
  });
}

// A contiguous copy of m with every element rounded as Precision p rounds an operand (bf16 or
// tf32: moe::round_operand); these precisions need float data.
template <class S>
HostMatrix<S> rounded_operand(ConstMatrixView<S> m, Precision p, const char* who) {
  detail::require(std::is_same_v<S, float>, who, ": Precision::", to_string(p), " needs float data, got ",
                  sizeof(S) * 8, "-bit floating point");
  HostMatrix<S> out(m.rows, m.cols);
  for (Index r = 0; r < m.rows; ++r)
    for (Index c = 0; c < m.cols; ++c) out(r, c) = static_cast<S>(round_operand(static_cast<float>(m(r, c)), p));
  return out;
}

// For each group g with rows [offsets[g], offsets[g+1]) of a and c:
//   c_g = a_g * op(w_g), where w stacks the groups' matrices along its rows (groups * K x N).
// Writes the groups' rows of c, all N columns, without reading c; an empty group writes nothing.
// With Precision::bf16 or Precision::tf32, a and w are rounded to bfloat16 or TF32 first (into
// temporary copies): an emulation of the tensor-core GEMM's numerics, for reference and tests.
template <class S>
void grouped_gemm(int threads, const Index* offsets, Index groups, Op tw, ConstMatrixView<S> a, ConstMatrixView<S> w,
                  MatrixView<S> c, Precision precision = Precision::fp32) {
  if (precision != Precision::fp32) {
    const HostMatrix<S> ar = rounded_operand(a, precision, "grouped_gemm"),
                        wr = rounded_operand(w, precision, "grouped_gemm");
    grouped_gemm(threads, offsets, groups, tw, ar.view(), wr.view(), c, Precision::fp32);
    return;
  }
  detail::require(groups > 0 && w.rows % groups == 0, "grouped_gemm: ", w.rows,
                  " stacked weight rows do not split into ", groups, " groups");
  const Index wr = w.rows / groups;
  const Index k = tw == Op::none ? wr : w.cols;
  const Index n = tw == Op::none ? w.cols : wr;
  detail::require(a.cols == k && c.cols == n && a.rows == c.rows && offsets[groups] == a.rows,
                  "grouped_gemm: shapes do not agree: a is ", a.rows, " x ", a.cols, ", each op(w_g) is ", k, " x ", n,
                  ", c is ", c.rows, " x ", c.cols, ", offsets end at ", offsets[groups]);
  // Work items, enumerated in a fixed order. A group of m rows is either
  //  - thin (m <= kStreamRows): blocks of kStreamCols columns, each a stream_gemm (or
  //    stream_gemm_bt for w_g transposed) that reads w_g's block once, row by row; or
  //  - cut into ceil(m / kGroupRowTile) tiles of near-equal height, each one Eigen GEMM over all
  //    n columns: Eigen packs the tile's share of w_g once per item, so tall tiles pack it few
  //    times, and no tile is a thin remainder (measured at 1024 rows per expert: 64-row blocks
  //    118, 256-row tiles 126, 512-row tiles 127 GFLOP/s).
  // Both depend on m alone, never on the thread count.
  auto thin = [&](Index g) { return offsets[g + 1] - offsets[g] <= kStreamRows; };
  auto items_of = [&](Index g) {
    const Index rows = offsets[g + 1] - offsets[g];
    if (rows == 0) return Index{0};
    return thin(g) ? (n + kStreamCols - 1) / kStreamCols : (rows + kGroupRowTile - 1) / kGroupRowTile;
  };
  Index items = 0;
  for (Index g = 0; g < groups; ++g) items += items_of(g);
  std::vector<Index> item_group(static_cast<std::size_t>(items)), item_part(static_cast<std::size_t>(items));
  for (Index g = 0, it = 0; g < groups; ++g)
    for (Index t = 0; t < items_of(g); ++t, ++it) {
      item_group[static_cast<std::size_t>(it)] = g;
      item_part[static_cast<std::size_t>(it)] = t;
    }
  parallel_for_uneven(threads_for_work(threads, a.rows * k * n), items, [&](Index it) {
    const Index g = item_group[static_cast<std::size_t>(it)], t = item_part[static_cast<std::size_t>(it)];
    const Index rows = offsets[g + 1] - offsets[g];
    const ConstMatrixView<S> wg{w.data + g * wr * w.stride, wr, w.cols, w.stride};
    if (thin(g)) {
      const Index c0 = t * kStreamCols, lda = row_stride(a), ldw = row_stride(w), ldc = row_stride(c);
      const S* ag = a.data + offsets[g] * lda;
      S* cg = c.data + offsets[g] * ldc;
      if (tw == Op::none)
        stream_gemm(rows, k, c0, std::min(kStreamCols, n - c0), ag, lda, wg.data, ldw, cg, ldc);
      else
        stream_gemm_bt(rows, k, c0, std::min(kStreamCols, n - c0), ag, lda, wg.data, ldw, cg, ldc);
      return;
    }
    const Index tiles = items_of(g);
    const Index r0 = offsets[g] + rows * t / tiles, m = offsets[g] + rows * (t + 1) / tiles - r0;
    gemm_rows(Op::none, tw, S(1), a.block_rows(r0, m), wg, S(0), c.block_rows(r0, m), 0, m);
  });
}

// For each group g: w_g = beta * w_g + a_g^T * b_g over the group's rows of a and b; beta 0
// overwrites (w_g not read), and a group with no rows gets beta * w_g with no product added:
// zeros for beta 0, its block untouched for beta 1 (the reference every backend follows).
// Work items are (group, tile of kWgradTileRows x kWgradTileCols of w_g): each item's reduction
// over the group's rows is one Eigen GEMM run by one thread in full, so the summation order is
// fixed, and a single busy expert still spreads over the threads. Eigen packs a_g's and b_g's
// shares once per tile: wide tiles pack b_g fewer times (measured at 1024 rows per expert:
// 64-column tiles 78, 256 x 512 tiles 118 GFLOP/s).
// With Precision::bf16 or Precision::tf32, a and b are rounded to bfloat16 or TF32 first; w
// accumulates in S.
template <class S>
void grouped_gemm_wgrad(int threads, const Index* offsets, Index groups, ConstMatrixView<S> a, ConstMatrixView<S> b,
                        S beta, MatrixView<S> w, Precision precision = Precision::fp32) {
  if (precision != Precision::fp32) {
    const HostMatrix<S> ar = rounded_operand(a, precision, "grouped_gemm_wgrad"),
                        br = rounded_operand(b, precision, "grouped_gemm_wgrad");
    grouped_gemm_wgrad(threads, offsets, groups, ar.view(), br.view(), beta, w, Precision::fp32);
    return;
  }
  detail::require(groups > 0 && w.rows == groups * a.cols && w.cols == b.cols && a.rows == b.rows &&
                      offsets[groups] == a.rows,
                  "grouped_gemm_wgrad: shapes do not agree: a is ", a.rows, " x ", a.cols, ", b is ", b.rows, " x ",
                  b.cols, ", w is ", w.rows, " x ", w.cols, " for ", groups, " groups");
  const Index row_tiles = (a.cols + kWgradTileRows - 1) / kWgradTileRows;
  const Index col_tiles = (w.cols + kWgradTileCols - 1) / kWgradTileCols;
  const Index tiles = row_tiles * col_tiles;
  parallel_for_uneven(threads_for_work(threads, a.rows * a.cols * b.cols), groups * tiles, [&](Index item) {
    const Index g = item / tiles, t = item % tiles;
    const Index k0 = (t / col_tiles) * kWgradTileRows, c0 = (t % col_tiles) * kWgradTileCols;
    const Index nk = std::min(kWgradTileRows, a.cols - k0), nc = std::min(kWgradTileCols, w.cols - c0);
    const Index r0 = offsets[g], m = offsets[g + 1] - offsets[g];
    auto wm = eigen(MatrixView<S>{w.data + (g * a.cols + k0) * w.stride + c0, nk, nc, w.stride});
    if (beta == S(0))
      wm.setZero();
    else if (beta != S(1))
      wm *= beta;
    if (m > 0)
      wm.noalias() +=
          eigen(a.block_rows(r0, m)).middleCols(k0, nk).transpose() * eigen(b.block_rows(r0, m)).middleCols(c0, nc);
  });
}

// A contiguous S copy of a BFloat16 matrix (every bfloat16 value is exactly an S).
template <class S>
HostMatrix<S> widened(ConstMatrixView<BFloat16> m) {
  HostMatrix<S> out(m.rows, m.cols);
  for (Index r = 0; r < m.rows; ++r)
    for (Index c = 0; c < m.cols; ++c) out(r, c) = static_cast<S>(to_float(m(r, c)));
  return out;
}

inline void require_bf16(Precision precision, const char* who) {
  detail::require(precision == Precision::bf16, who, ": BFloat16 operands are multiplied as Precision::bf16, got "
                  "Precision::", to_string(precision));
}

// grouped_gemm and grouped_gemm_wgrad on operands stored as BFloat16 (precision must be
// Precision::bf16): the products of the rounding path above, bit for bit, since rounding a
// bfloat16 value to bfloat16 changes nothing.
template <class S, BFloat16View A, BFloat16View W>
void grouped_gemm(int threads, const Index* offsets, Index groups, Op tw, A a, W w, MatrixView<S> c,
                  Precision precision) {
  require_bf16(precision, "grouped_gemm");
  grouped_gemm(threads, offsets, groups, tw, ConstMatrixView<S>(widened<S>(a).view()),
               ConstMatrixView<S>(widened<S>(w).view()), c, Precision::fp32);
}

template <class S, BFloat16View A, BFloat16View B>
void grouped_gemm_wgrad(int threads, const Index* offsets, Index groups, A a, B b, S beta, MatrixView<S> w,
                        Precision precision) {
  require_bf16(precision, "grouped_gemm_wgrad");
  grouped_gemm_wgrad(threads, offsets, groups, ConstMatrixView<S>(widened<S>(a).view()),
                     ConstMatrixView<S>(widened<S>(b).view()), beta, w, Precision::fp32);
}

}  // namespace moe::backend::cpu
