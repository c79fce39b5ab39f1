#pragma once
// Counter-based noise shared by every backend (Backend::jitter): a value depends on (seed, index) alone, so a
// backward can draw the forward's noise again, and a GPU draws what the CPU draws.
#include <cstdint>

#ifdef __CUDACC__
#define MOELAB_HOST_DEVICE __host__ __device__
#else
#define MOELAB_HOST_DEVICE
#endif

namespace moelab {

// 1 + eps * (2u - 1), u uniform in [0, 1): the 24 high bits of splitmix64's finaliser of seed + (i + 1) * golden.
MOELAB_HOST_DEVICE inline float jitter_factor(uint64_t seed, int64_t i, float eps) {
  uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
  return 1.0f + eps * (2.0f * u - 1.0f);
}

}  // namespace moelab
