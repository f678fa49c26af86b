#pragma once
// Named parameters: every trainable tensor has a stable dotted name ("gate.w_gate",
// "experts.w1"), a logical shape (experts stacked first, e.g. [n, d, h]) and contiguous
// value and gradient storage of the same size.

#include <cstdint>
#include <string>
#include <vector>

#include "moe/random.hpp"
#include "moe/view.hpp"

namespace moe {

template <class S>
struct Parameter {
  std::string name;
  std::vector<Index> shape;
  MatrixView<S> value;
  MatrixView<S> grad;

  [[nodiscard]] Index size() const { return value.rows * value.cols; }
};

namespace detail {

// Stable per-name initialization stream id (FNV-1a of the name), so a parameter's initial
// values depend on the seed and its name only, not on construction order.
inline std::uint32_t name_id(const std::string& name) {
  std::uint32_t h = 2166136261u;
  for (const char c : name) h = (h ^ static_cast<unsigned char>(c)) * 16777619u;
  return h;
}

// Fills a contiguous view with values uniform in (-bound, bound], a pure function of
// (seed, name, element). first_element: the index of v's first element in the whole tensor, so
// that a shard of a stacked tensor (a rank's experts) holds the values the whole tensor would.
template <class B, class S>
void init_uniform(typename B::Context& ctx, MatrixView<S> v, std::uint64_t seed, const std::string& name,
                  double bound, Index first_element = 0) {
  const CounterRandom stream{seed};
  const std::uint32_t id = name_id(name);
  S* data = v.data;
  B::for_each(ctx, v.rows * v.cols, [=] MOE_HD(Index i) {
    data[i] = static_cast<S>(bound * stream.symmetric_uniform(static_cast<std::uint64_t>(first_element + i), id, 0x1417u));
  });
}

}  // namespace detail
}  // namespace moe
