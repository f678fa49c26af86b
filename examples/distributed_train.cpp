// Trains a Mixture-of-Experts layer sharded across processes (docs/distributed.md): every rank
// holds a block of the experts and a copy of the gate; each rank trains on its own share of each
// batch, the routed tokens travel to their experts' ranks and back. The loss is the mean over the
// global batch, so the run computes what one process would on the whole batch.
//
//   mpirun -np 2 distributed_train [--quick] [--save DIR]
//   (as root in a container: mpirun --allow-run-as-root --oversubscribe -np 2 ...)
//
// Exits non-zero (on every rank) if the held-out error does not fall well below the error of
// predicting zero, or if the replicated weights differ between ranks after training.

#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "mixture_problem.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/comm/mpi.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/moe.hpp"

namespace {

using S = mixture::S;
using Cpu = moe::backend::Cpu<S>;
using Matrix = mixture::Matrix;
using moe::Index;
using Model = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu, 1, moe::comm::Mpi>;

// The rows of a global batch of `total` tokens that rank r of p trains on.
struct Slice {
  Index first, count;
};
Slice slice_of(Index total, int rank, int ranks) {
  const Index base = total / ranks, extra = total % ranks;
  return {rank * base + std::min<Index>(rank, extra), base + (rank < extra ? 1 : 0)};
}

// The sum of a double over the ranks.
double sum_over_ranks(double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return v;
}

int run(int argc, char** argv) {
  bool quick = false;
  std::string save;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--save" && i + 1 < argc) {
      save = argv[++i];
    } else {
      std::fprintf(stderr, "usage: distributed_train [--quick] [--save DIR]\n");
      return 2;
    }
  }
  moe::comm::Mpi comm;  // MPI_COMM_WORLD
  const int rank = comm.rank(), ranks = comm.size();
  const Index d = 16, clusters = 8, batch = 256, steps = quick ? 150 : 600, eval_tokens = 2048;

  // Every rank builds the layer from the same Config: 8 experts in all, split over the ranks.
  Model layer({.d_model = d,
               .n_experts = 8,
               .expert = {.hidden = 16},
               .gate = {.k = 2, .w_importance = 0.1, .w_load = 0.1},
               .seed = 1},
              comm);
  moe::optim::Adam<Cpu> adam({.lr = 3e-3});
  moe::Rng rng(2);  // the gate's noise: the same stream on every rank, keyed by global token index
  const mixture::Problem problem(d, clusters, 3);
  if (rank == 0)
    std::printf("%d ranks, %lld experts in all; rank 0 holds experts [%lld, %lld)\n", ranks,
                static_cast<long long>(layer.config().n_experts), static_cast<long long>(layer.expert_shard().first),
                static_cast<long long>(layer.expert_shard().first + layer.experts().n_experts()));

  Matrix dy;
  for (Index step = 0; step < steps; ++step) {
    const Slice mine = slice_of(batch, rank, ranks);
    const mixture::Data data = problem.sample(step * batch + mine.first, mine.count);
    const auto f = layer.forward(data.x.view(), moe::Mode::train, rng);
    dy.resize(mine.count, d);
    const double global_count = static_cast<double>(batch * d);
    const double mse = sum_over_ranks(mixture::mse(f.y(), data.y.view(), &dy, global_count));
    layer.zero_grad();
    layer.backward(f, dy.view());  // the replicated gradients come back summed over the ranks
    // The whole layer's gradient norm (every rank's experts, the gate once), the same on every rank.
    (void)moe::optim::clip_grad_norm(layer, 1.0);
    adam.step(layer.parameters());  // each rank steps its experts and its copy of the gate
    if (rank == 0 && (step % (steps / 5) == 0 || step == steps - 1))
      std::printf("step %4lld  train mse %.4f  cv2(load) %.4f  balance loss %.5f\n", static_cast<long long>(step), mse,
                  static_cast<double>(f.stats().cv2_load), static_cast<double>(f.loss()));
  }

  // Held-out tokens, each rank its slice; the zero predictor's error is the targets' mean square.
  const Slice mine = slice_of(eval_tokens, rank, ranks);
  const mixture::Data eval = problem.sample(Index{1} << 40 | mine.first, mine.count);
  const auto f = layer.forward(eval.x.view(), moe::Mode::inference);
  const double count = static_cast<double>(eval_tokens * d);
  Matrix zero(mine.count, d, S(0));
  const double mse = sum_over_ranks(mixture::mse(f.y(), eval.y.view(), nullptr, count));
  const double baseline = sum_over_ranks(mixture::mse(zero.view(), eval.y.view(), nullptr, count));
  layer.verify_replicas();  // throws on every rank if a replicated weight differs anywhere
  // A training checkpoint: every rank's experts with their Adam state, the noise generator's position.
  if (!save.empty()) moe::io::save_sharded(layer, adam, save, {.noise = &rng});
  if (rank == 0) {
    std::printf("held-out mse %.4f (predicting zero: %.4f); tokens per expert:", mse, baseline);
    for (const Index c : f.stats().tokens_per_expert) std::printf(" %lld", static_cast<long long>(c));
    std::printf("\n");
    if (!save.empty()) std::printf("saved to %s\n", save.c_str());
  }
  if (!(mse < 0.5 * baseline)) {
    if (rank == 0) std::fprintf(stderr, "distributed_train: the layer did not learn (mse %.4f)\n", mse);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  try {
    status = run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "distributed_train: %s\n", e.what());
    status = 1;
  }
  int any = status;
  MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
