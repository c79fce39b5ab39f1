#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

namespace moelab {

AdamW::AdamW(const ParamLayout& layout, const TrainConfig& train, Backend& backend)
    : layout_(layout), train_(train), backend_(backend) {
  m_ = backend_.alloc(layout_.total());
  v_ = backend_.alloc(layout_.total());
}

AdamW::~AdamW() {
  backend_.free(m_);
  backend_.free(v_);
}

void AdamW::step(float* params, float* grads, double lr, float grad_scale, Grads after) {
  ++step_;
  const auto zeroes = [&](ParamKind kind) {
    return after == Grads::Zero || (after == Grads::ZeroExceptMatrices && kind != ParamKind::Matrix);
  };
  // Consecutive parameters with the same decay setting and gradient treatment are updated in one call.
  const auto& entries = layout_.entries();
  size_t i = 0;
  while (i < entries.size()) {
    const bool decay = is_decayed(entries[i].kind, train_.decay_embeddings), zero_grads = zeroes(entries[i].kind);
    size_t j = i + 1;
    while (j < entries.size() && is_decayed(entries[j].kind, train_.decay_embeddings) == decay &&
           zeroes(entries[j].kind) == zero_grads)
      ++j;
    const int64_t begin = entries[i].offset, end = entries[j - 1].offset + entries[j - 1].shape.numel();
    backend_.adamw_update(params + begin, grads + begin, m_ + begin, v_ + begin, end - begin,
                          static_cast<float>(lr), static_cast<float>(train_.beta1), static_cast<float>(train_.beta2),
                          static_cast<float>(train_.adam_eps), decay ? static_cast<float>(train_.weight_decay) : 0.f,
                          grad_scale, step_, zero_grads);
    i = j;
  }
}

float clip_factor(double norm, double max_norm) {
  if (max_norm <= 0) return 1.f;
  return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

}  // namespace moelab
