// The CUDA backend against the CPU reference: every gate and expert at depth MOE_COMPARE_DEPTH
// (one executable per depth), float, with the shared comparison suite (tests/backend_compare.hpp).
// Built with MOE_POISON_BUFFERS: device and host buffers start as NaN. Exits 77 (Meson: SKIP),
// naming itself, when no CUDA device answers.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "../backend_compare.hpp"
#include "moe/backend/cuda.hpp"

#ifndef MOE_COMPARE_DEPTH
#define MOE_COMPARE_DEPTH 1
#endif

TEST_CASE_TEMPLATE_DEFINE("Cuda matches the CPU reference (float)", Case, cuda_cases) {
  const compare::Worst worst = compare::run_all_shapes<moe::backend::Cuda<float>, Case>(1e-5);
  MESSAGE(compare::type_name<typename Case::GateType>(), " / ", compare::type_name<typename Case::ExpertType>(),
          " / depth ", Case::depth, ": worst relative error forward ", worst.forward, ", backward ", worst.backward,
          "; bf16 experts against fp32: y ", worst.bf16_vs_fp32, ", gradients ", worst.bf16_grad_vs_fp32);
}
TEST_CASE_TEMPLATE_APPLY(cuda_cases, compare::CasesAtDepth<MOE_COMPARE_DEPTH>);

int main(int argc, char** argv) {
  if (!moe::backend::cuda::device_available()) {
    std::printf("SKIPPED: cuda_compare_depth%d: no CUDA device answered\n", MOE_COMPARE_DEPTH);
    return 77;
  }
  std::printf("device: %s\n", moe::backend::cuda::device_name().c_str());
  doctest::Context context(argc, argv);
  return context.run();
}
