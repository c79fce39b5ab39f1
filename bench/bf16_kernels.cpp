// bf16_kernels: which oneDNN kernel the bf16 path should call for a single product, on the shapes a transformer
// layer runs: the matmul primitive (brgemm kernels, what the fp32 path uses for shapes that are multiples of 64) or
// the bf16 GEMM function dnnl_gemm_bf16bf16f32 (what the bf16 path calls). Operands are bf16 in memory, C fp32,
// beta = 1 where the engine accumulates (weight gradients, the residual adds). Each kernel is timed three times,
// interleaved, and the best is kept (the machine is shared). Standalone (no engine headers):
//
//   build/bench/bf16_kernels [--threads 2] [--d-model 256] [--tokens 2048] [--vocab 8192]
//
// Prints GFLOP/s of both and the faster one per shape.
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

// Exported by libdnnl 2.6 with C linkage but declared only in its internal headers (see cpu_backend.cpp).
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                                float alpha, const uint16_t* A, dnnl_dim_t lda, const uint16_t* B,
                                                dnnl_dim_t ldb, float beta, float* C, dnnl_dim_t ldc);

namespace {

struct Shape {
  const char* what;
  int64_t m, n, k;
  char ta, tb;
  float beta;
};

double best_gflops(double flops, int reps, const auto& run) {
  double best = 0;
  for (int r = 0; r < 2; ++r) run();
  const double t0 = omp_get_wtime();
  for (int r = 0; r < reps; ++r) run();
  best = std::max(best, flops * reps / (omp_get_wtime() - t0) / 1e9);
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2;
  int64_t d = 256, tokens = 2048, vocab = 8192;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--d-model")) d = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--tokens")) tokens = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--vocab")) vocab = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: bf16_kernels [--threads 2] [--d-model 256] [--tokens 2048] [--vocab 8192]\n");
      return 2;
    }
  }
  omp_set_num_threads(threads);
  const int64_t T = tokens, F = 4 * d;
  const std::vector<Shape> shapes = {
      {"qkv forward", T, 3 * d, d, 'N', 'T', 0},        {"out-proj forward", T, d, d, 'N', 'T', 1},
      {"fc1 forward", T, F, d, 'N', 'T', 0},            {"fc2 forward", T, d, F, 'N', 'T', 1},
      {"head forward", T, vocab, d, 'N', 'T', 0},       {"qkv input grad", T, d, 3 * d, 'N', 'N', 0},
      {"fc1 input grad", T, d, F, 'N', 'N', 1},         {"fc2 input grad", T, F, d, 'N', 'N', 0},
      {"head input grad", T, d, vocab, 'N', 'N', 0},    {"qkv weight grad", 3 * d, d, T, 'T', 'N', 1},
      {"out-proj weight grad", d, d, T, 'T', 'N', 1},   {"fc1 weight grad", F, d, T, 'T', 'N', 1},
      {"fc2 weight grad", d, F, T, 'T', 'N', 1},        {"head weight grad", vocab, d, T, 'T', 'N', 1},
      {"expert forward", 256, d, d, 'N', 'T', 0},
  };
  int64_t most = 0;
  for (const Shape& s : shapes) most = std::max({most, s.m * s.k, s.k * s.n, s.m * s.n});
  std::vector<uint16_t> a(most), b(most);
  std::vector<float> c(most, 0.f);
  for (int64_t i = 0; i < most; ++i) {  // bf16 bits of small values in [-1, 1)
    a[i] = static_cast<uint16_t>(0x3c00 + (i * 7919) % 512) | ((i & 1) << 15);
    b[i] = static_cast<uint16_t>(0x3c00 + (i * 104729) % 512) | ((i & 2) << 14);
  }
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  std::printf("bf16 x bf16 -> fp32 products, %d threads, d_model %ld, %ld tokens, vocab %ld (GFLOP/s, best of 3)\n",
              threads, static_cast<long>(d), static_cast<long>(T), static_cast<long>(vocab));
  std::printf("%-22s %-18s %9s %9s  faster\n", "product", "M x N x K", "matmul", "gemm");
  for (const Shape& s : shapes) {
    using dt = dnnl::memory::data_type;
    using dims = dnnl::memory::dims;
    const int64_t lda = s.ta == 'N' ? s.k : s.m, ldb = s.tb == 'N' ? s.n : s.k;
    const dnnl::memory::desc a_md({s.m, s.k}, dt::bf16, s.ta == 'N' ? dims{lda, 1} : dims{1, lda});
    const dnnl::memory::desc b_md({s.k, s.n}, dt::bf16, s.tb == 'N' ? dims{ldb, 1} : dims{1, ldb});
    const dnnl::memory::desc c_md({s.m, s.n}, dt::f32, dims{s.n, 1});
    dnnl::primitive_attr attr;
    if (s.beta != 0.f) {
      dnnl::post_ops ops;
      ops.append_sum(s.beta);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine));
    dnnl::memory am(a_md, engine, a.data()), bm(b_md, engine, b.data()), cm(c_md, engine, c.data());
    const double flops = 2.0 * s.m * s.n * s.k;
    const int reps = static_cast<int>(5e9 / flops) + 3;
    double prim = 0, gemm = 0;
    for (int round = 0; round < 3; ++round) {
      prim = std::max(prim, best_gflops(flops, reps, [&] {
        matmul.execute(stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
        stream.wait();
      }));
      gemm = std::max(gemm, best_gflops(flops, reps, [&] {
        if (dnnl_gemm_bf16bf16f32(s.ta, s.tb, s.m, s.n, s.k, 1.f, a.data(), lda, b.data(), ldb, s.beta, c.data(),
                                  s.n) != dnnl_success)
          std::abort();
      }));
    }
    char shape[64];
    std::snprintf(shape, sizeof shape, "%ldx%ldx%ld %c%c", static_cast<long>(s.m), static_cast<long>(s.n),
                  static_cast<long>(s.k), s.ta, s.tb);
    std::printf("%-22s %-18s %9.1f %9.1f  %s\n", s.what, shape, prim, gemm,
                gemm > 1.03 * prim ? "gemm" : prim > 1.03 * gemm ? "matmul" : "same");
  }
  return 0;
}
