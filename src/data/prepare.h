#pragma once
// Text -> token shards: encoding inputs with a trained tokenizer, and `moelab data prepare`, which turns a corpus
// directory (train/, val/, ood/) into a tokenizer, one shard per split and a meta.json (see docs/tokens.md).
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

namespace moelab {

class Tokenizer;

// A progress line on a stream (stderr): files done / total, MB done, MB/s and ETA. On a terminal it redraws in
// place at most 10 times a second; otherwise it prints a line at most every 10 seconds. finish() prints the last.
class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total_bytes, int64_t total_files, bool enabled, std::FILE* out = stderr);
  void update(int64_t bytes_done, int64_t files_done);
  void finish();

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_bytes_, total_files_, bytes_ = 0, files_ = 0;
  bool enabled_, tty_ = false, finished_ = false;
  std::FILE* out_;
  double start_ = 0, last_draw_ = -1e9;
};

struct EncodeStats {
  int64_t files = 0;
  int64_t documents = 0;
  int64_t bytes = 0;   // input bytes
  int64_t tokens = 0;  // ids written, end-of-document ids included
  double seconds = 0;
};

// Called after each encoded batch with the input bytes and files consumed so far by this call.
using EncodeProgress = std::function<void(int64_t bytes_done, int64_t files_done)>;

// Encodes the documents of `inputs` (files or directories; see tokenizer.h) into the shard `shard_path`, each
// document followed by the tokenizer's end-of-document id. Lines are encoded in parallel with `threads` OpenMP
// threads (0: all); the output does not depend on the thread count.
EncodeStats encode_to_shard(const Tokenizer& tokenizer, const std::vector<std::string>& inputs,
                            const std::string& shard_path, int threads = 0, const EncodeProgress& progress = {});

struct PrepareOptions {
  std::string corpus_dir;  // holds train/ (required), val/ and ood/ (optional)
  std::string out_dir;
  int vocab_size = 8192;   // for a tokenizer trained here
  std::string tokenizer;   // an existing model to use instead of training one
  int threads = 0;         // encoding threads (0: all)
  bool force = false;      // rebuild even when meta.json says the outputs are up to date
  bool progress = true;    // progress bar on stderr
};

struct PreparedShard {
  std::string split;  // "train", "val", "ood_<name>"
  std::string path;   // OUT/<split>.bin
  EncodeStats stats;
};

struct PrepareResult {
  bool up_to_date = false;  // nothing was done: meta.json matched the inputs
  bool trained_tokenizer = false;
  std::string tokenizer_path;
  int vocab_size = 0;
  std::vector<PreparedShard> shards;
  double tokenizer_seconds = 0, encode_seconds = 0;
};

// Builds OUT/tokenizer.model (unless options.tokenizer is given, or OUT/tokenizer.model has the requested vocabulary
// and was trained on the same train/ files), OUT/train.bin, OUT/val.bin, OUT/ood_<name>.bin for each ood/<name>.*
// and OUT/meta.json. When meta.json records the same input files (names, sizes, mtimes), vocabulary and tokenizer,
// it returns at once with up_to_date set. Progress and a summary go to `log`.
PrepareResult prepare_corpus(const PrepareOptions& options, std::ostream& log);

}  // namespace moelab
