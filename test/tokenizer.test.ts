/**
 * Tests tokenizer/ against Python's sentencepiece: for each tokenizer model, the ids and decoded texts
 * in fixtures/tokenizer_cases/<name>.json (written by fixtures/dump_tokenizer_cases.py) must be
 * reproduced exactly. The genuine Mistral tokenizers are read from ../shared/mistral-tokenizer/ and
 * their tests skip, saying so, where that folder is absent. Also tests bad input: missing and corrupt
 * model files, out-of-range ids, lone surrogates.
 */
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SentencePieceProcessor, TokenizerError } from '../tokenizer';

const ROOT = path.resolve(__dirname, '..');
const CASES_DIR = path.join(ROOT, 'fixtures/tokenizer_cases');
const SHARED_TOKENIZERS = path.resolve(__dirname, '../../shared/mistral-tokenizer');

interface Documented {
  vocabSize: number;
  bosId: number;
  eosId: number;
  unkId: number;
  padId: number;
  /** Known encodings with BOS, from Mistral's own documentation and examples. */
  known: [string, number[]][];
}

/** Each model with its case file; the same table as DEFAULT_MODELS in fixtures/dump_tokenizer_cases.py. */
const MODELS: { name: string; model: string; documented?: Documented }[] = [
  {
    name: 'mistral-v1',
    model: path.join(SHARED_TOKENIZERS, 'tokenizer.model.v1'),
    documented: { vocabSize: 32000, bosId: 1, eosId: 2, unkId: 0, padId: -1, known: [['Hello world!', [1, 22557, 1526, 28808]]] },
  },
  {
    name: 'mistral-v3',
    model: path.join(SHARED_TOKENIZERS, 'tokenizer.model.v3'),
    documented: { vocabSize: 32768, bosId: 1, eosId: 2, unkId: 0, padId: -1, known: [] },
  },
  { name: 'tiny', model: path.join(ROOT, 'fixtures/tiny/tokenizer.model') },
];

interface CaseFile {
  model_path: string;
  model_sha256: string;
  sentencepiece_version: string;
  vocab_size: number;
  bos_id: number;
  eos_id: number;
  unk_id: number;
  pad_id: number;
  cases: { name: string; text: string; ids: number[]; decoded: string; decoded_each: string[] }[];
  decode_cases: { name: string; ids: number[]; decoded: string }[];
}

function readCases(name: string): CaseFile | undefined {
  const file = path.join(CASES_DIR, `${name}.json`);
  return fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as CaseFile) : undefined;
}

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

for (const { name, model, documented } of MODELS) {
  const available = fs.existsSync(model);
  const title = available ? name : `${name} (skipped: tokenizer model ${model} not found)`;
  if (!available) console.warn(`tokenizer.test.ts: skipping the ${name} tests: tokenizer model ${model} not found`);

  describe.skipIf(!available)(title, () => {
    const expected = readCases(name);
    let tok: SentencePieceProcessor;
    let listenersBefore: { uncaught: number; rejection: number };

    beforeAll(async () => {
      listenersBefore = {
        uncaught: process.listenerCount('uncaughtException'),
        rejection: process.listenerCount('unhandledRejection'),
      };
      tok = await SentencePieceProcessor.load(model);
    });

    it('has a case file made from this very model', () => {
      expect(expected, `missing ${path.join(CASES_DIR, name + '.json')}: run /usr/bin/python3 fixtures/dump_tokenizer_cases.py`).toBeDefined();
      expect(path.resolve(ROOT, expected!.model_path)).toBe(model);
      const sha = createHash('sha256').update(fs.readFileSync(model)).digest('hex');
      expect(sha, `${model} differs from the model the cases were dumped from: rerun fixtures/dump_tokenizer_cases.py`).toBe(
        expected!.model_sha256,
      );
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

    const cases = expected?.cases ?? [];
    it.each(cases.map((c) => [c.name, c] as const))('encodes and decodes %s as Python does', (_, c) => {
      expect(tok.encode(c.text, false)).toEqual(c.ids);
      expect(tok.encode(c.text)).toEqual([expected!.bos_id, ...c.ids]);
      expect(tok.decode(c.ids)).toBe(c.decoded);
      expect(c.ids.map((id) => tok.decode([id]))).toEqual(c.decoded_each);
    });

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

    it('rejects out-of-range ids in decode, naming the id', async () => {
      const n = tok.vocabSize;
      await expectTokenizerError(() => tok.decode([1, n]), `token id ${n} at position 1`, `[0, ${n})`);
      await expectTokenizerError(() => tok.decode([-1]), 'token id -1 at position 0');
      await expectTokenizerError(() => tok.decode([2.5]), 'token id 2.5');
      await expectTokenizerError(() => tok.decode([Number.NaN]), 'token id NaN');
    });
  });
}

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
