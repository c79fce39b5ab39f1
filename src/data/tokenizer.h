#pragma once
// Text inputs and the SentencePiece BPE tokenizer (settings in docs/tokens.md).
//
// Inputs: a text file is one document; a JSONL file (*.jsonl) holds one document per line, the string field
// "text" of a JSON object; a directory stands for every regular, non-hidden file below it, in sorted order. Any of
// these files may be gzip- or zstd-compressed (a.txt.gz, b.jsonl.zst: core/input_stream.h), read as a stream.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moelab {

class LineStream;

// ----- inputs ----------------------------------------------------------------------------------------------------

// Expands files and directories into the sorted list of files they name. Throws Error when an input does not
// exist or a directory holds no files.
std::vector<std::string> list_input_files(const std::vector<std::string>& inputs);
// Whether `path` is JSONL: it ends in .jsonl, or .jsonl.gz / .jsonl.zst.
bool is_jsonl_path(const std::string& path);

// One line of a document: `text` holds no '\n'. `newline_after` says a '\n' followed it in the document;
// `document_end` says it is the document's last line.
struct TextSegment {
  std::string text;
  bool newline_after = false;
  bool document_end = false;
};

// Streams the documents of `files`, line by line, in order. Empty documents (empty files, JSONL lines with
// "text": "") are skipped; blank JSONL lines are ignored. Errors (unreadable file, invalid UTF-8, a JSONL line that
// is not an object with a string "text") throw Error naming the file and line.
class TextReader {
 public:
  explicit TextReader(std::vector<std::string> files);
  ~TextReader();
  // Fills `segment` with the next line; false at the end of the last file.
  bool next(TextSegment& segment);
  int64_t bytes_read() const { return bytes_read_; }  // text bytes consumed so far (decompressed)
  // Bytes of the input files consumed so far (compressed where they are): progress against their sizes.
  int64_t file_bytes_read() const;
  size_t files_done() const { return file_index_; }  // files read to their end
  int64_t documents() const { return documents_; }   // documents finished so far

 private:
  std::vector<std::string> files_;
  size_t file_index_ = 0;
  std::unique_ptr<LineStream> in_;  // the open file; null between files
  int64_t finished_file_bytes_ = 0;  // sizes of the files read to their end
  bool jsonl_ = false;
  int64_t line_number_ = 0;
  int64_t bytes_read_ = 0;
  int64_t documents_ = 0;
  std::string line_;
  // Lines of the current JSONL document not yet handed out.
  std::vector<TextSegment> pending_;
  size_t pending_pos_ = 0;
  bool open_next_file();
};

// Splits `line` into pieces of at most `max_bytes` bytes, cutting before a space or tab where one lies in the
// second half of the window, else at a UTF-8 character boundary. Concatenating the pieces gives `line` back.
std::vector<std::string_view> split_long_line(std::string_view line, size_t max_bytes);

// ----- training --------------------------------------------------------------------------------------------------

struct TokenizerTrainOptions {
  int vocab_size = 8192;
  double character_coverage = 0.9995;
  int threads = 1;            // sentencepiece trainer threads
  int64_t max_sentences = 0;  // 0: train on every line; N > 0: a seeded random sample of N lines
  uint32_t seed = 1234;       // sentencepiece's random generator (only used when sampling)
  // sentencepiece skips training sentences longer than this (bytes); longer lines are split below it first.
  int max_sentence_bytes = 4192;
  bool verbose = false;  // sentencepiece's own progress log on stderr
};

struct TokenizerTrainStats {
  int64_t sentences = 0;    // lines fed to the trainer, after splitting
  int64_t split_lines = 0;  // input lines longer than max_sentence_bytes, split into several sentences
  int64_t bytes = 0;        // input bytes read
  int vocab_size = 0;
  double seconds = 0;
};

// Trains a byte-fallback BPE model on the lines of `inputs` and writes it to `model_path` (temp file + rename).
// Throws Error when the inputs hold no text, or hold too few distinct characters/pairs for `vocab_size`.
TokenizerTrainStats train_tokenizer(const std::vector<std::string>& inputs, const std::string& model_path,
                                    const TokenizerTrainOptions& options = {});

// ----- encoding --------------------------------------------------------------------------------------------------

// The whole vocabulary, as exporters embed it (GGUF's tokenizer.ggml.*): every piece with its score and kind.
struct TokenizerVocabulary {
  enum class Kind { Normal, Unknown, Control, Unused, Byte };
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<Kind> kinds;
  int unk_id = -1, bos_id = -1, eos_id = -1, pad_id = -1;  // -1: none
};

// How the model turns text into the string its pieces are matched against (SentencePiece's NormalizerSpec and the
// whitespace setting of its TrainerSpec), read from the model file itself. Exporters state these so that other
// tokenizers (llama.cpp, Hugging Face) reproduce moelab's ids. moelab's own models: identity, no dummy prefix, no
// whitespace clean-up.
struct TokenizerNormalizer {
  std::string rule = "nmt_nfkc";          // normalization rule name ("identity": none)
  bool has_charsmap = false;              // a precompiled character map (a rule other than identity)
  bool add_dummy_prefix = true;           // a "▁" (space) is put in front of the text
  bool remove_extra_whitespaces = true;   // leading, trailing and repeated spaces are removed
  bool escape_whitespaces = true;         // spaces become "▁"
  bool treat_whitespace_as_suffix = false;  // "▁" ends pieces instead of starting them
};

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  const std::string& path() const { return path_; }
  int vocab_size() const;
  int eos_id() const;      // `</s>`, appended after each document in a shard
  int newline_id() const;  // the byte piece <0x0A>
  std::string piece(int id) const;
  TokenizerVocabulary vocabulary() const;
  TokenizerNormalizer normalizer() const;

  // Lossless for any valid UTF-8: decode(encode(text)) == text. Each line is encoded on its own (no length
  // limit) and lines are joined by newline_id(). Thread-safe.
  std::vector<int32_t> encode(std::string_view text) const;
  void encode_line(std::string_view line, std::vector<int32_t>& out) const;  // appends; `line` holds no '\n'
  std::string decode(const std::vector<int32_t>& ids) const;                // control ids (eos) decode to nothing

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  int newline_id_ = -1;
};

}  // namespace moelab
