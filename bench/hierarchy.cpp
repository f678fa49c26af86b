// A flat MoE against a two-level hierarchical MoE (MATH.md 4) over the same leaf experts, with
// the same experts per token (flat k = 4; hierarchy 2 groups x 2 experts), at growing leaf
// counts, measured in one run, round-robin. The experts' work is the same; the gates differ:
// the flat gate scores every leaf for every token (4 d n FLOP per token for W_g and W_noise, and
// n load probabilities), the hierarchy a groups, then b experts in each of its k_1 groups.
// Prints a table and writes JSON. Timings live here, never in the tests.
//
//   hierarchy [--quick] [--threads N] [--json PATH]

#include <cstdio>
#include <exception>
#include <moe/backend/cpu.hpp>  // first: it defines EIGEN_DONT_PARALLELIZE before Eigen is seen
#include <moe/moe.hpp>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace {

using moe::Index;
using Cpu = moe::backend::Cpu<float>;
using Flat = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu>;
using Tree = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu, 2>;
using Matrix = moe::backend::HostMatrix<float>;

struct Shape {
  Index tokens, d, h;
  std::vector<Index> branching;  // a = b: n = a * a leaves
  int warmup, reps;
};

Shape shape_for(bool quick) {
  if (quick) return {128, 32, 32, {4, 8}, 0, 1};
  return {2048, 256, 256, {16, 32, 64}, 1, 5};
}

struct Result {
  Index n = 0, a = 0;
  double flat_gate_flop = 0, tree_gate_flop = 0, expert_flop = 0;  // per forward
  std::vector<bench::Measured> m;                                  // flat fwd, flat fwd+bwd, tree fwd, tree fwd+bwd
  double flat_cv2 = 0, tree_cv2 = 0;  // CV^2 of the leaves' smooth load at the measured routing
};

Result run_one(const Shape& s, Index a, int threads) {
  const Index n = a * a;
  Result r;
  r.n = n;
  r.a = a;
  r.expert_flop = 4.0 * double(s.tokens * 4 * s.d * s.h);
  r.flat_gate_flop = 4.0 * double(s.tokens * s.d * n);
  r.tree_gate_flop = 4.0 * double(s.tokens * s.d * (a + 2 * a));
  Flat flat(
      {.d_model = s.d, .n_experts = n, .expert = {.hidden = s.h}, .gate = {.k = 4}, .seed = 1, .threads = threads});
  Tree tree({.d_model = s.d,
             .n_experts = n,
             .expert = {.hidden = s.h},
             .gate = {.levels = {{{.branching = a, .gate = {.k = 2}}, {.branching = a, .gate = {.k = 2}}}}},
             .seed = 1,
             .threads = threads});
  Matrix x(s.tokens, s.d), dy(s.tokens, s.d);
  const moe::CounterRandom random{3};
  for (Index t = 0; t < s.tokens; ++t)
    for (Index c = 0; c < s.d; ++c) {
      x(t, c) = float(random.normal(std::uint64_t(t), std::uint32_t(c), 0));
      dy(t, c) = 1e-3f * float(random.normal(std::uint64_t(t), std::uint32_t(c), 1));
    }
  moe::Rng flat_rng(5), tree_rng(5);
  Flat::Forward ff;
  Tree::Forward tf;
  r.m = bench::measure(s.warmup, s.reps,
                       {
                           [&] { flat.forward_into(ff, x.view(), moe::Mode::train, flat_rng); },
                           [&] {
                             flat.forward_into(ff, x.view(), moe::Mode::train, flat_rng);
                             (void)flat.backward(ff, dy.view());
                           },
                           [&] { tree.forward_into(tf, x.view(), moe::Mode::train, tree_rng); },
                           [&] {
                             tree.forward_into(tf, x.view(), moe::Mode::train, tree_rng);
                             (void)tree.backward(tf, dy.view());
                           },
                       });
  r.flat_cv2 = ff.stats().cv2_load;
  r.tree_cv2 = tf.stats().cv2_load;
  return r;
}

constexpr const char* kUsage =
    "usage: hierarchy [--quick] [--threads N] [--json PATH]\n"
    "  --quick      tiny sizes and one repetition: a smoke run, not a measurement\n"
    "  --threads N  CPU threads (default 0: all that OpenMP offers)\n"
    "  --json PATH  where to write the results (default bench_hierarchy.json)\n";

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int threads = 0;
  std::string json = "bench_hierarchy.json";
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--quick") {
        quick = true;
      } else if (arg == "--help" || arg == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if ((arg == "--threads" || arg == "--json") && i + 1 < argc) {
        const std::string value = argv[++i];
        if (arg == "--threads")
          threads = bench::threads_from(value);
        else
          json = value;
      } else {
        throw std::invalid_argument("unknown or incomplete argument " + arg);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hierarchy: %s\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    const Shape s = shape_for(quick);
    const int used = moe::backend::cpu::resolve_threads(threads);
    const double others_before = bench::others_cpu_seconds();
    const auto start = bench::Clock::now();
    std::vector<Result> results;
    for (const Index a : s.branching) results.push_back(run_one(s, a, used));
    const double wall = std::chrono::duration<double>(bench::Clock::now() - start).count();
    const double others = others_before >= 0 ? (bench::others_cpu_seconds() - others_before) /
                                                   (wall * double(::sysconf(_SC_NPROCESSORS_ONLN)))
                                             : -1;

    std::printf(
        "flat NoisyTopK k = 4 vs hierarchy a x a, k = 2 x 2; float, T = %lld, d = %lld, h = %lld, %d threads, "
        "median of %d%s\n",
        (long long)s.tokens, (long long)s.d, (long long)s.h, used, s.reps, quick ? " (quick: not a measurement)" : "");
    if (others >= 0) std::printf("other processes used %.0f%% of the machine during the run\n", 100 * others);
    std::printf("%6s %5s | %10s %10s %10s | %9s %9s %9s | %9s %9s %9s\n", "leaves", "a", "gate GFLOP", "tree gate",
                "experts", "flat fwd", "tree fwd", "flat/tree", "flat f+b", "tree f+b", "flat/tree");
    for (const Result& r : results) {
      const auto ms = [&](int i) { return r.m[std::size_t(i)].seconds * 1e3; };
      std::printf("%6lld %5lld | %10.2f %10.2f %10.2f | %9.1f %9.1f %9.2f | %9.1f %9.1f %9.2f\n", (long long)r.n,
                  (long long)r.a, r.flat_gate_flop * 1e-9, r.tree_gate_flop * 1e-9, r.expert_flop * 1e-9, ms(0), ms(2),
                  ms(0) / ms(2), ms(1), ms(3), ms(1) / ms(3));
    }
    std::printf(
        "GFLOP per forward: flat gate 4 T d n (W_g and W_noise), tree gate 4 T d (a + 2 b), experts 4 T k d h; "
        "ms: median per call.\n");

    bench::Json j;
    j.open("", '{').str("benchmark", "hierarchy").str("scalar", "float");
    j.num("tokens", double(s.tokens)).num("d_model", double(s.d)).num("hidden", double(s.h)).num("threads", used);
    j.num("repetitions", s.reps).num("quick", quick ? 1 : 0).num("other_processes_cpu_share", others);
    j.open("results", '[');
    for (const Result& r : results) {
      j.open("", '{').num("leaves", double(r.n)).num("branching", double(r.a));
      j.num("flat_gate_flop", r.flat_gate_flop).num("tree_gate_flop", r.tree_gate_flop);
      j.num("expert_flop", r.expert_flop);
      j.num("flat_forward_s", r.m[0].seconds).num("flat_forward_backward_s", r.m[1].seconds);
      j.num("tree_forward_s", r.m[2].seconds).num("tree_forward_backward_s", r.m[3].seconds);
      j.num("flat_over_tree_forward", r.m[0].seconds / r.m[2].seconds);
      j.num("flat_over_tree_forward_backward", r.m[1].seconds / r.m[3].seconds);
      j.num("flat_cv2_load", r.flat_cv2).num("tree_cv2_load", r.tree_cv2).close('}');
    }
    j.close(']').close('}');
    bench::write_atomically(json, j.text());
    std::printf("wrote %s\n", json.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hierarchy: %s\n", e.what());
    return 1;
  }
  return 0;
}
