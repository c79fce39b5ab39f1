#include "eval/inference.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/input_stream.h"
#include "core/io.h"
#include "data/prepare.h"
#include "data/token_file.h"
#include "train/window_loss.h"
#include "train/checkpoint.h"

namespace moelab {
namespace fs = std::filesystem;

TextCodec::TextCodec(const Config& config) {
  const DataConfig data = resolve_data_paths(config.data);
  if (!data.tokenizer.empty()) {
    tokenizer_ = std::make_unique<Tokenizer>(data.tokenizer);
    if (tokenizer_->vocab_size() != config.model.vocab_size)
      throw Error("tokenizer '" + data.tokenizer + "' has " + std::to_string(tokenizer_->vocab_size()) +
                  " pieces but model.vocab_size = " + std::to_string(config.model.vocab_size));
  } else if (config.model.vocab_size != 256) {
    throw Error("the model has no tokenizer (set data.tokenizer or data.dir) and is not byte-level (vocab 256)");
  }
}

std::vector<int32_t> TextCodec::encode(const std::string& text) const {
  if (tokenizer_) return tokenizer_->encode(text);
  std::vector<int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

std::string TextCodec::decode(const std::vector<int32_t>& ids) const {
  if (tokenizer_) return tokenizer_->decode(ids);
  std::string s;
  for (int32_t id : ids) s.push_back(static_cast<char>(id));
  return s;
}

int32_t TextCodec::end_of_document() const { return tokenizer_ ? tokenizer_->eos_id() : -1; }

LoadedModel load_model(const std::string& checkpoint, int threads, int64_t batch, const std::string& backend) {
  std::string dir = checkpoint;
  if (!fs::exists(dir)) throw Error("checkpoint '" + checkpoint + "' does not exist (give a run directory or its "
                                    "checkpoint/ directory)");
  if (fs::is_directory(dir) && !fs::exists(fs::path(dir) / "state.json")) {
    dir = find_checkpoint(checkpoint);  // a run directory
    if (dir.empty()) throw Error("'" + checkpoint + "' holds no checkpoint (neither state.json nor checkpoint/)");
  }
  LoadedModel lm;
  lm.config = checkpoint_config(dir);
  if (!backend.empty()) lm.config.train.backend = backend;
  lm.backend = make_backend(lm.config.train.backend, threads);
  lm.model = std::make_unique<Transformer>(lm.config.model, *lm.backend, batch);
  lm.batch = batch;
  lm.model->set_router_biases(
      load_checkpoint(dir, lm.model->layout(), *lm.backend, lm.model->params(), nullptr, nullptr).router_bias);
  return lm;
}

double PerplexityResult::perplexity() const { return std::exp(loss); }
double PerplexityResult::bits_per_byte() const {
  return bytes > 0 ? loss * static_cast<double>(tokens) / (static_cast<double>(bytes) * std::log(2.0)) : 0.0;
}

namespace {
bool is_token_file(const std::string& path) {
  if (!fs::is_regular_file(path)) return false;
  const std::string ext = fs::path(path).extension().string();
  return ext == ".bin";
}
}  // namespace

PerplexityResult evaluate_perplexity(LoadedModel& lm, const std::string& input, int64_t max_batches) {
  if (!fs::exists(input)) throw Error("evaluation input '" + input + "' does not exist");
  PerplexityResult result;
  result.input = input;
  std::string shard = input;
  fs::path tmp;
  if (!is_token_file(input)) {
    // Text, JSONL or a directory: encode with the model's own tokenizer into a temporary shard.
    const DataConfig data = resolve_data_paths(lm.config.data);
    tmp = fs::temp_directory_path() / ("moelab_eval_" + std::to_string(::getpid()) + ".bin");
    if (!data.tokenizer.empty()) {
      Tokenizer tokenizer(data.tokenizer);
      result.bytes = encode_to_shard(tokenizer, {input}, tmp.string()).bytes;  // text bytes, decompressed
    } else {
      TextCodec codec(lm.config);  // byte-level
      std::string bytes;
      for (const auto& file : list_input_files({input})) {
        const std::string text = read_input_file(file);
        result.bytes += static_cast<int64_t>(text.size());
        for (int32_t id : codec.encode(text)) {
          bytes.push_back(static_cast<char>(id & 0xff));
          bytes.push_back(static_cast<char>(id >> 8));
        }
      }
      write_file_atomic(tmp.string(), bytes);
    }
    shard = tmp.string();
  }
  TokenFile tokens(shard, lm.config.data.dtype);
  if (tokens.vocab_size() > 0 && tokens.vocab_size() != lm.config.model.vocab_size)
    throw Error("vocabulary mismatch: '" + input + "' was encoded with vocabulary " +
                std::to_string(tokens.vocab_size()) + ", the model has " + std::to_string(lm.config.model.vocab_size));
  const WindowLoss wl = mean_window_loss(*lm.model, tokens, lm.batch, max_batches);
  result.loss = wl.loss;
  result.tokens = wl.tokens;
  if (!wl.complete) result.bytes = 0;  // only part of the text was scored: bytes per token unknown
  if (!tmp.empty()) fs::remove(tmp);
  return result;
}

}  // namespace moelab
