/**
 * Memory over a long decode, on the small model with a short window: prefill W tokens (the cache is
 * then full), then 1,000 greedy decode steps, sampling the tensor count, the backend's bytes, the
 * process RSS and each layer's cache slots every 100 steps. Prints one BENCH_RESULT line; run.ts
 * judges it (tensor count constant, RSS growth within GC noise, every cache exactly W slots).
 *
 *   npx ts-node --transpile-only bench/memory.ts --model DIR [--window 256] [--steps 1000] [--every 100]
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../runtime/backend';
import { Transformer } from '../one_file_ref';
import { emitResult, intFlag, parseFlags, promptIds } from './common';
import { disposeCaches, greedyStep, kvCacheBytes, kvCacheSlots, withCaches } from './workloads';

export interface MemorySample {
  step: number;
  numTensors: number;
  backendBytes: number;
  rssBytes: number;
  /** The JS heap after a full garbage collection (when node runs with --expose-gc). */
  jsHeapBytes: number;
  /** The JS heap V8 has reserved (its young generation grows with allocation rate up to a cap). */
  jsHeapTotalBytes: number;
  /** The wasm backend's linear memory (it can grow, never shrink). */
  wasmMemoryBytes: number;
  cacheSlots: number[];
  kvCacheBytes: number;
}

export interface MemoryResult {
  window: number;
  steps: number;
  msPerStep: number;
  samples: MemorySample[];
}

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2), ['model', 'window', 'steps', 'every', 'backend']);
  const modelDir = flags.get('model');
  if (!modelDir) throw new Error('--model DIR is required');
  const window = intFlag(flags, 'window', 256);
  const steps = intFlag(flags, 'steps', 1000);
  const every = intFlag(flags, 'every', 100);
  await initBackend(flags.get('backend') ?? 'wasm', { quiet: true });
  const base = await Transformer.fromFolder(modelDir, { maxBatchSize: 1 });
  const model = withCaches(base, 1, window);
  const samples: MemorySample[] = [];
  const gc = (globalThis as { gc?: () => void }).gc;
  const wasmMemory = (): number => {
    const backend = tf.backend() as unknown as { wasm?: { HEAPU8: Uint8Array } };
    return backend.wasm?.HEAPU8.byteLength ?? 0;
  };
  const sample = (step: number): void => {
    gc?.();
    samples.push({
      step,
      numTensors: tf.memory().numTensors,
      backendBytes: tf.memory().numBytes,
      rssBytes: process.memoryUsage().rss,
      jsHeapBytes: process.memoryUsage().heapUsed,
      jsHeapTotalBytes: process.memoryUsage().heapTotal,
      wasmMemoryBytes: wasmMemory(),
      cacheSlots: kvCacheSlots(model),
      kvCacheBytes: kvCacheBytes(model),
    });
  };
  let next = greedyStep(model, [promptIds(window)], 0);
  next = greedyStep(model, [next], window); // one step so that every per-step buffer exists
  sample(0);
  const t0 = performance.now();
  for (let i = 1; i <= steps; i++) {
    next = greedyStep(model, [next], window + i);
    if (i % every === 0) sample(i);
  }
  const result: MemoryResult = { window, steps, msPerStep: (performance.now() - t0) / steps, samples };
  disposeCaches(model);
  emitResult(result);
}

main().catch((err: unknown) => {
  process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
