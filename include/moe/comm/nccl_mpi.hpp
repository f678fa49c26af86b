#pragma once
// moe::comm::nccl_over_mpi: a comm::Nccl for every rank of an MPI communicator. Rank 0 makes
// the NCCL unique id, MPI_Bcast hands it to the others, and each process builds its Nccl as
// (MPI rank, MPI size). The collectives are NCCL's alone (moe/comm/nccl.hpp: device memory, the
// stream, the timeout and the abort); MPI is only the bootstrap and may be finalized once every
// rank has its communicator.
//
// Launch: one process per GPU, e.g. `mpirun -np 8 app` on a node with 8 GPUs. Each process
// calls MPI_Init, then cudaSetDevice with its node-local rank (e.g. the rank in the
// communicator that MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) gives, or OpenMPI's
// OMPI_COMM_WORLD_LOCAL_RANK), then nccl_over_mpi. Every rank of comm must call it.
//
// Link: moe-nccl and moe-mpi (pkg-config), or Meson's moe_nccl_dep and moe_mpi_dep, plus the
// CUDA runtime (nvcc links it by itself; with a host compiler add -lcudart).

#include <mpi.h>

#include <cstddef>
#include <string>

#include "moe/comm/nccl.hpp"
#include "moe/error.hpp"

namespace moe::comm {

namespace nccl_detail {

inline void check_mpi(int code, const char* call, int rank) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  detail::fail("comm::nccl_over_mpi: ", call, " failed on rank ", rank, ": ",
               length > 0 ? std::string(text, static_cast<std::size_t>(length)) : "error " + std::to_string(code));
}

}  // namespace nccl_detail

// A comm::Nccl over the processes of comm, rank and size as in comm. Collective over comm.
[[nodiscard]] inline Nccl nccl_over_mpi(MPI_Comm comm = MPI_COMM_WORLD, NcclOptions options = {}) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  detail::require(initialized != 0 && finalized == 0,
                  "comm::nccl_over_mpi: MPI is not initialized (or already finalized), expected MPI_Init before "
                  "nccl_over_mpi");
  int rank = -1, size = 0;
  nccl_detail::check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank", rank);
  nccl_detail::check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size", rank);
  // Rank 0's result travels with the id, so that a failure there is an error on every rank
  // rather than a wait for an id that never comes.
  struct Packet {
    ncclUniqueId id;
    int result;
  } packet{};
  if (rank == 0) packet.result = static_cast<int>(ncclGetUniqueId(&packet.id));
  nccl_detail::check_mpi(MPI_Bcast(&packet, static_cast<int>(sizeof packet), MPI_BYTE, 0, comm), "MPI_Bcast", rank);
  const auto result = static_cast<ncclResult_t>(packet.result);
  detail::require(result == ncclSuccess, "comm::nccl_over_mpi on rank ", rank, " of ", size,
                  ": ncclGetUniqueId failed on rank 0: ", nccl_detail::describe(result, nullptr),
                  ", expected a unique id to share");
  return Nccl(packet.id, rank, size, options);
}

}  // namespace moe::comm
