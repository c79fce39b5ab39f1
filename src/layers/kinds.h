#pragma once
// The layers' vocabulary, which the config schema (config/config.h) parses: which norm, which positional encoding,
// which FFN activation.
namespace moelab {

enum class NormKind { LayerNorm, RMSNorm };
enum class PosKind { Learned, Sinusoidal, Rope };  // learned or sinusoidal table added to the embedding, or RoPE
enum class FfnKind { Gelu, SwiGLU };

}  // namespace moelab
