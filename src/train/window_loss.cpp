#include "train/window_loss.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace moelab {

WindowLoss mean_window_loss(Transformer& model, const TokenFile& file, int64_t batch, int64_t max_batches) {
  const int64_t T = model.config().seq_len;
  const int64_t windows = eval_windows(file, T);
  if (windows == 0)
    throw Error("evaluation data '" + file.path() + "' is shorter than one window of " + std::to_string(T + 1) +
                " tokens");
  const int64_t wanted = max_batches > 0 ? std::min(windows, max_batches * batch) : windows;
  std::vector<int32_t> tokens, targets;
  WindowLoss result;
  double loss_sum = 0;
  for (int64_t first = 0; first < wanted; first += batch) {
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
    loss_sum += model.forward(tokens.data(), targets.data(), n) * static_cast<double>(model.counted_positions());
    result.tokens += model.counted_positions();
  }
  result.loss = loss_sum / static_cast<double>(result.tokens);
  result.complete = wanted == windows;
  return result;
}

}  // namespace moelab
