// Export and import (docs/export.md): what does not map is refused by name; a Hugging Face export imports back
// bitwise; the Hugging Face fixtures (tests/fixtures/gen_hf_fixtures.py, a float64 re-implementation of
// transformers' Llama and Mixtral forwards) import with the reference logits and export back to the same tensors;
// GGUF files are well formed; and llama.cpp itself (node-llama-cpp, tests/llama/compare.mjs) reproduces moelab's
// next-token distributions and greedy continuations for a dense model, a Mixtral-layout MoE and a DeepSeek-layout
// MoE.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "core/safetensors.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "eval/generate.h"
#include "formats/formats.h"
#include "train/trainer.h"
#include "test_util.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::temp_dir;

using testing::error_of;

// A SentencePiece model of 320 pieces and a token shard, both from the repository's own docs (real text).
struct Corpus {
  std::string tokenizer, tokens;
};
Corpus make_corpus(const fs::path& dir) {
  Corpus c;
  c.tokenizer = (dir / "tokenizer.model").string();
  const std::vector<std::string> docs = {std::string(MOELAB_SOURCE_DIR) + "/docs"};
  TokenizerTrainOptions o;
  o.vocab_size = 320;
  o.character_coverage = 0.98;  // the docs' rarer characters fall back to byte pieces
  train_tokenizer(docs, c.tokenizer, o);
  const Tokenizer tok(c.tokenizer);
  c.tokens = (dir / "train.bin").string();
  ShardWriter w(c.tokens, tok.vocab_size());
  for (const auto& f : list_input_files(docs)) w.append(tok.encode(read_file(f, "doc")));
  w.finish();
  return c;
}

std::vector<std::string> swiglu_model(const Corpus& c, std::vector<std::string> extra = {}) {
  std::vector<std::string> o = {"model.vocab_size=320", "model.d_model=32",  "model.n_layers=2",
                                "model.n_heads=4",      "model.seq_len=48",  "model.ffn=swiglu",
                                "train.batch_size=8",   "train.steps=60",    "train.warmup_steps=5",
                                "train.lr=0.01",        "train.threads=2",   "data.tokenizer=" + c.tokenizer};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}

// Trains `steps` steps and saves the checkpoint of a run directory.
void train_and_save(const Config& config, const Corpus& c, const fs::path& run, int steps) {
  auto be = make_backend("cpu", 2);
  Trainer t(config, *be);
  TokenFile data(c.tokens, "uint16");
  for (int s = 0; s < steps; ++s) t.step(data);
  fs::create_directories(run);
  write_file_atomic((run / "config.toml").string(), to_toml(config));
  t.save((run / "checkpoint").string());
}

std::vector<float> params_of(Trainer& t) {
  return t.model().backend().download_vector(std::as_const(t.model()).params(), t.model().num_params());
}

class ExportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(temp_dir("export"));
    corpus_ = new Corpus(make_corpus(*dir_));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete corpus_;
  }
  static fs::path* dir_;
  static Corpus* corpus_;
};
fs::path* ExportTest::dir_ = nullptr;
Corpus* ExportTest::corpus_ = nullptr;

TEST_F(ExportTest, WhatDoesNotMapIsRefusedByName) {
  const auto gguf = [&](std::vector<std::string> extra) {
    return error_of([&] { gguf_architecture(config_from_string("", swiglu_model(*corpus_, extra)).model); });
  };
  const auto hf = [&](std::vector<std::string> extra) {
    return error_of([&] { hf_architecture(config_from_string("", swiglu_model(*corpus_, extra)).model); });
  };
  EXPECT_NE(gguf({"model.ffn=gelu"}).find("model.ffn = \"gelu\""), std::string::npos);
  EXPECT_NE(gguf({"model.norm=layernorm"}).find("model.norm"), std::string::npos);
  EXPECT_NE(gguf({"model.pos=learned"}).find("model.pos"), std::string::npos);
  EXPECT_NE(gguf({"model.bias=true"}).find("model.bias"), std::string::npos);
  EXPECT_NE(gguf({"model.qk_norm=true"}).find("model.qk_norm"), std::string::npos);
  const std::vector<std::string> moe = {"moe.experts=4", "moe.top_k=2", "moe.renormalize=true"};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> o = moe;
    o.insert(o.end(), extra.begin(), extra.end());
    return o;
  };
  EXPECT_NE(gguf(with({"moe.router=expert_choice", "moe.capacity_factor=1"})).find("moe.router"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.score=sigmoid"})).find("moe.score"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.balance=bias"})).find("moe.balance"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.capacity_factor=1.25"})).find("moe.capacity_factor"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.every=2"})).find("moe.every"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.shared_experts=1"})).find("moe.shared_experts"), std::string::npos);
  EXPECT_NE(gguf(with({"moe.renormalize=false"})).find("moe.renormalize = false"), std::string::npos);
  EXPECT_EQ(gguf_architecture(config_from_string("", swiglu_model(*corpus_, with({}))).model), "llama");
  EXPECT_EQ(gguf_architecture(config_from_string("", swiglu_model(*corpus_, with({"moe.renormalize=false",
      "moe.shared_experts=1", "moe.first_dense=1", "moe.gate_scale=2"}))).model), "deepseek");
  EXPECT_NE(hf(with({"moe.shared_experts=1"})).find("moe.shared_experts"), std::string::npos);
  EXPECT_NE(hf(with({"moe.first_dense=1"})).find("moe.first_dense"), std::string::npos);
  EXPECT_NE(hf(with({"moe.renormalize=false"})).find("moe.renormalize"), std::string::npos);
  EXPECT_EQ(hf_architecture(config_from_string("", swiglu_model(*corpus_, with({}))).model), "MixtralForCausalLM");
  EXPECT_EQ(hf_architecture(config_from_string("", swiglu_model(*corpus_)).model), "LlamaForCausalLM");
}

// moelab export --format hf, then train.init_from of that directory: the same parameters, bit for bit.
TEST_F(ExportTest, HuggingFaceExportImportsBackBitwise) {
  for (const auto& extra : std::vector<std::vector<std::string>>{
           {}, {"model.tied_embeddings=false", "moe.experts=4", "moe.top_k=2", "moe.renormalize=true"}}) {
    const Config config = config_from_string("", swiglu_model(*corpus_, extra));
    const fs::path run = *dir_ / ("hf_run" + std::to_string(extra.size())), out = *dir_ / ("hf" + std::to_string(extra.size()));
    train_and_save(config, *corpus_, run, 10);
    const std::string cmd = std::string(MOELAB_BINARY) + " export -k " + run.string() + " --format hf --out " +
                            out.string() + " > /dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    for (const char* f : {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
                          "tokenizer_config.json"})
      EXPECT_TRUE(fs::exists(out / f)) << f;
    auto be = make_backend("cpu", 2);
    Trainer original(config, *be), imported(config, *be);
    original.load((run / "checkpoint").string());
    imported.init_from(out.string());
    EXPECT_EQ(params_of(imported), params_of(original));
  }
  // A dense Hugging Face model upcycles into an MoE like a dense checkpoint does.
  auto be = make_backend("cpu", 2);
  Trainer moe(config_from_string("", swiglu_model(*corpus_, {"moe.experts=4", "moe.top_k=1"})), *be);
  EXPECT_EQ(moe.init_from((*dir_ / "hf0").string()).upcycled, 4);
  // Mismatches name what differs.
  Trainer other(config_from_string("", swiglu_model(*corpus_, {"model.rope_theta=500000"})), *be);
  EXPECT_NE(error_of([&] { other.init_from((*dir_ / "hf0").string()); }).find("rope_theta"), std::string::npos);
  Trainer wide(config_from_string("", swiglu_model(*corpus_, {"model.d_ff=256"})), *be);
  EXPECT_NE(error_of([&] { wide.init_from((*dir_ / "hf0").string()); }).find("layers.0.ffn.fc1.weight"),
            std::string::npos);
}

// The fixtures hold transformers' layout and a float64 forward written from transformers' source.
TEST_F(ExportTest, HuggingFaceFixturesImportWithTheReferenceLogitsAndExportBack) {
  const fs::path fixtures = fs::path(MOELAB_FIXTURE_DIR) / "hf";
  const json ref = json::parse(read_file((fixtures / "reference.json").string(), "fixture"));
  const auto tokens2d = ref["tokens"].get<std::vector<std::vector<int32_t>>>();
  std::vector<int32_t> tokens;
  for (const auto& row : tokens2d) tokens.insert(tokens.end(), row.begin(), row.end());
  const std::vector<std::string> common = {"model.vocab_size=300", "model.d_model=32", "model.n_layers=2",
                                           "model.n_heads=4",      "model.d_ff=64",    "model.seq_len=16",
                                           "model.ffn=swiglu",     "model.norm_eps=1e-5", "train.batch_size=2",
                                           "train.threads=2"};
  for (const std::string which : {"llama", "mixtral"}) {
    std::vector<std::string> o = common;
    if (which == "mixtral")
      for (const char* x : {"model.tied_embeddings=false", "moe.experts=4", "moe.top_k=2", "moe.renormalize=true"})
        o.push_back(x);
    const Config config = config_from_string("", o);
    auto be = make_backend("cpu", 2);
    Trainer t(config, *be);
    t.init_from((fixtures / which).string());
    t.model().forward(tokens.data(), nullptr, 2);
    const std::vector<float> logits = t.model().download_logits();
    std::vector<double> want;
    for (const auto& seq : ref[which]["logits"])
      for (const auto& pos : seq)
        for (double v : pos) want.push_back(v);
    ASSERT_EQ(want.size(), logits.size());
    double scale = 0, worst = 0;
    for (double v : want) scale = std::max(scale, std::fabs(v));
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(logits[i] - want[i]));
    std::printf("transformers-layout %s fixture vs moelab: max |logit difference| %.3g (largest logit %.3g)\n",
                which.c_str(), worst, scale);
    EXPECT_LT(worst, 2e-5 * scale) << which << ": worst logit difference " << worst << " (largest logit " << scale
                                   << ")";
    // Back out: the same tensors under the same names (the fixture has no tokenizer: one of vocabulary 300).
    ExportModel m;
    m.config = config;
    m.params = params_of(t);
    const fs::path tok = *dir_ / "tok300";
    fs::create_directories(tok);
    TokenizerTrainOptions opts;
    opts.vocab_size = 300;
    if (!fs::exists(tok / "tokenizer.model")) {  // a text of few distinct characters, so 300 pieces hold them
      std::string text;
      Rng rng(9);
      for (int i = 0; i < 20000; ++i) text += std::string(1, static_cast<char>('a' + rng.below(12))) + (i % 7 ? "" : " ");
      write_file_atomic((tok / "text.txt").string(), text + "\n");
      train_tokenizer({(tok / "text.txt").string()}, (tok / "tokenizer.model").string(), opts);
    }
    m.tokenizer_path = (tok / "tokenizer.model").string();
    const fs::path out = *dir_ / ("fixture_" + which);
    export_hf(m, out.string());
    const SafetensorsFile original((fixtures / which / "model.safetensors").string()),
        exported((out / "model.safetensors").string());
    EXPECT_EQ(exported.names(), original.names());
    for (const auto& name : original.names()) {
      const Shape s = original.shape(name);
      ASSERT_EQ(exported.shape(name), s) << name;
      std::vector<float> a(s.numel()), b(s.numel());
      original.read(name, s, a.data());
      exported.read(name, s, b.data());
      EXPECT_EQ(a, b) << name;
    }
    const json c = json::parse(read_file((out / "config.json").string(), "config"));
    const json c0 = json::parse(read_file((fixtures / which / "config.json").string(), "config"));
    for (const char* key : {"architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
                            "rms_norm_eps", "rope_theta"})
      EXPECT_EQ(c[key], c0[key]) << key;
  }
}

// An independent reading of the GGUF bytes: header, keys, tensor table, alignment, and the tensors' values.
struct Gguf {
  std::string bytes;
  size_t at = 0;
  std::map<std::string, json> kv;
  struct Info {
    std::vector<int64_t> ne;
    int32_t type;
    uint64_t offset;
  };
  std::vector<std::pair<std::string, Info>> tensors;
  size_t data_start = 0;
  template <class T>
  T get() {
    T v;
    std::memcpy(&v, bytes.data() + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    std::string s = bytes.substr(at, n);
    at += n;
    return s;
  }
  json value(int32_t type) {
    switch (type) {
      case 4: return get<uint32_t>();
      case 5: return get<int32_t>();
      case 6: return get<float>();
      case 7: return get<int8_t>() != 0;
      case 8: return str();
      case 9: {
        const int32_t t = get<int32_t>();
        const uint64_t n = get<uint64_t>();
        json a = json::array();
        for (uint64_t i = 0; i < n; ++i) a.push_back(value(t));
        return a;
      }
    }
    throw std::runtime_error("GGUF value type " + std::to_string(type));
  }
  explicit Gguf(const std::string& path) : bytes(read_file(path, "gguf")) {
    if (bytes.substr(0, 4) != "GGUF") throw std::runtime_error("magic");
    at = 4;
    if (get<uint32_t>() != 3) throw std::runtime_error("version");
    const uint64_t nt = get<uint64_t>(), nkv = get<uint64_t>();
    for (uint64_t i = 0; i < nkv; ++i) {
      const std::string key = str();
      kv[key] = value(get<int32_t>());
    }
    for (uint64_t i = 0; i < nt; ++i) {
      Info info;
      const std::string name = str();
      const uint32_t dims = get<uint32_t>();
      for (uint32_t d = 0; d < dims; ++d) info.ne.push_back(get<int64_t>());
      info.type = get<int32_t>();
      info.offset = get<uint64_t>();
      tensors.push_back({name, info});
    }
    data_start = (at + 31) / 32 * 32;
  }
  std::vector<float> f32(const std::string& name) const {
    for (const auto& [n, info] : tensors)
      if (n == name) {
        int64_t count = 1;
        for (int64_t d : info.ne) count *= d;
        std::vector<float> v(count);
        std::memcpy(v.data(), bytes.data() + data_start + info.offset, count * 4);
        return v;
      }
    throw std::runtime_error("no tensor " + name);
  }
};

TEST_F(ExportTest, GgufIsWellFormed) {
  const Config config = config_from_string(
      "", swiglu_model(*corpus_, {"moe.experts=4", "moe.top_k=2", "moe.shared_experts=1", "moe.first_dense=1",
                                  "model.n_layers=3"}));
  const fs::path run = *dir_ / "gguf_run";
  train_and_save(config, *corpus_, run, 2);
  // --out into directories that do not exist yet: created, as `moelab export --help` says.
  const std::string path = (*dir_ / "new" / "nested" / "ds.gguf").string();
  const std::string cmd = std::string(MOELAB_BINARY) + " export -k " + run.string() + " --format gguf --out " + path +
                          " > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const std::string help = (*dir_ / "export_help.txt").string();
  ASSERT_EQ(std::system((std::string(MOELAB_BINARY) + " export --help > " + help).c_str()), 0);
  EXPECT_NE(read_file(help, "help").find("missing parent directories are created"), std::string::npos);
  const Gguf g(path);
  EXPECT_EQ(g.kv.at("general.architecture"), "deepseek");
  EXPECT_EQ(g.kv.at("deepseek.block_count"), 3);
  EXPECT_EQ(g.kv.at("deepseek.leading_dense_block_count"), 1);
  EXPECT_EQ(g.kv.at("deepseek.expert_shared_count"), 1);
  EXPECT_EQ(g.kv.at("deepseek.expert_count"), 4);
  EXPECT_EQ(g.kv.at("deepseek.expert_used_count"), 2);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.tokens").size(), 320u);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.eos_token_id"), 2);
  // moelab's tokenizers add no space in front of a text and keep every space: llama.cpp must be told both.
  EXPECT_EQ(g.kv.at("tokenizer.ggml.add_space_prefix"), false);
  EXPECT_EQ(g.kv.at("tokenizer.ggml.remove_extra_whitespaces"), false);
  // Offsets: each tensor right after the previous one, padded to 32 bytes; the file ends padded.
  uint64_t expect = 0;
  for (const auto& [name, info] : g.tensors) {
    EXPECT_EQ(info.offset, expect) << name;
    int64_t count = 1;
    for (int64_t d : info.ne) count *= d;
    expect += (count * 4 + 31) / 32 * 32;
  }
  EXPECT_EQ(g.data_start + expect, g.bytes.size());
  EXPECT_EQ(g.tensors.size(), 1u + 6 * 3 + 3 + 4 * 2 + 3 * 2 + 1);  // embed; attention+norms; dense; MoE; shared; norm
  // Values: the embedding as is; q's rows interleaved for llama.cpp's RoPE pairs.
  auto be = make_backend("cpu", 2);
  Trainer t(config, *be);
  t.load((run / "checkpoint").string());
  const std::vector<float> p = params_of(t);
  const ParamLayout layout(config.model);
  const auto emb = g.f32("token_embd.weight");
  EXPECT_TRUE(std::equal(emb.begin(), emb.end(), p.begin() + layout.find("tok_emb.weight").offset));
  const auto q = g.f32("blk.1.attn_q.weight");
  const int64_t C = 32, hd = 8, qkv = layout.find("layers.1.attn.qkv.weight").offset;
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t j = 0; j < hd / 2; ++j)
      for (int64_t c = 0; c < C; ++c) {
        ASSERT_EQ(q[(h * hd + 2 * j) * C + c], p[qkv + (h * hd + j) * C + c]);
        ASSERT_EQ(q[(h * hd + 2 * j + 1) * C + c], p[qkv + (h * hd + hd / 2 + j) * C + c]);
      }
  // f16 and bf16 files hold the matrices at 2 bytes and the norms at 4.
  for (const char* dtype : {"f16", "bf16"}) {
    const std::string half = (*dir_ / (std::string(dtype) + ".gguf")).string();
    ASSERT_EQ(std::system((std::string(MOELAB_BINARY) + " export -k " + run.string() + " --format gguf --dtype " +
                           dtype + " --out " + half + " > /dev/null").c_str()), 0);
    const Gguf h(half);
    for (const auto& [name, info] : h.tensors)
      EXPECT_EQ(info.type, info.ne.size() == 1 || name.find("gate_inp") != std::string::npos ? 0
                           : std::string(dtype) == "f16"                                  ? 1
                                                                                          : 30)
          << name;
  }
}

// ---- llama.cpp as the client --------------------------------------------------------------------------------------

struct LlamaOutput {
  std::vector<std::vector<double>> logprobs;
  std::vector<int32_t> greedy;
};

LlamaOutput run_llama(const std::string& gguf, const std::vector<int32_t>& tokens, const std::vector<int32_t>& prompt,
                      int n, const fs::path& dir) {
  const std::string script = std::string(MOELAB_SOURCE_DIR) + "/tests/llama/compare.mjs";
  const fs::path input = dir / "llama_in.json", output = dir / "llama_out.json";
  write_file_atomic(input.string(), json{{"tokens", tokens}, {"prompt", prompt}, {"n", n}}.dump());
  if (!fs::exists(std::string(MOELAB_SOURCE_DIR) + "/tests/llama/node_modules/node-llama-cpp/package.json"))
    throw Error("node-llama-cpp is not installed in tests/llama: scripts/install-deps.sh installs it (npm i -E "
                "node-llama-cpp@3.21.1); this test needs llama.cpp and does not pass without it");
  const std::string cmd = "node " + script + " " + gguf + " " + input.string() + " > " + output.string();
  const int rc = std::system(cmd.c_str());
  if (rc != 0) throw Error("llama.cpp run failed (" + std::to_string(rc) + "): " + cmd);
  const json j = json::parse(read_file(output.string(), "llama.cpp output"));
  return {j["logprobs"].get<std::vector<std::vector<double>>>(), j["greedy"].get<std::vector<int32_t>>()};
}

// moelab's log-probabilities of every position of `tokens` (one sequence, padded to seq_len).
std::vector<std::vector<double>> moelab_logprobs(Transformer& model, const std::vector<int32_t>& tokens) {
  const int64_t T = model.config().seq_len, V = model.config().vocab_size;
  std::vector<int32_t> padded(T, 0);
  std::copy(tokens.begin(), tokens.end(), padded.begin());
  model.forward(padded.data(), nullptr, 1);
  const std::vector<float> logits = model.download_logits();
  std::vector<std::vector<double>> out;
  for (size_t t = 0; t < tokens.size(); ++t) {
    const float* z = logits.data() + t * V;
    double mx = -1e300, sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(z[v]));
    for (int64_t v = 0; v < V; ++v) sum += std::exp(z[v] - mx);
    std::vector<double> row(V);
    for (int64_t v = 0; v < V; ++v) row[v] = z[v] - mx - std::log(sum);
    out.push_back(row);
  }
  return out;
}

std::vector<int32_t> moelab_greedy(Transformer& model, std::vector<int32_t> prompt, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    const auto lp = moelab_logprobs(model, prompt);
    const auto& last = lp.back();
    const int32_t next = static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
    out.push_back(next);
    prompt.push_back(next);
  }
  return out;
}

TEST_F(ExportTest, LlamaCppReproducesNextTokenProbabilities) {
  const TokenFile data(corpus_->tokens, "uint16");
  // A held-out stretch: the last 40 tokens of the corpus (the models trained on random windows of 48).
  std::vector<int32_t> text(40);
  for (int i = 0; i < 40; ++i) text[i] = static_cast<int32_t>(data.at(data.size() - 40 + i));
  const std::vector<int32_t> prompt(text.begin(), text.begin() + 8);
  struct Case {
    const char* name;
    std::vector<std::string> extra;
    const char* arch;
  };
  const std::vector<Case> cases = {
      {"dense", {}, "llama"},
      {"mixtral_layout", {"moe.experts=4", "moe.top_k=2", "moe.renormalize=true", "model.tied_embeddings=false"},
       "llama"},
      {"deepseek_layout",
       {"moe.experts=4", "moe.top_k=2", "moe.shared_experts=1", "moe.first_dense=1", "model.n_layers=3",
        "moe.gate_scale=1.5"},
       "deepseek"}};
  for (const Case& k : cases) {
    const Config config = config_from_string("", swiglu_model(*corpus_, k.extra));
    const fs::path run = *dir_ / (std::string("llama_") + k.name);
    train_and_save(config, *corpus_, run, 60);
    const std::string gguf = (run / "model.gguf").string();
    ExportModel m;
    m.config = config;
    {
      auto be = make_backend("cpu", 2);
      Trainer t(config, *be);
      t.load((run / "checkpoint").string());
      m.params = params_of(t);
    }
    m.tokenizer_path = corpus_->tokenizer;
    ASSERT_EQ(gguf_architecture(config.model), k.arch);
    export_gguf(m, gguf, GgufDtype::F32);
    const LlamaOutput llama = run_llama(gguf, text, prompt, 32, run);

    auto be = make_backend("cpu", 2);
    Trainer t(config, *be);
    t.load((run / "checkpoint").string());
    const auto ours = moelab_logprobs(t.model(), text);
    ASSERT_EQ(llama.logprobs.size(), ours.size());
    // The measure: the largest |log p difference| over every position and every token that either side gives
    // p > 1e-6 (smaller ones underflow in llama.cpp's float32 probabilities).
    double worst = 0;
    for (size_t pos = 0; pos < ours.size(); ++pos)
      for (size_t v = 0; v < ours[pos].size(); ++v)
        if (ours[pos][v] > std::log(1e-6) || llama.logprobs[pos][v] > std::log(1e-6))
          worst = std::max(worst, std::fabs(ours[pos][v] - llama.logprobs[pos][v]));
    std::printf("llama.cpp vs moelab, %s (%s): max |log p difference| %.3g over %zu positions\n", k.name, k.arch,
                worst, ours.size());
    EXPECT_LT(worst, 1e-4) << k.name;
    EXPECT_EQ(llama.greedy, moelab_greedy(t.model(), prompt, 32)) << k.name << ": greedy continuations differ";
  }
}

// ---- llama.cpp from text, as its users run it ---------------------------------------------------------------------

struct LlamaTextOutput {
  std::vector<std::vector<int32_t>> tokenized;
  std::vector<int32_t> prompt, greedy;
  std::string greedy_text;
};

LlamaTextOutput run_llama_text(const std::string& gguf, const std::vector<std::string>& texts,
                               const std::string& prompt, int n, const std::string& kv, const fs::path& dir) {
  const std::string script = std::string(MOELAB_SOURCE_DIR) + "/tests/llama/compare.mjs";
  const fs::path input = dir / ("llama_text_" + kv + ".json"), output = dir / ("llama_text_out_" + kv + ".json");
  write_file_atomic(input.string(), json{{"texts", texts}, {"prompt_text", prompt}, {"n", n}, {"kv", kv}}.dump());
  const std::string cmd = "node " + script + " " + gguf + " " + input.string() + " > " + output.string();
  const int rc = std::system(cmd.c_str());
  if (rc != 0) throw Error("llama.cpp run failed (" + std::to_string(rc) + "): " + cmd);
  const json j = json::parse(read_file(output.string(), "llama.cpp output"));
  return {j["tokenized"].get<std::vector<std::vector<int32_t>>>(), j["prompt"].get<std::vector<int32_t>>(),
          j["greedy"].get<std::vector<int32_t>>(), j["greedy_text"].get<std::string>()};
}

// What `moelab generate` prints on stdout.
std::string moelab_generate_stdout(const fs::path& run, const std::string& prompt, int n) {
  const fs::path prompt_file = run / "prompt.txt", out = run / "generate.out";
  write_file_atomic(prompt_file.string(), prompt);
  // The prompt through a file and $(cat): newlines and quotes reach the binary as they are.
  const std::string cmd = std::string(MOELAB_BINARY) + " generate -k " + run.string() + " --prompt \"$(cat " +
                          prompt_file.string() + ")\" -n " + std::to_string(n) + " -t 0 --threads 2 > " +
                          out.string() + " 2> /dev/null";
  if (std::system(cmd.c_str()) != 0) throw Error("moelab generate failed: " + cmd);
  return read_file(out.string(), "generate output");
}

// Held-out documents (none is in the tokenizer's or the model's training text, docs/), each with something a
// tokenizer can get wrong: the first piece, leading and repeated spaces, newlines, tabs, digits, non-ASCII,
// characters outside the vocabulary (byte fallback), control-token text, a literal "▁".
std::vector<std::string> held_out_texts() {
  std::vector<std::string> texts = {
      "The hacker wrote a program that",
      "  Two leading spaces, then\nnew lines\n\n\tand a tab.\n",
      "Digits: 1874, 3.14159 and 2048 pieces; 007.",
      "Non-ASCII: caf\u00e9, na\u00efve, Gr\u00f6\u00dfe, \u65e5\u672c\u8a9e, \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac.",
      "Byte fallback: \U0001F642 \U0001F680 \u203d \u2603 and a control byte \x01.",
      "Spaces   repeated    and trailing   ",
      "Literal control text </s> <s> <unk> stays text.",
      "\n starts with a newline",
      " starts with a space",
      "a literal \u2581 block and \u2581\u2581 two",
  };
  // A longer stretch of real prose: the README's opening, markdown and code blocks included.
  texts.push_back(read_file(std::string(MOELAB_SOURCE_DIR) + "/README.md", "README").substr(0, 3000));
  return texts;
}

TEST_F(ExportTest, LlamaCppFromTextGivesMoelabsIdsAndGreedyText) {
  // A SwiGLU MoE, 8 experts, top-2, weights renormalised (llama.cpp's `llama` architecture), trained long enough
  // (400 steps) that its greedy text varies: " the toke the tonenthe ton the t" rather than " the the the".
  const Config config = config_from_string(
      "", swiglu_model(*corpus_, {"moe.experts=8", "moe.top_k=2", "moe.renormalize=true", "model.seq_len=96",
                                  "model.d_model=64", "train.steps=400"}));
  const fs::path run = *dir_ / "llama_text";
  train_and_save(config, *corpus_, run, config.train.steps);
  const std::string gguf = (run / "model.gguf").string();
  ASSERT_EQ(std::system((std::string(MOELAB_BINARY) + " export -k " + run.string() + " --format gguf --out " + gguf +
                         " > /dev/null").c_str()),
            0);
  const Tokenizer tokenizer(corpus_->tokenizer);
  const std::vector<std::string> texts = held_out_texts();
  const std::string prompt = "The hacker wrote a program that";
  constexpr int kTokens = 32;

  // moelab's greedy continuation in-process (the generator `moelab generate` runs), for the ids and the margins.
  auto be = make_backend("cpu", 2);
  Trainer t(config, *be);
  t.load((run / "checkpoint").string());
  const std::vector<int32_t> prompt_ids = tokenizer.encode(prompt);
  Generator generator(t.model());
  Rng rng(1);
  SamplingOptions greedy;
  greedy.temperature = 0;
  greedy.max_tokens = kTokens;
  greedy.stop_token = tokenizer.eos_id();
  const std::vector<int32_t> ours = generator.generate(prompt_ids, greedy, rng);
  std::vector<int32_t> ours_shown = ours;
  if (!ours_shown.empty() && ours_shown.back() == tokenizer.eos_id()) ours_shown.pop_back();
  const std::string binary_out = moelab_generate_stdout(run, prompt, kTokens);
  EXPECT_EQ(binary_out, prompt + tokenizer.decode(ours_shown) + "\n") << "moelab generate differs from its generator";

  for (const std::string kv : {"f32", "default"}) {
    const LlamaTextOutput llama = run_llama_text(gguf, texts, prompt, kTokens, kv, run);
    ASSERT_EQ(llama.tokenized.size(), texts.size());
    for (size_t i = 0; i < texts.size(); ++i)
      EXPECT_EQ(llama.tokenized[i], tokenizer.encode(texts[i])) << "llama.cpp tokenizes text " << i << " differently: "
                                                                << texts[i].substr(0, 80);
    EXPECT_EQ(llama.prompt, prompt_ids);
    // The greedy continuations, as ids and as the text each program prints.
    size_t same = 0;
    while (same < ours.size() && same < llama.greedy.size() && ours[same] == llama.greedy[same]) ++same;
    std::printf("llama.cpp (%s KV cache) vs moelab generate -t 0: %zu of %zu greedy tokens agree; moelab: \"%s\"\n",
                kv.c_str(), same, ours.size(), tokenizer.decode(ours_shown).c_str());
    if (kv == "f32" || same == ours.size()) {
      EXPECT_EQ(llama.greedy, ours) << kv;
      EXPECT_EQ(prompt + llama.greedy_text + "\n", binary_out) << kv;
      continue;
    }
    // llama.cpp's default cache rounds keys and values to F16, which may flip a near-tie: the continuations may
    // then part, but only where moelab's two best tokens are that close.
    std::vector<int32_t> context = prompt_ids;
    context.insert(context.end(), ours.begin(), ours.begin() + same);
    std::vector<float> logits;
    generator.reset();
    const float* z = nullptr;
    for (int32_t id : context) z = generator.step(id);
    std::vector<float> row(z, z + config.model.vocab_size);
    std::partial_sort(row.begin(), row.begin() + 2, row.end(), std::greater<float>());
    const double margin = row[0] - row[1];
    std::printf("  parted at token %zu: moelab's top-2 logit margin there %.3g\n", same, margin);
    EXPECT_LT(margin, 0.05) << "the continuations part where moelab's choice is not a near-tie";
  }
}

}  // namespace
}  // namespace moelab
