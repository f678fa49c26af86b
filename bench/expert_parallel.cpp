// Expert parallelism, weak scaling (MATH.md 6): one training step (forward and backward) of a
// layer sharded over the ranks of this mpirun, with a fixed batch per rank and a fixed number of
// experts per rank, so the experts grow with the ranks and the rows per expert stay constant.
// Reports tokens per second over all ranks and the share of the step spent in the communicator
// (the row exchange, and the small collectives: counts, statistics, replicated gradients).
//
//   mpirun -np P expert_parallel [--quick] [--json FILE]
//   bench/expert_parallel.py MPIRUN PROGRAM  runs it on 1, 2 and 4 ranks and prints the table
//
// With more ranks than cores (4 ranks on 2 cores) the ranks share the cores: the figures then
// measure the oversubscribed machine, not the method.

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "bench_support.hpp"
#include "moe/backend/cpu.hpp"
#include "moe/comm/mpi.hpp"
#include "moe/moe.hpp"

namespace {

using S = float;
using Cpu = moe::backend::Cpu<S>;
using Matrix = moe::backend::HostMatrix<S>;
using moe::Index;
using Clock = std::chrono::steady_clock;

// comm::Mpi, timing its calls: the row exchange (all_to_all_v) apart from the rest.
class TimedMpi {
 public:
  explicit TimedMpi(moe::comm::Mpi comm) : comm_(std::move(comm)) {}
  [[nodiscard]] int rank() const { return comm_.rank(); }
  [[nodiscard]] int size() const { return comm_.size(); }
  void all_reduce_sum(double* d, Index n) { timed(other_, [&] { comm_.all_reduce_sum(d, n); }); }
  void all_reduce_sum(float* d, Index n) { timed(other_, [&] { comm_.all_reduce_sum(d, n); }); }
  void all_reduce_sum(std::int64_t* d, Index n) { timed(other_, [&] { comm_.all_reduce_sum(d, n); }); }
  void all_to_all_v(const std::byte* s, const Index* sc, std::byte* r, const Index* rc) {
    timed(exchange_, [&] { comm_.all_to_all_v(s, sc, r, rc); });
  }
  void all_gather(const std::byte* s, Index n, std::byte* r) { timed(other_, [&] { comm_.all_gather(s, n, r); }); }
  std::int64_t exclusive_scan(std::int64_t v) {
    std::int64_t out = 0;
    timed(other_, [&] { out = comm_.exclusive_scan(v); });
    return out;
  }
  void broadcast(std::byte* d, Index n, int root) { timed(other_, [&] { comm_.broadcast(d, n, root); }); }
  void barrier() { timed(other_, [&] { comm_.barrier(); }); }

  double exchange_seconds() const { return *exchange_; }
  double other_seconds() const { return *other_; }
  void reset() { *exchange_ = *other_ = 0; }

 private:
  template <class F>
  static void timed(const std::shared_ptr<double>& total, F&& f) {
    const auto start = Clock::now();
    f();
    *total += std::chrono::duration<double>(Clock::now() - start).count();
  }
  moe::comm::Mpi comm_;
  // Shared by the copies of the communicator (the layer holds one).
  std::shared_ptr<double> exchange_ = std::make_shared<double>(0), other_ = std::make_shared<double>(0);
};
static_assert(moe::Communicator<TimedMpi>);

int run(int argc, char** argv) {
  bool quick = false;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--quick")
      quick = true;
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else {
      std::fprintf(stderr, "usage: expert_parallel [--quick] [--json FILE]\n");
      return 2;
    }
  }
  TimedMpi comm{moe::comm::Mpi()};
  const int ranks = comm.size(), rank = comm.rank();
  const Index d = quick ? 64 : 256, hidden = quick ? 128 : 512, per_rank = 4, tokens = quick ? 256 : 2048, k = 2;
  using Model = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu, 1, TimedMpi>;
  Model layer({.d_model = d, .n_experts = per_rank * ranks, .expert = {.hidden = hidden}, .gate = {.k = k}, .seed = 1},
              comm);
  Matrix x(tokens, d), dy(tokens, d);
  const moe::CounterRandom random{static_cast<std::uint64_t>(rank) + 7};
  for (Index t = 0; t < tokens; ++t)
    for (Index j = 0; j < d; ++j) {
      x(t, j) = static_cast<S>(random.normal(static_cast<std::uint64_t>(t), static_cast<std::uint32_t>(j), 1));
      dy(t, j) = static_cast<S>(random.normal(static_cast<std::uint64_t>(t), static_cast<std::uint32_t>(j), 2));
    }
  moe::Rng rng(3);
  const auto step = [&] {
    const auto f = layer.forward(x.view(), moe::Mode::train, rng);
    layer.zero_grad();
    layer.backward(f, dy.view());
  };
  const int warmup = 2, reps = quick ? 3 : 7;
  for (int i = 0; i < warmup; ++i) step();
  std::vector<double> seconds;
  double exchange = 0, other = 0;
  for (int i = 0; i < reps; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    layer.communicator().reset();
    const auto start = Clock::now();
    step();
    // The step ends when the slowest rank's does.
    double took = std::chrono::duration<double>(Clock::now() - start).count();
    MPI_Allreduce(MPI_IN_PLACE, &took, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    seconds.push_back(took);
    exchange += layer.communicator().exchange_seconds();
    other += layer.communicator().other_seconds();
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  double shares[2] = {exchange / reps, other / reps};  // mean over ranks below
  MPI_Allreduce(MPI_IN_PLACE, shares, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  shares[0] /= ranks;
  shares[1] /= ranks;
  // FLOPs of a training step: the experts' 2 GEMMs forward, 4 backward, over k routed rows per token.
  const double flops = 6.0 * 2.0 * static_cast<double>(tokens * ranks * k * d * hidden);
  if (rank == 0) {
    const double tps = static_cast<double>(tokens * ranks) / median;
    std::printf("%5d %8lld %8lld %10.4f %12.0f %9.1f %9.1f %9.2f\n", ranks, static_cast<long long>(per_rank * ranks),
                static_cast<long long>(tokens), median, tps, 100 * shares[0] / median, 100 * shares[1] / median,
                flops / median * 1e-9);
    if (!json.empty()) {
      bench::Json j;
      j.open("", '{')
          .num("ranks", ranks)
          .num("experts", static_cast<double>(per_rank * ranks))
          .num("tokens_per_rank", static_cast<double>(tokens))
          .num("d_model", static_cast<double>(d))
          .num("hidden", static_cast<double>(hidden))
          .num("k", static_cast<double>(k))
          .num("step_seconds", median)
          .num("tokens_per_second", tps)
          .num("exchange_share", shares[0] / median)
          .num("other_collectives_share", shares[1] / median)
          .num("gflops", flops / median * 1e-9)
          .close('}');
      bench::write_atomically(json, j.text());
    }
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
    std::fprintf(stderr, "expert_parallel: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
