#pragma once
// moe-run's core: one layer type, one job. Builds the layer from the configuration, loads the
// weights, runs forward (and backward when dy is given) and writes every result to a
// safetensors file. Instantiated once per (backend, expert, gate, depth, scalar) in the
// dispatch translation units; main.cpp only parses the command line.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/config.hpp"
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
  Index mixtral_k = 2;                 // experts per token of the Mixtral block
  moe::Mode mode = moe::Mode::train;
  std::uint64_t noise_seed = 0;  // the gate's noise when the input has no `noise` tensor
  int threads = 0;
  std::string backend = "cpu";
  bool check_finite = true;
};

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
  const moe::io::SafeTensors weights = moe::io::SafeTensors::open(job.weights);
  typename L::Config config{};
  if constexpr (moe::io::is_mixtral_layer<L>) {
    if (job.mixtral) config = moe::io::mixtral_config<L>(weights, *job.mixtral, job.mixtral_k);
  }
  if (!job.mixtral) config = moe::io::layer_config<L>(job.config, "configuration");
  config.threads = job.threads;
  config.check_finite = job.check_finite;
  L layer(config);
  if constexpr (moe::io::is_mixtral_layer<L>) {
    if (job.mixtral) moe::io::load_mixtral(layer, weights, *job.mixtral, job.check_finite);
  }
  if (!job.mixtral) moe::io::load(layer, weights, {.check_finite = job.check_finite, .check_config = true});

  const moe::io::SafeTensors in = moe::io::SafeTensors::open(job.input);
  typename B::Context ctx;
  typename B::template Buffer<S> x_buf, noise_buf, dy_buf;
  const auto x = detail::upload<B>(ctx, in, "x", config.d_model, x_buf, job.check_finite);
  const Index t = x.rows;
  moe::Rng rng(job.noise_seed);
  moe::Noise<S> noise(rng);
  if (in.contains("noise")) noise = moe::Noise<S>(detail::upload<B>(ctx, in, "noise", layer.noise_columns(), noise_buf, job.check_finite));
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
