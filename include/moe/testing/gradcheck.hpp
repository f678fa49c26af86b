#pragma once
// moe::testing::check_gradients: a finite-difference check of a layer's backward, for the
// authors of experts and gates (docs/testing.md, "Checking your own expert or gate").
//
// At one point (x, dy, noise) it compares backward's gradients of
//   objective = sum(dy .* forward(x).y()) + forward(x).loss()
// (what layer.backward(f, dy) differentiates with aux_scale = 1) with central differences, for
// the input x and every parameter of layer.parameters(), the objective summed in double:
//
//   auto report = moe::testing::check_gradients(layer, x.view(), dy.view());
//   if (!report.passed()) std::cerr << report;   // one line per tensor, the worst element named
//
// The routing is held fixed: the gate's noise is drawn once (from options.seed, unless the caller
// passes its own) and reused by every evaluation, and a probe that changes any token's choice of
// experts (a top-k, capacity or selection boundary within the step) makes the point unusable:
// the report says which probe moved the routing (routing_stable() is false; pick another x or
// seed). Elementwise kinks (relu at 0) are not detected: they show as a large error at one element.
//
// Use double precision: in float the differences lose about half the digits (the defaults widen
// the step and the tolerance for float). The layer's memory is read and written through the
// backend (to_host, B::copy), so the check runs on every backend; x and dy live where the layer's
// forward and backward take them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/layer.hpp"
#include "moe/mode.hpp"
#include "moe/random.hpp"
#include "moe/view.hpp"

namespace moe::testing {

struct GradCheckOptions {
  double step = 0;        // central-difference step; 0: 1e-6 for double, 1e-3 for float
  double tolerance = 0;   // bound on each tensor's relative error; 0: 1e-6 for double, 1e-2 for float
  Mode mode = Mode::train;
  std::uint64_t seed = 1;  // of the noise drawn when the gate needs noise and the caller passes none
  Index max_probes = 0;    // per tensor: 0 probes every element, m > 0 at most m evenly spaced ones
};

// The comparison for one tensor (the input "x" or a parameter) over its probed elements.
struct TensorCheck {
  std::string name;
  Index size = 0;    // elements in the tensor
  Index probed = 0;  // elements compared
  // ||analytic - numeric|| / max(||analytic||, ||numeric||) over the probed elements (0 when both are 0).
  double relative_error = 0;
  Index worst_element = -1;  // flat index (row-major) of the largest |analytic - numeric|
  double analytic_at_worst = 0, numeric_at_worst = 0;
  bool zero = false;  // every probed numeric derivative is exactly 0: nothing reaches this tensor
  bool passed = true;

  // " (worst element i: analytic a, numeric n)", as the report names a failing tensor's worst.
  [[nodiscard]] std::string worst_text() const {
    char text[160];
    std::snprintf(text, sizeof text, " (worst element %lld: analytic %.9g, numeric %.9g)",
                  static_cast<long long>(worst_element), analytic_at_worst, numeric_at_worst);
    return text;
  }
};

struct GradCheckReport {
  double tolerance = 0;
  double step = 0;
  bool routing_stable = true;
  std::string routing_moved_by;  // the probe that changed the routing ("experts.w1[17] + step"), if any
  double worst = 0;              // the largest relative error over the tensors
  std::vector<TensorCheck> tensors;
  std::vector<std::string> failures;    // "name: relative error e ..." for each tensor above the tolerance
  std::vector<std::string> zero_grads;  // names of the tensors whose numeric gradient is exactly 0

  // The routing held for every probe and every tensor is within the tolerance.
  [[nodiscard]] bool passed() const { return routing_stable && failures.empty(); }

  // One line per tensor, then the verdict.
  [[nodiscard]] std::string to_string() const {
    std::ostringstream out;
    char line[256];
    std::snprintf(line, sizeof line, "gradient check (step %.1e, tolerance %.1e):\n", step, tolerance);
    out << line;
    for (const TensorCheck& t : tensors) {
      std::snprintf(line, sizeof line, "  %-24s %8lld of %-8lld relative error %.2e%s", t.name.c_str(),
                    static_cast<long long>(t.probed), static_cast<long long>(t.size), t.relative_error,
                    t.passed ? "" : "  FAILED");
      out << line;
      if (!t.passed) out << t.worst_text();
      if (t.zero) out << "  (numeric gradient exactly 0)";
      out << '\n';
    }
    if (!routing_stable)
      out << "  routing changed under the probe " << routing_moved_by
          << ": this point is too close to a routing boundary; try another input or seed\n";
    out << (passed() ? "  passed\n" : "  FAILED\n");
    return out.str();
  }

  friend std::ostream& operator<<(std::ostream& os, const GradCheckReport& r) { return os << r.to_string(); }
};

namespace detail {

template <class S>
constexpr double default_step() {
  return std::is_same_v<S, float> ? 1e-3 : 1e-6;
}
template <class S>
constexpr double default_tolerance() {
  return std::is_same_v<S, float> ? 1e-2 : 1e-6;
}

// Element i of a backend view (row-major flat index), read and written one value at a time.
template <class B, class S>
S read_element(typename B::Context& ctx, ConstMatrixView<S> v, Index i) {
  return to_host<B>(ctx, ConstMatrixView<S>{v.data + (i / v.cols) * v.stride + i % v.cols, 1, 1})[0];
}
template <class B, class S>
void write_element(typename B::Context& ctx, MatrixView<S> v, Index i, S value) {
  B::copy(ctx, ConstMatrixView<S>{&value, 1, 1}, MatrixView<S>{v.data + (i / v.cols) * v.stride + i % v.cols, 1, 1});
  B::synchronize(ctx);
}

}  // namespace detail

// Checks layer.backward against central differences at (x, dy) (x's values are probed in place
// and restored). noise: an explicit noise matrix [T x layer.noise_columns()], reused by every
// evaluation, or none (the check draws one when the gate needs it). Leaves the parameters'
// values as they were and their grads holding the gradient of this one backward (the layer's
// grads are zeroed first).
template <class L>
GradCheckReport check_gradients(L& layer, MatrixView<typename L::Scalar> x, ConstMatrixView<typename L::Scalar> dy,
                                Noise<typename L::Scalar> noise = {}, GradCheckOptions options = {}) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  moe::detail::require(options.step >= 0 && std::isfinite(options.step), "moe::testing::check_gradients: step = ",
                       options.step, ", expected a finite value >= 0 (0: the default for the scalar)");
  moe::detail::require(options.tolerance >= 0 && std::isfinite(options.tolerance),
                       "moe::testing::check_gradients: tolerance = ", options.tolerance,
                       ", expected a finite value >= 0 (0: the default for the scalar)");
  moe::detail::require(options.max_probes >= 0, "moe::testing::check_gradients: max_probes = ", options.max_probes,
                       ", expected >= 0 (0: every element)");
  moe::detail::require(noise.rng() == nullptr,
                       "moe::testing::check_gradients: the noise is an Rng, which draws new noise at every "
                       "evaluation; pass an explicit noise matrix [T x noise_columns()], or none (the check draws one)");
  GradCheckReport report;
  report.step = options.step > 0 ? options.step : detail::default_step<S>();
  report.tolerance = options.tolerance > 0 ? options.tolerance : detail::default_tolerance<S>();
  typename B::Context ctx;

  // The noise, drawn once when the gate needs it and the caller gave none.
  typename B::template Buffer<S> drawn;
  if (noise.empty() && layer.gate().needs_noise(options.mode)) {
    const Index rows = x.rows, cols = layer.noise_columns();
    std::vector<S> z(static_cast<std::size_t>(rows * cols));
    const CounterRandom random{options.seed};
    for (Index i = 0; i < rows * cols; ++i)
      z[static_cast<std::size_t>(i)] = static_cast<S>(random.normal(static_cast<std::uint64_t>(i), 0, 17));
    drawn.resize(rows, cols);
    B::copy(ctx, ConstMatrixView<S>{z.data(), rows, cols}, drawn.view());
    noise = Noise<S>(ConstMatrixView<S>(drawn.view()));
  }

  layer.zero_grad();
  const auto base = layer.forward(x, options.mode, noise);
  const std::vector<Index> routing0 = to_host<B>(ctx, base.expert_index());
  const auto back = layer.backward(base, dy);
  const std::vector<S> dy_host = to_host<B>(ctx, dy);

  std::string probe;  // the probe being evaluated, named in the report if it moves the routing
  auto objective = [&] {
    const auto f = layer.forward(x, options.mode, noise);
    if (report.routing_stable && to_host<B>(ctx, f.expert_index()) != routing0) {
      report.routing_stable = false;
      report.routing_moved_by = probe;
    }
    const std::vector<S> y = to_host<B>(ctx, f.y());
    double s = static_cast<double>(f.loss());
    for (std::size_t i = 0; i < y.size(); ++i) s += static_cast<double>(dy_host[i]) * static_cast<double>(y[i]);
    return s;
  };
  // Central differences over the steps actually taken (in float, value +- step is rounded).
  // after_write: what a write into the tensor needs (a parameter's changed()).
  auto difference = [&](MatrixView<S> v, Index i, const std::string& name, auto&& after_write) {
    const S keep = detail::read_element<B>(ctx, ConstMatrixView<S>(v), i);
    const S up_value = static_cast<S>(keep + static_cast<S>(report.step));
    const S down_value = static_cast<S>(keep - static_cast<S>(report.step));
    probe = name + "[" + std::to_string(i) + "] + step";
    detail::write_element<B>(ctx, v, i, up_value);
    after_write();
    const double up = objective();
    probe = name + "[" + std::to_string(i) + "] - step";
    detail::write_element<B>(ctx, v, i, down_value);
    after_write();
    const double down = objective();
    detail::write_element<B>(ctx, v, i, keep);
    after_write();
    return (up - down) / (static_cast<double>(up_value) - static_cast<double>(down_value));
  };
  auto compare = [&](const std::string& name, MatrixView<S> value, ConstMatrixView<S> grad, auto&& after_write) {
    TensorCheck t;
    t.name = name;
    t.size = value.rows * value.cols;
    const std::vector<S> analytic_all = to_host<B>(ctx, grad);
    const Index probes = options.max_probes > 0 ? std::min(options.max_probes, t.size) : t.size;
    double diff = 0, na = 0, nn = 0, worst_abs = -1;
    bool all_zero = true;
    for (Index p = 0; p < probes && report.routing_stable; ++p) {
      const Index i = probes == t.size ? p : p * t.size / probes;
      const double a = static_cast<double>(analytic_all[static_cast<std::size_t>(i)]);
      const double n = difference(value, i, name, after_write);
      if (!report.routing_stable) break;  // the point is unusable: stop probing
      ++t.probed;
      diff += (a - n) * (a - n);
      na += a * a;
      nn += n * n;
      all_zero = all_zero && n == 0;
      if (std::abs(a - n) > worst_abs) {
        worst_abs = std::abs(a - n);
        t.worst_element = i;
        t.analytic_at_worst = a;
        t.numeric_at_worst = n;
      }
    }
    const double scale = std::max(std::sqrt(na), std::sqrt(nn));
    t.relative_error = scale > 0 ? std::sqrt(diff) / scale : 0.0;
    t.zero = t.probed > 0 && all_zero;
    t.passed = !(t.relative_error >= report.tolerance) && std::isfinite(t.relative_error);
    report.worst = std::max(report.worst, t.relative_error);
    if (!t.passed) report.failures.push_back(name + ": relative error " + std::to_string(t.relative_error) + t.worst_text());
    if (t.zero) report.zero_grads.push_back(name);
    report.tensors.push_back(std::move(t));
  };

  compare("x", x, ConstMatrixView<S>(back.dx.view()), [] {});
  for (const auto& p : layer.parameters()) {
    if (!report.routing_stable) break;
    compare(p.name, p.value, ConstMatrixView<S>(p.grad), [&p] { p.changed(); });
  }
  return report;
}

}  // namespace moe::testing
