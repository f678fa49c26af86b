// comm::Nccl: the argument errors that need no device; with one device, every collective of a
// one-rank communicator on device buffers, the refusals (which leave it usable), a move, and a
// timeout (a kernel holds the stream) that aborts it; with two devices or more, every collective
// between two ranks, one thread each. Exits 77 (Meson: SKIP), naming itself, when no CUDA device
// answers.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "moe/comm/nccl.hpp"

using moe::Index;
using moe::comm::Nccl;
using moe::comm::NcclOptions;

static_assert(moe::Communicator<Nccl>);
static_assert(!std::is_copy_constructible_v<Nccl> && !std::is_copy_assignable_v<Nccl>);
static_assert(std::is_nothrow_move_constructible_v<Nccl> && std::is_nothrow_move_assignable_v<Nccl>);

namespace {

std::mutex report_mutex;
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (ok) return;
  const std::lock_guard<std::mutex> lock(report_mutex);
  ++failures;
  std::printf("FAIL: %s\n", what.c_str());
}

template <class F>
void expect_error(F&& f, const std::string& fragment) {
  try {
    f();
    expect(false, "no moe::Error for: " + fragment);
  } catch (const moe::Error& e) {
    expect(std::string(e.what()).find(fragment) != std::string::npos,
           "message \"" + std::string(e.what()) + "\" lacks \"" + fragment + "\"");
  }
}

void cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw moe::Error(std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

// A device buffer of n elements of T with a host copy to fill and read back.
template <class T>
struct DeviceBuffer {
  explicit DeviceBuffer(std::size_t n) : host(n) {
    cuda(cudaMalloc(reinterpret_cast<void**>(&dev), bytes() + 1), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { static_cast<void>(cudaFree(dev)); }
  [[nodiscard]] std::size_t bytes() const { return host.size() * sizeof(T); }
  [[nodiscard]] std::byte* raw() { return reinterpret_cast<std::byte*>(dev); }
  void upload() { cuda(cudaMemcpy(dev, host.data(), bytes(), cudaMemcpyHostToDevice), "cudaMemcpy"); }
  std::vector<T>& download() {
    cuda(cudaMemcpy(host.data(), dev, bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    return host;
  }
  std::vector<T> host;
  T* dev = nullptr;
};

// Holds the calling thread's stream for about ns nanoseconds.
__global__ void hold(unsigned long long ns) {
  unsigned long long start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// Constructor arguments are checked before anything touches CUDA or NCCL.
void test_host_errors() {
  const ncclUniqueId id{};
  expect_error([&] { Nccl c(id, 0, 0); }, "comm::Nccl: size = 0, expected size >= 1");
  expect_error([&] { Nccl c(id, 2, 2); }, "comm::Nccl: rank = 2, expected 0 <= rank < size = 2");
  expect_error([&] { Nccl c(id, -1, 2); }, "comm::Nccl: rank = -1, expected 0 <= rank < size = 2");
  expect_error([&] { Nccl c(id, 1, 2, {.timeout_seconds = -1}); },
               "comm::Nccl on rank 1 of 2: timeout_seconds = -1, expected > 0");
  expect_error([&] { Nccl c(id, 0, 1, {.timeout_seconds = 0}); },
               "comm::Nccl on rank 0 of 1: timeout_seconds = 0, expected > 0");
}

// Every collective of a one-rank communicator.
void test_one_rank() {
  Nccl comm(moe::comm::nccl_unique_id(), 0, 1, {.timeout_seconds = 60});
  expect(comm.rank() == 0 && comm.size() == 1 && comm.native() != nullptr && !comm.broken(), "rank, size, native");
  expect(comm.options().timeout_seconds == 60 && comm.options().stream == cudaStreamPerThread, "options");

  // all_to_all_v: what rank 0 sends itself is copied.
  DeviceBuffer<unsigned char> send(1000), recv(1000);
  for (std::size_t i = 0; i < send.host.size(); ++i) send.host[i] = static_cast<unsigned char>(i * 7 + 3);
  send.upload();
  const std::vector<unsigned char> pattern = send.host;
  cuda(cudaMemset(recv.dev, 0, recv.bytes()), "cudaMemset");
  const Index counts[] = {1000};
  comm.all_to_all_v(send.raw(), counts, recv.raw(), counts);
  expect(recv.download() == pattern, "all_to_all_v: the self copy");
  const Index none[] = {0};
  comm.all_to_all_v(nullptr, none, nullptr, none);

  // all_reduce_sum with one rank: the values unchanged, the same bits.
  DeviceBuffer<double> d(257);
  DeviceBuffer<float> f(257);
  DeviceBuffer<std::int64_t> i(257);
  for (std::size_t k = 0; k < 257; ++k) {
    d.host[k] = 0.1 * double(k) - 3.7;
    f.host[k] = 0.25f * float(k) - 1.5f;
    i.host[k] = (std::int64_t{1} << 60) + std::int64_t(k) * 1000003 - 77;
  }
  const std::vector<double> d0 = d.host;
  const std::vector<float> f0 = f.host;
  const std::vector<std::int64_t> i0 = i.host;
  d.upload();
  f.upload();
  i.upload();
  comm.all_reduce_sum(d.dev, 257);
  comm.all_reduce_sum(f.dev, 257);
  comm.all_reduce_sum(i.dev, 257);
  expect(std::memcmp(d.download().data(), d0.data(), d.bytes()) == 0, "all_reduce_sum<double>");
  expect(std::memcmp(f.download().data(), f0.data(), f.bytes()) == 0, "all_reduce_sum<float>");
  expect(i.download() == i0, "all_reduce_sum<int64>");
  comm.all_reduce_sum(static_cast<double*>(nullptr), 0);

  // all_gather: rank 0's bytes.
  DeviceBuffer<unsigned char> gathered(33);
  cuda(cudaMemset(gathered.dev, 0, gathered.bytes()), "cudaMemset");
  comm.all_gather(send.raw(), 33, gathered.raw());
  expect(gathered.download() == std::vector<unsigned char>(pattern.begin(), pattern.begin() + 33), "all_gather");

  expect(comm.exclusive_scan(42) == 0, "exclusive_scan on rank 0");
  expect(comm.exclusive_scan(-5) == 0, "exclusive_scan on rank 0, again");

  // broadcast from rank 0: the data unchanged.
  comm.broadcast(send.raw(), 1000, 0);
  expect(send.download() == pattern, "broadcast");
  comm.barrier();
  comm.barrier();

  // Refusals, before anything is posted: the communicator stays usable.
  const Index five[] = {5}, six[] = {6}, negative[] = {-1};
  expect_error(
      [&] { comm.all_to_all_v(send.raw(), five, recv.raw(), six); },
      "comm::Nccl::all_to_all_v on rank 0 of 1: sending 5 bytes to itself but receiving 6, expected equal counts");
  expect_error([&] { comm.all_to_all_v(send.raw(), negative, recv.raw(), negative); },
               "comm::Nccl::all_to_all_v on rank 0 of 1: counts for rank 0 are -1 to send and -1 to receive, expected "
               "both >= 0");
  expect_error([&] { comm.all_to_all_v(nullptr, five, recv.raw(), five); },
               "comm::Nccl::all_to_all_v on rank 0 of 1: a null buffer for 5 bytes to send and 5 to receive");
  expect_error([&] { comm.broadcast(send.raw(), 4, 1); },
               "comm::Nccl::broadcast on rank 0 of 1: root = 1, expected 0 <= root < 1");
  expect_error([&] { comm.all_reduce_sum(d.dev, -1); },
               "comm::Nccl::all_reduce_sum on rank 0 of 1: count = -1, expected >= 0 with a buffer");
  expect_error([&] { comm.all_gather(send.raw(), -2, recv.raw()); },
               "comm::Nccl::all_gather on rank 0 of 1: bytes = -2, expected >= 0 with a send and a recv buffer");
  std::vector<double> host(4);
  expect_error([&] { comm.all_reduce_sum(host.data(), 4); }, "is host memory, expected device memory on device 0");
  comm.barrier();
  expect(!comm.broken(), "not broken by refused arguments");

  // A move takes the communicator; the moved-from one refuses calls.
  Nccl moved(std::move(comm));
  moved.barrier();
  expect(moved.exclusive_scan(3) == 0, "exclusive_scan after a move");
  expect_error([&] { comm.barrier(); },  // NOLINT(bugprone-use-after-move): the refusal is the point
               "comm::Nccl::barrier on rank 0 of 1: the communicator was moved from");
  comm = std::move(moved);
  comm.barrier();
}

// A kernel holds the stream past the timeout: the call aborts the communicator and throws, and
// the aborted communicator refuses every later call.
void test_timeout() {
  Nccl comm(moe::comm::nccl_unique_id(), 0, 1, {.timeout_seconds = 0.2});
  hold<<<1, 1, 0, cudaStreamPerThread>>>(2'000'000'000ull);
  cuda(cudaGetLastError(), "hold<<<>>>");
  expect_error(
      [&] { comm.barrier(); },
      "comm::Nccl::barrier on rank 0 of 1: not complete after timeout_seconds = 0.2 s: a peer stopped or failed");
  expect(comm.broken() && comm.native() == nullptr, "broken after the timeout");
  expect_error([&] { comm.barrier(); },
               "comm::Nccl::barrier on rank 0 of 1: the communicator was aborted after an earlier failure (in barrier: "
               "not complete");
  expect_error([&] { static_cast<void>(comm.exclusive_scan(1)); },
               "comm::Nccl::exclusive_scan on rank 0 of 1: the communicator was aborted");
  cuda(cudaStreamSynchronize(cudaStreamPerThread), "cudaStreamSynchronize");
}

// Two ranks, one thread and one device each.
void rank_of_two(const ncclUniqueId& id, int rank) {
  try {
    cuda(cudaSetDevice(rank), "cudaSetDevice");
    Nccl comm(id, rank, 2, {.timeout_seconds = 120});
    const std::string on = " on rank " + std::to_string(rank);

    // all_to_all_v: count(src, dst) bytes from src to dst, none from rank 0 to rank 1.
    const auto count = [](int src, int dst) -> Index { return src == 0 && dst == 1 ? 0 : 3 + 5 * src + 7 * dst; };
    const auto byte = [](int src, int dst, Index k) { return static_cast<unsigned char>(src * 64 + dst * 16 + k); };
    Index send_counts[2], recv_counts[2];
    std::vector<unsigned char> sent, expected;
    for (int r = 0; r < 2; ++r) {
      send_counts[r] = count(rank, r);
      recv_counts[r] = count(r, rank);
      for (Index k = 0; k < send_counts[r]; ++k) sent.push_back(byte(rank, r, k));
      for (Index k = 0; k < recv_counts[r]; ++k) expected.push_back(byte(r, rank, k));
    }
    DeviceBuffer<unsigned char> send(sent.size()), recv(expected.size());
    send.host = sent;
    send.upload();
    comm.all_to_all_v(send.raw(), send_counts, recv.raw(), recv_counts);
    expect(recv.download() == expected, "all_to_all_v" + on);

    DeviceBuffer<double> d(100);
    DeviceBuffer<float> f(100);
    DeviceBuffer<std::int64_t> i(100);
    for (int k = 0; k < 100; ++k) {
      d.host[k] = 0.5 * k + rank;
      f.host[k] = 0.25f * float(k) - float(rank);
      i.host[k] = (std::int64_t{1} << 60) + k + rank;
    }
    d.upload();
    f.upload();
    i.upload();
    comm.all_reduce_sum(d.dev, 100);
    comm.all_reduce_sum(f.dev, 100);
    comm.all_reduce_sum(i.dev, 100);
    d.download();
    f.download();
    i.download();
    for (int k = 0; k < 100; ++k) {
      expect(d.host[k] == 1.0 * k + 1, "all_reduce_sum<double>" + on);
      expect(f.host[k] == 0.5f * float(k) - 1.0f, "all_reduce_sum<float>" + on);
      expect(i.host[k] == (std::int64_t{1} << 61) + 2 * k + 1, "all_reduce_sum<int64>" + on);
    }

    DeviceBuffer<unsigned char> mine(5), all(10);
    for (int k = 0; k < 5; ++k) mine.host[k] = static_cast<unsigned char>(rank * 10 + k);
    mine.upload();
    comm.all_gather(mine.raw(), 5, all.raw());
    expect(all.download() == std::vector<unsigned char>{0, 1, 2, 3, 4, 10, 11, 12, 13, 14}, "all_gather" + on);

    expect(comm.exclusive_scan(4 + 3 * rank) == (rank == 0 ? 0 : 4), "exclusive_scan" + on);

    DeviceBuffer<unsigned char> data(17);
    for (int k = 0; k < 17; ++k) data.host[k] = static_cast<unsigned char>(rank == 1 ? 100 + k : 0);
    data.upload();
    comm.broadcast(data.raw(), 17, 1);
    data.download();
    for (int k = 0; k < 17; ++k) expect(data.host[k] == 100 + k, "broadcast from rank 1" + on);
    comm.barrier();
  } catch (const std::exception& e) {
    expect(false, "rank " + std::to_string(rank) + " of 2: exception: " + e.what());
  }
}

void test_two_ranks() {
  const ncclUniqueId id = moe::comm::nccl_unique_id();
  std::thread other(rank_of_two, id, 1);
  rank_of_two(id, 0);
  other.join();
}

}  // namespace

int main() {
  try {
    test_host_errors();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
      static_cast<void>(cudaGetLastError());
      std::printf("SKIPPED: comm_nccl: no CUDA device answered\n");
      return failures == 0 ? 77 : 1;
    }
    cuda(cudaSetDevice(0), "cudaSetDevice");
    int version = 0;
    ncclGetVersion(&version);
    std::printf("NCCL %d, %d device(s)\n", version, devices);
    test_one_rank();
    test_timeout();
    if (devices >= 2)
      test_two_ranks();
    else
      std::printf("two ranks: not run (one device)\n");
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  if (failures == 0)
    std::printf("all passed\n");
  else
    std::printf("%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
