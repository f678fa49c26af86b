#pragma once
// Named parameters: every trainable tensor has a stable dotted name ("gate.w_gate",
// "experts.w1"), a logical shape (experts stacked first, e.g. [n, d, h]) and contiguous
// value and gradient storage of the same size.
//
// Whoever writes a parameter's values calls changed() afterwards: the optimizers, checkpoint
// loads and imports do. Copies derived from the values (the bfloat16 weight copies of an expert
// group computing in Precision::bf16) are made again at their next use only then, or after the
// next call of parameters(), which hands out writable views. Values written through views kept
// from an earlier parameters() call without changed() are not seen by those copies.

#include <cstdint>
#include <memory>
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
  std::uint64_t* version = nullptr;  // the owner's count of changes, or none (nothing derived)

  [[nodiscard]] Index size() const { return value.rows * value.cols; }
  // Says that value was written: copies derived from it are made again at their next use.
  void changed() const {
    if (version != nullptr) ++*version;
  }
};

// A parameter owner's count of changes to its values (Parameter::version points to it). Kept
// on the heap, so the pointers stay valid when the owner moves; a copy of the owner counts on
// its own, and assigning to the owner counts as a change.
class ParameterVersion {
 public:
  ParameterVersion() : count_(std::make_unique<std::uint64_t>(0)) {}
  ParameterVersion(const ParameterVersion&) : ParameterVersion() {}
  ParameterVersion(ParameterVersion&&) noexcept = default;
  ParameterVersion& operator=(const ParameterVersion&) {
    advance();
    return *this;
  }
  ParameterVersion& operator=(ParameterVersion&& other) noexcept {
    count_ = std::move(other.count_);
    advance();
    return *this;
  }
  ~ParameterVersion() = default;

  [[nodiscard]] std::uint64_t value() const { return count_ ? *count_ : 0; }
  void advance() {
    if (count_) ++*count_;
  }
  // Sets every parameter's version to this count and advances it: the caller hands out writable
  // views of the values.
  template <class S>
  std::vector<Parameter<S>> hand_out(std::vector<Parameter<S>> params) {
    for (auto& p : params) p.version = count_.get();
    advance();
    return params;
  }

 private:
  std::unique_ptr<std::uint64_t> count_;
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
