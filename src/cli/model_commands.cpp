#include "cli/model_commands.h"

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/report_errors.h"
#include "core/error.h"
#include "core/io.h"
#include "eval/finetune.h"
#include "eval/generate.h"
#include "eval/inference.h"
#include "eval/tasks.h"

namespace moelab {

namespace {

// One table row per downstream result: task, mode, shots, n, acc +- se, acc_norm +- se, chance.
void print_downstream(const std::vector<DownstreamRecord>& records) {
  std::printf("%-22s %-18s %-9s %5s %5s %6s %16s %16s %7s\n", "run", "task", "mode", "shots", "used", "n", "acc",
              "acc_norm", "chance");
  for (const auto& r : records)
    std::printf("%-22s %-18s %-9s %5ld %5.1f %6ld %7.4f +- %.4f %7.4f +- %.4f %7.3f\n", r.run.c_str(), r.task.c_str(),
                r.mode.c_str(), static_cast<long>(r.shots), r.mean_shots, static_cast<long>(r.n), r.acc, r.acc_stderr,
                r.acc_norm, r.acc_norm_stderr, r.chance);
}

// `eval`: perplexity of a checkpoint on text or shards, or its accuracy on downstream tasks.
void add_eval_command(CLI::App& app) {
  struct EvalArgs {
    std::string checkpoint;
    std::vector<std::string> inputs;
    int64_t batches = 0;
    int threads = 0;
    std::string backend;
    bool json = false;
    std::string logits_of;
    // downstream tasks
    std::vector<std::string> tasks;
    std::vector<int64_t> shots{0};
    TaskEvalOptions task_options;
    std::string tasks_dir = default_tasks_dir();
    std::string results_db;
    bool no_record = false;
  };
  auto eval_args = std::make_shared<EvalArgs>();
  auto* eval = app.add_subcommand(
      "eval", "perplexity of a checkpoint on text/JSONL/shards, or its accuracy on multiple-choice tasks (--tasks)");
  eval->add_option("-k,--checkpoint", eval_args->checkpoint, "checkpoint directory, or a run directory")->required();
  eval->add_option("inputs", eval_args->inputs,
                   "perplexity mode: text/JSONL files, directories of them, or token shards (.bin)");
  eval->add_option("--batches", eval_args->batches, "perplexity: score at most this many batches per input (0: all)");
  eval->add_option("--threads", eval_args->threads, "CPU threads (0: all cores)");
  eval->add_option("--backend", eval_args->backend,
                   "backend to run on (cpu, cpu-strict); default: the checkpoint's train.backend");
  eval->add_flag("--json", eval_args->json, "print one JSON object per input / per task result");
  eval->add_option("--tasks", eval_args->tasks,
                   "downstream mode: task names in --tasks-dir (e.g. wordnet-cloze prose-lastword bible-paraphrase) "
                   "or JSONL task files (docs/tasks.md)");
  eval->add_option("--shots", eval_args->shots,
                   "examples from the task's train split primed before each item; several values evaluate each "
                   "(e.g. --shots 0 5)")
      ->check(CLI::NonNegativeNumber);
  eval->add_option("--limit", eval_args->task_options.limit, "score at most the first N test items per task (0: all)")
      ->check(CLI::NonNegativeNumber);
  eval->add_option("--seed", eval_args->task_options.seed, "seed of the few-shot sampling");
  eval->add_option("--split", eval_args->task_options.split, "split to score (default test)");
  eval->add_option("--batch", eval_args->task_options.batch, "sequences per forward when scoring")
      ->check(CLI::PositiveNumber);
  eval->add_option("--tasks-dir", eval_args->tasks_dir,
                   "where task names resolve (default $MOELAB_TASKS_DIR or data/tasks, built by scripts/fetch-corpus.sh)");
  eval->add_option("--results-db", eval_args->results_db,
                   "also record into this SQLite results store (table `downstream`); default: the sweep's "
                   "results.db when the run is <sweep>/runs/<name>");
  eval->add_flag("--no-record", eval_args->no_record, "print only: write neither <run>/downstream.json nor a database");
  eval->add_option("--logits-of", eval_args->logits_of,
                   "print the logits of one sequence as JSON {\"tokens\", \"logits\": [position][vocab]}: FILE "
                   "holds a JSON array of at most seq_len token ids (for comparing with other implementations, "
                   "e.g. scripts/hf-check.py)");
  eval->footer(
      "Examples:\n"
      "  moelab eval --checkpoint runs/quickstart data/corpus/val data/prepared/ood_code.bin\n"
      "  moelab eval --checkpoint runs/quickstart --tasks wordnet-cloze prose-lastword bible-paraphrase \\\n"
      "      --shots 0 5 --limit 300 --threads 2 --results-db runs/experiments/results.db\n"
      "Task mode scores each choice by the log-likelihood of its tokens given the (primed) context and reports\n"
      "acc (highest total log-likelihood) and acc_norm (highest log-likelihood per character of the choice),\n"
      "each with its binomial standard error. Results are merged into <run>/downstream.json and the results\n"
      "store's `downstream` table (docs/tasks.md).");
  on_run(eval, [eval_args] {
    if (!eval_args->logits_of.empty()) {
      const auto ids =
          nlohmann::json::parse(read_file(eval_args->logits_of, "token list")).get<std::vector<int32_t>>();
      LoadedModel lm = load_model(eval_args->checkpoint, eval_args->threads, 1, eval_args->backend);
      const int64_t T = lm.config.model.seq_len, V = lm.config.model.vocab_size;
      if (ids.empty() || static_cast<int64_t>(ids.size()) > T)
        throw Error("--logits-of: give 1 to " + std::to_string(T) + " (model.seq_len) token ids, not " +
                    std::to_string(ids.size()));
      std::vector<int32_t> window(T, 0);  // causal: what follows the ids does not change their logits
      std::copy(ids.begin(), ids.end(), window.begin());
      lm.model->forward(window.data(), nullptr, 1);
      const std::vector<float> logits = lm.model->download_logits();
      nlohmann::json rows = nlohmann::json::array();
      for (size_t t = 0; t < ids.size(); ++t)
        rows.push_back(std::vector<float>(logits.begin() + t * V, logits.begin() + (t + 1) * V));
      std::cout << nlohmann::json{{"tokens", ids}, {"logits", rows}}.dump() << "\n";
      return;
    }
    if (eval_args->inputs.empty() && eval_args->tasks.empty())
      throw Error("nothing to evaluate: give text/shard inputs (perplexity) or --tasks NAME... (accuracy); "
                  "see `moelab eval --help`");
    if (!eval_args->tasks.empty()) {
      const RunLocation run = locate_run(eval_args->checkpoint);
      const auto records = evaluate_checkpoint_on_tasks(eval_args->checkpoint, eval_args->tasks, eval_args->shots,
                                                        eval_args->task_options, eval_args->threads,
                                                        eval_args->tasks_dir);
      if (eval_args->json) {
        for (const auto& r : records) std::cout << downstream_to_json(r).dump() << "\n";
      } else {
        print_downstream(records);
      }
      if (!eval_args->no_record) {
        const std::string db = record_downstream(run, records, eval_args->results_db);
        std::fprintf(stderr, "recorded in %s/downstream.json%s%s\n", run.run_dir.c_str(), db.empty() ? "" : " and ",
                     db.c_str());
      }
      if (eval_args->inputs.empty()) return;
    }
    LoadedModel lm = load_model(eval_args->checkpoint, eval_args->threads, 8, eval_args->backend);
    for (const auto& input : eval_args->inputs) {
      const PerplexityResult r = evaluate_perplexity(lm, input, eval_args->batches);
      if (eval_args->json) {
        std::cout << nlohmann::json{{"input", r.input}, {"tokens", r.tokens}, {"loss", r.loss},
                                    {"perplexity", r.perplexity()}, {"bits_per_byte", r.bits_per_byte()}}
                         .dump()
                  << "\n";
      } else {
        std::printf("%-40s %10ld tokens  loss %.4f  perplexity %9.2f", r.input.c_str(),
                    static_cast<long>(r.tokens), r.loss, r.perplexity());
        if (r.bytes > 0) std::printf("  %.3f bits/byte", r.bits_per_byte());
        std::printf("\n");
      }
    }
  });
}

// `generate`: sample text from a checkpoint.
void add_generate_command(CLI::App& app) {
  struct GenerateArgs {
    std::string checkpoint, prompt;
    SamplingOptions sampling;
    uint64_t seed = 1;
    int threads = 0;
    std::string backend;
    bool ignore_eos = false;
  };
  auto gen_args = std::make_shared<GenerateArgs>();
  auto* gen = app.add_subcommand("generate", "sample text from a checkpoint (KV cache)");
  gen->add_option("-k,--checkpoint", gen_args->checkpoint, "checkpoint directory, or a run directory")->required();
  gen->add_option("-p,--prompt", gen_args->prompt, "text to continue")->required();
  gen->add_option("-n,--max-tokens", gen_args->sampling.max_tokens, "tokens to generate")->check(CLI::PositiveNumber);
  gen->add_option("-t,--temperature", gen_args->sampling.temperature, "sampling temperature; 0 = greedy")
      ->check(CLI::NonNegativeNumber);
  gen->add_option("--top-k", gen_args->sampling.top_k, "sample among the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  gen->add_option("--top-p", gen_args->sampling.top_p, "nucleus sampling mass in (0, 1]")->check(CLI::Range(1e-9, 1.0));
  gen->add_option("--seed", gen_args->seed, "random seed (same seed, same text)");
  gen->add_flag("--ignore-eos", gen_args->ignore_eos,
                "never end at the end-of-text token </s>: it is never sampled, so text goes on to -n tokens (as "
                "llama.cpp's --ignore-eos); by default generation stops there and the token is not printed");
  gen->add_option("--threads", gen_args->threads, "CPU threads (0: all cores)");
  gen->add_option("--backend", gen_args->backend,
                  "backend to run on (cpu, cpu-strict); default: the checkpoint's train.backend");
  gen->footer("Example:\n  moelab generate --checkpoint runs/quickstart --prompt \"In the beginning\" -n 200 -t 0.8 --top-p 0.95\n"
              "Prints the prompt and its continuation on stdout. Generation ends after -n tokens, at the model's\n"
              "context length, or at the end-of-text token </s> (said on stderr; --ignore-eos goes on past it).");
  on_run(gen, [gen_args] {
    LoadedModel lm = load_model(gen_args->checkpoint, gen_args->threads, 1, gen_args->backend);
    TextCodec codec(lm.config);
    std::vector<int32_t> prompt = codec.encode(gen_args->prompt);
    if (prompt.empty()) throw Error("the prompt encodes to no tokens");
    const int64_t room = lm.config.model.seq_len - static_cast<int64_t>(prompt.size());
    if (room <= 0)
      throw Error("the prompt is " + std::to_string(prompt.size()) + " tokens, the model's context is " +
                  std::to_string(lm.config.model.seq_len));
    SamplingOptions options = gen_args->sampling;
    options.max_tokens = std::min(options.max_tokens, room);
    if (gen_args->ignore_eos) options.banned_token = codec.end_of_document();
    else options.stop_token = codec.end_of_document();
    Generator generator(*lm.model);
    Rng rng(gen_args->seed);
    std::cout << gen_args->prompt << std::flush;
    // Decode incrementally: print whatever new text the ids so far decode to (pieces can span bytes).
    std::vector<int32_t> ids;
    std::string printed;
    const std::vector<int32_t> generated = generator.generate(prompt, options, rng, [&](int32_t id) {
      if (id == options.stop_token) return;
      ids.push_back(id);
      const std::string text = codec.decode(ids);
      if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
        std::cout << text.substr(printed.size()) << std::flush;
        printed = text;
      }
    });
    std::cout << "\n" << std::flush;
    if (!generated.empty() && generated.back() == options.stop_token)
      std::fprintf(stderr, "[end of text: </s> after %zu tokens; --ignore-eos goes on past it]\n",
                   generated.size() - 1);
  });
}

// `finetune`: fine-tune a checkpoint on a task's train split and score its test split.
void add_finetune_command(CLI::App& app) {
  struct FinetuneArgs {
    std::string checkpoint, task, results_db;
    std::string tasks_dir = default_tasks_dir();
    FinetuneOptions options;
    bool json = false, no_record = false;
  };
  auto ft_args = std::make_shared<FinetuneArgs>();
  auto* ft = app.add_subcommand("finetune",
                                "fine-tune a checkpoint on a task's train split (loss on answer tokens), score its test split");
  ft->add_option("-k,--checkpoint", ft_args->checkpoint, "checkpoint directory, or a run directory")->required();
  ft->add_option("--task", ft_args->task, "task name in --tasks-dir, or a JSONL task file with train and test items")
      ->required();
  ft->add_option("--steps", ft_args->options.steps, "optimizer steps")->check(CLI::PositiveNumber);
  ft->add_option("--lr", ft_args->options.lr, "peak learning rate (10% warm-up, cosine to lr/10)")
      ->check(CLI::PositiveNumber);
  ft->add_option("--batch", ft_args->options.batch, "sequences (items) per step")->check(CLI::PositiveNumber);
  ft->add_option("--out", ft_args->options.out, "output directory (default <run>/finetune-<task>)");
  ft->add_option("--limit", ft_args->options.limit, "score at most the first N test items (0: all)")
      ->check(CLI::NonNegativeNumber);
  ft->add_option("--seed", ft_args->options.seed, "seed of the training-item order");
  ft->add_option("--threads", ft_args->options.threads, "CPU threads (0: all cores)");
  ft->add_option("--tasks-dir", ft_args->tasks_dir, "where task names resolve (default data/tasks)");
  ft->add_option("--results-db", ft_args->results_db,
                 "also record into this results store (default: the sweep's results.db for a sweep run)");
  ft->add_flag("--json", ft_args->json, "print the result as JSON");
  ft->add_flag("--no-record", ft_args->no_record, "do not write <run>/downstream.json nor a database");
  ft->footer(
      "Example:\n"
      "  moelab finetune --checkpoint runs/quickstart --task bible-paraphrase --steps 60 --lr 3e-4 --threads 2\n"
      "Writes <out>/checkpoint (the fine-tuned weights, same config), <out>/finetune.json (result and loss\n"
      "curve), and records mode \"finetune\" for the source run in <run>/downstream.json and the results store.");
  on_run(ft, [ft_args] {
    const RunLocation run = locate_run(ft_args->checkpoint);
    const Task task = load_task(ft_args->task, ft_args->tasks_dir);
    FinetuneOptions options = ft_args->options;
    if (options.out.empty()) options.out = run.run_dir + "/finetune-" + task.name;
    const FinetuneResult r = finetune_on_task(ft_args->checkpoint, task, options, std::cout);
    if (ft_args->json) std::cout << downstream_to_json(r.record).dump() << "\n";
    else print_downstream({r.record});
    const auto& before = r.record.finetune["before"];
    std::printf("zero-shot on the same %ld items before fine-tuning: acc %.4f -> %.4f after (%+.4f)\n",
                static_cast<long>(r.record.n), before["acc"].get<double>(), r.record.acc,
                r.record.acc - before["acc"].get<double>());
    std::printf("fine-tuned checkpoint: %s\n", r.checkpoint_dir.c_str());
    if (!ft_args->no_record) {
      const std::string db = record_downstream(run, {r.record}, ft_args->results_db);
      std::fprintf(stderr, "recorded in %s/downstream.json%s%s\n", run.run_dir.c_str(), db.empty() ? "" : " and ",
                   db.c_str());
    }
  });
}

// `tasks`: list the downstream tasks.
void add_tasks_command(CLI::App& app) {
  auto tasks_dir = std::make_shared<std::string>(default_tasks_dir());
  auto* tasks = app.add_subcommand("tasks", "list the downstream tasks (built by scripts/fetch-corpus.sh)");
  tasks->add_option("--tasks-dir", *tasks_dir, "task directory (default $MOELAB_TASKS_DIR or data/tasks)");
  tasks->footer("Lists each task with its item counts per split; docs/tasks.md describes the format and how each\n"
                "built-in task is constructed.");
  on_run(tasks, [tasks_dir] {
    const auto names = task_names(*tasks_dir);
    if (names.empty())
      throw Error("no tasks in '" + *tasks_dir + "'; build them with scripts/fetch-corpus.sh (or python3 "
                  "scripts/corpus_tools.py tasks --corpus data/corpus --out " + *tasks_dir + ")");
    std::printf("%-22s %7s %7s %7s  %s\n", "task", "items", "train", "test", "file");
    for (const auto& name : names) {
      const Task t = load_task(name, *tasks_dir);
      std::printf("%-22s %7zu %7zu %7zu  %s\n", name.c_str(), t.items.size(), t.split("train").size(),
                  t.split("test").size(), t.path.c_str());
    }
  });
}

}  // namespace

void add_model_commands(CLI::App& app) {
  add_eval_command(app);
  add_generate_command(app);
  add_finetune_command(app);
  add_tasks_command(app);
}

}  // namespace moelab
