// Every layer's backward against central finite differences. Each case: random inputs and parameters, the
// scalar L = sum(w * forward(x)) with random w, analytic grads from backward(dout = w), compared entrywise.
#include <memory>

#include "backend/backend.h"
#include "layers/layers.h"
#include "test_util.h"

namespace moelab {
namespace {

using testing::Buffer;
using testing::check_gradients;
using testing::dot;
using testing::fill_normal;
using Pairs = std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>>;

class LayerFd : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_backend("cpu", 2);
  Rng rng{1234};
};

TEST_F(LayerFd, LinearWithBias) {
  const int64_t N = 6, I = 5, O = 7;
  Buffer x({N, I}), w({O, I}), b({O}), y({N, O}), dy({N, O}), dx({N, I}), dw({O, I}), db({O});
  fill_normal(x.data.data(), N * I, rng);
  fill_normal(w.data.data(), O * I, rng, 0.5f);
  fill_normal(b.data.data(), O, rng);
  fill_normal(dy.data.data(), N * O, rng);
  linear_forward(*be, y.t(), x.t(), w.t(), b.t());
  linear_backward(*be, dx.t(), dw.t(), db.t(), dy.t(), x.t(), w.t());
  auto loss = [&] {
    linear_forward(*be, y.t(), x.t(), w.t(), b.t());
    return dot(y.data.data(), dy.data.data(), N * O);
  };
  check_gradients("linear", Pairs{{"x", {x.t(), dx.t()}}, {"W", {w.t(), dw.t()}}, {"b", {b.t(), db.t()}}}, loss, rng);
}

TEST_F(LayerFd, EmbeddingWithLearnedPositions) {
  const int64_t B = 2, T = 5, C = 4, V = 6;
  std::vector<int32_t> tokens = {0, 3, 3, 5, 1, 2, 2, 0, 3, 4};  // repeated ids exercise the accumulation
  Buffer table({V, C}), pos({T, C}), out({B, T, C}), dout({B, T, C}), dtable({V, C}), dpos({T, C});
  fill_normal(table.data.data(), V * C, rng);
  fill_normal(pos.data.data(), T * C, rng);
  fill_normal(dout.data.data(), B * T * C, rng);
  embedding_backward(*be, dtable.t(), dpos.t(), tokens.data(), dout.t());
  auto loss = [&] {
    embedding_forward(*be, out.t(), tokens.data(), table.t(), pos.t());
    return dot(out.data.data(), dout.data.data(), B * T * C);
  };
  check_gradients("embedding", Pairs{{"table", {table.t(), dtable.t()}}, {"pos", {pos.t(), dpos.t()}}}, loss, rng,
                  100);
}

TEST_F(LayerFd, SinusoidalTableMatchesFormula) {
  // Independent oracle: the formula evaluated directly in double at a few points.
  const int64_t T = 9, C = 8, half = C / 2;
  std::vector<float> table(T * C);
  sinusoidal_table(table.data(), T, C);
  for (int64_t t : {0, 3, 8})
    for (int64_t i : {0, 1, 3}) {
      const double f = std::exp(-static_cast<double>(i) * std::log(10000.0) / (half - 1));
      EXPECT_NEAR(table[t * C + i], std::sin(t * f), 1e-6);
      EXPECT_NEAR(table[t * C + half + i], std::cos(t * f), 1e-6);
    }
}

void norm_case(Backend& be, Rng& rng, NormKind kind, bool with_bias) {
  const int64_t N = 5, C = 8;
  Buffer x({N, C}), w({C}), b({C}), y({N, C}), mean({N}), rstd({N}), dy({N, C}), dx({N, C}), dw({C}), db({C});
  fill_normal(x.data.data(), N * C, rng, 2.f, 0.5f);
  fill_normal(w.data.data(), C, rng, 0.3f, 1.f);
  fill_normal(b.data.data(), C, rng, 0.3f);
  fill_normal(dy.data.data(), N * C, rng);
  Tensor bias = with_bias ? b.t() : Tensor();
  norm_forward(be, kind, y.t(), mean.t(), rstd.t(), x.t(), w.t(), bias, 1e-5f);
  norm_backward(be, kind, dx.t(), dw.t(), with_bias ? db.t() : Tensor(), dy.t(), x.t(), w.t(), mean.t(), rstd.t());
  auto loss = [&] {
    norm_forward(be, kind, y.t(), mean.t(), rstd.t(), x.t(), w.t(), bias, 1e-5f);
    return dot(y.data.data(), dy.data.data(), N * C);
  };
  Pairs pairs{{"x", {x.t(), dx.t()}}, {"weight", {w.t(), dw.t()}}};
  if (with_bias) pairs.push_back({"bias", {b.t(), db.t()}});
  check_gradients(kind == NormKind::LayerNorm ? "layernorm" : "rmsnorm", pairs, loss, rng, 40,
                  {.eps = 3e-3, .rtol = 2e-2, .atol_frac = 2e-3});
}

TEST_F(LayerFd, LayerNorm) { norm_case(*be, rng, NormKind::LayerNorm, true); }
TEST_F(LayerFd, LayerNormNoBias) { norm_case(*be, rng, NormKind::LayerNorm, false); }
TEST_F(LayerFd, RMSNorm) { norm_case(*be, rng, NormKind::RMSNorm, false); }

void attention_case(Backend& be, Rng& rng, bool rope) {
  const int64_t B = 2, T = 5, C = 8, H = 2;
  const AttentionShape s{B, T, C, H, rope, 10000.f};
  Buffer qkv_in({B, T, 3 * C}), qkv({B, T, 3 * C}), probs({B, H, T, T}), out({B, T, C}), dout({B, T, C}),
      dqkv({B, T, 3 * C}), dprobs({B, H, T, T});
  fill_normal(qkv_in.data.data(), B * T * 3 * C, rng);
  fill_normal(dout.data.data(), B * T * C, rng);
  // attention_forward rotates qkv in place, so each evaluation starts from a fresh copy of the input.
  auto run = [&] {
    qkv.data = qkv_in.data;
    attention_forward(be, s, out.t(), probs.t(), qkv.t());
  };
  run();
  attention_backward(be, s, dqkv.t(), dprobs.t(), dout.t(), probs.t(), qkv.t());
  auto loss = [&] {
    run();
    return dot(out.data.data(), dout.data.data(), B * T * C);
  };
  check_gradients(rope ? "attention+rope" : "attention", Pairs{{"qkv", {qkv_in.t(), dqkv.t()}}}, loss, rng, 120,
                  {.eps = 3e-3, .rtol = 2e-2, .atol_frac = 2e-3});
}

TEST_F(LayerFd, CausalAttention) { attention_case(*be, rng, false); }
TEST_F(LayerFd, CausalAttentionWithRope) { attention_case(*be, rng, true); }

TEST_F(LayerFd, AttentionIsCausal) {
  // Changing the last position's k and v leaves every earlier output unchanged.
  const int64_t B = 1, T = 6, C = 8, H = 2;
  const AttentionShape s{B, T, C, H, true, 10000.f};
  Buffer qkv({B, T, 3 * C}), probs({B, H, T, T}), out1({B, T, C}), out2({B, T, C});
  fill_normal(qkv.data.data(), B * T * 3 * C, rng);
  Buffer qkv2 = qkv;
  for (int64_t c = C; c < 3 * C; ++c) qkv2.data[(T - 1) * 3 * C + c] += 1.f;
  attention_forward(*be, s, out1.t(), probs.t(), qkv.t());
  attention_forward(*be, s, out2.t(), probs.t(), qkv2.t());
  for (int64_t i = 0; i < (T - 1) * C; ++i) ASSERT_EQ(out1.data[i], out2.data[i]) << "position " << i / C;
  bool last_changed = false;
  for (int64_t c = 0; c < C; ++c) last_changed |= out1.data[(T - 1) * C + c] != out2.data[(T - 1) * C + c];
  EXPECT_TRUE(last_changed);
}

void mlp_case(Backend& be, Rng& rng, FfnKind kind) {
  const int64_t N = 4, C = 6, F = 10, P = kind == FfnKind::SwiGLU ? 2 * F : F;
  Buffer x({N, C}), w1({P, C}), b1({P}), w2({C, F}), b2({C}), pre({N, P}), act({N, F}), out({N, C}), dout({N, C}),
      dx({N, C}), dw1({P, C}), db1({P}), dw2({C, F}), db2({C}), dpre({N, P}), dact({N, F});
  fill_normal(x.data.data(), N * C, rng);
  fill_normal(w1.data.data(), P * C, rng, 0.5f);
  fill_normal(b1.data.data(), P, rng, 0.5f);
  fill_normal(w2.data.data(), C * F, rng, 0.5f);
  fill_normal(b2.data.data(), C, rng, 0.5f);
  fill_normal(dout.data.data(), N * C, rng);
  mlp_forward(be, kind, out.t(), pre.t(), act.t(), x.t(), w1.t(), b1.t(), w2.t(), b2.t());
  mlp_backward(be, kind, dx.t(), dw1.t(), db1.t(), dw2.t(), db2.t(), dpre.t(), dact.t(), dout.t(), x.t(), pre.t(),
               act.t(), w1.t(), w2.t());
  auto loss = [&] {
    out.zero();  // mlp_forward adds into the residual stream
    mlp_forward(be, kind, out.t(), pre.t(), act.t(), x.t(), w1.t(), b1.t(), w2.t(), b2.t());
    return dot(out.data.data(), dout.data.data(), N * C);
  };
  check_gradients(kind == FfnKind::Gelu ? "mlp-gelu" : "mlp-swiglu",
                  Pairs{{"x", {x.t(), dx.t()}}, {"W1", {w1.t(), dw1.t()}}, {"b1", {b1.t(), db1.t()}},
                        {"W2", {w2.t(), dw2.t()}}, {"b2", {b2.t(), db2.t()}}},
                  loss, rng, 48, {.eps = 3e-3, .rtol = 2e-2, .atol_frac = 2e-3});
}

TEST_F(LayerFd, MlpGelu) { mlp_case(*be, rng, FfnKind::Gelu); }
TEST_F(LayerFd, MlpSwiGLU) { mlp_case(*be, rng, FfnKind::SwiGLU); }

TEST_F(LayerFd, FusedSoftmaxCrossEntropy) {
  const int64_t N = 6, V = 9;
  std::vector<int32_t> targets = {0, 8, 3, -1, 3, 5};  // -1: ignored position
  Buffer logits({N, V}), work({N, V}), losses({N});
  fill_normal(logits.data.data(), N * V, rng, 2.f);
  const float scale = 0.37f;
  work.data = logits.data;
  const double loss_sum = cross_entropy_forward_backward(*be, work.t(), losses.t(), targets.data(), scale);
  EXPECT_EQ(losses.data[3], 0.f);
  // Independent oracle for the value: log-sum-exp in double.
  double expected = 0;
  for (int64_t r = 0; r < N; ++r) {
    if (targets[r] < 0) continue;
    double mx = -1e30, s = 0;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(logits.data[r * V + j]));
    for (int64_t j = 0; j < V; ++j) s += std::exp(logits.data[r * V + j] - mx);
    expected += mx + std::log(s) - logits.data[r * V + targets[r]];
  }
  EXPECT_NEAR(loss_sum, expected, 1e-5 * std::fabs(expected));
  Buffer grad = work;  // in-place gradient, = scale * dL/dlogits
  for (float& g : grad.data) g /= scale;
  auto loss = [&] {
    work.data = logits.data;
    return cross_entropy_forward_backward(*be, work.t(), losses.t(), targets.data(), 0.f);
  };
  check_gradients("softmax-xent", Pairs{{"logits", {logits.t(), grad.t()}}}, loss, rng, 54,
                  {.eps = 3e-3, .rtol = 2e-2, .atol_frac = 2e-3});
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(grad.data[3 * V + j], 0.f) << "ignored row must have zero gradient";
}

}  // namespace
}  // namespace moelab
