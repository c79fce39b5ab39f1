// The CUDA backend: device memory through the seam, matrix products through cuBLASLt (fp32, or bf16 operands with
// fp32 accumulation), and a kernel for every other operation of the seam. Deterministic: no atomics anywhere; every
// reduction runs in a fixed order (one block per row with a fixed tree, or one thread per column walking the rows
// in order), so a run repeats bit for bit on one GPU. The kernels are written for clarity first; the conformance
// suite (tests/test_conformance.cpp) checks each against the CPU backend, and scripts/gpu-check.sh runs it on a GPU.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/noise.h"
#include "core/error.h"

namespace moelab {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(std::string("CUDA ") + what + " failed: " + cudaGetErrorString(status));
}
void check_lt(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cuBLASLt ") + what + " failed with status " + std::to_string(static_cast<int>(status)));
}
#define MOELAB_CUDA(call) check_cuda((call), #call)
#define MOELAB_LAUNCH(what) check_cuda(cudaGetLastError(), what)

constexpr int kThreads = 256;
inline int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

// ---- block reductions in a fixed order --------------------------------------------------------------------------
template <class T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}
__device__ float block_max(float v, float* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const float out = shared[0];
  __syncthreads();
  return out;
}

// ---- elementwise -------------------------------------------------------------------------------------------------
#define GRID_LOOP(i, n) for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
                             i += static_cast<int64_t>(blockDim.x) * gridDim.x)

__global__ void k_fill(float* x, float v, int64_t n) { GRID_LOOP(i, n) x[i] = v; }
__global__ void k_scale(float* x, float a, int64_t n) { GRID_LOOP(i, n) x[i] *= a; }
__global__ void k_add(float* o, const float* a, const float* b, int64_t n) { GRID_LOOP(i, n) o[i] = a[i] + b[i]; }
__global__ void k_add_inplace(float* x, const float* y, int64_t n) { GRID_LOOP(i, n) x[i] += y[i]; }
__global__ void k_add_bias(float* x, const float* bias, int64_t rows, int64_t cols) {
  GRID_LOOP(i, rows * cols) x[i] += bias[i % cols];
}
// Round to nearest even, NaN kept quiet, subnormal inputs to a zero of their sign: the CPU backend's rounding
// (vcvtneps2bf16), so both backends multiply the same bf16 operands.
__global__ void k_to_bf16(uint16_t* dst, const float* src, int64_t n) {
  GRID_LOOP(i, n) {
    const uint32_t u = __float_as_uint(src[i]);
    uint16_t out;
    if ((u & 0x7F800000u) == 0) out = static_cast<uint16_t>((u >> 16) & 0x8000u);
    else if ((u & 0x7FFFFFFFu) > 0x7F800000u) out = static_cast<uint16_t>((u >> 16) | 0x40u);
    else out = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dst[i] = out;
  }
}
// C = beta C over a strided batch of (rows x cols) blocks (a product with K = 0); beta = 0 writes zeros.
__global__ void k_scale_blocks(float* c, float beta, int64_t batch, int64_t rows, int64_t cols, int64_t ldc,
                               int64_t stride) {
  GRID_LOOP(i, batch * rows * cols) {
    float* p = c + (i / (rows * cols)) * stride + ((i / cols) % rows) * ldc + i % cols;
    *p = beta == 0.f ? 0.f : beta * *p;
  }
}

constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;
__global__ void k_gelu(float* o, const float* x, int64_t n) {
  GRID_LOOP(i, n) o[i] = 0.5f * x[i] * (1.f + erff(x[i] * kInvSqrt2));
}
__global__ void k_gelu_backward(float* din, const float* x, const float* dout, int64_t n) {
  GRID_LOOP(i, n) {
    const float cdf = 0.5f * (1.f + erff(x[i] * kInvSqrt2));
    din[i] = dout[i] * (cdf + x[i] * kInvSqrt2Pi * expf(-0.5f * x[i] * x[i]));
  }
}
__global__ void k_swiglu(float* o, const float* in, int64_t rows, int64_t f) {
  GRID_LOOP(i, rows * f) {
    const int64_t r = i / f, j = i % f;
    const float g = in[r * 2 * f + j], u = in[r * 2 * f + f + j];
    o[i] = g / (1.f + expf(-g)) * u;
  }
}
__global__ void k_swiglu_backward(float* din, const float* in, const float* dout, int64_t rows, int64_t f) {
  GRID_LOOP(i, rows * f) {
    const int64_t r = i / f, j = i % f;
    const float g = in[r * 2 * f + j], u = in[r * 2 * f + f + j], d = dout[i];
    const float sig = 1.f / (1.f + expf(-g));
    din[r * 2 * f + f + j] = d * g * sig;
    din[r * 2 * f + j] = d * u * sig * (1.f + g * (1.f - sig));
  }
}
__global__ void k_rope(float* x, int64_t batch, int64_t seq, int64_t row_stride, int64_t heads, int64_t hd, float theta,
                       float sign, int64_t first) {
  const int64_t half = hd / 2;
  GRID_LOOP(i, batch * seq * heads * half) {
    const int64_t j = i % half, h = (i / half) % heads, bt = i / (half * heads), t = bt % seq;
    const double inv_freq = pow(static_cast<double>(theta), -2.0 * j / hd);
    const double angle = static_cast<double>(first + t) * inv_freq;
    const float c = static_cast<float>(cos(angle)), s = sign * static_cast<float>(sin(angle));
    float* v = x + bt * row_stride + h * hd;
    const float a = v[j], b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
  }
}
__global__ void k_embedding(float* out, const int32_t* tokens, const float* table, const float* pos, int64_t batch,
                            int64_t seq, int64_t dim) {
  GRID_LOOP(i, batch * seq * dim) {
    const int64_t bt = i / dim, c = i % dim;
    out[i] = table[static_cast<int64_t>(tokens[bt]) * dim + c] + (pos ? pos[(bt % seq) * dim + c] : 0.f);
  }
}
// One thread per channel walks the tokens in order: rows hit by repeated tokens never race.
__global__ void k_embedding_backward(float* dtable, float* dpos, const int32_t* tokens, const float* dout,
                                     int64_t batch, int64_t seq, int64_t dim) {
  GRID_LOOP(c, dim) {
    for (int64_t bt = 0; bt < batch * seq; ++bt) dtable[static_cast<int64_t>(tokens[bt]) * dim + c] += dout[bt * dim + c];
    if (dpos)
      for (int64_t bt = 0; bt < batch * seq; ++bt) dpos[(bt % seq) * dim + c] += dout[bt * dim + c];
  }
}
__global__ void k_gather_rows(float* dst, const float* src, const int32_t* index, const float* scale, int64_t rows,
                              int64_t cols) {
  GRID_LOOP(i, rows * cols) {
    const int64_t r = i / cols;
    dst[i] = (scale ? scale[r] : 1.f) * src[static_cast<int64_t>(index[r]) * cols + i % cols];
  }
}
__global__ void k_combine_rows(float* out, const float* src, const int64_t* offsets, const int32_t* rows,
                               const float* weight, int64_t n, int64_t cols) {
  GRID_LOOP(i, n * cols) {
    const int64_t t = i / cols, c = i % cols;
    float acc = out[i];
    for (int64_t j = offsets[t]; j < offsets[t + 1]; ++j) {
      const int64_t r = rows[j];
      acc += (weight ? weight[r] : 1.f) * src[r * cols + c];
    }
    out[i] = acc;
  }
}
// One block per row.
__global__ void k_row_dots(float* out, const float* a, const int32_t* index, const float* b, int64_t cols) {
  __shared__ float sh[kThreads];
  const int64_t r = blockIdx.x;
  const float* x = a + static_cast<int64_t>(index[r]) * cols;
  const float* y = b + r * cols;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += x[c] * y[c];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) out[r] = s;
}
// One thread per column, rows in order.
__global__ void k_column_sums(float* out, const float* in, int64_t rows, int64_t cols) {
  GRID_LOOP(c, cols) {
    float s = out[c];
    for (int64_t r = 0; r < rows; ++r) s += in[r * cols + c];
    out[c] = s;
  }
}

// ---- norms (one block per row) -----------------------------------------------------------------------------------
__global__ void k_layernorm(float* out, float* mean, float* rstd, const float* in, const float* w, const float* b,
                            int64_t cols, float eps, bool rms) {
  __shared__ double sh[kThreads];
  const int64_t r = blockIdx.x;
  const float* x = in + r * cols;
  double s = 0;
  if (!rms)
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += x[c];
  const float mu = rms ? 0.f : static_cast<float>(block_sum(s, sh) / cols);
  double v = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) v += static_cast<double>(x[c] - mu) * (x[c] - mu);
  const float rs = static_cast<float>(1.0 / sqrt(block_sum(v, sh) / cols + eps));
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    out[r * cols + c] = (x[c] - mu) * rs * w[c] + (b ? b[c] : 0.f);
  if (threadIdx.x == 0) {
    if (!rms) mean[r] = mu;
    rstd[r] = rs;
  }
}
__global__ void k_layernorm_backward_input(float* din, const float* dout, const float* in, const float* w,
                                           const float* mean, const float* rstd, int64_t cols, bool rms) {
  __shared__ double sh[kThreads];
  const int64_t r = blockIdx.x;
  const float* x = in + r * cols;
  const float* dy = dout + r * cols;
  const float mu = rms ? 0.f : mean[r], rs = rstd[r];
  double s1 = 0, s2 = 0;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = (x[c] - mu) * rs, dxhat = dy[c] * w[c];
    s1 += dxhat;
    s2 += static_cast<double>(dxhat) * xhat;
  }
  const float m1 = rms ? 0.f : static_cast<float>(block_sum(s1, sh) / cols);
  const float m2 = static_cast<float>(block_sum(s2, sh) / cols);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float xhat = (x[c] - mu) * rs;
    din[r * cols + c] += rs * (dy[c] * w[c] - m1 - xhat * m2);
  }
}
__global__ void k_norm_backward_params(float* dw, float* db, const float* dout, const float* in, const float* mean,
                                       const float* rstd, int64_t rows, int64_t cols, bool rms) {
  GRID_LOOP(c, cols) {
    float sw = 0.f, sb = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const float xhat = (in[r * cols + c] - (rms ? 0.f : mean[r])) * rstd[r];
      sw += dout[r * cols + c] * xhat;
      sb += dout[r * cols + c];
    }
    dw[c] += sw;
    if (db) db[c] += sb;
  }
}

// ---- softmaxes and the loss (one block per row) ------------------------------------------------------------------
__global__ void k_softmax_rows(float* x, int64_t cols, float scale, int64_t seq, bool causal) {
  __shared__ float shf[kThreads];
  __shared__ double shd[kThreads];
  const int64_t r = blockIdx.x;
  float* s = x + r * cols;
  const int64_t live = causal ? (r % seq) + 1 : cols;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < live; j += blockDim.x) mx = fmaxf(mx, s[j] * scale);
  mx = block_max(mx, shf);
  double sum = 0;
  for (int64_t j = threadIdx.x; j < live; j += blockDim.x) {
    s[j] = expf(s[j] * scale - mx);
    sum += s[j];
  }
  const float inv = static_cast<float>(1.0 / block_sum(sum, shd));
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s[j] = j < live ? s[j] * inv : 0.f;
}
__global__ void k_causal_softmax_backward(float* dprobs, const float* probs, float scale, int64_t seq) {
  __shared__ float sh[kThreads];
  const int64_t r = blockIdx.x, t = r % seq;
  float* d = dprobs + r * seq;
  const float* p = probs + r * seq;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j <= t; j += blockDim.x) dot += d[j] * p[j];
  dot = block_sum(dot, sh);
  for (int64_t j = threadIdx.x; j < seq; j += blockDim.x) d[j] = j <= t ? scale * p[j] * (d[j] - dot) : 0.f;
}
__global__ void k_cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t vocab, float grad_scale) {
  __shared__ float shf[kThreads];
  __shared__ double shd[kThreads];
  const int64_t r = blockIdx.x;
  float* z = logits + r * vocab;
  const int32_t target = targets[r];
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, z[j]);
  mx = block_max(mx, shf);
  double sum = 0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(z[j] - mx);
  sum = block_sum(sum, shd);
  const float target_logit = target >= 0 ? z[target] : 0.f;
  __syncthreads();
  if (threadIdx.x == 0) losses[r] = target >= 0 ? static_cast<float>(log(sum) - (target_logit - mx)) : 0.f;
  if (grad_scale != 0.f) {
    const float factor = static_cast<float>(grad_scale / sum);
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      z[j] = target < 0 ? 0.f : expf(z[j] - mx) * factor - (j == target ? grad_scale : 0.f);
  }
}

// ---- sums and the optimizer --------------------------------------------------------------------------------------
// One block: a fixed partition of x over its threads, then the block's fixed tree.
__global__ void k_sum(double* out, const float* x, int64_t n, bool squares) {
  __shared__ double sh[kThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += squares ? static_cast<double>(x[i]) * x[i] : x[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *out = s;
}
__global__ void k_block_sum_squares(double* out, const float* c, int64_t rows, int64_t cols, int64_t ldc) {
  __shared__ double sh[kThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const double v = c[(i / cols) * ldc + i % cols];
    s += v * v;
  }
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *out = s;
}
__global__ void k_adamw(float* p, float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps,
                        float wd, float gs, float bc1, float bc2_sqrt, bool zero_grad) {
  GRID_LOOP(i, n) {
    const float grad = g[i] * gs;
    if (zero_grad) g[i] = 0.f;
    m[i] = b1 * m[i] + (1.f - b1) * grad;
    v[i] = b2 * v[i] + (1.f - b2) * grad * grad;
    p[i] = p[i] * (1.f - lr * wd) - (lr / bc1) * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
  }
}

// ---- routing: the CPU's algorithms (backend/cpu/routing.cpp), one row per block for the softmax and one thread for
// the sequential decisions (capacity in (rank, token) order, counting sorts) -----------------------------------------
__global__ void k_router_softmax_rows(const float* logits, float* probs, float* lse, int64_t n, int64_t e) {
  GRID_LOOP(i, n) {
    const float* z = logits + i * e;
    float* p = probs + i * e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < e; ++j) mx = fmaxf(mx, z[j]);
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) {
      p[j] = expf(z[j] - mx);
      sum += p[j];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < e; ++j) p[j] *= inv;
    lse[i] = static_cast<float>(mx + log(sum));
  }
}
__global__ void k_router_sigmoid_rows(const float* logits, float* scores, float* lse, int64_t n, int64_t e) {
  GRID_LOOP(i, n) {
    const float* z = logits + i * e;
    float* s = scores + i * e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < e; ++j) mx = fmaxf(mx, z[j]);
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) sum += exp(static_cast<double>(z[j] - mx));
    for (int64_t j = 0; j < e; ++j) s[j] = 1.f / (1.f + expf(-z[j]));
    lse[i] = static_cast<float>(mx + log(sum));
  }
}
// Top-k by score plus the selection bias (when given), highest first, the lower index first among equals.
__global__ void k_topk(const float* probs, RoutingState r, int64_t n, int64_t e, int64_t k) {
  GRID_LOOP(i, n) {
    const float* p = probs + i * e;
    const float* b = r.selection_bias;
    int32_t* best = r.topk_expert + i * k;
    int64_t kept = 0;
    for (int32_t x = 0; x < e; ++x) {
      const float key = b ? p[x] + b[x] : p[x];
      if (kept == k && !(key > (b ? p[best[k - 1]] + b[best[k - 1]] : p[best[k - 1]]))) continue;
      int64_t pos = kept < k ? kept++ : k - 1;
      while (pos > 0 && key > (b ? p[best[pos - 1]] + b[best[pos - 1]] : p[best[pos - 1]])) {
        best[pos] = best[pos - 1];
        --pos;
      }
      best[pos] = x;
    }
    for (int64_t j = 0; j < k; ++j) r.topk_prob[i * k + j] = p[best[j]];
  }
}
// 1 / sum_e s_ie for sigmoid scores, 1 for a softmax.
__device__ float prob_norm(const float* probs, int64_t i, int64_t e, bool sigmoid) {
  if (!sigmoid) return 1.f;
  double sum = 0;
  for (int64_t j = 0; j < e; ++j) sum += probs[i * e + j];
  return static_cast<float>(1.0 / sum);
}
struct RouteScratch {
  int64_t* count;       // max(n, e) + 1
  int32_t* by_token;    // rows
  int32_t* by_expert;   // rows
  int32_t* tmp_token;   // rows
  int32_t* tmp_expert;  // rows
  float* tmp_weight;    // rows
  int32_t* position;    // rows
  int64_t* load;        // e
};
// The dispatch order: stable counting sorts by token, then by expert; offsets; each token's rows; where each row went.
__device__ void build_dispatch(RoutingState r, RouteScratch s, int64_t rows, int64_t n, int64_t e) {
  const int64_t m = (n > e ? n : e) + 1;
  for (int64_t x = 0; x < m; ++x) s.count[x] = 0;
  for (int64_t q = 0; q < rows; ++q) ++s.count[r.row_token[q] + 1];
  for (int64_t i = 0; i < n; ++i) s.count[i + 1] += s.count[i];
  for (int64_t q = 0; q < rows; ++q) s.by_token[s.count[r.row_token[q]]++] = static_cast<int32_t>(q);
  for (int64_t x = 0; x < m; ++x) s.count[x] = 0;
  for (int64_t q = 0; q < rows; ++q) ++s.count[r.row_expert[q] + 1];
  for (int64_t x = 0; x < e; ++x) s.count[x + 1] += s.count[x];
  for (int64_t x = 0; x <= e; ++x) r.expert_offsets[x] = s.count[x];
  for (int64_t q = 0; q < rows; ++q) {
    const int32_t t = s.by_token[q];
    s.by_expert[s.count[r.row_expert[t]]++] = t;
  }
  for (int64_t q = 0; q < rows; ++q) {
    s.tmp_token[q] = r.row_token[s.by_expert[q]];
    s.tmp_expert[q] = r.row_expert[s.by_expert[q]];
    s.tmp_weight[q] = r.row_weight[s.by_expert[q]];
  }
  for (int64_t q = 0; q < rows; ++q) {
    r.row_token[q] = s.tmp_token[q];
    r.row_expert[q] = s.tmp_expert[q];
    r.row_weight[q] = s.tmp_weight[q];
  }
  for (int64_t i = 0; i <= n; ++i) r.token_offsets[i] = 0;
  for (int64_t q = 0; q < rows; ++q) ++r.token_offsets[r.row_token[q] + 1];
  for (int64_t i = 0; i < n; ++i) r.token_offsets[i + 1] += r.token_offsets[i];
  for (int64_t i = 0; i < n; ++i) s.count[i] = r.token_offsets[i];
  for (int64_t q = 0; q < rows; ++q) r.token_rows[s.count[r.row_token[q]]++] = static_cast<int32_t>(q);
  for (int64_t q = 0; q < rows; ++q) s.position[s.by_expert[q]] = static_cast<int32_t>(q);
}
__device__ void mean_probs(const float* probs, RoutingState r, int64_t n, int64_t e, bool sigmoid) {
  for (int64_t j = 0; j < e; ++j) r.mean_prob[j] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float inv = prob_norm(probs, i, e, sigmoid);
    for (int64_t j = 0; j < e; ++j) r.mean_prob[j] += probs[i * e + j] * inv;
  }
  for (int64_t j = 0; j < e; ++j) r.mean_prob[j] /= static_cast<double>(n);
}
__global__ void k_route_token_choice(const float* probs, RoutingState r, RouteScratch s, RouterShape d) {
  const int64_t n = d.batch * d.seq, e = d.experts, k = d.top_k, capacity = d.capacity;
  for (int64_t x = 0; x < e; ++x) s.load[x] = 0, r.assigned_fraction[x] = 0.0;
  for (int64_t x = 0; x < d.batch * e; ++x) r.seq_fraction[x] = 0.0;
  int64_t rows = 0;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int32_t ex = r.topk_expert[i * k + j];
      r.assigned_fraction[ex] += 1.0;
      r.seq_fraction[(i / d.seq) * e + ex] += 1.0;
      if (capacity > 0 && s.load[ex] >= capacity) {
        r.topk_row[i * k + j] = -1;
        continue;
      }
      ++s.load[ex];
      r.topk_row[i * k + j] = static_cast<int32_t>(rows);
      r.row_token[rows] = static_cast<int32_t>(i);
      r.row_expert[rows] = ex;
      ++rows;
    }
  for (int64_t x = 0; x < e; ++x) r.assigned_fraction[x] /= static_cast<double>(n * k);
  for (int64_t x = 0; x < d.batch * e; ++x) r.seq_fraction[x] /= static_cast<double>(d.seq * k);
  for (int64_t i = 0; i < n; ++i) {
    float denom = 1.f;
    if (d.renormalize || d.sigmoid) {
      denom = 0.f;
      for (int64_t j = 0; j < k; ++j) denom += r.topk_prob[i * k + j];
    }
    for (int64_t j = 0; j < k; ++j)
      if (r.topk_row[i * k + j] >= 0)
        r.row_weight[r.topk_row[i * k + j]] = r.topk_prob[i * k + j] / denom * d.gate_scale;
  }
  mean_probs(probs, r, n, e, d.sigmoid);
  build_dispatch(r, s, rows, n, e);
  for (int64_t q = 0; q < n * k; ++q)
    if (r.topk_row[q] >= 0) r.topk_row[q] = s.position[r.topk_row[q]];
}
__global__ void k_route_expert_choice(const float* probs, RoutingState r, RouteScratch s, RouterShape d) {
  const int64_t B = d.batch, T = d.seq, e = d.experts, c = d.capacity;
  int64_t rows = 0;
  int32_t* order = s.tmp_token;  // B entries, free until build_dispatch
  for (int64_t ex = 0; ex < e; ++ex)
    for (int64_t t = 0; t < T; ++t) {
      // the c best of the B tokens at position t, highest probability first, the lower sequence first among equals
      for (int64_t b = 0; b < B; ++b) order[b] = static_cast<int32_t>(b);
      for (int64_t j = 0; j < c; ++j) {
        int64_t best = j;
        for (int64_t q = j + 1; q < B; ++q) {
          const float a = probs[(order[q] * T + t) * e + ex], bb = probs[(order[best] * T + t) * e + ex];
          if (a > bb || (a == bb && order[q] < order[best])) best = q;
        }
        const int32_t tmp = order[j];
        order[j] = order[best];
        order[best] = tmp;
        const int64_t token = order[j] * T + t;
        r.row_token[rows] = static_cast<int32_t>(token);
        r.row_expert[rows] = static_cast<int32_t>(ex);
        r.row_weight[rows] = probs[token * e + ex] * d.gate_scale;
        ++rows;
      }
    }
  for (int64_t x = 0; x < e; ++x) r.assigned_fraction[x] = 1.0 / static_cast<double>(e);
  mean_probs(probs, r, B * T, e, d.sigmoid);
  build_dispatch(r, s, rows, B * T, e);
}
__global__ void k_router_statistics(const float* logits, const float* probs, RoutingState r, double* out,
                                    RouterShape d) {
  const int64_t n = d.batch * d.seq, E = d.experts;
  double entropy = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!d.sigmoid) {
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += static_cast<double>(probs[i * E + e]) * logits[i * E + e];
      entropy += r.lse[i] - dot;
    } else {
      double sum = 0, slogs = 0;
      for (int64_t e = 0; e < E; ++e) {
        const double s = probs[i * E + e];
        sum += s;
        if (s > 0) slogs += s * log(s);
      }
      entropy += log(sum) - slogs / sum;
    }
    z += static_cast<double>(r.lse[i]) * r.lse[i];
  }
  out[kRouterEntropy] = entropy / static_cast<double>(n);
  out[kRouterZLoss] = z / static_cast<double>(n);
  double aux = 0;
  for (int64_t e = 0; e < E; ++e) aux += r.assigned_fraction[e] * r.mean_prob[e];
  out[kRouterAuxLoss] = d.expert_choice ? 0.0 : static_cast<double>(E) * aux;
  double seq_aux = 0;
  if (!d.expert_choice) {
    for (int64_t b = 0; b < d.batch; ++b) {
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        double mean = 0;
        for (int64_t t = 0; t < d.seq; ++t) {
          const int64_t i = b * d.seq + t;
          mean += probs[i * E + e] * prob_norm(probs, i, E, d.sigmoid);
        }
        sum += r.seq_fraction[b * E + e] * mean / static_cast<double>(d.seq);
      }
      seq_aux += static_cast<double>(E) * sum;
    }
    seq_aux /= static_cast<double>(d.batch);
  }
  out[kRouterSeqAuxLoss] = seq_aux;
}
// Per token (one thread each): the gate weights' gradient through the gate scale, selection and renormalisation,
// the balancing losses', then through the scores (softmax or sigmoid), plus the z-loss's. Expert choice: a token's
// rows are found through its token_rows, so no two threads write one place.
__global__ void k_router_backward(float* dlogits, const float* logits, const float* probs, const float* dweight,
                                  RoutingState r, RouterShape d, RouterLossScales scales) {
  const int64_t n = d.batch * d.seq, E = d.experts, K = d.top_k;
  GRID_LOOP(i, n) {
    float* dg = dlogits + i * E;
    for (int64_t e = 0; e < E; ++e) dg[e] = 0.f;
    if (!d.expert_choice) {
      if (d.renormalize || d.sigmoid) {
        float denom = 0, dot = 0;
        for (int64_t j = 0; j < K; ++j) denom += r.topk_prob[i * K + j];
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dot += dweight[row] * r.topk_prob[i * K + j] / denom;
        }
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          dg[r.topk_expert[i * K + j]] += d.gate_scale * ((row >= 0 ? dweight[row] : 0.f) - dot) / denom;
        }
      } else {
        for (int64_t j = 0; j < K; ++j) {
          const int32_t row = r.topk_row[i * K + j];
          if (row >= 0) dg[r.topk_expert[i * K + j]] += d.gate_scale * dweight[row];
        }
      }
    } else {
      for (int64_t j = r.token_offsets[i]; j < r.token_offsets[i + 1]; ++j) {
        const int32_t q = r.token_rows[j];
        dg[r.row_expert[q]] += d.gate_scale * dweight[q];
      }
    }
    const bool aux = !d.expert_choice && (scales.aux != 0.f || scales.seq_aux != 0.f);
    const float* p = probs + i * E;
    const double* seq_f = r.seq_fraction + (i / d.seq) * E;
    const double per = static_cast<double>(E) / static_cast<double>(n);
    const float z_lse = scales.z * r.lse[i];
    if (!d.sigmoid) {
      if (aux)
        for (int64_t e = 0; e < E; ++e)
          dg[e] += static_cast<float>(per * (scales.aux * r.assigned_fraction[e] + scales.seq_aux * seq_f[e]));
      float dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += dg[e] * p[e];
      for (int64_t e = 0; e < E; ++e) dg[e] = p[e] * (dg[e] - dot) + z_lse * p[e];
    } else {
      const float inv = prob_norm(probs, i, E, true);
      if (aux) {
        float dot = 0;
        for (int64_t e = 0; e < E; ++e)
          dot += static_cast<float>(per * (scales.aux * r.assigned_fraction[e] + scales.seq_aux * seq_f[e])) * p[e] * inv;
        for (int64_t e = 0; e < E; ++e)
          dg[e] += (static_cast<float>(per * (scales.aux * r.assigned_fraction[e] + scales.seq_aux * seq_f[e])) - dot) *
                   inv;
      }
      const float* z = logits + i * E;
      for (int64_t e = 0; e < E; ++e)
        dg[e] = p[e] * (1.f - p[e]) * dg[e] + (z_lse != 0.f ? z_lse * expf(z[e] - r.lse[i]) : 0.f);
    }
  }
}
__global__ void k_jitter(float* out, const float* in, int64_t n, uint64_t seed, float eps) {
  GRID_LOOP(i, n) out[i] = in[i] * jitter_factor(seed, i, eps);
}
// QK-norm: one thread per (row, head) vector.
__global__ void k_head_rmsnorm(float* x, float* saved, float* rstd, const float* w, int64_t count, int64_t stride,
                               int64_t heads, int64_t hd, float eps) {
  GRID_LOOP(q, count) {
    float* v = x + (q / heads) * stride + (q % heads) * hd;
    float* keep = saved + q * hd;
    double ss = 0.0;
    for (int64_t c = 0; c < hd; ++c) {
      keep[c] = v[c];
      ss += static_cast<double>(v[c]) * v[c];
    }
    const float rs = static_cast<float>(1.0 / sqrt(ss / hd + eps));
    for (int64_t c = 0; c < hd; ++c) v[c] = keep[c] * rs * w[c];
    rstd[q] = rs;
  }
}
__global__ void k_head_rmsnorm_backward(float* dx, const float* saved, const float* w, const float* rstd, int64_t count,
                                        int64_t stride, int64_t heads, int64_t hd) {
  GRID_LOOP(q, count) {
    float* g = dx + (q / heads) * stride + (q % heads) * hd;
    const float* x = saved + q * hd;
    const float rs = rstd[q];
    double sum = 0.0;
    for (int64_t c = 0; c < hd; ++c) sum += static_cast<double>(g[c] * w[c]) * (x[c] * rs);
    const float m2 = static_cast<float>(sum / hd);
    for (int64_t c = 0; c < hd; ++c) g[c] = rs * (g[c] * w[c] - x[c] * rs * m2);
  }
}
// The weight's gradient: one thread per column c, summing over the vectors in order (before k_head_rmsnorm_backward
// overwrites the output gradient).
__global__ void k_head_rmsnorm_dweight(float* dw, const float* dx, const float* saved, const float* rstd,
                                       int64_t count, int64_t stride, int64_t heads, int64_t hd) {
  GRID_LOOP(c, hd) {
    float acc = 0.f;
    for (int64_t q = 0; q < count; ++q)
      acc += dx[(q / heads) * stride + (q % heads) * hd + c] * saved[q * hd + c] * rstd[q];
    dw[c] += acc;
  }
}

// ---- the backend ---------------------------------------------------------------------------------------------------
class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    int devices = 0;
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status != cudaSuccess || devices == 0)
      throw Error(std::string("no usable CUDA device (") +
                  (status != cudaSuccess ? cudaGetErrorString(status) : "none found") +
                  "); choose train.backend = cpu, or run on a machine with an NVIDIA GPU");
    // One GPU per process of a node: the launcher's local rank picks it (mpirun, srun), else GPU 0.
    int device = 0;
    for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"})
      if (const char* v = std::getenv(var)) {
        device = std::atoi(v) % devices;
        break;
      }
    MOELAB_CUDA(cudaSetDevice(device));
    check_lt(cublasLtCreate(&lt_), "cublasLtCreate");
    workspace_bytes_ = size_t{64} << 20;
    MOELAB_CUDA(cudaMalloc(&workspace_, workspace_bytes_));
  }
  ~CudaBackend() override {
    for (void* p : {static_cast<void*>(workspace_), static_cast<void*>(bf16_a_), static_cast<void*>(bf16_b_),
                    scratch_})
      if (p) cudaFree(p);
    if (lt_) cublasLtDestroy(lt_);
  }
  std::string name() const override { return "cuda"; }

  void* alloc_bytes(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t status = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (status != cudaSuccess)
      throw Error("out of GPU memory allocating " + std::to_string(bytes >> 20) + " MiB (" + cudaGetErrorString(status) +
                  "); reduce the batch size or the model");
    MOELAB_CUDA(cudaMemset(p, 0, std::max<size_t>(bytes, 1)));
    sizes_[p] = bytes;
    live_bytes_ += bytes;
    peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    if (auto it = sizes_.find(p); it != sizes_.end()) {
      live_bytes_ -= it->second;
      sizes_.erase(it);
    }
    cudaFree(p);
  }
  size_t peak_allocated_bytes() const override { return peak_bytes_; }
  void upload_bytes(void* dst, const void* src, size_t bytes) override {
    if (bytes) MOELAB_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  void download_bytes(void* dst, const void* src, size_t bytes) override {
    if (bytes) MOELAB_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  void fill(float* x, float v, int64_t n) override {
    if (n > 0) k_fill<<<blocks_for(n), kThreads>>>(x, v, n);
    MOELAB_LAUNCH("fill");
  }
  void copy(float* dst, const float* src, int64_t n) override {
    if (n > 0) MOELAB_CUDA(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice));
  }
  void scale(float* x, float a, int64_t n) override {
    if (n > 0) k_scale<<<blocks_for(n), kThreads>>>(x, a, n);
    MOELAB_LAUNCH("scale");
  }

  // ---- products: row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T --------------------------------
  void set_matmul_precision(Precision p) override { precision_ = p; }
  Precision matmul_precision() const override { return precision_; }
  void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override {
    matmul(ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
  }
  void gemm_strided_batched(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                            int64_t lda, int64_t sa, const float* b, int64_t ldb, int64_t sb, float beta, float* c,
                            int64_t ldc, int64_t sc, int64_t batch) override {
    matmul(ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch);
  }
  void gemm_strided_batched2(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                             int64_t lda, int64_t sa, int64_t oa, const float* b, int64_t ldb, int64_t sb, int64_t ob,
                             float beta, float* c, int64_t ldc, int64_t sc, int64_t oc, int64_t batch,
                             int64_t outer) override {
    for (int64_t o = 0; o < outer; ++o)
      matmul(ta, tb, m, n, k, alpha, a + o * oa, lda, sa, b + o * ob, ldb, sb, beta, c + o * oc, ldc, sc, batch);
  }
  void gemm_batch(const GemmProblem* problems, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) {
      const GemmProblem& p = problems[i];
      matmul(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, 0, p.b, p.ldb, 0, p.beta, p.c, p.ldc, 0, 1);
      if (p.c_sum_squares) {
        k_block_sum_squares<<<1, kThreads>>>(p.c_sum_squares, p.c, p.m, p.n, p.ldc);
        MOELAB_LAUNCH("gemm_batch sum of squares");
      }
    }
  }
  // One product per non-empty expert.
  void grouped_gemm(Trans ta, Trans tb, int64_t n, int64_t k, float alpha, const GemmGroup* groups, int64_t count,
                    int64_t lda, int64_t ldb, float beta, int64_t ldc) override {
    for (int64_t g = 0; g < count; ++g)
      if (groups[g].m > 0)
        matmul(ta, tb, groups[g].m, n, k, alpha, groups[g].a, lda, 0, groups[g].b, ldb, 0, beta, groups[g].c, ldc, 0, 1);
  }

  // ---- elementwise ---------------------------------------------------------------------------------------------
  void add(float* o, const float* a, const float* b, int64_t n) override { launch1(k_add, n, "add", o, a, b, n); }
  void add_inplace(float* x, const float* y, int64_t n) override { launch1(k_add_inplace, n, "add_inplace", x, y, n); }
  void add_bias(float* x, const float* bias, int64_t rows, int64_t cols) override {
    launch1(k_add_bias, rows * cols, "add_bias", x, bias, rows, cols);
  }
  void gelu_forward(float* o, const float* x, int64_t n) override { launch1(k_gelu, n, "gelu", o, x, n); }
  void gelu_backward(float* din, const float* x, const float* dout, int64_t n) override {
    launch1(k_gelu_backward, n, "gelu_backward", din, x, dout, n);
  }
  void swiglu_forward(float* o, const float* in, int64_t rows, int64_t f) override {
    launch1(k_swiglu, rows * f, "swiglu", o, in, rows, f);
  }
  void swiglu_backward(float* din, const float* in, const float* dout, int64_t rows, int64_t f) override {
    launch1(k_swiglu_backward, rows * f, "swiglu_backward", din, in, dout, rows, f);
  }
  void rope(float* x, int64_t batch, int64_t seq, int64_t row_stride, int64_t heads, int64_t hd, float theta,
            bool inverse, int64_t first) override {
    launch1(k_rope, batch * seq * heads * (hd / 2), "rope", x, batch, seq, row_stride, heads, hd, theta,
            inverse ? -1.f : 1.f, first);
  }
  void softmax_rows(float* x, int64_t rows, int64_t cols, float scale) override {
    if (rows > 0) k_softmax_rows<<<static_cast<unsigned>(rows), kThreads>>>(x, cols, scale, cols, false);
    MOELAB_LAUNCH("softmax_rows");
  }
  void embedding_forward(float* out, const int32_t* tokens, const float* table, const float* pos, int64_t batch,
                         int64_t seq, int64_t dim) override {
    launch1(k_embedding, batch * seq * dim, "embedding", out, tokens, table, pos, batch, seq, dim);
  }
  void embedding_backward(float* dtable, float* dpos, const int32_t* tokens, const float* dout, int64_t batch,
                          int64_t seq, int64_t dim, int64_t vocab) override {
    launch1(k_embedding_backward, dim, "embedding_backward", dtable, dpos, tokens, dout, batch, seq, dim);
  }
  void gather_rows(float* dst, const float* src, const int32_t* index, const float* scale, int64_t rows,
                   int64_t cols) override {
    launch1(k_gather_rows, rows * cols, "gather_rows", dst, src, index, scale, rows, cols);
  }
  void combine_rows(float* out, const float* src, const int64_t* offsets, const int32_t* rows, const float* weight,
                    int64_t n, int64_t cols) override {
    launch1(k_combine_rows, n * cols, "combine_rows", out, src, offsets, rows, weight, n, cols);
  }
  void row_dots(float* out, const float* a, const int32_t* index, const float* b, int64_t rows, int64_t cols) override {
    if (rows > 0) k_row_dots<<<static_cast<unsigned>(rows), kThreads>>>(out, a, index, b, cols);
    MOELAB_LAUNCH("row_dots");
  }

  // ---- routing ---------------------------------------------------------------------------------------------------
  void route(const RouterShape& s, const float* logits, float* probs, const RoutingState& st) override {
    const int64_t n = s.tokens(), e = s.experts;
    if (s.sigmoid) launch1(k_router_sigmoid_rows, n, "router sigmoid", logits, probs, st.lse, n, e);
    else launch1(k_router_softmax_rows, n, "router softmax", logits, probs, st.lse, n, e);
    const RouteScratch scratch = route_scratch(s);
    if (s.expert_choice) {
      k_route_expert_choice<<<1, 1>>>(probs, st, scratch, s);
    } else {
      launch1(k_topk, n, "top-k", probs, st, n, e, s.top_k);
      k_route_token_choice<<<1, 1>>>(probs, st, scratch, s);
    }
    MOELAB_LAUNCH("route");
  }
  void router_statistics(const RouterShape& s, const float* logits, const float* probs, const RoutingState& st,
                         double* out) override {
    k_router_statistics<<<1, 1>>>(logits, probs, st, out, s);
    MOELAB_LAUNCH("router_statistics");
  }
  void router_backward(const RouterShape& s, float* dlogits, const float* logits, const float* probs,
                       const float* dweight, const RoutingState& st, const RouterLossScales& scales) override {
    launch1(k_router_backward, s.tokens(), "router_backward", dlogits, logits, probs, dweight, st, s, scales);
  }
  void jitter(float* out, const float* in, int64_t n, uint64_t seed, float eps) override {
    launch1(k_jitter, n, "jitter", out, in, n, seed, eps);
  }

  // ---- reductions --------------------------------------------------------------------------------------------------
  void bias_backward(float* dbias, const float* dout, int64_t rows, int64_t cols) override {
    launch1(k_column_sums, cols, "bias_backward", dbias, dout, rows, cols);
  }
  void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* w, const float* b,
                         int64_t rows, int64_t cols, float eps) override {
    if (rows > 0) k_layernorm<<<static_cast<unsigned>(rows), kThreads>>>(out, mean, rstd, in, w, b, cols, eps, false);
    MOELAB_LAUNCH("layernorm");
  }
  void layernorm_backward(float* din, float* dw, float* db, const float* dout, const float* in, const float* w,
                          const float* mean, const float* rstd, int64_t rows, int64_t cols) override {
    if (rows > 0)
      k_layernorm_backward_input<<<static_cast<unsigned>(rows), kThreads>>>(din, dout, in, w, mean, rstd, cols, false);
    launch1(k_norm_backward_params, cols, "layernorm_backward", dw, db, dout, in, mean, rstd, rows, cols, false);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* in, const float* w, int64_t rows, int64_t cols,
                       float eps) override {
    if (rows > 0) k_layernorm<<<static_cast<unsigned>(rows), kThreads>>>(out, nullptr, rstd, in, w, nullptr, cols, eps, true);
    MOELAB_LAUNCH("rmsnorm");
  }
  void rmsnorm_backward(float* din, float* dw, const float* dout, const float* in, const float* w, const float* rstd,
                        int64_t rows, int64_t cols) override {
    if (rows > 0)
      k_layernorm_backward_input<<<static_cast<unsigned>(rows), kThreads>>>(din, dout, in, w, nullptr, rstd, cols, true);
    launch1(k_norm_backward_params, cols, "rmsnorm_backward", dw, static_cast<float*>(nullptr), dout, in,
            static_cast<const float*>(nullptr), rstd, rows, cols, true);
  }
  void head_rmsnorm_forward(float* x, float* saved, float* rstd, const float* weight, int64_t rows,
                            int64_t row_stride, int64_t heads, int64_t head_dim, float eps) override {
    launch1(k_head_rmsnorm, rows * heads, "head_rmsnorm", x, saved, rstd, weight, rows * heads, row_stride, heads,
            head_dim, eps);
  }
  void head_rmsnorm_backward(float* dx, float* dweight, const float* saved, const float* weight, const float* rstd,
                             int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim) override {
    launch1(k_head_rmsnorm_dweight, head_dim, "head_rmsnorm dweight", dweight, dx, saved, rstd, rows * heads,
            row_stride, heads, head_dim);
    launch1(k_head_rmsnorm_backward, rows * heads, "head_rmsnorm_backward", dx, saved, weight, rstd, rows * heads,
            row_stride, heads, head_dim);
  }

  void causal_softmax_forward(float* scores, float scale, int64_t count, int64_t seq) override {
    if (count * seq > 0) k_softmax_rows<<<static_cast<unsigned>(count * seq), kThreads>>>(scores, seq, scale, seq, true);
    MOELAB_LAUNCH("causal_softmax_forward");
  }
  void causal_softmax_backward(float* dprobs, const float* probs, float scale, int64_t count, int64_t seq) override {
    if (count * seq > 0) k_causal_softmax_backward<<<static_cast<unsigned>(count * seq), kThreads>>>(dprobs, probs, scale, seq);
    MOELAB_LAUNCH("causal_softmax_backward");
  }
  void softmax_cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t rows, int64_t vocab,
                             float grad_scale) override {
    if (rows > 0) k_cross_entropy<<<static_cast<unsigned>(rows), kThreads>>>(logits, losses, targets, vocab, grad_scale);
    MOELAB_LAUNCH("softmax_cross_entropy");
  }
  double sum(const float* x, int64_t n) override { return reduce(x, n, false); }
  double sum_squares(const float* x, int64_t n) override { return reduce(x, n, true); }
  void adamw_update(float* p, float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps, float wd,
                    float gs, int64_t step, bool zero_grad) override {
    const float bc1 = 1.f - static_cast<float>(std::pow(static_cast<double>(b1), static_cast<double>(step)));
    const float bc2 = 1.f - static_cast<float>(std::pow(static_cast<double>(b2), static_cast<double>(step)));
    launch1(k_adamw, n, "adamw", p, g, m, v, n, lr, b1, b2, eps, wd, gs, bc1, std::sqrt(bc2), zero_grad);
  }
  void set_threads(int) override {}
  int threads() const override { return 1; }
  void synchronize() override { MOELAB_CUDA(cudaDeviceSynchronize()); }

 private:
  template <class Kernel, class... Args>
  void launch1(Kernel kernel, int64_t n, const char* what, Args... args) {
    if (n > 0) kernel<<<blocks_for(n), kThreads>>>(args...);
    MOELAB_LAUNCH(what);
  }
  double reduce(const float* x, int64_t n, bool squares) {
    double* d = static_cast<double*>(scratch(sizeof(double)));
    k_sum<<<1, kThreads>>>(d, x, n, squares);
    MOELAB_LAUNCH("sum");
    double out = 0;
    MOELAB_CUDA(cudaMemcpy(&out, d, sizeof(double), cudaMemcpyDeviceToHost));
    return out;
  }
  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_) cudaFree(scratch_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      MOELAB_CUDA(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }
  RouteScratch route_scratch(const RouterShape& s) {
    const int64_t n = s.tokens(), e = s.experts, rows = std::max<int64_t>(s.max_rows(), std::max(n, s.batch));
    const int64_t m = std::max(n, e) + 1;
    const size_t bytes = sizeof(int64_t) * (m + e) + sizeof(int32_t) * 5 * rows + sizeof(float) * rows + 64;
    char* base = static_cast<char*>(scratch(bytes));
    RouteScratch r;
    r.count = reinterpret_cast<int64_t*>(base);
    r.load = r.count + m;
    int32_t* ints = reinterpret_cast<int32_t*>(r.load + e);
    r.by_token = ints;
    r.by_expert = ints + rows;
    r.tmp_token = ints + 2 * rows;
    r.tmp_expert = ints + 3 * rows;
    r.position = ints + 4 * rows;
    r.tmp_weight = reinterpret_cast<float*>(ints + 5 * rows);
    return r;
  }
  // The extent of a strided operand (outermost element + 1), for converting it to bf16 with its strides kept.
  static int64_t extent(int64_t rows, int64_t cols, int64_t ld, int64_t stride, int64_t batch) {
    return (batch - 1) * stride + (rows - 1) * ld + cols;
  }
  const void* as_bf16(const float* x, int64_t n, uint16_t*& buffer, size_t& capacity) {
    if (static_cast<size_t>(n) > capacity) {
      if (buffer) cudaFree(buffer);
      buffer = nullptr;
      capacity = 0;
      MOELAB_CUDA(cudaMalloc(&buffer, n * sizeof(uint16_t)));
      capacity = n;
    }
    k_to_bf16<<<blocks_for(n), kThreads>>>(buffer, x, n);
    MOELAB_LAUNCH("bf16 operand");
    return buffer;
  }
  void matmul(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              int64_t sa, const float* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc, int64_t sc,
              int64_t batch) {
    if (m <= 0 || n <= 0 || batch <= 0) return;
    if (k <= 0) {  // C = beta C (0 when beta = 0, as on the CPU)
      if (beta != 1.f) launch1(k_scale_blocks, batch * m * n, "gemm with K = 0", c, beta, batch, m, n, ldc, sc);
      return;
    }
    const bool bf16 = precision_ == Precision::BF16;
    const cudaDataType_t in_type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    // A (stored) is m x k (N) or k x m (T); B is k x n (N) or n x k (T); row-major.
    const int64_t a_rows = ta == Trans::N ? m : k, a_cols = ta == Trans::N ? k : m;
    const int64_t b_rows = tb == Trans::N ? k : n, b_cols = tb == Trans::N ? n : k;
    const void* pa = a;
    const void* pb = b;
    if (bf16) {
      pa = as_bf16(a, extent(a_rows, a_cols, lda, sa, batch), bf16_a_, bf16_a_capacity_);
      pb = as_bf16(b, extent(b_rows, b_cols, ldb, sb, batch), bf16_b_, bf16_b_capacity_);
    }
    // Column-major view: C^T (n x m) = op(B)^T (n x k) op(A)^T (k x m). Stored row-major X (r x c, ld) is column-major
    // X^T (c x r, ld).
    Descriptors d;
    check_lt(cublasLtMatmulDescCreate(&d.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    const cublasOperation_t op_first = tb == Trans::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    const cublasOperation_t op_second = ta == Trans::N ? CUBLAS_OP_N : CUBLAS_OP_T;
    check_lt(cublasLtMatmulDescSetAttribute(d.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof op_first), "TRANSA");
    check_lt(cublasLtMatmulDescSetAttribute(d.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof op_second),
             "TRANSB");
    check_lt(cublasLtMatrixLayoutCreate(&d.la, in_type, b_cols, b_rows, ldb), "layout B");
    check_lt(cublasLtMatrixLayoutCreate(&d.lb, in_type, a_cols, a_rows, lda), "layout A");
    check_lt(cublasLtMatrixLayoutCreate(&d.lc, CUDA_R_32F, n, m, ldc), "layout C");
    if (batch > 1) {
      const int32_t count = static_cast<int32_t>(batch);
      for (auto [layout, stride] : {std::pair{d.la, sb}, std::pair{d.lb, sa}, std::pair{d.lc, sc}}) {
        check_lt(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count),
                 "batch count");
        check_lt(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                  sizeof stride),
                 "batch stride");
      }
    }
    // The algorithm for these operands' alignment (offset slices of a buffer: attention heads, experts' rows), not
    // the 256-byte alignment the default preference assumes.
    const size_t elem_in = bf16 ? 2 : 4;
    const auto align = [&](const void* p, int64_t stride, size_t elem) {
      uint64_t a = reinterpret_cast<uintptr_t>(p) | 256;
      if (batch > 1) a |= static_cast<uint64_t>(stride) * elem;
      return static_cast<uint32_t>(a & (~a + 1));
    };
    const uint32_t align_a = align(pb, sb, elem_in), align_b = align(pa, sa, elem_in), align_c = align(c, sc, 4);
    check_lt(cublasLtMatmulPreferenceCreate(&d.pref), "PreferenceCreate");
    check_lt(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                                  sizeof workspace_bytes_),
             "workspace preference");
    for (auto [attr, value] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
                               std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}})
      check_lt(cublasLtMatmulPreferenceSetAttribute(d.pref, attr, &value, sizeof value), "alignment preference");
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    check_lt(cublasLtMatmulAlgoGetHeuristic(lt_, d.desc, d.la, d.lb, d.lc, d.lc, d.pref, 1, &heuristic, &found),
             "AlgoGetHeuristic");
    if (found == 0)
      throw Error("cuBLASLt has no algorithm for a " + std::to_string(m) + " x " + std::to_string(n) + " x " +
                  std::to_string(k) + " product with these strides and alignments");
    check_lt(cublasLtMatmul(lt_, d.desc, &alpha, pb, d.la, pa, d.lb, &beta, c, d.lc, c, d.lc, &heuristic.algo,
                            workspace_, workspace_bytes_, 0),
             "cublasLtMatmul");
  }
  // cuBLASLt descriptors of one product, destroyed however the product ends.
  struct Descriptors {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    ~Descriptors() {
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      for (auto l : {la, lb, lc})
        if (l) cublasLtMatrixLayoutDestroy(l);
      if (desc) cublasLtMatmulDescDestroy(desc);
    }
  };

  Precision precision_ = Precision::FP32;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  uint16_t* bf16_a_ = nullptr;  // bf16 bits
  uint16_t* bf16_b_ = nullptr;
  size_t bf16_a_capacity_ = 0, bf16_b_capacity_ = 0;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  std::map<void*, size_t> sizes_;  // live allocations, for peak_allocated_bytes
  size_t live_bytes_ = 0, peak_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int threads) { return std::make_unique<CudaBackend>(); }

}  // namespace moelab
