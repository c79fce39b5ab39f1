#include "core/format.h"
#include "report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <tuple>

#include "core/error.h"
#include "core/io.h"
#include "report/gnuplot.h"
#include "scaling/laws.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string base64(const std::string& bytes) {
  static const char* table = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += table[v >> 18], out += table[(v >> 12) & 63], out += table[(v >> 6) & 63], out += table[v & 63];
  }
  if (i + 1 == bytes.size()) {
    const uint32_t v = uint8_t(bytes[i]) << 16;
    out += table[v >> 18], out += table[(v >> 12) & 63], out += "==";
  } else if (i + 2 == bytes.size()) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    out += table[v >> 18], out += table[(v >> 12) & 63], out += table[(v >> 6) & 63], out += '=';
  }
  return out;
}

std::string sparsity_label(double s) { return s == 0 ? std::string("dense") : "S = " + fmt("%.4g", s); }

// Multiplot geometry for `panels` panels: up to 3 columns.
struct Layout {
  int cols, rows, width, height;
};
Layout layout_for(size_t panels) {
  Layout l;
  l.cols = static_cast<int>(std::min<size_t>(std::max<size_t>(panels, 1), 3));
  l.rows = static_cast<int>((std::max<size_t>(panels, 1) + l.cols - 1) / l.cols);
  l.width = l.cols == 1 ? 760 : 1140;
  l.height = 60 + 380 * l.rows;
  return l;
}

// Exponential moving average of a noisy training curve (weight `alpha` on the newest point).
std::vector<std::array<double, 2>> smoothed(const std::vector<std::array<double, 2>>& curve, double alpha) {
  std::vector<std::array<double, 2>> out;
  double ema = kNaN;
  for (const auto& p : curve) {
    ema = std::isfinite(ema) ? (1 - alpha) * ema + alpha * p[1] : p[1];
    out.push_back({p[0], ema});
  }
  return out;
}

// Tick marks at the given compute budgets, labelled like "2e12": a log axis spanning less than a decade gets no
// labelled tick of its own.
std::string budget_tics(const std::vector<double>& values) {
  std::string out = "set xtics (";
  for (size_t i = 0; i < values.size(); ++i) {
    char label[32];
    const int e = static_cast<int>(std::floor(std::log10(values[i])));
    std::snprintf(label, sizeof label, "%.3ge%d", values[i] / std::pow(10.0, e), e);
    out += (i ? ", " : "") + std::string("\"") + label + "\" " + fmt("%.9g", values[i]);
  }
  return out + ")\nset mxtics default";
}

class Builder {
 public:
  Builder(const Study& study, const StudySummary& summary, const std::string& figures_dir, std::ostream& log)
      : study_(study), summary_(summary), dir_(figures_dir), log_(log), col_(summary.loss_column) {
    for (const auto& s : study.sweeps)
      if (s.plan.kind == "isoflop")
        for (const auto& r : s.results)
          if (r.status == "ok" && r.budget > 0 && std::isfinite(loss_of(r, col_))) iso_.push_back({&s, &r});
    budgets_ = summary.budgets;
  }

  std::vector<ReportFigure> figures;
  std::vector<std::string> skipped;

  void build_all() {
    attempt("curves", [&] { curves(); });
    attempt("isoflop", [&] { isoflop(); });
    attempt("loss-vs-sparsity", [&] { loss_vs_sparsity(); });
    attempt("law-fit", [&] { law_fit(); });
    attempt("frontier", [&] { frontier(); });
    attempt("compute-multiplier", [&] { multiplier(); });
    attempt("granularity", [&] { granularity(); });
    attempt("fixed-params", [&] { fixed_params(); });
    attempt("downstream", [&] { downstream(); });
    attempt("router-load", [&] { router_load(); });
  }

 private:
  struct IsoRun {
    const StudySweep* sweep;
    const RunResult* result;
  };

  void attempt(const std::string& id, const std::function<void()>& body) {
    const size_t before = figures.size();
    body();
    if (figures.size() > before) log_ << "  figure " << id << "\n";
  }
  void skip(const std::string& title, const std::string& why) { skipped.push_back(title + ": " + why); }
  void emit(const std::string& id, const std::string& title, const std::string& caption, const GnuplotFigure& fig) {
    figures.push_back({id, title, caption, fig.render((fs::path(dir_) / id).string())});
  }
  double L(const RunResult& r) const { return loss_of(r, col_); }
  std::string loss_axis() const {
    return col_ == "val_loss" ? "validation loss (nats/token)" : col_ + " (nats/token)";
  }
  std::vector<const RunResult*> at_budget(double C) const {
    std::vector<const RunResult*> out;
    for (const auto& ir : iso_)
      if (same_budget(ir.result->budget, C)) out.push_back(ir.result);
    return out;
  }
  const StudySweep* sweep_of(const RunResult* r) const {
    for (const auto& ir : iso_)
      if (ir.result == r) return ir.sweep;
    return nullptr;
  }
  static std::string multiplot(const Layout& l, const std::string& title) {
    return "set multiplot layout " + std::to_string(l.rows) + "," + std::to_string(l.cols) + " title " +
           gnuplot_quote(title) + " font ',14'";
  }

  // 1. Training and validation curves.
  void curves() {
    const std::string title = "Training and validation curves";
    if (!budgets_.empty()) {
      const Layout l = layout_for(budgets_.size());
      GnuplotFigure fig(l.width, l.height);
      fig.add(multiplot(l, title));
      for (double C : budgets_) {
        // Per sparsity, the run of the best shape at that sparsity.
        std::map<double, const RunResult*> best;
        for (const auto* r : at_budget(C))
          if (!best.count(r->sparsity) || L(*r) < L(*best[r->sparsity])) best[r->sparsity] = r;
        std::string plot = "plot ";
        int lt = 1;
        for (const auto& [s, r] : best) {
          const RunCurves c = read_run_curves(sweep_of(r)->run_dir(r->name));
          std::vector<std::vector<double>> train, val;
          for (const auto& p : smoothed(c.train, 0.1)) train.push_back({p[0], p[1]});
          for (const auto& p : c.val) val.push_back({p[0], p[1]});
          const std::string label = sparsity_label(s) + " (d" + std::to_string(r->d_model) + ")";
          plot += fig.add_data(train) + " using 1:2 with lines lt " + std::to_string(lt) + " lw 1.5 title " +
                  gnuplot_quote(label + " train") + ", ";
          if (!val.empty())
            plot += fig.add_data(val) + " using 1:2 with points lt " + std::to_string(lt) + " pt 7 ps 1.2 title " +
                    gnuplot_quote(label + " val") + ", ";
          ++lt;
        }
        plot.resize(plot.size() - 2);
        fig.add("set title " + gnuplot_quote("budget C = " + fmt("%.3g", C) + " FLOPs"));
        fig.add("set xlabel 'training tokens'\nset ylabel 'loss (nats/token)'\nset key top right font ',9'\n"
                "set format x '%.0s%c'");
        fig.add(plot);
      }
      fig.add("unset multiplot");
      emit("curves", title,
           "Training loss (EMA-smoothed, weight 0.1 per step; lines) and validation loss (points) against tokens, "
           "for the best shape at each sparsity, one panel per FLOP budget.",
           fig);
      return;
    }
    if (study_.single_runs.empty()) return skip(title, "no runs with metrics.jsonl");
    GnuplotFigure fig(760, 440);
    std::string plot = "plot ";
    int lt = 1;
    for (const auto& dir : study_.single_runs) {
      const RunCurves c = read_run_curves(dir);
      std::vector<std::vector<double>> train, val;
      for (const auto& p : smoothed(c.train, 0.1)) train.push_back({p[0], p[1]});
      for (const auto& p : c.val) val.push_back({p[0], p[1]});
      const std::string name = fs::path(dir).filename().string();
      if (!train.empty())
        plot += fig.add_data(train) + " using 1:2 with lines lt " + std::to_string(lt) + " lw 1.5 title " +
                gnuplot_quote(name + " train") + ", ";
      if (!val.empty())
        plot += fig.add_data(val) + " using 1:2 with linespoints lt " + std::to_string(lt) + " pt 7 title " +
                gnuplot_quote(name + " val") + ", ";
      ++lt;
    }
    if (plot == "plot ") return skip(title, "the runs have no logged steps yet");
    plot.resize(plot.size() - 2);
    fig.add("set title " + gnuplot_quote(title) + "\nset xlabel 'training tokens'\nset ylabel 'loss (nats/token)'");
    fig.add("set format x '%.0s%c'\nset key top right");
    fig.add(plot);
    emit("curves", title,
         "Training loss (EMA-smoothed, weight 0.1 per step; lines) and validation loss (points) against tokens.", fig);
  }

  // 2. IsoFLOP curves: loss against total non-embedding parameters, one curve per sparsity, a panel per budget,
  // with the fitted surface's slice per sparsity (dashed).
  void isoflop() {
    const std::string title = "IsoFLOP curves";
    if (budgets_.empty()) return skip(title, "no IsoFLOP sweep results");
    const IsoflopFit& fit = summary_.isoflop_fit;
    const Layout l = layout_for(budgets_.size());
    GnuplotFigure fig(l.width, l.height);
    fig.add(multiplot(l, title));
    for (double C : budgets_) {
      std::map<double, std::vector<std::vector<double>>> by_s;
      for (const auto* r : at_budget(C)) by_s[r->sparsity].push_back({double(r->nonembedding_params), L(*r)});
      const IsoflopBudget* surface = nullptr;
      for (const auto& b : fit.budgets)
        if (same_budget(b.C, C)) surface = &b;
      // The y range follows the runs, not the surface: a degree-2 slice can dive far below the data.
      double y_lo = 1e300, y_hi = -1e300;
      for (const auto& [s, pts] : by_s)
        for (const auto& p : pts) y_lo = std::min(y_lo, p[1]), y_hi = std::max(y_hi, p[1]);
      if (surface) y_lo = std::min(y_lo, surface->L_star);
      const double pad = std::max(0.12 * (y_hi - y_lo), 0.01);
      std::string plot = "plot ";
      int lt = 1;
      for (auto& [s, pts] : by_s) {
        std::sort(pts.begin(), pts.end());
        plot += fig.add_data(pts) + " using 1:2 with linespoints lt " + std::to_string(lt) + " pt 7 lw 1.5 title " +
                gnuplot_quote(sparsity_label(s)) + ", ";
        if (surface && pts.size() >= 2) {
          std::vector<std::vector<double>> line;
          const double lo = std::log(pts.front()[0]), hi = std::log(pts.back()[0]);
          for (int i = 0; i <= 40; ++i) {
            const double x = lo + (hi - lo) * i / 40.0;
            line.push_back({std::exp(x), surface->surface.at(x, -std::log(1 - s))});
          }
          plot += fig.add_data(line) + " using 1:2 with lines lt " + std::to_string(lt) + " dt 2 notitle, ";
        }
        ++lt;
      }
      if (surface) {
        std::vector<std::vector<double>> star{{surface->N_star, surface->L_star}};
        plot += fig.add_data(star) + " using 1:2 with points pt 3 ps 2.5 lc rgb 'black' title 'surface optimum N*', ";
      }
      plot.resize(plot.size() - 2);
      fig.add("set title " + gnuplot_quote("C = " + fmt("%.3g", C) + " FLOPs"));
      fig.add("set logscale x\nset format x '10^{%L}'\nset xlabel 'total non-embedding parameters N'\nset ylabel " +
              gnuplot_quote(loss_axis()) + "\nset key top left font ',9'");
      fig.add("set yrange [" + fmt("%.6g", y_lo - pad) + ":" + fmt("%.6g", y_hi + pad) + "]");
      fig.add(plot);
      fig.add("unset logscale x\nset autoscale y");
    }
    fig.add("unset multiplot");
    emit("isoflop", title,
         "Loss against total non-embedding parameters at fixed training FLOPs, one curve per sparsity (points: runs; "
         "dashed: the degree-2 IsoFLOP surface; cross: its optimum N*), one panel per budget.",
         fig);
  }

  // 3. Loss against sparsity at fixed size (fixed shape = fixed active parameters), a panel per budget.
  void loss_vs_sparsity() {
    const std::string title = "Loss against sparsity at fixed size";
    if (budgets_.empty()) return skip(title, "no IsoFLOP sweep results");
    const Layout l = layout_for(budgets_.size());
    GnuplotFigure fig(l.width, l.height);
    fig.add(multiplot(l, title));
    for (double C : budgets_) {
      std::map<std::pair<int64_t, int64_t>, std::vector<std::vector<double>>> by_shape;
      for (const auto* r : at_budget(C))
        by_shape[{r->d_model, r->n_layers}].push_back({r->sparsity, L(*r), double(r->active_params)});
      std::string plot = "plot ";
      int lt = 1;
      for (auto& [shape, pts] : by_shape) {
        std::sort(pts.begin(), pts.end());
        plot += fig.add_data(pts) + " using 1:2 with linespoints lt " + std::to_string(lt) + " pt 7 lw 1.5 title " +
                gnuplot_quote("d_model " + std::to_string(shape.first) + ", " + std::to_string(shape.second) +
                              " layers (" + fmt("%.2g", pts.front()[2]) + " active)") +
                ", ";
        ++lt;
      }
      plot.resize(plot.size() - 2);
      fig.add("set title " + gnuplot_quote("C = " + fmt("%.3g", C) + " FLOPs"));
      fig.add("set xlabel 'sparsity S = 1 - active experts / experts'\nset ylabel " + gnuplot_quote(loss_axis()) +
              "\nset key top left font ',9'\nset xrange [-0.05:1]");
      fig.add(plot);
    }
    fig.add("unset multiplot");
    emit("loss-vs-sparsity", title,
         "Loss against sparsity for each model shape (fixed active parameters per token), one panel per budget: "
         "sparsity 0 is the dense baseline.",
         fig);
  }

  // 4. The fitted sparsity law against the observations, with residuals.
  void law_fit() {
    const std::string title = "Fitted sparsity law against the runs";
    const LawFit& fit = summary_.sparsity_fit;
    if (!fit.fitted()) return skip(title, fit.skipped.empty() ? std::string("no fit") : fit.skipped);
    const std::vector<double>& theta = fit.theta;
    std::map<double, std::vector<std::vector<double>>> parity, residual;
    double lo = 1e300, hi = 0;
    for (const auto& ir : iso_) {
      const RunResult& r = *ir.result;
      Observation o;
      o.N = double(r.nonembedding_params), o.D = double(r.tokens), o.S = r.sparsity, o.C = r.budget, o.L = L(r);
      const double pred = law_loss(LawKind::Sparsity, theta, o);
      parity[r.budget].push_back({pred, o.L});
      residual[r.budget].push_back({r.sparsity, std::log(o.L) - std::log(pred)});
      lo = std::min({lo, pred, o.L}), hi = std::max({hi, pred, o.L});
    }
    GnuplotFigure fig(1140, 460);
    fig.add("set multiplot layout 1,2 title " + gnuplot_quote(title + " (Abnar et al. Eq. 6, RMSE of log L " +
                                                             fmt("%.4f", fit.rmse) + ")") +
            " font ',14'");
    std::string plot = "plot ";
    int lt = 1;
    for (const auto& [C, pts] : parity)
      plot += fig.add_data(pts) + " using 1:2 with points lt " + std::to_string(lt++) + " pt 7 title " +
              gnuplot_quote("C = " + fmt("%.3g", C)) + ", ";
    const double pad = 0.02 * (hi - lo);
    fig.add("set title 'observed against predicted'\nset xlabel 'predicted loss (nats/token)'\nset ylabel " +
            gnuplot_quote("observed " + loss_axis()) + "\nset key top left font ',9'");
    fig.add("set xrange [" + fmt("%.6g", lo - pad) + ":" + fmt("%.6g", hi + pad) + "]\nset yrange [" +
            fmt("%.6g", lo - pad) + ":" + fmt("%.6g", hi + pad) + "]");
    fig.add(plot + "x with lines lc rgb 'gray' dt 2 title 'observed = predicted'");
    fig.add("unset xrange\nunset yrange\nset autoscale");
    plot = "plot ";
    lt = 1;
    for (const auto& [C, pts] : residual)
      plot += fig.add_data(pts) + " using 1:2 with points lt " + std::to_string(lt++) + " pt 7 title " +
              gnuplot_quote("C = " + fmt("%.3g", C)) + ", ";
    fig.add("set title 'residuals'\nset xlabel 'sparsity S'\nset ylabel 'log observed - log predicted (nats, relative)'");
    fig.add("set xrange [-0.05:1]");
    fig.add(plot + "0 with lines lc rgb 'gray' dt 2 notitle");
    fig.add("unset multiplot");
    emit("law-fit", title,
         "Left: observed loss against the loss the fitted sparsity law predicts for each run (on the dashed line is "
         "a perfect fit); right: residuals in log loss against sparsity, coloured by budget.",
         fig);
  }

  // 5. The compute-optimal frontier: N*(C) and S*(C) of the IsoFLOP surfaces with bootstrap intervals, the fitted
  // frontier, and the recommendation of the sparsity law at the largest budget.
  void frontier() {
    const std::string title = "Compute-optimal frontier";
    const IsoflopFit& fit = summary_.isoflop_fit;
    if (!fit.skipped.empty()) return skip(title, fit.skipped);
    if (fit.budgets.empty()) return skip(title, "no IsoFLOP fit");
    std::vector<std::vector<double>> n_pts, s_pts;
    for (const auto& b : fit.budgets) {
      const Range n = b.N_star_interval.value_or(Range{}), s = b.S_star_interval.value_or(Range{});
      n_pts.push_back({b.C, b.N_star, n.lo, n.hi});
      s_pts.push_back({b.C, b.S_star, s.lo, s.hi});
    }
    GnuplotFigure fig(1140, 460);
    fig.add("set multiplot layout 1,2 title " + gnuplot_quote(title) + " font ',14'");
    fig.add("set logscale x\nset xlabel 'training compute C (FLOPs)'\n" + budget_tics(budgets_));
    fig.add("set logscale y\nset format y '10^{%L}'\nset ylabel 'optimal non-embedding parameters N*'");
    fig.add("set key top left font ',9'\nset title 'N* per budget (IsoFLOP surfaces, 95% bootstrap interval)'");
    const double c_lo = n_pts.front()[0] / 1.5, c_hi = n_pts.back()[0] * 1.5;
    fig.add("set xrange [" + fmt("%.6g", c_lo) + ":" + fmt("%.6g", c_hi) + "]");
    std::string plot = "plot " + fig.add_data(n_pts) +
                       " using 1:2:3:4 with yerrorbars lt 1 pt 7 ps 1.3 title 'N* of the surface', ";
    if (fit.N_star_frontier) {
      const double a = (*fit.N_star_frontier)[0], k = (*fit.N_star_frontier)[1];
      plot += "exp(" + fmt("%.9g", k) + ") * x**" + fmt("%.9g", a) + " with lines lt 1 dt 2 title " +
              gnuplot_quote("fit: N* ~ C^{" + fmt("%.2f", a) + "}") + ", ";
    }
    const Recommendation& rec = summary_.recommendation;
    const LawOptimum* law = rec.sparsity_law && rec.sparsity_law->has_optimum ? &*rec.sparsity_law : nullptr;
    if (law) {
      const Range iv = law->N_interval.value_or(Range{});
      std::vector<std::vector<double>> p{{rec.budget * 1.08, law->N, iv.lo, iv.hi}};
      plot += fig.add_data(p) + " using 1:2:3:4 with yerrorbars lt 7 pt 5 ps 1.3 title 'sparsity-law optimum', ";
    }
    plot.resize(plot.size() - 2);
    fig.add(plot);
    fig.add("unset logscale y\nset format y '%g'\nset ylabel 'optimal sparsity S*'\nset yrange [-0.05:1]");
    fig.add("set title 'S* per budget (95% bootstrap interval)'");
    plot = "plot " + fig.add_data(s_pts) + " using 1:2:3:4 with yerrorbars lt 2 pt 7 ps 1.3 title 'S* of the surface', ";
    if (law) {
      const Range iv = law->S_interval.value_or(Range{});
      std::vector<std::vector<double>> p{{rec.budget * 1.08, law->S, iv.lo, iv.hi}};
      plot += fig.add_data(p) + " using 1:2:3:4 with yerrorbars lt 7 pt 5 ps 1.3 title 'sparsity-law optimum', ";
    }
    plot.resize(plot.size() - 2);
    fig.add(plot);
    fig.add("unset multiplot");
    emit("frontier", title,
         "Compute-optimal total parameters N* (left) and sparsity S* (right) against training FLOPs: per-budget optima "
         "of the IsoFLOP surfaces with 95% bootstrap intervals, the power-law fit through them, and the sparsity "
         "law's recommendation at the largest budget.",
         fig);
  }

  // 6. The compute multiplier: best dense and best MoE loss per budget, the dense power law, and how much more
  // compute dense needs for the MoE loss.
  void multiplier() {
    const std::string title = "Compute-efficiency multiplier (dense compute for the MoE loss)";
    const ComputeMultiplier& m = summary_.compute_multiplier;
    if (!m.per_budget) return skip(title, m.skipped.empty() ? std::string("no dense baselines") : m.skipped);
    if (m.per_budget->empty()) return skip(title, "no budget has an MoE run");
    std::vector<std::vector<double>> dense, moe, arrows;
    for (const auto& row : summary_.per_budget) {
      if (row.best_dense) dense.push_back({row.C, row.best_dense->loss});
      if (row.best_moe) moe.push_back({row.C, row.best_moe->loss});
    }
    double c_lo = budgets_.front(), c_hi = budgets_.back();
    for (const auto& row : *m.per_budget) {
      const double C = row.C, Cd = row.dense_compute_for_moe_loss, Lm = row.moe_loss;
      arrows.push_back({C, Lm, Cd - C, 0});
      c_lo = std::min(c_lo, Cd), c_hi = std::max(c_hi, Cd);
    }
    const double a = (*m.dense_frontier)[0], b = (*m.dense_frontier)[1];
    const auto& last = m.per_budget->back();
    GnuplotFigure fig(900, 520);
    fig.add("set title " + gnuplot_quote(title + ": " + fmt("%.2f", last.multiplier) + "x at C = " +
                                         fmt("%.3g", last.C)));
    fig.add("set logscale x\nset xlabel 'training compute C (FLOPs)'\nset ylabel " +
            gnuplot_quote("best " + loss_axis() + " at C") + "\nset key top right\n" + budget_tics(budgets_));
    fig.add("set xrange [" + fmt("%.6g", c_lo / 1.6) + ":" + fmt("%.6g", c_hi * 1.6) + "]");
    fig.add("plot exp(" + fmt("%.9g", a) + ") * x**(" + fmt("%.9g", b) + ") with lines lt 1 dt 2 title " +
            gnuplot_quote("dense power law L = e^{a} C^{b}, b = " + fmt("%.3f", b)) + ", " + fig.add_data(dense) +
            " using 1:2 with points lt 1 pt 7 ps 1.5 title 'best dense run', " + fig.add_data(moe) +
            " using 1:2 with points lt 2 pt 5 ps 1.5 title 'best MoE run', " + fig.add_data(arrows) +
            " using 1:2:3:4 with vectors lt 2 dt 3 head filled title 'to the dense compute with the same loss'");
    emit("compute-multiplier", title,
         "Best dense and best MoE loss per budget; the arrow runs from each MoE point to the compute at which the "
         "dense power law reaches the same loss (longer arrow to the right: MoE saves more compute).",
         fig);
  }

  // 7. Granularity: loss against G at fixed shape and tokens.
  void granularity() {
    const std::string title = "Granularity comparison";
    const auto& g = summary_.granularity;
    if (g.empty()) return skip(title, "no granularity sweep in the study");
    // One curve per shape and budget (or token count, for a sweep over D).
    std::map<std::pair<int64_t, double>, std::vector<std::vector<double>>> moe;
    std::map<std::pair<int64_t, double>, double> dense;
    std::set<double> by_budget;
    for (const auto& [r, sweep] : g) {
      const double b = r.budget;
      if (b > 0) by_budget.insert(b);
      const std::pair<int64_t, double> key{r.d_model, b > 0 ? b : static_cast<double>(r.tokens)};
      if (r.experts > 0)
        moe[key].push_back({double(r.granularity), r.loss});
      else
        dense[key] = r.loss;
    }
    GnuplotFigure fig(900, 500);
    fig.add("set title " + gnuplot_quote(title + " (E*G experts of size d_ff/G, G active: equal active parameters)"));
    fig.add("set logscale x 2\nset xlabel 'granularity G'\nset ylabel " + gnuplot_quote(loss_axis()) +
            "\nset key outside right font ',9'\nset xrange [0.8:*]");
    std::string plot = "plot ";
    int lt = 1;
    for (auto& [key, pts] : moe) {
      std::sort(pts.begin(), pts.end());
      const std::string label = "d_model " + std::to_string(key.first) + ", " + fmt("%.3g", key.second) +
                                (by_budget.count(key.second) ? " FLOPs" : " tokens");
      plot += fig.add_data(pts) + " using 1:2 with linespoints lt " + std::to_string(lt) + " pt 7 lw 1.5 title " +
              gnuplot_quote(label) + ", ";
      if (dense.count(key))
        plot += fmt("%.9g", dense[key]) + " with lines lt " + std::to_string(lt) + " dt 2 title " +
                gnuplot_quote(label + " dense") + ", ";
      ++lt;
    }
    if (plot == "plot ") return skip(title, "no MoE runs in the granularity sweep finished");
    plot.resize(plot.size() - 2);
    fig.add(plot);
    emit("granularity", title,
         "Loss against expert granularity G at a fixed shape and FLOP budget (or token count) (solid), with the dense "
         "model of the same shape and budget (dashed).",
         fig);
  }

  // 7b. Loss against sparsity at fixed total parameters (Abnar et al.'s U-shape).
  void fixed_params() {
    const std::string title = "Loss against sparsity at fixed total parameters";
    const auto& groups = summary_.fixed_params;
    if (groups.empty()) return skip(title, "no fixed_params sweep in the study");
    GnuplotFigure fig(900, 500);
    fig.add("set title " + gnuplot_quote(title));
    fig.add("set xlabel 'sparsity S (experts: 1/(1-S) at top-1)'\nset ylabel " + gnuplot_quote(loss_axis()) +
            "\nset key outside right font ',9'\nset logscale x 2\n"
            "set xtics ('0' 1, '0.5' 2, '0.75' 4, '0.875' 8, '0.9375' 16, '0.96875' 32, '0.984' 64, '0.992' 128)");
    double x_max = 1;
    for (const auto& g : groups)
      for (const auto& p : g.points) x_max = std::max(x_max, 1 / (1 - p.run.sparsity));
    fig.add("set xrange [0.8:" + fmt("%.6g", x_max * 1.25) + "]");
    std::string plot = "plot ";
    int lt = 1;
    for (const auto& g : groups) {
      std::vector<std::vector<double>> pts;
      for (const auto& p : g.points) pts.push_back({1 / (1 - p.run.sparsity), p.run.loss});
      if (pts.empty()) continue;
      const std::string label = "N " + fmt("%.3g", g.params) + (g.by_budget ? ", C " : ", D ") + fmt("%.3g", g.key);
      plot += fig.add_data(pts) + " using 1:2 with linespoints lt " + std::to_string(lt++) + " pt 7 lw 1.5 title " +
              gnuplot_quote(label) + ", ";
    }
    if (plot == "plot ") return skip(title, "no finished runs in the fixed_params sweep");
    plot.resize(plot.size() - 2);
    fig.add(plot);
    emit("fixed-params", title,
         "Loss against sparsity with the total parameter count held fixed (each point is the ladder shape whose total "
         "parameters are nearest N at that sparsity; seeds averaged) at one FLOP budget: a sparser model has fewer "
         "active parameters and so trains on more tokens. Abnar et al. find this curve U-shaped.",
         fig);
  }

  // 8. Downstream accuracy against validation loss, a panel per task.
  void downstream() {
    const std::string title = "Downstream accuracy against validation loss";
    const auto& d = summary_.downstream;
    if (d.empty()) return skip(title, "no downstream evaluations in the results stores (moelab eval --tasks)");
    std::map<std::string, std::map<std::string, std::vector<std::vector<double>>>> by_task;  // task -> series -> pts
    for (const auto& r : d) {
      if (!std::isfinite(r.loss)) continue;
      const std::string mode = r.mode == "finetune"
                                   ? std::string("fine-tuned")
                                   : (r.shots == 0 ? std::string("zero-shot") : std::to_string(r.shots) + "-shot");
      const std::string series = mode + (r.moe ? " MoE" : " dense");
      by_task[r.task][series].push_back({r.loss, r.acc, r.acc_stderr});
    }
    if (by_task.empty()) return skip(title, "downstream rows name runs that are not in the study");
    const Layout l = layout_for(by_task.size());
    GnuplotFigure fig(l.width, l.height);
    fig.add(multiplot(l, title));
    for (const auto& [task, series] : by_task) {
      std::string plot = "plot ";
      int lt = 1;
      std::map<std::string, int> mode_lt;
      for (const auto& [name, pts] : series) {
        const std::string mode = name.substr(0, name.find(' '));
        if (!mode_lt.count(mode)) mode_lt[mode] = lt++;
        const bool moe = name.find("MoE") != std::string::npos;
        plot += fig.add_data(pts) + " using 1:2:3 with yerrorbars lt " + std::to_string(mode_lt[mode]) + " pt " +
                (moe ? "5" : "7") + " title " + gnuplot_quote(name) + ", ";
      }
      plot.resize(plot.size() - 2);
      fig.add("set title " + gnuplot_quote(task));
      fig.add("set xlabel " + gnuplot_quote(loss_axis()) + "\nset ylabel 'accuracy (fraction, ±1 s.e.)'\nset key "
              "top right font ',9'\nset yrange [0:1]");
      fig.add(plot);
    }
    fig.add("unset multiplot");
    emit("downstream", title,
         "Accuracy of every evaluated run against its validation loss, per task (circles dense, squares MoE; colour: "
         "zero-shot, few-shot, fine-tuned; bars: one standard error).",
         fig);
  }

  // 9. Router load per expert per layer of the best MoE run at the largest budget (and the most sparse one).
  void router_load() {
    const std::string title = "Router load per expert and layer";
    const RunResult* pick = nullptr;
    const StudySweep* from = nullptr;
    if (!budgets_.empty())
      for (const auto* r : at_budget(budgets_.back()))
        if (r->experts > 0 && (!pick || L(*r) < L(*pick))) pick = r, from = sweep_of(r);
    if (!pick) {
      for (const auto& s : study_.sweeps)
        for (const auto& r : s.results)
          if (r.status == "ok" && r.experts > 0 && !pick) pick = &r, from = &s;
    }
    if (!pick) return skip(title, "no MoE run in the study");
    const RunCurves c = read_run_curves(from->run_dir(pick->name));
    if (c.router_load.empty()) return skip(title, "the MoE run logged no router statistics");
    std::vector<std::vector<double>> cells;  // (expert, layer, load relative to uniform)
    size_t experts = 0;
    for (size_t layer = 0; layer < c.router_load.size(); ++layer) {
      const auto& t = c.router_load[layer];
      experts = std::max(experts, t.size());
      double total = 0;
      for (double v : t) total += v;
      for (size_t e = 0; e < t.size(); ++e)
        cells.push_back({double(e), double(layer), total > 0 ? t[e] * double(t.size()) / total : 0.0});
    }
    GnuplotFigure fig(900, 180 + 70 * int(c.router_load.size()));
    fig.add("set title " + gnuplot_quote(title + ": " + pick->name + " (last step)"));
    fig.add("set xlabel 'expert'\nset ylabel 'MoE layer'\nset cblabel 'share of choices / uniform share'");
    fig.add("set xrange [-0.5:" + fmt("%.1f", experts - 0.5) + "]\nset yrange [-0.5:" +
            fmt("%.1f", c.router_load.size() - 0.5) + "]\nset xtics 1\nset ytics 1\nset grid noxtics noytics");
    fig.add("unset key");
    fig.add("set palette defined (0 '#f7fbff', 1 '#6baed6', 2 '#08306b', 3 '#d7301f')\nset cbrange [0:*]");
    fig.add("plot " + fig.add_data(cells) + " using 1:2:3 with image pixels notitle, '' using 1:2:(sprintf('%.2f', $3)) with "
            "labels font ',9' notitle");
    std::string overload;
    for (double o : c.router_overload)
      if (o > 0) overload += (overload.empty() ? "" : ", ") + fmt("%.2f", o);
    emit("router-load", title,
         "The share of the router's choices each expert got at the last training step, relative to an even split "
         "(1.0), per MoE layer, for " + pick->name + "." +
             (overload.empty() ? std::string()
                               : " Overload factor (most loaded expert / mean) per layer: " + overload + "."),
         fig);
  }

  const Study& study_;
  const StudySummary& summary_;
  std::string dir_;
  std::ostream& log_;
  std::string col_;
  std::vector<IsoRun> iso_;
  std::vector<double> budgets_;
};

std::string table_html(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::string out = "<table><tr>";
  for (const auto& h : header) out += "<th>" + html_escape(h) + "</th>";
  out += "</tr>\n";
  for (const auto& row : rows) {
    out += "<tr>";
    for (const auto& cell : row) out += "<td>" + html_escape(cell) + "</td>";
    out += "</tr>\n";
  }
  return out + "</table>\n";
}

std::string interval_text(const std::optional<Range>& iv) {
  if (!iv) return "";
  return "[" + fmt("%.3g", iv->lo) + ", " + fmt("%.3g", iv->hi) + "]";
}

std::string number_text(double x, const char* format) { return std::isfinite(x) ? fmt(format, x) : std::string("-"); }

// "dense: runs 27, budgets 3, replicates 3; moe: ..." from a claim's n_per_arm record.
std::string arm_counts_text(const nlohmann::ordered_json& n_per_arm) {
  std::string n;
  for (const auto& [arm, v] : n_per_arm.items()) {
    std::string counts;
    if (v.is_object())
      for (const auto& [what, k] : v.items()) counts += (counts.empty() ? "" : ", ") + what + " " + k.dump();
    n += (n.empty() ? "" : "; ") + arm + ": " + (v.is_object() ? counts : v.dump());
  }
  return n.empty() ? "-" : n;
}

// The findings table (each claim: measured, estimate with its interval, detectable effect, runs per arm, verdict),
// the seed spread, the pairing table and the edge warnings.
void findings_html(std::ostream& h, const Findings& f) {
  h << "<h2 id=\"findings\">Findings: the three studies' claims at this scale</h2>\n<p>Each claim, what this study "
       "measured, and a verdict from every run: an estimate fitted to all shapes and replicates, its 95% t interval "
       "over replicates (paired by data order where arms share it), and the smallest effect this design detects "
       "(80% power, 5% two-sided). Reproduced or not reproduced when the interval excludes 0, otherwise "
       "inconclusive (docs/report.md, \"Findings\").</p>\n";
  std::vector<std::vector<std::string>> rows;
  for (const auto& c : f.claims) {
    std::string estimate = "-";
    if (std::isfinite(c.estimate))
      estimate = number_text(c.estimate, "%+.4g") + " [" + number_text(c.lo, "%+.3g") + ", " +
                 number_text(c.hi, "%+.3g") + "] " + c.unit;
    rows.push_back({c.claim, c.source, c.measured, estimate, number_text(c.detectable_effect, "%.3g"),
                    arm_counts_text(c.n_per_arm), c.verdict + (c.why.empty() ? "" : ": " + c.why)});
  }
  h << table_html({"claim", "study", "measured here", "estimate [95% interval]", "detectable effect", "n per arm",
                   "verdict"},
                  rows);
  if (std::isfinite(f.seed_sd))
    h << "<p class=\"note\">Seed spread: the pooled sd of the loss over replicates of one configuration is "
      << fmt("%.4f", f.seed_sd) << ".</p>\n";
  if (!f.pairing.empty()) {
    std::vector<std::vector<std::string>> prow;
    for (const auto& p : f.pairing)
      prow.push_back({fmt("%.3g", p.C), p.comparison, std::to_string(p.replicates), number_text(p.se_paired, "%.4f"),
                      number_text(p.se_unpaired, "%.4f"), number_text(p.variance_ratio, "%.2f"),
                      number_text(p.correlation, "%.2f")});
    h << "<p class=\"note\">What pairing by data order bought: the standard error of each dense-minus-MoE "
         "difference of minima paired by replicate, against Welch's unpaired one over the same per-replicate "
         "minima, and the correlation of the two arms' per-replicate minima.</p>\n";
    h << table_html({"C", "comparison", "replicates", "se paired", "se unpaired", "variance ratio", "correlation"},
                    prow);
  }
  for (const auto& w : f.edge_warnings) h << "<p class=\"note\">Warning: " << html_escape(w) << "</p>\n";
}

// ---- the page, one function per section, each writing its HTML to h --------------------------------------------

void page_head(std::ostream& h, const Study& study, const StudySummary& s) {
  h << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>moelab report: "
    << html_escape(fs::path(study.dir).filename().string()) << "</title>\n<style>\n"
    << "body{font-family:'DejaVu Sans',sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}\n"
    << "h1{font-size:24px}h2{font-size:19px;margin-top:34px;border-bottom:1px solid #ddd}\n"
    << ".headline{background:#eef5ff;border-left:4px solid #2b6cb0;padding:12px 16px;font-size:15px;line-height:1.5}\n"
    << "figure{margin:18px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#444;font-size:14px}\n"
    << "table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}\n"
    << ".note{color:#555;font-size:13px}code{background:#f4f4f4;padding:1px 4px}\n</style></head>\n<body>\n";
  h << "<h1>moelab report: " << html_escape(study.dir) << "</h1>\n";
  h << "<p class=\"headline\" id=\"headline\">" << html_escape(s.headline) << "</p>\n";
  findings_html(h, s.findings);
  h << "<p class=\"note\">Every number on this page is in <a href=\"summary.json\">summary.json</a>, computed from the "
       "results stores (results.db, one row per run) and the runs' metrics.jsonl; L is the run's <code>"
    << html_escape(s.loss_column)
    << "</code> at the end of training. Figures are SVG drawn by gnuplot; their scripts with the data inline are in "
       "figures/*.gp.</p>\n";
}

void sweeps_html(std::ostream& h, const StudySummary& s) {
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Sweeps</h2>\n";
  for (const auto& sw : s.sweeps)
    rows.push_back({sw.label, sw.kind, std::to_string(sw.runs_planned), std::to_string(sw.runs_ok),
                    std::to_string(sw.runs_failed), std::to_string(sw.downstream_rows), sw.dir});
  h << table_html({"sweep", "kind", "runs planned", "ok", "failed", "downstream rows", "directory"}, rows);
}

// The best configuration per budget and the compute multiplier.
void per_budget_html(std::ostream& h, const StudySummary& s) {
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Best configuration per budget</h2>\n";
  auto brief = [](const std::optional<RunBrief>& r) {
    return r ? r->name + " (" + fmt("%.4f", r->loss) + ")" : std::string("-");
  };
  for (const auto& b : s.per_budget) rows.push_back({fmt("%.3g", b.C), brief(b.best), brief(b.best_dense), brief(b.best_moe)});
  h << table_html({"budget C (FLOPs)", "best run (L)", "best dense (L)", "best MoE (L)"}, rows);
  const ComputeMultiplier& m = s.compute_multiplier;
  if (m.per_budget) {
    rows.clear();
    for (const auto& r : *m.per_budget)
      rows.push_back({fmt("%.3g", r.C), fmt("%.4f", r.moe_loss), r.dense_loss ? fmt("%.4f", *r.dense_loss) : "-",
                      fmt("%.3g", r.dense_compute_for_moe_loss), fmt("%.2f", r.multiplier), r.extrapolated ? "yes" : "no"});
    h << "<p>Compute multiplier: the FLOPs at which the dense power law (log L = a + b log C through the best dense "
         "run of each budget; b = "
      << fmt("%.4f", (*m.dense_frontier)[1]) << ") reaches the best MoE loss, over C.</p>\n";
    h << table_html({"budget C", "best MoE L", "best dense L", "dense FLOPs for the MoE L", "multiplier",
                     "extrapolated"},
                    rows);
  } else if (!m.skipped.empty()) {
    h << "<p class=\"note\">Compute multiplier: " << html_escape(m.skipped) << "</p>\n";
  }
}

// The pair's downstream rows: per task, mode and shots, each side's accuracy (before -> after when fine-tuned).
void pair_downstream_rows(const DenseMoePair& pair, std::vector<std::vector<std::string>>& rows) {
  auto find = [](const PairSide& side, const std::string& task, const std::string& mode, int64_t shots) -> const PairTask* {
    if (side.downstream)
      for (const auto& t : *side.downstream)
        if (t.task == task && t.mode == mode && (mode == "finetune" || t.shots == shots)) return &t;
    return nullptr;
  };
  std::set<std::tuple<std::string, std::string, int64_t>> keys;
  for (const auto* side : {&pair.dense, &pair.moe})
    if (side->downstream)
      for (const auto& t : *side->downstream) keys.insert({t.task, t.mode, t.mode == "finetune" ? 0 : t.shots});
  for (const auto& [task, mode, shots] : keys) {
    const PairTask *a = find(pair.dense, task, mode, shots), *b = find(pair.moe, task, mode, shots);
    auto text = [&](const PairTask* t) {
      if (!t) return std::string("-");
      std::string x = fmt("%.3f", t->acc) + " ± " + fmt("%.3f", t->acc_stderr);
      if (t->before) x = fmt("%.3f", t->before_acc()) + " -> " + x;
      return x;
    };
    const std::string label = task + (mode == "finetune" ? " fine-tuned" : mode == "few" ? " " + std::to_string(shots) + "-shot" : " zero-shot") +
                              " accuracy (n " + std::to_string((a ? a : b)->n) + ")";
    std::string diff = "-";
    if (a && b) {
      diff = fmt("%+.3f", a->acc - b->acc);
      if (a->before && b->before)
        diff = "gain " + fmt("%+.3f", a->acc - a->before_acc()) + " vs " + fmt("%+.3f", b->acc - b->before_acc());
    }
    rows.push_back({label, text(a), text(b), diff});
  }
}

// The dense-vs-MoE pair of the largest budget, in domain, out of domain, downstream.
void pair_html(std::ostream& h, const StudySummary& s) {
  const DenseMoePair& pair = s.dense_vs_moe_pair;
  if (!pair.skipped.empty()) return;
  h << "<h2>Dense and MoE at equal FLOPs (C = " << fmt("%.3g", pair.C)
    << ")</h2>\n<p>The best dense and the best MoE run of the largest budget, in domain (validation loss), on each "
       "out-of-domain set, zero- and few-shot, and fine-tuned (before -> after, on the same test items).</p>\n";
  const PairSide &dn = pair.dense, &mo = pair.moe;
  auto difference = [](double a, double b) {
    return std::isfinite(a) && std::isfinite(b) ? fmt("%+.4f", a - b) : std::string("-");
  };
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"run", dn.name, mo.name, ""});
  rows.push_back({"validation loss (in domain)", number_text(dn.val_loss, "%.4f"), number_text(mo.val_loss, "%.4f"),
                  difference(dn.val_loss, mo.val_loss)});
  for (const auto& [k, v] : dn.ood_losses) {
    const auto it = mo.ood_losses.find(k);
    const double m = it == mo.ood_losses.end() ? kNaN : it->second;
    rows.push_back({k + " (out of domain)", number_text(v, "%.4f"), number_text(m, "%.4f"), difference(v, m)});
  }
  pair_downstream_rows(pair, rows);
  h << table_html({"", "dense", "MoE", "dense - MoE (loss) / dense - MoE (accuracy)"}, rows);
}

// The optimal granularity per budget, measured and by the law.
void granularity_html(std::ostream& h, const StudySummary& s) {
  if (s.granularity_optimum.empty()) return;
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Optimal granularity per budget</h2>\n<p>The measured best G over the granularity sweep's shapes at each "
       "budget, and the fitted granularity law's best G at that run's shape (its parameters and tokens carried to "
       "G = 16 and 32 along the measured runs' trend in G).</p>\n";
  for (const auto& r : s.granularity_optimum) {
    std::string law = "-";
    if (r.has_law && r.law_skipped.empty()) law = fmt("%g", r.law_G_star) + " (L " + fmt("%.4f", r.law_loss) + ")";
    std::string curve;
    for (const auto& p : r.curve_at_best_shape)
      curve += (curve.empty() ? "" : ", ") + std::string("G ") + std::to_string(p.G) + ": " + fmt("%.4f", p.loss);
    rows.push_back({(r.by_budget ? "C " : "D ") + fmt("%.3g", r.key), std::to_string(r.G_star) + (r.on_edge ? " (edge)" : ""),
                    r.best.name, curve, r.dense ? fmt("%.4f", r.dense->loss) : "-", law});
  }
  h << table_html({"budget", "measured G*", "best run", "L by G at its shape", "best dense L", "law G*"}, rows);
  const LawFit& gf = s.granularity_fit;
  if (!gf.skipped.empty()) {
    h << "<p class=\"note\">Granularity law: " << html_escape(gf.skipped) << "</p>\n";
  } else if (!gf.coefficients.empty()) {
    std::string coef;
    for (const auto& [k, v] : gf.coefficients) coef += (coef.empty() ? "" : ", ") + k + " " + fmt("%.4g", v);
    h << "<p>Granularity law L = c + (g/G^&gamma; + a)/N^&alpha; + b/D^&beta; fitted on " << gf.n_points
      << " MoE runs: " << html_escape(coef) << " (RMSE of log L " << fmt("%.4f", std::isfinite(gf.rmse) ? gf.rmse : 0.0)
      << ").</p>\n";
    if (!gf.degenerate.empty()) h << "<p class=\"note\">Warning: " << html_escape(gf.degenerate) << ".</p>\n";
  }
}

// Fixed total parameters: loss against S.
void fixed_params_html(std::ostream& h, const StudySummary& s) {
  for (const auto& g : s.fixed_params) {
    h << "<h2>Fixed total parameters: N " << fmt("%.3g", g.params) << (g.by_budget ? " at C " : " at D ")
      << fmt("%.3g", g.key) << "</h2>\n";
    std::vector<std::vector<std::string>> rows;
    for (const auto& p : g.points)
      rows.push_back({fmt("%.4g", p.run.sparsity), p.run.name, std::to_string(p.run.d_model), std::to_string(p.run.experts),
                      fmt("%.4g", static_cast<double>(p.run.active_params)),
                      fmt("%.4g", static_cast<double>(p.run.tokens)), fmt("%.4f", p.run.loss), std::to_string(p.seeds)});
    h << table_html({"S", "run", "d_model", "experts", "active params", "tokens", "L", "seeds"}, rows);
  }
}

// Which law extrapolates best.
void law_comparison_html(std::ostream& h, const StudySummary& s) {
  const LawComparison& c = s.law_comparison;
  if (!c.skipped.empty()) {
    h << "<p class=\"note\">Law comparison: " << html_escape(c.skipped) << "</p>\n";
    return;
  }
  h << "<h2>Which law extrapolates best</h2>\n<p>Every law the runs' columns allow, fitted without the held-out "
       "runs ("
    << html_escape(c.holdout)
    << ") and ranked by the RMSE of log L in predicting them; the interval is over bootstrap refits "
       "(docs/fitting.md, fit --law compare).</p>\n";
  std::vector<std::vector<std::string>> rows;
  int rank = 1;
  for (const auto& r : c.ranking)
    rows.push_back({std::to_string(rank++), r.law, fmt("%.4g", r.heldout_rmse),
                    r.heldout_interval ? "[" + fmt("%.3g", r.heldout_interval->lo) + ", " +
                                             fmt("%.3g", r.heldout_interval->hi) + "]"
                                       : "-",
                    fmt("%.4g", r.rmse), std::to_string(r.parameters)});
  h << table_html({"rank", "law", "held-out RMSE (log L)", "95% bootstrap", "in-sample RMSE", "parameters"}, rows);
  for (const auto& [law, reason] : c.not_fitted)
    h << "<p class=\"note\">Not fitted: " << html_escape(law) << " (" << html_escape(reason) << ")</p>\n";
}

// The fitted sparsity law's recommendation.
void recommendation_html(std::ostream& h, const StudySummary& s) {
  const Recommendation& rec = s.recommendation;
  if (!rec.sparsity_law || !rec.sparsity_law->has_optimum) return;
  const LawOptimum& o = *rec.sparsity_law;
  h << "<h2>Recommendation of the fitted sparsity law at C = " << fmt("%.3g", rec.budget) << "</h2>\n";
  std::vector<std::vector<std::string>> rows = {
      {"N (total non-embedding)", fmt("%.4g", o.N), interval_text(o.N_interval)},
      {"D (tokens)", fmt("%.4g", o.D), interval_text(o.D_interval)},
      {"S (sparsity)", fmt("%.4g", o.S), interval_text(o.S_interval)},
      {"predicted loss", fmt("%.4f", o.loss), interval_text(o.loss_interval)}};
  h << table_html({"quantity", "optimum", "95% bootstrap interval"}, rows);
  h << "<p class=\"note\">Under the law's constraint " << html_escape(o.constraint)
    << " (the papers' 6 N D convention; the runs' budgets count every matrix product exactly, embeddings "
       "included, so this optimum is an extrapolation of the fit, not a measured run).</p>\n";
}

void figures_html(std::ostream& h, const std::vector<ReportFigure>& figures, const std::vector<std::string>& skipped) {
  h << "<h2>Figures</h2>\n";
  for (const auto& f : figures) {
    h << "<figure id=\"fig-" << f.id << "\"><img alt=\"" << html_escape(f.title) << "\" src=\"data:image/svg+xml;base64,"
      << base64(f.svg) << "\">\n<figcaption><b>" << html_escape(f.title) << ".</b> " << html_escape(f.caption)
      << " (<a href=\"figures/" << f.id << ".svg\">svg</a>, <a href=\"figures/" << f.id
      << ".gp\">gnuplot script</a>)</figcaption></figure>\n";
  }
  if (!skipped.empty()) {
    h << "<p class=\"note\">Not drawn:</p><ul class=\"note\">";
    for (const auto& sk : skipped) h << "<li>" << html_escape(sk) << "</li>";
    h << "</ul>\n";
  }
}

void downstream_html(std::ostream& h, const StudySummary& s) {
  if (s.downstream.empty()) return;
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Downstream evaluation</h2>\n";
  for (const auto& d : s.downstream)
    rows.push_back({d.run, d.task, d.mode, std::to_string(d.shots),
                    fmt("%.3f", d.acc) + " ± " + fmt("%.3f", d.acc_stderr),
                    fmt("%.3f", d.acc_norm) + " ± " + fmt("%.3f", d.acc_norm_stderr), std::to_string(d.n),
                    number_text(d.loss, "%.4f")});
  h << table_html({"run", "task", "mode", "shots", "accuracy ± s.e.", "length-normalised ± s.e.", "items", "L"}, rows);
}

void all_runs_html(std::ostream& h, const Study& study) {
  h << "<h2>All runs</h2>\n";
  for (const auto& sw : study.sweeps) {
    std::vector<std::vector<std::string>> rows;
    for (const auto& r : sw.results)
      rows.push_back({r.name, r.status, fmt("%.3g", double(r.nonembedding_params)), fmt("%.3g", double(r.active_params)),
                      fmt("%.3g", double(r.tokens)), fmt("%.3g", r.flops), fmt("%.4g", r.sparsity),
                      std::to_string(r.granularity), fmt("%.4f", r.smoothed_loss), fmt("%.4f", r.val_loss),
                      fmt("%.0f", r.train_seconds)});
    h << "<h3>" << html_escape(sw.label) << "</h3>\n";
    h << table_html({"run", "status", "non-emb. params", "active params", "tokens", "FLOPs", "S", "G",
                     "train loss (last 10%)", "val loss", "train s"},
                    rows);
  }
}

std::string page(const Study& study, const StudySummary& s, const std::vector<ReportFigure>& figures,
                 const std::vector<std::string>& skipped) {
  std::ostringstream h;
  page_head(h, study, s);
  sweeps_html(h, s);
  if (!s.per_budget.empty()) {
    per_budget_html(h, s);
    pair_html(h, s);
    granularity_html(h, s);
    fixed_params_html(h, s);
    law_comparison_html(h, s);
    recommendation_html(h, s);
  }
  figures_html(h, figures, skipped);
  downstream_html(h, s);
  all_runs_html(h, study);
  // Self-check for the browser test (tests/test_report_browser.sh): every image decoded, no script error.
  h << "<script>\nwindow.__errors = [];\nwindow.addEventListener('error', e => window.__errors.push(String(e.message)));\n"
       "window.addEventListener('load', () => {\n"
       "  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);\n"
       "  const status = broken.length ? 'broken images: ' + broken.join('; ') :\n"
       "      (window.__errors.length ? 'errors: ' + window.__errors.join('; ') : 'ok');\n"
       "  document.body.setAttribute('data-report-check', status);\n"
       "  document.body.setAttribute('data-report-images', String(document.images.length));\n"
       "});\n</script>\n";
  h << "</body></html>\n";
  return h.str();
}

}  // namespace

ReportResult write_report(const std::string& study_dir, const ReportOptions& options, std::ostream& log) {
  const Study study = load_study(study_dir);
  ReportResult result;
  const std::string out = options.out_dir.empty() ? (fs::path(study.dir) / "report").string() : options.out_dir;
  log << "moelab report: " << study.sweeps.size() << " sweep(s), " << study.single_runs.size()
      << " single run(s) in " << study.dir << "\n";
  log << "  fitting (bootstrap " << options.analysis.bootstrap << ")\n" << std::flush;
  result.summary = analyse_study(study, options.analysis);
  const std::string figures_dir = (fs::path(out) / "figures").string();
  fs::create_directories(figures_dir);
  if (!gnuplot_available())
    throw Error("gnuplot is not installed: install Debian's gnuplot-nox (scripts/install-deps.sh does it)");
  Builder builder(study, result.summary, figures_dir, log);
  builder.build_all();
  result.figures = builder.figures;
  result.skipped = builder.skipped;
  for (const auto& f : result.figures)
    result.summary.figures.push_back({f.id, f.title, f.caption, "figures/" + f.id + ".svg"});
  result.summary.figures_skipped = result.skipped;
  result.summary_path = (fs::path(out) / "summary.json").string();
  write_file_atomic(result.summary_path, summary_to_json(result.summary).dump(2) + "\n");
  result.html_path = (fs::path(out) / "index.html").string();
  write_file_atomic(result.html_path, page(study, result.summary, result.figures, result.skipped));
  return result;
}

}  // namespace moelab
