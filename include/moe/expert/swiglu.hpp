#pragma once
// moe::expert::SwiGLU: the gated-linear-unit expert of Shazeer, "GLU Variants Improve
// Transformer" (2020), as used by Mixtral (Jiang et al., 2024):
//   E(x) = (silu(x W1) * (x W3)) W2,   silu(a) = a * sigmoid(a),   * elementwise,
// W1, W3: d x h, W2: h x d, no biases. Parameters are stacked over the experts under the Hugging
// Face Mixtral names, "experts.w1" [n, d, h], "experts.w3" [n, d, h], "experts.w2" [n, h, d];
// Hugging Face stores each expert's matrices transposed (w1, w3 as [h, d], w2 as [d, h]), so a
// checkpoint's per-expert tensors are transposed on import. Each weight is applied by one grouped
// GEMM; the elementwise gate runs per element. With Precision::bf16 the GEMMs' operands are kept
// as BFloat16 (moe/expert/narrow.hpp) and w1, w3 are copied side by side, [w1 | w3], so one
// grouped GEMM computes x W1 and x W3 (x read once), and one computes dx = [dh1 | dh3] [w1 | w3]^T.

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moe/error.hpp"
#include "moe/expert/narrow.hpp"
#include "moe/expert_group.hpp"
#include "moe/precision.hpp"
#include "moe/scalar_math.hpp"

namespace moe::expert {

struct SwiGLU {
  struct Config {
    Index hidden = 0;  // h, the hidden width of each expert (Mixtral: 14336 for d = 4096)
    Precision precision = Precision::fp32;  // of the GEMMs; bf16 / tf32: operands rounded, fp32 accumulation (float only)
  };
  template <Backend B>
  class Group;
};

template <Backend B>
class SwiGLU::Group {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  struct Saved {
    Buffer<S> h1;   // [rows x h] x W1, the gate's pre-activation
    Buffer<S> h3;   // [rows x h] x W3, the linear branch
    Buffer<S> act;  // [rows x h] silu(h1) * h3, the input of W2
    // Precision::bf16 (float) instead: x [W1 | W3] as one matrix, and the narrow operands.
    Buffer<S> h13;           // [rows x 2h]
    Buffer<BFloat16> xs16;   // [rows x d] the gathered rows
    Buffer<BFloat16> act16;  // [rows x h]
    bool xs16_gathered = false;  // xs16 written by gather_rows, for the next forward
  };

  // shard: which experts of a sharded layer this group holds (default: all of them).
  Group(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, ExpertShard shard = {})
      : config_(config), d_(d_model), n_(n_experts) {
    detail::require(config.precision == Precision::fp32 || std::is_same_v<S, float>, "expert::SwiGLU: precision = ",
                    to_string(config.precision), " needs a float backend, this one computes in ", sizeof(S) * 8,
                    "-bit floating point");
    detail::require(config.hidden >= 1, "expert::SwiGLU: hidden = ", config.hidden,
                    ", expected at least 1 (set Config::hidden)");
    detail::require(d_model >= 1, "expert::SwiGLU: d_model = ", d_model, ", expected at least 1");
    detail::require(n_experts >= 1, "expert::SwiGLU: n_experts = ", n_experts, ", expected at least 1");
    const Index h = config.hidden;
    w1_.resize(n_ * d_, h);
    w3_.resize(n_ * d_, h);
    w2_.resize(n_ * h, d_);
    g1_.resize(n_ * d_, h, S(0));
    g3_.resize(n_ * d_, h, S(0));
    g2_.resize(n_ * h, d_, S(0));
    // Uniform in (-1/sqrt(fan_in), 1/sqrt(fan_in)], a pure function of (seed, name, element).
    typename B::Context ctx;
    const double bound_in = 1.0 / std::sqrt(static_cast<double>(d_));
    const Index first = detail::shard_first(shard, n_, "expert::SwiGLU");
    detail::init_uniform<B>(ctx, w1_.view(), seed, "experts.w1", bound_in, first * d_ * h);
    detail::init_uniform<B>(ctx, w3_.view(), seed, "experts.w3", bound_in, first * d_ * h);
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

  void forward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, MatrixView<S> ys,
               Saved& saved) const {
    if constexpr (std::is_same_v<S, float>) {
      if (detail::narrow_operands<S>(config_.precision)) {
        forward_narrow(ctx, xs, offsets, ys, saved);
        return;
      }
    }
    const Index rows = xs.rows, h = config_.hidden;
    saved.h1.resize(rows, h);
    saved.h3.resize(rows, h);
    saved.act.resize(rows, h);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, w1_.view(), saved.h1.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, w3_.view(), saved.h3.view(), config_.precision);
    const S* h1 = saved.h1.data();
    const S* h3 = saved.h3.data();
    S* act = saved.act.data();
    B::for_each(ctx, rows * h, [=] MOE_HD(Index i) { act[i] = h1[i] * detail::sigmoid(h1[i]) * h3[i]; });
    B::grouped_gemm(ctx, offsets, n_, Op::none, ConstMatrixView<S>(saved.act.view()), w2_.view(), ys, config_.precision);
  }

  // With g = dys W2^T and s = sigmoid(h1):
  //   d h3 = g * silu(h1),   d h1 = g * h3 * s * (1 + h1 (1 - s)),
  //   dW2 += act^T dys,  dW1 += xs^T d h1,  dW3 += xs^T d h3,  dxs = d h1 W1^T + d h3 W3^T.
  void backward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, const Saved& saved,
                ConstMatrixView<S> dys, MatrixView<S> dxs) {
    if constexpr (std::is_same_v<S, float>) {
      if (detail::narrow_operands<S>(config_.precision)) {
        backward_narrow(ctx, offsets, saved, dys, dxs);
        return;
      }
    }
    const Index rows = xs.rows, h = config_.hidden, d = d_;
    dh1_.resize(rows, h);
    dh3_.resize(rows, h);
    dx3_.resize(rows, d);
    B::grouped_gemm_wgrad(ctx, offsets, n_, ConstMatrixView<S>(saved.act.view()), dys, S(1), g2_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dys, w2_.view(), dh1_.view(), config_.precision);  // g, overwritten below
    {
      const S* h1 = saved.h1.data();
      const S* h3 = saved.h3.data();
      S* dh1 = dh1_.data();
      S* dh3 = dh3_.data();
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
        const S a = h1[i], g = dh1[i];
        const S s = detail::sigmoid(a);
        dh3[i] = g * a * s;
        dh1[i] = g * h3[i] * s * (S(1) + a * (S(1) - s));
      });
    }
    const ConstMatrixView<S> dh1 = dh1_.view(), dh3 = dh3_.view();
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh1, S(1), g1_.view(), config_.precision);
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh3, S(1), g3_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh1, w1_.view(), dxs, config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh3, w3_.view(), dx3_.view(), config_.precision);
    const S* dx3 = dx3_.data();
    for_each_element<B>(ctx, rows, d, [=] MOE_HD(Index r, Index c) { dxs(r, c) += dx3[r * d + c]; });
  }

  // In the order w1, w3, w2 (the order of the Hugging Face Mixtral expert).
  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    const Index h = config_.hidden;
    return version_.hand_out<S>({{"experts.w1", {n_, d_, h}, w1_.view(), g1_.view()},
                                 {"experts.w3", {n_, d_, h}, w3_.view(), g3_.view()},
                                 {"experts.w2", {n_, h, d_}, w2_.view(), g2_.view()}});
  }

  // Precision::bf16 on float: the same math with BFloat16 operands, x [W1 | W3] as one GEMM.
  void forward_narrow(typename B::Context& ctx, ConstMatrixView<S> xs_wide, const Index* offsets, MatrixView<S> ys,
                      Saved& saved) const {
    const Index rows = xs_wide.rows, h = config_.hidden;
    const ConstMatrixView<BFloat16> xs = detail::narrow_input<B>(ctx, xs_wide, saved.xs16, saved.xs16_gathered);
    saved.h13.resize(rows, 2 * h);
    saved.act16.resize(rows, h);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, w13(ctx), saved.h13.view(), config_.precision);
    const S* h13 = saved.h13.data();
    BFloat16* act = saved.act16.data();
    B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
      const S h1 = h13[i / h * 2 * h + i % h], h3 = h13[i / h * 2 * h + h + i % h];
      act[i] = to_bfloat16(h1 * detail::sigmoid(h1) * h3);
    });
    B::grouped_gemm(ctx, offsets, n_, Op::none, ConstMatrixView<BFloat16>(saved.act16.view()),
                    w2n_.get(ctx, version_.value(), w2_.view()), ys, config_.precision);
  }

  // As backward, with dh1 and dh3 written side by side and narrow: dx = [dh1 | dh3] [W1 | W3]^T.
  void backward_narrow(typename B::Context& ctx, const Index* offsets, const Saved& saved, ConstMatrixView<S> dys_wide,
                       MatrixView<S> dxs) {
    const Index rows = dys_wide.rows, h = config_.hidden;
    const ConstMatrixView<BFloat16> dys = detail::narrow<B>(ctx, dys_wide, dys16_), xs = saved.xs16.view();
    dh1_.resize(rows, h);
    dh13_.resize(rows, 2 * h);
    B::grouped_gemm_wgrad(ctx, offsets, n_, ConstMatrixView<BFloat16>(saved.act16.view()), dys, S(1), g2_.view(),
                          config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dys, w2n_.get(ctx, version_.value(), w2_.view()), dh1_.view(),
                    config_.precision);  // g
    {
      const S* h13 = saved.h13.data();
      const S* g_of = dh1_.data();
      BFloat16* dh13 = dh13_.data();
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
        const Index at = i / h * 2 * h + i % h;
        const S a = h13[at], b = h13[at + h], g = g_of[i];
        const S s = detail::sigmoid(a);
        dh13[at] = to_bfloat16(g * b * s * (S(1) + a * (S(1) - s)));
        dh13[at + h] = to_bfloat16(g * a * s);
      });
    }
    const ConstMatrixView<BFloat16> dh13 = dh13_.view();
    const ConstMatrixView<BFloat16> dh1{dh13.data, rows, h, 2 * h}, dh3{dh13.data + h, rows, h, 2 * h};
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh1, S(1), g1_.view(), config_.precision);
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh3, S(1), g3_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh13, w13(ctx), dxs, config_.precision);
  }

 private:
  Config config_;
  Index d_, n_;
  Buffer<S> w1_, w3_, w2_;
  Buffer<S> g1_, g3_, g2_;
  Buffer<S> dh1_, dh3_, dx3_;  // backward workspace, reused across calls
  Buffer<BFloat16> dys16_, dh13_;
  ParameterVersion version_;
  mutable detail::NarrowWeights<B> w13n_, w2n_;  // Precision::bf16: [w1 | w3] and w2 as BFloat16

  ConstMatrixView<BFloat16> w13(typename B::Context& ctx) const {
    return w13n_.get(ctx, version_.value(), w1_.view(), w3_.view());
  }
};

}  // namespace moe::expert
