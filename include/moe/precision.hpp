#pragma once
// The compute precision of the experts' GEMMs. Every reduced precision rounds each operand of a
// grouped GEMM (activations, weights, output gradients) before it is multiplied and accumulates
// the products in fp32: the numerics of a tensor-core GEMM with fp32 accumulation.
//   Precision::fp32: no rounding (fp32 or fp64 data, as stored).
//   Precision::bf16: operands rounded to bfloat16 (8 significant bits, round to nearest even).
//   Precision::tf32: operands rounded to TF32 (fp32's exponent, 10 explicit mantissa bits:
//     11 significant bits, round to nearest even); an opt-in for fp32 users.
// Parameters, their gradients and the layer's activations stay stored in the backend's Scalar
// (fp32 master weights); gating is always computed in fp32. bf16 and tf32 need float data.
// With bf16, the library's experts also keep the GEMMs' operands in memory as BFloat16 (below):
// a copy of each weight refreshed when the parameters change, the gathered rows and the hidden
// activations written narrow where they are produced; the results are those of rounding each
// fp32 operand, bit for bit.

#include <concepts>
#include <cstdint>
#include <cstring>

#include "moe/view.hpp"

namespace moe {

enum class Precision { fp32, bf16, tf32 };

inline const char* to_string(Precision p) {
  switch (p) {
    case Precision::bf16:
      return "bf16";
    case Precision::tf32:
      return "tf32";
    case Precision::fp32:
      break;
  }
  return "fp32";
}

namespace detail {
// x with its low `dropped` mantissa bits rounded away: to nearest, ties to even; a NaN stays a
// (quiet) NaN, infinities and zeros keep their sign, values past the largest representable
// number become infinite (the carry runs into the exponent).
template <int dropped>
MOE_HD inline float round_mantissa(float x) {
  static_assert(dropped > 0 && dropped < 23);
  constexpr std::uint32_t half = (std::uint32_t{1} << (dropped - 1)) - 1u;
  constexpr std::uint32_t keep = ~((std::uint32_t{1} << dropped) - 1u);
  std::uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof bits);
#endif
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    bits |= 0x00400000u;  // a quiet NaN with the payload's top bits, as the hardware conversion
  } else {
    bits += half + ((bits >> dropped) & 1u);  // round to nearest, ties to even
  }
  bits &= keep;
  float out;
#if defined(__CUDA_ARCH__)
  out = __uint_as_float(bits);
#else
  std::memcpy(&out, &bits, sizeof out);
#endif
  return out;
}
}  // namespace detail

// x rounded to the nearest bfloat16 (ties to even), returned as a float; NaN stays NaN,
// infinities and zeros keep their sign, values past the largest bfloat16 become infinite.
MOE_HD inline float round_to_bf16(float x) { return detail::round_mantissa<16>(x); }

// x rounded to the nearest TF32 value (ties to even), returned as a float whose low 13 bits are
// 0; NaN stays NaN, infinities and zeros keep their sign, values past the largest TF32 number
// (0x1.ffcp127) become infinite. Subnormals round like any other value. (The hardware's
// cvt.rna.tf32.f32 rounds ties away from zero instead: the library rounds every operand
// itself, with this function, on host and device alike.)
MOE_HD inline float round_to_tf32(float x) { return detail::round_mantissa<13>(x); }

// x rounded as Precision p rounds an operand (fp32: unchanged).
MOE_HD inline float round_operand(float x, Precision p) {
  return p == Precision::bf16 ? round_to_bf16(x) : p == Precision::tf32 ? round_to_tf32(x) : x;
}

// A bfloat16 number in memory: the top 16 bits of a float (the layout of CUDA's __nv_bfloat16).
// Operands that Precision::bf16 multiplies are kept in this type where they are stored (the
// experts' weight copies and activations), so a tensor-core GEMM reads half the bytes of fp32.
// Widening to float is exact; narrowing rounds as round_to_bf16.
struct BFloat16 {
  std::uint16_t bits = 0;
};

MOE_HD inline BFloat16 to_bfloat16(float x) {
  const float r = round_to_bf16(x);
  std::uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(r);
#else
  std::memcpy(&u, &r, sizeof u);
#endif
  return BFloat16{static_cast<std::uint16_t>(u >> 16)};
}

// A view of BFloat16 values, const or not: the operand type of the GEMM overloads that read
// bfloat16 storage. They take it as a deduced parameter, so a braced list never selects them.
template <class V>
concept BFloat16View = std::same_as<V, MatrixView<const BFloat16>> || std::same_as<V, MatrixView<BFloat16>>;

MOE_HD inline float to_float(BFloat16 x) {
  const std::uint32_t u = static_cast<std::uint32_t>(x.bits) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float out;
  std::memcpy(&out, &u, sizeof out);
  return out;
#endif
}

}  // namespace moe
