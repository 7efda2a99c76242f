/**
 * The machine's memory read bandwidth, measured here and now, for the decode bound.
 *
 * - native, 1 thread: memchr (Buffer.indexOf of a byte that is not there) over a buffer far larger
 *   than any cache, best of several passes;
 * - native, all threads: the same in one worker_thread per core at once, bytes over the slowest;
 * - tfjs-wasm matMul: a [1, K] x [K, N] float32 product whose weight (256 MiB) the backend has
 *   already packed for XNNPACK; what this project's backend reads weights at, on one thread.
 *
 * The bound used for decode is the largest of these: the most the machine was seen to read.
 */
import * as os from 'os';
import { Worker } from 'worker_threads';
import * as tf from '@tensorflow/tfjs-core';

const MiB = 1024 ** 2;

/** Bytes per second for `passes` memchr scans of `bytes`, best pass (runs in this thread or a worker). */
const SCAN_SOURCE = `
function scan(bytes, passes) {
  const buf = Buffer.alloc(bytes, 1);
  buf.indexOf(7);
  let best = Infinity;
  const t0 = performance.now();
  for (let i = 0; i < passes; i++) {
    const t = performance.now();
    if (buf.indexOf(7) !== -1) throw new Error('unexpected byte');
    best = Math.min(best, performance.now() - t);
  }
  return { best: bytes / (best / 1000), total: (bytes * passes) / ((performance.now() - t0) / 1000) };
}
`;

function scanHere(bytes: number, passes: number): number {
  // eslint-disable-next-line @typescript-eslint/no-implied-eval
  const scan = new Function(`${SCAN_SOURCE}; return scan;`)() as (b: number, p: number) => { best: number };
  return scan(bytes, passes).best;
}

/** Every worker scans its own buffer at the same time; the sum of their rates over the whole time. */
async function scanThreads(threads: number, bytes: number, passes: number): Promise<number> {
  const code = `
    const { parentPort, workerData } = require('worker_threads');
    ${SCAN_SOURCE}
    const buf = Buffer.alloc(workerData.bytes, 1);
    parentPort.postMessage('ready');
    parentPort.once('message', () => {
      const t0 = performance.now();
      for (let i = 0; i < workerData.passes; i++) if (buf.indexOf(7) !== -1) throw new Error('unexpected byte');
      parentPort.postMessage((performance.now() - t0) / 1000);
    });`;
  const workers = Array.from({ length: threads }, () => new Worker(code, { eval: true, workerData: { bytes, passes } }));
  try {
    await Promise.all(workers.map((w) => new Promise((resolve) => w.once('message', resolve))));
    const done = workers.map((w) => new Promise<number>((resolve) => w.once('message', resolve)));
    for (const w of workers) w.postMessage('go');
    const seconds = await Promise.all(done);
    return (threads * bytes * passes) / Math.max(...seconds);
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

/** Bytes of packed float32 weight per second through the backend's matMul, best of `passes`. */
function tfjsMatvec(bytes: number, passes: number): number {
  const [k, n] = [4096, bytes / 4 / 4096];
  const w = tf.tidy(() => tf.randomUniform([k, n]) as tf.Tensor2D);
  const x = tf.ones([1, k]) as tf.Tensor2D;
  try {
    tf.matMul(x, w).dispose(); // packs w
    let best = Infinity;
    for (let i = 0; i < passes; i++) {
      const t0 = performance.now();
      const y = tf.matMul(x, w);
      y.dataSync();
      best = Math.min(best, performance.now() - t0);
      y.dispose();
    }
    return bytes / (best / 1000);
  } finally {
    w.dispose();
    x.dispose();
  }
}

export interface Bandwidth {
  oneThread: number;
  allThreads: number;
  threads: number;
  tfjsMatMul: number;
  /** The largest of the three, bytes per second. */
  bound: number;
}

export async function measureBandwidth(opts: { bytes?: number; passes?: number } = {}): Promise<Bandwidth> {
  const bytes = opts.bytes ?? 512 * MiB;
  const passes = opts.passes ?? 8;
  const threads = os.cpus().length;
  const oneThread = scanHere(bytes, passes);
  const allThreads = threads > 1 ? await scanThreads(threads, bytes / 2, passes) : oneThread;
  const tfjsMatMul = tfjsMatvec(256 * MiB, passes);
  return { oneThread, allThreads, threads, tfjsMatMul, bound: Math.max(oneThread, allThreads, tfjsMatMul) };
}
