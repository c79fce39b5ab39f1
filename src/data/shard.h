#pragma once
// Token shards: a 64-byte header then little-endian token ids (see docs/tokens.md for the byte layout).
//
//   offset  size  field
//        0     8  magic "MOELABTK"
//        8     4  uint32 version (1)
//       12     4  uint32 vocab_size
//       16     4  uint32 dtype_bytes: 2 (uint16, vocab <= 65536) or 4 (uint32)
//       20     4  uint32 reserved (0)
//       24     8  uint64 token_count
//       32    32  zero
//       64     .  token_count ids of dtype_bytes each
//
// Documents are separated by the tokenizer's end-of-document id (`</s>`), appended after each document.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace moelab {

inline constexpr char kShardMagic[8] = {'M', 'O', 'E', 'L', 'A', 'B', 'T', 'K'};
inline constexpr size_t kShardHeaderBytes = 64;
inline constexpr uint32_t kShardVersion = 1;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t vocab_size = 0;
  uint32_t dtype_bytes = 0;  // 2 or 4
  uint64_t token_count = 0;
};

// 2 (uint16) when every id of a vocabulary of `vocab_size` fits 16 bits, else 4 (uint32).
uint32_t shard_dtype_bytes(int64_t vocab_size);
// The 64 header bytes for `header`.
std::vector<uint8_t> encode_shard_header(const ShardHeader& header);
// True when the first 8 of `bytes` bytes at `data` are the shard magic.
bool has_shard_magic(const void* data, size_t bytes);
// Parses and validates the header of a shard whose whole file (`file_bytes` long) is mapped at `data`: magic,
// version, dtype and that the file holds exactly 64 + token_count * dtype_bytes bytes. Throws Error naming `path`.
ShardHeader parse_shard_header(const void* data, size_t file_bytes, const std::string& path);

// A read-only memory map of a whole file; empty files map to nothing (data() == nullptr, size() == 0).
class MappedFile {
 public:
  // `what` names the file in errors ("token file", "token shard"); `hint` is appended to the open error.
  MappedFile(const std::string& path, const std::string& what, const std::string& hint);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(map_); }
  size_t size() const { return bytes_; }

 private:
  void* map_ = nullptr;
  size_t bytes_ = 0;
};

// Streams token ids into `path`: the ids go to `path.tmp.<pid>` behind a zeroed header (no magic), and finish()
// writes the header and renames the file into place, so a killed writer never leaves a valid-looking shard.
// Destroying an unfinished writer removes its temporary file.
class ShardWriter {
 public:
  ShardWriter(const std::string& path, int64_t vocab_size);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Every id must lie in [0, vocab_size).
  void append(std::span<const int32_t> tokens);
  uint64_t token_count() const { return count_; }
  uint32_t dtype_bytes() const { return dtype_bytes_; }
  // Writes the header, flushes and renames; returns the final token count.
  uint64_t finish();

 private:
  std::string path_, tmp_path_;
  std::FILE* file_ = nullptr;
  uint32_t vocab_size_ = 0;
  uint32_t dtype_bytes_ = 2;
  uint64_t count_ = 0;
  std::vector<uint8_t> buffer_;  // encoded ids not yet written
  void flush_buffer();
};

// A memory-mapped, validated shard.
class ShardReader {
 public:
  explicit ShardReader(const std::string& path);
  int64_t size() const { return static_cast<int64_t>(header_.token_count); }
  int32_t at(int64_t i) const {
    return header_.dtype_bytes == 4 ? static_cast<int32_t>(reinterpret_cast<const uint32_t*>(tokens_)[i])
                                    : static_cast<int32_t>(reinterpret_cast<const uint16_t*>(tokens_)[i]);
  }
  int64_t vocab_size() const { return header_.vocab_size; }
  uint32_t dtype_bytes() const { return header_.dtype_bytes; }
  const std::string& path() const { return path_; }
  // Ids [first, first + count) widened to int32.
  std::vector<int32_t> read(int64_t first, int64_t count) const;
  std::vector<int32_t> read_all() const { return read(0, size()); }

 private:
  std::string path_;
  MappedFile map_;
  ShardHeader header_;
  const uint8_t* tokens_ = nullptr;
};

}  // namespace moelab
