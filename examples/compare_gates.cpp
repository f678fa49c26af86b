// Every gate of the library on the same mixture problem, with the same experts: the final loss,
// how even the load is, and how many tokens each routing drops. One table, one run.
//
//   compare_gates [--quick] [--epochs N]

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "mixture_problem.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/moe.hpp"

namespace {

using mixture::S, mixture::Matrix, mixture::Data, mixture::mse;
using moe::Index;
using Cpu = moe::backend::Cpu<S>;
namespace gate = moe::gate;

constexpr Index kD = 16, kClusters = 8, kExperts = 8, kHidden = 32;
constexpr Index kTrain = 16384, kEval = 4096, kBatch = 256;

struct Row {
  std::string gate;
  double experts_per_token = 0;          // routed slots actually computed, per token, at eval
  double train_mse = 0, train_loss = 0;  // last epoch: task MSE, and MSE + the gate's losses
  double eval_mse = 0;
  double cv2_load = 0;       // eval, CV^2 of the tokens per expert
  double train_dropped = 0;  // last epoch, fraction of tokens no expert computed
  double eval_dropped = 0;
  double seconds = 0;
};

template <class Gate, int Depth = 1>
Row run(const std::string& name, const typename moe::Layer<moe::expert::FeedForward, Gate, Cpu, Depth>::Config& config,
        const Data& train, const Data& eval, int epochs) {
  using L = moe::Layer<moe::expert::FeedForward, Gate, Cpu, Depth>;
  const auto start = std::chrono::steady_clock::now();
  L layer(config);
  moe::optim::Adam<Cpu> adam({.lr = 3e-3});
  moe::Rng rng(7);
  Matrix dy(kBatch, kD);
  typename L::Forward f;
  Row row{.gate = name};
  const Index batches = kTrain / kBatch;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    double sum_mse = 0, sum_aux = 0, dropped = 0;
    for (Index b = 0; b < batches; ++b) {
      layer.forward_into(f, train.x.view().block_rows(b * kBatch, kBatch), moe::Mode::train, rng);
      sum_mse += mse(f.y(), train.y.view().block_rows(b * kBatch, kBatch), &dy);
      sum_aux += f.loss();
      dropped += static_cast<double>(f.stats().dropped_tokens);
      layer.zero_grad();
      layer.backward(f, dy.view());
      adam.step(layer.parameters());
    }
    row.train_mse = sum_mse / static_cast<double>(batches);
    row.train_loss = (sum_mse + sum_aux) / static_cast<double>(batches);
    row.train_dropped = dropped / static_cast<double>(kTrain);
  }
  const auto e = layer.forward(eval.x.view(), moe::Mode::inference);
  row.eval_mse = mse(e.y(), eval.y.view());
  row.cv2_load =
      moe::cv_squared(std::vector<double>(e.stats().tokens_per_expert.begin(), e.stats().tokens_per_expert.end()));
  row.eval_dropped = static_cast<double>(e.stats().dropped_tokens) / static_cast<double>(kEval);
  Index routed = 0;
  for (const Index c : e.stats().tokens_per_expert) routed += c;
  row.experts_per_token = static_cast<double>(routed) / static_cast<double>(kEval);
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return row;
}

template <class Gate>
typename moe::Layer<moe::expert::FeedForward, Gate, Cpu>::Config flat(const typename Gate::Config& gate_config) {
  return {.d_model = kD, .n_experts = kExperts, .expert = {.hidden = kHidden}, .gate = gate_config, .seed = 1};
}

}  // namespace

int main(int argc, char** argv) {
  int epochs = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    bool ok = true;
    if (flag == "--quick") {
      epochs = 4;
    } else if (flag == "--epochs" && i + 1 < argc) {
      const std::string_view v = argv[++i];
      ok = std::from_chars(v.data(), v.data() + v.size(), epochs).ec == std::errc{} && epochs > 0;
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "usage: %s [--quick] [--epochs N]\n", argv[0]);
      return 2;
    }
  }
  try {
    const mixture::Problem problem(kD, kClusters, 1);
    const Data train = problem.sample(0, kTrain), eval = problem.sample(kTrain, kEval);
    const double zero_mse = mse(Matrix(kEval, kD, S(0)).view(), eval.y.view());
    std::printf(
        "mixture problem: d = %d, %d clusters; %d experts of hidden %d; %d train / %d eval tokens, batch %d, "
        "%d epochs, Adam 3e-3\n",
        int(kD), int(kClusters), int(kExperts), int(kHidden), int(kTrain), int(kEval), int(kBatch), epochs);
    std::printf("eval MSE of predicting 0: %.4f\n\n", zero_mse);

    std::vector<Row> rows;
    rows.push_back(run<gate::NoisyTopK>("NoisyTopK k=2 (paper)",
                                        flat<gate::NoisyTopK>({.k = 2, .w_importance = 0.1, .w_load = 0.1}), train,
                                        eval, epochs));
    rows.push_back(
        run<gate::TopK>("TopK k=2 (Mixtral)", flat<gate::TopK>({.k = 2, .w_importance = 0.1}), train, eval, epochs));
    rows.push_back(run<gate::TopK>("TopK k=2 + z-loss 1e-3",
                                   flat<gate::TopK>({.k = 2, .w_importance = 0.1, .w_z = 1e-3}), train, eval, epochs));
    rows.push_back(
        run<gate::Switch>("Switch cf=1.25", flat<gate::Switch>({.capacity_factor = 1.25}), train, eval, epochs));
    rows.push_back(
        run<gate::Switch>("Switch cf=1.0", flat<gate::Switch>({.capacity_factor = 1.0}), train, eval, epochs));
    rows.push_back(
        run<gate::Switch>("Switch cf=2.0", flat<gate::Switch>({.capacity_factor = 2.0}), train, eval, epochs));
    rows.push_back(run<gate::ExpertChoice>("ExpertChoice c=1", flat<gate::ExpertChoice>({.capacity_factor = 1.0}),
                                           train, eval, epochs));
    rows.push_back(run<gate::ExpertChoice>("ExpertChoice c=2", flat<gate::ExpertChoice>({.capacity_factor = 2.0}),
                                           train, eval, epochs));
    rows.push_back(run<gate::SigmoidBias>("SigmoidBias k=2, 4 groups/2",
                                          flat<gate::SigmoidBias>({.k = 2, .expert_groups = 4, .top_groups = 2}), train,
                                          eval, epochs));
    rows.push_back(
        run<gate::Softmax>("Softmax (dense, all 8)", flat<gate::Softmax>({.w_importance = 0.1}), train, eval, epochs));
    rows.push_back(run<gate::NoisyTopK, 2>(
        "NoisyTopK 2x4 levels, k=1x2",
        {.d_model = kD,
         .n_experts = kExperts,
         .expert = {.hidden = kHidden},
         .gate = {.levels = {{{.branching = 2, .gate = {.k = 1}}, {.branching = 4, .gate = {.k = 2}}}},
                  .w_importance = 0.1,
                  .w_load = 0.1},
         .seed = 1},
        train, eval, epochs));

    std::printf("%-30s %9s %10s %10s %9s %9s %9s %9s %6s\n", "gate", "experts/t", "train MSE", "train loss", "eval MSE",
                "CV2 load", "dropped", "(train)", "s");
    for (const Row& r : rows)
      std::printf("%-30s %9.2f %10.4f %10.4f %9.4f %9.4f %8.1f%% %8.1f%% %6.1f\n", r.gate.c_str(), r.experts_per_token,
                  r.train_mse, r.train_loss, r.eval_mse, r.cv2_load, 100 * r.eval_dropped, 100 * r.train_dropped,
                  r.seconds);
    std::printf(
        "experts/t: expert evaluations per token at eval; train loss: MSE + stats().loss (balancing, Switch and\n"
        "z losses), mean over the last epoch;\n"
        "CV2 load: of the tokens per expert at eval (inference); dropped: tokens no expert computed (output 0).\n");

    bool ok = true;
    for (const Row& r : rows)
      if (!(r.eval_mse < 0.3 * zero_mse)) {
        std::fprintf(stderr, "FAILED: %s reaches an eval MSE of %.4f, not below 0.3 x %.4f\n", r.gate.c_str(),
                     r.eval_mse, zero_mse);
        ok = false;
      }
    return ok ? 0 : 1;
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe::Error: %s\n", e.what());
    return 1;
  }
}
