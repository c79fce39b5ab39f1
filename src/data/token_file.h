#pragma once
// Token ids for training and evaluation, memory-mapped read-only. Two formats are read:
//  - a token shard (src/data/shard.h, written by `moelab data prepare` / `data encode`): recognised by its
//    "MOELABTK" magic; the header gives the id width and the vocabulary size;
//  - a legacy flat file of little-endian ids with no header (`moelab data bytes`), whose width is `dtype`.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"

namespace moelab {

class MappedFile;

class TokenFile {
 public:
  // `dtype` ("uint16" or "uint32") is the id width of a flat file; a shard's header overrides it.
  TokenFile(const std::string& path, const std::string& dtype);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  int64_t size() const { return count_; }
  int32_t at(int64_t i) const { return wide_ ? static_cast<int32_t>(u32_[i]) : static_cast<int32_t>(u16_[i]); }
  const std::string& path() const { return path_; }
  // Largest token id in the file (scanned once on open), to check against the model's vocabulary.
  int32_t max_token() const { return max_token_; }
  // The vocabulary size recorded in a shard's header; 0 (unknown) for a flat file.
  int64_t vocab_size() const { return vocab_size_; }
  bool is_shard() const { return vocab_size_ > 0; }

 private:
  std::string path_;
  std::unique_ptr<MappedFile> map_;
  bool wide_ = false;
  const uint16_t* u16_ = nullptr;
  const uint32_t* u32_ = nullptr;
  int64_t count_ = 0;
  int32_t max_token_ = 0;
  int64_t vocab_size_ = 0;
};

// Fills tokens/targets (batch, seq) with windows of seq + 1 consecutive tokens; targets are tokens shifted by one.
// Training draws window starts uniformly at random from `rng`.
// Advances rng past `windows` windows' draws of sample_batch without reading them (another rank's share of a batch).
void skip_windows(const TokenFile& file, Rng& rng, int64_t windows, int64_t seq);
void sample_batch(const TokenFile& file, Rng& rng, int64_t batch, int64_t seq, std::vector<int32_t>& tokens,
                  std::vector<int32_t>& targets);
// Evaluation reads non-overlapping windows in order: window w starts at w * seq.
int64_t eval_windows(const TokenFile& file, int64_t seq);
void read_windows(const TokenFile& file, int64_t first_window, int64_t batch, int64_t seq,
                  std::vector<int32_t>& tokens, std::vector<int32_t>& targets);

}  // namespace moelab
