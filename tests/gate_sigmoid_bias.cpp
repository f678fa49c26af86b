// gate::SigmoidBias: sigmoid scores, group-limited selection by score + bias, gates normalized
// over the chosen scores without the bias, and the bias moved by the counts of every training
// forward. Hand-computed selections and bias steps, balancing by the bias alone, finite
// differences at depth 1 and 2, and the configuration checks.

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using Gate = gate::SigmoidBias;
using Policy = Gate::Policy<B>;
using FlatLayer = Layer<expert::FeedForward, Gate, B>;
using DeepLayer = Layer<expert::FeedForward, Gate, B, 2>;

static_assert(GateFamily<Gate, B>);
static_assert(GateFamily<Gate, backend::Cpu<float>>);

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

Matrix<double> rows_of(const std::vector<std::vector<double>>& rows) {
  Matrix<double> m(static_cast<Index>(rows.size()), static_cast<Index>(rows[0].size()));
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c)
      m.view()(r, c) = rows[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)];
  return m;
}

// A gate of `groups` stacked groups with d = n and W_g = I in every group: the logits are the input rows.
Policy identity_gate(const Gate::Config& config, Index n, Index groups = 1) {
  Policy p(config, n, n, 1, groups);
  auto w = p.parameters()[0].value;
  for (Index r = 0; r < w.rows; ++r)
    for (Index c = 0; c < w.cols; ++c) w(r, c) = (r % n) == c ? 1.0 : 0.0;
  return p;
}

struct Routed {
  std::vector<Index> expert;
  std::vector<double> gate;
};

Routed run(Policy& p, const Matrix<double>& x, Mode mode, const Index* offsets = nullptr) {
  B::Context ctx;
  GateRouting<B> routing;
  Policy::Saved saved;
  p.forward(ctx, x.view(), offsets, mode, GateNoise<double>{}, routing, saved);
  Routed out;
  for (Index i = 0; i < routing.expert.rows() * routing.expert.cols(); ++i) {
    out.expert.push_back(routing.expert.data()[i]);
    out.gate.push_back(routing.gate.data()[i]);
  }
  CHECK(routing.load_is_count);
  CHECK(routing.loss_aux == 0);
  CHECK(routing.loss_z == 0);
  return out;
}

std::vector<double> bias_of(const Policy& p) {
  const auto b = p.bias();
  std::vector<double> out;
  for (Index r = 0; r < b.rows; ++r)
    for (Index c = 0; c < b.cols; ++c) out.push_back(b(r, c));
  return out;
}

void set_bias(Policy& p, const std::vector<double>& values) {
  Matrix<double> b(p.bias().rows, p.bias().cols);
  for (Index i = 0; i < b.rows() * b.cols(); ++i) b.data()[i] = values[static_cast<std::size_t>(i)];
  p.set_bias(b.view());
}

using test::contains;
using test::error_of;

// One row: the best single expert (0) sits in a weak group. With n = 8 in 4 groups of 2, s + b:
// group scores 1.000, 1.462, 1.245, 1.571, so groups 3 and 1 are kept; experts 2 and 3 tie.
const std::vector<double> kRow = {3.0, -3.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.8};

}  // namespace

TEST_CASE("group-limited selection, hand-computed") {
  const Gate::Config grouped{.k = 2, .expert_groups = 4, .top_groups = 2, .bias_rate = 0.0, .scale = 2.5};
  const auto x = rows_of({kRow});
  const double s0 = sigmoid(3.0), s2 = sigmoid(1.0), s6 = sigmoid(2.0), s7 = sigmoid(0.8);

  SUBCASE("groups 3 and 1 kept; expert 0 is not reachable; the tie 2 = 3 goes to 2") {
    Policy p = identity_gate(grouped, 8);
    const auto r = run(p, x, Mode::inference);
    CHECK(r.expert == std::vector<Index>{6, 2});
    CHECK(r.gate[0] == doctest::Approx(2.5 * s6 / (s6 + s2)).epsilon(1e-14));
    CHECK(r.gate[1] == doctest::Approx(2.5 * s2 / (s6 + s2)).epsilon(1e-14));
  }
  SUBCASE("one group: the plain top-k by s") {
    Gate::Config flat = grouped;
    flat.expert_groups = 1;
    flat.top_groups = 1;
    Policy p = identity_gate(flat, 8);
    const auto r = run(p, x, Mode::inference);
    CHECK(r.expert == std::vector<Index>{0, 6});
    CHECK(r.gate[0] == doctest::Approx(2.5 * s0 / (s0 + s6)).epsilon(1e-14));
  }
  SUBCASE("top_groups = expert_groups: every expert reachable") {
    Gate::Config all = grouped;
    all.top_groups = 4;
    Policy p = identity_gate(all, 8);
    CHECK(run(p, x, Mode::inference).expert == std::vector<Index>{0, 6});
  }
  SUBCASE("a bias on expert 3 breaks the tie its way; the gate values stay those of s") {
    Policy p = identity_gate(grouped, 8);
    set_bias(p, {0, 0, 0, 0.01, 0, 0, 0, 0});
    const auto r = run(p, x, Mode::inference);
    CHECK(r.expert == std::vector<Index>{6, 3});
    CHECK(r.gate[0] == doctest::Approx(2.5 * s6 / (s6 + s2)).epsilon(1e-14));  // s3 = s2
    CHECK(r.gate[1] == doctest::Approx(2.5 * s2 / (s6 + s2)).epsilon(1e-14));
  }
  SUBCASE("a bias on expert 0 lifts group 0 (1.6 > 1.571) into the kept groups; no bias in the gate") {
    Policy p = identity_gate(grouped, 8);
    set_bias(p, {0.6, 0, 0, 0, 0, 0, 0, 0});
    const auto r = run(p, x, Mode::inference);
    CHECK(r.expert == std::vector<Index>{0, 6});
    CHECK(r.gate[0] == doctest::Approx(2.5 * s0 / (s0 + s6)).epsilon(1e-14));
    CHECK(r.gate[1] == doctest::Approx(2.5 * s6 / (s0 + s6)).epsilon(1e-14));
  }
  SUBCASE("a negative bias reorders within a kept group: 7 before 6") {
    Policy p = identity_gate(grouped, 8);
    set_bias(p, {0, 0, 0, 0, 0, 0, -0.3, 0});  // v6 = 0.581 < v7 = 0.690; group 3 = 1.271 > group 2
    const auto r = run(p, x, Mode::inference);
    CHECK(r.expert == std::vector<Index>{2, 3});  // groups 1 (1.462) and 3 (1.271) kept: 2, 3 lead
    CHECK(r.gate[0] == doctest::Approx(1.25).epsilon(1e-14));
    CHECK(r.gate[1] == doctest::Approx(1.25).epsilon(1e-14));
    Gate::Config k4 = grouped;
    k4.k = 4;
    Policy q = identity_gate(k4, 8);
    set_bias(q, {0, 0, 0, 0, 0, 0, -0.3, 0});
    const auto r4 = run(q, x, Mode::inference);
    CHECK(r4.expert == std::vector<Index>{2, 3, 7, 6});
    const double sum = 2 * s2 + s7 + s6;
    CHECK(r4.gate[2] == doctest::Approx(2.5 * s7 / sum).epsilon(1e-14));
    CHECK(r4.gate[3] == doctest::Approx(2.5 * s6 / sum).epsilon(1e-14));
  }
  SUBCASE("float: the same selection and gates, and a backward") {
    using F = backend::Cpu<float>;
    Gate::Policy<F> p(grouped, 8, 8, 1, 1);
    auto w = p.parameters()[0].value;
    for (Index r = 0; r < 8; ++r)
      for (Index c = 0; c < 8; ++c) w(r, c) = r == c ? 1.0f : 0.0f;
    Matrix<float> xf(1, 8);
    for (Index i = 0; i < 8; ++i) xf.view()(0, i) = static_cast<float>(kRow[static_cast<std::size_t>(i)]);
    F::Context ctx;
    GateRouting<F> routing;
    Gate::Policy<F>::Saved saved;
    p.forward(ctx, xf.view(), nullptr, Mode::train, GateNoise<float>{}, routing, saved);
    CHECK(routing.expert.data()[0] == 6);
    CHECK(routing.expert.data()[1] == 2);
    CHECK(routing.gate.data()[0] == doctest::Approx(2.5 * s6 / (s6 + s2)).epsilon(1e-6));
    Matrix<float> dgate(1, 2, 1.0f), dx(1, 8, 0.0f);
    p.backward(ctx, xf.view(), nullptr, saved, dgate.view(), nullptr, 1.0f, dx.view());
    // Equal dgate: the gates sum to the constant scale, so no gradient reaches the logits.
    for (Index i = 0; i < 8; ++i) CHECK(std::abs(dx.view()(0, i)) < 1e-6f);
  }
  SUBCASE("groups of one expert: the group score is the expert's own value") {
    Policy p = identity_gate({.k = 2, .expert_groups = 8, .top_groups = 3, .bias_rate = 0.0}, 8);
    CHECK(run(p, x, Mode::inference).expert == std::vector<Index>{0, 6});
  }
}

TEST_CASE("bias update after one training forward") {
  const double rate = 0.01;
  SUBCASE("one group: b_i += rate * sign(mean count - count_i), sign(0) = 0") {
    Policy p = identity_gate({.k = 1, .bias_rate = rate}, 4);
    // choices 0, 0, 1, 2: counts 2, 1, 1, 0 against a mean of 1.
    const auto x = rows_of({{2, 0, 0, 0}, {3, 1, 0, 0}, {0, 2, 1, 0}, {0, 0, 2, 1}});
    CHECK(run(p, x, Mode::train).expert == std::vector<Index>{0, 0, 1, 2});
    CHECK(bias_of(p) == std::vector<double>{-rate, 0, 0, rate});
    run(p, x, Mode::train);  // same choices: one more step of the same size
    CHECK(bias_of(p) == std::vector<double>{-2 * rate, 0, 0, 2 * rate});
  }
  SUBCASE("k = 2 with group limiting: counts over both slots, mean = rows * k / n") {
    Policy p = identity_gate({.k = 2, .expert_groups = 4, .top_groups = 2, .bias_rate = rate}, 8);
    const auto x = rows_of({kRow, kRow, kRow});  // each row picks 6, 2: counts 3 there, 0 elsewhere, mean 0.75
    run(p, x, Mode::train);
    CHECK(bias_of(p) == std::vector<double>{rate, rate, -rate, rate, rate, rate, -rate, rate});
  }
  SUBCASE("stacked groups: each group's bias moves by its own rows' counts and selects its own rows") {
    Policy p = identity_gate({.k = 1, .bias_rate = rate}, 4, 2);
    const std::vector<Index> offsets = {0, 2, 4};
    // group 0 picks 0, 0 (mean 0.5); group 1 picks 3, 1.
    const auto x = rows_of({{1, 0, 0, 0}, {2, 1, 0, 0}, {0, 0, 0, 1}, {0, 1, 0.5, 0}});
    CHECK(run(p, x, Mode::train, offsets.data()).expert == std::vector<Index>{0, 0, 3, 1});
    CHECK(bias_of(p) == std::vector<double>{-rate, rate, rate, rate, rate, -rate, rate, -rate});
    // A bias in group 1 alone turns its last row from 1 to 2; group 0 is unaffected.
    set_bias(p, {0, 0, 0, 0, 0, 0, 0.2, 0});
    CHECK(run(p, x, Mode::inference, offsets.data()).expert == std::vector<Index>{0, 0, 3, 2});
  }
  SUBCASE("inference and bias_rate = 0 leave the bias as it was") {
    const auto x = rows_of({kRow, kRow});
    Policy p = identity_gate({.k = 2, .expert_groups = 4, .top_groups = 2, .bias_rate = 0.5}, 8);
    const std::vector<double> start = {0.1, -0.2, 0.3, 0, 0, 0.05, 0, -0.1};
    set_bias(p, start);
    for (int i = 0; i < 3; ++i) run(p, x, Mode::inference);
    CHECK(bias_of(p) == start);
    Policy q = identity_gate({.k = 2, .expert_groups = 4, .top_groups = 2, .bias_rate = 0.0}, 8);
    set_bias(q, start);
    run(q, x, Mode::train);
    CHECK(bias_of(q) == start);
  }
  SUBCASE("the bias is no parameter") {
    Policy p = identity_gate({}, 4);
    const auto params = p.parameters();
    REQUIRE(params.size() == 1);
    CHECK(params[0].name == "gate.w_gate");
    CHECK(bias_of(p) == std::vector<double>(4, 0.0));
  }
}

TEST_CASE("training forwards alone even out a skewed router") {
  const Index t_count = 64, d = 4, n = 8;
  for (const auto& [groups, top] : std::vector<std::pair<Index, Index>>{{1, 1}, {4, 2}}) {
    CAPTURE(groups);
    FlatLayer layer({.d_model = d,
                     .n_experts = n,
                     .expert = {.hidden = 3},
                     .gate = {.k = 2, .expert_groups = groups, .top_groups = top, .bias_rate = 0.002},
                     .seed = 3});
    auto x = test::random_matrix<double>(t_count, d, 5);
    for (Index t = 0; t < t_count; ++t) x.view()(t, 0) = 1.0;  // a constant feature carries the skew
    auto w = layer.parameters()[0].value;
    for (Index i = 0; i < n; ++i) w(0, i) += 3.0 - static_cast<double>(i);  // experts 0, 1 win everywhere
    const double start = layer.forward(x.view(), Mode::inference).stats().cv2_load;
    double late = 0;
    const int steps = 2000, tail = 50;
    for (int step = 0; step < steps; ++step) {
      const auto f = layer.forward(x.view(), Mode::train);
      if (step >= steps - tail) late += f.stats().cv2_load / tail;
    }
    const double settled = layer.forward(x.view(), Mode::inference).stats().cv2_load;
    MESSAGE("expert_groups = ", groups, ": CV^2 of counts ", start, " -> ", late, " (mean of the last ", tail,
            " training forwards), ", settled, " at inference");
    CHECK(start > 1.0);
    CHECK(late < 0.02 * start);
    CHECK(settled < 0.02 * start);
    const auto b = layer.gate().bias();
    CHECK(b(0, 0) < 0);      // the overloaded experts were pushed down
    CHECK(b(0, n - 1) > 0);  // and the idle ones up
  }
}

namespace {

// Central differences through a layer (bias_rate = 0, a fixed random bias), at the first seed
// whose routing holds within the step. `constant`: the routers whose gradient must be exactly 0
// (a gate with k = 1 is the constant `scale`).
template <class L, class SetBias>
void check_gradients(const typename L::Config& base, SetBias&& set_random_bias,
                     const std::vector<std::string>& constant = {}) {
  for (std::uint64_t seed = 1; seed < 40; ++seed) {
    typename L::Config config = base;
    config.seed = seed;
    L layer(config);
    test::randomize_parameters(layer, seed, 0.8);
    set_random_bias(layer, seed);
    auto x = test::random_matrix<double>(12, config.d_model, seed * 31 + 1);
    const auto dy = test::random_matrix<double>(12, config.d_model, seed * 31 + 2);
    const auto check = test::check_layer_gradients(layer, x.view(), dy.view());
    if (!check.routing_stable) continue;
    for (const auto& f : check.failures) MESSAGE(f);
    CHECK(check.passed());
    CHECK(check.worst < 1e-6);
    CHECK(check.zero_grads == constant);
    MESSAGE("seed ", seed, ": worst relative error ", check.worst);
    return;
  }
  FAIL("no seed with stable routing in 40");
}

Matrix<double> random_bias(Index rows, Index cols, std::uint64_t seed) {
  return test::random_matrix<double>(rows, cols, seed * 977 + 5, -0.3, 0.3);
}

}  // namespace

TEST_CASE("gradients at depth 1 (bias_rate = 0, nonzero bias)") {
  struct Case {
    Index k, groups, top;
    double scale, w_importance;
  };
  for (const Case& c : std::vector<Case>{
           {1, 1, 1, 1.0, 0.0}, {2, 1, 1, 1.7, 0.3}, {2, 4, 2, 2.5, 0.3}, {3, 4, 2, 1.0, 1.0}, {8, 1, 1, 1.0, 0.5}}) {
    CAPTURE(c.k);
    CAPTURE(c.groups);
    FlatLayer::Config config{.d_model = 4,
                             .n_experts = 8,
                             .expert = {.hidden = 5},
                             .gate = {.k = c.k,
                                      .expert_groups = c.groups,
                                      .top_groups = c.top,
                                      .bias_rate = 0.0,
                                      .scale = c.scale,
                                      .w_importance = c.w_importance,
                                      .w_load = 0.5}};
    check_gradients<FlatLayer>(
        config,
        [](FlatLayer& layer, std::uint64_t seed) {
          const auto b = random_bias(1, 8, seed);
          layer.gate().set_bias(b.view());
          CHECK(layer.gate().bias()(0, 3) == b.view()(0, 3));
        },
        c.k == 1 ? std::vector<std::string>{"gate.w_gate"} : std::vector<std::string>{});
  }
}

TEST_CASE("depth 2: SigmoidBias at both levels") {
  const double rate = 0.01;
  DeepLayer::Config config{
      .d_model = 4,
      .n_experts = 12,
      .expert = {.hidden = 5},
      .gate = {.levels = {{{.branching = 3, .gate = {.k = 2, .bias_rate = rate}},
                           {.branching = 4, .gate = {.k = 2, .expert_groups = 2, .top_groups = 1, .bias_rate = rate}}}},
               .w_importance = 0.2,
               .w_load = 0.1}};

  SUBCASE("a training forward moves each level's bias by its own counts, per group at level 2") {
    DeepLayer layer(config);
    test::randomize_parameters(layer, 7);
    const auto x = test::random_matrix<double>(20, 4, 8);
    const auto f = layer.forward(x.view(), Mode::train);
    REQUIRE(f.stats().levels.size() == 2);
    const auto& top = f.stats().levels[0];
    const auto& leaf = f.stats().levels[1];
    auto sign = [](Index v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : 0.0); };
    const auto b1 = layer.gate().level(0).bias();
    REQUIRE(b1.rows == 1);
    REQUIRE(b1.cols == 3);
    for (Index i = 0; i < 3; ++i) CHECK(b1(0, i) == rate * sign(20 * 2 - top.count[i] * 3));
    const auto b2 = layer.gate().level(1).bias();
    REQUIRE(b2.rows == 3);
    REQUIRE(b2.cols == 4);
    int moved = 0;
    for (Index g = 0; g < 3; ++g)
      for (Index e = 0; e < 4; ++e) {
        // group g's rows: the tokens that reached node g; each chose k = 2 of its 4 experts.
        CHECK(b2(g, e) == rate * sign(top.count[g] * 2 - leaf.count[g * 4 + e] * 4));
        moved += b2(g, e) != 0;
      }
    CHECK(moved > 0);
    // Inference moves neither level.
    const std::vector<double> keep1(b1.data, b1.data + 3), keep2(b2.data, b2.data + 12);
    (void)layer.forward(x.view(), Mode::inference);
    CHECK(std::vector<double>(b1.data, b1.data + 3) == keep1);
    CHECK(std::vector<double>(b2.data, b2.data + 12) == keep2);
    // A backward after a training forward works and leaves the bias alone.
    const auto dy = test::random_matrix<double>(20, 4, 9);
    const auto back = layer.backward(f, dy.view());
    CHECK(back.dx.rows() == 20);
    CHECK(std::vector<double>(b2.data, b2.data + 12) == keep2);
    // Parameters: one router per level, no bias.
    const auto params = layer.parameters();
    CHECK(test::find_parameter<DeepLayer>(params, "gate.0.w_gate") != nullptr);
    CHECK(test::find_parameter<DeepLayer>(params, "gate.1.w_gate") != nullptr);
    for (const auto& p : params) CHECK(!contains(p.name, "bias"));
  }

  SUBCASE("gradients (bias_rate = 0, nonzero bias at both levels)") {
    DeepLayer::Config c = config;
    for (auto& level : c.gate.levels) level.gate.bias_rate = 0.0;
    c.gate.levels[1].gate.scale = 1.5;
    check_gradients<DeepLayer>(c, [](DeepLayer& layer, std::uint64_t seed) {
      layer.gate().level(0).set_bias(random_bias(1, 3, seed).view());
      layer.gate().level(1).set_bias(random_bias(3, 4, seed + 100).view());
    });
  }

  SUBCASE("level 2 with k = 1 (groups of one expert, 2 of 4 kept): its gate is the constant scale") {
    DeepLayer::Config c = config;
    c.gate.levels[0].gate.bias_rate = 0.0;
    c.gate.levels[1].gate = {.k = 1, .expert_groups = 4, .top_groups = 2, .bias_rate = 0.0, .scale = 0.7};
    check_gradients<DeepLayer>(c,
                               [](DeepLayer& layer, std::uint64_t seed) {
                                 layer.gate().level(0).set_bias(random_bias(1, 3, seed).view());
                                 layer.gate().level(1).set_bias(random_bias(3, 4, seed + 100).view());
                               },
                               {"gate.1.w_gate"});
  }
}

TEST_CASE("bad configurations and bias values are rejected") {
  auto error = [](const Gate::Config& c, Index n = 8) { return error_of([&] { Policy p(c, 4, n, 0, 1); }); };
  CHECK(contains(error({.k = 0}),
                 "gate::SigmoidBias: k = 0, expected 1 <= k <= top_groups * (n_experts / "
                 "expert_groups) = 8"));
  CHECK(contains(error({.k = 9}), "k = 9, expected 1 <= k <= top_groups * (n_experts / expert_groups) = 8"));
  CHECK(contains(error({.k = 5, .expert_groups = 4, .top_groups = 2}),
                 "k = 5, expected 1 <= k <= top_groups * (n_experts / expert_groups) = 4"));
  CHECK(contains(error({.expert_groups = 3}), "expert_groups = 3, expected a divisor of n_experts = 8"));
  CHECK(contains(error({.expert_groups = 0}), "expert_groups = 0, expected a divisor of n_experts = 8"));
  CHECK(contains(error({.expert_groups = 4, .top_groups = 5}),
                 "top_groups = 5, expected 1 <= top_groups <= expert_groups = 4"));
  CHECK(contains(error({.expert_groups = 4, .top_groups = 0}),
                 "top_groups = 0, expected 1 <= top_groups <= expert_groups = 4"));
  CHECK(contains(error({.bias_rate = -0.1}), "bias_rate = -0.1, expected a finite value >= 0"));
  CHECK(contains(error({.bias_rate = std::nan("")}), "bias_rate = nan, expected a finite value >= 0"));
  CHECK(contains(error({.scale = 0.0}), "scale = 0, expected a finite value > 0"));
  CHECK(contains(error({.init_scale = -1.0}), "init_scale = -1, expected a finite value >= 0"));
  CHECK(contains(error({.w_importance = -1.0}), "w_importance = -1"));
  CHECK(contains(error({.w_load = -2.0}), "w_load = -2"));
  CHECK(contains(error({}, 0), "n_experts = 0, expected at least 1"));
  CHECK(error({.k = 4, .expert_groups = 4, .top_groups = 2}).empty());

  Policy p({}, 4, 8, 0, 2);
  CHECK(contains(error_of([&] { p.set_bias(Matrix<double>(1, 8).view()); }),
                 "set_bias: bias is 1 x 8, expected [groups x n_experts] = 2 x 8"));
  Matrix<double> bad(2, 8, 0.0);
  bad.view()(1, 3) = std::numeric_limits<double>::infinity();
  CHECK(contains(error_of([&] { p.set_bias(bad.view()); }), "set_bias: bias(1, 3) = inf, expected a finite value"));
  CHECK(bias_of(p) == std::vector<double>(16, 0.0));  // a rejected bias leaves the old one

  // Through the layer and the hierarchy, with the level named.
  CHECK(contains(error_of([] {
                   FlatLayer l({.d_model = 4, .n_experts = 6, .expert = {.hidden = 2}, .gate = {.expert_groups = 4}});
                 }),
                 "expert_groups = 4, expected a divisor of n_experts = 6"));
  CHECK(contains(error_of([] {
                   DeepLayer l({.d_model = 4,
                                .n_experts = 8,
                                .expert = {.hidden = 2},
                                .gate = {.levels = {{{.branching = 2, .gate = {.k = 1}},
                                                     {.branching = 4, .gate = {.k = 3, .expert_groups = 2}}}}}});
                 }),
                 "levels[1] (2 group(s) of 4): gate::SigmoidBias: k = 3, expected 1 <= k <= top_groups * "
                 "(n_experts / expert_groups) = 2"));
}
