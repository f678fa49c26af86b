#pragma once
// The activations of the feed-forward experts (moe/expert/feed_forward.hpp: FeedForwardWith<A>,
// moe/expert/swiglu.hpp: GluWith<A>). An activation is a struct with
//   static constexpr const char* name;        // unique: it names the expert in a checkpoint
//   template <class S> MOE_HD static S f(S x);   // the value at the pre-activation x
//   template <class S> MOE_HD static S df(S x);  // its derivative at x
// for S = float and double, callable on the host and on a CUDA device (MOE_HD, and only what
// device code may call: std::exp, std::erf, std::tanh, ...). The moe::Activation concept checks
// the signatures. Formulas: docs/experts.md, "Activations".

#include <array>
#include <concepts>
#include <cstddef>
#include <type_traits>

#include "moe/scalar_math.hpp"
#include "moe/view.hpp"

namespace moe::detail {

constexpr std::size_t c_string_length(const char* s) {
  std::size_t n = 0;
  while (s[n] != '\0') ++n;
  return n;
}

}  // namespace moe::detail

namespace moe {

// A type usable as the activation of FeedForwardWith and GluWith. The name must be a constant
// (it is part of the expert's name, built at compile time).
template <class A>
concept Activation = requires(float xf, double xd) {
  { A::name } -> std::convertible_to<const char*>;
  typename std::integral_constant<std::size_t, detail::c_string_length(A::name)>;
  { A::f(xf) } -> std::same_as<float>;
  { A::df(xf) } -> std::same_as<float>;
  { A::f(xd) } -> std::same_as<double>;
  { A::df(xd) } -> std::same_as<double>;
};

}  // namespace moe

namespace moe::activation {

// relu(x) = max(x, 0); relu'(0) is taken as 0 (docs/math.md, "Choices made where the contract
// leaves room"). The paper's activation.
struct Relu {
  static constexpr const char* name = "relu";
  template <class S>
  MOE_HD static S f(S x) {
    return x > S(0) ? x : S(0);
  }
  template <class S>
  MOE_HD static S df(S x) {
    return x > S(0) ? S(1) : S(0);
  }
};

// gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), exact (PyTorch's nn.GELU() default),
// gelu'(x) = Phi(x) + x phi(x), phi the standard normal density.
struct Gelu {
  static constexpr const char* name = "gelu";
  template <class S>
  MOE_HD static S f(S x) {
    return x * S(0.5) * (S(1) + std::erf(x * S(0.70710678118654752440)));
  }
  template <class S>
  MOE_HD static S df(S x) {
    const S cdf = S(0.5) * (S(1) + std::erf(x * S(0.70710678118654752440)));
    const S pdf = S(0.39894228040143267794) * std::exp(S(-0.5) * x * x);  // 1 / sqrt(2 pi)
    return cdf + x * pdf;
  }
};

// GELU's tanh approximation (PyTorch's nn.GELU(approximate="tanh"), GPT-2's):
// 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2 / pi), c = 0.044715.
struct GeluTanh {
  static constexpr const char* name = "gelu_tanh";
  template <class S>
  MOE_HD static S f(S x) {
    const S t = std::tanh(S(0.79788456080286535588) * (x + S(0.044715) * x * x * x));
    return S(0.5) * x * (S(1) + t);
  }
  template <class S>
  MOE_HD static S df(S x) {
    const S t = std::tanh(S(0.79788456080286535588) * (x + S(0.044715) * x * x * x));
    const S inner = S(0.79788456080286535588) * (S(1) + S(3) * S(0.044715) * x * x);  // d/dx of tanh's argument
    return S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t * t) * inner;
  }
};

// silu(x) = x sigmoid(x) (also called swish), silu'(x) = s (1 + x (1 - s)), s = sigmoid(x).
// SwiGLU's activation.
struct Silu {
  static constexpr const char* name = "silu";
  template <class S>
  MOE_HD static S f(S x) {
    return x * detail::sigmoid(x);
  }
  template <class S>
  MOE_HD static S df(S x) {
    const S s = detail::sigmoid(x);
    return s * (S(1) + x * (S(1) - s));
  }
};

}  // namespace moe::activation

namespace moe::detail {

// g f'(x): a gradient g through the activation A at its pre-activation x. ReLU's is the select
// of docs/math.md section 5, 0 wherever x <= 0 whatever g is (g * 0 would make an infinite g a
// NaN); branch-free either way, so that the CPU vectorizes it.
template <class A, class S>
MOE_HD inline S activation_grad(S x, S g) {
  if constexpr (std::is_same_v<A, activation::Relu>)
    return x > S(0) ? g : S(0);
  else
    return g * A::df(x);
}

// "<family><<A::name>>" as a NUL-terminated constant, e.g. "FeedForward<gelu>": the name of an
// expert family over an activation other than its default one. (Empty when A is no activation,
// so that the family's static_assert is the one error.)
template <class A, std::size_t N>
constexpr auto family_with_activation(const char (&family)[N]) {
  if constexpr (!Activation<A>) {
    return std::array<char, 1>{};
  } else {
    std::array<char, N + c_string_length(A::name) + 2> out{};
    std::size_t at = 0;
    for (std::size_t i = 0; i + 1 < N; ++i) out[at++] = family[i];
    out[at++] = '<';
    for (std::size_t i = 0; A::name[i] != '\0'; ++i) out[at++] = A::name[i];
    out[at++] = '>';
    out[at] = '\0';
    return out;
  }
}

}  // namespace moe::detail
