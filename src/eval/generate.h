#pragma once
// Autoregressive generation with a KV cache: one token at a time, each layer keeping the keys and values of
// all earlier positions, so a new token costs O(position) attention instead of a full forward. The blocks are the
// model's own (Transformer::decode): generation has no transformer code of its own.
#include <functional>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "model/transformer.h"

namespace moelab {

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // nucleus: smallest set of tokens with probability mass >= top_p
  int64_t max_tokens = 100;
  int32_t stop_token = -1;   // stop after emitting this token (e.g. end of document); -1: never
  int32_t banned_token = -1;  // never emit this token (its probability set to 0; llama.cpp's --ignore-eos); -1: none
};

// Draws a token from logits (V) under the sampling options.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingOptions& options, Rng& rng);

class Generator {
 public:
  // Generates with `model` (its parameters as they are; not copied), one token at a time through
  // Transformer::decode: the same blocks as training, with a KV cache.
  explicit Generator(Transformer& model);

  void reset();
  int64_t position() const { return model_.decode_position(); }
  // Feeds `token` at the next position and returns the logits (V) for the position after it (host memory, valid
  // until the next step).
  const float* step(int32_t token);
  // Feeds the prompt, then samples up to options.max_tokens tokens (fewer at the stop token or the end of the
  // context), calling on_token for each. Returns the generated tokens.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const SamplingOptions& options, Rng& rng,
                                const std::function<void(int32_t)>& on_token = {});

 private:
  Transformer& model_;
  std::vector<float> host_logits_;  // (V) the last step's logits, downloaded
};

}  // namespace moelab
