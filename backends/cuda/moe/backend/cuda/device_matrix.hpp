#pragma once
// DeviceMatrix: the CUDA backend's owning buffer in device memory, row-major, contiguous; the
// device twin of HostMatrix without host element access. Storage only grows, so buffers reused
// across calls cost no allocation in steady state.

#if !defined(__CUDACC__)
#error "moe/backend/cuda/device_matrix.hpp is CUDA code: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "moe/backend/cuda/check.hpp"
#include "moe/backend/cuda/context.hpp"
#include "moe/error.hpp"
#include "moe/view.hpp"

namespace moe::backend {

namespace cuda::detail {

inline constexpr int kFillThreads = 256;

template <class T>
__global__ void fill_kernel(T* __restrict__ data, Index count, T value) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) data[i] = value;
}

// Blocks for a grid-stride loop over count elements: enough to fill the device, never more
// than one per kFillThreads elements.
[[nodiscard]] inline unsigned grid_stride_blocks(Index count) {
  constexpr Index kMaxBlocks = Index{1} << 16;
  return static_cast<unsigned>(std::min<Index>((count + kFillThreads - 1) / kFillThreads, kMaxBlocks));
}

// Sets count contiguous elements to value, ordered on ctx.stream() (does not wait).
template <class T>
void fill(const cuda::Context& ctx, T* data, Index count, T value) {
  if (count <= 0) return;
  fill_kernel<T><<<grid_stride_blocks(count), kFillThreads, 0, ctx.stream()>>>(data, count, value);
  MOE_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda::detail

template <class T>
class DeviceMatrix {
 public:
  using value_type = T;

  DeviceMatrix() = default;
  // Like HostMatrix, a new matrix holds value everywhere (zeros by default); the fill is ordered
  // on the library stream.
  DeviceMatrix(Index rows, Index cols, T value = T{}) { resize(rows, cols, value); }

  // Copies are device-to-device on the library stream, finished before the constructor returns.
  DeviceMatrix(const DeviceMatrix& other) { copy_from(other); }
  DeviceMatrix& operator=(const DeviceMatrix& other) {
    if (this != &other) copy_from(other);
    return *this;
  }

  // A moved-from matrix is empty (0 x 0) and owns nothing.
  DeviceMatrix(DeviceMatrix&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        capacity_(std::exchange(other.capacity_, 0)),
        rows_(std::exchange(other.rows_, 0)),
        cols_(std::exchange(other.cols_, 0)) {}
  DeviceMatrix& operator=(DeviceMatrix&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      capacity_ = std::exchange(other.capacity_, 0);
      rows_ = std::exchange(other.rows_, 0);
      cols_ = std::exchange(other.cols_, 0);
    }
    return *this;
  }

  ~DeviceMatrix() { release(); }

  // Resizes to rows x cols, keeping the allocation when it is large enough: buffers reused
  // across calls cost no allocation in steady state. Contents are unspecified afterwards (with
  // MOE_POISON_BUFFERS defined, NaN bytes for floating point and 0x7F bytes for integers, as
  // for HostMatrix).
  void resize(Index rows, Index cols) {
    check_shape(rows, cols);
    reserve(rows * cols);
    rows_ = rows;
    cols_ = cols;
#if defined(MOE_POISON_BUFFERS)
    if (size() > 0)
      MOE_CUDA_CHECK(cudaMemsetAsync(data_, std::is_integral_v<T> ? 0x7F : 0xFF, static_cast<std::size_t>(size()) * sizeof(T),
                                     cuda::Context{}.stream()));
#endif
  }

  // Resizes to rows x cols with every element set to value (a kernel on the library stream).
  void resize(Index rows, Index cols, T value) {
    resize(rows, cols);
    cuda::detail::fill(cuda::Context{}, data_, size(), value);
  }

  [[nodiscard]] Index rows() const { return rows_; }
  [[nodiscard]] Index cols() const { return cols_; }
  [[nodiscard]] Index size() const { return rows_ * cols_; }
  // Elements the current allocation holds (>= size()).
  [[nodiscard]] Index capacity() const { return capacity_; }
  // Device pointers: never dereference them on the host.
  [[nodiscard]] T* data() { return data_; }
  [[nodiscard]] const T* data() const { return data_; }

  [[nodiscard]] MatrixView<T> view() { return {data_, rows_, cols_}; }
  [[nodiscard]] ConstMatrixView<T> view() const { return {data_, rows_, cols_}; }

 private:
  static void check_shape(Index rows, Index cols) {
    ::moe::detail::require(rows >= 0 && cols >= 0, "DeviceMatrix: shape ", rows, " x ", cols,
                           " has a negative extent, expected rows >= 0 and cols >= 0");
    constexpr Index kMaxElements = std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T));
    ::moe::detail::require(cols == 0 || rows <= kMaxElements / cols, "DeviceMatrix: shape ", rows, " x ", cols,
                           " is too large to address");
  }

  // Makes room for count elements; grows only. Zero elements never call the allocator.
  void reserve(Index count) {
    if (count <= capacity_) return;
    // Free first so that growing never holds both buffers. Until the new allocation succeeds
    // the matrix is 0 x 0 with no storage, so a throw leaves it consistent.
    T* old = std::exchange(data_, nullptr);
    capacity_ = 0;
    rows_ = 0;
    cols_ = 0;
    if (old != nullptr) MOE_CUDA_CHECK(cudaFree(old));  // waits for pending work using it
    void* fresh = nullptr;
    MOE_CUDA_CHECK(cudaMalloc(&fresh, static_cast<std::size_t>(count) * sizeof(T)));
    data_ = static_cast<T*>(fresh);
    capacity_ = count;
  }

  void copy_from(const DeviceMatrix& other) {
    resize(other.rows_, other.cols_);
    if (size() == 0) return;
    const cuda::Context ctx;
    MOE_CUDA_CHECK(cudaMemcpyAsync(data_, other.data_, static_cast<std::size_t>(size()) * sizeof(T),
                                   cudaMemcpyDeviceToDevice, ctx.stream()));
    ctx.synchronize();
  }

  // Never throws: a failing cudaFree (e.g. during process teardown) is ignored.
  void release() noexcept {
    if (data_ != nullptr) {
      if (cudaFree(data_) != cudaSuccess) static_cast<void>(cudaGetLastError());
    }
    data_ = nullptr;
    capacity_ = 0;
    rows_ = 0;
    cols_ = 0;
  }

  T* data_ = nullptr;
  Index capacity_ = 0;
  Index rows_ = 0;
  Index cols_ = 0;
};

namespace cuda {
using ::moe::backend::DeviceMatrix;
}  // namespace cuda

}  // namespace moe::backend
