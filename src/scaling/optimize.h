#pragma once
// Compute-optimal allocation from a fitted law (docs/fitting.md, "optimize"):
//   chinchilla   C = 6 N D; closed form N_opt = G (C/6)^(beta/(alpha+beta)), checked by a numeric search;
//   granularity  L(N, D, G) subject to Krajewski's Eq. 10, F = (12 d^2 c_f + d E G c_r) D n_blocks = C, with
//                d = 64 n_blocks and N = n_blocks (4 d^2 + 8 E d^2 + d E G) the total non-embedding parameters
//                (attention 4 d^2, E * G experts of 8 d^2 / G, router d x E G); golden-section search on
//                log n_blocks per G in {1, 2, 4, ..., 64}, the best G kept;
//   sparsity     L(N, D, S) subject to C = 6 N_a D with N_a = (1 - S) N; S over [0, S_max] (S_max = the largest
//                sparsity in the fitted data unless given), nested golden-section searches.
// And the predicted loss of one planned run (`moelab predict`), each with bootstrap intervals.
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "scaling/laws.h"

namespace moelab {

// Minimum of a smooth 1-D function on [lo, hi]: a 65-point scan, then golden section around the best cell (robust
// to mild non-convexity). Returns f at the minimum and sets x_min.
double minimize_1d(const std::function<double(double)>& f, double lo, double hi, double& x_min);

struct LoadedFit {
  LawKind law = LawKind::Chinchilla;
  std::vector<double> theta;                 // parametric laws
  std::vector<std::vector<double>> samples;  // bootstrap thetas (may be empty)
  std::string param_count = "nonembedding_total";
  std::optional<double> expansion;           // granularity: E of the fitted runs, when recorded
  double max_sparsity = 0;                   // largest S in the fitted data (sparsity law)
  double max_experts = 0;                    // largest E in the fitted data (joint law)
  std::string chosen_from_comparison;        // the law picked from a `fit --law compare` document, else ""
  nlohmann::json document;                   // the whole fit.json
};
LoadedFit load_fit_json(const nlohmann::json& document, const std::string& source);
LoadedFit load_fit(const std::string& path);

// One line per value of `at` (logical column -> value) outside the fitted data's range (fit.json "data_ranges"),
// saying by how much: "extrapolating: D = 3e12 is 12.5x above the largest fitted D (2.4e11)".
std::vector<std::string> extrapolation_warnings(const nlohmann::json& document,
                                                const std::vector<std::pair<std::string, double>>& at);

struct ComputeOptimum {
  double C = 0, N = 0, D = 0, G = 1, S = 0, E = 1;
  double N_active = 0;   // parameters a token touches under the law's FLOP relation
  double n_blocks = 0;   // granularity: the continuous n_blocks of the optimum (d = 64 n_blocks)
  double loss = 0;
};

ComputeOptimum chinchilla_optimum(const std::vector<double>& theta, double C);          // closed form
ComputeOptimum chinchilla_optimum_numeric(const std::vector<double>& theta, double C);  // golden section

// Krajewski's shape relation, d = 64 n_blocks.
double krajewski_total_params(double n_blocks, double expansion, double granularity);
ComputeOptimum granularity_optimum_at(const std::vector<double>& theta, double C, double expansion, double G);
// The best over `granularities` (default {1, 2, 4, ..., 64}).
ComputeOptimum granularity_optimum(const std::vector<double>& theta, double C, double expansion,
                                   const std::vector<double>& granularities = {});

ComputeOptimum sparsity_optimum(const std::vector<double>& theta, double C, double max_sparsity);
// Joint law: for each E in {1, 2, 4, ...} up to max_experts, Chinchilla's closed form with the E-dependent
// coefficients (C = 6 N_a D); the best E kept. N = N_active = the active parameters.
ComputeOptimum joint_optimum(const std::vector<double>& theta, double C, double max_experts);

struct OptimizeOptions {
  double budget = 0;
  std::optional<double> expansion;     // granularity (default: the fit's, else 64)
  std::optional<double> max_sparsity;  // sparsity (default: the fit's data maximum)
  std::optional<double> max_experts;   // joint (default: the fit's data maximum)
};

// The `moelab optimize` report: optimum, bootstrap intervals, exponents, tokens per parameter, model shape.
nlohmann::ordered_json optimize_report(const LoadedFit& fit, const OptimizeOptions& options);
std::string optimize_text(const nlohmann::ordered_json& report);

// A concrete model realising about N parameters (the fit's param_count) with the optimum's G or S, under the
// shape rule of docs/fitting.md (Krajewski's presets, extended by d = 64 n_blocks, heads = d / 64).
struct ModelShape {
  ModelConfig model;
  double parameters = 0;  // the shape's N under the fit's param_count
  std::string toml;       // [model] and [moe] sections (and train.steps for D tokens)
};
ModelShape shape_for(LawKind law, const ComputeOptimum& optimum, double expansion, const std::string& param_count);

// `moelab predict`: the predicted loss of `model` trained on `tokens` tokens.
double parameter_count(const ModelConfig& model, const std::string& param_count);
nlohmann::ordered_json predict_report(const LoadedFit& fit, const ModelConfig& model, double tokens,
                                      const std::string& source);

}  // namespace moelab
