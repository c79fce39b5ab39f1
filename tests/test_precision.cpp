// bf16 mixed precision: the bf16 GEMM path against an oracle that rounds the operands to bf16 and multiplies in
// double, and against the fp32 path; bf16 training against fp32 training on a tiny model; bf16 determinism.
#include <functional>
#include <cmath>
#include <cstring>
#include <tuple>
#include <filesystem>
#include <utility>

#include "backend/backend.h"
#include "backend/peak.h"
#include "data/shard.h"
#include "model/transformer.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moelab {
namespace {

// Round-to-nearest-even to bf16 and back: the value the bf16 GEMM multiplies.
float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// C = alpha op(A) op(B) + beta C in double, operands optionally rounded to bf16 first.
void naive_gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, float* c, int64_t ldc, bool bf16) {
  auto q = [&](float v) { return static_cast<double>(bf16 ? round_bf16(v) : v); };
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p)
        s += q(ta == Trans::N ? a[i * lda + p] : a[p * lda + i]) * q(tb == Trans::N ? b[p * ldb + j] : b[j * ldb + p]);
      c[i * ldc + j] = static_cast<float>(alpha * s + beta * c[i * ldc + j]);
    }
}

// The operand rounding (vcvtne2ps2bf16 for 32 values at a time, bit arithmetic for the rest of a row) as seen
// through a product with the identity: ties go to even, subnormals count as zero (the rounding flushes them and
// the bf16 dot-product instructions would ignore them anyway), the same in both parts of a row.
TEST(Precision, Bf16RoundingIsTheSameInVectorBodyAndTail) {
  auto be = make_backend("cpu", 1);
  be->set_matmul_precision(Precision::BF16);
  const float tie_down = 1.f + std::ldexp(1.f, -8);       // halfway between 1 and 1 + 2^-7: to even (1)
  const float tie_up = 1.f + 3 * std::ldexp(1.f, -8);     // halfway between 1 + 2^-7 and 1 + 2^-6: to even (up)
  const std::vector<float> special = {tie_down, tie_up, 1e-39f, -1e-39f, 1.f / 3.f, -3e38f};
  const int64_t k = 70;  // two vectors of 32, then a scalar tail of 6
  std::vector<float> a(k, 0.5f), identity(k * k, 0.f), c(k, 0.f);
  for (size_t j = 0; j < special.size(); ++j) a[j] = a[64 + j] = special[j];
  for (int64_t j = 0; j < k; ++j) identity[j * k + j] = 1.f;
  be->gemm(Trans::N, Trans::N, 1, k, k, 1.f, a.data(), k, identity.data(), k, 0.f, c.data(), k);
  for (size_t j = 0; j < special.size(); ++j) {
    const float v = special[j];
    const float expected = std::fabs(v) < 1.17549435e-38f ? 0.f : round_bf16(v);
    EXPECT_EQ(c[j], expected) << "vector body, value " << v;
    EXPECT_EQ(c[64 + j], expected) << "scalar tail, value " << v;
  }
  EXPECT_EQ(c[0], 1.f);
  EXPECT_EQ(c[1], 1.f + std::ldexp(1.f, -6));
}

// The CPU backend keeps the bf16 copy of an operand in backend memory and reuses it, with the same result as
// rounding it again, until it sees the memory written: by an upload, by a kernel (a product's output, an
// elementwise write over part of it), or freed and allocated again. Host memory handed to a kernel is never cached.
TEST(Precision, ReusedOperandCopiesAreNeverStale) {
  auto be = make_backend("cpu", 2);
  be->set_matmul_precision(Precision::BF16);
  Rng rng(5);
  for (const auto& [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{64, 128, 192}, {37, 29, 70}}) {
    std::vector<float> a(m * k), b(k * n);
    testing::fill_normal(a.data(), a.size(), rng);
    testing::fill_normal(b.data(), b.size(), rng);
    BackendArray<float> da(*be, m * k), db(*be, k * n), dc(*be, m * n);
    be->upload(da.data(), a.data(), m * k);
    be->upload(db.data(), b.data(), k * n);
    // the oracle: the same product on host memory, rounded afresh each time
    auto expected = [&](const std::vector<float>& host_a) {
      std::vector<float> c(m * n);
      be->gemm(Trans::N, Trans::N, m, n, k, 1.f, host_a.data(), k, b.data(), n, 0.f, c.data(), n);
      return c;
    };
    auto product = [&] {
      be->gemm(Trans::N, Trans::N, m, n, k, 1.f, da.data(), k, db.data(), n, 0.f, dc.data(), n);
      return be->download_vector(dc.data(), m * n);
    };
    EXPECT_EQ(product(), expected(a));
    EXPECT_EQ(product(), expected(a)) << "reused copy";
    for (auto& x : a) x = -2.f * x;
    be->upload(da.data(), a.data(), m * k);
    EXPECT_EQ(product(), expected(a)) << "stale copy after an upload";
    be->scale(da.data() + k, 0.5f, k);  // one row, by a kernel
    for (int64_t j = 0; j < k; ++j) a[k + j] *= 0.5f;
    EXPECT_EQ(product(), expected(a)) << "stale copy after a kernel wrote part of it";
    // a product writing over an operand: A = C (M x N) @ B^T-shaped (N x K), then A is read again
    BackendArray<float> de(*be, n * k);
    be->upload(de.data(), b.data(), n * k);
    be->gemm(Trans::N, Trans::N, m, k, n, 0.125f, dc.data(), n, de.data(), k, 0.f, da.data(), k);
    a = be->download_vector(da.data(), m * k);
    EXPECT_EQ(product(), expected(a)) << "stale copy after a product wrote into it";
    // host memory is never cached: changed behind the backend's back, it is still read afresh
    std::vector<float> host = a, c1(m * n), c2(m * n);
    be->gemm(Trans::N, Trans::N, m, n, k, 1.f, host.data(), k, b.data(), n, 0.f, c1.data(), n);
    for (auto& x : host) x += 1.f;
    be->gemm(Trans::N, Trans::N, m, n, k, 1.f, host.data(), k, b.data(), n, 0.f, c2.data(), n);
    for (auto& x : a) x += 1.f;
    EXPECT_EQ(c2, expected(a)) << "host memory served from a stale copy";
  }
  // freed and allocated again (the same address, likely): the new contents count
  std::vector<float> ones(64 * 64, 1.f), twos(64 * 64, 2.f), out(64 * 64);
  BackendArray<float> c(*be, 64 * 64);
  for (int round = 0; round < 3; ++round) {
    BackendArray<float> x(*be, 64 * 64);
    be->upload(x.data(), round % 2 ? twos.data() : ones.data(), 64 * 64);
    be->gemm(Trans::N, Trans::N, 64, 64, 64, 1.f, x.data(), 64, x.data(), 64, 0.f, c.data(), 64);
    be->download(out.data(), c.data(), 64 * 64);
    EXPECT_EQ(out[0], round % 2 ? 256.f : 64.f) << "round " << round;
  }
}

// A MatmulOperandOnly region (Backend::declare_use) may never get its fp32 values: its producer keeps only the bf16
// copy. Products must still see exactly the values written the ordinary way, for dense blocks of the region (served
// from the copy) and for strided ones (packed from the copy, not from the unwritten fp32 memory); a product at fp32
// precision or a download of such values is refused; a later ordinary write brings the fp32 values back.
TEST(Precision, OperandOnlyRegionsFeedProductsTheWrittenValues) {
  Rng rng(17);
  const int64_t rows = 96, cols = 80, n = 24;
  std::vector<float> pre(rows * cols), dact(rows * cols), b(cols * n), src(40 * cols), scale(rows);
  for (auto* v : {&pre, &dact, &b, &src, &scale}) testing::fill_normal(v->data(), v->size(), rng);
  std::vector<int32_t> index(rows);
  for (auto& i : index) i = static_cast<int32_t>(rng.below(40));
  // every producer that may skip the fp32 values, writing the region `out` from `pre` / `src` (backend copies)
  struct Inputs {
    BackendArray<float> pre, dact, b, src, scale, rstd;
    BackendArray<int32_t> index;
  };
  const std::vector<std::function<void(Backend&, Inputs&, float*)>> producers = {
      [&](Backend& be, Inputs& in, float* out) { be.gelu_forward(out, in.pre.data(), rows * cols); },
      [&](Backend& be, Inputs& in, float* out) { be.gelu_backward(out, in.pre.data(), in.dact.data(), rows * cols); },
      [&](Backend& be, Inputs& in, float* out) { be.gather_rows(out, in.src.data(), in.index.data(), nullptr, rows, cols); },
      [&](Backend& be, Inputs& in, float* out) {
        be.gather_rows(out, in.src.data(), in.index.data(), in.scale.data(), rows, cols);
      },
      [&](Backend& be, Inputs& in, float* out) {
        be.rmsnorm_forward(out, in.rstd.data(), in.pre.data(), in.scale.data(), rows, cols, 1e-5f);
      },
  };
  for (size_t p = 0; p < producers.size(); ++p) {
    auto be = make_backend("cpu", 2);
    be->set_matmul_precision(Precision::BF16);
    Inputs in{{*be, rows * cols}, {*be, rows * cols}, {*be, cols * n}, {*be, 40 * cols}, {*be, rows}, {*be, rows},
              {*be, rows}};
    be->upload(in.pre.data(), pre.data(), rows * cols);
    be->upload(in.dact.data(), dact.data(), rows * cols);
    be->upload(in.b.data(), b.data(), cols * n);
    be->upload(in.src.data(), src.data(), 40 * cols);
    be->upload(in.scale.data(), scale.data(), rows);
    be->upload(in.index.data(), index.data(), rows);
    BackendArray<float> written(*be, rows * cols), only(*be, rows * cols);
    std::vector<float> sevens(rows * cols, 7.f);
    be->upload(only.data(), sevens.data(), rows * cols);
    be->declare_use(only.data(), rows * cols, Backend::BufferUse::MatmulOperandOnly);
    // products over the whole region, a dense row block (op(A) = A, and A^T), and a strided block (40 x 40 of the
    // 80 columns)
    auto products = [&](const float* a) {
      BackendArray<float> c1(*be, rows * n), c2(*be, 40 * n), c3(*be, cols * n), c4(*be, 40 * n);
      be->gemm(Trans::N, Trans::N, rows, n, cols, 1.f, a, cols, in.b.data(), n, 0.f, c1.data(), n);
      be->gemm(Trans::N, Trans::N, 40, n, cols, 1.f, a + 16 * cols, cols, in.b.data(), n, 0.f, c2.data(), n);
      be->gemm(Trans::T, Trans::N, cols, n, 32, 1.f, a + 8 * cols, cols, in.b.data(), n, 0.f, c3.data(), n);
      be->gemm(Trans::N, Trans::N, 40, n, 40, 1.f, a + 16 * cols + 8, cols, in.b.data(), n, 0.f, c4.data(), n);
      return std::vector<std::vector<float>>{be->download_vector(c1.data(), rows * n),
                                             be->download_vector(c2.data(), 40 * n),
                                             be->download_vector(c3.data(), cols * n),
                                             be->download_vector(c4.data(), 40 * n)};
    };
    producers[p](*be, in, written.data());  // fp32 values, rounded by the products below
    const auto expected = products(written.data());
    producers[p](*be, in, only.data());
    EXPECT_EQ(products(only.data()), expected) << "producer " << p;
    EXPECT_THROW(be->download_vector(only.data(), rows * cols), Error) << "a download of bf16-only values";
    {
      const MatmulPrecisionScope fp32(*be, Precision::FP32);
      BackendArray<float> c(*be, rows * n);
      EXPECT_THROW(be->gemm(Trans::N, Trans::N, rows, n, cols, 1.f, only.data(), cols, in.b.data(), n, 0.f, c.data(), n),
                   Error) << "an fp32 product of bf16-only values";
    }
    be->copy(only.data(), written.data(), rows * cols);  // an ordinary write: fp32 values again
    EXPECT_EQ(be->download_vector(only.data(), rows * cols), be->download_vector(written.data(), rows * cols));
    EXPECT_EQ(products(only.data()), expected);
  }
}

TEST(Precision, Bf16GemmMatchesRoundedOperandsAndTracksFp32) {
  auto be = make_backend("cpu", 2);
  Rng rng(11);
  // Odd sizes and padded strides: the packing must honour lda/ldb and leave C's padding alone. 128 x 64 x 192
  // takes the cached bf16 matmul primitive, 37 x 29 x 70 dnnl_gemm_bf16bf16f32.
  for (const auto& [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{37, 29, 70}, {128, 64, 192}})
  for (Trans ta : {Trans::N, Trans::T})
    for (Trans tb : {Trans::N, Trans::T}) {
      const int64_t pad = 5;
      const int64_t lda = (ta == Trans::N ? k : m) + pad, ldb = (tb == Trans::N ? n : k) + pad, ldc = n + pad;
      std::vector<float> a(256 * 256), b(256 * 256), c0(m * ldc);
      testing::fill_normal(a.data(), a.size(), rng);
      testing::fill_normal(b.data(), b.size(), rng);
      testing::fill_normal(c0.data(), c0.size(), rng);
      std::vector<float> c_bf16 = c0, c_fp32 = c0, oracle = c0;
      be->set_matmul_precision(Precision::BF16);
      be->gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c_bf16.data(), ldc);
      be->set_matmul_precision(Precision::FP32);
      be->gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c_fp32.data(), ldc);
      naive_gemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, oracle.data(), ldc, /*bf16=*/true);
      double max_vs_fp32 = 0;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < ldc; ++j) {
          const int64_t x = i * ldc + j;
          if (j >= n) {
            ASSERT_EQ(c_bf16[x], c0[x]) << "padding column written";
            continue;
          }
          // Exact products of bf16 values, accumulated in fp32: only summation rounding separates them.
          ASSERT_NEAR(c_bf16[x], oracle[x], 1e-5 * (1 + std::fabs(oracle[x])) * std::sqrt(double(k)))
              << "ta " << int(ta) << " tb " << int(tb) << " at " << i << "," << j;
          max_vs_fp32 = std::max(max_vs_fp32, std::fabs(double(c_bf16[x]) - c_fp32[x]));
        }
      // Each operand carries a relative error of at most 2^-9: for unit normals the sum's error is about
      // 2 * 2^-9 * sqrt(k) * 0.7 ~ 0.02-0.04; allow 2-3x, and require it not to be exactly fp32 (the path is exercised).
      EXPECT_LT(max_vs_fp32, 0.1);
      EXPECT_GT(max_vs_fp32, 0.0) << "the bf16 setting did not change the arithmetic";
    }
}

TEST(Precision, Bf16BatchedAndGroupedGemmMatchSingleGemms) {
  auto be = make_backend("cpu", 2);
  be->set_matmul_precision(Precision::BF16);
  Rng rng(12);
  const int64_t m = 16, n = 12, k = 24, batch = 5;
  std::vector<float> a(batch * m * k), b(batch * k * n), c(batch * m * n, 0.f), ref(batch * m * n, 0.f);
  testing::fill_normal(a.data(), a.size(), rng);
  testing::fill_normal(b.data(), b.size(), rng);
  be->gemm_strided_batched(Trans::N, Trans::T, m, n, k, 1.f, a.data(), k, m * k, b.data(), k, k * n, 0.f, c.data(),
                           n, m * n, batch);
  for (int64_t i = 0; i < batch; ++i)
    naive_gemm(Trans::N, Trans::T, m, n, k, 1.f, a.data() + i * m * k, k, b.data() + i * k * n, k, 0.f,
               ref.data() + i * m * n, n, /*bf16=*/true);
  for (size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], ref[i], 1e-4);

  const int64_t rows[3] = {5, 0, 9};
  std::vector<float> x(14 * k), w(3 * n * k), y(14 * n, 0.f), yref(14 * n, 0.f);
  testing::fill_normal(x.data(), x.size(), rng);
  testing::fill_normal(w.data(), w.size(), rng);
  GemmGroup groups[3];
  int64_t offset = 0;
  for (int g = 0; g < 3; ++g) {
    groups[g] = {rows[g], x.data() + offset * k, w.data() + g * n * k, y.data() + offset * n};
    naive_gemm(Trans::N, Trans::T, rows[g], n, k, 1.f, x.data() + offset * k, k, w.data() + g * n * k, k, 0.f,
               yref.data() + offset * n, n, /*bf16=*/true);
    offset += rows[g];
  }
  be->grouped_gemm(Trans::N, Trans::T, n, k, 1.f, groups, 3, k, k, 0.f, n);
  for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], yref[i], 1e-4);
}

TEST(Precision, ScopeRestoresAndPeakIsFp32) {
  auto be = make_backend("cpu", 1);
  be->set_matmul_precision(Precision::BF16);
  {
    const MatmulPrecisionScope scope(*be, Precision::FP32);
    EXPECT_EQ(be->matmul_precision(), Precision::FP32);
  }
  EXPECT_EQ(be->matmul_precision(), Precision::BF16);
  measure_gemm_peak(*be, 0.0);
  EXPECT_EQ(be->matmul_precision(), Precision::BF16) << "measuring the peak must not change the setting";
}

std::vector<double> train_losses(const Config& c, const TokenFile& data, int steps) {
  auto be = make_backend("cpu", static_cast<int>(c.train.threads));
  Trainer trainer(c, *be);
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) losses.push_back(trainer.step(data).loss);
  return losses;
}

Config tiny_config(std::vector<std::string> extra) {
  std::vector<std::string> o = {"model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                "model.seq_len=32",    "train.batch_size=4", "train.steps=40", "train.warmup_steps=4",
                                "train.lr=0.01",       "train.threads=2"};
  o.insert(o.end(), extra.begin(), extra.end());
  return config_from_string("", o);
}

TEST(Precision, Bf16TrainingTracksFp32AndIsDeterministic) {
  const std::string path =
      testing::write_tokens(std::filesystem::temp_directory_path() / "moelab_precision_tokens.bin", 20000, 64);
  TokenFile data(path, "uint16");
  for (const std::vector<std::string>& variant :
       {std::vector<std::string>{}, std::vector<std::string>{"moe.experts=4", "moe.top_k=2"}}) {
    const std::string name = variant.empty() ? "dense" : "moe";
    auto fp32_keys = variant, bf16_keys = variant;
    bf16_keys.push_back("train.precision=bf16");
    const auto fp32 = train_losses(tiny_config(fp32_keys), data, 40);
    const auto bf16 = train_losses(tiny_config(bf16_keys), data, 40);
    const auto bf16_again = train_losses(tiny_config(bf16_keys), data, 40);
    double max_diff = 0;
    for (size_t i = 0; i < fp32.size(); ++i) {
      EXPECT_EQ(bf16[i], bf16_again[i]) << name << ": bf16 must be bitwise deterministic, step " << i;
      max_diff = std::max(max_diff, std::fabs(bf16[i] - fp32[i]));
    }
    // The loss falls from ln 64 = 4.16 to about 1.6 over these steps; bf16 rounding moves it by under 0.01 for
    // the dense model (measured 0.007) and a few hundredths for the MoE, where a rounded router input can flip a
    // top-2 choice (measured 0.055).
    EXPECT_LT(fp32.back(), fp32.front() - 1.0) << name;
    EXPECT_LT(max_diff, variant.empty() ? 0.03 : 0.1) << name;
    EXPECT_GT(max_diff, 0.0) << name << ": bf16 run identical to fp32, the setting had no effect";
    std::printf("%s: max |loss bf16 - loss fp32| over %zu steps = %.5f (final %.4f vs %.4f)\n", name.c_str(),
                fp32.size(), max_diff, bf16.back(), fp32.back());
  }
}

// Operand reuse (the parameters rounded as the optimizer writes them, each layer's output gradient, the activations
// a training forward saves for its backward rounded as their producers write them, the logits gradient) must never
// change a result: bf16 training with it and with it turned off (MOELAB_NO_OPERAND_REUSE) gives bitwise-equal
// losses, also across an evaluation and a write to the parameters between steps, and bitwise-equal gradients after
// a training forward that was not followed by its backward (a stale copy would show here). MatmulOperandOnly
// buffers never get their fp32 values written under reuse: a kernel that read them would show here too.
std::unique_ptr<Backend> backend_without_reuse(int threads) {
  ::setenv("MOELAB_NO_OPERAND_REUSE", "1", 1);
  auto be = make_backend("cpu", threads);
  ::unsetenv("MOELAB_NO_OPERAND_REUSE");
  return be;
}

TEST(Precision, OperandReuseNeverChangesBf16Training) {
  const std::string path =
      testing::write_tokens(std::filesystem::temp_directory_path() / "moelab_reuse_tokens.bin", 20000, 64);
  TokenFile data(path, "uint16");
  for (const std::vector<std::string>& variant :
       {std::vector<std::string>{"model.pos=rope", "model.norm=layernorm"},
        std::vector<std::string>{"model.bias=true"},  // fc1's bias gradient reads its input gradient as fp32
        std::vector<std::string>{"moe.experts=4", "moe.top_k=2", "train.grad_accum=2"},
        std::vector<std::string>{"model.ffn=swiglu", "moe.experts=4", "moe.top_k=1", "moe.shared_experts=1"}}) {
    auto keys = variant;
    keys.push_back("train.precision=bf16");
    const Config c = tiny_config(keys);
    auto reuse = make_backend("cpu", 2);
    auto fresh = backend_without_reuse(2);
    Trainer with(c, *reuse), without(c, *fresh);
    for (int s = 0; s < 6; ++s) {
      const double a = with.step(data).loss, b = without.step(data).loss;
      ASSERT_EQ(a, b) << variant.back() << ": step " << s;
      if (s == 2) ASSERT_EQ(with.evaluate(data, 2), without.evaluate(data, 2)) << variant.back();
      if (s == 3)  // a kernel's write to the parameters drops the optimizer's bf16 copies of them
        for (Trainer* t : {&with, &without}) t->model().backend().scale(t->model().params(), 0.75f, t->model().num_params());
    }

    Transformer m1(c.model, *reuse, 4), m2(c.model, *fresh, 4);
    m1.init_weights(3), m2.init_weights(3);
    reuse->set_matmul_precision(Precision::BF16), fresh->set_matmul_precision(Precision::BF16);
    Rng rng(8);
    std::vector<int32_t> t1(4 * 32), t2(4 * 32), y(4 * 32);
    for (auto* v : {&t1, &t2, &y})
      for (auto& t : *v) t = static_cast<int32_t>(rng.below(64));
    for (Transformer* m : {&m1, &m2}) {
      m->zero_grad();
      m->forward(t1.data(), y.data(), 4, 1.f);  // no backward for this one
      m->forward(t2.data(), y.data(), 4, 1.f);
      m->backward();
    }
    ASSERT_EQ(reuse->download_vector(std::as_const(m1).grads(), m1.num_params()),
              fresh->download_vector(std::as_const(m2).grads(), m2.num_params())) << variant.back();
  }
}

}  // namespace
}  // namespace moelab
