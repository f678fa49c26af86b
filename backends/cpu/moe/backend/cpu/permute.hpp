#pragma once
// Routing primitives: histogram, exclusive scan, stable sort by a small integer key, row gather.

#include <algorithm>
#include <vector>

#include "moe/backend/cpu/parallel.hpp"
#include "moe/error.hpp"

namespace moe::backend::cpu {

// counts[b] = number of keys equal to b, for b in [0, bins); every key must lie in range.
inline void histogram(const Index* keys, Index count, Index bins, Index* counts) {
  std::fill(counts, counts + bins, Index{0});
  for (Index i = 0; i < count; ++i) {
    detail::require(keys[i] >= 0 && keys[i] < bins, "histogram: key ", keys[i], " at position ", i, " is outside [0, ",
                    bins, ")");
    ++counts[keys[i]];
  }
}

// out[0] = 0, out[i] = in[0] + ... + in[i-1]; out has count + 1 entries.
inline void exclusive_scan(const Index* in, Index count, Index* out) {
  out[0] = 0;
  for (Index i = 0; i < count; ++i) out[i + 1] = out[i] + in[i];
}

// order[p] = the position of the p-th key in stable ascending key order (a counting sort).
inline void stable_sort_by_key(const Index* keys, Index count, Index bins, Index* order) {
  std::vector<Index> counts(static_cast<std::size_t>(bins)), next(static_cast<std::size_t>(bins) + 1);
  histogram(keys, count, bins, counts.data());
  exclusive_scan(counts.data(), bins, next.data());
  for (Index i = 0; i < count; ++i) order[next[static_cast<std::size_t>(keys[i])]++] = i;
}

// dst.row(i) = src.row(rows[i]).
template <class S>
void gather_rows(int threads, ConstMatrixView<S> src, const Index* rows, MatrixView<S> dst) {
  detail::require(src.cols == dst.cols, "gather_rows: source has ", src.cols, " columns, destination ", dst.cols);
  parallel_for(
      threads, dst.rows, [&](Index i) { std::copy_n(src.row(rows[i]), src.cols, dst.row(i)); }, 256);
}

}  // namespace moe::backend::cpu
