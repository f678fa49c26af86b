// The routers and blocks of today's open models: gate::TopK's options (unnormalized gates, a
// scale, DeepSeek-V2's group-limited selection, GPT-OSS's router bias, the top-k balancing loss
// of Mixtral, Qwen-MoE and OLMoE), SigmoidBias without renormalization (DeepSeek-V3 with
// norm_topk_prob = false), and shared experts of their own width with Qwen2-MoE's sigmoid gate.
// Each against a reference written here from the parameters (per token, in double), in float and
// double, and against finite differences.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "moe/io/checkpoint.hpp"
#include "moe/io/config.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

// row-major [rows x cols] doubles of a view
template <class S>
std::vector<double> values(ConstMatrixView<S> v) {
  std::vector<double> out;
  for (Index r = 0; r < v.rows; ++r)
    for (Index c = 0; c < v.cols; ++c) out.push_back(static_cast<double>(v(r, c)));
  return out;
}

template <class L>
std::vector<double> parameter_values(L& layer, const std::string& name) {
  const auto params = layer.parameters();
  const auto* p = test::find_parameter<L>(params, name);
  REQUIRE_MESSAGE(p != nullptr, "no parameter ", name);
  return values(ConstMatrixView<typename L::Scalar>(p->value));
}

// logits [T x n] = x W (+ b), in double.
std::vector<double> linear(const std::vector<double>& x, Index t_count, Index d, const std::vector<double>& w, Index n,
                           const std::vector<double>* b) {
  std::vector<double> out(static_cast<std::size_t>(t_count * n), 0.0);
  for (Index t = 0; t < t_count; ++t)
    for (Index i = 0; i < n; ++i) {
      double acc = b != nullptr ? (*b)[static_cast<std::size_t>(i)] : 0.0;
      for (Index c = 0; c < d; ++c) acc += x[static_cast<std::size_t>(t * d + c)] * w[static_cast<std::size_t>(c * n + i)];
      out[static_cast<std::size_t>(t * n + i)] = acc;
    }
  return out;
}

// Indices of v sorted by value, largest first, ties to the lower index.
std::vector<Index> ranked(const std::vector<double>& v, const std::vector<Index>& candidates) {
  std::vector<Index> order = candidates;
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return v[static_cast<std::size_t>(a)] > v[static_cast<std::size_t>(b)]; });
  return order;
}

struct Routed {
  std::vector<Index> expert;  // [T x k]
  std::vector<double> gate;   // [T x k]
  std::vector<double> p;      // [T x n] the scores: softmax (TopK) or sigmoid (SigmoidBias)
};

// The softmax top-k router as its models' code writes it: p = softmax(l) over all n; with groups,
// the top_groups groups by their largest p, then the k largest p among their experts; gate =
// scale * p / (sum of the chosen p) or scale * p.
Routed reference_top_k(const std::vector<double>& logits, Index t_count, Index n, const gate::TopK::Config& c) {
  Routed out;
  const Index size = n / c.expert_groups;
  for (Index t = 0; t < t_count; ++t) {
    std::vector<double> l(logits.begin() + t * n, logits.begin() + (t + 1) * n);
    const double top = *std::max_element(l.begin(), l.end());
    std::vector<double> p(static_cast<std::size_t>(n));
    double sum = 0;
    for (Index i = 0; i < n; ++i) sum += (p[static_cast<std::size_t>(i)] = std::exp(l[static_cast<std::size_t>(i)] - top));
    for (auto& v : p) v /= sum;
    std::vector<double> group_score(static_cast<std::size_t>(c.expert_groups), -1.0);
    for (Index i = 0; i < n; ++i)
      group_score[static_cast<std::size_t>(i / size)] = std::max(group_score[static_cast<std::size_t>(i / size)], p[static_cast<std::size_t>(i)]);
    std::vector<Index> all_groups(static_cast<std::size_t>(c.expert_groups));
    std::iota(all_groups.begin(), all_groups.end(), Index{0});
    const std::vector<Index> groups = ranked(group_score, all_groups);
    std::vector<Index> candidates;
    for (Index i = 0; i < n; ++i)
      if (std::find(groups.begin(), groups.begin() + c.top_groups, i / size) != groups.begin() + c.top_groups)
        candidates.push_back(i);
    const std::vector<Index> chosen = ranked(p, candidates);
    double kept = 0;
    for (Index j = 0; j < c.k; ++j) kept += p[static_cast<std::size_t>(chosen[static_cast<std::size_t>(j)])];
    for (Index j = 0; j < c.k; ++j) {
      const double pj = p[static_cast<std::size_t>(chosen[static_cast<std::size_t>(j)])];
      out.expert.push_back(chosen[static_cast<std::size_t>(j)]);
      out.gate.push_back(c.scale * (c.normalize ? pj / kept : pj));
    }
    out.p.insert(out.p.end(), p.begin(), p.end());
  }
  return out;
}

template <class S>
using TopKLayer = Layer<expert::FeedForward, gate::TopK, backend::Cpu<S>>;

struct Family {
  const char* name;
  gate::TopK::Config gate;
};

// The routers of the families, on 16 experts.
std::vector<Family> families() {
  return {{"Mixtral (normalized)", {.k = 2}},
          {"OLMoE / Qwen-MoE (norm_topk_prob = false)", {.k = 4, .normalize = false}},
          {"DeepSeek-V2 (group-limited, scaled, unnormalized)",
           {.k = 3, .normalize = false, .scale = 16.0, .expert_groups = 4, .top_groups = 2}},
          {"group-limited, normalized", {.k = 2, .expert_groups = 8, .top_groups = 3}},
          {"GPT-OSS (router bias)", {.k = 4, .router_bias = true}}};
}

// Backward against central differences (double) at the first of 40 seeds whose routing holds
// still under the probes; make(seed) builds the layer. False when no seed did.
template <class Make>
bool gradients_match(Make&& make, Index t_count, Index d, bool every_parameter_learns) {
  for (std::uint64_t seed = 1; seed < 40; ++seed) {
    auto layer = make(seed);
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(t_count, d, seed * 31 + 1);
    const auto dy = test::random_matrix<double>(t_count, d, seed * 31 + 2);
    const auto check = test::check_layer_gradients(layer, x.view(), dy.view());
    if (!check.routing_stable) continue;
    for (const auto& failure : check.failures) MESSAGE(failure);
    CHECK(check.passed());
    if (every_parameter_learns) CHECK(check.zero_grads.empty());
    return true;
  }
  return false;
}

template <class S>
void check_against_reference(const Family& family) {
  CAPTURE(family.name);
  const Index t_count = 37, d = 6, n = 16;
  TopKLayer<S> layer({.d_model = d, .n_experts = n, .expert = {.hidden = 5, .bias = true}, .gate = family.gate, .seed = 3});
  test::randomize_parameters(layer, 11, 0.9);
  const auto x = test::random_matrix<S>(t_count, d, 5);
  const auto f = layer.forward(x.view(), Mode::inference);
  const std::vector<double> w = parameter_values(layer, "gate.w_gate");
  std::vector<double> b;
  if (family.gate.router_bias) b = parameter_values(layer, "gate.b_gate");
  const auto logits = linear(values(ConstMatrixView<S>(x.view())), t_count, d, w, n, family.gate.router_bias ? &b : nullptr);
  const Routed ref = reference_top_k(logits, t_count, n, family.gate);
  const auto experts = f.expert_index();
  const auto gates = f.gates();
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-14;
  double worst = 0;
  for (Index t = 0; t < t_count; ++t)
    for (Index j = 0; j < family.gate.k; ++j) {
      const auto s = static_cast<std::size_t>(t * family.gate.k + j);
      CHECK(experts(t, j) == ref.expert[s]);
      worst = std::max(worst, std::abs(static_cast<double>(gates(t, j)) - ref.gate[s]) / std::max(1.0, family.gate.scale));
    }
  CHECK(worst < tol);
  // The scores: the logits and the softmax over all n.
  Matrix<S> l(t_count, n), p(t_count, n);
  typename backend::Cpu<S>::Context ctx;
  layer.gate().scores(ctx, x.view(), nullptr, l.view(), p.view());
  for (Index t = 0; t < t_count; ++t)
    for (Index i = 0; i < n; ++i) {
      CHECK(std::abs(static_cast<double>(l.view()(t, i)) - logits[static_cast<std::size_t>(t * n + i)]) < tol * 10);
      CHECK(std::abs(static_cast<double>(p.view()(t, i)) - ref.p[static_cast<std::size_t>(t * n + i)]) < tol);
    }
}

}  // namespace

TEST_CASE("TopK's options route and weight as the models' routers do (float and double)") {
  for (const auto& family : families()) {
    check_against_reference<double>(family);
    check_against_reference<float>(family);
  }
}

TEST_CASE("TopK's balancing loss is n sum_i f_i P_i with f over the k slots") {
  const Index t_count = 29, d = 5, n = 8, k = 2;
  const double w_aux = 0.02;
  TopKLayer<double> layer({.d_model = d, .n_experts = n, .expert = {.hidden = 3},
                           .gate = {.k = k, .w_aux = w_aux, .w_importance = 0, .w_load = 0}, .seed = 2});
  test::randomize_parameters(layer, 4);
  const auto x = test::random_matrix<double>(t_count, d, 9);
  const auto f = layer.forward(x.view(), Mode::train);
  const auto logits = linear(values(ConstMatrixView<double>(x.view())), t_count, d, parameter_values(layer, "gate.w_gate"), n, nullptr);
  const Routed ref = reference_top_k(logits, t_count, n, {.k = k});
  std::vector<double> f_i(static_cast<std::size_t>(n), 0.0), p_i(static_cast<std::size_t>(n), 0.0);
  for (const Index e : ref.expert) f_i[static_cast<std::size_t>(e)] += 1.0 / static_cast<double>(t_count);
  for (Index t = 0; t < t_count; ++t)
    for (Index i = 0; i < n; ++i) p_i[static_cast<std::size_t>(i)] += ref.p[static_cast<std::size_t>(t * n + i)] / static_cast<double>(t_count);
  double expected = 0;
  for (Index i = 0; i < n; ++i) expected += f_i[static_cast<std::size_t>(i)] * p_i[static_cast<std::size_t>(i)];
  expected *= w_aux * static_cast<double>(n);
  CHECK(f.stats().loss_aux == doctest::Approx(expected).epsilon(1e-13));
  CHECK(f.loss() == doctest::Approx(expected).epsilon(1e-13));
  // Perfectly balanced routing gives w_aux * k (the f_i sum to k, P_i = 1/n): a sanity bound.
  CHECK(f.stats().loss_aux >= 0.0);
}

TEST_CASE("TopK's options: backward equals finite differences, depth 1 and 2") {
  using L1 = Layer<expert::FeedForward, gate::TopK, backend::Cpu<double>>;
  using L2 = Layer<expert::FeedForward, gate::TopK, backend::Cpu<double>, 2>;
  std::vector<gate::TopK::Config> configs = {
      {.k = 3, .normalize = false, .w_aux = 0.3, .w_importance = 0.1, .w_z = 0.05},
      {.k = 2, .normalize = true, .scale = 2.5, .router_bias = true, .w_aux = 0.2, .w_z = 0.1},
      {.k = 2, .normalize = false, .scale = 3.0, .expert_groups = 4, .top_groups = 2, .router_bias = true, .w_aux = 0.1},
      {.k = 1, .normalize = false, .w_aux = 0.5}};
  for (std::size_t ci = 0; ci < configs.size(); ++ci) {
    CAPTURE(ci);
    CHECK(gradients_match(
        [&](std::uint64_t seed) {
          return L1({.d_model = 4, .n_experts = 8, .expert = {.hidden = 5, .bias = true}, .gate = configs[ci], .seed = seed});
        },
        9, 4, true));
  }
  // A hierarchy of TopK levels with the bias and the balancing loss: stacked biases per group.
  CHECK(gradients_match(
      [](std::uint64_t seed) {
        L2::Config c{.d_model = 4, .n_experts = 8, .expert = {.hidden = 3, .bias = true}, .seed = seed};
        c.gate.levels[0] = {.branching = 2, .gate = {.k = 1, .normalize = false, .router_bias = true, .w_aux = 0.2}};
        c.gate.levels[1] = {.branching = 4, .gate = {.k = 2, .router_bias = true, .w_aux = 0.3}};
        return L2(c);
      },
      11, 4, false));
}

TEST_CASE("TopK's configuration checks name the bad value") {
  using P = gate::TopK::Policy<backend::Cpu<double>>;
  CHECK(test::contains(test::error_of([] { P({.k = 2, .expert_groups = 3}, 4, 8, 0); }),
                       "gate::TopK: expert_groups = 3, expected a divisor of n_experts = 8"));
  CHECK(test::contains(test::error_of([] { P({.k = 2, .expert_groups = 4, .top_groups = 5}, 4, 8, 0); }),
                       "top_groups = 5, expected 1 <= top_groups <= expert_groups = 4"));
  CHECK(test::contains(test::error_of([] { P({.k = 5, .expert_groups = 4, .top_groups = 2}, 4, 8, 0); }),
                       "k = 5, expected 1 <= k <= top_groups * (n_experts / expert_groups) = 4"));
  CHECK(test::contains(test::error_of([] { P({.k = 2, .scale = 0}, 4, 8, 0); }), "scale = 0, expected a finite value > 0"));
  CHECK(test::contains(test::error_of([] { P({.k = 2, .w_aux = -1}, 4, 8, 0); }), "w_aux = -1, expected a finite value >= 0"));
  // The router bias is a parameter named gate.b_gate, [n], zero at the start.
  P with_bias({.k = 2, .router_bias = true}, 4, 8, 1);
  const auto params = with_bias.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[1].name == "gate.b_gate");
  CHECK(params[1].shape == std::vector<Index>{8});
  for (Index i = 0; i < 8; ++i) CHECK(params[1].value(0, i) == 0.0);
}

namespace {

const gate::SigmoidBias::Config sigmoid_config{
    .k = 3, .expert_groups = 4, .top_groups = 2, .bias_rate = 0.0, .normalize = false, .scale = 2.5};

// DeepSeek-V3's router with norm_topk_prob = false, written out: s = sigmoid(l), choice = s + b,
// groups scored by the sum of their best two choices, the k best choices of the top_groups best
// groups, gate = scale * s.
template <class S>
void check_sigmoid_against_reference() {
  using L = Layer<expert::FeedForward, gate::SigmoidBias, backend::Cpu<S>>;
  const Index t_count = 21, d = 5, n = 8, size = n / sigmoid_config.expert_groups;
  L layer({.d_model = d, .n_experts = n, .expert = {.hidden = 4, .bias = true}, .gate = sigmoid_config, .seed = 1});
  test::randomize_parameters(layer, 3);
  Matrix<S> bias = test::random_matrix<S>(1, n, 77, -0.3, 0.3);
  layer.gate().set_bias(bias.view());
  const auto x = test::random_matrix<S>(t_count, d, 8);
  const auto f = layer.forward(x.view(), Mode::inference);
  const auto logits = linear(values(ConstMatrixView<S>(x.view())), t_count, d, parameter_values(layer, "gate.w_gate"), n, nullptr);
  const double tol = std::is_same_v<S, float> ? 2e-6 : 1e-14;
  for (Index t = 0; t < t_count; ++t) {
    std::vector<double> sig(static_cast<std::size_t>(n)), choice(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      sig[static_cast<std::size_t>(i)] = 1.0 / (1.0 + std::exp(-logits[static_cast<std::size_t>(t * n + i)]));
      choice[static_cast<std::size_t>(i)] = sig[static_cast<std::size_t>(i)] + static_cast<double>(bias.view()(0, i));
    }
    std::vector<double> group_score;
    std::vector<Index> groups;
    for (Index g = 0; g < sigmoid_config.expert_groups; ++g) {
      std::vector<Index> members(static_cast<std::size_t>(size));
      std::iota(members.begin(), members.end(), g * size);
      const auto best = ranked(choice, members);
      group_score.push_back(choice[static_cast<std::size_t>(best[0])] + choice[static_cast<std::size_t>(best[1])]);
      groups.push_back(g);
    }
    const auto kept = ranked(group_score, groups);
    std::vector<Index> candidates;
    for (Index i = 0; i < n; ++i)
      if (std::find(kept.begin(), kept.begin() + sigmoid_config.top_groups, i / size) != kept.begin() + sigmoid_config.top_groups)
        candidates.push_back(i);
    const auto chosen = ranked(choice, candidates);
    for (Index j = 0; j < sigmoid_config.k; ++j) {
      const Index e = chosen[static_cast<std::size_t>(j)];
      CHECK(f.expert_index()(t, j) == e);
      CHECK(std::abs(static_cast<double>(f.gates()(t, j)) - sigmoid_config.scale * sig[static_cast<std::size_t>(e)]) < tol);
    }
  }
}

}  // namespace

TEST_CASE("SigmoidBias without renormalization: gates scale * s_j (float and double), and its gradients") {
  using L = Layer<expert::FeedForward, gate::SigmoidBias, backend::Cpu<double>>;
  const Index n = 8;
  const auto gc = sigmoid_config;
  check_sigmoid_against_reference<double>();
  check_sigmoid_against_reference<float>();
  Matrix<double> bias = test::random_matrix<double>(1, n, 77, -0.3, 0.3);
  for (const Index k : {1, 3}) {
    CAPTURE(k);
    auto c = gc;
    c.k = k;
    // Unnormalized, the router learns at k = 1 too: every parameter has a gradient.
    CHECK(gradients_match(
        [&](std::uint64_t seed) {
          L g({.d_model = 4, .n_experts = n, .expert = {.hidden = 5, .bias = true}, .gate = c, .seed = seed});
          g.gate().set_bias(bias.view());
          return g;
        },
        9, 4, true));
  }
}

namespace {

// E(x) = relu(x W1 + b1) W2 + b2 of expert e from stacked parameters [s, d, h], [s, h], [s, h, d], [s, d].
std::vector<double> feed_forward(const std::vector<double>& x, Index d, Index h, Index e, const std::vector<double>& w1,
                                 const std::vector<double>& b1, const std::vector<double>& w2,
                                 const std::vector<double>& b2) {
  std::vector<double> hid(static_cast<std::size_t>(h)), y(static_cast<std::size_t>(d));
  for (Index j = 0; j < h; ++j) {
    double acc = b1[static_cast<std::size_t>(e * h + j)];
    for (Index c = 0; c < d; ++c) acc += x[static_cast<std::size_t>(c)] * w1[static_cast<std::size_t>((e * d + c) * h + j)];
    hid[static_cast<std::size_t>(j)] = std::max(acc, 0.0);
  }
  for (Index c = 0; c < d; ++c) {
    double acc = b2[static_cast<std::size_t>(e * d + c)];
    for (Index j = 0; j < h; ++j) acc += hid[static_cast<std::size_t>(j)] * w2[static_cast<std::size_t>((e * h + j) * d + c)];
    y[static_cast<std::size_t>(c)] = acc;
  }
  return y;
}

}  // namespace

namespace {

template <class S>
using SharedLayer = Layer<expert::FeedForward, gate::TopK, backend::Cpu<S>>;

constexpr Index shared_d = 6, shared_h = 3, shared_hs = 7, shared_count = 2;

template <class S>
typename SharedLayer<S>::Config shared_config() {
  return {.d_model = shared_d, .n_experts = 4, .expert = {.hidden = shared_h, .bias = true}, .gate = {.k = 2, .normalize = false},
          .shared_experts = shared_count, .shared_expert = expert::FeedForward::Config{.hidden = shared_hs, .bias = true},
          .shared_gate = true, .seed = 5};
}

// y = sum of the routed slots + sigmoid(x w) * the sum of the shared experts, written out.
template <class S>
void check_shared_against_reference() {
  using L = SharedLayer<S>;
  const Index t_count = 13, d = shared_d, h = shared_h, hs = shared_hs, s_count = shared_count;
  L layer(shared_config<S>());
  test::randomize_parameters(layer, 6);
  {
    const auto params = layer.parameters();
    const auto* w1 = test::find_parameter<L>(params, "shared_experts.w1");
    REQUIRE(w1 != nullptr);
    CHECK(w1->shape == std::vector<Index>{s_count, d, hs});
    const auto* sg = test::find_parameter<L>(params, "shared_gate.w_gate");
    REQUIRE(sg != nullptr);
    CHECK(sg->shape == std::vector<Index>{d, 1});
  }
  const auto x = test::random_matrix<S>(t_count, d, 2);
  const auto f = layer.forward(x.view(), Mode::inference);
  const auto xv = values(ConstMatrixView<S>(x.view()));
  const auto rw1 = parameter_values(layer, "experts.w1"), rb1 = parameter_values(layer, "experts.b1"),
             rw2 = parameter_values(layer, "experts.w2"), rb2 = parameter_values(layer, "experts.b2");
  const auto sw1 = parameter_values(layer, "shared_experts.w1"), sb1 = parameter_values(layer, "shared_experts.b1"),
             sw2 = parameter_values(layer, "shared_experts.w2"), sb2 = parameter_values(layer, "shared_experts.b2");
  const auto wg = parameter_values(layer, "shared_gate.w_gate");
  double worst = 0;
  for (Index t = 0; t < t_count; ++t) {
    const std::vector<double> xt(xv.begin() + t * d, xv.begin() + (t + 1) * d);
    std::vector<double> y(static_cast<std::size_t>(d), 0.0), shared(static_cast<std::size_t>(d), 0.0);
    for (Index j = 0; j < 2; ++j) {
      const auto e = f.expert_index()(t, j);
      const auto out = feed_forward(xt, d, h, e, rw1, rb1, rw2, rb2);
      for (Index col = 0; col < d; ++col) y[static_cast<std::size_t>(col)] += static_cast<double>(f.gates()(t, j)) * out[static_cast<std::size_t>(col)];
    }
    for (Index e = 0; e < s_count; ++e) {
      const auto out = feed_forward(xt, d, hs, e, sw1, sb1, sw2, sb2);
      for (Index col = 0; col < d; ++col) shared[static_cast<std::size_t>(col)] += out[static_cast<std::size_t>(col)];
    }
    double logit = 0;
    for (Index col = 0; col < d; ++col) logit += xt[static_cast<std::size_t>(col)] * wg[static_cast<std::size_t>(col)];
    const double g = 1.0 / (1.0 + std::exp(-logit));
    for (Index col = 0; col < d; ++col)
      worst = std::max(worst, std::abs(static_cast<double>(f.y()(t, col)) - (y[static_cast<std::size_t>(col)] + g * shared[static_cast<std::size_t>(col)])));
  }
  CHECK(worst < (std::is_same_v<S, float> ? 1e-5 : 1e-13));
}

}  // namespace

TEST_CASE("Shared experts of their own width, with Qwen2-MoE's sigmoid gate (float and double)") {
  using L = SharedLayer<double>;
  check_shared_against_reference<double>();
  check_shared_against_reference<float>();
  const auto c = shared_config<double>();

  CHECK(gradients_match(
      [&](std::uint64_t seed) {
        auto cs = c;
        cs.seed = seed;
        cs.d_model = 4;
        return L(cs);
      },
      9, 4, true));

  CHECK(test::contains(test::error_of([] { L({.d_model = 4, .n_experts = 4, .expert = {.hidden = 2}, .shared_gate = true}); }),
                       "shared_gate = true with shared_experts = 0"));
  CHECK(test::contains(test::error_of([] {
                         L({.d_model = 4, .n_experts = 4, .expert = {.hidden = 2},
                            .shared_expert = expert::FeedForward::Config{.hidden = 3}});
                       }),
                       "shared_expert (the shared experts' Config) is set with shared_experts = 0"));
}

TEST_CASE("The new fields read back from metadata; a partial configuration takes the defaults") {
  using L = Layer<expert::FeedForward, gate::TopK, backend::Cpu<double>>;
  L::Config c{.d_model = 6, .n_experts = 8, .expert = {.hidden = 3},
              .gate = {.k = 3, .normalize = false, .scale = 2.0, .expert_groups = 4, .top_groups = 2, .router_bias = true, .w_aux = 0.01},
              .shared_experts = 1, .shared_expert = expert::FeedForward::Config{.hidden = 9}, .shared_gate = true};
  const auto m = io::describe<L>(c);
  CHECK(m.at("config.gate.normalize") == "false");
  CHECK(m.at("config.shared_expert.hidden") == "9");
  const auto back = io::layer_config<L>(m);
  CHECK(io::describe<L>(back) == m);
  // Only what differs from the defaults.
  io::Metadata partial{{"format", "moe.layer/1"}, {"moe.expert", "FeedForward"}, {"moe.gate", "TopK"},
                       {"moe.depth", "1"}, {"moe.scalar", "double"}, {"config.d_model", "6"},
                       {"config.n_experts", "8"}, {"config.expert.hidden", "3"}, {"config.gate.k", "3"}};
  const auto p = io::layer_config<L>(partial);
  CHECK(p.gate.k == 3);
  CHECK(p.gate.normalize);
  CHECK(p.gate.w_importance == gate::TopK::Config{}.w_importance);
  CHECK(!p.shared_expert.has_value());
  partial["config.gate.kk"] = "2";
  const auto message = test::error_of([&] { (void)io::layer_config<L>(partial); });
  CHECK(test::contains(message, "configuration key 'config.gate.kk' is not a field"));
  CHECK(test::contains(message, "config.gate.k,"));
  partial.erase("config.gate.kk");
  partial.erase("config.d_model");
  CHECK(test::contains(test::error_of([&] { (void)io::layer_config<L>(partial); }), "'config.d_model'"));
}

TEST_CASE("A checkpoint holds the router bias, the shared experts of their own width and their gate") {
  using L = Layer<expert::SwiGLU, gate::TopK, backend::Cpu<double>>;
  L::Config c{.d_model = 6, .n_experts = 8, .expert = {.hidden = 3},
              .gate = {.k = 2, .normalize = false, .scale = 2.0, .expert_groups = 4, .top_groups = 2, .router_bias = true},
              .shared_experts = 1, .shared_expert = expert::SwiGLU::Config{.hidden = 5}, .shared_gate = true, .seed = 3};
  L layer(c);
  test::randomize_parameters(layer, 8);
  const auto file = io::SafeTensors::parse(io::checkpoint(layer).bytes());
  CHECK(file.info("gate.b_gate").shape == std::vector<std::int64_t>{8});
  CHECK(file.info("shared_experts.0.w1").shape == std::vector<std::int64_t>{6, 5});
  CHECK(file.info("shared_gate.w_gate").shape == std::vector<std::int64_t>{6, 1});
  L copy(io::layer_config<L>(file.metadata()));
  io::load(copy, file);
  const auto x = test::random_matrix<double>(10, 6, 4);
  const auto a = layer.forward(x.view(), Mode::inference);
  const auto b = copy.forward(x.view(), Mode::inference);
  CHECK(test::same_bits(a.y(), b.y()));
}
