#include "model/param_layout.h"

#include <cmath>

#include "model/plan.h"

namespace moelab {

ParamLayout::ParamLayout(const ModelConfig& m, int64_t expert_shards) {
  const ModelPlan plan(m, expert_shards);
  const int64_t C = m.d_model, V = m.vocab_size;
  const float std = static_cast<float>(m.init_std);
  // Projections that write into the residual stream are scaled down so the stream's variance does not grow
  // with depth (GPT-2).
  const float residual_std = static_cast<float>(m.init_std / std::sqrt(2.0 * m.n_layers));
  const bool norm_bias = m.norm == NormKind::LayerNorm && m.bias;
  add("tok_emb.weight", {V, C}, ParamKind::Embedding, std);
  if (m.pos == PosKind::Learned) add("pos_emb.weight", {m.seq_len, C}, ParamKind::Embedding, std);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    add(p + "norm1.weight", {C}, ParamKind::NormWeight, 0.f);
    if (norm_bias) add(p + "norm1.bias", {C}, ParamKind::Bias, 0.f);
    add(p + "attn.qkv.weight", {3 * C, C}, ParamKind::Matrix, std);
    if (m.bias) add(p + "attn.qkv.bias", {3 * C}, ParamKind::Bias, 0.f);
    if (m.qk_norm) {
      add(p + "attn.q_norm.weight", {m.head_dim()}, ParamKind::NormWeight, 0.f);
      add(p + "attn.k_norm.weight", {m.head_dim()}, ParamKind::NormWeight, 0.f);
    }
    add(p + "attn.out.weight", {C, C}, ParamKind::Matrix, residual_std);
    if (m.bias) add(p + "attn.out.bias", {C}, ParamKind::Bias, 0.f);
    add(p + "norm2.weight", {C}, ParamKind::NormWeight, 0.f);
    if (norm_bias) add(p + "norm2.bias", {C}, ParamKind::Bias, 0.f);
    const BlockPlan& block = plan.blocks[i];
    const int64_t glu = plan.glu;  // SwiGLU's fc1 holds [gate | up]
    if (!block.moe) {
      const int64_t F = block.ffn_hidden;
      add(p + "ffn.fc1.weight", {glu * F, C}, ParamKind::Matrix, std);
      if (m.bias) add(p + "ffn.fc1.bias", {glu * F}, ParamKind::Bias, 0.f);
      add(p + "ffn.fc2.weight", {C, F}, ParamKind::Matrix, residual_std);
      if (m.bias) add(p + "ffn.fc2.bias", {C}, ParamKind::Bias, 0.f);
      continue;
    }
    const MoeDims& d = block.moe_dims;
    const int64_t E = d.local_experts(), Fe = d.expert_hidden, Fs = d.shared_hidden;
    add(p + "moe.router.weight", {d.experts, C}, ParamKind::Matrix, std);
    add(p + "moe.experts.fc1.weight", {E, glu * Fe, C}, ParamKind::Matrix, std);
    if (m.bias) add(p + "moe.experts.fc1.bias", {E, glu * Fe}, ParamKind::Bias, 0.f);
    add(p + "moe.experts.fc2.weight", {E, C, Fe}, ParamKind::Matrix, residual_std);
    if (m.bias) add(p + "moe.experts.fc2.bias", {E, C}, ParamKind::Bias, 0.f);
    if (Fs > 0) {
      add(p + "moe.shared.fc1.weight", {glu * Fs, C}, ParamKind::Matrix, std);
      if (m.bias) add(p + "moe.shared.fc1.bias", {glu * Fs}, ParamKind::Bias, 0.f);
      add(p + "moe.shared.fc2.weight", {C, Fs}, ParamKind::Matrix, residual_std);
      if (m.bias) add(p + "moe.shared.fc2.bias", {C}, ParamKind::Bias, 0.f);
    }
  }
  add("final_norm.weight", {C}, ParamKind::NormWeight, 0.f);
  if (norm_bias) add("final_norm.bias", {C}, ParamKind::Bias, 0.f);
  if (!m.tied_embeddings) add("lm_head.weight", {V, C}, ParamKind::Matrix, std);
}

bool ParamLayout::is_parameter_name(const std::string& name) {
  static const char* const top[] = {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "final_norm.bias",
                                    "lm_head.weight"};
  static const char* const block[] = {
      "norm1.weight",           "norm1.bias",           "attn.qkv.weight",        "attn.qkv.bias",
      "attn.q_norm.weight",     "attn.k_norm.weight",   "attn.out.weight",        "attn.out.bias",
      "norm2.weight",           "norm2.bias",           "ffn.fc1.weight",         "ffn.fc1.bias",
      "ffn.fc2.weight",         "ffn.fc2.bias",         "moe.router.weight",      "moe.experts.fc1.weight",
      "moe.experts.fc1.bias",   "moe.experts.fc2.weight", "moe.experts.fc2.bias", "moe.shared.fc1.weight",
      "moe.shared.fc1.bias",    "moe.shared.fc2.weight",  "moe.shared.fc2.bias"};
  for (const char* t : top)
    if (name == t) return true;
  const std::string prefix = "layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t at = prefix.size();
  while (at < name.size() && name[at] >= '0' && name[at] <= '9') ++at;
  if (at == prefix.size() || at >= name.size() || name[at] != '.') return false;
  const std::string part = name.substr(at + 1);
  for (const char* b : block)
    if (part == b) return true;
  return false;
}

void ParamLayout::add(const std::string& name, Shape shape, ParamKind kind, float init_std) {
  if (!is_parameter_name(name)) throw Error("ParamLayout: '" + name + "' is missing from is_parameter_name's list");
  entries_.push_back({name, shape, total_, kind, init_std});
  total_ += shape.numel();
}

const ParamEntry& ParamLayout::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return e;
  throw Error("model has no parameter named '" + name + "'");
}

bool ParamLayout::has(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return true;
  return false;
}

int64_t active_parameter_count(const ParamLayout& layout, const ModelConfig& m) {
  int64_t active = 0;
  for (const auto& e : layout.entries()) {
    if (e.name.find(".moe.experts.") != std::string::npos)
      active += e.shape.numel() / m.moe.routed_experts() * m.moe.active_experts();
    else
      active += e.shape.numel();
  }
  return active;
}

bool is_decayed(ParamKind kind, bool decay_embeddings) {
  return kind == ParamKind::Matrix || (kind == ParamKind::Embedding && decay_embeddings);
}

}  // namespace moelab
