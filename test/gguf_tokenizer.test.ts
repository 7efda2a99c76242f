/**
 * The tokenizer rebuilt from GGUF metadata (tokenizer/from_gguf.ts) tokenizes as the SentencePiece
 * model it came from: each model's vocabulary is written into a GGUF file's tokenizer.ggml.* keys
 * by the project's writer, read back by the GGUF reader, rebuilt as a ModelProto and loaded; its ids
 * must equal what Python's sentencepiece gave with the original model on the project's tokenizer
 * corpus (fixtures/tokenizer_cases, dumped by fixtures/dump_tokenizer_cases.py) and the held-out
 * strings, and decoding must give the same texts. The genuine Mistral v1 tokenizer is read from
 * ../shared/mistral-tokenizer (skipped with a message when absent); tiny and storyteller are here.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { openGguf, GgufType } from '../checkpoint/gguf';
import { llamaMetadata, writeGguf } from '../checkpoint/gguf_write';
import { ggufVocabFromSentencePiece, sentencePieceFromGguf } from '../tokenizer/from_gguf';
import { SentencePieceProcessor } from '../tokenizer';
import { MODELS, modelAvailable, modelTitle, readCases, ROOT } from './tokenizer_cases';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-tok-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const PARAMS = { dim: 64, n_layers: 1, head_dim: 16, hidden_dim: 64, n_heads: 4, n_kv_heads: 4, sliding_window: 8, norm_eps: 1e-5, vocab_size: 1, rope_theta: 10000 };

/** The model's vocabulary through a GGUF file and back to a tokenizer. */
async function throughGguf(modelFile: string, name: string): Promise<{ rebuilt: SentencePieceProcessor; original: SentencePieceProcessor }> {
  const bytes = fs.readFileSync(modelFile);
  const vocab = ggufVocabFromSentencePiece(bytes, modelFile);
  const file = path.join(dir, `${name}.gguf`);
  writeGguf(file, llamaMetadata(name, { ...PARAMS, vocab_size: vocab.tokens.length }, vocab, 'F32'), []);
  const gguf = openGguf(file);
  try {
    const read = gguf.vocab();
    expect(read.tokens).toEqual(vocab.tokens);
    expect(Array.from(read.scores)).toEqual(Array.from(vocab.scores));
    expect(gguf.metadata.get('tokenizer.ggml.token_type')?.itemType).toBe(GgufType.INT32);
    const rebuilt = await SentencePieceProcessor.loadBytes(sentencePieceFromGguf(read, file), file);
    return { rebuilt, original: await SentencePieceProcessor.load(modelFile) };
  } finally {
    gguf.close();
  }
}

const STORYTELLER = path.join(ROOT, 'fixtures', 'storyteller', 'tokenizer.model');

for (const entry of MODELS.filter((m) => m.name !== 'mistral-v3')) {
  const available = modelAvailable(entry, 'gguf_tokenizer.test.ts');
  describe.skipIf(!available)(`GGUF vocabulary of ${modelTitle(entry, available)}`, () => {
    it('gives Python sentencepiece\'s ids on the corpus and held-out strings, and the same decodes', async () => {
      const { rebuilt, original } = await throughGguf(entry.model, entry.name);
      expect(rebuilt.vocabSize).toBe(original.vocabSize);
      expect([rebuilt.bosId, rebuilt.eosId, rebuilt.unkId, rebuilt.padId]).toEqual([original.bosId, original.eosId, original.unkId, original.padId]);
      let checked = 0;
      for (const file of [readCases(entry.name), readCases(entry.name, true)]) {
        expect(file).toBeDefined();
        for (const c of file!.cases) {
          expect(rebuilt.encode(c.text, false), c.name).toEqual(c.ids);
          expect(rebuilt.decode(c.ids), c.name).toBe(c.decoded);
          checked++;
        }
      }
      expect(checked).toBeGreaterThan(100);
      for (let id = 0; id < original.vocabSize; id += 97) {
        expect(rebuilt.piece(id)).toBe(original.piece(id));
        expect(rebuilt.isByte(id)).toBe(original.isByte(id));
        expect(rebuilt.isControl(id)).toBe(original.isControl(id));
      }
    });
  });
}

describe('GGUF vocabulary of the storyteller', () => {
  it('encodes its own stories as the original model does', async () => {
    const { rebuilt, original } = await throughGguf(STORYTELLER, 'storyteller');
    const text = fs.readFileSync(path.join(ROOT, 'fixtures', 'storyteller_heldout.txt'), 'utf8');
    const ids = original.encode(text, true);
    expect(ids.length).toBeGreaterThan(1000);
    expect(rebuilt.encode(text, true)).toEqual(ids);
  });
});

describe('bad vocabularies', () => {
  const vocab = () => ggufVocabFromSentencePiece(fs.readFileSync(path.join(ROOT, 'fixtures', 'tiny', 'tokenizer.model')), 'tiny');
  it('a BOS id that is not a control piece', () => {
    expect(() => sentencePieceFromGguf({ ...vocab(), bosId: 300 }, 'x.gguf')).toThrow(/^x\.gguf: tokenizer\.ggml\.bos_token_id is 300, but token 300 .* has type 1, expected 3 \(CONTROL\)$/);
  });
  it('a token type outside 1..6', () => {
    const v = vocab();
    v.tokenTypes[7] = 9;
    expect(() => sentencePieceFromGguf(v, 'x.gguf')).toThrow(/^x\.gguf: tokenizer\.ggml\.token_type\[7\] is 9, expected 1\.\.6/);
  });
  it('an empty vocabulary', () => {
    expect(() => sentencePieceFromGguf({ ...vocab(), tokens: [] }, 'x.gguf')).toThrow(/^x\.gguf: tokenizer\.ggml\.tokens is empty$/);
  });
});
