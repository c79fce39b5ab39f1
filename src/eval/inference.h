#pragma once
// Using a trained checkpoint: load it with its own config, turn text into ids and back, measure perplexity.
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "data/tokenizer.h"
#include "config/config.h"
#include "model/transformer.h"

namespace moelab {

// Text <-> token ids for a model: its SentencePiece tokenizer, or raw bytes for a byte-level model (vocab 256).
class TextCodec {
 public:
  // Resolves data.tokenizer (or <data.dir>/tokenizer.model); byte-level when there is none and vocab is 256.
  explicit TextCodec(const Config& config);
  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  int32_t end_of_document() const;  // -1 for bytes
  bool byte_level() const { return !tokenizer_; }

 private:
  std::unique_ptr<Tokenizer> tokenizer_;
};

// A model restored from a checkpoint directory (weights only), built from the config stored beside it.
struct LoadedModel {
  Config config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Transformer> model;
  int64_t batch = 1;  // sequences per forward (the model's activation arena)
};
// backend: a name for make_backend, or "" for the checkpoint's own train.backend.
LoadedModel load_model(const std::string& checkpoint, int threads, int64_t batch, const std::string& backend = "");

struct PerplexityResult {
  std::string input;
  int64_t tokens = 0;  // predicted positions
  int64_t bytes = 0;   // input bytes (0 for a shard)
  double loss = 0;     // mean cross-entropy, nats per token
  double perplexity() const;
  double bits_per_byte() const;  // 0 when bytes unknown
};

// Perplexity of `input`: a token shard / flat token file, or text / JSONL / a directory (encoded with the
// model's codec). Sequential non-overlapping windows of seq_len; max_batches <= 0 means all.
PerplexityResult evaluate_perplexity(LoadedModel& loaded, const std::string& input, int64_t max_batches);

}  // namespace moelab
