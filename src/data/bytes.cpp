#include "data/bytes.h"

#include <algorithm>
#include <cstdint>
#include <filesystem>

#include "core/error.h"
#include "core/io.h"

namespace moelab {

ByteEncodeResult encode_bytes(const std::vector<std::string>& inputs, const std::string& train_out,
                              const std::string& val_out, double val_fraction) {
  if (inputs.empty()) throw Error("no input files given");
  // Directories contribute every regular file below them, in sorted order, so the output is reproducible.
  std::vector<std::string> files;
  for (const auto& input : inputs) {
    namespace fs = std::filesystem;
    if (!fs::exists(input)) throw Error("input '" + input + "' does not exist");
    if (!fs::is_directory(input)) {
      files.push_back(input);
      continue;
    }
    std::vector<std::string> found;
    for (const auto& entry : fs::recursive_directory_iterator(input))
      if (entry.is_regular_file() && entry.path().filename().string()[0] != '.') found.push_back(entry.path().string());
    std::sort(found.begin(), found.end());
    if (found.empty()) throw Error("directory '" + input + "' contains no files");
    files.insert(files.end(), found.begin(), found.end());
  }
  std::string train_bytes, val_bytes;
  ByteEncodeResult result;
  for (const auto& path : files) {
    const std::string text = read_file(path, "input text");
    const size_t split = val_out.empty() ? text.size() : static_cast<size_t>(text.size() * (1.0 - val_fraction));
    for (size_t i = 0; i < text.size(); ++i) {
      const uint16_t token = static_cast<uint8_t>(text[i]);
      std::string& dst = i < split ? train_bytes : val_bytes;
      dst.push_back(static_cast<char>(token & 0xff));
      dst.push_back(static_cast<char>(token >> 8));
    }
  }
  result.train_tokens = static_cast<int64_t>(train_bytes.size() / 2);
  result.val_tokens = static_cast<int64_t>(val_bytes.size() / 2);
  if (result.train_tokens == 0) throw Error("the input files are empty: nothing to encode");
  write_file_atomic(train_out, train_bytes);
  if (!val_out.empty()) write_file_atomic(val_out, val_bytes);
  return result;
}

}  // namespace moelab
