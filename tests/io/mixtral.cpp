// Mixtral import: a Hugging Face Mixtral-style MoE block, written here with the library's own
// safetensors writer under Hugging Face's names and layouts, loaded into
// Layer<SwiGLU, TopK>, against a hand-written reference of the block's math:
//   p = softmax(W_gate x) over all n, keep the top 2, renormalize over them,
//   y = sum over kept i of p_i * W2_i (silu(W1_i x) * (W3_i x)),   W1_i, W3_i: [h, d], W2_i: [d, h].

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "../support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/io/mixtral.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
constexpr Index d = 6, n = 5, h = 4, tokens = 9;
const std::string prefix = "model.layers.3.block_sparse_moe.";

struct Block {
  std::vector<double> gate;  // [n, d]
  std::vector<std::vector<double>> w1, w3, w2;

  explicit Block(std::uint64_t seed) {
    moe::CounterRandom r{seed};
    std::uint64_t i = 0;
    const auto fill = [&](Index count) {
      std::vector<double> v(static_cast<std::size_t>(count));
      for (auto& x : v) x = r.symmetric_uniform(i++, 1, 2);
      return v;
    };
    gate = fill(n * d);
    for (Index e = 0; e < n; ++e) {
      w1.push_back(fill(h * d));
      w3.push_back(fill(h * d));
      w2.push_back(fill(d * h));
    }
  }

  // The block as Hugging Face stores it, plus tensors of other modules a model file holds.
  moe::io::SafeTensors file(moe::io::Dtype dtype) const {
    moe::io::SafeTensorsWriter w;
    const auto add = [&](const std::string& name, std::vector<std::int64_t> shape, const std::vector<double>& v) {
      w.add(name, std::move(shape), std::span<const double>(v), dtype);
    };
    add("model.layers.3.self_attn.q_proj.weight", {d, d}, std::vector<double>(d * d, 0.25));
    add(prefix + "gate.weight", {n, d}, gate);
    for (Index e = 0; e < n; ++e) {
      const std::string p = prefix + "experts." + std::to_string(e) + ".";
      add(p + "w1.weight", {h, d}, w1[static_cast<std::size_t>(e)]);
      add(p + "w2.weight", {d, h}, w2[static_cast<std::size_t>(e)]);
      add(p + "w3.weight", {h, d}, w3[static_cast<std::size_t>(e)]);
    }
    return moe::io::SafeTensors::parse(w.bytes(), "mixtral.safetensors");
  }

  // y for one token, and its top-2 experts and gates.
  void reference(const double* x, double* y, Index* top, double* g) const {
    std::vector<double> logits(n);
    for (Index e = 0; e < n; ++e) {
      double a = 0;
      for (Index j = 0; j < d; ++j) a += gate[static_cast<std::size_t>(e * d + j)] * x[j];
      logits[static_cast<std::size_t>(e)] = a;
    }
    const double mx = *std::max_element(logits.begin(), logits.end());
    std::vector<double> p(n);
    double z = 0;
    for (Index e = 0; e < n; ++e) z += p[static_cast<std::size_t>(e)] = std::exp(logits[static_cast<std::size_t>(e)] - mx);
    for (auto& v : p) v /= z;
    std::vector<Index> order(n);
    std::iota(order.begin(), order.end(), Index{0});
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p[a] > p[b]; });
    const double kept = p[order[0]] + p[order[1]];
    std::fill(y, y + d, 0.0);
    for (int s = 0; s < 2; ++s) {
      const Index e = order[static_cast<std::size_t>(s)];
      top[s] = e;
      g[s] = p[static_cast<std::size_t>(e)] / kept;
      const auto& a = w1[static_cast<std::size_t>(e)];
      const auto& b = w3[static_cast<std::size_t>(e)];
      const auto& o = w2[static_cast<std::size_t>(e)];
      std::vector<double> hid(h);
      for (Index i = 0; i < h; ++i) {
        double u = 0, v = 0;
        for (Index j = 0; j < d; ++j) {
          u += a[static_cast<std::size_t>(i * d + j)] * x[j];
          v += b[static_cast<std::size_t>(i * d + j)] * x[j];
        }
        hid[static_cast<std::size_t>(i)] = u / (1 + std::exp(-u)) * v;
      }
      for (Index j = 0; j < d; ++j) {
        double acc = 0;
        for (Index i = 0; i < h; ++i) acc += o[static_cast<std::size_t>(j * h + i)] * hid[static_cast<std::size_t>(i)];
        y[j] += g[s] * acc;
      }
    }
  }
};

template <class S>
using Mixtral = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<S>>;

template <class S>
double check_against_reference(const Block& block, moe::io::Dtype dtype) {
  const auto file = block.file(dtype);
  Mixtral<S> layer(moe::io::mixtral_config<Mixtral<S>>(file, prefix));
  CHECK(layer.config().d_model == d);
  CHECK(layer.config().n_experts == n);
  CHECK(layer.config().expert.hidden == h);
  CHECK(layer.k() == 2);
  moe::io::load_mixtral(layer, file, prefix);
  const auto x = moe::test::random_matrix<S>(tokens, d, 17);
  const auto f = layer.forward(x.view(), moe::Mode::inference);
  double err = 0, norm = 0;
  for (Index t = 0; t < tokens; ++t) {
    std::vector<double> xt(d), y(d);
    for (Index j = 0; j < d; ++j) xt[static_cast<std::size_t>(j)] = x.view()(t, j);
    Index top[2];
    double g[2];
    block.reference(xt.data(), y.data(), top, g);
    for (Index s = 0; s < 2; ++s) {
      CHECK(f.expert_index()(t, s) == top[s]);
      CHECK(double(f.gates()(t, s)) == doctest::Approx(g[s]).epsilon(1e-5));
    }
    for (Index j = 0; j < d; ++j) {
      err += std::pow(double(f.y()(t, j)) - y[static_cast<std::size_t>(j)], 2);
      norm += y[static_cast<std::size_t>(j)] * y[static_cast<std::size_t>(j)];
    }
  }
  return std::sqrt(err / norm);
}

}  // namespace

TEST_CASE("a Mixtral block loads into Layer<SwiGLU, TopK> and computes the block") {
  const Block block(21);
  CHECK(check_against_reference<double>(block, moe::io::Dtype::F64) < 1e-13);
  CHECK(check_against_reference<float>(block, moe::io::Dtype::F32) < 1e-5);
  // Hugging Face checkpoints are mostly bf16: the reference's weights rounded the same way.
  Block rounded = block;
  for (auto* v : {&rounded.gate}) for (auto& x : *v) x = moe::round_to_bf16(float(x));
  for (auto* m : {&rounded.w1, &rounded.w2, &rounded.w3})
    for (auto& v : *m) for (auto& x : v) x = moe::round_to_bf16(float(x));
  CHECK(check_against_reference<double>(rounded, moe::io::Dtype::BF16) < 1e-13);
}

TEST_CASE("a Mixtral block that does not fit is refused, naming the tensor") {
  const Block block(22);
  Mixtral<float> layer(moe::io::mixtral_config<Mixtral<float>>(block.file(moe::io::Dtype::F32), prefix));
  SUBCASE("a wrong shape") {
    Block bad = block;
    bad.w3[2].resize(static_cast<std::size_t>((h + 1) * d));
    moe::io::SafeTensorsWriter w;
    // Rebuild by hand with expert 2's w3 as [h + 1, d].
    const auto good = block.file(moe::io::Dtype::F32);
    for (const auto& t : good.tensors()) {
      if (t.name == prefix + "experts.2.w3.weight") {
        w.add(t.name, {h + 1, d}, std::span<const double>(bad.w3[2]));
      } else {
        const auto v = good.read<double>(t.name);
        w.add(t.name, t.shape, std::span<const double>(v));
      }
    }
    CHECK_THROWS_WITH_AS(moe::io::load_mixtral(layer, moe::io::SafeTensors::parse(w.bytes()), prefix),
                         doctest::Contains("experts.2.w3.weight"), moe::Error);
  }
  SUBCASE("a missing expert") {
    moe::io::SafeTensorsWriter w;
    const auto good = block.file(moe::io::Dtype::F32);
    for (const auto& t : good.tensors()) {
      if (t.name == prefix + "experts.4.w2.weight") continue;
      const auto v = good.read<double>(t.name);
      w.add(t.name, t.shape, std::span<const double>(v));
    }
    CHECK_THROWS_WITH_AS(moe::io::load_mixtral(layer, moe::io::SafeTensors::parse(w.bytes()), prefix),
                         doctest::Contains("experts.4.w2.weight"), moe::Error);
  }
  SUBCASE("a wrong prefix") {
    CHECK_THROWS_WITH_AS(moe::io::mixtral_config<Mixtral<float>>(block.file(moe::io::Dtype::F32), "model.layers.9."),
                         doctest::Contains("model.layers.9.gate.weight"), moe::Error);
  }
}

TEST_CASE("a Mixtral block into a layer with shared experts is refused before anything changes") {
  const Block block(23);
  const auto file = block.file(moe::io::Dtype::F32);
  auto config = moe::io::mixtral_config<Mixtral<float>>(file, prefix);
  config.shared_experts = 1;
  Mixtral<float> layer(config);
  std::vector<std::vector<float>> before;
  for (auto& p : layer.parameters()) before.emplace_back(p.value.data, p.value.data + p.size());
  CHECK_THROWS_WITH_AS(moe::io::load_mixtral(layer, file, prefix), doctest::Contains("shared_experts.w1"), moe::Error);
  std::size_t i = 0;
  for (auto& p : layer.parameters()) CHECK(std::vector<float>(p.value.data, p.value.data + p.size()) == before[i++]);
}

TEST_CASE("a Mixtral block into a layer with other options is refused") {
  const Block block(24);
  const auto file = block.file(moe::io::Dtype::F32);
  for (int which = 0; which < 3; ++which) {
    auto config = moe::io::mixtral_config<Mixtral<float>>(file, prefix);
    if (which == 0) config.expert.limit = 7;
    if (which == 1) config.gate.normalize = false;
    if (which == 2) config.gate.router_bias = true;
    Mixtral<float> layer(config);
    CHECK_THROWS_WITH_AS(moe::io::load_mixtral(layer, file, prefix), doctest::Contains("options are not Mixtral's"),
                         moe::Error);
  }
}
