// Throughput of moe::Layer<FeedForward, NoisyTopK, Cuda<float>> on one GPU, with the experts'
// GEMMs in each precision of moe::Precision (fp32: the exact CUDA-core kernels; tf32 and bf16:
// the tensor-core kernels, operands rounded as they are staged, fp32 accumulation), against
// cuBLAS in the same precision (fp32: cublasSgemm with default math; tf32: cublasGemmEx with
// CUBLAS_COMPUTE_32F_FAST_TF32; bf16: cublasGemmEx on bf16 copies with CUBLAS_COMPUTE_32F and
// fp32 output). All in one run; each section times its tasks round-robin (bench::measure), each
// task ending in a synchronize of the library stream, timed by the host clock (section 1 repeats
// each GEMM inside its task to a few milliseconds, so that the wait does not count):
//   1. experts alone: one grouped GEMM over n experts (forward, dgrad and wgrad shapes) with
//      balanced routing (every expert exactly m rows) and skewed routing (half the rows to
//      expert 0), against ONE dense cuBLAS GEMM of the same FLOPs;
//   2. the whole layer forward and forward+backward (Config::check_finite off, as in production)
//      against a dense ReLU MLP of the same active FLOPs (hidden k*h), and the experts' forward
//      against a naive loop of one cuBLAS GEMM per expert on the same rows and weights;
//   3. cost per token at a fixed number of rows per expert as n grows (to 1024), each point
//      skipped where it would not fit in device memory or in the run's time budget;
//   4. the fixed cost of a step: a host wait, a launch, a tiny layer's forward and backward, and
//      the backward's launches counted by capturing it into a CUDA graph.
// Prints tables with the goals next to the measured ratios and writes JSON (after each section,
// so that a run cut short leaves what it measured). A benchmark reports; it never fails on a
// missed goal, and timings never go in the tests. Exits 77 when no CUDA device answers.
//
//   cuda_layer [--quick] [--precision fp32,tf32,bf16] [--json PATH]

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
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
using moe::ConstMatrixView, moe::Index, moe::MatrixView, moe::Op, moe::Precision;
namespace mc = moe::backend::cuda;
using Cuda = moe::backend::Cuda<float>;
using Ctx = Cuda::Context;
using Buf = Cuda::Buffer<float>;
using BBuf = Cuda::Buffer<__nv_bfloat16>;
using IBuf = Cuda::Buffer<Index>;
using Layer = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cuda>;

// H100 SXM5, dense (no sparsity): fp32 on CUDA cores, 132 SMs x 128 lanes x 2 FLOP (FMA) x
// 1.98 GHz (PCIe ~51); tf32 and bf16 on tensor cores, 132 SMs x 2048 and 4096 FLOP per clock x
// 1.83 GHz (NVIDIA's figures).
constexpr double kH100Fp32Peak = 66.9e12;
constexpr double kH100Tf32Peak = 494.7e12;
constexpr double kH100Bf16Peak = 989.4e12;
constexpr double kH100Bandwidth = 3.35e12;  // HBM3, SXM5, bytes/s

// The goals printed next to the measured ratios (reported, never enforced).
constexpr double kGoalExpertsBalanced = 0.9;  // bf16 grouped GEMM / dense cuBLAS, balanced routing
constexpr double kGoalExpertsSkewed = 0.8;    // the same, skewed routing
constexpr Index kGoalRowsPerExpert = 1024;    // ... at this many rows per expert and more
constexpr double kGoalLayerFwdBwd = 0.75;     // whole layer forward+backward / dense MLP
constexpr double kGoalScaling = 1.3;          // cost per token, max / min over n

// What docs/cuda.md states a flat forward and backward wait on the host (not measured here).
constexpr int kWaitsForward = 2, kWaitsBackward = 0;                // check_finite = false
constexpr int kWaitsForwardChecked = 3, kWaitsBackwardChecked = 1;  // check_finite = true

const std::vector<Precision> kAllPrecisions = {Precision::fp32, Precision::tf32, Precision::bf16};

struct Options {
  bool quick = false;
  bool help = false;
  std::string json = "bench_cuda.json";
  std::vector<Precision> precisions = kAllPrecisions;
};

// Section 2: the layer against the dense MLP and the naive loop.
struct Shape {
  Index tokens, d, h, k;
  std::vector<Index> experts;
  int warmup, reps;

  [[nodiscard]] double expert_flop() const { return 4.0 * double(tokens) * double(k) * double(d) * double(h); }
  [[nodiscard]] double gate_flop(Index n) const { return 4.0 * double(tokens) * double(d) * double(n); }
  [[nodiscard]] double weight_bytes(Index n) const { return double(n) * 2.0 * double(d) * double(h) * sizeof(float); }
};

// Section 1: grouped GEMMs alone, n experts of m rows each.
struct GemmShape {
  Index d, h;
  std::vector<std::pair<Index, Index>> configs;  // (n, m)
  int warmup, reps;
  double target_s;  // each timed task repeats its GEMM to last about this long (0: once)
};

// Section 3: cost per token at m rows per expert, T = m * n / k tokens. A point that would
// end past budget_s seconds into the run (guessed from the last point's time) is skipped.
struct ScalingShape {
  Index d, h, k, m;
  std::vector<Index> experts;
  int warmup, reps;
  double budget_s;
};

// Section 4: a tiny layer, where a step costs its launches and host waits.
struct OverheadShape {
  Index tokens, d, h, n, k;
  int warmup, reps;
};

struct Plan {
  Shape layer;
  GemmShape gemm;
  ScalingShape scaling;
  OverheadShape overhead;
};

Plan plan_for(bool quick) {
  if (quick)
    return {{256, 128, 256, 2, {4, 16}, 1, 1},
            {128, 256, {{4, 128}}, 1, 1, 0.0},
            {64, 64, 2, 16, {8, 64, 1024}, 1, 1, 40.0},
            {128, 64, 64, 8, 2, 1, 3}};
  return {{4096, 1024, 4096, 2, {8, 32, 128}, 3, 15},
          {1024, 4096, {{8, 1024}, {64, 1024}, {8, 4096}}, 1, 7, 3e-3},
          {512, 1024, 2, 1024, {8, 16, 32, 64, 128, 256, 512, 1024}, 1, 3, 170.0},
          {128, 64, 64, 8, 2, 5, 51}};
}

int precision_rank(Precision p) { return p == Precision::fp32 ? 0 : p == Precision::tf32 ? 1 : 2; }

std::vector<Precision> parse_precisions(const std::string& text) {
  std::vector<Precision> out;
  std::size_t begin = 0;
  while (begin <= text.size()) {
    const std::size_t end = std::min(text.find(',', begin), text.size());
    const std::string name = text.substr(begin, end - begin);
    Precision p{};
    if (name == "fp32") {
      p = Precision::fp32;
    } else if (name == "tf32") {
      p = Precision::tf32;
    } else if (name == "bf16") {
      p = Precision::bf16;
    } else {
      throw std::invalid_argument("--precision: unknown precision '" + name + "' (expected fp32, tf32 or bf16)");
    }
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    begin = end + 1;
  }
  std::sort(out.begin(), out.end(), [](Precision a, Precision b) { return precision_rank(a) < precision_rank(b); });
  return out;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--help" || arg == "-h") {
      o.help = true;
    } else if (arg == "--json" || arg == "--precision") {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      if (arg == "--json")
        o.json = argv[++i];
      else
        o.precisions = parse_precisions(argv[++i]);
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

// The bf16 baselines' activations: act = bf16(max(pre, 0)).
__global__ void relu_bf16_kernel(const float* __restrict__ pre, __nv_bfloat16* __restrict__ act, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    act[i] = __float2bfloat16_rn(pre[i] > 0.f ? pre[i] : 0.f);
}

// ... and their ReLU backward: out = bf16(grad) where pre > 0, else 0.
__global__ void relu_mask_bf16_kernel(const float* __restrict__ pre, const float* __restrict__ grad,
                                      __nv_bfloat16* __restrict__ out, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    out[i] = __float2bfloat16_rn(pre[i] > 0.f ? grad[i] : 0.f);
}

// out = bf16(in), round to nearest even (the rounding of moe::round_to_bf16).
__global__ void to_bf16_kernel(const float* __restrict__ in, __nv_bfloat16* __restrict__ out, Index count) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step)
    out[i] = __float2bfloat16_rn(in[i]);
}

// Uniform values in [-bound, bound) from a hash of (seed, index): large inputs made on the device.
__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__global__ void fill_uniform_kernel(float* __restrict__ out, Index count, std::uint64_t seed, float bound) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    const std::uint64_t bits = splitmix64(seed * 0x100000001B3ull ^ static_cast<std::uint64_t>(i));
    const float u = static_cast<float>(bits >> 40) * (1.f / 16777216.f);  // [0, 1), 24 bits
    out[i] = (2.f * u - 1.f) * bound;
  }
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

void relu_bf16(const Ctx& ctx, const Buf& pre, BBuf& act) {
  if (pre.size() == 0) return;
  relu_bf16_kernel<<<blocks_for(pre.size()), kThreads, 0, ctx.stream()>>>(pre.data(), act.data(), pre.size());
  MOE_CUDA_CHECK_LAUNCH();
}

void relu_mask_bf16(const Ctx& ctx, const Buf& pre, const Buf& grad, BBuf& out) {
  if (pre.size() == 0) return;
  relu_mask_bf16_kernel<<<blocks_for(pre.size()), kThreads, 0, ctx.stream()>>>(pre.data(), grad.data(), out.data(),
                                                                               pre.size());
  MOE_CUDA_CHECK_LAUNCH();
}

// A bf16 copy of a contiguous view, finished before it returns (made once, outside any timing).
BBuf to_bf16(const Ctx& ctx, ConstMatrixView<float> v) {
  moe::detail::require(v.rows <= 1 || v.stride == v.cols, "to_bf16: the view is not contiguous");
  BBuf out(v.rows, v.cols);
  if (out.size() > 0) {
    to_bf16_kernel<<<blocks_for(out.size()), kThreads, 0, ctx.stream()>>>(v.data, out.data(), out.size());
    MOE_CUDA_CHECK_LAUNCH();
  }
  ctx.synchronize();
  return out;
}

void fill_uniform(const Ctx& ctx, Buf& b, std::uint64_t seed, float bound) {
  if (b.size() == 0) return;
  fill_uniform_kernel<<<blocks_for(b.size()), kThreads, 0, ctx.stream()>>>(b.data(), b.size(), seed, bound);
  MOE_CUDA_CHECK_LAUNCH();
}

Buf upload(Ctx& ctx, const std::vector<float>& host, Index rows, Index cols) {
  moe::detail::require(Index(host.size()) == rows * cols, "upload: ", host.size(), " values for ", rows, " x ", cols);
  Buf out(rows, cols);
  Cuda::copy(ctx, ConstMatrixView<float>{host.data(), rows, cols}, out.view());
  ctx.synchronize();
  return out;
}

IBuf upload_offsets(Ctx& ctx, const std::vector<Index>& offsets) {
  IBuf out(Index(offsets.size()), 1);
  Cuda::copy(ctx, ConstMatrixView<Index>{offsets.data(), Index(offsets.size()), 1}, out.view());
  ctx.synchronize();
  return out;
}

std::vector<float> uniform(std::mt19937& gen, Index count, float bound) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (float& x : v) x = dist(gen);
  return v;
}

double max_abs(const std::vector<float>& v) {
  double out = 0;
  for (const float x : v) out = std::max(out, double(std::fabs(x)));
  return out;
}

// max |a - b| / max |b|
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) diff = std::max(diff, double(std::fabs(a[i] - b[i])));
  return diff / std::max(max_abs(b), 1e-30);
}

// Device memory free now, in bytes.
double free_device_bytes() {
  std::size_t free = 0, total = 0;
  MOE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return double(free);
}

// Gives the Thrust temporaries the caching allocator holds back to the driver.
void release_cached() { mc::caching_allocator().release_cached(); }

// ---- dense GEMMs in each precision ------------------------------------------------------------

// A row-major, contiguous device matrix of fp32 or bf16 elements: a cuBLAS operand.
struct Operand {
  const void* data = nullptr;
  Index rows = 0, cols = 0;
  cudaDataType_t type = CUDA_R_32F;

  [[nodiscard]] Operand block_rows(Index first, Index count) const {
    const Index size = type == CUDA_R_16BF ? 2 : 4;
    return {static_cast<const char*>(data) + first * cols * size, count, cols, type};
  }
};

Operand operand(ConstMatrixView<float> v) {
  moe::detail::require(v.rows <= 1 || v.stride == v.cols, "operand: the view is not contiguous");
  return {v.data, v.rows, v.cols, CUDA_R_32F};
}
Operand operand(const Buf& b) { return operand(b.view()); }
Operand operand(const BBuf& b) { return {b.data(), b.rows(), b.cols(), CUDA_R_16BF}; }

cublasOperation_t blas_op(Op op) { return op == Op::none ? CUBLAS_OP_N : CUBLAS_OP_T; }

// c = op(a) op(b) + beta c on cuBLAS, in precision p: fp32 through the library's own cuBLAS path
// (cublasSgemm, CUBLAS_DEFAULT_MATH: true fp32, no TF32); tf32: cublasGemmEx on the fp32 data
// with CUBLAS_COMPUTE_32F_FAST_TF32; bf16: cublasGemmEx on bf16 operands, CUBLAS_COMPUTE_32F,
// fp32 output. c is fp32 and contiguous in every precision.
void gemm_in(const Ctx& ctx, Precision p, Op ta, Op tb, Operand a, Operand b, float beta, MatrixView<float> c) {
  const Index m = ta == Op::none ? a.rows : a.cols;
  const Index ka = ta == Op::none ? a.cols : a.rows;
  const Index kb = tb == Op::none ? b.rows : b.cols;
  const Index n = tb == Op::none ? b.cols : b.rows;
  moe::detail::require(ka == kb && c.rows == m && c.cols == n && ka > 0, "gemm_in: shapes do not agree: op(a) is ", m,
                       " x ", ka, ", op(b) is ", kb, " x ", n, ", c is ", c.rows, " x ", c.cols);
  moe::detail::require(c.rows <= 1 || c.stride == c.cols, "gemm_in: c is not contiguous");
  const cudaDataType_t want = p == Precision::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  moe::detail::require(a.type == want && b.type == want, "gemm_in: ", moe::to_string(p), " takes ",
                       p == Precision::bf16 ? "bf16" : "fp32", " operands");
  if (m == 0 || n == 0) return;
  if (p == Precision::fp32) {
    mc::gemm<float>(ctx, ta, tb, 1.f, ConstMatrixView<float>{static_cast<const float*>(a.data), a.rows, a.cols},
                    ConstMatrixView<float>{static_cast<const float*>(b.data), b.rows, b.cols}, beta, c);
    return;
  }
  // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T (see mc::gemm).
  const float alpha = 1.f;
  const cublasComputeType_t compute = p == Precision::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MOE_CUBLAS_CHECK(cublasGemmEx_64(ctx.blas(), blas_op(tb), blas_op(ta), n, m, ka, &alpha, b.data, b.type,
                                   std::max<Index>(1, b.cols), a.data, a.type, std::max<Index>(1, a.cols), &beta,
                                   c.data, CUDA_R_32F, std::max<Index>(1, c.cols), compute, CUBLAS_GEMM_DEFAULT));
}

// Like bench::measure, for operations far shorter than a host wait: each is first run once
// (lazy setup: kernel attributes, cuBLAS heuristics), then timed once to choose how many times
// it repeats between two synchronizations (about target_s, 1 to 64 times); the results are per
// run of the operation.
std::vector<Measured> measure_repeated(const Ctx& ctx, int warmup, int reps, double target_s,
                                       const std::vector<std::function<void()>>& ops) {
  std::vector<int> inner(ops.size(), 1);
  for (std::size_t i = 0; i < ops.size(); ++i) {
    ops[i]();
    ctx.synchronize();
    if (target_s <= 0) continue;
    const auto start = bench::Clock::now();
    ops[i]();
    ctx.synchronize();
    const double seconds = std::chrono::duration<double>(bench::Clock::now() - start).count();
    inner[i] = int(std::clamp(std::ceil(target_s / std::max(seconds, 1e-7)), 1.0, 64.0));
  }
  std::vector<std::function<void()>> tasks;
  for (std::size_t i = 0; i < ops.size(); ++i)
    tasks.emplace_back([&ctx, &ops, i, times = inner[i]] {
      for (int r = 0; r < times; ++r) ops[i]();
      ctx.synchronize();
    });
  std::vector<Measured> out = measure(warmup, reps, tasks);
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i].seconds /= inner[i];
    out[i].faults /= inner[i];
  }
  return out;
}

// ---- 1. the experts' grouped GEMMs against one dense GEMM ----------------------------------------

enum GemmOp : int { kGemmForward, kGemmDgrad, kGemmWgrad, kGemmOpCount };
constexpr const char* kGemmOpNames[kGemmOpCount] = {"forward", "dgrad", "wgrad"};
constexpr const char* kRoutingNames[2] = {"balanced", "skewed"};

struct GemmRow {
  Precision precision = Precision::fp32;
  Index n = 0, m = 0;  // experts, rows per expert when balanced
  int routing = 0;     // 0 balanced, 1 skewed
  GemmOp op = kGemmForward;
  Index max_rows = 0;  // the largest expert's rows
  double flop = 0;     // 2 * (n*m) * d * h, the same for the dense GEMM
  double grouped_s = 0, dense_s = 0;
  double check = -1;  // balanced forward only: expert 0's rows against the dense GEMM, relative

  [[nodiscard]] double fraction() const { return dense_s / grouped_s; }  // of dense cuBLAS's throughput
  [[nodiscard]] double goal() const {
    if (precision != Precision::bf16 || m < kGoalRowsPerExpert) return std::nan("");
    return routing == 0 ? kGoalExpertsBalanced : kGoalExpertsSkewed;
  }
};

// Expert e's rows [offsets[e], offsets[e + 1]): m each, or half of all rows to expert 0 and the
// rest spread evenly over the others.
std::vector<Index> gemm_offsets(Index n, Index m, bool skewed) {
  std::vector<Index> offsets(static_cast<std::size_t>(n + 1), 0);
  const Index rows = n * m;
  for (Index e = 0; e < n; ++e) {
    Index count = m;
    if (skewed) {
      const Index first = n == 1 ? rows : rows / 2, rest = rows - first;
      count = e == 0 ? first : rest / (n - 1) + (e - 1 < rest % (n - 1) ? 1 : 0);
    }
    offsets[static_cast<std::size_t>(e + 1)] = offsets[static_cast<std::size_t>(e)] + count;
  }
  return offsets;
}

std::vector<GemmRow> run_gemms(Ctx& ctx, const GemmShape& s, const std::vector<Precision>& precisions) {
  std::vector<GemmRow> rows;
  const bool any_bf16 = std::find(precisions.begin(), precisions.end(), Precision::bf16) != precisions.end();
  for (const auto& config : s.configs) {
    const Index n = config.first, m = config.second, r = n * m, d = s.d, h = s.h;
    // x, dy, the stacked weights and their gradient, both outputs, and the bf16 copies.
    const double bytes =
        4.0 * double(r * d + r * h + 2 * n * d * h + r * h + r * d) + 2.0 * double(r * d + r * h + d * h);
    if (bytes > 0.85 * free_device_bytes()) {
      std::fprintf(stderr, "cuda_layer: experts n=%lld m=%lld skipped: %.1f GB would not fit\n", (long long)n,
                   (long long)m, bytes * 1e-9);
      continue;
    }
    Buf x(r, d), dy(r, h), w(n * d, h), gw(n * d, h, 0.f), ch(r, h), cd(r, d);
    fill_uniform(ctx, x, 11, 1.f);
    fill_uniform(ctx, dy, 12, 1e-2f);
    fill_uniform(ctx, w, 13, 1.f / std::sqrt(float(d)));
    ctx.synchronize();
    const std::vector<Index> balanced = gemm_offsets(n, m, false), skewed = gemm_offsets(n, m, true);
    const IBuf offsets[2] = {upload_offsets(ctx, balanced), upload_offsets(ctx, skewed)};
    Index max_rows[2] = {0, 0};
    for (Index e = 0; e < n; ++e)
      for (int k = 0; k < 2; ++k) {
        const auto& o = k == 0 ? balanced : skewed;
        max_rows[k] = std::max(max_rows[k], o[static_cast<std::size_t>(e + 1)] - o[static_cast<std::size_t>(e)]);
      }
    // The dense GEMMs use expert 0's weights for every row: the same FLOPs in one GEMM.
    const ConstMatrixView<float> wd = std::as_const(w).view().block_rows(0, d);
    BBuf xb, dyb, wdb;
    if (any_bf16) {
      xb = to_bf16(ctx, std::as_const(x).view());
      dyb = to_bf16(ctx, std::as_const(dy).view());
      wdb = to_bf16(ctx, wd);
    }
    const auto X = [&](Precision p) { return p == Precision::bf16 ? operand(xb) : operand(x); };
    const auto DY = [&](Precision p) { return p == Precision::bf16 ? operand(dyb) : operand(dy); };
    const auto WD = [&](Precision p) { return p == Precision::bf16 ? operand(wdb) : operand(wd); };

    std::vector<std::function<void()>> ops;
    for (const Precision p : precisions) {
      // dense: forward [r x d][d x h], dgrad [r x h][d x h]^T, wgrad [r x d]^T [r x h]
      ops.emplace_back([&, p] { gemm_in(ctx, p, Op::none, Op::none, X(p), WD(p), 0.f, ch.view()); });
      ops.emplace_back([&, p] { gemm_in(ctx, p, Op::none, Op::transpose, DY(p), WD(p), 0.f, cd.view()); });
      ops.emplace_back(
          [&, p] { gemm_in(ctx, p, Op::transpose, Op::none, X(p), DY(p), 1.f, gw.view().block_rows(0, d)); });
      for (int k = 0; k < 2; ++k) {
        const Index* off = offsets[k].data();
        ops.emplace_back([&, p, off] {
          mc::grouped_gemm(ctx, off, n, Op::none, std::as_const(x).view(), std::as_const(w).view(), ch.view(), p);
        });
        ops.emplace_back([&, p, off] {
          mc::grouped_gemm(ctx, off, n, Op::transpose, std::as_const(dy).view(), std::as_const(w).view(), cd.view(), p);
        });
        ops.emplace_back([&, p, off] {
          mc::grouped_gemm_wgrad(ctx, off, n, std::as_const(x).view(), std::as_const(dy).view(), 1.f, gw.view(), p);
        });
      }
    }

    // Expert 0's rows of the balanced forward equal the dense forward's (same weights, same
    // operand rounding; only the order of the fp32 sums differs, and tf32's rounding in cuBLAS).
    std::vector<double> checks;
    const Index check_rows = std::min<Index>(m, 256);
    for (std::size_t pi = 0; pi < precisions.size(); ++pi) {
      ops[pi * 9 + 3]();
      const std::vector<float> grouped = moe::to_host<Cuda>(ctx, std::as_const(ch).view().block_rows(0, check_rows));
      ops[pi * 9 + 0]();
      const std::vector<float> dense = moe::to_host<Cuda>(ctx, std::as_const(ch).view().block_rows(0, check_rows));
      checks.push_back(rel_diff(grouped, dense));
    }

    const std::vector<Measured> t = measure_repeated(ctx, s.warmup, s.reps, s.target_s, ops);
    for (std::size_t pi = 0; pi < precisions.size(); ++pi)
      for (int k = 0; k < 2; ++k)
        for (int op = 0; op < kGemmOpCount; ++op) {
          GemmRow row;
          row.precision = precisions[pi];
          row.n = n;
          row.m = m;
          row.routing = k;
          row.op = GemmOp(op);
          row.max_rows = max_rows[k];
          row.flop = 2.0 * double(r) * double(d) * double(h);
          row.dense_s = t[pi * 9 + std::size_t(op)].seconds;
          row.grouped_s = t[pi * 9 + 3 + std::size_t(k) * 3 + std::size_t(op)].seconds;
          if (k == 0 && op == kGemmForward) row.check = checks[pi];
          rows.push_back(row);
        }
    std::fprintf(stderr, "cuda_layer: experts n=%lld m=%lld done\n", (long long)n, (long long)m);
  }
  release_cached();
  return rows;
}

// ---- 2. the dense baseline ----------------------------------------------------------------------

// One ReLU MLP with hidden k*h over all T tokens: its FLOPs per token equal the MoE's active
// expert FLOPs. Forward: two GEMMs and a ReLU; backward: four GEMMs (weight gradients added
// into g1, g2 as the layer does) and the ReLU mask. In bf16 the GEMMs read bf16 copies of x, dy
// and the weights (made once) and bf16 activations (the ReLU and its mask write them), and
// write fp32: a bf16 MLP with fp32 accumulation and fp32 outputs.
struct Dense {
  ConstMatrixView<float> x, dy;
  Buf w1, w2, g1, g2, pre, act, y, dpre, dx;
  BBuf xb, dyb, w1b, w2b, actb, dpreb;

  Dense(Ctx& ctx, std::mt19937& gen, ConstMatrixView<float> x_, ConstMatrixView<float> dy_, Index hidden, bool bf16)
      : x(x_),
        dy(dy_),
        w1(upload(ctx, uniform(gen, x_.cols * hidden, 1.f / std::sqrt(float(x_.cols))), x_.cols, hidden)),
        w2(upload(ctx, uniform(gen, hidden * x_.cols, 1.f / std::sqrt(float(hidden))), hidden, x_.cols)),
        g1(x_.cols, hidden, 0.f),
        g2(hidden, x_.cols, 0.f),
        pre(x_.rows, hidden),
        act(x_.rows, hidden),
        y(x_.rows, x_.cols),
        dpre(x_.rows, hidden),
        dx(x_.rows, x_.cols) {
    if (!bf16) return;
    xb = to_bf16(ctx, x);
    dyb = to_bf16(ctx, dy);
    w1b = to_bf16(ctx, std::as_const(w1).view());
    w2b = to_bf16(ctx, std::as_const(w2).view());
    actb.resize(x_.rows, hidden);
    dpreb.resize(x_.rows, hidden);
  }

  [[nodiscard]] bool b16(Precision p) const { return p == Precision::bf16; }

  void forward(const Ctx& ctx, Precision p) {
    gemm_in(ctx, p, Op::none, Op::none, b16(p) ? operand(xb) : operand(x), b16(p) ? operand(w1b) : operand(w1), 0.f,
            pre.view());
    if (b16(p))
      relu_bf16(ctx, pre, actb);
    else
      relu(ctx, pre, act);
    gemm_in(ctx, p, Op::none, Op::none, b16(p) ? operand(actb) : operand(act), b16(p) ? operand(w2b) : operand(w2), 0.f,
            y.view());
  }
  void backward(const Ctx& ctx, Precision p) {
    const Operand a = b16(p) ? operand(actb) : operand(act), d = b16(p) ? operand(dyb) : operand(dy);
    gemm_in(ctx, p, Op::transpose, Op::none, a, d, 1.f, g2.view());  // g2 += act^T dy
    gemm_in(ctx, p, Op::none, Op::transpose, d, b16(p) ? operand(w2b) : operand(w2), 0.f, dpre.view());  // dy w2^T
    if (b16(p))
      relu_mask_bf16(ctx, pre, dpre, dpreb);
    else
      relu_mask(ctx, pre, dpre);
    const Operand g = b16(p) ? operand(dpreb) : operand(dpre);
    gemm_in(ctx, p, Op::transpose, Op::none, b16(p) ? operand(xb) : operand(x), g, 1.f, g1.view());  // g1 += x^T dpre
    gemm_in(ctx, p, Op::none, Op::transpose, g, b16(p) ? operand(w1b) : operand(w1), 0.f, dx.view());
  }
};

// ---- 2. the naive per-expert loop ---------------------------------------------------------------

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
// per GEMM), in the layer's precision, against the layer's own expert group (one grouped GEMM
// launch each) on the same rows.
struct Naive {
  Precision precision;
  std::vector<Index> offsets;
  IBuf offsets_dev;
  Buf xs, pre, act, ys, ys_grouped;
  BBuf xsb, actb, w1b, w2b;       // bf16 copies (bf16 only)
  ConstMatrixView<float> w1, w2;  // stacked [n*d x h] and [n*h x d], the layer's own weights
  Layer::ExpertGroup::Saved saved;
  Index d, h;

  static ConstMatrixView<float> param(Layer& layer, const std::string& name) {
    for (auto& p : layer.parameters())
      if (p.name == name) return p.value;
    throw std::logic_error("the layer has no parameter " + name);
  }

  Naive(Ctx& ctx, Layer& layer, const HostRouting& r, const std::vector<float>& x_host, Index d_model, Index hidden,
        Precision p)
      : precision(p),
        offsets(r.offsets),
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
    for (Index q = 0; q < routed; ++q) {
      const Index t = r.slot_of[static_cast<std::size_t>(q)] / k;
      std::copy_n(x_host.begin() + t * d, d, xs_host.begin() + q * d);
    }
    xs = upload(ctx, xs_host, routed, d);
    offsets_dev = upload_offsets(ctx, offsets);
    pre.resize(routed, h);
    act.resize(routed, h);
    ys.resize(routed, d);
    ys_grouped.resize(routed, d);
    if (p == Precision::bf16) {
      xsb = to_bf16(ctx, std::as_const(xs).view());
      w1b = to_bf16(ctx, w1);
      w2b = to_bf16(ctx, w2);
      actb.resize(routed, h);
    }
    ctx.synchronize();
  }

  void forward(const Ctx& ctx) {
    const Index n = Index(offsets.size()) - 1;
    const bool b16 = precision == Precision::bf16;
    const Operand x_all = b16 ? operand(xsb) : operand(xs), act_all = b16 ? operand(actb) : operand(act);
    const Operand w1_all = b16 ? operand(w1b) : operand(w1), w2_all = b16 ? operand(w2b) : operand(w2);
    for (Index e = 0; e < n; ++e) {
      const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e + 1)] - r0;
      if (m == 0) continue;
      gemm_in(ctx, precision, Op::none, Op::none, x_all.block_rows(r0, m), w1_all.block_rows(e * d, d), 0.f,
              pre.view().block_rows(r0, m));
    }
    if (b16)
      relu_bf16(ctx, pre, actb);
    else
      relu(ctx, pre, act);
    for (Index e = 0; e < n; ++e) {
      const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e + 1)] - r0;
      if (m == 0) continue;
      gemm_in(ctx, precision, Op::none, Op::none, act_all.block_rows(r0, m), w2_all.block_rows(e * h, h), 0.f,
              ys.view().block_rows(r0, m));
    }
  }

  // The layer's expert group alone (grouped GEMM, ReLU, grouped GEMM) on the same sorted rows.
  void grouped(Ctx& ctx, Layer& layer) {
    layer.experts().forward(ctx, std::as_const(xs).view(), offsets_dev.data(), ys_grouped.view(), saved);
  }
};

// ---- launches of a backward ---------------------------------------------------------------------

struct Launches {
  long kernels = -1, nodes = -1;  // kernel nodes, all nodes (kernels, copies, memsets); -1: not counted
};

// One backward captured into a CUDA graph (it waits on the host nowhere, so it can be captured;
// the forward waits on the host and cannot), its nodes counted, the graph dropped unlaunched.
// After a capture that fails, no other is tried.
Launches count_backward_launches(const Ctx& ctx, Layer& layer, const Layer::Forward& f, Layer::Backward& b,
                                 ConstMatrixView<float> dy) {
  static bool failed = false;
  Launches out;
  if (failed) return out;
  ctx.synchronize();
  const cudaStream_t stream = ctx.stream();
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
    static_cast<void>(cudaGetLastError());
    failed = true;
    return out;
  }
  bool ok = true;
  try {
    layer.backward_into(b, f, dy);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_layer: capturing a backward failed (%s); launches not counted\n", e.what());
    ok = false;
  }
  cudaGraph_t graph = nullptr;
  if (cudaStreamEndCapture(stream, &graph) != cudaSuccess) ok = false;
  static_cast<void>(cudaGetLastError());
  std::size_t count = 0;
  if (ok && graph != nullptr && cudaGraphGetNodes(graph, nullptr, &count) == cudaSuccess) {
    std::vector<cudaGraphNode_t> nodes(count);
    if (count == 0 || cudaGraphGetNodes(graph, nodes.data(), &count) == cudaSuccess) {
      long kernels = 0;
      for (std::size_t i = 0; i < count; ++i) {
        cudaGraphNodeType type{};
        if (cudaGraphNodeGetType(nodes[i], &type) == cudaSuccess && type == cudaGraphNodeTypeKernel) ++kernels;
      }
      out = {kernels, long(count)};
    }
  }
  if (graph != nullptr) static_cast<void>(cudaGraphDestroy(graph));
  static_cast<void>(cudaGetLastError());
  if (out.kernels < 0) failed = true;
  ctx.synchronize();
  return out;
}

// ---- 2. one expert count in one precision ---------------------------------------------------------

enum Task : int { kLayerFwd, kLayerFwdBwd, kDenseFwd, kDenseFwdBwd, kNaiveFwd, kGroupedFwd, kTaskCount };
constexpr const char* kTaskNames[kTaskCount] = {"layer_forward",      "layer_forward_backward",
                                                "dense_forward",      "dense_forward_backward",
                                                "naive_loop_forward", "layer_experts_forward"};

struct Result {
  Precision precision = Precision::fp32;
  Index n = 0, min_tokens = 0, max_tokens = 0, experts_used = 0;
  double flop = 0;              // one forward: experts + gate
  double weight_bytes = 0;      // all experts' W1 and W2
  double naive_vs_grouped = 0;  // max |ys_naive - ys_grouped| / max |ys_naive|
  double naive_vs_layer = 0;    // max |y from the naive loop, combined - the layer's y| / max |y|
  Launches backward;            // one backward's launches
  std::vector<Measured> m;      // by Task

  [[nodiscard]] double seconds(Task t) const { return m[std::size_t(t)].seconds; }
  [[nodiscard]] double tflops(Task t, double scale) const { return scale * flop / seconds(t) * 1e-12; }
};

Layer make_layer(Index d, Index n, Index h, Index k, Precision p, bool check_finite) {
  return Layer(Layer::Config{.d_model = d,
                             .n_experts = n,
                             .expert = {.hidden = h, .precision = p},
                             .gate = {.k = k},
                             .seed = 1,
                             .check_finite = check_finite});
}

Result run_experts(Ctx& ctx, const Shape& s, Index n, Precision p, Dense& dense, const std::vector<float>& x_host,
                   ConstMatrixView<float> x, ConstMatrixView<float> dy) {
  Layer layer = make_layer(s.d, n, s.h, s.k, p, false);
  moe::Rng rng(42);
  Result r;
  r.precision = p;
  r.n = n;
  r.flop = s.expert_flop() + s.gate_flop(n);
  r.weight_bytes = s.weight_bytes(n);

  const Layer::Forward first = layer.forward(x, moe::Mode::train, rng);
  const auto& counts = first.stats().tokens_per_expert;
  r.min_tokens = *std::min_element(counts.begin(), counts.end());
  r.max_tokens = *std::max_element(counts.begin(), counts.end());
  r.experts_used = Index(std::count_if(counts.begin(), counts.end(), [](Index c) { return c > 0; }));

  // The naive loop on the first forward's routing, checked once against the layer's expert
  // group (same rows, same weights, same precision) and against the layer's combined output.
  const HostRouting routing(ctx, first, n);
  Naive naive(ctx, layer, routing, x_host, s.d, s.h, p);
  naive.forward(ctx);
  naive.grouped(ctx, layer);
  const std::vector<float> ys_naive = moe::to_host<Cuda>(ctx, std::as_const(naive.ys).view());
  const std::vector<float> ys_grouped = moe::to_host<Cuda>(ctx, std::as_const(naive.ys_grouped).view());
  r.naive_vs_grouped = rel_diff(ys_grouped, ys_naive);
  {
    const std::vector<float> gates = moe::to_host<Cuda>(ctx, first.gates());
    const std::vector<float> y_layer = moe::to_host<Cuda>(ctx, first.y());
    std::vector<float> y(y_layer.size(), 0.f);
    const Index d = s.d, k = s.k;
    for (Index t = 0; t < s.tokens; ++t)
      for (Index j = 0; j < k; ++j) {
        const Index q = routing.row_of[static_cast<std::size_t>(t * k + j)];
        if (q < 0) continue;
        const float g = gates[static_cast<std::size_t>(t * k + j)];
        for (Index c = 0; c < d; ++c)
          y[static_cast<std::size_t>(t * d + c)] += g * ys_naive[static_cast<std::size_t>(q * d + c)];
      }
    r.naive_vs_layer = rel_diff(y, y_layer);
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
                      dense.forward(ctx, p);
                      ctx.synchronize();
                    },
                    [&] {
                      dense.forward(ctx, p);
                      dense.backward(ctx, p);
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
  r.backward = count_backward_launches(ctx, layer, step, grads, dy);
  return r;
}

// ---- 3. cost per token as n grows ---------------------------------------------------------------

struct ScalingRow {
  Precision precision = Precision::fp32;
  Index n = 0, tokens = 0, min_rows = 0, max_rows = 0;
  std::string status = "measured";  // or why it was skipped
  double experts_fwd_s = 0, layer_fwd_s = 0, layer_fwd_bwd_s = 0;
  double gate_share = 0;  // the gate's FLOPs / the forward's FLOPs
  Launches backward;

  [[nodiscard]] bool measured() const { return status == "measured"; }
  [[nodiscard]] double per_token_ns(double seconds) const { return seconds / double(tokens) * 1e9; }
};

// Device bytes a point needs, roughly: the layer's weights and gradients, the forward's and
// backward's per-row and per-token buffers, the noisy gate's T x n buffers, and the inputs.
double scaling_bytes(const ScalingShape& s, Index n) {
  const double rows = double(s.m) * double(n), tokens = rows / double(s.k), d = double(s.d), h = double(s.h);
  const double floats =
      4.0 * double(n) * d * h + rows * (4.0 * d + 3.0 * h) + tokens * 6.0 * d + tokens * 8.0 * double(n);
  return 1.1 * (4.0 * floats + rows * 64.0) + 256e6;
}

ScalingRow scaling_row(const ScalingShape& s, Index n, Precision p) {
  ScalingRow row;
  row.precision = p;
  row.n = n;
  row.tokens = s.m * n / s.k;
  row.gate_share =
      (4.0 * double(s.d) * double(n)) / (4.0 * double(s.d) * double(n) + 4.0 * double(s.k) * double(s.d) * double(s.h));
  return row;
}

ScalingRow run_scaling_point(Ctx& ctx, const ScalingShape& s, Index n, Precision p) {
  ScalingRow row = scaling_row(s, n, p);
  const Index rows = s.m * n, tokens = row.tokens;
  const double need = scaling_bytes(s, n), free = free_device_bytes();
  if (need > 0.92 * free) {
    char why[128];
    std::snprintf(why, sizeof why, "skipped: needs ~%.1f GB, %.1f GB free", need * 1e-9, free * 1e-9);
    row.status = why;
    return row;
  }
  try {
    Layer layer = make_layer(s.d, n, s.h, s.k, p, false);
    const int reps = n <= 128 ? 2 * s.reps + 1 : s.reps;
    {
      // The experts alone on exactly m rows each.
      Buf xs(rows, s.d), ys(rows, s.d);
      fill_uniform(ctx, xs, 21, 1.f);
      std::vector<Index> offsets(static_cast<std::size_t>(n + 1));
      for (Index e = 0; e <= n; ++e) offsets[static_cast<std::size_t>(e)] = e * s.m;
      const IBuf off = upload_offsets(ctx, offsets);
      Layer::ExpertGroup::Saved saved;
      const auto t = measure(s.warmup, reps, {[&] {
                               layer.experts().forward(ctx, std::as_const(xs).view(), off.data(), ys.view(), saved);
                               ctx.synchronize();
                             }});
      row.experts_fwd_s = t[0].seconds;
    }
    release_cached();
    Buf x(tokens, s.d), dy(tokens, s.d);
    fill_uniform(ctx, x, 22, 1.f);
    fill_uniform(ctx, dy, 23, 1e-2f);
    ctx.synchronize();
    moe::Rng rng(42);
    Layer::Forward step;
    Layer::Backward grads;
    layer.forward_into(step, std::as_const(x).view(), moe::Mode::train, rng);
    const auto& counts = step.stats().tokens_per_expert;
    row.min_rows = *std::min_element(counts.begin(), counts.end());
    row.max_rows = *std::max_element(counts.begin(), counts.end());
    const auto t = measure(s.warmup, reps,
                           {[&] {
                              layer.forward_into(step, std::as_const(x).view(), moe::Mode::train, rng);
                              ctx.synchronize();
                            },
                            [&] {
                              layer.forward_into(step, std::as_const(x).view(), moe::Mode::train, rng);
                              layer.backward_into(grads, step, std::as_const(dy).view());
                              ctx.synchronize();
                            }});
    row.layer_fwd_s = t[0].seconds;
    row.layer_fwd_bwd_s = t[1].seconds;
    row.backward = count_backward_launches(ctx, layer, step, grads, std::as_const(dy).view());
  } catch (const std::exception& e) {
    row.status = std::string("failed: ") + e.what();
    std::fprintf(stderr, "cuda_layer: scaling %s n=%lld: %s\n", moe::to_string(p), (long long)n, e.what());
    static_cast<void>(cudaGetLastError());
  }
  release_cached();
  return row;
}

// ---- 4. the fixed cost of a step ----------------------------------------------------------------

struct Overhead {
  double sync_s = 0;             // cudaStreamSynchronize on an idle stream: one host wait
  double launch_sync_s = 0;      // one tiny kernel and a wait
  double fwd_s[2] = {0, 0};      // tiny layer forward, check_finite false / true
  double fwd_bwd_s[2] = {0, 0};  // ... forward + backward
  Launches backward;             // the tiny layer's backward (check_finite false)
};

Overhead run_overhead(Ctx& ctx, const OverheadShape& s) {
  Overhead o;
  Layer fast = make_layer(s.d, s.n, s.h, s.k, Precision::fp32, false);
  Layer checked = make_layer(s.d, s.n, s.h, s.k, Precision::fp32, true);
  Buf x(s.tokens, s.d), dy(s.tokens, s.d), tiny_in(1, 1), tiny_out(1, 1);
  fill_uniform(ctx, x, 31, 1.f);
  fill_uniform(ctx, dy, 32, 1e-2f);
  ctx.synchronize();
  moe::Rng rng(42);
  Layer::Forward f[2];
  Layer::Backward b[2];
  Layer* layers[2] = {&fast, &checked};
  std::vector<std::function<void()>> tasks = {[&] { ctx.synchronize(); },
                                              [&] {
                                                relu(ctx, tiny_in, tiny_out);
                                                ctx.synchronize();
                                              }};
  for (int c = 0; c < 2; ++c) {
    tasks.emplace_back([&, c] {
      layers[c]->forward_into(f[c], std::as_const(x).view(), moe::Mode::train, rng);
      ctx.synchronize();
    });
    tasks.emplace_back([&, c] {
      layers[c]->forward_into(f[c], std::as_const(x).view(), moe::Mode::train, rng);
      layers[c]->backward_into(b[c], f[c], std::as_const(dy).view());
      ctx.synchronize();
    });
  }
  const auto t = measure(s.warmup, s.reps, tasks);
  o.sync_s = t[0].seconds;
  o.launch_sync_s = t[1].seconds;
  for (int c = 0; c < 2; ++c) {
    o.fwd_s[c] = t[2 + 2 * std::size_t(c)].seconds;
    o.fwd_bwd_s[c] = t[3 + 2 * std::size_t(c)].seconds;
  }
  o.backward = count_backward_launches(ctx, fast, f[0], b[0], std::as_const(dy).view());
  return o;
}

// ---- reporting ----------------------------------------------------------------------------------

struct Device {
  std::string name;
  int major = 0, minor = 0, sms = 0;
  double clock_ghz = 0;
  // FLOP/s from the SM count and boost clock, 0 if the architecture is unknown here: fp32 on
  // CUDA cores, tf32 and bf16 dense on tensor cores (A100 and H100-class parts only).
  double fp32_peak = 0, tf32_peak = 0, bf16_peak = 0;
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
  // Dense tensor-core FLOP per SM per clock: A100 (sm_80) tf32 1024, bf16 2048; H100 (sm_90)
  // tf32 2048, bf16 4096. NVIDIA's H100 figures count 1.83 GHz; the boost clock here is higher.
  double tf32_per_clock = 0, bf16_per_clock = 0;
  if (dev.major == 8 && dev.minor == 0) tf32_per_clock = 1024, bf16_per_clock = 2048;
  if (dev.major == 9 && dev.minor == 0) tf32_per_clock = 2048, bf16_per_clock = 4096;
  dev.tf32_peak = double(dev.sms) * tf32_per_clock * clock_khz * 1e3;
  dev.bf16_peak = double(dev.sms) * bf16_per_clock * clock_khz * 1e3;
  return dev;
}

struct Run {
  Plan plan;
  Device device;
  bool quick = false;
  bool tensor_cores = false;  // cuda::tensor_core_gemm_available()
  std::vector<Precision> precisions;
  std::vector<std::string> sections_done;
  std::vector<GemmRow> gemm;
  std::vector<Result> results;
  std::vector<ScalingRow> scaling;
  Overhead overhead;
  bool overhead_done = false;

  [[nodiscard]] double reference_peak(Precision p) const {
    return p == Precision::bf16 ? kH100Bf16Peak : p == Precision::tf32 ? kH100Tf32Peak : kH100Fp32Peak;
  }
  [[nodiscard]] double device_peak(Precision p) const {
    return p == Precision::bf16 ? device.bf16_peak : p == Precision::tf32 ? device.tf32_peak : device.fp32_peak;
  }
  // The peak the tables' %peak uses: this device's where its architecture is known, else H100 SXM's.
  [[nodiscard]] double peak(Precision p) const { return device_peak(p) > 0 ? device_peak(p) : reference_peak(p); }
};

void print_header(const Run& run) {
  const Shape& s = run.plan.layer;
  const Device& dev = run.device;
  std::printf("cuda_layer: %s (sm_%d%d, %d SMs, %.2f GHz boost), float data, experts in", dev.name.c_str(), dev.major,
              dev.minor, dev.sms, dev.clock_ghz);
  for (const Precision p : run.precisions) std::printf(" %s", moe::to_string(p));
  std::printf("%s\n", run.quick ? " (--quick: tiny sizes, a smoke run, not a measurement)" : "");
  std::printf("peaks, dense:      H100 SXM                 this device (SMs x rate x boost clock)\n");
  for (const Precision p : kAllPrecisions) {
    const char* how = p == Precision::fp32 ? "CUDA cores" : "tensor cores";
    if (run.device_peak(p) > 0)
      std::printf("  %s (%s): %6.0f TFLOP/s  %25.0f TFLOP/s\n", moe::to_string(p), how, run.reference_peak(p) * 1e-12,
                  run.device_peak(p) * 1e-12);
    else
      std::printf("  %s (%s): %6.0f TFLOP/s  %25s\n", moe::to_string(p), how, run.reference_peak(p) * 1e-12,
                  "unknown (the %peak columns use H100's)");
  }
  std::printf("  (NVIDIA's H100 tensor figures count 1.83 GHz; the reported boost clock gives a higher bound)\n");
  std::printf("roofline of the layer section (T=%lld d=%lld h=%lld k=%lld):\n", (long long)s.tokens, (long long)s.d,
              (long long)s.h, (long long)s.k);
  std::printf("  active FLOP per token = 4*k*d*h = %.3g (+ gate 4*d*n: x W_gate and x W_noise, always fp32)\n",
              4.0 * double(s.k) * double(s.d) * double(s.h));
  for (const Index n : s.experts) {
    const double flop = s.expert_flop() + s.gate_flop(n);
    std::printf("  n=%lld: weights %.0f MB, %.3f ms to read at 3.35 TB/s; compute floor per forward:", (long long)n,
                s.weight_bytes(n) / 1e6, s.weight_bytes(n) / kH100Bandwidth * 1e3);
    for (const Precision p : run.precisions) std::printf(" %s %.3f ms", moe::to_string(p), flop / run.peak(p) * 1e3);
    std::printf("\n");
  }
  std::printf(
      "the experts keep fp32 data in memory in every precision (operands rounded as they are staged) and the\n"
      "gate computes in fp32; the baselines run cuBLAS in the same precision: fp32 cublasSgemm (default math,\n"
      "no TF32), tf32 cublasGemmEx COMPUTE_32F_FAST_TF32, bf16 cublasGemmEx on bf16 copies, fp32 output.\n");
  if (!run.tensor_cores)
    std::printf(
        "note: no tensor-core code for this device in this build: tf32 and bf16 experts run the CUDA-core\n"
        "kernels with rounded operands (the same numerics, CUDA-core speed).\n");
  std::printf("\n");
}

std::string fmt(const char* format, double v) {
  if (!std::isfinite(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

void print_gemm_table(const Run& run) {
  const GemmShape& s = run.plan.gemm;
  std::printf(
      "1. experts alone: one grouped GEMM over n experts against ONE dense cuBLAS GEMM of the same FLOPs\n"
      "   (d=%lld h=%lld; forward c = a W_g [rows x d][d x h]; dgrad c = a W_g^T [rows x h][h x d]; wgrad\n"
      "   W_g = a_g^T b_g, reduced over the expert's rows; balanced: every expert m rows; skewed: half the\n"
      "   rows to expert 0, the rest spread evenly). of dense = dense time / grouped time.\n",
      (long long)s.d, (long long)s.h);
  std::printf("%4s %5s %6s %8s %7s %8s %7s | %9s %9s | %8s %8s %6s | %8s %6s %8s\n", "prec", "n", "m", "routing", "op",
              "max rows", "GFLOP", "grouped", "dense", "grouped", "dense", "%peak", "of", "goal", "check");
  std::printf("%4s %5s %6s %8s %7s %8s %7s | %9s %9s | %8s %8s %6s | %8s %6s %8s\n", "", "", "", "", "", "", "", "ms",
              "ms", "TFLOP/s", "TFLOP/s", "grp", "dense", ">=", "rel");
  for (const GemmRow& r : run.gemm) {
    const double goal = r.goal();
    std::printf("%4s %5lld %6lld %8s %7s %8lld %7.1f | %9.4f %9.4f | %8.1f %8.1f %5.0f%% | %8.2f %6s %8s%s\n",
                moe::to_string(r.precision), (long long)r.n, (long long)r.m, kRoutingNames[r.routing],
                kGemmOpNames[r.op], (long long)r.max_rows, r.flop * 1e-9, r.grouped_s * 1e3, r.dense_s * 1e3,
                r.flop / r.grouped_s * 1e-12, r.flop / r.dense_s * 1e-12,
                100 * r.flop / r.grouped_s / run.peak(r.precision), r.fraction(), fmt("%.2f", goal).c_str(),
                r.check >= 0 ? fmt("%.1e", r.check).c_str() : "",
                std::isfinite(goal) ? (r.fraction() >= goal ? "  met" : "  MISSED") : "");
  }
  std::printf(
      "check: expert 0's rows of the balanced forward against the dense forward (expert 0's weights on\n"
      "every row): the same operands, fp32 sums in another order (tf32: cuBLAS rounds to TF32 its own way).\n\n");
}

void print_layer_table(const Run& run) {
  const Shape& s = run.plan.layer;
  std::printf(
      "2. the whole layer (T=%lld d=%lld h=%lld k=%lld, check_finite off, median of %d after %d warm-up) against\n"
      "   the dense MLP and the naive per-expert loop in the same precision\n",
      (long long)s.tokens, (long long)s.d, (long long)s.h, (long long)s.k, s.reps, s.warmup);
  std::printf("%4s %5s %6s %9s %6s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %6s %6s %5s %6s %6s | %5s\n", "prec",
              "n", "GFLOP", "tok/exp", "wt MB", "layer", "layer", "TFLOP/s", "TFLOP/s", "%peak", "dense", "dense",
              "naive", "experts", "of", "of", "goal", "naive/", "naive/", "bwd");
  std::printf("%4s %5s %6s %9s %6s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %6s %6s %5s %6s %6s | %5s\n", "", "",
              "fwd", "", "", "fwd ms", "f+b ms", "fwd", "f+b", "fwd", "fwd ms", "f+b ms", "fwd ms", "fwd ms", "dense",
              "dense", "", "layer", "expert", "kern");
  std::printf("%4s %5s %6s %9s %6s | %8s %8s %7s %7s %6s | %8s %8s | %8s %8s | %6s %6s %5s %6s %6s | %5s\n", "", "", "",
              "", "", "", "", "", "", "", "", "", "", "", "fwd", "f+b", "f+b", "fwd", "fwd", "");
  for (const Result& r : run.results) {
    const std::string tokens = std::to_string(r.min_tokens) + "-" + std::to_string(r.max_tokens);
    const auto ms = [&](Task t) { return r.seconds(t) * 1e3; };
    const double of_fb = ms(kDenseFwdBwd) / ms(kLayerFwdBwd);
    std::printf(
        "%4s %5lld %6.1f %9s %6.0f | %8.3f %8.3f %7.2f %7.2f %5.0f%% | %8.3f %8.3f | %8.3f %8.3f | %6.2f "
        "%6.2f %5.2f %6.2f %6.2f | %5s%s\n",
        moe::to_string(r.precision), (long long)r.n, r.flop * 1e-9, tokens.c_str(), r.weight_bytes / 1e6, ms(kLayerFwd),
        ms(kLayerFwdBwd), r.tflops(kLayerFwd, 1), r.tflops(kLayerFwdBwd, 3),
        100 * r.tflops(kLayerFwd, 1) * 1e12 / run.peak(r.precision), ms(kDenseFwd), ms(kDenseFwdBwd), ms(kNaiveFwd),
        ms(kGroupedFwd), ms(kDenseFwd) / ms(kLayerFwd), of_fb, kGoalLayerFwdBwd, ms(kNaiveFwd) / ms(kLayerFwd),
        ms(kNaiveFwd) / ms(kGroupedFwd), r.backward.kernels >= 0 ? std::to_string(r.backward.kernels).c_str() : "-",
        of_fb >= kGoalLayerFwdBwd ? "  met" : "  MISSED");
  }
  std::printf(
      "GFLOP: experts 4*T*k*d*h + gate 4*T*d*n per forward; f+b TFLOP/s counts 3x that; %%peak against the\n"
      "precision's peak (the gate is fp32 in every precision). layer: the whole forward (gate, routing plan,\n"
      "dispatch, experts, combine, balance statistics); f+b adds the backward. dense: one ReLU MLP with hidden\n"
      "k*h on cuBLAS. of dense = dense time / layer time (goal: f+b >= %.2f). naive: the experts' forward as a\n"
      "loop of cuBLAS GEMMs per expert on the first forward's routing; experts: the layer's own expert group\n"
      "(grouped GEMM kernels) on the same rows. bwd kern: kernels one backward launches (captured in a graph).\n",
      kGoalLayerFwdBwd);
  std::printf(
      "checks (relative max |difference|): naive loop vs the layer's experts on the same rows; naive loop,\n"
      "combined with the gates, vs the layer's output:\n ");
  for (const Result& r : run.results)
    std::printf(" %s n=%lld: %.2g, %.2g;", moe::to_string(r.precision), (long long)r.n, r.naive_vs_grouped,
                r.naive_vs_layer);
  std::printf("\n\n");
}

// max / min of a per-token cost over the measured points of one precision.
double spread(const std::vector<ScalingRow>& rows, Precision p, double (*cost)(const ScalingRow&)) {
  double lo = INFINITY, hi = 0;
  for (const ScalingRow& r : rows) {
    if (r.precision != p || !r.measured()) continue;
    lo = std::min(lo, cost(r));
    hi = std::max(hi, cost(r));
  }
  return hi > 0 && std::isfinite(lo) && lo > 0 ? hi / lo : std::nan("");
}
double experts_cost(const ScalingRow& r) { return r.per_token_ns(r.experts_fwd_s); }
double layer_cost(const ScalingRow& r) { return r.per_token_ns(r.layer_fwd_bwd_s); }

void print_scaling_table(const Run& run) {
  const ScalingShape& s = run.plan.scaling;
  std::printf("3. cost per token as n grows, %lld rows per expert (T = %lld*n/%lld tokens; d=%lld h=%lld k=%lld)\n",
              (long long)s.m, (long long)s.m, (long long)s.k, (long long)s.d, (long long)s.h, (long long)s.k);
  std::printf("%4s %5s %8s %11s %6s | %9s %8s %6s | %9s %9s %8s %6s | %5s\n", "prec", "n", "tokens", "rows/exp", "gate",
              "experts", "experts", "x", "layer", "layer", "f+b", "x", "bwd");
  std::printf("%4s %5s %8s %11s %6s | %9s %8s %6s | %9s %9s %8s %6s | %5s\n", "", "", "", "(layer)", "%FLOP", "fwd ms",
              "ns/tok", "min", "fwd ms", "f+b ms", "ns/tok", "min", "kern");
  for (const Precision p : run.precisions) {
    double experts_min = INFINITY, layer_min = INFINITY;
    for (const ScalingRow& r : run.scaling)
      if (r.precision == p && r.measured()) {
        experts_min = std::min(experts_min, experts_cost(r));
        layer_min = std::min(layer_min, layer_cost(r));
      }
    for (const ScalingRow& r : run.scaling) {
      if (r.precision != p) continue;
      if (!r.measured()) {
        std::printf("%4s %5lld %8lld  %s\n", moe::to_string(p), (long long)r.n, (long long)r.tokens, r.status.c_str());
        continue;
      }
      const std::string range = std::to_string(r.min_rows) + "-" + std::to_string(r.max_rows);
      std::printf("%4s %5lld %8lld %11s %5.0f%% | %9.3f %8.2f %6.2f | %9.3f %9.3f %8.2f %6.2f | %5s\n",
                  moe::to_string(p), (long long)r.n, (long long)r.tokens, range.c_str(), 100 * r.gate_share,
                  r.experts_fwd_s * 1e3, experts_cost(r), experts_cost(r) / experts_min, r.layer_fwd_s * 1e3,
                  r.layer_fwd_bwd_s * 1e3, layer_cost(r), layer_cost(r) / layer_min,
                  r.backward.kernels >= 0 ? std::to_string(r.backward.kernels).c_str() : "-");
    }
    const double e = spread(run.scaling, p, experts_cost), l = spread(run.scaling, p, layer_cost);
    std::printf("  %s: max/min cost per token: experts %s, layer f+b %s (goal <= %.1f): %s\n", moe::to_string(p),
                fmt("%.2f", e).c_str(), fmt("%.2f", l).c_str(), kGoalScaling,
                !std::isfinite(l)   ? "not measured"
                : l <= kGoalScaling ? "met"
                                    : "MISSED");
  }
  std::printf(
      "experts: the layer's expert group alone on exactly m rows each; layer: the whole step on the noisy\n"
      "gate's routing (rows/exp: its least and most loaded expert). gate %%FLOP: the gate's share of the\n"
      "forward's FLOPs, which grows with n (4*d*n per token against 4*k*d*h). x min: against the cheapest n.\n\n");
}

void print_overhead(const Run& run) {
  const OverheadShape& s = run.plan.overhead;
  const Overhead& o = run.overhead;
  std::printf("4. the fixed cost of a step (fp32, T=%lld d=%lld h=%lld n=%lld k=%lld, median of %d)\n",
              (long long)s.tokens, (long long)s.d, (long long)s.h, (long long)s.n, (long long)s.k, s.reps);
  std::printf("  one host wait (cudaStreamSynchronize, idle stream): %8.1f us\n", o.sync_s * 1e6);
  std::printf("  one tiny kernel and a wait:                         %8.1f us\n", o.launch_sync_s * 1e6);
  std::printf("  %-14s %12s %12s %22s\n", "check_finite", "forward us", "f+b us", "host waits fwd / bwd");
  for (int c = 0; c < 2; ++c)
    std::printf("  %-14s %12.1f %12.1f %15d / %d\n", c == 0 ? "off" : "on (default)", o.fwd_s[c] * 1e6,
                o.fwd_bwd_s[c] * 1e6, c == 0 ? kWaitsForward : kWaitsForwardChecked,
                c == 0 ? kWaitsBackward : kWaitsBackwardChecked);
  if (o.backward.kernels >= 0)
    std::printf("  one backward launches %ld kernels (%ld graph nodes with copies and memsets)\n", o.backward.kernels,
                o.backward.nodes);
  else
    std::printf("  the backward's launches: not counted (its capture into a CUDA graph failed)\n");
  std::printf(
      "  host waits: as docs/cuda.md states them (the routing plan's offsets and the balance statistics;\n"
      "  check_finite adds one per checked input), not counted here; the forward's launches are not counted\n"
      "  (it waits on the host, so it cannot be captured).\n\n");
}

// The goals, each with what was measured against it.
struct Goal {
  std::string name, precision;
  double target = 0, measured = 0;
  bool at_most = false;  // measured <= target is met (else >=)
  [[nodiscard]] bool known() const { return std::isfinite(measured); }
  [[nodiscard]] bool met() const { return known() && (at_most ? measured <= target : measured >= target); }
};

std::vector<Goal> goals(const Run& run) {
  std::vector<Goal> out;
  for (int routing = 0; routing < 2; ++routing) {
    double worst = INFINITY;
    for (const GemmRow& r : run.gemm)
      if (r.routing == routing && std::isfinite(r.goal())) worst = std::min(worst, r.fraction());
    out.push_back({std::string("experts / dense cuBLAS, ") + kRoutingNames[routing] +
                       ", >= " + std::to_string(kGoalRowsPerExpert) + " rows/expert (worst op)",
                   "bf16", routing == 0 ? kGoalExpertsBalanced : kGoalExpertsSkewed,
                   std::isfinite(worst) ? worst : std::nan(""), false});
  }
  for (const Precision p : run.precisions) {
    double worst = INFINITY;
    for (const Result& r : run.results)
      if (r.precision == p) worst = std::min(worst, r.seconds(kDenseFwdBwd) / r.seconds(kLayerFwdBwd));
    out.push_back({"layer forward+backward / dense MLP (worst n)", moe::to_string(p), kGoalLayerFwdBwd,
                   std::isfinite(worst) ? worst : std::nan(""), false});
  }
  for (const Precision p : run.precisions)
    out.push_back({"cost per token of the layer f+b, max / min over n", moe::to_string(p), kGoalScaling,
                   spread(run.scaling, p, layer_cost), true});
  return out;
}

void print_goals(const Run& run) {
  std::printf("goals (reported, never enforced):\n");
  for (const Goal& g : goals(run))
    std::printf("  %-4s %-66s %s %.2f: %-5s %s\n", g.precision.c_str(), g.name.c_str(),
                g.at_most ? "<=" : ">=", g.target, fmt("%.2f", g.measured).c_str(),
                !g.known() ? (run.quick ? "(not measured at --quick sizes)" : "(not measured)")
                : g.met()  ? "met"
                           : "MISSED");
}

void json_launches(Json& j, const Launches& l) {
  j.num("backward_kernel_launches", l.kernels >= 0 ? double(l.kernels) : std::nan(""));
  j.num("backward_graph_nodes", l.nodes >= 0 ? double(l.nodes) : std::nan(""));
}

std::string to_json(const Run& run) {
  const Shape& s = run.plan.layer;
  Json j;
  j.open("", '{').str("benchmark", "cuda_layer").str("scalar", "float").str("device", run.device.name);
  j.num("compute_capability", run.device.major * 10 + run.device.minor).num("sms", run.device.sms);
  j.num("boost_clock_ghz", run.device.clock_ghz).num("fp32_peak_flops_estimate", run.device.fp32_peak);
  j.num("tf32_peak_flops_estimate", run.device.tf32_peak).num("bf16_peak_flops_estimate", run.device.bf16_peak);
  j.num("h100_sxm_fp32_peak_flops", kH100Fp32Peak);
  j.num("h100_sxm_tf32_peak_flops", kH100Tf32Peak).num("h100_sxm_bf16_peak_flops", kH100Bf16Peak);
  j.num("d_model", double(s.d)).num("hidden", double(s.h)).num("k", double(s.k)).num("tokens", double(s.tokens));
  j.num("repetitions", s.reps).num("warmup", s.warmup).num("quick", run.quick ? 1 : 0);
  j.num("check_finite", 0).num("tensor_core_gemm_available", run.tensor_cores ? 1 : 0);
  j.open("precisions", '[');
  for (const Precision p : run.precisions) j.str("", moe::to_string(p));
  j.close(']');
  j.open("sections_done", '[');
  for (const std::string& name : run.sections_done) j.str("", name);
  j.close(']');

  j.open("results", '[');
  for (const Result& r : run.results) {
    j.open("", '{').str("precision", moe::to_string(r.precision));
    j.num("n_experts", double(r.n)).num("experts_used", double(r.experts_used));
    j.num("min_tokens_per_expert", double(r.min_tokens)).num("max_tokens_per_expert", double(r.max_tokens));
    j.num("flop_forward", r.flop).num("expert_weight_bytes", r.weight_bytes);
    j.num("layer_forward_tflops", r.tflops(kLayerFwd, 1))
        .num("layer_forward_backward_tflops", r.tflops(kLayerFwdBwd, 3));
    j.num("layer_forward_fraction_of_peak", r.tflops(kLayerFwd, 1) * 1e12 / run.peak(r.precision));
    j.num("peak_flops", run.peak(r.precision));
    j.num("layer_over_dense_forward", r.seconds(kLayerFwd) / r.seconds(kDenseFwd));
    j.num("layer_over_dense_forward_backward", r.seconds(kLayerFwdBwd) / r.seconds(kDenseFwdBwd));
    j.num("layer_fraction_of_dense_forward", r.seconds(kDenseFwd) / r.seconds(kLayerFwd));
    j.num("layer_fraction_of_dense_forward_backward", r.seconds(kDenseFwdBwd) / r.seconds(kLayerFwdBwd));
    j.num("naive_over_layer_forward", r.seconds(kNaiveFwd) / r.seconds(kLayerFwd));
    j.num("naive_over_layer_experts_forward", r.seconds(kNaiveFwd) / r.seconds(kGroupedFwd));
    j.num("naive_vs_layer_experts_rel_diff", r.naive_vs_grouped)
        .num("naive_vs_layer_output_rel_diff", r.naive_vs_layer);
    json_launches(j, r.backward);
    j.open("tasks", '{');
    for (int t = 0; t < kTaskCount; ++t) j.num(std::string(kTaskNames[t]) + "_s", r.m[std::size_t(t)].seconds);
    j.close('}').close('}');
  }
  j.close(']');

  const GemmShape& g = run.plan.gemm;
  j.open("experts_gemm", '{').num("d_model", double(g.d)).num("hidden", double(g.h));
  j.num("repetitions", g.reps).num("warmup", g.warmup);
  j.open("rows", '[');
  for (const GemmRow& r : run.gemm) {
    j.open("", '{').str("precision", moe::to_string(r.precision)).num("n_experts", double(r.n));
    j.num("rows_per_expert", double(r.m)).str("routing", kRoutingNames[r.routing]).str("op", kGemmOpNames[r.op]);
    j.num("max_rows_per_expert", double(r.max_rows)).num("flop", r.flop);
    j.num("grouped_s", r.grouped_s).num("dense_s", r.dense_s);
    j.num("grouped_tflops", r.flop / r.grouped_s * 1e-12).num("dense_tflops", r.flop / r.dense_s * 1e-12);
    j.num("grouped_fraction_of_peak", r.flop / r.grouped_s / run.peak(r.precision));
    j.num("fraction_of_dense", r.fraction()).num("goal", r.goal());
    j.num("check_rel_diff", r.check >= 0 ? r.check : std::nan(""));
    j.close('}');
  }
  j.close(']').close('}');

  const ScalingShape& c = run.plan.scaling;
  j.open("scaling", '{').num("d_model", double(c.d)).num("hidden", double(c.h)).num("k", double(c.k));
  j.num("rows_per_expert", double(c.m)).num("time_budget_s", c.budget_s);
  j.open("rows", '[');
  for (const ScalingRow& r : run.scaling) {
    j.open("", '{').str("precision", moe::to_string(r.precision)).num("n_experts", double(r.n));
    j.num("tokens", double(r.tokens)).str("status", r.status);
    if (r.measured()) {
      j.num("min_rows_per_expert", double(r.min_rows)).num("max_rows_per_expert", double(r.max_rows));
      j.num("gate_flop_share", r.gate_share);
      j.num("experts_forward_s", r.experts_fwd_s).num("layer_forward_s", r.layer_fwd_s);
      j.num("layer_forward_backward_s", r.layer_fwd_bwd_s);
      j.num("experts_forward_ns_per_token", experts_cost(r)).num("layer_forward_backward_ns_per_token", layer_cost(r));
      json_launches(j, r.backward);
    }
    j.close('}');
  }
  j.close(']');
  j.open("summary", '[');
  for (const Precision p : run.precisions) {
    j.open("", '{').str("precision", moe::to_string(p));
    j.num("experts_cost_per_token_max_over_min", spread(run.scaling, p, experts_cost));
    j.num("layer_forward_backward_cost_per_token_max_over_min", spread(run.scaling, p, layer_cost));
    j.close('}');
  }
  j.close(']').close('}');

  if (run.overhead_done) {
    const Overhead& o = run.overhead;
    const OverheadShape& v = run.plan.overhead;
    j.open("step_overhead", '{').num("tokens", double(v.tokens)).num("d_model", double(v.d));
    j.num("hidden", double(v.h)).num("n_experts", double(v.n)).num("k", double(v.k));
    j.num("host_wait_s", o.sync_s).num("launch_and_wait_s", o.launch_sync_s);
    j.num("forward_s", o.fwd_s[0]).num("forward_backward_s", o.fwd_bwd_s[0]);
    j.num("forward_check_finite_s", o.fwd_s[1]).num("forward_backward_check_finite_s", o.fwd_bwd_s[1]);
    json_launches(j, o.backward);
    j.close('}');
  }
  j.open("host_waits_design", '{').str("source", "docs/cuda.md");
  j.num("forward", kWaitsForward).num("backward", kWaitsBackward);
  j.num("forward_check_finite", kWaitsForwardChecked).num("backward_check_finite", kWaitsBackwardChecked);
  j.close('}');

  j.open("goals", '[');
  for (const Goal& goal : goals(run)) {
    j.open("", '{').str("goal", goal.name).str("precision", goal.precision);
    j.str("comparison", goal.at_most ? "<=" : ">=").num("target", goal.target).num("measured", goal.measured);
    j.num("met", goal.known() ? (goal.met() ? 1 : 0) : std::nan(""));
    j.close('}');
  }
  j.close(']').close('}');
  return j.text();
}

}  // namespace

constexpr const char* kUsage =
    "usage: cuda_layer [--quick] [--precision LIST] [--json PATH]\n"
    "  --quick           tiny sizes and one repetition: a smoke run, not a measurement\n"
    "  --precision LIST  the experts' precisions, comma-separated: fp32, tf32, bf16 (default all three)\n"
    "  --json PATH       where to write the results (default bench_cuda.json)\n"
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
    const auto started = bench::Clock::now();
    Run run;
    run.plan = plan_for(opt.quick);
    run.quick = opt.quick;
    run.device = query_device();
    run.tensor_cores = mc::tensor_core_gemm_available();
    for (const Precision p : opt.precisions) {
      // cuBLAS's bf16 and TF32 GEMMs need sm_80: below it only fp32 compares like with like.
      if (p != Precision::fp32 && run.device.major < 8) {
        std::printf("note: %s skipped: sm_%d%d has no %s tensor cores for the cuBLAS baseline\n", moe::to_string(p),
                    run.device.major, run.device.minor, moe::to_string(p));
        continue;
      }
      run.precisions.push_back(p);
    }
    if (run.precisions.empty()) throw std::invalid_argument("no precision left to measure on this device");
    print_header(run);
    std::fflush(stdout);
    const auto checkpoint = [&](const char* section) {
      run.sections_done.emplace_back(section);
      write_atomically(opt.json, to_json(run));
      std::fprintf(stderr, "cuda_layer: %s done after %.0f s\n", section,
                   std::chrono::duration<double>(bench::Clock::now() - started).count());
      std::fflush(stdout);
    };
    Ctx ctx;
    const bool any_bf16 =
        std::find(run.precisions.begin(), run.precisions.end(), Precision::bf16) != run.precisions.end();

    // 1. the experts' grouped GEMMs against one dense GEMM
    run.gemm = run_gemms(ctx, run.plan.gemm, run.precisions);
    print_gemm_table(run);
    checkpoint("experts_gemm");

    // 2. the whole layer against the dense MLP and the naive loop
    {
      const Shape& s = run.plan.layer;
      std::mt19937 gen(7);
      const std::vector<float> x_host = uniform(gen, s.tokens * s.d, 1.f);
      const std::vector<float> dy_host = uniform(gen, s.tokens * s.d, 1e-2f);
      const Buf x = upload(ctx, x_host, s.tokens, s.d);
      const Buf dy = upload(ctx, dy_host, s.tokens, s.d);
      Dense dense(ctx, gen, x.view(), dy.view(), s.k * s.h, any_bf16);
      for (const Index n : s.experts)
        for (const Precision p : run.precisions) {
          run.results.push_back(run_experts(ctx, s, n, p, dense, x_host, x.view(), dy.view()));
          release_cached();
          std::fprintf(stderr, "cuda_layer: layer %s n=%lld done\n", moe::to_string(p), (long long)n);
        }
    }
    release_cached();
    print_layer_table(run);
    checkpoint("layer");

    // 3. cost per token as n grows (n outer: a run short of time drops the largest n of every
    // precision alike)
    {
      const ScalingShape& s = run.plan.scaling;
      double last_point_s[3] = {0, 0, 0};  // by precision_rank
      for (const Index n : s.experts)
        for (const Precision p : run.precisions) {
          const double elapsed = std::chrono::duration<double>(bench::Clock::now() - started).count();
          double& last = last_point_s[precision_rank(p)];
          if (elapsed + 2.5 * last > s.budget_s) {
            ScalingRow row = scaling_row(s, n, p);
            char why[96];
            std::snprintf(why, sizeof why, "skipped: the run's time budget (%.0f s, %.0f s used)", s.budget_s, elapsed);
            row.status = why;
            run.scaling.push_back(row);
          } else {
            const auto point_start = bench::Clock::now();
            run.scaling.push_back(run_scaling_point(ctx, s, n, p));
            last = std::chrono::duration<double>(bench::Clock::now() - point_start).count();
          }
          std::fprintf(stderr, "cuda_layer: scaling %s n=%lld %s\n", moe::to_string(p), (long long)n,
                       run.scaling.back().status.c_str());
        }
    }
    print_scaling_table(run);
    checkpoint("scaling");

    // 4. the fixed cost of a step
    run.overhead = run_overhead(ctx, run.plan.overhead);
    run.overhead_done = true;
    print_overhead(run);
    checkpoint("step_overhead");

    print_goals(run);
    std::printf("wrote %s (%.0f s)\n", opt.json.c_str(),
                std::chrono::duration<double>(bench::Clock::now() - started).count());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_layer: %s\n", e.what());
    return 1;
  }
  return 0;
}
