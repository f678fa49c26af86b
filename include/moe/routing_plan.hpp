#pragma once
// RoutingPlan: the T*k (token, expert, gate) slots of a batch, stably sorted by expert.
// Slot s = t * k + j is token t's j-th choice. Sorting is stable, so within an expert the
// tokens keep their batch order, and the plan is a pure function of the gate's choices.
// Slots routed nowhere (kNotRouted) sort after every expert's rows: the first offsets[n]
// sorted rows are the ones the experts compute. An index that is neither an expert nor
// kNotRouted sorts last, in a bin of its own, and so does a slot that names the same expert as
// an earlier slot of its row, or (when the gate values are given) whose gate value is NaN or
// infinite: invalid() counts them, and the layer refuses the routing when it is not 0 (so the
// check costs no read of its own on a device backend).

#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/gate_policy.hpp"

namespace moe {

template <Backend B>
struct RoutingPlan {
  template <class T>
  using Buffer = typename B::template Buffer<T>;

  Index tokens = 0;
  Index k = 0;
  Index experts = 0;
  Buffer<Index> order;     // [T*k] sorted position p -> slot s
  Buffer<Index> position;  // [T*k] slot s -> sorted position p
  Buffer<Index> token_of;  // [T*k] sorted position p -> token
  Buffer<Index> counts;    // [n + 2] tokens routed to each expert; [n]: slots routed nowhere; [n + 1]: invalid
  Buffer<Index> offsets;   // [n + 3] expert e owns sorted rows [offsets[e], offsets[e+1])

  // expert: [T x k] expert index of each slot, in [0, n) or kNotRouted, no expert twice in a
  // row; gate: [T x k] the slots' gate values, finite where routed, or empty (not checked).
  // Anything else is counted by invalid().
  void build(typename B::Context& ctx, ConstMatrixView<Index> expert, Index n_experts,
             ConstMatrixView<typename B::Scalar> gate = {}) {
    tokens = expert.rows;
    k = expert.cols;
    experts = n_experts;
    const Index slots = tokens * k;
    order.resize(slots, 1);
    position.resize(slots, 1);
    token_of.resize(slots, 1);
    counts.resize(n_experts + 2, 1);
    offsets.resize(n_experts + 3, 1);
    key_.resize(slots, 1);
    {
      const Index* e = expert.data;
      const typename B::Scalar* g = gate.data;
      const Index stride = expert.stride, g_stride = gate.stride, kk = k, n = n_experts;
      Index* key = key_.data();
      B::for_each(ctx, slots, [=] MOE_HD(Index s) {
        const Index t = s / kk, j = s % kk;
        const Index v = e[t * stride + j];
        key[s] = detail::slot_fault(e + t * stride, j, n, g != nullptr ? g + t * g_stride : nullptr) != 0 ? n + 1
                 : v == kNotRouted                                                                      ? n
                                                                                                        : v;
      });
    }
    B::histogram(ctx, key_.data(), slots, n_experts + 2, counts.data());
    B::exclusive_scan(ctx, counts.data(), n_experts + 2, offsets.data());
    B::stable_sort_by_key(ctx, key_.data(), slots, n_experts + 2, order.data());
    const Index* ord = order.data();
    Index* pos = position.data();
    Index* tok = token_of.data();
    const Index kk = k;
    B::for_each(ctx, slots, [=] MOE_HD(Index p) {
      pos[ord[p]] = p;
      tok[p] = ord[p] / kk;
    });
    // The one read of the plan on the host: buffer sizes downstream depend on the row counts.
    host_offsets_ = to_host<B>(ctx, ConstMatrixView<Index>(offsets.view()));
  }

  // Rows the experts compute (slots routed to an expert).
  [[nodiscard]] Index routed() const { return host_offsets_[static_cast<std::size_t>(experts)]; }
  // Slots refused: an index neither an expert nor kNotRouted, an expert named twice in a row, a
  // non-finite gate value.
  [[nodiscard]] Index invalid() const {
    const auto n = static_cast<std::size_t>(experts);
    return host_offsets_[n + 2] - host_offsets_[n + 1];
  }
  // offsets, on the host: expert e owns sorted rows [host_offsets()[e], host_offsets()[e + 1]).
  [[nodiscard]] const std::vector<Index>& host_offsets() const { return host_offsets_; }

 private:
  Buffer<Index> key_;
  std::vector<Index> host_offsets_;
};

}  // namespace moe
