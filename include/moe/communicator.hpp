#pragma once
// The Communicator concept: HOW bytes travel between processes. It moves bytes and nothing
// else; who owns which expert is the layer's arithmetic. Implementations: comm::Local (one
// process), comm::Mpi (host memory, moe/comm/mpi.hpp), comm::Nccl (device memory,
// moe/comm/nccl.hpp).
//
// Buffers live in the memory the communicator reaches (host for Mpi and Local, the GPU for
// Nccl); counts and scalars are host values. Every rank makes the same calls in the same order.
// A call returns when its buffers may be read and reused.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "moe/view.hpp"

namespace moe {

// A communicator C provides:
//   rank(), size()                      this process and the process count
//   all_reduce_sum(T* data, n)          in place, T = double, float or std::int64_t; the same
//                                       bits on every rank
//   all_to_all_v(send, send_counts, recv, recv_counts)
//       bytes: send_counts[r] bytes to rank r, recv_counts[r] bytes from rank r, packed in rank
//       order; the counts are host arrays of size() entries
//   all_gather(send, bytes, recv)       bytes from every rank, recv holds size() * bytes in rank order
//   exclusive_scan(v)                   the sum of v over the ranks below this one (0 on rank 0)
//   broadcast(data, bytes, root)        root's bytes to every rank
//   barrier()
template <class C>
concept Communicator =
    requires(C& c, const C& cc, double* d, float* f, std::int64_t* i, const std::byte* send, std::byte* recv,
             const Index* counts, Index n, std::int64_t v, int root) {
      { cc.rank() } -> std::convertible_to<int>;
      { cc.size() } -> std::convertible_to<int>;
      c.all_reduce_sum(d, n);
      c.all_reduce_sum(f, n);
      c.all_reduce_sum(i, n);
      c.all_to_all_v(send, counts, recv, counts);
      c.all_gather(send, n, recv);
      { c.exclusive_scan(v) } -> std::same_as<std::int64_t>;
      c.broadcast(recv, n, root);
      c.barrier();
    };

}  // namespace moe
