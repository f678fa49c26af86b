#pragma once
// The element types of safetensors files (moe/io/safetensors.hpp): their names, sizes, and the
// conversions between float and the 16-bit floating formats (IEEE binary16 and bfloat16), both
// rounding to nearest, ties to even.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

namespace moe::io {

enum class Dtype { BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64 };

namespace detail {
inline constexpr Dtype all_dtypes[] = {Dtype::BOOL, Dtype::U8,  Dtype::I8,  Dtype::I16, Dtype::U16,
                                       Dtype::I32,  Dtype::U32, Dtype::I64, Dtype::U64, Dtype::F16,
                                       Dtype::BF16, Dtype::F32, Dtype::F64};
}  // namespace detail

// The name a safetensors header uses: "F32", "BF16", ...
[[nodiscard]] inline std::string_view dtype_name(Dtype d) {
  switch (d) {
    case Dtype::BOOL:
      return "BOOL";
    case Dtype::U8:
      return "U8";
    case Dtype::I8:
      return "I8";
    case Dtype::I16:
      return "I16";
    case Dtype::U16:
      return "U16";
    case Dtype::I32:
      return "I32";
    case Dtype::U32:
      return "U32";
    case Dtype::I64:
      return "I64";
    case Dtype::U64:
      return "U64";
    case Dtype::F16:
      return "F16";
    case Dtype::BF16:
      return "BF16";
    case Dtype::F32:
      return "F32";
    case Dtype::F64:
      return "F64";
  }
  return "?";
}

// The dtype named `name`; nullopt for a name this library does not know (e.g. "F8_E4M3").
[[nodiscard]] inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (const Dtype d : detail::all_dtypes) {
    if (dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

// Bytes per element.
[[nodiscard]] inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::BOOL:
    case Dtype::U8:
    case Dtype::I8:
      return 1;
    case Dtype::I16:
    case Dtype::U16:
    case Dtype::F16:
    case Dtype::BF16:
      return 2;
    case Dtype::I32:
    case Dtype::U32:
    case Dtype::F32:
      return 4;
    case Dtype::I64:
    case Dtype::U64:
    case Dtype::F64:
      return 8;
  }
  return 1;
}

[[nodiscard]] inline bool is_floating(Dtype d) {
  return d == Dtype::F16 || d == Dtype::BF16 || d == Dtype::F32 || d == Dtype::F64;
}

// IEEE binary16 -> float: exact (every half is a float), subnormals included; NaN stays NaN.
[[nodiscard]] inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t mant = h & 0x3FFu;
  std::uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (mant << 13);  // infinity, or NaN with its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias: 127 - 15 = 112
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // A subnormal half is a normal float: shift the mantissa up to its leading 1.
    std::uint32_t e = 113;  // the float exponent of 2^-14, less one per shift
    do {
      mant <<= 1;
      --e;
    } while ((mant & 0x400u) == 0);
    bits = sign | (e << 23) | ((mant & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

// float -> IEEE binary16, rounded to nearest, ties to even: values past the largest half (65504)
// that round up become infinite, small values become subnormal or zero, NaN stays a (quiet) NaN.
[[nodiscard]] inline std::uint16_t float_to_half(float f) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {
    if (abs == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
    // NaN: quiet, keeping the payload's top bits (a payload only in the dropped bits would
    // otherwise make an infinity).
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  }
  if (abs >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 2^16: infinite whatever the rounding
  const std::uint32_t exp = abs >> 23;
  if (exp < 113) {
    // Below 2^-14, the smallest normal half: a subnormal, in units of 2^-24. Below 2^-25 (half
    // the smallest subnormal) everything rounds to zero; 2^-25 itself ties to the even zero.
    if (exp < 102) return sign;
    const std::uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126 - exp;  // 14..24
    std::uint32_t r = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // a carry into 0x400 is the smallest normal
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = ((exp - 112) << 10) | ((abs >> 13) & 0x3FFu);
  const std::uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry moves into the exponent, as it should
  if (r >= 0x7C00u) r = 0x7C00u;
  return static_cast<std::uint16_t>(sign | r);
}

// bfloat16 -> float: exact (bfloat16 is the top half of a float).
[[nodiscard]] inline float bf16_to_float(std::uint16_t h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16);
}

// float -> bfloat16, rounded to nearest, ties to even; the same rounding as moe::round_to_bf16
// (moe/precision.hpp): overflow becomes infinite, NaN stays a quiet NaN.
[[nodiscard]] inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(f);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) {
    bits |= 0x00400000u;  // quiet, so that a payload only in the dropped bits stays a NaN
  } else {
    bits += 0x7FFFu + ((bits >> 16) & 1u);
  }
  return static_cast<std::uint16_t>(bits >> 16);
}

namespace detail {
template <class T>
inline constexpr bool no_dtype_for = false;

template <class T>
consteval Dtype dtype_of_impl() {
  if constexpr (std::is_same_v<T, float>) {
    return Dtype::F32;
  } else if constexpr (std::is_same_v<T, double>) {
    return Dtype::F64;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return Dtype::I64;
  } else if constexpr (std::is_same_v<T, std::int32_t>) {
    return Dtype::I32;
  } else if constexpr (std::is_same_v<T, std::int16_t>) {
    return Dtype::I16;
  } else if constexpr (std::is_same_v<T, std::int8_t>) {
    return Dtype::I8;
  } else if constexpr (std::is_same_v<T, std::uint64_t>) {
    return Dtype::U64;
  } else if constexpr (std::is_same_v<T, std::uint32_t>) {
    return Dtype::U32;
  } else if constexpr (std::is_same_v<T, std::uint16_t>) {
    return Dtype::U16;
  } else if constexpr (std::is_same_v<T, std::uint8_t>) {
    return Dtype::U8;
  } else {
    static_assert(no_dtype_for<T>,
                  "moe::io::dtype_of<T>: T has no safetensors dtype (float, double, or a std::intN_t / std::uintN_t)");
    return Dtype::U8;
  }
}
}  // namespace detail

// The dtype that stores T as it is: float F32, double F64, std::int64_t I64, std::int32_t I32,
// std::uint8_t U8 (and the other fixed-width integers likewise).
template <class T>
inline constexpr Dtype dtype_of = detail::dtype_of_impl<T>();

}  // namespace moe::io
