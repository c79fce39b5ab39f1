#include "model/params.h"

#include "model/param_layout.h"

namespace moelab {

namespace {

bool norm_bias(const ModelConfig& m) { return m.norm == NormKind::LayerNorm && m.bias; }
Shape none() { return Shape(); }

}  // namespace

const std::vector<ModelParamSpec>& model_param_table() {
  static const std::vector<ModelParamSpec> table = {
      {"tok_emb.weight", ParamKind::Embedding, ParamInit::Normal, false,
       [](ModelParams& w) -> Tensor& { return w.tok_emb; },
       [](const ModelConfig& m) { return Shape{m.vocab_size, m.d_model}; }},
      {"pos_emb.weight", ParamKind::Embedding, ParamInit::Normal, false,
       [](ModelParams& w) -> Tensor& { return w.pos_emb; },
       [](const ModelConfig& m) { return m.pos == PosKind::Learned ? Shape{m.seq_len, m.d_model} : none(); }},
      {"final_norm.weight", ParamKind::NormWeight, ParamInit::One, true,
       [](ModelParams& w) -> Tensor& { return w.final_norm_w; }, [](const ModelConfig& m) { return Shape{m.d_model}; }},
      {"final_norm.bias", ParamKind::Bias, ParamInit::Zero, true,
       [](ModelParams& w) -> Tensor& { return w.final_norm_b; },
       [](const ModelConfig& m) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      {"lm_head.weight", ParamKind::Matrix, ParamInit::Normal, true, [](ModelParams& w) -> Tensor& { return w.head; },
       [](const ModelConfig& m) { return m.tied_embeddings ? none() : Shape{m.vocab_size, m.d_model}; }},
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
      {"norm1.weight", ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.norm1_w; },
       [](const M& m, const B&) { return Shape{m.d_model}; }},
      {"norm1.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.norm1_b; },
       [](const M& m, const B&) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      {"attn.qkv.weight", ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.qkv_w; },
       [](const M& m, const B&) { return Shape{3 * m.d_model, m.d_model}; }},
      {"attn.qkv.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.qkv_b; },
       [](const M& m, const B&) { return m.bias ? Shape{3 * m.d_model} : none(); }},
      {"attn.q_norm.weight", ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.q_norm_w; },
       [](const M& m, const B&) { return m.qk_norm ? Shape{m.head_dim()} : none(); }},
      {"attn.k_norm.weight", ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.k_norm_w; },
       [](const M& m, const B&) { return m.qk_norm ? Shape{m.head_dim()} : none(); }},
      {"attn.out.weight", ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.out_w; },
       [](const M& m, const B&) { return Shape{m.d_model, m.d_model}; }},
      {"attn.out.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.out_b; },
       [](const M& m, const B&) { return m.bias ? Shape{m.d_model} : none(); }},
      {"norm2.weight", ParamKind::NormWeight, ParamInit::One, [](P& w) -> Tensor& { return w.norm2_w; },
       [](const M& m, const B&) { return Shape{m.d_model}; }},
      {"norm2.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.norm2_b; },
       [](const M& m, const B&) { return norm_bias(m) ? Shape{m.d_model} : none(); }},
      // dense blocks
      {"ffn.fc1.weight", ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.fc1_w; },
       [](const M& m, const B& b) { return b.moe ? none() : Shape{b.ffn_fc1_rows, m.d_model}; }},
      {"ffn.fc1.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.fc1_b; },
       [](const M& m, const B& b) { return b.moe || !m.bias ? none() : Shape{b.ffn_fc1_rows}; }},
      {"ffn.fc2.weight", ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.fc2_w; },
       [](const M& m, const B& b) { return b.moe ? none() : Shape{m.d_model, b.ffn_hidden}; }},
      {"ffn.fc2.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.fc2_b; },
       [](const M& m, const B& b) { return b.moe || !m.bias ? none() : Shape{m.d_model}; }},
      // MoE blocks: the router, the routed experts, the shared expert
      {"moe.router.weight", ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.moe.router; },
       [](const M& m, const B& b) { return b.moe ? Shape{b.moe_dims.experts, m.d_model} : none(); }},
      {"moe.experts.fc1.weight", ParamKind::Matrix, ParamInit::Normal, [](P& w) -> Tensor& { return w.moe.fc1_w; },
       [](const M& m, const B& b) {
         return b.moe ? Shape{b.moe_dims.local_experts(), b.moe_dims.fc1_rows(), m.d_model} : none();
       }},
      {"moe.experts.fc1.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.fc1_b; },
       [](const M& m, const B& b) {
         return b.moe && m.bias ? Shape{b.moe_dims.local_experts(), b.moe_dims.fc1_rows()} : none();
       }},
      {"moe.experts.fc2.weight", ParamKind::Matrix, ParamInit::Residual, [](P& w) -> Tensor& { return w.moe.fc2_w; },
       [](const M& m, const B& b) {
         return b.moe ? Shape{b.moe_dims.local_experts(), m.d_model, b.moe_dims.expert_hidden} : none();
       }},
      {"moe.experts.fc2.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.fc2_b; },
       [](const M& m, const B& b) { return b.moe && m.bias ? Shape{b.moe_dims.local_experts(), m.d_model} : none(); }},
      {"moe.shared.fc1.weight", ParamKind::Matrix, ParamInit::Normal,
       [](P& w) -> Tensor& { return w.moe.shared_fc1_w; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 ? Shape{b.moe_dims.shared_fc1_rows(), m.d_model} : none();
       }},
      {"moe.shared.fc1.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.shared_fc1_b; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 && m.bias ? Shape{b.moe_dims.shared_fc1_rows()} : none();
       }},
      {"moe.shared.fc2.weight", ParamKind::Matrix, ParamInit::Residual,
       [](P& w) -> Tensor& { return w.moe.shared_fc2_w; },
       [](const M& m, const B& b) {
         return b.moe && b.moe_dims.shared_hidden > 0 ? Shape{m.d_model, b.moe_dims.shared_hidden} : none();
       }},
      {"moe.shared.fc2.bias", ParamKind::Bias, ParamInit::Zero, [](P& w) -> Tensor& { return w.moe.shared_fc2_b; },
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
    const std::string prefix = "layers." + std::to_string(i) + ".";
    for (const BlockParamSpec& spec : block_param_table()) spec.field(w.blocks[i]) = view(prefix + spec.name);
  }
  return w;
}

}  // namespace moelab
