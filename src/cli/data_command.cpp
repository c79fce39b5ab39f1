#include "cli/data_command.h"

#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli/report_errors.h"
#include "core/error.h"
#include "data/bytes.h"
#include "data/prepare.h"
#include "data/tokenizer.h"

namespace moelab {

namespace {

struct DataArgs {
  std::vector<std::string> inputs;
  std::string val_out;
  double val_fraction = 0.05;
  std::string corpus, out, tokenizer;
  int vocab = 8192;
  int threads = 0;
  bool force = false, quiet = false;
};

}  // namespace

void add_data_commands(CLI::App& data_app) {
  auto bytes_args = std::make_shared<DataArgs>();
  auto* bytes = data_app.add_subcommand("bytes", "encode text files as byte tokens (vocab 256) into a token shard");
  bytes->add_option("inputs", bytes_args->inputs, "text files or directories (every file below, sorted) to encode")
      ->required()
      ->check(CLI::ExistingPath);
  bytes->add_option("--out", bytes_args->out, "training token file to write")->required();
  bytes->add_option("--val-out", bytes_args->val_out, "validation token file (the tail of each input) to write");
  bytes->add_option("--val-fraction", bytes_args->val_fraction, "share of each input held out for validation")
      ->check(CLI::Range(0.0, 0.5));
  on_run(bytes, [a = bytes_args] {
    const auto r = encode_bytes(a->inputs, a->out, a->val_out, a->val_out.empty() ? 0.0 : a->val_fraction);
    std::printf("wrote %ld training tokens to %s", static_cast<long>(r.train_tokens), a->out.c_str());
    if (!a->val_out.empty())
      std::printf(" and %ld validation tokens to %s", static_cast<long>(r.val_tokens), a->val_out.c_str());
    std::printf("\n");
  });

  // Options live as long as the callbacks that read them.
  auto args = std::make_shared<DataArgs>();

  auto* prepare = data_app.add_subcommand(
      "prepare", "train a tokenizer on CORPUS/train and encode train/, val/ and ood/ into token shards");
  prepare->add_option("--corpus", args->corpus, "corpus directory: train/ (required), val/, ood/<name>.txt")
      ->required();
  prepare->add_option("--out", args->out, "output directory for tokenizer.model, *.bin and meta.json")->required();
  prepare->add_option("--vocab", args->vocab, "vocabulary size of the tokenizer trained here")
      ->capture_default_str()
      ->check(CLI::Range(260, 1 << 24));
  prepare->add_option("--tokenizer", args->tokenizer, "use this SentencePiece model instead of training one");
  prepare->add_option("--threads", args->threads, "encoding threads (0: all)")->check(CLI::Range(0, 4096));
  prepare->add_flag("--force", args->force, "rebuild even when meta.json says the outputs are up to date");
  prepare->add_flag("-q,--quiet", args->quiet, "no progress bar");
  prepare->footer(
      "Example:\n  moelab data prepare --corpus data/corpus --out data/tokens --vocab 8192\n"
      "Writes OUT/tokenizer.model, OUT/train.bin, OUT/val.bin, OUT/ood_<name>.bin and OUT/meta.json; a second run\n"
      "with unchanged inputs does nothing. See docs/tokens.md.");
  on_run(prepare, [args] {
    PrepareOptions options;
    options.corpus_dir = args->corpus;
    options.out_dir = args->out;
    options.vocab_size = args->vocab;
    options.tokenizer = args->tokenizer;
    options.threads = args->threads;
    options.force = args->force;
    options.progress = !args->quiet;
    prepare_corpus(options, std::cout);
  });

  auto* encode = data_app.add_subcommand("encode", "encode text, JSONL or directories into one token shard");
  encode->add_option("inputs", args->inputs, "text files, .jsonl files (field \"text\") or directories")
      ->required();
  encode->add_option("--tokenizer", args->tokenizer, "SentencePiece model (from `data train-tokenizer`)")
      ->required();
  encode->add_option("--out", args->out, "token shard to write")->required();
  encode->add_option("--threads", args->threads, "encoding threads (0: all)")->check(CLI::Range(0, 4096));
  encode->add_flag("-q,--quiet", args->quiet, "no progress bar");
  encode->footer("Example:\n  moelab data encode --tokenizer data/tokens/tokenizer.model my_docs.jsonl --out my.bin");
  on_run(encode, [args] {
    const Tokenizer tokenizer(args->tokenizer);
    const std::vector<std::string> files = list_input_files(args->inputs);
    int64_t total_bytes = 0;
    for (const auto& f : files) total_bytes += static_cast<int64_t>(std::filesystem::file_size(f));
    ProgressBar bar("encoding", total_bytes, static_cast<int64_t>(files.size()), !args->quiet);
    const EncodeStats stats = encode_to_shard(tokenizer, files, args->out, args->threads,
                                              [&](int64_t bytes, int64_t n) { bar.update(bytes, n); });
    bar.finish();
    std::printf("wrote %lld tokens (%lld documents, %.2f bytes/token, vocabulary %d) to %s\n",
                static_cast<long long>(stats.tokens), static_cast<long long>(stats.documents),
                stats.tokens ? static_cast<double>(stats.bytes) / stats.tokens : 0.0, tokenizer.vocab_size(),
                args->out.c_str());
  });

  auto* train = data_app.add_subcommand("train-tokenizer", "train a byte-fallback BPE SentencePiece tokenizer");
  train->add_option("inputs", args->inputs, "text files, .jsonl files (field \"text\") or directories")
      ->required();
  train->add_option("--vocab", args->vocab, "vocabulary size")->capture_default_str()->check(CLI::Range(260, 1 << 24));
  train->add_option("--out", args->out, "model file to write (e.g. tokenizer.model)")->required();
  train->footer("Example:\n  moelab data train-tokenizer data/corpus/train --vocab 8192 --out tokenizer.model");
  on_run(train, [args] {
    TokenizerTrainOptions options;
    options.vocab_size = args->vocab;
    const TokenizerTrainStats stats = train_tokenizer(args->inputs, args->out, options);
    std::printf("wrote %s: %d pieces from %lld lines (%.1f MB, %lld long lines split) in %.1f s\n",
                args->out.c_str(), stats.vocab_size, static_cast<long long>(stats.sentences), stats.bytes / 1e6,
                static_cast<long long>(stats.split_lines), stats.seconds);
  });
}

}  // namespace moelab
