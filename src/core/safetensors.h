#pragma once
// safetensors files: written F32 (atomically), read F32 / F16 / BF16 into float with every header field validated.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moelab {

struct NamedTensor {
  std::string name;
  Shape shape;
  const float* data;
};

// Writes tensors (F32, row-major) and string metadata in the safetensors format, atomically.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A safetensors file read fully into memory, its header validated against the file size.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  Shape shape(const std::string& name) const;  // of a tensor that has(name)
  // Copies tensor `name` into dst (converted to float) after checking its dtype (F32, F16, BF16) and shape.
  void read(const std::string& name, const Shape& expected, float* dst) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Entry {
    std::string dtype;
    Shape shape;
    size_t begin = 0, end = 0;
  };
  std::string path_;
  std::string bytes_;
  size_t data_start_ = 0;
  std::map<std::string, Entry> index_;
  std::map<std::string, std::string> metadata_;
};

float bf16_to_float(uint16_t h);
float f16_to_float(uint16_t h);

}  // namespace moelab
