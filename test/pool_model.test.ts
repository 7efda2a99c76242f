/**
 * The model on the compute pool (--pool on): every parity fixture of fixtures/reference at 1e-4
 * against the Python reference's dumps with 1, 2 and 4 pool threads; the pool's logits the same
 * bits whatever the thread count; greedy generate() texts equal to the tfjs path's (and the
 * reference's); no tensor or pool memory growing over many decode steps; a worker killed
 * mid-forward gives a one-line error (in process and from the CLI) and leaves no thread behind.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { generate, Tokenizer, Transformer } from '../one_file_ref';
import { withComputePool } from '../model/load';
import { closeComputePools } from '../model/pooled';
import { startServe } from '../cli/serve';
import { readBack, TINY } from './models';
import { loadArray, loadIndex, maxAbsDiff, portLogits, REFERENCE, ROOT, TOLERANCE } from './reference_dumps';

const THREADS = [1, 2, 4];

/** OS threads of this process (Linux). */
function osThreads(): number {
  return Number(/^Threads:\s+(\d+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
}
async function threadsSettle(n: number): Promise<number> {
  for (let i = 0; i < 100 && osThreads() > n; i++) await new Promise((r) => setTimeout(r, 20));
  return osThreads();
}

const CONFIGS = fs.readdirSync(REFERENCE).filter((d) => fs.existsSync(path.join(REFERENCE, d, 'index.json')) && loadIndex(d).mask === 'w-keys');

describe.each(CONFIGS)('the compute pool against the reference: %s', (config) => {
  const index = loadIndex(config);
  const folder = path.join(ROOT, index.model_folder);
  const logitCases = index.cases.filter((c) => c.kind === 'prefill' || c.kind === 'prefill_decode');
  const generateCases = index.cases.filter((c) => c.kind === 'generate');
  let tokenizer: Tokenizer;
  beforeAll(async () => {
    tokenizer = await Tokenizer.load(path.join(folder, 'tokenizer.model'));
  });

  it(`every logits case at ${TOLERANCE} with ${THREADS.join(', ')} threads, the same bits for each; greedy generate() as the reference and the tfjs path`, async () => {
    const byThreads: Float32Array[][] = [];
    for (const threads of THREADS) {
      const model = await Transformer.fromFolder(folder, { maxBatchSize: index.max_batch_size, pool: 'on', threads, onDecision: () => undefined });
      try {
        expect(model.output.pooled?.lease.pool.threads).toBe(threads);
        const got = logitCases.map((c) => portLogits(model, c.ids!, c.kind === 'prefill' ? [c.positions!] : c.forward_positions!));
        logitCases.forEach((c, i) => expect(maxAbsDiff(got[i], loadArray(config, c.logits!)), `${c.name}, ${threads} threads`).toBeLessThanOrEqual(TOLERANCE));
        byThreads.push(got);
        for (const c of generateCases) {
          const before = tf.memory().numTensors;
          const result = await generate(c.prompts!, model, tokenizer, c.max_tokens!);
          expect(tf.memory().numTensors).toBe(before);
          expect(result.generatedIds, `${c.name}, ${threads} threads`).toEqual(c.generated_ids);
          expect(result.texts).toEqual(c.texts);
          expect(maxAbsDiff(result.logprobs.flat(), loadArray(config, c.all_logprobs!))).toBeLessThanOrEqual(TOLERANCE);
        }
      } finally {
        model.dispose();
      }
    }
    for (let k = 1; k < THREADS.length; k++) {
      byThreads[k].forEach((logits, i) => expect(Buffer.from(logits.buffer).equals(Buffer.from(byThreads[0][i].buffer)), `${logitCases[i].name}: ${THREADS[k]} vs 1 thread`).toBe(true));
    }
    // The tfjs path's greedy texts, from the same weights: the same as the pool's (both equal the reference's above).
    const tfjsModel = await Transformer.fromFolder(folder, { maxBatchSize: index.max_batch_size, pool: 'off' });
    try {
      for (const c of generateCases) expect((await generate(c.prompts!, tfjsModel, tokenizer, c.max_tokens!)).texts).toEqual(c.texts);
    } finally {
      tfjsModel.dispose();
    }
  });
});

describe('the compute pool over long decodes and faults', () => {
  afterAll(() => closeComputePools());

  it('1,000 decode steps: tensor count, tensor bytes and the pool threads\' wasm memories stay constant', async () => {
    const model = await Transformer.fromFolder(TINY, { maxBatchSize: 1, pool: 'on', threads: 2, onDecision: () => undefined });
    try {
      const pool = model.output.pooled!.lease.pool;
      const step = (pos: number): void => {
        const t = tf.tidy(() => tf.argMax(model.forward(tf.tensor2d([[pos % 500]], [1, 1], 'int32'), tf.tensor1d([pos], 'int32')), -1));
        t.dataSync();
        t.dispose();
      };
      for (let pos = 0; pos < 20; pos++) step(pos);
      const tensors = tf.memory().numTensors;
      const bytes = tf.memory().numBytes;
      const wasm = pool.memoryBytes();
      for (let pos = 20; pos < 1000; pos++) {
        step(pos);
        expect(tf.memory().numTensors).toBe(tensors);
      }
      expect(tf.memory().numBytes).toBe(bytes);
      expect(pool.memoryBytes()).toEqual(wasm);
    } finally {
      model.dispose();
    }
  });

  it('a worker killed mid-forward: the forward throws one line, and no pool thread is left once the model is disposed', async () => {
    const before = osThreads();
    const model = await Transformer.fromFolder(TINY, { maxBatchSize: 1, pool: 'on', threads: 3, onDecision: () => undefined });
    try {
      model.output.pooled!.lease.pool.killWorkerDuringNextCall(2);
      const t0 = Date.now();
      expect(() => readBack(() => model.forward(tf.tensor2d([[1, 2, 3]], [1, 3], 'int32'), tf.tensor1d([0, 1, 2], 'int32'))))
        .toThrow(/^compute pool: worker 2 exited \(code 1\)$/);
      expect(Date.now() - t0).toBeLessThan(10_000);
    } finally {
      model.dispose();
    }
    await closeComputePools();
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
  });

  it('from the CLI: a worker killed mid-forward is a one-line error and exit code 1, no hang', () => {
    const r = spawnSync(
      process.execPath,
      ['-r', 'ts-node/register/transpile-only', 'one_file_ref.ts', 'generate', TINY, '--pool', 'on', '--threads', '2', '--prompt', 'Hello', '--max-tokens', '4', '--quiet'],
      { cwd: ROOT, encoding: 'utf8', timeout: 60_000, env: { ...process.env, MISTRAL_TEST_KILL_POOL_WORKER: '1' } },
    );
    expect(r.error).toBeUndefined(); // no timeout
    expect(r.stderr).toBe('error: compute pool: worker 1 exited (code 1)\n');
    expect(r.status).toBe(1);
  });

  it('--pool with a bad value is a one-line usage error', () => {
    const r = spawnSync(process.execPath, ['-r', 'ts-node/register/transpile-only', 'one_file_ref.ts', 'generate', TINY, '--prompt', 'Hi', '--pool', 'maybe'], {
      cwd: ROOT, encoding: 'utf8', timeout: 60_000,
    });
    expect(r.stderr).toBe('error: --pool must be on, off or auto, got "maybe"\n');
    expect(r.status).toBe(1);
  });

  it('serve --pool on: a stream dropped mid-generation leaves the server serving the same answer; stop() leaves no pool thread', async () => {
    const before = osThreads();
    const server = (await startServe([TINY, '--port', '0', '--quiet', '--pool', 'on', '--threads', '2']))!;
    expect(osThreads()).toBeGreaterThan(before); // the pool's worker and supervisor
    try {
      const post = (body: object, signal?: AbortSignal): Promise<Response> =>
        fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal });
      const body = { model: 'tiny', prompt: 'A dog', max_tokens: 4, temperature: 0 };
      const alone = ((await (await post(body)).json()) as { choices: { text: string }[] }).choices[0].text;
      const controller = new AbortController();
      const long = await post({ model: 'tiny', prompt: 'Once upon a time', max_tokens: 20_000, temperature: 0, stream: true }, controller.signal);
      const reader = long.body!.getReader();
      for (let chunks = 0; chunks < 3; chunks++) await reader.read();
      controller.abort();
      const t0 = Date.now();
      const after = ((await (await post(body)).json()) as { choices: { text: string }[] }).choices[0].text;
      expect(after).toBe(alone);
      expect(Date.now() - t0).toBeLessThan(15_000);
    } finally {
      await server.stop();
    }
    await closeComputePools();
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
  });

  it('serve --quantize q8_0: 8 concurrent requests and one dropped stream all answered as one alone; stop() leaves no pool thread', async () => {
    const before = osThreads();
    const server = (await startServe([TINY, '--port', '0', '--quiet', '--quantize', 'q8_0', '--threads', '2']))!;
    try {
      const post = (body: object, signal?: AbortSignal): Promise<Response> =>
        fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal });
      const body = { model: 'tiny', prompt: 'A dog', max_tokens: 6, temperature: 0 };
      const text = async (r: Promise<Response>): Promise<string> => ((await (await r).json()) as { choices: { text: string }[] }).choices[0].text;
      const alone = await text(post(body));
      const controller = new AbortController();
      const long = await post({ model: 'tiny', prompt: 'Once upon a time', max_tokens: 20_000, temperature: 0, stream: true }, controller.signal);
      const together = Array.from({ length: 8 }, () => text(post(body)));
      const reader = long.body!.getReader();
      for (let chunks = 0; chunks < 3; chunks++) await reader.read();
      controller.abort();
      expect(await Promise.all(together)).toEqual(new Array(8).fill(alone));
    } finally {
      await server.stop();
    }
    await closeComputePools();
    expect(await threadsSettle(before)).toBeLessThanOrEqual(before);
  });

  it('every layout loads into the pool (straight from .pth, safetensors and HF shards, the .tar\'s stream, HF wq/wk unpermuted): the same logits, bit for bit', async () => {
    const layouts = [TINY, path.join(ROOT, 'fixtures', 'tiny.tar'), ...['tiny-safetensors', 'tiny-hf', 'tiny-hf-bin', 'tiny-hf-sharded'].map((f) => path.join(ROOT, 'fixtures', 'formats', f))];
    const ids = [[1, 100, 200, 300, 400, 17]];
    let first: Float32Array | null = null;
    for (const layout of layouts) {
      const model = await Transformer.fromFolder(layout, { maxBatchSize: 1, pool: 'on', threads: 2, onDecision: () => undefined });
      try {
        expect(model.output.pooled).not.toBeNull();
        const logits = portLogits(model, ids, [[0, 1, 2, 3, 4, 5]]);
        if (first === null) first = logits;
        else expect(Buffer.from(logits.buffer).equals(Buffer.from(first.buffer)), layout).toBe(true);
      } finally {
        model.dispose();
      }
    }
  });

  it("'auto' picks the pool for Mistral 7B's shape on wasm (its float32 weights do not fit), tfjs for the tiny model; a pool that cannot start falls back with a note ('on': an error)", async () => {
    const params7b = { dim: 4096, n_layers: 32, head_dim: 128, hidden_dim: 14336, n_heads: 32, n_kv_heads: 8, norm_eps: 1e-5, sliding_window: 4096, vocab_size: 32000 };
    const tinyParams = JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8')) as unknown;
    const big = await withComputePool(params7b, 'params.json', { threads: 1 });
    expect(big.computePool).not.toBeNull();
    expect(big.poolReason).toBe('the float32 weights would not fit the backend');
    await big.computePool!.close();
    expect((await withComputePool(params7b, 'params.json', { pool: 'off' })).computePool).toBeNull();
    expect((await withComputePool(params7b, 'params.json', { lowMemory: true })).computePool).toBeNull();
    const tiny = await withComputePool(tinyParams, 'params.json', {});
    expect(tiny.computePool).toBeNull();
    expect(tiny.poolReason).toMatch(/^the float32 weights fit the backend/);
    const fallback = await withComputePool(params7b, 'params.json', { threads: 0 });
    expect(fallback.computePool).toBeNull();
    expect(fallback.poolReason).toBe('compute pool: threads must be an integer from 1 to 256, got 0; falling back to tfjs');
    await expect(withComputePool(tinyParams, 'params.json', { pool: 'on', threads: 0 })).rejects.toThrow(/^compute pool: threads must be/);
  });
});
