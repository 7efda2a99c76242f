'use strict';
/**
 * The pool's supervisor: a worker_thread that starts the compute workers and watches them. The main
 * thread blocks in Atomics.wait during a product, so it cannot hear a worker's 'exit' event; this
 * thread can, and turns a worker that dies (crash, out of memory, terminate()) into a FAULT in the
 * control block plus a notify, so the main thread's pending call fails with one line, never hangs.
 */
const path = require('path');
const { workerData, parentPort, Worker } = require('worker_threads');
const P = require('./protocol.cjs');

const { wasmModule, control, message, ports, failStart } = workerData;
const ctl = new Int32Array(control);
let started = false;
let stopping = false;
let ready = 0;
let alive = ports.length;

function fault(index, text) {
  if (!started) {
    parentPort.postMessage({ type: 'error', message: text });
    return;
  }
  if (Atomics.compareExchange(ctl, P.FAULT, 0, index) === 0) {
    const bytes = Buffer.from(text.split('\n')[0]).subarray(0, P.MSG_BYTES);
    new Uint8Array(message).set(bytes);
    Atomics.store(ctl, P.MSG_LEN, bytes.length);
  }
  Atomics.notify(ctl, P.PENDING);
}

const workers = ports.map((port, k) => {
  const index = k + 1;
  const w = new Worker(path.join(__dirname, 'worker.cjs'), {
    workerData: { wasmModule, control, message, index, port, failStart: failStart === index },
    transferList: [port],
  });
  w.on('message', (m) => {
    if (m === 'ready' && ++ready === ports.length) {
      started = true;
      parentPort.postMessage({ type: 'ready' });
    } else if (m === 'kill-me') {
      void w.terminate();
    }
  });
  w.on('error', (err) => fault(index, `worker ${index} failed: ${err && err.message ? err.message : String(err)}`));
  w.on('exit', (code) => {
    alive--;
    if (!stopping) fault(index, `worker ${index} exited (code ${code})`);
    if (alive === 0 && stopping) process.exit(0);
  });
  return w;
});

parentPort.on('message', (m) => {
  if (m === 'stop') {
    stopping = true;
    if (alive === 0) process.exit(0);
  }
});
if (workers.length === 0) parentPort.postMessage({ type: 'ready' });
