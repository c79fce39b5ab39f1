// The CPU backend's MoE routing kernels (Backend::route, router_statistics, router_backward): router softmax,
// token-choice top-k with capacity, expert choice per position group, the sort-by-expert dispatch order, the
// router statistics and the router's gradient. Counting sorts and fixed loop orders only: results depend on the
// inputs alone.
#include "backend/cpu/routing.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "backend/cpu/vec_math.h"

namespace moelab::cpu {
namespace {

// probs = softmax(logits) rows, plus per-row logsumexp. fp32 exponentials (vec::fast_exp, a few ulp, vectorised;
// each taken once, kept in probs), summed in double.
void router_softmax(const float* logits, float* probs, float* lse, int64_t n, int64_t e) {
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

void mean_probs(const RouterShape& d, const float* probs, const RoutingState& r) {
  const int64_t n = d.tokens(), e = d.experts;
  std::fill(r.mean_prob, r.mean_prob + e, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < e; ++j) r.mean_prob[j] += probs[i * e + j];
  for (int64_t j = 0; j < e; ++j) r.mean_prob[j] /= static_cast<double>(n);
}

// Given `rows` row assignments (row_token/row_expert/row_weight, in any order), sorts them by expert (then token)
// and builds expert and token offsets. Returns where each row went: its index in the sorted order, by its index
// before. Pass 1: stable counting sort by token; pass 2: stable counting sort by expert => (expert, token) order.
std::vector<int32_t> build_dispatch(const RouterShape& d, int64_t rows, const RoutingState& r) {
  const int64_t n = d.tokens(), e = d.experts;
  std::vector<int64_t> count(std::max(n, e) + 1);
  std::vector<int32_t> by_token(rows), by_expert(rows);
  std::fill(count.begin(), count.end(), 0);
  for (int64_t q = 0; q < rows; ++q) ++count[r.row_token[q] + 1];
  for (int64_t i = 0; i < n; ++i) count[i + 1] += count[i];
  for (int64_t q = 0; q < rows; ++q) by_token[count[r.row_token[q]]++] = static_cast<int32_t>(q);
  std::fill(count.begin(), count.end(), 0);
  for (int64_t q = 0; q < rows; ++q) ++count[r.row_expert[q] + 1];
  for (int64_t x = 0; x < e; ++x) count[x + 1] += count[x];
  for (int64_t x = 0; x <= e; ++x) r.expert_offsets[x] = count[x];
  for (int32_t q : by_token) by_expert[count[r.row_expert[q]]++] = q;
  // Apply the permutation.
  std::vector<int32_t> token(rows), expert(rows);
  std::vector<float> weight(rows);
  for (int64_t s = 0; s < rows; ++s) {
    token[s] = r.row_token[by_expert[s]];
    expert[s] = r.row_expert[by_expert[s]];
    weight[s] = r.row_weight[by_expert[s]];
  }
  std::copy(token.begin(), token.end(), r.row_token);
  std::copy(expert.begin(), expert.end(), r.row_expert);
  std::copy(weight.begin(), weight.end(), r.row_weight);
  // Each token's rows, in row (= expert) order, for the combine.
  std::fill(r.token_offsets, r.token_offsets + n + 1, 0);
  for (int64_t s = 0; s < rows; ++s) ++r.token_offsets[token[s] + 1];
  for (int64_t i = 0; i < n; ++i) r.token_offsets[i + 1] += r.token_offsets[i];
  std::vector<int64_t> cursor(r.token_offsets, r.token_offsets + n);
  for (int64_t s = 0; s < rows; ++s) r.token_rows[cursor[token[s]]++] = static_cast<int32_t>(s);
  // Where each row went: position[q] = s for by_expert[s] = q.
  std::vector<int32_t> position(rows);
  for (int64_t s = 0; s < rows; ++s) position[by_expert[s]] = static_cast<int32_t>(s);
  return position;
}

void route_token_choice(const RouterShape& d, const float* probs, const RoutingState& r) {
  const int64_t n = d.tokens(), e = d.experts, k = d.top_k;
  // Top-k per token. Highest probability first, the lower expert index first among equals: one pass keeping the k
  // best in order.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* p = probs + i * e;
    int32_t* best = r.topk_expert + i * k;
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
  const int64_t capacity = d.capacity;
  std::vector<int64_t> load(e, 0);
  std::fill(r.assigned_fraction, r.assigned_fraction + e, 0.0);
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
      r.topk_row[i * k + j] = static_cast<int32_t>(rows);  // unsorted index, remapped after the dispatch sort
      r.row_token[rows] = static_cast<int32_t>(i);
      r.row_expert[rows] = ex;
      ++rows;
    }
  for (int64_t x = 0; x < e; ++x) r.assigned_fraction[x] /= static_cast<double>(n * k);
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
  std::copy(unsorted_weight.begin(), unsorted_weight.end(), r.row_weight);
  mean_probs(d, probs, r);
  const std::vector<int32_t> position = build_dispatch(d, rows, r);
  for (int64_t q = 0; q < n * k; ++q)  // each choice's row, from its unsorted index to its place in expert order
    if (r.topk_row[q] >= 0) r.topk_row[q] = position[r.topk_row[q]];
}

void route_expert_choice(const RouterShape& d, const float* probs, const RoutingState& r) {
  // Groups are positions: expert e picks, among the B tokens at position t (one per sequence), the c with the
  // highest probability. A token never competes with later tokens of its own sequence, so routing is causal.
  const int64_t B = d.batch, T = d.seq, e = d.experts, c = d.capacity;
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
  std::fill(r.assigned_fraction, r.assigned_fraction + e, 1.0 / static_cast<double>(e));
  mean_probs(d, probs, r);
  build_dispatch(d, rows, r);
}

}  // namespace

void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state) {
  router_softmax(logits, probs, state.lse, shape.tokens(), shape.experts);
  if (shape.expert_choice) route_expert_choice(shape, probs, state);
  else route_token_choice(shape, probs, state);
}

void router_statistics(const RouterShape& d, const float* logits, const float* probs, const RoutingState& r,
                       double* out) {
  const int64_t n = d.tokens(), E = d.experts;
  // -sum_e p log p with log p = logit - lse: lse - sum_e p * logit, without a logarithm per (token, expert).
  double entropy = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(probs[i * E + e]) * logits[i * E + e];
    entropy += r.lse[i] - dot;
    z += static_cast<double>(r.lse[i]) * r.lse[i];
  }
  out[kRouterEntropy] = entropy / static_cast<double>(n);
  out[kRouterZLoss] = z / static_cast<double>(n);
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) aux += r.assigned_fraction[e] * r.mean_prob[e];
  out[kRouterAuxLoss] = d.expert_choice ? 0.0 : static_cast<double>(E) * aux;
}

void router_backward(const RouterShape& d, float* dlogits, const float* probs, const float* dweight,
                     const RoutingState& r, float aux_scale, float z_scale) {
  const int64_t n = d.tokens(), E = d.experts, K = d.top_k;
  std::fill(dlogits, dlogits + n * E, 0.f);
  if (!d.expert_choice) {
    for (int64_t i = 0; i < n; ++i) {
      float* dp = dlogits + i * E;
      if (d.renormalize) {
        // w_j = p_j / S over the k selected: dL/dp_j = (dL/dw_j - sum_q dL/dw_q w_q) / S
        float denom = 0, dot = 0;
        for (int64_t j = 0; j < K; ++j) denom += r.topk_prob[i * K + j];
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dot += dweight[row] * r.topk_prob[i * K + j] / denom;
        }
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          dp[r.topk_expert[i * K + j]] += ((row >= 0 ? dweight[row] : 0.f) - dot) / denom;
        }
      } else {
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dp[r.topk_expert[i * K + j]] += dweight[row];
        }
      }
    }
    if (aux_scale != 0.f) {
      // aux = E * sum_e f_e * mean_i p_ie, with f_e treated as a constant (it is a count).
      for (int64_t e = 0; e < E; ++e) {
        const float g_aux = static_cast<float>(aux_scale * E * r.assigned_fraction[e] / n);
        for (int64_t i = 0; i < n; ++i) dlogits[i * E + e] += g_aux;
      }
    }
  } else {
    const int64_t rows = r.expert_offsets[E];
    for (int64_t q = 0; q < rows; ++q) dlogits[r.row_token[q] * E + r.row_expert[q]] += dweight[q];
  }
  for (int64_t i = 0; i < n; ++i) {
    float* dl = dlogits + i * E;
    const float* p = probs + i * E;
    float dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += dl[e] * p[e];
    for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dl[e] - dot) + z_scale * r.lse[i] * p[e];
  }
}

}  // namespace moelab::cpu
