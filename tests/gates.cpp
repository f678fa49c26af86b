// The gates beyond the paper that share NoisyTopK's code: TopK (the Mixtral-style router) and
// the router z-loss on any softmax gate.

#include <cmath>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;

template <class Gate>
using FlatLayer = Layer<expert::FeedForward, Gate, B>;

using test::error_of;

// Routing of a gate policy run on its own.
template <class Policy>
GateRouting<B> route(Policy& gate, ConstMatrixView<double> x) {
  B::Context ctx;
  GateRouting<B> r;
  typename Policy::Saved saved;
  gate.forward(ctx, x, nullptr, Mode::train, GateNoise<double>{}, r, saved);
  moe::resolve_deferred_losses<B>(ctx, r);
  return r;
}

}  // namespace

TEST_CASE("TopK: the softmax over the k largest logits, renormalized; equals NoisyTopK with noise off") {
  constexpr Index d = 2, n = 4;
  gate::TopK::Policy<B> top({.k = 2}, d, n, 1);
  // W_g chosen so that token 0 has logits [1, 3, 2, 0] and token 1 logits [0.5, 0.5, -1, 0.5].
  auto w = top.parameters()[0].value;
  const double wv[d][n] = {{1, 3, 2, 0}, {0.5, 0.5, -1, 0.5}};
  for (Index r = 0; r < d; ++r)
    for (Index c = 0; c < n; ++c) w(r, c) = wv[r][c];
  Matrix<double> x(2, d, 0.0);
  x(0, 0) = 1;
  x(1, 1) = 1;
  const auto r = route(top, x.view());
  CHECK(r.expert(0, 0) == 1);
  CHECK(r.expert(0, 1) == 2);
  CHECK(r.gate(0, 0) == doctest::Approx(std::exp(3.0) / (std::exp(3.0) + std::exp(2.0))).epsilon(1e-14));
  CHECK(r.gate(0, 1) == doctest::Approx(std::exp(2.0) / (std::exp(3.0) + std::exp(2.0))).epsilon(1e-14));
  // Ties go to the lower index: experts 0, 1 and 3 tie at 0.5.
  CHECK(r.expert(1, 0) == 0);
  CHECK(r.expert(1, 1) == 1);
  CHECK(r.gate(1, 0) == doctest::Approx(0.5));
  CHECK(r.load_is_count);
  // The full softmax, top 2 kept, renormalized: the same numbers.
  double full[n], sum = 0;
  for (Index i = 0; i < n; ++i) sum += (full[i] = std::exp(wv[0][i]));
  CHECK(r.gate(0, 0) == doctest::Approx((full[1] / sum) / ((full[1] + full[2]) / sum)).epsilon(1e-14));

  // NoisyTopK with noisy = false on the same weights routes identically, in training too.
  gate::NoisyTopK::Policy<B> noisy({.k = 2, .noisy = false}, d, n, 1);
  for (Index r0 = 0; r0 < d; ++r0)
    for (Index c = 0; c < n; ++c) noisy.parameters()[0].value(r0, c) = wv[r0][c];
  const auto x2 = test::random_matrix<double>(16, d, 3);
  const auto a = route(top, x2.view()), b = route(noisy, x2.view());
  CHECK(test::same_bits(a.expert.view(), b.expert.view()));
  CHECK(test::same_bits(a.gate.view(), b.gate.view()));
  CHECK(top.parameters().size() == 1);  // no noise weight
  CHECK(top.parameters()[0].name == "gate.w_gate");
  CHECK_FALSE(top.needs_noise(Mode::train));
}

TEST_CASE("TopK starts from a random router: tokens spread over the experts") {
  FlatLayer<gate::TopK> layer({.d_model = 8, .n_experts = 8, .expert = {.hidden = 4}, .gate = {.k = 2}, .seed = 4});
  const auto x = test::random_matrix<double>(512, 8, 1);
  const auto f = layer.forward(x.view(), Mode::inference);
  for (const Index c : f.stats().tokens_per_expert) CHECK(c > 0);
  CHECK(f.stats().load_is_count);
}

TEST_CASE("router z-loss: w_z * mean over tokens of logsumexp(logits)^2, for every softmax gate") {
  constexpr Index d = 3, n = 5, T = 7;
  const auto x = test::random_matrix<double>(T, d, 5);
  auto expected = [&](ConstMatrixView<double> w) {
    double sum = 0;
    for (Index t = 0; t < T; ++t) {
      double s = 0;
      for (Index i = 0; i < n; ++i) {
        double logit = 0;
        for (Index c = 0; c < d; ++c) logit += x(t, c) * w(c, i);
        s += std::exp(logit);
      }
      sum += std::log(s) * std::log(s);
    }
    return sum / T;
  };
  {
    FlatLayer<gate::TopK> layer({.d_model = d, .n_experts = n, .expert = {.hidden = 2}, .gate = {.k = 2, .w_z = 0.3}});
    const auto f = layer.forward(x.view(), Mode::inference);
    CHECK(f.stats().loss_z == doctest::Approx(0.3 * expected(layer.parameters()[0].value)).epsilon(1e-13));
    CHECK(f.loss() == doctest::Approx(f.stats().loss_importance + f.stats().loss_load + f.stats().loss_z));
  }
  {
    FlatLayer<gate::Softmax> layer(
        {.d_model = d, .n_experts = n, .expert = {.hidden = 2}, .gate = {.w_z = 0.5, .init_scale = 1.0}});
    const auto f = layer.forward(x.view(), Mode::inference);
    CHECK(f.stats().loss_z == doctest::Approx(0.5 * expected(layer.parameters()[0].value)).epsilon(1e-13));
  }
  {
    FlatLayer<gate::NoisyTopK> layer(
        {.d_model = d, .n_experts = n, .expert = {.hidden = 2}, .gate = {.k = 2, .w_z = 2.0}});
    test::randomize_parameters(layer, 3);
    Rng rng(1);
    const auto f = layer.forward(x.view(), Mode::train, rng);  // on the clean logits, noise aside
    CHECK(f.stats().loss_z == doctest::Approx(2.0 * expected(layer.parameters()[0].value)).epsilon(1e-13));
  }
  {
    FlatLayer<gate::TopK> off({.d_model = d, .n_experts = n, .expert = {.hidden = 2}, .gate = {.k = 2}});
    CHECK(off.forward(x.view()).stats().loss_z == 0.0);
  }
}

TEST_CASE("gradients: TopK, and the z-loss on TopK, Softmax and NoisyTopK") {
  auto run = [](auto& layer, bool noise) {
    for (std::uint64_t seed = 1; seed < 30; ++seed) {
      test::randomize_parameters(layer, seed, 0.8);
      auto x = test::random_matrix<double>(10, 4, seed * 13 + 1);
      const auto dy = test::random_matrix<double>(10, 4, seed * 13 + 2);
      Matrix<double> z(10, layer.noise_columns());
      test::fill_normal(z.view(), seed);
      const auto check = noise ? test::check_layer_gradients(layer, x.view(), dy.view(), Noise<double>(z.view()))
                               : test::check_layer_gradients(layer, x.view(), dy.view());
      if (!check.routing_stable) continue;
      for (const auto& failure : check.failures) FAIL_CHECK(failure);
      CHECK(check.zero_grads.empty());
      MESSAGE("worst relative error ", check.worst);
      return;
    }
    FAIL("no point away from ties in 30 seeds");
  };
  SUBCASE("TopK, importance loss") {
    FlatLayer<gate::TopK> layer(
        {.d_model = 4, .n_experts = 6, .expert = {.hidden = 5}, .gate = {.k = 2, .w_importance = 1.0}});
    run(layer, false);
  }
  SUBCASE("TopK with z-loss") {
    FlatLayer<gate::TopK> layer({.d_model = 4, .n_experts = 6, .expert = {.hidden = 5}, .gate = {.k = 2, .w_z = 0.7}});
    run(layer, false);
  }
  SUBCASE("Softmax with z-loss") {
    FlatLayer<gate::Softmax> layer({.d_model = 4, .n_experts = 5, .expert = {.hidden = 5}, .gate = {.w_z = 0.7}});
    run(layer, false);
  }
  SUBCASE("NoisyTopK with z-loss and both balancing losses") {
    FlatLayer<gate::NoisyTopK> layer({.d_model = 4,
                                      .n_experts = 8,
                                      .expert = {.hidden = 5},
                                      .gate = {.k = 2, .w_importance = 1.0, .w_load = 1.0, .w_z = 0.7}});
    run(layer, true);
  }
  SUBCASE("depth 2 of TopK with z-loss at both levels") {
    Layer<expert::FeedForward, gate::TopK, B, 2> layer(
        {.d_model = 4,
         .n_experts = 12,
         .expert = {.hidden = 5},
         .gate = {.levels = {{{.branching = 3, .gate = {.k = 2, .w_z = 0.5}},
                              {.branching = 4, .gate = {.k = 2, .w_z = 0.5}}}},
                  .w_importance = 1.0},
         .seed = 2});
    run(layer, false);
  }
  SUBCASE("depth 2 of Softmax (dense at both levels)") {
    Layer<expert::FeedForward, gate::Softmax, B, 2> layer(
        {.d_model = 4,
         .n_experts = 6,
         .expert = {.hidden = 3},
         .gate = {.levels = {{{.branching = 2, .gate = {.w_z = 0.2}}, {.branching = 3, .gate = {}}}},
                  .w_importance = 1.0}});
    run(layer, false);
  }
}

TEST_CASE("the z-loss trains the logits toward zero log-sum-exp") {
  FlatLayer<gate::TopK> layer(
      {.d_model = 4, .n_experts = 8, .expert = {.hidden = 4}, .gate = {.k = 2, .w_z = 1.0, .init_scale = 8.0}});
  const auto x = test::random_matrix<double>(64, 4, 2);
  const Matrix<double> zero(64, 4, 0.0);
  optim::Sgd<B> sgd({.lr = 0.05});
  const double before = layer.forward(x.view()).stats().loss_z;
  for (int step = 0; step < 100; ++step) {
    layer.zero_grad();
    layer.backward(layer.forward(x.view()), zero.view());
    sgd.step(layer.parameters());
  }
  const double after = layer.forward(x.view()).stats().loss_z;
  MESSAGE("z-loss ", before, " -> ", after);
  CHECK(after < 0.5 * before);
}

TEST_CASE("bad gate configurations are moe::Errors naming the value") {
  CHECK(error_of([] {
          gate::TopK::Policy<B>({.k = 5}, 3, 4, 0);
        }).rfind("gate::TopK: k = 5, expected 1 <= k <= n_experts = 4", 0) == 0);
  CHECK(error_of([] { gate::TopK::Policy<B>({.k = 2, .w_z = -1}, 3, 4, 0); }).find("w_z = -1") != std::string::npos);
  CHECK(error_of([] { gate::TopK::Policy<B>({.k = 2, .init_scale = -2}, 3, 4, 0); }).find("init_scale = -2") !=
        std::string::npos);
  CHECK(error_of([] { gate::Softmax::Policy<B>({.w_z = NAN}, 3, 4, 0); }).find("w_z = nan") != std::string::npos);
  CHECK(error_of([] { gate::NoisyTopK::Policy<B>({.k = 1}, 3, 4, 0, 0); }).find("groups = 0, expected at least 1") !=
        std::string::npos);
}

TEST_CASE("shared experts: a token no routed expert takes still gets the shared experts' output") {
  using SharedSwitch = Layer<expert::FeedForward, gate::Switch, B>;
  SharedSwitch::Config config{
      .d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.capacity_factor = 0.25}, .shared_experts = 2};
  SharedSwitch with(config);
  config.shared_experts = 0;
  SharedSwitch without(config);
  test::randomize_parameters(with, 6);
  test::randomize_parameters(without, 6);  // the same routed weights: parameters are named and ordered alike
  const auto x = test::random_matrix<double>(16, 4, 2);
  const auto fw = with.forward(x.view()), fo = without.forward(x.view());
  REQUIRE(fw.stats().dropped_tokens > 0);
  CHECK(fw.stats().dropped_tokens == fo.stats().dropped_tokens);
  const auto params = with.parameters();  // the views stay valid while the layer lives
  const auto* w1 = test::find_parameter<SharedSwitch>(params, "shared_experts.w1");
  const auto* w2 = test::find_parameter<SharedSwitch>(params, "shared_experts.w2");
  REQUIRE(w1 != nullptr);
  REQUIRE(w2 != nullptr);
  Index dropped_seen = 0;
  for (Index t = 0; t < 16; ++t) {
    bool routed = false;
    for (Index j = 0; j < fw.expert_index().cols; ++j) routed = routed || fw.expert_index()(t, j) != kNotRouted;
    // shared part = sum over the 2 shared experts of relu(x W1_e) W2_e
    test::Dense<double> shared = test::Dense<double>::Zero(1, 4);
    const test::Dense<double> xt = test::to_dense(ConstMatrixView<double>(x.view().block_rows(t, 1)));
    for (Index e = 0; e < 2; ++e)
      shared += (xt * test::to_dense(ConstMatrixView<double>(w1->value.block_rows(e * 4, 4)))).cwiseMax(0.0) *
                test::to_dense(ConstMatrixView<double>(w2->value.block_rows(e * 3, 3)));
    for (Index c = 0; c < 4; ++c) {
      CHECK(fw.y()(t, c) == doctest::Approx(fo.y()(t, c) + shared(0, c)).epsilon(1e-12));
      if (!routed) CHECK(fo.y()(t, c) == 0.0);
    }
    dropped_seen += routed ? 0 : 1;
  }
  CHECK(dropped_seen == fw.stats().dropped_tokens);
}

TEST_CASE("row softmax and its backward: in place equals out of place, the argmax ties to the lower index") {
  const double v[5] = {0.5, 2.0, -1.0, 2.0, 0.0};
  double p[5], q[5] = {0.5, 2.0, -1.0, 2.0, 0.0};
  CHECK(gate::softmax_row(v, 5, p) == 1);
  CHECK(gate::softmax_row(q, 5, q) == 1);
  double sum = 0;
  for (int i = 0; i < 5; ++i) {
    CHECK(p[i] == q[i]);
    CHECK(p[i] == doctest::Approx(std::exp(v[i] - 2.0) / (2 + std::exp(-1.5) + std::exp(-3.0) + std::exp(-2.0))));
    sum += p[i];
  }
  CHECK(sum == doctest::Approx(1.0));
  // d/dlogits of sum_i c_i p_i, against central differences.
  const double c[5] = {1.0, -2.0, 0.5, 3.0, -1.0};
  double d[5];
  for (int i = 0; i < 5; ++i) d[i] = c[i];
  gate::softmax_row_backward(p, 5, d);
  for (int i = 0; i < 5; ++i) {
    double up[5], down[5], pu[5], pd[5];
    for (int j = 0; j < 5; ++j) up[j] = down[j] = v[j];
    up[i] += 1e-6;
    down[i] -= 1e-6;
    gate::softmax_row(up, 5, pu);
    gate::softmax_row(down, 5, pd);
    double fu = 0, fd = 0;
    for (int j = 0; j < 5; ++j) {
      fu += c[j] * pu[j];
      fd += c[j] * pd[j];
    }
    CHECK(d[i] == doctest::Approx((fu - fd) / 2e-6).epsilon(1e-7));
  }
}
