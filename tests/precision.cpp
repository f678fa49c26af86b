// Precision::bf16 and Precision::tf32: the rounding to bfloat16 and to TF32, the grouped GEMMs
// that round their operands, and the experts that use them (MATH.md is unchanged: a precision
// changes how the products are computed, not what is computed).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "moe/io/config.hpp"
#include "support.hpp"

namespace {

using moe::Index;
using moe::Precision;
using moe::round_to_bf16;
using moe::round_to_tf32;

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
float from_bits(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

}  // namespace

TEST_CASE("round_to_bf16 rounds to the nearest bfloat16, ties to even") {
  CHECK(round_to_bf16(1.0f) == 1.0f);
  CHECK(round_to_bf16(-2.5f) == -2.5f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
  CHECK(round_to_bf16(1.0f + 0x1p-8f) == 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
  CHECK(round_to_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f);
  // Just above halfway rounds up.
  CHECK(round_to_bf16(from_bits(0x3F808001u)) == 1.0f + 0x1p-7f);
  CHECK(round_to_bf16(0.1f) == from_bits(0x3DCD0000u));  // 0.1 = 0x3DCCCCCD: rounds up
  // Every result has 8 significant bits: its low 16 bits are 0.
  for (std::uint32_t i = 0; i < 1000; ++i) {
    const float x = from_bits(0x3F000000u + i * 7919u);
    CHECK((bits_of(round_to_bf16(x)) & 0xFFFFu) == 0u);
    CHECK(std::abs(round_to_bf16(x) - x) <= std::abs(x) * 0x1p-8f);
  }
  // Signs, zeros, infinities, NaN, overflow.
  CHECK(bits_of(round_to_bf16(-0.0f)) == bits_of(-0.0f));
  CHECK(round_to_bf16(std::numeric_limits<float>::infinity()) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(round_to_bf16(from_bits(0x7F800001u))));  // a NaN whose payload sits in the dropped bits
  CHECK(std::isinf(round_to_bf16(std::numeric_limits<float>::max())));
}

TEST_CASE("bf16 grouped GEMMs equal fp32 GEMMs on operands rounded to bfloat16") {
  using Cpu = moe::backend::Cpu<float>;
  Cpu::Context ctx{};
  const Index d = 7, h = 5, groups = 3;
  const std::vector<Index> offsets{0, 4, 4, 11};  // an empty group in the middle
  const auto a = moe::test::random_matrix<float>(11, d, 1);
  const auto w = moe::test::random_matrix<float>(groups * d, h, 2);
  auto rounded = [](const moe::test::Matrix<float>& m) {
    moe::test::Matrix<float> r(m.rows(), m.cols());
    for (Index i = 0; i < m.size(); ++i) r[i] = round_to_bf16(m[i]);
    return r;
  };
  const auto ar = rounded(a), wr = rounded(w);
  moe::test::Matrix<float> c16(11, h), c32(11, h);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, a.view(), w.view(), c16.view(), Precision::bf16);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, ar.view(), wr.view(), c32.view(), Precision::fp32);
  CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(c16.view()), moe::ConstMatrixView<float>(c32.view())));
  // ... and differ from the fp32 product of the unrounded operands, by about bf16's precision.
  moe::test::Matrix<float> exact(11, h);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, a.view(), w.view(), exact.view());
  double diff = 0, norm = 0;
  for (Index i = 0; i < exact.size(); ++i) {
    diff += (c16[i] - exact[i]) * (c16[i] - exact[i]);
    norm += exact[i] * exact[i];
  }
  CHECK(std::sqrt(diff / norm) > 1e-5);
  CHECK(std::sqrt(diff / norm) < 1e-2);

  // Weight gradient: w_g = a_g^T b_g with both operands rounded; beta = 1 adds in fp32.
  const auto b = moe::test::random_matrix<float>(11, h, 3);
  const auto br = rounded(b);
  moe::test::Matrix<float> g16(groups * d, h, 0.5f), g32(groups * d, h, 0.5f);
  Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, a.view(), b.view(), 1.0f, g16.view(), Precision::bf16);
  Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, ar.view(), br.view(), 1.0f, g32.view(), Precision::fp32);
  CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(g16.view()), moe::ConstMatrixView<float>(g32.view())));
}

TEST_CASE("round_to_tf32 rounds to the nearest TF32 value (10 explicit mantissa bits), ties to even") {
  CHECK(round_to_tf32(1.0f) == 1.0f);
  CHECK(round_to_tf32(-2.5f) == -2.5f);
  CHECK(round_to_tf32(1.0f + 0x1p-10f) == 1.0f + 0x1p-10f);  // the TF32 after 1: kept
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1); the same below zero.
  CHECK(round_to_tf32(1.0f + 0x1p-11f) == 1.0f);
  CHECK(round_to_tf32(-(1.0f + 0x1p-11f)) == -1.0f);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: ties to even (1 + 2^-9).
  CHECK(round_to_tf32(1.0f + 3 * 0x1p-11f) == 1.0f + 0x1p-9f);
  // Just above and just below halfway.
  CHECK(round_to_tf32(from_bits(0x3F801001u)) == 1.0f + 0x1p-10f);
  CHECK(round_to_tf32(from_bits(0x3F800FFFu)) == 1.0f);
  // A carry through the whole mantissa into the exponent: 2 - 2^-23 rounds to 2.
  CHECK(round_to_tf32(from_bits(0x3FFFFFFFu)) == 2.0f);
  CHECK(round_to_tf32(0.1f) == from_bits(0x3DCCC000u));  // 0.1 = 0x3DCCCCCD: low bits 0xCCD, down
  CHECK(round_to_tf32(1.0f / 3.0f) == from_bits(0x3EAAA000u));  // 0x3EAAAAAB: low bits 0xAAB, down
  CHECK(round_to_tf32(from_bits(0x3F8FF000u)) == from_bits(0x3F8FE000u) + 0x1p-10f);  // a tie, odd: up
  // Every result has 11 significant bits: its low 13 bits are 0, within half a unit.
  for (std::uint32_t i = 0; i < 1000; ++i) {
    const float x = from_bits(0x3F000000u + i * 7919u);
    CHECK((bits_of(round_to_tf32(x)) & 0x1FFFu) == 0u);
    CHECK(std::abs(round_to_tf32(x) - x) <= std::abs(x) * 0x1p-11f);
    // A TF32 value is a bfloat16 value's superset: rounding to bf16 first changes nothing after.
    CHECK(round_to_tf32(round_to_bf16(x)) == round_to_bf16(x));
  }
  // Subnormals round like any other value: half of the smallest TF32 subnormal ties to 0 (even),
  // three halves tie up to two (even).
  CHECK(bits_of(round_to_tf32(from_bits(0x00001000u))) == 0u);
  CHECK(bits_of(round_to_tf32(from_bits(0x00003000u))) == 0x00004000u);
  CHECK(bits_of(round_to_tf32(from_bits(0x80001001u))) == 0x80002000u);
  // Signs, zeros, infinities, NaN, overflow.
  CHECK(bits_of(round_to_tf32(-0.0f)) == bits_of(-0.0f));
  CHECK(round_to_tf32(std::numeric_limits<float>::infinity()) == std::numeric_limits<float>::infinity());
  CHECK(round_to_tf32(-std::numeric_limits<float>::infinity()) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(round_to_tf32(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(round_to_tf32(from_bits(0x7F800001u))));  // a NaN whose payload sits in the dropped bits
  CHECK(std::isnan(round_to_tf32(from_bits(0xFF801FFFu))));
  CHECK(round_to_tf32(from_bits(0x7F7FE000u)) == from_bits(0x7F7FE000u));  // the largest TF32 value
  CHECK(round_to_tf32(from_bits(0x7F7FEFFFu)) == from_bits(0x7F7FE000u));  // below halfway: kept
  CHECK(std::isinf(round_to_tf32(from_bits(0x7F7FF000u))));                // halfway, odd: overflows
  CHECK(std::isinf(round_to_tf32(std::numeric_limits<float>::max())));
  CHECK(round_to_tf32(-std::numeric_limits<float>::max()) == -std::numeric_limits<float>::infinity());
  // round_operand picks the rounding of each precision.
  CHECK(moe::round_operand(0.1f, Precision::fp32) == 0.1f);
  CHECK(moe::round_operand(0.1f, Precision::bf16) == round_to_bf16(0.1f));
  CHECK(moe::round_operand(0.1f, Precision::tf32) == round_to_tf32(0.1f));
  CHECK(std::string(moe::to_string(Precision::tf32)) == "tf32");
}

TEST_CASE("tf32 grouped GEMMs equal fp32 GEMMs on operands rounded to TF32, and loops in double") {
  using Cpu = moe::backend::Cpu<float>;
  Cpu::Context ctx{};
  const Index d = 9, h = 6, groups = 4;
  const std::vector<Index> offsets{0, 5, 5, 6, 17};  // an empty group, a group of one row
  const Index rows = offsets.back();
  const auto a = moe::test::random_matrix<float>(rows, d, 11);
  const auto w = moe::test::random_matrix<float>(groups * d, h, 12);
  const auto wt = moe::test::random_matrix<float>(groups * h, d, 13);  // for op(w_g) = w_g^T
  auto rounded = [](const moe::test::Matrix<float>& m) {
    moe::test::Matrix<float> r(m.rows(), m.cols());
    for (Index i = 0; i < m.size(); ++i) r[i] = round_to_tf32(m[i]);
    return r;
  };
  const auto ar = rounded(a), wr = rounded(w), wtr = rounded(wt);
  for (moe::Op tw : {moe::Op::none, moe::Op::transpose}) {
    CAPTURE(int(tw));
    const auto& wv = tw == moe::Op::none ? w : wt;
    const auto& wrv = tw == moe::Op::none ? wr : wtr;
    moe::test::Matrix<float> c32(rows, h), cref(rows, h), exact(rows, h);
    Cpu::grouped_gemm(ctx, offsets.data(), groups, tw, a.view(), wv.view(), c32.view(), Precision::tf32);
    Cpu::grouped_gemm(ctx, offsets.data(), groups, tw, ar.view(), wrv.view(), cref.view(), Precision::fp32);
    CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(c32.view()), moe::ConstMatrixView<float>(cref.view())));
    Cpu::grouped_gemm(ctx, offsets.data(), groups, tw, a.view(), wv.view(), exact.view());
    // Against the products in double over the rounded operands: fp32 accumulation only, within
    // d * 2^-23 of the sum of the terms' magnitudes.
    double worst = 0, diff = 0, norm = 0;
    for (Index g = 0; g < groups; ++g)
      for (Index r = offsets[static_cast<std::size_t>(g)]; r < offsets[static_cast<std::size_t>(g) + 1]; ++r)
        for (Index j = 0; j < h; ++j) {
          double sum = 0, scale = 0;
          for (Index p = 0; p < d; ++p) {
            const double x = ar(r, p), y = tw == moe::Op::none ? wr(g * d + p, j) : wtr(g * h + j, p);
            CHECK(x == double(round_to_tf32(a(r, p))));
            sum += x * y;
            scale += std::abs(x * y);
          }
          worst = std::max(worst, std::abs(c32(r, j) - sum) / (d * 0x1p-23 * scale + 1e-30));
          diff += (c32(r, j) - exact(r, j)) * (c32(r, j) - exact(r, j));
          norm += exact(r, j) * exact(r, j);
        }
    CHECK(worst <= 1.0);
    // ... and differ from the fp32 product of the unrounded operands, by about TF32's precision.
    CHECK(std::sqrt(diff / norm) > 1e-6);
    CHECK(std::sqrt(diff / norm) < 2e-3);
  }

  // Weight gradient: w_g = beta w_g + a_g^T b_g with both operands rounded, accumulated in float.
  const auto b = moe::test::random_matrix<float>(rows, h, 14);
  const auto br = rounded(b);
  for (float beta : {0.0f, 1.0f}) {
    CAPTURE(beta);
    moe::test::Matrix<float> g32(groups * d, h, std::numeric_limits<float>::quiet_NaN());
    moe::test::Matrix<float> gref(groups * d, h, std::numeric_limits<float>::quiet_NaN());
    if (beta != 0.0f)
      for (Index i = 0; i < g32.size(); ++i) g32[i] = gref[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
    const moe::test::Matrix<float> before = g32;
    Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, a.view(), b.view(), beta, g32.view(), Precision::tf32);
    Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, ar.view(), br.view(), beta, gref.view(), Precision::fp32);
    CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(g32.view()), moe::ConstMatrixView<float>(gref.view())));
    double worst = 0;
    for (Index g = 0; g < groups; ++g)
      for (Index i = 0; i < d; ++i)
        for (Index j = 0; j < h; ++j) {
          double sum = 0, scale = 0;
          const Index r0 = offsets[static_cast<std::size_t>(g)], r1 = offsets[static_cast<std::size_t>(g) + 1];
          for (Index r = r0; r < r1; ++r) {
            sum += double(ar(r, i)) * br(r, j);
            scale += std::abs(double(ar(r, i)) * br(r, j));
          }
          const double old = beta == 0.0f ? 0.0 : double(before(g * d + i, j));
          const double k = static_cast<double>(std::max<Index>(1, r1 - r0));
          worst = std::max(worst, std::abs(g32(g * d + i, j) - (old + sum)) /
                                      (k * 0x1p-23 * (scale + std::abs(old)) + 1e-30));
        }
    CHECK(worst <= 1.0);
  }

  // tf32 needs float data, as bf16 does; the message names the precision.
  using CpuD = moe::backend::Cpu<double>;
  CpuD::Context dctx{};
  const auto ad = moe::test::random_matrix<double>(rows, d, 1);
  const auto wd = moe::test::random_matrix<double>(groups * d, h, 2);
  moe::test::Matrix<double> cd(rows, h);
  const auto message = moe::test::error_of([&] {
    CpuD::grouped_gemm(dctx, offsets.data(), groups, moe::Op::none, ad.view(), wd.view(), cd.view(), Precision::tf32);
  });
  CHECK(moe::test::contains(message, "grouped_gemm: Precision::tf32 needs float data, got 64-bit floating point"));
}

TEST_CASE("tf32 experts: accepted on float, refused on double, and named in a configuration's metadata") {
  using Layer = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<float>>;
  Layer::Config c{.d_model = 8, .n_experts = 4, .expert = {.hidden = 6, .precision = Precision::tf32}, .seed = 2};
  Layer tf32(c);
  c.expert.precision = Precision::fp32;
  Layer fp32(c);
  const auto x = moe::test::random_matrix<float>(20, 8, 4);
  const auto ftf = tf32.forward(x.view(), moe::Mode::inference);
  const auto f32 = fp32.forward(x.view(), moe::Mode::inference);
  CHECK(moe::test::same_bits(ftf.expert_index(), f32.expert_index()));  // gating stays fp32
  double diff = 0, norm = 0;
  for (Index t = 0; t < 20; ++t)
    for (Index j = 0; j < 8; ++j) {
      const double e = ftf.y()(t, j) - f32.y()(t, j);
      diff += e * e;
      norm += f32.y()(t, j) * f32.y()(t, j);
    }
  CHECK(std::sqrt(diff / norm) > 1e-7);  // it does compute in tf32
  CHECK(std::sqrt(diff / norm) < 3e-3);

  using DoubleLayer = moe::Layer<moe::expert::FeedForward, moe::gate::TopK, moe::backend::Cpu<double>>;
  const auto message = moe::test::error_of([] {
    DoubleLayer layer({.d_model = 4, .n_experts = 2, .expert = {.hidden = 3, .precision = Precision::tf32}});
  });
  CHECK(moe::test::contains(message, "expert::FeedForward: precision = tf32 needs a float backend"));

  // The metadata's text: written as "tf32", read back; a bad value is named with what was expected.
  CHECK(moe::io::detail::format_value(Precision::tf32) == "tf32");
  Precision p = Precision::fp32;
  moe::io::detail::parse_value("config.expert.precision", "tf32", p);
  CHECK(p == Precision::tf32);
  moe::io::detail::parse_value("config.expert.precision", "bf16", p);
  CHECK(p == Precision::bf16);
  const auto bad = moe::test::error_of([&] { moe::io::detail::parse_value("config.expert.precision", "fp16", p); });
  CHECK(moe::test::contains(bad, "moe::io: metadata 'config.expert.precision' = 'fp16', expected fp32, bf16 or tf32"));
}

TEST_CASE("bf16 ReLU experts round the operands of every GEMM, forward and backward, and accumulate in float") {
  // One group of two experts (rows 0-4 and 5-11), against the products written out in double on
  // operands rounded to bfloat16: the same within float rounding (1e-5), where a GEMM computed
  // from unrounded operands is off by about bf16's precision (1e-3).
  using Cpu = moe::backend::Cpu<float>;
  using Group = moe::expert::FeedForward::Group<Cpu>;
  using D = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index d = 6, h = 7, n = 2, rows = 12;
  const std::vector<Index> offsets{0, 5, rows};
  Group group({.hidden = h, .precision = Precision::bf16}, d, n, 3);
  auto params = group.parameters();
  REQUIRE(params[0].name == "experts.w1");
  REQUIRE(params[1].name == "experts.w2");
  for (auto& p : params) moe::test::fill_uniform(p.value, 40 + p.value.rows, -1.0, 1.0);
  const auto xs = moe::test::random_matrix<float>(rows, d, 4);
  const auto dys = moe::test::random_matrix<float>(rows, d, 5);
  moe::test::Matrix<float> ys(rows, d), dxs(rows, d);
  Cpu::Context ctx{};
  Group::Saved saved;
  group.forward(ctx, xs.view(), offsets.data(), ys.view(), saved);
  group.backward(ctx, xs.view(), offsets.data(), saved, dys.view(), dxs.view());

  auto bf = [](auto m) {  // an Eigen copy in double of a float view, rounded to bfloat16
    D out(m.rows, m.cols);
    for (Index r = 0; r < m.rows; ++r)
      for (Index c = 0; c < m.cols; ++c) out(r, c) = round_to_bf16(static_cast<float>(m(r, c)));
    return out;
  };
  auto plain = [](auto m) { return moe::backend::cpu::eigen(m).template cast<double>().eval(); };
  auto relative = [](const D& a, const D& b) { return (a - b).norm() / b.norm(); };
  const D pre = plain(moe::ConstMatrixView<float>(saved.pre.view()));
  moe::test::Matrix<float> act(rows, h);
  for (Index i = 0; i < rows * h; ++i) act[i] = moe::to_float(saved.act16.data()[i]);
  for (Index e = 0; e < n; ++e) {
    CAPTURE(e);
    const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e) + 1] - r0;
    const auto w1 = moe::ConstMatrixView<float>(params[0].value).block_rows(e * d, d);
    const auto w2 = moe::ConstMatrixView<float>(params[1].value).block_rows(e * h, h);
    const auto g1 = moe::ConstMatrixView<float>(params[0].grad).block_rows(e * d, d);
    const auto g2 = moe::ConstMatrixView<float>(params[1].grad).block_rows(e * h, h);
    const auto x = xs.view().block_rows(r0, m);
    const auto dy = dys.view().block_rows(r0, m);
    const D pre_ref = bf(x) * bf(w1);
    CHECK(relative(pre.middleRows(r0, m), pre_ref) < 1e-5);
    // relu(pre) is kept as BFloat16, the operand W2's GEMMs read.
    REQUIRE(saved.act16.rows() == rows);
    const moe::ConstMatrixView<float> act_e = moe::ConstMatrixView<float>(act.view()).block_rows(r0, m);
    for (Index r = 0; r < m; ++r)
      for (Index c = 0; c < h; ++c) CHECK(act(r0 + r, c) == round_to_bf16(std::max(saved.pre(r0 + r, c), 0.0f)));
    CHECK(relative(plain(ys.view().block_rows(r0, m)), bf(act_e) * bf(w2)) < 1e-5);
    CHECK(relative(plain(g2), bf(act_e).transpose() * bf(dy)) < 1e-5);
    // dpre = (dy W2^T) masked by pre > 0, rounded again as the next GEMMs' operand.
    D dpre = bf(dy) * bf(w2).transpose();
    for (Index r = 0; r < m; ++r)
      for (Index c = 0; c < h; ++c)
        if (!(pre(r0 + r, c) > 0)) dpre(r, c) = 0;
    moe::test::Matrix<float> dpre_f(m, h);
    for (Index r = 0; r < m; ++r)
      for (Index c = 0; c < h; ++c) dpre_f(r, c) = static_cast<float>(dpre(r, c));
    const D dpre_bf = bf(moe::ConstMatrixView<float>(dpre_f.view()));
    CHECK(relative(plain(g1), bf(x).transpose() * dpre_bf) < 1e-5);
    CHECK(relative(plain(dxs.view().block_rows(r0, m)), dpre_bf * bf(w1).transpose()) < 1e-5);
    // The unrounded product is measurably different: the check above can tell them apart.
    CHECK(relative(plain(g1), plain(x).transpose() * dpre) > 1e-4);
  }
}

TEST_CASE("Experts with Precision::bf16 train in float as fp32 experts do, and are refused on a double backend") {
  using Layer = moe::Layer<moe::expert::SwiGLU, moe::gate::TopK, moe::backend::Cpu<float>>;
  Layer::Config c{.d_model = 8, .n_experts = 4, .expert = {.hidden = 6, .precision = Precision::bf16}, .seed = 2};
  Layer bf16(c);
  c.expert.precision = Precision::fp32;
  Layer fp32(c);
  const auto x = moe::test::random_matrix<float>(20, 8, 4);
  const auto f16 = bf16.forward(x.view(), moe::Mode::inference);
  const auto f32 = fp32.forward(x.view(), moe::Mode::inference);
  CHECK(moe::test::same_bits(f16.expert_index(), f32.expert_index()));  // gating stays fp32
  double diff = 0, norm = 0;
  for (Index t = 0; t < 20; ++t)
    for (Index j = 0; j < 8; ++j) {
      const double e = f16.y()(t, j) - f32.y()(t, j);
      diff += e * e;
      norm += f32.y()(t, j) * f32.y()(t, j);
    }
  CHECK(std::sqrt(diff / norm) > 1e-5);  // it does compute in bf16
  CHECK(std::sqrt(diff / norm) < 2e-2);

  // Training: the same regression, fitted by Adam from the same start in both precisions. The fp32
  // master weights and gradients take steps far below bf16's resolution, and the loss falls as far.
  moe::test::Matrix<float> target(20, 8);
  for (Index t = 0; t < 20; ++t)
    for (Index j = 0; j < 8; ++j) target(t, j) = std::sin(2.0f * x(t, j)) + 0.5f * x(t, (j + 1) % 8);
  auto fit = [&](Layer& layer) {
    moe::optim::Adam<moe::backend::Cpu<float>> adam({.lr = 1e-2});
    auto mse = [&] {
      const auto f = layer.forward(x.view(), moe::Mode::inference);
      double s = 0;
      for (Index t = 0; t < 20; ++t)
        for (Index j = 0; j < 8; ++j) s += (f.y()(t, j) - target(t, j)) * (f.y()(t, j) - target(t, j));
      return s / 20;
    };
    const double before = mse();
    for (int step = 0; step < 150; ++step) {
      const auto f = layer.forward(x.view(), moe::Mode::train);
      moe::test::Matrix<float> dy(20, 8);
      for (Index t = 0; t < 20; ++t)
        for (Index j = 0; j < 8; ++j) dy(t, j) = 2.0f * (f.y()(t, j) - target(t, j)) / 20;
      layer.zero_grad();
      (void)layer.backward(f, dy.view());
      adam.step(layer.parameters());
    }
    return std::pair{before, mse()};
  };
  const auto [before16, after16] = fit(bf16);
  const auto [before32, after32] = fit(fp32);
  CAPTURE(before16);
  CAPTURE(after16);
  CAPTURE(after32);
  CHECK(after16 < 0.3 * before16);
  CHECK(after16 < 1.5 * after32 + 1e-3);

  using DoubleLayer = moe::Layer<moe::expert::FeedForward, moe::gate::TopK, moe::backend::Cpu<double>>;
  const auto message = moe::test::error_of([] {
    DoubleLayer layer({.d_model = 4, .n_experts = 2, .expert = {.hidden = 3, .precision = Precision::bf16}});
  });
  CHECK(moe::test::contains(message, "expert::FeedForward: precision = bf16 needs a float backend"));
}

TEST_CASE("BFloat16 holds the bits round_to_bf16 rounds to and widens back exactly") {
  for (std::uint32_t i = 0; i < 2000; ++i) {
    const float x = from_bits(0x30000000u + i * 1234567u);
    const moe::BFloat16 b = moe::to_bfloat16(x);
    CHECK(b.bits == bits_of(round_to_bf16(x)) >> 16);
    CHECK(bits_of(moe::to_float(b)) == bits_of(round_to_bf16(x)));
  }
  CHECK(moe::to_bfloat16(1.0f + 0x1p-8f).bits == 0x3F80u);  // a tie goes to even
  CHECK(moe::to_bfloat16(-0.0f).bits == 0x8000u);
  CHECK(std::isnan(moe::to_float(moe::to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(moe::to_bfloat16(std::numeric_limits<float>::infinity()).bits == 0x7F80u);
}

TEST_CASE("Grouped GEMMs on BFloat16 operands give the bits of the rounding bf16 path") {
  using Cpu = moe::backend::Cpu<float>;
  Cpu::Context ctx{};
  const Index d = 7, h = 5, groups = 3, rows = 11;
  const std::vector<Index> offsets{0, 4, 4, rows};
  const auto a = moe::test::random_matrix<float>(rows, d, 1);
  const auto w = moe::test::random_matrix<float>(groups * d, h, 2);
  const auto b = moe::test::random_matrix<float>(rows, h, 3);
  auto narrow = [](const moe::test::Matrix<float>& m) {
    std::vector<moe::BFloat16> out(static_cast<std::size_t>(m.size()));
    for (Index i = 0; i < m.size(); ++i) out[static_cast<std::size_t>(i)] = moe::to_bfloat16(m[i]);
    return out;
  };
  const auto a16 = narrow(a), w16 = narrow(w), b16 = narrow(b);
  const moe::ConstMatrixView<moe::BFloat16> av{a16.data(), rows, d}, wv{w16.data(), groups * d, h},
      bv{b16.data(), rows, h};
  moe::test::Matrix<float> c16(rows, h), c(rows, h);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, av, wv, c16.view(), Precision::bf16);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, a.view(), w.view(), c.view(), Precision::bf16);
  CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(c16.view()), moe::ConstMatrixView<float>(c.view())));
  // op(w) transposed: c (rows x d) = b (rows x h) w_g^T.
  moe::test::Matrix<float> t16(rows, d), t(rows, d);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::transpose, bv, wv, t16.view(), Precision::bf16);
  Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::transpose, b.view(), w.view(), t.view(), Precision::bf16);
  CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(t16.view()), moe::ConstMatrixView<float>(t.view())));
  moe::test::Matrix<float> g16(groups * d, h, 0.5f), g(groups * d, h, 0.5f);
  Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, av, bv, 1.0f, g16.view(), Precision::bf16);
  Cpu::grouped_gemm_wgrad(ctx, offsets.data(), groups, a.view(), b.view(), 1.0f, g.view(), Precision::bf16);
  CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(g16.view()), moe::ConstMatrixView<float>(g.view())));
  // BFloat16 operands are bf16's: another precision is refused, naming it.
  const auto message = moe::test::error_of([&] {
    Cpu::grouped_gemm(ctx, offsets.data(), groups, moe::Op::none, av, wv, c16.view(), Precision::tf32);
  });
  CHECK(moe::test::contains(message, "grouped_gemm: BFloat16 operands are multiplied as Precision::bf16, got Precision::tf32"));
}

TEST_CASE("SwiGLU in bf16: x [W1 | W3] and dx = [dh1 | dh3] [W1 | W3]^T as single GEMMs on rounded operands") {
  using Cpu = moe::backend::Cpu<float>;
  using Group = moe::expert::SwiGLU::Group<Cpu>;
  using D = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index d = 6, h = 5, n = 2, rows = 9;
  const std::vector<Index> offsets{0, 4, rows};
  Group group({.hidden = h, .precision = Precision::bf16}, d, n, 3);
  auto params = group.parameters();
  REQUIRE(params[1].name == "experts.w3");
  const auto xs = moe::test::random_matrix<float>(rows, d, 4);
  const auto dys = moe::test::random_matrix<float>(rows, d, 5);
  moe::test::Matrix<float> ys(rows, d), dxs(rows, d);
  Cpu::Context ctx{};
  Group::Saved saved;
  group.forward(ctx, xs.view(), offsets.data(), ys.view(), saved);
  group.backward(ctx, xs.view(), offsets.data(), saved, dys.view(), dxs.view());
  auto bf = [](const D& m) { return m.unaryExpr([](double v) { return double(round_to_bf16(float(v))); }).eval(); };
  auto plain = [](auto m) { return moe::backend::cpu::eigen(m).template cast<double>().eval(); };
  auto relative = [](const D& a, const D& b) { return (a - b).norm() / b.norm(); };
  auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  for (Index e = 0; e < n; ++e) {
    CAPTURE(e);
    const Index r0 = offsets[static_cast<std::size_t>(e)], m = offsets[static_cast<std::size_t>(e) + 1] - r0;
    auto block = [&](std::size_t i, Index per) { return plain(moe::ConstMatrixView<float>(params[i].value).block_rows(e * per, per)); };
    auto grad = [&](std::size_t i, Index per) { return plain(moe::ConstMatrixView<float>(params[i].grad).block_rows(e * per, per)); };
    const D w1 = bf(block(0, d)), w3 = bf(block(1, d)), w2 = bf(block(2, h));
    const D x = bf(plain(xs.view().block_rows(r0, m))), dy = bf(plain(dys.view().block_rows(r0, m)));
    const D h1 = x * w1, h3 = x * w3;
    D act(m, h), g = dy * w2.transpose(), dh1(m, h), dh3(m, h);
    for (Index r = 0; r < m; ++r)
      for (Index c = 0; c < h; ++c) {
        const double a = h1(r, c), s = sig(a);
        act(r, c) = a * s * h3(r, c);
        dh3(r, c) = g(r, c) * a * s;
        dh1(r, c) = g(r, c) * h3(r, c) * s * (1 + a * (1 - s));
      }
    CHECK(relative(plain(ys.view().block_rows(r0, m)), bf(act) * w2) < 1e-4);
    CHECK(relative(grad(2, h), bf(act).transpose() * dy) < 1e-4);
    CHECK(relative(grad(0, d), x.transpose() * bf(dh1)) < 1e-4);
    CHECK(relative(grad(1, d), x.transpose() * bf(dh3)) < 1e-4);
    CHECK(relative(plain(dxs.view().block_rows(r0, m)), bf(dh1) * w1.transpose() + bf(dh3) * w3.transpose()) < 1e-4);
    // Unrounded operands give a measurably different dx: the check can tell them apart.
    CHECK(relative(plain(dxs.view().block_rows(r0, m)), dh1 * w1.transpose() + dh3 * w3.transpose()) > 1e-4);
  }
}

namespace {

// y of a bf16 expert group of family F on fixed rows.
template <class Group>
moe::test::Matrix<float> expert_output(Group& group, Index d) {
  const std::vector<Index> offsets{0, 3, 7};
  const auto xs = moe::test::random_matrix<float>(7, d, 11);
  moe::test::Matrix<float> ys(7, d);
  moe::backend::Cpu<float>::Context ctx{};
  typename Group::Saved saved;
  group.forward(ctx, xs.view(), offsets.data(), ys.view(), saved);
  return ys;
}

// Sets every parameter value of `to` from `from`'s (through a fresh parameters() call).
template <class Group>
void copy_values(Group& from, Group& to) {
  auto src = from.parameters();
  auto dst = to.parameters();
  for (std::size_t i = 0; i < src.size(); ++i)
    for (Index j = 0; j < src[i].size(); ++j) dst[i].value.data[j] = src[i].value.data[j];
}

template <class Family>
void check_weight_copies_follow_changes() {
  using Cpu = moe::backend::Cpu<float>;
  using Group = typename Family::template Group<Cpu>;
  const Index d = 5, n = 2;
  const typename Family::Config config{.hidden = 4, .precision = Precision::bf16};
  Group group(config, d, n, 1);
  auto params = group.parameters();  // kept across the steps below, as a training loop keeps them
  const auto y0 = expert_output(group, d);
  auto same = [](const moe::test::Matrix<float>& a, const moe::test::Matrix<float>& b) {
    return moe::test::same_bits(moe::ConstMatrixView<float>(a.view()), moe::ConstMatrixView<float>(b.view()));
  };
  auto fresh_output = [&] {  // a group that never saw the old values, holding the current ones
    Group other(config, d, n, 99);
    copy_values(group, other);
    return expert_output(other, d);
  };

  // An optimizer step through the kept views: the next call uses the new weights.
  for (auto& p : params)
    for (Index j = 0; j < p.size(); ++j) p.grad.data[j] = 0.5f;
  moe::optim::Sgd<Cpu> sgd({.lr = 0.25});
  sgd.step(params);
  const auto y1 = expert_output(group, d);
  CHECK_FALSE(same(y1, y0));
  CHECK(same(y1, fresh_output()));

  // A write through the kept views, announced with changed().
  params[0].value.data[0] += 1.0f;
  params[0].changed();
  const auto y2 = expert_output(group, d);
  CHECK_FALSE(same(y2, y1));
  CHECK(same(y2, fresh_output()));

  // A copy of the group holds its own weights: changing the copy leaves the original alone.
  Group copy = group;
  auto copy_params = copy.parameters();
  copy_params[1].value.data[0] -= 1.0f;
  CHECK(same(expert_output(group, d), y2));
  CHECK_FALSE(same(expert_output(copy, d), y2));
}

}  // namespace

TEST_CASE("bf16 experts' BFloat16 weight copies follow optimizer steps, changed() and copies of the group") {
  SUBCASE("FeedForward") { check_weight_copies_follow_changes<moe::expert::FeedForward>(); }
  SUBCASE("SwiGLU") { check_weight_copies_follow_changes<moe::expert::SwiGLU>(); }
}

namespace {

template <class Family>
void check_gather_into_bfloat16() {
  using Cpu = moe::backend::Cpu<float>;
  using Group = typename Family::template Group<Cpu>;
  const Index d = 6, n = 2;
  Cpu::Context ctx{};
  const auto x = moe::test::random_matrix<float>(10, d, 21);
  const std::vector<Index> rows{9, 2, 2, 0, 7, 5, 3}, offsets{0, 3, 7};
  const auto dys = moe::test::random_matrix<float>(7, d, 22);
  const typename Family::Config config{.hidden = 5, .precision = Precision::bf16};
  Group by_layer(config, d, n, 4), by_group(config, d, n, 4);
  // The fp32 gather, then forward and backward ...
  moe::test::Matrix<float> xs(7, d), ys(7, d), dxs(7, d);
  Cpu::gather_rows(ctx, x.view(), rows.data(), xs.view());
  typename Group::Saved saved;
  by_layer.forward(ctx, xs.view(), offsets.data(), ys.view(), saved);
  by_layer.backward(ctx, xs.view(), offsets.data(), saved, dys.view(), dxs.view());
  // ... against the group's own gather, straight into bfloat16: xs2 is never written or read.
  moe::test::Matrix<float> xs2(7, d, std::numeric_limits<float>::quiet_NaN()), ys2(7, d), dxs2(7, d);
  typename Group::Saved saved2;
  by_group.gather_rows(ctx, x.view(), rows.data(), xs2.view(), saved2);
  for (Index i = 0; i < xs2.size(); ++i) REQUIRE(std::isnan(xs2[i]));
  by_group.forward(ctx, xs2.view(), offsets.data(), ys2.view(), saved2);
  by_group.backward(ctx, xs2.view(), offsets.data(), saved2, dys.view(), dxs2.view());
  auto same = [](const moe::test::Matrix<float>& a, const moe::test::Matrix<float>& b) {
    return moe::test::same_bits(moe::ConstMatrixView<float>(a.view()), moe::ConstMatrixView<float>(b.view()));
  };
  CHECK(same(ys, ys2));
  CHECK(same(dxs, dxs2));
  const auto p1 = by_layer.parameters(), p2 = by_group.parameters();
  for (std::size_t i = 0; i < p1.size(); ++i)
    CHECK(moe::test::same_bits(moe::ConstMatrixView<float>(p1[i].grad), moe::ConstMatrixView<float>(p2[i].grad)));
  // In fp32 the group's gather is the backend's.
  Group wide({.hidden = 5}, d, n, 4);
  typename Group::Saved saved3;
  moe::test::Matrix<float> xs3(7, d);
  wide.gather_rows(ctx, x.view(), rows.data(), xs3.view(), saved3);
  CHECK(same(xs3, xs));
}

}  // namespace

TEST_CASE("bf16 experts gather the layer's dispatched rows straight into bfloat16, with the same results") {
  static_assert(moe::GathersOwnRows<moe::expert::FeedForward::Group<moe::backend::Cpu<float>>, moe::backend::Cpu<float>>);
  SUBCASE("FeedForward") { check_gather_into_bfloat16<moe::expert::FeedForward>(); }
  SUBCASE("SwiGLU") { check_gather_into_bfloat16<moe::expert::SwiGLU>(); }
}
