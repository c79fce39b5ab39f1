#include "cli/count_command.h"

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>
#include <vector>

#include "cli/report_errors.h"
#include "core/error.h"
#include "model/count.h"
#include "model/plan.h"

namespace moelab {
namespace {

std::string format(const char* fmt, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, value);
  return buf;
}

// A config's per-token FLOPs are whole numbers under every convention; print them as integers, and in
// scientific notation past what int64 holds.
std::string flops_text(double flops) {
  if (std::fabs(flops) < 9e18) return with_thousands_separators(std::llround(flops));
  return format("%.4e", flops);
}

struct CountOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  bool json = false;
  double tokens = 0;
  bool tokens_given = false;
};

void run_count(const CountOptions& options) {
  if (options.tokens_given && !(options.tokens > 0 && std::isfinite(options.tokens)))
    throw Error("--tokens = " + format("%g", options.tokens) +
                " is not a positive number of training tokens; pass e.g. --tokens 300e9");
  const Config config = load_config(options.config_path, options.overrides);
  const std::string source = options.config_path.empty() ? "<defaults>" : options.config_path;
  const std::optional<double> tokens = options.tokens_given ? std::optional<double>(options.tokens) : std::nullopt;
  if (options.json)
    std::cout << count_report_json(config.model, source, tokens).dump(2) << "\n";
  else
    std::cout << count_report_table(config.model, source, tokens);
  std::cout.flush();
}

}  // namespace

std::string with_thousands_separators(int64_t value) {
  const std::string digits = std::to_string(value < 0 ? -static_cast<uint64_t>(value) : static_cast<uint64_t>(value));
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return value < 0 ? "-" + out : out;
}

nlohmann::ordered_json count_report_json(const ModelConfig& m, const std::string& source,
                                         std::optional<double> tokens) {
  const ParameterCounts n = count_parameters(m);
  nlohmann::ordered_json report;
  report["config"] = source;
  report["parameters"] = {{"total", n.total},
                          {"active", n.active},
                          {"nonembedding_total", n.nonembedding_total},
                          {"nonembedding_active", n.nonembedding_active},
                          {"embedding", n.embedding},
                          {"non_expert", n.non_expert},
                          {"per_expert", n.per_expert}};
  report["moe"] = {{"moe_layers", n.moe_layers},         {"routed_experts", n.routed_experts},
                   {"active_experts", n.active_experts}, {"shared_experts", n.shared_experts},
                   {"sparsity", n.sparsity},             {"granularity", n.granularity},
                   {"expansion_rate", n.expansion_rate}};
  nlohmann::ordered_json per_token, total;
  for (const FlopConvention c : all_flop_conventions()) {
    const double flops = training_flops_per_token(m, c);
    per_token[to_string(c)] = flops;
    if (tokens) total[to_string(c)] = flops * *tokens;
  }
  report["flops_per_token"] = per_token;
  if (tokens) {
    report["tokens"] = *tokens;
    report["training_flops"] = total;
  }
  return report;
}

std::string count_report_table(const ModelConfig& m, const std::string& source, std::optional<double> tokens) {
  const ParameterCounts n = count_parameters(m);
  std::ostringstream out;
  constexpr int kLabelWidth = 40, kValueWidth = 22;
  auto row = [&](const std::string& label, const std::string& value, const std::string& extra = "") {
    out << "  " << std::left;
    out.width(kLabelWidth);
    out << label << std::right;
    out.width(kValueWidth);
    out << value;
    if (!extra.empty()) {
      out << "  ";
      out.width(kValueWidth);
      out << extra;
    }
    out << "\n";
  };
  auto count = [](int64_t v) { return with_thousands_separators(v); };

  out << "moelab count: " << source << "\n";
  out << "  " << m.n_layers << " layers, d_model " << count(m.d_model) << ", " << m.n_heads << " heads, d_ff "
      << count(m.ffn_hidden()) << ", seq_len " << count(m.seq_len) << ", vocab " << count(m.vocab_size) << "; "
      << to_string(m.ffn) << ", " << to_string(m.norm) << ", " << to_string(m.pos) << ", "
      << (m.bias ? "biases" : "no biases") << ", " << (m.tied_embeddings ? "tied" : "untied") << " embeddings"
      << (m.qk_norm ? ", QK-norm" : "") << "\n";

  out << "\nparameters\n";
  row("total", count(n.total));
  row("active", count(n.active));
  row("non-embedding total", count(n.nonembedding_total));
  row("non-embedding active", count(n.nonembedding_active));
  row("embedding (tokens, positions, head)", count(n.embedding));
  row("non-expert", count(n.non_expert));
  row("per routed expert (all MoE layers)", count(n.per_expert));

  out << "\nmixture of experts";
  if (!m.moe.enabled()) {
    out << ": none (dense)\n";
  } else {
    out << " (" << to_string(m.moe.router) << ", " << to_string(m.moe.score) << " scores, balance "
        << to_string(m.moe.balance) << ", expert hidden " << count(ModelPlan(m).expert_hidden) << ")\n";
    row("MoE layers", count(n.moe_layers) + " of " + count(m.n_layers) +
                          (m.moe.first_dense > 0 ? " (first " + count(m.moe.first_dense) + " dense)" : ""));
    row("routed experts E_total", count(n.routed_experts));
    row("active experts K", count(n.active_experts));
    row("shared experts", count(n.shared_experts));
    row("sparsity S = (E_total - K) / E_total", format("%.6g", n.sparsity));
    row("granularity G", count(n.granularity));
    row("expansion rate E", format("%.6g", n.expansion_rate));
  }

  out << "\n";
  out << std::left;
  out.width(kLabelWidth + 2);
  out << "training FLOPs per token";
  out << std::right;
  out.width(kValueWidth);
  out << "per token";
  if (tokens) {
    out << "  ";
    out.width(kValueWidth);
    out << format("total (D = %.4g)", *tokens);
  }
  out << "\n";
  for (const FlopConvention c : all_flop_conventions()) {
    const double flops = training_flops_per_token(m, c);
    row(to_string(c), flops_text(flops), tokens ? format("%.4e", flops * *tokens) : "");
  }
  out << "(conventions: docs/counting.md)\n";
  return out.str();
}

void add_count_command(CLI::App& app) {
  // The options outlive this function: CLI11 writes into them during parsing and the callback reads them.
  auto options = std::make_shared<CountOptions>();
  auto* count = app.add_subcommand(
      "count", "count total/active parameters and training FLOPs per token under each paper's convention");
  count->add_option("-c,--config", options->config_path, "TOML config file; omitted keys take their defaults");
  count->add_option("--set", options->overrides,
                    "override a config key, e.g. --set moe.experts=64 (repeatable; applied after --config)");
  count->add_flag("--json", options->json, "print one JSON object instead of the table");
  auto* tokens =
      count->add_option("--tokens", options->tokens, "training tokens D: also print total training FLOPs = per token * D");
  count->footer(
      "Example:\n  moelab count --config configs/fairseq-moe-4b.toml --tokens 300e9\n"
      "Never builds the model, so any shape answers instantly. Conventions: kaplan, chinchilla, abnar,\n"
      "abnar_router, krajewski, exact (what the engine computes); see docs/counting.md.\n");
  on_run(count, [options, tokens]() {
    options->tokens_given = tokens->count() > 0;
    run_count(*options);
  });
}

}  // namespace moelab
