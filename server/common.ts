/**
 * What the routes share: their context, the checks every generation request makes, server-sent
 * events, the client-gone signal and OpenAI's small formats (ids, usage, finish reasons).
 */
import { randomBytes } from 'crypto';
import type { FastifyReply } from 'fastify';
import { MAX_POSITIONS } from '../one_file_ref';
import type { FinishReason } from '../generation/generate';
import { ApiError, badField } from './errors';
import type { ModelHost, ServedModel } from './model_host';
import type { TokenGenerateOptions, TokenRun, Usage } from './run_generation';
import type { CommonBody } from './schemas';

/** What every route is given. */
export interface RouteContext {
  host: ModelHost;
  /** The model id clients name in `model`. */
  modelName: string;
  /** When the server started, in seconds (the model object's `created`). */
  created: number;
}

export type OpenAIFinishReason = 'stop' | 'length';

/** eos and a stop string are both 'stop' to OpenAI; an aborted run (its client is gone) says 'stop' too. */
export const finishReason = (reason: FinishReason): OpenAIFinishReason => (reason === 'length' ? 'length' : 'stop');

export const newId = (prefix: string): string => `${prefix}-${randomBytes(12).toString('hex')}`;
export const now = (): number => Math.floor(Date.now() / 1000);

export type { Usage } from './run_generation';

export function usageOf(runs: readonly TokenRun[]): Usage {
  const prompt = runs.reduce((n, r) => n + r.completion.promptIds.length, 0);
  const completion = runs.reduce((n, r) => n + r.completion.generatedIds.length, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

export function checkModel(ctx: RouteContext, model: string): void {
  if (model !== ctx.modelName) {
    throw new ApiError(404, `The model \`${model}\` does not exist or you do not have access to it; this server has \`${ctx.modelName}\`.`, 'model', 'model_not_found');
  }
}

/** The checks both generation endpoints share, before anything runs. */
export function checkCommon(ctx: RouteContext, body: CommonBody): void {
  checkModel(ctx, body.model);
  if (body.n !== undefined && body.n !== null && body.n !== 1) {
    throw badField('n', `Invalid value for 'n': this server generates one choice per prompt, so n must be 1 (got ${body.n}).`, 'invalid_value');
  }
}

/**
 * A 400 when a prompt of `promptTokens` plus `maxTokens` new ones runs past the model's positions;
 * `atLeast` when promptTokens is a lower bound found without tokenizing (ServedModel.minTokens).
 */
export function checkLength(promptTokens: number, maxTokens: number, param: string, atLeast = false): void {
  if (promptTokens + maxTokens > MAX_POSITIONS) {
    const least = atLeast ? 'at least ' : '';
    throw badField(
      param,
      `This model's maximum context length is ${MAX_POSITIONS} tokens. However, you requested ${least}${promptTokens + maxTokens} tokens ` +
        `(${least}${promptTokens} in the ${param}, ${maxTokens} in the completion). Please reduce the length of the ${param} or completion.`,
      'context_length_exceeded',
    );
  }
}

/** The sampling and stopping fields of a body as generation options. */
export function generationOptions(body: CommonBody): Omit<TokenGenerateOptions, 'maxTokens'> {
  const topP = body.top_p ?? 1;
  // top_p = 0 keeps only the most likely token: greedy. Seeds are taken modulo 2^32, the sampler's range.
  const temperature = topP === 0 ? 0 : body.temperature ?? 1;
  const seed = body.seed === undefined || body.seed === null ? undefined : ((body.seed % 2 ** 32) + 2 ** 32) % 2 ** 32;
  const stop = body.stop === undefined || body.stop === null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return { temperature, topP: topP === 0 ? 1 : topP, seed, stop };
}

/** An AbortSignal that fires when the client goes away before its response is complete. */
export function clientGone(reply: FastifyReply): AbortSignal {
  const controller = new AbortController();
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  if (reply.raw.destroyed || reply.request.raw.destroyed) controller.abort();
  return controller.signal;
}

/**
 * Server-sent events on the raw response: fastify steps aside (hijack) once the first chunk is
 * ready, so errors found before that are still JSON with their status.
 */
export class EventStream {
  constructor(private readonly reply: FastifyReply) {
    reply.hijack();
    reply.raw.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
  }

  get closed(): boolean {
    return this.reply.raw.destroyed || this.reply.raw.writableEnded;
  }

  send(data: unknown): void {
    if (!this.closed) this.reply.raw.write(`data: ${JSON.stringify(data)}\n\n`);
  }

  /** Ends the stream: `data: [DONE]`, or an error in OpenAI's shape (which OpenAI's clients raise). */
  end(error?: ApiError): void {
    if (this.closed) return;
    this.reply.raw.end(error ? `data: ${JSON.stringify(error.toJSON())}\n\n` : 'data: [DONE]\n\n');
  }
}

/** An error thrown while a stream was open, as the event that ends it. */
export function streamError(err: unknown): ApiError {
  return err instanceof ApiError ? err : new ApiError(500, `generation failed: ${(err as Error).message.split('\n')[0]}`);
}

/**
 * A request's turn on the model: `answer` returns the whole response, or calls `openStream()` and
 * streams it. Until the stream is open an error becomes the usual JSON error response; once it is,
 * the error ends the stream in OpenAI's shape (which its clients raise) and nothing is returned.
 */
export async function answerInTurn<T>(
  ctx: RouteContext,
  signal: AbortSignal,
  reply: FastifyReply,
  answer: (model: ServedModel, openStream: () => EventStream) => Promise<T>,
): Promise<T | undefined> {
  let stream: EventStream | undefined;
  try {
    return await ctx.host.turn(signal, (model) => answer(model, () => (stream = new EventStream(reply))));
  } catch (err) {
    if (stream === undefined) throw err;
    stream.end(streamError(err));
    return undefined;
  }
}
