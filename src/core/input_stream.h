#pragma once
// Reading an input file that may be compressed: plain, gzip (.gz, zlib) or Zstandard (.zst, libzstd), streamed
// in fixed-size pieces, never decompressed to a temporary file. The format is told by the file's first bytes
// (gzip 1f 8b, zstd 28 b5 2f fd), so a compressed file is read whatever its name; a name ending in .gz or .zst
// whose bytes are not that format is an error. Concatenated gzip members and zstd frames (pigz, bgzip, zstd -T)
// are read one after the other, as the command-line tools do.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>

namespace moelab {

enum class Compression { None, Gzip, Zstd };
const char* compression_name(Compression c);  // "none", "gzip", "zstd"

// The format of `path` from its first bytes (and its name, which must agree when it says .gz or .zst).
// Throws Error when the file cannot be opened or its name and bytes disagree.
Compression detect_compression(const std::string& path);

// `path` without a trailing .gz / .zst / .zstd: "books/a.jsonl.zst" -> "books/a.jsonl".
std::string strip_compression_suffix(const std::string& path);

// The decompressed bytes of one file. Errors (unreadable, corrupt or truncated stream) throw Error naming the file
// and the compressed offset.
class InputStream {
 public:
  explicit InputStream(const std::string& path);
  ~InputStream();
  InputStream(const InputStream&) = delete;
  InputStream& operator=(const InputStream&) = delete;

  // Fills `buffer` with up to `size` decompressed bytes; returns how many (0 only at the end of the data).
  size_t read(char* buffer, size_t size);
  const std::string& path() const { return path_; }
  Compression compression() const { return compression_; }
  int64_t file_bytes_read() const { return file_bytes_read_; }  // bytes of the file consumed so far (progress)

 private:
  struct Decoder;
  size_t read_file(char* buffer, size_t size);  // raw bytes of the file
  [[noreturn]] void fail(const std::string& what) const;

  std::string path_;
  std::FILE* file_ = nullptr;
  Compression compression_ = Compression::None;
  std::unique_ptr<Decoder> decoder_;
  int64_t file_bytes_read_ = 0;
};

// The whole decompressed content of `path` (plain, gzip or zstd).
std::string read_input_file(const std::string& path);

// Lines of an InputStream: each call gives the next line without its '\n'.
class LineStream {
 public:
  explicit LineStream(const std::string& path);
  // False at the end. `newline_after`: a '\n' ended the line; `last`: no byte follows it in the file.
  bool next(std::string& line, bool& newline_after, bool& last);
  int64_t file_bytes_read() const { return stream_.file_bytes_read(); }
  const std::string& path() const { return stream_.path(); }

 private:
  bool fill();  // reads more into buffer_; false at the end of the data
  InputStream stream_;
  std::string buffer_;
  size_t pos_ = 0;      // start of the next line in buffer_
  size_t scanned_ = 0;  // buffer_ holds no '\n' between pos_ and here
  bool eof_ = false;
};

}  // namespace moelab
