/**
 * Prefill in chunks by default, bounded by a memory budget for the attention scores, with the
 * logits of one forward; the logits command for a sequence placed at any position; and no large
 * JavaScript array handed back out of tf.tidy (which walks it element by element looking for
 * tensors: that made `logits` ten times slower than its forward).
 *
 * Expected values: the reference's dumps (fixtures/reference, fixtures/dump_reference.py) and the
 * arithmetic of the scores' shape, written out here.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { generate, Tokenizer, Transformer } from '../one_file_ref';
import { maxAbsDiff, TINY, tinyModelAndTokenizer } from './models';
import { budgetChunkLength, prefillChunkLength, PREFILL_SCORES_BUDGET_BYTES } from '../model/prefill';
import { logitsCommand } from '../cli/logits';
import { readNpy } from '../checkpoint/npy';

const ROOT = path.resolve(__dirname, '..');
const REFERENCE = path.join(ROOT, 'fixtures', 'reference', 'tiny');
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'prefill-chunks-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));

interface RefCase {
  name: string;
  ids: number[][];
  start_pos?: number;
  logits: { file: string; shape: number[] };
}
const INDEX = JSON.parse(fs.readFileSync(path.join(REFERENCE, 'index.json'), 'utf8')) as { cases: RefCase[] };
const refCase = (name: string): RefCase => INDEX.cases.find((c) => c.name === name)!;


async function runLogits(ids: number[][], extra: string[]): Promise<Float32Array> {
  const out = path.join(TMP, `logits-${Math.random().toString(36).slice(2)}.npy`);
  await logitsCommand([TINY, ...ids.flatMap((r) => ['--tokens', r.join(',')]), '--out', out, '--quiet', ...extra]);
  return readNpy(out).data as Float32Array;
}

describe('prefillChunkLength', () => {
  // scores [bsz, nHeads, chunk, (W - 1) + chunk] float32 within the budget, one more token past it
  const fits = (heads: number, W: number, bsz: number, chunk: number): boolean => 4 * bsz * heads * chunk * (W - 1 + chunk) <= 256 * 1024 ** 2;
  it.each([
    ['Mistral 7B, batch 1', 32, 4096, 1, 460],
    ['Mistral 7B, batch 3', 32, 4096, 3, 164],
    ['8 heads, W 4096', 8, 4096, 1, 1499],
    ['storyteller (8 heads, W 64)', 8, 64, 1, 2864],
  ])('%s: %i heads, W %i, batch %i -> the budget allows %i tokens', (_name, heads, W, bsz, expected) => {
    expect(PREFILL_SCORES_BUDGET_BYTES).toBe(256 * 1024 ** 2);
    const chunk = budgetChunkLength({ nHeads: heads, slidingWindow: W }, bsz);
    expect(fits(heads, W, bsz, chunk)).toBe(true);
    expect(fits(heads, W, bsz, chunk + 1)).toBe(false);
    expect(chunk).toBe(expected);
    // and no longer than max(W, 512) tokens: past W a longer chunk only adds masked scores
    expect(prefillChunkLength({ nHeads: heads, slidingWindow: W }, bsz)).toBe(Math.min(expected, Math.max(W, 512)));
  });

  it('is at least 1 however small the budget', () => {
    expect(prefillChunkLength({ nHeads: 32, slidingWindow: 4096 }, 1, 1)).toBe(1);
  });
});

describe('the logits command', () => {
  it("--start-pos 3 on a fresh model: the reference's logits for those tokens at positions 3.. (issue 10 item 10)", async () => {
    const c = refCase('start_0');
    expect(c.start_pos).toBe(3);
    const got = await runLogits(c.ids, ['--start-pos', '3']);
    const diff = maxAbsDiff(got, readNpy(path.join(REFERENCE, c.logits.file)).data);
    console.log(`logits --start-pos 3: max |diff| vs reference = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
  });

  it("--start-pos 40000 in chunks of 5 tokens (across the W = 8 window): the reference's one forward", async () => {
    const c = refCase('start_1');
    const got = await runLogits(c.ids, ['--start-pos', String(c.start_pos), '--chunk-size', '5']);
    const diff = maxAbsDiff(got, readNpy(path.join(REFERENCE, c.logits.file)).data);
    console.log(`logits --start-pos 40000 --chunk-size 5: max |diff| vs reference = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
  });

  describe('no large array comes back out of tf.tidy (issue 10 item 11)', () => {
    let returned: unknown[];
    beforeAll(() => {
      returned = [];
      const engine = tf.engine();
      const tidy = engine.tidy.bind(engine);
      vi.spyOn(engine, 'tidy').mockImplementation(((nameOrFn: unknown, fn?: unknown) => {
        const result = (tidy as (a: unknown, b?: unknown) => unknown)(nameOrFn, fn);
        returned.push(result);
        return result;
      }) as typeof engine.tidy);
    });
    afterEach(() => {
      returned = [];
    });
    afterAll(() => vi.restoreAllMocks());
    const large = (x: unknown): boolean => ArrayBuffer.isView(x) || (Array.isArray(x) && x.length > 64);

    it('logits for 128 tokens: tidy returns only tensors, never the logits array', async () => {
      const ids = [Array.from({ length: 128 }, (_, i) => (7 * i + 3) % 512)];
      await runLogits(ids, []);
      await runLogits(ids, ['--prefill', '120', '--chunk-size', '50']);
      expect(returned.length).toBeGreaterThan(100); // the spy saw the forwards' tidies
      expect(returned.filter(large)).toEqual([]);
    });

    it("the reference's generate(): tidy returns only tensors", async () => {
      const { model, tokenizer } = await tinyModelAndTokenizer({ maxBatchSize: 2 });
      try {
        await generate(['Once upon a time there was a', 'The baker counted twelve golden cakes at the market'], model, tokenizer, 6, 4);
      } finally {
        model.dispose();
      }
      expect(returned.length).toBeGreaterThan(10);
      expect(returned.filter(large)).toEqual([]);
    });
  });
});

describe("the reference's generate() prefills in chunks with the logits of one forward", () => {
  let model: Transformer;
  let tokenizer: Tokenizer;
  beforeAll(async () => {
    ({ model, tokenizer } = await tinyModelAndTokenizer({ maxBatchSize: 3 }));
  });
  afterAll(() => model.dispose());

  it.each([1, 3, 8, 13])('chunks of %i tokens, prompts of 20 to 40 tokens (W = 8): the same ids and logprobs', async (chunk) => {
    const prompts = [
      'The old sailor said that the sea was calm and the wind was kind to every boat that day',
      'Once upon a time in a small town there lived a baker who counted twelve golden cakes at the market every morning',
      'Kofi found 3 keys at the old mill near the river, and one of them opened the door',
    ];
    const before = tf.memory().numTensors;
    const whole = await generate(prompts, model, tokenizer, 12, 10_000);
    const chunked = await generate(prompts, model, tokenizer, 12, chunk);
    expect(tf.memory().numTensors).toBe(before);
    expect(Math.min(...prompts.map((p) => tokenizer.encode(p).length))).toBeGreaterThan(2 * 8);
    expect(chunked.generatedIds).toEqual(whole.generatedIds);
    expect(chunked.texts).toEqual(whole.texts);
    const diff = maxAbsDiff(chunked.logprobs.flat(), whole.logprobs.flat());
    console.log(`generate() in chunks of ${chunk}: max |logprob diff| vs one forward = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-5);
  });
});
