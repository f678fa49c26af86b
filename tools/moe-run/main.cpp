// moe-run: runs one MoE layer on given weights and inputs and writes every result, so the
// library can be compared with another implementation (PyTorch, JAX) or one backend with another.
// See docs/interop.md.

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "dispatch.hpp"

namespace {

constexpr const char* usage = R"(usage: moe-run --weights FILE --input FILE --output FILE [options]
       moe-run --hf DIR --layer N --input FILE --output FILE [options]

Runs a moe::Layer forward (and backward when the input has `dy`) and writes y, the gates, the
routing, the balancing losses and statistics and, with dy, dx and every gradient to FILE.

  --weights FILE      safetensors weights: a file written by moe::io::save (its metadata is the
                      layer's configuration), or one with --config, or a Mixtral block (--mixtral)
  --input FILE        safetensors with x [T, d]; optional noise [T, noise columns] (train mode,
                      NoisyTopK only), dy [T, d]; any other tensor is refused
  --output FILE       safetensors to write (atomically)
  --config FILE       the layer's configuration as a JSON object of moe::io metadata keys
                      ("moe.expert", "moe.gate", "moe.depth", "config.d_model", ...); default:
                      the weights file's metadata
  --mixtral PREFIX    the weights are a Hugging Face Mixtral-style block under PREFIX
                      (PREFIX + "gate.weight", PREFIX + "experts.0.w1.weight", ...)
  --k N               experts per token of the Mixtral block (default 2)
  --hf DIR            instead of --weights: a Hugging Face model directory (config.json and its
                      safetensors, sharded or not); the MoE block of layer --layer N, of a
                      Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4-MoE or GPT-OSS
                      model
  --layer N           the layer of --hf
  --set KEY=VALUE     override one configuration key, as in the metadata without "config."
                      (--set gate.w_z=1e-3 --set gate.w_importance=0); repeatable, the last of a
                      key wins; on top of the metadata, --config, --mixtral or --hf
  --mode M            train (default) or inference
  --backend B         cpu (default) or cuda
  --dtype T           float or double (default: the configuration's "moe.scalar"; float for
                      --mixtral and --hf)
  --noise-seed N      seed of the gate's noise when the input has no `noise` (default 0)
  --threads N         CPU threads (default 0: all)
  --no-check-finite   do not reject NaN or Inf in weights and inputs

Exit status: 0 done, 1 an error (printed; also a --set key the layer does not have or a value that
does not parse), 2 a usage error, 77 --backend cuda without a device.
)";

struct UsageError {
  std::string message;
};

// The configuration file: a JSON object whose values are strings, numbers or booleans.
moe::io::Metadata read_config(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  moe::detail::require(f.good(), "moe-run: cannot open --config ", path);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    moe::detail::fail("moe-run: --config ", path, " is not JSON: ", e.what());
  }
  moe::detail::require(j.is_object(), "moe-run: --config ", path, " is a JSON ", j.type_name(), ", expected an object");
  moe::io::Metadata m;
  for (const auto& [key, value] : j.items()) {
    if (value.is_string()) m[key] = value.get<std::string>();
    else if (value.is_boolean() || value.is_number()) m[key] = value.dump();
    else moe::detail::fail("moe-run: --config ", path, ": '", key, "' is a JSON ", value.type_name(),
                           ", expected a string, number or boolean");
  }
  if (!m.contains("format")) m["format"] = std::string(moe::io::layer_format);
  return m;
}

template <class T>
T parse_number(std::string_view flag, const std::string& text) {
  T v{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty() || v < T{0})
    throw UsageError{std::string(flag) + " " + text + ": expected a non-negative integer"};
  return v;
}

int run(int argc, char** argv) {
  moe_run::Job job;
  std::string config_path, dtype;
  bool k_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (flag == "--no-check-finite") {
      job.check_finite = false;
      continue;
    }
    static constexpr std::string_view with_value[] = {"--weights", "--input",  "--output",     "--config", "--mixtral",
                                                      "--k",       "--mode",   "--backend",    "--dtype",  "--noise-seed",
                                                      "--threads", "--set",    "--hf",         "--layer"};
    if (std::find(std::begin(with_value), std::end(with_value), flag) == std::end(with_value))
      throw UsageError{"unknown option " + std::string(flag)};
    if (i + 1 >= argc) throw UsageError{std::string(flag) + ": expected a value after it"};
    const std::string value = argv[++i];
    if (flag == "--weights") job.weights = value;
    else if (flag == "--input") job.input = value;
    else if (flag == "--output") job.output = value;
    else if (flag == "--config") config_path = value;
    else if (flag == "--mixtral") job.mixtral = value;
    else if (flag == "--hf") job.hf = value;
    else if (flag == "--layer") job.hf_layer = parse_number<moe::Index>(flag, value);
    else if (flag == "--k") {
      job.mixtral_k = parse_number<moe::Index>(flag, value);
      k_given = true;
    }
    else if (flag == "--mode") {
      if (value == "train") job.mode = moe::Mode::train;
      else if (value == "inference") job.mode = moe::Mode::inference;
      else throw UsageError{"--mode " + value + ": expected train or inference"};
    } else if (flag == "--backend") {
      if (value != "cpu" && value != "cuda") throw UsageError{"--backend " + value + ": expected cpu or cuda"};
      job.backend = value;
    } else if (flag == "--dtype") {
      if (value != "float" && value != "double") throw UsageError{"--dtype " + value + ": expected float or double"};
      dtype = value;
    } else if (flag == "--noise-seed") job.noise_seed = parse_number<std::uint64_t>(flag, value);
    else if (flag == "--threads") job.threads = parse_number<int>(flag, value);
    else if (flag == "--set") {
      const auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0)
        throw UsageError{"--set " + value + ": expected KEY=VALUE, a configuration key such as gate.w_z=1e-3"};
      job.settings.emplace_back(value.substr(0, eq), value.substr(eq + 1));
    }
    else throw UsageError{"unknown option " + std::string(flag)};
  }
  if (job.hf) {
    if (!job.weights.empty() || job.mixtral || !config_path.empty())
      throw UsageError{"--hf reads the weights and the configuration from the model directory; drop --weights, "
                       "--mixtral and --config"};
    if (job.hf_layer < 0) throw UsageError{"--hf needs --layer N, the layer whose MoE block to run"};
  } else if (job.hf_layer >= 0) {
    throw UsageError{"--layer is the layer of --hf"};
  }
  if ((job.weights.empty() && !job.hf) || job.input.empty() || job.output.empty())
    throw UsageError{"--weights (or --hf), --input and --output are required"};
  if (job.mixtral && !config_path.empty()) throw UsageError{"--mixtral takes the configuration from the weights' shapes; drop --config"};
  if (k_given && !job.mixtral) throw UsageError{"--k is the Mixtral block's k; other layers take k from their configuration"};
  if (job.mixtral_k < 1) throw UsageError{"--k " + std::to_string(job.mixtral_k) + ": expected at least 1"};

  if (job.backend == "cuda") {
    moe::detail::require(moe_run::cuda_built(), "moe-run: --backend cuda, but this moe-run was built without CUDA");
    if (!moe_run::cuda_device()) {
      std::fprintf(stderr, "moe-run: --backend cuda, but no CUDA device answers\n");
      return 77;
    }
  }

  moe::io::LayerKind kind;
  if (job.hf) {
    const auto block = moe::io::HfModel::open(*job.hf).block(job.hf_layer);
    kind = {"SwiGLU", block.gate, 1, dtype.empty() ? "float" : dtype};
  } else if (job.mixtral) {
    kind = {"SwiGLU", "TopK", 1, dtype.empty() ? "float" : dtype};
  } else {
    job.config = config_path.empty() ? moe::io::SafeTensors::open(job.weights).metadata() : read_config(config_path);
    if (!dtype.empty()) job.config["moe.scalar"] = dtype;
    kind = moe::io::layer_kind(job.config);
  }
  moe::detail::require(job.backend != "cuda" || kind.scalar == "float", "moe-run: scalar ", kind.scalar,
                       " on --backend cuda, expected float (pass --dtype float)");
  moe::detail::require(moe_run::dispatch(job, kind), "moe-run: a layer of expert ", kind.expert, ", gate ", kind.gate,
                       ", depth ", kind.depth, ", scalar ", kind.scalar,
                       " is not one this tool runs (experts FeedForward, SwiGLU; gates NoisyTopK, TopK, Softmax, "
                       "Switch, ExpertChoice, SigmoidBias; depth 1 to 3; float or double)");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "moe-run: %s\n(moe-run --help for usage)\n", e.message.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
