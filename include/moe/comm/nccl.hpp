#pragma once
// moe::comm::Nccl: the Communicator over NCCL, for device memory (the CUDA backend).
//
// Memory: every buffer a collective takes is device memory on the communicator's device
// (cudaMalloc, or managed memory); counts, scalars and all_to_all_v's count arrays are host
// values. A host pointer or a buffer on another device is refused with moe::Error before
// anything is posted.
//
// Stream: all work is ordered on NcclOptions::stream, by default cudaStreamPerThread, the stream
// the CUDA backend orders its own work on (moe/backend/cuda/context.hpp), so a collective sees
// what the backend wrote before it and the backend sees what the collective wrote. That handle
// names the calling thread's stream: use a communicator from one thread at a time, the thread
// that runs the layer. Do not call a collective inside an ncclGroupStart/ncclGroupEnd of your own.
//
// Completion, timeout and abort: the communicator is non-blocking (ncclConfig_t::blocking = 0),
// and every call (construction included) returns only when its work is complete, as the
// Communicator concept asks: it polls ncclCommGetAsyncError and cudaStreamQuery, sleeping briefly
// between polls. When NCCL reports an error, when the stream fails, or when timeout_seconds pass
// without completion (a peer stopped, failed, or did not make the same calls in the same order),
// the NCCL communicator is aborted (ncclCommAbort) and the call throws moe::Error naming the
// call, the rank, the size and the timeout. An aborted communicator refuses every later call
// with moe::Error; build a new one (with a new unique id) to continue. A refused argument (a
// negative count, a bad root, unequal own counts) throws before anything is posted and leaves
// the communicator usable.
//
// Launch: one process (or one thread) per GPU. Call cudaSetDevice before constructing; the
// communicator belongs to the device current then, and every call checks that the same device
// is current. Every rank constructs its Nccl from the same ncclUniqueId, made once by one rank
// (nccl_unique_id() below) and passed to the others by any means: moe/comm/nccl_mpi.hpp does it
// over MPI.
//
// Link: moe-nccl (pkg-config), Meson's moe_nccl_dep or CMake's moe::nccl (nccl.h's directory,
// -lnccl and -lcudart).
// The header has no device code and compiles with any C++20 compiler.

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include "moe/communicator.hpp"
#include "moe/error.hpp"

namespace moe::comm {

struct NcclOptions {
  // How long a call (or the construction) may wait for its peers before the communicator is
  // aborted. > 0; infinity waits forever.
  double timeout_seconds = 600;
  // The stream all work is ordered on.
  cudaStream_t stream = cudaStreamPerThread;
};

namespace nccl_detail {

[[nodiscard]] inline const char* result_name(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "ncclSuccess";
    case ncclUnhandledCudaError:
      return "ncclUnhandledCudaError";
    case ncclSystemError:
      return "ncclSystemError";
    case ncclInternalError:
      return "ncclInternalError";
    case ncclInvalidArgument:
      return "ncclInvalidArgument";
    case ncclInvalidUsage:
      return "ncclInvalidUsage";
    case ncclRemoteError:
      return "ncclRemoteError";
    case ncclInProgress:
      return "ncclInProgress";
    default:
      return "an unknown ncclResult_t";
  }
}

// "ncclInvalidArgument (invalid argument)", with NCCL's last message about comm when it has one.
[[nodiscard]] inline std::string describe(ncclResult_t result, ncclComm_t comm) {
  std::string text = detail::concat(result_name(result), " (", ncclGetErrorString(result), ")");
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && last[0] != '\0') text += detail::concat("; NCCL's last message: ", last);
  }
  return text;
}

[[nodiscard]] inline std::string describe(cudaError_t status) {
  return detail::concat(cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

}  // namespace nccl_detail

// A new unique id, for the one rank that makes it (the others receive a copy). Also the whole
// bootstrap when every rank is a thread of this process.
[[nodiscard]] inline ncclUniqueId nccl_unique_id() {
  ncclUniqueId id{};
  const ncclResult_t result = ncclGetUniqueId(&id);
  detail::require(result == ncclSuccess,
                  "comm::nccl_unique_id: ncclGetUniqueId failed: ", nccl_detail::describe(result, nullptr),
                  ", expected a new unique id");
  return id;
}

class Nccl {
 public:
  using Options = NcclOptions;

  // Rank rank of size ranks, on the current CUDA device. Returns when every rank has joined
  // (or throws after options.timeout_seconds).
  Nccl(const ncclUniqueId& id, int rank, int size, Options options = {}) : options_(options), rank_(rank), size_(size) {
    detail::require(size >= 1, "comm::Nccl: size = ", size, ", expected size >= 1");
    detail::require(rank >= 0 && rank < size, "comm::Nccl: rank = ", rank, ", expected 0 <= rank < size = ", size);
    detail::require(options.timeout_seconds > 0, "comm::Nccl on rank ", rank, " of ", size,
                    ": timeout_seconds = ", options.timeout_seconds, ", expected > 0 (infinity waits forever)");
    const cudaError_t device_status = cudaGetDevice(&device_);
    if (device_status != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      detail::fail("comm::Nccl on rank ", rank, " of ", size,
                   ": cudaGetDevice failed: ", nccl_detail::describe(device_status),
                   ", expected a CUDA device (cudaSetDevice before construction)");
    }
    try {
      // Device scratch: size int64 slots for exclusive_scan's all-gather, then one that stays 0
      // for barrier's all-reduce. Host scratch (pinned): exclusive_scan's values.
      const auto slots = static_cast<std::size_t>(size) + 1;
      check_cuda(cudaMalloc(reinterpret_cast<void**>(&device_scratch_), slots * sizeof(std::int64_t)), "Nccl",
                 "cudaMalloc");
      check_cuda(cudaMallocHost(reinterpret_cast<void**>(&host_scratch_), slots * sizeof(std::int64_t)), "Nccl",
                 "cudaMallocHost");
      check_cuda(cudaMemsetAsync(device_scratch_, 0, slots * sizeof(std::int64_t), options_.stream), "Nccl",
                 "cudaMemsetAsync");
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      const Clock::time_point start = Clock::now();
      const ncclResult_t result = ncclCommInitRankConfig(&comm_, size, id, rank, &config);
      if (result != ncclSuccess && result != ncclInProgress) {
        const std::string text = nccl_detail::describe(result, comm_);
        abandon();
        detail::fail("comm::Nccl on rank ", rank, " of ", size, ": ncclCommInitRankConfig failed: ", text);
      }
      for (;;) {
        const ncclResult_t state = comm_state("Nccl");
        if (state == ncclSuccess) break;
        if (state != ncclInProgress) {
          const std::string text = nccl_detail::describe(state, comm_);
          abandon();
          detail::fail("comm::Nccl on rank ", rank, " of ", size, ": ncclCommInitRankConfig failed: ", text);
        }
        if (expired(start)) {
          abandon();
          detail::fail("comm::Nccl on rank ", rank, " of ", size, ": ncclCommInitRankConfig not complete after ",
                       "timeout_seconds = ", options_.timeout_seconds,
                       " s: a peer stopped or failed, or the ranks were not all given the same unique id and size");
        }
        pause(start);
      }
    } catch (...) {
      release();
      throw;
    }
  }

  Nccl(const Nccl&) = delete;
  Nccl& operator=(const Nccl&) = delete;
  Nccl(Nccl&& other) noexcept { swap(other); }
  Nccl& operator=(Nccl&& other) noexcept {
    swap(other);  // other takes this one's communicator and frees it when it goes
    return *this;
  }
  ~Nccl() { release(); }

  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int size() const { return size_; }
  // The NCCL communicator; null after an abort or a move.
  [[nodiscard]] ncclComm_t native() const { return comm_; }
  [[nodiscard]] const Options& options() const { return options_; }
  // The CUDA device the communicator was built on.
  [[nodiscard]] int device() const { return device_; }
  // Whether a failure or a timeout aborted the communicator (every call then throws).
  [[nodiscard]] bool broken() const { return broken_; }

  // In place: data[i] = the sum over ranks of data[i], the same bits on every rank.
  void all_reduce_sum(double* data, Index count) { all_reduce(data, count, ncclDouble); }
  void all_reduce_sum(float* data, Index count) { all_reduce(data, count, ncclFloat); }
  void all_reduce_sum(std::int64_t* data, Index count) { all_reduce(data, count, ncclInt64); }

  // send_counts[r] bytes to rank r (packed in rank order in send), recv_counts[r] bytes from
  // rank r (packed in rank order in recv). What rank a sends to b, b must expect from a.
  void all_to_all_v(const std::byte* send, const Index* send_counts, std::byte* recv, const Index* recv_counts) {
    static constexpr const char* call = "all_to_all_v";
    usable(call);
    Index send_total = 0, recv_total = 0;
    for (int r = 0; r < size_; ++r) {
      detail::require(send_counts[r] >= 0 && recv_counts[r] >= 0, where(call), ": counts for rank ", r, " are ",
                      send_counts[r], " to send and ", recv_counts[r], " to receive, expected both >= 0");
      send_total += send_counts[r];
      recv_total += recv_counts[r];
    }
    detail::require((send != nullptr || send_total == 0) && (recv != nullptr || recv_total == 0), where(call),
                    ": a null buffer for ", send_total, " bytes to send and ", recv_total, " to receive");
    detail::require(send_counts[rank_] == recv_counts[rank_], where(call), ": sending ", send_counts[rank_],
                    " bytes to itself but receiving ", recv_counts[rank_], ", expected equal counts");
    require_device_memory(call, "send", send, send_total);
    require_device_memory(call, "recv", recv, recv_total);
    const Clock::time_point start = Clock::now();
    // What a rank sends itself is copied on the stream, before the group: nothing is posted to
    // NCCL if the copy is refused.
    Index send_offset = 0, recv_offset = 0;
    for (int r = 0; r < rank_; ++r) {
      send_offset += send_counts[r];
      recv_offset += recv_counts[r];
    }
    const Index self = send_counts[rank_];
    if (self > 0 && send + send_offset != recv + recv_offset)
      check_cuda(cudaMemcpyAsync(recv + recv_offset, send + send_offset, static_cast<std::size_t>(self),
                                 cudaMemcpyDeviceToDevice, options_.stream),
                 call, "cudaMemcpyAsync");
    if (send_total - self > 0 || recv_total - self > 0) {
      ncclResult_t result = ncclGroupStart();
      if (result != ncclSuccess) abort_with(call, "ncclGroupStart", result);
      const char* failed = nullptr;
      ncclResult_t failure = ncclSuccess;
      send_offset = recv_offset = 0;
      for (int r = 0; r < size_; ++r) {
        if (r != rank_ && failed == nullptr) {
          // Within a group, posts are queued: a non-blocking communicator answers ncclSuccess here
          // and reports progress after ncclGroupEnd.
          if (send_counts[r] > 0) {
            result = ncclSend(send + send_offset, static_cast<std::size_t>(send_counts[r]), ncclUint8, r, comm_,
                              options_.stream);
            if (result != ncclSuccess && result != ncclInProgress) {
              failed = "ncclSend";
              failure = result;
            }
          }
          if (recv_counts[r] > 0 && failed == nullptr) {
            result = ncclRecv(recv + recv_offset, static_cast<std::size_t>(recv_counts[r]), ncclUint8, r, comm_,
                              options_.stream);
            if (result != ncclSuccess && result != ncclInProgress) {
              failed = "ncclRecv";
              failure = result;
            }
          }
        }
        send_offset += send_counts[r];
        recv_offset += recv_counts[r];
      }
      // The group is closed even after a failed post, so that this thread's next NCCL call is
      // not taken into it.
      result = ncclGroupEnd();
      if (failed != nullptr) abort_with(call, failed, failure);
      if (result != ncclSuccess && result != ncclInProgress) abort_with(call, "ncclGroupEnd", result);
    }
    complete(call, start);
  }

  // bytes bytes from every rank; recv holds size() * bytes, in rank order.
  void all_gather(const std::byte* send, Index bytes, std::byte* recv) {
    static constexpr const char* call = "all_gather";
    usable(call);
    detail::require(bytes >= 0 && ((send != nullptr && recv != nullptr) || bytes == 0), where(call),
                    ": bytes = ", bytes, ", expected >= 0 with a send and a recv buffer");
    if (bytes == 0) return;
    require_device_memory(call, "send", send, bytes);
    require_device_memory(call, "recv", recv, bytes * size_);
    const Clock::time_point start = Clock::now();
    posted(call, "ncclAllGather",
           ncclAllGather(send, recv, static_cast<std::size_t>(bytes), ncclUint8, comm_, options_.stream));
    complete(call, start);
  }

  // The sum of value over the ranks below this one (0 on rank 0): a rank's first global token
  // index when value is its batch size.
  [[nodiscard]] std::int64_t exclusive_scan(std::int64_t value) {
    static constexpr const char* call = "exclusive_scan";
    usable(call);
    const Clock::time_point start = Clock::now();
    host_scratch_[rank_] = value;
    check_cuda(cudaMemcpyAsync(device_scratch_ + rank_, host_scratch_ + rank_, sizeof(std::int64_t),
                               cudaMemcpyHostToDevice, options_.stream),
               call, "cudaMemcpyAsync");
    // In place: rank r's value lands in slot r.
    posted(call, "ncclAllGather",
           ncclAllGather(device_scratch_ + rank_, device_scratch_, 1, ncclInt64, comm_, options_.stream));
    complete(call, start);
    // NCCL is idle again: copying the values back can fail without leaving anything in flight.
    check_cuda(cudaMemcpyAsync(host_scratch_, device_scratch_, static_cast<std::size_t>(size_) * sizeof(std::int64_t),
                               cudaMemcpyDeviceToHost, options_.stream),
               call, "cudaMemcpyAsync");
    complete(call, start);
    std::int64_t sum = 0;
    for (int r = 0; r < rank_; ++r) sum += host_scratch_[r];
    return sum;
  }

  // bytes bytes of data from rank root to every rank.
  void broadcast(std::byte* data, Index bytes, int root) {
    static constexpr const char* call = "broadcast";
    usable(call);
    detail::require(root >= 0 && root < size_, where(call), ": root = ", root, ", expected 0 <= root < ", size_);
    detail::require(bytes >= 0 && (data != nullptr || bytes == 0), where(call), ": bytes = ", bytes,
                    ", expected >= 0 with a buffer");
    if (bytes == 0) return;
    require_device_memory(call, "data", data, bytes);
    const Clock::time_point start = Clock::now();
    posted(call, "ncclBroadcast",
           ncclBroadcast(data, data, static_cast<std::size_t>(bytes), ncclUint8, root, comm_, options_.stream));
    complete(call, start);
  }

  // Returns when every rank has called barrier (an all-reduce of one zero in device scratch).
  void barrier() {
    static constexpr const char* call = "barrier";
    usable(call);
    const Clock::time_point start = Clock::now();
    std::int64_t* zero = device_scratch_ + size_;
    posted(call, "ncclAllReduce", ncclAllReduce(zero, zero, 1, ncclInt64, ncclSum, comm_, options_.stream));
    complete(call, start);
  }

 private:
  using Clock = std::chrono::steady_clock;

  template <class T>
  void all_reduce(T* data, Index count, ncclDataType_t type) {
    static constexpr const char* call = "all_reduce_sum";
    usable(call);
    detail::require(count >= 0 && (data != nullptr || count == 0), where(call), ": count = ", count,
                    ", expected >= 0 with a buffer");
    if (count == 0) return;
    require_device_memory(call, "data", data, count * static_cast<Index>(sizeof(T)));
    const Clock::time_point start = Clock::now();
    posted(call, "ncclAllReduce",
           ncclAllReduce(data, data, static_cast<std::size_t>(count), type, ncclSum, comm_, options_.stream));
    complete(call, start);
  }

  // "comm::Nccl::barrier on rank 1 of 4"; "comm::Nccl on rank 1 of 4" for the constructor ("Nccl").
  [[nodiscard]] std::string where(const char* call) const {
    const bool constructor = std::string_view(call) == "Nccl";
    return detail::concat("comm::Nccl", constructor ? "" : "::", constructor ? "" : call, " on rank ", rank_, " of ",
                          size_);
  }

  // A call may proceed: the communicator is neither moved from nor aborted, and its device is current.
  void usable(const char* call) const {
    detail::require(!broken_, where(call), ": the communicator was aborted after an earlier failure (", failure_,
                    "), expected a working one: build a new comm::Nccl");
    detail::require(comm_ != nullptr, where(call), ": the communicator was moved from, expected a constructed one");
    int current = -1;
    const cudaError_t status = cudaGetDevice(&current);
    if (status != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      detail::fail(where(call), ": cudaGetDevice failed: ", nccl_detail::describe(status));
    }
    detail::require(current == device_, where(call), ": the current CUDA device is ", current, ", expected device ",
                    device_, ", the one the communicator was built on");
  }

  // A buffer of bytes bytes is device memory on the communicator's device (managed memory too).
  void require_device_memory(const char* call, const char* name, const void* data, Index bytes) const {
    if (bytes == 0) return;
    cudaPointerAttributes attributes{};
    const cudaError_t status = cudaPointerGetAttributes(&attributes, data);
    if (status != cudaSuccess) {
      static_cast<void>(cudaGetLastError());
      detail::fail(where(call), ": cudaPointerGetAttributes on ", name, " failed: ", nccl_detail::describe(status));
    }
    const char* kind = attributes.type == cudaMemoryTypeHost           ? "pinned host memory"
                       : attributes.type == cudaMemoryTypeUnregistered ? "host memory"
                                                                       : nullptr;
    detail::require(kind == nullptr, where(call), ": ", name, " (", bytes, " bytes at ", data, ") is ", kind,
                    ", expected device memory on device ", device_);
    detail::require(attributes.type == cudaMemoryTypeManaged || attributes.device == device_, where(call), ": ", name,
                    " (", bytes, " bytes at ", data, ") is on device ", attributes.device, ", expected device ",
                    device_, ", the communicator's");
  }

  // A CUDA call made while NCCL has nothing in flight: its failure is only thrown.
  void check_cuda(cudaError_t status, const char* call, const char* cuda_call) const {
    if (status == cudaSuccess) return;
    static_cast<void>(cudaGetLastError());  // a failure that is not sticky is not reported again
    detail::fail(where(call), ": ", cuda_call, " failed: ", nccl_detail::describe(status));
  }

  // The answer of an NCCL call that posts work: ncclInProgress is expected of a non-blocking
  // communicator; anything else but ncclSuccess aborts.
  void posted(const char* call, const char* nccl_call, ncclResult_t result) {
    if (result != ncclSuccess && result != ncclInProgress) abort_with(call, nccl_call, result);
  }

  // The communicator's state: ncclSuccess, ncclInProgress (NCCL still posting) or an error.
  [[nodiscard]] ncclResult_t comm_state(const char* call) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = ncclCommGetAsyncError(comm_, &state);
    if (result != ncclSuccess) abort_with(call, "ncclCommGetAsyncError", result);
    return state;
  }

  // Waits until what was posted is complete: NCCL has put it on the stream (a non-blocking
  // communicator may still be doing that after the call returned; until then the stream may
  // look idle) and the stream has run it.
  void complete(const char* call, Clock::time_point start) {
    for (;;) {
      const ncclResult_t state = comm_state(call);
      if (state != ncclSuccess && state != ncclInProgress) abort_with(call, "NCCL (asynchronous error)", state);
      if (state == ncclSuccess) {
        const cudaError_t status = cudaStreamQuery(options_.stream);
        if (status == cudaSuccess) return;
        if (status != cudaErrorNotReady) {
          static_cast<void>(cudaGetLastError());
          abort_because(call, detail::concat("cudaStreamQuery failed: ", nccl_detail::describe(status)));
        }
      }
      if (expired(start))
        abort_because(call, detail::concat("not complete after timeout_seconds = ", options_.timeout_seconds,
                                           " s: a peer stopped or failed, or the ranks did not all make the same ",
                                           "calls in the same order"));
      pause(start);
    }
  }

  [[nodiscard]] bool expired(Clock::time_point start) const {
    return std::chrono::duration<double>(Clock::now() - start).count() > options_.timeout_seconds;
  }

  // Between polls: yield for the first millisecond (short collectives), then sleep 50 us.
  static void pause(Clock::time_point start) {
    if (Clock::now() - start < std::chrono::milliseconds(1))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  [[noreturn]] void abort_with(const char* call, const char* nccl_call, ncclResult_t result) {
    abort_because(call, detail::concat(nccl_call, " failed: ", nccl_detail::describe(result, comm_)));
  }

  // Aborts the NCCL communicator, marks this one broken and throws.
  [[noreturn]] void abort_because(const char* call, const std::string& reason) {
    abandon();
    failure_ = detail::concat("in ", call, ": ", reason);
    detail::fail(where(call), ": ", reason, "; the communicator was aborted and refuses further calls");
  }

  void abandon() noexcept {
    if (comm_ != nullptr) static_cast<void>(ncclCommAbort(comm_));  // ncclCommAbort frees the communicator
    comm_ = nullptr;
    broken_ = true;
  }

  // Frees everything, never throwing: a healthy communicator is finalized (flushed, waiting at most
  // timeout_seconds) and destroyed, one that fails to finalize is aborted.
  void release() noexcept {
    if (comm_ != nullptr) {
      ncclResult_t result = ncclCommFinalize(comm_);
      const Clock::time_point start = Clock::now();
      while (result == ncclInProgress) {
        ncclResult_t state = ncclSuccess;
        result = ncclCommGetAsyncError(comm_, &state);
        if (result == ncclSuccess) result = state;
        if (result == ncclInProgress && expired(start)) break;
        if (result == ncclInProgress) pause(start);
      }
      if (result == ncclSuccess)
        static_cast<void>(ncclCommDestroy(comm_));
      else
        static_cast<void>(ncclCommAbort(comm_));
      comm_ = nullptr;
    }
    const bool freed = (device_scratch_ == nullptr || cudaFree(device_scratch_) == cudaSuccess) &&
                       (host_scratch_ == nullptr || cudaFreeHost(host_scratch_) == cudaSuccess);
    if (!freed) static_cast<void>(cudaGetLastError());  // e.g. the runtime already shutting down
    device_scratch_ = nullptr;
    host_scratch_ = nullptr;
  }

  void swap(Nccl& other) noexcept {
    std::swap(options_, other.options_);
    std::swap(comm_, other.comm_);
    std::swap(rank_, other.rank_);
    std::swap(size_, other.size_);
    std::swap(device_, other.device_);
    std::swap(device_scratch_, other.device_scratch_);
    std::swap(host_scratch_, other.host_scratch_);
    std::swap(broken_, other.broken_);
    std::swap(failure_, other.failure_);
  }

  Options options_;
  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  int device_ = -1;
  std::int64_t* device_scratch_ = nullptr;
  std::int64_t* host_scratch_ = nullptr;
  bool broken_ = false;
  std::string failure_;
};

static_assert(Communicator<Nccl>);

}  // namespace moe::comm
