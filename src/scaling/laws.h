#pragma once
// The parametric scaling laws moelab fits (docs/fitting.md, /work/shared/science.md):
//   chinchilla   L(N, D)    = E + A / N^alpha + B / D^beta                                  (Hoffmann et al. 2022)
//   granularity  L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta                  (Krajewski et al. 2024)
//   sparsity     L(N, D, S) = a / N^alpha + b / D^beta + c / (1-S)^lambda
//                             + d / ((1-S)^delta N^gamma) + e                               (Abnar et al. 2025, Eq. 6)
// Each is fitted in log space as log L = LSE(z_1, ..., z_k), one z per additive term, with every coefficient
// written as the exponential of a free parameter so it stays positive (Hoffmann's parametrisation: A = exp(a)).
// The fourth "law", isoflop, is a per-budget polynomial surface and lives in fit.h.
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace moelab {

enum class LawKind { Chinchilla, Granularity, Sparsity, Isoflop };

LawKind law_from_string(const std::string& name);  // throws Error naming the valid laws
std::string to_string(LawKind law);

// One training run's final result in the units the law takes: N parameters, D tokens, G granularity,
// S sparsity in [0, 1), C training FLOPs, L loss (nats per token).
struct Observation {
  double N = 0, D = 0, G = 1, S = 0, C = 0, L = 0;
};

struct LawSpec {
  LawKind kind;
  std::string name;
  std::vector<std::string> param_names;  // the fitted (internal, log-space) parameters, in theta order
  std::vector<std::string> columns;      // logical columns the fit needs: subsets of N D G S C L
  double default_huber_delta;            // on log-loss residuals
};
const LawSpec& law_spec(LawKind law);

// log of the predicted loss; with `grad` non-null also d(log L)/d(theta) (grad has param_names.size() slots).
// Not defined for Isoflop.
double law_log_loss(LawKind law, const double* theta, const Observation& x, double* grad = nullptr);
inline double law_loss(LawKind law, const std::vector<double>& theta, const Observation& x) {
  return std::exp(law_log_loss(law, theta.data(), x, nullptr));
}

// The paper's form of the coefficients and derived quantities, as (name, value) in a fixed order:
//   chinchilla: E, A, B, alpha, beta, a = beta/(alpha+beta) (N_opt ~ C^a), b = alpha/(alpha+beta), G
//   granularity: a, alpha, b, beta, g, gamma, c
//   sparsity: a, alpha, b, beta, c, lambda, d, delta, gamma, e
std::vector<std::pair<std::string, double>> law_coefficients(LawKind law, const std::vector<double>& theta);

// Internal theta from the paper's coefficients (the inverse of the first entries of law_coefficients):
//   chinchilla {E, A, B, alpha, beta}; granularity {a, alpha, b, beta, g, gamma, c};
//   sparsity {a, alpha, b, beta, c, lambda, d, delta, gamma, e}.
std::vector<double> law_theta_from_coefficients(LawKind law, const std::vector<double>& coefficients);

// The grid of L-BFGS starting points used by default (docs/fitting.md lists them).
std::vector<std::vector<double>> default_start_grid(LawKind law);

}  // namespace moelab
