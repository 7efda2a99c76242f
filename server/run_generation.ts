/**
 * Runs one generation for a request: generation/generate.ts's runSequence from position 0 of a
 * fresh sequence, with its onToken hook turned into OpenAI's per-token fields (the token, its text,
 * its logprob and the top alternatives), and each token id spelled as OpenAI's logprobs spell tokens.
 *
 * runGeneration() must run inside the request's turn on the model (server/model_host.ts), which
 * takes its place in generation/'s withModel() queue.
 */
import type { Transformer } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { TokenizerError } from '../tokenizer/error';
import { runSequence, type Completion, type GenerateOptions, type TokenStep } from '../generation/generate';

/** Token counts of a request, as OpenAI's `usage` gives them. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

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
  /** log_softmax of the raw logits at its id. */
  logprob: number;
  /** With topLogprobs: the most likely tokens at its step, most likely first. */
  top?: ScoredToken[];
}

export interface TokenGenerateOptions extends Omit<GenerateOptions, 'onText' | 'onToken' | 'promptLogprobs'> {
  /** List this many alternatives per token (0: none); undefined: no alternatives. */
  topLogprobs?: number;
  /** Called with each token as soon as its text is known (GenerateOptions.onToken). */
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
 * each generated token (EOS included) as soon as its text is known. Call it during the request's
 * turn on the model: it does not queue.
 */
export async function runGeneration(
  model: Transformer,
  tokenizer: SentencePieceProcessor,
  promptIds: number[],
  opts: TokenGenerateOptions,
): Promise<TokenRun> {
  const { topLogprobs: k, onToken, context, ...generateOpts } = opts;
  const tokens: GeneratedToken[] = [];
  const report = (step: TokenStep): void => {
    const token: GeneratedToken = { index: step.index, id: step.id, text: step.text, logprob: step.logprob };
    if (k !== undefined) token.top = topLogprobs(step.logits, k, tokenizer.vocabSize);
    tokens.push(token);
    onToken?.(token);
  };
  const { completion } = await runSequence(model, tokenizer, promptIds, { ...generateOpts, onToken: report }, { startPos: 0, context: context ?? promptIds });
  // The tokens' texts joined are the start of the completion's text: all of it unless aborted.
  const reported = tokens.reduce((n, t) => n + t.text.length, 0);
  return { completion, tokens, trailingText: completion.text.slice(reported) };
}

/** A token as OpenAI's logprobs show it. */
export interface TokenText {
  /** Its text, or "bytes:\xNN" for a byte that is not a character on its own. */
  token: string;
  /** The UTF-8 bytes it stands for. */
  bytes: number[];
}

/**
 * How each token id reads in logprobs, from its piece in the model file: a piece's "▁" is a space
 * ("▁Hello" is " Hello"); a byte piece "<0xNN>" is that byte, shown as its character when it is
 * ASCII and as "bytes:\xNN" otherwise (as OpenAI shows a token that is part of a character);
 * control pieces show as spelled ("<s>", "</s>").
 */
export class TokenTexts {
  private readonly cache = new Map<number, TokenText>();

  constructor(private readonly tokenizer: Pick<SentencePieceProcessor, 'piece' | 'isByte'>) {}

  token(id: number): string {
    return this.get(id).token;
  }

  bytes(id: number): number[] {
    return this.get(id).bytes;
  }

  private get(id: number): TokenText {
    let entry = this.cache.get(id);
    if (entry === undefined) {
      entry = this.describe(id);
      this.cache.set(id, entry);
    }
    return entry;
  }

  private describe(id: number): TokenText {
    const piece = this.tokenizer.piece(id);
    if (this.tokenizer.isByte(id)) {
      const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece)?.[1];
      if (hex === undefined) throw new TokenizerError(`tokenizer: byte piece ${id} is ${JSON.stringify(piece)}, expected <0xNN>`);
      const byte = parseInt(hex, 16);
      return { token: byte < 0x80 ? String.fromCharCode(byte) : `bytes:\\x${hex.toLowerCase()}`, bytes: [byte] };
    }
    const token = piece.replaceAll('\u2581', ' ');
    return { token, bytes: [...Buffer.from(token, 'utf8')] };
  }
}
