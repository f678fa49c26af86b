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

// p = softmax of each row of v (p may be v).
template <Backend B>
void softmax_rows(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> v, MatrixView<typename B::Scalar> p) {
  B::for_each(ctx, v.rows, [=] MOE_HD(Index r) { softmax_row(v.data + r * v.stride, v.cols, p.data + r * p.stride); });
}

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

// A router weight W [d x n] for each of `groups` gates, stacked along the rows ([groups * d x n]),
// with its gradient, and optionally a bias b [n] per group ([groups x n], zero at the start).
// logits = x W_g (+ b_g) for the rows of group g.
template <Backend B>
class RouterWeight {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  RouterWeight() = default;
  // init_bound > 0: uniform in (-bound, bound] from (seed, name); 0: zeros. A non-empty bias_name
  // adds the bias, a parameter of that name.
  RouterWeight(std::string name, Index d, Index n, Index groups, std::uint64_t seed, double init_bound,
               std::string bias_name = {})
      : name_(std::move(name)), bias_name_(std::move(bias_name)), d_(d), n_(n), groups_(groups) {
    detail::require(groups >= 1, name_, ": groups = ", groups, ", expected at least 1");
    w_.resize(groups * d, n, S(0));
    g_.resize(groups * d, n, S(0));
    if (has_bias()) {
      b_.resize(groups, n, S(0));
      gb_.resize(groups, n, S(0));
    }
    if (init_bound > 0 && d > 0) {
      typename B::Context ctx;
      detail::init_uniform<B>(ctx, w_.view(), seed, name_, init_bound);
    }
  }

  [[nodiscard]] Index groups() const { return groups_; }
  [[nodiscard]] bool has_bias() const { return !bias_name_.empty(); }
  [[nodiscard]] MatrixView<S> value() { return w_.view(); }
  [[nodiscard]] ConstMatrixView<S> value() const { return w_.view(); }

  // out [R x n] = x W_g (+ b_g) per row of group g.
  void logits(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> out) const {
    if (groups_ == 1)
      B::gemm(ctx, Op::none, Op::none, S(1), x, w_.view(), S(0), out);
    else
      B::grouped_gemm(ctx, offsets, groups_, Op::none, x, w_.view(), out);
    if (!has_bias()) return;
    const S* b = b_.data();
    const Index groups = groups_, n = n_;
    for_each_element<B>(ctx, out.rows, n, [=] MOE_HD(Index r, Index c) {
      out(r, c) += b[(offsets == nullptr ? 0 : segment_of_row(offsets, groups, r)) * n + c];
    });
  }

  // logits [R x n] as logits() computes them, and p [R x n] the softmax of each row.
  void softmax_scores(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, MatrixView<S> out,
                      MatrixView<S> p) const {
    logits(ctx, x, offsets, out);
    softmax_rows<B>(ctx, ConstMatrixView<S>(out), p);
  }

  // Given dlogits [R x n]: adds x_g^T dlogits_g into the gradient (and the column sums of
  // dlogits_g into the bias's) and dlogits W_g^T into dx.
  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* offsets, ConstMatrixView<S> dlogits,
                MatrixView<S> dx) {
    if (has_bias()) bias_backward(ctx, offsets, dlogits);
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
  // The bias: [n] for one group, [groups, n] stacked (only with has_bias()).
  [[nodiscard]] Parameter<S> bias_parameter() {
    detail::require(has_bias(), name_, ": the router has no bias");
    std::vector<Index> shape{n_};
    if (groups_ > 1) shape.insert(shape.begin(), groups_);
    return {bias_name_, shape, b_.view(), gb_.view()};
  }
  // The weight's parameter, then the bias's if there is one.
  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    std::vector<Parameter<S>> out{parameter()};
    if (has_bias()) out.push_back(bias_parameter());
    return out;
  }

  // The bias's part of backward: its gradient += per group, the column sums of dlogits. A step of
  // backward, public only because a CUDA device lambda cannot live in a private member function.
  void bias_backward(typename B::Context& ctx, const Index* offsets, ConstMatrixView<S> dlogits) {
    db_.resize(groups_, n_);
    sum_rows_by_group<B>(ctx, dlogits, offsets, groups_, db_.data(), &db_partial_);
    const S* src = db_.data();
    S* dst = gb_.data();
    const Index n = n_;
    for_each_element<B>(ctx, groups_, n, [=] MOE_HD(Index g, Index c) { dst[g * n + c] += src[g * n + c]; });
  }

 private:
  std::string name_, bias_name_;
  Index d_ = 0, n_ = 0, groups_ = 1;
  Buffer<S> w_, g_, b_, gb_;
  Buffer<S> dx_, db_, db_partial_;  // backward workspaces
};

// count [groups x n] = per group, how many of its rows' slots top [R x k] chose each expert (the
// backend's histogram of the keys group * n + expert; key [R * k] is scratch).
template <Backend B>
void count_slots(typename B::Context& ctx, const Index* top, Index rows, Index k, const Index* offsets, Index groups,
                 Index n, Index* key, Index* count) {
  B::for_each(ctx, rows * k, [=] MOE_HD(Index s) { key[s] = group_of_row(offsets, groups, s / k) * n + top[s]; });
  B::histogram(ctx, key, rows * k, groups * n, count);
}

// The balancing loss of Switch Transformers (Fedus et al. 2021, eq. 4), with f counted over every
// slot for k > 1 as Mixtral, Qwen-MoE and OLMoE train: per group of R_g rows,
//   n * sum_i f_i P_i,   f_i = count_i / R_g (count over the k slots: the f_i sum to k),
//                        P_i = mean over the group's rows of p_i (p: the softmax over all n),
// weighted by R_g / R, times w_aux, added to routing.loss_aux as a deferred term. col [groups x n]
// gets p's column sums per group, aux [groups x 1] each group's term; partial is scratch.
template <Backend B>
void switch_loss(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> p, const Index* offsets, Index groups,
                 const Index* count, double w_aux, typename B::template Buffer<typename B::Scalar>& col,
                 typename B::template Buffer<typename B::Scalar>& partial,
                 typename B::template Buffer<typename B::Scalar>& aux, GateRouting<B>& routing) {
  using S = typename B::Scalar;
  const Index rows = p.rows, n = p.cols;
  col.resize(groups, n);
  aux.resize(groups, 1);
  sum_rows_by_group<B>(ctx, p, offsets, groups, col.data(), &partial);
  const S* c = col.data();
  S* a = aux.data();
  // n sum_i f_i P_i * R_g / R = n sum_i count_i (sum_r p_ri) / (R_g R)
  B::for_each(ctx, groups, [=] MOE_HD(Index g) {
    const Index r_g = offsets != nullptr ? offsets[g + 1] - offsets[g] : rows;
    S total = 0;
    for (Index i = 0; i < n; ++i) total += static_cast<S>(count[g * n + i]) * c[g * n + i];
    a[g] = r_g > 0 ? static_cast<S>(n) * total / (static_cast<S>(r_g) * static_cast<S>(rows)) : S(0);
  });
  routing.deferred.push_back(
      {.values = ConstMatrixView<S>(aux.view()), .squared = false, .weight = static_cast<S>(w_aux), .z = false});
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
