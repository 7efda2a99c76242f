/**
 * The compute pool's kernels on Mistral-7B-shaped bf16 matrices (random weights, no checkpoint):
 *
 *   npx ts-node bench/kernels.ts [--threads 1,2] [--reps 7]
 *
 * For each thread count: matrix-vector GB/s of weights read (4096x4096 as wq/wo, 14336x4096 as
 * w1/w3; 4096x14336 as w2), a 64-token prefill through the matmul kernel against 64 matrix-vector
 * products, and the memory-read bound measured in the same run: a plain SIMD sum over the same
 * weights in the same memories, on the pool's threads (the last count given is taken as "all").
 * Figures are the best of --reps runs; on a shared machine compare ratios from one run.
 */
import * as os from 'os';
import { ComputePool, WeightHandle } from '../kernels/pool';

const GB = 1e9;

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const threadCounts = arg('--threads', `1,${os.cpus().length}`).split(',').map(Number);
const reps = Number(arg('--reps', '7'));

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

function best(fn: () => void): number {
  fn(); // warm
  let b = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    fn();
    b = Math.min(b, performance.now() - t0);
  }
  return b / 1000;
}

async function main(): Promise<void> {
  console.log(`bench/kernels.ts: ${os.cpus().length} cores (${os.cpus()[0]?.model ?? '?'}), load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, best of ${reps}`);
  const rows: string[][] = [];
  const summary: Record<string, number> = {};
  for (const threads of threadCounts) {
    const pool = await ComputePool.start({ threads });
    try {
      const hs = SHAPES.map((s, i) => {
        const h = pool.addWeight(s.name, s.rows, s.cols, 'bf16');
        fillRandom(pool, h, 1 + i);
        return h;
      });
      let bytesAll = 0;
      let matvecAll = 0;
      for (const h of hs) {
        const bytes = h.rows * h.rowBytes;
        const x1 = new Float32Array(h.cols).map((_, i) => Math.sin(i));
        const x64 = new Float32Array(64 * h.cols).map((_, i) => Math.cos(i));
        const tv = best(() => pool.matmul(h, x1, 1));
        const tp = best(() => pool.matmul(h, x64, 64));
        bytesAll += bytes;
        matvecAll += tv;
        rows.push([`${threads}`, h.name, `${(bytes / tv / GB).toFixed(2)}`, `${(tv * 1e3).toFixed(2)}`,
          `${(tp * 1e3).toFixed(1)}`, `${(64 * tv * 1e3).toFixed(1)}`, `${(tp / (64 * tv)).toFixed(3)}`]);
      }
      const bytesScanned = pool.scan(hs);
      const ts = best(() => pool.scan(hs));
      summary[`matvec GB/s, ${threads} thread(s), all three matrices`] = bytesAll / matvecAll / GB;
      summary[`bandwidth bound GB/s (SIMD sum), ${threads} thread(s)`] = bytesScanned / ts / GB;
    } finally {
      await pool.close();
    }
  }
  const head = ['threads', 'matrix', 'matvec GB/s', 'matvec ms', 'prefill 64 ms', '64 x matvec ms', 'prefill / 64 matvecs'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r: string[]): string => r.map((c, i) => c.padStart(widths[i])).join('  ');
  console.log(line(head));
  for (const r of rows) console.log(line(r));
  for (const [k, v] of Object.entries(summary)) console.log(`${k}: ${v.toFixed(2)}`);
  const all = threadCounts[threadCounts.length - 1];
  const bound = summary[`bandwidth bound GB/s (SIMD sum), ${all} thread(s)`];
  for (const t of threadCounts) {
    console.log(`matvec on ${t} thread(s) / bound on ${all}: ${(summary[`matvec GB/s, ${t} thread(s), all three matrices`] / bound).toFixed(3)}`);
  }
  if (threadCounts.length > 1) {
    const a = summary[`matvec GB/s, ${threadCounts[0]} thread(s), all three matrices`];
    const b = summary[`matvec GB/s, ${all} thread(s), all three matrices`];
    console.log(`matvec speed-up ${threadCounts[0]} -> ${all} threads: ${(b / a).toFixed(2)}x`);
  }
}

main().catch((err: unknown) => {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
