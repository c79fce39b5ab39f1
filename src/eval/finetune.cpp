#include "eval/finetune.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <ostream>

#include "core/error.h"
#include "core/io.h"
#include "core/rng.h"
#include "core/timer.h"
#include "model/param_layout.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace moelab {
namespace fs = std::filesystem;

namespace {

// [eos] context gold-choice, and the index of the first gold token in it.
std::vector<int32_t> answer_sequence(const TaskItem& item, const TextCodec& codec, size_t& first_answer) {
  std::vector<int32_t> full;
  if (codec.end_of_document() >= 0) full.push_back(codec.end_of_document());
  const auto context = codec.encode(item.context);
  full.insert(full.end(), context.begin(), context.end());
  first_answer = full.size();
  const auto answer = codec.encode(item.choices[item.gold]);
  full.insert(full.end(), answer.begin(), answer.end());
  return full;
}

}  // namespace

void answer_only_batch(const std::vector<const TaskItem*>& items, const TextCodec& codec, int64_t T,
                       std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
  const int32_t pad = std::max(codec.end_of_document(), 0);
  tokens.assign(items.size() * static_cast<size_t>(T), pad);
  targets.assign(items.size() * static_cast<size_t>(T), -1);
  for (size_t row = 0; row < items.size(); ++row) {
    size_t first = 0;
    std::vector<int32_t> full = answer_sequence(*items[row], codec, first);
    const int64_t answer_len = static_cast<int64_t>(full.size() - first);
    if (answer_len < 1 || answer_len > T)
      throw Error("item '" + items[row]->id + "': its gold choice is " + std::to_string(answer_len) +
                  " tokens; fine-tuning needs 1 to " + std::to_string(T));
    const int64_t keep = std::min<int64_t>(static_cast<int64_t>(full.size()), T + 1);  // cut the context's left
    full.erase(full.begin(), full.end() - keep);
    const int64_t first_target = keep - answer_len;
    int32_t* tok = tokens.data() + row * static_cast<size_t>(T);
    int32_t* tgt = targets.data() + row * static_cast<size_t>(T);
    for (int64_t t = 0; t + 1 < keep; ++t) tok[t] = full[t];
    for (int64_t t = first_target; t < keep; ++t) tgt[t - 1] = full[t];  // position t-1 predicts token t
  }
}

FinetuneResult finetune_on_task(const std::string& checkpoint, const Task& task, const FinetuneOptions& options,
                                std::ostream& log) {
  Timer timer;
  const RunLocation run = locate_run(checkpoint);
  std::vector<const TaskItem*> train_items = task.split("train");
  if (train_items.empty())
    throw Error("task '" + task.name + "' (" + task.path + ") has no train split; fine-tuning needs items with "
                "\"split\": \"train\"");
  if (task.split("test").empty())
    throw Error("task '" + task.name + "' (" + task.path + ") has no test split to evaluate the fine-tuned model on");
  if (options.out.empty()) throw Error("fine-tuning needs an output directory (--out)");
  if (options.steps < 1 || options.batch < 1 || !(options.lr > 0))
    throw Error("fine-tuning needs --steps >= 1, --batch >= 1 and --lr > 0");

  const Config source = checkpoint_config(run.checkpoint_dir);
  const TextCodec codec(source);
  Config cfg = source;
  // Train on sequences only as long as the longest training item needs (positions do not change the parameter
  // layout except for learned position embeddings, which keep seq_len).
  if (source.model.pos != PosKind::Learned) {
    int64_t longest = 1;
    for (const TaskItem* item : train_items) {
      size_t first = 0;
      longest = std::max<int64_t>(longest, static_cast<int64_t>(answer_sequence(*item, codec, first).size()) - 1);
    }
    int64_t T = 16;
    while (T < longest) T *= 2;
    cfg.model.seq_len = std::min(T, source.model.seq_len);
  }
  // Items whose gold choice alone is longer than the model's context cannot be trained on (their context is cut
  // from the left, never the answer): left out, and said so.
  const size_t all_items = train_items.size();
  std::erase_if(train_items, [&](const TaskItem* item) {
    size_t first = 0;
    const auto full = answer_sequence(*item, codec, first);
    const auto answer_len = static_cast<int64_t>(full.size() - first);
    return answer_len < 1 || answer_len > cfg.model.seq_len;
  });
  if (train_items.empty())
    throw Error("task '" + task.name + "': every train item's gold choice is longer than the model's context of " +
                std::to_string(cfg.model.seq_len) + " tokens (or empty); fine-tune a model with a longer model.seq_len");
  if (train_items.size() < all_items)
    log << "moelab finetune: left out " << all_items - train_items.size() << " of " << all_items
        << " train items whose gold choice is longer than the model's context (" << cfg.model.seq_len << " tokens)\n";
  auto& t = cfg.train;
  t.batch_size = options.batch;
  t.grad_accum = 1;
  t.steps = options.steps;
  t.lr = options.lr;
  t.min_lr = options.lr / 10;
  t.warmup_steps = std::max<int64_t>(1, options.steps / 10);
  t.schedule = ScheduleKind::Cosine;
  t.seed = static_cast<int64_t>(options.seed);
  t.threads = options.threads;
  t.out_dir = options.out;

  auto backend = make_backend(cfg.train.backend, options.threads);
  Trainer trainer(cfg, *backend);
  trainer.load_weights(run.checkpoint_dir);
  // The same test items scored before fine-tuning, so the record carries the gain and not only the end point.
  TaskEvalOptions eval;
  eval.limit = options.limit;
  eval.batch = options.eval_batch;
  const DownstreamRecord before = evaluate_task(source.model, *backend, trainer.model().params(), codec, task, eval);
  log << "moelab finetune: " << run.run_id << " on " << task.name << ": " << train_items.size() << " train items, "
      << options.steps << " steps x " << options.batch << " sequences of " << cfg.model.seq_len << " tokens, lr "
      << options.lr << "\n"
      << std::flush;

  // Items in a seeded shuffled order, reshuffled every epoch.
  Rng order_rng(options.seed ^ 0xf17e7ee5ULL);
  std::vector<const TaskItem*> order = train_items;
  size_t next = order.size();
  std::vector<const TaskItem*> batch_items;
  const Trainer::BatchSource next_batch = [&](std::vector<int32_t>& tokens, std::vector<int32_t>& targets) {
    batch_items.clear();
    while (static_cast<int64_t>(batch_items.size()) < options.batch) {
      if (next == order.size()) {
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[order_rng.below(i)]);
        next = 0;
      }
      batch_items.push_back(order[next++]);
    }
    answer_only_batch(batch_items, codec, cfg.model.seq_len, tokens, targets);
  };
  FinetuneResult result;
  for (int64_t s = 0; s < options.steps; ++s) {
    const StepStats st = trainer.step(next_batch);
    result.losses.push_back(st.loss);
    if (st.step % 10 == 0 || st.step == options.steps || st.step == 1) {
      char line[160];
      std::snprintf(line, sizeof line, "step %4ld/%ld | answer loss %.4f | lr %.2e | grad-norm %.3f\n",
                    static_cast<long>(st.step), static_cast<long>(options.steps), st.loss, st.lr, st.grad_norm);
      log << line << std::flush;
    }
  }

  DownstreamRecord r = evaluate_task(source.model, *backend, trainer.model().params(), codec, task, eval);
  const fs::path out(options.out);
  result.checkpoint_dir = (fs::absolute(out) / "checkpoint").lexically_normal().string();
  r.mode = "finetune";
  r.run = run.run_id;
  r.checkpoint = result.checkpoint_dir;
  r.val_loss = run.val_loss;  // the source run's: accuracy is plotted against the pre-trained model's loss
  r.params = trainer.model().num_params();
  r.active_params = active_parameter_count(trainer.model().layout(), source.model);
  r.finetune = {{"source_checkpoint", run.checkpoint_dir},
                {"steps", options.steps},
                {"lr", options.lr},
                {"batch", options.batch},
                {"seq_len", cfg.model.seq_len},
                {"seed", options.seed},
                {"train_items", train_items.size()},
                {"first_loss", result.losses.front()},
                {"last_loss", result.losses.back()},
                {"before", {{"acc", before.acc},
                            {"acc_stderr", before.acc_stderr},
                            {"acc_norm", before.acc_norm},
                            {"acc_norm_stderr", before.acc_norm_stderr},
                            {"n", before.n},
                            {"correct", before.correct}}}};
  r.seconds = timer.seconds();
  result.record = r;

  // The fine-tuned checkpoint keeps the source's config (seq_len included) with the fine-tuning's train settings.
  Config saved = cfg;
  saved.model.seq_len = source.model.seq_len;
  fs::create_directories(out);
  CheckpointState state;
  state.step = trainer.steps_done();
  state.adam_step = trainer.optimizer().steps_taken();
  state.data_rng = trainer.data_rng().state();
  state.router_bias = trainer.model().router_biases();
  save_checkpoint(result.checkpoint_dir, saved, ParamLayout(saved.model), *backend, trainer.model().params(),
                  trainer.optimizer().first_moment(), trainer.optimizer().second_moment(), state);
  write_file_atomic((out / "config.toml").string(), to_toml(saved));
  nlohmann::ordered_json j;
  j["result"] = downstream_to_json(r);
  j["losses"] = result.losses;
  write_file_atomic((out / "finetune.json").string(), j.dump(2) + "\n");
  return result;
}

}  // namespace moelab
