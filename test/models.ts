/** Test helpers: the tiny model and its tokenizer, ModelArgs with defaults, other windows, read-back. */
import * as fs from 'fs';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'vitest';
import { type LoadOptions, ModelArgs, Tokenizer, Transformer } from '../one_file_ref';

/** fixtures/tiny: params.json (dim 64, 2 layers, 4 heads / 2 kv heads of 16, window 8, vocab 512), bf16 weights, tokenizer. */
export const TINY = path.resolve(__dirname, '..', 'fixtures', 'tiny');

/** The tiny model (maxBatchSize 1 unless `opts` says otherwise); the caller disposes it. */
export function tinyModel(opts: LoadOptions = {}): Promise<Transformer> {
  return Transformer.fromFolder(TINY, { maxBatchSize: 1, ...opts });
}

/** The tiny model and its tokenizer. */
export async function tinyModelAndTokenizer(opts: LoadOptions = {}): Promise<{ model: Transformer; tokenizer: Tokenizer }> {
  const tokenizer = await Tokenizer.load(path.join(TINY, 'tokenizer.model'));
  return { model: await tinyModel(opts), tokenizer };
}

type ArgsFields = Omit<{ -readonly [K in keyof ModelArgs]: ModelArgs[K] }, never>;

/** fixtures/tiny/params.json as ModelArgs fields. */
export const TINY_ARGS: ArgsFields = { ...ModelArgs.fromParams(JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8'))) };

/** Mistral-7B-v0.1's params.json, batch 1. */
export const MISTRAL_7B_ARGS: ArgsFields = {
  dim: 4096, nLayers: 32, headDim: 128, hiddenDim: 14336, nHeads: 32, nKvHeads: 8,
  slidingWindow: 4096, normEps: 1e-5, vocabSize: 32000, ropeTheta: 10000, maxBatchSize: 1,
};

/** ModelArgs from `base` (the tiny model's by default) with some fields changed. */
export function modelArgs(overrides: Partial<ArgsFields> = {}, base: ArgsFields = TINY_ARGS): ModelArgs {
  const a = { ...base, ...overrides };
  return new ModelArgs(a.dim, a.nLayers, a.headDim, a.hiddenDim, a.nHeads, a.nKvHeads, a.slidingWindow, a.normEps, a.vocabSize, a.ropeTheta, a.maxBatchSize);
}

/**
 * The same weights with another sliding window and batch size, in a model with KV caches of its
 * own (the weights do not depend on the window). Free it with disposeCaches(), not dispose(): the
 * weights belong to `base`.
 */
export function withWindow(base: Transformer, slidingWindow: number, maxBatchSize: number): Transformer {
  return new Transformer(modelArgs({ slidingWindow, maxBatchSize }, base.args), base.stateDict);
}

/** Frees the KV caches and rotary tables of a model made by withWindow(). */
export function disposeCaches(model: Transformer): void {
  for (const layer of model.layers) layer.attention.dispose();
  tf.dispose([model.freqsCis.cos, model.freqsCis.sin]);
}

/**
 * The values of a float32 tensor made by `f`, read back after tf.tidy has freed everything else.
 * (Returning dataSync()'s array from inside tf.tidy makes tidy walk every element looking for tensors.)
 */
export function readBack(f: () => tf.Tensor): Float32Array {
  const t = tf.tidy(f);
  try {
    return t.dataSync() as Float32Array;
  } finally {
    t.dispose();
  }
}

/**
 * The largest |a[i] - b[i]|, for tolerances; NaN when any difference is NaN, so that a NaN anywhere
 * fails the comparison (a running maximum would let a later finite value hide it).
 */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (Number.isNaN(d)) return NaN;
    if (d > worst) worst = d;
  }
  return worst;
}
