// The mixture problem (examples/mixture_problem.hpp) trained on the GPU: a Mixtral-style layer
// (SwiGLU experts, top-2 router) on moe::backend::Cuda<float>, in fp32 or with bf16 experts,
// next to the same layer on the CPU backend from the same initial weights. Both see the same
// batches and the same gate noise; the GPU run must learn (eval MSE falls well below the
// baseline of predicting 0) and stay close to the CPU run.
//
//   gpu_mixture [--quick] [--bf16] [--epochs N]
//
// Exits 77 (a skip for Meson) when no CUDA device answers.

#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "mixture_problem.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/backend/cuda.hpp"
#include "moe/moe.hpp"

namespace {

using moe::Index;
using Gpu = moe::backend::Cuda<float>;
using Cpu = moe::backend::Cpu<float>;
template <class B>
using Model = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, B>;

struct Options {
  bool quick = false;
  bool bf16 = false;
  int epochs = 0;  // 0: the default for the size
};

template <class B>
typename Model<B>::Config config(Index d, moe::Precision precision) {
  return {.d_model = d,
          .n_experts = 8,
          .expert = {.hidden = 32, .precision = precision},
          .gate = {.k = 2, .w_importance = 1e-2, .w_load = 1e-2},
          .seed = 3};
}

// One epoch of Adam steps on a model; returns the mean training MSE. x and y live in the
// backend's memory when B is a device backend: they are uploaded once per batch.
template <class B>
double train_epoch(Model<B>& model, moe::optim::Adam<B>& adam, const mixture::Data& data, Index batch) {
  typename B::Context ctx{};
  typename B::template Buffer<float> x, dy;
  typename Model<B>::Forward f;
  typename Model<B>::Backward grads;
  mixture::Matrix dy_host(batch, data.x.cols());
  double sum = 0;
  const Index batches = data.x.rows() / batch;
  for (Index b = 0; b < batches; ++b) {
    x.resize(batch, data.x.cols());
    B::copy(ctx, data.x.view().block_rows(b * batch, batch), x.view());
    model.forward_into(f, x.view(), moe::Mode::train);
    const std::vector<float> y = moe::to_host<B>(ctx, f.y());
    sum += mixture::mse(moe::ConstMatrixView<float>{y.data(), batch, data.x.cols()},
                        data.y.view().block_rows(b * batch, batch), &dy_host);
    dy.resize(batch, data.x.cols());
    B::copy(ctx, moe::ConstMatrixView<float>(dy_host.view()), dy.view());
    model.zero_grad();
    model.backward_into(grads, f, dy.view());
    adam.step(model.parameters());
  }
  return sum / static_cast<double>(batches);
}

template <class B>
double evaluate(Model<B>& model, const mixture::Data& data) {
  typename B::Context ctx{};
  typename B::template Buffer<float> x(data.x.rows(), data.x.cols());
  B::copy(ctx, data.x.view(), x.view());
  const auto f = model.forward(x.view(), moe::Mode::inference);
  const std::vector<float> y = moe::to_host<B>(ctx, f.y());
  return mixture::mse(moe::ConstMatrixView<float>{y.data(), data.x.rows(), data.x.cols()}, data.y.view());
}

bool parse(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--quick") {
      o.quick = true;
    } else if (flag == "--bf16") {
      o.bf16 = true;
    } else if (flag == "--epochs" && i + 1 < argc) {
      const std::string_view v = argv[++i];
      if (std::from_chars(v.data(), v.data() + v.size(), o.epochs).ec != std::errc{} || o.epochs <= 0) return false;
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o)) {
    std::fprintf(stderr, "usage: gpu_mixture [--quick] [--bf16] [--epochs N]\n");
    return 2;
  }
  if (!moe::backend::cuda::device_available()) {
    std::printf("SKIPPED: gpu_mixture: no CUDA device answered\n");
    return 77;
  }
  try {
    const Index d = 16, clusters = 8, batch = 256;
    const Index train_tokens = o.quick ? 2048 : 16384;
    const int epochs = o.epochs > 0 ? o.epochs : (o.quick ? 4 : 10);
    const mixture::Problem problem(d, clusters, 7);
    const auto train = problem.sample(0, train_tokens);
    const auto eval = problem.sample(train_tokens, 2048);
    const auto precision = o.bf16 ? moe::Precision::bf16 : moe::Precision::fp32;

    Model<Gpu> gpu(config<Gpu>(d, precision));
    Model<Cpu> cpu(config<Cpu>(d, precision));
    {  // the same initial weights (both are a function of the seed; copied anyway, to be explicit)
      Gpu::Context ctx;
      auto g = gpu.parameters();
      auto c = cpu.parameters();
      for (std::size_t i = 0; i < g.size(); ++i) Gpu::copy(ctx, moe::ConstMatrixView<float>(c[i].value), g[i].value);
      Gpu::synchronize(ctx);
    }
    moe::optim::Adam<Gpu> gpu_adam({.lr = 3e-3});
    moe::optim::Adam<Cpu> cpu_adam({.lr = 3e-3});
    const mixture::Matrix zeros(eval.y.rows(), eval.y.cols(), 0.0f);
    std::printf("device: %s; experts in %s; baseline eval MSE (predict 0): %.4f\n",
                moe::backend::cuda::device_name().c_str(), moe::to_string(precision),
                mixture::mse(zeros.view(), eval.y.view()));
    std::printf("epoch  train MSE (GPU)  eval MSE (GPU)  eval MSE (CPU)\n");
    double first = 0, last = 0, last_cpu = 0;
    for (int e = 1; e <= epochs; ++e) {
      const double train_mse = train_epoch(gpu, gpu_adam, train, batch);
      train_epoch(cpu, cpu_adam, train, batch);
      last = evaluate(gpu, eval);
      last_cpu = evaluate(cpu, eval);
      if (e == 1) first = last;
      std::printf("%5d  %15.4f  %14.4f  %14.4f\n", e, train_mse, last, last_cpu);
    }
    const bool learned = last < 0.5 * first;
    const bool agrees = std::abs(last - last_cpu) <= 0.05 * last_cpu + 1e-4;
    std::printf("GPU %s; GPU and CPU eval MSE %s (%.5f vs %.5f)\n", learned ? "learned" : "DID NOT LEARN",
                agrees ? "agree" : "DISAGREE", last, last_cpu);
    return learned && agrees ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_mixture: %s\n", e.what());
    return 1;
  }
}
