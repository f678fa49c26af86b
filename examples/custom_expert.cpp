// A user-defined expert: the gated linear unit E(x) = (x W_a * sigmoid(x W_b)) W_o (Dauphin et al.,
// 2017), written for one expert with Eigen; moe::expert::PerExpert turns it into an expert group.
// Checks its backward with the installed gradient checker (moe/testing/gradcheck.hpp), then
// trains it on a toy regression.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "example_support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/expert/per_expert.hpp"
#include "moe/gate/noisy_top_k.hpp"
#include "moe/layer.hpp"
#include "moe/optim/adam.hpp"
#include "moe/testing/gradcheck.hpp"

namespace {

using example::eigen, example::expect, example::Matrix, example::random_matrix;
using moe::Index;
using moe::expert::Grads, moe::expert::In, moe::expert::Out, moe::expert::Weights;
template <class S>
using Dense = moe::backend::cpu::RowMatrix<S>;

struct Glu {
  struct Config {
    Index hidden = 0;
  };

  static std::vector<moe::expert::ParamSpec> parameters(const Config& c, Index d) {
    return {{.name = "w_a", .rows = d, .cols = c.hidden},
            {.name = "w_b", .rows = d, .cols = c.hidden},
            {.name = "w_o", .rows = c.hidden, .cols = d}};
  }

  template <class S>
  static void forward(const Config&, Weights<S> w, In<S> x, Out<S> y) {
    const Dense<S> s = (x * w[1]).array().logistic();
    y.noalias() = (x * w[0]).cwiseProduct(s) * w[2];
  }

  // PerExpert keeps nothing between the calls, so the activations are recomputed from x.
  template <class S>
  static void backward(const Config&, Weights<S> w, In<S> x, In<S> dy, Out<S> dx, Grads<S> g) {
    const Dense<S> a = x * w[0], s = (x * w[1]).array().logistic(), du = dy * w[2].transpose();
    const Dense<S> da = du.cwiseProduct(s);
    const Dense<S> db = du.array() * a.array() * s.array() * (1 - s.array());  // sigmoid' = s (1 - s)
    g[0].noalias() += x.transpose() * da;
    g[1].noalias() += x.transpose() * db;
    g[2].noalias() += a.cwiseProduct(s).transpose() * dy;
    dx.noalias() = da * w[0].transpose() + db * w[1].transpose();
  }
};

using Cpu = moe::backend::Cpu<double>;
using Model = moe::Layer<moe::expert::PerExpert<Glu>, moe::gate::NoisyTopK, Cpu>;

}  // namespace

int main() {
  try {
    constexpr Index kD = 8, kExperts = 4, kTokens = 16;
    Model layer({.d_model = kD, .n_experts = kExperts, .expert = {.hidden = 6}, .gate = {.k = 2}, .seed = 7});
    // Random gate weights (they start at zero, so every logit would tie), so that routing depends
    // on x and the input's gradient has a gate share beside the experts' share. The installed
    // gradient checker compares backward with central differences for the input and every
    // parameter, the gate's noise drawn once and held fixed.
    for (auto& p : layer.parameters())
      if (p.name == "gate.w_gate") eigen(p.value) = eigen(random_matrix(kD, kExperts, 4, 0.5).view());
    Matrix x = random_matrix(kTokens, kD, 1);
    const Matrix r = random_matrix(kTokens, kD, 3);
    const moe::testing::GradCheckReport report = moe::testing::check_gradients(layer, x.view(), r.view());
    std::printf("%s", report.to_string().c_str());
    if (!expect(report.passed(), "relative errors below 1e-6")) return 1;

    // Toy regression y = tanh(x M) on a fixed batch, from a fresh layer.
    constexpr Index kBatch = 512;
    Model model({.d_model = kD, .n_experts = kExperts, .expert = {.hidden = 16}, .gate = {.k = 2}, .seed = 1});
    moe::optim::Adam<Cpu> adam({.lr = 1e-2});
    moe::Rng noise(11);
    const Matrix inputs = random_matrix(kBatch, kD, 5), m = random_matrix(kD, kD, 6, 1.0 / std::sqrt(kD));
    const Dense<double> target = (eigen(inputs.view()) * eigen(m.view())).array().tanh();
    Matrix dy(kBatch, kD);
    double first = 0, mse = 0;
    for (int step = 0; step <= 100; ++step) {
      const auto f = model.forward(inputs.view(), moe::Mode::train, noise);
      const Dense<double> error = eigen(f.y()) - target;
      mse = error.squaredNorm() / static_cast<double>(error.size());
      eigen(dy.view()) = 2 * error / static_cast<double>(error.size());
      if (step == 0) first = mse;
      if (step % 20 == 0) std::printf("step %3d  MSE %.5f  balancing loss %.5f\n", step, mse, f.loss());
      model.zero_grad();
      model.backward(f, dy.view());
      adam.step(model.parameters());
    }
    return expect(mse < 0.25 * first, "the MSE falls below a quarter of its start") ? 0 : 1;
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe::Error: %s\n", e.what());
    return 1;
  }
}
