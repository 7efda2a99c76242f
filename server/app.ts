/**
 * An OpenAI-compatible REST API for a loaded model, on fastify, so that any OpenAI client library
 * can call it (Mistral's deployment docs serve the model the same way):
 *
 *   GET  /health               200 while the server is up with its model loaded
 *   GET  /v1/models            the one model, named by `modelName`
 *   POST /v1/completions       text completion of a prompt (string, strings, token ids)
 *   POST /v1/chat/completions  the Mistral-7B-Instruct v0.1 chat template (tokenizer/instruct.ts)
 *
 * Bodies are checked by fastify's ajv against server/schemas.ts; every error is OpenAI's error JSON
 * (server/errors.ts). `stream: true` answers with server-sent events, one chunk per generated token
 * and `data: [DONE]` at the end.
 *
 * Requests share the model through generation/'s withModel() queue: one generation at a time, in
 * the order they arrive, each from position 0 of a fresh sequence, so an answer does not depend on
 * what else is in flight. A client that disconnects aborts its generation (between two forwards),
 * and a request whose client left while it waited costs nothing when its turn comes.
 */
import { createHash, randomBytes, timingSafeEqual } from 'crypto';
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import { MAX_POSITIONS, type Tokenizer, type Transformer } from '../one_file_ref';
import type { SentencePieceProcessor } from '../tokenizer';
import { encodeInstruct, type ChatMessage } from '../tokenizer/instruct';
import { TokenizerError } from '../tokenizer/error';
import type { FinishReason } from '../generation/generate';
import { ApiError, badField, handleError } from './errors';
import { CHAT_SCHEMA, COMPLETION_SCHEMA, type ChatBody, type CommonBody, type CompletionBody } from './schemas';
import { generateTokens, TokenTexts, type GeneratedToken, type TokenGenerateOptions, type TokenRun } from './tokens';

export interface ServerOptions {
  transformer: Transformer;
  /** one_file_ref's Tokenizer (as loadModel returns it) or its SentencePieceProcessor. */
  tokenizer: Tokenizer | SentencePieceProcessor;
  /** The model id clients name in `model`, listed by /v1/models. */
  modelName: string;
  /** When set, every /v1 request needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Largest request body in bytes (default DEFAULT_BODY_LIMIT); larger ones get 413. */
  bodyLimit?: number;
  /** fastify's request log on stdout (default off). */
  logger?: boolean;
}

/** 4 MiB: room for a prompt of the model's 128k positions as text or as token ids. */
export const DEFAULT_BODY_LIMIT = 4 * 1024 * 1024;

/** OpenAI's default max_tokens for /v1/completions. */
const COMPLETION_DEFAULT_MAX_TOKENS = 16;

type OpenAIFinishReason = 'stop' | 'length';

/** eos and a stop string are both 'stop' to OpenAI; an aborted run (its client is gone) says 'stop' too. */
const finishReason = (reason: FinishReason): OpenAIFinishReason => (reason === 'length' ? 'length' : 'stop');

const newId = (prefix: string): string => `${prefix}-${randomBytes(12).toString('hex')}`;
const now = (): number => Math.floor(Date.now() / 1000);

interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

function usageOf(runs: readonly TokenRun[]): Usage {
  const prompt = runs.reduce((n, r) => n + r.completion.promptIds.length, 0);
  const completion = runs.reduce((n, r) => n + r.completion.generatedIds.length, 0);
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** Compares secrets in constant time (of their hashes, so that lengths do not show either). */
function sameSecret(a: string, b: string): boolean {
  const hash = (s: string): Buffer => createHash('sha256').update(s).digest();
  return timingSafeEqual(hash(a), hash(b));
}

/**
 * Server-sent events on the raw response: fastify steps aside (hijack) once the first chunk is
 * ready, so errors found before that are still JSON with their status.
 */
class EventStream {
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

/** An AbortSignal that fires when the client goes away before its response is complete. */
function clientGone(reply: FastifyReply): AbortSignal {
  const controller = new AbortController();
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  return controller.signal;
}

/** The sampling and stopping fields of a body as generation options. */
function generationOptions(body: CommonBody): Omit<TokenGenerateOptions, 'maxTokens'> {
  const topP = body.top_p ?? 1;
  // top_p = 0 keeps only the most likely token: greedy. Seeds are taken modulo 2^32, the sampler's range.
  const temperature = topP === 0 ? 0 : body.temperature ?? 1;
  const seed = body.seed === undefined || body.seed === null ? undefined : ((body.seed % 2 ** 32) + 2 ** 32) % 2 ** 32;
  const stop = body.stop === undefined || body.stop === null ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return { temperature, topP: topP === 0 ? 1 : topP, seed, stop };
}

export function buildServer(opts: ServerOptions): FastifyInstance {
  const { transformer, modelName, apiKey } = opts;
  const sp: SentencePieceProcessor = 'processor' in opts.tokenizer ? opts.tokenizer.processor : opts.tokenizer;
  const texts = new TokenTexts(sp);
  const created = now();

  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit: opts.bodyLimit ?? DEFAULT_BODY_LIMIT,
    // Types as sent: "5" is not an integer. Nothing added or removed.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false, allowUnionTypes: true } },
    forceCloseConnections: true,
    return503OnClosing: true,
  });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((request, reply) => {
    handleError(new ApiError(404, `Invalid URL (${request.method} ${request.url})`, null, 'unknown_url'), request, reply);
  });

  if (apiKey !== undefined) {
    app.addHook('onRequest', async (request) => {
      if (!request.url.startsWith('/v1')) return;
      const header = request.headers.authorization;
      if (header === undefined || header === '') {
        throw new ApiError(401, "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer YOUR_KEY'.", null, 'missing_api_key');
      }
      const key = /^Bearer\s+(.*)$/i.exec(header)?.[1].trim() ?? '';
      if (!sameSecret(key, apiKey)) throw new ApiError(401, 'Incorrect API key provided.', null, 'invalid_api_key');
    });
  }

  const modelObject = { id: modelName, object: 'model', created, owned_by: 'mistral-ts-ref' };

  app.get('/health', async () => ({ status: 'ok', model: modelName }));
  app.get('/v1/models', async () => ({ object: 'list', data: [modelObject] }));
  app.get<{ Params: { model: string } }>('/v1/models/:model', async (request) => {
    checkModel(request.params.model);
    return modelObject;
  });

  function checkModel(model: string): void {
    if (model !== modelName) {
      throw new ApiError(404, `The model \`${model}\` does not exist or you do not have access to it; this server has \`${modelName}\`.`, 'model', 'model_not_found');
    }
  }

  /** The checks both endpoints share, before anything runs. */
  function checkCommon(body: CommonBody): void {
    checkModel(body.model);
    if (body.n !== undefined && body.n !== null && body.n !== 1) {
      throw badField('n', `Invalid value for 'n': this server generates one choice per prompt, so n must be 1 (got ${body.n}).`, 'invalid_value');
    }
  }

  function checkLength(promptTokens: number, maxTokens: number, param: string): void {
    if (promptTokens + maxTokens > MAX_POSITIONS) {
      throw badField(
        param,
        `This model's maximum context length is ${MAX_POSITIONS} tokens. However, you requested ${promptTokens + maxTokens} tokens ` +
          `(${promptTokens} in the ${param}, ${maxTokens} in the completion). Please reduce the length of the ${param} or completion.`,
        'context_length_exceeded',
      );
    }
  }

  // ---------------------------------------------------------------------------------------------
  // POST /v1/completions

  /** The prompts of a completion request as ids (BOS first for text) and the text each stands for. */
  function completionPrompts(prompt: CompletionBody['prompt']): { ids: number[]; text: string }[] {
    const fromText = (text: string): { ids: number[]; text: string } => ({ ids: sp.encode(text, true), text });
    const fromIds = (ids: number[], where: string): { ids: number[]; text: string } => {
      const bad = ids.findIndex((id) => id < 0 || id >= sp.vocabSize);
      if (bad >= 0) throw badField('prompt', `Invalid value for '${where}[${bad}]': token id ${ids[bad]} is outside the vocabulary [0, ${sp.vocabSize}).`, 'invalid_value');
      return { ids, text: sp.decode(ids) };
    };
    if (typeof prompt === 'string') return [fromText(prompt)];
    if (prompt.every((p) => typeof p === 'number')) return [fromIds(prompt as number[], 'prompt')];
    return prompt.map((p, i) => {
      if (typeof p === 'string') return fromText(p);
      if (Array.isArray(p)) return fromIds(p, `prompt[${i}]`);
      throw badField('prompt', "Invalid type for 'prompt': expected a string, an array of strings, an array of token ids or an array of arrays of token ids, not a mix.", 'invalid_type');
    });
  }

  /** OpenAI's completion logprobs for one run: generated tokens up to EOS, offsets into prompt + text. */
  function completionLogprobs(tokens: readonly GeneratedToken[], offset: number) {
    const shown = tokens.filter((t) => t.id !== sp.eosId);
    const textOffset: number[] = [];
    for (const t of shown) {
      textOffset.push(offset);
      offset += t.text.length;
    }
    return {
      tokens: shown.map((t) => texts.token(t.id)),
      token_logprobs: shown.map((t) => t.logprob),
      top_logprobs: shown.map((t) => Object.fromEntries((t.top ?? []).map((c) => [texts.token(c.id), c.logprob]))),
      text_offset: textOffset,
    };
  }

  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: { body: COMPLETION_SCHEMA } }, async (request, reply) => {
    const body = request.body;
    checkCommon(body);
    if (body.echo) throw badField('echo', "Invalid value for 'echo': this server does not echo the prompt.", 'unsupported_value');
    if (body.best_of !== undefined && body.best_of !== null && body.best_of !== 1) {
      throw badField('best_of', "Invalid value for 'best_of': this server generates one sequence per prompt, so best_of must be 1.", 'unsupported_value');
    }
    if (body.suffix) throw badField('suffix', "Invalid value for 'suffix': this server does not insert text.", 'unsupported_value');
    const prompts = completionPrompts(body.prompt);
    const maxTokens = body.max_tokens ?? COMPLETION_DEFAULT_MAX_TOKENS;
    for (const p of prompts) checkLength(p.ids.length, maxTokens, 'prompt');
    const topLogprobs = body.logprobs ?? undefined;
    const gen = { ...generationOptions(body), maxTokens, topLogprobs, signal: clientGone(reply) };
    const header = { id: newId('cmpl'), object: 'text_completion', created: now(), model: modelName };

    if (!body.stream) {
      const runs: TokenRun[] = [];
      for (const p of prompts) runs.push(await generateTokens(transformer, sp, p.ids, gen));
      return {
        ...header,
        choices: runs.map((run, index) => ({
          index,
          text: run.completion.text,
          logprobs: topLogprobs === undefined ? null : completionLogprobs(run.tokens, prompts[index].text.length),
          finish_reason: finishReason(run.completion.finishReason),
        })),
        usage: usageOf(runs),
      };
    }

    const stream = new EventStream(reply);
    const includeUsage = body.stream_options?.include_usage === true;
    const chunk = (choices: unknown[]) => ({ ...header, choices, ...(includeUsage ? { usage: null } : {}) });
    try {
      const runs: TokenRun[] = [];
      for (const [index, p] of prompts.entries()) {
        let offset = p.text.length;
        let trailing = '';
        const onToken = (t: GeneratedToken): void => {
          if (t.id === sp.eosId) {
            trailing += t.text;
            return;
          }
          const logprobs = topLogprobs === undefined ? null : completionLogprobs([t], offset);
          offset += t.text.length;
          stream.send(chunk([{ index, text: t.text, logprobs, finish_reason: null }]));
        };
        const run = await generateTokens(transformer, sp, p.ids, { ...gen, onToken });
        runs.push(run);
        if (stream.closed) return;
        stream.send(chunk([{ index, text: trailing + run.trailingText, logprobs: null, finish_reason: finishReason(run.completion.finishReason) }]));
      }
      if (includeUsage) stream.send({ ...header, choices: [], usage: usageOf(runs) });
      stream.end();
    } catch (err) {
      request.log.error(err);
      stream.end(err instanceof ApiError ? err : new ApiError(500, `generation failed: ${(err as Error).message.split('\n')[0]}`));
    }
  });

  // ---------------------------------------------------------------------------------------------
  // POST /v1/chat/completions

  /** The conversation as the Instruct template's ids; a bad role order is a 400 naming the message. */
  function chatPromptIds(messages: ChatBody['messages']): number[] {
    const converted: ChatMessage[] = messages.map((m) => ({
      role: m.role === 'developer' ? 'system' : m.role,
      content: typeof m.content === 'string' ? m.content : m.content.map((part) => part.text).join(''),
    }));
    try {
      return encodeInstruct(sp, converted);
    } catch (err) {
      if (err instanceof TokenizerError) throw badField('messages', err.message, 'invalid_value');
      throw err;
    }
  }

  /** One entry of a chat response's logprobs.content. */
  const chatLogprob = (t: GeneratedToken) => ({
    token: texts.token(t.id),
    logprob: t.logprob,
    bytes: texts.bytes(t.id),
    top_logprobs: (t.top ?? []).map((c) => ({ token: texts.token(c.id), logprob: c.logprob, bytes: texts.bytes(c.id) })),
  });

  app.post<{ Body: ChatBody }>('/v1/chat/completions', { schema: { body: CHAT_SCHEMA } }, async (request, reply) => {
    const body = request.body;
    checkCommon(body);
    const wantLogprobs = body.logprobs === true;
    if (!wantLogprobs && body.top_logprobs !== undefined && body.top_logprobs !== null) {
      throw badField('top_logprobs', "Invalid value for 'top_logprobs': it needs 'logprobs' set to true.", 'invalid_value');
    }
    const promptIds = chatPromptIds(body.messages);
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? Math.max(0, MAX_POSITIONS - promptIds.length);
    checkLength(promptIds.length, maxTokens, 'messages');
    const topLogprobs = wantLogprobs ? body.top_logprobs ?? 0 : undefined;
    // The answer is decoded on its own, as chat.ts does (mistral-common encodes an assistant message
    // alone): its first piece's dummy-prefix space is not part of the text.
    const gen = { ...generationOptions(body), maxTokens, topLogprobs, signal: clientGone(reply), context: [] };
    const header = { id: newId('chatcmpl'), object: 'chat.completion', created: now(), model: modelName, system_fingerprint: null };
    const shown = (tokens: readonly GeneratedToken[]) => tokens.filter((t) => t.id !== sp.eosId).map(chatLogprob);

    if (!body.stream) {
      const run = await generateTokens(transformer, sp, promptIds, gen);
      return {
        ...header,
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: run.completion.text, refusal: null },
            logprobs: wantLogprobs ? { content: shown(run.tokens), refusal: null } : null,
            finish_reason: finishReason(run.completion.finishReason),
          },
        ],
        usage: usageOf([run]),
      };
    }

    const stream = new EventStream(reply);
    const includeUsage = body.stream_options?.include_usage === true;
    const chunk = (choice: Record<string, unknown>) => ({
      ...header,
      object: 'chat.completion.chunk',
      choices: [{ index: 0, logprobs: null, finish_reason: null, ...choice }],
      ...(includeUsage ? { usage: null } : {}),
    });
    try {
      stream.send(chunk({ delta: { role: 'assistant', content: '' } }));
      let trailing = '';
      const onToken = (t: GeneratedToken): void => {
        if (t.id === sp.eosId) {
          trailing += t.text;
          return;
        }
        stream.send(chunk({ delta: { content: t.text }, logprobs: wantLogprobs ? { content: [chatLogprob(t)], refusal: null } : null }));
      };
      const run = await generateTokens(transformer, sp, promptIds, { ...gen, onToken });
      if (stream.closed) return;
      const rest = trailing + run.trailingText;
      stream.send(chunk({ delta: rest === '' ? {} : { content: rest }, finish_reason: finishReason(run.completion.finishReason) }));
      if (includeUsage) stream.send({ ...header, object: 'chat.completion.chunk', choices: [], usage: usageOf([run]) });
      stream.end();
    } catch (err) {
      request.log.error(err);
      stream.end(err instanceof ApiError ? err : new ApiError(500, `generation failed: ${(err as Error).message.split('\n')[0]}`));
    }
  });

  return app;
}

/** Where a listening server is, for messages: http://HOST:PORT */
export function serverUrl(app: FastifyInstance): string {
  const address = app.server.address();
  if (address === null || typeof address === 'string') return String(address);
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return `http://${host}:${address.port}`;
}
