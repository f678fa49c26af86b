// expect: Depth must be at least 1
#include <moe/backend/cpu.hpp>
#include <moe/moe.hpp>

int main() { moe::Layer<moe::expert::FeedForward, moe::gate::NoisyTopK, moe::backend::Cpu<float>, 0> layer({}); }
