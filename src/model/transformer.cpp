#include "model/transformer.h"

#include <cmath>

#include "core/rng.h"
#include "layers/layers.h"

namespace moelab {

// Parameter (or gradient) views of every block, from the parameter table once; forward and backward use these.
Transformer::ModelWeights Transformer::weight_views(float* base) const { return param_views(layout_, base, config_); }

// The current window's part of a full (max_batch, seq_len, ...) activation: a smaller batch, or one decoded
// position, uses the leading part. (The 4-D attention probabilities keep their T x T blocks: decode() uses their
// start as scratch.)
Tensor Transformer::window(Tensor full) const {
  if (full.empty()) return full;
  Shape s = full.shape;
  if (s.rank >= 2 && s[0] == max_batch_) s.dims[0] = batch_;
  if (s.rank >= 2 && s.rank <= 3 && s[1] == config_.seq_len) s.dims[1] = seq_;
  return Tensor(full.data, s);
}

// A (rows, cols) view of the start of a buffer sized for the most rows any window can dispatch.
static Tensor leading_rows(Tensor full, int64_t rows) { return full.empty() ? full : Tensor(full.data, {rows, full.cols()}); }

MoeActivations Transformer::moe_activations(int64_t i) const {
  const MoeDims d = moe_dims(i);
  const MoeActivations& a = blocks_[i].moe;
  const int64_t n = d.tokens(), r = d.max_rows(), re = d.max_expert_rows();
  return {leading_rows(a.logits, n), leading_rows(a.probs, n),     leading_rows(a.x_sorted, r),
          leading_rows(a.pre, re),   leading_rows(a.act, re),      leading_rows(a.y_sorted, r),
          leading_rows(a.shared_pre, n), leading_rows(a.shared_act, n), leading_rows(a.x_local, re),
          leading_rows(a.y_local, re), leading_rows(a.router_in, n)};
}

MoeScratch Transformer::moe_scratch(int64_t i) const {
  const MoeDims d = moe_dims(i);
  const MoeScratch& s = buffers_.moe;
  const int64_t n = d.tokens(), r = d.max_rows(), re = d.max_expert_rows();
  return {leading_rows(s.d_x_sorted, r),   leading_rows(s.d_pre, re),       leading_rows(s.d_act, re),
          leading_rows(s.d_y_sorted, r),   Tensor(s.d_weight.data, {r}),    leading_rows(s.d_logits, n),
          leading_rows(s.d_shared_pre, n), leading_rows(s.d_shared_act, n), Tensor(s.ones.data, {re}),
          leading_rows(s.d_x_local, re),   leading_rows(s.d_y_local, re),   leading_rows(s.d_router_in, n)};
}

// Mixes a seed with a counter (splitmix64's finaliser): independent streams per layer and per forward.
static uint64_t mix_seed(uint64_t seed, uint64_t n) {
  uint64_t z = seed + (n + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return z | 1;  // never 0, which means no noise
}

MoeDims Transformer::moe_dims(int64_t i) const {
  MoeDims d = plan_.moe_dims(i, batch_, seq_);
  if (forward_noise_ != 0 && d.router_jitter > 0) d.jitter_seed = mix_seed(forward_noise_, static_cast<uint64_t>(i));
  return d;
}

// ---- the buffer tables: each activation buffer declared once, with its arena name, its shape in this model (none:
// the model does not use it) and the typed view's field; reserved in table order ------------------------------------

namespace {

struct BufferSizes {
  const ModelConfig& m;
  const ModelPlan& plan;
  int64_t B, T, C, H, V, F, pre_width;
  BufferSizes(const ModelConfig& config, const ModelPlan& p, int64_t max_batch)
      : m(config), plan(p), B(max_batch), T(config.seq_len), C(config.d_model), H(config.n_heads),
        V(config.vocab_size), F(p.ffn_hidden), pre_width(p.glu * p.ffn_hidden) {}
  bool moe(int64_t block) const { return plan.blocks[block].moe; }
  MoeDims dims(int64_t block) const { return plan.moe_dims(block, B, T); }
  // The MoE scratch: sized by the first MoE block (every MoE block has the same dims); none without MoE blocks.
  bool any_moe() const { return plan.moe_blocks() > 0; }
  MoeDims first_dims() const {
    int64_t first = 0;
    while (!plan.blocks[first].moe) ++first;
    return dims(first);
  }
};

Shape none() { return Shape(); }

struct BlockBufferSpec {
  const char* name;  // layers.<i>.<name> in the arena
  Tensor& (*field)(BlockBuffers&);
  Shape (*shape)(const BufferSizes&, int64_t block);
};
struct ModelBufferSpec {
  const char* name;
  bool after_blocks;
  Tensor& (*field)(ModelBuffers&);
  Shape (*shape)(const BufferSizes&);
};

const std::vector<BlockBufferSpec>& block_buffer_table() {
  using A = BlockBuffers;
  using Z = BufferSizes;
  // A dense block's, an MoE block's (with the options that need it), or every block's.
  static const std::vector<BlockBufferSpec> table = {
      {"ln1", [](A& a) -> Tensor& { return a.ln1; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, z.C}; }},
      {"ln1_mean", [](A& a) -> Tensor& { return a.ln1_mean; }, [](const Z& z, int64_t) { return Shape{z.B, z.T}; }},
      {"ln1_rstd", [](A& a) -> Tensor& { return a.ln1_rstd; }, [](const Z& z, int64_t) { return Shape{z.B, z.T}; }},
      {"qkv", [](A& a) -> Tensor& { return a.qkv; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, 3 * z.C}; }},
      {"qk_saved", [](A& a) -> Tensor& { return a.qk_saved; },
       [](const Z& z, int64_t) { return z.m.qk_norm ? Shape{z.B, z.T, 2 * z.C} : none(); }},
      {"qk_rstd", [](A& a) -> Tensor& { return a.qk_rstd; },
       [](const Z& z, int64_t) { return z.m.qk_norm ? Shape{z.B, z.T, 2 * z.H} : none(); }},
      {"probs", [](A& a) -> Tensor& { return a.probs; }, [](const Z& z, int64_t) { return Shape{z.B, z.H, z.T, z.T}; }},
      {"atty", [](A& a) -> Tensor& { return a.atty; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, z.C}; }},
      {"res_att", [](A& a) -> Tensor& { return a.res_att; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, z.C}; }},
      {"ln2", [](A& a) -> Tensor& { return a.ln2; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, z.C}; }},
      {"ln2_mean", [](A& a) -> Tensor& { return a.ln2_mean; }, [](const Z& z, int64_t) { return Shape{z.B, z.T}; }},
      {"ln2_rstd", [](A& a) -> Tensor& { return a.ln2_rstd; }, [](const Z& z, int64_t) { return Shape{z.B, z.T}; }},
      {"moe_logits", [](A& a) -> Tensor& { return a.moe.logits; },
       [](const Z& z, int64_t i) { return z.moe(i) ? Shape{z.B * z.T, z.dims(i).experts} : none(); }},
      {"moe_probs", [](A& a) -> Tensor& { return a.moe.probs; },
       [](const Z& z, int64_t i) { return z.moe(i) ? Shape{z.B * z.T, z.dims(i).experts} : none(); }},
      {"moe_router_in", [](A& a) -> Tensor& { return a.moe.router_in; },
       [](const Z& z, int64_t i) { return z.moe(i) && z.dims(i).router_jitter > 0 ? Shape{z.B * z.T, z.C} : none(); }},
      {"moe_x_sorted", [](A& a) -> Tensor& { return a.moe.x_sorted; },
       [](const Z& z, int64_t i) { return z.moe(i) ? Shape{z.dims(i).max_rows(), z.C} : none(); }},
      {"moe_pre", [](A& a) -> Tensor& { return a.moe.pre; },
       [](const Z& z, int64_t i) { return z.moe(i) ? Shape{z.dims(i).max_expert_rows(), z.dims(i).fc1_rows()} : none(); }},
      {"moe_act", [](A& a) -> Tensor& { return a.moe.act; },
       [](const Z& z, int64_t i) {
         return z.moe(i) ? Shape{z.dims(i).max_expert_rows(), z.dims(i).expert_hidden} : none();
       }},
      {"moe_y_sorted", [](A& a) -> Tensor& { return a.moe.y_sorted; },
       [](const Z& z, int64_t i) { return z.moe(i) ? Shape{z.dims(i).max_rows(), z.C} : none(); }},
      {"moe_x_local", [](A& a) -> Tensor& { return a.moe.x_local; },
       [](const Z& z, int64_t i) {
         return z.moe(i) && z.dims(i).expert_shards > 1 ? Shape{z.dims(i).max_expert_rows(), z.C} : none();
       }},
      {"moe_y_local", [](A& a) -> Tensor& { return a.moe.y_local; },
       [](const Z& z, int64_t i) {
         return z.moe(i) && z.dims(i).expert_shards > 1 ? Shape{z.dims(i).max_expert_rows(), z.C} : none();
       }},
      {"moe_shared_pre", [](A& a) -> Tensor& { return a.moe.shared_pre; },
       [](const Z& z, int64_t i) {
         return z.moe(i) && z.dims(i).shared_hidden > 0 ? Shape{z.B * z.T, z.dims(i).shared_fc1_rows()} : none();
       }},
      {"moe_shared_act", [](A& a) -> Tensor& { return a.moe.shared_act; },
       [](const Z& z, int64_t i) {
         return z.moe(i) && z.dims(i).shared_hidden > 0 ? Shape{z.B * z.T, z.dims(i).shared_hidden} : none();
       }},
      {"fc_pre", [](A& a) -> Tensor& { return a.fc_pre; },
       [](const Z& z, int64_t i) { return z.moe(i) ? none() : Shape{z.B, z.T, z.pre_width}; }},
      {"fc_act", [](A& a) -> Tensor& { return a.fc_act; },
       [](const Z& z, int64_t i) { return z.moe(i) ? none() : Shape{z.B, z.T, z.F}; }},
      {"res_ffn", [](A& a) -> Tensor& { return a.res_ffn; }, [](const Z& z, int64_t) { return Shape{z.B, z.T, z.C}; }},
  };
  return table;
}

const std::vector<ModelBufferSpec>& model_buffer_table() {
  using U = ModelBuffers;
  using Z = BufferSizes;
  // The first, the input of every block; then the MoE backward scratch, shared by every MoE block; the rest.
  static const std::vector<ModelBufferSpec> table = {
      {"embed", false, [](U& b) -> Tensor& { return b.embed; }, [](const Z& z) { return Shape{z.B, z.T, z.C}; }},
      {"d_moe_x_sorted", true, [](U& b) -> Tensor& { return b.moe.d_x_sorted; },
       [](const Z& z) { return z.any_moe() ? Shape{z.first_dims().max_rows(), z.C} : none(); }},
      {"d_moe_pre", true, [](U& b) -> Tensor& { return b.moe.d_pre; },
       [](const Z& z) {
         return z.any_moe() ? Shape{z.first_dims().max_expert_rows(), z.first_dims().fc1_rows()} : none();
       }},
      {"d_moe_act", true, [](U& b) -> Tensor& { return b.moe.d_act; },
       [](const Z& z) {
         return z.any_moe() ? Shape{z.first_dims().max_expert_rows(), z.first_dims().expert_hidden} : none();
       }},
      {"d_moe_y_sorted", true, [](U& b) -> Tensor& { return b.moe.d_y_sorted; },
       [](const Z& z) { return z.any_moe() ? Shape{z.first_dims().max_rows(), z.C} : none(); }},
      {"d_moe_weight", true, [](U& b) -> Tensor& { return b.moe.d_weight; },
       [](const Z& z) { return z.any_moe() ? Shape{z.first_dims().max_rows()} : none(); }},
      {"d_moe_logits", true, [](U& b) -> Tensor& { return b.moe.d_logits; },
       [](const Z& z) { return z.any_moe() ? Shape{z.B * z.T, z.first_dims().experts} : none(); }},
      {"d_moe_router_in", true, [](U& b) -> Tensor& { return b.moe.d_router_in; },
       [](const Z& z) { return z.any_moe() && z.first_dims().router_jitter > 0 ? Shape{z.B * z.T, z.C} : none(); }},
      {"moe_ones", true, [](U& b) -> Tensor& { return b.moe.ones; },
       [](const Z& z) { return z.any_moe() ? Shape{z.first_dims().max_expert_rows()} : none(); }},
      {"d_moe_x_local", true, [](U& b) -> Tensor& { return b.moe.d_x_local; },
       [](const Z& z) {
         return z.any_moe() && z.first_dims().expert_shards > 1 ? Shape{z.first_dims().max_expert_rows(), z.C} : none();
       }},
      {"d_moe_y_local", true, [](U& b) -> Tensor& { return b.moe.d_y_local; },
       [](const Z& z) {
         return z.any_moe() && z.first_dims().expert_shards > 1 ? Shape{z.first_dims().max_expert_rows(), z.C} : none();
       }},
      {"d_moe_shared_pre", true, [](U& b) -> Tensor& { return b.moe.d_shared_pre; },
       [](const Z& z) {
         return z.any_moe() && z.first_dims().shared_hidden > 0 ? Shape{z.B * z.T, z.first_dims().shared_fc1_rows()}
                                                                 : none();
       }},
      {"d_moe_shared_act", true, [](U& b) -> Tensor& { return b.moe.d_shared_act; },
       [](const Z& z) {
         return z.any_moe() && z.first_dims().shared_hidden > 0 ? Shape{z.B * z.T, z.first_dims().shared_hidden}
                                                                 : none();
       }},
      {"lnf", true, [](U& b) -> Tensor& { return b.lnf; }, [](const Z& z) { return Shape{z.B, z.T, z.C}; }},
      {"lnf_mean", true, [](U& b) -> Tensor& { return b.lnf_mean; }, [](const Z& z) { return Shape{z.B, z.T}; }},
      {"lnf_rstd", true, [](U& b) -> Tensor& { return b.lnf_rstd; }, [](const Z& z) { return Shape{z.B, z.T}; }},
      {"logits", true, [](U& b) -> Tensor& { return b.logits; }, [](const Z& z) { return Shape{z.B, z.T, z.V}; }},
      {"losses", true, [](U& b) -> Tensor& { return b.losses; }, [](const Z& z) { return Shape{z.B, z.T}; }},
      {"d_res", true, [](U& b) -> Tensor& { return b.d_res; }, [](const Z& z) { return Shape{z.B, z.T, z.C}; }},
      {"d_ln", true, [](U& b) -> Tensor& { return b.d_ln; }, [](const Z& z) { return Shape{z.B, z.T, z.C}; }},
      {"d_qkv", true, [](U& b) -> Tensor& { return b.d_qkv; }, [](const Z& z) { return Shape{z.B, z.T, 3 * z.C}; }},
      {"d_probs", true, [](U& b) -> Tensor& { return b.d_probs; },
       [](const Z& z) { return Shape{z.B, z.H, z.T, z.T}; }},
      {"d_atty", true, [](U& b) -> Tensor& { return b.d_atty; }, [](const Z& z) { return Shape{z.B, z.T, z.C}; }},
      {"d_fc_pre", true, [](U& b) -> Tensor& { return b.d_fc_pre; },
       [](const Z& z) { return Shape{z.B, z.T, z.pre_width}; }},
      {"d_fc_act", true, [](U& b) -> Tensor& { return b.d_fc_act; }, [](const Z& z) { return Shape{z.B, z.T, z.F}; }},
      {"sinusoidal", true, [](U& b) -> Tensor& { return b.sinusoidal; },
       [](const Z& z) { return z.m.pos == PosKind::Sinusoidal ? Shape{z.T, z.C} : none(); }},
  };
  return table;
}

void reserve_buffers(Arena& arena, const BufferSizes& sizes, bool after_blocks) {
  for (const ModelBufferSpec& spec : model_buffer_table())
    if (const Shape shape = spec.shape(sizes); spec.after_blocks == after_blocks && shape.rank > 0)
      arena.reserve(spec.name, shape);
}

}  // namespace

Transformer::Transformer(const ModelConfig& config, Backend& backend, int64_t max_batch, Communicator* expert_group)
    : config_(config),
      plan_(config, expert_group ? expert_group->size() : 1),
      backend_(backend),
      layout_(config, expert_group ? expert_group->size() : 1),
      full_layout_(config),
      max_batch_(max_batch),
      acts_(backend) {
  const int64_t B = max_batch, T = config.seq_len, C = config.d_model;
  params_ = backend_.alloc(layout_.total());
  grads_ = backend_.alloc(layout_.total());
  tokens_ = BackendArray<int32_t>(backend_, B * T);
  targets_ = BackendArray<int32_t>(backend_, B * T);

  // Saved activations, per layer: everything the backward reads, and the shared buffers (buffer tables below).
  // Shapes are (B, T, ...) so a smaller batch can use a prefix.
  const BufferSizes sizes{config, plan_, B};
  reserve_buffers(acts_, sizes, /*after_blocks=*/false);
  for (int64_t i = 0; i < config.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    for (const BlockBufferSpec& spec : block_buffer_table())
      if (const Shape shape = spec.shape(sizes, i); shape.rank > 0) acts_.reserve(p + spec.name, shape);
  }
  moe_layers_.resize(config.n_layers);
  expert_sq_offset_.assign(config.n_layers, -1);
  expert_parallel_ = expert_group != nullptr;
  for (int64_t i = 0; i < config.n_layers; ++i)
    if (plan_.blocks[i].moe) moe_layers_[i] = std::make_unique<MoeLayer>(backend_, plan_.moe_dims(i, B, T), expert_group);
  reserve_buffers(acts_, sizes, /*after_blocks=*/true);
  acts_.allocate();
  if (acts_.has("moe_ones")) backend_.fill(acts_.view("moe_ones").data, 1.f, acts_.view("moe_ones").numel());
  if (config.pos == PosKind::Sinusoidal) {
    std::vector<float> table(T * C);
    sinusoidal_table(table.data(), T, C);
    backend_.upload(acts_.view("sinusoidal").data, table.data(), T * C);
  }
  int64_t sums = 0;  // 2E per MoE block
  for (int64_t i = 0; i < config.n_layers; ++i)
    if (plan_.blocks[i].moe) {
      expert_sq_offset_[i] = sums;
      sums += 2 * plan_.blocks[i].moe_dims.local_experts();
    }
  if (sums > 0) expert_dweight_sq_ = BackendArray<double>(backend_, sums);

  // Typed views, once: names stay in the layout and the arena (checkpoint I/O, setup), not in forward/backward.
  weights_ = weight_views(params_);
  grad_views_ = weight_views(grads_);
  const auto slot = [&](const std::string& name) { return acts_.has(name) ? acts_.view(name) : Tensor(); };
  blocks_.resize(config.n_layers);
  for (int64_t i = 0; i < config.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    for (const BlockBufferSpec& spec : block_buffer_table()) spec.field(blocks_[i]) = slot(p + spec.name);
  }
  for (const ModelBufferSpec& spec : model_buffer_table()) spec.field(buffers_) = slot(spec.name);
  declare_buffer_uses();
}

// What reads each buffer (Backend::declare_use), once, for the full-size buffers: the layers say it for their own,
// the model for the parameters and the norms' outputs, whose readers it wires.
void Transformer::declare_buffer_uses() {
  Backend& be = backend_;
  using Use = Backend::BufferUse;
  be.declare_use(params_, layout_.total(), Use::MatmulOperand);
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    const BlockActivations& a = blocks_[i];
    const BlockWeights& w = weights_.blocks[i];
    // ln1 feeds the qkv product and its weight gradient's (the norm's backward reads the norm's input).
    be.declare_use(a.ln1.data, a.ln1.numel(), Use::MatmulOperandOnly);
    attention_declare_uses(be, a.probs, buffers_.d_probs);
    if (!plan_.blocks[i].moe) {
      be.declare_use(a.ln2.data, a.ln2.numel(), Use::MatmulOperandOnly);  // fc1's products only
      mlp_declare_uses(be, a.fc_act, buffers_.d_fc_pre, !w.fc1_b.empty());
    } else {
      // An MoE block's router reads ln2 at fp32 and its dispatch gathers from it; a shared expert multiplies by it.
      if (!a.moe.shared_act.empty()) {
        be.declare_use(a.ln2.data, a.ln2.numel(), Use::MatmulOperand);
        mlp_declare_uses(be, a.moe.shared_act, buffers_.moe.d_shared_pre, !w.moe.shared_fc1_b.empty());
      }
      moe_layers_[i]->declare_uses(be, a.moe, buffers_.moe);
    }
  }
  be.declare_use(buffers_.lnf.data, buffers_.lnf.numel(), Use::MatmulOperandOnly);  // the head's products only
  cross_entropy_declare_uses(be, buffers_.logits);
}

Transformer::~Transformer() {
  backend_.free(params_);
  backend_.free(grads_);
}

int64_t Transformer::expert_shard() const {
  for (int64_t i = 0; i < config_.n_layers; ++i)
    if (moe_layers_[i]) return moe_layers_[i]->dispatcher().first_expert() / plan_.blocks[i].moe_dims.local_experts();
  return 0;
}

double Transformer::take_exchange_seconds() {
  double s = 0;
  for (auto& layer : moe_layers_)
    if (layer) s += layer->dispatcher().take_seconds();
  return s;
}

double Transformer::last_aux_loss() const {
  double sum = 0.0;
  for (const auto& layer : moe_layers_)
    if (layer && layer->last_dims().batch > 0) sum += layer->statistics(backend_).weighted_aux(layer->last_dims());
  return sum;
}

std::vector<MoeStats> Transformer::moe_statistics() const {
  std::vector<MoeStats> out(config_.n_layers);
  for (int64_t i = 0; i < config_.n_layers; ++i)
    if (moe_layers_[i] && moe_layers_[i]->last_dims().batch > 0) out[i] = moe_layers_[i]->statistics(backend_);
  return out;
}

// Each local tensor is its full tensor, or, for a routed-expert tensor under expert parallelism, this rank's slice of
// experts along dim 0.
std::vector<float> Transformer::local_from_full(const std::vector<float>& full) const {
  MOELAB_CHECK(static_cast<int64_t>(full.size()) == full_layout_.total(), "parameters of another model");
  std::vector<float> local(layout_.total());
  const int64_t shard = expert_shard();
  for (const auto& e : layout_.entries()) {
    const ParamEntry& f = full_layout_.find(e.name);
    const int64_t n = e.shape.numel(), from = f.offset + (n == f.shape.numel() ? 0 : shard * n);
    std::copy(full.begin() + from, full.begin() + from + n, local.begin() + e.offset);
  }
  return local;
}

void Transformer::init_weights(uint64_t seed) {
  // Drawn over the whole model in layout order, whatever part of it this rank holds: every expert starts as it
  // would in one process.
  Rng rng(seed);
  std::vector<float> host(full_layout_.total());
  for (const auto& e : full_layout_.entries()) {
    float* p = host.data() + e.offset;
    const int64_t n = e.shape.numel();
    switch (e.kind) {
      case ParamKind::NormWeight:
        for (int64_t i = 0; i < n; ++i) p[i] = 1.f;
        break;
      case ParamKind::Bias:
        for (int64_t i = 0; i < n; ++i) p[i] = 0.f;
        break;
      default:
        for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(rng.normal()) * e.init_std;
    }
  }
  if (expert_parallel_) host = local_from_full(host);
  backend_.upload(params_, host.data(), layout_.total());
}

void Transformer::zero_grad() {
  if (grad_state_ == GradState::Accumulated) {
    backend_.fill(grads_, 0.f, layout_.total());
    grad_state_ = GradState::Zero;
    expert_sq_valid_ = false;
  }
}

Tensor Transformer::logits() const { return window(buffers_.logits); }

std::vector<float> Transformer::download_logits() {
  const Tensor t = logits();
  return backend_.download_vector(t.data, t.numel());
}

double Transformer::forward(const int32_t* tokens, const int32_t* targets, int64_t batch, float backward_scale) {
  MOELAB_CHECK(batch >= 1 && batch <= max_batch_, "batch " + std::to_string(batch) + " exceeds the arena");
  MOELAB_CHECK(backward_scale == 0.f || targets != nullptr, "backward needs targets");
  Backend& be = backend_;
  const auto& m = config_;
  batch_ = batch;
  seq_ = m.seq_len;
  decode_position_ = -1;  // the activations no longer hold a decode window
  backward_scale_ = backward_scale;
  forward_noise_ = 0;
  if (backward_scale != 0.f) {  // a training forward: this one's noise, and the seed moves on
    forward_noise_ = mix_seed(noise_seed_, 0);
    noise_seed_ = mix_seed(noise_seed_, 1);
  }
  const int64_t T = m.seq_len, V = m.vocab_size;
  for (int64_t i = 0; i < batch * T; ++i)
    if (tokens[i] < 0 || tokens[i] >= V)
      throw Error("token id " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " + std::to_string(V) +
                  "); set model.vocab_size to cover the data");
  be.upload(tokens_.data(), tokens, batch * T);
  const Tensor logits = forward_window(/*first_position=*/0);
  if (!targets) return 0.0;

  counted_ = 0;
  for (int64_t i = 0; i < batch * T; ++i) {
    if (targets[i] >= V)
      throw Error("target id " + std::to_string(targets[i]) + " is outside the vocabulary; set model.vocab_size");
    counted_ += targets[i] >= 0;
  }
  if (counted_ == 0) return 0.0;
  be.upload(targets_.data(), targets, batch * T);
  const float grad_scale = backward_scale / static_cast<float>(counted_);
  const double loss_sum = cross_entropy_forward_backward(be, logits, window(buffers_.losses), targets_.data(), grad_scale);
  return loss_sum / static_cast<double>(counted_);
}

void Transformer::decode_reset() {
  if (expert_parallel_)
    throw Error("generation with expert parallelism is not supported; load the checkpoint in one process");
  decode_position_ = 0;
  if (!k_cache_.data()) {
    const int64_t n = config_.n_layers * config_.seq_len * config_.d_model;
    k_cache_ = BackendArray<float>(backend_, n);
    v_cache_ = BackendArray<float>(backend_, n);
  }
}

void Transformer::decode(int32_t token) {
  const auto& m = config_;
  MOELAB_CHECK(decode_position_ >= 0, "decode() without decode_reset(), or after a forward()");
  if (decode_position_ >= m.seq_len)
    throw Error("generation reached the model's context length (" + std::to_string(m.seq_len) + " tokens)");
  if (token < 0 || token >= m.vocab_size)
    throw Error("token id " + std::to_string(token) + " is outside the vocabulary [0, " + std::to_string(m.vocab_size) +
                ")");
  batch_ = 1;
  seq_ = 1;
  forward_noise_ = 0;
  backend_.upload(tokens_.data(), &token, 1);
  forward_window(decode_position_);
  ++decode_position_;
}

// The embedding, every block and the head over the current window: (batch_, seq_len) sequences from position 0
// (training, evaluation), or one position of one sequence at first_position with the KV cache (decode).
Tensor Transformer::forward_window(int64_t first_position) {
  Backend& be = backend_;
  const auto& m = config_;
  const int64_t C = m.d_model;
  const float eps = static_cast<float>(m.norm_eps);
  Tensor pos = m.pos == PosKind::Learned ? weights_.pos_emb : m.pos == PosKind::Sinusoidal ? buffers_.sinusoidal : Tensor();
  if (!pos.empty()) pos = Tensor(pos.data + first_position * C, {pos.dim(0) - first_position, C});
  embedding_forward(be, window(buffers_.embed), tokens_.data(), weights_.tok_emb, pos);
  Tensor residual = window(buffers_.embed);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    block_forward(i, residual, first_position);
    residual = window(blocks_[i].res_ffn);
  }
  Tensor lnf = window(buffers_.lnf);
  norm_forward(be, m.norm, lnf, window(buffers_.lnf_mean), window(buffers_.lnf_rstd), residual, weights_.final_norm_w,
               weights_.final_norm_b, eps);
  const Tensor head = weights_.head;
  Tensor logits = window(buffers_.logits);
  linear_forward(be, logits, lnf, head, Tensor());
  return logits;
}

// One pre-norm block, shared by training, evaluation and generation: residual -> res_att -> res_ffn (layer i's
// activations). Attention is causal over the window, or, when decoding, over the cached keys and values.
void Transformer::block_forward(int64_t i, Tensor residual, int64_t first_position) {
  Backend& be = backend_;
  const auto& m = config_;
  const float eps = static_cast<float>(m.norm_eps);
  const BlockWeights& w = weights_.blocks[i];
  Tensor ln1 = window(blocks_[i].ln1), qkv = window(blocks_[i].qkv), atty = window(blocks_[i].atty), res_att = window(blocks_[i].res_att);
  norm_forward(be, m.norm, ln1, window(blocks_[i].ln1_mean), window(blocks_[i].ln1_rstd), residual, w.norm1_w, w.norm1_b, eps);
  linear_forward(be, qkv, ln1, w.qkv_w, w.qkv_b);
  if (m.qk_norm)
    qk_norm_forward(be, qkv, window(blocks_[i].qk_saved), window(blocks_[i].qk_rstd), w.q_norm_w, w.k_norm_w, m.n_heads,
                    eps);
  if (decode_position_ < 0) {
    const AttentionShape attn{batch_, seq_, m.d_model, m.n_heads, m.pos == PosKind::Rope,
                              static_cast<float>(m.rope_theta)};
    attention_forward(be, attn, atty, window(blocks_[i].probs), qkv);
  } else {
    cached_attention(i, atty, qkv, first_position);
  }
  be.copy(res_att.data, residual.data, res_att.numel());
  linear_forward(be, res_att, atty, w.out_w, w.out_b, /*accumulate_out=*/true);

  Tensor ln2 = window(blocks_[i].ln2), res_ffn = window(blocks_[i].res_ffn);
  norm_forward(be, m.norm, ln2, window(blocks_[i].ln2_mean), window(blocks_[i].ln2_rstd), res_att, w.norm2_w, w.norm2_b, eps);
  be.copy(res_ffn.data, res_att.data, res_ffn.numel());
  if (plan_.blocks[i].moe) {
    const MoeDims d = moe_dims(i);
    const Shape flat{d.tokens(), m.d_model};
    // a training forward's choices count for the balancing update
    moe_layers_[i]->forward(be, d, res_ffn.reshaped(flat), ln2.reshaped(flat), weights_.blocks[i].moe,
                            moe_activations(i), /*training=*/backward_scale_ != 0.f);
  } else {
    mlp_forward(be, m.ffn, res_ffn, window(blocks_[i].fc_pre), window(blocks_[i].fc_act), ln2, w.fc1_w, w.fc1_b, w.fc2_w,
                w.fc2_b);
  }
}

// Attention of one new position t = first_position of one sequence: its key and value join layer i's cache, and
// its query attends to positions 0..t. qkv (1, 1, 3C) -> atty (1, 1, C).
void Transformer::cached_attention(int64_t i, Tensor atty, Tensor qkv, int64_t t) {
  Backend& be = backend_;
  const auto& m = config_;
  const int64_t C = m.d_model, H = m.n_heads, hd = m.head_dim(), T = m.seq_len;
  if (m.pos == PosKind::Rope) be.rope(qkv.data, 1, 1, 3 * C, 2 * H, hd, static_cast<float>(m.rope_theta), false, t);
  float* keys = k_cache_.data() + i * T * C;    // (T, C) positions x heads
  float* values = v_cache_.data() + i * T * C;  // (T, C)
  be.copy(keys + t * C, qkv.data + C, C);
  be.copy(values + t * C, qkv.data + 2 * C, C);
  // scores (H, t+1) = q_h (1, hd) @ K_h (t+1, hd)^T per head, in the probabilities' slot (H * T >= H * (t+1))
  float* scores = window(blocks_[i].probs).data;
  be.gemm_strided_batched(Trans::N, Trans::T, 1, t + 1, hd, 1.f, qkv.data, 3 * C, hd, keys, C, hd, 0.f, scores, t + 1,
                          t + 1, H);
  be.softmax_rows(scores, H, t + 1, 1.f / std::sqrt(static_cast<float>(hd)));
  // out_h (1, hd) = softmax(scores_h) (1, t+1) @ V_h (t+1, hd)
  be.gemm_strided_batched(Trans::N, Trans::N, 1, hd, t + 1, 1.f, scores, t + 1, t + 1, values, C, hd, 0.f, atty.data,
                          C, hd, H);
}

void Transformer::backward() {
  MOELAB_CHECK(decode_position_ < 0, "backward() after decode(): the activations hold a decoded position; run "
               "forward() first");
  Backend& be = backend_;
  const auto& m = config_;
  const int64_t T = m.seq_len;
  const AttentionShape attn{batch_, T, m.d_model, m.n_heads, m.pos == PosKind::Rope, static_cast<float>(m.rope_theta)};

  // The first backward after zero_grad() overwrites the weight matrices' gradients (the same as adding to zeros).
  const bool acc = grad_state_ == GradState::Accumulated;
  grad_state_ = GradState::Accumulated;
  // Output head: d_logits already holds the scaled gradient (written by the fused cross-entropy).
  Tensor d_res = window(buffers_.d_res);
  Tensor d_ln = window(buffers_.d_ln);
  // A tied head's gradient is the embedding table's (ParamKind::Embedding, zeroed by the optimizer): added to.
  linear_backward(be, d_ln, grad_views_.head, Tensor(), window(buffers_.logits), window(buffers_.lnf),
                  weights_.head, /*accumulate_din=*/false, acc || m.tied_embeddings);
  Tensor last = m.n_layers > 0 ? window(blocks_[m.n_layers - 1].res_ffn) : window(buffers_.embed);
  be.fill(d_res.data, 0.f, d_res.numel());
  norm_backward(be, m.norm, d_res, grad_views_.final_norm_w, grad_views_.final_norm_b, d_ln, last, weights_.final_norm_w, window(buffers_.lnf_mean), window(buffers_.lnf_rstd));

  // d_res carries the gradient of the residual stream down through the blocks.
  for (int64_t i = m.n_layers - 1; i >= 0; --i) {
    const BlockWeights& w = weights_.blocks[i];
    const BlockWeights& g = grad_views_.blocks[i];
    Tensor layer_in = i > 0 ? window(blocks_[i - 1].res_ffn) : window(buffers_.embed);
    Tensor res_att = window(blocks_[i].res_att);

    // FFN branch: res_ffn = res_att + mlp(norm2(res_att))
    be.fill(d_ln.data, 0.f, d_ln.numel());
    if (plan_.blocks[i].moe) {
      const Shape flat{batch_ * T, m.d_model};
      moe_layers_[i]->backward(be, moe_dims(i), d_ln.reshaped(flat), grad_views_.blocks[i].moe, d_res.reshaped(flat),
                               window(blocks_[i].ln2).reshaped(flat), weights_.blocks[i].moe, moe_activations(i),
                               moe_scratch(i), backward_scale_, acc,
                               expert_dweight_sq_.data() + expert_sq_offset_[i]);
    } else {
      mlp_backward(be, m.ffn, d_ln, g.fc1_w, g.fc1_b, g.fc2_w, g.fc2_b, window(buffers_.d_fc_pre), window(buffers_.d_fc_act), d_res,
                   window(blocks_[i].ln2), window(blocks_[i].fc_pre), window(blocks_[i].fc_act), w.fc1_w, w.fc2_w, acc);
    }
    norm_backward(be, m.norm, d_res, g.norm2_w, g.norm2_b, d_ln, res_att, w.norm2_w, window(blocks_[i].ln2_mean),
                  window(blocks_[i].ln2_rstd));

    // Attention branch: res_att = layer_in + out_proj(attention(qkv(norm1(layer_in))))
    Tensor d_atty = window(buffers_.d_atty), d_qkv = window(buffers_.d_qkv);
    linear_backward(be, d_atty, g.out_w, g.out_b, d_res, window(blocks_[i].atty), w.out_w, /*accumulate_din=*/false, acc);
    attention_backward(be, attn, d_qkv, window(buffers_.d_probs), d_atty, window(blocks_[i].probs), window(blocks_[i].qkv));
    if (m.qk_norm)
      qk_norm_backward(be, d_qkv, g.q_norm_w, g.k_norm_w, window(blocks_[i].qk_saved), window(blocks_[i].qk_rstd),
                       w.q_norm_w, w.k_norm_w, m.n_heads);
    linear_backward(be, d_ln, g.qkv_w, g.qkv_b, d_qkv, window(blocks_[i].ln1), w.qkv_w, /*accumulate_din=*/false, acc);
    norm_backward(be, m.norm, d_res, g.norm1_w, g.norm1_b, d_ln, layer_in, w.norm1_w, window(blocks_[i].ln1_mean),
                  window(blocks_[i].ln1_rstd));
  }
  embedding_backward(be, grad_views_.tok_emb, grad_views_.pos_emb,
                     tokens_.data(), d_res);
  expert_sq_valid_ = true;
}

double Transformer::grad_sum_squares() {
  // Layout order: each run of entries between the experts' weight gradients in one reduction pass; those, when the
  // last backward's products summed them, from their sums.
  double total = 0.0;
  int64_t run = 0;  // start of the run not yet reduced
  std::vector<double> expert_sq;  // (layers with MoE, 2E), downloaded once
  if (expert_sq_valid_ && expert_dweight_sq_.data())
    expert_sq = backend_.download_vector(expert_dweight_sq_.data(), expert_dweight_sq_.size());
  if (!expert_sq.empty())
    for (int64_t i = 0; i < config_.n_layers; ++i) {
      if (expert_sq_offset_[i] < 0) continue;
      const int64_t E = plan_.blocks[i].moe_dims.experts;
      const double* layer_sq = expert_sq.data() + expert_sq_offset_[i];
      for (int which = 0; which < 2; ++which) {
        const Tensor& g = which == 0 ? grad_views_.blocks[i].moe.fc1_w : grad_views_.blocks[i].moe.fc2_w;
        const int64_t offset = g.data - grads_;
        total += backend_.sum_squares(grads_ + run, offset - run);
        for (int64_t x = 0; x < E; ++x) total += layer_sq[2 * x + which];
        run = offset + g.numel();
      }
    }
  return total + backend_.sum_squares(grads_ + run, layout_.total() - run);
}

}  // namespace moelab

namespace moelab {

std::map<int64_t, std::vector<float>> Transformer::router_biases() const {
  std::map<int64_t, std::vector<float>> out;
  for (int64_t i = 0; i < config_.n_layers; ++i)
    if (moe_layers_[i] && moe_layers_[i]->router().balances_by_bias()) out[i] = moe_layers_[i]->router().selection_bias();
  return out;
}

void Transformer::set_router_biases(const std::map<int64_t, std::vector<float>>& biases) {
  const auto balanced = [&](int64_t i) { return moe_layers_[i] && moe_layers_[i]->router().balances_by_bias(); };
  for (const auto& [layer, values] : biases)
    if (layer < 0 || layer >= config_.n_layers || !balanced(layer))
      throw Error("router selection biases for layer " + std::to_string(layer) +
                  ", which has no bias balancing in this model (moe.balance = \"bias\" on MoE layers only)");
  for (int64_t i = 0; i < config_.n_layers; ++i) {
    if (!balanced(i)) continue;
    Router& router = moe_layers_[i]->router();
    const auto it = biases.find(i);
    if (it == biases.end())
      throw Error("no router selection biases for MoE layer " + std::to_string(i) + " (moe.balance = \"bias\")");
    if (it->second.size() != router.selection_bias().size())
      throw Error("router selection biases of layer " + std::to_string(i) + " hold " +
                  std::to_string(it->second.size()) + " values for " + std::to_string(router.selection_bias().size()) +
                  " experts");
    router.set_selection_bias(backend_, it->second);
  }
}

void Transformer::update_router_biases(Communicator* comm) {
  for (auto& layer : moe_layers_)
    if (layer) layer->router().update_selection_bias(backend_, config_.moe.bias_update_rate, comm);
}

}  // namespace moelab
