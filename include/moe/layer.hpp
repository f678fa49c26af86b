#pragma once
// moe::Layer: the Sparsely-Gated Mixture-of-Experts layer (MATH.md 1-3, 5).
//   y(x) = sum_i G(x)_i E_i(x), each expert evaluated only on the tokens routed to it,
// with the balancing losses and statistics returned beside the output.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/backend.hpp"
#include "moe/balance.hpp"
#include "moe/comm/local.hpp"
#include "moe/communicator.hpp"
#include "moe/error.hpp"
#include "moe/expert_group.hpp"
#include "moe/gate/common.hpp"
#include "moe/gate/hierarchy.hpp"
#include "moe/gate_policy.hpp"
#include "moe/mode.hpp"
#include "moe/parameter.hpp"
#include "moe/random.hpp"
#include "moe/routing_plan.hpp"
#include "moe/scalar_math.hpp"
#include "moe/shard.hpp"

namespace moe {

namespace detail {
// Steps of Layer::forward, free functions because a CUDA device lambda cannot live in a private
// member function.

// Importance_i = sum over the batch of G(x)_i, over expert i's sorted rows (token order: the
// plan is stable), by segment_sums: max_rows bounds any expert's rows.
template <Backend B>
void importance_by_expert(typename B::Context& ctx, const typename B::Scalar* gate, const Index* order,
                          const Index* offsets, Index n, Index max_rows, typename B::Scalar* out,
                          typename B::template Buffer<typename B::Scalar>& scratch) {
  segment_sums<B>(
      ctx, offsets, n, max_rows, 1, [=] MOE_HD(Index p, Index) { return gate[order[p]]; }, out, scratch);
}

// flags[t] = 1 if token t has no routed slot (no expert computes it), else 0.
template <Backend B>
void unrouted_tokens(typename B::Context& ctx, ConstMatrixView<Index> expert, Index* flags) {
  const Index k = expert.cols;
  B::for_each(ctx, expert.rows, [=] MOE_HD(Index t) {
    bool any = false;
    for (Index j = 0; j < k; ++j) any = any || expert(t, j) != kNotRouted;
    flags[t] = any ? 0 : 1;
  });
}

// dimportance = scale_importance * dCV^2/dImportance and dload = scale_load * dCV^2/dLoad
// (MATH.md 5), on the backend (one item: n is small), so backward uploads nothing. load null:
// the load is a count (no gradient), dload is left alone.
template <Backend B>
void balance_gradients(typename B::Context& ctx, const typename B::Scalar* importance, const typename B::Scalar* load,
                       Index n, typename B::Scalar scale_importance, typename B::Scalar scale_load,
                       typename B::Scalar* dimportance, typename B::Scalar* dload) {
  using S = typename B::Scalar;
  B::for_each(ctx, 1, [=] MOE_HD(Index) {
    for (Index i = 0; i < n; ++i) dimportance[i] = S(0);
    cv_squared_grad(importance, n, scale_importance, dimportance);
    if (load == nullptr) return;
    for (Index i = 0; i < n; ++i) dload[i] = S(0);
    cv_squared_grad(load, n, scale_load, dload);
  });
}

// g = a + b, with a and b packed row-major (g may have a row stride).
template <Backend B>
void set_sum(typename B::Context& ctx, MatrixView<typename B::Scalar> g, const typename B::Scalar* a,
             const typename B::Scalar* b) {
  const Index cols = g.cols, stride = g.stride;
  typename B::Scalar* out = g.data;
  for_each_element<B>(ctx, g.rows, cols,
                      [=] MOE_HD(Index r, Index c) { out[r * stride + c] = a[r * cols + c] + b[r * cols + c]; });
}

// The shared experts' pass: row r of s_count * t_count reads token r % t_count; expert e owns
// rows [e t_count, (e + 1) t_count).
template <Backend B>
void shared_rows(typename B::Context& ctx, Index s_count, Index t_count, Index* rows, Index* offsets) {
  B::for_each(ctx, s_count * t_count, [=] MOE_HD(Index r) { rows[r] = r % t_count; });
  B::for_each(ctx, s_count + 1, [=] MOE_HD(Index e) { offsets[e] = e * t_count; });
}

// The shared experts' gate (Qwen2-MoE): g [T x 1] holds x w and becomes sigmoid(x w) in place.
template <Backend B>
void sigmoid_in_place(typename B::Context& ctx, MatrixView<typename B::Scalar> g) {
  typename B::Scalar* v = g.data;
  B::for_each(ctx, g.rows, [=] MOE_HD(Index t) { v[t] = sigmoid(v[t]); });
}

// Backward of the shared gate, y_t += g_t * sum_e E_e(x_t): dysh (the shared rows' dy, row r of
// token r % T) is scaled by g, and dlogit_t = g_t (1 - g_t) <dy_t, sum_e E_e(x_t)>.
template <Backend B>
void shared_gate_backward(typename B::Context& ctx, const typename B::Scalar* g, const typename B::Scalar* ysh,
                          Index s_count, ConstMatrixView<typename B::Scalar> dy, MatrixView<typename B::Scalar> dysh,
                          typename B::Scalar* dlogit) {
  using S = typename B::Scalar;
  const Index t_count = dy.rows, d = dy.cols;
  for_each_element<B>(ctx, dysh.rows, d, [=] MOE_HD(Index r, Index c) { dysh(r, c) *= g[r % t_count]; });
  B::for_each(ctx, t_count, [=] MOE_HD(Index t) {
    S acc = S(0);
    for (Index c = 0; c < d; ++c) {
      S sum = S(0);
      for (Index e = 0; e < s_count; ++e) sum += ysh[(e * t_count + t) * d + c];
      acc += dy(t, c) * sum;
    }
    dlogit[t] = g[t] * (S(1) - g[t]) * acc;
  });
}
}  // namespace detail

// Where the gate's noise z comes from in a training forward: a caller-owned Rng (one step per
// call), or an explicit matrix [T x Layer::noise_columns()] (n_experts for a flat gate). Gates
// without noise ignore it.
template <class S>
class Noise {
 public:
  Noise() = default;
  Noise(Rng& rng) : rng_(&rng) {}                           // NOLINT(google-explicit-constructor)
  Noise(ConstMatrixView<S> z) : z_(z), explicit_(true) {}   // NOLINT(google-explicit-constructor)
  Noise(MatrixView<S> z) : Noise(ConstMatrixView<S>(z)) {}  // NOLINT(google-explicit-constructor)

  [[nodiscard]] bool empty() const { return rng_ == nullptr && !explicit_; }
  [[nodiscard]] Rng* rng() const { return rng_; }
  [[nodiscard]] bool is_explicit() const { return explicit_; }
  [[nodiscard]] ConstMatrixView<S> values() const { return z_; }

 private:
  Rng* rng_ = nullptr;
  ConstMatrixView<S> z_{};
  bool explicit_ = false;
};

// The gate family a layer of the given depth uses: Gate itself at depth 1, the hierarchy of
// MATH.md 4 with Gate at every level above that.
template <class Gate, int Depth>
using GateAtDepth = std::conditional_t<Depth == 1, Gate, gate::Hierarchy<Gate, Depth>>;

// What a moe::Layer is built from (Layer<...>::Config).
template <class Expert, class GateFamily>
struct LayerConfig {
  Index d_model = 0;    // d, the width of a token
  Index n_experts = 0;  // n
  typename Expert::Config expert{};
  typename GateFamily::Config gate{};  // at Depth > 1: gate::Hierarchy's Config (one entry per level)
  Index shared_experts = 0;            // s always-on experts added to every token's output
  // The shared experts' Config when it differs from the routed experts' (e.g. another hidden
  // width: DeepSeek, Qwen2-MoE); empty: `expert`.
  std::optional<typename Expert::Config> shared_expert{};
  // Qwen2-MoE's shared-expert gate: the shared experts' summed output is multiplied by
  // sigmoid(x w), w [d x 1] a trainable parameter "shared_gate.w_gate" (needs shared_experts >= 1).
  bool shared_gate = false;
  std::uint64_t seed = 0;              // parameter initialization
  bool check_finite = true;            // reject NaN and Inf in inputs, noise, output gradients and gate values
  int threads = 0;                     // CPU threads, 0: all that OpenMP offers; results do not depend on it
};

// clang-format off
template <class Expert, class Gate, Backend B, int Depth = 1, Communicator Comm = comm::Local>
  requires ExpertFamily<Expert, B> && GateFamily<Gate, B>
class Layer {
  // clang-format on
  static_assert(Depth >= 1, "moe::Layer: Depth must be at least 1 (1: a flat MoE, 2 and up: hierarchical, MATH.md 4)");

 public:
  using Scalar = typename B::Scalar;
  using Backend = B;
  using ExpertTag = Expert;  // the expert family (e.g. expert::SwiGLU)
  using GateTag = Gate;      // the gate family of every level (e.g. gate::TopK)
  using CommType = Comm;
  using ExpertGroup = typename Expert::template Group<B>;
  using GateFamily = GateAtDepth<Gate, Depth>;
  using GatePolicy = typename GateFamily::template Policy<B>;
  static constexpr int depth = Depth;
  template <class T>
  using Buffer = typename B::template Buffer<T>;

  // The same type for every backend-independent choice of Comm: a one-process layer and a
  // sharded one are built from one Config.
  using Config = LayerConfig<Expert, GateFamily>;

  // The result of one forward call: the output, the balance statistics, the routing, and what
  // backward needs (kept here, owned by the caller; the layer holds no per-call state).
  class Forward {
   public:
    Forward() = default;
    Forward(const Forward&) = default;
    Forward& operator=(const Forward&) = default;
    // A moved-from Forward holds no forward pass: backward refuses it.
    Forward(Forward&& other) noexcept { *this = std::move(other); }
    Forward& operator=(Forward&& other) noexcept {
      owner_ = std::exchange(other.owner_, 0);
      mode_ = other.mode_;
      x_ = std::move(other.x_);
      xs_ = std::move(other.xs_);
      ys_ = std::move(other.ys_);
      y_ = std::move(other.y_);
      importance_ = std::move(other.importance_);
      routing_ = std::move(other.routing_);
      plan_ = std::move(other.plan_);
      gate_saved_ = std::move(other.gate_saved_);
      expert_saved_ = std::move(other.expert_saved_);
      shared_ = std::move(other.shared_);
      stats_ = std::move(other.stats_);
      exchange_ = std::move(other.exchange_);
      xe_ = std::move(other.xe_);
      ye_ = std::move(other.ye_);
      tokens_per_expert_ = std::move(other.tokens_per_expert_);
      own_loss_share_ = other.own_loss_share_;
      call_ = other.call_;
      return *this;
    }
    [[nodiscard]] ConstMatrixView<Scalar> y() const { return y_.view(); }
    [[nodiscard]] const BalanceStats<Scalar>& stats() const { return stats_; }
    // The balancing loss to add to the training objective (stats().loss).
    [[nodiscard]] Scalar loss() const { return stats_.loss; }
    // [T x k] expert of each slot, kNotRouted (-1) for a slot no expert computed.
    [[nodiscard]] ConstMatrixView<Index> expert_index() const { return routing_.expert.view(); }
    [[nodiscard]] ConstMatrixView<Scalar> gates() const { return routing_.gate.view(); }  // [T x k]
    [[nodiscard]] Mode mode() const { return mode_; }
    [[nodiscard]] bool valid() const { return owner_ != 0; }

   private:
    friend class Layer;
    std::uint64_t owner_ = 0;
    Mode mode_ = Mode::train;
    Buffer<Scalar> x_, xs_, ys_, y_;
    Buffer<Scalar> importance_;  // [n x 1] Importance, in backend memory (backward's CV^2 gradient)
    GateRouting<B> routing_;
    RoutingPlan<B> plan_;
    typename GatePolicy::Saved gate_saved_;
    typename ExpertGroup::Saved expert_saved_;
    struct Shared {  // the shared experts' pass: every token, once per shared expert
      Buffer<Scalar> xs, ys;
      Buffer<Scalar> gate;  // [T x 1] sigmoid(x w) of the shared gate, when there is one
      Buffer<Index> rows, offsets;
      typename ExpertGroup::Saved saved;
    } shared_;
    BalanceStats<Scalar> stats_;
    // Sharded across processes: the exchange of this call, the rows this rank's experts computed
    // (in their order), the global routed count of each expert, this rank's share of the global
    // batch (its weight in the gate's own losses), and which forward call of the layer this was.
    ExpertExchange<B> exchange_;
    Buffer<Scalar> xe_, ye_;
    std::vector<Index> tokens_per_expert_;
    Scalar own_loss_share_ = Scalar(1);
    std::uint64_t call_ = 0;
  };

  struct Backward {
    Buffer<Scalar> dx;  // [T x d] gradient with respect to the input
  };

  // With a communicator of P > 1 ranks the layer is sharded (MATH.md 6, docs/distributed.md):
  // every rank builds it with the same Config; rank r holds a block of the experts
  // (expert_shard()), and the gate and the shared experts are replicated. The constructor checks
  // that every rank's configuration and replicated weights are the same (a collective call).
  explicit Layer(const Config& config, Comm comm = {})
      : config_(validated(config)),
        comm_(std::move(comm)),
        placement_(place_experts(config_, comm_.size())),
        gate_(config_.gate, config_.d_model, config_.n_experts, config_.seed, Index{1}),
        experts_(make_experts(config_, placement_, comm_.rank())),
        id_(next_id()) {
    if (config_.shared_experts > 0)
      shared_.emplace(config_.shared_expert.value_or(config_.expert), config_.d_model, config_.shared_experts,
                      config_.seed ^ kSharedSeed);
    if (config_.shared_gate)
      shared_gate_.emplace("shared_gate.w_gate", config_.d_model, Index{1}, Index{1}, config_.seed ^ kSharedGateSeed,
                           1.0 / std::sqrt(static_cast<double>(config_.d_model)));
    detail::require(experts_.n_experts() == placement_.count(comm_.rank()) && gate_.n_experts() == config_.n_experts,
                    "moe::Layer: gate has ", gate_.n_experts(), " experts and expert group ", experts_.n_experts(),
                    ", expected n_experts = ", config_.n_experts, " and the rank's ", placement_.count(comm_.rank()));
    if (sharded()) verify_replicas();
  }

  // A copy is a new layer with the same parameters: results of the original's forward are not
  // accepted by the copy's backward, and the other way round.
  Layer(const Layer& other)
      : config_(other.config_),
        comm_(other.comm_),
        placement_(other.placement_),
        gate_(other.gate_),
        experts_(other.experts_),
        shared_(other.shared_),
        shared_gate_(other.shared_gate_),
        id_(next_id()) {}
  Layer& operator=(const Layer& other) {
    if (this != &other) {
      config_ = other.config_;
      comm_ = other.comm_;
      placement_ = other.placement_;
      gate_ = other.gate_;
      experts_ = other.experts_;
      shared_ = other.shared_;
      shared_gate_ = other.shared_gate_;
      id_ = next_id();
    }
    return *this;
  }
  // A moved-from layer refuses every call with a moe::Error.
  Layer(Layer&& other) noexcept
      : config_(std::move(other.config_)),
        comm_(std::move(other.comm_)),
        placement_(other.placement_),
        gate_(std::move(other.gate_)),
        experts_(std::move(other.experts_)),
        shared_(std::move(other.shared_)),
        shared_gate_(std::move(other.shared_gate_)),
        id_(std::exchange(other.id_, 0)) {}
  Layer& operator=(Layer&& other) noexcept {
    if (this != &other) {
      config_ = std::move(other.config_);
      comm_ = std::move(other.comm_);
      placement_ = std::move(other.placement_);
      gate_ = std::move(other.gate_);
      experts_ = std::move(other.experts_);
      shared_ = std::move(other.shared_);
      shared_gate_ = std::move(other.shared_gate_);
      id_ = std::exchange(other.id_, 0);
    }
    return *this;
  }

  // x: [T x d_model]. In training, a gate with noise needs `noise` (an Rng, or an explicit z
  // [T x noise_columns()]).
  Forward forward(ConstMatrixView<Scalar> x, Mode mode = Mode::train, Noise<Scalar> noise = {}) {
    Forward f;
    forward_into(f, x, mode, noise);
    return f;
  }

  // The same, reusing the matrix buffers of a previous result: a training loop that keeps one
  // Forward does not reallocate them in steady state (the small per-expert statistics vectors
  // are rebuilt). If the input is rejected, f is left as it was.
  //
  // Sharded: every rank calls forward (and backward) the same number of times, in the same mode,
  // each with its own batch (any size, 0 included). A rank whose input is refused makes every
  // rank's call fail with a moe::Error; a rank that fails later ends the others' calls when the
  // communicator's timeout passes.
  void forward_into(Forward& f, ConstMatrixView<Scalar> x, Mode mode = Mode::train, Noise<Scalar> noise = {}) {
    const Index t_count = x.rows, d = config_.d_model, n = config_.n_experts;
    require_usable("forward");
    typename B::Context ctx{context()};
    GateNoise<Scalar> gate_noise{};
    std::exception_ptr refused;
    try {
      check_forward(ctx, x, mode, noise, gate_noise);
    } catch (const Error&) {
      refused = std::current_exception();
    }
    const std::uint64_t call = ++forward_calls_;
    Index global_tokens = t_count;
    if (sharded()) {
      const std::vector<Index> all = agree("forward", refused, {t_count, static_cast<Index>(mode), static_cast<Index>(call)});
      global_tokens = 0;
      for (int r = 0; r < comm_.size(); ++r) {
        if (r < comm_.rank()) gate_noise.token_offset += all[static_cast<std::size_t>(r) * 3];
        global_tokens += all[static_cast<std::size_t>(r) * 3];
      }
      if constexpr (requires { gate_.set_reduction(reduction()); }) gate_.set_reduction(reduction());
    } else if (refused) {
      std::rethrow_exception(refused);
    }

    f.owner_ = 0;  // invalid until complete
    f.call_ = call;
    f.own_loss_share_ = !sharded()          ? Scalar(1)
                        : global_tokens > 0 ? static_cast<Scalar>(t_count) / static_cast<Scalar>(global_tokens)
                                            : Scalar(0);
    f.mode_ = mode;
    f.x_.resize(t_count, d);
    B::copy(ctx, x, f.x_.view());
    const ConstMatrixView<Scalar> xc = f.x_.view();

    f.routing_.deferred.clear();
    gate_.forward(ctx, xc, nullptr, mode, gate_noise, f.routing_, f.gate_saved_);
    const Index k = gate_.k();
    detail::require(f.routing_.expert.rows() == t_count && f.routing_.expert.cols() == k &&
                        f.routing_.gate.rows() == t_count && f.routing_.gate.cols() == k,
                    "moe::Layer::forward: the gate produced routing of shape ", f.routing_.expert.rows(), " x ",
                    f.routing_.expert.cols(), ", expected [T x k] = ", t_count, " x ", k);
    // The plan counts the invalid slots (an index out of range, an expert twice for one token,
    // with check_finite a non-finite gate value); only then is the routing read to name the first.
    const auto* checked_gates = config_.check_finite ? &f.routing_.gate : nullptr;
    f.plan_.build(ctx, f.routing_.expert.view(), n,
                  checked_gates != nullptr ? ConstMatrixView<Scalar>(checked_gates->view()) : ConstMatrixView<Scalar>{});
    if (f.plan_.invalid() > 0) {
      detail::check_routing<B>(ctx, f.routing_.expert, n, "moe::Layer::forward", check_, checked_gates);
      detail::fail("moe::Layer::forward: the gate's routing has ", f.plan_.invalid(), " invalid slots");
    }

    // Dispatch: gather each routed slot's token into the expert-contiguous buffer; sharded, the
    // rows then travel to the ranks that hold their experts and the outputs come back.
    const Index routed = f.plan_.routed();
    f.xs_.resize(routed, d);
    f.ys_.resize(routed, d);
    if constexpr (GathersOwnRows<ExpertGroup, B>) {
      if (sharded())
        B::gather_rows(ctx, xc, f.plan_.token_of.data(), f.xs_.view());  // the rows travel in fp32
      else
        experts_.gather_rows(ctx, xc, f.plan_.token_of.data(), f.xs_.view(), f.expert_saved_);
    } else {
      B::gather_rows(ctx, xc, f.plan_.token_of.data(), f.xs_.view());
    }
    if (sharded()) {
      plan_exchange(ctx, f);
      experts_.forward(ctx, f.xe_.view(), f.exchange_.local_offsets(), f.ye_.view(), f.expert_saved_);
      f.exchange_.from_experts(ctx, comm_, f.ye_.view(), f.ys_.view());
    } else {
      experts_.forward(ctx, f.xs_.view(), f.plan_.offsets.data(), f.ys_.view(), f.expert_saved_);
    }
    if (shared_) shared_forward(ctx, f);

    // Combine, MATH.md 1: y[t] = sum over t's k slots, in slot order, of gate * expert output
    // (slots routed nowhere add nothing), then the shared experts' outputs in order.
    f.y_.resize(t_count, d);
    {
      const Scalar* ys = f.ys_.data();
      const Scalar* g = f.routing_.gate.data();
      const Index* ex = f.routing_.expert.data();
      const Index* pos = f.plan_.position.data();
      const Scalar* ysh = shared_ ? f.shared_.ys.data() : nullptr;
      const Scalar* sg = shared_gate_ ? f.shared_.gate.data() : nullptr;
      const Index s_count = shared_ ? config_.shared_experts : 0;
      Scalar* y = f.y_.data();
      // One item per element of y: consecutive items read consecutive columns of a slot's row.
      for_each_element<B>(ctx, t_count, d, [=] MOE_HD(Index t, Index c) {
        Scalar acc = Scalar(0);
        for (Index j = 0; j < k; ++j) {
          if (ex[t * k + j] == kNotRouted) continue;
          acc += g[t * k + j] * ys[pos[t * k + j] * d + c];
        }
        if (sg == nullptr) {
          for (Index e = 0; e < s_count; ++e) acc += ysh[(e * t_count + t) * d + c];
        } else {
          Scalar sum = Scalar(0);
          for (Index e = 0; e < s_count; ++e) sum += ysh[(e * t_count + t) * d + c];
          acc += sg[t] * sum;
        }
        y[t * d + c] = acc;
      });
    }
    f.stats_ = balance(ctx, f);
    f.owner_ = id_;
  }

  // Gradients of sum(dy .* y) + aux_scale * loss with respect to the input (returned) and every
  // parameter (added into the parameters' grad storage; see zero_grad).
  Backward backward(const Forward& f, ConstMatrixView<Scalar> dy, Scalar aux_scale = Scalar(1)) {
    Backward out;
    backward_into(out, f, dy, aux_scale);
    return out;
  }

  // The same, reusing out's buffer: a training loop that keeps one Backward allocates nothing
  // for dx in steady state.
  //
  // Sharded: every rank calls backward for the same forward call with the same aux_scale. The
  // gradients of the replicated parameters (gate, shared experts) are summed over the ranks, so
  // every rank holds, bit for bit, the gradient of the loss over the global batch; the experts'
  // gradients stay with the rank that holds them.
  void backward_into(Backward& out, const Forward& f, ConstMatrixView<Scalar> dy, Scalar aux_scale = Scalar(1)) {
    require_usable("backward");
    typename B::Context ctx{context()};
    std::exception_ptr refused;
    try {
      check_backward(ctx, f, dy, aux_scale);
    } catch (const Error&) {
      refused = std::current_exception();
    }
    if (sharded()) {
      double scale = static_cast<double>(aux_scale);
      Index scale_bits = 0;
      std::memcpy(&scale_bits, &scale, sizeof scale);
      agree("backward", refused, {Index{0}, static_cast<Index>(f.call_), scale_bits});
      stash_replicated_grads(ctx);
    } else if (refused) {
      std::rethrow_exception(refused);
    }
    const Index t_count = f.x_.rows(), d = config_.d_model, n = config_.n_experts, k = gate_.k();

    const BalanceWeights w = gate_.balance_weights();
    const BalanceStats<Scalar>& st = f.stats_;
    // MATH.md 5: differentiate CV^2 through mean and variance, for Importance and smooth Load.
    // (From the Forward's backend copies of Importance and Load, which hold the global sums.)
    dimportance_.resize(n, 1);
    dload_.resize(n, 1);
    detail::balance_gradients<B>(ctx, f.importance_.data(), st.load_is_count ? nullptr : f.routing_.load.data(), n,
                                 aux_scale * static_cast<Scalar>(w.w_importance),
                                 aux_scale * static_cast<Scalar>(w.w_load), dimportance_.data(), dload_.data());

    const Index routed = f.plan_.routed();
    dys_.resize(routed, d);
    dxs_.resize(routed, d);
    dgate_.resize(t_count, k);
    out.dx.resize(t_count, d);
    {
      const Scalar* g = f.routing_.gate.data();
      const Index* ex = f.routing_.expert.data();
      const Index* ord = f.plan_.order.data();
      const Index* tok = f.plan_.token_of.data();
      const Index* pos = f.plan_.position.data();
      const Scalar* ys = f.ys_.data();
      const Scalar* dyp = dy.data;
      const Index dy_stride = dy.stride;
      const Scalar* dimp = dimportance_.data();
      Scalar* dys = dys_.data();
      Scalar* dg = dgate_.data();
      // Combine backward: each routed sorted row gets gate * dy of its token, one item per element.
      for_each_element<B>(ctx, routed, d, [=] MOE_HD(Index p, Index c) {
        dys[p * d + c] = g[ord[p]] * dyp[tok[p] * dy_stride + c];
      });
      // dgate = <dy, expert output> plus Importance's gradient (Importance_i = sum_x G(x)_i);
      // 0 for a slot routed nowhere (its gate is the constant 0). One item per slot.
      B::for_each(ctx, t_count * k, [=] MOE_HD(Index s) {
        if (ex[s] == kNotRouted) {
          dg[s] = Scalar(0);
          return;
        }
        const Scalar* row = ys + pos[s] * d;
        const Scalar* dyt = dyp + (s / k) * dy_stride;
        Scalar acc = 0;
        for (Index c = 0; c < d; ++c) acc += dyt[c] * row[c];
        dg[s] = acc + dimp[ex[s]];
      });
    }
    if (sharded()) {
      const Index received = f.exchange_.received();
      dye_.resize(received, d);
      dxe_.resize(received, d);
      f.exchange_.to_experts(ctx, comm_, dys_.view(), dye_.view());
      experts_.backward(ctx, f.xe_.view(), f.exchange_.local_offsets(), f.expert_saved_, dye_.view(), dxe_.view());
      f.exchange_.from_experts(ctx, comm_, dxe_.view(), dxs_.view());
    } else {
      experts_.backward(ctx, f.xs_.view(), f.plan_.offsets.data(), f.expert_saved_, dys_.view(), dxs_.view());
    }
    if (shared_) shared_backward(ctx, f, dy);
    {
      const Scalar* dxs = dxs_.data();
      const Index* ex = f.routing_.expert.data();
      const Index* pos = f.plan_.position.data();
      const Scalar* dxsh = shared_ ? dxsh_.data() : nullptr;
      const Index s_count = shared_ ? config_.shared_experts : 0;
      Scalar* dx = out.dx.data();
      // Dispatch backward: each token sums its routed slots' input gradients in slot order, then
      // the shared experts' in order.
      for_each_element<B>(ctx, t_count, d, [=] MOE_HD(Index t, Index c) {
        Scalar acc = Scalar(0);
        for (Index j = 0; j < k; ++j) {
          if (ex[t * k + j] == kNotRouted) continue;
          acc += dxs[pos[t * k + j] * d + c];
        }
        for (Index e = 0; e < s_count; ++e) acc += dxsh[(e * t_count + t) * d + c];
        dx[t * d + c] = acc;
      });
    }
    if (shared_gate_) shared_gate_->backward(ctx, f.x_.view(), nullptr, dshared_gate_.view(), out.dx.view());
    // The gate's own losses (a Switch loss, a z-loss) of a sharded layer are the token-weighted
    // mean of each rank's: this rank's part of their gradient is weighted by its share.
    gate_.backward(ctx, f.x_.view(), nullptr, f.gate_saved_, dgate_.view(),
                   st.load_is_count ? nullptr : dload_.data(), aux_scale * f.own_loss_share_, out.dx.view());
    if (sharded()) sum_replicated_grads(ctx);
  }

  // Every trainable tensor, gate first, then the routed experts ("experts.*"), then the shared
  // experts ("shared_experts.*") and their gate ("shared_gate.w_gate"), under its stable dotted name.
  [[nodiscard]] std::vector<Parameter<Scalar>> parameters() {
    std::vector<Parameter<Scalar>> all = gate_.parameters();
    for (auto& p : experts_.parameters()) all.push_back(std::move(p));
    if (shared_)
      for (auto& p : shared_->parameters()) {
        if (p.name.rfind("experts.", 0) == 0) p.name = "shared_" + p.name;
        all.push_back(std::move(p));
      }
    if (shared_gate_) all.push_back(shared_gate_->parameter());
    return all;
  }

  // Says that parameter values were written through views kept from an earlier parameters()
  // call (the optimizers, checkpoint loads and imports say it themselves): copies derived from
  // them, such as an expert group's bfloat16 weights under Precision::bf16, are made again.
  void parameters_changed() {
    for (const auto& p : parameters()) p.changed();
  }

  void zero_grad() {
    typename B::Context ctx{context()};
    for (auto& p : parameters()) B::fill(ctx, p.grad, Scalar(0));
  }

  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] Index k() const { return gate_.k(); }
  // Columns of an explicit noise matrix: n_experts for a flat gate, every level's nodes summed
  // for a hierarchical one.
  [[nodiscard]] Index noise_columns() const { return moe::noise_columns(gate_); }
  [[nodiscard]] GatePolicy& gate() { return gate_; }
  [[nodiscard]] ExpertGroup& experts() { return experts_; }
  // The shared experts (Config::shared_experts > 0), or null.
  [[nodiscard]] ExpertGroup* shared_experts() { return shared_ ? &*shared_ : nullptr; }
  [[nodiscard]] Comm& communicator() { return comm_; }
  // The experts this rank holds: experts [first, first + experts().n_experts()) of n_experts
  // (all of them with one rank). Their parameters ("experts.*") are stacked in that order.
  [[nodiscard]] ExpertShard expert_shard() const {
    return {placement_.first(comm_.rank()), config_.n_experts};
  }
  [[nodiscard]] const ExpertPlacement& placement() const { return placement_; }
  // Whether the experts are sharded over more than one rank.
  [[nodiscard]] bool sharded() const { return comm_.size() > 1; }

  // The parameters every rank holds the same copy of: the gate's, then the shared experts'.
  [[nodiscard]] std::vector<Parameter<Scalar>> replicated_parameters() {
    std::vector<Parameter<Scalar>> all = parameters(), out;
    for (auto& p : all)
      if (p.name.rfind("experts.", 0) != 0) out.push_back(std::move(p));
    return out;
  }

  // The sum of v over the ranks (v itself with one rank): a collective call, for callers that
  // must agree across ranks (e.g. whether every rank's checkpoint file was written).
  [[nodiscard]] Index sum_over_ranks(Index v) {
    if (sharded()) reduce_host(&v, 1);
    return v;
  }

  // Sharded: checks that every rank built the layer with the same configuration and holds the
  // same replicated weights (a hash of both, compared over the ranks; a collective call). The
  // constructor calls it; call it again after loading weights.
  void verify_replicas() {
    require_usable("verify_replicas");
    typename B::Context ctx{context()};
    const std::uint64_t mine = replica_hash(ctx);
    std::vector<Index> all = gather_host({static_cast<Index>(mine)});
    for (int r = 0; r < comm_.size(); ++r)
      detail::require(all[static_cast<std::size_t>(r)] == all[0], "moe::Layer on rank ", comm_.rank(), ": rank ", r,
                      "'s configuration or replicated weights differ from rank 0's (hash ",
                      static_cast<std::uint64_t>(all[static_cast<std::size_t>(r)]), ", expected ",
                      static_cast<std::uint64_t>(all[0]),
                      "): build the layer with the same Config and the same weights on every rank");
  }

 private:
  static Config validated(const Config& c) {
    detail::require(c.d_model >= 1, "moe::Layer: d_model = ", c.d_model, ", expected at least 1");
    detail::require(c.n_experts >= 1, "moe::Layer: n_experts = ", c.n_experts, ", expected at least 1");
    detail::require(c.threads >= 0, "moe::Layer: threads = ", c.threads, ", expected >= 0 (0: all available)");
    detail::require(c.shared_experts >= 0, "moe::Layer: shared_experts = ", c.shared_experts, ", expected >= 0");
    detail::require(!c.shared_gate || c.shared_experts >= 1,
                    "moe::Layer: shared_gate = true with shared_experts = 0, expected at least one shared expert");
    detail::require(!c.shared_expert || c.shared_experts >= 1,
                    "moe::Layer: shared_expert (the shared experts' Config) is set with shared_experts = 0, expected "
                    "at least one shared expert");
    return c;
  }

  // The checks of forward's arguments; fills the gate's noise.
  void check_forward(typename B::Context& ctx, ConstMatrixView<Scalar> x, Mode mode, const Noise<Scalar>& noise,
                     GateNoise<Scalar>& gate_noise) {
    const Index t_count = x.rows, d = config_.d_model, nz_cols = noise_columns();
    check_view(x, "moe::Layer::forward: input");
    detail::require(x.cols == d, "moe::Layer::forward: input has ", x.cols, " columns, expected d_model = ", d);
    if (config_.check_finite) detail::require_finite<B>(ctx, x, "moe::Layer::forward: input", check_);
    if (!gate_.needs_noise(mode)) return;
    detail::require(!noise.empty(), "moe::Layer::forward: the gate draws noise in training; pass a moe::Rng ",
                    "or an explicit noise matrix [T x noise_columns()] (or use Mode::inference)");
    if (noise.is_explicit()) {
      const auto z = noise.values();
      check_view(z, "moe::Layer::forward: noise");
      detail::require(z.rows == t_count && z.cols == nz_cols, "moe::Layer::forward: noise is ", z.rows, " x ", z.cols,
                      ", expected [T x noise_columns()] = ", t_count, " x ", nz_cols);
      if (config_.check_finite) detail::require_finite<B>(ctx, z, "moe::Layer::forward: noise", check_);
      gate_noise.values = z.data;
      gate_noise.stride = z.stride;
    } else {
      const Rng::Draw draw = noise.rng()->next();
      gate_noise.stream = draw.stream;
      gate_noise.step = draw.step;
    }
  }

  void check_backward(typename B::Context& ctx, const Forward& f, ConstMatrixView<Scalar> dy, Scalar aux_scale) {
    detail::require(f.valid(), "moe::Layer::backward: this Forward holds no forward pass; call forward first");
    detail::require(f.owner_ == id_, "moe::Layer::backward: this Forward was produced by another layer");
    const Index t_count = f.x_.rows(), d = config_.d_model;
    check_view(dy, "moe::Layer::backward: dy");
    detail::require(dy.rows == t_count && dy.cols == d, "moe::Layer::backward: dy is ", dy.rows, " x ", dy.cols,
                    ", expected the output's shape ", t_count, " x ", d);
    if (config_.check_finite) detail::require_finite<B>(ctx, dy, "moe::Layer::backward: dy", check_);
    detail::require(std::isfinite(static_cast<double>(aux_scale)), "moe::Layer::backward: aux_scale = ", aux_scale,
                    ", expected a finite value");
  }

  // Rank r's experts: blocks of whole first-level groups in a hierarchy (groups are the unit of
  // sharding), of experts at depth 1.
  static ExpertPlacement place_experts(const Config& c, int ranks) {
    if (ranks == 1) return {{0, c.n_experts}};
    Index unit = 1;
    if constexpr (Depth > 1) {
      const Index groups = c.gate.levels[0].branching;
      if (groups >= 1 && c.n_experts % groups == 0) unit = c.n_experts / groups;
    }
    return ExpertPlacement::even(c.n_experts, ranks, unit);
  }

  static ExpertGroup make_experts(const Config& c, const ExpertPlacement& p, int rank) {
    if (p.ranks() == 1) return ExpertGroup(c.expert, c.d_model, c.n_experts, c.seed);
    if constexpr (ShardableExpertFamily<Expert, B>) {
      return ExpertGroup(c.expert, c.d_model, p.count(rank), c.seed, ExpertShard{p.first(rank), c.n_experts});
    } else {
      detail::fail("moe::Layer: the expert family cannot hold a shard of the experts, needed with ", p.ranks(),
                   " ranks: give its Group a constructor (config, d_model, n_local, seed, moe::ExpertShard)");
    }
  }

  // Sharded: every rank shares `mine` (host values) and learns whether some rank refused its
  // arguments (then every rank throws) and whether all make the same call: mine[0] is the
  // rank's own (e.g. its batch size), the rest must be equal everywhere (e.g. the mode and the
  // call's index). Returns every rank's values, rank-major.
  std::vector<Index> agree(const char* call, const std::exception_ptr& refused, std::vector<Index> mine) {
    mine.insert(mine.begin(), refused ? 1 : 0);
    const std::size_t m = mine.size();
    const std::vector<Index> all = gather_host(mine);
    if (refused) std::rethrow_exception(refused);
    for (int r = 0; r < comm_.size(); ++r) {
      const Index* theirs = all.data() + static_cast<std::size_t>(r) * m;
      detail::require(theirs[0] == 0, "moe::Layer::", call, " on rank ", comm_.rank(), ": rank ", r,
                      " refused its arguments (its own error says why), so every rank stops this call");
      for (std::size_t i = 2; i < m; ++i)
        detail::require(theirs[i] == mine[i], "moe::Layer::", call, " on rank ", comm_.rank(), ": rank ", r,
                        " makes a different call (", theirs[i], " where this rank has ", mine[i],
                        "), expected every rank to make the same calls in the same order and mode");
    }
    std::vector<Index> values;  // without the flags
    for (int r = 0; r < comm_.size(); ++r)
      values.insert(values.end(), all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * m + 1),
                    all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r + 1) * m));
    return values;
  }

  // Host values through the communicator (whose buffers are backend memory).
  std::vector<Index> gather_host(const std::vector<Index>& mine) {
    typename B::Context ctx{context()};
    const auto m = static_cast<Index>(mine.size());
    from_host<B>(ctx, mine, comm_send_);
    comm_recv_.resize(m * comm_.size(), 1);
    B::synchronize(ctx);
    comm_.all_gather(reinterpret_cast<const std::byte*>(comm_send_.data()), m * static_cast<Index>(sizeof(Index)),
                     reinterpret_cast<std::byte*>(comm_recv_.data()));
    return to_host<B>(ctx, ConstMatrixView<Index>(comm_recv_.view()));
  }

  template <class T>
  void reduce_host(T* data, Index count) {
    typename B::Context ctx{context()};
    auto& buffer = reduce_buffer<T>();
    buffer.resize(count, 1);
    if (count == 0) return;
    B::copy(ctx, ConstMatrixView<T>{data, count, 1}, buffer.view());
    B::synchronize(ctx);
    comm_.all_reduce_sum(buffer.data(), count);
    B::copy(ctx, ConstMatrixView<T>(buffer.view()), MatrixView<T>{data, count, 1});
    B::synchronize(ctx);
  }
  template <class T>
  Buffer<T>& reduce_buffer() {
    if constexpr (std::is_same_v<T, Index>)
      return comm_send_;
    else
      return comm_scalar_;
  }

  // What a gate reduces over the ranks (a hierarchy's loads, a selection bias's counts).
  GateReduction<Scalar> reduction() {
    GateReduction<Scalar> r;
    r.sum = [this](Scalar* data, Index count) { reduce_host(data, count); };
    r.sum_index = [this](Index* data, Index count) { reduce_host(data, count); };
    return r;
  }

  // Every rank's routed rows per expert, then the exchange plan and the rows this rank's
  // experts compute.
  void plan_exchange(typename B::Context& ctx, Forward& f) {
    const Index n = config_.n_experts, d = config_.d_model;
    const std::vector<Index>& off = f.plan_.host_offsets();
    std::vector<Index> mine(static_cast<std::size_t>(n));
    for (std::size_t e = 0; e < mine.size(); ++e) mine[e] = off[e + 1] - off[e];
    const std::vector<Index> all = gather_host(mine);
    f.tokens_per_expert_.assign(static_cast<std::size_t>(n), 0);
    for (int r = 0; r < comm_.size(); ++r)
      for (std::size_t e = 0; e < mine.size(); ++e)
        f.tokens_per_expert_[e] += all[static_cast<std::size_t>(r) * mine.size() + e];
    f.exchange_.plan(ctx, all, placement_, comm_.rank());
    f.xe_.resize(f.exchange_.received(), d);
    f.ye_.resize(f.exchange_.received(), d);
    f.exchange_.to_experts(ctx, comm_, f.xs_.view(), f.xe_.view());
  }

  // Backward of a sharded layer: the replicated parameters' gradients so far are set aside and
  // zeroed, this call's are summed over the ranks, and the two added.
  void stash_replicated_grads(typename B::Context& ctx) {
    auto params = replicated_parameters();
    grad_stash_.resize(packed_size(params), 1);
    pack(ctx, params, grad_stash_);
    for (auto& p : params) B::fill(ctx, p.grad, Scalar(0));
  }
  void sum_replicated_grads(typename B::Context& ctx) {
    auto params = replicated_parameters();
    grad_sum_.resize(packed_size(params), 1);
    pack(ctx, params, grad_sum_);
    B::synchronize(ctx);
    comm_.all_reduce_sum(grad_sum_.data(), grad_sum_.rows());
    Index at = 0;
    for (auto& p : params) {
      detail::set_sum<B>(ctx, p.grad, grad_stash_.data() + at, grad_sum_.data() + at);
      at += p.grad.rows * p.grad.cols;
    }
  }
  static Index packed_size(const std::vector<Parameter<Scalar>>& params) {
    Index total = 0;
    for (const auto& p : params) total += p.grad.rows * p.grad.cols;
    return total;
  }
  static void pack(typename B::Context& ctx, const std::vector<Parameter<Scalar>>& params, Buffer<Scalar>& out) {
    Index at = 0;
    for (const auto& p : params) {
      B::copy(ctx, ConstMatrixView<Scalar>(p.grad), MatrixView<Scalar>{out.data() + at, p.grad.rows, p.grad.cols});
      at += p.grad.rows * p.grad.cols;
    }
  }

  // FNV-1a over the configuration that must match on every rank and the replicated weights.
  std::uint64_t replica_hash(typename B::Context& ctx) {
    std::uint64_t h = 14695981039346656037ull;
    const auto mix = [&h](const void* data, std::size_t bytes) {
      const auto* p = static_cast<const unsigned char*>(data);
      for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
    };
    const Index shape[] = {config_.d_model, config_.n_experts, config_.shared_experts, gate_.k(), noise_columns(),
                           Depth, static_cast<Index>(sizeof(Scalar)), config_.check_finite ? 1 : 0,
                           static_cast<Index>(config_.seed)};  // the experts' initialization
    mix(shape, sizeof shape);
    for (auto& p : parameters()) {
      const bool expert = p.name.rfind("experts.", 0) == 0;
      mix(p.name.data(), p.name.size());
      // An expert tensor's leading extent is the rank's expert count; the rest must match.
      for (std::size_t i = expert ? 1 : 0; i < p.shape.size(); ++i) mix(&p.shape[i], sizeof(Index));
      if (expert) continue;
      const std::vector<Scalar> values = to_host<B>(ctx, ConstMatrixView<Scalar>(p.value));
      mix(values.data(), values.size() * sizeof(Scalar));
    }
    return h;
  }

  static constexpr std::uint64_t kSharedSeed = 0x5348415245444558ull;      // shared experts' init stream
  static constexpr std::uint64_t kSharedGateSeed = 0x5348415245444741ull;  // shared gate's init stream

  // Shared experts: expert e sees every token, as rows [e T, (e + 1) T) of one grouped pass.
  void shared_forward(typename B::Context& ctx, Forward& f) const {
    const Index t_count = f.x_.rows(), d = config_.d_model, s_count = config_.shared_experts;
    auto& sh = f.shared_;
    sh.rows.resize(s_count * t_count, 1);
    sh.offsets.resize(s_count + 1, 1);
    detail::shared_rows<B>(ctx, s_count, t_count, sh.rows.data(), sh.offsets.data());
    sh.xs.resize(s_count * t_count, d);
    sh.ys.resize(s_count * t_count, d);
    B::gather_rows(ctx, f.x_.view(), sh.rows.data(), sh.xs.view());
    shared_->forward(ctx, sh.xs.view(), sh.offsets.data(), sh.ys.view(), sh.saved);
    if (!shared_gate_) return;
    sh.gate.resize(t_count, 1);
    shared_gate_->logits(ctx, f.x_.view(), nullptr, sh.gate.view());
    detail::sigmoid_in_place<B>(ctx, sh.gate.view());
  }

  void shared_backward(typename B::Context& ctx, const Forward& f, ConstMatrixView<Scalar> dy) {
    const Index rows = f.shared_.xs.rows(), d = config_.d_model;
    dysh_.resize(rows, d);
    dxsh_.resize(rows, d);
    B::gather_rows(ctx, dy, f.shared_.rows.data(), dysh_.view());
    if (shared_gate_) {
      dshared_gate_.resize(dy.rows, 1);
      detail::shared_gate_backward<B>(ctx, f.shared_.gate.data(), f.shared_.ys.data(), config_.shared_experts, dy,
                                      dysh_.view(), dshared_gate_.data());
    }
    shared_->backward(ctx, f.shared_.xs.view(), f.shared_.offsets.data(), f.shared_.saved, dysh_.view(), dxsh_.view());
  }

  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{0};
    return ++counter;
  }

  typename B::Context context() const { return make_context<B>(config_.threads); }

  void require_usable(const char* call) const {
    detail::require(id_ != 0, "moe::Layer::", call, ": this layer was moved from; use the layer it was moved to");
  }

  // A view the layer reads: a non-negative shape, data behind it, rows that do not overlap.
  static void check_view(ConstMatrixView<Scalar> m, const char* what) {
    detail::require(m.rows >= 0 && m.cols >= 0, what, " has the shape ", m.rows, " x ", m.cols,
                    ", expected non-negative extents");
    detail::require(m.data != nullptr || m.rows == 0 || m.cols == 0, what, " is ", m.rows, " x ", m.cols,
                    " with null data");
    detail::require(m.rows <= 1 || m.stride >= m.cols, what, " has the row stride ", m.stride,
                    ", expected at least its ", m.cols, " columns");
    if (m.rows > 0 && m.cols > 0) detail::require_readable<B>(m.data, what);
  }

  // MATH.md 3: Importance, Load, CV^2 and the weighted losses.
  BalanceStats<Scalar> balance(typename B::Context& ctx, Forward& f) {
    const Index n = config_.n_experts;
    BalanceStats<Scalar> st;
    const std::vector<Index>& off = f.plan_.host_offsets();
    st.tokens_per_expert.resize(static_cast<std::size_t>(n));
    for (std::size_t e = 0; e < static_cast<std::size_t>(n); ++e) st.tokens_per_expert[e] = off[e + 1] - off[e];
    // Computed on the backend, read back together behind one synchronization: the tokens with
    // no routed slot (no expert computed them), Importance, and the gate's smooth load.
    check_.resize(f.routing_.expert.rows(), 1);
    detail::unrouted_tokens<B>(ctx, f.routing_.expert.view(), check_.data());
    f.importance_.resize(n, 1);
    Index max_rows = 0;
    for (const Index rows : st.tokens_per_expert) max_rows = std::max(max_rows, rows);
    detail::importance_by_expert<B>(ctx, f.routing_.gate.data(), f.plan_.order.data(), f.plan_.offsets.data(), n,
                                    max_rows, f.importance_.data(), sum_scratch_);
    st.load_is_count = f.routing_.load_is_count;
    if (!st.load_is_count) {
      const Index entries = f.routing_.load.rows() * f.routing_.load.cols();
      detail::require(entries == n, "moe::Layer: the gate reported a load of ", entries,
                      " entries, expected n_experts = ", n);
    }
    if (sharded()) {
      // MATH.md 6: summed over the global batch before CV^2, in place in the Forward's backend
      // copies (backward differentiates those). A gate that reduced its load itself says so.
      B::synchronize(ctx);
      comm_.all_reduce_sum(f.importance_.data(), n);
      if (!st.load_is_count && !f.routing_.load_reduced) comm_.all_reduce_sum(f.routing_.load.data(), n);
      st.tokens_per_expert = f.tokens_per_expert_;
    }
    std::vector<Index> unrouted;
    std::vector<std::vector<Scalar>> deferred;  // the gate's loss terms
    {
      HostReads<B> reads(ctx);
      reads.add(ConstMatrixView<Index>(check_.view()), unrouted);
      reads.add(ConstMatrixView<Scalar>(f.importance_.view()), st.importance);
      if (!st.load_is_count) reads.add(ConstMatrixView<Scalar>(f.routing_.load.view()), st.load);
      queue_deferred_losses(reads, f.routing_, deferred);
      reads.wait();
    }
    for (const Index flag : unrouted) st.dropped_tokens += flag;
    if (st.load_is_count) st.load.assign(st.tokens_per_expert.begin(), st.tokens_per_expert.end());
    add_deferred_losses(f.routing_, deferred);
    st.loss_aux = f.routing_.loss_aux;
    st.loss_z = f.routing_.loss_z;
    if (sharded()) {
      // The gate's own losses: the token-weighted mean of the ranks' (the global mean for a
      // z-loss; per rank's batch for a Switch loss, as with GShard's groups).
      std::vector<Index> dropped{st.dropped_tokens};
      reduce_host(dropped.data(), 1);
      st.dropped_tokens = dropped[0];
      std::vector<Scalar> own{f.own_loss_share_ * st.loss_aux, f.own_loss_share_ * st.loss_z};
      reduce_host(own.data(), 2);
      st.loss_aux = own[0];
      st.loss_z = own[1];
    }
    const BalanceWeights w = gate_.balance_weights();
    st.cv2_importance = cv_squared(st.importance);
    st.cv2_load = cv_squared(st.load);
    st.loss_importance = static_cast<Scalar>(w.w_importance) * st.cv2_importance;
    st.loss_load = static_cast<Scalar>(w.w_load) * st.cv2_load;
    st.loss = st.loss_importance + st.loss_load + st.loss_aux + st.loss_z;
    st.levels = f.routing_.levels;
    return st;
  }

  Config config_;
  Comm comm_;
  ExpertPlacement placement_;
  GatePolicy gate_;
  ExpertGroup experts_;
  std::optional<ExpertGroup> shared_;
  std::optional<gate::RouterWeight<B>> shared_gate_;  // w [d x 1] of the shared experts' gate
  std::uint64_t id_;
  Buffer<Scalar> dys_, dxs_, dgate_, dysh_, dxsh_, dshared_gate_;  // backward workspace, reused across calls
  Buffer<Scalar> dimportance_, dload_;  // gradients of the balancing losses
  Buffer<Index> check_;                              // flags of the input and routing checks
  Buffer<Scalar> sum_scratch_;                       // segment_sums' partial sums
  // Sharded: the experts' gradient rows, the replicated gradients set aside and summed, and the
  // communicator's staging buffers.
  Buffer<Scalar> dye_, dxe_, grad_stash_, grad_sum_, comm_scalar_;
  Buffer<Index> comm_send_, comm_recv_;
  std::uint64_t forward_calls_ = 0;  // forward calls so far: every rank's must match
};

}  // namespace moe
