/**
 * `npm run bench`: the port beside the Python reference, on this machine, in one run.
 *
 * 1. The machine: CPU, load average, and its memory read bandwidth (bench/bandwidth.ts).
 * 2. The "small" model (random weights, written once under $TMPDIR/mistral-ts-bench): the port
 *    (bench/port.ts) and, where /usr/bin/python3 has torch, the reference (bench/reference.py),
 *    each in processes of their own, taking turns; prefill, decode, batch-4 decode, load time,
 *    peak RSS, port/reference ratios, decode as a fraction of the memory-bandwidth bound.
 * 3. How cost grows with length under the sliding window (bench/scaling.ts).
 * 4. Memory over 1,000 decode steps (bench/memory.ts).
 * 5. With BENCH_7B=1, the same table for a Mistral-7B-shaped checkpoint (default
 *    /tmp/mistral-7b-random, made by scripts/make_random_7b.py) on the compute pool, few steps
 *    (BENCH_7B_LOWMEM=1 adds tfjs's low-memory mode). The small model also runs on both paths
 *    (tfjs and the compute pool) in turns, with their ratio (BENCH_SKIP_POOL=1 skips it).
 *
 * 6. node-llama-cpp (llama.cpp's Node binding, installed on demand into $TMPDIR/mistral-ts-llama-cpp,
 *    never a dependency of the project) on the very same weights, written as F16 and Q8_0 GGUF by the
 *    project's `convert`: for the small model (beside the port's compute pool, float32 and q8_0) and,
 *    with BENCH_7B=1, the 7B checkpoint (beside the port's bf16 and q8_0 runs); port / node-llama-cpp
 *    ratios (bench/llama_cpp.ts). Where it cannot be installed or loaded, the bench says why and goes on.
 *
 * Environment: BENCH_REPS (processes per side, default 3 for the port and 2 for the reference, each
 * running the workloads twice),
 * BENCH_REF (mistral-src checkout, default /tmp/mistral-src-c18d5b9), BENCH_PYTHON (default
 * /usr/bin/python3), BENCH_SKIP_REFERENCE=1, BENCH_SKIP_SMALL=1, BENCH_SKIP_SCALING=1, BENCH_SKIP_MEMORY=1,
 * BENCH_7B=1, BENCH_7B_PATH, BENCH_DIR (where the small model and the GGUF files are kept),
 * BENCH_SKIP_LLAMA_CPP=1.
 */
import { spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { initBackend } from '../runtime/backend';
import { measureBandwidth, type Bandwidth } from './bandwidth';
import { gib, mib, REPO, RESULT_MARKER, smallModelDir } from './common';
import { ensureNodeLlamaCpp, ggufOf, llamaCppModelFolder, type GgufType, type LlamaCppResult } from './llama_cpp';
import type { MemoryResult, MemorySample } from './memory';
import type { PortResult } from './port';
import type { ScalingResult } from './scaling';
import type { RunTimes } from './workloads';

const PYTHON = process.env.BENCH_PYTHON ?? '/usr/bin/python3';
const REF = process.env.BENCH_REF ?? '/tmp/mistral-src-c18d5b9';

interface ReferenceResult {
  side: 'reference';
  torch: string;
  threads: number;
  blas: string;
  dtype: string;
  stream: boolean;
  loadS: number;
  runs: RunTimes[];
  peakRssBytes: number;
  loadavg: number[];
}

class ChildError extends Error {
  override name = 'ChildError';
}

/** Runs a child, passing its stderr through, and returns the JSON of its BENCH_RESULT line. */
function runChild<T>(command: string, args: string[]): Promise<T> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      process.stderr.write(`  ${d.toString().trimEnd().split('\n').join('\n  ')}\n`);
    });
    child.on('close', (code) => {
      const line = stdout.split('\n').find((l) => l.startsWith(RESULT_MARKER));
      if (code !== 0 || line === undefined) {
        const last = stderr.trim().split('\n').pop() ?? '';
        reject(new ChildError(`${path.basename(args.find((a) => /\.(ts|py)$/.test(a)) ?? command)} exited with ${code}: ${last}`));
        return;
      }
      resolve(JSON.parse(line.slice(RESULT_MARKER.length)) as T);
    });
  });
}

function tsChild<T>(script: string, args: string[], nodeFlags: string[] = []): Promise<T> {
  const register = require.resolve('ts-node/register/transpile-only');
  return runChild<T>(process.execPath, ['--max-old-space-size=32768', ...nodeFlags, '-r', register, path.join(REPO, 'bench', script), ...args]);
}

function referenceAvailable(): string | null {
  if (process.env.BENCH_SKIP_REFERENCE === '1') return 'BENCH_SKIP_REFERENCE=1';
  if (!fs.existsSync(path.join(REF, 'one_file_ref.py'))) return `no ${path.join(REF, 'one_file_ref.py')} (set BENCH_REF)`;
  const probe = spawnSync(PYTHON, ['-c', 'import torch, fire, sentencepiece'], { encoding: 'utf8' });
  if (probe.status !== 0) return `${PYTHON} cannot import torch, fire and sentencepiece`;
  return null;
}

const best = (xs: number[]): number => Math.min(...xs.filter((x) => x > 0));
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

interface Summary {
  loadS: number;
  prefillTokS: number;
  decodeTokS: number;
  batchDecodeTokS: number;
  peakRssBytes: number;
  decodeMedianTokS: number;
}

interface Workload {
  prefill: number;
  decode: number;
  batch: number;
  batchDecode: number;
}

function summarize(results: { loadS: number; runs: RunTimes[]; peakRssBytes: number }[], w: Workload): Summary {
  const runs = results.flatMap((r) => r.runs);
  return {
    loadS: best(results.map((r) => r.loadS)),
    prefillTokS: w.prefill / best(runs.map((r) => r.prefillS)),
    decodeTokS: w.decode / best(runs.map((r) => r.decodeS)),
    batchDecodeTokS: w.batch > 0 && w.batchDecode > 0 ? (w.batch * w.batchDecode) / best(runs.map((r) => r.batchDecodeS)) : NaN,
    peakRssBytes: Math.max(...results.map((r) => r.peakRssBytes)),
    decodeMedianTokS: w.decode / median(runs.map((r) => r.decodeS)),
  };
}

/** A number for the tables: `digits` decimals, more for small values (0.0413, not 0.0). */
const fmt = (x: number, digits = 1): string => {
  if (!Number.isFinite(x)) return '-';
  if (x !== 0 && Math.abs(x) < 10 ** -digits * 10) return x.toPrecision(2);
  return x.toFixed(digits);
};

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join('  ')).join('\n');
}

/** The comparison table of one model, and the target lines. Returns whether every target was met. */
function report(
  title: string,
  w: Workload,
  port: Summary,
  portInfo: PortResult,
  ref: Summary | null,
  refInfo: ReferenceResult | null,
  bandwidth: Bandwidth,
  targets: boolean,
  runs: { port: number; reference: number; reps: number },
): boolean {
  const weightBytes = portInfo.paramsPerToken * portInfo.storedBytesPerParam;
  const boundS = weightBytes / bandwidth.bound;
  const fraction = (tokS: number): number => boundS * tokS; // the bound's time per token over the measured one
  const ratio = (a: number, b: number | undefined): string => (b === undefined || !Number.isFinite(b) ? '-' : `${(a / b).toFixed(2)}x`);
  const rows = [
    ['', 'port', 'reference', 'port/reference'],
    [`prefill tokens/s (${w.prefill} tokens, batch 1)`, fmt(port.prefillTokS), fmt(ref?.prefillTokS ?? NaN), ratio(port.prefillTokS, ref?.prefillTokS)],
    [`decode tokens/s (${w.decode} steps after it)`, fmt(port.decodeTokS), fmt(ref?.decodeTokS ?? NaN), ratio(port.decodeTokS, ref?.decodeTokS)],
    ['  median of the runs', fmt(port.decodeMedianTokS), fmt(ref?.decodeMedianTokS ?? NaN), ratio(port.decodeMedianTokS, ref?.decodeMedianTokS)],
    [`batch-${w.batch} decode tokens/s (${w.batchDecode} steps)`, fmt(port.batchDecodeTokS), fmt(ref?.batchDecodeTokS ?? NaN), ratio(port.batchDecodeTokS, ref?.batchDecodeTokS)],
    ['load time, s', fmt(port.loadS, 2), fmt(ref?.loadS ?? NaN, 2), ratio(port.loadS, ref?.loadS)],
    ['peak RSS', mib(port.peakRssBytes), ref ? mib(ref.peakRssBytes) : '-', ratio(port.peakRssBytes, ref?.peakRssBytes)],
    ['decode / bandwidth bound', `${fmt(100 * fraction(port.decodeTokS))}%`, ref ? `${fmt(100 * fraction(ref.decodeTokS))}%` : '-', ''],
  ];
  console.log(`\n## ${title}\n`);
  console.log(table(rows));
  console.log(
    `\nport: ${portInfo.backend} backend, ` +
      (portInfo.poolThreads > 0
        ? `layer and output products on the compute pool (${portInfo.poolThreads} threads, weights as stored), the rest on one thread, `
        : `one thread, ${portInfo.lowMemory ? 'low-memory mode (layers widened from the host per use)' : 'weights resident'}, `) +
      `loads ${portInfo.format}.`,
  );
  if (refInfo) {
    console.log(
      `reference: one_file_ref.py on torch ${refInfo.torch}, ${refInfo.dtype}, ${refInfo.threads} threads, ${refInfo.blas.replace('- Build settings: ', '')} ` +
        `${refInfo.blas.includes('generic') ? "(torch's generic BLAS, no MKL/OpenBLAS)" : ''}${refInfo.stream ? ', tensors streamed into the model by bench/reference.py (load time is that script\'s)' : ''}.`,
    );
  }
  console.log(
    `bound: ${(weightBytes / 1e6).toFixed(0)} MB of weights read per token (${portInfo.paramsPerToken.toLocaleString('en')} parameters x ` +
      `${portInfo.storedBytesPerParam} bytes as stored) / ${(bandwidth.bound / 1e9).toFixed(1)} GB/s = ${(boundS * 1000).toFixed(1)} ms per token, ` +
      `${fmt(1 / boundS)} tokens/s.`,
  );
  console.log(
    runs.reference > 0
      ? `figures: the best of ${runs.port} port runs and ${runs.reference} reference runs (${runs.reps} per process), the two sides taking turns.`
      : `figures: the best of ${runs.port} port runs (${runs.reps} per process); the reference was not run.`,
  );
  if (!targets) return true;
  const checks: [string, boolean][] = [
    [`prefill >= 1.5x the reference (${ratio(port.prefillTokS, ref?.prefillTokS)})`, ref !== null && port.prefillTokS >= 1.5 * ref.prefillTokS],
    [`decode >= 1.5x the reference (${ratio(port.decodeTokS, ref?.decodeTokS)})`, ref !== null && port.decodeTokS >= 1.5 * ref.decodeTokS],
    [`decode >= 50% of the bandwidth bound (${fmt(100 * fraction(port.decodeTokS))}%)`, fraction(port.decodeTokS) >= 0.5],
  ];
  for (const [what, ok] of checks) console.log(`target: ${what}: ${ok ? 'met' : ref === null && what.includes('reference') ? 'not measured (no reference)' : 'NOT met'}`);
  return checks.every(([, ok]) => ok);
}

async function compare(
  title: string,
  model: string,
  w: Workload & { batchPrefill: number },
  turns: { port: number; reference: number },
  reps: number,
  portFlags: string[],
  refFlags: string[] | null,
  bandwidth: Bandwidth,
  targets: boolean,
): Promise<{ ok: boolean; port: Summary; ref: Summary | null }> {
  // Each process runs the workloads `reps` times: the first run of a process also pays for warming
  // up (V8 compiling the decode path, first allocations), which the later ones do not.
  const common = ['--prefill', `${w.prefill}`, '--decode', `${w.decode}`, '--batch', `${w.batch}`, '--batch-prefill', `${w.batchPrefill}`, '--batch-decode', `${w.batchDecode}`, '--reps', `${reps}`];
  const ports: PortResult[] = [];
  const refs: ReferenceResult[] = [];
  // The two sides take turns, so that the load of a shared machine falls on both alike.
  for (let turn = 0; turn < Math.max(turns.port, refFlags ? turns.reference : 0); turn++) {
    if (turn < turns.port) {
      console.error(`${title}: port, turn ${turn + 1}/${turns.port}`);
      ports.push(await tsChild<PortResult>('port.ts', ['--model', model, ...common, ...portFlags]));
    }
    if (refFlags && turn < turns.reference) {
      console.error(`${title}: reference, turn ${turn + 1}/${turns.reference}`);
      refs.push(await runChild<ReferenceResult>(PYTHON, [path.join(REPO, 'bench', 'reference.py'), '--ref', REF, '--model', model, ...common, ...refFlags]));
    }
  }
  const runs = { port: ports.length * reps, reference: refs.length * reps, reps };
  const port = summarize(ports, w);
  const ref = refs.length ? summarize(refs, w) : null;
  return { ok: report(title, w, port, ports[0], ref, refs[0] ?? null, bandwidth, targets, runs), port, ref };
}

function printScaling(s: ScalingResult): void {
  console.log(`\n## Cost with length: small model, window W = ${s.window}, prefill in chunks of ${s.chunk} tokens\n`);
  const rows = [['T', 'T/W', 'prefill ms/token (W)', '(full)', 'prefill to T, s (W)', '(full)', 'decode ms/token (W)', '(full)', 'KV cache (W)', '(full)', 'slots (W)', '(full)']];
  s.sliding.forEach((r, i) => {
    const f = s.full[i];
    rows.push([
      `${r.T}`, `${r.T / s.window}`, fmt(r.chunkMsPerToken, 2), fmt(f.chunkMsPerToken, 2), fmt(r.prefillToTS, 1), fmt(f.prefillToTS, 1),
      fmt(r.decodeMsPerToken, 2), fmt(f.decodeMsPerToken, 2), mib(r.kvCacheBytes), mib(f.kvCacheBytes), `${r.kvCacheSlots}`, `${f.kvCacheSlots}`,
    ]);
  });
  console.log(table(rows));
  const past = s.sliding.filter((r) => r.T >= 2 * s.window);
  const flat = (xs: number[]): number => Math.max(...xs) / Math.min(...xs);
  console.log(
    `\n(W) = window ${s.window}; (full) = the same weights with the window at ${s.fullWindow}, the whole length. ` +
      `Past W, with the window: prefill ms/token varies ${fmt(flat(past.map((r) => r.chunkMsPerToken)), 2)}x, decode ms/token ${fmt(flat(past.map((r) => r.decodeMsPerToken)), 2)}x ` +
      `(max/min), cache bytes ${new Set(s.sliding.map((r) => r.kvCacheBytes)).size === 1 ? 'constant' : 'NOT constant'} at ` +
      `${mib(s.sliding[0].kvCacheBytes)} = 2 x ${s.sliding[0].kvCacheSlots} slots x layers x kv heads x head_dim x 4 bytes.`,
  );
}

function printMemory(m: MemoryResult): boolean {
  const first = m.samples[0];
  const last = m.samples[m.samples.length - 1];
  const flat = (f: (s: MemorySample) => number): boolean => m.samples.every((s) => f(s) === f(first));
  const growth = (f: (s: MemorySample) => number): number => Math.max(...m.samples.map(f)) - f(first);
  const tensorsFlat = flat((s) => s.numTensors);
  const backendFlat = flat((s) => s.backendBytes) && flat((s) => s.wasmMemoryBytes);
  const liveHeapGrowth = growth((s) => s.jsHeapBytes);
  const rssGrowth = growth((s) => s.rssBytes);
  const reservedGrowth = growth((s) => s.jsHeapTotalBytes);
  // RSS also follows V8's heap reservation (its young generation grows towards a cap with the
  // allocation rate): counted apart, it is not data the model keeps.
  const rssFlat = rssGrowth - reservedGrowth <= 8 * 1024 ** 2 && liveHeapGrowth <= 4 * 1024 ** 2;
  const slotsExact = m.samples.every((s) => s.cacheSlots.every((n) => n === m.window));
  console.log(`\n## Memory: ${m.steps} decode steps after a ${m.window}-token prefill, window ${m.window} (${fmt(m.msPerStep, 2)} ms/step)\n`);
  console.log(
    table([
      ['step', 'tensors', 'tensor bytes', 'wasm memory', 'JS heap live', 'JS heap reserved', 'RSS', 'cache slots per layer'],
      ...m.samples.map((s) => [`${s.step}`, `${s.numTensors}`, `${s.backendBytes}`, mib(s.wasmMemoryBytes), mib(s.jsHeapBytes), mib(s.jsHeapTotalBytes), mib(s.rssBytes), s.cacheSlots.join(',')]),
    ]),
  );
  console.log(`\ntarget: tensor count flat (${first.numTensors} -> ${last.numTensors}): ${tensorsFlat ? 'met' : 'NOT met'}`);
  console.log(`target: tensor bytes and wasm memory flat: ${backendFlat ? 'met' : 'NOT met'}`);
  console.log(
    `target: RSS flat: ${rssFlat ? 'met' : 'NOT met'}: RSS +${mib(rssGrowth)}, of which V8's heap reservation +${mib(reservedGrowth)} ` +
      `(allowed: 8 MiB besides it); live JS heap after GC +${mib(liveHeapGrowth)} (allowed: 4 MiB)`,
  );
  console.log(`target: every layer's cache exactly W = ${m.window} slots: ${slotsExact ? 'met' : 'NOT met'}`);
  return tensorsFlat && backendFlat && rssFlat && slotsExact;
}

/**
 * The port's two paths on one model, in turns (a process each, so that a shared machine's load
 * falls on both alike): the tfjs path and the compute pool, with the ratio pool/tfjs per row.
 */
async function comparePaths(title: string, model: string, w: Workload & { batchPrefill: number }, turns: number, reps: number): Promise<void> {
  const common = ['--prefill', `${w.prefill}`, '--decode', `${w.decode}`, '--batch', `${w.batch}`, '--batch-prefill', `${w.batchPrefill}`, '--batch-decode', `${w.batchDecode}`, '--reps', `${reps}`];
  const tfjs: PortResult[] = [];
  const pool: PortResult[] = [];
  for (let turn = 0; turn < turns; turn++) {
    console.error(`${title}: tfjs path, turn ${turn + 1}/${turns}`);
    tfjs.push(await tsChild<PortResult>('port.ts', ['--model', model, ...common, '--pool', 'off']));
    console.error(`${title}: compute pool, turn ${turn + 1}/${turns}`);
    pool.push(await tsChild<PortResult>('port.ts', ['--model', model, ...common, '--pool', 'on']));
  }
  const [a, b] = [summarize(tfjs, w), summarize(pool, w)];
  const ratio = (x: number, y: number): string => (Number.isFinite(x) && Number.isFinite(y) ? `${(x / y).toFixed(2)}x` : '-');
  console.log(`\n## ${title}\n`);
  console.log(table([
    ['', 'tfjs path', `compute pool (${pool[0].poolThreads} threads)`, 'pool/tfjs'],
    [`prefill tokens/s (${w.prefill} tokens, batch 1)`, fmt(a.prefillTokS), fmt(b.prefillTokS), ratio(b.prefillTokS, a.prefillTokS)],
    [`decode tokens/s (${w.decode} steps after it)`, fmt(a.decodeTokS), fmt(b.decodeTokS), ratio(b.decodeTokS, a.decodeTokS)],
    ['  median of the runs', fmt(a.decodeMedianTokS), fmt(b.decodeMedianTokS), ratio(b.decodeMedianTokS, a.decodeMedianTokS)],
    [`batch-${w.batch} decode tokens/s (${w.batchDecode} steps)`, fmt(a.batchDecodeTokS), fmt(b.batchDecodeTokS), ratio(b.batchDecodeTokS, a.batchDecodeTokS)],
    ['load time, s', fmt(a.loadS, 2), fmt(b.loadS, 2), ratio(b.loadS, a.loadS)],
    ['peak RSS', mib(a.peakRssBytes), mib(b.peakRssBytes), ratio(b.peakRssBytes, a.peakRssBytes)],
  ]));
  console.log(`\nfigures: the best of ${turns * reps} runs per path (${reps} per process), the paths taking turns; load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}.`);
}

/**
 * Reads a file, or every file of a model folder, once, so that each side then loads it from the page cache
 * rather than from disk (the first to read it would otherwise pay for the disk alone).
 */
function warmPageCache(folder: string): void {
  const t0 = performance.now();
  let bytes = 0;
  const buf = Buffer.alloc(16 << 20);
  const files = fs.statSync(folder).isFile() ? [folder] : fs.readdirSync(folder).map((name) => path.join(folder, name));
  for (const file of files) {
    if (!fs.statSync(file).isFile()) continue;
    const fd = fs.openSync(file, 'r');
    try {
      for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) bytes += n;
    } finally {
      fs.closeSync(fd);
    }
  }
  console.log(`\n${folder}: ${(bytes / 1e9).toFixed(1)} GB read once into the page cache in ${((performance.now() - t0) / 1000).toFixed(1)} s, so that every side loads it from memory.`);
}

/** Issue 13's and 14's targets for the 7B-shaped checkpoint, from the runs above. */
function print7BTargets(bf16: Summary, ref: Summary | null, q8: Summary | null): boolean {
  const GiB = 1024 ** 3;
  const x = (a: number, b: number | undefined): string => (b === undefined ? '-' : `${(a / b).toFixed(2)}x`);
  const checks: [string, boolean | null][] = [
    [`bf16 pool decode >= the reference's (${x(bf16.decodeTokS, ref?.decodeTokS)})`, ref ? bf16.decodeTokS >= ref.decodeTokS : null],
    [`bf16 pool prefill >= the reference's (${x(bf16.prefillTokS, ref?.prefillTokS)})`, ref ? bf16.prefillTokS >= ref.prefillTokS : null],
    [`bf16 pool load time <= the reference's (${x(bf16.loadS, ref?.loadS)})`, ref ? bf16.loadS <= ref.loadS : null],
    [`bf16 pool peak RSS <= 17 GiB (${gib(bf16.peakRssBytes)})`, bf16.peakRssBytes <= 17 * GiB],
  ];
  const q8Checks: [string, boolean | null][] = [
    [`q8_0 decode >= 1.4x the bf16 pool's (${q8 ? x(q8.decodeTokS, bf16.decodeTokS) : '-'})`, q8 ? q8.decodeTokS >= 1.4 * bf16.decodeTokS : null],
    [`q8_0 decode >= 1.5x the reference's bf16 decode (${q8 ? x(q8.decodeTokS, ref?.decodeTokS) : '-'})`, q8 && ref ? q8.decodeTokS >= 1.5 * ref.decodeTokS : null],
    [`q8_0 peak RSS <= 10 GiB (${q8 ? gib(q8.peakRssBytes) : '-'})`, q8 ? q8.peakRssBytes <= 10 * GiB : null],
  ];
  console.log('\n## 7B targets (issues 13 and 14)\n');
  for (const [what, met] of checks) console.log(`target: ${what}: ${met === null ? 'not measured (no reference)' : met ? 'met' : 'NOT met'}`);
  for (const [what, met] of q8Checks) console.log(`target: ${what}: ${met === null ? (q8 ? 'not measured (no reference)' : 'not measured (the q8_0 run failed)') : met ? 'met' : 'NOT met'}`);
  return q8 !== null && [...checks, ...q8Checks].every(([, met]) => met !== false);
}

// -- node-llama-cpp beside the port (bench/llama_cpp.ts) --

/** The port's runs alone (no table): its summary, or null with a line saying why (a flag not there yet...). */
async function portSummary(title: string, model: string, w: Workload & { batchPrefill: number }, turns: number, reps: number, flags: string[]): Promise<Summary | null> {
  const common = ['--prefill', `${w.prefill}`, '--decode', `${w.decode}`, '--batch', '0', '--batch-prefill', `${w.batchPrefill}`, '--batch-decode', '0', '--reps', `${reps}`];
  const ports: PortResult[] = [];
  try {
    for (let turn = 0; turn < turns; turn++) {
      console.error(`${title}: port, turn ${turn + 1}/${turns}`);
      ports.push(await tsChild<PortResult>('port.ts', ['--model', model, ...common, ...flags]));
    }
  } catch (err) {
    console.log(`\n${title}: port ${flags.join(' ')}: not run (${err instanceof Error ? err.message : String(err)})`);
    return null;
  }
  return summarize(ports, { ...w, batch: 0, batchDecode: 0 });
}

interface PortSide {
  /** What the port ran, for the column ("port, bf16 pool"). */
  label: string;
  /** Its figures; null when it did not run (the column shows '-'). */
  summary: Summary | null;
}

/**
 * node-llama-cpp on the model written as F16 and as Q8_0 GGUF by the project's convert command,
 * beside the port's figures for the same weights at each precision: prefill and decode tokens/s,
 * load time, peak RSS, and port / node-llama-cpp ratios. Prints why when it cannot run.
 */
async function compareLlamaCpp(
  title: string,
  model: string,
  w: Workload,
  portByPrecision: Record<GgufType, PortSide>,
  turns: number,
  reps: number,
): Promise<void> {
  const ready = ensureNodeLlamaCpp();
  if ('reason' in ready) {
    console.log(`\n${title}: node-llama-cpp: not run (${ready.reason})`);
    return;
  }
  const notes: string[] = [];
  const llama: Partial<Record<GgufType, { summary: Summary; info: LlamaCppResult }>> = {};
  let folder: string;
  try {
    const made = llamaCppModelFolder(model);
    folder = made.folder;
    if (made.note) notes.push(`model: ${made.note}.`);
  } catch (err) {
    console.log(`\n${title}: node-llama-cpp: not run (${err instanceof Error ? err.message : String(err)})`);
    return;
  }
  for (const type of ['f16', 'q8_0'] as const) {
    const name = type.toUpperCase();
    try {
      console.error(`${title}: ${name} GGUF (the project's convert)`);
      const gguf = ggufOf(folder, type);
      warmPageCache(gguf.file);
      const size = fs.statSync(gguf.file).size;
      notes.push(
        `${name}: ${gguf.file} (${(size / 1e6).toFixed(1)} MB), ` +
          (gguf.converted
            ? `written now by \`convert --type ${type}\` in ${gguf.seconds.toFixed(1)} s, of which converting ${gguf.convertS.toFixed(1)} s ` +
              `(${(gguf.inputBytes / 1e6 / gguf.convertS).toFixed(0)} MB/s of the ${(gguf.inputBytes / 1e6).toFixed(0)} MB of weights read).`
            : 'written by an earlier run (same model files, sizes and mtimes).'),
      );
      const results: LlamaCppResult[] = [];
      for (let turn = 0; turn < turns; turn++) {
        console.error(`${title}: node-llama-cpp ${name}, turn ${turn + 1}/${turns}`);
        results.push(
          await tsChild<LlamaCppResult>('llama_cpp_child.ts', ['--dir', ready.dir, '--model', gguf.file, '--prefill', `${w.prefill}`, '--decode', `${w.decode}`, '--reps', `${reps}`]),
        );
      }
      llama[type] = { summary: summarize(results.map((r) => ({ ...r, runs: r.runs.map((x) => ({ ...x, batchDecodeS: 0, kvCacheBytes: 0 })) })), { ...w, batch: 0, batchDecode: 0 }), info: results[0] };
    } catch (err) {
      notes.push(`${name}: node-llama-cpp not run (${err instanceof Error ? err.message : String(err)}).`);
    }
  }
  const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) ? '-' : `${(a / b).toFixed(2)}x`);
  const header = [''];
  const rows: [string, (s: Summary) => number, (x: number) => string][] = [
    [`prefill tokens/s (${w.prefill} tokens)`, (s) => s.prefillTokS, (x) => fmt(x)],
    [`decode tokens/s (${w.decode} steps after it)`, (s) => s.decodeTokS, (x) => fmt(x)],
    ['load time, s', (s) => s.loadS, (x) => fmt(x, 2)],
    ['peak RSS', (s) => s.peakRssBytes, (x) => mib(x)],
  ];
  const cells = rows.map(([what]) => [what]);
  for (const type of ['f16', 'q8_0'] as const) {
    const port = portByPrecision[type].summary;
    const ll = llama[type]?.summary;
    header.push(portByPrecision[type].label, `llama.cpp ${type.toUpperCase()}`, 'port/llama.cpp');
    rows.forEach(([, get, show], i) => {
      cells[i].push(port ? show(get(port)) : '-', ll ? show(get(ll)) : '-', ratio(port ? get(port) : undefined, ll ? get(ll) : undefined));
    });
  }
  const info = llama.f16?.info ?? llama.q8_0?.info;
  console.log(`\n## ${title}: node-llama-cpp ${ready.version}${info ? ` (llama.cpp ${info.llamaCppRelease}, prebuilt CPU binary, ${info.threads} threads)` : ''}, the same weights\n`);
  console.log(table([header, ...cells]));
  console.log('');
  for (const n of notes) console.log(n);
  if (info) {
    console.log(
      `node-llama-cpp: the GGUF read into memory at load (no mmap; the binding's start, ${fmt(info.bindingS, 2)} s, not counted), ` +
        `the prompt's ${w.prefill} token ids evaluated in one batch (batch size ${info.batchSize}, context ${info.contextSize}), greedy steps (temperature 0), ` +
        `a fresh context per run; ${info.systemInfo.replace(/\s*\|\s*$/, '')}.`,
    );
    const loads = (['f16', 'q8_0'] as const).filter((t) => llama[t]).map((t) => `${t.toUpperCase()} ${llama[t]!.info.loadavg[0].toFixed(2)}`).join(', ');
    console.log(
      `figures: the best of ${turns * reps} runs per column (${reps} per process); the port's runs came first, then node-llama-cpp's; ` +
        `load average (1 min) at the end of node-llama-cpp's runs: ${loads} (llama.cpp's threads spin while they wait for each other, ` +
        'so another job on the cores slows it far more than the port: compare on an idle machine).',
    );
  }
}

// -- end of node-llama-cpp --

async function main(): Promise<void> {
  const load = (): string => os.loadavg().map((x) => x.toFixed(2)).join(' ');
  console.log('# mistral-ts benchmark\n');
  console.log(`machine: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, ${gib(os.totalmem())} RAM; node ${process.version}; load average at start ${load()}`);
  await initBackend('wasm', { quiet: true });
  const bandwidth = await measureBandwidth();
  const gbs = (x: number): string => `${(x / 1e9).toFixed(1)} GB/s`;
  console.log(
    `memory read bandwidth: ${gbs(bandwidth.bound)} (native memchr: ${gbs(bandwidth.oneThread)} on 1 thread, ${gbs(bandwidth.allThreads)} on ${bandwidth.threads} threads; ` +
      `tfjs-wasm matMul of a packed 256 MiB float32 weight: ${gbs(bandwidth.tfjsMatMul)})`,
  );

  const envReps = process.env.BENCH_REPS ? Number(process.env.BENCH_REPS) : undefined;
  const turns = { port: envReps ?? 3, reference: envReps ?? 2 };
  const small = smallModelDir();
  const noReference = referenceAvailable();
  if (noReference === null) {
    const convert = spawnSync(PYTHON, [path.join(REPO, 'bench', 'reference.py'), '--convert', small], { stdio: 'inherit' });
    if (convert.status !== 0) throw new ChildError('bench/reference.py --convert failed');
  } else {
    console.log(`reference: not run (${noReference})`);
  }
  const smallWorkload = { prefill: 128, decode: 32, batch: 4, batchPrefill: 128, batchDecode: 32 };
  let ok = true;
  let judged = false;
  if (process.env.BENCH_SKIP_SMALL !== '1') {
    judged = true;
    ok = (await compare(
      'Small model (dim 512, 4 layers, GQA 8/2, vocab 32000, float32), this machine',
      small, smallWorkload, turns, 2, ['--pool', 'off'], noReference === null ? [] : null, bandwidth, true,
    )).ok;
  }
  if (process.env.BENCH_SKIP_POOL !== '1') {
    await comparePaths('Small model: the tfjs path against the compute pool (float32 weights, all cores)', small, smallWorkload, turns.port, 2);
  }
  // -- node-llama-cpp beside the port (bench/llama_cpp.ts) --
  if (process.env.BENCH_SKIP_SMALL !== '1') {
    const pool = await portSummary('Small model, compute pool (for node-llama-cpp)', small, smallWorkload, turns.port, 2, ['--pool', 'on']);
    const q8 = await portSummary('Small model, q8_0 on the compute pool (for node-llama-cpp)', small, smallWorkload, turns.port, 2, ['--pool', 'on', '--quantize', 'q8_0']);
    await compareLlamaCpp('Small model beside node-llama-cpp', small, smallWorkload, {
      f16: { label: 'port, f32 pool', summary: pool },
      q8_0: { label: 'port, q8_0 pool', summary: q8 },
    }, turns.port, 2);
  }
  // -- end of node-llama-cpp --

  if (process.env.BENCH_SKIP_SCALING !== '1') {
    printScaling(await tsChild<ScalingResult>('scaling.ts', ['--model', small]));
  }
  if (process.env.BENCH_SKIP_MEMORY !== '1') {
    judged = true;
    ok = printMemory(await tsChild<MemoryResult>('memory.ts', ['--model', small], ['--expose-gc'])) && ok;
  }

  if (process.env.BENCH_7B === '1') {
    const big = process.env.BENCH_7B_PATH ?? '/tmp/mistral-7b-random';
    if (!fs.existsSync(path.join(big, 'params.json'))) {
      console.log(`\n7B: no checkpoint at ${big} (make one with: /usr/bin/python3 scripts/make_random_7b.py ${big})`);
    } else {
      const w7 = { prefill: 64, decode: 16, batch: 4, batchPrefill: 16, batchDecode: 4 }; // 16 steps: 8 left ratios moving by a third from run to run
      // The reference holds 14.5 GB of bf16 plus caches: run it only where that fits beside the rest.
      const available = Number(fs.readFileSync('/proc/meminfo', 'utf8').match(/MemAvailable:\s+(\d+) kB/)?.[1] ?? os.freemem() / 1024) * 1024;
      const refFlags = noReference === null && available > 18 * 1024 ** 3 ? ['--dtype', 'bfloat16', '--stream'] : null;
      if (noReference === null && refFlags === null) console.log(`\n7B reference: not run (needs about 18 GiB free, ${gib(available)} available)`);
      warmPageCache(big);
      const bf16 = await compare('Mistral-7B-shaped random checkpoint (bf16), compute pool', big, w7, { port: 1, reference: 1 }, 1, ['--pool', 'on'], refFlags, bandwidth, false);
      // -- node-llama-cpp beside the port (bench/llama_cpp.ts) --
      let q8: Summary | null = null;
      try {
        q8 = (await compare('Mistral-7B-shaped random checkpoint, quantized to q8_0 at load, compute pool', big, w7, { port: 1, reference: 0 }, 1, ['--pool', 'on', '--quantize', 'q8_0'], null, bandwidth, false)).port;
      } catch (err) {
        console.log(`\n7B q8_0 port run: not run (${err instanceof Error ? err.message : String(err)})`);
      }
      judged = true;
      ok = print7BTargets(bf16.port, bf16.ref, q8) && ok;
      await compareLlamaCpp('Mistral-7B-shaped random checkpoint beside node-llama-cpp', big, w7, {
        f16: { label: 'port, bf16 pool', summary: bf16.port },
        q8_0: { label: 'port, q8_0 pool', summary: q8 },
      }, 1, 1);
      // -- end of node-llama-cpp --
      if (process.env.BENCH_7B_LOWMEM === '1') {
        const wl = { prefill: 16, decode: 3, batch: 4, batchPrefill: 16, batchDecode: 2 };
        await compare('Mistral-7B-shaped random checkpoint (bf16), tfjs low-memory mode', big, wl, { port: 1, reference: 0 }, 1, ['--pool', 'off', '--low-memory'], null, bandwidth, false);
      }
    }
  }
  console.log(`\nload average at end ${load()}`);
  if (judged) console.log(ok ? 'all targets met' : 'some targets NOT met (see above)');
}

main().catch((err: unknown) => {
  process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
