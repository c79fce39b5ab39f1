#pragma once
#include "backend/backend.h"

namespace moelab {

// The machine's GEMM rate through `backend` at its thread count, in FLOP/s: the best of square products of size
// 512, 1024 and 2048 (and 4096, 8192 when 2048 takes under 5 ms, as on a GPU), each repeated for about
// `seconds_per_size`, at `precision` (fp32 by default: MFU on the CPU is measured against the fp32 peak; a GPU's
// bf16 training against the bf16 one).
double measure_gemm_peak(Backend& backend, double seconds_per_size, std::FILE* report = nullptr,
                         Precision precision = Precision::FP32);

}  // namespace moelab
