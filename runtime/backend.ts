/**
 * Choosing the TensorFlow.js backend the model runs on.
 *
 * The design's first choice is `@tensorflow/tfjs-node-gpu` (CUDA), then the CPU-native
 * `@tensorflow/tfjs-node`. Both are optionalDependencies: their install step downloads
 * libtensorflow, and where that fails npm skips them. Then WebAssembly
 * (`@tensorflow/tfjs-backend-wasm`: XNNPACK, SIMD, one thread in Node, at most 4 GiB of memory)
 * and last the pure-JavaScript `cpu` backend. The first that loads wins, unless `--backend NAME`
 * or `MISTRAL_BACKEND=NAME` forces one.
 */
import * as os from 'os';
import * as tf from '@tensorflow/tfjs-core';

export const BACKENDS = ['node-gpu', 'node', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

/** The wasm backend addresses memory with 32 bits: 4 GiB is all it can ever hold. */
export const WASM_MEMORY_LIMIT_BYTES = 4 * 1024 ** 3;

export class BackendError extends Error {
  override name = 'BackendError';
}

export function isBackendName(name: string): name is BackendName {
  return (BACKENDS as readonly string[]).includes(name);
}

/** Loads the package behind `name` and makes it tfjs's backend; false when it cannot load. */
async function tryBackend(name: BackendName): Promise<boolean> {
  try {
    switch (name) {
      case 'node-gpu':
        require('@tensorflow/tfjs-node-gpu'); // registers the 'tensorflow' backend (CUDA)
        return await tf.setBackend('tensorflow');
      case 'node':
        require('@tensorflow/tfjs-node'); // registers the 'tensorflow' backend (CPU)
        return await tf.setBackend('tensorflow');
      case 'wasm':
        require('@tensorflow/tfjs-backend-wasm');
        return await tf.setBackend('wasm');
      case 'cpu':
        require('@tensorflow/tfjs-backend-cpu');
        return await tf.setBackend('cpu');
    }
  } catch {
    return false;
  }
}

let chosen: BackendName | undefined;

/**
 * Sets up tfjs on the requested backend (or the first that loads) and returns its name.
 * Prints `backend: NAME` on stderr unless `quiet`.
 */
export async function initBackend(requested?: string, opts: { quiet?: boolean } = {}): Promise<BackendName> {
  const wanted = requested ?? process.env.MISTRAL_BACKEND ?? undefined;
  if (wanted !== undefined && wanted !== '' && !isBackendName(wanted)) {
    throw new BackendError(`unknown backend "${wanted}": expected one of ${BACKENDS.join(', ')}`);
  }
  const candidates: readonly BackendName[] = wanted ? [wanted as BackendName] : BACKENDS;
  if (chosen !== undefined && candidates.includes(chosen)) return chosen;
  for (const name of candidates) {
    if (await tryBackend(name)) {
      await tf.ready();
      chosen = name;
      if (!opts.quiet) process.stderr.write(`backend: ${name}\n`);
      return name;
    }
  }
  throw new BackendError(
    wanted
      ? `backend "${wanted}" could not be loaded (is its package installed?)`
      : 'no TensorFlow.js backend could be loaded',
  );
}

/** The backend in use, by this project's name for it. */
export function currentBackend(): BackendName | undefined {
  if (chosen !== undefined) return chosen;
  const name = tf.getBackend();
  return name === 'wasm' || name === 'cpu' ? name : undefined;
}

/**
 * How many bytes of tensors the backend can hold, to choose low-memory mode and to fail early and
 * clearly instead of with "memory access out of bounds" from deep inside the wasm module.
 * wasm: 4 GiB. node and cpu keep tensors in host memory: the machine's RAM. node-gpu: unknown
 * (tfjs does not report the GPU's memory), so undefined; force low-memory mode with the flag.
 */
export function backendMemoryLimit(): number | undefined {
  switch (currentBackend() ?? tf.getBackend()) {
    case 'wasm':
      return WASM_MEMORY_LIMIT_BYTES;
    case 'node':
    case 'cpu':
      return os.totalmem();
    default:
      return undefined;
  }
}

/** Turns the wasm backend's out-of-memory failures into one clear line. */
export function explainBackendFailure(err: unknown): Error {
  const message = err instanceof Error ? err.message : String(err);
  if (/memory access out of bounds|Cannot enlarge memory|out of memory|Aborted\(/i.test(message)) {
    return new BackendError(
      `the ${currentBackend() ?? tf.getBackend()} backend ran out of memory (${message.split('\n')[0]}); ` +
        'the wasm backend holds at most 4 GiB: use a smaller batch or a native backend',
    );
  }
  return err instanceof Error ? err : new Error(message);
}

/**
 * What the model needs to know about the backend in use, asked here rather than by comparing
 * backend names in model/: whether it copies a host array into its own memory when a tensor is
 * made (so one host buffer may be reused for the next tensor), and whether its matMul keeps a
 * packed copy of the right operand (XNNPACK on wasm: a resident weight costs twice its bytes).
 */
export function backendTraits(): { copiesHostArrays: boolean; packsRightOperand: boolean } {
  const wasm = (currentBackend() ?? tf.getBackend()) === 'wasm';
  return { copiesHostArrays: wasm, packsRightOperand: wasm };
}
