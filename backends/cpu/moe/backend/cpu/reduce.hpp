#pragma once
// Column sums over rows, added in row order: the order is fixed, so are the bits.

#include <algorithm>

#include "moe/view.hpp"

namespace moe::backend::cpu {

// out[c] = sum over rows r (in order) of m(r, c).
template <class S>
void sum_rows(ConstMatrixView<S> m, S* out) {
  std::fill(out, out + m.cols, S(0));
  for (Index r = 0; r < m.rows; ++r) {
    const S* row = m.row(r);
    for (Index c = 0; c < m.cols; ++c) out[c] += row[c];
  }
}

}  // namespace moe::backend::cpu
