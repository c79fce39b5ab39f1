#include "train/init_from.h"

#include <cmath>
#include <filesystem>
#include <memory>
#include <set>

#include "core/error.h"
#include "formats/formats.h"
#include "model/plan.h"
#include "train/checkpoint.h"

namespace moelab {
namespace fs = std::filesystem;

namespace {

std::string resolve_checkpoint(const std::string& source) {
  if (!fs::exists(source))
    throw Error("train.init_from = '" + source + "' does not exist; give a run directory or its checkpoint/ directory");
  if (fs::exists(fs::path(source) / "state.json") || is_hf_directory(source)) return source;
  const std::string found = find_checkpoint(source);
  if (found.empty())
    throw Error("train.init_from = '" + source + "' holds no moelab checkpoint (neither state.json nor checkpoint/) "
                "and no Hugging Face model (config.json with model.safetensors)");
  return found;
}

// "layers.<i>.<rest>" -> i and rest; -1 for other names.
int64_t layer_of(const std::string& name, std::string* rest) {
  if (name.rfind("layers.", 0) != 0) return -1;
  const size_t dot = name.find('.', 7);
  if (rest) *rest = name.substr(dot + 1);
  return std::stoll(name.substr(7, dot - 7));
}

Error shape_error(const std::string& dir, const std::string& name, const Shape& source, const Shape& target) {
  return Error("train.init_from: tensor '" + name + "' has shape " + source.str() + " in " + dir + " but " +
               target.str() + " in this model; the two configs differ there (compare their config.toml)");
}

// The tensors a run starts from, by moelab name: a moelab checkpoint's model.safetensors, or a Hugging Face
// directory's tensors renamed (formats/formats.h).
class WeightSource {
 public:
  WeightSource(const std::string& dir, const ModelConfig& target) {
    if (fs::exists(fs::path(dir) / "state.json")) {
      file_ = std::make_unique<SafetensorsFile>((fs::path(dir) / "model.safetensors").string());
      return;
    }
    hf_ = read_hf(dir);
    // What the tensors cannot say but the function depends on: the config must agree.
    const auto differs = [&](const std::string& key, double theirs, double ours) {
      if (std::fabs(theirs - ours) > 1e-12 * std::max(1.0, std::fabs(ours)))
        throw Error("train.init_from: " + dir + "/config.json has " + key + " = " + std::to_string(theirs) +
                    " but this config has " + std::to_string(ours) + "; set them equal");
    };
    differs("rope_theta (model.rope_theta)", hf_.rope_theta, target.rope_theta);
    differs("rms_norm_eps (model.norm_eps)", hf_.rms_norm_eps, target.norm_eps);
    if (target.ffn != FfnKind::SwiGLU || target.norm != NormKind::RMSNorm || target.pos != PosKind::Rope ||
        target.bias)
      throw Error("train.init_from: " + dir + " is a " + hf_.architecture +
                  ", which needs model.ffn = \"swiglu\", model.norm = \"rmsnorm\", model.pos = \"rope\" and "
                  "model.bias = false in this config");
    if (hf_.experts_per_token > 0 && target.moe.enabled() &&
        (hf_.experts_per_token != target.moe.active_experts() || !target.moe.renormalize))
      throw Error("train.init_from: " + dir + " is a Mixtral routing to " + std::to_string(hf_.experts_per_token) +
                  " experts with renormalised weights; set moe.top_k accordingly and moe.renormalize = true");
    if (hf_.tied != target.tied_embeddings)
      throw Error("train.init_from: " + dir + "/config.json has tie_word_embeddings = " +
                  (hf_.tied ? "true" : "false") + "; set model.tied_embeddings to match");
  }
  std::vector<std::string> names() const {
    if (file_) return file_->names();
    std::vector<std::string> out;
    for (const auto& [n, t] : hf_.tensors) out.push_back(n);
    return out;
  }
  bool has(const std::string& name) const { return file_ ? file_->has(name) : hf_.tensors.count(name) > 0; }
  Shape shape(const std::string& name) const { return file_ ? file_->shape(name) : hf_.tensors.at(name).first; }
  void read(const std::string& name, const Shape& shape, float* dst) const {
    if (file_) return file_->read(name, shape, dst);
    const auto& v = hf_.tensors.at(name).second;
    std::copy(v.begin(), v.end(), dst);
  }

 private:
  std::unique_ptr<SafetensorsFile> file_;
  HfWeights hf_;
};

}  // namespace

InitFromReport init_from_checkpoint(const std::string& source, const ModelConfig& target, const ParamLayout& layout,
                                    std::vector<float>& params) {
  InitFromReport report;
  report.checkpoint = resolve_checkpoint(source);
  const std::string dir = report.checkpoint;
  const WeightSource file(dir, target);
  std::set<std::string> unused;
  for (const auto& n : file.names()) unused.insert(n);
  const ModelPlan plan(target);
  std::vector<float> buffer;
  for (const ParamEntry& e : layout.entries()) {
    float* dst = params.data() + e.offset;
    if (file.has(e.name)) {
      const Shape s = file.shape(e.name);
      if (!(s == e.shape)) throw shape_error(dir, e.name, s, e.shape);
      file.read(e.name, e.shape, dst);
      unused.erase(e.name);
      ++report.copied;
      continue;
    }
    std::string rest;
    const int64_t layer = layer_of(e.name, &rest);
    const bool router_or_shared = rest.rfind("moe.router.", 0) == 0 || rest.rfind("moe.shared.", 0) == 0;
    const bool expert = rest.rfind("moe.experts.", 0) == 0;
    const std::string prefix = "layers." + std::to_string(layer) + ".";
    const bool dense_source = layer >= 0 && file.has(prefix + "ffn.fc1.weight");
    if (router_or_shared && dense_source) {  // keeps the configured init
      report.fresh.push_back(e.name);
      continue;
    }
    if (!expert || !dense_source)
      throw Error("train.init_from: " + dir + " has no tensor '" + e.name + "'" +
                  (expert ? " and no dense FFN in layer " + std::to_string(layer) + " to upcycle it from" : "") +
                  "; the source was trained with a different architecture (compare its config.toml)");
    // Upcycling: the dense FFN's tensor of the same role, cut into G slices of the expert width.
    const std::string role = rest.substr(std::string("moe.experts.").size());  // fc1.weight, fc1.bias, ...
    const std::string from = prefix + "ffn." + role;
    if (!file.has(from))
      throw Error("train.init_from: " + dir + " has no tensor '" + from + "' to upcycle '" + e.name + "' from");
    const Shape s = file.shape(from);
    buffer.resize(static_cast<size_t>(s.numel()));
    file.read(from, s, buffer.data());
    unused.erase(from);
    const int64_t E = e.shape[0], glu = plan.glu, Fe = plan.expert_hidden, C = target.d_model;
    const int64_t F = role.rfind("fc1.", 0) == 0 ? s[0] / glu : role == "fc2.weight" ? s[1] : Fe;
    if (F % Fe != 0 || (role == "fc2.weight" && s[0] != C) || (role == "fc1.weight" && (s[1] != C || s[0] % glu)) ||
        (role == "fc2.bias" && s[0] != C))
      throw Error("train.init_from: cannot upcycle '" + from + "' of shape " + s.str() + " into '" + e.name +
                  "' of shape " + e.shape.str() + ": the dense FFN's hidden width must be a multiple of the expert "
                  "width " + std::to_string(Fe) + " and d_model must agree");
    const int64_t G = F / Fe;
    const int64_t per = e.shape.numel() / E;  // floats per expert
    for (int64_t x = 0; x < E; ++x) {
      const int64_t g = x % G;
      float* out = dst + x * per;
      if (role == "fc1.weight") {  // rows [gate | up]: each half's slice g
        for (int64_t h = 0; h < glu; ++h)
          std::copy(buffer.begin() + (h * F + g * Fe) * C, buffer.begin() + (h * F + g * Fe + Fe) * C,
                    out + h * Fe * C);
      } else if (role == "fc1.bias") {
        for (int64_t h = 0; h < glu; ++h)
          std::copy(buffer.begin() + h * F + g * Fe, buffer.begin() + h * F + g * Fe + Fe, out + h * Fe);
      } else if (role == "fc2.weight") {  // (C, F): columns of slice g
        for (int64_t c = 0; c < C; ++c)
          std::copy(buffer.begin() + c * F + g * Fe, buffer.begin() + c * F + g * Fe + Fe, out + c * Fe);
      } else if (role == "fc2.bias") {  // each of the G slices' experts adds it once
        for (int64_t c = 0; c < C; ++c) out[c] = buffer[c] / static_cast<float>(G);
      } else {
        throw Error("train.init_from: no rule to upcycle '" + e.name + "'");
      }
    }
    ++report.upcycled;
  }
  if (!unused.empty())
    throw Error("train.init_from: tensor '" + *unused.begin() + "' of " + dir + " has no place in this model" +
                (unused.size() > 1 ? " (nor " + std::to_string(unused.size() - 1) + " more)" : std::string()) +
                "; the source was trained with a different architecture (compare its config.toml)");
  return report;
}

}  // namespace moelab
