/**
 * The measurements behind README's "Speed" choices, each alone (not part of `npm run bench`):
 *
 *   npx ts-node --transpile-only bench/micro.ts [matmul|fuse|readback|widen|lowmem ...]
 *
 * - matmul: tfjs-wasm matMul with transposeB (the naive loop) against no transposed operand
 *   (XNNPACK, weight packed once), and (W x^T)^T, for the small model's and Mistral 7B's shapes;
 * - fuse: w1 and w3 as two products or one of [D, 2F] split in two;
 * - readback: a [B, V] distribution read back as JavaScript numbers, against argmax on the backend;
 * - widen: bf16 -> float32 on the host: the JavaScript loop, a loop over pairs, native calls, and
 *   a fresh array per use;
 * - lowmem: one 7B w1 in low-memory mode (widen in bulk, copy into wasm, product), scaled to a token.
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../runtime/backend';
import { widen16 } from '../checkpoint/dtypes';

/** The best of `reps` timings of `f`, in milliseconds, after one warm-up call. */
function bestMs(f: () => void, reps = 5, inner = 1): number {
  f();
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = performance.now();
    for (let i = 0; i < inner; i++) f();
    best = Math.min(best, (performance.now() - t0) / inner);
  }
  return best;
}

function matmul(): void {
  for (const [out, inp] of [[1792, 512], [32000, 512], [14336, 4096]]) {
    const w = tf.randomNormal([out, inp]) as tf.Tensor2D; // as torch stores it
    const wt = tf.transpose(w) as tf.Tensor2D; // [in, out]
    for (const rows of [1, 4, 128]) {
      const x = tf.randomNormal([rows, inp]) as tf.Tensor2D;
      const run = (f: () => tf.Tensor): number => bestMs(() => tf.tidy(f).dispose(), rows === 128 ? 2 : 5, rows === 128 ? 1 : 5);
      const transB = run(() => tf.matMul(x, w, false, true));
      const plain = run(() => tf.matMul(x, wt));
      const left = run(() => tf.transpose(tf.matMul(w, tf.transpose(x))));
      console.log(`[${rows}, ${inp}] x [${out}, ${inp}]^T: transposeB ${transB.toFixed(2)} ms, x @ W^T held transposed ${plain.toFixed(2)} ms, (W x^T)^T ${left.toFixed(2)} ms`);
      x.dispose();
    }
    tf.dispose([w, wt]);
  }
}

function fuse(): void {
  const [d, f] = [512, 1792];
  const w1 = tf.randomNormal([d, f]);
  const w3 = tf.randomNormal([d, f]);
  const w13 = tf.concat([w1, w3], 1);
  for (const rows of [1, 4, 128]) {
    const x = tf.randomNormal([rows, d]);
    const swiglu = (g: tf.Tensor, u: tf.Tensor): tf.Tensor => tf.mul(tf.mul(g, tf.sigmoid(g)), u);
    const inner = rows === 128 ? 5 : 100;
    const separate = bestMs(() => tf.tidy(() => swiglu(tf.matMul(x, w1), tf.matMul(x, w3))).dispose(), 5, inner);
    const fused = bestMs(() => tf.tidy(() => { const [g, u] = tf.split(tf.matMul(x, w13), 2, 1); return swiglu(g, u); }).dispose(), 5, inner);
    console.log(`w1, w3 at batch ${rows}: separate ${(separate * 1000).toFixed(0)} us, fused ${(fused * 1000).toFixed(0)} us`);
    x.dispose();
  }
  tf.dispose([w1, w3, w13]);
}

function readback(): void {
  for (const b of [1, 4]) {
    const logits = tf.randomNormal([b, 32000]);
    const whole = bestMs(() => {
      const rows = tf.tidy(() => tf.logSoftmax(logits, -1)).arraySync() as number[][];
      rows.map((r) => r.indexOf(Math.max(...r)));
    }, 5, 20);
    const ids = bestMs(() => tf.tidy(() => tf.argMax(logits, -1)).dataSync(), 5, 100);
    console.log(`batch ${b}: log_softmax read back as numbers ${whole.toFixed(2)} ms; argmax on the backend, ids read back ${ids.toFixed(3)} ms`);
    logits.dispose();
  }
}

function widen(): void {
  const n = 14336 * 4096; // Mistral 7B's w1
  const src = new Uint16Array(n);
  for (let i = 0; i < n; i++) src[i] = (i * 2654435761) >>> 16;
  const dst = new Float32Array(n);
  const loop = bestMs(() => {
    const d = new Uint32Array(dst.buffer);
    for (let i = 0; i < n; i++) d[i] = src[i] << 16;
  }, 3);
  const pairs = bestMs(() => {
    const s = new Uint32Array(src.buffer, src.byteOffset, n >> 1);
    const d = new Uint32Array(dst.buffer);
    for (let i = 0; i < s.length; i++) {
      const v = s[i];
      d[2 * i] = v << 16;
      d[2 * i + 1] = v & 0xffff0000;
    }
  }, 3);
  const native = bestMs(() => widen16('bfloat16', src, dst), 3); // checkpoint/dtypes.ts: native set + swaps
  const fresh = bestMs(() => widen16('bfloat16', src, new Float32Array(n)), 3); // what a fresh array per use costs
  console.log(`widen ${n} bf16 values: JavaScript loop ${loop.toFixed(0)} ms, loop over pairs ${pairs.toFixed(0)} ms, ` +
    `native set + swap32 + swap16 (widen16) ${native.toFixed(0)} ms, widen16 into a fresh array ${fresh.toFixed(0)} ms`);
}

function lowmem(): void {
  const [out, inp] = [14336, 4096];
  const n = out * inp;
  const src = new Uint16Array(n).fill(0x3c00);
  const buffer = new Float32Array(n);
  const x = tf.randomNormal([1, inp]) as tf.Tensor2D;
  const best = { widen: Infinity, copy: Infinity, product: Infinity };
  for (let r = 0; r < 5; r++) {
    let t0 = performance.now();
    widen16('bfloat16', src, buffer); // as the port widens a low-memory weight
    best.widen = Math.min(best.widen, performance.now() - t0);
    t0 = performance.now();
    const w = tf.tensor2d(buffer, [out, inp]);
    best.copy = Math.min(best.copy, performance.now() - t0);
    t0 = performance.now();
    const y = tf.tidy(() => tf.transpose(tf.matMul(w, tf.transpose(x))));
    y.dataSync(); // read back outside tidy, which would walk a returned typed array element by element
    y.dispose();
    best.product = Math.min(best.product, performance.now() - t0);
    w.dispose();
  }
  const perToken = (ms: number): string => ((ms * 7_110_660_096) / n / 1000).toFixed(1);
  console.log(`7B w1 in low-memory mode: widen ${best.widen.toFixed(0)} ms, copy into wasm ${best.copy.toFixed(0)} ms, (W x^T)^T ${best.product.toFixed(0)} ms; ` +
    `for the 7.11 G parameters of a token: ${perToken(best.widen)} s + ${perToken(best.copy)} s + ${perToken(best.product)} s`);
  x.dispose();
}

const EXPERIMENTS: Record<string, () => void> = { matmul, fuse, readback, widen, lowmem };

async function main(): Promise<void> {
  const names = process.argv.slice(2);
  for (const name of names) {
    if (!(name in EXPERIMENTS)) throw new Error(`unknown experiment "${name}" (expected ${Object.keys(EXPERIMENTS).join(', ')})`);
  }
  await initBackend('wasm', { quiet: true });
  for (const name of names.length ? names : Object.keys(EXPERIMENTS)) EXPERIMENTS[name]();
}

main().catch((err: unknown) => {
  process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
