#pragma once
// The model as the engine builds it, turned from the config once: which blocks are MoE, how wide every FFN is, and
// each MoE block's dims. The parameter layout, parameter and FLOP counting (`moelab count`), the transformer
// (training and decoding) and the trainer's summary read it; the expert width d_ff / G is computed here and nowhere
// else.
#include <cstdint>
#include <vector>

#include "config/config.h"
#include "moe/moe.h"

namespace moelab {

struct BlockPlan {
  bool moe = false;
  // Dense blocks: the FFN's hidden width F and fc1's rows (2F for SwiGLU's [gate | up], else F).
  int64_t ffn_hidden = 0;
  int64_t ffn_fc1_rows = 0;
  // MoE blocks: router and experts (expert width d_ff / G, shared experts as one FFN); batch and seq are left 0 for
  // the caller's window (ModelPlan::moe_dims).
  MoeDims moe_dims;
};

struct ModelPlan {
  int64_t vocab = 0, d_model = 0, n_heads = 0, head_dim = 0, seq_len = 0;
  int64_t ffn_hidden = 0;   // the dense FFN width d_ff
  int64_t expert_hidden = 0;  // d_ff / G (MoE models; else 0)
  int64_t glu = 1;            // fc1 rows per hidden unit: 2 for SwiGLU
  std::vector<BlockPlan> blocks;

  // expert_shards: expert parallelism (MoeDims::expert_shards); checked to divide the routed experts.
  explicit ModelPlan(const ModelConfig& config, int64_t expert_shards = 1);
  // Block i's MoE dims for a window of `batch` sequences of `seq` positions.
  MoeDims moe_dims(int64_t block, int64_t batch, int64_t seq) const;
  int64_t moe_blocks() const;
};

}  // namespace moelab
