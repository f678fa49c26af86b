#pragma once
// What the examples share: deterministic random matrices and a claim that makes the program
// fail when it does not hold.

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

inline bool expect(bool holds, const char* claim) {
  if (!holds) std::fprintf(stderr, "FAILED: %s\n", claim);
  return holds;
}

}  // namespace example
