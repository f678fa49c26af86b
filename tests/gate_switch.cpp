// gate::Switch (Fedus, Zoph, Shazeer 2021): top-1 routing, expert capacity per group, dropped
// tokens, the auxiliary loss n sum_i f_i P_i, gradients, bad input, and use at depth 2.

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "moe/gate/switch.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using SwitchLayer = Layer<expert::FeedForward, gate::Switch, B>;
using SwitchLayer2 = Layer<expert::FeedForward, gate::Switch, B, 2>;

using test::contains;
using test::error_of;

// Sets the parameter `name` from row-major values.
template <class L>
void set_parameter(L& layer, const std::string& name, const std::vector<double>& values) {
  for (auto& p : layer.parameters()) {
    if (p.name != name) continue;
    REQUIRE(p.size() == static_cast<Index>(values.size()));
    const Index cols = p.value.cols;
    for (Index i = 0; i < p.size(); ++i) p.value(i / cols, i % cols) = values[static_cast<std::size_t>(i)];
    return;
  }
  FAIL("no parameter ", name);
}

Matrix<double> matrix(Index rows, Index cols, const std::vector<double>& values) {
  Matrix<double> m(rows, cols);
  for (Index i = 0; i < rows * cols; ++i) m.view()(i / cols, i % cols) = values[static_cast<std::size_t>(i)];
  return m;
}

std::vector<Index> experts_of(const SwitchLayer::Forward& f) {
  std::vector<Index> out;
  for (Index t = 0; t < f.expert_index().rows; ++t) out.push_back(f.expert_index()(t, 0));
  return out;
}

bool zero_row(ConstMatrixView<double> y, Index t) {
  for (Index c = 0; c < y.cols; ++c)
    if (y(t, c) != 0.0) return false;
  return true;
}

// n = 3, W_g = I, so the logits are the rows of x. Argmax: 0, 1, 0, 0 (a tie of three), 2, 1.
const std::vector<double> kRows = {2, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 2, 0};

SwitchLayer hand_layer(double capacity_factor, double w_aux = 0.1) {
  SwitchLayer layer({.d_model = 3,
                     .n_experts = 3,
                     .expert = {.hidden = 4, .bias = true},
                     .gate = {.capacity_factor = capacity_factor, .w_aux = w_aux},
                     .seed = 5});
  test::randomize_parameters(layer, 3);
  set_parameter(layer, "gate.w_gate", {1, 0, 0, 0, 1, 0, 0, 0, 1});
  return layer;
}

// Finite-difference check of a layer with a Switch gate: seeds until the routing (drops
// included) is stable within the step; `want_drops` also skips points where nothing is dropped.
template <class L>
void check_switch_gradients(const typename L::Config& base, Index t_count, bool want_drops, bool zero_dy = false) {
  int checked = 0;
  for (std::uint64_t seed = 1; seed < 60 && checked < 3; ++seed) {
    auto config = base;
    config.seed = seed;
    L layer(config);
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 1);
    auto dy = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 2);
    if (zero_dy) dy.resize(t_count, config.d_model, 0.0);
    const auto f = layer.forward(x.view());
    if (want_drops && f.stats().dropped_tokens == 0) continue;
    const auto check = test::check_layer_gradients(layer, x.view(), dy.view());
    if (!check.routing_stable) continue;
    CAPTURE(seed);
    CAPTURE(check.worst);
    for (const auto& s : check.failures) FAIL_CHECK(s);
    CHECK(check.passed());
    for (const auto& name : check.zero_grads) CHECK_MESSAGE(name.rfind("gate", 0) != 0, name);
    ++checked;
  }
  CHECK(checked == 3);
}

}  // namespace

TEST_CASE("capacity is ceil(capacity_factor * R / n), at most R, robust to binary rounding") {
  CHECK(gate::Switch::capacity(1.0, 6, 3) == 2);
  CHECK(gate::Switch::capacity(0.5, 6, 3) == 1);
  CHECK(gate::Switch::capacity(1.25, 6, 3) == 3);  // 2.5 rounds up
  CHECK(gate::Switch::capacity(1.0, 7, 2) == 4);
  CHECK(gate::Switch::capacity(1.1, 100, 10) == 11);  // 1.1 * 100 / 10 = 11.000000000000002 in double
  CHECK(gate::Switch::capacity(1e-12, 5, 2) == 1);    // at least one row per expert
  CHECK(gate::Switch::capacity(1e300, 7, 2) == 7);    // never more than the rows
  CHECK(gate::Switch::capacity(0.3, 0, 4) == 0);
}

TEST_CASE("Switch routing by hand: argmax expert, un-renormalized gate, first C rows kept, loss n sum f_i P_i") {
  const auto x = matrix(6, 3, kRows);
  const double e = std::exp(1.0);
  const double a1 = e / (e + 2), a2 = e * e / (e * e + 2), a3 = e * e * e / (e * e * e + 2);
  CHECK(a1 == doctest::Approx(0.5761168847658291).epsilon(1e-14));
  // f = (3, 2, 1) / 6 before dropping; P = the column means of p. Worked out by hand:
  const double loss = 1.015040824385169;
  const std::vector<double> gates = {a2, a1, a1, 1.0 / 3, a3, a2};

  struct Case {
    double capacity_factor;
    std::vector<Index> expert;
    Index dropped;
  };
  const Index no = kNotRouted;
  for (const Case& c : {Case{2.0, {0, 1, 0, 0, 2, 1}, 0},        // C = 4: nothing dropped
                        Case{1.25, {0, 1, 0, 0, 2, 1}, 0},       // C = ceil(2.5) = 3
                        Case{1.0, {0, 1, 0, no, 2, 1}, 1},       // C = 2: expert 0's third row (the tie)
                        Case{0.5, {0, 1, no, no, 2, no}, 3}}) {  // C = 1: each expert's first row
    CAPTURE(c.capacity_factor);
    auto layer = hand_layer(c.capacity_factor);
    const auto f = layer.forward(x.view());
    CHECK(experts_of(f) == c.expert);
    for (Index t = 0; t < 6; ++t) {
      const bool kept = c.expert[static_cast<std::size_t>(t)] != kNotRouted;
      CHECK(f.gates()(t, 0) == doctest::Approx(kept ? gates[static_cast<std::size_t>(t)] : 0.0).epsilon(1e-14));
      if (!kept) CHECK(f.gates()(t, 0) == 0.0);
      CHECK(zero_row(f.y(), t) == !kept);  // a dropped token's output is exactly zero
    }
    CHECK(f.stats().dropped_tokens == c.dropped);
    Index routed = 0;
    for (const Index n : f.stats().tokens_per_expert) routed += n;
    CHECK(routed == 6 - c.dropped);
    CHECK(f.stats().load_is_count);
    // Dropping does not change f (argmax before dropping) or P.
    CHECK(f.stats().loss_aux == doctest::Approx(0.1 * loss).epsilon(1e-13));
    CHECK(f.stats().loss_z == 0.0);
    CHECK(f.stats().loss == f.stats().loss_aux);
  }

  // Kept tokens' outputs do not depend on the capacity: same gate, same expert, same bits.
  auto wide = hand_layer(2.0);
  auto narrow = hand_layer(0.5);
  const auto fw = wide.forward(x.view());
  const auto fn = narrow.forward(x.view());
  for (const Index t : {0, 1, 4})
    for (Index c = 0; c < 3; ++c) CHECK(fw.y()(t, c) == fn.y()(t, c));
}

TEST_CASE("Switch in float routes and drops as in double") {
  using F = backend::Cpu<float>;
  Layer<expert::FeedForward, gate::Switch, F> layer(
      {.d_model = 3, .n_experts = 3, .expert = {.hidden = 4}, .gate = {.capacity_factor = 1.0, .w_z = 0.1}});
  for (auto& p : layer.parameters())
    if (p.name == "gate.w_gate")
      for (Index i = 0; i < 9; ++i) p.value(i / 3, i % 3) = i % 4 == 0 ? 1.0f : 0.0f;
  Matrix<float> x(6, 3);
  for (Index i = 0; i < 18; ++i) x(i / 3, i % 3) = static_cast<float>(kRows[static_cast<std::size_t>(i)]);
  const auto f = layer.forward(x.view());
  std::vector<Index> got;
  for (Index t = 0; t < 6; ++t) got.push_back(f.expert_index()(t, 0));
  CHECK(got == std::vector<Index>{0, 1, 0, kNotRouted, 2, 1});
  CHECK(f.stats().dropped_tokens == 1);
  CHECK(f.stats().loss_aux == doctest::Approx(1e-2 * 1.015040824385169).epsilon(1e-6));
  Matrix<float> dy(6, 3, 1.0f);
  const auto b = layer.backward(f, dy.view());
  for (Index i = 0; i < 18; ++i) CHECK(std::isfinite(b.dx(i / 3, i % 3)));
}

TEST_CASE("Switch z-loss and w_aux = 0") {
  const auto x = matrix(6, 3, kRows);
  SwitchLayer layer({.d_model = 3, .n_experts = 3, .expert = {.hidden = 4}, .gate = {.w_aux = 0.0, .w_z = 0.5}});
  set_parameter(layer, "gate.w_gate", {1, 0, 0, 0, 1, 0, 0, 0, 1});
  const auto f = layer.forward(x.view());
  double z = 0;
  for (Index t = 0; t < 6; ++t) {
    const double lse = std::log(std::exp(x(t, 0)) + std::exp(x(t, 1)) + std::exp(x(t, 2)));
    z += lse * lse;
  }
  CHECK(f.stats().loss_aux == 0.0);
  CHECK(f.stats().loss_z == doctest::Approx(0.5 * z / 6).epsilon(1e-13));
}

TEST_CASE("which tokens are dropped depends on position only, and the result is deterministic") {
  // The rows of kRows reversed: expert 0's choosers now come in the order tie, (1, 0, 0), (2, 0, 0).
  std::vector<double> reversed;
  for (Index t = 5; t >= 0; --t)
    for (Index c = 0; c < 3; ++c) reversed.push_back(kRows[static_cast<std::size_t>(t * 3 + c)]);
  const auto x = matrix(6, 3, reversed);
  auto layer = hand_layer(1.0);
  const auto f = layer.forward(x.view());
  // The row with the largest gate (2, 0, 0) is now last among expert 0's and is the one dropped.
  CHECK(experts_of(f) == std::vector<Index>{1, 2, 0, 0, 1, kNotRouted});
  CHECK(zero_row(f.y(), 5));
  const auto g = layer.forward(x.view());
  CHECK(test::same_bits(f.y(), g.y()));

  // Thread counts: tests/determinism.cpp, on batches large enough to split the work.
}

TEST_CASE("Switch policy with groups: capacity, drops and the loss are per group") {
  // Two groups of a 2-expert gate, W_g = I in both: group 0 rows (1,0) (2,0) (0,1), group 1 rows (1,0) (0,3).
  gate::Switch::Policy<B> gate({.capacity_factor = 0.5, .w_aux = 1.0}, 2, 2, 1, 2);
  auto params = gate.parameters();
  REQUIRE(params.size() == 1);
  CHECK(params[0].shape == std::vector<Index>{2, 2, 2});
  const std::vector<double> eye2 = {1, 0, 0, 1, 1, 0, 0, 1};
  for (Index i = 0; i < 8; ++i) params[0].value(i / 2, i % 2) = eye2[static_cast<std::size_t>(i)];
  auto x = matrix(5, 2, {1, 0, 2, 0, 0, 1, 1, 0, 0, 3});
  Matrix<Index> offsets(3, 1);
  offsets.view()(0, 0) = 0;
  offsets.view()(1, 0) = 3;
  offsets.view()(2, 0) = 5;
  B::Context ctx;
  GateRouting<B> routing;
  gate::Switch::Policy<B>::Saved saved;
  gate.forward(ctx, x.view(), offsets.data(), Mode::train, {}, routing, saved);
  moe::resolve_deferred_losses<B>(ctx, routing);
  // C_0 = ceil(0.5 * 3 / 2) = 1: group 0's second row is dropped. C_1 = ceil(0.5 * 2 / 2) = 1.
  // (One capacity over all 5 rows, ceil(1.25) = 2, would have kept it.)
  const std::vector<Index> want = {0, kNotRouted, 1, 0, 1};
  const auto sig = [](double z) { return 1 / (1 + std::exp(-z)); };
  const std::vector<double> gates = {sig(1), 0, sig(1), sig(1), sig(3)};
  for (Index r = 0; r < 5; ++r) {
    CHECK(routing.expert(r, 0) == want[static_cast<std::size_t>(r)]);
    CHECK(routing.gate(r, 0) == doctest::Approx(gates[static_cast<std::size_t>(r)]).epsilon(1e-14));
  }
  // Group 0: 2 (2/3 P_0 + 1/3 P_1) = 1.0846...; group 1: f = (1/2, 1/2), so 1; weighted 3/5 and 2/5.
  CHECK(routing.loss_aux == doctest::Approx(0.6 * 1.0846215728839739 + 0.4 * 1.0).epsilon(1e-13));
  CHECK(routing.load_is_count);

  // backward equals central differences of sum(dgate .* gate) + aux_scale (loss_aux + loss_z).
  gate::Switch::Policy<B> zg({.capacity_factor = 0.5, .w_aux = 0.7, .w_z = 0.3}, 2, 2, 1, 2);
  auto zp = zg.parameters();
  for (Index i = 0; i < 8; ++i) zp[0].value(i / 2, i % 2) = eye2[static_cast<std::size_t>(i)] + 0.1 * i;
  const auto dgate = matrix(5, 1, {0.3, -0.7, 1.1, 0.4, -0.2});
  const double aux_scale = 1.7;
  auto objective = [&] {
    GateRouting<B> rt;
    gate::Switch::Policy<B>::Saved sv;
    zg.forward(ctx, x.view(), offsets.data(), Mode::train, {}, rt, sv);
    moe::resolve_deferred_losses<B>(ctx, rt);
    double s = aux_scale * (rt.loss_aux + rt.loss_z);
    for (Index r = 0; r < 5; ++r) s += dgate(r, 0) * rt.gate(r, 0);
    return s;
  };
  zg.forward(ctx, x.view(), offsets.data(), Mode::train, {}, routing, saved);
  CHECK(routing.expert(1, 0) == kNotRouted);
  Matrix<double> dx(5, 2);
  B::fill(ctx, dx.view(), 0.0);
  B::fill(ctx, zp[0].grad, 0.0);
  zg.backward(ctx, x.view(), offsets.data(), saved, dgate.view(), nullptr, aux_scale, dx.view());
  auto numeric = [&](double* v) {
    const double keep = *v, h = 1e-6;
    *v = keep + h;
    const double up = objective();
    *v = keep - h;
    const double down = objective();
    *v = keep;
    return (up - down) / (2 * h);
  };
  std::vector<double> a, n;
  for (Index i = 0; i < 10; ++i) {
    a.push_back(dx(i / 2, i % 2));
    n.push_back(numeric(&x.view()(i / 2, i % 2)));
  }
  for (Index i = 0; i < 8; ++i) {
    a.push_back(zp[0].grad(i / 2, i % 2));
    n.push_back(numeric(&zp[0].value(i / 2, i % 2)));
  }
  CHECK(test::relative_error(a, n) < 1e-8);
  CHECK(std::abs(a[2]) + std::abs(a[3]) > 0);  // the dropped row still gets the aux and z gradients
}

TEST_CASE("Switch gradients: task, aux loss and z-loss, with and without drops") {
  SwitchLayer::Config base{.d_model = 4, .n_experts = 4, .expert = {.hidden = 5}};
  SUBCASE("no drops") {
    base.gate = {.capacity_factor = 4.0, .w_aux = 0.5, .w_z = 0.1};
    check_switch_gradients<SwitchLayer>(base, 10, false);
  }
  SUBCASE("capacity 0.5: drops") {
    base.gate = {.capacity_factor = 0.5, .w_aux = 1.0, .w_z = 0.2};
    check_switch_gradients<SwitchLayer>(base, 12, true);
  }
  SUBCASE("aux loss alone (dy = 0)") {
    base.gate = {.capacity_factor = 0.75, .w_aux = 2.0};
    check_switch_gradients<SwitchLayer>(base, 12, true, true);
  }
  SUBCASE("importance loss and expert biases") {
    base.expert.bias = true;
    base.gate = {.capacity_factor = 1.0, .w_aux = 0.3, .w_z = 0.05, .w_importance = 1.0};
    check_switch_gradients<SwitchLayer>(base, 12, false);
  }
}

TEST_CASE("Switch bad input names the value and the expectation") {
  SwitchLayer::Config c{.d_model = 4, .n_experts = 4, .expert = {.hidden = 5}};
  auto build = [&] { SwitchLayer l(c); };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const double cf : {0.0, -1.0, nan, inf}) {
    c.gate = {.capacity_factor = cf};
    CAPTURE(cf);
    const std::string msg = error_of(build);
    CHECK(contains(msg, "gate::Switch: capacity_factor = "));
    CHECK(contains(msg, ", expected a finite value > 0"));
  }
  c.gate = {.capacity_factor = -1.0};
  CHECK(contains(error_of(build), "capacity_factor = -1, expected a finite value > 0"));
  c.gate = {.w_aux = -0.5};
  CHECK(contains(error_of(build), "gate::Switch: w_aux = -0.5, expected a finite value >= 0"));
  c.gate = {.w_aux = nan};
  CHECK(contains(error_of(build), "gate::Switch: w_aux = "));
  c.gate = {.w_z = -2.0};
  CHECK(contains(error_of(build), "w_z = -2, expected all finite and >= 0"));
  c.gate = {.w_importance = -1.0};
  CHECK(contains(error_of(build), "w_importance = -1"));
  c.gate = {.w_load = -3.0};
  CHECK(contains(error_of(build), "w_load = -3"));
  c.gate = {.init_scale = -1.0};
  CHECK(contains(error_of(build), "gate::Switch: init_scale = -1, expected a finite value >= 0"));
  c.gate = {};
  CHECK(error_of(build).empty());

  SwitchLayer2::Config c2{
      .d_model = 4,
      .n_experts = 4,
      .expert = {.hidden = 5},
      .gate = {.levels = {{{.branching = 2, .gate = {}}, {.branching = 2, .gate = {.capacity_factor = 0}}}}}};
  CHECK(contains(error_of([&] { SwitchLayer2 l(c2); }),
                 "gate::Hierarchy: levels[1] (2 group(s) of 2): gate::Switch: capacity_factor = 0"));
}

TEST_CASE("Switch at both levels of a depth-2 layer: the second level's capacity is per group") {
  // Level 1: W = I over 2 groups (group 0 when a >= b), no drops. Level 2: W = 0, so every row
  // ties and picks its group's expert 0 with gate 1/2; capacity 1.0 per group of R_g rows.
  SwitchLayer2 layer({.d_model = 2,
                      .n_experts = 4,
                      .expert = {.hidden = 3, .bias = true},
                      .gate = {.levels = {{{.branching = 2, .gate = {.capacity_factor = 4.0, .w_aux = 0.2}},
                                           {.branching = 2, .gate = {.capacity_factor = 1.0, .w_aux = 0.3}}}},
                               .w_importance = 0.0,
                               .w_load = 0.0},
                      .seed = 2});
  test::randomize_parameters(layer, 4);
  set_parameter(layer, "gate.0.w_gate", {1, 0, 0, 1});
  set_parameter(layer, "gate.1.w_gate", std::vector<double>(8, 0.0));
  const auto x = matrix(7, 2, {1, 0, 0, 1, 0.5, 0, 0, 2, 1, 0.5, 3, 0, 0.2, 0.1});
  const auto f = layer.forward(x.view());
  // Group 0 gets tokens 0, 2, 4, 5, 6: C = ceil(5 / 2) = 3 keeps 0, 2, 4. Group 1 gets 1, 3:
  // C = 1 keeps 1. (One capacity over all 7 rows, 4, would have kept token 5.)
  std::vector<Index> got;
  for (Index t = 0; t < 7; ++t) got.push_back(f.expert_index()(t, 0));
  const Index no = kNotRouted;
  CHECK(got == std::vector<Index>{0, 2, 0, no, 0, no, no});
  CHECK(f.stats().dropped_tokens == 3);
  CHECK(f.stats().tokens_per_expert == std::vector<Index>{3, 0, 1, 0});
  const auto sig = [](double z) { return 1 / (1 + std::exp(-z)); };
  std::vector<double> p0;  // level 1's p of group 0 per token
  for (Index t = 0; t < 7; ++t) p0.push_back(sig(x(t, 0) - x(t, 1)));
  for (Index t = 0; t < 7; ++t) {
    const bool kept = got[static_cast<std::size_t>(t)] != kNotRouted;
    const double level1 = got[static_cast<std::size_t>(t)] == 2 ? 1 - p0[1] : p0[static_cast<std::size_t>(t)];
    CHECK(f.gates()(t, 0) == doctest::Approx(kept ? 0.5 * level1 : 0.0).epsilon(1e-14));
    CHECK(zero_row(f.y(), t) == !kept);
  }
  // Level 1: f = (5/7, 2/7), P = column means of p. Level 2: each group has f = (1, 0) and
  // P = (1/2, 1/2), so 2 * 1/2 = 1 per group, and 1 weighted.
  double mean0 = 0;
  for (const double v : p0) mean0 += v / 7;
  const double level1 = 2 * (5.0 / 7 * mean0 + 2.0 / 7 * (1 - mean0));
  CHECK(f.stats().loss_aux == doctest::Approx(0.2 * level1 + 0.3 * 1.0).epsilon(1e-13));

  const auto dy = test::random_matrix<double>(7, 2, 3);
  const auto b = layer.backward(f, dy.view());
  CHECK(b.dx.rows() == 7);

  SwitchLayer2::Config base{
      .d_model = 4,
      .n_experts = 6,
      .expert = {.hidden = 5},
      .gate = {.levels = {{{.branching = 2, .gate = {.capacity_factor = 1.0, .w_aux = 0.5}},
                           {.branching = 3, .gate = {.capacity_factor = 0.7, .w_aux = 0.8, .w_z = 0.2}}}},
               .w_importance = 0.5,
               .w_load = 0.0}};
  check_switch_gradients<SwitchLayer2>(base, 14, true);
}
