/**
 * Mistral 7B in one TypeScript file: a section-by-section port of mistral-src's `one_file_ref.py`
 * (commit c18d5b9, as released with Mistral 7B v0.1, September 2023) on TensorFlow.js tensors.
 *
 * Read it top to bottom beside the Python: ModelArgs, repeatKV, the rotary embeddings, Attention
 * with its rolling KV cache, FeedForward, RMSNorm, TransformerBlock, Transformer, Tokenizer,
 * generate and demo come in the same order and under the same names (in camelCase). What Python
 * gets for free from torch lives in folders of its own: reading the `.pth` checkpoint in
 * `checkpoint/`, SentencePiece in `tokenizer/`, the choice of tfjs backend in `runtime/`, and the
 * command line in `cli/`.
 *
 * Shapes: B = batch size, T = tokens in this forward, D = dim, H = n_heads, K = n_kv_heads,
 * d = head_dim, F = hidden_dim, V = vocab_size, W = sliding_window, C = keys attended to.
 *
 * Every function that makes tensors either runs inside `tf.tidy` or hands its result to a caller
 * who disposes it: the tensor count after a call is the tensor count before it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { openModel, type TokenizerSource } from './checkpoint';
import { SentencePieceProcessor } from './tokenizer';
import { widen16 } from './checkpoint/dtypes';
import type { RawTensor, WeightReader } from './checkpoint/types';
import { backendMemoryLimit, explainBackendFailure, BackendError } from './runtime/backend';

// ----------------------------------------------------------------------------------------------
// ModelArgs: the hyperparameters, read from params.json

export class ModelArgsError extends Error {
  override name = 'ModelArgsError';
}

/** params.json's fields, as the reference's dataclass names them, and whether each is an integer. */
const PARAMS_FIELDS = {
  dim: 'int',
  n_layers: 'int',
  head_dim: 'int',
  hidden_dim: 'int',
  n_heads: 'int',
  n_kv_heads: 'int',
  sliding_window: 'int',
  norm_eps: 'float',
  vocab_size: 'int',
} as const;

export class ModelArgs {
  constructor(
    readonly dim: number,
    readonly nLayers: number,
    readonly headDim: number,
    readonly hiddenDim: number,
    readonly nHeads: number,
    readonly nKvHeads: number,
    readonly slidingWindow: number,
    readonly normEps: number,
    readonly vocabSize: number,
    /** Not in v0.1's params.json, which used 10000; later releases write it. */
    readonly ropeTheta: number = 10000,
    public maxBatchSize: number = 0,
  ) {}

  /** Validates a parsed params.json; `file` names it in errors. */
  static fromParams(params: unknown, file = 'params.json'): ModelArgs {
    if (typeof params !== 'object' || params === null || Array.isArray(params)) {
      throw new ModelArgsError(`${file}: expected a JSON object of model hyperparameters`);
    }
    const p = params as Record<string, unknown>;
    const field = (name: string, kind: 'int' | 'float', fallback?: number): number => {
      const v = p[name] ?? fallback;
      if (v === undefined) throw new ModelArgsError(`${file}: missing field "${name}"`);
      if (typeof v !== 'number' || !Number.isFinite(v)) {
        throw new ModelArgsError(`${file}: field "${name}" must be a number, got ${JSON.stringify(v)}`);
      }
      if (kind === 'int' && !Number.isInteger(v)) {
        throw new ModelArgsError(`${file}: field "${name}" must be an integer, got ${v}`);
      }
      if (v <= 0) throw new ModelArgsError(`${file}: field "${name}" must be positive, got ${v}`);
      return v;
    };
    for (const key of Object.keys(p)) {
      if (!(key in PARAMS_FIELDS) && key !== 'rope_theta') {
        throw new ModelArgsError(
          `${file}: unknown field "${key}" (Mistral 7B's fields are ${Object.keys(PARAMS_FIELDS).join(', ')}, rope_theta)`,
        );
      }
    }
    const f = PARAMS_FIELDS;
    const args = new ModelArgs(
      field('dim', f.dim),
      field('n_layers', f.n_layers),
      field('head_dim', f.head_dim),
      field('hidden_dim', f.hidden_dim),
      field('n_heads', f.n_heads),
      field('n_kv_heads', f.n_kv_heads),
      field('sliding_window', f.sliding_window),
      field('norm_eps', f.norm_eps),
      field('vocab_size', f.vocab_size),
      field('rope_theta', 'float', 10000),
    );
    if (args.nHeads % args.nKvHeads !== 0) {
      throw new ModelArgsError(
        `${file}: field "n_heads" (${args.nHeads}) must be a multiple of "n_kv_heads" (${args.nKvHeads})`,
      );
    }
    if (args.headDim % 2 !== 0) {
      throw new ModelArgsError(`${file}: field "head_dim" must be even for rotary embeddings, got ${args.headDim}`);
    }
    return args;
  }
}

// ----------------------------------------------------------------------------------------------
// repeatKV: grouped-query attention shares each key/value head among nHeads / nKvHeads queries
//
// The reference's repeat_kv copies the keys and values once per query head that reads them.
// Attention.forward below computes the same scores without the copies (grouping the queries by
// key/value head instead; on wasm the copy was most of a decode step); this is the definition
// that grouping follows.

export function repeatKV(keys: tf.Tensor4D, values: tf.Tensor4D, repeats: number): [tf.Tensor4D, tf.Tensor4D] {
  // torch.repeat_interleave on dim 2: kv head k becomes heads k*repeats .. k*repeats + repeats-1.
  const repeat = (x: tf.Tensor4D): tf.Tensor4D => {
    const [b, c, k, d] = x.shape;
    if (repeats === 1) return tf.clone(x);
    // [B, C, K, d] -> [B, C, K, 1, d] -> [B, C, K, repeats, d] -> [B, C, K*repeats, d]
    return tf.tidy(() => tf.reshape(tf.tile(tf.expandDims(x, 3), [1, 1, 1, repeats, 1]), [b, c, k * repeats, d]));
  };
  return [repeat(keys), repeat(values)];
}

// ----------------------------------------------------------------------------------------------
// Rotary embeddings, in the reference's interleaved layout.
//
// The reference views each head vector x as headDim/2 complex numbers (x[2i] + i*x[2i+1]) and
// multiplies number i by e^(i * pos * theta^(-2i/headDim)). The wasm backend has no complex
// tensors, so we write the product out in real arithmetic:
//   (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos).
// (Hugging Face's port uses the "half-split" layout instead: pairs (x[i], x[i + d/2]).)

/** The angles' cosines and sines for positions 0..end-1: cos, sin: [end, headDim/2]. */
export interface FreqsCis {
  cos: tf.Tensor2D;
  sin: tf.Tensor2D;
}

export function precomputeFreqsCis(dim: number, end: number, theta = 10000.0): FreqsCis {
  return tf.tidy(() => {
    // freqs[i] = 1 / theta^(2i/dim): [dim/2]
    const freqs: tf.Tensor1D = tf.div(1.0, tf.pow(theta, tf.div(tf.range(0, dim, 2, 'float32'), dim)));
    // angles[t, i] = t * freqs[i]: [end, dim/2]
    const t = tf.range(0, end, 1, 'float32');
    const angles = tf.outerProduct(t, freqs);
    return { cos: tf.cos(angles) as tf.Tensor2D, sin: tf.sin(angles) as tf.Tensor2D };
  });
}

export function applyRotaryEmb(
  xq: tf.Tensor4D,
  xk: tf.Tensor4D,
  freqsCis: FreqsCis, // cos, sin: [T, d/2], the rows for this forward's positions
): [tf.Tensor4D, tf.Tensor4D] {
  const rotate = (x: tf.Tensor4D): tf.Tensor4D =>
    tf.tidy(() => {
      const [b, t, h, d] = x.shape;
      // cos, sin: [T, d/2] -> [1, T, 1, d/2, 1], to broadcast over batch, heads and each pair
      const cos = tf.reshape(freqsCis.cos, [1, t, 1, d / 2, 1]);
      const sin = tf.reshape(freqsCis.sin, [1, t, 1, d / 2, 1]);
      // pairs (a, b): [B, T, h, d/2, 2]; swapped (-b, a): the pairs reversed, the first negated
      const pairs = tf.reshape(x, [b, t, h, d / 2, 2]);
      const swapped = tf.mul(tf.reverse(pairs, 4), tf.tensor1d([-1, 1]));
      // (a cos - b sin, a sin + b cos), interleaved as the input: [B, T, h, d]
      return tf.reshape(tf.add(tf.mul(pairs, cos), tf.mul(swapped, sin)), [b, t, h, d]) as tf.Tensor4D;
    });
  return [rotate(xq), rotate(xk)];
}

// ----------------------------------------------------------------------------------------------
// A weight of the model and nn.Linear

/**
 * A weight of the model. Normally a float32 tensor, loaded once. In low-memory mode (for models
 * whose float32 weights do not fit the backend) the layers' weights stay on the host as the
 * checkpoint stores them (bf16 for Mistral 7B), and each use widens one to a float32 tensor inside
 * the caller's tf.tidy, which frees it again: the backend holds one layer weight at a time.
 *
 * A resident linear weight is held transposed, [in, out], the layout in which the backend
 * multiplies fastest (see linear()); tensor() still gives it as stored, [out, in].
 */
export class Weight {
  private constructor(
    readonly shape: number[],
    private readonly resident: tf.Tensor | null,
    private readonly host: RawTensor | null,
    /** A resident linear weight, transposed once at load: [in, out]. */
    readonly transposed: tf.Tensor2D | null = null,
  ) {}

  static resident(data: Float32Array, shape: number[]): Weight {
    return new Weight(shape, tf.tensor(data, shape, 'float32'), null);
  }

  /** A resident nn.Linear weight [out, in], held as [in, out]. */
  static residentLinear(data: Float32Array, shape: [number, number]): Weight {
    const transposed = tf.tidy(() => tf.transpose(tf.tensor2d(data, shape, 'float32')));
    // One multiplication now, so that the wasm backend packs the weight for XNNPACK while loading
    // rather than in the first forward.
    tf.tidy(() => {
      tf.matMul(tf.zeros([1, shape[1]]), transposed);
    });
    return new Weight(shape, null, null, transposed);
  }

  static onHost(raw: RawTensor): Weight {
    return new Weight(raw.shape, null, raw);
  }

  /**
   * The float32 tensor as stored; a fresh one, owned by the enclosing tf.tidy, in low-memory mode
   * and for a linear weight held transposed.
   */
  tensor(): tf.Tensor {
    if (this.resident) return this.resident;
    if (this.transposed) return tf.transpose(this.transposed);
    return tf.tensor(widenOnHost(this.host!), this.shape, 'float32');
  }

  dispose(): void {
    this.resident?.dispose();
    this.transposed?.dispose();
  }
}

/**
 * A 16-bit weight widened to float32 in one reused host buffer, which the backend copies from when
 * it makes the tensor. (A fresh array per use costs more than the widening itself: the pages of a
 * new 235 MB array, Mistral 7B's w1, take about 0.8 s to fault in here; widening into them, 0.06 s.)
 * Only the wasm backend copies the array at once; the others may keep it, so they get a fresh one.
 */
let widenBuffer = new Float32Array(0);
function widenOnHost(raw: RawTensor): Float32Array {
  if (raw.dtype === 'float32') return raw.data as Float32Array;
  const n = raw.data.length;
  const reuse = tf.getBackend() === 'wasm';
  if (reuse && widenBuffer.length < n) widenBuffer = new Float32Array(n);
  const out = reuse ? widenBuffer.subarray(0, n) : new Float32Array(n);
  widen16(raw.dtype, raw.data as Uint16Array, out);
  return out;
}

/** The model's weights by their names in consolidated.00.pth. */
export type StateDict = Map<string, Weight>;

function weight(stateDict: StateDict, name: string): Weight {
  const w = stateDict.get(name);
  if (w === undefined) throw new Error(`state dict has no "${name}"`);
  return w;
}

/** Swaps a long-lived tensor for its new value: frees the old one, keeps the new one out of tf.tidy. */
function replace<T extends tf.Tensor>(old: T, next: T): T {
  old.dispose();
  return tf.keep(next);
}

/**
 * nn.Linear without bias: y = x W^T, with W stored as torch stores it, [out, in].
 *
 * How it is multiplied matters on the wasm backend, which runs matMul through XNNPACK only when
 * neither operand is transposed (else a plain loop, 5 to 40 times slower) and packs the right
 * operand once per tensor. A resident weight is held as W^T, [in, out]: y = x W^T, packed once. A
 * low-memory weight is a fresh tensor at every use: y = (W x^T)^T, which packs only the small x^T.
 * Both sum each output over `in` in the same order, so they give the same bits.
 */
function linear(x: tf.Tensor, w: Weight): tf.Tensor {
  return tf.tidy(() => {
    const [outFeatures, inFeatures] = w.shape as [number, number];
    const lead = x.shape.slice(0, -1) as number[];
    const x2d = tf.reshape(x, [-1, inFeatures]) as tf.Tensor2D; // [N, in]
    const y = w.transposed
      ? tf.matMul(x2d, w.transposed) // [N, in] @ [in, out] -> [N, out]
      : tf.transpose(tf.matMul(w.tensor() as tf.Tensor2D, tf.transpose(x2d))); // ([out, in] @ [in, N])^T
    return tf.reshape(y, [...lead, outFeatures]);
  });
}

// ----------------------------------------------------------------------------------------------
// Attention, with a rolling KV cache of slidingWindow entries

export class Attention {
  readonly nHeads: number;
  readonly nKvHeads: number;
  readonly repeats: number;
  readonly slidingWindow: number;
  readonly scale: number;

  readonly wq: Weight; // [H*d, D]
  readonly wk: Weight; // [K*d, D]
  readonly wv: Weight; // [K*d, D]
  readonly wo: Weight; // [D, H*d]
  // The cache is a rotating buffer: position p lives in slot p % W. cacheK, cacheV: [maxBatchSize, S, K, d].
  // The reference allocates all S = W slots up front; here the buffer grows with the positions seen,
  // up to W (same results; memory for only what is used: Mistral 7B's full window is 1 GiB per row).
  cacheK: tf.Tensor4D;
  cacheV: tf.Tensor4D;

  constructor(
    readonly args: ModelArgs,
    stateDict: StateDict,
    prefix: string,
  ) {
    this.nHeads = args.nHeads;
    this.nKvHeads = args.nKvHeads;
    this.repeats = this.nHeads / this.nKvHeads;
    this.slidingWindow = args.slidingWindow;
    this.scale = args.headDim ** -0.5;

    this.wq = weight(stateDict, `${prefix}.wq.weight`);
    this.wk = weight(stateDict, `${prefix}.wk.weight`);
    this.wv = weight(stateDict, `${prefix}.wv.weight`);
    this.wo = weight(stateDict, `${prefix}.wo.weight`);
    this.cacheK = tf.zeros([args.maxBatchSize, 0, this.nKvHeads, args.headDim]);
    this.cacheV = tf.zeros([args.maxBatchSize, 0, this.nKvHeads, args.headDim]);
  }

  /** Makes room for positions up to `lastPos`: the cache doubles as needed, up to W slots. */
  private growCache(lastPos: number): void {
    const slots = this.cacheK.shape[1];
    if (lastPos < slots || slots === this.slidingWindow) return;
    const grown = Math.min(this.slidingWindow, Math.max(lastPos + 1, 2 * slots));
    const padding: [number, number][] = [[0, 0], [0, grown - slots], [0, 0], [0, 0]];
    this.cacheK = replace(this.cacheK, tf.pad(this.cacheK, padding));
    this.cacheV = replace(this.cacheV, tf.pad(this.cacheV, padding));
  }

  forward(
    x: tf.Tensor3D, // [B, T, D]
    freqsCis: FreqsCis, // [T, d/2] each
    positions: number[], // [T], the absolute positions of this forward's tokens
    mask: tf.Tensor2D | null, // [T, C], or null for a single token
  ): tf.Tensor3D {
    return tf.tidy(() => {
      const [bsz, seqlen] = x.shape;
      const { headDim } = this.args;

      // xq: [B, T, H, d]; xk, xv: [B, T, K, d]
      let xq = tf.reshape(linear(x, this.wq), [bsz, seqlen, this.nHeads, headDim]) as tf.Tensor4D;
      let xk = tf.reshape(linear(x, this.wk), [bsz, seqlen, this.nKvHeads, headDim]) as tf.Tensor4D;
      const xv = tf.reshape(linear(x, this.wv), [bsz, seqlen, this.nKvHeads, headDim]) as tf.Tensor4D;
      [xq, xk] = applyRotaryEmb(xq, xk, freqsCis);

      // The cache is a rotating buffer: write the last W positions of this forward into their slots.
      const W = this.slidingWindow;
      const kept = Math.min(seqlen, W);
      const slots = positions.slice(seqlen - kept).map((p) => p % W); // [kept]
      // scatterPos: [B, kept, 2], pairs (batch row, slot)
      const scatterPos = tf.tensor3d(
        Array.from({ length: bsz }, (_, b) => slots.flatMap((s) => [b, s])).flat(),
        [bsz, kept, 2],
        'int32',
      );
      const lastK = kept === seqlen ? xk : tf.slice(xk, [0, seqlen - kept], [bsz, kept]); // [B, kept, K, d]
      const lastV = kept === seqlen ? xv : tf.slice(xv, [0, seqlen - kept], [bsz, kept]);
      // Not in one_file_ref.py, whose prefill always starts at position 0: a chunk that continues a
      // sequence (main.py's chunked prefill, a chat turn) also attends to the W-1 positions before
      // it, read from the cache before this chunk overwrites their slots.
      const previous = seqlen > 1 ? Math.min(W - 1, positions[0]) : 0;
      const previousSlots = Array.from({ length: previous }, (_, i) => (positions[0] - previous + i) % W);
      const readPrevious = (cache: tf.Tensor4D): tf.Tensor4D =>
        tf.gather(tf.slice(cache, [0, 0], [bsz, -1]), tf.tensor1d(previousSlots, 'int32'), 1); // [B, previous, K, d]
      const previousK = previous > 0 ? readPrevious(this.cacheK) : null;
      const previousV = previous > 0 ? readPrevious(this.cacheV) : null;
      this.growCache(positions[seqlen - 1]);
      this.cacheK = replace(this.cacheK, tf.tensorScatterUpdate(this.cacheK, scatterPos, lastK));
      this.cacheV = replace(this.cacheV, tf.tensorScatterUpdate(this.cacheV, scatterPos, lastV));

      let keys: tf.Tensor4D; // [B, C, K, d]
      let values: tf.Tensor4D;
      if (positions.length > 1) {
        // prefill: attend within this forward's tokens (after the previous ones, if any); the mask
        // keeps it causal and windowed.
        keys = previousK ? tf.concat([previousK, xk], 1) : xk; // [B, previous + T, K, d]
        values = previousV ? tf.concat([previousV, xv], 1) : xv;
      } else {
        // decode: attend to every filled slot of the cache (at most W: the token itself and the
        // W-1 before it). Their order in the buffer does not matter: attention is a weighted sum
        // and the rotary embedding already carries each key's position.
        const curPos = Math.min(positions[positions.length - 1] + 1, W);
        keys = tf.slice(this.cacheK, [0, 0], [bsz, curPos]) as tf.Tensor4D; // [B, C, K, d]
        values = tf.slice(this.cacheV, [0, 0], [bsz, curPos]) as tf.Tensor4D;
      }

      // Grouped-query attention. The reference copies each key/value head for its `repeats` query
      // heads (repeat_kv, [B, C, H, d]); grouping the queries by key/value head instead computes the
      // same scores without the copies: query head h = k * repeats + j reads key/value head k.
      const [K, r, C] = [this.nKvHeads, this.repeats, keys.shape[1]];
      // [B, T, H, d] -> [B, T, K, r, d] -> [B, K, r, T, d] -> [B, K, r*T, d]
      const query = tf.reshape(tf.transpose(tf.reshape(xq, [bsz, seqlen, K, r, headDim]), [0, 2, 3, 1, 4]), [bsz, K, r * seqlen, headDim]);
      const keyT = tf.transpose(keys, [0, 2, 1, 3]); // [B, K, C, d]
      const valueT = tf.transpose(values, [0, 2, 1, 3]); // [B, K, C, d]
      // scores: [B, K, r*T, C], seen as [B, K, r, T, C] = [B, H, T, C] for the mask
      let scores = tf.mul(tf.matMul(query, keyT, false, true), this.scale);
      if (mask !== null) scores = tf.reshape(tf.add(tf.reshape(scores, [bsz, K, r, seqlen, C]), mask), [bsz, K, r * seqlen, C]);
      scores = tf.softmax(scores, -1);
      const output = tf.matMul(scores, valueT); // [B, K, r*T, d]
      // [B, K, r, T, d] -> [B, T, K, r, d] -> [B, T, H*d]
      const merged = tf.reshape(tf.transpose(tf.reshape(output, [bsz, K, r, seqlen, headDim]), [0, 3, 1, 2, 4]), [bsz, seqlen, this.nHeads * headDim]);
      return linear(merged, this.wo) as tf.Tensor3D; // [B, T, D]
    });
  }

  dispose(): void {
    this.cacheK.dispose();
    this.cacheV.dispose();
  }
}

// ----------------------------------------------------------------------------------------------
// FeedForward: SwiGLU, w2(silu(w1 x) * w3 x)

export class FeedForward {
  readonly w1: Weight; // [F, D]
  readonly w2: Weight; // [D, F]
  readonly w3: Weight; // [F, D]

  constructor(stateDict: StateDict, prefix: string) {
    this.w1 = weight(stateDict, `${prefix}.w1.weight`);
    this.w2 = weight(stateDict, `${prefix}.w2.weight`);
    this.w3 = weight(stateDict, `${prefix}.w3.weight`);
  }

  forward(x: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      const gate = linear(x, this.w1); // [B, T, F]
      const silu = tf.mul(gate, tf.sigmoid(gate)); // silu(z) = z * sigmoid(z)
      return linear(tf.mul(silu, linear(x, this.w3)), this.w2) as tf.Tensor3D; // [B, T, D]
    });
  }
}

// ----------------------------------------------------------------------------------------------
// RMSNorm: x / sqrt(mean(x^2) + eps), times a learned gain per channel

export class RMSNorm {
  constructor(
    readonly weight: Weight, // [D]
    readonly eps = 1e-6,
  ) {}

  forward(x: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      const meanSquare = tf.mean(tf.square(x), -1, true); // [B, T, 1]
      return tf.mul(tf.mul(x, tf.rsqrt(tf.add(meanSquare, this.eps))), this.weight.tensor()) as tf.Tensor3D;
    });
  }
}

// ----------------------------------------------------------------------------------------------
// TransformerBlock: pre-norm attention and feed-forward, each added to the residual stream

export class TransformerBlock {
  readonly attention: Attention;
  readonly feedForward: FeedForward;
  readonly attentionNorm: RMSNorm;
  readonly ffnNorm: RMSNorm;

  constructor(args: ModelArgs, stateDict: StateDict, prefix: string) {
    this.attention = new Attention(args, stateDict, `${prefix}.attention`);
    this.feedForward = new FeedForward(stateDict, `${prefix}.feed_forward`);
    this.attentionNorm = new RMSNorm(weight(stateDict, `${prefix}.attention_norm.weight`), args.normEps);
    this.ffnNorm = new RMSNorm(weight(stateDict, `${prefix}.ffn_norm.weight`), args.normEps);
  }

  forward(x: tf.Tensor3D, freqsCis: FreqsCis, positions: number[], mask: tf.Tensor2D | null): tf.Tensor3D {
    return tf.tidy(() => {
      const h = tf.add(x, this.attention.forward(this.attentionNorm.forward(x), freqsCis, positions, mask));
      return tf.add(h, this.feedForward.forward(this.ffnNorm.forward(h as tf.Tensor3D))) as tf.Tensor3D;
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Transformer: embeddings, the blocks, a final norm and the output projection

/** How many positions the rotary table covers, as in the reference. */
export const MAX_POSITIONS = 128_000;

/** Every weight of consolidated.00.pth with its shape, as the reference's modules declare them. */
export function stateDictShapes(args: ModelArgs): Map<string, number[]> {
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

/**
 * The additive attention mask: 0 where the query at queryPositions[i] may see the key at position
 * firstKey + j, -inf elsewhere. A query sees the W keys from its own position back: 0 <= q - k < W.
 */
export function slidingWindowMask(queryPositions: number[], firstKey: number, slidingWindow: number): tf.Tensor2D {
  return tf.tidy(() => {
    const lastKey = queryPositions[queryPositions.length - 1];
    const q = tf.expandDims(tf.tensor1d(queryPositions, 'int32'), 1); // [T, 1]
    const k = tf.expandDims(tf.range(firstKey, lastKey + 1, 1, 'int32'), 0); // [1, C]
    const distance = tf.sub(q, k) as tf.Tensor2D; // [T, C]
    const visible = tf.logicalAnd(tf.greaterEqual(distance, 0), tf.less(distance, slidingWindow));
    return tf.where(visible, tf.zeros(distance.shape), tf.fill(distance.shape, -Infinity));
  });
}

export class CheckpointMismatchError extends Error {
  override name = 'CheckpointMismatchError';
}

export class Transformer {
  readonly vocabSize: number;
  readonly nLayers: number;
  readonly tokEmbeddings: Weight; // [V, D]
  readonly layers: TransformerBlock[];
  readonly norm: RMSNorm;
  readonly output: Weight; // [V, D]
  readonly freqsCis: FreqsCis; // [MAX_POSITIONS, d/2] each

  constructor(
    readonly args: ModelArgs,
    readonly stateDict: StateDict,
  ) {
    this.vocabSize = args.vocabSize;
    this.nLayers = args.nLayers;
    this.tokEmbeddings = weight(stateDict, 'tok_embeddings.weight');
    this.layers = Array.from({ length: args.nLayers }, (_, i) => new TransformerBlock(args, stateDict, `layers.${i}`));
    this.norm = new RMSNorm(weight(stateDict, 'norm.weight'), args.normEps);
    this.output = weight(stateDict, 'output.weight');
    this.freqsCis = precomputeFreqsCis(args.headDim, MAX_POSITIONS, args.ropeTheta);
  }

  /**
   * inputIds: [B, T] int32; positions: [T] int32, the absolute position of each column.
   * T > 1 is a prefill (tokens attend to each other under the mask); T = 1 is a decode step
   * (the token attends to the cache). Returns logits: [B, T, V] float32; the caller disposes it.
   */
  forward(inputIds: tf.Tensor2D, positions: tf.Tensor1D): tf.Tensor3D {
    const seqlen = inputIds.shape[1];
    const pos = Array.from(positions.dataSync());
    checkForwardInputs(this.args, inputIds, pos);
    try {
      return tf.tidy(() => {
        let h = tf.gather(this.tokEmbeddings.tensor(), inputIds) as tf.Tensor3D; // [B, T, D]
        const freqsCis: FreqsCis = {
          cos: tf.gather(this.freqsCis.cos, positions), // [T, d/2]
          sin: tf.gather(this.freqsCis.sin, positions),
        };

        let mask: tf.Tensor2D | null = null;
        if (seqlen > 1) {
          // The sliding window, one definition for every path: a query at position i sees the W
          // keys i-W+1 .. i, itself and the W-1 before it, which is exactly what the decode cache
          // of W slots holds. (The reference's prefill mask, triu(tril(ones), diagonal=-W), lets
          // it see W+1 keys, i-W .. i, disagreeing with its own cache; its xformers path
          // make_local_attention(W) and Hugging Face's port use W keys, as we do.)
          // The keys are this forward's tokens, after the W-1 cached positions before them when it
          // continues a sequence (none for a prefill from position 0).
          const previous = Math.min(this.args.slidingWindow - 1, pos[0]);
          mask = slidingWindowMask(pos, pos[0] - previous, this.args.slidingWindow); // [T, previous + T]
        }

        for (const layer of this.layers) {
          h = layer.forward(h, freqsCis, pos, mask);
        }
        return linear(this.norm.forward(h), this.output) as tf.Tensor3D; // [B, T, V]
      });
    } catch (err) {
      throw explainBackendFailure(err);
    }
  }

  /**
   * Loads params.json and consolidated.00.pth from an official model folder, or the same model
   * from any layout checkpoint/ reads (the official .tar, consolidated.safetensors, Hugging Face).
   */
  static async fromFolder(folder: string, opts: LoadOptions = {}): Promise<Transformer> {
    const files = await openModel(folder, { onProgress: opts.onProgress });
    try {
      return Transformer.fromCheckpoint(files.params, files.paramsFile, files.weights, opts);
    } finally {
      files.close();
    }
  }

  /** Builds the model from params.json's contents and a reader of its weights. */
  static fromCheckpoint(params: unknown, paramsFile: string, checkpoint: WeightReader, opts: LoadOptions = {}): Transformer {
    const args = ModelArgs.fromParams(params, paramsFile);
    args.maxBatchSize = opts.maxBatchSize ?? 1;
    // Like torch's load_state_dict(strict=True): every key present, none extra, every shape right,
    // all checked before a single weight is read.
    const expected = stateDictShapes(args);
    checkStateDict(checkpoint.path, expected, checkpoint.tensors);
    const lowMemory = chooseLowMemory(args, opts.lowMemory ?? 'auto', checkpoint.path);

    const stateDict: StateDict = new Map();
    for (const [name, shape] of expected) {
      const hostSide = lowMemory && name.startsWith('layers.');
      const isLinear = shape.length === 2 && name !== 'tok_embeddings.weight';
      stateDict.set(
        name,
        hostSide
          ? Weight.onHost(checkpoint.readRaw(name))
          : isLinear
            ? Weight.residentLinear(checkpoint.read(name), shape as [number, number])
            : Weight.resident(checkpoint.read(name), shape),
      );
    }
    return new Transformer(args, stateDict);
  }

  /** Frees the weights, the caches and the rotary tables. */
  dispose(): void {
    for (const w of this.stateDict.values()) w.dispose();
    for (const layer of this.layers) layer.attention.dispose();
    this.freqsCis.cos.dispose();
    this.freqsCis.sin.dispose();
  }
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
}

/**
 * Bytes of float32 tensors the backend must hold, with all weights resident or with one layer
 * weight at a time, plus the rotary tables and one batch row of KV cache at the full window (the
 * cache grows with use; more rows or positions than fit fail later with a clear out-of-memory error).
 */
export function residentBytes(args: ModelArgs): { full: number; lowMemory: number } {
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

function chooseLowMemory(args: ModelArgs, wanted: boolean | 'auto', source: string): boolean {
  const limit = backendMemoryLimit();
  const bytes = residentBytes(args);
  const gib = (n: number): string => `${(n / 1024 ** 3).toFixed(1)} GiB`;
  const fits = (n: number): boolean => limit === undefined || n <= 0.9 * limit;
  // On wasm, XNNPACK also keeps a packed copy of every resident linear weight (see linear()).
  let linearLayers = 0;
  let linearOthers = 0;
  for (const [name, shape] of stateDictShapes(args)) {
    if (shape.length !== 2 || name === 'tok_embeddings.weight') continue;
    if (name.startsWith('layers.')) linearLayers += 4 * shape[0] * shape[1];
    else linearOthers += 4 * shape[0] * shape[1];
  }
  const packed = tf.getBackend() === 'wasm' ? { full: linearLayers + linearOthers, lowMemory: linearOthers } : { full: 0, lowMemory: 0 };
  const full = bytes.full + packed.full;
  const lowMemory = wanted === 'auto' ? !fits(full) : wanted;
  if (wanted === 'auto' && lowMemory) {
    process.stderr.write(
      `low-memory mode: float32 weights need ${gib(full)}, the backend holds ${gib(limit!)}; ` +
        'layers stay on the host as stored and are widened to float32 one weight at a time\n',
    );
  }
  const need = lowMemory ? bytes.lowMemory + packed.lowMemory : full;
  if (!fits(need)) {
    throw new BackendError(
      `${source}: the model needs ${gib(need)} of float32 tensors${lowMemory ? ' even in low-memory mode' : ''}, ` +
        `more than the backend's ${gib(limit!)}; use a native backend on a machine with more memory`,
    );
  }
  return lowMemory;
}

function checkStateDict(
  file: string,
  expected: Map<string, number[]>,
  found: ReadonlyMap<string, { shape: number[] }>,
): void {
  for (const [name, shape] of expected) {
    const record = found.get(name);
    if (record === undefined) throw new CheckpointMismatchError(`${file}: missing weight "${name}" (params.json expects it)`);
    if (record.shape.length !== shape.length || record.shape.some((n, i) => n !== shape[i])) {
      throw new CheckpointMismatchError(
        `${file}: weight "${name}" has shape [${record.shape}], params.json implies [${shape}]`,
      );
    }
  }
  for (const name of found.keys()) {
    if (!expected.has(name)) {
      throw new CheckpointMismatchError(`${file}: unexpected weight "${name}" (not in a model of this params.json)`);
    }
  }
}

function checkForwardInputs(args: ModelArgs, inputIds: tf.Tensor2D, positions: number[]): void {
  const [bsz, seqlen] = inputIds.shape;
  if (bsz > args.maxBatchSize) {
    throw new RangeError(`batch of ${bsz} rows exceeds maxBatchSize ${args.maxBatchSize}`);
  }
  if (positions.length !== seqlen) {
    throw new RangeError(`positions has ${positions.length} entries for ${seqlen} tokens`);
  }
  if (positions.some((p) => !Number.isInteger(p) || p < 0 || p >= MAX_POSITIONS)) {
    throw new RangeError(`positions must be integers in [0, ${MAX_POSITIONS})`);
  }
  for (const id of inputIds.dataSync()) {
    if (!Number.isInteger(id) || id < 0 || id >= args.vocabSize) {
      throw new RangeError(`token id ${id} is outside the vocabulary [0, ${args.vocabSize})`);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Tokenizer: SentencePiece, as the reference wraps it

export class Tokenizer {
  /** `processor` is the SentencePiece model itself (Python's sp), e.g. for streaming decode. */
  private constructor(readonly processor: SentencePieceProcessor) {}

  /** From a tokenizer.model file, or from its bytes (read out of a .tar). */
  static async load(source: string | TokenizerSource): Promise<Tokenizer> {
    if (typeof source === 'string') return new Tokenizer(await SentencePieceProcessor.load(source));
    if ('path' in source) return new Tokenizer(await SentencePieceProcessor.load(source.path));
    return new Tokenizer(await SentencePieceProcessor.loadBytes(source.bytes, source.name));
  }

  get nWords(): number {
    return this.processor.vocabSize;
  }

  get bosId(): number {
    return this.processor.bosId;
  }

  get eosId(): number {
    return this.processor.eosId;
  }

  /** -1 for Mistral's tokenizer, which has no pad piece: generate() pads with it and masks it out. */
  get padId(): number {
    return this.processor.padId;
  }

  encode(s: string, bos = true): number[] {
    const ids = this.processor.encode(s, false);
    return bos ? [this.processor.bosId, ...ids] : ids;
  }

  decode(t: number[]): string {
    return this.processor.decode(t);
  }
}

// ----------------------------------------------------------------------------------------------
// generate: greedy decoding, batched the reference's way

export interface GenerateResult {
  /** The decoded prompt-plus-completion of each row; empty when maxTokens is 0, as in the reference. */
  texts: string[];
  /** Per row: the logprob of each prompt token after the first up to the shortest prompt's length, then of each step's token. */
  logprobs: number[][];
  /** Per row: the token fed at each of the maxTokens steps (a longer prompt's own tokens first). */
  generatedIds: number[][];
}

/**
 * The reference's generate(): prefill every row with the shortest prompt's length, then take
 * maxTokens single-token steps. At each step a row whose prompt is not used up is fed its own
 * next prompt token (teacher forcing); the others get the greedy argmax.
 */
export async function generate(
  prompts: string[],
  model: Transformer,
  tokenizer: Tokenizer,
  maxTokens: number,
): Promise<GenerateResult> {
  const encodedPrompts = prompts.map((p) => tokenizer.encode(p));
  const promptLens = encodedPrompts.map((x) => x.length);
  const minPromptLen = Math.min(...promptLens);
  const maxPromptLen = Math.max(...promptLens);
  const bsz = prompts.length;
  if (minPromptLen + maxTokens > MAX_POSITIONS) {
    throw new RangeError(`maxTokens ${maxTokens} after a ${minPromptLen}-token prefill runs past the model's ${MAX_POSITIONS} positions`);
  }

  // inputTokens: [B, maxPromptLen], padded with padId; inputMask marks the real prompt tokens.
  const inputTokens = encodedPrompts.map((x) => [...x, ...new Array<number>(maxPromptLen - x.length).fill(tokenizer.padId)]);
  const inputMask = inputTokens.map((row) => row.map((id) => id !== tokenizer.padId));

  // pre-fill: logprobs [B, minPromptLen, V]
  let logprobs = tf.tidy(() => {
    const prefill = tf.tensor2d(inputTokens.map((row) => row.slice(0, minPromptLen)), [bsz, minPromptLen], 'int32');
    return tf.logSoftmax(model.forward(prefill, tf.range(0, minPromptLen, 1, 'int32') as tf.Tensor1D), -1);
  });

  // The logprob of each prompt token given the ones before it, gathered on the backend (reading
  // back all of [B, T, V] costs more than the forward): logprobs[b, t, inputTokens[b][t + 1]], [B, T - 1]
  const promptIndices = inputTokens.flatMap((row, b) => row.slice(1, minPromptLen).map((id, t) => [b, t, id]));
  const promptLogprobs = promptIndices.length
    ? tf.tidy(() => tf.gatherND(logprobs, tf.tensor2d(promptIndices, [promptIndices.length, 3], 'int32')).dataSync())
    : new Float32Array(0);
  const allLogprobs = inputTokens.map((_, b) => Array.from(promptLogprobs.subarray(b * (minPromptLen - 1), (b + 1) * (minPromptLen - 1))));

  // decode
  const generated: number[][] = inputTokens.map(() => []);
  let curPos = minPromptLen;
  for (let step = 0; step < maxTokens; step++) {
    // lastLogprobs: [B, V], the distribution over the token at curPos; only the argmax and the
    // chosen token's logprob of each row are read back.
    const lastLogprobs = tf.tidy(() => tf.reshape(tf.slice(logprobs, [0, logprobs.shape[1] - 1, 0], [bsz, 1, -1]), [bsz, -1]));
    const best = tf.tidy(() => Array.from(tf.argMax(lastLogprobs, -1).dataSync())); // the first maximum, as torch.argmax
    const nextToken = best.map((id, b) => {
      // Teacher forcing: a row still inside its prompt is fed its own token, not the argmax.
      if (curPos < maxPromptLen && inputMask[b][curPos]) return inputTokens[b][curPos];
      return id;
    });
    const chosen = tf.tidy(() => tf.gatherND(lastLogprobs, tf.tensor2d(nextToken.map((id, b) => [b, id]), [bsz, 2], 'int32')).dataSync());
    lastLogprobs.dispose();
    nextToken.forEach((id, b) => {
      allLogprobs[b].push(chosen[b]);
      generated[b].push(id);
    });
    logprobs.dispose();
    // As in the reference, the last step's forward runs too, though nothing reads its logits.
    logprobs = tf.tidy(() =>
      tf.logSoftmax(model.forward(tf.tensor2d(nextToken, [bsz, 1], 'int32'), tf.tensor1d([curPos], 'int32')), -1),
    );
    curPos += 1;
  }
  logprobs.dispose();

  const texts: string[] = [];
  if (maxTokens > 0) {
    encodedPrompts.forEach((x, i) => texts.push(tokenizer.decode([...x.slice(0, minPromptLen), ...generated[i]])));
  }
  return { texts, logprobs: allLogprobs, generatedIds: generated };
}

/**
 * The tokenizer and the model from one path, whatever its layout, read once (a .tar is one stream):
 * the reference's demo() does Tokenizer(folder / "tokenizer.model") and Transformer.from_folder(folder).
 */
export async function loadModel(modelPath: string, opts: LoadOptions = {}): Promise<{ tokenizer: Tokenizer; transformer: Transformer }> {
  const files = await openModel(modelPath, { onProgress: opts.onProgress });
  for (const warning of files.warnings ?? []) process.stderr.write(`note: ${warning}\n`);
  try {
    const tokenizer = await Tokenizer.load(files.tokenizer);
    const transformer = Transformer.fromCheckpoint(files.params, files.paramsFile, files.weights, opts);
    if (tokenizer.nWords > transformer.args.vocabSize) {
      transformer.dispose();
      throw new ModelArgsError(
        `${files.paramsFile}: vocab_size ${transformer.args.vocabSize} is smaller than the tokenizer's ${tokenizer.nWords} pieces`,
      );
    }
    return { tokenizer, transformer };
  } finally {
    files.close();
  }
}

// ----------------------------------------------------------------------------------------------
// demo: the reference's three prompts

export const DEMO_PROMPTS = [
  'This is a test',
  'This is another test',
  'This is a third test, mistral AI is very good at testing. ',
];

export async function demo(modelPath: string, maxTokens = 35, opts: LoadOptions = {}): Promise<void> {
  const { tokenizer, transformer } = await loadModel(modelPath, { ...opts, maxBatchSize: 3 });
  try {
    const { texts } = await generate(DEMO_PROMPTS, transformer, tokenizer, maxTokens);
    for (const x of texts) {
      console.log(x);
      console.log('=====================');
    }
  } finally {
    transformer.dispose();
  }
}

// The reference ends with fire.Fire(demo). Here the command line also offers --prompt, --json,
// logits and more; it lives in cli/, above this file, and is only loaded when run as a script.
if (require.main === module) {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  (require('./cli/main') as typeof import('./cli/main')).main(process.argv.slice(2));
}
