#pragma once
// moe::expert::FeedForwardWith<A>: the paper's expert (MATH.md 1) with the activation A
// (moe/activation.hpp), E(x) = A(x W1 + b1) W2 + b2, W1: d x h, W2: h x d, biases optional and
// off by default. expert::FeedForward is the paper's, with ReLU. Parameters are stacked over the
// experts ("experts.w1" is [n, d, h]) and each weight is applied by one grouped GEMM.

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/activation.hpp"
#include "moe/error.hpp"
#include "moe/expert/narrow.hpp"
#include "moe/expert_group.hpp"
#include "moe/precision.hpp"

namespace moe::expert {

// The Config of every FeedForwardWith<A>.
struct FeedForwardConfig {
  Index hidden = 0;   // h, the hidden width of each expert
  bool bias = false;  // the reference implementation has none
  Precision precision = Precision::fp32;  // of the GEMMs; bf16 / tf32: operands rounded, fp32 accumulation (float only)
};

template <class Act>
struct FeedForwardWith {
  static_assert(Activation<Act>,
                "moe::expert::FeedForwardWith<Act>: Act is not an activation; it needs `static constexpr const char* "
                "name` and static MOE_HD member templates `S f(S x)` and `S df(S x)` for float and double "
                "(moe/activation.hpp, docs/experts.md \"Activations\")");
  using Config = FeedForwardConfig;
  using ActivationType = Act;

 private:
  static constexpr auto named_ = detail::family_with_activation<Act>("FeedForward");

 public:
  // The name in a checkpoint's metadata ("moe.expert"): "FeedForward" with ReLU (the paper's
  // expert), else from the activation's name, "FeedForward<gelu>" with Gelu.
  static constexpr const char* io_name = std::is_same_v<Act, activation::Relu> ? "FeedForward" : named_.data();

  template <Backend B>
  class Group;
};

// The paper's expert, relu(x W1 + b1) W2 + b2.
using FeedForward = FeedForwardWith<activation::Relu>;

template <class Act>
template <Backend B>
class FeedForwardWith<Act>::Group {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> pre;  // [rows x h] x W1 + b1, before the activation
    Buffer<S> act;  // [rows x h] Act::f(pre)
    // Precision::bf16 (float): the operands kept narrow instead of act.
    Buffer<BFloat16> xs16;   // [rows x d] the gathered rows
    Buffer<BFloat16> act16;  // [rows x h] Act::f(pre)
    bool xs16_gathered = false;  // xs16 written by gather_rows, for the next forward
  };

  // shard: which experts of a sharded layer this group holds (default: all of them).
  Group(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, ExpertShard shard = {})
      : config_(config), d_(d_model), n_(n_experts) {
    const std::string who = std::string("expert::") + FeedForwardWith::io_name;
    detail::require(config.precision == Precision::fp32 || std::is_same_v<S, float>, who, ": precision = ",
                    to_string(config.precision), " needs a float backend, this one computes in ", sizeof(S) * 8,
                    "-bit floating point");
    detail::require(config.hidden >= 1, who, ": hidden = ", config.hidden,
                    ", expected at least 1 (set Config::hidden)");
    detail::require(n_experts >= 1, who, ": n_experts = ", n_experts, ", expected at least 1");
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
    const Index first = detail::shard_first(shard, n_, who.c_str());
    detail::init_uniform<B>(ctx, w1_.view(), seed, "experts.w1", 1.0 / std::sqrt(static_cast<double>(d_)), first * d_ * h);
    detail::init_uniform<B>(ctx, w2_.view(), seed, "experts.w2", 1.0 / std::sqrt(static_cast<double>(h)), first * h * d_);
  }

  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] const Config& config() const { return config_; }

  // The layer's dispatch gather (the optional member of moe/expert_group.hpp): with
  // Precision::bf16 the rows go straight into BFloat16 for the GEMMs and xs is left unwritten
  // (forward and backward read saved.xs16); otherwise into xs.
  void gather_rows(typename B::Context& ctx, ConstMatrixView<S> x, const Index* rows, MatrixView<S> xs,
                   Saved& saved) const {
    saved.xs16_gathered = detail::gather_operand_rows<B>(ctx, detail::narrow_operands<S>(config_.precision), x, rows,
                                                         xs, saved.xs16);
  }

  // With Precision::bf16 the GEMMs' operands are kept as BFloat16 (moe/expert/narrow.hpp): the
  // gathered rows narrowed once, Act::f(pre) written narrow, the weights' copies made again only
  // after the parameters changed. The results are those of fp32 operands rounded by the GEMMs.
  void forward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, MatrixView<S> ys,
               Saved& saved) const {
    if constexpr (std::is_same_v<S, float>) {
      if (detail::narrow_operands<S>(config_.precision)) {
        forward_as<BFloat16>(ctx, detail::narrow_input<B>(ctx, xs, saved.xs16, saved.xs16_gathered), offsets, ys,
                             saved, saved.act16);
        return;
      }
    }
    forward_as<S>(ctx, xs, offsets, ys, saved, saved.act);
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dys, MatrixView<S> dxs) {
    if constexpr (std::is_same_v<S, float>) {
      if (detail::narrow_operands<S>(config_.precision)) {
        backward_as<BFloat16>(ctx, saved.xs16.view(), offsets, saved, saved.act16.view(),
                              detail::narrow<B>(ctx, dys, dys16_), dys, dxs, dpre16_);
        return;
      }
    }
    backward_as<S>(ctx, xs, offsets, saved, saved.act.view(), dys, dys, dxs, dpre_);
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    const Index h = config_.hidden;
    std::vector<Parameter<S>> p{{"experts.w1", {n_, d_, h}, w1_.view(), g1_.view()},
                                {"experts.w2", {n_, h, d_}, w2_.view(), g2_.view()}};
    if (config_.bias) {
      p.push_back({"experts.b1", {n_, h}, b1_.view(), gb1_.view()});
      p.push_back({"experts.b2", {n_, d_}, b2_.view(), gb2_.view()});
    }
    return version_.hand_out(std::move(p));
  }

  // The GEMMs' operands stored as T: S, or BFloat16 (Precision::bf16).
  template <class T>
  void forward_as(typename B::Context& ctx, ConstMatrixView<T> xs, const Index* offsets, MatrixView<S> ys,
                  Saved& saved, Buffer<T>& act_out) const {
    const Index rows = xs.rows, h = config_.hidden;
    saved.pre.resize(rows, h);
    act_out.resize(rows, h);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, weight<T>(ctx, w1_, w1n_), saved.pre.view(), config_.precision);
    S* pre = saved.pre.data();
    T* act = act_out.data();
    const S* b1 = config_.bias ? b1_.data() : nullptr;
    const Index* off = offsets;
    const Index n = n_;
    if (b1 != nullptr)
      for_each_element<B>(ctx, rows, h, [=] MOE_HD(Index r, Index c) {
        const Index i = r * h + c;
        pre[i] += b1[segment_of_row(off, n, r) * h + c];
        act[i] = detail::stored<T>(Act::f(pre[i]));
      });
    else
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) { act[i] = detail::stored<T>(Act::f(pre[i])); });
    B::grouped_gemm(ctx, offsets, n_, Op::none, ConstMatrixView<T>(act_out.view()), weight<T>(ctx, w2_, w2n_), ys,
                    config_.precision);
    if (config_.bias) add_expert_bias<B>(ctx, offsets, n_, b2_.data(), ys);
  }

  // dys_t: dys stored as T; dys itself feeds the bias gradient. dpre_t: dpre = (dys W2^T) *
  // Act::df(pre) as T (dpre_ itself when T is S).
  template <class T>
  void backward_as(typename B::Context& ctx, ConstMatrixView<T> xs, const Index* offsets, const Saved& saved,
                   ConstMatrixView<T> act, ConstMatrixView<T> dys_t, ConstMatrixView<S> dys, MatrixView<S> dxs,
                   Buffer<T>& dpre_t) {
    const Index rows = xs.rows, h = config_.hidden;
    dpre_.resize(rows, h);
    dpre_t.resize(rows, h);
    B::grouped_gemm_wgrad(ctx, offsets, n_, act, dys_t, S(1), g2_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dys_t, weight<T>(ctx, w2_, w2n_), dpre_.view(), config_.precision);
    S* dpre = dpre_.data();
    T* dpre_out = std::is_same_v<T, S> ? nullptr : dpre_t.data();  // S: dpre_ is dpre_t
    const S* pre = saved.pre.data();
    // Branch-free, so that the CPU vectorizes it: a store per element either way.
    if (dpre_out != nullptr)
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
        dpre[i] = detail::activation_grad<Act>(pre[i], dpre[i]);
        dpre_out[i] = detail::stored<T>(dpre[i]);
      });
    else
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) { dpre[i] = detail::activation_grad<Act>(pre[i], dpre[i]); });
    const ConstMatrixView<T> dp = dpre_t.view();
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dp, S(1), g1_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dp, weight<T>(ctx, w1_, w1n_), dxs, config_.precision);
    if (config_.bias) {
      sum_rows_per_expert<B>(ctx, offsets, n_, ConstMatrixView<S>(dpre_.view()), gb1_.data());
      sum_rows_per_expert<B>(ctx, offsets, n_, dys, gb2_.data());
    }
  }

  // A weight as the GEMMs read it: the fp32 storage, or its BFloat16 copy.
  template <class T>
  ConstMatrixView<T> weight(typename B::Context& ctx, const Buffer<S>& w, detail::NarrowWeights<B>& copy) const {
    if constexpr (std::is_same_v<T, S>)
      return w.view();
    else
      return copy.get(ctx, version_.value(), w.view());
  }

 private:
  Config config_;
  Index d_, n_;
  Buffer<S> w1_, w2_, b1_, b2_;
  Buffer<S> g1_, g2_, gb1_, gb2_;
  Buffer<S> dpre_;  // backward workspace
  Buffer<BFloat16> dys16_, dpre16_;
  ParameterVersion version_;
  mutable detail::NarrowWeights<B> w1n_, w2n_;  // Precision::bf16: the weights' BFloat16 copies
};

}  // namespace moe::expert
