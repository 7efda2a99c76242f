/**
 * Reads a GGUF file (llama.cpp's format, version 3; ggml's docs/gguf.md), all little-endian:
 *
 *   magic "GGUF", version u32, tensor_count u64, metadata_kv_count u64,
 *   metadata_kv_count x { key: string, value_type: u32, value },   string = u64 length + UTF-8 bytes,
 *   tensor_count x { name: string, n_dims: u32, ne: u64[n_dims], ggml_type: u32, offset: u64 },
 *   padding to `general.alignment` (default 32), then the tensor data; each tensor's offset is
 *   counted from the start of the data and is a multiple of the alignment.
 *
 * A tensor's dims are listed innermost first: ne[0] is the number of columns (the contiguous axis),
 * so a PyTorch weight of shape [rows, cols] is stored with ne = [cols, rows]. The reader gives shapes
 * in PyTorch's order (ne reversed), and names mapped to the reference's (blk.N.attn_q ->
 * layers.N.attention.wq, ...), so the model loads a GGUF like any other layout.
 *
 * Only headers are read when the file is opened (bounded: every count and length is checked against
 * the bytes left in the file before anything is allocated); tensor data is read on request.
 *
 * The query/key row order. Hugging Face checkpoints store wq and wk with the rows of each head
 * reordered for HF's "rotate half" rotary (HF row h*d + j*d/2 + i holds Mistral row h*d + 2i + j;
 * see checkpoint/hf.ts). llama.cpp's convert_hf_to_gguf.py undoes that when it writes a GGUF: its
 * LlamaModel.permute(w, n_head, n_head_kv) is
 *     w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
 * which sends HF row (h, j, i) to GGUF row (h, i, j) = h*d + 2i + j: Mistral's own order, in which
 * rows 2i and 2i+1 of a head are the rotary pair. llama.cpp's "llama" architecture then rotates
 * adjacent pairs (LLAMA_ROPE_TYPE_NORM), exactly what the reference's apply_rotary_emb does on
 * view_as_complex pairs. So a GGUF's q/k rows are used as they are, and the writer
 * (checkpoint/gguf_write.ts) writes the reference's rows unchanged. test/gguf.test.ts proves it on
 * the HF fixture: converting it gives the reference's logits, and the rows equal permute(HF rows).
 */
import * as fs from 'fs';
import * as os from 'os';
import { toFloat32 } from './dtypes';
import { CheckpointError } from './errors';
import { readExactly } from './files';
import type { MistralParams } from './hf';
import { Q8_0_BLOCK, Q8_0_BLOCK_BYTES, type RawTensor, type WeightDtype, type WeightInfo, type WeightReader } from './types';

export const GGUF_MAGIC = 'GGUF';
export const GGUF_DEFAULT_ALIGNMENT = 32;

/** GGUF metadata value types. */
export const GgufType = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;

export const GGUF_TYPE_NAMES = [
  'UINT8', 'INT8', 'UINT16', 'INT16', 'UINT32', 'INT32', 'FLOAT32', 'BOOL', 'STRING', 'ARRAY', 'UINT64', 'INT64', 'FLOAT64',
];

/** Bytes per element of the fixed-size metadata types (strings and arrays: none). */
const GGUF_TYPE_SIZE: Record<number, number> = { 0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8 };

/** ggml tensor types: the ones read here, and the names of the others for error messages. */
export const GgmlType = { F32: 0, F16: 1, Q8_0: 8, BF16: 30 } as const;
export type GgmlTypeName = keyof typeof GgmlType;

const GGML_TYPE_NAMES: Record<number, string> = {
  0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 4: 'Q4_2', 5: 'Q4_3', 6: 'Q5_0', 7: 'Q5_1', 8: 'Q8_0', 9: 'Q8_1',
  10: 'Q2_K', 11: 'Q3_K', 12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS',
  18: 'IQ3_XXS', 19: 'IQ1_S', 20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16',
  26: 'I32', 27: 'I64', 28: 'F64', 29: 'IQ1_M', 30: 'BF16', 31: 'Q4_0_4_4', 32: 'Q4_0_4_8', 33: 'Q4_0_8_8',
  34: 'TQ1_0', 35: 'TQ2_0', 36: 'IQ4_NL_4_4', 37: 'IQ4_NL_4_8', 38: 'IQ4_NL_8_8', 39: 'MXFP4',
};

export const ggmlTypeName = (type: number): string => GGML_TYPE_NAMES[type] ?? `unknown type ${type}`;

export { Q8_0_BLOCK, Q8_0_BLOCK_BYTES };

/** The largest number of dims a ggml tensor has. */
const GGML_MAX_DIMS = 4;

/** A metadata value: numbers (64-bit integers as bigint), booleans, strings, arrays of one type. */
export type GgufScalar = number | bigint | boolean | string;
export type GgufArray =
  | { readonly itemType: number; readonly values: readonly GgufScalar[] }
  | { readonly itemType: number; readonly values: readonly GgufArray[] };
export interface GgufEntry {
  readonly type: number;
  /** For ARRAY: the item type. */
  readonly itemType?: number;
  readonly value: GgufScalar | GgufArray;
}

export interface GgufTensorInfo extends WeightInfo {
  /** The name in the file (token_embd.weight, blk.0.attn_q.weight, ...). */
  readonly ggufName: string;
  readonly ggmlType: GgmlTypeName;
  /** ne as stored: innermost (columns) first. */
  readonly ne: readonly number[];
  readonly fileOffset: number;
  readonly byteLength: number;
}

/** The vocabulary as tokenizer.ggml.* gives it (model "llama": SentencePiece). */
export interface GgufVocab {
  tokens: string[];
  scores: Float32Array;
  tokenTypes: Int32Array;
  bosId: number;
  eosId: number;
  unkId: number;
  padId?: number;
  addBos?: boolean;
  addSpacePrefix?: boolean;
}

export interface GgufFile extends WeightReader {
  readonly version: number;
  readonly alignment: number;
  readonly metadata: ReadonlyMap<string, GgufEntry>;
  /** Tensors under the reference's names, in file order; dtype is how read() gives them (Q8_0: float32). */
  readonly tensors: ReadonlyMap<string, GgufTensorInfo>;
  /** The hyperparameters under params.json's names. */
  readonly params: MistralParams;
  /** Notes for stderr (a default taken for a missing key). */
  readonly warnings: readonly string[];
  /** The vocabulary for the tokenizer; throws CheckpointError when the metadata has none usable. */
  vocab(): GgufVocab;
  /** A Q8_0 tensor's blocks as stored (34 bytes per 32 weights, rows of ne[0]/32 blocks), for kernels that take them as they are. */
  readQ8_0Blocks(name: string): Uint8Array;
}

// ---------------------------------------------------------------------------------------------
// Tensor names

const LAYER_NAMES: Record<string, string> = {
  attn_q: 'attention.wq',
  attn_k: 'attention.wk',
  attn_v: 'attention.wv',
  attn_output: 'attention.wo',
  ffn_gate: 'feed_forward.w1',
  ffn_down: 'feed_forward.w2',
  ffn_up: 'feed_forward.w3',
  attn_norm: 'attention_norm',
  ffn_norm: 'ffn_norm',
};
const TOP_NAMES: Record<string, string> = { token_embd: 'tok_embeddings', output_norm: 'norm', output: 'output' };

/** The reference's name for a GGUF tensor name, or null when it is not one of the model's. */
export function referenceName(ggufName: string): string | null {
  const layer = /^blk\.(\d+)\.([a-z_]+)\.weight$/.exec(ggufName);
  if (layer) {
    const mapped = LAYER_NAMES[layer[2]];
    return mapped && String(Number(layer[1])) === layer[1] ? `layers.${layer[1]}.${mapped}.weight` : null;
  }
  const top = /^([a-z_]+)\.weight$/.exec(ggufName);
  return top && TOP_NAMES[top[1]] ? `${TOP_NAMES[top[1]]}.weight` : null;
}

/** The GGUF name for a reference tensor name (the inverse of referenceName). */
export function ggufName(reference: string): string {
  const layer = /^layers\.(\d+)\.(.+)\.weight$/.exec(reference);
  if (layer) {
    const entry = Object.entries(LAYER_NAMES).find(([, v]) => v === layer[2]);
    if (entry) return `blk.${layer[1]}.${entry[0]}.weight`;
  }
  const top = Object.entries(TOP_NAMES).find(([, v]) => `${v}.weight` === reference);
  if (top) return `${top[0]}.weight`;
  throw new Error(`no GGUF name for tensor "${reference}"`);
}

// ---------------------------------------------------------------------------------------------
// Reading the header

/** The header is read from the file in pieces of this size as the parser needs them. */
const HEADER_CHUNK = 1 << 20;

/** Strict UTF-8 that keeps a leading U+FEFF (Mistral v1 has a piece that is exactly that). */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** A forward cursor over the file's header bytes, reading more from the file as needed. */
class HeaderCursor {
  private buf = Buffer.alloc(0);
  /** File offset of buf[0]. */
  private bufStart = 0;
  pos = 0;

  constructor(
    private readonly fd: number,
    readonly fileSize: number,
    private readonly file: string,
  ) {}

  get left(): number {
    return this.fileSize - this.pos;
  }

  fail(problem: string): never {
    throw new CheckpointError(this.file, problem);
  }

  private need(n: number, what: string): Buffer {
    if (n > this.left) {
      this.fail(`truncated: ${what} at byte ${this.pos} needs ${n} bytes, the ${this.fileSize}-byte file has ${this.left} left`);
    }
    const end = this.pos + n;
    if (end > this.bufStart + this.buf.length) {
      const from = this.pos;
      const length = Math.min(this.fileSize - from, Math.max(n, HEADER_CHUNK));
      const buf = Buffer.alloc(length);
      for (let done = 0; done < length; ) {
        const got = fs.readSync(this.fd, buf, done, length - done, from + done);
        if (got === 0) this.fail(`unexpected end of file at byte ${from + done} (the file shrank?)`);
        done += got;
      }
      this.buf = buf;
      this.bufStart = from;
    }
    const at = this.pos - this.bufStart;
    this.pos = end;
    return this.buf.subarray(at, at + n);
  }

  u8(what: string): number {
    return this.need(1, what)[0];
  }
  u32(what: string): number {
    return this.need(4, what).readUInt32LE(0);
  }
  u64(what: string): bigint {
    return this.need(8, what).readBigUInt64LE(0);
  }
  /** A u64 that must fit a safe integer and be at most `max`. */
  count(what: string, max: number, unit: string): number {
    const at = this.pos;
    const v = this.u64(what);
    if (v > BigInt(max)) {
      this.fail(`${what} at byte ${at} is ${v}, but only ${max} ${unit} fit in the rest of the file: corrupt or truncated`);
    }
    return Number(v);
  }
  string(what: string): string {
    const length = this.count(`length of ${what}`, this.left - 8, 'bytes');
    const bytes = this.need(length, what);
    try {
      return UTF8.decode(bytes);
    } catch {
      return this.fail(`${what} at byte ${this.pos - length} is not UTF-8 text`);
    }
  }
  bytes(n: number, what: string): Buffer {
    return this.need(n, what);
  }
}

function readScalar(c: HeaderCursor, type: number, what: string): GgufScalar {
  switch (type) {
    case GgufType.UINT8:
      return c.bytes(1, what).readUInt8(0);
    case GgufType.INT8:
      return c.bytes(1, what).readInt8(0);
    case GgufType.UINT16:
      return c.bytes(2, what).readUInt16LE(0);
    case GgufType.INT16:
      return c.bytes(2, what).readInt16LE(0);
    case GgufType.UINT32:
      return c.bytes(4, what).readUInt32LE(0);
    case GgufType.INT32:
      return c.bytes(4, what).readInt32LE(0);
    case GgufType.FLOAT32:
      return c.bytes(4, what).readFloatLE(0);
    case GgufType.BOOL: {
      const at = c.pos;
      const b = c.u8(what);
      if (b > 1) c.fail(`${what} at byte ${at} is a BOOL of value ${b}, expected 0 or 1`);
      return b === 1;
    }
    case GgufType.STRING:
      return c.string(what);
    case GgufType.UINT64:
      return c.bytes(8, what).readBigUInt64LE(0);
    case GgufType.INT64:
      return c.bytes(8, what).readBigInt64LE(0);
    case GgufType.FLOAT64:
      return c.bytes(8, what).readDoubleLE(0);
    default:
      return c.fail(`${what} has value type ${type}, expected 0..12 (a GGUF metadata type)`);
  }
}

/** Nested arrays deeper than this are refused (the format allows them; llama.cpp writes none). */
const MAX_ARRAY_DEPTH = 8;

function readArray(c: HeaderCursor, what: string, depth: number): GgufArray {
  if (depth > MAX_ARRAY_DEPTH) c.fail(`${what}: arrays nested deeper than ${MAX_ARRAY_DEPTH}`);
  const itemType = c.u32(`item type of ${what}`);
  if (itemType > GgufType.FLOAT64) c.fail(`${what} has item type ${itemType}, expected 0..12 (a GGUF metadata type)`);
  // Each item takes at least this many bytes of the file: bounds the count before allocating.
  const minItem = itemType === GgufType.STRING || itemType === GgufType.ARRAY ? 8 + (itemType === GgufType.ARRAY ? 4 : 0) : GGUF_TYPE_SIZE[itemType];
  const n = c.count(`item count of ${what}`, Math.floor((c.left - 8) / minItem), 'items');
  if (itemType === GgufType.ARRAY) {
    const values: GgufArray[] = [];
    for (let i = 0; i < n; i++) values.push(readArray(c, `${what}[${i}]`, depth + 1));
    return { itemType, values };
  }
  const values: GgufScalar[] = new Array(n);
  for (let i = 0; i < n; i++) values[i] = readScalar(c, itemType, `${what}[${i}]`);
  return { itemType, values };
}

// ---------------------------------------------------------------------------------------------
// Typed access to metadata

const typeName = (t: number): string => GGUF_TYPE_NAMES[t] ?? `type ${t}`;
const INTEGER_TYPES = new Set<number>([0, 1, 2, 3, 4, 5, 10, 11]);
const FLOAT_TYPES = new Set<number>([6, 12]);

class Metadata {
  constructor(
    readonly entries: Map<string, GgufEntry>,
    private readonly file: string,
  ) {}

  private fail(problem: string): never {
    throw new CheckpointError(this.file, problem);
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  private get(key: string, required: boolean): GgufEntry | undefined {
    const e = this.entries.get(key);
    if (e === undefined && required) this.fail(`metadata key "${key}" is missing`);
    return e;
  }

  string(key: string, required = true): string | undefined {
    const e = this.get(key, required);
    if (e === undefined) return undefined;
    if (e.type !== GgufType.STRING) this.fail(`metadata key "${key}" has type ${typeName(e.type)}, expected STRING`);
    return e.value as string;
  }

  /** An integer of any integer type, in [min, max]. */
  int(key: string, required: boolean, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
    const e = this.get(key, required);
    if (e === undefined) return undefined;
    if (!INTEGER_TYPES.has(e.type)) this.fail(`metadata key "${key}" has type ${typeName(e.type)}, expected an integer`);
    const v = e.value as number | bigint;
    if (v < min || v > max) this.fail(`metadata key "${key}" is ${v}, expected an integer in [${min}, ${max}]`);
    return Number(v);
  }

  float(key: string, required: boolean): number | undefined {
    const e = this.get(key, required);
    if (e === undefined) return undefined;
    if (!FLOAT_TYPES.has(e.type)) this.fail(`metadata key "${key}" has type ${typeName(e.type)}, expected FLOAT32 or FLOAT64`);
    const v = e.value as number;
    if (!Number.isFinite(v) || v <= 0) this.fail(`metadata key "${key}" is ${v}, expected a positive number`);
    return v;
  }

  bool(key: string): boolean | undefined {
    const e = this.get(key, false);
    if (e === undefined) return undefined;
    if (e.type !== GgufType.BOOL) this.fail(`metadata key "${key}" has type ${typeName(e.type)}, expected BOOL`);
    return e.value as boolean;
  }

  array(key: string, itemTypes: readonly number[], what: string): readonly GgufScalar[] {
    const e = this.get(key, true)!;
    const arr = e.value as GgufArray;
    if (e.type !== GgufType.ARRAY || !itemTypes.includes(arr.itemType)) {
      const got = e.type === GgufType.ARRAY ? `ARRAY of ${typeName(arr.itemType)}` : typeName(e.type);
      this.fail(`metadata key "${key}" has type ${got}, expected ARRAY of ${what}`);
    }
    return arr.values as readonly GgufScalar[];
  }
}

// ---------------------------------------------------------------------------------------------
// The file

class Gguf implements GgufFile {
  readonly path: string;
  readonly version: number;
  readonly alignment: number;
  readonly metadata: Map<string, GgufEntry>;
  readonly tensors: Map<string, GgufTensorInfo>;
  readonly params: MistralParams;
  readonly warnings: string[] = [];
  private readonly meta: Metadata;
  private fd: number | null;

  constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
    if (os.endianness() !== 'LE') throw new CheckpointError(path, 'reading GGUF needs a little-endian machine');
    const fileSize = fs.fstatSync(fd).size;
    const c = new HeaderCursor(fd, fileSize, path);
    if (fileSize < 4) c.fail(`file is ${fileSize} bytes, too short for the GGUF magic: not a GGUF file`);
    const magic = c.bytes(4, 'the magic').toString('latin1');
    if (magic !== GGUF_MAGIC) {
      c.fail(`magic ${JSON.stringify(magic)} (bytes ${Buffer.from(magic, 'latin1').toString('hex')}), expected "GGUF": not a GGUF file`);
    }
    this.version = c.u32('the version');
    if (this.version !== 2 && this.version !== 3) {
      c.fail(`GGUF version ${this.version} is not supported (expected 3; 2 is read too)`);
    }
    // Every tensor info takes at least 8 + 4 + 4 + 8 bytes and every key/value 8 + 4 + 1.
    const tensorCount = c.count('tensor count', Math.floor((c.left - 16) / 24), 'tensors');
    const kvCount = c.count('metadata count', Math.floor((c.left - 8) / 13), 'metadata entries');

    this.metadata = new Map();
    for (let i = 0; i < kvCount; i++) {
      const key = c.string(`metadata key #${i}`);
      if (this.metadata.has(key)) c.fail(`metadata key "${key}" appears twice`);
      const type = c.u32(`value type of metadata key "${key}"`);
      if (type === GgufType.ARRAY) {
        const arr = readArray(c, `metadata key "${key}"`, 0);
        this.metadata.set(key, { type, itemType: arr.itemType, value: arr });
      } else {
        this.metadata.set(key, { type, value: readScalar(c, type, `metadata key "${key}"`) });
      }
    }
    this.meta = new Metadata(this.metadata, path);
    this.alignment = this.meta.int('general.alignment', false, 1, 1 << 30) ?? GGUF_DEFAULT_ALIGNMENT;
    if (this.alignment % 8 !== 0) c.fail(`general.alignment is ${this.alignment}, expected a multiple of 8`);

    const architecture = this.meta.string('general.architecture');
    if (architecture !== 'llama') {
      c.fail(`general.architecture is ${JSON.stringify(architecture)}, not supported: expected "llama" (Mistral 7B's GGUF architecture)`);
    }

    const infos: { ggufName: string; ne: number[]; type: number; offset: number }[] = [];
    const seen = new Set<string>();
    for (let i = 0; i < tensorCount; i++) {
      const name = c.string(`name of tensor #${i}`);
      if (seen.has(name)) c.fail(`tensor "${name}" appears twice`);
      seen.add(name);
      const nDims = c.u32(`dims count of tensor "${name}"`);
      if (nDims < 1 || nDims > GGML_MAX_DIMS) c.fail(`tensor "${name}" has ${nDims} dims, expected 1 to ${GGML_MAX_DIMS}`);
      const ne: number[] = [];
      for (let d = 0; d < nDims; d++) ne.push(c.count(`ne[${d}] of tensor "${name}"`, Number.MAX_SAFE_INTEGER, 'elements'));
      const type = c.u32(`type of tensor "${name}"`);
      const offset = c.count(`offset of tensor "${name}"`, Number.MAX_SAFE_INTEGER, 'bytes');
      infos.push({ ggufName: name, ne, type, offset });
    }
    const dataStart = Math.ceil(c.pos / this.alignment) * this.alignment;
    if (dataStart > fileSize) c.fail(`truncated: the tensor data would start at byte ${dataStart}, past the end of the ${fileSize}-byte file`);
    this.tensors = this.checkTensors(infos, dataStart, fileSize);
    this.params = this.readParams();
  }

  private checkTensors(
    infos: { ggufName: string; ne: number[]; type: number; offset: number }[],
    dataStart: number,
    fileSize: number,
  ): Map<string, GgufTensorInfo> {
    const fail = (problem: string): never => {
      throw new CheckpointError(this.path, problem);
    };
    const out: GgufTensorInfo[] = [];
    const names = new Map<string, string>();
    for (const { ggufName: gname, ne, type, offset } of infos) {
      const where = `tensor "${gname}"`;
      const name = referenceName(gname);
      if (name === null) {
        fail(`${where} is not a tensor of Mistral's llama architecture (expected token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, output_norm, output)`);
      }
      names.set(name!, gname);
      const typeName = GGML_TYPE_NAMES[type];
      if (type !== GgmlType.F32 && type !== GgmlType.F16 && type !== GgmlType.BF16 && type !== GgmlType.Q8_0) {
        fail(`${where} has type ${typeName ?? `${type} (unknown)`}, not supported: expected F32, F16, BF16 or Q8_0`);
      }
      const numel = ne.reduce((a, b) => a * b, 1);
      if (!Number.isSafeInteger(numel)) fail(`${where} has ne [${ne}], too large`);
      let byteLength: number;
      let dtype: WeightDtype;
      if (type === GgmlType.Q8_0) {
        if (ne[0] % Q8_0_BLOCK !== 0) fail(`${where} is Q8_0 with ne[0] = ${ne[0]}, not a multiple of the block size ${Q8_0_BLOCK}`);
        byteLength = (numel / Q8_0_BLOCK) * Q8_0_BLOCK_BYTES;
        dtype = 'float32';
      } else {
        dtype = type === GgmlType.F32 ? 'float32' : type === GgmlType.F16 ? 'float16' : 'bfloat16';
        byteLength = numel * (type === GgmlType.F32 ? 4 : 2);
      }
      if (offset % this.alignment !== 0) fail(`${where} has offset ${offset}, not a multiple of the alignment ${this.alignment}`);
      if (dataStart + offset + byteLength > fileSize) {
        fail(
          `${where} (bytes ${offset}..${offset + byteLength} of the data, which starts at byte ${dataStart}) runs past the end of the ${fileSize}-byte file: truncated?`,
        );
      }
      out.push({
        dtype,
        shape: [...ne].reverse(),
        numel,
        ggufName: gname,
        ggmlType: typeName as GgmlTypeName,
        ...(type === GgmlType.Q8_0 && { q8_0: true }),
        ne,
        fileOffset: dataStart + offset,
        byteLength,
      });
    }
    const sorted = [...out].sort((a, b) => a.fileOffset - b.fileOffset);
    for (let i = 1; i < sorted.length; i++) {
      const a = sorted[i - 1];
      const b = sorted[i];
      if (a.byteLength > 0 && b.fileOffset < a.fileOffset + a.byteLength) {
        fail(`tensors "${a.ggufName}" and "${b.ggufName}" overlap`);
      }
    }
    return new Map(out.map((t) => [referenceName(t.ggufName)!, t]));
  }

  private readParams(): MistralParams {
    const m = this.meta;
    const big = 1 << 30;
    const expertCount = m.int('llama.expert_count', false, 0, big);
    if (expertCount) {
      throw new CheckpointError(this.path, `llama.expert_count is ${expertCount}: mixture-of-experts models are not supported (the reference is Mistral 7B)`);
    }
    const scaling = m.string('llama.rope.scaling.type', false);
    if (scaling !== undefined && scaling !== 'none') {
      throw new CheckpointError(this.path, `llama.rope.scaling.type is ${JSON.stringify(scaling)}, not supported (the reference uses plain rotary embeddings)`);
    }
    const dim = m.int('llama.embedding_length', true, 1, big)!;
    const nHeads = m.int('llama.attention.head_count', true, 1, big)!;
    const nKvHeads = m.int('llama.attention.head_count_kv', false, 1, big) ?? nHeads;
    let headDim = m.int('llama.attention.key_length', false, 1, big);
    if (headDim === undefined) {
      if (dim % nHeads !== 0) {
        throw new CheckpointError(this.path, `llama.embedding_length ${dim} is not a multiple of llama.attention.head_count ${nHeads} (and llama.attention.key_length is absent)`);
      }
      headDim = dim / nHeads;
    }
    const embd = this.tensors.get('tok_embeddings.weight');
    const vocabFromTensor = embd && embd.ne.length === 2 ? embd.ne[1] : undefined;
    const vocab = m.int('llama.vocab_size', false, 1, big) ?? vocabFromTensor;
    if (vocab === undefined) throw new CheckpointError(this.path, 'no llama.vocab_size and no 2-D token_embd.weight to take the vocabulary size from');
    let slidingWindow = m.int('llama.attention.sliding_window', false, 1, Number.MAX_SAFE_INTEGER);
    if (slidingWindow === undefined) {
      slidingWindow = 4096;
      this.warnings.push(
        `${this.path}: no llama.attention.sliding_window in the metadata (llama.cpp's converter does not write it); using Mistral 7B's 4096`,
      );
    }
    return {
      dim,
      n_layers: m.int('llama.block_count', true, 1, big)!,
      head_dim: headDim,
      hidden_dim: m.int('llama.feed_forward_length', true, 1, big)!,
      n_heads: nHeads,
      n_kv_heads: nKvHeads,
      sliding_window: slidingWindow,
      norm_eps: m.float('llama.attention.layer_norm_rms_epsilon', true)!,
      vocab_size: vocab,
      rope_theta: m.float('llama.rope.freq_base', false) ?? 10000,
    };
  }

  vocab(): GgufVocab {
    const m = this.meta;
    const model = m.string('tokenizer.ggml.model', false);
    if (model === undefined) throw new CheckpointError(this.path, 'no tokenizer in the metadata (tokenizer.ggml.model is missing)');
    if (model !== 'llama') {
      throw new CheckpointError(this.path, `tokenizer.ggml.model is ${JSON.stringify(model)}, not supported: expected "llama" (a SentencePiece vocabulary)`);
    }
    const tokens = m.array('tokenizer.ggml.tokens', [GgufType.STRING], 'STRING') as string[];
    const n = tokens.length;
    const scores = m.array('tokenizer.ggml.scores', [GgufType.FLOAT32, GgufType.FLOAT64], 'FLOAT32');
    const types = m.array('tokenizer.ggml.token_type', [GgufType.INT32, GgufType.UINT32, GgufType.INT8, GgufType.UINT8], 'INT32');
    for (const [key, arr] of [['tokenizer.ggml.scores', scores], ['tokenizer.ggml.token_type', types]] as const) {
      if (arr.length !== n) throw new CheckpointError(this.path, `metadata key "${key}" has ${arr.length} items, but tokenizer.ggml.tokens has ${n}`);
    }
    const id = (key: string, required: boolean): number | undefined => m.int(key, required, 0, n - 1);
    return {
      tokens: [...tokens],
      scores: Float32Array.from(scores as number[]),
      tokenTypes: Int32Array.from(types as number[]),
      bosId: id('tokenizer.ggml.bos_token_id', false) ?? 1,
      eosId: id('tokenizer.ggml.eos_token_id', false) ?? 2,
      unkId: id('tokenizer.ggml.unknown_token_id', false) ?? 0,
      padId: id('tokenizer.ggml.padding_token_id', false),
      addBos: m.bool('tokenizer.ggml.add_bos_token'),
      addSpacePrefix: m.bool('tokenizer.ggml.add_space_prefix'),
    };
  }

  private info(name: string): GgufTensorInfo {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    return info;
  }

  private readAt(position: number, target: Uint8Array, what: string): void {
    if (this.fd === null) throw new CheckpointError(this.path, `cannot read ${what}: the file is closed`);
    readExactly(this.fd, target, position, this.path, what);
  }

  readQ8_0Blocks(name: string): Uint8Array {
    const info = this.info(name);
    if (info.ggmlType !== 'Q8_0') throw new CheckpointError(this.path, `tensor "${info.ggufName}" is ${info.ggmlType}, not Q8_0`);
    const blocks = new Uint8Array(info.byteLength);
    this.readAt(info.fileOffset, blocks, `tensor "${info.ggufName}"`);
    return blocks;
  }

  readRaw(name: string): RawTensor {
    const info = this.info(name);
    if (info.ggmlType === 'Q8_0') return { dtype: 'float32', shape: info.shape, data: dequantizeQ8_0(this.readQ8_0Blocks(name)) };
    const data = info.dtype === 'float32' ? new Float32Array(info.numel) : new Uint16Array(info.numel);
    this.readAt(info.fileOffset, new Uint8Array(data.buffer), `tensor "${info.ggufName}"`);
    return { dtype: info.dtype, shape: info.shape, data };
  }

  read(name: string): Float32Array {
    return toFloat32(this.readRaw(name));
  }

  close(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }
}

/** float16 bits -> number (exact). */
export function halfToNumber(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

/** Q8_0 blocks (34 bytes: f16 scale d, then 32 int8 q) to float32 values d * q, as ggml's dequantize_row_q8_0. */
export function dequantizeQ8_0(blocks: Uint8Array): Float32Array {
  const nBlocks = Math.floor(blocks.length / Q8_0_BLOCK_BYTES);
  const out = new Float32Array(nBlocks * Q8_0_BLOCK);
  const q = new Int8Array(blocks.buffer, blocks.byteOffset, blocks.length);
  for (let b = 0; b < nBlocks; b++) {
    const at = b * Q8_0_BLOCK_BYTES;
    const d = halfToNumber(blocks[at] | (blocks[at + 1] << 8));
    for (let i = 0; i < Q8_0_BLOCK; i++) out[b * Q8_0_BLOCK + i] = d * q[at + 2 + i];
  }
  return out;
}

/** Opens a GGUF file, reading and checking its header. Throws CheckpointError naming the file on anything unexpected. */
export function openGguf(path: string): GgufFile {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CheckpointError(path, `cannot open (${code === 'ENOENT' ? 'no such file' : code ?? String(err)})`);
  }
  try {
    return new Gguf(path, fd);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** True when `file` starts with the GGUF magic. */
export function isGguf(file: string): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const magic = Buffer.alloc(4);
    return fs.readSync(fd, magic, 0, 4, 0) === 4 && magic.toString('latin1') === GGUF_MAGIC;
  } finally {
    fs.closeSync(fd);
  }
}
