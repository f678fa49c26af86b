// The CUDA backend's Thrust code, run on the host (moe::backend::ThrustHost), against the CPU
// reference: every gate and expert at depth MOE_COMPARE_DEPTH (one executable per depth, so they
// build in parallel). Built with MOE_POISON_BUFFERS: every buffer starts as NaN.

#include "backend_compare.hpp"
#include "moe/backend/thrust_host.hpp"

#ifndef MOE_COMPARE_DEPTH
#define MOE_COMPARE_DEPTH 1
#endif

TEST_CASE_TEMPLATE_DEFINE("ThrustHost matches the CPU reference", Case, thrust_host_cases) {
  const compare::Worst worst = compare::run_all_shapes<moe::backend::ThrustHost<float>, Case>(1e-5);
  MESSAGE(compare::type_name<typename Case::GateType>(), " / ", compare::type_name<typename Case::ExpertType>(),
          " / depth ", Case::depth, ": worst relative error forward ", worst.forward, ", backward ", worst.backward,
          "; bf16 experts against fp32: y ", worst.bf16_vs_fp32, ", gradients ", worst.bf16_grad_vs_fp32);
}
TEST_CASE_TEMPLATE_APPLY(thrust_host_cases, compare::CasesAtDepth<MOE_COMPARE_DEPTH>);
