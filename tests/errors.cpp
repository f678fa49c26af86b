// Bad input is a moe::Error whose message names the value and the expectation, and the layer
// stays usable afterwards.

#include <limits>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {
using B = backend::Cpu<double>;
using NoisyLayer = Layer<expert::FeedForward, gate::NoisyTopK, B>;

NoisyLayer::Config config() { return {.d_model = 4, .n_experts = 8, .expert = {.hidden = 5}, .gate = {.k = 2}}; }

using test::contains;
using test::error_of;
}  // namespace

TEST_CASE("bad configurations are rejected at construction") {
  auto c = config();
  c.gate.k = 0;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "k = 0, expected 1 <= k <= n_experts = 8"));
  c.gate.k = 9;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "k = 9, expected 1 <= k <= n_experts = 8"));
  c = config();
  c.n_experts = 0;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "n_experts = 0, expected at least 1"));
  c = config();
  c.d_model = 0;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "d_model = 0, expected at least 1"));
  c = config();
  c.expert.hidden = 0;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "hidden = 0, expected at least 1"));
  c = config();
  c.gate.eps_noise = -1;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "eps_noise = -1"));
  c = config();
  c.gate.w_load = -0.5;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "w_load = -0.5"));
  c = config();
  c.threads = -2;
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "threads = -2"));
}

TEST_CASE("bad calls throw, name the problem, and leave the layer usable") {
  NoisyLayer layer(config());
  test::randomize_parameters(layer, 1);
  const auto x = test::random_matrix<double>(6, 4, 2);
  const auto dy = test::random_matrix<double>(6, 4, 3);
  Matrix<double> z(6, 8);
  test::fill_normal(z.view(), 4);
  const auto reference = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));

  const auto wide = test::random_matrix<double>(6, 5, 2);
  CHECK(contains(error_of([&] { (void)layer.forward(wide.view(), Mode::inference); }),
                 "input has 5 columns, expected d_model = 4"));
  CHECK(contains(error_of([&] { (void)layer.forward(x.view(), Mode::train); }), "pass a moe::Rng"));
  const Matrix<double> bad_z(6, 7);
  CHECK(contains(error_of([&] { (void)layer.forward(x.view(), Mode::train, Noise<double>(bad_z.view())); }),
                 "noise is 6 x 7, expected [T x noise_columns()] = 6 x 8"));
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    auto x_bad = x;
    x_bad(3, 1) = bad;
    CHECK(contains(error_of([&] { (void)layer.forward(x_bad.view(), Mode::inference); }), "at (3, 1)"));
    auto z_bad = z;
    z_bad(0, 2) = bad;
    CHECK(contains(error_of([&] { (void)layer.forward(x.view(), Mode::train, Noise<double>(z_bad.view())); }),
                   "noise has the non-finite value"));
  }
  const NoisyLayer::Forward empty;
  CHECK(contains(error_of([&] { (void)layer.backward(empty, dy.view()); }), "call forward first"));
  const auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
  const auto dy_bad = test::random_matrix<double>(5, 4, 3);
  CHECK(contains(error_of([&] { (void)layer.backward(f, dy_bad.view()); }),
                 "dy is 5 x 4, expected the output's shape 6 x 4"));
  auto dy_nan = dy;
  dy_nan(0, 0) = std::numeric_limits<double>::quiet_NaN();
  CHECK(contains(error_of([&] { (void)layer.backward(f, dy_nan.view()); }), "dy has the non-finite value"));
  NoisyLayer other(config());
  CHECK(contains(error_of([&] { (void)other.backward(f, dy.view()); }), "produced by another layer"));
  NoisyLayer copy = layer;  // same parameters, but a layer of its own
  CHECK(contains(error_of([&] { (void)copy.backward(f, dy.view()); }), "produced by another layer"));
  CHECK(test::same_bits(copy.forward(x.view(), Mode::train, Noise<double>(z.view())).y(), reference.y()));

  // Still usable: the same forward gives the same bits, and backward runs.
  const auto again = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
  CHECK(test::same_bits(reference.y(), again.y()));
  layer.zero_grad();
  const auto b = layer.backward(again, dy.view());
  CHECK(b.dx.rows() == 6);
  for (const auto& p : layer.parameters())
    for (Index i = 0; i < p.size(); ++i) CHECK(std::isfinite(p.grad.data[i]));
}

TEST_CASE("the finite check can be turned off") {
  auto c = config();
  c.check_finite = false;
  NoisyLayer layer(c);
  auto x = test::random_matrix<double>(3, 4, 2);
  x(1, 1) = std::numeric_limits<double>::quiet_NaN();
  NoisyLayer::Forward f;
  CHECK_NOTHROW(f = layer.forward(x.view(), Mode::inference));
  CHECK(std::isnan(f.y()(1, 0)));  // NaN propagates to its own token only
  CHECK(std::isfinite(f.y()(0, 0)));
}

TEST_CASE("optimizers reject bad settings") {
  CHECK(contains(error_of([] { optim::Sgd<B> o({.lr = 0}); }), "lr = 0, expected > 0"));
  CHECK(contains(error_of([] { optim::Sgd<B> o({.lr = 0.1, .momentum = 1.0}); }), "momentum = 1"));
  CHECK(contains(error_of([] { optim::Adam<B> o({.lr = -1}); }), "lr = -1"));
  CHECK(contains(error_of([] { optim::Adam<B> o({.beta1 = 1.0}); }), "beta1 = 1"));
}

TEST_CASE("moved-from layers and results, null data, bad strides and shapes are errors, not crashes") {
  NoisyLayer layer(config());
  const auto x = test::random_matrix<double>(6, 4, 2);
  const auto dy = test::random_matrix<double>(6, 4, 3);
  Rng rng(1);
  auto f = layer.forward(x.view(), Mode::train, rng);
  const auto moved = std::move(f);
  CHECK_FALSE(f.valid());  // NOLINT(bugprone-use-after-move): what is tested
  CHECK(contains(error_of([&] { (void)layer.backward(f, dy.view()); }), "call forward first"));
  CHECK_NOTHROW((void)layer.backward(moved, dy.view()));

  CHECK(contains(error_of([&] { (void)layer.backward(moved, ConstMatrixView<double>(nullptr, 6, 4)); }),
                 "dy is 6 x 4 with null data"));
  Matrix<double> z(6, 8);
  CHECK(contains(error_of([&] { (void)layer.forward(x.view(), Mode::train, Noise<double>(ConstMatrixView<double>(nullptr, 6, 8))); }),
                 "noise is 6 x 8 with null data"));
  CHECK(contains(error_of([&] { (void)layer.forward(ConstMatrixView<double>(x.data(), 6, 4, 2), Mode::inference); }),
                 "row stride 2, expected at least its 4 columns"));

  // A rejected input leaves the Forward and the generator as they were.
  NoisyLayer::Forward kept = layer.forward(x.view(), Mode::train, rng);
  const auto step = rng.step();
  CHECK(contains(error_of([&] { layer.forward_into(kept, ConstMatrixView<double>(x.data(), -1, 4), Mode::train, rng); }),
                 "shape -1 x 4"));
  CHECK(rng.step() == step);
  CHECK(kept.valid());

  NoisyLayer taken = std::move(layer);
  CHECK(contains(error_of([&] { (void)layer.forward(x.view(), Mode::inference); }), "this layer was moved from"));  // NOLINT
  CHECK_NOTHROW((void)taken.backward(kept, dy.view()));

  auto c = config();
  c.gate.w_importance = std::numeric_limits<double>::infinity();
  CHECK(contains(error_of([&] { NoisyLayer l(c); }), "expected all finite and >= 0"));
}

TEST_CASE("one optimizer over two layers keeps their states apart") {
  NoisyLayer a(config()), b(config());
  auto params = a.parameters();
  for (auto& p : b.parameters()) params.push_back(p);  // the same names twice
  for (auto& p : params)
    for (Index i = 0; i < p.size(); ++i) p.grad.data[i] = 1.0;
  for (auto& p : b.parameters())
    for (Index i = 0; i < p.size(); ++i) p.grad.data[i] = -1.0;
  optim::Sgd<B> sgd({.lr = 0.1, .momentum = 0.9});
  sgd.step(params);
  sgd.step(params);
  // Each layer's velocity sees only its own gradients: after two steps each moved by 0.1 * (1 + 1.9).
  CHECK(a.parameters()[0].value.data[0] == doctest::Approx(-0.29));
  CHECK(b.parameters()[0].value.data[0] == doctest::Approx(0.29));
}
