#include "scaling/fit.h"

#include <cstdio>
#include <ctime>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <nlopt.hpp>
#include <numeric>

#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "core/timer.h"
#include "scaling/optimize.h"

namespace moelab {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Grid stage: a short run per start; the polish stage runs the best few to convergence.
constexpr int kGridEvaluations = 60;
constexpr int kPolishEvaluations = 3000;
constexpr size_t kKeptOptima = 8;
// Bootstrap refits start from this many of the full fit's distinct optima.
constexpr size_t kBootstrapStarts = 3;
constexpr int kBootstrapEvaluations = 1000;

struct ObjectiveData {
  LawKind law;
  const std::vector<Observation>* points;
  double delta;
  double best_f = kInf;
  std::vector<double> best_x;
};

double nlopt_objective(const std::vector<double>& x, std::vector<double>& grad, void* data) {
  auto* d = static_cast<ObjectiveData*>(data);
  std::vector<double> g;
  const double f = huber_objective(d->law, *d->points, x, d->delta, grad.empty() ? nullptr : &g);
  if (!grad.empty()) grad = g;
  if (std::isfinite(f) && f < d->best_f) {
    d->best_f = f;
    d->best_x = x;
  }
  return std::isfinite(f) ? f : std::numeric_limits<double>::max();
}

LocalOptimum run_lbfgs(LawKind law, const std::vector<Observation>& points, double delta,
                       const std::vector<double>& start, int max_evaluations, double ftol) {
  ObjectiveData data{law, &points, delta, kInf, start};
  nlopt::opt opt(nlopt::LD_LBFGS, static_cast<unsigned>(start.size()));
  opt.set_min_objective(nlopt_objective, &data);
  opt.set_maxeval(max_evaluations);
  opt.set_ftol_rel(ftol);
  opt.set_xtol_rel(1e-12);
  std::vector<double> x = start;
  double f = 0;
  try {
    opt.optimize(x, f);
  } catch (const std::exception&) {
    // roundoff_limited and friends: the best point evaluated so far is what we keep.
  }
  if (!std::isfinite(data.best_f)) return {start, kInf};
  return {data.best_x, data.best_f};
}

// Two optima are the same when every parameter agrees to 1e-4 (absolute, or relative for large values).
bool same_optimum(const std::vector<double>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (std::fabs(a[i] - b[i]) > 1e-4 * std::max(1.0, std::fabs(a[i]))) return false;
  return true;
}

std::vector<LocalOptimum> distinct_best(std::vector<LocalOptimum> all, size_t keep) {
  std::stable_sort(all.begin(), all.end(),
                   [](const LocalOptimum& a, const LocalOptimum& b) { return a.objective < b.objective; });
  std::vector<LocalOptimum> out;
  for (auto& o : all) {
    if (!std::isfinite(o.objective)) break;
    bool dup = false;
    for (const auto& k : out) dup = dup || same_optimum(k.theta, o.theta);
    if (!dup) out.push_back(std::move(o));
    if (out.size() == keep) break;
  }
  return out;
}

void require_points(LawKind law, size_t n_points, size_t n_params) {
  if (n_points < n_params)
    throw Error("the " + to_string(law) + " law has " + std::to_string(n_params) + " parameters but only " +
                std::to_string(n_points) + " points to fit; add runs or hold fewer out");
}

uint64_t sample_seed(uint64_t seed, uint64_t sample) {
  // splitmix64 finaliser of (seed, sample): independent streams per sample.
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + sample + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Least squares min |A c - b| by Householder QR; A is (rows, cols) row-major, rows >= cols.
std::vector<double> least_squares(std::vector<double> A, std::vector<double> b, size_t rows, size_t cols) {
  for (size_t k = 0; k < cols; ++k) {
    double norm = 0;
    for (size_t i = k; i < rows; ++i) norm += A[i * cols + k] * A[i * cols + k];
    norm = std::sqrt(norm);
    if (norm == 0) throw Error("the isoflop design matrix is rank-deficient: the points do not vary enough");
    const double alpha = A[k * cols + k] > 0 ? -norm : norm;
    std::vector<double> v(rows, 0.0);
    for (size_t i = k; i < rows; ++i) v[i] = A[i * cols + k];
    v[k] -= alpha;
    double vnorm2 = 0;
    for (size_t i = k; i < rows; ++i) vnorm2 += v[i] * v[i];
    if (vnorm2 == 0) continue;
    for (size_t j = k; j < cols; ++j) {
      double dot = 0;
      for (size_t i = k; i < rows; ++i) dot += v[i] * A[i * cols + j];
      for (size_t i = k; i < rows; ++i) A[i * cols + j] -= 2 * v[i] * dot / vnorm2;
    }
    double dot = 0;
    for (size_t i = k; i < rows; ++i) dot += v[i] * b[i];
    for (size_t i = k; i < rows; ++i) b[i] -= 2 * v[i] * dot / vnorm2;
  }
  std::vector<double> c(cols);
  for (size_t k = cols; k-- > 0;) {
    double s = b[k];
    for (size_t j = k + 1; j < cols; ++j) s -= A[k * cols + j] * c[j];
    const double diag = A[k * cols + k];
    if (std::fabs(diag) < 1e-12)
      throw Error("the isoflop design matrix is rank-deficient: too few distinct (N, S) points for the degree");
    c[k] = s / diag;
  }
  return c;
}

nlohmann::ordered_json range_json(const std::vector<Observation>& pts, double Observation::*field) {
  double lo = kInf, hi = -kInf;
  for (const auto& p : pts) lo = std::min(lo, p.*field), hi = std::max(hi, p.*field);
  return nlohmann::ordered_json::array({lo, hi});
}

}  // namespace

double huber(double r, double delta, double* derivative) {
  const double a = std::fabs(r);
  if (a <= delta) {
    if (derivative) *derivative = r;
    return 0.5 * r * r;
  }
  if (derivative) *derivative = r > 0 ? delta : -delta;
  return delta * (a - 0.5 * delta);
}

double huber_objective(LawKind law, const std::vector<Observation>& points, const std::vector<double>& theta,
                       double delta, std::vector<double>* grad) {
  const size_t P = theta.size();
  std::vector<double> g(P);
  if (grad) grad->assign(P, 0.0);
  double total = 0;
  for (const auto& x : points) {
    const double r = law_log_loss(law, theta.data(), x, grad ? g.data() : nullptr) - std::log(x.L);
    double dr = 0;
    total += huber(r, delta, grad ? &dr : nullptr);
    if (grad)
      for (size_t j = 0; j < P; ++j) (*grad)[j] += dr * g[j];
  }
  return total;
}

double rmse_log(LawKind law, const std::vector<double>& theta, const std::vector<Observation>& points) {
  if (points.empty()) return std::nan("");
  double s = 0;
  for (const auto& x : points) {
    const double r = law_log_loss(law, theta.data(), x) - std::log(x.L);
    s += r * r;
  }
  return std::sqrt(s / points.size());
}

LocalOptimum minimize_lbfgs(LawKind law, const std::vector<Observation>& points, double delta,
                            const std::vector<double>& start, int max_evaluations) {
  return run_lbfgs(law, points, delta, start, max_evaluations, 1e-14);
}

ParametricFit fit_parametric(LawKind law, const std::vector<Observation>& points, double delta,
                             std::vector<std::vector<double>> starts) {
  const size_t P = law_spec(law).param_names.size();
  require_points(law, points.size(), P);
  if (starts.empty()) starts = default_start_grid(law);
  std::vector<LocalOptimum> grid(starts.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (size_t i = 0; i < starts.size(); ++i) grid[i] = run_lbfgs(law, points, delta, starts[i], kGridEvaluations, 1e-10);
  std::vector<LocalOptimum> best = distinct_best(std::move(grid), kKeptOptima);
  if (best.empty()) throw Error("the " + to_string(law) + " fit failed: the objective is not finite at any start");
  std::vector<LocalOptimum> polished(best.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t i = 0; i < best.size(); ++i)
    polished[i] = run_lbfgs(law, points, delta, best[i].theta, kPolishEvaluations, 1e-15);
  ParametricFit fit;
  fit.optima = distinct_best(std::move(polished), kKeptOptima);
  fit.theta = fit.optima[0].theta;
  fit.objective = fit.optima[0].objective;
  fit.starts = starts.size();
  return fit;
}

std::vector<std::vector<double>> bootstrap_parametric(LawKind law, const std::vector<Observation>& points,
                                                      double delta, const ParametricFit& full, int samples,
                                                      uint64_t seed) {
  std::vector<std::vector<double>> out(samples);
  const size_t n = points.size();
#pragma omp parallel for schedule(dynamic, 1)
  for (int b = 0; b < samples; ++b) {
    Rng rng(sample_seed(seed, static_cast<uint64_t>(b)));
    std::vector<Observation> resampled(n);
    for (size_t i = 0; i < n; ++i) resampled[i] = points[rng.below(n)];
    LocalOptimum best{{}, kInf};
    for (size_t s = 0; s < std::min(kBootstrapStarts, full.optima.size()); ++s) {
      LocalOptimum o = run_lbfgs(law, resampled, delta, full.optima[s].theta, kBootstrapEvaluations, 1e-12);
      if (o.objective < best.objective) best = std::move(o);
    }
    out[b] = best.theta.empty() ? full.theta : best.theta;
  }
  return out;
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return std::nan("");
  std::sort(values.begin(), values.end());
  const double pos = p / 100.0 * (values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(values.size() - 1, lo + 1);
  return values[lo] + (pos - lo) * (values[hi] - values[lo]);
}

nlohmann::ordered_json percentile_json(const std::vector<double>& values) {
  return {{"p2.5", percentile(values, 2.5)},
          {"p10", percentile(values, 10)},
          {"p50", percentile(values, 50)},
          {"p90", percentile(values, 90)},
          {"p97.5", percentile(values, 97.5)}};
}

// ---- isoflop -------------------------------------------------------------------------------------------------

double IsoflopSurface::eval(double x, double y) const {
  const double u = (x - x_center) / x_scale, v = (y - y_center) / y_scale;
  double s = 0;
  for (size_t k = 0; k < monomials.size(); ++k)
    s += coefficients[k] * std::pow(u, monomials[k].first) * std::pow(v, monomials[k].second);
  return s;
}

namespace {

// Convex hull (counter-clockwise, Andrew's monotone chain) of the data in (log N, -log(1-S)). The surface is a
// fit to the data, so its optimum is only read inside the region the runs cover: extrapolating a quadratic to
// an uncovered corner of the bounding box (e.g. the largest N at S = 0 when only sparse models were that large)
// gives minima no run supports.
using Point2 = std::array<double, 2>;
std::vector<Point2> convex_hull(std::vector<Point2> pts) {
  std::sort(pts.begin(), pts.end());
  pts.erase(std::unique(pts.begin(), pts.end()), pts.end());
  if (pts.size() < 3) return pts;
  auto cross = [](const Point2& o, const Point2& a, const Point2& b) {
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
  };
  std::vector<Point2> hull(2 * pts.size());
  size_t k = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    while (k >= 2 && cross(hull[k - 2], hull[k - 1], pts[i]) <= 0) --k;
    hull[k++] = pts[i];
  }
  for (size_t i = pts.size() - 1, t = k + 1; i > 0; --i) {
    while (k >= t && cross(hull[k - 2], hull[k - 1], pts[i - 1]) <= 0) --k;
    hull[k++] = pts[i - 1];
  }
  hull.resize(k - 1);
  return hull;
}

// Inside (or within `tol` of) a counter-clockwise hull of at least 3 vertices.
bool inside_hull(const std::vector<Point2>& hull, double x, double y, double tol) {
  for (size_t i = 0; i < hull.size(); ++i) {
    const Point2& a = hull[i];
    const Point2& b = hull[(i + 1) % hull.size()];
    const double ex = b[0] - a[0], ey = b[1] - a[1];
    const double len = std::hypot(ex, ey);
    if (len == 0) continue;
    if ((ex * (y - a[1]) - ey * (x - a[0])) / len < -tol) return false;
  }
  return true;
}

}  // namespace

IsoflopBudgetFit fit_isoflop_budget(const std::vector<Observation>& points, int degree) {
  if (degree < 1 || degree > 6) throw Error("--degree " + std::to_string(degree) + " is out of range; use 1..6");
  IsoflopBudgetFit fit;
  fit.C = points.empty() ? 0 : points[0].C;
  fit.n_points = points.size();
  fit.x_lo = fit.y_lo = kInf;
  fit.x_hi = fit.y_hi = -kInf;
  for (const auto& p : points) {
    const double x = std::log(p.N), y = -std::log1p(-p.S);
    fit.x_lo = std::min(fit.x_lo, x), fit.x_hi = std::max(fit.x_hi, x);
    fit.y_lo = std::min(fit.y_lo, y), fit.y_hi = std::max(fit.y_hi, y);
  }
  IsoflopSurface& s = fit.surface;
  s.degree = degree;
  s.x_center = (fit.x_lo + fit.x_hi) / 2, s.x_scale = std::max((fit.x_hi - fit.x_lo) / 2, 1e-12);
  s.y_center = (fit.y_lo + fit.y_hi) / 2, s.y_scale = std::max((fit.y_hi - fit.y_lo) / 2, 1e-12);
  // A direction the data do not vary along gets no monomials (e.g. a dense-only budget: a curve in log N).
  const bool vary_x = fit.x_hi - fit.x_lo > 1e-9, vary_y = fit.y_hi - fit.y_lo > 1e-9;
  for (int total = 0; total <= degree; ++total)
    for (int j = 0; j <= total; ++j) {
      const int i = total - j;
      if ((i > 0 && !vary_x) || (j > 0 && !vary_y)) continue;
      s.monomials.push_back({i, j});
    }
  const size_t rows = points.size(), cols = s.monomials.size();
  if (rows < cols)
    throw Error("isoflop budget C = " + std::to_string(fit.C) + " has " + std::to_string(rows) +
                " points but a degree-" + std::to_string(degree) + " surface has " + std::to_string(cols) +
                " coefficients; add runs at this budget or lower --degree (runs whose FLOPs differ slightly from "
                "their planned budget can be grouped by it with --columns C=budget)");
  std::vector<double> A(rows * cols), b(rows);
  for (size_t r = 0; r < rows; ++r) {
    const double u = (std::log(points[r].N) - s.x_center) / s.x_scale;
    const double v = (-std::log1p(-points[r].S) - s.y_center) / s.y_scale;
    for (size_t k = 0; k < cols; ++k) A[r * cols + k] = std::pow(u, s.monomials[k].first) * std::pow(v, s.monomials[k].second);
    b[r] = points[r].L;
  }
  s.coefficients = least_squares(A, b, rows, cols);
  double ss = 0;
  for (const auto& p : points) {
    const double pred = s.eval(std::log(p.N), -std::log1p(-p.S));
    const double r = pred > 0 ? std::log(pred) - std::log(p.L) : kInf;
    ss += r * r;
  }
  fit.rmse = std::sqrt(ss / rows);

  // Joint minimum over the region the data cover (their convex hull; the box when the data are collinear):
  // a 101 x 101 scan of the box keeping covered cells, then bounded Nelder-Mead from the best cell.
  std::vector<Point2> data_xy;
  for (const auto& p : points) data_xy.push_back({std::log(p.N), -std::log1p(-p.S)});
  const std::vector<Point2> hull = vary_x && vary_y ? convex_hull(data_xy) : std::vector<Point2>{};
  const double hull_tol = 1e-9 * (1 + std::fabs(fit.x_hi) + std::fabs(fit.y_hi));
  auto covered = [&](double x, double y) { return hull.size() < 3 || inside_hull(hull, x, y, hull_tol); };
  constexpr int kScan = 100;
  double bx = fit.x_lo, by = fit.y_lo, bf = kInf;
  for (int i = 0; i <= kScan; ++i)
    for (int j = 0; j <= kScan; ++j) {
      const double x = fit.x_lo + (fit.x_hi - fit.x_lo) * i / kScan, y = fit.y_lo + (fit.y_hi - fit.y_lo) * j / kScan;
      if (!covered(x, y)) continue;
      const double v = s.eval(x, y);
      if (v < bf) bf = v, bx = x, by = y;
    }
  for (const auto& [x, y] : data_xy) {  // the data points themselves are always covered
    const double v = s.eval(x, y);
    if (v < bf) bf = v, bx = x, by = y;
  }
  struct HullSurface {
    const IsoflopSurface* surface;
    const std::function<bool(double, double)>* covered;
  };
  const std::function<bool(double, double)> covered_fn = covered;
  HullSurface hs{&s, &covered_fn};
  if (vary_x && vary_y) {
    nlopt::opt opt(nlopt::LN_NELDERMEAD, 2);
    opt.set_lower_bounds({fit.x_lo, fit.y_lo});
    opt.set_upper_bounds({fit.x_hi, fit.y_hi});
    auto f = [](const std::vector<double>& z, std::vector<double>&, void* d) {
      const auto* h = static_cast<HullSurface*>(d);
      return (*h->covered)(z[0], z[1]) ? h->surface->eval(z[0], z[1]) : kInf;
    };
    opt.set_min_objective(f, &hs);
    opt.set_xtol_abs(1e-10);
    opt.set_maxeval(2000);
    opt.set_initial_step({(fit.x_hi - fit.x_lo) / kScan, (fit.y_hi - fit.y_lo) / kScan});
    std::vector<double> z{bx, by};
    double v = bf;
    try {
      opt.optimize(z, v);
    } catch (const std::exception&) {
    }
    if (v < bf) bf = v, bx = z[0], by = z[1];
  } else if (vary_x) {
    bf = minimize_1d([&](double x) { return s.eval(x, by); }, fit.x_lo, fit.x_hi, bx);
  } else if (vary_y) {
    bf = minimize_1d([&](double y) { return s.eval(bx, y); }, fit.y_lo, fit.y_hi, by);
  }
  fit.N_star = std::exp(bx), fit.S_star = -std::expm1(-by), fit.L_star = bf;

  // N*(C, S) for every sparsity in the data.
  std::vector<double> sparsities;
  for (const auto& p : points)
    if (std::none_of(sparsities.begin(), sparsities.end(), [&](double q) { return std::fabs(q - p.S) < 1e-12; }))
      sparsities.push_back(p.S);
  std::sort(sparsities.begin(), sparsities.end());
  for (double S : sparsities) {
    const double y = -std::log1p(-S);
    // The range of log N the data cover at this sparsity.
    double lo = kInf, hi = -kInf;
    for (int i = 0; i <= 4 * kScan; ++i) {
      const double xx = fit.x_lo + (fit.x_hi - fit.x_lo) * i / (4 * kScan);
      if (covered(xx, y)) lo = std::min(lo, xx), hi = std::max(hi, xx);
    }
    for (const auto& [px, py] : data_xy)
      if (std::fabs(py - y) < 1e-12) lo = std::min(lo, px), hi = std::max(hi, px);
    double x = lo;
    const double l = vary_x && hi > lo ? minimize_1d([&](double xx) { return s.eval(xx, y); }, lo, hi, x)
                                       : s.eval(x, y);
    fit.per_sparsity.push_back({S, std::exp(x), l});
  }
  return fit;
}

namespace {
std::vector<std::vector<Observation>> group_by_budget(const std::vector<Observation>& points) {
  std::vector<std::vector<Observation>> groups;
  for (const auto& p : points) {
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return std::fabs(g[0].C - p.C) <= 1e-6 * p.C; });
    if (it == groups.end()) groups.push_back({p});
    else it->push_back(p);
  }
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a[0].C < b[0].C; });
  return groups;
}
}  // namespace

std::vector<IsoflopBudgetFit> fit_isoflop(const std::vector<Observation>& points, int degree) {
  if (points.empty()) throw Error("the isoflop fit has no points");
  std::vector<IsoflopBudgetFit> fits;
  for (const auto& g : group_by_budget(points)) fits.push_back(fit_isoflop_budget(g, degree));
  return fits;
}

std::vector<std::vector<std::array<double, 3>>> bootstrap_isoflop(const std::vector<Observation>& points,
                                                                  const std::vector<IsoflopBudgetFit>& fits,
                                                                  int degree, int samples, uint64_t seed) {
  const auto groups = group_by_budget(points);
  std::vector<std::vector<std::array<double, 3>>> out(groups.size(), std::vector<std::array<double, 3>>(samples));
  for (size_t g = 0; g < groups.size(); ++g) {
#pragma omp parallel for schedule(dynamic, 4)
    for (int b = 0; b < samples; ++b) {
      Rng rng(sample_seed(seed + 1000003ull * g, static_cast<uint64_t>(b)));
      std::vector<Observation> resampled(groups[g].size());
      for (auto& p : resampled) p = groups[g][rng.below(groups[g].size())];
      try {
        const auto f = fit_isoflop_budget(resampled, degree);
        out[g][b] = {f.N_star, f.S_star, f.L_star};
      } catch (const Error&) {
        // A resample with too few distinct points: fall back to the full-data optimum for this sample.
        out[g][b] = {fits[g].N_star, fits[g].S_star, fits[g].L_star};
      }
    }
  }
  return out;
}

// ---- fit.json ------------------------------------------------------------------------------------------------

nlohmann::ordered_json fit_observations(const FitRequest& request, const std::vector<Observation>& train,
                                        const std::vector<Observation>& heldout) {
  const LawKind law = request.law;
  const LawSpec& spec = law_spec(law);
  Timer timer;
  nlohmann::ordered_json j;
  j["law"] = spec.name;
  j["data"] = request.data_path;
  nlohmann::ordered_json cols;
  for (const auto& c : spec.columns) cols[c] = request.columns.at(c);
  j["columns"] = cols;
  j["param_count"] = request.param_count;
  switch (law) {
    case LawKind::Chinchilla: j["flops_convention"] = "C = 6 N D (Hoffmann et al. 2022)"; break;
    case LawKind::Granularity:
      j["flops_convention"] = "krajewski: F = (12 d^2 c_f + d E G c_r) D n_blocks, c_f 6, c_r 14, d = 64 n_blocks";
      break;
    case LawKind::Sparsity: j["flops_convention"] = "C = 6 N_a D with N_a = (1 - S) N (Abnar et al. 2025 proxy)"; break;
    case LawKind::Isoflop: j["flops_convention"] = "C as given in column '" + request.columns.at("C") + "'"; break;
    case LawKind::Joint: j["flops_convention"] = "C = 6 N_a D, N_a the active parameters (Ludziejewski et al. 2025)"; break;
    case LawKind::Clark: j["flops_convention"] = "none: the law has no token term (a fixed token budget)"; break;
  }
  j["n_points"] = train.size();
  j["holdout"] = request.holdout;
  j["n_heldout"] = heldout.size();
  nlohmann::ordered_json ranges;
  for (const auto& c : spec.columns) {
    if (c == "N") ranges["N"] = range_json(train, &Observation::N);
    if (c == "D") ranges["D"] = range_json(train, &Observation::D);
    if (c == "G") ranges["G"] = range_json(train, &Observation::G);
    if (c == "S") ranges["S"] = range_json(train, &Observation::S);
    if (c == "C") ranges["C"] = range_json(train, &Observation::C);
    if (c == "L") ranges["L"] = range_json(train, &Observation::L);
    if (c == "A") ranges["A"] = range_json(train, &Observation::A);
    if (c == "E") ranges["E"] = range_json(train, &Observation::E);
  }
  j["data_ranges"] = ranges;
  if (request.expansion) j["expansion"] = *request.expansion;

  if (law == LawKind::Isoflop) {
    const auto fits = fit_isoflop(train, request.degree);
    j["degree"] = request.degree;
    double ss = 0;
    for (const auto& f : fits) ss += f.rmse * f.rmse * f.n_points;
    j["rmse"] = std::sqrt(ss / train.size());
    // Held-out points are predicted by the surface of their own budget; points at an unfitted budget cannot be.
    double hs = 0;
    size_t hn = 0;
    for (const auto& p : heldout)
      for (const auto& f : fits)
        if (std::fabs(f.C - p.C) <= 1e-6 * p.C) {
          const double pred = f.surface.eval(std::log(p.N), -std::log1p(-p.S));
          const double r = pred > 0 ? std::log(pred) - std::log(p.L) : kInf;
          hs += r * r, ++hn;
        }
    j["heldout_rmse"] = hn ? nlohmann::ordered_json(std::sqrt(hs / hn)) : nlohmann::ordered_json(nullptr);
    j["n_heldout_predicted"] = hn;
    std::vector<std::vector<std::array<double, 3>>> boot;
    if (request.bootstrap > 0) boot = bootstrap_isoflop(train, fits, request.degree, request.bootstrap, request.seed);
    nlohmann::ordered_json budgets = nlohmann::ordered_json::array();
    for (size_t g = 0; g < fits.size(); ++g) {
      const auto& f = fits[g];
      nlohmann::ordered_json b;
      b["C"] = f.C;
      b["n_points"] = f.n_points;
      b["rmse"] = f.rmse;
      b["N_star"] = f.N_star;
      b["S_star"] = f.S_star;
      b["L_star"] = f.L_star;
      b["box"] = {{"N", {std::exp(f.x_lo), std::exp(f.x_hi)}}, {"S", {-std::expm1(-f.y_lo), -std::expm1(-f.y_hi)}}};
      nlohmann::ordered_json per = nlohmann::ordered_json::array();
      for (const auto& q : f.per_sparsity) per.push_back({{"S", q[0]}, {"N_star", q[1]}, {"L_star", q[2]}});
      b["N_star_per_sparsity"] = per;
      nlohmann::ordered_json mono = nlohmann::ordered_json::array();
      for (const auto& m : f.surface.monomials) mono.push_back({m.first, m.second});
      b["surface"] = {{"variables", "u = (log N - x_center) / x_scale, v = (-log(1-S) - y_center) / y_scale"},
                      {"x_center", f.surface.x_center}, {"x_scale", f.surface.x_scale},
                      {"y_center", f.surface.y_center}, {"y_scale", f.surface.y_scale},
                      {"monomials", mono}, {"coefficients", f.surface.coefficients}};
      if (!boot.empty()) {
        std::vector<double> n, s, l;
        for (const auto& t : boot[g]) n.push_back(t[0]), s.push_back(t[1]), l.push_back(t[2]);
        b["intervals"] = {{"N_star", percentile_json(n)}, {"S_star", percentile_json(s)}, {"L_star", percentile_json(l)}};
      }
      budgets.push_back(b);
    }
    j["budgets"] = budgets;
    // Chinchilla approach 2 across budgets: log N* = a log C + k.
    if (fits.size() >= 2) {
      double mx = 0, my = 0;
      for (const auto& f : fits) mx += std::log(f.C), my += std::log(f.N_star);
      mx /= fits.size(), my /= fits.size();
      double sxy = 0, sxx = 0;
      for (const auto& f : fits) {
        sxy += (std::log(f.C) - mx) * (std::log(f.N_star) - my);
        sxx += (std::log(f.C) - mx) * (std::log(f.C) - mx);
      }
      const double a = sxx > 0 ? sxy / sxx : 0;
      j["frontier"] = {{"N_star_exponent", a}, {"N_star_log_intercept", my - a * mx}};
    }
    j["bootstrap"] = {{"samples", request.bootstrap}, {"seed", request.seed}};
    j["fit_seconds"] = timer.seconds();
    return j;
  }

  const double delta = request.delta.value_or(spec.default_huber_delta);
  if (!(delta > 0)) throw Error("--delta must be a positive Huber threshold, got " + std::to_string(delta));
  const ParametricFit fit = fit_parametric(law, train, delta);
  j["huber_delta"] = delta;
  j["starts"] = fit.starts;
  nlohmann::ordered_json params, coefs;
  for (size_t i = 0; i < spec.param_names.size(); ++i) params[spec.param_names[i]] = fit.theta[i];
  for (const auto& [name, value] : law_coefficients(law, fit.theta)) coefs[name] = value;
  j["parameters"] = params;
  j["coefficients"] = coefs;
  j["objective"] = fit.objective;
  j["rmse"] = rmse_log(law, fit.theta, train);
  j["heldout_rmse"] = heldout.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(rmse_log(law, fit.theta, heldout));
  nlohmann::ordered_json boot{{"samples", request.bootstrap}, {"seed", request.seed}};
  if (request.bootstrap > 0) {
    const auto thetas = bootstrap_parametric(law, train, delta, fit, request.bootstrap, request.seed);
    nlohmann::ordered_json pi, ci;
    for (size_t i = 0; i < spec.param_names.size(); ++i) {
      std::vector<double> v;
      for (const auto& t : thetas) v.push_back(t[i]);
      pi[spec.param_names[i]] = percentile_json(v);
    }
    const auto names = law_coefficients(law, fit.theta);
    for (size_t k = 0; k < names.size(); ++k) {
      std::vector<double> v;
      for (const auto& t : thetas) v.push_back(law_coefficients(law, t)[k].second);
      ci[names[k].first] = percentile_json(v);
    }
    boot["intervals"] = {{"parameters", pi}, {"coefficients", ci}};
    boot["thetas"] = thetas;
  }
  j["bootstrap"] = boot;
  j["fit_seconds"] = timer.seconds();
  return j;
}

namespace {
// Where a fit came from: the input's SHA-256 and row count, the command line, moelab's version, the time.
nlohmann::ordered_json provenance(const FitRequest& request, size_t rows) {
  nlohmann::ordered_json p;
  p["input"] = request.data_path;
  p["input_sha256"] = sha256_file(request.data_path);
  p["input_rows"] = rows;
  p["command_line"] = request.command_line;
  p["moelab_version"] = MOELAB_VERSION;
  const std::time_t now = std::time(nullptr);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  p["written_at"] = when;
  return p;
}
}  // namespace

namespace {
// Replicates are told apart by every logical column the table has (N D G S C A E), not only the law's: two runs
// of different expert counts can share their total parameters and tokens.
nlohmann::ordered_json replicate_noise_json(const ResultTable& table, const ColumnMap& columns) {
  std::vector<std::string> cols = {"L"};
  for (const char* c : {"N", "D", "G", "S", "C", "A", "E"}) {
    const auto mapped = columns.find(c);
    const int at = table.find(mapped != columns.end() ? mapped->second : c);
    if (at >= 0 && table.numeric[at]) cols.push_back(c);
  }
  ReplicateNoise noise;
  try {
    noise = replicate_noise(extract_observations(table, columns, cols));
  } catch (const Error&) {
    return nullptr;
  }
  return {{"pooled_sd_log_loss", std::isnan(noise.pooled_sd) ? nlohmann::ordered_json(nullptr)
                                                             : nlohmann::ordered_json(noise.pooled_sd)},
          {"groups", noise.groups},
          {"rows", noise.rows},
          {"columns", cols}};
}
}  // namespace

ReplicateNoise replicate_noise(const std::vector<Observation>& points) {
  // Rows are replicates when every input column matches (relative 1e-9): N, D, G, S, C, A, E.
  const auto same = [](const Observation& a, const Observation& b) {
    const auto eq = [](double x, double y) { return std::fabs(x - y) <= 1e-9 * std::max(std::fabs(x), std::fabs(y)); };
    return eq(a.N, b.N) && eq(a.D, b.D) && eq(a.G, b.G) && eq(a.S, b.S) && eq(a.C, b.C) && eq(a.A, b.A) && eq(a.E, b.E);
  };
  std::vector<std::vector<double>> groups;
  std::vector<const Observation*> keys;
  for (const auto& p : points) {
    size_t g = 0;
    while (g < keys.size() && !same(*keys[g], p)) ++g;
    if (g == keys.size()) keys.push_back(&p), groups.emplace_back();
    groups[g].push_back(std::log(p.L));
  }
  return pooled_spread(groups);
}

ReplicateNoise pooled_spread(const std::vector<std::vector<double>>& groups) {
  ReplicateNoise r;
  double ss = 0, dof = 0;
  for (const auto& g : groups) {
    if (g.size() < 2) continue;
    double mean = 0;
    for (double v : g) mean += v;
    mean /= static_cast<double>(g.size());
    for (double v : g) ss += (v - mean) * (v - mean);
    dof += static_cast<double>(g.size() - 1);
    ++r.groups, r.rows += g.size();
  }
  if (dof > 0) r.pooled_sd = std::sqrt(ss / dof);
  return r;
}

nlohmann::ordered_json compare_laws(const FitRequest& request) {
  const ResultTable table = read_result_table(request.data_path);
  nlohmann::ordered_json out = compare_laws_on(request, table);
  out["provenance"] = provenance(request, table.rows());
  return out;
}

nlohmann::ordered_json compare_laws_on(const FitRequest& request, const ResultTable& table) {
  // Held-out rows: the expression given, else the largest budget.
  RowFilter filter;
  if (!request.holdout.empty()) {
    filter = parse_row_filter(request.holdout);
  } else {
    const int c = resolve_column(table, request.columns, "C");
    double largest = 0;
    for (double v : table.columns[c]) largest = std::max(largest, v);
    filter = {"C", "==", largest};
  }
  const int filter_column = resolve_column(table, request.columns, filter.column);
  nlohmann::ordered_json out;
  out["law"] = "compare";
  out["data"] = request.data_path;
  char largest[48];
  std::snprintf(largest, sizeof largest, "C==%.10g", filter.value);
  out["holdout"] = request.holdout.empty() ? std::string(largest) + " (the largest budget)" : request.holdout;
  nlohmann::ordered_json laws = nlohmann::ordered_json::object(), skipped = nlohmann::ordered_json::array();
  struct Ranked {
    std::string law;
    double heldout = 0, rmse = 0;
    size_t parameters = 0;
    nlohmann::ordered_json interval;
  };
  std::vector<Ranked> ranked;
  for (LawKind law : {LawKind::Chinchilla, LawKind::Granularity, LawKind::Sparsity, LawKind::Joint, LawKind::Clark}) {
    const LawSpec& spec = law_spec(law);
    std::vector<Observation> all;
    try {
      all = extract_observations(table, request.columns, spec.columns);
    } catch (const Error& e) {
      skipped.push_back({{"law", spec.name}, {"reason", e.what()}});
      continue;
    }
    // A law whose distinguishing column does not vary in the data adds nothing over a simpler one.
    const auto varies = [&](double Observation::*field) {
      for (const auto& p : all)
        if (std::fabs(p.*field - all[0].*field) > 1e-12 * std::fabs(all[0].*field)) return true;
      return false;
    };
    if ((law == LawKind::Granularity && !varies(&Observation::G)) ||
        (law == LawKind::Sparsity && !varies(&Observation::S)) ||
        ((law == LawKind::Joint || law == LawKind::Clark) && !varies(&Observation::E))) {
      const char* column = law == LawKind::Granularity ? "G (granularity)" : law == LawKind::Sparsity ? "S (sparsity)"
                                                                                                : "E (experts)";
      skipped.push_back({{"law", spec.name}, {"reason", std::string("its column ") + column + " does not vary in the data"}});
      continue;
    }
    std::vector<Observation> train, heldout;
    for (size_t r = 0; r < all.size(); ++r)
      (filter.matches(table.columns[filter_column][r]) ? heldout : train).push_back(all[r]);
    if (heldout.empty()) throw Error("the held-out rows ('" + out["holdout"].get<std::string>() + "') are empty");
    if (train.size() <= spec.param_names.size()) {
      skipped.push_back({{"law", spec.name},
                         {"reason", std::to_string(train.size()) + " training rows for " +
                                        std::to_string(spec.param_names.size()) + " parameters"}});
      continue;
    }
    FitRequest one = request;
    one.law = law;
    one.holdout = out["holdout"].get<std::string>();
    nlohmann::ordered_json j = fit_observations(one, train, heldout);
    Ranked r{spec.name, j["heldout_rmse"].get<double>(), j["rmse"].get<double>(), spec.param_names.size(), nullptr};
    if (j["bootstrap"].contains("thetas")) {
      std::vector<double> errors;
      for (const auto& t : j["bootstrap"]["thetas"]) errors.push_back(rmse_log(law, t.get<std::vector<double>>(), heldout));
      r.interval = percentile_json(errors);
      j["heldout_rmse_interval"] = r.interval;
    }
    laws[spec.name] = j;
    ranked.push_back(r);
  }
  if (ranked.empty()) throw Error("no law could be fitted to " + request.data_path + ": " + skipped.dump());
  std::stable_sort(ranked.begin(), ranked.end(), [](const Ranked& a, const Ranked& b) { return a.heldout < b.heldout; });
  nlohmann::ordered_json ranking = nlohmann::ordered_json::array();
  for (const auto& r : ranked)
    ranking.push_back({{"law", r.law}, {"heldout_rmse", r.heldout}, {"heldout_rmse_interval", r.interval},
                       {"rmse", r.rmse}, {"parameters", r.parameters}});
  out["ranking"] = ranking;
  out["laws"] = laws;
  out["skipped"] = skipped;
  out["replicate_noise"] = replicate_noise_json(table, request.columns);
  return out;
}

nlohmann::ordered_json run_fit(const FitRequest& request) {
  const ResultTable table = read_result_table(request.data_path);
  const LawSpec& spec = law_spec(request.law);
  const std::vector<Observation> all = extract_observations(table, request.columns, spec.columns);
  std::vector<Observation> train, heldout;
  if (request.holdout.empty()) {
    train = all;
  } else {
    const RowFilter filter = parse_row_filter(request.holdout);
    const int c = resolve_column(table, request.columns, filter.column);
    for (size_t r = 0; r < all.size(); ++r) (filter.matches(table.columns[c][r]) ? heldout : train).push_back(all[r]);
    if (heldout.empty())
      throw Error("--holdout '" + request.holdout + "' matches no row of " + request.data_path);
  }
  nlohmann::ordered_json j = fit_observations(request, train, heldout);
  if (request.law != LawKind::Isoflop) j["replicate_noise"] = replicate_noise_json(table, request.columns);
  j["provenance"] = provenance(request, table.rows());
  return j;
}

}  // namespace moelab
