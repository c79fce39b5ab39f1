#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace moelab {

static_assert(std::endian::native == std::endian::little, "token shards are little-endian; add byte swaps here");

namespace {

constexpr const char* kRecreate = "; re-create it with `moelab data prepare`";

void put_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void put_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace

uint32_t shard_dtype_bytes(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

std::vector<uint8_t> encode_shard_header(const ShardHeader& header) {
  std::vector<uint8_t> bytes(kShardHeaderBytes, 0);
  std::memcpy(bytes.data(), kShardMagic, sizeof(kShardMagic));
  put_u32(bytes.data() + 8, header.version);
  put_u32(bytes.data() + 12, header.vocab_size);
  put_u32(bytes.data() + 16, header.dtype_bytes);
  put_u32(bytes.data() + 20, 0);
  put_u64(bytes.data() + 24, header.token_count);
  return bytes;
}

bool has_shard_magic(const void* data, size_t bytes) {
  return data && bytes >= sizeof(kShardMagic) && std::memcmp(data, kShardMagic, sizeof(kShardMagic)) == 0;
}

ShardHeader parse_shard_header(const void* data, size_t file_bytes, const std::string& path) {
  if (!has_shard_magic(data, file_bytes))
    throw Error("'" + path + "' is not a moelab token shard (bad magic); create one with `moelab data prepare`");
  if (file_bytes < kShardHeaderBytes)
    throw Error("token shard '" + path + "' is truncated: " + std::to_string(file_bytes) +
                " bytes, shorter than its 64-byte header" + kRecreate);
  const auto* p = static_cast<const uint8_t*>(data);
  ShardHeader h;
  h.version = get_u32(p + 8);
  h.vocab_size = get_u32(p + 12);
  h.dtype_bytes = get_u32(p + 16);
  h.token_count = get_u64(p + 24);
  if (h.version != kShardVersion)
    throw Error("token shard '" + path + "' has format version " + std::to_string(h.version) +
                ", but this moelab reads version " + std::to_string(kShardVersion) + kRecreate);
  if (h.dtype_bytes != 2 && h.dtype_bytes != 4)
    throw Error("token shard '" + path + "' has dtype_bytes " + std::to_string(h.dtype_bytes) +
                " (must be 2 or 4): the header is corrupt" + kRecreate);
  if (h.vocab_size == 0 || (h.dtype_bytes == 2 && h.vocab_size > 65536))
    throw Error("token shard '" + path + "' has vocab_size " + std::to_string(h.vocab_size) + " with " +
                std::to_string(h.dtype_bytes) + "-byte ids: the header is corrupt" + kRecreate);
  // A corrupt count must not overflow the expected size.
  const uint64_t max_count = (UINT64_MAX - kShardHeaderBytes) / h.dtype_bytes;
  const bool count_fits = h.token_count <= max_count;
  const uint64_t expected = count_fits ? kShardHeaderBytes + h.token_count * h.dtype_bytes : 0;
  if (!count_fits || expected != file_bytes) {
    const std::string promise = "its header promises " + std::to_string(h.token_count) + " tokens (" +
                                (count_fits ? std::to_string(expected) : std::string("too many")) +
                                " bytes) but the file has " + std::to_string(file_bytes) + " bytes";
    if (count_fits && file_bytes < expected)
      throw Error("token shard '" + path + "' is truncated: " + promise + kRecreate);
    throw Error("token shard '" + path + "' is corrupt: " + promise + kRecreate);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------------------------

MappedFile::MappedFile(const std::string& path, const std::string& what, const std::string& hint) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open " + what + " '" + path + "': " + std::strerror(errno) + hint);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("cannot read " + what + " '" + path + "': not a regular file" + hint);
  }
  bytes_ = static_cast<size_t>(st.st_size);
  if (bytes_ > 0) {
    map_ = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map_ == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      map_ = nullptr;
      throw Error("cannot map " + what + " '" + path + "': " + std::strerror(err));
    }
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (map_) ::munmap(map_, bytes_);
}

// ---------------------------------------------------------------------------------------------------------------

ShardWriter::ShardWriter(const std::string& path, int64_t vocab_size) : path_(path) {
  if (vocab_size <= 0 || vocab_size > static_cast<int64_t>(UINT32_MAX))
    throw Error("token shard vocabulary size must be in [1, 2^32), got " + std::to_string(vocab_size));
  vocab_size_ = static_cast<uint32_t>(vocab_size);
  dtype_bytes_ = shard_dtype_bytes(vocab_size);
  namespace fs = std::filesystem;
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  tmp_path_ = path + ".tmp." + std::to_string(::getpid());
  file_ = std::fopen(tmp_path_.c_str(), "wb");
  if (!file_) throw Error("cannot write '" + tmp_path_ + "': " + std::strerror(errno) + "; is the directory writable?");
  // A zeroed placeholder header: the magic only appears once finish() knows the count.
  const std::vector<uint8_t> zeros(kShardHeaderBytes, 0);
  if (std::fwrite(zeros.data(), 1, zeros.size(), file_) != zeros.size())
    throw Error("failed writing '" + tmp_path_ + "' (disk full?)");
  buffer_.reserve(1 << 20);
}

ShardWriter::~ShardWriter() {
  if (file_) {
    std::fclose(file_);
    std::remove(tmp_path_.c_str());
  }
}

void ShardWriter::append(std::span<const int32_t> tokens) {
  MOELAB_CHECK(file_ != nullptr, "ShardWriter::append after finish");
  const size_t start = buffer_.size();
  buffer_.resize(start + tokens.size() * dtype_bytes_);
  uint8_t* out = buffer_.data() + start;
  for (const int32_t id : tokens) {
    MOELAB_CHECK(id >= 0 && static_cast<uint32_t>(id) < vocab_size_,
                 "token id " + std::to_string(id) + " outside the shard vocabulary " + std::to_string(vocab_size_));
    if (dtype_bytes_ == 2) {
      const uint16_t v = static_cast<uint16_t>(id);
      std::memcpy(out, &v, 2);
    } else {
      const uint32_t v = static_cast<uint32_t>(id);
      std::memcpy(out, &v, 4);
    }
    out += dtype_bytes_;
  }
  count_ += tokens.size();
  if (buffer_.size() >= (1u << 20)) flush_buffer();
}

void ShardWriter::flush_buffer() {
  if (buffer_.empty()) return;
  if (std::fwrite(buffer_.data(), 1, buffer_.size(), file_) != buffer_.size())
    throw Error("failed writing '" + tmp_path_ + "' (disk full?)");
  buffer_.clear();
}

uint64_t ShardWriter::finish() {
  MOELAB_CHECK(file_ != nullptr, "ShardWriter::finish called twice");
  flush_buffer();
  ShardHeader header;
  header.vocab_size = vocab_size_;
  header.dtype_bytes = dtype_bytes_;
  header.token_count = count_;
  const std::vector<uint8_t> bytes = encode_shard_header(header);
  const bool ok = std::fseek(file_, 0, SEEK_SET) == 0 &&
                  std::fwrite(bytes.data(), 1, bytes.size(), file_) == bytes.size() && std::fflush(file_) == 0 &&
                  ::fsync(::fileno(file_)) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!ok || !closed) {
    std::remove(tmp_path_.c_str());
    throw Error("failed writing '" + tmp_path_ + "' (disk full?)");
  }
  std::error_code ec;
  std::filesystem::rename(tmp_path_, path_, ec);
  if (ec) {
    std::remove(tmp_path_.c_str());
    throw Error("cannot rename '" + tmp_path_ + "' to '" + path_ + "': " + ec.message());
  }
  return count_;
}

// ---------------------------------------------------------------------------------------------------------------

ShardReader::ShardReader(const std::string& path)
    : path_(path), map_(path, "token shard", " (create one with `moelab data prepare` or `moelab data encode`)") {
  header_ = parse_shard_header(map_.data(), map_.size(), path);
  tokens_ = map_.data() + kShardHeaderBytes;
}

std::vector<int32_t> ShardReader::read(int64_t first, int64_t count) const {
  MOELAB_CHECK(first >= 0 && count >= 0 && first + count <= size(), "ShardReader::read out of range");
  std::vector<int32_t> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[i] = at(first + i);
  return out;
}

}  // namespace moelab
