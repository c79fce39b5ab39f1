#include "dist/comm.h"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace moelab {

// The ranks' values of each element summed in rank order: chunk q of the n elements is summed on rank q from every
// rank's copy (an all-to-all), then every rank gathers the summed chunks (a second all-to-all).
template <class T>
void Communicator::sum_in_rank_order(T* data, int64_t n) {
  const int p = size();
  if (p == 1 || n == 0) return;
  std::vector<int64_t> begin(p + 1);
  for (int q = 0; q <= p; ++q) begin[q] = n * q / p;
  const int me = rank();
  const int64_t mine = begin[me + 1] - begin[me];
  // reduce-scatter: my chunk from every rank, rank-major (in a buffer kept across calls: a fresh one would cost its
  // page faults every time, as much as the exchange itself for a model's gradients)
  std::vector<T>& gathered = scratch<T>();
  gathered.resize(static_cast<size_t>(mine) * p);
  std::vector<int64_t> send_counts(p), send_offsets(p), recv_counts(p), recv_offsets(p);
  for (int q = 0; q < p; ++q) {
    send_counts[q] = begin[q + 1] - begin[q];
    send_offsets[q] = begin[q];
    recv_counts[q] = mine;
    recv_offsets[q] = q * mine;
  }
  alltoallv(data, send_counts.data(), send_offsets.data(), gathered.data(), recv_counts.data(), recv_offsets.data());
  T* reduced = gathered.data();  // rank 0's values, then each other rank's added in order
  for (int q = 1; q < p; ++q) {
    const T* from = gathered.data() + q * mine;
    for (int64_t i = 0; i < mine; ++i) reduced[i] += from[i];
  }
  // all-gather the reduced chunks (variable sizes), straight into data
  for (int q = 0; q < p; ++q) {
    send_counts[q] = mine;
    send_offsets[q] = 0;
    recv_counts[q] = begin[q + 1] - begin[q];
    recv_offsets[q] = begin[q];
  }
  alltoallv(reduced, send_counts.data(), send_offsets.data(), data, recv_counts.data(), recv_offsets.data());
}

void Communicator::allreduce_sum(float* data, int64_t n) { sum_in_rank_order(data, n); }
void Communicator::allreduce_sum(double* data, int64_t n) { sum_in_rank_order(data, n); }
void Communicator::allreduce_sum(int64_t* data, int64_t n) { sum_in_rank_order(data, n); }

// Host staging: the segments downloaded back to back, summed over the ranks, uploaded where they came from.
void Communicator::allreduce_sum(Backend& be, float* base, const std::vector<Segment>& segments) {
  if (size() == 1) return;
  int64_t total = 0;
  for (const Segment& s : segments) total += s.count;
  std::vector<float>& host = stage_send_;  // kept across calls: a fresh one would cost its page faults every step
  host.resize(static_cast<size_t>(total));
  int64_t at = 0;
  for (const Segment& s : segments) {
    be.download(host.data() + at, base + s.offset, s.count);
    at += s.count;
  }
  sum_in_rank_order(host.data(), total);
  at = 0;
  for (const Segment& s : segments) {
    be.upload(base + s.offset, host.data() + at, s.count);
    at += s.count;
  }
}

// Host staging: what this rank sends downloaded, exchanged, what it received uploaded.
void Communicator::alltoallv(Backend& be, const float* send, const int64_t* send_counts, const int64_t* send_offsets,
                             float* recv, const int64_t* recv_counts, const int64_t* recv_offsets) {
  const int p = size();
  int64_t sent = 0, received = 0;
  for (int q = 0; q < p; ++q) {
    sent = std::max(sent, send_offsets[q] + send_counts[q]);
    received = std::max(received, recv_offsets[q] + recv_counts[q]);
  }
  stage_send_.resize(static_cast<size_t>(sent));
  stage_recv_.resize(static_cast<size_t>(received));
  be.download(stage_send_.data(), send, sent);
  alltoallv(stage_send_.data(), send_counts, send_offsets, stage_recv_.data(), recv_counts, recv_offsets);
  be.upload(recv, stage_recv_.data(), received);
}

namespace {

class SingleCommunicator final : public Communicator {
 public:
  std::string name() const override { return "single"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<SingleCommunicator>(); }
  void barrier() override {}
  void broadcast_bytes(void*, size_t, int root) override {
    MOELAB_CHECK(root == 0, "broadcast from rank " + std::to_string(root) + " of a single process");
  }
  void allgather_bytes(const void* send, size_t bytes, void* recv) override {
    if (bytes > 0 && send != recv) std::memmove(recv, send, bytes);
  }
  void alltoallv_bytes(const void* send, const size_t* send_bytes, const size_t* send_offsets, void* recv,
                       const size_t* recv_bytes, const size_t* recv_offsets) override {
    MOELAB_CHECK(send_bytes[0] == recv_bytes[0], "alltoallv: a single process sends itself " +
                 std::to_string(send_bytes[0]) + " bytes but expects " + std::to_string(recv_bytes[0]));
    if (send_bytes[0] > 0)
      std::memmove(static_cast<char*>(recv) + recv_offsets[0], static_cast<const char*>(send) + send_offsets[0],
                   send_bytes[0]);
  }
};

// Launchers say what they started: OpenMPI's mpirun (OMPI_COMM_WORLD_SIZE), PMI (MPICH's hydra, srun --mpi=pmi2:
// PMI_SIZE) and PMIx (srun --mpi=pmix, OpenMPI 5: PMIX_RANK, the size known only after MPI_Init). Returns the
// number of processes, 0 for "an MPI launcher, size unknown", 1 for none.
int launched_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"})
    if (const char* v = std::getenv(var)) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  return std::getenv("PMIX_RANK") ? 0 : 1;
}

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

#ifdef MOELAB_HAVE_MPI
std::unique_ptr<Communicator> make_mpi_world();  // mpi_comm.cpp
// mpi_comm.cpp: MPI_Abort on the world; when MPI has not started, start it first (start_mpi) or return.
void mpi_abort_world(int exit_code, bool start_mpi);
bool mpi_available() { return true; }
#else
bool mpi_available() { return false; }
#endif

bool launched_as_several_processes() { return launched_size() != 1; }

std::string rank_label() {
  if (!launched_as_several_processes()) return "";
  std::string rank = "?";
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (const char* v = std::getenv(var)) {
      rank = v;
      break;
    }
  int size = launched_size();
  if (size == 0)  // PMIx tells the size only after MPI_Init; under srun, Slurm says it
    if (const char* v = std::getenv("SLURM_STEP_NUM_TASKS")) size = std::atoi(v);
  return "rank " + rank + (size > 1 ? " of " + std::to_string(size) : std::string()) + ": ";
}

void abort_job_if_distributed(int exit_code) {
  if (!launched_as_several_processes()) return;
  std::fflush(stdout);
  std::fflush(stderr);
#ifdef MOELAB_HAVE_MPI
  mpi_abort_world(exit_code, true);
#endif
  std::_Exit(exit_code);  // no MPI in this build: exit now, without the static destructors' MPI_Finalize
}

namespace {

// Written once by install_fatal_signal_handlers, read by the handler (which may only call async-signal-safe
// functions, and MPI_Abort as a last act).
char fatal_prefix[96] = "moelab: fatal signal ";

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV (invalid memory access)";
    case SIGBUS: return "SIGBUS (bus error)";
    case SIGFPE: return "SIGFPE (arithmetic exception)";
    case SIGILL: return "SIGILL (illegal instruction)";
    case SIGABRT: return "SIGABRT (aborted, e.g. std::terminate)";
    default: return "signal";
  }
}

void on_fatal_signal(int sig) {
  // One write of the whole line: the launcher forwards a rank's stderr in pieces, and its own abort banner must
  // not land inside the message.
  char line[256];
  size_t n = 0;
  for (const char* part : {static_cast<const char*>(fatal_prefix), signal_name(sig), "; ending the job\n"})
    for (const char* p = part; *p && n < sizeof(line); ++p) line[n++] = *p;
  [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, line, n);
  std::signal(sig, SIG_DFL);
  ::alarm(10);  // should MPI_Abort hang in a broken process, SIGALRM ends it and the launcher sees it die
#ifdef MOELAB_HAVE_MPI
  mpi_abort_world(128 + sig, false);  // never MPI_Init inside a signal handler
#endif
  std::raise(sig);
}

}  // namespace

void install_fatal_signal_handlers() {
  if (!launched_as_several_processes()) return;
  std::snprintf(fatal_prefix, sizeof(fatal_prefix), "moelab: %sfatal signal ", rank_label().c_str());
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, on_fatal_signal);
}

Communicator& world_communicator() {
  static std::unique_ptr<Communicator> world = [] {
    const int launched = launched_size();
    if (launched == 1) return make_single_communicator();
#ifdef MOELAB_HAVE_MPI
    return make_mpi_world();
#else
    if (launched == 0) return make_single_communicator();  // PMIx without a size: assume one process
    throw Error("this process is one of " + std::to_string(launched) + " started by an MPI launcher, but this moelab "
                "was built without MPI; install libopenmpi-dev (scripts/install-deps.sh does) and rebuild");
#endif
  }();
  return *world;
}

}  // namespace moelab
