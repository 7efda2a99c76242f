/**
 * A minimal reader of SentencePiece's .model file: a serialized `sentencepiece.ModelProto` protobuf
 * (sentencepiece_model.proto). It reads only what the tokenizer needs and the wasm package does not
 * expose: the pieces with their types, and the special-piece settings of `trainer_spec`.
 *
 *   ModelProto:      1 pieces (repeated SentencePiece), 2 trainer_spec (TrainerSpec), others skipped
 *   SentencePiece:   1 piece (string), 2 score (float), 3 type (enum, default NORMAL)
 *   TrainerSpec:     40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id (int32),
 *                    45 unk_piece, 46 bos_piece, 47 eos_piece, 48 pad_piece (string)
 */
import { TokenizerError } from './error';

/** SentencePiece.Type values. */
export const PieceType = {
  NORMAL: 1,
  UNKNOWN: 2,
  CONTROL: 3,
  USER_DEFINED: 4,
  UNUSED: 5,
  BYTE: 6,
} as const;

export interface ModelPiece {
  piece: string;
  type: number;
}

/** The TrainerSpec fields read, with the defaults sentencepiece_model.proto gives them. */
export interface TrainerSpecIds {
  unkId: number;
  bosId: number;
  eosId: number;
  padId: number;
  unkPiece: string;
  bosPiece: string;
  eosPiece: string;
  padPiece: string;
}

export interface ModelProtoInfo {
  pieces: ModelPiece[];
  trainerSpec: TrainerSpecIds;
}

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

const utf8 = new TextDecoder('utf-8', { ignoreBOM: true });

/** Reads protobuf wire format from bytes[pos, end); every problem becomes a TokenizerError naming `file`. */
class WireReader {
  constructor(
    private readonly bytes: Uint8Array,
    public pos: number,
    private readonly end: number,
    private readonly file: string,
  ) {}

  get done(): boolean {
    return this.pos >= this.end;
  }

  fail(what: string): never {
    throw new TokenizerError(`${this.file}: not a SentencePiece model file (${what} at byte ${this.pos})`);
  }

  /** A varint's low 32 bits as a signed int32 (protobuf's int32/enum rule), and whether higher bits were set. */
  varint(): { low: number; high: boolean } {
    let low = 0;
    let high = false;
    for (let i = 0, shift = 0; i < 10; i++, shift += 7) {
      if (this.pos >= this.end) this.fail('truncated varint');
      const b = this.bytes[this.pos++];
      if (shift < 32) {
        low |= (b & 0x7f) << shift;
        if (shift === 28 && (b & 0x70) !== 0) high = true;
      } else if ((b & 0x7f) !== 0) {
        high = true;
      }
      if ((b & 0x80) === 0) return { low: low | 0, high };
    }
    return this.fail('varint longer than 10 bytes');
  }

  int32(): number {
    return this.varint().low;
  }

  /** A length prefix; returns the end offset of the payload that follows. */
  lengthEnd(): number {
    const { low, high } = this.varint();
    if (high || low < 0 || low > this.end - this.pos) this.fail('length-delimited field runs past its end');
    return this.pos + low;
  }

  string(): string {
    const stop = this.lengthEnd();
    const text = utf8.decode(this.bytes.subarray(this.pos, stop));
    this.pos = stop;
    return text;
  }

  tag(): { field: number; wire: number } {
    const { low, high } = this.varint();
    const field = low >>> 3;
    if (high || field === 0) this.fail(`invalid field tag ${low >>> 0}`);
    return { field, wire: low & 7 };
  }

  skip(wire: number): void {
    switch (wire) {
      case WIRE_VARINT:
        this.varint();
        return;
      case WIRE_FIXED64:
        this.advance(8);
        return;
      case WIRE_LEN:
        this.pos = this.lengthEnd();
        return;
      case WIRE_FIXED32:
        this.advance(4);
        return;
      default:
        this.fail(`unsupported protobuf wire type ${wire}`);
    }
  }

  expectWire(wire: number, actual: number, field: string): void {
    if (wire !== actual) this.fail(`field ${field} has wire type ${actual}, expected ${wire}`);
  }

  /** A reader over the length-delimited payload at pos, after which this reader continues. */
  sub(): WireReader {
    const stop = this.lengthEnd();
    const inner = new WireReader(this.bytes, this.pos, stop, this.file);
    this.pos = stop;
    return inner;
  }

  private advance(n: number): void {
    if (n > this.end - this.pos) this.fail('truncated fixed-width field');
    this.pos += n;
  }
}

function readPiece(r: WireReader): ModelPiece {
  const out: ModelPiece = { piece: '', type: PieceType.NORMAL };
  while (!r.done) {
    const { field, wire } = r.tag();
    if (field === 1) {
      r.expectWire(WIRE_LEN, wire, 'pieces.piece');
      out.piece = r.string();
    } else if (field === 3) {
      r.expectWire(WIRE_VARINT, wire, 'pieces.type');
      out.type = r.int32();
    } else {
      r.skip(wire);
    }
  }
  return out;
}

function readTrainerSpec(r: WireReader, spec: TrainerSpecIds): void {
  const ints: Record<number, 'unkId' | 'bosId' | 'eosId' | 'padId'> = { 40: 'unkId', 41: 'bosId', 42: 'eosId', 43: 'padId' };
  const strings: Record<number, 'unkPiece' | 'bosPiece' | 'eosPiece' | 'padPiece'> = {
    45: 'unkPiece',
    46: 'bosPiece',
    47: 'eosPiece',
    48: 'padPiece',
  };
  while (!r.done) {
    const { field, wire } = r.tag();
    const intKey = ints[field];
    const stringKey = strings[field];
    if (intKey !== undefined) {
      r.expectWire(WIRE_VARINT, wire, `trainer_spec.${intKey}`);
      spec[intKey] = r.int32();
    } else if (stringKey !== undefined) {
      r.expectWire(WIRE_LEN, wire, `trainer_spec.${stringKey}`);
      spec[stringKey] = r.string();
    } else {
      r.skip(wire);
    }
  }
}

/**
 * Parses the pieces and trainer_spec of a .model file's bytes. Throws a TokenizerError naming `file`
 * when the bytes are not a ModelProto with at least one piece and exactly one UNKNOWN piece.
 */
export function parseModelProto(bytes: Uint8Array, file: string): ModelProtoInfo {
  if (bytes.length === 0) throw new TokenizerError(`${file}: not a SentencePiece model file (the file is empty)`);
  // A serialized ModelProto starts with its first piece: field 1, wire type 2 -> tag byte 0x0a.
  if (bytes[0] !== 0x0a) {
    const first = bytes[0].toString(16).padStart(2, '0');
    throw new TokenizerError(
      `${file}: not a SentencePiece model file (first byte 0x${first}, expected 0x0a, the tag of ModelProto.pieces)`,
    );
  }
  const pieces: ModelPiece[] = [];
  const trainerSpec: TrainerSpecIds = {
    unkId: 0,
    bosId: 1,
    eosId: 2,
    padId: -1,
    unkPiece: '<unk>',
    bosPiece: '<s>',
    eosPiece: '</s>',
    padPiece: '<pad>',
  };
  const r = new WireReader(bytes, 0, bytes.length, file);
  while (!r.done) {
    const { field, wire } = r.tag();
    if (field === 1) {
      r.expectWire(WIRE_LEN, wire, 'pieces');
      pieces.push(readPiece(r.sub()));
    } else if (field === 2) {
      r.expectWire(WIRE_LEN, wire, 'trainer_spec');
      readTrainerSpec(r.sub(), trainerSpec);
    } else {
      r.skip(wire);
    }
  }
  pieces.forEach((p, id) => {
    if (p.type < PieceType.NORMAL || p.type > PieceType.BYTE) {
      throw new TokenizerError(`${file}: piece ${id} has type ${p.type}, expected 1..6 (NORMAL..BYTE)`);
    }
  });
  const unknowns = pieces.filter((p) => p.type === PieceType.UNKNOWN).length;
  if (unknowns !== 1) {
    throw new TokenizerError(`${file}: not a SentencePiece model file (${unknowns} UNKNOWN pieces among ${pieces.length}, expected 1)`);
  }
  return { pieces, trainerSpec };
}
