#pragma once
// Every subcommand is registered the same way: its options on its CLI::App, then its body with on_run(), which
// runs it after parsing behind the one error handler here: the same message shape and exit codes for every command
// (1: a user error, moelab::Error; 2: anything unexpected; a body may throw CLI::RuntimeError(n) for its own code),
// and in a multi-process job the failing rank ends the whole job.
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

// Registers `body` as what `command` does once parsed, behind the error handler above.
inline void on_run(CLI::App* command, std::function<void()> body) {
  command->callback([body = std::move(body)] { run_reporting_errors(body); });
}

}  // namespace moelab
