#include "cli/export_command.h"

#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli/report_errors.h"
#include "formats/formats.h"
#include "model/param_layout.h"
#include "train/checkpoint.h"

namespace moelab {
namespace fs = std::filesystem;

namespace {

struct ExportArgs {
  std::string checkpoint, format, out, dtype = "f32", tokenizer;
};

ExportModel load_for_export(const ExportArgs& a) {
  std::string dir = a.checkpoint;
  if (!fs::exists(dir))
    throw Error("checkpoint '" + dir + "' does not exist (give a run directory or its checkpoint/ directory)");
  if (!fs::exists(fs::path(dir) / "state.json")) {
    dir = find_checkpoint(a.checkpoint);
    if (dir.empty()) throw Error("'" + a.checkpoint + "' holds no checkpoint (neither state.json nor checkpoint/)");
  }
  ExportModel m;
  m.config = checkpoint_config(dir);
  const ParamLayout layout(m.config.model);
  m.params.resize(static_cast<size_t>(layout.total()));
  const SafetensorsFile file((fs::path(dir) / "model.safetensors").string());
  for (const auto& e : layout.entries()) file.read(e.name, e.shape, m.params.data() + e.offset);
  m.tokenizer_path = !a.tokenizer.empty() ? a.tokenizer : resolve_data_paths(m.config.data).tokenizer;
  fs::path run = fs::absolute(dir).lexically_normal();
  if (run.filename() == "checkpoint" || run.filename().empty()) run = run.parent_path();
  if (run.filename() == "checkpoint") run = run.parent_path();
  m.name = run.filename().string();
  return m;
}

}  // namespace

void add_export_command(CLI::App& app) {
  auto args = std::make_shared<ExportArgs>();
  auto* ex = app.add_subcommand(
      "export", "write a checkpoint as GGUF for llama.cpp (architectures llama and deepseek) or as a Hugging Face "
                "directory (LlamaForCausalLM, MixtralForCausalLM); docs/export.md says what maps to what");
  ex->add_option("-k,--checkpoint", args->checkpoint, "checkpoint directory, or a run directory")->required();
  ex->add_option("--format", args->format, "gguf (one file) or hf (a directory)")
      ->required()
      ->check(CLI::IsMember({"gguf", "hf"}));
  ex->add_option("-o,--out", args->out,
                 "output: FILE.gguf, or a directory for hf; missing parent directories are created, an existing file "
                 "is replaced (written to a temporary file, then renamed)")
      ->required();
  ex->add_option("--dtype", args->dtype,
                 "gguf: f32 (default; llama.cpp then computes in fp32), f16 or bf16 for the weight matrices (norms "
                 "and the router stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  ex->add_option("--tokenizer", args->tokenizer,
                 "the SentencePiece model the data was encoded with (default: the run's data.tokenizer / "
                 "<data.dir>/tokenizer.model)");
  ex->footer(
      "Examples:\n"
      "  moelab export -k runs/swiglu --format gguf --out swiglu.gguf\n"
      "  moelab export -k runs/moe --format hf --out hf/moe    # then: moelab train --init-from hf/moe ...\n"
      "Only SwiGLU, RMSNorm, RoPE, bias-free models with dropless token-choice softmax routing map onto these\n"
      "formats; anything else is refused with the option that does not map. The tokenizer goes along with its\n"
      "settings (GGUF: tokenizer.ggml.add_space_prefix = false for moelab's tokenizers; Hugging Face:\n"
      "tokenizer_config.json), so that llama.cpp and transformers tokenize text into moelab's ids.");
  on_run(ex, [args] {
    if (args->format == "hf" && args->dtype != "f32")
      throw Error("--dtype applies to --format gguf; the Hugging Face export is f32");
    const ExportModel m = load_for_export(*args);
    if (!m.tokenizer_path.empty() && fs::exists(m.tokenizer_path))
      for (const std::string& caveat : tokenizer_export_caveats(m.tokenizer_path))
        std::fprintf(stderr, "moelab: warning: %s\n", caveat.c_str());
    if (args->format == "gguf") {
      const std::string arch = gguf_architecture(m.config.model);
      export_gguf(m, args->out, parse_gguf_dtype(args->dtype));
      std::printf("wrote %s: GGUF v3, architecture %s, %s, %.1f MB\n", args->out.c_str(), arch.c_str(),
                  args->dtype.c_str(), static_cast<double>(fs::file_size(args->out)) / 1e6);
    } else {
      const std::string arch = hf_architecture(m.config.model);
      export_hf(m, args->out);
      std::printf("wrote %s: %s (config.json, model.safetensors, generation_config.json, tokenizer.model, "
                  "tokenizer_config.json)\n", args->out.c_str(), arch.c_str());
    }
  });
}

}  // namespace moelab
