/**
 * Weights in the compute pool (kernels/pool.ts): the layers' matrices and the output matrix held as
 * the checkpoint stores them (bf16 for Mistral 7B) in the pool threads' wasm memories, multiplied
 * there by the SIMD kernels; tfjs keeps the embeddings, norms, rotary, attention and cache.
 *
 * When it runs (`choosePool`): 'on' always; 'off' never; 'auto' (the default) when the float32
 * weights would not fit the backend (Mistral 7B on wasm: this replaces low-memory mode's widening of
 * every weight at every token), never on a native backend, and not for a model that fits (the small
 * model measured no faster on the pool on the project's 2-core machine: README "Speed").
 *
 * Lifecycle: the pool lives as long as the weights in it. Each pooled Weight holds a lease;
 * disposing the last one (Transformer.dispose()) closes the pool, and `closeComputePools()` awaits
 * every close (the CLI calls it before exiting, and on SIGINT/SIGTERM).
 */
import { ComputePool, type WeightDtype as PoolDtype, type WeightHandle } from '../kernels/pool';
import type { WeightDtype } from '../checkpoint/types';
import { currentBackend } from '../runtime/backend';

export type PoolMode = 'on' | 'off' | 'auto';

export const POOL_DTYPE: Readonly<Record<WeightDtype, PoolDtype>> = { bfloat16: 'bf16', float16: 'f16', float32: 'f32' };

/** A started pool shared by the weights placed in it; closed when the last of them is disposed. */
export class PoolLease {
  private refs = 0;
  private closing: Promise<void> | null = null;

  constructor(readonly pool: ComputePool) {
    live.add(this);
  }

  acquire(): void {
    this.refs++;
  }

  release(): void {
    if (--this.refs <= 0) void this.close();
  }

  /** Closes the pool (idempotent); resolves once no worker is left. */
  close(): Promise<void> {
    if (this.closing === null) this.closing = this.pool.close().finally(() => live.delete(this));
    return this.closing;
  }
}

const live = new Set<PoolLease>();

/** Closes every pool still open and waits until their workers are gone (command end, Ctrl-C, server stop). */
export async function closeComputePools(): Promise<void> {
  await Promise.all([...live].map((lease) => lease.close()));
}

/**
 * Fused products: the weights that multiply the same input one after the other in a forward (q, k
 * and v; w1 and w3) form a group. The first product of a group runs all of it in one hand-off to
 * the pool's threads (matmulMany) and keeps the others' outputs, keyed by the input tensor's id
 * (tensors are immutable, ids never reused), for the calls that follow right after.
 */
export class FusedGroup {
  readonly members: PooledMatrix[] = [];
  private inputId = -1;
  private outputs = new Map<PooledMatrix, Float32Array>();

  product(m: PooledMatrix, inputId: number, x: () => Float32Array, T: number): Float32Array {
    const kept = this.inputId === inputId ? this.outputs.get(m) : undefined;
    if (kept !== undefined) {
      this.outputs.delete(m);
      return kept;
    }
    const ys = m.lease.pool.matmulMany(this.members.map((w) => w.handle), x(), T);
    this.inputId = inputId;
    this.outputs = new Map(this.members.map((w, i) => [w, ys[i]]));
    this.outputs.delete(m);
    return ys[this.members.indexOf(m)];
  }
}

/** One weight's place in the pool. */
export class PooledMatrix {
  group: FusedGroup | null = null;

  constructor(readonly lease: PoolLease, readonly handle: WeightHandle) {
    lease.acquire();
  }

  /** y [T, rows] = x [T, cols] W^T; `inputId` identifies x for the fused group. */
  matmul(inputId: number, x: () => Float32Array, T: number): Float32Array {
    if (this.group !== null && this.group.members.length > 1) return this.group.product(this, inputId, x, T);
    return this.lease.pool.matmul(this.handle, x(), T);
  }

  release(): void {
    this.lease.release();
  }
}

/** Groups pooled weights that take the same input (by name): q/k/v and w1/w3 of each layer. */
export function fuseGroups(pooled: Map<string, PooledMatrix>): void {
  const groups = new Map<string, FusedGroup>();
  for (const [name, m] of pooled) {
    const match = /^(layers\.\d+)\.(attention\.w[qkv]|feed_forward\.w[13])\.weight$/.exec(name);
    if (match === null) continue;
    const key = `${match[1]}.${match[2].startsWith('attention') ? 'qkv' : 'w13'}`;
    let g = groups.get(key);
    if (g === undefined) groups.set(key, (g = new FusedGroup()));
    g.members.push(m);
    m.group = g;
  }
}

/** What the caller asked for: --pool on|off|auto and --threads N. */
export interface PoolRequest {
  mode: PoolMode;
  threads?: number;
}

/**
 * Whether the pool runs, and why, before anything is loaded. `needsLowMemory` tells whether the
 * float32 weights fit the backend (model/load.ts decides it).
 */
export function choosePool(req: PoolRequest, needsLowMemory: boolean, lowMemoryForced: boolean): { use: boolean; why: string } {
  if (req.mode === 'on') return { use: true, why: '--pool on' };
  if (req.mode === 'off') return { use: false, why: '--pool off' };
  const backend = currentBackend();
  if (backend === 'node' || backend === 'node-gpu') return { use: false, why: `the native ${backend} backend keeps its own path` };
  if (lowMemoryForced) return { use: false, why: '--low-memory' };
  if (needsLowMemory) return { use: true, why: 'the float32 weights would not fit the backend' };
  return { use: false, why: 'the float32 weights fit the backend (--pool on to use the compute pool)' };
}

export async function startPool(threads: number | undefined): Promise<PoolLease> {
  return new PoolLease(await ComputePool.start({ threads }));
}

/** Test hook for the CLI's fault test: MISTRAL_TEST_KILL_POOL_WORKER=k kills worker k in the first product after loading. */
export function armTestHooks(lease: PoolLease): void {
  const kill = Number(process.env.MISTRAL_TEST_KILL_POOL_WORKER ?? 0);
  if (kill > 0) lease.pool.killWorkerDuringNextCall(kill);
}
