// moe-lm: the paper's language-model experiment (MATH.md 7) in miniature, on the King James
// Bible or any text file. See examples/lm/README.md.
//
//   moe-lm configs
//   moe-lm train    --corpus FILE --config NAME [--tokens N | --minutes M] [--checkpoint PATH]
//   moe-lm eval     --corpus FILE --checkpoint PATH
//   moe-lm generate --checkpoint PATH [--prompt TEXT] [--words N] [--temperature T] [--seed N]
//   moe-lm compare  --corpus FILE [--tokens N | --minutes M] [--configs A,B,...] [--json PATH] [--plot PNG]

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/io/atomic_file.hpp"
#include "trainer.hpp"

namespace {

using S = float;
using B = moe::backend::Cpu<S>;
using moe::Index;
using moe::lm::MixtureKind;
using moe::lm::ModelConfig;
using Clock = std::chrono::steady_clock;

// ---- configurations ---------------------------------------------------------------------------

// The paper's table, scaled down (d = 64 where the paper has 512, experts of hidden 64 where it
// has 1024, k = 4): every model has two LSTMs and, between them, layers of the same active
// compute per token: 4 experts' worth (4 x 2 x 2 d h = 16 d h), or one more LSTM (16 d^2, the
// same at h = d).
struct Named {
  std::string name;
  std::string what;
  ModelConfig model;
};

std::vector<Named> configurations(Index vocab, std::uint64_t seed) {
  ModelConfig base{.vocab = vocab, .d = 64, .hidden = 64, .seed = seed};
  auto with = [&](auto edit) {
    ModelConfig c = base;
    edit(c);
    return c;
  };
  return {
      {"lstm-2", "2 LSTMs, no MoE (the models below without their middle layer: less compute)",
       with([](ModelConfig& c) { c.mixture = MixtureKind::none; })},
      {"lstm-3", "3 LSTMs, no MoE (the paper's 4xLSTM: the MoE's compute as one more LSTM)",
       with([](ModelConfig& c) {
         c.mixture = MixtureKind::none;
         c.lstm_layers = 3;
       })},
      {"moe-1-wide", "one dense expert of hidden 4h (MoE-1-Wide)",
       with([](ModelConfig& c) {
         c.experts = 1;
         c.k = 1;
         c.hidden = 4 * c.hidden;
       })},
      {"moe-1-deep", "one expert of 4 layers: 4 single-expert layers of hidden h stacked (MoE-1-Deep)",
       with([](ModelConfig& c) {
         c.mixture = MixtureKind::deep;
         c.deep = 4;
       })},
      {"moe-4", "4 experts, all active (MoE-4)", with([](ModelConfig& c) { c.experts = 4; })},
      {"moe-32", "32 experts, k = 4", with([](ModelConfig& c) { c.experts = 32; })},
      {"moe-256", "256 experts, k = 4", with([](ModelConfig& c) { c.experts = 256; })},
      {"moe-1024-h", "hierarchical: 32 groups x 32 experts, k = 2 x 2",
       with([](ModelConfig& c) {
         c.mixture = MixtureKind::hierarchical;
         c.experts = 1024;
         c.groups = 32;
       })},
  };
}

const Named& find_configuration(const std::vector<Named>& all, const std::string& name) {
  for (const auto& c : all)
    if (c.name == name) return c;
  std::string names;
  for (const auto& c : all) names += (names.empty() ? "" : ", ") + c.name;
  moe::detail::fail("moe-lm: --config ", name, ", expected one of ", names);
}

// ---- options ----------------------------------------------------------------------------------

struct Options {
  std::string command;
  std::string corpus, config, checkpoint, prompt = "and god said", json, plot;
  std::vector<std::string> configs;
  Index tokens = 0;      // training words per run (0: see minutes)
  double minutes = 0;    // wall-clock per run, when tokens is 0
  Index vocab = 4096;    // vocabulary size, <unk> and <eos> included
  Index words = 40;      // generate
  double temperature = 0.8;
  Index save_every = 200;  // windows between checkpoints
  Index batch = 32, steps = 20;  // streams and unrolled steps per window
  double lr = 5e-3;              // Adam
  std::uint64_t seed = 1;
  bool quiet = false;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "moe-lm: %s\n"
               "usage:\n"
               "  moe-lm configs\n"
               "  moe-lm train    --corpus FILE --config NAME [--tokens N | --minutes M] [--checkpoint PATH]\n"
               "                  [--save-every WINDOWS] [--vocab N] [--seed N] [--batch N] [--steps N] [--lr X]\n"
               "  moe-lm eval     --corpus FILE --checkpoint PATH\n"
               "  moe-lm generate --checkpoint PATH [--prompt TEXT] [--words N] [--temperature T] [--seed N]\n"
               "  moe-lm compare  --corpus FILE [--tokens N | --minutes M] [--configs A,B,...] [--json PATH]\n"
               "                  [--plot PNG] [--vocab N] [--seed N]\n"
               "The corpus: a text file; the King James Bible (examples/lm/get-kjv FILE writes it) is split by book.\n",
               why.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  if (argc < 2) usage("no command");
  Options o;
  o.command = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string_view flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(std::string(flag) + " needs a value");
      return argv[++i];
    };
    auto integer = [&](auto& out) {
      const std::string v = value();
      const auto r = std::from_chars(v.data(), v.data() + v.size(), out);
      if (r.ec != std::errc{} || r.ptr != v.data() + v.size() || out < 0)
        usage(std::string(flag) + " " + v + ", expected a non-negative integer");
    };
    auto real = [&](double& out) {
      const std::string v = value();
      char* end = nullptr;
      out = std::strtod(v.c_str(), &end);
      if (end != v.c_str() + v.size() || !(out >= 0)) usage(std::string(flag) + " " + v + ", expected a number >= 0");
    };
    if (flag == "--corpus") o.corpus = value();
    else if (flag == "--config") o.config = value();
    else if (flag == "--checkpoint") o.checkpoint = value();
    else if (flag == "--prompt") o.prompt = value();
    else if (flag == "--json") o.json = value();
    else if (flag == "--plot") o.plot = value();
    else if (flag == "--configs") {
      std::stringstream in(value());
      for (std::string c; std::getline(in, c, ',');)
        if (!c.empty()) o.configs.push_back(c);
    } else if (flag == "--tokens") integer(o.tokens);
    else if (flag == "--minutes") real(o.minutes);
    else if (flag == "--vocab") integer(o.vocab);
    else if (flag == "--words") integer(o.words);
    else if (flag == "--temperature") real(o.temperature);
    else if (flag == "--save-every") integer(o.save_every);
    else if (flag == "--batch") integer(o.batch);
    else if (flag == "--lr") real(o.lr);
    else if (flag == "--steps") integer(o.steps);
    else if (flag == "--seed") integer(o.seed);
    else if (flag == "--quiet") o.quiet = true;
    else usage("unknown option " + std::string(flag));
  }
  return o;
}

// ---- data -------------------------------------------------------------------------------------

struct Data {
  moe::lm::Vocabulary vocabulary;
  std::vector<Index> train, valid, test;
};

Data load_data(const std::string& corpus, Index vocab_size, const moe::lm::Vocabulary* fixed = nullptr) {
  if (corpus.empty()) usage("--corpus FILE is needed (examples/lm/get-kjv FILE writes the King James Bible)");
  const moe::lm::Split split = moe::lm::read_split(corpus);
  Data d{fixed != nullptr ? *fixed : moe::lm::Vocabulary(split.train, vocab_size), {}, {}, {}};
  d.train = d.vocabulary.encode(split.train);
  d.valid = d.vocabulary.encode(split.valid);
  d.test = d.vocabulary.encode(split.test);
  return d;
}

long long ll(Index v) { return static_cast<long long>(v); }

// The experts column: 0 without a mixture, 1 for the deep stack (one expert of several layers).
Index experts_of(const ModelConfig& m) {
  return m.mixture == MixtureKind::none ? 0 : m.mixture == MixtureKind::deep ? 1 : m.experts;
}

// ---- training ---------------------------------------------------------------------------------

struct RunResult {
  std::string name;
  ModelConfig model;
  Index parameters = 0;
  double flops = 0;  // active, per token, between embedding and softmax
  double valid_ppl = 0, test_ppl = 0;
  double tokens_per_second = 0;
  Index tokens = 0;
  double cv2_importance = 0, cv2_load = 0, max_over_mean = 0;  // means over the last 50 windows
};

Index parameter_count(moe::lm::Trainer<B>& t) {
  Index n = 0;
  for (const auto& p : t.model().parameters()) n += p.size();
  return n;
}

// Trains until `tokens` words (or `minutes`) have been seen in total, checkpointing every
// save_every windows and at the end when a path is given; prints progress.
RunResult train(moe::lm::Trainer<B>& t, const Data& data, const std::string& name, const Options& o) {
  const Index per_window = t.tokens_per_window();
  const Index goal_windows = o.tokens > 0 ? (o.tokens + per_window - 1) / per_window : 0;
  const auto start = Clock::now();
  const Index first_step = t.progress().step;
  double loss = 0, cv2_i = 0, cv2_l = 0, maxmean = 0;
  Index recent = 0;
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  auto done = [&] {
    if (goal_windows > 0) return t.progress().step >= goal_windows;
    return elapsed() >= o.minutes * 60.0;
  };
  Index last_epoch = t.progress().epoch;
  while (!done()) {
    const auto st = t.train_window();
    const double a = recent < 50 ? 1.0 / static_cast<double>(recent + 1) : 1.0 / 50;  // running mean, then EMA
    loss += a * (st.loss - loss);
    cv2_i += a * (st.cv2_importance - cv2_i);
    cv2_l += a * (st.cv2_load - cv2_l);
    maxmean += a * (st.max_over_mean_load - maxmean);
    ++recent;
    const Index step = t.progress().step;
    if (!o.checkpoint.empty() && o.save_every > 0 && step % o.save_every == 0) t.save(o.checkpoint);
    if (!o.quiet && (step % 10 == 0 || done())) {
      const double secs = elapsed();
      const double rate = static_cast<double>((step - first_step) * per_window) / std::max(secs, 1e-9);
      const double frac = goal_windows > 0 ? static_cast<double>(step) / static_cast<double>(goal_windows)
                                           : secs / (o.minutes * 60.0);
      const int bar = static_cast<int>(std::min(1.0, frac) * 24);
      std::fprintf(stderr,
                   "\r%-10s [%-24s] %3.0f%% step %lld | %6.0f words/s | loss %.3f ppl %7.1f | CV^2 importance "
                   "%.3f load %.3f | max/mean load %.2f ",
                   name.c_str(), std::string(static_cast<std::size_t>(bar), '=').c_str(), 100 * std::min(1.0, frac),
                   ll(step), rate, loss, std::exp(loss), cv2_i, cv2_l, maxmean);
    }
    if (t.progress().epoch != last_epoch) {
      last_epoch = t.progress().epoch;
      const double v = t.evaluate(data.valid);
      if (!o.quiet) std::fprintf(stderr, "\n%s: epoch %lld done, valid perplexity %.1f\n", name.c_str(), ll(last_epoch), std::exp(v));
    }
  }
  const double secs = elapsed();
  if (!o.quiet) std::fprintf(stderr, "\n");
  if (!o.checkpoint.empty()) t.save(o.checkpoint);
  RunResult r;
  r.name = name;
  r.model = t.model().config();
  r.parameters = parameter_count(t);
  r.flops = moe::lm::active_flops(r.model);
  r.tokens = (t.progress().step - first_step) * per_window;
  r.tokens_per_second = static_cast<double>(r.tokens) / std::max(secs, 1e-9);
  r.valid_ppl = std::exp(t.evaluate(data.valid));
  r.test_ppl = std::exp(t.evaluate(data.test));
  r.cv2_importance = cv2_i;
  r.cv2_load = cv2_l;
  r.max_over_mean = maxmean;
  return r;
}

moe::lm::TrainConfig train_config(const Options& o) {
  if (o.batch < 1 || o.steps < 1) usage("--batch and --steps must be at least 1");
  if (!(o.lr > 0)) usage("--lr must be above 0");
  return {.batch = o.batch, .steps = o.steps, .lr = o.lr, .clip = 5.0};
}

int cmd_configs() {
  for (const auto& c : configurations(4096, 1))
    std::printf("%-11s %s: %.0f active FLOPs per token (softmax apart: %.0f at V = 4096)\n", c.name.c_str(),
                c.what.c_str(), moe::lm::active_flops(c.model), moe::lm::softmax_flops(c.model));
  return 0;
}

int cmd_train(const Options& o) {
  if (o.config.empty()) usage("train needs --config NAME (moe-lm configs lists them)");
  if (o.tokens == 0 && o.minutes <= 0) usage("train needs --tokens N or --minutes M");
  if (!o.checkpoint.empty() && std::filesystem::exists(o.checkpoint)) {
    const auto h = moe::lm::read_checkpoint_header(o.checkpoint);
    const Data data = load_data(o.corpus, h.model.vocab, &h.vocabulary);
    moe::lm::Trainer<B> t(h.model, h.train, h.vocabulary, data.train);
    t.load(o.checkpoint);
    std::fprintf(stderr, "resuming %s from step %lld (epoch %lld)\n", o.checkpoint.c_str(), ll(t.progress().step),
                 ll(t.progress().epoch));
    const RunResult r = train(t, data, o.config, o);
    std::printf("%s: valid perplexity %.2f, test perplexity %.2f\n", o.config.c_str(), r.valid_ppl, r.test_ppl);
    return 0;
  }
  const Data data = load_data(o.corpus, o.vocab);
  const std::vector<Named> all = configurations(data.vocabulary.size(), o.seed);
  const Named& c = find_configuration(all, o.config);
  moe::lm::Trainer<B> t(c.model, train_config(o), data.vocabulary, data.train);
  const RunResult r = train(t, data, c.name, o);
  std::printf("%s: valid perplexity %.2f, test perplexity %.2f\n", c.name.c_str(), r.valid_ppl, r.test_ppl);
  return 0;
}

int cmd_eval(const Options& o) {
  if (o.checkpoint.empty()) usage("eval needs --checkpoint PATH");
  const auto h = moe::lm::read_checkpoint_header(o.checkpoint);
  const Data data = load_data(o.corpus, h.model.vocab, &h.vocabulary);
  moe::lm::Trainer<B> t(h.model, h.train, h.vocabulary, data.train);
  t.load(o.checkpoint);
  std::printf("step %lld: valid perplexity %.2f, test perplexity %.2f\n", ll(t.progress().step),
              std::exp(t.evaluate(data.valid)), std::exp(t.evaluate(data.test)));
  return 0;
}

int cmd_generate(const Options& o) {
  if (o.checkpoint.empty()) usage("generate needs --checkpoint PATH");
  const auto h = moe::lm::read_checkpoint_header(o.checkpoint);
  // One stream, one step at a time; the weights from the checkpoint (its training stream is not
  // needed: a placeholder of two words makes the trainer's batcher valid).
  moe::lm::Trainer<B> t(h.model, h.train, h.vocabulary, std::vector<Index>(static_cast<std::size_t>(2 * h.train.batch * (h.train.steps + 1)), 1));
  t.load_weights(o.checkpoint);
  auto& model = t.model();
  model.reset_states();
  const auto& vocab = t.vocabulary();
  std::vector<Index> words = vocab.encode(moe::lm::tokenize(o.prompt));
  if (words.empty()) words.push_back(moe::lm::Vocabulary::kEosId);
  moe::Rng unused(0);
  moe::backend::HostMatrix<S> probs(1, vocab.size());
  std::uint64_t draw = 0;
  const moe::CounterRandom sampler{o.seed};
  std::string text;
  for (const Index w : words) text += (text.empty() ? "" : " ") + vocab.word(w);
  auto feed = [&](Index w) {
    const Index in[1] = {w}, target[1] = {0};
    model.forward(in, target, 1, 1, false, unused, 0);
    model.next_word_probabilities(probs.view(), static_cast<S>(std::max(o.temperature, 1e-3)));
  };
  for (const Index w : words) feed(w);
  for (Index i = 0; i < o.words; ++i) {
    const double u = moe::detail::uniform_open0(sampler.block(draw++, 0x5A4Bu, 0).v[0]);
    double acc = 0;
    Index next = vocab.size() - 1;
    for (Index v = 0; v < vocab.size(); ++v) {
      acc += static_cast<double>(probs(0, v));
      if (u <= acc) {
        next = v;
        break;
      }
    }
    text += " " + (next == moe::lm::Vocabulary::kEosId ? std::string("\n") : vocab.word(next));
    feed(next);
  }
  std::printf("%s\n", text.c_str());
  return 0;
}

std::string json_of(const std::vector<RunResult>& rows, const Options& o, double budget_words) {
  std::ostringstream j;
  j << "{\n  \"corpus\": \"" << o.corpus << "\",\n  \"tokens_per_run\": " << budget_words << ",\n  \"runs\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    j << "    {\"name\": \"" << r.name << "\", \"experts\": " << experts_of(r.model)
      << ", \"parameters\": " << r.parameters << ", \"active_flops_per_token\": " << r.flops
      << ", \"valid_perplexity\": " << r.valid_ppl << ", \"test_perplexity\": " << r.test_ppl
      << ", \"tokens\": " << r.tokens << ", \"tokens_per_second\": " << r.tokens_per_second
      << ", \"cv2_importance\": " << r.cv2_importance << ", \"cv2_load\": " << r.cv2_load
      << ", \"max_over_mean_load\": " << r.max_over_mean << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  j << "  ]\n}\n";
  return j.str();
}

// examples/lm/plot-compare: where the build says it is, or $MOE_LM_PLOT_SCRIPT.
std::string plot_script() {
  if (const char* env = std::getenv("MOE_LM_PLOT_SCRIPT")) return env;
#if defined(MOE_LM_PLOT_SCRIPT)
  return MOE_LM_PLOT_SCRIPT;
#else
  return "examples/lm/plot-compare";
#endif
}

int cmd_compare(const Options& o) {
  if (o.tokens == 0 && o.minutes <= 0) usage("compare needs --tokens N or --minutes M (per configuration)");
  const Data data = load_data(o.corpus, o.vocab);
  const auto all = configurations(data.vocabulary.size(), o.seed);
  std::vector<const Named*> chosen;
  if (o.configs.empty())
    for (const auto& c : all) chosen.push_back(&c);
  for (const auto& name : o.configs) chosen.push_back(&find_configuration(all, name));
  std::printf("corpus %s: %lld train, %lld valid, %lld test words; vocabulary %lld; budget %s per configuration\n",
              o.corpus.c_str(), ll(static_cast<Index>(data.train.size())), ll(static_cast<Index>(data.valid.size())),
              ll(static_cast<Index>(data.test.size())), ll(data.vocabulary.size()),
              o.tokens > 0 ? (std::to_string(o.tokens) + " words").c_str() : (std::to_string(o.minutes) + " min").c_str());
  std::vector<RunResult> rows;
  for (const Named* c : chosen) {
    moe::lm::Trainer<B> t(c->model, train_config(o), data.vocabulary, data.train);
    Options run = o;
    run.checkpoint.clear();
    rows.push_back(train(t, data, c->name, run));
  }
  std::printf("\n| configuration | experts | parameters | active FLOPs/token | valid ppl | test ppl | words/s |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : rows)
    std::printf("| %s | %lld | %lld | %.0f | %.1f | %.1f | %.0f |\n", r.name.c_str(),
                ll(experts_of(r.model)), ll(r.parameters), r.flops,
                r.valid_ppl, r.test_ppl, r.tokens_per_second);
  std::printf("(softmax apart: %.0f FLOPs per token in every configuration)\n", moe::lm::softmax_flops(rows.front().model));
  if (!o.json.empty()) {
    const std::string j = json_of(rows, o, static_cast<double>(o.tokens));
    moe::io::write_file_atomically(o.json, std::as_bytes(std::span<const char>(j.data(), j.size())));
    std::printf("wrote %s\n", o.json.c_str());
  }
  if (!o.plot.empty()) {
    if (o.json.empty()) usage("--plot needs --json PATH (the plot script reads it)");
    const std::string cmd = "'" + plot_script() + "' '" + o.json + "' '" + o.plot + "'";
    if (std::system(cmd.c_str()) != 0)
      std::fprintf(stderr, "moe-lm: the plot was not written (%s failed; it needs gnuplot, from scripts/install-deps)\n",
                   cmd.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    if (o.command == "configs") return cmd_configs();
    if (o.command == "train") return cmd_train(o);
    if (o.command == "eval") return cmd_eval(o);
    if (o.command == "generate") return cmd_generate(o);
    if (o.command == "compare") return cmd_compare(o);
    usage("unknown command " + o.command);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-lm: %s\n", e.what());
    return 1;
  }
}
