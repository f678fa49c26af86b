#pragma once
// moe::comm::Mpi: the Communicator over MPI, for host memory (the CPU backend). It works on its
// own duplicate of the communicator it is given, with MPI_ERRORS_RETURN as that duplicate's
// error handler, so an MPI failure becomes a moe::Error naming the call and the rank instead of
// the default abort. Messages of any size: counts are 64-bit, and a transfer larger than
// Options::max_message_bytes (2^30 by default, below MPI's int counts) is split into several
// messages, so more than 2^31 bytes travel with an MPI that has no large-count calls (OpenMPI 4).
//
// Every call waits at most Options::timeout_seconds for its peers: a rank that failed, or stopped
// making the same calls, ends the others' calls with a moe::Error instead of a hang. After a
// timeout the communicator is broken (messages may be left in flight) and refuses every call.
// Sums are reduced to rank 0 and broadcast, so every rank holds the same bits.
//
// MPI must be initialized (MPI_Init or MPI_Init_thread) before a comm::Mpi is built, and stay
// initialized until it is destroyed. Every rank must make the same collective calls in the same
// order, as with MPI itself. Link with moe-mpi (pkg-config) or moe::moe with the mpi component.

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "moe/communicator.hpp"
#include "moe/error.hpp"

namespace moe::comm {

struct MpiOptions {
  // The largest single message; larger transfers are split. At most INT_MAX (MPI counts are
  // int). Smaller values only cost messages (tests use them to exercise the splitting).
  Index max_message_bytes = Index{1} << 30;
  // How long a call waits for its peers before it fails (seconds, > 0).
  double timeout_seconds = 600;
};

class Mpi {
 public:
  using Options = MpiOptions;

  explicit Mpi(MPI_Comm comm = MPI_COMM_WORLD, Options options = {}) : options_(options) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    detail::require(initialized != 0 && finalized == 0,
                    "comm::Mpi: MPI is not initialized (or already finalized), expected MPI_Init before "
                    "building a comm::Mpi");
    detail::require(options.max_message_bytes >= 1 && options.max_message_bytes <= INT_MAX,
                    "comm::Mpi: max_message_bytes = ", options.max_message_bytes, ", expected 1 <= max_message_bytes <= ",
                    INT_MAX);
    detail::require(options.timeout_seconds > 0, "comm::Mpi: timeout_seconds = ", options.timeout_seconds,
                    ", expected > 0");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  // A copy duplicates the MPI communicator: a collective call on every rank (MPI_Comm_dup).
  Mpi(const Mpi& other) : options_(other.options_), rank_(other.rank_), size_(other.size_), broken_(other.broken_) {
    if (other.comm_ != MPI_COMM_NULL && !broken_) check(MPI_Comm_dup(other.comm_, &comm_), "MPI_Comm_dup");
  }
  Mpi& operator=(const Mpi& other) {
    if (this != &other) {
      Mpi copy(other);
      swap(copy);
    }
    return *this;
  }
  Mpi(Mpi&& other) noexcept
      : options_(other.options_),
        comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        rank_(other.rank_),
        size_(other.size_),
        broken_(other.broken_) {}
  Mpi& operator=(Mpi&& other) noexcept {
    swap(other);
    return *this;
  }
  ~Mpi() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // A broken communicator may have messages in flight: it is left to MPI_Finalize.
    if (comm_ != MPI_COMM_NULL && finalized == 0 && !broken_) static_cast<void>(MPI_Comm_free(&comm_));
  }

  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int size() const { return size_; }
  [[nodiscard]] MPI_Comm native() const { return comm_; }
  [[nodiscard]] const Options& options() const { return options_; }
  // True after a call timed out: every later call throws.
  [[nodiscard]] bool broken() const { return broken_; }

  // In place: data[i] = the sum over ranks of data[i], the same bits on every rank.
  void all_reduce_sum(double* data, Index count) { all_reduce(data, count, MPI_DOUBLE, "all_reduce_sum"); }
  void all_reduce_sum(float* data, Index count) { all_reduce(data, count, MPI_FLOAT, "all_reduce_sum"); }
  void all_reduce_sum(std::int64_t* data, Index count) { all_reduce(data, count, MPI_INT64_T, "all_reduce_sum"); }

  // send_counts[r] bytes to rank r (packed in rank order in send), recv_counts[r] bytes from
  // rank r (packed in rank order in recv). What rank a sends to b, b must expect from a.
  void all_to_all_v(const std::byte* send, const Index* send_counts, std::byte* recv, const Index* recv_counts) {
    require_healthy("all_to_all_v");
    Index send_total = 0, recv_total = 0;
    for (int r = 0; r < size_; ++r) {
      detail::require(send_counts[r] >= 0 && recv_counts[r] >= 0, "comm::Mpi::all_to_all_v on rank ", rank_,
                      ": counts for rank ", r, " are ", send_counts[r], " to send and ", recv_counts[r],
                      " to receive, expected both >= 0");
      send_total += send_counts[r];
      recv_total += recv_counts[r];
    }
    detail::require((send != nullptr || send_total == 0) && (recv != nullptr || recv_total == 0),
                    "comm::Mpi::all_to_all_v on rank ", rank_, ": a null buffer for ", send_total, " bytes to send and ",
                    recv_total, " to receive");
    // Checked before anything is posted, so that a refusal leaves no message in flight.
    detail::require(send_counts[rank_] == recv_counts[rank_], "comm::Mpi::all_to_all_v on rank ", rank_, ": sending ",
                    send_counts[rank_], " bytes to itself but receiving ", recv_counts[rank_], ", expected equal counts");
    std::vector<MPI_Request> requests;
    const auto post = [&](std::byte* data, Index bytes, int peer, bool receive) {
      post_split(requests, data, bytes, peer, receive);
    };
    // Receives first, then sends; messages between two ranks with one tag arrive in order, so
    // the pieces of a split transfer land where they belong.
    Index offset = 0;
    for (int r = 0; r < size_; ++r) {
      if (r != rank_) post(recv + offset, recv_counts[r], r, true);
      offset += recv_counts[r];
    }
    offset = 0;
    Index self_offset = 0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_)
        self_offset = offset;
      else
        post(const_cast<std::byte*>(send + offset), send_counts[r], r, false);  // MPI 3 takes const void*; 2.x not
      offset += send_counts[r];
    }
    // What a rank sends itself is copied.
    Index recv_self = 0;
    for (int r = 0; r < rank_; ++r) recv_self += recv_counts[r];
    if (send_counts[rank_] > 0) std::copy_n(send + self_offset, send_counts[rank_], recv + recv_self);
    wait_all(requests, "all_to_all_v");
  }

  // bytes from every rank: recv holds size() blocks of bytes, in rank order (recv may not
  // overlap send).
  void all_gather(const std::byte* send, Index bytes, std::byte* recv) {
    require_healthy("all_gather");
    detail::require(bytes >= 0 && ((send != nullptr && recv != nullptr) || bytes == 0), "comm::Mpi::all_gather on rank ",
                    rank_, ": bytes = ", bytes, ", expected >= 0 with both buffers");
    std::vector<MPI_Request> requests;
    for (int r = 0; r < size_; ++r)
      if (r != rank_) post_split(requests, recv + r * bytes, bytes, r, true);
    for (int r = 0; r < size_; ++r)
      if (r != rank_) post_split(requests, const_cast<std::byte*>(send), bytes, r, false);
    if (bytes > 0) std::copy_n(send, bytes, recv + rank_ * bytes);
    wait_all(requests, "all_gather");
  }

  // The sum of value over the ranks below this one (0 on rank 0): a rank's first global token
  // index when value is its batch size.
  [[nodiscard]] std::int64_t exclusive_scan(std::int64_t value) {
    require_healthy("exclusive_scan");
    std::int64_t out = 0;
    MPI_Request request = MPI_REQUEST_NULL;
    check(MPI_Iexscan(&value, &out, 1, MPI_INT64_T, MPI_SUM, comm_, &request), "MPI_Iexscan");
    wait_one(request, "MPI_Iexscan");
    return rank_ == 0 ? 0 : out;  // MPI leaves rank 0's result undefined
  }

  // bytes bytes of data from rank root to every rank.
  void broadcast(std::byte* data, Index bytes, int root) {
    require_healthy("broadcast");
    detail::require(root >= 0 && root < size_, "comm::Mpi::broadcast on rank ", rank_, ": root = ", root,
                    ", expected 0 <= root < ", size_);
    for (Index done = 0; done < bytes;) {
      const Index part = std::min(bytes - done, options_.max_message_bytes);
      MPI_Request request = MPI_REQUEST_NULL;
      check(MPI_Ibcast(data + done, static_cast<int>(part), MPI_BYTE, root, comm_, &request), "MPI_Ibcast");
      wait_one(request, "MPI_Ibcast");
      done += part;
    }
  }

  void barrier() {
    require_healthy("barrier");
    MPI_Request request = MPI_REQUEST_NULL;
    check(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
    wait_one(request, "MPI_Ibarrier");
  }

 private:
  static constexpr int kTag = 0x6d6f65;  // "moe"

  // Messages of at most max_message_bytes, posted in order (one tag: they arrive in order).
  void post_split(std::vector<MPI_Request>& requests, std::byte* data, Index bytes, int peer, bool receive) {
    for (Index done = 0; done < bytes;) {
      const Index part = std::min(bytes - done, options_.max_message_bytes);
      MPI_Request request = MPI_REQUEST_NULL;
      if (receive)
        check(MPI_Irecv(data + done, static_cast<int>(part), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Irecv");
      else
        check(MPI_Isend(data + done, static_cast<int>(part), MPI_BYTE, peer, kTag, comm_, &request), "MPI_Isend");
      requests.push_back(request);
      done += part;
    }
  }

  // Reduced onto rank 0, then broadcast: every rank ends with rank 0's bits (MPI_Allreduce does
  // not promise the same bits everywhere).
  template <class T>
  void all_reduce(T* data, Index count, MPI_Datatype type, const char* what) {
    require_healthy(what);
    detail::require(count >= 0 && (data != nullptr || count == 0), "comm::Mpi::", what, " on rank ", rank_,
                    ": count = ", count, ", expected >= 0 with a buffer");
    const Index per_message = std::max<Index>(1, options_.max_message_bytes / static_cast<Index>(sizeof(T)));
    for (Index done = 0; done < count;) {
      const Index part = std::min(count - done, per_message);
      const int n = static_cast<int>(part);
      MPI_Request request = MPI_REQUEST_NULL;
      if (rank_ == 0)
        check(MPI_Ireduce(MPI_IN_PLACE, data + done, n, type, MPI_SUM, 0, comm_, &request), "MPI_Ireduce");
      else
        check(MPI_Ireduce(data + done, nullptr, n, type, MPI_SUM, 0, comm_, &request), "MPI_Ireduce");
      wait_one(request, "MPI_Ireduce");
      check(MPI_Ibcast(data + done, n, type, 0, comm_, &request), "MPI_Ibcast");
      wait_one(request, "MPI_Ibcast");
      done += part;
    }
  }

  void require_healthy(const char* what) const {
    detail::require(!broken_, "comm::Mpi::", what, " on rank ", rank_, " of ", size_,
                    ": the communicator is broken (an earlier call timed out), expected a healthy communicator");
  }

  void wait_one(MPI_Request& request, const char* what) {
    std::vector<MPI_Request> one{request};
    wait_all(one, what);
    request = MPI_REQUEST_NULL;
  }

  // Polls until every request completes, or fails after timeout_seconds (a rank that failed or
  // stopped calling never completes them). Polling, not MPI_Waitall, is what bounds the wait.
  void wait_all(std::vector<MPI_Request>& requests, const char* what) {
    if (requests.empty()) return;
    std::vector<MPI_Status> statuses(requests.size());
    const auto start = std::chrono::steady_clock::now();
    const auto limit = std::chrono::duration<double>(options_.timeout_seconds);
    int code = MPI_SUCCESS;
    for (long polls = 0;; ++polls) {
      int done = 0;
      code = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, statuses.data());
      if (code != MPI_SUCCESS || done != 0) break;
      if (std::chrono::steady_clock::now() - start > limit) {
        broken_ = true;
        detail::fail("comm::Mpi::", what, " on rank ", rank_, " of ", size_, ": no answer from the other ranks after ",
                     options_.timeout_seconds, " s (timeout_seconds): a rank failed or stopped making the same calls");
      }
      // Spin briefly (fast peers answer within microseconds), then yield the core: ranks may
      // outnumber cores.
      if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (code == MPI_SUCCESS) return;
    // MPI_ERR_IN_STATUS: the first failing request's own error.
    int detail_code = code;
    if (code == MPI_ERR_IN_STATUS)
      for (const MPI_Status& s : statuses)
        if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) {
          detail_code = s.MPI_ERROR;
          break;
        }
    fail_with(detail_code, (std::string("MPI_Waitall in ") + what).c_str());
  }

  void check(int code, const char* call) const {
    if (code != MPI_SUCCESS) fail_with(code, call);
  }

  [[noreturn]] void fail_with(int code, const char* call) const {
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
    detail::fail("comm::Mpi: ", call, " failed on rank ", rank_, " of ", size_, ": ",
                 length > 0 ? std::string(text, static_cast<std::size_t>(length)) : std::string("error ") + std::to_string(code));
  }

  void swap(Mpi& other) noexcept {
    std::swap(options_, other.options_);
    std::swap(comm_, other.comm_);
    std::swap(rank_, other.rank_);
    std::swap(size_, other.size_);
    std::swap(broken_, other.broken_);
  }

  Options options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  bool broken_ = false;
};

static_assert(Communicator<Mpi>);

}  // namespace moe::comm
