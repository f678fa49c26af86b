// comm::Mpi under mpirun (tests/mpirun.py runs it on 1, 2 and 4 ranks): every collective
// against what each rank can compute on its own, with uneven and empty transfers, transfers
// split into many messages, and MPI failures reported as moe::Error instead of an abort.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "moe/comm/mpi.hpp"
#include "moe/random.hpp"

using moe::Index;
using moe::comm::Mpi;

namespace {

// The byte rank `from` sends rank `to` at position i: the same on both sides.
std::byte payload(int from, int to, Index i) {
  return static_cast<std::byte>((from * 131 + to * 31 + i * 7) & 0xFF);
}

// Bytes rank `from` sends rank `to`: uneven, zero for some pairs (to itself included for rank 1).
Index count_between(int from, int to, Index scale) {
  if ((from + 2 * to) % 3 == 1) return 0;
  return scale * (1 + from) + 3 * to + (from == to ? 5 : 0);
}

std::string error_of_call(auto&& f) {
  try {
    f();
  } catch (const moe::Error& e) {
    return e.what();
  }
  return "";
}

void check_all_to_all(Mpi& comm, Index scale) {
  const int p = comm.size(), me = comm.rank();
  std::vector<Index> send_counts(static_cast<std::size_t>(p)), recv_counts(static_cast<std::size_t>(p));
  std::vector<std::byte> send;
  for (int r = 0; r < p; ++r) {
    send_counts[static_cast<std::size_t>(r)] = count_between(me, r, scale);
    recv_counts[static_cast<std::size_t>(r)] = count_between(r, me, scale);
    for (Index i = 0; i < send_counts[static_cast<std::size_t>(r)]; ++i) send.push_back(payload(me, r, i));
  }
  Index total = 0;
  for (const Index c : recv_counts) total += c;
  std::vector<std::byte> recv(static_cast<std::size_t>(total), std::byte{0xEE});
  comm.all_to_all_v(send.data(), send_counts.data(), recv.data(), recv_counts.data());
  Index at = 0, wrong = 0;
  for (int r = 0; r < p; ++r)
    for (Index i = 0; i < recv_counts[static_cast<std::size_t>(r)]; ++i, ++at)
      if (recv[static_cast<std::size_t>(at)] != payload(r, me, i)) ++wrong;
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("rank and size match MPI's; a copy is a communicator of its own with the same ranks") {
  int rank = -1, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  Mpi comm;
  CHECK(comm.rank() == rank);
  CHECK(comm.size() == size);
  Mpi copy(comm);
  CHECK(copy.rank() == rank);
  CHECK(copy.native() != comm.native());
  int result = MPI_UNEQUAL;
  MPI_Comm_compare(copy.native(), MPI_COMM_WORLD, &result);
  CHECK(result == MPI_CONGRUENT);
  Mpi moved(std::move(copy));
  CHECK(moved.size() == size);
  moved.barrier();
}

TEST_CASE("all_reduce_sum: the same sums, the same bits, on every rank, in every type") {
  Mpi comm;
  const int p = comm.size(), me = comm.rank();
  std::vector<double> d(37);
  std::vector<float> f(37);
  std::vector<std::int64_t> n(37);
  for (std::size_t i = 0; i < d.size(); ++i) {
    d[i] = 0.1 * static_cast<double>(me + 1) + static_cast<double>(i);
    f[i] = static_cast<float>(d[i]);
    n[i] = (std::int64_t{1} << 40) * me + static_cast<std::int64_t>(i);
  }
  comm.all_reduce_sum(d.data(), 37);
  comm.all_reduce_sum(f.data(), 37);
  comm.all_reduce_sum(n.data(), 37);
  for (std::size_t i = 0; i < d.size(); ++i) {
    double expected = 0;
    std::int64_t whole = 0;
    for (int r = 0; r < p; ++r) {
      expected += 0.1 * static_cast<double>(r + 1) + static_cast<double>(i);
      whole += (std::int64_t{1} << 40) * r + static_cast<std::int64_t>(i);
    }
    CHECK(d[i] == doctest::Approx(expected).epsilon(1e-14));
    CHECK(f[i] == doctest::Approx(expected).epsilon(1e-6));
    CHECK(n[i] == whole);
  }
  // Every rank holds the same bits: rank 0's values broadcast and compared.
  std::vector<double> zero = d;
  comm.broadcast(reinterpret_cast<std::byte*>(zero.data()), static_cast<Index>(zero.size() * sizeof(double)), 0);
  CHECK(std::memcmp(zero.data(), d.data(), d.size() * sizeof(double)) == 0);
  comm.all_reduce_sum(static_cast<double*>(nullptr), 0);  // nothing to sum is fine
}

TEST_CASE("all_to_all_v: uneven counts, empty pairs and a rank's bytes to itself") {
  Mpi comm;
  check_all_to_all(comm, 10);
  check_all_to_all(comm, 0);  // only the 3 * to (+ 5) bytes, many pairs empty
  // Nothing at all to move.
  std::vector<Index> zeros(static_cast<std::size_t>(comm.size()), 0);
  comm.all_to_all_v(nullptr, zeros.data(), nullptr, zeros.data());
}

TEST_CASE("transfers larger than one message are split, and arrive whole and in order") {
  // 7-byte messages: a transfer of 1000 bytes is 143 messages between one pair of ranks, the
  // same path a transfer over 2^31 bytes takes with the default limit of 2^30.
  Mpi comm(MPI_COMM_WORLD, {.max_message_bytes = 7});
  check_all_to_all(comm, 1000);
  std::vector<std::int64_t> n(100, 1);
  comm.all_reduce_sum(n.data(), 100);  // 7 bytes hold no int64: one element per message
  for (const auto v : n) CHECK(v == comm.size());
  std::vector<char> text(1000, comm.rank() == 0 ? 'x' : '?');
  comm.broadcast(reinterpret_cast<std::byte*>(text.data()), 1000, 0);
  CHECK(std::string(text.begin(), text.end()) == std::string(1000, 'x'));
}

TEST_CASE("exclusive_scan: each rank's first global index") {
  Mpi comm;
  const std::int64_t mine = 10 * comm.rank() + (comm.rank() == 1 ? 0 : 3);  // rank 1 brings no tokens
  std::int64_t expected = 0;
  for (int r = 0; r < comm.rank(); ++r) expected += 10 * r + (r == 1 ? 0 : 3);
  CHECK(comm.exclusive_scan(mine) == expected);
}

TEST_CASE("all_gather and broadcast: every rank's block in rank order, root's bytes everywhere") {
  Mpi comm(MPI_COMM_WORLD, {.max_message_bytes = 5});  // blocks of 13 bytes travel as 3 messages
  const int p = comm.size(), me = comm.rank();
  constexpr Index bytes = 13;
  std::vector<std::byte> mine(bytes), all(static_cast<std::size_t>(p * bytes), std::byte{0xEE});
  for (Index i = 0; i < bytes; ++i) mine[static_cast<std::size_t>(i)] = payload(me, 0, i);
  comm.all_gather(mine.data(), bytes, all.data());
  Index wrong = 0;
  for (int r = 0; r < p; ++r)
    for (Index i = 0; i < bytes; ++i)
      if (all[static_cast<std::size_t>(r * bytes + i)] != payload(r, 0, i)) ++wrong;
  CHECK(wrong == 0);
  const int root = p - 1;
  std::vector<std::byte> data(bytes);
  for (Index i = 0; i < bytes; ++i) data[static_cast<std::size_t>(i)] = me == root ? payload(root, 1, i) : std::byte{0};
  comm.broadcast(data.data(), bytes, root);
  wrong = 0;
  for (Index i = 0; i < bytes; ++i) wrong += data[static_cast<std::size_t>(i)] != payload(root, 1, i) ? 1 : 0;
  CHECK(wrong == 0);
}

TEST_CASE("a rank that stops calling ends the others' call with a moe::Error after the timeout, not a hang") {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size < 2) return;
  Mpi comm(MPI_COMM_WORLD, {.timeout_seconds = 0.5});
  const int me = comm.rank();
  // Rank 0 exchanges one byte with rank 1; rank 1 is late (it answers only after rank 0 gave up).
  std::vector<Index> counts(static_cast<std::size_t>(size), 0);
  std::byte out{0x2A}, in{0};
  if (me == 0) {
    counts[1] = 1;
    const auto start = MPI_Wtime();
    const auto error = error_of_call([&] { comm.all_to_all_v(&out, counts.data(), &in, counts.data()); });
    const double waited = MPI_Wtime() - start;
    CHECK(error.find("all_to_all_v on rank 0 of " + std::to_string(size)) != std::string::npos);
    CHECK(error.find("after 0.5 s") != std::string::npos);
    CHECK(waited >= 0.5);
    CHECK(waited < 10);
    CHECK(comm.broken());
    CHECK(error_of_call([&] { comm.barrier(); }).find("the communicator is broken") != std::string::npos);
  }
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0 has given up
  if (me == 1) {
    // The late call completes (rank 0's messages were posted), and so do rank 0's abandoned ones.
    counts[0] = 1;
    comm.all_to_all_v(&out, counts.data(), &in, counts.data());
    CHECK(in == std::byte{0x2A});
  }
  MPI_Barrier(MPI_COMM_WORLD);
  CHECK(error_of_call([] { Mpi bad(MPI_COMM_WORLD, {.timeout_seconds = 0}); }).find("timeout_seconds = 0") !=
        std::string::npos);
}

TEST_CASE("bad arguments and MPI failures are moe::Errors naming the call and the rank") {
  Mpi comm;
  const std::string me = "on rank " + std::to_string(comm.rank());
  CHECK(error_of_call([] { Mpi bad(MPI_COMM_WORLD, {.max_message_bytes = 0}); }).find("max_message_bytes = 0") !=
        std::string::npos);
  std::vector<Index> counts(static_cast<std::size_t>(comm.size()), 0);
  counts[0] = -4;
  const auto negative = error_of_call([&] { comm.all_to_all_v(nullptr, counts.data(), nullptr, counts.data()); });
  CHECK(negative.find("-4") != std::string::npos);
  CHECK(negative.find(me) != std::string::npos);
  // Every rank refuses before posting anything, so no rank waits for a message.
  std::vector<Index> sends(static_cast<std::size_t>(comm.size()), 0), recvs = sends;
  std::vector<std::byte> buffer(2);
  sends[static_cast<std::size_t>(comm.rank())] = 1;
  recvs[static_cast<std::size_t>(comm.rank())] = 2;
  CHECK(error_of_call([&] { comm.all_to_all_v(buffer.data(), sends.data(), buffer.data(), recvs.data()); })
            .find("sending 1 bytes to itself but receiving 2") != std::string::npos);
  CHECK(error_of_call([&] {
          std::byte b{};
          comm.broadcast(&b, 1, comm.size());
        }).find("root = " + std::to_string(comm.size())) != std::string::npos);
  // An MPI call that fails returns to us (MPI_ERRORS_RETURN) instead of aborting the job: an
  // invalid communicator duplicated into a comm::Mpi.
  const auto mpi_error = error_of_call([] { Mpi invalid(MPI_COMM_NULL); });
  CHECK(mpi_error.find("comm::Mpi: MPI_Comm_dup failed") != std::string::npos);
  comm.barrier();
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  // Errors in MPI_COMM_WORLD itself return too, so that a failing check below is reported.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  doctest::Context context(argc, argv);
  if (rank != 0) context.setOption("minimal", true);  // one full report, from rank 0; every rank's failures
  const int failed = context.run();
  // Every rank's verdict: the job fails if any rank failed.
  int any = failed != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed != 0) std::fprintf(stderr, "comm_mpi: rank %d of %d failed\n", rank, size);
  MPI_Finalize();
  return any;
}
