#pragma once
// The Communicator concept: HOW bytes travel between processes. It moves bytes and nothing
// else; who owns which expert is the layer's arithmetic. Implementations: comm::Local (one
// process); MPI (host buffers) and NCCL (device buffers) plug into the same concept.

#include <concepts>
#include <cstddef>

#include "moe/view.hpp"

namespace moe {

// A communicator C provides:
//   rank(), size()                      this process and the process count
//   all_reduce_sum(double* data, n)     in place, the same result on every rank
//   all_reduce_sum(float* data, n)
//   all_to_all_v(send, send_counts, recv, recv_counts)
//       bytes: send_counts[r] bytes to rank r, recv_counts[r] bytes from rank r, packed in rank order
//   barrier()
template <class C>
concept Communicator = requires(C& c, const C& cc, double* d, float* f, const std::byte* send, std::byte* recv,
                                const Index* counts, Index n) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_reduce_sum(d, n);
  c.all_reduce_sum(f, n);
  c.all_to_all_v(send, counts, recv, counts);
  c.barrier();
};

}  // namespace moe
