#include <cmath>

#include "layers/layers.h"

namespace moelab {

void embedding_forward(Backend& be, Tensor out, const int32_t* tokens, Tensor table, Tensor pos) {
  const int64_t b = out.dim(0), t = out.dim(1), c = out.dim(2);
  MOELAB_CHECK(table.dim(1) == c, "embedding width");
  if (!pos.empty()) MOELAB_CHECK(pos.dim(0) >= t && pos.dim(1) == c, "position table " + pos.shape.str());
  be.embedding_forward(out.data, tokens, table.data, pos.empty() ? nullptr : pos.data, b, t, c);
}

void embedding_backward(Backend& be, Tensor dtable, Tensor dpos, const int32_t* tokens, Tensor dout) {
  const int64_t b = dout.dim(0), t = dout.dim(1), c = dout.dim(2);
  be.embedding_backward(dtable.data, dpos.empty() ? nullptr : dpos.data, tokens, dout.data, b, t, c, dtable.dim(0));
}

void sinusoidal_table(float* table, int64_t seq, int64_t dim) {
  const int64_t half = dim / 2;
  const double scale = std::log(10000.0) / static_cast<double>(half - 1);
  for (int64_t t = 0; t < seq; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(t) * std::exp(-static_cast<double>(i) * scale);
      table[t * dim + i] = static_cast<float>(std::sin(angle));
      table[t * dim + half + i] = static_cast<float>(std::cos(angle));
    }
}

}  // namespace moelab
