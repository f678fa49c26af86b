#pragma once
// The ExpertGroup concept: n experts of one type with stacked parameters, evaluated together
// on an expert-contiguous buffer. Rows [offsets[e], offsets[e+1]) of the buffer are the tokens
// routed to expert e, and no expert sees any other row (MATH.md 1).

#include <concepts>
#include <cstdint>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/parameter.hpp"

namespace moe {

// An expert group E for backend B provides:
//   E::Saved                     what its backward needs from its forward
//   n_experts()
//   forward(ctx, xs, offsets, ys, saved)           xs, ys: [rows x d], offsets: n + 1 entries
//   backward(ctx, xs, offsets, saved, dys, dxs)    adds parameter gradients into their storage
//   parameters()                 its named parameters, stacked over experts
// and may provide
//   gather_rows(ctx, x, rows, xs, saved)   the layer's dispatch, xs[j] = x[rows[j]]: a group
//                                that keeps its operands in another form gathers into that
//                                form; the layer then passes the same xs to forward and
//                                backward, holding whatever the group wrote there
// clang-format off
template <class E, class B>
concept ExpertGroup =
    Backend<B> && requires { typename E::Saved; } && std::default_initializable<typename E::Saved> &&
    requires(E& e, const E& ce, typename B::Context& ctx, ConstMatrixView<typename B::Scalar> xs,
             MatrixView<typename B::Scalar> ys, const Index* offsets, typename E::Saved& saved,
             const typename E::Saved& csaved) {
      { ce.n_experts() } -> std::convertible_to<Index>;
      ce.forward(ctx, xs, offsets, ys, saved);
      e.backward(ctx, xs, offsets, csaved, xs, ys);
      { e.parameters() } -> std::same_as<std::vector<Parameter<typename B::Scalar>>>;
    };
// clang-format on

// An expert group that gathers its own input rows (the optional member above).
template <class E, class B>
concept GathersOwnRows =
    requires(const E& e, typename B::Context& ctx, ConstMatrixView<typename B::Scalar> x, const Index* rows,
             MatrixView<typename B::Scalar> xs, typename E::Saved& saved) { e.gather_rows(ctx, x, rows, xs, saved); };

// Which of a layer's experts a group holds when the experts are sharded across processes:
// experts [first, first + n_experts) of `total`. A group built with a shard initializes exactly
// the values the whole group of `total` experts holds for those experts.
struct ExpertShard {
  Index first = 0;
  Index total = 0;  // 0: not sharded (the group holds every expert)
};

// An expert family: a tag with a Config and a Group<B> built from (config, d_model, n_experts, seed).
// clang-format off
template <class Expert, class B>
concept ExpertFamily = requires { typename Expert::Config; typename Expert::template Group<B>; } &&
                       std::constructible_from<typename Expert::template Group<B>, const typename Expert::Config&,
                                               Index, Index, std::uint64_t> &&
                       ExpertGroup<typename Expert::template Group<B>, B>;
// clang-format on

// An expert family whose groups can hold a shard of the experts: Group<B> is also built from
// (config, d_model, n_local, seed, ExpertShard). Needed by a layer sharded across processes.
template <class Expert, class B>
concept ShardableExpertFamily =
    ExpertFamily<Expert, B> && std::constructible_from<typename Expert::template Group<B>, const typename Expert::Config&,
                                                       Index, Index, std::uint64_t, ExpertShard>;

namespace detail {
// The shard's first expert, checked against the group's size.
inline Index shard_first(const ExpertShard& shard, Index n_local, const char* who) {
  if (shard.total == 0) return 0;
  detail::require(shard.first >= 0 && shard.first + n_local <= shard.total, who, ": a shard of ", n_local,
                  " experts from expert ", shard.first, ", expected it within the layer's ", shard.total, " experts");
  return shard.first;
}
}  // namespace detail

// Per-expert biases of a group of n experts over expert-contiguous rows (offsets [n + 1]):
// ys[r, :] += bias[expert of row r, :] (bias [n x ys.cols]).
template <Backend B>
void add_expert_bias(typename B::Context& ctx, const Index* offsets, Index n, const typename B::Scalar* bias,
                     MatrixView<typename B::Scalar> ys) {
  const Index cols = ys.cols;
  for_each_element<B>(ctx, ys.rows, cols,
                      [=] MOE_HD(Index r, Index c) { ys(r, c) += bias[segment_of_row(offsets, n, r) * cols + c]; });
}

// grad[e, :] += the sum of the rows of m owned by expert e, in row order (the bias gradient).
template <Backend B>
void sum_rows_per_expert(typename B::Context& ctx, const Index* offsets, Index n,
                         ConstMatrixView<typename B::Scalar> m, typename B::Scalar* grad) {
  using S = typename B::Scalar;
  const Index cols = m.cols;
  B::for_each(ctx, n * cols, [=] MOE_HD(Index i) {
    const Index e = i / cols, c = i % cols;
    S acc = grad[i];
    for (Index r = offsets[e]; r < offsets[e + 1]; ++r) acc += m(r, c);
    grad[i] = acc;
  });
}

}  // namespace moe
