// Throughput of moe::Layer<FeedForward, NoisyTopK, Cuda<float>> on one GPU at growing expert
// counts, against
//   - a dense ReLU MLP of the same active FLOPs (hidden k*h) on cuBLAS SGEMM, and
//   - a naive per-expert loop: the layer's own routing and weights, one pair of cuBLAS GEMMs per
//     expert (n launches each), the "loop of n small GEMMs" that the layer's grouped GEMM replaces,
// all measured in one run, round-robin (bench::measure), each task ending in a synchronize of the
// library stream and timed by the host clock. Prints a table and writes JSON. Timings live here,
// never in the tests. Exits 77 when no CUDA device answers.
//
//   cuda_layer [--quick] [--json PATH]

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.hpp"
#include "moe/backend/cuda.hpp"
#include "moe/moe.hpp"

namespace {

using bench::Json, bench::Measured, bench::measure, bench::write_atomically;
using moe::ConstMatrixView, moe::Index, moe::MatrixView, moe::Op;
namespace mc = moe::backend::cuda;
using Cuda = moe::backend::Cuda<float>;
using Ctx = Cuda::Context;
using Buf = Cuda::Buffer<float>;
using Layer = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cuda>;

// H100 SXM5: 132 SMs x 128 fp32 lanes x 2 FLOP (FMA) x 1.98 GHz boost; the PCIe card ~51.
constexpr double kH100Fp32Peak = 66.9e12;
constexpr double kH100Bandwidth = 3.35e12;  // HBM3, SXM5, bytes/s

struct Options {
  bool quick = false;
  bool help = false;
  std::string json = "bench_cuda.json";
};

struct Shape {
  Index tokens, d, h, k;
  std::vector<Index> experts;
  int warmup, reps;

  [[nodiscard]] double expert_flop() const { return 4.0 * double(tokens) * double(k) * double(d) * double(h); }
  [[nodiscard]] double gate_flop(Index n) const { return 4.0 * double(tokens) * double(d) * double(n); }
  [[nodiscard]] double weight_bytes(Index n) const { return double(n) * 2.0 * double(d) * double(h) * sizeof(float); }
};

Shape shape_for(bool quick) {
  if (quick) return {256, 128, 256, 2, {4, 16}, 1, 1};
  return {4096, 1024, 4096, 2, {8, 32, 128}, 3, 21};
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--help" || arg == "-h") {
      o.help = true;
    } else if (arg == "--json") {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      o.json = argv[++i];
    } else {
      throw std::invalid_argument("unknown argument " + arg);
    }
  }
  return o;
}

// ---- device helpers ---------------------------------------------------------------------------

constexpr int kThreads = 256;

unsigned blocks_for(Index count) {
  return static_cast<unsigned>(std::min<Index>((count + kThreads - 1) / kThreads, Index{1} << 16));
}

// act = max(pre, 0), elementwise over count contiguous elements.
__global__ void relu_kernel(const float* __restrict__ pre, float* __restrict__ act, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    act[i] = pre[i] > 0.f ? pre[i] : 0.f;
}

// grad = 0 where pre <= 0: the ReLU's backward in place.
__global__ void relu_mask_kernel(const float* __restrict__ pre, float* __restrict__ grad, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    if (!(pre[i] > 0.f)) grad[i] = 0.f;
}

void relu(const Ctx& ctx, const Buf& pre, Buf& act) {
  if (pre.size() == 0) return;
  relu_kernel<<<blocks_for(pre.size()), kThreads, 0, ctx.stream()>>>(pre.data(), act.data(), pre.size());
  MOE_CUDA_CHECK_LAUNCH();
}

void relu_mask(const Ctx& ctx, const Buf& pre, Buf& grad) {
  if (pre.size() == 0) return;
  relu_mask_kernel<<<blocks_for(pre.size()), kThreads, 0, ctx.stream()>>>(pre.data(), grad.data(), pre.size());
  MOE_CUDA_CHECK_LAUNCH();
}

// c = alpha op(a) op(b) + beta c through cuBLAS (true fp32: the library's handle keeps
// CUBLAS_DEFAULT_MATH, no TF32).
void sgemm(const Ctx& ctx, Op ta, Op tb, ConstMatrixView<float> a, ConstMatrixView<float> b, float beta,
           MatrixView<float> c) {
  mc::gemm<float>(ctx, ta, tb, 1.f, a, b, beta, c);
}

Buf upload(Ctx& ctx, const std::vector<float>& host, Index rows, Index cols) {
  moe::detail::require(Index(host.size()) == rows * cols, "upload: ", host.size(), " values for ", rows, " x ", cols);
  Buf out(rows, cols);
  Cuda::copy(ctx, ConstMatrixView<float>{host.data(), rows, cols}, out.view());
  ctx.synchronize();
  return out;
}

std::vector<float> uniform(std::mt19937& gen, Index count, float bound) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (float& x : v) x = dist(gen);
  return v;
}

// ---- the dense baseline -----------------------------------------------------------------------

// One ReLU MLP with hidden k*h over all T tokens: its FLOPs per token equal the MoE's active
// expert FLOPs. Forward: two GEMMs and a ReLU; backward: four GEMMs (weight gradients added
// into g1, g2 as the layer does) and the ReLU mask.
struct Dense {
  Buf w1, w2, g1, g2, pre, act, y, dpre, dx;

  Dense(Ctx& ctx, std::mt19937& gen, Index tokens, Index d, Index hidden)
      : w1(upload(ctx, uniform(gen, d * hidden, 1.f / std::sqrt(float(d))), d, hidden)),
        w2(upload(ctx, uniform(gen, hidden * d, 1.f / std::sqrt(float(hidden))), hidden, d)),
        g1(d, hidden, 0.f),
        g2(hidden, d, 0.f),
        pre(tokens, hidden),
        act(tokens, hidden),
        y(tokens, d),
        dpre(tokens, hidden),
        dx(tokens, d) {}

  void forward(const Ctx& ctx, ConstMatrixView<float> x) {
    sgemm(ctx, Op::none, Op::none, x, w1.view(), 0.f, pre.view());
    relu(ctx, pre, act);
    sgemm(ctx, Op::none, Op::none, std::as_const(act).view(), w2.view(), 0.f, y.view());
  }
  void backward(const Ctx& ctx, ConstMatrixView<float> x, ConstMatrixView<float> dy) {
    sgemm(ctx, Op::transpose, Op::none, std::as_const(act).view(), dy, 1.f, g2.view());   // g2 += act^T dy
    sgemm(ctx, Op::none, Op::transpose, dy, std::as_const(w2).view(), 0.f, dpre.view());  // dact = dy w2^T
    relu_mask(ctx, pre, dpre);
    sgemm(ctx, Op::transpose, Op::none, x, std::as_const(dpre).view(), 1.f, g1.view());  // g1 += x^T dpre
    sgemm(ctx, Op::none, Op::transpose, std::as_const(dpre).view(), std::as_const(w1).view(), 0.f, dx.view());
  }
};

// ---- the naive per-expert loop ----------------------------------------------------------------

// The routing of one forward, rebuilt on the host from its expert index [T x k]: the routed
// slots sorted stably by expert (as the layer's plan sorts them) and each expert's row range.
struct HostRouting {
  std::vector<Index> slot_of;    // [routed] slot t*k + j of sorted row p
  std::vector<Index> offsets;    // [n + 1] expert e owns sorted rows [offsets[e], offsets[e + 1])
  std::vector<Index> row_of;     // [T*k] sorted row of slot s, -1 if not routed
  std::vector<Index> expert_of;  // [T*k] the slot's expert, -1 if not routed

  HostRouting(Ctx& ctx, const Layer::Forward& f, Index n) {
    expert_of = moe::to_host<Cuda>(ctx, f.expert_index());
    offsets.assign(static_cast<std::size_t>(n + 1), 0);
    for (const Index e : expert_of) {
      if (e == moe::kNotRouted) continue;
      moe::detail::require(e >= 0 && e < n, "routing: expert ", e, " outside [0, ", n, ")");
      ++offsets[static_cast<std::size_t>(e + 1)];
    }
    for (std::size_t e = 0; e < static_cast<std::size_t>(n); ++e) offsets[e + 1] += offsets[e];
    slot_of.assign(static_cast<std::size_t>(offsets.back()), -1);
    row_of.assign(expert_of.size(), -1);
    std::vector<Index> next(offsets.begin(), offsets.end() - 1);
    for (std::size_t s = 0; s < expert_of.size(); ++s) {
      const Index e = expert_of[s];
      if (e == moe::kNotRouted) continue;
      const Index p = next[static_cast<std::size_t>(e)]++;
      slot_of[static_cast<std::size_t>(p)] = Index(s);
      row_of[s] = p;
    }
    // The layer counted the same routing: its statistics must agree with ours.
    const auto& counts = f.stats().tokens_per_expert;
    moe::detail::require(counts.size() == static_cast<std::size_t>(n), "routing: the layer reported ", counts.size(),
                         " expert counts, expected ", n);
    for (std::size_t e = 0; e < counts.size(); ++e)
      moe::detail::require(counts[e] == offsets[e + 1] - offsets[e], "routing: expert ", e, " has ",
                           offsets[e + 1] - offsets[e], " rows in the expert index but ", counts[e],
                           " in the layer's statistics");
  }
  [[nodiscard]] Index routed() const { return Index(slot_of.size()); }
};

// The experts' forward on the sorted rows: for each expert with rows, one cuBLAS GEMM of its
// rows by its W1, then one ReLU over all rows, then one GEMM of its rows by its W2 (n launches
// per GEMM), against the layer's own expert group (one grouped GEMM launch each) on the same rows.
struct Naive {
  std::vector<Index> offsets;
  Cuda::Buffer<Index> offsets_dev;
  Buf xs, pre, act, ys, ys_grouped;
  ConstMatrixView<float> w1, w2;  // stacked [n*d x h] and [n*h x d], the layer's own weights
  Layer::ExpertGroup::Saved saved;
  Index d, h;

  static ConstMatrixView<float> param(Layer& layer, const std::string& name) {
    for (auto& p : layer.parameters())
      if (p.name == name) return p.value;
    throw std::logic_error("the layer has no parameter " + name);
  }

  Naive(Ctx& ctx, Layer& layer, const HostRouting& r, const std::vector<float>& x_host, Index d_model, Index hidden)
      : offsets(r.offsets),
        w1(param(layer, "experts.w1")),
        w2(param(layer, "experts.w2")),
        d(d_model),
        h(hidden) {
    const Index n = Index(offsets.size()) - 1, routed = r.routed(), k = layer.k();
    moe::detail::require(w1.rows == n * d && w1.cols == h && w2.rows == n * h && w2.cols == d,
                         "naive: the layer's expert weights are ", w1.rows, " x ", w1.cols, " and ", w2.rows, " x ",
                         w2.cols, ", expected ", n * d, " x ", h, " and ", n * h, " x ", d);
    // Gather the routed slots' tokens on the host in sorted order, then upload.
    std::vector<float> xs_host(static_cast<std::size_t>(routed * d));
    for (Index p = 0; p < routed; ++p) {
      const Index t = r.slot_of[static_cast<std::size_t>(p)] / k;
      std::copy_n(x_host.begin() + t * d, d, xs_host.begin() + p * d);
    }
    xs = upload(ctx, xs_host, routed, d);
    offsets_dev.resize(n + 1, 1);
    Cuda::copy(ctx, ConstMatrixView<Index>{offsets.data(), n + 1, 1}, offsets_dev.view());
    pre.resize(routed, h);
    act.resize(routed, h);
    ys.resize(routed, d);
    ys_grouped.resize(routed, d);
    ctx.synchronize();
  }

  void forward(const Ctx& ctx) {
    const Index n = Index(offsets.size()) - 1;
    for (Index e = 0; e < n; ++e) {
      const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e + 1)] - r0;
      if (m == 0) continue;
      sgemm(ctx, Op::none, Op::none, std::as_const(xs).view().block_rows(r0, m), w1.block_rows(e * d, d), 0.f,
            pre.view().block_rows(r0, m));
    }
    relu(ctx, pre, act);
    for (Index e = 0; e < n; ++e) {
      const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e + 1)] - r0;
      if (m == 0) continue;
      sgemm(ctx, Op::none, Op::none, std::as_const(act).view().block_rows(r0, m), w2.block_rows(e * h, h), 0.f,
            ys.view().block_rows(r0, m));
    }
  }

  // The layer's expert group alone (grouped GEMM, ReLU, grouped GEMM) on the same sorted rows.
  void grouped(Ctx& ctx, Layer& layer) {
    layer.experts().forward(ctx, std::as_const(xs).view(), offsets_dev.data(), ys_grouped.view(), saved);
  }
};

// ---- one expert count -------------------------------------------------------------------------

enum Task : int { kLayerFwd, kLayerFwdBwd, kDenseFwd, kDenseFwdBwd, kNaiveFwd, kGroupedFwd, kTaskCount };
constexpr const char* kTaskNames[kTaskCount] = {"layer_forward", "layer_forward_backward", "dense_forward",
                                                "dense_forward_backward", "naive_loop_forward",
                                                "layer_experts_forward"};

struct Result {
  Index n = 0, min_tokens = 0, max_tokens = 0, experts_used = 0;
  double flop = 0;          // one forward: experts + gate
  double weight_bytes = 0;  // all experts' W1 and W2
  double naive_vs_grouped = 0;  // max |ys_naive - ys_grouped| / max |ys_naive|
  double naive_vs_layer = 0;    // max |y from the naive loop, combined - the layer's y| / max |y|
  std::vector<Measured> m;      // by Task

  [[nodiscard]] double seconds(Task t) const { return m[std::size_t(t)].seconds; }
  [[nodiscard]] double tflops(Task t, double scale) const { return scale * flop / seconds(t) * 1e-12; }
};

double max_abs(const std::vector<float>& v) {
  double out = 0;
  for (const float x : v) out = std::max(out, double(std::fabs(x)));
  return out;
}

Result run_experts(Ctx& ctx, const Shape& s, Index n, Dense& dense, const std::vector<float>& x_host,
                   ConstMatrixView<float> x, ConstMatrixView<float> dy) {
  Layer layer(Layer::Config{.d_model = s.d, .n_experts = n, .expert = {.hidden = s.h}, .gate = {.k = s.k}, .seed = 1});
  moe::Rng rng(42);
  Result r;
  r.n = n;
  r.flop = s.expert_flop() + s.gate_flop(n);
  r.weight_bytes = s.weight_bytes(n);

  const Layer::Forward first = layer.forward(x, moe::Mode::train, rng);
  const auto& counts = first.stats().tokens_per_expert;
  r.min_tokens = *std::min_element(counts.begin(), counts.end());
  r.max_tokens = *std::max_element(counts.begin(), counts.end());
  r.experts_used = Index(std::count_if(counts.begin(), counts.end(), [](Index c) { return c > 0; }));

  // The naive loop on the first forward's routing, checked once against the layer's expert
  // group (same rows, same weights) and against the layer's combined output.
  const HostRouting routing(ctx, first, n);
  Naive naive(ctx, layer, routing, x_host, s.d, s.h);
  naive.forward(ctx);
  naive.grouped(ctx, layer);
  const std::vector<float> ys_naive = moe::to_host<Cuda>(ctx, std::as_const(naive.ys).view());
  const std::vector<float> ys_grouped = moe::to_host<Cuda>(ctx, std::as_const(naive.ys_grouped).view());
  double diff = 0;
  for (std::size_t i = 0; i < ys_naive.size(); ++i)
    diff = std::max(diff, double(std::fabs(ys_naive[i] - ys_grouped[i])));
  r.naive_vs_grouped = diff / std::max(max_abs(ys_naive), 1e-30);
  {
    const std::vector<float> gates = moe::to_host<Cuda>(ctx, first.gates());
    const std::vector<float> y_layer = moe::to_host<Cuda>(ctx, first.y());
    std::vector<float> y(y_layer.size(), 0.f);
    const Index d = s.d, k = s.k;
    for (Index t = 0; t < s.tokens; ++t)
      for (Index j = 0; j < k; ++j) {
        const Index p = routing.row_of[static_cast<std::size_t>(t * k + j)];
        if (p < 0) continue;
        const float g = gates[static_cast<std::size_t>(t * k + j)];
        for (Index c = 0; c < d; ++c)
          y[static_cast<std::size_t>(t * d + c)] += g * ys_naive[static_cast<std::size_t>(p * d + c)];
      }
    double ydiff = 0;
    for (std::size_t i = 0; i < y.size(); ++i) ydiff = std::max(ydiff, double(std::fabs(y[i] - y_layer[i])));
    r.naive_vs_layer = ydiff / std::max(max_abs(y_layer), 1e-30);
  }

  Layer::Forward step;    // reused across calls, as a training loop does
  Layer::Backward grads;  // likewise
  r.m = measure(s.warmup, s.reps,
                {
                    [&] {
                      layer.forward_into(step, x, moe::Mode::train, rng);
                      ctx.synchronize();
                    },
                    [&] {
                      layer.forward_into(step, x, moe::Mode::train, rng);
                      layer.backward_into(grads, step, dy);
                      ctx.synchronize();
                    },
                    [&] {
                      dense.forward(ctx, x);
                      ctx.synchronize();
                    },
                    [&] {
                      dense.forward(ctx, x);
                      dense.backward(ctx, x, dy);
                      ctx.synchronize();
                    },
                    [&] {
                      naive.forward(ctx);
                      ctx.synchronize();
                    },
                    [&] {
                      naive.grouped(ctx, layer);
                      ctx.synchronize();
                    },
                });
  return r;
}

// ---- reporting --------------------------------------------------------------------------------

struct Device {
  std::string name;
  int major = 0, minor = 0, sms = 0;
  double clock_ghz = 0;
  double fp32_peak = 0;  // FLOP/s from the SM count and boost clock, 0 if the architecture is unknown here
};

Device query_device() {
  Device dev;
  int id = 0, clock_khz = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&id));
  dev.name = mc::device_name();
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&dev.major, cudaDevAttrComputeCapabilityMajor, id));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&dev.minor, cudaDevAttrComputeCapabilityMinor, id));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, id));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, id));
  dev.clock_ghz = clock_khz * 1e-6;
  // fp32 lanes per SM: 64 on Volta, Turing and A100; 128 on GA10x, Ada, Hopper and Blackwell.
  int lanes = 0;
  if (dev.major == 7 || (dev.major == 8 && dev.minor == 0)) lanes = 64;
  if ((dev.major == 8 && dev.minor != 0) || dev.major == 9 || dev.major == 10 || dev.major == 12) lanes = 128;
  dev.fp32_peak = double(dev.sms) * lanes * 2.0 * clock_khz * 1e3;
  return dev;
}

struct Run {
  Shape shape;
  Device device;
  bool quick = false;
  std::vector<Result> results;

  [[nodiscard]] double peak() const { return device.fp32_peak > 0 ? device.fp32_peak : kH100Fp32Peak; }
};

void print_roofline(const Run& run) {
  const Shape& s = run.shape;
  const Device& dev = run.device;
  std::printf("cuda_layer: %s (sm_%d%d, %d SMs, %.2f GHz boost), float, T=%lld d=%lld h=%lld k=%lld, median of %d after %d warm-up\n",
              dev.name.c_str(), dev.major, dev.minor, dev.sms, dev.clock_ghz, (long long)s.tokens, (long long)s.d,
              (long long)s.h, (long long)s.k, s.reps, s.warmup);
  std::printf("roofline:\n");
  std::printf("  active FLOP per token = 4*k*d*h = %.3g (+ gate 4*d*n: x W_gate and x W_noise)\n",
              4.0 * double(s.k) * double(s.d) * double(s.h));
  std::printf("  expert weight bytes = n*2*d*h*4:");
  for (const Index n : s.experts) std::printf("  n=%lld: %.0f MB", (long long)n, s.weight_bytes(n) / 1e6);
  std::printf("\n  fp32 non-tensor peak: H100 SXM ~67 TFLOP/s (132 SMs x 128 lanes x 2 x 1.98 GHz; PCIe ~51);");
  if (dev.fp32_peak > 0)
    std::printf(" this device by SMs x lanes x 2 x clock: %.1f TFLOP/s\n", dev.fp32_peak * 1e-12);
  else
    std::printf(" this device: unknown (the table's %%peak uses 67)\n");
  std::printf("  floors at that peak and at H100 SXM HBM3 3.35 TB/s (weights read once per forward):\n");
  for (const Index n : s.experts) {
    const double flop = s.expert_flop() + s.gate_flop(n);
    std::printf("    n=%lld: compute %.3f ms, weights %.3f ms per forward\n", (long long)n, flop / run.peak() * 1e3,
                s.weight_bytes(n) / kH100Bandwidth * 1e3);
  }
  std::printf(
      "  the layer's experts run our fp32 CUDA-core grouped GEMM kernel (no tensor cores); the dense and naive\n"
      "  baselines run cuBLAS SGEMM, also true fp32 (CUBLAS_DEFAULT_MATH, no TF32): compare fp32 with fp32.\n\n");
}

void print_table(const Run& run) {
  std::printf("%5s %7s %9s %7s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %7s %7s %7s %7s\n", "n", "GFLOP",
              "tok/exp", "wt MB", "layer", "layer", "TFLOP/s", "TFLOP/s", "%peak", "dense", "dense", "naive",
              "experts", "layer/", "layer/", "naive/", "naive/");
  std::printf("%5s %7s %9s %7s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %7s %7s %7s %7s\n", "", "fwd", "", "",
              "fwd ms", "f+b ms", "fwd", "f+b", "fwd", "fwd ms", "f+b ms", "fwd ms", "fwd ms", "dense", "dense",
              "layer", "experts");
  std::printf("%5s %7s %9s %7s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %7s %7s %7s %7s\n", "", "", "", "", "",
              "", "", "", "", "", "", "", "", "fwd", "f+b", "fwd", "fwd");
  for (const Result& r : run.results) {
    const std::string tokens = std::to_string(r.min_tokens) + "-" + std::to_string(r.max_tokens);
    const auto ms = [&](Task t) { return r.seconds(t) * 1e3; };
    std::printf("%5lld %7.1f %9s %7.0f | %8.3f %8.3f %7.2f %7.2f %5.0f%% | %8.3f %8.3f | %8.3f %8.3f | %7.2f %7.2f "
                "%7.2f %7.2f\n",
                (long long)r.n, r.flop * 1e-9, tokens.c_str(), r.weight_bytes / 1e6, ms(kLayerFwd), ms(kLayerFwdBwd),
                r.tflops(kLayerFwd, 1), r.tflops(kLayerFwdBwd, 3), 100 * r.tflops(kLayerFwd, 1) * 1e12 / run.peak(),
                ms(kDenseFwd), ms(kDenseFwdBwd), ms(kNaiveFwd), ms(kGroupedFwd), ms(kLayerFwd) / ms(kDenseFwd),
                ms(kLayerFwdBwd) / ms(kDenseFwdBwd), ms(kNaiveFwd) / ms(kLayerFwd), ms(kNaiveFwd) / ms(kGroupedFwd));
  }
  std::printf(
      "GFLOP: experts 4*T*k*d*h + gate 4*T*d*n per forward; f+b TFLOP/s counts 3x that. layer: the whole forward\n"
      "(input check, gate, dispatch, experts, combine, balance statistics), forward+backward adds the backward.\n"
      "dense: one ReLU MLP with hidden k*h on cuBLAS. naive: the experts' forward alone as a per-expert loop of\n"
      "cuBLAS GEMMs on the first forward's routing (rows sorted by expert on the host); experts: the layer's own\n"
      "expert group (grouped GEMM kernels) on the same rows. naive/layer compares that loop with the whole layer.\n");
  std::printf("\nchecks (relative max |difference|): naive loop vs the layer's experts on the same rows; naive loop,\n"
              "combined with the gates, vs the layer's output:");
  for (const Result& r : run.results)
    std::printf("  n=%lld: %.2g, %.2g", (long long)r.n, r.naive_vs_grouped, r.naive_vs_layer);
  std::printf("\n");
}

std::string to_json(const Run& run) {
  const Shape& s = run.shape;
  Json j;
  j.open("", '{').str("benchmark", "cuda_layer").str("scalar", "float").str("device", run.device.name);
  j.num("compute_capability", run.device.major * 10 + run.device.minor).num("sms", run.device.sms);
  j.num("boost_clock_ghz", run.device.clock_ghz).num("fp32_peak_flops_estimate", run.device.fp32_peak);
  j.num("h100_sxm_fp32_peak_flops", kH100Fp32Peak);
  j.num("d_model", double(s.d)).num("hidden", double(s.h)).num("k", double(s.k)).num("tokens", double(s.tokens));
  j.num("repetitions", s.reps).num("warmup", s.warmup).num("quick", run.quick ? 1 : 0);
  j.open("results", '[');
  for (const Result& r : run.results) {
    j.open("", '{').num("n_experts", double(r.n)).num("experts_used", double(r.experts_used));
    j.num("min_tokens_per_expert", double(r.min_tokens)).num("max_tokens_per_expert", double(r.max_tokens));
    j.num("flop_forward", r.flop).num("expert_weight_bytes", r.weight_bytes);
    j.num("layer_forward_tflops", r.tflops(kLayerFwd, 1)).num("layer_forward_backward_tflops", r.tflops(kLayerFwdBwd, 3));
    j.num("layer_forward_fraction_of_peak", r.tflops(kLayerFwd, 1) * 1e12 / run.peak());
    j.num("layer_over_dense_forward", r.seconds(kLayerFwd) / r.seconds(kDenseFwd));
    j.num("layer_over_dense_forward_backward", r.seconds(kLayerFwdBwd) / r.seconds(kDenseFwdBwd));
    j.num("naive_over_layer_forward", r.seconds(kNaiveFwd) / r.seconds(kLayerFwd));
    j.num("naive_over_layer_experts_forward", r.seconds(kNaiveFwd) / r.seconds(kGroupedFwd));
    j.num("naive_vs_layer_experts_rel_diff", r.naive_vs_grouped).num("naive_vs_layer_output_rel_diff", r.naive_vs_layer);
    j.open("tasks", '{');
    for (int t = 0; t < kTaskCount; ++t) j.num(std::string(kTaskNames[t]) + "_s", r.m[std::size_t(t)].seconds);
    j.close('}').close('}');
  }
  j.close(']').close('}');
  return j.text();
}

}  // namespace

constexpr const char* kUsage =
    "usage: cuda_layer [--quick] [--json PATH]\n"
    "  --quick      tiny sizes and one repetition: a smoke run, not a measurement\n"
    "  --json PATH  where to write the results (default bench_cuda.json)\n"
    "Exits 77 when no CUDA device answers.\n";

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse_options(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_layer: %s\n%s", e.what(), kUsage);
    return 2;
  }
  if (opt.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!mc::device_available()) {
    std::printf("SKIPPED: cuda_layer: no CUDA device answered\n");
    return 77;
  }
  try {
    Run run;
    run.shape = shape_for(opt.quick);
    run.quick = opt.quick;
    run.device = query_device();
    const Shape& s = run.shape;
    print_roofline(run);
    std::fflush(stdout);

    Ctx ctx;
    std::mt19937 gen(7);
    const std::vector<float> x_host = uniform(gen, s.tokens * s.d, 1.f);
    const std::vector<float> dy_host = uniform(gen, s.tokens * s.d, 1e-2f);
    const Buf x = upload(ctx, x_host, s.tokens, s.d);
    const Buf dy = upload(ctx, dy_host, s.tokens, s.d);
    Dense dense(ctx, gen, s.tokens, s.d, s.k * s.h);
    for (const Index n : s.experts) {
      run.results.push_back(run_experts(ctx, s, n, dense, x_host, x.view(), dy.view()));
      std::fprintf(stderr, "cuda_layer: n=%lld done\n", (long long)n);
    }

    print_table(run);
    write_atomically(opt.json, to_json(run));
    std::printf("wrote %s\n", opt.json.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_layer: %s\n", e.what());
    return 1;
  }
  return 0;
}
