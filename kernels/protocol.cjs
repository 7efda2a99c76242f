'use strict';
/**
 * The layout of the pool's shared control block (an Int32Array over a SharedArrayBuffer), shared by
 * kernels/pool.ts (the main thread), kernels/supervisor.cjs and kernels/worker.cjs.
 *
 * A call: the main thread writes each worker's jobs, stores OP and PENDING (the number of workers),
 * adds 1 to SEQ and notifies SEQ. Each worker, woken from Atomics.wait on SEQ, does its jobs and
 * subtracts 1 from PENDING; the last one notifies PENDING, on which the main thread waits (after
 * doing its own jobs). A failure stores a thread index in FAULT (the first wins), its message in
 * the message buffer, and notifies PENDING, so the main thread never waits for a dead worker.
 */
// Job kinds: the weight's element type (as the kernels number them), a read-only scan, Q8_0.
const KIND_BF16 = 0;
const KIND_F16 = 1;
const KIND_F32 = 2;
const KIND_SCAN = 3;
const KIND_Q8_0 = 4; // llama.cpp's Q8_0 blocks (matmul_q8_0)
const KIND_QUANTIZE = 5; // float rows quantized into Q8_0 panels while loading (quantize_q8_0: x = source, T = its element type, w = panels)

module.exports = Object.freeze({
  SEQ: 0, // incremented once per call
  PENDING: 1, // workers yet to finish the current call
  FAULT: 2, // 0, or the index (1..N-1) of the first thread that failed
  OP: 3, // what the current call asks: OP_RUN, OP_TAKE_MEMORIES or OP_STOP
  KILL: 4, // test hook: index of a worker to be terminated during the next OP_RUN, else 0
  MSG_LEN: 5, // bytes of the fault message in the message buffer
  NEVER: 6, // never notified: a worker to be killed waits here
  OP_RUN: 1,
  OP_TAKE_MEMORIES: 2,
  OP_STOP: 3,
  KIND_BF16,
  KIND_F16,
  KIND_F32,
  KIND_SCAN,
  KIND_Q8_0,
  KIND_QUANTIZE,
  // Worker k's jobs (k = 1..N-1) start at JOBS + (k - 1) * STRIDE: a count, then up to MAX_JOBS
  // jobs of FIELDS words: kind, memory index, w, x, y, rows, cols, T, scratch (addresses as uint32).
  JOBS: 16,
  MAX_JOBS: 16,
  FIELDS: 9,
  STRIDE: 1 + 16 * 9,
  MSG_BYTES: 1024,
  words(threads) {
    return 16 + Math.max(0, threads - 1) * (1 + 16 * 9);
  },
  /** Runs one job on kernel instance `k` (the exports of kernels.wasm): the one place a kind meets its kernel. */
  runJob(k, kind, w, x, y, rows, cols, T, scratch) {
    if (kind === KIND_BF16) k.matmul_bf16(w, x, y, rows, cols, T, scratch);
    else if (kind === KIND_F16) k.matmul_f16(w, x, y, rows, cols, T, scratch);
    else if (kind === KIND_F32) k.matmul_f32(w, x, y, rows, cols, T, scratch);
    else if (kind === KIND_SCAN) k.scan(w, rows);
    else if (kind === KIND_Q8_0) k.matmul_q8_0(w, x, y, rows, cols, T, scratch);
    else if (kind === KIND_QUANTIZE) k.quantize_q8_0(x, T, rows, cols, w);
    else throw new Error(`unknown job kind ${kind}`);
  },
});
