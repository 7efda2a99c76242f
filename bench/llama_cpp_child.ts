/**
 * node-llama-cpp's side of the benchmark, in a process of its own (so that its load time and peak
 * RSS are its own): loads a GGUF file on the CPU with llama.cpp's prebuilt binary, and per rep, on a
 * fresh context, times the prefill of `--prefill` token ids (the port's prompt ids, evaluated as ids:
 * no tokenizer) up to its greedy next token, then `--decode` greedy steps after it, as
 * bench/workloads.ts times the port. Prints one BENCH_RESULT line. run.ts starts it:
 *
 *   npx ts-node --transpile-only bench/llama_cpp_child.ts --dir DIR --model FILE.gguf
 *       [--prefill 128] [--decode 32] [--reps 2] [--threads N]
 *   ... --dir DIR --probe     (only checks that the binding loads: prebuilt, CPU only)
 *
 * DIR is where node-llama-cpp is installed (bench/llama_cpp.ts): it is not a dependency of the
 * project, so it is imported from there, as ESM, by path.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { pathToFileURL } from 'url';
import { emitResult, intFlag, parseFlags, peakRssBytes, promptIds } from './common';
import type { LlamaCppProbe, LlamaCppResult } from './llama_cpp';

/** The part of node-llama-cpp's API used here (its types are not installed with the project). */
interface Sequence {
  evaluate(tokens: number[], options?: { temperature?: number }): AsyncGenerator<number, void, void>;
}
interface Context {
  readonly contextSize: number;
  readonly batchSize: number;
  readonly currentThreads: number;
  getSequence(): Sequence;
  dispose(): Promise<void>;
}
interface Model {
  createContext(options: { contextSize: number; batchSize: number; sequences: number; threads: { ideal: number; min: number } }): Promise<Context>;
  dispose(): Promise<void>;
}
interface Llama {
  readonly gpu: string | false;
  readonly buildType: string;
  readonly systemInfo: string;
  loadModel(options: { modelPath: string; gpuLayers: number; useMmap: boolean }): Promise<Model>;
  dispose(): Promise<void>;
}
interface NodeLlamaCpp {
  getLlama(options: { gpu: false; build: 'never'; skipDownload: boolean; logLevel: string; maxThreads: number; progressLogs: boolean }): Promise<Llama>;
}

/** import() that TypeScript's CommonJS output keeps as import() (node-llama-cpp is ESM only). */
const importEsm = new Function('specifier', 'return import(specifier)') as (specifier: string) => Promise<unknown>;

const FLAGS = ['dir', 'model', 'prefill', 'decode', 'reps', 'threads', 'probe'] as const;

const seconds = (t0: number): number => (performance.now() - t0) / 1000;

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2), FLAGS);
  const dir = flags.get('dir');
  if (!dir) throw new Error('--dir DIR (where node-llama-cpp is installed) is required');
  const pkgDir = path.join(dir, 'node_modules', 'node-llama-cpp');
  const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8')) as { version: string; exports?: { '.'?: { import?: string } } };
  const entry = path.join(pkgDir, pkg.exports?.['.']?.import ?? 'dist/index.js');
  const { getLlama } = (await importEsm(pathToFileURL(entry).href)) as NodeLlamaCpp;
  const threads = flags.has('threads') ? intFlag(flags, 'threads', 1) : os.cpus().length;

  let t0 = performance.now();
  // build: 'never': a prebuilt binary or an error, never a build of llama.cpp from source; gpu: false: CPU only.
  const llama = await getLlama({ gpu: false, build: 'never', skipDownload: true, logLevel: 'error', maxThreads: threads, progressLogs: false });
  const bindingS = seconds(t0);
  if (llama.gpu !== false) throw new Error(`node-llama-cpp loaded a ${llama.gpu} build, expected the CPU one`);
  if (flags.has('probe')) {
    const probe: LlamaCppProbe = { side: 'node-llama-cpp-probe', version: pkg.version, gpu: llama.gpu, buildType: llama.buildType };
    emitResult(probe);
    await llama.dispose();
    return;
  }
  const file = flags.get('model');
  if (!file) throw new Error('--model FILE.gguf is required');
  const prefill = intFlag(flags, 'prefill', 128);
  const decode = intFlag(flags, 'decode', 32);
  const reps = intFlag(flags, 'reps', 2);
  if (prefill < 1) throw new Error('--prefill must be at least 1');

  // The weights read into memory at load (no mmap), as the port holds them: load time is the read
  // (the binding's own start, like the port's backend start, is apart: bindingS).
  t0 = performance.now();
  const model = await llama.loadModel({ modelPath: file, gpuLayers: 0, useMmap: false });
  const loadS = seconds(t0);
  const ids = promptIds(prefill);
  const runs: LlamaCppResult['runs'] = [];
  let info = { contextSize: 0, batchSize: 0, threads: 0 };
  for (let r = 0; r < reps; r++) {
    // A fresh context (and KV cache) per rep; the whole prompt in one batch, as the port's prefill.
    const context = await model.createContext({ contextSize: prefill + decode + 16, batchSize: prefill, sequences: 1, threads: { ideal: threads, min: threads } });
    info = { contextSize: context.contextSize, batchSize: context.batchSize, threads: context.currentThreads };
    // temperature 0: greedy (the most likely token), no sampling beyond it.
    const steps = context.getSequence().evaluate(ids, { temperature: 0 });
    let t = performance.now();
    const first = await steps.next(); // the prompt evaluated, its next token chosen
    const prefillS = seconds(t);
    if (first.done) throw new Error('node-llama-cpp gave no token after the prompt');
    t = performance.now();
    for (let i = 0; i < decode; i++) {
      // each step evaluates the token chosen last and chooses the next
      if ((await steps.next()).done) throw new Error(`node-llama-cpp stopped after ${i} decode steps`);
    }
    const decodeS = seconds(t);
    await steps.return();
    await context.dispose();
    runs.push({ prefillS, decodeS });
    process.stderr.write(`node-llama-cpp rep ${r + 1}/${reps}: prefill ${prefillS.toFixed(2)} s, decode ${decodeS.toFixed(2)} s\n`);
  }
  let llamaCppRelease = 'unknown';
  try {
    llamaCppRelease = (JSON.parse(fs.readFileSync(path.join(pkgDir, 'llama', 'binariesGithubRelease.json'), 'utf8')) as { release: string }).release;
  } catch {
    // the release is only reported
  }
  const result: LlamaCppResult = {
    side: 'node-llama-cpp',
    version: pkg.version,
    llamaCppRelease,
    systemInfo: llama.systemInfo.trim(),
    file,
    fileBytes: fs.statSync(file).size,
    ...info,
    bindingS,
    loadS,
    runs,
    peakRssBytes: peakRssBytes(),
    loadavg: os.loadavg(),
  };
  await model.dispose();
  await llama.dispose();
  emitResult(result);
}

main().catch((err: unknown) => {
  process.stderr.write(`error: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}\n`);
  process.exit(1);
});
