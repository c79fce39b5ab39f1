// Sort-by-expert dispatch: counting sorts only, so the order is fully determined by (expert, token).
#include <algorithm>

#include "moe/moe.h"

namespace moelab {

std::vector<int32_t> build_dispatch(const MoeDims& d, Routing& r) {
  const int64_t rows = r.rows, n = d.tokens(), e = d.experts;
  // Pass 1: stable counting sort by token; pass 2: stable counting sort by expert => (expert, token) order.
  std::vector<int64_t> count(std::max(n, e) + 1);
  std::vector<int32_t> by_token(rows), by_expert(rows);
  std::fill(count.begin(), count.end(), 0);
  for (int64_t q = 0; q < rows; ++q) ++count[r.row_token[q] + 1];
  for (int64_t i = 0; i < n; ++i) count[i + 1] += count[i];
  for (int64_t q = 0; q < rows; ++q) by_token[count[r.row_token[q]]++] = static_cast<int32_t>(q);
  std::fill(count.begin(), count.end(), 0);
  for (int64_t q = 0; q < rows; ++q) ++count[r.row_expert[q] + 1];
  for (int64_t x = 0; x < e; ++x) count[x + 1] += count[x];
  for (int64_t x = 0; x <= e; ++x) r.expert_offsets[x] = count[x];
  for (int32_t q : by_token) by_expert[count[r.row_expert[q]]++] = q;
  // Apply the permutation.
  std::vector<int32_t> token(rows), expert(rows);
  std::vector<float> weight(rows);
  for (int64_t s = 0; s < rows; ++s) {
    token[s] = r.row_token[by_expert[s]];
    expert[s] = r.row_expert[by_expert[s]];
    weight[s] = r.row_weight[by_expert[s]];
  }
  std::copy(token.begin(), token.end(), r.row_token.begin());
  std::copy(expert.begin(), expert.end(), r.row_expert.begin());
  std::copy(weight.begin(), weight.end(), r.row_weight.begin());
  // Each token's rows, in row (= expert) order, for the combine.
  std::fill(r.token_offsets.begin(), r.token_offsets.end(), 0);
  for (int64_t s = 0; s < rows; ++s) ++r.token_offsets[token[s] + 1];
  for (int64_t i = 0; i < n; ++i) r.token_offsets[i + 1] += r.token_offsets[i];
  std::vector<int64_t> cursor(r.token_offsets.begin(), r.token_offsets.end() - 1);
  for (int64_t s = 0; s < rows; ++s) r.token_rows[cursor[token[s]]++] = static_cast<int32_t>(s);
  // Where each row went: position[q] = s for by_expert[s] = q.
  std::vector<int32_t> position(rows);
  for (int64_t s = 0; s < rows; ++s) position[by_expert[s]] = static_cast<int32_t>(s);
  return position;
}

}  // namespace moelab
