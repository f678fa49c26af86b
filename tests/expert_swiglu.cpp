// expert::SwiGLU: E(x) = (silu(x W1) * (x W3)) W2 per expert, on hand-set weights and against an
// Eigen reference, its backward against finite differences (alone and inside layers of depth 1
// and 2, with and without shared experts), and its configuration errors.

#include <cmath>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using Group = expert::SwiGLU::Group<B>;
using Dense = test::Dense<double>;

static_assert(ExpertFamily<expert::SwiGLU, B>);
static_assert(ExpertFamily<expert::SwiGLU, backend::Cpu<float>>);

using test::contains;
using test::error_of;

Dense dense(ConstMatrixView<double> v) { return test::to_dense(v); }

// Expert e's slice of a parameter stacked over experts ([n * rows_per_expert x cols]).
Dense slice(const Parameter<double>& p, Index e) {
  const Index rows = p.shape[1];
  return dense(ConstMatrixView<double>(p.value.block_rows(e * rows, rows)));
}

// The reference: (silu(x W1) .* (x W3)) W2, in Eigen.
Dense swiglu_reference(const Dense& x, const Dense& w1, const Dense& w3, const Dense& w2) {
  const Dense a = x * w1;
  const Dense b = x * w3;
  const Dense act = (a.array() / (1.0 + (-a.array()).exp()) * b.array()).matrix();
  return act * w2;
}

void set(MatrixView<double> v, const std::vector<double>& values) {
  REQUIRE(static_cast<Index>(values.size()) == v.rows * v.cols);
  for (Index i = 0; i < v.rows * v.cols; ++i) v.data[i] = values[static_cast<std::size_t>(i)];
}

// n = 2, d = 2, h = 3 with hand-set weights (expert 0 first in each stack).
Group tiny_group() {
  Group g({.hidden = 3}, 2, 2, 7);
  auto p = g.parameters();
  REQUIRE(p.size() == 3);
  set(p[0].value, {1, 0, -1, 0.5, 2, 0,  // w1, expert 0: [[1, 0, -1], [0.5, 2, 0]]
                   -1, 0.25, 1, 1, -0.5, 0.75});
  set(p[1].value, {1, 1, 1, 0, -1, 2,  // w3, expert 0: [[1, 1, 1], [0, -1, 2]]
                   0.5, -1, 0, 2, 1, -0.5});
  set(p[2].value, {1, 0, 0, 1, 1, -1,  // w2, expert 0: [[1, 0], [0, 1], [1, -1]]
                   -0.5, 1, 2, 0.5, 0, -1});
  return g;
}

template <class L>
void copy_parameters(L& from, L& to) {
  auto src = from.parameters();
  for (auto& p : to.parameters()) {
    const auto* q = test::find_parameter<L>(src, p.name);
    REQUIRE(q != nullptr);
    REQUIRE(q->size() == p.size());
    for (Index i = 0; i < p.size(); ++i) p.value.data[i] = q->value.data[i];
  }
}

// Loops seeds until the routing holds still under every probe, then requires the check to pass
// with every parameter taking part.
template <class L>
void check_gradients(const typename L::Config& base, Index t_count, bool noisy) {
  for (std::uint64_t seed = 1; seed < 30; ++seed) {
    auto config = base;
    config.seed = seed;
    L layer(config);
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 1);
    const auto dy = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 2);
    Matrix<double> z(t_count, layer.noise_columns());
    test::fill_normal(z.view(), seed * 31 + 3);
    const auto result =
        test::check_layer_gradients(layer, x.view(), dy.view(), noisy ? Noise<double>(z.view()) : Noise<double>());
    if (!result.routing_stable) continue;
    std::string failures, zero;
    for (const auto& f : result.failures) failures += f + "; ";
    for (const auto& name : result.zero_grads) zero += name + "; ";
    INFO("failures: ", failures, " zero gradients: ", zero);
    CHECK(result.failures.empty());
    CHECK(result.worst < 1e-6);
    CHECK(result.zero_grads.empty());
    MESSAGE("seed ", seed, ": worst relative error ", result.worst);
    return;
  }
  FAIL("no seed with stable routing in 30");
}

}  // namespace

TEST_CASE("SwiGLU parameters: names, shapes, order and initialization bounds") {
  const Index n = 3, d = 4, h = 6;
  Group g({.hidden = h}, d, n, 11);
  const auto p = g.parameters();
  REQUIRE(p.size() == 3);
  CHECK(p[0].name == "experts.w1");
  CHECK(p[1].name == "experts.w3");
  CHECK(p[2].name == "experts.w2");
  CHECK(p[0].shape == std::vector<Index>{n, d, h});
  CHECK(p[1].shape == std::vector<Index>{n, d, h});
  CHECK(p[2].shape == std::vector<Index>{n, h, d});
  CHECK(p[0].size() == n * d * h);
  CHECK(p[2].size() == n * h * d);
  for (const auto& q : p) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(q.shape[1]));
    double largest = 0;
    for (Index i = 0; i < q.size(); ++i) {
      CHECK(q.value.data[i] > -bound);
      CHECK(q.value.data[i] <= bound);
      largest = std::max(largest, std::abs(q.value.data[i]));
      CHECK(q.grad.data[i] == 0.0);
    }
    CHECK(largest > 0.5 * bound);
  }
  // w1 and w3 have the same shape but their own streams.
  CHECK(p[0].value.data[0] != p[1].value.data[0]);
  // A pure function of the seed.
  Group same({.hidden = h}, d, n, 11);
  const auto ps = same.parameters();
  for (std::size_t i = 0; i < p.size(); ++i)
    CHECK(test::same_bits(ConstMatrixView<double>(p[i].value), ConstMatrixView<double>(ps[i].value)));
}

TEST_CASE("SwiGLU forward on a tiny group: hand values and the Eigen reference per expert") {
  Group g = tiny_group();
  const auto p = g.parameters();
  Matrix<double> x(3, 2);
  set(x.view(), {1, -1, 0.3, 2, -1.5, 0.4});
  B::Context ctx;
  // The first row through expert 0, by hand: h1 = [0.5, -2, -1], h3 = [1, 2, -1],
  // act = silu(h1) * h3, y = act W2.
  {
    const std::vector<Index> offsets{0, 1, 1};
    const auto x1 = ConstMatrixView<double>(x.view()).block_rows(0, 1);
    Matrix<double> y(1, 2);
    Group::Saved saved;
    g.forward(ctx, x1, offsets.data(), y.view(), saved);
    CHECK(y(0, 0) == doctest::Approx(0.5801710869709225).epsilon(1e-14));
    CHECK(y(0, 1) == doctest::Approx(-0.7457531094584653).epsilon(1e-14));
    CHECK(saved.h1(0, 1) == -2.0);
    CHECK(saved.h3(0, 2) == -1.0);
  }
  // Every split of the three rows, empty experts included.
  for (const auto& offsets : std::vector<std::vector<Index>>{{0, 1, 3}, {0, 0, 3}, {0, 3, 3}, {0, 2, 3}}) {
    CAPTURE(offsets[1]);
    Matrix<double> y(3, 2, 123.0);
    Group::Saved saved;
    g.forward(ctx, x.view(), offsets.data(), y.view(), saved);
    for (Index e = 0; e < 2; ++e) {
      const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e) + 1] - r0;
      if (m == 0) continue;
      const Dense xe = dense(ConstMatrixView<double>(x.view()).block_rows(r0, m));
      const Dense want = swiglu_reference(xe, slice(p[0], e), slice(p[1], e), slice(p[2], e));
      const Dense got = dense(ConstMatrixView<double>(y.view()).block_rows(r0, m));
      CHECK((got - want).cwiseAbs().maxCoeff() < 1e-14);
    }
  }
}

TEST_CASE("SwiGLU backward on a tiny group: finite differences, an empty expert gets no gradient") {
  for (const auto& offsets : std::vector<std::vector<Index>>{{0, 0, 3}, {0, 2, 3}, {0, 3, 3}}) {
    CAPTURE(offsets[1]);
    Group g = tiny_group();
    Matrix<double> x(3, 2), dy(3, 2);
    set(x.view(), {1, -1, 0.3, 2, -1.5, 0.4});
    set(dy.view(), {0.7, -0.2, 1.1, 0.5, -0.9, 0.3});
    B::Context ctx;
    auto objective = [&] {
      Matrix<double> y(3, 2);
      Group::Saved saved;
      g.forward(ctx, x.view(), offsets.data(), y.view(), saved);
      double s = 0;
      for (Index i = 0; i < y.size(); ++i) s += dy[i] * y[i];
      return s;
    };
    auto numeric = [&](double* value) {
      const double keep = *value, step = 1e-6;
      *value = keep + step;
      const double up = objective();
      *value = keep - step;
      const double down = objective();
      *value = keep;
      return (up - down) / (2 * step);
    };
    Matrix<double> y(3, 2), dx(3, 2, 99.0);
    Group::Saved saved;
    g.forward(ctx, x.view(), offsets.data(), y.view(), saved);
    g.backward(ctx, x.view(), offsets.data(), saved, dy.view(), dx.view());

    std::vector<double> analytic, num;
    for (Index i = 0; i < x.size(); ++i) {
      analytic.push_back(dx[i]);
      num.push_back(numeric(&x[i]));
    }
    CHECK(test::relative_error(analytic, num) < 1e-8);
    for (const auto& p : g.parameters()) {
      CAPTURE(p.name);
      analytic.clear();
      num.clear();
      for (Index i = 0; i < p.size(); ++i) {
        analytic.push_back(p.grad.data[i]);
        num.push_back(numeric(p.value.data + i));
      }
      CHECK(test::relative_error(analytic, num) < 1e-8);
      // The expert with no rows has an exactly zero gradient.
      for (Index e = 0; e < 2; ++e) {
        if (offsets[static_cast<std::size_t>(e) + 1] != offsets[static_cast<std::size_t>(e)]) continue;
        const Index per = p.size() / 2;
        for (Index i = e * per; i < (e + 1) * per; ++i) CHECK(p.grad.data[i] == 0.0);
      }
    }
    // Backward adds into the gradients: a second call doubles them.
    const auto p = g.parameters();
    std::vector<double> once(p[0].grad.data, p[0].grad.data + p[0].size());
    g.backward(ctx, x.view(), offsets.data(), saved, dy.view(), dx.view());
    for (Index i = 0; i < p[0].size(); ++i) CHECK(p[0].grad.data[i] == 2 * once[static_cast<std::size_t>(i)]);
  }
}

TEST_CASE("SwiGLU reuses its buffers across calls") {
  Group g({.hidden = 5}, 4, 3, 2);
  const auto x = test::random_matrix<double>(8, 4, 3);
  const std::vector<Index> offsets{0, 3, 3, 8};
  Matrix<double> y(8, 4), dx(8, 4);
  B::Context ctx;
  Group::Saved saved;
  g.forward(ctx, x.view(), offsets.data(), y.view(), saved);
  const double* h1 = saved.h1.data();
  const double* act = saved.act.data();
  const Matrix<double> first = y;
  g.forward(ctx, x.view(), offsets.data(), y.view(), saved);
  CHECK(saved.h1.data() == h1);
  CHECK(saved.act.data() == act);
  CHECK(test::same_bits(ConstMatrixView<double>(y.view()), first.view()));
  // Fewer rows: the same storage.
  const std::vector<Index> fewer{0, 2, 2, 5};
  g.forward(ctx, ConstMatrixView<double>(x.view()).block_rows(0, 5), fewer.data(), y.view().block_rows(0, 5), saved);
  CHECK(saved.h1.data() == h1);
  CHECK(saved.h1.rows() == 5);
}

TEST_CASE("SwiGLU configuration errors") {
  CHECK(contains(error_of([] { Group g({.hidden = 0}, 4, 2, 1); }), "expert::SwiGLU: hidden = 0, expected at least 1"));
  CHECK(
      contains(error_of([] { Group g({.hidden = -3}, 4, 2, 1); }), "expert::SwiGLU: hidden = -3, expected at least 1"));
  CHECK(contains(error_of([] { Group g({}, 4, 2, 1); }), "hidden = 0, expected at least 1 (set Config::hidden)"));
  CHECK(contains(error_of([] { Group g({.hidden = 3}, 4, 0, 1); }),
                 "expert::SwiGLU: n_experts = 0, expected at least 1"));
  CHECK(
      contains(error_of([] { Group g({.hidden = 3}, 0, 2, 1); }), "expert::SwiGLU: d_model = 0, expected at least 1"));
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, B>;
  CHECK(contains(error_of([] { L l({.d_model = 4, .n_experts = 4, .expert = {.hidden = 0}}); }),
                 "expert::SwiGLU: hidden = 0, expected at least 1"));
  CHECK(contains(error_of([] { L l({.d_model = 4, .n_experts = 4, .expert = {.hidden = -1}, .shared_experts = 2}); }),
                 "expert::SwiGLU: hidden = -1, expected at least 1"));
}

TEST_CASE("SwiGLU layer gradients with the noisy top-k gate (explicit noise)") {
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, B>;
  for (const Index k : {1, 2}) {
    CAPTURE(k);
    check_gradients<L>(
        {.d_model = 4, .n_experts = 4, .expert = {.hidden = 5}, .gate = {.k = k, .w_importance = 1.0, .w_load = 1.0}},
        10, true);
  }
}

TEST_CASE("SwiGLU layer gradients with the top-k gate") {
  using L = Layer<expert::SwiGLU, gate::TopK, B>;
  check_gradients<L>(
      {.d_model = 4, .n_experts = 4, .expert = {.hidden = 5}, .gate = {.k = 2, .w_importance = 1.0, .w_z = 0.1}}, 10,
      false);
}

TEST_CASE("SwiGLU in a depth-2 layer: forward, backward and gradients") {
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, B, 2>;
  const L::Config config{.d_model = 4,
                         .n_experts = 9,
                         .expert = {.hidden = 3},
                         .gate = {.levels = {{{.branching = 3, .gate = {.k = 2}}, {.branching = 3, .gate = {.k = 2}}}},
                                  .w_importance = 1.0,
                                  .w_load = 1.0}};
  {
    L layer(config);
    const Index t_count = 12;
    const auto x = test::random_matrix<double>(t_count, 4, 5);
    const auto dy = test::random_matrix<double>(t_count, 4, 6);
    Rng rng(3);
    const auto f = layer.forward(x.view(), Mode::train, rng);
    CHECK(f.y().rows == t_count);
    CHECK(f.expert_index().cols == 4);
    Index routed = 0;
    for (const Index c : f.stats().tokens_per_expert) routed += c;
    CHECK(routed == t_count * 4);
    double norm = 0;
    for (Index r = 0; r < t_count; ++r)
      for (Index c = 0; c < 4; ++c) norm += f.y()(r, c) * f.y()(r, c);
    CHECK(norm > 0);
    layer.zero_grad();
    const auto back = layer.backward(f, dy.view());
    CHECK(back.dx.rows() == t_count);
    const auto inference = layer.forward(x.view(), Mode::inference);
    CHECK(inference.y().rows == t_count);
  }
  check_gradients<L>(config, 12, true);
}

TEST_CASE("SwiGLU shared experts: every token gets their sum on top of the routed output") {
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, B>;
  const Index d = 4, h = 5, n = 4, s_count = 2, t_count = 9;
  L::Config config{.d_model = d, .n_experts = n, .expert = {.hidden = h}, .gate = {.k = 2}, .seed = 3};
  config.shared_experts = s_count;
  L shared(config);
  config.shared_experts = 0;
  L plain(config);
  test::randomize_parameters(shared, 4, 0.8);
  copy_parameters(shared, plain);  // the routed parameters and the gate; the plain layer has no shared ones

  const auto params = shared.parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  REQUIRE(names.size() >= 6);
  const std::vector<std::string> tail(names.end() - 6, names.end());
  CHECK(tail == std::vector<std::string>{"experts.w1", "experts.w3", "experts.w2", "shared_experts.w1",
                                         "shared_experts.w3", "shared_experts.w2"});
  const auto* sw1 = test::find_parameter<L>(params, "shared_experts.w1");
  const auto* sw3 = test::find_parameter<L>(params, "shared_experts.w3");
  const auto* sw2 = test::find_parameter<L>(params, "shared_experts.w2");
  REQUIRE(sw1 != nullptr);
  REQUIRE(sw3 != nullptr);
  REQUIRE(sw2 != nullptr);
  CHECK(sw1->shape == std::vector<Index>{s_count, d, h});
  CHECK(sw3->shape == std::vector<Index>{s_count, d, h});
  CHECK(sw2->shape == std::vector<Index>{s_count, h, d});
  REQUIRE(shared.shared_experts() != nullptr);
  CHECK(shared.shared_experts()->n_experts() == s_count);
  CHECK(plain.shared_experts() == nullptr);

  const auto x = test::random_matrix<double>(t_count, d, 8);
  Matrix<double> z(t_count, n);
  test::fill_normal(z.view(), 9);
  const auto fs = shared.forward(x.view(), Mode::train, Noise<double>(z.view()));
  const auto fp = plain.forward(x.view(), Mode::train, Noise<double>(z.view()));
  CHECK(test::same_bits(fs.expert_index(), fp.expert_index()));
  CHECK(test::same_bits(fs.gates(), fp.gates()));
  Dense want = dense(fp.y());
  for (Index e = 0; e < s_count; ++e)
    want += swiglu_reference(dense(x.view()), slice(*sw1, e), slice(*sw3, e), slice(*sw2, e));
  const Dense got = dense(fs.y());
  CHECK((got - want).cwiseAbs().maxCoeff() < 1e-12);
  // The shared part is not zero, so the comparison above can fail.
  CHECK((got - dense(fp.y())).cwiseAbs().maxCoeff() > 1e-3);
  // Inference too, without noise.
  const auto is = shared.forward(x.view(), Mode::inference);
  const auto ip = plain.forward(x.view(), Mode::inference);
  Dense want_i = dense(ip.y());
  for (Index e = 0; e < s_count; ++e)
    want_i += swiglu_reference(dense(x.view()), slice(*sw1, e), slice(*sw3, e), slice(*sw2, e));
  CHECK((dense(is.y()) - want_i).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("SwiGLU layer gradients with shared experts") {
  using L = Layer<expert::SwiGLU, gate::NoisyTopK, B>;
  L::Config config{
      .d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2, .w_importance = 1.0, .w_load = 1.0}};
  config.shared_experts = 2;
  check_gradients<L>(config, 10, true);
}
