#pragma once
// Test helpers: deterministic random fills, a naive reference of the layer, finite differences.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// A top-k gate with a bug in its routing of row 0: it names its first expert again in slot 1
// (kTwice), or gives slot 0 a NaN gate value (kNotFinite). Backends with host memory only.
enum class RoutingBug { kTwice, kNotFinite };
template <RoutingBug Bug>
struct BuggyGate {
  using Config = gate::TopK::Config;
  template <Backend BB>
  struct Policy : gate::TopK::Policy<BB> {
    using Base = gate::TopK::Policy<BB>;
    using Base::Base;
    void forward(typename BB::Context& ctx, ConstMatrixView<typename BB::Scalar> x, const Index* offsets, Mode mode,
                 const GateNoise<typename BB::Scalar>& noise, GateRouting<BB>& routing, typename Base::Saved& saved) {
      Base::forward(ctx, x, offsets, mode, noise, routing, saved);
      if constexpr (Bug == RoutingBug::kTwice)
        routing.expert.data()[1] = routing.expert.data()[0];
      else
        routing.gate.data()[0] = std::numeric_limits<typename BB::Scalar>::quiet_NaN();
    }
  };
};

// The layer refuses a gate that routes a token twice to one expert or gives a NaN gate value, at
// depth 1 and at a hierarchy's level, with a message naming the row, the slot and the value.
template <Backend BB>
void check_routing_refused() {
  using S = typename BB::Scalar;
  const auto x = random_matrix<S>(6, 4, 1);
  Layer<expert::FeedForward, BuggyGate<RoutingBug::kTwice>, BB> twice(
      {.d_model = 4, .n_experts = 3, .expert = {.hidden = 2}, .gate = {.k = 2}});
  const std::string e_twice = error_of([&] { (void)twice.forward(x.view()); });
  CHECK_MESSAGE(contains(e_twice, "moe::Layer::forward: the gate routed row 0 to expert "), e_twice);
  CHECK_MESSAGE(contains(e_twice, " twice (slot 1 repeats an earlier slot)"), e_twice);
  Layer<expert::FeedForward, BuggyGate<RoutingBug::kNotFinite>, BB> nan(
      {.d_model = 4, .n_experts = 3, .expert = {.hidden = 2}, .gate = {.k = 2}});
  const std::string e_nan = error_of([&] { (void)nan.forward(x.view()); });
  CHECK_MESSAGE(contains(e_nan, "moe::Layer::forward: the gate gave row 0, slot 0 (expert "), e_nan);
  CHECK_MESSAGE(contains(e_nan, "the gate value nan, expected a finite number"), e_nan);
  // A hierarchy checks every level's routing against the level's width.
  const typename gate::Hierarchy<BuggyGate<RoutingBug::kTwice>, 2>::Config levels{
      .levels = {{{.branching = 2, .gate = {.k = 2}}, {.branching = 3, .gate = {.k = 1}}}}};
  Layer<expert::FeedForward, BuggyGate<RoutingBug::kTwice>, BB, 2> tree(
      {.d_model = 4, .n_experts = 6, .expert = {.hidden = 2}, .gate = levels});
  const std::string e_tree = error_of([&] { (void)tree.forward(x.view()); });
  CHECK_MESSAGE(contains(e_tree, "gate::Hierarchy: levels[0]: the gate routed row 0 to expert "), e_tree);
}

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
