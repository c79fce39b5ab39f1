#include "eval/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "layers/layers.h"

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

Generator::Generator(const ModelConfig& config, Backend& backend, const float* params)
    : config_(config), backend_(backend), layout_(config), params_(params) {
  const int64_t C = config.d_model, T = config.seq_len, F = config.ffn_hidden();
  const int64_t P = config.ffn == FfnKind::SwiGLU ? 2 * F : F;
  x_ = buffer(C);
  ln_ = buffer(C);
  qkv_ = buffer(3 * C);
  att_ = buffer(C);
  scores_ = buffer(T);
  pre_ = buffer(P);
  act_ = buffer(F);
  logits_ = buffer(config.vocab_size);
  host_logits_.resize(config.vocab_size);
  norm_stats_ = buffer(2);
  token_ = BackendArray<int32_t>(backend, 1);
  for (int64_t i = 0; i < config.n_layers; ++i) {
    k_cache_.push_back(buffer(T * C));
    v_cache_.push_back(buffer(T * C));
  }
  if (config.pos == PosKind::Sinusoidal) {
    std::vector<float> table(T * C);
    sinusoidal_table(table.data(), T, C);
    sinusoidal_ = buffer(T * C);
    backend_.upload(sinusoidal_, table.data(), T * C);
  }
  if (config.moe.enabled()) {
    moe_dims_ = MoeDims::from(config, /*batch=*/1);
    moe_dims_.seq = 1;  // one token per step
    const int64_t E = moe_dims_.experts, R = moe_dims_.max_rows();
    auto view = [&](Shape s) { return Tensor(buffer(s.numel()), s); };
    moe_acts_ = {view({1, E}), view({1, E}), view({R, C}), view({R, moe_dims_.fc1_rows()}),
                 view({R, moe_dims_.expert_hidden}), view({R, C}), Tensor(), Tensor()};
    if (moe_dims_.shared_hidden > 0) {
      moe_acts_.shared_pre = view({1, moe_dims_.shared_fc1_rows()});
      moe_acts_.shared_act = view({1, moe_dims_.shared_hidden});
    }
    routing_.reserve(backend_, moe_dims_);
  }
}

Generator::~Generator() {
  for (float* p : owned_) backend_.free(p);
}

float* Generator::buffer(int64_t n) {
  owned_.push_back(backend_.alloc(static_cast<size_t>(n)));
  return owned_.back();
}

Tensor Generator::param(const std::string& name) const {
  return layout_.view(const_cast<float*>(params_), name);
}
Tensor Generator::param_or_empty(const std::string& name) const {
  return layout_.view_or_empty(const_cast<float*>(params_), name);
}

const float* Generator::step(int32_t token) {
  const auto& m = config_;
  Backend& be = backend_;
  const int64_t C = m.d_model, T = m.seq_len, H = m.n_heads, hd = m.head_dim(), t = position_;
  if (t >= T) throw Error("generation reached the model's context length (" + std::to_string(T) + " tokens)");
  if (token < 0 || token >= m.vocab_size) throw Error("token id " + std::to_string(token) + " outside the vocabulary");
  const float eps = static_cast<float>(m.norm_eps);
  const Shape row{1, C};
  Tensor x(x_, row), ln(ln_, row);

  const float* pos = m.pos == PosKind::Learned ? param("pos_emb.weight").data + t * C
                     : m.pos == PosKind::Sinusoidal ? sinusoidal_ + t * C
                                                    : nullptr;
  be.upload(token_.data(), &token, 1);
  be.embedding_forward(x_, token_.data(), param("tok_emb.weight").data, pos, 1, 1, C);
  Tensor mean_t(norm_stats_, {1}), rstd_t(norm_stats_ + 1, {1});
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    norm_forward(be, m.norm, ln, mean_t, rstd_t, x, param(p + "norm1.weight"), param_or_empty(p + "norm1.bias"), eps);
    linear_forward(be, Tensor(qkv_, {1, 3 * C}), ln, param(p + "attn.qkv.weight"), param_or_empty(p + "attn.qkv.bias"));
    if (m.pos == PosKind::Rope) be.rope(qkv_, 1, 1, 3 * C, 2 * H, hd, static_cast<float>(m.rope_theta), false, t);
    be.copy(k_cache_[i] + t * C, qkv_ + C, C);
    be.copy(v_cache_[i] + t * C, qkv_ + 2 * C, C);
    for (int64_t h = 0; h < H; ++h) {
      // scores (1, t+1) = q_h (1, hd) @ K_h (t+1, hd)^T; out_h (1, hd) = softmax(scores) @ V_h (t+1, hd)
      be.gemm(Trans::N, Trans::T, 1, t + 1, hd, 1.f, qkv_ + h * hd, 3 * C, k_cache_[i] + h * hd, C, 0.f, scores_, T);
      be.softmax_rows(scores_, 1, t + 1, 1.f / std::sqrt(static_cast<float>(hd)));
      be.gemm(Trans::N, Trans::N, 1, hd, t + 1, 1.f, scores_, T, v_cache_[i] + h * hd, C, 0.f, att_ + h * hd, C);
    }
    linear_forward(be, x, Tensor(att_, row), param(p + "attn.out.weight"), param_or_empty(p + "attn.out.bias"),
                   /*accumulate_out=*/true);
    norm_forward(be, m.norm, ln, mean_t, rstd_t, x, param(p + "norm2.weight"), param_or_empty(p + "norm2.bias"), eps);
    if (m.moe.is_moe_layer(i)) {
      const std::string q = p + "moe.";
      const MoeWeights w{param(q + "router.weight"),          param(q + "experts.fc1.weight"),
                         param_or_empty(q + "experts.fc1.bias"), param(q + "experts.fc2.weight"),
                         param_or_empty(q + "experts.fc2.bias"), param_or_empty(q + "shared.fc1.weight"),
                         param_or_empty(q + "shared.fc1.bias"), param_or_empty(q + "shared.fc2.weight"),
                         param_or_empty(q + "shared.fc2.bias")};
      moe_forward(be, moe_dims_, x, ln, w, moe_acts_, routing_, moe_stats_);
    } else {
      const Tensor w1 = param(p + "ffn.fc1.weight");
      mlp_forward(be, m.ffn, x, Tensor(pre_, {1, w1.dim(0)}), Tensor(act_, {1, m.ffn_hidden()}), ln, w1,
                  param_or_empty(p + "ffn.fc1.bias"), param(p + "ffn.fc2.weight"), param_or_empty(p + "ffn.fc2.bias"));
    }
  }
  norm_forward(be, m.norm, ln, mean_t, rstd_t, x, param("final_norm.weight"), param_or_empty("final_norm.bias"), eps);
  linear_forward(be, Tensor(logits_, {1, m.vocab_size}), ln,
                 param(m.tied_embeddings ? "tok_emb.weight" : "lm_head.weight"), Tensor());
  ++position_;
  be.download(host_logits_.data(), logits_, m.vocab_size);
  return host_logits_.data();
}

std::vector<int32_t> Generator::generate(const std::vector<int32_t>& prompt, const SamplingOptions& options, Rng& rng,
                                         const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw Error("generation needs a prompt of at least one token");
  reset();
  const float* logits = nullptr;
  for (int32_t tok : prompt) logits = step(tok);
  std::vector<int32_t> out;
  while (static_cast<int64_t>(out.size()) < options.max_tokens) {
    const int32_t next = sample_token(logits, config_.vocab_size, options, rng);
    out.push_back(next);
    if (on_token) on_token(next);
    if (next == options.stop_token || position_ >= config_.seq_len) break;
    logits = step(next);
  }
  return out;
}

}  // namespace moelab
