#pragma once
#include <string>
#include <vector>

namespace moelab {

// Encodes text files (or every file under a directory) as byte-level tokens (vocabulary 256, one token per byte) into a flat uint16 token file,
// optionally holding out the last `val_fraction` of each input for validation. A stand-in tokenizer until a
// trained SentencePiece model is available; returns the number of training tokens written.
struct ByteEncodeResult {
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};
ByteEncodeResult encode_bytes(const std::vector<std::string>& inputs, const std::string& train_out,
                              const std::string& val_out, double val_fraction);

}  // namespace moelab
