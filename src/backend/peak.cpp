#include "backend/peak.h"

#include <vector>

#include <algorithm>
#include <cstdio>

#include "core/timer.h"

namespace moelab {

double measure_gemm_peak(Backend& be, double seconds_per_size, std::FILE* report, Precision precision) {
  const MatmulPrecisionScope scope(be, precision);
  double best = 0;
  std::vector<int64_t> sizes = {512, 1024, 2048};
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = sizes[i];
    float* a = be.alloc(n * n);
    float* b = be.alloc(n * n);
    float* c = be.alloc(n * n);
    be.fill(a, 0.5f, n * n);
    be.fill(b, 0.25f, n * n);
    be.gemm(Trans::N, Trans::N, n, n, n, 1.f, a, n, b, n, 0.f, c, n);  // warm-up
    be.synchronize();
    Timer t;
    int64_t calls = 0;
    while (t.seconds() < seconds_per_size || calls < 2) {
      for (int k = 0; k < 4; ++k, ++calls) be.gemm(Trans::N, Trans::N, n, n, n, 1.f, a, n, b, n, 0.f, c, n);
      be.synchronize();
    }
    const double seconds = t.seconds();
    const double flops = 2.0 * n * n * n * calls / seconds;
    if (report)
      std::fprintf(report, "  gemm %4ld^3 %s: %8.1f GFLOP/s\n", static_cast<long>(n),
                   precision == Precision::BF16 ? "bf16" : "fp32", flops / 1e9);
    best = std::max(best, flops);
    be.free(a);
    be.free(b);
    be.free(c);
    if (n == 2048 && seconds / calls < 5e-3) sizes.insert(sizes.end(), {4096, 8192});  // a GPU: larger products
  }
  return best;
}

}  // namespace moelab
