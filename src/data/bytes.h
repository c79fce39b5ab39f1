#pragma once
#include <string>
#include <vector>

namespace moelab {

// Encodes text files (or every file under a directory) as byte-level tokens (vocabulary 256, one token per
// byte) into a token shard, optionally holding out the last `val_fraction` of each input for validation.
// The tokenizer-free baseline: no training, any text, and small models learn it quickly.
struct ByteEncodeResult {
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};
ByteEncodeResult encode_bytes(const std::vector<std::string>& inputs, const std::string& train_out,
                              const std::string& val_out, double val_fraction);

}  // namespace moelab
