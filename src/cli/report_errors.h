#pragma once
// Subcommand callbacks run inside CLI11's parse, outside main()'s own error handling: they report errors here,
// with the same message shape and exit codes (1: a user error, moelab::Error; 2: anything unexpected); in a
// multi-process job the failing rank ends the whole job.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <functional>

#include "core/error.h"
#include "dist/comm.h"

namespace moelab {

// Prints "moelab: [rank R of N: ]KIND: MESSAGE" on stderr and, in a multi-process job, ends every rank
// (dist/comm.h: MPI_Abort), so that mpirun and srun return at once with `exit_code`.
inline void report_fatal(const char* kind, const char* message, int exit_code) {
  std::fprintf(stderr, "moelab: %s%s: %s\n", rank_label().c_str(), kind, message);
  abort_job_if_distributed(exit_code);
}

inline void run_reporting_errors(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& e) {
    report_fatal("error", e.what(), 1);
    throw CLI::RuntimeError(1);
  } catch (const CLI::Error&) {
    throw;
  } catch (const std::exception& e) {
    report_fatal("unexpected error", e.what(), 2);
    throw CLI::RuntimeError(2);
  }
}

// The same, as a callback for CLI::App::callback.
inline std::function<void()> reporting_errors(std::function<void()> body) {
  return [body = std::move(body)] { run_reporting_errors(body); };
}

}  // namespace moelab
