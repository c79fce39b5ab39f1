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
