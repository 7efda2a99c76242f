/**
 * One definition of the sliding window in every path, and the reference's own test_generate.py
 * property, on the tiny checkpoint (and on its weights with other windows).
 *
 * - Full prefill, prefill-then-decode and chunked prefill give the same logits at every position,
 *   far past W: the mask lets a query see W keys and the rolling cache holds W slots.
 * - test_generation: the logprobs of a generated sequence are reproduced by prefilling the whole
 *   sequence (window 3), as mistral-src's test_generate.py asserts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { generate, Tokenizer, Transformer } from '../one_file_ref';
import { disposeCaches, readBack, tinyModel, withWindow } from './models';

function randomIds(bsz: number, seqlen: number, vocab: number, seed: number): number[][] {
  let s = seed >>> 0;
  const next = (): number => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s % vocab;
  };
  return Array.from({ length: bsz }, () => Array.from({ length: seqlen }, next));
}

/** Logits [B, T, V] (flattened) from a prefill of the first `prefill` tokens, then one token per forward. */
function logitsWithPrefill(model: Transformer, ids: number[][], prefill: number): Float32Array {
  const bsz = ids.length;
  const seqlen = ids[0].length;
  const vocab = model.args.vocabSize;
  const out = new Float32Array(bsz * seqlen * vocab);
  const run = (from: number, to: number): void => {
    const chunk = readBack(() => {
      const input = tf.tensor2d(ids.map((r) => r.slice(from, to)), [bsz, to - from], 'int32');
      return model.forward(input, tf.range(from, to, 1, 'int32') as tf.Tensor1D);
    });
    const width = (to - from) * vocab;
    for (let b = 0; b < bsz; b++) out.set(chunk.subarray(b * width, (b + 1) * width), (b * seqlen + from) * vocab);
  };
  run(0, prefill);
  for (let t = prefill; t < seqlen; t++) run(t, t + 1);
  return out;
}

/** Logits [B, T, V] (flattened) from forwards of `chunk` tokens at a time through the rolling cache. */
function logitsInChunks(model: Transformer, ids: number[][], chunk: number): Float32Array {
  const bsz = ids.length;
  const seqlen = ids[0].length;
  const vocab = model.args.vocabSize;
  const out = new Float32Array(bsz * seqlen * vocab);
  for (let from = 0; from < seqlen; from += chunk) {
    const to = Math.min(seqlen, from + chunk);
    const logits = readBack(() => {
      const input = tf.tensor2d(ids.map((r) => r.slice(from, to)), [bsz, to - from], 'int32');
      return model.forward(input, tf.range(from, to, 1, 'int32') as tf.Tensor1D);
    });
    const width = (to - from) * vocab;
    for (let b = 0; b < bsz; b++) out.set(logits.subarray(b * width, (b + 1) * width), (b * seqlen + from) * vocab);
  }
  return out;
}


/** test_generate.py's DebugTokenizer: text is space-separated token ids. */
class DebugTokenizer {
  readonly bosId = 1;
  readonly eosId = 2;
  readonly padId = -1;
  encode(s: string, bos = true): number[] {
    const t = s.split(/\s+/).filter((x) => x !== '').map(Number);
    return bos ? [this.bosId, ...t] : t;
  }
  decode(t: number[]): string {
    return t.join(' ');
  }
}

describe('sliding window', () => {
  let base: Transformer;
  beforeAll(async () => {
    base = await tinyModel({ maxBatchSize: 4 });
  });
  afterAll(() => base.dispose());

  it.each([
    [8, 1],
    [8, 5],
    [8, 8],
    [8, 13],
    [3, 2],
    [5, 7],
  ])('W=%i: prefill of %i tokens then decode equals full prefill at every position up to 6W', (W, prefill) => {
    const model = withWindow(base, W, 2);
    try {
      const ids = randomIds(2, 6 * W, model.args.vocabSize, 1000 * W + prefill);
      const before = tf.memory().numTensors;
      const full = logitsWithPrefill(model, ids, ids[0].length);
      const stepped = logitsWithPrefill(model, ids, prefill);
      expect(tf.memory().numTensors).toBe(before);
      let worst = 0;
      for (let i = 0; i < full.length; i++) worst = Math.max(worst, Math.abs(full[i] - stepped[i]));
      console.log(`W=${W}, prefill ${prefill}, T=${6 * W}: max |full - stepped| = ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-4);
    } finally {
      disposeCaches(model);
    }
  });

  it.each([
    [4, 5],
    [4, 3],
    [8, 8],
    [8, 3],
    [3, 7],
    [5, 1],
  ])('W=%i: chunked prefill, %i tokens a forward, equals full prefill at every position up to 6W', (W, chunk) => {
    const model = withWindow(base, W, 2);
    try {
      const ids = randomIds(2, 6 * W, model.args.vocabSize, 77 * W + chunk);
      const before = tf.memory().numTensors;
      const full = logitsWithPrefill(model, ids, ids[0].length);
      const chunked = logitsInChunks(model, ids, chunk);
      expect(tf.memory().numTensors).toBe(before);
      let worst = 0;
      for (let i = 0; i < full.length; i++) worst = Math.max(worst, Math.abs(full[i] - chunked[i]));
      console.log(`W=${W}, chunks of ${chunk}, T=${6 * W}: max |full - chunked| = ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-4);
    } finally {
      disposeCaches(model);
    }
  });

  it('tokens farther back than W do not change a logit; nearer ones do', () => {
    const W = 4;
    const model = withWindow(base, W, 2);
    try {
      const [row] = randomIds(1, 12, model.args.vocabSize, 7);
      const altered = [...row];
      altered[3] = (altered[3] + 1) % model.args.vocabSize; // position 3 is outside position 11's window but feeds it via layer 0 -> 1
      const logits = logitsWithPrefill(model, [row, altered], row.length);
      const V = model.args.vocabSize;
      const at = (b: number, t: number): Float32Array => logits.subarray((b * 12 + t) * V, (b * 12 + t + 1) * V);
      const diff = (t: number): number => Math.max(...Array.from(at(0, t), (x, i) => Math.abs(x - at(1, t)[i])));
      // With 2 layers a token reaches positions up to 2(W-1) ahead: 3 + 6 = 9. Beyond that, nothing.
      expect(diff(9)).toBeGreaterThan(1e-3);
      expect(diff(10)).toBe(0);
      expect(diff(11)).toBe(0);
      expect(diff(2)).toBe(0); // causal
    } finally {
      disposeCaches(model);
    }
  });
});

describe("the reference's test_generate.py property", () => {
  it('test_generation: logprobs of generated sequences are reproduced by prefilling them (window 3)', async () => {
    const base = await tinyModel({ maxBatchSize: 4 });
    const model = withWindow(base, 3, 4);
    const tokenizer = new DebugTokenizer() as unknown as Tokenizer;
    try {
      const sequences = ['1 2 3 4 5 6 7', '0 1 2', '12 13 14', '2 4 34'];
      const before = tf.memory().numTensors;
      const { texts, logprobs: lpOld } = await generate(sequences, model, tokenizer, 7);
      const toks = texts.map((r) => r.split(' ').slice(1).join(' ')); // remove BOS
      const { texts: none, logprobs: lpNew } = await generate(toks, model, tokenizer, 0);
      expect(tf.memory().numTensors).toBe(before);
      expect(none).toEqual([]);
      expect(lpOld.length).toBe(sequences.length);
      expect(lpNew.length).toBe(sequences.length);
      let worst = 0;
      lpOld.forEach((row, i) => {
        // zip() in the reference: compare over the shorter row
        const n = Math.min(row.length, lpNew[i].length);
        expect(n).toBeGreaterThan(0);
        for (let j = 0; j < n; j++) worst = Math.max(worst, Math.abs(row[j] - lpNew[i][j]));
      });
      console.log(`test_generation: max |logprob diff| = ${worst.toExponential(2)} (reference asserts 1e-5)`);
      expect(worst).toBeLessThan(1e-5);
    } finally {
      disposeCaches(model);
      base.dispose();
    }
  });
});
