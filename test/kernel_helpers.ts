/** What the kernel tests (kernels.test.ts, kernels_q8.test.ts) share: decoding, bit views, pools, loading. */
import { afterAll } from 'vitest';
import { ComputePool, WeightDtype, WeightHandle } from '../kernels/pool';

/** IEEE binary16 by its definition: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024. */
export function f16Value(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0x1f) return m === 0 ? s * Infinity : NaN;
  if (e === 0) return s * Math.pow(2, -14) * (m / 1024);
  return s * Math.pow(2, e - 15) * (1 + m / 1024);
}

export function bits(a: Float32Array): Uint32Array {
  return new Uint32Array(a.buffer, a.byteOffset, a.length);
}

/** Call at a test file's top level: a pool starter whose pools all close after the file. */
export function poolStarter(): (threads: number, memoryLimitBytes?: number) => Promise<ComputePool> {
  const pools: ComputePool[] = [];
  afterAll(async () => {
    await Promise.all(pools.map((p) => p.close()));
  });
  return async (threads, memoryLimitBytes) => {
    const p = await ComputePool.start({ threads, memoryLimitBytes });
    pools.push(p);
    return p;
  };
}

/** A weight written into the pool in uneven chunks that start and end mid-row (mid-block) and span shards, as a streamed checkpoint arrives. */
export function load(p: ComputePool, name: string, dtype: WeightDtype, rows: number, cols: number, bytes: Uint8Array): WeightHandle {
  const h = p.addWeight(name, rows, cols, dtype);
  for (let at = 0, k = 0; at < bytes.length; k++) {
    const n = Math.min(bytes.length - at, 1 + ((k * 7919) % 997));
    p.write(h, at, bytes.subarray(at, at + n));
    at += n;
  }
  return h;
}
