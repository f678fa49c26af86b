// SGD and Adam on named parameters, against their update rules written out.

#include "support.hpp"

using namespace moe;

namespace {
using B = backend::Cpu<double>;
}

TEST_CASE("SGD: p -= lr * v, v = momentum * v + grad") {
  std::vector<double> value{1.0, -2.0}, grad{0.5, 0.25};
  std::vector<Parameter<double>> params{{"w", {2}, {value.data(), 1, 2}, {grad.data(), 1, 2}}};
  optim::Sgd<B> plain({.lr = 0.1});
  plain.step(params);
  CHECK(value[0] == doctest::Approx(0.95));
  CHECK(value[1] == doctest::Approx(-2.025));
  value = {1.0, -2.0};
  optim::Sgd<B> heavy({.lr = 0.1, .momentum = 0.9});
  heavy.step(params);
  heavy.step(params);  // v = 0.9 g + g = 1.9 g
  CHECK(value[0] == doctest::Approx(1.0 - 0.1 * 0.5 - 0.1 * 1.9 * 0.5));
}

TEST_CASE("Adam: the first step moves each weight by lr against its gradient's sign") {
  std::vector<double> value{1.0, -2.0, 0.0}, grad{0.5, -3.0, 0.0};
  std::vector<Parameter<double>> params{{"w", {3}, {value.data(), 1, 3}, {grad.data(), 1, 3}}};
  optim::Adam<B> adam({.lr = 0.01});
  adam.step(params);
  CHECK(value[0] == doctest::Approx(1.0 - 0.01).epsilon(1e-7));
  CHECK(value[1] == doctest::Approx(-2.0 + 0.01).epsilon(1e-7));
  CHECK(value[2] == 0.0);
  CHECK(adam.steps() == 1);
  // Second step with the same gradient: m_hat = g, v_hat = g^2 again.
  adam.step(params);
  CHECK(value[0] == doctest::Approx(1.0 - 0.02).epsilon(1e-7));
}

// The update rules written out in double, over steps whose gradients change, with every option
// set away from its default: a swapped or dropped term changes the trajectory.
TEST_CASE("Adam follows its update rule over changing gradients: betas, eps, weight decay, bias correction") {
  const double lr = 0.05, b1 = 0.8, b2 = 0.95, eps = 1e-3, wd = 0.1;
  std::vector<double> value{1.0, -2.0, 0.5, 3.0}, grad(4);
  std::vector<Parameter<double>> params{{"w", {2, 2}, {value.data(), 2, 2}, {grad.data(), 2, 2}}};
  optim::Adam<B> adam({.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  std::vector<double> ref = value, m(4, 0.0), v(4, 0.0);
  for (int t = 1; t <= 6; ++t) {
    for (std::size_t i = 0; i < 4; ++i) grad[i] = std::sin(1.7 * t + static_cast<double>(i)) * (1.0 + i);
    adam.step(params);
    for (std::size_t i = 0; i < 4; ++i) {
      m[i] = b1 * m[i] + (1 - b1) * grad[i];
      v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i];
      const double m_hat = m[i] / (1 - std::pow(b1, t)), v_hat = v[i] / (1 - std::pow(b2, t));
      ref[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + wd * ref[i]);  // decoupled decay (AdamW)
    }
    CAPTURE(t);
    for (std::size_t i = 0; i < 4; ++i) CHECK(value[i] == doctest::Approx(ref[i]).epsilon(1e-12));
  }
  CHECK(adam.steps() == 6);
}

TEST_CASE("weight decay alone shrinks a weight whose gradient is zero by lr * wd per step") {
  std::vector<double> value{2.0, -4.0}, grad{0.0, 0.0};
  std::vector<Parameter<double>> params{{"w", {2}, {value.data(), 1, 2}, {grad.data(), 1, 2}}};
  optim::Adam<B> adam({.lr = 0.1, .weight_decay = 0.5});
  adam.step(params);
  CHECK(value[0] == doctest::Approx(2.0 * (1 - 0.05)).epsilon(1e-14));
  CHECK(value[1] == doctest::Approx(-4.0 * (1 - 0.05)).epsilon(1e-14));
}

TEST_CASE("SGD with momentum follows its update rule over changing gradients") {
  const double lr = 0.1, mu = 0.7;
  std::vector<double> value{1.0, -1.0, 0.25}, grad(3);
  std::vector<Parameter<double>> params{{"w", {3}, {value.data(), 1, 3}, {grad.data(), 1, 3}}};
  optim::Sgd<B> sgd({.lr = lr, .momentum = mu});
  std::vector<double> ref = value, vel(3, 0.0);
  for (int t = 1; t <= 5; ++t) {
    for (std::size_t i = 0; i < 3; ++i) grad[i] = std::cos(0.9 * t * (1.0 + i));
    sgd.step(params);
    for (std::size_t i = 0; i < 3; ++i) {
      vel[i] = mu * vel[i] + grad[i];
      ref[i] -= lr * vel[i];
    }
    CAPTURE(t);
    for (std::size_t i = 0; i < 3; ++i) CHECK(value[i] == doctest::Approx(ref[i]).epsilon(1e-14));
  }
}

TEST_CASE("a layer trained with Adam lowers a regression loss") {
  using L = Layer<expert::FeedForward, gate::NoisyTopK, B>;
  L layer({.d_model = 4, .n_experts = 4, .expert = {.hidden = 8}, .gate = {.k = 2}, .seed = 1});
  const auto x = test::random_matrix<double>(64, 4, 3);
  test::Matrix<double> target(64, 4);
  for (Index t = 0; t < 64; ++t)
    for (Index c = 0; c < 4; ++c) target(t, c) = std::sin(2.0 * x(t, c)) + 0.5 * x(t, (c + 1) % 4);
  optim::Adam<B> adam({.lr = 1e-2});
  Rng rng(9);
  auto mse = [&](ConstMatrixView<double> y) {
    double s = 0;
    for (Index t = 0; t < 64; ++t)
      for (Index c = 0; c < 4; ++c) s += (y(t, c) - target(t, c)) * (y(t, c) - target(t, c));
    return s / 64;
  };
  const double before = mse(layer.forward(x.view(), Mode::inference).y());
  for (int step = 0; step < 200; ++step) {
    auto f = layer.forward(x.view(), Mode::train, rng);
    test::Matrix<double> dy(64, 4);
    for (Index t = 0; t < 64; ++t)
      for (Index c = 0; c < 4; ++c) dy(t, c) = 2.0 * (f.y()(t, c) - target(t, c)) / 64;
    layer.zero_grad();
    (void)layer.backward(f, dy.view());
    adam.step(layer.parameters());
  }
  const double after = mse(layer.forward(x.view(), Mode::inference).y());
  CHECK(after < 0.3 * before);
}

TEST_CASE("Adam's moments and step count, copied into a fresh optimizer, continue the same trajectory") {
  std::vector<double> a{1.0, -2.0, 0.5}, b(3), ga{0.5, -3.0, 0.25}, gb(3);
  std::vector<Parameter<double>> pa{{"w", {3}, {a.data(), 1, 3}, {ga.data(), 1, 3}}};
  std::vector<Parameter<double>> pb{{"w", {3}, {b.data(), 1, 3}, {gb.data(), 1, 3}}};
  optim::Adam<B> first({.lr = 0.01, .weight_decay = 0.1});
  for (int s = 0; s < 3; ++s) {
    ga = {0.5 - s, -3.0 + 0.5 * s, 0.25 * s};
    first.step(pa);
  }
  // A checkpoint: values, moments and the step count into another optimizer and parameters.
  b = a;
  optim::Adam<B> resumed({.lr = 0.01, .weight_decay = 0.1});
  const auto [m1, v1] = first.moments(pa[0]);
  const auto [m2, v2] = resumed.moments(pb[0]);
  for (Index i = 0; i < 3; ++i) {
    CHECK(m1(0, i) != 0.0);
    m2(0, i) = m1(0, i);
    v2(0, i) = v1(0, i);
  }
  resumed.set_steps(first.steps());
  ga = gb = {0.3, 0.7, -1.1};
  first.step(pa);
  resumed.step(pb);
  CHECK(a == b);  // the same bits
  // Without the moments the step differs: the check can tell.
  std::vector<double> c(a), gc{0.3, 0.7, -1.1};
  std::vector<Parameter<double>> pc{{"w", {3}, {c.data(), 1, 3}, {gc.data(), 1, 3}}};
  optim::Adam<B> fresh({.lr = 0.01, .weight_decay = 0.1});
  fresh.set_steps(4);
  fresh.step(pc);
  first.step(pa);
  CHECK(c != a);
  CHECK(test::error_of([&] { fresh.set_steps(-1); }).find("optim::Adam: steps = -1, expected >= 0") != std::string::npos);
}
