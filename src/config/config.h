#pragma once
// Every tunable of a run lives in Config. Keys are declared once in a schema (config.cpp) that drives TOML
// parsing, `--set key=value` overrides, range validation, `moelab config --list` and the resolved config
// written beside each run: a key exists in all of those places or in none.
#include <cstdint>
#include <string>
#include <vector>

#include "backend/precision.h"
#include "layers/kinds.h"
#include "moe/kinds.h"

namespace moelab {

// The learning-rate schedule (optim/schedule.h): cosine decay, warmup-stable-decay, or constant after warmup.
enum class ScheduleKind { Cosine, WSD, Constant };
// How model FLOPs are counted (docs/counting.md): the papers' conventions and the engine's exact count.
enum class FlopConvention { Kaplan, Chinchilla, Abnar, AbnarRouter, Krajewski, Exact };

// Mixture-of-Experts layers (see docs/config.md). Disabled when experts == 0 and expansion == 0.
// Two ways to say the same thing:
//  - explicit: `experts` routed experts of hidden size d_ff / granularity, `top_k` active per token;
//  - fine-grained shorthand (llm-random / Krajewski): expansion E and granularity G give E*G experts of size
//    d_ff / G with top_k * G active, so active FLOPs stay constant as G grows.
struct MoeConfig {
  int64_t experts = 0;
  int64_t expansion = 0;      // > 0 selects the shorthand; then `experts` must be 0
  int64_t top_k = 2;
  int64_t granularity = 1;    // G = d_ff / d_expert
  int64_t every = 1;          // MoE in layers i with (i + 1) % every == 0 (2 = every other layer, fairseq)
  int64_t first_dense = 0;    // the first k blocks stay dense (DeepSeek)
  int64_t shared_experts = 0; // always-active experts of size d_ff / G, added to the routed output
  RouterKind router = RouterKind::TokenChoice;
  ScoreKind score = ScoreKind::Softmax;  // sigmoid: gate weights are the chosen scores normalised to sum 1
  double gate_scale = 1.0;               // multiplies the gate weights
  BalanceKind balance = BalanceKind::AuxLoss;
  double bias_update_rate = 1e-3;        // balance = bias: b_e += rate * sign(mean load - load_e) per step
  double capacity_factor = 0.0;  // token choice: 0 = dropless; expert choice: capacity multiplier (> 0)
  bool renormalize = false;      // token choice: renormalise the k selected weights to sum to 1
  double aux_loss_weight = 0.01; // load balancing (Switch form), token choice only, balance = aux_loss
  double seq_aux_loss_weight = 0.0; // the same loss within each sequence (DeepSeek-V3), averaged over sequences
  double z_loss_weight = 0.0;    // router z-loss
  double router_jitter = 0.0;    // training: router input times U(1 - eps, 1 + eps) (Switch)
  bool expert_grad_scale = false; // scale expert gradients by 1/sqrt(routed experts) (fairseq)

  double capacity_factor_or_one() const { return capacity_factor > 0 ? capacity_factor : 1.0; }
  bool enabled() const { return experts > 0 || expansion > 0; }
  int64_t routed_experts() const { return expansion > 0 ? expansion * granularity : experts; }
  int64_t active_experts() const { return expansion > 0 ? top_k * granularity : top_k; }
  bool is_moe_layer(int64_t layer) const { return enabled() && layer >= first_dense && (layer + 1) % every == 0; }
  // The Switch auxiliary loss's weight as applied: aux_loss_weight when balance = aux_loss, else 0.
  double applied_aux_loss_weight() const { return balance == BalanceKind::AuxLoss ? aux_loss_weight : 0.0; }
  // Sparsity S = (E_total - K) / E_total: the share of routed experts a token does not use.
  double sparsity() const {
    return enabled() ? static_cast<double>(routed_experts() - active_experts()) / routed_experts() : 0.0;
  }
};

struct ModelConfig {
  int64_t vocab_size = 8192;
  int64_t d_model = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t d_ff = 0;  // 0 means 4 * d_model
  int64_t seq_len = 256;
  NormKind norm = NormKind::RMSNorm;
  PosKind pos = PosKind::Rope;
  FfnKind ffn = FfnKind::Gelu;
  bool bias = false;
  bool tied_embeddings = true;
  bool qk_norm = false;  // RMSNorm on each head's q and k before RoPE
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  double init_std = 0.02;
  bool zero_init_residual = false;  // projections into the residual stream start at zero
  bool zero_init_head = false;      // the (untied) output head starts at zero
  MoeConfig moe;

  int64_t ffn_hidden() const { return d_ff > 0 ? d_ff : 4 * d_model; }
  int64_t head_dim() const { return d_model / n_heads; }
};

struct TrainConfig {
  int64_t batch_size = 8;   // sequences per micro-batch
  int64_t grad_accum = 1;   // micro-batches per optimizer step
  int64_t steps = 1000;     // optimizer steps
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 100;
  ScheduleKind schedule = ScheduleKind::Cosine;
  double wsd_decay_fraction = 0.2;  // WSD: share of steps spent in the final linear decay
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_embeddings = false;  // weight decay on embeddings; norms and biases are never decayed
  double grad_clip = 1.0;         // global-norm clip; 0 disables
  int64_t seed = 1;       // initialisation (and router jitter)
  int64_t data_seed = -1;  // the order of the training windows; -1: train.seed
  int64_t threads = 0;  // 0 means all cores
  std::string backend = "cpu";  // make_backend's name (backend/backend.h)
  Precision precision = Precision::FP32;  // of the matrix products (config/kinds.h)
  int64_t log_every = 10;
  int64_t eval_every = 0;     // steps between validation evaluations; 0: only at the end
  int64_t eval_batches = 50;  // batches per evaluation; 0: the whole validation file
  int64_t checkpoint_every = 0;  // steps between checkpoints; 0: only at the end
  FlopConvention flops_convention = FlopConvention::Exact;  // how model FLOPs are counted in the logs
  double peak_flops = 0;  // FLOP/s that MFU is measured against; 0: measure the fp32 GEMM peak at start
  std::string out_dir = "runs/default";
  std::string init_from;  // a checkpoint or run directory whose weights start the run (sparse upcycling)
};

// The seed of the training windows' order: train.data_seed, or train.seed when that is -1.
inline int64_t effective_data_seed(const TrainConfig& t) { return t.data_seed >= 0 ? t.data_seed : t.seed; }

struct DataConfig {
  std::string dir;         // a `moelab data prepare` output: train.bin, val.bin, ood_*.bin, tokenizer.model
  std::string train_path;  // token shard (or legacy flat file); default <dir>/train.bin
  std::string val_path;    // optional; default <dir>/val.bin when it exists
  std::vector<std::string> ood_paths;  // out-of-domain shards (a TOML array); default <dir>/ood_*.bin
  std::string tokenizer;   // SentencePiece model; default <dir>/tokenizer.model; none: byte-level (vocab 256)
  std::string dtype = "uint16";
};

// How one run is spread over the processes of an MPI job (docs/distributed.md). Every process is a data-parallel
// rank (the world size multiplies the global batch); expert_parallel = P shards each MoE layer's routed experts over
// groups of P consecutive ranks.
struct DistConfig {
  int64_t expert_parallel = 1;
  double bucket_mb = 25;  // the gradient sum's bucket size (MiB of fp32 gradients)
};

struct Config {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  DistConfig dist;
};

struct ConfigKeyInfo {
  std::string name;
  std::string type;           // "int", "float", "bool", "string" or "a|b|c"
  std::string default_value;  // rendered from a default-constructed Config
  std::string help;
};

// Reads a TOML file (sections [model], [train], [data]) over the defaults, then applies overrides of the form
// "section.key=value" in order. Throws moelab::Error naming the key for unknown keys, wrong types and
// out-of-range values, and for inconsistent combinations (e.g. d_model not divisible by n_heads).
Config load_config(const std::string& path, const std::vector<std::string>& overrides);
Config config_from_string(const std::string& toml_text, const std::vector<std::string>& overrides,
                          const std::string& source_name = "<string>");
void apply_override(Config& config, const std::string& assignment);
void validate(const Config& config);
// Fills data paths left empty from data.dir (train.bin, val.bin, ood_*.bin, tokenizer.model).
DataConfig resolve_data_paths(const DataConfig& data);
// The config as TOML, every key present, so a run can be reproduced from it alone.
std::string to_toml(const Config& config);
std::vector<ConfigKeyInfo> config_keys();

std::string to_string(NormKind k);
std::string to_string(PosKind k);
std::string to_string(FfnKind k);
std::string to_string(ScheduleKind k);
std::string to_string(RouterKind k);
std::string to_string(ScoreKind k);
std::string to_string(BalanceKind k);
std::string to_string(Precision k);
// exact, kaplan, chinchilla, abnar, abnar_router, krajewski: the names `train.flops_convention`, a sweep's
// `flops_convention` and `moelab count` use.
std::string to_string(FlopConvention k);
// The one parser of a convention's name (config keys and sweep specs alike); an unknown name throws, naming them all.
FlopConvention parse_flop_convention(const std::string& name);

}  // namespace moelab
