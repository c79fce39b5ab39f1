#include "backend/peak.h"

#include <algorithm>
#include <cstdio>

#include "core/timer.h"

namespace moelab {

double measure_gemm_peak(Backend& be, double seconds_per_size, std::FILE* report) {
  const MatmulPrecisionScope fp32(be, Precision::FP32);  // the peak is always the fp32 one
  double best = 0;
  for (int64_t n : {512, 1024, 2048}) {
    float* a = be.alloc(n * n);
    float* b = be.alloc(n * n);
    float* c = be.alloc(n * n);
    be.fill(a, 0.5f, n * n);
    be.fill(b, 0.25f, n * n);
    be.gemm(Trans::N, Trans::N, n, n, n, 1.f, a, n, b, n, 0.f, c, n);  // warm-up
    Timer t;
    int64_t calls = 0;
    while (t.seconds() < seconds_per_size || calls < 2) {
      be.gemm(Trans::N, Trans::N, n, n, n, 1.f, a, n, b, n, 0.f, c, n);
      ++calls;
    }
    const double flops = 2.0 * n * n * n * calls / t.seconds();
    if (report) std::fprintf(report, "  gemm %4ld^3 fp32: %8.1f GFLOP/s\n", static_cast<long>(n), flops / 1e9);
    best = std::max(best, flops);
    be.free(a);
    be.free(b);
    be.free(c);
  }
  return best;
}

}  // namespace moelab
