#pragma once
// The CPU backend (OpenMP threads, oneDNN GEMM). Code outside src/backend/ asks for a backend by name
// (make_backend in backend.h); this header is for the backend factory and the backends that wrap this one.
#include <memory>

#include "backend/backend.h"

namespace moelab {

std::unique_ptr<Backend> make_cpu_backend(int threads);

}  // namespace moelab
