#include "scaling/arms.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <set>

#include "core/error.h"
#include "core/format.h"

namespace moelab {

namespace {

// Solves the 3x3 system m v = r by Gaussian elimination with partial pivoting; false when singular.
bool solve3(std::array<std::array<double, 3>, 3> m, std::array<double, 3> r, std::array<double, 3>& v) {
  for (int col = 0; col < 3; ++col) {
    int pivot = col;
    for (int row = col + 1; row < 3; ++row)
      if (std::fabs(m[row][col]) > std::fabs(m[pivot][col])) pivot = row;
    if (std::fabs(m[pivot][col]) < 1e-12) return false;
    std::swap(m[col], m[pivot]);
    std::swap(r[col], r[pivot]);
    for (int row = col + 1; row < 3; ++row) {
      const double f = m[row][col] / m[col][col];
      for (int k = col; k < 3; ++k) m[row][k] -= f * m[col][k];
      r[row] -= f * r[col];
    }
  }
  for (int row = 2; row >= 0; --row) {
    double s = r[row];
    for (int k = row + 1; k < 3; ++k) s -= m[row][k] * v[k];
    v[row] = s / m[row][row];
  }
  return true;
}

}  // namespace

Parabola fit_parabola(const std::vector<double>& x, const std::vector<double>& y) {
  Parabola p;
  if (x.size() != y.size()) throw Error("fit_parabola: x and y differ in length");
  const std::set<double> xs(x.begin(), x.end());
  if (xs.size() < 3) return p;
  // Least squares in u = (x - x0) / scale (well conditioned), then back to x.
  const double x0 = 0.5 * (*xs.begin() + *xs.rbegin()), scale = 0.5 * (*xs.rbegin() - *xs.begin());
  std::array<std::array<double, 3>, 3> normal{};
  std::array<double, 3> rhs{}, k{};
  for (size_t i = 0; i < x.size(); ++i) {
    const double u = (x[i] - x0) / scale;
    const double f[3] = {1, u, u * u};
    for (int r = 0; r < 3; ++r) {
      rhs[r] += f[r] * y[i];
      for (int c = 0; c < 3; ++c) normal[r][c] += f[r] * f[c];
    }
  }
  if (!solve3(normal, rhs, k)) return p;
  // y = k0 + k1 u + k2 u^2 with u = (x - x0) / scale.
  p.c = k[2] / (scale * scale);
  p.b = k[1] / scale - 2 * p.c * x0;
  p.a = k[0] - k[1] * x0 / scale + p.c * x0 * x0;
  p.ok = true;
  return p;
}

Line fit_line(const std::vector<double>& x, const std::vector<double>& y) {
  Line l;
  const double n = static_cast<double>(x.size());
  if (x.size() != y.size() || x.size() < 2) return l;
  double sx = 0, sy = 0;
  for (size_t i = 0; i < x.size(); ++i) sx += x[i], sy += y[i];
  const double mx = sx / n, my = sy / n;
  double sxx = 0, sxy = 0;
  for (size_t i = 0; i < x.size(); ++i) sxx += (x[i] - mx) * (x[i] - mx), sxy += (x[i] - mx) * (y[i] - my);
  if (!(sxx > 0)) return l;
  l.b = sxy / sxx;
  l.a = my - l.b * mx;
  return l;
}

ArmMinimum fit_arm_minimum(const std::vector<ArmRun>& runs) {
  if (runs.empty()) throw Error("an arm with no runs has no minimum");
  ArmMinimum m;
  m.runs = static_cast<int>(runs.size());
  std::map<int, std::vector<const ArmRun*>> by_config;
  for (const auto& r : runs) by_config[r.config].push_back(&r);
  m.configs = static_cast<int>(by_config.size());
  m.min_replicates = m.runs;
  std::set<double> xs;
  for (const auto& [config, rs] : by_config) {
    m.min_replicates = std::min(m.min_replicates, static_cast<int>(rs.size()));
    xs.insert(rs.front()->x);
  }
  if (xs.size() < 3) {  // no parabola through fewer than 3 shapes: the best config mean
    m.loss = INFINITY;
    for (const auto& [config, rs] : by_config) {
      double mean = 0;
      for (const auto* r : rs) mean += r->loss / static_cast<double>(rs.size());
      if (mean < m.loss) m.loss = mean, m.x = rs.front()->x;
    }
    return m;
  }
  std::vector<double> x, y;
  for (const auto& r : runs) x.push_back(r.x), y.push_back(r.loss);
  const Parabola p = fit_parabola(x, y);
  if (!p.ok) throw Error("the IsoFLOP parabola is singular (the shapes do not span 3 sizes)");
  m.fitted = true;
  const double x_lo = *xs.begin(), x_hi = *xs.rbegin();
  const double v = p.vertex();
  if (std::isfinite(v) && v >= x_lo && v <= x_hi) {
    m.interior = true;
    m.x = v;
    m.loss = p.at(v);
    return m;
  }
  const double at_lo = p.at(x_lo), at_hi = p.at(x_hi);
  m.x = at_lo <= at_hi ? x_lo : x_hi;
  m.loss = std::min(at_lo, at_hi);
  return m;
}

double student_t_quantile(double p, double df) {
  // Two-sided 5% and one-sided 20% points of Student's t, df = 1 ... 30 (standard tables).
  static const double t975[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                                2.201,  2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                                2.080,  2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
  static const double t80[] = {1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879,
                               0.876, 0.873, 0.870, 0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860,
                               0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854};
  const bool upper = std::fabs(p - 0.975) < 1e-12;
  if (!upper && std::fabs(p - 0.8) > 1e-12) throw Error("student_t_quantile supports p = 0.975 and 0.8 only");
  if (!(df >= 1)) throw Error("Student's t needs at least one degree of freedom");
  const double z = upper ? 1.959963985 : 0.841621234;
  if (std::isinf(df)) return z;
  const int k = static_cast<int>(std::floor(df));
  if (k <= 30) return (upper ? t975 : t80)[k - 1];
  // Cornish-Fisher: t = z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2).
  const double v = k;
  return z + (z * z * z + z) / (4 * v) + (5 * std::pow(z, 5) + 16 * z * z * z + 3 * z) / (96 * v * v);
}

double minimum_detectable_effect(double se, double df) {
  return (student_t_quantile(0.975, df) + student_t_quantile(0.8, df)) * se;
}

namespace {

double mean_of(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m += x / static_cast<double>(v.size());
  return m;
}

double variance_of(const std::vector<double>& v) {  // sample variance (n - 1)
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return s / static_cast<double>(v.size() - 1);
}

}  // namespace

std::map<int, ArmMinimum> replicate_minima(const std::vector<ArmRun>& runs) {
  std::map<int, std::set<int>> configs_of;  // replicate -> configs it has
  std::set<int> configs;
  for (const auto& r : runs) configs_of[r.replicate].insert(r.config), configs.insert(r.config);
  std::map<int, ArmMinimum> minima;
  for (const auto& [replicate, have] : configs_of) {
    if (have != configs) continue;
    std::vector<ArmRun> one;
    for (const auto& r : runs)
      if (r.replicate == replicate) one.push_back(r);
    minima[replicate] = fit_arm_minimum(one);
  }
  return minima;
}

PairedMean paired_mean(const std::vector<double>& differences) {
  PairedMean p;
  p.n = static_cast<int>(differences.size());
  if (p.n == 0) return p;
  p.estimate = mean_of(differences);
  if (p.n < 2) return p;
  p.df = p.n - 1;
  p.se = std::sqrt(variance_of(differences) / p.n);
  const double t = student_t_quantile(0.975, p.df);
  p.lo = p.estimate - t * p.se;
  p.hi = p.estimate + t * p.se;
  p.mde = minimum_detectable_effect(p.se, p.df);
  return p;
}

ArmComparison compare_arm_minima(const std::vector<ArmRun>& a, const std::vector<ArmRun>& b,
                                 const ArmComparisonOptions& options) {
  ArmComparison out;
  out.a = fit_arm_minimum(a);
  out.b = fit_arm_minimum(b);
  out.estimate = out.a.loss - out.b.loss;
  for (const auto* runs : {&a, &b}) {
    std::set<std::pair<int, int>> seen;
    for (const auto& r : *runs)
      if (!seen.insert({r.config, r.replicate}).second)
        throw Error("two runs of config " + std::to_string(r.config) + " have replicate " +
                    std::to_string(r.replicate) + ": replicate indices must be unique within a config");
  }
  const std::map<int, ArmMinimum> ma = replicate_minima(a), mb = replicate_minima(b);
  std::vector<double> diffs, pa, pb;
  std::vector<int> ids;
  if (options.paired)
    for (const auto& [replicate, m] : ma)
      if (auto it = mb.find(replicate); it != mb.end()) {
        diffs.push_back(m.loss - it->second.loss);
        pa.push_back(m.loss), pb.push_back(it->second.loss);
        ids.push_back(replicate);
      }
  // Welch's se over each arm's per-replicate minima: the unpaired comparison, and what pairing is measured against.
  std::vector<double> va, vb;
  for (const auto& [replicate, m] : ma) va.push_back(m.loss);
  for (const auto& [replicate, m] : mb) vb.push_back(m.loss);
  double welch_df = 0;
  if (va.size() >= 2 && vb.size() >= 2) {
    const double sa = variance_of(va) / static_cast<double>(va.size());
    const double sb = variance_of(vb) / static_cast<double>(vb.size());
    out.se_unpaired = std::sqrt(sa + sb);
    // Welch-Satterthwaite degrees of freedom.
    const double denom = sa * sa / static_cast<double>(va.size() - 1) + sb * sb / static_cast<double>(vb.size() - 1);
    welch_df = denom > 0 ? (sa + sb) * (sa + sb) / denom : static_cast<double>(va.size() + vb.size() - 2);
  }
  if (options.paired && diffs.size() >= 2) {
    out.paired = true;
    out.per_replicate = diffs;
    out.replicate_ids = ids;
    out.replicates_a = out.replicates_b = static_cast<int>(diffs.size());
    const PairedMean p = paired_mean(diffs);
    out.df = p.df;
    out.se = p.se;
    const double va_p = variance_of(pa), vb_p = variance_of(pb);
    if (va_p > 0 && vb_p > 0) out.correlation = (va_p + vb_p - variance_of(diffs)) / (2 * std::sqrt(va_p * vb_p));
  } else {
    out.replicates_a = static_cast<int>(va.size());
    out.replicates_b = static_cast<int>(vb.size());
    if (va.size() < 2 || vb.size() < 2) {
      out.why_undefined = "each arm needs at least 2 replicates covering all its shapes (has " +
                          std::to_string(va.size()) + " and " + std::to_string(vb.size()) + ")";
      return out;
    }
    out.se = out.se_unpaired;
    out.df = welch_df;
  }
  const double t = student_t_quantile(0.975, out.df);
  out.lo = out.estimate - t * out.se;
  out.hi = out.estimate + t * out.se;
  out.mde = minimum_detectable_effect(out.se, out.df);
  return out;
}

Verdict judge_positive(double estimate, double lo, double hi, double mde) {
  if (!std::isfinite(estimate)) return {"inconclusive", "not measured"};
  if (!std::isfinite(lo) || !std::isfinite(hi))
    return {"inconclusive", std::string("the direction ") + (estimate > 0 ? "agrees" : "disagrees") +
                                " but there is no interval (no replicate seeds to size the noise)"};
  const std::string interval = "95% interval [" + fmt("%+.4f", lo) + ", " + fmt("%+.4f", hi) + "]";
  if (lo > 0) return {"reproduced", interval + " excludes 0"};
  if (hi < 0) return {"not reproduced", interval + " lies below 0: the opposite"};
  return {"inconclusive", interval + " includes 0; this design detects an effect of " + fmt("%.3g", mde) +
                              " or more (80% power, 5% two-sided)"};
}

}  // namespace moelab
