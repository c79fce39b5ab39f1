// MoE layers: invariances (one expert = dense FFN, dropless = infinite capacity), capacity dropping,
// finite-difference gradients through router, dispatch and experts, expert-choice causality, determinism.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>

#include "backend/backend.h"
#include "dist/comm.h"
#include "layers/layers.h"
#include "model/transformer.h"
#include "moe/moe.h"
#include "moe/moe_layer.h"
#include "optim/adamw.h"
#include "test_util.h"

namespace moelab {
namespace {

using testing::Buffer;
using testing::fill_normal;

// Host buffers for one MoE layer of the given dims, with random weights.
struct MoeFixture {
  MoeDims d;
  Buffer router, fc1_w, fc1_b, fc2_w, fc2_b, sh1_w, sh1_b, sh2_w, sh2_b;
  Buffer g_router, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b, g_sh1_w, g_sh1_b, g_sh2_w, g_sh2_b;
  Buffer logits, probs, x_sorted, pre, act, y_sorted, sh_pre, sh_act;
  Buffer d_x_sorted, d_pre, d_act, d_y_sorted, d_weight, d_logits, d_sh_pre, d_sh_act, ones;
  Buffer router_in, d_router_in, selection_bias;  // router jitter; bias balancing
  Buffer x_local, y_local, d_x_local, d_y_local;  // the all-to-all dispatcher's rows (with a group)
  Backend& be;
  MoeLayer layer;

  // group: the layer dispatches by all-to-all over it (expert parallelism), else locally.
  MoeFixture(Backend& backend, const MoeDims& dims, Rng& rng, Communicator* group = nullptr)
      : d(dims), be(backend), layer(backend, dims, group) {
    const int64_t E = d.experts, C = d.d_model, F = d.expert_hidden, P = d.fc1_rows(), N = d.tokens();
    const int64_t R = d.max_rows(), S = d.shared_hidden, SP = d.shared_fc1_rows();
    auto make = [](Buffer& v, Buffer& g, Shape s) { v = Buffer(s), g = Buffer(s); };
    make(router, g_router, {E, C});
    make(fc1_w, g_fc1_w, {E, P, C});
    make(fc2_w, g_fc2_w, {E, C, F});
    if (d.bias) make(fc1_b, g_fc1_b, {E, P}), make(fc2_b, g_fc2_b, {E, C});
    if (S > 0) {
      make(sh1_w, g_sh1_w, {SP, C});
      make(sh2_w, g_sh2_w, {C, S});
      if (d.bias) make(sh1_b, g_sh1_b, {SP}), make(sh2_b, g_sh2_b, {C});
    }
    for (Buffer* b : {&router, &fc1_w, &fc2_w, &fc1_b, &fc2_b, &sh1_w, &sh2_w, &sh1_b, &sh2_b})
      fill_normal(b->data.data(), b->shape.numel(), rng, 0.5f);
    logits = Buffer({N, E}), probs = Buffer({N, E}), x_sorted = Buffer({R, C}), pre = Buffer({R, P});
    act = Buffer({R, F}), y_sorted = Buffer({R, C});
    d_x_sorted = Buffer({R, C}), d_pre = Buffer({R, P}), d_act = Buffer({R, F}), d_y_sorted = Buffer({R, C});
    d_weight = Buffer({R}), d_logits = Buffer({N, E}), ones = Buffer({R});
    std::fill(ones.data.begin(), ones.data.end(), 1.f);
    if (S > 0) sh_pre = Buffer({N, SP}), sh_act = Buffer({N, S}), d_sh_pre = Buffer({N, SP}), d_sh_act = Buffer({N, S});
    if (d.router_jitter > 0) router_in = Buffer({N, C}), d_router_in = Buffer({N, C});
    if (group) x_local = Buffer({R, C}), y_local = Buffer({R, C}), d_x_local = Buffer({R, C}), d_y_local = Buffer({R, C});
  }
  const Routing& routing() const { return layer.routing(); }
  MoeStats stats() const { return layer.statistics(be); }
  // The routing's rows as (token, expert) pairs, downloaded.
  std::vector<std::pair<int32_t, int32_t>> rows(Backend& be) const {
    const Routing& r = routing();
    const auto token = be.download_vector(r.row_token.data(), r.rows);
    const auto expert = be.download_vector(r.row_expert.data(), r.rows);
    std::vector<std::pair<int32_t, int32_t>> out;
    for (int64_t q = 0; q < r.rows; ++q) out.push_back({token[q], expert[q]});
    return out;
  }
  static Tensor opt(Buffer& b) { return b.shape.rank == 0 ? Tensor() : b.t(); }
  MoeWeights weights() {
    return {router.t(), fc1_w.t(), opt(fc1_b), fc2_w.t(), opt(fc2_b), opt(sh1_w), opt(sh1_b), opt(sh2_w), opt(sh2_b)};
  }
  MoeWeights grads() {
    return {g_router.t(), g_fc1_w.t(), opt(g_fc1_b), g_fc2_w.t(), opt(g_fc2_b), opt(g_sh1_w), opt(g_sh1_b),
            opt(g_sh2_w), opt(g_sh2_b)};
  }
  MoeActivations acts() {
    return {logits.t(), probs.t(), x_sorted.t(), pre.t(), act.t(), y_sorted.t(), opt(sh_pre), opt(sh_act),
            opt(x_local), opt(y_local), opt(router_in)};
  }
  MoeScratch scratch() {
    return {d_x_sorted.t(), d_pre.t(), d_act.t(), d_y_sorted.t(), d_weight.t(), d_logits.t(), opt(d_sh_pre),
            opt(d_sh_act), ones.t(), opt(d_x_local), opt(d_y_local), opt(d_router_in)};
  }
  void forward(Backend& be, Tensor out, Tensor in) { layer.forward(be, d, out, in, weights(), acts()); }
  void backward(Backend& be, Tensor din, Tensor dout, Tensor in, float scale = 1.f) {
    layer.backward(be, d, din, grads(), dout, in, weights(), acts(), scratch(), scale);
  }
};

MoeDims dims(RouterKind router, int64_t E, int64_t K, int64_t F, double cf, FfnKind ffn = FfnKind::Gelu) {
  MoeDims d;
  d.batch = 3, d.seq = 4, d.d_model = 6;
  d.experts = E, d.top_k = K, d.expert_hidden = F;
  d.router = router, d.capacity_factor = cf, d.ffn = ffn;
  return d;
}

class MoeTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_backend("cpu", 2);
  Rng rng{2024};
};

TEST_F(MoeTest, OneExpertTopOneEqualsDenseFfn) {
  for (FfnKind ffn : {FfnKind::Gelu, FfnKind::SwiGLU}) {
    MoeDims d = dims(RouterKind::TokenChoice, 1, 1, 8, 0.0, ffn);
    MoeFixture f(*be, d, rng);
    const int64_t N = d.tokens(), C = d.d_model;
    Buffer x({N, C}), base({N, C});
    fill_normal(x.data.data(), N * C, rng);
    fill_normal(base.data.data(), N * C, rng);
    Buffer out_moe = base, out_dense = base;
    f.forward(*be, out_moe.t(), x.t());
    // The dense FFN with expert 0's weights.
    Buffer pre({N, d.fc1_rows()}), act({N, d.expert_hidden});
    Tensor w1 = f.fc1_w.t().reshaped({d.fc1_rows(), C}), w2 = f.fc2_w.t().reshaped({C, d.expert_hidden});
    mlp_forward(*be, ffn, out_dense.t(), pre.t(), act.t(), x.t(), w1, Tensor(), w2, Tensor());
    for (int64_t i = 0; i < N * C; ++i) ASSERT_EQ(out_moe.data[i], out_dense.data[i]) << "entry " << i;
    EXPECT_EQ(f.stats().dropped_fraction, 0.0);
    EXPECT_EQ(be->download_vector(f.routing().row_weight.data(), 1)[0], 1.f);  // softmax over one expert is exactly 1
    // Backward: expert gradients equal the dense FFN's; the router gets none (the gate is constant).
    Buffer dout({N, C}), dx_moe({N, C}), dx_dense({N, C}), dw1({d.fc1_rows(), C}), dw2({C, d.expert_hidden});
    Buffer dpre({N, d.fc1_rows()}), dact({N, d.expert_hidden});
    fill_normal(dout.data.data(), N * C, rng);
    f.backward(*be, dx_moe.t(), dout.t(), x.t());
    mlp_backward(*be, ffn, dx_dense.t(), dw1.t(), Tensor(), dw2.t(), Tensor(), dpre.t(), dact.t(), dout.t(), x.t(),
                 pre.t(), act.t(), w1, w2);
    for (size_t i = 0; i < dw1.data.size(); ++i) ASSERT_EQ(f.g_fc1_w.data[i], dw1.data[i]);
    for (size_t i = 0; i < dw2.data.size(); ++i) ASSERT_EQ(f.g_fc2_w.data[i], dw2.data[i]);
    for (int64_t i = 0; i < N * C; ++i) ASSERT_NEAR(dx_moe.data[i], dx_dense.data[i], 1e-6);
    for (float g : f.g_router.data) ASSERT_NEAR(g, 0.f, 1e-6);
  }
}

// The token dispatcher is chosen when the layer is built and nothing else in the layer depends on it: the all-to-all
// dispatcher over a group of one rank (every row crosses through the exchange's host buffers and comes back) gives
// the local dispatcher's outputs, gradients and statistics bit for bit.
TEST_F(MoeTest, AllToAllDispatcherOverOneRankEqualsLocal) {
  auto group = world_communicator().split(world_communicator().rank(), 0);
  ASSERT_EQ(group->size(), 1);
  for (RouterKind router : {RouterKind::TokenChoice, RouterKind::ExpertChoice}) {
    MoeDims d = dims(router, 4, 2, 5, router == RouterKind::TokenChoice ? 1.0 : 0.0);
    d.bias = true;
    Rng r1(11), r2(11);
    MoeFixture local(*be, d, r1), all_to_all(*be, d, r2, group.get());
    const int64_t N = d.tokens(), C = d.d_model;
    Buffer x({N, C}), dout({N, C}), out_a({N, C}), out_b({N, C}), dx_a({N, C}), dx_b({N, C});
    fill_normal(x.data.data(), N * C, rng);
    fill_normal(dout.data.data(), N * C, rng);
    local.forward(*be, out_a.t(), x.t());
    all_to_all.forward(*be, out_b.t(), x.t());
    EXPECT_EQ(out_a.data, out_b.data);
    local.backward(*be, dx_a.t(), dout.t(), x.t());
    all_to_all.backward(*be, dx_b.t(), dout.t(), x.t());
    EXPECT_EQ(dx_a.data, dx_b.data);
    EXPECT_EQ(local.g_router.data, all_to_all.g_router.data);
    EXPECT_EQ(local.g_fc1_w.data, all_to_all.g_fc1_w.data);
    EXPECT_EQ(local.g_fc2_b.data, all_to_all.g_fc2_b.data);
    EXPECT_EQ(local.stats().aux_loss, all_to_all.stats().aux_loss);
    EXPECT_EQ(local.stats().tokens_per_expert, all_to_all.stats().tokens_per_expert);
    EXPECT_GT(std::accumulate(local.g_fc1_w.data.begin(), local.g_fc1_w.data.end(), 0.0,
                              [](double s, float v) { return s + std::fabs(v); }), 0.0);
  }
}

TEST_F(MoeTest, DroplessEqualsInfiniteCapacity) {
  MoeDims d0 = dims(RouterKind::TokenChoice, 4, 2, 5, 0.0), dinf = dims(RouterKind::TokenChoice, 4, 2, 5, 1e6);
  Rng r1(7), r2(7);
  MoeFixture a(*be, d0, r1), b(*be, dinf, r2);
  const int64_t N = d0.tokens(), C = d0.d_model;
  Buffer x({N, C}), out_a({N, C}), out_b({N, C}), dout({N, C}), dx_a({N, C}), dx_b({N, C});
  fill_normal(x.data.data(), N * C, rng);
  fill_normal(dout.data.data(), N * C, rng);
  a.forward(*be, out_a.t(), x.t());
  b.forward(*be, out_b.t(), x.t());
  EXPECT_EQ(out_a.data, out_b.data);
  a.backward(*be, dx_a.t(), dout.t(), x.t());
  b.backward(*be, dx_b.t(), dout.t(), x.t());
  EXPECT_EQ(dx_a.data, dx_b.data);
  EXPECT_EQ(a.g_router.data, b.g_router.data);
  EXPECT_EQ(a.g_fc1_w.data, b.g_fc1_w.data);
}

// Top-k selection against a stable sort: highest probability first, the lower expert index first among equal
// probabilities (many ties here: probabilities drawn from a handful of values).
TEST_F(MoeTest, TopKIsAStableDescendingSort) {
  for (const auto& [E, K] : {std::pair<int64_t, int64_t>{8, 2}, {32, 4}, {5, 5}, {16, 1}}) {
    MoeDims d = dims(RouterKind::TokenChoice, E, K, 4, 0.0);
    d.batch = 16, d.seq = 8;
    Routing r;
    r.reserve(*be, d);
    // Logits from a handful of values: equal logits of a row give bit-equal probabilities, so ties abound.
    std::vector<float> logits(d.tokens() * E);
    for (auto& z : logits) z = 0.5f * static_cast<float>(rng.below(5));
    float* device_logits = be->alloc(logits.size());
    float* device_probs = be->alloc(logits.size());
    be->upload(device_logits, logits.data(), d.tokens() * E);
    route(*be, d, device_logits, device_probs, r);
    const std::vector<float> probs = be->download_vector(device_probs, d.tokens() * E);
    const std::vector<int32_t> topk_expert = be->download_vector(r.topk_expert.data(), d.tokens() * K);
    const std::vector<float> topk_prob = be->download_vector(r.topk_prob.data(), d.tokens() * K);
    be->free(device_logits);
    be->free(device_probs);
    for (int64_t i = 0; i < d.tokens(); ++i) {
      std::vector<int32_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      const float* p = probs.data() + i * E;
      std::stable_sort(order.begin(), order.end(), [p](int32_t a, int32_t b) { return p[a] > p[b]; });
      for (int64_t j = 0; j < K; ++j) {
        ASSERT_EQ(topk_expert[i * K + j], order[j]) << "E " << E << " K " << K << " token " << i << " rank " << j;
        ASSERT_EQ(topk_prob[i * K + j], p[order[j]]);
      }
    }
  }
}

TEST_F(MoeTest, CapacityDropsOverflowInRankThenTokenOrder) {
  // All tokens prefer expert 0 (a large router bias through the input): capacity ceil(0.5 * 12 * 1 / 4) = 2.
  MoeDims d = dims(RouterKind::TokenChoice, 4, 1, 5, 0.5);
  MoeFixture f(*be, d, rng);
  const int64_t N = d.tokens(), C = d.d_model;
  std::fill(f.router.data.begin(), f.router.data.end(), 0.f);
  for (int64_t c = 0; c < C; ++c) f.router.data[c] = 1.f;  // expert 0 scores sum(x)
  Buffer x({N, C}), out({N, C});
  for (auto& v : x.data) v = 1.f + 0.1f * static_cast<float>(rng.uniform());
  f.forward(*be, out.t(), x.t());
  EXPECT_EQ(f.routing().rows, 2);
  EXPECT_NEAR(f.stats().dropped_fraction, 10.0 / 12.0, 1e-12);
  EXPECT_EQ(f.stats().idle_experts, 3);
  // The first two tokens won the slots; the others pass through (zero MoE output).
  const auto rows = f.rows(*be);
  EXPECT_EQ(rows[0].first, 0);
  EXPECT_EQ(rows[1].first, 1);
  for (int64_t n = 2; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) ASSERT_EQ(out.data[n * C + c], 0.f);
}

struct FdCase {
  const char* name;
  RouterKind router;
  int64_t experts, top_k, hidden;
  double capacity;
  bool renormalize, bias;
  int64_t shared;
  FfnKind ffn;
  // The newer router options (moe.score, gate_scale, balance = "bias", seq_aux_loss_weight, router_jitter).
  ScoreKind score = ScoreKind::Softmax;
  float gate_scale = 1.f;
  bool selection_bias = false;
  float seq_aux = 0.f;
  float jitter = 0.f;
};
void PrintTo(const FdCase& c, std::ostream* os) { *os << c.name; }

class MoeFd : public ::testing::TestWithParam<FdCase> {};

TEST_P(MoeFd, GradientsThroughRouterDispatchAndExperts) {
  const FdCase& fc = GetParam();
  auto be = make_backend("cpu", 2);
  Rng rng(31);
  MoeDims d = dims(fc.router, fc.experts, fc.top_k, fc.hidden, fc.capacity, fc.ffn);
  d.renormalize = fc.renormalize;
  d.bias = fc.bias;
  d.shared_hidden = fc.shared * fc.hidden;
  d.aux_loss_weight = 0.3f;  // large, so the auxiliary gradients are visible next to the main term
  d.z_loss_weight = 0.2f;
  d.score = fc.score;
  d.gate_scale = fc.gate_scale;
  d.balance_bias = fc.selection_bias;
  d.seq_aux_loss_weight = fc.seq_aux;
  d.router_jitter = fc.jitter;
  d.jitter_seed = fc.jitter > 0 ? 0x5eed : 0;  // the same noise in every forward of the check
  MoeFixture f(*be, d, rng);
  if (fc.selection_bias) {  // a bias that changes some choices: the gradient must not flow through it
    std::vector<float> bias(d.experts);
    fill_normal(bias.data(), d.experts, rng, 0.3f);
    f.layer.router().set_selection_bias(*be, bias);
  }
  const int64_t N = d.tokens(), C = d.d_model;
  Buffer x({N, C}), out({N, C}), dout({N, C}), dx({N, C});
  fill_normal(x.data.data(), N * C, rng);
  fill_normal(dout.data.data(), N * C, rng);
  f.forward(*be, out.t(), x.t());
  if (fc.capacity > 0 && fc.router == RouterKind::TokenChoice) {
    EXPECT_GT(f.stats().dropped_fraction, 0.0);
  }
  f.backward(*be, dx.t(), dout.t(), x.t());
  // Snapshot the routing so we can tell whether a perturbation flipped a discrete decision.
  const auto rows0 = f.rows(*be);
  int flips = 0;
  auto loss = [&] {
    out.zero();
    f.forward(*be, out.t(), x.t());
    flips += f.rows(*be) != rows0;
    return testing::dot(out.data.data(), dout.data.data(), N * C) + f.stats().weighted_aux(d);
  };
  std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> pairs = {
      {"x", {x.t(), dx.t()}}, {"router", {f.router.t(), f.g_router.t()}}, {"fc1", {f.fc1_w.t(), f.g_fc1_w.t()}},
      {"fc2", {f.fc2_w.t(), f.g_fc2_w.t()}}};
  if (fc.bias) {
    pairs.push_back({"fc1_b", {f.fc1_b.t(), f.g_fc1_b.t()}});
    pairs.push_back({"fc2_b", {f.fc2_b.t(), f.g_fc2_b.t()}});
  }
  if (fc.shared > 0) pairs.push_back({"shared_fc1", {f.sh1_w.t(), f.g_sh1_w.t()}});
  testing::check_gradients(fc.name, pairs, loss, rng, 40, {.eps = 1e-3, .rtol = 3e-2, .atol_frac = 3e-3});
  EXPECT_EQ(flips, 0) << "a finite-difference step changed a routing decision; the check is invalid";
}

INSTANTIATE_TEST_SUITE_P(
    Routers, MoeFd,
    ::testing::Values(
        FdCase{"token_choice_top2_capacity_bias", RouterKind::TokenChoice, 4, 2, 5, 0.75, false, true, 0, FfnKind::Gelu},
        FdCase{"token_choice_top2_renormalized", RouterKind::TokenChoice, 4, 2, 5, 0.0, true, false, 0, FfnKind::Gelu},
        FdCase{"expert_choice_shared", RouterKind::ExpertChoice, 4, 2, 5, 1.0, false, false, 1, FfnKind::SwiGLU},
        // G = 2: expansion 2 x G 2 = 4 experts of half size, top 1 x G = 2.
        FdCase{"fine_grained_g2", RouterKind::TokenChoice, 4, 2, 3, 0.0, false, false, 0, FfnKind::Gelu},
        // DeepSeek-V3's router: sigmoid scores (normalised over the chosen), gate scale, a selection bias, the
        // sequence-level loss; then with the Switch aux loss and capacity; then router jitter (fixed noise).
        FdCase{"sigmoid_bias_seq_aux_gate_scale", RouterKind::TokenChoice, 5, 2, 4, 0.0, false, false, 1,
               FfnKind::SwiGLU, ScoreKind::Sigmoid, 2.5f, true, 0.4f},
        FdCase{"sigmoid_capacity_aux", RouterKind::TokenChoice, 4, 2, 5, 0.75, false, true, 0, FfnKind::Gelu,
               ScoreKind::Sigmoid, 1.f, false, 0.2f},
        FdCase{"softmax_bias_seq_aux_renormalized", RouterKind::TokenChoice, 4, 2, 5, 0.0, true, false, 0,
               FfnKind::Gelu, ScoreKind::Softmax, 1.5f, true, 0.4f},
        FdCase{"router_jitter", RouterKind::TokenChoice, 4, 2, 5, 0.0, false, false, 0, FfnKind::Gelu,
               ScoreKind::Softmax, 1.f, false, 0.f, 0.1f},
        FdCase{"expert_choice_sigmoid", RouterKind::ExpertChoice, 4, 2, 5, 1.0, false, false, 0, FfnKind::Gelu,
               ScoreKind::Sigmoid, 2.f}),
    [](const ::testing::TestParamInfo<FdCase>& info) { return std::string(info.param.name); });

ModelConfig small_moe_model(RouterKind router) {
  ModelConfig m;
  m.vocab_size = 32;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 2;
  m.d_ff = 32;
  m.seq_len = 6;
  m.moe.experts = 4;
  m.moe.top_k = router == RouterKind::TokenChoice ? 2 : 1;
  m.moe.router = router;
  m.moe.capacity_factor = router == RouterKind::TokenChoice ? 0.0 : 1.0;
  m.moe.z_loss_weight = 0.001;
  return m;
}

TEST(MoeModel, ExpertChoiceIsCausal) {
  // Changing a later token of a sequence leaves every earlier position (of every sequence) unchanged.
  const ModelConfig m = small_moe_model(RouterKind::ExpertChoice);
  auto be = testing::make_test_backend(2);
  const int64_t B = 4, T = m.seq_len, V = m.vocab_size;
  Transformer model(m, *be, B);
  model.init_weights(5);
  Rng rng(8);
  std::vector<int32_t> tokens(B * T);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(V));
  model.forward(tokens.data(), nullptr, B);
  const std::vector<float> before = model.download_logits();
  const int64_t changed_pos = 4;
  tokens[1 * T + changed_pos] = (tokens[1 * T + changed_pos] + 7) % V;  // sequence 1, position 4
  model.forward(tokens.data(), nullptr, B);
  const std::vector<float> after = model.download_logits();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < changed_pos; ++t)
      for (int64_t v = 0; v < V; ++v)
        ASSERT_EQ(after[(b * T + t) * V + v], before[(b * T + t) * V + v]) << "sequence " << b << " position " << t;
  bool changed = false;
  for (int64_t v = 0; v < V; ++v) changed |= after[(1 * T + changed_pos) * V + v] != before[(1 * T + changed_pos) * V + v];
  EXPECT_TRUE(changed);
}

TEST(MoeModel, WholeModelGradientsMatchFiniteDifferences) {
  // Token choice, expert choice, then the newer options together: a dense first layer, QK-norm, sigmoid scores with
  // a gate scale, bias balancing (biases set, not updated) and the sequence-level loss.
  for (int variant = 0; variant < 3; ++variant) {
    const RouterKind router = variant == 1 ? RouterKind::ExpertChoice : RouterKind::TokenChoice;
    ModelConfig m = small_moe_model(router);
    m.d_model = 8;
    m.d_ff = 12;
    m.moe.every = 2;  // layer 1 only: dense and MoE layers together
    m.moe.shared_experts = 1;
    m.moe.aux_loss_weight = 0.1;
    m.moe.z_loss_weight = 0.05;
    m.init_std = 0.3;
    if (variant == 2) {
      m.n_layers = 3;
      m.moe.every = 1;
      m.moe.first_dense = 1;  // layers 1 and 2 are MoE
      m.qk_norm = true;
      m.moe.score = ScoreKind::Sigmoid;
      m.moe.gate_scale = 2.0;
      m.moe.balance = BalanceKind::Bias;
      m.moe.seq_aux_loss_weight = 0.2;
    }
    auto be = testing::make_test_backend(2);
    const int64_t B = 3;
    Transformer model(m, *be, B);
    model.init_weights(3);
    Rng rng(4);
    if (variant == 2) {
      std::map<int64_t, std::vector<float>> biases;
      for (int64_t layer : {1, 2}) {
        biases[layer].resize(m.moe.experts);
        fill_normal(biases[layer].data(), m.moe.experts, rng, 0.2f);
      }
      model.set_router_biases(biases);
      for (const auto& e : model.layout().entries())  // QK-norm weights away from 1
        if (e.name.find("_norm.weight") != std::string::npos && e.name.find("attn.") != std::string::npos) {
          std::vector<float> w(e.shape.numel());
          fill_normal(w.data(), e.shape.numel(), rng, 0.2f, 1.f);
          be->upload(model.params() + e.offset, w.data(), e.shape.numel());
        }
    }
    std::vector<int32_t> tokens(B * m.seq_len), targets(B * m.seq_len);
    for (auto& t : tokens) t = static_cast<int32_t>(rng.below(m.vocab_size));
    for (auto& t : targets) t = static_cast<int32_t>(rng.below(m.vocab_size));
    model.zero_grad();
    model.forward(tokens.data(), targets.data(), B, 1.f);
    model.backward();
    std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> pairs;
    for (const auto& e : model.layout().entries())
      if (e.name.find("moe") != std::string::npos || e.name.find("layers.0.ffn") != std::string::npos ||
          e.name.find("_norm.weight") != std::string::npos || e.name.find("attn.qkv") != std::string::npos)
        pairs.push_back({e.name, {model.layout().view(model.params(), e.name), model.layout().view(model.grads(), e.name)}});
    auto loss = [&] { return model.forward(tokens.data(), targets.data(), B) + model.last_aux_loss(); };
    testing::check_gradients(variant == 2 ? "model sigmoid, bias, seq aux, qk-norm, first dense"
                             : router == RouterKind::TokenChoice ? "model token choice" : "model expert choice", pairs,
                             loss, rng, 24, {.eps = 1e-3, .rtol = 3e-2, .atol_frac = 3e-3}, be.get());
  }
}

TEST(MoeModel, OptimizerLeavesMatrixGradientsForTheNextBackwardToOverwrite) {
  // (And the gradient norm of the result, whose experts' share the backward's products summed.)
  // The trainer's optimizer step zeroes every gradient but the weight matrices' (AdamW::Grads::ZeroExceptMatrices),
  // and the next backward overwrites those. With 16 experts and 4 tokens, most experts receive no row: their
  // gradients have no product to overwrite them and must be zeroed by the layer. Every parameter kind is present
  // (biases, shared expert, untied head, dense and MoE layers); the gradients must equal, bit for bit, those of a
  // model whose gradient block was filled with zeros.
  ModelConfig m = small_moe_model(RouterKind::TokenChoice);
  m.moe.experts = 16;
  m.moe.every = 2;
  m.moe.shared_experts = 1;
  m.bias = true;
  m.tied_embeddings = false;
  m.seq_len = 4;
  auto be = testing::make_test_backend(2);
  const int64_t B = 1;
  Rng rng(6);
  std::vector<int32_t> tokens(B * m.seq_len), targets(B * m.seq_len);
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(m.vocab_size));
  for (auto& t : targets) t = static_cast<int32_t>(rng.below(m.vocab_size));
  TrainConfig train;

  Transformer fresh(m, *be, B), stale(m, *be, B);
  fresh.init_weights(2);
  stale.init_weights(2);
  const int64_t n = fresh.num_params();
  // Gradients of an earlier step, stale in every entry.
  const std::vector<float> nans(n, std::numeric_limits<float>::quiet_NaN());
  be->upload(stale.grads(), nans.data(), n);
  const std::vector<float> params_before = be->download_vector(std::as_const(stale).params(), n);
  AdamW opt(stale.layout(), train, *be);
  opt.step(stale.params(), stale.grads(), 0.0, 1.f, AdamW::Grads::ZeroExceptMatrices);
  stale.grads_were_zeroed(/*except_matrices=*/true);
  int64_t idle = 0;
  const std::vector<float> g = be->download_vector(std::as_const(stale).grads(), n);
  for (const auto& e : stale.layout().entries())
    for (int64_t i = 0; i < e.shape.numel(); ++i)
      ASSERT_EQ(e.kind == ParamKind::Matrix, std::isnan(g[e.offset + i])) << e.name;
  // The NaN gradients made the update NaN; only what it left in the gradient block is under test here.
  be->upload(stale.params(), params_before.data(), n);

  fresh.zero_grad();
  stale.zero_grad();
  fresh.forward(tokens.data(), targets.data(), B, 1.f);
  stale.forward(tokens.data(), targets.data(), B, 1.f);
  for (const auto& s : stale.moe_statistics()) idle += s.idle_experts;
  ASSERT_GE(idle, 8);  // the zero-row path is exercised
  fresh.backward();
  stale.backward();
  // The gradient norm takes the experts' weight gradients from the products that wrote them.
  const auto naive_sum_squares = [&](Transformer& model) {
    const std::vector<float> grads = be->download_vector(std::as_const(model).grads(), n);
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(grads[i]) * grads[i];
    return s;
  };
  const double fused = stale.grad_sum_squares();
  EXPECT_NEAR(fused, naive_sum_squares(stale), 1e-12 * fused);
  const auto grads_of = [&](const Transformer& model) { return be->download_vector(model.grads(), n); };
  {
    const std::vector<float> a = grads_of(fresh), b = grads_of(stale);
    for (const auto& e : fresh.layout().entries())
      ASSERT_EQ(0, std::memcmp(a.data() + e.offset, b.data() + e.offset, sizeof(float) * e.shape.numel())) << e.name;
  }

  // A second backward (gradient accumulation, other tokens: experts idle now had rows before) adds to the first.
  for (auto& t : tokens) t = static_cast<int32_t>(rng.below(m.vocab_size));
  fresh.forward(tokens.data(), targets.data(), B, 0.5f);
  stale.forward(tokens.data(), targets.data(), B, 0.5f);
  fresh.backward();
  stale.backward();
  const double fused2 = stale.grad_sum_squares();
  EXPECT_NE(fused2, fused);
  EXPECT_NEAR(fused2, naive_sum_squares(stale), 1e-12 * fused2);
  ASSERT_EQ(0, std::memcmp(grads_of(fresh).data(), grads_of(stale).data(), sizeof(float) * n));
}

}  // namespace
}  // namespace moelab
