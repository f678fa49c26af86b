// The CUDA backend's Thrust code, run on the host (moe::backend::ThrustHost), against the CPU
// reference: every gate and expert at depth MOE_COMPARE_DEPTH (one executable per depth, so they
// build in parallel), bit for bit, and against the naive mixture of backend_compare.hpp. Built
// with MOE_POISON_BUFFERS: every buffer and every primitive's scratch memory starts poisoned.
// What it checks is the Thrust primitives (routing plan, histogram, scan, sort, gather, sums)
// under the shared gate, layer and expert code, and the routing primitives directly against the
// CPU backend's; backend_compare.hpp says what it does not check.

#include <algorithm>
#include <vector>

#include "backend_compare.hpp"
#include "support.hpp"
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

TEST_CASE("ThrustHost refuses a gate routing a token twice to one expert, or giving a NaN gate value") {
  moe::test::check_routing_refused<moe::backend::ThrustHost<float>>();
}

namespace {
using moe::Index;

// Keys in [0, bins), uniform: the routed slots' experts.
std::vector<Index> random_keys(Index count, Index bins, std::uint64_t seed) {
  const moe::CounterRandom r{seed};
  std::vector<Index> keys(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) {
    const double u = 0.5 * (1.0 + r.symmetric_uniform(static_cast<std::uint64_t>(i), 0u, 3u));
    keys[static_cast<std::size_t>(i)] = std::min<Index>(bins - 1, static_cast<Index>(u * static_cast<double>(bins)));
  }
  return keys;
}
}  // namespace

TEST_CASE("ThrustHost's routing primitives equal the CPU backend's, output memory poisoned first") {
  using Host = moe::backend::ThrustHost<float>;
  using Cpu = moe::backend::Cpu<float>;
  Host::Context hctx{};
  Cpu::Context cctx{};
  for (const Index count : {0, 1, 7, 1000}) {
    for (const Index bins : {1, 3, 64}) {
      CAPTURE(count);
      CAPTURE(bins);
      const auto keys = random_keys(count, bins, static_cast<std::uint64_t>(count * 100 + bins));
      // Outputs in poisoned buffers (MOE_POISON_BUFFERS): an element a primitive leaves
      // unwritten differs from the reference.
      moe::backend::HostMatrix<Index> h_counts, c_counts, h_scan, c_scan, h_order, c_order;
      h_counts.resize(bins, 1);
      c_counts.resize(bins, 1);
      Host::histogram(hctx, keys.data(), count, bins, h_counts.data());
      Cpu::histogram(cctx, keys.data(), count, bins, c_counts.data());
      CHECK(h_counts.values() == c_counts.values());
      Index total = 0;
      for (const Index c : c_counts.values()) total += c;
      CHECK(total == count);

      h_scan.resize(bins + 1, 1);
      c_scan.resize(bins + 1, 1);
      Host::exclusive_scan(hctx, c_counts.data(), bins, h_scan.data());
      Cpu::exclusive_scan(cctx, c_counts.data(), bins, c_scan.data());
      CHECK(h_scan.values() == c_scan.values());
      CHECK(h_scan[0] == 0);
      CHECK(h_scan[bins] == count);

      h_order.resize(count, 1);
      c_order.resize(count, 1);
      Host::stable_sort_by_key(hctx, keys.data(), count, bins, h_order.data());
      Cpu::stable_sort_by_key(cctx, keys.data(), count, bins, c_order.data());
      CHECK(h_order.values() == c_order.values());
    }
  }
}

#if MOE_COMPARE_DEPTH == 1
// The host waits of a layer call on the CUDA backend, counted on the host system, which runs the
// same code and counts each synchronize (docs/cuda.md lists them): a flat forward makes at most
// two with check_finite off (the routing plan's one read, the statistics' one read), with every
// gate, its z-loss and balancing terms on; a flat backward makes none. check_finite adds one per
// checked matrix. The counts do not grow with the number of experts.
TEST_CASE_TEMPLATE("Host waits of a flat layer on the CUDA backend's code", Gate, moe::gate::NoisyTopK,
                   moe::gate::TopK, moe::gate::Softmax, moe::gate::Switch, moe::gate::ExpertChoice,
                   moe::gate::SigmoidBias) {
  using Host = moe::backend::ThrustHost<float>;
  using Layer = moe::Layer<moe::expert::SwiGLU, Gate, Host>;
  for (const Index n : {4, 64}) {
    for (const bool check : {false, true}) {
      CAPTURE(n);
      CAPTURE(check);
      typename Layer::Config c{};
      c.d_model = 8;
      c.n_experts = n;
      c.expert = {.hidden = 16};
      c.gate = compare::gate_config<Gate>(n);
      c.check_finite = check;
      Layer layer(c);
      const Index t_count = 33;
      Host::Buffer<float> x(t_count, c.d_model, 0.5f), dy(t_count, c.d_model, 0.25f);
      moe::Rng rng(1);
      for (const moe::Mode mode : {moe::Mode::train, moe::Mode::inference}) {
        const auto before = moe::backend::ThrustHostSystem::host_waits();
        const auto f = layer.forward(x.view(), mode, rng);
        const auto forward_waits = moe::backend::ThrustHostSystem::host_waits() - before;
        const auto b = layer.backward(f, dy.view());
        const auto backward_waits = moe::backend::ThrustHostSystem::host_waits() - before - forward_waits;
        MESSAGE(compare::type_name<Gate>(), " n = ", n, " check_finite = ", check, ": forward ", forward_waits,
                ", backward ", backward_waits);
        CHECK(forward_waits == 2 + (check ? 1 : 0));
        CHECK(backward_waits == (check ? 1 : 0));
        CHECK(b.dx.rows() == t_count);
      }
    }
  }
}
#endif

#if MOE_COMPARE_DEPTH == 1
// segment_sums: the documented order (chunks of kSumChunk rows in row order, then the chunk sums
// in chunk order, for segments longer than a chunk; row order otherwise), written out here, on
// both backends, with empty, short and long segments, and the partial-sum scratch poisoned.
TEST_CASE("segment_sums sums each segment in its documented order on both backends") {
  using Host = moe::backend::ThrustHost<float>;
  using Cpu = moe::backend::Cpu<float>;
  const Index chunk = moe::kSumChunk;
  const std::vector<Index> offsets = {0, 0, 1, chunk + 1, 3 * chunk + 8, 3 * chunk + 8, 4 * chunk};
  const Index segments = static_cast<Index>(offsets.size()) - 1, rows = offsets.back(), cols = 3;
  Index max_rows = 0;
  for (Index s = 0; s < segments; ++s) max_rows = std::max(max_rows, offsets[s + 1] - offsets[s]);
  std::vector<float> m(static_cast<std::size_t>(rows * cols));
  const moe::CounterRandom r{42};
  for (std::size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(r.symmetric_uniform(i, 0u, 9u)) * 1e3f;
  const float* data = m.data();
  const auto value = [=] MOE_HD(Index row, Index c) { return data[row * cols + c]; };
  // The expected bits.
  std::vector<float> want(static_cast<std::size_t>(segments * cols));
  const Index chunks = (max_rows + chunk - 1) / chunk;
  for (Index s = 0; s < segments; ++s)
    for (Index c = 0; c < cols; ++c) {
      float total = 0;
      for (Index j = 0; j < chunks; ++j) {
        float part = 0;
        for (Index row = offsets[s] + j * chunk; row < std::min(offsets[s + 1], offsets[s] + (j + 1) * chunk); ++row)
          part += value(row, c);
        total += part;
      }
      want[static_cast<std::size_t>(s * cols + c)] = total;
    }
  Host::Context hctx{};
  Cpu::Context cctx{};
  Host::Buffer<float> hpart, cpart;
  std::vector<float> host_out(want.size()), cpu_out(want.size());
  moe::segment_sums<Host>(hctx, offsets.data(), segments, max_rows, cols, value, host_out.data(), hpart);
  moe::segment_sums<Cpu>(cctx, offsets.data(), segments, max_rows, cols, value, cpu_out.data(), cpart);
  CHECK(host_out == want);
  CHECK(cpu_out == want);
  // The two passes give other bits than one walk in row order here (the long segments): the
  // test above would not tell them apart otherwise.
  float walk = 0;
  for (Index row = offsets[3]; row < offsets[4]; ++row) walk += value(row, 0);
  CHECK(walk != want[static_cast<std::size_t>(3 * cols)]);
}
#endif
