#include "train/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/io.h"

namespace moelab {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {
constexpr int kFormatVersion = 1;
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
  if (e.dtype != "F32") throw Error("tensor '" + name + "' in '" + path_ + "' is " + e.dtype + ", expected F32");
  if (!(e.shape == expected))
    throw Error("checkpoint '" + path_ + "' does not match the model: '" + name + "' has shape " + e.shape.str() +
                " in the checkpoint but " + expected.str() + " in the config");
  if (e.end - e.begin != static_cast<size_t>(expected.numel()) * sizeof(float))
    throw Error("tensor '" + name + "' in '" + path_ + "' has an inconsistent byte range");
  std::memcpy(dst, bytes_.data() + data_start_ + e.begin, e.end - e.begin);
}

void save_checkpoint(const std::string& dir, const Config& config, const ParamLayout& layout, Backend& backend,
                     const float* params, const float* exp_avg, const float* exp_avg_sq, const CheckpointState& state) {
  const fs::path final_dir(dir), tmp_dir(dir + ".tmp"), old_dir(dir + ".old");
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);
  // Backend memory reaches the file through a download (the backend's memory may be a device's).
  const std::vector<float> host_params = backend.download_vector(params, layout.total());
  const std::vector<float> host_m = backend.download_vector(exp_avg, layout.total());
  const std::vector<float> host_v = backend.download_vector(exp_avg_sq, layout.total());
  std::vector<NamedTensor> weights, moments;
  for (const auto& e : layout.entries()) {
    weights.push_back({e.name, e.shape, host_params.data() + e.offset});
    moments.push_back({"exp_avg." + e.name, e.shape, host_m.data() + e.offset});
    moments.push_back({"exp_avg_sq." + e.name, e.shape, host_v.data() + e.offset});
  }
  write_safetensors((tmp_dir / "model.safetensors").string(), weights, {{"format", "pt"}, {"producer", "moelab"}});
  write_safetensors((tmp_dir / "optimizer.safetensors").string(), moments);
  json s = {{"format_version", kFormatVersion},
            {"step", state.step},
            {"adam_step", state.adam_step},
            {"parameters", layout.total()},
            {"data_rng",
             {{"s", {state.data_rng.s[0], state.data_rng.s[1], state.data_rng.s[2], state.data_rng.s[3]}},
              {"spare", state.data_rng.spare},
              {"has_spare", state.data_rng.has_spare}}}};
  if (!state.router_bias.empty()) {
    json biases = json::object();
    for (const auto& [layer, values] : state.router_bias) biases["layers." + std::to_string(layer)] = values;
    s["router_bias"] = biases;
  }
  write_file_atomic((tmp_dir / "state.json").string(), s.dump(2) + "\n");
  write_file_atomic((tmp_dir / "config.toml").string(), to_toml(config));
  // Swap in: the previous checkpoint stays complete until the new one is in place.
  fs::remove_all(old_dir);
  if (fs::exists(final_dir)) fs::rename(final_dir, old_dir);
  fs::rename(tmp_dir, final_dir);
  fs::remove_all(old_dir);
}

std::string find_checkpoint(const std::string& run_dir) {
  const fs::path dir = fs::path(run_dir) / "checkpoint";
  if (fs::exists(dir / "state.json")) return dir.string();
  const fs::path old = fs::path(run_dir) / "checkpoint.old";
  if (fs::exists(old / "state.json")) return old.string();
  return "";
}

CheckpointState load_checkpoint(const std::string& dir, const ParamLayout& layout, Backend& backend, float* params,
                                float* exp_avg, float* exp_avg_sq) {
  const fs::path d(dir);
  if (!fs::exists(d / "state.json"))
    throw Error("'" + dir + "' is not a moelab checkpoint (no state.json)");
  json s;
  try {
    s = json::parse(read_file((d / "state.json").string(), "checkpoint state"));
  } catch (const json::exception& e) {
    throw Error("checkpoint state '" + (d / "state.json").string() + "' is corrupt: " + e.what());
  }
  if (s.value("format_version", 0) != kFormatVersion)
    throw Error("checkpoint '" + dir + "' has format version " + std::to_string(s.value("format_version", 0)) +
                ", this moelab reads version " + std::to_string(kFormatVersion));
  if (s.value("parameters", int64_t{-1}) != layout.total())
    throw Error("checkpoint '" + dir + "' holds " + std::to_string(s.value("parameters", int64_t{-1})) +
                " parameters but the config builds a model with " + std::to_string(layout.total()) +
                "; use the config the checkpoint was trained with (its config.toml)");
  // Each tensor is read on the host, then uploaded into its place in backend memory.
  std::vector<float> host;
  const auto read = [&](const SafetensorsFile& file, const std::string& name, const ParamEntry& e, float* dst) {
    host.resize(static_cast<size_t>(e.shape.numel()));
    file.read(name, e.shape, host.data());
    backend.upload(dst + e.offset, host.data(), e.shape.numel());
  };
  SafetensorsFile model((d / "model.safetensors").string());
  for (const auto& e : layout.entries()) read(model, e.name, e, params);
  if (model.names().size() != layout.entries().size())
    throw Error("checkpoint '" + dir + "' has " + std::to_string(model.names().size()) +
                " tensors but the model has " + std::to_string(layout.entries().size()));
  if (exp_avg && exp_avg_sq) {
    SafetensorsFile opt((d / "optimizer.safetensors").string());
    for (const auto& e : layout.entries()) {
      read(opt, "exp_avg." + e.name, e, exp_avg);
      read(opt, "exp_avg_sq." + e.name, e, exp_avg_sq);
    }
  }
  CheckpointState st;
  st.step = s.at("step").get<int64_t>();
  st.adam_step = s.at("adam_step").get<int64_t>();
  const auto& rng = s.at("data_rng");
  for (int i = 0; i < 4; ++i) st.data_rng.s[i] = rng.at("s")[i].get<uint64_t>();
  st.data_rng.spare = rng.at("spare").get<double>();
  st.data_rng.has_spare = rng.at("has_spare").get<bool>();
  if (s.contains("router_bias"))
    for (const auto& [name, values] : s.at("router_bias").items()) {
      if (name.rfind("layers.", 0) != 0)
        throw Error("checkpoint state '" + (d / "state.json").string() + "' has router biases named '" + name + "'");
      st.router_bias[std::stoll(name.substr(7))] = values.get<std::vector<float>>();
    }
  return st;
}

Config checkpoint_config(const std::string& dir) {
  return load_config((fs::path(dir) / "config.toml").string(), {});
}

}  // namespace moelab
