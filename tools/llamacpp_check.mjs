// llama.cpp (through node-llama-cpp's prebuilt binaries) on a GGUF file: the tokens of a text, and greedy
// decoding from given prompt ids with the full next-token logits at each step. Used by the ignored test
// `gguf_llamacpp` in crates/cli/tests/export.rs. Input: one JSON argument
// {"gguf": PATH, "text": STRING, "prompt": [ids], "steps": N}; output: JSON on standard output
// {"tokens_of_text": [ids], "steps": [{"token": id, "logits": [vocab floats]}]}.
// Install: `npm install node-llama-cpp` in a directory DIR; run with DPO_NODE_LLAMA_CPP=DIR.
import path from "node:path";
import {pathToFileURL} from "node:url";

const dir = process.env.DPO_NODE_LLAMA_CPP;
const entry = dir ? pathToFileURL(path.join(dir, "node_modules/node-llama-cpp/dist/index.js")).href : "node-llama-cpp";
const {getLlama} = await import(entry);

const input = JSON.parse(process.argv[2]);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: input.gguf, gpuLayers: 0});
// An f32 key/value cache and no flash attention: the defaults (f16 cache) round keys and values to f16.
const context = await model.createContext({
    contextSize: 256, batchSize: 256, threads: 1, flashAttention: false,
    experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
});
const sequence = context.getSequence();
const tokensOfText = Array.from(model.tokenize(input.text, false));

const steps = [];
let feed = input.prompt.slice();
for (let s = 0; s < input.steps; s++) {
    const items = feed.map((t, i) => i === feed.length - 1 ? [t, {generateNext: {logits: true}}] : t);
    const res = await sequence.controlledEvaluate(items);
    const last = res[res.length - 1];
    const map = last.next.logits;
    const n = Math.max(...map.keys()) + 1;
    const logits = new Array(n).fill(null);
    for (const [tok, v] of map) logits[tok] = v;
    let best = 0;
    for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    steps.push({token: best, logits});
    feed = [best];
}
console.log(JSON.stringify({tokens_of_text: tokensOfText, steps}));
await context.dispose();
await model.dispose();
