// moe::testing::check_gradients, the installed gradient checker: it passes a correct backward,
// names the tensor and the element of a wrong one, reports a probe that moves the routing, draws
// and holds the gate's noise when none is given, and refuses noise it cannot hold fixed.

#include <sstream>
#include <vector>

#include "support.hpp"

using namespace moe;

namespace {

// y = x W (one parameter of one expert), with a backward whose weight gradient is scaled by
// Scale (1: correct) and whose input gradient is correct.
template <int Scale>
struct Linear {
  struct Config {};
  static std::vector<expert::ParamSpec> parameters(const Config&, Index d) {
    return {{.name = "w", .rows = d, .cols = d}};
  }
  template <class S>
  static void forward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::Out<S> y) {
    y.noalias() = x * w[0];
  }
  template <class S>
  static void backward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::In<S> dy, expert::Out<S> dx,
                       expert::Grads<S> g) {
    g[0].noalias() += S(Scale) * (x.transpose() * dy);
    dx.noalias() = dy * w[0].transpose();
  }
};

template <int Scale, class Gate = gate::Softmax, class S = double>
using LinearLayer = Layer<expert::PerExpert<Linear<Scale>>, Gate, backend::Cpu<S>>;

template <class L>
L make_layer(typename L::Config config) {
  L layer(config);
  test::randomize_parameters(layer, 5, 0.5);
  return layer;
}

}  // namespace

TEST_CASE("the gradient checker passes a correct backward and reports every tensor") {
  auto layer = make_layer<LinearLayer<1>>({.d_model = 3, .n_experts = 2});
  auto x = test::random_matrix<double>(5, 3, 1);
  const auto dy = test::random_matrix<double>(5, 3, 2);
  const auto x_before = x;
  const auto report = testing::check_gradients(layer, x.view(), dy.view());
  INFO(report.to_string());
  CHECK(report.passed());
  CHECK(report.routing_stable);
  CHECK(report.failures.empty());
  CHECK(report.tolerance == 1e-6);
  REQUIRE(report.tensors.size() == 3);  // x, gate.w_gate, experts.w
  CHECK(report.tensors[0].name == "x");
  CHECK(report.tensors[0].probed == 15);
  CHECK(report.tensors[2].name == "experts.w");
  CHECK(report.tensors[2].size == 18);
  CHECK(test::same_bits(ConstMatrixView<double>(x.view()), ConstMatrixView<double>(x_before.view())));
  CHECK(test::contains(report.to_string(), "passed"));
}

TEST_CASE("the gradient checker names the tensor and the element of a wrong gradient") {
  auto layer = make_layer<LinearLayer<2>>({.d_model = 3, .n_experts = 2});
  auto x = test::random_matrix<double>(5, 3, 1);
  const auto dy = test::random_matrix<double>(5, 3, 2);
  const auto report = testing::check_gradients(layer, x.view(), dy.view());
  CHECK_FALSE(report.passed());
  REQUIRE(report.failures.size() == 1);
  CHECK(test::contains(report.failures[0], "experts.w: relative error"));
  const testing::TensorCheck& w = report.tensors.back();
  CHECK_FALSE(w.passed);
  CHECK(w.relative_error > 0.3);
  CHECK(w.worst_element >= 0);
  CHECK(w.analytic_at_worst == doctest::Approx(2 * w.numeric_at_worst).epsilon(1e-5));
  std::ostringstream text;
  text << report;
  CHECK(test::contains(text.str(), "FAILED"));
  CHECK(test::contains(text.str(), "worst element"));
}

TEST_CASE("the gradient checker probes at most max_probes elements per tensor") {
  auto layer = make_layer<LinearLayer<2>>({.d_model = 3, .n_experts = 2});
  auto x = test::random_matrix<double>(5, 3, 1);
  const auto dy = test::random_matrix<double>(5, 3, 2);
  const auto report = testing::check_gradients(layer, x.view(), dy.view(), {}, {.max_probes = 4});
  for (const auto& t : report.tensors) CHECK(t.probed == std::min<Index>(4, t.size));
  CHECK_FALSE(report.passed());  // the wrong weight gradient is found from 4 elements too
}

TEST_CASE("the gradient checker draws the gate's noise once and holds it") {
  using L = LinearLayer<1, gate::NoisyTopK>;
  auto layer = make_layer<L>({.d_model = 3, .n_experts = 4, .gate = {.k = 2}});
  auto x = test::random_matrix<double>(6, 3, 1);
  const auto dy = test::random_matrix<double>(6, 3, 2);
  const auto report = testing::check_gradients(layer, x.view(), dy.view(), {}, {.seed = 3});
  INFO(report.to_string());
  CHECK(report.routing_stable);
  CHECK(report.passed());
  Rng rng(1);
  CHECK(test::contains(test::error_of([&] { (void)testing::check_gradients(layer, x.view(), dy.view(), rng); }),
                       "pass an explicit noise matrix"));
}

TEST_CASE("the gradient checker reports the probe that moved the routing") {
  // A step as large as the input's values moves some token's top-1 choice.
  using L = LinearLayer<1, gate::TopK>;
  auto layer = make_layer<L>({.d_model = 3, .n_experts = 4, .gate = {.k = 1}});
  auto x = test::random_matrix<double>(8, 3, 1);
  const auto dy = test::random_matrix<double>(8, 3, 2);
  const auto report = testing::check_gradients(layer, x.view(), dy.view(), {}, {.step = 1.0});
  CHECK_FALSE(report.routing_stable);
  CHECK_FALSE(report.passed());
  CHECK(test::contains(report.routing_moved_by, "step"));
  CHECK(test::contains(report.to_string(), "routing changed under the probe"));
}

TEST_CASE("the gradient checker's defaults for float and its argument checks") {
  auto layer = make_layer<LinearLayer<1, gate::Softmax, float>>({.d_model = 3, .n_experts = 2});
  auto x = test::random_matrix<float>(5, 3, 1);
  const auto dy = test::random_matrix<float>(5, 3, 2);
  const auto report = testing::check_gradients(layer, x.view(), dy.view());
  INFO(report.to_string());
  CHECK(report.step == 1e-3);
  CHECK(report.tolerance == 1e-2);
  CHECK(report.passed());
  CHECK(test::contains(
      test::error_of([&] { (void)testing::check_gradients(layer, x.view(), dy.view(), {}, {.step = -1}); }),
      "step = -1"));
  CHECK(test::contains(
      test::error_of([&] { (void)testing::check_gradients(layer, x.view(), dy.view(), {}, {.max_probes = -2}); }),
      "max_probes = -2"));
}
