/**
 * Generation as people use it, one sequence at a time on row 0 of the model's KV cache: what
 * mistral-src's main.py adds to the reference's greedy generate(), plus what users of llama.cpp and
 * Hugging Face expect.
 *
 *  - The prompt is prefilled in forwards of `chunkSize` tokens through the rolling cache (main.py's
 *    chunk_size), never teacher-forced through decode steps. By default the chunks are as long as
 *    a memory budget for one forward's attention scores allows (defaultChunkSize), so that a prompt
 *    of any length runs in bounded memory; between two chunks the event loop runs (timers, a
 *    server's other connections) and `signal` is checked, so an abort takes effect within a chunk.
 *  - Each new token is sampled (temperature, top-p, top-k, a seed: sampling.ts) or greedy at
 *    temperature 0; its logprob is log_softmax of the raw logits, as main.py records it.
 *  - It stops at EOS, after `maxTokens` new tokens, at a stop string (cut from the text, found in
 *    the decoded text so one split across tokens is caught) or when `signal` aborts. A stopped
 *    sequence costs nothing more: the token that ends it is never fed to the model.
 *  - `onText` receives the text as it is decoded (tokenizer/stream.ts: whole characters only),
 *    holding back any tail that could still become a stop string.
 *  - `onToken` receives each generated token with its logprob, the logits it was drawn from and
 *    the text it completed, for callers that report tokens (the server's logprobs and streaming).
 *
 * The reference's generate() in one_file_ref.ts is left as it is: parity checks use it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { MAX_POSITIONS, type Transformer } from '../one_file_ref';
import { prefillChunkLength, type ScoresShape } from '../model/prefill';
import { StreamDecoder, type StreamTokenizer } from '../tokenizer/stream';
import { checkSamplingOptions, DEFAULT_SAMPLING, logprobOf, Sampler, type SamplingOptions } from './sampling';

export type { SamplingOptions } from './sampling';

/**
 * What generation needs from a tokenizer: EOS, and what StreamDecoder needs to decode ids as they
 * come (tokenizer/index.ts's SentencePieceProcessor has all of it).
 */
export interface GenerationTokenizer extends StreamTokenizer {
  readonly eosId: number;
}

export interface GenerateOptions extends Partial<SamplingOptions> {
  /** New tokens at most (EOS included when it comes). */
  maxTokens: number;
  /** Stop when the generated text contains one of these; the text is cut before it. */
  stop?: string[];
  /** Prefill the prompt in forwards of this many tokens (default: defaultChunkSize(model.args)). */
  chunkSize?: number;
  /** Called with each piece of generated text as soon as it is final. */
  onText?: (text: string) => void;
  /** Aborting stops generation between two forwards; the completion so far comes back with finishReason 'abort'. */
  signal?: AbortSignal;
  /** Also return the logprob of each prompt token after the first (main.py's prompt logprobs). */
  promptLogprobs?: boolean;
  /**
   * Called once per generated token (EOS included), in order, as soon as its text is known: right
   * after it is sampled and decoded, before the next forward; the token that ends the sequence (EOS,
   * a stop string, the last of maxTokens) after the end-of-text flush, so that its text includes what
   * that flush released. See TokenStep.
   */
  onToken?: (step: TokenStep) => void;
}

/** One generated token, as GenerateOptions.onToken receives it. */
export interface TokenStep {
  /** Its place among the generated tokens, from 0 (the index into Completion.generatedIds). */
  index: number;
  /** The sampled id. */
  id: number;
  /** log_softmax of the raw logits at `id`: Completion.logprobs[index]. */
  logprob: number;
  /**
   * The raw logits row it was drawn from, one per id of the model's vocabulary (model.args.vocabSize,
   * which may be padded past the tokenizer's: only ids below tokenizer.vocabSize are sampled), before
   * temperature, top-k or top-p. For reading only (e.g. top-k logprobs); the array is not reused.
   */
  logits: Float32Array;
  /**
   * The text that became final with this token, after streaming and stop-string handling: exactly
   * what onText received for it (often '': a byte that starts a character, a held-back prefix of a
   * stop string, EOS). The texts of all steps joined are Completion.text, except after an abort,
   * when Completion.text may end with text that became final only as the run ended (a held-back
   * tail, bytes of an unfinished character as U+FFFD), after the last step was reported.
   */
  text: string;
}

export type FinishReason = 'eos' | 'length' | 'stop' | 'abort';

export interface Completion {
  promptIds: number[];
  /** Every token sampled, in order: EOS last when it ended the sequence, a stop string's tokens too. */
  generatedIds: number[];
  /** The generated text (without EOS, cut before a stop string): prompt text + text = the whole decoded text. */
  text: string;
  /** log_softmax of the raw logits at each generated token, one per generatedIds entry. */
  logprobs: number[];
  /** With GenerateOptions.promptLogprobs: the logprob of each prompt token after the first. */
  promptLogprobs?: number[];
  finishReason: FinishReason;
  /** The seed the sampler used (chosen at random when none was given); unused at temperature 0. */
  seed: number;
  timings: { prefillMs: number; decodeMs: number };
}

export class GenerationError extends RangeError {
  override name = 'GenerationError';
}

// ----------------------------------------------------------------------------------------------
// How long a prefill forward may be

/**
 * The longest default chunk, whatever the memory budget allows: past a few hundred tokens a forward
 * costs more per token (its scores grow as T * (W-1+T)) and the event loop, and an abort, wait
 * longer between chunks.
 */
export const MAX_PREFILL_CHUNK = 256;

/**
 * The default prefill chunk for a model: the model's own bound for one row (prefillChunkLength:
 * the longest chunk whose attention scores fit PREFILL_SCORES_BUDGET_BYTES), at most
 * MAX_PREFILL_CHUNK. Mistral 7B (32 heads, W 4096): 256 tokens; W 32768: 63.
 */
export function defaultChunkSize(args: ScoresShape): number {
  return Math.min(MAX_PREFILL_CHUNK, prefillChunkLength(args, 1));
}

/**
 * Generates a completion of `promptIds` (BOS first, as tokenizer.encode gives them) from position
 * 0 of row 0 of the model's cache. The model must have maxBatchSize >= 1. Calls on one model run
 * one after another: a call waits for the one before it to finish.
 */
export async function complete(
  model: Transformer,
  tokenizer: GenerationTokenizer,
  promptIds: number[],
  opts: GenerateOptions,
): Promise<Completion> {
  checkOptions(model, promptIds, opts, 0);
  const run = await withModel(model, {}, () => runSequence(model, tokenizer, promptIds, opts, { startPos: 0, context: promptIds }));
  return run.completion;
}

// ----------------------------------------------------------------------------------------------
// One sequence through the model: shared by complete() and chat.ts

/** Where a run continues a sequence already in the cache (chat.ts) or starts one (complete()). */
export interface SequenceStart {
  /** Position of the first id: 0 for a new sequence, the ids already in the cache for a chat turn. */
  startPos: number;
  /** Ids decoded before the generated ones, so that the text continues them (its leading space); [] for none. */
  context: readonly number[];
}

export interface SequenceRun {
  completion: Completion;
  /** How many of promptIds, then generatedIds, went through the model: they are in the cache, in order. */
  fed: number;
}

/** Who last used row 0 of each model's cache, and the end of the queue of runs on it. */
const cacheOwner = new WeakMap<Transformer, object>();
const modelQueue = new WeakMap<Transformer, Promise<unknown>>();

/**
 * Runs `fn` with row 0 of `model`'s cache once every earlier call on it has finished: runs on one
 * model take turns. `fn` learns whether `owner` was the last to use the cache (so that it still
 * holds what `owner` left there); `owner` is the last user from then on.
 */
export function withModel<T>(model: Transformer, owner: object, fn: (ownedBefore: boolean) => Promise<T>): Promise<T> {
  const before = modelQueue.get(model) ?? Promise.resolve();
  const mine = before
    .catch(() => undefined)
    .then(() => {
      const ownedBefore = cacheOwner.get(model) === owner;
      cacheOwner.set(model, owner);
      return fn(ownedBefore);
    });
  modelQueue.set(model, mine);
  return mine;
}

/** Generates after `promptIds` at `start.startPos` on row 0; call it inside withModel(). */
export async function runSequence(
  model: Transformer,
  tokenizer: GenerationTokenizer,
  promptIds: number[],
  opts: GenerateOptions,
  start: SequenceStart,
): Promise<SequenceRun> {
  checkOptions(model, promptIds, opts, start.startPos);
  return generateOne(model, tokenizer, promptIds, opts, start);
}

function checkOptions(model: Transformer, promptIds: number[], opts: GenerateOptions, startPos: number): void {
  if (!Array.isArray(promptIds) || promptIds.length === 0) {
    throw new GenerationError('promptIds: expected at least one token id (BOS first for a new sequence)');
  }
  const vocab = model.args.vocabSize;
  const bad = promptIds.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= vocab);
  if (bad >= 0) throw new GenerationError(`promptIds[${bad}]: token id ${promptIds[bad]} is outside the vocabulary [0, ${vocab})`);
  if (!Number.isInteger(opts.maxTokens) || opts.maxTokens < 0) {
    throw new GenerationError(`maxTokens must be an integer >= 0, got ${opts.maxTokens}`);
  }
  if (opts.chunkSize !== undefined && !(Number.isInteger(opts.chunkSize) && opts.chunkSize >= 1)) {
    throw new GenerationError(`chunkSize must be an integer >= 1, got ${opts.chunkSize}`);
  }
  const emptyStop = (opts.stop ?? []).findIndex((s) => typeof s !== 'string' || s === '');
  if (emptyStop >= 0) throw new GenerationError(`stop[${emptyStop}]: expected a non-empty string`);
  checkSamplingOptions(opts);
  if (startPos + promptIds.length > MAX_POSITIONS) {
    throw new GenerationError(
      `the prompt ends at position ${startPos + promptIds.length - 1}, past ${MAX_POSITIONS - 1}, the last the model has rotary angles for`,
    );
  }
  if (model.args.maxBatchSize < 1) throw new GenerationError('the model was loaded with maxBatchSize 0; generation needs row 0');
}

/** Lets timers, signals and keypresses (Ctrl-C) in between two forwards. */
const nextTick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/**
 * One forward of `ids` at positions from `pos` on row 0. Returns the last position's logits [V],
 * and with `all` every position's logits [T * V]. The values are read after tf.tidy, which would
 * otherwise walk a returned typed array element by element looking for tensors.
 */
function forwardRow(model: Transformer, ids: number[], pos: number, all: boolean): { last: Float32Array; rows?: Float32Array } {
  const T = ids.length;
  const logits = tf.tidy(() => {
    const out = model.forward(tf.tensor2d([ids], [1, T], 'int32'), tf.range(pos, pos + T, 1, 'int32') as tf.Tensor1D); // [1, T, V]
    return all ? out : tf.slice(out, [0, T - 1, 0], [1, 1, -1]);
  });
  try {
    const values = logits.dataSync() as Float32Array;
    if (!all) return { last: values };
    const V = logits.shape[2];
    return { last: values.slice((T - 1) * V), rows: values };
  } finally {
    logits.dispose();
  }
}

async function generateOne(
  model: Transformer,
  tokenizer: GenerationTokenizer,
  promptIds: number[],
  opts: GenerateOptions,
  start: SequenceStart,
): Promise<SequenceRun> {
  const sampler = new Sampler({
    temperature: opts.temperature ?? DEFAULT_SAMPLING.temperature,
    topP: opts.topP ?? DEFAULT_SAMPLING.topP,
    topK: opts.topK,
    seed: opts.seed,
  });
  const chunkSize = opts.chunkSize ?? defaultChunkSize(model.args);
  let stepText = ''; // what the output released since the last step was reported
  const output = new TextOutput(opts.stop ?? [], (text) => {
    stepText += text;
    opts.onText?.(text);
  });
  const decoder = new StreamDecoder(tokenizer);
  for (const id of start.context) decoder.push(id); // the text so far: only its state matters
  const aborted = (): boolean => opts.signal?.aborted === true;
  const nWords = tokenizer.vocabSize; // sample only ids the tokenizer can decode (the model's vocabulary may be padded)

  const generatedIds: number[] = [];
  const logprobs: number[] = [];
  const promptLogprobs: number[] | undefined = opts.promptLogprobs ? [] : undefined;
  let finishReason: FinishReason = 'length';
  let fed = 0;
  let last: Float32Array | null = null; // logits for the token after the last one fed
  const t0 = performance.now();

  // Prefill, chunk by chunk through the rolling cache.
  for (let s = 0; s < promptIds.length; s += chunkSize) {
    if (s > 0) await nextTick();
    if (aborted()) {
      finishReason = 'abort';
      break;
    }
    const chunk = promptIds.slice(s, s + chunkSize);
    const out = forwardRow(model, chunk, start.startPos + s, promptLogprobs !== undefined);
    if (promptLogprobs && out.rows) {
      const V = out.last.length;
      if (last) promptLogprobs.push(logprobOf(last, chunk[0]));
      for (let i = 0; i + 1 < chunk.length; i++) promptLogprobs.push(logprobOf(out.rows.subarray(i * V, (i + 1) * V), chunk[i + 1]));
    }
    last = out.last;
    fed += chunk.length;
  }
  const t1 = performance.now();

  /** Hands a generated token and the text released since the last one to onToken. */
  const report = (index: number, logits: Float32Array): void => {
    const text = stepText;
    stepText = '';
    opts.onToken?.({ index, id: generatedIds[index], logprob: logprobs[index], logits, text });
  };
  let ending: { index: number; logits: Float32Array } | null = null; // the token that ends the sequence, reported after the flush

  // Decode: sample, record, stop or feed the token back.
  if (finishReason !== 'abort') {
    for (let step = 0; ; step++) {
      if (step >= opts.maxTokens) break; // 'length'
      await nextTick();
      if (aborted()) {
        finishReason = 'abort';
        break;
      }
      const logits = last!;
      const id = sampler.sample(logits.subarray(0, nWords));
      generatedIds.push(id);
      logprobs.push(logprobOf(logits, id));
      ending = { index: step, logits };
      if (id === tokenizer.eosId) {
        finishReason = 'eos';
        break;
      }
      if (output.add(decoder.push(id))) {
        finishReason = 'stop';
        break;
      }
      const pos = start.startPos + fed;
      if (step + 1 >= opts.maxTokens || pos >= MAX_POSITIONS) break; // 'length': nothing will read its logits
      ending = null;
      report(step, logits);
      last = forwardRow(model, [id], pos, false).last;
      fed += 1;
    }
  }
  if (finishReason !== 'stop' && output.add(decoder.flush())) finishReason = 'stop';
  output.finish();
  if (ending) report(ending.index, ending.logits);
  const t2 = performance.now();

  return {
    completion: {
      promptIds: [...promptIds],
      generatedIds,
      text: output.text,
      logprobs,
      ...(promptLogprobs ? { promptLogprobs } : {}),
      finishReason,
      seed: sampler.seed,
      timings: { prefillMs: t1 - t0, decodeMs: t2 - t1 },
    },
    fed,
  };
}

// ----------------------------------------------------------------------------------------------
// The generated text: stop strings and streaming

/**
 * Collects the decoded text, finds stop strings in it and streams what is final to onText: a tail
 * that is the start of a stop string is held back until the next piece shows whether it is one.
 */
export class TextOutput {
  text = '';
  private emitted = 0;
  private searched = 0;
  private readonly longest: number;

  constructor(
    private readonly stops: readonly string[],
    private readonly onText?: (text: string) => void,
  ) {
    this.longest = Math.max(0, ...stops.map((s) => s.length));
  }

  /** Appends decoded text; true when a stop string appeared (the text is then cut before it). */
  add(piece: string): boolean {
    if (piece === '') return false;
    this.text += piece;
    // A new occurrence ends in the new piece: start looking longest-1 units before it.
    const from = Math.max(0, this.searched - this.longest + 1);
    this.searched = this.text.length;
    let cut = -1;
    for (const stop of this.stops) {
      const at = this.text.indexOf(stop, from);
      if (at >= 0 && (cut < 0 || at < cut)) cut = at;
    }
    if (cut >= 0) {
      this.text = this.text.slice(0, cut);
      this.emit(this.text.length);
      return true;
    }
    this.emit(this.text.length - this.heldBack());
    return false;
  }

  /** Sends what is left: the sequence ended. */
  finish(): void {
    this.emit(this.text.length);
  }

  /** The length of the longest tail of the text that begins some stop string. */
  private heldBack(): number {
    for (let k = Math.min(this.longest - 1, this.text.length); k > 0; k--) {
      const tail = this.text.slice(this.text.length - k);
      if (this.stops.some((s) => s.startsWith(tail))) return k;
    }
    return 0;
  }

  private emit(end: number): void {
    if (end <= this.emitted) return;
    this.onText?.(this.text.slice(this.emitted, end));
    this.emitted = end;
  }
}
