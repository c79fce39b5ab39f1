#include "eval/generate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace moelab {

int32_t sample_token(const float* logits, int64_t vocab, const SamplingOptions& o, Rng& rng) {
  if (o.temperature <= 0) return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  std::vector<int32_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  const int64_t k = o.top_k > 0 ? std::min<int64_t>(o.top_k, vocab) : vocab;
  std::vector<double> p(k);
  const double mx = logits[order[0]];
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += p[i] = std::exp((logits[order[i]] - mx) / o.temperature);
  // Nucleus: keep the smallest prefix whose mass reaches top_p.
  int64_t keep = k;
  if (o.top_p < 1.0) {
    double mass = 0;
    for (int64_t i = 0; i < k; ++i) {
      mass += p[i] / sum;
      if (mass >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += p[i];
  double u = rng.uniform() * kept;
  for (int64_t i = 0; i < keep; ++i) {
    u -= p[i];
    if (u <= 0) return order[i];
  }
  return order[keep - 1];
}

Generator::Generator(Transformer& model) : model_(model), host_logits_(model.config().vocab_size) {
  model_.decode_reset();
}

void Generator::reset() { model_.decode_reset(); }

const float* Generator::step(int32_t token) {
  model_.decode(token);
  model_.backend().download(host_logits_.data(), model_.logits().data, model_.config().vocab_size);
  return host_logits_.data();
}

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt, const SamplingOptions& options, Rng& rng,
                                         const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw Error("generation needs a prompt of at least one token");
  reset();
  const float* logits = nullptr;
  for (int32_t tok : prompt) logits = step(tok);
  std::vector<int32_t> out;
  const int64_t vocab = model_.config().vocab_size;
  while (static_cast<int64_t>(out.size()) < options.max_tokens) {
    if (options.banned_token >= 0 && options.banned_token < vocab)
      host_logits_[options.banned_token] = -std::numeric_limits<float>::infinity();
    const int32_t next = sample_token(logits, model_.config().vocab_size, options, rng);
    out.push_back(next);
    if (on_token) on_token(next);
    if (next == options.stop_token || position() >= model_.config().seq_len) break;
    logits = step(next);
  }
  return out;
}

}  // namespace moelab
