/**
 * What the benchmark's scripts share: the "small" model's hyperparameters and its random
 * checkpoint (written by the benchmark, outside git), the workloads' token ids, a JSON line
 * protocol between the orchestrator (run.ts) and the child processes it measures, and formatting.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

export const REPO = path.resolve(__dirname, '..');

/** Where the benchmark keeps what it makes (never inside the repository). */
export const BENCH_DIR = process.env.BENCH_DIR ?? path.join(os.tmpdir(), 'mistral-ts-bench');

/** The issue's "small" model: Mistral's shape (GQA 8/2, head_dim 64, vocab 32000), 4 layers of dim 512. */
export const SMALL_PARAMS = {
  dim: 512,
  n_layers: 4,
  head_dim: 64,
  hidden_dim: 1792,
  n_heads: 8,
  n_kv_heads: 2,
  sliding_window: 4096,
  norm_eps: 1e-5,
  vocab_size: 32000,
} as const;

export type Params = { -readonly [K in keyof typeof SMALL_PARAMS]: number };

/** The weights of consolidated.00.pth with their shapes, in the reference's order (as its modules declare them). */
export function weightShapes(p: Params): [string, number[]][] {
  const q = p.n_heads * p.head_dim;
  const kv = p.n_kv_heads * p.head_dim;
  const shapes: [string, number[]][] = [['tok_embeddings.weight', [p.vocab_size, p.dim]]];
  for (let i = 0; i < p.n_layers; i++) {
    const pre = `layers.${i}`;
    shapes.push(
      [`${pre}.attention.wq.weight`, [q, p.dim]],
      [`${pre}.attention.wk.weight`, [kv, p.dim]],
      [`${pre}.attention.wv.weight`, [kv, p.dim]],
      [`${pre}.attention.wo.weight`, [p.dim, q]],
      [`${pre}.feed_forward.w1.weight`, [p.hidden_dim, p.dim]],
      [`${pre}.feed_forward.w2.weight`, [p.dim, p.hidden_dim]],
      [`${pre}.feed_forward.w3.weight`, [p.hidden_dim, p.dim]],
      [`${pre}.attention_norm.weight`, [p.dim]],
      [`${pre}.ffn_norm.weight`, [p.dim]],
    );
  }
  shapes.push(['norm.weight', [p.dim]], ['output.weight', [p.vocab_size, p.dim]]);
  return shapes;
}

/**
 * Parameters that a decode step reads in full: every matrix but the embedding table (of which it
 * reads one row per token), plus the norm gains.
 */
export function paramsReadPerToken(p: Params): { layers: number; output: number } {
  let layers = 0;
  for (const [name, shape] of weightShapes(p)) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (name.startsWith('layers.')) layers += n;
  }
  return { layers, output: p.vocab_size * p.dim + p.dim };
}

/** A small deterministic generator (xorshift32), so the checkpoint is the same on every machine. */
function uniform(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296;
  };
}

/**
 * Writes a model folder the port and the reference both read: params.json, consolidated.safetensors
 * (float32, uniform weights of standard deviation 0.02, norm gains 1) and a tokenizer.model (the
 * fixtures' tiny one: the benchmark feeds token ids, the tokenizer is only there because a model
 * folder has one). The reference's side converts the safetensors to consolidated.00.pth once.
 */
export function writeRandomModel(dir: string, params: Params, seed = 1): void {
  fs.mkdirSync(dir, { recursive: true });
  const next = uniform(seed);
  const amplitude = 0.02 * Math.sqrt(3);
  const header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> = {};
  const tensors: Float32Array[] = [];
  let offset = 0;
  for (const [name, shape] of weightShapes(params)) {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (shape.length === 1) data.fill(1);
    else for (let i = 0; i < data.length; i++) data[i] = (2 * next() - 1) * amplitude;
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
    tensors.push(data);
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8); // keeps the tensors 8-byte aligned
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  const file = path.join(dir, 'consolidated.safetensors');
  const fd = fs.openSync(`${file}.partial`, 'w');
  try {
    fs.writeSync(fd, length);
    fs.writeSync(fd, Buffer.from(json, 'latin1'));
    for (const t of tensors) fs.writeSync(fd, new Uint8Array(t.buffer, t.byteOffset, t.byteLength));
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(`${file}.partial`, file);
  fs.copyFileSync(path.join(REPO, 'fixtures', 'tiny', 'tokenizer.model'), path.join(dir, 'tokenizer.model'));
  fs.writeFileSync(path.join(dir, 'params.json'), JSON.stringify(params, null, 2));
}

/** The small model's folder, made on first use. */
export function smallModelDir(): string {
  const dir = path.join(BENCH_DIR, 'small');
  const params = path.join(dir, 'params.json');
  const same = fs.existsSync(params) && JSON.stringify(JSON.parse(fs.readFileSync(params, 'utf8'))) === JSON.stringify(SMALL_PARAMS);
  if (!same || !fs.existsSync(path.join(dir, 'consolidated.safetensors'))) {
    fs.rmSync(dir, { recursive: true, force: true });
    writeRandomModel(dir, { ...SMALL_PARAMS });
  }
  return dir;
}

/** The prompt of every workload: `n` token ids, the same on both sides (row b shifted by b). */
export function promptIds(n: number, row = 0, vocab = 32000): number[] {
  return Array.from({ length: n }, (_, i) => (1 + (i + 31 * row) * 7919) % vocab);
}

/** What a child process reports: one line of JSON after this marker on stdout. */
export const RESULT_MARKER = 'BENCH_RESULT ';

export function emitResult(result: unknown): void {
  process.stdout.write(`${RESULT_MARKER}${JSON.stringify(result)}\n`);
}

/** Peak resident memory of this process so far, in bytes. */
export function peakRssBytes(): number {
  return process.resourceUsage().maxRSS * 1024;
}

export class BenchArgError extends Error {
  override name = 'BenchArgError';
}

/** `--name value` flags into a map; flags without a value are "true". */
export function parseFlags(argv: string[], known: readonly string[]): Map<string, string> {
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) throw new BenchArgError(`unexpected argument "${arg}" (expected --flag [value])`);
    const name = arg.slice(2);
    if (!known.includes(name)) throw new BenchArgError(`unknown flag --${name} (known: ${known.map((k) => `--${k}`).join(', ')})`);
    const value = argv[i + 1] !== undefined && !argv[i + 1].startsWith('--') ? argv[++i] : 'true';
    flags.set(name, value);
  }
  return flags;
}

export function intFlag(flags: Map<string, string>, name: string, fallback: number): number {
  const v = flags.get(name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new BenchArgError(`--${name} must be a non-negative integer, got "${v}"`);
  return n;
}

export const mib = (bytes: number): string => `${(bytes / 1024 ** 2).toFixed(0)} MiB`;
export const gib = (bytes: number): string => `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
