// The language-model demo's model and trainer (examples/lm/model.hpp, trainer.hpp): the whole
// model's gradient against finite differences, a short run whose loss falls, checkpoints that
// round-trip bit for bit, training resumed from a checkpoint equal to training never stopped, and
// bad checkpoints refused without changing anything.

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../examples/lm/trainer.hpp"
#include "support.hpp"

namespace {

using moe::Index;
using moe::lm::MixtureKind;
using moe::lm::ModelConfig;
namespace fs = std::filesystem;

// A temporary directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("moe_lm_model_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

template <class B>
double objective(moe::lm::Model<B>& model, const std::vector<Index>& in, const std::vector<Index>& out, Index steps,
                 Index batch) {
  model.reset_states();
  moe::Rng rng(5);
  const auto st = model.forward(in.data(), out.data(), steps, batch, true, rng, 3);
  return st.loss + st.balance_loss;
}

// Every parameter's gradient of loss + balance_loss against central differences, in double.
void check_gradients(ModelConfig c) {
  using B = moe::backend::Cpu<double>;
  const Index steps = 3, batch = 2;
  c.vocab = 7;
  c.d = 3;
  c.hidden = c.mixture == MixtureKind::deep ? 6 : 2;  // a stack of ReLU layers needs width to pass a gradient
  c.noisy = false;  // the objective must be a function of the weights alone
  moe::lm::Model<B> model(c);
  // The paper's gates start at zero, where every logit ties and any step of a difference flips
  // the top-k: away from ties, routing is locally constant and the objective smooth. The experts'
  // weights are drawn as large too, so that a stack of them does not shrink its gradients to the
  // differences' rounding noise.
  for (auto& p : model.parameters())
    if (p.name.rfind("moe", 0) == 0) moe::test::fill_uniform(p.value, 17 + p.size(), -1.0, 1.0);
  const std::vector<Index> in{1, 4, 2, 6, 0, 3}, out{4, 2, 6, 0, 3, 5};
  model.zero_grad();
  objective(model, in, out, steps, batch);
  model.backward();
  double worst = 0;
  Index checked = 0;
  for (auto& p : model.parameters()) {
    CAPTURE(p.name);
    double diff = 0, norm = 0, numeric_norm = 0;
    for (Index i = 0; i < p.size(); ++i) {
      double& w = p.value.data[i];
      const double keep = w, eps = 1e-5;
      w = keep + eps;
      p.changed();
      const double up = objective(model, in, out, steps, batch);
      w = keep - eps;
      p.changed();
      const double down = objective(model, in, out, steps, batch);
      w = keep;
      p.changed();
      const double numeric = (up - down) / (2 * eps), analytic = p.grad.data[i];
      diff += (numeric - analytic) * (numeric - analytic);
      norm += analytic * analytic;
      numeric_norm += numeric * numeric;
      ++checked;
    }
    // Every parameter moves the objective (the mixture's gate too, through the gates and the
    // importance loss), and its gradient agrees.
    // No noise: no gradient for w_noise; a gate of one expert always gives it the whole token.
    const bool inert = p.name.find("w_noise") != std::string::npos ||
                       (c.mixture == MixtureKind::deep && p.name.find(".gate.") != std::string::npos);
    if (!inert) CHECK(std::sqrt(numeric_norm) > 1e-6);
    const double rel = std::sqrt(diff / std::max(norm, 1e-300));
    CHECK(rel < 1e-5);
    worst = std::max(worst, rel);
  }
  MESSAGE("parameters checked: ", checked, ", worst relative error ", worst);
}

std::vector<Index> pattern_stream(Index length) {
  // A small language: "a b c <eos>" and "d e <eos>", alternating, with word 7 after every 5th.
  const std::vector<Index> base{2, 3, 4, 1, 5, 6, 1};
  std::vector<Index> out;
  for (Index i = 0; static_cast<Index>(out.size()) < length; ++i) {
    out.push_back(base[static_cast<std::size_t>(i % 7)]);
    if (i % 5 == 4) out.push_back(7);
  }
  out.resize(static_cast<std::size_t>(length));
  return out;
}

moe::lm::Vocabulary small_vocabulary() {
  return moe::lm::Vocabulary::parse("<unk>\n<eos>\na\nb\nc\nd\ne\nf\n", "test", "<memory>");
}

ModelConfig small_model(MixtureKind kind) {
  return {.vocab = 8, .d = 8, .lstm_layers = 2, .mixture = kind, .experts = 4, .groups = 2, .k = 2, .hidden = 4,
          .dropout = 0.1, .seed = 3};
}

template <class B>
std::vector<std::vector<typename B::Scalar>> values_of(moe::lm::Trainer<B>& t) {
  std::vector<std::vector<typename B::Scalar>> out;
  typename B::Context ctx;
  for (auto& p : t.model().parameters()) out.push_back(moe::to_host<B>(ctx, moe::ConstMatrixView<typename B::Scalar>(p.value)));
  return out;
}

std::string bytes_of(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("lm model: the gradient of loss + balance loss against finite differences") {
  SUBCASE("flat mixture, residual, no dropout") {
    check_gradients({.mixture = MixtureKind::flat, .experts = 4, .k = 2, .dropout = 0.0});
  }
  SUBCASE("flat mixture, no residual, dropout (the same masks in every call of a window)") {
    check_gradients({.mixture = MixtureKind::flat, .experts = 3, .k = 2, .residual = false, .sigmoid = false, .dropout = 0.3});
  }
  SUBCASE("hierarchical mixture, three LSTMs") {
    check_gradients(
        {.lstm_layers = 3, .mixture = MixtureKind::hierarchical, .experts = 4, .groups = 2, .dropout = 0.2});
  }
  SUBCASE("a deep stack of single-expert layers") {
    check_gradients({.mixture = MixtureKind::deep, .deep = 3, .dropout = 0.1});
  }
  SUBCASE("no mixture") { check_gradients({.lstm_layers = 2, .mixture = MixtureKind::none, .dropout = 0.1}); }
}

TEST_CASE("lm trainer: a short run on a small language lowers the loss far below a uniform guess") {
  using B = moe::backend::Cpu<double>;  // one instantiation of the model for the whole file (compile time)
  moe::lm::Trainer<B> t(small_model(MixtureKind::flat), {.batch = 4, .steps = 8, .lr = 1e-2}, small_vocabulary(),
                        pattern_stream(2000));
  double first = 0, last = 0;
  for (int w = 0; w < 150; ++w) {
    const auto st = t.train_window();
    if (w < 5) first += st.loss / 5;
    if (w >= 145) last += st.loss / 5;
  }
  CAPTURE(first);
  CAPTURE(last);
  CHECK(first > 0.8 * std::log(8.0));  // starts near a uniform guess over 8 words
  CHECK(last < 0.5 * first);
  const double eval = t.evaluate(pattern_stream(600));
  CHECK(eval < 0.6 * first);
  CHECK(t.progress().step == 150);
  CHECK(t.progress().epoch >= 1);  // 2000 words / 4 streams / 8 steps: 62 windows an epoch
}

TEST_CASE("lm trainer: checkpoints round-trip, and resumed training equals training never stopped") {
  using B = moe::backend::Cpu<double>;  // one instantiation of the model for the whole file (compile time)
  const TempDir dir;
  for (const MixtureKind kind : {MixtureKind::flat, MixtureKind::hierarchical, MixtureKind::deep}) {
    CAPTURE(moe::lm::to_string(kind));
    const moe::lm::TrainConfig tc{.batch = 3, .steps = 5, .lr = 5e-3};
    auto make = [&] { return moe::lm::Trainer<B>(small_model(kind), tc, small_vocabulary(), pattern_stream(400)); };
    // 30 windows: 26 an epoch, so the run crosses an epoch boundary after the checkpoint.
    auto straight = make();
    for (int w = 0; w < 30; ++w) straight.train_window();

    auto first = make();
    for (int w = 0; w < 12; ++w) first.train_window();
    const fs::path a = dir.path / "a.safetensors", b = dir.path / "b.safetensors";
    first.save(a.string());
    auto resumed = make();
    resumed.load(a.string());
    CHECK(values_of(resumed) == values_of(first));
    CHECK(resumed.progress().step == 12);
    resumed.save(b.string());
    CHECK(bytes_of(a) == bytes_of(b));  // everything saved came back
    for (int w = 12; w < 30; ++w) resumed.train_window();
    CHECK(values_of(resumed) == values_of(straight));  // the same bits
    CHECK(resumed.progress().epoch == straight.progress().epoch);
    CHECK(resumed.evaluate(pattern_stream(300)) == straight.evaluate(pattern_stream(300)));

    // Without the optimizer state and the carried LSTM states the run differs: the check can tell.
    auto partial = make();
    for (int w = 0; w < 12; ++w) partial.train_window();
    auto restarted = make();
    {
      auto from = partial.model().parameters(), to = restarted.model().parameters();
      for (std::size_t i = 0; i < from.size(); ++i)
        for (Index j = 0; j < from[i].size(); ++j) to[i].value.data[j] = from[i].value.data[j];
    }
    for (int w = 12; w < 30; ++w) restarted.train_window();
    CHECK(values_of(restarted) != values_of(straight));
  }
}

TEST_CASE("lm trainer: a truncated, foreign or mismatched checkpoint is refused and changes nothing") {
  using B = moe::backend::Cpu<double>;  // one instantiation of the model for the whole file (compile time)
  const TempDir dir;
  const moe::lm::TrainConfig tc{.batch = 3, .steps = 5};
  moe::lm::Trainer<B> t(small_model(MixtureKind::flat), tc, small_vocabulary(), pattern_stream(400));
  for (int w = 0; w < 3; ++w) t.train_window();
  const fs::path good = dir.path / "good.safetensors";
  t.save(good.string());
  moe::lm::Trainer<B> other(small_model(MixtureKind::flat), tc, small_vocabulary(), pattern_stream(400));
  const auto before = values_of(other);

  const std::string bytes = bytes_of(good);
  const fs::path cut = dir.path / "cut.safetensors";
  std::ofstream(cut, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  CHECK_FALSE(moe::test::error_of([&] { other.load(cut.string()); }).empty());
  CHECK(moe::test::error_of([&] { other.load((dir.path / "missing.safetensors").string()); }).find("missing.safetensors") !=
        std::string::npos);

  ModelConfig wider = small_model(MixtureKind::flat);
  wider.d = 6;
  moe::lm::Trainer<B> mismatched(wider, tc, small_vocabulary(), pattern_stream(400));
  const auto message = moe::test::error_of([&] { mismatched.load(good.string()); });
  CHECK(moe::test::contains(message, "metadata 'model.d' = 8, but this model has 6"));

  moe::io::SafeTensorsWriter foreign;
  foreign.set_metadata("format", "something else");
  const fs::path alien = dir.path / "alien.safetensors";
  foreign.write(alien);
  CHECK(moe::test::contains(moe::test::error_of([&] { other.load(alien.string()); }),
                            "format 'something else', expected 'moe-lm/1'"));
  CHECK(values_of(other) == before);
  CHECK(other.progress().step == 0);
  CHECK(bytes_of(good) == bytes);  // nothing on disk changed
}
