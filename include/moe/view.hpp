#pragma once
// Views: a pointer, a shape and a row stride, the one currency every primitive takes.
// They never own memory. A CPU user can pass an Eigen row-major matrix, Map or Ref directly,
// and anyone the library's own matrices (HostMatrix, a backend's Buffer).

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

namespace moe {

using Index = std::int64_t;

namespace detail {
// Anything shaped like an Eigen dense row-major matrix: data(), rows(), cols(), outerStride().
// clang-format off
template <class M>
concept RowMajorDense = requires(M& m) {
  m.data();
  { m.rows() } -> std::convertible_to<Index>;
  { m.cols() } -> std::convertible_to<Index>;
  { m.outerStride() } -> std::convertible_to<Index>;
  requires static_cast<bool>(std::remove_cvref_t<M>::IsRowMajor);
};
// clang-format on
}  // namespace detail

// A row-major matrix view: element (r, c) lives at data[r * stride + c].
template <class T>
struct MatrixView {
  T* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index stride = 0;

  constexpr MatrixView() = default;
  constexpr MatrixView(T* d, Index r, Index c) : data(d), rows(r), cols(c), stride(c) {}
  constexpr MatrixView(T* d, Index r, Index c, Index s) : data(d), rows(r), cols(c), stride(s) {}

  // clang-format off
  // A view of non-const data converts to a view of const data.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr MatrixView(MatrixView<U> other)  // NOLINT(google-explicit-constructor)
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}

  // Wraps an Eigen row-major matrix, Map or Ref without a copy.
  template <detail::RowMajorDense M>
    requires std::is_convertible_v<decltype(std::declval<M&>().data()), T*>
  MatrixView(M& m)  // NOLINT(google-explicit-constructor)
      : data(m.data()), rows(m.rows()), cols(m.cols()), stride(m.cols() == 0 ? 0 : m.outerStride()) {}

  // Wraps the library's own matrices (backend::HostMatrix, a backend's Buffer): anything whose
  // view() is a view convertible to this one.
  template <class M>
    requires(!detail::RowMajorDense<M> && requires(M& m) {
      { m.view() } -> std::convertible_to<MatrixView>;
    })
  MatrixView(M& m) : MatrixView(static_cast<MatrixView>(m.view())) {}  // NOLINT(google-explicit-constructor)

  // Column-major Eigen storage is refused with a message rather than silently transposed.
  template <class M>
    requires(requires { std::remove_cvref_t<M>::IsRowMajor; } && !std::remove_cvref_t<M>::IsRowMajor &&
             std::remove_cvref_t<M>::ColsAtCompileTime != 1)
  MatrixView(M&) {  // NOLINT(google-explicit-constructor)
    static_assert(sizeof(M) == 0,
                  "moe::MatrixView wraps row-major memory only: use "
                  "Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> (or a Map/Ref of it)");
  }

  // clang-format on
  MOE_HD T& operator()(Index r, Index c) const { return data[r * stride + c]; }
  MOE_HD T* row(Index r) const { return data + r * stride; }
  [[nodiscard]] constexpr Index size() const { return rows * cols; }
  [[nodiscard]] constexpr bool empty() const { return rows == 0 || cols == 0; }
  [[nodiscard]] constexpr bool contiguous() const { return stride == cols || rows <= 1; }

  [[nodiscard]] constexpr MatrixView block_rows(Index first, Index count) const {
    return {data + first * stride, count, cols, stride};
  }
};

template <class T>
using ConstMatrixView = MatrixView<const T>;

}  // namespace moe
