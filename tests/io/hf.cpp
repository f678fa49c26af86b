// Import of Hugging Face MoE blocks (moe/io/hf.hpp): for each model family, a small model
// directory written here (config.json and safetensors under the family's names) in each weight
// layout (per expert; fused as transformers 5 writes it; GPT-OSS's own), in one file and sharded
// with an index, in F32 and BF16; loaded into the layer and checked against a reference of the
// family's block written here from the Hugging Face tensors as stored (their layout, their math).
// Then the errors: what the library cannot express names itself.

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "../support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/io/hf.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
namespace fs = std::filesystem;

constexpr Index d = 8, n = 8, h = 6, tokens = 11, layer = 1;

struct Family {
  std::string model_type;
  nlohmann::json config;  // besides model_type, hidden_size, num_hidden_layers
  Index k;
  Index shared_hidden = 0;  // 0: no shared expert
  bool shared_gate = false;
  bool sigmoid = false;     // DeepSeek-V3 / GLM-4-MoE routing
  bool gpt_oss = false;
};

std::vector<Family> families() {
  using nlohmann::json;
  return {
      {"mixtral", json{{"num_local_experts", n}, {"num_experts_per_tok", 2}, {"intermediate_size", h}}, 2},
      {"qwen2_moe",
       json{{"num_experts", n}, {"num_experts_per_tok", 3}, {"moe_intermediate_size", h},
            {"shared_expert_intermediate_size", 10}, {"norm_topk_prob", false}, {"mlp_only_layers", json::array({0})}},
       3, 10, true},
      {"qwen3_moe",
       // The expert count under the name transformers 5 writes (the released configs: num_experts).
       json{{"num_local_experts", n}, {"num_experts_per_tok", 2}, {"moe_intermediate_size", h}, {"norm_topk_prob", true}}, 2},
      {"olmoe", json{{"num_experts", n}, {"num_experts_per_tok", 3}, {"intermediate_size", h}}, 3},
      {"deepseek_v2",
       json{{"n_routed_experts", n}, {"num_experts_per_tok", 3}, {"moe_intermediate_size", h}, {"n_shared_experts", 2},
            {"first_k_dense_replace", 1}, {"topk_method", "group_limited_greedy"}, {"n_group", 4}, {"topk_group", 2},
            {"routed_scaling_factor", 2.5}},
       3, 2 * h},
      {"deepseek_v3",
       json{{"n_routed_experts", n}, {"num_experts_per_tok", 3}, {"moe_intermediate_size", h}, {"n_shared_experts", 1},
            {"first_k_dense_replace", 1}, {"n_group", 4}, {"topk_group", 2}, {"routed_scaling_factor", 2.5},
            {"norm_topk_prob", true}},
       3, h, false, true},
      {"glm4_moe",
       json{{"n_routed_experts", n}, {"num_experts_per_tok", 2}, {"moe_intermediate_size", h}, {"n_shared_experts", 1},
            {"first_k_dense_replace", 1}, {"n_group", 1}, {"topk_group", 1}, {"routed_scaling_factor", 1.5},
            {"norm_topk_prob", false}},
       2, h, false, true},
      {"gpt_oss", json{{"num_local_experts", n}, {"num_experts_per_tok", 2}, {"intermediate_size", h}}, 2, 0, false,
       false, true},
  };
}

// The block's tensors in Hugging Face's math (y = W x): values k / 64 with |k| < 64, exact in BF16.
struct Raw {
  std::vector<double> router, router_bias, correction;  // [n, d], [n], [n]
  std::vector<std::vector<double>> gate, up, down;      // per expert [h, d], [h, d], [d, h]
  std::vector<std::vector<double>> gate_b, up_b, down_b;  // GPT-OSS: [h], [h], [d]
  std::vector<double> s_gate, s_up, s_down, s_gate_w;   // shared: [hs, d], [hs, d], [d, hs], [1, d]

  Raw(const Family& f, std::uint64_t seed) {
    moe::CounterRandom r{seed};
    std::uint64_t i = 0;
    const auto fill = [&](Index count, double scale = 1.0) {
      std::vector<double> v(static_cast<std::size_t>(count));
      for (auto& x : v) x = scale * std::round(63.0 * r.symmetric_uniform(i++, 3, 4)) / 64.0;
      return v;
    };
    router = fill(n * d);
    router_bias = fill(n);
    correction = fill(n, 0.25);
    for (Index e = 0; e < n; ++e) {
      gate.push_back(fill(h * d, f.gpt_oss ? 8.0 : 1.0));  // GPT-OSS: large enough to reach the clamp at 7
      up.push_back(fill(h * d, f.gpt_oss ? 8.0 : 1.0));
      down.push_back(fill(d * h));
      gate_b.push_back(fill(h));
      up_b.push_back(fill(h));
      down_b.push_back(fill(d));
    }
    const Index hs = std::max<Index>(f.shared_hidden, 1);
    s_gate = fill(hs * d);
    s_up = fill(hs * d);
    s_down = fill(d * hs);
    s_gate_w = fill(d);
  }
};

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// Indices of the `count` largest of v among `allowed` (all when empty), largest first, ties to the lower index.
std::vector<Index> top(const std::vector<double>& v, Index count, const std::vector<bool>& allowed = {}) {
  std::vector<Index> idx;
  for (Index i = 0; i < static_cast<Index>(v.size()); ++i)
    if (allowed.empty() || allowed[static_cast<std::size_t>(i)]) idx.push_back(i);
  std::stable_sort(idx.begin(), idx.end(), [&](Index a, Index b) { return v[static_cast<std::size_t>(a)] > v[static_cast<std::size_t>(b)]; });
  idx.resize(static_cast<std::size_t>(count));
  return idx;
}

// y = W x for W [rows x cols] row-major.
std::vector<double> matvec(const std::vector<double>& w, Index rows, Index cols, const std::vector<double>& x) {
  std::vector<double> y(static_cast<std::size_t>(rows), 0.0);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) y[static_cast<std::size_t>(r)] += w[static_cast<std::size_t>(r * cols + c)] * x[static_cast<std::size_t>(c)];
  return y;
}

// The family's block on one token, from the Hugging Face tensors.
std::vector<double> reference(const Family& f, const Raw& raw, const std::vector<double>& x) {
  std::vector<double> l = matvec(raw.router, n, d, x);
  if (f.gpt_oss)
    for (Index i = 0; i < n; ++i) l[static_cast<std::size_t>(i)] += raw.router_bias[static_cast<std::size_t>(i)];
  std::vector<Index> chosen;
  std::vector<double> weight;
  const auto& c = f.config;
  if (f.sigmoid) {
    std::vector<double> s(static_cast<std::size_t>(n)), choice(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      s[static_cast<std::size_t>(i)] = sigmoid(l[static_cast<std::size_t>(i)]);
      choice[static_cast<std::size_t>(i)] = s[static_cast<std::size_t>(i)] + raw.correction[static_cast<std::size_t>(i)];
    }
    const Index groups = c["n_group"], size = n / groups;
    std::vector<double> group_score;
    for (Index g = 0; g < groups; ++g) {
      std::vector<double> part(choice.begin() + g * size, choice.begin() + (g + 1) * size);
      std::sort(part.rbegin(), part.rend());
      group_score.push_back(part[0] + part[1]);
    }
    std::vector<bool> allowed(static_cast<std::size_t>(n), false);
    for (const Index g : top(group_score, c["topk_group"]))
      for (Index i = g * size; i < (g + 1) * size; ++i) allowed[static_cast<std::size_t>(i)] = true;
    chosen = top(choice, f.k, allowed);
    double sum = 0;
    for (const Index e : chosen) sum += s[static_cast<std::size_t>(e)];
    for (const Index e : chosen)
      weight.push_back(double(c["routed_scaling_factor"]) * s[static_cast<std::size_t>(e)] / (c["norm_topk_prob"] ? sum : 1.0));
  } else if (f.gpt_oss) {
    chosen = top(l, f.k);
    double sum = 0;
    for (const Index e : chosen) sum += std::exp(l[static_cast<std::size_t>(e)] - l[static_cast<std::size_t>(chosen[0])]);
    for (const Index e : chosen) weight.push_back(std::exp(l[static_cast<std::size_t>(e)] - l[static_cast<std::size_t>(chosen[0])]) / sum);
  } else {
    const double m = *std::max_element(l.begin(), l.end());
    std::vector<double> p(static_cast<std::size_t>(n));
    double z = 0;
    for (Index i = 0; i < n; ++i) z += (p[static_cast<std::size_t>(i)] = std::exp(l[static_cast<std::size_t>(i)] - m));
    for (auto& v : p) v /= z;
    std::vector<bool> allowed;
    if (c.contains("topk_method")) {  // DeepSeek-V2 group-limited: groups by their largest p
      const Index groups = c["n_group"], size = n / groups;
      std::vector<double> group_score;
      for (Index g = 0; g < groups; ++g) group_score.push_back(*std::max_element(p.begin() + g * size, p.begin() + (g + 1) * size));
      allowed.assign(static_cast<std::size_t>(n), false);
      for (const Index g : top(group_score, c["topk_group"]))
        for (Index i = g * size; i < (g + 1) * size; ++i) allowed[static_cast<std::size_t>(i)] = true;
    }
    chosen = top(p, f.k, allowed);
    const bool normalize = f.model_type == "mixtral" || (c.contains("norm_topk_prob") && bool(c["norm_topk_prob"]) &&
                                                         f.model_type != "deepseek_v2");
    const double scale = c.contains("routed_scaling_factor") ? double(c["routed_scaling_factor"]) : 1.0;
    double sum = 0;
    for (const Index e : chosen) sum += p[static_cast<std::size_t>(e)];
    for (const Index e : chosen) weight.push_back(scale * p[static_cast<std::size_t>(e)] / (normalize ? sum : 1.0));
  }
  std::vector<double> y(static_cast<std::size_t>(d), 0.0);
  for (std::size_t j = 0; j < chosen.size(); ++j) {
    const auto e = static_cast<std::size_t>(chosen[j]);
    std::vector<double> a = matvec(raw.gate[e], h, d, x), u = matvec(raw.up[e], h, d, x), act(static_cast<std::size_t>(h));
    for (Index q = 0; q < h; ++q) {
      const auto qq = static_cast<std::size_t>(q);
      if (f.gpt_oss) {
        const double g = std::min(a[qq] + raw.gate_b[e][qq], 7.0);
        const double v = std::clamp(u[qq] + raw.up_b[e][qq], -7.0, 7.0);
        act[qq] = g * sigmoid(1.702 * g) * (v + 1.0);
      } else {
        act[qq] = a[qq] * sigmoid(a[qq]) * u[qq];
      }
    }
    // GPT-OSS's down_proj is [h, d] (x W layout): out = act W + b.
    std::vector<double> out(static_cast<std::size_t>(d), 0.0);
    for (Index col = 0; col < d; ++col)
      for (Index q = 0; q < h; ++q) out[static_cast<std::size_t>(col)] += raw.down[e][static_cast<std::size_t>(col * h + q)] * act[static_cast<std::size_t>(q)];
    if (f.gpt_oss)
      for (Index col = 0; col < d; ++col) out[static_cast<std::size_t>(col)] += raw.down_b[e][static_cast<std::size_t>(col)];
    for (Index col = 0; col < d; ++col) y[static_cast<std::size_t>(col)] += weight[j] * out[static_cast<std::size_t>(col)];
  }
  if (f.shared_hidden > 0) {
    const Index hs = f.shared_hidden;
    const auto a = matvec(raw.s_gate, hs, d, x), u = matvec(raw.s_up, hs, d, x);
    std::vector<double> act(static_cast<std::size_t>(hs));
    for (Index q = 0; q < hs; ++q) act[static_cast<std::size_t>(q)] = a[static_cast<std::size_t>(q)] * sigmoid(a[static_cast<std::size_t>(q)]) * u[static_cast<std::size_t>(q)];
    const auto out = matvec(raw.s_down, d, hs, act);
    const double g = f.shared_gate ? sigmoid(matvec(raw.s_gate_w, 1, d, x)[0]) : 1.0;
    for (Index col = 0; col < d; ++col) y[static_cast<std::size_t>(col)] += g * out[static_cast<std::size_t>(col)];
  }
  return y;
}

enum class Layout { per_expert, fused };

// Writes the model directory: config.json and the block's tensors (plus an unrelated tensor), in
// one file or over two files with an index.
void write_model(const fs::path& dir, const Family& f, const Raw& raw, Layout layout, bool sharded, moe::io::Dtype dtype) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  nlohmann::json config = f.config;
  config["model_type"] = f.model_type;
  config["hidden_size"] = d;
  config["num_hidden_layers"] = 2;
  std::ofstream(dir / "config.json") << config.dump(2);
  std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<double>>> t;
  const std::string p = "model.layers." + std::to_string(layer) + (f.model_type == "mixtral" && layout == Layout::per_expert ? ".block_sparse_moe." : ".mlp.");
  const bool gpt = f.gpt_oss;
  t[p + (gpt ? "router.weight" : "gate.weight")] = {{n, d}, raw.router};
  if (gpt) t[p + "router.bias"] = {{n}, raw.router_bias};
  if (f.sigmoid) t[p + "gate.e_score_correction_bias"] = {{n}, raw.correction};
  const bool mixtral_names = f.model_type == "mixtral";
  if (gpt) {
    std::vector<double> gu, gub, down, downb;
    for (Index e = 0; e < n; ++e) {
      const auto ee = static_cast<std::size_t>(e);
      for (Index c = 0; c < d; ++c)
        for (Index j = 0; j < h; ++j) {
          gu.push_back(raw.gate[ee][static_cast<std::size_t>(j * d + c)]);
          gu.push_back(raw.up[ee][static_cast<std::size_t>(j * d + c)]);
        }
      for (Index j = 0; j < h; ++j) {
        gub.push_back(raw.gate_b[ee][static_cast<std::size_t>(j)]);
        gub.push_back(raw.up_b[ee][static_cast<std::size_t>(j)]);
      }
      for (Index j = 0; j < h; ++j)
        for (Index c = 0; c < d; ++c) down.push_back(raw.down[ee][static_cast<std::size_t>(c * h + j)]);
      downb.insert(downb.end(), raw.down_b[ee].begin(), raw.down_b[ee].end());
    }
    t[p + "experts.gate_up_proj"] = {{n, d, 2 * h}, gu};
    t[p + "experts.gate_up_proj_bias"] = {{n, 2 * h}, gub};
    t[p + "experts.down_proj"] = {{n, h, d}, down};
    t[p + "experts.down_proj_bias"] = {{n, d}, downb};
  } else if (layout == Layout::fused) {
    std::vector<double> gu, down;
    for (Index e = 0; e < n; ++e) {
      const auto ee = static_cast<std::size_t>(e);
      gu.insert(gu.end(), raw.gate[ee].begin(), raw.gate[ee].end());
      gu.insert(gu.end(), raw.up[ee].begin(), raw.up[ee].end());
      down.insert(down.end(), raw.down[ee].begin(), raw.down[ee].end());
    }
    t[p + "experts.gate_up_proj"] = {{n, 2 * h, d}, gu};
    t[p + "experts.down_proj"] = {{n, d, h}, down};
  } else {
    for (Index e = 0; e < n; ++e) {
      const auto ee = static_cast<std::size_t>(e);
      const std::string ep = p + "experts." + std::to_string(e) + ".";
      t[ep + (mixtral_names ? "w1" : "gate_proj") + ".weight"] = {{h, d}, raw.gate[ee]};
      t[ep + (mixtral_names ? "w3" : "up_proj") + ".weight"] = {{h, d}, raw.up[ee]};
      t[ep + (mixtral_names ? "w2" : "down_proj") + ".weight"] = {{d, h}, raw.down[ee]};
    }
  }
  if (f.shared_hidden > 0) {
    const Index hs = f.shared_hidden;
    const std::string sp = p + (f.shared_gate ? "shared_expert." : "shared_experts.");
    t[sp + "gate_proj.weight"] = {{hs, d}, raw.s_gate};
    t[sp + "up_proj.weight"] = {{hs, d}, raw.s_up};
    t[sp + "down_proj.weight"] = {{d, hs}, raw.s_down};
    if (f.shared_gate) t[p + "shared_expert_gate.weight"] = {{1, d}, raw.s_gate_w};
  }
  t["model.embed_tokens.weight"] = {{3, d}, std::vector<double>(static_cast<std::size_t>(3 * d), 0.5)};
  moe::io::SafeTensorsWriter files[2];
  nlohmann::json map = nlohmann::json::object();
  int which = 0;
  for (const auto& [name, value] : t) {
    const int file = sharded ? (which++ % 2) : 0;
    files[file].add(name, value.first, std::span<const double>(value.second), dtype);
    map[name] = "model-0000" + std::to_string(file + 1) + "-of-00002.safetensors";
  }
  if (!sharded) {
    files[0].write(dir / "model.safetensors");
    return;
  }
  files[0].write(dir / "model-00001-of-00002.safetensors");
  files[1].write(dir / "model-00002-of-00002.safetensors");
  std::ofstream(dir / "model.safetensors.index.json") << nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", map}}.dump(2);
}

template <class S, class Gate>
double max_error(const Family& f, const Raw& raw, const fs::path& dir) {
  using L = moe::Layer<moe::expert::SwiGLU, Gate, moe::backend::Cpu<S>>;
  const auto model = moe::io::HfModel::open(dir);
  const auto block = model.block(layer);
  L layer_(moe::io::hf_config<L>(block));
  moe::io::load_hf(layer_, model, block);
  const auto x = moe::test::random_matrix<S>(tokens, d, 21, -2.0, 2.0);
  const auto fwd = layer_.forward(x.view(), moe::Mode::inference);
  double worst = 0, scale = 0;
  for (Index t = 0; t < tokens; ++t) {
    std::vector<double> xt;
    for (Index c = 0; c < d; ++c) xt.push_back(static_cast<double>(x.view()(t, c)));
    const auto y = reference(f, raw, xt);
    for (Index c = 0; c < d; ++c) {
      worst = std::max(worst, std::abs(static_cast<double>(fwd.y()(t, c)) - y[static_cast<std::size_t>(c)]));
      scale = std::max(scale, std::abs(y[static_cast<std::size_t>(c)]));
    }
  }
  return worst / std::max(scale, 1e-30);
}

fs::path scratch(const std::string& name) {
  return fs::temp_directory_path() / ("moe_hf_test_" + std::to_string(::getpid()) + "_" + name);
}

}  // namespace

TEST_CASE("Hugging Face MoE blocks load and compute as their families' math, in every layout") {
  for (const auto& f : families()) {
    const Raw raw(f, 7);
    for (const Layout layout : {Layout::per_expert, Layout::fused}) {
      if (f.gpt_oss && layout == Layout::fused) continue;  // GPT-OSS has one layout
      for (const bool sharded : {false, true}) {
        for (const auto dtype : {moe::io::Dtype::F32, moe::io::Dtype::BF16}) {
          CAPTURE(f.model_type);
          CAPTURE(layout == Layout::fused);
          CAPTURE(sharded);
          CAPTURE(dtype == moe::io::Dtype::BF16);
          const fs::path dir = scratch(f.model_type);
          write_model(dir, f, raw, layout, sharded, dtype);
          if (f.sigmoid) {
            CHECK(max_error<double, moe::gate::SigmoidBias>(f, raw, dir) < 1e-13);
            CHECK(max_error<float, moe::gate::SigmoidBias>(f, raw, dir) < 2e-6);
          } else {
            CHECK(max_error<double, moe::gate::TopK>(f, raw, dir) < 1e-13);
            CHECK(max_error<float, moe::gate::TopK>(f, raw, dir) < 2e-6);
          }
          fs::remove_all(dir);
        }
      }
    }
  }
}

TEST_CASE("What the library cannot express is an Error naming it") {
  using L = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<double>>;
  using LS = moe::Layer<moe::expert::SwiGLU, moe::gate::SigmoidBias, moe::backend::Cpu<double>>;
  const auto all = families();
  const auto find = [&](const std::string& type) { return *std::find_if(all.begin(), all.end(), [&](const Family& f) { return f.model_type == type; }); };
  const fs::path dir = scratch("errors");
  const auto error_with = [&](Family f, const std::function<void(nlohmann::json&)>& edit, auto&& action) {
    const Raw raw(f, 3);
    write_model(dir, f, raw, Layout::per_expert, false, moe::io::Dtype::F32);
    nlohmann::json config;
    std::ifstream(dir / "config.json") >> config;
    edit(config);
    std::ofstream(dir / "config.json") << config.dump();
    return moe::test::error_of([&] { action(moe::io::HfModel::open(dir)); });
  };
  const auto none = [](nlohmann::json&) {};
  const auto load_layer = [](int index) {
    return [index](const moe::io::HfModel& m) { (void)m.block(index); };
  };
  CHECK(moe::test::contains(error_with(find("mixtral"), [](nlohmann::json& c) { c["model_type"] = "llama"; }, load_layer(1)),
                            "model_type \"llama\" has no MoE block the library imports"));
  CHECK(moe::test::contains(
      error_with(find("gpt_oss"), [](nlohmann::json& c) { c["quantization_config"] = {{"quant_method", "mxfp4"}}; }, load_layer(1)),
      "quant_method = \"mxfp4\""));
  CHECK(moe::test::contains(error_with(find("olmoe"), [](nlohmann::json& c) { c["hidden_act"] = "gelu"; }, load_layer(1)),
                            "hidden_act = \"gelu\", expected \"silu\""));
  CHECK(moe::test::contains(error_with(find("mixtral"), [](nlohmann::json& c) { c["router_jitter_noise"] = 0.01; }, load_layer(1)),
                            "router_jitter_noise = 0.01"));
  CHECK(moe::test::contains(error_with(find("deepseek_v3"), none, load_layer(0)),
                            "layer 0 of this deepseek_v3 model is a dense MLP, not an MoE block (first_k_dense_replace)"));
  CHECK(moe::test::contains(error_with(find("qwen2_moe"), none, load_layer(0)), "mlp_only_layers"));
  CHECK(moe::test::contains(error_with(find("olmoe"), none, load_layer(2)), "layer 2, expected 0 <= layer < num_hidden_layers = 2"));
  CHECK(moe::test::contains(
      error_with(find("deepseek_v3"), none, [](const moe::io::HfModel& m) { (void)moe::io::hf_config<L>(m.block(1)); }),
      "needs gate::SigmoidBias, the layer type has gate::TopK"));
  CHECK(moe::test::contains(
      error_with(find("olmoe"), none, [](const moe::io::HfModel& m) { (void)moe::io::hf_config<LS>(m.block(1)); }),
      "needs gate::TopK, the layer type has gate::SigmoidBias"));
  // A missing expert tensor is named, and the layer is left as it was.
  {
    const Family f = find("olmoe");
    const Raw raw(f, 3);
    write_model(dir, f, raw, Layout::per_expert, true, moe::io::Dtype::F32);
    auto index = nlohmann::json::parse(std::ifstream(dir / "model.safetensors.index.json"));
    index["weight_map"].erase("model.layers.1.mlp.experts.5.up_proj.weight");
    std::ofstream(dir / "model.safetensors.index.json") << index.dump();
    const auto model = moe::io::HfModel::open(dir);
    L l(moe::io::hf_config<L>(model.block(1)));
    const auto before = l.parameters()[1].value(0, 0);
    CHECK(moe::test::contains(moe::test::error_of([&] { moe::io::load_hf(l, model, model.block(1)); }),
                              "no tensor 'model.layers.1.mlp.experts.5.up_proj.weight'"));
    CHECK(l.parameters()[1].value(0, 0) == before);
  }
  fs::remove_all(dir);
}
