/**
 * A GGUF file's vocabulary (tokenizer.ggml.*, model "llama") <-> a SentencePiece .model file.
 *
 * llama.cpp's converter copies a SentencePiece model into GGUF metadata as parallel arrays: every
 * piece's string (tokenizer.ggml.tokens), score (scores) and type (token_type, SentencePiece's own
 * Type numbers: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE), plus the
 * bos/eos/unk ids and add_space_prefix (the normalizer's add_dummy_prefix). That is everything
 * SentencePiece's BPE encoder reads (pieces and scores drive the merges; byte pieces the byte
 * fallback), so the ModelProto rebuilt here tokenizes as the original did: test/gguf_tokenizer.test.ts
 * checks it on the project's tokenizer corpus with the genuine Mistral v1 tokenizer.
 *
 * The ModelProto written (sentencepiece_model.proto field numbers):
 *   1 pieces (repeated): 1 piece string, 2 score float, 3 type enum
 *   2 trainer_spec: 3 model_type (2 = BPE), 4 vocab_size, 35 byte_fallback, 40 unk_id, 41 bos_id,
 *     42 eos_id, 43 pad_id, 45 unk_piece, 46 bos_piece, 47 eos_piece, 48 pad_piece
 *   3 normalizer_spec: 1 name "identity", 3 add_dummy_prefix, 4 remove_extra_whitespaces false,
 *     5 escape_whitespaces true
 */
import type { GgufVocab } from '../checkpoint/gguf';
import { TokenizerError } from './error';

const TYPE_UNKNOWN = 2;
const TYPE_CONTROL = 3;
const TYPE_BYTE = 6;

// ---------------------------------------------------------------------------------------------
// Protobuf writing

class ProtoWriter {
  private chunks: Uint8Array[] = [];
  private length = 0;

  private push(bytes: Uint8Array): void {
    this.chunks.push(bytes);
    this.length += bytes.length;
  }

  private varint(value: number): void {
    // int32 fields: negatives are written as 10-byte two's complement, as protobuf does.
    let v = BigInt.asUintN(64, BigInt(Math.trunc(value)));
    const out: number[] = [];
    do {
      let b = Number(v & 0x7fn);
      v >>= 7n;
      if (v !== 0n) b |= 0x80;
      out.push(b);
    } while (v !== 0n);
    this.push(Uint8Array.from(out));
  }

  private tag(field: number, wire: number): void {
    this.varint((field << 3) | wire);
  }

  int(field: number, value: number): this {
    this.tag(field, 0);
    this.varint(value);
    return this;
  }

  bool(field: number, value: boolean): this {
    return this.int(field, value ? 1 : 0);
  }

  float(field: number, value: number): this {
    this.tag(field, 5);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, value, true);
    this.push(b);
    return this;
  }

  bytes(field: number, value: Uint8Array): this {
    this.tag(field, 2);
    this.varint(value.length);
    this.push(value);
    return this;
  }

  string(field: number, value: string): this {
    return this.bytes(field, new TextEncoder().encode(value));
  }

  message(field: number, inner: ProtoWriter): this {
    return this.bytes(field, inner.finish());
  }

  finish(): Uint8Array {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const c of this.chunks) {
      out.set(c, at);
      at += c.length;
    }
    return out;
  }
}

/**
 * A SentencePiece .model file's bytes for a GGUF vocabulary; `file` names the GGUF in errors.
 * Throws a TokenizerError when the vocabulary cannot be one (no UNKNOWN piece, a special id whose
 * piece has the wrong type, a type outside 1..6).
 */
export function sentencePieceFromGguf(vocab: GgufVocab, file: string): Uint8Array {
  const n = vocab.tokens.length;
  if (n === 0) throw new TokenizerError(`${file}: tokenizer.ggml.tokens is empty`);
  const fail = (problem: string): never => {
    throw new TokenizerError(`${file}: ${problem}`);
  };
  for (let id = 0; id < n; id++) {
    const t = vocab.tokenTypes[id];
    if (!(t >= 1 && t <= 6)) fail(`tokenizer.ggml.token_type[${id}] is ${t}, expected 1..6 (NORMAL..BYTE)`);
  }
  const expectType = (key: string, id: number, type: number, what: string): void => {
    if (vocab.tokenTypes[id] !== type) {
      fail(`${key} is ${id}, but token ${id} (${JSON.stringify(vocab.tokens[id])}) has type ${vocab.tokenTypes[id]}, expected ${type} (${what})`);
    }
  };
  expectType('tokenizer.ggml.unknown_token_id', vocab.unkId, TYPE_UNKNOWN, 'UNKNOWN');
  expectType('tokenizer.ggml.bos_token_id', vocab.bosId, TYPE_CONTROL, 'CONTROL');
  expectType('tokenizer.ggml.eos_token_id', vocab.eosId, TYPE_CONTROL, 'CONTROL');
  // A padding id that is not a control piece (some converters point it at <unk>) is left out, as
  // SentencePiece's pad_id() would give -1 for it.
  const padId = vocab.padId !== undefined && vocab.tokenTypes[vocab.padId] === TYPE_CONTROL ? vocab.padId : -1;

  const model = new ProtoWriter();
  for (let id = 0; id < n; id++) {
    const piece = new ProtoWriter().string(1, vocab.tokens[id]).float(2, vocab.scores[id]).int(3, vocab.tokenTypes[id]);
    model.message(1, piece);
  }
  const trainer = new ProtoWriter()
    .int(3, 2) // BPE
    .int(4, n)
    .bool(35, vocab.tokenTypes.some((t) => t === TYPE_BYTE))
    .int(40, vocab.unkId)
    .int(41, vocab.bosId)
    .int(42, vocab.eosId)
    .int(43, padId)
    .string(45, vocab.tokens[vocab.unkId])
    .string(46, vocab.tokens[vocab.bosId])
    .string(47, vocab.tokens[vocab.eosId]);
  if (padId >= 0) trainer.string(48, vocab.tokens[padId]);
  model.message(2, trainer);
  const normalizer = new ProtoWriter()
    .string(1, 'identity')
    .bool(3, vocab.addSpacePrefix ?? true)
    .bool(4, false)
    .bool(5, true);
  model.message(3, normalizer);
  return model.finish();
}

// ---------------------------------------------------------------------------------------------
// Protobuf reading: a .model file's vocabulary, for writing a GGUF

class ProtoReader {
  constructor(
    private readonly b: Uint8Array,
    public pos: number,
    private readonly end: number,
    private readonly file: string,
  ) {}

  get done(): boolean {
    return this.pos >= this.end;
  }

  private fail(what: string): never {
    throw new TokenizerError(`${this.file}: not a SentencePiece model file (${what} at byte ${this.pos})`);
  }

  varint(): bigint {
    let v = 0n;
    for (let shift = 0n; shift < 70n; shift += 7n) {
      if (this.pos >= this.end) this.fail('truncated varint');
      const byte = this.b[this.pos++];
      v |= BigInt(byte & 0x7f) << shift;
      if ((byte & 0x80) === 0) return v;
    }
    return this.fail('varint longer than 10 bytes');
  }

  int32(): number {
    return Number(BigInt.asIntN(32, this.varint()));
  }

  sub(): ProtoReader {
    const n = this.varint();
    if (n > BigInt(this.end - this.pos)) this.fail('length-delimited field runs past its end');
    const r = new ProtoReader(this.b, this.pos, this.pos + Number(n), this.file);
    this.pos += Number(n);
    return r;
  }

  string(): string {
    const r = this.sub();
    return new TextDecoder('utf-8', { ignoreBOM: true }).decode(this.b.subarray(r.pos, r.end));
  }

  float(): number {
    if (this.end - this.pos < 4) this.fail('truncated float');
    const v = new DataView(this.b.buffer, this.b.byteOffset + this.pos, 4).getFloat32(0, true);
    this.pos += 4;
    return v;
  }

  tag(): { field: number; wire: number } {
    const t = Number(this.varint());
    return { field: Math.floor(t / 8), wire: t & 7 };
  }

  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.pos += 8;
    else if (wire === 2) this.sub();
    else if (wire === 5) this.pos += 4;
    else this.fail(`unsupported wire type ${wire}`);
    if (this.pos > this.end) this.fail('truncated field');
  }
}

/**
 * The vocabulary of a SentencePiece .model file (its bytes), as GGUF metadata holds it. Only BPE
 * models (Mistral's and Llama's) are accepted: the GGUF "llama" tokenizer is one.
 */
export function ggufVocabFromSentencePiece(bytes: Uint8Array, file: string): GgufVocab {
  const tokens: string[] = [];
  const scores: number[] = [];
  const types: number[] = [];
  const ids = { unk: 0, bos: 1, eos: 2, pad: -1 };
  let modelType = 1; // UNIGRAM, the proto's default
  let addDummyPrefix = true;
  let normalizer = 'nmt_nfkc';
  let charsmap = 0;
  const r = new ProtoReader(bytes, 0, bytes.length, file);
  while (!r.done) {
    const { field, wire } = r.tag();
    if (field === 1 && wire === 2) {
      const p = r.sub();
      let piece = '';
      let score = 0;
      let type = 1;
      while (!p.done) {
        const t = p.tag();
        if (t.field === 1 && t.wire === 2) piece = p.string();
        else if (t.field === 2 && t.wire === 5) score = p.float();
        else if (t.field === 3 && t.wire === 0) type = p.int32();
        else p.skip(t.wire);
      }
      tokens.push(piece);
      scores.push(score);
      types.push(type);
    } else if (field === 2 && wire === 2) {
      const s = r.sub();
      while (!s.done) {
        const t = s.tag();
        if (t.wire !== 0) s.skip(t.wire);
        else if (t.field === 3) modelType = s.int32();
        else if (t.field === 40) ids.unk = s.int32();
        else if (t.field === 41) ids.bos = s.int32();
        else if (t.field === 42) ids.eos = s.int32();
        else if (t.field === 43) ids.pad = s.int32();
        else s.varint();
      }
    } else if (field === 3 && wire === 2) {
      const s = r.sub();
      while (!s.done) {
        const t = s.tag();
        if (t.field === 1 && t.wire === 2) normalizer = s.string();
        else if (t.field === 2 && t.wire === 2) charsmap = s.sub().done ? 0 : 1;
        else if (t.field === 3 && t.wire === 0) addDummyPrefix = s.varint() !== 0n;
        else s.skip(t.wire);
      }
    } else {
      r.skip(wire);
    }
  }
  if (modelType !== 2) throw new TokenizerError(`${file}: SentencePiece model_type ${modelType}, expected 2 (BPE) for a GGUF "llama" vocabulary`);
  if (charsmap || (normalizer !== 'identity' && normalizer !== '')) {
    throw new TokenizerError(`${file}: normalizer "${normalizer}" cannot be carried in GGUF metadata (expected "identity")`);
  }
  const n = tokens.length;
  const inRange = (id: number): boolean => id >= 0 && id < n;
  if (!inRange(ids.unk) || !inRange(ids.bos) || !inRange(ids.eos)) {
    throw new TokenizerError(`${file}: unk/bos/eos ids ${ids.unk}/${ids.bos}/${ids.eos} are not all pieces of the ${n}`);
  }
  return {
    tokens,
    scores: Float32Array.from(scores),
    tokenTypes: Int32Array.from(types),
    bosId: ids.bos,
    eosId: ids.eos,
    unkId: ids.unk,
    padId: inRange(ids.pad) ? ids.pad : undefined,
    addBos: true,
    addSpacePrefix: addDummyPrefix,
  };
}
