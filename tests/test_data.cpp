// Tokenizer, token shards and `data prepare`: round trips, the input formats, and one clear error per user mistake.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/data_command.h"
#include "core/error.h"
#include "core/input_stream.h"
#include "core/rng.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/token_file.h"
#include "data/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using namespace moelab;

// Deterministic English-like sentences from small word lists: enough variety for BPE to find real merges.
std::string english_text(int sentences, uint64_t seed) {
  static const std::vector<std::string> subjects = {
      "the old farmer", "a young teacher", "my neighbour", "the river", "every child", "the small dog", "our captain",
      "the quiet city", "a travelling merchant", "the king", "her brother", "the council", "a hungry fox",
      "the northern wind", "this book", "the scientist"};
  static const std::vector<std::string> verbs = {
      "walked", "remembered", "carried", "discovered", "painted", "wanted", "followed", "described", "watched",
      "answered", "opened", "believed", "gathered", "measured", "forgot", "considered"};
  static const std::vector<std::string> objects = {
      "the heavy basket", "a strange letter", "the morning light", "three silver coins", "the broken bridge",
      "an ancient song", "the distant mountains", "a long journey", "the green valley", "his quiet promise",
      "the wooden table", "a careful answer", "the evening market", "twelve loaves of bread", "the winter garden"};
  static const std::vector<std::string> tails = {
      "before the sun rose", "with great patience", "near the harbour", "during the long winter",
      "without a single word", "because nobody else would", "in the year 1874", "after the storm had passed",
      "while the others slept", "for nearly 20 minutes", "under the grey sky", "as the bells were ringing"};
  Rng rng(seed);
  auto pick = [&](const std::vector<std::string>& v) -> const std::string& { return v[rng.below(v.size())]; };
  std::string text;
  for (int i = 0; i < sentences; ++i) {
    std::string s = pick(subjects) + " " + pick(verbs) + " " + pick(objects);
    if (rng.below(2)) s += " " + pick(tails);
    if (rng.below(4) == 0) s += ", and " + pick(subjects) + " " + pick(verbs) + " " + pick(objects);
    s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
    const char* ends[] = {".", ".", ".", "!", "?"};
    s += ends[rng.below(5)];
    text += s;
    text += (i % 6 == 5) ? "\n" : " ";  // paragraphs of six sentences, one per line
  }
  return text;
}

void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The message of the moelab::Error that `body` throws ("" if none).
template <typename F>
std::string error_of(F&& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir = fs::temp_directory_path() /
          ("moelab_data_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }

  // A small tokenizer trained on generated text (vocab 400: 259 special/byte pieces + characters + merges).
  std::string small_tokenizer(const std::string& name = "tok.model", int vocab = 400) {
    const fs::path text = dir / ("corpus_for_" + name + ".txt");
    write_text(text, english_text(600, 7));
    TokenizerTrainOptions options;
    options.vocab_size = vocab;
    train_tokenizer({text.string()}, (dir / name).string(), options);
    return (dir / name).string();
  }
  fs::path dir;
};

// ----- tokenizer ---------------------------------------------------------------------------------------------------

TEST_F(DataTest, TokenizerTrainsAndRoundTrips) {
  const std::string corpus = english_text(600, 7);
  write_text(dir / "corpus.txt", corpus);
  TokenizerTrainOptions options;
  options.vocab_size = 400;
  const TokenizerTrainStats stats = train_tokenizer({(dir / "corpus.txt").string()}, (dir / "a.model").string(), options);
  EXPECT_EQ(stats.vocab_size, 400);
  EXPECT_EQ(stats.sentences, 100);  // 600 sentences, six per line
  EXPECT_EQ(stats.split_lines, 0);

  const Tokenizer tok((dir / "a.model").string());
  EXPECT_EQ(tok.vocab_size(), 400);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece(tok.newline_id()), "<0x0A>");

  // Lossless on the training text, and the merges compress it well below one token per byte.
  const std::vector<int32_t> ids = tok.encode(corpus);
  EXPECT_EQ(tok.decode(ids), corpus);
  EXPECT_LT(static_cast<double>(ids.size()), 0.6 * corpus.size());

  // Lossless on text it has never seen: whitespace runs, tabs, CR, non-Latin scripts and emoji (byte fallback).
  const std::vector<std::string> unseen = {
      "",
      "  two leading spaces and two trailing  ",
      "tabs\tinside\tand\r\nwindows line ends\r\n",
      "\n\nblank lines first\n\n\nthen more\n",
      "Ünïcödé — “quotes”, naïve café; 日本語のテキスト; Привет; emoji 😀🚀 and digits 3.14159",
      "    indented code(x) { return x[0] * 2; }",
  };
  for (const auto& text : unseen) EXPECT_EQ(tok.decode(tok.encode(text)), text) << text;
  // Every line is encoded on its own and joined by the newline byte piece.
  std::vector<int32_t> joined = tok.encode("the river");
  joined.push_back(tok.newline_id());
  const std::vector<int32_t> second = tok.encode("the king");
  joined.insert(joined.end(), second.begin(), second.end());
  EXPECT_EQ(tok.encode("the river\nthe king"), joined);
  // Control ids decode to nothing.
  std::vector<int32_t> with_eos = tok.encode("the river");
  with_eos.push_back(tok.eos_id());
  EXPECT_EQ(tok.decode(with_eos), "the river");
  EXPECT_NE(error_of([&] { tok.decode({400}); }).find("outside the vocabulary"), std::string::npos);

  // Deterministic: the same text and options give a byte-identical model.
  train_tokenizer({(dir / "corpus.txt").string()}, (dir / "b.model").string(), options);
  EXPECT_EQ(slurp(dir / "a.model"), slurp(dir / "b.model"));
  // Written via temp + rename: no temporary file is left behind.
  for (const auto& entry : fs::directory_iterator(dir))
    EXPECT_EQ(entry.path().filename().string().find(".tmp."), std::string::npos) << entry.path();
}

TEST_F(DataTest, TokenizerTrainingErrors) {
  write_text(dir / "empty.txt", "");
  write_text(dir / "blank.txt", "\n\n\n");
  TokenizerTrainOptions options;
  options.vocab_size = 300;
  std::string msg = error_of([&] {
    train_tokenizer({(dir / "empty.txt").string(), (dir / "blank.txt").string()}, (dir / "x.model").string(), options);
  });
  EXPECT_NE(msg.find("no text to train the tokenizer on"), std::string::npos) << msg;
  msg = error_of([&] { train_tokenizer({(dir / "missing").string()}, (dir / "x.model").string(), options); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  // A vocabulary the text cannot fill is refused, not silently shrunk.
  write_text(dir / "tiny.txt", "abc abc abc\n");
  options.vocab_size = 5000;
  msg = error_of([&] { train_tokenizer({(dir / "tiny.txt").string()}, (dir / "x.model").string(), options); });
  EXPECT_NE(msg.find("--vocab"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "x.model"));
  // Invalid UTF-8 names the file and line.
  write_text(dir / "latin1.txt", "fine line\ncaf\xe9 au lait\n");
  options.vocab_size = 300;
  msg = error_of([&] { train_tokenizer({(dir / "latin1.txt").string()}, (dir / "x.model").string(), options); });
  EXPECT_NE(msg.find("latin1.txt' line 2: invalid UTF-8"), std::string::npos) << msg;
}

TEST_F(DataTest, TokenizerLoadErrors) {
  std::string msg = error_of([&] { Tokenizer t((dir / "none.model").string()); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  write_text(dir / "garbage.model", "this is not a sentencepiece model");
  msg = error_of([&] { Tokenizer t((dir / "garbage.model").string()); });
  EXPECT_NE(msg.find("cannot load tokenizer model"), std::string::npos) << msg;
}

TEST_F(DataTest, SplitLongLine) {
  // Words: cut before a space, never more than the limit, nothing lost.
  std::string words;
  for (int i = 0; i < 500; ++i) words += "word" + std::to_string(i) + " ";
  auto pieces = split_long_line(words, 100);
  std::string joined;
  for (const auto p : pieces) {
    EXPECT_LE(p.size(), 100u);
    joined += p;
  }
  EXPECT_EQ(joined, words);
  for (size_t i = 1; i < pieces.size(); ++i) EXPECT_EQ(pieces[i][0], ' ');
  // No whitespace: cut at UTF-8 character boundaries (é is two bytes).
  std::string accents;
  for (int i = 0; i < 300; ++i) accents += "é";
  pieces = split_long_line(accents, 51);
  joined.clear();
  for (const auto p : pieces) {
    EXPECT_LE(p.size(), 51u);
    EXPECT_NE(static_cast<unsigned char>(p[0]) & 0xC0, 0x80u);  // starts a character
    joined += p;
  }
  EXPECT_EQ(joined, accents);
  EXPECT_EQ(split_long_line("short", 100).size(), 1u);
}

TEST_F(DataTest, LongLinesRoundTripAndTrainTheTokenizer) {
  // A 20,000+ character line whose only word is "zyxwvq": sentencepiece alone would skip it (> 4192 bytes).
  std::string long_line;
  while (long_line.size() < 20000) long_line += "zyxwvq ";
  const std::string base = english_text(600, 7);
  write_text(dir / "with_long.txt", base + long_line + "\n");
  write_text(dir / "without_long.txt", base);
  TokenizerTrainOptions options;
  options.vocab_size = 400;
  const auto stats = train_tokenizer({(dir / "with_long.txt").string()}, (dir / "with.model").string(), options);
  EXPECT_EQ(stats.split_lines, 1);
  EXPECT_GT(stats.sentences, 100 + 4);  // the long line became at least five sentences
  train_tokenizer({(dir / "without_long.txt").string()}, (dir / "without.model").string(), options);
  const Tokenizer with((dir / "with.model").string()), without((dir / "without.model").string());
  // Trained on the long line, " zyxwvq" is one piece; without it, it takes several.
  EXPECT_EQ(with.encode(" zyxwvq").size(), 1u);
  EXPECT_GT(without.encode(" zyxwvq").size(), 2u);

  // Encoding has no length limit: a 20,000-character line of ordinary words round-trips.
  std::string prose = english_text(400, 99);
  for (char& c : prose)
    if (c == '\n') c = ' ';
  prose = prose.substr(0, 20000);
  ASSERT_EQ(prose.size(), 20000u);
  const auto ids = without.encode(prose);
  EXPECT_EQ(without.decode(ids), prose);
  EXPECT_LT(ids.size(), prose.size() / 2);
}

TEST_F(DataTest, JsonlDocumentsAndMalformedLines) {
  write_text(dir / "docs.jsonl",
             "{\"text\": \"first doc\\nsecond line\", \"id\": 1}\n"
             "\n"
             "{\"text\": \"\"}\n"
             "{\"text\": \"third\\n\"}\n");
  write_text(dir / "plain.txt", "a text file\nis one document");
  TextReader reader({(dir / "docs.jsonl").string(), (dir / "plain.txt").string()});
  std::vector<TextSegment> segments;
  TextSegment s;
  while (reader.next(s)) segments.push_back(s);
  ASSERT_EQ(segments.size(), 5u);
  EXPECT_EQ(segments[0].text, "first doc");
  EXPECT_TRUE(segments[0].newline_after);
  EXPECT_FALSE(segments[0].document_end);
  EXPECT_EQ(segments[1].text, "second line");
  EXPECT_FALSE(segments[1].newline_after);
  EXPECT_TRUE(segments[1].document_end);
  EXPECT_EQ(segments[2].text, "third");  // the empty document is skipped
  EXPECT_TRUE(segments[2].newline_after);
  EXPECT_TRUE(segments[2].document_end);
  EXPECT_EQ(segments[3].text, "a text file");
  EXPECT_EQ(segments[4].text, "is one document");
  EXPECT_FALSE(segments[4].newline_after);
  EXPECT_TRUE(segments[4].document_end);
  EXPECT_EQ(reader.documents(), 3);
  EXPECT_EQ(reader.files_done(), 2u);
  EXPECT_EQ(reader.bytes_read(), static_cast<int64_t>(fs::file_size(dir / "docs.jsonl") + fs::file_size(dir / "plain.txt")));

  auto read_all = [](const fs::path& path) {
    TextReader r({path.string()});
    TextSegment seg;
    while (r.next(seg)) {
    }
  };
  write_text(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok too\"}\n{\"text\": broken}\n");
  std::string msg = error_of([&] { read_all(dir / "bad.jsonl"); });
  EXPECT_NE(msg.find("bad.jsonl' line 3 is not valid JSON"), std::string::npos) << msg;
  write_text(dir / "notext.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"no text field\"}\n");
  msg = error_of([&] { read_all(dir / "notext.jsonl"); });
  EXPECT_NE(msg.find("notext.jsonl' line 2 has no string field \"text\""), std::string::npos) << msg;
  write_text(dir / "number.jsonl", "{\"text\": 42}\n");
  msg = error_of([&] { read_all(dir / "number.jsonl"); });
  EXPECT_NE(msg.find("line 1 has no string field"), std::string::npos) << msg;
  write_text(dir / "array.jsonl", "[\"text\"]\n");
  msg = error_of([&] { read_all(dir / "array.jsonl"); });
  EXPECT_NE(msg.find("line 1 has no string field"), std::string::npos) << msg;
}

TEST_F(DataTest, DirectoriesAreReadRecursivelyInSortedOrder) {
  write_text(dir / "in" / "b.txt", "b");
  write_text(dir / "in" / "a" / "z.jsonl", "{\"text\": \"z\"}\n");
  write_text(dir / "in" / "c.md", "c");
  write_text(dir / "in" / ".hidden", "h");
  const auto files = list_input_files({(dir / "in").string()});
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(fs::path(files[0]).filename(), "z.jsonl");
  EXPECT_EQ(fs::path(files[1]).filename(), "b.txt");
  EXPECT_EQ(fs::path(files[2]).filename(), "c.md");
  fs::create_directories(dir / "empty_dir");
  EXPECT_NE(error_of([&] { list_input_files({(dir / "empty_dir").string()}); }).find("contains no files"),
            std::string::npos);
}

// ----- shards ------------------------------------------------------------------------------------------------------

std::vector<int32_t> ramp(int64_t n, int64_t vocab) {
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 7919) % vocab);
  return ids;
}

void write_shard(const fs::path& path, const std::vector<int32_t>& ids, int64_t vocab) {
  ShardWriter writer(path.string(), vocab);
  // Appended in uneven pieces, as an encoder would.
  for (size_t i = 0; i < ids.size(); i += 333)
    writer.append(std::span<const int32_t>(ids.data() + i, std::min<size_t>(333, ids.size() - i)));
  EXPECT_EQ(writer.finish(), ids.size());
}

TEST_F(DataTest, ShardRoundTripUint16AndUint32) {
  for (const int64_t vocab : {int64_t{65536}, int64_t{100000}}) {
    const fs::path path = dir / ("v" + std::to_string(vocab) + ".bin");
    const auto ids = ramp(10007, vocab);
    write_shard(path, ids, vocab);
    const uint32_t width = vocab <= 65536 ? 2 : 4;
    EXPECT_EQ(fs::file_size(path), 64 + ids.size() * width);
    // The header, byte by byte.
    const std::string bytes = slurp(path);
    EXPECT_EQ(bytes.substr(0, 8), "MOELABTK");
    uint32_t u32[4];
    uint64_t count;
    std::memcpy(u32, bytes.data() + 8, 16);
    std::memcpy(&count, bytes.data() + 24, 8);
    EXPECT_EQ(u32[0], 1u);
    EXPECT_EQ(u32[1], vocab);
    EXPECT_EQ(u32[2], width);
    EXPECT_EQ(u32[3], 0u);
    EXPECT_EQ(count, ids.size());
    EXPECT_EQ(bytes.substr(32, 32), std::string(32, '\0'));
    // Little-endian ids after the header.
    uint32_t third = 0;
    std::memcpy(&third, bytes.data() + 64 + 3 * width, width);
    EXPECT_EQ(static_cast<int32_t>(third), ids[3]);

    const ShardReader reader(path.string());
    EXPECT_EQ(reader.vocab_size(), vocab);
    EXPECT_EQ(reader.dtype_bytes(), width);
    EXPECT_EQ(reader.read_all(), ids);
    EXPECT_EQ(reader.read(10, 3), std::vector<int32_t>(ids.begin() + 10, ids.begin() + 13));
  }
  EXPECT_EQ(shard_dtype_bytes(65536), 2u);
  EXPECT_EQ(shard_dtype_bytes(65537), 4u);
  // An empty shard is valid.
  write_shard(dir / "empty.bin", {}, 300);
  EXPECT_EQ(ShardReader((dir / "empty.bin").string()).size(), 0);
}

TEST_F(DataTest, ShardErrors) {
  write_shard(dir / "good.bin", ramp(1000, 5000), 5000);
  const std::string good = slurp(dir / "good.bin");

  write_text(dir / "text.bin", "hello, this is plain text and not a shard at all");
  std::string msg = error_of([&] { ShardReader r((dir / "text.bin").string()); });
  EXPECT_NE(msg.find("text.bin' is not a moelab token shard (bad magic); create one with `moelab data prepare`"),
            std::string::npos)
      << msg;

  write_text(dir / "truncated.bin", good.substr(0, good.size() - 1));
  msg = error_of([&] { ShardReader r((dir / "truncated.bin").string()); });
  EXPECT_NE(msg.find("truncated.bin' is truncated"), std::string::npos) << msg;
  write_text(dir / "header_only.bin", good.substr(0, 40));
  msg = error_of([&] { ShardReader r((dir / "header_only.bin").string()); });
  EXPECT_NE(msg.find("is truncated"), std::string::npos) << msg;
  write_text(dir / "long.bin", good + "xx");
  msg = error_of([&] { ShardReader r((dir / "long.bin").string()); });
  EXPECT_NE(msg.find("is corrupt"), std::string::npos) << msg;

  std::string v2 = good;
  v2[8] = 2;
  write_text(dir / "v2.bin", v2);
  msg = error_of([&] { ShardReader r((dir / "v2.bin").string()); });
  EXPECT_NE(msg.find("has format version 2, but this moelab reads version 1"), std::string::npos) << msg;

  std::string dtype3 = good;
  dtype3[16] = 3;
  write_text(dir / "dtype3.bin", dtype3);
  msg = error_of([&] { ShardReader r((dir / "dtype3.bin").string()); });
  EXPECT_NE(msg.find("dtype_bytes 3"), std::string::npos) << msg;

  msg = error_of([&] { ShardReader r((dir / "absent.bin").string()); });
  EXPECT_NE(msg.find("cannot open token shard"), std::string::npos) << msg;
  // TokenFile reports the same header errors.
  msg = error_of([&] { TokenFile t((dir / "v2.bin").string(), "uint16"); });
  EXPECT_NE(msg.find("format version 2"), std::string::npos) << msg;
  msg = error_of([&] { TokenFile t((dir / "truncated.bin").string(), "uint16"); });
  EXPECT_NE(msg.find("is truncated"), std::string::npos) << msg;
}

TEST_F(DataTest, UnfinishedWriterLeavesNothing) {
  {
    ShardWriter writer((dir / "partial.bin").string(), 300);
    const auto ids = ramp(5000, 300);
    writer.append(ids);
    // Destroyed without finish(), as when encoding throws.
  }
  EXPECT_FALSE(fs::exists(dir / "partial.bin"));
  EXPECT_TRUE(fs::is_empty(dir)) << "temporary file left behind";
  // Out-of-vocabulary ids are a bug in the caller, caught before they reach the file.
  ShardWriter writer((dir / "oov.bin").string(), 300);
  EXPECT_ANY_THROW(writer.append(std::vector<int32_t>{5, 300}));
}

TEST_F(DataTest, TokenFileReadsShardsAndLegacyFlatFiles) {
  const auto ids = ramp(3000, 70000);
  write_shard(dir / "wide.bin", ids, 70000);
  const TokenFile shard((dir / "wide.bin").string(), "uint16");  // dtype ignored: the header says uint32
  EXPECT_TRUE(shard.is_shard());
  EXPECT_EQ(shard.vocab_size(), 70000);
  ASSERT_EQ(shard.size(), 3000);
  for (int64_t i = 0; i < shard.size(); ++i) ASSERT_EQ(shard.at(i), ids[i]);
  EXPECT_EQ(shard.max_token(), *std::max_element(ids.begin(), ids.end()));

  // Legacy: raw little-endian uint16 ids, no header.
  std::string flat;
  for (const uint16_t id : {uint16_t{7}, uint16_t{300}, uint16_t{65535}, uint16_t{0}}) {
    flat.push_back(static_cast<char>(id & 0xff));
    flat.push_back(static_cast<char>(id >> 8));
  }
  write_text(dir / "flat.bin", flat);
  const TokenFile legacy((dir / "flat.bin").string(), "uint16");
  EXPECT_FALSE(legacy.is_shard());
  EXPECT_EQ(legacy.vocab_size(), 0);
  ASSERT_EQ(legacy.size(), 4);
  EXPECT_EQ(legacy.at(1), 300);
  EXPECT_EQ(legacy.at(2), 65535);
  EXPECT_EQ(legacy.max_token(), 65535);
  const TokenFile legacy32((dir / "flat.bin").string(), "uint32");
  EXPECT_EQ(legacy32.size(), 2);
  EXPECT_EQ(legacy32.at(0), 7 + (300 << 16));

  // Batches from a shard see the ids, not the header.
  Rng rng(1);
  std::vector<int32_t> tokens, targets;
  read_windows(shard, 0, 2, 8, tokens, targets);
  EXPECT_EQ(tokens[0], ids[0]);
  EXPECT_EQ(targets[15], ids[16]);
  sample_batch(shard, rng, 4, 16, tokens, targets);
  EXPECT_EQ(tokens.size(), 64u);
}

// ----- encoding and prepare ----------------------------------------------------------------------------------------

// Splits a shard's ids at end-of-document ids and decodes each document.
std::vector<std::string> decode_documents(const Tokenizer& tok, const std::string& shard_path) {
  const ShardReader reader(shard_path);
  EXPECT_EQ(reader.vocab_size(), tok.vocab_size());
  std::vector<std::string> docs;
  std::vector<int32_t> current;
  for (const int32_t id : reader.read_all()) {
    if (id == tok.eos_id()) {
      docs.push_back(tok.decode(current));
      current.clear();
    } else {
      current.push_back(id);
    }
  }
  EXPECT_TRUE(current.empty()) << "the shard does not end with an end-of-document id";
  return docs;
}

TEST_F(DataTest, EncodeToShardIsLosslessAndThreadIndependent) {
  const std::string tok_path = small_tokenizer();
  const Tokenizer tok(tok_path);
  // Enough text for several 64 KB chunks, so that threads really share the work.
  write_text(dir / "in" / "a.txt", english_text(3000, 1));
  write_text(dir / "in" / "b.jsonl", "{\"text\": \"doc one\\nline two\"}\n{\"text\": \"doc two\"}\n");
  write_text(dir / "in" / "c.txt", "no trailing newline");
  const EncodeStats one = encode_to_shard(tok, {(dir / "in").string()}, (dir / "one.bin").string(), 1);
  const EncodeStats two = encode_to_shard(tok, {(dir / "in").string()}, (dir / "two.bin").string(), 2);
  EXPECT_EQ(slurp(dir / "one.bin"), slurp(dir / "two.bin"));
  EXPECT_EQ(one.tokens, two.tokens);
  EXPECT_EQ(one.files, 3);
  EXPECT_EQ(one.documents, 4);
  const auto docs = decode_documents(tok, (dir / "one.bin").string());
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0], english_text(3000, 1));
  EXPECT_EQ(docs[1], "doc one\nline two");
  EXPECT_EQ(docs[2], "doc two");
  EXPECT_EQ(docs[3], "no trailing newline");
}

// A tiny corpus in the layout of data/corpus: train/ (text and JSONL), val/, ood/.
void make_corpus(const fs::path& root) {
  write_text(root / "train" / "a.txt", english_text(500, 11));
  write_text(root / "train" / "b.txt", english_text(300, 12));
  write_text(root / "train" / "more" / "c.jsonl",
             "{\"text\": \"" + english_text(6, 13).substr(0, 200) + "\"}\n{\"text\": \"The end.\"}\n");
  write_text(root / "val" / "v.txt", english_text(60, 14));
  write_text(root / "ood" / "code.txt", "int main() {\n    return 0;\n}\n");
  write_text(root / "ood" / "wordnet.txt", "dog: a domesticated carnivorous mammal\n");
  write_text(root / "heldout" / "x" / "ignored.txt", "not encoded by prepare\n");
}

TEST_F(DataTest, PrepareEndToEndThenNoOp) {
  const fs::path corpus = dir / "corpus", out = dir / "tokens";
  make_corpus(corpus);
  PrepareOptions options;
  options.corpus_dir = corpus.string();
  options.out_dir = out.string();
  options.vocab_size = 400;
  options.progress = false;
  std::ostringstream log;
  const PrepareResult first = prepare_corpus(options, log);
  EXPECT_FALSE(first.up_to_date);
  EXPECT_TRUE(first.trained_tokenizer);
  EXPECT_EQ(first.vocab_size, 400);
  for (const char* name : {"tokenizer.model", "train.bin", "val.bin", "ood_code.bin", "ood_wordnet.bin", "meta.json"})
    EXPECT_TRUE(fs::exists(out / name)) << name << "\n" << log.str();
  ASSERT_EQ(first.shards.size(), 4u);
  EXPECT_EQ(first.shards[0].split, "train");
  EXPECT_EQ(first.shards[1].split, "val");
  EXPECT_EQ(first.shards[2].split, "ood_code");
  EXPECT_EQ(first.shards[3].split, "ood_wordnet");
  EXPECT_EQ(first.shards[0].stats.documents, 4);  // a.txt, b.txt, two JSONL documents

  // The shards hold the documents, in sorted file order, each followed by </s>.
  const Tokenizer tok((out / "tokenizer.model").string());
  const auto train_docs = decode_documents(tok, (out / "train.bin").string());
  ASSERT_EQ(train_docs.size(), 4u);
  EXPECT_EQ(train_docs[0], english_text(500, 11));
  EXPECT_EQ(train_docs[1], english_text(300, 12));
  EXPECT_EQ(train_docs[3], "The end.");
  EXPECT_EQ(decode_documents(tok, (out / "ood_code.bin").string()),
            std::vector<std::string>{"int main() {\n    return 0;\n}\n"});
  // The trainer reads them too, with the vocabulary from the header.
  const TokenFile train_file((out / "train.bin").string(), "uint16");
  EXPECT_EQ(train_file.vocab_size(), 400);

  const auto meta = nlohmann::json::parse(slurp(out / "meta.json"));
  EXPECT_EQ(meta["vocab_size"], 400);
  EXPECT_EQ(meta["dtype"], "uint16");
  EXPECT_EQ(meta["eos_id"], 2);
  EXPECT_EQ(meta["shards"].size(), 4u);
  EXPECT_EQ(meta["shards"][0]["tokens"], first.shards[0].stats.tokens);
  EXPECT_GT(meta["shards"][0]["bytes_per_token"].get<double>(), 2.0);
  EXPECT_EQ(meta["inputs"].size(), 6u);  // 3 train + 1 val + 2 ood; heldout/ is not read
  EXPECT_EQ(meta["inputs"][0]["path"], "train/a.txt");
  EXPECT_TRUE(meta["complete"].get<bool>());

  // A second run changes nothing and returns at once.
  std::map<std::string, fs::file_time_type> mtimes;
  for (const auto& entry : fs::directory_iterator(out)) mtimes[entry.path().string()] = entry.last_write_time();
  const auto start = std::chrono::steady_clock::now();
  std::ostringstream log2;
  const PrepareResult second = prepare_corpus(options, log2);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(second.up_to_date);
  EXPECT_NE(log2.str().find("is up to date"), std::string::npos) << log2.str();
  EXPECT_LT(seconds, 0.5);
  ASSERT_EQ(second.shards.size(), 4u);
  EXPECT_EQ(second.shards[0].stats.tokens, first.shards[0].stats.tokens);
  for (const auto& entry : fs::directory_iterator(out))
    EXPECT_EQ(entry.last_write_time(), mtimes.at(entry.path().string())) << entry.path();
  EXPECT_EQ(mtimes.size(), 6u);  // no stray files

  // Changing a val/ file re-encodes but keeps the tokenizer (it saw only train/).
  write_text(corpus / "val" / "v.txt", english_text(61, 14));
  std::ostringstream log3;
  const PrepareResult third = prepare_corpus(options, log3);
  EXPECT_FALSE(third.up_to_date);
  EXPECT_FALSE(third.trained_tokenizer) << log3.str();
  EXPECT_EQ(fs::last_write_time(out / "tokenizer.model"), mtimes.at((out / "tokenizer.model").string()));

  // Changing train/ retrains; another vocabulary retrains.
  write_text(corpus / "train" / "b.txt", english_text(301, 12));
  EXPECT_TRUE(prepare_corpus(options, log3).trained_tokenizer);
  options.vocab_size = 420;
  const PrepareResult fifth = prepare_corpus(options, log3);
  EXPECT_TRUE(fifth.trained_tokenizer);
  EXPECT_EQ(TokenFile((out / "train.bin").string(), "uint16").vocab_size(), 420);

  // An existing tokenizer instead of training one.
  PrepareOptions with_model = options;
  with_model.out_dir = (dir / "tokens2").string();
  with_model.tokenizer = (out / "tokenizer.model").string();
  const PrepareResult sixth = prepare_corpus(with_model, log3);
  EXPECT_FALSE(sixth.trained_tokenizer);
  EXPECT_FALSE(fs::exists(dir / "tokens2" / "tokenizer.model"));
  EXPECT_EQ(slurp(dir / "tokens2" / "train.bin"), slurp(out / "train.bin"));
  EXPECT_TRUE(prepare_corpus(with_model, log3).up_to_date);
}

TEST_F(DataTest, PrepareErrors) {
  PrepareOptions options;
  options.out_dir = (dir / "out").string();
  options.vocab_size = 300;
  options.progress = false;
  std::ostringstream log;

  options.corpus_dir = (dir / "nowhere").string();
  std::string msg = error_of([&] { prepare_corpus(options, log); });
  EXPECT_NE(msg.find("corpus directory '" + options.corpus_dir + "' does not exist"), std::string::npos) << msg;

  fs::create_directories(dir / "no_train" / "val");
  write_text(dir / "no_train" / "val" / "v.txt", "text");
  options.corpus_dir = (dir / "no_train").string();
  msg = error_of([&] { prepare_corpus(options, log); });
  EXPECT_NE(msg.find("has no train/ subdirectory"), std::string::npos) << msg;

  write_text(dir / "empty" / "train" / "a.txt", "");
  write_text(dir / "empty" / "train" / "b.txt", "\n");
  options.corpus_dir = (dir / "empty").string();
  msg = error_of([&] { prepare_corpus(options, log); });
  EXPECT_NE(msg.find("no text to train the tokenizer on"), std::string::npos) << msg;

  make_corpus(dir / "corpus");
  options.corpus_dir = (dir / "corpus").string();
  write_text(dir / "bad.model", "not a model");
  options.tokenizer = (dir / "bad.model").string();
  msg = error_of([&] { prepare_corpus(options, log); });
  EXPECT_NE(msg.find("cannot load tokenizer model"), std::string::npos) << msg;

  // A malformed JSONL line in the corpus stops prepare with its file and line, and leaves no shard behind.
  options.tokenizer = small_tokenizer();
  write_text(dir / "corpus" / "val" / "broken.jsonl", "{\"text\": \"fine\"}\n{oops\n");
  msg = error_of([&] { prepare_corpus(options, log); });
  EXPECT_NE(msg.find("broken.jsonl' line 2 is not valid JSON"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "out" / "val.bin"));
  const auto meta = nlohmann::json::parse(slurp(dir / "out" / "meta.json"));
  EXPECT_FALSE(meta["complete"].get<bool>());
}

// ----- the CLI -----------------------------------------------------------------------------------------------------

struct CliRun {
  int code = 0;
  std::string out, err;
};

CliRun run_data_cli(std::vector<std::string> args) {
  CLI::App app{"test"};
  auto* data = app.add_subcommand("data", "data");
  data->require_subcommand(1);
  moelab::add_data_commands(*data);
  args.insert(args.begin(), "data");
  std::reverse(args.begin(), args.end());  // CLI11 parses a reversed vector
  CliRun r;
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  try {
    app.parse(args);
  } catch (const CLI::Error& e) {
    r.code = e.get_exit_code();
  }
  r.err = ::testing::internal::GetCapturedStderr();
  r.out = ::testing::internal::GetCapturedStdout();
  return r;
}

TEST_F(DataTest, CliSubcommands) {
  write_text(dir / "text.txt", english_text(600, 3));
  CliRun r = run_data_cli({"train-tokenizer", (dir / "text.txt").string(), "--vocab", "400", "--out",
                           (dir / "cli.model").string()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("400 pieces"), std::string::npos) << r.out;
  r = run_data_cli({"encode", "--tokenizer", (dir / "cli.model").string(), (dir / "text.txt").string(), "--out",
                    (dir / "cli.bin").string(), "--quiet"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("(1 documents"), std::string::npos) << r.out;
  EXPECT_EQ(ShardReader((dir / "cli.bin").string()).vocab_size(), 400);

  make_corpus(dir / "corpus");
  r = run_data_cli({"prepare", "--corpus", (dir / "corpus").string(), "--out", (dir / "tokens").string(), "--vocab",
                    "400"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("encoding"), std::string::npos) << r.err;  // the progress bar
  EXPECT_NE(r.err.find("6/6 files"), std::string::npos) << r.err;
  r = run_data_cli({"prepare", "--corpus", (dir / "corpus").string(), "--out", (dir / "tokens").string(), "--vocab",
                    "400"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("is up to date"), std::string::npos) << r.out;

  // User errors: one line on stderr, exit code 1.
  r = run_data_cli({"encode", "--tokenizer", (dir / "missing.model").string(), (dir / "text.txt").string(), "--out",
                    (dir / "x.bin").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err.rfind("moelab: error: tokenizer model '", 0), 0u) << r.err;
  r = run_data_cli({"encode", "--tokenizer", (dir / "cli.model").string(), (dir / "nope.txt").string(), "--out",
                    (dir / "x.bin").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("nope.txt' does not exist"), std::string::npos) << r.err;
  r = run_data_cli({"prepare", "--corpus", (dir / "none").string(), "--out", (dir / "o").string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("moelab: error: corpus directory"), std::string::npos) << r.err;
}

// ----- compressed inputs -------------------------------------------------------------------------------------------

namespace compressed {

// Runs a shell command (gzip, zstd: the tools users compress corpora with) and fails the test if it fails.
void sh(const std::string& command) { ASSERT_EQ(std::system(command.c_str()), 0) << command; }

std::vector<TextSegment> segments_of(const std::vector<std::string>& files) {
  TextReader reader(files);
  std::vector<TextSegment> out;
  TextSegment s;
  while (reader.next(s)) out.push_back(s);
  return out;
}

void expect_same_segments(const std::vector<TextSegment>& a, const std::vector<TextSegment>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].text, b[i].text) << what << " segment " << i;
    EXPECT_EQ(a[i].newline_after, b[i].newline_after) << what << " segment " << i;
    EXPECT_EQ(a[i].document_end, b[i].document_end) << what << " segment " << i;
  }
}

}  // namespace compressed

TEST_F(DataTest, GzipAndZstdInputsReadLikeTheirPlainCopies) {
  using namespace compressed;
  // Text with a line longer than the reader's 64 KB pieces, non-ASCII, blank lines and no final newline.
  std::string text = english_text(2000, 21);
  text += "\n\n" + std::string(200000, 'x') + " long line end\nGr\xc3\xbc\xc3\x9f" "e, \xe6\x97\xa5\xe6\x9c\xac, "
          "\xf0\x9f\x99\x82\nlast line without newline";
  write_text(dir / "doc.txt", text);
  write_text(dir / "docs.jsonl", "{\"text\": \"first\\nsecond\"}\n\n{\"text\": \"" + english_text(5, 3) + "\"}\n");
  const std::string d = dir.string();
  sh("gzip -k -c " + d + "/doc.txt > " + d + "/doc.txt.gz");
  sh("zstd -q -c " + d + "/doc.txt > " + d + "/doc.txt.zst");
  sh("gzip -c " + d + "/docs.jsonl > " + d + "/docs.jsonl.gz");
  sh("zstd -q -c " + d + "/docs.jsonl > " + d + "/docs.jsonl.zst");
  // Several gzip members and zstd frames in one file, as pigz/bgzip and `cat a.zst b.zst` make.
  sh("head -c 100000 " + d + "/doc.txt | gzip -c > " + d + "/multi.txt.gz && tail -c +100001 " + d +
     "/doc.txt | gzip -c >> " + d + "/multi.txt.gz");
  sh("head -c 70000 " + d + "/doc.txt | zstd -q -c > " + d + "/multi.txt.zst && tail -c +70001 " + d +
     "/doc.txt | zstd -q -c >> " + d + "/multi.txt.zst");
  // A compressed file is told by its bytes, not only its name.
  sh("zstd -q -c " + d + "/doc.txt > " + d + "/unnamed.txt");

  EXPECT_EQ(read_input_file(d + "/doc.txt.gz"), text);
  EXPECT_EQ(read_input_file(d + "/doc.txt.zst"), text);
  EXPECT_EQ(read_input_file(d + "/multi.txt.gz"), text);
  EXPECT_EQ(read_input_file(d + "/multi.txt.zst"), text);
  EXPECT_EQ(read_input_file(d + "/unnamed.txt"), text);
  EXPECT_EQ(detect_compression(d + "/doc.txt"), Compression::None);
  EXPECT_EQ(detect_compression(d + "/doc.txt.gz"), Compression::Gzip);
  EXPECT_EQ(detect_compression(d + "/unnamed.txt"), Compression::Zstd);

  const auto plain = segments_of({d + "/doc.txt", d + "/docs.jsonl"});
  ASSERT_GT(plain.size(), 300u);
  expect_same_segments(plain, segments_of({d + "/doc.txt.gz", d + "/docs.jsonl.gz"}), "gzip");
  expect_same_segments(plain, segments_of({d + "/doc.txt.zst", d + "/docs.jsonl.zst"}), "zstd");
  expect_same_segments(plain, segments_of({d + "/multi.txt.gz", d + "/docs.jsonl.zst"}), "multi-member gzip");
  expect_same_segments(plain, segments_of({d + "/multi.txt.zst", d + "/docs.jsonl.gz"}), "multi-frame zstd");
  EXPECT_TRUE(is_jsonl_path("a/b.jsonl.zst"));
  EXPECT_TRUE(is_jsonl_path("b.jsonl.gz"));
  EXPECT_FALSE(is_jsonl_path("b.txt.gz"));

  // Progress counts the files' own (compressed) bytes; statistics count text bytes.
  TextReader reader({d + "/doc.txt.zst"});
  TextSegment s;
  while (reader.next(s)) {
  }
  EXPECT_EQ(reader.file_bytes_read(), static_cast<int64_t>(fs::file_size(dir / "doc.txt.zst")));
  EXPECT_EQ(reader.bytes_read(), static_cast<int64_t>(text.size()));

  // The same shard from the compressed and the plain file, and a tokenizer trained on either is the same.
  const std::string tok_path = small_tokenizer();
  const Tokenizer tok(tok_path);
  encode_to_shard(tok, {d + "/doc.txt", d + "/docs.jsonl"}, d + "/plain.bin", 2);
  encode_to_shard(tok, {d + "/doc.txt.zst", d + "/docs.jsonl.gz"}, d + "/packed.bin", 2);
  EXPECT_EQ(slurp(dir / "plain.bin"), slurp(dir / "packed.bin"));
  TokenizerTrainOptions options;
  options.vocab_size = 400;
  train_tokenizer({d + "/docs.jsonl", d + "/doc.txt"}, d + "/plain.model", options);
  train_tokenizer({d + "/docs.jsonl.zst", d + "/doc.txt.gz"}, d + "/packed.model", options);
  EXPECT_EQ(slurp(dir / "plain.model"), slurp(dir / "packed.model"));
}

TEST_F(DataTest, DamagedCompressedInputsAreNamedInTheError) {
  using namespace compressed;
  const std::string d = dir.string();
  write_text(dir / "doc.txt", english_text(3000, 5));
  sh("gzip -c " + d + "/doc.txt > " + d + "/doc.txt.gz");
  sh("zstd -q -c " + d + "/doc.txt > " + d + "/doc.txt.zst");
  auto read_all = [](const std::string& path) { segments_of({path}); };
  // Truncated: the second half of the file is missing.
  for (const char* ext : {"gz", "zst"}) {
    const std::string full = d + "/doc.txt." + ext, cut = d + "/cut.txt." + ext;
    sh("head -c " + std::to_string(fs::file_size(full) / 2) + " " + full + " > " + cut);
    const std::string msg = error_of([&] { read_all(cut); });
    EXPECT_NE(msg.find("input '" + cut + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("ends ")), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string(ext[0] == 'g' ? "gzip -t" : "zstd -t")), std::string::npos) << msg;
  }
  // Corrupt: bytes overwritten in the middle of the compressed data.
  for (const char* ext : {"gz", "zst"}) {
    const std::string full = d + "/doc.txt." + ext, bad = d + "/bad.txt." + ext;
    std::string bytes = slurp(full);
    for (size_t i = bytes.size() / 2; i < bytes.size() / 2 + 64; ++i) bytes[i] = static_cast<char>(bytes[i] ^ 0x5a);
    write_text(bad, bytes);
    const std::string msg = error_of([&] { read_all(bad); });
    EXPECT_NE(msg.find("input '" + bad + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("corrupt"), std::string::npos) << msg;
    EXPECT_NE(msg.find("at compressed byte"), std::string::npos) << msg;
  }
  // Named .gz, but plain text.
  write_text(dir / "plain.txt.gz", "not compressed at all\n");
  std::string msg = error_of([&] { read_all(d + "/plain.txt.gz"); });
  EXPECT_NE(msg.find("plain.txt.gz' is named like a gzip file but does not start with the gzip magic bytes"),
            std::string::npos)
      << msg;
  // The CLI says the same in one line.
  const std::string tok_path = small_tokenizer();
  const CliRun r = run_data_cli({"encode", "--tokenizer", tok_path, d + "/bad.txt.zst", "--out", d + "/x.bin", "-q"});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err.rfind("moelab: error: input '" + d + "/bad.txt.zst': corrupt zstd data", 0), 0u) << r.err;
  EXPECT_FALSE(fs::exists(dir / "x.bin"));
}

TEST_F(DataTest, PrepareReadsACompressedCorpusToTheSameShards) {
  using namespace compressed;
  const fs::path plain = dir / "plain", packed = dir / "packed";
  make_corpus(plain);
  // The same corpus compressed file by file: train/ as zstd, val/ and ood/ as gzip.
  for (const auto& entry : fs::recursive_directory_iterator(plain)) {
    if (!entry.is_regular_file()) continue;
    const fs::path rel = entry.path().lexically_relative(plain);
    const fs::path target = packed / rel;
    fs::create_directories(target.parent_path());
    const bool train = rel.begin()->string() == "train";
    sh(std::string(train ? "zstd -q -c " : "gzip -c ") + entry.path().string() + " > " + target.string() +
       (train ? ".zst" : ".gz"));
  }
  const CliRun a = run_data_cli({"prepare", "--corpus", plain.string(), "--out", (dir / "tok_plain").string(),
                                 "--vocab", "400"});
  ASSERT_EQ(a.code, 0) << a.err;
  const CliRun b = run_data_cli({"prepare", "--corpus", packed.string(), "--out", (dir / "tok_packed").string(),
                                 "--vocab", "400"});
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_NE(b.err.find("6/6 files"), std::string::npos) << b.err;  // progress reaches the end in file bytes
  for (const char* name : {"tokenizer.model", "train.bin", "val.bin", "ood_code.bin", "ood_wordnet.bin"})
    EXPECT_EQ(slurp(dir / "tok_plain" / name), slurp(dir / "tok_packed" / name)) << name;
  const auto meta_plain = nlohmann::json::parse(slurp(dir / "tok_plain" / "meta.json"));
  const auto meta_packed = nlohmann::json::parse(slurp(dir / "tok_packed" / "meta.json"));
  EXPECT_EQ(meta_plain["shards"], meta_packed["shards"]);  // tokens, documents and text bytes alike
}

}  // namespace
