#pragma once
// Which runs to buy next (`moelab sweep suggest`, docs/fitting.md "Suggested runs"): the candidate runs that most
// narrow the bootstrap interval of the predicted compute optimum at a target budget, per FLOP spent.
//
// The bootstrap parameter vectors of the current fit stand for what the data allow the law to be. A candidate's
// value is what observing it would teach: in each of R scenarios one ensemble member plays the truth, the run's
// outcome is drawn from it with the fit's noise, and every member is reweighted by the likelihood of that outcome
// (importance reweighting of the ensemble, no refits). The expected posterior variance of log N*(C) over the
// scenarios, against the variance now, per FLOP of the candidate, ranks them; the K runs are chosen greedily, each
// scenario keeping the outcomes of the runs already chosen, so a second run is valued given the first.
#include <cstdint>
#include <string>
#include <vector>

#include "scaling/laws.h"

namespace moelab {

struct Candidate {
  std::string name;  // how the caller identifies it (a shape and a token count)
  Observation x;     // the law's inputs (L unused)
  double flops = 0;  // what training it costs
};

struct Suggestion {
  size_t candidate = 0;            // index into the candidates
  double flops = 0;
  double predicted_loss = 0;       // the ensemble's mean prediction
  double sd_before = 0, sd_after = 0;  // expected sd of log N*(C) before and after this run (with those chosen before)
};

struct SuggestOptions {
  double target_budget = 0;  // C
  int count = 3;             // K runs
  double max_flops = 0;      // > 0: each run at most this many FLOPs
  double total_flops = 0;    // > 0: all K together at most this many
  double noise = 0.01;       // sd of log L of one run's outcome (the fit's residual RMSE or replicate noise)
  int scenarios = 256;
  uint64_t seed = 1;
};

// log N*(C) of each ensemble member under `law` (N*: the optimum's N; the joint law's active N). Members without
// an optimum get NaN and are left out.
std::vector<double> log_optimum_per_member(LawKind law, const std::vector<std::vector<double>>& thetas, double C,
                                           double expansion, double max_sparsity, double max_experts);

std::vector<Suggestion> suggest_runs(LawKind law, const std::vector<std::vector<double>>& thetas,
                                     const std::vector<double>& target, const std::vector<Candidate>& candidates,
                                     const SuggestOptions& options);

}  // namespace moelab
