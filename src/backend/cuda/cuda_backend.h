#pragma once
// The CUDA backend (built when CMake finds nvcc: MOELAB_WITH_CUDA). Code outside src/backend/ asks for it by name
// (make_backend("cuda") / train.backend = "cuda"); an Error says so when the machine has no usable GPU.
#include <memory>

#include "backend/backend.h"

namespace moelab {

std::unique_ptr<Backend> make_cuda_backend(int threads);

}  // namespace moelab
