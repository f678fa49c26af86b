// The promises of docs/primitives.md, one test case per primitive or helper, on the CPU backend
// in float and double and, where the CUDA toolkit's CCCL headers and backends/cuda are on the
// include path, on ThrustHost (the CUDA backend's Thrust code on the host) in float and double.
// Outputs go into buffers filled with NaN (or a sentinel index) first, and strided views keep
// padding columns after their last, so a primitive that writes too little or too much shows.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/expert_group.hpp"
#include "moe/gate/common.hpp"
#include "moe/top_k.hpp"

// ThrustHost is tested where its headers are found (or as MOE_TEST_THRUST_HOST says).
#if !defined(MOE_TEST_THRUST_HOST)
#if __has_include("moe/backend/thrust_host.hpp") && __has_include(<thrust/version.h>)
#define MOE_TEST_THRUST_HOST 1
#else
#define MOE_TEST_THRUST_HOST 0
#endif
#endif
#if MOE_TEST_THRUST_HOST
#include "moe/backend/thrust_host.hpp"
#endif

namespace {

using moe::ConstMatrixView;
using moe::Index;
using moe::MatrixView;
using moe::Op;

using Backends = std::tuple<moe::backend::Cpu<float>, moe::backend::Cpu<double>
#if MOE_TEST_THRUST_HOST
                            ,
                            moe::backend::ThrustHost<float>, moe::backend::ThrustHost<double>
#endif
                            >;

template <class B>
using Buffer = typename B::template Buffer<typename B::Scalar>;
template <class B>
using IndexBuffer = typename B::template Buffer<Index>;

// Padding columns of a strided view.
constexpr Index kPad = 2;
// What an output buffer holds before a call: NaN, or an index no primitive writes.
constexpr Index kSentinel = 0x5A5A5A5A;
template <class T>
T poison() {
  if constexpr (std::is_floating_point_v<T>)
    return std::numeric_limits<T>::quiet_NaN();
  else
    return T(kSentinel);
}

template <class T>
bool is_poison(T v) {
  if constexpr (std::is_floating_point_v<T>)
    return std::isnan(v);
  else
    return v == T(kSentinel);
}

// Host values uniform in (-1, 1], a pure function of (seed, element).
template <class S>
std::vector<S> random_values(Index count, std::uint64_t seed) {
  const moe::CounterRandom r{seed};
  std::vector<S> v(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = static_cast<S>(r.symmetric_uniform(i, 0u, 5u));
  return v;
}

// A backend matrix rows x cols seen through a view of stride cols + kPad, every element (the
// padding included) set to `fill` first.
template <class B, class T>
struct Padded {
  typename B::template Buffer<T> storage;
  Index rows = 0, cols = 0;

  Padded(typename B::Context& ctx, Index r, Index c, T fill) : rows(r), cols(c) {
    storage.resize(r, c + kPad);
    B::fill(ctx, storage.view(), fill);
  }
  [[nodiscard]] MatrixView<T> view() { return {storage.data(), rows, cols, cols + kPad}; }
  // Every element, padding included, on the host.
  [[nodiscard]] std::vector<T> all(typename B::Context& ctx) {
    return moe::to_host<B>(ctx, ConstMatrixView<T>(storage.view()));
  }
  // The view's elements on the host, row-major without padding.
  [[nodiscard]] std::vector<T> values(typename B::Context& ctx) {
    return moe::to_host<B>(ctx, ConstMatrixView<T>(view()));
  }
  [[nodiscard]] bool padding_is(typename B::Context& ctx, T fill) {
    const std::vector<T> a = all(ctx);
    for (Index r = 0; r < rows; ++r)
      for (Index c = cols; c < cols + kPad; ++c) {
        const T v = a[static_cast<std::size_t>(r * (cols + kPad) + c)];
        if (std::memcmp(&v, &fill, sizeof(T)) != 0) return false;
      }
    return true;
  }
  void set(typename B::Context& ctx, const std::vector<T>& host) {
    B::copy(ctx, ConstMatrixView<T>{host.data(), rows, cols}, view());
  }
};

// A backend buffer [rows x cols] holding the host values.
template <class B, class T>
typename B::template Buffer<T> upload(typename B::Context& ctx, const std::vector<T>& host, Index rows, Index cols) {
  typename B::template Buffer<T> b;
  b.resize(rows, cols);
  if (rows * cols > 0) B::copy(ctx, ConstMatrixView<T>{host.data(), rows, cols}, b.view());
  return b;
}
template <class B, class T>
typename B::template Buffer<T> upload(typename B::Context& ctx, const std::vector<T>& host) {
  return upload<B, T>(ctx, host, static_cast<Index>(host.size()), 1);
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class S>
double epsilon() {
  return static_cast<double>(std::numeric_limits<S>::epsilon());
}

std::vector<Index> offsets_of(const std::vector<Index>& rows) {
  std::vector<Index> off{0};
  for (const Index r : rows) off.push_back(off.back() + r);
  return off;
}

}  // namespace

// ---- GEMMs -----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("gemm: c = alpha op(a) op(b) + beta c; beta 0 never reads c; depth 0 gives beta c", B,
                          gemm_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(2);
  const Index m = 5, n = 4, k = 3;
  for (const Op ta : {Op::none, Op::transpose})
    for (const Op tb : {Op::none, Op::transpose})
      for (const S beta : {S(0), S(0.5)}) {
        CAPTURE(int(ta));
        CAPTURE(int(tb));
        CAPTURE(beta);
        const auto ha = random_values<S>(m * k, 1), hb = random_values<S>(k * n, 2), hc = random_values<S>(m * n, 3);
        const Buffer<B> a = ta == Op::none ? upload<B>(ctx, ha, m, k) : upload<B>(ctx, ha, k, m);
        const Buffer<B> b = tb == Op::none ? upload<B>(ctx, hb, k, n) : upload<B>(ctx, hb, n, k);
        Padded<B, S> c(ctx, m, n, poison<S>());
        // beta 0 over NaN: c is not read.
        if (beta != S(0)) c.set(ctx, hc);
        B::gemm(ctx, ta, tb, S(2), ConstMatrixView<S>(a.view()), ConstMatrixView<S>(b.view()), beta, c.view());
        const auto got = c.values(ctx);
        for (Index i = 0; i < m; ++i)
          for (Index j = 0; j < n; ++j) {
            double want = 0;
            for (Index p = 0; p < k; ++p) {
              const double av = ta == Op::none ? ha[i * k + p] : ha[p * m + i];
              const double bv = tb == Op::none ? hb[p * n + j] : hb[j * k + p];
              want += 2 * av * bv;
            }
            if (beta != S(0)) want += double(beta) * hc[i * n + j];
            CHECK(std::abs(double(got[i * n + j]) - want) <= 16 * epsilon<S>());
          }
        CHECK(c.padding_is(ctx, poison<S>()));
      }
  // alpha 0 with a NaN in a: the CPU's GEMM still multiplies (cuBLAS would not read a).
  {
    std::vector<S> ha = random_values<S>(m * k, 4);
    ha[1] = std::numeric_limits<S>::quiet_NaN();
    const Buffer<B> a = upload<B>(ctx, ha, m, k), b = upload<B>(ctx, random_values<S>(k * n, 5), k, n);
    Padded<B, S> c(ctx, m, n, S(1));
    B::gemm(ctx, Op::none, Op::none, S(0), ConstMatrixView<S>(a.view()), ConstMatrixView<S>(b.view()), S(1), c.view());
    const auto got = c.values(ctx);
    CHECK(std::isnan(got[0]));
    CHECK(got[n] == S(1));
  }
  // Depth 0: c = beta c, zeros for beta 0 even over NaN.
  const Buffer<B> a0 = upload<B>(ctx, std::vector<S>{}, m, 0), b0 = upload<B>(ctx, std::vector<S>{}, 0, n);
  Padded<B, S> c0(ctx, m, n, poison<S>());
  B::gemm(ctx, Op::none, Op::none, S(1), ConstMatrixView<S>(a0.view()), ConstMatrixView<S>(b0.view()), S(0),
          c0.view());
  for (const S v : c0.values(ctx)) CHECK(v == S(0));
  c0.set(ctx, std::vector<S>(static_cast<std::size_t>(m * n), S(4)));
  B::gemm(ctx, Op::none, Op::none, S(1), ConstMatrixView<S>(a0.view()), ConstMatrixView<S>(b0.view()), S(0.5),
          c0.view());
  for (const S v : c0.values(ctx)) CHECK(v == S(2));
  CHECK(c0.padding_is(ctx, poison<S>()));
}
TEST_CASE_TEMPLATE_APPLY(gemm_cases, Backends);

namespace {
// Group sizes with empty groups first, between and last, a one-row group, a thin group and one
// of two row tiles on the CPU.
std::vector<Index> gemm_group_rows() { return {0, 1, 3, 0, 40, 600, 0}; }
}  // namespace

TEST_CASE_TEMPLATE_DEFINE(
    "grouped_gemm: each group's rows of c are a_g op(w_g), overwritten; nothing else is written or read", B,
    grouped_gemm_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(3);
  const std::vector<Index> rows = gemm_group_rows();
  std::vector<Index> off = offsets_of(rows);
  const auto groups = static_cast<Index>(rows.size());
  const Index total = off.back(), k = 5, n = 7;
  // offsets may be longer than groups + 1 (the layer passes its plan's [n + 3]): the rest is unread.
  off.push_back(-5);
  off.push_back(1 << 30);
  const IndexBuffer<B> offsets = upload<B>(ctx, off);
  for (const Op tw : {Op::none, Op::transpose}) {
    CAPTURE(int(tw));
    const auto ha = random_values<S>(total * k, 11), hw = random_values<S>(groups * k * n, 12);
    const Buffer<B> a = upload<B>(ctx, ha, total, k);
    const Buffer<B> w = tw == Op::none ? upload<B>(ctx, hw, groups * k, n) : upload<B>(ctx, hw, groups * n, k);
    Padded<B, S> c(ctx, total, n, poison<S>());
    B::grouped_gemm(ctx, offsets.data(), groups, tw, ConstMatrixView<S>(a.view()), ConstMatrixView<S>(w.view()),
                    c.view(), moe::Precision::fp32);
    const auto got = c.values(ctx);
    for (Index g = 0; g < groups; ++g)
      for (Index r = off[g]; r < off[g + 1]; ++r)
        for (Index j = 0; j < n; ++j) {
          long double want = 0, scale = 0;
          for (Index p = 0; p < k; ++p) {
            const long double wv = tw == Op::none ? hw[(g * k + p) * n + j] : hw[(g * n + j) * k + p];
            want += static_cast<long double>(ha[r * k + p]) * wv;
            scale += std::abs(static_cast<long double>(ha[r * k + p]) * wv);
          }
          CHECK(std::abs(double(got[r * n + j]) - double(want)) <= 4 * double(k) * epsilon<S>() * double(scale));
        }
    CHECK(c.padding_is(ctx, poison<S>()));
    // The operands are not written.
    CHECK(same_bits(moe::to_host<B>(ctx, ConstMatrixView<S>(a.view())), ha));
    CHECK(same_bits(moe::to_host<B>(ctx, ConstMatrixView<S>(w.view())), hw));
    // The same bits for another thread count and another call.
    auto one = moe::make_context<B>(1);
    Padded<B, S> again(one, total, n, poison<S>());
    B::grouped_gemm(one, offsets.data(), groups, tw, ConstMatrixView<S>(a.view()), ConstMatrixView<S>(w.view()),
                    again.view(), moe::Precision::fp32);
    CHECK(same_bits(again.values(one), got));
  }
  // A depth of 0 writes zeros (over NaN); no rows at all is a no-op.
  for (const Op tw : {Op::none, Op::transpose}) {
    const Buffer<B> a = upload<B>(ctx, std::vector<S>{}, total, 0);
    const Buffer<B> w = tw == Op::none ? upload<B>(ctx, std::vector<S>{}, 0, n)
                                       : upload<B>(ctx, std::vector<S>{}, groups * n, 0);
    Padded<B, S> c(ctx, total, n, poison<S>());
    B::grouped_gemm(ctx, offsets.data(), groups, tw, ConstMatrixView<S>(a.view()), ConstMatrixView<S>(w.view()),
                    c.view(), moe::Precision::fp32);
    for (const S v : c.values(ctx)) CHECK(v == S(0));
    CHECK(c.padding_is(ctx, poison<S>()));
  }
  {
    const IndexBuffer<B> none = upload<B>(ctx, std::vector<Index>(4, 0));
    const Buffer<B> a = upload<B>(ctx, std::vector<S>{}, 0, k), w = upload<B>(ctx, random_values<S>(3 * k * n, 1), 3 * k, n);
    Buffer<B> c;
    c.resize(0, n);
    B::grouped_gemm(ctx, none.data(), 3, Op::none, ConstMatrixView<S>(a.view()), ConstMatrixView<S>(w.view()),
                    c.view(), moe::Precision::fp32);
  }
}
TEST_CASE_TEMPLATE_APPLY(grouped_gemm_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("grouped_gemm and grouped_gemm_wgrad check shapes, offsets[groups] and the precision", B,
                          gemm_check_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  const IndexBuffer<B> offsets = upload<B>(ctx, std::vector<Index>{0, 2, 3});
  const Buffer<B> a = upload<B>(ctx, random_values<S>(4 * 3, 1), 4, 3), w = upload<B>(ctx, random_values<S>(6 * 2, 2), 6, 2);
  Buffer<B> c;
  c.resize(4, 2);
  // offsets end at 3, a has 4 rows (the CUDA backend does not check this one: it stays on the device).
  CHECK_THROWS_AS(B::grouped_gemm(ctx, offsets.data(), 2, Op::none, ConstMatrixView<S>(a.view()),
                                  ConstMatrixView<S>(w.view()), c.view(), moe::Precision::fp32),
                  moe::Error);
  // 6 weight rows do not split into 4 groups.
  CHECK_THROWS_AS(B::grouped_gemm(ctx, offsets.data(), 4, Op::none, ConstMatrixView<S>(a.view()),
                                  ConstMatrixView<S>(w.view()), c.view(), moe::Precision::fp32),
                  moe::Error);
  Buffer<B> g;
  g.resize(2 * 3, 5);
  const Buffer<B> b = upload<B>(ctx, random_values<S>(4 * 4, 3), 4, 4);  // 4 columns, g has 5
  CHECK_THROWS_AS(B::grouped_gemm_wgrad(ctx, offsets.data(), 2, ConstMatrixView<S>(a.view()),
                                        ConstMatrixView<S>(b.view()), S(1), g.view(), moe::Precision::fp32),
                  moe::Error);
  if constexpr (std::is_same_v<S, double>) {
    const IndexBuffer<B> off4 = upload<B>(ctx, std::vector<Index>{0, 2, 4});
    CHECK_THROWS_AS(B::grouped_gemm(ctx, off4.data(), 2, Op::none, ConstMatrixView<S>(a.view()),
                                    ConstMatrixView<S>(w.view()), c.view(), moe::Precision::bf16),
                    moe::Error);
  }
}
TEST_CASE_TEMPLATE_APPLY(gemm_check_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE(
    "grouped_gemm_wgrad: beta 0 overwrites (an empty group's block becomes +0), beta 1 adds (an empty group's "
    "block keeps its bits), another beta scales",
    B, wgrad_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(3);
  const std::vector<Index> rows = {2, 0, 5, 0};
  const std::vector<Index> off = offsets_of(rows);
  const auto groups = static_cast<Index>(rows.size());
  const Index total = off.back(), d = 3, n = 4;
  const IndexBuffer<B> offsets = upload<B>(ctx, off);
  const auto ha = random_values<S>(total * d, 21), hb = random_values<S>(total * n, 22);
  const Buffer<B> a = upload<B>(ctx, ha, total, d), b = upload<B>(ctx, hb, total, n);
  // w before the call: random, with -0, NaN and infinities in the empty groups' blocks.
  std::vector<S> old = random_values<S>(groups * d * n, 23);
  const S specials[] = {S(-0.0), std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity(),
                        -std::numeric_limits<S>::infinity()};
  for (Index g = 0; g < groups; ++g)
    if (rows[static_cast<std::size_t>(g)] == 0)
      for (Index i = 0; i < 4; ++i) old[static_cast<std::size_t>(g * d * n + i * 3 % (d * n))] = specials[i];
  for (const S beta : {S(0), S(1), S(0.5)}) {
    CAPTURE(beta);
    Padded<B, S> w(ctx, groups * d, n, poison<S>());
    if (beta != S(0)) w.set(ctx, old);  // beta 0: NaN everywhere, never read
    B::grouped_gemm_wgrad(ctx, offsets.data(), groups, ConstMatrixView<S>(a.view()), ConstMatrixView<S>(b.view()),
                          beta, w.view(), moe::Precision::fp32);
    const auto got = w.values(ctx);
    for (Index g = 0; g < groups; ++g)
      for (Index i = 0; i < d; ++i)
        for (Index j = 0; j < n; ++j) {
          const std::size_t at = static_cast<std::size_t>((g * d + i) * n + j);
          const S v = got[at], before = old[at];
          if (rows[static_cast<std::size_t>(g)] == 0) {
            if (beta == S(0)) {
              CHECK(v == S(0));
              CHECK(!std::signbit(v));
            } else if (beta == S(1)) {
              CHECK(std::memcmp(&v, &before, sizeof(S)) == 0);
            } else {
              const S want = beta * before;
              CHECK((std::isnan(want) ? std::isnan(v) : std::memcmp(&v, &want, sizeof(S)) == 0));
            }
            continue;
          }
          double want = beta == S(0) ? 0.0 : double(beta) * double(before);
          for (Index r = off[g]; r < off[g + 1]; ++r) want += double(ha[r * d + i]) * double(hb[r * n + j]);
          CHECK(std::abs(double(v) - want) <= 32 * epsilon<S>());
        }
    CHECK(w.padding_is(ctx, poison<S>()));
  }
  // No rows at all: beta 0 clears every block.
  {
    const IndexBuffer<B> none = upload<B>(ctx, std::vector<Index>(static_cast<std::size_t>(groups + 1), 0));
    const Buffer<B> a0 = upload<B>(ctx, std::vector<S>{}, 0, d), b0 = upload<B>(ctx, std::vector<S>{}, 0, n);
    Padded<B, S> w(ctx, groups * d, n, poison<S>());
    B::grouped_gemm_wgrad(ctx, none.data(), groups, ConstMatrixView<S>(a0.view()), ConstMatrixView<S>(b0.view()),
                          S(0), w.view(), moe::Precision::fp32);
    for (const S v : w.values(ctx)) CHECK((v == S(0) && !std::signbit(v)));
  }
  // The same bits for any thread count, over several tiles of the weight.
  {
    const std::vector<Index> big_rows = {40, 0, 3};
    const std::vector<Index> big_off = offsets_of(big_rows);
    const IndexBuffer<B> bo = upload<B>(ctx, big_off);
    const Index dd = 260, nn = 520, tt = big_off.back();
    const Buffer<B> ba = upload<B>(ctx, random_values<S>(tt * dd, 31), tt, dd),
                    bb = upload<B>(ctx, random_values<S>(tt * nn, 32), tt, nn);
    std::vector<std::vector<S>> results;
    for (const int threads : {1, 3}) {
      auto tctx = moe::make_context<B>(threads);
      Buffer<B> w;
      w.resize(3 * dd, nn);
      B::grouped_gemm_wgrad(tctx, bo.data(), 3, ConstMatrixView<S>(ba.view()), ConstMatrixView<S>(bb.view()), S(0),
                            w.view(), moe::Precision::fp32);
      results.push_back(moe::to_host<B>(tctx, ConstMatrixView<S>(w.view())));
    }
    CHECK(same_bits(results[0], results[1]));
  }
}
TEST_CASE_TEMPLATE_APPLY(wgrad_cases, Backends);

// ---- Parallel loops --------------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("for_each and for_each_element: every item exactly once, none for an empty range", B,
                          loop_cases) {
  auto ctx = moe::make_context<B>(3);
  for (const Index count : {Index{0}, Index{1}, Index{5}, Index{2000}}) {
    CAPTURE(count);
    IndexBuffer<B> hits;
    hits.resize(count + 1, 1);
    B::fill(ctx, hits.view(), Index{0});
    Index* h = hits.data();
    B::for_each(ctx, count, [=] MOE_HD(Index i) { h[i] += 1; });
    const auto got = moe::to_host<B>(ctx, ConstMatrixView<Index>(hits.view()));
    for (Index i = 0; i < count; ++i) CHECK(got[static_cast<std::size_t>(i)] == 1);
    CHECK(got[static_cast<std::size_t>(count)] == 0);
  }
  {
    IndexBuffer<B> flag;
    flag.resize(1, 1);
    B::fill(ctx, flag.view(), Index{0});
    Index* f = flag.data();
    B::for_each(ctx, -3, [=] MOE_HD(Index) { f[0] = 1; });
    moe::for_each_element<B>(ctx, 0, 4, [=] MOE_HD(Index, Index) { f[0] = 1; });
    moe::for_each_element<B>(ctx, 4, 0, [=] MOE_HD(Index, Index) { f[0] = 1; });
    CHECK(moe::to_host<B>(ctx, ConstMatrixView<Index>(flag.view()))[0] == 0);
  }
  for (const Index rows : {Index{1}, Index{3}, Index{700}})
    for (const Index cols : {Index{1}, Index{7}}) {
      Padded<B, Index> grid(ctx, rows, cols, Index{0});
      const MatrixView<Index> g = grid.view();
      moe::for_each_element<B>(ctx, rows, cols, [=] MOE_HD(Index r, Index c) { g(r, c) += 1 + r * cols + c; });
      const auto got = grid.values(ctx);
      for (Index i = 0; i < rows * cols; ++i) CHECK(got[static_cast<std::size_t>(i)] == 1 + i);
      CHECK(grid.padding_is(ctx, Index{0}));
    }
}
TEST_CASE_TEMPLATE_APPLY(loop_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("segment_of_row and group_of_row: the one non-empty segment owning a row, on the backend", B,
                          segment_cases) {
  auto ctx = moe::make_context<B>(1);
  const std::vector<Index> off = {0, 0, 2, 2, 2, 5, 5, 7, 7};
  const auto segments = static_cast<Index>(off.size()) - 1;
  const IndexBuffer<B> offsets = upload<B>(ctx, off);
  IndexBuffer<B> owner;
  owner.resize(off.back(), 2);
  const Index* o = offsets.data();
  Index* out = owner.data();
  B::for_each(ctx, off.back(), [=] MOE_HD(Index r) {
    out[2 * r] = moe::segment_of_row(o, segments, r);
    out[2 * r + 1] = moe::gate::group_of_row(nullptr, segments, r);
  });
  const auto got = moe::to_host<B>(ctx, ConstMatrixView<Index>(owner.view()));
  const Index want[] = {1, 1, 4, 4, 4, 6, 6};
  for (Index r = 0; r < off.back(); ++r) {
    CHECK(got[static_cast<std::size_t>(2 * r)] == want[r]);
    CHECK(got[static_cast<std::size_t>(2 * r + 1)] == 0);
  }
}
TEST_CASE_TEMPLATE_APPLY(segment_cases, Backends);

// ---- Routing primitives ------------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("gather_rows: dst row i = src row rows[i], repeats allowed; strides honoured", B,
                          gather_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(2);
  const Index src_rows = 6, cols = 3;
  Padded<B, S> src(ctx, src_rows, cols, S(-7));
  const auto hs = random_values<S>(src_rows * cols, 41);
  src.set(ctx, hs);
  const std::vector<Index> pick = {5, 0, 0, 3};
  const IndexBuffer<B> rows = upload<B>(ctx, pick);
  Padded<B, S> dst(ctx, 4, cols, poison<S>());
  B::gather_rows(ctx, ConstMatrixView<S>(src.view()), rows.data(), dst.view());
  const auto got = dst.values(ctx);
  for (Index i = 0; i < 4; ++i)
    for (Index c = 0; c < cols; ++c) CHECK(got[i * cols + c] == hs[pick[i] * cols + c]);
  CHECK(dst.padding_is(ctx, poison<S>()));
  Padded<B, S> none(ctx, 0, cols, poison<S>());
  B::gather_rows(ctx, ConstMatrixView<S>(src.view()), rows.data(), none.view());
  Padded<B, S> narrow(ctx, 4, cols - 1, poison<S>());
  CHECK_THROWS_AS(B::gather_rows(ctx, ConstMatrixView<S>(src.view()), rows.data(), narrow.view()), moe::Error);
}
TEST_CASE_TEMPLATE_APPLY(gather_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("histogram, exclusive_scan, stable_sort_by_key: every output entry written, nothing past it",
                          B, routing_cases) {
  auto ctx = moe::make_context<B>(2);
  for (const Index count : {Index{0}, Index{1}, Index{9}, Index{500}})
    for (const Index bins : {Index{1}, Index{4}, Index{70}}) {
      CAPTURE(count);
      CAPTURE(bins);
      std::vector<Index> keys(static_cast<std::size_t>(count));
      const moe::CounterRandom r{static_cast<std::uint64_t>(count * 131 + bins)};
      for (Index i = 0; i < count; ++i)
        keys[static_cast<std::size_t>(i)] =
            std::min(bins - 1, static_cast<Index>((r.symmetric_uniform(i, 1u, 1u) + 1) * 0.5 * double(bins)));
      const IndexBuffer<B> key = upload<B>(ctx, keys.empty() ? std::vector<Index>{kSentinel} : keys);
      // histogram: all bins entries, zeros for empty bins; one more entry stays as it was.
      IndexBuffer<B> counts;
      counts.resize(bins + 1, 1);
      B::fill(ctx, counts.view(), kSentinel);
      B::histogram(ctx, key.data(), count, bins, counts.data());
      const auto hc = moe::to_host<B>(ctx, ConstMatrixView<Index>(counts.view()));
      for (Index b = 0; b < bins; ++b)
        CHECK(hc[static_cast<std::size_t>(b)] == std::count(keys.begin(), keys.end(), b));
      CHECK(hc[static_cast<std::size_t>(bins)] == kSentinel);
      // exclusive_scan: count + 1 entries; the input is unchanged.
      IndexBuffer<B> scan;
      scan.resize(bins + 2, 1);
      B::fill(ctx, scan.view(), kSentinel);
      B::exclusive_scan(ctx, counts.data(), bins, scan.data());
      const auto hs = moe::to_host<B>(ctx, ConstMatrixView<Index>(scan.view()));
      CHECK(hs[0] == 0);
      for (Index b = 0; b < bins; ++b)
        CHECK(hs[static_cast<std::size_t>(b + 1)] == hs[static_cast<std::size_t>(b)] + hc[static_cast<std::size_t>(b)]);
      CHECK(hs[static_cast<std::size_t>(bins)] == count);
      CHECK(hs[static_cast<std::size_t>(bins + 1)] == kSentinel);
      CHECK(same_bits(moe::to_host<B>(ctx, ConstMatrixView<Index>(counts.view())), hc));
      // stable_sort_by_key: a permutation, keys ascending, equal keys in position order; keys unchanged.
      IndexBuffer<B> order;
      order.resize(count + 1, 1);
      B::fill(ctx, order.view(), kSentinel);
      B::stable_sort_by_key(ctx, key.data(), count, bins, order.data());
      const auto ho = moe::to_host<B>(ctx, ConstMatrixView<Index>(order.view()));
      std::vector<Index> want(static_cast<std::size_t>(count));
      std::iota(want.begin(), want.end(), Index{0});
      std::stable_sort(want.begin(), want.end(), [&](Index x, Index y) {
        return keys[static_cast<std::size_t>(x)] < keys[static_cast<std::size_t>(y)];
      });
      CHECK(std::equal(want.begin(), want.end(), ho.begin()));
      CHECK(ho[static_cast<std::size_t>(count)] == kSentinel);
      if (count > 0) CHECK(same_bits(moe::to_host<B>(ctx, ConstMatrixView<Index>(key.view())), keys));
    }
  // A key outside [0, bins): the CPU backend refuses it; the Thrust backends do not count it, and
  // ThrustHost sorts it by its value.
  const IndexBuffer<B> bad = upload<B>(ctx, std::vector<Index>{0, 3, -1, 1, 3});
  IndexBuffer<B> counts, order;
  counts.resize(3, 1);
  order.resize(5, 1);
  if constexpr (moe::backend::is_cpu<B>) {
    CHECK_THROWS_AS(B::histogram(ctx, bad.data(), 5, 3, counts.data()), moe::Error);
    CHECK_THROWS_AS(B::stable_sort_by_key(ctx, bad.data(), 5, 3, order.data()), moe::Error);
  } else {
    B::histogram(ctx, bad.data(), 5, 3, counts.data());
    CHECK(moe::to_host<B>(ctx, ConstMatrixView<Index>(counts.view())) == std::vector<Index>{1, 1, 0});
    B::stable_sort_by_key(ctx, bad.data(), 5, 3, order.data());
    CHECK(moe::to_host<B>(ctx, ConstMatrixView<Index>(order.view())) == std::vector<Index>{2, 0, 3, 1, 4});
  }
}
TEST_CASE_TEMPLATE_APPLY(routing_cases, Backends);

// ---- Reductions, fill, copy ------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("sum_rows, segment_sums, sum_rows_by_group: in row order; an empty group sums to 0", B,
                          sum_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(2);
  // Column 0 is 2^p, 1, -2^p (p the mantissa's width): in row order the 1 is lost, so another
  // order would show.
  const S big = std::ldexp(S(1), std::numeric_limits<S>::digits);
  const std::vector<S> hm = {big, S(0.25), S(1), S(-2), -big, S(3)};
  const Buffer<B> m = upload<B>(ctx, hm, 3, 2);
  Buffer<B> out;
  out.resize(3, 1);
  B::fill(ctx, out.view(), poison<S>());
  B::sum_rows(ctx, ConstMatrixView<S>(m.view()), out.data());
  auto got = moe::to_host<B>(ctx, ConstMatrixView<S>(out.view()));
  CHECK(got[0] == S(0));
  CHECK(got[1] == S(0.25) + S(-2) + S(3));
  CHECK(std::isnan(got[2]));
  // No rows: zeros.
  const Buffer<B> empty = upload<B>(ctx, std::vector<S>{}, 0, 2);
  B::sum_rows(ctx, ConstMatrixView<S>(empty.view()), out.data());
  got = moe::to_host<B>(ctx, ConstMatrixView<S>(out.view()));
  CHECK((got[0] == S(0) && got[1] == S(0)));

  // Groups {0, 1, 2} of rows [0, 0), [0, 2), [2, 3), with and without the scratch buffer.
  const IndexBuffer<B> offsets = upload<B>(ctx, std::vector<Index>{0, 0, 2, 3});
  for (const bool scratch : {false, true}) {
    Buffer<B> sums, partial;
    sums.resize(3, 2);
    B::fill(ctx, sums.view(), poison<S>());
    moe::gate::sum_rows_by_group<B>(ctx, ConstMatrixView<S>(m.view()), offsets.data(), 3, sums.data(),
                                    scratch ? &partial : nullptr);
    const auto s = moe::to_host<B>(ctx, ConstMatrixView<S>(sums.view()));
    CHECK(s == std::vector<S>{S(0), S(0), big + S(1), S(0.25) + S(-2), -big, S(3)});
    // offsets null: one group of every row.
    B::fill(ctx, sums.view(), poison<S>());
    moe::gate::sum_rows_by_group<B>(ctx, ConstMatrixView<S>(m.view()), nullptr, 3, sums.data(),
                                    scratch ? &partial : nullptr);
    const auto one = moe::to_host<B>(ctx, ConstMatrixView<S>(sums.view()));
    CHECK((one[0] == S(0) && one[1] == S(0.25) + S(-2) + S(3)));
    CHECK(std::isnan(one[2]));
  }
  // segment_sums with no segment, or no column, writes nothing.
  Buffer<B> partial;
  const S* md = m.data();
  const auto value = [=] MOE_HD(Index r, Index c) { return md[r * 2 + c]; };
  B::fill(ctx, out.view(), poison<S>());
  moe::segment_sums<B>(ctx, offsets.data(), 0, 3, 2, value, out.data(), partial);
  moe::segment_sums<B>(ctx, offsets.data(), 3, 3, 0, value, out.data(), partial);
  for (const S v : moe::to_host<B>(ctx, ConstMatrixView<S>(out.view()))) CHECK(std::isnan(v));
}
TEST_CASE_TEMPLATE_APPLY(sum_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("fill and copy: every element of the view, nothing else; copy checks shapes", B, copy_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  Padded<B, S> a(ctx, 3, 4, poison<S>());
  B::fill(ctx, a.view(), S(2.5));
  for (const S v : a.values(ctx)) CHECK(v == S(2.5));
  CHECK(a.padding_is(ctx, poison<S>()));
  Padded<B, Index> ia(ctx, 2, 3, Index{9});
  B::fill(ctx, ia.view(), Index{-1});
  CHECK(ia.values(ctx) == std::vector<Index>(6, -1));
  CHECK(ia.padding_is(ctx, Index{9}));
  // Strided to strided, and from and to host memory.
  const auto hv = random_values<S>(12, 51);
  Padded<B, S> src(ctx, 3, 4, S(0)), dst(ctx, 3, 4, poison<S>());
  B::copy(ctx, ConstMatrixView<S>{hv.data(), 3, 4}, src.view());
  B::copy(ctx, ConstMatrixView<S>(src.view()), dst.view());
  std::vector<S> back(12);
  B::copy(ctx, ConstMatrixView<S>(dst.view()), MatrixView<S>{back.data(), 3, 4});
  B::synchronize(ctx);
  CHECK(same_bits(back, hv));
  CHECK(dst.padding_is(ctx, poison<S>()));
  Padded<B, S> other(ctx, 4, 3, S(0));
  CHECK_THROWS_AS(B::copy(ctx, ConstMatrixView<S>(src.view()), other.view()), moe::Error);
  Padded<B, S> none(ctx, 0, 4, S(0)), none2(ctx, 0, 4, S(0));
  B::copy(ctx, ConstMatrixView<S>(none.view()), none2.view());
}
TEST_CASE_TEMPLATE_APPLY(copy_cases, Backends);

// ---- Host reads and buffers ------------------------------------------------------------------

TEST_CASE_TEMPLATE_DEFINE("HostReads, to_host, from_host: values after wait(); one synchronize per wait with reads", B,
                          host_read_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  const auto hv = random_values<S>(6, 61);
  Buffer<B> v;
  moe::from_host<B>(ctx, hv, v);
  CHECK((v.rows() == 6 && v.cols() == 1));
  const IndexBuffer<B> iv = upload<B>(ctx, std::vector<Index>{4, 5});
  std::vector<S> out;
  std::vector<Index> iout;
  std::vector<S> nothing{S(1)};
  {
    moe::HostReads<B> reads(ctx);
    reads.add(ConstMatrixView<S>(v.view()), out);
    reads.add(ConstMatrixView<Index>(iv.view()), iout);
    reads.add(ConstMatrixView<S>{v.data(), 0, 3}, nothing);
    CHECK(out.size() == 6);  // sized at add(); the values are there after wait()
    CHECK(nothing.empty());
    reads.wait();
  }
  CHECK(same_bits(out, hv));
  CHECK(iout == std::vector<Index>{4, 5});
  CHECK(moe::to_host<B>(ctx, ConstMatrixView<S>{v.data(), 0, 1}).empty());
#if MOE_TEST_THRUST_HOST
  // The host system counts its synchronizations: one per wait() that has reads queued.
  if constexpr (std::is_same_v<B, moe::backend::ThrustHost<S>>) {
    using Sys = moe::backend::ThrustHostSystem;
    const auto before = Sys::host_waits();
    {
      moe::HostReads<B> reads(ctx);
      reads.add(ConstMatrixView<S>(v.view()), out);
      reads.add(ConstMatrixView<Index>(iv.view()), iout);
      reads.wait();
      reads.wait();  // nothing queued any more
    }
    CHECK(Sys::host_waits() == before + 1);
    {
      moe::HostReads<B> reads(ctx);
      reads.add(ConstMatrixView<S>{v.data(), 0, 1}, out);
      reads.wait();
    }
    (void)moe::to_host<B>(ctx, ConstMatrixView<S>{v.data(), 3, 0});
    CHECK(Sys::host_waits() == before + 1);
    (void)moe::to_host<B>(ctx, ConstMatrixView<S>(v.view()));
    CHECK(Sys::host_waits() == before + 2);
  }
#endif
}
TEST_CASE_TEMPLATE_APPLY(host_read_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("Buffer: resize with a value fills; a negative extent is an error; moved from is 0 x 0", B,
                          buffer_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  Buffer<B> b;
  CHECK((b.rows() == 0 && b.cols() == 0));
  b.resize(3, 2, S(1.5));
  CHECK(moe::to_host<B>(ctx, ConstMatrixView<S>(b.view())) == std::vector<S>(6, S(1.5)));
  b.resize(4, 5);
  CHECK((b.rows() == 4 && b.cols() == 5));
#if defined(MOE_POISON_BUFFERS)
  for (const S v : moe::to_host<B>(ctx, ConstMatrixView<S>(b.view()))) CHECK(std::isnan(v));
  IndexBuffer<B> ib;
  ib.resize(2, 2);
  for (const Index v : moe::to_host<B>(ctx, ConstMatrixView<Index>(ib.view()))) CHECK(v == Index{0x7F7F7F7F7F7F7F7F});
#endif
  CHECK_THROWS_AS(b.resize(-1, 2), moe::Error);
  Buffer<B> moved = std::move(b);
  CHECK((moved.rows() == 4 && moved.cols() == 5));
  CHECK((b.rows() == 0 && b.cols() == 0));  // NOLINT(bugprone-use-after-move)
}
TEST_CASE_TEMPLATE_APPLY(buffer_cases, Backends);

// ---- Gate helpers ----------------------------------------------------------------------------

namespace {
template <class S>
constexpr S kInf = std::numeric_limits<S>::infinity();
template <class S>
constexpr S kNan = std::numeric_limits<S>::quiet_NaN();
}  // namespace

TEST_CASE_TEMPLATE_DEFINE("softmax_row, log_sum_exp: ties, -inf, NaN, large logits, in place", B, softmax_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  const Index n = 4;
  const S inf = kInf<S>, nan = kNan<S>;
  const std::vector<std::vector<S>> rows = {
      {1, 3, 3, 2},          // tie for the largest: the lower index
      {-inf, 0, -inf, 1},    // -inf gets exactly 0
      {1000, 1001, 999, -1000},  // no overflow
      {nan, 1, 2, 3},        // NaN: every p NaN
      {1, 2, nan, 3},
      {-inf, -inf, -inf, -inf},  // no finite logit: NaN
      {inf, 0, 1, 2},            // +inf: NaN
  };
  const auto r_count = static_cast<Index>(rows.size());
  std::vector<S> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  const Buffer<B> v = upload<B>(ctx, flat, r_count, n);
  Buffer<B> p, inplace, lse;
  p.resize(r_count, n);
  inplace = upload<B>(ctx, flat, r_count, n);
  lse.resize(r_count, 1);
  IndexBuffer<B> best, best_inplace;
  best.resize(r_count, 1);
  best_inplace.resize(r_count, 1);
  const S* vd = v.data();
  S* pd = p.data();
  S* id = inplace.data();
  S* ld = lse.data();
  Index* bd = best.data();
  Index* bi = best_inplace.data();
  B::for_each(ctx, r_count, [=] MOE_HD(Index r) {
    bd[r] = moe::gate::softmax_row(vd + r * n, n, pd + r * n);
    bi[r] = moe::gate::softmax_row(id + r * n, n, id + r * n);
    ld[r] = moe::gate::log_sum_exp(vd + r * n, n);
  });
  const auto hp = moe::to_host<B>(ctx, ConstMatrixView<S>(p.view()));
  const auto hi = moe::to_host<B>(ctx, ConstMatrixView<S>(inplace.view()));
  const auto hb = moe::to_host<B>(ctx, ConstMatrixView<Index>(best.view()));
  const auto hl = moe::to_host<B>(ctx, ConstMatrixView<S>(lse.view()));
  CHECK(same_bits(hp, hi));
  CHECK(same_bits(hb, moe::to_host<B>(ctx, ConstMatrixView<Index>(best_inplace.view()))));
  auto at = [&](Index r, Index i) { return hp[static_cast<std::size_t>(r * n + i)]; };
  // Finite rows: probabilities summing to 1 within rounding, the argmax with ties to the lower index.
  for (const Index r : {0, 1, 2}) {
    double total = 0;
    for (Index i = 0; i < n; ++i) {
      CHECK(at(r, i) >= S(0));
      total += double(at(r, i));
    }
    CHECK(std::abs(total - 1) <= 8 * epsilon<S>());
  }
  CHECK(hb[0] == 1);
  CHECK(std::memcmp(&hp[1], &hp[2], sizeof(S)) == 0);
  CHECK(hb[1] == 3);
  CHECK((at(1, 0) == S(0) && at(1, 2) == S(0)));
  CHECK(hb[2] == 1);
  CHECK(std::abs(double(at(2, 1)) - 1 / (1 + std::exp(-1.0) + std::exp(-2.0))) <= 8 * epsilon<S>());
  CHECK(std::abs(double(hl[2]) - (1001 + std::log(1 + std::exp(-1.0) + std::exp(-2.0)))) <= 2048 * epsilon<S>());
  CHECK(std::abs(double(hl[1]) - (1 + std::log(1 + std::exp(-1.0)))) <= 8 * epsilon<S>());
  // Non-finite rows: every probability NaN, the index one of the row's.
  for (const Index r : {3, 4, 5, 6}) {
    CAPTURE(r);
    for (Index i = 0; i < n; ++i) CHECK(std::isnan(at(r, i)));
    CHECK((hb[static_cast<std::size_t>(r)] >= 0 && hb[static_cast<std::size_t>(r)] < n));
  }
  CHECK(hb[4] == 3);  // a NaN is never the largest; the first entry is taken as is
  // One entry: p = 1.
  const S one_logit = S(-3);
  S one_p = 0;
  CHECK(moe::gate::softmax_row(&one_logit, 1, &one_p) == 0);
  CHECK(one_p == S(1));
}
TEST_CASE_TEMPLATE_APPLY(softmax_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("softmax_row_backward: d_i = p_i (d_i - sum_l p_l d_l), in place", B, softmax_back_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  const Index n = 5;
  const std::vector<S> logits = {0.5, -1, 2, -S(INFINITY), 0.25};
  std::vector<S> hp(static_cast<std::size_t>(n));
  moe::gate::softmax_row(logits.data(), n, hp.data());
  const auto hd = random_values<S>(n, 71);
  const Buffer<B> p = upload<B>(ctx, hp, 1, n);
  Buffer<B> d = upload<B>(ctx, hd, 1, n);
  const S* pd = p.data();
  S* dd = d.data();
  B::for_each(ctx, 1, [=] MOE_HD(Index) { moe::gate::softmax_row_backward(pd, n, dd); });
  const auto got = moe::to_host<B>(ctx, ConstMatrixView<S>(d.view()));
  long double dot = 0;
  for (Index i = 0; i < n; ++i) dot += static_cast<long double>(hp[i]) * hd[i];
  for (Index i = 0; i < n; ++i)
    CHECK(std::abs(double(got[i]) - double(static_cast<long double>(hp[i]) * (hd[i] - dot))) <= 8 * epsilon<S>());
  CHECK(got[3] == S(0));  // p_i = 0 gives 0
}
TEST_CASE_TEMPLATE_APPLY(softmax_back_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("top_k_stable, top_k_in_groups: larger first, ties to the lower index, NaN last", B,
                          top_k_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(1);
  const S inf = kInf<S>, nan = kNan<S>;
  const std::vector<S> hv = {3, nan, 5, 5, -inf, S(-0.0), S(0.0), nan, 5, 1};
  const auto n = static_cast<Index>(hv.size());
  // The whole order: 5 (2, 3, 8), 3, 1, -0 and +0 tied (5, 6), -inf, NaN (1, 7).
  const std::vector<Index> full = {2, 3, 8, 0, 9, 5, 6, 4, 1, 7};
  const Buffer<B> v = upload<B>(ctx, hv, 1, n);
  for (Index kk = 0; kk <= n; ++kk) {
    CAPTURE(kk);
    IndexBuffer<B> out;
    out.resize(n + 1, 1);
    B::fill(ctx, out.view(), kSentinel);
    const S* vd = v.data();
    Index* od = out.data();
    B::for_each(ctx, 1, [=] MOE_HD(Index) { moe::top_k_stable(vd, n, kk, od); });
    const auto got = moe::to_host<B>(ctx, ConstMatrixView<Index>(out.view()));
    for (Index j = 0; j < kk; ++j) CHECK(got[static_cast<std::size_t>(j)] == full[static_cast<std::size_t>(j)]);
    for (Index j = kk; j <= n; ++j) CHECK(got[static_cast<std::size_t>(j)] == kSentinel);
  }
  // ranks_before is the order std::stable_sort gives on many ties.
  std::vector<S> ties(40);
  for (std::size_t i = 0; i < ties.size(); ++i) ties[i] = static_cast<S>((i * 7) % 5) - S(2);
  ties[11] = nan;
  std::vector<Index> idx(ties.size()), got(ties.size());
  std::iota(idx.begin(), idx.end(), Index{0});
  std::stable_sort(idx.begin(), idx.end(), [&](Index a, Index b) { return moe::ranks_before(ties.data(), a, b); });
  moe::top_k_stable(ties.data(), static_cast<Index>(ties.size()), static_cast<Index>(ties.size()), got.data());
  CHECK(got == idx);
  // Groups of two: {4, 0, 2} allowed, i.e. indices 8, 9, 0, 1, 4, 5.
  const std::vector<Index> allowed = {4, 0, 2};
  std::vector<Index> in_groups(5, kSentinel);
  moe::top_k_in_groups(hv.data(), n, 2, allowed.data(), 3, 4, in_groups.data());
  CHECK(in_groups == std::vector<Index>{8, 0, 9, 5, kSentinel});
  CHECK(moe::is_among(allowed.data(), 3, 2));
  CHECK(!moe::is_among(allowed.data(), 3, 1));
}
TEST_CASE_TEMPLATE_APPLY(top_k_cases, Backends);

TEST_CASE_TEMPLATE_DEFINE("add_expert_bias, sum_rows_per_expert, count_slots: per expert, empty experts untouched", B,
                          expert_helper_cases) {
  using S = typename B::Scalar;
  auto ctx = moe::make_context<B>(2);
  const std::vector<Index> off = {0, 2, 2, 5};
  const Index n = 3, cols = 3, rows = 5;
  const IndexBuffer<B> offsets = upload<B>(ctx, off);
  const auto hb = random_values<S>(n * cols, 81), hy = random_values<S>(rows * cols, 82);
  const Buffer<B> bias = upload<B>(ctx, hb, n, cols);
  Padded<B, S> ys(ctx, rows, cols, poison<S>());
  ys.set(ctx, hy);
  moe::add_expert_bias<B>(ctx, offsets.data(), n, bias.data(), ys.view());
  const auto got = ys.values(ctx);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c) {
      const Index e = r < 2 ? 0 : 2;
      CHECK(got[r * cols + c] == hy[r * cols + c] + hb[e * cols + c]);
    }
  CHECK(ys.padding_is(ctx, poison<S>()));
  // grad += sums in row order; the empty expert's row keeps its bits (NaN and -0 included).
  std::vector<S> hg = random_values<S>(n * cols, 83);
  hg[3] = S(-0.0);
  hg[4] = kNan<S>;
  Buffer<B> grad = upload<B>(ctx, hg, n, cols);
  const Buffer<B> m = upload<B>(ctx, hy, rows, cols);
  moe::sum_rows_per_expert<B>(ctx, offsets.data(), n, ConstMatrixView<S>(m.view()), grad.data());
  const auto hgot = moe::to_host<B>(ctx, ConstMatrixView<S>(grad.view()));
  for (Index e = 0; e < n; ++e)
    for (Index c = 0; c < cols; ++c) {
      S want = hg[e * cols + c];
      for (Index r = off[e]; r < off[e + 1]; ++r) want += hy[r * cols + c];
      CHECK(std::memcmp(&hgot[e * cols + c], &want, sizeof(S)) == 0);
    }
  // count_slots: per group, per expert, over every slot of the group's rows.
  const std::vector<Index> top = {0, 1, 1, 0, 2, 1, 0, 2};  // rows of k = 2; groups of rows [0, 1), [1, 4)
  const IndexBuffer<B> t = upload<B>(ctx, top), goff = upload<B>(ctx, std::vector<Index>{0, 1, 4});
  IndexBuffer<B> key, count;
  key.resize(8, 1);
  count.resize(2 * n, 1);
  moe::gate::count_slots<B>(ctx, t.data(), 4, 2, goff.data(), 2, n, key.data(), count.data());
  CHECK(moe::to_host<B>(ctx, ConstMatrixView<Index>(count.view())) == std::vector<Index>{1, 1, 0, 2, 2, 2});
}
TEST_CASE_TEMPLATE_APPLY(expert_helper_cases, Backends);

TEST_CASE("is_finite: false for NaN and the infinities, on float and double") {
  CHECK(moe::is_finite(1.0f));
  CHECK(moe::is_finite(-0.0));
  CHECK(moe::is_finite(std::numeric_limits<double>::max()));
  CHECK(!moe::is_finite(kNan<float>));
  CHECK(!moe::is_finite(kInf<double>));
  CHECK(!moe::is_finite(-kInf<float>));
  MESSAGE(std::string(MOE_TEST_THRUST_HOST ? "ThrustHost tested" : "ThrustHost not tested (no CCCL headers)"));
}
