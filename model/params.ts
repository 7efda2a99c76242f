/**
 * params.json, checked: what one_file_ref.py gets from `ModelArgs(**json.loads(...))` (which
 * rejects unknown and missing fields) plus what Python would only find out later or never: wrong
 * types, sizes no machine can hold, a head count that does not divide. Also the checks on a
 * forward's inputs that torch makes inside its kernels (an id outside the embedding table, a
 * position past the rotary table).
 */

export class ModelArgsError extends Error {
  override name = 'ModelArgsError';
}

/** How many positions the rotary table covers, as in the reference (`precompute_freqs_cis(..., 128_000)`). */
export const MAX_POSITIONS = 128_000;

/**
 * params.json's fields as the reference's dataclass names them, and the largest value accepted.
 * The limits are far above any released Mistral (7B: 32 layers, dim 4096, hidden 14336, vocab
 * 32000; the largest open models have ~130 layers and vocabularies of ~260k) and low enough that
 * no list, map or table sized by them is allocated before the checkpoint is compared with them.
 */
const PARAMS_FIELDS = {
  dim: { kind: 'int', max: 2 ** 17 },
  n_layers: { kind: 'int', max: 1024 },
  head_dim: { kind: 'int', max: 2 ** 14 },
  hidden_dim: { kind: 'int', max: 2 ** 19 },
  n_heads: { kind: 'int', max: 2 ** 12 },
  n_kv_heads: { kind: 'int', max: 2 ** 12 },
  sliding_window: { kind: 'int', max: 2 ** 24 },
  norm_eps: { kind: 'float', max: 1 },
  vocab_size: { kind: 'int', max: 2 ** 22 },
  rope_theta: { kind: 'float', max: 1e12 }, // not in v0.1's params.json (10000 then); later releases write it
} as const;
type Field = keyof typeof PARAMS_FIELDS;

/** The hyperparameters, validated, in the reference's names. */
export type Params = Record<Field, number>;

/** Validates a parsed params.json; `file` names it in errors. */
export function validateParams(params: unknown, file = 'params.json'): Params {
  if (typeof params !== 'object' || params === null || Array.isArray(params)) {
    throw new ModelArgsError(`${file}: expected a JSON object of model hyperparameters`);
  }
  const p = params as Record<string, unknown>;
  const known = (key: string): key is Field => Object.prototype.hasOwnProperty.call(PARAMS_FIELDS, key);
  // Own keys only, compared as own keys: "__proto__" (an own key after JSON.parse) is unknown like any other.
  for (const key of Object.keys(p)) {
    if (!known(key)) {
      throw new ModelArgsError(`${file}: unknown field ${JSON.stringify(key)} (Mistral 7B's fields are ${Object.keys(PARAMS_FIELDS).join(', ')})`);
    }
  }
  const out = {} as Params;
  for (const name of Object.keys(PARAMS_FIELDS) as Field[]) {
    const { kind, max } = PARAMS_FIELDS[name];
    const v = Object.prototype.hasOwnProperty.call(p, name) ? p[name] : name === 'rope_theta' ? 10000 : undefined;
    if (v === undefined) throw new ModelArgsError(`${file}: missing field "${name}"`);
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      throw new ModelArgsError(`${file}: field "${name}" must be a number, got ${JSON.stringify(v)}`);
    }
    if (kind === 'int' && !Number.isInteger(v)) throw new ModelArgsError(`${file}: field "${name}" must be an integer, got ${v}`);
    if (v <= 0) throw new ModelArgsError(`${file}: field "${name}" must be positive, got ${v}`);
    if (v > max) throw new ModelArgsError(`${file}: field "${name}" is ${v}, more than ${max}, the largest this port accepts`);
    out[name] = v;
  }
  if (out.n_heads % out.n_kv_heads !== 0) {
    throw new ModelArgsError(`${file}: field "n_heads" (${out.n_heads}) must be a multiple of "n_kv_heads" (${out.n_kv_heads})`);
  }
  if (out.head_dim % 2 !== 0) {
    throw new ModelArgsError(`${file}: field "head_dim" must be even for rotary embeddings, got ${out.head_dim}`);
  }
  // Every weight must fit one typed array (2^32 - 1 elements at most in V8; 2^31 keeps a margin).
  const largest = Math.max(out.vocab_size * out.dim, out.hidden_dim * out.dim, out.n_heads * out.head_dim * out.dim);
  if (largest >= 2 ** 31) {
    throw new ModelArgsError(`${file}: a weight of ${largest} elements (from "dim", "hidden_dim", "vocab_size", "n_heads", "head_dim") is more than one array can hold`);
  }
  return out;
}

/** The hyperparameters a forward's inputs are checked against. */
export interface InputLimits {
  readonly maxBatchSize: number;
  readonly vocabSize: number;
}

/**
 * What torch checks inside its kernels, checked before any tensor work: rows within the cache,
 * one position per token, positions within the rotary table, ids within the vocabulary. `ids` are
 * the token ids as the caller has them on the host (no read-back from the backend).
 */
export function checkForwardInputs(args: InputLimits, shape: readonly number[], ids: ArrayLike<number>, positions: readonly number[]): void {
  const [bsz, seqlen] = shape;
  if (bsz > args.maxBatchSize) throw new RangeError(`batch of ${bsz} rows exceeds maxBatchSize ${args.maxBatchSize}`);
  if (positions.length !== seqlen) throw new RangeError(`positions has ${positions.length} entries for ${seqlen} tokens`);
  if (positions.some((p) => !Number.isInteger(p) || p < 0 || p >= MAX_POSITIONS)) {
    throw new RangeError(`positions must be integers in [0, ${MAX_POSITIONS})`);
  }
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (!Number.isInteger(id) || id < 0 || id >= args.vocabSize) {
      throw new RangeError(`token id ${id} is outside the vocabulary [0, ${args.vocabSize})`);
    }
  }
}
