#pragma once
// The paper's language model (MATH.md 7), in miniature:
//   embedding -> LSTM -> MoE -> LSTM (-> more LSTMs) -> softmax,
// the MoE applied to every time step of a window at once ("convolutionally": its batch is
// steps x streams), its output added to its input (residual, by default). Dropout follows the
// embedding and every LSTM. A model without a mixture is the LSTM baseline; a mixture of one
// expert (k = 1) is the dense baseline of the same compute ("MoE-1-Wide").
//
// Written on moe::Backend like the layers (layers.hpp): the same model runs on any backend.

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "layers.hpp"
#include "moe/moe.hpp"
#include "moe/scalar_math.hpp"

namespace moe::lm {

// What sits between the first two LSTMs: nothing, one flat MoE layer, a hierarchical one, or a
// stack of `deep` single-expert layers (the paper's MoE-1-Deep: one expert of several layers).
enum class MixtureKind { none, flat, hierarchical, deep };

inline const char* to_string(MixtureKind k) {
  switch (k) {
    case MixtureKind::flat:
      return "flat";
    case MixtureKind::hierarchical:
      return "hierarchical";
    case MixtureKind::deep:
      return "deep";
    case MixtureKind::none:
      break;
  }
  return "none";
}

struct ModelConfig {
  Index vocab = 0;
  Index d = 64;            // embedding, LSTM and mixture width
  Index lstm_layers = 2;   // the mixture (if any) sits after the first
  MixtureKind mixture = MixtureKind::flat;
  Index experts = 32;      // routed experts (hierarchical: leaves)
  Index groups = 0;        // hierarchical: first-level groups of experts / groups leaves each
  Index k = 4;             // experts per token (hierarchical: 2 groups x 2 experts, k = 4)
  Index deep = 4;          // deep: single-expert layers stacked
  Index hidden = 64;       // each expert's hidden width
  bool residual = true;    // the mixture's output is added to its input
  bool sigmoid = true;     // the mixture's output passes through a sigmoid (the paper, appendix C)
  double dropout = 0.1;
  double w_balance = 0.1;  // w_importance = w_load (MATH.md 3), as in the paper
  bool noisy = true;       // the gate's training noise (MATH.md 2)
  std::uint64_t seed = 1;
};

// Multiply-adds times 2 per token of the layers between the embedding and the softmax, in the
// forward pass: each LSTM 2 (2d)(4d); a flat mixture's gate 2 d n and k experts of 2 (2 d h); a
// hierarchical one's gates 2 d g + 2 (2 d n / g), and 4 experts; a deep stack, per layer, a
// gate of one expert 2 d and that expert. (The embedding is a lookup; the
// softmax, 2 d V, is the same in every configuration and reported apart, as the paper does.)
inline double active_flops(const ModelConfig& c) {
  const double d = static_cast<double>(c.d), h = static_cast<double>(c.hidden);
  double f = static_cast<double>(c.lstm_layers) * 2.0 * (2.0 * d) * (4.0 * d);
  if (c.mixture == MixtureKind::flat) f += 2.0 * d * static_cast<double>(c.experts) + static_cast<double>(c.k) * 4.0 * d * h;
  if (c.mixture == MixtureKind::deep) f += static_cast<double>(c.deep) * (2.0 * d + 4.0 * d * h);
  if (c.mixture == MixtureKind::hierarchical) {
    const double g = static_cast<double>(c.groups), per = static_cast<double>(c.experts) / g;
    f += 2.0 * d * g + 2.0 * 2.0 * d * per + 4.0 * 4.0 * d * h;
  }
  return f;
}

inline double softmax_flops(const ModelConfig& c) { return 2.0 * static_cast<double>(c.d) * static_cast<double>(c.vocab); }

// What one window's forward reports.
struct WindowStats {
  double loss = 0;          // mean negative log-likelihood of the targets (nats)
  double balance_loss = 0;  // the mixture's importance and load losses (training objective adds it)
  double cv2_importance = 0, cv2_load = 0;
  double max_over_mean_load = 0;  // of the tokens per expert (leaves)
};

template <Backend B>
class Model {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  using Flat = moe::Layer<expert::FeedForward, gate::NoisyTopK, B, 1>;
  using Tree = moe::Layer<expert::FeedForward, gate::NoisyTopK, B, 2>;

  explicit Model(const ModelConfig& c)
      : config_(checked(c)),
        embedding_({.vocab = c.vocab, .d = c.d}, c.seed, "embedding"),
        softmax_({.d = c.d, .vocab = c.vocab}, c.seed, "softmax") {
    for (Index l = 0; l < c.lstm_layers; ++l)
      lstms_.emplace_back(typename Lstm<B>::Config{.d_in = c.d, .d_h = c.d}, c.seed, "lstm" + std::to_string(l + 1));
    states_.resize(static_cast<std::size_t>(c.lstm_layers));
    saved_.resize(static_cast<std::size_t>(c.lstm_layers));
    out_.resize(static_cast<std::size_t>(c.lstm_layers));
    const typename gate::NoisyTopK::Config gate{.k = c.k, .noisy = c.noisy, .w_importance = c.w_balance,
                                                .w_load = c.w_balance};
    if (c.mixture == MixtureKind::flat)
      flats_.emplace_back(typename Flat::Config{
          .d_model = c.d, .n_experts = c.experts, .expert = {.hidden = c.hidden}, .gate = gate, .seed = c.seed});
    if (c.mixture == MixtureKind::deep)
      for (Index l = 0; l < c.deep; ++l)
        flats_.emplace_back(typename Flat::Config{.d_model = c.d,
                                                  .n_experts = 1,
                                                  .expert = {.hidden = c.hidden},
                                                  .gate = {.k = 1, .noisy = false},
                                                  .seed = c.seed + static_cast<std::uint64_t>(l)});
    flat_f_.resize(flats_.size());
    flat_b_.resize(flats_.size());
    if (c.mixture == MixtureKind::hierarchical) {
      // Two levels of noisy top-2 (k = 4 experts per token); the balance losses over both levels.
      const typename gate::NoisyTopK::Config level{.k = 2, .noisy = c.noisy};
      tree_.emplace(typename Tree::Config{
          .d_model = c.d,
          .n_experts = c.experts,
          .expert = {.hidden = c.hidden},
          .gate = {.levels = {{{.branching = c.groups, .gate = level}, {.branching = c.experts / c.groups, .gate = level}}},
                   .w_importance = c.w_balance,
                   .w_load = c.w_balance},
          .seed = c.seed});
    }
  }

  [[nodiscard]] const ModelConfig& config() const { return config_; }

  // Every parameter: the embedding, the LSTMs, the mixture ("moe.gate.*", "moe.experts.*"), the
  // softmax.
  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    std::vector<Parameter<S>> all = embedding_.parameters();
    for (auto& l : lstms_)
      for (auto& p : l.parameters()) all.push_back(std::move(p));
    auto add_mixture = [&](auto& layer, const std::string& prefix) {
      for (auto& p : layer.parameters()) {
        p.name = prefix + p.name;
        all.push_back(std::move(p));
      }
    };
    for (std::size_t i = 0; i < flats_.size(); ++i)
      add_mixture(flats_[i], flats_.size() == 1 ? std::string("moe.") : "moe" + std::to_string(i + 1) + ".");
    if (tree_) add_mixture(*tree_, "moe.");
    for (auto& p : softmax_.parameters()) all.push_back(std::move(p));
    return all;
  }

  void zero_grad() {
    typename B::Context ctx;
    for (auto& p : parameters()) B::fill(ctx, p.grad, S(0));
  }

  // The LSTMs' carried states (truncated backpropagation through time): h and c of each, in
  // order. Empty buffers are zeros.
  [[nodiscard]] std::vector<typename Lstm<B>::State>& states() { return states_; }
  void reset_states() {
    for (auto& s : states_) s.reset();
  }

  // One window: inputs and targets [steps x batch] (time-major, backend memory). train: dropout
  // (keyed by (seed, call)), the gate's noise from rng, and what backward needs kept. The LSTMs'
  // states carry over to the next window.
  WindowStats forward(const Index* inputs, const Index* targets, Index steps, Index batch, bool train, Rng& rng,
                      std::uint64_t call) {
    typename B::Context ctx;
    const Index n = steps * batch, d = config_.d;
    const double p = train ? config_.dropout : 0.0;
    steps_ = steps;
    batch_ = batch;
    call_ = call;
    emb_.resize(n, d);
    embedding_.forward(ctx, inputs, n, emb_.view());
    Dropout<B>::apply(ctx, emb_.view(), p, config_.seed, site(0));
    WindowStats st;
    ConstMatrixView<S> in = emb_.view();
    for (std::size_t l = 0; l < lstms_.size(); ++l) {
      out_[l].resize(n, d);
      lstms_[l].forward(ctx, in, steps, batch, states_[l], out_[l].view(), saved_[l]);
      Dropout<B>::apply(ctx, out_[l].view(), p, config_.seed, site(static_cast<int>(l) + 1));
      in = out_[l].view();
      if (l == 0 && mixed()) {
        mix_.resize(n, d);
        const Mode mode = train ? Mode::train : Mode::inference;
        // A stack (deep) runs its layers in turn, each on the previous one's output.
        ConstMatrixView<S> x_in = in;
        auto run = [&](auto& layer, auto& f) {
          if (layer.gate().needs_noise(mode))
            layer.forward_into(f, x_in, mode, rng);
          else
            layer.forward_into(f, x_in, mode);
          x_in = f.y();
          const auto& s = f.stats();
          st.balance_loss += static_cast<double>(f.loss());
          st.cv2_importance = static_cast<double>(s.cv2_importance);
          st.cv2_load = static_cast<double>(s.cv2_load);
          double most = 0, sum = 0;
          for (const Index t : s.tokens_per_expert) {
            most = std::max(most, static_cast<double>(t));
            sum += static_cast<double>(t);
          }
          const double mean = sum / static_cast<double>(s.tokens_per_expert.size());
          st.max_over_mean_load = mean > 0 ? most / mean : 0;
        };
        for (std::size_t i = 0; i < flats_.size(); ++i) run(flats_[i], flat_f_[i]);
        if (tree_) run(*tree_, tree_f_);
        if (config_.sigmoid) {  // bounded: the next LSTM's gates are not driven into saturation
          S* m = mix_.data();
          const ConstMatrixView<S> y = x_in;
          B::for_each(ctx, n * d, [=] MOE_HD(Index i) { m[i] = moe::detail::sigmoid(y(i / d, i % d)); });
        } else {
          B::copy(ctx, x_in, mix_.view());
        }
        if (config_.residual) {
          S* m = mix_.data();
          const ConstMatrixView<S> x = in;
          B::for_each(ctx, n * d, [=] MOE_HD(Index i) { m[i] += x(i / d, i % d); });
        }
        in = mix_.view();
      }
    }
    top_ = in;
    st.loss = static_cast<double>(softmax_.forward(ctx, top_, targets, softmax_saved_));
    targets_ = targets;
    inputs_ = inputs;
    return st;
  }

  // Gradients of the last training forward's loss + balance_loss, added into the parameters'.
  void backward() {
    typename B::Context ctx;
    const Index n = steps_ * batch_, d = config_.d;
    const double p = config_.dropout;
    grad_.resize(n, d);
    softmax_.backward(ctx, top_, targets_, softmax_saved_, S(1), grad_.view());
    for (std::size_t l = lstms_.size(); l-- > 0;) {
      if (l == 0 && mixed()) {
        // grad_ is d(mix); the mixture's input is out_[0].
        dmix_.resize(n, d);
        ConstMatrixView<S> dy = grad_.view();
        if (config_.sigmoid) {  // d(y) = d(mix) s (1 - s), s = sigmoid(y) recomputed from the last layer's y
          dsig_.resize(n, d);
          S* out = dsig_.data();
          const S* g = grad_.data();
          const ConstMatrixView<S> y = !flats_.empty() ? flat_f_.back().y() : tree_f_.y();
          B::for_each(ctx, n * d, [=] MOE_HD(Index i) {
            const S sg = moe::detail::sigmoid(y(i / d, i % d));
            out[i] = g[i] * sg * (S(1) - sg);
          });
          dy = dsig_.view();
        }
        auto run = [&](auto& layer, auto& f, auto& b) {
          layer.backward_into(b, f, dy);
          dy = b.dx.view();
        };
        for (std::size_t i = flats_.size(); i-- > 0;) run(flats_[i], flat_f_[i], flat_b_[i]);
        if (tree_) run(*tree_, tree_f_, tree_b_);
        B::copy(ctx, dy, dmix_.view());
        if (config_.residual) {
          S* g = dmix_.data();
          const S* r = grad_.data();
          B::for_each(ctx, n * d, [=] MOE_HD(Index i) { g[i] += r[i]; });
        }
        std::swap(grad_, dmix_);
      }
      Dropout<B>::backward(ctx, grad_.view(), p, config_.seed, site(static_cast<int>(l) + 1));
      const ConstMatrixView<S> in = l == 0 ? ConstMatrixView<S>(emb_.view()) : layer_input(l);
      dx_.resize(n, d);
      lstms_[l].backward(ctx, in, steps_, batch_, saved_[l], ConstMatrixView<S>(grad_.view()), dx_.view());
      std::swap(grad_, dx_);
    }
    Dropout<B>::backward(ctx, grad_.view(), p, config_.seed, site(0));
    embedding_.backward(ctx, inputs_, n, ConstMatrixView<S>(grad_.view()));
  }

  // The next word's probabilities after the last forward's final step, for each stream:
  // [batch x vocab], at the given temperature.
  void next_word_probabilities(MatrixView<S> out, S temperature) const {
    typename B::Context ctx;
    const Index last = (steps_ - 1) * batch_;
    softmax_.probabilities(ctx, ConstMatrixView<S>(top_).block_rows(last, batch_), out, temperature);
  }

 private:
  static ModelConfig checked(const ModelConfig& c) {
    moe::detail::require(c.vocab >= 2, "moe::lm::Model: vocab = ", c.vocab, ", expected at least 2");
    moe::detail::require(c.d >= 1, "moe::lm::Model: d = ", c.d, ", expected at least 1");
    moe::detail::require(c.lstm_layers >= (c.mixture == MixtureKind::none ? 1 : 2), "moe::lm::Model: lstm_layers = ",
                         c.lstm_layers, ", expected at least ", c.mixture == MixtureKind::none ? 1 : 2,
                         " (the mixture sits between the first LSTM and the next)");
    moe::detail::require(c.dropout >= 0 && c.dropout < 1, "moe::lm::Model: dropout = ", c.dropout,
                         ", expected 0 <= dropout < 1");
    if (c.mixture == MixtureKind::deep)
      moe::detail::require(c.deep >= 1, "moe::lm::Model: deep = ", c.deep, ", expected at least 1 stacked layer");
    if (c.mixture == MixtureKind::hierarchical)
      moe::detail::require(c.groups >= 2 && c.experts % c.groups == 0 && c.experts / c.groups >= 2,
                           "moe::lm::Model: ", c.experts, " experts in ", c.groups,
                           " groups, expected at least 2 groups of at least 2 experts each, evenly");
    return c;
  }

  [[nodiscard]] bool mixed() const { return config_.mixture != MixtureKind::none; }
  // The dropout call of site s (0: the embedding, l + 1: LSTM l) in this window.
  [[nodiscard]] std::uint64_t site(int s) const { return call_ * 64 + static_cast<std::uint64_t>(s); }
  // The input of LSTM l > 0: the mixture's output after LSTM 0, else the previous LSTM's.
  [[nodiscard]] ConstMatrixView<S> layer_input(std::size_t l) const {
    return l == 1 && mixed() ? ConstMatrixView<S>(mix_.view()) : ConstMatrixView<S>(out_[l - 1].view());
  }

  ModelConfig config_;
  Embedding<B> embedding_;
  std::vector<Lstm<B>> lstms_;
  std::vector<Flat> flats_;  // flat: one layer; deep: the stack
  std::optional<Tree> tree_;
  SoftmaxCrossEntropy<B> softmax_;

  // The last forward, for backward and generation.
  std::vector<typename Lstm<B>::State> states_;
  std::vector<typename Lstm<B>::Saved> saved_;
  std::vector<Buffer<S>> out_;
  Buffer<S> emb_, mix_, grad_, dmix_, dx_, dsig_;
  ConstMatrixView<S> top_;
  std::vector<typename Flat::Forward> flat_f_;
  typename Tree::Forward tree_f_;
  std::vector<typename Flat::Backward> flat_b_;
  typename Tree::Backward tree_b_;
  typename SoftmaxCrossEntropy<B>::Saved softmax_saved_;
  const Index* targets_ = nullptr;
  const Index* inputs_ = nullptr;
  Index steps_ = 0, batch_ = 0;
  std::uint64_t call_ = 0;
};

}  // namespace moe::lm
