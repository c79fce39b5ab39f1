#pragma once
#include <cstdint>

#include "data/token_file.h"
#include "dist/comm.h"
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
// With a communicator of several ranks, rank r scores batches r, r + ranks, ... and the sums are added in rank
// order: every rank returns the same value. Every rank runs the same number of forwards (one whose batch ran out
// runs one with no counted position), since a forward of an expert-parallel model involves every rank.
WindowLoss mean_window_loss(Transformer& model, const TokenFile& file, int64_t batch, int64_t max_batches,
                            Communicator* comm = nullptr);

}  // namespace moelab
