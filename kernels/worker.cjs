'use strict';
/**
 * A compute worker of the pool (kernels/pool.ts): owns the kernel instances over its memories and
 * runs the jobs the main thread writes into the control block. It sleeps in Atomics.wait between
 * calls (no spinning) and reports failures through the control block, never by throwing.
 */
const { workerData, parentPort, receiveMessageOnPort } = require('worker_threads');
const P = require('./protocol.cjs');

const { wasmModule, control, message, index, port, failStart } = workerData;
if (failStart) throw new Error(`test hook: worker ${index} fails to start`);
const ctl = new Int32Array(control);
const u32 = new Uint32Array(control);
/** Kernel exports, one instance per memory this thread owns, in the order the memories came. */
const kernels = [];

/** Instantiates the kernels over every memory the main thread has posted since the last call. */
function takeMemories() {
  for (let m = receiveMessageOnPort(port); m !== undefined; m = receiveMessageOnPort(port)) {
    kernels.push(new WebAssembly.Instance(wasmModule, { env: { memory: m.message } }).exports);
  }
}

function runJobs() {
  const base = P.JOBS + (index - 1) * P.STRIDE;
  const count = u32[base];
  for (let j = 0; j < count; j++) {
    const o = base + 1 + j * P.FIELDS;
    const [kind, mem, w, x, y, rows, cols, T, scratch] = u32.subarray(o, o + P.FIELDS);
    const k = kernels[mem];
    if (k === undefined) throw new Error(`worker ${index} has no memory ${mem}`);
    P.runJob(k, kind, w, x, y, rows, cols, T, scratch);
  }
}

function fail(err) {
  if (Atomics.compareExchange(ctl, P.FAULT, 0, index) !== 0) return;
  const text = `worker ${index}: ${err instanceof Error ? err.message : String(err)}`.split('\n')[0];
  const bytes = Buffer.from(text).subarray(0, P.MSG_BYTES);
  new Uint8Array(message).set(bytes);
  Atomics.store(ctl, P.MSG_LEN, bytes.length);
}

parentPort.postMessage('ready');
let seen = 0;
for (;;) {
  Atomics.wait(ctl, P.SEQ, seen);
  seen = Atomics.load(ctl, P.SEQ);
  const op = Atomics.load(ctl, P.OP);
  if (op === P.OP_STOP) break;
  try {
    if (op === P.OP_TAKE_MEMORIES) takeMemories();
    else if (op === P.OP_RUN) {
      if (Atomics.compareExchange(ctl, P.KILL, index, 0) === index) {
        // Test hook: ask to be terminated, and wait (mid-call) until it happens.
        parentPort.postMessage('kill-me');
        Atomics.wait(ctl, P.NEVER, 0, 60_000);
      }
      runJobs();
    }
  } catch (err) {
    fail(err);
  }
  if (Atomics.sub(ctl, P.PENDING, 1) === 1) Atomics.notify(ctl, P.PENDING);
}
port.close();
