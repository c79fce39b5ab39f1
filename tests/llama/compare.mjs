// Runs a GGUF model in llama.cpp (node-llama-cpp, CPU) and prints, as JSON on stdout, one of:
// token mode, INPUT.json = {"tokens": [...], "prompt": [...], "n": N}:
//   {"logprobs": [[V log-probabilities after token 0], [... after token 1], ...],   (natural log; -1e30 for 0)
//    "greedy": [N token ids continuing the prompt greedily],
//    "vocab": V}
// text mode, INPUT.json = {"texts": ["...", ...], "prompt_text": "...", "n": N, "kv": "default" | "f32"}, as a
// user of llama.cpp would run it: text in, text out.
//   {"tokenized": [[ids of texts[0] by llama.cpp's tokenizer], ...],
//    "prompt": [ids of prompt_text], "greedy": [up to N ids, ending at an end-of-generation token],
//    "greedy_text": the greedy continuation detokenized, "kv": the KV cache types used}
// Usage: node compare.mjs MODEL.gguf INPUT.json
// tests/test_export.cpp compares these with moelab's own tokenizer, forward and `moelab generate`.
import fs from "node:fs";

const [modelPath, inputPath] = process.argv.slice(2);
if (!modelPath || !inputPath) {
  console.error("usage: node compare.mjs MODEL.gguf INPUT.json");
  process.exit(2);
}
const input = JSON.parse(fs.readFileSync(inputPath, "utf8"));
let lib;
try {
  lib = await import("node-llama-cpp");
} catch (e) {
  console.error("node-llama-cpp is not installed in tests/llama (run scripts/install-deps.sh): " + e.message);
  process.exit(3);
}
const {getLlama, LlamaLogLevel} = lib;
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 2});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const vocab = model.tokens.vocabSize ?? model.fileInsights?.vocabularySize;

if (input.texts !== undefined) {
  // llama.cpp's own tokenizer (common_tokenize: no BOS/EOS added, special-token text read as text).
  const tokenized = input.texts.map((text) => Array.from(model.tokenize(text, false)));
  const prompt = Array.from(model.tokenize(input.prompt_text, false));
  const f32 = input.kv === "f32";
  const contextSize = prompt.length + input.n + 8;
  // "default": llama.cpp's own KV cache (F16 keys and values); "f32": full precision.
  const options = {contextSize, batchSize: contextSize, sequences: 1, threads: 2};
  if (f32) Object.assign(options, {experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"});
  const context = await model.createContext(options);
  const sequence = context.getSequence();
  const greedy = [];
  for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
    greedy.push(token);
    if (model.isEogToken(token) || greedy.length >= input.n) break;
  }
  const shown = greedy.filter((t) => !model.isEogToken(t));
  process.stdout.write(JSON.stringify({tokenized, prompt, greedy, greedy_text: model.detokenize(shown, false),
                                       kv: f32 ? "f32" : "default"}));
  await context.dispose();
  await model.dispose();
  await llama.dispose();
  process.exit(0);
}
const contextSize = Math.max(input.tokens.length, input.prompt.length + input.n) + 8;
// F32 keys and values: llama.cpp's default F16 cache would round them before attention.
const context = await model.createContext({contextSize, batchSize: contextSize, sequences: 1, threads: 2,
                                           flashAttention: false, experimentalKvCacheKeyType: "F32",
                                           experimentalKvCacheValueType: "F32"});
const sequence = context.getSequence();

// The distribution after each input token: the full vocabulary, softmax of the raw logits (greedy sampler).
const out = await sequence.controlledEvaluate(input.tokens.map((t) => [t, {generateNext: {probabilities: true}}]));
const logprobs = out.map((item) => {
  const row = new Array(vocab).fill(-1e30);
  for (const [token, p] of item.next.probabilities) row[token] = p > 0 ? Math.log(p) : -1e30;
  return row;
});

await sequence.clearHistory();
const greedy = [];
for await (const token of sequence.evaluate(input.prompt, {temperature: 0, yieldEogToken: true})) {
  greedy.push(token);
  if (greedy.length >= input.n) break;
}
process.stdout.write(JSON.stringify({logprobs, greedy, vocab}));
await context.dispose();
await model.dispose();
await llama.dispose();
