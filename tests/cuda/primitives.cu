// The CUDA backend's device-only primitives: every template instantiated, the host-side errors
// checked, and with a device gemm / grouped_gemm / grouped_gemm_wgrad compared with host loops
// (odd sizes, empty groups, transposes, strides; an empty group's weight-gradient block bit for
// bit), in fp32, fp64, bf16 and tf32 (the tensor-core kernels, also against the exact kernels
// that round the same operands), DeviceMatrix, the Thrust policy and the error messages. Exits
// 77 (Meson: SKIP), naming itself, when no CUDA device answers.
#include <cuda_bf16.h>
#include <thrust/reduce.h>
#include <thrust/sort.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "moe/backend/cuda/caching_allocator.hpp"
#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/backend/cuda/device_matrix.hpp"
#include "moe/backend/cuda/gemm.hpp"
#include "moe/precision.hpp"

namespace mc = moe::backend::cuda;
using moe::ConstMatrixView;
using moe::Index;
using moe::MatrixView;
using moe::Op;

template class moe::backend::DeviceMatrix<float>;
template class moe::backend::DeviceMatrix<double>;
template class moe::backend::DeviceMatrix<moe::Index>;
template class moe::backend::DeviceMatrix<__nv_bfloat16>;
template void mc::gemm<float>(const mc::Context&, Op, Op, float, ConstMatrixView<float>, ConstMatrixView<float>, float,
                              MatrixView<float>);
template void mc::gemm<double>(const mc::Context&, Op, Op, double, ConstMatrixView<double>, ConstMatrixView<double>,
                               double, MatrixView<double>);
template void mc::grouped_gemm<float>(const mc::Context&, const Index*, Index, Op, ConstMatrixView<float>,
                                      ConstMatrixView<float>, MatrixView<float>, moe::Precision);
template void mc::grouped_gemm<double>(const mc::Context&, const Index*, Index, Op, ConstMatrixView<double>,
                                       ConstMatrixView<double>, MatrixView<double>, moe::Precision);
template void mc::grouped_gemm_wgrad<float>(const mc::Context&, const Index*, Index, ConstMatrixView<float>,
                                            ConstMatrixView<float>, float, MatrixView<float>, moe::Precision);
template void mc::grouped_gemm_wgrad<double>(const mc::Context&, const Index*, Index, ConstMatrixView<double>,
                                             ConstMatrixView<double>, double, MatrixView<double>, moe::Precision);

// An operand as the kernels see it for the given precision (bf16 and tf32: float data only).
template <class S>
double operand(S v, moe::Precision precision) {
  return precision == moe::Precision::fp32 ? double(v) : double(moe::round_operand(float(v), precision));
}

// The architecture of the device code that runs (__CUDA_ARCH__, e.g. 900), written to *out.
__global__ void arch_probe(int* out) {
#if defined(__CUDA_ARCH__)
  *out = __CUDA_ARCH__;
#else
  *out = 0;
#endif
}

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

template <class F>
void expect_error(F&& f, const std::string& fragment) {
  try {
    f();
    expect(false, "no moe::Error for: " + fragment);
  } catch (const moe::Error& e) {
    expect(std::string(e.what()).find(fragment) != std::string::npos,
           "message \"" + std::string(e.what()) + "\" lacks \"" + fragment + "\"");
  }
}

// A host matrix with a row stride (>= cols), random contents, and its device copy.
template <class S>
struct Buffer {
  Index rows, cols, stride;
  std::vector<S> host;
  S* dev = nullptr;
  Buffer(Index r, Index c, Index s, std::mt19937& rng, S fill = S(0), bool random = true) : rows(r), cols(c), stride(s) {
    host.assign(static_cast<std::size_t>(std::max<Index>(1, r * s)), fill);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    if (random)
      for (auto& x : host) x = static_cast<S>(u(rng));
    MOE_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(S)));
    upload();
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { static_cast<void>(cudaFree(dev)); }
  void upload() { MOE_CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(S), cudaMemcpyHostToDevice)); }
  std::vector<S> download() const {
    std::vector<S> out(host.size());
    MOE_CUDA_CHECK(cudaMemcpy(out.data(), dev, out.size() * sizeof(S), cudaMemcpyDeviceToHost));
    return out;
  }
  S at(Index r, Index c) const { return host[static_cast<std::size_t>(r * stride + c)]; }
  MatrixView<S> view() { return {dev, rows, cols, stride}; }
  ConstMatrixView<S> cview() const { return {dev, rows, cols, stride}; }
};

// max_rel: the largest |got - want| / scale, scale = the sum of the terms' magnitudes (+ tiny);
// worst: the largest |got - want| / (tol * scale), at most 1 when every element is within its
// bound; bad: a NaN on one side only.
struct ErrorMeter {
  double max_rel = 0;
  double worst = 0;
  bool bad = false;
  void add(double got, double want, double scale, double tol) {
    if (std::isnan(got) != std::isnan(want)) bad = true;
    if (std::isnan(want)) return;
    max_rel = std::max(max_rel, std::abs(got - want) / (scale + 1e-300));
    worst = std::max(worst, std::abs(got - want) / (tol * scale + 1e-300));
  }
  [[nodiscard]] bool ok() const { return !bad && worst <= 1.0; }
};

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-6 : 1e-14;
}

// The bound of a bf16 / tf32 grouped GEMM element reduced over k terms, relative to the sum of
// the terms' magnitudes. Both sides multiply the same rounded operands, and the product of two
// bf16 (8-bit) or two TF32 (11-bit) significands is exact in fp32, so the only error is the fp32
// accumulation: at most (k - 1) u of that sum for sums rounded to nearest (u = 2^-24). Tensor
// cores may add several products at once and truncate instead of rounding: the bound takes
// u = 2^-23 per term and a margin of 16, 16 * 2^-23 * k (k = 37: 7e-5), still far below the
// operands' own rounding (bf16: up to 2^-8, tf32: up to 2^-11 of each operand), so a wrongly rounded or
// unrounded operand, or a missing or doubled term, fails it.
double reduced_tolerance(Index k) { return 16.0 * 0x1p-23 * static_cast<double>(std::max<Index>(1, k)); }

// A row stride of at least cols: cols + pad, or with aligned the next multiple of 4 elements
// above cols (16-byte rows: the tensor-core kernels' vectorized loads and stores).
Index stride_for(Index cols, Index pad, bool aligned) { return aligned ? (cols / 4 + 1) * 4 : cols + pad; }

template <class S>
void test_gemm(std::mt19937& rng, Op ta, Op tb, Index m, Index n, Index k, S alpha, S beta, bool nan_c) {
  const mc::Context ctx;
  const Index ar = ta == Op::none ? m : k, ac = ta == Op::none ? k : m;
  const Index br = tb == Op::none ? k : n, bc = tb == Op::none ? n : k;
  Buffer<S> a(ar, ac, ac + 3, rng), b(br, bc, bc + 1, rng);
  Buffer<S> c(m, n, n + 2, rng, std::numeric_limits<S>::quiet_NaN(), !nan_c);
  mc::gemm<S>(ctx, ta, tb, alpha, a.cview(), b.cview(), beta, c.view());
  ctx.synchronize();
  const auto got = c.download();
  ErrorMeter meter;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double sum = 0, scale = 0;
      for (Index p = 0; p < k; ++p) {
        const double x = ta == Op::none ? a.at(i, p) : a.at(p, i);
        const double y = tb == Op::none ? b.at(p, j) : b.at(j, p);
        sum += x * y;
        scale += std::abs(x * y);
      }
      const double old = c.at(i, j);
      const double want = beta == S(0) ? alpha * sum : alpha * sum + beta * old;
      meter.add(got[static_cast<std::size_t>(i * c.stride + j)], want,
                std::abs(alpha) * scale + (beta == S(0) ? 0.0 : std::abs(beta * old)) + 1e-30, tolerance<S>());
    }
  char what[160];
  std::snprintf(what, sizeof what, "gemm<%s> ta=%d tb=%d m=%ld n=%ld k=%ld beta=%g nan_c=%d: max rel err %.3g",
                sizeof(S) == 4 ? "float" : "double", int(ta), int(tb), long(m), long(n), long(k), double(beta),
                int(nan_c), meter.max_rel);
  std::printf("%s\n", what);
  expect(meter.ok(), what);
}

// The row offsets [groups + 1] of groups of the given sizes.
std::vector<Index> offsets_of(const std::vector<Index>& sizes) {
  std::vector<Index> offsets(1, 0);
  for (Index s : sizes) offsets.push_back(offsets.back() + s);
  return offsets;
}

template <class S>
void test_grouped(std::mt19937& rng, const std::vector<Index>& sizes, Op tw, Index k, Index n,
                  moe::Precision precision = moe::Precision::fp32, bool aligned = false) {
  const mc::Context ctx;
  const Index groups = static_cast<Index>(sizes.size());
  const std::vector<Index> offsets = offsets_of(sizes);
  const Index rows = offsets.back();
  const Index wr = tw == Op::none ? k : n, wc = tw == Op::none ? n : k;
  Buffer<S> a(rows, k, stride_for(k, 2, aligned), rng), w(groups * wr, wc, stride_for(wc, 5, aligned), rng);
  Buffer<S> c(rows, n, stride_for(n, 1, aligned), rng, std::numeric_limits<S>::quiet_NaN(), false);
  Buffer<Index> off(groups + 1, 1, 1, rng, 0, false);
  off.host = offsets;
  off.upload();
  mc::grouped_gemm<S>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), precision);
  ctx.synchronize();
  const auto got = c.download();
  // Determinism: a second run gives the same bits.
  mc::grouped_gemm<S>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), precision);
  ctx.synchronize();
  const auto again = c.download();
  expect(std::memcmp(got.data(), again.data(), got.size() * sizeof(S)) == 0, "grouped_gemm is not deterministic");
  // bf16 / tf32: the exact kernel on the same rounded operands (the path without tensor cores).
  const bool reduced = precision != moe::Precision::fp32;
  std::vector<S> exact_kernel;
  if (reduced) {
    mc::detail::grouped_gemm_exact<S>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), precision);
    ctx.synchronize();
    exact_kernel = c.download();
  }
  const double tol = reduced ? reduced_tolerance(k) : tolerance<S>();
  ErrorMeter meter, versus_exact;
  for (Index g = 0; g < groups; ++g)
    for (Index i = offsets[g]; i < offsets[g + 1]; ++i)
      for (Index j = 0; j < n; ++j) {
        double sum = 0, scale = 0;
        for (Index p = 0; p < k; ++p) {
          const double x = operand(a.at(i, p), precision);
          const double y = operand(tw == Op::none ? w.at(g * wr + p, j) : w.at(g * wr + j, p), precision);
          sum += x * y;
          scale += std::abs(x * y);
        }
        const auto at = static_cast<std::size_t>(i * c.stride + j);
        meter.add(got[at], sum, scale + 1e-30, tol);
        // Both within tol of the sum in double: within 2 tol of each other.
        if (reduced) versus_exact.add(got[at], exact_kernel[at], scale + 1e-30, 2 * tol);
      }
  // The row padding (columns n .. stride - 1, NaN before the call) is never written.
  bool padding_kept = true;
  for (Index i = 0; i < rows; ++i)
    for (Index j = n; j < c.stride; ++j) padding_kept = padding_kept && std::isnan(got[static_cast<std::size_t>(i * c.stride + j)]);
  expect(padding_kept, "grouped_gemm wrote into the output's row padding");
  char what[200];
  std::snprintf(what, sizeof what,
                "grouped_gemm<%s, %s> groups=%ld rows=%ld tw=%d k=%ld n=%ld%s: max rel err %.3g (%.3g of the bound)",
                sizeof(S) == 4 ? "float" : "double", moe::to_string(precision), long(groups), long(rows), int(tw),
                long(k), long(n), aligned ? " aligned" : "", meter.max_rel, meter.worst);
  std::printf("%s\n", what);
  expect(meter.ok(), what);
  if (reduced)
    expect(versus_exact.ok(), std::string(what) + ": against the exact kernel, " +
                                  std::to_string(versus_exact.worst) + " of the bound");
}

template <class S>
void test_wgrad(std::mt19937& rng, const std::vector<Index>& sizes, Index d, Index n, S beta,
                moe::Precision precision = moe::Precision::fp32, bool aligned = false) {
  const mc::Context ctx;
  const Index groups = static_cast<Index>(sizes.size());
  const std::vector<Index> offsets = offsets_of(sizes);
  const Index rows = offsets.back();
  Buffer<S> a(rows, d, stride_for(d, 1, aligned), rng), b(rows, n, stride_for(n, 3, aligned), rng);
  Buffer<S> w(groups * d, n, stride_for(n, 2, aligned), rng, std::numeric_limits<S>::quiet_NaN(), beta != S(0));
  // An empty group's block starts with a -0 (beta != 0), which beta * w_g keeps.
  if (beta != S(0)) {
    for (Index g = 0; g < groups; ++g)
      if (offsets[g + 1] == offsets[g]) w.host[static_cast<std::size_t>(g * d * w.stride)] = S(-0.0);
    w.upload();
  }
  Buffer<Index> off(groups + 1, 1, 1, rng, 0, false);
  off.host = offsets;
  off.upload();
  mc::grouped_gemm_wgrad<S>(ctx, off.dev, groups, a.cview(), b.cview(), beta, w.view(), precision);
  ctx.synchronize();
  const auto got = w.download();
  // An empty group's block is beta * w_g with no product added, bit for bit, as on the CPU:
  // +0 for beta 0 (over NaN), its own bits for beta 1.
  bool empty_exact = true;
  for (Index g = 0; g < groups; ++g) {
    if (offsets[g + 1] != offsets[g]) continue;
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < n; ++j) {
        const auto at = static_cast<std::size_t>((g * d + i) * w.stride + j);
        const S want = beta == S(0) ? S(0) : static_cast<S>(beta * w.host[at]);
        empty_exact = empty_exact && std::memcmp(&got[at], &want, sizeof(S)) == 0;
      }
  }
  expect(empty_exact, "grouped_gemm_wgrad: an empty group's block is not beta * w_g bit for bit");
  // Determinism: with beta 0, a second run from the same w gives the same bits.
  if (beta == S(0)) {
    w.upload();
    mc::grouped_gemm_wgrad<S>(ctx, off.dev, groups, a.cview(), b.cview(), beta, w.view(), precision);
    ctx.synchronize();
    const auto again = w.download();
    expect(std::memcmp(got.data(), again.data(), got.size() * sizeof(S)) == 0,
           "grouped_gemm_wgrad is not deterministic");
  }
  // bf16 / tf32: the exact kernel on the same rounded operands (the path without tensor cores),
  // from the same starting w.
  const bool reduced = precision != moe::Precision::fp32;
  std::vector<S> exact_kernel;
  if (reduced) {
    w.upload();
    mc::detail::grouped_gemm_wgrad_exact<S>(ctx, off.dev, groups, a.cview(), b.cview(), beta, w.view(), precision);
    ctx.synchronize();
    exact_kernel = w.download();
  }
  ErrorMeter meter, versus_exact;
  for (Index g = 0; g < groups; ++g) {
    const double tol = reduced ? reduced_tolerance(offsets[g + 1] - offsets[g]) : tolerance<S>();
    for (Index i = 0; i < d; ++i)
      for (Index j = 0; j < n; ++j) {
        double sum = 0, scale = 0;
        for (Index r = offsets[g]; r < offsets[g + 1]; ++r) {
          const double x = operand(a.at(r, i), precision), y = operand(b.at(r, j), precision);
          sum += x * y;
          scale += std::abs(x * y);
        }
        const double old = w.at(g * d + i, j);
        const double want = beta == S(0) ? sum : beta * old + sum;
        const double bound_scale = scale + (beta == S(0) ? 0.0 : std::abs(beta * old)) + 1e-30;
        const auto at = static_cast<std::size_t>((g * d + i) * w.stride + j);
        meter.add(got[at], want, bound_scale, tol);
        if (reduced) versus_exact.add(got[at], exact_kernel[at], bound_scale, 2 * tol);
      }
  }
  // The row padding (columns n .. stride - 1) keeps its bits.
  bool padding_kept = true;
  for (Index i = 0; i < groups * d; ++i)
    for (Index j = n; j < w.stride; ++j) {
      const auto at = static_cast<std::size_t>(i * w.stride + j);
      padding_kept = padding_kept && std::memcmp(&got[at], &w.host[at], sizeof(S)) == 0;
    }
  expect(padding_kept, "grouped_gemm_wgrad wrote into the gradient's row padding");
  char what[200];
  std::snprintf(what, sizeof what,
                "grouped_gemm_wgrad<%s, %s> groups=%ld rows=%ld d=%ld n=%ld beta=%g%s: max rel err %.3g (%.3g of the "
                "bound)",
                sizeof(S) == 4 ? "float" : "double", moe::to_string(precision), long(groups), long(rows), long(d),
                long(n), double(beta), aligned ? " aligned" : "", meter.max_rel, meter.worst);
  std::printf("%s\n", what);
  expect(meter.ok(), what);
  if (reduced)
    expect(versus_exact.ok(), std::string(what) + ": against the exact kernel, " +
                                  std::to_string(versus_exact.worst) + " of the bound");
}

template <class S>
void test_all(std::mt19937& rng) {
  for (Op ta : {Op::none, Op::transpose})
    for (Op tb : {Op::none, Op::transpose}) {
      test_gemm<S>(rng, ta, tb, 37, 29, 53, S(1), S(0), true);
      test_gemm<S>(rng, ta, tb, 1, 70, 131, S(0.5), S(-1.5), false);
      test_gemm<S>(rng, ta, tb, 65, 1, 1, S(2), S(1), false);
    }
  test_gemm<S>(rng, Op::none, Op::none, 13, 7, 0, S(1), S(0), true);     // k = 0, beta 0 over NaN
  test_gemm<S>(rng, Op::none, Op::none, 13, 7, 0, S(1), S(0.25), false);  // k = 0: c = beta c
  test_gemm<S>(rng, Op::none, Op::none, 0, 7, 5, S(1), S(0), false);      // m = 0
  const std::vector<std::vector<Index>> cases = {
      {0, 1, 70, 0, 133}, {1}, {0, 0, 0}, {64, 64, 1, 0, 127, 200}, {300}, {3, 0, 5, 2, 1, 0, 9, 4, 6, 1}};
  for (const auto& sizes : cases)
    for (Op tw : {Op::none, Op::transpose}) {
      test_grouped<S>(rng, sizes, tw, 37, 29);
      test_grouped<S>(rng, sizes, tw, 1, 1);   // d = 1, n = 1
      test_grouped<S>(rng, sizes, tw, 0, 5);   // k = 0: zeros
      test_grouped<S>(rng, sizes, tw, 80, 130);
    }
  std::vector<Index> many(300, 0);  // more groups than one scan round
  for (std::size_t g = 0; g < many.size(); ++g) many[g] = static_cast<Index>((g * 7) % 5);
  test_grouped<S>(rng, many, Op::none, 9, 11);
  for (const auto& sizes : cases)
    for (S beta : {S(0), S(1), S(0.5)}) {
      test_wgrad<S>(rng, sizes, 37, 29, beta);
      test_wgrad<S>(rng, sizes, 1, 1, beta);
      test_wgrad<S>(rng, sizes, 70, 129, beta);
    }
}

// Precision::bf16 and Precision::tf32 (float data): on an sm_80+ device the tensor-core kernels,
// against loops in double over the same rounded operands and against the exact kernels. Odd
// sizes and strides (scalar loads), strides of whole 16-byte rows (vectorized loads), empty
// groups, one-row groups, groups across several 128-row tiles, partial column tiles, and one
// case of a few thousand rows.
void test_reduced(std::mt19937& rng) {
  const std::vector<std::vector<Index>> cases = {
      {0, 1, 17, 130, 300}, {0, 0, 0}, {64, 64, 1, 0, 127, 200}, {3, 0, 5, 2, 1, 0, 9, 4, 6, 1}};
  const std::vector<Index> large = {1500, 0, 2100, 37, 1};
  for (moe::Precision precision : {moe::Precision::bf16, moe::Precision::tf32}) {
    for (Op tw : {Op::none, Op::transpose}) {
      for (const auto& sizes : cases) {
        test_grouped<float>(rng, sizes, tw, 37, 70, precision);
        test_grouped<float>(rng, sizes, tw, 37, 70, precision, true);
        test_grouped<float>(rng, sizes, tw, 1, 1, precision);  // k = 1, n = 1
        test_grouped<float>(rng, sizes, tw, 0, 5, precision);  // k = 0: zeros
      }
      test_grouped<float>(rng, {300}, tw, 128, 256, precision, true);  // whole tiles and slices
      test_grouped<float>(rng, {130, 0, 255}, tw, 95, 129, precision, true);
      test_grouped<float>(rng, large, tw, 256, 192, precision, true);
      test_grouped<float>(rng, large, tw, 67, 45, precision);
    }
    for (float beta : {0.0f, 1.0f}) {
      for (const auto& sizes : cases) {
        test_wgrad<float>(rng, sizes, 37, 70, beta, precision);
        test_wgrad<float>(rng, sizes, 37, 70, beta, precision, true);
        test_wgrad<float>(rng, sizes, 1, 1, beta, precision);
      }
      test_wgrad<float>(rng, {300, 64}, 128, 256, beta, precision, true);
      test_wgrad<float>(rng, {130, 0, 255}, 129, 95, beta, precision, true);
      test_wgrad<float>(rng, large, 160, 136, beta, precision, true);
      test_wgrad<float>(rng, large, 45, 67, beta, precision);
    }
  }
  std::vector<Index> many(300, 0);  // more groups than one scan round
  for (std::size_t g = 0; g < many.size(); ++g) many[g] = static_cast<Index>((g * 7) % 5);
  test_grouped<float>(rng, many, Op::none, 9, 11, moe::Precision::bf16);
  test_wgrad<float>(rng, many, 9, 11, 1.0f, moe::Precision::tf32);
}

// A device copy of a buffer's values (stride included) as BFloat16.
mc::DeviceMatrix<moe::BFloat16> narrowed(const Buffer<float>& b) {
  std::vector<moe::BFloat16> host(b.host.size());
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = moe::to_bfloat16(b.host[i]);
  mc::DeviceMatrix<moe::BFloat16> out(1, static_cast<Index>(host.size()));
  MOE_CUDA_CHECK(cudaMemcpy(out.data(), host.data(), host.size() * sizeof(moe::BFloat16), cudaMemcpyHostToDevice));
  return out;
}

// Operands stored as BFloat16 give the bits of the fp32 operands rounded by the bf16 path: both
// run the same kernel (tensor cores or the exact one) on the same bfloat16 values. Strided views
// as SwiGLU's halves of [dh1 | dh3], odd sizes for the scalar edge loads, an empty group.
void test_bfloat16_operands(std::mt19937& rng) {
  const mc::Context ctx;
  const std::vector<Index> sizes{130, 0, 255, 7};
  const std::vector<Index> offsets = offsets_of(sizes);
  const Index groups = static_cast<Index>(sizes.size()), rows = offsets.back();
  Buffer<Index> off(groups + 1, 1, 1, rng, 0, false);
  off.host = offsets;
  off.upload();
  auto view16 = [](const mc::DeviceMatrix<moe::BFloat16>& m, const Buffer<float>& like) {
    return ConstMatrixView<moe::BFloat16>{m.data(), like.rows, like.cols, like.stride};
  };
  auto same = [](const Buffer<float>& x, const Buffer<float>& y) {
    const auto a = x.download(), b = y.download();
    return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  for (const Index k : {Index{67}, Index{128}}) {
    const Index n = k == 128 ? 256 : 45;
    for (Op tw : {Op::none, Op::transpose}) {
      const Index wr = tw == Op::none ? k : n, wc = tw == Op::none ? n : k;
      Buffer<float> a(rows, k, 2 * k, rng), w(groups * wr, wc, wc, rng);
      Buffer<float> c16(rows, n, n, rng, 0.0f, false), c(rows, n, n, rng, 0.0f, false);
      const auto a16 = narrowed(a), w16 = narrowed(w);
      mc::grouped_gemm<float>(ctx, off.dev, groups, tw, view16(a16, a), view16(w16, w), c16.view(),
                              moe::Precision::bf16);
      mc::grouped_gemm<float>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), moe::Precision::bf16);
      ctx.synchronize();
      expect(same(c16, c), "grouped_gemm on BFloat16 operands differs from the fp32 operands rounded (k = " +
                               std::to_string(k) + ", tw = " + std::to_string(static_cast<int>(tw)) + ")");
    }
    Buffer<float> a(rows, k, 2 * k, rng), b(rows, n, 2 * n, rng);
    Buffer<float> g16(groups * k, n, n, rng, 0.5f, false), g(groups * k, n, n, rng, 0.5f, false);
    const auto a16 = narrowed(a), b16 = narrowed(b);
    mc::grouped_gemm_wgrad<float>(ctx, off.dev, groups, view16(a16, a), view16(b16, b), 1.0f, g16.view(),
                                  moe::Precision::bf16);
    mc::grouped_gemm_wgrad<float>(ctx, off.dev, groups, a.cview(), b.cview(), 1.0f, g.view(), moe::Precision::bf16);
    ctx.synchronize();
    expect(same(g16, g), "grouped_gemm_wgrad on BFloat16 operands differs from the fp32 operands rounded (k = " +
                             std::to_string(k) + ")");
  }
}

// Informational (no bound): the time of one grouped GEMM shape on each path, printed in TFLOP/s,
// and the tensor-core results against the exact kernels' in norm.
void report_throughput(std::mt19937& rng) {
  const mc::Context ctx;
  const Index groups = 8, per_group = 1024, k = 1024, n = 1024, rows = groups * per_group;
  Buffer<float> a(rows, k, k, rng), w(groups * k, n, n, rng), b(rows, n, n, rng);
  Buffer<float> c(rows, n, n, rng, 0.0f, false), grad(groups * k, n, n, rng, 0.0f, false);
  Buffer<Index> off(groups + 1, 1, 1, rng, 0, false);
  off.host = offsets_of(std::vector<Index>(static_cast<std::size_t>(groups), per_group));
  off.upload();
  cudaEvent_t start = nullptr, stop = nullptr;
  MOE_CUDA_CHECK(cudaEventCreate(&start));
  MOE_CUDA_CHECK(cudaEventCreate(&stop));
  const double flop = 2.0 * double(rows) * double(k) * double(n);
  auto time = [&](const char* what, auto&& run) {
    run();  // warm up (and the one-time kernel setup)
    constexpr int kReps = 3;
    MOE_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
    for (int r = 0; r < kReps; ++r) run();
    MOE_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
    MOE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    std::printf("throughput: %-44s %8.3f ms  %7.1f TFLOP/s\n", what, double(ms) / kReps,
                flop * kReps / (double(ms) * 1e-3) / 1e12);
  };
  auto relative = [](const std::vector<float>& x, const std::vector<float>& y) {
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      diff += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
      norm += double(y[i]) * y[i];
    }
    return std::sqrt(diff / (norm + 1e-300));
  };
  char shape[120];
  std::snprintf(shape, sizeof shape, "%ld groups x %ld rows, k = %ld, n = %ld", long(groups), long(per_group), long(k),
                long(n));
  std::printf("throughput: %s\n", shape);
  for (moe::Precision precision : {moe::Precision::fp32, moe::Precision::bf16, moe::Precision::tf32}) {
    const std::string name = moe::to_string(precision);
    for (Op tw : {Op::none, Op::transpose}) {
      time((std::string("grouped_gemm ") + name + (tw == Op::none ? "" : " (w transposed)")).c_str(),
           [&] { mc::grouped_gemm<float>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), precision); });
      if (precision == moe::Precision::fp32) continue;
      const auto fast = c.download();
      time((std::string("grouped_gemm ") + name + " exact kernel" + (tw == Op::none ? "" : " (w transposed)")).c_str(),
           [&] {
             mc::detail::grouped_gemm_exact<float>(ctx, off.dev, groups, tw, a.cview(), w.cview(), c.view(), precision);
           });
      const double rel = relative(fast, c.download());
      std::printf("throughput: %s grouped_gemm against the exact kernel: %.3g relative\n", name.c_str(), rel);
      expect(rel < 1e-4, name + " grouped_gemm differs from the exact kernel by " + std::to_string(rel));
    }
    time((std::string("grouped_gemm_wgrad ") + name).c_str(), [&] {
      mc::grouped_gemm_wgrad<float>(ctx, off.dev, groups, a.cview(), b.cview(), 0.0f, grad.view(), precision);
    });
    if (precision == moe::Precision::fp32) continue;
    const auto fast = grad.download();
    time((std::string("grouped_gemm_wgrad ") + name + " exact kernel").c_str(), [&] {
      mc::detail::grouped_gemm_wgrad_exact<float>(ctx, off.dev, groups, a.cview(), b.cview(), 0.0f, grad.view(),
                                                  precision);
    });
    const double rel = relative(fast, grad.download());
    std::printf("throughput: %s grouped_gemm_wgrad against the exact kernel: %.3g relative\n", name.c_str(), rel);
    expect(rel < 1e-4, name + " grouped_gemm_wgrad differs from the exact kernel by " + std::to_string(rel));
  }
  MOE_CUDA_CHECK(cudaEventDestroy(start));
  MOE_CUDA_CHECK(cudaEventDestroy(stop));
}

void test_device_matrix() {
  using moe::backend::DeviceMatrix;
  const mc::Context ctx;
  DeviceMatrix<float> m(3, 5, 2.5f);
  expect(m.rows() == 3 && m.cols() == 5 && m.size() == 15 && m.capacity() == 15, "DeviceMatrix shape");
  std::vector<float> h(15);
  ctx.synchronize();
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), m.data(), 60, cudaMemcpyDeviceToHost));
  expect(h[0] == 2.5f && h[14] == 2.5f, "DeviceMatrix fill");
  const float* before = m.data();
  m.resize(2, 4);
  expect(m.data() == before && m.capacity() == 15 && m.size() == 8, "DeviceMatrix keeps its allocation");
  DeviceMatrix<float> copy(m);
  expect(copy.rows() == 2 && copy.cols() == 4 && copy.data() != m.data(), "DeviceMatrix copy");
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), copy.data(), 32, cudaMemcpyDeviceToHost));
  expect(h[7] == 2.5f, "DeviceMatrix copy contents");
  DeviceMatrix<float> moved(std::move(copy));
  expect(copy.rows() == 0 && copy.cols() == 0 && copy.data() == nullptr && copy.capacity() == 0 && moved.size() == 8,
         "DeviceMatrix move");
  DeviceMatrix<float> empty(0, 7);
  expect(empty.data() == nullptr && empty.capacity() == 0, "zero-size DeviceMatrix allocates nothing");
  DeviceMatrix<__nv_bfloat16> bf(4, 4, __float2bfloat16(1.5f));
  DeviceMatrix<Index> idx(2, 3, Index{7});
  idx = DeviceMatrix<Index>(1, 1, Index{3});
  ctx.synchronize();
  std::vector<Index> hi(1);
  MOE_CUDA_CHECK(cudaMemcpy(hi.data(), idx.data(), sizeof(Index), cudaMemcpyDeviceToHost));
  expect(hi[0] == 3, "DeviceMatrix<Index> move assignment");
}

void test_thrust() {
  const mc::Context ctx;
  moe::backend::DeviceMatrix<Index> v(1, 5000);
  std::vector<Index> h(5000);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<Index>((i * 7919) % 5000);
  MOE_CUDA_CHECK(cudaMemcpyAsync(v.data(), h.data(), 5000 * sizeof(Index), cudaMemcpyHostToDevice, ctx.stream()));
  for (int round = 0; round < 3; ++round) {
    thrust::sort(mc::policy(ctx), v.data(), v.data() + v.size());
    if (round == 0) expect(mc::caching_allocator().cached_bytes() > 0, "caching allocator keeps its block");
  }
  const Index total = thrust::reduce(mc::policy(ctx), v.data(), v.data() + v.size(), Index{0});
  ctx.synchronize();
  MOE_CUDA_CHECK(cudaMemcpy(h.data(), v.data(), 5000 * sizeof(Index), cudaMemcpyDeviceToHost));
  bool sorted = true;
  for (std::size_t i = 0; i < h.size(); ++i) sorted = sorted && h[i] == static_cast<Index>(i);
  expect(sorted && total == 4999 * 5000 / 2, "thrust sort / reduce through policy(ctx)");
}

// Checks that need no device: they fail before any CUDA call.
void test_host_errors() {
  expect_error([] { moe::backend::DeviceMatrix<float> m(-1, 2); },
               "DeviceMatrix: shape -1 x 2 has a negative extent, expected rows >= 0 and cols >= 0");
  const mc::Context ctx;
  expect_error(
      [&] {
        mc::gemm<float>(ctx, Op::none, Op::none, 1.f, {nullptr, 2, 3}, {nullptr, 4, 5}, 0.f, {nullptr, 2, 5});
      },
      "gemm: shapes do not agree: op(a) is 2 x 3, op(b) is 4 x 5, c is 2 x 5");
  expect_error(
      [&] {
        mc::grouped_gemm<double>(ctx, nullptr, 3, Op::none, {nullptr, 4, 2}, {nullptr, 7, 5}, {nullptr, 4, 5});
      },
      "grouped_gemm: 7 stacked weight rows do not split into 3 groups");
  expect_error(
      [&] {
        mc::grouped_gemm<float>(ctx, nullptr, 2, Op::transpose, {nullptr, 4, 2}, {nullptr, 6, 2}, {nullptr, 4, 5});
      },
      "grouped_gemm: shapes do not agree: a is 4 x 2, each op(w_g) is 2 x 3, c is 4 x 5");
  expect_error(
      [&] {
        mc::grouped_gemm_wgrad<float>(ctx, nullptr, 2, {nullptr, 4, 2}, {nullptr, 4, 3}, 0.f, {nullptr, 5, 3});
      },
      "grouped_gemm_wgrad: shapes do not agree: a is 4 x 2, b is 4 x 3, w is 5 x 3 for 2 groups");
  expect_error(
      [&] {
        mc::grouped_gemm<double>(ctx, nullptr, 1, Op::none, {nullptr, 2, 3}, {nullptr, 3, 4}, {nullptr, 2, 4},
                                 moe::Precision::bf16);
      },
      "grouped_gemm: Precision::bf16 needs float data, got 64-bit floating point");
  expect_error(
      [&] {
        mc::grouped_gemm<double>(ctx, nullptr, 1, Op::none, {nullptr, 2, 3}, {nullptr, 3, 4}, {nullptr, 2, 4},
                                 moe::Precision::tf32);
      },
      "grouped_gemm: Precision::tf32 needs float data, got 64-bit floating point");
  expect_error(
      [&] {
        mc::grouped_gemm_wgrad<double>(ctx, nullptr, 2, {nullptr, 4, 2}, {nullptr, 4, 3}, 0.0, {nullptr, 4, 3},
                                       moe::Precision::tf32);
      },
      "grouped_gemm_wgrad: Precision::tf32 needs float data, got 64-bit floating point");
}

}  // namespace

int main() {
  try {
    test_host_errors();
    if (!mc::device_available()) {
      std::printf("SKIPPED: cuda_primitives: no CUDA device answered\n");
      return failures == 0 ? 77 : 1;
    }
    std::printf("device: %s\n", mc::device_name().c_str());
    std::mt19937 rng(12345);
    test_device_matrix();
    test_thrust();
    test_all<float>(rng);
    test_all<double>(rng);
    // Precision::bf16 / tf32: operands rounded to bfloat16 / TF32, fp32 accumulation; on tensor
    // cores wherever the device and the build's architectures have them.
    int major = 0, device = 0, arch = 0;
    MOE_CUDA_CHECK(cudaGetDevice(&device));
    MOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    {
      int* probe = nullptr;
      MOE_CUDA_CHECK(cudaMalloc(&probe, sizeof(int)));
      arch_probe<<<1, 1>>>(probe);
      MOE_CUDA_CHECK_LAUNCH();
      MOE_CUDA_CHECK(cudaMemcpy(&arch, probe, sizeof(int), cudaMemcpyDeviceToHost));
      MOE_CUDA_CHECK(cudaFree(probe));
    }
    const bool tensor_cores = mc::tensor_core_gemm_available();
    std::printf("compute capability %d.x, device code for sm_%d: bf16 / tf32 grouped GEMMs on %s\n", major, arch / 10,
                tensor_cores ? "tensor cores" : "CUDA cores (the exact kernels, operands rounded)");
    expect(tensor_cores == (arch >= 800), "tensor_core_gemm_available() disagrees with the code the device runs");
    test_reduced(rng);
    test_bfloat16_operands(rng);
    report_throughput(rng);

    expect_error(
        [] {
          float* p = nullptr;
          MOE_CUDA_CHECK(cudaMalloc(&p, std::size_t{1} << 62));
        },
        "CUDA error cudaErrorMemoryAllocation");
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (failures == 0)
    std::printf("all passed\n");
  else
    std::printf("%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
