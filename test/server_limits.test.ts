/**
 * The server attacked as issue 10 attacked it, in-process on fixtures/tiny: API-key bypasses through
 * the raw URL, a too-long prompt and a failing backend, an unbounded queue, a prefill that blocks
 * and cannot be aborted, slow and too many connections, and the bodies it misread.
 *
 * Expected values come from the requests themselves (statuses and error shapes OpenAI documents),
 * or from generation/ called directly on the same model (the text a request must answer).
 */
import * as http from 'http';
import * as net from 'net';
import * as path from 'path';
import type { AddressInfo } from 'net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import * as tf from '@tensorflow/tfjs-core';
import { loadModel, type Tokenizer, type Transformer } from '../one_file_ref';
import { complete } from '../generation/generate';
import { buildServer, type ServerOptions } from '../server/app';
import { ModelHost } from '../server/model_host';

const TINY = path.resolve(__dirname, '..', 'fixtures', 'tiny');
const MODEL = 'tiny';
const KEY = 'sk-test-limits';

let tokenizer: Tokenizer;
let transformer: Transformer;
/** The length T of every forward of the model so far. */
const forwards: number[] = [];
/** Replaces the model's forward for a while (a failing backend); null: the real one. */
let forwardOverride: ((real: Transformer['forward'], ids: Parameters<Transformer['forward']>[0], pos: Parameters<Transformer['forward']>[1]) => ReturnType<Transformer['forward']>) | null = null;
const servers: FastifyInstance[] = [];

beforeAll(async () => {
  ({ tokenizer, transformer } = await loadModel(TINY, { maxBatchSize: 1 }));
  const real = transformer.forward.bind(transformer);
  transformer.forward = (ids, pos) => {
    forwards.push(ids.shape[1]);
    return forwardOverride ? forwardOverride(real, ids, pos) : real(ids, pos);
  };
});

afterAll(async () => {
  for (const s of servers) await s.close();
  transformer?.dispose();
});

/** A server on this model (or on `host`), listening on a free port of 127.0.0.1; its base URL. */
async function serve(opts: Partial<ServerOptions> = {}): Promise<{ app: FastifyInstance; base: string; port: number }> {
  const app = buildServer({ ...(opts.host ? {} : { transformer, tokenizer }), modelName: MODEL, ...opts });
  servers.push(app);
  await app.listen({ host: '127.0.0.1', port: 0 });
  const port = (app.server.address() as AddressInfo).port;
  return { app, base: `http://127.0.0.1:${port}`, port };
}

const sp = () => tokenizer.processor;

/** A request exactly as written (path not normalised, as curl --path-as-is sends it). */
function rawRequest(port: number, method: string, requestPath: string, body?: string, headers: Record<string, string> = {}): Promise<{ status: number; headers: http.IncomingHttpHeaders; json: unknown }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: requestPath, headers: { ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}), ...headers } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (s: string) => (text += s));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, json: text === '' ? null : JSON.parse(text) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Bytes written on a raw socket, and everything that comes back until the server closes it (or `waitMs`). */
function rawSocket(port: number, data: string, waitMs = 5000): Promise<{ text: string; closedByServer: boolean }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(data));
    let text = '';
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ text, closedByServer: false });
    }, waitMs);
    socket.setEncoding('utf8').on('data', (s: string) => (text += s));
    socket.on('close', () => {
      clearTimeout(timer);
      resolve({ text, closedByServer: true });
    });
    socket.on('error', (err) => (text === '' ? reject(err) : undefined));
  });
}

/** OpenAI's error JSON with this code. */
function expectError(json: unknown, code: string): void {
  const error = (json as { error?: Record<string, unknown> }).error;
  expect(Object.keys(json as object)).toEqual(['error']);
  expect(Object.keys(error ?? {}).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(error!.code).toBe(code);
}

const completion = (prompt: unknown, maxTokens: number, extra: Record<string, unknown> = {}) => JSON.stringify({ model: MODEL, prompt, max_tokens: maxTokens, temperature: 0, ...extra });

describe('the API key is decided on the matched route', () => {
  it('percent-encoded paths and an absolute-form request line get 401 without the key; /health stays open', async () => {
    const { port } = await serve({ apiKey: KEY });
    const body = completion('Hi', 2);
    for (const [method, url, payload] of [
      ['POST', '/%761/completions', body],
      ['POST', '/%76%31/completions', body],
      ['POST', '/%76%31/chat/completions', JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 })],
      ['GET', '/%761/models', undefined],
      ['GET', '/v1/models/tiny', undefined],
      ['GET', '/v1/nothing-here', undefined],
    ] as const) {
      const res = await rawRequest(port, method, url, payload);
      expect(res.status, url).toBe(401);
      expectError(res.json, 'missing_api_key');
    }
    // The router does decode them: with the key, the same disguised path is the real route.
    const keyed = await rawRequest(port, 'POST', '/%761/completions', body, { Authorization: `Bearer ${KEY}` });
    expect(keyed.status).toBe(200);
    expect((keyed.json as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(2);

    // An absolute-form request line, as a proxy would send it, on a raw socket.
    const absolute = await rawSocket(port, `GET http://127.0.0.1:${port}/v1/models HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`);
    expect(absolute.text).toMatch(/^HTTP\/1\.1 401 /);
    expect(absolute.text).toContain('missing_api_key');

    expect((await rawRequest(port, 'GET', '/health')).status).toBe(200);
    expect((await rawRequest(port, 'GET', '/%68ealth')).status).toBe(200); // the same route
  });
});

describe('bodies the server used to misread', () => {
  it('chat content [] is a 400; a charset other than UTF-8 is a 415 naming it', async () => {
    const { port } = await serve();
    const empty = await rawRequest(port, 'POST', '/v1/chat/completions', JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: [] }] }));
    expect(empty.status).toBe(400);
    expect((empty.json as { error: { param: string } }).error.param).toBe('messages');

    const body = completion('caf\u00e9', 1);
    const latin1 = await rawRequest(port, 'POST', '/v1/completions', body, { 'Content-Type': 'application/json; charset=latin1' });
    expect(latin1.status).toBe(415);
    expectError(latin1.json, 'unsupported_charset');
    expect((latin1.json as { error: { message: string } }).error.message).toContain('latin1');
    for (const type of ['application/json; charset=utf-8', 'application/json; charset="UTF-8"', 'application/json;charset=utf8', 'application/json']) {
      expect((await rawRequest(port, 'POST', '/v1/completions', body, { 'Content-Type': type })).status, type).toBe(200);
    }
  });
});

describe('loading', () => {
  it('before the model is ready: 503 in OpenAI shape with Retry-After, /health "loading"; then 200', async () => {
    const host = new ModelHost();
    const { port } = await serve({ host });
    const health = await rawRequest(port, 'GET', '/health');
    expect(health.status).toBe(503);
    expect(health.json).toMatchObject({ status: 'loading' });
    const early = await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 2));
    expect(early.status).toBe(503);
    expectError(early.json, 'model_loading');
    expect(early.headers['retry-after']).toBe('1');
    expect((await rawRequest(port, 'GET', '/v1/models')).status).toBe(200); // the name is known already

    host.setReady(transformer, tokenizer);
    expect((await rawRequest(port, 'GET', '/health')).status).toBe(200);
    expect((await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 2))).status).toBe(200);
  });
});

describe('a failing backend', () => {
  it('a forward that fails once fails only its request (500, OpenAI shape); the next answers 200 with the right text', async () => {
    const fatal: string[] = [];
    const host = new ModelHost({ onFatal: (m) => fatal.push(m) });
    host.setReady(transformer, tokenizer);
    const { port } = await serve({ host });
    const ids = sp().encode('Once upon a time', true);
    const expected = await complete(transformer, sp(), ids, { maxTokens: 6, temperature: 0 });

    let failures = 1;
    forwardOverride = (real, x, p) => {
      if (failures-- > 0) throw new Error('memory access out of bounds');
      return real(x, p);
    };
    try {
      const failed = await rawRequest(port, 'POST', '/v1/completions', completion('Once upon a time', 6));
      expect(failed.status).toBe(500);
      expectError(failed.json, 'model_error');
      expect((failed.json as { error: { message: string } }).error.message).toContain('memory access out of bounds');
      const next = await rawRequest(port, 'POST', '/v1/completions', completion('Once upon a time', 6));
      expect(next.status).toBe(200);
      expect((next.json as { choices: { text: string }[] }).choices[0].text).toBe(expected.text);

      // Streamed: the failure is the stream's last event, in OpenAI's shape; the next stream works.
      failures = 1;
      const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion('Once upon a time', 6, { stream: true }) });
      const events = (await res.text()).split('\n\n').filter((e) => e !== '');
      expect(JSON.parse(events.at(-1)!.slice('data: '.length))).toMatchObject({ error: { code: 'model_error' } });
      expect((await rawRequest(port, 'POST', '/v1/completions', completion('Once upon a time', 6))).status).toBe(200);
    } finally {
      forwardOverride = null;
    }
    expect(fatal).toEqual([]);
    expect((await rawRequest(port, 'GET', '/health')).status).toBe(200);
  });

  it('a backend that no longer works (fails, or answers other numbers) ends the server: onFatal, /health 503, requests 503', async () => {
    for (const broken of ['throws', 'wrong numbers'] as const) {
      const fatal: string[] = [];
      const host = new ModelHost({ onFatal: (m) => fatal.push(m) });
      host.setReady(transformer, tokenizer);
      const { port } = await serve({ host });
      let first = true;
      forwardOverride = (real, x, p) => {
        if (broken === 'throws' || first) {
          first = false;
          throw new Error('memory access out of bounds');
        }
        const out = real(x, p);
        const shifted = tf.add(out, 1) as typeof out;
        out.dispose();
        return shifted;
      };
      try {
        const failed = await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 3));
        expect(failed.status, broken).toBe(500);
        expectError(failed.json, 'model_failed');
      } finally {
        forwardOverride = null;
      }
      expect(fatal, broken).toHaveLength(1);
      expect(fatal[0]).toMatch(/backend stopped working after "memory access out of bounds".*supervisor/);
      const health = await rawRequest(port, 'GET', '/health');
      expect(health.status).toBe(503);
      expect(health.json).toMatchObject({ status: 'failed' });
      const after = await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 3));
      expect(after.status).toBe(503);
      expectError(after.json, 'model_failed');
    }
  });
});

describe('the queue and long prompts', () => {
  it('past --max-queue: 429 rate_limit_exceeded with Retry-After; a freed place admits again', async () => {
    const host = new ModelHost({ maxQueue: 2 });
    host.setReady(transformer, tokenizer);
    const { port, base } = await serve({ host });
    const holders = [new AbortController(), new AbortController()];
    const started = forwards.length;
    const held = holders.map((c) => fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion('Once', 20_000, { stream: true }), signal: c.signal }).catch(() => null));
    while (forwards.length - started < 3) await new Promise((resolve) => setTimeout(resolve, 5)); // the first is generating
    for (let i = 0; i < 200 && host.admitted < 2; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    expect(host.admitted).toBe(2);
    const refused = await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 1));
    expect(refused.status).toBe(429);
    expectError(refused.json, 'rate_limit_exceeded');
    expect((refused.json as { error: { type: string } }).error.type).toBe('requests');
    expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
    expect((await rawRequest(port, 'GET', '/health')).status).toBe(200); // not counted
    for (const c of holders) c.abort();
    await Promise.all(held);
    let ok = 0;
    for (let i = 0; i < 50 && ok === 0; i++) {
      ok = (await rawRequest(port, 'POST', '/v1/completions', completion('Hi', 1))).status === 200 ? 1 : 0;
      if (ok === 0) await new Promise((resolve) => setTimeout(resolve, 20));
    }
    expect(ok).toBe(1);
  });

  it('a text prompt far past the model is a 400 at once, untokenized (3.9 MB); a 32,000-token prompt runs', async () => {
    const { port } = await serve();
    const huge = 'Once upon a time '.repeat(230_000); // 3.9 MB: tokenizing it takes seconds
    const before = forwards.length;
    const t0 = performance.now();
    const res = await rawRequest(port, 'POST', '/v1/completions', completion(huge, 1));
    expect(res.status).toBe(400);
    expectError(res.json, 'context_length_exceeded');
    expect((res.json as { error: { message: string } }).error.message).toMatch(/at least \d+ tokens/);
    console.log(`3.9 MB prompt refused in ${(performance.now() - t0).toFixed(0)} ms`);
    expect(forwards.length).toBe(before);

    // 32,000 tokens, prefilled in chunks of 256: it runs, and /health answers while it does.
    const ids = [sp().bosId, ...Array.from({ length: 31_999 }, (_, i) => 3 + ((i * 37) % (sp().vocabSize - 3)))];
    const long = rawRequest(port, 'POST', '/v1/completions', completion(ids, 1));
    while (forwards.length - before < 2) await new Promise((resolve) => setTimeout(resolve, 5));
    const health = await rawRequest(port, 'GET', '/health');
    expect(health.status).toBe(200);
    const during = forwards.length - before;
    const answer = await long;
    expect(answer.status).toBe(200);
    expect((answer.json as { usage: { prompt_tokens: number } }).usage.prompt_tokens).toBe(32_000);
    expect(forwards.length - before).toBe(125); // 125 chunks of 256; the one token generated is not fed
    expect(during).toBeLessThan(125); // /health answered mid-prefill
    expect(Math.max(...forwards.slice(before))).toBe(256);
  });

  it('a client that leaves during a long prefill frees the model within one chunk; a multi-prompt request stops between prompts', async () => {
    const { base } = await serve();
    const ids = [sp().bosId, ...Array.from({ length: 5119 }, (_, i) => 3 + ((i * 13) % (sp().vocabSize - 3)))]; // 20 chunks
    const controller = new AbortController();
    const before = forwards.length;
    const request = fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion(ids, 5), signal: controller.signal }).catch(() => 'aborted');
    while (forwards.length - before < 2) await new Promise((resolve) => setImmediate(resolve));
    controller.abort();
    expect(await request).toBe('aborted');
    await new Promise((resolve) => setTimeout(resolve, 300));
    const ran = forwards.length - before;
    expect(ran).toBeLessThanOrEqual(4); // the chunk running when it left, perhaps one more; not 20
    console.log(`prefill of 20 chunks, client gone after 2: ${ran} chunks ran`);

    // Five long prompts; the client leaves during the first: the others never start.
    const multi = new AbortController();
    const at = forwards.length;
    const five = fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion(['A', 'B', 'C', 'D', 'E'], 20_000), signal: multi.signal }).catch(() => 'aborted');
    while (forwards.length - at < 10) await new Promise((resolve) => setImmediate(resolve));
    multi.abort();
    expect(await five).toBe('aborted');
    await new Promise((resolve) => setTimeout(resolve, 300));
    const after = forwards.length;
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(forwards.length).toBe(after); // nothing runs on
    expect(after - at).toBeLessThan(60);
  });
});

describe('connections', () => {
  it('a connection whose body stops coming is closed after --timeout', async () => {
    const { port } = await serve({ timeoutSeconds: 1 });
    const partial = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model": "tiny", `;
    const res = await rawSocket(port, partial, 10_000);
    expect(res.closedByServer).toBe(true);
    expect(res.text).toMatch(/^HTTP\/1\.1 408 /);
    // Headers that never end are closed too.
    expect((await rawSocket(port, 'GET /health HTTP/1.1\r\nHost: x\r\n', 10_000)).closedByServer).toBe(true);
  });

  it('past --max-connections a new connection is closed at once; a freed one admits again', async () => {
    const { port } = await serve({ maxConnections: 2 });
    const open = await Promise.all([0, 1].map(() => new Promise<net.Socket>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => resolve(s));
    })));
    await new Promise((resolve) => setTimeout(resolve, 50));
    const third = await rawSocket(port, 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 5000);
    expect(third.closedByServer).toBe(true);
    expect(third.text).toBe('');
    open[0].destroy();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const fourth = await rawSocket(port, 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n', 5000);
    expect(fourth.text).toMatch(/^HTTP\/1\.1 200 /);
    open[1].destroy();
  });
});

describe('the request log', () => {
  it('one line per request: method, route, status, prompt and completion tokens, duration', async () => {
    const lines: string[] = [];
    const { port } = await serve({ log: (line) => lines.push(line), apiKey: KEY });
    const ids = sp().encode('Once upon a time', true);
    expect((await rawRequest(port, 'POST', '/v1/completions', completion('Once upon a time', 3), { Authorization: `Bearer ${KEY}` })).status).toBe(200);
    expect((await rawRequest(port, 'GET', '/%761/models')).status).toBe(401);
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(new RegExp(`^POST /v1/completions 200 prompt_tokens=${ids.length} completion_tokens=3 \\d+\\.\\d{3}s$`));
    expect(lines[1]).toMatch(/^GET \/v1\/models 401 \d+\.\d{3}s$/);
  });
});
