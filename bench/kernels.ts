/**
 * The compute pool's kernels on Mistral-7B-shaped bf16 matrices (random weights, no checkpoint):
 *
 *   npx ts-node bench/kernels.ts [--threads 1,2] [--reps 7]
 *
 * For each thread count: matrix-vector GB/s of weights read (4096x4096 as wq/wo, 14336x4096 as
 * w1/w3; 4096x14336 as w2), a 64-token prefill through the matmul kernel against 64 matrix-vector
 * products, and the memory-read bound measured in the same run: a plain SIMD sum over the same
 * weights in the same memories, on the pool's threads (the last count given is taken as "all").
 * Figures are the best of --reps runs; on a shared machine compare ratios from one run. The last
 * column also gives the prefill ratio in CPU time (all threads of the process), which a busy machine
 * distorts less than wall time: it counts the work, not the waits for a core.
 *
 * Then the same 4096x4096 and 14336x4096 matrix-vector products with Q8_0 weights (llama.cpp's
 * blocks, 34 bytes per 32 weights, int16-quantized input): GB/s of Q8_0 weight bytes read, and the
 * time of one q8_0 product over one bf16 product of the same shape on the same threads.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ComputePool, WeightHandle } from '../kernels/pool';

const GB = 1e9;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const threadCounts = arg('--threads', `1,${os.cpus().length}`).split(',').map(Number);
const reps = Number(arg('--reps', '7'));
/** Copies of each matrix, used in turn, so no product finds its weights in a large L3 (300 MiB on some Xeons). */
const copies = Number(arg('--copies', '4'));

/** Shapes also measured with Q8_0 weights. */
const Q8_SHAPES = ['wq 4096x4096', 'w1 14336x4096'];

const SHAPES: { name: string; rows: number; cols: number }[] = [
  { name: 'wq 4096x4096', rows: 4096, cols: 4096 },
  { name: 'w1 14336x4096', rows: 14336, cols: 4096 },
  { name: 'w2 4096x14336', rows: 4096, cols: 14336 },
];

/** Random bf16 weights in [-1, 1] (normal numbers only, as trained weights are), straight into the pool's memories. */
function fillRandom(pool: ComputePool, h: WeightHandle, seed: number): void {
  let s = seed >>> 0 || 1;
  for (const t of pool.targets(h)) {
    const u16 = new Uint16Array(t.bytes.buffer, t.bytes.byteOffset, t.bytes.length / 2);
    for (let i = 0; i < u16.length; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      // sign, exponent 112..126 (2^-15 .. 2^-1), 7 random mantissa bits
      u16[i] = ((s >>> 31) << 15) | ((112 + ((s >>> 8) % 15)) << 7) | (s & 0x7f);
    }
  }
}

/** Random Q8_0 blocks: an f16 scale in [2^-10, 2^-6) (normal), then 32 random int8. */
function fillRandomQ8(pool: ComputePool, h: WeightHandle, seed: number): void {
  let s = seed >>> 0 || 1;
  const rowsPerWrite = 256;
  const bytes = new Uint8Array(rowsPerWrite * h.rowBytes);
  for (let r = 0; r < h.rows; r += rowsPerWrite) {
    const n = Math.min(rowsPerWrite, h.rows - r) * h.rowBytes;
    for (let i = 0; i < n; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      bytes[i] = s & 0xff;
    }
    for (let at = 0; at < n; at += 34) {
      const d = ((5 + (bytes[at] & 3)) << 10) | ((bytes[at + 1] & 3) << 8) | bytes[at];
      bytes[at] = d & 0xff;
      bytes[at + 1] = d >> 8;
    }
    pool.writeRows(h, r, bytes.subarray(0, n));
  }
}

/**
 * The kernels' arithmetic ceiling on this machine: peak_f32 (8 register-held float32x4
 * multiply-then-add chains, SIMD128 having no fused multiply-add) on one thread, and what it allows
 * a 7B prefill on every core (2 x 7.11 G multiply-adds per token in the layer and output products).
 */
function printPeak(): void {
  const memory = new (globalThis as unknown as { WebAssembly: { Memory: new (d: object) => object } }).WebAssembly.Memory({ initial: 1, maximum: 65536, shared: true });
  const wasm = (globalThis as unknown as { WebAssembly: { Instance: new (m: object, i: object) => { exports: { peak_f32(n: number): number } }; Module: new (b: Uint8Array) => object } }).WebAssembly;
  const k = new wasm.Instance(new wasm.Module(fs.readFileSync(path.join(__dirname, '..', 'kernels', 'kernels.wasm'))), { env: { memory } }).exports;
  k.peak_f32(1e6); // compiled and warm
  let best = 0;
  for (let r = 0; r < 5; r++) {
    const n = 2e7;
    const t = performance.now();
    k.peak_f32(n);
    best = Math.max(best, (n * 64) / ((performance.now() - t) / 1000));
  }
  const cores = os.cpus().length;
  console.log(
    `arithmetic ceiling (peak_f32): ${(best / 1e9).toFixed(1)} GFLOP/s on one thread; on ${cores} cores a 7B prefill ` +
      `(14.2 GFLOP a token) can reach at most ${((cores * best) / 14.22e9).toFixed(1)} tokens/s on float32 SIMD128`,
  );
}

async function main(): Promise<void> {
  console.log(`bench/kernels.ts: ${os.cpus().length} cores (${os.cpus()[0]?.model ?? '?'}), load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, best of ${reps}, ${copies} copies of each matrix`);
  // Every pool at once, and every measurement taken in turn within each repetition, so that a
  // shared machine's quiet and busy moments fall on all of them alike: compare the ratios.
  printPeak();
  const pools = await Promise.all(threadCounts.map((threads) => ComputePool.start({ threads })));
  try {
    const tasks: { key: string; bytes: number; run: () => void; best: number; bestCpu: number }[] = [];
    for (const pool of pools) {
      const all: WeightHandle[] = [];
      SHAPES.forEach((s, i) => {
        const hs = Array.from({ length: copies }, (_, k) => {
          const h = pool.addWeight(`${s.name} #${k}`, s.rows, s.cols, 'bf16');
          fillRandom(pool, h, 1 + i * copies + k);
          return h;
        });
        all.push(...hs);
        const x1 = new Float32Array(s.cols).map((_, j) => Math.sin(j));
        const x64 = new Float32Array(64 * s.cols).map((_, j) => Math.cos(j));
        const bytes = hs[0].rows * hs[0].rowBytes;
        let next = 0;
        const h = (): WeightHandle => hs[next++ % copies];
        tasks.push({ key: `${pool.threads}|${s.name}|matvec`, bytes, run: () => void pool.matmul(h(), x1, 1), best: Infinity, bestCpu: Infinity });
        tasks.push({ key: `${pool.threads}|${s.name}|prefill`, bytes, run: () => void pool.matmul(h(), x64, 64), best: Infinity, bestCpu: Infinity });
        if (Q8_SHAPES.includes(s.name)) {
          const qs = Array.from({ length: copies }, (_, k) => {
            const q = pool.addWeight(`${s.name} q8_0 #${k}`, s.rows, s.cols, 'q8_0');
            fillRandomQ8(pool, q, 1000 + i * copies + k);
            return q;
          });
          let nextQ = 0;
          tasks.push({ key: `${pool.threads}|${s.name}|q8_0`, bytes: qs[0].rows * qs[0].rowBytes,
            run: () => void pool.matmul(qs[nextQ++ % copies], x1, 1), best: Infinity, bestCpu: Infinity });
        }
      });
      const hs = all;
      const scanned = hs.reduce((n, h) => n + h.rows * h.rowBytes, 0);
      tasks.push({ key: `${pool.threads}|scan`, bytes: scanned, run: () => void pool.scan(hs), best: Infinity, bestCpu: Infinity });
    }
    for (const t of tasks) for (let k = 0; k < copies; k++) t.run(); // warm every copy
    for (let rep = 0; rep < reps; rep++) {
      for (let i = 0; i < tasks.length; i++) {
        const t = tasks[(i + rep) % tasks.length];
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        t.run();
        t.best = Math.min(t.best, (performance.now() - t0) / 1000);
        const c = process.cpuUsage(c0);
        t.bestCpu = Math.min(t.bestCpu, (c.user + c.system) / 1e6);
      }
    }
    const get = (key: string): { bytes: number; best: number; bestCpu: number } => tasks.find((t) => t.key === key)!;
    const head = ['threads', 'matrix', 'matvec GB/s', 'matvec ms', 'prefill 64 ms', '64 x matvec ms', 'prefill / 64 matvecs', 'same in CPU time'];
    const rows: string[][] = [];
    const matvecRate = new Map<number, number>();
    for (const threads of threadCounts) {
      let bytes = 0;
      let seconds = 0;
      for (const s of SHAPES) {
        const v = get(`${threads}|${s.name}|matvec`);
        const p = get(`${threads}|${s.name}|prefill`);
        bytes += v.bytes;
        seconds += v.best;
        rows.push([`${threads}`, s.name, (v.bytes / v.best / GB).toFixed(2), (v.best * 1e3).toFixed(2),
          (p.best * 1e3).toFixed(1), (64 * v.best * 1e3).toFixed(1), (p.best / (64 * v.best)).toFixed(3),
          (p.bestCpu / (64 * v.bestCpu)).toFixed(3)]);
      }
      matvecRate.set(threads, bytes / seconds / GB);
    }
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (r: string[]): string => r.map((c, i) => c.padStart(widths[i])).join('  ');
    console.log(line(head));
    for (const r of rows) console.log(line(r));
    const all = threadCounts[threadCounts.length - 1];
    for (const threads of threadCounts) {
      const scan = get(`${threads}|scan`);
      console.log(`${threads} thread(s): matvec ${matvecRate.get(threads)!.toFixed(2)} GB/s over the three matrices; read bound (SIMD sum over the same memories) ${(scan.bytes / scan.best / GB).toFixed(2)} GB/s`);
    }
    const boundScan = get(`${all}|scan`);
    const bound = boundScan.bytes / boundScan.best / GB;
    for (const threads of threadCounts) {
      console.log(`matvec on ${threads} thread(s) / read bound on ${all}: ${(matvecRate.get(threads)! / bound).toFixed(3)}`);
    }
    const qHead = ['threads', 'matrix', 'q8_0 matvec GB/s', 'q8_0 ms', 'bf16 ms', 'q8_0 / bf16 time', 'same in CPU time'];
    const qRows: string[][] = [];
    for (const threads of threadCounts) {
      for (const name of Q8_SHAPES) {
        const q = get(`${threads}|${name}|q8_0`);
        const v = get(`${threads}|${name}|matvec`);
        qRows.push([`${threads}`, name, (q.bytes / q.best / GB).toFixed(2), (q.best * 1e3).toFixed(2), (v.best * 1e3).toFixed(2),
          (q.best / v.best).toFixed(3), (q.bestCpu / v.bestCpu).toFixed(3)]);
      }
    }
    const qWidths = qHead.map((h, i) => Math.max(h.length, ...qRows.map((r) => r[i].length)));
    console.log(qHead.map((c, i) => c.padStart(qWidths[i])).join('  '));
    for (const r of qRows) console.log(r.map((c, i) => c.padStart(qWidths[i])).join('  '));
    if (threadCounts.length > 1) {
      console.log(`matvec speed-up ${threadCounts[0]} -> ${all} threads: ${(matvecRate.get(all)! / matvecRate.get(threadCounts[0])!).toFixed(2)}x`);
    }
  } finally {
    await Promise.all(pools.map((p) => p.close()));
  }
}

main().catch((err: unknown) => {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
