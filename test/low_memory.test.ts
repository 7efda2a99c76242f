/**
 * Low-memory mode: the layers' weights stay on the host as stored and are widened to float32 only
 * while they run. It must give exactly the logits of the resident model, leak nothing, and be
 * chosen when the float32 weights would not fit the backend.
 */
import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { residentBytes, Transformer } from '../one_file_ref';
import { MISTRAL_7B_ARGS, modelArgs, readBack, tinyModel } from './models';


function logits(model: Transformer, ids: number[][]): Float32Array {
  return readBack(() => {
    const input = tf.tensor2d(ids, [ids.length, ids[0].length], 'int32');
    return model.forward(input, tf.range(0, ids[0].length, 1, 'int32') as tf.Tensor1D);
  });
}

describe('low-memory mode', () => {
  it('gives the same logits as the resident model, bit for bit, and frees each widened weight', async () => {
    const resident = await tinyModel({ maxBatchSize: 2, lowMemory: false });
    const low = await tinyModel({ maxBatchSize: 2, lowMemory: true });
    try {
      const ids = [
        [1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120],
        [1, 21, 31, 41, 51, 61, 71, 81, 91, 101, 111, 121],
      ];
      const a = logits(resident, ids);
      const before = tf.memory().numTensors;
      const b = logits(low, ids);
      expect(tf.memory().numTensors).toBe(before);
      expect(Array.from(b)).toEqual(Array.from(a));
      // decode steps too
      for (let t = 12; t < 20; t++) {
        const step = (m: Transformer): Float32Array =>
          readBack(() => m.forward(tf.tensor2d([[t], [t + 1]], [2, 1], 'int32'), tf.tensor1d([t], 'int32')));
        expect(Array.from(step(low))).toEqual(Array.from(step(resident)));
      }
      expect(tf.memory().numTensors).toBe(before);
    } finally {
      resident.dispose();
      low.dispose();
    }
  });

  it('counts Mistral 7B as 7,241,732,096 parameters: 29 GB of float32, over the wasm backend\'s 4 GiB', () => {
    const args = modelArgs({}, MISTRAL_7B_ARGS); // params.json of Mistral-7B-v0.1
    const bytes = residentBytes(args);
    const params = 7_241_732_096;
    const cache = 2 * 32 * 4096 * 8 * 128; // K and V, 32 layers, one batch row, 4096 slots, 8 kv heads of 128
    const rope = 128_000 * 128; // cos and sin tables, 64 columns each
    expect(bytes.full).toBe(4 * (params + cache + rope));
    // Low memory: embeddings, output and the final norm stay, plus the largest layer weight (w1, 14336 x 4096).
    expect(bytes.lowMemory).toBe(4 * (2 * 32000 * 4096 + 4096 + 14336 * 4096 + cache + rope));
    expect(bytes.full).toBeGreaterThan(4 * 1024 ** 3);
    expect(bytes.lowMemory).toBeLessThan(0.9 * 4 * 1024 ** 3);
  });
});
