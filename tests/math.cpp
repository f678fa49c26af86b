// Every formula of MATH.md against values worked out by hand.

#include <limits>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

TEST_CASE("CV^2 uses the population variance, and is 0 for one element or none (MATH.md 3)") {
  const std::vector<double> v{1, 2, 3, 4};  // mean 2.5, variance 1.25, 1.25 / 6.25 = 0.2
  CHECK(cv_squared(v) == doctest::Approx(1.25 / (6.25 + 1e-10)).epsilon(1e-15));
  CHECK(cv_squared(v) == doctest::Approx(0.2).epsilon(1e-10));
  CHECK(cv_squared(std::vector<double>{}) == 0.0);
  CHECK(cv_squared(std::vector<double>{7.0}) == 0.0);
  CHECK(cv_squared(std::vector<double>{3, 3, 3}) == 0.0);
  // All zeros: 0 / (0 + 1e-10) = 0, no NaN.
  CHECK(cv_squared(std::vector<double>{0, 0}) == 0.0);
  // [0, 2]: mean 1, variance 1, 1 / (1 + 1e-10).
  CHECK(cv_squared(std::vector<double>{0, 2}) == doctest::Approx(1.0 / (1.0 + 1e-10)).epsilon(1e-15));
  CHECK(cv_squared(std::vector<float>{1, 2, 3, 4}) == doctest::Approx(0.2f).epsilon(1e-6));
}

TEST_CASE("CV^2 gradient equals central finite differences") {
  std::vector<double> v{0.3, 1.7, 2.2, 0.9, 4.1};
  std::vector<double> grad(v.size(), 0.0);
  cv_squared_grad(v.data(), 5, 2.0, grad.data());
  for (std::size_t i = 0; i < v.size(); ++i) {
    auto p = v, m = v;
    p[i] += 1e-6;
    m[i] -= 1e-6;
    const double fd = 2.0 * (cv_squared(p) - cv_squared(m)) / 2e-6;
    CHECK(grad[i] == doctest::Approx(fd).epsilon(1e-7));
  }
  std::vector<double> one{5.0}, g1{0.0};
  cv_squared_grad(one.data(), 1, 1.0, g1.data());
  CHECK(g1[0] == 0.0);
}

TEST_CASE("softplus, sigmoid and the guarded normal CDF (MATH.md 2-3)") {
  CHECK(detail::softplus(0.0) == doctest::Approx(std::log(2.0)).epsilon(1e-15));
  CHECK(detail::softplus(50.0) == doctest::Approx(50.0).epsilon(1e-15));
  CHECK(detail::softplus(800.0) == 800.0);  // no overflow
  CHECK(detail::softplus(-50.0) == doctest::Approx(std::exp(-50.0)).epsilon(1e-12));
  CHECK(detail::sigmoid(0.0) == 0.5);
  CHECK(detail::sigmoid(-800.0) == 0.0);
  CHECK(detail::sigmoid(800.0) == 1.0);
  CHECK(detail::normal_cdf_scaled(0.0, 1.0) == doctest::Approx(0.5));
  CHECK(detail::normal_cdf_scaled(1.0, 1.0) == doctest::Approx(0.8413447460685429).epsilon(1e-12));
  CHECK(detail::normal_cdf_scaled(-1.0, 2.0) == doctest::Approx(0.3085375387259869).epsilon(1e-12));
  // A zero sigma gives a step, never NaN.
  CHECK(detail::normal_cdf_scaled(0.3, 0.0) == 1.0);
  CHECK(detail::normal_cdf_scaled(-0.3, 0.0) == 0.0);
  CHECK(detail::normal_cdf_scaled(0.0, 0.0) == 0.5);
  // Partial derivatives against finite differences.
  const auto g = detail::normal_cdf_scaled_grad(0.4, 0.7);
  const double h = 1e-6;
  CHECK(g.dz ==
        doctest::Approx((detail::normal_cdf_scaled(0.4 + h, 0.7) - detail::normal_cdf_scaled(0.4 - h, 0.7)) / (2 * h))
            .epsilon(1e-8));
  CHECK(g.dsigma ==
        doctest::Approx((detail::normal_cdf_scaled(0.4, 0.7 + h) - detail::normal_cdf_scaled(0.4, 0.7 - h)) / (2 * h))
            .epsilon(1e-8));
}

TEST_CASE("top-k is stable: larger first, ties to the lower index (MATH.md 2)") {
  const double v[] = {1.0, 3.0, 3.0, 2.0, 3.0};
  Index out[4];
  top_k_stable(v, 5, 4, out);
  CHECK(out[0] == 1);
  CHECK(out[1] == 2);
  CHECK(out[2] == 4);
  CHECK(out[3] == 3);
  const double flat[] = {0.0, 0.0, 0.0, 0.0};
  top_k_stable(flat, 4, 3, out);
  CHECK(out[0] == 0);
  CHECK(out[1] == 1);
  CHECK(out[2] == 2);
  const double neg[] = {-5.0, -1.0, -3.0};
  top_k_stable(neg, 3, 3, out);
  CHECK(out[0] == 1);
  CHECK(out[1] == 2);
  CHECK(out[2] == 0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double with_nan[] = {nan, 1.0, nan, 2.0};
  top_k_stable(with_nan, 4, 4, out);
  CHECK(out[0] == 3);
  CHECK(out[1] == 1);
  CHECK(out[2] == 0);
  CHECK(out[3] == 2);
}

TEST_CASE("Philox4x32-10 matches the published known-answer vectors") {
  auto r = detail::philox4x32_10({{0, 0, 0, 0}}, 0, 0);
  CHECK(r.v[0] == 0x6627e8d5u);
  CHECK(r.v[1] == 0xe169c58du);
  CHECK(r.v[2] == 0xbc57ac4cu);
  CHECK(r.v[3] == 0x9b00dbd8u);
  r = detail::philox4x32_10({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  CHECK(r.v[0] == 0x408f276du);
  CHECK(r.v[1] == 0x41c83b0eu);
  CHECK(r.v[2] == 0xa20bc7c6u);
  CHECK(r.v[3] == 0x6d5451fdu);
  r = detail::philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  CHECK(r.v[0] == 0xd16cfe09u);
  CHECK(r.v[1] == 0x94fdccebu);
  CHECK(r.v[2] == 0x5001e420u);
  CHECK(r.v[3] == 0x24126ea1u);
}

TEST_CASE("normal draws have mean 0 and variance 1") {
  const CounterRandom r{1234};
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double z = r.normal(static_cast<std::uint64_t>(i), 3, 5);
    sum += z;
    sq += z * z;
  }
  CHECK(std::abs(sum / n) < 0.01);
  CHECK(std::abs(sq / n - 1.0) < 0.01);
}

namespace {
// A one-feature layer: with x = [1], the clean logits are W_g's row and the noise logits W_noise's row.
using Layer1 = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<double>>;
Layer1 one_token_layer(Index k) {
  Layer1 layer({.d_model = 1, .n_experts = 3, .expert = {.hidden = 2}, .gate = {.k = k}});
  auto params = layer.parameters();
  auto* wg = params[0].value.data;
  wg[0] = 1.0;
  wg[1] = 0.5;
  wg[2] = -0.2;  // W_noise stays 0: sigma = softplus(0) + 0.01 = ln 2 + 0.01
  return layer;
}
}  // namespace

TEST_CASE("P(x, i) and the gates for a token worked out by hand (MATH.md 2-3)") {
  Matrix<double> x(1, 1, 1.0), z(1, 3, 0.0);
  // clean = H = [1, 0.5, -0.2]; sigma = 0.7031471805599453 for every expert.
  SUBCASE("k = 1: expert 0 kept, threshold for it is H_1, for the others H_0") {
    auto layer = one_token_layer(1);
    auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
    CHECK(f.expert_index()(0, 0) == 0);
    CHECK(f.gates()(0, 0) == 1.0);
    const auto& st = f.stats();
    REQUIRE_FALSE(st.load_is_count);
    CHECK(st.load[0] == doctest::Approx(0.7614853576414569).epsilon(1e-12));   // Phi(0.5 / sigma)
    CHECK(st.load[1] == doctest::Approx(0.23851464235854308).epsilon(1e-12));  // Phi(-0.5 / sigma)
    CHECK(st.load[2] == doctest::Approx(0.04394701940601298).epsilon(1e-12));  // Phi(-1.2 / sigma)
    CHECK(st.importance[0] == 1.0);
    CHECK(st.importance[1] == 0.0);
  }
  SUBCASE("k = 2: softmax over the two kept logits") {
    auto layer = one_token_layer(2);
    auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
    CHECK(f.expert_index()(0, 0) == 0);
    CHECK(f.expert_index()(0, 1) == 1);
    CHECK(f.gates()(0, 0) == doctest::Approx(0.6224593312018545).epsilon(1e-12));
    CHECK(f.gates()(0, 1) == doctest::Approx(1 - 0.6224593312018545).epsilon(1e-12));
    // Kept experts compare with the third logit (-0.2); the dropped one with the second (0.5).
    const double s = 0.7031471805599453;
    auto phi = [](double u) { return 0.5 * std::erfc(-u / std::sqrt(2.0)); };
    CHECK(f.stats().load[0] == doctest::Approx(phi(1.2 / s)).epsilon(1e-12));
    CHECK(f.stats().load[1] == doctest::Approx(phi(0.7 / s)).epsilon(1e-12));
    CHECK(f.stats().load[2] == doctest::Approx(phi(-0.7 / s)).epsilon(1e-12));
  }
  SUBCASE("noise moves the ranking: H = clean + z * sigma") {
    auto layer = one_token_layer(1);
    Matrix<double> z2(1, 3, 0.0);
    z2(0, 2) = 2.0;  // H_2 = -0.2 + 2 * 0.70315 = 1.2063 > 1
    auto f = layer.forward(x.view(), Mode::train, Noise<double>(z2.view()));
    CHECK(f.expert_index()(0, 0) == 2);
  }
  SUBCASE("inference: sigma = 0, no noise, load is the count") {
    auto layer = one_token_layer(1);
    Matrix<double> z2(1, 3, 5.0);
    auto f = layer.forward(x.view(), Mode::inference, Noise<double>(z2.view()));
    CHECK(f.expert_index()(0, 0) == 0);
    CHECK(f.stats().load_is_count);
    CHECK(f.stats().load == std::vector<double>{1, 0, 0});
  }
}

TEST_CASE("the balancing loss is w_importance CV^2(Importance) + w_load CV^2(Load) (MATH.md 3)") {
  using L = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<double>>;
  L layer(
      {.d_model = 3, .n_experts = 4, .expert = {.hidden = 2}, .gate = {.k = 2, .w_importance = 0.3, .w_load = 0.7}});
  test::randomize_parameters(layer, 5);
  auto x = test::random_matrix<double>(9, 3, 17);
  Rng rng(2);
  auto f = layer.forward(x.view(), Mode::train, rng);
  const auto& st = f.stats();
  CHECK(st.cv2_importance == doctest::Approx(cv_squared(st.importance)).epsilon(1e-14));
  CHECK(st.cv2_load == doctest::Approx(cv_squared(st.load)).epsilon(1e-14));
  CHECK(st.loss == doctest::Approx(0.3 * st.cv2_importance + 0.7 * st.cv2_load).epsilon(1e-14));
  CHECK(f.loss() == st.loss);
  // Importance is the column sum of the dense gates.
  std::vector<double> imp(4, 0.0);
  for (Index t = 0; t < 9; ++t)
    for (Index j = 0; j < 2; ++j) imp[static_cast<std::size_t>(f.expert_index()(t, j))] += f.gates()(t, j);
  for (int i = 0; i < 4; ++i)
    CHECK(st.importance[static_cast<std::size_t>(i)] ==
          doctest::Approx(imp[static_cast<std::size_t>(i)]).epsilon(1e-14));
}
