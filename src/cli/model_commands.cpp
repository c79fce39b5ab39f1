#include "cli/model_commands.h"

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/report_errors.h"
#include "core/error.h"
#include "eval/generate.h"
#include "eval/inference.h"

namespace moelab {

void add_model_commands(CLI::App& app) {
  // eval
  struct EvalArgs {
    std::string checkpoint;
    std::vector<std::string> inputs;
    int64_t batches = 0;
    int threads = 0;
    bool json = false;
  };
  auto eval_args = std::make_shared<EvalArgs>();
  auto* eval = app.add_subcommand("eval", "perplexity of a checkpoint on text, JSONL, directories or token shards");
  eval->add_option("-k,--checkpoint", eval_args->checkpoint, "checkpoint directory, or a run directory")->required();
  eval->add_option("inputs", eval_args->inputs, "text/JSONL files, directories of them, or token shards (.bin)")
      ->required();
  eval->add_option("--batches", eval_args->batches, "score at most this many batches per input (0: all)");
  eval->add_option("--threads", eval_args->threads, "CPU threads (0: all cores)");
  eval->add_flag("--json", eval_args->json, "print one JSON object per input");
  eval->footer("Example:\n  moelab eval --checkpoint runs/quickstart data/corpus/val data/prepared/ood_code.bin");
  eval->callback([eval_args] {
    run_reporting_errors([&] {
      LoadedModel lm = load_model(eval_args->checkpoint, eval_args->threads, 8);
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
  });

  // generate
  struct GenerateArgs {
    std::string checkpoint, prompt;
    SamplingOptions sampling;
    uint64_t seed = 1;
    int threads = 0;
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
  gen->add_option("--threads", gen_args->threads, "CPU threads (0: all cores)");
  gen->footer("Example:\n  moelab generate --checkpoint runs/quickstart --prompt \"In the beginning\" -n 200 -t 0.8 --top-p 0.95");
  gen->callback([gen_args] {
    run_reporting_errors([&] {
      LoadedModel lm = load_model(gen_args->checkpoint, gen_args->threads, 1);
      TextCodec codec(lm.config);
      std::vector<int32_t> prompt = codec.encode(gen_args->prompt);
      if (prompt.empty()) throw Error("the prompt encodes to no tokens");
      const int64_t room = lm.config.model.seq_len - static_cast<int64_t>(prompt.size());
      if (room <= 0)
        throw Error("the prompt is " + std::to_string(prompt.size()) + " tokens, the model's context is " +
                    std::to_string(lm.config.model.seq_len));
      SamplingOptions options = gen_args->sampling;
      options.max_tokens = std::min(options.max_tokens, room);
      options.stop_token = codec.end_of_document();
      Generator generator(lm.config.model, *lm.backend, lm.model->params());
      Rng rng(gen_args->seed);
      std::cout << gen_args->prompt << std::flush;
      // Decode incrementally: print whatever new text the ids so far decode to (pieces can span bytes).
      std::vector<int32_t> ids;
      std::string printed;
      generator.generate(prompt, options, rng, [&](int32_t id) {
        if (id == options.stop_token) return;
        ids.push_back(id);
        const std::string text = codec.decode(ids);
        if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
          std::cout << text.substr(printed.size()) << std::flush;
          printed = text;
        }
      });
      std::cout << "\n";
    });
  });
}

}  // namespace moelab
