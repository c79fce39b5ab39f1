#include "model/params.h"

#include "model/param_layout.h"

namespace moelab {

namespace {

bool norm_bias(const ModelConfig& m) { return m.norm == NormKind::LayerNorm && m.bias; }
Shape none() { return Shape(); }

}  // namespace

std::string block_param_name(int64_t layer, const char* name) { return "layers." + std::to_string(layer) + "." + name; }

const std::vector<ModelParamSpec>& model_param_table() {
  static const std::vector<ModelParamSpec> table = {
      {param_name::kTokEmb, ParamKind::Embedding, ParamInit::Normal, false,
       [](ModelParams& w) -> Tensor& { return w.tok_emb; },
       [](const ModelConfig& m) { return Shape{m.vocab_size, m.d_model}; }, true},
      {param_name::kPosEmb, ParamKind::Embedding, ParamInit::Normal, false,
       [](ModelParams& w) -> Tensor& { return w.pos_emb; },
       [](const ModelConfig& m) { return m.pos == PosKind::Learned ? Shape{m.seq_len, m.d_model} : none(); }, true},
      {param_name::kFinalNorm, ParamKind::NormWeight, ParamInit::One, true,
       [](ModelParams& w) -> Tensor& { return w.final_norm_w; }, [](const ModelConfig& m) { return Shape{m.d_model}; }},
      {param_name::kFinalNormBias, ParamKind::Bias, ParamInit::Zero, true,
       [](ModelParams& w) -> Tensor& { return w.final_norm_b; },
       [](const ModelConfig& m) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      {param_name::kLmHead, ParamKind::Matrix, ParamInit::Normal, true, [](ModelParams& w) -> Tensor& { return w.head; },
       [](const ModelConfig& m) { return m.tied_embeddings ? none() : Shape{m.vocab_size, m.d_model}; }, true},
  };
  return table;
}

// Shapes read the block's plan: dense blocks their FFN, MoE blocks their experts (this rank's share under expert
// parallelism), SwiGLU's fc1 holding [gate | up].
const std::vector<BlockParamSpec>& block_param_table() {
  using P = BlockParams;
  using B = BlockPlan;
  using M = ModelConfig;
  static const std::vector<BlockParamSpec> table = {
      {param_name::kNorm1, ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.norm1_w; },
       [](const M& m, const B&) { return Shape{m.d_model}; }},
      {param_name::kNorm1Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.norm1_b; },
       [](const M& m, const B&) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      {param_name::kQkv, ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.qkv_w; },
       [](const M& m, const B&) { return Shape{3 * m.d_model, m.d_model}; }},
      {param_name::kQkvBias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.qkv_b; },
       [](const M& m, const B&) { return m.bias ? Shape{3 * m.d_model} : none(); }},
      {param_name::kQNorm, ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.q_norm_w; },
       [](const M& m, const B&) { return m.qk_norm ? Shape{m.head_dim()} : none(); }},
      {param_name::kKNorm, ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.k_norm_w; },
       [](const M& m, const B&) { return m.qk_norm ? Shape{m.head_dim()} : none(); }},
      {param_name::kOut, ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.out_w; },
       [](const M& m, const B&) { return Shape{m.d_model, m.d_model}; }},
      {param_name::kOutBias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.out_b; },
       [](const M& m, const B&) { return m.bias ? Shape{m.d_model} : none(); }},
      {param_name::kNorm2, ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.norm2_w; },
       [](const M& m, const B&) { return Shape{m.d_model}; }},
      {param_name::kNorm2Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.norm2_b; },
       [](const M& m, const B&) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      // dense blocks
      {param_name::kFc1, ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.fc1_w; },
       [](const M& m, const B& b) { return b.moe ? none() : Shape{b.ffn_fc1_rows, m.d_model}; }},
      {param_name::kFc1Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.fc1_b; },
       [](const M& m, const B& b) { return b.moe || !m.bias ? none() : Shape{b.ffn_fc1_rows}; }},
      {param_name::kFc2, ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.fc2_w; },
       [](const M& m, const B& b) { return b.moe ? none() : Shape{m.d_model, b.ffn_hidden}; }},
      {param_name::kFc2Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.fc2_b; },
       [](const M& m, const B& b) { return b.moe || !m.bias ? none() : Shape{m.d_model}; }},
      // MoE blocks: the router, the routed experts, the shared expert
      {param_name::kRouter, ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.moe.router; },
       [](const M& m, const B& b) { return b.moe ? Shape{b.moe_dims.experts, m.d_model} : none(); }},
      {param_name::kExpertsFc1, ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.moe.fc1_w; },
       [](const M& m, const B& b) {
         return b.moe ? Shape{b.moe_dims.local_experts(), b.moe_dims.fc1_rows(), m.d_model} : none();
       }, true},
      {param_name::kExpertsFc1Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.fc1_b; },
       [](const M& m, const B& b) {
         return b.moe && m.bias ? Shape{b.moe_dims.local_experts(), b.moe_dims.fc1_rows()} : none();
       }, true},
      {param_name::kExpertsFc2, ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.moe.fc2_w; },
       [](const M& m, const B& b) {
         return b.moe ? Shape{b.moe_dims.local_experts(), m.d_model, b.moe_dims.expert_hidden} : none();
       }, true},
      {param_name::kExpertsFc2Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.fc2_b; },
       [](const M& m, const B& b) { return b.moe && m.bias ? Shape{b.moe_dims.local_experts(), m.d_model} : none(); },
       true},
      {param_name::kSharedFc1, ParamKind::Matrix, ParamInit::Normal,
       [](P& w) -> Tensor& { return w.moe.shared_fc1_w; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 ? Shape{b.moe_dims.shared_fc1_rows(), m.d_model} : none();
       }},
      {param_name::kSharedFc1Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.shared_fc1_b; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 && m.bias ? Shape{b.moe_dims.shared_fc1_rows()} : none();
       }},
      {param_name::kSharedFc2, ParamKind::Matrix, ParamInit::Residual,
       [](P& w) -> Tensor& { return w.moe.shared_fc2_w; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 ? Shape{m.d_model, b.moe_dims.shared_hidden} : none();
       }},
      {param_name::kSharedFc2Bias, ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.shared_fc2_b; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 && m.bias ? Shape{m.d_model} : none();
       }},
  };
  return table;
}

ModelParams param_views(const ParamLayout& layout, float* base, const ModelConfig& m) {
  const auto view = [&](const std::string& name) { return layout.has(name) ? layout.view(base, name) : Tensor(); };
  ModelParams w;
  for (const ModelParamSpec& spec : model_param_table()) spec.field(w) = view(spec.name);
  if (m.tied_embeddings) w.head = w.tok_emb;
  w.blocks.resize(m.n_layers);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    for (const BlockParamSpec& spec : block_param_table()) spec.field(w.blocks[i]) = view(block_param_name(i, spec.name));
  }
  return w;
}

}  // namespace moelab
