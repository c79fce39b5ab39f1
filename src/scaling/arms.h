#pragma once
// Comparing two arms of a study at one compute budget (docs/fitting.md, "Comparing two arms"): e.g. dense against MoE,
// each arm a ladder of shapes trained with several seeds. Each arm's IsoFLOP minimum is a parabola in log N fitted
// to every run of the arm (all shapes, all seeds), never the single luckiest run; the difference of the two minima
// gets a 95% interval from the replicates, paired across the arms (replicate r of one arm with replicate r of the
// other, which saw the same data order) when the design pairs them; and the verdict states the smallest effect
// the design could have detected.
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moelab {

// One training run of an arm.
struct ArmRun {
  int config = 0;     // which shape of the arm's ladder (runs of one config differ only in their seeds)
  int replicate = 0;  // the replicate index (seed): equal indices across arms are paired
  double x = 0;       // log N of the shape (the IsoFLOP axis)
  double loss = 0;
};

// A parabola L = a + b (x - x0) + c (x - x0)^2 fitted by least squares to every run, and its minimum over the
// measured range of x. When the parabola is not convex (c <= 0), or its vertex lies outside the measured range,
// the minimum is the fitted value at the better end of the range, and `interior` is false: the optimum may lie
// outside the ladder. Fewer than 3 distinct shapes: the minimum is the lowest config mean (`fitted` false).
struct ArmMinimum {
  double loss = 0;     // the fitted minimum loss
  double x = 0;        // where (log N)
  bool fitted = false;
  bool interior = false;
  int runs = 0, configs = 0;
  int min_replicates = 0;  // the fewest runs of any config
};
ArmMinimum fit_arm_minimum(const std::vector<ArmRun>& runs);

// The least-squares parabola y = a + b x + c x^2 through (x_i, y_i); `ok` false when the points span fewer than 3
// distinct x. `vertex` is -b / (2c) (NaN unless c > 0).
struct Parabola {
  double a = 0, b = 0, c = 0;
  bool ok = false;
  double at(double x) const { return a + b * x + c * x * x; }
  double slope(double x) const { return b + 2 * c * x; }
  double vertex() const { return c > 0 ? -b / (2 * c) : std::nan(""); }
};
Parabola fit_parabola(const std::vector<double>& x, const std::vector<double>& y);

// The least-squares line y = a + b x; b NaN when the x are all equal.
struct Line {
  double a = 0, b = std::nan("");
};
Line fit_line(const std::vector<double>& x, const std::vector<double>& y);

// Per replicate: the arm's minimum fitted to that replicate's runs alone, for each replicate that covers every
// config of the arm (replicate index -> minimum).
std::map<int, ArmMinimum> replicate_minima(const std::vector<ArmRun>& runs);

struct ArmComparisonOptions {
  bool paired = true;  // pair replicate r of one arm with replicate r of the other when both have it
};

// a.loss - b.loss (the minima fitted to all runs) with a 95% interval from the replicates: each replicate r that
// covers every shape of its arm gives its own minimum; paired, the differences d_r = min_a,r - min_b,r over the
// replicates both arms have give se = sd(d) / sqrt(R) on R - 1 degrees of freedom (the shared noise of replicate
// r cancels in d_r); unpaired, Welch's se over each arm's per-replicate minima. The interval is estimate
// +- t_{df, 0.975} se: with 3 seeds t is 4.30, where a bootstrap over 3 seeds (10 distinct resamples) would give
// an interval far too narrow. mde is the smallest difference a two-sided 5% test has 80% power to detect:
// (t_{df, 0.975} + t_{df, 0.8}) se.
struct ArmComparison {
  ArmMinimum a, b;
  double estimate = 0;
  double lo = std::nan(""), hi = std::nan("");  // the 95% interval (NaN: undefined, see `why_undefined`)
  double se = std::nan(""), mde = std::nan("");
  double df = 0;
  bool paired = false;
  int replicates_a = 0, replicates_b = 0;  // replicates covering every shape of the arm (paired: of both arms)
  std::vector<double> per_replicate;        // paired: d_r; unpaired: empty
  std::vector<int> replicate_ids;           // paired: the replicate index of each d_r
  double se_unpaired = std::nan("");        // Welch's se of the same difference, for the pairing gain
  double correlation = std::nan("");        // paired: the correlation of the two arms' per-replicate minima
  std::string why_undefined;
};
ArmComparison compare_arm_minima(const std::vector<ArmRun>& a, const std::vector<ArmRun>& b,
                                 const ArmComparisonOptions& options = {});

// The mean of paired differences (e.g. per test item: dense's gain from fine-tuning minus MoE's) with its t interval:
// se = sd(d) / sqrt(n) on n - 1 degrees of freedom, lo/hi = mean -+ t_{n-1, 0.975} se, and the detectable effect.
// Fewer than 2 differences: NaN interval.
struct PairedMean {
  double estimate = std::nan(""), se = std::nan(""), df = 0;
  double lo = std::nan(""), hi = std::nan(""), mde = std::nan("");
  int n = 0;
};
PairedMean paired_mean(const std::vector<double>& differences);

// Student's t quantile for p in {0.975, 0.8} (the two the comparisons use; a table to 30 degrees of freedom, the
// Cornish-Fisher expansion beyond, rounded-down non-integer df); other p throw.
double student_t_quantile(double p, double df);

// The smallest effect a two-sided 5% test with 80% power detects at standard error `se`: (z_0.975 + z_0.8) se with
// df = infinity, (t_{df, 0.975} + t_{df, 0.8}) se otherwise.
double minimum_detectable_effect(double se, double df = INFINITY);

// The verdict on a claim that an effect is positive, from its estimate and 95% interval: "reproduced" when the
// interval lies above zero, "not reproduced" when below, else "inconclusive", with the detectable effect said.
struct Verdict {
  std::string verdict;  // "reproduced", "not reproduced", "inconclusive"
  std::string why;
};
Verdict judge_positive(double estimate, double lo, double hi, double mde);

}  // namespace moelab
