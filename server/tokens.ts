/**
 * Generation token by token, for the server: what generation/generate.ts's complete() does, plus a
 * callback per generated token (its id, the text it completed, and with logprobs its log
 * probability and the top alternatives), which streaming and OpenAI's logprobs need.
 *
 * generation/ reports text (onText) but neither the ids nor the logits as they come, so the model
 * is seen through a view whose forward() is watched: generation prefills the prompt in
 * ceil(length / chunkSize) forwards, then feeds each sampled token in a forward of its own before
 * sampling the next, and never feeds the token that ends the sequence. So the input of each decode
 * forward is the token just sampled, and the last row of the logits of each forward is what the
 * next token is drawn from. The run goes through withModel() on the real model, so it takes its
 * turn in the same FIFO queue as every other generation on that model. What the view saw is
 * checked against the Completion at the end.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Transformer } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { runSequence, withModel, type Completion, type GenerateOptions } from '../generation/generate';
import { logprobOf } from '../generation/sampling';

/** A token with its log probability, as the logprobs of a response list them. */
export interface ScoredToken {
  id: number;
  logprob: number;
}

/** One generated token. */
export interface GeneratedToken {
  /** Its place among the generated tokens, from 0. */
  index: number;
  id: number;
  /** The text that became final with this token ('' for a byte that starts a character, a held-back stop prefix...). */
  text: string;
  /** With topLogprobs: its log probability and the most likely tokens at its step, most likely first. */
  logprob?: number;
  top?: ScoredToken[];
}

export interface TokenGenerateOptions extends Omit<GenerateOptions, 'onText' | 'promptLogprobs'> {
  /** Score each token and list this many alternatives (0: the token's own logprob only); undefined: no logprobs. */
  topLogprobs?: number;
  /** Called with each token as soon as it is generated; the last one is called after its text is flushed. */
  onToken?: (token: GeneratedToken) => void;
  /** Ids the text continues (its leading space), as SequenceStart.context: default the prompt; [] decodes the answer alone. */
  context?: readonly number[];
}

export interface TokenRun {
  completion: Completion;
  tokens: GeneratedToken[];
  /** Text that became final after the last token was reported (only after an abort). */
  trailingText: string;
}

/** The `k` ids of largest logit among the first `nWords`, with log_softmax over the whole row (as logprobOf). */
export function topLogprobs(row: Float32Array, k: number, nWords: number): ScoredToken[] {
  if (k <= 0) return [];
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  const logSum = Math.log(sum);
  const best: number[] = []; // ids, largest logit first, ties by smaller id
  for (let i = 0; i < Math.min(nWords, row.length); i++) {
    if (best.length === k && row[i] <= row[best[k - 1]]) continue;
    let at = best.length;
    while (at > 0 && row[best[at - 1]] < row[i]) at--;
    best.splice(at, 0, i);
    if (best.length > k) best.pop();
  }
  return best.map((id) => ({ id, logprob: row[id] - max - logSum })); // as logprobOf rounds it
}

/**
 * Generates a completion of `promptIds` from position 0, as complete() does, calling `onToken` for
 * each generated token (EOS included) as soon as it is known.
 */
export async function generateTokens(
  model: Transformer,
  tokenizer: SentencePieceProcessor,
  promptIds: number[],
  opts: TokenGenerateOptions,
): Promise<TokenRun> {
  const { topLogprobs: k, onToken, context, ...generateOpts } = opts;
  const prefillForwards = Math.ceil(promptIds.length / (opts.chunkSize ?? promptIds.length));
  const tokens: GeneratedToken[] = [];
  const fedIds: number[] = [];
  let forwards = 0;
  let pendingText = '';
  let lastRow: Float32Array | null = null; // the logits the next token is drawn from

  const report = (id: number, row: Float32Array | null): void => {
    const token: GeneratedToken = { index: tokens.length, id, text: pendingText };
    pendingText = '';
    if (k !== undefined && row) {
      token.logprob = logprobOf(row, id);
      token.top = topLogprobs(row, k, tokenizer.vocabSize);
    }
    tokens.push(token);
    onToken?.(token);
  };

  const view = Object.create(model) as Transformer;
  view.forward = (ids, positions) => {
    if (forwards++ >= prefillForwards) {
      const id = ids.dataSync()[0]; // a decode step feeds the token sampled last
      fedIds.push(id);
      report(id, lastRow);
    }
    const logits = model.forward(ids, positions);
    if (k !== undefined && forwards >= prefillForwards) {
      const T = ids.shape[1];
      lastRow = tf.tidy(() => tf.slice(logits, [0, T - 1, 0], [1, 1, -1]).dataSync() as Float32Array);
    }
    return logits;
  };

  const onText = (text: string): void => {
    pendingText += text;
  };
  const { completion } = await withModel(model, {}, () =>
    runSequence(view, tokenizer, promptIds, { ...generateOpts, onText }, { startPos: 0, context: context ?? promptIds }),
  );

  const generated = completion.generatedIds;
  const unfed = generated.slice(fedIds.length);
  if (fedIds.some((id, i) => id !== generated[i]) || unfed.length > 1) {
    throw new Error(`server/tokens.ts: the forwards seen (${fedIds.length} tokens) do not match the completion (${generated.length} tokens)`);
  }
  if (unfed.length === 1) report(unfed[0], lastRow);
  const trailingText = pendingText;
  return { completion, tokens, trailingText };
}

/** How each token id reads in logprobs: its text (the piece's "▁" as a space) and its UTF-8 bytes. */
export class TokenTexts {
  private readonly anchorId: number;
  private readonly anchorText: string;
  /** The byte each byte piece stands for: SentencePiece adds <0x00>..<0xFF> in order. */
  private readonly byteOf = new Map<number, number>();
  private readonly cache = new Map<number, { token: string; bytes: number[] }>();

  constructor(private readonly tokenizer: SentencePieceProcessor) {
    const byteIds: number[] = [];
    let anchor = -1;
    for (let id = 0; id < tokenizer.vocabSize; id++) {
      if (tokenizer.isByte(id)) byteIds.push(id);
      else if (anchor < 0 && !tokenizer.isControl(id) && !tokenizer.isUnknown(id) && !tokenizer.isUnused(id)) {
        const text = tokenizer.decode([id]);
        if (text !== '' && !text.includes('\ufffd')) anchor = id;
      }
    }
    this.anchorId = anchor;
    this.anchorText = anchor >= 0 ? tokenizer.decode([anchor]) : '';
    // Trust the order only if the ASCII bytes decode to themselves.
    if (byteIds.length === 256 && [0x41, 0x7a, 0x20].every((b) => tokenizer.decode([byteIds[b]]) === String.fromCharCode(b))) {
      byteIds.forEach((id, b) => this.byteOf.set(id, b));
    }
  }

  /** The token as OpenAI writes it: its text, or "bytes:\xNN" for a byte that is not a character alone. */
  token(id: number): string {
    return this.get(id).token;
  }

  bytes(id: number): number[] {
    return this.get(id).bytes;
  }

  private get(id: number): { token: string; bytes: number[] } {
    let entry = this.cache.get(id);
    if (entry === undefined) {
      entry = this.describe(id);
      this.cache.set(id, entry);
    }
    return entry;
  }

  private describe(id: number): { token: string; bytes: number[] } {
    const sp = this.tokenizer;
    const byte = this.byteOf.get(id);
    if (byte !== undefined) {
      return { token: byte < 0x80 ? String.fromCharCode(byte) : `bytes:\\x${byte.toString(16).padStart(2, '0')}`, bytes: [byte] };
    }
    let token: string;
    if (id === sp.bosId) token = '<s>';
    else if (id === sp.eosId) token = '</s>';
    else if (sp.isControl(id)) token = '';
    else if (this.anchorId >= 0) token = sp.decode([this.anchorId, id]).slice(this.anchorText.length); // keeps the leading space
    else token = sp.decode([id]);
    return { token, bytes: [...Buffer.from(token, 'utf8')] };
  }
}
