/**
 * The compute pool: matrix products y = W x on the main thread plus N-1 worker_threads, each thread
 * owning a range of rows of every weight, held in its own WebAssembly memories, multiplied by the
 * SIMD kernels of kernels/assembly/kernels.ts (built into kernels/kernels.wasm).
 *
 * Memories. A wasm memory holds at most 4 GiB, and Mistral 7B's bf16 layer and output weights take
 * 14.2 GB, so a thread may own several memories: each thread fills its current memory up to
 * `memoryLimitBytes` (default 4 GiB - 128 MiB, the rest kept for inputs and outputs) and then opens
 * another. With 4 threads the 7B weights take one memory per thread (3.55 GB each), with 2 threads
 * two each, with 1 thread four. A weight's shard on a thread lies in one memory. All memories are
 * shared (SharedArrayBuffer-backed), so the main thread writes weights and inputs straight into a
 * worker's memory and reads its outputs from there: no copies through messages.
 *
 * Threads. Workers sleep in Atomics.wait on a control word and are woken with Atomics.notify; the
 * main thread does its own shard, then waits (Atomics.wait) for the others. A supervisor thread
 * starts the workers and watches them, so a worker that dies mid-call turns into an error thrown by
 * that call (see kernels/supervisor.cjs) instead of a hang.
 *
 * Results do not depend on the thread count: each y[t, r] is one row's dot product in the fixed
 * order stated in the kernels' source, whichever thread computes it and whatever T is.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Worker, MessageChannel, MessagePort } from 'worker_threads';
import { halfToFloatTable } from '../checkpoint/dtypes';
// eslint-disable-next-line @typescript-eslint/no-require-imports
const P = require('./protocol.cjs') as Protocol;

/** The parts of the WebAssembly API used here (this project's tsconfig has no DOM lib to declare them). */
interface WasmMemory {
  readonly buffer: SharedArrayBuffer;
  grow(pages: number): number;
}
type WasmModule = object;
interface WasmApi {
  Memory: new (desc: { initial: number; maximum: number; shared: boolean }) => WasmMemory;
  Instance: new (module: WasmModule, imports: object) => { exports: object };
  compile(bytes: Uint8Array): Promise<WasmModule>;
}
const WebAssembly = (globalThis as unknown as { WebAssembly: WasmApi }).WebAssembly;

interface Protocol {
  SEQ: number; PENDING: number; FAULT: number; OP: number; KILL: number; MSG_LEN: number;
  OP_RUN: number; OP_TAKE_MEMORIES: number; OP_STOP: number;
  KIND_BF16: number; KIND_F16: number; KIND_F32: number; KIND_SCAN: number; KIND_Q8_0: number; KIND_QUANTIZE: number;
  JOBS: number; MAX_JOBS: number; FIELDS: number; STRIDE: number; MSG_BYTES: number;
  words(threads: number): number;
  runJob(k: Kernels, kind: number, w: number, x: number, y: number, rows: number, cols: number, T: number, scratch: number): void;
}

/**
 * How a weight is stored: bf16, f16 or f32 elements, or 'q8_0', llama.cpp's Q8_0 blocks (per 32
 * columns an f16 scale d then 32 int8 q, 34 bytes; cols a multiple of 32), multiplied with the
 * input quantized to int16 per block of 32 (see matmul_q8_0 in kernels/assembly/kernels.ts).
 * Q8_0 weights are written as llama.cpp stores them (whole rows) and kept in panels of 4 rows
 * (the same values, scales decoded to float32: 36 bytes per 32 weights in memory).
 */
export type WeightDtype = 'bf16' | 'f16' | 'f32' | 'q8_0';

/** A weight in the pool: its rows are spread over the threads. */
export interface WeightHandle {
  readonly id: number;
  readonly name: string;
  readonly rows: number;
  readonly cols: number;
  readonly dtype: WeightDtype;
  /** Bytes of one row as written (cols * 2 for bf16 and f16, cols * 4 for f32, cols / 32 * 34 for q8_0). */
  readonly rowBytes: number;
}

/** Where rows [rowStart, rowEnd) of a weight live: bytes [byteStart, byteEnd) of the weight as stored. */
export interface ShardTarget {
  readonly thread: number;
  readonly rowStart: number;
  readonly rowEnd: number;
  readonly byteStart: number;
  readonly byteEnd: number;
  /** The destination itself, inside the owning thread's wasm memory (fs.readSync may read into it). */
  readonly bytes: Uint8Array;
}

export interface PoolOptions {
  /** Compute threads, the main thread included; default os.cpus().length. */
  threads?: number;
  /** Weight bytes a memory takes before its thread opens another; default 4 GiB - 128 MiB. */
  memoryLimitBytes?: number;
  /** The kernels' .wasm; default kernels/kernels.wasm beside this file. */
  wasmPath?: string;
  /** Test hook: worker k (1..threads-1) throws while starting. */
  failWorkerStart?: number;
}

interface Kernels {
  matmul_bf16(w: number, x: number, y: number, rows: number, cols: number, T: number, scratch: number): void;
  matmul_f16(w: number, x: number, y: number, rows: number, cols: number, T: number, scratch: number): void;
  matmul_f32(w: number, x: number, y: number, rows: number, cols: number, T: number, scratch: number): void;
  matmul_q8_0(w: number, x: number, y: number, rows: number, cols: number, T: number, scratch: number): void;
  quantize_q8_0(src: number, dt: number, rows: number, cols: number, dst: number): void;
  scan(p: number, bytes: number): number;
}

interface Memory {
  readonly memory: WasmMemory;
  readonly index: number; // among its thread's memories
  kernels?: Kernels; // the main thread's own memories only
  top: number; // first free byte after the weights
  ioStart: number; // inputs, outputs and kernel scratch live at [ioStart, ioStart + ioBytes), above top
  ioBytes: number;
}

interface Shard {
  readonly thread: number;
  readonly mem: Memory;
  readonly rowStart: number;
  readonly rowEnd: number;
  readonly ptr: number;
}

interface Weight extends WeightHandle {
  readonly shards: Shard[];
}

const PAGE = 65536;
const MAX_PAGES = 65536; // 4 GiB, what the kernels' module declares
const RESERVED = PAGE; // the first page is left to the module (it has no data, but address 0 stays unused)
const ALIGN = 64;
const IO_LIMIT = 64 * 1024 * 1024; // inputs + outputs per memory per dispatch; longer T goes in chunks
const DEFAULT_MEMORY_LIMIT = 4 * 1024 ** 3 - 128 * 1024 ** 2;
/** Each dtype's job kind and stored bytes per `block` columns (q8_0: 34 bytes per block of 32). */
const DTYPES: Record<WeightDtype, { kind: number; block: number; blockBytes: number }> = {
  bf16: { kind: P.KIND_BF16, block: 1, blockBytes: 2 },
  f16: { kind: P.KIND_F16, block: 1, blockBytes: 2 },
  f32: { kind: P.KIND_F32, block: 1, blockBytes: 4 },
  q8_0: { kind: P.KIND_Q8_0, block: 32, blockBytes: 34 },
};

const align = (n: number): number => Math.ceil(n / ALIGN) * ALIGN;

/** Q8_0 in the pool: panels of 4 rows, per block of 32 columns 4 float32 scales then 4 x 32 int8 (see kernels.ts). */
const Q8_PANEL_BLOCK = 144;
/** Bytes a Q8_0 weight takes in the pool per weight (its scales decoded to float32): 36 per 32. */
export const Q8_0_POOL_BYTES_PER_WEIGHT = Q8_PANEL_BLOCK / (4 * 32);
/** Bytes a shard of `rows` rows takes in memory. */
function shardBytes(dtype: WeightDtype, rows: number, cols: number, rowBytes: number): number {
  return dtype === 'q8_0' ? Math.ceil(rows / 4) * (cols / 32) * Q8_PANEL_BLOCK : rows * rowBytes;
}


interface Job {
  readonly thread: number;
  readonly mem: Memory;
  readonly kind: number;
  readonly w: number;
  readonly x: number;
  readonly y: number;
  readonly rows: number;
  readonly cols: number;
  readonly T: number;
  readonly scratch: number;
}

export class ComputePool {
  readonly threads: number;
  private readonly memoryLimit: number;
  private readonly module: WasmModule;
  private readonly control: Int32Array;
  private readonly controlU32: Uint32Array;
  private readonly message: Uint8Array;
  private readonly supervisor: Worker | null;
  private readonly ports: MessagePort[]; // the main thread's ends, one per worker
  private readonly mems: Memory[][]; // per thread
  private readonly weights: Weight[] = [];
  private fault: string | null = null;
  private posted = false; // memories posted to workers that they have not instantiated yet
  private closed = false;

  private constructor(
    threads: number,
    memoryLimit: number,
    module: WasmModule,
    control: SharedArrayBuffer,
    message: SharedArrayBuffer,
    supervisor: Worker | null,
    ports: MessagePort[],
  ) {
    this.threads = threads;
    this.memoryLimit = memoryLimit;
    this.module = module;
    this.control = new Int32Array(control);
    this.controlU32 = new Uint32Array(control);
    this.message = new Uint8Array(message);
    this.supervisor = supervisor;
    this.ports = ports;
    this.mems = Array.from({ length: threads }, () => []);
  }

  /** Starts the workers; rejects with a one-line error if the kernels or any worker cannot start. */
  static async start(opts: PoolOptions = {}): Promise<ComputePool> {
    const threads = opts.threads ?? os.cpus().length;
    if (!Number.isInteger(threads) || threads < 1 || threads > 256) {
      throw new Error(`compute pool: threads must be an integer from 1 to 256, got ${threads}`);
    }
    const limit = opts.memoryLimitBytes ?? DEFAULT_MEMORY_LIMIT;
    if (!(limit >= PAGE && limit <= DEFAULT_MEMORY_LIMIT)) {
      throw new Error(`compute pool: memoryLimitBytes must be from ${PAGE} to ${DEFAULT_MEMORY_LIMIT}, got ${limit}`);
    }
    const wasmPath = opts.wasmPath ?? path.join(__dirname, 'kernels.wasm');
    let module: WasmModule;
    try {
      module = await WebAssembly.compile(fs.readFileSync(wasmPath));
    } catch (err) {
      throw new Error(`compute pool: cannot load the kernels from ${wasmPath}: ${oneLine(err)}`);
    }
    const control = new SharedArrayBuffer(P.words(threads) * 4);
    const message = new SharedArrayBuffer(P.MSG_BYTES);
    if (threads === 1) return new ComputePool(1, limit, module, control, message, null, []);

    const channels = Array.from({ length: threads - 1 }, () => new MessageChannel());
    const workerPorts = channels.map((c) => c.port2);
    const supervisor = new Worker(path.join(__dirname, 'supervisor.cjs'), {
      workerData: { wasmModule: module, control, message, ports: workerPorts, failStart: opts.failWorkerStart ?? 0 },
      transferList: workerPorts,
    });
    try {
      await new Promise<void>((resolve, reject) => {
        supervisor.on('message', (m: { type: string; message?: string }) => {
          if (m.type === 'ready') resolve();
          else if (m.type === 'error') reject(new Error(`compute pool: cannot start: ${m.message ?? 'a worker failed'}`));
        });
        supervisor.once('error', (err) => reject(new Error(`compute pool: cannot start: ${oneLine(err)}`)));
        supervisor.once('exit', (code) => reject(new Error(`compute pool: cannot start: the supervisor exited (code ${code})`)));
      });
    } catch (err) {
      await supervisor.terminate();
      for (const c of channels) c.port1.close();
      throw err;
    }
    supervisor.removeAllListeners('message');
    supervisor.removeAllListeners('error');
    supervisor.removeAllListeners('exit');
    supervisor.on('error', () => undefined); // its workers' faults arrive through the control block
    supervisor.unref(); // a pool left open does not keep the process alive; exit ends every worker
    return new ComputePool(threads, limit, module, control, message, supervisor, channels.map((c) => c.port1));
  }

  /**
   * Reserves room for a weight W [rows, cols] of `dtype`, rows split among the threads in
   * contiguous ranges (boundaries on multiples of 4 rows). Fill it with write() or targets().
   */
  addWeight(name: string, rows: number, cols: number, dtype: WeightDtype): WeightHandle {
    this.usable();
    if (!(Number.isInteger(rows) && rows >= 1 && Number.isInteger(cols) && cols >= 1)) {
      throw new Error(`compute pool: weight ${name}: rows and cols must be positive integers, got [${rows}, ${cols}]`);
    }
    if (!Object.prototype.hasOwnProperty.call(DTYPES, dtype)) {
      throw new Error(`compute pool: weight ${name}: dtype must be bf16, f16, f32 or q8_0, got ${String(dtype)}`);
    }
    const { block, blockBytes } = DTYPES[dtype];
    if (cols % block !== 0) {
      throw new Error(`compute pool: weight ${name}: ${dtype} needs cols to be a multiple of ${block}, got ${cols}`);
    }
    const rowBytes = (cols / block) * blockBytes;
    const shards: Shard[] = [];
    for (let thread = 0; thread < this.threads; thread++) {
      const rowStart = this.boundary(rows, thread);
      const rowEnd = this.boundary(rows, thread + 1);
      if (rowEnd === rowStart) continue;
      const bytes = shardBytes(dtype, rowEnd - rowStart, cols, rowBytes);
      if (bytes > this.memoryLimit) {
        throw new Error(
          `compute pool: weight ${name}: a shard of ${bytes} bytes exceeds a memory's ${this.memoryLimit}; use more threads`,
        );
      }
      const mem = this.memoryFor(thread, bytes);
      const ptr = mem.top;
      mem.top = align(ptr + bytes);
      mem.ioStart = mem.top; // inputs and outputs move above the new weight
      mem.ioBytes = 0;
      this.grow(mem, mem.top);
      shards.push({ thread, mem, rowStart, rowEnd, ptr });
    }
    const weight: Weight = { id: this.weights.length, name, rows, cols, dtype, rowBytes, shards };
    this.weights.push(weight);
    this.shareMemories();
    return { id: weight.id, name, rows, cols, dtype, rowBytes };
  }

  /**
   * Where each shard of a weight lives, as byte ranges of the weight as stored (row-major) and the
   * destination bytes in wasm memory: a checkpoint reader can read each range straight into it.
   */
  targets(handle: WeightHandle): ShardTarget[] {
    const w = this.weight(handle);
    if (w.dtype === 'q8_0') throw new Error(`compute pool: weight ${w.name}: q8_0 weights are kept in panels; write() them in whole rows`);
    return w.shards.map((s) => ({
      thread: s.thread,
      rowStart: s.rowStart,
      rowEnd: s.rowEnd,
      byteStart: s.rowStart * w.rowBytes,
      byteEnd: s.rowEnd * w.rowBytes,
      bytes: new Uint8Array(s.mem.memory.buffer, s.ptr, (s.rowEnd - s.rowStart) * w.rowBytes),
    }));
  }

  /**
   * Copies `bytes`, the stored weight's bytes from `byteOffset` on (any chunk: it may start or end
   * mid-row and span shards), into the shards. A checkpoint streamed in pieces is written piece by
   * piece, never held whole.
   */
  write(handle: WeightHandle, byteOffset: number, bytes: Uint8Array): void {
    this.usable();
    const w = this.weight(handle);
    const total = w.rows * w.rowBytes;
    if (!(Number.isInteger(byteOffset) && byteOffset >= 0 && byteOffset + bytes.length <= total)) {
      throw new Error(`compute pool: weight ${w.name}: bytes [${byteOffset}, ${byteOffset + bytes.length}) outside its ${total} bytes`);
    }
    if (w.dtype === 'q8_0') return this.writeQ8(w, byteOffset, bytes);
    const end = byteOffset + bytes.length;
    for (const t of this.targets(handle)) {
      const from = Math.max(byteOffset, t.byteStart);
      const to = Math.min(end, t.byteEnd);
      if (from < to) t.bytes.set(bytes.subarray(from - byteOffset, to - byteOffset), from - t.byteStart);
    }
  }

  /**
   * Reads the weight, stored row-major and contiguous at byte `position` of the open file `fd`,
   * straight into its shards with fs.readSync (no host copy of the weight; Q8_0 through a buffer of
   * a few MB, to be repacked into panels). A short read (the file ends early) is a one-line error
   * naming `source`.
   */
  readFromFile(handle: WeightHandle, fd: number, position: number, source = 'the file'): void {
    this.usable();
    const CHUNK = 1 << 30; // readSync takes at most 2 GiB at once
    const readAt = (target: Uint8Array, at: number): void => {
      for (let done = 0; done < target.length; ) {
        const n = fs.readSync(fd, target, done, Math.min(CHUNK, target.length - done), position + at + done);
        if (n === 0) {
          throw new Error(`compute pool: weight ${handle.name}: ${source} ends at byte ${position + at + done}, ` +
            `before its ${handle.rows * handle.rowBytes} bytes from ${position}`);
        }
        done += n;
      }
    };
    if (handle.dtype !== 'q8_0') {
      for (const t of this.targets(handle)) readAt(t.bytes, t.byteStart);
      return;
    }
    // Q8_0 goes into panels (write() repacks whole rows): rows a few MB at a time through a buffer.
    const rowsPerRead = Math.max(1, Math.floor((8 << 20) / handle.rowBytes));
    const buf = new Uint8Array(Math.min(handle.rows, rowsPerRead) * handle.rowBytes);
    for (let r = 0; r < handle.rows; r += rowsPerRead) {
      const piece = buf.subarray(0, Math.min(rowsPerRead, handle.rows - r) * handle.rowBytes);
      readAt(piece, r * handle.rowBytes);
      this.writeRows(handle, r, piece);
    }
  }

  /** Q8_0: whole rows of llama.cpp blocks into their panels (scales decoded to float32, q copied). */
  private writeQ8(w: Weight, byteOffset: number, bytes: Uint8Array): void {
    if (byteOffset % w.rowBytes !== 0 || bytes.length % w.rowBytes !== 0) {
      throw new Error(`compute pool: weight ${w.name}: q8_0 weights are written in whole rows of ${w.rowBytes} bytes`);
    }
    const half = new Float32Array(halfToFloatTable().buffer); // f16 bits -> float32 values
    const nb = w.cols / 32;
    const r0 = byteOffset / w.rowBytes;
    const r1 = r0 + bytes.length / w.rowBytes;
    for (const s of w.shards) {
      const from = Math.max(r0, s.rowStart);
      const to = Math.min(r1, s.rowEnd);
      if (from >= to) continue;
      const buffer = s.mem.memory.buffer;
      const u8 = new Uint8Array(buffer);
      const f32 = new Float32Array(buffer);
      for (let r = from; r < to; r++) {
        const i = r - s.rowStart;
        const panel = s.ptr + (i >> 2) * nb * Q8_PANEL_BLOCK;
        const k = i & 3;
        let src = (r - r0) * w.rowBytes;
        for (let b = 0; b < nb; b++, src += 34) {
          const at = panel + b * Q8_PANEL_BLOCK;
          f32[at / 4 + k] = half[bytes[src] | (bytes[src + 1] << 8)];
          u8.set(bytes.subarray(src + 2, src + 34), at + 16 + 32 * k);
        }
      }
    }
  }

  /**
   * Quantizes a float weight (bf16, f16 or f32 elements, row-major) into this q8_0 weight as
   * llama.cpp's quantize_row_q8_0_ref does (quantize_q8_0 in kernels/assembly/kernels.ts), a few MB
   * of rows at a time: `read(rowStart, target)` fills `target` with the weight's rows from
   * `rowStart` on, as stored (target.length / (cols * element size) rows), in a staging area of the
   * memory that will hold them, so the float weight is never held whole. Each thread quantizes its
   * own rows: in each round the main thread reads a piece for every worker, starts them, reads its
   * own piece while they work, then quantizes it.
   */
  quantizeFrom(handle: WeightHandle, source: 'bf16' | 'f16' | 'f32', read: (rowStart: number, target: Uint8Array) => void): void {
    this.usable();
    const w = this.weight(handle);
    if (w.dtype !== 'q8_0') throw new Error(`compute pool: weight ${w.name}: quantizeFrom() needs a q8_0 weight, not ${w.dtype}`);
    const inRow = w.cols * (source === 'f32' ? 4 : 2);
    const per = Math.max(4, Math.floor((4 << 20) / inRow / 4) * 4); // rows per piece, whole panels
    const panelBytes = (w.cols / 32) * Q8_PANEL_BLOCK;
    for (const s of w.shards) this.ensureIo(s.mem, align(Math.min(per, s.rowEnd - s.rowStart) * inRow));
    const next = w.shards.map((s) => s.rowStart); // each shard's first row not yet quantized
    for (;;) {
      const jobs: Job[] = [];
      let own: (() => void) | undefined;
      w.shards.forEach((s, i) => {
        const r = next[i];
        if (r >= s.rowEnd) return;
        const n = Math.min(per, s.rowEnd - r);
        next[i] = r + n;
        const fill = (): void => read(r, new Uint8Array(s.mem.memory.buffer, s.mem.ioStart, n * inRow));
        if (s.thread === 0) own = fill;
        else fill();
        jobs.push({
          thread: s.thread, mem: s.mem, kind: P.KIND_QUANTIZE, w: s.ptr + ((r - s.rowStart) / 4) * panelBytes, x: s.mem.ioStart, y: 0,
          rows: n, cols: w.cols, T: DTYPES[source].kind, scratch: 0,
        });
      });
      if (jobs.length === 0) return;
      this.run(jobs, own);
    }
  }

  /** write() for whole rows [rowStart, rowStart + bytes.length / rowBytes). */
  writeRows(handle: WeightHandle, rowStart: number, bytes: Uint8Array): void {
    if (bytes.length % handle.rowBytes !== 0) {
      throw new Error(`compute pool: weight ${handle.name}: ${bytes.length} bytes is not a whole number of ${handle.rowBytes}-byte rows`);
    }
    this.write(handle, rowStart * handle.rowBytes, bytes);
  }

  /** y = x W^T for T tokens: x [T, cols] float32 row-major in, y [T, rows] out (tf's x @ W^T). */
  matmul(handle: WeightHandle, x: Float32Array, T: number): Float32Array {
    return this.matmulMany([handle], x, T)[0];
  }

  /**
   * Several weights with the same input in one hand-off to the workers (q/k/v, or w1/w3): one
   * wake-up and one wait instead of one per weight. Returns one [T, rows] output per weight.
   */
  matmulMany(handles: readonly WeightHandle[], x: Float32Array, T: number): Float32Array[] {
    this.usable();
    const ws = handles.map((h) => this.weight(h));
    if (ws.length === 0) return [];
    const cols = ws[0].cols;
    for (const w of ws) {
      if (w.cols !== cols) throw new Error(`compute pool: matmulMany: weight ${w.name} has ${w.cols} columns, ${ws[0].name} ${cols}`);
    }
    if (!(Number.isInteger(T) && T >= 1) || x.length !== T * cols) {
      throw new Error(`compute pool: ${ws[0].name}: input of ${x.length} floats is not T=${T} tokens of ${cols}`);
    }
    const outs = ws.map((w) => new Float32Array(T * w.rows));
    // Per memory and token: x, the kernels' rearranged x (in their scratch), each shard's output.
    const perToken = new Map<Memory, number>();
    for (const w of ws) for (const s of w.shards) perToken.set(s.mem, (perToken.get(s.mem) ?? 2 * cols * 4) + (s.rowEnd - s.rowStart) * 4);
    const jobsPerThread = new Array<number>(this.threads).fill(0);
    for (const w of ws) for (const s of w.shards) jobsPerThread[s.thread]++;
    if (Math.max(...jobsPerThread) > P.MAX_JOBS) throw new Error(`compute pool: more than ${P.MAX_JOBS} weights in one call`);
    const chunk = Math.max(1, Math.min(T, Math.floor(IO_LIMIT / Math.max(...perToken.values()))));

    for (let t0 = 0; t0 < T; t0 += chunk) {
      const tc = Math.min(chunk, T - t0);
      const xs = x.subarray(t0 * cols, (t0 + tc) * cols);
      const jobs: Job[] = [];
      const placed = new Map<Memory, { x: number; next: number; scratch: number }>();
      for (const [mem, bytesPerToken] of perToken) {
        const scratchBytes = align((tc + 2) * cols * 4); // see `scratch` in kernels/assembly/kernels.ts
        this.ensureIo(mem, align(bytesPerToken * tc + ALIGN * (ws.length + 2)) + align(2 * cols * 4));
        const xPtr = mem.ioStart;
        new Float32Array(mem.memory.buffer, xPtr, tc * cols).set(xs);
        const scratch = xPtr + align(tc * cols * 4);
        placed.set(mem, { x: xPtr, scratch, next: scratch + scratchBytes });
      }
      for (const w of ws) {
        for (const s of w.shards) {
          const at = placed.get(s.mem)!;
          const y = at.next;
          at.next = align(y + tc * (s.rowEnd - s.rowStart) * 4);
          jobs.push({
            thread: s.thread, mem: s.mem, kind: DTYPES[w.dtype].kind, w: s.ptr, x: at.x, y,
            rows: s.rowEnd - s.rowStart, cols, T: tc, scratch: at.scratch,
          });
        }
      }
      this.run(jobs);
      let j = 0;
      ws.forEach((w, i) => {
        for (const s of w.shards) {
          const job = jobs[j++];
          const n = s.rowEnd - s.rowStart;
          const y = new Float32Array(s.mem.memory.buffer, job.y, tc * n);
          for (let t = 0; t < tc; t++) outs[i].set(y.subarray(t * n, (t + 1) * n), (t0 + t) * w.rows + s.rowStart);
        }
      });
    }
    return outs;
  }

  /**
   * Reads every byte of the given weights once, on all threads at once (each its own shards), with
   * a plain SIMD sum: the memory-read rate the products can at best reach. Returns the bytes read.
   */
  scan(handles: readonly WeightHandle[]): number {
    this.usable();
    const jobs: Job[] = [];
    let bytes = 0;
    for (const h of handles) {
      const w = this.weight(h);
      for (const s of w.shards) {
        const n = Math.floor(shardBytes(w.dtype, s.rowEnd - s.rowStart, w.cols, w.rowBytes) / 64) * 64;
        bytes += n;
        jobs.push({ thread: s.thread, mem: s.mem, kind: P.KIND_SCAN, w: s.ptr, x: 0, y: 0, rows: n, cols: 0, T: 0, scratch: 0 });
      }
    }
    // In rounds of at most MAX_JOBS jobs per thread (the control block's room).
    for (let done = 0; done < jobs.length; ) {
      const counts = new Array<number>(this.threads).fill(0);
      const round: Job[] = [];
      while (done < jobs.length && counts[jobs[done].thread] < P.MAX_JOBS) {
        counts[jobs[done].thread]++;
        round.push(jobs[done++]);
      }
      this.run(round);
    }
    return bytes;
  }

  /** How many wasm memories each thread holds. */
  memoryCounts(): number[] {
    return this.mems.map((ms) => ms.length);
  }

  /** Bytes of wasm memory per thread (all its memories), for leak checks and reports. */
  memoryBytes(): number[] {
    return this.mems.map((ms) => ms.reduce((sum, m) => sum + m.memory.buffer.byteLength, 0));
  }

  /** Stops the workers and waits until none is left; the pool cannot be used afterwards. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const sup = this.supervisor;
    if (sup === null) return;
    sup.ref();
    const exited = new Promise<void>((resolve) => sup.once('exit', () => resolve()));
    sup.postMessage('stop');
    Atomics.store(this.control, P.OP, P.OP_STOP);
    Atomics.add(this.control, P.SEQ, 1);
    Atomics.notify(this.control, P.SEQ);
    const timer = setTimeout(() => void sup.terminate(), 5000); // a worker stuck in a kernel
    await exited;
    clearTimeout(timer);
    for (const p of this.ports) p.close();
  }

  /**
   * Test hook: worker `index` (1..threads-1) is terminated (worker.terminate(), by the supervisor)
   * in the middle of the next product, which must then throw.
   */
  killWorkerDuringNextCall(index: number): void {
    Atomics.store(this.control, P.KILL, index);
  }

  // ---------------------------------------------------------------------------------------------

  private usable(): void {
    if (this.closed) throw new Error('compute pool: used after close()');
    if (this.fault !== null) throw new Error(this.fault);
  }

  private weight(handle: WeightHandle): Weight {
    const w = this.weights[handle.id];
    if (w === undefined || w.name !== handle.name) throw new Error(`compute pool: unknown weight ${handle.name}`);
    return w;
  }

  /** First row of `thread`'s range: rows split evenly, boundaries rounded to multiples of 4. */
  private boundary(rows: number, thread: number): number {
    if (thread >= this.threads) return rows;
    return Math.min(rows, 4 * Math.round((thread * rows) / this.threads / 4));
  }

  /** The memory of `thread` that takes `bytes` more weight bytes, opening a new one when full. */
  private memoryFor(thread: number, bytes: number): Memory {
    const ms = this.mems[thread];
    const last = ms[ms.length - 1];
    if (last !== undefined && last.top + bytes <= this.memoryLimit) return last;
    const memory = new WebAssembly.Memory({ initial: 1, maximum: MAX_PAGES, shared: true });
    const mem: Memory = { memory, index: ms.length, top: RESERVED, ioStart: RESERVED, ioBytes: 0 };
    if (thread === 0) {
      mem.kernels = new WebAssembly.Instance(this.module, { env: { memory } }).exports as unknown as Kernels;
    } else {
      this.ports[thread - 1].postMessage(memory);
      this.posted = true;
    }
    ms.push(mem);
    return mem;
  }

  /** Workers instantiate the kernels over the memories posted to them since the last call. */
  private shareMemories(): void {
    if (!this.posted) return;
    this.posted = false;
    this.dispatch(P.OP_TAKE_MEMORIES);
    this.await();
  }

  private grow(mem: Memory, end: number): void {
    const pages = Math.ceil(end / PAGE);
    const have = mem.memory.buffer.byteLength / PAGE;
    if (pages > MAX_PAGES) throw new Error(`compute pool: a memory would need ${end} bytes, past 4 GiB`);
    if (pages > have) {
      try {
        mem.memory.grow(pages - have);
      } catch (err) {
        throw new Error(`compute pool: cannot grow a memory to ${end} bytes: ${oneLine(err)}`);
      }
    }
  }

  private ensureIo(mem: Memory, bytes: number): void {
    if (mem.ioBytes >= bytes) return;
    mem.ioStart = mem.top;
    mem.ioBytes = bytes;
    this.grow(mem, mem.ioStart + bytes);
  }

  private dispatch(op: number): void {
    Atomics.store(this.control, P.OP, op);
    Atomics.store(this.control, P.PENDING, this.threads - 1);
    Atomics.add(this.control, P.SEQ, 1);
    Atomics.notify(this.control, P.SEQ);
  }

  /** Waits until every worker has finished the call, or one has failed (then throws). */
  private await(): void {
    for (;;) {
      if (Atomics.load(this.control, P.FAULT) !== 0) break;
      const pending = Atomics.load(this.control, P.PENDING);
      if (pending <= 0) break;
      Atomics.wait(this.control, P.PENDING, pending, 1000);
    }
    if (Atomics.load(this.control, P.FAULT) !== 0) {
      const len = Atomics.load(this.control, P.MSG_LEN);
      this.fault = `compute pool: ${Buffer.from(this.message.slice(0, len)).toString()}`;
      throw new Error(this.fault);
    }
  }

  /**
   * Runs the jobs: the workers' through the control block, the main thread's here, then waits.
   * `beforeOwn` runs once the workers are started, before the main thread's jobs; if it throws,
   * those are skipped and its error is rethrown as it is once the workers are done.
   */
  private run(jobs: Job[], beforeOwn?: () => void): void {
    const counts = new Array<number>(this.threads).fill(0);
    const u32 = this.controlU32;
    for (const job of jobs) {
      if (job.thread === 0) continue;
      if (counts[job.thread] === P.MAX_JOBS) throw new Error(`compute pool: more than ${P.MAX_JOBS} jobs for thread ${job.thread} in one call`);
      const base = P.JOBS + (job.thread - 1) * P.STRIDE;
      const o = base + 1 + counts[job.thread]++ * P.FIELDS;
      u32[o] = job.kind;
      u32[o + 1] = job.mem.index;
      u32[o + 2] = job.w;
      u32[o + 3] = job.x;
      u32[o + 4] = job.y;
      u32[o + 5] = job.rows;
      u32[o + 6] = job.cols;
      u32[o + 7] = job.T;
      u32[o + 8] = job.scratch;
    }
    for (let k = 1; k < this.threads; k++) u32[P.JOBS + (k - 1) * P.STRIDE] = counts[k];
    if (this.threads > 1) this.dispatch(P.OP_RUN);
    let error: unknown = null;
    let ownFailed = false;
    let ownError: unknown;
    try {
      beforeOwn?.();
    } catch (err) {
      [ownFailed, ownError] = [true, err];
    }
    try {
      for (const job of ownFailed ? [] : jobs) {
        if (job.thread !== 0) continue;
        P.runJob(job.mem.kernels!, job.kind, job.w, job.x, job.y, job.rows, job.cols, job.T, job.scratch);
      }
    } catch (err) {
      error = err;
    }
    if (this.threads > 1) this.await();
    if (ownFailed) throw ownError;
    if (error !== null) throw new Error(`compute pool: main thread: ${oneLine(error)}`);
  }
}

function oneLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0];
}
