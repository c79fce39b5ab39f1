// Checkpoints: bit-identical resume (in process, and after kill -9 of the CLI), the safetensors layout, and
// clear errors for truncated, mismatched or unexpected checkpoints.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/io.h"
#include "train/checkpoint.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using testing::temp_dir;
using testing::write_tokens;

std::vector<std::string> small_overrides() {
  return {"model.vocab_size=64", "model.d_model=32", "model.n_layers=2",   "model.n_heads=4",
          "model.seq_len=16",    "train.batch_size=4", "train.steps=10",    "train.warmup_steps=2",
          "train.lr=0.01",       "train.threads=2",    "moe.experts=4",     "moe.top_k=2",
          "moe.every=2"};
}

TEST(Checkpoint, ResumeContinuesBitIdentically) {
  const fs::path dir = temp_dir("ckpt_resume");
  TokenFile data(write_tokens(dir / "tokens.bin", 5000, 64), "uint16");
  const Config c = config_from_string("", small_overrides());
  auto be = testing::make_test_backend(2);
  Trainer full(c, *be);
  std::vector<double> full_losses;
  for (int s = 0; s < 10; ++s) full_losses.push_back(full.step(data).loss);

  {
    Trainer first(c, *be);
    for (int s = 0; s < 5; ++s) ASSERT_EQ(first.step(data).loss, full_losses[s]);
    first.save((dir / "checkpoint").string());
  }
  Trainer resumed(c, *be);
  resumed.load((dir / "checkpoint").string());
  EXPECT_EQ(resumed.steps_done(), 5);
  for (int s = 5; s < 10; ++s) EXPECT_EQ(resumed.step(data).loss, full_losses[s]) << "step " << s;
  const int64_t n = full.model().num_params();
  EXPECT_EQ(be->download_vector(std::as_const(resumed.model()).params(), n),
            be->download_vector(std::as_const(full.model()).params(), n));
  fs::remove_all(dir);
}

TEST(Checkpoint, WeightsAreStandardSafetensors) {
  // Parse the file by the format's definition: u64 little-endian header size, JSON header, raw data.
  const fs::path dir = temp_dir("ckpt_format");
  std::vector<float> a = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f}, b = {-1.5f};
  write_safetensors((dir / "t.safetensors").string(), {{"a", {2, 3}, a.data()}, {"b", {1}, b.data()}},
                    {{"format", "pt"}});
  const std::string bytes = read_file((dir / "t.safetensors").string(), "test");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u) << "data section should be 8-byte aligned";
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json({2, 3}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json({0, 24}));
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json({24, 28}));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");
  float third;
  std::memcpy(&third, bytes.data() + 8 + n + 2 * sizeof(float), sizeof(float));
  EXPECT_EQ(third, 3.f);
  EXPECT_EQ(bytes.size(), 8 + n + 28);
  fs::remove_all(dir);
}

using testing::error_of;

TEST(Checkpoint, BadCheckpointsGiveClearErrors) {
  const fs::path dir = temp_dir("ckpt_errors");
  const Config c = config_from_string("", small_overrides());
  auto be = testing::make_test_backend(2);
  Trainer trainer(c, *be);
  trainer.save((dir / "checkpoint").string());

  // A model of another shape.
  auto other = small_overrides();
  other.push_back("model.d_model=64");
  Trainer wrong(config_from_string("", other), *be);
  EXPECT_NE(error_of([&] { wrong.load((dir / "checkpoint").string()); }).find("config builds a model with"),
            std::string::npos);

  // Truncated weights.
  const fs::path weights = dir / "checkpoint" / "model.safetensors";
  fs::resize_file(weights, fs::file_size(weights) - 100);
  EXPECT_NE(error_of([&] { trainer.load((dir / "checkpoint").string()); }).find("truncated"), std::string::npos);
  fs::resize_file(weights, 5);
  EXPECT_NE(error_of([&] { trainer.load((dir / "checkpoint").string()); }).find("truncated"), std::string::npos);

  // Not a checkpoint at all.
  EXPECT_NE(error_of([&] { trainer.load(dir.string()); }).find("not a moelab checkpoint"), std::string::npos);
  fs::remove_all(dir);
}

// Runs the moelab binary with args; returns its pid (not waited for).
pid_t spawn(const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    static std::string bin = MOELAB_BINARY;
    argv.push_back(bin.data());
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    FILE* f = std::fopen(log.c_str(), "w");
    dup2(fileno(f), 1);
    dup2(fileno(f), 2);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

TEST(Checkpoint, KillNineThenResumeGivesTheUninterruptedCurve) {
  const fs::path dir = temp_dir("ckpt_kill");
  const std::string tokens = write_tokens(dir / "tokens.bin", 20000, 256);
  std::vector<std::string> args = {"train",
                                   "--set", "data.train_path=" + tokens,
                                   "--set", "model.vocab_size=256",
                                   "--set", "model.d_model=64",
                                   "--set", "model.n_layers=2",
                                   "--set", "model.n_heads=4",
                                   "--set", "model.seq_len=64",
                                   "--set", "train.batch_size=8",
                                   "--set", "train.steps=120",
                                   "--set", "train.warmup_steps=5",
                                   "--set", "train.threads=2",
                                   "--set", "train.checkpoint_every=7",
                                   "--set", "moe.experts=4",
                                   "--set", "moe.top_k=2"};
  auto with_out = [&](const fs::path& out, bool resume) {
    auto a = args;
    a.push_back("--set");
    a.push_back("train.out_dir=" + out.string());
    if (resume) a.push_back("--resume");
    return a;
  };
  // The uninterrupted reference.
  int status = 0;
  waitpid(spawn(with_out(dir / "full", false), dir / "full.log"), &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file((dir / "full.log").string(), "log");
  const auto reference = testing::losses_of(dir / "full" / "metrics.jsonl");
  ASSERT_EQ(reference.size(), 120u);

  // Kill -9 once a few checkpoints exist.
  const pid_t pid = spawn(with_out(dir / "killed", false), dir / "killed.log");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (testing::losses_of(dir / "killed" / "metrics.jsonl").size() >= 30) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the run finished before it could be killed; make it longer";
  ASSERT_FALSE(find_checkpoint((dir / "killed").string()).empty());

  // Without --resume the existing checkpoint is refused; with it the run completes the same curve.
  waitpid(spawn(with_out(dir / "killed", false), dir / "refused.log"), &status, 0);
  EXPECT_EQ(WEXITSTATUS(status), 1);
  EXPECT_NE(read_file((dir / "refused.log").string(), "log").find("pass --resume"), std::string::npos);
  waitpid(spawn(with_out(dir / "killed", true), dir / "resumed.log"), &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << read_file((dir / "resumed.log").string(), "log");
  const auto resumed = testing::losses_of(dir / "killed" / "metrics.jsonl");
  ASSERT_EQ(resumed.size(), reference.size());
  for (size_t i = 0; i < reference.size(); ++i) EXPECT_EQ(resumed[i], reference[i]) << "step " << i + 1;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moelab
