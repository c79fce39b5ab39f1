#pragma once
#include <string>

namespace moelab {

// Writes `content` to `path` via a temporary file in the same directory and a rename, so a crash never leaves
// a half-written file behind. Creates parent directories.
void write_file_atomic(const std::string& path, const std::string& content);
std::string read_file(const std::string& path, const std::string& what);
// Creates directory `path` (and its parents) if need be and checks that it is writable. Errors name the setting
// and the cause: "<what> '<path>' cannot be created: <reason>; <fix>" (also when it exists as a file or is not
// writable).
void ensure_writable_directory(const std::string& path, const std::string& what, const std::string& fix);
// The SHA-256 of a file's bytes, as 64 lowercase hex digits (OpenSSL).
std::string sha256_file(const std::string& path);

}  // namespace moelab
