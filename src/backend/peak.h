#pragma once
#include "backend/backend.h"

namespace moelab {

// The machine's fp32 GEMM rate through `backend` at its thread count, in FLOP/s: the best of square products
// of size 512, 1024 and 2048, each repeated for about `seconds_per_size`. MFU is measured against this.
// When `report` is set, each size's rate is printed to it.
double measure_gemm_peak(Backend& backend, double seconds_per_size, std::FILE* report = nullptr);

}  // namespace moelab
