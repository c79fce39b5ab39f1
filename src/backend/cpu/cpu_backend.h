#pragma once
// The CPU backend (OpenMP threads, oneDNN GEMM). Code outside src/backend/ asks for a backend by name
// (make_backend in backend.h); this header is for the backend factory and the backends that wrap this one.
#include <cstddef>
#include <memory>

#include "backend/backend.h"

namespace moelab {

// The CPU backend, as a backend that wraps it with memory of its own (cpu-strict) sees it: its kernels run on any
// host memory, and it keeps bf16 copies of operands in backend memory until it sees that memory written. A wrapper
// that allocates and frees memory itself says so: adopted memory is treated as the CPU backend's own, and a
// released range loses its copies and declarations (transfers go through upload_bytes and download_bytes, which
// work on any memory).
class CpuKernelBackend : public Backend {
 public:
  virtual void adopted(const void* ptr, size_t bytes) = 0;
  virtual void released(const void* ptr, size_t bytes) = 0;
};

std::unique_ptr<CpuKernelBackend> make_cpu_backend(int threads);

}  // namespace moelab
