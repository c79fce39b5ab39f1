// GEMM primitives against naive triple loops (in double), for every transpose combination, strided batches
// and grouped problems.
#include <algorithm>
#include <cstdint>
#include <tuple>

#include "backend/backend.h"
#include "backend/cpu/vec_math.h"
#include "test_util.h"

namespace moelab {
namespace {

// C = alpha op(A) op(B) + beta C, naive.
void naive_gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta == Trans::N ? a[i * lda + p] : a[p * lda + i];
        const double bv = tb == Trans::N ? b[p * ldb + j] : b[j * ldb + p];
        s += av * bv;
      }
      c[i * ldc + j] = static_cast<float>(alpha * s + beta * c[i * ldc + j]);
    }
}

TEST(Backend, AllocIsZeroedAlignedAndReusable) {
  // Small buffers and large ones (2 MiB-aligned, on huge pages where the kernel offers them) alike: zeroed,
  // 64-byte aligned, writable to the last element, and zeroed again when a freed block's memory comes back.
  auto be = make_backend("cpu", 2);
  for (size_t count : {size_t{1}, size_t{1000}, size_t{1} << 20, (size_t{3} << 20) + 17}) {
    for (int round = 0; round < 2; ++round) {
      float* p = be->alloc(count);
      ASSERT_NE(p, nullptr);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << count;
      size_t nonzero = 0;
      for (size_t i = 0; i < count; ++i) nonzero += p[i] != 0.f;
      EXPECT_EQ(nonzero, 0u) << count << " floats, round " << round;
      for (size_t i = 0; i < count; ++i) p[i] = 1.f;  // dirty it: the next round must see zeros again
      EXPECT_EQ(p[count - 1], 1.f);
      be->free(p);
    }
  }
}

TEST(Backend, FactoryNamesTheBackendsItHas) {
  const auto names = backend_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "cpu"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "cpu-strict"), names.end());
  EXPECT_EQ(make_backend("cpu-strict", 1)->name(), "cpu-strict");
  try {
    make_backend("tpu", 1);
    FAIL() << "an unknown backend name must be an error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'tpu'"), std::string::npos) << what;
    EXPECT_NE(what.find("cpu, cpu-strict"), std::string::npos) << what;
    EXPECT_NE(what.find("train.backend"), std::string::npos) << what;  // says how to choose
  }
}

TEST(StrictBackend, UploadDownloadRoundTripAndKernelsMatchCpu) {
  auto strict = make_backend("cpu-strict", 2);
  auto cpu = make_backend("cpu", 2);
  Rng rng(11);
  const int64_t m = 7, n = 5, k = 3;
  std::vector<float> a(m * k), b(n * k), c_cpu(m * n, 0.f), c_strict(m * n, -1.f);
  testing::fill_normal(a.data(), a.size(), rng);
  testing::fill_normal(b.data(), b.size(), rng);
  float* da = strict->alloc(a.size());
  float* db = strict->alloc(b.size());
  float* dc = strict->alloc(c_strict.size());
  strict->upload(da, a.data(), m * k);
  strict->upload(db, b.data(), n * k);
  strict->gemm(Trans::N, Trans::T, m, n, k, 1.f, da, k, db, k, 0.f, dc, n);
  strict->download(c_strict.data(), dc, m * n);
  cpu->gemm(Trans::N, Trans::T, m, n, k, 1.f, a.data(), k, b.data(), k, 0.f, c_cpu.data(), n);
  for (int64_t i = 0; i < m * n; ++i) ASSERT_EQ(c_strict[i], c_cpu[i]) << i;
  // Freed memory comes back zeroed.
  strict->free(dc);
  float* again = strict->alloc(c_strict.size());
  EXPECT_EQ(strict->download_vector(again, m * n), std::vector<float>(m * n, 0.f));
  strict->free(again);
  strict->free(da);
  strict->free(db);
}

TEST(StrictBackend, HostMemoryGivenToAKernelIsAnError) {
  auto strict = make_backend("cpu-strict", 1);
  std::vector<float> host(16, 1.f);
  float* device = strict->alloc(16);
  EXPECT_THROW(strict->copy(device, host.data(), 16), Error);      // host -> backend must be an upload
  EXPECT_THROW(strict->fill(host.data(), 0.f, 16), Error);         // a kernel on host memory
  std::vector<int32_t> tokens(4, 0);
  EXPECT_THROW(strict->embedding_forward(device, tokens.data(), device, nullptr, 1, 4, 4), Error);
  strict->free(device);
}

TEST(StrictBackendDeathTest, HostReadOfBackendMemoryCrashes) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto strict = make_backend("cpu-strict", 1);
  float* device = strict->alloc(16);
  strict->fill(device, 2.f, 16);
  EXPECT_DEATH({ volatile float x = device[3]; (void)x; }, "");
  EXPECT_DEATH({ device[0] = 1.f; }, "");
  EXPECT_EQ(strict->download_vector(device, 16), std::vector<float>(16, 2.f));
  strict->free(device);
}

TEST(Backend, GemmAllTransposesWithStridesAlphaBeta) {
  auto be = make_backend("cpu", 2);
  Rng rng(5);
  const int64_t m = 13, n = 17, k = 9, pad = 3;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      const int64_t lda = (ta == Trans::N ? k : m) + pad, ldb = (tb == Trans::N ? n : k) + pad, ldc = n + pad;
      std::vector<float> a(64 * 64), b(64 * 64), c(64 * 64), ref;
      testing::fill_normal(a.data(), a.size(), rng);
      testing::fill_normal(b.data(), b.size(), rng);
      testing::fill_normal(c.data(), c.size(), rng);
      ref = c;
      be->gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c.data(), ldc);
      naive_gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, ref.data(), ldc);
      for (size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], ref[i], 1e-4) << "ta " << int(ta) << " tb " << int(tb);
    }
}

TEST(Backend, StridedBatchedAndGroupedGemm) {
  auto be = make_backend("cpu", 2);
  Rng rng(6);
  const int64_t m = 7, n = 5, k = 6, batch = 3;
  std::vector<float> a(batch * m * k), b(batch * k * n), c(batch * m * n, 0.f), ref(batch * m * n, 0.f);
  testing::fill_normal(a.data(), a.size(), rng);
  testing::fill_normal(b.data(), b.size(), rng);
  be->gemm_strided_batched(Trans::N, Trans::N, m, n, k, 1.f, a.data(), k, m * k, b.data(), n, k * n, 0.f, c.data(), n,
                           m * n, batch);
  for (int64_t i = 0; i < batch; ++i)
    naive_gemm(Trans::N, Trans::N, m, n, k, 1.f, a.data() + i * m * k, k, b.data() + i * k * n, n, 0.f,
               ref.data() + i * m * n, n);
  for (size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], ref[i], 1e-4);

  // Grouped: rows split 3 / 0 / 4 over three weight matrices (an empty group must be fine).
  const int64_t rows[3] = {3, 0, 4};
  std::vector<float> x(7 * k), w(3 * n * k), y(7 * n, 0.f), yref(7 * n, 0.f);
  testing::fill_normal(x.data(), x.size(), rng);
  testing::fill_normal(w.data(), w.size(), rng);
  GemmGroup groups[3];
  int64_t offset = 0;
  for (int g = 0; g < 3; ++g) {
    groups[g] = {rows[g], x.data() + offset * k, w.data() + g * n * k, y.data() + offset * n};
    naive_gemm(Trans::N, Trans::T, rows[g], n, k, 1.f, x.data() + offset * k, k, w.data() + g * n * k, k, 0.f,
               yref.data() + offset * n, n);
    offset += rows[g];
  }
  be->grouped_gemm(Trans::N, Trans::T, n, k, 1.f, groups, 3, k, k, 0.f, n);
  for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], yref[i], 1e-4);
}

TEST(Backend, GemmBatchSumsTheSquaresOfItsOutputs) {
  // A weight gradient's share of the gradient norm, taken by the product that writes it: C's sum of squares as the
  // product (with beta = 1, an accumulation) leaves it, including a strided C and a column count off the 16 lanes.
  auto be = make_backend("cpu", 2);
  Rng rng(9);
  const int64_t m = 9, n = 37, k = 5, ldc = 40;
  std::vector<float> a(2 * m * k), b(2 * k * n), c(2 * m * ldc);
  testing::fill_normal(a.data(), a.size(), rng);
  testing::fill_normal(b.data(), b.size(), rng);
  testing::fill_normal(c.data(), c.size(), rng);
  double sums[2] = {-1, -1};
  GemmProblem problems[2];
  for (int p = 0; p < 2; ++p)
    problems[p] = {Trans::N, Trans::N, m, n, k, 0.5f, a.data() + p * m * k, k, b.data() + p * k * n, n,
                   p == 0 ? 0.f : 1.f, c.data() + p * m * ldc, ldc, &sums[p]};
  be->gemm_batch(problems, 2);
  for (int p = 0; p < 2; ++p) {
    double ref = 0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) ref += static_cast<double>(c[p * m * ldc + i * ldc + j]) * c[p * m * ldc + i * ldc + j];
    EXPECT_NEAR(sums[p], ref, 1e-12 * ref) << p;
  }
}

TEST(Backend, ReductionsAreExact) {
  auto be = make_backend("cpu", 2);
  std::vector<float> x(1001);
  double s = 0, ss = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<float>(i % 7) - 3.f;
    s += x[i];
    ss += x[i] * x[i];
  }
  EXPECT_EQ(be->sum(x.data(), x.size()), s);
  EXPECT_EQ(be->sum_squares(x.data(), x.size()), ss);
}

}  // namespace
}  // namespace moelab

namespace moelab {
namespace {
// Shapes with M, N, K multiples of 64 take the cached oneDNN matmul primitive (alpha as an output scale, beta as a
// sum post-op); check them like the small ones, and the two-level batch that attention uses.
TEST(Backend, PrimitiveGemmAndTwoLevelBatch) {
  auto be = make_backend("cpu", 2);
  Rng rng(8);
  const int64_t m = 128, n = 64, k = 192, pad = 3;
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      const int64_t lda = (ta == Trans::N ? k : m) + pad, ldb = (tb == Trans::N ? n : k) + pad, ldc = n + pad;
      std::vector<float> a(256 * 256), b(256 * 256), c(m * ldc), ref;
      testing::fill_normal(a.data(), a.size(), rng);
      testing::fill_normal(b.data(), b.size(), rng);
      testing::fill_normal(c.data(), c.size(), rng);
      ref = c;
      for (int rep = 0; rep < 2; ++rep) {  // the second call reuses the cached primitive
        be->gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c.data(), ldc);
        naive_gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, ref.data(), ldc);
      }
      for (size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], ref[i], 1e-3) << "ta " << int(ta) << " tb " << int(tb);
    }
  // M or K not a multiple of 64 (a MoE expert's token count): split into a primitive part and a remainder.
  for (const auto& [mm, kk, ta, tb] : {std::tuple<int64_t, int64_t, Trans, Trans>{157, 128, Trans::N, Trans::T},
                                       {157, 128, Trans::T, Trans::N}, {128, 157, Trans::T, Trans::N},
                                       {64, 101, Trans::N, Trans::N}}) {
    const int64_t nn = 64, lda = ta == Trans::N ? kk : mm, ldb = tb == Trans::N ? nn : kk;
    std::vector<float> a(mm * kk), b(kk * nn), c(mm * nn), ref;
    testing::fill_normal(a.data(), a.size(), rng);
    testing::fill_normal(b.data(), b.size(), rng);
    testing::fill_normal(c.data(), c.size(), rng);
    ref = c;
    be->gemm(ta, tb, mm, nn, kk, 0.5f, a.data(), lda, b.data(), ldb, 0.25f, c.data(), nn);
    naive_gemm(ta, tb, mm, nn, kk, 0.5f, a.data(), lda, b.data(), ldb, 0.25f, ref.data(), nn);
    for (size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], ref[i], 1e-3) << mm << "x" << nn << "x" << kk;
  }
  // Attention-like layout: 3 sequences x 2 heads; q and k interleaved in rows of width 4 * hd.
  const int64_t T = 64, hd = 64, heads = 2, seqs = 3, row = 2 * heads * hd;
  std::vector<float> qk(seqs * T * row), s(seqs * heads * T * T, 0.f), sref(s.size(), 0.f);
  testing::fill_normal(qk.data(), qk.size(), rng);
  be->gemm_strided_batched2(Trans::N, Trans::T, T, T, hd, 1.f, qk.data(), row, hd, T * row, qk.data() + heads * hd,
                            row, hd, T * row, 0.f, s.data(), T, T * T, heads * T * T, heads, seqs);
  for (int64_t o = 0; o < seqs; ++o)
    for (int64_t h = 0; h < heads; ++h)
      naive_gemm(Trans::N, Trans::T, T, T, hd, 1.f, qk.data() + o * T * row + h * hd, row,
                 qk.data() + o * T * row + heads * hd + h * hd, row, 0.f, sref.data() + (o * heads + h) * T * T, T);
  for (size_t i = 0; i < s.size(); ++i) ASSERT_NEAR(s[i], sref[i], 1e-3);
  // The same through the fallback (odd T takes the per-product path).
  const int64_t t2 = 33;
  std::fill(s.begin(), s.end(), 0.f);
  std::fill(sref.begin(), sref.end(), 0.f);
  be->gemm_strided_batched2(Trans::N, Trans::T, t2, t2, hd, 1.f, qk.data(), row, hd, T * row, qk.data() + heads * hd,
                            row, hd, T * row, 0.f, s.data(), t2, t2 * t2, heads * t2 * t2, heads, seqs);
  for (int64_t o = 0; o < seqs; ++o)
    for (int64_t h = 0; h < heads; ++h)
      naive_gemm(Trans::N, Trans::T, t2, t2, hd, 1.f, qk.data() + o * T * row + h * hd, row,
                 qk.data() + o * T * row + heads * hd + h * hd, row, 0.f, sref.data() + (o * heads + h) * t2 * t2, t2);
  for (size_t i = 0; i < s.size(); ++i) ASSERT_NEAR(s[i], sref[i], 1e-3);
}

// The MoE dispatch / combine kernels against naive loops; the fused combine backward is bitwise the two kernels it
// fuses (row_dots, then gather_rows with the gate weights).
TEST(Backend, DispatchAndCombineKernelsMatchNaiveLoops) {
  auto be = make_backend("cpu", 2);
  Rng rng(21);
  const int64_t tokens = 37, rows = 61, cols = 45;
  std::vector<float> x(tokens * cols), y(rows * cols), w(rows), dout(tokens * cols);
  for (auto* v : {&x, &y, &w, &dout}) testing::fill_normal(v->data(), v->size(), rng);
  std::vector<int32_t> token(rows);
  for (auto& t : token) t = static_cast<int32_t>(rng.below(tokens));
  // combine's index: each token's rows, in row order
  std::vector<int64_t> offsets(tokens + 1, 0);
  std::vector<int32_t> token_rows;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < rows; ++r)
      if (token[r] == t) token_rows.push_back(static_cast<int32_t>(r));
    offsets[t + 1] = static_cast<int64_t>(token_rows.size());
  }
  std::vector<float> gathered(rows * cols), combined = x, dots(rows);
  be->gather_rows(gathered.data(), x.data(), token.data(), w.data(), rows, cols);
  be->combine_rows(combined.data(), y.data(), offsets.data(), token_rows.data(), w.data(), tokens, cols);
  be->row_dots(dots.data(), dout.data(), token.data(), y.data(), rows, cols);
  std::vector<double> ref_combined(x.begin(), x.end());
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0;
    for (int64_t c = 0; c < cols; ++c) {
      ASSERT_EQ(gathered[r * cols + c], w[r] * x[token[r] * cols + c]);
      ref_combined[token[r] * cols + c] += static_cast<double>(w[r]) * y[r * cols + c];
      dot += static_cast<double>(dout[token[r] * cols + c]) * y[r * cols + c];
    }
    ASSERT_NEAR(dots[r], dot, 1e-5 * (1 + std::fabs(dot)));
  }
  for (int64_t i = 0; i < tokens * cols; ++i) ASSERT_NEAR(combined[i], ref_combined[i], 1e-5);

  std::vector<float> dsrc(rows * cols), dweight(rows), dsrc_ref(rows * cols), dweight_ref(rows);
  be->combine_rows_backward(dsrc.data(), dweight.data(), dout.data(), token.data(), w.data(), y.data(), rows, cols);
  be->row_dots(dweight_ref.data(), dout.data(), token.data(), y.data(), rows, cols);
  be->gather_rows(dsrc_ref.data(), dout.data(), token.data(), w.data(), rows, cols);
  EXPECT_EQ(dsrc, dsrc_ref);
  EXPECT_EQ(dweight, dweight_ref);
}

// The vectorisable exp / erf of the CPU kernels against libm over the ranges the kernels feed them.
TEST(Backend, FastExpAndErfMatchLibm) {
  double max_exp_rel = 0, max_erf_abs = 0, max_erf_exp_abs = 0;
  for (int i = 0; i <= 400000; ++i) {
    const float x = -87.f + 175.f * static_cast<float>(i) / 400000.f;  // exp: softmax / cross-entropy use x <= 0
    const double ref = std::exp(static_cast<double>(x));
    max_exp_rel = std::max(max_exp_rel, std::fabs(vec::fast_exp(x) - ref) / ref);
    const float y = -6.f + 12.f * static_cast<float>(i) / 400000.f;
    max_erf_abs = std::max(max_erf_abs, std::fabs(vec::fast_erf(y) - std::erf(static_cast<double>(y))));
    float e = -1.f;  // the exponential GELU's backward takes from erf: exp(-y^2)
    const float erf_y = vec::fast_erf(y, e);
    ASSERT_EQ(erf_y, vec::fast_erf(y));
    const double e_ref = std::exp(-static_cast<double>(y) * y);
    max_erf_exp_abs = std::max(max_erf_exp_abs, std::fabs(e - e_ref));
  }
  EXPECT_LT(max_erf_exp_abs, 1e-6);
  EXPECT_LT(max_exp_rel, 4e-7);  // a few ulp
  EXPECT_LT(max_erf_abs, 6e-7);  // A&S 7.1.26: 1.5e-7 in exact arithmetic, plus float rounding
  EXPECT_EQ(vec::fast_exp(-100.f), 0.f);
  EXPECT_EQ(vec::fast_exp(-INFINITY), 0.f);
  EXPECT_EQ(vec::fast_exp(0.f), 1.f);
  EXPECT_NEAR(vec::fast_erf(0.f), 0.f, 3e-7);
}

}  // namespace
}  // namespace moelab
