// The concepts accept the built-in types and reject a type missing a member.

#include "moe/io/checkpoint.hpp"
#include "support.hpp"

using namespace moe;

namespace {
using B = backend::Cpu<float>;

static_assert(Backend<backend::Cpu<float>>);
static_assert(Backend<backend::Cpu<double>>);
static_assert(GatePolicy<gate::NoisyTopK::Policy<B>, B>);
static_assert(GatePolicy<gate::Softmax::Policy<B>, B>);
static_assert(GateFamily<gate::NoisyTopK, B>);
static_assert(GateFamily<gate::Softmax, B>);
static_assert(GateFamily<gate::TopK, B>);
static_assert(GateFamily<gate::Switch, B>);
static_assert(GateFamily<gate::ExpertChoice, B>);
static_assert(GateFamily<gate::SigmoidBias, B>);
// A hierarchy is a gate; the layer of depth D uses it in place of the level gate.
static_assert(GateFamily<gate::Hierarchy<gate::NoisyTopK, 2>, B>);
static_assert(GateFamily<gate::Hierarchy<gate::Switch, 3>, B>);
static_assert(std::is_same_v<Layer<expert::FeedForward, gate::TopK, B, 2>::GatePolicy,
                             gate::Hierarchy<gate::TopK, 2>::Policy<B>>);
static_assert(std::is_same_v<Layer<expert::FeedForward, gate::TopK, B>::GatePolicy, gate::TopK::Policy<B>>);
static_assert(ExpertGroup<expert::FeedForward::Group<B>, B>);
static_assert(ExpertFamily<expert::FeedForward, B>);
static_assert(ExpertFamily<expert::SwiGLU, B>);
static_assert(Communicator<comm::Local>);

// A backend without its primitives.
struct HalfBackend {
  using Scalar = float;
  struct Context {};
  template <class T>
  using Buffer = backend::HostMatrix<T>;
};
static_assert(!Backend<HalfBackend>);
static_assert(!Backend<int>);

// A gate that forgot backward.
struct NoBackwardGate {
  struct Saved {};
  Index k() const { return 1; }
  Index n_experts() const { return 1; }
  bool needs_noise(Mode) const { return false; }
  BalanceWeights balance_weights() const { return {}; }
  void forward(B::Context&, ConstMatrixView<float>, const Index*, Mode, const GateNoise<float>&, GateRouting<B>&,
               Saved&) {}
  std::vector<Parameter<float>> parameters() { return {}; }
};
static_assert(!GatePolicy<NoBackwardGate, B>);

// The same gate with backward is accepted: the concept asks for exactly this set.
struct FullGate : NoBackwardGate {
  void backward(B::Context&, ConstMatrixView<float>, const Index*, const Saved&, ConstMatrixView<float>, const float*,
                float, MatrixView<float>) {}
};
static_assert(GatePolicy<FullGate, B>);

// An expert group without named parameters.
struct NoParametersExperts {
  struct Saved {};
  Index n_experts() const { return 1; }
  void forward(B::Context&, ConstMatrixView<float>, const Index*, MatrixView<float>, Saved&) const {}
  void backward(B::Context&, ConstMatrixView<float>, const Index*, const Saved&, ConstMatrixView<float>,
                MatrixView<float>) {}
};
static_assert(!ExpertGroup<NoParametersExperts, B>);

struct WithParametersExperts : NoParametersExperts {
  std::vector<Parameter<float>> parameters() { return {}; }
};
static_assert(ExpertGroup<WithParametersExperts, B>);

// A communicator without barrier.
struct NoBarrier {
  int rank() const { return 0; }
  int size() const { return 1; }
  void all_reduce_sum(double*, Index) {}
  void all_reduce_sum(float*, Index) {}
  void all_reduce_sum(std::int64_t*, Index) {}
  void all_to_all_v(const std::byte*, const Index*, std::byte*, const Index*) {}
  void all_gather(const std::byte*, Index, std::byte*) {}
  std::int64_t exclusive_scan(std::int64_t) { return 0; }
  void broadcast(std::byte*, Index, int) {}
};
static_assert(!Communicator<NoBarrier>);
struct WithBarrier : NoBarrier {
  void barrier() {}
};
static_assert(Communicator<WithBarrier>);

// The per-expert adapter makes a group from a simple expert.
struct Scale {
  struct Config {};
  static std::vector<expert::ParamSpec> parameters(const Config&, Index d) { return {{"s", 1, d}}; }
  template <class S>
  static void forward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::Out<S> y) {
    y = x.array().rowwise() * w[0].row(0).array();
  }
  template <class S>
  static void backward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::In<S> dy, expert::Out<S> dx,
                       expert::Grads<S> g) {
    dx = dy.array().rowwise() * w[0].row(0).array();
    g[0].row(0) += (x.array() * dy.array()).colwise().sum().matrix();
  }
};
static_assert(ExpertFamily<expert::PerExpert<Scale>, B>);

// The same expert, named and with a configuration, so that checkpoints can describe it.
struct NamedScale : Scale {
  static constexpr const char* io_name = "NamedScale";
  struct Config {
    double init = 1.0;
    Index copies = 1;
  };
  static std::vector<expert::ParamSpec> parameters(const Config&, Index d) { return {{"s", 1, d}}; }
  template <class S>
  static void forward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::Out<S> y) {
    Scale::forward<S>({}, std::move(w), x, y);
  }
  template <class S>
  static void backward(const Config&, expert::Weights<S> w, expert::In<S> x, expert::In<S> dy, expert::Out<S> dx,
                       expert::Grads<S> g) {
    Scale::backward<S>({}, std::move(w), x, dy, dx, std::move(g));
  }
};
template <class V>
void config_fields(NamedScale::Config& c, V&& v) {
  v("init", c.init);
  v("copies", c.copies);
}
}  // namespace

TEST_CASE("the communicator Local is the identity") {
  comm::Local c;
  CHECK(c.rank() == 0);
  CHECK(c.size() == 1);
  double v[2] = {1.5, 2.5};
  c.all_reduce_sum(v, 2);
  CHECK(v[0] == 1.5);
  const std::byte send[3] = {std::byte{1}, std::byte{2}, std::byte{3}};
  std::byte recv[3] = {};
  const Index counts[1] = {3};
  c.all_to_all_v(send, counts, recv, counts);
  CHECK(recv[2] == std::byte{3});
  const Index fewer[1] = {2};
  CHECK_THROWS_AS(c.all_to_all_v(send, counts, recv, fewer), Error);
  c.barrier();
}

TEST_CASE("a per-expert expert trains inside a layer: its gradients match finite differences and Adam fits it") {
  using L = Layer<expert::PerExpert<Scale>, gate::NoisyTopK, backend::Cpu<double>>;
  L layer({.d_model = 3, .n_experts = 4, .gate = {.k = 2}, .seed = 2});
  const auto params = layer.parameters();
  REQUIRE(params.back().name == "experts.s");
  CHECK(params.back().shape == std::vector<Index>{4, 1, 3});
  test::randomize_parameters(layer, 5);

  // Every parameter of every expert, the gate's and the input's, against central differences.
  auto x = test::random_matrix<double>(16, 3, 1);
  const auto dy = test::random_matrix<double>(16, 3, 2);
  test::Matrix<double> z(16, 4);
  test::fill_normal(z.view(), 3);
  const auto check = test::check_layer_gradients(layer, x.view(), dy.view(), Noise<double>(z.view()));
  std::string failures;
  for (const auto& f : check.failures) failures += f + "; ";
  INFO("worst relative error ", check.worst, "; failures: ", failures);
  CHECK(check.routing_stable);
  CHECK(check.failures.empty());
  CHECK(check.zero_grads.empty());  // every expert receives tokens and a gradient

  // Training: each expert learns the scale 2 of the target y = 2 x.
  optim::Adam<backend::Cpu<double>> adam({.lr = 5e-2});
  Rng rng(4);
  auto mse = [&] {
    const auto f = layer.forward(x.view(), Mode::inference);
    double s = 0;
    for (Index t = 0; t < 16; ++t)
      for (Index c = 0; c < 3; ++c) s += (f.y()(t, c) - 2 * x(t, c)) * (f.y()(t, c) - 2 * x(t, c));
    return s / 16;
  };
  const double before = mse();
  for (int step = 0; step < 150; ++step) {
    auto f = layer.forward(x.view(), Mode::train, rng);
    test::Matrix<double> grad(16, 3);
    for (Index t = 0; t < 16; ++t)
      for (Index c = 0; c < 3; ++c) grad(t, c) = 2 * (f.y()(t, c) - 2 * x(t, c)) / 16;
    layer.zero_grad();
    (void)layer.backward(f, grad.view());
    adam.step(layer.parameters());
  }
  const double after = mse();
  CAPTURE(before);
  CAPTURE(after);
  CHECK(after < 1e-2 * before);
}

TEST_CASE("a per-expert expert with io_name and config_fields is saved and loaded under its name") {
  using L = Layer<expert::PerExpert<NamedScale>, gate::TopK, backend::Cpu<double>>;
  L layer({.d_model = 3, .n_experts = 4, .expert = {.init = 0.5, .copies = 3}, .gate = {.k = 2}, .seed = 2});
  test::randomize_parameters(layer, 5);
  const io::SafeTensors file = io::SafeTensors::parse(io::checkpoint(layer).bytes());
  const io::Metadata& meta = file.metadata();
  CHECK(io::metadata_value(meta, "moe.expert") == "NamedScale");
  CHECK(io::metadata_value(meta, "config.expert.copies") == "3");
  const L::Config config = io::layer_config<L>(meta);
  CHECK(config.expert.init == 0.5);
  CHECK(config.expert.copies == 3);
  L other(config);
  io::load(other, file);
  const auto x = test::random_matrix<double>(6, 3, 1);
  CHECK(test::same_bits(layer.forward(x, Mode::inference).y(), other.forward(x, Mode::inference).y()));
}
