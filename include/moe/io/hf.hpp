#pragma once
// Import of one MoE block of a Hugging Face model directory: config.json, and the weights in one
// model.safetensors or a sharded set indexed by model.safetensors.index.json. The architecture
// comes from config.json's model_type:
//
//   model_type             layer                                 the block
//   mixtral                Layer<expert::SwiGLU, gate::TopK>     softmax top-k, renormalized
//   qwen2_moe              Layer<expert::SwiGLU, gate::TopK>     softmax top-k (norm_topk_prob), one shared
//                                                                expert of its own width with a sigmoid gate
//   qwen3_moe, olmoe       Layer<expert::SwiGLU, gate::TopK>     softmax top-k (norm_topk_prob)
//   deepseek_v2            Layer<expert::SwiGLU, gate::TopK>     softmax, greedy or group-limited (groups scored
//                                                                by their best probability), scaled, not
//                                                                renormalized; shared experts
//   deepseek_v3, glm4_moe  Layer<expert::SwiGLU, gate::SigmoidBias>  sigmoid, correction bias, group limit,
//                                                                scaled (norm_topk_prob); shared experts
//   gpt_oss                Layer<expert::SwiGLU, gate::TopK>     router with a bias, softmax over the top-k
//                                                                logits; experts with biases and GPT-OSS's
//                                                                clamped SwiGLU
//
// Both weight layouts are read: per-expert tensors (experts.<i>.w1.weight / gate_proj.weight,
// ...: the released checkpoints) and the fused experts.gate_up_proj [n, 2h, d] and
// experts.down_proj [n, d, h] that transformers 5 writes (GPT-OSS: gate_up_proj [n, d, 2h] with
// gate and up interleaved, down_proj [n, h, d], and their biases). Any floating dtype (BF16, F16,
// F32, F64) is converted. What the library cannot express is a moe::Error naming it: another
// model_type, a dense layer, quantized weights (MXFP4, FP8), an activation other than silu,
// Mixtral's router jitter.
//
//   const auto model = moe::io::HfModel::open("Qwen1.5-MoE-A2.7B");
//   const moe::io::HfBlock block = model.block(3);            // block.gate: "TopK"
//   using L = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<float>>;
//   L layer(moe::io::hf_config<L>(block));
//   moe::io::load_hf(layer, model, block);

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/expert/swiglu.hpp"
#include "moe/gate/sigmoid_bias.hpp"
#include "moe/gate/top_k.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/parameter.hpp"

namespace moe::io {

// One layer's MoE block as config.json describes it, and where its tensors are.
struct HfBlock {
  std::string model_type;  // config.json's model_type
  Index layer = 0;
  std::string prefix;      // of the block's tensors, e.g. "model.layers.3.mlp."
  std::string gate;        // the gate family the layer needs: "TopK" or "SigmoidBias"
  Index d_model = 0, n_experts = 0;
  expert::SwiGLU::Config expert{};
  gate::TopK::Config top_k{};                 // when gate == "TopK"
  gate::SigmoidBias::Config sigmoid_bias{};   // when gate == "SigmoidBias"
  Index shared_experts = 0;                   // 0 or 1 (DeepSeek's n_shared_experts are one MLP of their summed width)
  std::optional<expert::SwiGLU::Config> shared_expert;
  bool shared_gate = false;                   // Qwen2-MoE's sigmoid gate on the shared expert
  double aux_loss_coef = 0;  // router_aux_loss_coef: set top_k.w_aux to it to train with the model's loss
  enum class Layout { per_expert, fused, gpt_oss } layout = Layout::per_expert;
  std::string router;              // the router's tensor name under prefix ("gate.weight", "router.weight")
  std::string router_bias;         // GPT-OSS's router bias, or empty
  std::string correction_bias;     // DeepSeek-V3's e_score_correction_bias, or empty
  std::string expert_names[3];     // per-expert tensor names of gate, up, down ("w1", "w3", "w2" or "gate_proj", ...)
  std::string shared_prefix;       // of the shared expert's tensors under prefix ("shared_experts." / "shared_expert.")
};

// A Hugging Face model directory: its config.json and every safetensors file of its weights.
class HfModel {
 public:
  static HfModel open(const std::filesystem::path& dir) {
    HfModel m;
    m.dir_ = dir;
    const auto config_path = dir / "config.json";
    m.config_ = detail::read_json_file(config_path);
    moe::detail::require(m.config_.is_object(), config_path.string(), ": expected a JSON object");
    moe::detail::require(m.config_.contains("model_type") && m.config_["model_type"].is_string(), config_path.string(),
                         ": no \"model_type\" string, expected a Hugging Face model's config.json");
    m.model_type_ = m.config_["model_type"].get<std::string>();
    const auto index_path = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(index_path)) {
      m.files_ = ShardedFiles::from_index(detail::read_json_file(index_path), dir, index_path.string());
    } else {
      const auto single = dir / "model.safetensors";
      moe::detail::require(std::filesystem::exists(single), dir.string(),
                           ": neither model.safetensors nor model.safetensors.index.json, expected the weights of a "
                           "Hugging Face model");
      m.files_ = ShardedFiles::from_file(single);
    }
    return m;
  }

  [[nodiscard]] const std::filesystem::path& directory() const { return dir_; }
  [[nodiscard]] const nlohmann::json& config() const { return config_; }
  [[nodiscard]] const std::string& model_type() const { return model_type_; }
  [[nodiscard]] bool contains(const std::string& name) const { return files_.contains(name); }
  // The file holding tensor `name` (opened on first use); an Error naming the tensor if none does.
  [[nodiscard]] const SafeTensors& file_of(const std::string& name) const { return files_.file_of(name); }

  // Tensor `name` as S, checked against `shape` (and for NaN / Inf with check_finite).
  template <class S>
  [[nodiscard]] std::vector<S> read(const std::string& name, std::vector<std::int64_t> shape, bool check_finite) const {
    return file_of(name).template read<S>(name, Expect{std::move(shape), check_finite});
  }

  // The MoE block of layer `layer`, from config.json; an Error for what the library cannot express.
  [[nodiscard]] HfBlock block(Index layer) const;

 private:
  std::filesystem::path dir_;
  nlohmann::json config_;
  std::string model_type_;
  ShardedFiles files_;
};

namespace detail {

// config.json's value of `key`, or `fallback` (transformers' default for the model type) when the
// key is absent or null; an Error naming the key when its type is wrong.
template <class T>
T hf_value(const nlohmann::json& config, const std::string& model_type, const std::string& key,
           std::optional<T> fallback = std::nullopt) {
  if (!config.contains(key) || config[key].is_null()) {
    moe::detail::require(fallback.has_value(), "moe::io: config.json of this ", model_type, " model has no \"", key,
                         "\", expected it");
    return *fallback;
  }
  try {
    if constexpr (std::is_same_v<T, bool>) {
      moe::detail::require(config[key].is_boolean(), "expected true or false");
    } else if constexpr (std::is_integral_v<T>) {
      moe::detail::require(config[key].is_number_integer(), "expected an integer");
    } else if constexpr (std::is_floating_point_v<T>) {
      moe::detail::require(config[key].is_number(), "expected a number");
    }
    return config[key].get<T>();
  } catch (const std::exception& e) {
    moe::detail::fail("moe::io: config.json \"", key, "\" = ", config[key].dump(), ": ", e.what());
  }
}

}  // namespace detail

inline HfBlock HfModel::block(Index layer) const {
  const nlohmann::json& c = config_;
  const std::string& mt = model_type_;
  const auto get_int = [&](const std::string& key, std::optional<Index> fallback = std::nullopt) {
    return detail::hf_value<Index>(c, mt, key, fallback);
  };
  const auto get_real = [&](const std::string& key, std::optional<double> fallback = std::nullopt) {
    return detail::hf_value<double>(c, mt, key, fallback);
  };
  const auto get_bool = [&](const std::string& key, std::optional<bool> fallback = std::nullopt) {
    return detail::hf_value<bool>(c, mt, key, fallback);
  };
  const auto get_string = [&](const std::string& key, std::optional<std::string> fallback = std::nullopt) {
    return detail::hf_value<std::string>(c, mt, key, std::move(fallback));
  };
  // The expert count under the first of its names config.json has (transformers' attribute
  // aliases: a config written by transformers 5 may use another than the released one).
  const auto get_experts = [&](std::initializer_list<const char*> keys, Index fallback) {
    for (const char* key : keys)
      if (c.contains(key) && !c[key].is_null()) return get_int(key);
    return fallback;
  };

  static const char* const supported =
      "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe or gpt_oss";
  const bool known = mt == "mixtral" || mt == "qwen2_moe" || mt == "qwen3_moe" || mt == "olmoe" ||
                     mt == "deepseek_v2" || mt == "deepseek_v3" || mt == "glm4_moe" || mt == "gpt_oss";
  moe::detail::require(known, dir_.string(), ": model_type \"", mt, "\" has no MoE block the library imports, expected ",
                       supported);
  if (c.contains("quantization_config") && !c["quantization_config"].is_null()) {
    const auto& q = c["quantization_config"];
    const std::string method = q.is_object() && q.contains("quant_method") ? q["quant_method"].dump() : q.dump();
    moe::detail::fail(dir_.string(), ": the weights are quantized (quantization_config.quant_method = ", method,
                      "), expected unquantized weights (BF16, F16, F32 or F64): dequantize the checkpoint first");
  }
  const Index layers = get_int("num_hidden_layers");
  moe::detail::require(layer >= 0 && layer < layers, dir_.string(), ": layer ", layer, ", expected 0 <= layer < ",
                       "num_hidden_layers = ", layers);
  if (mt != "gpt_oss") {
    const std::string act = get_string("hidden_act", std::string("silu"));
    moe::detail::require(act == "silu" || act == "swish", dir_.string(), ": hidden_act = \"", act,
                         "\", expected \"silu\" (the experts are SwiGLU)");
  }

  HfBlock b;
  b.model_type = mt;
  b.layer = layer;
  b.d_model = get_int("hidden_size");
  b.gate = "TopK";
  b.router = "gate.weight";
  b.expert_names[0] = "gate_proj";
  b.expert_names[1] = "up_proj";
  b.expert_names[2] = "down_proj";
  const std::string layer_prefix = "model.layers." + std::to_string(layer) + ".";
  std::string block_name = "mlp.";
  const auto dense = [&](const char* why) {
    moe::detail::fail(dir_.string(), ": layer ", layer, " of this ", mt, " model is a dense MLP, not an MoE block (",
                      why, ")");
  };

  if (mt == "mixtral") {
    b.n_experts = get_experts({"num_local_experts", "num_experts"}, 8);
    b.expert.hidden = get_int("intermediate_size", 14336);
    b.top_k.k = get_int("num_experts_per_tok", 2);
    b.aux_loss_coef = get_real("router_aux_loss_coef", 0.001);
    const double jitter = get_real("router_jitter_noise", 0.0);
    moe::detail::require(jitter == 0.0, dir_.string(), ": router_jitter_noise = ", jitter,
                         ", expected 0 (the library's TopK has no multiplicative input jitter)");
    b.expert_names[0] = "w1";
    b.expert_names[1] = "w3";
    b.expert_names[2] = "w2";
    // The released checkpoints name the block block_sparse_moe; transformers 5 writes mlp.
    if (contains(layer_prefix + "block_sparse_moe.gate.weight")) block_name = "block_sparse_moe.";
  } else if (mt == "qwen2_moe" || mt == "qwen3_moe") {
    b.n_experts = get_experts({"num_experts", "num_local_experts"}, mt == "qwen2_moe" ? 60 : 128);
    b.expert.hidden = get_int("moe_intermediate_size", mt == "qwen2_moe" ? 1408 : 768);
    b.top_k.k = get_int("num_experts_per_tok", mt == "qwen2_moe" ? 4 : 8);
    b.top_k.normalize = get_bool("norm_topk_prob", false);
    b.aux_loss_coef = get_real("router_aux_loss_coef", 0.001);
    const Index step = get_int("decoder_sparse_step", 1);
    bool only_mlp = false;
    if (c.contains("mlp_only_layers") && c["mlp_only_layers"].is_array())
      for (const auto& v : c["mlp_only_layers"])
        if (v.is_number_integer() && v.get<Index>() == layer) only_mlp = true;
    if (only_mlp) dense("it is in mlp_only_layers");
    if (b.n_experts <= 0 || step <= 0 || (layer + 1) % step != 0) dense("decoder_sparse_step, num_experts");
    if (mt == "qwen2_moe") {
      b.shared_experts = 1;
      b.shared_expert = expert::SwiGLU::Config{.hidden = get_int("shared_expert_intermediate_size", 5632)};
      b.shared_gate = true;
      b.shared_prefix = "shared_expert.";
    }
  } else if (mt == "olmoe") {
    b.n_experts = get_experts({"num_experts", "num_local_experts"}, 64);
    b.expert.hidden = get_int("intermediate_size", 2048);
    b.top_k.k = get_int("num_experts_per_tok", 8);
    b.top_k.normalize = get_bool("norm_topk_prob", false);
    b.aux_loss_coef = get_real("router_aux_loss_coef", 0.01);
  } else if (mt == "deepseek_v2" || mt == "deepseek_v3" || mt == "glm4_moe") {
    const bool v2 = mt == "deepseek_v2";
    b.n_experts = get_experts({"n_routed_experts", "num_local_experts", "num_experts"},
                              v2 ? 64 : (mt == "deepseek_v3" ? 256 : 128));
    b.expert.hidden = get_int("moe_intermediate_size", v2 ? 1407 : (mt == "deepseek_v3" ? 2048 : 1408));
    const Index k = get_int("num_experts_per_tok", v2 ? std::optional<Index>{} : std::optional<Index>{8});
    if (layer < get_int("first_k_dense_replace", v2 ? 0 : (mt == "deepseek_v3" ? 3 : 1)))
      dense("first_k_dense_replace");
    const Index shared = get_int("n_shared_experts", v2 ? 2 : 1);
    if (shared > 0) {
      b.shared_experts = 1;
      b.shared_expert = expert::SwiGLU::Config{.hidden = shared * b.expert.hidden};
      b.shared_prefix = "shared_experts.";
    }
    const double scale = get_real("routed_scaling_factor", v2 ? 1.0 : (mt == "deepseek_v3" ? 2.5 : 1.0));
    if (v2) {
      moe::detail::require(!get_bool("mlp_bias", false), dir_.string(),
                           ": mlp_bias = true, expected false (DeepSeek-V2's experts without biases)");
      const std::string scoring = get_string("scoring_func", std::string("softmax"));
      moe::detail::require(scoring == "softmax", dir_.string(), ": scoring_func = \"", scoring,
                           "\", expected \"softmax\" for deepseek_v2");
      const std::string method = get_string("topk_method", std::string("greedy"));
      b.top_k.k = k;
      b.top_k.normalize = false;  // transformers' DeepseekV2 router scales without renormalizing
      b.top_k.scale = scale;
      if (method == "group_limited_greedy") {
        b.top_k.expert_groups = get_int("n_group");
        b.top_k.top_groups = get_int("topk_group");
      } else {
        moe::detail::require(method == "greedy", dir_.string(), ": topk_method = \"", method,
                             "\", expected \"greedy\" or \"group_limited_greedy\"");
      }
    } else {
      b.gate = "SigmoidBias";
      b.correction_bias = "gate.e_score_correction_bias";
      b.sigmoid_bias = gate::SigmoidBias::Config{.k = k,
                                                 .expert_groups = get_int("n_group", mt == "deepseek_v3" ? 8 : 1),
                                                 .top_groups = get_int("topk_group", mt == "deepseek_v3" ? 4 : 1),
                                                 .bias_rate = 0.0,
                                                 .normalize = get_bool("norm_topk_prob", true),
                                                 .scale = scale};
    }
  } else {  // gpt_oss
    b.n_experts = get_experts({"num_local_experts", "num_experts"}, 128);
    b.expert = expert::SwiGLU::Config{.hidden = get_int("intermediate_size", 2880),
                                      .bias = true,
                                      .alpha = get_real("swiglu_alpha", 1.702),
                                      .limit = get_real("swiglu_limit", 7.0),
                                      .up_offset = 1.0};
    b.top_k.k = get_int("num_experts_per_tok", 4);
    b.top_k.router_bias = true;
    b.aux_loss_coef = get_real("router_aux_loss_coef", 0.001);
    b.router = "router.weight";
    b.router_bias = "router.bias";
    b.layout = HfBlock::Layout::gpt_oss;
  }
  b.prefix = layer_prefix + block_name;
  // The library's balancing terms are off: set them (top_k.w_aux = aux_loss_coef, ...) to train.
  b.top_k.w_importance = 0;
  b.top_k.w_load = 0;
  b.top_k.w_z = 0;
  b.sigmoid_bias.w_importance = 0;
  b.sigmoid_bias.w_load = 0;

  moe::detail::require(contains(b.prefix + b.router), dir_.string(), ": no tensor '", b.prefix + b.router,
                       "', expected layer ", layer, "'s router (is the layer an MoE block of a ", mt, " model?)");
  if (b.layout == HfBlock::Layout::gpt_oss) {
    moe::detail::require(!contains(b.prefix + "experts.gate_up_proj_blocks"), dir_.string(), ": tensor '",
                         b.prefix + "experts.gate_up_proj_blocks",
                         "' holds MXFP4-quantized experts, expected unquantized weights: dequantize the checkpoint first");
  } else if (contains(b.prefix + "experts.gate_up_proj")) {
    b.layout = HfBlock::Layout::fused;
  } else {
    const std::string first = b.prefix + "experts.0." + b.expert_names[0] + ".weight";
    moe::detail::require(contains(first), dir_.string(), ": neither '", first, "' nor '", b.prefix,
                         "experts.gate_up_proj', expected the experts of layer ", layer,
                         " in one of the two layouts (per expert, or fused)");
    moe::detail::require(!contains(b.prefix + "experts.0." + b.expert_names[0] + ".weight_scale_inv"), dir_.string(),
                         ": the experts have FP8 block scales (weight_scale_inv), expected unquantized weights: "
                         "dequantize the checkpoint first");
  }
  return b;
}

// The Config of layer type L for the block. L must be Layer<expert::SwiGLU, gate::TopK or
// gate::SigmoidBias (as block.gate says), B> of depth 1.
template <class L>
typename L::Config hf_config(const HfBlock& block) {
  static_assert(std::is_same_v<typename L::ExpertTag, expert::SwiGLU> && L::depth == 1,
                "moe::io::hf_config: the layer must be moe::Layer<expert::SwiGLU, gate::TopK or gate::SigmoidBias, B>");
  typename L::Config c{};
  c.d_model = block.d_model;
  c.n_experts = block.n_experts;
  c.expert = block.expert;
  c.shared_experts = block.shared_experts;
  c.shared_expert = block.shared_expert;
  c.shared_gate = block.shared_gate;
  if constexpr (std::is_same_v<typename L::GateTag, gate::TopK>) {
    moe::detail::require(block.gate == "TopK", "moe::io::hf_config: layer ", block.layer, " of this ", block.model_type,
                         " model needs gate::", block.gate, ", the layer type has gate::TopK");
    c.gate = block.top_k;
  } else if constexpr (std::is_same_v<typename L::GateTag, gate::SigmoidBias>) {
    moe::detail::require(block.gate == "SigmoidBias", "moe::io::hf_config: layer ", block.layer, " of this ",
                         block.model_type, " model needs gate::", block.gate, ", the layer type has gate::SigmoidBias");
    c.gate = block.sigmoid_bias;
  } else {
    static_assert(sizeof(L) == 0, "moe::io::hf_config: the gate must be gate::TopK or gate::SigmoidBias");
  }
  return c;
}

namespace detail {

// The block's tensors in the library's layout, read and checked before the layer changes.
template <class S>
struct HfTensors {
  std::map<std::string, std::vector<S>> by_parameter;  // "gate.w_gate", "experts.w1", ... -> values
  std::vector<S> correction_bias;                      // [n] or empty
};

// dst[c * rows + r] = src[r * cols + c]: the transpose of [rows x cols], appended.
template <class S>
void append_transposed(std::vector<S>& dst, const S* src, std::int64_t rows, std::int64_t cols) {
  const std::size_t base = dst.size();
  dst.resize(base + static_cast<std::size_t>(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      dst[base + static_cast<std::size_t>(c * rows + r)] = src[static_cast<std::size_t>(r * cols + c)];
}

template <class S>
HfTensors<S> read_hf_tensors(const HfModel& model, const HfBlock& b, Index first, Index count, bool check_finite) {
  const std::int64_t d = b.d_model, n = b.n_experts, h = b.expert.hidden;
  const std::string& p = b.prefix;
  HfTensors<S> out;
  auto& t = out.by_parameter;
  {
    const auto w = model.read<S>(p + b.router, {n, d}, check_finite);
    append_transposed(t["gate.w_gate"], w.data(), n, d);
  }
  if (!b.router_bias.empty()) t["gate.b_gate"] = model.read<S>(p + b.router_bias, {n}, check_finite);
  if (!b.correction_bias.empty()) out.correction_bias = model.read<S>(p + b.correction_bias, {n}, check_finite);
  auto& w1 = t["experts.w1"];
  auto& w3 = t["experts.w3"];
  auto& w2 = t["experts.w2"];
  if (b.layout == HfBlock::Layout::per_expert) {
    for (Index e = first; e < first + count; ++e) {
      const std::string ep = p + "experts." + std::to_string(e) + ".";
      const auto g = model.read<S>(ep + b.expert_names[0] + ".weight", {h, d}, check_finite);
      const auto u = model.read<S>(ep + b.expert_names[1] + ".weight", {h, d}, check_finite);
      const auto o = model.read<S>(ep + b.expert_names[2] + ".weight", {d, h}, check_finite);
      append_transposed(w1, g.data(), h, d);
      append_transposed(w3, u.data(), h, d);
      append_transposed(w2, o.data(), d, h);
    }
  } else if (b.layout == HfBlock::Layout::fused) {
    // gate_up_proj [n, 2h, d]: rows [0, h) the gate, [h, 2h) up; down_proj [n, d, h].
    const auto gu = model.read<S>(p + "experts.gate_up_proj", {n, 2 * h, d}, check_finite);
    const auto down = model.read<S>(p + "experts.down_proj", {n, d, h}, check_finite);
    for (Index e = first; e < first + count; ++e) {
      append_transposed(w1, gu.data() + e * 2 * h * d, h, d);
      append_transposed(w3, gu.data() + e * 2 * h * d + h * d, h, d);
      append_transposed(w2, down.data() + e * d * h, d, h);
    }
  } else {
    // GPT-OSS: gate_up_proj [n, d, 2h] (x W layout), columns 2j the gate, 2j + 1 up; down_proj [n, h, d].
    const auto gu = model.read<S>(p + "experts.gate_up_proj", {n, d, 2 * h}, check_finite);
    const auto gub = model.read<S>(p + "experts.gate_up_proj_bias", {n, 2 * h}, check_finite);
    const auto down = model.read<S>(p + "experts.down_proj", {n, h, d}, check_finite);
    const auto downb = model.read<S>(p + "experts.down_proj_bias", {n, d}, check_finite);
    auto& b1 = t["experts.b1"];
    auto& b3 = t["experts.b3"];
    auto& b2 = t["experts.b2"];
    for (Index e = first; e < first + count; ++e) {
      for (std::int64_t r = 0; r < d; ++r)
        for (std::int64_t j = 0; j < h; ++j) {
          w1.push_back(gu[static_cast<std::size_t>((e * d + r) * 2 * h + 2 * j)]);
          w3.push_back(gu[static_cast<std::size_t>((e * d + r) * 2 * h + 2 * j + 1)]);
        }
      for (std::int64_t j = 0; j < h; ++j) {
        b1.push_back(gub[static_cast<std::size_t>(e * 2 * h + 2 * j)]);
        b3.push_back(gub[static_cast<std::size_t>(e * 2 * h + 2 * j + 1)]);
      }
      w2.insert(w2.end(), down.begin() + e * h * d, down.begin() + (e + 1) * h * d);
      b2.insert(b2.end(), downb.begin() + e * d, downb.begin() + (e + 1) * d);
    }
  }
  if (b.shared_experts > 0) {
    const std::int64_t hs = b.shared_expert ? b.shared_expert->hidden : h;
    const std::string sp = p + b.shared_prefix;
    const auto g = model.read<S>(sp + "gate_proj.weight", {hs, d}, check_finite);
    const auto u = model.read<S>(sp + "up_proj.weight", {hs, d}, check_finite);
    const auto o = model.read<S>(sp + "down_proj.weight", {d, hs}, check_finite);
    append_transposed(t["shared_experts.w1"], g.data(), hs, d);
    append_transposed(t["shared_experts.w3"], u.data(), hs, d);
    append_transposed(t["shared_experts.w2"], o.data(), d, hs);
  }
  if (b.shared_gate) t["shared_gate.w_gate"] = model.read<S>(p + "shared_expert_gate.weight", {1, d}, check_finite);
  return out;
}

}  // namespace detail

// Loads the block into a layer built from hf_config<L>(block): every parameter of the layer from
// the block's tensors (transposed into the library's x W layout), and DeepSeek-V3's correction
// bias as the SigmoidBias selection bias. Everything is read and checked first: on an Error the
// layer is unchanged. A sharded layer reads its own experts only.
template <class L>
void load_hf(L& layer, const HfModel& model, const HfBlock& block, bool check_finite = true) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const auto& c = layer.config();
  moe::detail::require(c.d_model == block.d_model && c.n_experts == block.n_experts &&
                           c.expert.hidden == block.expert.hidden && c.shared_experts == block.shared_experts,
                       "moe::io::load_hf: the layer has d_model = ", c.d_model, ", n_experts = ", c.n_experts,
                       ", hidden = ", c.expert.hidden, ", shared_experts = ", c.shared_experts,
                       "; expected the block's ", block.d_model, ", ", block.n_experts, ", ", block.expert.hidden, ", ",
                       block.shared_experts, " (build it from moe::io::hf_config)");
  const ExpertShard shard = layer.expert_shard();
  const detail::HfTensors<S> tensors =
      detail::read_hf_tensors<S>(model, block, shard.first, layer.experts().n_experts(), check_finite);
  std::vector<std::pair<const std::vector<S>*, Parameter<S>>> targets;
  for (auto& param : layer.parameters()) {
    const auto it = tensors.by_parameter.find(param.name);
    moe::detail::require(it != tensors.by_parameter.end(), "moe::io::load_hf: parameter '", param.name,
                         "' of the layer has no counterpart in layer ", block.layer, " of this ", block.model_type,
                         " model");
    moe::detail::require(static_cast<Index>(it->second.size()) == param.size(), "moe::io::load_hf: parameter '",
                         param.name, "' has ", param.size(), " values, the block's tensors ", it->second.size());
    targets.emplace_back(&it->second, param);
  }
  typename B::Context ctx;
  for (auto& [src, param] : targets) {
    B::copy(ctx, ConstMatrixView<S>{src->data(), 1, param.size()}, MatrixView<S>{param.value.data, 1, param.size()});
    param.changed();
  }
  B::synchronize(ctx);
  if constexpr (std::is_same_v<typename L::GateTag, gate::SigmoidBias>) {
    if (!tensors.correction_bias.empty()) {
      typename B::template Buffer<S> bias(1, block.n_experts);
      B::copy(ctx, ConstMatrixView<S>{tensors.correction_bias.data(), 1, block.n_experts}, bias.view());
      B::synchronize(ctx);
      layer.gate().set_bias(ConstMatrixView<S>(bias.view()));
    }
  }
}

// The layer of type L for layer `layer` of the model in `dir`, built and loaded.
template <class L>
L load_hf_layer(const std::filesystem::path& dir, Index layer, bool check_finite = true) {
  const HfModel model = HfModel::open(dir);
  const HfBlock block = model.block(layer);
  L out(hf_config<L>(block));
  load_hf(out, model, block, check_finite);
  return out;
}

}  // namespace moe::io
