/**
 * Memory over long decodes: the tensor count and the backend's bytes stay flat step after step, and
 * the rolling KV cache holds exactly sliding_window slots per layer once the sequence reaches the
 * window, however long it gets. (RSS is the benchmark's business: bench/memory.ts.)
 *
 * The expected cache shape comes from fixtures/tiny/params.json (sliding_window 8, n_kv_heads 2,
 * head_dim 16, n_layers 2), not from the port.
 */
import * as fs from 'fs';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { readBack, Transformer } from '../one_file_ref';
import { disposeCaches, TINY, tinyModel, withWindow } from './models';


const PARAMS = JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8')) as {
  sliding_window: number;
  n_kv_heads: number;
  head_dim: number;
  n_layers: number;
  vocab_size: number;
};
const W = PARAMS.sliding_window;

/** One greedy step for every row; only the ids are read back. */
function step(model: Transformer, ids: number[][], start: number): number[] {
  return Array.from(readBack(() => {
    const [bsz, seqlen] = [ids.length, ids[0].length];
    const logits = model.forward(tf.tensor2d(ids, [bsz, seqlen], 'int32'), tf.range(start, start + seqlen, 1, 'int32') as tf.Tensor1D);
    return tf.argMax(tf.reshape(tf.slice(logits, [0, seqlen - 1, 0], [bsz, 1, -1]), [bsz, -1]), -1);
  }));
}

function cacheShapes(model: Transformer): number[][] {
  return model.layers.flatMap((l) => [l.attention.cache.k.shape, l.attention.cache.v.shape]);
}

describe('memory over long decodes', () => {
  for (const lowMemory of [false, true]) {
    it(`${lowMemory ? 'low-memory mode' : 'resident weights'}: 20W decode steps after a 3-token prefill leak no tensor and keep W slots per layer`, async () => {
      const before = tf.memory().numTensors;
      const model = await tinyModel({ lowMemory });
      try {
        let next = step(model, [[1, 20, 30]], 0);
        next = step(model, [next], 3);
        const tensors = tf.memory().numTensors;
        let bytesAtW: number | null = null;
        for (let pos = 4; pos < 20 * W; pos++) {
          next = step(model, [next], pos);
          expect(tf.memory().numTensors).toBe(tensors);
          const slots = model.layers.map((l) => l.attention.cache.k.shape[1]);
          // position pos is written, so pos + 1 positions have been seen; the cache never holds more than W
          expect(slots.every((s) => s <= W && s >= Math.min(W, pos + 1))).toBe(true);
          if (pos >= W - 1) {
            bytesAtW ??= tf.memory().numBytes;
            expect(tf.memory().numBytes).toBe(bytesAtW);
          }
        }
        const expected = [1, W, PARAMS.n_kv_heads, PARAMS.head_dim];
        expect(cacheShapes(model)).toEqual(Array.from({ length: 2 * PARAMS.n_layers }, () => expected));
      } finally {
        model.dispose();
      }
      expect(tf.memory().numTensors).toBe(before);
    });
  }

  it('batch 3, chunked prefill of 5W tokens then 5W steps: every cache is [3, W, K, d], tensor count flat', async () => {
    const base = await tinyModel({ maxBatchSize: 3 });
    try {
      // a window of 5 instead of 8, the same weights: W does not depend on params.json alone
      const w5 = withWindow(base, 5, 3);
      const rows = [0, 1, 2].map((b) => Array.from({ length: 25 }, (_, i) => (3 + 7 * i + 11 * b) % PARAMS.vocab_size));
      let next: number[] = [];
      for (let from = 0; from < 25; from += 4) {
        const to = Math.min(25, from + 4);
        next = step(w5, rows.map((r) => r.slice(from, to)), from);
        expect(w5.layers.every((l) => l.attention.cache.k.shape[1] <= 5)).toBe(true);
      }
      const tensors = tf.memory().numTensors;
      for (let pos = 25; pos < 50; pos++) {
        next = step(w5, next.map((id) => [id]), pos);
        expect(tf.memory().numTensors).toBe(tensors);
      }
      expect(cacheShapes(w5)).toEqual(Array.from({ length: 2 * PARAMS.n_layers }, () => [3, 5, PARAMS.n_kv_heads, PARAMS.head_dim]));
      disposeCaches(w5);
    } finally {
      base.dispose();
    }
  });
});
