#include "scaling/laws.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "core/error.h"

namespace moelab {
namespace {

// log(sum exp z_k) and the softmax weights w_k = d LSE / d z_k.
template <size_t K>
double log_sum_exp(const std::array<double, K>& z, std::array<double, K>& w) {
  const double m = *std::max_element(z.begin(), z.end());
  double s = 0;
  for (size_t k = 0; k < K; ++k) {
    w[k] = std::exp(z[k] - m);
    s += w[k];
  }
  for (size_t k = 0; k < K; ++k) w[k] /= s;
  return m + std::log(s);
}

const LawSpec kChinchilla{LawKind::Chinchilla, "chinchilla", {"a", "b", "e", "alpha", "beta"}, {"N", "D", "L"}, 1e-3};
const LawSpec kGranularity{LawKind::Granularity,
                           "granularity",
                           {"log_a", "log_g", "log_b", "log_c", "alpha", "beta", "gamma"},
                           {"N", "D", "G", "L"},
                           0.1};
const LawSpec kSparsity{LawKind::Sparsity,
                        "sparsity",
                        {"log_a", "alpha", "log_b", "beta", "log_c", "lambda", "log_d", "delta", "gamma", "log_e"},
                        {"N", "D", "S", "L"},
                        1e-3};
const LawSpec kIsoflop{LawKind::Isoflop, "isoflop", {}, {"N", "S", "C", "L"}, 0.0};
const LawSpec kJoint{LawKind::Joint,
                     "joint",
                     {"log_a", "alpha", "delta", "gamma", "log_b", "beta", "omega", "zeta", "log_c", "log_e_start",
                      "log_e_gap"},
                     {"A", "D", "E", "L"},
                     1e-2};
const LawSpec kClark{LawKind::Clark, "clark", {"a", "b", "c", "d", "log_e_start", "log_e_gap"}, {"A", "E", "L"}, 1e-2};

// Cartesian product of per-parameter value lists, first parameter slowest.
std::vector<std::vector<double>> product(const std::vector<std::vector<double>>& axes) {
  std::vector<std::vector<double>> out{{}};
  for (const auto& axis : axes) {
    std::vector<std::vector<double>> next;
    next.reserve(out.size() * axis.size());
    for (const auto& prefix : out)
      for (double v : axis) {
        auto p = prefix;
        p.push_back(v);
        next.push_back(std::move(p));
      }
    out = std::move(next);
  }
  return out;
}

std::vector<double> range(double lo, double hi, double step) {
  std::vector<double> v;
  for (double x = lo; x <= hi + 1e-9; x += step) v.push_back(x);
  return v;
}

}  // namespace

LawKind law_from_string(const std::string& name) {
  if (name == "chinchilla") return LawKind::Chinchilla;
  if (name == "granularity") return LawKind::Granularity;
  if (name == "sparsity") return LawKind::Sparsity;
  if (name == "isoflop") return LawKind::Isoflop;
  if (name == "joint") return LawKind::Joint;
  if (name == "clark") return LawKind::Clark;
  throw Error("unknown scaling law '" + name + "'; use one of chinchilla, granularity, sparsity, isoflop, joint, clark");
}

std::string to_string(LawKind law) { return law_spec(law).name; }

const LawSpec& law_spec(LawKind law) {
  switch (law) {
    case LawKind::Chinchilla: return kChinchilla;
    case LawKind::Granularity: return kGranularity;
    case LawKind::Sparsity: return kSparsity;
    case LawKind::Isoflop: return kIsoflop;
    case LawKind::Joint: return kJoint;
    case LawKind::Clark: return kClark;
  }
  throw Error("unknown law");
}

double saturated_experts(double E, double log_e_start, double log_e_gap, double* dlog_start, double* dlog_gap) {
  // E_max = E_start + g keeps E_max > E_start; K = (1/E_start - 1/E_max)^-1 = E_start E_max / g.
  const double es = std::exp(log_e_start), g = std::exp(log_e_gap), em = es + g;
  const double K = es * es / g + es, P = E - 1 + K;
  const double inv = 1 / P + 1 / em, hat = 1 / inv;
  if (dlog_start) *dlog_start = -hat * (-(2 * es / g + 1) / (P * P) - 1 / (em * em)) * es;
  if (dlog_gap) *dlog_gap = -hat * ((es * es / (g * g)) / (P * P) - 1 / (em * em)) * g;
  return hat;
}

double law_log_loss(LawKind law, const double* t, const Observation& x, double* grad) {
  const double log_n = std::log(x.N), log_d = std::log(x.D);
  switch (law) {
    case LawKind::Chinchilla: {
      // theta = (a, b, e, alpha, beta): log L = LSE(a - alpha log N, b - beta log D, e)
      std::array<double, 3> z{t[0] - t[3] * log_n, t[1] - t[4] * log_d, t[2]}, w;
      const double v = log_sum_exp(z, w);
      if (grad) {
        grad[0] = w[0];
        grad[1] = w[1];
        grad[2] = w[2];
        grad[3] = -w[0] * log_n;
        grad[4] = -w[1] * log_d;
      }
      return v;
    }
    case LawKind::Granularity: {
      // theta = (log a, log g, log b, log c, alpha, beta, gamma):
      // log L = LSE(log g - gamma log G - alpha log N, log a - alpha log N, log b - beta log D, log c)
      const double log_g = std::log(x.G);
      std::array<double, 4> z{t[1] - t[6] * log_g - t[4] * log_n, t[0] - t[4] * log_n, t[2] - t[5] * log_d, t[3]}, w;
      const double v = log_sum_exp(z, w);
      if (grad) {
        grad[0] = w[1];
        grad[1] = w[0];
        grad[2] = w[2];
        grad[3] = w[3];
        grad[4] = -(w[0] + w[1]) * log_n;
        grad[5] = -w[2] * log_d;
        grad[6] = -w[0] * log_g;
      }
      return v;
    }
    case LawKind::Sparsity: {
      // theta = (log a, alpha, log b, beta, log c, lambda, log d, delta, gamma, log e), u = log(1 - S):
      // log L = LSE(log a - alpha log N, log b - beta log D, log c - lambda u, log d - delta u - gamma log N, log e)
      const double u = std::log1p(-x.S);
      std::array<double, 5> z{t[0] - t[1] * log_n, t[2] - t[3] * log_d, t[4] - t[5] * u,
                              t[6] - t[7] * u - t[8] * log_n, t[9]},
          w;
      const double v = log_sum_exp(z, w);
      if (grad) {
        grad[0] = w[0];
        grad[1] = -w[0] * log_n;
        grad[2] = w[1];
        grad[3] = -w[1] * log_d;
        grad[4] = w[2];
        grad[5] = -w[2] * u;
        grad[6] = w[3];
        grad[7] = -w[3] * u;
        grad[8] = -w[3] * log_n;
        grad[9] = w[4];
      }
      return v;
    }
    case LawKind::Joint: {
      // theta = (log a, alpha, delta, gamma, log b, beta, omega, zeta, log c, log E_start, log(E_max - E_start)),
      // u = ln Ê, n = ln N_a: log L = LSE(log a + delta u - (alpha + gamma u) n, log b + omega u - (beta + zeta u)
      // ln D, log c)
      double du_s, du_g;
      const double u = std::log(saturated_experts(x.E, t[9], t[10], &du_s, &du_g)), n = std::log(x.A);
      std::array<double, 3> z{t[0] + t[2] * u - (t[1] + t[3] * u) * n, t[4] + t[6] * u - (t[5] + t[7] * u) * log_d,
                              t[8]},
          w;
      const double v = log_sum_exp(z, w);
      if (grad) {
        grad[0] = w[0];
        grad[1] = -w[0] * n;
        grad[2] = w[0] * u;
        grad[3] = -w[0] * u * n;
        grad[4] = w[1];
        grad[5] = -w[1] * log_d;
        grad[6] = w[1] * u;
        grad[7] = -w[1] * u * log_d;
        grad[8] = w[2];
        const double dz_du = w[0] * (t[2] - t[3] * n) + w[1] * (t[6] - t[7] * log_d);
        grad[9] = dz_du * du_s;
        grad[10] = dz_du * du_g;
      }
      return v;
    }
    case LawKind::Clark: {
      // theta = (a, b, c, d, log E_start, log(E_max - E_start)): ln L = ln 10 (a lg N + b lg Ê + c lg N lg Ê + d)
      //                                                              = a ln N + b ln Ê + c ln N ln Ê / ln 10 + d ln 10
      constexpr double kLn10 = 2.302585092994046;
      double du_s, du_g;
      const double u = std::log(saturated_experts(x.E, t[4], t[5], &du_s, &du_g)), n = std::log(x.A);
      if (grad) {
        grad[0] = n;
        grad[1] = u;
        grad[2] = n * u / kLn10;
        grad[3] = kLn10;
        const double dv_du = t[1] + t[2] * n / kLn10;
        grad[4] = dv_du * du_s;
        grad[5] = dv_du * du_g;
      }
      return t[0] * n + t[1] * u + t[2] * n * u / kLn10 + t[3] * kLn10;
    }
    case LawKind::Isoflop: break;
  }
  throw Error("the isoflop law is a per-budget surface, not a parametric law of (N, D)");
}

std::vector<std::pair<std::string, double>> law_coefficients(LawKind law, const std::vector<double>& t) {
  switch (law) {
    case LawKind::Chinchilla: {
      const double alpha = t[3], beta = t[4], A = std::exp(t[0]), B = std::exp(t[1]);
      const double a = beta / (alpha + beta), b = alpha / (alpha + beta);
      // N_opt = G (C/6)^a with G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, Eq. 4).
      const double G = std::pow(alpha * A / (beta * B), 1.0 / (alpha + beta));
      return {{"E", std::exp(t[2])}, {"A", A}, {"B", B}, {"alpha", alpha}, {"beta", beta},
              {"a", a},              {"b", b}, {"G", G}};
    }
    case LawKind::Granularity:
      return {{"a", std::exp(t[0])}, {"alpha", t[4]}, {"b", std::exp(t[2])}, {"beta", t[5]},
              {"g", std::exp(t[1])}, {"gamma", t[6]}, {"c", std::exp(t[3])}};
    case LawKind::Sparsity:
      return {{"a", std::exp(t[0])}, {"alpha", t[1]}, {"b", std::exp(t[2])}, {"beta", t[3]},
              {"c", std::exp(t[4])}, {"lambda", t[5]}, {"d", std::exp(t[6])}, {"delta", t[7]},
              {"gamma", t[8]},       {"e", std::exp(t[9])}};
    case LawKind::Joint:
      return {{"a", std::exp(t[0])}, {"alpha", t[1]}, {"delta", t[2]}, {"gamma", t[3]}, {"b", std::exp(t[4])},
              {"beta", t[5]},        {"omega", t[6]}, {"zeta", t[7]},  {"c", std::exp(t[8])},
              {"E_start", std::exp(t[9])}, {"E_max", std::exp(t[9]) + std::exp(t[10])}};
    case LawKind::Clark:
      return {{"a", t[0]}, {"b", t[1]}, {"c", t[2]}, {"d", t[3]}, {"E_start", std::exp(t[4])},
              {"E_max", std::exp(t[4]) + std::exp(t[5])}};
    case LawKind::Isoflop: break;
  }
  return {};
}

std::vector<double> law_theta_from_coefficients(LawKind law, const std::vector<double>& c) {
  auto need = [&](size_t n) {
    if (c.size() != n)
      throw Error(to_string(law) + " takes " + std::to_string(n) + " coefficients, got " + std::to_string(c.size()));
  };
  switch (law) {
    case LawKind::Chinchilla:  // {E, A, B, alpha, beta}
      need(5);
      return {std::log(c[1]), std::log(c[2]), std::log(c[0]), c[3], c[4]};
    case LawKind::Granularity:  // {a, alpha, b, beta, g, gamma, c}
      need(7);
      return {std::log(c[0]), std::log(c[4]), std::log(c[2]), std::log(c[6]), c[1], c[3], c[5]};
    case LawKind::Sparsity:  // {a, alpha, b, beta, c, lambda, d, delta, gamma, e}
      need(10);
      return {std::log(c[0]), c[1], std::log(c[2]), c[3], std::log(c[4]), c[5], std::log(c[6]), c[7], c[8],
              std::log(c[9])};
    case LawKind::Joint:  // {a, alpha, delta, gamma, b, beta, omega, zeta, c, E_start, E_max}
      need(11);
      if (!(c[10] > c[9])) throw Error("joint law: E_max must exceed E_start");
      return {std::log(c[0]), c[1], c[2], c[3], std::log(c[4]), c[5], c[6], c[7], std::log(c[8]), std::log(c[9]),
              std::log(c[10] - c[9])};
    case LawKind::Clark:  // {a, b, c, d, E_start, E_max}
      need(6);
      if (!(c[5] > c[4])) throw Error("clark law: E_max must exceed E_start");
      return {c[0], c[1], c[2], c[3], std::log(c[4]), std::log(c[5] - c[4])};
    case LawKind::Isoflop: break;
  }
  throw Error("the isoflop law has no coefficients");
}

std::vector<std::vector<double>> default_start_grid(LawKind law) {
  switch (law) {
    case LawKind::Chinchilla:
      // Hoffmann et al. 2022, approach 3: a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1},
      // alpha, beta in {0, 0.5, ..., 2}: 6 * 6 * 5 * 5 * 5 = 4500 starts.
      return product({range(0, 25, 5), range(0, 25, 5), range(-1, 1, 0.5), range(0, 2, 0.5), range(0, 2, 0.5)});
    case LawKind::Granularity:
      // Krajewski's coefficients sit near log a 2.9, log g 0.7, log b 3.4, log c -0.8, alpha 0.12, beta 0.15,
      // gamma 0.6; the grid spans well around them: 3^6 * 2 = 1458 starts.
      return product({{0, 3, 6}, {-1, 1, 3}, {0, 3, 6}, {-1.5, 0}, {0.1, 0.3, 0.6}, {0.1, 0.3, 0.6}, {0.25, 0.75, 1.5}});
    case LawKind::Sparsity:
      // Two values per parameter (2^10 = 1024 starts); lambda comes out negative in Abnar et al., so its
      // axis straddles zero, as does delta's.
      return product({{1, 5}, {0.2, 0.6}, {1, 5}, {0.2, 0.6}, {-2, 0}, {-0.5, 0.5}, {-2, 2}, {-0.5, 0.5}, {0.1, 0.4},
                      {-1, 0.5}});
    case LawKind::Joint:
      // Around the paper's fit (a 36, alpha 0.19, delta -0.23, b 36, beta 0.18, omega 0.55, c 1.36, E_start 2.1,
      // E_max 290) and well beyond: 2^7 * 3 = 384 starts; gamma, zeta start at 0, the saturation at the paper's.
      return product({{2, 5}, {0.15, 0.4}, {-0.3, 0, 0.3}, {0}, {2, 5}, {0.15, 0.4}, {0, 0.5}, {0}, {-1, 0.5},
                      {std::log(2.0)}, {std::log(300.0)}});
    case LawKind::Clark:
      // a, b, c on log10 scales (a ~ -0.08, b ~ -0.03, c ~ 0.005 in Clark et al.'s range), d the log10 intercept:
      // 3 * 2 * 2 * 3 * 2 * 2 = 144 starts.
      return product({{-0.15, -0.08, -0.03}, {-0.1, 0}, {0, 0.01}, {0.5, 1, 1.5}, {std::log(1.5), std::log(4.0)},
                      {std::log(64.0), std::log(512.0)}});
    case LawKind::Isoflop: break;
  }
  return {};
}

}  // namespace moelab
