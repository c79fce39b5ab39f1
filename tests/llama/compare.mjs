// Runs a GGUF model in llama.cpp (node-llama-cpp, CPU) on given token ids and prints, as JSON on stdout:
//   {"logprobs": [[V log-probabilities after token 0], [... after token 1], ...],   (natural log; -1e30 for 0)
//    "greedy": [N token ids continuing the prompt greedily],
//    "vocab": V}
// Usage: node compare.mjs MODEL.gguf INPUT.json    with INPUT.json = {"tokens": [...], "prompt": [...], "n": N}
// tests/test_export.cpp compares these with moelab's own forward.
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
