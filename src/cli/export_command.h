#pragma once
#include <CLI/CLI.hpp>

namespace moelab {

// `moelab export`: a checkpoint as GGUF (llama.cpp) or as a Hugging Face directory (docs/export.md).
void add_export_command(CLI::App& app);

}  // namespace moelab
