#pragma once
// Subcommand callbacks run inside CLI11's parse, outside main()'s own error handling: they report errors here,
// with the same message shape and exit codes (1: a user error, moelab::Error; 2: anything unexpected).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <functional>

#include "core/error.h"

namespace moelab {

inline void run_reporting_errors(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& e) {
    std::fprintf(stderr, "moelab: error: %s\n", e.what());
    throw CLI::RuntimeError(1);
  } catch (const CLI::Error&) {
    throw;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moelab: unexpected error: %s\n", e.what());
    throw CLI::RuntimeError(2);
  }
}

// The same, as a callback for CLI::App::callback.
inline std::function<void()> reporting_errors(std::function<void()> body) {
  return [body = std::move(body)] { run_reporting_errors(body); };
}

}  // namespace moelab
