// A whole tiny model's gradients against central finite differences, for each family of options.
#include "backend/backend.h"
#include "model/transformer.h"
#include "test_util.h"

namespace moelab {
namespace {

struct ModelCase {
  const char* name;
  NormKind norm;
  PosKind pos;
  FfnKind ffn;
  bool bias;
  bool tied;
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

class ModelFd : public ::testing::TestWithParam<ModelCase> {};

TEST_P(ModelFd, GradientsMatchFiniteDifferences) {
  const ModelCase& mc = GetParam();
  ModelConfig m;
  m.vocab_size = 11;
  m.d_model = 8;
  m.n_layers = 2;
  m.n_heads = 2;
  m.d_ff = 12;
  m.seq_len = 5;
  m.norm = mc.norm;
  m.pos = mc.pos;
  m.ffn = mc.ffn;
  m.bias = mc.bias;
  m.tied_embeddings = mc.tied;
  m.init_std = 0.3;  // large enough that every parameter matters at the scale of the FD step
  auto be = testing::make_test_backend(2);
  const int64_t B = 2;
  Transformer model(m, *be, B);
  model.init_weights(7);
  Rng rng(99);
  // Perturb norm weights and biases away from 1 and 0 so their gradients are generic.
  for (const auto& e : model.layout().entries())
    if (e.kind == ParamKind::NormWeight || e.kind == ParamKind::Bias)
    {
      std::vector<float> values(e.shape.numel());
      testing::fill_normal(values.data(), e.shape.numel(), rng, 0.2f, e.kind == ParamKind::NormWeight ? 1.f : 0.f);
      be->upload(model.params() + e.offset, values.data(), e.shape.numel());
    }
  std::vector<int32_t> tokens(B * m.seq_len), targets(B * m.seq_len);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(m.vocab_size));
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(m.vocab_size));
  targets[3] = -1;  // an ignored position

  model.zero_grad();
  model.forward(tokens.data(), targets.data(), B, 1.f);
  model.backward();

  std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> pairs;
  for (const auto& e : model.layout().entries())
    pairs.push_back({e.name, {model.layout().view(model.params(), e.name), model.layout().view(model.grads(), e.name)}});
  auto loss = [&] { return model.forward(tokens.data(), targets.data(), B); };
  testing::check_gradients(mc.name, pairs, loss, rng, 24, {.eps = 3e-3, .rtol = 3e-2, .atol_frac = 3e-3}, be.get());
}

INSTANTIATE_TEST_SUITE_P(
    Families, ModelFd,
    ::testing::Values(ModelCase{"gelu_layernorm_learned_bias_tied", NormKind::LayerNorm, PosKind::Learned, FfnKind::Gelu, true, true},
                      ModelCase{"swiglu_rmsnorm_rope_untied", NormKind::RMSNorm, PosKind::Rope, FfnKind::SwiGLU, false, false},
                      ModelCase{"gelu_layernorm_sinusoidal_bias_untied", NormKind::LayerNorm, PosKind::Sinusoidal, FfnKind::Gelu, true, false}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moelab
