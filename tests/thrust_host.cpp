// The CUDA backend's Thrust code, run on the host (moe::backend::ThrustHost), against the CPU
// reference: every gate and expert at depth MOE_COMPARE_DEPTH (one executable per depth, so they
// build in parallel), bit for bit, and against the naive mixture of backend_compare.hpp. Built
// with MOE_POISON_BUFFERS: every buffer and every primitive's scratch memory starts poisoned.
// What it checks is the Thrust primitives (routing plan, histogram, scan, sort, gather, sums)
// under the shared gate, layer and expert code; backend_compare.hpp says what it does not.

#include "backend_compare.hpp"
#include "moe/backend/thrust_host.hpp"

#ifndef MOE_COMPARE_DEPTH
#define MOE_COMPARE_DEPTH 1
#endif

TEST_CASE_TEMPLATE_DEFINE("ThrustHost matches the CPU reference", Case, thrust_host_cases) {
  // Tolerance 0: the host system runs the CPU backend's expressions in its order, so the bits
  // must be the same; an ordering change in the shared code shows here.
  compare::check_case<moe::backend::ThrustHost<float>, Case>(0.0);
}
TEST_CASE_TEMPLATE_APPLY(thrust_host_cases, compare::CasesAtDepth<MOE_COMPARE_DEPTH>);
