// Routers: probabilities in fp32 (double accumulators), top-k selection with ties broken towards the lower
// index, capacity applied in (choice rank, token) order so first choices win over second choices (GShard).
#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cpu/vec_math.h"
#include "core/error.h"
#include "moe/moe.h"

namespace moelab {

MoeDims MoeDims::from(const ModelConfig& m, int64_t batch) {
  MoeDims d;
  d.batch = batch;
  d.seq = m.seq_len;
  d.d_model = m.d_model;
  d.experts = m.moe.routed_experts();
  d.top_k = m.moe.active_experts();
  d.expert_hidden = m.expert_hidden();
  d.shared_hidden = m.moe.shared_experts * m.expert_hidden();
  d.ffn = m.ffn;
  d.router = m.moe.router;
  d.capacity_factor = m.moe.capacity_factor;
  d.renormalize = m.moe.renormalize;
  d.bias = m.bias;
  d.aux_loss_weight = static_cast<float>(m.moe.aux_loss_weight);
  d.z_loss_weight = static_cast<float>(m.moe.z_loss_weight);
  d.expert_grad_scale = m.moe.expert_grad_scale;
  return d;
}

int64_t MoeDims::token_choice_capacity() const {
  if (capacity_factor <= 0) return 0;
  return static_cast<int64_t>(std::ceil(capacity_factor * tokens() * top_k / static_cast<double>(experts)));
}

int64_t MoeDims::expert_choice_capacity() const {
  const double cf = capacity_factor > 0 ? capacity_factor : 1.0;
  const int64_t c = std::llround(cf * batch * top_k / static_cast<double>(experts));
  return std::clamp<int64_t>(c, 1, batch);
}

int64_t MoeDims::max_rows() const {
  if (router == RouterKind::TokenChoice) return tokens() * top_k;
  return experts * expert_choice_capacity() * seq;
}

void Routing::reserve(const MoeDims& d) {
  const int64_t r = d.max_rows(), n = d.tokens(), e = d.experts, k = d.top_k;
  row_token.resize(r);
  row_expert.resize(r);
  row_weight.resize(r);
  expert_offsets.resize(e + 1);
  token_offsets.resize(n + 1);
  token_rows.resize(r);
  topk_expert.resize(n * k);
  topk_prob.resize(n * k);
  topk_row.resize(n * k);
  lse.resize(n);
  assigned_fraction.resize(e);
  mean_prob.resize(e);
}

void router_softmax(const float* logits, float* probs, float* lse, int64_t n, int64_t e) {
  // fp32 exponentials (vec::fast_exp, a few ulp, vectorised; each taken once, kept in probs), summed in double.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits + i * e;
    float* p = probs + i * e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < e; ++j) mx = std::max(mx, z[j]);
    for (int64_t j = 0; j < e; ++j) p[j] = vec::fast_exp(z[j] - mx);
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) sum += p[j];
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < e; ++j) p[j] *= inv;
    lse[i] = static_cast<float>(mx + std::log(sum));
  }
}

namespace {

void mean_probs(const MoeDims& d, const float* probs, Routing& r) {
  const int64_t n = d.tokens(), e = d.experts;
  std::fill(r.mean_prob.begin(), r.mean_prob.end(), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < e; ++j) r.mean_prob[j] += probs[i * e + j];
  for (auto& p : r.mean_prob) p /= static_cast<double>(n);
}

}  // namespace

void route_token_choice(const MoeDims& d, const float* probs, Routing& r) {
  const int64_t n = d.tokens(), e = d.experts, k = d.top_k;
  // Top-k per token.
  // Highest probability first, the lower expert index first among equals: one pass keeping the k best in order.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* p = probs + i * e;
    int32_t* best = r.topk_expert.data() + i * k;
    int64_t kept = 0;
    for (int32_t x = 0; x < e; ++x) {
      if (kept == k && !(p[x] > p[best[k - 1]])) continue;  // an equal later index never displaces
      int64_t pos = kept < k ? kept++ : k - 1;
      while (pos > 0 && p[x] > p[best[pos - 1]]) {
        best[pos] = best[pos - 1];
        --pos;
      }
      best[pos] = x;
    }
    for (int64_t j = 0; j < k; ++j) r.topk_prob[i * k + j] = p[best[j]];
  }
  // Capacity, in (rank, token) order: every token's first choice is served before any second choice.
  const int64_t capacity = d.token_choice_capacity();
  std::vector<int64_t> load(e, 0);
  std::fill(r.assigned_fraction.begin(), r.assigned_fraction.end(), 0.0);
  int64_t rows = 0;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t ex = r.topk_expert[i * k + j];
      r.assigned_fraction[ex] += 1.0;
      if (capacity > 0 && load[ex] >= capacity) {
        r.topk_row[i * k + j] = -1;
        continue;
      }
      ++load[ex];
      r.topk_row[i * k + j] = static_cast<int32_t>(rows);  // unsorted index, remapped by build_dispatch
      r.row_token[rows] = static_cast<int32_t>(i);
      r.row_expert[rows] = ex;
      ++rows;
    }
  for (auto& f : r.assigned_fraction) f /= static_cast<double>(n * k);
  r.rows = rows;
  // Gate weights: the selected probabilities, optionally renormalised over the k selected (dropped included).
  std::vector<float> unsorted_weight(rows);
  for (int64_t i = 0; i < n; ++i) {
    float denom = 1.f;
    if (d.renormalize) {
      denom = 0.f;
      for (int64_t j = 0; j < k; ++j) denom += r.topk_prob[i * k + j];
    }
    for (int64_t j = 0; j < k; ++j)
      if (r.topk_row[i * k + j] >= 0) unsorted_weight[r.topk_row[i * k + j]] = r.topk_prob[i * k + j] / denom;
  }
  std::copy(unsorted_weight.begin(), unsorted_weight.end(), r.row_weight.begin());
  mean_probs(d, probs, r);
  const std::vector<int32_t> position = build_dispatch(d, r);
  for (int64_t q = 0; q < n * k; ++q)  // each choice's row, from its unsorted index to its place in expert order
    if (r.topk_row[q] >= 0) r.topk_row[q] = position[r.topk_row[q]];
}

void route_expert_choice(const MoeDims& d, const float* probs, Routing& r) {
  // Groups are positions: expert e picks, among the B tokens at position t (one per sequence), the c with the
  // highest probability. A token never competes with later tokens of its own sequence, so routing is causal.
  const int64_t B = d.batch, T = d.seq, e = d.experts, c = d.expert_choice_capacity();
  std::vector<int32_t> order(B);
  int64_t rows = 0;
  for (int64_t ex = 0; ex < e; ++ex)
    for (int64_t t = 0; t < T; ++t) {
      std::iota(order.begin(), order.end(), 0);
      auto score = [&](int32_t b) { return probs[(b * T + t) * e + ex]; };
      std::partial_sort(order.begin(), order.begin() + c, order.end(), [&](int32_t a, int32_t b) {
        return score(a) > score(b) || (score(a) == score(b) && a < b);
      });
      for (int64_t j = 0; j < c; ++j) {
        const int64_t token = order[j] * T + t;
        r.row_token[rows] = static_cast<int32_t>(token);
        r.row_expert[rows] = static_cast<int32_t>(ex);
        r.row_weight[rows] = probs[token * e + ex];
        ++rows;
      }
    }
  r.rows = rows;
  std::fill(r.assigned_fraction.begin(), r.assigned_fraction.end(), 1.0 / static_cast<double>(e));
  mean_probs(d, probs, r);
  build_dispatch(d, r);
}

}  // namespace moelab
