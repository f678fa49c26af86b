// expect: expert::PerExpert runs on the CPU backend only
#include <moe/backend/cpu.hpp>
#include <moe/expert/per_expert.hpp>
#include <moe/moe.hpp>

struct Identity {
  struct Config {};
  static std::vector<moe::expert::ParamSpec> parameters(const Config&, moe::Index d) { return {{"w", 1, d}}; }
  template <class S>
  static void forward(const Config&, moe::expert::Weights<S>, moe::expert::In<S> x, moe::expert::Out<S> y) {
    y = x;
  }
  template <class S>
  static void backward(const Config&, moe::expert::Weights<S>, moe::expert::In<S>, moe::expert::In<S> dy,
                       moe::expert::Out<S> dx, moe::expert::Grads<S>) {
    dx = dy;
  }
};

// A backend that is not the CPU one, with the CPU's primitives.
struct OtherBackend : moe::backend::Cpu<float> {};

int main() { moe::expert::PerExpert<Identity>::Group<OtherBackend> group({}, 4, 2, 0); }
