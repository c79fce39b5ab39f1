#include "scaling/suggest.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/rng.h"
#include "scaling/optimize.h"

namespace moelab {

std::vector<double> log_optimum_per_member(LawKind law, const std::vector<std::vector<double>>& thetas, double C,
                                           double expansion, double max_sparsity, double max_experts) {
  std::vector<double> out;
  for (const auto& t : thetas) {
    double n = std::nan("");
    try {
      switch (law) {
        case LawKind::Chinchilla: n = chinchilla_optimum(t, C).N; break;
        case LawKind::Granularity: n = granularity_optimum(t, C, expansion).N; break;
        case LawKind::Sparsity: n = sparsity_optimum(t, C, max_sparsity).N; break;
        case LawKind::Joint: n = joint_optimum(t, C, max_experts).N; break;
        default:
          throw Error("suggest needs a law with a compute optimum (chinchilla, granularity, sparsity, joint), not " +
                      to_string(law));
      }
    } catch (const Error&) {
      if (law == LawKind::Clark || law == LawKind::Isoflop) throw;
    }
    out.push_back(n > 0 && std::isfinite(n) ? std::log(n) : std::nan(""));
  }
  return out;
}

namespace {

// Variance of `v` under log-weights `lw` (members with NaN v left out).
double weighted_variance(const std::vector<double>& v, const std::vector<double>& lw) {
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t b = 0; b < v.size(); ++b)
    if (std::isfinite(v[b])) mx = std::max(mx, lw[b]);
  double sw = 0, s1 = 0, s2 = 0;
  for (size_t b = 0; b < v.size(); ++b) {
    if (!std::isfinite(v[b])) continue;
    const double w = std::exp(lw[b] - mx);
    sw += w, s1 += w * v[b], s2 += w * v[b] * v[b];
  }
  if (sw <= 0) return 0;
  const double m = s1 / sw;
  return std::max(0.0, s2 / sw - m * m);
}

}  // namespace

std::vector<Suggestion> suggest_runs(LawKind law, const std::vector<std::vector<double>>& thetas,
                                     const std::vector<double>& target, const std::vector<Candidate>& candidates,
                                     const SuggestOptions& o) {
  const size_t B = thetas.size(), M = candidates.size();
  if (B < 10) throw Error("suggest needs the fit's bootstrap (at least 10 resamples; fit with --bootstrap 50)");
  if (M == 0) throw Error("suggest has no candidate runs within the FLOP limits");
  if (!(o.noise > 0)) throw Error("suggest: the outcome noise must be positive");
  // Predictions of every member at every candidate (log L).
  std::vector<std::vector<double>> pred(M, std::vector<double>(B));
  for (size_t m = 0; m < M; ++m)
    for (size_t b = 0; b < B; ++b) pred[m][b] = law_log_loss(law, thetas[b].data(), candidates[m].x);
  // Scenarios: the member playing the truth, the running log-weights, a fixed noise draw per candidate.
  const int R = o.scenarios;
  Rng rng(o.seed);
  std::vector<size_t> truth(R);
  std::vector<std::vector<double>> lw(R, std::vector<double>(B, 0.0));
  std::vector<std::vector<double>> eps(R, std::vector<double>(M));
  for (int r = 0; r < R; ++r) {
    do truth[r] = rng.below(B);
    while (!std::isfinite(target[truth[r]]));
    for (size_t m = 0; m < M; ++m) eps[r][m] = rng.normal();
  }
  const double inv2s2 = 1.0 / (2 * o.noise * o.noise);
  auto updated = [&](int r, size_t m) {
    std::vector<double> w = lw[r];
    const double y = pred[m][truth[r]] + o.noise * eps[r][m];
    for (size_t b = 0; b < B; ++b) w[b] -= (pred[m][b] - y) * (pred[m][b] - y) * inv2s2;
    return w;
  };
  auto expected_var = [&](const std::vector<std::vector<double>>& weights) {
    double v = 0;
    for (int r = 0; r < R; ++r) v += weighted_variance(target, weights[r]);
    return v / R;
  };
  std::vector<Suggestion> out;
  std::vector<bool> taken(M, false);
  double spent = 0;
  for (int k = 0; k < o.count; ++k) {
    const double now = expected_var(lw);
    double best_score = -std::numeric_limits<double>::infinity(), best_after = now;
    size_t best = M;
    for (size_t m = 0; m < M; ++m) {
      if (taken[m]) continue;
      const double cost = candidates[m].flops;
      if (o.max_flops > 0 && cost > o.max_flops * (1 + 1e-9)) continue;
      if (o.total_flops > 0 && spent + cost > o.total_flops * (1 + 1e-9)) continue;
      double after = 0;
      for (int r = 0; r < R; ++r) after += weighted_variance(target, updated(r, m));
      after /= R;
      const double score = (now - after) / cost;
      if (score > best_score) best_score = score, best = m, best_after = after;
    }
    if (best == M) break;  // nothing fits the remaining FLOPs
    taken[best] = true;
    spent += candidates[best].flops;
    for (int r = 0; r < R; ++r) lw[r] = updated(r, best);
    Suggestion s;
    s.candidate = best;
    s.flops = candidates[best].flops;
    double mean = 0;
    for (size_t b = 0; b < B; ++b) mean += std::exp(pred[best][b]);
    s.predicted_loss = mean / B;
    s.sd_before = std::sqrt(now);
    s.sd_after = std::sqrt(best_after);
    out.push_back(s);
  }
  return out;
}

}  // namespace moelab
