#include "core/input_stream.h"

#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "core/error.h"

namespace moelab {

namespace {

constexpr size_t kFileChunk = size_t{256} << 10;  // compressed bytes read from the file at a time

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Compression compression_of_name(const std::string& path) {
  if (ends_with(path, ".gz")) return Compression::Gzip;
  if (ends_with(path, ".zst") || ends_with(path, ".zstd")) return Compression::Zstd;
  return Compression::None;
}

Compression compression_of_magic(const unsigned char* bytes, size_t n) {
  if (n >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b) return Compression::Gzip;
  if (n >= 4 && bytes[0] == 0x28 && bytes[1] == 0xb5 && bytes[2] == 0x2f && bytes[3] == 0xfd) return Compression::Zstd;
  return Compression::None;
}

std::FILE* open_or_throw(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f)
    throw Error("cannot open input '" + path + "': " + std::strerror(errno) + "; check the path and its permissions");
  return f;
}

}  // namespace

const char* compression_name(Compression c) {
  switch (c) {
    case Compression::Gzip: return "gzip";
    case Compression::Zstd: return "zstd";
    default: return "none";
  }
}

std::string strip_compression_suffix(const std::string& path) {
  for (const char* suffix : {".gz", ".zst", ".zstd"})
    if (ends_with(path, suffix)) return path.substr(0, path.size() - std::strlen(suffix));
  return path;
}

Compression detect_compression(const std::string& path) {
  std::FILE* f = open_or_throw(path);
  unsigned char magic[4] = {0, 0, 0, 0};
  const size_t n = std::fread(magic, 1, sizeof(magic), f);
  std::fclose(f);
  const Compression by_bytes = compression_of_magic(magic, n);
  const Compression by_name = compression_of_name(path);
  if (by_name != Compression::None && by_bytes != by_name)
    throw Error("input '" + path + "' is named like a " + compression_name(by_name) +
                " file but does not start with the " + compression_name(by_name) + " magic bytes (" +
                (by_name == Compression::Gzip ? "1f 8b" : "28 b5 2f fd") +
                "); it is damaged or not compressed: check it with `" +
                (by_name == Compression::Gzip ? "gzip -t" : "zstd -t") + "`, or rename it");
  return by_bytes;
}

// The decompressor's state: the file's bytes not yet consumed, and zlib's or zstd's context.
struct InputStream::Decoder {
  std::vector<char> in = std::vector<char>(kFileChunk);
  size_t in_pos = 0, in_len = 0;
  bool file_end = false;
  bool inside = false;  // inside a gzip member or zstd frame (the file must not end here)
  z_stream zlib{};
  bool zlib_ready = false;
  ZSTD_DCtx* zstd = nullptr;
  ~Decoder() {
    if (zlib_ready) inflateEnd(&zlib);
    if (zstd) ZSTD_freeDCtx(zstd);
  }
};

InputStream::InputStream(const std::string& path) : path_(path) {
  compression_ = detect_compression(path);
  file_ = open_or_throw(path);
  if (compression_ == Compression::None) return;
  decoder_ = std::make_unique<Decoder>();
  if (compression_ == Compression::Gzip) {
    // 15 + 32: the largest window, and a gzip (or zlib) header detected automatically.
    if (inflateInit2(&decoder_->zlib, 15 + 32) != Z_OK) fail("zlib could not start a decompressor");
    decoder_->zlib_ready = true;
  } else {
    decoder_->zstd = ZSTD_createDCtx();
    if (!decoder_->zstd) fail("libzstd could not start a decompressor");
  }
}

InputStream::~InputStream() {
  if (file_) std::fclose(file_);
}

void InputStream::fail(const std::string& what) const {
  const int64_t offset = decoder_ ? file_bytes_read_ - static_cast<int64_t>(decoder_->in_len - decoder_->in_pos)
                                  : file_bytes_read_;
  throw Error("input '" + path_ + "': " + what + " (at compressed byte " + std::to_string(offset) +
              "); the file is damaged or truncated: check it with `" +
              (compression_ == Compression::Gzip ? "gzip -t" : "zstd -t") + " " + path_ +
              "` and download or recompress it");
}

size_t InputStream::read_file(char* buffer, size_t size) {
  const size_t n = std::fread(buffer, 1, size, file_);
  if (n < size && std::ferror(file_))
    throw Error("failed reading input '" + path_ + "': " + std::strerror(errno));
  file_bytes_read_ += static_cast<int64_t>(n);
  return n;
}

size_t InputStream::read(char* buffer, size_t size) {
  if (size == 0) return 0;
  if (compression_ == Compression::None) return read_file(buffer, size);
  Decoder& d = *decoder_;
  auto refill = [&] {
    if (d.in_pos < d.in_len || d.file_end) return;
    d.in_len = read_file(d.in.data(), d.in.size());
    d.in_pos = 0;
    d.file_end = d.in_len == 0;
  };
  if (compression_ == Compression::Gzip) {
    z_stream& z = d.zlib;
    z.next_out = reinterpret_cast<Bytef*>(buffer);
    z.avail_out = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    const uInt wanted = z.avail_out;
    for (;;) {
      refill();
      const size_t available = d.in_len - d.in_pos;
      if (available == 0 && !d.inside) return wanted - z.avail_out;  // the end, between members
      z.next_in = reinterpret_cast<Bytef*>(d.in.data() + d.in_pos);
      z.avail_in = static_cast<uInt>(available);
      d.inside = true;
      const int rc = inflate(&z, Z_NO_FLUSH);
      d.in_pos += available - z.avail_in;
      if (rc == Z_STREAM_END) {
        d.inside = false;  // one member done; another may follow (pigz, bgzip, cat a.gz b.gz)
        if (inflateReset(&z) != Z_OK) fail("zlib could not restart after a gzip member");
      } else if (rc == Z_BUF_ERROR) {
        if (d.file_end && d.in_pos == d.in_len) fail("the gzip stream ends before its last member does");
      } else if (rc != Z_OK) {
        fail(std::string("corrupt gzip data (zlib: ") + (z.msg ? z.msg : "error " + std::to_string(rc)) + ")");
      }
      if (z.avail_out < wanted) return wanted - z.avail_out;
    }
  }
  // Zstandard.
  ZSTD_outBuffer out{buffer, size, 0};
  for (;;) {
    refill();
    ZSTD_inBuffer in{d.in.data() + d.in_pos, d.in_len - d.in_pos, 0};
    if (in.size == 0 && !d.inside) return 0;
    const size_t rc = ZSTD_decompressStream(d.zstd, &out, &in);
    d.in_pos += in.pos;
    if (ZSTD_isError(rc)) fail(std::string("corrupt zstd data (libzstd: ") + ZSTD_getErrorName(rc) + ")");
    d.inside = rc != 0;  // 0: a frame ended and everything is flushed
    if (out.pos > 0) return out.pos;
    if (d.file_end && d.in_pos == d.in_len && d.inside) fail("the zstd stream ends inside a frame");
  }
}

std::string read_input_file(const std::string& path) {
  InputStream stream(path);
  std::string text;
  constexpr size_t kPiece = size_t{1} << 20;
  for (;;) {
    const size_t old = text.size();
    text.resize(old + kPiece);
    const size_t n = stream.read(text.data() + old, kPiece);
    text.resize(old + n);
    if (n == 0) return text;
  }
}

// ----- lines -----------------------------------------------------------------------------------------------------

LineStream::LineStream(const std::string& path) : stream_(path) {}

bool LineStream::fill() {
  if (eof_) return false;
  if (pos_ > 0) {
    buffer_.erase(0, pos_);
    scanned_ -= pos_;
    pos_ = 0;
  }
  constexpr size_t kPiece = size_t{64} << 10;
  const size_t old = buffer_.size();
  buffer_.resize(old + kPiece);
  const size_t n = stream_.read(buffer_.data() + old, kPiece);
  buffer_.resize(old + n);
  if (n == 0) eof_ = true;
  return n > 0;
}

bool LineStream::next(std::string& line, bool& newline_after, bool& last) {
  for (;;) {
    const size_t nl = buffer_.find('\n', std::max(pos_, scanned_));
    if (nl != std::string::npos) {
      line.assign(buffer_, pos_, nl - pos_);
      pos_ = nl + 1;
      scanned_ = pos_;
      newline_after = true;
      last = pos_ == buffer_.size() && !fill();
      return true;
    }
    scanned_ = buffer_.size();  // no '\n' up to here: a long line is scanned once, not once per piece
    if (!fill()) {
      if (pos_ == buffer_.size()) return false;
      line.assign(buffer_, pos_, std::string::npos);
      pos_ = scanned_ = buffer_.size();
      newline_after = false;
      last = true;
      return true;
    }
  }
}

}  // namespace moelab
