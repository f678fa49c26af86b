#pragma once
// moe::expert::GluWith<A>: the gated-linear-unit expert of Shazeer, "GLU Variants Improve
// Transformer" (2020), with the activation A (moe/activation.hpp):
//   E(x) = (A(x W1) * (x W3)) W2,   * elementwise,
// W1, W3: d x h, W2: h x d, no biases. expert::SwiGLU (A = silu, silu(a) = a * sigmoid(a)) is
// Mixtral's expert (Jiang et al., 2024), expert::GeGLU (A = gelu) Shazeer's GEGLU. Parameters are
// stacked over the experts under the Hugging Face Mixtral names, "experts.w1" [n, d, h],
// "experts.w3" [n, d, h], "experts.w2" [n, h, d]; Hugging Face stores each expert's matrices
// transposed (w1, w3 as [h, d], w2 as [d, h]), so a checkpoint's per-expert tensors are
// transposed on import. Each weight is applied by one grouped GEMM; the elementwise gate runs
// per element. With Precision::bf16 the GEMMs' operands are kept as BFloat16
// (moe/expert/narrow.hpp) and w1, w3 are copied side by side, [w1 | w3], so one grouped GEMM
// computes x W1 and x W3 (x read once), and one computes dx = [dh1 | dh3] [w1 | w3]^T.
//
// Config's options make SwiGLU GPT-OSS's expert (Hugging Face's GptOssExperts): with
// a = x W1 + b1, u = x W3 + b3, L = limit, a' = min(a, L), u' = clamp(u, -L, L) (no clamp when
// L = 0), and alpha the activation's input scale, act(a') = f(alpha a') / alpha (silu:
// a' * sigmoid(alpha a'), GPT-OSS's expression),
//   E(x) = (act(a') * (u' + up_offset)) W2 + b2,
// GPT-OSS: bias, alpha = 1.702, limit = 7, up_offset = 1. The defaults (no bias, alpha 1, no
// clamp, no offset) are Mixtral's expert, computed by its own expressions, bit for bit.
// The biases "experts.b1" [n, h], "experts.b3" [n, h], "experts.b2" [n, d] start at zero and
// are added in fp32 after the GEMMs with every precision.

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
#include "moe/scalar_math.hpp"

namespace moe::detail {

// The elementwise step of GluWith<Act> on a = x W1 (+ b1) and u = x W3 (+ b3). Without options,
// plain_value(a, u) = f(a) u. With them, value(a, u) = act(a') (u' + offset), a' = min(a,
// limit), u' = clamp(u, -limit, limit) when clamp is set, act(a') = f(alpha a') / alpha, whose
// derivative is f'(alpha a') (alpha = 1: f itself, exactly). The derivative through a clamp is 0
// where the input lies strictly beyond the bound, 1 elsewhere (at the bound too, as PyTorch's
// clamp). Silu keeps the expressions of Mixtral's and GPT-OSS's experts, act(a') = a'
// sigmoid(alpha a') without the division, so that SwiGLU's results are those expressions' bits.
template <class Act, class S>
struct GluStep {
  S alpha, limit, offset;
  bool clamp;

  struct Grad {
    S da, du;
  };

  static constexpr bool silu = std::is_same_v<Act, activation::Silu>;

  MOE_HD static S plain_value(S a, S u) { return Act::f(a) * u; }
  // g times the partial derivatives of plain_value at (a, u).
  MOE_HD static Grad plain_grad(S a, S u, S g) {
    if constexpr (silu) {
      const S s = sigmoid(a);
      return {g * u * s * (S(1) + a * (S(1) - s)), g * a * s};
    } else {
      return {activation_grad<Act>(a, g * u), g * Act::f(a)};
    }
  }

  MOE_HD S gate_in(S a) const { return clamp && a > limit ? limit : a; }
  MOE_HD S up_in(S u) const { return clamp ? (u > limit ? limit : (u < -limit ? -limit : u)) : u; }
  // act(g) = f(alpha g) / alpha.
  MOE_HD S act(S g) const {
    if constexpr (silu)
      return g * sigmoid(alpha * g);
    else
      return Act::f(alpha * g) / alpha;
  }
  MOE_HD S value(S a, S u) const { return act(gate_in(a)) * (up_in(u) + offset); }
  // dv times the partial derivatives of value at (a, u).
  MOE_HD Grad grad(S a, S u, S dv) const {
    const S g = gate_in(a);
    if constexpr (silu) {
      const S s = sigmoid(alpha * g);
      const S da = clamp && a > limit ? S(0) : dv * (up_in(u) + offset) * s * (S(1) + alpha * g * (S(1) - s));
      const S du = clamp && (u > limit || u < -limit) ? S(0) : dv * g * s;
      return {da, du};
    } else {
      const S da = clamp && a > limit ? S(0) : activation_grad<Act>(alpha * g, dv * (up_in(u) + offset));
      const S du = clamp && (u > limit || u < -limit) ? S(0) : dv * act(g);
      return {da, du};
    }
  }
};

// SwiGLU's step, Mixtral's and GPT-OSS's expressions.
template <class S>
using SwiGLUStep = GluStep<activation::Silu, S>;

}  // namespace moe::detail

namespace moe::expert {

// The Config of every GluWith<A>.
struct GluConfig {
  Index hidden = 0;        // h, the hidden width of each expert (Mixtral: 14336 for d = 4096)
  bool bias = false;       // b1, b3 [n, h] and b2 [n, d] (GPT-OSS); Mixtral has none
  double alpha = 1.0;      // the activation's input scale, act(a) = f(alpha a) / alpha; 1: f (GPT-OSS's silu: 1.702)
  double limit = 0.0;      // > 0: a clamped to at most limit, u to [-limit, limit] (GPT-OSS: 7); 0: none
  double up_offset = 0.0;  // the linear branch is u + up_offset, after the clamp (GPT-OSS: 1)
  Precision precision = Precision::fp32;  // of the GEMMs; bf16 / tf32: operands rounded, fp32 accumulation (float only)
};

template <class Act>
struct GluWith {
  static_assert(Activation<Act>,
                "moe::expert::GluWith<Act>: Act is not an activation; it needs `static constexpr const char* name` "
                "and static MOE_HD member templates `S f(S x)` and `S df(S x)` for float and double "
                "(moe/activation.hpp, docs/experts.md \"Activations\")");
  using Config = GluConfig;
  using ActivationType = Act;

 private:
  static constexpr auto named_ = detail::family_with_activation<Act>("GLU");

 public:
  // The name in a checkpoint's metadata ("moe.expert"): "SwiGLU" with silu, else from the
  // activation's name, "GLU<gelu>" with Gelu (GeGLU).
  static constexpr const char* io_name = std::is_same_v<Act, activation::Silu> ? "SwiGLU" : named_.data();

  template <Backend B>
  class Group;
};

// Mixtral's expert (and, with Config's options, GPT-OSS's): (silu(x W1) * (x W3)) W2.
using SwiGLU = GluWith<activation::Silu>;
// Shazeer's GEGLU: (gelu(x W1) * (x W3)) W2, with the exact gelu.
using GeGLU = GluWith<activation::Gelu>;

template <class Act>
template <Backend B>
class GluWith<Act>::Group {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  using Step = detail::GluStep<Act, S>;

  struct Saved {
    Buffer<S> h1;   // [rows x h] x W1 (+ b1), the gate's pre-activation, before the clamp
    Buffer<S> h3;   // [rows x h] x W3 (+ b3), the linear branch, before the clamp
    Buffer<S> act;  // [rows x h] f(h1) * h3 (with the options: as in the header), the input of W2
    // Precision::bf16 (float) instead: x [W1 | W3] (+ [b1 | b3]) as one matrix, and the narrow operands.
    Buffer<S> h13;           // [rows x 2h]
    Buffer<BFloat16> xs16;   // [rows x d] the gathered rows
    Buffer<BFloat16> act16;  // [rows x h]
    bool xs16_gathered = false;  // xs16 written by gather_rows, for the next forward
  };

  // shard: which experts of a sharded layer this group holds (default: all of them).
  Group(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, ExpertShard shard = {})
      : config_(config), d_(d_model), n_(n_experts) {
    const std::string who = std::string("expert::") + GluWith::io_name;
    detail::require(config.precision == Precision::fp32 || std::is_same_v<S, float>, who, ": precision = ",
                    to_string(config.precision), " needs a float backend, this one computes in ", sizeof(S) * 8,
                    "-bit floating point");
    detail::require(config.hidden >= 1, who, ": hidden = ", config.hidden,
                    ", expected at least 1 (set Config::hidden)");
    detail::require(d_model >= 1, who, ": d_model = ", d_model, ", expected at least 1");
    detail::require(n_experts >= 1, who, ": n_experts = ", n_experts, ", expected at least 1");
    if constexpr (Step::silu)
      detail::require(std::isfinite(config.alpha), who, ": alpha = ", config.alpha,
                      ", expected a finite number (1: silu, GPT-OSS: 1.702)");
    else  // act(a) = f(alpha a) / alpha
      detail::require(std::isfinite(config.alpha) && config.alpha != 0, who, ": alpha = ", config.alpha,
                      ", expected a finite number other than 0 (1: ", Act::name, " itself)");
    detail::require(std::isfinite(config.limit) && config.limit >= 0, who, ": limit = ", config.limit,
                    ", expected a finite number >= 0 (0: no clamp, GPT-OSS: 7)");
    detail::require(std::isfinite(config.up_offset), who, ": up_offset = ", config.up_offset,
                    ", expected a finite number (GPT-OSS: 1)");
    const Index h = config.hidden;
    w1_.resize(n_ * d_, h);
    w3_.resize(n_ * d_, h);
    w2_.resize(n_ * h, d_);
    g1_.resize(n_ * d_, h, S(0));
    g3_.resize(n_ * d_, h, S(0));
    g2_.resize(n_ * h, d_, S(0));
    if (config.bias) {
      b1_.resize(n_, h, S(0));
      b3_.resize(n_, h, S(0));
      b2_.resize(n_, d_, S(0));
      gb1_.resize(n_, h, S(0));
      gb3_.resize(n_, h, S(0));
      gb2_.resize(n_, d_, S(0));
    }
    // Uniform in (-1/sqrt(fan_in), 1/sqrt(fan_in)], a pure function of (seed, name, element).
    typename B::Context ctx;
    const double bound_in = 1.0 / std::sqrt(static_cast<double>(d_));
    const Index first = detail::shard_first(shard, n_, who.c_str());
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
    activate(ctx, offsets, rows, saved.h1.data(), saved.h3.data(), h, saved.act.data());
    B::grouped_gemm(ctx, offsets, n_, Op::none, ConstMatrixView<S>(saved.act.view()), w2_.view(), ys, config_.precision);
    if (config_.bias) add_expert_bias<B>(ctx, offsets, n_, b2_.data(), ys);
  }

  // With g = dys W2^T:
  //   d h3 = g * f(h1),   d h1 = g * h3 * f'(h1)   (silu: f'(a) = s (1 + a (1 - s)), s = sigmoid(a)),
  //   dW2 += act^T dys,  dW1 += xs^T d h1,  dW3 += xs^T d h3,  dxs = d h1 W1^T + d h3 W3^T.
  // With the options (a' = min(h1, L), u' = clamp(h3, -L, L), act(a') = f(alpha a') / alpha):
  //   d h3 = g * act(a'), 0 where |h3| > L;   d h1 = g * (u' + up_offset) * f'(alpha a'), 0 where
  //   h1 > L;   db1 += rows of d h1, db3 += rows of d h3, db2 += rows of dys, per expert.
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
      if (plain()) {
        B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
          const auto d_in = Step::plain_grad(h1[i], h3[i], dh1[i]);
          dh1[i] = d_in.da;
          dh3[i] = d_in.du;
        });
      } else {
        const Step step = glu_step();
        B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
          const auto d_in = step.grad(h1[i], h3[i], dh1[i]);
          dh1[i] = d_in.da;
          dh3[i] = d_in.du;
        });
      }
    }
    const ConstMatrixView<S> dh1 = dh1_.view(), dh3 = dh3_.view();
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh1, S(1), g1_.view(), config_.precision);
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh3, S(1), g3_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh1, w1_.view(), dxs, config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh3, w3_.view(), dx3_.view(), config_.precision);
    const S* dx3 = dx3_.data();
    for_each_element<B>(ctx, rows, d, [=] MOE_HD(Index r, Index c) { dxs(r, c) += dx3[r * d + c]; });
    if (config_.bias) bias_gradients(ctx, offsets, dh1, dh3, dys);
  }

  // In the order w1, w3, w2 (the order of the Hugging Face Mixtral expert), then, with bias,
  // b1, b3, b2.
  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    const Index h = config_.hidden;
    std::vector<Parameter<S>> p{{"experts.w1", {n_, d_, h}, w1_.view(), g1_.view()},
                                {"experts.w3", {n_, d_, h}, w3_.view(), g3_.view()},
                                {"experts.w2", {n_, h, d_}, w2_.view(), g2_.view()}};
    if (config_.bias) {
      p.push_back({"experts.b1", {n_, h}, b1_.view(), gb1_.view()});
      p.push_back({"experts.b3", {n_, h}, b3_.view(), gb3_.view()});
      p.push_back({"experts.b2", {n_, d_}, b2_.view(), gb2_.view()});
    }
    return version_.hand_out(std::move(p));
  }

  // act = the elementwise step on a = x W1 and u = x W3 (detail::GluStep), both [rows x h] at
  // the row stride ld (h1 and h3: h; the halves of h13: 2 h), written as T [rows x h]. With
  // bias, b1 and b3 are first added to a and u in place (saved so for backward).
  template <class T>
  void activate(typename B::Context& ctx, const Index* offsets, Index rows, S* a, S* u, Index ld, T* act) const {
    const Index h = config_.hidden;
    if (plain()) {
      // One store per element, no row lookup; contiguous rows (fp32) vectorize on the CPU.
      if (ld == h)
        B::for_each(ctx, rows * h, [=] MOE_HD(Index i) { act[i] = detail::stored<T>(Step::plain_value(a[i], u[i])); });
      else
        B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
          const Index at = i / h * ld + i % h;
          act[i] = detail::stored<T>(Step::plain_value(a[at], u[at]));
        });
      return;
    }
    const Step step = glu_step();
    const S* b1 = config_.bias ? b1_.data() : nullptr;
    const S* b3 = config_.bias ? b3_.data() : nullptr;
    const Index n = n_;
    for_each_element<B>(ctx, rows, h, [=] MOE_HD(Index r, Index c) {
      const Index at = r * ld + c;
      if (b1 != nullptr) {
        const Index b = segment_of_row(offsets, n, r) * h + c;
        a[at] += b1[b];
        u[at] += b3[b];
      }
      act[r * h + c] = detail::stored<T>(step.value(a[at], u[at]));
    });
  }

  // Precision::bf16 on float: the same math with BFloat16 operands, x [W1 | W3] as one GEMM.
  void forward_narrow(typename B::Context& ctx, ConstMatrixView<S> xs_wide, const Index* offsets, MatrixView<S> ys,
                      Saved& saved) const {
    const Index rows = xs_wide.rows, h = config_.hidden;
    const ConstMatrixView<BFloat16> xs = detail::narrow_input<B>(ctx, xs_wide, saved.xs16, saved.xs16_gathered);
    saved.h13.resize(rows, 2 * h);
    saved.act16.resize(rows, h);
    B::grouped_gemm(ctx, offsets, n_, Op::none, xs, w13(ctx), saved.h13.view(), config_.precision);
    activate(ctx, offsets, rows, saved.h13.data(), saved.h13.data() + h, 2 * h, saved.act16.data());
    B::grouped_gemm(ctx, offsets, n_, Op::none, ConstMatrixView<BFloat16>(saved.act16.view()),
                    w2n_.get(ctx, version_.value(), w2_.view()), ys, config_.precision);
    if (config_.bias) add_expert_bias<B>(ctx, offsets, n_, b2_.data(), ys);
  }

  // As backward, with dh1 and dh3 written side by side and narrow: dx = [dh1 | dh3] [W1 | W3]^T.
  // With bias, dh1 and dh3 are also kept in fp32 for the bias gradients.
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
    if (plain()) {
      const S* h13 = saved.h13.data();
      const S* g_of = dh1_.data();
      BFloat16* dh13 = dh13_.data();
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
        const Index at = i / h * 2 * h + i % h;
        const auto d_in = Step::plain_grad(h13[at], h13[at + h], g_of[i]);
        dh13[at] = to_bfloat16(d_in.da);
        dh13[at + h] = to_bfloat16(d_in.du);
      });
    } else {
      const S* h13 = saved.h13.data();
      S* g_of = dh1_.data();  // g in, d h1 out (with bias)
      S* dh3_wide = nullptr;
      if (config_.bias) {
        dh3_.resize(rows, h);
        dh3_wide = dh3_.data();
      }
      BFloat16* dh13 = dh13_.data();
      const Step step = glu_step();
      B::for_each(ctx, rows * h, [=] MOE_HD(Index i) {
        const Index at = i / h * 2 * h + i % h;
        const auto d_in = step.grad(h13[at], h13[at + h], g_of[i]);
        dh13[at] = to_bfloat16(d_in.da);
        dh13[at + h] = to_bfloat16(d_in.du);
        if (dh3_wide != nullptr) {
          g_of[i] = d_in.da;
          dh3_wide[i] = d_in.du;
        }
      });
    }
    const ConstMatrixView<BFloat16> dh13 = dh13_.view();
    const ConstMatrixView<BFloat16> dh1{dh13.data, rows, h, 2 * h}, dh3{dh13.data + h, rows, h, 2 * h};
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh1, S(1), g1_.view(), config_.precision);
    B::grouped_gemm_wgrad(ctx, offsets, n_, xs, dh3, S(1), g3_.view(), config_.precision);
    B::grouped_gemm(ctx, offsets, n_, Op::transpose, dh13, w13(ctx), dxs, config_.precision);
    if (config_.bias) bias_gradients(ctx, offsets, dh1_.view(), dh3_.view(), dys_wide);
  }

  // db1, db3 and db2 from the fp32 d h1, d h3 and dys.
  void bias_gradients(typename B::Context& ctx, const Index* offsets, ConstMatrixView<S> dh1, ConstMatrixView<S> dh3,
                      ConstMatrixView<S> dys) {
    sum_rows_per_expert<B>(ctx, offsets, n_, dh1, gb1_.data());
    sum_rows_per_expert<B>(ctx, offsets, n_, dh3, gb3_.data());
    sum_rows_per_expert<B>(ctx, offsets, n_, dys, gb2_.data());
  }

 private:
  Config config_;
  Index d_, n_;
  Buffer<S> w1_, w3_, w2_, b1_, b3_, b2_;  // the biases allocated only with Config::bias
  Buffer<S> g1_, g3_, g2_, gb1_, gb3_, gb2_;
  Buffer<S> dh1_, dh3_, dx3_;  // backward workspace, reused across calls
  Buffer<BFloat16> dys16_, dh13_;
  ParameterVersion version_;
  mutable detail::NarrowWeights<B> w13n_, w2n_;  // Precision::bf16: [w1 | w3] and w2 as BFloat16

  ConstMatrixView<BFloat16> w13(typename B::Context& ctx) const {
    return w13n_.get(ctx, version_.value(), w1_.view(), w3_.view());
  }

  // No bias, alpha 1, no clamp, no offset (with silu, Mixtral's expert): the expressions without options.
  [[nodiscard]] bool plain() const {
    return !config_.bias && config_.alpha == 1.0 && config_.limit == 0.0 && config_.up_offset == 0.0;
  }
  [[nodiscard]] Step glu_step() const {
    return {static_cast<S>(config_.alpha), static_cast<S>(config_.limit), static_cast<S>(config_.up_offset),
            config_.limit > 0.0};
  }
};

}  // namespace moe::expert
