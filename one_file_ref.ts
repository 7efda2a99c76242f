/**
 * Mistral 7B in one TypeScript file: a section-by-section port of mistral-src's `one_file_ref.py`
 * (commit c18d5b9, Mistral 7B v0.1) on TensorFlow.js tensors. Read it beside the Python:
 *
 *   one_file_ref.py (lines)              here               what Python gets from torch lives in
 *   ModelArgs (11-23)                     1. ModelArgs        model/params.ts (params.json checks)
 *   repeat_kv (26-29)                     2. repeatKV
 *   _reshape_for_broadcast, apply_rotary_emb (32-57)  3. applyRotaryEmb
 *   Attention (60-149)                    4. Attention        model/weights.ts (nn.Linear: linear()),
 *                                                             model/kv_cache.ts (the rolling buffer)
 *   FeedForward, RMSNorm, TransformerBlock (152-207)  5, 6, 7.
 *   precompute_freqs_cis (210-214)        8. precomputeFreqsCis
 *   Transformer (217-277)                 9. Transformer      checkpoint/ (from_folder's reading),
 *                                                             model/load.ts (load_state_dict's checks)
 *   Tokenizer (280-298)                  10. Tokenizer        tokenizer/ (SentencePiece)
 *   generate (301-343)                   11. generate         model/prefill.ts (chunk length)
 *   demo, fire.Fire (346-364)            12. demo             cli/ (the command line, above this file)
 *
 * Nothing under model/, checkpoint/, tokenizer/, runtime/ imports this file; cli/, generation/ and
 * server/ sit above it. Shapes: B batch, T tokens in this forward, D dim, H n_heads, K n_kv_heads,
 * r = H / K, d head_dim, F hidden_dim, V vocab_size, W sliding_window, C keys attended to. Every
 * function that makes tensors runs in tf.tidy or hands its result to a caller who disposes it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { openModel, type TokenizerSource } from './checkpoint';
import type { WeightReader } from './checkpoint/types';
import { KVCache, SlotBook, type CacheStep } from './model/kv_cache';
import { loadStateDict, withComputePool, type LoadOptions } from './model/load';
import { checkForwardInputs, MAX_POSITIONS, ModelArgsError, validateParams } from './model/params';
import { chunkRanges, prefillChunkLength } from './model/prefill';
import { readBack } from './model/host';
import { linear, weight, type StateDict, Weight } from './model/weights';
import { explainBackendFailure } from './runtime/backend';
import { SentencePieceProcessor } from './tokenizer';
export { CheckpointMismatchError, residentBytes, stateDictShapes, type LoadOptions } from './model/load';
export { MAX_POSITIONS, ModelArgsError, prefillChunkLength, readBack, Weight, type StateDict };

// ----------------------------------------------------------------------------------------------
// 1. ModelArgs: the hyperparameters, read from params.json
export class ModelArgs {
  constructor(
    readonly dim: number, readonly nLayers: number, readonly headDim: number, readonly hiddenDim: number,
    readonly nHeads: number, readonly nKvHeads: number, readonly slidingWindow: number, readonly normEps: number,
    readonly vocabSize: number,
    readonly ropeTheta: number = 10000, // not in v0.1's params.json (10000 then); later releases write it
    public maxBatchSize: number = 0,
  ) {}

  /** From a parsed params.json, validated (model/params.ts); `file` names it in errors. */
  static fromParams(params: unknown, file = 'params.json'): ModelArgs {
    const p = validateParams(params, file);
    return new ModelArgs(p.dim, p.n_layers, p.head_dim, p.hidden_dim, p.n_heads, p.n_kv_heads, p.sliding_window, p.norm_eps, p.vocab_size, p.rope_theta);
  }
}

// ----------------------------------------------------------------------------------------------
// 2. repeatKV: grouped-query attention shares each key/value head among r = H / K query heads
//
//   query heads (H = 32):  0  1  2  3 |  4  5  6  7 | ... | 28 29 30 31
//   kv heads    (K = 8):        0     |      1      | ... |      7          query head h reads kv head floor(h / 4)

export function repeatKV(keys: tf.Tensor4D, values: tf.Tensor4D, repeats: number): [tf.Tensor4D, tf.Tensor4D] {
  // torch.repeat_interleave on dim 2: [B, C, K, d] -> [B, C, K, repeats, d] -> [B, C, K*repeats, d]
  const repeat = (x: tf.Tensor4D): tf.Tensor4D =>
    tf.tidy(() => tf.reshape(tf.tile(tf.expandDims(x, 3), [1, 1, 1, repeats, 1]), [x.shape[0], x.shape[1], x.shape[2] * repeats, x.shape[3]]));
  return [repeat(keys), repeat(values)];
}

// The forward does not copy keys and values (on wasm the copies were most of a decode step): it
// groups the queries by the kv head they read. Equality: scores = (repeat_kv'd keys) x query gives
// query head h = k*r + j the product with kv head k = floor(h / r); so does multiplying kv head k's
// keys once by its r grouped queries.

/** [B, T, H, d] -> [B, T, K, r, d] -> [B, K, r, T, d] -> [B, K, r*T, d]: the r queries of each kv head together. */
export function groupByKvHead(xq: tf.Tensor4D, nKvHeads: number): tf.Tensor4D {
  const [b, t, h, d] = xq.shape; // r = h / nKvHeads
  return tf.reshape(tf.transpose(tf.reshape(xq, [b, t, nKvHeads, h / nKvHeads, d]), [0, 2, 3, 1, 4]), [b, nKvHeads, h / nKvHeads * t, d]);
}

/** [B, K, r*T, d] -> [B, K, r, T, d] -> [B, T, K, r, d] -> [B, T, H*d]: one row per token, heads in order. */
export function ungroupHeads(out: tf.Tensor4D, seqlen: number): tf.Tensor3D {
  const [b, k, rt, d] = out.shape; // r = rt / seqlen
  return tf.reshape(tf.transpose(tf.reshape(out, [b, k, rt / seqlen, seqlen, d]), [0, 3, 1, 2, 4]), [b, seqlen, k * (rt / seqlen) * d]);
}

// ----------------------------------------------------------------------------------------------
// 3. applyRotaryEmb: each head vector as d/2 complex numbers x[2i] + i x[2i+1], times e^(i pos theta_i)
//
// No complex tensors on wasm: (a + ib)(cos + i sin) = (a cos - b sin) + i(a sin + b cos), written
// out. The table rows broadcast over batch and heads as _reshape_for_broadcast arranges.

/** The angles' cosines and sines, [positions, d/2] each (torch: one complex64 table). */
export interface FreqsCis { cos: tf.Tensor2D; sin: tf.Tensor2D }

export function applyRotaryEmb(xq: tf.Tensor4D, xk: tf.Tensor4D, freqsCis: FreqsCis): [tf.Tensor4D, tf.Tensor4D] {
  const rotate = (x: tf.Tensor4D): tf.Tensor4D =>
    tf.tidy(() => {
      const [b, t, h, d] = x.shape;
      // _reshape_for_broadcast: cos, sin [T, d/2] -> [1, T, 1, d/2, 1]
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
// 4. Attention, with a rolling KV cache of W slots
export class Attention {
  readonly nHeads: number;
  readonly nKvHeads: number;
  readonly repeats: number;
  readonly slidingWindow: number;
  readonly scale: number;
  readonly wq: Weight; readonly wk: Weight; readonly wv: Weight; readonly wo: Weight; // [H*d, D], [K*d, D], [K*d, D], [D, H*d]
  readonly cache: KVCache; // k, v: [maxBatchSize, slots <= W, K, d]

  constructor(readonly args: ModelArgs, stateDict: StateDict, prefix: string) {
    this.nHeads = args.nHeads;
    this.nKvHeads = args.nKvHeads;
    this.repeats = this.nHeads / this.nKvHeads;
    this.slidingWindow = args.slidingWindow;
    this.scale = args.headDim ** -0.5;
    [this.wq, this.wk, this.wv, this.wo] = ['wq', 'wk', 'wv', 'wo'].map((w) => weight(stateDict, `${prefix}.${w}.weight`));
    this.cache = new KVCache(args.maxBatchSize, this.nKvHeads, args.headDim);
  }

  forward(x: tf.Tensor3D, freqsCis: FreqsCis, positions: number[], mask: tf.Tensor2D | null, step: CacheStep): tf.Tensor3D {
    return tf.tidy(() => {
      const [bsz, seqlen] = x.shape;
      const { headDim } = this.args;
      const xq = tf.reshape(linear(x, this.wq), [bsz, seqlen, this.nHeads, headDim]) as tf.Tensor4D; // [B, T, H, d]
      const xk0 = tf.reshape(linear(x, this.wk), [bsz, seqlen, this.nKvHeads, headDim]) as tf.Tensor4D; // [B, T, K, d]
      const xv = tf.reshape(linear(x, this.wv), [bsz, seqlen, this.nKvHeads, headDim]) as tf.Tensor4D;
      const [q, xk] = applyRotaryEmb(xq, xk0, freqsCis);

      // The cache is a rotating buffer: position p goes to slot p % W; only the last W positions of
      // a forward are written. W = 4, after a prefill of positions 0..5 and a decode step at 6:
      //   slot:                0  1  2  3
      //   after prefill 0..5:  4  5  2  3      (0 and 1 were overwritten by 4 and 5)
      //   after decode at 6:   4  5  6  3      (6 attends to 3, 4, 5 and itself)
      // Not in the Python, whose prefill always starts a sequence: a chunk that continues one also
      // attends to the `step.earlier` positions before it that the cache holds (read before this
      // chunk overwrites their slots). A fresh sequence, at position 0 or any other, has none.
      const { earlier, slots, book } = step;
      const previous = seqlen > 1 && earlier > 0 ? this.cache.read(bsz, book, positions[0] - earlier, earlier) : null;
      const kept = slots.length; // min(T, W)
      const last = (t: tf.Tensor4D): tf.Tensor4D => (kept === seqlen ? t : tf.slice(t, [0, seqlen - kept], [bsz, kept])); // [B, kept, K, d]
      this.cache.write(book, slots, last(xk), last(xv));

      // keys, values: [B, C, K, d]. Prefill: the earlier positions, then this forward's tokens (the
      // mask keeps it causal and windowed). Decode: the token and the `earlier` positions before it,
      // from the cache, C = earlier + 1 <= W, in any order (no mask; the rotary embedding already
      // carries each key's position).
      const [keys, values] = seqlen > 1
        ? previous ? [tf.concat([previous[0], xk], 1), tf.concat([previous[1], xv], 1)] : [xk, xv]
        : this.cache.read(bsz, book, positions[0] - earlier, earlier + 1, true);

      // Grouped-query attention (section 2): query = groupByKvHead(q), [B, K, r*T, d]; keys and
      // values per kv head, [B, K, C, d]; scores [B, K, r*T, C], seen as [B, H, T, C] for the mask.
      const C = keys.shape[1];
      const query = groupByKvHead(q, this.nKvHeads);
      const key = tf.transpose(keys, [0, 2, 1, 3]);
      const value = tf.transpose(values, [0, 2, 1, 3]);
      let scores = tf.mul(tf.matMul(query, key, false, true), this.scale);
      if (mask !== null) scores = tf.reshape(tf.add(tf.reshape(scores, [bsz, this.nKvHeads, this.repeats, seqlen, C]), mask), [bsz, this.nKvHeads, this.repeats * seqlen, C]);
      scores = tf.softmax(scores, -1);
      const output = ungroupHeads(tf.matMul(scores, value) as tf.Tensor4D, seqlen); // [B, T, H*d]
      return linear(output, this.wo) as tf.Tensor3D; // [B, T, D]
    });
  }

  dispose(): void { this.cache.dispose(); }
}

// ----------------------------------------------------------------------------------------------
// 5. FeedForward: SwiGLU, w2(silu(w1 x) * w3 x)
export class FeedForward {
  readonly w1: Weight; readonly w2: Weight; readonly w3: Weight; // [F, D], [D, F], [F, D]

  constructor(stateDict: StateDict, prefix: string) {
    [this.w1, this.w2, this.w3] = ['w1', 'w2', 'w3'].map((w) => weight(stateDict, `${prefix}.${w}.weight`));
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
// 6. RMSNorm: x / sqrt(mean(x^2) + eps), times a learned gain per channel
export class RMSNorm {
  constructor(readonly weight: Weight, readonly eps = 1e-6) {} // weight: [D]

  forward(x: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      const meanSquare = tf.mean(tf.square(x), -1, true); // [B, T, 1]
      return tf.mul(tf.mul(x, tf.rsqrt(tf.add(meanSquare, this.eps))), this.weight.tensor()) as tf.Tensor3D;
    });
  }
}

// ----------------------------------------------------------------------------------------------
// 7. TransformerBlock: pre-norm attention and feed-forward, each added to the residual stream
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

  forward(x: tf.Tensor3D, freqsCis: FreqsCis, positions: number[], mask: tf.Tensor2D | null, step: CacheStep): tf.Tensor3D {
    return tf.tidy(() => {
      const h = tf.add(x, this.attention.forward(this.attentionNorm.forward(x), freqsCis, positions, mask, step));
      return tf.add(h, this.feedForward.forward(this.ffnNorm.forward(h as tf.Tensor3D))) as tf.Tensor3D;
    });
  }
}

// ----------------------------------------------------------------------------------------------
// 8. precomputeFreqsCis: cos and sin of pos * theta^(-2i/d), for every position
export function precomputeFreqsCis(dim: number, end: number, theta = 10000.0): FreqsCis {
  // On the host, each step rounded to float32 as torch computes it: the reference's angles bit for
  // bit (at position 127,990 they are up to 7.5e-3 rad off exact ones for d = 128), cos and sin
  // within one float32 ulp of torch.polar's. freqs: [d/2]; angles[t, i] = t * freqs[i]: [end, d/2].
  const half = dim / 2;
  const freqs = Float64Array.from({ length: half }, (_, i) => Math.fround(1 / Math.fround(Math.pow(theta, Math.fround((2 * i) / dim)))));
  const [cos, sin] = [new Float32Array(end * half), new Float32Array(end * half)];
  for (let t = 0; t < end; t++) {
    for (let i = 0; i < half; i++) {
      cos[t * half + i] = Math.cos(Math.fround(t * freqs[i]));
      sin[t * half + i] = Math.sin(Math.fround(t * freqs[i]));
    }
  }
  return { cos: tf.tensor2d(cos, [end, half]), sin: tf.tensor2d(sin, [end, half]) };
}

// ----------------------------------------------------------------------------------------------
// 9. Transformer: embeddings, the blocks, a final norm and the output projection
/**
 * The additive attention mask [T, C]: 0 where the query at queryPositions[i] may see the key at
 * position firstKey + j, -inf elsewhere. One definition of the window for every path: a query sees
 * W keys, itself and the W-1 before it (0 <= q - k < W), what the decode cache of W slots holds; so
 * do the reference's xformers path and Hugging Face's port. W = 4 over a 6-token prefill:
 *
 *       key  0  1  2  3  4  5
 *   query 0  0  .  .  .  .  .        0: attends (adds 0)   .: -inf
 *   query 1  0  0  .  .  .  .
 *   query 2  0  0  0  .  .  .
 *   query 3  0  0  0  0  .  .
 *   query 4  x  0  0  0  0  .        x: the reference's prefill mask, triu(tril(ones), -W), also
 *   query 5  .  x  0  0  0  0           shows these: W+1 keys, disagreeing with its own cache
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

export class Transformer {
  readonly vocabSize: number;
  readonly nLayers: number;
  readonly tokEmbeddings: Weight; // [V, D]
  readonly layers: TransformerBlock[];
  readonly norm: RMSNorm;
  readonly output: Weight; // [V, D]
  readonly freqsCis: FreqsCis; // [MAX_POSITIONS, d/2] each
  /** Which position each cache slot holds, for every layer (they are written together). */
  book: SlotBook;

  constructor(readonly args: ModelArgs, readonly stateDict: StateDict) {
    this.vocabSize = args.vocabSize;
    this.nLayers = args.nLayers;
    this.tokEmbeddings = weight(stateDict, 'tok_embeddings.weight');
    this.layers = Array.from({ length: args.nLayers }, (_, i) => new TransformerBlock(args, stateDict, `layers.${i}`));
    this.norm = new RMSNorm(weight(stateDict, 'norm.weight'), args.normEps);
    this.output = weight(stateDict, 'output.weight');
    this.freqsCis = precomputeFreqsCis(args.headDim, MAX_POSITIONS, args.ropeTheta);
    this.book = new SlotBook(args.slidingWindow);
  }

  /**
   * inputIds: [B, T] int32; positions: [T] int32. Returns logits [B, T, V] float32 (the caller
   * disposes them). T > 1 is a prefill (tokens attend to each other under the mask), T = 1 a decode
   * step (the token attends to the cache). W = 4, a 6-token prompt in chunks of 4, then decoding:
   *
   *   positions    0 1 2 3 | 4 5         | 6             | 7 ...
   *   forward      prefill | chunk       | decode        | decode
   *   earlier      0       | 3 (1, 2, 3) | 3 (3, 4, 5)   | 3
   *   keys C       4       | 3 + 2       | 3 + 1, cache  | 4
   *   mask         [4, 4]  | [2, 5]      | none          | none
   */
  forward(inputIds: tf.Tensor2D, positions: tf.Tensor1D): tf.Tensor3D {
    const pos = Array.from(positions.dataSync());
    checkForwardInputs(this.args, inputIds.shape, inputIds.dataSync(), pos);
    // Counted once, for the mask and every layer's keys: the positions right before pos[0] that the
    // cache holds (none for a fresh sequence wherever it starts); then the slots this forward fills.
    const earlier = this.book.earlierKeys(pos[0]);
    const step: CacheStep = { earlier, slots: this.book.write(pos), book: this.book };
    try {
      return tf.tidy(() => {
        let h = tf.gather(this.tokEmbeddings.tensor(), inputIds) as tf.Tensor3D; // [B, T, D]
        const freqsCis: FreqsCis = { cos: tf.gather(this.freqsCis.cos, positions), sin: tf.gather(this.freqsCis.sin, positions) }; // [T, d/2]
        const mask = pos.length > 1 ? slidingWindowMask(pos, pos[0] - earlier, this.args.slidingWindow) : null; // [T, earlier + T]
        for (const layer of this.layers) h = layer.forward(h, freqsCis, pos, mask, step);
        return linear(this.norm.forward(h), this.output) as tf.Tensor3D; // [B, T, V]
      });
    } catch (err) {
      throw explainBackendFailure(err);
    }
  }

  /** from_folder: params.json and the weights from any layout checkpoint/ reads (folder, .tar, safetensors, HF). */
  static async fromFolder(folder: string, opts: LoadOptions = {}): Promise<Transformer> {
    const files = await openModel(folder, { onProgress: opts.onProgress, onNote: opts.onDecision });
    try {
      return Transformer.fromCheckpoint(files.params, files.paramsFile, files.weights, await withComputePool(files.params, files.paramsFile, opts));
    } finally { files.close(); }
  }

  /** Builds the model from params.json's contents and a reader of its weights (load_state_dict: model/load.ts). */
  static fromCheckpoint(params: unknown, paramsFile: string, checkpoint: WeightReader, opts: LoadOptions = {}): Transformer {
    const args = ModelArgs.fromParams(params, paramsFile);
    args.maxBatchSize = opts.maxBatchSize ?? 1;
    const { stateDict, decision } = loadStateDict(args, checkpoint, opts);
    if (decision !== undefined) (opts.onDecision ?? ((line: string) => process.stderr.write(`${line}\n`)))(decision);
    return new Transformer(args, stateDict);
  }

  /** Frees the weights, the caches and the rotary tables. */
  dispose(): void {
    for (const w of this.stateDict.values()) w.dispose();
    for (const layer of this.layers) layer.attention.dispose();
    tf.dispose([this.freqsCis.cos, this.freqsCis.sin]);
  }
}

// ----------------------------------------------------------------------------------------------
// 10. Tokenizer: SentencePiece, as the reference wraps it
export class Tokenizer {
  /** `processor` is the SentencePiece model itself (Python's sp), e.g. for streaming decode. */
  private constructor(readonly processor: SentencePieceProcessor) {}

  /** From a tokenizer.model file, or from its bytes (read out of a .tar). */
  static async load(source: string | TokenizerSource): Promise<Tokenizer> {
    if (typeof source === 'string') return new Tokenizer(await SentencePieceProcessor.load(source));
    if ('path' in source) return new Tokenizer(await SentencePieceProcessor.load(source.path));
    return new Tokenizer(await SentencePieceProcessor.loadBytes(source.bytes, source.name));
  }

  get nWords(): number { return this.processor.vocabSize; }
  get bosId(): number { return this.processor.bosId; }
  get eosId(): number { return this.processor.eosId; }
  /** -1 for Mistral's tokenizer, which has no pad piece: generate() pads with it and masks it out. */
  get padId(): number { return this.processor.padId; }

  encode(s: string, bos = true): number[] { return bos ? [this.bosId, ...this.processor.encode(s, false)] : this.processor.encode(s, false); }
  decode(t: number[]): string { return this.processor.decode(t); }
}

// ----------------------------------------------------------------------------------------------
// 11. generate: greedy decoding, batched the reference's way
/** texts (none when maxTokens is 0); per row, logprobs of the prompt tokens after the first and of each step's token; generatedIds fed at each step. */
export interface GenerateResult { texts: string[]; logprobs: number[][]; generatedIds: number[][] }

/**
 * The reference's generate(): prefill every row with the shortest prompt's length, then take
 * maxTokens single-token steps. At each step a row whose prompt is not used up is fed its own
 * next prompt token (teacher forcing); the others get the greedy argmax.
 */
export async function generate(
  prompts: string[], model: Transformer, tokenizer: Tokenizer, maxTokens: number,
  chunkLength = prefillChunkLength(model.args, prompts.length), // prefill chunks whose scores fit a budget (model/prefill.ts)
): Promise<GenerateResult> {
  const encodedPrompts = prompts.map((p) => tokenizer.encode(p));
  const [minPromptLen, maxPromptLen] = [Math.min(...encodedPrompts.map((x) => x.length)), Math.max(...encodedPrompts.map((x) => x.length))];
  const bsz = prompts.length;
  if (minPromptLen + maxTokens > MAX_POSITIONS) {
    throw new RangeError(`maxTokens ${maxTokens} after a ${minPromptLen}-token prefill runs past the model's ${MAX_POSITIONS} positions`);
  }

  // inputTokens: [B, maxPromptLen], padded with padId; inputMask marks the real prompt tokens.
  const inputTokens = encodedPrompts.map((x) => [...x, ...new Array<number>(maxPromptLen - x.length).fill(tokenizer.padId)]);
  const inputMask = inputTokens.map((row) => row.map((id) => id !== tokenizer.padId));

  // pre-fill, in chunks whose attention scores fit a memory budget (the same logits as one forward).
  // all_logprobs' first part, logprobs[b, t, inputTokens[b][t + 1]], is gathered on the backend chunk
  // by chunk (reading back all of [B, T, V] costs more than the forward). logprobs: [B, chunk, V].
  const allLogprobs: number[][] = inputTokens.map(() => []);
  let logprobs: tf.Tensor | null = null;
  for (const [from, to] of chunkRanges(minPromptLen, chunkLength)) {
    logprobs?.dispose();
    logprobs = tf.tidy((): tf.Tensor => {
      const ids = tf.tensor2d(inputTokens.map((row) => row.slice(from, to)), [bsz, to - from], 'int32');
      return tf.logSoftmax(model.forward(ids, tf.range(from, to, 1, 'int32') as tf.Tensor1D), -1);
    });
    const next = Math.min(to, minPromptLen - 1) - from; // positions of this chunk whose next token is in the prompt
    const indices = inputTokens.flatMap((row, b) => row.slice(from + 1, from + 1 + Math.max(0, next)).map((id, t) => [b, t, id]));
    const chunkLogprobs = logprobs;
    const chosen = next > 0 ? readBack(() => tf.gatherND(chunkLogprobs, tf.tensor2d(indices, [indices.length, 3], 'int32'))) : [];
    allLogprobs.forEach((row, b) => row.push(...Array.from(chosen).slice(b * next, (b + 1) * next)));
  }
  if (logprobs === null) throw new RangeError('generate() needs prompts of at least one token');

  // decode
  const generated: number[][] = inputTokens.map(() => []);
  let curPos = minPromptLen;
  for (let step = 0; step < maxTokens; step++) {
    // lastLogprobs: [B, V], the distribution over the token at curPos; only the argmax and the
    // chosen token's logprob of each row are read back.
    const last: tf.Tensor = logprobs;
    const lastLogprobs: tf.Tensor = tf.tidy(() => tf.reshape(tf.slice(last, [0, (last.shape[1] as number) - 1, 0], [bsz, 1, -1]), [bsz, -1]));
    const best = Array.from(readBack(() => tf.argMax(lastLogprobs, -1))); // the first maximum, as torch.argmax
    // Teacher forcing: a row still inside its prompt is fed its own token, not the argmax.
    const nextToken = best.map((id, b) => (curPos < maxPromptLen && inputMask[b][curPos] ? inputTokens[b][curPos] : id));
    const chosen = readBack(() => tf.gatherND(lastLogprobs, tf.tensor2d(nextToken.map((id, b) => [b, id]), [bsz, 2], 'int32')));
    lastLogprobs.dispose();
    nextToken.forEach((id, b) => void (allLogprobs[b].push(chosen[b]), generated[b].push(id)));
    logprobs.dispose();
    // As in the reference, the last step's forward runs too, though nothing reads its logits.
    logprobs = tf.tidy((): tf.Tensor => tf.logSoftmax(model.forward(tf.tensor2d(nextToken, [bsz, 1], 'int32'), tf.tensor1d([curPos], 'int32')), -1));
    curPos += 1;
  }
  logprobs.dispose();

  const texts: string[] = [];
  if (maxTokens > 0) encodedPrompts.forEach((x, i) => texts.push(tokenizer.decode([...x.slice(0, minPromptLen), ...generated[i]])));
  return { texts, logprobs: allLogprobs, generatedIds: generated };
}

// ----------------------------------------------------------------------------------------------
// 12. demo: the reference's three prompts
/** Tokenizer(folder / "tokenizer.model") and Transformer.from_folder(folder), from one read of any layout (a .tar is one stream). */
export async function loadModel(modelPath: string, opts: LoadOptions = {}): Promise<{ tokenizer: Tokenizer; transformer: Transformer }> {
  const files = await openModel(modelPath, { onProgress: opts.onProgress, onNote: opts.onDecision });
  try {
    const tokenizer = await Tokenizer.load(files.tokenizer);
    const transformer = Transformer.fromCheckpoint(files.params, files.paramsFile, files.weights, await withComputePool(files.params, files.paramsFile, opts));
    if (tokenizer.nWords > transformer.args.vocabSize) {
      transformer.dispose();
      throw new ModelArgsError(`${files.paramsFile}: vocab_size ${transformer.args.vocabSize} is smaller than the tokenizer's ${tokenizer.nWords} pieces`);
    }
    return { tokenizer, transformer };
  } finally { files.close(); }
}

export const DEMO_PROMPTS = ['This is a test', 'This is another test', 'This is a third test, mistral AI is very good at testing. '];

export async function demo(modelPath: string, maxTokens = 35, opts: LoadOptions = {}): Promise<void> {
  const { tokenizer, transformer } = await loadModel(modelPath, { ...opts, maxBatchSize: 3 });
  try {
    const { texts } = await generate(DEMO_PROMPTS, transformer, tokenizer, maxTokens);
    for (const x of texts) console.log(`${x}\n=====================`);
  } finally {
    transformer.dispose();
  }
}

// fire.Fire(demo): the command line is cli/main.ts, above this file; run as a script, this file hands over to it
// by a path computed at run time, so no import edge leads from the model to the commands (test/imports.test.ts).
if (require.main === module) (require(`${__dirname}/cli/main`) as { main: (argv: string[]) => void }).main(process.argv.slice(2));
