/**
 * Tests tokenizer/stream.ts: token-by-token decoding must put together exactly what Python's
 * sp.decode gives for all the ids (for every corpus, held-out and decode case of
 * fixtures/tokenizer_cases/, with and without BOS), must never return part of a character, and must
 * keep SentencePiece's rule that only the first piece of a text loses its leading space.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { SentencePieceProcessor, TokenizerError } from '../tokenizer';
import { StreamDecoder, streamDecode } from '../tokenizer/stream';
import { MODELS, modelAvailable, modelTitle, readCases } from './tokenizer_cases';

const FFFD = '\ufffd';

/** Deterministic pseudo-random integers in [0, n) (a linear congruential generator), so failures reproduce. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0;
  return (n) => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    return Math.floor((x / 2 ** 32) * n);
  };
}

/**
 * Streams `ids` and checks, after every push at the positions `checkAt` allows, that what came out so
 * far is decode(ids so far) -- all of it after a non-byte piece, all but trailing U+FFFD after a byte
 * piece (bytes that may still become a character). Returns the pieces, flush() last.
 */
function streamChecked(tok: SentencePieceProcessor, ids: readonly number[], checkAt: (i: number) => boolean): string[] {
  const decoder = new StreamDecoder(tok);
  const pieces: string[] = [];
  let sofar = '';
  ids.forEach((id, i) => {
    const piece = decoder.push(id);
    pieces.push(piece);
    sofar += piece;
    if (!checkAt(i)) return;
    const full = tok.decode(ids.slice(0, i + 1));
    if (tok.isByte(id)) {
      expect(full.startsWith(sofar), `after id #${i}`).toBe(true);
      expect(full.slice(sofar.length), `held back after id #${i}`).toMatch(/^\ufffd*$/u);
    } else {
      expect(sofar, `after id #${i}`).toBe(full);
    }
  });
  pieces.push(decoder.flush());
  return pieces;
}

for (const entry of MODELS) {
  const available = modelAvailable(entry, 'tokenizer_stream.test.ts');

  describe.skipIf(!available)(modelTitle(entry, available), () => {
    const corpus = readCases(entry.name);
    const heldout = readCases(entry.name, true);
    let tok: SentencePieceProcessor;

    beforeAll(async () => {
      tok = await SentencePieceProcessor.load(entry.model);
    });

    for (const [label, file] of [['corpus', corpus], ['held-out', heldout]] as const) {
      const cases = file?.cases ?? [];
      it(`streams every ${label} string (${cases.length}) to Python's decode, with and without BOS`, () => {
        expect(cases.length).toBeGreaterThan(0);
        for (const c of cases) {
          // Every prefix for short texts; every 13th and the last for long ones (it decodes each prefix).
          const checkAt = (i: number): boolean => c.ids.length <= 120 || i % 13 === 0 || i === c.ids.length - 1;
          const plain = streamChecked(tok, c.ids, checkAt);
          expect(plain.join(''), c.name).toBe(c.decoded);
          const withBos = streamDecode(tok, [file!.bos_id, ...c.ids]);
          expect(withBos.join(''), `${c.name} with BOS`).toBe(c.decoded);
          expect(withBos[0], `${c.name}: BOS gives no text`).toBe('');
          if (!c.decoded.includes(FFFD)) {
            expect(plain.filter((p) => p.includes(FFFD)), `${c.name}: no piece holds part of a character`).toEqual([]);
          }
        }
      });
    }

    it("streams Python's decode cases (BOS/EOS/UNK inside text, lone bytes)", () => {
      const cases = corpus?.decode_cases ?? [];
      expect(cases.length).toBeGreaterThan(5);
      for (const c of cases) {
        expect(streamChecked(tok, c.ids, () => true).join(''), c.name).toBe(c.decoded);
      }
    });

    it("holds each UTF-8 byte piece back until its character is complete ('€' is E2 82 AC)", () => {
      const byteId = (b: number): number => corpus!.byte_ids[b];
      const decoder = new StreamDecoder(tok);
      expect([0xe2, 0x82, 0xac].map((b) => decoder.push(byteId(b)))).toEqual(['', '', '€']);
      // A 4-byte character (U+1F600) after text that is already out.
      expect([0xf0, 0x9f, 0x98, 0x80].map((b) => decoder.push(byteId(b)))).toEqual(['', '', '', '😀']);
      expect(decoder.flush()).toBe('');
      // A lead byte that never gets its continuation: U+FFFD, as soon as something else shows it is final.
      expect(decoder.push(byteId(0xc3))).toBe('');
      expect(decoder.push(byteId(0x41))).toBe(`${FFFD}A`);
      expect(decoder.push(byteId(0xc3))).toBe('');
      expect(decoder.flush()).toBe(FFFD);
    });

    it('drops the leading space of the first piece only, then starts afresh after flush()', () => {
      const hello = corpus!.cases.find((c) => c.name === 'hello_world')!;
      const first = streamDecode(tok, [corpus!.bos_id, ...hello.ids, corpus!.eos_id, ...hello.ids]);
      // "Hello world!" twice: the second "Hello" follows text, so it keeps its space (EOS adds nothing).
      expect(first.join('')).toBe('Hello world! Hello world!');
      expect(first[1]).not.toMatch(/^ /);
      const decoder = new StreamDecoder(tok);
      hello.ids.forEach((id) => decoder.push(id));
      decoder.flush();
      expect(hello.ids.map((id) => decoder.push(id)).join('') + decoder.flush()).toBe('Hello world!');
    });

    it('matches decode() on random id sequences heavy in byte pieces, control pieces and unknowns', () => {
      const next = rng(entry.name.length * 7919 + 17);
      const bytes = corpus!.byte_ids;
      const special = [corpus!.bos_id, corpus!.eos_id, corpus!.unk_id];
      const utf8 = new TextEncoder();
      for (let trial = 0; trial < 300; trial++) {
        const ids: number[] = [];
        const length = 1 + next(30);
        while (ids.length < length) {
          const r = next(100);
          if (r < 30) {
            // the UTF-8 bytes of a random character, sometimes cut short
            const cp = [0x41 + next(26), 0xe9, 0x20ac, 0x4e2d, 0x1f600 + next(80)][next(5)];
            const enc = [...utf8.encode(String.fromCodePoint(cp))];
            ids.push(...enc.slice(0, next(5) === 0 ? 1 + next(enc.length) : enc.length).map((b) => bytes[b]));
          } else if (r < 40) {
            ids.push(bytes[next(256)]);
          } else if (r < 50) {
            ids.push(special[next(special.length)]);
          } else {
            ids.push(next(tok.vocabSize));
          }
        }
        expect(streamChecked(tok, ids, () => true).join(''), JSON.stringify(ids)).toBe(tok.decode(ids));
      }
    });

    it('rejects an id outside the vocabulary, naming it', () => {
      const decoder = new StreamDecoder(tok);
      expect(() => decoder.push(tok.vocabSize)).toThrow(TokenizerError);
      expect(() => decoder.push(-1)).toThrow(`token id -1 is out of range, expected an integer in [0, ${tok.vocabSize})`);
      expect(() => decoder.push(0.5)).toThrow('token id 0.5');
    });
  });
}

describe('the known Mistral-7B v0.1 stream', () => {
  const v1 = MODELS.find((m) => m.name === 'mistral-v1')!;
  const available = modelAvailable(v1, 'tokenizer_stream.test.ts');
  it.skipIf(!available)(`"Hello world!" streams as "Hello", " world", "!"${available ? '' : ` (skipped: ${v1.model} not found)`}`, async () => {
    const tok = await SentencePieceProcessor.load(v1.model);
    // [BOS, ▁Hello, ▁world, !]: BOS is silent, the first piece loses its dummy-prefix space, the next keeps it.
    expect(streamDecode(tok, [1, 22557, 1526, 28808])).toEqual(['', 'Hello', ' world', '!', '']);
    // [▁, ▁Hello] is " Hello" (Python's sp.decode): the lone "▁" is the first piece and takes the cut.
    expect(streamDecode(tok, [28705, 22557])).toEqual(['', ' Hello', '']);
  });
});
