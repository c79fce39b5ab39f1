#include "moe/expert_parallel.h"

#include <string>

#include "core/error.h"
#include "core/timer.h"

namespace moelab {

ExpertExchange::ExpertExchange(Communicator& group, int64_t experts)
    : group_(group), experts_(experts), ranks_(group.size()) {
  if (experts % ranks_ != 0)
    throw Error("dist.expert_parallel = " + std::to_string(ranks_) + " does not divide the " + std::to_string(experts) +
                " routed experts of an MoE layer; choose a divisor of the expert count");
  local_experts_ = experts / ranks_;
  first_expert_ = group.rank() * local_experts_;
  local_offsets_.assign(local_experts_ + 1, 0);
}

void ExpertExchange::plan(const std::vector<int64_t>& expert_offsets) {
  Timer timer;
  MOELAB_CHECK(static_cast<int64_t>(expert_offsets.size()) == experts_ + 1, "expert offsets of another layer");
  const int64_t el = local_experts_;
  std::vector<int64_t> counts(experts_);
  for (int64_t e = 0; e < experts_; ++e) counts[e] = expert_offsets[e + 1] - expert_offsets[e];
  counts_from_.assign(static_cast<size_t>(ranks_) * el, 0);
  group_.alltoall(counts.data(), counts_from_.data(), el);  // block q of counts: rank q's experts
  sent_.assign(ranks_, 0);
  received_from_.assign(ranks_, 0);
  sent_offsets_.assign(ranks_ + 1, 0);
  received_offsets_.assign(ranks_ + 1, 0);
  for (int q = 0; q < ranks_; ++q) {
    sent_[q] = expert_offsets[(q + 1) * el] - expert_offsets[q * el];
    for (int64_t e = 0; e < el; ++e) received_from_[q] += counts_from_[q * el + e];
    sent_offsets_[q + 1] = sent_offsets_[q] + sent_[q];
    received_offsets_[q + 1] = received_offsets_[q] + received_from_[q];
  }
  for (int64_t e = 0; e < el; ++e) {
    local_offsets_[e + 1] = local_offsets_[e];
    for (int s = 0; s < ranks_; ++s) local_offsets_[e + 1] += counts_from_[s * el + e];
  }
  seconds_ += timer.seconds();
}

// forward (dispatch): send holds this rank's rows (destination-major), recv gets the received rows (source-major);
// backward (combine): the reverse. Both backend memory: the communicator stages them as it needs.
void ExpertExchange::exchange(Backend& be, const float* send, float* recv, int64_t cols, bool forward) {
  std::vector<int64_t> sc(ranks_), so(ranks_), rc(ranks_), ro(ranks_);
  for (int q = 0; q < ranks_; ++q) {
    const int64_t out = forward ? sent_[q] : received_from_[q], in = forward ? received_from_[q] : sent_[q];
    const int64_t out_at = forward ? sent_offsets_[q] : received_offsets_[q];
    const int64_t in_at = forward ? received_offsets_[q] : sent_offsets_[q];
    sc[q] = out * cols, so[q] = out_at * cols, rc[q] = in * cols, ro[q] = in_at * cols;
  }
  group_.alltoallv(be, send, sc.data(), so.data(), recv, rc.data(), ro.data());
}

// The received rows in two orders: source-major (rank s's block holds its rows of local expert 0, 1, ...) as they
// arrive, and expert-major (expert e's block holds its rows from rank 0, 1, ...) as the experts compute on them.
// One backend copy per (rank, expert) block.
void ExpertExchange::reorder(Backend& be, const float* from, float* to, int64_t cols, bool to_expert_major) const {
  const int64_t el = local_experts_;
  for (int s = 0; s < ranks_; ++s) {
    int64_t source_major = received_offsets_[s];
    for (int64_t e = 0; e < el; ++e) {
      const int64_t n = counts_from_[s * el + e];
      int64_t expert_major = local_offsets_[e];
      for (int q = 0; q < s; ++q) expert_major += counts_from_[q * el + e];
      const int64_t src = to_expert_major ? source_major : expert_major, dst = to_expert_major ? expert_major : source_major;
      if (n > 0) be.copy(to + dst * cols, from + src * cols, n * cols);
      source_major += n;
    }
  }
}

float* ExpertExchange::staging(Backend& be, int64_t count) {
  if (staging_.size() < count) staging_ = BackendArray<float>(be, count + count / 2);  // grows rarely
  return staging_.data();
}

void ExpertExchange::dispatch(Backend& be, const float* rows, int64_t cols, float* local) {
  Timer timer;
  float* arrived = staging(be, received_offsets_[ranks_] * cols);
  exchange(be, rows, arrived, cols, /*forward=*/true);
  reorder(be, arrived, local, cols, /*to_expert_major=*/true);
  seconds_ += timer.seconds();
}

void ExpertExchange::combine(Backend& be, const float* local, int64_t cols, float* rows) {
  Timer timer;
  float* leaving = staging(be, received_offsets_[ranks_] * cols);  // the rows go back to their ranks
  reorder(be, local, leaving, cols, /*to_expert_major=*/false);
  exchange(be, leaving, rows, cols, /*forward=*/false);
  seconds_ += timer.seconds();
}

}  // namespace moelab
