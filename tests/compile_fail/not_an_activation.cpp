// expect: Act is not an activation
// An activation without a name and a derivative: the expert says what an activation needs,
// in one diagnostic.
#include <cmath>
#include <moe/backend/cpu.hpp>
#include <moe/moe.hpp>

struct Tanh {
  template <class S>
  static S f(S x) {
    return std::tanh(x);
  }
};

int main() { moe::Layer<moe::expert::FeedForwardWith<Tanh>, moe::gate::TopK, moe::backend::Cpu<float>> layer({}); }
