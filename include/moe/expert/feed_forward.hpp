#pragma once
// moe::expert::FeedForward: the paper's expert (MATH.md 1), E(x) = relu(x W1 + b1) W2 + b2,
// W1: d x h, W2: h x d, biases optional and off by default. Parameters are stacked over the
// experts ("experts.w1" is [n, d, h]) and each weight is applied by one grouped GEMM.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moe/error.hpp"
#include "moe/expert_group.hpp"
#include "moe/precision.hpp"

namespace moe::expert {

struct FeedForward {
  struct Config {
    Index hidden = 0;   // h, the hidden width of each expert
    bool bias = false;  // the reference implementation has none
    Precision precision = Precision::fp32;  // of the GEMMs; bf16 / tf32: operands rounded, fp32 accumulation (float only)
  };
  template <Backend B>
  class Group;
};

template <Backend B>
class FeedForward::Group {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> pre;  // [rows x h] x W1 + b1, before the ReLU
    Buffer<S> act;  // [rows x h] relu(pre)
  };

  // shard: which experts of a sharded layer this group holds (default: all of them).
  Group(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, ExpertShard shard = {})
      : config_(config), d_(d_model), n_(n_experts) {
    detail::require(config.precision == Precision::fp32 || std::is_same_v<S, float>, "expert::FeedForward: precision = ",
                    to_string(config.precision), " needs a float backend, this one computes in ", sizeof(S) * 8,
                    "-bit floating point");
    detail::require(config.hidden >= 1, "expert::FeedForward: hidden = ", config.hidden,
                    ", expected at least 1 (set Config::hidden)");
    detail::require(n_experts >= 1, "expert::FeedForward: n_experts = ", n_experts, ", expected at least 1");
    const Index h = config.hidden;
    w1_.resize(n_ * d_, h);
    w2_.resize(n_ * h, d_);
    g1_.resize(n_ * d_, h, S(0));
    g2_.resize(n_ * h, d_, S(0));
    b1_.resize(n_, h, S(0));
    b2_.resize(n_, d_, S(0));
    gb1_.resize(n_, h, S(0));
    gb2_.resize(n_, d_, S(0));
    // Uniform in (-1/sqrt(fan_in), 1/sqrt(fan_in)], a pure function of (seed, name, element).
    typename B::Context ctx;
    const Index first = detail::shard_first(shard, n_, "expert::FeedForward");
    detail::init_uniform<B>(ctx, w1_.view(), seed, "experts.w1", 1.0 / std::sqrt(static_cast<double>(d_)), first * d_ * h);
    detail::init_uniform<B>(ctx, w2_.view(), seed, "experts.w2", 1.0 / std::sqrt(static_cast<double>(h)), first * h * d_);
  }

  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] const Config& config() const { return config_; }

  void forward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, MatrixView<S> ys,
               Saved& saved) const {
    const Index rows = xs.rows, h = config_.hidden;
    saved.pre.resize(rows, h);
    saved.act.resize(rows, h);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, w1_.view(), saved.pre.view(), config_.precision);
    S* pre = saved.pre.data();
    S* act = saved.act.data();
    const S* b1 = config_.bias ? b1_.data() : nullptr;
    const Index* off = offsets;
    const Index n = n_;
    B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
      if (b1 != nullptr) pre[i] += b1[segment_of_row(off, n, i / h) * h + i % h];
      act[i] = pre[i] > S(0) ? pre[i] : S(0);
    });
    B::grouped_gemm(ctx, offsets, n_, Op::none, saved.act.view(), w2_.view(), ys, config_.precision);
    if (config_.bias) add_row_bias(ctx, offsets, b2_.data(), ys);
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dys, MatrixView<S> dxs) {
    const Index rows = xs.rows, h = config_.hidden;
    dpre_.resize(rows, h);
    B::grouped_gemm_wgrad(ctx, offsets, n_, saved.act.view(), dys, S(1), g2_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dys, w2_.view(), dpre_.view(), config_.precision);
    S* dpre = dpre_.data();
    const S* pre = saved.pre.data();
    B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
      if (!(pre[i] > S(0))) dpre[i] = S(0);
    });
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, ConstMatrixView<S>(dpre_.view()), S(1), g1_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, ConstMatrixView<S>(dpre_.view()), w1_.view(), dxs, config_.precision);
    if (config_.bias) {
      sum_rows_per_expert(ctx, offsets, ConstMatrixView<S>(dpre_.view()), gb1_.data());
      sum_rows_per_expert(ctx, offsets, dys, gb2_.data());
    }
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    const Index h = config_.hidden;
    std::vector<Parameter<S>> p{{"experts.w1", {n_, d_, h}, w1_.view(), g1_.view()},
                                {"experts.w2", {n_, h, d_}, w2_.view(), g2_.view()}};
    if (config_.bias) {
      p.push_back({"experts.b1", {n_, h}, b1_.view(), gb1_.view()});
      p.push_back({"experts.b2", {n_, d_}, b2_.view(), gb2_.view()});
    }
    return p;
  }

  // Steps of forward and backward; public only because a CUDA device lambda cannot live in a
  // private member function.
  void add_row_bias(typename B::Context& ctx, const Index* offsets, const S* bias, MatrixView<S> ys) const {
    const Index n = n_, cols = ys.cols;
    B::for_each(ctx, ys.rows * cols, [=] MOE_HD(Index i) {
      const Index r = i / cols, c = i % cols;
      ys(r, c) += bias[segment_of_row(offsets, n, r) * cols + c];
    });
  }

  // grad[e, :] += sum of the rows of m owned by expert e, in row order.
  void sum_rows_per_expert(typename B::Context& ctx, const Index* offsets, ConstMatrixView<S> m, S* grad) const {
    const Index cols = m.cols;
    B::for_each(ctx, n_ * cols, [=] MOE_HD(Index i) {
      const Index e = i / cols, c = i % cols;
      S acc = grad[i];
      for (Index r = offsets[e]; r < offsets[e + 1]; ++r) acc += m(r, c);
      grad[i] = acc;
    });
  }


 private:
  Config config_;
  Index d_, n_;
  Buffer<S> w1_, w2_, b1_, b2_;
  Buffer<S> g1_, g2_, gb1_, gb2_;
  Buffer<S> dpre_;  // backward workspace
};

}  // namespace moe::expert
