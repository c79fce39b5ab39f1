// The MPI communicator (built when CMake finds MPI). Point-to-point exchanges in chunks of at most 1 GiB, so no
// count overflows MPI's int; collectives built from them in a fixed pattern. Only MPI's C API is used.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "dist/comm.h"

namespace moelab {
namespace {

constexpr size_t kChunk = size_t{1} << 30;

void check(int status, const char* what) {
  if (status != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(status, text, &len);
    throw Error(std::string("MPI ") + what + " failed: " + std::string(text, len));
  }
}

// MPI_Init once, MPI_Finalize at exit (after every communicator built on it is gone).
struct MpiRuntime {
  MpiRuntime() {
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owned = true;
    }
  }
  ~MpiRuntime() {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owned && !finalised) MPI_Finalize();
  }
  bool owned = false;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    // Errors come back as codes (an Error with MPI's text), not an abort without a word.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    int finalised = 0;
    MPI_Finalized(&finalised);
    if (owned_ && !finalised) MPI_Comm_free(&comm_);
  }
  std::string name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub;
    check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(sub, true);
  }
  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }
  void broadcast_bytes(void* data, size_t bytes, int root) override {
    char* p = static_cast<char*>(data);
    for (size_t done = 0; done < bytes; done += kChunk)
      check(MPI_Bcast(p + done, static_cast<int>(std::min(kChunk, bytes - done)), MPI_BYTE, root, comm_),
            "MPI_Bcast");
  }
  void allgather_bytes(const void* send, size_t bytes, void* recv) override {
    std::vector<size_t> counts(size_, bytes), send_offsets(size_, 0), recv_offsets(size_);
    for (int q = 0; q < size_; ++q) recv_offsets[q] = q * bytes;
    if (send == static_cast<char*>(recv) + rank_ * bytes) {  // in place: send from a copy
      std::vector<char> copy(static_cast<const char*>(send), static_cast<const char*>(send) + bytes);
      alltoallv_bytes(copy.data(), counts.data(), send_offsets.data(), recv, counts.data(), recv_offsets.data());
      return;
    }
    alltoallv_bytes(send, counts.data(), send_offsets.data(), recv, counts.data(), recv_offsets.data());
  }
  // Non-blocking receives from every rank and sends to every rank, chunked; this rank's own part is a copy.
  void alltoallv_bytes(const void* send, const size_t* send_bytes, const size_t* send_offsets, void* recv,
                       const size_t* recv_bytes, const size_t* recv_offsets) override {
    const char* s = static_cast<const char*>(send);
    char* r = static_cast<char*>(recv);
    std::vector<MPI_Request> requests;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      for (size_t done = 0; done < recv_bytes[q]; done += kChunk) {
        requests.emplace_back();
        check(MPI_Irecv(r + recv_offsets[q] + done, static_cast<int>(std::min(kChunk, recv_bytes[q] - done)), MPI_BYTE,
                        q, kTag, comm_, &requests.back()),
              "MPI_Irecv");
      }
    }
    for (int k = 1; k < size_; ++k) {  // rank + k: every rank sends to a different one at a time
      const int q = (rank_ + k) % size_;
      for (size_t done = 0; done < send_bytes[q]; done += kChunk) {
        requests.emplace_back();
        check(MPI_Isend(s + send_offsets[q] + done, static_cast<int>(std::min(kChunk, send_bytes[q] - done)), MPI_BYTE,
                        q, kTag, comm_, &requests.back()),
              "MPI_Isend");
      }
    }
    MOELAB_CHECK(send_bytes[rank_] == recv_bytes[rank_], "alltoallv: rank " + std::to_string(rank_) + " sends itself " +
                 std::to_string(send_bytes[rank_]) + " bytes but expects " + std::to_string(recv_bytes[rank_]));
    if (send_bytes[rank_] > 0) std::memmove(r + recv_offsets[rank_], s + send_offsets[rank_], send_bytes[rank_]);
    check(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
  }

 private:
  static constexpr int kTag = 0x6d6c;
  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world() {
  static MpiRuntime runtime;
  install_fatal_signal_handlers();  // after MPI_Init, whose own handlers would otherwise replace ours
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

void mpi_abort_world(int exit_code, bool start_mpi) {
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (finalised) return;
  int initialised = 0;
  MPI_Initialized(&initialised);
  // A rank that fails before its first collective has not started MPI yet: start it, so that the abort reaches
  // the launcher (an exit without MPI would leave the other ranks waiting in MPI_Init or a collective).
  if (!initialised) {
    if (!start_mpi) return;
    world_communicator();
  }
  MPI_Abort(MPI_COMM_WORLD, exit_code);
}

}  // namespace moelab
