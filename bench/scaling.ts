/**
 * How cost grows with length, on the small model: the sliding window keeps attention per token
 * bounded and the rolling cache at W entries, whatever the length. Prefills 16W tokens in chunks of
 * W (the way mistral-src's main.py prefills long prompts) with the window at W and, beside it, with
 * the window at the full length; at T = W, 2W, 4W, 8W, 16W it records the last chunk's time per
 * token, the time per token of a few decode steps from T (the caches are put back afterwards, so
 * the prefill goes on from T), and the KV-cache bytes. Prints one BENCH_RESULT line.
 *
 *   npx ts-node --transpile-only bench/scaling.ts --model DIR [--window 256] [--max-factor 16] [--decode 15]
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../runtime/backend';
import { Transformer } from '../one_file_ref';
import { emitResult, intFlag, parseFlags, promptIds } from './common';
import { disposeCaches, greedyStep, kvCacheBytes, kvCacheSlots, withCaches } from './workloads';

export interface ScalingRow {
  T: number;
  /** Milliseconds per token of the chunk of W tokens that ends at T (the faster of two runs). */
  chunkMsPerToken: number;
  /** Seconds to prefill all T tokens, chunk by chunk (one run of each chunk). */
  prefillToTS: number;
  /** Milliseconds per decode step at positions T, T+1, ...: the median of the steps. */
  decodeMsPerToken: number;
  kvCacheBytes: number;
  kvCacheSlots: number;
}

export interface ScalingResult {
  window: number;
  chunk: number;
  sliding: ScalingRow[];
  full: ScalingRow[];
  fullWindow: number;
}

type Caches = { tensors: (readonly [tf.Tensor4D, tf.Tensor4D])[]; book: Transformer['book'] };

function snapshot(model: Transformer): Caches {
  return { tensors: model.layers.map((l) => [tf.clone(l.attention.cache.k), tf.clone(l.attention.cache.v)] as const), book: model.book.copy() };
}

function restore(model: Transformer, saved: Caches): void {
  model.layers.forEach((l, i) => {
    l.attention.dispose();
    [l.attention.cache.k, l.attention.cache.v] = saved.tensors[i];
  });
  model.book = saved.book;
}

function run(base: Transformer, window: number, chunk: number, maxT: number, checkpoints: Set<number>, decode: number): ScalingRow[] {
  const ids = promptIds(maxT);
  // warm-up on throwaway caches: the first forward of each shape costs more than the rest
  const warm = withCaches(base, 1, window);
  greedyStep(warm, [greedyStep(warm, [ids.slice(0, chunk)], 0)], chunk);
  disposeCaches(warm);

  const model = withCaches(base, 1, window);
  const rows: ScalingRow[] = [];
  let elapsed = 0;
  try {
    for (let pos = 0; pos < maxT; pos += chunk) {
      const T = pos + chunk;
      const input = [ids.slice(pos, T)];
      let chunkMs = Infinity;
      if (checkpoints.has(T)) {
        // a checkpoint's chunk runs twice (the caches put back in between): the faster counts
        const before = snapshot(model);
        const t0 = performance.now();
        greedyStep(model, input, pos);
        chunkMs = performance.now() - t0;
        restore(model, before);
      }
      const t0 = performance.now();
      let next = greedyStep(model, input, pos);
      const ms = performance.now() - t0;
      elapsed += ms / 1000;
      chunkMs = Math.min(chunkMs, ms);
      if (!checkpoints.has(T)) continue;
      const cacheBytes = kvCacheBytes(model);
      const slots = Math.max(...kvCacheSlots(model));
      // decode from T on copies of the caches, then put the T-token caches back
      const saved = snapshot(model);
      const stepMs: number[] = [];
      for (let i = 0; i < decode; i++) {
        const t1 = performance.now();
        next = greedyStep(model, [next], T + i);
        stepMs.push(performance.now() - t1);
      }
      const decodeMs = stepMs.sort((a, b) => a - b)[Math.floor(decode / 2)]; // the median step
      restore(model, saved);
      rows.push({ T, chunkMsPerToken: chunkMs / chunk, prefillToTS: elapsed, decodeMsPerToken: decodeMs, kvCacheBytes: cacheBytes, kvCacheSlots: slots });
      process.stderr.write(`window ${window}: T ${T}: chunk ${(chunkMs / chunk).toFixed(2)} ms/token, decode ${decodeMs.toFixed(2)} ms/token, cache ${cacheBytes} bytes\n`);
    }
  } finally {
    disposeCaches(model);
  }
  return rows;
}

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2), ['model', 'window', 'max-factor', 'decode', 'backend']);
  const modelDir = flags.get('model');
  if (!modelDir) throw new Error('--model DIR is required');
  const window = intFlag(flags, 'window', 256);
  const maxFactor = intFlag(flags, 'max-factor', 16);
  const decode = intFlag(flags, 'decode', 15);
  await initBackend(flags.get('backend') ?? 'wasm', { quiet: true });
  const base = await Transformer.fromFolder(modelDir, { maxBatchSize: 1 });
  const maxT = window * maxFactor;
  const checkpoints = new Set<number>();
  for (let f = 1; f <= maxFactor; f *= 2) checkpoints.add(f * window);
  const result: ScalingResult = {
    window,
    chunk: window,
    sliding: run(base, window, window, maxT, checkpoints, decode),
    fullWindow: maxT,
    full: run(base, maxT, window, maxT, checkpoints, decode),
  };
  emitResult(result);
}

if (require.main === module) {
  main().catch((err: unknown) => {
    process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  });
}
