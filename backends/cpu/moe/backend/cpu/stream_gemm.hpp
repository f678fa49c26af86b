#pragma once
// c = a * w and c = a * w^T for the thin products of an expert that owns a handful of rows: a
// is m x k with m small, w row-major. A library GEMM packs w (reads it, writes a copy, reads the
// copy) to use it for m rows; here w is read once, row by row, in the order it lies in memory:
// stream_gemm multiplies each row of w into all m rows of c while it is in the cache,
// stream_gemm_bt takes the dot products of a's rows with each row of w.
//
// Every element of c is computed in an order fixed by k alone: stream_gemm's is one chain of
// multiply-adds over the depth in order 0, 1, ..., k - 1 started from zero, stream_gemm_bt's a
// set of lane sums added in a fixed order. Its bits depend on its own row of a and its own
// column of w (row of w), never on the column blocks, the other rows or the thread that ran it.

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "moe/view.hpp"

#if defined(__FMA__)
#include <immintrin.h>
#endif

namespace moe::backend::cpu {

namespace stream {

// One register of S: 32 bytes with AVX (eight floats, four doubles), 16 without.
#if defined(__AVX__)
inline constexpr int kVectorBytes = 32;
#else
inline constexpr int kVectorBytes = 16;
#endif
template <class S>
struct Lanes {
  using type [[gnu::vector_size(kVectorBytes)]] = S;
  static constexpr Index count = kVectorBytes / sizeof(S);
};
template <class S>
using Vec = typename Lanes<S>::type;

template <class S>
inline Vec<S> load(const S* p) {
  Vec<S> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class S>
inline void store(S* p, Vec<S> v) {
  std::memcpy(p, &v, sizeof v);
}
// x * y + acc, with one rounding where the target has FMA, as the scalar madd below.
template <class S>
inline Vec<S> madd(Vec<S> x, Vec<S> y, Vec<S> acc) {
#if defined(__FMA__)
  if constexpr (std::is_same_v<S, float>)
    return reinterpret_cast<Vec<S>>(_mm256_fmadd_ps(reinterpret_cast<__m256>(x), reinterpret_cast<__m256>(y),
                                                    reinterpret_cast<__m256>(acc)));
  else
    return reinterpret_cast<Vec<S>>(_mm256_fmadd_pd(reinterpret_cast<__m256d>(x), reinterpret_cast<__m256d>(y),
                                                    reinterpret_cast<__m256d>(acc)));
#else
  return x * y + acc;
#endif
}
template <class S>
inline S madd(S x, S y, S acc) {
#if defined(__FMA__)
  return __builtin_fma(x, y, acc);
#else
  return x * y + acc;
#endif
}

// Rows of w multiplied per pass over a block of c: each element of the block is loaded and
// stored once per kDepthStep multiply-adds.
inline constexpr Index kDepthStep = 8;

// c[i][0, cols) += sum over p in [p0, p0 + P) of a[i][p] * w[p][0, cols), P = kDepthStep or 1,
// each element's multiply-adds in order of p.
template <Index P, class S>
inline void step(Index rows, Index cols, const S* a, Index lda, const S* w, Index ldw, S* c, Index ldc) {
  constexpr Index L = Lanes<S>::count;
  const Index vectors = cols / L;
  for (Index i = 0; i < rows; ++i) {
    const S* ai = a + i * lda;
    Vec<S> x[P];
    for (Index q = 0; q < P; ++q) x[q] = Vec<S>{} + ai[q];
    S* ci = c + i * ldc;
    for (Index v = 0; v < vectors; ++v) {
      Vec<S> acc = load(ci + v * L);
      for (Index q = 0; q < P; ++q) acc = madd<S>(x[q], load(w + q * ldw + v * L), acc);
      store(ci + v * L, acc);
    }
    for (Index j = vectors * L; j < cols; ++j) {
      S acc = ci[j];
      for (Index q = 0; q < P; ++q) acc = madd<S>(ai[q], w[q * ldw + j], acc);
      ci[j] = acc;
    }
  }
}

// The dot products c[i][j] = sum_p a[i][p] * w[j][p] for I rows of a and J rows of w, each as
// Lanes lane sums (lane l takes p = l, l + L, ... in order) added in a fixed order, then the
// tail p >= L * (k / L) in order. The order depends on k alone.
template <Index I, Index J, class S>
inline void dots(Index k, const S* a, Index lda, const S* w, Index ldw, S* c, Index ldc) {
  constexpr Index L = Lanes<S>::count;
  Vec<S> acc[I][J] = {};
  const Index vectors = k / L;
  for (Index v = 0; v < vectors; ++v) {
    Vec<S> wv[J];
    for (Index j = 0; j < J; ++j) wv[j] = load(w + j * ldw + v * L);
    for (Index i = 0; i < I; ++i) {
      const Vec<S> av = load(a + i * lda + v * L);
      for (Index j = 0; j < J; ++j) acc[i][j] = madd<S>(av, wv[j], acc[i][j]);
    }
  }
  for (Index i = 0; i < I; ++i)
    for (Index j = 0; j < J; ++j) {
      S lanes[L];
      std::memcpy(lanes, &acc[i][j], sizeof lanes);
      for (Index half = L / 2; half > 0; half /= 2)
        for (Index l = 0; l < half; ++l) lanes[l] += lanes[l + half];
      S sum = lanes[0];
      for (Index p = vectors * L; p < k; ++p) sum = madd<S>(a[i * lda + p], w[j * ldw + p], sum);
      c[i * ldc + j] = sum;
    }
}

template <Index J, class S>
inline void dots_rows(Index m, Index k, const S* a, Index lda, const S* w, Index ldw, S* c, Index ldc) {
  Index i = 0;
  for (; i + 2 <= m; i += 2) dots<2, J>(k, a + i * lda, lda, w, ldw, c + i * ldc, ldc);
  if (i < m) dots<1, J>(k, a + i * lda, lda, w, ldw, c + i * ldc, ldc);
}

}  // namespace stream

// Rows at or below which stream_gemm beats Eigen's packed GEMM (measured on AVX2 with FMA, d = 512,
// n = 1024: 2.5x at 2 rows, 1.3x at 16, even at 64; with SSE only, even from 8 rows).
#if defined(__FMA__)
inline constexpr Index kStreamRows = 32;
#else
inline constexpr Index kStreamRows = 4;
#endif
// Columns of c one call computes at a time: rows x kStreamCols of c stay in the cache while w
// streams through.
inline constexpr Index kStreamCols = 1024;

// Columns [c0, c0 + cols) of c = a * w: a is m x k (row stride lda), w is k x n (row stride
// ldw), c is m x n (row stride ldc).
template <class S>
void stream_gemm(Index m, Index k, Index c0, Index cols, const S* a, Index lda, const S* w, Index ldw, S* c,
                 Index ldc) {
  for (Index j0 = c0; j0 < c0 + cols; j0 += kStreamCols) {
    const Index nc = std::min(kStreamCols, c0 + cols - j0);
    for (Index i = 0; i < m; ++i) std::fill_n(c + i * ldc + j0, nc, S(0));
    Index p = 0;
    for (; p + stream::kDepthStep <= k; p += stream::kDepthStep)
      stream::step<stream::kDepthStep>(m, nc, a + p, lda, w + p * ldw + j0, ldw, c + j0, ldc);
    for (; p < k; ++p) stream::step<1>(m, nc, a + p, lda, w + p * ldw + j0, ldw, c + j0, ldc);
  }
}

// Columns [c0, c0 + cols) of c = a * w^T: a is m x k, w is n x k (row stride ldw), so that each
// element is the dot product of a row of a and a row of w, and w is read once, row by row.
template <class S>
void stream_gemm_bt(Index m, Index k, Index c0, Index cols, const S* a, Index lda, const S* w, Index ldw, S* c,
                    Index ldc) {
  constexpr Index J = 4;
  Index j = c0;
  for (; j + J <= c0 + cols; j += J) stream::dots_rows<J>(m, k, a, lda, w + j * ldw, ldw, c + j, ldc);
  for (; j < c0 + cols; ++j) stream::dots_rows<1>(m, k, a, lda, w + j * ldw, ldw, c + j, ldc);
}

}  // namespace moe::backend::cpu
