#pragma once
// moe::expert::PerExpert<E>: turns a simple expert, written for one expert and one batch of
// its tokens with Eigen, into an ExpertGroup for the CPU backend. E provides:
//
//   struct Config { ... };
//   static std::vector<moe::expert::ParamSpec> parameters(const Config&, moe::Index d_model);
//   template <class S> static void forward(const Config&, moe::expert::Weights<S> w,
//                                          moe::expert::In<S> x, moe::expert::Out<S> y);
//   template <class S> static void backward(const Config&, moe::expert::Weights<S> w,
//                                           moe::expert::In<S> x, moe::expert::In<S> dy,
//                                           moe::expert::Out<S> dx, moe::expert::Grads<S> g);
//
// x, dy: [m x d] the expert's tokens; y, dx: [m x d] to overwrite; g[i] is the gradient of
// parameter i, to add into. The adapter stacks every parameter over the experts as
// "experts.<name>" with shape [n, rows, cols], and runs the experts in parallel. backward
// recomputes from x what it needs (no state is kept between the calls). To be saved and loaded
// (moe/io/checkpoint.hpp), E names itself (static constexpr const char* io_name) and its Config
// has a field list (config_fields, moe/io/config.hpp).

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/error.hpp"
#include "moe/expert_group.hpp"

namespace moe::expert {

// One parameter of one expert: [rows x cols], initialized uniform in
// (-1/sqrt(rows), 1/sqrt(rows)] (fan-in) or to zero.
struct ParamSpec {
  enum class Init { fan_in, zero };
  std::string name;
  Index rows = 0;
  Index cols = 0;
  Init init = Init::fan_in;
};

template <class S>
using In = backend::cpu::ConstMap<S>;
template <class S>
using Out = backend::cpu::Map<S>;

// The parameters of one expert, in the order of E::parameters(), as Eigen maps.
template <class S>
class Weights {
 public:
  explicit Weights(std::vector<In<S>> maps) : maps_(std::move(maps)) {}
  const In<S>& operator[](std::size_t i) const { return maps_[i]; }

 private:
  std::vector<In<S>> maps_;
};

template <class S>
class Grads {
 public:
  explicit Grads(std::vector<Out<S>> maps) : maps_(std::move(maps)) {}
  Out<S>& operator[](std::size_t i) { return maps_[i]; }

 private:
  std::vector<Out<S>> maps_;
};

// PerExpert<E> is saved and loaded under E's name (E::io_name), when E has one.
template <class E>
struct PerExpertName {};
template <class E>
  requires requires { E::io_name; }
struct PerExpertName<E> {
  static constexpr const char* io_name = E::io_name;
};

template <class E>
struct PerExpert : PerExpertName<E> {
  using Config = typename E::Config;
  template <Backend B>
  class Group;
};

template <class E>
template <Backend B>
class PerExpert<E>::Group {
  static_assert(backend::is_cpu<B>, "expert::PerExpert runs on the CPU backend only (moe::backend::Cpu<S>)");
  using S = typename B::Scalar;

 public:
  struct Saved {};

  // shard: which experts of a sharded layer this group holds (default: all of them).
  Group(const Config& config, Index d_model, Index n_experts, std::uint64_t seed, ExpertShard shard = {})
      : config_(config), d_(d_model), n_(n_experts), specs_(E::parameters(config, d_model)) {
    detail::require(n_experts >= 1, "expert::PerExpert: n_experts = ", n_experts, ", expected at least 1");
    typename B::Context ctx;
    const Index first = detail::shard_first(shard, n_, "expert::PerExpert");
    for (const auto& s : specs_) {
      detail::require(s.rows >= 1 && s.cols >= 1, "expert::PerExpert: parameter ", s.name, " is ", s.rows, " x ",
                      s.cols, ", expected both extents >= 1");
      values_.emplace_back(n_ * s.rows, s.cols, S(0));
      grads_.emplace_back(n_ * s.rows, s.cols, S(0));
      if (s.init == ParamSpec::Init::fan_in)
        detail::init_uniform<B>(ctx, values_.back().view(), seed, "experts." + s.name,
                                1.0 / std::sqrt(static_cast<double>(s.rows)), first * s.rows * s.cols);
    }
  }

  [[nodiscard]] Index n_experts() const { return n_; }

  void forward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, MatrixView<S> ys, Saved&) const {
    check_width(xs, "forward");
    backend::cpu::parallel_for(ctx.threads, n_, [&](Index e) {
      const Index r0 = offsets[e], m = offsets[e + 1] - r0;
      if (m == 0) return;
      Out<S> y = backend::cpu::eigen(ys.block_rows(r0, m));
      E::template forward<S>(config_, weights(e), backend::cpu::eigen(xs.block_rows(r0, m)), y);
    });
  }

  void backward(typename B::Context& ctx, ConstMatrixView<S> xs, const Index* offsets, const Saved&,
                ConstMatrixView<S> dys, MatrixView<S> dxs) {
    check_width(xs, "backward");
    backend::cpu::parallel_for(ctx.threads, n_, [&](Index e) {
      const Index r0 = offsets[e], m = offsets[e + 1] - r0;
      if (m == 0) return;
      Out<S> dx = backend::cpu::eigen(dxs.block_rows(r0, m));
      E::template backward<S>(config_, weights(e), backend::cpu::eigen(xs.block_rows(r0, m)),
                              backend::cpu::eigen(dys.block_rows(r0, m)), dx, grads(e));
    });
  }

  [[nodiscard]] std::vector<Parameter<S>> parameters() {
    std::vector<Parameter<S>> p;
    for (std::size_t i = 0; i < specs_.size(); ++i)
      p.push_back(
          {"experts." + specs_[i].name, {n_, specs_[i].rows, specs_[i].cols}, values_[i].view(), grads_[i].view()});
    return p;
  }

 private:
  void check_width(ConstMatrixView<S> xs, const char* call) const {
    detail::require(xs.cols == d_, "expert::PerExpert::", call, ": rows have ", xs.cols,
                    " columns, expected d_model = ", d_);
  }

  Weights<S> weights(Index e) const {
    std::vector<In<S>> maps;
    for (std::size_t i = 0; i < specs_.size(); ++i)
      maps.push_back(backend::cpu::eigen(values_[i].view().block_rows(e * specs_[i].rows, specs_[i].rows)));
    return Weights<S>(std::move(maps));
  }

  Grads<S> grads(Index e) {
    std::vector<Out<S>> maps;
    for (std::size_t i = 0; i < specs_.size(); ++i)
      maps.push_back(backend::cpu::eigen(grads_[i].view().block_rows(e * specs_[i].rows, specs_[i].rows)));
    return Grads<S>(std::move(maps));
  }

  Config config_;
  Index d_, n_;
  std::vector<ParamSpec> specs_;
  std::vector<typename B::template Buffer<S>> values_, grads_;
};

}  // namespace moe::expert
