/**
 * The port's workloads, shared by the benchmark's child processes: a fresh set of KV caches over
 * loaded weights, one greedy step (forward, argmax on the backend, only the ids read back), and
 * the prefill / decode / batch-decode timings.
 */
import * as tf from '@tensorflow/tfjs-core';
import { ModelArgs, Transformer } from '../one_file_ref';
import { promptIds } from './common';

/** The same weights with fresh caches (and, if given, another window or batch size). */
export function withCaches(base: Transformer, maxBatchSize: number, slidingWindow = base.args.slidingWindow): Transformer {
  const a = base.args;
  const args = new ModelArgs(a.dim, a.nLayers, a.headDim, a.hiddenDim, a.nHeads, a.nKvHeads, slidingWindow, a.normEps, a.vocabSize, a.ropeTheta, maxBatchSize);
  return new Transformer(args, base.stateDict);
}

/** Frees what withCaches made (the caches and rotary tables), not the shared weights. */
export function disposeCaches(model: Transformer): void {
  for (const layer of model.layers) layer.attention.dispose();
  model.freqsCis.cos.dispose();
  model.freqsCis.sin.dispose();
}

/** Bytes held by the KV caches of every layer. */
export function kvCacheBytes(model: Transformer): number {
  return model.layers.reduce((n, l) => n + 4 * (l.attention.cache.k.size + l.attention.cache.v.size), 0);
}

/** Slots of each layer's cache (its second dimension). */
export function kvCacheSlots(model: Transformer): number[] {
  return model.layers.map((l) => l.attention.cache.k.shape[1]);
}

/** One forward of `ids` ([B, T]) at positions start..start+T-1; the greedy next id of each row. */
export function greedyStep(model: Transformer, ids: number[][], start: number): number[] {
  return tf.tidy(() => {
    const [bsz, seqlen] = [ids.length, ids[0].length];
    const input = tf.tensor2d(ids, [bsz, seqlen], 'int32');
    const logits = model.forward(input, tf.range(start, start + seqlen, 1, 'int32') as tf.Tensor1D); // [B, T, V]
    const last = tf.reshape(tf.slice(logits, [0, seqlen - 1, 0], [bsz, 1, -1]), [bsz, -1]); // [B, V]
    return Array.from(tf.argMax(last, -1).dataSync());
  });
}

export interface RunTimes {
  /** Seconds for the prefill forward (batch 1) and the read-back of its next id. */
  prefillS: number;
  /** Seconds for `decode` greedy steps after it. */
  decodeS: number;
  /** Seconds for `batchDecode` greedy steps of `batch` rows after a batch prefill (not timed). */
  batchDecodeS: number;
  /** KV-cache bytes after the batch-1 run. */
  kvCacheBytes: number;
}

export interface Workload {
  prefill: number;
  decode: number;
  batch: number;
  batchPrefill: number;
  batchDecode: number;
}

const seconds = (t0: number): number => (performance.now() - t0) / 1000;

/** One run of the three workloads, each on fresh caches. */
export function runWorkloads(base: Transformer, w: Workload): RunTimes {
  const one = withCaches(base, 1);
  let t0 = performance.now();
  let next = greedyStep(one, [promptIds(w.prefill)], 0);
  const prefillS = seconds(t0);
  t0 = performance.now();
  for (let i = 0; i < w.decode; i++) next = greedyStep(one, [next], w.prefill + i);
  const decodeS = seconds(t0);
  const cacheBytes = kvCacheBytes(one);
  disposeCaches(one);

  let batchDecodeS = 0;
  if (w.batch > 0 && w.batchDecode > 0) {
    const many = withCaches(base, w.batch);
    let ids = greedyStep(many, Array.from({ length: w.batch }, (_, b) => promptIds(w.batchPrefill, b)), 0);
    t0 = performance.now();
    for (let i = 0; i < w.batchDecode; i++) ids = greedyStep(many, ids.map((id) => [id]), w.batchPrefill + i);
    batchDecodeS = seconds(t0);
    disposeCaches(many);
  }
  return { prefillS, decodeS, batchDecodeS, kvCacheBytes: cacheBytes };
}
