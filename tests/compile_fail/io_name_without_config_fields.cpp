// expect: has no field list
// An expert that names itself for checkpoints but does not list its Config's fields: saving it
// would write a file that cannot be loaded, so it does not compile.
#include <moe/backend/cpu.hpp>
#include <moe/expert/per_expert.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>

#include <vector>

struct Unlisted {
  static constexpr const char* io_name = "Unlisted";
  struct Config {
    moe::Index hidden = 4;
  };
  static std::vector<moe::expert::ParamSpec> parameters(const Config&, moe::Index d) { return {{"w", d, d}}; }
  template <class S>
  static void forward(const Config&, moe::expert::Weights<S> w, moe::expert::In<S> x, moe::expert::Out<S> y) {
    y.noalias() = x * w[0];
  }
  template <class S>
  static void backward(const Config&, moe::expert::Weights<S> w, moe::expert::In<S> x, moe::expert::In<S> dy,
                       moe::expert::Out<S> dx, moe::expert::Grads<S> g) {
    g[0].noalias() += x.transpose() * dy;
    dx.noalias() = dy * w[0].transpose();
  }
};

int main() {
  moe::Layer<moe::expert::PerExpert<Unlisted>, moe::gate::TopK, moe::backend::Cpu<float>> layer(
      {.d_model = 4, .n_experts = 2, .gate = {.k = 1}});
  moe::io::save(layer, "unlisted.safetensors");
}
