// cpu-strict: the CPU backend with its memory kept out of the host's reach, so a host access to backend memory (a
// dereference outside a backend call) crashes instead of silently working as it does on the CPU backend, and a
// kernel handed host memory where backend memory belongs fails with a message. It proves that the code above the
// seam treats backend memory as a GPU backend would have it treated: opaque handles, data crossing by upload and
// download only.
//
// How: all of this backend's memory lies in one reserved address range, mapped PROT_NONE between calls. Every call
// maps the used part readable and writable, checks that the pointers it was given lie in that range, runs the
// wrapped CPU backend, and maps the range PROT_NONE again. Results are the CPU backend's, bit for bit.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace moelab {
namespace {

class StrictBackend final : public Backend {
 public:
  explicit StrictBackend(int threads) : inner_(make_cpu_backend(threads)) {
    base_ = static_cast<char*>(
        mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base_ == MAP_FAILED) throw Error("cpu-strict: cannot reserve address space for backend memory");
    top_ = base_;
  }
  ~StrictBackend() override { munmap(base_, kReserve); }

  std::string name() const override { return "cpu-strict"; }

  // ---- memory ---------------------------------------------------------------------------------------------
  void* alloc_bytes(size_t bytes) override {
    const size_t size = (std::max<size_t>(bytes, 1) + kPage - 1) / kPage * kPage;
    char* p = nullptr;
    bool reused = false;
    auto it = free_.lower_bound(size);  // best fit among freed blocks
    if (it != free_.end()) {
      p = it->second;
      reused = true;
      sizes_[p] = it->first;
      free_.erase(it);
    } else {
      if (static_cast<size_t>(top_ - base_) + size > kReserve)
        throw Error("cpu-strict: out of reserved backend memory (" + std::to_string(kReserve >> 30) + " GiB)");
      p = top_;
      top_ += size;
      sizes_[p] = size;
    }
    if (reused) {  // fresh pages are zero already
      const Open open(*this);
      std::memset(p, 0, sizes_[p]);
    }
    inner_->adopted(p, sizes_[p]);
    live_bytes_ += sizes_[p];
    peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    return p;
  }
  void free(void* ptr) override {
    if (!ptr) return;
    auto it = sizes_.find(static_cast<char*>(ptr));
    MOELAB_CHECK(it != sizes_.end(), "cpu-strict: free of a pointer this backend did not allocate");
    inner_->released(ptr, it->second);
    live_bytes_ -= it->second;
    free_.emplace(it->second, it->first);
    sizes_.erase(it);
  }
  void upload_bytes(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return;
    const Open open(*this);
    own(dst, bytes, "upload destination");
    MOELAB_CHECK(!inside(host_src), "cpu-strict: upload from backend memory (use copy)");
    inner_->upload_bytes(dst, host_src, bytes);
  }
  void download_bytes(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    const Open open(*this);
    own(src, bytes, "download source");
    MOELAB_CHECK(!inside(host_dst), "cpu-strict: download into backend memory (use copy)");
    inner_->download_bytes(host_dst, src, bytes);
  }
  void fill(float* x, float value, int64_t n) override {
    const Open open(*this);
    own(x, n, "fill");
    inner_->fill(x, value, n);
  }
  void copy(float* dst, const float* src, int64_t n) override {
    const Open open(*this);
    own(dst, n, "copy destination");
    own(src, n, "copy source");
    inner_->copy(dst, src, n);
  }

  // ---- products ---------------------------------------------------------------------------------------------
  void set_matmul_precision(Precision precision) override { inner_->set_matmul_precision(precision); }
  Precision matmul_precision() const override { return inner_->matmul_precision(); }
  void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override {
    const Open open(*this);
    own(a, "gemm A"), own(b, "gemm B"), own(c, "gemm C");
    inner_->gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  void gemm_strided_batched(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                            int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                            float* c, int64_t ldc, int64_t stride_c, int64_t batch) override {
    const Open open(*this);
    own(a, "gemm A"), own(b, "gemm B"), own(c, "gemm C");
    inner_->gemm_strided_batched(ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c,
                                 batch);
  }
  void gemm_strided_batched2(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                             int64_t lda, int64_t stride_a, int64_t outer_stride_a, const float* b, int64_t ldb,
                             int64_t stride_b, int64_t outer_stride_b, float beta, float* c, int64_t ldc,
                             int64_t stride_c, int64_t outer_stride_c, int64_t batch, int64_t outer) override {
    const Open open(*this);
    own(a, "gemm A"), own(b, "gemm B"), own(c, "gemm C");
    inner_->gemm_strided_batched2(ta, tb, m, n, k, alpha, a, lda, stride_a, outer_stride_a, b, ldb, stride_b,
                                  outer_stride_b, beta, c, ldc, stride_c, outer_stride_c, batch, outer);
  }
  void gemm_batch(const GemmProblem* problems, int64_t count) override {
    const Open open(*this);
    for (int64_t i = 0; i < count; ++i) {
      own(problems[i].a, "gemm_batch A"), own(problems[i].b, "gemm_batch B"), own(problems[i].c, "gemm_batch C");
      own(problems[i].c_sum_squares, "gemm_batch sum of squares");
    }
    inner_->gemm_batch(problems, count);
  }
  void grouped_gemm(Trans ta, Trans tb, int64_t n, int64_t k, float alpha, const GemmGroup* groups,
                    int64_t group_count, int64_t lda, int64_t ldb, float beta, int64_t ldc) override {
    const Open open(*this);
    for (int64_t g = 0; g < group_count; ++g)
      own(groups[g].a, "grouped_gemm A"), own(groups[g].b, "grouped_gemm B"), own(groups[g].c, "grouped_gemm C");
    inner_->grouped_gemm(ta, tb, n, k, alpha, groups, group_count, lda, ldb, beta, ldc);
  }
  void declare_use(const float* data, int64_t count, BufferUse use) override {
    own(data, count, "declare_use");
    inner_->declare_use(data, count, use);
  }

  // ---- elementwise --------------------------------------------------------------------------------------------
  void add(float* out, const float* a, const float* b, int64_t n) override {
    const Open open(*this);
    own(out, "add"), own(a, "add"), own(b, "add");
    inner_->add(out, a, b, n);
  }
  void add_inplace(float* x, const float* y, int64_t n) override {
    const Open open(*this);
    own(x, "add_inplace"), own(y, "add_inplace");
    inner_->add_inplace(x, y, n);
  }
  void add_bias(float* x, const float* bias, int64_t rows, int64_t cols) override {
    const Open open(*this);
    own(x, "add_bias"), own(bias, "add_bias");
    inner_->add_bias(x, bias, rows, cols);
  }
  void gelu_forward(float* out, const float* in, int64_t n) override {
    const Open open(*this);
    own(out, "gelu"), own(in, "gelu");
    inner_->gelu_forward(out, in, n);
  }
  void gelu_backward(float* din, const float* in, const float* dout, int64_t n) override {
    const Open open(*this);
    own(din, "gelu_backward"), own(in, "gelu_backward"), own(dout, "gelu_backward");
    inner_->gelu_backward(din, in, dout, n);
  }
  void swiglu_forward(float* out, const float* in, int64_t rows, int64_t f) override {
    const Open open(*this);
    own(out, "swiglu"), own(in, "swiglu");
    inner_->swiglu_forward(out, in, rows, f);
  }
  void swiglu_backward(float* din, const float* in, const float* dout, int64_t rows, int64_t f) override {
    const Open open(*this);
    own(din, "swiglu_backward"), own(in, "swiglu_backward"), own(dout, "swiglu_backward");
    inner_->swiglu_backward(din, in, dout, rows, f);
  }
  void rope(float* x, int64_t batch, int64_t seq, int64_t row_stride, int64_t n_rot_heads, int64_t head_dim,
            float theta, bool inverse, int64_t first_position) override {
    const Open open(*this);
    own(x, "rope");
    inner_->rope(x, batch, seq, row_stride, n_rot_heads, head_dim, theta, inverse, first_position);
  }
  void softmax_rows(float* x, int64_t rows, int64_t cols, float scale) override {
    const Open open(*this);
    own(x, "softmax_rows");
    inner_->softmax_rows(x, rows, cols, scale);
  }
  void embedding_forward(float* out, const int32_t* tokens, const float* table, const float* pos, int64_t batch,
                         int64_t seq, int64_t dim) override {
    const Open open(*this);
    own(out, "embedding out"), own(tokens, "embedding tokens"), own(table, "embedding table"), own(pos, "pos");
    inner_->embedding_forward(out, tokens, table, pos, batch, seq, dim);
  }
  void embedding_backward(float* dtable, float* dpos, const int32_t* tokens, const float* dout, int64_t batch,
                          int64_t seq, int64_t dim, int64_t vocab) override {
    const Open open(*this);
    own(dtable, "embedding dtable"), own(dpos, "embedding dpos"), own(tokens, "embedding tokens");
    own(dout, "embedding dout");
    inner_->embedding_backward(dtable, dpos, tokens, dout, batch, seq, dim, vocab);
  }

  // ---- dispatch / combine ---------------------------------------------------------------------------------------
  void gather_rows(float* dst, const float* src, const int32_t* index, const float* scale, int64_t rows,
                   int64_t cols) override {
    const Open open(*this);
    own(dst, "gather_rows"), own(src, "gather_rows"), own(index, "gather_rows index"), own(scale, "gather scale");
    inner_->gather_rows(dst, src, index, scale, rows, cols);
  }
  void combine_rows(float* out, const float* src, const int64_t* offsets, const int32_t* rows, const float* weight,
                    int64_t n, int64_t cols) override {
    const Open open(*this);
    own(out, "combine_rows"), own(src, "combine_rows"), own(offsets, "combine_rows offsets");
    own(rows, "combine_rows rows"), own(weight, "combine_rows weight");
    inner_->combine_rows(out, src, offsets, rows, weight, n, cols);
  }
  void row_dots(float* out, const float* a, const int32_t* index, const float* b, int64_t rows,
                int64_t cols) override {
    const Open open(*this);
    own(out, "row_dots"), own(a, "row_dots"), own(index, "row_dots index"), own(b, "row_dots");
    inner_->row_dots(out, a, index, b, rows, cols);
  }
  void combine_rows_backward(float* dsrc, float* dweight, const float* dout, const int32_t* index,
                             const float* weight, const float* src, int64_t rows, int64_t cols) override {
    const Open open(*this);
    own(dsrc, "combine_rows_backward"), own(dweight, "combine_rows_backward"), own(dout, "combine_rows_backward");
    own(index, "combine_rows_backward index"), own(weight, "combine_rows_backward weight");
    own(src, "combine_rows_backward src");
    inner_->combine_rows_backward(dsrc, dweight, dout, index, weight, src, rows, cols);
  }

  // ---- MoE routing ----------------------------------------------------------------------------------------------
  void own(const RoutingState& r, const char* what) const {
    for (const void* p : {static_cast<const void*>(r.row_token), static_cast<const void*>(r.row_expert),
                          static_cast<const void*>(r.row_weight), static_cast<const void*>(r.expert_offsets),
                          static_cast<const void*>(r.token_offsets), static_cast<const void*>(r.token_rows),
                          static_cast<const void*>(r.topk_expert), static_cast<const void*>(r.topk_prob),
                          static_cast<const void*>(r.topk_row), static_cast<const void*>(r.lse),
                          static_cast<const void*>(r.assigned_fraction), static_cast<const void*>(r.mean_prob),
                          static_cast<const void*>(r.seq_fraction), static_cast<const void*>(r.selection_bias)})
      own(p, what);
  }
  void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state) override {
    const Open open(*this);
    own(logits, "route logits"), own(probs, "route probs"), own(state, "routing state");
    inner_->route(shape, logits, probs, state);
  }
  void router_statistics(const RouterShape& shape, const float* logits, const float* probs,
                         const RoutingState& state, double* out) override {
    const Open open(*this);
    own(logits, "router_statistics"), own(probs, "router_statistics"), own(state, "routing state");
    own(out, "router_statistics out");
    inner_->router_statistics(shape, logits, probs, state, out);
  }
  void router_backward(const RouterShape& shape, float* dlogits, const float* logits, const float* probs,
                       const float* dweight, const RoutingState& state, const RouterLossScales& scales) override {
    const Open open(*this);
    own(dlogits, "router_backward"), own(logits, "router_backward"), own(probs, "router_backward");
    own(dweight, "router_backward"), own(state, "routing state");
    inner_->router_backward(shape, dlogits, logits, probs, dweight, state, scales);
  }
  void jitter(float* out, const float* in, int64_t n, uint64_t seed, float eps) override {
    const Open open(*this);
    own(out, n, "jitter"), own(in, n, "jitter");
    inner_->jitter(out, in, n, seed, eps);
  }

  // ---- reductions -------------------------------------------------------------------------------------------------
  void bias_backward(float* dbias, const float* dout, int64_t rows, int64_t cols) override {
    const Open open(*this);
    own(dbias, "bias_backward"), own(dout, "bias_backward");
    inner_->bias_backward(dbias, dout, rows, cols);
  }
  void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                         const float* bias, int64_t rows, int64_t cols, float eps) override {
    const Open open(*this);
    own(out, "layernorm"), own(mean, "layernorm"), own(rstd, "layernorm"), own(in, "layernorm");
    own(weight, "layernorm"), own(bias, "layernorm");
    inner_->layernorm_forward(out, mean, rstd, in, weight, bias, rows, cols, eps);
  }
  void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                          const float* weight, const float* mean, const float* rstd, int64_t rows,
                          int64_t cols) override {
    const Open open(*this);
    own(din, "layernorm_backward"), own(dweight, "layernorm_backward"), own(dbias, "layernorm_backward");
    own(dout, "layernorm_backward"), own(in, "layernorm_backward"), own(weight, "layernorm_backward");
    own(mean, "layernorm_backward"), own(rstd, "layernorm_backward");
    inner_->layernorm_backward(din, dweight, dbias, dout, in, weight, mean, rstd, rows, cols);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* in, const float* weight, int64_t rows, int64_t cols,
                       float eps) override {
    const Open open(*this);
    own(out, "rmsnorm"), own(rstd, "rmsnorm"), own(in, "rmsnorm"), own(weight, "rmsnorm");
    inner_->rmsnorm_forward(out, rstd, in, weight, rows, cols, eps);
  }
  void rmsnorm_backward(float* din, float* dweight, const float* dout, const float* in, const float* weight,
                        const float* rstd, int64_t rows, int64_t cols) override {
    const Open open(*this);
    own(din, "rmsnorm_backward"), own(dweight, "rmsnorm_backward"), own(dout, "rmsnorm_backward");
    own(in, "rmsnorm_backward"), own(weight, "rmsnorm_backward"), own(rstd, "rmsnorm_backward");
    inner_->rmsnorm_backward(din, dweight, dout, in, weight, rstd, rows, cols);
  }
  void head_rmsnorm_forward(float* x, float* saved, float* rstd, const float* weight, int64_t rows,
                            int64_t row_stride, int64_t heads, int64_t head_dim, float eps) override {
    const Open open(*this);
    own(x, (rows - 1) * row_stride + heads * head_dim, "head_rmsnorm"), own(saved, rows * heads * head_dim, "head_rmsnorm");
    own(rstd, rows * heads, "head_rmsnorm"), own(weight, head_dim, "head_rmsnorm");
    inner_->head_rmsnorm_forward(x, saved, rstd, weight, rows, row_stride, heads, head_dim, eps);
  }
  void head_rmsnorm_backward(float* dx, float* dweight, const float* saved, const float* weight, const float* rstd,
                             int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim) override {
    const Open open(*this);
    own(dx, (rows - 1) * row_stride + heads * head_dim, "head_rmsnorm_backward");
    own(dweight, head_dim, "head_rmsnorm_backward"), own(saved, rows * heads * head_dim, "head_rmsnorm_backward");
    own(weight, head_dim, "head_rmsnorm_backward"), own(rstd, rows * heads, "head_rmsnorm_backward");
    inner_->head_rmsnorm_backward(dx, dweight, saved, weight, rstd, rows, row_stride, heads, head_dim);
  }
  void causal_softmax_forward(float* scores, float scale, int64_t count, int64_t seq) override {
    const Open open(*this);
    own(scores, "causal_softmax");
    inner_->causal_softmax_forward(scores, scale, count, seq);
  }
  void causal_softmax_backward(float* dprobs, const float* probs, float scale, int64_t count,
                               int64_t seq) override {
    const Open open(*this);
    own(dprobs, "causal_softmax_backward"), own(probs, "causal_softmax_backward");
    inner_->causal_softmax_backward(dprobs, probs, scale, count, seq);
  }
  void softmax_cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t rows, int64_t vocab,
                             float grad_scale) override {
    const Open open(*this);
    own(logits, "cross-entropy logits"), own(losses, "cross-entropy losses"), own(targets, "cross-entropy targets");
    inner_->softmax_cross_entropy(logits, losses, targets, rows, vocab, grad_scale);
  }
  double sum(const float* x, int64_t n) override {
    const Open open(*this);
    own(x, "sum");
    return inner_->sum(x, n);
  }
  double sum_squares(const float* x, int64_t n) override {
    const Open open(*this);
    own(x, "sum_squares");
    return inner_->sum_squares(x, n);
  }
  void adamw_update(float* param, float* grad, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                    float eps, float weight_decay, float grad_scale, int64_t step, bool zero_grad) override {
    const Open open(*this);
    own(param, "adamw"), own(grad, "adamw"), own(m, "adamw"), own(v, "adamw");
    inner_->adamw_update(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, grad_scale, step, zero_grad);
  }
  void scale(float* x, float alpha, int64_t n) override {
    const Open open(*this);
    own(x, "scale");
    inner_->scale(x, alpha, n);
  }

  void set_threads(int threads) override { inner_->set_threads(threads); }
  int threads() const override { return inner_->threads(); }
  void synchronize() override { inner_->synchronize(); }

 private:
  static constexpr size_t kReserve = size_t{1} << 38;  // 256 GiB of address space, committed as used
  const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

  // The used part of the range is readable and writable for the lifetime of an Open (one backend call).
  class Open {
   public:
    explicit Open(StrictBackend& b) : b_(b) {
      if (b_.depth_ == 0) {
        b_.protect(PROT_READ | PROT_WRITE);  // throws before the depth counts this scope
      }
      ++b_.depth_;
    }
    // Closing must not fail quietly (the strict checks would be off from then on) nor throw from a destructor.
    ~Open() {
      if (--b_.depth_ == 0 && !b_.try_protect(PROT_NONE)) {
        std::fprintf(stderr, "cpu-strict: mprotect(PROT_NONE) failed; cannot keep backend memory closed\n");
        std::abort();
      }
    }
    Open(const Open&) = delete;
    Open& operator=(const Open&) = delete;

   private:
    StrictBackend& b_;
  };
  // Only live allocations change protection (freed blocks stay PROT_NONE), adjacent ones in one call: the cost of
  // mprotect grows with the pages it touches.
  void protect(int prot) {
    if (!try_protect(prot)) throw Error("cpu-strict: mprotect failed (too many mappings? see vm.max_map_count)");
  }
  bool try_protect(int prot) {
    char* run_begin = nullptr;
    char* run_end = nullptr;
    bool ok = true;
    const auto flush = [&] {
      if (run_begin && mprotect(run_begin, static_cast<size_t>(run_end - run_begin), prot) != 0) ok = false;
    };
    for (const auto& [p, size] : sizes_) {
      if (p != run_end) {
        flush();
        run_begin = p;
      }
      run_end = p + size;
    }
    flush();
    return ok;
  }
  // Within a live allocation (a freed block's memory counts as outside).
  bool inside(const void* p) const {
    char* c = const_cast<char*>(static_cast<const char*>(p));
    auto it = sizes_.upper_bound(c);
    if (it == sizes_.begin()) return false;
    --it;
    return c < it->first + it->second;
  }
  // A pointer argument must be null (where the call allows it) or point into this backend's memory.
  void own(const void* p, const char* what) const {
    if (p && !inside(p))
      throw Error(std::string("cpu-strict: ") + what + " was given a pointer outside backend memory (host memory "
                  "must be uploaded first)");
  }
  void own(const void* p, size_t bytes, const char* what) const {
    own(p, what);
    if (p && bytes > 0 && !inside(static_cast<const char*>(p) + bytes - 1))
      throw Error(std::string("cpu-strict: ") + what + " runs past the end of backend memory");
  }
  void own(const float* p, int64_t n, const char* what) const {
    own(static_cast<const void*>(p), static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(float), what);
  }

  std::unique_ptr<CpuKernelBackend> inner_;
  size_t live_bytes_ = 0, peak_bytes_ = 0;  // page-rounded

 public:
  size_t peak_allocated_bytes() const override { return peak_bytes_; }

 private:
  char* base_ = nullptr;
  char* top_ = nullptr;
  int depth_ = 0;
  std::map<char*, size_t> sizes_;        // live allocations
  std::multimap<size_t, char*> free_;    // freed blocks by size, reused best-fit
};

}  // namespace

std::unique_ptr<Backend> make_strict_backend(int threads) { return std::make_unique<StrictBackend>(threads); }

}  // namespace moelab
