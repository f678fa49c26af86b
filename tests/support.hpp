#pragma once
// Test helpers: deterministic random fills, a naive reference of the layer, finite differences.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/expert/per_expert.hpp"
#include "moe/moe.hpp"
#include "moe/testing/gradcheck.hpp"

namespace moe::test {

template <class S>
using Matrix = backend::HostMatrix<S>;
template <class S>
using Dense = backend::cpu::RowMatrix<S>;

// Values uniform in (lo, hi], a pure function of (seed, element).
template <class S>
void fill_uniform(MatrixView<S> m, std::uint64_t seed, double lo, double hi) {
  const CounterRandom r{seed};
  for (Index i = 0; i < m.rows; ++i)
    for (Index j = 0; j < m.cols; ++j)
      m(i, j) = static_cast<S>(
          lo + (hi - lo) * 0.5 *
                   (1.0 + r.symmetric_uniform(static_cast<std::uint64_t>(i), static_cast<std::uint32_t>(j), 7)));
}

template <class S>
Matrix<S> random_matrix(Index rows, Index cols, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  Matrix<S> m(rows, cols);
  fill_uniform(m.view(), seed, lo, hi);
  return m;
}

template <class S>
void fill_normal(MatrixView<S> m, std::uint64_t seed) {
  const CounterRandom r{seed};
  for (Index i = 0; i < m.rows; ++i)
    for (Index j = 0; j < m.cols; ++j)
      m(i, j) = static_cast<S>(r.normal(static_cast<std::uint64_t>(i), static_cast<std::uint32_t>(j), 11));
}

// Fills every parameter of a layer with random values (gates included, so that routing is not tied).
template <class L>
void randomize_parameters(L& layer, std::uint64_t seed, double scale = 1.0) {
  std::uint64_t s = seed;
  for (auto& p : layer.parameters()) fill_uniform(p.value, ++s * 7919, -scale, scale);
}

template <class L>
const Parameter<typename L::Scalar>* find_parameter(const std::vector<Parameter<typename L::Scalar>>& params,
                                                    const std::string& name) {
  for (const auto& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

template <class S>
Dense<S> to_dense(ConstMatrixView<S> v) {
  return backend::cpu::eigen(v);
}

template <class S>
bool same_bits(ConstMatrixView<S> a, ConstMatrixView<S> b) {
  if (a.rows != b.rows || a.cols != b.cols) return false;
  for (Index r = 0; r < a.rows; ++r)
    for (Index c = 0; c < a.cols; ++c)
      if (std::memcmp(&a(r, c), &b(r, c), sizeof(S)) != 0) return false;
  return true;
}

// ||a - b|| / max(||a||, ||b||, tiny).
inline double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, na = 0, nb = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return std::sqrt(diff) / std::max({std::sqrt(na), std::sqrt(nb), 1e-300});
}

// The message of the moe::Error that f throws ("" if none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The library's finite-difference check (moe/testing/gradcheck.hpp) with the noise held at
// `noise` (none: drawn by the check when the gate needs it), as the tests call it.
using GradientCheck = testing::GradCheckReport;

template <class L>
GradientCheck check_layer_gradients(L& layer, MatrixView<typename L::Scalar> x, ConstMatrixView<typename L::Scalar> dy,
                                    Noise<typename L::Scalar> noise = {}, double bound = 1e-6, double step = 1e-6,
                                    Mode mode = Mode::train) {
  return testing::check_gradients(layer, x, dy, noise, {.step = step, .tolerance = bound, .mode = mode});
}

}  // namespace moe::test
