#include "model/count.h"

#include "core/error.h"
#include "model/flops.h"
#include "model/params.h"
#include "model/plan.h"

namespace moelab {

int64_t ffn_parameters(const ModelConfig& m, int64_t hidden) {
  const int64_t C = m.d_model;
  const int64_t glu = m.ffn == FfnKind::SwiGLU ? 2 : 1;  // SwiGLU's fc1 produces [gate | up]
  const int64_t weights = glu * hidden * C + C * hidden;
  const int64_t biases = m.bias ? glu * hidden + C : 0;
  return weights + biases;
}

int64_t moe_layer_count(const ModelConfig& m) {
  int64_t n = 0;
  for (int64_t i = 0; i < m.n_layers; ++i) n += m.moe.is_moe_layer(i);
  return n;
}

ParameterCounts count_parameters(const ModelConfig& m) {
  ParameterCounts n;
  const ModelPlan plan(m);
  n.moe_layers = moe_layer_count(m);
  if (m.moe.enabled()) {
    n.routed_experts = m.moe.routed_experts();
    n.active_experts = m.moe.active_experts();
    n.shared_experts = m.moe.shared_experts;
    n.granularity = m.moe.granularity;
    n.sparsity = m.moe.sparsity();
    n.expansion_rate = static_cast<double>(n.routed_experts * ffn_parameters(m, plan.expert_hidden)) /
                       static_cast<double>(ffn_parameters(m, m.ffn_hidden()));
  }
  // Every tensor the parameter table gives this model, by its shape: embeddings (token, position, an untied head),
  // the routed experts (per expert: a stack's size over its experts), everything else.
  const auto size = [](const Shape& s) { return s.rank > 0 ? s.numel() : int64_t{0}; };
  for (const ModelParamSpec& spec : model_param_table()) {
    const int64_t k = size(spec.shape(m));
    n.non_expert += k;
    if (spec.embedding) n.embedding += k;
  }
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const BlockPlan& block = plan.blocks[static_cast<size_t>(i)];
    for (const BlockParamSpec& spec : block_param_table()) {
      const int64_t k = size(spec.shape(m, block));
      if (spec.routed_experts) n.per_expert += k > 0 ? k / block.moe_dims.local_experts() : 0;
      else n.non_expert += k;
    }
  }
  n.total = n.non_expert + n.routed_experts * n.per_expert;
  n.active = n.non_expert + n.active_experts * n.per_expert;
  n.nonembedding_total = n.total - n.embedding;
  n.nonembedding_active = n.active - n.embedding;
  return n;
}

// ---- FLOPs ------------------------------------------------------------------------------------------------

const std::vector<FlopConvention>& all_flop_conventions() {
  static const std::vector<FlopConvention> conventions = {FlopConvention::Kaplan,      FlopConvention::Chinchilla,
                                                          FlopConvention::Abnar,       FlopConvention::AbnarRouter,
                                                          FlopConvention::Krajewski,   FlopConvention::Exact};
  return conventions;
}

double kaplan_flops_per_token(double nonembedding_active_params, double n_layers, double n_ctx, double d_model) {
  // Kaplan et al. 2020, Table 1: 2N forward for the weights plus 2 n_layers n_ctx d_attn for the attention
  // scores ("Mask"); training is 3x forward.
  return 6 * nonembedding_active_params + 6 * n_layers * n_ctx * d_model;
}

double chinchilla_flops_per_token(double active_params, double n_layers, double n_ctx, double d_model) {
  // Hoffmann et al. 2022, Appendix F counts both T x T products (scores and probs @ values): twice Kaplan's rate.
  return 6 * active_params + 12 * n_layers * n_ctx * d_model;
}

double abnar_flops_per_token(double n_layers, double d_model, double n_ctx, double active_experts,
                             double granularity, double vocab_size) {
  // Terms, per layer, in units of 6 d^2: attention projections 4; attention scores and values 2 n_ctx / d;
  // K GLU experts of hidden 4d / G, 3 matrices each, 12 K / G; the output head, spread over the layers, V / (d L).
  const double d = d_model;
  return 6 * n_layers * d * d *
         (4 + 2 * n_ctx / d + 12 * active_experts / granularity + vocab_size / (d * n_layers));
}

double krajewski_flops_per_token(double d_model, double n_blocks, double expansion, double granularity) {
  // 12 d^2 active parameters per block (4 d^2 attention + 8 d^2 FFN or its top-G experts) at c_f each, and a
  // router of d x (E G) parameters at c_r each.
  return (12 * d_model * d_model * kKrajewskiFlopsPerParam +
          d_model * expansion * granularity * kKrajewskiFlopsPerRouterParam) *
         n_blocks;
}

double kaplan_flops_per_token(const ModelConfig& m) {
  return kaplan_flops_per_token(static_cast<double>(count_parameters(m).nonembedding_active),
                                static_cast<double>(m.n_layers), static_cast<double>(m.seq_len),
                                static_cast<double>(m.d_model));
}

double chinchilla_flops_per_token(const ModelConfig& m) {
  return chinchilla_flops_per_token(static_cast<double>(count_parameters(m).active), static_cast<double>(m.n_layers),
                                    static_cast<double>(m.seq_len), static_cast<double>(m.d_model));
}

double abnar_flops_per_token(const ModelConfig& m) {
  // A dense FFN is one always-active expert of full width: K = G = 1.
  const double K = m.moe.enabled() ? static_cast<double>(m.moe.active_experts()) : 1.0;
  const double G = m.moe.enabled() ? static_cast<double>(m.moe.granularity) : 1.0;
  return abnar_flops_per_token(static_cast<double>(m.n_layers), static_cast<double>(m.d_model),
                               static_cast<double>(m.seq_len), K, G, static_cast<double>(m.vocab_size));
}

double abnar_router_flops_per_token(const ModelConfig& m) {
  const double router_params = static_cast<double>(moe_layer_count(m)) * static_cast<double>(m.d_model) *
                               static_cast<double>(m.moe.enabled() ? m.moe.routed_experts() : 0);
  return abnar_flops_per_token(m) + kAbnarFlopsPerRouterParam * router_params;
}

double krajewski_flops_per_token(const ModelConfig& m) {
  // E G is the number of routed experts; take it from the config rather than from the parameter-ratio
  // expansion rate, which biases perturb. A dense model has no router: E G = 0.
  const double G = m.moe.enabled() ? static_cast<double>(m.moe.granularity) : 1.0;
  const double routed = m.moe.enabled() ? static_cast<double>(m.moe.routed_experts()) : 0.0;
  return krajewski_flops_per_token(static_cast<double>(m.d_model), static_cast<double>(m.n_layers), routed / G, G);
}

double training_flops_per_token(const ModelConfig& m, FlopConvention convention) {
  switch (convention) {
    case FlopConvention::Kaplan: return kaplan_flops_per_token(m);
    case FlopConvention::Chinchilla: return chinchilla_flops_per_token(m);
    case FlopConvention::Abnar: return abnar_flops_per_token(m);
    case FlopConvention::AbnarRouter: return abnar_router_flops_per_token(m);
    case FlopConvention::Krajewski: return krajewski_flops_per_token(m);
    case FlopConvention::Exact: return exact_training_flops_per_token(m);
  }
  throw Error("unknown FLOP convention " + std::to_string(static_cast<int>(convention)) +
              "; use one of kaplan, chinchilla, abnar, abnar_router, krajewski, exact");
}

}  // namespace moelab
