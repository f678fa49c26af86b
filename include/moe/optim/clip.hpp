#pragma once
// Gradient clipping by global norm (as torch.nn.utils.clip_grad_norm_): the L2 norm of all the
// gradients together, and every gradient scaled by max_norm / norm when the norm is above max_norm.
//
//   layer.backward(f, dy);
//   const double norm = moe::optim::clip_grad_norm(layer, 1.0);  // the norm before clipping
//   adam.step(layer.parameters());
//
// The norm is computed in double on the backend, in a fixed order: each parameter (each expert's
// slice of a stacked "experts.*" or "shared_experts.*" parameter on its own) in chunks of
// kNormChunk elements, then the chunks' sums on the host in order. The result does not depend on
// the thread count, and for a layer sharded across processes not on the rank count either: the
// layer overloads sum each rank's own experts over the ranks through the layer's communicator,
// count the replicated parameters (the gate, the shared experts) once, and every rank gets the
// same bits, so every rank scales its replicated gradients alike. They are collective calls then.
//
// A non-finite norm (a NaN or Inf gradient, or a square that overflows double) is an Error from
// clip_grad_norm naming the first parameter (and expert) at fault, with the gradients left as they
// were; grad_norm returns it without a check, to skip such a step instead (as mixed-precision loss
// scaling does). Unlike torch, the scale is max_norm / norm exactly (no 1e-6 added to the norm)
// and gradients are left untouched, bit for bit, when the norm is at most max_norm.

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "moe/backend.hpp"
#include "moe/error.hpp"
#include "moe/parameter.hpp"

namespace moe {

namespace optim {

// Elements per chunk of the sum of squares (a chunk's squares are summed in order by one item).
inline constexpr Index kNormChunk = 1024;

}  // namespace optim

namespace detail {

// (In moe::detail, not moe::optim::detail: the optimizers' headers name moe::detail's require
// as detail::require from inside moe::optim.)

// Whether p is a stack of experts ("experts.w1" [n, d, h], "shared_experts.w1"): its slices are
// summed one by one, the unit a sharded layer distributes.
template <class S>
bool stacked_parameter(const Parameter<S>& p) {
  return !p.shape.empty() && (p.name.rfind("experts.", 0) == 0 || p.name.rfind("shared_experts.", 0) == 0);
}

// One part of the norm: a parameter, or one expert of a stacked parameter.
struct NormPart {
  std::size_t parameter;
  Index expert;  // -1: the whole parameter
};

// The sums of squares of the gradients, one per part (described in `parts`), in a fixed global
// order: the parameters in turn, a stacked parameter as one part per expert. The routed experts
// ("experts.*") are n_experts parts (0: as many as the parameter holds), of which this process
// holds [first_expert, first_expert + shape[0]); the parts it does not hold are 0, and so are the
// other parameters' when own_replicated is false (a sharded layer's rank other than 0).
template <Backend B>
std::vector<double> squared_norm_parts(typename B::Context& ctx, const std::vector<Parameter<typename B::Scalar>>& params,
                                       Index first_expert, Index n_experts, bool own_replicated, const char* who,
                                       std::vector<NormPart>& parts) {
  using S = typename B::Scalar;
  // Where each parameter's parts and chunks start.
  struct Plan {
    Index part_begin, slices, per_slice, chunks_per_slice, chunk_begin, first;
    bool held;
  };
  std::vector<Plan> plans;
  Index part_count = 0, chunk_count = 0;
  parts.clear();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    require(p.grad.contiguous(), who, ": the gradient of parameter ", p.name, " is not contiguous");
    const bool stacked = stacked_parameter(p);
    const bool routed = stacked && p.name.rfind("experts.", 0) == 0;
    const Index slices = stacked ? p.shape[0] : 1;
    const Index global = routed && n_experts > 0 ? n_experts : slices, first = routed && n_experts > 0 ? first_expert : 0;
    require(first >= 0 && first + slices <= global, who, ": parameter ", p.name, " holds experts [", first, ", ",
            first + slices, "), expected within the layer's ", global);
    const Index per = slices > 0 ? p.size() / slices : 0;
    const Index cps = (per + optim::kNormChunk - 1) / optim::kNormChunk;
    const bool held = (routed && n_experts > 0) || own_replicated;
    plans.push_back({part_count, slices, per, cps, chunk_count, first, held});
    for (Index e = 0; e < (stacked ? global : 1); ++e) parts.push_back({i, stacked ? e : Index{-1}});
    part_count += stacked ? global : 1;
    if (held) chunk_count += slices * cps;
  }
  typename B::template Buffer<double> partial;
  partial.resize(chunk_count, 1);
  double* out = partial.data();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Plan& pl = plans[i];
    if (!pl.held || pl.slices * pl.chunks_per_slice == 0) continue;
    const S* g = params[i].grad.data;
    const Index per = pl.per_slice, cps = pl.chunks_per_slice, chunk = optim::kNormChunk;
    double* o = out + pl.chunk_begin;
    B::for_each(ctx, pl.slices * cps, [=] MOE_HD(Index c) {
      const Index slice = c / cps, j = c % cps;
      const Index lo = slice * per + j * chunk, hi = slice * per + (j + 1 == cps ? per : (j + 1) * chunk);
      double acc = 0;
      for (Index e = lo; e < hi; ++e) {
        const double v = static_cast<double>(g[e]);
        acc += v * v;
      }
      o[c] = acc;
    });
  }
  const std::vector<double> chunks = to_host<B>(ctx, ConstMatrixView<double>(partial.view()));
  std::vector<double> sums(static_cast<std::size_t>(part_count), 0.0);
  for (const Plan& pl : plans) {
    if (!pl.held) continue;
    for (Index s = 0; s < pl.slices; ++s) {
      double acc = 0;
      for (Index j = 0; j < pl.chunks_per_slice; ++j)
        acc += chunks[static_cast<std::size_t>(pl.chunk_begin + s * pl.chunks_per_slice + j)];
      sums[static_cast<std::size_t>(pl.part_begin + pl.first + s)] = acc;
    }
  }
  return sums;
}

// The norm from the parts' sums (in order); an Error naming the first non-finite part when
// `check` and the norm is not finite.
template <class S>
double norm_of_parts(const std::vector<double>& sums, const std::vector<NormPart>& parts,
                     const std::vector<Parameter<S>>& params, bool check, const char* who) {
  double total = 0;
  for (const double s : sums) total += s;
  const double norm = std::sqrt(total);
  if (!check || std::isfinite(norm)) return norm;
  for (std::size_t i = 0; i < sums.size(); ++i) {
    if (std::isfinite(sums[i])) continue;
    const NormPart& part = parts[i];
    fail(who, ": the gradients' global norm is ", norm, ": the sum of squares of the gradient of ",
         params[part.parameter].name, part.expert >= 0 ? concat(" (expert ", part.expert, ")") : std::string(),
         " is ", sums[i],
         ", expected finite gradients (a NaN or Inf, or values whose squares overflow double); the gradients are "
         "left as they were (optim::grad_norm returns the norm without this check)");
  }
  fail(who, ": the gradients' global norm is ", norm, ", expected a finite norm (the sum of squares overflows double)");
}

// Scales every gradient by max_norm / norm when norm > max_norm.
template <Backend B>
void scale_gradients(typename B::Context& ctx, const std::vector<Parameter<typename B::Scalar>>& params, double norm,
                     double max_norm) {
  using S = typename B::Scalar;
  if (!(norm > max_norm)) return;
  const S scale = static_cast<S>(max_norm / norm);
  for (const auto& p : params) {
    S* g = p.grad.data;
    B::for_each(ctx, p.size(), [=] MOE_HD(Index i) { g[i] *= scale; });
  }
  B::synchronize(ctx);
}

inline void check_max_norm(double max_norm) {
  require(std::isfinite(max_norm) && max_norm > 0, "optim::clip_grad_norm: max_norm = ", max_norm,
          ", expected a finite value > 0");
}

// A layer (moe::Layer or one like it): parameters, the expert shard and the communicator.
template <class L>
concept NormLayer = requires(L& layer) {
  typename L::Backend;
  layer.parameters();
  layer.expert_shard();
  layer.sharded();
  layer.communicator();
  layer.config().threads;
  layer.config().n_experts;
};

// The global norm of a layer's gradients (see the top of this file); every rank the same bits.
template <class L>
double layer_grad_norm(L& layer, bool check, const char* who) {
  using B = typename L::Backend;
  typename B::Context ctx = make_context<B>(layer.config().threads);
  const auto params = layer.parameters();
  const bool sharded = layer.sharded();
  std::vector<NormPart> parts;
  // Sharded, the replicated parameters are rank 0's (every rank holds the same), each rank's
  // experts its own: every part is non-zero on one rank only, so the sum over the ranks is exact.
  std::vector<double> sums =
      squared_norm_parts<B>(ctx, params, layer.expert_shard().first, layer.config().n_experts,
                            !sharded || layer.communicator().rank() == 0, who, parts);
  if (sharded && !sums.empty()) {
    typename B::template Buffer<double> buffer;
    from_host<B>(ctx, sums, buffer);
    B::synchronize(ctx);
    layer.communicator().all_reduce_sum(buffer.data(), static_cast<Index>(sums.size()));
    sums = to_host<B>(ctx, ConstMatrixView<double>(buffer.view()));
  }
  return norm_of_parts(sums, parts, params, check, who);
}

}  // namespace detail

namespace optim {

// The global L2 norm of the parameters' gradients (backend memory), in double. Not checked: NaN
// or Inf when a gradient is. threads: CPU threads (0: all that OpenMP offers).
template <Backend B>
double grad_norm(const std::vector<Parameter<typename B::Scalar>>& params, int threads = 0) {
  typename B::Context ctx = make_context<B>(threads);
  std::vector<moe::detail::NormPart> parts;
  const auto sums = moe::detail::squared_norm_parts<B>(ctx, params, 0, 0, true, "optim::grad_norm", parts);
  return moe::detail::norm_of_parts(sums, parts, params, false, "optim::grad_norm");
}

// Scales the gradients by max_norm / norm when their global norm is above max_norm; returns the
// norm before clipping. Errors: max_norm not finite or <= 0, a non-finite norm (naming the
// parameter; nothing is scaled). These are this process's parameters: for a layer sharded across
// processes, clip the layer (below) to clip by the norm of the whole layer.
template <Backend B>
double clip_grad_norm(const std::vector<Parameter<typename B::Scalar>>& params, double max_norm, int threads = 0) {
  moe::detail::check_max_norm(max_norm);
  typename B::Context ctx = make_context<B>(threads);
  std::vector<moe::detail::NormPart> parts;
  const auto sums = moe::detail::squared_norm_parts<B>(ctx, params, 0, 0, true, "optim::clip_grad_norm", parts);
  const double norm = moe::detail::norm_of_parts(sums, parts, params, true, "optim::clip_grad_norm");
  moe::detail::scale_gradients<B>(ctx, params, norm, max_norm);
  return norm;
}

// The same over a layer's parameters, with its thread count. Sharded across processes, the norm
// of the whole layer (every rank's experts, the replicated parameters once), the same on every
// rank: a collective call, which every rank makes with the same max_norm.
template <moe::detail::NormLayer L>
double grad_norm(L& layer) {
  return moe::detail::layer_grad_norm(layer, false, "optim::grad_norm");
}

template <moe::detail::NormLayer L>
double clip_grad_norm(L& layer, double max_norm) {
  moe::detail::check_max_norm(max_norm);
  using B = typename L::Backend;
  const double norm = moe::detail::layer_grad_norm(layer, true, "optim::clip_grad_norm");
  typename B::Context ctx = make_context<B>(layer.config().threads);
  moe::detail::scale_gradients<B>(ctx, layer.parameters(), norm, max_norm);
  return norm;
}

}  // namespace optim
}  // namespace moe
