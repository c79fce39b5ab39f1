// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header
// naming every tensor's dtype, shape and byte range, then the data. moelab writes F32 (checkpoints, Hugging Face
// export) and reads F32, F16 and BF16 (checkpoints, Hugging Face imports).
#include "core/safetensors.h"

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"

namespace moelab {
using nlohmann::json;

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float v;
  if (exponent == 0) v = std::ldexp(static_cast<float>(mantissa), -24);                   // subnormal or zero
  else if (exponent == 31) v = mantissa ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  return sign ? -v : v;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  size_t offset = 0;
  for (const auto& t : tensors) {
    std::vector<int64_t> shape(t.shape.dims.begin(), t.shape.dims.begin() + t.shape.rank);
    const size_t bytes = static_cast<size_t>(t.shape.numel()) * sizeof(float);
    header[t.name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data section to 8 bytes
  std::string out;
  out.reserve(8 + text.size() + offset);
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += text;
  for (const auto& t : tensors)
    out.append(reinterpret_cast<const char*>(t.data), static_cast<size_t>(t.shape.numel()) * sizeof(float));
  write_file_atomic(path, out);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  bytes_ = read_file(path, "checkpoint file");
  if (bytes_.size() < 8) throw Error("checkpoint file '" + path + "' is truncated (" + std::to_string(bytes_.size()) +
                                     " bytes); it was not written completely");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes_[i])) << (8 * i);
  if (n > bytes_.size() - 8)
    throw Error("checkpoint file '" + path + "' is truncated or not a safetensors file (header of " +
                std::to_string(n) + " bytes in a " + std::to_string(bytes_.size()) + "-byte file)");
  data_start_ = 8 + n;
  json header;
  try {
    header = json::parse(bytes_.substr(8, n));
  } catch (const json::exception& e) {
    throw Error("checkpoint file '" + path + "' has a corrupt header: " + e.what());
  }
  const size_t data_bytes = bytes_.size() - data_start_;
  for (auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      for (auto& [k, m] : v.items()) metadata_[k] = m.get<std::string>();
      continue;
    }
    Entry e;
    e.dtype = v.at("dtype").get<std::string>();
    for (int64_t d : v.at("shape").get<std::vector<int64_t>>()) e.shape.dims[e.shape.rank++] = d;
    e.begin = v.at("data_offsets")[0].get<size_t>();
    e.end = v.at("data_offsets")[1].get<size_t>();
    if (e.end > data_bytes || e.begin > e.end)
      throw Error("checkpoint file '" + path + "' is truncated: tensor '" + name + "' needs bytes up to " +
                  std::to_string(e.end) + " but the data section has " + std::to_string(data_bytes) +
                  "; it was not written completely");
    index_[name] = e;
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : index_) out.push_back(name);
  return out;
}

Shape SafetensorsFile::shape(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error("'" + path_ + "' has no tensor '" + name + "'");
  return it->second.shape;
}

void SafetensorsFile::read(const std::string& name, const Shape& expected, float* dst) const {
  auto it = index_.find(name);
  if (it == index_.end())
    throw Error("checkpoint '" + path_ + "' has no tensor '" + name + "': it was written for a different model "
                "config");
  const Entry& e = it->second;
  if (e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16")
    throw Error("tensor '" + name + "' in '" + path_ + "' is " + e.dtype + "; moelab reads F32, F16 and BF16");
  if (!(e.shape == expected))
    throw Error("checkpoint '" + path_ + "' does not match the model: '" + name + "' has shape " + e.shape.str() +
                " in the checkpoint but " + expected.str() + " in the config");
  const size_t width = e.dtype == "F32" ? 4 : 2;
  if (e.end - e.begin != static_cast<size_t>(expected.numel()) * width)
    throw Error("tensor '" + name + "' in '" + path_ + "' has an inconsistent byte range");
  const char* src = bytes_.data() + data_start_ + e.begin;
  if (width == 4) {
    std::memcpy(dst, src, e.end - e.begin);
    return;
  }
  for (int64_t i = 0; i < expected.numel(); ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = e.dtype == "BF16" ? bf16_to_float(h) : f16_to_float(h);
  }
}

}  // namespace moelab
