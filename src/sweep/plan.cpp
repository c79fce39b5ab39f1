#include "core/format.h"
#include "sweep/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "config/schema.h"
#include "core/error.h"
#include "core/io.h"
#include "data/token_file.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;

// ---- spec reading helpers: every key is known, typed, and errors name it ------------------------------------

// A table of the spec, checked once by the schema code every TOML input goes through (config/schema.h): every key
// known (a misspelt one is named with the closest known key), every value of its rule's type and range; the
// getters below then read values that are known to be well typed.
struct Section {
  const toml::table* table = nullptr;
  std::string name;

  Section(const toml::table* t, std::string n, const std::vector<KeyRule>& rules) : table(t), name(std::move(n)) {
    if (table) check_table(*table, rules, name, "sweep spec: ");
  }
  const toml::node* get(const std::string& key) const { return table ? table->get(key) : nullptr; }
  bool has(const std::string& key) const { return get(key) != nullptr; }

  double number(const std::string& key, double fallback) const {
    const toml::node* n = get(key);
    if (!n) return fallback;
    if (auto v = n->value<double>()) return *v;
    throw Error("sweep spec: " + name + "." + key + " must be a number");
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    const toml::node* n = get(key);
    if (!n) return fallback;
    if (n->is_integer()) return *n->value<int64_t>();
    if (auto v = n->value<double>(); v && std::floor(*v) == *v) return static_cast<int64_t>(*v);
    throw Error("sweep spec: " + name + "." + key + " must be an integer");
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    const toml::node* n = get(key);
    if (!n) return fallback;
    if (auto v = n->value<std::string>()) return *v;
    throw Error("sweep spec: " + name + "." + key + " must be a string");
  }
  bool boolean(const std::string& key, bool fallback) const {
    const toml::node* n = get(key);
    if (!n) return fallback;
    if (auto v = n->value<bool>()) return *v;
    throw Error("sweep spec: " + name + "." + key + " must be true or false");
  }
  std::vector<double> numbers(const std::string& key) const {
    std::vector<double> out;
    const toml::node* n = get(key);
    if (!n) return out;
    const toml::array* a = n->as_array();
    if (!a) throw Error("sweep spec: " + name + "." + key + " must be a list of numbers, e.g. [1e12, 3e12]");
    for (const auto& e : *a) {
      auto v = e.value<double>();
      if (!v) throw Error("sweep spec: " + name + "." + key + " must be a list of numbers");
      out.push_back(*v);
    }
    return out;
  }
  std::vector<std::string> strings(const std::string& key) const {
    std::vector<std::string> out;
    const toml::node* n = get(key);
    if (!n) return out;
    const toml::array* a = n->as_array();
    if (!a) throw Error("sweep spec: " + name + "." + key + " must be a list of strings");
    for (const auto& e : *a) {
      auto v = e.value<std::string>();
      if (!v) throw Error("sweep spec: " + name + "." + key + " must be a list of strings");
      out.push_back(*v);
    }
    return out;
  }
};

const toml::table* sub_table(const toml::table& root, const std::string& key) {
  const toml::node* n = root.get(key);
  if (!n) return nullptr;
  if (!n->is_table()) throw Error("sweep spec: [" + key + "] must be a table");
  return n->as_table();
}

std::vector<const toml::table*> table_array(const toml::table& root, const std::string& key) {
  std::vector<const toml::table*> out;
  const toml::node* n = root.get(key);
  if (!n) return out;
  const toml::array* a = n->as_array();
  if (!a) throw Error("sweep spec: " + key + " must be an array of tables, written [[" + key + "]]");
  for (const auto& e : *a) {
    if (!e.is_table()) throw Error("sweep spec: every [[" + key + "]] entry must be a table");
    out.push_back(e.as_table());
  }
  return out;
}

// ---- the rules that map a model size to its hyper-parameters ------------------------------------------------

struct Rules {
  double lr = 3e-3;           // lr at d_model = lr_d_ref
  double lr_d_ref = 256;
  double lr_power = 0.5;      // lr = lr * (lr_d_ref / d_model)^lr_power
  double lr_moe_factor = 1;   // MoE runs: lr times this (docs/report.md: MoE runs here prefer about half the lr)
  double min_lr_ratio = 0.1;  // min_lr = lr * min_lr_ratio
  double warmup_fraction = 0.05;
  int64_t min_warmup_steps = 1;
  int64_t batch_size = 0;     // 0: the base config's train.batch_size
  double init_std = 0;        // > 0: model.init_std = init_std * (lr_d_ref / d_model)^init_power; 0: the base config's
  double init_power = 0.5;
};

struct Shape {
  std::string tag;
  int64_t d_model = 0, n_layers = 0, n_heads = 0, d_ff = 0;
  int64_t batch_size = 0;  // 0: from the rules
  double lr = 0;           // 0: from the rules
  std::vector<double> budgets;  // empty: every budget of the sweep; else only these (a ladder per budget)
  bool at(double budget) const {
    if (budgets.empty() || !(budget > 0)) return true;
    for (double b : budgets)
      if (std::fabs(b - budget) <= 1e-9 * budget) return true;
    return false;
  }
};

// What a generator asks for; finish_run turns it into a PlannedRun.
struct Request {
  std::string name, group;
  Shape shape;
  std::vector<std::string> moe_overrides;  // "moe.key=value"
  std::vector<std::string> run_overrides;  // [[run]] set: wins over every rule
  double budget = 0, tokens = 0;
  int64_t steps = 0;
  double target_params = 0, target_sparsity = 0;
  std::string infeasible;  // already known to be unrealisable
  int64_t processes = 0;   // 0: the sweep's
  std::vector<int64_t> seeds;  // [[run]] seeds: replicates of this run (else the sweep's)
};

int64_t checked_seed(double seed, const std::string& where) {
  if (!(seed >= 0 && seed <= 9e15 && std::floor(seed) == seed))
    throw Error("sweep spec: " + where + " must hold non-negative integers (train.seed values), got " +
                std::to_string(seed));
  return static_cast<int64_t>(seed);
}

bool overrides_key(const std::vector<std::string>& overrides, const std::string& key);

// Replicates: each run once per seed (its [[run]] seeds, else [sweep] seeds), as train.seed in its set list; the
// first seed keeps the run's name, the others add "-s<seed>". The group stays: fits take every replicate.
std::vector<Request> replicate_requests(const std::vector<int64_t>& sweep_seeds, std::vector<Request> requests) {
  std::vector<Request> out;
  for (const Request& r : requests) {
    const std::vector<int64_t>& seeds = r.seeds.empty() ? sweep_seeds : r.seeds;
    if (seeds.empty() || overrides_key(r.run_overrides, "train.seed")) {
      out.push_back(r);
      continue;
    }
    for (size_t i = 0; i < seeds.size(); ++i) {
      Request x = r;
      x.run_overrides.push_back("train.seed=" + std::to_string(seeds[i]));
      if (i > 0) x.name += "-s" + std::to_string(seeds[i]);
      out.push_back(x);
    }
  }
  return out;
}

struct Context {
  Config base;
  Rules rules;
  FlopConvention convention = FlopConvention::Exact;
  int64_t checkpoint_every = 50;
  int64_t processes = 1;  // [sweep] processes: each run's, unless its [[run]] says otherwise
  int64_t corpus_tokens = 0;
  double max_epochs = 1.0;
  std::string sweep_dir_placeholder;  // out_dir is filled in by write_plan
};

bool overrides_key(const std::vector<std::string>& overrides, const std::string& key) {
  for (const auto& o : overrides)
    if (o.rfind(key + "=", 0) == 0) return true;
  return false;
}

std::vector<std::string> shape_overrides(const Shape& s) {
  std::vector<std::string> out = {"model.d_model=" + std::to_string(s.d_model),
                                  "model.n_layers=" + std::to_string(s.n_layers),
                                  "model.n_heads=" + std::to_string(s.n_heads)};
  if (s.d_ff > 0) out.push_back("model.d_ff=" + std::to_string(s.d_ff));
  return out;
}

// Model config of a request (no training keys yet); throws Error when the combination is invalid.
Config model_config(const Context& ctx, const Request& r) {
  Config c = ctx.base;
  for (const auto& o : shape_overrides(r.shape)) apply_override(c, o);
  for (const auto& o : r.moe_overrides) apply_override(c, o);
  for (const auto& o : r.run_overrides) apply_override(c, o);
  const auto& m = c.model;
  if (m.moe.enabled() && m.ffn_hidden() % m.moe.granularity != 0)
    throw Error("granularity G = " + std::to_string(m.moe.granularity) + " does not divide d_ff = " +
                std::to_string(m.ffn_hidden()));
  validate(c);
  return c;
}

PlannedRun finish_run(const Context& ctx, const Request& r, FlopConvention convention) {
  PlannedRun run;
  run.name = r.name;
  run.group = r.group;
  run.budget = r.budget;
  run.target_tokens = r.tokens;
  run.target_params = r.target_params;
  run.target_sparsity = r.target_sparsity;
  auto infeasible = [&](const std::string& why) {
    run.feasible = false;
    run.reason = why;
    return run;
  };
  // Shape fields for the table even when the run is infeasible.
  run.config = ctx.base;
  run.config.model.d_model = r.shape.d_model;
  run.config.model.n_layers = r.shape.n_layers;
  if (!r.infeasible.empty()) return infeasible(r.infeasible);

  Config c;
  try {
    Config pre = ctx.base;
    const int64_t batch = r.shape.batch_size > 0 ? r.shape.batch_size
                          : ctx.rules.batch_size > 0 ? ctx.rules.batch_size
                                                     : ctx.base.train.batch_size;
    pre.train.batch_size = batch;
    Context local = ctx;
    local.base = pre;
    c = model_config(local, r);
  } catch (const Error& e) {
    return infeasible(e.what());
  }
  run.config = c;
  run.counts = count_parameters(c.model);
  run.flops_per_token = training_flops_per_token(c.model, convention);
  run.processes = r.processes > 0 ? r.processes : ctx.processes;
  if (c.dist.expert_parallel > 1 && run.processes % c.dist.expert_parallel != 0)
    return infeasible("dist.expert_parallel = " + std::to_string(c.dist.expert_parallel) + " does not divide the run's " +
                      std::to_string(run.processes) + " processes");
  // every process trains its own micro-batches: the global batch is processes times one process's
  const int64_t tokens_per_step = c.train.batch_size * c.train.grad_accum * c.model.seq_len * run.processes;

  if (overrides_key(r.run_overrides, "train.steps") || r.steps > 0) {
    run.steps = overrides_key(r.run_overrides, "train.steps") ? c.train.steps : r.steps;
    run.target_tokens = static_cast<double>(run.steps * tokens_per_step);
  } else {
    double d = r.tokens;
    if (r.budget > 0) d = r.budget / run.flops_per_token;
    run.target_tokens = d;
    if (!(d >= static_cast<double>(tokens_per_step)))
      return infeasible("D = " + fmt("%.4g", d) + " tokens is below one optimizer step (batch " +
                        std::to_string(c.train.batch_size) + " x grad_accum " + std::to_string(c.train.grad_accum) +
                        " x seq_len " + std::to_string(c.model.seq_len) + " x processes " +
                        std::to_string(run.processes) + " = " + std::to_string(tokens_per_step) + " tokens)");
    run.steps = static_cast<int64_t>(std::ceil(d / static_cast<double>(tokens_per_step) - 1e-9));
  }
  run.tokens = run.steps * tokens_per_step;
  run.flops = run.flops_per_token * static_cast<double>(run.tokens);
  const double allowed = ctx.max_epochs * static_cast<double>(ctx.corpus_tokens);
  if (static_cast<double>(run.tokens) > allowed)
    return infeasible("needs " + fmt("%.4g", static_cast<double>(run.tokens)) + " training tokens but the training shard holds " +
                      std::to_string(ctx.corpus_tokens) + " (sweep.max_epochs = " + fmt("%g", ctx.max_epochs) +
                      "); it would repeat data: lower the budget or raise sweep.max_epochs");

  // Hyper-parameters from the rules, unless the run sets them itself.
  auto apply_rule = [&](const std::string& key, const std::string& value) {
    if (!overrides_key(r.run_overrides, key)) apply_override(c, key + "=" + value);
  };
  const double lr = r.shape.lr > 0 ? r.shape.lr
                                   : ctx.rules.lr * std::pow(ctx.rules.lr_d_ref / static_cast<double>(c.model.d_model),
                                                             ctx.rules.lr_power) *
                                         (c.model.moe.enabled() ? ctx.rules.lr_moe_factor : 1.0);
  apply_rule("train.steps", std::to_string(run.steps));
  apply_rule("train.lr", fmt("%.6g", lr));
  apply_rule("train.min_lr", fmt("%.6g", lr * ctx.rules.min_lr_ratio));
  int64_t warmup = std::max<int64_t>(ctx.rules.min_warmup_steps,
                                     std::llround(ctx.rules.warmup_fraction * static_cast<double>(run.steps)));
  warmup = std::max<int64_t>(0, std::min(warmup, run.steps - 1));
  apply_rule("train.warmup_steps", std::to_string(warmup));
  apply_rule("train.checkpoint_every", std::to_string(ctx.checkpoint_every));
  if (ctx.rules.init_std > 0)
    apply_rule("model.init_std",
               fmt("%.6g", ctx.rules.init_std * std::pow(ctx.rules.lr_d_ref / static_cast<double>(c.model.d_model),
                                                         ctx.rules.init_power)));
  c.train.flops_convention = ctx.convention;
  try {
    validate(c);
  } catch (const Error& e) {
    return infeasible(e.what());
  }
  run.config = c;
  return run;
}

std::string shape_tag(const Shape& s) {
  return "d" + std::to_string(s.d_model) + "l" + std::to_string(s.n_layers) +
         (s.d_ff > 0 ? "f" + std::to_string(s.d_ff) : "");
}

// Realises sparsity S with top_k fixed (E = K / (1 - S)) or experts fixed (K = E (1 - S)); explains when no
// integer does it.
struct Sparse {
  int64_t experts = 0, top_k = 0;
  std::string error;
};
Sparse realise_sparsity(double s, int64_t fixed_top_k, int64_t fixed_experts) {
  Sparse out;
  if (!(s >= 0 && s < 1)) {
    out.error = "sparsity S = " + fmt("%g", s) + " is outside [0, 1)";
    return out;
  }
  if (fixed_experts > 0) {
    const double k = static_cast<double>(fixed_experts) * (1 - s);
    out.experts = fixed_experts;
    out.top_k = std::llround(k);
    if (std::fabs(k - out.top_k) > 1e-6 * std::max(1.0, k) || out.top_k < 1)
      out.error = "S = " + fmt("%g", s) + " with experts = " + std::to_string(fixed_experts) + " needs top_k = " +
                  fmt("%.4g", k) + " (not a positive integer)";
  } else {
    const double e = static_cast<double>(fixed_top_k) / (1 - s);
    out.top_k = fixed_top_k;
    out.experts = std::llround(e);
    if (std::fabs(e - out.experts) > 1e-6 * e)
      out.error = "S = " + fmt("%g", s) + " with top_k = " + std::to_string(fixed_top_k) + " needs E = " +
                  fmt("%.4g", e) + " experts (not an integer)";
  }
  if (out.error.empty() && out.experts > 0 &&
      static_cast<double>(out.experts - out.top_k) / static_cast<double>(out.experts) != s)
    out.error = "S = " + fmt("%.17g", s) + " is not exactly (E - K) / E for E = " + std::to_string(out.experts) +
                ", K = " + std::to_string(out.top_k);
  return out;
}

std::vector<std::string> moe_explicit(int64_t experts, int64_t top_k, int64_t granularity) {
  return {"moe.expansion=0", "moe.experts=" + std::to_string(experts), "moe.top_k=" + std::to_string(top_k),
          "moe.granularity=" + std::to_string(granularity)};
}
const std::vector<std::string> kDense = {"moe.expansion=0", "moe.experts=0", "moe.granularity=1"};

// Budget axis of a kind: `budgets` (FLOPs) or `tokens` (D).
struct Amount {
  double budget = 0, tokens = 0;
  std::string tag() const { return budget > 0 ? "c" + compact_number(budget) : "t" + compact_number(tokens); }
};
std::vector<Amount> amounts(const Section& s, bool budgets_required) {
  std::vector<Amount> out;
  for (double b : s.numbers("budgets")) {
    if (!(b > 0)) throw Error("sweep spec: " + s.name + ".budgets must be positive FLOP counts");
    out.push_back({b, 0});
  }
  if (!budgets_required)
    for (double t : s.numbers("tokens")) {
      if (!(t > 0)) throw Error("sweep spec: " + s.name + ".tokens must be positive token counts");
      out.push_back({0, t});
    }
  if (out.empty())
    throw Error(budgets_required ? "sweep spec: " + s.name + ".budgets (training FLOPs, e.g. [1e13, 3e13]) is required"
                                 : "sweep spec: " + s.name + " needs budgets = [FLOPs...] or tokens = [D...]");
  return out;
}

// Reads the base config: an optional file, inline [base.model] / [base.moe] / [base.train] / [base.data] tables
// merged over it, then base.set overrides.
Config read_base(const toml::table* base_table) {
  Section base(base_table, "[base]",
               {{"config", KeyType::String}, {"set", KeyType::StringList}, {"model", KeyType::Table},
                {"moe", KeyType::Table}, {"train", KeyType::Table}, {"data", KeyType::Table}});
  toml::table merged;
  const std::string path = base.string("config", "");
  if (!path.empty()) {
    try {
      merged = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
      throw Error("sweep spec: cannot read base.config '" + path + "': " + std::string(e.description()));
    }
  }
  for (const char* sec : {"model", "moe", "train", "data"}) {
    const toml::node* n = base.get(sec);
    if (!n) continue;
    if (!n->is_table()) throw Error(std::string("sweep spec: [base.") + sec + "] must be a table");
    if (!merged.get(sec)) merged.insert(sec, toml::table{});
    toml::table& dst = *merged.get(sec)->as_table();
    for (const auto& [k, v] : *n->as_table()) dst.insert_or_assign(k, v);
  }
  std::ostringstream text;
  text << merged;
  return config_from_string(text.str(), base.strings("set"), path.empty() ? "[base]" : path);
}

std::string absolute(const std::string& p) { return p.empty() ? p : fs::absolute(p).lexically_normal().string(); }

}  // namespace

std::string compact_number(double value) {
  // "%.3g" then drop the exponent's '+' and leading zeros: 1e+12 -> 1e12, 1.5e+06 -> 1.5e6, 2e-05 -> 2e-5.
  const std::string s = fmt("%.3g", value);
  const size_t e = s.find('e');
  if (e == std::string::npos) return s;
  std::string mantissa = s.substr(0, e), exponent = s.substr(e + 1), sign;
  if (!exponent.empty() && (exponent[0] == '+' || exponent[0] == '-')) {
    if (exponent[0] == '-') sign = "-";
    exponent = exponent.substr(1);
  }
  while (exponent.size() > 1 && exponent[0] == '0') exponent = exponent.substr(1);
  return mantissa + "e" + sign + exponent;
}

std::vector<const PlannedRun*> SweepPlan::feasible_runs() const {
  std::vector<const PlannedRun*> out;
  for (const auto& r : runs)
    if (r.feasible) out.push_back(&r);
  return out;
}

// [vary] "section.key" = [values...]: every run of the plan repeated for each combination of the values (keys in
// spec order, the last varying fastest), as a `set` of the run that no rule overrides. moe.* keys vary MoE runs only
// (a dense baseline stays one run). Names gain "-<key's last part>_<value>" per key, groups the same suffix, so the
// fits of one variant never mix with another's.
static std::vector<Request> vary_requests(const Context& ctx, const toml::table* vary, std::vector<Request> requests) {
  if (!vary) return requests;
  std::set<std::string> keys;
  for (const auto& k : config_keys()) keys.insert(k.name);
  std::vector<std::pair<std::string, std::vector<std::string>>> dims;
  for (const auto& [key, node] : *vary) {
    const std::string name(key.str());
    if (!keys.count(name))
      throw Error("sweep spec: [vary] key '" + name + "' is not a config key (see `moelab config --list`)");
    const toml::array* values = node.as_array();
    if (!values || values->empty())
      throw Error("sweep spec: [vary] " + name + " must be a non-empty array of values, e.g. [\"a\", \"b\"]");
    std::vector<std::string> rendered;
    for (const auto& v : *values) {
      if (v.is_string()) rendered.push_back(*v.value<std::string>());
      else if (v.is_integer()) rendered.push_back(std::to_string(*v.value<int64_t>()));
      else if (v.is_floating_point()) rendered.push_back(compact_number(*v.value<double>()));
      else if (v.is_boolean()) rendered.push_back(*v.value<bool>() ? "true" : "false");
      else throw Error("sweep spec: [vary] " + name + " holds a value that is not a string, number or boolean");
    }
    dims.emplace_back(name, rendered);
  }
  std::vector<Request> out;
  for (const Request& r : requests) {
    bool moe = false;
    try {
      Config c = ctx.base;
      for (const auto& o : r.moe_overrides) apply_override(c, o);
      for (const auto& o : r.run_overrides) apply_override(c, o);
      moe = c.model.moe.enabled();
    } catch (const Error&) {
      moe = true;  // invalid anyway: planned (and refused) once per variant, with its reason
    }
    std::vector<Request> variants = {r};
    for (const auto& [key, values] : dims) {
      if (key.rfind("moe.", 0) == 0 && !moe) continue;
      std::vector<Request> next;
      const std::string leaf = key.substr(key.rfind('.') + 1);
      for (const Request& v : variants)
        for (const std::string& value : values) {
          Request x = v;
          x.run_overrides.push_back(key + "=" + value);
          std::string tag = "-" + leaf + "_" + value;
          for (char& ch : tag)
            if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.')) ch = '_';
          x.name += tag;
          x.group += tag;
          next.push_back(x);
        }
      variants = std::move(next);
    }
    out.insert(out.end(), variants.begin(), variants.end());
  }
  return out;
}

namespace {

// What every sweep kind's expansion reads: the context, the ladder of shapes, and whether a dense run joins each
// point of the kind's grid.
struct KindInput {
  const Context& ctx;
  const std::vector<Shape>& shapes;
  bool dense_baseline;
};

void add_dense(std::vector<Request>& requests, const Shape& shape, const Amount& a, const std::string& prefix) {
  Request r;
  r.group = "dense";
  r.shape = shape;
  r.moe_overrides = kDense;
  r.budget = a.budget;
  r.tokens = a.tokens;
  r.name = prefix + a.tag() + "-" + shape.tag + "-dense";
  requests.push_back(r);
}

// A shape's own budgets must be budgets of the sweep (a typo would silently drop the shape).
void check_shape_budgets(const std::vector<Shape>& shapes, const std::vector<Amount>& axis, const std::string& table) {
  for (const Shape& shape : shapes)
    for (double b : shape.budgets) {
      bool found = false;
      for (const Amount& a : axis) found |= a.budget > 0 && std::fabs(a.budget - b) <= 1e-9 * b;
      if (!found)
        throw Error("sweep spec: [[shape]] " + shape.tag + " budgets lists " + fmt("%g", b) + ", which is not in " +
                    table + ".budgets");
    }
}

// kind = "isoflop": every shape of each budget's ladder at every sparsity (and dense), at the budget's FLOPs.
void expand_isoflop(const KindInput& in, const Section& s, std::vector<Request>& requests) {
  const auto budgets = amounts(s, true);
  check_shape_budgets(in.shapes, budgets, "[isoflop]");
  const auto sparsities = s.numbers("sparsity");
  if (sparsities.empty()) throw Error("sweep spec: [isoflop] sparsity = [0.5, 0.75, ...] is required");
  const int64_t top_k = s.integer("top_k", 2), experts = s.integer("experts", 0), g = s.integer("granularity", 1);
  for (const Amount& a : budgets)
    for (const Shape& shape : in.shapes) {
      if (!shape.at(a.budget)) continue;
      if (in.dense_baseline) add_dense(requests, shape, a, "");
      for (double sp : sparsities) {
        Request r;
        r.group = "isoflop";
        r.shape = shape;
        r.budget = a.budget;
        r.target_sparsity = sp;
        const Sparse real = realise_sparsity(sp, top_k, experts);
        r.infeasible = real.error;
        r.moe_overrides = moe_explicit(real.experts, real.top_k, g);
        r.name = a.tag() + "-" + shape.tag + "-" +
                 (real.error.empty() ? "e" + std::to_string(real.experts) + "k" + std::to_string(real.top_k) +
                                           (g > 1 ? "g" + std::to_string(g) : "")
                                     : "s" + compact_number(sp));
        requests.push_back(r);
      }
    }
}

// kind = "fixed_params": at each total parameter count N, the ladder shape nearest N for every sparsity.
void expand_fixed_params(const KindInput& in, const Section& s, std::vector<Request>& requests) {
  const auto params = s.numbers("params");
  const auto sparsities = s.numbers("sparsity");
  if (params.empty() || sparsities.empty())
    throw Error("sweep spec: [fixed_params] needs params = [total parameters...] and sparsity = [...]");
  const auto axis = amounts(s, false);
  const int64_t top_k = s.integer("top_k", 2), experts = s.integer("experts", 0);
  const double tolerance = s.number("tolerance", 0.25);
  // The ladder shape whose total parameters (with the given MoE) is nearest N in log space.
  check_shape_budgets(in.shapes, axis, "[fixed_params]");
  auto nearest = [&](double n, const std::vector<std::string>& moe, double budget, std::string& why) -> const Shape* {
    const Shape* best = nullptr;
    double best_err = 1e300, best_total = 0;
    for (const Shape& shape : in.shapes) {
      if (!shape.at(budget)) continue;
      Request probe;
      probe.shape = shape;
      probe.moe_overrides = moe;
      try {
        const double total = static_cast<double>(count_parameters(model_config(in.ctx, probe).model).total);
        const double err = std::fabs(std::log(total / n));
        if (err < best_err) best = &shape, best_err = err, best_total = total;
      } catch (const Error&) {
      }
    }
    if (!best) {
      why = "no shape of the ladder builds a valid model with this MoE";
      return nullptr;
    }
    if (best_err > std::log1p(tolerance)) {
      why = "nearest ladder shape " + best->tag + " has " + fmt("%.4g", best_total) + " total parameters, " +
            fmt("%.0f", 100 * std::fabs(best_total / n - 1)) + "% from N = " + fmt("%.4g", n) +
            " (tolerance " + fmt("%g", tolerance) + "): add a shape to the ladder";
      return nullptr;
    }
    return best;
  };
  for (double n : params)
    for (const Amount& a : axis) {
      const std::string prefix = "n" + compact_number(n) + "-";
      if (in.dense_baseline) {
        std::string why;
        const Shape* shape = nearest(n, kDense, a.budget, why);
        Request r;
        r.group = "dense";
        r.target_params = n;
        r.budget = a.budget;
        r.tokens = a.tokens;
        r.moe_overrides = kDense;
        r.infeasible = why;
        if (shape) r.shape = *shape;
        r.name = prefix + a.tag() + "-dense" + (shape ? "-" + shape->tag : "");
        requests.push_back(r);
      }
      for (double sp : sparsities) {
        Request r;
        r.group = "fixed_params";
        r.target_params = n;
        r.target_sparsity = sp;
        r.budget = a.budget;
        r.tokens = a.tokens;
        const Sparse real = realise_sparsity(sp, top_k, experts);
        r.moe_overrides = moe_explicit(real.experts, real.top_k, 1);
        std::string why = real.error;
        const Shape* shape = why.empty() ? nearest(n, r.moe_overrides, a.budget, why) : nullptr;
        r.infeasible = why;
        if (shape) r.shape = *shape;
        r.name = prefix + a.tag() + "-" +
                 (real.error.empty() ? "e" + std::to_string(real.experts) + "k" + std::to_string(real.top_k)
                                     : "s" + compact_number(sp)) +
                 (shape ? "-" + shape->tag : "");
        requests.push_back(r);
      }
    }
}

// kind = "granularity": every shape at every granularity G of one expansion rate.
void expand_granularity(const KindInput& in, const Section& s, std::vector<Request>& requests) {
  const auto gs = s.numbers("granularity");
  if (gs.empty()) throw Error("sweep spec: [granularity] granularity = [1, 2, 4, ...] is required");
  const auto axis = amounts(s, false);
  check_shape_budgets(in.shapes, axis, "[granularity]");
  const int64_t expansion = s.integer("expansion", 8), top_k = s.integer("top_k", 1);
  for (const Amount& a : axis)
    for (const Shape& shape : in.shapes) {
      if (!shape.at(a.budget)) continue;
      if (in.dense_baseline) add_dense(requests, shape, a, "");
      for (double gd : gs) {
        Request r;
        r.group = "granularity";
        r.shape = shape;
        r.budget = a.budget;
        r.tokens = a.tokens;
        const int64_t g = std::llround(gd);
        if (g < 1 || static_cast<double>(g) != gd) r.infeasible = "granularity G = " + fmt("%g", gd) + " is not a positive integer";
        r.moe_overrides = {"moe.experts=0", "moe.expansion=" + std::to_string(expansion),
                           "moe.granularity=" + std::to_string(std::max<int64_t>(g, 1)),
                           "moe.top_k=" + std::to_string(top_k)};
        r.target_sparsity = g >= 1 ? static_cast<double>(expansion * g - top_k * g) / static_cast<double>(expansion * g) : 0;
        r.name = a.tag() + "-" + shape.tag + "-x" + std::to_string(expansion) + "g" + compact_number(gd);
        requests.push_back(r);
      }
    }
}

// The sweep kinds: [sweep] kind names one; its table, of these keys, says what to expand. Kind "list" has no table
// of its own: its runs are the [[run]] tables, which every kind may add.
struct SweepKind {
  std::string name;
  std::vector<KeyRule> keys;  // of its table, [<name>]
  std::string missing;         // the error when the table is absent
  void (*expand)(const KindInput&, const Section&, std::vector<Request>&);
};

const std::vector<SweepKind>& sweep_kinds() {
  static const std::vector<SweepKind> kinds = {
      {"isoflop",
       {{"budgets", KeyType::NumberList}, {"sparsity", KeyType::NumberList}, {"top_k", KeyType::Int, 1, 1 << 20},
        {"experts", KeyType::Int, 0, 1 << 20}, {"granularity", KeyType::Int, 1, 1 << 16}},
       "sweep spec: kind = \"isoflop\" needs an [isoflop] table with budgets and sparsity", expand_isoflop},
      {"fixed_params",
       {{"params", KeyType::NumberList}, {"sparsity", KeyType::NumberList}, {"top_k", KeyType::Int, 1, 1 << 20},
        {"experts", KeyType::Int, 0, 1 << 20}, {"budgets", KeyType::NumberList}, {"tokens", KeyType::NumberList},
        {"tolerance", KeyType::Float, 0, 1e6}},
       "sweep spec: kind = \"fixed_params\" needs a [fixed_params] table", expand_fixed_params},
      {"granularity",
       {{"granularity", KeyType::NumberList}, {"expansion", KeyType::Int, 1, 1 << 20},
        {"top_k", KeyType::Int, 1, 1 << 20}, {"budgets", KeyType::NumberList}, {"tokens", KeyType::NumberList}},
       "sweep spec: kind = \"granularity\" needs a [granularity] table", expand_granularity},
      {"list", {}, "", nullptr},
  };
  return kinds;
}

const SweepKind& find_kind(const std::string& name) {
  std::string names;
  for (const SweepKind& k : sweep_kinds()) {
    if (k.name == name) return k;
    names += (names.empty() ? "" : ", ") + k.name;
  }
  throw Error("sweep spec: [sweep] kind = '" + name + "' must be one of " + names);
}

// Absolute data paths, so a run's config.toml works from any directory (and on every Slurm node); the corpus size.
void resolve_sweep_data(Context& ctx, SweepPlan& plan) {
  DataConfig data = resolve_data_paths(ctx.base.data);
  if (data.train_path.empty())
    throw Error("sweep spec: the base config names no training data: set data.dir (a `moelab data prepare` output) "
                "or data.train_path in [base.data]");
  data.dir = absolute(data.dir);
  data.train_path = absolute(data.train_path);
  data.val_path = absolute(data.val_path);
  data.tokenizer = absolute(data.tokenizer);
  for (std::string& path : data.ood_paths) path = absolute(path);
  ctx.base.data = data;
  plan.train_path = data.train_path;
  plan.corpus_tokens = TokenFile(data.train_path, data.dtype).size();
  ctx.corpus_tokens = plan.corpus_tokens;

}

Rules read_rules(const toml::table* table) {
  Rules rules;
  const double inf = std::numeric_limits<double>::infinity();
  Section section(table, "[rules]",
                  {{"lr", KeyType::Float}, {"lr_d_ref", KeyType::Float}, {"lr_power", KeyType::Float},
                   {"lr_moe_factor", KeyType::Float}, {"min_lr_ratio", KeyType::Float},
                   {"warmup_fraction", KeyType::Float}, {"min_warmup_steps", KeyType::Int, 0, inf},
                   {"batch_size", KeyType::Int}, {"init_std", KeyType::Float}, {"init_power", KeyType::Float}});
  rules.lr = section.number("lr", rules.lr);
  rules.lr_d_ref = section.number("lr_d_ref", rules.lr_d_ref);
  rules.lr_power = section.number("lr_power", rules.lr_power);
  rules.lr_moe_factor = section.number("lr_moe_factor", rules.lr_moe_factor);
  rules.min_lr_ratio = section.number("min_lr_ratio", rules.min_lr_ratio);
  rules.warmup_fraction = section.number("warmup_fraction", rules.warmup_fraction);
  rules.min_warmup_steps = section.integer("min_warmup_steps", rules.min_warmup_steps);
  rules.batch_size = section.integer("batch_size", 0);
  rules.init_std = section.number("init_std", 0);
  rules.init_power = section.number("init_power", rules.init_power);
  if (rules.init_std < 0)
    throw Error("sweep spec: [rules] init_std must be >= 0 (0 keeps the base config's model.init_std)");
  if (!(rules.lr > 0) || !(rules.lr_d_ref > 0) || !(rules.lr_moe_factor > 0) || rules.min_lr_ratio < 0 || rules.min_lr_ratio > 1 ||
      rules.warmup_fraction < 0 || rules.warmup_fraction >= 1 || rules.batch_size < 0)
    throw Error("sweep spec: [rules] needs lr > 0, lr_d_ref > 0, lr_moe_factor > 0, 0 <= min_lr_ratio <= 1, 0 <= warmup_fraction < 1, "
                "batch_size >= 0");
  return rules;
}

// The [[shape]] ladder, or the base config's own shape.
std::vector<Shape> read_shapes(const toml::table& root, const Context& ctx) {
  std::vector<Shape> shapes;
  for (const toml::table* t : table_array(root, "shape")) {
    Section s(t, "[[shape]]",
              {{"name", KeyType::String}, {"d_model", KeyType::Int}, {"n_layers", KeyType::Int},
               {"n_heads", KeyType::Int, 1, 1024}, {"d_ff", KeyType::Int, 0, 1 << 20}, {"batch_size", KeyType::Int, 0, 1e9},
               {"lr", KeyType::Float, 0, 1e3}, {"budgets", KeyType::NumberList}});
    Shape shape;
    shape.d_model = s.integer("d_model", 0);
    shape.n_layers = s.integer("n_layers", 0);
    if (shape.d_model <= 0 || shape.n_layers <= 0)
      throw Error("sweep spec: every [[shape]] needs d_model and n_layers (positive integers)");
    shape.n_heads = s.integer("n_heads", std::max<int64_t>(1, shape.d_model / 64));
    shape.d_ff = s.integer("d_ff", 0);
    shape.batch_size = s.integer("batch_size", 0);
    shape.lr = s.number("lr", 0);
    shape.tag = s.string("name", shape_tag(shape));
    shape.budgets = s.numbers("budgets");
    for (double b : shape.budgets)
      if (!(b > 0)) throw Error("sweep spec: [[shape]] " + shape.tag + " budgets must be positive FLOP counts");
    shapes.push_back(shape);
  }
  if (shapes.empty()) {  // the base config's own shape
    Shape shape;
    shape.d_model = ctx.base.model.d_model;
    shape.n_layers = ctx.base.model.n_layers;
    shape.n_heads = ctx.base.model.n_heads;
    shape.d_ff = ctx.base.model.d_ff;
    shape.tag = shape_tag(shape);
    shapes.push_back(shape);
  }

  return shapes;
}

// [[run]] tables: explicit runs, for any kind (the whole sweep when kind = "list").
std::vector<Request> read_run_tables(const toml::table& root, const Context& ctx) {
  std::vector<Request> requests;
  for (const toml::table* t : table_array(root, "run")) {
    Section s(t, "[[run]]",
              {{"name", KeyType::String}, {"set", KeyType::StringList}, {"budget", KeyType::Float},
               {"tokens", KeyType::Float}, {"steps", KeyType::Int}, {"processes", KeyType::Int},
               {"seeds", KeyType::NumberList}});
    Request r;
    r.group = "list";
    r.name = s.string("name", "");
    if (r.name.empty()) throw Error("sweep spec: every [[run]] needs a name");
    r.run_overrides = s.strings("set");
    r.budget = s.number("budget", 0);
    r.tokens = s.number("tokens", 0);
    r.steps = s.integer("steps", 0);
    r.processes = s.integer("processes", 0);
    for (double seed : s.numbers("seeds")) r.seeds.push_back(checked_seed(seed, "[[run]] '" + r.name + "' seeds"));
    if (t->contains("processes") && r.processes < 1)
      throw Error("sweep spec: [[run]] '" + r.name + "' processes must be at least 1");
    if ((r.budget > 0) + (r.tokens > 0) + (r.steps > 0) + overrides_key(r.run_overrides, "train.steps") != 1)
      throw Error("sweep spec: [[run]] '" + r.name +
                  "' needs exactly one of budget (FLOPs), tokens (D), steps, or a train.steps in its set list");
    // The run's own shape is the base's, changed only by its set list.
    r.shape.d_model = ctx.base.model.d_model;
    r.shape.n_layers = ctx.base.model.n_layers;
    r.shape.n_heads = ctx.base.model.n_heads;
    r.shape.d_ff = ctx.base.model.d_ff;
    requests.push_back(r);
  }
  return requests;
}

}  // namespace

SweepPlan plan_sweep_from_string(const std::string& spec_text, const std::string& source_name) {
  toml::table root;
  try {
    root = toml::parse(spec_text, source_name);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << "cannot parse sweep spec " << source_name << " at line " << e.source().begin.line << ": " << e.description();
    throw Error(os.str());
  }
  Section top(&root, "the spec",
              {{"sweep", KeyType::Table}, {"base", KeyType::Table}, {"rules", KeyType::Table},
               {"shape", KeyType::TableArray}, {"isoflop", KeyType::Table}, {"fixed_params", KeyType::Table},
               {"granularity", KeyType::Table}, {"run", KeyType::TableArray}, {"vary", KeyType::Table}});
  Section sweep(sub_table(root, "sweep"), "[sweep]",
                {{"name", KeyType::String}, {"kind", KeyType::String}, {"flops_convention", KeyType::String},
                 {"checkpoint_every", KeyType::Int}, {"dense_baseline", KeyType::Bool},
                 {"max_epochs", KeyType::Float, 0, 1e6}, {"processes", KeyType::Int}, {"seeds", KeyType::NumberList}});
  SweepPlan plan;
  plan.spec_path = source_name;
  plan.kind = sweep.string("kind", "");
  const SweepKind& kind = find_kind(plan.kind);
  plan.name = sweep.string("name", plan.kind);
  plan.flops_convention = sweep.string("flops_convention", "exact");
  const FlopConvention convention = parse_flop_convention(plan.flops_convention);
  plan.max_epochs = sweep.number("max_epochs", 1.0);
  const bool dense_baseline = sweep.boolean("dense_baseline", false);

  Context ctx;
  ctx.base = read_base(sub_table(root, "base"));
  ctx.convention = convention;
  ctx.checkpoint_every = sweep.integer("checkpoint_every", 50);
  ctx.processes = sweep.integer("processes", 1);
  if (ctx.processes < 1) throw Error("sweep spec: [sweep] processes must be at least 1");
  ctx.max_epochs = plan.max_epochs;
  if (ctx.checkpoint_every < 0) throw Error("sweep spec: [sweep] checkpoint_every must be >= 0");
  resolve_sweep_data(ctx, plan);
  ctx.rules = read_rules(sub_table(root, "rules"));
  const std::vector<Shape> shapes = read_shapes(root, ctx);

  std::vector<Request> requests;
  if (kind.expand) {
    const Section s(sub_table(root, kind.name), "[" + kind.name + "]", kind.keys);
    if (!s.table) throw Error(kind.missing);
    kind.expand({ctx, shapes, dense_baseline}, s, requests);
  }
  for (Request& r : read_run_tables(root, ctx)) requests.push_back(std::move(r));
  if (requests.empty()) throw Error("sweep spec: the sweep expands to no runs");
  if (plan.kind == "list" && table_array(root, "run").empty())
    throw Error("sweep spec: kind = \"list\" needs [[run]] tables");

  requests = vary_requests(ctx, sub_table(root, "vary"), std::move(requests));
  std::vector<int64_t> sweep_seeds;
  for (double seed : sweep.numbers("seeds")) sweep_seeds.push_back(checked_seed(seed, "[sweep] seeds"));
  requests = replicate_requests(sweep_seeds, std::move(requests));

  std::set<std::string> names;
  for (const Request& r : requests) {
    if (!names.insert(r.name).second) continue;  // a dense baseline shared by several sparsities
    for (char ch : r.name)
      if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_' || ch == '.'))
        throw Error("sweep spec: run name '" + r.name + "' may only hold letters, digits, '-', '_' and '.'");
    plan.runs.push_back(finish_run(ctx, r, convention));
  }
  return plan;
}

SweepPlan plan_sweep(const std::string& spec_path) {
  return plan_sweep_from_string(read_file(spec_path, "sweep spec"), spec_path);
}

nlohmann::ordered_json plan_to_json(const SweepPlan& plan) {
  nlohmann::ordered_json j;
  j["format"] = "moelab-sweep-plan-v1";
  j["name"] = plan.name;
  j["kind"] = plan.kind;
  j["spec"] = plan.spec_path;
  j["flops_convention"] = plan.flops_convention;
  j["train_path"] = plan.train_path;
  j["corpus_tokens"] = plan.corpus_tokens;
  j["max_epochs"] = plan.max_epochs;
  nlohmann::ordered_json runs = nlohmann::ordered_json::array();
  int64_t index = 0;
  for (const auto& r : plan.runs) {
    const auto& m = r.config.model;
    nlohmann::ordered_json e;
    e["name"] = r.name;
    e["index"] = r.feasible ? nlohmann::ordered_json(index++) : nlohmann::ordered_json(nullptr);
    e["group"] = r.group;
    e["feasible"] = r.feasible;
    e["reason"] = r.reason;
    e["budget"] = r.budget;
    e["target_tokens"] = r.target_tokens;
    e["target_params"] = r.target_params;
    e["target_sparsity"] = r.target_sparsity;
    e["d_model"] = m.d_model;
    e["n_layers"] = m.n_layers;
    if (r.feasible) {
      e["n_heads"] = m.n_heads;
      e["d_ff"] = m.ffn_hidden();
      e["seed"] = r.config.train.seed;
      e["experts"] = r.counts.routed_experts;
      e["top_k"] = r.counts.active_experts;
      e["granularity"] = r.counts.granularity;
      e["sparsity"] = r.counts.sparsity;
      e["params"] = r.counts.total;
      e["active_params"] = r.counts.active;
      e["nonembedding_params"] = r.counts.nonembedding_total;
      e["steps"] = r.steps;
      e["tokens"] = r.tokens;
      e["processes"] = r.processes;
      e["flops_per_token"] = r.flops_per_token;
      e["flops"] = r.flops;
      e["batch_size"] = r.config.train.batch_size;
      e["lr"] = r.config.train.lr;
      e["warmup_steps"] = r.config.train.warmup_steps;
      e["dir"] = "runs/" + r.name;
    }
    runs.push_back(e);
  }
  j["runs"] = runs;
  return j;
}

void write_plan(SweepPlan& plan, const std::string& dir, const std::string& spec_text) {
  const fs::path root = fs::absolute(dir).lexically_normal();
  for (auto& r : plan.runs)
    if (r.feasible) r.config.train.out_dir = (root / "runs" / r.name).string();
  const std::string text = plan_to_json(plan).dump(2) + "\n";
  const fs::path plan_path = root / "plan.json";
  if (fs::exists(plan_path)) {
    if (read_file(plan_path.string(), "sweep plan") == text) return;
    throw Error("'" + root.string() + "' already holds a different sweep plan (plan.json); plan into a new directory, "
                "or delete that one to start over");
  }
  fs::create_directories(root / "runs");
  for (const auto& r : plan.runs)
    if (r.feasible) write_file_atomic((root / "runs" / r.name / "config.toml").string(), to_toml(r.config));
  write_file_atomic((root / "spec.toml").string(), spec_text);
  write_file_atomic(plan_path.string(), text);  // last: its presence means the plan is complete
}

void append_runs(const std::string& dir, std::vector<PlannedRun> runs) {
  const fs::path root = fs::absolute(dir).lexically_normal();
  const SweepPlan plan = read_plan(dir);
  std::set<std::string> names;
  for (const auto& r : plan.runs) names.insert(r.name);
  nlohmann::ordered_json doc = nlohmann::ordered_json::parse(read_file((root / "plan.json").string(), "sweep plan"));
  SweepPlan extra;
  for (auto& r : runs) {
    if (!names.insert(r.name).second) throw Error("the sweep plan in '" + root.string() + "' already has a run named " + r.name);
    r.feasible = true;
    r.config.train.out_dir = (root / "runs" / r.name).string();
    write_file_atomic((root / "runs" / r.name / "config.toml").string(), to_toml(r.config));
    extra.runs.push_back(r);
  }
  const nlohmann::ordered_json added = plan_to_json(extra);
  int64_t index = static_cast<int64_t>(plan.feasible_runs().size());
  for (auto e : added["runs"]) {
    e["index"] = index++;
    doc["runs"].push_back(e);
  }
  write_file_atomic((root / "plan.json").string(), doc.dump(2) + "\n");  // last: the configs are in place
}

SweepPlan read_plan(const std::string& dir) {
  const fs::path root = fs::absolute(dir).lexically_normal();
  const fs::path plan_path = root / "plan.json";
  if (!fs::exists(plan_path))
    throw Error("'" + root.string() + "' is not a sweep directory (no plan.json): create it with `moelab sweep plan "
                "SPEC --out DIR`");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(plan_path.string(), "sweep plan"));
  } catch (const nlohmann::json::exception& e) {
    throw Error("cannot parse '" + plan_path.string() + "': " + e.what());
  }
  SweepPlan plan;
  plan.name = j.value("name", "");
  plan.kind = j.value("kind", "");
  plan.spec_path = j.value("spec", "");
  plan.flops_convention = j.value("flops_convention", "exact");
  plan.train_path = j.value("train_path", "");
  plan.corpus_tokens = j.value("corpus_tokens", int64_t{0});
  plan.max_epochs = j.value("max_epochs", 1.0);
  for (const auto& e : j.at("runs")) {
    PlannedRun r;
    r.name = e.at("name").get<std::string>();
    r.group = e.value("group", "");
    r.feasible = e.value("feasible", false);
    r.reason = e.value("reason", "");
    r.budget = e.value("budget", 0.0);
    r.target_tokens = e.value("target_tokens", 0.0);
    r.target_params = e.value("target_params", 0.0);
    r.target_sparsity = e.value("target_sparsity", 0.0);
    r.config.model.d_model = e.value("d_model", int64_t{0});
    r.config.model.n_layers = e.value("n_layers", int64_t{0});
    if (r.feasible) {
      // The numbers come from plan.json, not from re-reading each run's config.toml: a run whose config was
      // broken after planning must fail on its own when trained, not stop the whole sweep from loading.
      r.config.model.n_heads = e.value("n_heads", int64_t{1});
      r.config.model.d_ff = e.value("d_ff", int64_t{0});
      r.config.train.seed = e.value("seed", r.config.train.seed);
      r.config.train.out_dir = (root / "runs" / r.name).string();
      r.counts.total = e.value("params", int64_t{0});
      r.counts.active = e.value("active_params", int64_t{0});
      r.counts.nonembedding_total = e.value("nonembedding_params", int64_t{0});
      r.counts.routed_experts = e.value("experts", int64_t{0});
      r.counts.active_experts = e.value("top_k", int64_t{0});
      r.counts.granularity = e.value("granularity", int64_t{1});
      r.counts.sparsity = e.value("sparsity", 0.0);
      r.steps = e.value("steps", int64_t{0});
      r.tokens = e.value("tokens", int64_t{0});
      r.processes = e.value("processes", int64_t{1});
      r.flops_per_token = e.value("flops_per_token", 0.0);
      r.flops = e.value("flops", 0.0);
    }
    plan.runs.push_back(r);
  }
  return plan;
}

std::string plan_table(const SweepPlan& plan) {
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof line, "sweep '%s' (%s): %zu runs, %zu feasible; FLOPs convention %s; corpus %lld tokens\n",
                plan.name.c_str(), plan.kind.c_str(), plan.runs.size(), plan.feasible_runs().size(),
                plan.flops_convention.c_str(), static_cast<long long>(plan.corpus_tokens));
  out << line;
  std::snprintf(line, sizeof line, "%-34s %7s %6s %7s %5s %4s %6s %11s %11s %10s %10s %7s  %s\n", "name", "d_model",
                "layers", "experts", "top-k", "G", "S", "params", "active", "tokens D", "FLOPs", "steps", "status");
  out << line;
  for (const auto& r : plan.runs) {
    const auto& m = r.config.model;
    if (r.feasible) {
      std::snprintf(line, sizeof line, "%-34s %7lld %6lld %7lld %5lld %4lld %6.4g %11lld %11lld %10.4g %10.4g %7lld  ok\n",
                    r.name.c_str(), static_cast<long long>(m.d_model), static_cast<long long>(m.n_layers),
                    static_cast<long long>(r.counts.routed_experts), static_cast<long long>(r.counts.active_experts),
                    static_cast<long long>(r.counts.granularity), r.counts.sparsity,
                    static_cast<long long>(r.counts.total), static_cast<long long>(r.counts.active),
                    static_cast<double>(r.tokens), r.flops, static_cast<long long>(r.steps));
    } else {
      std::snprintf(line, sizeof line, "%-34s %7s %6s %7s %5s %4s %6.4g %11s %11s %10s %10s %7s  INFEASIBLE\n",
                    r.name.c_str(), m.d_model > 0 ? std::to_string(m.d_model).c_str() : "-",
                    m.n_layers > 0 ? std::to_string(m.n_layers).c_str() : "-", "-", "-",
                    "-", r.target_sparsity, "-", "-", r.target_tokens > 0 ? fmt("%.4g", r.target_tokens).c_str() : "-",
                    r.budget > 0 ? fmt("%.4g", r.budget).c_str() : "-", "-");
    }
    out << line;
  }
  bool any = false;
  for (const auto& r : plan.runs)
    if (!r.feasible) {
      if (!any) out << "infeasible runs (not planned; fix the spec to include them):\n";
      any = true;
      out << "  " << r.name << ": " << r.reason << "\n";
    }
  return out.str();
}

}  // namespace moelab
