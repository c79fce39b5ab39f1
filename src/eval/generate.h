#pragma once
// Autoregressive generation with a KV cache: one token at a time, each layer keeping the keys and values of
// all earlier positions, so a new token costs O(position) attention instead of a full forward.
#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"
#include "config/config.h"
#include "model/param_layout.h"
#include "moe/moe.h"

namespace moelab {

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // nucleus: smallest set of tokens with probability mass >= top_p
  int64_t max_tokens = 100;
  int32_t stop_token = -1;   // stop after emitting this token (e.g. end of document); -1: never
};

// Draws a token from logits (V) under the sampling options.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingOptions& options, Rng& rng);

class Generator {
 public:
  // `params` is a block laid out by ParamLayout(config) (e.g. loaded from a checkpoint); it is not copied.
  Generator(const ModelConfig& config, Backend& backend, const float* params);
  ~Generator();
  Generator(const Generator&) = delete;
  Generator& operator=(const Generator&) = delete;

  void reset() { position_ = 0; }
  int64_t position() const { return position_; }
  // Feeds `token` at the next position and returns the logits (V) for the position after it.
  const float* step(int32_t token);
  // Feeds the prompt, then samples up to options.max_tokens tokens (fewer at the stop token or the end of the
  // context), calling on_token for each. Returns the generated tokens.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const SamplingOptions& options, Rng& rng,
                                const std::function<void(int32_t)>& on_token = {});

 private:
  float* buffer(int64_t n);
  Tensor param(const std::string& name) const;
  Tensor param_or_empty(const std::string& name) const;

  ModelConfig config_;
  Backend& backend_;
  ParamLayout layout_;
  const float* params_;
  std::vector<float*> owned_;
  std::vector<float*> k_cache_, v_cache_;  // per layer (seq_len, C)
  float *x_, *ln_, *qkv_, *att_, *scores_, *pre_, *act_, *logits_, *sinusoidal_ = nullptr;
  float* norm_stats_ = nullptr;        // (2) the norms' mean and 1/std of the current row
  BackendArray<int32_t> token_;        // (1) the token being fed
  std::vector<float> host_logits_;     // (V) the last step's logits, downloaded
  // MoE layers run the same moe_forward as training, on a batch of one token.
  MoeDims moe_dims_;
  MoeActivations moe_acts_;
  Routing routing_;
  MoeStats moe_stats_;
  int64_t position_ = 0;
};

}  // namespace moelab
