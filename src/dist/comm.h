#pragma once
// The communicator seam: how the processes (ranks) of one training job exchange data. Two implementations: one
// process (always there, no MPI needed at run time) and MPI (built when CMake finds MPI; `mpirun -np N moelab ...`
// or `srun moelab ...`). A NCCL communicator for the CUDA backend comes behind the same interface.
//
// Two kinds of buffers: host memory (counts, losses, statistics, checkpoint tensors) and backend memory (the
// gradients' sum and the MoE rows' all-to-all, the traffic of every step). The calls on backend buffers are
// virtual: the host communicators (one process, MPI) stage them through host memory inside the call (download,
// exchange, upload: what their callers did before), and a NCCL communicator can work on them in place.
// Every collective is called by every rank of the communicator, in the same order.
// Sums are deterministic: allreduce_sum adds the ranks' values in rank order (a reduce-scatter by all-to-all, a
// fixed-order sum per element, then an all-gather), so a run is bitwise reproducible for a given world size, and
// a 2-rank sum of a, b is exactly a + b.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/backend.h"

namespace moelab {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;  // "single" or "mpi"
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The ranks that pass the same color form one group, ordered by (key, rank) (MPI_Comm_split).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
  virtual void barrier() = 0;
  // root's bytes to every rank.
  virtual void broadcast_bytes(void* data, size_t bytes, int root) = 0;
  // Rank q's `bytes` bytes land at recv + q * bytes on every rank (recv holds size() * bytes).
  virtual void allgather_bytes(const void* send, size_t bytes, void* recv) = 0;
  // To each rank q: send_bytes[q] bytes from send + send_offsets[q]; from each rank q: recv_bytes[q] bytes to
  // recv + recv_offsets[q] (arrays of size() entries; a count may be 0, including to and from this rank).
  virtual void alltoallv_bytes(const void* send, const size_t* send_bytes, const size_t* send_offsets, void* recv,
                               const size_t* recv_bytes, const size_t* recv_offsets) = 0;

  // ---- typed, built on the above ------------------------------------------------------------------------
  // data[i] = sum over ranks of data[i], summed in rank order; the same bits on every rank.
  void allreduce_sum(float* data, int64_t n);
  void allreduce_sum(double* data, int64_t n);
  void allreduce_sum(int64_t* data, int64_t n);
  double allreduce_sum(double value) {
    allreduce_sum(&value, 1);
    return value;
  }
  // count values per rank to every rank: send (size() * count), block q to rank q; recv (size() * count), block q
  // from rank q.
  template <class T>
  void alltoall(const T* send, T* recv, int64_t count) {
    const size_t b = static_cast<size_t>(count) * sizeof(T);
    std::vector<size_t> bytes(size(), b), offsets(size());
    for (int q = 0; q < size(); ++q) offsets[q] = q * b;
    alltoallv_bytes(send, bytes.data(), offsets.data(), recv, bytes.data(), offsets.data());
  }
  // Variable counts in elements of T (offsets in elements too).
  template <class T>
  void alltoallv(const T* send, const int64_t* send_counts, const int64_t* send_offsets, T* recv,
                 const int64_t* recv_counts, const int64_t* recv_offsets) {
    std::vector<size_t> sb(size()), so(size()), rb(size()), ro(size());
    for (int q = 0; q < size(); ++q) {
      sb[q] = static_cast<size_t>(send_counts[q]) * sizeof(T), so[q] = static_cast<size_t>(send_offsets[q]) * sizeof(T);
      rb[q] = static_cast<size_t>(recv_counts[q]) * sizeof(T), ro[q] = static_cast<size_t>(recv_offsets[q]) * sizeof(T);
    }
    alltoallv_bytes(send, sb.data(), so.data(), recv, rb.data(), ro.data());
  }
  template <class T>
  void allgather(const T* send, int64_t count, T* recv) {
    allgather_bytes(send, static_cast<size_t>(count) * sizeof(T), recv);
  }
  template <class T>
  void broadcast(T* data, int64_t count, int root) {
    broadcast_bytes(data, static_cast<size_t>(count) * sizeof(T), root);
  }

  // ---- on backend buffers --------------------------------------------------------------------------------
  // A piece of a backend buffer: `count` elements from `offset`.
  struct Segment {
    int64_t offset = 0, count = 0;
  };
  // The sum over ranks, in rank order, of the segments of the backend buffer `base`, as if they were one
  // contiguous buffer (each element's sum is the same bits whichever segments it is summed in).
  virtual void allreduce_sum(Backend& be, float* base, const std::vector<Segment>& segments);
  // alltoallv of backend buffers: counts and offsets in floats, send and recv backend memory.
  virtual void alltoallv(Backend& be, const float* send, const int64_t* send_counts, const int64_t* send_offsets,
                         float* recv, const int64_t* recv_counts, const int64_t* recv_offsets);

 private:
  template <class T>
  void sum_in_rank_order(T* data, int64_t n);
  template <class T>
  std::vector<T>& scratch() {
    if constexpr (std::is_same_v<T, float>) return scratch_float_;
    else if constexpr (std::is_same_v<T, double>) return scratch_double_;
    else return scratch_int_;
  }
  std::vector<float> scratch_float_;
  std::vector<double> scratch_double_;
  std::vector<int64_t> scratch_int_;
  std::vector<float> stage_send_, stage_recv_;  // host staging of the backend-buffer calls, kept across calls
};

// One process: rank 0 of 1; every collective is a copy.
std::unique_ptr<Communicator> make_single_communicator();

// The job's communicator: MPI's world when this process was started by an MPI launcher (mpirun, or srun with a PMI;
// seen in the environment) with more than one process, else a single process. MPI is initialised on first use and
// finalised at exit. Launched as several processes by a moelab built without MPI: an Error saying how to build it.
Communicator& world_communicator();
// Whether this build has the MPI communicator.
bool mpi_available();

// ---- failure: one failing rank ends the whole job -------------------------------------------------------------
// Whether this process is one of several started by an MPI launcher (mpirun, srun), from its environment; true
// before MPI is initialised too.
bool launched_as_several_processes();
// "rank 1 of 2: " in a multi-process job, "" otherwise: the prefix of every fatal message, so that a job's
// interleaved stderr says which process failed.
std::string rank_label();
// After a fatal error on this rank has been printed: in a multi-process job, MPI_Abort(MPI_COMM_WORLD,
// exit_code), which makes mpirun and srun stop every rank and return non-zero at once (instead of the other ranks
// waiting for this one in a collective until the job's time limit). Returns only in a single-process run.
void abort_job_if_distributed(int exit_code);
// In a multi-process job: handlers for SIGSEGV, SIGBUS, SIGFPE, SIGILL and SIGABRT (std::terminate) that print
// "moelab: rank R of N: fatal signal NAME" and abort the job. Called at start-up and again once MPI is initialised
// (whose own handlers would replace them). Nothing in a single process.
void install_fatal_signal_handlers();

}  // namespace moelab
