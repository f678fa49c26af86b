#pragma once
// Checkpoints: a layer's parameters (and non-trainable state such as SigmoidBias's selection
// bias) in a safetensors file, with the layer's configuration in its metadata.
//
// Names are the parameters' stable dotted names, except that the experts are stored one tensor
// per expert under its global index: "experts.3.w1" [d, h] where the layer holds "experts.w1"
// [n, d, h] (shared experts likewise, "shared_experts.0.w1"). A file thus lists every expert
// by the same name whatever the expert placement of the run that wrote it.
//   gate.w_gate [d, n]           (a hierarchy: gate.0.w_gate [d, a], gate.1.w_gate [a, d, b], ...)
//   gate.bias [1, n]             (SigmoidBias: the selection bias; gate.<l>.bias [groups, b] per level)
//   experts.<i>.<weight>         (FeedForward: w1 [d, h], w2 [h, d], b1 [h], b2 [d]; SwiGLU: w1, w3, w2,
//                                 with bias also b1 [h], b3 [h], b2 [d])
//
//   moe::io::save(layer, "layer.safetensors");             // atomic: temp file, fsync, rename
//   moe::io::load(layer, "layer.safetensors");             // every tensor checked, see LoadOptions
//   auto layer2 = moe::io::load_layer<Moe>("layer.safetensors");  // built from the metadata
//
// A layer sharded across processes saves one file per rank, as Hugging Face's sharded
// checkpoints do: save_sharded(layer, dir) writes dir/model-0000r-of-0000P.safetensors (rank
// r - 1's experts; the first file also the replicated tensors) and dir/model.safetensors.index.json
// (the metadata, and which file holds each tensor). load_sharded(layer, dir) reads the tensors
// a rank holds from whichever files hold them, whatever rank count wrote them; load(layer, file)
// reads a sharded layer's tensors from one file.
//
// A training checkpoint adds the optimizer's state, so that a run resumes exactly: every overload
// also takes the optimizer (moe::optim::Adam, Sgd; see moe/optim/state.hpp), whose per-parameter
// tensors go in the same file under the layer's names, prefixed ("optimizer.m.experts.3.w1"),
// and its kind, step count, learning rate and settings in the metadata ("optimizer",
// "optimizer.steps", ...). SaveOptions::noise and LoadOptions::noise save and restore the gate
// noise generator's position as well ("noise.seed", "noise.step").
//   moe::io::save(layer, adam, "run.safetensors", {.noise = &rng});
//   moe::io::load(layer, adam, "run.safetensors", {.noise = &rng});   // all checked, then restored
// Loading the layer alone from such a file ignores the optimizer's tensors.

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/io/atomic_file.hpp"
#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/optim/state.hpp"
#include "moe/parameter.hpp"
#include "moe/random.hpp"

namespace moe::io {

struct SaveOptions {
  std::optional<Dtype> dtype{};  // of the stored weights: F32, F64, BF16 or F16; default: the layer's scalar
                                 // (an optimizer's state is always stored in the layer's scalar)
  Metadata metadata{};           // added to the layer's own (its keys may not collide with them)
  const Rng* noise = nullptr;    // when set: the gate noise generator's seed and step, in the metadata
};

struct LoadOptions {
  bool check_finite = true;       // a NaN or Inf in a weight is an Error naming the tensor (a selection bias and an
                                  // optimizer's state are always checked)
  bool check_config = true;       // when the file has the layer's metadata (format moe.layer/1): it must describe this
                                  // layer's Config; an optimizer's settings (betas, eps, ...) must be the optimizer's
  bool allow_unexpected = false;  // tensors the layer does not have are ignored instead of an Error
  Rng* noise = nullptr;           // when set: restored from the file, which must hold it (SaveOptions::noise)
};

namespace detail {

// One parameter tensor of a checkpoint: `count` values of the layer's backend memory at `data`,
// stored under `name` with `shape`.
template <class S>
struct Slot {
  std::string name;
  std::vector<std::int64_t> shape;
  S* data = nullptr;
  Index count = 0;
};

// first_expert: the global index of the layer's first routed expert (a rank's shard).
template <class S>
void add_parameter_slots(std::vector<Slot<S>>& slots, Parameter<S>& p, Index first_expert = 0) {
  const bool stacked = p.name.rfind("experts.", 0) == 0 || p.name.rfind("shared_experts.", 0) == 0;
  if (!stacked) {
    slots.push_back({p.name, {p.shape.begin(), p.shape.end()}, p.value.data, p.size()});
    return;
  }
  // "experts.w1" [n, d, h] -> "experts.<i>.w1" [d, h] for each expert i.
  const auto dot = p.name.find('.');
  const std::string group = p.name.substr(0, dot + 1), weight = p.name.substr(dot + 1);
  const Index n = p.shape.at(0);
  const Index per = n > 0 ? p.size() / n : 0;
  const Index first = group == "experts." ? first_expert : 0;
  for (Index i = 0; i < n; ++i)
    slots.push_back({group + std::to_string(first + i) + "." + weight, {p.shape.begin() + 1, p.shape.end()},
                     p.value.data + i * per, per});
}

// Every parameter tensor of the layer as checkpoint slots, in the order save writes them.
template <class L>
std::vector<Slot<typename L::Scalar>> parameter_slots(L& layer) {
  std::vector<Slot<typename L::Scalar>> slots;
  const Index first = layer.expert_shard().first;
  for (auto& p : layer.parameters()) add_parameter_slots(slots, p, first);
  return slots;
}

// i if `name` is a routed expert's tensor ("experts.<i>.<weight>") of an expert i in [0, n),
// else -1: in a sharded layer, the tensors of the other ranks' experts.
inline Index routed_expert_index(const std::string& name, Index n) {
  if (name.rfind("experts.", 0) != 0) return -1;
  const std::size_t begin = 8, dot = name.find('.', begin);
  if (dot == std::string::npos || dot == begin || dot - begin > 18) return -1;
  Index i = 0;
  for (std::size_t c = begin; c < dot; ++c) {
    if (name[c] < '0' || name[c] > '9') return -1;
    i = i * 10 + (name[c] - '0');
  }
  return i < n && std::to_string(i) == name.substr(begin, dot - begin) ? i : -1;
}
inline bool is_routed_expert_tensor(const std::string& name, Index n) { return routed_expert_index(name, n) >= 0; }

// The checks of load's metadata: the file's configuration must be this layer's.
template <class L>
void check_layer_metadata(L& layer, const Metadata& metadata, const std::string& origin, const LoadOptions& options) {
  const auto format = metadata.find("format");
  // Files of other writers may have a "format" key of their own (Hugging Face: "pt").
  if (!options.check_config || format == metadata.end() || format->second != layer_format) return;
  // Compared as values: the file's configuration read and written again in canonical form.
  const Metadata theirs = describe<L>(layer_config<L>(metadata, origin));
  for (const auto& [key, value] : describe(layer)) {
    // The seed only chose the initial values; check_finite is a run-time choice.
    if (key.rfind("config.", 0) != 0 || key == "config.seed" || key == "config.check_finite") continue;
    const std::string& other = theirs.at(key);
    moe::detail::require(other == value, origin, ": metadata '", key, "' = ", other, ", but the layer has ", value);
  }
}

// Every tensor of the layer read on the host (source(name) is the file that holds it) and
// checked, before anything is copied into the layer (apply_tensors).
template <class S>
struct StagedTensors {
  std::vector<std::vector<S>> values, biases;
};

template <class L, class Source>
StagedTensors<typename L::Scalar> stage_tensors(L& layer, Source&& source, const LoadOptions& options) {
  using S = typename L::Scalar;
  StagedTensors<S> staged;
  for (const auto& s : parameter_slots(layer))
    staged.values.push_back(source(s.name).template read<S>(s.name, Expect{s.shape, options.check_finite}));
  for_each_bias(layer, [&](const std::string& name, auto& policy) {
    const ConstMatrixView<S> b = policy.bias();
    // Always finite: set_bias refuses anything else, and it runs after the weights are copied.
    staged.biases.push_back(source(name).template read<S>(name, Expect{std::vector<std::int64_t>{b.rows, b.cols}, true}));
  });
  return staged;
}

template <class L>
void apply_tensors(L& layer, const StagedTensors<typename L::Scalar>& staged) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const auto slots = parameter_slots(layer);
  typename B::Context ctx;
  for (std::size_t i = 0; i < slots.size(); ++i)
    B::copy(ctx, ConstMatrixView<S>{staged.values[i].data(), 1, slots[i].count},
            MatrixView<S>{slots[i].data, 1, slots[i].count});
  B::synchronize(ctx);
  layer.parameters_changed();
  std::size_t next = 0;
  for_each_bias(layer, [&](const std::string&, auto& policy) {
    const ConstMatrixView<S> shape = policy.bias();
    typename B::template Buffer<S> staged_bias;
    from_host<B>(ctx, staged.biases[next++], staged_bias);
    policy.set_bias(ConstMatrixView<S>{staged_bias.view().data, shape.rows, shape.cols});
  });
}

// Reads every tensor of the layer, all checked on the host before any is copied into the layer.
template <class L, class Source>
void read_tensors(L& layer, Source&& source, const LoadOptions& options) {
  apply_tensors(layer, stage_tensors(layer, source, options));
}

// An optimizer's state in a checkpoint (moe/optim/state.hpp says what an optimizer provides).

inline constexpr std::string_view optimizer_key = "optimizer";

template <class O>
std::vector<std::string> optimizer_prefixes(const O& optimizer) {
  std::vector<std::string> out;
  for (const auto& t : optimizer.state_tensors()) {
    bool plain = !t.name.empty();
    for (const char c : t.name)
      plain = plain && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_');
    moe::detail::require(plain, "moe::io: the optimizer's state tensor '", t.name,
                         "', expected a name of letters, digits and '_'");
    out.push_back(std::string(optimizer_key) + "." + t.name + ".");
  }
  return out;
}

// The layer's tensor that a checkpoint tensor belongs to: "optimizer.m.experts.3.w1" ->
// "experts.3.w1" (when "optimizer.m." is one of the prefixes), any other name itself.
inline std::string layer_tensor_of(const std::string& name, const std::vector<std::string>& prefixes) {
  for (const auto& p : prefixes)
    if (name.rfind(p, 0) == 0) return name.substr(p.size());
  return name;
}

// The optimizer's state of every tensor of the layer as checkpoint slots, in the order save
// writes them: each state tensor (Adam: m, then v) of every parameter slot. Creates the state
// (zeros) of a parameter the optimizer has not stepped yet.
template <class L, class O>
std::vector<Slot<typename L::Scalar>> optimizer_slots(L& layer, O& optimizer) {
  using S = typename L::Scalar;
  const auto prefixes = optimizer_prefixes(optimizer);
  const Index first = layer.expert_shard().first;
  auto params = layer.parameters();
  std::vector<std::vector<MatrixView<S>>> states;
  for (const auto& p : params) {
    states.push_back(optimizer.state(p));
    moe::detail::require(states.back().size() == prefixes.size(), "moe::io: the optimizer holds ",
                         states.back().size(), " state tensors for ", p.name, ", expected ", prefixes.size());
  }
  std::vector<Slot<S>> slots;
  for (std::size_t j = 0; j < prefixes.size(); ++j)
    for (std::size_t i = 0; i < params.size(); ++i) {
      Parameter<S> q = params[i];
      q.value = states[i][j];
      std::vector<Slot<S>> part;
      add_parameter_slots(part, q, first);
      for (auto& slot : part) {
        slot.name = prefixes[j] + slot.name;
        slots.push_back(std::move(slot));
      }
    }
  return slots;
}

// The same slots' names and shapes, without creating any state.
template <class L, class O>
std::vector<std::pair<std::string, std::vector<std::int64_t>>> optimizer_tensors(L& layer, const O& optimizer) {
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> out;
  const auto slots = parameter_slots(layer);
  for (const auto& prefix : optimizer_prefixes(optimizer))
    for (const auto& s : slots) out.emplace_back(prefix + s.name, s.shape);
  return out;
}

template <class O>
Metadata optimizer_metadata(const O& optimizer) {
  const std::string k(optimizer_key);
  Metadata m;
  m[k] = std::string(O::kind);
  m[k + ".steps"] = format_value(static_cast<std::int64_t>(optimizer.steps()));
  m[k + ".lr"] = format_value(static_cast<double>(optimizer.lr()));
  for (const auto& s : optimizer.settings()) m[k + "." + s.name] = format_value(s.value);
  return m;
}

// A number in the metadata, parsed whole; an Error naming the file and the key otherwise.
template <class T>
T metadata_number(const Metadata& m, const std::string& key, const std::string& origin, const char* expected) {
  const auto it = m.find(key);
  moe::detail::require(it != m.end(), origin, ": metadata has no '", key, "', expected ", expected);
  const std::string& text = it->second;
  T v{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  moe::detail::require(ec == std::errc() && end == text.data() + text.size() && !text.empty(), origin, ": metadata '",
                       key, "' = '", text, "', expected ", expected);
  return v;
}

// What a load restores of the optimizer besides its tensors.
struct OptimizerHeader {
  long steps = 0;
  double lr = 0;
};

// Reads and checks the optimizer's metadata: its kind, step count, learning rate and (with
// options.check_config) settings.
template <class O>
OptimizerHeader optimizer_header(const O& optimizer, const Metadata& m, const std::string& origin,
                                 const LoadOptions& options) {
  const std::string k(optimizer_key);
  const auto kind = m.find(k);
  moe::detail::require(kind != m.end(), origin,
                       ": no optimizer state (metadata 'optimizer' is missing), expected a checkpoint saved with the "
                       "optimizer (moe::io::save(layer, optimizer, path))");
  moe::detail::require(kind->second == O::kind, origin, ": metadata 'optimizer' = '", kind->second,
                       "', but the optimizer is ", O::kind);
  OptimizerHeader h;
  const auto steps = metadata_number<std::int64_t>(m, k + ".steps", origin, "the optimizer's step count, an integer >= 0");
  moe::detail::require(steps >= 0, origin, ": metadata '", k, ".steps' = ", steps, ", expected an integer >= 0");
  h.steps = static_cast<long>(steps);
  h.lr = metadata_number<double>(m, k + ".lr", origin, "the optimizer's learning rate, a finite number >= 0");
  moe::detail::require(std::isfinite(h.lr) && h.lr >= 0, origin, ": metadata '", k, ".lr' = ", h.lr,
                       ", expected a finite learning rate >= 0");
  if (options.check_config)
    for (const auto& s : optimizer.settings()) {
      const std::string key = k + "." + s.name;
      const double theirs = metadata_number<double>(m, key, origin, "a number (the optimizer's setting)");
      moe::detail::require(theirs == s.value, origin, ": metadata '", key, "' = ", format_value(theirs),
                           ", but the optimizer has ", format_value(s.value),
                           " (LoadOptions::check_config = false skips this check)");
    }
  return h;
}

inline void add_noise_metadata(Metadata& m, const Rng* noise) {
  if (noise == nullptr) return;
  m["noise.seed"] = format_value(noise->seed());
  m["noise.step"] = format_value(noise->step());
}

// The noise generator a file holds (SaveOptions::noise).
inline Rng noise_of(const Metadata& m, const std::string& origin) {
  const char* expected = "an integer in [0, 2^64) (a checkpoint saved with SaveOptions::noise holds it)";
  return Rng(metadata_number<std::uint64_t>(m, "noise.seed", origin, expected),
             metadata_number<std::uint64_t>(m, "noise.step", origin, expected));
}

// The optimizer's tensors read on the host and checked (shapes, finite values, the state that is
// never negative) before anything changes; apply_optimizer copies them in.
template <class L, class O, class Source>
std::vector<std::vector<typename L::Scalar>> stage_optimizer(L& layer, const O& optimizer, Source&& source) {
  using S = typename L::Scalar;
  const auto infos = optimizer.state_tensors();
  const auto tensors = optimizer_tensors(layer, optimizer);
  const std::size_t per_state = infos.empty() ? 0 : tensors.size() / infos.size();
  std::vector<std::vector<S>> values;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, shape] = tensors[i];
    const SafeTensors& file = source(name);
    values.push_back(file.template read<S>(name, Expect{shape, true}));
    if (!infos[i / per_state].nonnegative) continue;
    const auto& v = values.back();
    for (std::size_t e = 0; e < v.size(); ++e)
      moe::detail::require(v[e] >= S(0), file.origin(), ": tensor '", name, "': element ", e, " is ", v[e],
                           ", expected values >= 0 (the optimizer's '", infos[i / per_state].name,
                           "' is never negative)");
  }
  return values;
}

template <class L, class O>
void apply_optimizer(L& layer, O& optimizer, const std::vector<std::vector<typename L::Scalar>>& values,
                     const OptimizerHeader& header) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const auto slots = optimizer_slots(layer, optimizer);
  typename B::Context ctx;
  for (std::size_t i = 0; i < slots.size(); ++i)
    B::copy(ctx, ConstMatrixView<S>{values[i].data(), 1, slots[i].count}, MatrixView<S>{slots[i].data, 1, slots[i].count});
  B::synchronize(ctx);
  optimizer.set_steps(header.steps);
  optimizer.set_lr(header.lr);
}

// What a training checkpoint holds besides the layer: the optimizer's slots and metadata.
template <class S>
struct CheckpointExtra {
  std::vector<Slot<S>> slots;
  Metadata metadata;
  std::vector<std::string> prefixes;  // of the optimizer's tensor names
};

template <class L, class O>
CheckpointExtra<typename L::Scalar> optimizer_extra(L& layer, O& optimizer) {
  return {optimizer_slots(layer, optimizer), optimizer_metadata(optimizer), optimizer_prefixes(optimizer)};
}

template <class P>
concept HasSelectionBias = requires(P& p) {
  p.bias();
  p.set_bias(p.bias());
};

// The layer's gate policies with a selection bias, with the name of their bias tensor.
template <class L, class F>
void for_each_bias(L& layer, F&& f) {
  if constexpr (L::depth == 1) {
    if constexpr (HasSelectionBias<typename L::GatePolicy>) f(std::string("gate.bias"), layer.gate());
  } else {
    for (int l = 0; l < L::depth; ++l) {
      auto& level = layer.gate().level(l);
      if constexpr (HasSelectionBias<std::remove_reference_t<decltype(level)>>)
        f("gate." + std::to_string(l) + ".bias", level);
    }
  }
}

}  // namespace detail

// The tensors a checkpoint of this layer holds, as (name, shape), in the order save writes them.
template <class L>
std::vector<std::pair<std::string, std::vector<std::int64_t>>> checkpoint_tensors(L& layer) {
  const auto slots = detail::parameter_slots(layer);
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> out;
  for (auto& s : slots) out.emplace_back(s.name, s.shape);
  detail::for_each_bias(layer, [&](const std::string& name, auto& policy) {
    out.emplace_back(name, std::vector<std::int64_t>{policy.bias().rows, policy.bias().cols});
  });
  return out;
}

// The same with the optimizer's state: the layer's tensors, then the optimizer's.
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
std::vector<std::pair<std::string, std::vector<std::int64_t>>> checkpoint_tensors(L& layer, const O& optimizer) {
  auto out = checkpoint_tensors(layer);
  for (auto& t : detail::optimizer_tensors(layer, optimizer)) out.push_back(std::move(t));
  return out;
}

namespace detail {

// The metadata of a file of the checkpoint: the layer's, the optimizer's, the noise's, the caller's.
template <class L>
Metadata checkpoint_metadata(L& layer, const SaveOptions& options, const Metadata& extra, const char* who) {
  const Metadata own = describe(layer);
  Metadata meta = own;
  for (const auto& [key, value] : extra) meta[key] = value;
  add_noise_metadata(meta, options.noise);
  for (const auto& [key, value] : options.metadata) {
    moe::detail::require(!meta.contains(key), who, ": metadata key '", key, "' is the ",
                         own.contains(key) ? "layer's own" : "checkpoint's own (the optimizer's or the noise's)",
                         ", expected another name");
    meta[key] = value;
  }
  return meta;
}

// The writer of the layer's tensors (and extra's); with_replicated false: its routed experts' only.
template <class L>
SafeTensorsWriter checkpoint_part(L& layer, const SaveOptions& options, bool with_replicated,
                                  const CheckpointExtra<typename L::Scalar>& extra = {}) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const Dtype dtype = options.dtype.value_or(dtype_of<S>);
  moe::detail::require(is_floating(dtype), "moe::io::save: dtype ", dtype_name(dtype),
                       ", expected a floating type (F32, F64, BF16 or F16)");
  SafeTensorsWriter writer;
  for (auto& [key, value] : checkpoint_metadata(layer, options, extra.metadata, "moe::io::save"))
    writer.set_metadata(key, value);
  typename B::Context ctx;
  const Index n = layer.config().n_experts;
  const auto slots = detail::parameter_slots(layer);
  for (auto& s : slots) {
    if (!with_replicated && !detail::is_routed_expert_tensor(s.name, n)) continue;
    const std::vector<S> host = to_host<B>(ctx, ConstMatrixView<S>{s.data, 1, s.count});
    writer.add(s.name, s.shape, std::span<const S>(host), dtype);
  }
  if (with_replicated)
    detail::for_each_bias(layer, [&](const std::string& name, auto& policy) {
      const ConstMatrixView<S> b = policy.bias();
      const std::vector<S> host = to_host<B>(ctx, b);
      writer.add(name, {b.rows, b.cols}, std::span<const S>(host), dtype);
    });
  // The optimizer's state in the layer's scalar, whatever the weights' dtype: a resumed run
  // continues from exactly these values.
  for (auto& s : extra.slots) {
    if (!with_replicated && !detail::is_routed_expert_tensor(layer_tensor_of(s.name, extra.prefixes), n)) continue;
    const std::vector<S> host = to_host<B>(ctx, ConstMatrixView<S>{s.data, 1, s.count});
    writer.add(s.name, s.shape, std::span<const S>(host), dtype_of<S>);
  }
  return writer;
}
}  // namespace detail

// The layer as a safetensors writer: every tensor and the metadata; add more before writing. (A
// sharded layer's: the tensors this rank holds.)
template <class L>
SafeTensorsWriter checkpoint(L& layer, const SaveOptions& options = {}) {
  return detail::checkpoint_part(layer, options, true);
}

// The same with the optimizer's state (a training checkpoint).
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
SafeTensorsWriter checkpoint(L& layer, O& optimizer, const SaveOptions& options = {}) {
  return detail::checkpoint_part(layer, options, true, detail::optimizer_extra(layer, optimizer));
}

// Writes the layer's checkpoint to path atomically (temp file, fsync, rename).
template <class L>
void save(L& layer, const std::filesystem::path& path, const SaveOptions& options = {}) {
  moe::detail::require(!layer.sharded(), "moe::io::save: ", path.string(), ": the layer is sharded over ",
                       layer.communicator().size(), " ranks and holds only its own experts; use moe::io::save_sharded");
  checkpoint(layer, options).write(path);
}

// Writes the layer's checkpoint and the optimizer's state to path atomically: what a run needs
// to resume exactly (with SaveOptions::noise, the gate noise's position too).
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
void save(L& layer, O& optimizer, const std::filesystem::path& path, const SaveOptions& options = {}) {
  moe::detail::require(!layer.sharded(), "moe::io::save: ", path.string(), ": the layer is sharded over ",
                       layer.communicator().size(), " ranks and holds only its own experts; use moe::io::save_sharded");
  checkpoint(layer, optimizer, options).write(path);
}

namespace detail {

// The names a load expects (the layer's, and the optimizer's when prefixes are given) are all
// in the file; the file holds no other tensor, except (sharded) the other ranks' experts and
// their optimizer state, and (loading the layer alone) an optimizer's state.
template <class L>
void check_tensor_names(L& layer, const SafeTensors& file, const std::vector<std::string>* prefixes,
                        const LoadOptions& options) {
  const std::string& origin = file.origin();
  const auto slots = parameter_slots(layer);
  std::set<std::string> expected;
  for (const auto& s : slots) expected.insert(s.name);
  for_each_bias(layer, [&](const std::string& name, auto&) { expected.insert(name); });
  const std::size_t layer_count = expected.size();
  for (const auto& name : expected)
    moe::detail::require(file.contains(name), origin, ": no tensor '", name, "', expected every tensor of the layer (",
                         layer_count, ")");
  if (prefixes != nullptr)
    for (const auto& prefix : *prefixes)
      for (const auto& s : slots) {
        const std::string name = prefix + s.name;
        moe::detail::require(file.contains(name), origin, ": no tensor '", name,
                             "', expected the optimizer's state of every tensor of the layer");
        expected.insert(name);
      }
  if (options.allow_unexpected) return;
  // A sharded layer reads its own experts; the others' belong to the other ranks.
  const bool sharded = layer.sharded();
  const bool has_optimizer = file.metadata().contains(std::string(optimizer_key));
  const std::vector<std::string> none;
  const std::vector<std::string>& ours = prefixes != nullptr ? *prefixes : none;
  for (const auto& t : file.tensors()) {
    if (expected.contains(t.name)) continue;
    if (sharded && is_routed_expert_tensor(layer_tensor_of(t.name, ours), layer.config().n_experts)) continue;
    if (prefixes == nullptr && has_optimizer && t.name.rfind(std::string(optimizer_key) + ".", 0) == 0) continue;
    moe::detail::fail(origin, ": tensor '", t.name, "' is not one of the ",
                      prefixes != nullptr ? "layer's or the optimizer's" : "layer's",
                      " (LoadOptions::allow_unexpected ignores it)");
  }
}

}  // namespace detail

// Loads every tensor of the layer from the file. Errors (moe::Error, naming the file and the
// tensor): a missing tensor, an unexpected one (unless allowed), a shape that is not the
// layer's, a value that is not finite (when checked), metadata describing another layer.
// Nothing of the layer changes unless every tensor is read successfully. An optimizer's state
// in the file (a training checkpoint) is not read.
template <class L>
void load(L& layer, const SafeTensors& file, const LoadOptions& options = {}) {
  detail::check_layer_metadata(layer, file.metadata(), file.origin(), options);
  const Rng noise = options.noise != nullptr ? detail::noise_of(file.metadata(), file.origin()) : Rng(0);
  detail::check_tensor_names(layer, file, nullptr, options);
  // Read and check everything on the host first, so a bad file leaves the layer as it was.
  detail::read_tensors(layer, [&](const std::string&) -> const SafeTensors& { return file; }, options);
  if (options.noise != nullptr) *options.noise = noise;
}

template <class L>
void load(L& layer, const std::filesystem::path& path, const LoadOptions& options = {}) {
  load(layer, SafeTensors::open(path), options);
}

// Loads a training checkpoint (save(layer, optimizer, path)): the layer's tensors as above, the
// optimizer's state of every tensor of the layer, its step count and learning rate, and with
// LoadOptions::noise the noise generator. Errors besides the layer's: no optimizer state or
// another optimizer's, a setting that differs (LoadOptions::check_config), a missing or
// unexpected state tensor, a shape that is not its parameter's, a value that is not finite, a
// negative second moment, a step count or learning rate that does not parse or is negative.
// Nothing changes (layer, optimizer, noise) unless everything is read successfully.
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
void load(L& layer, O& optimizer, const SafeTensors& file, const LoadOptions& options = {}) {
  const std::string& origin = file.origin();
  detail::check_layer_metadata(layer, file.metadata(), origin, options);
  const detail::OptimizerHeader header = detail::optimizer_header(optimizer, file.metadata(), origin, options);
  const Rng noise = options.noise != nullptr ? detail::noise_of(file.metadata(), origin) : Rng(0);
  const auto prefixes = detail::optimizer_prefixes(optimizer);
  detail::check_tensor_names(layer, file, &prefixes, options);
  const auto source = [&](const std::string&) -> const SafeTensors& { return file; };
  auto staged = detail::stage_tensors(layer, source, options);
  const auto state = detail::stage_optimizer(layer, optimizer, source);
  detail::apply_tensors(layer, staged);
  detail::apply_optimizer(layer, optimizer, state, header);
  if (options.noise != nullptr) *options.noise = noise;
}

template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
void load(L& layer, O& optimizer, const std::filesystem::path& path, const LoadOptions& options = {}) {
  load(layer, optimizer, SafeTensors::open(path), options);
}

// A layer of type L built from the file's metadata (moe::io::save writes it) and loaded from it.
// threads: the CPU threads of the new layer (0: all), a run-time choice the file does not hold.
template <class L>
L load_layer(const std::filesystem::path& path, const LoadOptions& options = {}, int threads = 0) {
  const SafeTensors file = SafeTensors::open(path);
  typename L::Config config = layer_config<L>(file.metadata(), file.origin());
  // The metadata is not trusted with the layer's size before a tensor is checked: every layer
  // holds a [d x n] router and, per expert, a [d x hidden] matrix or larger, so these products
  // cannot exceed the file's element count (a corrupt value would allocate without bound).
  double elements = 0;
  for (const auto& t : file.tensors()) elements += static_cast<double>(t.numel());
  const double d = static_cast<double>(config.d_model), n = static_cast<double>(config.n_experts);
  double h = 1;
  if constexpr (requires { config.expert.hidden; }) h = static_cast<double>(config.expert.hidden);
  moe::detail::require(d * n <= elements && d * h <= elements, file.origin(), ": metadata says d_model = ",
                       config.d_model, ", n_experts = ", config.n_experts,
                       ", more than the file's ", elements, " values can hold");
  config.threads = threads;
  L layer(config);
  load(layer, file, options);
  return layer;
}

// The file names of a checkpoint written by `ranks` ranks (Hugging Face's): rank r writes
// model-<r + 1>-of-<ranks>.safetensors, each number on 5 digits; the index names every tensor's file.
inline std::string shard_file_name(int rank, int ranks) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", rank + 1, ranks);
  return name;
}
inline constexpr const char* shard_index_name = "model.safetensors.index.json";

namespace detail {

template <class L>
void save_sharded(L& layer, const std::filesystem::path& dir, const SaveOptions& options,
                  const CheckpointExtra<typename L::Scalar>& extra,
                  const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& extra_tensors) {
  using S = typename L::Scalar;
  const int ranks = layer.communicator().size(), rank = layer.communicator().rank();
  const auto collectively = [&](const char* what, auto&& step) {
    std::string error;
    try {
      step();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const Index failed = layer.sum_over_ranks(error.empty() ? 0 : 1);
    if (!error.empty()) throw Error(error);
    moe::detail::require(failed == 0, "moe::io::save_sharded: ", dir.string(), ": ", failed, " rank(s) failed to write ",
                         what, " (their errors say why)");
  };
  collectively("their file", [&] {
    std::filesystem::create_directories(dir);
    checkpoint_part(layer, options, rank == 0, extra).write(dir / shard_file_name(rank, ranks));
  });
  collectively("the index", [&] {
    if (rank != 0) return;
    // Every tensor's file: the replicated tensors rank 0's, expert i's the file of its rank.
    const Index n = layer.config().n_experts;
    nlohmann::json map = nlohmann::json::object();
    std::int64_t total = 0;
    const auto& bounds = layer.placement().bounds;
    const auto add = [&](const std::string& name, const std::vector<std::int64_t>& shape, std::size_t value_bytes) {
      std::int64_t numel = 1;
      for (const auto e : shape) numel *= e;
      // "optimizer.m.experts.0.w1": the prefix, then the layer's tensor.
      const std::string tensor = layer_tensor_of(name, extra.prefixes);
      const std::string prefix = name.substr(0, name.size() - tensor.size());
      const Index expert = routed_expert_index(tensor, n);
      if (expert < 0) {
        map[name] = shard_file_name(0, ranks);
        total += numel * static_cast<std::int64_t>(value_bytes);
        return;
      }
      // Rank 0 holds experts [0, bounds[1]); every expert's weights have the same shapes.
      if (expert != 0) return;
      const std::size_t dot = tensor.find('.', 8);
      for (int r = 0; r < ranks; ++r)
        for (Index i = bounds[static_cast<std::size_t>(r)]; i < bounds[static_cast<std::size_t>(r) + 1]; ++i) {
          map[prefix + "experts." + std::to_string(i) + tensor.substr(dot)] = shard_file_name(r, ranks);
          total += numel * static_cast<std::int64_t>(value_bytes);
        }
    };
    for (const auto& [name, shape] : checkpoint_tensors(layer))
      add(name, shape, dtype_size(options.dtype.value_or(dtype_of<S>)));
    for (const auto& [name, shape] : extra_tensors) add(name, shape, sizeof(S));
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [key, value] : checkpoint_metadata(layer, options, extra.metadata, "moe::io::save_sharded"))
      meta[key] = value;
    meta["total_size"] = total;
    const std::string text = nlohmann::json{{"metadata", meta}, {"weight_map", map}}.dump(2) + "\n";
    write_file_atomically(dir / shard_index_name,
                          std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()));
  });
}

// A sharded checkpoint's index (`where`: the directory or the index file), its files and its metadata.
struct ShardedCheckpoint {
  std::string origin;
  ShardedFiles files;
  Metadata metadata;
};

inline ShardedCheckpoint open_sharded(const std::filesystem::path& where) {
  namespace fs = std::filesystem;
  const fs::path index_path = fs::is_directory(where) ? where / shard_index_name : where;
  ShardedCheckpoint c;
  c.origin = index_path.string();
  const nlohmann::json index = read_json_file(index_path);
  c.files = ShardedFiles::from_index(index, index_path.parent_path(), c.origin);
  if (index.contains("metadata") && index["metadata"].is_object())
    for (const auto& [key, value] : index["metadata"].items())
      if (value.is_string()) c.metadata[key] = value.template get<std::string>();
  return c;
}

}  // namespace detail

// Writes a checkpoint of a (sharded) layer into the directory `dir` (created if missing), a
// collective call: every rank writes its experts' file, rank 0 the replicated tensors (in its own
// file) and, once every file is written, the index; each file atomically. Fails on every rank
// if any rank fails to write.
template <class L>
void save_sharded(L& layer, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  detail::save_sharded(layer, dir, options, {}, {});
}

// The same with the optimizer's state: each rank's file holds the state of the tensors it holds
// (its experts' under their global index; rank 0's also the replicated ones'), the index lists
// them, and the metadata the optimizer's (and, with SaveOptions::noise, rank 0's noise
// generator: every rank draws from the same one, docs/distributed.md).
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
void save_sharded(L& layer, O& optimizer, const std::filesystem::path& dir, const SaveOptions& options = {}) {
  detail::save_sharded(layer, dir, options, detail::optimizer_extra(layer, optimizer),
                       detail::optimizer_tensors(layer, optimizer));
}

// Loads the tensors this rank's layer holds from a sharded checkpoint: `where` is the directory
// or its index file. The files may have been written by any number of ranks (or be one file of
// a one-process save listed by an index). Checks as load does; every file a tensor is read from
// is validated as a whole when opened.
template <class L>
void load_sharded(L& layer, const std::filesystem::path& where, const LoadOptions& options = {}) {
  const detail::ShardedCheckpoint c = detail::open_sharded(where);
  detail::check_layer_metadata(layer, c.metadata, c.origin, options);
  const Rng noise = options.noise != nullptr ? detail::noise_of(c.metadata, c.origin) : Rng(0);
  const auto source = [&](const std::string& name) -> const SafeTensors& { return c.files.file_of(name); };
  detail::read_tensors(layer, source, options);
  if (options.noise != nullptr) *options.noise = noise;
}

// The same with the optimizer's state of the tensors this rank holds, its step count and
// learning rate (and with LoadOptions::noise the noise generator), checked as load does; the
// checkpoint may have been written by any number of ranks.
template <class L, class O>
  requires optim::CheckpointableOptimizer<O, typename L::Scalar>
void load_sharded(L& layer, O& optimizer, const std::filesystem::path& where, const LoadOptions& options = {}) {
  const detail::ShardedCheckpoint c = detail::open_sharded(where);
  detail::check_layer_metadata(layer, c.metadata, c.origin, options);
  const detail::OptimizerHeader header = detail::optimizer_header(optimizer, c.metadata, c.origin, options);
  const Rng noise = options.noise != nullptr ? detail::noise_of(c.metadata, c.origin) : Rng(0);
  const auto source = [&](const std::string& name) -> const SafeTensors& { return c.files.file_of(name); };
  auto staged = detail::stage_tensors(layer, source, options);
  const auto state = detail::stage_optimizer(layer, optimizer, source);
  detail::apply_tensors(layer, staged);
  detail::apply_optimizer(layer, optimizer, state, header);
  if (options.noise != nullptr) *options.noise = noise;
}

}  // namespace moe::io
