#pragma once
// moe-run's layer types: every (expert, gate, depth 1-3, scalar) the tool was built with, one
// translation unit per backend and gate (gate.cpp.in), so they compile in parallel.

#include <string>

#include "moe/io/config.hpp"
#include "runner.hpp"

// The gates moe-run knows, by their moe::io names.
#define MOE_RUN_GATES(X) X(NoisyTopK) X(TopK) X(Softmax) X(Switch) X(ExpertChoice) X(SigmoidBias)

namespace moe_run {

#define MOE_RUN_DECLARE(G) bool run_cpu_##G(const Job&, const moe::io::LayerKind&);
MOE_RUN_GATES(MOE_RUN_DECLARE)
#undef MOE_RUN_DECLARE
#define MOE_RUN_DECLARE(G) bool run_cuda_##G(const Job&, const moe::io::LayerKind&);
MOE_RUN_GATES(MOE_RUN_DECLARE)
#undef MOE_RUN_DECLARE

// Whether this build has the CUDA backend, and a device answers.
bool cuda_built();
bool cuda_device();

// Runs the job on the layer the kind names; false when the kind is not one moe-run was built with.
inline bool dispatch(const Job& job, const moe::io::LayerKind& kind) {
  const bool cuda = job.backend == "cuda";
#define MOE_RUN_CASE(G)                                                  \
  if (kind.gate == #G) return cuda ? run_cuda_##G(job, kind) : run_cpu_##G(job, kind);
  MOE_RUN_GATES(MOE_RUN_CASE)
#undef MOE_RUN_CASE
  return false;
}

}  // namespace moe_run
