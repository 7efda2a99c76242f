/**
 * An OpenAI-compatible REST API for a model, on fastify, so that any OpenAI client library can call
 * it (Mistral's deployment docs serve the model the same way):
 *
 *   GET  /health               200 once the model is loaded and answering, 503 before (server/info.ts)
 *   GET  /v1/models            the one model, named by `modelName` (server/info.ts)
 *   POST /v1/completions       text completion of a prompt (server/completions.ts)
 *   POST /v1/chat/completions  the Mistral-7B-Instruct v0.1 chat template (server/chat.ts)
 *
 * Bodies are checked by fastify's ajv against server/schemas.ts; every error is OpenAI's error JSON
 * (server/errors.ts). `stream: true` answers with server-sent events.
 *
 * What buildServer adds around the routes, decided on the route the router matched (never on the
 * raw URL, which `%76` or an absolute-form request line can disguise):
 *  - the API key, on every route but /health;
 *  - a body must be JSON in UTF-8: another charset is a 415 naming it;
 *  - admission to the model (server/model_host.ts): 503 while it loads, 429 past the queue or the
 *    body budget, from the headers alone, before the body is read;
 *  - timeouts for headers, bodies and idle keep-alive connections, and a cap on connections;
 *  - one log line per request.
 */
import { createHash, timingSafeEqual } from 'crypto';
import * as http from 'http';
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify';
import type { Transformer } from '../one_file_ref';
import { ApiError, handleError } from './errors';
import { ModelHost, type AnyTokenizer } from './model_host';
import { registerChat } from './chat';
import { registerCompletions } from './completions';
import { registerHealth, registerModels } from './info';
import { now, type RouteContext } from './common';

export interface ServerOptions {
  /** The model: either `host` (the serve command's, made ready once its model loads) or a loaded transformer and tokenizer. */
  host?: ModelHost;
  transformer?: Transformer;
  /** one_file_ref's Tokenizer (as loadModel returns it) or its SentencePieceProcessor. */
  tokenizer?: AnyTokenizer;
  /** The model id clients name in `model`, listed by /v1/models. */
  modelName: string;
  /** When set, every route but /health needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Largest request body in bytes (default DEFAULT_BODY_LIMIT); larger ones get 413. */
  bodyLimit?: number;
  /** Seconds a client has to send a request's headers, and its whole body, and that an idle keep-alive connection stays open (default DEFAULT_TIMEOUT_SECONDS). */
  timeoutSeconds?: number;
  /** Connections open at once; more are closed as they come (default DEFAULT_MAX_CONNECTIONS). */
  maxConnections?: number;
  /** Receives one line per request (method, route, status, tokens, duration); default none. */
  log?: (line: string) => void;
  /** fastify's own request log on stdout (default off). */
  logger?: boolean;
}

/** 4 MiB: room for a prompt of the model's 128k positions as text or as token ids. */
export const DEFAULT_BODY_LIMIT = 4 * 1024 * 1024;
export const DEFAULT_TIMEOUT_SECONDS = 30;
export const DEFAULT_MAX_CONNECTIONS = 512;

/** Compares secrets in constant time (of their hashes, so that lengths do not show either). */
function sameSecret(a: string, b: string): boolean {
  const hash = (s: string): Buffer => createHash('sha256').update(s).digest();
  return timingSafeEqual(hash(a), hash(b));
}

/** The route the router matched for a request (undefined when none did: a 404). */
const matchedRoute = (request: FastifyRequest): string | undefined => request.routeOptions.url;

/** Whether the matched route runs the model (routes say so in their config). */
const usesModel = (request: FastifyRequest): boolean => (request.routeOptions.config as { usesModel?: boolean } | undefined)?.usesModel === true;

export function buildServer(opts: ServerOptions): FastifyInstance {
  const host = opts.host ?? new ModelHost();
  if (opts.host === undefined) {
    if (opts.transformer === undefined || opts.tokenizer === undefined) throw new TypeError('buildServer: give either host or transformer and tokenizer');
    host.setReady(opts.transformer, opts.tokenizer);
  }
  const bodyLimit = opts.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const timeoutMs = 1000 * (opts.timeoutSeconds ?? DEFAULT_TIMEOUT_SECONDS);
  const maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;

  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit,
    // Types as sent: "5" is not an integer. Nothing added or removed.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false, allowUnionTypes: true } },
    forceCloseConnections: true,
    return503OnClosing: true,
    // Node's own timeouts: headers and the whole request within timeoutMs (checked every second at
    // most), keep-alive connections closed after timeoutMs idle. Waiting for a response is not timed:
    // a request may wait its turn in the queue for long.
    serverFactory: (handler) => {
      const server = http.createServer(
        { headersTimeout: timeoutMs, requestTimeout: timeoutMs, keepAliveTimeout: timeoutMs, connectionsCheckingInterval: Math.min(1000, Math.max(50, timeoutMs / 4)) },
        handler,
      );
      server.maxConnections = maxConnections;
      return server;
    },
  });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((request, reply) => {
    handleError(new ApiError(404, `Invalid URL (${request.method} ${request.url})`, null, 'unknown_url'), request, reply);
  });

  // One line per request, when its response ends or its client leaves.
  const log = opts.log;
  if (log !== undefined) {
    app.addHook('onRequest', async (request, reply) => {
      const start = performance.now();
      reply.raw.once('close', () => {
        const usage = host.usageOf(request);
        const route = matchedRoute(request) ?? JSON.stringify(request.url.slice(0, 200));
        const status = reply.raw.writableFinished ? String(reply.raw.statusCode) : `${reply.raw.headersSent ? reply.raw.statusCode : '-'} (client gone)`;
        const tokens = usage ? ` prompt_tokens=${usage.prompt_tokens} completion_tokens=${usage.completion_tokens}` : '';
        log(`${request.method} ${route} ${status}${tokens} ${((performance.now() - start) / 1000).toFixed(3)}s`);
      });
    });
  }

  // The API key, on every route but /health, by the route matched (404s too: they say nothing of what exists).
  const apiKey = opts.apiKey;
  if (apiKey !== undefined) {
    app.addHook('onRequest', async (request) => {
      if (matchedRoute(request) === '/health') return;
      const header = request.headers.authorization;
      if (header === undefined || header === '') {
        throw new ApiError(401, "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer YOUR_KEY'.", null, 'missing_api_key');
      }
      const key = /^Bearer\s+(.*)$/i.exec(header)?.[1].trim() ?? '';
      if (!sameSecret(key, apiKey)) throw new ApiError(401, 'Incorrect API key provided.', null, 'invalid_api_key');
    });
  }

  // Bodies are JSON in UTF-8 (RFC 8259): a body that says another charset is refused, not misread.
  app.addHook('onRequest', async (request) => {
    const type = request.headers['content-type'];
    if (type === undefined) return;
    const charset = /;\s*charset\s*=\s*"?([^";\s]*)"?/i.exec(type)?.[1];
    if (charset !== undefined && !/^utf-?8$/i.test(charset)) {
      throw new ApiError(415, `Unsupported charset ${JSON.stringify(charset)} in Content-Type: send the JSON body as UTF-8 (charset=utf-8, or no charset).`, null, 'unsupported_charset');
    }
  });

  // Admission to the model, before its body is read.
  app.addHook('onRequest', async (request, reply) => {
    if (!usesModel(request)) return;
    const declared = Number(request.headers['content-length']);
    const bytes = Number.isSafeInteger(declared) && declared >= 0 ? Math.min(declared, bodyLimit) : bodyLimit;
    const refused = host.admit(bytes);
    if (refused) {
      // The body is not wanted: close the connection after the answer rather than read it all.
      void reply.header('Connection', 'close');
      throw refused;
    }
    reply.raw.once('close', () => host.release(bytes));
  });

  const ctx: RouteContext = { host, modelName: opts.modelName, created: now() };
  registerHealth(app, ctx);
  registerModels(app, ctx);
  registerCompletions(app, ctx);
  registerChat(app, ctx);
  return app;
}

/** Where a listening server is, for messages: http://HOST:PORT */
export function serverUrl(app: FastifyInstance): string {
  const address = app.server.address();
  if (address === null || typeof address === 'string') return String(address);
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return `http://${host}:${address.port}`;
}
