#pragma once
// The GatePolicy concept: how tokens choose experts. A gate fills, for each token, k slots of
// (expert index, gate value), in the order the combine sums them, and the load vector when it
// has a smooth estimator of its own (MATH.md 3); the layer derives Importance, counts, CV^2
// and the losses from those, so a custom gate stays short.
//
// Every gate is built for `groups` >= 1 independent copies with stacked weights: the layer
// uses one group; a hierarchical MoE (MATH.md 4) runs the gates of a level's groups together,
// on the rows each group received, with the rows sorted by group and `offsets` giving each
// group's row range.

#include <concepts>
#include <cstdint>
#include <functional>
#include <vector>

#include "moe/backend.hpp"
#include "moe/balance.hpp"
#include "moe/error.hpp"
#include "moe/mode.hpp"
#include "moe/parameter.hpp"
#include "moe/random.hpp"

namespace moe {

// The noise z a gate draws for (row, column): explicit values [T x columns] or a counter stream.
// A gate of G groups over n experts reads, for a row of group g, the columns g * n + i.
template <class S>
struct GateNoise {
  const S* values = nullptr;  // explicit z, row-major with the given stride, or null
  Index stride = 0;
  CounterRandom stream{};
  std::uint64_t step = 0;
  const Index* row_token = nullptr;  // the token of each row (null: row r is token r)
  Index column = 0;                  // first column of this gate's block (a hierarchy's level)
  Index token_offset = 0;            // the global index of token 0 (a rank's offset in a sharded layer)

  MOE_HD S at(Index row, Index col) const {
    const Index token = row_token != nullptr ? row_token[row] : row;
    const Index c = column + col;
    if (values != nullptr) return values[token * stride + c];
    // Drawn noise is keyed by the token's global index: a sharded batch draws what one process
    // would on the concatenated batch.
    return static_cast<S>(stream.normal(static_cast<std::uint64_t>(token_offset + token), static_cast<std::uint32_t>(c),
                                        static_cast<std::uint32_t>(step)));
  }
};

// How a gate sums host statistics over the ranks of a sharded layer. A layer sharded across
// processes installs one in every gate policy that has set_reduction(GateReduction<S>): a gate
// whose state depends on batch statistics (a hierarchy's loads, a selection bias moved by the
// counts) then sees the sums over the global batch. Empty (false) in one process.
template <class S>
struct GateReduction {
  std::function<void(S*, Index)> sum;            // in place, over every rank
  std::function<void(Index*, Index)> sum_index;  // in place, over every rank
  explicit operator bool() const { return static_cast<bool>(sum); }
};

// A slot whose expert index is kNotRouted carries no token to any expert (a token over an
// expert's capacity, an expert-choice slot no expert took): gate 0, no compute, no output.
inline constexpr Index kNotRouted = -1;

// A loss term a gate computed on the backend, per row or per group, for the layer to sum on the
// host after the one read of its statistics (no host wait of its own):
//   loss_z (z) or loss_aux (!z) += weight * (sum over i, in order, of v_i, or v_i^2 if squared) / divisor.
template <class S>
struct DeferredLoss {
  ConstMatrixView<S> values;  // backend memory that stays valid until the layer's statistics are read
  bool squared = false;
  S weight = S(1);
  S divisor = S(1);
  bool z = true;

  // The term, from the values read to the host.
  [[nodiscard]] S resolve(const std::vector<S>& host) const {
    S sum = 0;  // in order
    for (const S v : host) sum += squared ? v * v : v;
    return weight * sum / divisor;
  }
};

// What a gate's forward produces.
template <class B>
struct GateRouting {
  using S = typename B::Scalar;
  typename B::template Buffer<Index> expert;  // [R x k] expert (within the row's group) of each slot, or kNotRouted
  typename B::template Buffer<S> gate;        // [R x k] gate value of each slot (0 when not routed)
  typename B::template Buffer<S> load;        // [groups x n] smooth load of each group's experts, when !load_is_count
  bool load_is_count = true;                  // the layer then uses the hard counts
  bool load_reduced = false;                  // load already summed over the ranks (through a GateReduction)
  S loss_aux = 0;                     // the gate's own weighted balancing loss (e.g. Switch's n sum f_i P_i), 0 if none
  S loss_z = 0;                       // the weighted router z-loss, 0 if off
  // Terms of loss_aux and loss_z still on the backend, added to them by the layer when it reads
  // its statistics (cleared by the layer, or a hierarchy, before each gate forward).
  std::vector<DeferredLoss<S>> deferred;
  std::vector<LevelStats<S>> levels;  // filled by a hierarchical gate only
};

// The two halves of resolving a gate's deferred loss terms: queue their values' reads into host
// (one vector per term), then, after reads.wait(), add each term into routing.loss_z or
// routing.loss_aux in order and clear them.
template <Backend B>
void queue_deferred_losses(HostReads<B>& reads, const GateRouting<B>& routing,
                           std::vector<std::vector<typename B::Scalar>>& host) {
  host.resize(routing.deferred.size());
  for (std::size_t i = 0; i < host.size(); ++i) reads.add(routing.deferred[i].values, host[i]);
}
template <Backend B>
void add_deferred_losses(GateRouting<B>& routing, const std::vector<std::vector<typename B::Scalar>>& host) {
  for (std::size_t i = 0; i < host.size(); ++i) {
    const DeferredLoss<typename B::Scalar>& term = routing.deferred[i];
    (term.z ? routing.loss_z : routing.loss_aux) += term.resolve(host[i]);
  }
  routing.deferred.clear();
}

// Adds a gate's deferred loss terms into routing.loss_aux and routing.loss_z, behind one
// synchronization, and clears them: for code that runs a gate policy on its own (the layer folds
// them into its statistics' read instead). Call it while the gate's Saved is alive.
template <Backend B>
void resolve_deferred_losses(typename B::Context& ctx, GateRouting<B>& routing) {
  std::vector<std::vector<typename B::Scalar>> host;
  HostReads<B> reads(ctx);
  queue_deferred_losses(reads, routing, host);
  reads.wait();
  add_deferred_losses(routing, host);
}

// A gate policy G for backend B, built as G(config, d_model, n_experts, seed, groups), provides:
//   G::Saved                     what its backward needs from its forward
//   k(), n_experts()             slots per row and experts per group
//   needs_noise(mode)            whether forward reads the GateNoise
//   balance_weights()            w_importance and w_load (MATH.md 3)
//   forward(ctx, x, offsets, mode, noise, routing, saved)
//     x: [R x d]; offsets: [groups + 1] row range of each group (null when groups == 1)
//   backward(ctx, x, offsets, saved, dgate [R x k], dload [groups * n] or null, aux_scale, dx [R x d])
//     adds aux_scale times the gradient of loss_aux + loss_z, adds its parameters' gradients into
//     their grad storage and the input gradient into dx
//   parameters()                 its named parameters (stacked over groups: [groups, d, n])
// clang-format off
template <class G, class B>
concept GatePolicy =
    Backend<B> && requires { typename G::Saved; } && std::default_initializable<typename G::Saved> &&
    requires(G& g, const G& cg, typename B::Context& ctx, ConstMatrixView<typename B::Scalar> x,
             const Index* offsets, Mode mode, const GateNoise<typename B::Scalar>& noise, GateRouting<B>& routing,
             typename G::Saved& saved, const typename G::Saved& csaved, ConstMatrixView<typename B::Scalar> dgate,
             const typename B::Scalar* dload, typename B::Scalar aux_scale, MatrixView<typename B::Scalar> dx) {
      { cg.k() } -> std::convertible_to<Index>;
      { cg.n_experts() } -> std::convertible_to<Index>;
      { cg.needs_noise(mode) } -> std::convertible_to<bool>;
      { cg.balance_weights() } -> std::convertible_to<BalanceWeights>;
      g.forward(ctx, x, offsets, mode, noise, routing, saved);
      g.backward(ctx, x, offsets, csaved, dgate, dload, aux_scale, dx);
      { g.parameters() } -> std::same_as<std::vector<Parameter<typename B::Scalar>>>;
    };
// clang-format on

// A gate family: a tag with a Config and a Policy<B> built from
// (config, d_model, n_experts, seed, groups).
// clang-format off
template <class Gate, class B>
concept GateFamily = requires { typename Gate::Config; typename Gate::template Policy<B>; } &&
                     std::constructible_from<typename Gate::template Policy<B>, const typename Gate::Config&,
                                             Index, Index, std::uint64_t, Index> &&
                     GatePolicy<typename Gate::template Policy<B>, B>;
// clang-format on

namespace detail {
// What is wrong with slot j of a routing row (expert: the row's k indices, gate: its gate values
// or null): 0 nothing (an expert in [0, n) named once, its gate value finite, or kNotRouted), 1
// an index out of range, 2 an expert an earlier slot names, 3 a non-finite gate value. The one
// rule of both the routing plan's count (RoutingPlan::invalid) and check_routing's message.
template <class S>
MOE_HD inline int slot_fault(const Index* expert, Index j, Index n, const S* gate) {
  const Index v = expert[j];
  if (v == kNotRouted) return 0;
  if (v < 0 || v >= n) return 1;
  for (Index i = 0; i < j; ++i)
    if (expert[i] == v) return 2;
  return gate != nullptr && !is_finite(gate[j]) ? 3 : 0;
}

// At the call boundary: every slot of a gate's routing [R x k] is an expert in [0, n) or
// kNotRouted, no row names an expert twice (its gradient would be wrong: MATH.md 5 differentiates
// each expert's gate once), and, when `gate` [R x k] is given, every routed slot's gate value is
// finite. The check runs on the backend (one flag per row in `scratch`); only the flags come to
// the host. Throws a moe::Error naming the first bad row, slot and value.
template <Backend B>
void check_routing(typename B::Context& ctx, const typename B::template Buffer<Index>& expert, Index n,
                   const char* who, typename B::template Buffer<Index>& scratch,
                   const typename B::template Buffer<typename B::Scalar>* gate = nullptr) {
  using S = typename B::Scalar;
  const Index rows = expert.rows(), k = expert.cols();
  if (rows == 0 || k == 0) return;
  scratch.resize(rows, 1);
  const Index* e = expert.data();
  const S* g = gate != nullptr ? gate->data() : nullptr;
  Index* bad = scratch.data();
  // bad[r] = 3 j + slot_fault - 1 for the first bad slot j of row r, -1 when the row is valid.
  B::for_each(ctx, rows, [=] MOE_HD(Index r) {
    Index first = -1;
    for (Index j = 0; j < k && first < 0; ++j) {
      const int fault = slot_fault(e + r * k, j, n, g != nullptr ? g + r * k : nullptr);
      if (fault != 0) first = 3 * j + fault - 1;
    }
    bad[r] = first;
  });
  const std::vector<Index> flags = to_host<B>(ctx, ConstMatrixView<Index>(scratch.view()));
  for (Index r = 0; r < rows; ++r) {
    const Index code = flags[static_cast<std::size_t>(r)];
    if (code < 0) continue;
    const Index j = code / 3;
    const Index v = to_host<B>(ctx, ConstMatrixView<Index>{e + r * k + j, 1, 1})[0];
    if (code % 3 == 0)
      detail::fail(who, ": the gate routed row ", r, ", slot ", j, " to expert ", v, ", expected an expert in [0, ",
                   n, ") or kNotRouted (-1)");
    if (code % 3 == 1)
      detail::fail(who, ": the gate routed row ", r, " to expert ", v, " twice (slot ", j,
                   " repeats an earlier slot), expected each expert at most once per row");
    const S value = to_host<B>(ctx, ConstMatrixView<S>{g + r * k + j, 1, 1})[0];
    detail::fail(who, ": the gate gave row ", r, ", slot ", j, " (expert ", v, ") the gate value ", value,
                 ", expected a finite number");
  }
}
}  // namespace detail

// The explicit noise columns a gate reads per token: noise_columns() if it has one, else
// n_experts() (one z per expert).
template <class G>
Index noise_columns(const G& gate) {
  if constexpr (requires { gate.noise_columns(); })
    return gate.noise_columns();
  else
    return gate.n_experts();
}

}  // namespace moe
