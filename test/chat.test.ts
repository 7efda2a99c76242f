/**
 * generation/chat.ts: a conversation kept in the rolling KV cache.
 *
 * The property: each answer of a chat that runs far past sliding_window tokens equals the answer
 * to the same conversation (the same ids) prefilled from scratch in one forward on a fresh cache:
 * the same greedy ids, logprobs within 1e-4. And nothing is fed twice: every id of the history
 * goes through the model once, at its position.
 */
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Transformer } from '../one_file_ref';
import { disposeCaches, withWindow } from './models';
import { SentencePieceProcessor } from '../tokenizer';
import { encodeInstruct } from '../tokenizer/instruct';
import { ChatSession } from '../generation/chat';
import { complete, type Completion } from '../generation/generate';

const TINY = path.resolve(__dirname, '..', 'fixtures', 'tiny');
const QUESTIONS = ['Once upon a time there was a ship.', 'What happened next?', 'Tell me about the sailor.', 'And then?'];

let base: Transformer;
let tokenizer: SentencePieceProcessor;
beforeAll(async () => {
  base = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
  tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
});
afterAll(() => base.dispose());


/** Records the positions of every forward of `model`. */
function recordForwards(model: Transformer): number[][] {
  const calls: number[][] = [];
  const forward = model.forward.bind(model);
  model.forward = (ids, pos) => {
    calls.push(Array.from(pos.dataSync()));
    return forward(ids, pos);
  };
  return calls;
}

/** Compares an answer with the greedy completion of the same ids from position 0 on a fresh model. */
async function expectSameAsFromScratch(scratch: Transformer, historyBefore: readonly number[], answer: Completion, maxTokens: number): Promise<number> {
  const expected = await complete(scratch, tokenizer, [...historyBefore], { maxTokens, temperature: 0 });
  expect(answer.generatedIds).toEqual(expected.generatedIds);
  expect(answer.finishReason).toBe(expected.finishReason);
  return answer.logprobs.reduce((worst, x, i) => Math.max(worst, Math.abs(x - expected.logprobs[i])), 0);
}

describe('ChatSession', () => {
  it.each([
    [8, undefined],
    [4, 3],
    [5, 1],
  ])('window %i, chunks of %s: answers past the window equal the conversation prefilled from scratch', async (W, chunkSize) => {
    const model = withWindow(base, W, 1);
    const scratch = withWindow(base, W, 1);
    const calls = recordForwards(model);
    try {
      const chat = new ChatSession(model, tokenizer);
      const before = tf.memory().numTensors;
      const expectedHistory: number[] = [];
      let worst = 0;
      let last: Completion | undefined;
      for (const [k, question] of QUESTIONS.entries()) {
        // The Instruct format from tokenizer/instruct.ts: BOS only before the first turn.
        const turn = encodeInstruct(tokenizer, [{ role: 'user', content: question }]);
        expectedHistory.push(...(k === 0 ? turn : turn.slice(1)));
        const historyBefore = [...expectedHistory];
        const answer = await chat.send(question, { maxTokens: 12, temperature: 0, chunkSize });
        worst = Math.max(worst, await expectSameAsFromScratch(scratch, historyBefore, answer, 12));
        expectedHistory.push(...answer.generatedIds);
        if (answer.finishReason !== 'eos') expectedHistory.push(tokenizer.eosId);
        expect(chat.ids).toEqual(expectedHistory);
        last = answer;
      }
      expect(tf.memory().numTensors).toBe(before);
      expect(chat.ids.length).toBeGreaterThan(4 * W);
      console.log(`chat W=${W}, chunks ${chunkSize ?? 'whole'}: ${chat.ids.length} tokens, max |logprob - from scratch| = ${worst.toExponential(2)}`);
      expect(worst).toBeLessThanOrEqual(1e-4);
      // Nothing re-encoded or re-run: each position was fed once, in order. The last answer's last
      // token (nothing read its logits) and the EOS closing it wait for a next turn.
      const waiting = last!.finishReason === 'eos' ? 1 : 2;
      expect(calls.flat()).toEqual(Array.from({ length: chat.ids.length - waiting }, (_, p) => p));
      if (chunkSize !== undefined) expect(Math.max(...calls.map((c) => c.length))).toBeLessThanOrEqual(chunkSize);
    } finally {
      disposeCaches(model);
      disposeCaches(scratch);
    }
  });

  it('a system message comes before the first user message, as encodeInstruct puts it', async () => {
    const model = withWindow(base, 8, 1);
    try {
      const chat = new ChatSession(model, tokenizer, { system: 'You are a sailor.' });
      const answer = await chat.send('Hello', { maxTokens: 4, temperature: 0 });
      const prompt = encodeInstruct(tokenizer, [
        { role: 'system', content: 'You are a sailor.' },
        { role: 'user', content: 'Hello' },
      ]);
      expect(answer.promptIds).toEqual(prompt);
      expect(chat.ids.slice(0, prompt.length)).toEqual(prompt);
    } finally {
      disposeCaches(model);
    }
  });

  it('another generation on the same model in between: the next turn replays the history and is still right', async () => {
    const model = withWindow(base, 4, 1);
    const scratch = withWindow(base, 4, 1);
    try {
      const chat = new ChatSession(model, tokenizer);
      await chat.send(QUESTIONS[0], { maxTokens: 10, temperature: 0 });
      await complete(model, tokenizer, [1, 300, 301, 302, 303, 304, 305], { maxTokens: 5 }); // overwrites row 0
      const calls = recordForwards(model);
      let historyBefore = [...chat.ids, ...encodeInstruct(tokenizer, [{ role: 'user', content: QUESTIONS[1] }]).slice(1)];
      let answer = await chat.send(QUESTIONS[1], { maxTokens: 10, temperature: 0 });
      expect(calls[0][0]).toBe(0); // replayed from position 0
      expect(await expectSameAsFromScratch(scratch, historyBefore, answer, 10)).toBeLessThanOrEqual(1e-4);
      // Started together: the completion runs first (it was called first), the turn after it replays.
      historyBefore = [...chat.ids, ...encodeInstruct(tokenizer, [{ role: 'user', content: QUESTIONS[2] }]).slice(1)];
      calls.length = 0;
      [, answer] = await Promise.all([
        complete(model, tokenizer, [1, 310, 311, 312], { maxTokens: 5 }),
        chat.send(QUESTIONS[2], { maxTokens: 10, temperature: 0 }),
      ]);
      expect(calls.filter((c) => c[0] === 0).length).toBe(2);
      expect(await expectSameAsFromScratch(scratch, historyBefore, answer, 10)).toBeLessThanOrEqual(1e-4);
    } finally {
      disposeCaches(model);
      disposeCaches(scratch);
    }
  });

  it('an aborted answer is closed with EOS and the conversation goes on correctly', async () => {
    const model = withWindow(base, 4, 1);
    const scratch = withWindow(base, 4, 1);
    try {
      const chat = new ChatSession(model, tokenizer);
      const controller = new AbortController();
      let pieces = 0;
      const cut = await chat.send(QUESTIONS[0], {
        maxTokens: 30,
        temperature: 0,
        signal: controller.signal,
        onText: () => {
          if (++pieces === 2) controller.abort();
        },
      });
      expect(cut.finishReason).toBe('abort');
      expect(chat.ids[chat.ids.length - 1]).toBe(tokenizer.eosId);
      const historyBefore = [...chat.ids, ...encodeInstruct(tokenizer, [{ role: 'user', content: QUESTIONS[1] }]).slice(1)];
      const answer = await chat.send(QUESTIONS[1], { maxTokens: 10, temperature: 0 });
      expect(await expectSameAsFromScratch(scratch, historyBefore, answer, 10)).toBeLessThanOrEqual(1e-4);
    } finally {
      disposeCaches(model);
      disposeCaches(scratch);
    }
  });

  it('the answer text is the answer alone, as an assistant message decodes', async () => {
    const model = withWindow(base, 8, 1);
    try {
      const chat = new ChatSession(model, tokenizer);
      const answer = await chat.send(QUESTIONS[0], { maxTokens: 12, temperature: 0 });
      const ids = answer.generatedIds.filter((id) => id !== tokenizer.eosId);
      expect(answer.text).toBe(tokenizer.decode(ids));
    } finally {
      disposeCaches(model);
    }
  });
});
