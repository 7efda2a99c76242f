/**
 * A Hugging Face Mistral folder (config.json, model*.safetensors or pytorch_model*.bin) seen as the
 * official one: config.json mapped to params.json's fields, and a WeightReader under the reference's
 * tensor names whose query and key rows are back in Mistral's order.
 *
 * HF's convert_mistral_weights_to_hf.py reorders the rows of every head of wq and wk so that HF's
 * rotary embedding, which rotates the first half of a head against the second half, computes what
 * Mistral's does on interleaved pairs (2i, 2i+1). For head h of d = head_dim rows, j in {0, 1} and
 * i < d/2, HF row h*d + j*d/2 + i holds Mistral row h*d + 2i + j. The reader undoes this as it reads.
 */
import * as fs from 'fs';
import * as path from 'path';
import { toFloat32 } from './dtypes';
import { CheckpointError, showValue } from './errors';
import { MAX_JSON_BYTES, readRegularFile } from './files';
import { openPth } from './pth';
import { openSafetensors } from './safetensors';
import type { RawTensor, WeightInfo, WeightReader } from './types';

/** params.json's fields, as the reference's ModelArgs names them (rope_theta only when config.json has it). */
export interface MistralParams {
  dim: number;
  n_layers: number;
  head_dim: number;
  hidden_dim: number;
  n_heads: number;
  n_kv_heads: number;
  sliding_window: number;
  norm_eps: number;
  vocab_size: number;
  rope_theta?: number;
}

/** Reads and parses a JSON file; a CheckpointError naming it otherwise. */
export function readJson(file: string): unknown {
  const text = readRegularFile(file, MAX_JSON_BYTES, 'a JSON file').toString('utf8');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new CheckpointError(file, `not valid JSON (${(err as Error).message})`);
  }
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

// ---------------------------------------------------------------------------------------------
// config.json -> params.json

/**
 * Maps a parsed Hugging Face config.json of a Mistral model to params.json's fields, checking each
 * field's type and that the model is one the reference implements. `file` names config.json in errors.
 */
export function paramsFromHfConfig(config: unknown, file: string): MistralParams {
  if (!isObject(config)) throw new CheckpointError(file, 'expected a JSON object (a Hugging Face model config)');
  const c = config;
  const show = showValue;
  const positiveInt = (name: string): number => {
    const v = c[name];
    if (v === undefined) throw new CheckpointError(file, `missing field "${name}"`);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
      throw new CheckpointError(file, `field "${name}" must be a positive integer, got ${show(v)}`);
    }
    return v;
  };
  const positiveNumber = (name: string): number => {
    const v = c[name];
    if (v === undefined) throw new CheckpointError(file, `missing field "${name}"`);
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) {
      throw new CheckpointError(file, `field "${name}" must be a positive number, got ${show(v)}`);
    }
    return v;
  };

  // What the reference implements: Mistral's architecture, SiLU gating, a separate output matrix, plain RoPE.
  const architectures = c.architectures;
  if (architectures !== undefined && architectures !== null) {
    if (!Array.isArray(architectures) || !architectures.every((a) => typeof a === 'string')) {
      throw new CheckpointError(file, `field "architectures" must be a list of strings, got ${show(architectures)}`);
    }
  }
  if (c.model_type !== undefined && typeof c.model_type !== 'string') {
    throw new CheckpointError(file, `field "model_type" must be a string, got ${show(c.model_type)}`);
  }
  const isMistral = c.model_type === 'mistral' || (Array.isArray(architectures) && architectures.includes('MistralForCausalLM'));
  if (!isMistral) {
    throw new CheckpointError(
      file,
      `model_type ${show(c.model_type)} (architectures ${show(architectures)}) is not supported: expected a Mistral model (model_type "mistral" or MistralForCausalLM)`,
    );
  }
  if (c.hidden_act !== undefined && c.hidden_act !== 'silu') {
    throw new CheckpointError(file, `hidden_act ${show(c.hidden_act)} is not supported (Mistral's feed-forward uses "silu")`);
  }
  if (c.tie_word_embeddings !== undefined && typeof c.tie_word_embeddings !== 'boolean') {
    throw new CheckpointError(file, `field "tie_word_embeddings" must be true or false, got ${show(c.tie_word_embeddings)}`);
  }
  if (c.tie_word_embeddings === true) {
    throw new CheckpointError(file, 'tie_word_embeddings true is not supported (Mistral has an output matrix of its own, lm_head)');
  }
  if (c.rope_scaling !== undefined && c.rope_scaling !== null) {
    throw new CheckpointError(file, `rope_scaling ${show(c.rope_scaling)} is not supported (the reference uses plain rotary embeddings)`);
  }

  const dim = positiveInt('hidden_size');
  const nHeads = positiveInt('num_attention_heads');
  let headDim: number;
  if (c.head_dim === undefined || c.head_dim === null) {
    // HF's default when the config has none.
    if (dim % nHeads !== 0) {
      throw new CheckpointError(file, `field "head_dim" is absent and hidden_size ${dim} is not a multiple of num_attention_heads ${nHeads}`);
    }
    headDim = dim / nHeads;
  } else {
    headDim = positiveInt('head_dim');
  }
  // sliding_window null means no window (later Mistral releases): every position sees all earlier
  // ones, which within the model's context is a window as long as max_position_embeddings.
  const slidingWindow = c.sliding_window === null ? positiveInt('max_position_embeddings') : positiveInt('sliding_window');
  const params: MistralParams = {
    dim,
    n_layers: positiveInt('num_hidden_layers'),
    head_dim: headDim,
    hidden_dim: positiveInt('intermediate_size'),
    n_heads: nHeads,
    n_kv_heads: positiveInt('num_key_value_heads'),
    sliding_window: slidingWindow,
    norm_eps: positiveNumber('rms_norm_eps'),
    vocab_size: positiveInt('vocab_size'),
  };
  if (c.rope_theta !== undefined && c.rope_theta !== null) params.rope_theta = positiveNumber('rope_theta');
  return params;
}

// ---------------------------------------------------------------------------------------------
// Tensor names and the q/k row permutation

const LAYER_PARTS: ReadonlyMap<string, string> = new Map([
  ['input_layernorm.weight', 'attention_norm.weight'],
  ['post_attention_layernorm.weight', 'ffn_norm.weight'],
  ['self_attn.q_proj.weight', 'attention.wq.weight'],
  ['self_attn.k_proj.weight', 'attention.wk.weight'],
  ['self_attn.v_proj.weight', 'attention.wv.weight'],
  ['self_attn.o_proj.weight', 'attention.wo.weight'],
  ['mlp.gate_proj.weight', 'feed_forward.w1.weight'],
  ['mlp.down_proj.weight', 'feed_forward.w2.weight'],
  ['mlp.up_proj.weight', 'feed_forward.w3.weight'],
]);

const TOP_LEVEL: ReadonlyMap<string, string> = new Map([
  ['model.embed_tokens.weight', 'tok_embeddings.weight'],
  ['model.norm.weight', 'norm.weight'],
  ['lm_head.weight', 'output.weight'],
]);

const EXPECTED_NAMES =
  'model.embed_tokens.weight, model.norm.weight, lm_head.weight, model.layers.N.{input_layernorm, post_attention_layernorm, ' +
  'self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight';

/**
 * The reference's name for HF tensor `name`: a string, `null` for a buffer that is not a weight
 * (rotary inv_freq), `undefined` for a name a Mistral model does not have.
 */
export function mistralName(name: string): string | null | undefined {
  const top = TOP_LEVEL.get(name);
  if (top !== undefined) return top;
  const m = /^model\.layers\.(0|[1-9]\d*)\.(.+)$/.exec(name);
  if (!m) return undefined;
  if (m[2] === 'self_attn.rotary_emb.inv_freq') return null;
  const part = LAYER_PARTS.get(m[2]);
  return part === undefined ? undefined : `layers.${m[1]}.${part}`;
}

type Rows = Uint16Array | Float32Array;

/** Moves the rows of a [rows, cols] matrix of `nHeads` heads between Mistral's order and HF's. */
function moveRows<T extends Rows>(data: T, shape: readonly number[], nHeads: number, toHf: boolean): T {
  const [rows, cols] = shape;
  if (shape.length !== 2 || data.length !== rows * cols) throw new RangeError(`expected a matrix, got shape [${shape}] of ${data.length} values`);
  if (!Number.isInteger(nHeads) || nHeads <= 0 || rows % nHeads !== 0 || (rows / nHeads) % 2 !== 0) {
    throw new RangeError(`${rows} rows cannot be split into ${nHeads} heads of an even size`);
  }
  const d = rows / nHeads;
  const half = d / 2;
  const out = new (data.constructor as new (length: number) => T)(data.length);
  for (let h = 0; h < nHeads; h++) {
    for (let j = 0; j < 2; j++) {
      for (let i = 0; i < half; i++) {
        const hfRow = h * d + j * half + i;
        const mistralRow = h * d + 2 * i + j;
        const [from, to] = toHf ? [mistralRow, hfRow] : [hfRow, mistralRow];
        out.set(data.subarray(from * cols, (from + 1) * cols), to * cols);
      }
    }
  }
  return out;
}

/** HF's permutation, as its converter applies it to wq (n_heads) and wk (n_kv_heads): Mistral rows -> HF rows. */
export function permuteRowsToHf<T extends Rows>(data: T, shape: readonly number[], nHeads: number): T {
  return moveRows(data, shape, nHeads, true);
}

/** Its inverse: HF rows -> Mistral rows. */
export function unpermuteRowsFromHf<T extends Rows>(data: T, shape: readonly number[], nHeads: number): T {
  return moveRows(data, shape, nHeads, false);
}

// ---------------------------------------------------------------------------------------------
// The folder's weight files

/** The weight files HF writes, in the order transformers prefers them. */
export const HF_WEIGHT_FILES = ['model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json'] as const;

/** The first of HF_WEIGHT_FILES that `folder` holds, or null. */
export function findHfWeights(folder: string): (typeof HF_WEIGHT_FILES)[number] | null {
  for (const name of HF_WEIGHT_FILES) {
    if (fs.existsSync(path.join(folder, name))) return name;
  }
  return null;
}

const openWeightFile = (file: string): WeightReader => (file.endsWith('.safetensors') ? openSafetensors(file) : openPth(file));

/** Where each HF tensor lives: one file for all, or the shards an index names. */
function openShards(folder: string, weightsName: string): { readers: WeightReader[]; placement: [string, WeightReader][] } {
  const file = path.join(folder, weightsName);
  if (!weightsName.endsWith('.index.json')) {
    const reader = openWeightFile(file);
    return { readers: [reader], placement: [...reader.tensors.keys()].map((name) => [name, reader]) };
  }
  const index = readJson(file);
  if (!isObject(index) || !isObject(index.weight_map)) {
    throw new CheckpointError(file, 'expected an object with "weight_map": {tensor name: shard file}');
  }
  const weightMap = Object.entries(index.weight_map);
  const shards = new Map<string, WeightReader>();
  try {
    for (const [name, shard] of weightMap) {
      if (typeof shard !== 'string' || shard === '' || shard !== path.basename(shard) || shard === '..') {
        throw new CheckpointError(file, `weight_map gives "${name}" the shard ${showValue(shard)}; expected a file name in the same folder`);
      }
      if (!shards.has(shard)) {
        if (!fs.existsSync(path.join(folder, shard))) {
          throw new CheckpointError(file, `weight_map names shard "${shard}" (for "${name}"), which is not in ${folder}`);
        }
        shards.set(shard, openWeightFile(path.join(folder, shard)));
      }
    }
    // The index decides which shard each tensor comes from; it must be there.
    const placement: [string, WeightReader][] = weightMap.map(([name, shard]) => {
      const reader = shards.get(shard as string) as WeightReader;
      if (!reader.tensors.has(name)) throw new CheckpointError(file, `weight_map puts "${name}" in ${shard as string}, which has no such tensor`);
      return [name, reader];
    });
    return { readers: [...shards.values()], placement };
  } catch (err) {
    for (const reader of shards.values()) reader.close();
    throw err;
  }
}

interface Source {
  readonly reader: WeightReader;
  readonly hfName: string;
  /** Heads to un-permute the rows by (wq, wk), 0 for none. */
  readonly heads: number;
}

class HfWeights implements WeightReader {
  readonly tensors = new Map<string, WeightInfo>();
  private readonly sources = new Map<string, Source>();

  constructor(
    readonly path: string,
    private readonly readers: WeightReader[],
    placement: [string, WeightReader][],
    params: MistralParams,
  ) {
    for (const [hfName, reader] of placement) {
      const name = mistralName(hfName);
      if (name === null) continue;
      if (name === undefined) {
        throw new CheckpointError(reader.path, `unknown weight "${hfName}" for a Mistral model (expected ${EXPECTED_NAMES})`);
      }
      if (this.sources.has(name)) {
        throw new CheckpointError(reader.path, `"${hfName}" is a second copy of ${name}`);
      }
      const info = reader.tensors.get(hfName) as WeightInfo;
      let heads = 0;
      if (name.endsWith('.attention.wq.weight')) heads = params.n_heads;
      if (name.endsWith('.attention.wk.weight')) heads = params.n_kv_heads;
      if (heads && (info.shape.length !== 2 || info.shape[0] !== heads * params.head_dim)) {
        throw new CheckpointError(
          reader.path,
          `"${hfName}" has shape [${info.shape}], expected ${heads * params.head_dim} rows (${heads} heads of head_dim ${params.head_dim}, from config.json)`,
        );
      }
      this.tensors.set(name, info);
      this.sources.set(name, { reader, hfName, heads });
    }
  }

  readRaw(name: string): RawTensor {
    const source = this.sources.get(name);
    if (!source) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    const raw = source.reader.readRaw(source.hfName);
    if (!source.heads) return raw;
    return { dtype: raw.dtype, shape: raw.shape, data: unpermuteRowsFromHf(raw.data, raw.shape, source.heads) };
  }

  read(name: string): Float32Array {
    return toFloat32(this.readRaw(name));
  }

  /**
   * Straight from the shard when its rows are in Mistral's order; wq and wk (permuted in HF) go
   * through readRaw, un-permuted once and kept while their pieces are read (the last one only).
   */
  readRawInto(name: string, byteOffset: number, target: Uint8Array): void {
    const source = this.sources.get(name);
    if (!source) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    if (!source.heads && source.reader.readRawInto) return source.reader.readRawInto(source.hfName, byteOffset, target);
    if (this.unpermuted?.name !== name) {
      const { data } = this.readRaw(name);
      this.unpermuted = { name, bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
    }
    target.set(this.unpermuted.bytes.subarray(byteOffset, byteOffset + target.length));
    if (byteOffset + target.length >= this.unpermuted.bytes.length) this.unpermuted = null; // its last piece
  }

  private unpermuted: { name: string; bytes: Uint8Array } | null = null;

  close(): void {
    this.unpermuted = null;
    for (const reader of this.readers) reader.close();
  }
}

/**
 * The weights of HF folder `folder` under the reference's names, wq/wk rows in Mistral's order.
 * `weightsName` is one of HF_WEIGHT_FILES (findHfWeights); `params` come from its config.json.
 */
export function openHfWeights(folder: string, weightsName: string, params: MistralParams): WeightReader {
  const { readers, placement } = openShards(folder, weightsName);
  try {
    return new HfWeights(folder, readers, placement, params);
  } catch (err) {
    for (const reader of readers) reader.close();
    throw err;
  }
}

/** An HF Mistral folder: its config mapped to params.json's fields and its weights under Mistral's names. */
export function openHfFolder(folder: string): { params: MistralParams; paramsFile: string; weights: WeightReader } {
  const paramsFile = path.join(folder, 'config.json');
  const params = paramsFromHfConfig(readJson(paramsFile), paramsFile);
  const weightsName = findHfWeights(folder);
  if (weightsName === null) {
    throw new CheckpointError(folder, `no weights: expected one of ${HF_WEIGHT_FILES.join(', ')}`);
  }
  return { params, paramsFile, weights: openHfWeights(folder, weightsName, params) };
}
