// One conformance suite for every backend: each operation of the seam (backend/backend.h) on random inputs, run on
// the backend under test (its memory: upload, run, download) and on the CPU backend on host memory (the reference),
// every output buffer compared. Runs for every backend this build has (backend_names()); a backend that cannot
// start here (a GPU backend without a GPU) is skipped with its reason, visibly. Tolerances: the CPU-based backends
// must agree bitwise (same kernels, same thread count); other backends within each test's stated tolerance (fp32
// kernels ~1e-5 relative, bf16 products ~1e-2, which rounding operands to 8 bits of mantissa allows).
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "test_util.h"

namespace moelab {
namespace {

constexpr int kThreads = 2;

// The buffers of one operation: their initial contents; the op receives one pointer per buffer, into the memory of
// whichever backend runs it.
struct Buffers {
  std::vector<std::vector<float>> f;
  std::vector<std::vector<int32_t>> i;
  std::vector<std::vector<int64_t>> l;
  std::vector<std::vector<double>> d;
};
struct Ptrs {
  std::vector<float*> f;
  std::vector<int32_t*> i;
  std::vector<int64_t*> l;
  std::vector<double*> d;
};
using Op = std::function<void(Backend&, const Ptrs&)>;

std::vector<float> random_floats(int64_t n, uint64_t seed, float scale = 1.f) {
  Rng rng(seed);
  std::vector<float> v(n);
  testing::fill_normal(v.data(), n, rng, scale);
  return v;
}

class Conformance : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    try {
      be_ = make_backend(GetParam(), kThreads);
    } catch (const Error& e) {
      GTEST_SKIP() << "backend " << GetParam() << " cannot run here: " << e.what();
    }
    ref_ = make_backend("cpu", kThreads);
  }
  bool exact() const { return GetParam().rfind("cpu", 0) == 0; }

  // Runs op on the reference (host copies) and on the backend under test (uploaded copies), at `precision` on
  // both, and compares every buffer afterwards: floats within tol relative to the buffer's largest magnitude
  // (exactly for CPU-based backends), integers exactly.
  void conform(const std::string& what, const Buffers& init, const Op& op, double tol = 1e-5,
               Precision precision = Precision::FP32) {
    Buffers host = init;
    Ptrs hp;
    for (auto& v : host.f) hp.f.push_back(v.data());
    for (auto& v : host.i) hp.i.push_back(v.data());
    for (auto& v : host.l) hp.l.push_back(v.data());
    for (auto& v : host.d) hp.d.push_back(v.data());
    ref_->set_matmul_precision(precision);
    op(*ref_, hp);

    Backend& be = *be_;
    be.set_matmul_precision(precision);
    std::vector<BackendArray<float>> f;
    std::vector<BackendArray<int32_t>> i;
    std::vector<BackendArray<int64_t>> l;
    std::vector<BackendArray<double>> d;
    Ptrs dp;
    auto up = [&](auto& arrays, auto& ptrs, const auto& vectors) {
      for (const auto& v : vectors) {
        using T = typename std::decay_t<decltype(v)>::value_type;
        arrays.emplace_back(be, static_cast<int64_t>(v.size()));
        be.upload(arrays.back().data(), v.data(), static_cast<int64_t>(v.size()));
        ptrs.push_back(static_cast<T*>(arrays.back().data()));
      }
    };
    up(f, dp.f, init.f);
    up(i, dp.i, init.i);
    up(l, dp.l, init.l);
    up(d, dp.d, init.d);
    op(be, dp);
    for (size_t k = 0; k < host.f.size(); ++k) {
      const std::vector<float> got = be.download_vector(f[k].data(), static_cast<int64_t>(host.f[k].size()));
      double scale = 0, worst = 0;
      for (float x : host.f[k]) scale = std::max(scale, std::fabs(static_cast<double>(x)));
      for (size_t j = 0; j < got.size(); ++j) {
        if (std::isnan(host.f[k][j])) {
          EXPECT_TRUE(std::isnan(got[j])) << what << ": float buffer " << k << " [" << j << "]";
          continue;
        }
        worst = std::max(worst, std::fabs(static_cast<double>(got[j]) - host.f[k][j]));
      }
      if (exact()) {
        EXPECT_EQ(0, std::memcmp(got.data(), host.f[k].data(), got.size() * sizeof(float)))
            << what << ": float buffer " << k << " differs from the CPU backend's (largest difference " << worst << ")";
      } else {
        EXPECT_LE(worst, tol * std::max(scale, 1e-30)) << what << ": float buffer " << k;
      }
    }
    for (size_t k = 0; k < host.i.size(); ++k)
      EXPECT_EQ(be.download_vector(i[k].data(), static_cast<int64_t>(host.i[k].size())), host.i[k])
          << what << ": int32 buffer " << k;
    for (size_t k = 0; k < host.l.size(); ++k)
      EXPECT_EQ(be.download_vector(l[k].data(), static_cast<int64_t>(host.l[k].size())), host.l[k])
          << what << ": int64 buffer " << k;
    for (size_t k = 0; k < host.d.size(); ++k) {
      const std::vector<double> got = be.download_vector(d[k].data(), static_cast<int64_t>(host.d[k].size()));
      for (size_t j = 0; j < got.size(); ++j) {
        if (exact()) EXPECT_EQ(got[j], host.d[k][j]) << what << ": double buffer " << k << " [" << j << "]";
        else EXPECT_NEAR(got[j], host.d[k][j], tol * (1 + std::fabs(host.d[k][j]))) << what << ": double " << k;
      }
    }
  }

  std::unique_ptr<Backend> be_, ref_;
};

TEST_P(Conformance, MemoryFillCopyScale) {
  const int64_t n = 1000;
  conform("fill, copy, scale", {{random_floats(n, 1), random_floats(n, 2)}}, [&](Backend& be, const Ptrs& p) {
    be.fill(p.f[0], 0.5f, n / 2);
    be.copy(p.f[1] + 3, p.f[0], n - 3);
    be.scale(p.f[1], -1.5f, n);
  });
  BackendArray<float> zeros(*be_, 4096);
  EXPECT_EQ(be_->download_vector(zeros.data(), 4096), std::vector<float>(4096, 0.f)) << "alloc zero-initialises";
}

TEST_P(Conformance, MatrixProducts) {
  for (Precision prec : {Precision::FP32, Precision::BF16}) {
    const double tol = prec == Precision::BF16 ? 2e-2 : 1e-5;
    const char* pn = prec == Precision::BF16 ? " bf16" : " fp32";
    for (Trans ta : {Trans::N, Trans::T})
      for (Trans tb : {Trans::N, Trans::T}) {
        const int64_t m = 37, n = 64, k = 70, lda = (ta == Trans::N ? k : m) + 3, ldb = (tb == Trans::N ? n : k) + 1;
        const int64_t ldc = n + 2;
        const int64_t a_rows = ta == Trans::N ? m : k, b_rows = tb == Trans::N ? k : n;
        conform(std::string("gemm") + (ta == Trans::T ? " T" : " N") + (tb == Trans::T ? "T" : "N") + pn,
                {{random_floats(a_rows * lda, 3), random_floats(b_rows * ldb, 4), random_floats(m * ldc, 5)}},
                [&](Backend& be, const Ptrs& p) {
                  be.gemm(ta, tb, m, n, k, 0.75f, p.f[0], lda, p.f[1], ldb, 0.5f, p.f[2], ldc);
                },
                tol, prec);
      }
    // attention-shaped batches: 3 sequences x 4 heads of (16 x 8) @ (8 x 16)
    const int64_t B = 3, H = 4, T = 16, hd = 8, C = H * hd;
    conform(std::string("gemm_strided_batched2") + pn,
            {{random_floats(B * T * 3 * C, 6), random_floats(B * H * T * T, 7)}},
            [&](Backend& be, const Ptrs& p) {
              be.gemm_strided_batched2(Trans::N, Trans::T, T, T, hd, 0.25f, p.f[0], 3 * C, hd, T * 3 * C, p.f[0] + C,
                                       3 * C, hd, T * 3 * C, 0.f, p.f[1], T, T * T, H * T * T, H, B);
            },
            tol, prec);
    conform(std::string("gemm_strided_batched") + pn, {{random_floats(5 * 12 * 9, 8), random_floats(5 * 9 * 7, 9),
                                                         random_floats(5 * 12 * 7, 10)}},
            [&](Backend& be, const Ptrs& p) {
              be.gemm_strided_batched(Trans::N, Trans::N, 12, 7, 9, 1.f, p.f[0], 9, 12 * 9, p.f[1], 7, 9 * 7, 1.f,
                                      p.f[2], 7, 12 * 7, 5);
            },
            tol, prec);
    // experts: 4 groups of 0, 5, 33 and 1 rows; the batch form with sums of squares
    conform(std::string("grouped_gemm and gemm_batch") + pn,
            {{random_floats(39 * 24, 11), random_floats(4 * 16 * 24, 12), random_floats(39 * 16, 13),
              random_floats(4 * 16 * 24, 14)},
             {},
             {},
             {std::vector<double>(2, 0.0)}},
            [&](Backend& be, const Ptrs& p) {
              const int64_t rows[4] = {0, 5, 33, 1};
              std::vector<GemmGroup> groups;
              int64_t off = 0;
              for (int e = 0; e < 4; ++e) {
                groups.push_back({rows[e], p.f[0] + off * 24, p.f[1] + e * 16 * 24, p.f[2] + off * 16});
                off += rows[e];
              }
              be.grouped_gemm(Trans::N, Trans::T, 16, 24, 1.f, groups.data(), 4, 24, 24, 0.f, 16);
              // weight gradients: dW_e (16 x 24) = y_e^T (16 x m) x_e (m x 24)
              std::vector<GemmProblem> batch;
              off = 0;
              for (int e = 1; e < 3; ++e) {
                off = e == 1 ? 0 : 5;
                batch.push_back({Trans::T, Trans::N, 16, 24, rows[e], 0.5f, p.f[2] + off * 16, 16, p.f[0] + off * 24, 24,
                                 1.f, p.f[3] + e * 16 * 24, 24, p.d[0] + (e - 1)});
              }
              be.gemm_batch(batch.data(), static_cast<int64_t>(batch.size()));
            },
            tol, prec);
  }
}

TEST_P(Conformance, Elementwise) {
  const int64_t rows = 19, f = 40, n = rows * f;
  conform("add, add_inplace, add_bias",
          {{random_floats(n, 20), random_floats(n, 21), random_floats(n, 22), random_floats(f, 23)}},
          [&](Backend& be, const Ptrs& p) {
            be.add(p.f[2], p.f[0], p.f[1], n);
            be.add_inplace(p.f[0], p.f[1], n);
            be.add_bias(p.f[1], p.f[3], rows, f);
          });
  conform("gelu forward and backward",
          {{random_floats(n, 24, 3.f), random_floats(n, 25), random_floats(n, 26), random_floats(n, 27)}},
          [&](Backend& be, const Ptrs& p) {
            be.gelu_forward(p.f[1], p.f[0], n);
            be.gelu_backward(p.f[3], p.f[0], p.f[2], n);
          });
  conform("swiglu forward and backward",
          {{random_floats(2 * n, 28, 3.f), random_floats(n, 29), random_floats(n, 30), random_floats(2 * n, 31)}},
          [&](Backend& be, const Ptrs& p) {
            be.swiglu_forward(p.f[1], p.f[0], rows, f);
            be.swiglu_backward(p.f[3], p.f[0], p.f[2], rows, f);
          });
  // (B, T, row_stride 3C) with q and k heads rotated, from position 5, then rotated back on another buffer
  const int64_t B = 2, T = 7, H = 3, hd = 8, C = H * hd;
  conform("rope forward and inverse", {{random_floats(B * T * 3 * C, 32), random_floats(B * T * 3 * C, 33)}},
          [&](Backend& be, const Ptrs& p) {
            be.rope(p.f[0], B, T, 3 * C, 2 * H, hd, 10000.f, false, 5);
            be.rope(p.f[1], B, T, 3 * C, 2 * H, hd, 500.f, true, 0);
          });
  conform("softmax_rows", {{random_floats(n, 34, 4.f)}},
          [&](Backend& be, const Ptrs& p) { be.softmax_rows(p.f[0], rows, f, 0.7f); });
  conform("causal softmax forward and backward",
          {{random_floats(6 * 16 * 16, 35, 3.f), random_floats(6 * 16 * 16, 36)}}, [&](Backend& be, const Ptrs& p) {
            be.causal_softmax_forward(p.f[0], 0.35f, 6, 16);
            be.causal_softmax_backward(p.f[1], p.f[0], 0.35f, 6, 16);
          });
}

TEST_P(Conformance, EmbeddingsNormsReductions) {
  const int64_t B = 3, T = 9, C = 20, V = 11, N = B * T;
  std::vector<int32_t> tokens(N);
  for (int64_t t = 0; t < N; ++t) tokens[t] = static_cast<int32_t>((t * 7) % 5);  // repeated tokens
  conform("embedding forward and backward",
          {{random_floats(V * C, 40), random_floats(T * C, 41), random_floats(N * C, 42), random_floats(N * C, 43),
            random_floats(V * C, 44), random_floats(T * C, 45)},
           {tokens}},
          [&](Backend& be, const Ptrs& p) {
            be.embedding_forward(p.f[2], p.i[0], p.f[0], p.f[1], B, T, C);
            be.embedding_forward(p.f[5], p.i[0], p.f[0], nullptr, 1, T, C);
            be.embedding_backward(p.f[4], p.f[1], p.i[0], p.f[3], B, T, C, V);
          });
  conform("layernorm forward and backward",
          {{random_floats(N * C, 46, 2.f), random_floats(C, 47), random_floats(C, 48), random_floats(N * C, 49),
            random_floats(N, 50), random_floats(N, 51), random_floats(N * C, 52), random_floats(N * C, 53),
            random_floats(C, 54), random_floats(C, 55)}},
          [&](Backend& be, const Ptrs& p) {
            be.layernorm_forward(p.f[3], p.f[4], p.f[5], p.f[0], p.f[1], p.f[2], N, C, 1e-5f);
            be.layernorm_backward(p.f[7], p.f[8], p.f[9], p.f[6], p.f[0], p.f[1], p.f[4], p.f[5], N, C);
            be.layernorm_backward(p.f[7], p.f[8], nullptr, p.f[6], p.f[0], p.f[1], p.f[4], p.f[5], N, C);
          });
  conform("rmsnorm forward and backward",
          {{random_floats(N * C, 56, 2.f), random_floats(C, 57), random_floats(N * C, 58), random_floats(N, 59),
            random_floats(N * C, 60), random_floats(N * C, 61), random_floats(C, 62)}},
          [&](Backend& be, const Ptrs& p) {
            be.rmsnorm_forward(p.f[2], p.f[3], p.f[0], p.f[1], N, C, 1e-6f);
            be.rmsnorm_backward(p.f[5], p.f[6], p.f[4], p.f[0], p.f[1], p.f[3], N, C);
          });
  const int64_t H = 2, hd = 4, stride = 3 * H * hd;  // QK-norm over the q and k heads of a (N, 3C) qkv
  conform("head_rmsnorm forward and backward (strided rows)",
          {{random_floats(N * stride, 73, 2.f), random_floats(hd, 74), random_floats(N * 2 * H * hd, 75),
            random_floats(N * 2 * H, 76), random_floats(N * stride, 77), random_floats(hd, 78)}},
          [&](Backend& be, const Ptrs& p) {
            be.head_rmsnorm_forward(p.f[0], p.f[2], p.f[3], p.f[1], N, stride, 2 * H, hd, 1e-6f);
            be.head_rmsnorm_backward(p.f[4], p.f[5], p.f[2], p.f[1], p.f[3], N, stride, 2 * H, hd);
          });
  conform("jitter, out of place and in place",
          {{random_floats(N * C, 79), random_floats(N * C, 80)}}, [&](Backend& be, const Ptrs& p) {
            be.jitter(p.f[1], p.f[0], N * C, 12345, 0.01f);
            be.jitter(p.f[0], p.f[0], N * C, 777, 0.5f);
          });
  conform("bias_backward, sum, sum_squares",
          {{random_floats(N * C, 63), random_floats(C, 64)}, {}, {}, {std::vector<double>(2, 0.0)}},
          [&](Backend& be, const Ptrs& p) {
            be.bias_backward(p.f[1], p.f[0], N, C);
            const double sums[2] = {be.sum(p.f[0], N * C), be.sum_squares(p.f[0], N * C)};
            be.upload(p.d[0], sums, 2);
          });
  std::vector<int32_t> targets(N);
  for (int64_t t = 0; t < N; ++t) targets[t] = t % 4 == 3 ? -1 : static_cast<int32_t>((t * 3) % V);  // some ignored
  conform("softmax_cross_entropy, with and without the gradient",
          {{random_floats(N * V, 65, 3.f), random_floats(N, 66), random_floats(N * V, 67), random_floats(N, 68)},
           {targets}},
          [&](Backend& be, const Ptrs& p) {
            be.softmax_cross_entropy(p.f[0], p.f[1], p.i[0], N, V, 0.125f);
            be.softmax_cross_entropy(p.f[2], p.f[3], p.i[0], N, V, 0.f);
          });
  const int64_t n = 5000;
  std::vector<float> v = random_floats(n, 72);
  for (auto& x : v) x = std::fabs(x);
  conform("adamw_update, keeping and clearing the gradient",
          {{random_floats(n, 69), random_floats(n, 70), random_floats(n, 71), v}}, [&](Backend& be, const Ptrs& p) {
            be.adamw_update(p.f[0], p.f[1], p.f[2], p.f[3], n / 2, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 3, false);
            be.adamw_update(p.f[0] + n / 2, p.f[1] + n / 2, p.f[2] + n / 2, p.f[3] + n / 2, n - n / 2, 1e-3f, 0.9f,
                            0.95f, 1e-8f, 0.f, 1.f, 1, true);
          });
}

TEST_P(Conformance, DispatchAndCombine) {
  const int64_t N = 13, R = 21, C = 24;
  std::vector<int32_t> index(R);
  for (int64_t r = 0; r < R; ++r) index[r] = static_cast<int32_t>((r * 5) % N);
  // each token's rows: the rows whose index is the token, in row order
  std::vector<int64_t> offsets(N + 1, 0);
  std::vector<int32_t> token_rows;
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t r = 0; r < R; ++r)
      if (index[r] == t) token_rows.push_back(static_cast<int32_t>(r));
    offsets[t + 1] = static_cast<int64_t>(token_rows.size());
  }
  conform("gather_rows, combine_rows, row_dots, combine_rows_backward",
          {{random_floats(N * C, 80), random_floats(R * C, 81), random_floats(R, 82), random_floats(R * C, 83),
            random_floats(N * C, 84), random_floats(N * C, 85), random_floats(R, 86), random_floats(R * C, 87),
            random_floats(R, 88)},
           {index, token_rows},
           {offsets}},
          [&](Backend& be, const Ptrs& p) {
            be.gather_rows(p.f[1], p.f[0], p.i[0], nullptr, R, C);
            be.gather_rows(p.f[3], p.f[0], p.i[0], p.f[2], R, C);
            be.combine_rows(p.f[4], p.f[3], p.l[0], p.i[1], p.f[2], N, C);
            be.combine_rows(p.f[5], p.f[1], p.l[0], p.i[1], nullptr, N, C);
            be.row_dots(p.f[6], p.f[0], p.i[0], p.f[1], R, C);
            be.combine_rows_backward(p.f[7], p.f[8], p.f[4], p.i[0], p.f[2], p.f[1], R, C);
          });
}

// Routing: token choice (top-2 with capacity and renormalisation; dropless top-1; sigmoid scores with a selection
// bias and a gate scale) and expert choice (softmax and sigmoid), then the statistics and the router's backward with
// every auxiliary loss, every routing buffer compared.
TEST_P(Conformance, Routing) {
  struct Case {
    const char* name;
    RouterShape shape;
    bool selection_bias;
  };
  const std::vector<Case> cases = {
      {"token choice top-2, capacity 5, renormalised", {4, 6, 5, 2, false, 5, true, false, 1.f}, false},
      {"token choice top-1, dropless", {4, 6, 5, 1, false, 0, false, false, 1.f}, false},
      {"token choice top-2, softmax, selection bias, capacity 5", {4, 6, 5, 2, false, 5, false, false, 1.f}, true},
      {"token choice top-2, sigmoid, selection bias, gate scale 2.5", {4, 6, 5, 2, false, 0, false, true, 2.5f}, true},
      {"expert choice, capacity 2 per position", {4, 6, 5, 2, true, 2, false, false, 1.f}, false},
      {"expert choice, sigmoid, gate scale 1.5", {4, 6, 5, 2, true, 2, false, true, 1.5f}, false},
  };
  for (const Case& k : cases) {
    const RouterShape s = k.shape;
    const int64_t n = s.tokens(), e = s.experts, r = s.max_rows(), topk = std::max<int64_t>(s.top_k, 1);
    Buffers b;
    b.f = {random_floats(n * e, 90, 2.f), std::vector<float>(n * e), std::vector<float>(r), std::vector<float>(n * topk),
           std::vector<float>(n), random_floats(r, 91), std::vector<float>(n * e), random_floats(e, 92, 0.2f)};
    b.i = {std::vector<int32_t>(r), std::vector<int32_t>(r), std::vector<int32_t>(r), std::vector<int32_t>(n * topk),
           std::vector<int32_t>(n * topk)};
    b.l = {std::vector<int64_t>(e + 1), std::vector<int64_t>(n + 1)};
    b.d = {std::vector<double>(e), std::vector<double>(e), std::vector<double>(kRouterStatistics),
           std::vector<double>(s.batch * e)};
    conform(std::string("route, router_statistics, router_backward: ") + k.name, b, [&](Backend& be, const Ptrs& p) {
      const RoutingState st{p.i[0], p.i[1], p.f[2], p.l[0], p.l[1], p.i[2], p.i[3], p.f[3], p.i[4], p.f[4], p.d[0],
                            p.d[1], p.d[3], k.selection_bias ? p.f[7] : nullptr};
      be.route(s, p.f[0], p.f[1], st);
      be.router_statistics(s, p.f[0], p.f[1], st, p.d[2]);
      be.router_backward(s, p.f[6], p.f[0], p.f[1], p.f[5], st, {0.01f, 0.02f, 0.001f});
    });
  }
}

std::vector<std::string> every_backend() {
  std::vector<std::string> names = backend_names();
  // A GPU backend this build lacks is still listed, so the suite says visibly that it did not run there.
  for (const char* gpu : {"cuda"})
    if (std::find(names.begin(), names.end(), gpu) == names.end()) names.push_back(gpu);
  return names;
}

INSTANTIATE_TEST_SUITE_P(EveryBackend, Conformance, ::testing::ValuesIn(every_backend()),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& c : s)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return s;
                         });

}  // namespace
}  // namespace moelab
