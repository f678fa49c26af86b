// Results do not depend on the thread count: the same bits on 1, 2, 3 and 7 threads, at depth 1
// and 2, for every gate family, on cases large enough that the CPU backend splits every GEMM
// (the gates', the experts', their weight gradients), every per-token gate loop and every
// per-row pass across the threads. A build without OpenMP runs every thread count on one
// thread, so this program exits 77 (Meson: SKIP) there instead of passing.

#define DOCTEST_CONFIG_IMPLEMENT
#include "support.hpp"

#include <cstdio>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace moe;
using moe::test::Matrix;

namespace {

constexpr int kThreadCounts[] = {1, 2, 3, 7};
// 2048 tokens: the gate's per-token loops run in chunks of Cpu::kItemsPerThread (256), so 8
// chunks feed 7 threads; with d = 32, h = 64 and k = 2 every GEMM has far more than the
// backend's kMinParallelMultiplyAdds and at least 7 row or column blocks.
constexpr Index kTokens = 2048, kD = 32, kN = 16, kH = 64;

// Everything one training step produces, on the host.
template <class S>
struct Snapshot {
  std::vector<Matrix<S>> tensors;  // y, dx, then every parameter's gradient
  std::vector<std::string> names;
  std::vector<S> numbers;  // losses, importance, load
};

template <class L>
Snapshot<typename L::Scalar> train_step(typename L::Config config, int threads) {
  using S = typename L::Scalar;
  config.threads = threads;
  L layer(config);
  test::randomize_parameters(layer, 21, 0.5);
  const auto x = test::random_matrix<S>(kTokens, kD, 22);
  const auto dy = test::random_matrix<S>(kTokens, kD, 23);
  Rng rng(24);
  (void)layer.forward(x.view(), Mode::train, rng);  // a second step, to exercise the counter
  const auto f = layer.forward(x.view(), Mode::train, rng);
  layer.zero_grad();
  const auto b = layer.backward(f, dy.view(), S(0.7));
  Snapshot<S> s;
  auto keep = [&](const std::string& name, ConstMatrixView<S> v) {
    Matrix<S> m(v.rows, v.cols);
    backend::cpu::eigen(m.view()) = backend::cpu::eigen(v);
    s.tensors.push_back(std::move(m));
    s.names.push_back(name);
  };
  keep("y", f.y());
  keep("dx", b.dx.view());
  for (const auto& p : layer.parameters()) keep("gradient of " + p.name, ConstMatrixView<S>(p.grad));
  const auto& st = f.stats();
  s.numbers = {st.loss, st.loss_importance, st.loss_load, st.loss_aux, st.loss_z};
  s.numbers.insert(s.numbers.end(), st.importance.begin(), st.importance.end());
  s.numbers.insert(s.numbers.end(), st.load.begin(), st.load.end());
  return s;
}

template <class L>
void check_thread_counts(const typename L::Config& config) {
  using S = typename L::Scalar;
  const Snapshot<S> one = train_step<L>(config, 1);
  for (const int threads : kThreadCounts) {
    if (threads == 1) continue;
    CAPTURE(threads);
    const Snapshot<S> many = train_step<L>(config, threads);
    REQUIRE(many.names == one.names);
    for (std::size_t i = 0; i < one.tensors.size(); ++i) {
      INFO(one.names[i]);
      CHECK(test::same_bits(one.tensors[i].view(), many.tensors[i].view()));
    }
    REQUIRE(many.numbers.size() == one.numbers.size());
    CHECK(std::memcmp(one.numbers.data(), many.numbers.data(), one.numbers.size() * sizeof(S)) == 0);
  }
}

template <class Gate>
typename GateAtDepth<Gate, 2>::Config two_levels(typename Gate::Config first, typename Gate::Config second) {
  typename GateAtDepth<Gate, 2>::Config c{};
  c.levels = {{{.branching = 4, .gate = first}, {.branching = kN / 4, .gate = second}}};
  return c;
}

}  // namespace

TEST_CASE("OpenMP runs the thread counts this program compares") {
#if defined(_OPENMP)
  for (const int threads : kThreadCounts) {
    int seen = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      seen = omp_get_num_threads();
    }
    INFO("OpenMP gave ", seen, " threads where ", threads, " were asked (OMP_THREAD_LIMIT? OMP_DYNAMIC?)");
    CHECK(seen == threads);
  }
#endif
}

TEST_CASE_TEMPLATE("depth 1, noisy top-k, ReLU experts with biases: the same bits on 1, 2, 3 and 7 threads", S, float,
                   double) {
  using L = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<S>>;
  check_thread_counts<L>({.d_model = kD,
                          .n_experts = kN,
                          .expert = {.hidden = kH, .bias = true},
                          .gate = {.k = 2, .w_z = 1e-2},
                          .seed = 5});
}

TEST_CASE("depth 1, every other gate, SwiGLU and shared experts: the same bits on 1, 2, 3 and 7 threads") {
  using S = float;
  using Cpu = backend::Cpu<S>;
  SUBCASE("TopK, SwiGLU, a shared expert") {
    check_thread_counts<Layer<expert::SwiGLU, gate::TopK, Cpu>>(
        {.d_model = kD, .n_experts = kN, .expert = {.hidden = kH}, .gate = {.k = 2, .w_z = 1e-2}, .shared_experts = 1});
  }
  SUBCASE("Switch with dropped tokens") {
    check_thread_counts<Layer<expert::FeedForward, gate::Switch, Cpu>>(
        {.d_model = kD, .n_experts = kN, .expert = {.hidden = kH}, .gate = {.capacity_factor = 0.8, .w_z = 1e-2}});
  }
  SUBCASE("dense Softmax") {
    check_thread_counts<Layer<expert::FeedForward, gate::Softmax, Cpu>>(
        {.d_model = kD, .n_experts = 4, .expert = {.hidden = kH}, .gate = {.w_z = 1e-2, .init_scale = 1.0}});
  }
  SUBCASE("ExpertChoice") {
    check_thread_counts<Layer<expert::SwiGLU, gate::ExpertChoice, Cpu>>(
        {.d_model = kD, .n_experts = kN, .expert = {.hidden = kH}, .gate = {.capacity_factor = 2.0, .w_z = 1e-2}});
  }
  SUBCASE("SigmoidBias with group-limited selection") {
    check_thread_counts<Layer<expert::FeedForward, gate::SigmoidBias, Cpu>>(
        {.d_model = kD,
         .n_experts = kN,
         .expert = {.hidden = kH},
         .gate = {.k = 4, .expert_groups = 4, .top_groups = 2, .bias_rate = 1e-2}});
  }
}

TEST_CASE_TEMPLATE("depth 2, noisy top-k at both levels: the same bits on 1, 2, 3 and 7 threads", S, float, double) {
  using L = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<S>, 2>;
  typename L::Config c{.d_model = kD, .n_experts = kN, .expert = {.hidden = kH, .bias = true}, .seed = 6};
  c.gate = two_levels<gate::NoisyTopK>({.k = 2}, {.k = 2, .w_z = 1e-2});
  c.shared_experts = 1;
  check_thread_counts<L>(c);
}

TEST_CASE("depth 2, Switch and ExpertChoice at both levels: the same bits on 1, 2, 3 and 7 threads") {
  using Cpu = backend::Cpu<float>;
  SUBCASE("Switch with dropped tokens") {
    using L = Layer<expert::SwiGLU, gate::Switch, Cpu, 2>;
    typename L::Config c{.d_model = kD, .n_experts = kN, .expert = {.hidden = kH}};
    c.gate = two_levels<gate::Switch>({.capacity_factor = 0.9, .w_z = 1e-2}, {.capacity_factor = 0.8});
    check_thread_counts<L>(c);
  }
  SUBCASE("ExpertChoice") {
    using L = Layer<expert::FeedForward, gate::ExpertChoice, Cpu, 2>;
    typename L::Config c{.d_model = kD, .n_experts = kN, .expert = {.hidden = kH}};
    c.gate = two_levels<gate::ExpertChoice>({.capacity_factor = 2.0}, {.capacity_factor = 1.5, .w_z = 1e-2});
    check_thread_counts<L>(c);
  }
}

int main(int argc, char** argv) {
#if !defined(_OPENMP)
  (void)argc;
  (void)argv;
  std::puts("SKIP: this program was built without OpenMP, so every thread count would run on one thread and "
            "the comparison would check nothing");
  return 77;
#else
  doctest::Context context(argc, argv);
  return context.run();
#endif
}
