#pragma once
// A layer's configuration as flat string metadata, so a weights file describes the layer it
// holds: which expert, gate, depth and scalar, and every Config field under a dotted key
// ("config.d_model", "config.expert.hidden", "config.gate.levels.0.gate.k"). describe() writes
// it, layer_config() reads it back, layer_kind() tells which Layer type a file needs.
//
// The library's experts and gates are described here. A custom expert or gate takes part by
// giving its type a name and its Config a field list, found by argument-dependent lookup:
//   static constexpr const char* io_name = "MyExpert";          // in the expert or gate tag
//   template <class V> void config_fields(MyExpert::Config& c, V&& v) { v("hidden", c.hidden); }

#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>

#include "moe/error.hpp"
#include "moe/expert/feed_forward.hpp"
#include "moe/expert/swiglu.hpp"
#include "moe/gate/expert_choice.hpp"
#include "moe/gate/hierarchy.hpp"
#include "moe/gate/noisy_top_k.hpp"
#include "moe/gate/sigmoid_bias.hpp"
#include "moe/gate/softmax.hpp"
#include "moe/gate/switch.hpp"
#include "moe/gate/top_k.hpp"
#include "moe/precision.hpp"

namespace moe::io {

using Metadata = std::map<std::string, std::string>;

// The value of "format" in a file written by moe::io::save.
inline constexpr std::string_view layer_format = "moe.layer/1";

// Field lists of the library's Configs, in declaration order. expert::FeedForward::Config is the
// Config of every expert::FeedForwardWith<A>, expert::SwiGLU::Config that of every GluWith<A>.
template <class V>
void config_fields(expert::FeedForward::Config& c, V&& v) {
  v("hidden", c.hidden);
  v("bias", c.bias);
  v("precision", c.precision);
}
template <class V>
void config_fields(expert::SwiGLU::Config& c, V&& v) {
  v("hidden", c.hidden);
  v("bias", c.bias);
  v("alpha", c.alpha);
  v("limit", c.limit);
  v("up_offset", c.up_offset);
  v("precision", c.precision);
}
template <class V>
void config_fields(gate::NoisyTopK::Config& c, V&& v) {
  v("k", c.k);
  v("eps_noise", c.eps_noise);
  v("noisy", c.noisy);
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
  v("w_z", c.w_z);
}
template <class V>
void config_fields(gate::TopK::Config& c, V&& v) {
  v("k", c.k);
  v("normalize", c.normalize);
  v("scale", c.scale);
  v("expert_groups", c.expert_groups);
  v("top_groups", c.top_groups);
  v("router_bias", c.router_bias);
  v("w_aux", c.w_aux);
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
  v("w_z", c.w_z);
  v("init_scale", c.init_scale);
}
template <class V>
void config_fields(gate::Softmax::Config& c, V&& v) {
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
  v("w_z", c.w_z);
  v("init_scale", c.init_scale);
}
template <class V>
void config_fields(gate::Switch::Config& c, V&& v) {
  v("capacity_factor", c.capacity_factor);
  v("w_aux", c.w_aux);
  v("w_z", c.w_z);
  v("init_scale", c.init_scale);
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
}
template <class V>
void config_fields(gate::ExpertChoice::Config& c, V&& v) {
  v("capacity_factor", c.capacity_factor);
  v("w_z", c.w_z);
  v("init_scale", c.init_scale);
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
}
template <class V>
void config_fields(gate::SigmoidBias::Config& c, V&& v) {
  v("k", c.k);
  v("expert_groups", c.expert_groups);
  v("top_groups", c.top_groups);
  v("bias_rate", c.bias_rate);
  v("normalize", c.normalize);
  v("scale", c.scale);
  v("init_scale", c.init_scale);
  v("w_importance", c.w_importance);
  v("w_load", c.w_load);
}

// The names written as "moe.expert" and "moe.gate". An expert over another activation than its
// family's default is named after the activation, "FeedForward<gelu>", "GLU<gelu>" (the io_name
// of expert::FeedForwardWith<A> and expert::GluWith<A>).
template <class T>
constexpr std::string_view family_name() {
  if constexpr (std::is_same_v<T, expert::FeedForward>) return "FeedForward";
  else if constexpr (std::is_same_v<T, expert::SwiGLU>) return "SwiGLU";
  else if constexpr (std::is_same_v<T, gate::NoisyTopK>) return "NoisyTopK";
  else if constexpr (std::is_same_v<T, gate::TopK>) return "TopK";
  else if constexpr (std::is_same_v<T, gate::Softmax>) return "Softmax";
  else if constexpr (std::is_same_v<T, gate::Switch>) return "Switch";
  else if constexpr (std::is_same_v<T, gate::ExpertChoice>) return "ExpertChoice";
  else if constexpr (std::is_same_v<T, gate::SigmoidBias>) return "SigmoidBias";
  else if constexpr (requires { std::string_view(T::io_name); }) return T::io_name;
  else
    static_assert(sizeof(T) == 0, "moe::io: this expert or gate has no name; give it `static constexpr const char* io_name`");
}

template <class S>
constexpr std::string_view scalar_name() {
  if constexpr (std::is_same_v<S, float>) return "float";
  else if constexpr (std::is_same_v<S, double>) return "double";
  else
    static_assert(sizeof(S) == 0, "moe::io: scalar types are float and double");
}

namespace detail {

inline std::string format_value(bool v) { return v ? "true" : "false"; }
inline std::string format_value(Precision p) { return to_string(p); }
inline std::string format_value(double v) {
  // The shortest text that reads back to v, independent of the C locale.
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : std::string("nan");
}
template <class I>
  requires std::is_integral_v<I>
std::string format_value(I v) {
  return std::to_string(v);
}

template <class T>
void parse_value(const std::string& key, const std::string& text, T& out) {
  auto bad = [&](const char* expected) {
    moe::detail::fail("moe::io: metadata '", key, "' = '", text, "', expected ", expected);
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true") out = true;
    else if (text == "false") out = false;
    else bad("true or false");
  } else if constexpr (std::is_same_v<T, Precision>) {
    if (text == "fp32") out = Precision::fp32;
    else if (text == "bf16") out = Precision::bf16;
    else if (text == "tf32") out = Precision::tf32;
    else bad("fp32, bf16 or tf32");
  } else if constexpr (std::is_same_v<T, double>) {
    // std::from_chars for double is in libstdc++ 11+; strtod would follow the C locale.
    double v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || text.empty()) bad("a number");
    out = v;
  } else {
    static_assert(std::is_integral_v<T>);
    T v{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc() || end != text.data() + text.size() || text.empty()) bad("an integer in range");
    out = v;
  }
}

// What Describable passes to config_fields (a named type: nvcc does not accept a lambda in the
// requirement).
struct FieldProbe {
  template <class T>
  void operator()(const char*, T&) const {}
};

template <class C>
concept Describable = requires(C& c, FieldProbe probe) { config_fields(c, probe); };

// A Config without a field list does not compile where a layer is saved or loaded: a file
// written without the configuration could not be loaded.
template <class C>
constexpr void require_field_list() {
  static_assert(Describable<C>,
                "moe::io: this expert's or gate's Config has no field list, so a checkpoint could not describe it; "
                "declare `template <class V> void config_fields(Config& c, V&& v) { v(\"name\", c.name); ... }` "
                "beside the Config (an empty body for a Config without fields), see docs/custom_expert.md");
}

// Writes every field of c under prefix.
template <class C>
void write_fields(Metadata& m, const std::string& prefix, C c) {
  require_field_list<C>();
  if constexpr (Describable<C>)
    config_fields(c, [&](const char* name, auto& field) { m[prefix + name] = format_value(field); });
}

// Reads the fields of c present under prefix; a missing one keeps its value (the default).
template <class C>
void read_fields(const Metadata& m, const std::string& prefix, C& c) {
  require_field_list<C>();
  if constexpr (Describable<C>)
    config_fields(c, [&](const char* name, auto& field) {
      const std::string key = prefix + name;
      const auto it = m.find(key);
      if (it != m.end()) parse_value(key, it->second, field);
    });
}

template <class L>
struct LayerTraits;

}  // namespace detail

// Which Layer type a file holds: expert and gate family names, depth, scalar.
struct LayerKind {
  std::string expert;
  std::string gate;
  int depth = 1;
  std::string scalar;
};

inline const std::string& metadata_value(const Metadata& m, const std::string& key) {
  const auto it = m.find(key);
  moe::detail::require(it != m.end(), "moe::io: metadata has no '", key, "', expected a file written by moe::io::save (",
                       layer_format, ") or a configuration with it");
  return it->second;
}

inline LayerKind layer_kind(const Metadata& m) {
  const std::string& format = metadata_value(m, "format");
  moe::detail::require(format == layer_format, "moe::io: metadata 'format' = '", format, "', expected '", layer_format,
                       "'");
  LayerKind kind{metadata_value(m, "moe.expert"), metadata_value(m, "moe.gate"), 1, metadata_value(m, "moe.scalar")};
  detail::parse_value("moe.depth", metadata_value(m, "moe.depth"), kind.depth);
  moe::detail::require(kind.depth >= 1, "moe::io: metadata 'moe.depth' = ", kind.depth, ", expected at least 1");
  return kind;
}

// The metadata describing a layer of type L with this configuration (CPU threads are a run-time
// choice and are not written).
template <class L>
Metadata describe(const typename L::Config& config) {
  using Expert = typename L::ExpertTag;
  using Gate = typename L::GateTag;
  Metadata m;
  m["format"] = std::string(layer_format);
  m["moe.expert"] = std::string(family_name<Expert>());
  m["moe.gate"] = std::string(family_name<Gate>());
  m["moe.depth"] = std::to_string(L::depth);
  m["moe.scalar"] = std::string(scalar_name<typename L::Scalar>());
  m["config.d_model"] = detail::format_value(config.d_model);
  m["config.n_experts"] = detail::format_value(config.n_experts);
  m["config.shared_experts"] = detail::format_value(config.shared_experts);
  m["config.shared_gate"] = detail::format_value(config.shared_gate);
  m["config.seed"] = detail::format_value(config.seed);
  m["config.check_finite"] = detail::format_value(config.check_finite);
  detail::write_fields(m, "config.expert.", config.expert);
  if (config.shared_expert) detail::write_fields(m, "config.shared_expert.", *config.shared_expert);
  if constexpr (L::depth == 1) {
    detail::write_fields(m, "config.gate.", config.gate);
  } else {
    for (int l = 0; l < L::depth; ++l) {
      const auto& level = config.gate.levels[static_cast<std::size_t>(l)];
      const std::string prefix = "config.gate.levels." + std::to_string(l) + ".";
      m[prefix + "branching"] = detail::format_value(level.branching);
      detail::write_fields(m, prefix + "gate.", level.gate);
    }
    m["config.gate.w_importance"] = detail::format_value(config.gate.w_importance);
    m["config.gate.w_load"] = detail::format_value(config.gate.w_load);
  }
  return m;
}

template <class L>
Metadata describe(const L& layer) {
  return describe<L>(layer.config());
}

// Checks that the metadata describes a layer of type L: same expert, gate, depth. The scalar may
// differ (a double layer reads a file saved from a float one, and back).
template <class L>
void require_kind(const Metadata& m, const std::string& origin) {
  const LayerKind kind = layer_kind(m);
  const auto expert = family_name<typename L::ExpertTag>();
  const auto gate = family_name<typename L::GateTag>();
  moe::detail::require(kind.expert == expert && kind.gate == gate && kind.depth == L::depth, origin,
                       ": holds a layer of expert ", kind.expert, ", gate ", kind.gate, ", depth ", kind.depth,
                       "; expected expert ", expert, ", gate ", gate, ", depth ", L::depth);
}

// The configuration of a layer of type L read back from metadata: config.d_model,
// config.n_experts and each level's branching must be there; every other field may be missing
// and then keeps the library's default (so a hand-written configuration names only what it
// changes). A config.* key that is not a field of L's configuration is an Error naming it.
template <class L>
typename L::Config layer_config(const Metadata& m, const std::string& origin = "moe::io") {
  require_kind<L>(m, origin);
  typename L::Config c{};
  const auto optional = [&](const std::string& key, auto& field) {
    const auto it = m.find(key);
    if (it != m.end()) detail::parse_value(key, it->second, field);
  };
  detail::parse_value("config.d_model", metadata_value(m, "config.d_model"), c.d_model);
  detail::parse_value("config.n_experts", metadata_value(m, "config.n_experts"), c.n_experts);
  optional("config.shared_experts", c.shared_experts);
  optional("config.shared_gate", c.shared_gate);
  optional("config.seed", c.seed);
  optional("config.check_finite", c.check_finite);
  detail::read_fields(m, "config.expert.", c.expert);
  const std::string shared_prefix = "config.shared_expert.";
  const auto after = m.lower_bound(shared_prefix);
  if (after != m.end() && after->first.rfind(shared_prefix, 0) == 0) {
    c.shared_expert.emplace();
    detail::read_fields(m, shared_prefix, *c.shared_expert);
  }
  if constexpr (L::depth == 1) {
    detail::read_fields(m, "config.gate.", c.gate);
  } else {
    for (int l = 0; l < L::depth; ++l) {
      auto& level = c.gate.levels[static_cast<std::size_t>(l)];
      const std::string prefix = "config.gate.levels." + std::to_string(l) + ".";
      detail::parse_value(prefix + "branching", metadata_value(m, prefix + "branching"), level.branching);
      detail::read_fields(m, prefix + "gate.", level.gate);
    }
    optional("config.gate.w_importance", c.gate.w_importance);
    optional("config.gate.w_load", c.gate.w_load);
  }
  const Metadata known = describe<L>(c);
  for (const auto& [key, value] : m) {
    if (key.rfind("config.", 0) != 0 || known.count(key) != 0) continue;
    std::string keys;
    for (const auto& [k, v] : known)
      if (k.rfind("config.", 0) == 0) keys += (keys.empty() ? "" : ", ") + k;
    moe::detail::fail(origin, ": configuration key '", key, "' is not a field of this layer's configuration (",
                      family_name<typename L::ExpertTag>(), ", ", family_name<typename L::GateTag>(), ", depth ",
                      L::depth, "); expected one of ", keys);
  }
  return c;
}

}  // namespace moe::io
