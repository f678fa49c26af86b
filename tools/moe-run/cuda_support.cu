// moe-run built with the CUDA backend.
#include "dispatch.hpp"
#include "moe/backend/cuda.hpp"

namespace moe_run {

bool cuda_built() { return true; }
bool cuda_device() { return moe::backend::cuda::device_available(); }

}  // namespace moe_run
