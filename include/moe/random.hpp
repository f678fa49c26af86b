#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11): a value is a pure
// function of (seed, counter), so the noise for (token, expert, step) is the same on any
// thread count and backend. No std::rand, no standard-library distribution (their output
// differs between standard libraries).

#include <cmath>
#include <cstdint>

#include "moe/view.hpp"

namespace moe {

namespace detail {

struct Philox4x32 {
  std::uint32_t v[4];
};

MOE_HD inline Philox4x32 philox4x32_10(Philox4x32 ctr, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * ctr.v[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * ctr.v[2];
    const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    ctr = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// A 32-bit word turned into a uniform in (0, 1].
MOE_HD inline double uniform_open0(std::uint32_t word) { return (static_cast<double>(word) + 1.0) * 0x1p-32; }

}  // namespace detail

// The stream of values f(seed, a, b, c): a pure function, so any element can be drawn alone.
struct CounterRandom {
  std::uint64_t seed = 0;

  MOE_HD detail::Philox4x32 block(std::uint64_t a, std::uint32_t b, std::uint32_t c) const {
    detail::Philox4x32 ctr{{static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(a >> 32), b, c}};
    return detail::philox4x32_10(ctr, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  }

  // A standard normal value (Box-Muller, cosine branch) at counter (a, b, c).
  MOE_HD double normal(std::uint64_t a, std::uint32_t b, std::uint32_t c) const {
    const detail::Philox4x32 r = block(a, b, c);
    const double u1 = detail::uniform_open0(r.v[0]);
    const double u2 = detail::uniform_open0(r.v[1]);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

  // A uniform value in (-1, 1] at counter (a, b, c).
  MOE_HD double symmetric_uniform(std::uint64_t a, std::uint32_t b, std::uint32_t c) const {
    return 2.0 * detail::uniform_open0(block(a, b, c).v[0]) - 1.0;
  }
};

// The caller-owned noise generator of the noisy gate: each training forward draws one step,
// and the noise of token t (its row in that call), expert i at that step is
// normal(t, i, step mod 2^32).
class Rng {
 public:
  // step: where the generator stands (0 for a new one; a checkpoint's step() to resume).
  explicit Rng(std::uint64_t seed, std::uint64_t step = 0) : stream_{seed}, step_(step) {}

  [[nodiscard]] std::uint64_t seed() const { return stream_.seed; }
  [[nodiscard]] std::uint64_t step() const { return step_; }
  // The stream and step for one forward call; advances the generator.
  struct Draw {
    CounterRandom stream;
    std::uint64_t step;
  };
  Draw next() { return {stream_, step_++}; }

 private:
  CounterRandom stream_;
  std::uint64_t step_ = 0;
};

}  // namespace moe
