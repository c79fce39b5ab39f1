#pragma once
// The parametric scaling laws moelab fits (docs/fitting.md, /work/shared/science.md):
//   chinchilla   L(N, D)    = E + A / N^alpha + B / D^beta                                  (Hoffmann et al. 2022)
//   granularity  L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta                  (Krajewski et al. 2024)
//   sparsity     L(N, D, S) = a / N^alpha + b / D^beta + c / (1-S)^lambda
//                             + d / ((1-S)^delta N^gamma) + e                               (Abnar et al. 2025, Eq. 6)
//   joint        L(N_a, D, E) = a Ê^delta / N_a^(alpha + gamma ln Ê) + b Ê^omega / D^(beta + zeta ln Ê) + c
//                                                                          (Ludziejewski et al. 2025, Eq. 4)
//   clark        log10 L(N_a, E) = a log10 N_a + b log10 Ê + c log10 N_a log10 Ê + d        (Clark et al. 2022)
// where Ê is the saturating expert count 1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max (Ê = E_start for a
// dense model, E = 1; Ê -> E_max for many experts), E_start and E_max fitted.
// Each is fitted in log space as log L = LSE(z_1, ..., z_k), one z per additive term, with every coefficient
// written as the exponential of a free parameter so it stays positive (Hoffmann's parametrisation: A = exp(a)).
// The fourth "law", isoflop, is a per-budget polynomial surface and lives in fit.h.
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace moelab {

enum class LawKind { Chinchilla, Granularity, Sparsity, Isoflop, Joint, Clark };

LawKind law_from_string(const std::string& name);  // throws Error naming the valid laws
std::string to_string(LawKind law);

// One training run's final result in the units the law takes: N parameters, D tokens, G granularity,
// S sparsity in [0, 1), C training FLOPs, L loss (nats per token), A active parameters, E routed experts (1: dense).
struct Observation {
  double N = 0, D = 0, G = 1, S = 0, C = 0, L = 0, A = 0, E = 1;
};

// The saturating expert count Ê(E; E_start, E_max) and d ln Ê / d(log E_start), d ln Ê / d(log (E_max - E_start)).
double saturated_experts(double E, double log_e_start, double log_e_gap, double* dlog_start = nullptr,
                         double* dlog_gap = nullptr);

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
//   joint: a, alpha, delta, gamma, b, beta, omega, zeta, c, E_start, E_max (this file's signs: the paper's alpha,
//          beta are negative, its gamma, zeta the opposite of these)
//   clark: a, b, c, d, E_start, E_max
std::vector<std::pair<std::string, double>> law_coefficients(LawKind law, const std::vector<double>& theta);

// Internal theta from the paper's coefficients (the inverse of the first entries of law_coefficients):
//   chinchilla {E, A, B, alpha, beta}; granularity {a, alpha, b, beta, g, gamma, c};
//   sparsity {a, alpha, b, beta, c, lambda, d, delta, gamma, e}; joint {a, alpha, delta, gamma, b, beta, omega,
//   zeta, c, E_start, E_max}; clark {a, b, c, d, E_start, E_max}.
std::vector<double> law_theta_from_coefficients(LawKind law, const std::vector<double>& coefficients);

// The grid of L-BFGS starting points used by default (docs/fitting.md lists them).
std::vector<std::vector<double>> default_start_grid(LawKind law);

}  // namespace moelab
