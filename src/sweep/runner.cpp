#include "sweep/runner.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/io.h"
#include "sweep/plan.h"
#include "sweep/results.h"

namespace moelab {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

// An exclusive, non-blocking flock on DIR/runs/<name>/.lock, held while the run trains, so two runners (a local
// `sweep run` and a Slurm task, or two local ones) never train the same run at once. Released when the holder
// exits, however it exits.
class RunLock {
 public:
  explicit RunLock(const fs::path& run_dir) {
    fd_ = ::open((run_dir / ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ >= 0 && ::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~RunLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

struct Child {
  const PlannedRun* run = nullptr;
  pid_t pid = -1;
  Clock::time_point start;
  std::unique_ptr<RunLock> lock;
};

// How a run of several processes is started: srun inside a Slurm job (its allocation, the cluster's MPI plugin:
// SLURM_MPI_TYPE=pmix for OpenMPI where that is not the default; --kill-on-bad-exit=1 so that a rank killed by a
// signal ends the step instead of leaving the others waiting, docs/distributed.md), else mpirun on this machine
// (--oversubscribe: a sweep decides the load itself; --allow-run-as-root when root).
std::vector<std::string> launcher(int64_t processes, int threads) {
  if (processes <= 1) return {};
  if (std::getenv("SLURM_JOB_ID"))
    return {"srun", "--ntasks=" + std::to_string(processes), "--cpus-per-task=" + std::to_string(threads),
            "--kill-on-bad-exit=1"};
  std::vector<std::string> l = {"mpirun", "-np", std::to_string(processes), "--oversubscribe"};
  if (::geteuid() == 0) l.push_back("--allow-run-as-root");
  return l;
}

// Starts `binary train --config ... --resume` for one run (under mpirun or srun when it has several processes),
// output appended to its train.log.
pid_t spawn_training(const std::string& binary, const fs::path& run_dir, int threads, int64_t processes) {
  const std::string log_path = (run_dir / "train.log").string();
  {
    std::ofstream log(log_path, std::ios::app);
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char when[64];
    std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
    log << "--- moelab sweep: training attempt started " << when << " ---\n";
  }
  // Everything the child needs is built before fork: after it only async-signal-safe calls are made.
  std::vector<std::string> args = launcher(processes, threads);
  for (const std::string& a : {binary, std::string("train"), std::string("--config"), (run_dir / "config.toml").string(),
                               std::string("--resume"), std::string("--set"), "train.threads=" + std::to_string(threads)})
    args.push_back(a);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error(std::string("cannot start a training process: fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    // Die with the runner: a killed sweep must not leave orphans training into directories that the next
    // `sweep run` will resume.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    ::execvp(argv[0], argv.data());
    const char msg[] = "moelab sweep: cannot execute the moelab binary (or mpirun / srun for a multi-process run)\n";
    (void)!::write(2, msg, sizeof msg - 1);
    ::_exit(127);
  }
  return pid;
}

RunResult finish_child(const Child& c, int wait_status, const fs::path& run_dir) {
  const double wall = std::chrono::duration<double>(Clock::now() - c.start).count();
  int code = 0;
  if (WIFEXITED(wait_status)) code = WEXITSTATUS(wait_status);
  else if (WIFSIGNALED(wait_status)) code = 128 + WTERMSIG(wait_status);
  const RunResult r = result_from_run(*c.run, run_dir.string(), code, wall, tail_lines((run_dir / "train.log").string(), 15));
  write_result(run_dir.string(), r);
  return r;
}

}  // namespace

std::string self_executable() {
  std::error_code ec;
  const fs::path p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw Error("cannot find the moelab executable (/proc/self/exe): pass its path explicitly");
  return p.string();
}

SweepRunSummary run_sweep(const std::string& dir, const SweepRunOptions& options) {
  std::ostream& log = options.log ? *options.log : std::cout;
  if (options.jobs < 1) throw Error("--jobs must be at least 1");
  if (options.threads_per_job < 1) throw Error("--threads-per-job must be at least 1");
  const fs::path root = fs::absolute(dir).lexically_normal();
  const SweepPlan plan = read_plan(root.string());
  const auto runs = plan.feasible_runs();
  const std::string binary = options.binary.empty() ? self_executable() : options.binary;
  if (::access(binary.c_str(), X_OK) != 0) throw Error("moelab binary '" + binary + "' is not executable");
  const fs::path db = root / "results.db";
  SweepRunSummary summary;
  summary.total = static_cast<int64_t>(runs.size());

  std::vector<const PlannedRun*> pending;
  if (options.index >= 0) {
    if (options.index >= static_cast<int64_t>(runs.size()))
      throw Error("--index " + std::to_string(options.index) + " is out of range: the plan has " +
                  std::to_string(runs.size()) + " feasible runs (indices 0.." + std::to_string(runs.size() - 1) + ")");
    const PlannedRun* run = runs[options.index];
    auto r = read_result((root / "runs" / run->name).string());
    if (r && r->status == "ok") {
      log << "run " << run->name << " is already finished (result.json status ok); nothing to do\n";
      summary.skipped = 1;
      return summary;
    }
    pending.push_back(run);
  } else {
    std::vector<RunResult> existing;
    for (const PlannedRun* run : runs) {
      auto r = read_result((root / "runs" / run->name).string());
      if (r) existing.push_back(*r);
      if (r && r->status == "ok") ++summary.skipped;
      else pending.push_back(run);
    }
    if (!existing.empty()) upsert_results(db.string(), existing);  // rows of runs finished before a kill
    // Largest first: the runs that start last are then the short ones, so no job slot idles for long at the end.
    std::stable_sort(pending.begin(), pending.end(),
                     [](const PlannedRun* a, const PlannedRun* b) { return a->flops > b->flops; });
  }
  log << "moelab sweep run: " << summary.total << " runs, " << summary.skipped << " already finished, "
      << pending.size() << " to train; " << options.jobs << " job(s) x " << options.threads_per_job
      << " thread(s)\n" << std::flush;

  std::vector<Child> running;
  size_t next = 0;
  int64_t done = summary.skipped;
  double finished_wall = 0, finished_flops = 0;
  const auto session_start = Clock::now();
  while (next < pending.size() || !running.empty()) {
    // A run of P processes takes P of the --jobs slots (one when nothing else runs, however many it needs).
    int64_t busy_slots = 0;
    for (const Child& c : running) busy_slots += c.run->processes;
    while (next < pending.size() &&
           (running.empty() || busy_slots + pending[next]->processes <= options.jobs)) {
      const PlannedRun* run = pending[next++];
      busy_slots += run->processes;
      const fs::path run_dir = root / "runs" / run->name;
      auto lock = std::make_unique<RunLock>(run_dir);
      if (!lock->held()) {
        log << "skipping " << run->name << ": another process is training it (" << (run_dir / ".lock").string()
            << " is locked)\n";
        ++summary.busy;
        if (options.index >= 0) throw Error("run " + run->name + " is being trained by another process");
        continue;
      }
      const bool resuming = fs::exists(run_dir / "checkpoint");
      fs::remove(run_dir / "result.json");  // a failed result is replaced by this attempt's
      Child c;
      c.run = run;
      c.start = Clock::now();
      c.lock = std::move(lock);
      c.pid = spawn_training(binary, run_dir, options.threads_per_job, run->processes);
      log << "start " << run->name << (resuming ? " (resuming from its checkpoint)" : "") << ": " << run->steps
          << " steps, " << run->tokens << " tokens"
          << (run->processes > 1 ? ", " + std::to_string(run->processes) + " processes" : "") << "\n" << std::flush;
      running.push_back(std::move(c));
    }
    if (running.empty()) break;
    bool reaped = false;
    for (size_t i = 0; i < running.size();) {
      int status = 0;
      const pid_t p = ::waitpid(running[i].pid, &status, WNOHANG);
      if (p == 0 || (p < 0 && errno == EINTR)) {
        ++i;
        continue;
      }
      if (p < 0) status = 127 << 8;  // lost: record as failed rather than hang
      const fs::path run_dir = root / "runs" / running[i].run->name;
      const RunResult r = finish_child(running[i], status, run_dir);
      if (options.index < 0) upsert_results(db.string(), {r});
      running[i].lock.reset();
      ++done;
      finished_wall += r.wall_seconds;
      finished_flops += running[i].run->flops;
      if (r.status == "ok") ++summary.ok;
      else ++summary.failed;
      // ETA: the wall time per training FLOP of the runs finished in this invocation, times the FLOPs of the runs
      // still to finish (runs differ in size by orders of magnitude), spread over the job slots.
      double remaining_flops = 0;
      for (size_t k = next; k < pending.size(); ++k) remaining_flops += pending[k]->flops;
      for (size_t k = 0; k < running.size(); ++k)
        if (k != i) remaining_flops += running[k].run->flops;
      const double eta = finished_flops > 0 ? remaining_flops * (finished_wall / finished_flops) / options.jobs : 0;
      char line[512];
      if (r.status == "ok")
        std::snprintf(line, sizeof line, "[%lld/%lld] ok     %s: loss %.4f (smoothed %.4f, val %.4f) in %s | %s elapsed, ETA %s\n",
                      static_cast<long long>(done), static_cast<long long>(summary.total), r.name.c_str(), r.loss,
                      r.smoothed_loss, r.val_loss, duration_text(r.wall_seconds).c_str(),
                      duration_text(std::chrono::duration<double>(Clock::now() - session_start).count()).c_str(),
                      duration_text(eta).c_str());
      else
        std::snprintf(line, sizeof line, "[%lld/%lld] FAILED %s (exit %d; see %s) | ETA %s\n",
                      static_cast<long long>(done), static_cast<long long>(summary.total), r.name.c_str(), r.exit_code,
                      (run_dir / "train.log").c_str(), duration_text(eta).c_str());
      log << line << std::flush;
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
      reaped = true;
    }
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  log << "moelab sweep run: " << summary.ok << " finished, " << summary.failed << " failed, " << summary.skipped
      << " skipped (already finished)" << (summary.busy ? ", " + std::to_string(summary.busy) + " busy elsewhere" : "")
      << (options.index < 0 ? "; results in " + db.string() : "") << "\n" << std::flush;
  return summary;
}

std::string sweep_status(const std::string& dir) {
  const fs::path root = fs::absolute(dir).lexically_normal();
  const SweepPlan plan = read_plan(root.string());
  const auto runs = plan.feasible_runs();
  int64_t ok = 0, failed = 0, running = 0, partial = 0, pending = 0;
  std::ostringstream lines;
  char line[512];
  double ok_wall = 0;
  for (const PlannedRun* run : runs) {
    const fs::path run_dir = root / "runs" / run->name;
    std::string state;
    auto r = read_result(run_dir.string());
    // Steps logged so far (the last line of metrics.jsonl with a step number).
    int64_t step = 0;
    {
      std::ifstream in(run_dir / "metrics.jsonl");
      std::string l;
      while (std::getline(in, l)) {
        try {
          const auto j = nlohmann::json::parse(l);
          if (j.contains("loss") && j.contains("step")) step = j["step"].get<int64_t>();
        } catch (...) {
        }
      }
    }
    const bool locked = fs::exists(run_dir / ".lock") && !RunLock(run_dir).held();
    if (locked) {
      state = "running (step " + std::to_string(step) + "/" + std::to_string(run->steps) + ")";
      ++running;
    } else if (r && r->status == "ok") {
      std::snprintf(line, sizeof line, "ok (loss %.4f, smoothed %.4f, %s)", r->loss, r->smoothed_loss,
                    duration_text(r->wall_seconds).c_str());
      state = line;
      ok_wall += r->wall_seconds;
      ++ok;
    } else if (r) {
      const std::string first = r->error.substr(0, r->error.find('\n'));
      state = "failed: " + first;
      ++failed;
    } else if (fs::exists(run_dir / "checkpoint")) {
      state = "interrupted at step " + std::to_string(step) + "/" + std::to_string(run->steps) + " (resumes)";
      ++partial;
    } else {
      state = "pending";
      ++pending;
    }
    std::snprintf(line, sizeof line, "  %-34s %s\n", run->name.c_str(), state.c_str());
    lines << line;
  }
  std::ostringstream out;
  const int64_t total = static_cast<int64_t>(runs.size());
  out << "sweep '" << plan.name << "' in " << root.string() << ": " << ok << "/" << total << " done, " << failed
      << " failed, " << running << " running, " << partial << " interrupted, " << pending << " pending";
  if (ok > 0 && ok < total)
    out << "; ETA ~" << duration_text(ok_wall / ok * static_cast<double>(total - ok)) << " of run time (one job)";
  out << "\n" << lines.str();
  const int64_t infeasible = static_cast<int64_t>(plan.runs.size()) - total;
  if (infeasible > 0) out << "(" << infeasible << " infeasible runs of the spec were not planned; see plan.json)\n";
  return out.str();
}

namespace {
std::string shell_quote(const std::string& s) {
  bool plain = !s.empty();
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || std::strchr("/._-+=:,@", c))) plain = false;
  if (plain) return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}
}  // namespace

std::string slurm_script(const std::string& dir, const SlurmOptions& options) {
  const fs::path root = fs::absolute(dir).lexically_normal();
  const SweepPlan plan = read_plan(root.string());
  const int64_t n = static_cast<int64_t>(plan.feasible_runs().size());
  if (n == 0) throw Error("the sweep in '" + root.string() + "' has no feasible runs: nothing to submit");
  if (options.cpus < 1) throw Error("--cpus must be at least 1");
  if (options.nodes < 1 || options.tasks_per_node < 1) throw Error("--nodes and --tasks-per-node must be at least 1");
  int64_t most = 1;
  for (const PlannedRun* r : plan.feasible_runs()) most = std::max(most, r->processes);
  if (most > static_cast<int64_t>(options.nodes) * options.tasks_per_node)
    throw Error("the sweep has runs of " + std::to_string(most) + " processes but --nodes " +
                std::to_string(options.nodes) + " x --tasks-per-node " + std::to_string(options.tasks_per_node) +
                " gives each array task only " + std::to_string(options.nodes * options.tasks_per_node) +
                "; raise them");
  for (const std::string* v : {&options.partition, &options.time})
    for (char c : *v)
      if (std::isspace(static_cast<unsigned char>(c)) || c == '\'' || c == '"')
        throw Error("Slurm option '" + *v + "' must not contain spaces or quotes");
  const std::string binary = options.binary.empty() ? self_executable() : options.binary;
  std::string name;
  for (char c : plan.name) name += std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ? c : '_';
  std::ostringstream s;
  s << "#!/bin/bash\n";
  s << "# moelab sweep '" << plan.name << "': a Slurm job array with one task per planned run (" << n << " runs).\n";
  s << "# Written by `moelab sweep slurm`. Submit with:  sbatch " << shell_quote((root / "sweep.sbatch").string()) << "\n";
  s << "# Task i trains the run with \"index\": i in plan.json, in its own directory, and writes only that run's\n";
  s << "# result.json (no SQLite writes from array tasks, so a shared filesystem is safe). Resubmitting skips\n";
  s << "# finished runs and resumes interrupted ones from their checkpoints. When the array is done, index the\n";
  s << "# results with:  moelab sweep collect " << shell_quote(root.string()) << "\n";
  s << "#SBATCH --job-name=moelab-" << name << "\n";
  s << "#SBATCH --array=0-" << (n - 1) << (options.max_parallel > 0 ? "%" + std::to_string(options.max_parallel) : "")
    << "\n";
  if (!options.partition.empty()) s << "#SBATCH --partition=" << options.partition << "\n";
  s << "#SBATCH --time=" << options.time << "\n";
  if (options.nodes > 1 || options.tasks_per_node > 1) {
    // room for the sweep's multi-process runs: each array task's runs start with srun inside the allocation
    s << "#SBATCH --nodes=" << options.nodes << "\n";
    s << "#SBATCH --ntasks-per-node=" << options.tasks_per_node << "\n";
  } else {
    s << "#SBATCH --ntasks=1\n";
  }
  s << "#SBATCH --cpus-per-task=" << options.cpus << "\n";
  s << "#SBATCH --output=" << (root / "slurm" / "%A_%a.log").string() << "\n";
  s << "#SBATCH --open-mode=append\n";
  s << "set -euo pipefail\n";
  s << "export OMP_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-" << options.cpus << "}\"\n";
  s << "exec " << shell_quote(binary) << " sweep run " << shell_quote(root.string())
    << " --index \"$SLURM_ARRAY_TASK_ID\" --threads-per-job \"${SLURM_CPUS_PER_TASK:-" << options.cpus << "}\" --moelab "
    << shell_quote(binary) << "\n";
  return s.str();
}

}  // namespace moelab
