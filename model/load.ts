/**
 * Loading, as torch's load_state_dict(strict=True) and one_file_ref.py's from_folder do it, plus
 * what Python does not need: the memory plan. Every key present, none extra, every shape right, all
 * checked before a single weight is read; then the choice of low-memory mode when the float32
 * weights would not fit the backend. Nothing here prints: it returns what it decided, and the
 * caller reports it.
 */
import { BYTES_PER_ELEMENT, type WeightInfo, type WeightReader } from '../checkpoint/types';
import type { ComputePool, WeightHandle } from '../kernels/pool';
import { backendMemoryLimit, backendTraits, BackendError } from '../runtime/backend';
import { MAX_POSITIONS, validateParams } from './params';
import { armTestHooks, choosePool, fuseGroups, POOL_DTYPE, PooledMatrix, startPool, type PoolLease, type PoolMode } from './pooled';
import { Weight, type StateDict } from './weights';

/** The hyperparameters the weights' shapes depend on (ModelArgs has them). */
export interface ModelShape {
  readonly dim: number;
  readonly nLayers: number;
  readonly headDim: number;
  readonly hiddenDim: number;
  readonly nHeads: number;
  readonly nKvHeads: number;
  readonly slidingWindow: number;
  readonly vocabSize: number;
}

export class CheckpointMismatchError extends Error {
  override name = 'CheckpointMismatchError';
}

export interface LoadOptions {
  /** Rows of the KV cache, the largest batch forward() accepts (default 1). */
  maxBatchSize?: number;
  /**
   * Keep the layers' weights on the host as stored and widen each to float32 only while it runs.
   * 'auto' (the default) turns it on when the float32 weights would not fit the backend.
   */
  lowMemory?: boolean | 'auto';
  /** Called as weights are read, with the checkpoint's bytes read so far and in all. */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  /** Told what loading decided (low-memory mode and why); by default one_file_ref.ts writes it on stderr. */
  onDecision?: (line: string) => void;
  /**
   * The compute pool (model/pooled.ts) for the layer and output matrices: 'auto' (the default) when
   * the float32 weights would not fit the backend. Started by withComputePool(), which loadModel
   * and fromFolder call; fromCheckpoint alone uses a pool only when `computePool` holds one.
   */
  pool?: PoolMode;
  /** The pool's threads, the main thread included (default: the machine's cores). */
  threads?: number;
  /**
   * 'q8_0': the layer and output matrices quantized while loading to llama.cpp's Q8_0 (int8 in
   * blocks of 32 with an f16 scale, as llama.cpp's quantize_row_q8_0_ref), straight into the
   * compute pool, which multiplies them with int16-quantized inputs. Implies the pool. The
   * embedding table stays as stored (widened to float32, as always). Q8_0 tensors of a GGUF file
   * go to the pool as they are, with or without this option, whenever the pool runs.
   */
  quantize?: 'q8_0';
  /** Set by withComputePool(): the started pool, or null when the tfjs path runs. */
  computePool?: PoolLease | null;
  /** Set by withComputePool(): why that path, for the decision line. */
  poolReason?: string;
}

/** Why `--quantize q8_0` cannot run with these options (it needs the compute pool), or null when it can. */
export function quantizeConflict(pool: PoolMode, lowMemory: boolean): string | null {
  if (pool === 'off') return '--quantize q8_0 runs on the compute pool: it cannot be used with --pool off';
  if (lowMemory) return '--quantize q8_0 runs on the compute pool: it cannot be used with --low-memory';
  return null;
}

/**
 * Decides whether the compute pool runs for this model and starts it: `opts` with `computePool`
 * set. 'auto' falls back to tfjs with a note when the pool cannot start; 'on' fails with one line.
 */
export async function withComputePool(params: unknown, paramsFile: string, opts: LoadOptions): Promise<LoadOptions> {
  if (opts.computePool !== undefined) return opts;
  const p = validateParams(params, paramsFile);
  const shape: ModelShape = {
    dim: p.dim, nLayers: p.n_layers, headDim: p.head_dim, hiddenDim: p.hidden_dim, nHeads: p.n_heads,
    nKvHeads: p.n_kv_heads, slidingWindow: p.sliding_window, vocabSize: p.vocab_size,
  };
  let needsLowMemory = true;
  try {
    needsLowMemory = chooseLowMemory(shape, 'auto', paramsFile).lowMemory;
  } catch {
    // does not fit even in low-memory mode: the pool may still hold it
  }
  const mode = opts.pool ?? 'auto';
  if (opts.quantize === 'q8_0') {
    const conflict = quantizeConflict(mode, opts.lowMemory === true);
    if (conflict !== null) throw new Error(conflict);
    return { ...opts, computePool: await startPool(opts.threads), poolReason: '--quantize q8_0' };
  }
  const { use, why } = choosePool({ mode, threads: opts.threads }, needsLowMemory, opts.lowMemory === true);
  if (!use) return { ...opts, computePool: null, poolReason: why };
  try {
    return { ...opts, computePool: await startPool(opts.threads), poolReason: why };
  } catch (err) {
    if (mode === 'on') throw err;
    const line = (err instanceof Error ? err.message : String(err)).split('\n')[0];
    return { ...opts, computePool: null, poolReason: `${line}; falling back to tfjs` };
  }
}

/** Every weight of consolidated.00.pth with its shape, as the reference's modules declare them. */
export function stateDictShapes(args: ModelShape): Map<string, number[]> {
  const { dim, headDim, hiddenDim, nHeads, nKvHeads, vocabSize } = args;
  const shapes = new Map<string, number[]>();
  shapes.set('tok_embeddings.weight', [vocabSize, dim]); // [V, D]
  for (let i = 0; i < args.nLayers; i++) {
    const p = `layers.${i}`;
    shapes.set(`${p}.attention.wq.weight`, [nHeads * headDim, dim]); // [H*d, D]
    shapes.set(`${p}.attention.wk.weight`, [nKvHeads * headDim, dim]); // [K*d, D]
    shapes.set(`${p}.attention.wv.weight`, [nKvHeads * headDim, dim]); // [K*d, D]
    shapes.set(`${p}.attention.wo.weight`, [dim, nHeads * headDim]); // [D, H*d]
    shapes.set(`${p}.feed_forward.w1.weight`, [hiddenDim, dim]); // [F, D]
    shapes.set(`${p}.feed_forward.w2.weight`, [dim, hiddenDim]); // [D, F]
    shapes.set(`${p}.feed_forward.w3.weight`, [hiddenDim, dim]); // [F, D]
    shapes.set(`${p}.attention_norm.weight`, [dim]); // [D]
    shapes.set(`${p}.ffn_norm.weight`, [dim]); // [D]
  }
  shapes.set('norm.weight', [dim]); // [D]
  shapes.set('output.weight', [vocabSize, dim]); // [V, D]
  return shapes;
}

/** load_state_dict(strict=True)'s checks, with one-line errors naming the file and the weight. */
export function checkStateDict(file: string, expected: Map<string, number[]>, found: ReadonlyMap<string, { shape: number[] }>): void {
  for (const [name, shape] of expected) {
    const record = found.get(name);
    if (record === undefined) throw new CheckpointMismatchError(`${file}: missing weight "${name}" (params.json expects it)`);
    if (record.shape.length !== shape.length || record.shape.some((n, i) => n !== shape[i])) {
      throw new CheckpointMismatchError(`${file}: weight "${name}" has shape [${record.shape}], params.json implies [${shape}]`);
    }
  }
  for (const name of found.keys()) {
    if (!expected.has(name)) throw new CheckpointMismatchError(`${file}: unexpected weight "${name}" (not in a model of this params.json)`);
  }
}

/**
 * Bytes of float32 tensors the backend must hold, with all weights resident or with one layer
 * weight at a time, plus the rotary tables and one batch row of KV cache at the full window (the
 * cache grows with use; more rows or positions than fit fail later with a clear out-of-memory error).
 */
export function residentBytes(args: ModelShape): { full: number; lowMemory: number } {
  const numel = (shape: number[]): number => shape.reduce((a, b) => a * b, 1);
  let layers = 0;
  let others = 0;
  let largestLayerWeight = 0;
  for (const [name, shape] of stateDictShapes(args)) {
    if (name.startsWith('layers.')) {
      layers += numel(shape);
      largestLayerWeight = Math.max(largestLayerWeight, numel(shape));
    } else {
      others += numel(shape);
    }
  }
  const cache = 2 * args.nLayers * args.slidingWindow * args.nKvHeads * args.headDim;
  const rope = MAX_POSITIONS * args.headDim;
  return { full: 4 * (others + layers + cache + rope), lowMemory: 4 * (others + largestLayerWeight + cache + rope) };
}

const isLinear = (name: string, shape: number[]): boolean => shape.length === 2 && name !== 'tok_embeddings.weight';

/** Whether to run in low-memory mode, and the line that says why when 'auto' chose it. */
export function chooseLowMemory(args: ModelShape, wanted: boolean | 'auto', source: string): { lowMemory: boolean; decision?: string } {
  const limit = backendMemoryLimit();
  const bytes = residentBytes(args);
  const gib = (n: number): string => `${(n / 1024 ** 3).toFixed(1)} GiB`;
  const fits = (n: number): boolean => limit === undefined || n <= 0.9 * limit;
  // A backend that packs the right operand of matMul (XNNPACK) also keeps a copy of every resident linear weight.
  let packedLayers = 0;
  let packedOthers = 0;
  if (backendTraits().packsRightOperand) {
    for (const [name, shape] of stateDictShapes(args)) {
      if (!isLinear(name, shape)) continue;
      if (name.startsWith('layers.')) packedLayers += 4 * shape[0] * shape[1];
      else packedOthers += 4 * shape[0] * shape[1];
    }
  }
  const full = bytes.full + packedLayers + packedOthers;
  const lowMemory = wanted === 'auto' ? !fits(full) : wanted;
  const need = lowMemory ? bytes.lowMemory + packedOthers : full;
  if (!fits(need)) {
    throw new BackendError(
      `${source}: the model needs ${gib(need)} of float32 tensors${lowMemory ? ' even in low-memory mode' : ''}, ` +
        `more than the backend's ${gib(limit!)}; use a native backend on a machine with more memory`,
    );
  }
  const decision = wanted === 'auto' && lowMemory
    ? `low-memory mode: float32 weights need ${gib(full)}, the backend holds ${gib(limit!)}; ` +
      'layers stay on the host as stored and are widened to float32 one weight at a time'
    : undefined;
  return { lowMemory, decision };
}

/**
 * The state dict from a checkpoint, checked against the shapes params.json implies: layer weights
 * on the host in low-memory mode, linear weights held transposed (model/weights.ts), the rest resident.
 */
export function loadStateDict(args: ModelShape, checkpoint: WeightReader, opts: LoadOptions): { stateDict: StateDict; decision?: string } {
  const expected = stateDictShapes(args);
  const lease = opts.computePool ?? null;
  if (opts.quantize === 'q8_0' && lease === null) {
    throw new Error('quantize q8_0 runs on the compute pool: load through Transformer.fromFolder or loadModel (withComputePool), not with computePool null');
  }
  try {
    checkStateDict(checkpoint.path, expected, checkpoint.tensors);
  } catch (err) {
    void lease?.close();
    throw err;
  }
  if (lease !== null) return loadIntoPool(checkpoint, lease, expected, opts.poolReason ?? '', opts.quantize === 'q8_0');
  const chosen = chooseLowMemory(args, opts.lowMemory ?? 'auto', checkpoint.path);
  const { lowMemory } = chosen;
  const why = opts.poolReason;
  const decision = chosen.decision !== undefined
    ? `${chosen.decision}${why !== undefined ? ` (compute pool not used: ${why})` : ''}`
    : why !== undefined ? `matrix products on tfjs: ${why}` : undefined;
  const stateDict: StateDict = new Map();
  for (const [name, shape] of expected) {
    const info = checkpoint.tensors.get(name) as WeightInfo;
    const w = lowMemory && name.startsWith('layers.')
      ? Weight.onHost(checkpoint.readRaw(name), name)
      : isLinear(name, shape)
        ? Weight.residentLinear(checkpoint.read(name), shape as [number, number], name, info.dtype)
        : Weight.resident(checkpoint.read(name), shape, name, info.dtype);
    stateDict.set(name, w);
  }
  return { stateDict, decision };
}

/**
 * The state dict with every linear weight but the embedding in the compute pool, read from the
 * checkpoint straight into the pool threads' memories (readRawInto: at its offset in the file, or
 * from the .tar's stream); a reader without it hands over one weight as stored at a time. The
 * embedding table and the norms are float32 tensors as usual.
 */
function loadIntoPool(
  checkpoint: WeightReader, lease: PoolLease, expected: Map<string, number[]>, why: string, quantize: boolean,
): { stateDict: StateDict; decision: string } {
  const stateDict: StateDict = new Map();
  const pooled = new Map<string, PooledMatrix>();
  let bytes = 0;
  let quantized = 0;
  const dtypes = new Set<string>();
  try {
    for (const [name, shape] of expected) {
      const info = checkpoint.tensors.get(name) as WeightInfo;
      if (!isLinear(name, shape)) {
        stateDict.set(name, Weight.resident(checkpoint.read(name), shape, name, info.dtype));
        continue;
      }
      const [rows, cols] = shape;
      const asQ8 = info.q8_0 === true && checkpoint.readQ8_0Blocks !== undefined;
      const toQ8 = !asQ8 && quantize && cols % 32 === 0;
      const handle = lease.pool.addWeight(name, rows, cols, asQ8 || toQ8 ? 'q8_0' : POOL_DTYPE[info.dtype]);
      if (asQ8) {
        lease.pool.writeRows(handle, 0, checkpoint.readQ8_0Blocks!(name));
      } else if (toQ8) {
        quantizeIntoPool(checkpoint, name, info, lease.pool, handle);
        quantized++;
      } else if (checkpoint.readRawInto) {
        for (const t of lease.pool.targets(handle)) checkpoint.readRawInto(name, t.byteStart, t.bytes);
      } else {
        const { data } = checkpoint.readRaw(name);
        lease.pool.write(handle, 0, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      }
      const m = new PooledMatrix(lease, handle);
      pooled.set(name, m);
      stateDict.set(name, Weight.inPool(m, [rows, cols], name, info.dtype));
      bytes += rows * handle.rowBytes;
      dtypes.add(handle.dtype);
    }
  } catch (err) {
    for (const w of stateDict.values()) w.dispose();
    void lease.close();
    throw err;
  }
  fuseGroups(pooled);
  armTestHooks(lease);
  const size = bytes >= 1e9 ? `${(bytes / 1e9).toFixed(1)} GB` : `${(bytes / 1e6).toFixed(1)} MB`;
  return {
    stateDict,
    decision: `compute pool: ${lease.pool.threads === 1 ? '1 thread multiplies' : `${lease.pool.threads} threads multiply`} the layer and output weights ` +
      `${quantized === pooled.size ? 'quantized while loading' : quantized > 0 ? 'as stored or quantized while loading' : 'as stored'} (${[...dtypes].join('/')}, ${size}) (${why}); tfjs runs the rest`,
  };
}

/**
 * `--quantize q8_0`: weight `name` quantized by the pool as llama.cpp's quantize_row_q8_0_ref does,
 * read a few MB of rows at a time straight into the pool's staging memory: no whole float copy.
 */
function quantizeIntoPool(checkpoint: WeightReader, name: string, info: WeightInfo, pool: ComputePool, handle: WeightHandle): void {
  const size = BYTES_PER_ELEMENT[info.dtype];
  const rowBytes = handle.cols * size;
  const raw = checkpoint.readRawInto ? null : checkpoint.readRaw(name).data;
  const bytes = raw === null ? null : new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
  pool.quantizeFrom(handle, POOL_DTYPE[info.dtype] as 'bf16' | 'f16' | 'f32', (rowStart, target) => {
    if (bytes === null) checkpoint.readRawInto!(name, rowStart * rowBytes, target);
    else target.set(bytes.subarray(rowStart * rowBytes, rowStart * rowBytes + target.length));
  });
}
