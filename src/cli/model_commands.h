#pragma once
#include <CLI/CLI.hpp>

namespace moelab {

// `moelab eval` (perplexity on text/JSONL/shards, or accuracy on multiple-choice tasks), `moelab generate`
// (sampling with a KV cache), `moelab finetune` (fine-tuning on a task) and `moelab tasks` (list tasks).
void add_model_commands(CLI::App& app);

}  // namespace moelab
