#pragma once
// One number through a printf format, e.g. fmt("%.4g", 1.5e9) == "1.5e+09": the figures, tables and messages
// that print numbers share it.
#include <cstdio>
#include <string>

namespace moelab {

inline std::string fmt(const char* format, double value) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, value);
  return buf;
}

}  // namespace moelab
