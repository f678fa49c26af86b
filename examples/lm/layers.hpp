#pragma once
// The layers of a small word-level language model, the demo of Shazeer et al. (ICLR 2017):
// embedding -> LSTM -> MoE -> LSTM -> softmax. Written once against moe::Backend: per-element
// work runs in B::for_each items, products in B::gemm, so the same code serves the CPU and the
// CUDA backend. Results are the same bits for any thread count (no atomics, fixed orders).
//
// Sequences are time-major: `steps` time steps of `batch` streams form a matrix of
// steps * batch rows, row t * batch + b holding stream b at step t.
//
// Parameters have stable dotted names under the prefix given to the constructor
// ("embedding.weight", "lstm1.w", "lstm1.b", "softmax.weight", "softmax.bias"); initial values
// are a pure function of (seed, name, element). backward ADDS into the gradients (zeroing them
// is the caller's job) and writes the input gradients.

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/op.hpp"
#include "moe/parameter.hpp"
#include "moe/random.hpp"
#include "moe/scalar_math.hpp"
#include "moe/view.hpp"

namespace moe::lm {

namespace detail {

// Throws moe::Error unless every token (count values in backend memory) lies in [0, vocab),
// naming the first one that does not. The tokens come to the host (one read).
template <Backend B>
void require_tokens(typename B::Context& ctx, const Index* tokens, Index count, Index vocab, const char* who,
                    const char* what) {
  if (count <= 0) return;
  moe::detail::require(tokens != nullptr, who, ": ", what, " is null, expected ", count, " tokens in backend memory");
  moe::detail::require_readable<B>(tokens, what);
  const std::vector<Index> host = to_host<B>(ctx, ConstMatrixView<Index>{tokens, count, 1});
  for (Index i = 0; i < count; ++i) {
    const Index v = host[static_cast<std::size_t>(i)];
    moe::detail::require(v >= 0 && v < vocab, who, ": ", what, "[", i, "] = ", v, ", expected a word id in [0, ", vocab,
                         ")");
  }
}

// Throws moe::Error unless m is rows x cols.
template <class T>
void require_shape(MatrixView<T> m, Index rows, Index cols, const char* who, const char* what) {
  moe::detail::require(m.rows == rows && m.cols == cols, who, ": ", what, " is ", m.rows, " x ", m.cols, ", expected ",
                       rows, " x ", cols);
}

// grad[c] += the sum over the rows of m of m(r, c), in the order of moe::segment_sums (a
// column of at most kSumChunk rows in row order; a longer one in chunks of kSumChunk rows, then
// the chunk sums in order). sums and partial are scratch.
template <Backend B>
void add_column_sums(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> m, typename B::Scalar* grad,
                     typename B::template Buffer<typename B::Scalar>& sums,
                     typename B::template Buffer<typename B::Scalar>& partial) {
  if (m.rows == 0 || m.cols == 0) return;
  sums.resize(1, m.cols);
  auto* s = sums.data();
  segment_sums<B>(
      ctx, nullptr, 1, m.rows, m.cols, [=] MOE_HD(Index r, Index c) { return m(r, c); }, s, partial);
  B::for_each(ctx, m.cols, [=] MOE_HD(Index c) { grad[c] += s[c]; });
}

}  // namespace detail

// Embedding: out.row(i) = weight.row(tokens[i]), weight [vocab x d], initialized uniform in
// (-init_bound, init_bound].
template <Backend B>
class Embedding {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  using Scalar = S;
  struct Config {
    Index vocab = 0;
    Index d = 0;
    double init_bound = 0.1;
    bool check_tokens = true;  // every call reads the tokens to the host and checks their range
  };

  Embedding(const Config& config, std::uint64_t seed, std::string name = "embedding")
      : config_(config), name_(std::move(name)) {
    moe::detail::require(config.vocab >= 1, "moe::lm::Embedding: vocab = ", config.vocab, ", expected at least 1");
    moe::detail::require(config.d >= 1, "moe::lm::Embedding: d = ", config.d, ", expected at least 1");
    weight_.resize(config.vocab, config.d);
    grad_.resize(config.vocab, config.d, S(0));
    typename B::Context ctx;
    moe::detail::init_uniform<B>(ctx, weight_.view(), seed, name_ + ".weight", config.init_bound);
  }

  [[nodiscard]] const Config& config() const { return config_; }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    return version_.hand_out(
        std::vector<Parameter<S>>{{name_ + ".weight", {config_.vocab, config_.d}, weight_.view(), grad_.view()}});
  }

  // out [count x d]: out.row(i) = weight.row(tokens[i]); tokens: count word ids in backend memory.
  void forward(typename B::Context& ctx, const Index* tokens, Index count, MatrixView<S> out) const {
    check(ctx, tokens, count);
    detail::require_shape(out, count, config_.d, "moe::lm::Embedding::forward", "out");
    const Index d = config_.d;
    const S* w = weight_.data();
    B::for_each(ctx, count * d, [=] MOE_HD(Index i) {
      const Index r = i / d, c = i % d;
      out(r, c) = w[tokens[r] * d + c];
    });
  }

  // grad.row(v) += dout.row(i) for every position i with tokens[i] = v. Deterministic without
  // atomics: the positions are sorted stably by word id (B::stable_sort_by_key); each run of
  // equal ids is one word, and one item per (word, column) adds that word's rows of dout into
  // its gradient one at a time in ascending position order:
  //   grad(v, c) = (((grad(v, c) + dout(i0, c)) + dout(i1, c)) + ...), i0 < i1 < ...
  // The work grows with count, not with vocab.
  void backward(typename B::Context& ctx, const Index* tokens, Index count, ConstMatrixView<S> dout) {
    check(ctx, tokens, count);
    detail::require_shape(dout, count, config_.d, "moe::lm::Embedding::backward", "dout");
    if (count == 0) return;
    order_.resize(count, 1);
    run_start_.resize(count, 1);
    run_.resize(count + 1, 1);
    first_.resize(count + 1, 1);
    Index* order = order_.data();
    Index* is_start = run_start_.data();
    Index* run = run_.data();
    Index* first = first_.data();
    B::stable_sort_by_key(ctx, tokens, count, config_.vocab, order);
    // is_start[p]: sorted position p begins a run of equal word ids.
    B::for_each(ctx, count,
                [=] MOE_HD(Index p) { is_start[p] = p == 0 || tokens[order[p]] != tokens[order[p - 1]] ? 1 : 0; });
    // run[p]: the runs begun before p (so the run index of a run start); run[count]: the runs.
    B::exclusive_scan(ctx, is_start, count, run);
    // first[u]: the first sorted position of run u; first[runs] = count.
    B::for_each(ctx, count + 1, [=] MOE_HD(Index p) {
      if (p == count)
        first[run[count]] = count;
      else if (is_start[p] != 0)
        first[run[p]] = p;
    });
    const Index d = config_.d;
    S* grad = grad_.data();
    B::for_each(ctx, count * d, [=] MOE_HD(Index i) {
      const Index u = i / d, c = i % d;
      if (u >= run[count]) return;
      const Index v = tokens[order[first[u]]];
      S acc = grad[v * d + c];
      for (Index p = first[u]; p < first[u + 1]; ++p) acc += dout(order[p], c);
      grad[v * d + c] = acc;
    });
  }

 private:
  void check(typename B::Context& ctx, const Index* tokens, Index count) const {
    moe::detail::require(count >= 0, "moe::lm::Embedding: count = ", count, ", expected count >= 0");
    if (config_.check_tokens)
      detail::require_tokens<B>(ctx, tokens, count, config_.vocab, "moe::lm::Embedding", "tokens");
  }

  Config config_;
  std::string name_;
  Buffer<S> weight_, grad_;
  Buffer<Index> order_, run_start_, run_, first_;  // backward workspace
  ParameterVersion version_;
};

// Lstm: one LSTM layer (Hochreiter and Schmidhuber 1997, with a forget gate), input width
// d_in, hidden width d_h. For each stream, with x_t the input row and [x_t, h_{t-1}] the
// concatenated row of width d_in + d_h:
//   a_t = [x_t, h_{t-1}] W + b                      W [(d_in + d_h) x 4 d_h], b [4 d_h]
//   i_t = sigmoid(a_t[0, d_h))                      input gate
//   f_t = sigmoid(a_t[d_h, 2 d_h))                  forget gate
//   g_t = tanh(a_t[2 d_h, 3 d_h))                   candidate
//   o_t = sigmoid(a_t[3 d_h, 4 d_h))                output gate
//   c_t = f_t * c_{t-1} + i_t * g_t
//   h_t = o_t * tanh(c_t)
// W's first d_in rows (W_x) multiply the input, its last d_h rows (W_h) the previous hidden
// state; the gate order of W's columns and of b is i, f, g, o. W is initialized uniform in
// (-1/sqrt(d_h), 1/sqrt(d_h)], b to zeros but the forget gate's block, set to
// Config::forget_bias (1 by default, so the cell remembers at the start of training).
//
// The state (h, c) is carried from one forward call to the next (truncated back-propagation
// through time): backward runs through the steps of its own call only, and no gradient flows
// into the state the call started from.
template <Backend B>
class Lstm {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  using Scalar = S;
  struct Config {
    Index d_in = 0;
    Index d_h = 0;
    double forget_bias = 1.0;
  };

  // h_{t-1} and c_{t-1} of every stream, [batch x d_h] each; plain values, no gradient. An
  // empty State (fresh or reset) is zeros.
  struct State {
    Buffer<S> h, c;
    void reset() {
      h.resize(0, 0);
      c.resize(0, 0);
    }
    [[nodiscard]] bool empty() const { return h.rows() == 0; }
  };

  // What backward needs from its forward.
  struct Saved {
    Index steps = 0, batch = 0;
    Buffer<S> gates;  // [steps * batch x 4 d_h] i, f, g, o after their nonlinearities
    Buffer<S> h;      // [(steps + 1) * batch x d_h] block 0: h of the starting state, block t + 1: h_t
    Buffer<S> c;      // [(steps + 1) * batch x d_h] block 0: c of the starting state, block t + 1: c_t
  };

  Lstm(const Config& config, std::uint64_t seed, std::string name = "lstm") : config_(config), name_(std::move(name)) {
    moe::detail::require(config.d_in >= 1, "moe::lm::Lstm: d_in = ", config.d_in, ", expected at least 1");
    moe::detail::require(config.d_h >= 1, "moe::lm::Lstm: d_h = ", config.d_h, ", expected at least 1");
    const Index h = config.d_h;
    w_.resize(config.d_in + h, 4 * h);
    gw_.resize(config.d_in + h, 4 * h, S(0));
    b_.resize(1, 4 * h, S(0));
    gb_.resize(1, 4 * h, S(0));
    typename B::Context ctx;
    moe::detail::init_uniform<B>(ctx, w_.view(), seed, name_ + ".w", 1.0 / std::sqrt(static_cast<double>(h)));
    B::fill(ctx, MatrixView<S>{b_.data() + h, 1, h}, static_cast<S>(config.forget_bias));
  }

  [[nodiscard]] const Config& config() const { return config_; }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    const Index h = config_.d_h;
    return version_.hand_out(std::vector<Parameter<S>>{{name_ + ".w", {config_.d_in + h, 4 * h}, w_.view(), gw_.view()},
                                                       {name_ + ".b", {4 * h}, b_.view(), gb_.view()}});
  }

  // Runs `steps` steps of `batch` streams from `state`: x [steps * batch x d_in] time-major,
  // h_out [steps * batch x d_h] gets h_t. Afterwards state holds (h, c) of the last step. The
  // input projection x W_x of every step is one GEMM; each step then adds h_{t-1} W_h with one
  // GEMM and applies the gates, one item per (stream, hidden unit).
  void forward(typename B::Context& ctx, ConstMatrixView<S> x, Index steps, Index batch, State& state,
               MatrixView<S> h_out, Saved& saved) const {
    const char* who = "moe::lm::Lstm::forward";
    moe::detail::require(steps >= 1, who, ": steps = ", steps, ", expected at least 1");
    moe::detail::require(batch >= 1, who, ": batch = ", batch, ", expected at least 1");
    const Index d_in = config_.d_in, h = config_.d_h, n = steps * batch;
    detail::require_shape(x, n, d_in, who, "x");
    detail::require_shape(h_out, n, h, who, "h_out");
    if (!state.empty()) {
      detail::require_shape(state.h.view(), batch, h, who, "state.h");
      detail::require_shape(state.c.view(), batch, h, who, "state.c");
    }
    saved.steps = steps;
    saved.batch = batch;
    saved.gates.resize(n, 4 * h);
    saved.h.resize(n + batch, h);
    saved.c.resize(n + batch, h);
    if (state.empty()) {
      B::fill(ctx, saved.h.view().block_rows(0, batch), S(0));
      B::fill(ctx, saved.c.view().block_rows(0, batch), S(0));
    } else {
      B::copy(ctx, ConstMatrixView<S>(state.h.view()), saved.h.view().block_rows(0, batch));
      B::copy(ctx, ConstMatrixView<S>(state.c.view()), saved.c.view().block_rows(0, batch));
    }
    const ConstMatrixView<S> w = w_.view();
    B::gemm(ctx, Op::none, Op::none, S(1), x, w.block_rows(0, d_in), S(0), saved.gates.view());
    const MatrixView<S> gates = saved.gates.view(), hs = saved.h.view(), cs = saved.c.view();
    const S* bias = b_.data();
    for (Index t = 0; t < steps; ++t) {
      const Index r0 = t * batch;
      B::gemm(ctx, Op::none, Op::none, S(1), ConstMatrixView<S>(hs.block_rows(r0, batch)), w.block_rows(d_in, h), S(1),
              gates.block_rows(r0, batch));
      B::for_each(ctx, batch * h, [=] MOE_HD(Index k) {
        const Index r = r0 + k / h, j = k % h;
        S* a = gates.row(r);
        const S ig = moe::detail::sigmoid(a[j] + bias[j]);
        const S fg = moe::detail::sigmoid(a[h + j] + bias[h + j]);
        const S gg = std::tanh(a[2 * h + j] + bias[2 * h + j]);
        const S og = moe::detail::sigmoid(a[3 * h + j] + bias[3 * h + j]);
        a[j] = ig;
        a[h + j] = fg;
        a[2 * h + j] = gg;
        a[3 * h + j] = og;
        const S c = fg * cs(r, j) + ig * gg;  // cs row r: c_{t-1} of this stream
        const S hv = og * std::tanh(c);
        cs(r + batch, j) = c;
        hs(r + batch, j) = hv;
        h_out(r, j) = hv;
      });
    }
    state.h.resize(batch, h);
    state.c.resize(batch, h);
    B::copy(ctx, ConstMatrixView<S>(hs.block_rows(n, batch)), state.h.view());
    B::copy(ctx, ConstMatrixView<S>(cs.block_rows(n, batch)), state.c.view());
  }

  // Back-propagation through the steps of the forward that wrote `saved`, given dh_out =
  // dLoss/dh_t [steps * batch x d_h]: adds dLoss/dW and dLoss/db into the gradients and writes
  // dx = dLoss/dx [steps * batch x d_in] (an empty view skips it). From the last step down, with
  // dh = dh_out_t + da_{t+1} W_h^T and dc = dc_{t+1} f_{t+1} + dh o_t (1 - tanh^2(c_t)):
  //   da_i = dc g_t i_t (1 - i_t)        da_f = dc c_{t-1} f_t (1 - f_t)
  //   da_g = dc i_t (1 - g_t^2)          da_o = dh tanh(c_t) o_t (1 - o_t)
  // and at the end dW_x += x^T da, dW_h += [h_{t-1}]^T da, db += column sums of da (in the
  // order of moe::segment_sums), dx = da W_x^T: one GEMM each over all steps.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, Index steps, Index batch, const Saved& saved,
                ConstMatrixView<S> dh_out, MatrixView<S> dx) {
    const char* who = "moe::lm::Lstm::backward";
    moe::detail::require(steps == saved.steps && batch == saved.batch, who, ": steps = ", steps, ", batch = ", batch,
                         ", expected those of the forward that wrote saved: steps = ", saved.steps,
                         ", batch = ", saved.batch);
    const Index d_in = config_.d_in, h = config_.d_h, n = steps * batch;
    detail::require_shape(x, n, d_in, who, "x");
    detail::require_shape(dh_out, n, h, who, "dh_out");
    if (!dx.empty()) detail::require_shape(dx, n, d_in, who, "dx");
    da_.resize(n, 4 * h);
    dh_next_.resize(batch, h);
    dc_next_.resize(batch, h);
    B::fill(ctx, dc_next_.view(), S(0));
    B::fill(ctx, dh_next_.view(), S(0));
    const ConstMatrixView<S> w = w_.view();
    const ConstMatrixView<S> gates = saved.gates.view(), cs = saved.c.view();
    const MatrixView<S> da = da_.view();
    const MatrixView<S> dh_next = dh_next_.view(), dc_next = dc_next_.view();
    for (Index t = steps - 1; t >= 0; --t) {
      const Index r0 = t * batch;
      B::for_each(ctx, batch * h, [=] MOE_HD(Index k) {
        const Index s = k / h, j = k % h, r = r0 + s;
        const S* g = gates.row(r);
        const S ig = g[j], fg = g[h + j], gg = g[2 * h + j], og = g[3 * h + j];
        const S c = cs(r + batch, j), c_prev = cs(r, j);
        const S tc = std::tanh(c);
        const S dh = dh_out(r, j) + dh_next(s, j);
        const S dc = dc_next(s, j) + dh * og * (S(1) - tc * tc);
        S* d = da.row(r);
        d[j] = dc * gg * ig * (S(1) - ig);
        d[h + j] = dc * c_prev * fg * (S(1) - fg);
        d[2 * h + j] = dc * ig * (S(1) - gg * gg);
        d[3 * h + j] = dh * tc * og * (S(1) - og);
        dc_next(s, j) = dc * fg;
      });
      if (t > 0)
        B::gemm(ctx, Op::none, Op::transpose, S(1), ConstMatrixView<S>(da.block_rows(r0, batch)), w.block_rows(d_in, h),
                S(0), dh_next);
    }
    const ConstMatrixView<S> dac = da;
    B::gemm(ctx, Op::transpose, Op::none, S(1), x, dac, S(1), gw_.view().block_rows(0, d_in));
    B::gemm(ctx, Op::transpose, Op::none, S(1), saved.h.view().block_rows(0, n), dac, S(1),
            gw_.view().block_rows(d_in, h));
    detail::add_column_sums<B>(ctx, dac, gb_.data(), db_, partial_);
    if (!dx.empty()) B::gemm(ctx, Op::none, Op::transpose, S(1), dac, w.block_rows(0, d_in), S(0), dx);
  }

 private:
  Config config_;
  std::string name_;
  Buffer<S> w_, b_, gw_, gb_;
  Buffer<S> da_, dh_next_, dc_next_, db_, partial_;  // backward workspace
  ParameterVersion version_;
};

// SoftmaxCrossEntropy: the output layer and its loss. logits = h W + b, W [d x vocab]
// initialized uniform in (-1/sqrt(d), 1/sqrt(d)], b [vocab] zeros; the loss of row r is the
// negative log-likelihood (natural log) of its target,
//   loss_r = lse_r - logits(r, target_r),  lse_r = m_r + log(sum_c exp(logits(r, c) - m_r)),
// m_r the row's largest logit, and forward returns their mean over the n rows.
template <Backend B>
class SoftmaxCrossEntropy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  using Scalar = S;
  struct Config {
    Index d = 0;
    Index vocab = 0;
    bool check_targets = true;  // every call reads the targets to the host and checks their range
  };

  struct Saved {
    Index n = 0;
    Buffer<S> logits;        // [n x vocab] h W + b
    Buffer<S> lse;           // [n x 1] lse_r
    Buffer<S> loss;          // [n x 1] loss_r
    Buffer<S> sum, partial;  // the sum of the losses and its scratch
  };

  SoftmaxCrossEntropy(const Config& config, std::uint64_t seed, std::string name = "softmax")
      : config_(config), name_(std::move(name)) {
    moe::detail::require(config.d >= 1, "moe::lm::SoftmaxCrossEntropy: d = ", config.d, ", expected at least 1");
    moe::detail::require(config.vocab >= 1, "moe::lm::SoftmaxCrossEntropy: vocab = ", config.vocab,
                         ", expected at least 1");
    w_.resize(config.d, config.vocab);
    gw_.resize(config.d, config.vocab, S(0));
    b_.resize(1, config.vocab, S(0));
    gb_.resize(1, config.vocab, S(0));
    typename B::Context ctx;
    moe::detail::init_uniform<B>(ctx, w_.view(), seed, name_ + ".weight",
                                 1.0 / std::sqrt(static_cast<double>(config.d)));
  }

  [[nodiscard]] const Config& config() const { return config_; }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    return version_.hand_out(
        std::vector<Parameter<S>>{{name_ + ".weight", {config_.d, config_.vocab}, w_.view(), gw_.view()},
                                  {name_ + ".bias", {config_.vocab}, b_.view(), gb_.view()}});
  }

  // The mean of loss_r over the n rows of h [n x d]; targets: n word ids in backend memory. The
  // per-row losses are computed one item per row and summed by moe::segment_sums (a fixed
  // order); the sum comes to the host (one synchronization).
  S forward(typename B::Context& ctx, ConstMatrixView<S> h, const Index* targets, Saved& saved) const {
    const Index n = h.rows, vocab = config_.vocab;
    check(ctx, h, targets, "moe::lm::SoftmaxCrossEntropy::forward");
    saved.n = n;
    if (n == 0) return S(0);
    saved.logits.resize(n, vocab);
    saved.lse.resize(n, 1);
    saved.loss.resize(n, 1);
    logits(ctx, h, saved.logits.view());
    const ConstMatrixView<S> l = saved.logits.view();
    S* lse = saved.lse.data();
    S* loss = saved.loss.data();
    B::for_each(ctx, n, [=] MOE_HD(Index r) {
      const S* row = l.row(r);
      S m = row[0];
      for (Index c = 1; c < vocab; ++c) m = row[c] > m ? row[c] : m;
      S sum = S(0);
      for (Index c = 0; c < vocab; ++c) sum += std::exp(row[c] - m);
      lse[r] = m + std::log(sum);
      loss[r] = lse[r] - row[targets[r]];
    });
    saved.sum.resize(1, 1);
    const S* per_row = loss;
    segment_sums<B>(
        ctx, nullptr, 1, n, 1, [=] MOE_HD(Index r, Index) { return per_row[r]; }, saved.sum.data(), saved.partial);
    const S total = to_host<B>(ctx, ConstMatrixView<S>(saved.sum.view()))[0];
    return total / static_cast<S>(n);
  }

  // Given the forward that wrote saved, with dlogits(r, c) = (softmax(logits_r)_c - [c = target_r]) * scale / n
  // (the gradient of scale * the mean loss): adds dW += h^T dlogits, db += column sums of
  // dlogits (in the order of moe::segment_sums), and writes dh = dlogits W^T [n x d].
  void backward(typename B::Context& ctx, ConstMatrixView<S> h, const Index* targets, const Saved& saved, S scale,
                MatrixView<S> dh) {
    const char* who = "moe::lm::SoftmaxCrossEntropy::backward";
    check(ctx, h, targets, who);
    moe::detail::require(h.rows == saved.n, who, ": h has ", h.rows,
                         " rows, expected those of the forward that wrote saved: ", saved.n);
    detail::require_shape(dh, h.rows, config_.d, who, "dh");
    const Index n = h.rows, vocab = config_.vocab;
    if (n == 0) return;
    dlogits_.resize(n, vocab);
    const ConstMatrixView<S> l = saved.logits.view();
    const S* lse = saved.lse.data();
    const MatrixView<S> dl = dlogits_.view();
    const S k = scale / static_cast<S>(n);
    B::for_each(ctx, n * vocab, [=] MOE_HD(Index i) {
      const Index r = i / vocab, c = i % vocab;
      const S p = std::exp(l(r, c) - lse[r]);
      dl(r, c) = (c == targets[r] ? p - S(1) : p) * k;
    });
    const ConstMatrixView<S> dlc = dl;
    B::gemm(ctx, Op::transpose, Op::none, S(1), h, dlc, S(1), gw_.view());
    detail::add_column_sums<B>(ctx, dlc, gb_.data(), db_, partial_);
    B::gemm(ctx, Op::none, Op::transpose, S(1), dlc, ConstMatrixView<S>(w_.view()), S(0), dh);
  }

  // out [n x vocab] = h W + b.
  void logits(typename B::Context& ctx, ConstMatrixView<S> h, MatrixView<S> out) const {
    const char* who = "moe::lm::SoftmaxCrossEntropy::logits";
    detail::require_shape(h, h.rows, config_.d, who, "h");
    detail::require_shape(out, h.rows, config_.vocab, who, "out");
    B::gemm(ctx, Op::none, Op::none, S(1), h, ConstMatrixView<S>(w_.view()), S(0), out);
    const Index vocab = config_.vocab;
    const S* bias = b_.data();
    B::for_each(ctx, out.rows * vocab, [=] MOE_HD(Index i) { out(i / vocab, i % vocab) += bias[i % vocab]; });
  }

  // probs [n x vocab]: row r is softmax(logits_r / temperature) (max-shifted), the distribution of
  // the next word, for sampling. temperature > 0; 1 is the model's own distribution.
  void probabilities(typename B::Context& ctx, ConstMatrixView<S> h, MatrixView<S> probs, S temperature = S(1)) const {
    moe::detail::require(temperature > S(0), "moe::lm::SoftmaxCrossEntropy::probabilities: temperature = ", temperature,
                         ", expected temperature > 0");
    logits(ctx, h, probs);
    const Index vocab = config_.vocab;
    const S inv_t = S(1) / temperature;
    B::for_each(ctx, probs.rows, [=] MOE_HD(Index r) {
      S* row = probs.row(r);
      S m = row[0];
      for (Index c = 1; c < vocab; ++c) m = row[c] > m ? row[c] : m;
      S sum = S(0);
      for (Index c = 0; c < vocab; ++c) {
        row[c] = std::exp((row[c] - m) * inv_t);
        sum += row[c];
      }
      for (Index c = 0; c < vocab; ++c) row[c] /= sum;
    });
  }

 private:
  void check(typename B::Context& ctx, ConstMatrixView<S> h, const Index* targets, const char* who) const {
    detail::require_shape(h, h.rows, config_.d, who, "h");
    if (config_.check_targets) detail::require_tokens<B>(ctx, targets, h.rows, config_.vocab, who, "targets");
  }

  Config config_;
  std::string name_;
  Buffer<S> w_, b_, gw_, gb_;
  Buffer<S> dlogits_, db_, partial_;  // backward workspace
  ParameterVersion version_;
};

// Dropout (Srivastava et al. 2014, inverted): each element is kept with probability 1 - p and
// scaled by 1 / (1 - p), so its expectation is unchanged; p = 0 is the identity. The mask is a
// pure function of (seed, call, element): element (r, c) of an R x C matrix is element r * C + c
// whatever the stride, kept when the uniform in (0, 1] of moe::CounterRandom{seed} at counter
// (r * C + c, call mod 2^32, kStream ^ (call >> 32)) exceeds p. Calling backward with the
// forward's (p, seed, call) applies the same mask to the gradient.
template <Backend B>
class Dropout {
  using S = typename B::Scalar;

 public:
  using Scalar = S;
  static constexpr std::uint32_t kStream = 0xD409u;

  // Whether element `element` is kept (the mask above).
  MOE_HD static bool kept(std::uint64_t seed, std::uint64_t call, Index element, double p) {
    const CounterRandom stream{seed};
    const auto word = stream
                          .block(static_cast<std::uint64_t>(element), static_cast<std::uint32_t>(call),
                                 kStream ^ static_cast<std::uint32_t>(call >> 32))
                          .v[0];
    return moe::detail::uniform_open0(word) > p;
  }

  // x = mask * x / (1 - p), in place; 0 <= p < 1.
  static void apply(typename B::Context& ctx, MatrixView<S> x, double p, std::uint64_t seed, std::uint64_t call) {
    moe::detail::require(p >= 0.0 && p < 1.0, "moe::lm::Dropout: p = ", p, ", expected 0 <= p < 1");
    if (p == 0.0 || x.empty()) return;
    const Index cols = x.cols;
    const S scale = static_cast<S>(1.0 / (1.0 - p));
    B::for_each(ctx, x.rows * cols, [=] MOE_HD(Index i) {
      S& v = x(i / cols, i % cols);
      v = kept(seed, call, i, p) ? v * scale : S(0);
    });
  }

  // dx = mask * dx / (1 - p), in place, with the mask of apply(ctx, x, p, seed, call).
  static void backward(typename B::Context& ctx, MatrixView<S> dx, double p, std::uint64_t seed, std::uint64_t call) {
    apply(ctx, dx, p, seed, call);
  }
};

}  // namespace moe::lm
