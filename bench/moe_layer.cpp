// Throughput of moe::Layer<FeedForward, NoisyTopK, Cpu<float>> (MATH.md 1-2) at growing expert
// counts, against a dense ReLU MLP of the same active FLOPs (hidden k*h), a naive per-expert
// loop on the layer's own gate, weights and routing, and the floor max(FLOPs at the dense rate,
// bytes at the copy bandwidth), all measured in one run, round-robin; then the cost per token
// up to 4096 experts (fixed rows per expert, fixed T) and small-batch inference on a Mixtral-like
// SwiGLU block against reading its routed experts' weights. Prints tables and writes JSON
// (bench/plot_moe_layer.py plots it; scripts/bench-cpu does both). Timings live here, never in
// the tests.
//
//   moe_layer [--quick] [--threads N] [--json PATH]

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <moe/backend/cpu.hpp>  // first: it defines EIGEN_DONT_PARALLELIZE before Eigen is seen
#include <moe/moe.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace {

using bench::Clock, bench::Json, bench::Measured, bench::measure, bench::minor_faults, bench::others_cpu_seconds;
using bench::threads_from, bench::write_atomically;
using moe::Index;
using Cpu = moe::backend::Cpu<float>;
using Layer = moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, Cpu>;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Options {
  bool quick = false;
  bool help = false;
  int threads = 0;  // 0: all that OpenMP offers
  std::string json = "bench_results.json";
};

struct Shape {
  Index tokens, d, h, k;
  std::vector<Index> experts;
  int warmup, reps;
  Index copy_floats;  // the bandwidth measurement's buffer: far beyond the 16-32 MB of a last-level cache
  Index rows_per_expert;  // the scaling series at fixed rows per expert
  std::vector<Index> scale_experts;
  std::vector<Index> infer_d, infer_tokens;
  // h for n experts in the scaling series: the paper's 1024 while n * 2 d h weights and their
  // gradients stay under 10 GB, then halved until they do.
  [[nodiscard]] Index scale_h(Index n) const {
    Index hh = h;
    while (hh > 16 && 4.0 * 2 * double(n * 2 * d * hh) > 10e9) hh /= 2;
    return hh;
  }

  [[nodiscard]] double expert_flop() const { return 4.0 * double(tokens * k * d * h); }   // two GEMMs
  [[nodiscard]] double gate_flop(Index n) const { return 4.0 * double(tokens * d * n); }  // x W_g, x W_noise
};

// The paper's expert size (d = 512, h = 1024); with T = 2048 one measurement takes 150-700 ms on 2 cores.
Shape shape_for(bool quick) {
  if (quick) return {128, 64, 128, 2, {4, 16}, 1, 1, Index{1} << 20, 16, {4, 16}, {64}, {1, 8}};
  return {2048, 512, 1024, 2, {4, 16, 64, 256}, 1, 7, Index{1} << 26, 16, {4, 16, 64, 256, 1024, 4096},
          {1024, 2048, 4096}, {1, 8, 64}};
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return std::string(argv[++i]);
    };
    if (arg == "--quick")
      o.quick = true;
    else if (arg == "--help" || arg == "-h")
      o.help = true;
    else if (arg == "--threads")
      o.threads = threads_from(value());
    else if (arg == "--json")
      o.json = value();
    else
      throw std::invalid_argument("unknown argument " + arg);
  }
  return o;
}

// c = a * b (or c += a * b) with the rows of c cut into one even chunk per thread, each chunk one
// plain Eigen GEMM: the fastest plain use of Eigen here, since its own threading is off.
template <class A, class B, class C>
void par_gemm(int threads, const A& a, const B& b, C&& c, bool accumulate = false) {
  const Index rows = c.rows();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int p = 0; p < threads; ++p) {
    const Index r0 = rows * p / threads, m = rows * (p + 1) / threads - r0;
    if (m == 0) continue;
    auto cb = c.middleRows(r0, m);
    if (accumulate)
      cb.noalias() += a.middleRows(r0, m) * b;
    else
      cb.noalias() = a.middleRows(r0, m) * b;
  }
}

// E(x) = relu(x W1) W2 forward, and its backward into g1, g2 and dx. Used by the dense baseline
// (one MLP over all tokens) and by the naive loop (one call per expert on its gathered tokens).
struct MlpPass {
  Mat pre, act, y, dpre, dx;

  template <class W>
  void forward(int threads, const Mat& x, const W& w1, const W& w2) {
    pre.resize(x.rows(), w1.cols());
    par_gemm(threads, x, w1, pre);
    act = pre.cwiseMax(0.f);
    y.resize(x.rows(), w2.cols());
    par_gemm(threads, act, w2, y);
  }

  template <class W, class G>
  void backward(int threads, const Mat& x, const Mat& dy, const W& w1, const W& w2, G&& g1, G&& g2) {
    par_gemm(threads, act.transpose(), dy, g2, true);
    dpre.resize(dy.rows(), w2.rows());
    par_gemm(threads, dy, w2.transpose(), dpre);
    dpre.array() *= (pre.array() > 0.f).cast<float>();
    par_gemm(threads, x.transpose(), dpre, g1, true);
    dx.resize(x.rows(), x.cols());
    par_gemm(threads, dpre, w1.transpose(), dx);
  }
};

// The dense baseline: one ReLU MLP with hidden k*h, so its FLOPs per token equal the MoE's active
// expert FLOPs.
struct Dense {
  Mat w1, w2, g1, g2;
  MlpPass pass;

  Dense(Index d, Index hidden)
      : w1(Mat::Random(d, hidden) / std::sqrt(float(d))),
        w2(Mat::Random(hidden, d) / std::sqrt(float(hidden))),
        g1(Mat::Zero(d, hidden)),
        g2(Mat::Zero(hidden, d)) {}

  void step(int threads, const Mat& x, const Mat& dy, bool backward) {
    pass.forward(threads, x, w1, w2);
    if (backward) pass.backward(threads, x, dy, w1, w2, g1, g2);
  }
};

// The layer's gate run on its own with one fixed noise draw: moe::Rng(kNoiseSeed)'s first draw,
// which is also what the layer's first forward uses, so the routing is that forward's.
constexpr std::uint64_t kNoiseSeed = 42;

struct GateRun {
  Layer& layer;
  Cpu::Context ctx;
  moe::GateNoise<float> noise;
  moe::GateRouting<Cpu> routing;
  Layer::GatePolicy::Saved saved;
  std::vector<float> dload;  // d loss / d Load, as the layer passes it in training

  GateRun(Layer& l, int threads) : layer(l), ctx{threads}, dload(std::size_t(l.config().n_experts), 1e-3f) {
    const moe::Rng::Draw draw = moe::Rng(kNoiseSeed).next();
    noise = {nullptr, 0, draw.stream, draw.step};
  }
  void forward(moe::ConstMatrixView<float> x) {
    layer.gate().forward(ctx, x, nullptr, moe::Mode::train, noise, routing, saved);
  }
  void backward(moe::ConstMatrixView<float> x, moe::ConstMatrixView<float> dgate, moe::MatrixView<float> dx) {
    layer.gate().backward(ctx, x, nullptr, saved, dgate, dload.data(), 1.0f, dx);
  }
};

// The per-expert loop a first implementation would write, on the layer's own gate and weights:
// the gate, then for each expert scan the routing for its slots, copy its tokens, run the MLP
// and scatter-add the gated outputs into y. Backward mirrors it: dgate = <dy, expert output>,
// the MLP's backward, then the gate's.
struct Naive {
  GateRun gate;
  moe::backend::cpu::Map<float> w1, w2, g1, g2;  // stacked [n*d x h] and [n*h x d], as in the layer
  Mat y, dx, dgate, xe, dye;
  MlpPass pass;
  std::vector<Index> slots;

  static moe::backend::cpu::Map<float> param(Layer& layer, const std::string& name, bool grad) {
    for (auto& p : layer.parameters())
      if (p.name == name) return moe::backend::cpu::eigen(grad ? p.grad : p.value);
    throw std::logic_error("the layer has no parameter " + name);
  }
  Naive(Layer& layer, int threads)
      : gate(layer, threads),
        w1(param(layer, "experts.w1", false)),
        w2(param(layer, "experts.w2", false)),
        g1(param(layer, "experts.w1", true)),
        g2(param(layer, "experts.w2", true)) {}

  void step(const Mat& x, const Mat& dy, bool backward) {
    gate.forward(x);
    const moe::GateRouting<Cpu>& r = gate.routing;
    const Index d = x.cols(), h = w1.cols(), n = w1.rows() / d, k = r.expert.cols();
    const int threads = gate.ctx.threads;
    y.setZero(x.rows(), d);
    if (backward) {
      dx.setZero(x.rows(), d);
      dgate.resize(x.rows(), k);
    }
    for (Index e = 0; e < n; ++e) {
      slots.clear();
      for (Index s = 0; s < r.expert.size(); ++s)
        if (r.expert[s] == e) slots.push_back(s);
      const auto m = Index(slots.size());
      if (m == 0) continue;
      xe.resize(m, d);
      for (Index i = 0; i < m; ++i) xe.row(i) = x.row(slots[i] / k);
      const auto w1e = w1.middleRows(e * d, d);
      const auto w2e = w2.middleRows(e * h, h);
      pass.forward(threads, xe, w1e, w2e);
      for (Index i = 0; i < m; ++i) y.row(slots[i] / k) += r.gate[slots[i]] * pass.y.row(i);
      if (!backward) continue;
      dye.resize(m, d);
      for (Index i = 0; i < m; ++i) {
        const Index s = slots[i], t = s / k;
        dye.row(i) = r.gate[s] * dy.row(t);
        dgate(t, s % k) = dy.row(t).dot(pass.y.row(i));
      }
      pass.backward(threads, xe, dye, w1e, w2e, g1.middleRows(e * d, d), g2.middleRows(e * h, h));
      for (Index i = 0; i < m; ++i) dx.row(slots[i] / k) += pass.dx.row(i);
    }
    if (backward) gate.backward(x, dgate, dx);
  }
};

// The layer's stages run alone through its own gate, routing plan and expert group, to split its
// time into gate, dispatch, experts and the rest (combine, balance, input copy, finiteness checks,
// whatever the first calls allocated). Each stage reads what the one before it wrote.
struct Stages {
  GateRun gate;
  moe::RoutingPlan<Cpu> plan;
  Layer::ExpertGroup::Saved expert_saved;
  Cpu::Buffer<float> xs, ys, dys, dxs, dgate, dx, logits, w;

  Stages(Layer& layer, const Shape& s, int threads)
      : gate(layer, threads),
        xs(s.tokens * s.k, s.d),
        ys(s.tokens * s.k, s.d),
        dys(s.tokens * s.k, s.d, 1e-3f),
        dxs(s.tokens * s.k, s.d),
        dgate(s.tokens, s.k, 1e-3f),
        dx(s.tokens, s.d),
        logits(s.tokens, layer.config().n_experts),
        w(s.d, layer.config().n_experts) {}

  void dispatch(moe::ConstMatrixView<float> x) {
    plan.build(gate.ctx, gate.routing.expert.view(), gate.layer.config().n_experts);
    Cpu::gather_rows(gate.ctx, x, plan.token_of.data(), xs.view());
  }
  void experts_forward() {
    gate.layer.experts().forward(gate.ctx, xs.view(), plan.offsets.data(), ys.view(), expert_saved);
  }
  void experts_backward() {
    gate.layer.experts().backward(gate.ctx, xs.view(), plan.offsets.data(), expert_saved, dys.view(), dxs.view());
  }
  // MATH.md 2: x W_g and x W_noise through the backend's gemm; backward: their weight and input gradients.
  void gate_gemms(moe::ConstMatrixView<float> x, bool backward) {
    using moe::Op;
    for (int i = 0; i < 2; ++i) {
      if (!backward) {
        Cpu::gemm(gate.ctx, Op::none, Op::none, 1.f, x, w.view(), 0.f, logits.view());
        continue;
      }
      Cpu::gemm(gate.ctx, Op::transpose, Op::none, 1.f, x, logits.view(), 1.f, w.view());
      Cpu::gemm(gate.ctx, Op::none, Op::transpose, 1.f, logits.view(), w.view(), 1.f, dx.view());
    }
  }
};

// The achievable rate: the experts' whole forward ([T*k x d][d x h], then [T*k x h][h x d]) as
// plain Eigen GEMMs, a row chunk per thread, and through the backend's gemm (fixed 64-row blocks).
struct Floor {
  Mat a, w1, w2, hid, out;

  explicit Floor(const Shape& s)
      : a(Mat::Random(s.tokens * s.k, s.d)),
        w1(Mat::Random(s.d, s.h)),
        w2(Mat::Random(s.h, s.d)),
        hid(s.tokens * s.k, s.h),
        out(s.tokens * s.k, s.d) {}
  void eigen(int threads) {
    par_gemm(threads, a, w1, hid);
    par_gemm(threads, hid, w2, out);
  }
  void backend(int threads) {
    Cpu::Context ctx{threads};
    Cpu::gemm(ctx, moe::Op::none, moe::Op::none, 1.f, a, w1, 0.f, hid);
    Cpu::gemm(ctx, moe::Op::none, moe::Op::none, 1.f, hid, w2, 0.f, out);
  }
};

// The memory floor's rate: a copy of a buffer far larger than the caches, split into one even
// chunk per thread; bandwidth = bytes read + bytes written per second.
struct Copy {
  std::vector<float> src, dst;

  explicit Copy(Index floats) : src(std::size_t(floats), 1.f), dst(std::size_t(floats), 0.f) {}
  void run(int threads) {
    const auto n = Index(src.size());
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int p = 0; p < threads; ++p) {
      const Index lo = n * p / threads, hi = n * (p + 1) / threads;
      std::memcpy(dst.data() + lo, src.data() + lo, std::size_t(hi - lo) * sizeof(float));
    }
  }
  [[nodiscard]] double bytes() const { return 2.0 * double(src.size()) * sizeof(float); }
};

// What one round times, in this order: the layer, the two baselines, then the layer's stages.
enum Task : int {
  kMoeFwd,
  kMoeFwdBwd,
  kDenseFwd,
  kDenseFwdBwd,
  kNaiveFwd,
  kNaiveFwdBwd,
  kGateFwd,
  kGateGemmFwd,
  kDispatch,
  kExpertsFwd,
  kExpertsBwd,
  kGateBwd,
  kGateGemmBwd,
  kFloorEigen,
  kFloorBackend,
  kCopy,
  kTaskCount
};
constexpr const char* kTaskNames[kTaskCount] = {
    "moe_forward",        "moe_forward_backward",   "dense_forward",     "dense_forward_backward",
    "naive_forward",      "naive_forward_backward", "gate_forward",      "gate_gemm_forward",
    "dispatch",           "experts_forward",        "experts_backward",  "gate_backward",
    "gate_gemm_backward", "floor_eigen_gemm",       "floor_backend_gemm", "copy"};

// The two passes the main table reports; backward doubles the GEMM FLOPs and writes a gradient
// beside each weight.
// The bytes that must move: backward reads every weight again and reads and writes its gradient
// (bytes_scale 4 against the forward's 1), and its activations are x, y, dy and dx (2 against 1).
struct Pass {
  const char* name;
  const char* json_name;
  Task moe, dense, naive;
  double flop_scale, bytes_scale, activation_scale;
};
constexpr Pass kPasses[] = {{"fwd", "forward", kMoeFwd, kDenseFwd, kNaiveFwd, 1, 1, 1},
                            {"fwd+bwd", "forward_backward", kMoeFwdBwd, kDenseFwdBwd, kNaiveFwdBwd, 3, 4, 2}};

struct Result {
  Index n = 0, min_tokens = 0, max_tokens = 0, experts_used = 0;
  double naive_max_abs_diff = 0;
  double flop = 0, expert_flop = 0, param_bytes = 0;  // of one forward
  double activation_bytes = 0;                        // x read and y written, once each
  double copy_bytes = 0;                              // of one kCopy call
  std::vector<Measured> m;                            // by Task

  [[nodiscard]] double seconds(Task t) const { return m[std::size_t(t)].seconds; }
  [[nodiscard]] double gflops(const Pass& p) const { return p.flop_scale * flop / seconds(p.moe) * 1e-9; }
  // GFLOP/s of a task that does the experts' forward FLOPs `times` times.
  [[nodiscard]] double expert_gflops(Task t, double times = 1) const { return times * expert_flop / seconds(t) * 1e-9; }
  [[nodiscard]] double fraction_of_floor(const Pass& p) const { return gflops(p) / expert_gflops(kFloorEigen); }
  [[nodiscard]] double bandwidth() const { return copy_bytes / seconds(kCopy); }  // bytes/s
  [[nodiscard]] double bytes(const Pass& p) const {
    return p.bytes_scale * param_bytes + p.activation_scale * activation_bytes;
  }
  // The floor: the pass's FLOPs at the dense layer's measured rate (the dense layer does the
  // experts' FLOPs), or its bytes at the measured copy bandwidth, whichever takes longer.
  [[nodiscard]] double compute_floor_s(const Pass& p) const { return flop / expert_flop * seconds(p.dense); }
  [[nodiscard]] double memory_floor_s(const Pass& p) const { return bytes(p) / bandwidth(); }
  [[nodiscard]] double floor_s(const Pass& p) const { return std::max(compute_floor_s(p), memory_floor_s(p)); }
  // The MoE's GFLOP/s over the dense layer's.
  [[nodiscard]] double share_of_dense(const Pass& p) const { return compute_floor_s(p) / seconds(p.moe); }
  [[nodiscard]] double gate_share(const Pass& p) const {
    const double gate = seconds(kGateFwd) + (p.moe == kMoeFwdBwd ? seconds(kGateBwd) : 0.0);
    return gate / seconds(p.moe);
  }
};

// Experts that got at least one token.
Index experts_used(const std::vector<Index>& tokens_per_expert) {
  return Index(std::count_if(tokens_per_expert.begin(), tokens_per_expert.end(), [](Index c) { return c > 0; }));
}

Result run_experts(const Shape& s, Index n, int threads, Dense& dense, Floor& floor, Copy& copy, const Mat& x,
                   const Mat& dy) {
  Layer layer(Layer::Config{
      .d_model = s.d, .n_experts = n, .expert = {.hidden = s.h}, .gate = {.k = s.k}, .seed = 1, .threads = threads});
  const moe::ConstMatrixView<float> xv(x), dyv(dy);
  moe::Rng rng(kNoiseSeed);
  Result r;
  r.n = n;

  const Layer::Forward first = layer.forward(xv, moe::Mode::train, rng);
  const auto& counts = first.stats().tokens_per_expert;
  r.min_tokens = *std::min_element(counts.begin(), counts.end());
  r.max_tokens = *std::max_element(counts.begin(), counts.end());
  r.experts_used = experts_used(counts);
  // Parameters read by a forward: the gate's two d x n matrices and every expert that got a token.
  r.param_bytes = 4.0 * double(2 * s.d * n + r.experts_used * 2 * s.d * s.h);
  r.activation_bytes = 4.0 * double(2 * s.tokens * s.d);
  r.copy_bytes = copy.bytes();
  r.expert_flop = s.expert_flop();
  r.flop = r.expert_flop + s.gate_flop(n);

  Naive naive(layer, threads);
  naive.step(x, dy, false);
  r.naive_max_abs_diff = double((naive.y - Eigen::Map<const Mat>(first.y().data, s.tokens, s.d)).cwiseAbs().maxCoeff());

  Stages st(layer, s, threads);
  Layer::Forward step;  // reused across calls, as a training loop does: no allocation in steady state
  Layer::Backward grads;
  r.m = measure(s.warmup, s.reps,
                {
                    [&] { layer.forward_into(step, xv, moe::Mode::train, rng); },
                    [&] {
                      layer.forward_into(step, xv, moe::Mode::train, rng);
                      layer.backward_into(grads, step, dyv);
                    },
                    [&] { dense.step(threads, x, dy, false); },
                    [&] { dense.step(threads, x, dy, true); },
                    [&] { naive.step(x, dy, false); },
                    [&] { naive.step(x, dy, true); },
                    [&] { st.gate.forward(xv); },
                    [&] { st.gate_gemms(xv, false); },
                    [&] { st.dispatch(xv); },
                    [&] { st.experts_forward(); },
                    [&] { st.experts_backward(); },
                    [&] { st.gate.backward(xv, st.dgate.view(), st.dx.view()); },
                    [&] { st.gate_gemms(xv, true); },
                    [&] { floor.eigen(threads); },
                    [&] { floor.backend(threads); },
                    [&] { copy.run(threads); },
                });
  return r;
}

// Cost per token as the expert count grows, at a fixed number of rows per expert and at a fixed
// batch: the layer forward and forward + backward against the dense MLP of the same active FLOPs
// at the same T and h. Where n * 2 d h weights and their gradients would not fit the machine's
// memory, h shrinks (the row says so).
struct ScalePoint {
  const char* series;  // "rows" (fixed rows per expert) or "tokens" (fixed T)
  Index n, tokens, h;
  double bytes_params;  // weights and gradients held
  std::vector<Measured> m;  // moe fwd, moe fwd+bwd, dense fwd, dense fwd+bwd

  // The gate's FLOPs over the experts': 4 T d n over 4 T k d h.
  [[nodiscard]] double gate_over_expert_flop(Index k) const { return double(n) / double(k * h); }
};

ScalePoint run_scale_point(const char* series, Index n, Index tokens, Index h, const Shape& s, int threads,
                           bool quick) {
  Layer layer(Layer::Config{
      .d_model = s.d, .n_experts = n, .expert = {.hidden = h}, .gate = {.k = s.k}, .seed = 1, .threads = threads});
  const Mat x = Mat::Random(tokens, s.d), dy = Mat::Random(tokens, s.d) * 1e-2f;
  const moe::ConstMatrixView<float> xv(x), dyv(dy);
  Dense dense(s.d, s.k * h);
  moe::Rng rng(kNoiseSeed);
  Layer::Forward step;
  Layer::Backward grads;
  ScalePoint p{series, n, tokens, h, 4.0 * 2 * double(n * 2 * s.d * h), {}};
  p.m = measure(1, quick ? 1 : 3,
                {[&] { layer.forward_into(step, xv, moe::Mode::train, rng); },
                 [&] {
                   layer.forward_into(step, xv, moe::Mode::train, rng);
                   layer.backward_into(grads, step, dyv);
                 },
                 [&] { dense.step(threads, x, dy, false); }, [&] { dense.step(threads, x, dy, true); }});
  return p;
}

// Inference at small batches on a Mixtral-like block (SwiGLU experts, top-2 of 8, h = 3.5 d):
// the time of one forward against the time to read, once, the weights of the experts the batch
// routes to (and the router's) at the copy bandwidth measured in the same rounds.
using InferLayer = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, Cpu>;
struct InferPoint {
  Index d, h, n, k, tokens, experts_used;
  double read_bytes, copy_bytes, flop;
  Measured forward, copy;

  [[nodiscard]] double bandwidth() const { return copy_bytes / copy.seconds; }
  [[nodiscard]] double read_floor_s() const { return read_bytes / bandwidth(); }
};

std::vector<InferPoint> run_inference(Index d, const std::vector<Index>& batches, int threads, Copy& copy,
                                      bool quick) {
  const Index n = 8, k = 2, h = d * 7 / 2;
  InferLayer layer(InferLayer::Config{
      .d_model = d, .n_experts = n, .expert = {.hidden = h}, .gate = {.k = k}, .seed = 1, .threads = threads});
  std::vector<InferPoint> out;
  for (const Index t : batches) {
    const Mat x = Mat::Random(t, d);
    const moe::ConstMatrixView<float> xv(x);
    InferLayer::Forward f;
    layer.forward_into(f, xv, moe::Mode::inference);
    const Index used = experts_used(f.stats().tokens_per_expert);
    InferPoint p{d, h, n, k, t, used, 4.0 * double(used * 3 * d * h + d * n), copy.bytes(), 6.0 * double(t * k * d * h),
                 {}, {}};
    const auto m = measure(1, quick ? 1 : 9,
                           {[&] { layer.forward_into(f, xv, moe::Mode::inference); }, [&] { copy.run(threads); }});
    p.forward = m[0];
    p.copy = m[1];
    out.push_back(p);
  }
  return out;
}

// Everything one run measured.
struct Run {
  Shape shape;
  int threads = 1;
  bool quick = false;
  double others_busy = -1;  // the share of the machine's cores that other processes used during the run
  std::vector<Result> results;
  std::vector<ScalePoint> scaling;
  std::vector<InferPoint> inference;
};

void print_tables(const Run& run) {
  const Shape& s = run.shape;
  std::printf("moe_layer: d=%lld h=%lld k=%lld T=%lld, float, %d threads, SIMD %s, median of %d after %d warm-up\n",
              (long long)s.d, (long long)s.h, (long long)s.k, (long long)s.tokens, run.threads,
              Eigen::SimdInstructionSetsInUse(), s.reps, s.warmup);
  if (run.others_busy >= 0)
    std::printf("other processes used %.0f%% of the machine's cores during the run%s\n", 100 * run.others_busy,
                run.others_busy > 0.05 ? ": these timings are distorted, rerun on an idle machine" : "");
  std::printf(
      "floor: the experts' forward GEMMs ([T*k x d][d x h], [T*k x h][h x d]) as plain Eigen GEMMs, a row "
      "chunk per thread,\nmeasured in the same rounds as each row\n\n");

  std::printf("%6s %-8s %9s %7s %8s %8s %8s %9s %9s %9s %8s %8s %8s\n", "n", "pass", "tok/exp", "GFLOP", "MB moved",
              "MoE ms", "GFLOP/s", "dense ms", "naive ms", "floor ms", "of dense", "of floor", "vs naive");
  for (const Result& r : run.results)
    for (const Pass& p : kPasses) {
      const std::string tokens = std::to_string(r.min_tokens) + "-" + std::to_string(r.max_tokens);
      std::printf("%6lld %-8s %9s %7.2f %8.1f %8.1f %8.1f %9.1f %9.1f %9.1f %8.2f %8.2f %7.2fx\n", (long long)r.n,
                  p.name, tokens.c_str(), p.flop_scale * r.flop * 1e-9, r.bytes(p) / 1e6, r.seconds(p.moe) * 1e3,
                  r.gflops(p), r.seconds(p.dense) * 1e3, r.seconds(p.naive) * 1e3, r.floor_s(p) * 1e3,
                  r.share_of_dense(p), r.floor_s(p) / r.seconds(p.moe), r.seconds(p.naive) / r.seconds(p.moe));
    }
  std::printf(
      "GFLOP: experts 4*T*k*d*h + gate 4*T*d*n, x3 with backward. MB moved: the weights a forward reads and x and y "
      "(backward:\nthe weights read again, their gradients read and written, dy and dx). dense: one ReLU MLP with "
      "hidden k*h. naive: the\nlayer's gate, then one Eigen GEMM per expert over its gathered rows. of dense: the "
      "MoE's GFLOP/s over the dense\nlayer's. floor: max(GFLOP at the dense layer's rate, MB moved at the copy "
      "bandwidth); of floor: floor / MoE time.\nvs naive: naive time / MoE time. Copy bandwidth:");
  for (const Result& r : run.results) std::printf(" %.1f", r.bandwidth() * 1e-9);
  std::printf(" GB/s (read + written).\n");

  std::printf(
      "\nwhere the time goes, ms (each stage run alone; rest = the layer's time minus its stages; "
      "faults: minor page faults per call)\n");
  std::printf("%6s | %-57s | %-47s | %-31s | %s\n", "", "forward", "backward (rest: of forward + backward)",
              "GFLOP/s: experts, floor GEMMs", "gate share");
  std::printf("%6s | %9s %9s %9s %9s %9s %7s | %9s %9s %9s %9s %7s | %7s %7s %7s %7s | %6s %7s\n", "n", "gate GEMM",
              "gate rest", "dispatch", "experts", "rest", "faults", "experts", "gate GEMM", "gate rest", "rest",
              "faults", "fwd", "bwd", "Eigen", "backend", "fwd", "fwd+bwd");
  for (const Result& r : run.results) {
    const auto ms = [&](Task t) { return r.seconds(t) * 1e3; };
    const double fwd_stages = ms(kGateFwd) + ms(kDispatch) + ms(kExpertsFwd);
    const double all_stages = fwd_stages + ms(kExpertsBwd) + ms(kGateBwd);
    std::printf(
        "%6lld | %9.1f %9.1f %9.1f %9.1f %9.1f %7.0f | %9.1f %9.1f %9.1f %9.1f %7.0f | "
        "%7.1f %7.1f %7.1f %7.1f | %5.0f%% %6.0f%%\n",
        (long long)r.n, ms(kGateGemmFwd), ms(kGateFwd) - ms(kGateGemmFwd), ms(kDispatch), ms(kExpertsFwd),
        ms(kMoeFwd) - fwd_stages, r.m[kMoeFwd].faults, ms(kExpertsBwd), ms(kGateGemmBwd),
        ms(kGateBwd) - ms(kGateGemmBwd), ms(kMoeFwdBwd) - all_stages, r.m[kMoeFwdBwd].faults,
        r.expert_gflops(kExpertsFwd), r.expert_gflops(kExpertsBwd, 2), r.expert_gflops(kFloorEigen),
        r.expert_gflops(kFloorBackend), 100 * r.gate_share(kPasses[0]), 100 * r.gate_share(kPasses[1]));
  }
  std::printf(
      "\nscaling: cost per token as n grows (d=%lld, k=%lld; h shrinks where n experts' weights and gradients "
      "pass 10 GB)\n",
      (long long)s.d, (long long)s.k);
  std::printf("%-22s %6s %6s %5s %8s %10s %10s %12s %12s %9s %9s\n", "series", "n", "T", "h", "rows/ex",
              "fwd us/tok", "f+b us/tok", "dense f us/t", "dense fb us/t", "of dense", "f+b of d.");
  for (const ScalePoint& p : run.scaling) {
    const double t = double(p.tokens);
    const auto us = [&](int i) { return p.m[std::size_t(i)].seconds * 1e6 / t; };
    const std::string series = std::string(p.series) == "rows"
                                   ? "rows/expert " + std::to_string(s.rows_per_expert)
                                   : "T " + std::to_string(s.tokens);
    // The gate's FLOPs count for the layer, as in the main table.
    const double gate_share = p.gate_over_expert_flop(s.k);
    std::printf("%-22s %6lld %6lld %5lld %8.1f %10.2f %10.2f %12.2f %12.2f %9.2f %9.2f\n", series.c_str(),
                (long long)p.n, (long long)p.tokens, (long long)p.h, double(p.tokens * s.k) / double(p.n), us(0), us(1),
                us(2), us(3), (1 + gate_share) * us(2) / us(0), (1 + gate_share) * us(3) / us(1));
  }
  std::printf(
      "of dense: the MoE's GFLOP/s (experts and gate) over the dense MLP's at the same T and h; at large n the gate's "
      "4 T d n FLOPs\nrival the experts' 4 T k d h.\n");

  std::printf(
      "\ninference at small batches: SwiGLU experts, top-%lld of %lld, h = 3.5 d, one forward against reading the "
      "routed experts'\nweights once at the copy bandwidth measured in the same rounds\n",
      run.inference.empty() ? 2LL : (long long)run.inference[0].k,
      run.inference.empty() ? 8LL : (long long)run.inference[0].n);
  std::printf("%6s %6s %4s %8s %10s %10s %10s %9s %9s\n", "d", "h", "T", "experts", "weight MB", "fwd ms",
              "read ms", "of floor", "GB/s");
  for (const InferPoint& p : run.inference)
    std::printf("%6lld %6lld %4lld %8lld %10.1f %10.2f %10.2f %9.2f %9.1f\n", (long long)p.d, (long long)p.h,
                (long long)p.tokens, (long long)p.experts_used, p.read_bytes / 1e6, p.forward.seconds * 1e3,
                p.read_floor_s() * 1e3, p.read_floor_s() / p.forward.seconds, p.bandwidth() * 1e-9);
  std::printf("of floor: read ms / fwd ms (1: the weights stream at copy bandwidth). GB/s: the copy's.\n");
  std::printf("\nnaive loop vs layer output (same routing and weights), max |difference|:");
  for (const Result& r : run.results) std::printf(" n=%lld: %.2g", (long long)r.n, r.naive_max_abs_diff);
  std::printf("\n");
}

std::string to_json(const Run& run) {
  const Shape& s = run.shape;
  Json j;
  j.open("", '{').str("benchmark", "moe_layer").str("scalar", "float").str("simd", Eigen::SimdInstructionSetsInUse());
  j.num("d_model", double(s.d)).num("hidden", double(s.h)).num("k", double(s.k)).num("tokens", double(s.tokens));
  j.num("threads", run.threads).num("repetitions", s.reps).num("warmup", s.warmup).num("quick", run.quick ? 1 : 0);
  j.num("other_processes_cpu_share", run.others_busy);
  j.open("results", '[');
  for (const Result& r : run.results) {
    j.open("", '{').num("n_experts", double(r.n)).num("experts_used", double(r.experts_used));
    j.num("min_tokens_per_expert", double(r.min_tokens)).num("max_tokens_per_expert", double(r.max_tokens));
    j.num("naive_max_abs_diff", r.naive_max_abs_diff);
    j.num("floor_eigen_gemm_gflops", r.expert_gflops(kFloorEigen));
    j.num("floor_backend_gemm_gflops", r.expert_gflops(kFloorBackend));
    j.num("copy_bandwidth_gbs", r.bandwidth() * 1e-9);
    for (const Pass& p : kPasses) {
      j.open(p.json_name, '{').num("flop", p.flop_scale * r.flop).num("param_bytes", p.bytes_scale * r.param_bytes);
      j.num("moe_s", r.seconds(p.moe)).num("gflops", r.gflops(p));
      j.num("fraction_of_floor", r.fraction_of_floor(p));
      j.num("bytes_moved", r.bytes(p)).num("floor_s", r.floor_s(p)).num("compute_floor_s", r.compute_floor_s(p));
      j.num("memory_floor_s", r.memory_floor_s(p)).num("share_of_floor", r.floor_s(p) / r.seconds(p.moe));
      j.num("share_of_dense", r.share_of_dense(p)).num("speedup_over_naive", r.seconds(p.naive) / r.seconds(p.moe));
      j.num("gate_share", r.gate_share(p));
      j.num("dense_s", r.seconds(p.dense)).num("naive_s", r.seconds(p.naive));
      j.num("moe_over_dense", r.seconds(p.moe) / r.seconds(p.dense));
      j.num("moe_over_naive", r.seconds(p.moe) / r.seconds(p.naive)).close('}');
    }
    j.open("tasks", '{');
    for (int t = 0; t < kTaskCount; ++t)
      j.open(kTaskNames[t], '{')
          .num("median_s", r.m[std::size_t(t)].seconds)
          .num("page_faults_per_call", r.m[std::size_t(t)].faults)
          .close('}');
    j.close('}').close('}');
  }
  j.close(']');
  j.open("scaling", '[');
  for (const ScalePoint& p : run.scaling) {
    j.open("", '{').str("series", p.series).num("n_experts", double(p.n)).num("tokens", double(p.tokens));
    j.num("hidden", double(p.h)).num("rows_per_expert", double(p.tokens * s.k) / double(p.n));
    j.num("param_and_grad_bytes", p.bytes_params);
    j.num("moe_forward_s", p.m[0].seconds).num("moe_forward_backward_s", p.m[1].seconds);
    j.num("dense_forward_s", p.m[2].seconds).num("dense_forward_backward_s", p.m[3].seconds);
    j.num("gate_flop_over_expert_flop", p.gate_over_expert_flop(s.k)).close('}');
  }
  j.close(']');
  j.open("inference", '[');
  for (const InferPoint& p : run.inference) {
    j.open("", '{').num("d_model", double(p.d)).num("hidden", double(p.h)).num("n_experts", double(p.n));
    j.num("k", double(p.k)).num("tokens", double(p.tokens)).num("experts_used", double(p.experts_used));
    j.num("read_bytes", p.read_bytes).num("flop", p.flop).num("forward_s", p.forward.seconds);
    j.num("copy_bandwidth_gbs", p.bandwidth() * 1e-9).num("read_floor_s", p.read_floor_s());
    j.num("share_of_floor", p.read_floor_s() / p.forward.seconds).close('}');
  }
  j.close(']').close('}');
  return j.text();
}

}  // namespace

constexpr const char* kUsage =
    "usage: moe_layer [--quick] [--threads N] [--json PATH]\n"
    "  --quick      tiny sizes and one repetition: a smoke run, not a measurement\n"
    "  --threads N  CPU threads for the layer and the baselines (default 0: all that OpenMP offers)\n"
    "  --json PATH  where to write the results (default bench_results.json)\n";

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse_options(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_layer: %s\n%s", e.what(), kUsage);
    return 2;
  }
  if (opt.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  try {
    const auto start = Clock::now();
    const double others_before = others_cpu_seconds();
    Run run;
    run.shape = shape_for(opt.quick);
    run.threads = moe::backend::cpu::resolve_threads(opt.threads);
    run.quick = opt.quick;
    const Shape& s = run.shape;
    const Mat x = Mat::Random(s.tokens, s.d), dy = Mat::Random(s.tokens, s.d) * 1e-2f;

    Dense dense(s.d, s.k * s.h);
    Floor floor(s);
    Copy copy(s.copy_floats);
    for (const Index n : s.experts) run.results.push_back(run_experts(s, n, run.threads, dense, floor, copy, x, dy));
    for (const Index n : s.scale_experts)
      run.scaling.push_back(
          run_scale_point("rows", n, s.rows_per_expert * n / s.k, s.scale_h(n), s, run.threads, run.quick));
    for (const Index n : s.scale_experts)
      run.scaling.push_back(run_scale_point("tokens", n, s.tokens, s.scale_h(n), s, run.threads, run.quick));
    for (const Index d : s.infer_d)
      for (const InferPoint& p : run_inference(d, s.infer_tokens, run.threads, copy, run.quick))
        run.inference.push_back(p);
    const double wall = std::chrono::duration<double>(Clock::now() - start).count();
    if (others_before >= 0)
      run.others_busy = (others_cpu_seconds() - others_before) / (wall * double(::sysconf(_SC_NPROCESSORS_ONLN)));

    print_tables(run);
    write_atomically(opt.json, to_json(run));
    std::printf("wrote %s\n", opt.json.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_layer: %s\n", e.what());
    return 1;
  }
  return 0;
}
