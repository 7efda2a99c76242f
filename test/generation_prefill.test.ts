/**
 * generation/'s default prefill: in chunks whose attention scores fit a fixed budget, so that a
 * prompt of any length runs in bounded memory (issue 10, finding 2), with results equal to a
 * prefill of the whole prompt in one forward; between two chunks the event loop runs and an abort
 * takes effect (finding 4).
 *
 * Expected values come from arithmetic done by hand (the chunk lengths), from the whole-prompt
 * prefill (which must agree with the chunked one) or from the sliding window itself: the tiny
 * model's last logits see back at most nLayers * (W - 1) = 14 positions, so two prompts that differ
 * only before that give the same next token and logprobs.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadModel, type Transformer } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { complete, defaultChunkSize, MAX_PREFILL_CHUNK } from '../generation/generate';
import { PREFILL_SCORES_BUDGET_BYTES } from '../model/prefill';
import { maxAbsDiff } from './models';

const TINY = path.resolve(__dirname, '..', 'fixtures', 'tiny');

let model: Transformer;
let sp: SentencePieceProcessor;
/** The length T of every forward since the last reset. */
let forwards: number[] = [];

beforeAll(async () => {
  const loaded = await loadModel(TINY, { maxBatchSize: 1 });
  model = loaded.transformer;
  sp = loaded.tokenizer.processor;
  const forward = model.forward.bind(model);
  model.forward = (ids, pos) => {
    forwards.push(ids.shape[1]);
    return forward(ids, pos);
  };
});

afterAll(() => model?.dispose());

/** `n` ids of ordinary pieces (no BOS/EOS), BOS first; `salt` changes which. */
function promptOf(n: number, salt = 0): number[] {
  return [sp.bosId, ...Array.from({ length: n - 1 }, (_, i) => 3 + ((i * 37 + salt * 11) % (sp.vocabSize - 3)))];
}


describe('default prefill chunk', () => {
  it('is the largest T whose scores [nHeads, T, W-1+T] float32 fit the budget, at most MAX_PREFILL_CHUNK', () => {
    expect(PREFILL_SCORES_BUDGET_BYTES).toBe(256 * 1024 * 1024);
    // 32 heads: 32 * T * (W-1 + T) * 4 <= 2^28 <=> T * (W-1 + T) <= 2^21 = 2097152.
    // W 4096: 256 * 4351 = 1113856 fits, so the cap of 256 decides.
    expect(defaultChunkSize({ nHeads: 32, slidingWindow: 4096 })).toBe(256);
    // W 8192: 248 * 8439 = 2092872 fits, 249 * 8440 = 2101560 does not.
    expect(defaultChunkSize({ nHeads: 32, slidingWindow: 8192 })).toBe(248);
    // A 32k window: 63 * 32830 = 2068290 fits, 64 * 32831 = 2101184 does not.
    expect(defaultChunkSize({ nHeads: 32, slidingWindow: 32768 })).toBe(63);
    // The tiny fixture (4 heads, W 8) and the storyteller (8 heads, W 64): far under the budget.
    expect(defaultChunkSize(model.args)).toBe(MAX_PREFILL_CHUNK);
    expect(defaultChunkSize({ nHeads: 8, slidingWindow: 64 })).toBe(MAX_PREFILL_CHUNK);
    expect(MAX_PREFILL_CHUNK).toBe(256);
    // Absurd shapes still get a chunk of one token rather than none.
    expect(defaultChunkSize({ nHeads: 1024, slidingWindow: 1 << 20 })).toBe(1);
  });
});

describe('complete() prefills in chunks by default', () => {
  it('a 700-token prompt goes in forwards of 256, 256, 188 and gives what one whole forward gives', async () => {
    const ids = promptOf(700);
    forwards = [];
    const chunked = await complete(model, sp, ids, { maxTokens: 5, temperature: 0, promptLogprobs: true });
    expect(forwards).toEqual([256, 256, 188, 1, 1, 1, 1]); // prefill, then 4 decode steps (the 5th token is not fed)
    forwards = [];
    const whole = await complete(model, sp, ids, { maxTokens: 5, temperature: 0, promptLogprobs: true, chunkSize: ids.length });
    expect(forwards).toEqual([700, 1, 1, 1, 1]);
    expect(chunked.generatedIds).toEqual(whole.generatedIds);
    expect(chunked.promptLogprobs).toHaveLength(699);
    const diff = maxAbsDiff(chunked.promptLogprobs!, whole.promptLogprobs!);
    console.log(`700 tokens, default chunks vs one forward: max |prompt logprob diff| = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThan(1e-4);
    expect(maxAbsDiff(chunked.logprobs, whole.logprobs)).toBeLessThan(1e-4);
  });

  it('a long prompt runs in forwards of at most 256 tokens, leaks no tensor, and sees only its window', async () => {
    // (A 32,000-token prompt goes through the server in test/server_limits.test.ts.)
    const a = promptOf(3000, 1);
    const tensorsBefore = tf.memory().numTensors;
    forwards = [];
    const ra = await complete(model, sp, a, { maxTokens: 4, temperature: 0 });
    expect(forwards).toEqual([...Array(11).fill(256), 3000 - 11 * 256, 1, 1, 1]);
    expect(tf.memory().numTensors).toBe(tensorsBefore);

    // Chunked far past the window, what the model sees is the window: a prompt that shares only its
    // last 300 tokens with this one (at the same positions) continues it alike.
    const b = [...promptOf(2700, 2), ...a.slice(2700)];
    expect(b).toHaveLength(3000);
    expect(b.slice(0, 2700)).not.toEqual(a.slice(0, 2700));
    const rb = await complete(model, sp, b, { maxTokens: 4, temperature: 0 });
    expect(rb.generatedIds).toEqual(ra.generatedIds);
    expect(maxAbsDiff(rb.logprobs, ra.logprobs)).toBeLessThan(1e-4);
  });

  it('the event loop runs between two chunks, and an abort stops the prefill within one chunk', async () => {
    const ids = promptOf(2000); // 8 chunks
    forwards = [];
    let forwardsAtImmediate = -1;
    setImmediate(() => (forwardsAtImmediate = forwards.length));
    const controller = new AbortController();
    const model2 = model.forward;
    model.forward = (x, p) => {
      if (forwards.length === 2) controller.abort(); // during the 3rd chunk's forward
      return model2(x, p);
    };
    try {
      const c = await complete(model, sp, ids, { maxTokens: 5, temperature: 0, signal: controller.signal });
      expect(c.finishReason).toBe('abort');
      expect(c.generatedIds).toEqual([]);
    } finally {
      model.forward = model2;
    }
    expect(forwardsAtImmediate).toBe(1); // it ran right after the first chunk, not after the prefill
    expect(forwards).toEqual([256, 256, 256]); // the chunk that saw the abort finished; no other began
  });
});
