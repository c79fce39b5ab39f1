#include "data/token_file.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "data/shard.h"

namespace moelab {

TokenFile::TokenFile(const std::string& path, const std::string& dtype) : path_(path) {
  if (dtype != "uint16" && dtype != "uint32") throw Error("token dtype must be uint16 or uint32, got '" + dtype + "'");
  map_ = std::make_unique<MappedFile>(path, "token file",
                                      " (set data.train_path, or create one with `moelab data prepare`)");
  const uint8_t* ids = map_->data();
  size_t id_bytes = map_->size();
  if (has_shard_magic(map_->data(), map_->size())) {
    const ShardHeader header = parse_shard_header(map_->data(), map_->size(), path);
    wide_ = header.dtype_bytes == 4;
    vocab_size_ = header.vocab_size;
    ids += kShardHeaderBytes;
    id_bytes -= kShardHeaderBytes;
  } else {
    wide_ = dtype == "uint32";
    const size_t width = wide_ ? 4 : 2;
    if (id_bytes == 0 || id_bytes % width != 0)
      throw Error("token file '" + path + "' has " + std::to_string(id_bytes) + " bytes, which is not a positive "
                  "multiple of " + std::to_string(width) + " (" + dtype + "); is data.dtype right?");
  }
  count_ = static_cast<int64_t>(id_bytes / (wide_ ? 4 : 2));
  if (wide_) u32_ = reinterpret_cast<const uint32_t*>(ids);
  else u16_ = reinterpret_cast<const uint16_t*>(ids);
  for (int64_t i = 0; i < count_; ++i) max_token_ = std::max(max_token_, at(i));
  if (vocab_size_ > 0 && max_token_ >= vocab_size_)
    throw Error("token shard '" + path + "' contains id " + std::to_string(max_token_) + ", outside its vocabulary of " +
                std::to_string(vocab_size_) + ": the file is corrupt; re-create it with `moelab data prepare`");
}

TokenFile::~TokenFile() = default;

void skip_windows(const TokenFile& file, Rng& rng, int64_t windows, int64_t seq) {
  const uint64_t starts = static_cast<uint64_t>(file.size() - seq);
  for (int64_t b = 0; b < windows; ++b) rng.below(starts);
}

void sample_batch(const TokenFile& file, Rng& rng, int64_t batch, int64_t seq, std::vector<int32_t>& tokens,
                  std::vector<int32_t>& targets) {
  if (file.size() < seq + 1)
    throw Error("token file '" + file.path() + "' holds " + std::to_string(file.size()) +
                " tokens, fewer than one window of model.seq_len + 1 = " + std::to_string(seq + 1));
  tokens.resize(batch * seq);
  targets.resize(batch * seq);
  const uint64_t starts = static_cast<uint64_t>(file.size() - seq);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = static_cast<int64_t>(rng.below(starts));
    for (int64_t t = 0; t < seq; ++t) {
      tokens[b * seq + t] = file.at(start + t);
      targets[b * seq + t] = file.at(start + t + 1);
    }
  }
}

int64_t eval_windows(const TokenFile& file, int64_t seq) { return (file.size() - 1) / seq; }

void read_windows(const TokenFile& file, int64_t first_window, int64_t batch, int64_t seq,
                  std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
  tokens.resize(batch * seq);
  targets.resize(batch * seq);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) {
      const int64_t i = (first_window + b) * seq + t;
      tokens[b * seq + t] = file.at(i);
      targets[b * seq + t] = file.at(i + 1);
    }
}

}  // namespace moelab
