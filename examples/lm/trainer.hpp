#pragma once
// Training the language model (model.hpp) by truncated backpropagation through time: windows
// of `steps` words of `batch` contiguous streams (corpus.hpp's Batcher), the LSTMs' states
// carried from window to window, Adam with the gradients' global norm clipped, evaluation by
// perplexity, and checkpoints that resume exactly.
//
// A checkpoint is one safetensors file, written atomically (temp file, fsync, rename): every
// parameter ("param/<name>"), Adam's moments ("adam.m/<name>", "adam.v/<name>"), the LSTMs'
// carried states ("state/<i>.h", "state/<i>.c"), and in the metadata the model and training
// configuration, the vocabulary, the step, the epoch, the data position and the gate noise's
// step. Training resumed from it continues bit for bit as if it had never stopped. A load reads
// and checks everything before it changes anything.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "corpus.hpp"
#include "model.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/optim/adam.hpp"

namespace moe::lm {

struct TrainConfig {
  Index batch = 32;   // streams
  Index steps = 20;   // unrolled time steps per window
  double lr = 3e-3;   // Adam
  double clip = 5.0;  // the gradients' global norm is scaled down to at most this (0: off)
};

// Where training stands: what a checkpoint records besides the weights.
struct Progress {
  Index step = 0;      // windows trained
  Index epoch = 0;     // passes over the training stream completed
  Index position = 0;  // the Batcher's position in the current pass
};

inline constexpr const char* kCheckpointFormat = "moe-lm/1";

namespace detail {

// The configuration as metadata entries (every field, in text).
inline std::map<std::string, std::string> describe(const ModelConfig& m, const TrainConfig& t) {
  auto num = [](auto v) {
    std::ostringstream s;
    s.precision(17);
    s << v;
    return s.str();
  };
  return {{"model.vocab", num(m.vocab)},         {"model.d", num(m.d)},
          {"model.lstm_layers", num(m.lstm_layers)}, {"model.mixture", to_string(m.mixture)},
          {"model.experts", num(m.experts)},     {"model.groups", num(m.groups)},
          {"model.k", num(m.k)},                 {"model.hidden", num(m.hidden)},
          {"model.deep", num(m.deep)},
          {"model.residual", num(m.residual)},   {"model.dropout", num(m.dropout)},
          {"model.sigmoid", num(m.sigmoid)},
          {"model.w_balance", num(m.w_balance)}, {"model.noisy", num(m.noisy)},
          {"model.seed", num(m.seed)},           {"train.batch", num(t.batch)},
          {"train.steps", num(t.steps)},         {"train.lr", num(t.lr)},
          {"train.clip", num(t.clip)}};
}

inline const std::string& entry(const io::Metadata& meta, const std::string& key, const std::string& origin) {
  const auto it = meta.find(key);
  moe::detail::require(it != meta.end(), origin, ": metadata '", key, "' is missing, expected a moe-lm checkpoint");
  return it->second;
}

template <class T>
T parse_number(const io::Metadata& meta, const std::string& key, const std::string& origin) {
  const std::string& text = entry(meta, key, origin);
  std::istringstream in(text);
  T v{};
  in >> v;
  moe::detail::require(!in.fail() && in.eof(), origin, ": metadata '", key, "' = '", text, "', expected a number");
  return v;
}

}  // namespace detail

// The model and training configuration and the vocabulary a checkpoint was written with.
struct CheckpointHeader {
  ModelConfig model;
  TrainConfig train;
  Vocabulary vocabulary;
  Progress progress;
};

// The header of an opened checkpoint (path names it in the errors).
inline CheckpointHeader checkpoint_header(const io::SafeTensors& file, const std::string& path) {
  const auto& meta = file.metadata();
  using detail::parse_number;
  moe::detail::require(detail::entry(meta, "format", path) == kCheckpointFormat, path, ": format '",
                       detail::entry(meta, "format", path), "', expected '", kCheckpointFormat, "'");
  CheckpointHeader h;
  h.model.vocab = parse_number<Index>(meta, "model.vocab", path);
  h.model.d = parse_number<Index>(meta, "model.d", path);
  h.model.lstm_layers = parse_number<Index>(meta, "model.lstm_layers", path);
  const std::string& kind = detail::entry(meta, "model.mixture", path);
  moe::detail::require(kind == "none" || kind == "flat" || kind == "hierarchical" || kind == "deep", path,
                       ": metadata 'model.mixture' = '", kind, "', expected none, flat, hierarchical or deep");
  h.model.mixture = kind == "flat"           ? MixtureKind::flat
                    : kind == "hierarchical" ? MixtureKind::hierarchical
                    : kind == "deep"         ? MixtureKind::deep
                                             : MixtureKind::none;
  h.model.experts = parse_number<Index>(meta, "model.experts", path);
  h.model.groups = parse_number<Index>(meta, "model.groups", path);
  h.model.k = parse_number<Index>(meta, "model.k", path);
  h.model.hidden = parse_number<Index>(meta, "model.hidden", path);
  h.model.deep = parse_number<Index>(meta, "model.deep", path);
  h.model.residual = parse_number<int>(meta, "model.residual", path) != 0;
  h.model.sigmoid = parse_number<int>(meta, "model.sigmoid", path) != 0;
  h.model.dropout = parse_number<double>(meta, "model.dropout", path);
  h.model.w_balance = parse_number<double>(meta, "model.w_balance", path);
  h.model.noisy = parse_number<int>(meta, "model.noisy", path) != 0;
  h.model.seed = parse_number<std::uint64_t>(meta, "model.seed", path);
  h.train.batch = parse_number<Index>(meta, "train.batch", path);
  h.train.steps = parse_number<Index>(meta, "train.steps", path);
  h.train.lr = parse_number<double>(meta, "train.lr", path);
  h.train.clip = parse_number<double>(meta, "train.clip", path);
  h.progress.step = parse_number<Index>(meta, "progress.step", path);
  h.progress.epoch = parse_number<Index>(meta, "progress.epoch", path);
  h.progress.position = parse_number<Index>(meta, "progress.position", path);
  h.vocabulary = Vocabulary::parse(detail::entry(meta, "vocabulary", path), "moe::lm::read_checkpoint_header", path);
  moe::detail::require(h.vocabulary.size() == h.model.vocab, path, ": ", h.vocabulary.size(),
                       " words in the vocabulary, expected model.vocab = ", h.model.vocab);
  return h;
}

inline CheckpointHeader read_checkpoint_header(const std::string& path) {
  return checkpoint_header(io::SafeTensors::open(path), path);
}

template <Backend B>
class Trainer {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  // train: the training stream (word ids), cut into config.batch streams.
  Trainer(const ModelConfig& model, const TrainConfig& train, Vocabulary vocabulary, std::vector<Index> train_tokens)
      : model_(model),
        train_(train),
        vocabulary_(std::move(vocabulary)),
        batcher_(std::move(train_tokens), train.batch, train.steps),
        adam_({.lr = train.lr}),
        rng_(model.seed + 0x9E3779B9u) {
    moe::detail::require(vocabulary_.size() == model.vocab, "moe::lm::Trainer: a vocabulary of ", vocabulary_.size(),
                         " words, expected model.vocab = ", model.vocab);
    moe::detail::require(train.clip >= 0, "moe::lm::Trainer: clip = ", train.clip, ", expected >= 0");
  }

  [[nodiscard]] Model<B>& model() { return model_; }
  [[nodiscard]] const Vocabulary& vocabulary() const { return vocabulary_; }
  [[nodiscard]] const TrainConfig& train_config() const { return train_; }
  [[nodiscard]] const Progress& progress() const { return progress_; }
  [[nodiscard]] Index windows_per_epoch() const { return batcher_.windows(); }
  [[nodiscard]] Index tokens_per_window() const { return train_.batch * train_.steps; }

  // Trains on the next window (starting a new epoch, with fresh LSTM states, after the last):
  // forward, backward of the mean negative log-likelihood plus the balance losses, the global
  // gradient norm clipped to train.clip, one Adam step.
  WindowStats train_window() {
    if (!batcher_.next(inputs_host_, targets_host_)) {
      ++progress_.epoch;
      batcher_.reset();
      model_.reset_states();
      moe::detail::require(batcher_.next(inputs_host_, targets_host_), "moe::lm::Trainer: the training stream holds no window");
    }
    typename B::Context ctx;
    from_host<B>(ctx, inputs_host_, inputs_);
    from_host<B>(ctx, targets_host_, targets_);
    model_.zero_grad();
    const WindowStats st = model_.forward(inputs_.data(), targets_.data(), train_.steps, train_.batch, true, rng_,
                                          static_cast<std::uint64_t>(progress_.step));
    model_.backward();
    auto params = model_.parameters();
    if (train_.clip > 0) clip(ctx, params);
    adam_.step(params);
    ++progress_.step;
    progress_.position = batcher_.position();
    return st;
  }

  // The mean negative log-likelihood per word of a stream (perplexity = exp of it), in windows
  // of this trainer's shape from fresh LSTM states, without dropout or noise. The training
  // states are kept aside and restored.
  double evaluate(const std::vector<Index>& tokens) {
    const std::vector<typename Lstm<B>::State> kept = model_.states();
    model_.reset_states();
    Batcher batches(tokens, train_.batch, train_.steps);
    typename B::Context ctx;
    double sum = 0;
    Index windows = 0;
    while (batches.next(inputs_host_, targets_host_)) {
      from_host<B>(ctx, inputs_host_, inputs_);
      from_host<B>(ctx, targets_host_, targets_);
      sum += model_.forward(inputs_.data(), targets_.data(), train_.steps, train_.batch, false, rng_, 0).loss;
      ++windows;
    }
    model_.states() = kept;
    moe::detail::require(windows > 0, "moe::lm::Trainer::evaluate: ", tokens.size(), " words make no window of ",
                         train_.steps, " steps x ", train_.batch, " streams");
    return sum / static_cast<double>(windows);
  }

  // Writes the checkpoint (atomically).
  void save(const std::string& path) {
    typename B::Context ctx;
    io::SafeTensorsWriter w;
    w.set_metadata("format", kCheckpointFormat);
    for (const auto& [k, v] : detail::describe(model_.config(), train_)) w.set_metadata(k, v);
    w.set_metadata("vocabulary", vocabulary_.text());
    w.set_metadata("progress.step", std::to_string(progress_.step));
    w.set_metadata("progress.epoch", std::to_string(progress_.epoch));
    w.set_metadata("progress.position", std::to_string(progress_.position));
    w.set_metadata("adam.steps", std::to_string(adam_.steps()));
    w.set_metadata("noise.step", std::to_string(rng_.step()));
    for (auto& p : model_.parameters()) {
      const auto [m, v] = adam_.moments(p);
      const std::vector<std::int64_t> shape{p.value.rows, p.value.cols};
      w.add("param/" + p.name, shape, to_host<B>(ctx, ConstMatrixView<S>(p.value)));
      w.add("adam.m/" + p.name, shape, to_host<B>(ctx, ConstMatrixView<S>(m)));
      w.add("adam.v/" + p.name, shape, to_host<B>(ctx, ConstMatrixView<S>(v)));
    }
    const auto& states = model_.states();
    for (std::size_t i = 0; i < states.size(); ++i) {
      const std::vector<std::int64_t> shape{train_.batch, model_.config().d};
      for (const auto* part : {&states[i].h, &states[i].c}) {
        std::vector<S> values(static_cast<std::size_t>(train_.batch * model_.config().d), S(0));
        if (!states[i].empty()) values = to_host<B>(ctx, ConstMatrixView<S>(part->view()));
        w.add("state/" + std::to_string(i) + (part == &states[i].h ? ".h" : ".c"), shape, values);
      }
    }
    w.write(path);
  }

  // Restores everything save wrote. The file must hold this trainer's model and training
  // configuration and vocabulary; it is read and checked whole before anything changes.
  void load(const std::string& path) { restore(path, true); }

  // Restores the parameters only (to evaluate or generate; the training stream may be another).
  void load_weights(const std::string& path) { restore(path, false); }

 private:
  void restore(const std::string& path, bool everything) {
    const auto file = io::SafeTensors::open(path);  // opened, validated and read once
    const CheckpointHeader h = checkpoint_header(file, path);
    const auto mine = detail::describe(model_.config(), train_), theirs = detail::describe(h.model, h.train);
    for (const auto& [k, v] : mine)
      moe::detail::require(theirs.at(k) == v, path, ": metadata '", k, "' = ", theirs.at(k), ", but this model has ", v);
    moe::detail::require(h.vocabulary.text() == vocabulary_.text(), path,
                         ": another vocabulary than this model's");
    const auto& meta = file.metadata();
    const Index adam_steps = detail::parse_number<Index>(meta, "adam.steps", path);
    const auto noise_step = detail::parse_number<std::uint64_t>(meta, "noise.step", path);
    moe::detail::require(!everything || (h.progress.position >= 0 && h.progress.position <= batcher_.stream_length()), path,
                         ": progress.position = ", h.progress.position, ", expected within the training stream's ",
                         batcher_.stream_length(), " positions (another corpus?)");
    auto params = model_.parameters();
    std::vector<std::vector<S>> values, ms, vs;
    for (const auto& p : params) {
      const io::Expect e{std::vector<std::int64_t>{p.value.rows, p.value.cols}, true};
      values.push_back(file.template read<S>("param/" + p.name, e));
      ms.push_back(file.template read<S>("adam.m/" + p.name, e));
      vs.push_back(file.template read<S>("adam.v/" + p.name, e));
    }
    const io::Expect state_shape{std::vector<std::int64_t>{train_.batch, model_.config().d}, true};
    std::vector<std::vector<S>> hs, cs;
    for (std::size_t i = 0; i < model_.states().size(); ++i) {
      hs.push_back(file.template read<S>("state/" + std::to_string(i) + ".h", state_shape));
      cs.push_back(file.template read<S>("state/" + std::to_string(i) + ".c", state_shape));
    }
    // Everything read and checked: now change the trainer.
    typename B::Context ctx;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto [m, v] = adam_.moments(params[i]);
      const Index rows = params[i].value.rows, cols = params[i].value.cols;
      B::copy(ctx, ConstMatrixView<S>{values[i].data(), rows, cols}, params[i].value);
      B::copy(ctx, ConstMatrixView<S>{ms[i].data(), rows, cols}, m);
      B::copy(ctx, ConstMatrixView<S>{vs[i].data(), rows, cols}, v);
      params[i].changed();
    }
    B::synchronize(ctx);
    if (!everything) return;
    auto& states = model_.states();
    for (std::size_t i = 0; i < states.size(); ++i) {
      states[i].h.resize(train_.batch, model_.config().d);
      states[i].c.resize(train_.batch, model_.config().d);
      B::copy(ctx, ConstMatrixView<S>{hs[i].data(), train_.batch, model_.config().d}, states[i].h.view());
      B::copy(ctx, ConstMatrixView<S>{cs[i].data(), train_.batch, model_.config().d}, states[i].c.view());
    }
    B::synchronize(ctx);
    adam_.set_steps(static_cast<long>(adam_steps));
    rng_ = Rng(rng_.seed(), noise_step);
    progress_ = h.progress;
    batcher_.seek(h.progress.position);
  }

  // Scales every gradient by clip / norm when their global L2 norm exceeds clip.
  void clip(typename B::Context& ctx, const std::vector<Parameter<S>>& params) {
    double sq = 0;
    for (const auto& p : params)
      for (const S g : to_host<B>(ctx, ConstMatrixView<S>(p.grad))) sq += static_cast<double>(g) * static_cast<double>(g);
    const double norm = std::sqrt(sq);
    if (!(norm > train_.clip)) return;
    const S scale = static_cast<S>(train_.clip / norm);
    for (const auto& p : params) {
      S* g = p.grad.data;
      B::for_each(ctx, p.size(), [=] MOE_HD(Index i) { g[i] *= scale; });
    }
  }

  Model<B> model_;
  TrainConfig train_;
  Vocabulary vocabulary_;
  Batcher batcher_;
  optim::Adam<B> adam_;
  Rng rng_;
  Progress progress_;
  std::vector<Index> inputs_host_, targets_host_;
  Buffer<Index> inputs_, targets_;
};

}  // namespace moe::lm
