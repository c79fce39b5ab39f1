#pragma once
// Expert parallelism: each MoE layer's E routed experts are split over the P ranks of an expert-parallel group,
// rank g of the group holding experts [g E/P, (g+1) E/P). Every rank routes its own tokens to all E experts; the
// rows (token, expert) it dispatched, sorted by expert and so grouped by the rank holding the expert, go there by
// one all-to-all (counts first, then rows), the experts compute on the rows they received with the grouped GEMM,
// and a second all-to-all returns the outputs in the order they came. The backward sends the rows' output gradients
// the same way and returns their input gradients. The rows stay in backend memory: the communicator's all-to-all
// takes backend buffers (a host communicator stages them inside the call), and the reordering between the order
// they travel in and the order the experts compute in is a backend copy per (rank, expert) block.
//
// One ExpertExchange per MoE layer: plan() after the layer's routing fixes who sends what to whom, and the same plan
// serves the layer's backward.
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "dist/comm.h"

namespace moelab {

class ExpertExchange {
 public:
  // group: the expert-parallel group (its size P divides experts); experts: E routed experts of the layer.
  ExpertExchange(Communicator& group, int64_t experts);
  int64_t local_experts() const { return local_experts_; }
  int64_t first_expert() const { return first_expert_; }

  // expert_offsets (E + 1): this rank's dispatched rows per expert (Routing::host_expert_offsets). Exchanges the
  // per-expert counts.
  void plan(const std::vector<int64_t>& expert_offsets);
  // Rows received for this rank's experts, expert-major: the rows of local expert e from rank 0, then from rank 1,
  // ...; local_offsets() (local_experts + 1) delimits each expert's rows.
  int64_t received_rows() const { return local_offsets_.back(); }
  const std::vector<int64_t>& local_offsets() const { return local_offsets_; }

  // rows (R, cols), this rank's rows in expert order (backend memory) -> local (received_rows, cols), expert-major.
  void dispatch(Backend& be, const float* rows, int64_t cols, float* local);
  // local (received_rows, cols) -> rows (R, cols): each row back to the rank and position it came from.
  void combine(Backend& be, const float* local, int64_t cols, float* rows);

  // Seconds spent exchanging (counts and rows, staging included) since the last take_seconds().
  double take_seconds() {
    const double s = seconds_;
    seconds_ = 0;
    return s;
  }

 private:
  Communicator& group_;
  int64_t experts_, local_experts_, first_expert_;
  int ranks_;
  // counts_from_[s * local_experts + e]: rows rank s sends for local expert e; sent_[q]: rows this rank sends to q.
  std::vector<int64_t> counts_from_, sent_, received_from_;
  std::vector<int64_t> local_offsets_;
  BackendArray<float> staging_;  // the rows as they travel (source-major), grown to the most received
  double seconds_ = 0;
  // Row offsets of each rank's block in this rank's rows (destination-major) and in the received rows
  // (source-major).
  std::vector<int64_t> sent_offsets_, received_offsets_;
  void exchange(Backend& be, const float* send, float* recv, int64_t cols, bool forward);
  void reorder(Backend& be, const float* from, float* to, int64_t cols, bool to_expert_major) const;
  float* staging(Backend& be, int64_t count);
};

}  // namespace moelab
