// The newer MoE options (docs/moe.md): auxiliary-loss-free bias balancing (the update against a hand-computed step,
// checkpointing, resume), router jitter (training forwards only, reproducible), dense first layers and QK-norm in
// the parameter count, sparse upcycling (`train.init_from`) and its errors, and the config's refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>

#include "model/count.h"
#include "model/plan.h"
#include "train/trainer.h"
#include "test_util.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using testing::temp_dir;
using testing::write_tokens;

std::vector<std::string> small_moe(std::vector<std::string> extra = {}) {
  std::vector<std::string> o = {"model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                "model.seq_len=16",    "train.batch_size=4", "train.steps=10", "train.warmup_steps=2",
                                "train.lr=0.01",       "train.threads=2",  "moe.experts=4",   "moe.top_k=2"};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}

using testing::error_of;

TEST(BiasBalancing, UpdateIsTheHandComputedSignStep) {
  const fs::path dir = temp_dir("bias_update");
  TokenFile data(write_tokens(dir / "tokens.bin", 5000, 64), "uint16");
  const Config c = config_from_string(
      "", small_moe({"moe.balance=bias", "moe.bias_update_rate=0.25", "train.grad_accum=2", "moe.every=1"}));
  auto be = testing::make_test_backend(2);
  Trainer trainer(c, *be);
  Transformer& model = trainer.model();
  // Start from uneven biases so that the update acts on a routing the bias already shapes.
  std::map<int64_t, std::vector<float>> start = {{0, {0.1f, -0.2f, 0.f, 0.05f}}, {1, {0.f, 0.f, 0.3f, -0.1f}}};
  model.set_router_biases(start);
  // The step's loads, counted by hand from the router's choices of each micro-batch (before the update).
  std::map<int64_t, std::vector<double>> loads = {{0, std::vector<double>(4, 0.0)}, {1, std::vector<double>(4, 0.0)}};
  auto source = trainer.batches(data);
  int micro = 0;
  trainer.step([&](std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
    // Before each micro-batch but the first, the previous forward's choices are still in the stats.
    if (micro++ > 0)
      for (auto& [layer, l] : loads)
        for (int e = 0; e < 4; ++e) l[e] += model.moe_statistics()[layer].assigned[e];
    source(tokens, targets);
  });
  for (auto& [layer, l] : loads)  // the last micro-batch's
    for (int e = 0; e < 4; ++e) l[e] += model.moe_statistics()[layer].assigned[e];
  const auto after = model.router_biases();
  for (auto& [layer, l] : loads) {
    double total = 0;
    for (double x : l) total += x;
    EXPECT_EQ(total, 2.0 * 4 * 16 * 2) << "every token's two choices, over two micro-batches";
    const double mean = total / 4;
    for (int e = 0; e < 4; ++e) {
      const double sign = l[e] < mean ? 1.0 : l[e] > mean ? -1.0 : 0.0;
      EXPECT_EQ(after.at(layer)[e], static_cast<float>(start[layer][e] + 0.25 * sign))
          << "layer " << layer << " expert " << e << " load " << l[e] << " mean " << mean;
    }
  }
  // The bias only steers the choice: the gate weights are the scores, and the aux loss is off.
  EXPECT_EQ(model.last_aux_loss(), 0.0);
  fs::remove_all(dir);
}

TEST(BiasBalancing, BiasesAreCheckpointedAndResumeIsBitIdentical) {
  const fs::path dir = temp_dir("bias_resume");
  TokenFile data(write_tokens(dir / "tokens.bin", 5000, 64), "uint16");
  const Config c = config_from_string("", small_moe({"moe.balance=bias", "moe.score=sigmoid", "moe.router_jitter=0.05",
                                                     "moe.seq_aux_loss_weight=0.01"}));
  auto be = testing::make_test_backend(2);
  Trainer full(c, *be);
  std::vector<double> losses;
  for (int s = 0; s < 8; ++s) losses.push_back(full.step(data).loss);
  {
    Trainer first(c, *be);
    for (int s = 0; s < 4; ++s) ASSERT_EQ(first.step(data).loss, losses[s]);
    first.save((dir / "checkpoint").string());
    const auto biases = first.model().router_biases();
    ASSERT_EQ(biases.size(), 2u);
    bool moved = false;
    for (float b : biases.begin()->second) moved |= b != 0.f;
    EXPECT_TRUE(moved) << "four updates left every bias at 0";
  }
  Trainer resumed(c, *be);
  resumed.load((dir / "checkpoint").string());
  for (int s = 4; s < 8; ++s) EXPECT_EQ(resumed.step(data).loss, losses[s]) << "step " << s;
  EXPECT_EQ(resumed.model().router_biases(), full.model().router_biases());
  fs::remove_all(dir);
}

TEST(BiasBalancing, BalancesBetterThanNothing) {
  // With a strong update rate, the most loaded expert's share falls over a few dozen steps.
  const fs::path dir = temp_dir("bias_balances");
  TokenFile data(write_tokens(dir / "tokens.bin", 20000, 64), "uint16");
  double overload[2];
  for (int with_bias = 0; with_bias < 2; ++with_bias) {
    const Config c = config_from_string(
        "", small_moe({"train.steps=40", "moe.experts=8", "moe.every=1",
                       with_bias ? "moe.balance=bias" : "moe.balance=none", "moe.bias_update_rate=0.01"}));
    auto be = testing::make_test_backend(2);
    Trainer t(c, *be);
    double sum = 0;
    for (int s = 0; s < 40; ++s) {
      t.step(data);
      if (s >= 30) sum += t.model().moe_statistics()[0].overload() + t.model().moe_statistics()[1].overload();
    }
    overload[with_bias] = sum / 20;
  }
  EXPECT_LT(overload[1], overload[0]) << "bias balancing should lower the overload factor";
  fs::remove_all(dir);
}

TEST(RouterJitter, OnlyTrainingForwardsAreNoisyAndTheNoiseIsReproducible) {
  Config c = config_from_string("", small_moe({"moe.router_jitter=0.2"}));
  Config plain = config_from_string("", small_moe());
  auto be = testing::make_test_backend(2);
  Transformer jittered(c.model, *be, 4), reference(plain.model, *be, 4);
  jittered.init_weights(3);
  reference.init_weights(3);
  Rng rng(5);
  std::vector<int32_t> tokens(4 * 16), targets(4 * 16);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(64));
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(64));
  // Evaluation: no noise, the plain model's loss exactly.
  EXPECT_EQ(jittered.forward(tokens.data(), targets.data(), 4), reference.forward(tokens.data(), targets.data(), 4));
  // Training: the router sees noise, so the routing statistics move; the same seed gives the same loss.
  jittered.set_noise_seed(11);
  const double a = jittered.forward(tokens.data(), targets.data(), 4, 1.f);
  const double entropy_a = jittered.moe_statistics()[0].router_entropy;
  jittered.set_noise_seed(11);
  EXPECT_EQ(jittered.forward(tokens.data(), targets.data(), 4, 1.f), a);
  reference.forward(tokens.data(), targets.data(), 4, 1.f);
  EXPECT_NE(entropy_a, reference.moe_statistics()[0].router_entropy);
  jittered.set_noise_seed(12);
  jittered.forward(tokens.data(), targets.data(), 4, 1.f);
  EXPECT_NE(jittered.moe_statistics()[0].router_entropy, entropy_a);
}

TEST(MoeOptions, FirstDenseAndQkNormAreCounted) {
  for (const auto& extra : std::vector<std::vector<std::string>>{
           {"model.n_layers=4", "moe.first_dense=1"},
           {"model.n_layers=6", "moe.first_dense=2", "moe.every=2", "model.qk_norm=true"},
           {"model.qk_norm=true", "moe.shared_experts=1", "model.ffn=swiglu"}}) {
    const Config c = config_from_string("", small_moe(extra));
    const ParamLayout layout(c.model);
    const ParameterCounts n = count_parameters(c.model);
    EXPECT_EQ(n.total, layout.total());
    EXPECT_EQ(n.active, active_parameter_count(layout, c.model));
    const ModelPlan plan(c.model);
    EXPECT_EQ(n.moe_layers, plan.moe_blocks());
    for (int64_t i = 0; i < c.model.n_layers; ++i)
      EXPECT_EQ(plan.blocks[i].moe, i >= c.model.moe.first_dense && (i + 1) % c.model.moe.every == 0);
  }
  const Config c = config_from_string("", small_moe({"model.n_layers=6", "moe.first_dense=2", "moe.every=2"}));
  EXPECT_EQ(count_parameters(c.model).moe_layers, 2);  // layers 3 and 5
}

TEST(MoeOptions, ConfigRefusesWhatCannotWork) {
  EXPECT_NE(error_of([] { config_from_string("", small_moe({"moe.first_dense=2"})); }).find("moe.first_dense"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              config_from_string("", small_moe({"moe.router=expert_choice", "moe.balance=bias"}));
            }).find("moe.balance"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              config_from_string("", small_moe({"moe.router=expert_choice", "moe.seq_aux_loss_weight=0.1"}));
            }).find("moe.seq_aux_loss_weight"),
            std::string::npos);
  EXPECT_NE(error_of([] { config_from_string("", small_moe({"moe.score=tanh"})); }).find("softmax|sigmoid"),
            std::string::npos);
}

// model.zero_init_residual and model.zero_init_head (docs/report.md, seed-noise experiments): the projections into
// the residual stream (attention output, expert and shared fc2) and the untied head start at zero, every other
// tensor starts as it does without them (the draws stay in step), the zeros leave within two steps (below a zero
// head the first step's gradient is only the routers' auxiliary losses'), and a zero head with tied embeddings is
// refused.
TEST(InitOptions, ZeroResidualProjectionsAndHead) {
  const fs::path dir = temp_dir("zero_init");
  TokenFile data(write_tokens(dir / "tokens.bin", 5000, 64), "uint16");
  const std::vector<std::string> base = {"model.tied_embeddings=false", "moe.every=1", "moe.shared_experts=1"};
  std::vector<std::string> zero = base;
  zero.insert(zero.end(), {"model.zero_init_residual=true", "model.zero_init_head=true"});
  auto be = testing::make_test_backend(2);
  Trainer plain(config_from_string("", small_moe(base)), *be), zeroed(config_from_string("", small_moe(zero)), *be);
  const auto values = [&](Trainer& t) {
    const Transformer& m = t.model();
    return be->download_vector(m.params(), m.num_params());
  };
  const std::vector<float> p = values(plain), z = values(zeroed);
  const auto is_zeroed = [](const std::string& name) {
    for (const char* part : {"attn.out.weight", "fc2.weight", "lm_head.weight"})
      if (name.find(part) != std::string::npos) return true;
    return false;
  };
  int zeroed_tensors = 0;
  for (const auto& e : zeroed.model().layout().entries()) {
    const auto begin = z.begin() + e.offset, end = begin + e.shape.numel();
    if (is_zeroed(e.name)) {
      ++zeroed_tensors;
      EXPECT_TRUE(std::all_of(begin, end, [](float x) { return x == 0.f; })) << e.name;
      EXPECT_TRUE(std::any_of(p.begin() + e.offset, p.begin() + e.offset + e.shape.numel(),
                              [](float x) { return x != 0.f; }))
          << e.name << " is drawn at random without the options";
    } else {
      EXPECT_TRUE(std::equal(begin, end, p.begin() + e.offset)) << e.name << " should start as without the options";
    }
  }
  EXPECT_EQ(zeroed_tensors, 2 * 3 + 1);  // per layer: attention output, expert fc2, shared fc2; and the head
  zeroed.step(data);
  zeroed.step(data);
  const std::vector<float> after = values(zeroed);
  for (const auto& e : zeroed.model().layout().entries())
    if (is_zeroed(e.name))
      EXPECT_TRUE(std::any_of(after.begin() + e.offset, after.begin() + e.offset + e.shape.numel(),
                              [](float x) { return x != 0.f; }))
          << e.name << " still zero after two steps";
  EXPECT_NE(error_of([] { config_from_string("", small_moe({"model.zero_init_head=true"})); })
                .find("model.tied_embeddings"),
            std::string::npos);
}

// Sparse upcycling: a dense model's FFN copied into every expert; with top-1 and gate weights normalised to 1, the
// MoE computes exactly the dense FFN, so the logits are the dense model's bit for bit.
TEST(Upcycling, TopOneOverIdenticalExpertsReproducesTheDenseLogits) {
  const fs::path dir = temp_dir("upcycle");
  TokenFile data(write_tokens(dir / "tokens.bin", 5000, 64), "uint16");
  const std::vector<std::string> dense = {"model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                                          "model.n_heads=4",     "model.seq_len=16", "model.ffn=swiglu",
                                          "train.batch_size=4",  "train.steps=3",    "train.warmup_steps=1",
                                          "train.threads=2"};
  auto be = testing::make_test_backend(2);
  {
    Trainer source(config_from_string("", dense), *be);
    for (int s = 0; s < 3; ++s) source.step(data);
    source.save((dir / "dense" / "checkpoint").string());
  }
  Rng rng(3);
  std::vector<int32_t> tokens(4 * 16), targets(4 * 16);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(64));
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(64));
  Trainer reference(config_from_string("", dense), *be);
  reference.load_weights((dir / "dense" / "checkpoint").string());
  reference.model().forward(tokens.data(), nullptr, 4);
  const std::vector<float> want = reference.model().download_logits();
  for (const char* score : {"softmax", "sigmoid"}) {
    std::vector<std::string> moe = dense;
    for (const char* o : {"moe.experts=4", "moe.top_k=1", "moe.renormalize=true"}) moe.push_back(o);
    moe.push_back(std::string("moe.score=") + score);
    Trainer upcycled(config_from_string("", moe), *be);
    const InitFromReport r = upcycled.init_from((dir / "dense").string());
    upcycled.model().forward(tokens.data(), nullptr, 4);
    EXPECT_EQ(r.upcycled, 2 * 2) << "fc1 and fc2 of two layers";
    EXPECT_EQ(r.fresh.size(), 2u) << "the two routers";
    upcycled.model().forward(tokens.data(), nullptr, 4);
    // The configured router spreads the tokens over the four (identical) experts: each expert's rows are one
    // product of fewer rows than the dense model's, and oneDNN's sums depend on a product's shape, so the logits
    // agree to rounding.
    const auto spread = upcycled.model().download_logits();
    double worst = 0;
    for (size_t i = 0; i < spread.size(); ++i) worst = std::max(worst, std::fabs(double(spread[i]) - want[i]));
    EXPECT_LT(worst, 1e-6) << score;
    // A zero router (every score equal: all tokens to expert 0) runs the dense model's products on the same rows:
    // the logits are the dense model's exactly.
    Transformer& model = upcycled.model();
    for (const auto& e : model.layout().entries())
      if (e.name.find("moe.router") != std::string::npos) be->fill(model.params() + e.offset, 0.f, e.shape.numel());
    model.forward(tokens.data(), nullptr, 4);
    EXPECT_EQ(model.download_logits(), want) << score;
    // Training goes on from there.
    EXPECT_TRUE(std::isfinite(upcycled.step(data).loss));
  }
  // G = 2: slice g of the hidden units goes to experts g, g + 2, ...; top-2 over the two halves with gates summing
  // to 1 is not the dense FFN, but each expert holds its slice.
  {
    std::vector<std::string> moe = dense;
    for (const char* o : {"moe.expansion=2", "moe.granularity=2", "moe.top_k=1"}) moe.push_back(o);
    Trainer upcycled(config_from_string("", moe), *be);
    upcycled.init_from((dir / "dense").string());
    const auto& layout = upcycled.model().layout();
    const auto p = be->download_vector(std::as_const(upcycled.model()).params(), layout.total());
    const auto d = be->download_vector(std::as_const(reference.model()).params(), reference.model().layout().total());
    const ParamEntry& fc2 = layout.find("layers.1.moe.experts.fc2.weight");  // (4, 32, 64)
    const ParamEntry& dense_fc2 = reference.model().layout().find("layers.1.ffn.fc2.weight");  // (32, 128)
    for (int64_t x = 0; x < 4; ++x)
      for (int64_t c = 0; c < 32; c += 7)
        for (int64_t f = 0; f < 64; f += 9)
          ASSERT_EQ(p[fc2.offset + (x * 32 + c) * 64 + f], d[dense_fc2.offset + c * 128 + (x % 2) * 64 + f]);
  }
  fs::remove_all(dir);
}

TEST(Upcycling, MismatchesNameTheTensor) {
  const fs::path dir = temp_dir("upcycle_errors");
  const std::vector<std::string> dense = {"model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
                                          "model.n_heads=4", "model.seq_len=16", "train.batch_size=4",
                                          "train.threads=2"};
  auto be = testing::make_test_backend(2);
  Trainer source(config_from_string("", dense), *be);
  source.save((dir / "dense" / "checkpoint").string());
  auto wider = dense;
  wider.push_back("model.vocab_size=80");
  Trainer a(config_from_string("", wider), *be);
  EXPECT_NE(error_of([&] { a.init_from((dir / "dense").string()); }).find("tok_emb.weight"), std::string::npos);
  auto qk = dense;
  qk.push_back("model.qk_norm=true");
  Trainer b(config_from_string("", qk), *be);
  EXPECT_NE(error_of([&] { b.init_from((dir / "dense").string()); }).find("layers.0.attn.q_norm.weight"),
            std::string::npos);
  // MoE -> dense: the dense FFN is not in the source (and the experts would have nowhere to go).
  auto moe = dense;
  moe.push_back("moe.experts=4");
  Trainer m(config_from_string("", moe), *be);
  m.save((dir / "moe" / "checkpoint").string());
  Trainer c(config_from_string("", dense), *be);
  EXPECT_NE(error_of([&] { c.init_from((dir / "moe").string()); }).find("no tensor 'layers.0.ffn.fc1.weight'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { c.init_from((dir / "nowhere").string()); }).find("does not exist"), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
