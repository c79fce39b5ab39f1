// Backends by name (config key train.backend). A backend that is built in registers here; a name that is not gives
// one message listing those that are.
#include <functional>
#include <utility>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#ifdef MOELAB_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "core/error.h"

namespace moelab {

std::unique_ptr<Backend> make_strict_backend(int threads);  // backend/strict/strict_backend.cpp

namespace {

using Factory = std::function<std::unique_ptr<Backend>(int threads)>;

const std::vector<std::pair<std::string, Factory>>& registry() {
  static const std::vector<std::pair<std::string, Factory>> backends = {
      {"cpu", [](int threads) { return make_cpu_backend(threads); }},
      {"cpu-strict", [](int threads) { return make_strict_backend(threads); }},
#ifdef MOELAB_HAVE_CUDA
      {"cuda", [](int threads) { return make_cuda_backend(threads); }},
#endif
  };
  return backends;
}

}  // namespace

std::vector<std::string> backend_names() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : registry()) names.push_back(name);
  return names;
}

std::unique_ptr<Backend> make_backend(const std::string& name, int threads) {
  for (const auto& [known, factory] : registry())
    if (known == name) return factory(threads);
  std::string list;
  for (const auto& known : backend_names()) list += (list.empty() ? "" : ", ") + known;
  throw Error("backend '" + name + "' is not built into this moelab; built in: " + list +
              " (choose one with train.backend, or --backend where a command offers it)");
}

}  // namespace moelab
