// The moelab executable end to end: data -> train -> run directory, and one clear message per user error.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace {

namespace fs = std::filesystem;

struct Result {
  int code;
  std::string output;
};

// A shell command's stdout alone (stderr is the command's to redirect).
Result run_stdout(const std::string& cmd) {
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  while (size_t n = fread(buf.data(), 1, buf.size(), pipe)) out.append(buf.data(), n);
  const int status = pclose(pipe);
  return {WEXITSTATUS(status), out};
}

// The moelab binary with `args`, stdout and stderr together.
Result run(const std::string& args) { return run_stdout(std::string(MOELAB_BINARY) + " " + args + " 2>&1"); }

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("moelab_cli_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }
  fs::path dir;
};

TEST_F(Cli, BytesThenTrainWritesRunDirectory) {
  // Real text: this repository's own sources.
  const std::string src = std::string(MOELAB_SOURCE_DIR) + "/src/config/config.cpp";
  Result r = run("data bytes " + src + " --out " + (dir / "train.bin").string() + " --val-out " +
                 (dir / "val.bin").string());
  ASSERT_EQ(r.code, 0) << r.output;
  const fs::path out = dir / "run";
  r = run("train --set data.train_path=" + (dir / "train.bin").string() + " --set data.val_path=" +
          (dir / "val.bin").string() +
          " --set model.vocab_size=256 --set model.d_model=32 --set model.n_layers=1 --set model.n_heads=2"
          " --set model.seq_len=32 --set train.batch_size=4 --set train.steps=20 --set train.warmup_steps=2"
          " --set train.log_every=10 --set train.threads=2 --set train.flops_convention=kaplan"
          " --set train.out_dir=" + out.string());
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("step     20/20"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("MFU"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("(kaplan)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("| eval | val "), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(out / "config.toml"));
  std::ifstream metrics(out / "metrics.jsonl");
  std::string line;
  int steps = 0;
  double first = 0, last = 0;
  double flops_per_token = 0, mfu = 0, cumulative = 0;
  while (std::getline(metrics, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("flops_per_token")) flops_per_token = j["flops_per_token"].get<double>();
    if (j.contains("mfu")) mfu = j["mfu"].get<double>();
    if (j.contains("flops")) cumulative = j["flops"].get<double>();
    if (!j.contains("loss")) continue;
    (steps == 0 ? first : last) = j["loss"].get<double>();
    ++steps;
  }
  EXPECT_EQ(steps, 20);
  // Kaplan: 6 N_nonembedding + 6 n_layers n_ctx d_model, N_nonembedding = one block of d_model 32 (RMSNorm,
  // no biases: 2*32 + 4*32*32 + 2*32*128 = 12,352) + the final norm (32) = 12,384
  // -> 6*12,384 + 6*1*32*32 = 80,448 FLOPs per token.
  EXPECT_DOUBLE_EQ(flops_per_token, 80448.0);
  EXPECT_DOUBLE_EQ(cumulative, 80448.0 * 20 * 4 * 32);
  EXPECT_GT(mfu, 0.0);
  EXPECT_LT(mfu, 1.0);
  EXPECT_LT(last, first);
  // The resolved config reproduces the run.
  r = run("config --print --config " + (out / "config.toml").string());
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("d_model = 32"), std::string::npos) << r.output;
}

TEST_F(Cli, UserErrorsGiveOneClearMessage) {
  Result r = run("train --set model.d_modl=3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("did you mean 'model.d_model'"), std::string::npos) << r.output;

  r = run("train --config " + (dir / "missing.toml").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("cannot open config file"), std::string::npos) << r.output;

  r = run("train --set data.train_path=" + (dir / "nope.bin").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("cannot open token file"), std::string::npos) << r.output;

  r = run("train");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("no training data"), std::string::npos) << r.output;

  std::ofstream(dir / "odd.bin") << "abc";  // 3 bytes: no shard header, and not whole uint16 tokens
  r = run("train --set data.train_path=" + (dir / "odd.bin").string());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("not a positive multiple"), std::string::npos) << r.output;

  // A byte-level shard (vocabulary 256) does not match a model vocabulary of 100.
  const std::string src = std::string(MOELAB_SOURCE_DIR) + "/src/config/config.cpp";
  ASSERT_EQ(run("data bytes " + src + " --out " + (dir / "t.bin").string()).code, 0);
  r = run("train --set data.train_path=" + (dir / "t.bin").string() + " --set model.vocab_size=100");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("vocabulary mismatch"), std::string::npos) << r.output;
}

TEST_F(Cli, HelpTeaches) {
  Result r = run("train --help");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.output.find("--set"), std::string::npos);
  EXPECT_NE(r.output.find("Example"), std::string::npos);
  r = run("config --list");
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.output.find("train.grad_clip"), std::string::npos);
}

TEST_F(Cli, GenerateStopsAtTheEndOfTextUnlessToldToIgnoreIt) {
  // Documents that always end the same way: a model learns that </s> follows "five." and says so greedily.
  {
    std::ofstream docs(dir / "docs.jsonl");
    for (int i = 0; i < 300; ++i) docs << "{\"text\": \"one two three four five.\"}\n";
  }
  const std::string tok = (dir / "tok.model").string();
  Result r = run("data train-tokenizer " + std::string(MOELAB_SOURCE_DIR) + "/docs --vocab 400 --out " + tok);
  ASSERT_EQ(r.code, 0) << r.output;
  r = run("data encode --tokenizer " + tok + " " + (dir / "docs.jsonl").string() + " --out " +
          (dir / "train.bin").string() + " -q");
  ASSERT_EQ(r.code, 0) << r.output;
  const fs::path out = dir / "eos_run";
  r = run("train --set data.train_path=" + (dir / "train.bin").string() + " --set data.tokenizer=" + tok +
          " --set model.vocab_size=400 --set model.d_model=32 --set model.n_layers=1 --set model.n_heads=2"
          " --set model.seq_len=32 --set train.batch_size=8 --set train.steps=150 --set train.lr=0.01"
          " --set train.warmup_steps=10 --set train.threads=2 --set train.out_dir=" + out.string());
  ASSERT_EQ(r.code, 0) << r.output;
  // stdout: the prompt and the continuation, without the end token; stderr: that it ended there.
  const std::string generate = std::string(MOELAB_BINARY) + " generate -k " + out.string() +
                               " -p 'one two three' -n 20 -t 0 --threads 2";
  const Result stdout_only = run_stdout(generate + " 2> /dev/null");
  ASSERT_EQ(stdout_only.code, 0);
  EXPECT_EQ(stdout_only.output, "one two three four five.\n");
  r = run("generate -k " + out.string() + " -p 'one two three' -n 20 -t 0 --threads 2");
  EXPECT_NE(r.output.find("[end of text: </s> after"), std::string::npos) << r.output;
  // --ignore-eos: the end token is never chosen, so the text goes on to all 20 tokens.
  const Result on = run_stdout(generate + " --ignore-eos 2> /dev/null");
  ASSERT_EQ(on.code, 0);
  EXPECT_EQ(on.output.rfind("one two three four five.", 0), 0u) << on.output;
  EXPECT_GT(on.output.size(), stdout_only.output.size() + 10) << on.output;
  r = run("generate --help");
  EXPECT_NE(r.output.find("--ignore-eos"), std::string::npos) << r.output;
}

}  // namespace
