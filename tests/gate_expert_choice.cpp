// gate::ExpertChoice (Zhou et al. 2022): each expert takes the C rows of its group with the largest
// softmax score, C = ceil(c R_g / n). Hand-computed routings, capacity rounding, exact per-expert
// counts, ties, gradients, bad input, and the gate inside a depth-2 layer.

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using EC = gate::ExpertChoice;
using Policy = EC::Policy<B>;
using Flat = Layer<expert::FeedForward, EC, B>;

using test::contains;
using test::error_of;

struct Run {
  GateRouting<B> routing;
  Policy::Saved saved;
};

Run forward(const Policy& gate, ConstMatrixView<double> x, const Index* offsets = nullptr) {
  Run r;
  B::Context ctx;
  gate.forward(ctx, x, offsets, Mode::train, GateNoise<double>{}, r.routing, r.saved);
  moe::resolve_deferred_losses<B>(ctx, r.routing);
  return r;
}

// Sets a square router to the identity, so that the logits are x itself.
void set_identity(MatrixView<double> w) {
  for (Index r = 0; r < w.rows; ++r)
    for (Index c = 0; c < w.cols; ++c) w(r, c) = r == c ? 1.0 : 0.0;
}

// Rows of log(p): with the identity router, softmax gives back p / sum(p).
Matrix<double> log_rows(const std::vector<std::vector<double>>& p) {
  Matrix<double> x(static_cast<Index>(p.size()), static_cast<Index>(p[0].size()));
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c)
      x(r, c) = std::log(p[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)]);
  return x;
}

// Checks routing against expected (row, expert) -> gate, kNotRouted elsewhere, slot j = expert j.
void check_routing(const GateRouting<B>& r, const std::vector<std::vector<double>>& expected) {
  for (Index t = 0; t < r.expert.rows(); ++t)
    for (Index j = 0; j < r.expert.cols(); ++j) {
      const double g = expected[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)];
      CAPTURE(t);
      CAPTURE(j);
      CHECK(r.expert(t, j) == (g > 0 ? j : kNotRouted));
      CHECK(r.gate(t, j) == doctest::Approx(g).epsilon(1e-12));
    }
}

// Per group and expert: exactly capacity(R_g) rows taken, all within the group, and every taken
// score at least every untaken one (ties: the taken row has the lower index).
void check_top_c(const Policy& gate, const Run& run, const std::vector<Index>& offsets) {
  const Index n = gate.n_experts();
  const auto& prob = run.saved.prob;
  for (std::size_t g = 0; g + 1 < offsets.size(); ++g) {
    const Index begin = offsets[g], end = offsets[g + 1];
    for (Index i = 0; i < n; ++i) {
      Index taken = 0;
      for (Index t = begin; t < end; ++t) {
        if (run.routing.expert(t, i) == kNotRouted) {
          CHECK(run.routing.gate(t, i) == 0.0);
          continue;
        }
        ++taken;
        CHECK(run.routing.expert(t, i) == i);
        CHECK(run.routing.gate(t, i) == prob(t, i));
        for (Index u = begin; u < end; ++u)
          if (run.routing.expert(u, i) == kNotRouted)
            CHECK((prob(t, i) > prob(u, i) || (prob(t, i) == prob(u, i) && t < u)));
      }
      CHECK(taken == gate.capacity(end - begin));
    }
  }
}

template <class L>
void check_gradients_of(const typename L::Config& base, Index t_count, const std::string& what) {
  bool done = false;
  for (std::uint64_t seed = 1; seed < 40 && !done; ++seed) {
    auto c = base;
    c.seed = seed;
    L layer(c);
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(t_count, c.d_model, seed * 31 + 1);
    const auto dy = test::random_matrix<double>(t_count, c.d_model, seed * 31 + 2);
    const auto check = test::check_layer_gradients(layer, x.view(), dy.view());
    if (!check.routing_stable) continue;
    done = true;
    for (const auto& failure : check.failures) FAIL_CHECK(what, ": ", failure);
    CHECK(check.zero_grads.empty());
    CHECK(check.worst < 1e-6);
    MESSAGE(what, ": worst relative error ", check.worst);
  }
  CHECK(done);
}

// A level gate for testing ExpertChoice at the second level only: TopK or ExpertChoice by config.
struct TopKOrChoice {
  struct Config {
    bool expert_choice = false;
    gate::TopK::Config top_k{};
    EC::Config choice{};
  };
  template <Backend BB>
  class Policy {
    using S = typename BB::Scalar;

   public:
    struct Saved {
      typename gate::TopK::Policy<BB>::Saved top_k;
      typename EC::Policy<BB>::Saved choice;
    };
    Policy(const Config& c, Index d, Index n, std::uint64_t seed, Index groups = 1) {
      if (c.expert_choice)
        choice_.emplace(c.choice, d, n, seed, groups);
      else
        top_k_.emplace(c.top_k, d, n, seed, groups);
    }
    [[nodiscard]] Index k() const { return choice_ ? choice_->k() : top_k_->k(); }
    [[nodiscard]] Index n_experts() const { return choice_ ? choice_->n_experts() : top_k_->n_experts(); }
    [[nodiscard]] bool needs_noise(Mode) const { return false; }
    [[nodiscard]] BalanceWeights balance_weights() const {
      return choice_ ? choice_->balance_weights() : top_k_->balance_weights();
    }
    [[nodiscard]] const EC::Policy<BB>* choice() const { return choice_ ? &*choice_ : nullptr; }
    void forward(typename BB::Context& ctx, ConstMatrixView<S> x, const Index* offsets, Mode mode,
                 const GateNoise<S>& noise, GateRouting<BB>& routing, Saved& saved) const {
      if (choice_)
        choice_->forward(ctx, x, offsets, mode, noise, routing, saved.choice);
      else
        top_k_->forward(ctx, x, offsets, mode, noise, routing, saved.top_k);
    }
    void backward(typename BB::Context& ctx, ConstMatrixView<S> x, const Index* offsets, const Saved& saved,
                  ConstMatrixView<S> dgate, const S* dload, S aux_scale, MatrixView<S> dx) {
      if (choice_)
        choice_->backward(ctx, x, offsets, saved.choice, dgate, dload, aux_scale, dx);
      else
        top_k_->backward(ctx, x, offsets, saved.top_k, dgate, dload, aux_scale, dx);
    }
    [[nodiscard]] std::vector<Parameter<S>> parameters() {
      return choice_ ? choice_->parameters() : top_k_->parameters();
    }

   private:
    std::optional<typename gate::TopK::Policy<BB>> top_k_;
    std::optional<typename EC::Policy<BB>> choice_;
  };
};
static_assert(GateFamily<TopKOrChoice, B>);
static_assert(GateFamily<EC, B>);

using Tree = Layer<expert::FeedForward, EC, B, 2>;
using Mixed = Layer<expert::FeedForward, TopKOrChoice, B, 2>;

Tree::Config tree(Index a, double c1, Index b, double c2, double w_z = 0.0, double w_importance = 0.0) {
  return {.d_model = 4,
          .n_experts = a * b,
          .expert = {.hidden = 5},
          .gate = {.levels = {{{.branching = a, .gate = {.capacity_factor = c1, .w_z = w_z}},
                               {.branching = b, .gate = {.capacity_factor = c2, .w_z = w_z}}}},
                   .w_importance = w_importance,
                   .w_load = 0.0}};
}

Mixed::Config mixed(Index a, Index k1, Index b, double c2, double w_z = 0.0) {
  return {.d_model = 4,
          .n_experts = a * b,
          .expert = {.hidden = 5},
          .gate = {.levels = {{{.branching = a, .gate = {.top_k = {.k = k1, .w_z = w_z}}},
                               {.branching = b,
                                .gate = {.expert_choice = true, .choice = {.capacity_factor = c2, .w_z = w_z}}}}},
                   .w_importance = 0.5,
                   .w_load = 0.0}};
}

}  // namespace

TEST_CASE("hand-computed: three experts, four rows, C = 1, one token dropped") {
  // c = 0.75: C = ceil(0.75 * 4 / 3) = 1. S per row (identity router, x = log p):
  //   r0 (.5, .25, .25)  r1 (.125, .75, .125)  r2 (.25, .25, .5)  r3 (.75, .125, .125)
  // expert 0 takes r3, expert 1 takes r1, expert 2 takes r2; nobody takes r0.
  Policy gate({.capacity_factor = 0.75}, 3, 3, 0);
  set_identity(gate.parameters()[0].value);
  CHECK(gate.k() == 3);
  CHECK(gate.capacity(4) == 1);
  const auto x = log_rows({{2, 1, 1}, {1, 6, 1}, {1, 1, 2}, {6, 1, 1}});
  const auto run = forward(gate, x.view());
  check_routing(run.routing, {{0, 0, 0}, {0, 0.75, 0}, {0, 0, 0.5}, {0.75, 0, 0}});
  CHECK(run.routing.load_is_count);
  CHECK(run.routing.loss_aux == 0.0);
  CHECK(run.routing.loss_z == 0.0);

  // Through a layer: r0 is dropped and outputs 0; every expert computes exactly one token.
  Flat layer({.d_model = 3, .n_experts = 3, .expert = {.hidden = 4}, .gate = {.capacity_factor = 0.75}});
  test::randomize_parameters(layer, 3);
  set_identity(layer.parameters()[0].value);
  const auto f = layer.forward(x.view());
  CHECK(f.stats().dropped_tokens == 1);
  CHECK(f.stats().tokens_per_expert == std::vector<Index>{1, 1, 1});
  CHECK(f.stats().load == std::vector<double>{1, 1, 1});
  CHECK(f.stats().loss == 0.0);
  for (Index c = 0; c < 3; ++c) CHECK(f.y()(0, c) == 0.0);
  for (Index t = 1; t < 4; ++t) {
    double norm = 0;
    for (Index c = 0; c < 3; ++c) norm += std::abs(f.y()(t, c));
    CHECK(norm > 0);
  }
  CHECK(f.expert_index()(1, 1) == 1);
  CHECK(f.gates()(3, 0) == doctest::Approx(0.75).epsilon(1e-12));
}

TEST_CASE("hand-computed: two experts, four rows, C = 3, tokens taken by both, one, or the other") {
  // c = 1.5: C = ceil(1.5 * 4 / 2) = 3. S: r0 (.5, .5)  r1 (.9, .1)  r2 (.2, .8)  r3 (.6, .4).
  // expert 0 takes r1, r3, r0 (not r2); expert 1 takes r2, r0 (tie at .5, but within the top 3), r3.
  Policy gate({.capacity_factor = 1.5}, 2, 2, 0);
  set_identity(gate.parameters()[0].value);
  CHECK(gate.capacity(4) == 3);
  const auto x = log_rows({{5, 5}, {9, 1}, {2, 8}, {6, 4}});
  const auto run = forward(gate, x.view());
  check_routing(run.routing, {{0.5, 0.5}, {0.9, 0}, {0, 0.8}, {0.6, 0.4}});
}

TEST_CASE("ties go to the lower row, deterministically") {
  // C = 2; r1 and r3 are the same row. Expert 0: r2 (.9), then r1 over r3 (.6 each).
  // Expert 1: r0 (.7), then r1 over r3 (.4 each). r3 is dropped.
  Policy gate({.capacity_factor = 1.0}, 2, 2, 0);
  set_identity(gate.parameters()[0].value);
  const auto x = log_rows({{3, 7}, {6, 4}, {9, 1}, {6, 4}});
  const auto run = forward(gate, x.view());
  check_routing(run.routing, {{0, 0.7}, {0.6, 0.4}, {0.9, 0}, {0, 0}});

  // A zero router ties every score at 1 / n: every expert takes rows 0 .. C - 1.
  Policy zero({.capacity_factor = 2.0, .init_scale = 0.0}, 4, 4, 0);
  const auto xs = test::random_matrix<double>(10, 4, 5);
  const auto tied = forward(zero, xs.view());
  CHECK(zero.capacity(10) == 5);
  for (Index t = 0; t < 10; ++t)
    for (Index i = 0; i < 4; ++i) {
      CHECK(tied.routing.expert(t, i) == (t < 5 ? i : kNotRouted));
      CHECK(tied.routing.gate(t, i) == (t < 5 ? 0.25 : 0.0));
    }

  // Thread counts: tests/determinism.cpp, on batches large enough to split the work.
}

TEST_CASE("capacity: C = ceil(c R / n), clamped to [0, R], decimal factors exact") {
  Policy two({.capacity_factor = 2.0}, 4, 3, 0);
  CHECK(two.capacity(0) == 0);
  CHECK(two.capacity(1) == 1);  // ceil(2 / 3)
  CHECK(two.capacity(3) == 2);
  CHECK(two.capacity(5) == 4);                                          // ceil(10 / 3)
  CHECK(Policy({.capacity_factor = 1.1}, 4, 5, 0).capacity(50) == 11);  // 1.1 * 50 / 5 is 11.000000000000002 in double
  CHECK(Policy({.capacity_factor = 1.1}, 4, 11, 0).capacity(50) == 5);
  CHECK(Policy({.capacity_factor = 0.01}, 4, 4, 0).capacity(10) == 1);    // a positive capacity takes at least one row
  CHECK(Policy({.capacity_factor = 100.0}, 4, 4, 0).capacity(10) == 10);  // clamped: every expert takes every row
  CHECK(Policy({.capacity_factor = 1.0}, 4, 1, 0).capacity(7) == 7);

  // With C = R the gate is dense softmax: every slot routed, gate = S.
  Policy dense({.capacity_factor = 3.0}, 4, 3, 0);
  const auto x = test::random_matrix<double>(6, 4, 1);
  const auto run = forward(dense, x.view());
  for (Index t = 0; t < 6; ++t) {
    double sum = 0;
    for (Index i = 0; i < 3; ++i) {
      CHECK(run.routing.expert(t, i) == i);
      sum += run.routing.gate(t, i);
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-14));
  }

  // No rows: no picks, empty routing.
  Matrix<double> none(0, 4);
  const auto empty = forward(two, none.view());
  CHECK(empty.routing.expert.rows() == 0);
  CHECK(empty.routing.expert.cols() == 3);
}

TEST_CASE("every expert takes exactly C rows, the top C of its column, per group") {
  for (const double cf : {0.3, 1.0, 1.7, 2.0, 5.0}) {
    CAPTURE(cf);
    Policy gate({.capacity_factor = cf}, 4, 5, 3);
    const auto x = test::random_matrix<double>(23, 4, 2);
    const auto run = forward(gate, x.view());
    check_top_c(gate, run, {0, 23});

    // Three groups of 7, 0 and 16 rows, each with its own router.
    Policy grouped({.capacity_factor = cf}, 4, 5, 3, 3);
    CHECK(grouped.parameters()[0].shape == std::vector<Index>{3, 4, 5});
    const std::vector<Index> offsets{0, 7, 7, 23};
    const auto grun = forward(grouped, x.view(), offsets.data());
    check_top_c(grouped, grun, offsets);
  }

  // Through a layer: tokens_per_expert is C for every expert, dropped tokens output 0.
  for (const double cf : {0.5, 1.0, 2.0}) {
    CAPTURE(cf);
    Flat layer({.d_model = 4, .n_experts = 6, .expert = {.hidden = 5}, .gate = {.capacity_factor = cf}, .seed = 4});
    const auto x = test::random_matrix<double>(30, 4, 8);
    const auto f = layer.forward(x.view());
    const Index c = layer.gate().capacity(30);
    for (const Index count : f.stats().tokens_per_expert) CHECK(count == c);
    CHECK(f.stats().cv2_load == 0.0);
    Index dropped = 0;
    for (Index t = 0; t < 30; ++t) {
      bool any = false;
      for (Index j = 0; j < 6; ++j) any = any || f.expert_index()(t, j) != kNotRouted;
      if (any) continue;
      ++dropped;
      for (Index col = 0; col < 4; ++col) CHECK(f.y()(t, col) == 0.0);
    }
    CHECK(f.stats().dropped_tokens == dropped);
    if (cf == 0.5) CHECK(dropped >= 15);  // 6 experts * 3 rows cover at most 18 of 30 tokens
  }
}

TEST_CASE("z-loss: w_z times the mean squared log-sum-exp of the router logits") {
  Policy gate({.capacity_factor = 1.0, .w_z = 0.5}, 2, 2, 0);
  set_identity(gate.parameters()[0].value);
  Matrix<double> x(2, 2);
  x(0, 0) = 0.0, x(0, 1) = 0.0;                      // lse = log 2
  x(1, 0) = std::log(3.0), x(1, 1) = std::log(1.0);  // lse = log 4
  const auto run = forward(gate, x.view());
  const double expect = 0.5 * (std::log(2.0) * std::log(2.0) + std::log(4.0) * std::log(4.0)) / 2;
  CHECK(run.routing.loss_z == doctest::Approx(expect).epsilon(1e-14));
}

TEST_CASE("gradients match central differences") {
  check_gradients_of<Flat>({.d_model = 4, .n_experts = 4, .expert = {.hidden = 5}, .gate = {.capacity_factor = 1.0}},
                           10, "c = 1");
  check_gradients_of<Flat>(
      {.d_model = 4, .n_experts = 5, .expert = {.hidden = 5}, .gate = {.capacity_factor = 0.7, .w_z = 0.3}}, 12,
      "c = 0.7, z-loss");
  check_gradients_of<Flat>({.d_model = 4,
                            .n_experts = 3,
                            .expert = {.hidden = 5, .bias = true},
                            .gate = {.capacity_factor = 2.0, .w_z = 0.1, .w_importance = 0.5, .w_load = 1.0}},
                           9, "c = 2, z-loss, importance");
  check_gradients_of<Flat>(
      {.d_model = 4, .n_experts = 3, .expert = {.hidden = 5}, .gate = {.capacity_factor = 3.0, .w_z = 0.2}}, 7,
      "c = n (dense)");
}

TEST_CASE("backward: only the taken scores carry the task gradient; aux_scale scales the z-loss") {
  Policy gate({.capacity_factor = 1.0, .w_z = 0.4}, 2, 2, 0);
  set_identity(gate.parameters()[0].value);
  const auto x = log_rows({{3, 7}, {6, 4}, {9, 1}, {6, 4}});  // r3 dropped (see the ties case)
  const auto run = forward(gate, x.view());
  B::Context ctx;
  Matrix<double> dgate(4, 2, 1.0), dx(4, 2, 0.0);
  gate.backward(ctx, x.view(), nullptr, run.saved, dgate.view(), nullptr, 0.0, dx.view());
  // Row 3: nothing taken and no z-loss (aux_scale 0): no gradient at all.
  CHECK(dx(3, 0) == 0.0);
  CHECK(dx(3, 1) == 0.0);
  // Row 0: only expert 1 (S = .7) taken: dlogit_1 = .7 (1 - .7), dlogit_0 = .3 (0 - .7).
  CHECK(dx(0, 0) == doctest::Approx(-0.21).epsilon(1e-12));
  CHECK(dx(0, 1) == doctest::Approx(0.21).epsilon(1e-12));
  // Row 1: both taken, gates sum to 1: no gradient.
  CHECK(std::abs(dx(1, 0)) < 1e-15);
  // With aux_scale 1, row 3 gets the z-loss gradient w_z 2 lse S / R.
  Matrix<double> dz(4, 2, 0.0);
  gate.backward(ctx, x.view(), nullptr, run.saved, dgate.view(), nullptr, 1.0, dz.view());
  const double lse = std::log(10.0);
  CHECK(dz(3, 0) == doctest::Approx(0.4 * 2 * lse * 0.6 / 4).epsilon(1e-12));
}

TEST_CASE("bad configurations are rejected with the value and the expectation") {
  const auto make = [](EC::Config c) { return error_of([&] { Policy p(c, 4, 3, 0); }); };
  CHECK(
      contains(make({.capacity_factor = 0.0}), "gate::ExpertChoice: capacity_factor = 0, expected a finite value > 0"));
  CHECK(contains(make({.capacity_factor = -1.5}), "capacity_factor = -1.5, expected a finite value > 0"));
  CHECK(contains(make({.capacity_factor = std::numeric_limits<double>::quiet_NaN()}), "capacity_factor = nan"));
  CHECK(contains(make({.capacity_factor = std::numeric_limits<double>::infinity()}), "capacity_factor = inf"));
  CHECK(
      contains(make({.w_z = -1.0}), "gate::ExpertChoice: w_importance = 0, w_load = 0, w_z = -1, expected all finite"));
  CHECK(contains(make({.w_importance = -0.5}), "w_importance = -0.5"));
  CHECK(contains(make({.w_load = std::numeric_limits<double>::quiet_NaN()}), "w_load = nan"));
  CHECK(contains(make({.init_scale = -1.0}), "gate::ExpertChoice: init_scale = -1, expected a finite value >= 0"));
  CHECK(contains(error_of([] { Policy p({}, 4, 0, 0); }), "gate::ExpertChoice: n_experts = 0, expected at least 1"));
  CHECK(contains(
      error_of([] { Flat l({.d_model = 4, .n_experts = 3, .expert = {.hidden = 2}, .gate = {.capacity_factor = 0}}); }),
      "capacity_factor = 0"));
  auto c = tree(2, 1.0, 3, 1.0);
  c.gate.levels[1].gate.capacity_factor = -2;
  CHECK(contains(error_of([&] { Tree l(c); }),
                 "gate::Hierarchy: levels[1] (2 group(s) of 3): gate::ExpertChoice: "
                 "capacity_factor = -2"));

  // A NaN input is refused by the layer; the gate alone ranks a NaN score after every number.
  Flat layer({.d_model = 2, .n_experts = 2, .expert = {.hidden = 2}, .gate = {.capacity_factor = 1.0}});
  auto x = test::random_matrix<double>(4, 2, 1);
  x(2, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK(contains(error_of([&] { (void)layer.forward(x.view()); }), "non-finite value nan at (2, 1)"));
  Policy gate({.capacity_factor = 1.0}, 2, 2, 0);
  set_identity(gate.parameters()[0].value);
  const auto run = forward(gate, x.view());
  for (Index i = 0; i < 2; ++i) CHECK(run.routing.expert(2, i) == kNotRouted);
}

TEST_CASE("depth 2 with ExpertChoice at both levels: per-node capacity, forward, backward, gradients") {
  constexpr Index a = 2, b = 3, T = 12;
  Tree layer(tree(a, 1.0, b, 1.5, 0.1, 0.5));
  CHECK(layer.k() == a * b);
  test::randomize_parameters(layer, 2, 0.8);
  const auto x = test::random_matrix<double>(T, 4, 3);
  const auto f = layer.forward(x.view());
  const auto& levels = f.stats().levels;
  REQUIRE(levels.size() == 2);
  const Index c1 = layer.gate().level(0).capacity(T);  // ceil(1.0 * 12 / 2) = 6
  CHECK(c1 == 6);
  for (Index g = 0; g < a; ++g) CHECK(levels[0].count[static_cast<std::size_t>(g)] == c1);
  for (Index v = 0; v < a * b; ++v) {
    const Index parent = levels[0].count[static_cast<std::size_t>(v / b)];
    CHECK(levels[1].count[static_cast<std::size_t>(v)] == layer.gate().level(1).capacity(parent));  // ceil(1.5 * 6 / 3)
    CHECK(f.stats().tokens_per_expert[static_cast<std::size_t>(v)] == 3);
  }
  CHECK(f.stats().loss_z > 0);
  const auto dy = test::random_matrix<double>(T, 4, 4);
  const auto back = layer.backward(f, dy.view());
  CHECK(back.dx.rows() == T);
  for (Index t = 0; t < T; ++t) {
    bool any = false;
    for (Index j = 0; j < a * b; ++j) any = any || f.expert_index()(t, j) != kNotRouted;
    if (!any)
      for (Index col = 0; col < 4; ++col) CHECK(f.y()(t, col) == 0.0);
  }

  check_gradients_of<Tree>(tree(a, 1.0, b, 1.5), T, "depth 2, both levels");
  check_gradients_of<Tree>(tree(a, 1.5, b, 0.8, 0.2, 0.5), T, "depth 2, both levels, z-loss, importance");
}

TEST_CASE("depth 2 with TopK at the first level and ExpertChoice at the second") {
  constexpr Index a = 3, b = 2, T = 14;
  Mixed layer(mixed(a, 1, b, 1.0));
  test::randomize_parameters(layer, 5, 0.8);
  CHECK(layer.k() == b);
  const auto x = test::random_matrix<double>(T, 4, 6);
  const auto f = layer.forward(x.view());
  const auto& levels = f.stats().levels;
  REQUIRE(levels.size() == 2);
  const auto* second = layer.gate().level(1).choice();
  REQUIRE(second != nullptr);
  Index total = 0;
  for (Index g = 0; g < a; ++g) total += levels[0].count[static_cast<std::size_t>(g)];
  CHECK(total == T);
  for (Index v = 0; v < a * b; ++v) {
    const Index c = second->capacity(levels[0].count[static_cast<std::size_t>(v / b)]);
    CHECK(levels[1].count[static_cast<std::size_t>(v)] == c);
    CHECK(f.stats().tokens_per_expert[static_cast<std::size_t>(v)] == c);
  }
  const auto dy = test::random_matrix<double>(T, 4, 7);
  CHECK(layer.backward(f, dy.view()).dx.rows() == T);

  check_gradients_of<Mixed>(mixed(a, 2, b, 1.0), T, "depth 2, TopK k = 2 then ExpertChoice");
  check_gradients_of<Mixed>(mixed(2, 1, 3, 0.6, 0.2), T, "depth 2, TopK k = 1 then ExpertChoice, z-loss");
}

namespace {

// rank_entries on the given probabilities (rows x n, row-major), for backend scalar S.
template <class S>
void check_ranking_against_the_heap(const std::vector<S>& prob, Index rows, Index n, const std::vector<Index>& offsets) {
  using P = EC::Policy<backend::Cpu<S>>;
  const Index groups = static_cast<Index>(offsets.size()) - 1;
  P policy({.capacity_factor = 1.5}, 3, n, 1, groups);
  typename backend::Cpu<S>::Context ctx{};
  policy.rank_entries(ctx, prob.data(), rows, offsets.data());
  // The ranked entries, read back: each (group g, expert i) segment in expert_choice_select's order.
  std::vector<Index> ranked(static_cast<std::size_t>(rows * n));
  policy.copy_order(ranked.data());
  for (Index g = 0; g < groups; ++g) {
    const Index begin = offsets[static_cast<std::size_t>(g)], count = offsets[static_cast<std::size_t>(g) + 1] - begin;
    for (Index i = 0; i < n; ++i) {
      CAPTURE(g);
      CAPTURE(i);
      const Index* seg = ranked.data() + n * begin + i * count;
      for (Index j = 0; j < count; ++j) {
        REQUIRE(seg[j] % n == i);  // the segment holds expert i's entries ...
        REQUIRE(seg[j] / n >= begin);  // ... of group g's rows ...
        REQUIRE(seg[j] / n < begin + count);
        if (j > 0) CHECK(moe::ranks_before(prob.data(), seg[j - 1], seg[j]));  // ... best first
      }
      for (Index c = 0; c <= count; ++c) {  // every capacity takes the heap's rows
        std::vector<Index> heap(static_cast<std::size_t>(c));
        moe::detail::expert_choice_select(prob.data() + i, n, begin, count, c, heap.data());
        std::vector<Index> sorted_rows;
        for (Index j = 0; j < c; ++j) sorted_rows.push_back(seg[j] / n);
        std::sort(heap.begin(), heap.end());
        std::sort(sorted_rows.begin(), sorted_rows.end());
        CHECK(heap == sorted_rows);
      }
    }
  }
}

}  // namespace

TEST_CASE("The parallel selection ranks each (group, expert) column as the serial heap does: ties, NaN, signed zeros") {
  const Index rows = 23, n = 3;
  const std::vector<Index> offsets{0, 9, 9, 23};  // an empty group
  std::vector<double> pd(static_cast<std::size_t>(rows * n));
  std::vector<float> pf(pd.size());
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (std::size_t e = 0; e < pd.size(); ++e) {
    // Few distinct values (many ties), NaN, -0 beside +0, infinities and negative values.
    const double pool[] = {0.25, 0.5, 0.25, 0.0, -0.0, nan, 1.0, 0.125, 0.5, -inf, inf, -0.75, 0.5, 1e-30};
    pd[e] = pool[(e * 7 + e / 5) % 14];
    pf[e] = static_cast<float>(pd[e]);
  }
  check_ranking_against_the_heap(pd, rows, n, offsets);
  check_ranking_against_the_heap(pf, rows, n, offsets);
  // One group (no offsets given to the layer's flat gate is one group of every row).
  check_ranking_against_the_heap(pd, rows, n, {0, rows});
}
