/**
 * server/app.ts and the `serve` command, called the way users call them: with the official
 * `openai` npm client (and fetch for what the client cannot send) against fixtures/tiny served
 * in-process on 127.0.0.1.
 *
 * Expected values come from the request itself (max_tokens, a stop string cut out of an earlier
 * answer) or from generation/ called directly on the same model: the server must answer exactly
 * what complete() gives for the prompt ids it should build (sp.encode for completions, the Instruct
 * template for chat), alone or among 20 requests in flight.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { AddressInfo } from 'net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import OpenAI from 'openai';
import type { FastifyInstance } from 'fastify';
import { loadModel, MAX_POSITIONS, type Tokenizer, type Transformer } from '../one_file_ref';
import { complete } from '../generation/generate';
import { encodeInstruct, type ChatMessage } from '../tokenizer/instruct';
import { buildServer } from '../server/app';
import { startServe } from '../cli/serve';

const TINY = path.resolve(__dirname, '..', 'fixtures', 'tiny');
const REFERENCE = path.resolve(__dirname, '..', 'fixtures', 'reference', 'tiny');
const MODEL = 'tiny';
const KEY = 'sk-test-0123456789';

let tokenizer: Tokenizer;
let transformer: Transformer;
let app: FastifyInstance; // no key, default body limit
let keyed: FastifyInstance; // --api-key KEY, a 2 KiB body limit
let client: OpenAI;
let base: string;
let keyedBase: string;
/** Forwards of the model so far, by anyone. */
let forwards = 0;

async function listen(server: FastifyInstance): Promise<string> {
  await server.listen({ host: '127.0.0.1', port: 0 });
  return `http://127.0.0.1:${(server.server.address() as AddressInfo).port}`;
}

beforeAll(async () => {
  ({ tokenizer, transformer } = await loadModel(TINY, { maxBatchSize: 1 }));
  const forward = transformer.forward.bind(transformer);
  transformer.forward = (ids, pos) => {
    forwards++;
    return forward(ids, pos);
  };
  app = buildServer({ transformer, tokenizer, modelName: MODEL });
  keyed = buildServer({ transformer, tokenizer, modelName: MODEL, apiKey: KEY, bodyLimit: 2048 });
  base = await listen(app);
  keyedBase = await listen(keyed);
  client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
});

afterAll(async () => {
  await app?.close();
  await keyed?.close();
  transformer?.dispose();
});

const sp = () => tokenizer.processor;

/** What generation/ gives for these prompt ids at temperature 0 (or with the sampling options given). */
async function direct(ids: number[], maxTokens: number, sampling: { temperature: number; topP?: number; seed?: number } = { temperature: 0 }) {
  return complete(transformer, sp(), ids, { maxTokens, ...sampling });
}

/** The generated text of a chat answer as decoded on its own (EOS dropped). */
function answerText(ids: number[]): string {
  return sp().decode(ids.filter((id) => id !== sp().eosId));
}

/** The error a client call fails with. */
async function apiError(call: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await call;
  } catch (err) {
    if (err instanceof OpenAI.APIError) return err;
    throw err;
  }
  throw new Error('expected the call to fail');
}

/** OpenAI's error JSON: {error: {message, type, param, code}}, with these param and (when given) code. */
function expectErrorShape(body: unknown, param: string | null = null, code?: string): void {
  const error = (body as { error?: Record<string, unknown> }).error;
  expect(Object.keys(body as object)).toEqual(['error']);
  expect(Object.keys(error ?? {}).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(typeof error!.message === 'string' && error!.message.length > 0).toBe(true);
  expect(error!.type).toEqual(expect.any(String));
  expect(error!.param).toBe(param);
  expect(error!.code === null || typeof error!.code === 'string').toBe(true);
  if (code !== undefined) expect(error!.code).toBe(code);
}

async function rawPost(url: string, body: string, headers: Record<string, string> = {}): Promise<{ status: number; json: unknown }> {
  const res = await fetch(url, { method: 'POST', body, headers: { 'Content-Type': 'application/json', ...headers } });
  return { status: res.status, json: await res.json() };
}

const CHAT: OpenAI.ChatCompletionMessageParam[] = [
  { role: 'system', content: 'You tell short stories.' },
  { role: 'user', content: 'Tell me about a ship.' },
  { role: 'assistant', content: 'The ship sailed away.' },
  { role: 'user', content: 'What happened next?' },
];
const CHAT_IDS = (): number[] => encodeInstruct(sp(), CHAT as ChatMessage[]);

describe('serve: endpoints', () => {
  it('GET /health is 200 and /v1/models lists the model by name', async () => {
    const res = await fetch(`${base}/health`);
    expect(res.status).toBe(200);
    expect(await res.json()).toMatchObject({ status: 'ok' });
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual([MODEL]);
    expect((await client.models.retrieve(MODEL)).id).toBe(MODEL);
  });

  it('POST /v1/completions answers what generation/ gives for the prompt, with usage and logprobs', async () => {
    const prompt = 'Once upon a time';
    const ids = sp().encode(prompt, true);
    const expected = await direct(ids, 8);
    const res = await client.completions.create({ model: MODEL, prompt, max_tokens: 8, temperature: 0, logprobs: 3, user: 'ignored' });
    expect(res.object).toBe('text_completion');
    expect(res.model).toBe(MODEL);
    expect(res.id).toMatch(/^cmpl-/);
    expect(res.choices).toHaveLength(1);
    const choice = res.choices[0];
    expect(choice.text).toBe(expected.text);
    expect(choice.finish_reason).toBe('length');
    expect(res.usage).toEqual({ prompt_tokens: ids.length, completion_tokens: 8, total_tokens: ids.length + 8 });

    const lp = choice.logprobs!;
    expect(lp.tokens).toHaveLength(8);
    expect(lp.token_logprobs).toHaveLength(8);
    lp.token_logprobs!.forEach((x, i) => expect(x).toBeCloseTo(expected.logprobs[i], 10));
    lp.top_logprobs!.forEach((top, i) => {
      const values = Object.values(top!);
      expect(values.length).toBeGreaterThan(0);
      expect(values.length).toBeLessThanOrEqual(3);
      // Greedy picks the most likely token: its logprob is the top one.
      expect(Math.max(...values)).toBeCloseTo(lp.token_logprobs![i]!, 10);
      expect(values.reduce((s, v) => s + Math.exp(v), 0)).toBeLessThanOrEqual(1 + 1e-9);
    });
    // Offsets into prompt + text: the first token starts right after the prompt, and they never go back.
    expect(lp.text_offset![0]).toBe(prompt.length);
    for (let i = 1; i < 8; i++) expect(lp.text_offset![i]).toBeGreaterThanOrEqual(lp.text_offset![i - 1]);
  });

  it('completions take a list of token ids and a list of prompts (one choice each)', async () => {
    const ids = sp().encode('A ship', true);
    const one = await client.completions.create({ model: MODEL, prompt: ids, max_tokens: 4, temperature: 0 });
    expect(one.choices[0].text).toBe((await direct(ids, 4)).text);
    const two = await client.completions.create({ model: MODEL, prompt: ['A ship', 'A dog'], max_tokens: 4, temperature: 0 });
    expect(two.choices.map((c) => c.index)).toEqual([0, 1]);
    expect(two.choices[0].text).toBe(one.choices[0].text);
    expect(two.choices[1].text).toBe((await direct(sp().encode('A dog', true), 4)).text);
    expect(two.usage!.prompt_tokens).toBe(ids.length + sp().encode('A dog', true).length);
  });

  it('a stop string cuts the text before it, finish_reason "stop"', async () => {
    const prompt = 'The quick brown fox';
    const full = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0 });
    const text = full.choices[0].text;
    const match = /[A-Za-z]{2}/.exec(text.slice(3));
    expect(match, `no two ASCII letters in ${JSON.stringify(text)}`).not.toBeNull();
    const stop = match![0];
    const res = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stop: [stop] });
    expect(res.choices[0].text).toBe(text.slice(0, text.indexOf(stop)));
    expect(res.choices[0].finish_reason).toBe('stop');
  });

  it('streamed completions: one chunk per token, the same text, usage at the end, then [DONE]', async () => {
    const request = { model: MODEL, prompt: 'Once upon a time', max_tokens: 10, temperature: 0 } as const;
    const whole = await client.completions.create({ ...request, logprobs: 2 });
    const stream = await client.completions.create({ ...request, logprobs: 2, stream: true, stream_options: { include_usage: true } });
    const chunks: OpenAI.Completion[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    const withChoice = chunks.filter((c) => c.choices.length > 0);
    const tokens = withChoice.filter((c) => c.choices[0].finish_reason === null);
    expect(tokens).toHaveLength(10); // max_tokens, all before any EOS (finish_reason is "length")
    expect(withChoice.at(-1)!.choices[0].finish_reason).toBe('length');
    expect(withChoice.map((c) => c.choices[0].text).join('')).toBe(whole.choices[0].text);
    expect(tokens.map((c) => c.choices[0].logprobs!.tokens![0])).toEqual(whole.choices[0].logprobs!.tokens);
    expect(tokens.map((c) => c.choices[0].logprobs!.token_logprobs![0])).toEqual(whole.choices[0].logprobs!.token_logprobs);
    expect(tokens.map((c) => c.choices[0].logprobs!.text_offset![0])).toEqual(whole.choices[0].logprobs!.text_offset);
    expect(chunks.at(-1)!.usage).toEqual(whole.usage);

    // The wire format itself: events, and [DONE] last.
    const res = await fetch(`${base}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ...request, stream: true }) });
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const events = (await res.text()).split('\n\n').filter((e) => e !== '');
    expect(events.every((e) => e.startsWith('data: '))).toBe(true);
    expect(events.at(-1)).toBe('data: [DONE]');
    expect(events).toHaveLength(10 + 1 + 1); // tokens, the finish chunk, [DONE]
  });

  it('POST /v1/chat/completions answers the Instruct template of the messages, streamed or not', async () => {
    const expected = await direct(CHAT_IDS(), 8);
    const res = await client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 2 });
    expect(res.object).toBe('chat.completion');
    expect(res.id).toMatch(/^chatcmpl-/);
    const choice = res.choices[0];
    expect(choice.message.role).toBe('assistant');
    expect(choice.message.content).toBe(answerText(expected.generatedIds));
    expect(choice.finish_reason).toBe('length');
    expect(res.usage).toEqual({ prompt_tokens: CHAT_IDS().length, completion_tokens: 8, total_tokens: CHAT_IDS().length + 8 });
    const content = choice.logprobs!.content!;
    expect(content).toHaveLength(8);
    content.forEach((entry, i) => {
      expect(entry.logprob).toBeCloseTo(expected.logprobs[i], 10);
      expect(entry.top_logprobs).toHaveLength(2);
      expect(entry.top_logprobs[0].logprob).toBeCloseTo(entry.logprob, 10); // greedy: the most likely
      expect(entry.top_logprobs[0].logprob).toBeGreaterThanOrEqual(entry.top_logprobs[1].logprob);
      expect(entry.bytes).toEqual(expect.any(Array));
    });

    const stream = await client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } });
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks[0].choices[0].delta.role).toBe('assistant');
    const withChoice = chunks.filter((c) => c.choices.length > 0);
    expect(withChoice.filter((c) => c.choices[0].finish_reason === null)).toHaveLength(1 + 8); // the role, then one per token
    expect(withChoice.at(-1)!.choices[0].finish_reason).toBe('length');
    expect(withChoice.map((c) => c.choices[0].delta.content ?? '').join('')).toBe(choice.message.content);
    expect(chunks.at(-1)!.usage).toEqual(res.usage);
  });

  it('logprobs spell each token by its piece: "\u2581" as a space, a byte >= 0x80 as bytes:\\xNN with its value in bytes', async () => {
    // The reference's greedy continuation of generate_1's prompt (fixtures/reference/tiny) starts with
    // the pieces <0x5B> \u2581at <0x6B> <0xE1> <0xB6> W (Python's sp.id_to_piece): "[" and "k" are ASCII
    // bytes, <0xE1> and <0xB6> are bytes of no whole character, as OpenAI shows them.
    const g1 = (JSON.parse(fs.readFileSync(path.join(REFERENCE, 'index.json'), 'utf8')) as { cases: { name: string; encoded_prompts: number[][]; generated_ids: number[][] }[] }).cases.find((c) => c.name === 'generate_1')!;
    const prompt = g1.encoded_prompts[0];
    const res = await client.completions.create({ model: MODEL, prompt, max_tokens: 6, temperature: 0, logprobs: 1 });
    const lp = res.choices[0].logprobs!;
    expect(lp.tokens).toEqual(['[', ' at', 'k', 'bytes:\\xe1', 'bytes:\\xb6', 'W']);
    // The two bytes became text (two U+FFFD) with "W": offsets count the text each token completed.
    expect(res.choices[0].text).toBe('[ atk\ufffd\ufffdW');
    const start = sp().decode(prompt).length;
    expect(lp.text_offset).toEqual([0, 1, 4, 5, 5, 5].map((o) => start + o));
    // Greedy: each token is its step's most likely one, under the same name.
    lp.top_logprobs!.forEach((top, i) => expect(Object.keys(top!)).toEqual([lp.tokens![i]]));

    // Chat: the tokens are the answer's pieces (its ids from generation/, their pieces from the
    // tokenizer, which test/tokenizer.test.ts checks against Python); bytes are their UTF-8, or the byte.
    const expected = await direct(CHAT_IDS(), 8);
    const chat = await client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 1 });
    const content = chat.choices[0].logprobs!.content!;
    const spelled = expected.generatedIds.map((id) => {
      const byte = /^<0x([0-9A-F]{2})>$/.exec(sp().piece(id));
      if (!byte) return { token: sp().piece(id).replaceAll('\u2581', ' '), bytes: [...Buffer.from(sp().piece(id).replaceAll('\u2581', ' '), 'utf8')] };
      const b = parseInt(byte[1], 16);
      return { token: b < 0x80 ? String.fromCharCode(b) : `bytes:\\x${byte[1].toLowerCase()}`, bytes: [b] };
    });
    expect(spelled.some((t) => t.token.startsWith('bytes:'))).toBe(true); // this answer has a byte of no whole character
    expect(content.map((e) => ({ token: e.token, bytes: e.bytes }))).toEqual(spelled);
    for (const e of content) {
      expect(e.top_logprobs[0].token).toBe(e.token);
      expect(e.top_logprobs[0].bytes).toEqual(e.bytes);
    }
  });

  it('content given as text parts and a developer message read as string content and a system message', async () => {
    const a = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello there' }], max_tokens: 4, temperature: 0 });
    const b = await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: 'developer', content: 'Be brief.' }, { role: 'user', content: [{ type: 'text', text: 'Hello ' }, { type: 'text', text: 'there' }] }],
      max_tokens: 4,
      temperature: 0,
    });
    expect(b.choices[0].message.content).toBe(a.choices[0].message.content);
    expect(b.usage).toEqual(a.usage);
  });

  it('seeded sampling is reproducible through the API and is the sampler of generation/', async () => {
    const request = { model: MODEL, prompt: 'Once upon a time', max_tokens: 16, temperature: 1, top_p: 0.9 } as const;
    const a = await client.completions.create({ ...request, seed: 1234 });
    const b = await client.completions.create({ ...request, seed: 1234 });
    const other = await client.completions.create({ ...request, seed: 4321 });
    expect(b.choices[0].text).toBe(a.choices[0].text);
    const expected = await direct(sp().encode(request.prompt, true), 16, { temperature: 1, topP: 0.9, seed: 1234 });
    expect(a.choices[0].text).toBe(expected.text);
    expect(other.choices[0].text).toBe((await direct(sp().encode(request.prompt, true), 16, { temperature: 1, topP: 0.9, seed: 4321 })).text);
    expect(other.choices[0].text).not.toBe(a.choices[0].text);

    const stream = await client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: 12, temperature: 0.8, seed: 7, stream: true });
    let streamed = '';
    for await (const chunk of stream) streamed += chunk.choices[0]?.delta.content ?? '';
    const chat = await client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: 12, temperature: 0.8, seed: 7 });
    expect(chat.choices[0].message.content).toBe(streamed);
    expect(streamed).toBe(answerText((await direct(CHAT_IDS(), 12, { temperature: 0.8, topP: 1, seed: 7 })).generatedIds));
  });
});

describe('serve: concurrency', () => {
  /** 20 requests: completions and chats, half of each streamed. */
  const requests = Array.from({ length: 20 }, (_, i) => ({ i, chat: i % 2 === 1, stream: i % 4 >= 2, prompt: `Story ${i}: ${'once '.repeat(i % 5)}there was a ship` }));

  async function ask(r: (typeof requests)[number]): Promise<string> {
    if (r.chat) {
      const body = { model: MODEL, messages: [{ role: 'user' as const, content: r.prompt }], max_tokens: 10, temperature: 0 };
      if (!r.stream) return (await client.chat.completions.create(body)).choices[0].message.content ?? '';
      let text = '';
      for await (const chunk of await client.chat.completions.create({ ...body, stream: true })) text += chunk.choices[0]?.delta.content ?? '';
      return text;
    }
    const body = { model: MODEL, prompt: r.prompt, max_tokens: 10, temperature: 0 };
    if (!r.stream) return (await client.completions.create(body)).choices[0].text;
    let text = '';
    for await (const chunk of await client.completions.create({ ...body, stream: true })) text += chunk.choices[0]?.text ?? '';
    return text;
  }

  it('20 concurrent clients get the same temperature-0 answers as each alone', async () => {
    const alone: string[] = [];
    for (const r of requests) alone.push(await ask(r));
    // Each alone is what generation/ gives for its prompt ids.
    for (const r of requests.slice(0, 2)) {
      const ids = r.chat ? encodeInstruct(sp(), [{ role: 'user', content: r.prompt }]) : sp().encode(r.prompt, true);
      const c = await direct(ids, 10);
      expect(alone[r.i]).toBe(r.chat ? answerText(c.generatedIds) : c.text);
    }
    const together = await Promise.all(requests.map((r) => ask(r)));
    expect(together).toEqual(alone);
    expect(new Set(alone).size).toBeGreaterThan(1); // the prompts differ, so must (some of) the answers
  });

  it('a client that drops its stream frees the model at once; one that left the queue costs nothing; the next is served', async () => {
    const nextBody = { model: MODEL, prompt: 'A dog', max_tokens: 4, temperature: 0 };
    const nextAlone = (await client.completions.create(nextBody)).choices[0].text;

    // 20000 greedy tokens would take minutes of forwards; the request after it waits in the queue.
    const dropped = await client.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 20_000, temperature: 0, stream: true });
    // Behind it: a long request whose client leaves while it waits, then the next one.
    const leaver = new AbortController();
    const waiting = client.completions.create({ model: MODEL, prompt: 'A cat', max_tokens: 20_000, temperature: 0 }, { signal: leaver.signal });
    const quick = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 15_000 });
    const next = quick.completions.create(nextBody);
    let chunks = 0;
    for await (const chunk of dropped) {
      expect(chunk.choices[0].finish_reason).toBeNull();
      if (chunks === 0) {
        await new Promise((resolve) => setTimeout(resolve, 100)); // the server has it queued by now
        leaver.abort();
        await expect(waiting).rejects.toThrow(OpenAI.APIUserAbortError);
      }
      if (++chunks === 3) break;
    }
    dropped.controller.abort();
    const atDrop = forwards;
    const t0 = Date.now();

    const res = await next;
    expect(res.choices[0].text).toBe(nextAlone);
    expect(Date.now() - t0).toBeLessThan(10_000);
    // The dropped run stopped within a few steps, the one that left while queued ran none; the next took its own 1 + 3.
    expect(forwards - atDrop).toBeLessThan(50);
    const after = forwards;
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(forwards).toBe(after); // nothing runs on in the background
    expect((await fetch(`${base}/health`)).status).toBe(200);
  });

  it('a client that gives up on a long non-streamed answer frees the model too', async () => {
    const controller = new AbortController();
    const long = client.completions.create({ model: MODEL, prompt: 'Once upon a time', max_tokens: 20_000, temperature: 0 }, { signal: controller.signal });
    const next = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 15_000 }).chat.completions.create({
      model: MODEL,
      messages: CHAT,
      max_tokens: 3,
      temperature: 0,
    });
    const start = forwards;
    while (forwards - start < 20) await new Promise((resolve) => setTimeout(resolve, 5)); // it is generating
    controller.abort();
    await expect(long).rejects.toThrow(OpenAI.APIUserAbortError);
    const atDrop = forwards;
    const res = await next;
    expect(res.choices[0].message.content).toBe(answerText((await direct(CHAT_IDS(), 3)).generatedIds));
    expect(forwards - atDrop).toBeLessThan(50); // its own forwards, the direct() run's and a few of the dropped run
  });
});

describe('serve: errors in OpenAI shape', () => {
  it('malformed JSON is a 400', async () => {
    const { status, json } = await rawPost(`${base}/v1/completions`, '{"model": "tiny", "prompt": ');
    expect(status).toBe(400);
    expectErrorShape(json, null, 'invalid_json');
  });

  it('a missing field is a 400 naming it', async () => {
    const noModel = await rawPost(`${base}/v1/completions`, JSON.stringify({ prompt: 'Hello' }));
    expect(noModel.status).toBe(400);
    expectErrorShape(noModel.json, 'model');
    const noMessages = await rawPost(`${base}/v1/chat/completions`, JSON.stringify({ model: MODEL }));
    expect(noMessages.status).toBe(400);
    expectErrorShape(noMessages.json, 'messages');
    const notObject = await rawPost(`${base}/v1/chat/completions`, '[1, 2]');
    expect(notObject.status).toBe(400);
    expectErrorShape(notObject.json);
  });

  it('a wrongly typed or out-of-range field is a 400 naming it, through the client', async () => {
    // Each call starts only when its turn comes: a promise that rejects while an earlier one is awaited
    // would be an unhandled rejection, which tfjs-wasm's emscripten handler turns into a crash.
    const cases: [string, () => Promise<unknown>][] = [
      ['max_tokens', () => client.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: '5' as unknown as number })],
      ['temperature', () => client.completions.create({ model: MODEL, prompt: 'Hi', temperature: 3 })],
      ['prompt', () => client.completions.create({ model: MODEL, prompt: { text: 'Hi' } as unknown as string })],
      ['prompt', () => client.completions.create({ model: MODEL, prompt: [1, 99999] })],
      ['messages', () => client.chat.completions.create({ model: MODEL, messages: [{ role: 'tool', content: 'x', tool_call_id: 'a' }] })],
      ['messages', () => client.chat.completions.create({ model: MODEL, messages: [{ role: 'assistant', content: 'Hi' }] })],
      ['n', () => client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], n: 2 })],
      ['top_logprobs', () => client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], top_logprobs: 2 })],
      ['stream', () => client.completions.create({ model: MODEL, prompt: 'Hi', stream: 'yes' as unknown as false })],
    ];
    for (const [param, call] of cases) {
      const err = await apiError(call());
      expect(err.status, param).toBe(400);
      expect(err.param, param).toBe(param);
      expect(err.type, param).toBe('invalid_request_error');
      expect(err.message.length).toBeGreaterThan(0);
    }
  });

  it('an unknown model is a 404', async () => {
    const err = await apiError(client.completions.create({ model: 'gpt-4', prompt: 'Hi', max_tokens: 1 }));
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect(err.code).toBe('model_not_found');
    expectErrorShape({ error: err.error }, 'model', 'model_not_found');
    expect((await apiError(client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'Hi' }] }))).status).toBe(404);
    const url = await fetch(`${base}/v1/nothing-here`);
    expect(url.status).toBe(404);
    expectErrorShape(await url.json());
  });

  it('a prompt plus max_tokens longer than the model allows is a 400', async () => {
    const prompt = 'Once upon a time';
    const n = sp().encode(prompt, true).length;
    const err = await apiError(client.completions.create({ model: MODEL, prompt, max_tokens: MAX_POSITIONS - n + 1 }));
    expect(err.status).toBe(400);
    expect(err.code).toBe('context_length_exceeded');
    const chat = await apiError(client.chat.completions.create({ model: MODEL, messages: CHAT, max_tokens: MAX_POSITIONS }));
    expect(chat.status).toBe(400);
    expect(chat.code).toBe('context_length_exceeded');
    // One token less is allowed: it starts (streamed, and dropped after its first token).
    const ok = await client.completions.create({ model: MODEL, prompt, max_tokens: MAX_POSITIONS - n, temperature: 0, stream: true });
    for await (const chunk of ok) {
      expect(chunk.choices[0].finish_reason).toBeNull();
      break;
    }
    ok.controller.abort();
  });

  it('a body over the size limit is a 413', async () => {
    const { status, json } = await rawPost(`${keyedBase}/v1/completions`, JSON.stringify({ model: MODEL, prompt: 'x'.repeat(4000) }), { Authorization: `Bearer ${KEY}` });
    expect(status).toBe(413);
    expectErrorShape(json, null, 'request_too_large');
    const small = await rawPost(`${keyedBase}/v1/completions`, JSON.stringify({ model: MODEL, prompt: 'x', max_tokens: 1 }), { Authorization: `Bearer ${KEY}` });
    expect(small.status).toBe(200);
  });

  it('with --api-key, a wrong or missing key is a 401; the right one works; /health needs none', async () => {
    const wrong = new OpenAI({ baseURL: `${keyedBase}/v1`, apiKey: 'sk-wrong', maxRetries: 0 });
    const err = await apiError(wrong.models.list());
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect(err.status).toBe(401);
    expectErrorShape({ error: err.error }, null, 'invalid_api_key');
    const wrongChat = await apiError(wrong.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1 }));
    expect(wrongChat.status).toBe(401);

    const missing = await rawPost(`${keyedBase}/v1/completions`, JSON.stringify({ model: MODEL, prompt: 'Hi', max_tokens: 1 }));
    expect(missing.status).toBe(401);
    expectErrorShape(missing.json);

    const right = new OpenAI({ baseURL: `${keyedBase}/v1`, apiKey: KEY, maxRetries: 0 });
    expect((await right.models.list()).data[0].id).toBe(MODEL);
    expect((await right.completions.create({ model: MODEL, prompt: 'Hi', max_tokens: 2, temperature: 0 })).usage!.completion_tokens).toBeLessThanOrEqual(2);
    expect((await fetch(`${keyedBase}/health`)).status).toBe(200);
  });
});

describe('serve command', () => {
  it('--max-queue, --timeout and --max-connections take effect; bad values are one-line errors naming the flag', async () => {
    for (const [flag, value, message] of [
      ['--max-queue', '0', '--max-queue must be an integer >= 1, got "0"'],
      ['--timeout', '0', '--timeout must be an integer >= 1, got "0"'],
      ['--timeout', '1e3', '--timeout must be an integer >= 1, got "1e3"'],
      ['--timeout', '100000', '--timeout must be at most 86400 seconds, got "100000"'],
      ['--max-connections', '-1', '--max-connections must be an integer >= 1, got "-1"'],
    ]) {
      await expect(startServe([TINY, '--port', '0', '--quiet', flag, value])).rejects.toThrow(message);
    }
    const server = await startServe([TINY, '--port', '0', '--quiet', '--max-queue', '3', '--timeout', '7', '--max-connections', '9']);
    try {
      expect(server!.host.maxQueue).toBe(3);
      expect(server!.app.server.maxConnections).toBe(9);
      expect(server!.app.server.requestTimeout).toBe(7000);
      expect(server!.app.server.headersTimeout).toBe(7000);
      expect(server!.app.server.keepAliveTimeout).toBe(7000);
    } finally {
      await server?.stop();
    }
  });


  it('binds to 127.0.0.1 by default and names the model after its folder', async () => {
    const server = await startServe([TINY, '--port', '0', '--quiet']);
    try {
      const address = server!.app.server.address() as AddressInfo;
      expect(address.address).toBe('127.0.0.1');
      const c = new OpenAI({ baseURL: `${server!.url}/v1`, apiKey: 'unused', maxRetries: 0 });
      expect((await c.models.list()).data.map((m) => m.id)).toEqual(['tiny']);
    } finally {
      await server?.stop();
    }
    const named = await startServe([TINY, '--port', '0', '--quiet', '--model-name', 'my-mistral', '--api-key', KEY]);
    try {
      const c = new OpenAI({ baseURL: `${named!.url}/v1`, apiKey: KEY, maxRetries: 0 });
      expect((await c.models.list()).data.map((m) => m.id)).toEqual(['my-mistral']);
    } finally {
      await named?.stop();
    }
  });
});
