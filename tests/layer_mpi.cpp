// The layer sharded across processes (comm::Mpi), under mpirun on 1, 2 and 4 ranks
// (tests/mpirun.py): every rank's output, the statistics, the losses and every gradient equal
// those of one process (comm::Local) holding the same weights and the concatenated batch, in
// training (noise drawn) and inference, flat and hierarchical; uneven and empty batches; all
// tokens routed to one rank's experts; the same bits run after run; replicated parameters the
// same bits on every rank after an optimizer step; the global gradient norm and clipping; training
// checkpoints (the optimizer's state) that resume bit for bit and load into other rank counts;
// and the failures every rank must see.

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moe/comm/mpi.hpp"
#include "moe/io/checkpoint.hpp"
#include "support.hpp"

using namespace moe;
using moe::test::Matrix;
using moe::test::contains;
using moe::test::error_of;

namespace {

template <class S>
using Cpu = backend::Cpu<S>;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// Each rank's batch size: rank r brings sizes(r) tokens (some ranks may bring none).
using Sizes = std::vector<Index>;
Sizes uneven_sizes(int p) {
  Sizes s(static_cast<std::size_t>(p));
  for (int r = 0; r < p; ++r) s[static_cast<std::size_t>(r)] = 7 + 5 * r + (r % 2 == 1 ? 4 : 0);
  return s;
}

// max |a - b| / (1 + max |b|) over two equally shaped matrices.
template <class S>
double rel_diff(ConstMatrixView<S> a, ConstMatrixView<S> b) {
  REQUIRE(a.rows == b.rows);
  REQUIRE(a.cols == b.cols);
  double diff = 0, scale = 0;
  for (Index i = 0; i < a.rows; ++i)
    for (Index j = 0; j < a.cols; ++j) {
      diff = std::max(diff, std::abs(static_cast<double>(a(i, j)) - static_cast<double>(b(i, j))));
      scale = std::max(scale, std::abs(static_cast<double>(b(i, j))));
    }
  return diff / (1 + scale);
}
template <class T>
double rel_diff(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  return rel_diff(ConstMatrixView<T>{a.data(), static_cast<Index>(a.size()), 1},
                  ConstMatrixView<T>{b.data(), static_cast<Index>(b.size()), 1});
}
template <class S>
double rel_diff(S a, S b) {
  return std::abs(static_cast<double>(a) - static_cast<double>(b)) / (1 + std::abs(static_cast<double>(b)));
}

template <class S>
ConstMatrixView<S> rows_of(ConstMatrixView<S> m, Index first, Index count) {
  return {m.data + first * m.stride, count, m.cols, m.stride};
}

template <class S>
std::vector<S> values_of(const MatrixView<S>& m) {
  std::vector<S> out;
  for (Index i = 0; i < m.rows; ++i)
    for (Index j = 0; j < m.cols; ++j) out.push_back(m(i, j));
  return out;
}

// Copies between two host views of the same shape (the CPU backend's copy).
template <class S>
void copy_view(ConstMatrixView<S> from, MatrixView<S> to) {
  REQUIRE(from.rows == to.rows);
  REQUIRE(from.cols == to.cols);
  for (Index i = 0; i < from.rows; ++i)
    for (Index j = 0; j < from.cols; ++j) to(i, j) = from(i, j);
}

enum class Setup { random, one_rank_experts };

// Sets the same weights on both layers (every rank the same): random, or a gate that sends every
// token to experts 0 and 1 (held by rank 0) when the inputs are positive.
template <class L, class R>
void set_weights(L& sharded, R& reference, Setup setup) {
  test::randomize_parameters(reference, 99, 0.5);
  if (setup == Setup::one_rank_experts) {
    for (auto& p : reference.parameters())
      if (p.name == "gate.w_gate")
        for (Index i = 0; i < p.value.rows; ++i)
          for (Index j = 0; j < p.value.cols; ++j) p.value(i, j) = j == 0 ? 3 : (j == 1 ? 2 : -3);
  }
  const ExpertShard shard = sharded.expert_shard();
  auto mine = sharded.parameters();
  for (auto& p : reference.parameters()) {
    const auto* q = test::find_parameter<L>(mine, p.name);
    REQUIRE(q != nullptr);
    if (p.name.rfind("experts.", 0) == 0) {
      const Index per = p.value.rows / reference.config().n_experts;
      copy_view(rows_of(ConstMatrixView<typename L::Scalar>(p.value), shard.first * per, q->value.rows), q->value);
    } else {
      copy_view(ConstMatrixView<typename L::Scalar>(p.value), q->value);
    }
  }
  sharded.verify_replicas();
}

// Every gradient of the sharded layer against the reference's: the replicated parameters whole,
// the rank's experts' slice of the stacked ones. Appends the sharded values to `values`.
template <class L, class R>
void check_gradients(L& sharded, R& reference, double tol, const char* when, std::vector<double>* values = nullptr) {
  using S = typename L::Scalar;
  const ExpertShard shard = sharded.expert_shard();
  const Index n = reference.config().n_experts;
  auto params = sharded.parameters();
  for (auto& p : reference.parameters()) {
    const auto* q = test::find_parameter<L>(params, p.name);
    REQUIRE(q != nullptr);
    ConstMatrixView<S> expected = p.grad;
    if (p.name.rfind("experts.", 0) == 0) expected = rows_of(expected, shard.first * (p.grad.rows / n), q->grad.rows);
    INFO(when << " " << p.name);
    CHECK(rel_diff(ConstMatrixView<S>(q->grad), expected) <= tol);
    if (values != nullptr)
      for (const S v : values_of(q->grad)) values->push_back(static_cast<double>(v));
  }
}

// Compares one training (or inference) step of the sharded layer with the reference on the
// concatenated batch; returns the sharded output and gradients for bit comparisons.
struct StepResult {
  std::vector<double> y, dx, grads;
};

template <class L, class R>
StepResult compare_step(const typename L::Config& config, const Sizes& sizes, Mode mode, double tol,
                        Setup setup = Setup::random, int steps = 1) {
  using S = typename L::Scalar;
  const int me = world_rank();
  L sharded(config, comm::Mpi(MPI_COMM_WORLD, {.timeout_seconds = 60}));
  R reference(config);
  set_weights(sharded, reference, setup);
  Index total = 0, offset = 0;
  for (int r = 0; r < static_cast<int>(sizes.size()); ++r) {
    if (r < me) offset += sizes[static_cast<std::size_t>(r)];
    total += sizes[static_cast<std::size_t>(r)];
  }
  const Index mine = sizes[static_cast<std::size_t>(me)], d = config.d_model;
  StepResult out;
  for (int step = 0; step < steps; ++step) {
    const double lo = setup == Setup::one_rank_experts ? 0.1 : -1.0;
    Matrix<S> x = test::random_matrix<S>(total, d, 1000 + static_cast<std::uint64_t>(step), lo, 1.0);
    Matrix<S> dy = test::random_matrix<S>(total, d, 2000 + static_cast<std::uint64_t>(step));
    Rng rng_sharded(7), rng_reference(7);
    const auto x_mine = rows_of(ConstMatrixView<S>(x.view()), offset, mine);
    auto f = sharded.forward(x_mine, mode, Noise<S>(rng_sharded));
    auto g = reference.forward(x.view(), mode, Noise<S>(rng_reference));
    // Output, routing and statistics.
    CHECK(rel_diff(f.y(), rows_of(g.y(), offset, mine)) <= tol);
    CHECK(rel_diff(f.gates(), rows_of(g.gates(), offset, mine)) <= tol);
    const auto ex = f.expert_index(), ex_ref = rows_of(g.expert_index(), offset, mine);
    Index routing_differs = 0;
    for (Index t = 0; t < mine; ++t)
      for (Index j = 0; j < ex.cols; ++j) routing_differs += ex(t, j) != ex_ref(t, j) ? 1 : 0;
    CHECK(routing_differs == 0);
    const auto& st = f.stats();
    const auto& sr = g.stats();
    CHECK(st.tokens_per_expert == sr.tokens_per_expert);
    CHECK(st.dropped_tokens == sr.dropped_tokens);
    CHECK(rel_diff(st.importance, sr.importance) <= tol);
    CHECK(rel_diff(st.load, sr.load) <= tol);
    CHECK(rel_diff(st.cv2_importance, sr.cv2_importance) <= tol);
    CHECK(rel_diff(st.cv2_load, sr.cv2_load) <= tol);
    CHECK(rel_diff(st.loss_z, sr.loss_z) <= tol);
    CHECK(rel_diff(st.loss, sr.loss) <= tol);
    REQUIRE(st.levels.size() == sr.levels.size());
    for (std::size_t l = 0; l < st.levels.size(); ++l) {
      CHECK(st.levels[l].count == sr.levels[l].count);
      CHECK(rel_diff(st.levels[l].importance, sr.levels[l].importance) <= tol);
      CHECK(rel_diff(st.levels[l].load, sr.levels[l].load) <= tol);
    }
    // Gradients: the input's rows, the replicated parameters whole, the rank's experts' slice.
    sharded.zero_grad();
    reference.zero_grad();
    const S aux_scale = S(1.5);
    auto b = sharded.backward(f, rows_of(ConstMatrixView<S>(dy.view()), offset, mine), aux_scale);
    auto c = reference.backward(g, dy.view(), aux_scale);
    CHECK(rel_diff(ConstMatrixView<S>(b.dx.view()), rows_of(ConstMatrixView<S>(c.dx.view()), offset, mine)) <= tol);
    check_gradients(sharded, reference, tol, "after one backward:", &out.grads);
    // A second backward adds to the gradients (no zero_grad between), as in one process.
    sharded.backward(f, rows_of(ConstMatrixView<S>(dy.view()), offset, mine), aux_scale);
    reference.backward(g, dy.view(), aux_scale);
    check_gradients(sharded, reference, tol, "accumulated over two:");
    for (const S v : values_of(MatrixView<S>(const_cast<S*>(f.y().data), f.y().rows, f.y().cols, f.y().stride)))
      out.y.push_back(static_cast<double>(v));
    for (const S v : values_of(b.dx.view())) out.dx.push_back(static_cast<double>(v));
    // The same optimizer step on both: the next step compares layers that trained together.
    optim::Adam<Cpu<S>> adam_s({.lr = 1e-2}), adam_r({.lr = 1e-2});
    adam_s.step(sharded.parameters());
    adam_r.step(reference.parameters());
    if (steps > 1) sharded.verify_replicas();
  }
  return out;
}

using FF = expert::FeedForward;

template <class S, int Depth = 1, class Gate = gate::NoisyTopK>
using Sharded = Layer<FF, Gate, Cpu<S>, Depth, comm::Mpi>;
template <class S, int Depth = 1, class Gate = gate::NoisyTopK>
using Reference = Layer<FF, Gate, Cpu<S>, Depth>;

template <class S>
typename Sharded<S>::Config flat_config() {
  typename Sharded<S>::Config c;
  c.d_model = 6;
  c.n_experts = 8;
  c.expert.hidden = 5;
  c.gate.k = 2;
  c.gate.w_z = 1e-2;
  c.seed = 3;
  return c;
}

}  // namespace

TEST_CASE("flat, training with drawn noise: every rank equals one process on the concatenated batch") {
  compare_step<Sharded<double>, Reference<double>>(flat_config<double>(), uneven_sizes(world_size()), Mode::train,
                                                   1e-12, Setup::random, 3);
}

TEST_CASE("flat, inference; and in float") {
  compare_step<Sharded<double>, Reference<double>>(flat_config<double>(), uneven_sizes(world_size()), Mode::inference,
                                                   1e-12);
  compare_step<Sharded<float>, Reference<float>>(flat_config<float>(), uneven_sizes(world_size()), Mode::train, 1e-5);
}

TEST_CASE("a rank with an empty batch; every token routed to the experts of rank 0") {
  Sizes sizes = uneven_sizes(world_size());
  sizes.back() = 0;
  if (world_size() == 1) sizes.back() = 3;
  compare_step<Sharded<double>, Reference<double>>(flat_config<double>(), sizes, Mode::train, 1e-12);
  auto config = flat_config<double>();
  config.gate.noisy = false;
  const auto r = compare_step<Sharded<double>, Reference<double>>(config, uneven_sizes(world_size()), Mode::inference,
                                                                  1e-12, Setup::one_rank_experts);
  CHECK(!r.y.empty());
}

TEST_CASE("SwiGLU experts, a noiseless top-k gate and a shared expert") {
  using S = Layer<expert::SwiGLU, gate::TopK, Cpu<double>, 1, comm::Mpi>;
  using R = Layer<expert::SwiGLU, gate::TopK, Cpu<double>, 1>;
  S::Config c;
  c.d_model = 5;
  c.n_experts = 6;
  c.expert.hidden = 4;
  c.gate.k = 2;
  c.shared_experts = 1;
  c.seed = 11;
  compare_step<S, R>(c, uneven_sizes(world_size()), Mode::train, 1e-12);
}

TEST_CASE("hierarchical (depth 2): groups are the unit of sharding, loads are global") {
  typename Sharded<double, 2>::Config c;
  c.d_model = 6;
  c.n_experts = 8;
  c.expert.hidden = 4;
  c.gate.levels[0].branching = 4;
  c.gate.levels[0].gate.k = 2;
  c.gate.levels[1].branching = 2;
  c.gate.levels[1].gate.k = 1;
  c.seed = 5;
  compare_step<Sharded<double, 2>, Reference<double, 2>>(c, uneven_sizes(world_size()), Mode::train, 1e-12,
                                                         Setup::random, 2);
  if (world_size() > 1) {
    Sharded<double, 2> layer(c, comm::Mpi());
    // Whole groups of 2 experts per rank.
    CHECK(layer.expert_shard().first % 2 == 0);
    CHECK(layer.experts().n_experts() % 2 == 0);
  }
}

TEST_CASE("a selection bias moved by the global batch's counts stays the same on every rank") {
  using S = Layer<FF, gate::SigmoidBias, Cpu<double>, 1, comm::Mpi>;
  using R = Layer<FF, gate::SigmoidBias, Cpu<double>, 1>;
  S::Config c;
  c.d_model = 6;
  c.n_experts = 8;
  c.expert.hidden = 3;
  c.gate.k = 2;
  c.gate.bias_rate = 0.05;
  c.seed = 9;
  compare_step<S, R>(c, uneven_sizes(world_size()), Mode::train, 1e-12, Setup::random, 3);
}

// Gates whose routing depends on the batch route each rank's batch on its own (capacity per
// rank's batch, as GShard's and Switch's groups); their own losses are the token-weighted mean
// of the ranks'. The reference: one process running each rank's batch in turn on the same
// weights, each backward weighting the gate's own losses by the rank's share of the tokens.
template <class L, class R>
void compare_per_rank_batches(const typename L::Config& config, double tol) {
  using S = typename L::Scalar;
  const int p = world_size(), me = world_rank();
  L sharded(config, comm::Mpi());
  R reference(config);
  set_weights(sharded, reference, Setup::random);
  const Sizes sizes = uneven_sizes(p);
  Index total = 0;
  for (const Index t : sizes) total += t;
  const S aux_scale = S(2);
  Matrix<S> x = test::random_matrix<S>(total, config.d_model, 31);
  Matrix<S> dy = test::random_matrix<S>(total, config.d_model, 32);
  reference.zero_grad();
  sharded.zero_grad();
  std::vector<Index> counts(static_cast<std::size_t>(config.n_experts), 0);
  Index dropped = 0;
  S loss_aux = 0, loss_z = 0;
  Index offset = 0;
  Matrix<S> y_mine, dx_mine;
  for (int r = 0; r < p; ++r) {
    const Index t = sizes[static_cast<std::size_t>(r)];
    const S share = static_cast<S>(t) / static_cast<S>(total);
    Rng rng(3);
    auto g = reference.forward(rows_of(ConstMatrixView<S>(x.view()), offset, t), Mode::train, rng);
    auto c = reference.backward(g, rows_of(ConstMatrixView<S>(dy.view()), offset, t), aux_scale * share);
    for (std::size_t e = 0; e < counts.size(); ++e) counts[e] += g.stats().tokens_per_expert[e];
    dropped += g.stats().dropped_tokens;
    loss_aux += share * g.stats().loss_aux;
    loss_z += share * g.stats().loss_z;
    if (r == me) {
      y_mine = Matrix<S>(t, config.d_model);
      copy_view(g.y(), y_mine.view());
      dx_mine = Matrix<S>(t, config.d_model);
      copy_view(ConstMatrixView<S>(c.dx.view()), dx_mine.view());
    }
    offset += t;
  }
  Index first = 0;
  for (int r = 0; r < me; ++r) first += sizes[static_cast<std::size_t>(r)];
  Rng rng(3);
  const Index mine = sizes[static_cast<std::size_t>(me)];
  auto f = sharded.forward(rows_of(ConstMatrixView<S>(x.view()), first, mine), Mode::train, rng);
  CHECK(rel_diff(f.y(), ConstMatrixView<S>(y_mine.view())) <= tol);
  CHECK(f.stats().tokens_per_expert == counts);
  CHECK(f.stats().dropped_tokens == dropped);
  CHECK(rel_diff(f.stats().loss_aux, loss_aux) <= tol);
  CHECK(rel_diff(f.stats().loss_z, loss_z) <= tol);
  auto b = sharded.backward(f, rows_of(ConstMatrixView<S>(dy.view()), first, mine), aux_scale);
  CHECK(rel_diff(ConstMatrixView<S>(b.dx.view()), ConstMatrixView<S>(dx_mine.view())) <= tol);
  check_gradients(sharded, reference, tol, "per-rank batches:");
}

TEST_CASE("Switch (capacity per rank's batch) and expert choice: each rank routes its own batch") {
  using SwitchS = Layer<FF, gate::Switch, Cpu<double>, 1, comm::Mpi>;
  using SwitchR = Layer<FF, gate::Switch, Cpu<double>, 1>;
  SwitchS::Config c;
  c.d_model = 6;
  c.n_experts = 8;
  c.expert.hidden = 4;
  c.gate.capacity_factor = 1.0;  // some tokens over capacity
  c.gate.w_z = 1e-2;
  c.seed = 13;
  compare_per_rank_batches<SwitchS, SwitchR>(c, 1e-12);
  using ChoiceS = Layer<FF, gate::ExpertChoice, Cpu<double>, 1, comm::Mpi>;
  using ChoiceR = Layer<FF, gate::ExpertChoice, Cpu<double>, 1>;
  ChoiceS::Config e;
  e.d_model = 6;
  e.n_experts = 8;
  e.expert.hidden = 4;
  e.gate.w_z = 1e-2;
  e.seed = 14;
  compare_per_rank_batches<ChoiceS, ChoiceR>(e, 1e-12);
}

TEST_CASE("the same bits run after run, and replicated weights the same bits on every rank after a step") {
  const auto a = compare_step<Sharded<double>, Reference<double>>(flat_config<double>(), uneven_sizes(world_size()),
                                                                  Mode::train, 1e-12, Setup::random, 2);
  const auto b = compare_step<Sharded<double>, Reference<double>>(flat_config<double>(), uneven_sizes(world_size()),
                                                                  Mode::train, 1e-12, Setup::random, 2);
  CHECK(a.y == b.y);
  CHECK(a.dx == b.dx);
  CHECK(a.grads == b.grads);
  // After training steps, rank 0's replicated weights, broadcast, equal every rank's bit for bit.
  Sharded<double> layer(flat_config<double>(), comm::Mpi());
  Matrix<double> x = test::random_matrix<double>(9, 6, 4);
  Rng rng(1);
  auto f = layer.forward(x.view(), Mode::train, rng);
  layer.zero_grad();
  Matrix<double> dy = test::random_matrix<double>(9, 6, 5 + static_cast<std::uint64_t>(world_rank()));
  layer.backward(f, dy.view());
  optim::Adam<Cpu<double>> adam({.lr = 1e-2});
  adam.step(layer.parameters());
  for (auto& p : layer.replicated_parameters()) {
    std::vector<double> mine = values_of(p.value), root = mine;
    MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_DOUBLE, 0, MPI_COMM_WORLD);
    INFO(p.name);
    CHECK(std::equal(mine.begin(), mine.end(), root.begin(),
                     [](double u, double v) { return std::memcmp(&u, &v, sizeof u) == 0; }));
  }
}

// A directory every rank names the same (made by rank 0).
std::filesystem::path shared_directory() {
  char path[256] = "/tmp/moe-layer-mpi-XXXXXX";
  if (world_rank() == 0) REQUIRE(mkdtemp(path) != nullptr);
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

TEST_CASE("a checkpoint written by every rank loads into one process and into 2 ranks with the same outputs") {
  const int p = world_size(), me = world_rank();
  const auto dir = shared_directory();
  const auto config = flat_config<double>();
  Sharded<double> writer(config, comm::Mpi());
  Reference<double> scratch(config);
  set_weights(writer, scratch, Setup::random);
  io::save_sharded(writer, dir);
  // One file per rank and the index.
  CHECK(std::filesystem::exists(dir / io::shard_file_name(me, p)));
  CHECK(std::filesystem::exists(dir / io::shard_index_name));

  // The sharded layer's output on each rank's rows, and one process's on the whole batch.
  const Sizes sizes = uneven_sizes(p);
  Index total = 0, offset = 0;
  for (int r = 0; r < p; ++r) {
    if (r < me) offset += sizes[static_cast<std::size_t>(r)];
    total += sizes[static_cast<std::size_t>(r)];
  }
  Matrix<double> x = test::random_matrix<double>(total, config.d_model, 77);
  const auto mine = rows_of(ConstMatrixView<double>(x.view()), offset, sizes[static_cast<std::size_t>(me)]);
  const auto y_written = writer.forward(mine, Mode::inference);

  Reference<double> one(config);
  test::randomize_parameters(one, 5);  // overwritten by the load
  io::load_sharded(one, dir);
  const auto y_one = one.forward(x.view(), Mode::inference);
  CHECK(rel_diff(y_written.y(), rows_of(y_one.y(), offset, mine.rows)) <= 1e-15);

  // Pairs of ranks, each pair a layer sharded over 2 ranks, on the same batch as the pair's first rank.
  if (p % 2 == 0) {
    MPI_Comm pair = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me / 2, me, &pair);
    Sharded<double> two(config, comm::Mpi(pair));
    io::load_sharded(two, dir / io::shard_index_name);
    const auto y_two = two.forward(mine, Mode::inference);
    CHECK(rel_diff(y_two.y(), y_written.y()) <= 1e-15);
    MPI_Comm_free(&pair);
  }

  // One file of a one-process save loads into the sharded layer (its other experts are not unexpected).
  if (me == 0) io::save(one, dir / "one.safetensors");
  MPI_Barrier(MPI_COMM_WORLD);
  Sharded<double> from_one(config, comm::Mpi());
  io::load(from_one, dir / "one.safetensors");
  CHECK(rel_diff(from_one.forward(mine, Mode::inference).y(), y_written.y()) <= 1e-15);
  if (p > 1)
    CHECK(contains(error_of([&] { io::save(from_one, dir / "x.safetensors"); }), "use moe::io::save_sharded"));
  // A missing file fails on the rank that needs it, naming it.
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 0) std::filesystem::remove(dir / io::shard_file_name(p - 1, p));
  MPI_Barrier(MPI_COMM_WORLD);
  Sharded<double> reader(config, comm::Mpi());
  const auto missing = error_of([&] { io::load_sharded(reader, dir); });
  if (reader.expert_shard().first + reader.experts().n_experts() > scratch.config().n_experts - 1 || p == 1)
    CHECK(contains(missing, io::shard_file_name(p - 1, p)));
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 0) std::filesystem::remove_all(dir);
}

namespace {

// The same gradients on both layers: random in the reference, each rank's share copied.
template <class L, class R>
void set_gradients(L& sharded, R& reference, std::uint64_t seed) {
  for (auto& p : reference.parameters()) test::fill_uniform(p.grad, ++seed, -1, 1);
  const ExpertShard shard = sharded.expert_shard();
  auto mine = sharded.parameters();
  for (auto& p : reference.parameters()) {
    const auto* q = test::find_parameter<L>(mine, p.name);
    REQUIRE(q != nullptr);
    ConstMatrixView<typename L::Scalar> from = p.grad;
    if (p.name.rfind("experts.", 0) == 0)
      from = rows_of(from, shard.first * (p.grad.rows / reference.config().n_experts), q->grad.rows);
    copy_view(from, q->grad);
  }
}

template <class S>
bool same_on_every_rank(S v) {
  S root = v;
  MPI_Bcast(&root, sizeof root, MPI_BYTE, 0, MPI_COMM_WORLD);
  return std::memcmp(&root, &v, sizeof v) == 0;
}

// The optimizer's state of the sharded layer's parameters equals the reference's, bit for bit: a
// reference holding every expert, its rows of the rank's experts; one sharded alike, the same.
template <class L, class OL, class R, class OR>
void check_same_moments(L& sharded, OL& sharded_opt, R& reference, OR& reference_opt) {
  using S = typename L::Scalar;
  const ExpertShard shard = sharded.expert_shard();
  auto params = sharded.parameters();
  for (auto& p : reference.parameters()) {
    const auto* q = test::find_parameter<L>(params, p.name);
    REQUIRE(q != nullptr);
    const auto theirs = reference_opt.state(p), mine = sharded_opt.state(*q);
    REQUIRE(theirs.size() == mine.size());
    for (std::size_t j = 0; j < mine.size(); ++j) {
      ConstMatrixView<S> expected = theirs[j];
      if (p.name.rfind("experts.", 0) == 0 && reference.experts().n_experts() == reference.config().n_experts)
        expected = rows_of(expected, shard.first * (p.value.rows / reference.config().n_experts), q->value.rows);
      INFO(p.name << " state " << j);
      CHECK(test::same_bits(ConstMatrixView<S>(mine[j]), expected));
    }
  }
  CHECK(sharded_opt.steps() == reference_opt.steps());
}

}  // namespace

TEST_CASE("the gradients' global norm: every rank's experts and the replicated parameters once, as one process") {
  const int p = world_size();
  auto c = flat_config<double>();
  c.shared_experts = 1;  // a replicated stack of experts as well
  Sharded<double> sharded(c, comm::Mpi(MPI_COMM_WORLD, {.timeout_seconds = 60}));
  Reference<double> reference(c);
  set_gradients(sharded, reference, 40);
  // Each expert's sum is made on the rank that holds it and added in the global order: the same
  // bits as one process, on every rank.
  const double norm = optim::grad_norm(sharded);
  CHECK(norm == optim::grad_norm(reference));
  CHECK(same_on_every_rank(norm));
  CHECK(optim::grad_norm<Cpu<double>>(sharded.parameters()) <= norm);  // this rank's alone
  CHECK(optim::clip_grad_norm(sharded, norm / 2) == norm);
  CHECK(optim::clip_grad_norm(reference, norm / 2) == norm);
  check_gradients(sharded, reference, 0.0, "clipped:");
  CHECK(optim::grad_norm(sharded) == optim::grad_norm(reference));
  // A NaN in the last rank's first expert: every rank refuses, naming it.
  const Index culprit = sharded.placement().bounds[static_cast<std::size_t>(p - 1)];
  if (world_rank() == p - 1)
    for (auto& q : sharded.parameters())
      if (q.name == "experts.w2") q.grad(1, 2) = std::nan("");
  const auto e = error_of([&] { (void)optim::clip_grad_norm(sharded, 1.0); });
  INFO(e);
  CHECK(contains(e, "the gradient of experts.w2 (expert " + std::to_string(culprit) + ") is nan"));
}

TEST_CASE("a sharded training checkpoint resumes bit for bit and loads into one process and into 2 ranks") {
  using Adam = optim::Adam<Cpu<double>>;
  const int p = world_size(), me = world_rank();
  const auto dir = shared_directory();
  auto c = flat_config<double>();
  c.shared_experts = 1;
  const Sizes sizes = uneven_sizes(p);
  const optim::WarmupCosine schedule{.lr = 2e-2, .warmup_steps = 2, .total_steps = 8, .min_lr = 1e-3};
  // Each rank's batch depends on the step and the rank; the noise is drawn from rng.
  const auto train = [&](Sharded<double>& layer, Adam& adam, Rng& rng, int steps) {
    for (int i = 0; i < steps; ++i) {
      const auto step = static_cast<std::uint64_t>(adam.steps());
      Matrix<double> x = test::random_matrix<double>(sizes[static_cast<std::size_t>(me)], c.d_model,
                                                     300 + 10 * step + static_cast<std::uint64_t>(me));
      Matrix<double> dy = test::random_matrix<double>(x.rows(), c.d_model, 500 + 10 * step + static_cast<std::uint64_t>(me));
      auto f = layer.forward(x.view(), Mode::train, rng);
      layer.zero_grad();
      layer.backward(f, dy.view());
      (void)optim::clip_grad_norm(layer, 0.5);
      adam.set_lr(schedule(adam.steps()));
      adam.step(layer.parameters());
    }
  };
  const Adam::Config oc{.lr = 2e-2, .weight_decay = 1e-2};
  Sharded<double> straight(c, comm::Mpi());
  Adam straight_adam(oc);
  Rng straight_rng(3);
  train(straight, straight_adam, straight_rng, 5);

  Sharded<double> first(c, comm::Mpi());
  Adam first_adam(oc);
  Rng first_rng(3);
  train(first, first_adam, first_rng, 3);
  io::save_sharded(first, first_adam, dir, {.noise = &first_rng});

  auto other_seed = c;
  other_seed.seed = 9;  // other initial weights: the load replaces them all
  Sharded<double> resumed(other_seed, comm::Mpi());
  Adam resumed_adam(oc);
  Rng resumed_rng(1);
  io::load_sharded(resumed, resumed_adam, dir, {.noise = &resumed_rng});
  check_same_moments(resumed, resumed_adam, first, first_adam);
  CHECK(resumed_rng.step() == first_rng.step());
  train(resumed, resumed_adam, resumed_rng, 2);
  auto a = straight.parameters(), b = resumed.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO(a[i].name);
    CHECK(test::same_bits(ConstMatrixView<double>(a[i].value), ConstMatrixView<double>(b[i].value)));
  }

  // One process reads every rank's state; two ranks read theirs from it.
  Reference<double> one(c);
  Adam one_adam(oc);
  io::load_sharded(one, one_adam, dir);
  check_same_moments(first, first_adam, one, one_adam);
  if (p % 2 == 0) {
    MPI_Comm pair = MPI_COMM_NULL;
    MPI_Comm_split(MPI_COMM_WORLD, me / 2, me, &pair);
    {
      Sharded<double> two(c, comm::Mpi(pair));
      Adam two_adam(oc);
      io::load_sharded(two, two_adam, dir / io::shard_index_name);
      check_same_moments(two, two_adam, one, one_adam);
    }
    MPI_Comm_free(&pair);
  }
  // The layer alone loads from it too.
  Sharded<double> weights(c, comm::Mpi());
  io::load_sharded(weights, dir);
  MPI_Barrier(MPI_COMM_WORLD);
  if (me == 0) std::filesystem::remove_all(dir);
}

TEST_CASE("every rank fails with a moe::Error: a different configuration, a refused input, too few experts") {
  const int p = world_size(), me = world_rank();
  if (p == 1) return;
  auto c = flat_config<double>();
  c.seed = me == 1 ? 4 : 3;  // rank 1's gate weights differ
  const auto differ = error_of([&] { Sharded<double> layer(c, comm::Mpi()); });
  INFO(differ);
  CHECK(contains(differ, "rank 1's configuration or replicated weights differ from rank 0's"));

  c = flat_config<double>();
  c.expert.hidden = me == p - 1 ? 6 : 5;  // a different expert shape on the last rank
  CHECK(contains(error_of([&] { Sharded<double> layer(c, comm::Mpi()); }), "configuration or replicated weights differ"));

  c = flat_config<double>();
  Sharded<double> layer(c, comm::Mpi());
  Matrix<double> x(4, me == 1 ? 5 : 6);  // rank 1 brings the wrong width
  test::fill_uniform(x.view(), 3, -1, 1);
  const auto refused = error_of([&] { layer.forward(x.view(), Mode::inference); });
  if (me == 1)
    CHECK(contains(refused, "input has 5 columns, expected d_model = 6"));
  else
    CHECK(contains(refused, "rank 1 refused its arguments"));
  // The layer is still usable after a refusal that every rank saw.
  Matrix<double> good(3, 6);
  test::fill_uniform(good.view(), 4, -1, 1);
  CHECK(layer.forward(good.view(), Mode::inference).y().rows == 3);

  // Modes that differ between ranks are refused on every rank.
  Rng rng(1);
  const auto modes = error_of([&] { layer.forward(good.view(), me == 0 ? Mode::train : Mode::inference, rng); });
  CHECK(contains(modes, "makes a different call"));

  c.n_experts = p - 1;
  CHECK(contains(error_of([&] { Sharded<double> few(c, comm::Mpi()); }),
                 "n_experts = " + std::to_string(p - 1) + " cannot be sharded over " + std::to_string(p) + " ranks"));
}

TEST_CASE("a rank that stops calling ends the others' forward with a moe::Error within the timeout") {
  const int p = world_size(), me = world_rank();
  if (p == 1) return;
  Sharded<double> layer(flat_config<double>(), comm::Mpi(MPI_COMM_WORLD, {.timeout_seconds = 1}));
  Matrix<double> x = test::random_matrix<double>(5, 6, 8);
  if (me != p - 1) {  // the last rank failed before its call (it never makes it)
    const double start = MPI_Wtime();
    const auto error = error_of([&] { layer.forward(x.view(), Mode::inference); });
    CHECK(contains(error, "no answer from the other ranks after 1 s"));
    CHECK(MPI_Wtime() - start < 30);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  doctest::Context context(argc, argv);
  if (world_rank() != 0) context.setOption("minimal", true);
  const int failed = context.run();
  int any = failed != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed != 0) std::fprintf(stderr, "layer_mpi: rank %d of %d failed\n", world_rank(), world_size());
  MPI_Finalize();
  return any;
}
