#include "config/config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include "config/schema.h"
#include "core/error.h"

namespace moelab {
namespace {

// One schema entry. Exactly one of the accessors matching `type` is set; Choice keys read and write their
// enum through its name.
struct KeyDef {
  std::string name;
  KeyType type = KeyType::Int;
  std::string help;
  double min = -std::numeric_limits<double>::infinity();
  double max = std::numeric_limits<double>::infinity();
  std::vector<std::string> choices;
  std::function<int64_t&(Config&)> int_ref;
  std::function<double&(Config&)> float_ref;
  std::function<bool&(Config&)> bool_ref;
  std::function<std::string&(Config&)> string_ref;
  std::function<std::vector<std::string>&(Config&)> list_ref;
  std::function<void(Config&, const std::string&)> set_choice;
  std::function<std::string(const Config&)> get_choice;
};

template <typename E>
struct EnumNames {
  std::vector<std::pair<E, std::string>> names;
  std::string of(E e) const {
    for (auto& [v, n] : names)
      if (v == e) return n;
    return "?";
  }
  std::vector<std::string> list() const {
    std::vector<std::string> out;
    for (auto& p : names) out.push_back(p.second);
    return out;
  }
  E parse(const std::string& s) const {
    for (auto& [v, n] : names)
      if (n == s) return v;
    throw Error("bad enum");
  }
};

const EnumNames<NormKind> kNormNames{{{NormKind::LayerNorm, "layernorm"}, {NormKind::RMSNorm, "rmsnorm"}}};
const EnumNames<PosKind> kPosNames{
    {{PosKind::Learned, "learned"}, {PosKind::Sinusoidal, "sinusoidal"}, {PosKind::Rope, "rope"}}};
const EnumNames<FfnKind> kFfnNames{{{FfnKind::Gelu, "gelu"}, {FfnKind::SwiGLU, "swiglu"}}};
const EnumNames<ScoreKind> kScoreNames{{{ScoreKind::Softmax, "softmax"}, {ScoreKind::Sigmoid, "sigmoid"}}};
const EnumNames<BalanceKind> kBalanceNames{
    {{BalanceKind::AuxLoss, "aux_loss"}, {BalanceKind::Bias, "bias"}, {BalanceKind::None, "none"}}};
const EnumNames<RouterKind> kRouterNames{
    {{RouterKind::TokenChoice, "token_choice"}, {RouterKind::ExpertChoice, "expert_choice"}}};
const EnumNames<Precision> kPrecisionNames{{{Precision::FP32, "fp32"}, {Precision::BF16, "bf16"}}};
const EnumNames<ScheduleKind> kScheduleNames{
    {{ScheduleKind::Cosine, "cosine"}, {ScheduleKind::WSD, "wsd"}, {ScheduleKind::Constant, "constant"}}};
const EnumNames<FlopConvention> kFlopConventionNames{{{FlopConvention::Exact, "exact"},
                                                      {FlopConvention::Kaplan, "kaplan"},
                                                      {FlopConvention::Chinchilla, "chinchilla"},
                                                      {FlopConvention::Abnar, "abnar"},
                                                      {FlopConvention::AbnarRouter, "abnar_router"},
                                                      {FlopConvention::Krajewski, "krajewski"}}};

KeyDef int_key(std::string name, std::function<int64_t&(Config&)> ref, double min, double max, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::Int, k.help = std::move(help), k.min = min, k.max = max;
  k.int_ref = std::move(ref);
  return k;
}
KeyDef float_key(std::string name, std::function<double&(Config&)> ref, double min, double max, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::Float, k.help = std::move(help), k.min = min, k.max = max;
  k.float_ref = std::move(ref);
  return k;
}
KeyDef bool_key(std::string name, std::function<bool&(Config&)> ref, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::Bool, k.help = std::move(help);
  k.bool_ref = std::move(ref);
  return k;
}
KeyDef string_key(std::string name, std::function<std::string&(Config&)> ref, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::String, k.help = std::move(help);
  k.string_ref = std::move(ref);
  return k;
}
KeyDef list_key(std::string name, std::function<std::vector<std::string>&(Config&)> ref, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::StringList, k.help = std::move(help);
  k.list_ref = std::move(ref);
  return k;
}
template <typename E>
KeyDef choice_key(std::string name, const EnumNames<E>& names, std::function<E&(Config&)> ref, std::string help) {
  KeyDef k;
  k.name = std::move(name), k.type = KeyType::Choice, k.help = std::move(help);
  k.choices = names.list();
  k.set_choice = [&names, ref](Config& c, const std::string& s) { ref(c) = names.parse(s); };
  k.get_choice = [&names, ref](const Config& c) { return names.of(ref(const_cast<Config&>(c))); };
  return k;
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// [model]: the dense shape.
std::vector<KeyDef> model_keys() {
  return {
      int_key("model.vocab_size", [](Config& c) -> int64_t& { return c.model.vocab_size; }, 2, 1 << 24,
              "vocabulary size (must cover every token id in the data)"),
      int_key("model.d_model", [](Config& c) -> int64_t& { return c.model.d_model; }, 1, 1 << 16,
              "width of the residual stream"),
      int_key("model.n_layers", [](Config& c) -> int64_t& { return c.model.n_layers; }, 1, 1024,
              "number of transformer blocks"),
      int_key("model.n_heads", [](Config& c) -> int64_t& { return c.model.n_heads; }, 1, 1024,
              "attention heads (must divide d_model)"),
      int_key("model.d_ff", [](Config& c) -> int64_t& { return c.model.d_ff; }, 0, 1 << 20,
              "FFN hidden size; 0 means 4 * d_model"),
      int_key("model.seq_len", [](Config& c) -> int64_t& { return c.model.seq_len; }, 1, 1 << 16,
              "context length in tokens"),
      choice_key<NormKind>("model.norm", kNormNames, [](Config& c) -> NormKind& { return c.model.norm; },
                           "normalisation layer"),
      choice_key<PosKind>("model.pos", kPosNames, [](Config& c) -> PosKind& { return c.model.pos; },
                          "position encoding"),
      choice_key<FfnKind>("model.ffn", kFfnNames, [](Config& c) -> FfnKind& { return c.model.ffn; },
                          "feed-forward activation"),
      bool_key("model.bias", [](Config& c) -> bool& { return c.model.bias; },
               "biases on linear layers and LayerNorm (fairseq style)"),
      bool_key("model.qk_norm", [](Config& c) -> bool& { return c.model.qk_norm; },
               "RMSNorm on each head's query and key (weights of head_dim, shared by the heads) before RoPE, as OLMoE"),
      bool_key("model.tied_embeddings", [](Config& c) -> bool& { return c.model.tied_embeddings; },
               "output head shares the token embedding matrix"),
      float_key("model.norm_eps", [](Config& c) -> double& { return c.model.norm_eps; }, 0, 1,
                "epsilon inside the norm's square root"),
      float_key("model.rope_theta", [](Config& c) -> double& { return c.model.rope_theta; }, 1, kInf,
                "RoPE base frequency"),
      float_key("model.init_std", [](Config& c) -> double& { return c.model.init_std; }, 0, 10,
                "std of the normal init of weights (output projections are scaled by 1/sqrt(2 n_layers))"),
      bool_key("model.zero_init_residual", [](Config& c) -> bool& { return c.model.zero_init_residual; },
               "projections into the residual stream (attention output, FFN, expert and shared fc2) start at zero, "
               "so every block starts as the identity; the other weights are drawn as without it"),
      bool_key("model.zero_init_head", [](Config& c) -> bool& { return c.model.zero_init_head; },
               "the output head starts at zero (uniform first predictions); needs model.tied_embeddings = false"),
  };
}

// [moe]: experts, routing, balancing.
std::vector<KeyDef> moe_keys() {
  return {
      int_key("moe.experts", [](Config& c) -> int64_t& { return c.model.moe.experts; }, 0, 1 << 20,
              "routed experts per MoE layer; 0 with expansion 0 means a dense model"),
      int_key("moe.expansion", [](Config& c) -> int64_t& { return c.model.moe.expansion; }, 0, 1 << 20,
              "fine-grained shorthand: E gives E*G experts of size d_ff/G with top_k*G active (experts must be 0)"),
      int_key("moe.top_k", [](Config& c) -> int64_t& { return c.model.moe.top_k; }, 1, 1 << 20,
              "experts per token (token choice); with expansion, multiplied by granularity"),
      int_key("moe.granularity", [](Config& c) -> int64_t& { return c.model.moe.granularity; }, 1, 1 << 16,
              "G: expert hidden size = d_ff / G (must divide d_ff)"),
      int_key("moe.every", [](Config& c) -> int64_t& { return c.model.moe.every; }, 1, 1024,
              "MoE in every n-th layer (layers i with (i+1) % n == 0); 2 = every other layer as in fairseq"),
      int_key("moe.first_dense", [](Config& c) -> int64_t& { return c.model.moe.first_dense; }, 0, 1024,
              "the first k blocks stay dense (DeepSeek); combines with moe.every"),
      int_key("moe.shared_experts", [](Config& c) -> int64_t& { return c.model.moe.shared_experts; }, 0, 1 << 16,
              "always-active experts of size d_ff/G per MoE layer"),
      choice_key<RouterKind>("moe.router", kRouterNames, [](Config& c) -> RouterKind& { return c.model.moe.router; },
                             "routing: tokens pick top-k experts, or experts pick their top tokens per position group"),
      float_key("moe.capacity_factor", [](Config& c) -> double& { return c.model.moe.capacity_factor; }, 0, 1e6,
                "token choice: expert capacity = ceil(cf * tokens * k / experts), overflow dropped; 0 = dropless. "
                "expert choice: each expert takes round(cf * group * k / experts) tokens per group (0 means 1)"),
      bool_key("moe.renormalize", [](Config& c) -> bool& { return c.model.moe.renormalize; },
               "token choice: renormalise the top-k gate weights to sum to 1"),
      choice_key<ScoreKind>("moe.score", kScoreNames, [](Config& c) -> ScoreKind& { return c.model.moe.score; },
                            "router scores: softmax over experts, or sigmoid per expert (DeepSeek-V3; the chosen "
                            "scores are normalised to sum 1 for the gate weights)"),
      float_key("moe.gate_scale", [](Config& c) -> double& { return c.model.moe.gate_scale; }, 0, 1e3,
                "multiplies the gate weights (DeepSeek-V3's routed scaling factor)"),
      choice_key<BalanceKind>("moe.balance", kBalanceNames,
                              [](Config& c) -> BalanceKind& { return c.model.moe.balance; },
                              "load balancing: the auxiliary loss (aux_loss_weight), a per-expert selection bias "
                              "updated after each step (auxiliary-loss-free; the aux loss is then off), or none"),
      float_key("moe.bias_update_rate", [](Config& c) -> double& { return c.model.moe.bias_update_rate; }, 0, 1e3,
                "balance = \"bias\": b_e += rate * sign(mean load - load_e) after each optimizer step"),
      float_key("moe.aux_loss_weight", [](Config& c) -> double& { return c.model.moe.aux_loss_weight; }, 0, 1e3,
                "weight of the load-balancing loss E * sum_e f_e P_e (token choice)"),
      float_key("moe.z_loss_weight", [](Config& c) -> double& { return c.model.moe.z_loss_weight; }, 0, 1e3,
                "weight of the router z-loss mean(logsumexp(logits)^2)"),
      float_key("moe.seq_aux_loss_weight", [](Config& c) -> double& { return c.model.moe.seq_aux_loss_weight; }, 0,
                1e3, "weight of DeepSeek-V3's sequence-level balancing loss (the aux loss within each sequence, "
                "averaged over sequences; token choice)"),
      float_key("moe.router_jitter", [](Config& c) -> double& { return c.model.moe.router_jitter; }, 0, 0.999,
                "training only: the router input times uniform noise in [1 - eps, 1 + eps] (Switch Transformer)"),
      bool_key("moe.expert_grad_scale", [](Config& c) -> bool& { return c.model.moe.expert_grad_scale; },
               "scale expert gradients by 1/sqrt(routed experts), as fairseq does"),
  };
}

// [train]: optimisation, precision, logging, checkpoints.
std::vector<KeyDef> train_keys() {
  return {
      int_key("train.batch_size", [](Config& c) -> int64_t& { return c.train.batch_size; }, 1, 1 << 20,
              "sequences per micro-batch"),
      int_key("train.grad_accum", [](Config& c) -> int64_t& { return c.train.grad_accum; }, 1, 1 << 20,
              "micro-batches accumulated per optimizer step"),
      int_key("train.steps", [](Config& c) -> int64_t& { return c.train.steps; }, 1, 1e12, "optimizer steps"),
      float_key("train.lr", [](Config& c) -> double& { return c.train.lr; }, 0, 10, "peak learning rate"),
      float_key("train.min_lr", [](Config& c) -> double& { return c.train.min_lr; }, 0, 10,
                "learning rate at the end of the decay"),
      int_key("train.warmup_steps", [](Config& c) -> int64_t& { return c.train.warmup_steps; }, 0, 1e12,
              "linear warm-up steps"),
      choice_key<ScheduleKind>("train.schedule", kScheduleNames,
                               [](Config& c) -> ScheduleKind& { return c.train.schedule; },
                               "LR schedule after warm-up: cosine decay, WSD (stable then linear decay), constant"),
      float_key("train.wsd_decay_fraction", [](Config& c) -> double& { return c.train.wsd_decay_fraction; }, 0, 1,
                "WSD: fraction of all steps spent decaying to min_lr"),
      float_key("train.beta1", [](Config& c) -> double& { return c.train.beta1; }, 0, 0.999999, "AdamW beta1"),
      float_key("train.beta2", [](Config& c) -> double& { return c.train.beta2; }, 0, 0.999999, "AdamW beta2"),
      float_key("train.adam_eps", [](Config& c) -> double& { return c.train.adam_eps; }, 0, 1, "AdamW epsilon"),
      float_key("train.weight_decay", [](Config& c) -> double& { return c.train.weight_decay; }, 0, 10,
                "decoupled weight decay on weight matrices"),
      bool_key("train.decay_embeddings", [](Config& c) -> bool& { return c.train.decay_embeddings; },
               "also decay embedding tables (norms and biases are never decayed)"),
      float_key("train.grad_clip", [](Config& c) -> double& { return c.train.grad_clip; }, 0, kInf,
                "clip the global gradient norm to this value; 0 disables"),
      int_key("train.seed", [](Config& c) -> int64_t& { return c.train.seed; }, 0, 9.2e18,
              "seed for initialisation, and for batch sampling unless train.data_seed is set"),
      int_key("train.data_seed", [](Config& c) -> int64_t& { return c.train.data_seed; }, -1, 9.2e18,
              "seed of the training windows' order, apart from initialisation: runs with equal data_seed see the "
              "same windows in the same order (paired comparisons); -1 means train.seed"),
      int_key("train.threads", [](Config& c) -> int64_t& { return c.train.threads; }, 0, 4096,
              "CPU threads; 0 means all cores"),
      string_key("train.backend", [](Config& c) -> std::string& { return c.train.backend; },
                 "where tensors live and kernels run: cpu, or cpu-strict (the CPU backend with its memory unreadable "
                 "from the host outside backend calls: a check that code goes through the seam; slower)"),
      choice_key<Precision>("train.precision", kPrecisionNames, [](Config& c) -> Precision& { return c.train.precision; },
                            "matrix-product precision: fp32, or bf16 operands with fp32 accumulation (fp32 master "
                            "weights, optimizer, norms, softmax, loss and router)"),
      int_key("train.log_every", [](Config& c) -> int64_t& { return c.train.log_every; }, 1, 1e12,
              "steps between progress lines"),
      int_key("train.eval_every", [](Config& c) -> int64_t& { return c.train.eval_every; }, 0, 1e12,
              "steps between validation evaluations (needs data.val_path); 0: only at the end"),
      int_key("train.eval_batches", [](Config& c) -> int64_t& { return c.train.eval_batches; }, 0, 1e12,
              "batches of sequential windows per evaluation; 0: the whole validation file"),
      int_key("train.checkpoint_every", [](Config& c) -> int64_t& { return c.train.checkpoint_every; }, 0, 1e12,
              "steps between checkpoints in <out_dir>/checkpoint; 0: only at the end"),
      choice_key<FlopConvention>("train.flops_convention", kFlopConventionNames,
                                 [](Config& c) -> FlopConvention& { return c.train.flops_convention; },
                                 "how model FLOPs are counted in the logs (docs/counting.md)"),
      float_key("train.peak_flops", [](Config& c) -> double& { return c.train.peak_flops; }, 0, kInf,
                "FLOP/s for MFU; 0: measure this machine's fp32 GEMM peak at start-up (about 1 s)"),
      string_key("train.init_from", [](Config& c) -> std::string& { return c.train.init_from; },
                 "start from the weights of this checkpoint or run directory instead of a random init; a dense "
                 "source's FFN becomes every expert of an MoE target (sparse upcycling, docs/moe.md)"),
      string_key("train.out_dir", [](Config& c) -> std::string& { return c.train.out_dir; },
                 "run directory: resolved config and metrics.jsonl are written here"),
  };
}

// [data] and [dist].
std::vector<KeyDef> data_and_dist_keys() {
  return {
      string_key("data.dir", [](Config& c) -> std::string& { return c.data.dir; },
                 "prepared data directory (`moelab data prepare`): supplies the paths below when they are empty"),
      string_key("data.train_path", [](Config& c) -> std::string& { return c.data.train_path; },
                 "training tokens: a token shard (or a flat file of ids); default <dir>/train.bin"),
      string_key("data.val_path", [](Config& c) -> std::string& { return c.data.val_path; },
                 "validation tokens, evaluated every train.eval_every steps; default <dir>/val.bin"),
      list_key("data.ood_paths", [](Config& c) -> std::vector<std::string>& { return c.data.ood_paths; },
                 "out-of-domain token shards, a TOML array of paths (--set data.ood_paths='[\"a.bin\", \"b.bin\"]' or one "
                 "path), evaluated with the validation set; default <dir>/ood_*.bin"),
      string_key("data.tokenizer", [](Config& c) -> std::string& { return c.data.tokenizer; },
                 "SentencePiece model for eval/generate; default <dir>/tokenizer.model; none: byte-level"),
      string_key("data.dtype", [](Config& c) -> std::string& { return c.data.dtype; },
                 "token id width in the data files: uint16 or uint32"),
      int_key("dist.expert_parallel", [](Config& c) -> int64_t& { return c.dist.expert_parallel; }, 1, 65536,
              "expert parallelism P: each MoE layer's routed experts are split over groups of P processes (P divides "
              "the number of processes and the routed experts); 1: every process holds every expert"),
      float_key("dist.bucket_mb", [](Config& c) -> double& { return c.dist.bucket_mb; }, 0.001, 1e6,
                "the gradients are summed over the ranks in buckets of at most this many MiB, last layers first "
                "(the order the backward finishes them); any size gives the same bits"),
  };
}

// Every config key, once: the schema the parser, --set, `config --list` and the resolved config read.
const std::vector<KeyDef>& schema() {
  static const std::vector<KeyDef> keys = [] {
    std::vector<KeyDef> all;
    for (auto part : {model_keys(), moe_keys(), train_keys(), data_and_dist_keys()})
      all.insert(all.end(), part.begin(), part.end());
    return all;
  }();
  return keys;
}

const KeyDef& find_key(const std::string& name, const std::string& where) {
  for (const auto& k : schema())
    if (k.name == name) return k;
  std::vector<std::string> known;
  for (const auto& k : schema()) known.push_back(k.name);
  const std::string best = closest_key(name, known);
  throw Error("unknown config key '" + name + "'" + where +
              (best.empty() ? "" : " (did you mean '" + best + "'?)") + "; `moelab config --list` shows every key");
}

KeyRule rule_of(const KeyDef& k) { return {k.name, k.type, k.min, k.max, k.choices}; }
std::string type_name(const KeyDef& k) { return type_name(k.type, k.choices); }
std::string subject_of(const KeyDef& k, const std::string& where) { return "config key '" + k.name + "'" + where; }

std::string format_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  std::string s = os.str();
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // keep it a TOML float
  return s;
}

std::string range_text(const KeyDef& k) { return range_text(rule_of(k)); }
void check_range(const KeyDef& k, double v, const std::string& where) { check_range(subject_of(k, where), rule_of(k), v); }

void set_int(Config& c, const KeyDef& k, int64_t v, const std::string& where) {
  check_range(k, static_cast<double>(v), where);
  k.int_ref(c) = v;
}
void set_float(Config& c, const KeyDef& k, double v, const std::string& where) {
  check_range(k, v, where);
  k.float_ref(c) = v;
}
void set_choice(Config& c, const KeyDef& k, const std::string& v, const std::string& where) {
  if (std::find(k.choices.begin(), k.choices.end(), v) == k.choices.end())
    throw Error("config key '" + k.name + "'" + where + " = '" + v + "' is not one of " + type_name(k));
  k.set_choice(c, v);
}

// A TOML basic string literal.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out + "\"";
}

[[noreturn]] void type_error(const KeyDef& k, const std::string& where, const std::string& got) {
  throw_type_error(subject_of(k, where), rule_of(k), got);
}

// A list key given as one string: one item, or (the old form, deprecated) items separated by commas.
void set_list_from_text(Config& c, const KeyDef& k, const std::string& text, const std::string& where) {
  std::vector<std::string> items;
  for (size_t begin = 0; begin <= text.size();) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    if (end > begin) items.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  if (items.size() > 1) {
    std::string array;
    for (const auto& item : items) array += (array.empty() ? "" : ", ") + quote(item);
    const bool from_set = where.find("--set") != std::string::npos;
    std::cerr << "moelab: warning: config key '" << k.name << "'" << where
              << " is a comma-separated string, which is deprecated; write a TOML array: "
              << (from_set ? "--set '" + k.name + "=[" + array + "]'"
                           : k.name.substr(k.name.find('.') + 1) + " = [" + array + "]")
              << "\n";
  }
  k.list_ref(c) = std::move(items);
}

void set_from_toml(Config& c, const KeyDef& k, const toml::node& node, const std::string& where) {
  switch (k.type) {
    case KeyType::Int:
      if (auto v = node.as_integer()) return set_int(c, k, v->get(), where);
      if (auto v = node.as_floating_point(); v && std::floor(v->get()) == v->get())
        return set_int(c, k, static_cast<int64_t>(v->get()), where);
      type_error(k, where, value_kind(node));
    case KeyType::Float:
      if (auto v = node.as_floating_point()) return set_float(c, k, v->get(), where);
      if (auto v = node.as_integer()) return set_float(c, k, static_cast<double>(v->get()), where);
      type_error(k, where, value_kind(node));
    case KeyType::Bool:
      if (auto v = node.as_boolean()) {
        k.bool_ref(c) = v->get();
        return;
      }
      type_error(k, where, "a non-boolean");
    case KeyType::String:
      if (auto v = node.as_string()) {
        k.string_ref(c) = v->get();
        return;
      }
      type_error(k, where, "a non-string");
    case KeyType::Choice:
      if (auto v = node.as_string()) return set_choice(c, k, v->get(), where);
      type_error(k, where, "a non-string");
    case KeyType::StringList:
      if (auto array = node.as_array()) {
        std::vector<std::string> items;
        for (const toml::node& item : *array) {
          if (!item.as_string()) type_error(k, where, "an array holding a non-string");
          items.push_back(item.as_string()->get());
        }
        k.list_ref(c) = std::move(items);
        return;
      }
      if (auto v = node.as_string()) return set_list_from_text(c, k, v->get(), where);
      type_error(k, where, "a non-array");
    case KeyType::NumberList:
    case KeyType::Table:
    case KeyType::TableArray:
      break;  // no config key is one of these (sweep specs use them)
  }
}

void walk_table(Config& c, const toml::table& table, const std::string& prefix, const std::string& source) {
  for (auto&& [key, node] : table) {
    const std::string name = prefix.empty() ? std::string(key.str()) : prefix + "." + std::string(key.str());
    if (auto sub = node.as_table()) {
      walk_table(c, *sub, name, source);
      continue;
    }
    const std::string where = " in " + source;
    set_from_toml(c, find_key(name, where), node, where);
  }
}

std::string value_text(const Config& c, const KeyDef& k) {
  Config& m = const_cast<Config&>(c);
  switch (k.type) {
    case KeyType::Int: return std::to_string(k.int_ref(m));
    case KeyType::Float: return format_double(k.float_ref(m));
    case KeyType::Bool: return k.bool_ref(m) ? "true" : "false";
    case KeyType::String: return quote(k.string_ref(m));
    case KeyType::Choice: return "\"" + k.get_choice(c) + "\"";
    case KeyType::StringList: {
      std::string out;
      for (const auto& item : k.list_ref(m)) out += (out.empty() ? "" : ", ") + quote(item);
      return "[" + out + "]";
    }
    case KeyType::NumberList:
    case KeyType::Table:
    case KeyType::TableArray:
      break;
  }
  return "";
}

}  // namespace

void apply_override(Config& c, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("--set expects key=value (e.g. --set model.d_model=512), got '" + assignment + "'");
  const std::string name = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  const std::string where = " (from --set)";
  const KeyDef& k = find_key(name, where);
  switch (k.type) {
    case KeyType::Int: {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(text, &used);
      } catch (...) {
        used = 0;
      }
      if (used != text.size() || text.empty() || std::floor(v) != v) type_error(k, where, "'" + text + "'");
      return set_int(c, k, static_cast<int64_t>(v), where);
    }
    case KeyType::Float: {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(text, &used);
      } catch (...) {
        used = 0;
      }
      if (used != text.size() || text.empty()) type_error(k, where, "'" + text + "'");
      return set_float(c, k, v, where);
    }
    case KeyType::Bool:
      if (text == "true" || text == "1") k.bool_ref(c) = true;
      else if (text == "false" || text == "0") k.bool_ref(c) = false;
      else type_error(k, where, "'" + text + "'");
      return;
    case KeyType::String: k.string_ref(c) = text; return;
    case KeyType::Choice: return set_choice(c, k, text, where);
    case KeyType::StringList:
      if (!text.empty() && text.front() == '[') {  // a TOML array: --set 'data.ood_paths=["a.bin", "b.bin"]'
        toml::table t;
        try {
          t = toml::parse("v = " + text);
        } catch (const toml::parse_error& e) {
          throw Error("config key '" + k.name + "'" + where + ": '" + text + "' is not a TOML array of strings (" +
                      std::string(e.description()) + ")");
        }
        return set_from_toml(c, k, *t.get("v"), where);
      }
      return set_list_from_text(c, k, text, where);
    case KeyType::NumberList:
    case KeyType::Table:
    case KeyType::TableArray:
      break;
  }
}

void validate(const Config& c) {
  const auto& m = c.model;
  if (m.zero_init_head && m.tied_embeddings)
    throw Error("model.zero_init_head = true would zero the token embeddings too, since model.tied_embeddings = "
                "true shares them with the head; set model.tied_embeddings = false or drop model.zero_init_head");
  if (m.d_model % m.n_heads != 0)
    throw Error("model.d_model = " + std::to_string(m.d_model) + " is not divisible by model.n_heads = " +
                std::to_string(m.n_heads) + "; choose n_heads dividing d_model");
  if (m.pos == PosKind::Rope && m.head_dim() % 2 != 0)
    throw Error("model.pos = \"rope\" needs an even head dimension, but d_model / n_heads = " +
                std::to_string(m.head_dim()));
  if (m.pos == PosKind::Sinusoidal && (m.d_model % 2 != 0 || m.d_model < 4))
    throw Error("model.pos = \"sinusoidal\" needs an even model.d_model >= 4");
  const auto& moe = m.moe;
  if (moe.experts > 0 && moe.expansion > 0)
    throw Error("set either moe.experts (explicit) or moe.expansion (fine-grained shorthand), not both");
  if (moe.enabled()) {
    if (m.ffn_hidden() % moe.granularity != 0)
      throw Error("moe.granularity = " + std::to_string(moe.granularity) + " does not divide the FFN hidden size " +
                  std::to_string(m.ffn_hidden()) + " (model.d_ff); choose G dividing d_ff");
    if (moe.active_experts() > moe.routed_experts())
      throw Error("moe.top_k selects " + std::to_string(moe.active_experts()) + " experts per token but there are only " +
                  std::to_string(moe.routed_experts()) + " routed experts");
    if (moe.every > m.n_layers)
      throw Error("moe.every = " + std::to_string(moe.every) + " exceeds model.n_layers = " +
                  std::to_string(m.n_layers) + ": no layer would be MoE");
    int64_t moe_layers = 0;
    for (int64_t i = 0; i < m.n_layers; ++i) moe_layers += moe.is_moe_layer(i);
    if (moe_layers == 0)
      throw Error("moe.first_dense = " + std::to_string(moe.first_dense) + " with moe.every = " +
                  std::to_string(moe.every) + " leaves no MoE layer among model.n_layers = " +
                  std::to_string(m.n_layers) + "; lower moe.first_dense");
    const bool expert_choice = moe.router == RouterKind::ExpertChoice;
    if (expert_choice && moe.balance == BalanceKind::Bias)
      throw Error("moe.balance = \"bias\" needs moe.router = \"token_choice\": expert choice is balanced by "
                  "construction; set moe.balance = \"none\"");
    if (expert_choice && moe.seq_aux_loss_weight > 0)
      throw Error("moe.seq_aux_loss_weight applies to token choice only; set it to 0 with moe.router = "
                  "\"expert_choice\"");
  }
  if (c.train.min_lr > c.train.lr)
    throw Error("train.min_lr = " + format_double(c.train.min_lr) + " exceeds train.lr = " +
                format_double(c.train.lr));
  if (c.train.warmup_steps > c.train.steps)
    throw Error("train.warmup_steps = " + std::to_string(c.train.warmup_steps) + " exceeds train.steps = " +
                std::to_string(c.train.steps));
  if (c.data.dtype != "uint16" && c.data.dtype != "uint32")
    throw Error("data.dtype = '" + c.data.dtype + "' must be \"uint16\" or \"uint32\"");
  if (c.data.dtype == "uint16" && m.vocab_size > 65536)
    throw Error("model.vocab_size = " + std::to_string(m.vocab_size) +
                " does not fit data.dtype = \"uint16\"; use \"uint32\"");
}

Config config_from_string(const std::string& text, const std::vector<std::string>& overrides,
                          const std::string& source) {
  Config c;
  toml::table table;
  try {
    table = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << "cannot parse config " << source << " at line " << e.source().begin.line << ", column "
       << e.source().begin.column << ": " << e.description();
    throw Error(os.str());
  }
  walk_table(c, table, "", source);
  for (const auto& o : overrides) apply_override(c, o);
  validate(c);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (path.empty()) return config_from_string("", overrides, "<defaults>");
  std::ifstream in(path);
  if (!in) throw Error("cannot open config file '" + path + "': check the path (configs/ has examples)");
  std::stringstream ss;
  ss << in.rdbuf();
  return config_from_string(ss.str(), overrides, path);
}

DataConfig resolve_data_paths(const DataConfig& data) {
  namespace fs = std::filesystem;
  DataConfig d = data;
  if (d.dir.empty()) return d;
  const fs::path dir(d.dir);
  if (!fs::is_directory(dir))
    throw Error("data.dir = '" + d.dir + "' is not a directory; create it with `moelab data prepare`");
  if (d.train_path.empty()) d.train_path = (dir / "train.bin").string();
  if (d.val_path.empty() && fs::exists(dir / "val.bin")) d.val_path = (dir / "val.bin").string();
  if (d.tokenizer.empty() && fs::exists(dir / "tokenizer.model")) d.tokenizer = (dir / "tokenizer.model").string();
  if (d.ood_paths.empty()) {
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("ood_", 0) == 0 && e.path().extension() == ".bin") found.push_back(e.path().string());
    }
    std::sort(found.begin(), found.end());
    d.ood_paths = found;
  }
  return d;
}

std::string to_toml(const Config& c) {
  std::string out = "# resolved moelab config: every key, defaults included\n";
  std::string section;
  for (const auto& k : schema()) {
    const auto dot = k.name.find('.');
    const std::string sec = k.name.substr(0, dot), key = k.name.substr(dot + 1);
    if (sec != section) {
      out += (section.empty() ? "\n[" : "\n[") + sec + "]\n";
      section = sec;
    }
    out += key + " = " + value_text(c, k) + "\n";
  }
  return out;
}

std::vector<ConfigKeyInfo> config_keys() {
  Config defaults;
  std::vector<ConfigKeyInfo> out;
  for (const auto& k : schema()) {
    std::string help = k.help;
    if (k.type == KeyType::Int || k.type == KeyType::Float) help += " " + range_text(k);
    out.push_back({k.name, type_name(k), value_text(defaults, k), help});
  }
  return out;
}

std::string to_string(NormKind k) { return kNormNames.of(k); }
std::string to_string(PosKind k) { return kPosNames.of(k); }
std::string to_string(FfnKind k) { return kFfnNames.of(k); }
std::string to_string(ScheduleKind k) { return kScheduleNames.of(k); }
std::string to_string(Precision k) { return kPrecisionNames.of(k); }
std::string to_string(FlopConvention k) { return kFlopConventionNames.of(k); }

FlopConvention parse_flop_convention(const std::string& name) {
  for (const auto& [value, n] : kFlopConventionNames.names)
    if (n == name) return value;
  std::string all;
  for (const auto& n : kFlopConventionNames.list()) all += (all.empty() ? "" : ", ") + n;
  throw Error("unknown FLOPs convention '" + name + "': use one of " + all + " (docs/counting.md)");
}
std::string to_string(RouterKind k) { return kRouterNames.of(k); }
std::string to_string(ScoreKind k) { return kScoreNames.of(k); }
std::string to_string(BalanceKind k) { return kBalanceNames.of(k); }

}  // namespace moelab
