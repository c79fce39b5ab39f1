#include "core/error.h"

namespace moelab {

void fail_check(const char* condition, const char* file, int line, const std::string& message) {
  throw Error("internal check failed: " + std::string(condition) + " at " + file + ":" + std::to_string(line) +
              (message.empty() ? "" : " (" + message + ")"));
}

}  // namespace moelab
