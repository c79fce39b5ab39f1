// CPU backend: the readable reference implementation of every kernel. OpenMP threads with static schedules
// and fixed-order reductions, so a given thread count always produces bitwise-identical results.
// Inner loops are written so the compiler vectorises them: exp and erf come from vec_math.h (checked against
// libm in the tests), and row reductions are `omp simd` reductions, whose lane order is fixed at compile time.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <oneapi/dnnl/dnnl.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <tuple>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/routing.h"
#include "backend/noise.h"
#include "backend/cpu/vec_math.h"
#include "core/error.h"

// libdnnl 2.6 exports this row-major bf16 x bf16 -> fp32 GEMM with C linkage (same conventions as dnnl_sgemm,
// AVX-512-bf16 kernels where the CPU has them) but declares it only in internal headers. The element type does
// not take part in C linkage, so raw uint16_t bfloat16 bits are passed.
extern "C" dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dnnl_dim_t M, dnnl_dim_t N, dnnl_dim_t K,
                                                float alpha, const uint16_t* A, dnnl_dim_t lda, const uint16_t* B,
                                                dnnl_dim_t ldb, float beta, float* C, dnnl_dim_t ldc);

namespace moelab {
namespace {

// fp32 -> bfloat16 bits as vcvtneps2bf16 computes them: round to nearest even, a NaN stays a quiet NaN, and a
// subnormal input becomes a zero of the same sign (the instruction treats subnormal inputs as zero).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

// n consecutive values to bf16: 32 at a time with vcvtne2ps2bf16 where the CPU has AVX512-BF16 (1.7x the
// compiler-vectorised bit arithmetic on data in cache), the same rounding as to_bf16 for the rest.
inline void to_bf16(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(v));
  }
#endif
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// to_bf16 with streaming (non-temporal) stores from dst's first 64-byte line boundary on: for a copy written once and read only
// much later (the optimizer's bf16 copy of every weight), which saves reading each destination line before writing
// it (an AdamW pass over 75M parameters: 40-42 instead of 44-48 ms). The caller fences (_mm_sfence) before the copy
// is read.
inline void to_bf16_streaming(uint16_t* dst, const float* src, int64_t n) {
#if defined(__AVX512BF16__)
  if (reinterpret_cast<uintptr_t>(dst) % 2 == 0) {
    int64_t i = 0;
    for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 64 != 0; ++i) dst[i] = to_bf16(src[i]);  // to a line
    for (; i + 32 <= n; i += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), reinterpret_cast<__m512i>(v));
    }
    for (; i < n; ++i) dst[i] = to_bf16(src[i]);
    return;
  }
#endif
  to_bf16(dst, src, n);
}

// Rounds the (rows, cols) block at src (row stride ld) to bf16, packed densely (row stride cols) into dst.
// Parallel over rows unless already inside a parallel region (the per-head products of attention).
void pack_bf16(uint16_t* dst, const float* src, int64_t rows, int64_t cols, int64_t ld) {
#pragma omp parallel for schedule(static) if (!omp_in_parallel() && rows * cols >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) to_bf16(dst + r * cols, src + r * ld, cols);
}

// Memory for large buffers: 2 MiB-aligned and advised onto transparent huge pages (one page fault and one TLB
// entry per 2 MiB instead of 512); small ones 64-byte aligned. Contents uninitialised.
void* host_alloc_bytes(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= 2 * kHuge;
  const size_t align = huge ? kHuge : 64;
  bytes = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  void* p = std::aligned_alloc(align, bytes);
  if (!p) throw std::bad_alloc();
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without huge pages a no-op
  return p;
}

// The bf16 copies' buffers (the optimizer's copy of every weight, the saved activations' copies) on alloc_bytes.
template <class T>
struct BufferAllocator {
  using value_type = T;
  BufferAllocator() = default;
  template <class U>
  BufferAllocator(const BufferAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(host_alloc_bytes(n * sizeof(T))); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const BufferAllocator&) const { return true; }
};
using Bf16Buffer = std::vector<uint16_t, BufferAllocator<uint16_t>>;

// Per-thread operand buffers for the bf16 path (grown, never shrunk).
thread_local Bf16Buffer bf16_a, bf16_b;

// An operand of a product as stored: `outer` x `batch` matrices of rows x cols (row stride ld), matrix (o, i) at
// src + o * outer_stride + i * stride. Packed, it is dense: (outer, batch, rows, cols).
struct OperandBlock {
  const float* src;
  int64_t rows, cols, ld;
  int64_t batch = 1, stride = 0, outer = 1, outer_stride = 0;
  int64_t size() const { return outer * batch * rows * cols; }
  // Whether the block is one dense run of memory, laid out as its packed copy would be.
  bool contiguous() const {
    return (ld == cols || rows == 1) && (batch == 1 || stride == rows * cols) &&
           (outer == 1 || outer_stride == batch * rows * cols);
  }
  const float* end() const { return src + (outer - 1) * outer_stride + (batch - 1) * stride + (rows - 1) * ld + cols; }
  bool operator<(const OperandBlock& o) const {
    return std::tie(src, rows, cols, ld, batch, stride, outer, outer_stride) <
           std::tie(o.src, o.rows, o.cols, o.ld, o.batch, o.stride, o.outer, o.outer_stride);
  }
};

void pack_bf16(uint16_t* dst, const OperandBlock& b) {
  const int64_t count = b.outer * b.batch, size = b.rows * b.cols;
  if (count == 1) return pack_bf16(dst, b.src, b.rows, b.cols, b.ld);
#pragma omp parallel for schedule(static) if (!omp_in_parallel())
  for (int64_t x = 0; x < count; ++x)
    pack_bf16(dst + x * size, b.src + (x / b.batch) * b.outer_stride + (x % b.batch) * b.stride, b.rows, b.cols, b.ld);
}

// Packs block b, which lies in a region whose whole bf16 copy (laid out as the region) starts at copy, from that copy:
// the values packing b from fp32 would give, without reading the fp32 values (which a MatmulOperandOnly region,
// Backend::declare_use, may never have had written).
void pack_from_copy(uint16_t* dst, const OperandBlock& b, const uint16_t* copy, const float* region_begin) {
  const uint16_t* base = copy + (b.src - region_begin);
  const int64_t count = b.outer * b.batch;
#pragma omp parallel for schedule(static) if (!omp_in_parallel() && b.size() >= (1 << 16))
  for (int64_t x = 0; x < count; ++x) {
    const uint16_t* m = base + (x / b.batch) * b.outer_stride + (x % b.batch) * b.stride;
    for (int64_t r = 0; r < b.rows; ++r)
      std::memcpy(dst + (x * b.rows + r) * b.cols, m + r * b.ld, b.cols * sizeof(uint16_t));
  }
}

// Disjoint half-open ranges of memory, adjacent ones merged.
class RangeSet {
 public:
  bool empty() const { return ranges_.empty(); }
  void add(const float* b, const float* e) {
    if (b >= e) return;
    auto it = ranges_.upper_bound(b);
    if (it != ranges_.begin()) {
      auto p = std::prev(it);
      if (p->second >= b) {
        b = p->first;
        e = std::max(e, p->second);
        it = ranges_.erase(p);
      }
    }
    while (it != ranges_.end() && it->first <= e) {
      e = std::max(e, it->second);
      it = ranges_.erase(it);
    }
    ranges_.emplace(b, e);
  }
  void remove(const float* b, const float* e) {
    if (b >= e || ranges_.empty()) return;
    auto it = ranges_.upper_bound(b);
    if (it != ranges_.begin()) {
      auto p = std::prev(it);
      if (p->second > b) {
        const float* tail = p->second;
        if (p->first == b) ranges_.erase(p);
        else p->second = b;
        if (tail > e) ranges_.emplace(e, tail);
      }
    }
    while (it != ranges_.end() && it->first < e) {
      if (it->second > e) ranges_.emplace(e, it->second);
      it = ranges_.erase(it);
    }
  }
  bool covers(const float* b, const float* e) const {
    auto it = ranges_.upper_bound(b);
    if (it == ranges_.begin()) return false;
    --it;
    return it->first <= b && e <= it->second;
  }
  bool overlaps(const float* b, const float* e) const {
    auto it = ranges_.upper_bound(b);
    if (it != ranges_.end() && it->first < e) return true;
    return it != ranges_.begin() && std::prev(it)->second > b;
  }

 private:
  std::map<const float*, const float*> ranges_;  // begin -> end
};

// The bf16 copies of operands, so that an operand feeding several products (a weight in the forward and the
// backward, a saved activation, an output gradient feeding the input- and the weight-gradient products) is
// rounded once. Every kernel reports the memory it writes (written, produce), which drops the copies it makes stale,
// so a copy is always exactly what packing the operand again would give: reuse never changes a result.
// - Packed blocks: a block packed for a product is kept, keyed by the block as stored, until its memory is written.
// - Declared regions (Backend::declare_use): their producers (norms, activations, softmaxes, gathers, the
//   cross-entropy's gradient, the optimizer's update) round each row or chunk into the region's own copy as they
//   write it, while it is in cache. A block inside the written part is served from that copy as is (dense blocks)
//   or packed from it (strided ones). In a MatmulOperandOnly region the producer may skip the fp32 values
//   (bf16_only): only products read them, and only from the copy.
// Only backend memory (alloc_bytes, or a wrapper's, CpuKernelBackend::adopted) is cached: host memory handed to a
// kernel (tests, benchmarks) is packed afresh every time, since the host may change it without a word.
// Thread-safe: the MoE experts' products run concurrently (writes are reported between products, never during).
// Buffers of dropped copies are pooled, since the same sizes come back every step.
class OperandCache {
 public:
  explicit OperandCache(bool reuse) : reuse_(reuse) {}
  bool reuse() const { return reuse_; }

  // Backend memory, from its allocation to its release (forget).
  void own(const float* begin, const float* end) {
    std::lock_guard<std::mutex> lock(mutex_);
    owned_.add(begin, end);
  }
  void declare(const float* begin, const float* end, bool operands_only) {
    std::lock_guard<std::mutex> lock(mutex_);
    MOELAB_CHECK(owned_.covers(begin, end), "Backend::declare_use: the range is not backend memory");
    auto it = regions_.find(begin);
    if (it != regions_.end() && it->second.end == end) {
      it->second.operands_only = operands_only;
      return;
    }
    auto next = regions_.lower_bound(begin);
    MOELAB_CHECK((next == regions_.end() || next->first >= end) &&
                     (next == regions_.begin() || std::prev(next)->second.end <= begin),
                 "Backend::declare_use: the range overlaps another declaration");
    regions_.emplace(begin, Region{end, operands_only, {}});
  }
  // [begin, end) was freed: declarations and copies in it go.
  void forget(const float* begin, const float* end) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = regions_.lower_bound(begin); it != regions_.end() && it->first < end;) {
      give_back_locked(std::move(it->second.copy));
      it = regions_.erase(it);
    }
    written_locked(begin, end);
    owned_.remove(begin, end);
  }
  // A kernel (or an upload) writes [begin, end) (or part of it) in fp32.
  void written(const float* begin, const float* end) {
    if (begin >= end) return;
    std::lock_guard<std::mutex> lock(mutex_);
    written_locked(begin, end);
  }
  // A producer writes [out, out + n) in full, under bf16: the buffer for its bf16 values when the range lies in a
  // declared region (the producer rounds each row or chunk into it right after computing it), else null (the
  // write is only reported). With skip_fp32 (may be null: the producer always writes fp32) it learns whether it
  // may leave the fp32 values unwritten (a MatmulOperandOnly region).
  uint16_t* produce(const float* out, int64_t n, bool* skip_fp32) {
    if (skip_fp32) *skip_fp32 = false;
    if (n <= 0) return nullptr;
    std::lock_guard<std::mutex> lock(mutex_);
    const float* end = out + n;
    written_locked(out, end);
    if (!reuse_) return nullptr;
    auto it = containing_locked(out, end);
    if (it == regions_.end()) return nullptr;
    Region& r = it->second;
    if (r.copy.empty()) r.copy = take_locked(r.end - it->first);
    valid_.add(out, end);
    if (skip_fp32 && r.operands_only) {
      bf16_only_.add(out, end);
      *skip_fp32 = true;
    }
    return r.copy.data() + (out - it->first);
  }
  // Memory that a kernel reads as fp32 (a product at fp32 precision, a download) must have its fp32 values.
  void check_fp32(const float* begin, const float* end, const char* reader) {
    if (begin >= end) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (bf16_only_.empty() || !bf16_only_.overlaps(begin, end)) return;
    throw Error(std::string(reader) + " reads, as fp32, values that were declared MatmulOperandOnly "
                "(Backend::declare_use) and written under bf16, which stores only their bf16 copy; declare that buffer "
                "MatmulOperand instead");
  }
  // The block rounded to bf16 and packed densely: a copy kept from before, or a fresh one (kept; in `scratch` when
  // reuse is off).
  const uint16_t* get(const OperandBlock& b, Bf16Buffer& scratch) {
    if (!reuse_) {
      if (scratch.size() < static_cast<size_t>(b.size())) scratch.resize(b.size());
      pack_bf16(scratch.data(), b);
      return scratch.data();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (!owned_.covers(b.src, b.end())) {
      lock.unlock();
      if (scratch.size() < static_cast<size_t>(b.size())) scratch.resize(b.size());
      pack_bf16(scratch.data(), b);
      return scratch.data();
    }
    const uint16_t* from_copy = nullptr;  // the declared region's copy, when it holds the block's current values
    const float* copy_begin = nullptr;
    if (auto it = containing_locked(b.src, b.end()); it != regions_.end() && !it->second.copy.empty() &&
                                                     valid_.covers(b.src, b.end())) {
      if (b.contiguous()) return it->second.copy.data() + (b.src - it->first);
      from_copy = it->second.copy.data();  // stays valid: nothing writes while products run
      copy_begin = it->first;
    } else {
      MOELAB_CHECK(!bf16_only_.overlaps(b.src, b.end()),
                   "a matrix product reads memory declared MatmulOperandOnly beyond the part its producer wrote");
    }
    if (auto it = copies_.find(b); it != copies_.end()) return it->second.data();
    Bf16Buffer buffer = take_locked(b.size());
    lock.unlock();
    if (from_copy) pack_from_copy(buffer.data(), b, from_copy, copy_begin);
    else pack_bf16(buffer.data(), b);
    lock.lock();
    auto [it, inserted] = copies_.try_emplace(b, std::move(buffer));
    if (!inserted) give_back_locked(std::move(buffer));  // another thread packed it first
    else max_span_ = std::max<int64_t>(max_span_, b.end() - b.src);
    return it->second.data();
  }

 private:
  struct Region {
    const float* end;
    bool operands_only;
    Bf16Buffer copy;  // the whole region's bf16 values where valid_ says so, or empty
  };
  using Regions = std::map<const float*, Region>;
  Regions::iterator containing_locked(const float* begin, const float* end) {
    auto it = regions_.upper_bound(begin);
    if (it == regions_.begin()) return regions_.end();
    --it;
    return end <= it->second.end ? it : regions_.end();
  }
  void written_locked(const float* begin, const float* end) {
    valid_.remove(begin, end);
    bf16_only_.remove(begin, end);
    if (copies_.empty()) return;
    // Packed blocks that overlap [begin, end): they start less than max_span_ before it.
    const uintptr_t b = reinterpret_cast<uintptr_t>(begin), span = static_cast<uintptr_t>(max_span_) * sizeof(float);
    constexpr int64_t lowest = std::numeric_limits<int64_t>::min();
    const OperandBlock from{reinterpret_cast<const float*>(b > span ? b - span : 0), lowest, lowest, lowest,
                            lowest, lowest, lowest, lowest};
    for (auto it = copies_.lower_bound(from); it != copies_.end() && it->first.src < end;) {
      if (it->first.end() > begin) {
        give_back_locked(std::move(it->second));
        it = copies_.erase(it);
      } else {
        ++it;
      }
    }
  }
  // The smallest pooled buffer that fits without wasting more than half of it (a small operand must not take the
  // buffer a large one comes back for: the next step would page-fault a fresh one), or a new one.
  Bf16Buffer take_locked(int64_t size) {
    Bf16Buffer buffer;
    if (auto best = pool_.lower_bound(static_cast<size_t>(size));
        best != pool_.end() && best->first <= 2 * static_cast<size_t>(size) + 4096) {
      buffer = std::move(best->second);
      pool_.erase(best);
    }
    buffer.resize(size);
    return buffer;
  }
  // Bounded: past 1024 buffers the smallest goes. A training step keeps a few hundred copies at once (each MoE
  // expert's slice of each saved activation is one), and they all come back the next step.
  void give_back_locked(Bf16Buffer buffer) {
    if (buffer.capacity() == 0) return;
    pool_.emplace(buffer.capacity(), std::move(buffer));
    if (pool_.size() > 1024) pool_.erase(pool_.begin());
  }
  const bool reuse_;
  std::mutex mutex_;
  Regions regions_;
  RangeSet owned_;      // backend memory
  RangeSet valid_;      // where declared regions' copies hold the current values
  RangeSet bf16_only_;  // where, moreover, the fp32 values were never written
  std::map<OperandBlock, Bf16Buffer> copies_;
  int64_t max_span_ = 0;  // the longest block ever kept, in floats
  std::multimap<size_t, Bf16Buffer> pool_;  // by capacity
};

// oneDNN fp32 matmul primitives (brgemm kernels), cached per shape. They beat dnnl_sgemm by up
// to 3x on some transformer shapes (e.g. the weight gradients, op(A) = A^T with a long K), but creating one costs
// about a millisecond, so they are used only where a shape recurs: the caller (MatmulCache::eligible) restricts
// them to products whose M, N and K are multiples of 64 - every dense layer of the benchmark models, but rarely a
// MoE expert's token count, which changes every step. The choice depends on the shape alone, so a run and its
// resumed continuation take the same path for every product (bitwise-identical losses). (In bf16 the GEMM function
// is as fast or faster, so the bf16 path does not use them: gemm_bf16.)
class MatmulCache {
 public:
  struct Key {
    char ta, tb;
    int64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
    int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;  // a strided batch of products (batch > 1)
    int64_t outer = 1, outer_a = 0, outer_b = 0, outer_c = 0;       // of strided batches (outer > 1)
    bool operator<(const Key& o) const {
      return std::tie(ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, batch, stride_a, stride_b, stride_c, outer,
                      outer_a, outer_b, outer_c) <
             std::tie(o.ta, o.tb, o.m, o.n, o.k, o.lda, o.ldb, o.ldc, o.alpha, o.beta, o.batch, o.stride_a,
                      o.stride_b, o.stride_c, o.outer, o.outer_a, o.outer_b, o.outer_c);
    }
  };
  static bool eligible(int64_t m, int64_t n, int64_t k) {
    return m % 64 == 0 && n % 64 == 0 && k % 64 == 0 && !omp_in_parallel();
  }
  // C = alpha op(A) op(B) + beta C, all fp32.
  void run(const Key& key, const void* a, const void* b, float* c) {
    auto it = cache_.find(key);
    if (it == cache_.end()) {
      if (cache_.size() >= 2048) cache_.clear();  // bounded; entries are cheap to rebuild
      it = cache_.emplace(key, create(key)).first;
    }
    Entry& e = it->second;
    e.a.set_data_handle(const_cast<void*>(a));
    e.b.set_data_handle(const_cast<void*>(b));
    e.c.set_data_handle(c);
    e.primitive.execute(stream_, {{DNNL_ARG_SRC, e.a}, {DNNL_ARG_WEIGHTS, e.b}, {DNNL_ARG_DST, e.c}});
    stream_.wait();
  }

 private:
  struct Entry {
    dnnl::matmul primitive;
    dnnl::memory a, b, c;
  };
  Entry create(const Key& key) {
    using dt = dnnl::memory::data_type;
    const dt in = dt::f32;
    using dims = dnnl::memory::dims;
    dims a_dims{key.m, key.k}, b_dims{key.k, key.n}, c_dims{key.m, key.n};
    dims a_strides = key.ta == 'N' ? dims{key.lda, 1} : dims{1, key.lda};
    dims b_strides = key.tb == 'N' ? dims{key.ldb, 1} : dims{1, key.ldb};
    dims c_strides{key.ldc, 1};
    if (key.batch > 1 || key.outer > 1) {  // leading batch dimensions: 3-D or 4-D matmul
      a_dims.insert(a_dims.begin(), key.batch), a_strides.insert(a_strides.begin(), key.stride_a);
      b_dims.insert(b_dims.begin(), key.batch), b_strides.insert(b_strides.begin(), key.stride_b);
      c_dims.insert(c_dims.begin(), key.batch), c_strides.insert(c_strides.begin(), key.stride_c);
    }
    if (key.outer > 1) {
      a_dims.insert(a_dims.begin(), key.outer), a_strides.insert(a_strides.begin(), key.outer_a);
      b_dims.insert(b_dims.begin(), key.outer), b_strides.insert(b_strides.begin(), key.outer_b);
      c_dims.insert(c_dims.begin(), key.outer), c_strides.insert(c_strides.begin(), key.outer_c);
    }
    const dnnl::memory::desc a_md(a_dims, in, a_strides), b_md(b_dims, in, b_strides), c_md(c_dims, dt::f32, c_strides);
    dnnl::primitive_attr attr;
    if (key.alpha != 1.f) attr.set_output_scales(0, {key.alpha});
    if (key.beta != 0.f) {
      dnnl::post_ops ops;
      ops.append_sum(key.beta);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine_);
    return {dnnl::matmul(pd), dnnl::memory(a_md, engine_, nullptr), dnnl::memory(b_md, engine_, nullptr),
            dnnl::memory(c_md, engine_, nullptr)};
  }
  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream_{engine_};
  std::map<Key, Entry> cache_;
};

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// Splits [0, n) into `parts` contiguous chunks; chunk i is [begin, end).
inline void chunk_range(int64_t n, int parts, int i, int64_t& begin, int64_t& end) {
  const int64_t base = n / parts, extra = n % parts;
  begin = i * base + std::min<int64_t>(i, extra);
  end = begin + base + (i < extra ? 1 : 0);
}

// MOELAB_GEMM_PROFILE=1: wall time and GFLOP/s per product shape (top-level calls) printed to stderr at exit,
// for choosing kernels; off by default (one getenv at construction).
class GemmProfile {
 public:
  GemmProfile() : on_(std::getenv("MOELAB_GEMM_PROFILE") != nullptr) {}
  ~GemmProfile() {
    if (!on_) return;
    std::vector<std::pair<double, std::string>> rows;
    double total = 0;
    for (auto& [k, v] : stats_) {
      rows.push_back({v.seconds, k});
      if (v.flops > 0) total += v.seconds;  // entries without FLOPs (operand packing) are part of a product's time
    }
    std::sort(rows.rbegin(), rows.rend());
    std::fprintf(stderr, "GEMM profile: %.1f ms in total (operand packing lines: already inside their product)\n",
                 1e3 * total);
    for (auto& [sec, k] : rows)
      std::fprintf(stderr, "  %-40s %8.1f ms %6ld calls %7.1f GFLOP/s\n", k.c_str(), 1e3 * sec,
                   static_cast<long>(stats_[k].calls), stats_[k].flops / sec / 1e9);
  }
  bool on() const { return on_; }
  void add(const std::string& key, double seconds, double flops) {
    auto& e = stats_[key];
    e.seconds += seconds, e.flops += flops, ++e.calls;
  }

 private:
  struct Stat {
    double seconds = 0, flops = 0;
    int64_t calls = 0;
  };
  bool on_;
  std::map<std::string, Stat> stats_;
};

inline double wall_seconds() { return omp_get_wtime(); }

class CpuBackend final : public CpuKernelBackend {
 public:
  // MOELAB_NO_OPERAND_REUSE=1 turns the reuse of bf16 operand copies off (every product rounds its operands afresh,
  // producers write fp32 only): for checking that reuse never changes a result, or for ruling it out when chasing
  // a numerical difference.
  explicit CpuBackend(int threads) : operands_(std::getenv("MOELAB_NO_OPERAND_REUSE") == nullptr) {
    set_threads(threads);
  }
  std::string name() const override { return "cpu"; }

  void set_threads(int threads) override {
    threads_ = threads > 0 ? threads : omp_get_num_procs();
    omp_set_num_threads(threads_);
  }
  int threads() const override { return threads_; }
  void set_matmul_precision(Precision precision) override { precision_ = precision; }
  void declare_use(const float* data, int64_t count, BufferUse use) override {
    if (count > 0) operands_.declare(data, data + count, use == BufferUse::MatmulOperandOnly);
  }
  void adopted(const void* ptr, size_t bytes) override {
    const float* p = static_cast<const float*>(ptr);
    operands_.own(p, p + bytes / sizeof(float));
  }
  void released(const void* ptr, size_t bytes) override {
    const float* p = static_cast<const float*>(ptr);
    operands_.forget(p, p + (bytes + sizeof(float) - 1) / sizeof(float));
  }
  void host_wrote(const void* ptr, size_t bytes) {
    const float* p = static_cast<const float*>(ptr);
    operands_.written(p, p + (bytes + sizeof(float) - 1) / sizeof(float));
  }
  void host_reads(const void* ptr, size_t bytes) {
    const float* p = static_cast<const float*>(ptr);
    operands_.check_fp32(p, p + bytes / sizeof(float), "a download");
  }
  // Every kernel reports what it writes (OperandCache), before it writes: [x, x + n) here.
  void written(const float* x, int64_t n) {
    if (n > 0) operands_.written(x, x + n);
  }
  // For a kernel about to write [out, out + n) in full: under bf16, where that lies in a declared region
  // (declare_use), the buffer its bf16 copy goes into (the kernel rounds each row or chunk right after computing it),
  // else null; the write is reported either way. With bf16_only (may be null: the kernel always writes fp32) it
  // learns whether it may leave the fp32 values unwritten (it computes each row or chunk into scratch_floats and
  // rounds from there).
  uint16_t* produced(float* out, int64_t n, bool* bf16_only = nullptr) {
    if (precision_ != Precision::BF16) {
      if (bf16_only) *bf16_only = false;
      written(out, n);
      return nullptr;
    }
    return operands_.produce(out, n, bf16_only);
  }
  // A thread's scratch for one row or chunk that a producer rounds to bf16 without storing it (produced's bf16_only).
  static float* scratch_floats(int64_t n) {
    thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(n)) scratch.resize(n);
    return scratch.data();
  }
  // A product's output, (outer, batch, rows, cols) matrices, as a range: reported written; and at fp32 precision
  // its operands must have their fp32 values (OperandCache::check_fp32).
  void product_writes(const float* c, int64_t rows, int64_t cols, int64_t ldc, int64_t batch = 1,
                      int64_t stride_c = 0, int64_t outer = 1, int64_t outer_c = 0) {
    if (rows <= 0 || cols <= 0 || batch <= 0 || outer <= 0) return;
    operands_.written(c, OperandBlock{c, rows, cols, ldc, batch, stride_c, outer, outer_c}.end());
  }
  void product_reads(Trans t, const float* x, int64_t rows, int64_t cols, int64_t ld, int64_t batch = 1,
                     int64_t stride = 0, int64_t outer = 1, int64_t outer_stride = 0) {
    if (precision_ != Precision::FP32 || rows <= 0 || cols <= 0 || batch <= 0 || outer <= 0) return;
    if (t == Trans::T) std::swap(rows, cols);
    operands_.check_fp32(x, OperandBlock{x, rows, cols, ld, batch, stride, outer, outer_stride}.end(),
                         "a matrix product at fp32 precision");
  }
  Precision matmul_precision() const override { return precision_; }

  // Parameters, gradients, optimizer moments and activations: large ones on transparent huge pages (alloc_bytes;
  // moe-512-g4's first step: 1.0 s instead of 2.3 s, an AdamW loop over 75M parameters 12-15% faster standalone).
  void* alloc_bytes(size_t bytes) override {
    bytes = std::max<size_t>(bytes, 1);
    void* p;
    try {
      p = host_alloc_bytes(bytes);
    } catch (const std::bad_alloc&) {
      throw Error("out of memory allocating " + std::to_string(bytes >> 20) + " MiB; reduce the batch size or the "
                  "model");
    }
    std::memset(p, 0, bytes);
    {
      std::lock_guard<std::mutex> lock(sizes_mutex_);
      sizes_[p] = bytes;
      live_bytes_ += bytes;
      peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    }
    adopted(p, bytes);
    return p;
  }
  void free(void* ptr) override {
    if (!ptr) return;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(sizes_mutex_);
      auto it = sizes_.find(ptr);
      MOELAB_CHECK(it != sizes_.end(), "free of a pointer the cpu backend did not allocate");
      bytes = it->second;
      live_bytes_ -= bytes;
      sizes_.erase(it);
    }
    released(ptr, bytes);
    std::free(ptr);
  }
  // Backend memory is host memory here: the seam's transfers are copies.
  void upload_bytes(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return;
    host_wrote(dst, bytes);
    std::memcpy(dst, host_src, bytes);
  }
  void download_bytes(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    host_reads(src, bytes);
    std::memcpy(host_dst, src, bytes);
  }

  void fill(float* x, float value, int64_t n) override {
    written(x, n);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] = value;
  }
  void copy(float* dst, const float* src, int64_t n) override {
    written(dst, n);
    if (n > 0) std::memcpy(dst, src, n * sizeof(float));
  }
  void scale(float* x, float alpha, int64_t n) override {
    written(x, n);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
  }

  // ---- matrix products ------------------------------------------------------------------------------------
  void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) override {
    product_writes(c, m, n, ldc);
    product_reads(ta, a, m, k, lda);
    product_reads(tb, b, k, n, ldb);
    gemm_run(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  // One product, its writes reported by the caller.
  void gemm_run(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    if (profile_.on() && !omp_in_parallel()) {
      const double t0 = wall_seconds();
      gemm_impl(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      char key[96];
      std::snprintf(key, sizeof key, "%s %ldx%ldx%ld %c%c%s", precision_ == Precision::BF16 ? "bf16" : "fp32",
                    static_cast<long>(m), static_cast<long>(n), static_cast<long>(k), ta == Trans::T ? 'T' : 'N',
                    tb == Trans::T ? 'T' : 'N',
                    precision_ == Precision::FP32 && MatmulCache::eligible(m, n, k) ? " matmul" : "");
      profile_.add(key, wall_seconds() - t0, 2.0 * m * n * k);
      return;
    }
    gemm_impl(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  void gemm_impl(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // oneDNN rejects K = 0; the product is empty, so C = beta * C.
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
      return;
    }
    // A MoE expert's token count M (or, for its weight gradient, K) is rarely a multiple of 64. Split the product
    // into a part the primitive cache takes (at most max_rows / 64 distinct shapes) and a thin remainder; the
    // split depends on the shape alone, so it is deterministic.
    if (n % 64 == 0 && !omp_in_parallel()) {
      const int64_t m_tail = m % 64, k_tail = k % 64;
      if (m_tail != 0 && m > 64 && k % 64 == 0) {
        const int64_t m1 = m - m_tail;
        gemm_impl(ta, tb, m1, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        gemm_impl(ta, tb, m_tail, n, k, alpha, ta == Trans::N ? a + m1 * lda : a + m1, lda, b, ldb, beta,
                  c + m1 * ldc, ldc);
        return;
      }
      if (k_tail != 0 && k > 64 && m % 64 == 0) {
        const int64_t k1 = k - k_tail;
        gemm_impl(ta, tb, m, n, k1, alpha, a, lda, b, ldb, beta, c, ldc);
        gemm_impl(ta, tb, m, n, k_tail, alpha, ta == Trans::N ? a + k1 : a + k1 * lda, lda,
                  tb == Trans::N ? b + k1 * ldb : b + k1, ldb, 1.f, c, ldc);
        return;
      }
    }
    if (precision_ == Precision::BF16) {
      gemm_bf16(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    if (MatmulCache::eligible(m, n, k)) {
      matmuls_.run({ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N', m, n, k, lda, ldb, ldc, alpha, beta},
                   a, b, c);
      return;
    }
    const dnnl_status_t status = dnnl_sgemm(ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N', m, n, k, alpha,
                                            a, lda, b, ldb, beta, c, ldc);
    MOELAB_CHECK(status == dnnl_success, "dnnl_sgemm failed with status " + std::to_string(status));
  }

  // The same product with both operands rounded to bf16: the stored block of each operand (op(A) is M x K, so A
  // is stored M x K or K x M) is packed densely and handed to oneDNN's bf16 GEMM, which accumulates in fp32.
  void gemm_bf16(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    const int64_t a_rows = ta == Trans::N ? m : k, a_cols = ta == Trans::N ? k : m;
    const int64_t b_rows = tb == Trans::N ? k : n, b_cols = tb == Trans::N ? n : k;
    const double tp = profile_.on() && !omp_in_parallel() ? wall_seconds() : 0;
    const uint16_t* pa = operands_.get({a, a_rows, a_cols, lda}, bf16_a);
    const uint16_t* pb = operands_.get({b, b_rows, b_cols, ldb}, bf16_b);
    if (profile_.on() && !omp_in_parallel()) {  // the bf16 rounding of the operands, apart from the product
      char key[96];
      std::snprintf(key, sizeof key, "bf16 operand packing %ldx%ldx%ld %c%c", static_cast<long>(m),
                    static_cast<long>(n), static_cast<long>(k), ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N');
      profile_.add(key, wall_seconds() - tp, 0);
    }
    // Unlike fp32, no matmul primitive here: on a transformer layer's shapes oneDNN's bf16 GEMM function is as fast
    // or faster (build/bench/bf16_kernels; the output head's forward 2048 x 8192 x 256: 444 against 359 GFLOP/s),
    // and whole bf16 training steps are 3-6% shorter with it.
    const dnnl_status_t status = dnnl_gemm_bf16bf16f32(ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N', m, n,
                                                       k, alpha, pa, a_cols, pb, b_cols, beta, c, ldc);
    MOELAB_CHECK(status == dnnl_success, "dnnl_gemm_bf16bf16f32 failed with status " + std::to_string(status));
  }

  void gemm_strided_batched(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                            int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b,
                            float beta, float* c, int64_t ldc, int64_t stride_c, int64_t batch) override {
    product_writes(c, m, n, ldc, batch, stride_c);
    product_reads(ta, a, m, k, lda, batch, stride_a);
    product_reads(tb, b, k, n, ldb, batch, stride_b);
    strided_batched(ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, batch);
  }
  void strided_batched(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                       int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                       float* c, int64_t ldc, int64_t stride_c, int64_t batch) {
    if (batch > 1 && batched_matmul(ta, tb, m, n, k, alpha, a, lda, stride_a, 0, b, ldb, stride_b, 0, beta, c, ldc,
                                    stride_c, 0, batch, 1))
      return;
    const double t0 = profile_.on() ? wall_seconds() : 0;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < batch; ++i)
      gemm_run(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
    if (profile_.on()) {
      char key[96];
      std::snprintf(key, sizeof key, "%s batched %ldx %ldx%ldx%ld %c%c", precision_ == Precision::BF16 ? "bf16" : "fp32",
                    static_cast<long>(batch), static_cast<long>(m), static_cast<long>(n), static_cast<long>(k),
                    ta == Trans::T ? 'T' : 'N', tb == Trans::T ? 'T' : 'N');
      profile_.add(key, wall_seconds() - t0, 2.0 * m * n * k * batch);
    }
  }

  void gemm_strided_batched2(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                             int64_t lda, int64_t stride_a, int64_t outer_stride_a, const float* b, int64_t ldb,
                             int64_t stride_b, int64_t outer_stride_b, float beta, float* c, int64_t ldc,
                             int64_t stride_c, int64_t outer_stride_c, int64_t batch, int64_t outer) override {
    product_writes(c, m, n, ldc, batch, stride_c, outer, outer_stride_c);
    product_reads(ta, a, m, k, lda, batch, stride_a, outer, outer_stride_a);
    product_reads(tb, b, k, n, ldb, batch, stride_b, outer, outer_stride_b);
    if (batched_matmul(ta, tb, m, n, k, alpha, a, lda, stride_a, outer_stride_a, b, ldb, stride_b, outer_stride_b,
                       beta, c, ldc, stride_c, outer_stride_c, batch, outer))
      return;
    for (int64_t o = 0; o < outer; ++o)
      strided_batched(ta, tb, m, n, k, alpha, a + o * outer_stride_a, lda, stride_a, b + o * outer_stride_b, ldb,
                      stride_b, beta, c + o * outer_stride_c, ldc, stride_c, batch);
  }

  // outer x batch products as one oneDNN matmul (3-D or 4-D): it splits the work across threads itself, about
  // 1.5x faster than one single-threaded product per thread on the attention shapes (T x T x head_dim).
  // Returns false (nothing done) for shapes the primitive cache does not take.
  bool batched_matmul(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      int64_t stride_a, int64_t outer_a, const float* b, int64_t ldb, int64_t stride_b,
                      int64_t outer_b, float beta, float* c, int64_t ldc, int64_t stride_c, int64_t outer_c,
                      int64_t batch, int64_t outer) {
    if (k <= 0 || m <= 0 || n <= 0 || !MatmulCache::eligible(m, n, k)) return false;
    const double t0 = profile_.on() ? wall_seconds() : 0;
    const char cta = ta == Trans::T ? 'T' : 'N', ctb = tb == Trans::T ? 'T' : 'N';
    if (precision_ == Precision::BF16) {
      // Pack every product's operands densely: (outer, batch, rows, cols) bf16.
      const int64_t a_rows = ta == Trans::N ? m : k, a_cols = ta == Trans::N ? k : m;
      const int64_t b_rows = tb == Trans::N ? k : n, b_cols = tb == Trans::N ? n : k;
      const int64_t a_size = a_rows * a_cols, b_size = b_rows * b_cols;
      const uint16_t* pa = operands_.get({a, a_rows, a_cols, lda, batch, stride_a, outer, outer_a}, bf16_a);
      const uint16_t* pb = operands_.get({b, b_rows, b_cols, ldb, batch, stride_b, outer, outer_b}, bf16_b);
      // One single-threaded bf16 GEMM per product, the products spread over the threads: 350-390 GFLOP/s on the
      // attention shapes (256 x 64 x 256, 256 x 256 x 64 per head) where the batched matmul primitive reaches
      // 180-280.
      const int64_t count = outer * batch;
      int failed = dnnl_success;  // checked after the parallel region (an exception must not leave it)
#pragma omp parallel for schedule(static)
      for (int64_t x = 0; x < count; ++x) {
        const dnnl_status_t status =
            dnnl_gemm_bf16bf16f32(cta, ctb, m, n, k, alpha, pa + x * a_size, a_cols, pb + x * b_size, b_cols, beta,
                                  c + (x / batch) * outer_c + (x % batch) * stride_c, ldc);
        if (status != dnnl_success) {
#pragma omp atomic write
          failed = status;
        }
      }
      MOELAB_CHECK(failed == dnnl_success, "dnnl_gemm_bf16bf16f32 failed with status " + std::to_string(failed));
    } else {
      matmuls_.run({cta, ctb, m, n, k, lda, ldb, ldc, alpha, beta, batch, stride_a, stride_b, stride_c, outer,
                    outer_a, outer_b, outer_c},
                   a, b, c);
    }
    if (profile_.on()) {
      char key[96];
      std::snprintf(key, sizeof key, "%s %ldx%ldx %ldx%ldx%ld %c%c",
                    precision_ == Precision::BF16 ? "bf16 batched gemm" : "fp32 batched matmul",
                    static_cast<long>(outer), static_cast<long>(batch),
                    static_cast<long>(m), static_cast<long>(n), static_cast<long>(k), cta, ctb);
      profile_.add(key, wall_seconds() - t0, 2.0 * m * n * k * batch * outer);
    }
    return true;
  }

  void gemm_batch(const GemmProblem* problems, int64_t count) override {
    // Many small products (a MoE layer has 8-64 experts of a few hundred rows each): one single-threaded product
    // per thread at a time, handed out dynamically for balance. Which thread runs a product does not change its
    // result (oneDNN runs sequentially inside a parallel region), so the outcome is deterministic.
    for (int64_t i = 0; i < count; ++i) {
      const GemmProblem& p = problems[i];
      product_writes(p.c, p.m, p.n, p.ldc);
      product_reads(p.ta, p.a, p.m, p.k, p.lda);
      product_reads(p.tb, p.b, p.k, p.n, p.ldb);
    }
    const double t0 = profile_.on() ? wall_seconds() : 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i) {
      const GemmProblem& p = problems[i];
      gemm_run(p.ta, p.tb, p.m, p.n, p.k, p.alpha, p.a, p.lda, p.b, p.ldb, p.beta, p.c, p.ldc);
      if (p.c_sum_squares) *p.c_sum_squares = block_sum_squares(p.c, p.m, p.n, p.ldc);
    }
    if (profile_.on() && count > 0) {
      double flops = 0;
      for (int64_t i = 0; i < count; ++i) flops += 2.0 * problems[i].m * problems[i].n * problems[i].k;
      char key[96];
      std::snprintf(key, sizeof key, "%s gemm_batch n=%ld k=%ld %c%c", precision_ == Precision::BF16 ? "bf16" : "fp32",
                    static_cast<long>(problems[0].n), static_cast<long>(problems[0].k),
                    problems[0].ta == Trans::T ? 'T' : 'N', problems[0].tb == Trans::T ? 'T' : 'N');
      profile_.add(key, wall_seconds() - t0, flops);
    }
  }

  void grouped_gemm(Trans ta, Trans tb, int64_t n, int64_t k, float alpha, const GemmGroup* groups,
                    int64_t group_count, int64_t lda, int64_t ldb, float beta, int64_t ldc) override {
    std::vector<GemmProblem> problems;
    for (int64_t g = 0; g < group_count; ++g)
      if (groups[g].m > 0)
        problems.push_back({ta, tb, groups[g].m, n, k, alpha, groups[g].a, lda, groups[g].b, ldb, beta, groups[g].c,
                            ldc});
    gemm_batch(problems.data(), static_cast<int64_t>(problems.size()));
  }

  // ---- elementwise ----------------------------------------------------------------------------------------
  void add(float* out, const float* a, const float* b, int64_t n) override {
    written(out, n);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }
  void add_inplace(float* x, const float* y, int64_t n) override {
    written(x, n);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
  }
  void add_bias(float* x, const float* bias, int64_t rows, int64_t cols) override {
    written(x, rows * cols);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
    }
  }
  // Elementwise kernels run in chunks, so that a chunk their output's bf16 copy wants (a declared region, produced)
  // is rounded while it is in L1.
  static constexpr int64_t kChunk = 4096;
  void gelu_forward(float* out, const float* in, int64_t n) override {
    bool bf16_only;
    uint16_t* const rounded = produced(out, n, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(n - i0, kChunk);
      float* const o = bf16_only ? scratch_floats(len) : out + i0;
      const float* const x = in + i0;
      for (int64_t i = 0; i < len; ++i) o[i] = 0.5f * x[i] * (1.f + vec::fast_erf(x[i] * kInvSqrt2));
      if (rounded) to_bf16(rounded + i0, o, len);
    }
  }
  void gelu_backward(float* din, const float* in, const float* dout, int64_t n) override {
    bool bf16_only;
    uint16_t* const rounded = produced(din, n, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(n - i0, kChunk);
      float* const o = bf16_only ? scratch_floats(len) : din + i0;
      const float* const xs = in + i0;
      const float* const d = dout + i0;
      for (int64_t i = 0; i < len; ++i) {
        // d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-(x/sqrt 2)^2) / sqrt(2 pi): erf's own exponential.
        const float x = xs[i];
        float e;
        const float cdf = 0.5f * (1.f + vec::fast_erf(x * kInvSqrt2, e));
        o[i] = d[i] * (cdf + x * (kInvSqrt2Pi * e));
      }
      if (rounded) to_bf16(rounded + i0, o, len);
    }
  }
  void swiglu_forward(float* out, const float* in, int64_t rows, int64_t f) override {
    uint16_t* const rounded = produced(out, rows * f);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* gate = in + r * 2 * f;
      const float* up = gate + f;
      float* o = out + r * f;
      for (int64_t j = 0; j < f; ++j) {
        const float sig = 1.f / (1.f + vec::fast_exp(-gate[j]));
        o[j] = gate[j] * sig * up[j];
      }
      if (rounded) to_bf16(rounded + r * f, o, f);
    }
  }
  void swiglu_backward(float* din, const float* in, const float* dout, int64_t rows, int64_t f) override {
    uint16_t* const rounded = produced(din, rows * 2 * f);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* gate = in + r * 2 * f;
      const float* up = gate + f;
      const float* d = dout + r * f;
      float* dgate = din + r * 2 * f;
      float* dup = dgate + f;
      for (int64_t j = 0; j < f; ++j) {
        const float sig = 1.f / (1.f + vec::fast_exp(-gate[j]));
        const float silu = gate[j] * sig;
        dup[j] = d[j] * silu;
        dgate[j] = d[j] * up[j] * sig * (1.f + gate[j] * (1.f - sig));
      }
      if (rounded) to_bf16(rounded + r * 2 * f, dgate, 2 * f);
    }
  }
  void rope(float* x, int64_t batch, int64_t seq, int64_t row_stride, int64_t n_rot_heads, int64_t head_dim,
            float theta, bool inverse, int64_t first_position) override {
    written(x, (batch * seq - 1) * row_stride + n_rot_heads * head_dim);
    const int64_t half = head_dim / 2;
    // The angle table (seq x half cos and sin, in double) costs more than the rotation itself; training asks for the
    // same one every call (forward and backward of every layer), so the last one is kept.
    RopeTable& tab = rope_table_;
    if (tab.seq != seq || tab.head_dim != head_dim || tab.theta != theta || tab.first_position != first_position) {
      tab = {seq, head_dim, theta, first_position, std::vector<float>(seq * half), std::vector<float>(seq * half)};
      for (int64_t t = 0; t < seq; ++t)
        for (int64_t i = 0; i < half; ++i) {
          const double inv_freq = std::pow(static_cast<double>(theta), -2.0 * i / head_dim);
          const double angle = static_cast<double>(first_position + t) * inv_freq;
          tab.cos[t * half + i] = static_cast<float>(std::cos(angle));
          tab.sin[t * half + i] = static_cast<float>(std::sin(angle));
        }
    }
    const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < batch * seq; ++bt) {
      const int64_t t = bt % seq;
      const float* cs = tab.cos.data() + t * half;
      const float* sn = tab.sin.data() + t * half;
      for (int64_t h = 0; h < n_rot_heads; ++h) {
        float* v = x + bt * row_stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half], s = sign * sn[i];
          v[i] = a * cs[i] - b * s;
          v[i + half] = b * cs[i] + a * s;
        }
      }
    }
  }
  void embedding_forward(float* out, const int32_t* tokens, const float* table, const float* pos, int64_t batch,
                         int64_t seq, int64_t dim) override {
    written(out, batch * seq * dim);
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < batch * seq; ++bt) {
      const float* row = table + static_cast<int64_t>(tokens[bt]) * dim;
      float* o = out + bt * dim;
      if (pos) {
        const float* p = pos + (bt % seq) * dim;
        for (int64_t c = 0; c < dim; ++c) o[c] = row[c] + p[c];
      } else {
        std::memcpy(o, row, dim * sizeof(float));
      }
    }
  }
  void embedding_backward(float* dtable, float* dpos, const int32_t* tokens, const float* dout, int64_t batch,
                          int64_t seq, int64_t dim, int64_t vocab) override {
    written(dtable, vocab * dim);
    if (dpos) written(dpos, seq * dim);
    // Each thread owns a slice of the channels, so rows hit by repeated tokens never race and the summation
    // order (token order) is fixed.
#pragma omp parallel
    {
      int64_t c0, c1;
      chunk_range(dim, omp_get_num_threads(), omp_get_thread_num(), c0, c1);
      for (int64_t bt = 0; bt < batch * seq; ++bt) {
        float* drow = dtable + static_cast<int64_t>(tokens[bt]) * dim;
        const float* d = dout + bt * dim;
        for (int64_t c = c0; c < c1; ++c) drow[c] += d[c];
      }
      if (dpos) {
        for (int64_t bt = 0; bt < batch * seq; ++bt) {
          float* prow = dpos + (bt % seq) * dim;
          const float* d = dout + bt * dim;
          for (int64_t c = c0; c < c1; ++c) prow[c] += d[c];
        }
      }
    }
  }

  // ---- MoE dispatch / combine --------------------------------------------------------------------------
  void gather_rows(float* dst, const float* src, const int32_t* index, const float* scale, int64_t rows,
                   int64_t cols) override {
    bool bf16_only;
    uint16_t* const rounded = produced(dst, rows * cols, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = src + static_cast<int64_t>(index[r]) * cols;
      if (!scale && bf16_only) {  // the source row rounded as it is
        to_bf16(rounded + r * cols, s, cols);
        continue;
      }
      float* d = bf16_only ? scratch_floats(cols) : dst + r * cols;
      if (scale) {
        const float w = scale[r];
        for (int64_t c = 0; c < cols; ++c) d[c] = w * s[c];
      } else {
        std::memcpy(d, s, cols * sizeof(float));
      }
      if (rounded) to_bf16(rounded + r * cols, d, cols);
    }
  }
  void combine_rows(float* out, const float* src, const int64_t* offsets, const int32_t* rows, const float* weight,
                    int64_t n, int64_t cols) override {
    written(out, n * cols);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float* o = out + i * cols;
      for (int64_t j = offsets[i]; j < offsets[i + 1]; ++j) {
        const int64_t r = rows[j];
        const float* s = src + r * cols;
        const float w = weight ? weight[r] : 1.f;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) o[c] += w * s[c];
      }
    }
  }
  // One dot product, the same code for row_dots and combine_rows_backward (so they agree bitwise).
  static float row_dot(const float* x, const float* y, int64_t cols) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) s += x[c] * y[c];
    return s;
  }
  void combine_rows_backward(float* dsrc, float* dweight, const float* dout, const int32_t* index,
                             const float* weight, const float* src, int64_t rows, int64_t cols) override {
    written(dweight, rows);
    bool bf16_only;
    uint16_t* const rounded = produced(dsrc, rows * cols, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = dout + static_cast<int64_t>(index[r]) * cols;
      dweight[r] = row_dot(g, src + r * cols, cols);
      float* d = bf16_only ? scratch_floats(cols) : dsrc + r * cols;
      const float w = weight[r];
      for (int64_t c = 0; c < cols; ++c) d[c] = w * g[c];
      if (rounded) to_bf16(rounded + r * cols, d, cols);
    }
  }
  void row_dots(float* out, const float* a, const int32_t* index, const float* b, int64_t rows,
                int64_t cols) override {
    written(out, rows);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      out[r] = row_dot(a + static_cast<int64_t>(index[r]) * cols, b + r * cols, cols);
    }
  }

  // ---- reductions -----------------------------------------------------------------------------------------
  void route(const RouterShape& shape, const float* logits, float* probs, const RoutingState& state) override {
    written(probs, shape.tokens() * shape.experts);
    cpu::route(shape, logits, probs, state);
  }
  void router_statistics(const RouterShape& shape, const float* logits, const float* probs,
                         const RoutingState& state, double* out) override {
    cpu::router_statistics(shape, logits, probs, state, out);
  }
  void router_backward(const RouterShape& shape, float* dlogits, const float* logits, const float* probs,
                       const float* dweight, const RoutingState& state, const RouterLossScales& scales) override {
    written(dlogits, shape.tokens() * shape.experts);
    cpu::router_backward(shape, dlogits, logits, probs, dweight, state, scales);
  }
  void jitter(float* out, const float* in, int64_t n, uint64_t seed, float eps) override {
    written(out, n);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = in[i] * jitter_factor(seed, i, eps);
  }

  void bias_backward(float* dbias, const float* dout, int64_t rows, int64_t cols) override {
    written(dbias, cols);
#pragma omp parallel
    {
      int64_t c0, c1;
      chunk_range(cols, omp_get_num_threads(), omp_get_thread_num(), c0, c1);
      for (int64_t r = 0; r < rows; ++r) {
        const float* d = dout + r * cols;
        for (int64_t c = c0; c < c1; ++c) dbias[c] += d[c];
      }
    }
  }

  void layernorm_forward(float* out, float* mean, float* rstd, const float* in, const float* weight,
                         const float* bias, int64_t rows, int64_t cols, float eps) override {
    written(mean, rows);
    written(rstd, rows);
    bool bf16_only;
    uint16_t* const rounded = produced(out, rows * cols, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = in + r * cols;
      float* y = bf16_only ? scratch_floats(cols) : out + r * cols;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += x[c];
      const float mu = static_cast<float>(sum / cols);
      double var = 0.0;
#pragma omp simd reduction(+ : var)
      for (int64_t c = 0; c < cols; ++c) var += static_cast<double>(x[c] - mu) * (x[c] - mu);
      const float rs = static_cast<float>(1.0 / std::sqrt(var / cols + eps));
      for (int64_t c = 0; c < cols; ++c) y[c] = (x[c] - mu) * rs * weight[c] + (bias ? bias[c] : 0.f);
      if (rounded) to_bf16(rounded + r * cols, y, cols);
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
  void layernorm_backward(float* din, float* dweight, float* dbias, const float* dout, const float* in,
                          const float* weight, const float* mean, const float* rstd, int64_t rows,
                          int64_t cols) override {
    written(din, rows * cols);
    written(dweight, cols);
    if (dbias) written(dbias, cols);
    // dweight/dbias are reductions over rows: each thread sums its static block of rows into a private buffer,
    // and the buffers are added in thread order.
    const int nthreads = threads_;
    std::vector<float> partial(static_cast<size_t>(nthreads) * 2 * cols, 0.f);
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      int64_t r0, r1;
      chunk_range(rows, omp_get_num_threads(), tid, r0, r1);
      float* pw = partial.data() + static_cast<size_t>(tid) * 2 * cols;
      float* pb = pw + cols;
      for (int64_t r = r0; r < r1; ++r) {
        const float* x = in + r * cols;
        const float* dy = dout + r * cols;
        float* dx = din + r * cols;
        const float mu = mean[r], rs = rstd[r];
        // dxhat = dy * w; dx = rs * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
        for (int64_t c = 0; c < cols; ++c) {
          const float xhat = (x[c] - mu) * rs;
          const float dxhat = dy[c] * weight[c];
          sum_dxhat += dxhat;
          sum_dxhat_xhat += static_cast<double>(dxhat) * xhat;
          pw[c] += dy[c] * xhat;
          pb[c] += dy[c];
        }
        const float m1 = static_cast<float>(sum_dxhat / cols), m2 = static_cast<float>(sum_dxhat_xhat / cols);
        for (int64_t c = 0; c < cols; ++c) {
          const float xhat = (x[c] - mu) * rs;
          dx[c] += rs * (dy[c] * weight[c] - m1 - xhat * m2);
        }
      }
    }
    for (int t = 0; t < nthreads; ++t) {
      const float* pw = partial.data() + static_cast<size_t>(t) * 2 * cols;
      for (int64_t c = 0; c < cols; ++c) {
        dweight[c] += pw[c];
        if (dbias) dbias[c] += pw[cols + c];
      }
    }
  }
  void rmsnorm_forward(float* out, float* rstd, const float* in, const float* weight, int64_t rows, int64_t cols,
                       float eps) override {
    written(rstd, rows);
    bool bf16_only;
    uint16_t* const rounded = produced(out, rows * cols, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = in + r * cols;
      float* y = bf16_only ? scratch_floats(cols) : out + r * cols;
      double ss = 0.0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) ss += static_cast<double>(x[c]) * x[c];
      const float rs = static_cast<float>(1.0 / std::sqrt(ss / cols + eps));
      for (int64_t c = 0; c < cols; ++c) y[c] = x[c] * rs * weight[c];
      if (rounded) to_bf16(rounded + r * cols, y, cols);
      rstd[r] = rs;
    }
  }
  void rmsnorm_backward(float* din, float* dweight, const float* dout, const float* in, const float* weight,
                        const float* rstd, int64_t rows, int64_t cols) override {
    written(din, rows * cols);
    written(dweight, cols);
    const int nthreads = threads_;
    std::vector<float> partial(static_cast<size_t>(nthreads) * cols, 0.f);
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      int64_t r0, r1;
      chunk_range(rows, omp_get_num_threads(), tid, r0, r1);
      float* pw = partial.data() + static_cast<size_t>(tid) * cols;
      for (int64_t r = r0; r < r1; ++r) {
        const float* x = in + r * cols;
        const float* dy = dout + r * cols;
        float* dx = din + r * cols;
        const float rs = rstd[r];
        // y = xhat * w, xhat = x * rs; dx = rs * (dxhat - xhat * mean(dxhat * xhat))
        double sum_dxhat_xhat = 0.0;
#pragma omp simd reduction(+ : sum_dxhat_xhat)
        for (int64_t c = 0; c < cols; ++c) {
          const float xhat = x[c] * rs;
          sum_dxhat_xhat += static_cast<double>(dy[c] * weight[c]) * xhat;
          pw[c] += dy[c] * xhat;
        }
        const float m2 = static_cast<float>(sum_dxhat_xhat / cols);
        for (int64_t c = 0; c < cols; ++c) dx[c] += rs * (dy[c] * weight[c] - x[c] * rs * m2);
      }
    }
    for (int t = 0; t < nthreads; ++t)
      for (int64_t c = 0; c < cols; ++c) dweight[c] += partial[static_cast<size_t>(t) * cols + c];
  }

  void head_rmsnorm_forward(float* x, float* saved, float* rstd, const float* weight, int64_t rows,
                            int64_t row_stride, int64_t heads, int64_t head_dim, float eps) override {
    written(x, (rows - 1) * row_stride + heads * head_dim);
    written(saved, rows * heads * head_dim);
    written(rstd, rows * heads);
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < rows * heads; ++q) {
      float* v = x + (q / heads) * row_stride + (q % heads) * head_dim;
      float* keep = saved + q * head_dim;
      double ss = 0.0;
      for (int64_t c = 0; c < head_dim; ++c) {
        keep[c] = v[c];
        ss += static_cast<double>(v[c]) * v[c];
      }
      const float rs = static_cast<float>(1.0 / std::sqrt(ss / head_dim + eps));
      for (int64_t c = 0; c < head_dim; ++c) v[c] = keep[c] * rs * weight[c];
      rstd[q] = rs;
    }
  }
  void head_rmsnorm_backward(float* dx, float* dweight, const float* saved, const float* weight, const float* rstd,
                             int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim) override {
    written(dx, (rows - 1) * row_stride + heads * head_dim);
    written(dweight, head_dim);
    const int nthreads = threads_;
    std::vector<float> partial(static_cast<size_t>(nthreads) * head_dim, 0.f);
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      int64_t q0, q1;
      chunk_range(rows * heads, omp_get_num_threads(), tid, q0, q1);
      float* pw = partial.data() + static_cast<size_t>(tid) * head_dim;
      for (int64_t q = q0; q < q1; ++q) {
        float* g = dx + (q / heads) * row_stride + (q % heads) * head_dim;
        const float* x = saved + q * head_dim;
        const float rs = rstd[q];
        // y = xhat * w, xhat = x * rs; dx = rs * (dxhat - xhat * mean(dxhat * xhat))
        double sum_dxhat_xhat = 0.0;
        for (int64_t c = 0; c < head_dim; ++c) {
          const float xhat = x[c] * rs;
          sum_dxhat_xhat += static_cast<double>(g[c] * weight[c]) * xhat;
          pw[c] += g[c] * xhat;
        }
        const float m2 = static_cast<float>(sum_dxhat_xhat / head_dim);
        for (int64_t c = 0; c < head_dim; ++c) g[c] = rs * (g[c] * weight[c] - x[c] * rs * m2);
      }
    }
    for (int t = 0; t < nthreads; ++t)
      for (int64_t c = 0; c < head_dim; ++c) dweight[c] += partial[static_cast<size_t>(t) * head_dim + c];
  }

  void softmax_rows(float* x, int64_t rows, int64_t cols, float scale) override {
    written(x, rows * cols);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* s = x + r * cols;
      float mx = -INFINITY;
      for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, s[j] * scale);
      double sum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        s[j] = std::exp(s[j] * scale - mx);
        sum += s[j];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int64_t j = 0; j < cols; ++j) s[j] *= inv;
    }
  }
  void causal_softmax_forward(float* scores, float scale, int64_t count, int64_t seq) override {
    uint16_t* const rounded = produced(scores, count * seq * seq);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < count * seq; ++row) {
      const int64_t t = row % seq;
      float* s = scores + row * seq;
      float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, s[j] * scale);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j <= t; ++j) {
        s[j] = vec::fast_exp(s[j] * scale - mx);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      for (int64_t j = 0; j <= t; ++j) s[j] *= inv;
      for (int64_t j = t + 1; j < seq; ++j) s[j] = 0.f;
      if (rounded) to_bf16(rounded + row * seq, s, seq);
    }
  }
  void causal_softmax_backward(float* dprobs, const float* probs, float scale, int64_t count,
                               int64_t seq) override {
    bool bf16_only;
    uint16_t* const rounded = produced(dprobs, count * seq * seq, &bf16_only);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < count * seq; ++row) {
      const int64_t t = row % seq;
      const float* d = dprobs + row * seq;
      float* ds = bf16_only ? scratch_floats(seq) : dprobs + row * seq;  // over d, or beside it
      const float* p = probs + row * seq;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j <= t; ++j) dot += d[j] * p[j];
      for (int64_t j = 0; j <= t; ++j) ds[j] = scale * p[j] * (d[j] - dot);
      for (int64_t j = t + 1; j < seq; ++j) ds[j] = 0.f;
      if (rounded) to_bf16(rounded + row * seq, ds, seq);
    }
  }
  // Per row: max, then exp(z - max) (kept in place when a gradient is wanted) and its sum in double, then the
  // gradient rescales in place. With AVX-512 the first two passes run 16 lanes at a time (vec::fast_exp16); the
  // lanes are combined in a fixed order, so the result is deterministic. In a declared region under bf16,
  // the gradient (2048 x 8192 for the benchmark models) is also rounded row by row while the row is in cache: the
  // output head's two backward products take that copy instead of rounding 64 MB again.
  void softmax_cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t rows, int64_t vocab,
                             float grad_scale) override {
    const bool keep = grad_scale != 0.f;
    written(losses, rows);
    bool bf16_only = false;  // the gradient goes to its bf16 copy only: the exponentials go to scratch, not over z
    uint16_t* const rounded = keep ? produced(logits, rows * vocab, &bf16_only) : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = logits + r * vocab;
      float* g = bf16_only ? scratch_floats(vocab) : logits + r * vocab;  // exp(z - max), then the gradient
      const int32_t target = targets[r];
      int64_t j0 = 0;
      float mx = -INFINITY;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
      const int64_t body = vocab - vocab % 16;
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < body; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(z + j));
      mx = _mm512_reduce_max_ps(vmax);
      for (int64_t j = body; j < vocab; ++j) mx = std::max(mx, z[j]);
#else
      for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, z[j]);
#endif
      const float target_logit = target >= 0 ? z[target] : 0.f;
      double sum = 0.0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
      __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();  // 8 + 8 double lanes
      const __m512 vmx = _mm512_set1_ps(mx);
      for (int64_t j = 0; j < body; j += 16) {
        const __m512 e = vec::fast_exp16(_mm512_sub_ps(_mm512_loadu_ps(z + j), vmx));
        if (keep) _mm512_storeu_ps(g + j, e);
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
      }
      sum = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
      j0 = body;
#endif
      for (int64_t j = j0; j < vocab; ++j) {
        const float e = vec::fast_exp(z[j] - mx);
        if (keep) g[j] = e;
        sum += e;
      }
      const double log_sum = std::log(sum);
      losses[r] = target >= 0 ? static_cast<float>(log_sum - (target_logit - mx)) : 0.f;
      if (keep) {
        if (target < 0) {
          std::memset(g, 0, vocab * sizeof(float));
        } else {
          const float factor = static_cast<float>(grad_scale / sum);
          for (int64_t j = 0; j < vocab; ++j) g[j] *= factor;
          g[target] -= grad_scale;
        }
        if (rounded) to_bf16(rounded + r * vocab, g, vocab);
      }
    }
  }
  // Sum (or sum of squares) of a (rows, cols) block with row stride ld, on the calling thread: 16 running sums
  // (lane j takes columns j, j + 16, ... of every row) combined in a fixed order after the columns off the lanes.
  // Vectorised, and the order depends on the shape alone. One running sum would be bound by the add latency.
  static double lane_sum(const float* x, int64_t rows, int64_t cols, int64_t ld, bool squares) {
    constexpr int kLanes = 16;
    double lanes[kLanes] = {};
    double s = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * ld;
      int64_t i = 0;
      for (; i + kLanes <= cols; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const double xj = row[i + j];
          lanes[j] += squares ? xj * xj : xj;
        }
      for (; i < cols; ++i) s += squares ? static_cast<double>(row[i]) * row[i] : row[i];
    }
    for (int j = 0; j < kLanes; ++j) s += lanes[j];
    return s;
  }
  static double block_sum_squares(const float* x, int64_t rows, int64_t cols, int64_t ld) {
    return lane_sum(x, rows, cols, ld, true);
  }
  double sum(const float* x, int64_t n) override { return reduce(x, n, false); }
  double sum_squares(const float* x, int64_t n) override { return reduce(x, n, true); }
  double reduce(const float* x, int64_t n, bool squares) {
    const int nthreads = threads_;
    std::vector<double> partial(nthreads, 0.0);
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num();
      int64_t i0, i1;
      chunk_range(n, omp_get_num_threads(), tid, i0, i1);
      partial[tid] = lane_sum(x + i0, 1, i1 - i0, 0, squares);  // deterministic for a given thread count
    }
    double total = 0.0;
    for (double s : partial) total += s;
    return total;
  }
  void adamw_update(float* param, float* grad, float* m, float* v, int64_t n, float lr, float beta1, float beta2,
                    float eps, float weight_decay, float grad_scale, int64_t step, bool zero_grad) override {
    const float bc1 = 1.f - static_cast<float>(std::pow(static_cast<double>(beta1), static_cast<double>(step)));
    const float bc2 = 1.f - static_cast<float>(std::pow(static_cast<double>(beta2), static_cast<double>(step)));
    const float step_size = lr / bc1;
    const float bc2_sqrt = std::sqrt(bc2);
    const float decay = 1.f - lr * weight_decay;
    written(grad, n);
    written(m, n);
    written(v, n);
    uint16_t* const rounded = produced(param, n);  // the next step's bf16 operands, rounded while in cache
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t i1 = std::min(n, i0 + kChunk);
        for (int64_t i = i0; i < i1; ++i) {
          const float g = grad[i] * grad_scale;
          if (zero_grad) grad[i] = 0.f;
          m[i] = beta1 * m[i] + (1.f - beta1) * g;
          v[i] = beta2 * v[i] + (1.f - beta2) * g * g;
          param[i] = param[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
        }
        if (rounded) to_bf16_streaming(rounded + i0, param + i0, i1 - i0);
      }
      _mm_sfence();  // the streaming stores are visible before the copy is read
    }
  }

 private:
  int threads_ = 1;
  struct RopeTable {
    int64_t seq = -1, head_dim = 0;
    float theta = 0;
    int64_t first_position = 0;
    std::vector<float> cos, sin;
  } rope_table_;
  Precision precision_ = Precision::FP32;
  MatmulCache matmuls_;
  OperandCache operands_;
  GemmProfile profile_;
  std::mutex sizes_mutex_;
  std::map<void*, size_t> sizes_;  // live allocations
  size_t live_bytes_ = 0, peak_bytes_ = 0;

 public:
  size_t peak_allocated_bytes() const override { return peak_bytes_; }
};

}  // namespace

std::unique_ptr<CpuKernelBackend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace moelab
