/**
 * generation/: sampling (mulberry32, temperature, top-k, top-p on hand-built distributions with
 * hand-computed expectations) and complete() on the tiny checkpoint.
 *
 * Expected values come from the Python reference's dumps (fixtures/reference/tiny: the greedy
 * continuation of a single prompt, which the reference's batched generate() does not teacher-force),
 * from mulberry32's C original (compiled and run, outputs below), or from reasoning stated beside
 * each. mistral-src's test_chunks is ported: window 4, chunk 5, logprobs with chunks equal without.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Transformer } from '../one_file_ref';
import { disposeCaches, maxAbsDiff, withWindow } from './models';
import { SentencePieceProcessor } from '../tokenizer';
import { readNpy } from '../checkpoint/npy';
import { complete, GenerationError, TextOutput, type Completion, type TokenStep } from '../generation/generate';
import { argmax, candidates, draw, logprobOf, mulberry32, Sampler, SamplingError, type Candidates } from '../generation/sampling';
import { HELP, run } from '../cli/main';
import { UsageError } from '../cli/args';

const ROOT = path.resolve(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const REFERENCE = path.join(ROOT, 'fixtures', 'reference', 'tiny');

interface GenerateCase {
  name: string;
  kind: string;
  max_tokens: number;
  encoded_prompts: number[][];
  generated_ids: number[][];
  texts: string[];
  all_logprobs: { file: string; shape: number[] };
}
const INDEX = JSON.parse(fs.readFileSync(path.join(REFERENCE, 'index.json'), 'utf8')) as { cases: GenerateCase[] };
const referenceCase = (name: string): GenerateCase => INDEX.cases.find((c) => c.name === name)!;
/** Row `row` of a case's all_logprobs [B, N]. */
function referenceLogprobs(c: GenerateCase, row: number): number[] {
  const { data, shape } = readNpy(path.join(REFERENCE, c.all_logprobs.file));
  return Array.from(data.subarray(row * shape[1], (row + 1) * shape[1]));
}


describe('mulberry32', () => {
  it("matches Tommy Ettinger's C original", () => {
    // From the C function (state += 0x6D2B79F5; two multiply-xorshift rounds) compiled with gcc,
    // printing the first five uint32 outputs for each seed.
    const expected: Record<number, number[]> = {
      0: [1144304738, 1416247, 958946056, 627933444, 2007157716],
      42: [2581720956, 1925393290, 3661312704, 2876485805, 750819978],
      4294967295: [3850105811, 813802916, 3073704848, 4054706436, 3630262831],
    };
    for (const [seed, outputs] of Object.entries(expected)) {
      const next = mulberry32(Number(seed));
      expect(outputs.map(() => next() * 2 ** 32)).toEqual(outputs);
    }
  });
});

describe('sampling on hand-built distributions', () => {
  // p = 0.5, 0.3, 0.15, 0.05 on ids 1, 3, 0, 2; logits = ln p + 3 (softmax ignores the shift).
  const logits = [Math.log(0.15) + 3, Math.log(0.5) + 3, Math.log(0.05) + 3, Math.log(0.3) + 3];
  const close = (got: number[], want: number[]): void => {
    expect(got.length).toBe(want.length);
    got.forEach((x, i) => expect(x).toBeCloseTo(want[i], 12));
  };

  it('temperature 1, top-p 1: the whole distribution, most likely first', () => {
    const c = candidates(logits, { temperature: 1, topP: 1 });
    expect(c.ids).toEqual([1, 3, 0, 2]);
    close(c.probs, [0.5, 0.3, 0.15, 0.05]);
  });

  it("top-p keeps a token while the mass before it is <= p (main.py's sample_top_p), renormalised", () => {
    // mass before each: 0, 0.5, 0.8, 0.95
    let c = candidates(logits, { temperature: 1, topP: 0.7 });
    expect(c.ids).toEqual([1, 3]);
    close(c.probs, [0.5 / 0.8, 0.3 / 0.8]);
    c = candidates(logits, { temperature: 1, topP: 0.85 });
    expect(c.ids).toEqual([1, 3, 0]);
    close(c.probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]);
    c = candidates(logits, { temperature: 1, topP: 0.3 });
    expect(c.ids).toEqual([1]); // the most likely token always stays
    close(c.probs, [1]);
  });

  it('temperature divides the logits: p^(1/T), renormalised', () => {
    // T = 0.5: p^2 = 0.25, 0.09, 0.0225, 0.0025 (sum 0.365)
    let c = candidates(logits, { temperature: 0.5, topP: 1 });
    close(c.probs, [0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]);
    // with top-p 0.9: mass before the third is (0.25 + 0.09) / 0.365 = 0.93 > 0.9
    c = candidates(logits, { temperature: 0.5, topP: 0.9 });
    expect(c.ids).toEqual([1, 3]);
    close(c.probs, [0.25 / 0.34, 0.09 / 0.34]);
    // T = 2: sqrt(p)
    const roots = [0.5, 0.3, 0.15, 0.05].map(Math.sqrt);
    const sum = roots.reduce((a, b) => a + b, 0);
    close(candidates(logits, { temperature: 2, topP: 1 }).probs, roots.map((r) => r / sum));
  });

  it('top-k keeps the k most likely, before top-p', () => {
    let c = candidates(logits, { temperature: 1, topP: 1, topK: 2 });
    expect(c.ids).toEqual([1, 3]);
    close(c.probs, [0.625, 0.375]);
    // top 3 renormalised: 0.5, 0.3, 0.15 over 0.95; mass before the third = 0.8 / 0.95 = 0.842
    c = candidates(logits, { temperature: 1, topP: 0.8, topK: 3 });
    expect(c.ids).toEqual([1, 3]); // on the whole distribution it would be 0.8 <= 0.8: kept
    close(c.probs, [0.625, 0.375]);
    c = candidates(logits, { temperature: 1, topP: 0.85, topK: 3 });
    expect(c.ids).toEqual([1, 3, 0]);
    close(c.probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]);
    expect(candidates(logits, { temperature: 1, topP: 1, topK: 10 }).ids).toEqual([1, 3, 0, 2]); // k > V: all
    expect(candidates(logits, { temperature: 1, topP: 1, topK: 0 }).ids).toEqual([1, 3, 0, 2]); // 0: off
  });

  it("equals main.py's sample_top_p written out plainly (full sort, cumsum, mask), on 2000-token distributions", () => {
    // main.py, line by line: probs = softmax(logits / T); sort descending; mask = cumsum - p_sorted > top_p;
    // zero the masked; renormalise. Top-k (not in main.py) first keeps the k largest logits.
    const plain = (logits: number[], T: number, topP: number, topK: number): Candidates => {
      let order = logits.map((_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
      if (topK > 0) order = order.slice(0, topK);
      const m = Math.max(...order.map((i) => logits[i]));
      const e = order.map((i) => Math.exp((logits[i] - m) / T));
      const z = e.reduce((a, b) => a + b, 0);
      const probs = e.map((x) => x / z);
      let cumsum = 0;
      const keep = probs.map((p) => {
        cumsum += p;
        // p = 1: all (float rounding may push cumsum over 1); probability 0 (underflow) is never drawn: left out
        return p > 0 && (topP >= 1 || !(cumsum - p > topP));
      });
      const ids = order.filter((_, j) => keep[j]);
      const kept = probs.filter((_, j) => keep[j]);
      const mass = kept.reduce((a, b) => a + b, 0);
      return { ids, probs: kept.map((p) => p / mass) };
    };
    const next = mulberry32(2024);
    for (let trial = 0; trial < 40; trial++) {
      const scale = 1 + 10 * next();
      const logits = Array.from({ length: 2000 }, () => scale * Math.log(next() + 1e-9));
      const T = [0.3, 0.7, 1, 1.8][trial % 4];
      const topP = [0.5, 0.8, 0.95, 1][(trial >> 2) % 4];
      const topK = [0, 0, 5, 50, 3000][trial % 5];
      const want = plain(logits, T, topP, topK);
      const got = candidates(logits, { temperature: T, topP, topK });
      expect(got.ids).toEqual(want.ids);
      got.probs.forEach((p, j) => expect(Math.abs(p - want.probs[j])).toBeLessThan(1e-12));
    }
  });

  it('ties are ordered by id; argmax takes the first of equal maxima', () => {
    expect(candidates([1, 2, 2, 0], { temperature: 1, topP: 1 }).ids).toEqual([1, 2, 0, 3]);
    expect(argmax([1, 2, 2, 0])).toBe(1);
  });

  it('draw: the first candidate whose cumulative probability exceeds u', () => {
    const c = { ids: [1, 3], probs: [0.625, 0.375] };
    expect(draw(c, 0)).toBe(1);
    expect(draw(c, 0.6249)).toBe(1);
    expect(draw(c, 0.625)).toBe(3);
    expect(draw(c, 0.9999999)).toBe(3);
  });

  it('a seeded sampler draws with the expected frequencies and repeats itself', () => {
    const n = 20000;
    const counts = new Map<number, number>();
    const sampler = new Sampler({ temperature: 1, topP: 1, seed: 123 });
    const first: number[] = [];
    for (let i = 0; i < n; i++) {
      const id = sampler.sample(logits);
      if (i < 50) first.push(id);
      counts.set(id, (counts.get(id) ?? 0) + 1);
    }
    [
      [1, 0.5],
      [3, 0.3],
      [0, 0.15],
      [2, 0.05],
    ].forEach(([id, p]) => {
      const sigma = Math.sqrt((p * (1 - p)) / n);
      expect(Math.abs((counts.get(id) ?? 0) / n - p)).toBeLessThan(5 * sigma);
    });
    const again = new Sampler({ temperature: 1, topP: 1, seed: 123 });
    expect(first.map(() => again.sample(logits))).toEqual(first);
    const other = new Sampler({ temperature: 1, topP: 1, seed: 124 });
    expect(first.map(() => other.sample(logits))).not.toEqual(first);
  });

  it('temperature 0 is argmax whatever the seed', () => {
    for (const seed of [1, 2, 3]) expect(new Sampler({ temperature: 0, topP: 0.8, seed }).sample(logits)).toBe(1);
  });

  it('logprobOf is log softmax at the id', () => {
    expect(logprobOf(logits, 3)).toBeCloseTo(Math.log(0.3), 12);
    expect(logprobOf([0, 0], 1)).toBeCloseTo(Math.log(0.5), 12);
  });

  it('bad options are one-line errors naming the field', () => {
    expect(() => new Sampler({ temperature: -0.1, topP: 0.8 })).toThrow(new SamplingError('temperature must be a number >= 0, got -0.1'));
    expect(() => new Sampler({ temperature: 1, topP: 0 })).toThrow(/^topP must be in \(0, 1\], got 0$/);
    expect(() => new Sampler({ temperature: 1, topP: 1.5 })).toThrow(/topP/);
    expect(() => new Sampler({ temperature: 1, topP: 1, topK: 1.5 })).toThrow(/topK/);
    expect(() => new Sampler({ temperature: 1, topP: 1, seed: -1 })).toThrow(/seed/);
  });
});

describe('TextOutput: stop strings and streaming', () => {
  it('cuts at a stop string split across pieces and never streams any of it', () => {
    const streamed: string[] = [];
    const out = new TextOutput(['STOP'], (t) => streamed.push(t));
    expect(out.add('hello S')).toBe(false);
    expect(streamed.join('')).toBe('hello '); // "S" may begin STOP: held back
    expect(out.add('T')).toBe(false);
    expect(out.add('OPx')).toBe(true);
    expect(out.text).toBe('hello ');
    out.finish();
    expect(streamed.join('')).toBe('hello ');
  });

  it('releases a held-back tail that turns out not to be a stop string', () => {
    const streamed: string[] = [];
    const out = new TextOutput(['STOP', 'xy'], (t) => streamed.push(t));
    out.add('aST');
    expect(streamed.join('')).toBe('a');
    out.add('OOL x');
    expect(streamed.join('')).toBe('aSTOOL ');
    out.finish();
    expect(streamed.join('')).toBe('aSTOOL x');
  });

  it('takes the earliest of several stop strings', () => {
    const out = new TextOutput(['cd', 'b']);
    expect(out.add('abcd')).toBe(true);
    expect(out.text).toBe('a');
  });
});

describe('complete() on the tiny checkpoint', () => {
  let model: Transformer;
  let tokenizer: SentencePieceProcessor;
  beforeAll(async () => {
    model = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
    tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
  });
  afterAll(() => model.dispose());

  // The reference's greedy continuation of one prompt (batch of 1: nothing teacher-forced), 20 steps.
  const g1 = referenceCase('generate_1');
  const g1Prompt = g1.encoded_prompts[0];
  const g1Ids = g1.generated_ids[0];

  it("temperature 0 is the reference's greedy generate(): ids, text and logprobs; no tensor left behind", async () => {
    const before = tf.memory().numTensors;
    const streamed: string[] = [];
    const c = await complete(model, tokenizer, g1Prompt, { maxTokens: 20, temperature: 0, onText: (t) => streamed.push(t) });
    expect(tf.memory().numTensors).toBe(before);
    expect(c.promptIds).toEqual(g1Prompt);
    expect(c.generatedIds).toEqual(g1Ids);
    expect(c.finishReason).toBe('length');
    // The reference prints decode(prompt + generated): our text continues the prompt's.
    expect(tokenizer.decode(g1Prompt) + c.text).toBe(g1.texts[0]);
    expect(streamed.length).toBeGreaterThan(5); // streamed as it came, not at the end
    expect(streamed.join('')).toBe(c.text);
    // all_logprobs: 17 prompt logprobs, then one per step
    const diff = maxAbsDiff(c.logprobs, referenceLogprobs(g1, 0).slice(g1Prompt.length - 1));
    console.log(`generate_1 greedy: max |logprob - reference| = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
    expect(c.timings.prefillMs).toBeGreaterThan(0);
    expect(c.timings.decodeMs).toBeGreaterThan(0);
  });

  it('greedy from BOS alone matches the reference (generate_0, row 0: its prompt is the shortest)', async () => {
    const g0 = referenceCase('generate_0');
    const c = await complete(model, tokenizer, g0.encoded_prompts[0], { maxTokens: 12, temperature: 0 });
    expect(c.generatedIds).toEqual(g0.generated_ids[0]);
  });

  it('stops at EOS: the reference greedily ends generate_4 row 1 with EOS (id 2) after 7 tokens', async () => {
    const g4 = referenceCase('generate_4');
    const expected = g4.generated_ids[1];
    expect(expected[expected.length - 1]).toBe(tokenizer.eosId);
    const c = await complete(model, tokenizer, g4.encoded_prompts[1], { maxTokens: 30, temperature: 0 });
    expect(c.generatedIds).toEqual(expected);
    expect(c.finishReason).toBe('eos');
    expect(tokenizer.decode(g4.encoded_prompts[1]) + c.text).toBe(g4.texts[1]);
    const diff = maxAbsDiff(c.logprobs, referenceLogprobs(g4, 1).slice(-expected.length));
    expect(diff).toBeLessThanOrEqual(1e-4);
  });

  it('--max-tokens counts new tokens: N steps, then length', async () => {
    const c = await complete(model, tokenizer, g1Prompt, { maxTokens: 5, temperature: 0 });
    expect(c.generatedIds).toEqual(g1Ids.slice(0, 5));
    expect(c.finishReason).toBe('length');
    const none = await complete(model, tokenizer, g1Prompt, { maxTokens: 0 });
    expect(none.generatedIds).toEqual([]);
    expect(none.text).toBe('');
  });

  it('the prompt is one prefill forward; a finished sequence costs no forward', async () => {
    const calls: number[][] = [];
    const forward = model.forward.bind(model);
    model.forward = (ids, pos) => {
      calls.push(Array.from(pos.dataSync()));
      return forward(ids, pos);
    };
    try {
      await complete(model, tokenizer, g1Prompt, { maxTokens: 6, temperature: 0 });
      // one forward of the whole prompt, then one per new token except the last (nothing reads its logits)
      expect(calls.map((p) => p.length)).toEqual([18, 1, 1, 1, 1, 1]);
      expect(calls[5]).toEqual([22]);
      calls.length = 0;
      const g4 = referenceCase('generate_4');
      await complete(model, tokenizer, g4.encoded_prompts[1], { maxTokens: 30, temperature: 0 });
      expect(calls.length).toBe(1 + 7); // 8 tokens, the eighth is EOS: never fed
      calls.length = 0;
      await complete(model, tokenizer, g1Prompt, { maxTokens: 3, temperature: 0, chunkSize: 5 });
      expect(calls.map((p) => p[0])).toEqual([0, 5, 10, 15, 18, 19]);
    } finally {
      model.forward = forward;
    }
  });

  it('the same seed repeats a sampled run exactly; another seed does not', async () => {
    const run = (seed: number): Promise<Completion> => complete(model, tokenizer, g1Prompt, { maxTokens: 40, seed });
    const a = await run(7);
    const b = await run(7);
    const c = await run(8);
    expect(a.seed).toBe(7);
    expect(b.generatedIds).toEqual(a.generatedIds);
    expect(b.logprobs).toEqual(a.logprobs);
    expect(b.text).toBe(a.text);
    expect(a.generatedIds.length).toBeGreaterThan(5);
    expect(c.generatedIds).not.toEqual(a.generatedIds);
    // sampled, not greedy (temperature 0.7, top-p 0.8 by default)
    expect(a.generatedIds.slice(0, 20)).not.toEqual(g1Ids.slice(0, a.generatedIds.length));
  });

  it('a stop string split across tokens ends generation; the text is cut before it', async () => {
    // The greedy continuation's pieces include "W", "ri": "Wri" is in no single piece.
    const stop = 'Wri';
    const pieces = g1Ids.map((id) => tokenizer.decode([id]));
    expect(pieces.some((p) => p.includes(stop))).toBe(false);
    const continuation = g1.texts[0].slice(tokenizer.decode(g1Prompt).length);
    const n = g1Ids.findIndex((_, i) => tokenizer.decode(g1Ids.slice(0, i + 1)).includes(stop)) + 1;
    const streamed: string[] = [];
    const c = await complete(model, tokenizer, g1Prompt, { maxTokens: 20, temperature: 0, stop: ['zzz', stop], onText: (t) => streamed.push(t) });
    expect(c.finishReason).toBe('stop');
    expect(c.text).toBe(continuation.slice(0, continuation.indexOf(stop)));
    expect(c.generatedIds).toEqual(g1Ids.slice(0, n));
    expect(c.logprobs.length).toBe(n);
    expect(streamed.join('')).toBe(c.text);
    // A stop string that never appears changes nothing.
    const d = await complete(model, tokenizer, g1Prompt, { maxTokens: 20, temperature: 0, stop: ['never seen'] });
    expect(d.generatedIds).toEqual(g1Ids);
    expect(d.finishReason).toBe('length');
  });

  it('an AbortSignal stops between forwards and returns what was generated', async () => {
    const controller = new AbortController();
    let pieces = 0;
    const c = await complete(model, tokenizer, g1Prompt, {
      maxTokens: 20,
      temperature: 0,
      signal: controller.signal,
      onText: () => {
        if (++pieces === 3) controller.abort();
      },
    });
    expect(c.finishReason).toBe('abort');
    expect(c.generatedIds.length).toBeLessThan(20);
    expect(c.generatedIds).toEqual(g1Ids.slice(0, c.generatedIds.length));
    const early = await complete(model, tokenizer, g1Prompt, { maxTokens: 20, signal: AbortSignal.abort() });
    expect(early.finishReason).toBe('abort');
    expect(early.generatedIds).toEqual([]);
  });

  it('calls on one model take turns: concurrent completions equal sequential ones', async () => {
    const g4 = referenceCase('generate_4');
    const [a, b] = await Promise.all([
      complete(model, tokenizer, g1Prompt, { maxTokens: 10, temperature: 0 }),
      complete(model, tokenizer, g4.encoded_prompts[1], { maxTokens: 30, temperature: 0 }),
    ]);
    expect(a.generatedIds).toEqual(g1Ids.slice(0, 10));
    expect(b.generatedIds).toEqual(g4.generated_ids[1]);
  });

  describe('onToken', () => {
    /** log_softmax(row)[id] in float64, written out here. */
    const logSoftmaxAt = (row: Float32Array, id: number): number => {
      const max = row.reduce((m, x) => Math.max(m, x), -Infinity);
      return row[id] - max - Math.log(row.reduce((sum, x) => sum + Math.exp(x - max), 0));
    };

    it('reports each token once, in order, before the next forward: its id, logprob, logits row and text', async () => {
      const events: string[] = []; // 'text:...' from onText, 'token:N' from onToken, in the order they came
      const steps: TokenStep[] = [];
      const forwardsAtStep: number[] = [];
      let forwards = 0;
      const forward = model.forward.bind(model);
      model.forward = (ids, pos) => {
        forwards++;
        return forward(ids, pos);
      };
      let c: Completion;
      try {
        c = await complete(model, tokenizer, g1Prompt, {
          maxTokens: 20,
          temperature: 0,
          onText: (t) => events.push(`text:${t}`),
          onToken: (step) => {
            steps.push(step);
            forwardsAtStep.push(forwards);
            events.push(`token:${step.index}`);
          },
        });
      } finally {
        model.forward = forward;
      }
      expect(steps.map((s) => s.index)).toEqual([...Array(20).keys()]);
      expect(steps.map((s) => s.id)).toEqual(g1Ids); // the reference's greedy ids
      // One prefill forward, then step i comes after i decode forwards: before the forward that feeds it.
      expect(forwardsAtStep).toEqual(steps.map((_, i) => 1 + i));
      const reference = referenceLogprobs(g1, 0).slice(g1Prompt.length - 1);
      steps.forEach((s, i) => {
        expect(s.logprob).toBe(c.logprobs[i]);
        expect(s.logits.length).toBe(model.args.vocabSize);
        // The row it was drawn from: greedy is its argmax over the tokenizer's ids, and its log_softmax
        // at the id is the reference's logprob.
        const words = Array.from(s.logits.subarray(0, tokenizer.vocabSize));
        expect(words.indexOf(Math.max(...words))).toBe(s.id);
        expect(Math.abs(logSoftmaxAt(s.logits, s.id) - reference[i])).toBeLessThanOrEqual(1e-4);
        if (i > 0) expect(s.logits).not.toBe(steps[i - 1].logits);
      });
      // Each step's text is what onText received since the step before it; together they are the text.
      const texts: string[] = [];
      let pending = '';
      for (const e of events) {
        if (e.startsWith('text:')) pending += e.slice(5);
        else {
          texts.push(pending);
          pending = '';
        }
      }
      expect(pending).toBe('');
      expect(steps.map((s) => s.text)).toEqual(texts);
      expect(texts.join('')).toBe(c!.text);
      // The continuation's byte pieces of bytes >= 0x80 (<0xE1> <0xB6> before "W", <0xA4>, <0xE1> <0xB6>
      // <0xD4> before "à", <0x9D>, <0x92>) are not (yet) a whole character: their steps release nothing,
      // and the next step releases them (as U+FFFD, which Python's decode of the whole shows) with its
      // own text. Its ASCII byte pieces (<0x5B> "[", <0x6B> "k", <0x1F>, <0x4E> "N") are characters alone.
      expect(steps.flatMap((s, i) => (s.text === '' ? [i] : []))).toEqual([3, 4, 7, 10, 11, 12, 14, 17]);
      expect(steps[5].text).toBe('\ufffd\ufffdW');
      expect(steps[13].text).toBe('\ufffd\ufffd\ufffdà');
    });

    it('reports the token that ends the sequence after the end-of-text flush: length, stop string, EOS', async () => {
      // The greedy continuation starts "[", " at", "k" (Python decodes it to "[ atk"). With the stop
      // string "tk!" the "t" and then "tk" are held back (they could start "tk!") until the sequence
      // ends at maxTokens: the last step's text is what the end released.
      const steps: TokenStep[] = [];
      const c = await complete(model, tokenizer, g1Prompt, { maxTokens: 3, temperature: 0, stop: ['tk!'], onToken: (s) => steps.push(s) });
      expect(c.generatedIds).toEqual(g1Ids.slice(0, 3));
      expect(c.finishReason).toBe('length');
      expect(c.text).toBe('[ atk');
      expect(steps.map((s) => s.text)).toEqual(['[', ' a', 'tk']);

      // A stop string: "W" is held back (it starts "Wri"), "ri" completes the stop string, which is cut.
      const stopped: TokenStep[] = [];
      const s = await complete(model, tokenizer, g1Prompt, { maxTokens: 20, temperature: 0, stop: ['Wri'], onToken: (t) => stopped.push(t) });
      expect(s.finishReason).toBe('stop');
      expect(stopped.map((t) => t.id)).toEqual(s.generatedIds);
      expect(stopped.map((t) => t.id)).toEqual(g1Ids.slice(0, 7)); // ..., "W", "ri"
      expect(stopped.slice(5).map((t) => t.text)).toEqual(['\ufffd\ufffd', '']);
      expect(stopped.map((t) => t.text).join('')).toBe(s.text);

      // EOS is reported too, last, with its logprob.
      const g4 = referenceCase('generate_4');
      const eosSteps: TokenStep[] = [];
      const e = await complete(model, tokenizer, g4.encoded_prompts[1], { maxTokens: 30, temperature: 0, onToken: (t) => eosSteps.push(t) });
      expect(e.finishReason).toBe('eos');
      expect(eosSteps.map((t) => t.id)).toEqual(g4.generated_ids[1]);
      expect(eosSteps.at(-1)!.id).toBe(tokenizer.eosId);
      expect(eosSteps.map((t) => t.logprob)).toEqual(e.logprobs);
      expect(eosSteps.map((t) => t.text).join('')).toBe(e.text);
    });

    it('after an abort, every sampled token was reported; text released by the end follows them', async () => {
      const controller = new AbortController();
      const steps: TokenStep[] = [];
      const c = await complete(model, tokenizer, g1Prompt, {
        maxTokens: 20,
        temperature: 0,
        signal: controller.signal,
        onToken: (s) => {
          steps.push(s);
          if (s.index === 3) controller.abort(); // step 3 is <0xE1>: a character's first byte, held back
        },
      });
      expect(c.finishReason).toBe('abort');
      expect(c.generatedIds).toEqual(g1Ids.slice(0, 4));
      expect(steps.map((s) => s.id)).toEqual(c.generatedIds);
      // Python decodes the prompt and these 4 ids to the prompt's text + "[ atk\ufffd": the lone byte
      // became U+FFFD when the run ended, after its step was reported.
      expect(steps.map((s) => s.text).join('')).toBe('[ atk');
      expect(c.text).toBe('[ atk\ufffd');
    });
  });

  it('bad arguments are errors naming the field', async () => {
    await expect(complete(model, tokenizer, [], { maxTokens: 1 })).rejects.toThrow(GenerationError);
    await expect(complete(model, tokenizer, [1, 9999], { maxTokens: 1 })).rejects.toThrow(/promptIds\[1\]: token id 9999/);
    await expect(complete(model, tokenizer, [1], { maxTokens: 1.5 })).rejects.toThrow(/^maxTokens must be an integer >= 0/);
    await expect(complete(model, tokenizer, [1], { maxTokens: 1, chunkSize: 0 })).rejects.toThrow(/chunkSize/);
    await expect(complete(model, tokenizer, [1], { maxTokens: 1, stop: [''] })).rejects.toThrow(/stop\[0\]/);
    await expect(complete(model, tokenizer, [1], { maxTokens: 1, topP: 0 })).rejects.toThrow(SamplingError);
  });
});

describe("mistral-src's test_chunks, ported", () => {
  // test_generate.py's test_chunks: window 4; generate 8 tokens after each prompt, then run the
  // whole sequences again as prompts in chunks of 5 with max_tokens 0: every logprob must agree
  // (it asserts 1e-5). Its DebugTokenizer reads "0 1 2 ..." as ids after BOS; here BOS is id 1.
  let base: Transformer;
  let tokenizer: SentencePieceProcessor;
  beforeAll(async () => {
    base = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
    tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
  });
  afterAll(() => base.dispose());



  const sequences = [
    [1, ...Array.from({ length: 7 }, (_, i) => i)], // "0 1 2 3 4 5 6"
    [1, ...Array.from({ length: 9 }, (_, i) => 9 - i)], // "9 8 7 6 5 4 3 2 1"
  ];

  it.each([
    [4, 5],
    [4, 1],
    [4, 3],
    [8, 5],
  ])('window %i, chunks of %i: logprobs with chunks equal logprobs without', async (W, chunkSize) => {
    const model = withWindow(base, W, 1);
    try {
      for (const [i, prompt] of sequences.entries()) {
        const before = tf.memory().numTensors;
        const old = await complete(model, tokenizer, prompt, { maxTokens: 8, seed: 42 + i, promptLogprobs: true });
        expect(old.generatedIds.length).toBe(8); // no EOS with these seeds: the whole sequence is 8 longer than the prompt
        const all = [...prompt, ...old.generatedIds];
        const chunked = await complete(model, tokenizer, all, { maxTokens: 0, chunkSize, promptLogprobs: true });
        expect(tf.memory().numTensors).toBe(before);
        const lpOld = [...old.promptLogprobs!, ...old.logprobs];
        expect(lpOld.length).toBe(all.length - 1);
        const diff = maxAbsDiff(chunked.promptLogprobs!, lpOld);
        console.log(`test_chunks W=${W} chunk=${chunkSize} seq ${i} (${all.length} tokens): max |logprob diff| = ${diff.toExponential(2)}`);
        expect(diff).toBeLessThan(1e-5);
      }
    } finally {
      disposeCaches(model);
    }
  });
});

describe('the generate command', () => {
  /** `ts-node one_file_ref.ts ARGS` from the repository root on wasm. */
  function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((resolve, reject) => {
      const child = spawn(path.join(ROOT, 'node_modules', '.bin', 'ts-node'), ['one_file_ref.ts', ...args], {
        cwd: ROOT,
        env: { ...process.env, MISTRAL_BACKEND: 'wasm' },
        timeout: 60_000,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (x: string) => (stdout += x));
      child.stderr.setEncoding('utf8').on('data', (x: string) => (stderr += x));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });
  }

  let model: Transformer;
  let tokenizer: SentencePieceProcessor;
  beforeAll(async () => {
    model = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
    tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
  });
  afterAll(() => model.dispose());

  it("streams the reference's greedy text with --temperature 0 and reports stats on stderr", async () => {
    const g1 = referenceCase('generate_1');
    const prompt = 'The old sailor said: “Be careful!”';
    expect(tokenizer.encode(prompt, true)).toEqual(g1.encoded_prompts[0]);
    const r = await cli(['generate', 'fixtures/tiny', '--prompt', prompt, '--temperature', '0', '--max-tokens', '20']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(`${g1.texts[0]}\n`);
    expect(r.stderr).toMatch(/^backend: wasm$/m);
    expect(r.stderr).toMatch(/^prompt: 18 tokens, prefill [\d.]+ tokens\/s/m);
    expect(r.stderr).toMatch(/^generated: 20 tokens, decode [\d.]+ tokens\/s/m);
    expect(r.stderr).toMatch(/^peak memory: [\d.]+ [kMG]B resident$/m);
  });

  it('--json gives per prompt what complete() gives, each prompt as if it ran alone (same seed)', async () => {
    const prompts = ['Once upon a time', 'Hello'];
    const r = await cli(['generate', 'fixtures/tiny', '--prompt', prompts[0], '--prompt', prompts[1], '--seed', '9', '--max-tokens', '15', '--stop', 'qq', '--json', '--quiet']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    const { completions } = JSON.parse(r.stdout) as { completions: Record<string, unknown>[] };
    expect(completions.length).toBe(2);
    for (const [i, prompt] of prompts.entries()) {
      const c = await complete(model, tokenizer, tokenizer.encode(prompt, true), { maxTokens: 15, seed: 9, stop: ['qq'] });
      const got = completions[i];
      expect(Object.keys(got).sort()).toEqual(['finish_reason', 'generated_ids', 'logprobs', 'prompt', 'prompt_ids', 'seed', 'text', 'timings']);
      expect(got.prompt).toBe(prompt);
      expect(got.prompt_ids).toEqual(c.promptIds);
      expect(got.generated_ids).toEqual(c.generatedIds);
      expect(got.text).toBe(c.text);
      expect(got.finish_reason).toBe(c.finishReason);
      expect(got.seed).toBe(9);
      expect(maxAbsDiff(got.logprobs as number[], c.logprobs)).toBeLessThanOrEqual(1e-9);
      expect(Object.keys(got.timings as object).sort()).toEqual(['decode_ms', 'prefill_ms']);
    }
  });

  it('a bad flag value is a one-line error and exit code 1', async () => {
    const r = await cli(['generate', 'fixtures/tiny', '--prompt', 'hi', '--temperature', '-1']);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe('error: --temperature must be a number >= 0, got "-1"\n');
  });

  it.each([
    [['--temperature', '-0.5'], '--temperature must be a number >= 0, got "-0.5"'],
    [['--temperature', 'warm'], '--temperature must be a number >= 0, got "warm"'],
    [['--top-p', '0'], '--top-p must be a number in (0, 1], got "0"'],
    [['--top-p', '1.01'], '--top-p must be a number in (0, 1], got "1.01"'],
    [['--max-tokens', '3.5'], '--max-tokens must be an integer >= 0, got "3.5"'],
    [['--max-tokens', '-2'], '--max-tokens must be an integer >= 0, got "-2"'],
    [['--top-k', '-1'], '--top-k must be an integer >= 0, got "-1"'],
    [['--seed', 'abc'], '--seed must be an integer >= 0, got "abc"'],
    [['--chunk-size', '0'], '--chunk-size must be an integer >= 1, got "0"'],
    [['--stop', ''], '--stop must not be empty'],
    [['--backend', 'tpu'], 'unknown backend "tpu": expected one of node-gpu, node, wasm, cpu'],
  ])('generate %j: %s', async (flags, message) => {
    await expect(run(['generate', TINY, '--prompt', 'hi', ...flags])).rejects.toThrow(message);
  });

  it('interactive checks its flags the same way', async () => {
    await expect(run(['interactive', TINY, '--top-p', '2'])).rejects.toThrow('--top-p must be a number in (0, 1], got "2"');
    await expect(run(['interactive', TINY, '--system', 'x'])).rejects.toThrow(new UsageError('--system needs --instruct'));
    await expect(run(['generate', TINY])).rejects.toThrow('generate needs at least one --prompt TEXT');
  });

  it('--help lists both commands and every flag with its default', () => {
    for (const text of [
      'generate MODEL --prompt TEXT',
      'interactive MODEL [--instruct',
      '--max-tokens N   new tokens per prompt at most (default 35)',
      '(default 0.7, main.py\'s)',
      '(default 0.8, main.py\'s)',
      '--top-k K        only the K most likely tokens, before top-p (default 0: off)',
      '--seed N',
      '--stop TEXT',
      '--chunk-size N',
      '--system TEXT',
      `(default 35, main.py's; with --instruct 512)`,
      '--json',
      '--backend NAME',
    ]) {
      expect(HELP).toContain(text);
    }
  });
});
