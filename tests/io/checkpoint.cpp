// Checkpoints: every gate, expert and depth saved and loaded under stable names, the layer's
// configuration in the metadata, and every way a file can disagree with a layer refused.

#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "../backend_compare.hpp"
#include "../support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
namespace fs = std::filesystem;

// A fresh directory under the system's temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("moe-io-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

template <class L>
typename L::Config config_for(std::uint64_t seed, Index d = 6, Index h = 5) {
  using Gate = typename L::GateTag;
  typename L::Config c{};
  c.d_model = d;
  c.n_experts = L::depth == 3 ? 16 : 8;
  c.expert = compare::expert_config<typename L::ExpertTag>(h);
  c.gate = compare::depth_config<Gate, L::depth>(c.n_experts);
  c.shared_experts = 1;
  c.seed = seed;
  return c;
}

template <class S>
std::vector<S> values(const moe::Parameter<S>& p) {
  return {p.value.data, p.value.data + p.size()};
}

template <class L>
std::vector<std::vector<typename L::Scalar>> all_values(L& layer) {
  std::vector<std::vector<typename L::Scalar>> out;
  for (auto& p : layer.parameters()) out.push_back(values(p));
  return out;
}

// A few training steps' forwards, so SigmoidBias's selection bias moves away from zero.
template <class L>
void train_forwards(L& layer) {
  using S = typename L::Scalar;
  moe::Rng rng(5);
  const auto x = moe::test::random_matrix<S>(9, layer.config().d_model, 3);
  for (int i = 0; i < 3; ++i) (void)layer.forward(x.view(), moe::Mode::train, rng);
}

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("a checkpoint restores every tensor and the configuration", Case, checkpoint_cases) {
  using B = moe::backend::Cpu<float>;
  using L = moe::Layer<typename Case::ExpertType, typename Case::GateType, B, Case::depth>;
  INFO(std::string(compare::type_name<typename Case::GateType>()), " ", std::string(compare::type_name<typename Case::ExpertType>()),
       " depth ", Case::depth);
  TempDir dir;
  const fs::path file = dir.path / "layer.safetensors";
  L a(config_for<L>(1));
  train_forwards(a);
  moe::io::save(a, file);

  // Another seed gives other values; loading makes them equal, bit for bit.
  L b(config_for<L>(2));
  REQUIRE(all_values(a) != all_values(b));
  moe::io::load(b, file);
  CHECK(all_values(a) == all_values(b));
  if constexpr (moe::io::detail::HasSelectionBias<typename L::GatePolicy>) {
    const auto ba = a.gate().bias(), bb = b.gate().bias();
    CHECK(std::vector<float>(ba.data, ba.data + ba.cols) == std::vector<float>(bb.data, bb.data + bb.cols));
    CHECK(ba.data[0] != 0.0f);
  }

  // The same forward from both.
  const auto x = moe::test::random_matrix<float>(7, 6, 11);
  const auto fa = a.forward(x.view(), moe::Mode::inference);
  const auto fb = b.forward(x.view(), moe::Mode::inference);
  CHECK(std::vector<float>(fa.y().data, fa.y().data + 7 * 6) == std::vector<float>(fb.y().data, fb.y().data + 7 * 6));

  // The file describes itself: a layer built from it alone is the same layer.
  L c = moe::io::load_layer<L>(file);
  CHECK(moe::io::describe(c) == moe::io::describe(a));
  CHECK(all_values(c) == all_values(a));
  // Every tensor, the selection biases of every level included, and the metadata: the same bytes.
  CHECK(moe::io::checkpoint(c).bytes() == moe::io::checkpoint(a).bytes());
  const auto sa = moe::io::SafeTensors::parse(moe::io::checkpoint(a).bytes());
  const auto sb = moe::io::SafeTensors::parse(moe::io::checkpoint(b).bytes());
  for (const auto& t : sa.tensors()) {
    INFO(t.name);
    const auto ra = sa.raw(t.name), rb = sb.raw(t.name);
    CHECK(std::equal(ra.begin(), ra.end(), rb.begin(), rb.end()));
  }

  // Every tensor the layer has, by name, in the file; nothing else.
  const auto st = moe::io::SafeTensors::open(file);
  const auto expected = moe::io::checkpoint_tensors(a);
  CHECK(st.tensors().size() == expected.size());
  for (const auto& [name, shape] : expected) {
    INFO(name);
    REQUIRE(st.contains(name));
    CHECK(st.info(name).shape == shape);
  }
}
TEST_CASE_TEMPLATE_APPLY(checkpoint_cases, compare::Cases);

TEST_CASE("experts are stored one tensor per expert under the global index") {
  using B = moe::backend::Cpu<double>;
  using L = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, B>;
  TempDir dir;
  L layer({.d_model = 3, .n_experts = 4, .expert = {.hidden = 2, .bias = true}, .gate = {.k = 2}, .seed = 9});
  moe::io::save(layer, dir.path / "l.safetensors");
  const auto st = moe::io::SafeTensors::open(dir.path / "l.safetensors");
  for (auto& p : layer.parameters()) {
    if (p.name != "experts.w1") continue;
    for (Index i = 0; i < 4; ++i) {
      const auto name = "experts." + std::to_string(i) + ".w1";
      CHECK(st.info(name).shape == std::vector<std::int64_t>{3, 2});
      const auto v = st.read<double>(name);
      CHECK(v == std::vector<double>(p.value.data + i * 6, p.value.data + (i + 1) * 6));
    }
  }
  CHECK(st.info("gate.w_gate").shape == std::vector<std::int64_t>{3, 4});
  CHECK(st.info("experts.2.b1").shape == std::vector<std::int64_t>{2});
  CHECK(st.metadata().at("moe.gate") == "NoisyTopK");
  CHECK(st.metadata().at("config.expert.hidden") == "2");
  CHECK(st.metadata().at("config.gate.k") == "2");
  CHECK(st.metadata().at("moe.scalar") == "double");
}

TEST_CASE("a checkpoint converts between scalars and stores bf16 when asked") {
  using Lf = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<float>>;
  using Ld = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<double>>;
  TempDir dir;
  Lf f({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .seed = 4});
  moe::io::save(f, dir.path / "f32.safetensors");
  Ld d({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .seed = 5});
  moe::io::load(d, dir.path / "f32.safetensors");  // float values are exact in double
  auto pf = f.parameters();
  auto pd = d.parameters();
  for (std::size_t i = 0; i < pf.size(); ++i)
    for (Index j = 0; j < pf[i].size(); ++j) CHECK(pd[i].value.data[j] == double(pf[i].value.data[j]));

  moe::io::save(f, dir.path / "bf16.safetensors", {.dtype = moe::io::Dtype::BF16});
  CHECK(moe::io::SafeTensors::open(dir.path / "bf16.safetensors").info("gate.w_gate").dtype == moe::io::Dtype::BF16);
  Lf g({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .seed = 6});
  moe::io::load(g, dir.path / "bf16.safetensors");
  auto pg = g.parameters();
  for (std::size_t i = 0; i < pf.size(); ++i)
    for (Index j = 0; j < pf[i].size(); ++j) CHECK(pg[i].value.data[j] == moe::round_to_bf16(pf[i].value.data[j]));

  CHECK_THROWS_WITH_AS(moe::io::save(f, dir.path / "x.safetensors", {.dtype = moe::io::Dtype::I32}),
                       doctest::Contains("expected a floating type"), moe::Error);
  CHECK_THROWS_WITH_AS(moe::io::save(f, dir.path / "x.safetensors", {.metadata = {{"moe.gate", "x"}}}),
                       doctest::Contains("'moe.gate' is the layer's own"), moe::Error);
  moe::io::save(f, dir.path / "extra.safetensors", {.metadata = {{"origin", "a test"}}});
  CHECK(moe::io::SafeTensors::open(dir.path / "extra.safetensors").metadata().at("origin") == "a test");
}

TEST_CASE("a file that does not fit the layer is refused, naming the tensor, and the layer is unchanged") {
  using B = moe::backend::Cpu<float>;
  using L = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, B>;
  const L::Config config{.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2}, .seed = 1};
  TempDir dir;
  L saved(config);
  const auto good = moe::io::checkpoint(saved);
  L layer({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2}, .seed = 2});
  const auto before = all_values(layer);
  const auto weights = [&](const std::string& skip, auto&& add) {
    moe::io::SafeTensorsWriter w;
    const auto meta = moe::io::describe(saved);
    for (const auto& [k, v] : meta) w.set_metadata(k, v);
    for (const auto& [name, shape] : moe::io::checkpoint_tensors(saved)) {
      if (name == skip) continue;
      const auto v = moe::io::SafeTensors::parse(good.bytes()).read<float>(name);
      w.add(name, shape, std::span<const float>(v));
    }
    add(w);
    return moe::io::SafeTensors::parse(w.bytes(), "test.safetensors");
  };
  const auto nothing = [](moe::io::SafeTensorsWriter&) {};

  SUBCASE("missing tensor") {
    CHECK_THROWS_WITH_AS(moe::io::load(layer, weights("experts.3.w2", nothing)),
                         doctest::Contains("no tensor 'experts.3.w2'"), moe::Error);
  }
  SUBCASE("unexpected tensor") {
    const auto file = weights("", [](moe::io::SafeTensorsWriter& w) {
      const std::vector<float> v{1, 2};
      w.add("experts.4.w1", {2}, std::span<const float>(v));
    });
    CHECK_THROWS_WITH_AS(moe::io::load(layer, file), doctest::Contains("'experts.4.w1' is not one of the layer's"),
                         moe::Error);
    moe::io::load(layer, file, {.allow_unexpected = true});
    CHECK(all_values(layer) == all_values(saved));
    return;
  }
  SUBCASE("shape mismatch") {
    const auto file = weights("experts.1.w1", [](moe::io::SafeTensorsWriter& w) {
      const std::vector<float> v(12, 0.5f);
      w.add("experts.1.w1", {3, 4}, std::span<const float>(v));
    });
    CHECK_THROWS_WITH_AS(moe::io::load(layer, file), doctest::Contains("experts.1.w1"), moe::Error);
  }
  SUBCASE("non-finite value") {
    const auto file = weights("gate.w_noise", [](moe::io::SafeTensorsWriter& w) {
      std::vector<float> v(16, 0.0f);
      v[5] = std::numeric_limits<float>::quiet_NaN();
      w.add("gate.w_noise", {4, 4}, std::span<const float>(v));
    });
    CHECK_THROWS_WITH_AS(moe::io::load(layer, file), doctest::Contains("gate.w_noise"), moe::Error);
    moe::io::load(layer, file, {.check_finite = false});  // asked not to check
    CHECK(std::isnan(layer.parameters()[1].value.data[5]));
    return;
  }
  SUBCASE("metadata of another configuration") {
    L other({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 3}, .seed = 1});
    CHECK_THROWS_WITH_AS(moe::io::load(layer, moe::io::SafeTensors::parse(moe::io::checkpoint(other).bytes())),
                         doctest::Contains("'config.gate.k' = 3, but the layer has 2"), moe::Error);
  }
  SUBCASE("metadata of another layer type") {
    moe::Layer<moe::expert::FeedForward, moe::gate::TopK, B> other(
        {.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2}, .seed = 1});
    CHECK_THROWS_WITH_AS(moe::io::load(layer, moe::io::SafeTensors::parse(moe::io::checkpoint(other).bytes())),
                         doctest::Contains("gate TopK"), moe::Error);
  }
  CHECK(all_values(layer) == before);
}

TEST_CASE("a configuration's metadata round-trips and is checked on read") {
  using L = moe::Layer<moe::expert::FeedForward, moe::gate::SigmoidBias, moe::backend::Cpu<float>, 2>;
  L::Config c{};
  c.d_model = 5;
  c.n_experts = 8;
  c.expert = {.hidden = 7, .bias = true, .precision = moe::Precision::bf16};
  c.gate.levels[0] = {.branching = 4, .gate = {.k = 2, .expert_groups = 2, .top_groups = 1, .bias_rate = 0.25}};
  c.gate.levels[1] = {.branching = 2, .gate = {.k = 1, .scale = 2.5}};
  c.gate.w_importance = 0.1;
  c.seed = 123456789012345ull;
  const auto m = moe::io::describe<L>(c);
  CHECK(m.at("moe.depth") == "2");
  CHECK(m.at("config.gate.levels.0.gate.bias_rate") == "0.25");
  CHECK(m.at("config.expert.precision") == "bf16");
  const auto back = moe::io::layer_config<L>(m);
  CHECK(moe::io::describe<L>(back) == m);
  CHECK(back.seed == c.seed);
  CHECK(back.gate.levels[1].gate.scale == 2.5);

  auto bad = m;
  bad["config.expert.hidden"] = "seven";
  CHECK_THROWS_WITH_AS(moe::io::layer_config<L>(bad), doctest::Contains("'config.expert.hidden' = 'seven', expected an integer"),
                       moe::Error);
  bad = m;
  bad.erase("config.gate.levels.1.branching");
  CHECK_THROWS_WITH_AS(moe::io::layer_config<L>(bad), doctest::Contains("no 'config.gate.levels.1.branching'"),
                       moe::Error);
  bad = m;
  bad["format"] = "something else";
  CHECK_THROWS_WITH_AS(moe::io::layer_kind(bad), doctest::Contains("expected 'moe.layer/1'"), moe::Error);
  bad = m;
  bad["moe.depth"] = "1";
  CHECK_THROWS_WITH_AS(moe::io::layer_config<L>(bad), doctest::Contains("depth 1; expected expert FeedForward, gate SigmoidBias, depth 2"),
                       moe::Error);
}

TEST_CASE("metadata is compared as values, and other writers' metadata is not the layer's") {
  using L = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, moe::backend::Cpu<float>>;
  const L::Config config{.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2, .w_load = 0.01}, .seed = 1};
  L saved(config);
  const auto bytes = moe::io::checkpoint(saved).bytes();
  const auto original = moe::io::SafeTensors::parse(bytes);
  const auto rewrite = [&](const moe::io::Metadata& meta) {
    moe::io::SafeTensorsWriter w;
    for (const auto& [k, v] : meta) w.set_metadata(k, v);
    for (const auto& t : original.tensors()) {
      const auto v = original.read<float>(t.name);
      w.add(t.name, t.shape, std::span<const float>(v));
    }
    return moe::io::SafeTensors::parse(w.bytes(), "rewritten.safetensors");
  };
  L layer({.d_model = 4, .n_experts = 4, .expert = {.hidden = 3}, .gate = {.k = 2, .w_load = 0.01}, .seed = 2});

  SUBCASE("the same numbers written otherwise") {
    auto meta = original.metadata();
    CHECK(meta.at("config.gate.w_load") == "0.01");  // the shortest form that reads back
    meta["config.gate.w_load"] = "1.0e-2";
    meta["config.gate.k"] = "+2";  // from_chars refuses a sign: the key is named
    CHECK_THROWS_WITH_AS(moe::io::load(layer, rewrite(meta)), doctest::Contains("'config.gate.k' = '+2'"), moe::Error);
    meta["config.gate.k"] = "2";
    moe::io::load(layer, rewrite(meta));
    CHECK(all_values(layer) == all_values(saved));
  }
  SUBCASE("a Hugging Face file's format key") {
    moe::io::load(layer, rewrite({{"format", "pt"}}));
    CHECK(all_values(layer) == all_values(saved));
  }
  SUBCASE("sizes the file cannot hold") {
    TempDir dir;
    auto meta = original.metadata();
    meta["config.n_experts"] = "1000000000000";
    moe::io::SafeTensorsWriter w;
    for (const auto& [k, v] : meta) w.set_metadata(k, v);
    for (const auto& t : original.tensors()) {
      const auto v = original.read<float>(t.name);
      w.add(t.name, t.shape, std::span<const float>(v));
    }
    w.write(dir.path / "big.safetensors");
    CHECK_THROWS_WITH_AS((void)moe::io::load_layer<L>(dir.path / "big.safetensors"),
                         doctest::Contains("n_experts = 1000000000000, more than the file's"), moe::Error);
  }
}
