#pragma once
// A Tensor is a non-owning view: a pointer into an arena plus the shape it carries. Row-major, contiguous.
// Layers take Tensors and check the shapes they are given, so a wrong wiring fails loudly at the first call.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/error.h"

namespace moelab {

constexpr int kMaxRank = 4;

struct Shape {
  std::array<int64_t, kMaxRank> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> list) {
    MOELAB_CHECK(list.size() <= kMaxRank, "rank too large");
    for (int64_t d : list) dims[rank++] = d;
  }
  int64_t operator[](int i) const { return dims[i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  bool operator==(const Shape& other) const {
    if (rank != other.rank) return false;
    for (int i = 0; i < rank; ++i)
      if (dims[i] != other.dims[i]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + ")";
  }
};

struct Tensor {
  float* data = nullptr;
  Shape shape;

  Tensor() = default;
  Tensor(float* d, Shape s) : data(d), shape(s) {}
  int64_t numel() const { return shape.numel(); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.rank + i : i]; }
  int rank() const { return shape.rank; }
  bool empty() const { return data == nullptr; }
  // Rows when the tensor is read as a matrix (all leading dims collapsed) x the last dim.
  int64_t rows() const { return shape.rank == 0 ? 1 : numel() / shape[shape.rank - 1]; }
  int64_t cols() const { return shape.rank == 0 ? 1 : shape[shape.rank - 1]; }
  Tensor reshaped(Shape s) const {
    MOELAB_CHECK(s.numel() == numel(), "reshape " + shape.str() + " -> " + s.str());
    return Tensor(data, s);
  }
};

// Shape assertions used at layer boundaries.
inline void expect_shape(const Tensor& t, const Shape& s, const char* what) {
  if (!(t.shape == s)) fail_check("shape", __FILE__, __LINE__, std::string(what) + ": got " + t.shape.str() +
                                                                   ", expected " + s.str());
}

}  // namespace moelab
