/**
 * The Python reference's dumps in fixtures/reference (fixtures/dump_reference.py): their index, their
 * arrays, and the port's logits for a dumped case, shared by the parity suites (tfjs path and
 * compute pool).
 */
import * as fs from 'fs';
import * as path from 'path';
import { expect } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import type { Transformer } from '../one_file_ref';
import { readNpy } from '../checkpoint/npy';
import { readBack } from './models';
export { maxAbsDiff } from './models';

export const ROOT = path.resolve(__dirname, '..');
export const REFERENCE = path.join(ROOT, 'fixtures', 'reference');
export const TOLERANCE = 1e-4;

export interface NpyRef {
  file: string;
  shape: number[];
}
export interface Case {
  name: string;
  kind: 'prefill' | 'prefill_decode' | 'generate' | 'demo';
  ids?: number[][];
  positions?: number[];
  start_pos?: number;
  forward_positions?: number[][];
  logits?: NpyRef;
  prompts?: string[];
  max_tokens?: number;
  generated_ids?: number[][];
  texts?: string[];
  stdout?: string;
  all_logprobs?: NpyRef;
}
export interface Index {
  rope?: { positions: number[]; cos: NpyRef; sin: NpyRef };
  mask: 'w-keys' | 'as-written';
  model_folder: string;
  max_batch_size: number;
  params: { sliding_window: number };
  checkpoint_dtype: string;
  cases: Case[];
}

export function loadIndex(config: string): Index {
  return JSON.parse(fs.readFileSync(path.join(REFERENCE, config, 'index.json'), 'utf8')) as Index;
}

export function loadArray(config: string, ref: NpyRef): Float32Array {
  const { data, shape } = readNpy(path.join(REFERENCE, config, ref.file));
  expect(shape).toEqual(ref.shape);
  return Float32Array.from(data as ArrayLike<number>);
}


/**
 * Runs the port on a case's tokens as a fresh sequence (nothing in the cache before it), one forward
 * per group of positions; logits [B, T, V] flattened.
 */
export function portLogits(model: Transformer, ids: number[][], forwards: number[][]): Float32Array {
  const bsz = ids.length;
  const seqlen = ids[0].length;
  const vocab = model.args.vocabSize;
  const out = new Float32Array(bsz * seqlen * vocab);
  model.book.clear();
  for (const positions of forwards) {
    const from = positions[0] - forwards[0][0]; // the index in the rows of this forward's first token
    const chunk = readBack(() => {
      const input = tf.tensor2d(ids.map((r) => r.slice(from, from + positions.length)), [bsz, positions.length], 'int32');
      return model.forward(input, tf.tensor1d(positions, 'int32'));
    });
    const width = positions.length * vocab;
    for (let b = 0; b < bsz; b++) out.set(chunk.subarray(b * width, (b + 1) * width), (b * seqlen + from) * vocab);
  }
  return out;
}

