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

// Finite-difference check of a layer's backward (MATH.md 5) at one point: central differences of
// sum(dy .* y) + loss for the input and every parameter, with the noise held fixed. A point is
// usable only where the routing does not change within the step (no kink of top-k, capacity or
// selection crossed); `routing_stable` says whether it held for every probe.
struct GradientCheck {
  bool routing_stable = true;
  double worst = 0;                     // worst relative error over the input and the parameters
  std::vector<std::string> failures;    // "name: error" above the bound
  std::vector<std::string> zero_grads;  // parameters whose numeric gradient is exactly zero
  double bound = 1e-6;
  [[nodiscard]] bool passed() const { return routing_stable && failures.empty(); }
};

template <class L>
GradientCheck check_layer_gradients(L& layer, MatrixView<typename L::Scalar> x, ConstMatrixView<typename L::Scalar> dy,
                                    Noise<typename L::Scalar> noise = {}, double bound = 1e-6, double step = 1e-6,
                                    Mode mode = Mode::train) {
  using S = typename L::Scalar;
  GradientCheck out;
  out.bound = bound;
  layer.zero_grad();
  const auto base = layer.forward(x, mode, noise);
  const Matrix<Index> routing0 = [&] {
    Matrix<Index> m(base.expert_index().rows, base.expert_index().cols);
    backend::cpu::eigen(m.view()) = backend::cpu::eigen(base.expert_index());
    return m;
  }();
  const auto back = layer.backward(base, dy);
  // The objective is summed in double whatever the layer computes in.
  auto objective = [&] {
    const auto f = layer.forward(x, mode, noise);
    if (!same_bits(f.expert_index(), ConstMatrixView<Index>(routing0.view()))) out.routing_stable = false;
    const auto y = f.y();
    double s = static_cast<double>(f.loss());
    for (Index r = 0; r < y.rows; ++r)
      for (Index c = 0; c < y.cols; ++c) s += static_cast<double>(dy(r, c)) * static_cast<double>(y(r, c));
    return s;
  };
  // Central differences over the steps actually taken (in float, value + step is rounded).
  auto difference = [&](S* value) {
    if (!out.routing_stable) return 0.0;  // the point is unusable: stop probing
    const S keep = *value;
    *value = static_cast<S>(keep + static_cast<S>(step));
    const double taken_up = static_cast<double>(*value) - static_cast<double>(keep);
    const double up = objective();
    *value = static_cast<S>(keep - static_cast<S>(step));
    const double taken_down = static_cast<double>(*value) - static_cast<double>(keep);
    const double down = objective();
    *value = keep;
    return (up - down) / (taken_up - taken_down);
  };
  auto compare = [&](const std::string& name, const S* grad, S* value, Index count) {
    std::vector<double> analytic, numeric;
    double norm = 0;
    for (Index i = 0; i < count; ++i) {
      analytic.push_back(static_cast<double>(grad[i]));
      numeric.push_back(difference(value + i));
      norm += numeric.back() * numeric.back();
    }
    const double err = relative_error(analytic, numeric);
    out.worst = std::max(out.worst, err);
    if (err >= bound) out.failures.push_back(name + ": relative error " + std::to_string(err));
    if (norm == 0) out.zero_grads.push_back(name);
  };
  compare("x", back.dx.data(), x.data, x.rows * x.cols);
  for (const auto& p : layer.parameters()) compare(p.name, p.grad.data, p.value.data, p.size());
  return out;
}

}  // namespace moe::test
