// Training around the layer: gradient clipping by global norm, learning-rate schedules, and
// training checkpoints (the optimizer's state and the gate noise saved with the layer) that
// resume bit for bit, with every file that does not fit refused by name. Where the CUDA
// backend's Thrust code builds for the host, the norm, the clipping and the optimizers' steps on
// it equal the CPU backend's bit for bit.

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include "moe/io/checkpoint.hpp"
#include "support.hpp"

#if __has_include("moe/backend/thrust_host.hpp") && __has_include(<thrust/version.h>)
#define MOE_TEST_THRUST_HOST 1
#include "moe/backend/thrust_host.hpp"
#endif

using namespace moe;
using moe::test::contains;
using moe::test::error_of;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system's temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("moe-training-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { fs::remove_all(path); }
};

// Host-owned parameters with their gradients: a vector, a matrix of more than one chunk of the
// norm's sum, and a stack of 3 experts whose slices span more than one chunk each.
template <class S>
struct HostParams {
  std::vector<std::vector<S>> values, grads;
  std::vector<Parameter<S>> params;

  HostParams() {
    const std::vector<std::pair<std::string, std::vector<Index>>> shapes = {
        {"gate.w_gate", {3}}, {"dense.w", {2, 1500}}, {"experts.w1", {3, 40, 30}}};
    for (const auto& [name, shape] : shapes) {
      Index size = 1;
      for (const Index e : shape) size *= e;
      values.emplace_back(static_cast<std::size_t>(size));
      grads.emplace_back(static_cast<std::size_t>(size));
    }
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const Index size = static_cast<Index>(values[i].size());
      const Index rows = shapes[i].second[0];
      params.push_back({shapes[i].first, shapes[i].second, {values[i].data(), rows, size / rows},
                        {grads[i].data(), rows, size / rows}});
      test::fill_uniform(params.back().value, 10 + i, -1, 1);
      test::fill_uniform(params.back().grad, 20 + i, -2, 2);
    }
  }
  HostParams(const HostParams&) = delete;
  HostParams& operator=(const HostParams&) = delete;

  [[nodiscard]] double reference_norm() const {
    long double sum = 0;
    for (const auto& g : grads)
      for (const S v : g) sum += static_cast<long double>(v) * static_cast<long double>(v);
    return static_cast<double>(std::sqrt(sum));
  }
};

template <class S>
bool same_bits(const std::vector<S>& a, const std::vector<S>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0;
}

template <class L>
std::vector<std::vector<typename L::Scalar>> all_values(L& layer) {
  std::vector<std::vector<typename L::Scalar>> out;
  for (auto& p : layer.parameters()) out.emplace_back(p.value.data, p.value.data + p.size());
  return out;
}
template <class L>
std::vector<std::vector<typename L::Scalar>> all_grads(L& layer) {
  std::vector<std::vector<typename L::Scalar>> out;
  for (auto& p : layer.parameters()) out.emplace_back(p.grad.data, p.grad.data + p.size());
  return out;
}
template <class S>
bool same_bits(const std::vector<std::vector<S>>& a, const std::vector<std::vector<S>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_bits(a[i], b[i])) return false;
  return true;
}

template <class S>
using Mixture = Layer<expert::FeedForward, gate::NoisyTopK, backend::Cpu<S>>;

// A noisy gate (the noise generator matters), biases and a shared expert (every kind of name).
template <class S>
typename Mixture<S>::Config mixture_config(std::uint64_t seed, Index hidden = 5) {
  typename Mixture<S>::Config c;
  c.d_model = 6;
  c.n_experts = 4;
  c.expert.hidden = hidden;
  c.expert.bias = true;
  c.gate.k = 2;
  c.shared_experts = 1;
  c.seed = seed;
  return c;
}

// The training step of the tests: the scheduled learning rate, a regression batch that depends
// on the step only, the noise drawn from rng, the gradients clipped, one optimizer step.
template <class L, class O>
void train(L& layer, O& optimizer, Rng& rng, int steps) {
  using S = typename L::Scalar;
  const optim::WarmupCosine schedule{.lr = 2e-2, .warmup_steps = 3, .total_steps = 12, .min_lr = 2e-3};
  const Index t = 16, d = layer.config().d_model;
  for (int i = 0; i < steps; ++i) {
    const auto step = static_cast<std::uint64_t>(optimizer.steps());
    const auto x = test::random_matrix<S>(t, d, 100 + step);
    auto f = layer.forward(x.view(), Mode::train, rng);
    test::Matrix<S> dy(t, d);
    for (Index r = 0; r < t; ++r)
      for (Index c = 0; c < d; ++c) dy(r, c) = S(2) * (f.y()(r, c) - std::sin(S(2) * x(r, (c + 1) % d))) / S(t);
    layer.zero_grad();
    (void)layer.backward(f, dy.view());
    (void)optim::clip_grad_norm(layer, 0.05);  // below the norm of most steps: clipping acts
    optimizer.set_lr(schedule(optimizer.steps()));
    optimizer.step(layer.parameters());
  }
}

}  // namespace

// Clipping.

TEST_CASE_TEMPLATE("grad_norm is the L2 norm of every gradient together, and clip_grad_norm scales to max_norm",
                   S, float, double) {
  using B = backend::Cpu<S>;
  HostParams<S> h;
  const double norm = optim::grad_norm<B>(h.params);
  CHECK(norm == doctest::Approx(h.reference_norm()).epsilon(1e-13));
  // No thread count changes a bit.
  CHECK(optim::grad_norm<B>(h.params, 1) == norm);
  CHECK(optim::grad_norm<B>(h.params, 3) == norm);

  // At or below max_norm: the gradients are left alone, bit for bit.
  const auto before = h.grads;
  CHECK(optim::clip_grad_norm<B>(h.params, norm) == norm);
  CHECK(optim::clip_grad_norm<B>(h.params, 2 * norm) == norm);
  CHECK(same_bits(h.grads, before));

  // Above: every gradient times max_norm / norm; the norm before clipping is returned.
  const double max_norm = norm / 3;
  CHECK(optim::clip_grad_norm<B>(h.params, max_norm) == norm);
  const S scale = static_cast<S>(max_norm / norm);
  bool scaled = true;
  for (std::size_t i = 0; i < before.size(); ++i)
    for (std::size_t e = 0; e < before[i].size(); ++e) scaled = scaled && h.grads[i][e] == before[i][e] * scale;
  CHECK(scaled);
  CHECK(optim::grad_norm<B>(h.params) == doctest::Approx(max_norm).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-13));
}

TEST_CASE("clip_grad_norm refuses a bad max_norm, and a non-finite norm naming the parameter, changing nothing") {
  using B = backend::Cpu<double>;
  HostParams<double> h;
  for (const double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    const auto e = error_of([&] { (void)optim::clip_grad_norm<B>(h.params, bad); });
    CAPTURE(e);
    CHECK(contains(e, "optim::clip_grad_norm: max_norm = "));
    CHECK(contains(e, ", expected a finite value > 0"));
  }
  // A NaN in expert 2's slice of a stacked parameter: named with the expert.
  h.grads[2][2 * 1200 + 17] = std::nan("");
  const auto before = h.grads;
  auto e = error_of([&] { (void)optim::clip_grad_norm<B>(h.params, 1.0); });
  CAPTURE(e);
  CHECK(contains(e, "optim::clip_grad_norm: the gradients' global norm is nan"));
  CHECK(contains(e, "the gradient of experts.w1 (expert 2) is nan"));
  CHECK(contains(e, "the gradients are left as they were"));
  for (std::size_t i = 0; i < before.size(); ++i)
    for (std::size_t k = 0; k < before[i].size(); ++k)
      CHECK((std::isnan(before[i][k]) ? std::isnan(h.grads[i][k]) : h.grads[i][k] == before[i][k]));
  // grad_norm reports it without an error: a loop can skip the step instead.
  CHECK(std::isnan(optim::grad_norm<B>(h.params)));
  // An infinity, and finite values whose squares overflow double.
  h.grads[2][2 * 1200 + 17] = 0;
  h.grads[0][1] = -std::numeric_limits<double>::infinity();
  e = error_of([&] { (void)optim::clip_grad_norm<B>(h.params, 1.0); });
  CHECK(contains(e, "the gradient of gate.w_gate is inf"));
  h.grads[0][1] = 0;
  h.grads[1][5] = 1e200;
  e = error_of([&] { (void)optim::clip_grad_norm<B>(h.params, 1.0); });
  CHECK(contains(e, "the gradient of dense.w is inf"));
  CHECK(std::isinf(optim::grad_norm<B>(h.params)));
}

TEST_CASE("the layer overloads equal the parameters' overloads, bit for bit") {
  using L = Mixture<double>;
  L a(mixture_config<double>(3));
  L b(mixture_config<double>(3));
  Rng ra(5), rb(5);
  const auto x = test::random_matrix<double>(12, 6, 1);
  const auto dy = test::random_matrix<double>(12, 6, 2);
  for (auto* layer : {&a, &b}) {
    auto f = layer->forward(x.view(), Mode::train, layer == &a ? ra : rb);
    layer->zero_grad();
    (void)layer->backward(f, dy.view());
  }
  const double norm = optim::grad_norm(a);
  CHECK(norm > 0);
  CHECK(optim::grad_norm<backend::Cpu<double>>(b.parameters(), 1) == norm);
  CHECK(optim::clip_grad_norm(a, norm / 4) == norm);
  CHECK(optim::clip_grad_norm<backend::Cpu<double>>(b.parameters(), norm / 4) == norm);
  CHECK(same_bits(all_grads(a), all_grads(b)));
  CHECK(optim::grad_norm(a) == doctest::Approx(norm / 4).epsilon(1e-14));
}

// Schedules.

TEST_CASE("schedules: constant, linear warm-up, cosine decay to a floor, warm-up then cosine") {
  static_assert(optim::Schedule<optim::WarmupCosine>);
  static_assert(optim::Schedule<decltype([](long s) { return 1.0 / static_cast<double>(s + 1); })>);
  const optim::Constant constant{.lr = 0.3};
  CHECK(constant(0) == 0.3);
  CHECK(constant(1000) == 0.3);

  const optim::LinearWarmup warmup{.lr = 1.0, .warmup_steps = 4};
  const std::vector<double> expected_warmup{0.25, 0.5, 0.75, 1.0, 1.0, 1.0};
  for (long s = 0; s < 6; ++s) CHECK(warmup(s) == expected_warmup[static_cast<std::size_t>(s)]);
  CHECK(optim::LinearWarmup{.lr = 0.5, .warmup_steps = 0}(0) == 0.5);

  const optim::CosineDecay cosine{.lr = 1.0, .decay_steps = 4, .min_lr = 0.2};
  CHECK(cosine(0) == 1.0);
  CHECK(cosine(1) == doctest::Approx(0.2 + 0.8 * 0.5 * (1 + std::cos(std::numbers::pi / 4))).epsilon(1e-15));
  CHECK(cosine(2) == doctest::Approx(0.6).epsilon(1e-15));
  CHECK(cosine(4) == 0.2);
  CHECK(cosine(100) == 0.2);
  for (long s = 0; s < 4; ++s) CHECK(cosine(s + 1) < cosine(s));

  const optim::WarmupCosine both{.lr = 2.0, .warmup_steps = 2, .total_steps = 6, .min_lr = 0.5};
  CHECK(both(0) == 1.0);
  CHECK(both(1) == 2.0);
  CHECK(both(2) == 2.0);  // the cosine's first step
  CHECK(both(4) == doctest::Approx(1.25).epsilon(1e-15));
  CHECK(both(6) == 0.5);
  CHECK(both(1000) == 0.5);
  CHECK(optim::WarmupCosine{.lr = 1.0, .warmup_steps = 0, .total_steps = 4}(2) == doctest::Approx(0.5).epsilon(1e-15));
}

TEST_CASE("schedules refuse bad fields and steps, naming them") {
  CHECK(contains(error_of([] { (void)optim::Constant{.lr = 0}(0); }), "optim::Constant: lr = 0, expected a finite value > 0"));
  CHECK(contains(error_of([] { (void)optim::Constant{.lr = 1}(-1); }), "optim::Constant: step = -1, expected >= 0"));
  CHECK(contains(error_of([] { (void)optim::LinearWarmup{.lr = 1, .warmup_steps = -2}(0); }),
                 "optim::LinearWarmup: warmup_steps = -2, expected >= 0"));
  CHECK(contains(error_of([] { (void)optim::CosineDecay{.lr = 1, .decay_steps = 0}(0); }),
                 "optim::CosineDecay: decay_steps = 0, expected >= 1"));
  CHECK(contains(error_of([] { (void)optim::CosineDecay{.lr = 1, .decay_steps = 5, .min_lr = 2}(0); }),
                 "optim::CosineDecay: min_lr = 2, expected 0 <= min_lr <= lr = 1"));
  CHECK(contains(error_of([] { (void)optim::WarmupCosine{.lr = 1, .warmup_steps = 5, .total_steps = 5}(0); }),
                 "optim::WarmupCosine: warmup_steps = 5, total_steps = 5, expected 0 <= warmup_steps < total_steps"));
  CHECK(contains(error_of([] { (void)optim::WarmupCosine{.lr = std::nan(""), .total_steps = 5}(0); }),
                 "optim::WarmupCosine: lr = nan"));
}

TEST_CASE("set_lr: the next steps use the new learning rate, exactly as an optimizer built with it") {
  using B = backend::Cpu<double>;
  std::vector<double> a{1.0, -2.0, 0.5}, b = a, ga{0.5, -3.0, 0.25}, gb = ga;
  std::vector<Parameter<double>> pa{{"w", {3}, {a.data(), 1, 3}, {ga.data(), 1, 3}}};
  std::vector<Parameter<double>> pb{{"w", {3}, {b.data(), 1, 3}, {gb.data(), 1, 3}}};
  optim::Adam<B> scheduled({.lr = 0.1, .weight_decay = 0.01}), built({.lr = 0.025, .weight_decay = 0.01});
  CHECK(scheduled.lr() == 0.1);
  scheduled.set_lr(0.025);
  CHECK(scheduled.lr() == 0.025);
  CHECK(scheduled.config().lr == 0.1);
  for (int s = 0; s < 3; ++s) {
    scheduled.step(pa);
    built.step(pb);
  }
  CHECK(a == b);
  optim::Sgd<B> sgd({.lr = 0.1, .momentum = 0.5}), sgd_built({.lr = 0.05, .momentum = 0.5});
  sgd.set_lr(0.05);
  sgd.step(pa);
  sgd_built.step(pb);
  CHECK(a == b);
  CHECK(sgd.steps() == 1);
  // 0 is allowed (a schedule may end there): Adam's moments move, the weights do not (no decay).
  optim::Adam<B> still({.lr = 0.1});
  still.set_lr(0);
  const auto kept = a;
  still.step(pa);
  CHECK(a == kept);
  CHECK(contains(error_of([&] { still.set_lr(-1); }), "optim::Adam: set_lr(-1), expected a finite lr >= 0"));
  CHECK(contains(error_of([&] { sgd.set_lr(std::nan("")); }), "optim::Sgd: set_lr(nan), expected a finite lr >= 0"));
  CHECK(contains(error_of([&] { sgd.set_steps(-1); }), "optim::Sgd: steps = -1, expected >= 0"));
}

// Training checkpoints.

namespace {

// N steps, a save, a fresh layer (other initial weights), optimizer and noise generator loaded
// from the file, M more steps: the same bits as N + M steps without a stop.
template <class S, class O>
void check_resume(const typename O::Config& oc) {
  using L = Mixture<S>;
  TempDir dir;
  const fs::path file = dir.path / "run.safetensors";
  L straight(mixture_config<S>(1));
  O straight_opt(oc);
  Rng straight_rng(7);
  train(straight, straight_opt, straight_rng, 9);

  L first(mixture_config<S>(1));
  O first_opt(oc);
  Rng first_rng(7);
  train(first, first_opt, first_rng, 5);
  io::save(first, first_opt, file, {.noise = &first_rng});

  L resumed(mixture_config<S>(2));  // other initial weights: the load must replace them all
  O resumed_opt(oc);
  Rng resumed_rng(99);
  io::load(resumed, resumed_opt, file, {.noise = &resumed_rng});
  CHECK(resumed_opt.steps() == 5);
  CHECK(resumed_opt.lr() == first_opt.lr());
  CHECK(resumed_rng.seed() == 7);
  CHECK(resumed_rng.step() == first_rng.step());
  train(resumed, resumed_opt, resumed_rng, 4);
  CHECK(resumed_opt.steps() == 9);
  CHECK(same_bits(all_values(resumed), all_values(straight)));

  // Each part of the state matters: without the optimizer's, or without the noise's position,
  // the resumed run goes elsewhere.
  L weights_only(mixture_config<S>(2));
  O fresh_opt(oc);
  Rng rng_only(99);
  io::load(weights_only, file, {.noise = &rng_only});
  fresh_opt.set_steps(5);
  train(weights_only, fresh_opt, rng_only, 4);
  if (!fresh_opt.state_tensors().empty()) CHECK_FALSE(same_bits(all_values(weights_only), all_values(straight)));
  L no_noise(mixture_config<S>(2));
  O no_noise_opt(oc);
  Rng restarted(7);
  io::load(no_noise, no_noise_opt, file);
  train(no_noise, no_noise_opt, restarted, 4);
  CHECK_FALSE(same_bits(all_values(no_noise), all_values(straight)));
}

}  // namespace

TEST_CASE("a training checkpoint resumes Adam bit for bit: double and float") {
  check_resume<double, optim::Adam<backend::Cpu<double>>>({.lr = 1e-2, .beta2 = 0.99, .weight_decay = 1e-3});
  check_resume<float, optim::Adam<backend::Cpu<float>>>({.lr = 1e-2, .beta2 = 0.99, .weight_decay = 1e-3});
}

TEST_CASE("a training checkpoint resumes SGD with momentum bit for bit, and SGD without momentum stores no state") {
  check_resume<double, optim::Sgd<backend::Cpu<double>>>({.lr = 5e-2, .momentum = 0.9});
  check_resume<float, optim::Sgd<backend::Cpu<float>>>({.lr = 5e-2, .momentum = 0.9});
  Mixture<double> layer(mixture_config<double>(1));
  optim::Sgd<backend::Cpu<double>> plain({.lr = 0.1});
  const auto tensors = io::checkpoint_tensors(layer, plain);
  CHECK(tensors.size() == io::checkpoint_tensors(layer).size());
  const auto file = io::SafeTensors::parse(io::checkpoint(layer, plain).bytes());
  CHECK(file.metadata().at("optimizer") == "sgd");
  CHECK(file.metadata().at("optimizer.momentum") == "0");
}

namespace {

// Every tensor of `file` written again to `to`, with edit(name, shape, values, dtype) free to
// change each (returning false drops it) and edit_meta free to change the metadata.
using Edit = std::function<bool(const std::string&, std::vector<std::int64_t>&, std::vector<double>&, io::Dtype&)>;
void rewrite(const fs::path& from, const fs::path& to, const Edit& edit,
             const std::function<void(io::Metadata&)>& edit_meta = {}) {
  const auto file = io::SafeTensors::open(from);
  io::SafeTensorsWriter w;
  io::Metadata meta = file.metadata();
  if (edit_meta) edit_meta(meta);
  for (const auto& [k, v] : meta) w.set_metadata(k, v);
  for (const auto& t : file.tensors()) {
    std::vector<std::int64_t> shape = t.shape;
    std::vector<double> values = file.read<double>(t.name);
    io::Dtype dtype = t.dtype;
    if (!edit(t.name, shape, values, dtype)) continue;
    if (io::is_floating(dtype)) {
      w.add(t.name, shape, values, dtype);
    } else {
      const std::vector<std::int64_t> ints(values.begin(), values.end());
      w.add(t.name, shape, ints, dtype);
    }
  }
  w.write(to);
}
const Edit keep = [](const std::string&, std::vector<std::int64_t>&, std::vector<double>&, io::Dtype&) { return true; };

}  // namespace

TEST_CASE("a training checkpoint that does not fit is refused, naming what is wrong, and nothing changes") {
  using B = backend::Cpu<double>;
  using L = Mixture<double>;
  using Adam = optim::Adam<B>;
  TempDir dir;
  const fs::path good = dir.path / "good.safetensors", bad = dir.path / "bad.safetensors";
  L trained(mixture_config<double>(1));
  Adam trained_opt({.lr = 1e-2});
  Rng rng(3);
  train(trained, trained_opt, rng, 3);
  io::save(trained, trained_opt, good, {.noise = &rng});

  L layer(mixture_config<double>(2));
  Adam adam({.lr = 1e-2});
  Rng noise(11);
  const auto values_before = all_values(layer);
  // Loads that must fail; afterwards the layer, the optimizer and the noise are as they were.
  const auto refused = [&](const fs::path& path, const std::string& part, const io::LoadOptions& options = {}) {
    io::LoadOptions o = options;
    o.noise = &noise;
    const auto e = error_of([&] { io::load(layer, adam, path, o); });
    CAPTURE(e);
    CHECK(contains(e, part));
    CHECK(same_bits(all_values(layer), values_before));
    CHECK(adam.steps() == 0);
    CHECK(adam.lr() == 1e-2);
    CHECK(noise.seed() == 11);
    CHECK(noise.step() == 0);
  };
  const auto edited = [&](const Edit& edit, const std::function<void(io::Metadata&)>& edit_meta = {}) {
    rewrite(good, bad, edit, edit_meta);
    return bad;
  };
  // The same file written again loads (the rewrite keeps what matters).
  {
    L copy(mixture_config<double>(2));
    Adam copy_opt({.lr = 1e-2});
    io::load(copy, copy_opt, edited(keep));
    CHECK(same_bits(all_values(copy), all_values(trained)));
  }

  // A layer checkpoint without the optimizer's state.
  io::save(trained, dir.path / "weights.safetensors");
  refused(dir.path / "weights.safetensors", "no optimizer state (metadata 'optimizer' is missing)");
  // Another optimizer's state; other settings.
  {
    optim::Sgd<B> sgd({.lr = 0.1, .momentum = 0.5});
    const auto e = error_of([&] { io::load(layer, sgd, good); });
    CHECK(contains(e, "good.safetensors: metadata 'optimizer' = 'adam', but the optimizer is sgd"));
    Adam other({.lr = 1e-2, .beta2 = 0.95});
    CHECK(contains(error_of([&] { io::load(layer, other, good); }),
                   "metadata 'optimizer.beta2' = 0.999, but the optimizer has 0.95 (LoadOptions::check_config = false"));
  }
  // Other parameters: another layer's configuration, or (unchecked) its shapes.
  {
    L wider(mixture_config<double>(1, 7));
    Adam wider_opt({.lr = 1e-2});
    CHECK(contains(error_of([&] { io::load(wider, wider_opt, good); }), "metadata 'config.expert.hidden' = 5, but the layer has 7"));
    CHECK(contains(error_of([&] { io::load(wider, wider_opt, good, {.check_config = false}); }),
                   "tensor 'experts.0.w1' has shape [6, 5], expected [6, 7]"));
  }
  // The optimizer's tensors: a shape, a NaN, a negative second moment, an integer dtype, one
  // missing, one unexpected.
  refused(edited([](const std::string& name, auto& shape, auto& values, auto&) {
            if (name == "optimizer.v.experts.1.w2") {
              shape = {4, 6};
              values.resize(24);
            }
            return true;
          }),
          "tensor 'optimizer.v.experts.1.w2' has shape [4, 6], expected [5, 6]");
  refused(edited([](const std::string& name, auto&, auto& values, auto&) {
            if (name == "optimizer.m.gate.w_gate") values[3] = std::nan("");
            return true;
          }),
          "tensor 'optimizer.m.gate.w_gate': element 3 is nan, expected finite values");
  refused(edited([](const std::string& name, auto&, auto& values, auto&) {
            if (name == "optimizer.v.experts.0.w1") values[2] = -1;
            return true;
          }),
          "tensor 'optimizer.v.experts.0.w1': element 2 is -1, expected values >= 0");
  refused(edited([](const std::string& name, auto&, auto& values, auto& dtype) {
            if (name == "optimizer.m.shared_experts.0.w2") {
              dtype = io::Dtype::I64;
              for (auto& v : values) v = 0;
            }
            return true;
          }),
          "tensor 'optimizer.m.shared_experts.0.w2' has dtype I64, expected a floating dtype");
  refused(edited([](const std::string& name, auto&, auto&, auto&) { return name != "optimizer.v.shared_experts.0.b1"; }),
          "no tensor 'optimizer.v.shared_experts.0.b1', expected the optimizer's state of every tensor of the layer");
  {
    io::SafeTensorsWriter w = io::checkpoint(trained, trained_opt, {.noise = &rng});
    w.add("optimizer.m.experts.9.w1", {6, 5}, std::vector<double>(30, 0.0));
    w.write(bad);
    refused(bad, "tensor 'optimizer.m.experts.9.w1' is not one of the layer's or the optimizer's");
  }
  // The metadata: the step count, the learning rate, the noise.
  refused(edited(keep, [](io::Metadata& m) { m["optimizer.steps"] = "-3"; }),
          "metadata 'optimizer.steps' = -3, expected an integer >= 0");
  refused(edited(keep, [](io::Metadata& m) { m["optimizer.steps"] = "3.5"; }),
          "metadata 'optimizer.steps' = '3.5', expected the optimizer's step count");
  refused(edited(keep, [](io::Metadata& m) { m.erase("optimizer.steps"); }), "metadata has no 'optimizer.steps'");
  refused(edited(keep, [](io::Metadata& m) { m["optimizer.lr"] = "inf"; }),
          "metadata 'optimizer.lr' = inf, expected a finite learning rate >= 0");
  refused(edited(keep, [](io::Metadata& m) { m.erase("noise.step"); }), "metadata has no 'noise.step'");
  // A layer tensor that does not fit: nothing changes either (the optimizer's are read first too).
  refused(edited([](const std::string& name, auto&, auto& values, auto&) {
            if (name == "experts.3.b2") values[0] = std::nan("");
            return true;
          }),
          "tensor 'experts.3.b2': element 0 is nan");

  // Settings are not checked when asked not to; the weights alone load from a training checkpoint.
  Adam other({.lr = 1e-2, .beta2 = 0.95});
  io::load(layer, other, good, {.check_config = false});
  CHECK(other.steps() == 3);
  L weights(mixture_config<double>(2));
  io::load(weights, good);
  CHECK(same_bits(all_values(weights), all_values(trained)));
  L built = io::load_layer<L>(good);
  CHECK(same_bits(all_values(built), all_values(trained)));
  // The checkpoint's own metadata keys are not the caller's to set.
  CHECK(contains(error_of([&] { io::save(trained, trained_opt, bad, {.metadata = {{"optimizer.steps", "1"}}}); }),
                 "metadata key 'optimizer.steps' is the checkpoint's own"));
  CHECK(contains(error_of([&] { io::save(trained, bad, {.metadata = {{"moe.gate", "x"}}}); }),
                 "metadata key 'moe.gate' is the layer's own"));
}

TEST_CASE("a training checkpoint stores the optimizer's state under the layer's names, in the layer's scalar") {
  using B = backend::Cpu<float>;
  Layer<expert::FeedForward, gate::NoisyTopK, B> layer(mixture_config<float>(1));
  optim::Adam<B> adam({.lr = 1e-2});
  Rng rng(1);
  train(layer, adam, rng, 2);
  const auto file = io::SafeTensors::parse(io::checkpoint(layer, adam, {.dtype = io::Dtype::BF16}).bytes());
  CHECK(file.info("experts.2.w1").dtype == io::Dtype::BF16);
  const auto& m = file.info("optimizer.m.experts.2.w1");
  CHECK(m.dtype == io::Dtype::F32);
  CHECK(m.shape == std::vector<std::int64_t>{6, 5});
  CHECK(file.info("optimizer.v.shared_experts.0.b2").shape == std::vector<std::int64_t>{6});
  CHECK(file.contains("optimizer.v.gate.w_noise"));
  CHECK(file.metadata().at("optimizer.steps") == "2");
  CHECK(file.metadata().at("optimizer.beta1") == "0.9");
  // Expert 2's moment is rows 2 of the stacked state.
  const auto stacked = adam.moments(layer.parameters()[2]);
  CHECK(layer.parameters()[2].name == "experts.w1");
  const auto stored = file.read<float>("optimizer.m.experts.2.w1");
  CHECK(std::memcmp(stored.data(), stacked.first.data + 2 * 30, 30 * sizeof(float)) == 0);
  CHECK(io::checkpoint_tensors(layer, adam).size() == 3 * io::checkpoint_tensors(layer).size());
}

#ifdef MOE_TEST_THRUST_HOST
TEST_CASE("ThrustHost: the norm, the clipping and the optimizers' steps equal the CPU backend's, bit for bit") {
  using Host = backend::ThrustHost<float>;
  using Cpu = backend::Cpu<float>;
  HostParams<float> a, b;
  CHECK(optim::grad_norm<Host>(a.params) == optim::grad_norm<Cpu>(b.params));
  const double max_norm = optim::grad_norm<Cpu>(b.params) / 2;
  CHECK(optim::clip_grad_norm<Host>(a.params, max_norm) == optim::clip_grad_norm<Cpu>(b.params, max_norm));
  CHECK(same_bits(a.grads, b.grads));
  optim::Adam<Host> adam_a({.lr = 1e-2, .weight_decay = 0.1});
  optim::Adam<Cpu> adam_b({.lr = 1e-2, .weight_decay = 0.1});
  optim::Sgd<Host> sgd_a({.lr = 1e-2, .momentum = 0.9});
  optim::Sgd<Cpu> sgd_b({.lr = 1e-2, .momentum = 0.9});
  for (int s = 0; s < 3; ++s) {
    adam_a.set_lr(1e-2 / (s + 1));
    adam_b.set_lr(1e-2 / (s + 1));
    adam_a.step(a.params);
    adam_b.step(b.params);
    sgd_a.step(a.params);
    sgd_b.step(b.params);
  }
  CHECK(same_bits(a.values, b.values));
}
#endif
