#pragma once
// Full fine-tuning of a checkpoint on a task's train split, then zero-shot evaluation on its test split
// (docs/tasks.md). Each training sequence is [eos] context gold-choice; the loss counts only the gold choice's
// tokens (targets elsewhere are -1, which the engine's cross-entropy skips), averaged over the answer tokens of
// the micro-batch. Training runs through Trainer (AdamW, warm-up then cosine, clipping) from fresh optimizer state.
#include <string>
#include <vector>

#include "eval/tasks.h"
#include "sweep/results.h"

namespace moelab {

struct FinetuneOptions {
  int64_t steps = 100;
  double lr = 3e-4;        // peak; warm-up over 10% of the steps, cosine to lr / 10
  int64_t batch = 8;       // sequences per step
  uint64_t seed = 1;       // order of the training items
  int threads = 0;         // 0: all cores
  int64_t limit = 0;       // score at most this many test items; 0: all
  int64_t eval_batch = 8;  // sequences per forward when scoring
  std::string out;         // output directory: checkpoint/, finetune.json, downstream.json
};

struct FinetuneResult {
  DownstreamRecord record;  // mode "finetune", the run's id, scored on the test split
  std::vector<double> losses;  // training loss per step (mean over answer tokens)
  std::string checkpoint_dir;  // <out>/checkpoint
};

// Builds the training token rows for items: tokens (rows, T) and targets (rows, T), targets -1 except at the
// positions that predict the gold choice's tokens. Left-truncates the context to fit T + 1 tokens.
void answer_only_batch(const std::vector<const TaskItem*>& items, const TextCodec& codec, int64_t T,
                       std::vector<int32_t>& tokens, std::vector<int32_t>& targets);

// Fine-tunes `checkpoint` (a dense or MoE run or checkpoint directory) on task's train split, evaluates on its
// test split, writes <out>/checkpoint (atomically, with the original config and seq_len) and <out>/finetune.json.
FinetuneResult finetune_on_task(const std::string& checkpoint, const Task& task, const FinetuneOptions& options,
                                std::ostream& log);

}  // namespace moelab
