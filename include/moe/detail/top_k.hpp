#pragma once
// Per-row top-k selection, stable: larger values first, ties to the lower index (MATH.md 2).
// O(n * k) per row with no scratch memory, so it runs unchanged in a device kernel.

#include "moe/view.hpp"

namespace moe::detail {

// out[0..kk) = indices of the kk largest of v[0..n), in descending order.
template <class S>
MOE_HD inline void top_k_stable(const S* v, Index n, Index kk, Index* out) {
  for (Index j = 0; j < kk; ++j) {
    Index best = -1;
    for (Index i = 0; i < n; ++i) {
      if (j > 0) {
        // Eligible: strictly after the previous pick in the order (value desc, index asc).
        const Index prev = out[j - 1];
        if (!(v[i] < v[prev] || (v[i] == v[prev] && i > prev))) continue;
      }
      if (best < 0 || v[i] > v[best]) best = i;
    }
    out[j] = best;
  }
}

MOE_HD inline bool contains(const Index* list, Index count, Index value) {
  for (Index j = 0; j < count; ++j)
    if (list[j] == value) return true;
  return false;
}

}  // namespace moe::detail
