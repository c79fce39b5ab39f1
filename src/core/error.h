#pragma once
// Errors a user can cause (bad config, missing file, NaN loss) are thrown as moelab::Error with a message that
// names the problem and the fix; the CLI prints it and exits non-zero. Internal invariants use MOELAB_CHECK.
#include <stdexcept>
#include <string>

namespace moelab {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

[[noreturn]] void fail_check(const char* condition, const char* file, int line, const std::string& message);

}  // namespace moelab

#define MOELAB_CHECK(cond, msg)                                                  \
  do {                                                                           \
    if (!(cond)) ::moelab::fail_check(#cond, __FILE__, __LINE__, (msg));        \
  } while (0)
