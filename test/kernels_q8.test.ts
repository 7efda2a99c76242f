/**
 * The compute pool's Q8_0 weights (kernels/assembly/kernels.ts, matmul_q8_0): every output against
 * a JavaScript emulation of the stated formulas (activation quantization, exact integer block dots,
 * float32 multiply-adds in the stated order), bit for bit; bit-identical for 1, 2 and 4 threads and
 * any T; llama.cpp's block layout read as stored; and the error against the float product of the
 * dequantized weights, which is what quantizing the activations to int16 costs.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { dequantizeQ8_0 } from '../checkpoint/gguf';
import { floatToBfloat16, floatToHalf, quantizeQ8_0 } from '../checkpoint/gguf_write';
import { ComputePool, WeightHandle } from '../kernels/pool';
import { rng } from './fuzz/rng';
import { bits, f16Value, load, poolStarter } from './kernel_helpers';

const f = Math.fround;

/**
 * Random Q8_0 blocks as llama.cpp lays them out: per block an f16 scale (little-endian; finite,
 * subnormals, zero and negative scales included) then 32 int8 (the whole range, -128 included).
 */
function randomBlocks(rows: number, cols: number, seed: number): Uint8Array {
  const next = rng(seed);
  const nb = (rows * cols) / 32;
  const out = new Uint8Array(nb * 34);
  for (let b = 0; b < nb; b++) {
    let h: number;
    const kind = next();
    if (kind < 0.02) h = 0; // a zero scale
    else if (kind < 0.04) h = Math.floor(next() * 1024) | (next() < 0.5 ? 0x8000 : 0); // subnormal
    else h = ((Math.floor(next() * 10) + 5) << 10) | Math.floor(next() * 1024) | (next() < 0.1 ? 0x8000 : 0); // 2^-10 .. 2^-1
    out[b * 34] = h & 0xff;
    out[b * 34 + 1] = h >> 8;
    for (let i = 0; i < 32; i++) out[b * 34 + 2 + i] = Math.floor(next() * 256);
  }
  return out;
}

/** Activations: mostly small, a few large per token (as a transformer's are), zero blocks too. */
function randomInput(T: number, cols: number, seed: number, outliers = 0.01): Float32Array {
  const next = rng(seed);
  const x = new Float32Array(T * cols);
  for (let i = 0; i < x.length; i++) {
    const u = next() * 2 - 1;
    x[i] = next() < outliers ? u * 20 : u;
  }
  if (cols >= 64) x.fill(0, 32, 64); // the second block of token 0 all zeros: dx = 0
  return x;
}

/** Rounds to the nearest integer, ties to even (f32x4.nearest). */
function nearestEven(v: number): number {
  const r = Math.round(v);
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** The activation quantization as kernels.ts states it: dx = amax / 32767, q = nearest(x / dx). */
function quantizeInput(x: Float32Array, off: number, cols: number): { q: Int16Array; dx: Float32Array } {
  const q = new Int16Array(cols);
  const dx = new Float32Array(cols / 32);
  for (let b = 0; b < cols / 32; b++) {
    let amax = 0;
    for (let i = 0; i < 32; i++) amax = Math.max(amax, Math.abs(x[off + b * 32 + i]));
    const d = f(amax / 32767);
    dx[b] = d;
    for (let i = 0; i < 32; i++) {
      const v = d === 0 ? 0 : nearestEven(f(x[off + b * 32 + i] / d));
      expect(Math.abs(v)).toBeLessThanOrEqual(32767);
      q[b * 32 + i] = v;
    }
  }
  return { q, dx };
}

/** y[t, r] by the stated formulas: P an exact integer block dot, acc += (d_w * dx) * P in float32, blocks in order. */
function emulate(blocks: Uint8Array, rows: number, cols: number, x: Float32Array, T: number): Float32Array {
  const nb = cols / 32;
  const q8 = new Int8Array(blocks.buffer, blocks.byteOffset, blocks.length);
  const y = new Float32Array(T * rows);
  for (let t = 0; t < T; t++) {
    const { q, dx } = quantizeInput(x, t * cols, cols);
    for (let r = 0; r < rows; r++) {
      let acc = 0;
      for (let b = 0; b < nb; b++) {
        const at = (r * nb + b) * 34;
        const s = f(f16Value(blocks[at] | (blocks[at + 1] << 8)) * dx[b]);
        let p = 0;
        for (let i = 0; i < 32; i++) p += q8[at + 2 + i] * q[b * 32 + i];
        acc = f(acc + f(s * f(p)));
      }
      y[t * rows + r] = acc;
    }
  }
  return y;
}

function sameBits(got: Float32Array, want: Float32Array, what: string): void {
  const g = bits(got);
  const w = bits(want);
  if (g.length !== w.length || !g.every((v, k) => v === w[k])) {
    const k = g.findIndex((v, i) => v !== w[i]);
    expect(`${got[k]} (0x${g[k]?.toString(16)})`, `${what}: first difference at ${k}`).toBe(`${want[k]} (0x${w[k]?.toString(16)})`);
  }
}

const pool = poolStarter();

/** Writes llama.cpp's blocks in pieces of whole rows, of varying counts (a stream read in pieces). */
function loadQ8(p: ComputePool, name: string, rows: number, cols: number, bytes: Uint8Array): WeightHandle {
  const h = p.addWeight(name, rows, cols, 'q8_0');
  for (let r = 0, k = 0; r < rows; k++) {
    const n = Math.min(rows - r, 1 + ((k * 7) % 5));
    p.writeRows(h, r, bytes.subarray(r * h.rowBytes, (r + n) * h.rowBytes));
    r += n;
  }
  return h;
}

describe('kernels: q8_0', () => {
  it('stores llama.cpp blocks: 34 bytes per 32 columns; cols not a multiple of 32 is a one-line error', async () => {
    const p = await pool(2);
    const h = p.addWeight('q', 5, 96, 'q8_0');
    expect(h.rowBytes).toBe(3 * 34);
    expect(() => p.targets(h)).toThrow(/^compute pool: weight q: q8_0 weights are kept in panels; write\(\) them in whole rows$/);
    expect(() => p.write(h, 34, new Uint8Array(102))).toThrow(/^compute pool: weight q: q8_0 weights are written in whole rows of 102 bytes$/);
    expect(() => p.write(h, 0, new Uint8Array(100))).toThrow(/whole rows of 102 bytes$/);
    expect(() => p.addWeight('bad', 4, 100, 'q8_0')).toThrow(/^compute pool: weight bad: q8_0 needs cols to be a multiple of 32, got 100$/);
    expect(() => p.addWeight('bad2', 4, 16, 'q8_0')).toThrow(/multiple of 32, got 16$/);
    expect(() => p.addWeight('bad3', 4, 32, 'q4_0' as 'q8_0')).toThrow(/^compute pool: weight bad3: dtype must be bf16, f16, f32 or q8_0, got q4_0$/);
  });

  it('equals the stated formulas bit for bit (emulated in JavaScript), odd row counts, T up to 9', async () => {
    const p = await pool(2);
    for (const [rows, cols, T] of [
      [1, 32, 1],
      [7, 64, 3],
      [37, 96, 2],
      [4, 4096, 1],
      [13, 4096, 9],
      [6, 14336, 2],
    ]) {
      const blocks = randomBlocks(rows, cols, rows * 131 + cols);
      const x = randomInput(T, cols, rows + T);
      const h = loadQ8(p, `stated-${rows}x${cols}x${T}`, rows, cols, blocks);
      sameBits(p.matmul(h, x, T), emulate(blocks, rows, cols, x, T), `[${rows}, ${cols}] T=${T}`);
    }
  });

  it('decodes every f16 scale exactly (subnormals, zeros, infinities, NaN), in groups of 4 rows and alone', async () => {
    const p = await pool(2);
    // One block per row, scale = pattern h, every q = 1; the last 3 rows (computed one at a time) repeat 3 patterns.
    const patterns = [...Array.from({ length: 65536 }, (_, h) => h), 0x0001, 0xfc00, 0x83ff];
    const rows = patterns.length;
    const blocks = new Uint8Array(rows * 34).fill(1);
    patterns.forEach((h, r) => {
      blocks[r * 34] = h & 0xff;
      blocks[r * 34 + 1] = h >> 8;
    });
    const x = new Float32Array(32).fill(0.5);
    const y = p.matmul(loadQ8(p, 'scales', rows, 32, blocks), x, 1);
    const want = emulate(blocks, rows, 32, x, 1);
    for (let r = 0; r < rows; r++) {
      if (Number.isNaN(want[r])) expect(Number.isNaN(y[r]), `pattern 0x${patterns[r].toString(16)}`).toBe(true);
      else if (y[r] !== want[r]) expect(y[r], `pattern 0x${patterns[r].toString(16)}`).toBe(want[r]);
    }
    // Written out: scale 1 (0x3c00), x = 0.5 -> dx = 0.5 / 32767, q = 32767, P = 32 * 32767; y close to 16.
    expect(y[0x3c00]).toBeCloseTo(16, 5);
    expect(y[0x7c00]).toBe(Infinity);
    expect(y[65537]).toBe(-Infinity);
    expect(y[0x0000]).toBe(0);
  });

  it('extremes: int8 -128 and 127 against int16 +-32767 in every lane, the largest f16 scale, a zero input', async () => {
    const p = await pool(1);
    const cols = 64;
    const blocks = new Uint8Array(4 * 2 * 34);
    const view = new Int8Array(blocks.buffer);
    for (let r = 0; r < 4; r++) {
      for (let b = 0; b < 2; b++) {
        const at = (r * 2 + b) * 34;
        const h = r === 3 ? 0x7bff : 0x3c00; // 65504 or 1
        blocks[at] = h & 0xff;
        blocks[at + 1] = h >> 8;
        for (let i = 0; i < 32; i++) view[at + 2 + i] = r === 0 ? -128 : r === 1 ? 127 : ((i * 37) % 256) - 128;
      }
    }
    const h = loadQ8(p, 'extremes', 4, cols, blocks);
    const x = new Float32Array(3 * cols);
    for (let i = 0; i < cols; i++) x[i] = i % 2 ? 1 : -1; // token 0: +-1, every q = +-32767
    x.fill(1e-3, cols, cols + 32); // token 1: block 0 constant, block 1 zero
    // token 2 all zeros
    const y = p.matmul(h, x, 3);
    sameBits(y, emulate(blocks, 4, cols, x, 3), 'extremes');
    // Row 0 (all -128) with alternating +-1: P = 0 exactly; row 1 likewise; all-zero input gives 0.
    expect([y[0], y[1]]).toEqual([0, 0]);
    expect(Array.from(y.subarray(8, 12))).toEqual([0, 0, 0, 0]);
    // Row 1 (all 127), token 1: 32 * 127 * 32767 * (1e-3 / 32767) in float32 steps, close to 4.064.
    expect(y[4 + 1]).toBeCloseTo(32 * 127 * 1e-3, 5);
  });

  it('gives the same bits with 1, 2 and 4 threads, for T = 1 to 70, odd row counts; each token alone equals its row', async () => {
    const ps = [await pool(1), await pool(2), await pool(4)];
    for (const [rows, cols] of [
      [37, 160],
      [3, 4096],
      [9, 32],
      [66, 1024],
    ]) {
      const blocks = randomBlocks(rows, cols, rows + cols);
      const x = randomInput(70, cols, cols);
      const hs = ps.map((p) => loadQ8(p, `rep-${rows}x${cols}`, rows, cols, blocks));
      const full = ps[0].matmul(hs[0], x, 70);
      // Independent check of the first and last tokens, so a kernel consistently wrong cannot pass.
      const want0 = emulate(blocks, rows, cols, x.subarray(0, cols), 1);
      const want69 = emulate(blocks, rows, cols, x.subarray(69 * cols), 1);
      sameBits(full.slice(0, rows), want0, `[${rows}, ${cols}] token 0 of 70`);
      sameBits(full.slice(69 * rows), want69, `[${rows}, ${cols}] token 69 of 70`);
      for (let t = 0; t < 70; t++) {
        sameBits(ps[1].matmul(hs[1], x.subarray(t * cols, (t + 1) * cols), 1), full.slice(t * rows, (t + 1) * rows), `[${rows}, ${cols}] token ${t} alone`);
      }
      for (let T = 1; T <= 70; T++) {
        for (let i = 0; i < ps.length; i++) {
          sameBits(ps[i].matmul(hs[i], x.subarray(0, T * cols), T), full.subarray(0, T * rows), `[${rows}, ${cols}] T=${T} threads=${ps[i].threads}`);
        }
      }
    }
  });

  it('in a fused call with bf16 weights and over several memories per thread, the same bits as alone', async () => {
    const one = await pool(2);
    const many = await pool(2, 256 * 1024);
    const cols = 1024;
    const blocks = [40, 24, 96].map((rows, i) => ({ rows, b: randomBlocks(rows, cols, 50 + i) }));
    const a = blocks.map((w, i) => loadQ8(one, `m${i}`, w.rows, cols, w.b));
    const b: WeightHandle[] = [];
    blocks.forEach((w, i) => {
      b.push(loadQ8(many, `m${i}`, w.rows, cols, w.b));
      loadQ8(many, `pad${i}`, 160, cols, randomBlocks(160, cols, i)); // a new memory every ~1.5 weights
    });
    const bf = many.addWeight('bf', 8, cols, 'bf16');
    many.write(bf, 0, new Uint8Array(8 * cols * 2).fill(0x3f)); // bf16 0x3f3f, about 0.75
    expect(many.memoryCounts()[0]).toBeGreaterThan(1);
    const x = randomInput(5, cols, 4);
    const fused = many.matmulMany([b[0], bf, b[1], b[2]], x, 5);
    const fusedQ = [fused[0], fused[2], fused[3]];
    for (let i = 0; i < 3; i++) {
      const single = one.matmul(a[i], x, 5);
      sameBits(single, emulate(blocks[i].b, blocks[i].rows, cols, x, 5), `m${i}`);
      sameBits(fusedQ[i], single, `m${i} fused`);
    }
    expect(fused[1][0]).toBeCloseTo(x.subarray(0, cols).reduce((s, v) => s + v, 0) * f16bf(0x3f3f), 3);
  });

  it('reads Q8_0 blocks as stored in a file (quantized by llama.cpp\'s reference rule) straight into the shards', async () => {
    const p = await pool(3);
    const [rows, cols] = [21, 256];
    const w = new Float32Array(rows * cols).map((_, i) => Math.sin(i * 0.37) * 0.1);
    const blocks = quantizeQ8_0(w);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kernels-q8-'));
    const file = path.join(dir, 'w.bin');
    try {
      fs.writeFileSync(file, Buffer.concat([Buffer.alloc(1000, 7), blocks, Buffer.alloc(5, 9)]));
      const fd = fs.openSync(file, 'r');
      try {
        const h = p.addWeight('from-file', rows, cols, 'q8_0');
        p.readFromFile(h, fd, 1000, file);
        const x = randomInput(3, cols, 8);
        sameBits(p.matmul(h, x, 3), emulate(blocks, rows, cols, x, 3), 'read from file');
        const short = p.addWeight('short', rows, cols, 'q8_0');
        expect(() => p.readFromFile(short, fd, 1006, file)).toThrow(/^compute pool: weight short: .* ends at byte \d+, before its 5712 bytes from 1006$/);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('quantizes bf16, f16 and f32 weights as llama.cpp does (quantizeQ8_0, checked against numpy elsewhere): the same products bit for bit', async () => {
    for (const threads of [1, 3]) {
      const p = await pool(threads);
      for (const [rows, cols, seed] of [[5, 64, 1], [23, 96, 2], [64, 4096, 3]]) {
        const next = rng(seed);
        // Normal-ish weights, with a zero block, a block of ties (x * id = k + 1/2 exactly: amax 127
        // gives d = 1) and a block of tiny values (d an f16 subnormal) in row 0.
        const w = new Float32Array(rows * cols).map(() => (next() + next() - 1) * 0.08);
        w.fill(0, 0, 32);
        for (let i = 0; i < 32; i++) w[32 + i] = i === 0 ? 127 : ((i % 7) - 3) + 0.5;
        if (cols >= 96) for (let i = 0; i < 32; i++) w[64 + i] = (i - 16) * 2 ** -30;
        const x = randomInput(2, cols, seed + 5);
        for (const source of ['bf16', 'f16', 'f32'] as const) {
          // The weights as stored in that dtype, and the float32 values they stand for.
          const stored = source === 'f32' ? new Uint8Array(w.buffer.slice(0)) : new Uint8Array(new Uint16Array(w.length).map((_, i) => (source === 'bf16' ? floatToBfloat16(w[i]) : floatToHalf(w[i]))).buffer);
          const values = source === 'f32' ? w : new Float32Array(w.length).map((_, i) => (source === 'bf16' ? f16bf(floatToBfloat16(w[i])) : f16Value(floatToHalf(w[i]))));
          const h = p.addWeight(`quantized-${source}-${rows}x${cols}`, rows, cols, 'q8_0');
          const size = source === 'f32' ? 4 : 2;
          const pieces: number[] = [];
          p.quantizeFrom(h, source, (rowStart, target) => {
            pieces.push(target.length / (cols * size));
            target.set(stored.subarray(rowStart * cols * size, rowStart * cols * size + target.length));
          });
          expect(pieces.reduce((a, b) => a + b, 0)).toBe(rows);
          sameBits(p.matmul(h, x, 2), emulate(quantizeQ8_0(values), rows, cols, x, 2), `${source} [${rows}, ${cols}] on ${threads} threads`);
        }
      }
    }
  });

  it('rounds each block scale to f16 as llama.cpp does: ties, subnormals, the largest f16, overflow to infinity', async () => {
    const p = await pool(2);
    // One block per row; row i's largest value A_i sets d = A_i / 127. Targets for d: random
    // magnitudes from 2^-45 to 2^20, and dense sweeps around f16's edges (2^-24, its subnormals,
    // 2^-14, mantissa ties, 65504 and 65520, where rounding overflows to infinity).
    const next = rng(11);
    const targets: number[] = [];
    for (let i = 0; i < 1200; i++) targets.push(2 ** (next() * 65 - 45) * (1 + next()));
    for (const edge of [2 ** -25, 2 ** -24, 1.5 * 2 ** -24, 2 ** -15, 2 ** -14, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504, 65519, 65520, 65536]) {
      for (let k = -30; k <= 30; k++) targets.push(edge * (1 + k * 2 ** -14));
    }
    const rows = targets.length;
    const cols = 32;
    const values = new Float32Array(rows * cols);
    targets.forEach((t, r) => {
      for (let j = 0; j < cols; j++) values[r * cols + j] = (next() * 2 - 1) * t * 100;
      values[r * cols + (r % cols)] = (r & 1 ? -1 : 1) * Math.fround(t * 127);
    });
    const h = p.addWeight('scales-f16', rows, cols, 'q8_0');
    p.quantizeFrom(h, 'f32', (rowStart, target) => target.set(new Uint8Array(values.buffer, rowStart * cols * 4, target.length)));
    const x = randomInput(1, cols, 12);
    sameBits(p.matmul(h, x, 1), emulate(quantizeQ8_0(values), rows, cols, x, 1), 'f16 scales of every range');
  });

  it('quantizes on every thread in rounds of a few MB (rows read in any order); a failed read throws as it is, the pool still works', async () => {
    const p = await pool(2);
    // 136 rows of 32768 bf16: 64 rows (4 MiB) a piece, so each thread's 68 rows take two rounds.
    const [rows, cols] = [136, 32768];
    const w = new Float32Array(rows * cols).map((_, i) => Math.sin(i * 0.013) * 0.05);
    const stored = new Uint16Array(w.length).map((_, i) => floatToBfloat16(w[i]));
    const values = new Float32Array(w.length).map((_, i) => f16bf(stored[i]));
    const bytes = new Uint8Array(stored.buffer);
    const h = p.addWeight('rounds', rows, cols, 'q8_0');
    const starts: number[] = [];
    p.quantizeFrom(h, 'bf16', (rowStart, target) => {
      starts.push(rowStart);
      target.set(bytes.subarray(rowStart * cols * 2, rowStart * cols * 2 + target.length));
    });
    expect(starts).toEqual([68, 0, 132, 64]); // per round: the worker's piece, then the main thread's
    const x = randomInput(1, cols, 9);
    const want = emulate(quantizeQ8_0(values), rows, cols, x, 1);
    sameBits(p.matmul(h, x, 1), want, 'quantized in rounds on 2 threads');
    for (const failAt of [0, 68]) { // the main thread's own piece, then a worker's
      const g = p.addWeight(`fails at ${failAt}`, rows, cols, 'q8_0');
      const broken = new Error(`disk gone at row ${failAt}`);
      expect(() => p.quantizeFrom(g, 'bf16', (rowStart, target) => {
        if (rowStart === failAt) throw broken;
        target.set(bytes.subarray(rowStart * cols * 2, rowStart * cols * 2 + target.length));
      })).toThrow(broken);
    }
    sameBits(p.matmul(h, x, 1), want, 'after the failed reads');
  });

  it('places scales right at addresses past 2 GiB (no signed 32-bit arithmetic on them)', async () => {
    const p = await pool(1);
    p.addWeight('filler', 1100, 1 << 20, 'bf16'); // 2.2 GB of a memory, never touched: not resident
    const [rows, cols] = [9, 64];
    const blocks = randomBlocks(rows, cols, 77);
    const x = randomInput(1, cols, 78);
    const read = loadQ8(p, 'high', rows, cols, blocks);
    sameBits(p.matmul(read, x, 1), emulate(blocks, rows, cols, x, 1), 'written past 2 GiB');
    const values = new Float32Array(rows * cols).map((_, i) => Math.sin(i) * 0.1);
    const quantized = p.addWeight('high-quantized', rows, cols, 'q8_0');
    p.quantizeFrom(quantized, 'f32', (rowStart, target) => target.set(new Uint8Array(values.buffer, rowStart * cols * 4, target.length)));
    sameBits(p.matmul(quantized, x, 1), emulate(quantizeQ8_0(values), rows, cols, x, 1), 'quantized past 2 GiB');
  });

  it('differs from the float product of the dequantized weights by a few 1e-5 of the largest output (the int16 activations)', async () => {
    const p = await pool(2);
    const report: string[] = [];
    let worst = 0;
    for (const [rows, cols, T, seed, outliers] of [
      [64, 4096, 2, 1, 0.01],
      [32, 14336, 1, 2, 0.01],
      [128, 1024, 3, 3, 0.01],
      [64, 4096, 2, 4, 0], // uniform input, no outliers
    ]) {
      // Realistic weights: float values quantized by llama.cpp's rule, then dequantized as ggml does.
      const next = rng(seed);
      const wf = new Float32Array(rows * cols).map(() => (next() + next() + next() - 1.5) * 0.05);
      const blocks = quantizeQ8_0(wf);
      const deq = dequantizeQ8_0(blocks);
      const x = randomInput(T, cols, seed + 10, outliers);
      const y = p.matmul(loadQ8(p, `err-${seed}`, rows, cols, blocks), x, T);
      let maxErr = 0;
      let maxAbs = 0;
      for (let t = 0; t < T; t++) {
        for (let r = 0; r < rows; r++) {
          let s = 0;
          for (let c = 0; c < cols; c++) s += deq[r * cols + c] * x[t * cols + c];
          maxErr = Math.max(maxErr, Math.abs(y[t * rows + r] - s));
          maxAbs = Math.max(maxAbs, Math.abs(s));
        }
      }
      const rel = maxErr / maxAbs;
      worst = Math.max(worst, rel);
      report.push(`[${rows}, ${cols}] T=${T}${outliers ? '' : ' (no outliers)'}: ${rel.toExponential(2)}`);
    }
    console.log(`q8_0 vs float64 product of the dequantized weights, max |error| / max |y|: ${report.join('; ')}`);
    expect(worst).toBeLessThan(1e-4);
    expect(worst).toBeGreaterThan(1e-7); // the activations really are quantized, not multiplied in float
  });
});

/** bfloat16 bits to a number. */
function f16bf(h: number): number {
  const v = new DataView(new ArrayBuffer(4));
  v.setUint32(0, h << 16);
  return v.getFloat32(0);
}
