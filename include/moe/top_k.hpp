#pragma once
// Stable top-k selection of one row, stable: larger values first, ties to the lower index (MATH.md 2).
// O(n * k) per row with no scratch memory, so it runs unchanged in a device kernel.

#include "moe/view.hpp"

namespace moe {

// Whether element a ranks before element b: larger value first, ties to the lower index, and
// NaN (possible only when the caller turned the finite check off) after every number.
template <class S>
MOE_HD inline bool ranks_before(const S* v, Index a, Index b) {
  const bool a_nan = v[a] != v[a], b_nan = v[b] != v[b];
  if (a_nan || b_nan) return a_nan == b_nan ? a < b : b_nan;
  if (v[a] != v[b]) return v[a] > v[b];
  return a < b;
}

// out[0..kk) = indices of the kk largest of v[0..n), in descending order.
template <class S>
MOE_HD inline void top_k_stable(const S* v, Index n, Index kk, Index* out) {
  for (Index j = 0; j < kk; ++j) {
    Index best = -1;
    for (Index i = 0; i < n; ++i) {
      if (j > 0 && !ranks_before(v, out[j - 1], i)) continue;  // already picked
      if (best < 0 || ranks_before(v, i, best)) best = i;
    }
    out[j] = best;
  }
}

// Whether value is one of list[0..count).
MOE_HD inline bool is_among(const Index* list, Index count, Index value) {
  for (Index j = 0; j < count; ++j)
    if (list[j] == value) return true;
  return false;
}

// out[0..kk) = indices of the kk largest of v[0..n) whose group (index / group_size) is one of
// groups[0..group_count), in descending order (top_k_stable's order restricted to those groups).
template <class S>
MOE_HD inline void top_k_in_groups(const S* v, Index n, Index group_size, const Index* groups, Index group_count,
                                   Index kk, Index* out) {
  for (Index j = 0; j < kk; ++j) {
    Index best = -1;
    for (Index i = 0; i < n; ++i) {
      if (!is_among(groups, group_count, i / group_size)) continue;
      if (j > 0 && !ranks_before(v, out[j - 1], i)) continue;  // already picked
      if (best < 0 || ranks_before(v, i, best)) best = i;
    }
    out[j] = best;
  }
}

}  // namespace moe
