/**
 * The tokenizer: SentencePiece (the real C++ library, compiled to WebAssembly by @agnai/sentencepiece-js)
 * behind the small API of Python's SentencePieceProcessor, made to behave like Python's sentencepiece:
 *
 *  - load() checks the file itself (the package "loads" any file and then encodes everything to []);
 *    loadBytes() loads a model held in memory (the package reads only files: a private temp file);
 *  - bos/eos/unk/pad ids are read from the model file (the package has no getters for them) and
 *    follow Python's sp.bos_id() & co: the id of the trainer_spec's piece name if that piece has the
 *    right type, else -1;
 *  - decode() rejects an out-of-range id (the package returns "", Python raises);
 *  - encode() replaces lone surrogates with U+FFFD first (they would corrupt the UTF-8 sent to wasm);
 *  - isControl/isUnknown/isUnused/isByte give each piece's type, read from the file like the ids;
 *    piece(id) gives its string (Python's sp.id_to_piece), also from the file.
 */
import { constants as fsConstants, promises as fs, type Stats } from 'fs';
import type { FileHandle } from 'fs/promises';
import { tmpdir } from 'os';
import { join } from 'path';
import { SentencePieceProcessor as WasmProcessor } from '@agnai/sentencepiece-js';
import { kindOf } from '../checkpoint/files';
import { TokenizerError } from './error';
import { parseModelProto, PieceType, type ModelPiece } from './model_proto';

export { TokenizerError } from './error';

/** Ids of the special pieces, as Python's sp.unk_id(), bos_id(), eos_id(), pad_id() give them. */
interface SpecialIds {
  unk: number;
  bos: number;
  eos: number;
  pad: number;
}

export class SentencePieceProcessor {
  private constructor(
    private readonly sp: WasmProcessor,
    private readonly special: SpecialIds,
    /** The SentencePiece.Type of each piece, by id. */
    private readonly pieceTypes: Uint8Array,
    /** The string of each piece, by id, as the model file has it. */
    private readonly pieceNames: readonly string[],
  ) {}

  /** Number of pieces in the model (Python's sp.vocab_size()). */
  get vocabSize(): number {
    return this.pieceTypes.length;
  }

  /**
   * Loads a SentencePiece .model file; throws a TokenizerError naming `path` when it is missing, not
   * a regular file (a FIFO or /dev/zero would block or never end), over MAX_MODEL_BYTES, or not a
   * valid model.
   */
  static async load(path: string): Promise<SentencePieceProcessor> {
    return SentencePieceProcessor.fromBytes(await readModelFile(path), path, path);
  }

  /**
   * Loads a model from its bytes (e.g. a tokenizer.model read from inside a .tar); `name` stands for
   * it in error messages. The wasm package loads only from a path, so the bytes go through a private
   * temporary file, deleted before this returns.
   */
  static async loadBytes(bytes: Uint8Array, name: string): Promise<SentencePieceProcessor> {
    if (!(bytes instanceof Uint8Array)) throw new TokenizerError(`${name}: expected the model's bytes as a Uint8Array`);
    if (bytes.length > MAX_MODEL_BYTES) throw new TokenizerError(`${name}: is ${bytes.length} bytes, more than the ${MAX_MODEL_BYTES} a tokenizer model may have`);
    parseModelProto(bytes, name); // reject bad bytes before writing anything
    const dir = await fs.mkdtemp(join(tmpdir(), 'sentencepiece-'));
    try {
      const file = join(dir, 'tokenizer.model');
      await fs.writeFile(file, bytes, { mode: 0o600 });
      return await SentencePieceProcessor.fromBytes(bytes, name, file);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  }

  /** Checks `bytes` (the model called `name` in errors) and loads the same model into wasm from `file`. */
  private static async fromBytes(bytes: Uint8Array, name: string, file: string): Promise<SentencePieceProcessor> {
    const { pieces, trainerSpec } = parseModelProto(bytes, name);
    const pieceToId = pieceLookup(pieces);
    const typedId = (piece: string, type: number): number => {
      const id = pieceToId(piece);
      return pieces[id].type === type ? id : -1;
    };
    const special: SpecialIds = {
      unk: typedId(trainerSpec.unkPiece, PieceType.UNKNOWN),
      bos: typedId(trainerSpec.bosPiece, PieceType.CONTROL),
      eos: typedId(trainerSpec.eosPiece, PieceType.CONTROL),
      pad: typedId(trainerSpec.padPiece, PieceType.CONTROL),
    };
    const checks: [string, number, number, string][] = [
      ['unk_id', trainerSpec.unkId, special.unk, trainerSpec.unkPiece],
      ['bos_id', trainerSpec.bosId, special.bos, trainerSpec.bosPiece],
      ['eos_id', trainerSpec.eosId, special.eos, trainerSpec.eosPiece],
      ['pad_id', trainerSpec.padId, special.pad, trainerSpec.padPiece],
    ];
    for (const [field, declared, found, piece] of checks) {
      if (declared !== found) {
        throw new TokenizerError(
          `${name}: trainer_spec.${field} is ${declared} but piece ${JSON.stringify(piece)} resolves to id ${found}`,
        );
      }
    }

    const sp = new WasmProcessor();
    try {
      await sp.load(file);
    } catch (err) {
      throw new TokenizerError(`${name}: SentencePiece could not load it (${firstLine(err)})`);
    }
    const status = sp.processor.status();
    const statusText = status.ToString();
    status.delete();
    if (statusText !== 'OK') throw new TokenizerError(`${name}: SentencePiece rejected the model (${firstLine(statusText)})`);
    // The C++ side must see the same pieces as our reader did.
    for (const piece of [trainerSpec.unkPiece, trainerSpec.bosPiece, trainerSpec.eosPiece, trainerSpec.padPiece]) {
      const wasmId = wasmPieceToId(sp, piece);
      if (wasmId !== pieceToId(piece)) {
        throw new TokenizerError(`${name}: SentencePiece maps piece ${JSON.stringify(piece)} to id ${wasmId}, the file says ${pieceToId(piece)}`);
      }
    }
    if (sp.encodeIds('a').length === 0) throw new TokenizerError(`${name}: SentencePiece encodes "a" to no ids after loading`);
    return new SentencePieceProcessor(
      sp,
      special,
      Uint8Array.from(pieces, (p) => p.type),
      pieces.map((p) => p.piece),
    );
  }

  get bosId(): number {
    return this.special.bos;
  }

  get eosId(): number {
    return this.special.eos;
  }

  /** -1 when the model has no pad piece (as Mistral's). */
  get padId(): number {
    return this.special.pad;
  }

  get unkId(): number {
    return this.special.unk;
  }

  /** Python's sp.is_control(id): BOS, EOS and other pieces that decode to nothing. False for an id out of range. */
  isControl(id: number): boolean {
    return this.pieceTypes[id] === PieceType.CONTROL;
  }

  /** Python's sp.is_unknown(id). */
  isUnknown(id: number): boolean {
    return this.pieceTypes[id] === PieceType.UNKNOWN;
  }

  /** Python's sp.is_unused(id). */
  isUnused(id: number): boolean {
    return this.pieceTypes[id] === PieceType.UNUSED;
  }

  /** Python's sp.is_byte(id): a byte-fallback piece <0x00>..<0xFF>. */
  isByte(id: number): boolean {
    return this.pieceTypes[id] === PieceType.BYTE;
  }

  /**
   * Python's sp.id_to_piece(id): the piece as the model file spells it, not as it decodes: "▁" for
   * the space it stands for ("▁Hello"), "<0x0A>" for a byte piece, "<s>" for BOS. Throws a
   * TokenizerError for an id out of range, as Python raises IndexError.
   */
  piece(id: number): string {
    if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
      throw new TokenizerError(`piece: token id ${id} is out of range, expected an integer in [0, ${this.vocabSize})`);
    }
    return this.pieceNames[id];
  }

  /** The ids of `text` as Python's sp.encode(text), with the BOS id first when `bos` (as one_file_ref.py's Tokenizer adds it). */
  encode(text: string, bos = true): number[] {
    if (typeof text !== 'string') throw new TokenizerError(`encode: text must be a string, got ${typeof text}`);
    const ids = this.sp.encodeIds(toWellFormed(text));
    if (bos) {
      if (this.special.bos < 0) throw new TokenizerError('encode: bos requested but the model has no BOS piece');
      ids.unshift(this.special.bos);
    }
    return ids;
  }

  /** The text of `ids` as Python's sp.decode(ids) (control pieces such as BOS/EOS decode to nothing). */
  decode(ids: readonly number[]): string {
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new TokenizerError(`decode: token id ${id} at position ${i} is out of range, expected an integer in [0, ${this.vocabSize})`);
      }
    }
    return this.sp.decodeIds([...ids]);
  }
}

/**
 * The largest tokenizer model read: Mistral's is 493 KB, the largest SentencePiece vocabularies
 * (256k pieces) about 4 MB.
 */
export const MAX_MODEL_BYTES = 64 << 20;

/** Opening with O_NONBLOCK: a FIFO swapped in after the stat does not block the open. */
const OPEN_FLAGS = fsConstants.O_RDONLY | (fsConstants.O_NONBLOCK ?? 0);

/** The bytes of the tokenizer model file at `path`: a regular file of at most MAX_MODEL_BYTES. */
async function readModelFile(path: string): Promise<Uint8Array> {
  const expected = 'expected a SentencePiece tokenizer model file (a regular file)';
  const failure = (err: unknown): TokenizerError => {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return new TokenizerError(`tokenizer model file not found: ${path}`);
    return new TokenizerError(`cannot read tokenizer model file ${path}: ${code ?? String(err)}`);
  };
  let stat: Stats;
  try {
    stat = await fs.stat(path);
  } catch (err) {
    throw failure(err);
  }
  if (!stat.isFile()) throw new TokenizerError(`${path}: is ${kindOf(stat)}, ${expected}`);
  let handle: FileHandle;
  try {
    handle = await fs.open(path, OPEN_FLAGS);
  } catch (err) {
    throw failure(err);
  }
  try {
    const opened = await handle.stat();
    if (!opened.isFile()) throw new TokenizerError(`${path}: is ${kindOf(opened)}, ${expected}`);
    if (opened.size > MAX_MODEL_BYTES) {
      throw new TokenizerError(`${path}: is ${opened.size} bytes, more than the ${MAX_MODEL_BYTES} a tokenizer model may have`);
    }
    const bytes = new Uint8Array(opened.size);
    for (let done = 0; done < bytes.length; ) {
      const { bytesRead } = await handle.read(bytes, done, bytes.length - done, done);
      if (bytesRead === 0) throw new TokenizerError(`${path}: ended after ${done} of its ${bytes.length} bytes (the file shrank while being read)`);
      done += bytesRead;
    }
    return bytes;
  } catch (err) {
    if (err instanceof TokenizerError) throw err;
    throw failure(err);
  } finally {
    await handle.close();
  }
}

/** Python's PieceToId: the id of the piece with that text, or the UNKNOWN piece's id. */
function pieceLookup(pieces: readonly ModelPiece[]): (name: string) => number {
  const ids = new Map<string, number>();
  pieces.forEach((p, id) => {
    if (!ids.has(p.piece)) ids.set(p.piece, id);
  });
  const unk = pieces.findIndex((p) => p.type === PieceType.UNKNOWN);
  return (name) => ids.get(name) ?? unk;
}

function wasmPieceToId(sp: WasmProcessor, name: string): number {
  const holder = new sp.sentencepiece.StringView(name);
  const view = holder.getView();
  try {
    return sp.processor.PieceToId(view);
  } finally {
    view.delete();
    holder.delete();
  }
}

/** String.prototype.toWellFormed (Node 20; not in this project's ES2022 lib typings). */
function toWellFormed(text: string): string {
  return (text as unknown as { toWellFormed(): string }).toWellFormed();
}

function firstLine(value: unknown): string {
  const text = value instanceof Error ? value.message : String(value);
  return text.split('\n', 1)[0].slice(0, 200);
}
