#pragma once
// Eigen for the CPU backend. Results must not depend on the thread count, so Eigen's own
// GEMM threading stays off: the backend parallelizes over fixed row blocks itself.

#if defined(EIGEN_WORLD_VERSION) && defined(_OPENMP) && !defined(EIGEN_DONT_PARALLELIZE)
#error \
    "moe's CPU backend needs Eigen's internal threading off: include <moe/backend/cpu.hpp> before any Eigen header, or define EIGEN_DONT_PARALLELIZE"
#endif
#ifndef EIGEN_DONT_PARALLELIZE
#define EIGEN_DONT_PARALLELIZE
#endif

#include <Eigen/Core>

#include "moe/view.hpp"

namespace moe::backend::cpu {

template <class S>
using RowMatrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class S>
using ConstMap = Eigen::Map<const RowMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class S>
using Map = Eigen::Map<RowMatrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;

// The distance between a view's rows in elements (a stride of 0 means packed rows).
template <class T>
Index row_stride(MatrixView<T> v) {
  return v.stride > 0 ? v.stride : v.cols;
}

template <class S>
ConstMap<S> eigen(ConstMatrixView<S> v) {
  return {v.data, v.rows, v.cols, Eigen::OuterStride<>(row_stride(v))};
}

// clang-format off
template <class S>
  requires(!std::is_const_v<S>)
Map<S> eigen(MatrixView<S> v) {
  // clang-format on
  return {v.data, v.rows, v.cols, Eigen::OuterStride<>(row_stride(v))};
}

}  // namespace moe::backend::cpu
