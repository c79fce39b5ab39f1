// The tiny models of tests/fixtures/gen_dense_fixtures.py (PyTorch, float64, autograd) against the engine
// (float32): logits, loss, every parameter gradient, and 10 AdamW steps with warm-up, cosine decay and
// gradient clipping. Tolerances are stated per quantity below; they allow float32 rounding, nothing more.
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "train/trainer.h"
#include "test_util.h"

namespace moelab {
namespace {

using nlohmann::json;

struct Fixture {
  json j;
  Config config;
};

Fixture load_fixture(const std::string& file) {
  Fixture f;
  f.j = json::parse(read_file(std::string(MOELAB_FIXTURE_DIR) + "/" + file, "fixture"));
  const json& c = f.j["config"];
  const json& t = f.j["train"];
  auto b = [](const json& v) { return v.get<bool>() ? std::string("true") : std::string("false"); };
  auto num = [](const json& v) { return v.dump(); };
  std::vector<std::string> overrides = {
      "model.vocab_size=" + num(c["vocab"]), "model.d_model=" + num(c["d_model"]),
      "model.n_layers=" + num(c["n_layers"]), "model.n_heads=" + num(c["n_heads"]), "model.d_ff=" + num(c["d_ff"]),
      "model.seq_len=" + num(c["seq_len"]), "model.norm=" + c["norm"].get<std::string>(),
      "model.pos=" + c["pos"].get<std::string>(), "model.ffn=" + c["ffn"].get<std::string>(),
      "model.bias=" + b(c["bias"]), "model.tied_embeddings=" + b(c["tied"]), "model.norm_eps=" + num(c["norm_eps"]),
      "model.rope_theta=" + num(c["rope_theta"]), "train.batch_size=" + num(c["batch"]), "train.lr=" + num(t["lr"]),
      "train.min_lr=" + num(t["min_lr"]), "train.warmup_steps=" + num(t["warmup_steps"]),
      "train.steps=" + num(t["steps"]), "train.beta1=" + num(t["beta1"]), "train.beta2=" + num(t["beta2"]),
      "train.adam_eps=" + num(t["eps"]), "train.weight_decay=" + num(t["weight_decay"]),
      "train.grad_clip=" + num(t["grad_clip"]), "train.schedule=" + t["schedule"].get<std::string>(),
      "train.threads=2"};
  if (c.contains("qk_norm")) overrides.push_back("model.qk_norm=" + b(c["qk_norm"]));
  if (c.contains("moe")) {
    const json& m = c["moe"];
    const int64_t expansion = m.value("expansion", 0), g = m["granularity"].get<int64_t>();
    if (expansion > 0) {  // fine-grained shorthand: the fixture records the resolved experts and top-k
      overrides.push_back("moe.expansion=" + std::to_string(expansion));
      overrides.push_back("moe.top_k=" + std::to_string(m["top_k"].get<int64_t>() / g));
    } else {
      overrides.push_back("moe.experts=" + num(m["experts"]));
      overrides.push_back("moe.top_k=" + num(m["top_k"]));
    }
    for (const std::string key : {"granularity", "every", "shared_experts", "capacity_factor", "aux_loss_weight",
                                  "z_loss_weight"})
      overrides.push_back("moe." + key + "=" + num(m[key]));
    overrides.push_back("moe.router=" + m["router"].get<std::string>());
    overrides.push_back("moe.renormalize=" + b(m["renormalize"]));
    overrides.push_back("moe.expert_grad_scale=" + b(m["expert_grad_scale"]));
    // The newer keys, present only in the fixtures that use them.
    for (const std::string key : {"first_dense", "gate_scale", "bias_update_rate", "seq_aux_loss_weight",
                                  "router_jitter"})
      if (m.contains(key)) overrides.push_back("moe." + key + "=" + num(m[key]));
    for (const std::string key : {"score", "balance"})
      if (m.contains(key)) overrides.push_back("moe." + key + "=" + m[key].get<std::string>());
  }
  f.config = config_from_string("", overrides);
  return f;
}

void load_params(Transformer& model, const json& params) {
  ASSERT_EQ(params.size(), model.layout().entries().size()) << "parameter count differs from the fixture";
  for (const auto& e : model.layout().entries()) {
    ASSERT_TRUE(params.contains(e.name)) << "fixture lacks " << e.name;
    const json& p = params[e.name];
    std::vector<int64_t> shape = p["shape"].get<std::vector<int64_t>>();
    ASSERT_EQ(static_cast<int>(shape.size()), e.shape.rank) << e.name;
    for (int i = 0; i < e.shape.rank; ++i) ASSERT_EQ(shape[i], e.shape[i]) << e.name;
    const auto data = p["data"].get<std::vector<double>>();
    const std::vector<float> values(data.begin(), data.end());
    model.backend().upload(model.params() + e.offset, values.data(), static_cast<int64_t>(values.size()));
  }
}

std::vector<int32_t> batch_tokens(const json& batch, bool targets) {
  std::vector<int32_t> out;
  for (const auto& row : batch) {
    const auto ids = row.get<std::vector<int32_t>>();
    for (size_t i = 0; i + 1 < ids.size(); ++i) out.push_back(targets ? ids[i + 1] : ids[i]);
  }
  return out;
}

// |actual - expected| <= atol_frac * max|expected| + rtol * |expected|, entrywise.
void expect_close(const std::string& what, const float* actual, const std::vector<double>& expected, double atol_frac,
                  double rtol) {
  double scale = 0;
  for (double e : expected) scale = std::max(scale, std::fabs(e));
  int bad = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double err = std::fabs(actual[i] - expected[i]);
    if (err > atol_frac * scale + rtol * std::fabs(expected[i]) && ++bad <= 3)
      ADD_FAILURE() << what << "[" << i << "]: " << actual[i] << " vs PyTorch " << expected[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << expected.size() << " entries differ";
}

class FixtureTest : public ::testing::TestWithParam<const char*> {};

TEST_P(FixtureTest, ForwardBackwardAndTenAdamWStepsMatchPyTorch) {
  Fixture f = load_fixture(GetParam());
  f.config.train.log_every = 1;  // every step a logging step: its StepStats carry the auxiliary loss
  auto be = testing::make_test_backend(2);
  Trainer trainer(f.config, *be);
  Transformer& model = trainer.model();
  load_params(model, f.j["params"]);
  if (f.j.contains("router_bias")) {  // bias balancing, frozen (bias_update_rate 0) for the fixture
    std::map<int64_t, std::vector<float>> biases;
    for (const auto& [layer, values] : f.j["router_bias"].items()) {
      const auto v = values.get<std::vector<double>>();
      biases[std::stoll(layer)] = std::vector<float>(v.begin(), v.end());
    }
    model.set_router_biases(biases);
  }
  const int64_t B = f.config.train.batch_size;

  // Single pass on batch 0.
  const auto tokens = batch_tokens(f.j["batches"][0], false), targets = batch_tokens(f.j["batches"][0], true);
  const double loss = model.forward(tokens.data(), targets.data(), B);
  EXPECT_NEAR(loss, f.j["loss"].get<double>(), 2e-6 * std::fabs(f.j["loss"].get<double>()));
  if (f.j.contains("aux_loss")) {
    EXPECT_NEAR(model.last_aux_loss(), f.j["aux_loss"].get<double>(), 1e-6);
  }
  // Logits: float32 forward through 2 layers; 1e-5 of the largest logit.
  expect_close("logits", model.download_logits().data(), f.j["logits"].get<std::vector<double>>(), 1e-5, 1e-4);

  model.zero_grad();
  model.forward(tokens.data(), targets.data(), B, 1.f);
  model.backward();
  const std::vector<float> grads = be->download_vector(std::as_const(model).grads(), model.num_params());
  for (const auto& e : model.layout().entries())
    // Gradients: within 1e-4 of the tensor's largest entry plus 1e-3 relative.
    expect_close("grad " + e.name, grads.data() + e.offset, f.j["grads"][e.name].get<std::vector<double>>(), 1e-4,
                 1e-3);

  // Ten AdamW steps on the fixture's batches, through the trainer's own step.
  const auto step_losses = f.j["step_losses"].get<std::vector<double>>();
  const auto step_norms = f.j["step_grad_norms"].get<std::vector<double>>();
  const auto step_lrs = f.j["step_lrs"].get<std::vector<double>>();
  for (size_t s = 0; s < step_losses.size(); ++s) {
    const json& batch = f.j["batches"][s];
    const StepStats st = trainer.step([&](std::vector<int32_t>& tok, std::vector<int32_t>& tgt) {
      tok = batch_tokens(batch, false);
      tgt = batch_tokens(batch, true);
    });
    EXPECT_NEAR(st.loss, step_losses[s], 1e-5) << "loss at step " << s;
    EXPECT_NEAR(st.grad_norm, step_norms[s], 1e-4 * step_norms[s]) << "grad norm at step " << s;
    EXPECT_NEAR(st.lr, step_lrs[s], 1e-12) << "lr at step " << s;
    if (f.j.contains("step_aux_losses")) {
      EXPECT_NEAR(st.aux_loss, f.j["step_aux_losses"][s].get<double>(), 1e-6) << "aux loss at step " << s;
    }
  }
  // Parameters after 10 steps: float32 vs float64 trajectories drift slightly; 1e-4 absolute.
  const std::vector<float> params = be->download_vector(std::as_const(model).params(), model.num_params());
  for (const auto& e : model.layout().entries()) {
    const auto expected = f.j["final_params"][e.name].get<std::vector<double>>();
    int bad = 0;
    for (size_t i = 0; i < expected.size(); ++i)
      if (std::fabs(params[e.offset + i] - expected[i]) > 1e-4 && ++bad <= 3)
        ADD_FAILURE() << "final " << e.name << "[" << i << "]: " << params[e.offset + i] << " vs "
                      << expected[i];
    EXPECT_EQ(bad, 0) << "final " << e.name;
  }
}

INSTANTIATE_TEST_SUITE_P(PyTorch, FixtureTest,
                         ::testing::Values("dense_gelu_ln_learned.json", "dense_swiglu_rms_rope.json",
                                           "dense_gelu_ln_sin_untied.json", "moe_token_top2_capacity.json",
                                           "moe_expert_choice.json", "moe_fine_grained.json",
                                           "moe_sigmoid_bias_qknorm.json"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           std::string n = info.param;
                           return n.substr(0, n.find('.'));
                         });

}  // namespace
}  // namespace moelab
