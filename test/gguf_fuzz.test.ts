/**
 * GGUF in the fuzz suite: a small but complete GGUF model (Q8_0 matrices, F32 norms, the tiny
 * tokenizer in its metadata) is corrupted many ways (seeded): random bytes flipped in the header,
 * u64 counts set to huge values, truncation at random points, random bytes. Opening it (and then
 * reading every tensor and building the tokenizer) must either work or throw a one-line
 * CheckpointError/TokenizerError naming the file: never another exception, never a hang or an
 * allocation the file's size does not justify.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError } from '../checkpoint/errors';
import { openGguf } from '../checkpoint/gguf';
import { llamaMetadata, quantizeQ8_0, writeGguf, type GgufTensorToWrite } from '../checkpoint/gguf_write';
import { ggufVocabFromSentencePiece, sentencePieceFromGguf } from '../tokenizer/from_gguf';
import { TokenizerError } from '../tokenizer';
import { rng } from './fuzz/rng';

const ROOT = path.resolve(__dirname, '..');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-fuzz-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function goodFile(): Buffer {
  const params = { dim: 32, n_layers: 1, head_dim: 8, hidden_dim: 64, n_heads: 4, n_kv_heads: 2, sliding_window: 8, norm_eps: 1e-5, vocab_size: 512, rope_theta: 10000 };
  const vocab = ggufVocabFromSentencePiece(fs.readFileSync(path.join(ROOT, 'fixtures', 'tiny', 'tokenizer.model')), 'tiny');
  const r = rng(1);
  const tensor = (name: string, shape: number[]): GgufTensorToWrite => {
    const values = Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => r() - 0.5);
    return { name, shape, type: shape.length === 2 ? 'Q8_0' : 'F32', data: () => (shape.length === 2 ? quantizeQ8_0(values) : new Uint8Array(values.buffer)) };
  };
  const f = path.join(dir, 'good.gguf');
  writeGguf(f, llamaMetadata('fuzz', params, vocab, 'Q8_0'), [
    tensor('token_embd.weight', [512, 32]),
    tensor('blk.0.attn_q.weight', [32, 32]),
    tensor('blk.0.attn_k.weight', [16, 32]),
    tensor('blk.0.attn_v.weight', [16, 32]),
    tensor('blk.0.attn_output.weight', [32, 32]),
    tensor('blk.0.ffn_gate.weight', [64, 32]),
    tensor('blk.0.ffn_down.weight', [32, 64]),
    tensor('blk.0.ffn_up.weight', [64, 32]),
    tensor('blk.0.attn_norm.weight', [32]),
    tensor('blk.0.ffn_norm.weight', [32]),
    tensor('output_norm.weight', [32]),
    tensor('output.weight', [512, 32]),
  ]);
  return fs.readFileSync(f);
}

/** Opens, reads every tensor and rebuilds the tokenizer's proto; 'ok' or the error's message. */
function attempt(file: string): string {
  try {
    const g = openGguf(file);
    try {
      for (const name of g.tensors.keys()) g.read(name);
      sentencePieceFromGguf(g.vocab(), file);
    } finally {
      g.close();
    }
    return 'ok';
  } catch (err) {
    if (!(err instanceof CheckpointError) && !(err instanceof TokenizerError)) throw err;
    const message = (err as Error).message;
    expect(message).not.toContain('\n');
    expect(message.startsWith(`${file}: `)).toBe(true);
    return message;
  }
}

describe('GGUF fuzzing: corrupted files open or fail with one line naming the file', () => {
  const good = goodFile();
  const headerEnd = good.indexOf(Buffer.from('output.weight')) + 40;

  it('the uncorrupted file opens and reads', () => {
    const f = path.join(dir, 'copy.gguf');
    fs.writeFileSync(f, good);
    expect(attempt(f)).toBe('ok');
  });

  it('bytes flipped in the header (400 files)', () => {
    const r = rng(2);
    const f = path.join(dir, 'flip.gguf');
    const outcomes = new Set<string>();
    for (let i = 0; i < 400; i++) {
      const b = Buffer.from(good);
      const flips = 1 + Math.floor(r() * 4);
      for (let k = 0; k < flips; k++) b[Math.floor(r() * headerEnd)] = Math.floor(r() * 256);
      fs.writeFileSync(f, b);
      outcomes.add(attempt(f).replace(/\d+/g, 'N'));
    }
    expect(outcomes.size).toBeGreaterThan(5);
  });

  it('u64 fields set to huge values (200 files)', () => {
    const r = rng(3);
    const f = path.join(dir, 'huge.gguf');
    for (let i = 0; i < 200; i++) {
      const b = Buffer.from(good);
      const at = Math.floor(r() * (headerEnd - 8));
      b.writeBigUInt64LE(BigInt(Math.floor(r() * 2 ** 53)) << BigInt(Math.floor(r() * 11)), at);
      fs.writeFileSync(f, b);
      attempt(f);
    }
  });

  it('truncated at random points (200 files), and every cut fails', () => {
    const r = rng(4);
    const f = path.join(dir, 'cut.gguf');
    for (let i = 0; i < 200; i++) {
      fs.writeFileSync(f, good.subarray(0, Math.floor(r() * good.length)));
      expect(attempt(f)).not.toBe('ok');
    }
  });

  it('random bytes after a valid magic (100 files)', () => {
    const r = rng(5);
    const f = path.join(dir, 'noise.gguf');
    for (let i = 0; i < 100; i++) {
      const b = Buffer.alloc(64 + Math.floor(r() * 4000));
      for (let k = 0; k < b.length; k++) b[k] = Math.floor(r() * 256);
      b.write('GGUF', 0, 'latin1');
      b.writeUInt32LE(3, 4);
      fs.writeFileSync(f, b);
      expect(attempt(f)).not.toBe('ok');
    }
  });
});
