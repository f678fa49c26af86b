// A program built outside moe's own build, the way a user's is: a layer's forward and backward
// through the installed headers (or the subproject's), a checkpoint round trip in memory
// (moe/io, which needs nlohmann-json from the same flags), and the gradient checker
// (moe/testing/gradcheck.hpp) on a double layer. Exits non-zero when an output has the wrong
// shape or is not finite, the reloaded layer computes something else, or the check fails.
#include <moe/backend/cpu.hpp>
#include <moe/io/checkpoint.hpp>
#include <moe/moe.hpp>
#include <moe/testing/gradcheck.hpp>

#include <cmath>
#include <cstdio>
#include <exception>

using B = moe::backend::Cpu<float>;
using Moe = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, B>;

namespace {

bool check(const char* name, moe::ConstMatrixView<float> m, moe::Index rows, moe::Index cols) {
  if (m.rows != rows || m.cols != cols) {
    std::fprintf(stderr, "%s: shape %td x %td, expected %td x %td\n", name, m.rows, m.cols, rows, cols);
    return false;
  }
  for (moe::Index r = 0; r < m.rows; ++r)
    for (moe::Index c = 0; c < m.cols; ++c)
      if (!std::isfinite(m(r, c))) {
        std::fprintf(stderr, "%s(%td, %td) = %g, expected a finite value\n", name, r, c, double(m(r, c)));
        return false;
      }
  return true;
}

}  // namespace

int main() {
  constexpr moe::Index tokens = 32, d = 8;
  try {
    Moe layer({.d_model = d, .n_experts = 4, .expert = {.hidden = 16}, .gate = {.k = 2}, .seed = 1});
    moe::Rng noise(7);
    moe::backend::HostMatrix<float> x(tokens, d);
    for (moe::Index t = 0; t < tokens; ++t)
      for (moe::Index c = 0; c < d; ++c) x(t, c) = std::sin(float(t * d + c));
    auto f = layer.forward(x.view(), moe::Mode::train, noise);
    moe::backend::HostMatrix<float> dy(tokens, d, 1e-2f);
    layer.zero_grad();
    auto b = layer.backward(f, dy.view());
    bool ok = check("y", f.y(), tokens, d) && check("dx", b.dx.view(), tokens, d);
    if (!std::isfinite(f.loss())) {
      std::fprintf(stderr, "balance loss %g, expected a finite value\n", double(f.loss()));
      ok = false;
    }
    // The checkpoint's bytes, parsed and loaded into a layer of another seed: the same output.
    Moe other({.d_model = d, .n_experts = 4, .expert = {.hidden = 16}, .gate = {.k = 2}, .seed = 2});
    moe::io::load(other, moe::io::SafeTensors::parse(moe::io::checkpoint(layer).bytes()));
    const auto y1 = layer.forward(x.view(), moe::Mode::inference);
    const auto y2 = other.forward(x.view(), moe::Mode::inference);
    for (moe::Index t = 0; t < tokens; ++t)
      for (moe::Index c = 0; c < d; ++c)
        if (y1.y()(t, c) != y2.y()(t, c)) {
          std::fprintf(stderr, "reloaded layer: y(%td, %td) = %g, expected %g\n", t, c, double(y2.y()(t, c)),
                       double(y1.y()(t, c)));
          ok = false;
        }
    // The installed gradient checker on a small double layer (the gate's noise drawn and held).
    using Checked = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, moe::backend::Cpu<double>>;
    Checked small({.d_model = 3, .n_experts = 4, .expert = {.hidden = 4}, .gate = {.k = 2}, .seed = 3});
    moe::backend::HostMatrix<double> xs(6, 3), dys(6, 3);
    for (moe::Index i = 0; i < 18; ++i) {
      xs[i] = std::sin(double(i) + 0.5);
      dys[i] = std::cos(double(i));
    }
    const moe::testing::GradCheckReport report = moe::testing::check_gradients(small, xs, dys);
    if (!report.passed()) {
      std::fprintf(stderr, "%s", report.to_string().c_str());
      ok = false;
    }
    if (!ok) return 1;
    std::printf("moe consumer: forward and backward of a %td x %td input, balance loss %g\n", tokens, d,
                double(f.loss()));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe consumer: %s\n", e.what());
    return 1;
  }
}
