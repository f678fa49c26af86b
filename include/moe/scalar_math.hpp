#pragma once
// Scalar functions shared by every backend (host and device), so all evaluate one expression.

#include <cmath>

#include "moe/view.hpp"

namespace moe::detail {

template <class S>
MOE_HD inline S softplus(S x) {
  // log(1 + e^x) without overflow for large x and without loss for very negative x.
  return x > S(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <class S>
MOE_HD inline S sigmoid(S x) {
  if (x >= S(0)) return S(1) / (S(1) + std::exp(-x));
  const S e = std::exp(x);
  return e / (S(1) + e);
}

// MATH.md 3: Phi(z / sigma) as 0.5 * (1 + erf(z / (sqrt(2) * sigma + 1e-20))); zero sigma gives no NaN.
template <class S>
MOE_HD inline S normal_cdf_scaled(S z, S sigma) {
  const S s = S(1.4142135623730950488) * sigma + S(1e-20);
  return S(0.5) * (S(1) + std::erf(z / s));
}

// Partial derivatives of normal_cdf_scaled with respect to z and to sigma.
template <class S>
struct CdfGrad {
  S dz;
  S dsigma;
};

template <class S>
MOE_HD inline CdfGrad<S> normal_cdf_scaled_grad(S z, S sigma) {
  constexpr S kSqrt2 = S(1.4142135623730950488);
  constexpr S kInvSqrtPi = S(0.56418958354775628695);
  const S s = kSqrt2 * sigma + S(1e-20);
  const S u = z / s;
  const S density = kInvSqrtPi * std::exp(-u * u);  // d/du of 0.5 * erf(u)
  return {density / s, -density * u / s * kSqrt2};
}

}  // namespace moe::detail
