#pragma once
// The parameter table: every tensor a moelab model can have, declared once, with its checkpoint name, kind,
// initialisation, shape in a given model (none: the model lacks it) and the field of the typed views that holds
// it. The layout (model/param_layout.h, and through it checkpoints, the optimizer, export and initialisation), the
// check on parameter names and the model's typed views (param_views) all read this table; nothing else spells the
// names out for the model's own use.
#include <string>
#include <vector>

#include "config/config.h"
#include "core/tensor.h"
#include "model/plan.h"
#include "moe/moe.h"

namespace moelab {

enum class ParamKind { Matrix, Embedding, NormWeight, Bias };

// Checkpoint names, spelled once: the tables below declare each tensor under its name, and code that must name a
// tensor from outside a model (the Hugging Face importer) uses these constants; block tensors are
// layers.<i>.<name> (block_param_name).
namespace param_name {
inline constexpr char kTokEmb[] = "tok_emb.weight", kPosEmb[] = "pos_emb.weight",
                      kFinalNorm[] = "final_norm.weight", kFinalNormBias[] = "final_norm.bias",
                      kLmHead[] = "lm_head.weight";
inline constexpr char kNorm1[] = "norm1.weight", kNorm1Bias[] = "norm1.bias", kQkv[] = "attn.qkv.weight",
                      kQkvBias[] = "attn.qkv.bias", kQNorm[] = "attn.q_norm.weight", kKNorm[] = "attn.k_norm.weight",
                      kOut[] = "attn.out.weight", kOutBias[] = "attn.out.bias", kNorm2[] = "norm2.weight",
                      kNorm2Bias[] = "norm2.bias", kFc1[] = "ffn.fc1.weight", kFc1Bias[] = "ffn.fc1.bias",
                      kFc2[] = "ffn.fc2.weight", kFc2Bias[] = "ffn.fc2.bias", kRouter[] = "moe.router.weight",
                      kExpertsFc1[] = "moe.experts.fc1.weight", kExpertsFc1Bias[] = "moe.experts.fc1.bias",
                      kExpertsFc2[] = "moe.experts.fc2.weight", kExpertsFc2Bias[] = "moe.experts.fc2.bias",
                      kSharedFc1[] = "moe.shared.fc1.weight", kSharedFc1Bias[] = "moe.shared.fc1.bias",
                      kSharedFc2[] = "moe.shared.fc2.weight", kSharedFc2Bias[] = "moe.shared.fc2.bias";
}  // namespace param_name
// "layers.<layer>.<name>"
std::string block_param_name(int64_t layer, const char* name);
// Normal(0, init_std); Residual: a projection into the residual stream, init_std / sqrt(2 n_layers) (GPT-2);
// Zero (biases) and One (norm weights).
enum class ParamInit { Normal, Residual, Zero, One };

// Typed views of one block's parameters (or gradients): empty tensors for what the block lacks.
struct BlockParams {
  Tensor norm1_w, norm1_b, qkv_w, qkv_b, out_w, out_b, norm2_w, norm2_b, fc1_w, fc1_b, fc2_w, fc2_b;
  MoeWeights moe;             // MoE blocks (fc1/fc2 above empty)
  Tensor q_norm_w, k_norm_w;  // model.qk_norm, else empty
};
struct ModelParams {
  Tensor tok_emb, pos_emb, final_norm_w, final_norm_b;
  Tensor head;  // lm_head.weight, or tok_emb.weight when the embeddings are tied
  std::vector<BlockParams> blocks;
};

// A tensor outside the blocks.
struct ModelParamSpec {
  const char* name;
  ParamKind kind;
  ParamInit init;
  bool after_blocks;                             // laid out after the blocks (else before)
  Tensor& (*field)(ModelParams&);
  Shape (*shape)(const ModelConfig&);            // rank 0: this model has none
  bool embedding = false;  // counted as an embedding (the papers' N leaves it out): token, position, untied head
};
// A tensor of every block, named layers.<i>.<name>.
struct BlockParamSpec {
  const char* name;
  ParamKind kind;
  ParamInit init;
  Tensor& (*field)(BlockParams&);
  Shape (*shape)(const ModelConfig&, const BlockPlan&);  // rank 0: this block has none
  bool routed_experts = false;  // a stack over the block's routed experts (leading dimension): K of them are active
};

// In layout order: the model tensors before the blocks, every block's (in this order), those after. Everything
// that needs the model's tensors reads these tables: the layout (checkpoints, the optimizer, initialisation), the
// typed views (the model, export), the parameter-name check and the parameter counts (model/count.h).
const std::vector<ModelParamSpec>& model_param_table();
const std::vector<BlockParamSpec>& block_param_table();

// The typed views of a parameter (or gradient) block laid out by `layout`, from the table.
class ParamLayout;
ModelParams param_views(const ParamLayout& layout, float* base, const ModelConfig& config);

}  // namespace moelab
