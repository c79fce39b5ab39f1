#pragma once
// A Mixture-of-Experts FFN layer in three parts (Megatron-Core's router / token dispatcher / experts split):
//   Router          (moe/router.h): logits -> scores -> the routing decision, (token, expert, weight) rows sorted by
//                   expert (Backend::route); the balancing state and losses; statistics on demand
//   TokenDispatcher (moe/dispatcher.h): the routed rows to the experts that compute them and their outputs back:
//                   in place (local), or by all-to-all to the ranks holding the experts (expert parallelism),
//                   chosen once when the layer is built
//   Experts         (moe/experts.h): grouped GEMM over the per-expert slices, activation, grouped GEMM
// MoeLayer (moe/moe_layer.h) owns a layer's router and dispatcher and runs route -> gather -> dispatch -> experts ->
// combine -> weighted sum per token, and the exact reverse for the backward. This header holds the data the parts
// share: the dims, the weights, the saved activations, the routing buffers and the statistics.
// Sorting by expert and combining per token in a fixed order means no atomics: results are deterministic.
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "layers/kinds.h"
#include "moe/kinds.h"

namespace moelab {

struct MoeDims {
  int64_t batch = 0, seq = 0, d_model = 0;
  int64_t experts = 0;        // routed experts E
  int64_t top_k = 0;          // active routed experts per token K (token choice) / average (expert choice)
  int64_t expert_hidden = 0;  // F_e = d_ff / G
  int64_t shared_hidden = 0;  // shared_experts * F_e (0: none)
  FfnKind ffn = FfnKind::Gelu;
  RouterKind router = RouterKind::TokenChoice;
  ScoreKind score = ScoreKind::Softmax;
  double capacity_factor = 0;
  bool renormalize = false;
  float gate_scale = 1;
  bool bias = false;
  bool balance_bias = false;     // a selection bias (Routing::selection_bias) joins the top-k choice
  float aux_loss_weight = 0;     // as applied (0 unless balance = aux_loss)
  float seq_aux_loss_weight = 0;
  float z_loss_weight = 0;
  float router_jitter = 0;       // training forwards with a nonzero jitter_seed only
  uint64_t jitter_seed = 0;      // this forward's noise (0: none); the same for its backward
  bool expert_grad_scale = false;
  // Expert parallelism (moe/expert_parallel.h): the routed experts split over this many ranks; this rank holds
  // local_experts() of them (its weights, its products). 1: all of them.
  int64_t expert_shards = 1;

  int64_t tokens() const { return batch * seq; }
  int64_t local_experts() const { return experts / expert_shards; }
  int64_t fc1_rows() const { return ffn == FfnKind::SwiGLU ? 2 * expert_hidden : expert_hidden; }
  int64_t shared_fc1_rows() const { return ffn == FfnKind::SwiGLU ? 2 * shared_hidden : shared_hidden; }
  // Token choice: per-expert capacity (0 = unlimited). Expert choice: tokens each expert takes per group.
  int64_t token_choice_capacity() const;
  int64_t expert_choice_capacity() const;
  // Upper bound on dispatched rows, for sizing buffers once.
  int64_t max_rows() const;
  // Upper bound on the rows this rank's experts compute: its own (max_rows), or under expert parallelism what
  // every rank of the group may send it.
  int64_t max_expert_rows() const { return max_rows() * expert_shards; }
};

struct MoeWeights {
  Tensor router;          // (E, C)
  // This rank's experts (E_local = local_experts(): all E without expert parallelism):
  Tensor fc1_w, fc1_b;    // (E_local, P, C), (E_local, P) with P = F_e or 2 F_e (SwiGLU [gate | up]); bias may be empty
  Tensor fc2_w, fc2_b;    // (E_local, C, F_e), (E_local, C)
  Tensor shared_fc1_w, shared_fc1_b, shared_fc2_w, shared_fc2_b;  // dense FFN of width shared_hidden, or empty
};

// Saved forward activations of one MoE layer (views into the model's arena).
struct MoeActivations {
  Tensor logits, probs;            // (N, E) router logits and scores (softmax or sigmoid), fp32
  Tensor x_sorted;                 // (R, C)  token rows gathered in expert order
  Tensor pre, act;                 // (R', P), (R', F_e): the experts' rows (R' = R, or the received rows)
  Tensor y_sorted;                 // (R, C)  expert outputs, before weighting
  Tensor shared_pre, shared_act;   // (N, shared P), (N, shared_hidden) or empty
  Tensor x_local, y_local;         // expert parallelism: (R', C) rows received for this rank's experts, their
                                   // outputs (else empty)
  Tensor router_in;                // (N, C) the router's jittered input (router_jitter > 0), else empty
};

// Backward scratch shared by all MoE layers.
struct MoeScratch {
  Tensor d_x_sorted, d_pre, d_act, d_y_sorted;  // like the activations
  Tensor d_weight;                              // (R)
  Tensor d_logits;                              // (N, E)
  Tensor d_shared_pre, d_shared_act;            // or empty
  Tensor ones;                                  // (R') of 1.0, for bias gradients as a GEMM
  Tensor d_x_local, d_y_local;                  // expert parallelism: like x_local, y_local (else empty)
  Tensor d_router_in;                           // (N, C) with router jitter, else empty
};

// Routing decisions of one layer's last forward: backend buffers sized once (RoutingState in backend.h says what
// each holds), plus the one thing the host needs to know, downloaded after routing: how many rows each expert got,
// which shapes the experts' products.
struct Routing {
  BackendArray<int32_t> row_token, row_expert, token_rows, topk_expert, topk_row;
  BackendArray<float> row_weight, topk_prob, lse;
  BackendArray<int64_t> expert_offsets, token_offsets;
  BackendArray<double> assigned_fraction, mean_prob, seq_fraction;
  BackendArray<float> selection_bias;      // (E) balance = bias: added to the scores for the top-k choice only
  BackendArray<double> statistics;         // (kRouterStatistics) Backend::router_statistics
  std::vector<int64_t> host_expert_offsets; // (E + 1) expert_offsets, downloaded
  int64_t rows = 0;                         // dispatched (token, expert) pairs R = host_expert_offsets[E]
  void reserve(Backend& backend, const MoeDims& d);
  RoutingState state() const;
};
struct MoeStats {
  std::vector<int64_t> tokens_per_expert;  // (E) rows each expert processed
  double dropped_fraction = 0;   // share of top-k choices dropped by capacity (token choice)
  int64_t idle_experts = 0;      // experts that received no token
  double router_entropy = 0;     // mean over tokens of -sum_e p log p (nats)
  double aux_loss = 0;           // E * sum_e f_e P_e (1 when perfectly balanced)
  double seq_aux_loss = 0;       // the same within each sequence, averaged over sequences
  double z_loss = 0;             // mean logsumexp(logits)^2
  std::vector<double> assigned;  // (E) top-k choices per expert, before capacity (token choice; expert choice: rows)
  double overload() const;       // max assigned / mean assigned (1: perfectly balanced)
  // The weighted auxiliary objective of this layer: aux, seq_aux and z losses times their weights.
  double weighted_aux(const MoeDims& d) const {
    return d.aux_loss_weight * aux_loss + d.seq_aux_loss_weight * seq_aux_loss + d.z_loss_weight * z_loss;
  }
  double tokens_cv() const;      // coefficient of variation of tokens_per_expert
};

// ---- the route seam (moe/router.cpp), exposed for tests -----------------------------------------------------------
RouterShape router_shape(const MoeDims& d);
// probs (N, E) and the routing decision from the router logits (N, E) (Backend::route), then the experts' row
// counts downloaded into routing.host_expert_offsets.
void route(Backend& be, const MoeDims& d, const float* logits, float* probs, Routing& routing);

}  // namespace moelab
