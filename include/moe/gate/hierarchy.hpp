#pragma once
// moe::gate::Hierarchy<Gate, Depth>: the hierarchical MoE of MATH.md 4 as one gate. Level 1 is
// a Gate over the a groups; level 2 is a Gate for each group (weights stacked, one grouped GEMM
// over the rows each group received, never a pass over all groups), and so on. The levels'
// gates multiply into one flat routing over the leaf experts (expert index = the path's
// flattened node number), so the layer's dispatch, experts and combine are those of depth 1.
//
//   y_H(x) = sum_i sum_j G_1(x)_i G_2,i(x)_j E_{i,j}(x)
//   Load_H,L[node] = Load_H,L-1[parent] * Load_L,parent(X^(parent))[node] / (|X^(parent)| + 1e-10)
//
// with Load_H,1 the first level's load; Importance_H comes out of the flat gates. There is no
// separate per-level balancing term: the hierarchy's own w_importance / w_load weigh CV^2 of the
// leaves' Importance_H and Load_H; the levels' own losses (a Switch loss, a z-loss) still count.

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moe/balance.hpp"
#include "moe/error.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate_policy.hpp"
#include "moe/routing_plan.hpp"

namespace moe::gate {

template <class Gate, int Depth>
struct Hierarchy {
  static_assert(Depth >= 1, "gate::Hierarchy: Depth must be at least 1");

 private:
  // A default Gate::Config's balancing weights, or 1e-2 (MATH.md 3) for a gate without them.
  static double default_w_importance() {
    if constexpr (requires(typename Gate::Config c) { double(c.w_importance); })
      return typename Gate::Config{}.w_importance;
    else
      return 1e-2;
  }
  static double default_w_load() {
    if constexpr (requires(typename Gate::Config c) { double(c.w_load); })
      return typename Gate::Config{}.w_load;
    else
      return 1e-2;
  }

 public:
  struct Level {
    Index branching = 0;           // groups (level 1) or experts per group (the last level) this level chooses among
    typename Gate::Config gate{};  // its gate: k, noise, its own losses (w_importance / w_load are not used)
  };
  // The balancing weights default to those of Gate's own Config (NoisyTopK: 1e-2 each; Switch,
  // ExpertChoice, SigmoidBias: 0), so a hierarchy adds no loss its gate would not.
  struct Config {
    std::array<Level, Depth> levels{};
    double w_importance = default_w_importance();  // of CV^2(Importance_H) over the leaves
    double w_load = default_w_load();              // of CV^2(Load_H) over the leaves
  };
  template <Backend B>
  class Policy;
};

template <class Gate, int Depth>
template <Backend B>
class Hierarchy<Gate, Depth>::Policy {
  using S = typename B::Scalar;
  template <class T>
  using Buffer = typename B::template Buffer<T>;
  using LevelPolicy = typename Gate::template Policy<B>;

 public:
  struct LevelSaved {
    typename LevelPolicy::Saved gate;  // the level gate's own saved state
    GateRouting<B> routing;            // [R x k_L] choices of the level's rows (within their group)
    RoutingPlan<B> plan;               // levels >= 2: the previous level's paths sorted by node
    Buffer<S> x;                       // levels >= 2: the rows each group received [R x d]
    Buffer<S> path_gate;               // [T x K_L] product of the gates along each path
    Buffer<Index> path_node;           // [T x K_L] node reached by each path, or kNotRouted
    std::vector<S> own_load;           // [nodes] this level's load per node (smooth, or counts)
    std::vector<S> load;               // [nodes] Load_H down to this level
    std::vector<Index> count;          // [nodes] paths reaching each node
    bool smooth = false;               // own_load is the gate's smooth estimator
  };
  struct Saved {
    std::vector<LevelSaved> levels;
  };

  Policy(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, Index groups = 1)
      : config_(config), d_(d_model) {
    detail::require(groups == 1, "gate::Hierarchy: groups = ", groups, ", expected 1 (a hierarchy is not stacked)");
    require_weights("gate::Hierarchy", config.w_importance, config.w_load, 0.0);
    Index nodes = 1;
    for (int l = 0; l < Depth; ++l) {
      const Index b = config.levels[static_cast<std::size_t>(l)].branching;
      detail::require(b >= 1, "gate::Hierarchy: levels[", l, "].branching = ", b, ", expected at least 1");
      detail::require(n_experts >= 1 && nodes <= n_experts / b, "gate::Hierarchy: the branching factors multiply to ",
                      "more than n_experts = ", n_experts, branching_text());
      nodes *= b;
    }
    detail::require(nodes == n_experts, "gate::Hierarchy: the branching factors multiply to ", nodes,
                    ", expected n_experts = ", n_experts, branching_text());
    Index groups_at = 1, k = 1, column = 0;
    for (int l = 0; l < Depth; ++l) {
      const Level& level = config.levels[static_cast<std::size_t>(l)];
      try {
        gates_.emplace_back(level.gate, d_model, level.branching,
                            seed ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(l + 1)), groups_at);
      } catch (const Error& e) {
        throw Error("gate::Hierarchy: levels[" + std::to_string(l) + "] (" + std::to_string(groups_at) +
                    " group(s) of " + std::to_string(level.branching) + "): " + e.what());
      }
      detail::require(gates_.back().n_experts() == level.branching && gates_.back().k() >= 1,
                      "gate::Hierarchy: levels[", l, "]'s gate has ", gates_.back().n_experts(),
                      " experts and k = ", gates_.back().k(), ", expected ", level.branching, " experts and k >= 1");
      detail::require(moe::noise_columns(gates_.back()) == level.branching, "gate::Hierarchy: levels[", l,
                      "]'s gate reads ", moe::noise_columns(gates_.back()), " noise columns per row, expected ",
                      level.branching, " (one per expert: a level's gate of group g reads columns g * n + i)");
      // A gate of G groups over n experts reads noise columns g * n + i (gate_policy.hpp).
      columns_.push_back(column);
      column += groups_at * level.branching;
      k *= gates_.back().k();
      groups_at *= level.branching;
    }
    k_ = k;
    n_ = n_experts;
    noise_columns_ = column;
  }

  [[nodiscard]] Index k() const { return k_; }
  [[nodiscard]] Index n_experts() const { return n_; }
  [[nodiscard]] Index noise_columns() const { return noise_columns_; }
  [[nodiscard]] bool needs_noise(Mode mode) const {
    for (const auto& g : gates_)
      if (g.needs_noise(mode)) return true;
    return false;
  }
  [[nodiscard]] BalanceWeights balance_weights() const { return {config_.w_importance, config_.w_load}; }
  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] LevelPolicy& level(int l) { return gates_.at(static_cast<std::size_t>(l)); }

  // In a layer sharded across processes: every level's counts, Importance and own load are
  // summed over the ranks before Load_H is formed (Load_H is not a sum of per-rank values), and
  // the levels' gates get the reduction too.
  void set_reduction(GateReduction<S> reduction) {
    for (auto& g : gates_)
      if constexpr (requires { g.set_reduction(reduction); }) g.set_reduction(reduction);
    reduction_ = std::move(reduction);
  }

  void forward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* /*offsets*/, Mode mode,
               const GateNoise<S>& noise, GateRouting<B>& routing, Saved& saved) {
    const Index t_count = x.rows, d = d_;
    saved.levels.resize(static_cast<std::size_t>(Depth));
    routing.loss_aux = S(0);
    routing.loss_z = S(0);
    routing.deferred.clear();
    routing.levels.assign(static_cast<std::size_t>(Depth), LevelStats<S>{});
    Index paths_prev = 1, nodes_prev = 1;
    bool any_smooth = false;
    for (int l = 0; l < Depth; ++l) {
      LevelSaved& lv = saved.levels[static_cast<std::size_t>(l)];
      const LevelSaved* prev = l > 0 ? &saved.levels[static_cast<std::size_t>(l - 1)] : nullptr;
      LevelPolicy& gate = gates_[static_cast<std::size_t>(l)];
      const Index width = branching(l), kl = gate.k(), nodes = nodes_prev * width, paths = paths_prev * kl;
      GateNoise<S> nz = noise;
      nz.column = noise.column + columns_[static_cast<std::size_t>(l)];
      Index rows = t_count;
      lv.routing.deferred.clear();
      if (l == 0) {
        gate.forward(ctx, x, nullptr, mode, nz, lv.routing, lv.gate);
      } else {
        // MATH.md 4: group i's gate sees X^(i) only: the rows of the paths that reached node i.
        lv.plan.build(ctx, prev->path_node.view(), nodes_prev);
        rows = lv.plan.routed();
        lv.x.resize(rows, d);
        B::gather_rows(ctx, x, lv.plan.token_of.data(), lv.x.view());
        nz.row_token = lv.plan.token_of.data();
        gate.forward(ctx, lv.x.view(), lv.plan.offsets.data(), mode, nz, lv.routing, lv.gate);
      }
      detail::require(lv.routing.expert.rows() == rows && lv.routing.expert.cols() == kl &&
                          lv.routing.gate.rows() == rows && lv.routing.gate.cols() == kl,
                      "gate::Hierarchy: levels[", l, "]'s gate produced routing of shape ", lv.routing.expert.rows(),
                      " x ", lv.routing.expert.cols(), ", expected ", rows, " x ", kl);
      detail::check_routing<B>(ctx, lv.routing.expert, width,
                               ("gate::Hierarchy: levels[" + std::to_string(l) + "]").c_str(), check_);
      routing.loss_aux += lv.routing.loss_aux;
      routing.loss_z += lv.routing.loss_z;
      routing.deferred.insert(routing.deferred.end(), lv.routing.deferred.begin(), lv.routing.deferred.end());

      // Extend every path by this level's choices: node = parent * width + choice, gate = product.
      lv.path_gate.resize(t_count, paths);
      lv.path_node.resize(t_count, paths);
      {
        const Index* pnode = prev != nullptr ? prev->path_node.data() : nullptr;
        const S* pgate = prev != nullptr ? prev->path_gate.data() : nullptr;
        const Index* pos = prev != nullptr ? lv.plan.position.data() : nullptr;
        const Index* ex = lv.routing.expert.data();
        const S* g = lv.routing.gate.data();
        Index* node = lv.path_node.data();
        S* pg = lv.path_gate.data();
        const Index pp = paths_prev;
        B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
          for (Index q = 0; q < pp; ++q) {
            const Index parent = pnode != nullptr ? pnode[t * pp + q] : 0;
            const S parent_gate = pgate != nullptr ? pgate[t * pp + q] : S(1);
            const Index row = parent == kNotRouted ? kNotRouted : (pos != nullptr ? pos[t * pp + q] : t);
            for (Index j = 0; j < kl; ++j) {
              const Index e = row == kNotRouted ? kNotRouted : ex[row * kl + j];
              const Index out = t * pp * kl + q * kl + j;
              node[out] = e == kNotRouted ? kNotRouted : parent * width + e;
              pg[out] = e == kNotRouted ? S(0) : parent_gate * g[row * kl + j];
            }
          }
        });
      }

      // Counts, importance and loads per node (MATH.md 4), in path order.
      lv.count.assign(static_cast<std::size_t>(nodes), 0);
      std::vector<S> importance(static_cast<std::size_t>(nodes), S(0));
      lv.smooth = !lv.routing.load_is_count;
      any_smooth = any_smooth || lv.smooth;
      if (lv.smooth)
        detail::require(lv.routing.load.rows() * lv.routing.load.cols() == nodes, "gate::Hierarchy: levels[", l,
                        "]'s gate reported a load of ", lv.routing.load.rows() * lv.routing.load.cols(),
                        " entries, expected ", nodes);
      {
        // On the host, in path order, behind one synchronization: the level's counts and
        // Importance (small per level), and its gate's smooth load.
        std::vector<Index> node;
        std::vector<S> pg;
        HostReads<B> reads(ctx);
        reads.add(ConstMatrixView<Index>(lv.path_node.view()), node);
        reads.add(ConstMatrixView<S>(lv.path_gate.view()), pg);
        if (lv.smooth) reads.add(ConstMatrixView<S>(lv.routing.load.view()), lv.own_load);
        reads.wait();
        for (std::size_t p = 0; p < node.size(); ++p)
          if (node[p] != kNotRouted) {
            ++lv.count[static_cast<std::size_t>(node[p])];
            importance[static_cast<std::size_t>(node[p])] += pg[p];
          }
      }
      if (reduction_) {
        reduction_.sum_index(lv.count.data(), nodes);
        reduction_.sum(importance.data(), nodes);
        if (lv.smooth) reduction_.sum(lv.own_load.data(), nodes);
      }
      if (!lv.smooth) lv.own_load.assign(lv.count.begin(), lv.count.end());
      lv.load.resize(static_cast<std::size_t>(nodes));
      // While no level so far is smooth, Load_H is the count itself (not count * count / count).
      if (!any_smooth) lv.load.assign(lv.count.begin(), lv.count.end());
      for (Index v = 0; v < nodes && any_smooth; ++v) {
        const auto u = static_cast<std::size_t>(v);
        if (prev == nullptr) {
          lv.load[u] = lv.own_load[u];
        } else {
          const auto parent = static_cast<std::size_t>(v / width);
          lv.load[u] = prev->load[parent] * lv.own_load[u] / (static_cast<S>(prev->count[parent]) + S(1e-10));
        }
      }
      LevelStats<S>& st = routing.levels[static_cast<std::size_t>(l)];
      st.nodes = nodes;
      st.importance = std::move(importance);
      st.load = lv.load;
      st.count = lv.count;
      st.cv2_importance = cv_squared(st.importance);
      st.cv2_load = cv_squared(st.load);
      paths_prev = paths;
      nodes_prev = nodes;
    }
    const LevelSaved& last = saved.levels.back();
    routing.expert.resize(t_count, k_);
    routing.gate.resize(t_count, k_);
    B::copy(ctx, ConstMatrixView<Index>(last.path_node.view()), routing.expert.view());
    B::copy(ctx, ConstMatrixView<S>(last.path_gate.view()), routing.gate.view());
    // Where no level has a smooth estimator, Load_H is the leaves' hard count (MATH.md 3).
    routing.load_is_count = !any_smooth;
    routing.load_reduced = static_cast<bool>(reduction_);
    if (any_smooth)
      from_host<B>(ctx, last.load, routing.load);
    else
      routing.load.resize(0, 0);
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> x, const Index* /*offsets*/, const Saved& saved,
                ConstMatrixView<S> dgate, const S* dload, S aux_scale, MatrixView<S> dx) {
    const Index t_count = x.rows, d = d_;
    dpath_.resize(t_count, k_);
    B::copy(ctx, dgate, dpath_.view());
    std::vector<S> dload_h;  // d loss / d Load_H at the current level
    if (dload != nullptr) dload_h = to_host<B>(ctx, ConstMatrixView<S>{dload, 1, n_});
    for (int l = Depth - 1; l >= 0; --l) {
      const LevelSaved& lv = saved.levels[static_cast<std::size_t>(l)];
      const LevelSaved* prev = l > 0 ? &saved.levels[static_cast<std::size_t>(l - 1)] : nullptr;
      LevelPolicy& gate = gates_[static_cast<std::size_t>(l)];
      const Index width = branching(l), kl = gate.k(), rows = lv.routing.expert.rows();
      const Index paths_prev = prev != nullptr ? prev->path_gate.cols() : 1;
      const Index nodes = static_cast<Index>(lv.load.size()), nodes_prev = nodes / width;

      // Paths: P = P_parent * g, so dg = dP * P_parent and dP_parent = sum_j dP_j * g_j.
      dlevel_.resize(rows, kl);
      dprev_.resize(t_count, paths_prev);
      {
        const Index* pnode = prev != nullptr ? prev->path_node.data() : nullptr;
        const S* pgate = prev != nullptr ? prev->path_gate.data() : nullptr;
        const Index* pos = prev != nullptr ? lv.plan.position.data() : nullptr;
        const Index* ex = lv.routing.expert.data();
        const S* g = lv.routing.gate.data();
        const S* dp = dpath_.data();
        S* dg = dlevel_.data();
        S* dpp = dprev_.data();
        const Index pp = paths_prev;
        B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
          for (Index q = 0; q < pp; ++q) {
            const Index parent = pnode != nullptr ? pnode[t * pp + q] : 0;
            const S parent_gate = pgate != nullptr ? pgate[t * pp + q] : S(1);
            S acc = 0;
            if (parent != kNotRouted) {
              const Index row = pos != nullptr ? pos[t * pp + q] : t;
              for (Index j = 0; j < kl; ++j) {
                const S dpj = dp[t * pp * kl + q * kl + j];
                const bool routed = ex[row * kl + j] != kNotRouted;
                dg[row * kl + j] = routed ? dpj * parent_gate : S(0);
                acc += routed ? dpj * g[row * kl + j] : S(0);
              }
            }
            dpp[t * pp + q] = acc;
          }
        });
      }

      // Loads: Load_H[v] = Load_H,prev[parent] * own[v] / (count_prev[parent] + 1e-10).
      std::vector<S> down(static_cast<std::size_t>(nodes_prev), S(0));
      const bool has_dload = !dload_h.empty();
      if (has_dload) {
        down_own_.assign(static_cast<std::size_t>(nodes), S(0));
        for (Index v = 0; v < nodes; ++v) {
          const auto u = static_cast<std::size_t>(v);
          if (prev == nullptr) {
            down_own_[u] = dload_h[u];
          } else {
            const auto parent = static_cast<std::size_t>(v / width);
            const S c = static_cast<S>(prev->count[parent]) + S(1e-10);
            down_own_[u] = dload_h[u] * prev->load[parent] / c;
            down[parent] += dload_h[u] * lv.own_load[u] / c;
          }
        }
      }
      const S* dl = nullptr;
      if (has_dload && lv.smooth) {
        from_host<B>(ctx, down_own_, down_dev_);
        dl = down_dev_.data();
      }
      if (prev == nullptr) {
        gate.backward(ctx, x, nullptr, lv.gate, dlevel_.view(), dl, aux_scale, dx);
      } else {
        dxrows_.resize(rows, d);
        B::fill(ctx, dxrows_.view(), S(0));
        gate.backward(ctx, lv.x.view(), lv.plan.offsets.data(), lv.gate, dlevel_.view(), dl, aux_scale, dxrows_.view());
        // Each token adds its rows' input gradients in path order.
        const Index* pnode = prev->path_node.data();
        const Index* pos = lv.plan.position.data();
        const S* src = dxrows_.data();
        const Index pp = paths_prev;
        B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
          for (Index q = 0; q < pp; ++q) {
            if (pnode[t * pp + q] == kNotRouted) continue;
            const S* row = src + pos[t * pp + q] * d;
            for (Index c = 0; c < d; ++c) dx(t, c) += row[c];
          }
        });
      }
      if (has_dload) dload_h = std::move(down);
      std::swap(dpath_, dprev_);
    }
  }

  // Level l's parameters under "gate.<l>.": gate.0.w_gate [d, a], gate.1.w_gate [a, d, b], ...
  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    std::vector<Parameter<S>> all;
    for (std::size_t l = 0; l < gates_.size(); ++l)
      for (auto& p : gates_[l].parameters()) {
        const std::string tail = p.name.rfind("gate.", 0) == 0 ? p.name.substr(5) : p.name;
        p.name = "gate." + std::to_string(l) + "." + tail;
        all.push_back(std::move(p));
      }
    return all;
  }

 private:
  [[nodiscard]] Index branching(int l) const { return config_.levels[static_cast<std::size_t>(l)].branching; }

  std::string branching_text() const {
    std::string text = " (levels' branching:";
    for (const auto& level : config_.levels) text += " " + std::to_string(level.branching);
    return text + ")";
  }

  Config config_;
  Index d_ = 0, n_ = 0, k_ = 1, noise_columns_ = 0;
  std::vector<LevelPolicy> gates_;
  std::vector<Index> columns_;  // first noise column of each level
  Buffer<S> dpath_, dprev_, dlevel_, dxrows_, down_dev_;
  Buffer<Index> check_;  // routing check flags
  std::vector<S> down_own_;
  GateReduction<S> reduction_;  // sums over the ranks of a sharded layer, or empty
};

}  // namespace moe::gate
