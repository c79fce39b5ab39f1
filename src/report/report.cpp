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

// An IsoFLOP surface from fit.json, evaluated at (log N, -log(1 - S)).
double surface_eval(const ojson& surface, double x, double y) {
  const double u = (x - surface["x_center"].get<double>()) / surface["x_scale"].get<double>();
  const double v = (y - surface["y_center"].get<double>()) / surface["y_scale"].get<double>();
  double value = 0;
  const auto& mono = surface["monomials"];
  const auto& coef = surface["coefficients"];
  for (size_t i = 0; i < mono.size(); ++i)
    value += coef[i].get<double>() * std::pow(u, mono[i][0].get<int>()) * std::pow(v, mono[i][1].get<int>());
  return value;
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
  Builder(const Study& study, const ojson& summary, const std::string& figures_dir, std::ostream& log)
      : study_(study), summary_(summary), dir_(figures_dir), log_(log), col_(summary["loss_column"]) {
    for (const auto& s : study.sweeps)
      if (s.plan.kind == "isoflop")
        for (const auto& r : s.results)
          if (r.status == "ok" && r.budget > 0 && std::isfinite(loss_of(r, col_))) iso_.push_back({&s, &r});
    for (const auto& b : summary["budgets"]) budgets_.push_back(b.get<double>());
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
    const ojson& fit = summary_["isoflop_fit"];
    const Layout l = layout_for(budgets_.size());
    GnuplotFigure fig(l.width, l.height);
    fig.add(multiplot(l, title));
    for (double C : budgets_) {
      std::map<double, std::vector<std::vector<double>>> by_s;
      for (const auto* r : at_budget(C)) by_s[r->sparsity].push_back({double(r->nonembedding_params), L(*r)});
      const ojson* surface = nullptr;
      if (fit.contains("budgets"))
        for (const auto& b : fit["budgets"])
          if (same_budget(b["C"].get<double>(), C)) surface = &b;
      // The y range follows the runs, not the surface: a degree-2 slice can dive far below the data.
      double y_lo = 1e300, y_hi = -1e300;
      for (const auto& [s, pts] : by_s)
        for (const auto& p : pts) y_lo = std::min(y_lo, p[1]), y_hi = std::max(y_hi, p[1]);
      if (surface) y_lo = std::min(y_lo, (*surface)["L_star"].get<double>());
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
            line.push_back({std::exp(x), surface_eval((*surface)["surface"], x, -std::log(1 - s))});
          }
          plot += fig.add_data(line) + " using 1:2 with lines lt " + std::to_string(lt) + " dt 2 notitle, ";
        }
        ++lt;
      }
      if (surface) {
        std::vector<std::vector<double>> star{{(*surface)["N_star"].get<double>(), (*surface)["L_star"].get<double>()}};
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
    const ojson& fit = summary_["sparsity_fit"];
    if (!fit.contains("parameters")) return skip(title, fit.value("skipped", std::string("no fit")));
    std::vector<double> theta;
    for (const auto& p : fit["parameters"]) theta.push_back(p.is_object() ? p["value"].get<double>() : p.get<double>());
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
                                                             fmt("%.4f", fit["rmse"].get<double>()) + ")") +
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
    const ojson& fit = summary_["isoflop_fit"];
    if (!fit.contains("budgets")) return skip(title, fit.value("skipped", std::string("no IsoFLOP fit")));
    std::vector<std::vector<double>> n_pts, s_pts;
    for (const auto& b : fit["budgets"]) {
      const double C = b["C"].get<double>();
      double n_lo = kNaN, n_hi = kNaN, s_lo = kNaN, s_hi = kNaN;
      if (b.contains("intervals")) {
        n_lo = b["intervals"]["N_star"]["p2.5"], n_hi = b["intervals"]["N_star"]["p97.5"];
        s_lo = b["intervals"]["S_star"]["p2.5"], s_hi = b["intervals"]["S_star"]["p97.5"];
      }
      n_pts.push_back({C, b["N_star"].get<double>(), n_lo, n_hi});
      s_pts.push_back({C, b["S_star"].get<double>(), s_lo, s_hi});
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
    if (fit.contains("frontier") && fit["frontier"].contains("N_star_exponent")) {
      const double a = fit["frontier"]["N_star_exponent"], k = fit["frontier"]["N_star_log_intercept"];
      plot += "exp(" + fmt("%.9g", k) + ") * x**" + fmt("%.9g", a) + " with lines lt 1 dt 2 title " +
              gnuplot_quote("fit: N* ~ C^{" + fmt("%.2f", a) + "}") + ", ";
    }
    const ojson& rec = summary_["recommendation"];
    if (rec.contains("sparsity_law") && rec["sparsity_law"].contains("optimum")) {
      const auto& o = rec["sparsity_law"]["optimum"];
      double lo = kNaN, hi = kNaN;
      if (rec["sparsity_law"].contains("intervals") && rec["sparsity_law"]["intervals"].contains("N")) {
        lo = rec["sparsity_law"]["intervals"]["N"]["p2.5"], hi = rec["sparsity_law"]["intervals"]["N"]["p97.5"];
      }
      std::vector<std::vector<double>> p{{rec["budget"].get<double>() * 1.08, o["N"].get<double>(), lo, hi}};
      plot += fig.add_data(p) + " using 1:2:3:4 with yerrorbars lt 7 pt 5 ps 1.3 title 'sparsity-law optimum', ";
    }
    plot.resize(plot.size() - 2);
    fig.add(plot);
    fig.add("unset logscale y\nset format y '%g'\nset ylabel 'optimal sparsity S*'\nset yrange [-0.05:1]");
    fig.add("set title 'S* per budget (95% bootstrap interval)'");
    plot = "plot " + fig.add_data(s_pts) + " using 1:2:3:4 with yerrorbars lt 2 pt 7 ps 1.3 title 'S* of the surface', ";
    if (rec.contains("sparsity_law") && rec["sparsity_law"].contains("optimum")) {
      const auto& r = rec["sparsity_law"];
      double lo = kNaN, hi = kNaN;
      if (r.contains("intervals") && r["intervals"].contains("S"))
        lo = r["intervals"]["S"]["p2.5"], hi = r["intervals"]["S"]["p97.5"];
      std::vector<std::vector<double>> p{{rec["budget"].get<double>() * 1.08, r["optimum"]["S"].get<double>(), lo, hi}};
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
    const ojson& m = summary_["compute_multiplier"];
    if (!m.contains("per_budget")) return skip(title, m.value("skipped", std::string("no dense baselines")));
    std::vector<std::vector<double>> dense, moe, arrows;
    for (const auto& row : summary_["per_budget"]) {
      const double C = row["C"].get<double>();
      if (!row["best_dense"].is_null()) dense.push_back({C, row["best_dense"]["loss"].get<double>()});
      if (!row["best_moe"].is_null()) moe.push_back({C, row["best_moe"]["loss"].get<double>()});
    }
    double c_lo = budgets_.front(), c_hi = budgets_.back();
    for (const auto& row : m["per_budget"]) {
      const double C = row["C"], Cd = row["dense_compute_for_moe_loss"], Lm = row["moe_loss"];
      arrows.push_back({C, Lm, Cd - C, 0});
      c_lo = std::min(c_lo, Cd), c_hi = std::max(c_hi, Cd);
    }
    const double a = m["dense_frontier"]["a"], b = m["dense_frontier"]["b"];
    const auto& last = m["per_budget"].back();
    GnuplotFigure fig(900, 520);
    fig.add("set title " + gnuplot_quote(title + ": " + fmt("%.2f", last["multiplier"].get<double>()) + "x at C = " +
                                         fmt("%.3g", last["C"].get<double>())));
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
    const ojson& g = summary_["granularity"];
    if (g.empty()) return skip(title, "no granularity sweep in the study");
    // One curve per shape and budget (or token count, for a sweep over D).
    std::map<std::pair<int64_t, double>, std::vector<std::vector<double>>> moe;
    std::map<std::pair<int64_t, double>, double> dense;
    std::set<double> by_budget;
    for (const auto& r : g) {
      const double b = r.value("budget", 0.0);
      if (b > 0) by_budget.insert(b);
      const std::pair<int64_t, double> key{r["d_model"].get<int64_t>(), b > 0 ? b : r["tokens"].get<double>()};
      if (r["experts"].get<int64_t>() > 0)
        moe[key].push_back({double(r["granularity"].get<int64_t>()), r["loss"].get<double>()});
      else
        dense[key] = r["loss"].get<double>();
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
    const ojson& groups = summary_.value("fixed_params", ojson::array());
    if (groups.empty()) return skip(title, "no fixed_params sweep in the study");
    GnuplotFigure fig(900, 500);
    fig.add("set title " + gnuplot_quote(title));
    fig.add("set xlabel 'sparsity S (experts: 1/(1-S) at top-1)'\nset ylabel " + gnuplot_quote(loss_axis()) +
            "\nset key outside right font ',9'\nset logscale x 2\n"
            "set xtics ('0' 1, '0.5' 2, '0.75' 4, '0.875' 8, '0.9375' 16, '0.96875' 32, '0.984' 64, '0.992' 128)");
    double x_max = 1;
    for (const auto& g : groups)
      for (const auto& p : g["points"]) x_max = std::max(x_max, 1 / (1 - p["sparsity"].get<double>()));
    fig.add("set xrange [0.8:" + fmt("%.6g", x_max * 1.25) + "]");
    std::string plot = "plot ";
    int lt = 1;
    for (const auto& g : groups) {
      std::vector<std::vector<double>> pts;
      for (const auto& p : g["points"]) pts.push_back({1 / (1 - p["sparsity"].get<double>()), p["loss"].get<double>()});
      if (pts.empty()) continue;
      const std::string label = "N " + fmt("%.3g", g["params"].get<double>()) +
                                (g.contains("C") ? ", C " + fmt("%.3g", g["C"].get<double>())
                                                 : ", D " + fmt("%.3g", g["tokens"].get<double>()));
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
    const ojson& d = summary_["downstream"];
    if (d.empty()) return skip(title, "no downstream evaluations in the results stores (moelab eval --tasks)");
    std::map<std::string, std::map<std::string, std::vector<std::vector<double>>>> by_task;  // task -> series -> pts
    for (const auto& r : d) {
      if (r["loss"].is_null()) continue;
      const std::string mode = r["mode"].get<std::string>() == "finetune"
                                   ? std::string("fine-tuned")
                                   : (r["shots"].get<int>() == 0 ? std::string("zero-shot")
                                                                 : std::to_string(r["shots"].get<int>()) + "-shot");
      const std::string series = mode + (r["moe"].get<bool>() ? " MoE" : " dense");
      by_task[r["task"].get<std::string>()][series].push_back(
          {r["loss"].get<double>(), r["acc"].get<double>(), r["acc_stderr"].get<double>()});
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
  const ojson& summary_;
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

std::string interval_text(const ojson& iv) {
  if (!iv.is_object() || !iv.contains("p2.5")) return "";
  return "[" + fmt("%.3g", iv["p2.5"].get<double>()) + ", " + fmt("%.3g", iv["p97.5"].get<double>()) + "]";
}

// The findings table (each claim: measured, estimate with its interval, detectable effect, runs per arm, verdict),
// the seed spread, the pairing table and the edge warnings.
void findings_html(std::ostream& h, const ojson& f) {
  h << "<h2 id=\"findings\">Findings: the three studies' claims at this scale</h2>\n<p>Each claim, what this study "
       "measured, and a verdict from every run: an estimate fitted to all shapes and replicates, its 95% t interval "
       "over replicates (paired by data order where arms share it), and the smallest effect this design detects "
       "(80% power, 5% two-sided). Reproduced or not reproduced when the interval excludes 0, otherwise "
       "inconclusive (docs/report.md, \"Findings\").</p>\n";
  auto number = [](const ojson& x, const char* format) {
    return x.is_number() ? fmt(format, x.get<double>()) : std::string("-");
  };
  std::vector<std::vector<std::string>> rows;
  for (const auto& c : f["claims"]) {
    std::string estimate = "-", n = "-";
    if (c.contains("estimate") && c["estimate"].is_number())
      estimate = number(c["estimate"], "%+.4g") + " [" + number(c["interval"][0], "%+.3g") + ", " +
                 number(c["interval"][1], "%+.3g") + "] " + c.value("unit", std::string());
    if (c.contains("n_per_arm") && !c["n_per_arm"].empty()) {
      n.clear();
      for (const auto& [arm, v] : c["n_per_arm"].items()) {
        std::string counts;
        if (v.is_object())
          for (const auto& [what, k] : v.items()) counts += (counts.empty() ? "" : ", ") + what + " " + k.dump();
        n += (n.empty() ? "" : "; ") + arm + ": " + (v.is_object() ? counts : v.dump());
      }
    }
    rows.push_back({c["claim"].get<std::string>(), c["source"].get<std::string>(), c["measured"].get<std::string>(),
                    estimate, c.contains("detectable_effect") ? number(c["detectable_effect"], "%.3g") : "-", n,
                    c["verdict"].get<std::string>() +
                        (c["why"].get<std::string>().empty() ? "" : ": " + c["why"].get<std::string>())});
  }
  h << table_html({"claim", "study", "measured here", "estimate [95% interval]", "detectable effect", "n per arm",
                   "verdict"},
                  rows);
  if (f.contains("seed_sd") && f["seed_sd"].is_number())
    h << "<p class=\"note\">Seed spread: the pooled sd of the loss over replicates of one configuration is "
      << fmt("%.4f", f["seed_sd"].get<double>()) << ".</p>\n";
  if (f.contains("pairing") && !f["pairing"].empty()) {
    std::vector<std::vector<std::string>> prow;
    for (const auto& p : f["pairing"])
      prow.push_back({fmt("%.3g", p["C"].get<double>()), p["comparison"].get<std::string>(),
                      std::to_string(p["replicates"].get<int64_t>()), number(p["se_paired"], "%.4f"),
                      number(p["se_unpaired"], "%.4f"), number(p["variance_ratio"], "%.2f"),
                      number(p["correlation"], "%.2f")});
    h << "<p class=\"note\">What pairing by data order bought: the standard error of each dense-minus-MoE "
         "difference of minima paired by replicate, against Welch's unpaired one over the same per-replicate "
         "minima, and the correlation of the two arms' per-replicate minima.</p>\n";
    h << table_html({"C", "comparison", "replicates", "se paired", "se unpaired", "variance ratio", "correlation"},
                    prow);
  }
  for (const auto& w : f["edge_warnings"])
    h << "<p class=\"note\">Warning: " << html_escape(w.get<std::string>()) << "</p>\n";
}

// ---- the page, one function per section, each writing its HTML to h --------------------------------------------

void page_head(std::ostream& h, const Study& study, const ojson& s) {
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
  h << "<p class=\"headline\" id=\"headline\">" << html_escape(s["headline"].get<std::string>()) << "</p>\n";
  if (s.contains("findings")) findings_html(h, s["findings"]);
  h << "<p class=\"note\">Every number on this page is in <a href=\"summary.json\">summary.json</a>, computed from the "
       "results stores (results.db, one row per run) and the runs' metrics.jsonl; L is the run's <code>"
    << html_escape(s["loss_column"].get<std::string>())
    << "</code> at the end of training. Figures are SVG drawn by gnuplot; their scripts with the data inline are in "
       "figures/*.gp.</p>\n";

}

void sweeps_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Sweeps</h2>\n";
  for (const auto& sw : s["sweeps"])
    rows.push_back({sw["label"].get<std::string>(), sw["kind"].get<std::string>(),
                    std::to_string(sw["runs_planned"].get<int64_t>()), std::to_string(sw["runs_ok"].get<int64_t>()),
                    std::to_string(sw["runs_failed"].get<int64_t>()),
                    std::to_string(sw["downstream_rows"].get<int64_t>()), sw["dir"].get<std::string>()});
  h << table_html({"sweep", "kind", "runs planned", "ok", "failed", "downstream rows", "directory"}, rows);

}

// The best configuration per budget and the compute multiplier.
void per_budget_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  h << "<h2>Best configuration per budget</h2>\n";
  for (const auto& b : s["per_budget"]) {
    auto brief = [](const ojson& r) {
      return r.is_null() ? std::string("-") : r["name"].get<std::string>() + " (" + fmt("%.4f", r["loss"].get<double>()) + ")";
    };
    rows.push_back({fmt("%.3g", b["C"].get<double>()), brief(b["best"]), brief(b["best_dense"]), brief(b["best_moe"])});
  }
  h << table_html({"budget C (FLOPs)", "best run (L)", "best dense (L)", "best MoE (L)"}, rows);
  const ojson& m = s["compute_multiplier"];
  if (m.contains("per_budget")) {
    rows.clear();
    for (const auto& r : m["per_budget"])
      rows.push_back({fmt("%.3g", r["C"].get<double>()), fmt("%.4f", r["moe_loss"].get<double>()),
                      r["dense_loss"].is_null() ? "-" : fmt("%.4f", r["dense_loss"].get<double>()),
                      fmt("%.3g", r["dense_compute_for_moe_loss"].get<double>()),
                      fmt("%.2f", r["multiplier"].get<double>()), r["extrapolated"].get<bool>() ? "yes" : "no"});
    h << "<p>Compute multiplier: the FLOPs at which the dense power law (log L = a + b log C through the best dense "
         "run of each budget; b = "
      << fmt("%.4f", m["dense_frontier"]["b"].get<double>()) << ") reaches the best MoE loss, over C.</p>\n";
    h << table_html({"budget C", "best MoE L", "best dense L", "dense FLOPs for the MoE L", "multiplier",
                     "extrapolated"},
                    rows);
  } else if (m.contains("skipped")) {
    h << "<p class=\"note\">Compute multiplier: " << html_escape(m["skipped"].get<std::string>()) << "</p>\n";
  }
}

// The dense-vs-MoE pair of the largest budget, in domain, out of domain, downstream.
void pair_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  const ojson& pair = s.value("dense_vs_moe_pair", ojson::object());
  if (pair.contains("dense") && pair.contains("moe")) {
    h << "<h2>Dense and MoE at equal FLOPs (C = " << fmt("%.3g", pair["C"].get<double>())
      << ")</h2>\n<p>The best dense and the best MoE run of the largest budget, in domain (validation loss), on each "
         "out-of-domain set, zero- and few-shot, and fine-tuned (before -> after, on the same test items).</p>\n";
    const ojson &dn = pair["dense"], &mo = pair["moe"];
    auto num = [](const ojson& v) { return v.is_null() ? std::string("-") : fmt("%.4f", v.get<double>()); };
    rows.push_back({"run", dn["name"].get<std::string>(), mo["name"].get<std::string>(), ""});
    rows.push_back({"validation loss (in domain)", num(dn.value("val_loss", ojson())), num(mo.value("val_loss", ojson())),
                    dn.value("val_loss", ojson()).is_null() || mo.value("val_loss", ojson()).is_null()
                        ? "-" : fmt("%+.4f", dn["val_loss"].get<double>() - mo["val_loss"].get<double>())});
    const ojson dense_ood = dn.value("ood_losses", ojson::object()), moe_ood = mo.value("ood_losses", ojson::object());
    for (const auto& [k, v] : dense_ood.items()) {
      const ojson m = moe_ood.value(k, ojson());
      rows.push_back({k + " (out of domain)", num(v), num(m),
                      v.is_null() || m.is_null() ? "-" : fmt("%+.4f", v.get<double>() - m.get<double>())});
    }
    auto acc_of = [](const ojson& side, const std::string& task, const std::string& mode, int64_t shots) -> ojson {
      for (const auto& t : side.value("downstream", ojson::array()))
        if (t["task"] == task && t["mode"] == mode && (mode == "finetune" || t["shots"].get<int64_t>() == shots)) return t;
      return ojson();
    };
    std::set<std::tuple<std::string, std::string, int64_t>> keys;
    for (const auto& side : {dn, mo})
      for (const auto& t : side.value("downstream", ojson::array()))
        keys.insert({t["task"].get<std::string>(), t["mode"].get<std::string>(),
                     t["mode"] == "finetune" ? 0 : t["shots"].get<int64_t>()});
    for (const auto& [task, mode, shots] : keys) {
      const ojson a = acc_of(dn, task, mode, shots), b = acc_of(mo, task, mode, shots);
      auto text = [&](const ojson& t) {
        if (t.is_null()) return std::string("-");
        std::string x = fmt("%.3f", t["acc"].get<double>()) + " ± " + fmt("%.3f", t["acc_stderr"].get<double>());
        if (t.contains("before")) x = fmt("%.3f", t["before"]["acc"].get<double>()) + " -> " + x;
        return x;
      };
      const std::string label = task + (mode == "finetune" ? " fine-tuned" : mode == "few" ? " " + std::to_string(shots) + "-shot" : " zero-shot") +
                                " accuracy (n " + std::to_string((a.is_null() ? b : a)["n"].get<int64_t>()) + ")";
      std::string diff = "-";
      if (!a.is_null() && !b.is_null()) {
        diff = fmt("%+.3f", a["acc"].get<double>() - b["acc"].get<double>());
        if (a.contains("before") && b.contains("before"))
          diff = "gain " + fmt("%+.3f", a["acc"].get<double>() - a["before"]["acc"].get<double>()) + " vs " +
                 fmt("%+.3f", b["acc"].get<double>() - b["before"]["acc"].get<double>());
      }
      rows.push_back({label, text(a), text(b), diff});
    }
    h << table_html({"", "dense", "MoE", "dense - MoE (loss) / dense - MoE (accuracy)"}, rows);
  }
}

// The optimal granularity per budget, measured and by the law.
void granularity_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  const ojson& gopt = s.value("granularity_optimum", ojson::array());
  if (!gopt.empty()) {
    h << "<h2>Optimal granularity per budget</h2>\n<p>The measured best G over the granularity sweep's shapes at each "
         "budget, and the fitted granularity law's best G at that run's shape (its parameters and tokens carried to "
         "G = 16 and 32 along the measured runs' trend in G).</p>\n";
    for (const auto& r : gopt) {
      std::string law = "-";
      if (r.contains("law") && r["law"].contains("G_star"))
        law = fmt("%g", r["law"]["G_star"].get<double>()) + " (L " + fmt("%.4f", r["law"]["loss"].get<double>()) + ")";
      std::string curve;
      for (const auto& p : r["curve_at_best_shape"])
        curve += (curve.empty() ? "" : ", ") + std::string("G ") + std::to_string(p["G"].get<int64_t>()) + ": " +
                 fmt("%.4f", p["loss"].get<double>());
      rows.push_back({r.contains("C") ? "C " + fmt("%.3g", r["C"].get<double>()) : "D " + fmt("%.3g", r["tokens"].get<double>()),
                      std::to_string(r["G_star"].get<int64_t>()) + (r["on_edge"].get<bool>() ? " (edge)" : ""),
                      r["best"]["name"].get<std::string>(), curve,
                      r["dense"].is_null() ? "-" : fmt("%.4f", r["dense"]["loss"].get<double>()), law});
    }
    h << table_html({"budget", "measured G*", "best run", "L by G at its shape", "best dense L", "law G*"}, rows);
    const ojson& gf = s.value("granularity_fit", ojson::object());
    if (gf.contains("skipped"))
      h << "<p class=\"note\">Granularity law: " << html_escape(gf["skipped"].get<std::string>()) << "</p>\n";
    else if (gf.contains("coefficients")) {
      std::string coef;
      for (const auto& [k, v] : gf["coefficients"].items())
        if (v.is_number()) coef += (coef.empty() ? "" : ", ") + k + " " + fmt("%.4g", v.get<double>());
      h << "<p>Granularity law L = c + (g/G^&gamma; + a)/N^&alpha; + b/D^&beta; fitted on "
        << gf["n_points"].get<size_t>() << " MoE runs: " << html_escape(coef) << " (RMSE of log L "
        << fmt("%.4f", gf.value("rmse", 0.0)) << ").</p>\n";
      if (gf.contains("degenerate"))
        h << "<p class=\"note\">Warning: " << html_escape(gf["degenerate"].get<std::string>()) << ".</p>\n";
    }
  }
}

// Fixed total parameters: loss against S.
void fixed_params_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  const ojson& fixed = s.value("fixed_params", ojson::array());
  for (const auto& g : fixed) {
    h << "<h2>Fixed total parameters: N " << fmt("%.3g", g["params"].get<double>())
      << (g.contains("C") ? " at C " + fmt("%.3g", g["C"].get<double>()) : " at D " + fmt("%.3g", g["tokens"].get<double>()))
      << "</h2>\n";
    rows.clear();
    for (const auto& p : g["points"])
      rows.push_back({fmt("%.4g", p["sparsity"].get<double>()), p["name"].get<std::string>(),
                      std::to_string(p["d_model"].get<int64_t>()), std::to_string(p["experts"].get<int64_t>()),
                      fmt("%.4g", static_cast<double>(p["active_params"].get<int64_t>())),
                      fmt("%.4g", static_cast<double>(p["tokens"].get<int64_t>())), fmt("%.4f", p["loss"].get<double>()),
                      std::to_string(p["seeds"].get<size_t>())});
    h << table_html({"S", "run", "d_model", "experts", "active params", "tokens", "L", "seeds"}, rows);
  }
}

// Which law extrapolates best.
void law_comparison_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  if (s.contains("law_comparison") && s["law_comparison"].contains("ranking")) {
    const ojson& c = s["law_comparison"];
    h << "<h2>Which law extrapolates best</h2>\n<p>Every law the runs' columns allow, fitted without the held-out "
         "runs ("
      << html_escape(c["holdout"].get<std::string>())
      << ") and ranked by the RMSE of log L in predicting them; the interval is over bootstrap refits "
         "(docs/fitting.md, fit --law compare).</p>\n";
    int rank = 1;
    for (const auto& r : c["ranking"]) {
      const ojson& iv = r["heldout_rmse_interval"];
      rows.push_back({std::to_string(rank++), r["law"].get<std::string>(), fmt("%.4g", r["heldout_rmse"].get<double>()),
                      iv.is_null() ? "-"
                                   : "[" + fmt("%.3g", iv["p2.5"].get<double>()) + ", " +
                                         fmt("%.3g", iv["p97.5"].get<double>()) + "]",
                      fmt("%.4g", r["rmse"].get<double>()), std::to_string(r["parameters"].get<int64_t>())});
    }
    h << table_html({"rank", "law", "held-out RMSE (log L)", "95% bootstrap", "in-sample RMSE", "parameters"}, rows);
    for (const auto& sk : c["skipped"])
      h << "<p class=\"note\">Not fitted: " << html_escape(sk["law"].get<std::string>()) << " ("
        << html_escape(sk["reason"].get<std::string>()) << ")</p>\n";
  } else if (s.contains("law_comparison") && s["law_comparison"].contains("skipped")) {
    h << "<p class=\"note\">Law comparison: " << html_escape(s["law_comparison"]["skipped"].get<std::string>())
      << "</p>\n";
  }
}

// The fitted sparsity law's recommendation.
void recommendation_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  const ojson& rec = s["recommendation"];
  if (rec.contains("sparsity_law") && rec["sparsity_law"].contains("optimum")) {
    const auto& r = rec["sparsity_law"];
    const auto& o = r["optimum"];
    const ojson iv = r.value("intervals", ojson::object());
    h << "<h2>Recommendation of the fitted sparsity law at C = " << fmt("%.3g", rec["budget"].get<double>())
      << "</h2>\n";
    rows = {{"N (total non-embedding)", fmt("%.4g", o["N"].get<double>()), interval_text(iv.value("N", ojson()))},
            {"D (tokens)", fmt("%.4g", o["D"].get<double>()), interval_text(iv.value("D", ojson()))},
            {"S (sparsity)", fmt("%.4g", o["S"].get<double>()), interval_text(iv.value("S", ojson()))},
            {"predicted loss", fmt("%.4f", o["loss"].get<double>()), interval_text(iv.value("loss", ojson()))}};
    h << table_html({"quantity", "optimum", "95% bootstrap interval"}, rows);
    h << "<p class=\"note\">Under the law's constraint " << html_escape(r.value("constraint", std::string()))
      << " (the papers' 6 N D convention; the runs' budgets count every matrix product exactly, embeddings "
         "included, so this optimum is an extrapolation of the fit, not a measured run).</p>\n";
  }
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

void downstream_html(std::ostream& h, const ojson& s) {
  std::vector<std::vector<std::string>> rows;
  if (!s["downstream"].empty()) {
    h << "<h2>Downstream evaluation</h2>\n";
    for (const auto& d : s["downstream"])
      rows.push_back({d["run"].get<std::string>(), d["task"].get<std::string>(), d["mode"].get<std::string>(),
                      std::to_string(d["shots"].get<int>()),
                      fmt("%.3f", d["acc"].get<double>()) + " ± " + fmt("%.3f", d["acc_stderr"].get<double>()),
                      fmt("%.3f", d["acc_norm"].get<double>()) + " ± " + fmt("%.3f", d["acc_norm_stderr"].get<double>()),
                      std::to_string(d["n"].get<int64_t>()),
                      d["loss"].is_null() ? "-" : fmt("%.4f", d["loss"].get<double>())});
    h << table_html({"run", "task", "mode", "shots", "accuracy ± s.e.", "length-normalised ± s.e.", "items", "L"}, rows);
  }

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

std::string page(const Study& study, const ojson& s, const std::vector<ReportFigure>& figures,
                 const std::vector<std::string>& skipped) {
  std::ostringstream h;
  page_head(h, study, s);
  sweeps_html(h, s);
  if (!s["per_budget"].empty()) {
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
  ojson figs = ojson::array();
  for (const auto& f : result.figures)
    figs.push_back({{"id", f.id}, {"title", f.title}, {"caption", f.caption}, {"svg", "figures/" + f.id + ".svg"}});
  result.summary["figures"] = figs;
  result.summary["figures_skipped"] = result.skipped;
  result.summary_path = (fs::path(out) / "summary.json").string();
  write_file_atomic(result.summary_path, result.summary.dump(2) + "\n");
  result.html_path = (fs::path(out) / "index.html").string();
  write_file_atomic(result.html_path, page(study, result.summary, result.figures, result.skipped));
  return result;
}

}  // namespace moelab
