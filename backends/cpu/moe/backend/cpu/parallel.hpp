#pragma once
// Parallel loops over independent items. Each item is computed by one thread in full, and
// items write disjoint memory, so the result is the same bits for any thread count.

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

template <class F>
void parallel_for(int threads, index count, F&& f) {
  if (count <= 0) return;
#if defined(_OPENMP)
  const int n = resolve_threads(threads);
  if (n > 1 && count > 1) {
#pragma omp parallel for num_threads(n) schedule(static)
    for (index i = 0; i < count; ++i) f(i);
    return;
  }
#else
  (void)threads;
#endif
  for (index i = 0; i < count; ++i) f(i);
}

}  // namespace moe::backend::cpu
