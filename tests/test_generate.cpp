// Generation: the KV-cache decoder reproduces the full forward's logits at every position (dense, MoE token
// choice, expert choice at batch 1, every position encoding), and sampling honours its options.
#include <gtest/gtest.h>

#include "eval/generate.h"
#include "model/transformer.h"
#include "test_util.h"

namespace moelab {
namespace {

struct GenCase {
  const char* name;
  std::vector<std::string> overrides;
};
void PrintTo(const GenCase& c, std::ostream* os) { *os << c.name; }

class KvCache : public ::testing::TestWithParam<GenCase> {};

TEST_P(KvCache, StepLogitsEqualFullForward) {
  std::vector<std::string> o = {"model.vocab_size=40", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
                                "model.seq_len=12", "model.init_std=0.2"};
  o.insert(o.end(), GetParam().overrides.begin(), GetParam().overrides.end());
  const Config c = config_from_string("", o);
  auto be = testing::make_test_backend(2);
  Transformer model(c.model, *be, 1);
  model.init_weights(11);
  Rng rng(12);
  std::vector<int32_t> tokens(c.model.seq_len);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(c.model.vocab_size));
  model.forward(tokens.data(), nullptr, 1);
  const std::vector<float> full = model.download_logits();
  Generator gen(model);
  const int64_t V = c.model.vocab_size;
  for (int64_t t = 0; t < c.model.seq_len; ++t) {
    const float* logits = gen.step(tokens[t]);
    for (int64_t v = 0; v < V; ++v)
      ASSERT_NEAR(logits[v], full[t * V + v], 2e-5) << "position " << t << " token " << v;
  }
  EXPECT_THROW(gen.step(0), Error);  // past the context
}

INSTANTIATE_TEST_SUITE_P(
    Models, KvCache,
    ::testing::Values(GenCase{"rope_rmsnorm_gelu", {}},
                      GenCase{"learned_layernorm_bias_swiglu", {"model.pos=learned", "model.norm=layernorm",
                                                                "model.bias=true", "model.ffn=swiglu"}},
                      GenCase{"sinusoidal_untied", {"model.pos=sinusoidal", "model.tied_embeddings=false"}},
                      GenCase{"moe_token_choice_shared", {"moe.experts=4", "moe.top_k=2", "moe.shared_experts=1"}},
                      GenCase{"moe_expert_choice", {"moe.experts=4", "moe.top_k=1", "moe.router=expert_choice",
                                                    "moe.every=2"}}),
    [](const ::testing::TestParamInfo<GenCase>& info) { return std::string(info.param.name); });

TEST(Sampling, GreedyTopKTopPAndSeeds) {
  const std::vector<float> logits = {0.f, 3.f, 1.f, 2.9f, -5.f};
  Rng rng(1);
  SamplingOptions greedy;
  greedy.temperature = 0;
  EXPECT_EQ(sample_token(logits.data(), 5, greedy, rng), 1);
  SamplingOptions top2;
  top2.top_k = 2;
  for (int i = 0; i < 200; ++i) {
    const int32_t t = sample_token(logits.data(), 5, top2, rng);
    ASSERT_TRUE(t == 1 || t == 3) << t;
  }
  SamplingOptions nucleus;
  nucleus.top_p = 0.3;  // token 1 alone holds ~0.45 of the mass
  for (int i = 0; i < 100; ++i) ASSERT_EQ(sample_token(logits.data(), 5, nucleus, rng), 1);
  // Same seed, same draws.
  Rng a(9), b(9);
  for (int i = 0; i < 50; ++i) ASSERT_EQ(sample_token(logits.data(), 5, {}, a), sample_token(logits.data(), 5, {}, b));
}

}  // namespace
}  // namespace moelab
