#pragma once
// The compute precision of the experts' GEMMs. Precision::bf16: every operand of a grouped GEMM
// (activations, weights, output gradients) is rounded to bfloat16 (8 significant bits, round
// to nearest even) before it is multiplied, and products are accumulated in fp32: the numerics
// of a bf16 GEMM on tensor cores with fp32 accumulation. Parameters, their gradients and the
// layer's activations stay stored in the backend's Scalar (fp32 master weights); gating is
// always computed in fp32.

#include <cstdint>
#include <cstring>

#include "moe/view.hpp"

namespace moe {

enum class Precision { fp32, bf16 };

inline const char* to_string(Precision p) { return p == Precision::bf16 ? "bf16" : "fp32"; }

// x rounded to the nearest bfloat16 (ties to even), returned as a float; NaN stays NaN,
// infinities and zeros keep their sign, values past the largest bfloat16 become infinite.
MOE_HD inline float round_to_bf16(float x) {
  std::uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof bits);
#endif
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    bits |= 0x00400000u;  // a quiet NaN with the payload's top bits, as the hardware conversion
  } else {
    bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  }
  bits &= 0xFFFF0000u;
  float out;
#if defined(__CUDA_ARCH__)
  out = __uint_as_float(bits);
#else
  std::memcpy(&out, &bits, sizeof out);
#endif
  return out;
}

}  // namespace moe
