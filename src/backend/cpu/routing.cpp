// The CPU backend's MoE routing kernels (Backend::route, router_statistics, router_backward): router softmax or
// sigmoid scores, token-choice top-k (with a selection bias) and capacity, expert choice per position group, the
// sort-by-expert dispatch order, the router statistics and the router's gradient. Counting sorts and fixed loop orders only: results depend on the
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

// Sigmoid scores s = 1 / (1 + exp(-z)), plus per-row logsumexp of the logits (the z-loss's), summed in double.
void router_sigmoid(const float* logits, float* scores, float* lse, int64_t n, int64_t e) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits + i * e;
    float* s = scores + i * e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < e; ++j) mx = std::max(mx, z[j]);
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) sum += std::exp(static_cast<double>(z[j] - mx));
    for (int64_t j = 0; j < e; ++j) s[j] = 1.f / (1.f + std::exp(-z[j]));
    lse[i] = static_cast<float>(mx + std::log(sum));
  }
}

// 1 / sum_e s_ie for sigmoid scores (the factor normalising token i's scores into probabilities), 1 for a softmax.
inline float prob_norm(const RouterShape& d, const float* probs, int64_t i) {
  if (!d.sigmoid) return 1.f;
  double sum = 0;
  for (int64_t j = 0; j < d.experts; ++j) sum += probs[i * d.experts + j];
  return static_cast<float>(1.0 / sum);
}

// P_e: the mean over tokens of the router probabilities (the softmax, or the normalised sigmoid scores).
void mean_probs(const RouterShape& d, const float* probs, const RoutingState& r) {
  const int64_t n = d.tokens(), e = d.experts;
  std::fill(r.mean_prob, r.mean_prob + e, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float inv = prob_norm(d, probs, i);
    for (int64_t j = 0; j < e; ++j) r.mean_prob[j] += probs[i * e + j] * inv;
  }
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
  // Top-k per token by score (plus the selection bias). Highest first, the lower expert index first among equals:
  // one pass keeping the k best in order.
  const float* bias = r.selection_bias;
  std::vector<float> keys(bias ? static_cast<size_t>(n * e) : 0);
  if (bias)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t x = 0; x < e; ++x) keys[i * e + x] = probs[i * e + x] + bias[x];
  const float* key_base = bias ? keys.data() : probs;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* p = key_base + i * e;
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
    for (int64_t j = 0; j < k; ++j) r.topk_prob[i * k + j] = probs[i * e + best[j]];
  }
  // Capacity, in (rank, token) order: every token's first choice is served before any second choice.
  const int64_t capacity = d.capacity;
  std::vector<int64_t> load(e, 0);
  std::fill(r.assigned_fraction, r.assigned_fraction + e, 0.0);
  std::fill(r.seq_fraction, r.seq_fraction + d.batch * e, 0.0);
  int64_t rows = 0;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t ex = r.topk_expert[i * k + j];
      r.assigned_fraction[ex] += 1.0;
      r.seq_fraction[(i / d.seq) * e + ex] += 1.0;
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
  for (int64_t x = 0; x < d.batch * e; ++x) r.seq_fraction[x] /= static_cast<double>(d.seq * k);
  // Gate weights: the selected scores, renormalised over the k selected (dropped included) when asked or with
  // sigmoid scores, times the gate scale.
  std::vector<float> unsorted_weight(rows);
  const bool normalise = d.renormalize || d.sigmoid;
  for (int64_t i = 0; i < n; ++i) {
    float denom = 1.f;
    if (normalise) {
      denom = 0.f;
      for (int64_t j = 0; j < k; ++j) denom += r.topk_prob[i * k + j];
    }
    for (int64_t j = 0; j < k; ++j)
      if (r.topk_row[i * k + j] >= 0)
        unsorted_weight[r.topk_row[i * k + j]] = r.topk_prob[i * k + j] / denom * d.gate_scale;
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
        r.row_weight[rows] = probs[token * e + ex] * d.gate_scale;
        ++rows;
      }
    }
  std::fill(r.assigned_fraction, r.assigned_fraction + e, 1.0 / static_cast<double>(e));
  mean_probs(d, probs, r);
  build_dispatch(d, rows, r);
}

}  // namespace

void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state) {
  if (shape.sigmoid) router_sigmoid(logits, probs, state.lse, shape.tokens(), shape.experts);
  else router_softmax(logits, probs, state.lse, shape.tokens(), shape.experts);
  if (shape.expert_choice) route_expert_choice(shape, probs, state);
  else route_token_choice(shape, probs, state);
}

void router_statistics(const RouterShape& d, const float* logits, const float* probs, const RoutingState& r,
                       double* out) {
  const int64_t n = d.tokens(), E = d.experts;
  double entropy = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!d.sigmoid) {
      // -sum_e p log p with log p = logit - lse: lse - sum_e p * logit, without a logarithm per (token, expert).
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(probs[i * E + e]) * logits[i * E + e];
      entropy += r.lse[i] - dot;
    } else {
      // of the normalised scores p = s / S: log S - sum_e s log s / S
      double sum = 0, slogs = 0;
      for (int64_t e = 0; e < E; ++e) {
        const double s = probs[i * E + e];
        sum += s;
        if (s > 0) slogs += s * std::log(s);
      }
      entropy += std::log(sum) - slogs / sum;
    }
    z += static_cast<double>(r.lse[i]) * r.lse[i];
  }
  out[kRouterEntropy] = entropy / static_cast<double>(n);
  out[kRouterZLoss] = z / static_cast<double>(n);
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) aux += r.assigned_fraction[e] * r.mean_prob[e];
  out[kRouterAuxLoss] = d.expert_choice ? 0.0 : static_cast<double>(E) * aux;
  // Sequence-level: per sequence b, E * sum_e f_be P_be with P_be the mean probability over its T tokens.
  double seq_aux = 0;
  if (!d.expert_choice) {
    std::vector<double> mean(E);
    for (int64_t b = 0; b < d.batch; ++b) {
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t t = 0; t < d.seq; ++t) {
        const int64_t i = b * d.seq + t;
        const float inv = prob_norm(d, probs, i);
        for (int64_t e = 0; e < E; ++e) mean[e] += probs[i * E + e] * inv;
      }
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += r.seq_fraction[b * E + e] * mean[e] / static_cast<double>(d.seq);
      seq_aux += static_cast<double>(E) * sum;
    }
    seq_aux /= static_cast<double>(d.batch);
  }
  out[kRouterSeqAuxLoss] = seq_aux;
}

void router_backward(const RouterShape& d, float* dlogits, const float* logits, const float* probs,
                     const float* dweight, const RoutingState& r, const RouterLossScales& scales) {
  const int64_t n = d.tokens(), E = d.experts, K = d.top_k;
  const bool normalise = d.renormalize || d.sigmoid;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* dg = dlogits + i * E;  // first d loss / d scores through the gate weights, then d loss / d logits
    std::fill(dg, dg + E, 0.f);
    if (!d.expert_choice) {
      if (normalise) {
        // w_j = g p_j / S over the k selected: dL/dp_j = g (dL/dw_j - sum_q dL/dw_q w_q / g) / S
        float denom = 0, dot = 0;
        for (int64_t j = 0; j < K; ++j) denom += r.topk_prob[i * K + j];
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dot += dweight[row] * r.topk_prob[i * K + j] / denom;
        }
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          dg[r.topk_expert[i * K + j]] += d.gate_scale * ((row >= 0 ? dweight[row] : 0.f) - dot) / denom;
        }
      } else {
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dg[r.topk_expert[i * K + j]] += d.gate_scale * dweight[row];
        }
      }
    } else {
      for (int64_t j = r.token_offsets[i]; j < r.token_offsets[i + 1]; ++j) {
        const int32_t q = r.token_rows[j];
        dg[r.row_expert[q]] += d.gate_scale * dweight[q];
      }
    }
    // The balancing losses' gradient with respect to the probabilities p (f_e, f_be are counts: constants):
    // aux = E sum_e f_e mean_i p_ie, seq_aux = mean_b E sum_e f_be mean_{i in b} p_ie; both E f / N per entry.
    const bool aux = !d.expert_choice && (scales.aux != 0.f || scales.seq_aux != 0.f);
    const float* p = probs + i * E;
    const double* seq_f = r.seq_fraction + (i / d.seq) * E;
    const auto da = [&](int64_t e) {
      return static_cast<float>(static_cast<double>(E) / static_cast<double>(n) *
                                (scales.aux * r.assigned_fraction[e] + scales.seq_aux * seq_f[e]));
    };
    const float z_lse = scales.z * r.lse[i];
    if (!d.sigmoid) {
      // softmax: dp = dg + da; dlogits = p (dp - p . dp) + z_scale lse p
      if (aux)
        for (int64_t e = 0; e < E; ++e) dg[e] += da(e);
      float dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += dg[e] * p[e];
      for (int64_t e = 0; e < E; ++e) dg[e] = p[e] * (dg[e] - dot) + z_lse * p[e];
    } else {
      // sigmoid: p = s / S, so ds = dg + (da - p . da) / S; dlogits = s (1 - s) ds + z_scale lse softmax(logits)
      const float inv = prob_norm(d, probs, i);
      if (aux) {
        float dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += da(e) * p[e] * inv;
        for (int64_t e = 0; e < E; ++e) dg[e] += (da(e) - dot) * inv;
      }
      const float* z = logits + i * E;
      for (int64_t e = 0; e < E; ++e)
        dg[e] = p[e] * (1.f - p[e]) * dg[e] + (z_lse != 0.f ? z_lse * std::exp(z[e] - r.lse[i]) : 0.f);
    }
  }
}

}  // namespace moelab::cpu
