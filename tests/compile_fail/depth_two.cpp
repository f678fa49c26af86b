// expect: Depth > 1 (hierarchical MoE, MATH.md 4) is not available in this version
#include <moe/backend/cpu.hpp>
#include <moe/moe.hpp>

int main() { moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, moe::backend::Cpu<float>, 2> layer({}); }
