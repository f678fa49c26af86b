#pragma once
// Expert sharding (MATH.md 6): which rank holds which experts, and the exchange that takes each
// routed row to the rank that holds its expert and brings the expert's output back. Pure
// arithmetic over counts, plus the communicator's all-to-all: written once for every backend.
//
// Rank r holds the contiguous block of experts [bounds[r], bounds[r + 1]). Rows travel in the
// routing plan's order (expert-contiguous, so also owner-contiguous); the owner sees the rows it
// receives in (expert, source rank, slot) order, a fixed order whatever the timing.

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/communicator.hpp"
#include "moe/error.hpp"

namespace moe {

// The experts of each rank: blocks of whole units (a unit is one expert at depth 1, one
// first-level group of leaf experts in a hierarchy), as even as the units allow: the first
// units % ranks ranks hold one unit more.
struct ExpertPlacement {
  std::vector<Index> bounds;  // [ranks + 1]: rank r holds experts [bounds[r], bounds[r + 1])

  static ExpertPlacement even(Index n_experts, int ranks, Index unit) {
    detail::require(ranks >= 1, "moe::ExpertPlacement: ", ranks, " ranks, expected at least 1");
    detail::require(unit >= 1 && n_experts % unit == 0, "moe::ExpertPlacement: n_experts = ", n_experts,
                    " is not a whole number of units of ", unit, " experts");
    const Index units = n_experts / unit;
    detail::require(units >= ranks, "moe::Layer: n_experts = ", n_experts,
                    unit > 1 ? " (" + std::to_string(units) + " first-level groups of " + std::to_string(unit) + ")" : "",
                    " cannot be sharded over ", ranks, " ranks: expected at least one ",
                    unit > 1 ? "group" : "expert", " per rank");
    ExpertPlacement p;
    p.bounds.assign(static_cast<std::size_t>(ranks) + 1, 0);
    const Index base = units / ranks, extra = units % ranks;
    for (int r = 0; r < ranks; ++r)
      p.bounds[static_cast<std::size_t>(r) + 1] = p.bounds[static_cast<std::size_t>(r)] + unit * (base + (r < extra ? 1 : 0));
    return p;
  }

  [[nodiscard]] int ranks() const { return static_cast<int>(bounds.size()) - 1; }
  [[nodiscard]] Index first(int r) const { return bounds[static_cast<std::size_t>(r)]; }
  [[nodiscard]] Index count(int r) const { return bounds[static_cast<std::size_t>(r) + 1] - first(r); }
};

// One forward's exchange: built from every rank's rows per expert, it moves rows between the
// routing plan's order on the sending rank and the expert order on the owning rank (both ways,
// so backward reuses it for the gradients).
template <Backend B>
class ExpertExchange {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

 public:
  // counts: [ranks x n] host, counts[s * n + e] = rows rank s routes to expert e.
  void plan(typename B::Context& ctx, const std::vector<Index>& counts, const ExpertPlacement& placement, int me) {
    const int p = placement.ranks();
    const Index n = placement.bounds.back(), first = placement.first(me), local = placement.count(me);
    const auto at = [&](int s, Index e) { return counts[static_cast<std::size_t>(s) * static_cast<std::size_t>(n) + static_cast<std::size_t>(e)]; };
    send_rows_.assign(static_cast<std::size_t>(p), 0);
    recv_rows_.assign(static_cast<std::size_t>(p), 0);
    for (int q = 0; q < p; ++q)
      for (Index e = placement.first(q); e < placement.first(q) + placement.count(q); ++e) send_rows_[static_cast<std::size_t>(q)] += at(me, e);
    for (int s = 0; s < p; ++s)
      for (Index e = first; e < first + local; ++e) recv_rows_[static_cast<std::size_t>(s)] += at(s, e);
    received_ = 0;
    for (const Index r : recv_rows_) received_ += r;
    // Received rows arrive source-major: (source, expert, slot). The experts read them
    // expert-major: (expert, source, slot). expert_to_source[i] = the received row of expert-major row i.
    // next[s]: the received row where source s's rows for the current expert begin.
    std::vector<Index> next(static_cast<std::size_t>(p), 0), expert_to_source(static_cast<std::size_t>(received_));
    for (int s = 1; s < p; ++s) next[static_cast<std::size_t>(s)] = next[static_cast<std::size_t>(s) - 1] + recv_rows_[static_cast<std::size_t>(s) - 1];
    std::vector<Index> offsets(static_cast<std::size_t>(local) + 1, 0);
    Index i = 0;
    for (Index e = first; e < first + local; ++e) {
      for (int s = 0; s < p; ++s) {
        Index& src = next[static_cast<std::size_t>(s)];
        for (Index j = 0; j < at(s, e); ++j) expert_to_source[static_cast<std::size_t>(i++)] = src++;
      }
      offsets[static_cast<std::size_t>(e - first) + 1] = i;
    }
    std::vector<Index> source_to_expert(expert_to_source.size());
    for (std::size_t r = 0; r < expert_to_source.size(); ++r)
      source_to_expert[static_cast<std::size_t>(expert_to_source[r])] = static_cast<Index>(r);
    from_host<B>(ctx, expert_to_source, expert_to_source_);
    from_host<B>(ctx, source_to_expert, source_to_expert_);
    from_host<B>(ctx, offsets, local_offsets_);
  }

  [[nodiscard]] Index received() const { return received_; }  // rows this rank's experts compute
  [[nodiscard]] const Index* local_offsets() const { return local_offsets_.data(); }  // backend, [local + 1]

  // rows: [sent x d] in this rank's plan order -> out: [received x d] in the experts' order.
  template <Communicator C>
  void to_experts(typename B::Context& ctx, C& comm, ConstMatrixView<S> rows, MatrixView<S> out) const {
    wire_.resize(received_, rows.cols);
    exchange(ctx, comm, rows, send_rows_, wire_.view(), recv_rows_);
    B::gather_rows(ctx, wire_.view(), expert_to_source_.data(), out);
  }

  // rows: [received x d] in the experts' order -> out: [sent x d] in this rank's plan order.
  template <Communicator C>
  void from_experts(typename B::Context& ctx, C& comm, ConstMatrixView<S> rows, MatrixView<S> out) const {
    wire_.resize(received_, rows.cols);
    B::gather_rows(ctx, rows, source_to_expert_.data(), wire_.view());
    exchange(ctx, comm, wire_.view(), recv_rows_, out, send_rows_);
  }

 private:
  template <Communicator C>
  void exchange(typename B::Context& ctx, C& comm, ConstMatrixView<S> send, const std::vector<Index>& send_rows,
                MatrixView<S> recv, const std::vector<Index>& recv_rows) const {
    const Index row_bytes = send.cols * static_cast<Index>(sizeof(S));
    send_bytes_.resize(send_rows.size());
    recv_bytes_.resize(recv_rows.size());
    for (std::size_t r = 0; r < send_rows.size(); ++r) {
      send_bytes_[r] = send_rows[r] * row_bytes;
      recv_bytes_[r] = recv_rows[r] * row_bytes;
    }
    B::synchronize(ctx);  // the rows are complete before the communicator reads them
    comm.all_to_all_v(reinterpret_cast<const std::byte*>(send.data), send_bytes_.data(),
                      reinterpret_cast<std::byte*>(recv.data), recv_bytes_.data());
  }

  std::vector<Index> send_rows_, recv_rows_;
  Index received_ = 0;
  Buffer<Index> expert_to_source_, source_to_expert_, local_offsets_;
  // Scratch of each exchange (backward reuses the forward's plan through a const Forward).
  mutable std::vector<Index> send_bytes_, recv_bytes_;
  mutable Buffer<S> wire_;  // rows in the order they travel on the receiving side
};

}  // namespace moe
