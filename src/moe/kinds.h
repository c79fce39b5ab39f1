#pragma once
// The MoE layer's vocabulary, which the config schema (config/config.h) parses: who chooses, tokens or experts.
namespace moelab {

enum class RouterKind { TokenChoice, ExpertChoice };

}  // namespace moelab
