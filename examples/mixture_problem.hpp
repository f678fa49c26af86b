#pragma once
// The regression problem the examples train on: the inputs fall into C hidden clusters and each
// cluster has its own linear map, so the target really is a mixture of experts.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/backend/cpu.hpp"
#include "moe/random.hpp"

namespace mixture {

using S = float;
using Matrix = moe::backend::HostMatrix<S>;
using moe::Index;

struct Data {
  Matrix x, y;                 // [T x d]
  std::vector<Index> cluster;  // [T], hidden from the models; only the purity column reads it
};

// Inputs x = center_c + spread * noise, targets y = A_c x, with the cluster c uniform among C. The
// maps are scaled so that every target component has a variance of about 1.
class Problem {
 public:
  Problem(Index d, Index clusters, std::uint64_t seed) : d_(d), c_(clusters), random_{seed} {
    centers_.resize(c_, d_);
    maps_.resize(c_ * d_, d_);
    const double gain = 1.0 / std::sqrt(static_cast<double>(d_) * (1.0 + kSpread * kSpread));
    for (Index c = 0; c < c_; ++c)
      for (Index i = 0; i < d_; ++i) {
        centers_(c, i) = normal(c, i, kCenterTag);
        for (Index j = 0; j < d_; ++j) maps_(c * d_ + i, j) = static_cast<S>(gain) * normal(c * d_ + i, j, kMapTag);
      }
  }

  // Tokens [first, first + count) of the problem's infinite stream: train and eval never overlap.
  Data sample(Index first, Index count) const {
    Data out{Matrix(count, d_), Matrix(count, d_, S(0)), std::vector<Index>(static_cast<std::size_t>(count))};
    for (Index t = 0; t < count; ++t) {
      const Index token = first + t;
      const double u = 0.5 * (1.0 + random_.symmetric_uniform(static_cast<std::uint64_t>(token), 0, kClusterTag));
      const Index c = std::min(c_ - 1, static_cast<Index>(u * static_cast<double>(c_)));
      out.cluster[static_cast<std::size_t>(t)] = c;
      for (Index i = 0; i < d_; ++i)
        out.x(t, i) = centers_(c, i) + static_cast<S>(kSpread) * normal(token, i, kNoiseTag);
      for (Index i = 0; i < d_; ++i)
        for (Index j = 0; j < d_; ++j) out.y(t, j) += out.x(t, i) * maps_(c * d_ + i, j);
    }
    return out;
  }

 private:
  static constexpr double kSpread = 0.5;  // within-cluster noise relative to the center's scale
  static constexpr std::uint32_t kCenterTag = 1, kMapTag = 2, kClusterTag = 3, kNoiseTag = 4;

  S normal(Index a, Index b, std::uint32_t tag) const {
    return static_cast<S>(random_.normal(static_cast<std::uint64_t>(a), static_cast<std::uint32_t>(b), tag));
  }

  Index d_, c_;
  moe::CounterRandom random_;
  Matrix centers_, maps_;  // [C x d], [C*d x d]
};

// MSE over every token and component; dy = its gradient with respect to the prediction.
// count: the number of values the mean divides by (0: this batch's), e.g. the global batch's when
// each process holds a slice of it.
inline double mse(moe::ConstMatrixView<S> prediction, moe::ConstMatrixView<S> target, Matrix* dy = nullptr,
                  double count = 0) {
  if (count == 0) count = static_cast<double>(target.rows * target.cols);
  double sum = 0;
  for (Index t = 0; t < target.rows; ++t)
    for (Index j = 0; j < target.cols; ++j) {
      const double e = prediction(t, j) - target(t, j);
      sum += e * e;
      if (dy != nullptr) (*dy)(t, j) = static_cast<S>(2.0 * e / count);
    }
  return sum / count;
}

}  // namespace mixture
