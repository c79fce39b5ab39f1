#pragma once
// Checkpoints: a directory holding
//   model.safetensors      the weights (fp32), readable by the `safetensors` package and PyTorch
//   optimizer.safetensors  AdamW moments, named "exp_avg.<param>" and "exp_avg_sq.<param>"
//   state.json             step, optimizer step, data-sampler RNG state (the loader position), format version, and
//                          the router selection biases of bias balancing (training state, not parameters)
//   config.toml            the resolved config of the run that wrote it
// A checkpoint is written into a temporary directory and renamed into place, so a crash never leaves a
// half-written one; loading validates every tensor's name, shape and byte range and fails with a clear error.
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/safetensors.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "config/config.h"
#include "model/param_layout.h"

namespace moelab {

struct CheckpointState {
  int64_t step = 0;       // optimizer steps completed
  int64_t adam_step = 0;  // AdamW's bias-correction step counter
  Rng::State data_rng{};  // the training sampler's position
  // Auxiliary-loss-free balancing: each MoE layer's router selection biases (Transformer::router_biases), by layer.
  std::map<int64_t, std::vector<float>> router_bias;
};

// Saves params/moments (backend memory of `backend`, laid out by `layout`) and state to `dir`, replacing any
// previous one.
void save_checkpoint(const std::string& dir, const Config& config, const ParamLayout& layout, Backend& backend,
                     const float* params, const float* exp_avg, const float* exp_avg_sq, const CheckpointState& state);
// Loads into backend buffers laid out by `layout` (exp_avg/exp_avg_sq may be null to load weights only).
CheckpointState load_checkpoint(const std::string& dir, const ParamLayout& layout, Backend& backend, float* params,
                                float* exp_avg, float* exp_avg_sq);
// The directory of a complete checkpoint under `run_dir` ("" if none): run_dir/checkpoint, or the previous one
// if a save was interrupted between its two renames.
std::string find_checkpoint(const std::string& run_dir);
// The resolved config stored with a checkpoint.
Config checkpoint_config(const std::string& dir);

}  // namespace moelab
