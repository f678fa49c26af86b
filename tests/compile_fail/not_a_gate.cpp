// expect: GateFamily
#include <moe/backend/cpu.hpp>
#include <moe/moe.hpp>

struct NotAGate {
  struct Config {};
};

int main() { moe::Layer<moe::expert::FeedForward, NotAGate, moe::backend::Cpu<float>> layer({}); }
