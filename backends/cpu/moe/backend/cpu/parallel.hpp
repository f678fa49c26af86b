#pragma once
// Parallel loops over independent items. Each item is computed by one thread in full, and
// items write disjoint memory, so the result is the same bits for any thread count.

#include <algorithm>

#include "moe/view.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe::backend::cpu {

// Threads the backend uses: 0 means every thread OpenMP offers.
inline int resolve_threads(int requested) {
#if defined(_OPENMP)
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Multiply-adds below which a GEMM runs on one thread: starting a parallel region costs more.
inline constexpr Index kMinParallelMultiplyAdds = Index{1} << 18;

inline int threads_for_work(int threads, Index multiply_adds) {
  return multiply_adds < kMinParallelMultiplyAdds ? 1 : threads;
}

// f(i) for i in [0, count), on at most count / min_per_thread threads: a parallel region costs
// microseconds, more than a few small items, so light loops stay on one thread.
template <class F>
void parallel_for(int threads, Index count, F&& f, Index min_per_thread = 1) {
  if (count <= 0) return;
#if defined(_OPENMP)
  const Index useful = count / (min_per_thread > 0 ? min_per_thread : 1);
  const int n = static_cast<int>(std::min<Index>(resolve_threads(threads), useful));
  if (n > 1) {
#pragma omp parallel for num_threads(n) schedule(static)
    for (Index i = 0; i < count; ++i) f(i);
    return;
  }
#else
  (void)threads;
  (void)min_per_thread;
#endif
  for (Index i = 0; i < count; ++i) f(i);
}

// f(i) for i in [0, count) where items differ in cost (an expert's tiles, with uneven routing):
// handed out one at a time to whichever thread is free. Which thread runs an item never
// changes what the item computes.
template <class F>
void parallel_for_uneven(int threads, Index count, F&& f) {
  if (count <= 0) return;
#if defined(_OPENMP)
  const int n = static_cast<int>(std::min<Index>(resolve_threads(threads), count));
  if (n > 1) {
#pragma omp parallel for num_threads(n) schedule(dynamic)
    for (Index i = 0; i < count; ++i) f(i);
    return;
  }
#else
  (void)threads;
#endif
  for (Index i = 0; i < count; ++i) f(i);
}

}  // namespace moe::backend::cpu
