#pragma once
// What the examples share: deterministic random matrices, a central finite-difference check,
// and a claim that makes the program fail when it does not hold.

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "moe/backend/cpu.hpp"
#include "moe/random.hpp"

namespace example {

using moe::Index;
using moe::backend::cpu::eigen;
using Matrix = moe::backend::HostMatrix<double>;

// Standard normal entries times scale, a pure function of (seed, row, column).
inline Matrix random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  const moe::CounterRandom random{seed};
  Matrix m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = scale * random.normal(static_cast<std::uint64_t>(i), static_cast<std::uint32_t>(j), 0);
  return m;
}

// ||numeric - analytic|| / max(||numeric||, ||analytic||), the numeric gradient of objective()
// taken by moving every entry of v by +-1e-6.
template <class F>
double relative_error(moe::MatrixView<double> v, moe::ConstMatrixView<double> analytic, F objective) {
  moe::backend::cpu::RowMatrix<double> numeric(v.rows, v.cols);
  for (Index i = 0; i < v.rows; ++i)
    for (Index j = 0; j < v.cols; ++j) {
      const double saved = v(i, j), h = 1e-6;
      v(i, j) = saved + h;
      const double up = objective();
      v(i, j) = saved - h;
      numeric(i, j) = (up - objective()) / (2 * h);
      v(i, j) = saved;
    }
  return (numeric - eigen(analytic)).norm() / std::max({numeric.norm(), eigen(analytic).norm(), 1e-300});
}

inline bool expect(bool holds, const char* claim) {
  if (!holds) std::fprintf(stderr, "FAILED: %s\n", claim);
  return holds;
}

}  // namespace example
