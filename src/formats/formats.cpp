#include "formats/formats.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"
#include "core/safetensors.h"
#include "data/tokenizer.h"
#include "model/param_layout.h"
#include "model/params.h"
#include "model/plan.h"

namespace moelab {
namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace {

// ---- what maps ----------------------------------------------------------------------------------------------------

Error no_mapping(const std::string& target, const std::string& option, const std::string& why) {
  return Error(target + " export: " + option + " does not map: " + why);
}

// What Llama, Mixtral and DeepSeek blocks share: SwiGLU, RMSNorm, RoPE, no biases, no QK-norm; token-choice MoE with
// softmax scores, dropless, in every block (after any dense first blocks).
void check_common(const ModelConfig& m, const std::string& target) {
  if (m.ffn != FfnKind::SwiGLU)
    throw no_mapping(target, "model.ffn = \"" + to_string(m.ffn) + "\"", "the target's FFNs are SwiGLU");
  if (m.norm != NormKind::RMSNorm)
    throw no_mapping(target, "model.norm = \"" + to_string(m.norm) + "\"", "the target normalises with RMSNorm");
  if (m.pos != PosKind::Rope)
    throw no_mapping(target, "model.pos = \"" + to_string(m.pos) + "\"", "the target encodes positions with RoPE");
  if (m.bias) throw no_mapping(target, "model.bias = true", "the target's linear layers have no biases");
  if (m.qk_norm) throw no_mapping(target, "model.qk_norm = true", "the target has no QK-norm");
  const MoeConfig& moe = m.moe;
  if (!moe.enabled()) return;
  if (moe.router != RouterKind::TokenChoice)
    throw no_mapping(target, "moe.router = \"expert_choice\"", "the target routes by token choice");
  if (moe.score != ScoreKind::Softmax)
    throw no_mapping(target, "moe.score = \"sigmoid\"",
                     "the target scores experts with a softmax (sigmoid gates need DeepSeek-V3's MLA attention)");
  if (moe.balance == BalanceKind::Bias)
    throw no_mapping(target, "moe.balance = \"bias\"", "the target's routing has no per-expert selection bias");
  if (moe.capacity_factor > 0)
    throw no_mapping(target, "moe.capacity_factor = " + std::to_string(moe.capacity_factor),
                     "the target never drops tokens; train dropless (capacity_factor = 0)");
  if (moe.every != 1)
    throw no_mapping(target, "moe.every = " + std::to_string(moe.every),
                     "the target puts an MoE layer in every block (after moe.first_dense dense ones)");
}

// ---- little-endian byte buffers -------------------------------------------------------------------------------------

struct Bytes {
  std::string out;
  template <class T>
  void put(T v) {
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    out.append(b, sizeof(T));
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    out += s;
  }
  void pad(size_t alignment) { out.append((alignment - out.size() % alignment) % alignment, '\0'); }
};

uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

uint16_t float_to_f16(float f) {  // round to nearest even, overflow to infinity
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7fffffff;
  if (x > 0x7f800000) return static_cast<uint16_t>(sign | 0x7e00);
  if (x >= 0x47800000) return static_cast<uint16_t>(sign | 0x7c00);  // >= 65536: infinity
  if (x < 0x38800000) {  // subnormal half (or zero): value / 2^-24, rounded
    const float v = std::ldexp(std::fabs(f), 24);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(v)));
  }
  const uint32_t mantissa = x & 0x7fffff, exponent = (x >> 23) - 112;
  uint32_t h = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// ---- GGUF ---------------------------------------------------------------------------------------------------------

// GGUF value types and ggml tensor types (llama.cpp's gguf.h and ggml.h).
enum GgufValue : int32_t { kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9 };
constexpr size_t kAlignment = 32;

class GgufWriter {
 public:
  void u32(const std::string& key, uint32_t v) { header(key, kU32).put<uint32_t>(v); }
  void f32(const std::string& key, float v) { header(key, kF32).put<float>(v); }
  void boolean(const std::string& key, bool v) { header(key, kBool).put<int8_t>(v ? 1 : 0); }
  void str(const std::string& key, const std::string& v) { header(key, kString).str(v); }
  void strings(const std::string& key, const std::vector<std::string>& v) {
    array(key, kString, v.size());
    for (const auto& s : v) kv_.str(s);
  }
  void f32s(const std::string& key, const std::vector<float>& v) {
    array(key, kF32, v.size());
    for (float x : v) kv_.put<float>(x);
  }
  void i32s(const std::string& key, const std::vector<int32_t>& v) {
    array(key, kI32, v.size());
    for (int32_t x : v) kv_.put<int32_t>(x);
  }
  // A tensor of row-major shape `shape` (outermost first); GGUF lists dimensions innermost first.
  void tensor(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values, bool wide) {
    MOELAB_CHECK(name.size() < 64, "GGUF tensor name too long: " + name);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    MOELAB_CHECK(n == static_cast<int64_t>(values.size()), "GGUF tensor " + name + " size");
    const int32_t type = wide || dtype_ == GgufDtype::F32 ? 0 : dtype_ == GgufDtype::F16 ? 1 : 30;
    infos_.str(name);
    infos_.put<uint32_t>(static_cast<uint32_t>(shape.size()));
    for (size_t j = shape.size(); j-- > 0;) infos_.put<int64_t>(shape[j]);
    infos_.put<int32_t>(type);
    infos_.put<uint64_t>(data_.out.size());
    for (float v : values) {
      if (type == 0) data_.put<float>(v);
      else data_.put<uint16_t>(type == 1 ? float_to_f16(v) : float_to_bf16(v));
    }
    data_.pad(kAlignment);
    ++tensors_;
  }
  std::string finish() const {
    Bytes file;
    file.out = "GGUF";
    file.put<uint32_t>(3);
    file.put<uint64_t>(tensors_);
    file.put<uint64_t>(kvs_);
    file.out += kv_.out;
    file.out += infos_.out;
    file.pad(kAlignment);
    file.out += data_.out;
    return file.out;
  }
  explicit GgufWriter(GgufDtype dtype) : dtype_(dtype) {}

 private:
  Bytes& header(const std::string& key, int32_t type) {
    kv_.str(key);
    kv_.put<int32_t>(type);
    ++kvs_;
    return kv_;
  }
  void array(const std::string& key, int32_t type, size_t n) {
    header(key, kArray).put<int32_t>(type);
    kv_.put<uint64_t>(n);
  }
  GgufDtype dtype_;
  Bytes kv_, infos_, data_;
  uint64_t kvs_ = 0, tensors_ = 0;
};

// A model's tensors on the host, through the parameter table's typed views (model/params.h): the exporters name
// moelab's tensors by field, never by their checkpoint names.
struct Tensors {
  ModelParams w;
  Tensors(const ParamLayout& layout, const ExportModel& model)
      // param_views takes a writable base; the exporters only read through these views.
      : w(param_views(layout, const_cast<float*>(model.params.data()), model.config.model)) {}
  const BlockParams& block(int64_t i) const { return w.blocks[static_cast<size_t>(i)]; }
  // Elements [begin, begin + count) of x (count < 0: to the end).
  static std::vector<float> get(const Tensor& x, int64_t begin = 0, int64_t count = -1) {
    MOELAB_CHECK(!x.empty(), "export: the model lacks a tensor this format needs");
    const int64_t n = count < 0 ? x.numel() - begin : count;
    return std::vector<float>(x.data + begin, x.data + begin + n);
  }
  // Rows [r0, r0 + rows) of every matrix of a (E, R, C) stack: (E, rows, C).
  static std::vector<float> rows_of_stack(const Tensor& x, int64_t r0, int64_t rows) {
    const int64_t E = x.dim(0), R = x.dim(1), C = x.dim(2);
    std::vector<float> out;
    out.reserve(static_cast<size_t>(E * rows * C));
    for (int64_t e = 0; e < E; ++e) {
      const float* from = x.data + (e * R + r0) * C;
      out.insert(out.end(), from, from + rows * C);
    }
    return out;
  }
};

// llama.cpp's `llama` and `deepseek` architectures rotate (x[2i], x[2i+1]) pairs, moelab (like Hugging Face) rotates
// (x[i], x[i + d/2]): within each head, output row 2j + h of the projection takes row h * d/2 + j.
std::vector<float> interleave_rope_rows(const std::vector<float>& w, int64_t heads, int64_t head_dim, int64_t cols) {
  std::vector<float> out(w.size());
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < half; ++j)
      for (int64_t k = 0; k < 2; ++k) {
        const int64_t from = h * head_dim + k * half + j, to = h * head_dim + 2 * j + k;
        std::copy(w.begin() + from * cols, w.begin() + (from + 1) * cols, out.begin() + to * cols);
      }
  return out;
}

}  // namespace

std::vector<std::string> tokenizer_export_caveats(const std::string& tokenizer_path) {
  const TokenizerNormalizer n = Tokenizer(tokenizer_path).normalizer();
  std::vector<std::string> caveats;
  if (n.rule != "identity" && n.has_charsmap)
    caveats.push_back("the tokenizer normalises text with rule '" + n.rule + "', which llama.cpp's SentencePiece "
                      "tokenizer and LlamaTokenizerFast do not apply: text the rule changes (e.g. full-width "
                      "characters) tokenizes differently there");
  if (n.remove_extra_whitespaces)
    caveats.push_back("the tokenizer removes leading, trailing and repeated spaces (remove_extra_whitespaces), which "
                      "llama.cpp's SentencePiece tokenizer and LlamaTokenizerFast keep: such text tokenizes "
                      "differently there");
  if (n.treat_whitespace_as_suffix)
    caveats.push_back("the tokenizer puts \"▁\" at the end of pieces (treat_whitespace_as_suffix), which llama.cpp "
                      "does not support");
  if (!n.escape_whitespaces)
    caveats.push_back("the tokenizer does not turn spaces into \"▁\" (escape_whitespaces = false), which llama.cpp "
                      "always does");
  return caveats;
}

namespace {

void write_vocabulary(GgufWriter& g, const ExportModel& model) {
  if (model.tokenizer_path.empty() || !fs::exists(model.tokenizer_path))
    throw Error("GGUF export needs the SentencePiece model the data was encoded with ('" + model.tokenizer_path +
                "' is missing); pass --tokenizer PATH/tokenizer.model");
  const Tokenizer tokenizer(model.tokenizer_path);
  const TokenizerVocabulary v = tokenizer.vocabulary();
  if (static_cast<int64_t>(v.pieces.size()) != model.config.model.vocab_size)
    throw Error("the tokenizer '" + model.tokenizer_path + "' has " + std::to_string(v.pieces.size()) +
                " pieces but the model's vocabulary is " + std::to_string(model.config.model.vocab_size) +
                "; pass the tokenizer the run was trained with (--tokenizer)");
  std::vector<int32_t> types;
  using Kind = TokenizerVocabulary::Kind;
  for (Kind k : v.kinds)  // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
    types.push_back(k == Kind::Normal ? 1 : k == Kind::Unknown ? 2 : k == Kind::Control ? 3 : k == Kind::Unused ? 5 : 6);
  g.str("tokenizer.ggml.model", "llama");
  g.strings("tokenizer.ggml.tokens", v.pieces);
  g.f32s("tokenizer.ggml.scores", v.scores);
  g.i32s("tokenizer.ggml.token_type", types);
  if (v.bos_id >= 0) g.u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.bos_id));
  if (v.eos_id >= 0) g.u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eos_id));
  if (v.unk_id >= 0) g.u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(v.unk_id));
  if (v.pad_id >= 0) g.u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(v.pad_id));
  // moelab's documents are their tokens with </s> after each: nothing is added in front.
  g.boolean("tokenizer.ggml.add_bos_token", false);
  g.boolean("tokenizer.ggml.add_eos_token", false);
  // The normaliser settings llama.cpp reads, from the model itself. Without add_space_prefix llama.cpp assumes
  // true for a SentencePiece vocabulary and puts a space before every text, so that "The" starts as "▁The".
  const TokenizerNormalizer n = tokenizer.normalizer();
  g.boolean("tokenizer.ggml.add_space_prefix", n.add_dummy_prefix);
  g.boolean("tokenizer.ggml.remove_extra_whitespaces", n.remove_extra_whitespaces);
}

// ---- Hugging Face names -----------------------------------------------------------------------------------------

std::string hf_layer(int64_t i) { return "model.layers." + std::to_string(i) + "."; }

}  // namespace

GgufDtype parse_gguf_dtype(const std::string& name) {
  if (name == "f32") return GgufDtype::F32;
  if (name == "f16") return GgufDtype::F16;
  if (name == "bf16") return GgufDtype::BF16;
  throw Error("--dtype '" + name + "' is not one of f32, f16, bf16");
}

std::string gguf_architecture(const ModelConfig& m) {
  check_common(m, "GGUF");
  const MoeConfig& moe = m.moe;
  if (!moe.enabled()) return "llama";
  if (moe.renormalize) {  // Mixtral: softmax, top-k, renormalised
    if (moe.shared_experts > 0)
      throw no_mapping("GGUF", "moe.shared_experts = " + std::to_string(moe.shared_experts) + " with moe.renormalize = true",
                       "llama.cpp's deepseek architecture (shared experts) does not renormalise the top-k weights");
    if (moe.first_dense > 0)
      throw no_mapping("GGUF", "moe.first_dense = " + std::to_string(moe.first_dense) + " with moe.renormalize = true",
                       "llama.cpp's llama architecture puts experts in every block, and its deepseek architecture "
                       "does not renormalise the top-k weights");
    if (moe.gate_scale != 1.0)
      throw no_mapping("GGUF", "moe.gate_scale with moe.renormalize = true",
                       "llama.cpp's llama architecture has no gate scale");
    return "llama";
  }
  if (moe.shared_experts < 1)
    throw no_mapping("GGUF", "moe.renormalize = false without shared experts",
                     "unnormalised top-k weights map to llama.cpp's deepseek architecture, which needs "
                     "moe.shared_experts >= 1; train with moe.renormalize = true for the llama (Mixtral) layout");
  return "deepseek";
}

std::string hf_architecture(const ModelConfig& m) {
  check_common(m, "Hugging Face");
  const MoeConfig& moe = m.moe;
  if (!moe.enabled()) return "LlamaForCausalLM";
  if (!moe.renormalize)
    throw no_mapping("Hugging Face", "moe.renormalize = false", "Mixtral renormalises the top-k weights to sum 1");
  if (moe.shared_experts > 0)
    throw no_mapping("Hugging Face", "moe.shared_experts = " + std::to_string(moe.shared_experts),
                     "Mixtral has no shared experts");
  if (moe.first_dense > 0)
    throw no_mapping("Hugging Face", "moe.first_dense = " + std::to_string(moe.first_dense),
                     "Mixtral puts experts in every block");
  if (moe.gate_scale != 1.0) throw no_mapping("Hugging Face", "moe.gate_scale", "Mixtral has no gate scale");
  return "MixtralForCausalLM";
}

void export_gguf(const ExportModel& model, const std::string& path, GgufDtype dtype) {
  const ModelConfig& m = model.config.model;
  const std::string arch = gguf_architecture(m);
  const ParamLayout layout(m);
  MOELAB_CHECK(static_cast<int64_t>(model.params.size()) == layout.total(), "export: parameters of another model");
  const ModelPlan plan(m);
  const Tensors t(layout, model);
  const int64_t C = m.d_model, H = m.n_heads, hd = m.head_dim(), V = m.vocab_size;
  GgufWriter g(dtype);
  g.str("general.architecture", arch);
  g.str("general.name", model.name.empty() ? "moelab" : model.name);
  g.u32("general.file_type", dtype == GgufDtype::F32 ? 0 : dtype == GgufDtype::F16 ? 1 : 32);
  g.u32(arch + ".context_length", static_cast<uint32_t>(m.seq_len));
  g.u32(arch + ".embedding_length", static_cast<uint32_t>(C));
  g.u32(arch + ".block_count", static_cast<uint32_t>(m.n_layers));
  g.u32(arch + ".attention.head_count", static_cast<uint32_t>(H));
  g.u32(arch + ".attention.head_count_kv", static_cast<uint32_t>(H));
  g.f32(arch + ".rope.freq_base", static_cast<float>(m.rope_theta));
  g.u32(arch + ".rope.dimension_count", static_cast<uint32_t>(hd));
  g.f32(arch + ".attention.layer_norm_rms_epsilon", static_cast<float>(m.norm_eps));
  g.u32(arch + ".vocab_size", static_cast<uint32_t>(V));
  const bool moe = m.moe.enabled();
  // llama: feed_forward_length is the dense width, or for MoE the experts' (every block is MoE there).
  g.u32(arch + ".feed_forward_length",
        static_cast<uint32_t>(moe && arch == "llama" ? plan.expert_hidden : plan.ffn_hidden));
  if (moe) {
    g.u32(arch + ".expert_count", static_cast<uint32_t>(m.moe.routed_experts()));
    g.u32(arch + ".expert_used_count", static_cast<uint32_t>(m.moe.active_experts()));
  }
  if (arch == "deepseek") {
    g.u32("deepseek.leading_dense_block_count", static_cast<uint32_t>(m.moe.first_dense));
    g.u32("deepseek.expert_feed_forward_length", static_cast<uint32_t>(plan.expert_hidden));
    g.u32("deepseek.expert_shared_count", static_cast<uint32_t>(m.moe.shared_experts));
    g.f32("deepseek.expert_weights_scale", static_cast<float>(m.moe.gate_scale));
  }
  write_vocabulary(g, model);

  g.tensor("token_embd.weight", {V, C}, t.get(t.w.tok_emb), false);
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    g.tensor(b + "attn_norm.weight", {C}, t.get(t.block(i).norm1_w), true);
    g.tensor(b + "attn_q.weight", {C, C}, interleave_rope_rows(t.get(t.block(i).qkv_w, 0, C * C), H, hd, C), false);
    g.tensor(b + "attn_k.weight", {C, C},
             interleave_rope_rows(t.get(t.block(i).qkv_w, C * C, C * C), H, hd, C), false);
    g.tensor(b + "attn_v.weight", {C, C}, t.get(t.block(i).qkv_w, 2 * C * C, C * C), false);
    g.tensor(b + "attn_output.weight", {C, C}, t.get(t.block(i).out_w), false);
    g.tensor(b + "ffn_norm.weight", {C}, t.get(t.block(i).norm2_w), true);
    if (!plan.blocks[i].moe) {
      const int64_t F = plan.ffn_hidden;
      g.tensor(b + "ffn_gate.weight", {F, C}, t.get(t.block(i).fc1_w, 0, F * C), false);
      g.tensor(b + "ffn_up.weight", {F, C}, t.get(t.block(i).fc1_w, F * C, F * C), false);
      g.tensor(b + "ffn_down.weight", {C, F}, t.get(t.block(i).fc2_w), false);
      continue;
    }
    const int64_t E = m.moe.routed_experts(), Fe = plan.expert_hidden;
    g.tensor(b + "ffn_gate_inp.weight", {E, C}, t.get(t.block(i).moe.router), true);
    g.tensor(b + "ffn_gate_exps.weight", {E, Fe, C}, t.rows_of_stack(t.block(i).moe.fc1_w, 0, Fe), false);
    g.tensor(b + "ffn_up_exps.weight", {E, Fe, C}, t.rows_of_stack(t.block(i).moe.fc1_w, Fe, Fe), false);
    g.tensor(b + "ffn_down_exps.weight", {E, C, Fe}, t.get(t.block(i).moe.fc2_w), false);
    if (arch == "deepseek") {
      const int64_t Fs = plan.blocks[i].moe_dims.shared_hidden;
      g.tensor(b + "ffn_gate_shexp.weight", {Fs, C}, t.get(t.block(i).moe.shared_fc1_w, 0, Fs * C), false);
      g.tensor(b + "ffn_up_shexp.weight", {Fs, C}, t.get(t.block(i).moe.shared_fc1_w, Fs * C, Fs * C), false);
      g.tensor(b + "ffn_down_shexp.weight", {C, Fs}, t.get(t.block(i).moe.shared_fc2_w), false);
    }
  }
  g.tensor("output_norm.weight", {C}, t.get(t.w.final_norm_w), true);
  if (!m.tied_embeddings) g.tensor("output.weight", {V, C}, t.get(t.w.head), false);
  write_file_atomic(path, g.finish());
}

void export_hf(const ExportModel& model, const std::string& dir) {
  const ModelConfig& m = model.config.model;
  const std::string arch = hf_architecture(m);
  const bool mixtral = arch == "MixtralForCausalLM";
  const ParamLayout layout(m);
  MOELAB_CHECK(static_cast<int64_t>(model.params.size()) == layout.total(), "export: parameters of another model");
  const ModelPlan plan(m);
  const Tensors t(layout, model);
  const int64_t C = m.d_model, F = mixtral ? plan.expert_hidden : plan.ffn_hidden;
  if (model.tokenizer_path.empty() || !fs::exists(model.tokenizer_path))
    throw Error("Hugging Face export needs the SentencePiece model the data was encoded with ('" +
                model.tokenizer_path + "' is missing); pass --tokenizer PATH/tokenizer.model");
  const Tokenizer tokenizer(model.tokenizer_path);
  const TokenizerVocabulary vocab = tokenizer.vocabulary();
  const TokenizerNormalizer normalizer = tokenizer.normalizer();
  if (static_cast<int64_t>(vocab.pieces.size()) != m.vocab_size)
    throw Error("the tokenizer '" + model.tokenizer_path + "' has " + std::to_string(vocab.pieces.size()) +
                " pieces but the model's vocabulary is " + std::to_string(m.vocab_size) + "; pass --tokenizer");
  fs::create_directories(dir);

  // Tensors, in the order transformers' save_pretrained would list them (any order is valid).
  std::vector<std::pair<std::string, std::pair<Shape, std::vector<float>>>> out;
  auto put = [&](const std::string& name, Shape shape, std::vector<float> values) {
    out.push_back({name, {shape, std::move(values)}});
  };
  put("model.embed_tokens.weight", {m.vocab_size, C}, t.get(t.w.tok_emb));
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string h = hf_layer(i);
    put(h + "input_layernorm.weight", {C}, t.get(t.block(i).norm1_w));
    put(h + "self_attn.q_proj.weight", {C, C}, t.get(t.block(i).qkv_w, 0, C * C));
    put(h + "self_attn.k_proj.weight", {C, C}, t.get(t.block(i).qkv_w, C * C, C * C));
    put(h + "self_attn.v_proj.weight", {C, C}, t.get(t.block(i).qkv_w, 2 * C * C, C * C));
    put(h + "self_attn.o_proj.weight", {C, C}, t.get(t.block(i).out_w));
    put(h + "post_attention_layernorm.weight", {C}, t.get(t.block(i).norm2_w));
    if (!mixtral) {
      put(h + "mlp.gate_proj.weight", {F, C}, t.get(t.block(i).fc1_w, 0, F * C));
      put(h + "mlp.up_proj.weight", {F, C}, t.get(t.block(i).fc1_w, F * C, F * C));
      put(h + "mlp.down_proj.weight", {C, F}, t.get(t.block(i).fc2_w));
      continue;
    }
    const int64_t E = m.moe.routed_experts();
    put(h + "block_sparse_moe.gate.weight", {E, C}, t.get(t.block(i).moe.router));
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = h + "block_sparse_moe.experts." + std::to_string(e) + ".";
      put(x + "w1.weight", {F, C}, t.get(t.block(i).moe.fc1_w, e * 2 * F * C, F * C));
      put(x + "w3.weight", {F, C}, t.get(t.block(i).moe.fc1_w, e * 2 * F * C + F * C, F * C));
      put(x + "w2.weight", {C, F}, t.get(t.block(i).moe.fc2_w, e * C * F, C * F));
    }
  }
  put("model.norm.weight", {C}, t.get(t.w.final_norm_w));
  if (!m.tied_embeddings) put("lm_head.weight", {m.vocab_size, C}, t.get(t.w.head));
  std::vector<NamedTensor> named;
  for (const auto& [name, st] : out) named.push_back({name, st.first, st.second.data()});
  write_safetensors((fs::path(dir) / "model.safetensors").string(), named, {{"format", "pt"}});

  ordered_json c;
  c["architectures"] = {arch};
  c["model_type"] = mixtral ? "mixtral" : "llama";
  c["vocab_size"] = m.vocab_size;
  c["hidden_size"] = C;
  c["intermediate_size"] = F;
  c["num_hidden_layers"] = m.n_layers;
  c["num_attention_heads"] = m.n_heads;
  c["num_key_value_heads"] = m.n_heads;
  c["head_dim"] = m.head_dim();
  c["max_position_embeddings"] = m.seq_len;
  c["rms_norm_eps"] = m.norm_eps;
  c["rope_theta"] = m.rope_theta;
  c["rope_scaling"] = nullptr;
  c["hidden_act"] = "silu";
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  if (!mixtral) c["mlp_bias"] = false;
  c["initializer_range"] = m.init_std;
  c["tie_word_embeddings"] = m.tied_embeddings;
  c["torch_dtype"] = "float32";
  c["use_cache"] = true;
  if (vocab.bos_id >= 0) c["bos_token_id"] = vocab.bos_id;
  if (vocab.eos_id >= 0) c["eos_token_id"] = vocab.eos_id;
  if (mixtral) {
    c["num_local_experts"] = m.moe.routed_experts();
    c["num_experts_per_tok"] = m.moe.active_experts();
    c["router_aux_loss_coef"] = m.moe.applied_aux_loss_weight();
    c["output_router_logits"] = false;
    c["sliding_window"] = nullptr;
  }
  write_file_atomic((fs::path(dir) / "config.json").string(), c.dump(2) + "\n");
  ordered_json gen;
  if (vocab.bos_id >= 0) gen["bos_token_id"] = vocab.bos_id;
  if (vocab.eos_id >= 0) gen["eos_token_id"] = vocab.eos_id;
  gen["do_sample"] = false;
  write_file_atomic((fs::path(dir) / "generation_config.json").string(), gen.dump(2) + "\n");
  write_file_atomic((fs::path(dir) / "tokenizer.model").string(), read_file(model.tokenizer_path, "tokenizer model"));
  ordered_json tc;
  tc["tokenizer_class"] = "LlamaTokenizer";
  tc["add_bos_token"] = false;  // moelab's documents start with their first token
  tc["add_eos_token"] = false;
  tc["bos_token"] = vocab.bos_id >= 0 ? vocab.pieces[vocab.bos_id] : "<s>";
  tc["eos_token"] = vocab.eos_id >= 0 ? vocab.pieces[vocab.eos_id] : "</s>";
  tc["unk_token"] = vocab.unk_id >= 0 ? vocab.pieces[vocab.unk_id] : "<unk>";
  tc["pad_token"] = nullptr;
  tc["model_max_length"] = m.seq_len;
  // So that LlamaTokenizer and LlamaTokenizerFast give moelab's ids (docs/export.md, "Tokenizer"): legacy mode
  // (the slow tokenizer runs the SentencePiece model as it is; the fast one replaces spaces by "▁"), a "▁" in
  // front only where the model adds one itself, and "</s>" or "<s>" in text read as text, as moelab reads it.
  tc["legacy"] = true;
  tc["add_prefix_space"] = normalizer.add_dummy_prefix;
  tc["split_special_tokens"] = true;
  tc["clean_up_tokenization_spaces"] = false;
  write_file_atomic((fs::path(dir) / "tokenizer_config.json").string(), tc.dump(2) + "\n");
}

bool is_hf_directory(const std::string& dir) {
  return fs::is_directory(dir) && fs::exists(fs::path(dir) / "config.json") &&
         (fs::exists(fs::path(dir) / "model.safetensors") || fs::exists(fs::path(dir) / "model.safetensors.index.json"));
}

HfWeights read_hf(const std::string& dir) {
  const fs::path d(dir);
  json c;
  try {
    c = json::parse(read_file((d / "config.json").string(), "Hugging Face config"));
  } catch (const json::exception& e) {
    throw Error("'" + (d / "config.json").string() + "' is not valid JSON: " + e.what());
  }
  HfWeights w;
  const auto archs = c.value("architectures", std::vector<std::string>{});
  w.architecture = archs.empty() ? c.value("model_type", std::string()) : archs[0];
  const bool mixtral = w.architecture == "MixtralForCausalLM";
  if (w.architecture != "LlamaForCausalLM" && !mixtral)
    throw Error("'" + dir + "' holds a " + (w.architecture.empty() ? std::string("model of no named architecture")
                                                                   : w.architecture) +
                "; moelab reads LlamaForCausalLM and MixtralForCausalLM directories");
  const auto need = [&](const char* key) {
    if (!c.contains(key) || !c[key].is_number())
      throw Error("'" + (d / "config.json").string() + "' lacks the number '" + key + "'");
    return c[key].get<int64_t>();
  };
  const int64_t L = need("num_hidden_layers"), C = need("hidden_size"), H = need("num_attention_heads");
  const int64_t kv = c.value("num_key_value_heads", H);
  if (kv != H)
    throw Error("'" + dir + "' uses grouped-query attention (num_key_value_heads = " + std::to_string(kv) +
                " of " + std::to_string(H) + " heads); moelab's attention has one key and value head per query head");
  if (c.contains("head_dim") && c["head_dim"].is_number() && c["head_dim"].get<int64_t>() * H != C)
    throw Error("'" + dir + "' has head_dim * num_attention_heads != hidden_size; moelab needs them equal");
  const std::string act = c.value("hidden_act", std::string("silu"));
  if (act != "silu") throw Error("'" + dir + "' uses hidden_act = '" + act + "'; moelab's SwiGLU is silu");
  if (c.value("attention_bias", false) || c.value("mlp_bias", false))
    throw Error("'" + dir + "' has biases on its linear layers; Llama/Mixtral as moelab reads them have none");
  if (c.contains("rope_scaling") && !c["rope_scaling"].is_null())
    throw Error("'" + dir + "' uses rope_scaling; moelab's RoPE is unscaled");
  // transformers' defaults where config.json is silent (MixtralConfig: theta 1e6, eps 1e-5; LlamaConfig: 1e4, 1e-6)
  w.rope_theta = c.value("rope_theta", mixtral ? 1e6 : 10000.0);
  w.rms_norm_eps = c.value("rms_norm_eps", mixtral ? 1e-5 : 1e-6);
  w.tied = c.value("tie_word_embeddings", false);
  const int64_t E = mixtral ? need("num_local_experts") : 0;
  if (mixtral) w.experts_per_token = need("num_experts_per_tok");

  // Every tensor of the directory: one file, or the shards an index names.
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, const SafetensorsFile*> where;
  if (fs::exists(d / "model.safetensors")) {
    files.push_back(std::make_unique<SafetensorsFile>((d / "model.safetensors").string()));
  } else {
    const json index = json::parse(read_file((d / "model.safetensors.index.json").string(), "safetensors index"));
    std::set<std::string> shards;
    for (const auto& [name, file] : index.at("weight_map").items()) shards.insert(file.get<std::string>());
    for (const auto& s : shards) files.push_back(std::make_unique<SafetensorsFile>((d / s).string()));
  }
  std::set<std::string> unused;
  for (const auto& f : files)
    for (const auto& n : f->names()) where[n] = f.get(), unused.insert(n);
  const auto read = [&](const std::string& name) {
    const auto it = where.find(name);
    if (it == where.end()) throw Error("'" + dir + "' has no tensor '" + name + "' (a " + w.architecture + " needs it)");
    const Shape s = it->second->shape(name);
    std::vector<float> v(static_cast<size_t>(s.numel()));
    it->second->read(name, s, v.data());
    unused.erase(name);
    return std::make_pair(s, v);
  };
  const auto expect = [&](const std::string& name, const std::pair<Shape, std::vector<float>>& t, Shape want) {
    if (!(t.first == want))
      throw Error("'" + dir + "': tensor '" + name + "' has shape " + t.first.str() + " but config.json implies " +
                  want.str());
  };
  const auto concat = [](std::initializer_list<const std::vector<float>*> parts) {
    std::vector<float> out;
    for (const auto* p : parts) out.insert(out.end(), p->begin(), p->end());
    return out;
  };
  auto emb = read("model.embed_tokens.weight");
  const int64_t V = emb.first[0];
  expect("model.embed_tokens.weight", emb, {V, C});
  w.tensors[param_name::kTokEmb] = emb;
  for (int64_t i = 0; i < L; ++i) {
    const std::string h = hf_layer(i);
    const auto p = [i](const char* name) { return block_param_name(i, name); };
    w.tensors[p(param_name::kNorm1)] = read(h + "input_layernorm.weight");
    auto q = read(h + "self_attn.q_proj.weight"), k = read(h + "self_attn.k_proj.weight"),
         v = read(h + "self_attn.v_proj.weight");
    expect(h + "self_attn.q_proj.weight", q, {C, C});
    expect(h + "self_attn.k_proj.weight", k, {C, C});
    expect(h + "self_attn.v_proj.weight", v, {C, C});
    w.tensors[p(param_name::kQkv)] = {{3 * C, C}, concat({&q.second, &k.second, &v.second})};
    w.tensors[p(param_name::kOut)] = read(h + "self_attn.o_proj.weight");
    w.tensors[p(param_name::kNorm2)] = read(h + "post_attention_layernorm.weight");
    if (!mixtral) {
      auto gate = read(h + "mlp.gate_proj.weight"), up = read(h + "mlp.up_proj.weight");
      const int64_t F = gate.first[0];
      expect(h + "mlp.up_proj.weight", up, {F, C});
      w.tensors[p(param_name::kFc1)] = {{2 * F, C}, concat({&gate.second, &up.second})};
      w.tensors[p(param_name::kFc2)] = read(h + "mlp.down_proj.weight");
      continue;
    }
    w.tensors[p(param_name::kRouter)] = read(h + "block_sparse_moe.gate.weight");
    std::vector<float> fc1, fc2;
    int64_t F = 0;
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = h + "block_sparse_moe.experts." + std::to_string(e) + ".";
      auto w1 = read(x + "w1.weight"), w3 = read(x + "w3.weight"), w2 = read(x + "w2.weight");
      F = w1.first[0];
      expect(x + "w3.weight", w3, {F, C});
      expect(x + "w2.weight", w2, {C, F});
      fc1.insert(fc1.end(), w1.second.begin(), w1.second.end());
      fc1.insert(fc1.end(), w3.second.begin(), w3.second.end());
      fc2.insert(fc2.end(), w2.second.begin(), w2.second.end());
    }
    w.tensors[p(param_name::kExpertsFc1)] = {{E, 2 * F, C}, fc1};
    w.tensors[p(param_name::kExpertsFc2)] = {{E, C, F}, fc2};
  }
  w.tensors[param_name::kFinalNorm] = read("model.norm.weight");
  if (where.count("lm_head.weight")) {
    auto head = read("lm_head.weight");
    // A tied model's saved head is the embedding again: nothing of its own.
    if (!(w.tied && head.second == w.tensors[param_name::kTokEmb].second)) w.tensors[param_name::kLmHead] = head;
    else w.tied = true;
  } else if (!w.tied) {
    throw Error("'" + dir + "' has no tensor 'lm_head.weight' and config.json says tie_word_embeddings = false");
  }
  for (const auto& n : unused)
    if (n.find("rotary_emb.inv_freq") == std::string::npos)
      throw Error("'" + dir + "': tensor '" + n + "' has no place in a " + w.architecture + " as moelab reads it");
  return w;
}

}  // namespace moelab
