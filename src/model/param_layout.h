#pragma once
// The parameter layout: every parameter's name, shape and offset in one flat block, in the order of the parameter
// table (model/params.h). Parameters, gradients and both AdamW moments are four arenas with this same layout, so an
// optimizer or a checkpoint walks one list.
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "config/config.h"
#include "model/params.h"

namespace moelab {

struct ParamEntry {
  std::string name;
  Shape shape;
  int64_t offset = 0;  // in floats, from the start of the block
  ParamKind kind = ParamKind::Matrix;
  float init_std = 0.f;  // 0: zeros for biases; norm weights start at 1
};

class ParamLayout {
 public:
  // expert_shards > 1: expert parallelism, each routed-expert tensor holds 1 / expert_shards of its experts (dim 0).
  explicit ParamLayout(const ModelConfig& config, int64_t expert_shards = 1);
  const std::vector<ParamEntry>& entries() const { return entries_; }
  const ParamEntry& find(const std::string& name) const;
  bool has(const std::string& name) const;
  int64_t total() const { return total_; }
  Tensor view(float* base, const std::string& name) const {
    const auto& e = find(name);
    return Tensor(base + e.offset, e.shape);
  }
  // A parameter this model may lack (a feature it has off, e.g. biases): an empty tensor when absent. A name that
  // no moelab model has (a misspelling) throws, so it can never pass for "feature off" and drop a weight silently.
  Tensor view_or_empty(float* base, const std::string& name) const {
    if (!is_parameter_name(name)) throw Error("'" + name + "' is not a parameter name any moelab model has (misspelt?)");
    return has(name) ? view(base, name) : Tensor();
  }
  // Whether `name` is one a moelab model can have: a name of the parameter table (model/params.h), block tensors
  // as layers.<i>.<name>.
  static bool is_parameter_name(const std::string& name);

 private:
  void add(const std::string& name, Shape shape, ParamKind kind, float init_std);
  std::vector<ParamEntry> entries_;
  int64_t total_ = 0;
};

// Parameters one token touches: everything except routed experts, plus top_k of the routed experts of each
// MoE layer (the active parameter count N_a of the scaling-law papers, embeddings included).
int64_t active_parameter_count(const ParamLayout& layout, const ModelConfig& config);

// Whether AdamW decays this parameter: weight matrices always, embeddings only when asked, never norms/biases.
bool is_decayed(ParamKind kind, bool decay_embeddings);

}  // namespace moelab
