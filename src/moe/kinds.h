#pragma once
// The MoE layer's vocabulary, which the config schema (config/config.h) parses.
namespace moelab {

// Who chooses: tokens pick their top-k experts, or experts pick their top tokens.
enum class RouterKind { TokenChoice, ExpertChoice };
// The router's scores: a softmax over the experts, or an independent sigmoid per expert (DeepSeek-V3).
enum class ScoreKind { Softmax, Sigmoid };
// How the load is balanced: the Switch auxiliary loss, a per-expert selection bias updated after each step
// (auxiliary-loss-free balancing, Wang et al. 2024), or not at all.
enum class BalanceKind { AuxLoss, Bias, None };

}  // namespace moelab
