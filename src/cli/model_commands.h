#pragma once
#include <CLI/CLI.hpp>

namespace moelab {

// `moelab eval` (perplexity of a checkpoint on text/JSONL/shards) and `moelab generate` (sampling with a KV cache).
void add_model_commands(CLI::App& app);

}  // namespace moelab
