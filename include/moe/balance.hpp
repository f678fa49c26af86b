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
MOE_HD void cv_squared_grad(const S* v, Index n, S scale, S* grad) {
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

// One level of a hierarchical gate (MATH.md 4): its nodes are the groups (or, at the last level,
// the leaf experts) that level routes to, numbered in the flattened order of the hierarchy.
template <class S>
struct LevelStats {
  Index nodes = 0;
  std::vector<S> importance;  // sum over the batch of the product of the gates down to each node
  std::vector<S> load;        // Load_H of MATH.md 4 up to this level (hard counts where no level is smooth)
  std::vector<Index> count;   // tokens reaching each node
  S cv2_importance = 0;
  S cv2_load = 0;
};

// What a forward pass reports about balance; vectors have one entry per expert.
template <class S>
struct BalanceStats {
  std::vector<S> importance;             // MATH.md 3: sum over the batch of each expert's gate
  std::vector<S> load;                   // smooth estimator, or counts when load_is_count
  std::vector<Index> tokens_per_expert;  // hard counts of routed tokens
  bool load_is_count = true;
  S cv2_importance = 0;
  S cv2_load = 0;
  Index dropped_tokens = 0;           // tokens no expert computed (over capacity, or chosen by no expert)
  S loss_importance = 0;              // w_importance * cv2_importance
  S loss_load = 0;                    // w_load * cv2_load
  S loss_aux = 0;                     // the gate's own balancing loss (e.g. Switch), weighted
  S loss_z = 0;                       // the router z-loss, weighted
  S loss = 0;                         // the sum of the four: add it to the training objective
  std::vector<LevelStats<S>> levels;  // per level of a hierarchical gate; empty at depth 1
};

// Loss weights of MATH.md 3 (defaults from the reference implementation).
struct BalanceWeights {
  double w_importance = 1e-2;
  double w_load = 1e-2;
};

}  // namespace moe
