#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "core/input_stream.h"
#include "core/io.h"
#include "core/timer.h"

namespace moelab {

namespace fs = std::filesystem;

// ----- inputs ----------------------------------------------------------------------------------------------------

bool is_jsonl_path(const std::string& path) {
  return fs::path(strip_compression_suffix(path)).extension() == ".jsonl";
}

std::vector<std::string> list_input_files(const std::vector<std::string>& inputs) {
  if (inputs.empty()) throw Error("no input files given");
  std::vector<std::string> files;
  for (const auto& input : inputs) {
    std::error_code ec;
    if (!fs::exists(input, ec)) throw Error("input '" + input + "' does not exist");
    if (!fs::is_directory(input, ec)) {
      files.push_back(input);
      continue;
    }
    // Sorted, so that the token stream (and the trained tokenizer) does not depend on directory order.
    std::vector<std::string> found;
    for (const auto& entry : fs::recursive_directory_iterator(input)) {
      const std::string name = entry.path().filename().string();
      if (entry.is_regular_file() && !name.empty() && name[0] != '.') found.push_back(entry.path().string());
    }
    std::sort(found.begin(), found.end());
    if (found.empty()) throw Error("directory '" + input + "' contains no files");
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

namespace {

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence, or npos.
size_t invalid_utf8_offset(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    else return i;
    if (i + len > n) return i;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

void check_utf8(std::string_view text, const std::string& file, int64_t line) {
  const size_t bad = invalid_utf8_offset(text);
  if (bad != std::string_view::npos)
    throw Error("'" + file + "' line " + std::to_string(line) + ": invalid UTF-8 at byte " + std::to_string(bad + 1) +
                " of the line; convert the file to UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)");
}

}  // namespace

TextReader::TextReader(std::vector<std::string> files) : files_(std::move(files)) {}

TextReader::~TextReader() = default;

int64_t TextReader::file_bytes_read() const {
  return finished_file_bytes_ + (in_ ? in_->file_bytes_read() : 0);
}

bool TextReader::open_next_file() {
  if (file_index_ >= files_.size()) return false;
  const std::string& path = files_[file_index_];
  in_ = std::make_unique<LineStream>(path);
  jsonl_ = is_jsonl_path(path);
  line_number_ = 0;
  return true;
}

bool TextReader::next(TextSegment& segment) {
  for (;;) {
    if (pending_pos_ < pending_.size()) {
      segment = std::move(pending_[pending_pos_++]);
      if (segment.document_end) ++documents_;
      return true;
    }
    if (!in_ && !open_next_file()) return false;
    const std::string& path = files_[file_index_];
    bool had_newline = false, last = false;
    if (!in_->next(line_, had_newline, last)) {
      finished_file_bytes_ += in_->file_bytes_read();
      in_.reset();
      ++file_index_;
      continue;
    }
    ++line_number_;
    bytes_read_ += static_cast<int64_t>(line_.size()) + (had_newline ? 1 : 0);
    if (!jsonl_) {
      check_utf8(line_, path, line_number_);
      segment.text = line_;
      segment.newline_after = had_newline;
      segment.document_end = last;
      if (segment.document_end) ++documents_;
      return true;
    }
    // JSONL: one document per line; blank lines are ignored.
    if (line_.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(line_);
    } catch (const nlohmann::json::exception& e) {
      throw Error("'" + path + "' line " + std::to_string(line_number_) + " is not valid JSON (" + e.what() +
                  "); each line of a .jsonl file must be one object like {\"text\": \"...\"}");
    }
    if (!doc.is_object() || !doc.contains("text") || !doc["text"].is_string())
      throw Error("'" + path + "' line " + std::to_string(line_number_) +
                  " has no string field \"text\"; each line of a .jsonl file must be one object like "
                  "{\"text\": \"...\"}");
    const std::string& text = doc["text"].get_ref<const std::string&>();
    if (text.empty()) continue;
    pending_.clear();
    pending_pos_ = 0;
    size_t start = 0;
    for (;;) {
      const size_t nl = text.find('\n', start);
      TextSegment s;
      s.text = text.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
      s.newline_after = nl != std::string::npos;
      const bool last = nl == std::string::npos || nl + 1 == text.size();
      s.document_end = last;
      pending_.push_back(std::move(s));
      if (last) break;
      start = nl + 1;
    }
  }
}

std::vector<std::string_view> split_long_line(std::string_view line, size_t max_bytes) {
  MOELAB_CHECK(max_bytes >= 8, "split_long_line needs a limit of at least 8 bytes");
  std::vector<std::string_view> pieces;
  size_t pos = 0;
  while (line.size() - pos > max_bytes) {
    size_t cut = std::string_view::npos;
    // Prefer the last space or tab in the window's second half: the piece after it then starts like a word does.
    for (size_t j = pos + max_bytes; j > pos + max_bytes / 2; --j)
      if (line[j] == ' ' || line[j] == '\t') {
        cut = j;
        break;
      }
    if (cut == std::string_view::npos) {
      cut = pos + max_bytes;
      while (cut > pos + 1 && (static_cast<unsigned char>(line[cut]) & 0xC0) == 0x80) --cut;
    }
    pieces.push_back(line.substr(pos, cut - pos));
    pos = cut;
  }
  pieces.push_back(line.substr(pos));
  return pieces;
}

// ----- training --------------------------------------------------------------------------------------------------

namespace {

// Feeds the trainer the non-empty lines of the inputs, long ones split below the trainer's length limit
// (which would otherwise skip them). Errors from the inputs are kept and rethrown once the trainer returns.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  LineIterator(std::vector<std::string> files, size_t max_bytes) : reader_(std::move(files)), max_bytes_(max_bytes) {
    advance();
  }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return status_; }

  std::exception_ptr error;
  int64_t sentences = 0, split_lines = 0;
  int64_t bytes() const { return reader_.bytes_read(); }

 private:
  void advance() {
    if (queue_pos_ < queue_.size()) {
      value_ = queue_[queue_pos_++];
      ++sentences;
      return;
    }
    TextSegment segment;
    for (;;) {
      try {
        if (!reader_.next(segment)) {
          done_ = true;
          return;
        }
      } catch (...) {
        error = std::current_exception();
        status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal, "input error");
        done_ = true;
        return;
      }
      if (segment.text.empty()) continue;
      if (segment.text.size() <= max_bytes_) {
        value_ = std::move(segment.text);
        ++sentences;
        return;
      }
      ++split_lines;
      queue_.clear();
      for (const auto piece : split_long_line(segment.text, max_bytes_)) queue_.emplace_back(piece);
      queue_pos_ = 1;
      value_ = queue_[0];
      ++sentences;
      return;
    }
  }

  TextReader reader_;
  size_t max_bytes_;
  std::vector<std::string> queue_;
  size_t queue_pos_ = 0;
  std::string value_;
  bool done_ = false;
  sentencepiece::util::Status status_;
};

}  // namespace

TokenizerTrainStats train_tokenizer(const std::vector<std::string>& inputs, const std::string& model_path,
                                    const TokenizerTrainOptions& options) {
  if (options.vocab_size < 260)
    throw Error("tokenizer vocabulary must be at least 260 (256 byte pieces, <unk>, <s>, </s> and a character), "
                "got " + std::to_string(options.vocab_size));
  Timer timer;
  LineIterator lines(list_input_files(inputs), static_cast<size_t>(options.max_sentence_bytes));
  // Lossless settings: no normalisation, no whitespace clean-up, no dummy prefix, every byte encodable.
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"character_coverage", std::to_string(options.character_coverage)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", std::to_string(options.max_sentence_bytes)},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(std::max(1, options.threads))},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"hard_vocab_limit", "true"},
      {"minloglevel", options.verbose ? "0" : "1"},
  };
  sentencepiece::SetRandomGeneratorSeed(options.seed);
  std::string model_proto;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model_proto);
  if (lines.error) std::rethrow_exception(lines.error);
  std::string where;
  for (size_t i = 0; i < inputs.size() && i < 3; ++i) where += (i ? ", '" : "'") + inputs[i] + "'";
  if (inputs.size() > 3) where += ", ...";
  if (lines.sentences == 0) throw Error("no text to train the tokenizer on in " + where + " (the inputs are empty)");
  if (!status.ok())
    throw Error("tokenizer training on " + where + " failed: " + status.ToString() +
                " (a vocabulary too large for the text, or smaller than its distinct characters + 259, is the usual "
                "cause: adjust --vocab)");
  sentencepiece::SentencePieceProcessor processor;
  const auto loaded = processor.LoadFromSerializedProto(model_proto);
  MOELAB_CHECK(loaded.ok(), "sentencepiece produced an unloadable model: " + loaded.ToString());
  if (processor.GetPieceSize() != options.vocab_size)
    throw Error("the tokenizer training text in " + where + " supports only " +
                std::to_string(processor.GetPieceSize()) + " pieces, fewer than the requested vocabulary of " +
                std::to_string(options.vocab_size) + "; lower --vocab or add text");
  write_file_atomic(model_path, model_proto);
  TokenizerTrainStats stats;
  stats.sentences = lines.sentences;
  stats.split_lines = lines.split_lines;
  stats.bytes = lines.bytes();
  stats.vocab_size = processor.GetPieceSize();
  stats.seconds = timer.seconds();
  return stats;
}

// ----- encoding --------------------------------------------------------------------------------------------------

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  std::error_code ec;
  if (!fs::is_regular_file(model_path, ec))
    throw Error("tokenizer model '" + model_path + "' does not exist; train one with `moelab data train-tokenizer` "
                "or `moelab data prepare`");
  const auto status = processor_->Load(model_path);
  if (!status.ok())
    throw Error("cannot load tokenizer model '" + model_path + "': " + status.ToString() +
                "; is it a SentencePiece .model file? Re-create it with `moelab data train-tokenizer`");
  newline_id_ = processor_->PieceToId("<0x0A>");
  if (newline_id_ == processor_->unk_id() || !processor_->IsByte(newline_id_))
    throw Error("tokenizer model '" + model_path + "' has no byte pieces (it was trained without byte_fallback), so "
                "it cannot encode every text; train one with `moelab data train-tokenizer`");
  if (processor_->eos_id() < 0)
    throw Error("tokenizer model '" + model_path + "' has no end-of-document piece </s>; train one with "
                "`moelab data train-tokenizer`");
}

Tokenizer::~Tokenizer() = default;

int Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int Tokenizer::eos_id() const { return processor_->eos_id(); }
int Tokenizer::newline_id() const { return newline_id_; }
std::string Tokenizer::piece(int id) const { return processor_->IdToPiece(id); }

TokenizerVocabulary Tokenizer::vocabulary() const {
  TokenizerVocabulary v;
  using Kind = TokenizerVocabulary::Kind;
  for (int id = 0; id < processor_->GetPieceSize(); ++id) {
    v.pieces.push_back(processor_->IdToPiece(id));
    v.scores.push_back(processor_->GetScore(id));
    v.kinds.push_back(processor_->IsUnknown(id)   ? Kind::Unknown
                      : processor_->IsControl(id) ? Kind::Control
                      : processor_->IsUnused(id)  ? Kind::Unused
                      : processor_->IsByte(id)    ? Kind::Byte
                                                  : Kind::Normal);
  }
  v.unk_id = processor_->unk_id();
  v.bos_id = processor_->bos_id();
  v.eos_id = processor_->eos_id();
  v.pad_id = processor_->pad_id();
  return v;
}

namespace {

// Just enough of protobuf's wire format to read scalar and string fields of sentencepiece's ModelProto
// (sentencepiece_model.proto): a field is a varint key (number << 3 | wire type) and a value; type 0 a varint,
// 1 eight bytes, 2 a varint length and that many bytes, 5 four bytes.
class ProtoReader {
 public:
  explicit ProtoReader(std::string_view bytes) : bytes_(bytes) {}
  // The next field; false at the end. Throws Error on malformed input.
  bool next(uint32_t& field, int& wire_type) {
    if (pos_ >= bytes_.size()) return false;
    const uint64_t key = varint();
    field = static_cast<uint32_t>(key >> 3);
    wire_type = static_cast<int>(key & 7);
    return true;
  }
  uint64_t varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= bytes_.size()) throw Error("truncated protobuf varint");
      const auto byte = static_cast<unsigned char>(bytes_[pos_++]);
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return value;
    }
    throw Error("malformed protobuf varint");
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    if (n > bytes_.size() - pos_) throw Error("truncated protobuf field");
    const std::string_view out = bytes_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  void skip(int wire_type) {
    if (wire_type == 0) varint();
    else if (wire_type == 2) bytes();
    else if (wire_type == 1 || wire_type == 5) pos_ = std::min(bytes_.size(), pos_ + (wire_type == 1 ? 8 : 4));
    else throw Error("unsupported protobuf wire type " + std::to_string(wire_type));
  }

 private:
  std::string_view bytes_;
  size_t pos_ = 0;
};

}  // namespace

TokenizerNormalizer Tokenizer::normalizer() const {
  // ModelProto: 2 trainer_spec (24 treat_whitespace_as_suffix), 3 normalizer_spec (1 name, 2 precompiled_charsmap,
  // 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces); absent fields take the proto defaults.
  TokenizerNormalizer n;
  const std::string proto = processor_->serialized_model_proto();
  try {
    ProtoReader model(proto);
    uint32_t field;
    int type;
    while (model.next(field, type)) {
      if ((field != 2 && field != 3) || type != 2) {
        model.skip(type);
        continue;
      }
      ProtoReader spec(model.bytes());
      uint32_t f;
      int t;
      while (spec.next(f, t)) {
        if (field == 2 && f == 24 && t == 0) n.treat_whitespace_as_suffix = spec.varint() != 0;
        else if (field == 3 && f == 1 && t == 2) n.rule = std::string(spec.bytes());
        else if (field == 3 && f == 2 && t == 2) n.has_charsmap = !spec.bytes().empty();
        else if (field == 3 && f == 3 && t == 0) n.add_dummy_prefix = spec.varint() != 0;
        else if (field == 3 && f == 4 && t == 0) n.remove_extra_whitespaces = spec.varint() != 0;
        else if (field == 3 && f == 5 && t == 0) n.escape_whitespaces = spec.varint() != 0;
        else spec.skip(t);
      }
    }
  } catch (const Error& e) {
    throw Error("cannot read the normalizer settings of tokenizer model '" + path_ + "': " + e.what());
  }
  return n;
}

void Tokenizer::encode_line(std::string_view line, std::vector<int32_t>& out) const {
  if (line.empty()) return;
  std::vector<int> ids;
  const auto status = processor_->Encode(absl::string_view(line.data(), line.size()), &ids);
  if (!status.ok()) throw Error("tokenizer '" + path_ + "' failed to encode a line: " + status.ToString());
  out.insert(out.end(), ids.begin(), ids.end());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  size_t start = 0;
  for (;;) {
    const size_t nl = text.find('\n', start);
    encode_line(text.substr(start, nl == std::string_view::npos ? std::string_view::npos : nl - start), out);
    if (nl == std::string_view::npos) break;
    out.push_back(newline_id_);
    start = nl + 1;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const std::vector<int> as_int(ids.begin(), ids.end());
  for (const int id : as_int)
    if (id < 0 || id >= vocab_size())
      throw Error("cannot decode token id " + std::to_string(id) + ": outside the vocabulary of tokenizer '" + path_ +
                  "' (" + std::to_string(vocab_size()) + ")");
  std::string text;
  const auto status = processor_->Decode(as_int, &text);
  if (!status.ok()) throw Error("tokenizer '" + path_ + "' failed to decode: " + status.ToString());
  return text;
}

}  // namespace moelab
