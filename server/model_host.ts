/**
 * The served model, the requests admitted to it and their turns on it.
 *
 *  - Loading: the server listens before the model is loaded; until setReady(), requests that need
 *    the model get 503 and /health says "loading".
 *  - Admission: at most `maxQueue` requests that need the model at once (waiting, running, or still
 *    sending their body), and at most `pendingBodyBytes` of their bodies; past either a 429, decided
 *    from the headers before the body is read.
 *  - Turns: requests take turns on the model in the order they arrive, through generation/'s
 *    withModel() queue (so also behind any other generation on the same model). A turn tokenizes the
 *    request's prompts and runs its generations back to back, each from position 0 of a fresh
 *    sequence, so an answer does not depend on what else is in flight. A request whose client left
 *    while it waited is skipped when its turn comes, untokenized.
 *  - Failure: when a turn fails with anything but a bad request (e.g. wasm's "memory access out of
 *    bounds"), the model is checked at once with a 1-token forward compared to the same forward run
 *    when it became ready. If it still answers alike, only that request fails (a 500); if not, the
 *    host is "failed": every request gets 503 and onFatal is called (the serve command exits non-zero,
 *    for a supervisor to restart it) rather than a server that answers /health but not the model.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { FastifyRequest } from 'fastify';
import type { Tokenizer, Transformer } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { TokenizerError } from '../tokenizer/error';
import { GenerationError, withModel } from '../generation/generate';
import { SamplingError } from '../generation/sampling';
import { ApiError } from './errors';
import { TokenTexts, type Usage } from './run_generation';

/** A loaded model as the routes use it. */
export interface ServedModel {
  transformer: Transformer;
  sp: SentencePieceProcessor;
  /** How each token id reads in logprobs. */
  texts: TokenTexts;
  /**
   * A lower bound on the tokens sp.encode gives for a text (BOS not counted), found without
   * tokenizing it: a text far too long for the model is refused at once instead of costing seconds
   * of tokenizing (3.2 s for 3.9 MB) while every other request waits. 0 when no bound is known.
   */
  minTokens(text: string): number;
}

/**
 * minTokens() for a tokenizer: each token stands for at most `longest` bytes of the text (its
 * piece's UTF-8, a byte piece one byte), so a text of n bytes (plus the space SentencePiece puts
 * before it) needs at least (n + 1) / longest tokens. That holds only when the tokenizer keeps the
 * text as it is (no normalization that shrinks it, such as NFKC composing or collapsing spaces) and
 * falls back to bytes rather than merging unknown characters into one <unk>: checked by a round trip
 * of text that each of those would change; if it fails there is no bound.
 */
function tokenBound(sp: SentencePieceProcessor): (text: string) => number {
  const probe = 'a  b\t\tc\n\n d\u0065\u0301 \u1100\u1161\u11a8 \uff21 \ufb01 \u{1f9ec}\u{10ffff}';
  let byteFallback = 0;
  let longest = 1;
  for (let id = 0; id < sp.vocabSize; id++) {
    if (sp.isByte(id)) byteFallback++;
    else if (!sp.isControl(id)) longest = Math.max(longest, Buffer.byteLength(sp.piece(id).replaceAll('\u2581', ' '), 'utf8'));
  }
  let identity = false;
  try {
    identity = sp.decode(sp.encode(probe, false)) === probe;
  } catch {
    identity = false;
  }
  if (byteFallback < 256 || !identity) return () => 0;
  return (text) => Math.floor((Buffer.byteLength(text, 'utf8') + 1) / longest);
}

/** The tokenizer as loadModel returns it, or its SentencePieceProcessor. */
export type AnyTokenizer = Tokenizer | SentencePieceProcessor;

export type HostState = 'loading' | 'ready' | 'failed';

export interface HostOptions {
  /** Requests that need the model admitted at once: waiting, running or sending their body (default DEFAULT_MAX_QUEUE). */
  maxQueue?: number;
  /** Bytes of request bodies admitted at once (default DEFAULT_PENDING_BODY_BYTES). */
  pendingBodyBytes?: number;
  /** Called once when the model's backend stops working, with a one-line message (default: print it on stderr; the serve command also exits 1). */
  onFatal?: (message: string) => void;
}

export const DEFAULT_MAX_QUEUE = 64;
/** 16 MiB: four bodies of the default 4 MiB limit at once, hundreds of ordinary requests (a body is parsed in one go: each one admitted holds the event loop for its JSON.parse). */
export const DEFAULT_PENDING_BODY_BYTES = 16 * 2 ** 20;
/** Seconds a 429 or 503 asks the client to wait before it retries (the Retry-After header). */
export const RETRY_AFTER_SECONDS = 1;

/** Thrown into a turn whose client left before it came: nothing is sent (there is no one to send it to). */
export class ClientGoneError extends Error {
  override name = 'ClientGoneError';
}

/** Errors that say the request was bad, not that the model failed. */
const isRequestError = (err: unknown): boolean =>
  err instanceof ApiError || err instanceof GenerationError || err instanceof SamplingError || err instanceof TokenizerError || err instanceof ClientGoneError;

const firstLine = (err: unknown): string => (err instanceof Error ? err.message : String(err)).split('\n')[0];

export class ModelHost {
  private served: ServedModel | undefined;
  private stateNow: HostState = 'loading';
  /** Logits of [BOS] at position 0, from when the model became ready: what check() compares to. */
  private baseline: Float32Array | undefined;
  private admittedNow = 0;
  private bytesNow = 0;
  private readonly usage = new WeakMap<object, Usage>();
  readonly maxQueue: number;
  readonly pendingBodyBytes: number;
  private readonly onFatal: (message: string) => void;

  constructor(opts: HostOptions = {}) {
    this.maxQueue = opts.maxQueue ?? DEFAULT_MAX_QUEUE;
    this.pendingBodyBytes = opts.pendingBodyBytes ?? DEFAULT_PENDING_BODY_BYTES;
    this.onFatal =
      opts.onFatal ??
      ((message) => {
        process.stderr.write(`error: ${message}\n`);
      });
  }

  get state(): HostState {
    return this.stateNow;
  }

  /** Requests admitted now (waiting, running or sending their body). */
  get admitted(): number {
    return this.admittedNow;
  }

  /** The model, once loaded. */
  get model(): ServedModel | undefined {
    return this.served;
  }

  /** The model is loaded: requests may use it from now on. Runs the 1-token forward that check() compares to. */
  setReady(transformer: Transformer, tokenizer: AnyTokenizer): void {
    const sp = 'processor' in tokenizer ? tokenizer.processor : tokenizer;
    this.served = { transformer, sp, texts: new TokenTexts(sp), minTokens: tokenBound(sp) };
    this.baseline = this.probe();
    this.stateNow = 'ready';
  }

  /**
   * Admits a request that needs the model, whose body is `bodyBytes` long (its Content-Length, or
   * the body limit when it is sent in chunks), or says why not: 503 while loading or after a
   * failure, 429 past the queue or the body budget. Each admission is ended by release().
   */
  admit(bodyBytes: number): ApiError | null {
    if (this.stateNow === 'loading') {
      return new ApiError(503, 'The model is still loading; retry shortly.', null, 'model_loading', 'server_error', { 'Retry-After': String(RETRY_AFTER_SECONDS) });
    }
    if (this.stateNow === 'failed') return new ApiError(503, "The model's backend has failed; the server is shutting down.", null, 'model_failed');
    const busy = (what: string) =>
      new ApiError(429, `This server is busy: ${what}. Retry after ${RETRY_AFTER_SECONDS} s.`, null, 'rate_limit_exceeded', 'requests', { 'Retry-After': String(RETRY_AFTER_SECONDS) });
    if (this.admittedNow >= this.maxQueue) return busy(`${this.admittedNow} requests are already queued, its limit (--max-queue ${this.maxQueue})`);
    if (this.admittedNow > 0 && this.bytesNow + bodyBytes > this.pendingBodyBytes) {
      return busy(`the requests in its queue hold ${this.bytesNow} bytes of bodies and this one would pass its budget of ${this.pendingBodyBytes}`);
    }
    this.admittedNow++;
    this.bytesNow += bodyBytes;
    return null;
  }

  release(bodyBytes: number): void {
    this.admittedNow--;
    this.bytesNow -= bodyBytes;
  }

  /** Notes a request's token counts, for its log line. */
  recordUsage(request: FastifyRequest, usage: Usage): void {
    this.usage.set(request, usage);
  }

  usageOf(request: FastifyRequest): Usage | undefined {
    return this.usage.get(request);
  }

  /**
   * Runs `fn` when the request's turn on the model comes; a request whose client left (`signal`)
   * is skipped. A failure that is not the request's fault is checked as the header says.
   */
  turn<T>(signal: AbortSignal, fn: (model: ServedModel) => Promise<T>): Promise<T> {
    const served = this.served;
    if (served === undefined || this.stateNow !== 'ready') return Promise.reject(this.admit(0) ?? new ApiError(503, 'The model is not ready.'));
    return withModel(served.transformer, {}, async () => {
      if (this.stateNow !== 'ready') throw new ApiError(503, "The model's backend has failed; the server is shutting down.", null, 'model_failed');
      if (signal.aborted) throw new ClientGoneError('the client left before its turn');
      try {
        return await fn(served);
      } catch (err) {
        if (isRequestError(err)) throw err;
        throw this.checkAfter(err);
      }
    });
  }

  /** After a failure: a 500 for the request if the model still works, else the host fails (onFatal). */
  private checkAfter(err: unknown): ApiError {
    const failure = firstLine(err);
    let broken: string | null;
    try {
      const now = this.probe();
      const base = this.baseline!;
      const bad = now.findIndex((x, i) => !(Math.abs(x - base[i]) <= 1e-4 * Math.max(1, Math.abs(base[i]))));
      broken = now.length !== base.length ? 'a forward gives logits of another size' : bad >= 0 ? `a 1-token forward now gives ${now[bad]} where it gave ${base[bad]} at startup` : null;
    } catch (probeErr) {
      broken = `a 1-token forward fails too (${firstLine(probeErr)})`;
    }
    if (broken !== null) {
      this.stateNow = 'failed';
      this.onFatal(`the model's backend stopped working after "${failure}": ${broken}; exiting so that a supervisor can restart the server`);
      return new ApiError(500, `The model failed on this request (${failure}) and no longer works; the server is shutting down.`, null, 'model_failed');
    }
    return new ApiError(500, `The model failed on this request: ${failure}. The server checked the model afterwards and it still works.`, null, 'model_error');
  }

  /** The logits of [BOS] at position 0 of a fresh sequence on row 0. */
  private probe(): Float32Array {
    const { transformer, sp } = this.served!;
    const logits = tf.tidy(() => transformer.forward(tf.tensor2d([[Math.max(0, sp.bosId)]], [1, 1], 'int32'), tf.tensor1d([0], 'int32')));
    try {
      return logits.dataSync() as Float32Array;
    } finally {
      logits.dispose();
    }
  }
}
