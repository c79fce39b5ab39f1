#pragma once
// An Arena is one backend allocation carved into named, shaped views. It is sized once: the caller describes
// every view with `reserve`, then `allocate` makes the single allocation and `view` hands out the pieces.
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"

namespace moelab {

class Arena {
 public:
  explicit Arena(Backend& backend) : backend_(&backend) {}
  ~Arena() { release(); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Registers a view; returns its offset. Offsets are rounded to 16 floats (64 bytes) for aligned rows.
  int64_t reserve(const std::string& name, Shape shape) {
    MOELAB_CHECK(base_ == nullptr, "arena already allocated");
    MOELAB_CHECK(index_.count(name) == 0, "duplicate arena slot " + name);
    const int64_t offset = size_;
    size_ += (shape.numel() + 15) / 16 * 16;
    index_[name] = static_cast<int64_t>(slots_.size());
    slots_.push_back({name, shape, offset});
    return offset;
  }
  void allocate() {
    MOELAB_CHECK(base_ == nullptr, "arena allocated twice");
    base_ = backend_->alloc(static_cast<size_t>(size_));
  }
  Tensor view(const std::string& name) const {
    auto it = index_.find(name);
    MOELAB_CHECK(it != index_.end(), "no arena slot " + name);
    const auto& s = slots_[it->second];
    return Tensor(base_ + s.offset, s.shape);
  }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  float* data() const { return base_; }
  int64_t size() const { return size_; }

 private:
  void release() {
    if (base_) backend_->free(base_);
    base_ = nullptr;
  }
  struct Slot {
    std::string name;
    Shape shape;
    int64_t offset;
  };
  Backend* backend_;
  float* base_ = nullptr;
  int64_t size_ = 0;
  std::vector<Slot> slots_;
  std::map<std::string, int64_t> index_;
};

}  // namespace moelab
