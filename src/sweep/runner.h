#pragma once
// Running a planned sweep (docs/sweeps.md). Each run is a child process
//   <moelab> train --config DIR/runs/<name>/config.toml --resume --set train.threads=T
// (under `mpirun -np P`, or `srun --ntasks=P` inside a Slurm job, for a run of P processes)
// with its output appended to DIR/runs/<name>/train.log, so a crashing or NaN run cannot take the sweep down,
// and a killed sweep resumes each interrupted run from its own checkpoint.
#include <cstdint>
#include <ostream>
#include <string>

namespace moelab {

struct SweepRunOptions {
  int jobs = 1;             // runs trained at once
  int threads_per_job = 1;  // train.threads of each run
  std::string binary;       // the moelab executable; empty: this process's own (/proc/self/exe)
  int64_t index = -1;       // >= 0: train only the feasible run with this array index and write only its
                            // result.json (no results.db): what a Slurm array task does
  std::ostream* log = nullptr;  // progress lines; nullptr: std::cout
};

struct SweepRunSummary {
  int64_t total = 0;    // feasible runs in the plan
  int64_t skipped = 0;  // already finished (result.json with status ok) before this invocation
  int64_t ok = 0;       // finished by this invocation
  int64_t failed = 0;   // failed in this invocation
  int64_t busy = 0;     // locked by another process (another `sweep run` or an array task)
};

// Trains every pending run of the sweep in DIR, `jobs` at a time. Finished runs are skipped; failed and
// interrupted ones are (re)started, the latter resuming from their checkpoint. results.db is brought up to date
// from existing result.json files first, and each run's row is upserted as it finishes.
SweepRunSummary run_sweep(const std::string& dir, const SweepRunOptions& options);

// Progress of a sweep: counts and one line per run (ok / failed / running / interrupted at step s / pending).
std::string sweep_status(const std::string& dir);

struct SlurmOptions {
  std::string partition;        // empty: the cluster's default
  std::string time = "04:00:00";
  int cpus = 2;                 // cpus-per-task = train.threads of each run
  int max_parallel = 0;         // > 0: at most this many array tasks at once (--array=0-N%M)
  int nodes = 1;                // per array task: room for the sweep's multi-process runs (started with srun)
  int tasks_per_node = 1;
  std::string binary;           // moelab on the cluster; empty: this process's own
};
// The Slurm batch script for DIR (written by `sweep slurm` to DIR/sweep.sbatch).
std::string slurm_script(const std::string& dir, const SlurmOptions& options);

// Path of the running executable (readlink /proc/self/exe).
std::string self_executable();

}  // namespace moelab
