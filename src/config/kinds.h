#pragma once
// The architecture and training vocabulary that the config schema (config.h) parses and the layers below the model
// take as arguments: a header of enums only, so layers, MoE and backends depend on these words and not on the
// whole schema.
namespace moelab {

enum class NormKind { LayerNorm, RMSNorm };
enum class PosKind { Learned, Sinusoidal, Rope };
enum class FfnKind { Gelu, SwiGLU };
enum class ScheduleKind { Cosine, WSD, Constant };
enum class RouterKind { TokenChoice, ExpertChoice };

// Arithmetic precision of the matrix products (Backend::set_matmul_precision, config key train.precision).
// FP32: fp32 operands, fp32 accumulation. BF16: operands rounded to bfloat16 (round-to-nearest-even), products
// accumulated and written in fp32 - the mixed-precision recipe: master weights, optimizer state, norms, softmax,
// the loss and the MoE router stay fp32.
enum class Precision { FP32, BF16 };

}  // namespace moelab
