// A hierarchical MoE (MATH.md 4) with 1024 leaf experts: 32 groups of 32 experts, 2 groups and
// 2 experts per group for each token (4 leaf experts per token), trained on the mixture problem
// beside a single feed-forward expert of the same compute per token. Prints, per epoch, the
// balance of each level: the groups (level 1) and the leaf experts (level 2).
//
//   hierarchical [--quick] [--epochs N]

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <string_view>

#include "mixture_problem.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/moe.hpp"

namespace {

using mixture::S, mixture::Matrix, mixture::Data, mixture::mse;
using moe::Index;
using Cpu = moe::backend::Cpu<S>;
using Tree = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu, 2>;
using Flat = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu>;

constexpr Index kD = 16, kGroups = 32, kPerGroup = 32, kHidden = 16, kClusters = 32;
constexpr Index kTrain = 32768, kEval = 4096, kBatch = 1024;

long long ll(Index v) { return static_cast<long long>(v); }

struct Epoch {
  double mse = 0;
  double cv2_groups = 0, cv2_leaves = 0;  // CV^2 of the smooth Load_H the loss sees, mean over batches
};

template <class L>
Epoch train_epoch(L& layer, moe::optim::Adam<Cpu>& adam, moe::Rng& rng, const Data& data) {
  Matrix dy(kBatch, kD);
  Epoch e;
  const Index batches = data.x.rows() / kBatch;
  typename L::Forward f;
  for (Index b = 0; b < batches; ++b) {
    layer.forward_into(f, data.x.view().block_rows(b * kBatch, kBatch), moe::Mode::train, rng);
    e.mse += mse(f.y(), data.y.view().block_rows(b * kBatch, kBatch), &dy);
    if (!f.stats().levels.empty()) {
      e.cv2_groups += f.stats().levels[0].cv2_load;
      e.cv2_leaves += f.stats().cv2_load;
    }
    layer.zero_grad();
    layer.backward(f, dy.view());  // the balancing losses' gradient comes with it (aux_scale = 1)
    adam.step(layer.parameters());
  }
  const auto count = static_cast<double>(batches);
  return {e.mse / count, e.cv2_groups / count, e.cv2_leaves / count};
}

void print_level(const char* name, const moe::LevelStats<S>& level) {
  const auto [lo, hi] = std::minmax_element(level.count.begin(), level.count.end());
  const auto used = std::count_if(level.count.begin(), level.count.end(), [](Index c) { return c > 0; });
  std::printf("    %-7s %5lld nodes  CV^2(importance) %7.4f  CV^2(load) %7.4f  tokens per node %lld..%lld, %lld used\n",
              name, ll(level.nodes), level.cv2_importance, level.cv2_load, ll(*lo), ll(*hi), ll(used));
}

}  // namespace

int main(int argc, char** argv) {
  int epochs = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--quick") {
      epochs = 12;
    } else if (flag == "--epochs" && i + 1 < argc) {
      const std::string_view v = argv[++i];
      if (std::from_chars(v.data(), v.data() + v.size(), epochs).ec != std::errc{} || epochs < 1) epochs = 0;
    } else {
      epochs = 0;
    }
    if (epochs == 0) {
      std::fprintf(stderr, "usage: %s [--quick] [--epochs N]\n", argv[0]);
      return 2;
    }
  }
  try {
    const auto start = std::chrono::steady_clock::now();
    const mixture::Problem problem(kD, kClusters, 1);
    const Data train = problem.sample(0, kTrain), eval = problem.sample(kTrain, kEval);

    // 4 leaf experts of hidden 16 per token against one expert of hidden 64: the same compute.
    Tree tree(
        {.d_model = kD,
         .n_experts = kGroups * kPerGroup,
         .expert = {.hidden = kHidden},
         .gate = {.levels = {{{.branching = kGroups, .gate = {.k = 2}}, {.branching = kPerGroup, .gate = {.k = 2}}}},
                  .w_importance = 0.1,
                  .w_load = 0.1},
         .seed = 1});
    Flat single({.d_model = kD, .n_experts = 1, .expert = {.hidden = 4 * kHidden}, .gate = {.k = 1}, .seed = 1});
    moe::optim::Adam<Cpu> tree_adam({.lr = 3e-3}), single_adam({.lr = 3e-3});
    moe::Rng tree_rng(2), single_rng(3);
    Index params = 0;
    for (const auto& p : tree.parameters()) params += p.size();
    std::printf("hierarchical MoE: %lld groups x %lld experts = %lld leaves, k = 2 x 2, %lld parameters\n", ll(kGroups),
                ll(kPerGroup), ll(kGroups * kPerGroup), ll(params));
    std::printf("d = %lld, %lld clusters, %lld train / %lld eval tokens, batch %lld, %d epochs\n", ll(kD),
                ll(kClusters), ll(kTrain), ll(kEval), ll(kBatch), epochs);
    std::printf("eval MSE of predicting 0: %.4f\n\n", mse(Matrix(kEval, kD, S(0)).view(), eval.y.view()));

    std::printf(
        "each epoch: MSE; in training, CV^2 of the smooth Load_H (mean over batches) of the groups and the\n"
        "leaves; at eval (inference: no noise, hard counts), each level's balance\n");
    double tree_mse = 0, single_mse = 0;
    Epoch last;
    moe::BalanceStats<S> stats;
    for (int epoch = 1; epoch <= epochs; ++epoch) {
      last = train_epoch(tree, tree_adam, tree_rng, train);
      const Epoch single_train = train_epoch(single, single_adam, single_rng, train);
      const auto f = tree.forward(eval.x.view(), moe::Mode::inference);
      tree_mse = mse(f.y(), eval.y.view());
      single_mse = mse(single.forward(eval.x.view(), moe::Mode::inference).y(), eval.y.view());
      stats = f.stats();
      std::printf(
          "epoch %2d: hierarchical train %.4f eval %.4f (train CV^2 load: groups %.4f, leaves %.4f) | "
          "single expert train %.4f eval %.4f\n",
          epoch, last.mse, tree_mse, last.cv2_groups, last.cv2_leaves, single_train.mse, single_mse);
      print_level("groups", stats.levels[0]);
      print_level("leaves", stats.levels[1]);
    }
    std::printf("%.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());

    bool ok = true;
    const auto expect = [&](bool holds, const char* claim) {
      if (!holds) std::fprintf(stderr, "FAILED: %s\n", claim);
      ok = ok && holds;
    };
    const auto& groups = stats.levels[0];
    const auto& leaves = stats.levels[1];
    const auto used = std::count_if(leaves.count.begin(), leaves.count.end(), [](Index c) { return c > 0; });
    expect(tree_mse < 0.6 * single_mse,
           "the hierarchical MoE reaches less than 0.6 times the single expert's eval MSE");
    expect(groups.cv2_load < 0.05, "the groups' eval load stays even: CV^2 < 0.05");
    expect(*std::min_element(groups.count.begin(), groups.count.end()) > 0, "every group receives tokens at eval");
    expect(last.cv2_leaves < 0.25, "the leaves' smooth training load stays even: CV^2 < 0.25");
    expect(used > 8 * kGroups * kPerGroup / 10, "more than 80% of the leaf experts receive tokens at eval");
    return ok ? 0 : 1;
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe::Error: %s\n", e.what());
    return 1;
  }
}
