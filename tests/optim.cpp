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
