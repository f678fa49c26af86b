#pragma once
// Import of the sparse MoE block of a Hugging Face Mixtral-style checkpoint into
// moe::Layer<expert::SwiGLU, gate::TopK, B>. One layer's block, under a tensor prefix such as
// "model.layers.0.block_sparse_moe.", holds
//   <prefix>gate.weight             [n, d]   the router: logits = x gate.weight^T
//   <prefix>experts.<i>.w1.weight   [h, d]   PyTorch Linear weights: y = x W^T
//   <prefix>experts.<i>.w3.weight   [h, d]
//   <prefix>experts.<i>.w2.weight   [d, h]
// and computes, per token, softmax over the n logits, the top k kept and renormalized (equal to a
// softmax over the kept logits: gate::TopK), and sum_i g_i w2(silu(w1 x) * w3 x) (expert::SwiGLU).
// The library stores x W (W1 as [d, h]), so each matrix is transposed on import.
//
//   const auto file = moe::io::SafeTensors::open("model-00001-of-00019.safetensors");
//   const std::string prefix = "model.layers.0.block_sparse_moe.";
//   Mixtral<B> layer(moe::io::mixtral_config<Mixtral<B>>(file, prefix));   // d, n, h from the shapes
//   moe::io::load_mixtral(layer, file, prefix);

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/expert/swiglu.hpp"
#include "moe/gate/top_k.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/parameter.hpp"

namespace moe::io {

// Whether L is the layer a Mixtral block maps to: Layer<expert::SwiGLU, gate::TopK, B>.
template <class L>
inline constexpr bool is_mixtral_layer = std::is_same_v<typename L::ExpertTag, expert::SwiGLU> &&
                                         std::is_same_v<typename L::GateTag, gate::TopK> && L::depth == 1;

// The layer's Config for the block under prefix: d and n from the router, h from expert 0's w1;
// k = 2 (Mixtral's num_experts_per_tok); no balancing or z-loss weights (Mixtral trains with
// another auxiliary loss; they do not change the forward pass).
template <class L>
typename L::Config mixtral_config(const SafeTensors& file, std::string_view prefix, Index k = 2) {
  static_assert(is_mixtral_layer<L>,
                "moe::io::mixtral_config: the layer must be moe::Layer<expert::SwiGLU, gate::TopK, B>");
  const std::string p(prefix);
  const TensorInfo& router = file.info(p + "gate.weight");
  moe::detail::require(router.shape.size() == 2, file.origin(), ": tensor '", router.name, "' has ",
                       router.shape.size(), " dimensions, expected 2 ([n_experts, d_model])");
  const TensorInfo& w1 = file.info(p + "experts.0.w1.weight");
  moe::detail::require(w1.shape.size() == 2, file.origin(), ": tensor '", w1.name, "' has ", w1.shape.size(),
                       " dimensions, expected 2 ([hidden, d_model])");
  typename L::Config c{};
  c.d_model = router.shape[1];
  c.n_experts = router.shape[0];
  c.expert.hidden = w1.shape[0];
  c.gate.k = k;
  c.gate.w_importance = 0;
  c.gate.w_load = 0;
  c.gate.w_z = 0;
  return c;
}

namespace detail {

// out [cols x rows] = in [rows x cols] transposed, both row-major.
template <class S>
std::vector<S> transposed(const std::vector<S>& in, std::int64_t rows, std::int64_t cols) {
  std::vector<S> out(in.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) out[static_cast<std::size_t>(c * rows + r)] = in[static_cast<std::size_t>(r * cols + c)];
  return out;
}

}  // namespace detail

// Loads the block under prefix into the layer; every tensor's shape must match the layer's
// (d, n, h), each an Error naming the tensor. Tensors of the file outside the block are ignored.
// check_finite: a NaN or Inf is an Error naming the tensor.
template <class L>
void load_mixtral(L& layer, const SafeTensors& file, std::string_view prefix, bool check_finite = true) {
  static_assert(is_mixtral_layer<L>,
                "moe::io::load_mixtral: the layer must be moe::Layer<expert::SwiGLU, gate::TopK, B>");
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const std::string p(prefix);
  const auto& c = layer.config();
  const std::int64_t d = c.d_model, n = c.n_experts, h = c.expert.hidden;
  // Every option must be Mixtral's, or the loaded layer would compute another block.
  const auto& e = c.expert;
  const auto& g = c.gate;
  moe::detail::require(!e.bias && e.alpha == 1.0 && e.limit == 0.0 && e.up_offset == 0.0 && g.normalize &&
                           g.scale == 1.0 && g.expert_groups == 1 && !g.router_bias,
                       "moe::io::load_mixtral: the layer's options are not Mixtral's (expert bias = ", e.bias,
                       ", alpha = ", e.alpha, ", limit = ", e.limit, ", up_offset = ", e.up_offset,
                       "; gate normalize = ", g.normalize, ", scale = ", g.scale, ", expert_groups = ", g.expert_groups,
                       ", router_bias = ", g.router_bias,
                       "), expected the defaults; use moe::io::load_hf for the other families");
  const auto read = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    return detail::transposed(file.read<S>(name, Expect{std::vector<std::int64_t>{rows, cols}, check_finite}), rows, cols);
  };
  // Everything is read and checked before the layer changes.
  const std::vector<S> w_gate = read(p + "gate.weight", n, d);  // -> [d, n]
  std::vector<S> w1, w3, w2;
  w1.reserve(static_cast<std::size_t>(n * d * h));
  w3.reserve(w1.capacity());
  w2.reserve(w1.capacity());
  for (std::int64_t i = 0; i < n; ++i) {
    const std::string e = p + "experts." + std::to_string(i) + ".";
    const auto a = read(e + "w1.weight", h, d), b = read(e + "w3.weight", h, d), o = read(e + "w2.weight", d, h);
    w1.insert(w1.end(), a.begin(), a.end());
    w3.insert(w3.end(), b.begin(), b.end());
    w2.insert(w2.end(), o.begin(), o.end());
  }
  std::vector<std::pair<const std::vector<S>*, Parameter<S>>> targets;
  for (auto& param : layer.parameters()) {
    const std::vector<S>* src = param.name == "gate.w_gate" ? &w_gate
                                : param.name == "experts.w1" ? &w1
                                : param.name == "experts.w3" ? &w3
                                : param.name == "experts.w2" ? &w2
                                                             : nullptr;
    moe::detail::require(src != nullptr && static_cast<Index>(src->size()) == param.size(), "moe::io::load_mixtral: parameter '",
                         param.name, "' of the layer has no counterpart in a Mixtral block (shared experts?)");
    targets.emplace_back(src, param);
  }
  typename B::Context ctx;
  for (auto& [src, param] : targets) {
    B::copy(ctx, ConstMatrixView<S>{src->data(), 1, param.size()}, MatrixView<S>{param.value.data, 1, param.size()});
    param.changed();
  }
  B::synchronize(ctx);
}

}  // namespace moe::io
