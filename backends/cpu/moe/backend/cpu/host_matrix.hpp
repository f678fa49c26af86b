#pragma once
// HostMatrix: the CPU backend's owning buffer, row-major, contiguous.

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/view.hpp"

namespace moe::backend {

template <class T>
class HostMatrix {
 public:
  HostMatrix() = default;
  HostMatrix(Index rows, Index cols, T value = T{}) { resize(rows, cols, value); }
  HostMatrix(const HostMatrix&) = default;
  HostMatrix& operator=(const HostMatrix&) = default;
  // A moved-from matrix is empty (0 x 0), so its shape never claims storage it lost.
  HostMatrix(HostMatrix&& other) noexcept
      : data_(std::move(other.data_)), rows_(std::exchange(other.rows_, 0)), cols_(std::exchange(other.cols_, 0)) {}
  HostMatrix& operator=(HostMatrix&& other) noexcept {
    data_ = std::move(other.data_);
    rows_ = std::exchange(other.rows_, 0);
    cols_ = std::exchange(other.cols_, 0);
    return *this;
  }

  // Resizes to rows x cols, keeping the allocation when it is large enough: buffers reused
  // across calls cost no allocation in steady state. Contents are unspecified afterwards (with
  // MOE_POISON_BUFFERS defined, every byte is 0xFF for floating point, a NaN, and 0x7F for
  // integers, a huge index that is no expert, no row and not kNotRouted, so a test sees any
  // element read before it is written).
  void resize(Index rows, Index cols) {
    check_shape(rows, cols);
    rows_ = rows;
    cols_ = cols;
    data_.resize(static_cast<std::size_t>(rows * cols));
#if defined(MOE_POISON_BUFFERS)
    if (!data_.empty())
      std::memset(static_cast<void*>(data_.data()), std::is_integral_v<T> ? 0x7F : 0xFF, data_.size() * sizeof(T));
#endif
  }

  // Resizes to rows x cols with every element set to value.
  void resize(Index rows, Index cols, T value) {
    check_shape(rows, cols);
    rows_ = rows;
    cols_ = cols;
    data_.assign(static_cast<std::size_t>(rows * cols), value);
  }

  [[nodiscard]] Index rows() const { return rows_; }
  [[nodiscard]] Index cols() const { return cols_; }
  [[nodiscard]] Index size() const { return rows_ * cols_; }
  [[nodiscard]] T* data() { return data_.data(); }
  [[nodiscard]] const T* data() const { return data_.data(); }
  T& operator()(Index r, Index c) { return data_[static_cast<std::size_t>(r * cols_ + c)]; }
  const T& operator()(Index r, Index c) const { return data_[static_cast<std::size_t>(r * cols_ + c)]; }
  T& operator[](Index i) { return data_[static_cast<std::size_t>(i)]; }
  const T& operator[](Index i) const { return data_[static_cast<std::size_t>(i)]; }

  [[nodiscard]] MatrixView<T> view() { return {data_.data(), rows_, cols_}; }
  [[nodiscard]] ConstMatrixView<T> view() const { return {data_.data(), rows_, cols_}; }
  [[nodiscard]] const std::vector<T>& values() const { return data_; }

 private:
  static void check_shape(Index rows, Index cols) {
    detail::require(rows >= 0 && cols >= 0, "HostMatrix: shape ", rows, " x ", cols,
                    " has a negative extent, expected rows >= 0 and cols >= 0");
  }

  std::vector<T> data_;
  Index rows_ = 0;
  Index cols_ = 0;
};

}  // namespace moe::backend
