#pragma once
#include <cstdint>

#include "data/token_file.h"
#include "model/transformer.h"

namespace moelab {

struct WindowLoss {
  double loss = 0;     // mean cross-entropy per predicted token (nats)
  int64_t tokens = 0;  // predicted positions
  bool complete = false;  // every window of the file was scored
};

// Mean loss over non-overlapping windows of seq_len + 1 tokens, `batch` windows per forward. With
// max_batches > 0 and more windows than that, the scored windows are spread evenly over the whole file
// (deterministically), so a capped evaluation still sees every part of a file whose sources are not shuffled.
WindowLoss mean_window_loss(Transformer& model, const TokenFile& file, int64_t batch, int64_t max_batches);

}  // namespace moelab
