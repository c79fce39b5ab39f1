#include "model/param_layout.h"

#include <cmath>
#include <string>

#include "model/plan.h"

namespace moelab {

ParamLayout::ParamLayout(const ModelConfig& m, int64_t expert_shards) {
  const ModelPlan plan(m, expert_shards);
  const float std = static_cast<float>(m.init_std);
  // Projections that write into the residual stream are scaled down so the stream's variance does not grow
  // with depth (GPT-2).
  // model.zero_init_residual: those projections start at zero instead, every block the identity.
  const float residual_std =
      m.zero_init_residual ? 0.f : static_cast<float>(m.init_std / std::sqrt(2.0 * m.n_layers));
  const auto init_std = [&](ParamInit init) {
    return init == ParamInit::Normal ? std : init == ParamInit::Residual ? residual_std : 0.f;
  };
  const auto add_model_params = [&](bool after_blocks) {
    for (const ModelParamSpec& spec : model_param_table()) {
      const Shape shape = spec.shape(m);
      const bool zero_head = m.zero_init_head && std::string(spec.name) == param_name::kLmHead;
      if (spec.after_blocks == after_blocks && shape.rank > 0)
        add(spec.name, shape, spec.kind, zero_head ? 0.f : init_std(spec.init));
    }
  };
  add_model_params(false);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    for (const BlockParamSpec& spec : block_param_table()) {
      const Shape shape = spec.shape(m, plan.blocks[i]);
      if (shape.rank > 0) add(block_param_name(i, spec.name), shape, spec.kind, init_std(spec.init));
    }
  }
  add_model_params(true);
}

bool ParamLayout::is_parameter_name(const std::string& name) {
  for (const ModelParamSpec& spec : model_param_table())
    if (name == spec.name) return true;
  const std::string prefix = "layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t at = prefix.size();
  while (at < name.size() && name[at] >= '0' && name[at] <= '9') ++at;
  if (at == prefix.size() || at >= name.size() || name[at] != '.') return false;
  const std::string part = name.substr(at + 1);
  for (const BlockParamSpec& spec : block_param_table())
    if (part == spec.name) return true;
  return false;
}

void ParamLayout::add(const std::string& name, Shape shape, ParamKind kind, float init_std) {
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
