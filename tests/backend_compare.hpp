#pragma once
// The comparison suite: a backend under test against the CPU reference, for every gate, expert
// and depth in the lists below (their cross product), forward and backward, on fresh random
// inputs and parameters (no zeros), with skewed routing and odd sizes. A gate or expert added to
// the library is covered by adding its name to Gates or Experts (and, if its default Config is
// not valid for a few experts, a line to gate_config / expert_config).
//
// Checks, per case: the same routing; ||test - cpu|| / ||cpu|| below a tolerance for the output,
// the gates, the balance statistics and losses, the input gradient and every parameter gradient;
// finite outputs (buffers are poisoned with NaN when built with MOE_POISON_BUFFERS); the same
// bits from two layers of the backend under test (determinism).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/moe.hpp"

namespace compare {

using moe::Index;

template <class... T>
struct List {};

using Gates = List<moe::gate::NoisyTopK, moe::gate::TopK, moe::gate::Softmax, moe::gate::Switch,
                   moe::gate::ExpertChoice, moe::gate::SigmoidBias>;
using Experts = List<moe::expert::FeedForward, moe::expert::SwiGLU>;
using Depths = std::integer_sequence<int, 1, 2, 3>;

template <class Gate, class Expert, int Depth>
struct Case {
  using GateType = Gate;
  using ExpertType = Expert;
  static constexpr int depth = Depth;
};

// The cross product Gates x Experts x Depths as a std::tuple of Case types (doctest's type list).
template <class Gate, class Expert, class D>
struct ForExpert;
template <class Gate, class Expert, int... D>
struct ForExpert<Gate, Expert, std::integer_sequence<int, D...>> {
  using type = std::tuple<Case<Gate, Expert, D>...>;
};
template <class Gate, class E, class D>
struct ForGate;
template <class Gate, class... E, class D>
struct ForGate<Gate, List<E...>, D> {
  using type = decltype(std::tuple_cat(std::declval<typename ForExpert<Gate, E, D>::type>()...));
};
template <class G, class E, class D>
struct Product;
template <class... G, class E, class D>
struct Product<List<G...>, E, D> {
  using type = decltype(std::tuple_cat(std::declval<typename ForGate<G, E, D>::type>()...));
};
using Cases = typename Product<Gates, Experts, Depths>::type;
template <int Depth>
using CasesAtDepth = typename Product<Gates, Experts, std::integer_sequence<int, Depth>>::type;

template <class T>
std::string type_name() {
  if constexpr (std::is_same_v<T, moe::gate::NoisyTopK>) return "NoisyTopK";
  if constexpr (std::is_same_v<T, moe::gate::TopK>) return "TopK";
  if constexpr (std::is_same_v<T, moe::gate::Softmax>) return "Softmax";
  if constexpr (std::is_same_v<T, moe::gate::Switch>) return "Switch";
  if constexpr (std::is_same_v<T, moe::gate::ExpertChoice>) return "ExpertChoice";
  if constexpr (std::is_same_v<T, moe::gate::SigmoidBias>) return "SigmoidBias";
  if constexpr (std::is_same_v<T, moe::expert::FeedForward>) return "FeedForward";
  if constexpr (std::is_same_v<T, moe::expert::SwiGLU>) return "SwiGLU";
  return "(unnamed)";
}

// A gate's Config for n experts, with its optional terms (z-loss) on.
template <class Gate>
typename Gate::Config gate_config(Index n) {
  typename Gate::Config c{};
  if constexpr (requires { c.k; }) c.k = std::min<Index>(2, n);
  if constexpr (requires { c.w_z; }) c.w_z = 1e-2;
  if constexpr (requires { c.w_importance; }) c.w_importance = 1e-2;
  if constexpr (std::is_same_v<Gate, moe::gate::SigmoidBias>) {
    c.expert_groups = n % 2 == 0 && n >= 4 ? 2 : 1;
    c.top_groups = 1;
    c.bias_rate = 1e-2;
  }
  return c;
}

template <class Expert>
typename Expert::Config expert_config(Index h) {
  typename Expert::Config c{};
  c.hidden = h;
  if constexpr (std::is_same_v<Expert, moe::expert::FeedForward>) c.bias = true;
  return c;
}

// A depth-D gate over n = product of branching experts: levels of 2 experts each, the first of
// n / 2^(D-1) (or every level of n^(1/D) when that is whole).
template <class Gate, int Depth>
typename moe::GateAtDepth<Gate, Depth>::Config depth_config(Index n) {
  if constexpr (Depth == 1) {
    return gate_config<Gate>(n);
  } else {
    typename moe::GateAtDepth<Gate, Depth>::Config c{};
    Index rest = n;
    for (int l = Depth - 1; l >= 1; --l) {
      c.levels[static_cast<std::size_t>(l)] = {.branching = 2, .gate = gate_config<Gate>(2)};
      rest /= 2;
    }
    c.levels[0] = {.branching = rest, .gate = gate_config<Gate>(rest)};
    c.w_importance = 1e-2;
    c.w_load = 1e-2;
    return c;
  }
}

struct Shape {
  Index tokens, d, n, h, shared;
  bool skew;  // every token's first choice is expert 0 (depth 1), many experts empty
  const char* what;
};

// Shapes for a depth: odd sizes (one token, a token count no tile divides, d = 1, one expert),
// shared experts, skewed routing.
inline std::vector<Shape> shapes(int depth) {
  const Index n = depth == 1 ? 8 : (depth == 2 ? 8 : 16);
  std::vector<Shape> s{{37, 8, n, 12, 0, false, "T = 37"},
                       {1, 8, n, 12, 0, false, "T = 1"},
                       {64, 1, n, 3, 1, false, "d = 1, one shared expert"},
                       {70, 16, n, 24, 0, true, "skewed routing"}};
  if (depth == 1) s.push_back({19, 5, 1, 4, 0, false, "n = 1"});
  return s;
}

// Uniform magnitude in [0.1, 1) with a random sign: never zero.
inline double nonzero_value(std::uint64_t seed, std::uint32_t stream, Index i) {
  const moe::CounterRandom r{seed};
  const double u = r.symmetric_uniform(static_cast<std::uint64_t>(i), stream, 7u);
  return (u < 0 ? -1.0 : 1.0) * (0.1 + 0.9 * std::abs(u));
}

template <class S>
std::vector<S> random_values(std::uint64_t seed, std::uint32_t stream, Index count, double scale) {
  std::vector<S> v(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = static_cast<S>(scale * nonzero_value(seed, stream, i));
  return v;
}

template <class B, class T>
std::vector<T> host(moe::ConstMatrixView<T> v) {
  typename B::Context ctx{};
  return moe::to_host<B>(ctx, v);
}

template <class B, class T>
void upload(const std::vector<T>& values, moe::MatrixView<T> dst) {
  typename B::Context ctx{};
  REQUIRE(static_cast<Index>(values.size()) == dst.rows * dst.cols);
  B::copy(ctx, moe::ConstMatrixView<T>{values.data(), dst.rows, dst.cols}, dst);
  B::synchronize(ctx);
}

// ||a - b|| / ||b|| (||a|| when b is zero).
template <class S>
double relative_error(const std::vector<S>& a, const std::vector<S>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, ref = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    diff += (x - y) * (x - y);
    ref += y * y;
  }
  return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

template <class S>
bool all_finite(const std::vector<S>& v) {
  return std::all_of(v.begin(), v.end(), [](S x) { return std::isfinite(static_cast<double>(x)); });
}

template <class S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0);
}

// Worst relative error seen, per case kind, for the report.
struct Worst {
  double forward = 0, backward = 0;
};

template <class S>
void check_close(const char* what, const std::vector<S>& test, const std::vector<S>& ref, double tol,
                 double& worst) {
  const double e = relative_error(test, ref);
  worst = std::max(worst, e);
  INFO(what, ": relative error ", e, ", tolerance ", tol);
  CHECK(all_finite(test));
  CHECK(e <= tol);
}

// One forward (train, noise from an Rng) and backward of the layer under test and the CPU
// reference with the same parameters and inputs; a second layer under test for determinism.
template <class Bt, class Case, class S = typename Bt::Scalar>
void run_case(const Shape& shape, double tol, Worst& worst) {
  using Gate = typename Case::GateType;
  using Expert = typename Case::ExpertType;
  constexpr int depth = Case::depth;
  using Ref = moe::Layer<Expert, Gate, moe::backend::Cpu<S>, depth>;
  using Test = moe::Layer<Expert, Gate, Bt, depth>;
  INFO(type_name<Gate>(), " / ", type_name<Expert>(), " / depth ", depth, ": ", shape.what, " (T = ", shape.tokens,
       ", d = ", shape.d, ", n = ", shape.n, ", h = ", shape.h, ")");

  typename Ref::Config rc{};
  rc.d_model = shape.d;
  rc.n_experts = shape.n;
  rc.expert = expert_config<Expert>(shape.h);
  rc.gate = depth_config<Gate, depth>(shape.n);
  rc.shared_experts = shape.shared;
  rc.seed = 11;
  typename Test::Config tc{};
  tc.d_model = rc.d_model;
  tc.n_experts = rc.n_experts;
  tc.expert = rc.expert;
  tc.gate = rc.gate;
  tc.shared_experts = rc.shared_experts;
  tc.seed = rc.seed;
  Ref ref(rc);
  Test test(tc);

  // Fresh random parameters, the same in both: no zeros.
  auto rp = ref.parameters();
  auto tp = test.parameters();
  REQUIRE(rp.size() == tp.size());
  for (std::size_t i = 0; i < rp.size(); ++i) {
    REQUIRE(rp[i].name == tp[i].name);
    const Index count = rp[i].value.rows * rp[i].value.cols;
    auto values = random_values<S>(1000 + i, static_cast<std::uint32_t>(i), count, 0.5);
    if (shape.skew && depth == 1 && rp[i].name == "gate.w_gate")  // expert 0 wins every token
      for (Index r = 0; r < rp[i].value.rows; ++r) values[static_cast<std::size_t>(r * rp[i].value.cols)] = S(3);
    upload<moe::backend::Cpu<S>>(values, rp[i].value);
    upload<Bt>(values, tp[i].value);
  }
  Test again(test);  // the same parameters, for the determinism check

  const Index t_count = shape.tokens, d = shape.d;
  auto xv = random_values<S>(7, 1, t_count * d, 1.0);
  if (shape.skew)
    for (auto& v : xv) v = std::abs(v);
  const auto dyv = random_values<S>(7, 2, t_count * d, 1.0);
  typename Bt::template Buffer<S> x_dev, dy_dev;
  x_dev.resize(t_count, d);
  dy_dev.resize(t_count, d);
  upload<Bt>(xv, x_dev.view());
  upload<Bt>(dyv, dy_dev.view());
  const moe::ConstMatrixView<S> x_host{xv.data(), t_count, d}, dy_host{dyv.data(), t_count, d};

  for (const moe::Mode mode : {moe::Mode::train, moe::Mode::inference}) {
    INFO("mode ", mode == moe::Mode::train ? "train" : "inference");
    moe::Rng rng_ref(5), rng_test(5), rng_again(5);
    ref.zero_grad();
    test.zero_grad();
    again.zero_grad();
    const auto fr = ref.forward(x_host, mode, rng_ref);
    const auto ft = test.forward(x_dev.view(), mode, rng_test);
    const auto fa = again.forward(x_dev.view(), mode, rng_again);

    // Routing: identical.
    CHECK(host<Bt>(ft.expert_index()) == host<moe::backend::Cpu<S>>(fr.expert_index()));
    check_close("y", host<Bt>(ft.y()), host<moe::backend::Cpu<S>>(fr.y()), tol, worst.forward);
    check_close("gates", host<Bt>(ft.gates()), host<moe::backend::Cpu<S>>(fr.gates()), tol, worst.forward);
    const auto& st = ft.stats();
    const auto& sr = fr.stats();
    CHECK(st.tokens_per_expert == sr.tokens_per_expert);
    CHECK(st.dropped_tokens == sr.dropped_tokens);
    CHECK(st.load_is_count == sr.load_is_count);
    check_close("importance", st.importance, sr.importance, tol, worst.forward);
    check_close("load", st.load, sr.load, tol, worst.forward);
    check_close("losses", std::vector<S>{st.loss_importance, st.loss_load, st.loss_aux, st.loss_z, st.loss},
                std::vector<S>{sr.loss_importance, sr.loss_load, sr.loss_aux, sr.loss_z, sr.loss}, tol, worst.forward);
    REQUIRE(st.levels.size() == sr.levels.size());
    for (std::size_t l = 0; l < st.levels.size(); ++l) {
      CHECK(st.levels[l].count == sr.levels[l].count);
      check_close("level importance", st.levels[l].importance, sr.levels[l].importance, tol, worst.forward);
      check_close("level load", st.levels[l].load, sr.levels[l].load, tol, worst.forward);
    }

    const auto br = ref.backward(fr, dy_host);
    const auto bt = test.backward(ft, dy_dev.view());
    const auto ba = again.backward(fa, dy_dev.view());
    check_close("dx", host<Bt>(bt.dx.view()), host<moe::backend::Cpu<S>>(br.dx.view()), tol,
                worst.backward);
    auto gr = ref.parameters();
    auto gt = test.parameters();
    auto ga = again.parameters();
    for (std::size_t i = 0; i < gr.size(); ++i) {
      INFO("gradient of ", gr[i].name);
      const auto g_test = host<Bt>(moe::ConstMatrixView<S>(gt[i].grad));
      check_close("parameter gradient", g_test, host<moe::backend::Cpu<S>>(moe::ConstMatrixView<S>(gr[i].grad)),
                  tol, worst.backward);
      CHECK(same_bits(g_test, host<Bt>(moe::ConstMatrixView<S>(ga[i].grad))));
    }
    // Determinism: a second layer of the backend under test gives the same bits.
    CHECK(same_bits(host<Bt>(ft.y()), host<Bt>(fa.y())));
    CHECK(same_bits(host<Bt>(bt.dx.view()), host<Bt>(ba.dx.view())));
  }
}

// Every shape of a case, with the backend under test Bt.
template <class Bt, class Case>
Worst run_all_shapes(double tol) {
  Worst worst;
  for (const Shape& shape : shapes(Case::depth)) run_case<Bt, Case>(shape, tol, worst);
  return worst;
}

}  // namespace compare
