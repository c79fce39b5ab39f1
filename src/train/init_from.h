#pragma once
// Starting a run from another run's weights (`moelab train --init-from`, train.init_from): continued training, and
// sparse upcycling (Komatsuzaki et al. 2023), where a dense model's FFN becomes every expert of an MoE model.
#include <string>
#include <vector>

#include "config/config.h"
#include "model/param_layout.h"

namespace moelab {

struct InitFromReport {
  std::string checkpoint;           // the checkpoint directory read
  int64_t copied = 0;               // tensors taken over unchanged
  int64_t upcycled = 0;             // expert tensors made from a dense FFN
  std::vector<std::string> fresh;   // tensors left at the configured init (routers, shared experts)
};

// Overwrites `params` (host, laid out by `layout` = the whole target model's, holding its configured init) with
// the weights of `source` (a checkpoint directory, a run directory holding one, or a Hugging Face Llama / Mixtral
// directory, whose config.json must agree with this config on RoPE base, norm epsilon, tying and routing):
//  - a tensor of the same name is copied; its shape must agree;
//  - an MoE layer of the target whose source layer is dense gets the dense FFN in every routed expert: with G > 1
//    (expert width d_ff / G) the FFN's hidden units are cut into G slices and slice g goes to experts g, g + G, ...
//    (fc2's bias divided by G); the router and any shared experts keep the configured init.
// Anything else, a shape that differs, a tensor the target lacks or a source tensor left unused, throws one
// moelab::Error naming the tensor.
InitFromReport init_from_checkpoint(const std::string& source, const ModelConfig& target, const ParamLayout& layout,
                                    std::vector<float>& params);

}  // namespace moelab
