#pragma once
// moe::comm::Local: the single-process communicator. Every collective is the identity.

#include <algorithm>
#include <cstdint>

#include "moe/communicator.hpp"
#include "moe/error.hpp"

namespace moe::comm {

class Local {
 public:
  [[nodiscard]] int rank() const { return 0; }
  [[nodiscard]] int size() const { return 1; }
  void all_reduce_sum(double*, Index) {}
  void all_reduce_sum(float*, Index) {}
  void all_reduce_sum(std::int64_t*, Index) {}
  // With one rank, what is sent to rank 0 is what is received from rank 0.
  void all_to_all_v(const std::byte* send, const Index* send_counts, std::byte* recv, const Index* recv_counts) {
    detail::require(send_counts[0] == recv_counts[0], "comm::Local::all_to_all_v: sending ", send_counts[0],
                    " bytes to rank 0 but receiving ", recv_counts[0], ", expected equal counts with one rank");
    if (send_counts[0] > 0 && send != recv) std::copy_n(send, send_counts[0], recv);
  }
  void all_gather(const std::byte* send, Index bytes, std::byte* recv) {
    if (bytes > 0 && send != recv) std::copy_n(send, bytes, recv);
  }
  [[nodiscard]] std::int64_t exclusive_scan(std::int64_t) { return 0; }
  void broadcast(std::byte*, Index, int root) {
    detail::require(root == 0, "comm::Local::broadcast: root = ", root, ", expected 0 with one rank");
  }
  void barrier() {}
};

static_assert(Communicator<Local>);

}  // namespace moe::comm
