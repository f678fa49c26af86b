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
//   experts.<i>.<weight>         (FeedForward: w1 [d, h], w2 [h, d], b1 [h], b2 [d]; SwiGLU: w1, w3, w2)
//
//   moe::io::save(layer, "layer.safetensors");             // atomic: temp file, fsync, rename
//   moe::io::load(layer, "layer.safetensors");             // every tensor checked, see LoadOptions
//   auto layer2 = moe::io::load_layer<Moe>("layer.safetensors");  // built from the metadata

#include <cstdint>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/io/config.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/parameter.hpp"

namespace moe::io {

struct SaveOptions {
  std::optional<Dtype> dtype{};  // of the stored values: F32, F64, BF16 or F16; default: the layer's scalar
  Metadata metadata{};         // added to the layer's own (its keys may not collide with them)
};

struct LoadOptions {
  bool check_finite = true;       // a NaN or Inf in a weight is an Error naming the tensor (a selection bias is always checked)
  bool check_config = true;       // when the file has the layer's metadata (format moe.layer/1): it must describe this layer's Config
  bool allow_unexpected = false;  // tensors the layer does not have are ignored instead of an Error
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

template <class S>
void add_parameter_slots(std::vector<Slot<S>>& slots, Parameter<S>& p) {
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
  for (Index i = 0; i < n; ++i)
    slots.push_back({group + std::to_string(i) + "." + weight, {p.shape.begin() + 1, p.shape.end()},
                     p.value.data + i * per, per});
}

// Every parameter tensor of the layer as checkpoint slots, in the order save writes them.
template <class L>
std::vector<Slot<typename L::Scalar>> parameter_slots(L& layer) {
  std::vector<Slot<typename L::Scalar>> slots;
  for (auto& p : layer.parameters()) add_parameter_slots(slots, p);
  return slots;
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

// The layer as a safetensors writer: every tensor and the metadata; add more before writing.
template <class L>
SafeTensorsWriter checkpoint(L& layer, const SaveOptions& options = {}) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const Dtype dtype = options.dtype.value_or(dtype_of<S>);
  moe::detail::require(is_floating(dtype), "moe::io::save: dtype ", dtype_name(dtype),
                       ", expected a floating type (F32, F64, BF16 or F16)");
  SafeTensorsWriter writer;
  Metadata meta = describe(layer);
  for (const auto& [key, value] : options.metadata) {
    moe::detail::require(!meta.contains(key), "moe::io::save: metadata key '", key,
                         "' is the layer's own, expected another name");
    meta[key] = value;
  }
  for (auto& [key, value] : meta) writer.set_metadata(key, value);
  typename B::Context ctx;
  const auto slots = detail::parameter_slots(layer);
  for (auto& s : slots) {
    const std::vector<S> host = to_host<B>(ctx, ConstMatrixView<S>{s.data, 1, s.count});
    writer.add(s.name, s.shape, std::span<const S>(host), dtype);
  }
  detail::for_each_bias(layer, [&](const std::string& name, auto& policy) {
    const ConstMatrixView<S> b = policy.bias();
    const std::vector<S> host = to_host<B>(ctx, b);
    writer.add(name, {b.rows, b.cols}, std::span<const S>(host), dtype);
  });
  return writer;
}

// Writes the layer's checkpoint to path atomically (temp file, fsync, rename).
template <class L>
void save(L& layer, const std::filesystem::path& path, const SaveOptions& options = {}) {
  checkpoint(layer, options).write(path);
}

// Loads every tensor of the layer from the file. Errors (moe::Error, naming the file and the
// tensor): a missing tensor, an unexpected one (unless allowed), a shape that is not the
// layer's, a value that is not finite (when checked), metadata describing another layer.
// Nothing of the layer changes unless every tensor is read successfully.
template <class L>
void load(L& layer, const SafeTensors& file, const LoadOptions& options = {}) {
  using S = typename L::Scalar;
  using B = typename L::Backend;
  const std::string& origin = file.origin();
  // Files of other writers may have a "format" key of their own (Hugging Face: "pt").
  const auto format = file.metadata().find("format");
  if (options.check_config && format != file.metadata().end() && format->second == layer_format) {
    // Compared as values: the file's configuration read and written again in canonical form.
    const Metadata theirs = describe<L>(layer_config<L>(file.metadata(), origin));
    for (const auto& [key, value] : describe(layer)) {
      // The seed only chose the initial values; check_finite is a run-time choice.
      if (key.rfind("config.", 0) != 0 || key == "config.seed" || key == "config.check_finite") continue;
      const std::string& other = theirs.at(key);
      moe::detail::require(other == value, origin, ": metadata '", key, "' = ", other, ", but the layer has ", value);
    }
  }
  const auto slots = detail::parameter_slots(layer);
  std::set<std::string> expected;
  for (const auto& s : slots) expected.insert(s.name);
  detail::for_each_bias(layer, [&](const std::string& name, auto&) { expected.insert(name); });
  for (const auto& name : expected)
    moe::detail::require(file.contains(name), origin, ": no tensor '", name, "', expected every tensor of the layer (",
                         expected.size(), ")");
  if (!options.allow_unexpected)
    for (const auto& t : file.tensors())
      moe::detail::require(expected.contains(t.name), origin, ": tensor '", t.name,
                           "' is not one of the layer's (LoadOptions::allow_unexpected ignores it)");

  // Read and check everything on the host first, so a bad file leaves the layer as it was.
  std::vector<std::vector<S>> values;
  for (const auto& s : slots) values.push_back(file.read<S>(s.name, Expect{s.shape, options.check_finite}));
  std::vector<std::vector<S>> biases;
  detail::for_each_bias(layer, [&](const std::string& name, auto& policy) {
    const ConstMatrixView<S> b = policy.bias();
    // Always finite: set_bias refuses anything else, and it runs after the weights are copied.
    biases.push_back(file.read<S>(name, Expect{std::vector<std::int64_t>{b.rows, b.cols}, true}));
  });

  typename B::Context ctx;
  for (std::size_t i = 0; i < slots.size(); ++i)
    B::copy(ctx, ConstMatrixView<S>{values[i].data(), 1, slots[i].count}, MatrixView<S>{slots[i].data, 1, slots[i].count});
  B::synchronize(ctx);
  std::size_t next = 0;
  detail::for_each_bias(layer, [&](const std::string&, auto& policy) {
    const ConstMatrixView<S> shape = policy.bias();
    typename B::template Buffer<S> staged;
    from_host<B>(ctx, biases[next++], staged);
    policy.set_bias(ConstMatrixView<S>{staged.view().data, shape.rows, shape.cols});
  });
}

template <class L>
void load(L& layer, const std::filesystem::path& path, const LoadOptions& options = {}) {
  load(layer, SafeTensors::open(path), options);
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

}  // namespace moe::io
