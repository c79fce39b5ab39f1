#pragma once
// Trained models out of moelab and back in: GGUF for llama.cpp (architectures `llama` and `deepseek`) and the
// Hugging Face layout (LlamaForCausalLM, MixtralForCausalLM), written from the host copy of a checkpoint; and a
// Hugging Face directory read back as moelab-named tensors (train.init_from). docs/export.md says what maps to what.
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/tensor.h"

namespace moelab {

// A trained model as the writers see it: its config, the whole model's parameters on the host in
// ParamLayout(config.model) order, and the SentencePiece model its data was encoded with.
struct ExportModel {
  Config config;
  std::vector<float> params;
  std::string tokenizer_path;
  std::string name;  // general.name / the run's name
};

enum class GgufDtype { F32, F16, BF16 };
GgufDtype parse_gguf_dtype(const std::string& name);  // "f32" | "f16" | "bf16"

// The llama.cpp architecture a model maps onto: "llama" (dense; token-choice MoE with the top-k softmax weights
// renormalised, Mixtral's layout) or "deepseek" (token-choice MoE with shared experts, unnormalised gates, dense
// first layers, a gate scale). Anything else throws one moelab::Error naming the option that does not map.
std::string gguf_architecture(const ModelConfig& m);
// "LlamaForCausalLM" or "MixtralForCausalLM", or throws naming the option that does not map.
std::string hf_architecture(const ModelConfig& m);

// GGUF version 3, the vocabulary embedded (tokenizer.ggml.*), matrices in `dtype` (norms and the router stay F32).
// Written to a temporary file and renamed into place.
void export_gguf(const ExportModel& model, const std::string& path, GgufDtype dtype);
// What the exported tokenizer settings cannot reproduce in llama.cpp or LlamaTokenizerFast (SentencePiece
// normalisation those do not implement), one sentence each; empty for moelab's own tokenizers.
std::vector<std::string> tokenizer_export_caveats(const std::string& tokenizer_path);
// config.json, model.safetensors (F32, Hugging Face names), generation_config.json, tokenizer.model and
// tokenizer_config.json in `dir` (created; files replaced one by one, each atomically).
void export_hf(const ExportModel& model, const std::string& dir);

// A Hugging Face directory (config.json + model.safetensors or a sharded model.safetensors.index.json), Llama or
// Mixtral layout, as moelab-named tensors of the model it describes.
struct HfWeights {
  std::string architecture;  // config.json's architectures[0]
  std::map<std::string, std::pair<Shape, std::vector<float>>> tensors;
  double rope_theta = 10000.0, rms_norm_eps = 1e-6;
  int64_t experts_per_token = 0;  // Mixtral's num_experts_per_tok (0: dense)
  bool tied = false;
};
bool is_hf_directory(const std::string& dir);
// Throws moelab::Error naming the file or tensor for a missing tensor, a wrong shape or an unsupported architecture.
HfWeights read_hf(const std::string& dir);

}  // namespace moelab
