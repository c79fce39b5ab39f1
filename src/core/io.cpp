#include "core/io.h"

#include <openssl/sha.h>

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moelab {

void write_file_atomic(const std::string& path, const std::string& content) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  if (target.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(target.parent_path(), ec);
    if (ec)
      throw Error("cannot create directory '" + target.parent_path().string() + "' for '" + path +
                  "': " + ec.message() + "; choose a location you can write");
  }
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write '" + tmp + "': check that the directory is writable");
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
    out.flush();
    if (!out) throw Error("failed writing '" + tmp + "' (disk full?)");
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp);
    throw Error("cannot rename '" + tmp + "' to '" + path + "': " + ec.message());
  }
}

void ensure_writable_directory(const std::string& path, const std::string& what, const std::string& fix) {
  namespace fs = std::filesystem;
  if (path.empty()) throw Error(what + " is empty; " + fix);
  std::error_code ec;
  fs::create_directories(path, ec);
  std::string reason;
  if (ec) reason = ec.message();
  else if (!fs::is_directory(path, ec)) reason = "it exists and is not a directory";
  else if (::access(path.c_str(), W_OK | X_OK) != 0) reason = std::string("it is not writable (") + std::strerror(errno) + ")";
  if (!reason.empty()) throw Error(what + " '" + path + "' cannot be created: " + reason + "; " + fix);
}

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + what + " '" + path + "': check the path");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string sha256_file(const std::string& path) {
  const std::string bytes = read_file(path, "file to hash");
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), digest);
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (unsigned char b : digest) out += kHex[b >> 4], out += kHex[b & 15];
  return out;
}

}  // namespace moelab
