// expert::SwiGLU: E(x) = (silu(x W1) * (x W3)) W2 per expert, on hand-set weights and against an
// Eigen reference, its backward against finite differences (alone and inside layers of depth 1
// and 2, with and without shared experts), and its configuration errors. With GPT-OSS's options
// (biases, alpha, the clamps, up_offset): forward against a per-token reference in float and
// double, backward against finite differences, bf16, the biases through a checkpoint.

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "moe/io/checkpoint.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

// d objective / d *value by central differences with step 1e-6.
template <class F>
double central_difference(F&& objective, double* value) {
  const double keep = *value, step = 1e-6;
  *value = keep + step;
  const double up = objective();
  *value = keep - step;
  const double down = objective();
  *value = keep;
  return (up - down) / (2 * step);
}

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
    auto numeric = [&](double* value) { return central_difference(objective, value); };
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

namespace {

// GPT-OSS's expert (Hugging Face's GptOssExperts).
constexpr expert::SwiGLU::Config gpt_oss(Index h, Precision precision = Precision::fp32) {
  return {.hidden = h, .bias = true, .alpha = 1.702, .limit = 7.0, .up_offset = 1.0, .precision = precision};
}

// Expert e of a group with the options on one token, plain loops in double from the stacked
// parameters (w1, w3 [n * d x h], w2 [n * h x d], b1, b3 [n x h], b2 [n x d], in that order):
// a = x W1 + b1, u = x W3 + b3, y = (min(a, L) sigmoid(alpha min(a, L)) (clamp(u, -L, L) + offset)) W2 + b2.
// Also counts where a and u lie against the bounds: [a > L, a <= L, u > L, u < -L, |u| <= L].
template <class S>
std::vector<double> options_reference(const std::vector<Parameter<S>>& p, const expert::SwiGLU::Config& o, Index e,
                                      const S* x, Index d, std::vector<int>* where = nullptr,
                                      double* nearest_bound = nullptr) {
  const Index h = o.hidden;
  auto at = [&](std::size_t k, Index i) { return static_cast<double>(p[k].value.data[i]); };
  const double lim = o.limit;
  std::vector<double> act(static_cast<std::size_t>(h)), y(static_cast<std::size_t>(d));
  for (Index j = 0; j < h; ++j) {
    double a = at(3, e * h + j), u = at(4, e * h + j);
    for (Index c = 0; c < d; ++c) {
      a += static_cast<double>(x[c]) * at(0, (e * d + c) * h + j);
      u += static_cast<double>(x[c]) * at(1, (e * d + c) * h + j);
    }
    if (where != nullptr) {
      (*where)[a > lim ? 0 : 1] += 1;
      (*where)[u > lim ? 2 : (u < -lim ? 3 : 4)] += 1;
    }
    if (nearest_bound != nullptr)
      *nearest_bound = std::min({*nearest_bound, std::abs(a - lim), std::abs(u - lim), std::abs(u + lim)});
    const double ac = std::min(a, lim), uc = std::max(-lim, std::min(u, lim));
    act[static_cast<std::size_t>(j)] = ac / (1.0 + std::exp(-o.alpha * ac)) * (uc + o.up_offset);
  }
  for (Index c = 0; c < d; ++c) {
    double acc = at(5, e * d + c);
    for (Index j = 0; j < h; ++j) acc += act[static_cast<std::size_t>(j)] * at(2, (e * h + j) * d + c);
    y[static_cast<std::size_t>(c)] = acc;
  }
  return y;
}

// n = 3 experts (the second without rows), d = 4, h = 6, 10 rows: inputs and weights large enough
// that a passes the limit 7 and u passes both -7 and 7.
constexpr Index kN = 3, kD = 4, kH = 6, kRows = 10;
const std::vector<Index> kOffsets{0, 4, 4, 10};

template <class S>
void set_options_values(std::vector<Parameter<S>>& p, Matrix<S>& x) {
  REQUIRE(p.size() == 6);
  const double range[6] = {2.5, 2.5, 1.0, 1.5, 1.5, 0.5};  // w1, w3, w2, b1, b3, b2
  for (std::size_t k = 0; k < 6; ++k) test::fill_uniform(p[k].value, 500 + k, -range[k], range[k]);
  x.resize(kRows, kD);
  test::fill_uniform(x.view(), 77, -4.0, 4.0);
}

template <class S>
struct OptionsRun {
  Matrix<S> y, dx;
  std::vector<std::vector<S>> grads;
};

// forward and backward of a group with the options on the values above, dy uniform in (-1, 1].
template <class S>
OptionsRun<S> run_options(expert::SwiGLU::Group<backend::Cpu<S>>& g, const Matrix<S>& x) {
  typename backend::Cpu<S>::Context ctx;
  OptionsRun<S> r;
  r.y.resize(kRows, kD);
  r.dx.resize(kRows, kD);
  const auto dy = test::random_matrix<S>(kRows, kD, 78);
  typename expert::SwiGLU::Group<backend::Cpu<S>>::Saved saved;
  g.forward(ctx, x.view(), kOffsets.data(), r.y.view(), saved);
  g.backward(ctx, x.view(), kOffsets.data(), saved, dy.view(), r.dx.view());
  for (const auto& q : g.parameters()) r.grads.emplace_back(q.grad.data, q.grad.data + q.size());
  return r;
}

template <class S>
std::vector<double> widen(const S* v, Index count) {
  return {v, v + count};
}

}  // namespace

TEST_CASE("SwiGLU's elementwise step: the clamps, their gradient at and beyond the bounds") {
  const detail::SwiGLUStep<double> step{1.702, 7.0, 1.0, true};
  const auto value = [](double a, double u) {
    const double ac = std::min(a, 7.0), uc = std::max(-7.0, std::min(u, 7.0));
    return ac / (1 + std::exp(-1.702 * ac)) * (uc + 1);
  };
  CHECK(step.value(9.0, 8.0) == doctest::Approx(value(7.0, 7.0)).epsilon(1e-15));
  CHECK(step.value(-9.0, -8.0) == doctest::Approx(value(-9.0, -7.0)).epsilon(1e-15));  // a has no lower bound
  CHECK(step.value(2.0, -3.0) == doctest::Approx(value(2.0, -3.0)).epsilon(1e-15));
  // Beyond a bound: no gradient through the clamped input.
  CHECK(step.grad(7.5, 2.0, 1.0).da == 0.0);
  CHECK(step.grad(7.5, 2.0, 1.0).du != 0.0);
  CHECK(step.grad(2.0, 7.5, 1.0).du == 0.0);
  CHECK(step.grad(2.0, -7.5, 1.0).du == 0.0);
  CHECK(step.grad(2.0, -7.5, 1.0).da != 0.0);
  CHECK(step.grad(-30.0, 2.0, 1.0).da != 0.0);
  // At the bound the gradient passes, as PyTorch's clamp: the one-sided derivative from inside.
  const double e = 1e-7;
  CHECK(step.grad(7.0, 7.0, 1.0).da == doctest::Approx((value(7.0, 7.0) - value(7.0 - e, 7.0)) / e).epsilon(1e-5));
  CHECK(step.grad(7.0, 7.0, 1.0).du == doctest::Approx((value(7.0, 7.0) - value(7.0, 7.0 - e)) / e).epsilon(1e-5));
  CHECK(step.grad(1.0, -7.0, 1.0).du == doctest::Approx((value(1.0, -7.0 + e) - value(1.0, -7.0)) / e).epsilon(1e-5));
  // Without the clamp nothing is held.
  const detail::SwiGLUStep<double> open{1.702, 0.0, 1.0, false};
  CHECK(open.value(9.0, -8.0) == doctest::Approx(9.0 / (1 + std::exp(-1.702 * 9.0)) * -7.0).epsilon(1e-15));
  CHECK(open.grad(9.0, -8.0, 1.0).da != 0.0);
  CHECK(open.grad(9.0, -8.0, 1.0).du != 0.0);
}

TEST_CASE_TEMPLATE("SwiGLU with GPT-OSS's options: forward against a per-token reference, every clamp reached", S,
                   float, double) {
  using G = expert::SwiGLU::Group<backend::Cpu<S>>;
  G g(gpt_oss(kH), kD, kN, 3);
  auto p = g.parameters();
  REQUIRE(p.size() == 6);
  CHECK(p[3].name == "experts.b1");
  CHECK(p[4].name == "experts.b3");
  CHECK(p[5].name == "experts.b2");
  CHECK(p[3].shape == std::vector<Index>{kN, kH});
  CHECK(p[4].shape == std::vector<Index>{kN, kH});
  CHECK(p[5].shape == std::vector<Index>{kN, kD});
  for (std::size_t k = 3; k < 6; ++k)
    for (Index i = 0; i < p[k].size(); ++i) {
      CHECK(p[k].value.data[i] == S(0));  // the biases start at zero
      CHECK(p[k].grad.data[i] == S(0));
    }
  Matrix<S> x;
  set_options_values(p, x);
  typename backend::Cpu<S>::Context ctx;
  Matrix<S> y(kRows, kD, S(123));
  typename G::Saved saved;
  g.forward(ctx, x.view(), kOffsets.data(), y.view(), saved);
  std::vector<int> where(5, 0);
  double nearest = std::numeric_limits<double>::infinity(), largest = 0, worst = 0;
  for (Index e = 0; e < kN; ++e)
    for (Index r = kOffsets[static_cast<std::size_t>(e)]; r < kOffsets[static_cast<std::size_t>(e) + 1]; ++r) {
      const auto want = options_reference(p, gpt_oss(kH), e, x.data() + r * kD, kD, &where, &nearest);
      for (Index c = 0; c < kD; ++c) {
        largest = std::max(largest, std::abs(want[static_cast<std::size_t>(c)]));
        worst = std::max(worst, std::abs(static_cast<double>(y(r, c)) - want[static_cast<std::size_t>(c)]));
      }
    }
  INFO("a > 7: ", where[0], ", a <= 7: ", where[1], ", u > 7: ", where[2], ", u < -7: ", where[3],
       ", |u| <= 7: ", where[4]);
  for (const int w : where) CHECK(w > 0);
  CHECK(nearest > 1e-3);  // no value at a bound, where float and double might clamp differently
  const std::string scalar = std::is_same_v<S, float> ? "float" : "double";
  MESSAGE(scalar, ": worst |y - reference| ", worst, " with |y| up to ", largest);
  CHECK(largest > 10.0);
  CHECK(worst <= (std::is_same_v<S, float> ? 1e-5 : 1e-13) * largest);
}

TEST_CASE("SwiGLU with GPT-OSS's options: backward against finite differences, every parameter and the input") {
  using G = expert::SwiGLU::Group<B>;
  G g(gpt_oss(kH), kD, kN, 3);
  auto params = g.parameters();
  Matrix<double> x;
  set_options_values(params, x);
  // The point is at least 1e-3 from every bound, and reaches every side of the clamps.
  {
    std::vector<int> where(5, 0);
    double nearest = std::numeric_limits<double>::infinity();
    for (Index e = 0; e < kN; ++e)
      for (Index r = kOffsets[static_cast<std::size_t>(e)]; r < kOffsets[static_cast<std::size_t>(e) + 1]; ++r)
        (void)options_reference(params, gpt_oss(kH), e, x.data() + r * kD, kD, &where, &nearest);
    REQUIRE(nearest > 1e-3);
    for (const int w : where) REQUIRE(w > 0);
  }
  const auto dy = test::random_matrix<double>(kRows, kD, 78);
  B::Context ctx;
  auto objective = [&] {
    Matrix<double> y(kRows, kD);
    G::Saved saved;
    g.forward(ctx, x.view(), kOffsets.data(), y.view(), saved);
    double s = 0;
    for (Index i = 0; i < y.size(); ++i) s += dy[i] * y[i];
    return s;
  };
  auto numeric = [&](double* value) { return central_difference(objective, value); };
  const auto run = run_options(g, x);
  std::vector<double> num;
  for (Index i = 0; i < x.size(); ++i) num.push_back(numeric(&x[i]));
  CHECK(test::relative_error(widen(run.dx.data(), x.size()), num) < 1e-7);
  const auto p = g.parameters();
  for (std::size_t k = 0; k < p.size(); ++k) {
    CAPTURE(p[k].name);
    num.clear();
    double norm = 0;
    for (Index i = 0; i < p[k].size(); ++i) {
      num.push_back(numeric(p[k].value.data + i));
      norm += num.back() * num.back();
    }
    CHECK(norm > 0);
    CHECK(test::relative_error(widen(p[k].grad.data, p[k].size()), num) < 1e-7);
    // The expert without rows (expert 1) has an exactly zero gradient.
    const Index per = p[k].size() / kN;
    for (Index i = per; i < 2 * per; ++i) CHECK(p[k].grad.data[i] == 0.0);
  }
}

TEST_CASE("SwiGLU with GPT-OSS's options in float: backward within float rounding of double's") {
  expert::SwiGLU::Group<backend::Cpu<float>> gf(gpt_oss(kH), kD, kN, 3);
  expert::SwiGLU::Group<B> gd(gpt_oss(kH), kD, kN, 3);
  auto pd = gd.parameters();
  Matrix<double> xd;
  set_options_values(pd, xd);
  auto pf = gf.parameters();
  Matrix<float> xf(kRows, kD);
  for (Index i = 0; i < xd.size(); ++i) xf[i] = static_cast<float>(xd[i]);
  for (std::size_t k = 0; k < pd.size(); ++k)
    for (Index i = 0; i < pd[k].size(); ++i) pf[k].value.data[i] = static_cast<float>(pd[k].value.data[i]);
  const auto rf = run_options(gf, xf);
  const auto rd = run_options(gd, xd);
  CHECK(test::relative_error(widen(rf.dx.data(), rf.dx.size()), widen(rd.dx.data(), rd.dx.size())) < 1e-5);
  for (std::size_t k = 0; k < pd.size(); ++k) {
    CAPTURE(pd[k].name);
    const auto& f = rf.grads[k];
    CHECK(test::relative_error(widen(f.data(), static_cast<Index>(f.size())), rd.grads[k]) < 1e-5);
  }
}

TEST_CASE("SwiGLU's defaults compute Mixtral's expert by the same expressions, bit for bit") {
  // Spelled-out defaults are the defaults: three parameters, no biases.
  Group spelled({.hidden = 5, .bias = false, .alpha = 1.0, .limit = 0.0, .up_offset = 0.0}, 4, 3, 2);
  Group plain({.hidden = 5}, 4, 3, 2);
  CHECK(spelled.parameters().size() == 3);
  const auto x = test::random_matrix<double>(8, 4, 3);
  const std::vector<Index> offsets{0, 3, 3, 8};
  B::Context ctx;
  Matrix<double> y(8, 4), dx(8, 4);
  Group::Saved saved;
  plain.forward(ctx, x.view(), offsets.data(), y.view(), saved);
  for (Index i = 0; i < saved.act.size(); ++i) {
    const double a = saved.h1.data()[i], b = saved.h3.data()[i];
    const double want = a * detail::sigmoid(a) * b;
    CHECK(std::memcmp(&saved.act.data()[i], &want, sizeof want) == 0);
  }
  // Neutral options through the options' path (zero biases, alpha 1, no clamp, no offset): the
  // same bits as the default path, forward and backward.
  Group neutral({.hidden = 5, .bias = true}, 4, 3, 2);
  const auto dy = test::random_matrix<double>(8, 4, 4);
  Matrix<double> y2(8, 4), dx2(8, 4);
  Group::Saved saved2;
  neutral.forward(ctx, x.view(), offsets.data(), y2.view(), saved2);
  plain.backward(ctx, x.view(), offsets.data(), saved, dy.view(), dx.view());
  neutral.backward(ctx, x.view(), offsets.data(), saved2, dy.view(), dx2.view());
  CHECK(test::same_bits(ConstMatrixView<double>(y.view()), ConstMatrixView<double>(y2.view())));
  CHECK(test::same_bits(ConstMatrixView<double>(dx.view()), ConstMatrixView<double>(dx2.view())));
  const auto pp = plain.parameters(), pn = neutral.parameters();
  REQUIRE(pn.size() == 6);
  for (std::size_t k = 0; k < 3; ++k)
    CHECK(test::same_bits(ConstMatrixView<double>(pp[k].grad), ConstMatrixView<double>(pn[k].grad)));
}

TEST_CASE("SwiGLU with GPT-OSS's options in bf16: fused [w1 | w3], biases in fp32, close to fp32") {
  using F = backend::Cpu<float>;
  expert::SwiGLU::Group<F> g16(gpt_oss(kH, Precision::bf16), kD, kN, 3);
  expert::SwiGLU::Group<F> g32(gpt_oss(kH), kD, kN, 3);
  auto p16 = g16.parameters();
  auto p32 = g32.parameters();
  Matrix<float> x;
  set_options_values(p16, x);
  set_options_values(p32, x);
  const auto r16 = run_options(g16, x);
  const auto r32 = run_options(g32, x);
  const double ey = test::relative_error(widen(r16.y.data(), r16.y.size()), widen(r32.y.data(), r32.y.size()));
  std::vector<double> all16 = widen(r16.dx.data(), r16.dx.size()), all32 = widen(r32.dx.data(), r32.dx.size());
  for (std::size_t k = 0; k < r16.grads.size(); ++k) {
    all16.insert(all16.end(), r16.grads[k].begin(), r16.grads[k].end());
    all32.insert(all32.end(), r32.grads[k].begin(), r32.grads[k].end());
  }
  const double eg = test::relative_error(all16, all32);
  MESSAGE("bf16 against fp32 with the options: y ", ey, ", dx and every gradient ", eg);
  CHECK(ey < 2e-2);
  CHECK(eg < 1e-1);
  // db2 is the rows of dy summed per expert, in fp32 on both paths.
  CHECK(r16.grads[5] == r32.grads[5]);
  // The options are applied: without them the output is far away.
  expert::SwiGLU::Group<F> bare({.hidden = kH, .precision = Precision::bf16}, kD, kN, 3);
  auto pb = bare.parameters();
  for (std::size_t k = 0; k < 3; ++k)
    for (Index i = 0; i < pb[k].size(); ++i) pb[k].value.data[i] = p16[k].value.data[i];
  const auto rb = run_options(bare, x);
  CHECK(test::relative_error(widen(rb.y.data(), rb.y.size()), widen(r32.y.data(), r32.y.size())) > 0.1);
}

TEST_CASE("SwiGLU with GPT-OSS's options: configuration errors name the value") {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(contains(error_of([&] { Group g({.hidden = 3, .alpha = inf}, 4, 2, 1); }),
                 "expert::SwiGLU: alpha = inf, expected a finite number"));
  CHECK(contains(error_of([&] { Group g({.hidden = 3, .alpha = nan}, 4, 2, 1); }), "expert::SwiGLU: alpha = "));
  CHECK(contains(error_of([] { Group g({.hidden = 3, .limit = -1.0}, 4, 2, 1); }),
                 "expert::SwiGLU: limit = -1, expected a finite number >= 0 (0: no clamp"));
  CHECK(contains(error_of([&] { Group g({.hidden = 3, .limit = inf}, 4, 2, 1); }),
                 "expert::SwiGLU: limit = inf, expected a finite number >= 0"));
  CHECK(contains(error_of([&] { Group g({.hidden = 3, .limit = nan}, 4, 2, 1); }), "expected a finite number >= 0"));
  CHECK(contains(error_of([&] { Group g({.hidden = 3, .up_offset = -inf}, 4, 2, 1); }),
                 "expert::SwiGLU: up_offset = -inf, expected a finite number"));
  using L = Layer<expert::SwiGLU, gate::TopK, B>;
  CHECK(contains(error_of([] { L l({.d_model = 4, .n_experts = 4, .expert = {.hidden = 2, .limit = -7.0}}); }),
                 "expert::SwiGLU: limit = -7, expected a finite number >= 0"));
  // Negative alpha and offsets are finite numbers, and accepted.
  CHECK(error_of([] { Group g({.hidden = 3, .alpha = -1.0, .up_offset = -2.0}, 4, 2, 1); }).empty());
}

TEST_CASE("SwiGLU with GPT-OSS's options: layer gradients with a shared expert") {
  using L = Layer<expert::SwiGLU, gate::TopK, B>;
  L::Config config{
      .d_model = 4, .n_experts = 4, .expert = gpt_oss(5), .gate = {.k = 2, .w_importance = 1.0, .w_z = 0.1}};
  config.shared_experts = 1;
  check_gradients<L>(config, 10, false);
  // A limit the layer's pre-activations cross (of order 1 here).
  config.expert.limit = 0.5;
  check_gradients<L>(config, 10, false);
}

TEST_CASE("SwiGLU's biases go through a checkpoint as experts.<i>.b1, b3, b2, with the options in the metadata") {
  using L = Layer<expert::SwiGLU, gate::TopK, backend::Cpu<float>>;
  L::Config config{.d_model = 4, .n_experts = 3, .expert = gpt_oss(5), .gate = {.k = 2}, .seed = 1};
  config.shared_experts = 1;
  L a(config);
  test::randomize_parameters(a, 6, 0.8);
  const auto dir = std::filesystem::temp_directory_path() / ("moe-swiglu-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto file = dir / "layer.safetensors";
  io::save(a, file);
  {
    const auto st = io::SafeTensors::open(file);
    for (const std::string prefix : {"experts.0.", "experts.2.", "shared_experts.0."}) {
      CAPTURE(prefix);
      REQUIRE(st.contains(prefix + "b1"));
      REQUIRE(st.contains(prefix + "b3"));
      REQUIRE(st.contains(prefix + "b2"));
      CHECK(st.info(prefix + "b1").shape == std::vector<std::int64_t>{5});
      CHECK(st.info(prefix + "b3").shape == std::vector<std::int64_t>{5});
      CHECK(st.info(prefix + "b2").shape == std::vector<std::int64_t>{4});
    }
    // Expert 2's b3 is row 2 of experts.b3.
    const auto b3 = st.read<float>("experts.2.b3", io::Expect{std::vector<std::int64_t>{5}, true});
    const auto params = a.parameters();
    const auto* stacked = test::find_parameter<L>(params, "experts.b3");
    REQUIRE(stacked != nullptr);
    CHECK(b3 == std::vector<float>(stacked->value.data + 2 * 5, stacked->value.data + 3 * 5));
    const auto m = io::describe(a);
    CHECK(m.at("config.expert.bias") == "true");
    CHECK(m.at("config.expert.alpha") == "1.702");
    CHECK(m.at("config.expert.limit") == "7");
    CHECK(m.at("config.expert.up_offset") == "1");
  }
  // Into a layer of another seed: every tensor, biases included, the same bits; and a layer built
  // from the file alone has the options.
  config.seed = 2;
  L b(config);
  io::load(b, file);
  L c = io::load_layer<L>(file);
  CHECK(c.config().expert.bias);
  CHECK(c.config().expert.alpha == 1.702);
  CHECK(c.config().expert.limit == 7.0);
  CHECK(c.config().expert.up_offset == 1.0);
  const auto pa = a.parameters(), pb = b.parameters(), pc = c.parameters();
  REQUIRE(pa.size() == pb.size());
  REQUIRE(pa.size() == pc.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CAPTURE(pa[i].name);
    CHECK(test::same_bits(ConstMatrixView<float>(pa[i].value), ConstMatrixView<float>(pb[i].value)));
    CHECK(test::same_bits(ConstMatrixView<float>(pa[i].value), ConstMatrixView<float>(pc[i].value)));
  }
  const auto x = test::random_matrix<float>(6, 4, 12);
  const auto fa = a.forward(x.view(), Mode::inference), fc = c.forward(x.view(), Mode::inference);
  CHECK(test::same_bits(fa.y(), fc.y()));
  std::filesystem::remove_all(dir);
}
