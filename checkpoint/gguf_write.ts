/**
 * Writes GGUF v3 files (the layout checkpoint/gguf.ts reads; ggml's docs/gguf.md), and the
 * conversions of float32 weights to F16, BF16 and Q8_0 as llama.cpp makes them.
 *
 * Tensors are written one at a time from a producer, so a model is converted with memory bounded by
 * its largest tensor. Q/K rows are written as the reference holds them: see checkpoint/gguf.ts.
 */
import * as fs from 'fs';
import {
  GGUF_DEFAULT_ALIGNMENT,
  GgmlType,
  type GgmlTypeName,
  type GgufArray,
  type GgufEntry,
  type GgufScalar,
  GgufType,
  type GgufVocab,
  Q8_0_BLOCK,
  Q8_0_BLOCK_BYTES,
} from './gguf';
import type { MistralParams } from './hf';

export interface GgufTensorToWrite {
  /** The GGUF name (blk.0.attn_q.weight). */
  name: string;
  /** PyTorch order (rows first); written reversed as ne. */
  shape: number[];
  type: GgmlTypeName;
  /** The tensor's bytes in `type`, asked for when it is its turn to be written. */
  data: () => Uint8Array;
}

/** Stored bytes of a tensor of `numel` elements in `type`. */
export function ggmlByteLength(type: GgmlTypeName, numel: number): number {
  if (type === 'Q8_0') return (numel / Q8_0_BLOCK) * Q8_0_BLOCK_BYTES;
  return numel * (type === 'F32' ? 4 : 2);
}

// ---------------------------------------------------------------------------------------------
// Serializing the header

class ByteSink {
  private chunks: Buffer[] = [];
  length = 0;
  push(b: Buffer): void {
    this.chunks.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.push(b);
  }
  u64(v: number | bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  string(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.push(bytes);
  }
  concat(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

function writeScalar(sink: ByteSink, type: number, v: GgufScalar): void {
  const b = Buffer.alloc(8);
  switch (type) {
    case GgufType.UINT8: b.writeUInt8(v as number); return sink.push(b.subarray(0, 1));
    case GgufType.INT8: b.writeInt8(v as number); return sink.push(b.subarray(0, 1));
    case GgufType.UINT16: b.writeUInt16LE(v as number); return sink.push(b.subarray(0, 2));
    case GgufType.INT16: b.writeInt16LE(v as number); return sink.push(b.subarray(0, 2));
    case GgufType.UINT32: b.writeUInt32LE(v as number); return sink.push(b.subarray(0, 4));
    case GgufType.INT32: b.writeInt32LE(v as number); return sink.push(b.subarray(0, 4));
    case GgufType.FLOAT32: b.writeFloatLE(v as number); return sink.push(b.subarray(0, 4));
    case GgufType.BOOL: b.writeUInt8(v ? 1 : 0); return sink.push(b.subarray(0, 1));
    case GgufType.STRING: return sink.string(v as string);
    case GgufType.UINT64: b.writeBigUInt64LE(BigInt(v as number | bigint)); return sink.push(b);
    case GgufType.INT64: b.writeBigInt64LE(BigInt(v as number | bigint)); return sink.push(b);
    case GgufType.FLOAT64: b.writeDoubleLE(v as number); return sink.push(b);
    default: throw new Error(`GGUF metadata type ${type} is not a scalar type`);
  }
}

function writeArray(sink: ByteSink, arr: GgufArray): void {
  sink.u32(arr.itemType);
  sink.u64(arr.values.length);
  for (const v of arr.values) {
    if (arr.itemType === GgufType.ARRAY) writeArray(sink, v as GgufArray);
    else writeScalar(sink, arr.itemType, v as GgufScalar);
  }
}

/** The header bytes (magic through tensor infos, padded to the alignment) and each tensor's offset. */
export function ggufHeader(
  metadata: ReadonlyArray<readonly [string, GgufEntry]>,
  tensors: ReadonlyArray<Omit<GgufTensorToWrite, 'data'>>,
  alignment = GGUF_DEFAULT_ALIGNMENT,
): { header: Buffer; offsets: number[]; dataBytes: number } {
  const sink = new ByteSink();
  sink.push(Buffer.from('GGUF', 'latin1'));
  sink.u32(3);
  sink.u64(tensors.length);
  sink.u64(metadata.length);
  for (const [key, entry] of metadata) {
    sink.string(key);
    sink.u32(entry.type);
    if (entry.type === GgufType.ARRAY) writeArray(sink, entry.value as GgufArray);
    else writeScalar(sink, entry.type, entry.value as GgufScalar);
  }
  const offsets: number[] = [];
  let offset = 0;
  for (const t of tensors) {
    sink.string(t.name);
    sink.u32(t.shape.length);
    for (const d of [...t.shape].reverse()) sink.u64(d);
    sink.u32(GgmlType[t.type]);
    sink.u64(offset);
    offsets.push(offset);
    const numel = t.shape.reduce((a, b) => a * b, 1);
    offset += Math.ceil(ggmlByteLength(t.type, numel) / alignment) * alignment;
  }
  const pad = (alignment - (sink.length % alignment)) % alignment;
  sink.push(Buffer.alloc(pad));
  return { header: sink.concat(), offsets, dataBytes: offset };
}

/** Writes a GGUF file: header, then each tensor's data at its aligned offset. */
export function writeGguf(
  file: string,
  metadata: ReadonlyArray<readonly [string, GgufEntry]>,
  tensors: readonly GgufTensorToWrite[],
  alignment = GGUF_DEFAULT_ALIGNMENT,
): void {
  const { header, offsets } = ggufHeader(metadata, tensors, alignment);
  const fd = fs.openSync(file, 'w');
  try {
    fs.writeSync(fd, header);
    let at = 0;
    tensors.forEach((t, i) => {
      if (at < offsets[i]) fs.writeSync(fd, Buffer.alloc(offsets[i] - at));
      at = offsets[i];
      const data = t.data();
      const numel = t.shape.reduce((a, b) => a * b, 1);
      const expected = ggmlByteLength(t.type, numel);
      if (data.length !== expected) throw new Error(`tensor "${t.name}": ${data.length} bytes given, ${t.type} [${t.shape}] needs ${expected}`);
      fs.writeSync(fd, data);
      at += data.length;
    });
    const end = Math.ceil(at / alignment) * alignment;
    if (end > at) fs.writeSync(fd, Buffer.alloc(end - at));
  } finally {
    fs.closeSync(fd);
  }
}

// ---------------------------------------------------------------------------------------------
// Float conversions

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> float16 bits, rounding to nearest even (as numpy's astype(float16) and ggml's FP32_TO_FP16). */
export function floatToHalf(value: number): number {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 | (mantissa >>> 13) : 0);
  const e = exponent - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // Subnormal half (or zero): the value is m * 2^-24 with m rounded to nearest even.
    if (e < -10) return sign;
    const m = mantissa | 0x800000;
    const shift = 14 - e;
    const half = m >>> shift;
    const rest = m & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    return sign | (half + (rest > mid || (rest === mid && (half & 1)) ? 1 : 0));
  }
  const half = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  // A carry out of the mantissa moves into the exponent, which is the correct rounding (up to inf).
  return sign | (half + (rest > 0x1000 || (rest === 0x1000 && (half & 1)) ? 1 : 0));
}

/** float32 -> bfloat16 bits, rounding to nearest even (as torch's .bfloat16()); NaN stays NaN. */
export function floatToBfloat16(value: number): number {
  f32[0] = value;
  const x = u32[0];
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) | 0x40) & 0xffff;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

/** float32 values as F16, BF16 or F32 bytes. */
export function encodeFloats(type: 'F32' | 'F16' | 'BF16', values: Float32Array): Uint8Array {
  if (type === 'F32') return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const out = new Uint16Array(values.length);
  const convert = type === 'F16' ? floatToHalf : floatToBfloat16;
  for (let i = 0; i < values.length; i++) out[i] = convert(values[i]);
  return new Uint8Array(out.buffer);
}

/**
 * Q8_0 blocks of float32 values (a multiple of 32), as llama.cpp's quantize_row_q8_0_ref computes
 * them, in float32 arithmetic: per block of 32, amax = max |x|, d = amax / 127, id = d ? 1/d : 0,
 * q = roundf(x * id) (half away from zero), and d stored as float16.
 */
export function quantizeQ8_0(values: Float32Array): Uint8Array {
  if (values.length % Q8_0_BLOCK !== 0) throw new Error(`Q8_0 needs a multiple of ${Q8_0_BLOCK} values, got ${values.length}`);
  const nBlocks = values.length / Q8_0_BLOCK;
  const out = new Uint8Array(nBlocks * Q8_0_BLOCK_BYTES);
  const fr = Math.fround;
  for (let b = 0; b < nBlocks; b++) {
    let amax = 0;
    for (let j = 0; j < Q8_0_BLOCK; j++) amax = Math.max(amax, Math.abs(values[b * Q8_0_BLOCK + j]));
    const d = fr(amax / 127);
    const id = d ? fr(1 / d) : 0;
    const h = floatToHalf(d);
    const at = b * Q8_0_BLOCK_BYTES;
    out[at] = h & 0xff;
    out[at + 1] = h >>> 8;
    for (let j = 0; j < Q8_0_BLOCK; j++) {
      const x0 = fr(values[b * Q8_0_BLOCK + j] * id);
      const q = Math.sign(x0) * Math.floor(Math.abs(x0) + 0.5);
      out[at + 2 + j] = q & 0xff;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// A llama-architecture model's metadata

/** general.file_type values (llama_ftype). */
const FILE_TYPE: Record<GgmlTypeName, number> = { F32: 0, F16: 1, Q8_0: 7, BF16: 32 };

const u32Entry = (v: number): GgufEntry => ({ type: GgufType.UINT32, value: v });
const f32Entry = (v: number): GgufEntry => ({ type: GgufType.FLOAT32, value: v });
const strEntry = (v: string): GgufEntry => ({ type: GgufType.STRING, value: v });
const boolEntry = (v: boolean): GgufEntry => ({ type: GgufType.BOOL, value: v });

/**
 * The metadata llama.cpp reads for a "llama" model and its SentencePiece vocabulary, with the
 * types llama.cpp's loader checks (u32 counts, f32 epsilon and rope base). The sliding window goes
 * in llama.attention.sliding_window (llama.cpp ignores it for this architecture; the port reads it).
 */
export function llamaMetadata(name: string, params: MistralParams, vocab: GgufVocab, type: GgmlTypeName): [string, GgufEntry][] {
  const meta: [string, GgufEntry][] = [
    ['general.architecture', strEntry('llama')],
    ['general.name', strEntry(name)],
    ['general.file_type', u32Entry(FILE_TYPE[type])],
    // Mistral 7B's trained context; llama.cpp sizes its default context from it.
    ['llama.context_length', u32Entry(32768)],
    ['llama.embedding_length', u32Entry(params.dim)],
    ['llama.block_count', u32Entry(params.n_layers)],
    ['llama.feed_forward_length', u32Entry(params.hidden_dim)],
    ['llama.rope.dimension_count', u32Entry(params.head_dim)],
    ['llama.attention.head_count', u32Entry(params.n_heads)],
    ['llama.attention.head_count_kv', u32Entry(params.n_kv_heads)],
    ['llama.attention.key_length', u32Entry(params.head_dim)],
    ['llama.attention.value_length', u32Entry(params.head_dim)],
    ['llama.attention.layer_norm_rms_epsilon', f32Entry(params.norm_eps)],
    ['llama.rope.freq_base', f32Entry(params.rope_theta ?? 10000)],
    ['llama.attention.sliding_window', u32Entry(params.sliding_window)],
    ['llama.vocab_size', u32Entry(params.vocab_size)],
    ['tokenizer.ggml.model', strEntry('llama')],
    ['tokenizer.ggml.tokens', { type: GgufType.ARRAY, itemType: GgufType.STRING, value: { itemType: GgufType.STRING, values: vocab.tokens } }],
    ['tokenizer.ggml.scores', { type: GgufType.ARRAY, itemType: GgufType.FLOAT32, value: { itemType: GgufType.FLOAT32, values: Array.from(vocab.scores) } }],
    ['tokenizer.ggml.token_type', { type: GgufType.ARRAY, itemType: GgufType.INT32, value: { itemType: GgufType.INT32, values: Array.from(vocab.tokenTypes) } }],
    ['tokenizer.ggml.bos_token_id', u32Entry(vocab.bosId)],
    ['tokenizer.ggml.eos_token_id', u32Entry(vocab.eosId)],
    ['tokenizer.ggml.unknown_token_id', u32Entry(vocab.unkId)],
  ];
  if (vocab.padId !== undefined) meta.push(['tokenizer.ggml.padding_token_id', u32Entry(vocab.padId)]);
  meta.push(['tokenizer.ggml.add_bos_token', boolEntry(vocab.addBos ?? true)]);
  meta.push(['tokenizer.ggml.add_eos_token', boolEntry(false)]);
  meta.push(['tokenizer.ggml.add_space_prefix', boolEntry(vocab.addSpacePrefix ?? true)]);
  return meta;
}
