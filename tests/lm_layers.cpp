// The language-model layers of examples/lm/layers.hpp: every parameter and input gradient
// against central finite differences in double, the LSTM's carried state, the embedding's
// summation order, the output layer's loss and probabilities, and dropout's mask.

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../examples/lm/layers.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;

namespace {

using B = backend::Cpu<double>;

constexpr double kBound = 1e-6;  // relative error of a gradient against central differences
constexpr double kStep = 1e-6;

// The relative error of analytic against central differences of objective over the count
// values at value (each restored after its probes), and the norm of the numeric gradient.
struct Difference {
  double error = 0;
  double norm = 0;
};

Difference compare(const double* analytic, double* value, Index count, const std::function<double()>& objective) {
  std::vector<double> a, numeric;
  double norm = 0;
  for (Index i = 0; i < count; ++i) {
    const double keep = value[i];
    value[i] = keep + kStep;
    const double up = objective();
    value[i] = keep - kStep;
    const double down = objective();
    value[i] = keep;
    a.push_back(analytic[i]);
    numeric.push_back((up - down) / (2 * kStep));
    norm += numeric.back() * numeric.back();
  }
  return {test::relative_error(a, numeric), std::sqrt(norm)};
}

void check_difference(const std::string& name, const Difference& d) {
  INFO(name, ": relative error ", d.error, ", gradient norm ", d.norm);
  CHECK(d.error < kBound);
  CHECK(d.norm > 0);  // the quantity takes part in the objective
  MESSAGE(name, ": relative error ", d.error);
}

// sum over the elements of a .* r, in double.
double dot(ConstMatrixView<double> a, ConstMatrixView<double> r) {
  double s = 0;
  for (Index i = 0; i < a.rows; ++i)
    for (Index j = 0; j < a.cols; ++j) s += a(i, j) * r(i, j);
  return s;
}

template <class L>
void randomize(L& layer, std::uint64_t seed, double scale) {
  std::uint64_t s = seed;
  for (auto& p : layer.parameters()) test::fill_uniform(p.value, ++s * 7919, -scale, scale);
}

template <class L>
void zero_grads(L& layer) {
  for (auto& p : layer.parameters()) backend::cpu::eigen(p.grad).setZero();
}

template <class S>
Matrix<S> copy_of(ConstMatrixView<S> v) {
  Matrix<S> m(v.rows, v.cols);
  backend::cpu::eigen(m.view()) = backend::cpu::eigen(v);
  return m;
}

}  // namespace

TEST_CASE("lm::Embedding: rows gathered, weight gradient against finite differences") {
  using E = lm::Embedding<B>;
  B::Context ctx;
  const Index vocab = 6, d = 3;
  E emb({.vocab = vocab, .d = d}, 5, "embedding");
  const auto params = emb.parameters();
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "embedding.weight");
  CHECK(params[0].shape == std::vector<Index>{vocab, d});
  for (Index i = 0; i < params[0].size(); ++i) CHECK(std::abs(params[0].value.data[i]) <= 0.1);

  const std::vector<Index> tokens{3, 1, 3, 0, 5, 3, 1, 0, 3};  // 2 and 4 unused
  const auto count = static_cast<Index>(tokens.size());
  Matrix<double> out(count, d);
  emb.forward(ctx, tokens.data(), count, out.view());
  for (Index i = 0; i < count; ++i)
    for (Index c = 0; c < d; ++c) CHECK(out(i, c) == params[0].value(tokens[static_cast<std::size_t>(i)], c));

  const auto r = test::random_matrix<double>(count, d, 21);
  zero_grads(emb);
  emb.backward(ctx, tokens.data(), count, r.view());
  const Matrix<double> grad = copy_of(ConstMatrixView<double>(params[0].grad));
  auto objective = [&] {
    emb.forward(ctx, tokens.data(), count, out.view());
    return dot(out.view(), r.view());
  };
  check_difference("embedding.weight", compare(grad.data(), params[0].value.data, params[0].size(), objective));

  // Unused words get no gradient; a used word's row is the sum of its positions' rows, added one
  // at a time in ascending position order onto the gradient already there.
  for (Index c = 0; c < d; ++c) {
    CHECK(grad(2, c) == 0.0);
    CHECK(grad(4, c) == 0.0);
  }
  for (Index v = 0; v < vocab; ++v)
    for (Index c = 0; c < d; ++c) {
      double acc = 0.0;
      for (Index i = 0; i < count; ++i)
        if (tokens[static_cast<std::size_t>(i)] == v) acc += r(i, c);
      CHECK(test::same_bits(ConstMatrixView<double>{&grad(v, c), 1, 1}, ConstMatrixView<double>{&acc, 1, 1}));
    }

  // backward adds: a second call doubles the gradient.
  emb.backward(ctx, tokens.data(), count, r.view());
  for (Index i = 0; i < grad.size(); ++i) CHECK(params[0].grad.data[i] == 2 * grad[i]);
}

TEST_CASE("lm::Embedding: the gradient of a long run of one word is the ordered sum, on any thread count") {
  using E = lm::Embedding<B>;
  const Index vocab = 50, d = 4, count = 700;
  std::vector<Index> tokens(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) tokens[static_cast<std::size_t>(i)] = (i * 7) % 3 == 0 ? 17 : (i * 13) % vocab;
  const auto r = test::random_matrix<double>(count, d, 8);
  std::vector<Matrix<double>> grads;
  for (const int threads : {1, 2}) {
    auto ctx = make_context<B>(threads);
    E emb({.vocab = vocab, .d = d}, 1);
    emb.backward(ctx, tokens.data(), count, r.view());
    grads.push_back(copy_of(ConstMatrixView<double>(emb.parameters()[0].grad)));
  }
  CHECK(test::same_bits(ConstMatrixView<double>(grads[0].view()), ConstMatrixView<double>(grads[1].view())));
  for (Index c = 0; c < d; ++c) {
    double acc = 0.0;
    for (Index i = 0; i < count; ++i)
      if (tokens[static_cast<std::size_t>(i)] == 17) acc += r(i, c);
    CHECK(grads[0](17, c) == acc);
  }
}

TEST_CASE("lm::Embedding: a word id outside the vocabulary is refused") {
  using E = lm::Embedding<B>;
  B::Context ctx;
  E emb({.vocab = 6, .d = 2}, 1);
  const std::vector<Index> tokens{0, 6, 1};
  Matrix<double> out(3, 2);
  const std::string message = test::error_of([&] { emb.forward(ctx, tokens.data(), 3, out.view()); });
  CHECK(test::contains(message, "moe::lm::Embedding: tokens[1] = 6, expected a word id in [0, 6)"));
  Matrix<double> wrong(3, 3);
  CHECK(test::contains(test::error_of([&] { emb.forward(ctx, tokens.data(), 1, wrong.view()); }),
                       "out is 3 x 3, expected 1 x 2"));
}

TEST_CASE("lm::Lstm: parameters, names and the forget-gate bias") {
  using L = lm::Lstm<B>;
  L lstm({.d_in = 3, .d_h = 4}, 9, "lstm1");
  const auto params = lstm.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "lstm1.w");
  CHECK(params[0].shape == std::vector<Index>{7, 16});
  CHECK(params[1].name == "lstm1.b");
  CHECK(params[1].shape == std::vector<Index>{16});
  for (Index i = 0; i < params[0].size(); ++i) CHECK(std::abs(params[0].value.data[i]) <= 0.5);
  for (Index k = 0; k < 16; ++k) CHECK(params[1].value.data[k] == (k >= 4 && k < 8 ? 1.0 : 0.0));
  // The same seed and name give the same values; another name gives others.
  L same({.d_in = 3, .d_h = 4}, 9, "lstm1"), other({.d_in = 3, .d_h = 4}, 9, "lstm2");
  CHECK(test::same_bits(ConstMatrixView<double>(same.parameters()[0].value), ConstMatrixView<double>(params[0].value)));
  CHECK(
      !test::same_bits(ConstMatrixView<double>(other.parameters()[0].value), ConstMatrixView<double>(params[0].value)));
}

TEST_CASE("lm::Lstm: dx, W and b against finite differences, 4 steps, batch 2, non-zero initial state") {
  using L = lm::Lstm<B>;
  B::Context ctx;
  const Index d_in = 3, d_h = 4, steps = 4, batch = 2, n = steps * batch;
  L lstm({.d_in = d_in, .d_h = d_h}, 3, "lstm");
  randomize(lstm, 3, 0.8);
  auto x = test::random_matrix<double>(n, d_in, 31);
  const auto h0 = test::random_matrix<double>(batch, d_h, 32, -0.7, 0.7);
  const auto c0 = test::random_matrix<double>(batch, d_h, 33, -1.5, 1.5);
  const auto r = test::random_matrix<double>(n, d_h, 34);
  Matrix<double> h_out(n, d_h);
  L::Saved saved;
  auto run = [&] {
    L::State state;
    state.h = h0;
    state.c = c0;
    lstm.forward(ctx, x.view(), steps, batch, state, h_out.view(), saved);
  };
  auto objective = [&] {
    run();
    return dot(h_out.view(), r.view());
  };
  zero_grads(lstm);
  run();
  Matrix<double> dx(n, d_in);
  lstm.backward(ctx, x.view(), steps, batch, saved, r.view(), dx.view());
  const auto params = lstm.parameters();
  const Matrix<double> gw = copy_of(ConstMatrixView<double>(params[0].grad));
  const Matrix<double> gb = copy_of(ConstMatrixView<double>(params[1].grad));
  check_difference("x", compare(dx.data(), x.data(), x.size(), objective));
  check_difference("lstm.w", compare(gw.data(), params[0].value.data, params[0].size(), objective));
  check_difference("lstm.b", compare(gb.data(), params[1].value.data, params[1].size(), objective));

  // Each gate's block of b on its own, so an error in one gate is not hidden by the others.
  const char* gate_names[] = {"i", "f", "g", "o"};
  for (Index g = 0; g < 4; ++g)
    check_difference(std::string("lstm.b gate ") + gate_names[g],
                     compare(gb.data() + g * d_h, params[1].value.data + g * d_h, d_h, objective));

  // backward adds into the gradients; an empty dx skips the input gradient.
  run();
  lstm.backward(ctx, x.view(), steps, batch, saved, r.view(), MatrixView<double>{});
  for (Index i = 0; i < gw.size(); ++i) CHECK(params[0].grad.data[i] == doctest::Approx(2 * gw[i]).epsilon(1e-12));
  for (Index i = 0; i < gb.size(); ++i) CHECK(params[1].grad.data[i] == doctest::Approx(2 * gb[i]).epsilon(1e-12));
}

TEST_CASE("lm::Lstm: the state carried over two calls of 2 steps equals one call of 4 steps") {
  using L = lm::Lstm<B>;
  B::Context ctx;
  const Index d_in = 3, d_h = 5, batch = 2, n = 4 * batch;
  L lstm({.d_in = d_in, .d_h = d_h}, 4);
  randomize(lstm, 4, 0.7);
  const auto x = test::random_matrix<double>(n, d_in, 41);
  const auto h0 = test::random_matrix<double>(batch, d_h, 42);
  const auto c0 = test::random_matrix<double>(batch, d_h, 43);
  L::Saved saved;

  L::State whole;
  whole.h = h0;
  whole.c = c0;
  Matrix<double> h_whole(n, d_h);
  lstm.forward(ctx, x.view(), 4, batch, whole, h_whole.view(), saved);

  L::State split;
  split.h = h0;
  split.c = c0;
  Matrix<double> h_split(n, d_h);
  lstm.forward(ctx, x.view().block_rows(0, 2 * batch), 2, batch, split, h_split.view().block_rows(0, 2 * batch), saved);
  lstm.forward(ctx, x.view().block_rows(2 * batch, 2 * batch), 2, batch, split,
               h_split.view().block_rows(2 * batch, 2 * batch), saved);

  double worst = 0;
  for (Index i = 0; i < h_whole.size(); ++i) worst = std::max(worst, std::abs(h_whole[i] - h_split[i]));
  for (Index i = 0; i < whole.c.size(); ++i) {
    worst = std::max(worst, std::abs(whole.c[i] - split.c[i]));
    worst = std::max(worst, std::abs(whole.h[i] - split.h[i]));
  }
  INFO("largest difference ", worst);
  CHECK(worst <= 1e-12);
  // The carried state is the last step's h.
  for (Index b = 0; b < batch; ++b)
    for (Index j = 0; j < d_h; ++j) CHECK(whole.h(b, j) == h_whole(3 * batch + b, j));

  // An empty (fresh or reset) state is zeros.
  L::State fresh, zeros;
  zeros.h.resize(batch, d_h, 0.0);
  zeros.c.resize(batch, d_h, 0.0);
  Matrix<double> h_fresh(n, d_h), h_zeros(n, d_h);
  whole.reset();
  CHECK(whole.empty());
  lstm.forward(ctx, x.view(), 4, batch, whole, h_fresh.view(), saved);
  lstm.forward(ctx, x.view(), 4, batch, zeros, h_zeros.view(), saved);
  CHECK(test::same_bits(ConstMatrixView<double>(h_fresh.view()), ConstMatrixView<double>(h_zeros.view())));
}

TEST_CASE("lm::Lstm: shapes are checked at the call") {
  using L = lm::Lstm<B>;
  B::Context ctx;
  L lstm({.d_in = 3, .d_h = 4}, 1);
  L::State state;
  L::Saved saved;
  Matrix<double> x(6, 2), h(6, 4), dx(6, 3);
  CHECK(test::contains(test::error_of([&] { lstm.forward(ctx, x.view(), 3, 2, state, h.view(), saved); }),
                       "moe::lm::Lstm::forward: x is 6 x 2, expected 6 x 3"));
  Matrix<double> x3(6, 3);
  lstm.forward(ctx, x3.view(), 3, 2, state, h.view(), saved);
  CHECK(test::contains(test::error_of([&] { lstm.forward(ctx, x3.view(), 2, 3, state, h.view(), saved); }),
                       "state.h is 2 x 4, expected 3 x 4"));
  CHECK(test::contains(test::error_of([&] { lstm.backward(ctx, x3.view(), 2, 3, saved, h.view(), dx.view()); }),
                       "expected those of the forward that wrote saved: steps = 3, batch = 2"));
  CHECK(test::contains(test::error_of([] { L({.d_in = 3, .d_h = 0}, 1); }),
                       "moe::lm::Lstm: d_h = 0, expected at least 1"));
}

TEST_CASE("lm::Lstm: the float backend computes what the double one does") {
  const Index d_in = 3, d_h = 4, steps = 3, batch = 2, n = steps * batch;
  lm::Lstm<backend::Cpu<double>> ld({.d_in = d_in, .d_h = d_h}, 2);
  lm::Lstm<backend::Cpu<float>> lf({.d_in = d_in, .d_h = d_h}, 2);
  const auto xd = test::random_matrix<double>(n, d_in, 51);
  const auto xf = test::random_matrix<float>(n, d_in, 51);
  Matrix<double> hd(n, d_h), dxd(n, d_in);
  Matrix<float> hf(n, d_h), dxf(n, d_in);
  backend::Cpu<double>::Context cd;
  backend::Cpu<float>::Context cf;
  decltype(ld)::State sd;
  decltype(lf)::State sf;
  decltype(ld)::Saved vd;
  decltype(lf)::Saved vf;
  ld.forward(cd, xd.view(), steps, batch, sd, hd.view(), vd);
  lf.forward(cf, xf.view(), steps, batch, sf, hf.view(), vf);
  ld.backward(cd, xd.view(), steps, batch, vd, hd.view(), dxd.view());
  lf.backward(cf, xf.view(), steps, batch, vf, hf.view(), dxf.view());
  for (Index i = 0; i < hd.size(); ++i) CHECK(hf[i] == doctest::Approx(hd[i]).epsilon(1e-5).scale(1e-5));
  for (Index i = 0; i < dxd.size(); ++i) CHECK(dxf[i] == doctest::Approx(dxd[i]).epsilon(1e-5).scale(1e-5));
}

TEST_CASE("lm::SoftmaxCrossEntropy: the loss, dh, W and b against finite differences") {
  using L = lm::SoftmaxCrossEntropy<B>;
  B::Context ctx;
  const Index n = 5, d = 4, vocab = 7;
  L out({.d = d, .vocab = vocab}, 6, "softmax");
  const auto params = out.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "softmax.weight");
  CHECK(params[0].shape == std::vector<Index>{d, vocab});
  CHECK(params[1].name == "softmax.bias");
  CHECK(params[1].shape == std::vector<Index>{vocab});
  for (Index c = 0; c < vocab; ++c) CHECK(params[1].value.data[c] == 0.0);
  randomize(out, 6, 1.0);
  auto h = test::random_matrix<double>(n, d, 61);
  const std::vector<Index> targets{2, 0, 6, 2, 5};
  L::Saved saved;

  // The loss against the definition, from the probabilities.
  const double loss = out.forward(ctx, h.view(), targets.data(), saved);
  Matrix<double> probs(n, vocab);
  out.probabilities(ctx, h.view(), probs.view());
  double expected = 0;
  for (Index r = 0; r < n; ++r) {
    double total = 0;
    for (Index c = 0; c < vocab; ++c) total += probs(r, c);
    CHECK(total == doctest::Approx(1.0).epsilon(1e-14));
    expected -= std::log(probs(r, targets[static_cast<std::size_t>(r)]));
  }
  CHECK(loss == doctest::Approx(expected / static_cast<double>(n)).epsilon(1e-13));
  // A low temperature sharpens the distribution onto the largest logit.
  Matrix<double> logits(n, vocab), cold(n, vocab);
  out.logits(ctx, h.view(), logits.view());
  out.probabilities(ctx, h.view(), cold.view(), 1e-3);
  for (Index r = 0; r < n; ++r) {
    Index best = 0;
    for (Index c = 1; c < vocab; ++c)
      if (logits(r, c) > logits(r, best)) best = c;
    CHECK(cold(r, best) > 0.99);
  }

  zero_grads(out);
  out.forward(ctx, h.view(), targets.data(), saved);
  Matrix<double> dh(n, d);
  out.backward(ctx, h.view(), targets.data(), saved, 1.0, dh.view());
  const Matrix<double> gw = copy_of(ConstMatrixView<double>(params[0].grad));
  const Matrix<double> gb = copy_of(ConstMatrixView<double>(params[1].grad));
  auto objective = [&] { return static_cast<double>(out.forward(ctx, h.view(), targets.data(), saved)); };
  check_difference("h", compare(dh.data(), h.data(), h.size(), objective));
  check_difference("softmax.weight", compare(gw.data(), params[0].value.data, params[0].size(), objective));
  check_difference("softmax.bias", compare(gb.data(), params[1].value.data, params[1].size(), objective));

  // scale multiplies every gradient; the weight gradients add.
  out.forward(ctx, h.view(), targets.data(), saved);
  Matrix<double> dh3(n, d);
  out.backward(ctx, h.view(), targets.data(), saved, 3.0, dh3.view());
  for (Index i = 0; i < dh.size(); ++i) CHECK(dh3[i] == doctest::Approx(3 * dh[i]).epsilon(1e-13));
  for (Index i = 0; i < gw.size(); ++i) CHECK(params[0].grad.data[i] == doctest::Approx(4 * gw[i]).epsilon(1e-13));
  for (Index i = 0; i < gb.size(); ++i) CHECK(params[1].grad.data[i] == doctest::Approx(4 * gb[i]).epsilon(1e-13));
}

TEST_CASE("lm::SoftmaxCrossEntropy: large logits do not overflow; bad targets are refused") {
  using L = lm::SoftmaxCrossEntropy<B>;
  B::Context ctx;
  L out({.d = 2, .vocab = 3}, 1);
  randomize(out, 1, 400.0);
  const auto h = test::random_matrix<double>(2, 2, 71, 1.0, 2.0);
  const std::vector<Index> targets{1, 2};
  L::Saved saved;
  const double loss = out.forward(ctx, h.view(), targets.data(), saved);
  CHECK(is_finite(loss));
  CHECK(loss >= 0.0);
  const std::vector<Index> bad{1, -1};
  CHECK(test::contains(test::error_of([&] { out.forward(ctx, h.view(), bad.data(), saved); }),
                       "moe::lm::SoftmaxCrossEntropy::forward: targets[1] = -1, expected a word id in [0, 3)"));
}

TEST_CASE("lm::Dropout: p = 0 is the identity, the mask is shared with backward, the expectation kept") {
  using D = lm::Dropout<B>;
  B::Context ctx;
  const Index rows = 200, cols = 500;
  const double p = 0.3;

  auto x = test::random_matrix<double>(rows, cols, 81);
  const Matrix<double> x0 = x;
  D::apply(ctx, x.view(), 0.0, 1, 0);
  CHECK(test::same_bits(ConstMatrixView<double>(x.view()), ConstMatrixView<double>(x0.view())));

  D::apply(ctx, x.view(), p, 7, 3);
  Matrix<double> g(rows, cols, 1.0);
  D::backward(ctx, g.view(), p, 7, 3);
  const double scale = 1.0 / (1.0 - p);
  double kept = 0, mean = 0;
  bool consistent = true;
  for (Index i = 0; i < x.size(); ++i) {
    const bool k = D::kept(7, 3, i, p);
    consistent = consistent && g[i] == (k ? scale : 0.0) && x[i] == (k ? x0[i] * scale : 0.0);
    kept += k ? 1 : 0;
    mean += g[i];
  }
  CHECK(consistent);
  kept /= static_cast<double>(x.size());
  mean /= static_cast<double>(x.size());
  CHECK(std::abs(kept - (1.0 - p)) < 0.01);
  CHECK(std::abs(mean - 1.0) < 0.015);

  // Another call or another seed draws another mask.
  Matrix<double> other_call(rows, cols, 1.0), other_seed(rows, cols, 1.0);
  D::apply(ctx, other_call.view(), p, 7, 4);
  D::apply(ctx, other_seed.view(), p, 8, 3);
  Index differ_call = 0, differ_seed = 0;
  for (Index i = 0; i < g.size(); ++i) {
    differ_call += other_call[i] != g[i] ? 1 : 0;
    differ_seed += other_seed[i] != g[i] ? 1 : 0;
  }
  CHECK(differ_call > x.size() / 10);
  CHECK(differ_seed > x.size() / 10);

  // The mask follows the logical element, not the memory: a strided view gets the same one.
  Matrix<double> wide(4, 10, 1.0), narrow(4, 5, 1.0);
  D::apply(ctx, MatrixView<double>{wide.data(), 4, 5, 10}, 0.5, 2, 9);
  D::apply(ctx, narrow.view(), 0.5, 2, 9);
  for (Index r = 0; r < 4; ++r)
    for (Index c = 0; c < 10; ++c) CHECK(wide(r, c) == (c < 5 ? narrow(r, c) : 1.0));

  CHECK(test::contains(test::error_of([&] { D::apply(ctx, x.view(), 1.0, 1, 0); }),
                       "moe::lm::Dropout: p = 1, expected 0 <= p < 1"));
}
