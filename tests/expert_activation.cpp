// The experts' activation as a template parameter (moe/activation.hpp): each built-in's
// derivative against central differences of its value, in float and double; FeedForwardWith<A>
// and GluWith<A> (GeGLU, GLU options included) against a per-row reference written here, their
// gradients by finite differences inside layers, in bf16 against fp32; a user's activation in
// both families; the experts' names in a checkpoint.

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/io/checkpoint.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

// Squared ReLU (So et al., "Primer", 2021): an activation written by a user.
struct SquaredRelu {
  static constexpr const char* name = "relu2";
  template <class S>
  MOE_HD static S f(S x) {
    return x > S(0) ? x * x : S(0);
  }
  template <class S>
  MOE_HD static S df(S x) {
    return x > S(0) ? S(2) * x : S(0);
  }
};

// ReLU written by a user: the generic path (g * df) against the built-in's select.
struct UserRelu {
  static constexpr const char* name = "user_relu";
  template <class S>
  MOE_HD static S f(S x) {
    return x > S(0) ? x : S(0);
  }
  template <class S>
  MOE_HD static S df(S x) {
    return x > S(0) ? S(1) : S(0);
  }
};

// Not activations: no derivative; a name that is not a constant; a derivative for float only.
struct NoDerivative {
  static constexpr const char* name = "no_df";
  template <class S>
  static S f(S x) {
    return x;
  }
};
struct RuntimeName {
  static inline const char* name = "runtime";
  template <class S>
  static S f(S x) {
    return x;
  }
  template <class S>
  static S df(S) {
    return S(1);
  }
};
struct FloatOnly {
  static constexpr const char* name = "float_only";
  static float f(float x) { return x; }
  static float df(float) { return 1.0f; }
};

static_assert(Activation<activation::Relu> && Activation<activation::Gelu> && Activation<activation::GeluTanh> &&
              Activation<activation::Silu> && Activation<SquaredRelu>);
static_assert(!Activation<NoDerivative> && !Activation<RuntimeName> && !Activation<FloatOnly> && !Activation<int>);

using GeluFF = expert::FeedForwardWith<activation::Gelu>;
using SiluFF = expert::FeedForwardWith<activation::Silu>;
using TanhFF = expert::FeedForwardWith<activation::GeluTanh>;
using SquaredFF = expert::FeedForwardWith<SquaredRelu>;
using SquaredGlu = expert::GluWith<SquaredRelu>;

// Every existing use of the two families keeps its meaning.
static_assert(std::is_same_v<expert::FeedForward, expert::FeedForwardWith<activation::Relu>>);
static_assert(std::is_same_v<expert::SwiGLU, expert::GluWith<activation::Silu>>);
static_assert(std::is_same_v<expert::GeGLU, expert::GluWith<activation::Gelu>>);
static_assert(std::is_same_v<GeluFF::Config, expert::FeedForward::Config>);
static_assert(std::is_same_v<SquaredGlu::Config, expert::SwiGLU::Config>);
static_assert(ExpertFamily<GeluFF, backend::Cpu<float>> && ExpertFamily<expert::GeGLU, backend::Cpu<double>> &&
              ExpertFamily<SquaredFF, backend::Cpu<double>> && ExpertFamily<SquaredGlu, backend::Cpu<float>>);
// Names, as written in a checkpoint: the defaults keep theirs.
static_assert(io::family_name<expert::FeedForward>() == "FeedForward");
static_assert(io::family_name<expert::SwiGLU>() == "SwiGLU");
static_assert(io::family_name<GeluFF>() == "FeedForward<gelu>");
static_assert(io::family_name<TanhFF>() == "FeedForward<gelu_tanh>");
static_assert(io::family_name<expert::GeGLU>() == "GLU<gelu>");
static_assert(io::family_name<SquaredFF>() == "FeedForward<relu2>");
static_assert(io::family_name<SquaredGlu>() == "GLU<relu2>");

// The activations written out here, in double, independently of moe/activation.hpp.
double relu_ref(double x) { return x > 0 ? x : 0.0; }
double gelu_ref(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}
double silu_ref(double x) { return x / (1 + std::exp(-x)); }
double squared_relu_ref(double x) { return x > 0 ? x * x : 0.0; }

// A's value against ref and A::df against central differences of A::f in S, over a grid of
// [-6, 6] (steps of about cbrt(eps) |x|; points nearer a kink at 0 than the step left out).
template <class A, class S>
void check_activation(double (*ref)(double), bool kink_at_zero) {
  CAPTURE(A::name);
  const char* scalar = std::is_same_v<S, float> ? "float" : "double";
  CAPTURE(scalar);
  const double eps = std::is_same_v<S, float> ? 1.2e-7 : 2.3e-16;
  const double value_tol = std::is_same_v<S, float> ? 1e-6 : 1e-14;
  const double slope_tol = std::is_same_v<S, float> ? 1e-3 : 1e-8;
  int checked = 0;
  for (int k = 0; k <= 480; ++k) {
    const S x = static_cast<S>(-6.0 + 0.025 * k + 1e-3);
    CAPTURE(x);
    const double want = ref(static_cast<double>(x));
    CHECK(std::abs(static_cast<double>(A::f(x)) - want) <= value_tol * std::max(1.0, std::abs(want)));
    const S step = static_cast<S>(std::cbrt(eps) * std::max(1.0, std::abs(static_cast<double>(x))));
    if (kink_at_zero && std::abs(x) < 2 * step) continue;
    const S up = x + step, down = x - step;
    const double numeric = (static_cast<double>(A::f(up)) - static_cast<double>(A::f(down))) /
                           (static_cast<double>(up) - static_cast<double>(down));
    const double analytic = static_cast<double>(A::df(x));
    CHECK(std::abs(analytic - numeric) <= slope_tol * std::max(1.0, std::abs(analytic)));
    // float and double agree.
    CHECK(std::abs(analytic - static_cast<double>(A::df(static_cast<double>(x)))) <=
          (std::is_same_v<S, float> ? 1e-6 : 0.0) * std::max(1.0, std::abs(analytic)));
    ++checked;
  }
  CHECK(checked > 400);
}

// A group's parameters by name, widened to double.
template <class S>
std::map<std::string, std::vector<double>> values_of(const std::vector<Parameter<S>>& params) {
  std::map<std::string, std::vector<double>> m;
  for (const auto& p : params) m[p.name] = std::vector<double>(p.value.data, p.value.data + p.size());
  return m;
}

template <class E>
constexpr bool is_glu = requires(typename E::Config c) {
  c.alpha;
};

// E_e(x) for one row x [d], written out in double: FeedForward f(x W1 + b1) W2 + b2; GLU
// (f(alpha a') / alpha) (u' + up_offset) W2 + b2, a = x W1 + b1, u = x W3 + b3, a' = min(a, L),
// u' = clamp(u, -L, L) when L > 0. sides counts a > L and |u| > L (the clamps reached).
template <class E>
std::vector<double> reference_row(const std::map<std::string, std::vector<double>>& p, const typename E::Config& c,
                                  double (*f)(double), Index e, const std::vector<double>& x, Index d, int* sides) {
  const Index h = c.hidden;
  const auto w = [&](const std::string& name, Index i) { return p.at("experts." + name)[static_cast<std::size_t>(i)]; };
  std::vector<double> act(static_cast<std::size_t>(h)), y(static_cast<std::size_t>(d));
  for (Index j = 0; j < h; ++j) {
    double a = c.bias ? w("b1", e * h + j) : 0.0;
    for (Index k = 0; k < d; ++k) a += x[static_cast<std::size_t>(k)] * w("w1", (e * d + k) * h + j);
    if constexpr (is_glu<E>) {
      double u = c.bias ? w("b3", e * h + j) : 0.0;
      for (Index k = 0; k < d; ++k) u += x[static_cast<std::size_t>(k)] * w("w3", (e * d + k) * h + j);
      if (c.limit > 0) {
        sides[0] += a > c.limit;
        sides[1] += std::abs(u) > c.limit;
        a = std::min(a, c.limit);
        u = std::clamp(u, -c.limit, c.limit);
      }
      act[static_cast<std::size_t>(j)] = f(c.alpha * a) / c.alpha * (u + c.up_offset);
    } else {
      act[static_cast<std::size_t>(j)] = f(a);
    }
  }
  for (Index k = 0; k < d; ++k) {
    double s = c.bias ? w("b2", e * d + k) : 0.0;
    for (Index j = 0; j < h; ++j) s += act[static_cast<std::size_t>(j)] * w("w2", (e * h + j) * d + k);
    y[static_cast<std::size_t>(k)] = s;
  }
  return y;
}

constexpr Index kN = 3, kD = 4, kRows = 9;
const std::vector<Index> kOffsets{0, 4, 4, kRows};  // expert 1 gets no row

// The group's forward on random parameters (biases included) and rows, against reference_row.
template <class E, class S>
void check_forward(const typename E::Config& config, double (*f)(double)) {
  CAPTURE(io::family_name<E>());
  const char* scalar = std::is_same_v<S, float> ? "float" : "double";
  CAPTURE(scalar);
  using B = backend::Cpu<S>;
  typename E::template Group<B> g(config, kD, kN, 5);
  std::uint64_t seed = 40;
  for (auto& p : g.parameters()) test::fill_uniform(p.value, ++seed, -1.0, 1.0);
  const auto x = test::random_matrix<S>(kRows, kD, 3, -1.5, 1.5);
  Matrix<S> y(kRows, kD, S(123));
  typename B::Context ctx;
  typename E::template Group<B>::Saved saved;
  g.forward(ctx, x.view(), kOffsets.data(), y.view(), saved);
  const auto p = values_of(g.parameters());
  int sides[2] = {0, 0};
  double worst = 0, largest = 0;
  for (Index e = 0; e < kN; ++e)
    for (Index r = kOffsets[static_cast<std::size_t>(e)]; r < kOffsets[static_cast<std::size_t>(e) + 1]; ++r) {
      std::vector<double> xr(static_cast<std::size_t>(kD));
      for (Index k = 0; k < kD; ++k) xr[static_cast<std::size_t>(k)] = static_cast<double>(x(r, k));
      const auto want = reference_row<E>(p, config, f, e, xr, kD, sides);
      for (Index k = 0; k < kD; ++k) {
        largest = std::max(largest, std::abs(want[static_cast<std::size_t>(k)]));
        worst = std::max(worst, std::abs(static_cast<double>(y(r, k)) - want[static_cast<std::size_t>(k)]));
      }
    }
  if constexpr (is_glu<E>) {
    if (config.limit > 0) {
      CHECK(sides[0] > 0);  // both clamps reached
      CHECK(sides[1] > 0);
    }
  }
  CHECK(largest > 0.5);
  CHECK(worst <= (std::is_same_v<S, float> ? 1e-5 : 1e-13) * largest);
}

// GPT-OSS's options on another activation: biases, input scale, clamps at 1 (reached by the
// test's pre-activations), offset.
expert::GluConfig glu_options(Index h) {
  return {.hidden = h, .bias = true, .alpha = 1.5, .limit = 1.0, .up_offset = 0.5};
}

// Loops seeds until the routing holds still under every probe, then requires the finite-difference
// check to pass with every parameter taking part (as tests/expert_swiglu.cpp).
template <class L>
void check_gradients(const typename L::Config& base, Index t_count) {
  for (std::uint64_t seed = 1; seed < 30; ++seed) {
    auto config = base;
    config.seed = seed;
    L layer(config);
    test::randomize_parameters(layer, seed, 0.8);
    auto x = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 1);
    const auto dy = test::random_matrix<double>(t_count, config.d_model, seed * 31 + 2);
    const auto result = test::check_layer_gradients(layer, x.view(), dy.view());
    if (!result.routing_stable) continue;
    std::string failures, zero;
    for (const auto& fail : result.failures) failures += fail + "; ";
    for (const auto& name : result.zero_grads) zero += name + "; ";
    INFO("failures: ", failures, " zero gradients: ", zero);
    CHECK(result.failures.empty());
    CHECK(result.worst < 1e-6);
    CHECK(result.zero_grads.empty());
    MESSAGE(io::family_name<typename L::ExpertTag>(), ", seed ", seed, ": worst relative error ", result.worst);
    return;
  }
  FAIL("no seed with stable routing in 30");
}

template <class E>
void check_layer_gradients_of(const typename E::Config& expert_config) {
  using L = Layer<E, gate::TopK, backend::Cpu<double>>;
  typename L::Config config{
      .d_model = 4, .n_experts = 4, .expert = expert_config, .gate = {.k = 2, .w_importance = 1.0}};
  config.shared_experts = 1;
  check_gradients<L>(config, 10);
}

// y, dx and every gradient of a group, for comparisons.
template <class E, class B>
std::vector<double> run_group(typename E::template Group<B>& g, ConstMatrixView<float> x, ConstMatrixView<float> dy) {
  typename B::Context ctx;
  Matrix<float> y(kRows, kD), dx(kRows, kD);
  typename E::template Group<B>::Saved saved;
  g.forward(ctx, x, kOffsets.data(), y.view(), saved);
  g.backward(ctx, x, kOffsets.data(), saved, dy, dx.view());
  std::vector<double> all(y.data(), y.data() + y.size());
  all.insert(all.end(), dx.data(), dx.data() + dx.size());
  for (const auto& p : g.parameters()) all.insert(all.end(), p.grad.data, p.grad.data + p.size());
  return all;
}

// The same parameters in bf16 and fp32: close (the rounding of the operands), not equal.
template <class E>
void check_bf16(typename E::Config config) {
  CAPTURE(io::family_name<E>());
  using F = backend::Cpu<float>;
  typename E::template Group<F> g32(config, kD, kN, 3);
  config.precision = Precision::bf16;
  typename E::template Group<F> g16(config, kD, kN, 3);
  std::uint64_t seed = 60;
  auto p16 = g16.parameters();
  for (auto& p : g32.parameters()) test::fill_uniform(p.value, ++seed, -1.0, 1.0);
  const auto p32 = g32.parameters();
  for (std::size_t k = 0; k < p32.size(); ++k)
    std::copy(p32[k].value.data, p32[k].value.data + p32[k].size(), p16[k].value.data);
  p16.front().changed();
  const auto x = test::random_matrix<float>(kRows, kD, 7, -1.5, 1.5);
  const auto dy = test::random_matrix<float>(kRows, kD, 8);
  const auto r32 = run_group<E>(g32, x.view(), dy.view());
  const auto r16 = run_group<E>(g16, x.view(), dy.view());
  const double err = test::relative_error(r16, r32);
  MESSAGE(io::family_name<E>(), ": bf16 against fp32, y, dx and every gradient: ", err);
  CHECK(err > 0);
  CHECK(err < 5e-2);
}

}  // namespace

TEST_CASE_TEMPLATE("each activation's df is the derivative of its f (central differences)", S, float, double) {
  check_activation<activation::Relu, S>(relu_ref, true);
  check_activation<activation::Gelu, S>(gelu_ref, false);
  check_activation<activation::GeluTanh, S>(gelu_tanh_ref, false);
  check_activation<activation::Silu, S>(silu_ref, false);
  check_activation<SquaredRelu, S>(squared_relu_ref, true);
}

TEST_CASE("the built-in activations at known points") {
  CHECK(activation::Gelu::f(1.0) == doctest::Approx(0.8413447460685429).epsilon(1e-15));
  CHECK(activation::Gelu::f(-2.0) == doctest::Approx(-0.04550026389635842).epsilon(1e-14));
  CHECK(activation::GeluTanh::f(1.0) == doctest::Approx(0.8411919906082768).epsilon(1e-15));
  CHECK(activation::Silu::f(1.0) == doctest::Approx(0.7310585786300049).epsilon(1e-15));
  CHECK(activation::Relu::f(-0.5f) == 0.0f);
  CHECK(activation::Relu::df(0.0) == 0.0);  // relu'(0) = 0 (docs/math.md)
  CHECK(activation::Gelu::df(0.0) == 0.5);
  CHECK(activation::Silu::df(0.0) == 0.5);
  // ReLU's gradient is a select: an infinite gradient where x <= 0 gives 0, not NaN.
  CHECK(detail::activation_grad<activation::Relu>(-1.0, std::numeric_limits<double>::infinity()) == 0.0);
}

TEST_CASE_TEMPLATE("FeedForwardWith<A> and GluWith<A>: forward against a per-row reference", S, float, double) {
  check_forward<GeluFF, S>({.hidden = 5, .bias = true}, gelu_ref);
  check_forward<SiluFF, S>({.hidden = 5, .bias = true}, silu_ref);
  check_forward<TanhFF, S>({.hidden = 5}, gelu_tanh_ref);
  check_forward<SquaredFF, S>({.hidden = 5, .bias = true}, squared_relu_ref);
  check_forward<expert::FeedForward, S>({.hidden = 5, .bias = true}, relu_ref);
  check_forward<expert::GeGLU, S>({.hidden = 5}, gelu_ref);
  check_forward<expert::GeGLU, S>(glu_options(5), gelu_ref);
  check_forward<SquaredGlu, S>({.hidden = 5}, squared_relu_ref);
  check_forward<SquaredGlu, S>(glu_options(5), squared_relu_ref);
  check_forward<expert::SwiGLU, S>(glu_options(5), silu_ref);
}

TEST_CASE("FeedForwardWith<A> and GluWith<A>: layer gradients against finite differences (double)") {
  SUBCASE("FeedForward<gelu>") { check_layer_gradients_of<GeluFF>({.hidden = 5, .bias = true}); }
  SUBCASE("FeedForward<silu>") { check_layer_gradients_of<SiluFF>({.hidden = 5, .bias = true}); }
  SUBCASE("FeedForward<gelu_tanh>") { check_layer_gradients_of<TanhFF>({.hidden = 5}); }
  SUBCASE("GeGLU") { check_layer_gradients_of<expert::GeGLU>({.hidden = 5}); }
  SUBCASE("GeGLU with the options") {
    auto c = glu_options(5);
    c.limit = 0.5;  // crossed by the layer's pre-activations (of order 1)
    check_layer_gradients_of<expert::GeGLU>(c);
  }
}

TEST_CASE("a user's activation (squared ReLU) works in both families") {
  check_layer_gradients_of<SquaredFF>({.hidden = 5, .bias = true});
  check_layer_gradients_of<SquaredGlu>({.hidden = 5});
  check_layer_gradients_of<SquaredGlu>(glu_options(5));
  using L = Layer<SquaredGlu, gate::TopK, backend::Cpu<float>>;
  L layer({.d_model = 4, .n_experts = 4, .expert = {.hidden = 6}, .gate = {.k = 2}, .seed = 1});
  CHECK(io::describe(layer).at("moe.expert") == "GLU<relu2>");
}

TEST_CASE("a user's ReLU computes the built-in ReLU's results") {
  using F = backend::Cpu<float>;
  for (const bool bias : {false, true}) {
    CAPTURE(bias);
    expert::FeedForward::Group<F> builtin({.hidden = 6, .bias = bias}, kD, kN, 9);
    expert::FeedForwardWith<UserRelu>::Group<F> user({.hidden = 6, .bias = bias}, kD, kN, 9);
    std::uint64_t seed = 80;
    auto pu = user.parameters();
    for (auto& p : builtin.parameters()) test::fill_uniform(p.value, ++seed, -1.0, 1.0);
    const auto pb = builtin.parameters();
    for (std::size_t k = 0; k < pb.size(); ++k)
      std::copy(pb[k].value.data, pb[k].value.data + pb[k].size(), pu[k].value.data);
    const auto x = test::random_matrix<float>(kRows, kD, 5);
    const auto dy = test::random_matrix<float>(kRows, kD, 6);
    // The same values (g * 0 may be -0 where the select gives +0).
    CHECK(run_group<expert::FeedForward>(builtin, x.view(), dy.view()) ==
          run_group<expert::FeedForwardWith<UserRelu>>(user, x.view(), dy.view()));
  }
}

TEST_CASE("FeedForwardWith<A> and GluWith<A> in bf16: close to fp32") {
  check_bf16<GeluFF>({.hidden = 5, .bias = true});
  check_bf16<SquaredFF>({.hidden = 5});
  check_bf16<expert::GeGLU>({.hidden = 5});
  check_bf16<expert::GeGLU>(glu_options(5));
}

TEST_CASE("the experts' configuration errors name the expert with its activation") {
  using test::contains;
  using test::error_of;
  using D = backend::Cpu<double>;
  CHECK(contains(error_of([] { GeluFF::Group<D> g({.hidden = 0}, 4, 2, 1); }),
                 "expert::FeedForward<gelu>: hidden = 0, expected at least 1"));
  CHECK(contains(error_of([] { expert::GeGLU::Group<D> g({.hidden = 0}, 4, 2, 1); }),
                 "expert::GLU<gelu>: hidden = 0, expected at least 1"));
  // act(a) = f(alpha a) / alpha: alpha = 0 is refused, except by silu, whose form has no division.
  CHECK(contains(error_of([] { expert::GeGLU::Group<D> g({.hidden = 3, .alpha = 0.0}, 4, 2, 1); }),
                 "expert::GLU<gelu>: alpha = 0, expected a finite number other than 0 (1: gelu itself)"));
  CHECK(error_of([] { expert::SwiGLU::Group<D> g({.hidden = 3, .alpha = 0.0}, 4, 2, 1); }).empty());
  CHECK(contains(error_of([] { expert::FeedForward::Group<D> g({.hidden = 0}, 4, 2, 1); }),
                 "expert::FeedForward: hidden = 0"));
  CHECK(contains(
      error_of([] { GeluFF::Group<backend::Cpu<double>> g({.hidden = 2, .precision = Precision::bf16}, 4, 2, 1); }),
      "expert::FeedForward<gelu>: precision = bf16 needs a float backend"));
}

TEST_CASE("a checkpoint of a FeedForward<gelu> layer keeps its name and is refused as a plain FeedForward") {
  using L = Layer<GeluFF, gate::TopK, backend::Cpu<float>>;
  using Plain = Layer<expert::FeedForward, gate::TopK, backend::Cpu<float>>;
  L::Config config{.d_model = 4, .n_experts = 3, .expert = {.hidden = 5, .bias = true}, .gate = {.k = 2}, .seed = 1};
  config.shared_experts = 1;
  L a(config);
  test::randomize_parameters(a, 6, 0.8);
  const auto dir = std::filesystem::temp_directory_path() / ("moe-activation-test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto file = dir / "layer.safetensors";
  io::save(a, file);
  CHECK(io::describe(a).at("moe.expert") == "FeedForward<gelu>");
  CHECK(io::SafeTensors::open(file).metadata().at("moe.expert") == "FeedForward<gelu>");

  // Back into its own type: the configuration, every tensor and the output, the same bits.
  L c = io::load_layer<L>(file);
  CHECK(io::describe(c) == io::describe(a));
  const auto pa = a.parameters(), pc = c.parameters();
  REQUIRE(pa.size() == pc.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CAPTURE(pa[i].name);
    CHECK(test::same_bits(ConstMatrixView<float>(pa[i].value), ConstMatrixView<float>(pc[i].value)));
  }
  const auto x = test::random_matrix<float>(6, 4, 12);
  const auto fa = a.forward(x.view(), Mode::inference), fc = c.forward(x.view(), Mode::inference);
  CHECK(test::same_bits(fa.y(), fc.y()));

  // A ReLU layer of the same shapes would read every tensor: the name refuses it.
  const std::string load_layer_error = test::error_of([&] { (void)io::load_layer<Plain>(file); });
  INFO(load_layer_error);
  CHECK(test::contains(load_layer_error, "holds a layer of expert FeedForward<gelu>"));
  CHECK(test::contains(load_layer_error, "expected expert FeedForward,"));
  Plain plain({.d_model = 4, .n_experts = 3, .expert = {.hidden = 5, .bias = true}, .gate = {.k = 2}, .seed = 1});
  const std::string load_error = test::error_of([&] { io::load(plain, file); });
  INFO(load_error);
  CHECK(test::contains(load_error, "FeedForward<gelu>"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("the GLU experts' names: SwiGLU keeps its own, GeGLU's comes from gelu") {
  using F = backend::Cpu<float>;
  Layer<expert::SwiGLU, gate::TopK, F> swiglu(
      {.d_model = 4, .n_experts = 2, .expert = {.hidden = 3}, .gate = {.k = 1}});
  Layer<expert::GeGLU, gate::TopK, F> geglu({.d_model = 4, .n_experts = 2, .expert = {.hidden = 3}, .gate = {.k = 1}});
  Layer<expert::FeedForward, gate::TopK, F> relu(
      {.d_model = 4, .n_experts = 2, .expert = {.hidden = 3}, .gate = {.k = 1}});
  CHECK(io::describe(swiglu).at("moe.expert") == "SwiGLU");
  CHECK(io::describe(geglu).at("moe.expert") == "GLU<gelu>");
  CHECK(io::describe(relu).at("moe.expert") == "FeedForward");
  // GeGLU's options go through the metadata as SwiGLU's do.
  auto options = io::describe(geglu);
  options["config.expert.alpha"] = "1.5";
  options["config.expert.limit"] = "2";
  const auto read = io::layer_config<Layer<expert::GeGLU, gate::TopK, F>>(options);
  CHECK(read.expert.alpha == 1.5);
  CHECK(read.expert.limit == 2.0);
  CHECK(test::contains(test::error_of([&] { (void)io::layer_config<Layer<expert::SwiGLU, gate::TopK, F>>(options); }),
                       "expected expert SwiGLU"));
}
