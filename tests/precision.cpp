// Precision::bf16: the rounding to bfloat16, the grouped GEMMs that round their operands, and
// the experts that use them (MATH.md is unchanged: bf16 changes how the products are computed,
// not what is computed).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "support.hpp"

namespace {

using moe::Index;
using moe::Precision;
using moe::round_to_bf16;

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

TEST_CASE("Experts with Precision::bf16 train in float, and are refused on a double backend") {
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

  using DoubleLayer = moe::Layer<moe::expert::FeedForward, moe::gate::TopK, moe::backend::Cpu<double>>;
  const auto message = moe::test::error_of([] {
    DoubleLayer layer({.d_model = 4, .n_experts = 2, .expert = {.hidden = 3, .precision = Precision::bf16}});
  });
  CHECK(moe::test::contains(message, "expert::FeedForward: precision = bf16 needs a float backend"));
}
