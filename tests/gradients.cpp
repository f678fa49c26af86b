// MATH.md 5: backward equals central finite differences of the forward, in double, with the
// noise held fixed, for the input and every parameter, through the gates, both balancing
// losses (the load's threshold path included) and the experts.

#include <cstdio>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;

struct Case {
  Index n = 4;
  Index t = 10;
  Index d = 4;
  Index h = 5;
  bool bias = false;
};

// Smallest distance from a kink of the forward at this point: ReLU pre-activations near 0, and
// (for top-k) the gaps around the k-th and (k+1)-th largest noisy logits.
template <class L>
double margin(L& layer, ConstMatrixView<double> x, ConstMatrixView<double> z, Index k, double eps_noise) {
  const auto params = layer.parameters();
  const auto dx = test::to_dense(x);
  double m = 1e300;
  for (const auto& p : params) {
    if (p.name != "experts.w1") continue;
    const Index n = p.shape[0], d = p.shape[1], h = p.shape[2];
    const auto* b1 = test::find_parameter<L>(params, "experts.b1");
    for (Index e = 0; e < n; ++e) {
      test::Dense<double> pre = dx * test::to_dense(ConstMatrixView<double>(p.value.block_rows(e * d, d)));
      if (b1 != nullptr) pre.rowwise() += test::to_dense(ConstMatrixView<double>(b1->value.block_rows(e, 1))).row(0);
      m = std::min(m, pre.cwiseAbs().minCoeff());
    }
    (void)h;
  }
  const auto* wg = test::find_parameter<L>(params, "gate.w_gate");
  const auto* wn = test::find_parameter<L>(params, "gate.w_noise");
  if (wn != nullptr) {
    test::Dense<double> clean = dx * test::to_dense(ConstMatrixView<double>(wg->value));
    test::Dense<double> raw = dx * test::to_dense(ConstMatrixView<double>(wn->value));
    const Index n = clean.cols();
    for (Index t = 0; t < x.rows; ++t) {
      std::vector<double> hv;
      for (Index i = 0; i < n; ++i) hv.push_back(clean(t, i) + z(t, i) * (detail::softplus(raw(t, i)) + eps_noise));
      std::sort(hv.begin(), hv.end(), std::greater<>());
      for (Index j = k - 1; j <= k && j + 1 < n; ++j)
        m = std::min(m, hv[static_cast<std::size_t>(j)] - hv[static_cast<std::size_t>(j + 1)]);
    }
  }
  return m;
}

template <class Gate>
void check_gradients(const Case& c, const typename Gate::Config& gate_config, Index k_of_gate, double eps_noise) {
  using L = Layer<expert::FeedForward, Gate, B>;
  for (std::uint64_t seed = 1; seed < 40; ++seed) {
    L layer({.d_model = c.d,
             .n_experts = c.n,
             .expert = {.hidden = c.h, .bias = c.bias},
             .gate = gate_config,
             .seed = seed});
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(c.t, c.d, seed * 31 + 1);
    auto dy = test::random_matrix<double>(c.t, c.d, seed * 31 + 2);
    Matrix<double> z(c.t, c.n);
    test::fill_normal(z.view(), seed * 31 + 3);
    if (margin(layer, x.view(), z.view(), k_of_gate, eps_noise) < 1e-4) continue;  // too close to a kink

    auto objective = [&] {
      auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
      const auto y = f.y();
      double s = f.loss();
      for (Index r = 0; r < y.rows; ++r)
        for (Index col = 0; col < y.cols; ++col) s += dy(r, col) * y(r, col);
      return s;
    };
    layer.zero_grad();
    auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
    const auto back = layer.backward(f, dy.view());
    if (!f.stats().load_is_count) CHECK(f.stats().cv2_load > 0);

    const double step = 1e-6;
    auto finite_difference = [&](double* value) {
      const double keep = *value;
      *value = keep + step;
      const double up = objective();
      *value = keep - step;
      const double down = objective();
      *value = keep;
      return (up - down) / (2 * step);
    };
    std::vector<double> analytic, numeric;
    for (Index i = 0; i < x.size(); ++i) {
      analytic.push_back(back.dx[i]);
      numeric.push_back(finite_difference(&x[i]));
    }
    const double err_x = test::relative_error(analytic, numeric);
    INFO("input: relative error ", err_x);
    CHECK(err_x < 1e-6);
    double worst = err_x;
    for (const auto& p : layer.parameters()) {
      analytic.clear();
      numeric.clear();
      for (Index i = 0; i < p.size(); ++i) {
        analytic.push_back(p.grad.data[i]);
        numeric.push_back(finite_difference(p.value.data + i));
      }
      const double err = test::relative_error(analytic, numeric);
      double norm = 0;
      for (const double g : numeric) norm += g * g;
      INFO(p.name, ": relative error ", err, ", gradient norm ", std::sqrt(norm));
      CHECK(err < 1e-6);
      CHECK(norm > 0);  // every parameter takes part in this check
      worst = std::max(worst, err);
    }
    MESSAGE("n = ", c.n, ", k = ", k_of_gate, ", seed ", seed, ": worst relative error ", worst);
    return;
  }
  FAIL("no point away from ties found in 40 seeds");
}

}  // namespace

TEST_CASE("noisy top-k gradients, all losses on") {
  for (const auto& [n, k] : std::vector<std::pair<Index, Index>>{{4, 1}, {8, 2}, {16, 1}, {16, 2}, {16, 4}}) {
    CAPTURE(n);
    CAPTURE(k);
    check_gradients<gate::NoisyTopK>({.n = n}, {.k = k, .w_importance = 1.0, .w_load = 1.0}, k, 1e-2);
  }
}

TEST_CASE("noisy top-k gradients with expert biases") {
  check_gradients<gate::NoisyTopK>({.n = 8, .bias = true}, {.k = 2, .w_importance = 0.5, .w_load = 2.0}, 2, 1e-2);
}

TEST_CASE("noisy top-k gradients with k = n: the load is the count and has no gradient") {
  check_gradients<gate::NoisyTopK>({.n = 4}, {.k = 4, .w_importance = 1.0, .w_load = 1.0}, 4, 1e-2);
}

TEST_CASE("noisy top-k gradients with the load loss alone (threshold path)") {
  check_gradients<gate::NoisyTopK>({.n = 8, .t = 16}, {.k = 2, .w_importance = 0.0, .w_load = 3.0}, 2, 1e-2);
}

TEST_CASE("noisy top-k gradients with the importance loss alone") {
  check_gradients<gate::NoisyTopK>({.n = 8, .t = 16}, {.k = 2, .w_importance = 3.0, .w_load = 0.0}, 2, 1e-2);
}

TEST_CASE("dense softmax gate gradients") {
  for (const Index n : {4, 16}) {
    CAPTURE(n);
    check_gradients<gate::Softmax>({.n = n}, {.w_importance = 1.0}, n, 0.0);
  }
}

// The float backend's backward, not only the double one: central differences taken in float
// (steps of 2e-3, the objective summed in double) on smooth layers (SwiGLU experts, no ReLU
// kink) over 48 tokens, where float's rounding limits the agreement to about 1e-3 (checked at
// 5e-3). A point where a step would change the routing is skipped for the next seed.
namespace {
template <class L>
void check_float_gradients(typename L::Config config, bool noisy) {
  for (std::uint64_t seed = 1; seed < 20; ++seed) {
    config.seed = seed;
    L layer(config);
    test::randomize_parameters(layer, seed, 0.5);
    const Index t = 48, d = config.d_model;
    auto x = test::random_matrix<float>(t, d, seed * 17 + 1);
    const auto dy = test::random_matrix<float>(t, d, seed * 17 + 2);
    Matrix<float> z(t, layer.noise_columns());
    test::fill_normal(z.view(), seed * 17 + 3);
    const auto check = test::check_layer_gradients(layer, x.view(), dy.view(),
                                                   noisy ? Noise<float>(z.view()) : Noise<float>(), 5e-3, 2e-3);
    if (!check.routing_stable) continue;
    std::string failures;
    for (const auto& f : check.failures) failures += f + "; ";
    INFO("seed ", seed, ": worst relative error ", check.worst, "; ", failures);
    CHECK(check.failures.empty());
    CHECK(check.zero_grads.empty());
    MESSAGE("float, seed ", seed, ": worst relative error ", check.worst);
    return;
  }
  FAIL("no seed in 20 kept the routing through every step");
}
}  // namespace

TEST_CASE("float backward matches finite differences in float: top-k gate, SwiGLU and a shared expert, z-loss on") {
  using L = Layer<expert::SwiGLU, gate::TopK, backend::Cpu<float>>;
  check_float_gradients<L>(
      {.d_model = 6, .n_experts = 6, .expert = {.hidden = 8}, .gate = {.k = 2, .w_z = 1e-2}, .shared_experts = 1},
      false);
}

TEST_CASE("float backward matches finite differences in float: a depth-2 noisy top-k layer with explicit noise") {
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, backend::Cpu<float>, 2>;
  L::Config c{.d_model = 6, .n_experts = 6, .expert = {.hidden = 8}};
  c.gate = {.levels = {{{.branching = 3, .gate = {.k = 2}}, {.branching = 2, .gate = {.k = 1}}}},
            .w_importance = 0.1,
            .w_load = 0.1};
  check_float_gradients<L>(c, true);
}
