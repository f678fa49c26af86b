// Hierarchical MoE (MATH.md 4): a depth-D layer is a gate that composes D levels of gates into
// one flat routing over the leaf experts.

#include <cmath>
#include <map>

#include "support.hpp"

using namespace moe;
using moe::test::Dense;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using Noisy = gate::NoisyTopK;
using Tree2 = Layer<expert::FeedForward, Noisy, B, 2>;
using Tree3 = Layer<expert::FeedForward, Noisy, B, 3>;

Tree2::Config tree2(Index a, Index k1, Index b, Index k2, std::uint64_t seed = 1, double w = 1.0) {
  return {.d_model = 4,
          .n_experts = a * b,
          .expert = {.hidden = 5},
          .gate = {.levels = {{{.branching = a, .gate = {.k = k1}}, {.branching = b, .gate = {.k = k2}}}},
                   .w_importance = w,
                   .w_load = w},
          .seed = seed};
}

// Copies rows [first, first + count) of a stacked view into a plain gate's parameter.
void copy_rows(ConstMatrixView<double> from, Index first, Index count, MatrixView<double> to) {
  REQUIRE(to.rows == count);
  for (Index r = 0; r < count; ++r)
    for (Index c = 0; c < to.cols; ++c) to(r, c) = from(first + r, c);
}

const Parameter<double>& param(const std::vector<Parameter<double>>& all, const std::string& name) {
  for (const auto& p : all)
    if (p.name == name) return p;
  FAIL("no parameter " << name);
  return all.front();
}

}  // namespace

TEST_CASE("a depth-2 layer equals a hand-composed pair of depth-1 gates on the same weights (MATH.md 4)") {
  constexpr Index a = 3, b = 4, k1 = 2, k2 = 2, T = 12, d = 4;
  Tree2 layer(tree2(a, k1, b, k2));
  test::randomize_parameters(layer, 5, 0.8);
  const auto x = test::random_matrix<double>(T, d, 11);
  Matrix<double> z(T, layer.noise_columns());
  CHECK(layer.noise_columns() == a + a * b);
  test::fill_normal(z.view(), 12);
  const auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
  const auto params = layer.parameters();

  // Level 1: one plain NoisyTopK over the a groups, reading noise columns [0, a).
  B::Context ctx;
  Noisy::Policy<B> top({.k = k1}, d, a, 0);
  copy_rows(param(params, "gate.0.w_gate").value, 0, d, top.parameters()[0].value);
  copy_rows(param(params, "gate.0.w_noise").value, 0, d, top.parameters()[1].value);
  GateRouting<B> r1;
  Noisy::Policy<B>::Saved s1;
  top.forward(ctx, x.view(), nullptr, Mode::train, GateNoise<double>{.values = z.data(), .stride = z.cols()}, r1, s1);

  // Level 2: group g's own plain gate on the tokens that chose g, in token order, reading noise
  // columns a + g * b + [0, b).
  std::vector<std::map<Index, std::pair<std::vector<Index>, std::vector<double>>>> choice(
      a);  // token -> (experts, gates)
  std::vector<std::vector<double>> load2(a);
  std::vector<Index> count(a, 0);
  for (Index g = 0; g < a; ++g) {
    std::vector<Index> tokens;
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < k1; ++j)
        if (r1.expert(t, j) == g) tokens.push_back(t);
    count[g] = static_cast<Index>(tokens.size());
    Noisy::Policy<B> inner({.k = k2}, d, b, 0);
    copy_rows(param(params, "gate.1.w_gate").value, g * d, d, inner.parameters()[0].value);
    copy_rows(param(params, "gate.1.w_noise").value, g * d, d, inner.parameters()[1].value);
    Matrix<double> xg(count[g], d);
    for (Index r = 0; r < count[g]; ++r)
      for (Index c = 0; c < d; ++c) xg(r, c) = x(tokens[r], c);
    GateRouting<B> r2;
    Noisy::Policy<B>::Saved s2;
    inner.forward(
        ctx, xg.view(), nullptr, Mode::train,
        GateNoise<double>{.values = z.data(), .stride = z.cols(), .row_token = tokens.data(), .column = a + g * b}, r2,
        s2);
    load2[g] = r2.load.values();
    for (Index r = 0; r < count[g]; ++r)
      for (Index j = 0; j < k2; ++j) {
        choice[g][tokens[r]].first.push_back(r2.expert(r, j));
        choice[g][tokens[r]].second.push_back(r2.gate(r, j));
      }
  }

  // The flat routing: slot (j1, j2) of token t is leaf g * b + e with gate G1 * G2, in that order.
  std::vector<double> importance(a * b, 0.0);
  for (Index t = 0; t < T; ++t)
    for (Index j1 = 0; j1 < k1; ++j1) {
      const Index g = r1.expert(t, j1);
      for (Index j2 = 0; j2 < k2; ++j2) {
        const Index slot = j1 * k2 + j2;
        CHECK(f.expert_index()(t, slot) == g * b + choice[g][t].first[j2]);
        CHECK(f.gates()(t, slot) == doctest::Approx(r1.gate(t, j1) * choice[g][t].second[j2]).epsilon(1e-14));
        importance[g * b + choice[g][t].first[j2]] += r1.gate(t, j1) * choice[g][t].second[j2];
      }
    }
  // Importance_H and Load_H = Load_1[g] * Load_g[j] / (|X^(g)| + 1e-10), CV^2 over all a * b leaves.
  std::vector<double> load(a * b);
  for (Index g = 0; g < a; ++g)
    for (Index j = 0; j < b; ++j) load[g * b + j] = r1.load[g] * load2[g][j] / (static_cast<double>(count[g]) + 1e-10);
  REQUIRE(!f.stats().load_is_count);
  for (Index e = 0; e < a * b; ++e) {
    CHECK(f.stats().importance[e] == doctest::Approx(importance[e]).epsilon(1e-13));
    CHECK(f.stats().load[e] == doctest::Approx(load[e]).epsilon(1e-13));
  }
  CHECK(f.stats().cv2_importance == doctest::Approx(cv_squared(importance)).epsilon(1e-12));
  CHECK(f.stats().cv2_load == doctest::Approx(cv_squared(load)).epsilon(1e-12));
  CHECK(f.loss() == doctest::Approx(cv_squared(importance) + cv_squared(load)).epsilon(1e-12));

  // y = sum over the slots of the product gate times the leaf expert on the token.
  const auto& w1 = param(params, "experts.w1");
  const auto& w2 = param(params, "experts.w2");
  for (Index t = 0; t < T; ++t) {
    Dense<double> yt = Dense<double>::Zero(1, d);
    for (Index s = 0; s < k1 * k2; ++s) {
      const Index e = f.expert_index()(t, s);
      const Dense<double> xt = test::to_dense(ConstMatrixView<double>(x.view().block_rows(t, 1)));
      const Dense<double> pre = xt * test::to_dense(ConstMatrixView<double>(w1.value.block_rows(e * d, d)));
      yt += f.gates()(t, s) *
            (pre.cwiseMax(0.0) * test::to_dense(ConstMatrixView<double>(w2.value.block_rows(e * 5, 5))));
    }
    for (Index c = 0; c < d; ++c) CHECK(f.y()(t, c) == doctest::Approx(yt(0, c)).epsilon(1e-12));
  }

  // Per-level statistics: level 1 over the a groups, level 2 over the leaves (= the flat stats).
  REQUIRE(f.stats().levels.size() == 2);
  const auto& l1 = f.stats().levels[0];
  CHECK(l1.nodes == a);
  for (Index g = 0; g < a; ++g) {
    CHECK(l1.count[g] == count[g]);
    CHECK(l1.load[g] == doctest::Approx(r1.load[g]).epsilon(1e-14));
  }
  CHECK(f.stats().levels[1].cv2_load == doctest::Approx(f.stats().cv2_load).epsilon(1e-14));
}

TEST_CASE("depth-2 gradients through both levels, both loads and the experts (MATH.md 4-5)") {
  struct Shape {
    Index a, k1, b, k2;
    double w_importance, w_load;
  };
  for (const Shape s : {Shape{3, 2, 4, 2, 1.0, 1.0}, Shape{4, 1, 3, 2, 1.0, 1.0}, Shape{2, 2, 4, 1, 0.0, 3.0},
                        Shape{4, 2, 2, 2, 3.0, 0.0}}) {
    CAPTURE(s.a);
    CAPTURE(s.k1);
    CAPTURE(s.b);
    CAPTURE(s.k2);
    bool done = false;
    for (std::uint64_t seed = 1; seed < 30 && !done; ++seed) {
      auto config = tree2(s.a, s.k1, s.b, s.k2, seed);
      config.gate.w_importance = s.w_importance;
      config.gate.w_load = s.w_load;
      Tree2 layer(config);
      test::randomize_parameters(layer, seed, 0.8);
      auto x = test::random_matrix<double>(12, 4, seed * 31 + 1);
      const auto dy = test::random_matrix<double>(12, 4, seed * 31 + 2);
      Matrix<double> z(12, layer.noise_columns());
      test::fill_normal(z.view(), seed * 31 + 3);
      const auto check = test::check_layer_gradients(layer, x.view(), dy.view(), Noise<double>(z.view()));
      if (!check.routing_stable) continue;
      done = true;
      for (const auto& failure : check.failures) FAIL_CHECK(failure);
      CHECK(check.zero_grads.empty());
      MESSAGE("a = ", s.a, " k1 = ", s.k1, " b = ", s.b, " k2 = ", s.k2, ": worst relative error ", check.worst);
    }
    CHECK(done);
  }
}

TEST_CASE("depth 3 builds, matches finite differences and trains") {
  Tree3::Config config{.d_model = 4,
                       .n_experts = 12,
                       .expert = {.hidden = 6},
                       .gate = {.levels = {{{.branching = 2, .gate = {.k = 2}},
                                            {.branching = 3, .gate = {.k = 2}},
                                            {.branching = 2, .gate = {.k = 1}}}},
                                .w_importance = 0.5,
                                .w_load = 0.5},
                       .seed = 3};
  {
    Tree3 layer(config);
    CHECK(layer.k() == 4);
    CHECK(layer.noise_columns() == 2 + 6 + 12);
    CHECK(layer.parameters().size() == 8);  // 3 levels x (w_gate, w_noise) + w1, w2
    bool done = false;
    for (std::uint64_t seed = 1; seed < 30 && !done; ++seed) {
      test::randomize_parameters(layer, seed, 0.8);
      auto x = test::random_matrix<double>(10, 4, seed * 7 + 1);
      const auto dy = test::random_matrix<double>(10, 4, seed * 7 + 2);
      Matrix<double> z(10, layer.noise_columns());
      test::fill_normal(z.view(), seed * 7 + 3);
      const auto check = test::check_layer_gradients(layer, x.view(), dy.view(), Noise<double>(z.view()));
      if (!check.routing_stable) continue;
      done = true;
      for (const auto& failure : check.failures) FAIL_CHECK(failure);
      CHECK(check.zero_grads.empty());
      MESSAGE("depth 3: worst relative error ", check.worst);
    }
    CHECK(done);
  }
  // Training: a random linear target; the task loss falls.
  Tree3 layer(config);
  const auto x = test::random_matrix<double>(256, 4, 77);
  const auto w = test::random_matrix<double>(4, 4, 78);
  const Dense<double> target = test::to_dense(x.view()) * test::to_dense(w.view());
  optim::Adam<B> adam({.lr = 1e-2});
  Rng rng(9);
  auto mse = [&](const Tree3::Forward& f) { return (test::to_dense(f.y()) - target).squaredNorm() / 256.0; };
  const double before = mse(layer.forward(x.view(), Mode::inference));
  for (int step = 0; step < 150; ++step) {
    const auto f = layer.forward(x.view(), Mode::train, rng);
    REQUIRE(std::isfinite(f.loss()));
    const Dense<double> dy = 2.0 * (test::to_dense(f.y()) - target) / 256.0;
    Matrix<double> dym(256, 4);
    backend::cpu::eigen(dym.view()) = dy;
    layer.backward(f, dym.view());
    adam.step(layer.parameters());
    layer.zero_grad();
  }
  const double after = mse(layer.forward(x.view(), Mode::inference));
  MESSAGE("depth 3 training: MSE ", before, " -> ", after);
  CHECK(after < 0.25 * before);
}

TEST_CASE("depth 3: each level's gate of each group reads its own noise columns (MATH.md 4)") {
  // Zero-initialized gates: every noisy logit is z * (softplus(0) + eps), so without noise every
  // level ties to its lowest experts, and one large noise value steers exactly the group whose
  // column it is in. Levels (2, k 2), (3, k 2), (2, k 1): noise columns [0, 2) level 0,
  // [2, 8) level 1 (group g: 2 + 3 g + i), [8, 20) level 2 (group g: 8 + 2 g + i).
  Tree3 layer({.d_model = 4,
               .n_experts = 12,
               .expert = {.hidden = 3},
               .gate = {.levels = {{{.branching = 2, .gate = {.k = 2}},
                                    {.branching = 3, .gate = {.k = 2}},
                                    {.branching = 2, .gate = {.k = 1}}}}}});
  REQUIRE(layer.noise_columns() == 20);
  const auto x = test::random_matrix<double>(6, 4, 3);
  auto leaves_with = [&](Index column) {
    Matrix<double> z(6, 20, 0.0);
    if (column >= 0)
      for (Index t = 0; t < 6; ++t) z(t, column) = 50.0;
    const auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
    std::vector<Index> used;
    for (Index e = 0; e < 12; ++e)
      if (f.stats().tokens_per_expert[static_cast<std::size_t>(e)] > 0) {
        CHECK(f.stats().tokens_per_expert[static_cast<std::size_t>(e)] == 6);
        used.push_back(e);
      }
    return used;
  };
  // Ties everywhere: level-0 nodes 0 and 1, level-1 experts 0 and 1, level-2 expert 0. Leaf
  // (n0 * 3 + n1) * 2 + n2.
  CHECK(leaves_with(-1) == std::vector<Index>{0, 2, 6, 8});
  // Level 2, group 4 (the path 1, 1), expert 1: column 8 + 2 * 4 + 1 = 17. Only that group moves.
  CHECK(leaves_with(17) == std::vector<Index>{0, 2, 6, 9});
  // Level 1, group 1, expert 2: column 2 + 3 * 1 + 2 = 7. Node 1's tokens take experts 2 and 0.
  CHECK(leaves_with(7) == std::vector<Index>{0, 2, 6, 10});
  // Level 0, expert 1 first: column 1 changes the order of the slots, not the set of leaves.
  CHECK(leaves_with(1) == std::vector<Index>{0, 2, 6, 8});
}

TEST_CASE("a group that receives no token contributes zero load and no NaN") {
  constexpr Index a = 3, b = 4, T = 16, d = 4;
  Tree2 layer(tree2(a, 2, b, 2));
  test::randomize_parameters(layer, 2, 0.5);
  // Level 1 strongly prefers groups 0 and 1: group 2 receives nothing.
  auto params = layer.parameters();
  auto& w = param(params, "gate.0.w_gate");
  for (Index r = 0; r < d; ++r) {
    w.value(r, 0) = 0;
    w.value(r, 1) = 0;
    w.value(r, 2) = 0;
  }
  Matrix<double> x(T, d, 1.0);
  for (Index r = 0; r < d; ++r) w.value(r, 2) = -50.0;
  Matrix<double> z(T, layer.noise_columns());
  test::fill_normal(z.view(), 3);
  const auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
  REQUIRE(f.stats().levels[0].count[2] == 0);
  for (Index j = 0; j < b; ++j) {
    CHECK(f.stats().load[2 * b + j] == 0.0);
    CHECK(f.stats().tokens_per_expert[2 * b + j] == 0);
  }
  for (const double v : f.stats().load) CHECK(std::isfinite(v));
  CHECK(std::isfinite(f.loss()));
  const auto dy = test::random_matrix<double>(T, d, 4);
  layer.zero_grad();
  const auto back = layer.backward(f, dy.view());
  for (Index i = 0; i < back.dx.size(); ++i) CHECK(std::isfinite(back.dx[i]));
  for (const auto& p : layer.parameters())
    for (Index i = 0; i < p.size(); ++i) REQUIRE(std::isfinite(p.grad.data[i]));
  // The empty group's level-2 gate gets no gradient at all.
  const auto after = layer.parameters();
  const auto& g1 = param(after, "gate.1.w_gate");
  for (Index r = 2 * d; r < 3 * d; ++r)
    for (Index c = 0; c < b; ++c) CHECK(g1.grad(r, c) == 0.0);
}

TEST_CASE("hierarchy parameters: stable dotted names, stacked over groups") {
  Tree2 layer(tree2(3, 2, 4, 2));
  const auto params = layer.parameters();
  REQUIRE(params.size() == 6);
  CHECK(params[0].name == "gate.0.w_gate");
  CHECK(params[0].shape == std::vector<Index>{4, 3});
  CHECK(params[1].name == "gate.0.w_noise");
  CHECK(params[2].name == "gate.1.w_gate");
  CHECK(params[2].shape == std::vector<Index>{3, 4, 4});
  CHECK(params[2].value.rows == 12);
  CHECK(params[3].name == "gate.1.w_noise");
  CHECK(params[4].name == "experts.w1");
  CHECK(params[4].shape == std::vector<Index>{12, 4, 5});
}

TEST_CASE("hierarchy with an Rng: reproducible, inference draws no noise and reports counts") {
  Tree2 one(tree2(4, 2, 4, 2, 7)), two(tree2(4, 2, 4, 2, 7));
  test::randomize_parameters(one, 3, 0.5);
  test::randomize_parameters(two, 3, 0.5);
  const auto x = test::random_matrix<double>(20, 4, 5);
  Rng r1(5), r2(5);
  const auto f1 = one.forward(x.view(), Mode::train, r1);
  const auto f2 = two.forward(x.view(), Mode::train, r2);
  CHECK(test::same_bits(f1.y(), f2.y()));
  CHECK(test::same_bits(f1.gates(), f2.gates()));
  const auto inf = one.forward(x.view(), Mode::inference);
  CHECK(inf.stats().load_is_count);
  // Without noise every level's Load_H is its hard count, exactly; the leaves' equal the layer's.
  for (const auto& level : inf.stats().levels)
    for (Index v = 0; v < level.nodes; ++v) CHECK(level.load[v] == static_cast<double>(level.count[v]));
  for (Index e = 0; e < 16; ++e) {
    CHECK(inf.stats().levels[1].count[e] == inf.stats().tokens_per_expert[e]);
    CHECK(inf.stats().levels[1].load[e] == inf.stats().load[e]);
  }
  Index routed = 0;
  for (const Index c : inf.stats().levels[0].count) routed += c;
  CHECK(routed == 20 * 2);
  for (Index t = 0; t < 20; ++t) {
    double sum = 0;
    for (Index s = 0; s < 4; ++s) sum += inf.gates()(t, s);
    CHECK(sum == doctest::Approx(1.0));
  }
}

TEST_CASE("bad branching is a moe::Error naming the level and the values") {
  using test::error_of;
  auto config = tree2(3, 2, 4, 2);
  config.n_experts = 10;
  CHECK(error_of([&] { Tree2 l(config); }).find("multiply to more than n_experts = 10") != std::string::npos);
  config.n_experts = 14;
  CHECK(error_of([&] { Tree2 l(config); }).find("multiply to 12, expected n_experts = 14") != std::string::npos);
  config = tree2(3, 2, 4, 5);
  const std::string k_error = error_of([&] { Tree2 l(config); });
  CHECK(k_error.find("levels[1]") != std::string::npos);
  CHECK(k_error.find("k = 5, expected 1 <= k <= n_experts = 4") != std::string::npos);
  config = tree2(3, 4, 4, 2);
  CHECK(error_of([&] { Tree2 l(config); }).find("levels[0]") != std::string::npos);
  config = tree2(3, 2, 4, 2);
  config.gate.levels[0].branching = 0;
  CHECK(error_of([&] { Tree2 l(config); }).find("levels[0].branching = 0, expected at least 1") != std::string::npos);
  // Explicit noise must have a column for every level's nodes.
  Tree2 layer(tree2(3, 2, 4, 2));
  const auto x = test::random_matrix<double>(5, 4, 1);
  Matrix<double> z(5, 12);
  CHECK(error_of([&] {
          (void)layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
        }).find("expected [T x noise_columns()] = 5 x 15") != std::string::npos);
}

// Thread counts at depth 2 (noise, dropped tokens): tests/determinism.cpp, on batches large
// enough to split the work.

TEST_CASE("depth 2: aux_scale scales exactly the balancing, Switch and z-loss gradients") {
  Layer<expert::FeedForward, gate::Switch, B, 2> layer(
      {.d_model = 4,
       .n_experts = 6,
       .expert = {.hidden = 3},
       .gate = {.levels = {{{.branching = 2, .gate = {.w_aux = 0.5, .w_z = 0.3}},
                            {.branching = 3, .gate = {.capacity_factor = 2.0, .w_aux = 0.5, .w_z = 0.3}}}},
                .w_importance = 0.4}});
  test::randomize_parameters(layer, 2, 0.8);
  const auto x = test::random_matrix<double>(24, 4, 1);
  const Matrix<double> zero(24, 4, 0.0);
  auto grads = [&](double aux_scale) {
    layer.zero_grad();
    const auto back = layer.backward(layer.forward(x.view()), zero.view(), aux_scale);
    std::vector<double> g(back.dx.data(), back.dx.data() + back.dx.size());
    for (const auto& p : layer.parameters()) g.insert(g.end(), p.grad.data, p.grad.data + p.size());
    return g;
  };
  const auto g1 = grads(1.0), g3 = grads(3.0), g0 = grads(0.0);
  double norm = 0;
  for (std::size_t i = 0; i < g1.size(); ++i) {
    CHECK(g3[i] == doctest::Approx(3.0 * g1[i]).epsilon(1e-12));
    CHECK(g0[i] == 0.0);
    norm += g1[i] * g1[i];
  }
  CHECK(norm > 0);
}

namespace {
// A level gate with a bug: it routes to an expert one past its width.
struct OffByOne {
  using Config = gate::TopK::Config;
  template <Backend BB>
  struct Policy : gate::TopK::Policy<BB> {
    using gate::TopK::Policy<BB>::Policy;
    void forward(typename BB::Context& ctx, ConstMatrixView<double> x, const Index* offsets, Mode mode,
                 const GateNoise<double>& noise, GateRouting<BB>& routing,
                 typename gate::TopK::Policy<BB>::Saved& saved) {
      gate::TopK::Policy<BB>::forward(ctx, x, offsets, mode, noise, routing, saved);
      routing.expert.data()[0] = this->n_experts();
    }
  };
};
// A level gate that reads two noise columns per expert.
struct WideNoise {
  using Config = gate::NoisyTopK::Config;
  template <Backend BB>
  struct Policy : gate::NoisyTopK::Policy<BB> {
    using gate::NoisyTopK::Policy<BB>::Policy;
    [[nodiscard]] Index noise_columns() const { return 2 * this->n_experts(); }
  };
};
}  // namespace

TEST_CASE_TEMPLATE("a gate routing a token twice to one expert, or giving a NaN gate value, is a moe::Error", BB,
                   backend::Cpu<double>, backend::Cpu<float>) {
  test::check_routing_refused<BB>();
}

TEST_CASE("a gate routing outside its experts, or reading other noise columns, is a moe::Error") {
  using test::contains;
  using test::error_of;
  const auto x = test::random_matrix<double>(6, 4, 1);
  Layer<expert::FeedForward, OffByOne, B> flat(
      {.d_model = 4, .n_experts = 3, .expert = {.hidden = 2}, .gate = {.k = 1}});
  CHECK(contains(error_of([&] { (void)flat.forward(x.view()); }),
                 "moe::Layer::forward: the gate routed row 0, slot 0 to expert 3, expected an expert in [0, 3)"));
  Layer<expert::FeedForward, OffByOne, B, 2> tree(
      {.d_model = 4,
       .n_experts = 6,
       .expert = {.hidden = 2},
       .gate = {.levels = {{{.branching = 2, .gate = {.k = 1}}, {.branching = 3, .gate = {.k = 1}}}}}});
  CHECK(
      contains(error_of([&] { (void)tree.forward(x.view()); }),
               "gate::Hierarchy: levels[0]: the gate routed row 0, slot 0 to expert 2, expected an expert in [0, 2)"));
  const std::string wide = error_of([] {
    Layer<expert::FeedForward, WideNoise, B, 2> l(
        {.d_model = 4,
         .n_experts = 6,
         .expert = {.hidden = 2},
         .gate = {.levels = {{{.branching = 2, .gate = {.k = 1}}, {.branching = 3, .gate = {.k = 1}}}}}});
  });
  CHECK(contains(wide, "levels[0]'s gate reads 4 noise columns per row, expected 2"));
}

TEST_CASE("a hierarchy's balancing weights default to its gate's") {
  CHECK(gate::Hierarchy<gate::NoisyTopK, 2>::Config{}.w_importance == 1e-2);
  CHECK(gate::Hierarchy<gate::NoisyTopK, 2>::Config{}.w_load == 1e-2);
  CHECK(gate::Hierarchy<gate::Switch, 2>::Config{}.w_importance == 0.0);
  CHECK(gate::Hierarchy<gate::ExpertChoice, 3>::Config{}.w_load == 0.0);
  CHECK(gate::Hierarchy<gate::SigmoidBias, 2>::Config{}.w_importance == 0.0);
  // So a depth-2 SigmoidBias layer has no loss at all by default, as at depth 1.
  Layer<expert::FeedForward, gate::SigmoidBias, B, 2> layer(
      {.d_model = 4,
       .n_experts = 8,
       .expert = {.hidden = 3},
       .gate = {.levels = {{{.branching = 2, .gate = {.k = 1}}, {.branching = 4, .gate = {.k = 2}}}}}});
  const auto x = test::random_matrix<double>(32, 4, 1);
  const auto f = layer.forward(x.view(), Mode::inference);
  CHECK(f.stats().cv2_importance > 0);
  CHECK(f.loss() == 0.0);
}
