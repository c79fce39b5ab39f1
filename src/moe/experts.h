#pragma once
// The experts of one MoE layer: the rows each expert computes on, expert-major, through fc1, the activation and fc2,
// each matrix one grouped GEMM over the per-expert slices; the backward in one batch of independent products per
// stage. Which rows these are (the layer's own, or those other ranks sent) is the dispatcher's business
// (moe/dispatcher.h): the experts see only rows and offsets.
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "moe/moe.h"

namespace moelab {

// The rows the experts of this rank compute on, expert-major; offsets (experts + 1) delimit each expert's.
struct ExpertRows {
  const std::vector<int64_t>& offsets;
  int64_t experts;  // this rank's experts (d.local_experts()), whose weights are w.fc1_w[0..experts) ...
  Tensor x, y;      // (rows, C) inputs and outputs of the forward
};

// y (rows, C) = fc2(act(fc1(x))) per expert; the pre-activations and activations go to a.pre, a.act.
void experts_forward(Backend& be, const MoeDims& d, const MoeWeights& w, const MoeActivations& a,
                     const ExpertRows& rows);
// dy_rows (rows, C): the rows' output gradients; dx_rows (rows, C) receives their input gradients; the experts'
// weight gradients g accumulate (or are overwritten, those of experts without rows with zeros, with
// !accumulate_dweights), scaled by 1/sqrt(E) with d.expert_grad_scale. dweight_sq (2 per expert, backend memory,
// may be null) receives each expert's fc1 and fc2 weight gradient's sum of squares.
void experts_backward(Backend& be, const MoeDims& d, const MoeWeights& g, const MoeWeights& w,
                      const MoeActivations& a, const MoeScratch& s, const ExpertRows& rows, Tensor dy_rows,
                      Tensor dx_rows, bool accumulate_dweights, double* dweight_sq);

}  // namespace moelab
