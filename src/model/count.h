#pragma once
// The parameter / FLOPs calculator behind `moelab count` (docs/counting.md).
//
// Parameter counts add up the shapes the parameter table (model/params.h) gives the config: they never build a
// ParamLayout, never allocate a tensor, and so answer instantly for shapes far too large to train (fairseq's
// 1.1T model). tests/test_count.cpp checks them against closed forms, ParamLayout and what a constructed
// Transformer allocates.
//
// FLOPs per token are given under each paper's convention by name, because the papers disagree on what counts
// (embeddings, the attention-score term, the router): a number is only comparable to a paper's under its
// convention.
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace moelab {

// Parameters of one FFN of hidden width `hidden` as the engine lays it out: fc1 (glu * hidden, C), fc2
// (C, hidden), and with model.bias their biases (glu * hidden) and (C); glu = 2 for SwiGLU ([gate | up]).
// A routed expert is ffn_parameters(m, ModelPlan(m).expert_hidden); the dense FFN is ffn_parameters(m, d_ff).
int64_t ffn_parameters(const ModelConfig& m, int64_t hidden);

// Number of MoE layers: layers i >= first_dense with (i + 1) % every == 0; 0 for a dense model.
int64_t moe_layer_count(const ModelConfig& m);

struct ParameterCounts {
  int64_t total = 0;                // every parameter (a tied embedding counted once)
  int64_t active = 0;               // N_a: all but the routed experts, plus K routed experts per MoE layer
  int64_t embedding = 0;            // token embedding + learned positions + untied output head
  int64_t nonembedding_total = 0;   // total - embedding
  int64_t nonembedding_active = 0;  // active - embedding
  int64_t non_expert = 0;           // everything but the routed experts (router and shared experts included)
  int64_t per_expert = 0;           // one routed expert, summed over all MoE layers
  int64_t moe_layers = 0;
  int64_t routed_experts = 0;       // E_total per MoE layer (0 for a dense model)
  int64_t active_experts = 0;       // K routed experts per token (0 for a dense model)
  int64_t shared_experts = 0;
  int64_t granularity = 1;          // G = d_ff / d_expert (1 for a dense model)
  double sparsity = 0.0;            // S = (E_total - K) / E_total (0 for a dense model)
  // E = parameters of all routed experts of one MoE layer / parameters of the dense FFN it replaces. Biases
  // make it differ slightly from E_total / G, which is why the Krajewski convention uses E_total directly.
  double expansion_rate = 0.0;
};

ParameterCounts count_parameters(const ModelConfig& m);

// ---- FLOPs per token under each convention (training = forward + backward) --------------------------------

// FlopConvention (config/config.h): the papers' conventions and the engine's exact count.

// Every convention, in the order `moelab count` prints them.
const std::vector<FlopConvention>& all_flop_conventions();
// Its stable name (the CLI table, JSON keys, config values): to_string(FlopConvention) in config/config.h.

// Krajewski et al. 2024, Eq. 10: c_f training FLOPs per active parameter, c_r per router parameter (router
// matmul 6, dispatch + combine 4 forward and 4 backward).
inline constexpr double kKrajewskiFlopsPerParam = 6.0;
inline constexpr double kKrajewskiFlopsPerRouterParam = 14.0;
// Abnar et al. 2025: R, training FLOPs per router parameter in the detailed form of Eq. 9.
inline constexpr double kAbnarFlopsPerRouterParam = 14.0;

// Plain-number forms of the formulas, so a paper's own values (even a non-integer n_blocks) can be plugged in.
// Kaplan et al. 2020: 6 N + 6 n_layers n_ctx d_model, N = active non-embedding parameters.
double kaplan_flops_per_token(double nonembedding_active_params, double n_layers, double n_ctx, double d_model);
// Hoffmann et al. 2022: 6 N + 12 n_layers n_ctx d_model, N = active parameters including embeddings and head.
double chinchilla_flops_per_token(double active_params, double n_layers, double n_ctx, double d_model);
// Abnar et al. 2025, Eq. 9: 6 n_layers d^2 (4 + 2 n_ctx / d + 12 K / G + V / (d n_layers)).
double abnar_flops_per_token(double n_layers, double d_model, double n_ctx, double active_experts,
                             double granularity, double vocab_size);
// Krajewski et al. 2024, Eq. 10 per token: (12 d^2 c_f + d E G c_r) n_blocks.
double krajewski_flops_per_token(double d_model, double n_blocks, double expansion, double granularity);

// The config forms (see docs/counting.md for what each takes from the config and what it ignores).
double kaplan_flops_per_token(const ModelConfig& m);
double chinchilla_flops_per_token(const ModelConfig& m);
double abnar_flops_per_token(const ModelConfig& m);
// Eq. 9 plus R d E_total for every MoE layer of the config.
double abnar_router_flops_per_token(const ModelConfig& m);
// Eq. 10 with d = d_model, n_blocks = n_layers and E G = E_total.
double krajewski_flops_per_token(const ModelConfig& m);

double training_flops_per_token(const ModelConfig& m, FlopConvention convention);

}  // namespace moelab
