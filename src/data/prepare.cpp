#include "data/prepare.h"

#include <omp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <ostream>

#include "core/error.h"
#include "core/input_stream.h"
#include "core/io.h"
#include "core/timer.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moelab {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string format_duration(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else std::snprintf(buf, sizeof(buf), "%ld:%02ld", s / 60, s % 60);
  return buf;
}

}  // namespace

// ----- progress --------------------------------------------------------------------------------------------------

ProgressBar::ProgressBar(std::string label, int64_t total_bytes, int64_t total_files, bool enabled, std::FILE* out)
    : label_(std::move(label)),
      total_bytes_(total_bytes),
      total_files_(total_files),
      enabled_(enabled),
      out_(out),
      start_(now_seconds()) {
  tty_ = enabled_ && ::isatty(::fileno(out_));
}

void ProgressBar::update(int64_t bytes_done, int64_t files_done) {
  bytes_ = bytes_done;
  files_ = files_done;
  if (!enabled_) return;
  const double now = now_seconds();
  if (now - last_draw_ < (tty_ ? 0.1 : 10.0)) return;
  last_draw_ = now;
  draw(false);
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  if (enabled_) draw(true);
}

void ProgressBar::draw(bool final) {
  const double elapsed = std::max(now_seconds() - start_, 1e-9);
  const double fraction = total_bytes_ > 0 ? std::min(1.0, static_cast<double>(bytes_) / total_bytes_) : 1.0;
  const double mb_per_s = bytes_ / 1e6 / elapsed;
  constexpr int kWidth = 24;
  const int filled = static_cast<int>(fraction * kWidth);
  std::string bar(filled, '#');
  bar.append(kWidth - filled, '.');
  std::string eta = final ? "done in " + format_duration(elapsed)
                          : "ETA " + (bytes_ > 0 ? format_duration((total_bytes_ - bytes_) / (bytes_ / elapsed)) : "?");
  std::fprintf(out_, "%s%-10s [%s] %lld/%lld files  %.1f/%.1f MB  %.1f MB/s  %s%s", tty_ ? "\r" : "", label_.c_str(),
               bar.c_str(), static_cast<long long>(files_), static_cast<long long>(total_files_), bytes_ / 1e6,
               total_bytes_ / 1e6, mb_per_s, eta.c_str(), tty_ && !final ? "   " : "\n");
  std::fflush(out_);
}

// ----- encoding --------------------------------------------------------------------------------------------------

EncodeStats encode_to_shard(const Tokenizer& tokenizer, const std::vector<std::string>& inputs,
                            const std::string& shard_path, int threads, const EncodeProgress& progress) {
  Timer timer;
  const std::vector<std::string> files = list_input_files(inputs);
  TextReader reader(files);
  ShardWriter writer(shard_path, tokenizer.vocab_size());
  const int n_threads = threads > 0 ? threads : omp_get_max_threads();
  const int32_t newline = tokenizer.newline_id(), eos = tokenizer.eos_id();

  // Lines are read serially in batches of ~4 MB, encoded in parallel in chunks of ~64 KB (each chunk's ids in its
  // own vector), then written in chunk order, so the shard is the same for any thread count.
  constexpr int64_t kBatchBytes = 4 << 20, kChunkBytes = 64 << 10;
  std::vector<TextSegment> batch;
  std::vector<size_t> chunk_starts;
  std::vector<std::vector<int32_t>> chunk_ids;
  bool more = true;
  while (more) {
    batch.clear();
    chunk_starts.assign(1, 0);
    int64_t batch_bytes = 0, chunk_bytes = 0;
    TextSegment segment;
    while (batch_bytes < kBatchBytes && (more = reader.next(segment))) {
      batch_bytes += static_cast<int64_t>(segment.text.size()) + 1;
      chunk_bytes += static_cast<int64_t>(segment.text.size()) + 1;
      batch.push_back(std::move(segment));
      if (chunk_bytes >= kChunkBytes) {
        chunk_starts.push_back(batch.size());
        chunk_bytes = 0;
      }
    }
    if (chunk_starts.back() != batch.size()) chunk_starts.push_back(batch.size());
    const int64_t n_chunks = static_cast<int64_t>(chunk_starts.size()) - 1;
    chunk_ids.resize(std::max<int64_t>(n_chunks, 0));
    std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t c = 0; c < n_chunks; ++c) {
      std::vector<int32_t>& ids = chunk_ids[c];
      ids.clear();
      try {
        for (size_t s = chunk_starts[c]; s < chunk_starts[c + 1]; ++s) {
          tokenizer.encode_line(batch[s].text, ids);
          if (batch[s].newline_after) ids.push_back(newline);
          if (batch[s].document_end) ids.push_back(eos);
        }
      } catch (...) {
#pragma omp critical(moelab_encode_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    for (int64_t c = 0; c < n_chunks; ++c) writer.append(chunk_ids[c]);
    // Progress in bytes of the input files (compressed where they are), against their sizes on disk.
    if (progress) progress(reader.file_bytes_read(), static_cast<int64_t>(reader.files_done()));
  }
  EncodeStats stats;
  stats.files = static_cast<int64_t>(files.size());
  stats.documents = reader.documents();
  stats.bytes = reader.bytes_read();
  stats.tokens = static_cast<int64_t>(writer.finish());
  stats.seconds = timer.seconds();
  return stats;
}

// ----- prepare ---------------------------------------------------------------------------------------------------

namespace {

constexpr const char* kPrepareFormat = "moelab-prepare-v1";

struct Split {
  std::string name;                // "train", "val", "ood_<name>"
  std::vector<std::string> files;  // sorted
  int64_t bytes = 0;
};

json file_fingerprint(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw Error("cannot stat '" + path + "'");
  return {{"bytes", static_cast<int64_t>(st.st_size)},
          {"mtime_ns", static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec}};
}

// 64-bit FNV-1a: a short, stable name for a long fingerprint list.
std::string fnv1a_hex(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::vector<Split> find_splits(const std::string& corpus) {
  std::error_code ec;
  if (!fs::is_directory(corpus, ec))
    throw Error("corpus directory '" + corpus + "' does not exist; build the default one with "
                "scripts/fetch-corpus.sh, or point --corpus at a directory holding train/ (and optionally val/, ood/)");
  const fs::path root(corpus);
  if (!fs::is_directory(root / "train", ec))
    throw Error("corpus directory '" + corpus + "' has no train/ subdirectory; put the training text (text or "
                ".jsonl files) in " + (root / "train").string());
  std::vector<Split> splits;
  splits.push_back({"train", list_input_files({(root / "train").string()})});
  if (fs::is_directory(root / "val", ec)) splits.push_back({"val", list_input_files({(root / "val").string()})});
  if (fs::is_directory(root / "ood", ec)) {
    for (const auto& file : list_input_files({(root / "ood").string()})) {
      const fs::path p(file);
      if (p.parent_path() != root / "ood") continue;  // only ood/<name>.<ext>, one shard each
      // ood/code.jsonl.zst -> ood_code: the name without its compression suffix and format extension.
      splits.push_back({"ood_" + fs::path(strip_compression_suffix(file)).stem().string(), {file}});
    }
  }
  for (auto& split : splits)
    for (const auto& f : split.files) split.bytes += file_fingerprint(f)["bytes"].get<int64_t>();
  return splits;
}

json input_fingerprints(const std::vector<Split>& splits, const std::string& corpus) {
  json inputs = json::array();
  for (const auto& split : splits)
    for (const auto& f : split.files) {
      json entry = file_fingerprint(f);
      entry["path"] = fs::path(f).lexically_relative(corpus).generic_string();
      inputs.push_back(entry);
    }
  return inputs;
}

json read_meta(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return nullptr;
  try {
    return json::parse(read_file(path.string(), "prepare metadata"));
  } catch (const json::exception&) {
    return nullptr;  // unreadable metadata only means "rebuild"
  }
}

// Whether `meta` describes finished outputs of exactly these inputs and settings, all still present.
bool meta_up_to_date(const json& meta, const json& inputs, const PrepareOptions& options, const fs::path& out) {
  try {
    if (!meta.is_object() || meta.value("format", "") != kPrepareFormat || !meta.value("complete", false)) return false;
    if (meta.at("inputs") != inputs || meta.at("tokenizer_arg").get<std::string>() != options.tokenizer) return false;
    if (options.tokenizer.empty() && meta.at("requested_vocab").get<int>() != options.vocab_size) return false;
    const std::string tokenizer = meta.at("tokenizer").get<std::string>();
    std::error_code ec;
    if (!fs::exists(tokenizer, ec) || file_fingerprint(tokenizer) != meta.at("tokenizer_file")) return false;
    const int64_t width = meta.at("dtype_bytes").get<int64_t>();
    for (const auto& shard : meta.at("shards")) {
      const fs::path file = out / shard.at("file").get<std::string>();
      if (!fs::exists(file, ec) ||
          static_cast<int64_t>(fs::file_size(file, ec)) !=
              static_cast<int64_t>(kShardHeaderBytes) + shard.at("tokens").get<int64_t>() * width)
        return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

PrepareResult prepare_corpus(const PrepareOptions& options, std::ostream& log) {
  if (options.vocab_size < 260 && options.tokenizer.empty())
    throw Error("--vocab must be at least 260 (256 byte pieces, 3 special pieces and a character), got " +
                std::to_string(options.vocab_size));
  const std::vector<Split> splits = find_splits(options.corpus_dir);
  const fs::path out(options.out_dir);
  const fs::path meta_path = out / "meta.json";
  const json inputs = input_fingerprints(splits, options.corpus_dir);
  const json old_meta = read_meta(meta_path);
  PrepareResult result;
  if (!options.force && meta_up_to_date(old_meta, inputs, options, out)) {
    result.up_to_date = true;
    result.tokenizer_path = old_meta["tokenizer"].get<std::string>();
    result.vocab_size = old_meta["vocab_size"].get<int>();
    for (const auto& s : old_meta["shards"]) {
      PreparedShard shard{s["split"], (out / s["file"].get<std::string>()).string(), {}};
      shard.stats.tokens = s["tokens"];
      shard.stats.bytes = s["bytes"];
      shard.stats.documents = s["documents"];
      shard.stats.files = s["files"];
      result.shards.push_back(shard);
    }
    log << options.out_dir << " is up to date (meta.json matches the " << inputs.size()
        << " input files and settings; --force rebuilds)\n";
    return result;
  }

  // Which train/ files a trained tokenizer saw: it is reused only for the same files and vocabulary.
  json train_inputs = json::array();
  for (const auto& entry : inputs)
    if (entry["path"].get<std::string>().rfind("train/", 0) == 0) train_inputs.push_back(entry);
  const std::string trained_on = fnv1a_hex(train_inputs.dump());
  fs::create_directories(out);

  // 1. The tokenizer.
  Timer timer;
  std::string tokenizer_path = options.tokenizer;
  std::string tokenizer_trained_on;
  if (tokenizer_path.empty()) {
    tokenizer_path = (out / "tokenizer.model").string();
    bool reuse = false;
    std::error_code ec;
    if (old_meta.is_object() && old_meta.value("tokenizer_trained_on", "") == trained_on &&
        old_meta.value("requested_vocab", 0) == options.vocab_size && fs::exists(tokenizer_path, ec)) {
      try {
        reuse = Tokenizer(tokenizer_path).vocab_size() == options.vocab_size;
      } catch (const Error&) {
        reuse = false;
      }
    }
    if (reuse) {
      log << "reusing " << tokenizer_path << " (vocabulary " << options.vocab_size << ", trained on these train/ files)\n";
    } else {
      log << "training a " << options.vocab_size << "-piece BPE tokenizer on " << splits[0].files.size()
          << " train/ files (" << splits[0].bytes / 1e6 << " MB) ..." << std::endl;
      TokenizerTrainOptions train_options;
      train_options.vocab_size = options.vocab_size;
      const TokenizerTrainStats stats = train_tokenizer(splits[0].files, tokenizer_path, train_options);
      result.trained_tokenizer = true;
      log << "  wrote " << tokenizer_path << " in " << format_duration(stats.seconds) << " (" << stats.sentences
          << " training lines, " << stats.split_lines << " long lines split)\n";
    }
    tokenizer_trained_on = trained_on;
  }
  const Tokenizer tokenizer(tokenizer_path);
  result.tokenizer_seconds = timer.seconds();
  result.tokenizer_path = tokenizer_path;
  result.vocab_size = tokenizer.vocab_size();

  // Replace any previous metadata with an incomplete record first: until the shards are all written, the
  // directory must not look up to date, but the tokenizer just trained must be reusable if this run is killed.
  json meta = {{"format", kPrepareFormat},
               {"complete", false},
               {"source", fs::absolute(options.corpus_dir).lexically_normal().string()},
               {"requested_vocab", options.vocab_size},
               {"tokenizer_arg", options.tokenizer},
               {"tokenizer_trained_on", tokenizer_trained_on}};
  write_file_atomic(meta_path.string(), meta.dump(2) + "\n");

  // 2. One shard per split.
  timer.reset();
  int64_t total_bytes = 0, total_files = 0;
  for (const auto& split : splits) total_bytes += split.bytes, total_files += split.files.size();
  ProgressBar bar("encoding", total_bytes, total_files, options.progress);
  int64_t bytes_before = 0, files_before = 0;
  for (const auto& split : splits) {
    PreparedShard shard{split.name, (out / (split.name + ".bin")).string(), {}};
    shard.stats = encode_to_shard(tokenizer, split.files, shard.path, options.threads,
                                  [&](int64_t bytes, int64_t files) {
                                    bar.update(bytes_before + bytes, files_before + files);
                                  });
    bytes_before += split.bytes;
    files_before += split.files.size();
    bar.update(bytes_before, files_before);
    result.shards.push_back(shard);
  }
  bar.finish();
  result.encode_seconds = timer.seconds();

  // 3. The record of what was built from what.
  json shards = json::array();
  for (const auto& s : result.shards) {
    shards.push_back({{"split", s.split},
                      {"file", fs::path(s.path).filename().string()},
                      {"files", s.stats.files},
                      {"documents", s.stats.documents},
                      {"bytes", s.stats.bytes},
                      {"tokens", s.stats.tokens},
                      {"bytes_per_token", s.stats.tokens > 0 ? static_cast<double>(s.stats.bytes) / s.stats.tokens : 0.0}});
    log << "  " << s.split << ": " << s.stats.tokens << " tokens from " << s.stats.documents << " documents ("
        << s.stats.bytes / 1e6 << " MB, " << (s.stats.tokens ? static_cast<double>(s.stats.bytes) / s.stats.tokens : 0)
        << " bytes/token) -> " << s.path << "\n";
  }
  meta["complete"] = true;
  meta["tokenizer"] = fs::absolute(tokenizer_path).lexically_normal().string();
  meta["tokenizer_file"] = file_fingerprint(tokenizer_path);
  meta["tokenizer_trained"] = result.trained_tokenizer;
  meta["vocab_size"] = result.vocab_size;
  meta["eos_id"] = tokenizer.eos_id();
  meta["dtype_bytes"] = shard_dtype_bytes(result.vocab_size);
  meta["dtype"] = shard_dtype_bytes(result.vocab_size) == 2 ? "uint16" : "uint32";
  meta["shards"] = shards;
  meta["seconds"] = {{"tokenizer", result.tokenizer_seconds}, {"encode", result.encode_seconds}};
  meta["inputs"] = inputs;
  write_file_atomic(meta_path.string(), meta.dump(2) + "\n");
  log << "wrote " << meta_path.string() << "\n";
  return result;
}

}  // namespace moelab
