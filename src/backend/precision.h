#pragma once
// Arithmetic precision of the matrix products (Backend::set_matmul_precision, config key train.precision).
// FP32: fp32 operands, fp32 accumulation. BF16: operands rounded to bfloat16 (round-to-nearest-even), products
// accumulated and written in fp32 - the mixed-precision recipe: master weights, optimizer state, norms, softmax,
// the loss and the MoE router stay fp32.
namespace moelab {

enum class Precision { FP32, BF16 };

}  // namespace moelab
