// moe-run built without the CUDA backend: --backend cuda is refused before any of these runs.
#include "dispatch.hpp"

namespace moe_run {

bool cuda_built() { return false; }
bool cuda_device() { return false; }

#define MOE_RUN_ABSENT(G) \
  bool run_cuda_##G(const Job&, const moe::io::LayerKind&) { moe::detail::fail("moe-run: built without CUDA"); }
MOE_RUN_GATES(MOE_RUN_ABSENT)
#undef MOE_RUN_ABSENT

}  // namespace moe_run
