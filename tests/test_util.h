#pragma once
// Shared helpers for the tests: random fills and a finite-difference gradient checker.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace moelab::testing {

// The backend the model-level tests run on: MOELAB_TEST_BACKEND (CTest registers those tests a second time with
// cpu-strict, whose memory the host cannot read), else cpu. Layer-level tests that hand the backend host buffers
// use make_backend("cpu", ...) directly: only the CPU backend's memory is the host's.
inline std::string test_backend_name() {
  const char* name = std::getenv("MOELAB_TEST_BACKEND");
  return name && *name ? name : "cpu";
}
inline std::unique_ptr<Backend> make_test_backend(int threads) { return make_backend(test_backend_name(), threads); }

// One value of backend memory, read or written through the seam.
inline float read_value(Backend& be, const float* p) {
  float v;
  be.download(&v, p, 1);
  return v;
}
inline void write_value(Backend& be, float* p, float v) { be.upload(p, &v, 1); }

// The message of the moelab::Error that f throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline void fill_normal(float* x, int64_t n, Rng& rng, float std = 1.f, float mean = 0.f) {
  for (int64_t i = 0; i < n; ++i) x[i] = mean + std * static_cast<float>(rng.normal());
}

// A host buffer that owns its floats and hands out a shaped view.
struct Buffer {
  std::vector<float> data;
  Shape shape;
  explicit Buffer(Shape s = {}) : data(std::max<int64_t>(s.numel(), 1)), shape(s) {}
  Tensor t() { return Tensor(data.data(), shape); }
  void zero() { std::fill(data.begin(), data.end(), 0.f); }
};

// Checks analytic gradients of a scalar function against central finite differences.
// `loss()` evaluates the scalar in double from the current values; the analytic gradient of each checked
// tensor must already be in its paired grad buffer. Entries are sampled (up to `samples` per tensor).
struct FdTolerance {
  double eps = 1e-2;    // finite-difference step
  double rtol = 2e-2;   // relative to max(|analytic|, |numeric|)
  double atol_frac = 2e-3;  // absolute floor, as a fraction of the tensor's largest analytic gradient
};

// With `backend`, the tensors are that backend's memory and are read and perturbed through upload/download;
// without, they are host memory.
inline void check_gradients(const std::string& label, const std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>>& pairs,
                            const std::function<double()>& loss, Rng& rng, int samples = 48, FdTolerance tol = {},
                            Backend* backend = nullptr) {
  for (const auto& [name, pair] : pairs) {
    const Tensor value = pair.first, grad_view = pair.second;
    const int64_t n = value.numel();
    const std::vector<float> grad_host =
        backend ? backend->download_vector(grad_view.data, n) : std::vector<float>(grad_view.data, grad_view.data + n);
    const float* grad = grad_host.data();
    const auto get = [&](int64_t i) { return backend ? read_value(*backend, value.data + i) : value.data[i]; };
    const auto set = [&](int64_t i, float v) {
      if (backend) write_value(*backend, value.data + i, v);
      else value.data[i] = v;
    };
    double max_grad = 0;
    for (int64_t i = 0; i < n; ++i) max_grad = std::max(max_grad, std::fabs(static_cast<double>(grad[i])));
    const double atol = std::max(1e-6, tol.atol_frac * max_grad);
    std::vector<int64_t> idx;
    if (n <= samples) {
      for (int64_t i = 0; i < n; ++i) idx.push_back(i);
    } else {
      for (int i = 0; i < samples; ++i) idx.push_back(static_cast<int64_t>(rng.below(n)));
    }
    int bad = 0;
    for (int64_t i : idx) {
      const float saved = get(i);
      set(i, static_cast<float>(saved + tol.eps));
      const double up = loss();
      set(i, static_cast<float>(saved - tol.eps));
      const double down = loss();
      set(i, saved);
      const double h = (static_cast<double>(static_cast<float>(saved + tol.eps)) -
                        static_cast<double>(static_cast<float>(saved - tol.eps)));
      const double numeric = (up - down) / h;
      const double analytic = grad[i];
      const double err = std::fabs(numeric - analytic);
      if (err > atol + tol.rtol * std::max(std::fabs(numeric), std::fabs(analytic))) {
        if (++bad <= 5)
          ADD_FAILURE() << label << ": d/d " << name << "[" << i << "] analytic " << analytic << " vs numeric "
                        << numeric << " (atol " << atol << ")";
      }
    }
    EXPECT_EQ(bad, 0) << label << ": " << bad << " of " << idx.size() << " sampled entries of " << name
                      << " disagree with finite differences";
    EXPECT_GT(max_grad, 0.0) << label << ": gradient of " << name << " is identically zero";
  }
}

// A fresh, empty directory under the system temp dir, unique to this test process.
inline std::filesystem::path temp_dir(const std::string& name) {
  const auto d = std::filesystem::temp_directory_path() / ("moelab_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// A flat uint16 token file of mildly structured data (a noisy counter), so training losses move.
inline std::string write_tokens(const std::filesystem::path& path, int64_t count, int32_t vocab) {
  std::string bytes;
  Rng rng(17);
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t tok = static_cast<uint16_t>((i % vocab + rng.below(3)) % vocab);
    bytes.push_back(static_cast<char>(tok & 0xff));
    bytes.push_back(static_cast<char>(tok >> 8));
  }
  write_file_atomic(path.string(), bytes);
  return path.string();
}

// The training losses in a run's metrics.jsonl, in order; a last line still being written (the run is alive, or
// was killed mid-line) ends the list.
inline std::vector<double> losses_of(const std::filesystem::path& metrics) {
  std::vector<double> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) out.push_back(j["loss"].get<double>());
    } catch (const nlohmann::json::exception&) {
      break;
    }
  }
  return out;
}

inline double dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace moelab::testing
