/**
 * The compute pool's kernels (kernels/): results against float64 dot products of independently
 * decoded weights, every f16 and bf16 value, bit-identical results for 1, 2 and 4 threads and any
 * T, odd shapes, weights spread over several memories, and the committed .wasm rebuilt.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { ComputePool, WeightDtype } from '../kernels/pool';
import { rng } from './fuzz/rng';
import { bits, f16Value, load, poolStarter } from './kernel_helpers';

const ROOT = path.join(__dirname, '..');

/** bfloat16: the upper half of a float32's bits. */
function bf16Value(h: number): number {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, h << 16);
  return view.getFloat32(0);
}

/** A random weight as stored (bytes) and as values; finite, spanning the type's range for f16. */
function randomWeight(dtype: WeightDtype, rows: number, cols: number, seed: number): { bytes: Uint8Array; values: Float64Array } {
  const next = rng(seed);
  const values = new Float64Array(rows * cols);
  if (dtype === 'f32') {
    const w = new Float32Array(rows * cols).map(() => next() * 2 - 1);
    values.set(w);
    return { bytes: new Uint8Array(w.buffer), values };
  }
  const w = new Uint16Array(rows * cols);
  const f32 = new Float32Array(1);
  const u32 = new Uint32Array(f32.buffer);
  for (let i = 0; i < w.length; i++) {
    if (dtype === 'bf16') {
      f32[0] = (next() * 2 - 1) * Math.pow(2, Math.floor(next() * 8) - 4);
      w[i] = u32[0] >>> 16;
      values[i] = bf16Value(w[i]);
    } else {
      let h: number;
      do h = Math.floor(next() * 65536);
      while (((h >> 10) & 0x1f) === 0x1f); // finite values only, subnormals included
      w[i] = h;
      values[i] = f16Value(h);
    }
  }
  return { bytes: new Uint8Array(w.buffer), values };
}

function randomInput(n: number, seed: number): Float32Array {
  const next = rng(seed);
  return new Float32Array(n).map(() => next() * 2 - 1);
}

const pool = poolStarter();

describe('kernels: values', () => {
  // Every 16-bit pattern, one per row, alone in its row (the other entries 0) and x all ones, so
  // y is the decoded value itself; at columns 0..7 (the SIMD path) and 8 (the scalar tail).
  for (const dtype of ['f16', 'bf16'] as const) {
    it(`decodes all 65,536 ${dtype} values exactly, subnormals, infinities and NaN included`, async () => {
      const p = await pool(2);
      const decode = dtype === 'f16' ? f16Value : bf16Value;
      for (const cols of [8, 9]) {
        const w = new Uint16Array(65536 * cols);
        for (let h = 0; h < 65536; h++) w[h * cols + (cols === 8 ? h % 8 : 8)] = h;
        const handle = load(p, `all-${dtype}-${cols}`, dtype, 65536, cols, new Uint8Array(w.buffer));
        const y = p.matmul(handle, new Float32Array(cols).fill(1), 1);
        let checked = 0;
        for (let h = 0; h < 65536; h++) {
          const want = decode(h);
          if (Number.isNaN(want)) expect(Number.isNaN(y[h]), `pattern ${h}`).toBe(true);
          else if (y[h] !== want) expect(y[h], `pattern 0x${h.toString(16)} at cols ${cols}`).toBe(want);
          checked++;
        }
        expect(checked).toBe(65536);
        // f16's smallest subnormal and largest finite, written out.
        if (dtype === 'f16') {
          expect(y[0x0001]).toBe(5.960464477539063e-8);
          expect(y[0x7bff]).toBe(65504);
          expect(y[0xfc00]).toBe(-Infinity);
        }
      }
    });
  }

  for (const dtype of ['bf16', 'f16', 'f32'] as const) {
    it(`${dtype}: within 1e-6 of a float64 dot product, relative to the largest output`, async () => {
      const p = await pool(2);
      for (const [rows, cols, T] of [
        [67, 1031, 1],
        [130, 4096, 3],
        [5, 7, 4],
      ]) {
        const { bytes, values } = randomWeight(dtype, rows, cols, rows * cols);
        const h = load(p, `acc-${dtype}-${rows}x${cols}`, dtype, rows, cols, bytes);
        const x = randomInput(T * cols, 7 + T);
        const y = p.matmul(h, x, T);
        let maxErr = 0;
        let maxAbs = 0;
        for (let t = 0; t < T; t++) {
          for (let r = 0; r < rows; r++) {
            let s = 0;
            for (let c = 0; c < cols; c++) s += values[r * cols + c] * x[t * cols + c];
            maxErr = Math.max(maxErr, Math.abs(y[t * rows + r] - s));
            maxAbs = Math.max(maxAbs, Math.abs(s));
          }
        }
        expect(maxAbs).toBeGreaterThan(0);
        expect(maxErr / maxAbs, `${dtype} [${rows}, ${cols}] T=${T}`).toBeLessThan(1e-6);
      }
    });
  }
});

describe('kernels: reproducible', () => {
  it('gives the same bits with 1, 2 and 4 threads, for T = 1 to 70, on odd shapes', async () => {
    const pools1 = [await pool(1), await pool(2), await pool(4)];
    const shapes: [number, number][] = [
      [37, 203], // rows not a multiple of 4 or of the threads; cols not a multiple of 8
      [3, 1031], // fewer rows than 4 per thread
      [5, 4099], // x of 70 tokens spans 3 token blocks of the matmul kernel
      [1, 9],
      [66, 8],
      [9, 1],
    ];
    for (const dtype of ['bf16', 'f16', 'f32'] as const) {
      for (const [rows, cols] of shapes) {
        const { bytes, values } = randomWeight(dtype, rows, cols, rows + cols);
        const x = randomInput(70 * cols, cols);
        const hs = pools1.map((p) => load(p, `rep-${dtype}-${rows}x${cols}`, dtype, rows, cols, bytes));
        const full = pools1[0].matmul(hs[0], x, 70);
        // Independent check of one entry, so a kernel that is consistently wrong cannot pass.
        let s = 0;
        let magnitude = 0; // sum of |w x|: what float32 rounding errors scale with
        for (let c = 0; c < cols; c++) {
          s += values[(rows - 1) * cols + c] * x[69 * cols + c];
          magnitude += Math.abs(values[(rows - 1) * cols + c] * x[69 * cols + c]);
        }
        expect(Math.abs(full[69 * rows + rows - 1] - s)).toBeLessThanOrEqual(1e-6 * magnitude);
        // Each token alone (the matvec kernel) equals its row of the 70-token product (2x2 tiles).
        for (let t = 0; t < 70; t++) {
          const alone = bits(pools1[1].matmul(hs[1], x.subarray(t * cols, (t + 1) * cols), 1));
          const row = bits(full.slice(t * rows, (t + 1) * rows));
          if (!alone.every((v, k) => v === row[k])) {
            expect(Array.from(alone), `${dtype} [${rows}, ${cols}] token ${t} alone`).toEqual(Array.from(row));
          }
        }
        for (let T = 1; T <= 70; T++) {
          const want = bits(full.slice(0, T * rows));
          for (let i = 0; i < pools1.length; i++) {
            const got = bits(pools1[i].matmul(hs[i], x.subarray(0, T * cols), T));
            if (!got.every((v, k) => v === want[k])) {
              expect(Array.from(got), `${dtype} [${rows}, ${cols}] T=${T} threads=${pools1[i].threads}`).toEqual(Array.from(want));
            }
          }
        }
      }
    }
  });

  it('follows the summation order its source states, bit for bit (a float32 emulation in JavaScript)', async () => {
    const f = Math.fround;
    /** The order stated at the top of kernels/assembly/kernels.ts. */
    function stated(w: Float64Array, wOff: number, x: Float32Array, xOff: number, cols: number): number {
      const n8 = cols & ~7;
      const a = [0, 0, 0, 0];
      const b = [0, 0, 0, 0];
      for (let c = 0; c < n8; c += 8) {
        for (let j = 0; j < 4; j++) {
          a[j] = f(a[j] + f(w[wOff + c + 2 * j] * x[xOff + c + 2 * j]));
          b[j] = f(b[j] + f(w[wOff + c + 2 * j + 1] * x[xOff + c + 2 * j + 1]));
        }
      }
      const sum = a.map((v, j) => f(v + b[j]));
      const head = f(f(sum[0] + sum[1]) + f(sum[2] + sum[3]));
      let tail = 0;
      for (let c = n8; c < cols; c++) tail = f(tail + f(w[wOff + c] * x[xOff + c]));
      return f(head + tail);
    }
    const p = await pool(2);
    for (const dtype of ['bf16', 'f16', 'f32'] as const) {
      for (const [rows, cols, T] of [[7, 45, 3], [4, 16, 1], [3, 4099, 5]]) {
        const { bytes, values } = randomWeight(dtype, rows, cols, 11 * rows + cols);
        const h = load(p, `order-${dtype}-${rows}x${cols}`, dtype, rows, cols, bytes);
        const x = randomInput(T * cols, 5);
        const y = p.matmul(h, x, T);
        for (let t = 0; t < T; t++) {
          for (let r = 0; r < rows; r++) {
            const want = stated(values, r * cols, x, t * cols, cols);
            if (y[t * rows + r] !== want) expect(y[t * rows + r], `${dtype} [${rows}, ${cols}] T=${T} y[${t}, ${r}]`).toBe(want);
          }
        }
        // A float32 weight holding the same values gives the same bits as the 16-bit one.
        const hf = load(p, `order-f32-of-${dtype}-${rows}x${cols}`, 'f32', rows, cols, new Uint8Array(Float32Array.from(values).buffer));
        expect(Array.from(bits(p.matmul(hf, x, T)))).toEqual(Array.from(bits(y)));
      }
    }
  });

  it('a long input goes in chunks of tokens that fit a memory, each token where it belongs', async () => {
    const p = await pool(2);
    const [rows, cols, T] = [16, 4096, 2100]; // 64 MiB per memory / (2 x 4096 + 8 rows) x 4 bytes: chunks of 2046 tokens
    const h = load(p, 'long', 'bf16', rows, cols, randomWeight('bf16', rows, cols, 3).bytes);
    const x = randomInput(T * cols, 2);
    const y = p.matmul(h, x, T);
    for (const t of [0, 1, 2045, 2046, 2047, T - 1]) {
      const alone = p.matmul(h, x.subarray(t * cols, (t + 1) * cols), 1);
      expect(Array.from(bits(y.slice(t * rows, (t + 1) * rows))), `token ${t}`).toEqual(Array.from(bits(alone)));
    }
  });

  it('fused products equal single ones; weights spread over several memories per thread give the same bits', async () => {
    const one = await pool(2);
    const many = await pool(2, 256 * 1024); // a new memory every ~4 weights below
    expect(many.threads).toBe(2);
    const cols = 1000;
    const ws = [40, 24, 24, 96].map((rows, i) => ({ rows, ...randomWeight('bf16', rows, cols, 100 + i) }));
    const a = ws.map((w, i) => load(one, `m${i}`, 'bf16', w.rows, cols, w.bytes));
    const b = ws.map((w, i) => load(many, `m${i}`, 'bf16', w.rows, cols, w.bytes));
    for (let k = 0; k < 6; k++) b.push(load(many, `pad${k}`, 'bf16', 64, cols, randomWeight('bf16', 64, cols, k).bytes));
    expect(many.memoryBytes()[0]).toBeGreaterThan(one.memoryBytes()[0]);
    const x = randomInput(5 * cols, 3);
    const fused = many.matmulMany(b.slice(0, 3), x, 5);
    for (let i = 0; i < 4; i++) {
      const single = one.matmul(a[i], x, 5);
      expect(Array.from(bits(many.matmul(b[i], x, 5)))).toEqual(Array.from(bits(single)));
      if (i < 3) expect(Array.from(bits(fused[i]))).toEqual(Array.from(bits(single)));
    }
    // targets() views: reading straight into them is the same as write().
    const h = many.addWeight('direct', 10, cols, 'bf16');
    for (const t of many.targets(h)) t.bytes.set(ws[0].bytes.subarray(t.byteStart, t.byteEnd));
    expect(Array.from(bits(many.matmul(h, x, 5)))).toEqual(Array.from(bits(one.matmul(a[0], x, 5).filter((_, k) => k % 40 < 10))));
  });

  it("places Mistral 7B's 14.2 GB of bf16 layer and output weights in memories of at most 4 GiB (reserved, not touched)", async () => {
    const layer: [string, number, number][] = [
      ['wq', 4096, 4096], ['wk', 1024, 4096], ['wv', 1024, 4096], ['wo', 4096, 4096],
      ['w1', 14336, 4096], ['w2', 4096, 14336], ['w3', 14336, 4096],
    ];
    const expected: Record<number, number[]> = { 4: [1, 1, 1, 1], 2: [2, 2], 1: [4] };
    for (const threads of [4, 2, 1]) {
      const p = await ComputePool.start({ threads });
      try {
        let bytes = 0;
        for (let l = 0; l < 32; l++) {
          for (const [n, rows, cols] of layer) bytes += p.addWeight(`layers.${l}.${n}`, rows, cols, 'bf16').rowBytes * rows;
        }
        bytes += p.addWeight('output', 32000, 4096, 'bf16').rowBytes * 32000;
        // The README's 7,241,732,096 parameters less the embeddings (32000 x 4096) and the norms (65 x 4096), in bf16.
        expect(bytes).toBe((7_241_732_096 - 32000 * 4096 - 65 * 4096) * 2);
        expect(p.memoryCounts()).toEqual(expected[threads]);
        const total = p.memoryBytes().reduce((a, b) => a + b, 0);
        expect(total).toBeGreaterThanOrEqual(bytes);
        expect(total).toBeLessThan(bytes * 1.001);
        for (const b of p.memoryBytes()) expect(b).toBeLessThanOrEqual(expected[threads][0] * 4 * 1024 ** 3);
      } finally {
        await p.close();
      }
    }
  });

  it('reads a weight from a file offset straight into its shards; a short file is a one-line error', async () => {
    const p = await pool(3);
    const { bytes } = randomWeight('bf16', 21, 40, 9);
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'kernels-')), 'w.bin');
    try {
      fs.writeFileSync(file, Buffer.concat([Buffer.alloc(1234, 7), bytes, Buffer.alloc(10, 9)]));
      const fd = fs.openSync(file, 'r');
      try {
        const viaWrite = load(p, 'via-write', 'bf16', 21, 40, bytes);
        const viaFile = p.addWeight('via-file', 21, 40, 'bf16');
        p.readFromFile(viaFile, fd, 1234, file);
        const x = randomInput(2 * 40, 1);
        expect(Array.from(bits(p.matmul(viaFile, x, 2)))).toEqual(Array.from(bits(p.matmul(viaWrite, x, 2))));
        const short = p.addWeight('short', 21, 40, 'bf16');
        expect(() => p.readFromFile(short, fd, 1300, file)).toThrow(
          new RegExp(`^compute pool: weight short: ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} ends at byte 2924, before its 1680 bytes from 1300$`),
        );
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
    }
  });

  it('rejects bad calls with one-line errors', async () => {
    const p = await pool(2);
    const h = p.addWeight('w', 4, 8, 'f32');
    expect(() => p.matmul(h, new Float32Array(7), 1)).toThrow(/^compute pool: w: input of 7 floats is not T=1 tokens of 8$/);
    expect(() => p.write(h, 120, new Uint8Array(16))).toThrow(/^compute pool: weight w: bytes \[120, 136\) outside its 128 bytes$/);
    expect(() => p.addWeight('v', 0, 8, 'f32')).toThrow(/rows and cols must be positive integers/);
  });

  it('scan() reads more weights than one call has room for (16 jobs a thread) in rounds, and counts every byte', async () => {
    const p = await pool(2);
    // 40 weights of 8 rows x 64 bf16 (1,024 bytes, 512 a shard): 40 jobs a thread, beyond the 16 of the control block.
    const hs = Array.from({ length: 40 }, (_, i) => p.addWeight(`s${i}`, 8, 64, 'bf16'));
    expect(p.scan(hs)).toBe(40 * 8 * 64 * 2);
    const y = p.matmul(hs[0], new Float32Array(64), 1); // the pool still works
    expect(Array.from(y)).toEqual(new Array(8).fill(0));
  });
});

describe('kernels: build', () => {
  it('the committed kernels.wasm is what the pinned compiler builds from the source', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kernels-'));
    try {
      const out = path.join(dir, 'kernels.wasm');
      execFileSync(process.execPath, [path.join(ROOT, 'node_modules', 'assemblyscript', 'bin', 'asc.js'),
        'kernels/assembly/kernels.ts', '--config', 'kernels/asconfig.json', '-o', out], { cwd: ROOT, stdio: 'pipe' });
      expect(fs.readFileSync(out).equals(fs.readFileSync(path.join(ROOT, 'kernels', 'kernels.wasm')))).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
