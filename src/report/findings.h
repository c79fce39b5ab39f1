#pragma once
// The findings table (docs/report.md): each claim of the three studies, what this study measured with its seed
// spread or interval, and a verdict, from the study's runs and the analysis already in summary.json.
#include <nlohmann/json.hpp>
#include <string>

#include "report/study.h"
#include "report/summary.h"

namespace moelab {

// Each claim is judged on every run: an estimate fitted to all shapes and replicates (IsoFLOP minima as parabolas in
// log N per arm, curves in log2 G or log2 (1 / (1 - S)) per replicate), a 95% t interval over replicates, paired
// across arms by data seed (docs/fitting.md, "Comparing two arms"), and the smallest effect the design detects.
// Verdicts: "reproduced" or "not reproduced" when the interval excludes zero, "inconclusive" otherwise (saying
// the detectable effect), "not measured" when the study has no runs for it. Each claim carries estimate,
// interval, detectable_effect, unit and n_per_arm; `pairing` says how much pairing narrowed each dense-vs-MoE
// interval (paired and unpaired se, the correlation of the arms' per-replicate minima).
Findings study_findings(const Study& study, const StudySummary& summary, const std::string& loss_column);

// The seed spread: the pooled sd of the loss over groups of replicates (runs of one sweep with one base name,
// differing only in their seeds; NaN: none).
double seed_spread(const Study& study, const std::string& loss_column, size_t* groups = nullptr);

}  // namespace moelab
