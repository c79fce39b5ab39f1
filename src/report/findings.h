#pragma once
// The findings table (docs/report.md): each claim of the three studies, what this study measured with its seed
// spread or interval, and a verdict, from the study's runs and the analysis already in summary.json.
#include <nlohmann/json.hpp>
#include <string>

#include "report/study.h"

namespace moelab {

// Verdicts: "reproduced", "not reproduced", "inconclusive" (the data cannot tell at this scale, and why), or
// "not measured" (the study has no runs for it). A difference counts only beyond 2 sqrt(2) seed sd (the pooled sd
// of the loss over replicate runs, those differing only in train.seed); without replicates a single-seed
// direction is reported but stays inconclusive.
nlohmann::ordered_json study_findings(const Study& study, const nlohmann::ordered_json& summary,
                                      const std::string& loss_column);

// The seed spread: the pooled sd of the loss over groups of runs that differ only in train.seed (NaN: none).
double seed_spread(const Study& study, const std::string& loss_column, size_t* groups = nullptr);

}  // namespace moelab
