/**
 * The model's weights and nn.Linear: what one_file_ref.py gets from torch's nn.Linear and
 * load_state_dict. `linear(x, w)` is the one function through which every product of an
 * activation with a weight goes (q, k, v, o, w1, w2, w3 and the output projection): a faster
 * kernel plugs in there, and it knows each weight's name, shape and stored dtype.
 *
 * Performance (README "Speed" has the figures): the wasm backend runs matMul through XNNPACK only
 * when neither operand is transposed (else a plain loop, 5 to 40 times slower) and packs the right
 * operand once per tensor. So a resident weight is held transposed, [in, out], and multiplied as
 * x W^T with no transposed operand, packed once at load; a low-memory weight is a fresh tensor at
 * every use and is multiplied as (W x^T)^T, which packs only the small x^T. Both sum each output
 * over `in` in the same order, so they give the same bits.
 */
import * as tf from '@tensorflow/tfjs-core';
import { widen16 } from '../checkpoint/dtypes';
import type { RawTensor, WeightDtype } from '../checkpoint/types';
import { backendTraits } from '../runtime/backend';
import type { PooledMatrix } from './pooled';

/**
 * A weight of the model. Normally a float32 tensor, loaded once. In low-memory mode (for models
 * whose float32 weights do not fit the backend) the layers' weights stay on the host as the
 * checkpoint stores them (bf16 for Mistral 7B), and each use widens one to a float32 tensor inside
 * the caller's tf.tidy, which frees it again: the backend holds one layer weight at a time. On the
 * compute pool (model/pooled.ts) a linear weight lives as stored in the pool threads' memories and
 * has no tensor at all: linear() hands x to the pool.
 */
export class Weight {
  private constructor(
    /** Its name in consolidated.00.pth, e.g. "layers.0.attention.wq.weight". */
    readonly name: string,
    /** As stored: [out, in] for a linear weight. */
    readonly shape: number[],
    /** The checkpoint's dtype (computation is float32 whatever it is). */
    readonly dtype: WeightDtype,
    private readonly resident: tf.Tensor | null,
    private readonly host: RawTensor | null,
    /** A resident linear weight, transposed once at load: [in, out]. */
    readonly transposed: tf.Tensor2D | null = null,
    /** A linear weight held in the compute pool as stored (model/pooled.ts); linear() multiplies it there. */
    readonly pooled: PooledMatrix | null = null,
  ) {}

  static resident(data: Float32Array, shape: number[], name = '', dtype: WeightDtype = 'float32'): Weight {
    return new Weight(name, shape, dtype, tf.tensor(data, shape, 'float32'), null);
  }

  /** A resident nn.Linear weight [out, in], held as [in, out]. */
  static residentLinear(data: Float32Array, shape: [number, number], name = '', dtype: WeightDtype = 'float32'): Weight {
    const transposed = tf.tidy(() => tf.transpose(tf.tensor2d(data, shape, 'float32')));
    // One product now, so that XNNPACK packs the weight while loading rather than in the first forward.
    tf.tidy(() => {
      tf.matMul(tf.zeros([1, shape[1]]), transposed);
    });
    return new Weight(name, shape, dtype, null, null, transposed);
  }

  static onHost(raw: RawTensor, name = ''): Weight {
    return new Weight(name, raw.shape, raw.dtype, null, raw);
  }

  /** A linear weight [out, in] in the compute pool; it has no tensor(). */
  static inPool(matrix: PooledMatrix, shape: [number, number], name: string, dtype: WeightDtype): Weight {
    return new Weight(name, shape, dtype, null, null, null, matrix);
  }

  /**
   * The float32 tensor as stored; a fresh one, owned by the enclosing tf.tidy, in low-memory mode
   * and for a linear weight held transposed.
   */
  tensor(): tf.Tensor {
    if (this.resident) return this.resident;
    if (this.transposed) return tf.transpose(this.transposed);
    if (this.pooled) throw new Error(`weight ${this.name} lives in the compute pool: only linear() multiplies it`);
    return tf.tensor(widenOnHost(this.host!), this.shape, 'float32');
  }

  dispose(): void {
    this.resident?.dispose();
    this.transposed?.dispose();
    this.pooled?.release();
  }
}

/**
 * A 16-bit weight widened to float32 in one reused host buffer, which the backend copies from when
 * it makes the tensor. (A fresh array per use costs more than the widening itself: the pages of a
 * new 235 MB array, Mistral 7B's w1, take about 0.8 s to fault in; widening into them, 0.06 s.)
 * Backends that may keep the array instead of copying it get a fresh one.
 */
let widenBuffer = new Float32Array(0);
function widenOnHost(raw: RawTensor): Float32Array {
  if (raw.dtype === 'float32') return raw.data as Float32Array;
  const n = raw.data.length;
  const reuse = backendTraits().copiesHostArrays;
  if (reuse && widenBuffer.length < n) widenBuffer = new Float32Array(n);
  const out = reuse ? widenBuffer.subarray(0, n) : new Float32Array(n);
  widen16(raw.dtype, raw.data as Uint16Array, out);
  return out;
}

/** The model's weights by their names in consolidated.00.pth. */
export type StateDict = Map<string, Weight>;

export function weight(stateDict: StateDict, name: string): Weight {
  const w = stateDict.get(name);
  if (w === undefined) throw new Error(`state dict has no "${name}"`);
  return w;
}

/** nn.Linear without bias: y = x W^T, with W stored as torch stores it, [out, in]. x: [..., in] -> [..., out]. */
export function linear(x: tf.Tensor, w: Weight): tf.Tensor {
  return tf.tidy(() => {
    const [outFeatures, inFeatures] = w.shape as [number, number];
    const lead = x.shape.slice(0, -1);
    if (w.pooled) {
      // The compute pool: x read back (float32, [N, in]), y = x W^T by the pool's threads, y back in.
      const n = x.size / inFeatures;
      return tf.tensor(w.pooled.matmul(x.id, () => x.dataSync() as Float32Array, n), [...lead, outFeatures], 'float32');
    }
    const x2d = tf.reshape(x, [-1, inFeatures]) as tf.Tensor2D; // [N, in]
    const y = w.transposed
      ? tf.matMul(x2d, w.transposed) // [N, in] @ [in, out] -> [N, out]
      : tf.transpose(tf.matMul(w.tensor() as tf.Tensor2D, tf.transpose(x2d))); // ([out, in] @ [in, N])^T
    return tf.reshape(y, [...lead, outFeatures]);
  });
}
