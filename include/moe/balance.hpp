#pragma once
// Balancing statistics and losses of MATH.md 3: CV^2, Importance, Load.

#include <cstddef>
#include <vector>

#include "moe/view.hpp"

namespace moe {

// MATH.md 3: CV(v)^2 = Var(v) / (Mean(v)^2 + 1e-10), population variance; 0 for n <= 1.
template <class S>
S cv_squared(const S* v, Index n) {
  if (n <= 1) return S(0);
  S mean = 0;
  for (Index i = 0; i < n; ++i) mean += v[i];
  mean /= static_cast<S>(n);
  S var = 0;
  for (Index i = 0; i < n; ++i) var += (v[i] - mean) * (v[i] - mean);
  var /= static_cast<S>(n);
  return var / (mean * mean + S(1e-10));
}

template <class S>
S cv_squared(const std::vector<S>& v) {
  return cv_squared(v.data(), static_cast<Index>(v.size()));
}

// grad[i] += scale * d CV^2 / d v[i], through the mean and the variance (MATH.md 5).
template <class S>
void cv_squared_grad(const S* v, Index n, S scale, S* grad) {
  if (n <= 1) return;
  const S nn = static_cast<S>(n);
  S mean = 0;
  for (Index i = 0; i < n; ++i) mean += v[i];
  mean /= nn;
  S var = 0;
  for (Index i = 0; i < n; ++i) var += (v[i] - mean) * (v[i] - mean);
  var /= nn;
  const S den = mean * mean + S(1e-10);
  // dVar/dv_i = 2 (v_i - mean) / n; dMean/dv_i = 1 / n.
  for (Index i = 0; i < n; ++i)
    grad[i] += scale * (S(2) * (v[i] - mean) / nn / den - var * S(2) * mean / nn / (den * den));
}

// What a forward pass reports about balance; vectors have one entry per expert.
template <class S>
struct BalanceStats {
  std::vector<S> importance;             // MATH.md 3: sum over the batch of each expert's gate
  std::vector<S> load;                   // smooth estimator, or counts when load_is_count
  std::vector<Index> tokens_per_expert;  // hard counts of routed tokens
  bool load_is_count = true;
  S cv2_importance = 0;
  S cv2_load = 0;
  S loss_importance = 0;  // w_importance * cv2_importance
  S loss_load = 0;        // w_load * cv2_load
  S loss = 0;             // loss_importance + loss_load: add it to the training objective
};

// Loss weights of MATH.md 3 (defaults from the reference implementation).
struct BalanceWeights {
  double w_importance = 1e-2;
  double w_load = 1e-2;
};

}  // namespace moe
