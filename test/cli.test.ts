/**
 * The command line end to end, run as users run it: `ts-node one_file_ref.ts ...` spawned from the
 * repository root on the wasm backend.
 *
 * Bad input (a flag, a missing or broken file of a model folder, each made in a temp dir from a
 * copy of fixtures/tiny with one thing corrupted) must end with exit code 1 and one stderr line
 * `error: ...` naming the file or flag and what is wrong, no stack trace unless --verbose.
 * Good runs must print what the Python reference printed: generate's texts, ids and logprobs and
 * the logits, from fixtures/reference/tiny (dumped by fixtures/dump_reference.py), within 1e-4.
 *
 * Each spawn costs about 2 s (ts-node and wasm start-up), so the spawns run two at a time.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readNpy } from '../checkpoint/npy';
import { maxAbsDiff } from './models';

const ROOT = path.resolve(__dirname, '..');
const TS_NODE = path.join(ROOT, 'node_modules', '.bin', 'ts-node');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const REFERENCE = path.join(ROOT, 'fixtures', 'reference', 'tiny');
const TOLERANCE = 1e-4;
const SPAWN_TIMEOUT_MS = 60_000;

// ----------------------------------------------------------------------------------------------
// Spawning the CLI

interface CliResult {
  args: string[];
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** At most this many CLIs run at once. */
const MAX_PARALLEL = Math.max(1, Math.min(2, os.availableParallelism()));
let running = 0;
const waiting: (() => void)[] = [];

async function withSlot<T>(fn: () => Promise<T>): Promise<T> {
  if (running >= MAX_PARALLEL) await new Promise<void>((resolve) => waiting.push(resolve));
  running++;
  try {
    return await fn();
  } finally {
    running--;
    waiting.shift()?.();
  }
}

/** Runs `ts-node one_file_ref.ts ...args` from the repository root, killed after SPAWN_TIMEOUT_MS. */
function cli(args: string[]): Promise<CliResult> {
  return withSlot(
    () =>
      new Promise<CliResult>((resolve, reject) => {
        const child = spawn(TS_NODE, ['one_file_ref.ts', ...args], {
          cwd: ROOT,
          env: { ...process.env, MISTRAL_BACKEND: 'wasm' },
          timeout: SPAWN_TIMEOUT_MS,
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let stdout = '';
        let stderr = '';
        child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
        child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
        child.on('error', reject);
        child.on('close', (code, signal) => resolve({ args, code, signal, stdout, stderr }));
      }),
  );
}

/** What a failure message shows: the command and everything it printed. */
function describeRun(r: CliResult): string {
  return `one_file_ref.ts ${r.args.map((a) => JSON.stringify(a)).join(' ')}\nexit ${r.code} ${r.signal ?? ''}\n` +
    `--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

/** stderr without the status lines a model command prints: `backend: NAME`, the loading summary, the timing. */
function errorLines(r: CliResult): string[] {
  const status = /^(backend: \S+|loading weights: .* in [\d.]+ s \(.*\/s\)|\d+ steps in [\d.]+ s: .*|(compute pool|matrix products on tfjs|low-memory mode): .*)$/;
  return r.stderr.split('\n').filter((line) => line !== '' && !status.test(line));
}

/** Exit code 1, nothing on stdout, one stderr line `error: ...` mentioning every item, no stack trace. */
function expectOneLineError(r: CliResult, mentions: (string | RegExp)[]): void {
  const what = describeRun(r);
  expect(r.signal, `killed (hang?): ${what}`).toBeNull();
  expect(r.code, what).toBe(1);
  expect(r.stdout, what).toBe('');
  expect(r.stderr, `stack trace without --verbose: ${what}`).not.toMatch(/^ {4}at /m);
  const lines = errorLines(r);
  expect(lines, what).toHaveLength(1);
  expect(lines[0], what).toMatch(/^error: \S/);
  for (const m of mentions) {
    if (typeof m === 'string') expect(lines[0], what).toContain(m);
    else expect(lines[0], what).toMatch(m);
  }
}

// ----------------------------------------------------------------------------------------------
// Broken model folders: each a copy of fixtures/tiny with one thing wrong

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-cli-test-'));
const PARAMS = JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8')) as Record<string, number>;

const folder = (name: string): string => path.join(TMP, name);
const fileIn = (name: string, file: string): string => path.join(TMP, name, file);

function writeParams(dir: string, edit: (p: Record<string, unknown>) => void): void {
  const params: Record<string, unknown> = { ...PARAMS };
  edit(params);
  fs.writeFileSync(path.join(dir, 'params.json'), JSON.stringify(params, null, 2));
}

function cutPth(dir: string, bytes: (size: number) => number): void {
  const file = path.join(dir, 'consolidated.00.pth');
  const data = fs.readFileSync(file);
  fs.writeFileSync(file, data.subarray(0, bytes(data.length)));
}

const BROKEN: Record<string, (dir: string) => void> = {
  'no-params': (dir) => fs.rmSync(path.join(dir, 'params.json')),
  'no-pth': (dir) => fs.rmSync(path.join(dir, 'consolidated.00.pth')),
  'no-tokenizer': (dir) => fs.rmSync(path.join(dir, 'tokenizer.model')),
  'pth-folder': (dir) => {
    fs.rmSync(path.join(dir, 'consolidated.00.pth'));
    fs.mkdirSync(path.join(dir, 'consolidated.00.pth'));
  },
  'params-not-json': (dir) => fs.writeFileSync(path.join(dir, 'params.json'), '{"dim": 64, "n_layers": 2,\n'),
  'params-missing-field': (dir) => writeParams(dir, (p) => delete p.hidden_dim),
  'params-string-field': (dir) => writeParams(dir, (p) => (p.dim = String(PARAMS.dim))),
  'params-zero-field': (dir) => writeParams(dir, (p) => (p.n_layers = 0)),
  'params-kv-heads': (dir) => writeParams(dir, (p) => (p.n_kv_heads = PARAMS.n_heads - 1)),
  'params-extra-layer': (dir) => writeParams(dir, (p) => (p.n_layers = PARAMS.n_layers + 1)),
  'params-hidden-dim': (dir) => writeParams(dir, (p) => (p.hidden_dim = PARAMS.hidden_dim + 1)),
  'pth-half': (dir) => cutPth(dir, (size) => Math.floor(size / 2)),
  'pth-100-bytes': (dir) => cutPth(dir, () => 100),
  'pth-text': (dir) => fs.writeFileSync(path.join(dir, 'consolidated.00.pth'), 'These are not the weights you are looking for.\n'.repeat(20)),
  'pth-png': (dir) =>
    fs.writeFileSync(
      path.join(dir, 'consolidated.00.pth'),
      Buffer.concat([Buffer.from('89504e470d0a1a0a0000000d49484452', 'hex'), Buffer.alloc(400)]),
    ),
  'tokenizer-garbage': (dir) => fs.writeFileSync(path.join(dir, 'tokenizer.model'), 'not a sentencepiece model\n'.repeat(40)),
};

beforeAll(() => {
  for (const [name, corrupt] of Object.entries(BROKEN)) {
    fs.cpSync(TINY, folder(name), { recursive: true });
    corrupt(folder(name));
  }
});

afterAll(() => {
  fs.rmSync(TMP, { recursive: true, force: true });
});

// ----------------------------------------------------------------------------------------------
// The Python reference's dumps

interface NpyRef {
  file: string;
  shape: number[];
}
interface ReferenceCase {
  name: string;
  kind: string;
  ids?: number[][];
  prefill_len?: number;
  same_ids_as?: string;
  prompts?: string[];
  max_tokens?: number;
  generated_ids?: number[][];
  texts?: string[];
  logits?: NpyRef;
  all_logprobs?: NpyRef;
}

const INDEX = JSON.parse(fs.readFileSync(path.join(REFERENCE, 'index.json'), 'utf8')) as {
  model_folder: string;
  cases: ReferenceCase[];
};

function referenceCase(name: string): ReferenceCase {
  const found = INDEX.cases.find((c) => c.name === name);
  if (found === undefined) throw new Error(`${path.join(REFERENCE, 'index.json')}: no case "${name}"`);
  return found;
}

function referenceArray(ref: NpyRef | undefined): { data: Float32Array; shape: number[] } {
  if (ref === undefined) throw new Error('reference case has no array');
  const { data, shape } = readNpy(path.join(REFERENCE, ref.file));
  expect(shape).toEqual(ref.shape);
  return { data: Float32Array.from(data), shape };
}


// ----------------------------------------------------------------------------------------------
// Bad input

interface BadCase {
  name: string;
  args: string[];
  /** Strings the error line must contain / patterns it must match: the file or flag, and the problem. */
  mentions: (string | RegExp)[];
}

const tokensOf = (row: number[]): string => row.join(',');
const OUT = path.join(TMP, 'out.npy');

const BAD_CASES: BadCase[] = [
  // flags and arguments
  { name: 'unknown flag', args: [TINY, '--bogus'], mentions: ['--bogus', /unknown/i] },
  { name: 'missing MODEL', args: ['--max-tokens', '3'], mentions: ['MODEL'] },
  { name: 'MODEL folder that does not exist', args: [folder('nowhere')], mentions: [folder('nowhere'), /no such/] },
  { name: 'flag without its value', args: [TINY, '--max-tokens'], mentions: ['--max-tokens', /needs a value/] },
  { name: '--max-tokens -1', args: [TINY, '--max-tokens', '-1'], mentions: ['--max-tokens', '"-1"', /integer >= 0/] },
  { name: '--max-tokens 1.5', args: [TINY, '--max-tokens', '1.5'], mentions: ['--max-tokens', '"1.5"', /integer >= 0/] },
  { name: '--max-tokens abc', args: [TINY, '--max-tokens', 'abc'], mentions: ['--max-tokens', '"abc"', /integer >= 0/] },
  // the model folder
  { name: 'folder without params.json', args: [folder('no-params')], mentions: [fileIn('no-params', 'params.json'), /missing/] },
  { name: 'folder without consolidated.00.pth', args: [folder('no-pth')], mentions: [fileIn('no-pth', 'consolidated.00.pth'), /missing/] },
  { name: 'folder without tokenizer.model', args: [folder('no-tokenizer')], mentions: [fileIn('no-tokenizer', 'tokenizer.model'), /missing/] },
  {
    name: 'a folder named consolidated.00.pth',
    args: [folder('pth-folder')],
    mentions: [fileIn('pth-folder', 'consolidated.00.pth'), /expected a file/],
  },
  // params.json
  { name: 'params.json not JSON', args: [folder('params-not-json')], mentions: [fileIn('params-not-json', 'params.json'), /JSON/] },
  {
    name: 'params.json missing a field',
    args: [folder('params-missing-field')],
    mentions: [fileIn('params-missing-field', 'params.json'), 'hidden_dim', /missing/],
  },
  {
    name: 'params.json with a string for a number',
    args: [folder('params-string-field')],
    mentions: [fileIn('params-string-field', 'params.json'), '"dim"', /number/],
  },
  {
    name: 'params.json with a zero field',
    args: [folder('params-zero-field')],
    mentions: [fileIn('params-zero-field', 'params.json'), 'n_layers', /positive/],
  },
  {
    name: 'params.json with n_heads not a multiple of n_kv_heads',
    args: [folder('params-kv-heads')],
    mentions: [fileIn('params-kv-heads', 'params.json'), 'n_heads', 'n_kv_heads', /multiple/],
  },
  // consolidated.00.pth
  { name: '.pth cut at half', args: [folder('pth-half')], mentions: [fileIn('pth-half', 'consolidated.00.pth'), /truncated/] },
  { name: '.pth cut at 100 bytes', args: [folder('pth-100-bytes')], mentions: [fileIn('pth-100-bytes', 'consolidated.00.pth'), /truncated/] },
  { name: 'a text file as .pth', args: [folder('pth-text')], mentions: [fileIn('pth-text', 'consolidated.00.pth'), /not a zip/] },
  { name: 'a PNG header as .pth', args: [folder('pth-png')], mentions: [fileIn('pth-png', 'consolidated.00.pth'), /not a zip/] },
  {
    name: 'params.json with one layer more than the checkpoint',
    args: [folder('params-extra-layer')],
    mentions: [fileIn('params-extra-layer', 'consolidated.00.pth'), /missing weight/, `layers.${PARAMS.n_layers}.`],
  },
  {
    name: 'params.json hidden_dim against the checkpoint shapes',
    args: [folder('params-hidden-dim')],
    mentions: [fileIn('params-hidden-dim', 'consolidated.00.pth'), 'layers.0.feed_forward.w1.weight', /shape/, String(PARAMS.hidden_dim + 1)],
  },
  // tokenizer.model
  {
    name: 'corrupt tokenizer.model',
    args: [folder('tokenizer-garbage'), '--prompt', 'hi', '--max-tokens', '1'],
    mentions: [fileIn('tokenizer-garbage', 'tokenizer.model'), /SentencePiece/],
  },
  // logits
  {
    name: 'logits with ragged --tokens rows',
    args: ['logits', TINY, '--tokens', '1,2,3', '--tokens', '1,2', '--out', OUT],
    mentions: ['--tokens', /same number/],
  },
  {
    name: 'logits with an id outside the vocabulary',
    args: ['logits', TINY, '--tokens', `1,2,${PARAMS.vocab_size}`, '--out', OUT],
    mentions: ['--tokens', String(PARAMS.vocab_size), /vocabulary/],
  },
  { name: 'logits without --out', args: ['logits', TINY, '--tokens', '1,2,3'], mentions: ['--out'] },
  {
    name: 'logits with non-numeric tokens',
    args: ['logits', TINY, '--tokens', '1,two,3', '--out', OUT],
    mentions: ['--tokens', '1,two,3', /token ids/],
  },
  {
    name: 'logits --out in a folder that does not exist',
    args: ['logits', TINY, '--tokens', '1,2,3', '--out', path.join(TMP, 'nowhere', 'x.npy')],
    mentions: ['--out', path.join(TMP, 'nowhere'), /does not exist/],
  },
  {
    name: 'logits --start-pos past the rotary table',
    // one_file_ref.py's rotary table covers 128_000 positions: 127_998 + 3 tokens needs 128_001.
    args: ['logits', TINY, '--tokens', '1,2,3', '--start-pos', '127998', '--out', OUT],
    mentions: ['--start-pos', '127998'],
  },
];

describe.concurrent('bad input: exit code 1, one line naming the file or flag, no stack trace', () => {
  it.each(BAD_CASES)('$name', async ({ args, mentions }) => {
    expectOneLineError(await cli(args), mentions);
  });

  it('--verbose adds the stack trace', async () => {
    const r = await cli([folder('params-extra-layer'), '--verbose']);
    const what = describeRun(r);
    expect(r.code, what).toBe(1);
    const lines = errorLines(r);
    expect(lines[0], what).toMatch(/^error: .*missing weight/);
    expect(lines.slice(1).filter((line) => /^ {4}at /.test(line)).length, what).toBeGreaterThan(0);
  });
});

// ----------------------------------------------------------------------------------------------
// Good input

describe.concurrent('good input', () => {
  it('--help exits 0 and lists every flag', async () => {
    const r = await cli(['--help']);
    const what = describeRun(r);
    expect(r.code, what).toBe(0);
    expect(r.stderr, what).toBe('');
    for (const flag of ['--max-tokens', '--prompt', '--json', '--tokens', '--out', '--start-pos', '--prefill', '--backend', '--verbose', '--help']) {
      expect(r.stdout, `${flag} in --help`).toContain(flag);
    }
    expect(r.stdout).toContain('logits');
    expect(r.stdout).toContain('MISTRAL_BACKEND');
  });

  /** Runs `MODEL --prompt ... --max-tokens N --json` for a reference generate case and compares everything. */
  async function checkGenerate(name: string): Promise<{ texts: string[] }> {
    const ref = referenceCase(name);
    const prompts = ref.prompts ?? [];
    const args = [TINY, ...prompts.flatMap((p) => ['--prompt', p]), '--max-tokens', String(ref.max_tokens), '--json'];
    const r = await cli(args);
    const what = describeRun(r);
    expect(r.code, what).toBe(0);
    const lines = r.stdout.split('\n');
    expect(lines, what).toHaveLength(2); // one JSON line and its newline
    expect(lines[1]).toBe('');
    const out = JSON.parse(lines[0]) as { texts: string[]; logprobs: number[][]; generated_ids: number[][] };
    expect(Object.keys(out).sort()).toEqual(['generated_ids', 'logprobs', 'texts']);
    expect(out.generated_ids).toEqual(ref.generated_ids);
    expect(out.texts).toEqual(ref.texts);
    const expected = referenceArray(ref.all_logprobs);
    expect(out.logprobs.map((row) => row.length)).toEqual(new Array<number>(expected.shape[0]).fill(expected.shape[1]));
    const worst = maxAbsDiff(out.logprobs.flat(), expected.data);
    expect(worst, `${name}: largest logprob difference`).toBeLessThanOrEqual(TOLERANCE);
    return out;
  }

  it("--prompt ... --json matches the reference's generate (generate_0: an empty prompt, teacher forcing)", async () => {
    const ref = referenceCase('generate_0');
    expect(ref.prompts).toContain(''); // the case this test is about
    expect(ref.max_tokens).toBeGreaterThan(0);
    await checkGenerate('generate_0');
  });

  it('--max-tokens 0 --json gives no texts, as the reference (generate_2)', async () => {
    expect(referenceCase('generate_2').max_tokens).toBe(0);
    const out = await checkGenerate('generate_2');
    expect(out.texts).toEqual([]);
  });

  /** Runs `logits` on a reference case's ids and compares the .npy written with the reference's logits. */
  async function checkLogits(name: string, ids: number[][], expectedRef: NpyRef | undefined, extra: string[]): Promise<void> {
    const out = path.join(TMP, `${name}${extra.join('')}.npy`);
    const args = ['logits', TINY, ...ids.flatMap((row) => ['--tokens', tokensOf(row)]), '--out', out, ...extra];
    const r = await cli(args);
    const what = describeRun(r);
    expect(r.code, what).toBe(0);
    expect(errorLines(r), what).toEqual([]);
    const written = readNpy(out);
    const expected = referenceArray(expectedRef);
    expect(written.dtype).toBe('float32');
    expect(written.shape).toEqual(expected.shape);
    expect(maxAbsDiff(written.data, expected.data), `${name} ${extra.join(' ')}: largest logit difference`).toBeLessThanOrEqual(TOLERANCE);
  }

  it("logits --tokens ... --out F.npy writes the reference's prefill logits (prefill_0)", async () => {
    const ref = referenceCase('prefill_0');
    await checkLogits('prefill_0', ref.ids ?? [], ref.logits, []);
  });

  it('logits --prefill 1 (then one token per forward) gives the same logits (prefill_0)', async () => {
    const ref = referenceCase('prefill_0');
    await checkLogits('prefill_0', ref.ids ?? [], ref.logits, ['--prefill', '1']);
  });

  it("logits on two rows with --prefill 3, decoding past the sliding window (prefill_decode_0)", async () => {
    const ref = referenceCase('prefill_decode_0');
    const ids = referenceCase(ref.same_ids_as ?? '').ids ?? [];
    expect(ids.length).toBe(2);
    await checkLogits('prefill_decode_0', ids, ref.logits, ['--prefill', String(ref.prefill_len)]);
  });
});

it('the reference dumps were made from fixtures/tiny', () => {
  expect(INDEX.model_folder).toBe('fixtures/tiny');
});
