#pragma once
// Building blocks shared by the gates: a router weight stacked over groups (one GEMM, or one
// grouped GEMM, for the logits of every row), the group of a row, per-group row sums, and the
// router z-loss. A custom gate may use them too.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/gate_policy.hpp"
#include "moe/parameter.hpp"

namespace moe::gate {

// The group owning row r, given the groups' row offsets (0 when offsets is null).
MOE_HD inline Index group_of_row(const Index* offsets, Index groups, Index r) {
  return offsets == nullptr ? 0 : segment_of_row(offsets, groups, r);
}

// log(sum_i exp(v_i)) over one row, stable.
template <class S>
MOE_HD S log_sum_exp(const S* v, Index n) {
  S top = v[0];
  for (Index i = 1; i < n; ++i) top = v[i] > top ? v[i] : top;
  S sum = 0;
  for (Index i = 0; i < n; ++i) sum += std::exp(v[i] - top);
  return top + std::log(sum);
}

// p = softmax(v) over one row, the largest value subtracted first; returns the index of the
// largest value (ties to the lower index). p may be v (in place).
template <class S>
MOE_HD Index softmax_row(const S* v, Index n, S* p) {
  Index best = 0;
  for (Index i = 1; i < n; ++i) best = v[i] > v[best] ? i : best;
  const S top = v[best];
  S sum = 0;
  for (Index i = 0; i < n; ++i) {
    p[i] = std::exp(v[i] - top);
    sum += p[i];
  }
  for (Index i = 0; i < n; ++i) p[i] /= sum;
  return best;
}

// Softmax backward over one row, in place: d holds dL/dp for p = softmax(logits) and becomes
// dL/dlogits, d_i = p_i (d_i - sum_l p_l d_l).
template <class S>
MOE_HD void softmax_row_backward(const S* p, Index n, S* d) {
  S dot = 0;
  for (Index i = 0; i < n; ++i) dot += p[i] * d[i];
  for (Index i = 0; i < n; ++i) d[i] = p[i] * (d[i] - dot);
}

// A router weight W [d x n] for each of `groups` gates, stacked along the rows ([groups * d x n]),
// with its gradient. logits = x W_g for the rows of group g.
template <Backend B>
class RouterWeight {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  RouterWeight() = default;
  // init_bound > 0: uniform in (-bound, bound] from (seed, name); 0: zeros.
  RouterWeight(std::string name, Index d, Index n, Index groups, std::uint64_t seed, double init_bound)
      : name_(std::move(name)), d_(d), n_(n), groups_(groups) {
    detail::require(groups >= 1, name_, ": groups = ", groups, ", expected at least 1");
    w_.resize(groups * d, n, S(0));
    g_.resize(groups * d, n, S(0));
    if (init_bound > 0 && d > 0) {
      typename B::Context ctx;
      detail::init_uniform<B>(ctx, w_.view(), seed, name_, init_bound);
    }
  }

  [[nodiscard]] Index groups() const { return groups_; }
  [[nodiscard]] MatrixView<S> value() { return w_.view(); }
  [[nodiscard]] ConstMatrixView<S> value() const { return w_.view(); }

  // out [R x n] = x W_g per row of group g.
  void logits(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> out) const {
    if (groups_ == 1)
      B::gemm(ctx, Op::none, Op::none, S(1), x, w_.view(), S(0), out);
    else
      B::grouped_gemm(ctx, offsets, groups_, Op::none, x, w_.view(), out);
  }

  // Given dlogits [R x n]: adds x_g^T dlogits_g into the gradient and dlogits W_g^T into dx.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, ConstMatrixView<S> dlogits,
                MatrixView<S> dx) {
    if (groups_ == 1) {
      B::gemm(ctx, Op::transpose, Op::none, S(1), x, dlogits, S(1), g_.view());
      B::gemm(ctx, Op::none, Op::transpose, S(1), dlogits, w_.view(), S(1), dx);
      return;
    }
    B::grouped_gemm_wgrad(ctx, offsets, groups_, x, dlogits, S(1), g_.view());
    dx_.resize(x.rows, x.cols);
    B::grouped_gemm(ctx, offsets, groups_, Op::transpose, dlogits, w_.view(), dx_.view());
    const S* src = dx_.data();
    const Index cols = x.cols;
    for_each_element<B>(ctx, x.rows, cols, [=] MOE_HD(Index r, Index c) { dx(r, c) += src[r * cols + c]; });
  }

  // The named parameter: [d, n] for one group, [groups, d, n] stacked.
  [[nodiscard]] Parameter<S> parameter() {
    std::vector<Index> shape{d_, n_};
    if (groups_ > 1) shape.insert(shape.begin(), groups_);
    return {name_, shape, w_.view(), g_.view()};
  }

 private:
  std::string name_;
  Index d_ = 0, n_ = 0, groups_ = 1;
  Buffer<S> w_, g_;
  Buffer<S> dx_;  // backward workspace (grouped)
};

// out [groups * m.cols] = per group, the sum of its rows of m (offsets null: one group of all
// rows). With a scratch buffer, by segment_sums (a long group is summed in chunks, in parallel);
// without, one item per (group, column) walking the group's rows in order.
template <Backend B>
void sum_rows_by_group(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> m, const Index* offsets,
                       Index groups, typename B::Scalar* out,
                       typename B::template Buffer<typename B::Scalar>* scratch = nullptr) {
  using S = typename B::Scalar;
  if (scratch != nullptr) {
    segment_sums<B>(
        ctx, offsets, offsets != nullptr ? groups : 1, m.rows, m.cols, [=] MOE_HD(Index r, Index c) { return m(r, c); },
        out, *scratch);
    return;
  }
  if (offsets == nullptr) {
    B::sum_rows(ctx, m, out);
    return;
  }
  const Index cols = m.cols;
  B::for_each(ctx, groups * cols, [=] MOE_HD(Index i) {
    const Index g = i / cols, c = i % cols;
    S acc = S(0);
    for (Index r = offsets[g]; r < offsets[g + 1]; ++r) acc += m(r, c);
    out[i] = acc;
  });
}

// Router z-loss (Zoph et al. 2022, ST-MoE): w_z * mean over rows of log(sum_i exp(logit_i))^2.
// Keeps each row's log-sum-exp in lse [R x 1] (on the backend, for backward too) and adds the
// loss to routing as a deferred term: the layer sums it, in row order, with its statistics' read.
template <Backend B>
void z_loss(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> logits, double w_z,
            MatrixView<typename B::Scalar> lse, GateRouting<B>& routing) {
  using S = typename B::Scalar;
  const Index rows = logits.rows, n = logits.cols;
  if (w_z == 0.0 || rows == 0) return;
  S* l = lse.data;
  B::for_each(ctx, rows, [=] MOE_HD(Index r) { l[r] = log_sum_exp(logits.data + r * logits.stride, n); });
  routing.deferred.push_back(
      {.values = ConstMatrixView<S>(lse), .squared = true, .weight = static_cast<S>(w_z), .divisor = static_cast<S>(rows), .z = true});
}

// dlogits [R x n] += scale * d(z-loss)/dlogits = scale * w_z * 2 lse softmax(logits) / R.
template <Backend B>
void z_loss_backward(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> logits,
                     ConstMatrixView<typename B::Scalar> lse, double w_z, typename B::Scalar scale,
                     MatrixView<typename B::Scalar> dlogits) {
  using S = typename B::Scalar;
  const Index rows = logits.rows, n = logits.cols;
  if (w_z == 0.0 || rows == 0 || scale == S(0)) return;
  const S c = scale * static_cast<S>(2.0 * w_z) / static_cast<S>(rows);
  const S* l = lse.data;
  B::for_each(ctx, rows * n, [=] MOE_HD(Index e) {
    const Index r = e / n, i = e % n;
    dlogits(r, i) += c * l[r] * std::exp(logits(r, i) - l[r]);
  });
}

// Shared validation of the loss weights of a gate's Config.
inline void require_weights(const char* gate, double w_importance, double w_load, double w_z) {
  detail::require(w_importance >= 0 && w_load >= 0 && w_z >= 0 && std::isfinite(w_importance) &&
                      std::isfinite(w_load) && std::isfinite(w_z),
                  gate, ": w_importance = ", w_importance, ", w_load = ", w_load, ", w_z = ", w_z,
                  ", expected all finite and >= 0");
}

}  // namespace moe::gate
