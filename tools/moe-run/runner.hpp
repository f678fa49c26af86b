#pragma once
// moe-run's core: one layer type, one job. Builds the layer from the configuration, loads the
// weights, runs forward (and backward when dy is given) and writes every result to a
// safetensors file. Instantiated once per (backend, expert, gate, depth, scalar) in the
// dispatch translation units; main.cpp only parses the command line.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/config.hpp"
#include "moe/io/hf.hpp"
#include "moe/io/mixtral.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/layer.hpp"
#include "moe/random.hpp"

namespace moe_run {

using moe::Index;
using moe::io::Metadata;

struct Job {
  std::filesystem::path weights, input, output;
  Metadata config;                     // the layer's description (moe::io::describe's keys)
  std::optional<std::string> mixtral;  // set: the weights are a Mixtral-style block under this prefix
  std::optional<std::filesystem::path> hf;  // set: a Hugging Face model directory (--hf), its layer hf_layer
  Index hf_layer = -1;
  // --set KEY=VALUE, in order: configuration keys without "config." ("gate.w_z"), over any source.
  std::vector<std::pair<std::string, std::string>> settings;
  Index mixtral_k = 2;                 // experts per token of the Mixtral block
  moe::Mode mode = moe::Mode::train;
  std::uint64_t noise_seed = 0;  // the gate's noise when the input has no `noise` tensor
  int threads = 0;
  std::string backend = "cpu";
  bool check_finite = true;
};

// Whether L is a layer a Hugging Face MoE block loads into (moe/io/hf.hpp).
template <class L>
inline constexpr bool is_hf_layer =
    std::is_same_v<typename L::ExpertTag, moe::expert::SwiGLU> && L::depth == 1 &&
    (std::is_same_v<typename L::GateTag, moe::gate::TopK> || std::is_same_v<typename L::GateTag, moe::gate::SigmoidBias>);

namespace detail {

template <class S>
void add_matrix(moe::io::SafeTensorsWriter& w, const std::string& name, const std::vector<S>& v, Index rows, Index cols) {
  w.add(name, {rows, cols}, std::span<const S>(v));
}
template <class S>
void add_vector(moe::io::SafeTensorsWriter& w, const std::string& name, const std::vector<S>& v) {
  w.add(name, {static_cast<std::int64_t>(v.size())}, std::span<const S>(v));
}
template <class S>
void add_scalar(moe::io::SafeTensorsWriter& w, const std::string& name, S v) {
  w.add(name, {}, std::span<const S>(&v, 1));
}

// The host matrix [rows x cols] of `name` in the input file, in backend memory.
template <class B>
moe::ConstMatrixView<typename B::Scalar> upload(typename B::Context& ctx, const moe::io::SafeTensors& in,
                                                 const std::string& name, Index cols,
                                                 typename B::template Buffer<typename B::Scalar>& buf, bool finite) {
  using S = typename B::Scalar;
  const auto& info = in.info(name);
  moe::detail::require(info.shape.size() == 2 && info.shape[1] == cols, in.origin(), ": tensor '", name,
                       "' has shape ", moe::io::detail::shape_string(info.shape), ", expected [T, ", cols, "]");
  const std::vector<S> host = in.read<S>(name, moe::io::Expect{std::nullopt, finite});
  moe::from_host<B>(ctx, host, buf);
  B::synchronize(ctx);
  return {buf.view().data, info.shape[0], cols};
}

// The input tensors moe-run reads; any other name is refused (a misspelt `noise` or `dy` would
// otherwise be ignored without a word).
inline constexpr const char* input_names[] = {"x", "noise", "dy"};

inline void check_input_names(const moe::io::SafeTensors& in) {
  for (const auto& t : in.tensors()) {
    bool known = false;
    for (const char* name : input_names) known = known || t.name == name;
    moe::detail::require(known, in.origin(), ": tensor '", t.name,
                         "' is not an input of moe-run, expected x [T, d], noise [T, noise columns] or dy [T, d]");
  }
}

// The configuration keys --set takes: describe()'s "config." keys without the prefix, but the
// seed (the weights replace the values it chose) and check_finite (--no-check-finite).
inline bool settable(const std::string& key) { return key != "seed" && key != "check_finite"; }

// The configuration with the --set values applied, one after the other: written as metadata by
// moe::io::describe, the key's value replaced, read back by moe::io::layer_config, so a value
// is parsed as in a weights file's metadata. An unknown key or a value that does not parse is an
// Error naming it.
template <class L>
typename L::Config apply_settings(typename L::Config config,
                                  const std::vector<std::pair<std::string, std::string>>& settings) {
  for (const auto& [key, value] : settings) {
    Metadata m = moe::io::describe<L>(config);
    const std::string full = "config." + key;
    if (!m.contains(full) || !settable(key)) {
      std::string keys;
      for (const auto& entry : m) {
        if (entry.first.rfind("config.", 0) != 0) continue;
        const std::string k = entry.first.substr(7);
        if (settable(k)) keys += (keys.empty() ? "" : ", ") + k;
      }
      const char* why = "";
      if (key == "seed") why = " (the seed only chose initial values, which the weights replace)";
      else if (key == "check_finite") why = " (use --no-check-finite)";
      else if (key.rfind("config.", 0) == 0) why = " (write keys without the 'config.' prefix)";
      moe::detail::fail("moe-run: --set ", key, "=", value, ": '", key, "' is not a key --set takes for this layer",
                        why, "; expected one of: ", keys);
    }
    m[full] = value;
    try {
      config = moe::io::layer_config<L>(m, "moe-run: --set");
    } catch (const moe::Error& e) {
      // layer_config's message is "moe::io: metadata '<key>' = '<value>', expected ...": keep the
      // expectation, under the name the user wrote.
      std::string what = e.what();
      const std::string head = "moe::io: metadata '" + full + "' = '" + value + "', ";
      if (what.rfind(head, 0) == 0) what = what.substr(head.size());
      moe::detail::fail("moe-run: --set ", key, "=", value, ": ", what);
    }
  }
  return config;
}

}  // namespace detail

// Runs the job on a layer of type L. Output tensors (see docs/interop.md):
//   y [T, d], gates [T, k], experts I64 [T, k] (-1: no expert computed the slot),
//   loss, loss_importance, loss_load, loss_aux, loss_z, cv2_importance, cv2_load [] ,
//   importance [n], load [n], tokens_per_expert I64 [n], dropped_tokens I64 [],
//   level.<l>.importance / load / count / cv2_importance / cv2_load for a hierarchy,
//   with dy: dx [T, d] and grad.<name> for every checkpoint tensor of the layer.
template <class L>
void run(const Job& job) {
  using B = typename L::Backend;
  using S = typename L::Scalar;
  const moe::io::SafeTensors in = moe::io::SafeTensors::open(job.input);
  detail::check_input_names(in);
  const bool has_noise = in.contains("noise");
  moe::detail::require(!has_noise || job.mode == moe::Mode::train, in.origin(), ": tensor 'noise' with --mode ",
                       "inference, where no gate draws noise; drop it or run --mode train");

  // The layer's configuration and weights: a Hugging Face directory, a Mixtral block, or a file
  // with the library's names (its own metadata or --config).
  std::optional<moe::io::HfModel> model;
  std::optional<moe::io::HfBlock> block;
  std::optional<moe::io::SafeTensors> weights;
  typename L::Config config{};
  if (job.hf) {
    if constexpr (is_hf_layer<L>) {
      model.emplace(moe::io::HfModel::open(*job.hf));
      block.emplace(model->block(job.hf_layer));
      config = moe::io::hf_config<L>(*block);
    }
  } else {
    weights.emplace(moe::io::SafeTensors::open(job.weights));
    if constexpr (moe::io::is_mixtral_layer<L>) {
      if (job.mixtral) config = moe::io::mixtral_config<L>(*weights, *job.mixtral, job.mixtral_k);
    }
    if (!job.mixtral) config = moe::io::layer_config<L>(job.config, "configuration");
  }
  config = detail::apply_settings<L>(config, job.settings);
  config.threads = job.threads;
  config.check_finite = job.check_finite;
  L layer(config);
  if (job.hf) {
    if constexpr (is_hf_layer<L>) moe::io::load_hf(layer, *model, *block, job.check_finite);
  } else if (job.mixtral) {
    if constexpr (moe::io::is_mixtral_layer<L>) moe::io::load_mixtral(layer, *weights, *job.mixtral, job.check_finite);
  } else {
    // The weights' own configuration (when they have one) must be the layer's, --set applied to
    // both: what --set changes is the run's choice, the rest must match.
    Metadata theirs = weights->metadata();
    for (const auto& [key, value] : job.settings) theirs["config." + key] = value;
    moe::io::detail::check_layer_metadata(layer, theirs, weights->origin(), {.check_config = true});
    moe::io::load(layer, *weights, {.check_finite = job.check_finite, .check_config = false});
  }

  const bool reads_noise = layer.gate().needs_noise(moe::Mode::train);
  moe::detail::require(!has_noise || reads_noise, in.origin(), ": tensor 'noise', but this layer's gate (",
                       moe::io::family_name<typename L::GateTag>(),
                       ") draws no noise: only NoisyTopK with noisy = true reads it; drop the tensor");
  typename B::Context ctx;
  typename B::template Buffer<S> x_buf, noise_buf, dy_buf;
  const auto x = detail::upload<B>(ctx, in, "x", config.d_model, x_buf, job.check_finite);
  const Index t = x.rows;
  moe::Rng rng(job.noise_seed);
  moe::Noise<S> noise(rng);
  if (has_noise)
    noise = moe::Noise<S>(detail::upload<B>(ctx, in, "noise", layer.noise_columns(), noise_buf, job.check_finite));
  const auto f = layer.forward(x, job.mode, noise);

  moe::io::SafeTensorsWriter out;
  Metadata meta = moe::io::describe(layer);
  meta["run.mode"] = job.mode == moe::Mode::train ? "train" : "inference";
  meta["run.backend"] = job.backend;
  meta["run.tokens"] = std::to_string(t);
  for (const auto& [k, v] : meta) out.set_metadata(k, v);
  const Index d = config.d_model;
  detail::add_matrix(out, "y", moe::to_host<B>(ctx, f.y()), t, d);
  detail::add_matrix(out, "gates", moe::to_host<B>(ctx, f.gates()), t, f.gates().cols);
  detail::add_matrix(out, "experts", moe::to_host<B>(ctx, f.expert_index()), t, f.expert_index().cols);
  if constexpr (L::depth == 1 && requires(typename L::GatePolicy& g) {
                  g.scores(ctx, x, nullptr, moe::MatrixView<S>{}, moe::MatrixView<S>{});
                }) {
    // The router's logits and its scores over all n experts (softmax; sigmoid for SigmoidBias).
    const Index n = config.n_experts;
    typename B::template Buffer<S> logits(t, n), probabilities(t, n);
    layer.gate().scores(ctx, x, nullptr, logits.view(), probabilities.view());
    detail::add_matrix(out, "router_logits", moe::to_host<B>(ctx, moe::ConstMatrixView<S>(logits.view())), t, n);
    detail::add_matrix(out, "router_probabilities",
                       moe::to_host<B>(ctx, moe::ConstMatrixView<S>(probabilities.view())), t, n);
  }
  const auto& st = f.stats();
  detail::add_scalar(out, "loss", st.loss);
  detail::add_scalar(out, "loss_importance", st.loss_importance);
  detail::add_scalar(out, "loss_load", st.loss_load);
  detail::add_scalar(out, "loss_aux", st.loss_aux);
  detail::add_scalar(out, "loss_z", st.loss_z);
  detail::add_scalar(out, "cv2_importance", st.cv2_importance);
  detail::add_scalar(out, "cv2_load", st.cv2_load);
  detail::add_vector(out, "importance", st.importance);
  detail::add_vector(out, "load", st.load);
  detail::add_scalar(out, "load_is_count", static_cast<std::int64_t>(st.load_is_count ? 1 : 0));
  detail::add_vector(out, "tokens_per_expert", st.tokens_per_expert);
  detail::add_scalar(out, "dropped_tokens", st.dropped_tokens);
  for (std::size_t l = 0; l < st.levels.size(); ++l) {
    const auto& lv = st.levels[l];
    const std::string p = "level." + std::to_string(l) + ".";
    detail::add_vector(out, p + "importance", lv.importance);
    detail::add_vector(out, p + "load", lv.load);
    detail::add_vector(out, p + "count", lv.count);
    detail::add_scalar(out, p + "cv2_importance", lv.cv2_importance);
    detail::add_scalar(out, p + "cv2_load", lv.cv2_load);
  }

  if (in.contains("dy")) {
    const auto dy = detail::upload<B>(ctx, in, "dy", d, dy_buf, job.check_finite);
    moe::detail::require(dy.rows == t, in.origin(), ": tensor 'dy' has ", dy.rows, " rows, expected T = ", t,
                         " as x");
    layer.zero_grad();
    const auto b = layer.backward(f, dy);
    detail::add_matrix(out, "dx", moe::to_host<B>(ctx, moe::ConstMatrixView<S>(b.dx.view())), t, d);
    // The gradients under the checkpoint's names: experts split by their global index.
    std::vector<moe::io::detail::Slot<S>> slots;
    for (auto& p : layer.parameters()) {
      moe::Parameter<S> g = p;
      g.value = p.grad;
      moe::io::detail::add_parameter_slots(slots, g);
    }
    for (const auto& s : slots)
      out.add("grad." + s.name, s.shape, std::span<const S>(moe::to_host<B>(ctx, moe::ConstMatrixView<S>{s.data, 1, s.count})));
  }
  out.write(job.output);
}

// Calls run<Layer<Expert, Gate, B, Depth>> for the named expert and depth (1 to 3); false when
// the name or depth is not one this tool was built with.
template <class Gate, class B>
bool run_gate(const Job& job, const std::string& expert, int depth) {
  const auto with = [&]<class Expert>() {
    switch (depth) {
      case 1: run<moe::Layer<Expert, Gate, B, 1>>(job); return true;
      case 2: run<moe::Layer<Expert, Gate, B, 2>>(job); return true;
      case 3: run<moe::Layer<Expert, Gate, B, 3>>(job); return true;
      default: return false;
    }
  };
  if (expert == "FeedForward") return with.template operator()<moe::expert::FeedForward>();
  if (expert == "SwiGLU") return with.template operator()<moe::expert::SwiGLU>();
  return false;
}

}  // namespace moe_run
