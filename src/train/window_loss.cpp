#include "train/window_loss.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace moelab {

WindowLoss mean_window_loss(Transformer& model, const TokenFile& file, int64_t batch, int64_t max_batches,
                            Communicator* comm) {
  const int64_t T = model.config().seq_len;
  const int64_t windows = eval_windows(file, T);
  if (windows == 0)
    throw Error("evaluation data '" + file.path() + "' is shorter than one window of " + std::to_string(T + 1) +
                " tokens");
  const int64_t wanted = max_batches > 0 ? std::min(windows, max_batches * batch) : windows;
  std::vector<int32_t> tokens, targets;
  WindowLoss result;
  double sums[2] = {0.0, 0.0};  // loss, counted positions
  const int64_t rank = comm ? comm->rank() : 0, ranks = comm ? comm->size() : 1;
  const int64_t batches = (wanted + batch - 1) / batch, rounds = (batches + ranks - 1) / ranks;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t index = round * ranks + rank;
    if (index >= batches) {  // this rank's share ran out: a forward like the others', nothing counted
      tokens.assign(T, 0);
      targets.assign(T, -1);
      model.forward(tokens.data(), targets.data(), 1);
      continue;
    }
    const int64_t first = index * batch;
    const int64_t n = std::min(batch, wanted - first);
    tokens.resize(n * T);
    targets.resize(n * T);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t window = (first + b) * windows / wanted;  // evenly spread; all windows when wanted == windows
      for (int64_t t = 0; t < T; ++t) {
        tokens[b * T + t] = file.at(window * T + t);
        targets[b * T + t] = file.at(window * T + t + 1);
      }
    }
    sums[0] += model.forward(tokens.data(), targets.data(), n) * static_cast<double>(model.counted_positions());
    sums[1] += static_cast<double>(model.counted_positions());
  }
  if (ranks > 1) comm->allreduce_sum(sums, 2);
  result.tokens = static_cast<int64_t>(sums[1]);
  result.loss = sums[0] / sums[1];
  result.complete = wanted == windows;
  return result;
}

}  // namespace moelab
