// The parameter / FLOPs calculator: closed-form counts against the engine's layout and a built Transformer over a
// grid of configs, the papers' test vectors, and the `count` subcommand's output.
#include <gtest/gtest.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cli/count_command.h"
#include "core/error.h"
#include "config/config.h"
#include "model/flops.h"
#include "model/param_layout.h"
#include "model/transformer.h"
#include "model/count.h"

namespace moelab {
namespace {

const std::string kConfigDir = std::string(MOELAB_SOURCE_DIR) + "/configs/";

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Parameters the engine's matrix products never touch, per token: norm weights, biases (a routed expert's
// counted for the K experts a token uses), learned positions, and the token table when the head is untied
// (a lookup, not a product). Read from the layout, independently of the closed form.
int64_t active_params_without_matmul(const ParamLayout& layout, const ModelConfig& m) {
  int64_t n = 0;
  for (const auto& e : layout.entries()) {
    const bool routed_expert = contains(e.name, ".moe.experts.");
    if (e.kind == ParamKind::NormWeight || e.kind == ParamKind::Bias)
      n += routed_expert ? e.shape.numel() / m.moe.routed_experts() * m.moe.active_experts() : e.shape.numel();
    else if (e.name == "pos_emb.weight" || (e.name == "tok_emb.weight" && !m.tied_embeddings))
      n += e.shape.numel();
  }
  return n;
}

// The counts by formula, independently of the parameter table that count_parameters reads: per block two norms,
// attention (qkv, out, their biases, qk-norm), and the FFN or the MoE layer (router, shared experts, routed
// experts); the embeddings (token, learned positions, an untied head) and the final norm.
struct ClosedForm {
  int64_t total = 0, active = 0, embedding = 0, non_expert = 0, per_expert = 0;
};
ClosedForm closed_form(const ModelConfig& m) {
  const int64_t C = m.d_model, V = m.vocab_size, T = m.seq_len, L = m.n_layers;
  const int64_t norm = (m.norm == NormKind::LayerNorm && m.bias) ? 2 * C : C;
  const int64_t attention = 4 * C * C + (m.bias ? 4 * C : 0) + (m.qk_norm ? 2 * m.head_dim() : 0);
  const int64_t moe_layers = moe_layer_count(m);
  ClosedForm f;
  f.embedding = V * C + (m.pos == PosKind::Learned ? T * C : 0) + (m.tied_embeddings ? 0 : V * C);
  int64_t moe_layer_non_expert = 0, expert = 0;
  if (m.moe.enabled()) {
    const int64_t hidden = m.ffn_hidden() / m.moe.granularity;
    expert = ffn_parameters(m, hidden);
    moe_layer_non_expert = m.moe.routed_experts() * C +
                           (m.moe.shared_experts > 0 ? ffn_parameters(m, m.moe.shared_experts * hidden) : 0);
  }
  f.per_expert = moe_layers * expert;
  f.non_expert = f.embedding + L * (2 * norm + attention) + (L - moe_layers) * ffn_parameters(m, m.ffn_hidden()) +
                 moe_layers * moe_layer_non_expert + norm;
  f.total = f.non_expert + (m.moe.enabled() ? m.moe.routed_experts() : 0) * f.per_expert;
  f.active = f.non_expert + (m.moe.enabled() ? m.moe.active_experts() : 0) * f.per_expert;
  return f;
}

// ---- the grid: closed form == counts from the table == ParamLayout == Transformer::num_params -----------------

TEST(Count, ClosedFormMatchesLayoutAndTransformerOverGrid) {
  const std::vector<std::string> tiny = {"model.vocab_size=32", "model.d_model=16", "model.n_heads=2",
                                         "model.n_layers=3",    "model.seq_len=8",   "model.d_ff=0"};
  // MoE variants: explicit experts (K = top_k) and the fine-grained shorthand (E*G experts, K = top_k*G).
  std::vector<std::vector<std::string>> moe_variants = {{}};  // dense
  for (const char* g : {"1", "2", "4"}) {
    moe_variants.push_back({"moe.experts=4", "moe.top_k=2", std::string("moe.granularity=") + g});
    moe_variants.push_back({"moe.expansion=2", "moe.top_k=1", std::string("moe.granularity=") + g});
  }
  auto cpu = make_backend("cpu", 1);
  int checked = 0, transformers = 0;
  for (const auto& moe : moe_variants)
    for (const char* bias : {"false", "true"})
      for (const char* tied : {"false", "true"})
        for (const char* pos : {"learned", "sinusoidal", "rope"})
          for (const char* norm : {"layernorm", "rmsnorm"})
            for (const char* ffn : {"gelu", "swiglu"})
              for (const char* shared : {"0", "1", "2"})
                for (const char* every : {"1", "2"})
                  for (const char* router : {"token_choice", "expert_choice"}) {
                    // Dense models ignore the [moe] keys: one pass over them is enough.
                    if (moe.empty() && (std::string(shared) != "0" || std::string(every) != "1" ||
                                        std::string(router) != "token_choice"))
                      continue;
                    std::vector<std::string> overrides = tiny;
                    overrides.insert(overrides.end(), moe.begin(), moe.end());
                    for (const auto& [key, value] : {std::pair{"model.bias", bias}, {"model.tied_embeddings", tied},
                                                     {"model.pos", pos}, {"model.norm", norm}, {"model.ffn", ffn},
                                                     {"moe.shared_experts", shared}, {"moe.every", every},
                                                     {"moe.router", router}})
                      overrides.push_back(std::string(key) + "=" + value);
                    std::string label;
                    for (const auto& o : overrides) label += o + " ";
                    SCOPED_TRACE(label);

                    const ModelConfig m = config_from_string("", overrides).model;
                    const ParameterCounts n = count_parameters(m);
                    const ClosedForm f = closed_form(m);
                    EXPECT_EQ(n.total, f.total);
                    EXPECT_EQ(n.active, f.active);
                    EXPECT_EQ(n.embedding, f.embedding);
                    EXPECT_EQ(n.non_expert, f.non_expert);
                    EXPECT_EQ(n.per_expert, f.per_expert);
                    const ParamLayout layout(m);
                    EXPECT_EQ(n.total, layout.total());
                    EXPECT_EQ(n.active, active_parameter_count(layout, m));

                    // Every other field, from the layout's entries.
                    int64_t embedding = 0, routed_expert_params = 0, routers = 0;
                    for (const auto& e : layout.entries()) {
                      if (e.kind == ParamKind::Embedding || e.name == "lm_head.weight") embedding += e.shape.numel();
                      if (contains(e.name, ".moe.experts.")) routed_expert_params += e.shape.numel();
                      if (contains(e.name, ".moe.router.")) ++routers;
                    }
                    EXPECT_EQ(n.embedding, embedding);
                    EXPECT_EQ(n.nonembedding_total, layout.total() - embedding);
                    EXPECT_EQ(n.moe_layers, routers);
                    EXPECT_EQ(n.routed_experts * n.per_expert, routed_expert_params);
                    EXPECT_EQ(n.non_expert, layout.total() - routed_expert_params);

                    // The engine's FLOP count and Chinchilla's 6 N_a + 12 L T d differ exactly by 6 per active
                    // parameter that no matrix product uses.
                    EXPECT_DOUBLE_EQ(chinchilla_flops_per_token(m) - exact_training_flops_per_token(m),
                                     6.0 * static_cast<double>(active_params_without_matmul(layout, m)));

                    // Only tiny shapes are built: the Transformer allocates parameters, gradients and activations.
                    Transformer model(m, *cpu, 1);
                    EXPECT_EQ(n.total, model.num_params());
                    ++transformers;
                    ++checked;
                  }
  EXPECT_EQ(checked, 48 + 48 * 6 * 3 * 2 * 2);
  EXPECT_EQ(transformers, checked);
}

// A parameter name no moelab model has throws: a misspelt name can never pass for a feature that is off.
TEST(ParamLayout, UnknownParameterNameThrowsAbsentFeatureIsEmpty) {
  ModelConfig m;
  m.vocab_size = 64, m.d_model = 16, m.n_layers = 2, m.n_heads = 2, m.seq_len = 8;
  m.bias = false;
  const ParamLayout layout(m);
  std::vector<float> block(static_cast<size_t>(layout.total()));
  EXPECT_FALSE(layout.view_or_empty(block.data(), "layers.1.attn.qkv.weight").empty());
  EXPECT_TRUE(layout.view_or_empty(block.data(), "layers.1.attn.qkv.bias").empty());  // no biases: feature off
  for (const char* typo : {"layers.1.attn.qkv.weigth", "layers.x.attn.qkv.weight", "layer.0.norm1.weight",
                           "tok_emb", "layers.0.", "lm_head.bias"})
    EXPECT_THROW(layout.view_or_empty(block.data(), typo), Error) << typo;
  EXPECT_TRUE(ParamLayout::is_parameter_name("layers.12.moe.experts.fc2.bias"));
  // Every name a layout adds is a known one (the constructor checks; here over several configs).
  for (bool bias : {false, true}) {
    m.bias = bias;
    m.norm = NormKind::LayerNorm;
    m.qk_norm = true;
    m.tied_embeddings = false;
    const ParamLayout full(m);
    for (const auto& e : full.entries()) EXPECT_TRUE(ParamLayout::is_parameter_name(e.name)) << e.name;
  }
}

TEST(Count, DenseModelHasNoExperts) {
  const ModelConfig m = config_from_string("", {}).model;
  const ParameterCounts n = count_parameters(m);
  EXPECT_EQ(n.total, n.active);
  EXPECT_EQ(n.non_expert, n.total);
  EXPECT_EQ(n.moe_layers, 0);
  EXPECT_EQ(n.routed_experts, 0);
  EXPECT_EQ(n.active_experts, 0);
  EXPECT_EQ(n.per_expert, 0);
  EXPECT_EQ(n.sparsity, 0.0);
  EXPECT_EQ(n.expansion_rate, 0.0);
  // No router: Krajewski's router term vanishes.
  EXPECT_DOUBLE_EQ(krajewski_flops_per_token(m), 12.0 * 256 * 256 * 6 * 4);
  EXPECT_DOUBLE_EQ(abnar_router_flops_per_token(m), abnar_flops_per_token(m));
}

TEST(Count, ExpansionRateIsExpertParamsOverDenseFfnParams) {
  // Without biases, E*G experts of size d_ff/G hold exactly E dense FFNs' worth of parameters.
  const ModelConfig fine = config_from_string("", {"moe.expansion=8", "moe.granularity=4", "moe.top_k=1"}).model;
  EXPECT_DOUBLE_EQ(count_parameters(fine).expansion_rate, 8.0);
  EXPECT_EQ(count_parameters(fine).routed_experts, 32);
  EXPECT_EQ(count_parameters(fine).active_experts, 4);
  EXPECT_DOUBLE_EQ(count_parameters(fine).sparsity, 28.0 / 32.0);
  // With biases, fc2's bias (d_model per expert) does not shrink with G: E is a little above E_total / G.
  // d_model 256, d_ff 1024, G 4: expert 2*256*256 + 256 + 256 = 131,584; dense FFN 2*256*1024 + 1024 + 256
  // = 525,568; 32 * 131,584 / 525,568 = 8.0116...
  const ModelConfig biased =
      config_from_string("", {"moe.expansion=8", "moe.granularity=4", "moe.top_k=1", "model.bias=true"}).model;
  EXPECT_DOUBLE_EQ(count_parameters(biased).expansion_rate, 32.0 * 131584.0 / 525568.0);
}

// ---- the papers' test vectors ------------------------------------------------------------------------------

TEST(Count, FairseqMoe4BMatchesFairseqLog) {
  // fairseq examples/moe_lm: "num. non-expert model params: 908,423,168", "num. expert model params:
  // 402,776,064" (one expert, all 12 MoE layers), total 908M + 8 * 403M = 4.1B.
  const Config config = load_config(kConfigDir + "fairseq-moe-4b.toml", {});
  const ParameterCounts n = count_parameters(config.model);
  EXPECT_EQ(n.non_expert, 908'423'168);
  EXPECT_EQ(n.per_expert, 402'776'064);
  EXPECT_EQ(n.total, 4'130'631'680);
  EXPECT_EQ(n.active, 908'423'168 + 2 * 402'776'064);
  EXPECT_EQ(n.embedding, 50'000 * 2'048);  // tied, sinusoidal: the token table only
  EXPECT_EQ(n.moe_layers, 12);
  EXPECT_EQ(n.routed_experts, 8);
  EXPECT_EQ(n.active_experts, 2);
  EXPECT_DOUBLE_EQ(n.sparsity, 0.75);
  EXPECT_DOUBLE_EQ(n.expansion_rate, 8.0);  // each expert is a full dense FFN
  // The layout agrees (ParamLayout lists shapes and never allocates).
  const ParamLayout layout(config.model);
  EXPECT_EQ(layout.total(), n.total);
  EXPECT_EQ(active_parameter_count(layout, config.model), n.active);
}

TEST(Count, KrajewskiEq10Table2Row64x1B) {
  // Krajewski et al. 2024, Table 2: "64x1B", G = 16, D = 28.94e9 tokens, F = 1.93e20. Their model sizes assume
  // d = 64 n_blocks and 12 d^2 n_blocks = 1e9 active non-embedding parameters, so 12 * 64^2 * n^3 = 1e9.
  const double n_blocks = std::cbrt(1e9 / (12.0 * 64 * 64));  // 27.31 blocks
  const double d = 64 * n_blocks;                              // 1747.9
  ASSERT_NEAR(12 * d * d * n_blocks, 1e9, 1.0);
  const double flops = krajewski_flops_per_token(d, n_blocks, 64, 16) * 28.94e9;
  EXPECT_NEAR(flops / 1.93e20, 1.0, 0.005) << flops;
}

TEST(Count, KrajewskiEq10ConfigFormUsesModelShape) {
  // d 512, 8 blocks, E 64, G 16 (1024 routed experts): (12 * 512^2 * 6 + 512 * 1024 * 14) * 8
  //   = (18,874,368 + 7,340,032) * 8 = 209,715,200.
  const ModelConfig m =
      config_from_string("", {"model.d_model=512", "model.n_heads=8", "model.n_layers=8", "moe.expansion=64",
                              "moe.granularity=16", "moe.top_k=1"})
          .model;
  EXPECT_DOUBLE_EQ(krajewski_flops_per_token(512, 8, 64, 16), 209'715'200.0);
  EXPECT_DOUBLE_EQ(krajewski_flops_per_token(m), 209'715'200.0);
  EXPECT_DOUBLE_EQ(training_flops_per_token(m, FlopConvention::Krajewski), 209'715'200.0);
}

TEST(Count, AbnarEq9ByHand) {
  // d = 512, n_layers = 8, n_ctx = 1024, V = 32000; SwiGLU experts of the shorthand expansion 8, G = 4, top_k 1:
  // E_total = 32 experts of 2048 / 4 = 512, K = 4 active, so K / G = 1.
  //   6 n_layers d^2     = 6 * 8 * 262,144            = 12,582,912
  //   4                                                 = 4
  //   2 n_ctx / d        = 2 * 1024 / 512                = 4
  //   12 K / G           = 12 * 4 / 4                    = 12
  //   V / (d n_layers)   = 32000 / (512 * 8)             = 7.8125
  //   sum                                               = 27.8125
  //   Eq. 9              = 12,582,912 * 27.8125          = 349,962,240
  // Router term R d E_total per MoE layer, all 8 layers MoE: 14 * 512 * 32 * 8 = 1,835,008 -> 351,797,248.
  const std::vector<std::string> shape = {"model.d_model=512", "model.n_heads=8",    "model.n_layers=8",
                                          "model.seq_len=1024", "model.vocab_size=32000", "model.ffn=swiglu",
                                          "moe.expansion=8",    "moe.granularity=4",  "moe.top_k=1"};
  const ModelConfig m = config_from_string("", shape).model;
  EXPECT_DOUBLE_EQ(abnar_flops_per_token(8, 512, 1024, 4, 4, 32000), 349'962'240.0);
  EXPECT_DOUBLE_EQ(abnar_flops_per_token(m), 349'962'240.0);
  EXPECT_DOUBLE_EQ(abnar_router_flops_per_token(m), 351'797'248.0);
  // MoE in every other layer: Eq. 9 is unchanged (it assumes every layer is MoE), the router term halves:
  // 14 * 512 * 32 * 4 = 917,504.
  std::vector<std::string> every_other = shape;
  every_other.push_back("moe.every=2");
  const ModelConfig half = config_from_string("", every_other).model;
  EXPECT_DOUBLE_EQ(abnar_flops_per_token(half), 349'962'240.0);
  EXPECT_DOUBLE_EQ(abnar_router_flops_per_token(half), 349'962'240.0 + 917'504.0);
}

TEST(Count, KaplanAndChinchillaSmallDenseByHand) {
  // d 64, 2 layers, n_ctx 64, vocab 256, d_ff 256, RMSNorm, RoPE, GELU, no biases, tied embeddings.
  //   embedding          256 * 64                                   = 16,384
  //   per layer          norms 2 * 64 + attention 4 * 64^2 + FFN 2 * 64 * 256 = 128 + 16,384 + 32,768 = 49,280
  //   total              16,384 + 2 * 49,280 + final norm 64        = 115,008
  //   non-embedding      115,008 - 16,384                           = 98,624
  //   kaplan             6 * 98,624 + 6 * 2 * 64 * 64 = 591,744 + 49,152      = 640,896
  //   chinchilla         6 * 115,008 + 12 * 2 * 64 * 64 = 690,048 + 98,304    = 788,352
  //   exact (engine)     3 * (2 * 64 * 256 head + 2 * (24,576 qkv + 2 * 8,192 attention + 8,192 out
  //                      + 65,536 FFN)) = 3 * (32,768 + 2 * 114,688)          = 786,432
  // chinchilla - exact = 6 * 320 norm weights: the only parameters no matrix product touches.
  const ModelConfig m =
      config_from_string("", {"model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.seq_len=64",
                              "model.vocab_size=256", "model.norm=rmsnorm", "model.pos=rope", "model.ffn=gelu",
                              "model.bias=false", "model.tied_embeddings=true"})
          .model;
  const ParameterCounts n = count_parameters(m);
  EXPECT_EQ(n.total, 115'008);
  EXPECT_EQ(n.nonembedding_total, 98'624);
  EXPECT_DOUBLE_EQ(kaplan_flops_per_token(m), 640'896.0);
  EXPECT_DOUBLE_EQ(chinchilla_flops_per_token(m), 788'352.0);
  EXPECT_DOUBLE_EQ(training_flops_per_token(m, FlopConvention::Exact), 786'432.0);
  EXPECT_DOUBLE_EQ(kaplan_flops_per_token(98'624, 2, 64, 64), 640'896.0);
  EXPECT_DOUBLE_EQ(chinchilla_flops_per_token(115'008, 2, 64, 64), 788'352.0);
}

TEST(Count, Fairseq1_1TCountsInstantlyWithoutAllocating) {
  const auto start = std::chrono::steady_clock::now();
  const Config config = load_config(kConfigDir + "fairseq-moe-1.1t.toml", {});
  const ParameterCounts n = count_parameters(config.model);
  const std::string table = count_report_table(config.model, "fairseq-moe-1.1t.toml", 300e9);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fairseq 1.1T: %s parameters (%s active), counted in %.2g s\n",
              with_thousands_separators(n.total).c_str(), with_thousands_separators(n.active).c_str(), seconds);
  EXPECT_LT(seconds, 1.0);
  EXPECT_NEAR(static_cast<double>(n.total) / 1.1e12, 1.0, 0.01);
  // 51,200 * 4,096 embedding + 16 dense blocks of 201,379,840 + 16 MoE blocks of 68,799,201,280 + final norm.
  EXPECT_EQ(n.total, 209'715'200 + 16 * int64_t{201'379'840} + 16 * int64_t{68'799'201'280} + 8'192);
  EXPECT_EQ(n.routed_experts, 512);
  EXPECT_EQ(n.moe_layers, 16);
  EXPECT_TRUE(contains(table, with_thousands_separators(n.total))) << table;
}

// ---- the subcommand ----------------------------------------------------------------------------------------

struct CommandResult {
  int exit_code = 0;
  std::string out, err;
};

CommandResult run_count_command(const std::string& args) {
  CLI::App app{"test"};
  add_count_command(app);
  CommandResult r;
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  try {
    app.parse("count " + args, false);
  } catch (const CLI::ParseError& e) {
    r.exit_code = e.get_exit_code();
  }
  r.out = ::testing::internal::GetCapturedStdout();
  r.err = ::testing::internal::GetCapturedStderr();
  return r;
}

TEST(CountCommand, JsonHasStableKeysAndTotals) {
  const CommandResult r = run_count_command("--config " + kConfigDir + "fairseq-moe-4b.toml --json --tokens 1e9");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["parameters"]["total"].get<int64_t>(), 4'130'631'680);
  EXPECT_EQ(j["parameters"]["non_expert"].get<int64_t>(), 908'423'168);
  EXPECT_EQ(j["parameters"]["per_expert"].get<int64_t>(), 402'776'064);
  for (const char* key : {"active", "nonembedding_total", "nonembedding_active", "embedding"})
    EXPECT_TRUE(j["parameters"].contains(key)) << key;
  for (const char* key : {"moe_layers", "routed_experts", "active_experts", "shared_experts", "sparsity",
                          "granularity", "expansion_rate"})
    EXPECT_TRUE(j["moe"].contains(key)) << key;
  EXPECT_EQ(j["tokens"].get<double>(), 1e9);
  for (const char* key : {"kaplan", "chinchilla", "abnar", "abnar_router", "krajewski", "exact"}) {
    ASSERT_TRUE(j["flops_per_token"].contains(key)) << key;
    EXPECT_DOUBLE_EQ(j["training_flops"][key].get<double>(), j["flops_per_token"][key].get<double>() * 1e9) << key;
  }
}

TEST(CountCommand, TableIsAlignedWithSeparators) {
  const CommandResult r = run_count_command("--config " + kConfigDir + "fairseq-moe-4b.toml --set moe.experts=16");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "402,776,064")) << r.out;  // per expert: unchanged by the expert count
  // 16 experts: the router grows by 8 * 2048 per MoE layer.
  EXPECT_TRUE(contains(r.out, with_thousands_separators(908'423'168 + 12 * 8 * 2048 + 16 * int64_t{402'776'064})))
      << r.out;
  for (const char* c : {"kaplan", "chinchilla", "abnar_router", "krajewski", "exact"})
    EXPECT_TRUE(contains(r.out, std::string("\n  ") + c + " ")) << c;
  EXPECT_FALSE(contains(r.out, "total (D =")) << "no --tokens, no total column";
}

TEST(CountCommand, UserErrorsAreNamedWithExitCode1) {
  CommandResult r = run_count_command("--config /nonexistent/moelab.toml");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "moelab: error: cannot open config file '/nonexistent/moelab.toml'")) << r.err;
  r = run_count_command("--set moe.granularity=3 --set moe.experts=4");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "moelab: error: moe.granularity = 3")) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  r = run_count_command("--tokens -5");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.err, "moelab: error: --tokens = -5 is not a positive number")) << r.err;
}

TEST(CountCommand, ThousandsSeparators) {
  EXPECT_EQ(with_thousands_separators(0), "0");
  EXPECT_EQ(with_thousands_separators(999), "999");
  EXPECT_EQ(with_thousands_separators(1000), "1,000");
  EXPECT_EQ(with_thousands_separators(4'130'631'680), "4,130,631,680");
  EXPECT_EQ(with_thousands_separators(-1'234'567), "-1,234,567");
}

}  // namespace
}  // namespace moelab
