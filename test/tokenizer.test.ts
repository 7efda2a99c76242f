/**
 * Tests tokenizer/ against Python's sentencepiece: for each tokenizer model, the ids and decoded texts
 * in fixtures/tokenizer_cases/<name>.json (the corpus of strings.json) and <name>.heldout.json (seeded
 * random strings the code was never tuned on), written by fixtures/dump_tokenizer_cases.py, must be
 * reproduced exactly, and so must the piece types. The genuine Mistral tokenizers are read from
 * ../shared/mistral-tokenizer/ and their tests skip, saying so, where that folder is absent. Also tests
 * loadBytes() and bad input: missing and corrupt model files, out-of-range ids, lone surrogates.
 */
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SentencePieceProcessor, TokenizerError } from '../tokenizer';
import { caseFilePath, MODELS, modelAvailable, modelTitle, readCases, ROOT, TINY_TOKENIZER } from './tokenizer_cases';

/** Asserts that `run` throws a one-line TokenizerError whose message contains every one of `parts`. */
async function expectTokenizerError(run: () => unknown, ...parts: string[]): Promise<void> {
  let caught: unknown;
  try {
    await run();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(TokenizerError);
  const message = (caught as Error).message;
  expect(message).not.toContain('\n');
  for (const part of parts) expect(message).toContain(part);
}

/**
 * Python's sp.id_to_piece(id) for a few ids of each model (checked with /usr/bin/python3's
 * sentencepiece): the special pieces, the first byte piece, and the pieces of "Hello world!"
 * (Mistral's documented v1 vector [1, 22557, 1526, 28808] is <s> ▁Hello ▁world !).
 */
const KNOWN_PIECES: Record<string, [number, string][]> = {
  'mistral-v1': [[0, '<unk>'], [1, '<s>'], [2, '</s>'], [3, '<0x00>'], [258, '<0xFF>'], [22557, '\u2581Hello'], [1526, '\u2581world'], [28808, '!']],
  'mistral-v3': [[0, '<unk>'], [1, '<s>'], [2, '</s>'], [3, '[INST]'], [4, '[/INST]'], [771, '<0x00>'], [23325, '\u2581Hello'], [2294, '\u2581world'], [29576, '!']],
  tiny: [[0, '<unk>'], [1, '<s>'], [2, '</s>'], [3, '<0x00>'], [417, '\u2581H'], [307, 'el'], [293, 'lo'], [265, '\u2581w'], [271, 'or'], [315, 'ld'], [496, '!']],
};

for (const entry of MODELS) {
  const { name, model, documented } = entry;
  const available = modelAvailable(entry, 'tokenizer.test.ts');

  describe.skipIf(!available)(modelTitle(entry, available), () => {
    const expected = readCases(name);
    const heldout = readCases(name, true);
    let tok: SentencePieceProcessor;
    let listenersBefore: { uncaught: number; rejection: number };

    beforeAll(async () => {
      listenersBefore = {
        uncaught: process.listenerCount('uncaughtException'),
        rejection: process.listenerCount('unhandledRejection'),
      };
      tok = await SentencePieceProcessor.load(model);
    });

    it('has case files made from this very model', () => {
      const sha = createHash('sha256').update(fs.readFileSync(model)).digest('hex');
      for (const [file, cases] of [[caseFilePath(name), expected], [caseFilePath(name, true), heldout]] as const) {
        expect(cases, `missing ${file}: run /usr/bin/python3 fixtures/dump_tokenizer_cases.py`).toBeDefined();
        expect(path.resolve(ROOT, cases!.model_path)).toBe(model);
        expect(sha, `${model} differs from the model ${file} was dumped from: rerun fixtures/dump_tokenizer_cases.py`).toBe(
          cases!.model_sha256,
        );
      }
      expect(expected!.cases.length).toBeGreaterThanOrEqual(150);
      expect(heldout!.cases.length).toBeGreaterThanOrEqual(100);
    });

    it('installs no process-wide error handlers when loading', () => {
      expect(process.listenerCount('uncaughtException')).toBe(listenersBefore.uncaught);
      expect(process.listenerCount('unhandledRejection')).toBe(listenersBefore.rejection);
    });

    it.runIf(expected !== undefined)('has the special ids and vocab size Python reports', () => {
      expect({ vocab: tok.vocabSize, bos: tok.bosId, eos: tok.eosId, unk: tok.unkId, pad: tok.padId }).toEqual({
        vocab: expected!.vocab_size,
        bos: expected!.bos_id,
        eos: expected!.eos_id,
        unk: expected!.unk_id,
        pad: expected!.pad_id,
      });
    });

    it.runIf(expected !== undefined)('has the control, unknown, unused and byte pieces Python reports', () => {
      const ids = Array.from({ length: tok.vocabSize }, (_, i) => i);
      expect(ids.filter((i) => tok.isControl(i))).toEqual(expected!.control_ids);
      expect(ids.filter((i) => tok.isUnknown(i))).toEqual(expected!.unknown_ids);
      expect(ids.filter((i) => tok.isUnused(i))).toEqual(expected!.unused_ids);
      expect(ids.filter((i) => tok.isByte(i))).toEqual(expected!.byte_ids);
      expect(expected!.byte_ids).toHaveLength(256);
      for (const bad of [-1, tok.vocabSize, 1.5]) {
        expect([tok.isControl(bad), tok.isUnknown(bad), tok.isUnused(bad), tok.isByte(bad)]).toEqual([false, false, false, false]);
      }
    });

    if (documented) {
      it('matches the documented facts about this tokenizer', () => {
        expect({ vocab: tok.vocabSize, bos: tok.bosId, eos: tok.eosId, unk: tok.unkId, pad: tok.padId }).toEqual({
          vocab: documented.vocabSize,
          bos: documented.bosId,
          eos: documented.eosId,
          unk: documented.unkId,
          pad: documented.padId,
        });
        for (const [text, ids] of documented.known) {
          expect(tok.encode(text)).toEqual(ids);
          expect(tok.decode(ids)).toBe(text);
        }
      });
    }

    for (const [label, file] of [['corpus', expected], ['held-out', heldout]] as const) {
      const cases = file?.cases ?? [];
      it.each(cases.map((c) => [c.name, c] as const))(`encodes and decodes ${label} string %s as Python does`, (_, c) => {
        expect(tok.encode(c.text, false)).toEqual(c.ids);
        expect(tok.encode(c.text)).toEqual([file!.bos_id, ...c.ids]);
        expect(tok.decode(c.ids)).toBe(c.decoded);
        expect(c.ids.map((id) => tok.decode([id]))).toEqual(c.decoded_each);
      });
    }

    const decodeCases = expected?.decode_cases ?? [];
    it.each(decodeCases.map((c) => [c.name, c] as const))('decodes the ids of %s as Python does', (_, c) => {
      expect(tok.decode(c.ids)).toBe(c.decoded);
    });

    it.runIf(expected !== undefined)('encodes a lone surrogate as U+FFFD (Python encodes "x\\ufffdy" to these ids)', () => {
      const replaced = expected!.cases.find((c) => c.name === 'replacement_char')!;
      expect(replaced.text).toBe('x\ufffdy');
      expect(tok.encode('x\ud800y', false)).toEqual(replaced.ids);
      expect(tok.encode('x\udc00y', false)).toEqual(replaced.ids);
    });

    it("piece(id) is Python's sp.id_to_piece: the piece as the file spells it", async () => {
      for (const [id, piece] of KNOWN_PIECES[name]) expect(tok.piece(id), `id ${id}`).toBe(piece);
      for (const [id, piece] of documented?.known.flatMap(([text, ids]) => ids.map((i) => [i, tok.piece(i)] as const)) ?? []) {
        expect(KNOWN_PIECES[name].some(([k, p]) => k === id && p === piece), `documented id ${id}`).toBe(true);
      }
      if (expected) {
        // SentencePiece names the byte pieces <0x00>..<0xFF> (uppercase hex); Python lists them in byte order.
        expect(expected.byte_ids.map((id) => tok.piece(id))).toEqual(Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`));
      }
      const n = tok.vocabSize;
      await expectTokenizerError(() => tok.piece(n), `token id ${n}`, `[0, ${n})`);
      await expectTokenizerError(() => tok.piece(-1), 'token id -1');
      await expectTokenizerError(() => tok.piece(1.5), 'token id 1.5');
    });

    it.runIf(expected !== undefined)("piece(id) of every plain id in the corpus is what Python's decode([id]) implies", () => {
      // A plain piece decodes alone to its string with "\u2581" as a space, less the one leading space
      // decoding drops (the dummy prefix): Python's decode([id]) says what the piece is. The corpus has
      // a piece that is a lone U+FEFF (byte order mark), which a UTF-8 decoder must not swallow.
      for (const c of expected!.cases) {
        c.ids.forEach((id, i) => {
          if (tok.isByte(id) || tok.isControl(id) || tok.isUnknown(id)) return;
          expect(tok.piece(id).replaceAll('\u2581', ' ').replace(/^ /, ''), `${c.name}: id ${id}`).toBe(c.decoded_each[i]);
        });
      }
    });

    it('rejects out-of-range ids in decode, naming the id', async () => {
      const n = tok.vocabSize;
      await expectTokenizerError(() => tok.decode([1, n]), `token id ${n} at position 1`, `[0, ${n})`);
      await expectTokenizerError(() => tok.decode([-1]), 'token id -1 at position 0');
      await expectTokenizerError(() => tok.decode([2.5]), 'token id 2.5');
      await expectTokenizerError(() => tok.decode([Number.NaN]), 'token id NaN');
    });
  });
}

describe('loadBytes', () => {
  const tiny = readCases('tiny')!;
  /** The private temp folders loadBytes makes (it must remove each one). */
  const tempFolders = (): string[] => fs.readdirSync(os.tmpdir()).filter((f) => f.startsWith('sentencepiece-'));

  it('loads a model from memory, encoding as Python does, and leaves no temp file', async () => {
    const before = tempFolders();
    const tok = await SentencePieceProcessor.loadBytes(fs.readFileSync(TINY_TOKENIZER), 'model.tar:tokenizer.model');
    expect(tempFolders()).toEqual(before);
    expect(tok.vocabSize).toBe(tiny.vocab_size);
    for (const c of tiny.cases.slice(0, 40)) {
      expect(tok.encode(c.text, false)).toEqual(c.ids);
      expect(tok.decode(c.ids)).toBe(c.decoded);
    }
  });

  it('takes a plain Uint8Array view into a larger buffer', async () => {
    const file = fs.readFileSync(TINY_TOKENIZER);
    const padded = new Uint8Array(file.length + 10);
    padded.set(file, 7);
    const tok = await SentencePieceProcessor.loadBytes(padded.subarray(7, 7 + file.length), 'inner');
    const hello = tiny.cases.find((c) => c.name === 'hello_world')!;
    expect(tok.encode(hello.text, false)).toEqual(hello.ids);
  });

  it('names the model, not a temp file, in errors, and cleans up', async () => {
    const before = tempFolders();
    await expectTokenizerError(
      () => SentencePieceProcessor.loadBytes(new TextEncoder().encode('{"not": "a model"}'), 'weights.tar:tokenizer.model'),
      'weights.tar:tokenizer.model',
      'not a SentencePiece model file',
    );
    const truncated = fs.readFileSync(TINY_TOKENIZER).subarray(0, 1000);
    await expectTokenizerError(() => SentencePieceProcessor.loadBytes(truncated, 'cut.model'), 'cut.model');
    await expectTokenizerError(() => SentencePieceProcessor.loadBytes('abc' as unknown as Uint8Array, 'str.model'), 'str.model', 'Uint8Array');
    expect(tempFolders()).toEqual(before);
  });
});

describe('bad model files', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokenizer-test-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Writes `bytes` to a file in the temporary folder and returns its path. */
  function write(fileName: string, bytes: Uint8Array | string): string {
    const file = path.join(dir, fileName);
    fs.writeFileSync(file, bytes);
    return file;
  }

  /** Deterministic pseudo-random bytes (a linear congruential generator), so failures reproduce. */
  function randomBytes(n: number, seed: number): Uint8Array {
    const out = new Uint8Array(n);
    let x = seed >>> 0;
    for (let i = 0; i < n; i++) {
      x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
      out[i] = x >>> 24;
    }
    return out;
  }

  it('names a missing file', async () => {
    const file = path.join(dir, 'no-such-tokenizer.model');
    await expectTokenizerError(() => SentencePieceProcessor.load(file), 'not found', file);
  });

  it('names a folder given as the model', async () => {
    await expectTokenizerError(() => SentencePieceProcessor.load(dir), dir);
  });

  it('rejects an empty file', async () => {
    const file = write('empty.model', new Uint8Array(0));
    await expectTokenizerError(() => SentencePieceProcessor.load(file), file, 'empty');
  });

  it('rejects random bytes', async () => {
    const bytes = randomBytes(4096, 12345);
    bytes[0] = 0x37; // not the tag of ModelProto.pieces
    const file = write('random.model', bytes);
    await expectTokenizerError(() => SentencePieceProcessor.load(file), file, 'not a SentencePiece model file');
  });

  it('rejects random bytes that start like a ModelProto', async () => {
    for (const seed of [1, 2, 3, 4, 5]) {
      const bytes = randomBytes(4096, seed);
      bytes[0] = 0x0a;
      const file = write(`random-${seed}.model`, bytes);
      await expectTokenizerError(() => SentencePieceProcessor.load(file), file);
    }
  });

  it('rejects a text file', async () => {
    const file = write('package.json', fs.readFileSync(path.join(ROOT, 'package.json')));
    await expectTokenizerError(() => SentencePieceProcessor.load(file), file, 'not a SentencePiece model file');
  });

  it('rejects a protobuf with no UNKNOWN piece', async () => {
    // ModelProto { pieces { piece: "a" } }: field 1 (len 3) holding field 1 (len 1) "a".
    const file = write('no-unk.model', Uint8Array.from([0x0a, 0x03, 0x0a, 0x01, 0x61]));
    await expectTokenizerError(() => SentencePieceProcessor.load(file), file, '0 UNKNOWN pieces');
  });

  const anyModel = MODELS.map((m) => m.model).find((m) => fs.existsSync(m));
  it.runIf(anyModel !== undefined)('rejects a truncated model', async () => {
    const bytes = fs.readFileSync(anyModel!);
    const file = write('truncated.model', bytes.subarray(0, Math.floor(bytes.length / 2)));
    await expectTokenizerError(() => SentencePieceProcessor.load(file), file, 'not a SentencePiece model file');
  });
});
