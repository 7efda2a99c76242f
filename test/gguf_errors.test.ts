/**
 * Bad GGUF input: each case a file made by the project's writer with one thing wrong (or bytes
 * patched after writing), each giving a one-line CheckpointError that names the file and says what
 * is wrong: truncated, wrong magic, an unsupported tensor type, a tensor past the end, metadata of
 * the wrong type, a non-llama architecture, counts too large for the file... And one CLI run: exit
 * code 1 and a single stderr line.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { openModel } from '../checkpoint';
import { CheckpointError } from '../checkpoint/errors';
import { GgufType, openGguf, type GgufEntry } from '../checkpoint/gguf';
import { ggufHeader, llamaMetadata, writeGguf, type GgufTensorToWrite } from '../checkpoint/gguf_write';
import { ggufVocabFromSentencePiece } from '../tokenizer/from_gguf';
import { loadModel } from '../one_file_ref';

const ROOT = path.resolve(__dirname, '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-bad-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const PARAMS = { dim: 32, n_layers: 1, head_dim: 8, hidden_dim: 64, n_heads: 4, n_kv_heads: 2, sliding_window: 8, norm_eps: 1e-5, vocab_size: 512, rope_theta: 10000 };
const VOCAB = ggufVocabFromSentencePiece(fs.readFileSync(path.join(ROOT, 'fixtures', 'tiny', 'tokenizer.model')), 'tiny');

/** A complete small model: every tensor of PARAMS, filled with a ramp. */
function tensors(type: 'F32' | 'Q8_0' = 'F32'): GgufTensorToWrite[] {
  const { dim, hidden_dim: f, n_heads: h, n_kv_heads: k, head_dim: d, vocab_size: v } = PARAMS;
  const shapes: [string, number[]][] = [
    ['token_embd.weight', [v, dim]],
    ['blk.0.attn_q.weight', [h * d, dim]],
    ['blk.0.attn_k.weight', [k * d, dim]],
    ['blk.0.attn_v.weight', [k * d, dim]],
    ['blk.0.attn_output.weight', [dim, h * d]],
    ['blk.0.ffn_gate.weight', [f, dim]],
    ['blk.0.ffn_down.weight', [dim, f]],
    ['blk.0.ffn_up.weight', [f, dim]],
    ['blk.0.attn_norm.weight', [dim]],
    ['blk.0.ffn_norm.weight', [dim]],
    ['output_norm.weight', [dim]],
    ['output.weight', [v, dim]],
  ];
  return shapes.map(([name, shape]) => {
    const numel = shape.reduce((a, b) => a * b, 1);
    const t = shape.length === 2 ? type : 'F32';
    return {
      name,
      shape,
      type: t,
      data: () => (t === 'F32' ? new Uint8Array(Float32Array.from({ length: numel }, (_, i) => (i % 13) / 13 - 0.5).buffer) : new Uint8Array((numel / 32) * 34)),
    };
  });
}

function meta(edit: (m: [string, GgufEntry][]) => [string, GgufEntry][] = (m) => m): [string, GgufEntry][] {
  return edit(llamaMetadata('bad', PARAMS, VOCAB, 'F32'));
}

const setKey = (key: string, entry: GgufEntry | null) => (m: [string, GgufEntry][]): [string, GgufEntry][] => {
  const out = m.filter(([k]) => k !== key);
  if (entry) out.push([key, entry]);
  return out;
};

let n = 0;
function file(metadata = meta(), ts = tensors()): string {
  const f = path.join(dir, `case${n++}.gguf`);
  writeGguf(f, metadata, ts);
  return f;
}

/** The offset of the u32 type field of tensor `name`'s info in the file's header. */
function typeFieldOffset(bytes: Buffer, name: string): number {
  // The name as stored: its u64 length, then its bytes (so "output.weight" is not found inside "blk.0.attn_output.weight").
  const stored = Buffer.alloc(8 + name.length);
  stored.writeBigUInt64LE(BigInt(name.length));
  stored.write(name, 8, 'utf8');
  const at = bytes.indexOf(stored) + 8;
  const nDims = bytes.readUInt32LE(at + name.length);
  return at + name.length + 4 + 8 * nDims;
}

function expectError(fn: () => unknown, file: string, pattern: RegExp): void {
  let error: unknown;
  try {
    fn();
  } catch (err) {
    error = err;
  }
  expect(error).toBeInstanceOf(CheckpointError);
  const message = (error as Error).message;
  expect(message).not.toContain('\n');
  expect(message.startsWith(`${file}: `)).toBe(true);
  expect(message).toMatch(pattern);
}

describe('bad GGUF files give one-line errors naming the file', () => {
  it('a good file opens (the baseline the cases below break)', () => {
    const g = openGguf(file());
    expect(g.params).toMatchObject({ dim: 32, n_layers: 1, vocab_size: 512 });
    expect(g.read('output.weight').length).toBe(512 * 32);
    g.close();
  });

  it('wrong magic', () => {
    const f = file();
    const b = fs.readFileSync(f);
    b.write('GGML', 0, 'latin1');
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /magic "GGML" .* expected "GGUF": not a GGUF file$/);
  });

  it('wrong magic in a file named .gguf, through openModel', async () => {
    const f = path.join(dir, 'text.gguf');
    fs.writeFileSync(f, 'hello, not a model at all');
    await expect(openModel(f)).rejects.toThrow(/text\.gguf: magic "hell" .*not a GGUF file$/);
  });

  it('a file shorter than the magic', () => {
    const f = path.join(dir, 'short.gguf');
    fs.writeFileSync(f, 'GG');
    expectError(() => openGguf(f), f, /file is 2 bytes, too short for the GGUF magic/);
  });

  it('truncated in the header', () => {
    const f = file();
    const b = fs.readFileSync(f);
    for (const cut of [6, 20, 100, 5000]) {
      fs.writeFileSync(f, b.subarray(0, cut));
      expectError(() => openGguf(f), f, /truncated|fit in the rest of the file/);
    }
  });

  it('truncated in the data: a tensor past the end of the file', () => {
    const f = file();
    const b = fs.readFileSync(f);
    fs.writeFileSync(f, b.subarray(0, b.length - 100));
    expectError(() => openGguf(f), f, /tensor "output.weight" \(bytes \d+\.\.\d+ of the data, which starts at byte \d+\) runs past the end of the \d+-byte file: truncated\?$/);
  });

  it('an unsupported GGUF version', () => {
    const f = file();
    const b = fs.readFileSync(f);
    b.writeUInt32LE(1, 4);
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /GGUF version 1 is not supported \(expected 3/);
  });

  for (const [type, name] of [[12, 'Q4_K'], [14, 'Q6_K'], [23, 'IQ4_XS'], [2, 'Q4_0'], [28, 'F64'], [99, '99 (unknown)']] as const) {
    it(`an unsupported tensor type: ${name}`, () => {
      const f = file();
      const b = fs.readFileSync(f);
      b.writeUInt32LE(type, typeFieldOffset(b, 'blk.0.ffn_up.weight'));
      fs.writeFileSync(f, b);
      expectError(() => openGguf(f), f, new RegExp(`tensor "blk\\.0\\.ffn_up\\.weight" has type ${name.replace(/[()]/g, '\\$&')}, not supported: expected F32, F16, BF16 or Q8_0$`));
    });
  }

  it('a non-llama architecture', () => {
    const f = file(meta(setKey('general.architecture', { type: GgufType.STRING, value: 'gemma' })));
    expectError(() => openGguf(f), f, /general\.architecture is "gemma", not supported: expected "llama"/);
  });

  it('a mixture of experts (llama architecture with experts)', () => {
    const f = file(meta(setKey('llama.expert_count', { type: GgufType.UINT32, value: 8 })));
    expectError(() => openGguf(f), f, /llama\.expert_count is 8: mixture-of-experts models are not supported/);
  });

  it('metadata of the wrong type', () => {
    const cases: [string, GgufEntry, RegExp][] = [
      ['llama.block_count', { type: GgufType.STRING, value: '1' }, /metadata key "llama\.block_count" has type STRING, expected an integer$/],
      ['llama.attention.layer_norm_rms_epsilon', { type: GgufType.UINT32, value: 1 }, /"llama\.attention\.layer_norm_rms_epsilon" has type UINT32, expected FLOAT32 or FLOAT64$/],
      ['general.architecture', { type: GgufType.UINT8, value: 1 }, /"general\.architecture" has type UINT8, expected STRING$/],
      ['general.alignment', { type: GgufType.FLOAT32, value: 32 }, /"general\.alignment" has type FLOAT32, expected an integer$/],
      ['llama.embedding_length', { type: GgufType.INT32, value: -4 }, /"llama\.embedding_length" is -4, expected an integer in \[1, /],
    ];
    for (const [key, entry, pattern] of cases) {
      const f = file(meta(setKey(key, entry)));
      expectError(() => openGguf(f), f, pattern);
    }
  });

  it('tokenizer metadata of the wrong type or length (when the tokenizer is built)', async () => {
    const ints = { type: GgufType.ARRAY, itemType: GgufType.INT32, value: { itemType: GgufType.INT32, values: [1, 2] } };
    let f = file(meta(setKey('tokenizer.ggml.tokens', ints)));
    expectError(() => openGguf(f).vocab(), f, /"tokenizer\.ggml\.tokens" has type ARRAY of INT32, expected ARRAY of STRING$/);
    f = file(meta(setKey('tokenizer.ggml.scores', { type: GgufType.ARRAY, itemType: GgufType.FLOAT32, value: { itemType: GgufType.FLOAT32, values: [0] } })));
    expectError(() => openGguf(f).vocab(), f, /"tokenizer\.ggml\.scores" has 1 items, but tokenizer\.ggml\.tokens has 512$/);
    f = file(meta(setKey('tokenizer.ggml.bos_token_id', { type: GgufType.UINT32, value: 512 })));
    expectError(() => openGguf(f).vocab(), f, /"tokenizer\.ggml\.bos_token_id" is 512, expected an integer in \[0, 511\]$/);
    f = file(meta(setKey('tokenizer.ggml.model', { type: GgufType.STRING, value: 'gpt2' })));
    await expect(openModel(f)).rejects.toThrow(/tokenizer\.ggml\.model is "gpt2", not supported: expected "llama"/);
    f = file(meta(setKey('tokenizer.ggml.model', null)));
    await expect(openModel(f)).rejects.toThrow(/no tokenizer in the metadata \(tokenizer\.ggml\.model is missing\)$/);
  });

  it('a missing hyperparameter', () => {
    const f = file(meta(setKey('llama.feed_forward_length', null)));
    expectError(() => openGguf(f), f, /metadata key "llama\.feed_forward_length" is missing$/);
  });

  it('counts and lengths larger than the file, refused before allocating', () => {
    const base = fs.readFileSync(file());
    // tensor count at byte 8, metadata count at 16, the first key's length at 24
    for (const [at, pattern] of [[8, /tensor count at byte 8 is 1152921504606846976, but only \d+ tensors fit/], [16, /metadata count at byte 16 is \d+, but only/], [24, /length of metadata key #0 at byte 24 is \d+, but only \d+ bytes fit/]] as const) {
      const b = Buffer.from(base);
      b.writeBigUInt64LE(1n << 60n, at);
      const f = path.join(dir, `count${at}.gguf`);
      fs.writeFileSync(f, b);
      expectError(() => openGguf(f), f, pattern);
    }
    // An array's item count: the tokens array claims 2^40 strings.
    const b = Buffer.from(base);
    const key = Buffer.from('tokenizer.ggml.tokens');
    const at = b.indexOf(key) + key.length + 4 + 4; // value type ARRAY, item type STRING, then the count
    b.writeBigUInt64LE(1n << 40n, at);
    const f = path.join(dir, 'array.gguf');
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /item count of metadata key "tokenizer\.ggml\.tokens" at byte \d+ is 1099511627776, but only \d+ items fit/);
  });

  it('a BOOL that is neither 0 nor 1, a bad value type, duplicate keys and tensors', () => {
    let f = file();
    let b = fs.readFileSync(f);
    const key = Buffer.from('tokenizer.ggml.add_bos_token');
    b[b.indexOf(key) + key.length + 4] = 7;
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /metadata key "tokenizer\.ggml\.add_bos_token" at byte \d+ is a BOOL of value 7, expected 0 or 1$/);
    f = file();
    b = fs.readFileSync(f);
    b.writeUInt32LE(13, b.indexOf(key) + key.length);
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /metadata key "tokenizer\.ggml\.add_bos_token" has value type 13, expected 0\.\.12/);
    f = file(meta((m) => [...m, ['llama.block_count', { type: GgufType.UINT32, value: 1 }]]));
    expectError(() => openGguf(f), f, /metadata key "llama\.block_count" appears twice$/);
    const ts = tensors();
    f = file(meta(), [...ts, ts[8]]);
    expectError(() => openGguf(f), f, /tensor "blk\.0\.attn_norm\.weight" appears twice$/);
  });

  it('a tensor that is not one of the model\'s, 5 dims, Q8_0 rows not a multiple of 32', () => {
    let f = file(meta(), [...tensors(), { name: 'blk.0.attn_qkv.weight', shape: [4], type: 'F32', data: () => new Uint8Array(16) }]);
    expectError(() => openGguf(f), f, /tensor "blk\.0\.attn_qkv\.weight" is not a tensor of Mistral's llama architecture/);
    f = file(meta(), [...tensors(), { name: 'blk.1.attn_norm.weight', shape: [1, 1, 1, 1, 4], type: 'F32', data: () => new Uint8Array(16) }]);
    expectError(() => openGguf(f), f, /tensor "blk\.1\.attn_norm\.weight" has 5 dims, expected 1 to 4$/);
    const ts = tensors();
    f = file(meta(), ts);
    const b = fs.readFileSync(f);
    b.writeUInt32LE(8, typeFieldOffset(b, 'blk.0.attn_norm.weight')); // 32 elements: one block... of F32 bytes
    b.writeBigUInt64LE(20n, typeFieldOffset(b, 'blk.0.attn_norm.weight') - 8); // ne[0] = 20
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /tensor "blk\.0\.attn_norm\.weight" is Q8_0 with ne\[0\] = 20, not a multiple of the block size 32$/);
  });

  it('misaligned and overlapping tensor offsets', () => {
    let f = file();
    let b = fs.readFileSync(f);
    const off = typeFieldOffset(b, 'output.weight') + 4;
    b.writeBigUInt64LE(b.readBigUInt64LE(off) + 4n, off);
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /tensor "output\.weight" has offset \d+, not a multiple of the alignment 32$/);
    f = file();
    b = fs.readFileSync(f);
    b.writeBigUInt64LE(0n, typeFieldOffset(b, 'output.weight') + 4);
    fs.writeFileSync(f, b);
    expectError(() => openGguf(f), f, /tensors "token_embd\.weight" and "output\.weight" overlap$/);
  });

  it('a header alone (ggufHeader) for a file whose data never came', () => {
    const { header } = ggufHeader(meta(), tensors());
    const f = path.join(dir, 'header-only.gguf');
    fs.writeFileSync(f, header);
    expectError(() => openGguf(f), f, /tensor "token_embd\.weight" .* runs past the end/);
  });

  it('a shape the metadata does not imply: the model names the weight', async () => {
    const ts = tensors();
    ts[2] = { ...ts[2], shape: [8, 32], data: () => new Uint8Array(8 * 32 * 4) };
    const f = file(meta(), ts);
    await expect(loadModel(f)).rejects.toThrow(/weight "layers\.0\.attention\.wk\.weight" has shape \[8,32\], params\.json implies \[16,32\]/);
  });

  it('no sliding window in the metadata: 4096, with a note told through the loader\'s onDecision (the CLI\'s stderr, silent with --quiet)', async () => {
    const f = file(meta(setKey('llama.attention.sliding_window', null)));
    const g = openGguf(f);
    expect(g.params.sliding_window).toBe(4096);
    const note = `${f}: no llama.attention.sliding_window in the metadata (llama.cpp's converter does not write it); using Mistral 7B's 4096`;
    expect(g.warnings).toEqual([note]);
    g.close();
    const lines: string[] = [];
    const { transformer } = await loadModel(f, { onDecision: (line) => lines.push(line) });
    transformer.dispose();
    expect(lines).toContain(`note: ${note}`);
  });

  it('the CLI: exit code 1 and one stderr line', () => {
    const f = file();
    const b = fs.readFileSync(f);
    b.writeUInt32LE(12, typeFieldOffset(b, 'blk.0.attn_q.weight'));
    fs.writeFileSync(f, b);
    const r = spawnSync(path.join(ROOT, 'node_modules', '.bin', 'ts-node'), ['--transpile-only', 'one_file_ref.ts', 'generate', f, '--prompt', 'hi', '--quiet'], {
      cwd: ROOT,
      encoding: 'utf8',
      env: { ...process.env, MISTRAL_BACKEND: 'wasm' },
      timeout: 60_000,
    });
    expect(r.status).toBe(1);
    expect(r.stderr).toBe(`error: ${f}: tensor "blk.0.attn_q.weight" has type Q4_K, not supported: expected F32, F16, BF16 or Q8_0\n`);
  });
});
