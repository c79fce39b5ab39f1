#pragma once
// `moelab report`: a self-contained HTML page (figures embedded as SVG data URIs, so it opens from disk with no
// server) plus the figures' SVG files and gnuplot scripts and summary.json, the numbers behind every figure and
// the headline (docs/report.md).
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "report/study.h"

namespace moelab {

struct ReportOptions {
  std::string out_dir;  // empty: <study>/report
  AnalysisOptions analysis;
};

struct ReportFigure {
  std::string id;       // file stem under figures/
  std::string title;
  std::string caption;  // one line: what the figure shows
  std::string svg;      // the rendered figure
};

struct ReportResult {
  std::string html_path;
  std::string summary_path;
  StudySummary summary;  // written as summary.json (summary_to_json)
  std::vector<ReportFigure> figures;
  std::vector<std::string> skipped;  // figures the data could not support, with the reason
};

// Loads the study, analyses it, renders every figure the data supports, and writes OUT/index.html,
// OUT/summary.json and OUT/figures/*.{svg,gp} (each file atomically). Progress lines go to `log`.
ReportResult write_report(const std::string& study_dir, const ReportOptions& options, std::ostream& log);

}  // namespace moelab
