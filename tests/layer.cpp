// The layer against a naive dense evaluation, the routing, inference mode and determinism.

#include <set>

#include "support.hpp"

using namespace moe;
using moe::test::Dense;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;
using NoisyLayer = Layer<expert::FeedForward, gate::NoisyTopK, B>;

// MATH.md 2 written out directly: dense gates [T x n] and the smooth load, from the parameters.
struct NaiveGate {
  Dense<double> gates;
  std::vector<double> load;
};

NaiveGate naive_noisy_top_k(NoisyLayer& layer, const Matrix<double>& x, const Matrix<double>& z, Index k,
                            double eps_noise) {
  const auto params = layer.parameters();
  const Dense<double> xd = test::to_dense(x.view());
  const Dense<double> clean = xd * test::to_dense(ConstMatrixView<double>(params[0].value));
  const Dense<double> raw = xd * test::to_dense(ConstMatrixView<double>(params[1].value));
  const Index t_count = x.rows(), n = clean.cols();
  NaiveGate out{Dense<double>::Zero(t_count, n), std::vector<double>(static_cast<std::size_t>(n), 0.0)};
  for (Index t = 0; t < t_count; ++t) {
    std::vector<double> h(static_cast<std::size_t>(n)), sigma(static_cast<std::size_t>(n));
    std::vector<Index> order(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      sigma[i] = std::log1p(std::exp(raw(t, i))) + eps_noise;
      h[i] = clean(t, i) + z(t, i) * sigma[i];
      order[i] = i;
    }
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return h[a] > h[b]; });
    double sum = 0;
    for (Index j = 0; j < k; ++j) sum += std::exp(h[order[j]]);
    for (Index j = 0; j < k; ++j) out.gates(t, order[j]) = std::exp(h[order[j]]) / sum;
    for (Index i = 0; i < n; ++i) {
      const bool kept = std::find(order.begin(), order.begin() + k, i) != order.begin() + k;
      const double threshold = kept ? h[order[k]] : h[order[k - 1]];
      out.load[i] += 0.5 * std::erfc(-(clean(t, i) - threshold) / sigma[i] / std::sqrt(2.0));
    }
  }
  return out;
}

// sum_i G(x)_i E_i(x), every expert evaluated on every token.
Dense<double> naive_mixture(NoisyLayer& layer, const Matrix<double>& x, const Dense<double>& gates, bool bias) {
  const auto params = layer.parameters();
  const auto* w1 = test::find_parameter<NoisyLayer>(params, "experts.w1");
  const auto* w2 = test::find_parameter<NoisyLayer>(params, "experts.w2");
  const Index n = w1->shape[0], d = w1->shape[1], h = w1->shape[2];
  const Dense<double> xd = test::to_dense(x.view());
  Dense<double> y = Dense<double>::Zero(x.rows(), d);
  for (Index e = 0; e < n; ++e) {
    Dense<double> pre = xd * test::to_dense(ConstMatrixView<double>(w1->value.block_rows(e * d, d)));
    if (bias)
      pre.rowwise() +=
          test::to_dense(
              ConstMatrixView<double>(test::find_parameter<NoisyLayer>(params, "experts.b1")->value.block_rows(e, 1)))
              .row(0);
    Dense<double> out = pre.cwiseMax(0.0) * test::to_dense(ConstMatrixView<double>(w2->value.block_rows(e * h, h)));
    if (bias)
      out.rowwise() +=
          test::to_dense(
              ConstMatrixView<double>(test::find_parameter<NoisyLayer>(params, "experts.b2")->value.block_rows(e, 1)))
              .row(0);
    y += gates.col(e).asDiagonal() * out;
  }
  return y;
}

}  // namespace

TEST_CASE("the layer equals a naive dense evaluation of sum_i G(x)_i E_i(x) (MATH.md 1-3)") {
  // eps_noise at its default and away from it: the noise floor enters H and the smooth load.
  for (const double eps_noise : {1e-2, 0.3}) {
    for (const bool bias : {false, true}) {
      for (const Index k : {1, 2, 3}) {
        CAPTURE(eps_noise);
        CAPTURE(bias);
        CAPTURE(k);
        NoisyLayer layer({.d_model = 5,
                          .n_experts = 8,
                          .expert = {.hidden = 7, .bias = bias},
                          .gate = {.k = k, .eps_noise = eps_noise},
                          .seed = 3});
        test::randomize_parameters(layer, 11);
        const auto x = test::random_matrix<double>(23, 5, 4);
        Matrix<double> z(23, 8);
        test::fill_normal(z.view(), 9);
        const auto f = layer.forward(x.view(), Mode::train, Noise<double>(z.view()));
        const NaiveGate ref = naive_noisy_top_k(layer, x, z, k, eps_noise);

        Dense<double> gates = Dense<double>::Zero(23, 8);
        for (Index t = 0; t < 23; ++t)
          for (Index j = 0; j < k; ++j) gates(t, f.expert_index()(t, j)) = f.gates()(t, j);
        CHECK((gates - ref.gates).cwiseAbs().maxCoeff() < 1e-14);
        for (std::size_t i = 0; i < 8; ++i) CHECK(f.stats().load[i] == doctest::Approx(ref.load[i]).epsilon(1e-12));
        const Dense<double> y_ref = naive_mixture(layer, x, ref.gates, bias);
        CHECK((test::to_dense(f.y()) - y_ref).cwiseAbs().maxCoeff() < 1e-12);
      }
    }
  }
}

TEST_CASE("gates are non-negative, sum to 1, with exactly k distinct experts per token") {
  for (const Index k : {1, 2, 4, 16}) {
    CAPTURE(k);
    NoisyLayer layer({.d_model = 6, .n_experts = 16, .expert = {.hidden = 4}, .gate = {.k = k}});
    test::randomize_parameters(layer, 2);
    const auto x = test::random_matrix<double>(40, 6, 1);
    Rng rng(5);
    for (const Mode mode : {Mode::train, Mode::inference}) {
      const auto f = layer.forward(x.view(), mode, rng);
      REQUIRE(f.gates().cols == k);
      for (Index t = 0; t < 40; ++t) {
        double sum = 0;
        std::set<Index> experts;
        for (Index j = 0; j < k; ++j) {
          CHECK(f.gates()(t, j) >= 0.0);
          sum += f.gates()(t, j);
          experts.insert(f.expert_index()(t, j));
          CHECK(f.expert_index()(t, j) >= 0);
          CHECK(f.expert_index()(t, j) < 16);
        }
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-14));
        CHECK(static_cast<Index>(experts.size()) == k);
        if (k > 1) CHECK(f.gates()(t, 0) >= f.gates()(t, 1));  // slots in descending order
      }
      Index total = 0;
      for (const Index c : f.stats().tokens_per_expert) total += c;
      CHECK(total == 40 * k);
    }
  }
}

namespace {
// An expert that records which rows it is given: y = 2 x, no parameters of note.
std::vector<std::vector<std::vector<double>>> g_seen;  // [expert][call row][feature]

struct Recorder {
  struct Config {};
  static std::vector<expert::ParamSpec> parameters(const Config&, Index) { return {{"unused", 1, 1}}; }
  template <class S>
  static void forward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::Out<S> y) {
    const auto e = static_cast<std::size_t>(std::llround(w[0](0, 0)));
    for (Index r = 0; r < x.rows(); ++r) g_seen[e].push_back(std::vector<double>(x.row(r).begin(), x.row(r).end()));
    y = 2 * x;
  }
  template <class S>
  static void backward(const Config&, expert::Weights<S>, expert::In<S>, expert::In<S> dy, expert::Out<S> dx,
                       expert::Grads<S>) {
    dx = 2 * dy;
  }
};
}  // namespace

TEST_CASE("each expert sees exactly its routed rows, in token order, and nothing else (MATH.md 1)") {
  using L = Layer<expert::PerExpert<Recorder>, gate::NoisyTopK, B>;
  L layer({.d_model = 3, .n_experts = 6, .gate = {.k = 2}, .threads = 1});
  auto params = layer.parameters();
  test::randomize_parameters(layer, 8);
  auto* tag = test::find_parameter<L>(params, "experts.unused");
  for (Index e = 0; e < 6; ++e) tag->value.data[e] = static_cast<double>(e);  // each expert knows its index
  // Route everything away from expert 5 so one expert receives nothing.
  for (Index i = 0; i < 3; ++i) params[0].value(i, 5) = -50.0;
  const auto x = test::random_matrix<double>(30, 3, 12, 0.1, 1.0);
  g_seen.assign(6, {});
  const auto f = layer.forward(x.view(), Mode::inference);

  Index total = 0;
  for (Index e = 0; e < 6; ++e) {
    std::vector<std::vector<double>> expected;
    for (Index t = 0; t < 30; ++t)
      for (Index j = 0; j < 2; ++j)
        if (f.expert_index()(t, j) == e) expected.push_back({x(t, 0), x(t, 1), x(t, 2)});
    CAPTURE(e);
    CHECK(g_seen[static_cast<std::size_t>(e)] == expected);
    CHECK(static_cast<Index>(g_seen[static_cast<std::size_t>(e)].size()) ==
          f.stats().tokens_per_expert[static_cast<std::size_t>(e)]);
    total += static_cast<Index>(g_seen[static_cast<std::size_t>(e)].size());
  }
  CHECK(g_seen[5].empty());
  CHECK(total == 60);
  // y = sum_j g_j * 2x = 2x because the gates sum to 1.
  for (Index t = 0; t < 30; ++t)
    for (Index c = 0; c < 3; ++c) CHECK(f.y()(t, c) == doctest::Approx(2 * x(t, c)).epsilon(1e-14));
}

TEST_CASE("inference: no noise drawn, no NaN, the load is the count") {
  NoisyLayer layer({.d_model = 4, .n_experts = 8, .expert = {.hidden = 5}, .gate = {.k = 2}});
  test::randomize_parameters(layer, 3);
  const auto x = test::random_matrix<double>(20, 4, 6);
  Rng rng(1);
  const auto a = layer.forward(x.view(), Mode::inference, rng);
  CHECK(rng.step() == 0);
  const auto b = layer.forward(x.view(), Mode::inference);
  CHECK(test::same_bits(a.y(), b.y()));
  CHECK(a.stats().load_is_count);
  for (std::size_t i = 0; i < 8; ++i) CHECK(a.stats().load[i] == static_cast<double>(a.stats().tokens_per_expert[i]));
  for (Index i = 0; i < a.y().size(); ++i) CHECK(std::isfinite(a.y().data[i]));
  // A training forward draws one step and routes differently from inference.
  const auto c = layer.forward(x.view(), Mode::train, rng);
  CHECK(rng.step() == 1);
  CHECK_FALSE(c.stats().load_is_count);
  CHECK_FALSE(test::same_bits(a.y(), c.y()));
}

TEST_CASE("zero-initialized gates route by index ties at inference, at random in training (MATH.md 2)") {
  NoisyLayer layer({.d_model = 4, .n_experts = 8, .expert = {.hidden = 5}, .gate = {.k = 3}});
  const auto x = test::random_matrix<double>(50, 4, 6);
  const auto f = layer.forward(x.view(), Mode::inference);
  for (Index t = 0; t < 50; ++t)
    for (Index j = 0; j < 3; ++j) {
      CHECK(f.expert_index()(t, j) == j);
      CHECK(f.gates()(t, j) == doctest::Approx(1.0 / 3).epsilon(1e-15));
    }
  CHECK(f.stats().tokens_per_expert == std::vector<Index>{50, 50, 50, 0, 0, 0, 0, 0});
  Rng rng(4);
  const auto g = layer.forward(x.view(), Mode::train, rng);
  for (const Index c : g.stats().tokens_per_expert) CHECK(c > 0);  // 150 slots over 8 experts, all used
  // With zero weights the smooth load is the same for every expert on average: CV^2 small.
  CHECK(g.stats().cv2_load < 0.05);
}

TEST_CASE("dense softmax gate: every expert, gates sum to 1, load is T") {
  using L = Layer<expert::FeedForward, gate::Softmax, B>;
  L layer({.d_model = 4, .n_experts = 5, .expert = {.hidden = 3}, .gate = {.init_scale = 1.0}, .seed = 2});
  const auto x = test::random_matrix<double>(7, 4, 6);
  const auto f = layer.forward(x.view(), Mode::train);
  for (Index t = 0; t < 7; ++t) {
    double sum = 0;
    for (Index j = 0; j < 5; ++j) {
      CHECK(f.expert_index()(t, j) == j);
      CHECK(f.gates()(t, j) > 0.0);
      sum += f.gates()(t, j);
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-14));
  }
  CHECK(f.stats().load == std::vector<double>(5, 7.0));
  CHECK(f.stats().cv2_load == 0.0);
  CHECK(f.stats().cv2_importance > 0.0);
}

namespace {
template <class S>
struct Run {
  Matrix<S> y, dx;
  std::vector<Matrix<S>> grads;
  BalanceStats<S> stats;
};

template <class S>
Run<S> run_once(std::uint64_t seed, int threads, Index t_count) {
  using L = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<S>>;
  L layer({.d_model = 32,
           .n_experts = 16,
           .expert = {.hidden = 64, .bias = true},
           .gate = {.k = 2},
           .seed = seed,
           .threads = threads});
  test::randomize_parameters(layer, seed, 0.5);
  const auto x = test::random_matrix<S>(t_count, 32, seed + 1);
  const auto dy = test::random_matrix<S>(t_count, 32, seed + 2);
  Rng rng(seed);
  (void)layer.forward(x.view(), Mode::train, rng);  // a second step, to exercise the counter
  const auto f = layer.forward(x.view(), Mode::train, rng);
  const auto b = layer.backward(f, dy.view());
  Run<S> r;
  r.y.resize(f.y().rows, f.y().cols);
  typename backend::Cpu<S>::Context ctx;
  backend::Cpu<S>::copy(ctx, f.y(), r.y.view());
  r.dx = b.dx;
  for (const auto& p : layer.parameters()) {
    Matrix<S> g(p.grad.rows, p.grad.cols);
    backend::Cpu<S>::copy(ctx, ConstMatrixView<S>(p.grad), g.view());
    r.grads.push_back(g);
  }
  r.stats = f.stats();
  return r;
}

template <class S>
void check_same_bits(const Run<S>& a, const Run<S>& b) {
  CHECK(test::same_bits(a.y.view(), b.y.view()));
  CHECK(test::same_bits(a.dx.view(), b.dx.view()));
  REQUIRE(a.grads.size() == b.grads.size());
  for (std::size_t i = 0; i < a.grads.size(); ++i) CHECK(test::same_bits(a.grads[i].view(), b.grads[i].view()));
  CHECK(std::memcmp(a.stats.load.data(), b.stats.load.data(), a.stats.load.size() * sizeof(S)) == 0);
  CHECK(std::memcmp(a.stats.importance.data(), b.stats.importance.data(), a.stats.importance.size() * sizeof(S)) == 0);
  CHECK(std::memcmp(&a.stats.loss, &b.stats.loss, sizeof(S)) == 0);
}
}  // namespace

// Thread counts (1, 2, 3, 7): tests/determinism.cpp.
TEST_CASE_TEMPLATE("determinism: same seed, same bits; another seed, other bits", S, float, double) {
  const Run<S> one = run_once<S>(7, 2, 1500);
  const Run<S> again = run_once<S>(7, 2, 1500);
  check_same_bits(one, again);
  const Run<S> other = run_once<S>(8, 2, 1500);
  CHECK_FALSE(test::same_bits(one.y.view(), other.y.view()));
}

TEST_CASE("an empty batch is valid: empty output, zero losses") {
  NoisyLayer layer({.d_model = 4, .n_experts = 8, .expert = {.hidden = 5}, .gate = {.k = 2}});
  Matrix<double> x(0, 4), dy(0, 4);
  Rng rng(1);
  for (const Mode mode : {Mode::train, Mode::inference}) {
    const auto f = layer.forward(x.view(), mode, rng);
    CHECK(f.y().rows == 0);
    CHECK(f.y().cols == 4);
    CHECK(f.loss() == 0.0);
    CHECK(f.stats().cv2_load == 0.0);
    CHECK(f.stats().importance == std::vector<double>(8, 0.0));
    const auto b = layer.backward(f, dy.view());
    CHECK(b.dx.rows() == 0);
  }
  for (const auto& p : layer.parameters())
    for (Index i = 0; i < p.size(); ++i) CHECK(p.grad.data[i] == 0.0);
}

TEST_CASE("Eigen row-major matrices, maps and blocks pass as views without a copy") {
  NoisyLayer layer({.d_model = 3, .n_experts = 4, .expert = {.hidden = 2}, .gate = {.k = 1}});
  Dense<double> x = Dense<double>::Random(5, 3);
  Dense<double> wide = Dense<double>::Zero(5, 6);
  wide.leftCols(3) = x;
  Eigen::Ref<Dense<double>> left = wide.leftCols(3);  // a strided view: row stride 6
  const auto a = layer.forward(x, Mode::inference);
  const auto b = layer.forward(left, Mode::inference);
  CHECK(test::same_bits(a.y(), b.y()));
  // The views the layer receives point into the caller's storage, with its stride.
  const ConstMatrixView<double> vx = x, vleft = left;
  CHECK(vx.data == x.data());
  CHECK(vx.stride == 3);
  CHECK(vleft.data == wide.data());
  CHECK(vleft.rows == 5);
  CHECK(vleft.cols == 3);
  CHECK(vleft.stride == 6);
  Eigen::Map<const Dense<double>> map(x.data(), 5, 3);
  const ConstMatrixView<double> vmap = map;
  CHECK(vmap.data == x.data());
  const auto block = wide.middleCols(2, 3);
  const ConstMatrixView<double> vblock = block;
  CHECK(vblock.data == wide.data() + 2);
  CHECK(vblock.stride == 6);
  // A write through a view is seen by the caller: no copy was made on the way.
  MatrixView<double> writable = wide;
  writable(4, 5) = 42.0;
  CHECK(wide(4, 5) == 42.0);
}

TEST_CASE("the library's HostMatrix and Buffers pass as views: forward(x), backward(f, dy)") {
  NoisyLayer layer({.d_model = 3, .n_experts = 4, .expert = {.hidden = 2}, .gate = {.k = 2}});
  test::randomize_parameters(layer, 3);
  auto x = test::random_matrix<double>(5, 3, 1);
  const auto dy = test::random_matrix<double>(5, 3, 2);
  const auto by_view = layer.forward(x.view(), Mode::inference);
  const auto by_matrix = layer.forward(x, Mode::inference);  // a non-const HostMatrix
  const backend::HostMatrix<double>& cx = x;
  const auto by_const = layer.forward(cx, Mode::inference);  // a const one
  CHECK(test::same_bits(by_view.y(), by_matrix.y()));
  CHECK(test::same_bits(by_view.y(), by_const.y()));
  const auto grad_by_view = layer.backward(by_view, dy.view());
  const auto grad_by_matrix = layer.backward(by_matrix, dy);
  CHECK(test::same_bits(grad_by_view.dx.view(), grad_by_matrix.dx.view()));
  // No copy: the view points into the matrix; a backend Buffer (Backward::dx) converts too.
  const ConstMatrixView<double> v = cx;
  CHECK(v.data == x.data());
  CHECK(v.stride == 3);
  const MatrixView<double> writable = x;
  writable(0, 0) = 7.0;
  CHECK(x(0, 0) == 7.0);
  const ConstMatrixView<double> dx = grad_by_view.dx;
  CHECK(dx.data == grad_by_view.dx.data());
}

TEST_CASE("forward_into reuses a Forward's buffers and gives the same bits as a fresh forward") {
  NoisyLayer layer({.d_model = 6, .n_experts = 8, .expert = {.hidden = 5}, .gate = {.k = 2}});
  test::randomize_parameters(layer, 4);
  const auto x = test::random_matrix<double>(30, 6, 1);
  const auto dy = test::random_matrix<double>(30, 6, 2);
  Rng a(3), b(3);
  NoisyLayer::Forward reused;
  layer.forward_into(reused, x.view(), Mode::train, a);
  const double* y_storage = reused.y().data;
  for (int step = 0; step < 3; ++step) {
    layer.forward_into(reused, x.view(), Mode::train, a);
    (void)layer.forward(x.view(), Mode::train, b);
  }
  const auto fresh = layer.forward(x.view(), Mode::train, b);
  CHECK(reused.y().data == y_storage);  // no reallocation in steady state
  CHECK(test::same_bits(reused.y(), fresh.y()));
  const auto g1 = layer.backward(reused, dy.view());
  const auto g2 = layer.backward(fresh, dy.view());
  CHECK(test::same_bits(g1.dx.view(), g2.dx.view()));
  // backward_into reuses its Backward's dx storage and gives the same bits.
  NoisyLayer::Backward kept;
  layer.backward_into(kept, reused, dy.view());
  const double* dx_storage = kept.dx.data();
  layer.backward_into(kept, fresh, dy.view());
  CHECK(kept.dx.data() == dx_storage);
  CHECK(test::same_bits(ConstMatrixView<double>(kept.dx.view()), g1.dx.view()));
  // A rejected input leaves the previous result usable.
  const auto wide = test::random_matrix<double>(30, 7, 1);
  CHECK_THROWS_AS(layer.forward_into(reused, wide.view(), Mode::inference), Error);
  CHECK(reused.valid());
  CHECK(test::same_bits(reused.y(), fresh.y()));
}
