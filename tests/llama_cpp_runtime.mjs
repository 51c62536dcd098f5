// Runs a GGUF file in llama.cpp (the prebuilt binaries of the npm package node-llama-cpp, CPU only, no build)
// and prints one JSON line: the FIM tokens llama.cpp found, the tokenization of texts (special tokens parsed, as
// llama-server parses a /completion prompt) and greedy infills (llama.cpp's own infill prompt from its FIM token
// ids, the layout llama-server's /infill builds).
//
//   NODE_LLAMA_CPP_DIR=<folder with node_modules> node llama_cpp_runtime.mjs request.json
//   request: {"model": path, "tokenize": [text], "infill": [{"prefix", "suffix", "maxTokens"}], "threads": 2}
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const entry = join(process.env.NODE_LLAMA_CPP_DIR, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaCompletion, LlamaLogLevel} = await import(pathToFileURL(entry).href);
const request = JSON.parse(readFileSync(process.argv[2], "utf8"));

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: request.model});
const t = model.tokens;
const out = {
  tokens: {
    prefix: t.infill.prefix, suffix: t.infill.suffix, middle: t.infill.middle,
    bos: t.bos, eos: t.eos, eot: t.eot, prependsBos: t.shouldPrependBosToken,
  },
  tokenize: (request.tokenize ?? []).map((text) => Array.from(model.tokenize(text, true))),
  infill: [],
};
const context = await model.createContext({contextSize: request.contextSize ?? 512, threads: request.threads ?? 2});
const sequence = context.getSequence();
const completion = new LlamaCompletion({contextSequence: sequence});
out.infillSupported = completion.infillSupported;
for (const job of out.infillSupported ? request.infill ?? [] : []) {
  const ids = [];
  const started = performance.now();
  // Greedy and nothing else: temperature 0, and node-llama-cpp's default repeat penalty switched off.
  const text = await completion.generateInfillCompletion(job.prefix, job.suffix, {
    maxTokens: job.maxTokens ?? 32, temperature: 0, repeatPenalty: false, onToken: (tokens) => ids.push(...tokens),
  });
  out.infill.push({ids, text, seconds: (performance.now() - started) / 1000});
  await sequence.clearHistory();
}
process.stdout.write(JSON.stringify(out) + "\n");
completion.dispose();
await context.dispose();
await model.dispose();
await llama.dispose();
