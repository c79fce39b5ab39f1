#pragma once
// The backend seam. Layers (src/layers) compose these primitives and never touch memory or threads directly;
// a CUDA backend implements the same interface on device pointers and the layers run unchanged.
//
// Conventions: all matrices are row-major; `ld*` are row strides in elements. "accumulate" kernels add into
// their output (gradients accumulate across micro-batches and across branches of the residual stream).
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/precision.h"

namespace moelab {

enum class Trans { N, T };

// One problem of a grouped GEMM: C_g (M_g x N) = alpha * op(A_g) op(B_g) + beta * C_g.
// Groups share N, K and the transposes, and differ in M (e.g. tokens routed to each expert) and pointers.
struct GemmGroup {
  int64_t m = 0;
  const float* a = nullptr;
  const float* b = nullptr;
  float* c = nullptr;
};

// One independent product of a batch: C = alpha * op(A) op(B) + beta * C, shapes and strides as in Backend::gemm.
struct GemmProblem {
  Trans ta = Trans::N, tb = Trans::N;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.f;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float beta = 0.f;
  float* c = nullptr;
  int64_t ldc = 0;
  // When set, receives the sum of squares of C (M x N) as the product leaves it, in double, summed in an order
  // that depends on the shape alone: a weight gradient's share of the gradient norm, taken while C is in cache
  // instead of in a later pass over memory.
  double* c_sum_squares = nullptr;
};

// ---- MoE routing: the shapes and the state the routing kernels work on ----------------------------------------
// One MoE layer's routing problem over N = batch * seq tokens and E experts.
struct RouterShape {
  int64_t batch = 0, seq = 0;
  int64_t experts = 0;        // E
  int64_t top_k = 0;          // K: experts per token (token choice)
  bool expert_choice = false;
  // Token choice: rows each expert takes (0 = unlimited, dropless). Expert choice: tokens each expert takes from
  // each position group (the batch's tokens at one position).
  int64_t capacity = 0;
  bool renormalize = false;   // token choice: the k gate weights renormalised to sum to 1
  // Sigmoid scores (DeepSeek-V3) instead of a softmax: scores s = sigmoid(logits), and the token-choice gate weights
  // are the chosen scores normalised to sum 1 whatever `renormalize` says.
  bool sigmoid = false;
  float gate_scale = 1.f;     // multiplies every gate weight
  int64_t tokens() const { return batch * seq; }
  // Upper bound on dispatched rows R, for sizing buffers once.
  int64_t max_rows() const { return expert_choice ? experts * capacity * seq : tokens() * top_k; }
};

// The routing decisions of one layer's forward, in backend memory (moe/moe.h's Routing owns the buffers).
// Rows are (token, expert) pairs sorted by expert, then token.
struct RoutingState {
  int32_t* row_token = nullptr;        // (R)
  int32_t* row_expert = nullptr;       // (R)
  float* row_weight = nullptr;         // (R) gate weight applied to the expert output
  int64_t* expert_offsets = nullptr;   // (E + 1) rows of expert e are [offsets[e], offsets[e+1]); R = offsets[E]
  int64_t* token_offsets = nullptr;    // (N + 1) into token_rows
  int32_t* token_rows = nullptr;       // (R) each token's rows, in expert order
  // Token choice only: the k experts each token selected, with their probabilities and rows (-1 = dropped).
  int32_t* topk_expert = nullptr;      // (N, K)
  float* topk_prob = nullptr;          // (N, K)
  int32_t* topk_row = nullptr;         // (N, K)
  float* lse = nullptr;                // (N) logsumexp of the logits, for the z-loss
  double* assigned_fraction = nullptr; // (E) f_e: share of top-k choices (before dropping) going to expert e
  // (E) P_e: the mean over tokens of the router probabilities p (the softmax, or the sigmoid scores normalised to
  // sum 1 per token), which the balancing losses use.
  double* mean_prob = nullptr;
  double* seq_fraction = nullptr;      // (B, E) token choice: f_e within each sequence (the sequence-level loss)
  // Input, may be null: (E) a bias added to the scores for the top-k choice only, never to the gate weights
  // (auxiliary-loss-free balancing; token choice).
  const float* selection_bias = nullptr;
};

// The weights of the router's auxiliary losses in Backend::router_backward, each already times the loss scale.
struct RouterLossScales {
  float aux = 0;      // d/dp of aux * E sum_e f_e P_e (token choice)
  float seq_aux = 0;  // of the sequence-level loss: mean over sequences of E sum_e f_be P_be
  float z = 0;        // of the z-loss mean_i lse_i^2: scale * weight * 2 / N (the kernel multiplies by lse_i)
};

// What Backend::router_statistics writes (doubles, in this order).
enum RouterStatistic : int {
  kRouterEntropy = 0,  // mean over tokens of -sum_e p log p (nats)
  kRouterZLoss = 1,    // mean logsumexp(logits)^2
  kRouterAuxLoss = 2,  // E * sum_e f_e P_e (token choice; 1 when perfectly balanced), else 0
  kRouterSeqAuxLoss = 3,  // mean over sequences of E * sum_e f_be P_be (token choice), else 0
  kRouterStatistics = 4
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory -------------------------------------------------------------------------------------------
  // Backend memory belongs to the backend (device memory on a GPU). Code outside src/backend/ holds these pointers
  // as handles: it may offset them and pass them back to backend calls, but never dereferences them; data crosses
  // the seam by upload (host -> backend) and download (backend -> host) only. The `cpu-strict` backend makes its
  // memory unreadable from the host between calls, so any host access crashes.
  virtual void* alloc_bytes(size_t bytes) = 0;  // zero-initialised, 64-byte aligned
  virtual void free(void* ptr) = 0;             // null: nothing
  virtual void upload_bytes(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download_bytes(void* host_dst, const void* src, size_t bytes) = 0;
  // The most backend memory that was allocated at once (alloc_bytes, as requested), since construction: the model's
  // parameters, gradients, optimizer state and activations. 0 for a backend that does not count.
  virtual size_t peak_allocated_bytes() const { return 0; }
  virtual void fill(float* x, float value, int64_t n) = 0;
  virtual void copy(float* dst, const float* src, int64_t n) = 0;  // backend -> backend
  // Typed conveniences over the above.
  float* alloc(size_t count) { return static_cast<float*>(alloc_bytes(count * sizeof(float))); }
  template <class T>
  T* alloc_array(size_t count) {
    return static_cast<T*>(alloc_bytes(count * sizeof(T)));
  }
  template <class T>
  void upload(T* dst, const T* host_src, int64_t count) {
    if (count > 0) upload_bytes(dst, host_src, static_cast<size_t>(count) * sizeof(T));
  }
  template <class T>
  void download(T* host_dst, const T* src, int64_t count) {
    if (count > 0) download_bytes(host_dst, src, static_cast<size_t>(count) * sizeof(T));
  }
  template <class T>
  std::vector<T> download_vector(const T* src, int64_t count) {
    std::vector<T> host(static_cast<size_t>(count));
    download(host.data(), src, count);
    return host;
  }

  // ---- what a buffer is for --------------------------------------------------------------------------------
  // Matrix products read their operands at the matmul precision. A backend that converts operands before it
  // multiplies (bf16 on the CPU) keeps the converted copies it makes and reuses them until the memory is written
  // again: it sees every write (its kernels, upload, copy, free), so a copy is always of the current values and no
  // caller announces writes or reuse. A buffer's owner may also say, once for the buffer's lifetime, what reads the
  // buffer; a backend may use that to convert values as its kernels write them, while they are in cache, instead
  // of in a pass of its own before the first product. Never changes a result while the statement holds.
  enum class BufferUse {
    // Read by matrix products, usually more than once between writes (weights, a layer input saved for the
    // backward's weight gradient).
    MatmulOperand,
    // Moreover, what a kernel other than a matrix product writes here is read only as an operand of matrix
    // products, at the precision in force when it was written, until the next write: by no other kernel, and not
    // downloaded. A backend may then store such values only in the form its products read (the CPU backend under
    // bf16 keeps just the bf16 copy: half the memory traffic for activations that only feed products).
    MatmulOperandOnly,
  };
  // For [data, data + count) until it is freed (a later declaration of the same range replaces it; ranges of
  // different declarations do not overlap).
  virtual void declare_use(const float* data, int64_t count, BufferUse use) {}

  // ---- matrix products ------------------------------------------------------------------------------------
  // Every product below runs at the backend's matmul precision (backend/precision.h): operands and results are
  // always fp32 in memory; under BF16 the operands are rounded to bfloat16 and accumulated in fp32. Layers that
  // must stay fp32 whatever the setting (the MoE router) say so with a MatmulPrecisionScope.
  virtual void set_matmul_precision(Precision precision) = 0;
  virtual Precision matmul_precision() const = 0;
  // C (M x N) = alpha * op(A) op(B) + beta * C; op(A) is M x K, op(B) is K x N.
  virtual void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) = 0;
  // `batch` independent gemms of the same shape, operands `stride_*` elements apart.
  virtual void gemm_strided_batched(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                                    const float* a, int64_t lda, int64_t stride_a, const float* b, int64_t ldb,
                                    int64_t stride_b, float beta, float* c, int64_t ldc, int64_t stride_c,
                                    int64_t batch) = 0;
  // A strided batch of strided batches: for o < outer, the batch above with every operand offset by
  // o * outer_stride_* (sequences x heads in attention), so the backend can spread all outer * batch products
  // over its threads in one call.
  virtual void gemm_strided_batched2(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                                     const float* a, int64_t lda, int64_t stride_a, int64_t outer_stride_a,
                                     const float* b, int64_t ldb, int64_t stride_b, int64_t outer_stride_b,
                                     float beta, float* c, int64_t ldc, int64_t stride_c, int64_t outer_stride_c,
                                     int64_t batch, int64_t outer) = 0;
  // Independent products with disjoint outputs, of any shapes (the MoE experts' forward and backward products):
  // the backend may run them concurrently. Each result is the same as from gemm() on its own.
  virtual void gemm_batch(const GemmProblem* problems, int64_t count) = 0;
  virtual void grouped_gemm(Trans ta, Trans tb, int64_t n, int64_t k, float alpha, const GemmGroup* groups,
                            int64_t group_count, int64_t lda, int64_t ldb, float beta, int64_t ldc) = 0;
  // ---- elementwise ----------------------------------------------------------------------------------------
  virtual void add(float* out, const float* a, const float* b, int64_t n) = 0;          // out = a + b
  virtual void add_inplace(float* x, const float* y, int64_t n) = 0;                    // x += y
  virtual void add_bias(float* x, const float* bias, int64_t rows, int64_t cols) = 0;  // x[r, :] += bias
  virtual void gelu_forward(float* out, const float* in, int64_t n) = 0;                // exact (erf) GELU
  virtual void gelu_backward(float* din, const float* in, const float* dout, int64_t n) = 0;
  // SwiGLU on (rows, 2F) input [gate | up] -> (rows, F) output silu(gate) * up.
  virtual void swiglu_forward(float* out, const float* in, int64_t rows, int64_t f) = 0;
  virtual void swiglu_backward(float* din, const float* in, const float* dout, int64_t rows, int64_t f) = 0;
  // Rotary embedding (rotate-half) applied in place to the first `n_rot_heads` heads of each row: x is
  // (B, T, row_stride), head h occupies [h*hd, (h+1)*hd), and row t sits at position first_position + t.
  // `inverse` rotates by -angle (the backward).
  virtual void rope(float* x, int64_t batch, int64_t seq, int64_t row_stride, int64_t n_rot_heads, int64_t head_dim,
                    float theta, bool inverse, int64_t first_position) = 0;
  // In-place softmax of each row of x (rows, cols) after multiplying by scale.
  virtual void softmax_rows(float* x, int64_t rows, int64_t cols, float scale) = 0;
  // out[b, t, :] = table[tokens[b, t], :] (+ pos[t, :] when pos != nullptr)
  virtual void embedding_forward(float* out, const int32_t* tokens, const float* table, const float* pos,
                                 int64_t batch, int64_t seq, int64_t dim) = 0;
  // dtable[tokens[b,t], :] += dout[b, t, :]; dpos[t, :] += sum_b dout[b, t, :] when dpos != nullptr.
  virtual void embedding_backward(float* dtable, float* dpos, const int32_t* tokens, const float* dout,
                                  int64_t batch, int64_t seq, int64_t dim, int64_t vocab) = 0;

  // ---- MoE dispatch / combine (index arrays live where the backend's memory lives) -------------------------
  // dst[r, :] = scale[r] * src[index[r], :]  (scale may be null: 1)
  virtual void gather_rows(float* dst, const float* src, const int32_t* index, const float* scale, int64_t rows,
                           int64_t cols) = 0;
  // out[n, :] += sum over j in [offsets[n], offsets[n+1]) of weight[rows[j]] * src[rows[j], :]  (weight may be
  // null: 1). Each output row is summed in a fixed order by one thread: deterministic, no atomics.
  virtual void combine_rows(float* out, const float* src, const int64_t* offsets, const int32_t* rows,
                            const float* weight, int64_t n, int64_t cols) = 0;
  // out[r] = dot(a[index[r], :], b[r, :])
  virtual void row_dots(float* out, const float* a, const int32_t* index, const float* b, int64_t rows,
                        int64_t cols) = 0;
  // The backward of a weighted combine out[index[r], :] += weight[r] * src[r, :], in one pass over the rows:
  // dsrc[r, :] = weight[r] * dout[index[r], :] (gather_rows) and dweight[r] = dot(dout[index[r], :], src[r, :])
  // (row_dots), each the same as from those two kernels.
  virtual void combine_rows_backward(float* dsrc, float* dweight, const float* dout, const int32_t* index,
                                     const float* weight, const float* src, int64_t rows, int64_t cols) {
    row_dots(dweight, dout, index, src, rows, cols);
    gather_rows(dsrc, dout, index, weight, rows, cols);
  }

  // ---- MoE routing (backend/cpu/routing.cpp on the CPU) -------------------------------------------------------
  // probs (N, E) = the scores: softmax(logits) (fp32 with a double accumulator), or sigmoid(logits) (shape.sigmoid);
  // lse = logsumexp(logits) either way; then the routing decision. Token choice: each token's top k by score plus
  // the selection bias when given (highest first, the lower expert index first among equals), capacity applied in
  // (choice rank, token) order so first choices win over second choices (GShard), gate weights the selected scores
  // (renormalised over the k selected when asked or with sigmoid scores, dropped ones included) times gate_scale;
  // the choice fractions f_e, per sequence too, and the mean probabilities P_e. Expert choice: expert e takes,
  // among the B tokens of each position, the `capacity` with the highest score (causal), weight score * gate_scale.
  // Then the dispatch order (counting sorts by expert, then token: deterministic), expert and token offsets.
  virtual void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state) = 0;
  // out (kRouterStatistics doubles, backend memory): entropy, z-loss and the auxiliary losses of the last route().
  virtual void router_statistics(const RouterShape& shape, const float* logits, const float* probs,
                                 const RoutingState& state, double* out) = 0;
  // dlogits (N, E) = the router's gradient: from the gate weights' gradient dweight (R) through the gate scale, the
  // selection (and the renormalisation) and the scores (softmax or sigmoid), plus the auxiliary losses' through
  // P_e (scales.aux, scales.seq_aux: token choice) and the z-loss's, scales.z * lse * softmax(logits). Overwrites
  // dlogits.
  virtual void router_backward(const RouterShape& shape, float* dlogits, const float* logits, const float* probs,
                               const float* dweight, const RoutingState& state, const RouterLossScales& scales) = 0;
  // out = in * (1 + eps * (2 u - 1)) elementwise, u in [0, 1) a hash of (seed, index): the same noise on every
  // backend, so a backward can apply it again (router jitter; out may be in).
  virtual void jitter(float* out, const float* in, int64_t n, uint64_t seed, float eps) = 0;

  // ---- reductions -----------------------------------------------------------------------------------------
  // dbias[c] += sum_r dout[r, c]
  virtual void bias_backward(float* dbias, const float* dout, int64_t rows, int64_t cols) = 0;
  // LayerNorm / RMSNorm over the last dim; saves per-row mean (LayerNorm only) and 1/std for the backward.
  // bias may be null. Backward accumulates into din, dweight, dbias (dbias may be null).
  virtual void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                                 const float* bias, int64_t rows, int64_t cols, float eps) = 0;
  virtual void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                                  const float* weight, const float* mean, const float* rstd, int64_t rows,
                                  int64_t cols) = 0;
  virtual void rmsnorm_forward(float* out, float* rstd, const float* in, const float* weight, int64_t rows,
                               int64_t cols, float eps) = 0;
  virtual void rmsnorm_backward(float* din, float* dweight, const float* dout, const float* in, const float* weight,
                                const float* rstd, int64_t rows, int64_t cols) = 0;
  // Per-head RMSNorm in place (QK-norm): x holds `rows` rows `row_stride` apart, each starting with `heads` vectors
  // of head_dim; every vector v becomes v * rsqrt(mean(v^2) + eps) * weight (head_dim, shared by the heads). saved
  // (rows, heads * head_dim) receives the input and rstd (rows * heads) the reciprocal norms, for the backward.
  virtual void head_rmsnorm_forward(float* x, float* saved, float* rstd, const float* weight, int64_t rows,
                                    int64_t row_stride, int64_t heads, int64_t head_dim, float eps) = 0;
  // dx, laid out like x, holds the output's gradient and receives the input's (in place); dweight += the weight's.
  virtual void head_rmsnorm_backward(float* dx, float* dweight, const float* saved, const float* weight,
                                     const float* rstd, int64_t rows, int64_t row_stride, int64_t heads,
                                     int64_t head_dim) = 0;
  // Scaled causal softmax over `count` (T x T) score matrices, in place: row t keeps columns <= t, zeros the rest.
  virtual void causal_softmax_forward(float* scores, float scale, int64_t count, int64_t seq) = 0;
  // dscores = scale * P * (dP - rowsum(dP * P)), written over dprobs.
  virtual void causal_softmax_backward(float* dprobs, const float* probs, float scale, int64_t count,
                                       int64_t seq) = 0;
  // Fused softmax + cross-entropy over (rows, vocab) logits. losses[r] = -log softmax(logits[r])[targets[r]]
  // (0 where targets[r] < 0, which marks an ignored position). When grad_scale != 0 the logits are overwritten
  // in place by grad_scale * (softmax - onehot), so the probabilities are never stored a second time.
  virtual void softmax_cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t rows,
                                     int64_t vocab, float grad_scale) = 0;
  // sum of x and sum of x^2 in double, deterministic for a fixed thread count.
  virtual double sum(const float* x, int64_t n) = 0;
  virtual double sum_squares(const float* x, int64_t n) = 0;
  // AdamW (decoupled weight decay) on one contiguous parameter block, torch.optim.AdamW semantics. With zero_grad
  // the gradient is set to 0 as it is read, so the next step accumulates into zeros without a pass of its own.
  virtual void adamw_update(float* param, float* grad, float* m, float* v, int64_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float grad_scale, int64_t step,
                            bool zero_grad) = 0;
  virtual void scale(float* x, float alpha, int64_t n) = 0;

  // Threads used by this backend's kernels (CPU) or ignored (GPU).
  virtual void set_threads(int threads) = 0;
  virtual int threads() const = 0;
  // Waits until every operation issued so far has finished: a GPU queues its kernels, so timing needs this; the
  // CPU backends run each call to completion and do nothing here. (Downloads wait by themselves.)
  virtual void synchronize() {}
};

// Sets a backend's matmul precision for the lifetime of the scope, then restores the previous one.
class MatmulPrecisionScope {
 public:
  MatmulPrecisionScope(Backend& backend, Precision precision)
      : backend_(backend), saved_(backend.matmul_precision()) {
    backend_.set_matmul_precision(precision);
  }
  ~MatmulPrecisionScope() { backend_.set_matmul_precision(saved_); }
  MatmulPrecisionScope(const MatmulPrecisionScope&) = delete;
  MatmulPrecisionScope& operator=(const MatmulPrecisionScope&) = delete;

 private:
  Backend& backend_;
  Precision saved_;
};

// A backend by name (config key train.backend): "cpu" (OpenMP threads, oneDNN GEMM) or "cpu-strict" (the CPU
// backend with its memory made inaccessible to the host outside backend calls, for tests). An unknown name is an
// Error listing the names this build has. threads: 0 means all cores (CPU backends).
std::unique_ptr<Backend> make_backend(const std::string& name, int threads);
std::vector<std::string> backend_names();

// An owning backend allocation of `count` T (zeroed), freed with the owner.
template <class T>
class BackendArray {
 public:
  BackendArray() = default;
  BackendArray(Backend& backend, int64_t count)
      : backend_(&backend), data_(backend.alloc_array<T>(static_cast<size_t>(std::max<int64_t>(count, 1)))),
        count_(count) {}
  ~BackendArray() { reset(); }
  BackendArray(BackendArray&& o) noexcept : backend_(o.backend_), data_(o.data_), count_(o.count_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  BackendArray& operator=(BackendArray&& o) noexcept {
    if (this != &o) {
      reset();
      backend_ = o.backend_, data_ = o.data_, count_ = o.count_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  T* data() const { return data_; }
  int64_t size() const { return count_; }
  void reset() {
    if (data_) backend_->free(data_);
    data_ = nullptr;
  }

 private:
  Backend* backend_ = nullptr;
  T* data_ = nullptr;
  int64_t count_ = 0;
};

}  // namespace moelab
