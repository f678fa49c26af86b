#pragma once
// The comparison suite: a backend under test against the CPU reference, for every gate, expert
// and depth in the lists below (their cross product), forward and backward, on fresh random
// inputs and parameters (no zeros), with skewed routing and odd sizes. A gate or expert added to
// the library is covered by adding its name to Gates or Experts (and, if its default Config is
// not valid for a few experts, a line to gate_config / expert_config).
//
// Checks, per case: the same routing; ||test - cpu|| / ||cpu|| below a tolerance for the output,
// the gates, the balance statistics, each loss term on its own, the input gradient and every
// parameter gradient (with bf16 or tf32 experts, y, dx and the gradients within bf16_tolerance(tol),
// the rounding of an intermediate to a neighbouring bfloat16); finite outputs (buffers and every primitive's scratch memory are poisoned
// when built with MOE_POISON_BUFFERS); the same bits from two layers of the backend under test
// (determinism); and the output against a naive mixture written here, sum over a token's routed
// slots of gate * E_i(x) plus the shared experts' E_s(x), from the parameters and the routing the
// layer reports.
//
// What it does not check: both sides run the same gate, layer and expert templates, so a bug in
// that shared code is the same on both sides and only the naive mixture sees it (dispatch,
// combine, the experts' forward). Whether a gate routes and weights as its formula says, and
// whether backward differentiates forward, is checked on the CPU reference by each gate's
// reference tests and the finite-difference tests (tests/gates.cpp, tests/gradients.cpp, ...).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
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

// Variants with options of their own, each a name of its own (gate_config / expert_config set
// the options), compared at depth 1 beside the cross product: the routers of today's open models,
// GPT-OSS's expert, and the feed-forward expert over another activation than ReLU (GELU: erf on
// the device).
struct GptOssSwiGLU : moe::expert::SwiGLU {  // bias, alpha, clamp, up offset
  static constexpr const char* io_name = "SwiGLU";  // the same family in a checkpoint's metadata
};
struct TopKGrouped : moe::gate::TopK {  // DeepSeek-V2: unnormalized, scaled, group-limited; the top-k Switch loss
  static constexpr const char* io_name = "TopK";
};
struct TopKBiased : moe::gate::TopK {  // GPT-OSS: a router bias; the top-k Switch loss
  static constexpr const char* io_name = "TopK";
};
struct SigmoidScaled : moe::gate::SigmoidBias {  // DeepSeek-V3 with norm_topk_prob = false
  static constexpr const char* io_name = "SigmoidBias";
};

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
using GeluFeedForward = moe::expert::FeedForwardWith<moe::activation::Gelu>;
using VariantCases = std::tuple<Case<TopKGrouped, moe::expert::FeedForward, 1>, Case<TopKBiased, GptOssSwiGLU, 1>,
                                Case<SigmoidScaled, moe::expert::SwiGLU, 1>, Case<moe::gate::TopK, GeluFeedForward, 1>>;
// Every case of the cross product (the checkpoint tests; the variants' options round-trip in
// their own tests: tests/expert_swiglu.cpp, tests/gate_open_models.cpp).
using Cases = typename Product<Gates, Experts, Depths>::type;
template <int Depth>
using CasesAtDepth =
    std::conditional_t<Depth == 1,
                       decltype(std::tuple_cat(std::declval<typename Product<Gates, Experts, std::integer_sequence<int, 1>>::type>(),
                                               std::declval<VariantCases>())),
                       typename Product<Gates, Experts, std::integer_sequence<int, Depth>>::type>;

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
  if constexpr (std::is_same_v<T, GptOssSwiGLU>) return "SwiGLU (GPT-OSS)";
  if constexpr (std::is_same_v<T, GeluFeedForward>) return "FeedForward<gelu>";
  if constexpr (std::is_same_v<T, TopKGrouped>) return "TopK (grouped, scaled, unnormalized)";
  if constexpr (std::is_same_v<T, TopKBiased>) return "TopK (router bias)";
  if constexpr (std::is_same_v<T, SigmoidScaled>) return "SigmoidBias (unnormalized)";
  return "(unnamed)";
}

// A gate's Config for n experts, with its optional terms (z-loss) on.
template <class Gate>
typename Gate::Config gate_config(Index n) {
  typename Gate::Config c{};
  if constexpr (requires { c.k; }) c.k = std::min<Index>(2, n);
  if constexpr (requires { c.w_z; }) c.w_z = 1e-2;
  if constexpr (requires { c.w_importance; }) c.w_importance = 1e-2;
  if constexpr (std::is_base_of_v<moe::gate::SigmoidBias, Gate>) {
    c.expert_groups = n % 2 == 0 && n >= 4 ? 2 : 1;
    c.top_groups = 1;
    c.bias_rate = 1e-2;
  }
  if constexpr (std::is_same_v<Gate, SigmoidScaled>) {
    c.normalize = false;
    c.scale = 2.5;
  }
  if constexpr (std::is_same_v<Gate, TopKGrouped>) {
    c.normalize = false;
    c.scale = 2.5;
    c.expert_groups = n % 4 == 0 ? 4 : 1;
    c.top_groups = c.expert_groups > 1 ? 2 : 1;
    c.w_aux = 5e-2;
  }
  if constexpr (std::is_same_v<Gate, TopKBiased>) {
    c.router_bias = true;
    c.w_aux = 5e-2;
  }
  return c;
}

template <class Expert>
typename Expert::Config expert_config(Index h) {
  typename Expert::Config c{};
  c.hidden = h;
  if constexpr (std::is_same_v<Expert, moe::expert::FeedForward> || std::is_same_v<Expert, GeluFeedForward>)
    c.bias = true;
  if constexpr (std::is_same_v<Expert, GptOssSwiGLU>) {
    // GPT-OSS's expert, but the limit 1 rather than 7, so that the suite's pre-activations (of
    // order 1) reach the clamps on both sides.
    c.bias = true;
    c.alpha = 1.702;
    c.limit = 1.0;
    c.up_offset = 1.0;
  }
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
  // Every token's first choice at the first level is its node 0, and the nodes 2 and up get no
  // token: the leaf experts 2^depth and up are empty (depth 1: the experts themselves; depths 2
  // and 3: the first level has 4 nodes of 2^(depth-1) leaves each).
  bool skew;
  const char* what;
};

// The first leaf expert the skewed routing leaves empty (see Shape::skew).
constexpr Index first_skew_empty(int depth) { return Index{1} << depth; }

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

// Worst relative error seen, for the report: against the CPU reference in the same precision
// (forward, backward), and, for bf16 experts, against the CPU reference in fp32 (output,
// gradients).
struct Worst {
  double forward = 0, backward = 0, bf16_vs_fp32 = 0, bf16_grad_vs_fp32 = 0;
};

// Everything one forward and backward produce, on the host.
template <class S>
struct Result {
  std::vector<Index> routing;
  std::vector<S> y, gates, importance, load, losses, dx;
  std::vector<Index> tokens_per_expert;
  Index dropped = 0;
  bool load_is_count = false;
  std::vector<std::vector<S>> level_importance, level_load;
  std::vector<std::vector<Index>> level_count;
  std::vector<std::string> names;
  std::vector<std::vector<S>> grads;
};

// zero_grad, forward (noise from an Rng seeded 5), backward with dy, all copied to the host.
template <class B, class Layer, class S = typename B::Scalar>
Result<S> run(Layer& layer, moe::ConstMatrixView<S> x, moe::ConstMatrixView<S> dy, moe::Mode mode) {
  moe::Rng rng(5);
  layer.zero_grad();
  const auto f = layer.forward(x, mode, rng);
  const auto b = layer.backward(f, dy);
  Result<S> r;
  r.routing = host<B>(f.expert_index());
  r.y = host<B>(f.y());
  r.gates = host<B>(f.gates());
  const auto& st = f.stats();
  r.importance = st.importance;
  r.load = st.load;
  r.losses = {st.loss_importance, st.loss_load, st.loss_aux, st.loss_z, st.loss};
  r.tokens_per_expert = st.tokens_per_expert;
  r.dropped = st.dropped_tokens;
  r.load_is_count = st.load_is_count;
  for (const auto& level : st.levels) {
    r.level_importance.push_back(level.importance);
    r.level_load.push_back(level.load);
    r.level_count.push_back(level.count);
  }
  r.dx = host<B>(b.dx.view());
  for (auto& p : layer.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(host<B>(moe::ConstMatrixView<S>(p.grad)));
  }
  return r;
}

template <class S>
void check_close(const char* what, const std::vector<S>& test, const std::vector<S>& ref, double tol,
                 double& worst) {
  const double e = relative_error(test, ref);
  worst = std::max(worst, e);
  INFO(std::string(what), ": relative error ", e, ", tolerance ", tol);
  CHECK(all_finite(test));
  CHECK(e <= tol);
}

// test against ref: the same routing and counts, every value within tol.
// tol bounds what the gating computes (always fp32: gates, statistics, losses); expert_tol what
// the experts' GEMMs feed (y, dx, every parameter gradient).
template <class S>
void compare(const Result<S>& test, const Result<S>& ref, double tol, double expert_tol, double& worst_forward,
             double& worst_backward) {
  CHECK(test.routing == ref.routing);
  CHECK(test.tokens_per_expert == ref.tokens_per_expert);
  CHECK(test.dropped == ref.dropped);
  CHECK(test.load_is_count == ref.load_is_count);
  check_close("y", test.y, ref.y, expert_tol, worst_forward);
  check_close("gates", test.gates, ref.gates, tol, worst_forward);
  check_close("importance", test.importance, ref.importance, tol, worst_forward);
  check_close("load", test.load, ref.load, tol, worst_forward);
  // Each term on its own, so that a wrong small term (the z-loss) cannot hide behind the total:
  // |test - ref| relative to the term itself, or to 1e-2 for a smaller term (a balancing loss of a
  // nearly balanced batch is a difference of nearly equal numbers, exact only to their rounding).
  static const char* const loss_names[] = {"loss_importance", "loss_load", "loss_aux", "loss_z", "loss"};
  REQUIRE(test.losses.size() == 5);
  REQUIRE(ref.losses.size() == 5);
  for (std::size_t i = 0; i < 5; ++i) {
    const double t = static_cast<double>(test.losses[i]), r = static_cast<double>(ref.losses[i]);
    const double e = std::abs(t - r) / std::max(std::abs(r), 1e-2);
    worst_forward = std::max(worst_forward, e);
    INFO(loss_names[i], ": ", t, " against ", r, ", relative error ", e, ", tolerance ", tol);
    CHECK(std::isfinite(t));
    CHECK(e <= tol);
  }
  REQUIRE(test.level_count.size() == ref.level_count.size());
  for (std::size_t l = 0; l < test.level_count.size(); ++l) {
    CHECK(test.level_count[l] == ref.level_count[l]);
    check_close("level importance", test.level_importance[l], ref.level_importance[l], tol, worst_forward);
    check_close("level load", test.level_load[l], ref.level_load[l], tol, worst_forward);
  }
  check_close("dx", test.dx, ref.dx, expert_tol, worst_backward);
  REQUIRE(test.names == ref.names);
  for (std::size_t i = 0; i < test.grads.size(); ++i) {
    INFO("gradient of ", test.names[i]);
    check_close("parameter gradient", test.grads[i], ref.grads[i], expert_tol, worst_backward);
  }
}

// bf16 experts against the fp32 reference: how much the precision costs, not whether the
// backend is right (compare() against the CPU in the same precision does that). The routing is
// the same (gating is fp32); the output is within 2e-2. The gradients, taken together (dx and
// every parameter gradient as one vector), are within 1e-1: a ReLU expert's mask flips for the
// pre-activations closer to 0 than their bf16 rounding, and a fraction p of flipped entries
// moves a norm by about sqrt(p) (0.3% flipped: 5%); single small tensors whose sums cancel
// (a router's gradient for one token) can differ more and are not bounded one by one, and the
// d = 1 shape (outputs that are sums of 3 terms that cancel) is left out.
template <class S>
void compare_to_fp32(const Result<S>& test, const Result<S>& ref32, Worst& worst) {
  CHECK(test.routing == ref32.routing);
  check_close("y", test.y, ref32.y, 2e-2, worst.bf16_vs_fp32);
  std::vector<S> all_test = test.dx, all_ref = ref32.dx;
  for (std::size_t i = 0; i < test.grads.size(); ++i) {
    all_test.insert(all_test.end(), test.grads[i].begin(), test.grads[i].end());
    all_ref.insert(all_ref.end(), ref32.grads[i].begin(), ref32.grads[i].end());
  }
  check_close("dx and every parameter gradient", all_test, all_ref, 1e-1, worst.bf16_grad_vs_fp32);
}

// Host parameter values by name, as uploaded to every layer of a case.
template <class S>
using Values = std::map<std::string, std::vector<S>>;

// Expert e of a family ("experts." or "shared_experts.") on one token, written out in double from
// the parameters' stacked layout: w1, w3 [count * d x h], w2 [count * h x d], biases [count x h],
// [count x d]. out[c] += scale * E_e(x)[c].
template <class Expert, class S>
void naive_expert(const Values<S>& p, const std::string& prefix, Index e, const S* x, Index d, Index h, double scale,
                  double* out) {
  const auto& w1 = p.at(prefix + "w1");
  const auto& w2 = p.at(prefix + "w2");
  std::vector<double> a(static_cast<std::size_t>(h));
  for (Index j = 0; j < h; ++j) {
    double pre = 0, gate = 0;
    for (Index c = 0; c < d; ++c) pre += static_cast<double>(x[c]) * w1[static_cast<std::size_t>((e * d + c) * h + j)];
    if constexpr (std::is_base_of_v<moe::expert::SwiGLU, Expert>) {
      const auto& w3 = p.at(prefix + "w3");
      for (Index c = 0; c < d; ++c) gate += static_cast<double>(x[c]) * w3[static_cast<std::size_t>((e * d + c) * h + j)];
      // (a' sigmoid(alpha a')) * (u' + up_offset), a' = min(a, L), u' = clamp(u, -L, L) when L > 0.
      const auto o = expert_config<Expert>(h);
      if (p.count(prefix + "b1")) pre += p.at(prefix + "b1")[static_cast<std::size_t>(e * h + j)];
      if (p.count(prefix + "b3")) gate += p.at(prefix + "b3")[static_cast<std::size_t>(e * h + j)];
      if (o.limit > 0) {
        pre = std::min(pre, o.limit);
        gate = std::clamp(gate, -o.limit, o.limit);
      }
      a[static_cast<std::size_t>(j)] = pre / (1 + std::exp(-o.alpha * pre)) * (gate + o.up_offset);
    } else {
      static_assert(std::is_same_v<Expert, moe::expert::FeedForward> || std::is_same_v<Expert, GeluFeedForward>,
                    "naive_expert: an expert without a reference");
      if (p.count(prefix + "b1")) pre += p.at(prefix + "b1")[static_cast<std::size_t>(e * h + j)];
      if constexpr (std::is_same_v<Expert, GeluFeedForward>)
        a[static_cast<std::size_t>(j)] = 0.5 * pre * (1 + std::erf(pre / std::sqrt(2.0)));  // pre * Phi(pre)
      else
        a[static_cast<std::size_t>(j)] = std::max(pre, 0.0);
    }
  }
  for (Index c = 0; c < d; ++c) {
    double acc = 0;
    for (Index j = 0; j < h; ++j) acc += a[static_cast<std::size_t>(j)] * w2[static_cast<std::size_t>((e * h + j) * d + c)];
    if (p.count(prefix + "b2")) acc += p.at(prefix + "b2")[static_cast<std::size_t>(e * d + c)];
    out[c] += scale * acc;
  }
}

// MATH.md 1 written out, independent of the layer's dispatch and combine: y[t] = sum over t's
// routed slots of gate * E_expert(x[t]), plus every shared expert's E(x[t]); [T x d] in double.
template <class Expert, class S>
std::vector<double> naive_mixture(const Values<S>& p, const std::vector<S>& x, const std::vector<Index>& routing,
                                  const std::vector<S>& gates, Index t_count, Index d, Index h, Index shared) {
  std::vector<double> y(static_cast<std::size_t>(t_count * d), 0.0);
  const Index slots = t_count > 0 ? static_cast<Index>(routing.size()) / t_count : 0;
  for (Index t = 0; t < t_count; ++t) {
    const S* xt = x.data() + t * d;
    double* yt = y.data() + t * d;
    for (Index j = 0; j < slots; ++j) {
      const Index e = routing[static_cast<std::size_t>(t * slots + j)];
      if (e == moe::kNotRouted) continue;
      naive_expert<Expert>(p, "experts.", e, xt, d, h, static_cast<double>(gates[static_cast<std::size_t>(t * slots + j)]), yt);
    }
    for (Index e = 0; e < shared; ++e) naive_expert<Expert>(p, "shared_experts.", e, xt, d, h, 1.0, yt);
  }
  return y;
}

// The same bits: routing, output, input and parameter gradients.
template <class S>
void check_same_bits(const Result<S>& a, const Result<S>& b) {
  CHECK(a.routing == b.routing);
  CHECK(same_bits(a.y, b.y));
  CHECK(same_bits(a.dx, b.dx));
  for (std::size_t i = 0; i < a.grads.size(); ++i) {
    INFO("gradient of ", a.names[i]);
    CHECK(same_bits(a.grads[i], b.grads[i]));
  }
}

template <class Layer, class Case>
typename Layer::Config layer_config(const Shape& shape, moe::Precision precision) {
  typename Layer::Config c{};
  c.d_model = shape.d;
  c.n_experts = shape.n;
  c.expert = expert_config<typename Case::ExpertType>(shape.h);
  c.expert.precision = precision;
  c.gate = depth_config<typename Case::GateType, Case::depth>(shape.n);
  c.shared_experts = shape.shared;
  c.seed = 11;
  return c;
}

// The bound on y, dx and the gradients of bf16 experts against the CPU's bf16 experts, for a
// backend whose fp32 tolerance is tol. Both sides round the same operands to bfloat16, but an
// intermediate (an expert's hidden activation, fed to its second GEMM) that differs by one fp32
// ulp before its rounding (a different summation order: cuBLAS, tensor cores) can round to the
// neighbouring bfloat16, 2^-8 of its magnitude away; every term of a sum that reads it moves by
// at most that fraction of its own magnitude, so the norm of the difference is at most 2^-8 of
// the norm of the terms' magnitudes. With the suite's random operands the terms do not cancel
// on the whole (that norm is within 2x of the result's), hence 2^-7 relative to the result. A
// bug (a wrong slot, gate or expert) moves them by O(1). A backend that runs the CPU's expressions in the CPU's order (tol = 0,
// ThrustHost) rounds the same values the same way: it stays at 0.
inline double bf16_tolerance(double tol) { return tol == 0 ? 0.0 : std::max(tol, 1.0 / 128); }

// The layer under test against the CPU reference with the same parameters and inputs, in
// training (noise from an Rng) and inference; a second layer under test for determinism. With
// bf16 experts, also against the CPU reference in fp32 (tolerance 2e-2).
template <class Bt, class Case, class S = typename Bt::Scalar>
void run_case(const Shape& shape, moe::Precision precision, double tol, Worst& worst) {
  using Gate = typename Case::GateType;
  using Expert = typename Case::ExpertType;
  constexpr int depth = Case::depth;
  using Cpu = moe::backend::Cpu<S>;
  using Ref = moe::Layer<Expert, Gate, Cpu, depth>;
  using Test = moe::Layer<Expert, Gate, Bt, depth>;
  INFO(type_name<Gate>(), " / ", type_name<Expert>(), " / depth ", depth, " / ", std::string(moe::to_string(precision)),
       ": ", std::string(shape.what), " (T = ", shape.tokens, ", d = ", shape.d, ", n = ", shape.n, ", h = ", shape.h, ")");
  const bool rounded = precision != moe::Precision::fp32;  // bf16 or tf32 experts: rounded operands
  Ref ref(layer_config<Ref, Case>(shape, precision));
  Ref ref32(layer_config<Ref, Case>(shape, moe::Precision::fp32));
  Test test(layer_config<Test, Case>(shape, precision));

  // Fresh random parameters, the same in all: no zeros.
  auto rp = ref.parameters();
  auto r32 = ref32.parameters();
  auto tp = test.parameters();
  REQUIRE(rp.size() == tp.size());
  Values<S> host_values;
  for (std::size_t i = 0; i < rp.size(); ++i) {
    REQUIRE(rp[i].name == tp[i].name);
    const Index count = rp[i].value.rows * rp[i].value.cols;
    auto values = random_values<S>(1000 + i, static_cast<std::uint32_t>(i), count, 0.5);
    if (shape.skew && rp[i].name == (depth == 1 ? "gate.w_gate" : "gate.0.w_gate")) {
      // Positive tokens: the first level's node 0 is every token's first choice, 2 and up nobody's.
      const Index cols = rp[i].value.cols;
      for (Index r = 0; r < rp[i].value.rows; ++r)
        for (Index c = 0; c < cols; ++c)
          if (c == 0 || c >= 2) values[static_cast<std::size_t>(r * cols + c)] = c == 0 ? S(3) : S(-3);
    }
    host_values[rp[i].name] = values;
    upload<Cpu>(values, rp[i].value);
    upload<Cpu>(values, r32[i].value);
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
  const moe::ConstMatrixView<S> x_test = x_dev.view(), dy_test = dy_dev.view();

  for (const moe::Mode mode : {moe::Mode::train, moe::Mode::inference}) {
    INFO("mode ", std::string(mode == moe::Mode::train ? "train" : "inference"));
    const auto r_ref = run<Cpu>(ref, x_host, dy_host, mode);
    if (shape.skew && !std::is_same_v<Gate, moe::gate::Softmax> && !std::is_same_v<Gate, moe::gate::ExpertChoice>) {
      INFO("the skewed case leaves the leaf experts ", first_skew_empty(depth), " and up empty");
      REQUIRE(static_cast<Index>(r_ref.tokens_per_expert.size()) > first_skew_empty(depth));
      for (auto e = static_cast<std::size_t>(first_skew_empty(depth)); e < r_ref.tokens_per_expert.size(); ++e)
        CHECK(r_ref.tokens_per_expert[e] == 0);
      Index kept = 0;
      for (Index e = 0; e < first_skew_empty(depth); ++e) kept += r_ref.tokens_per_expert[static_cast<std::size_t>(e)];
      CHECK(kept > 0);
    }
    const auto r_test = run<Bt>(test, x_test, dy_test, mode);
    const auto r_again = run<Bt>(again, x_test, dy_test, mode);
    compare(r_test, r_ref, tol, rounded ? bf16_tolerance(tol) : tol, worst.forward, worst.backward);
    if (!rounded) {
      INFO("the output against a naive mixture of the routed and shared experts (MATH.md 1)");
      const auto naive = naive_mixture<Expert>(host_values, xv, r_test.routing, r_test.gates, t_count, d, shape.h,
                                               shape.shared);
      const std::vector<double> y(r_test.y.begin(), r_test.y.end());
      double ignored = 0;
      check_close("y against the naive mixture", y, naive, std::is_same_v<S, float> ? 1e-4 : 1e-10, ignored);
    }
    check_same_bits(r_test, r_again);
    if (rounded && shape.d >= 8) {  // d = 1: a norm over a few summands that cancel measures nothing
      INFO(std::string(moe::to_string(precision)), " experts against the fp32 reference");
      compare_to_fp32(r_test, run<Cpu>(ref32, x_host, dy_host, mode), worst);
    }
  }
}

// Every shape of a case, with the backend under test Bt: in its own precision, and with bf16
// (and, for a backend with GEMMs of its own, tf32) experts when it computes in float.
template <class Bt, class Case>
Worst run_all_shapes(double tol) {
  Worst worst;
  for (const Shape& shape : shapes(Case::depth)) {
    run_case<Bt, Case>(shape, moe::Precision::fp32, tol, worst);
    if constexpr (std::is_same_v<typename Bt::Scalar, float>) {
      run_case<Bt, Case>(shape, moe::Precision::bf16, tol, worst);
      // tf32 experts where the backend has GEMMs of its own (tol > 0: the GPU's tensor cores); on
      // a backend that runs the CPU's GEMMs, tf32 is the CPU's emulation, tested in precision.cpp.
      if (tol > 0) run_case<Bt, Case>(shape, moe::Precision::tf32, tol, worst);
    }
  }
  return worst;
}

// One doctest case: every shape of Case, with the backend under test Bt, and its worst errors.
template <class Bt, class Case>
void check_case(double tol) {
  const Worst worst = run_all_shapes<Bt, Case>(tol);
  MESSAGE(type_name<typename Case::GateType>(), " / ", type_name<typename Case::ExpertType>(), " / depth ", Case::depth,
          ": worst relative error forward ", worst.forward, ", backward ", worst.backward,
          "; bf16 experts against fp32: y ", worst.bf16_vs_fp32, ", gradients ", worst.bf16_grad_vs_fp32);
}

}  // namespace compare
