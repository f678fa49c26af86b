// The CUDA backend against the CPU reference: every gate and expert at depth MOE_COMPARE_DEPTH
// (one executable per depth), float with fp32 and bf16 experts (and double at depth 1), with the
// shared comparison suite (tests/backend_compare.hpp).
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

TEST_CASE_TEMPLATE_DEFINE("Cuda matches the CPU reference (float, and bf16 experts)", Case, cuda_cases) {
  compare::check_case<moe::backend::Cuda<float>, Case>(1e-5);
}
TEST_CASE_TEMPLATE_APPLY(cuda_cases, compare::CasesAtDepth<MOE_COMPARE_DEPTH>);

#if MOE_COMPARE_DEPTH == 1
// Cuda<double> at depth 1 (cuBLAS DGEMM and the kernels' double path), against Cpu<double>.
TEST_CASE_TEMPLATE_DEFINE("Cuda matches the CPU reference (double)", Case, cuda_double_cases) {
  compare::check_case<moe::backend::Cuda<double>, Case>(1e-10);
}
TEST_CASE_TEMPLATE_APPLY(cuda_double_cases, compare::CasesAtDepth<1>);
#endif

int main(int argc, char** argv) {
  if (!moe::backend::cuda::device_available()) {
    std::printf("SKIPPED: cuda_compare_depth%d: no CUDA device answered\n", MOE_COMPARE_DEPTH);
    return 77;
  }
  std::printf("device: %s\n", moe::backend::cuda::device_name().c_str());
  doctest::Context context(argc, argv);
  return context.run();
}
