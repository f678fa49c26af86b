#pragma once
// The GatePolicy concept: how tokens choose experts. A gate fills, for each token, k expert
// indices and k gate values (in the order the combine sums them), and the load vector when it
// has a smooth estimator of its own (MATH.md 3); the layer derives Importance, counts, CV^2
// and the losses from those, so a custom gate stays short.

#include <concepts>
#include <cstdint>
#include <vector>

#include "moe/backend.hpp"
#include "moe/balance.hpp"
#include "moe/mode.hpp"
#include "moe/parameter.hpp"
#include "moe/random.hpp"

namespace moe {

// The noise z a gate draws for (token, expert): explicit values [T x n] or a counter stream.
template <class S>
struct GateNoise {
  const S* values = nullptr;  // explicit z, row-major with the given stride, or null
  Index stride = 0;
  CounterRandom stream{};
  std::uint64_t step = 0;

  MOE_HD S at(Index token, Index expert) const {
    if (values != nullptr) return values[token * stride + expert];
    return static_cast<S>(stream.normal(static_cast<std::uint64_t>(token), static_cast<std::uint32_t>(expert),
                                        static_cast<std::uint32_t>(step)));
  }
};

// What a gate's forward produces.
template <class B>
struct GateRouting {
  using S = typename B::Scalar;
  typename B::template Buffer<Index> expert;  // [T x k] expert of each slot, no repeats per token
  typename B::template Buffer<S> gate;        // [T x k] gate value of each slot
  std::vector<S> load;                        // [n] smooth load, when !load_is_count
  bool load_is_count = true;                  // the layer then uses the hard counts
};

// A gate policy G for backend B provides:
//   G::Saved                     what its backward needs from its forward
//   k(), n_experts()             slots per token and expert count
//   needs_noise(mode)            whether forward reads the GateNoise
//   balance_weights()            w_importance and w_load (MATH.md 3)
//   forward(ctx, x, mode, noise, routing, saved)
//   backward(ctx, x, saved, dgate [T x k], dload [n] or null, dx [T x d], accumulated)
//     adds its parameters' gradients into their grad storage
//   parameters()                 its named parameters
// clang-format off
template <class G, class B>
concept GatePolicy =
    Backend<B> && requires { typename G::Saved; } && std::default_initializable<typename G::Saved> &&
    requires(G& g, const G& cg, typename B::Context& ctx, ConstMatrixView<typename B::Scalar> x, Mode mode,
             const GateNoise<typename B::Scalar>& noise, GateRouting<B>& routing, typename G::Saved& saved,
             const typename G::Saved& csaved, ConstMatrixView<typename B::Scalar> dgate,
             const typename B::Scalar* dload, MatrixView<typename B::Scalar> dx) {
      { cg.k() } -> std::convertible_to<Index>;
      { cg.n_experts() } -> std::convertible_to<Index>;
      { cg.needs_noise(mode) } -> std::convertible_to<bool>;
      { cg.balance_weights() } -> std::convertible_to<BalanceWeights>;
      g.forward(ctx, x, mode, noise, routing, saved);
      g.backward(ctx, x, csaved, dgate, dload, dx);
      { g.parameters() } -> std::same_as<std::vector<Parameter<typename B::Scalar>>>;
    };
// clang-format on

// A gate family: a tag with a Config and a Policy<B> built from (config, d_model, n_experts, seed).
// clang-format off
template <class Gate, class B>
concept GateFamily = requires { typename Gate::Config; typename Gate::template Policy<B>; } &&
                     std::constructible_from<typename Gate::template Policy<B>, const typename Gate::Config&,
                                             Index, Index, std::uint64_t> &&
                     GatePolicy<typename Gate::template Policy<B>, B>;
// clang-format on

}  // namespace moe
