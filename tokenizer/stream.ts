/**
 * Streaming detokenization: turns token ids, pushed one at a time as a model generates them, into
 * text that can be printed at once, such that the pieces put together are exactly decode(all ids).
 *
 * Two things make this more than decoding each id alone:
 *
 *  - Byte fallback. A character missing from the vocabulary is spelled as its UTF-8 bytes, one piece
 *    each (`€` is <0xE2><0x82><0xAC>). SentencePiece decodes a run of byte pieces together and turns
 *    every byte that does not (yet) form a complete character into U+FFFD. So text ending in U+FFFD
 *    after a byte piece is held back until the next id shows whether those bytes complete a
 *    character; a character comes out whole when its last byte arrives.
 *  - The dummy-prefix space. SentencePiece drops the leading "▁" of the first piece of a text, and
 *    only there: decode([▁Hello]) is "Hello" but decode([▁a, ▁Hello]) is "a Hello". Once any
 *    non-control piece has been seen (BOS and EOS are control pieces), later pieces keep their space.
 *
 * How: the ids since the last point where all text was final (the "window") are decoded together;
 * once some non-control piece came before the window, the window is decoded behind an "anchor"
 * piece, a plain piece whose own text is cut off again, so that its first piece keeps its space as it
 * would in the whole text. Each push decodes only the window: a piece plus any byte pieces after it.
 * This relies on SentencePiece's decoder being local (pieces independent, byte runs decoded one
 * character at a time) and on the model having no denormalizer, as Mistral's tokenizers have none.
 */
import type { SentencePieceProcessor } from './index';
import { TokenizerError } from './error';

/** What StreamDecoder needs from a tokenizer (SentencePieceProcessor has all of it). */
export type StreamTokenizer = Pick<SentencePieceProcessor, 'decode' | 'isByte' | 'isControl' | 'isUnknown' | 'isUnused' | 'vocabSize'>;

const REPLACEMENT = '\ufffd';

export class StreamDecoder {
  /** Ids whose text is not all returned yet (or was, but the last of them is a byte piece). */
  private window: number[] = [];
  /** How many UTF-16 units of the window's text push() has returned. */
  private returned = 0;
  /** Whether a non-control piece came before the window: then the window is decoded behind the anchor. */
  private anchored = false;
  private readonly anchorId: number;
  private readonly anchorText: string;

  constructor(private readonly tokenizer: StreamTokenizer) {
    this.anchorId = findAnchor(tokenizer);
    this.anchorText = tokenizer.decode([this.anchorId]);
  }

  /** Adds the next id; returns the text it completes (often "", e.g. for a byte that starts a character). */
  push(id: number): string {
    const n = this.tokenizer.vocabSize;
    if (!Number.isInteger(id) || id < 0 || id >= n) {
      throw new TokenizerError(`StreamDecoder.push: token id ${id} is out of range, expected an integer in [0, ${n})`);
    }
    this.window.push(id);
    const text = this.decodeWindow();
    // After a byte piece, trailing U+FFFD may be bytes of a character still to come: hold them back.
    let end = text.length;
    if (this.tokenizer.isByte(id)) {
      while (end > this.returned && text[end - 1] === REPLACEMENT) end--;
    }
    const out = text.slice(this.returned, end);
    this.returned = end;
    if (end === text.length) this.startWindow();
    return out;
  }

  /** Ends the text: returns what was held back (bytes that never formed a character, as U+FFFD) and starts afresh. */
  flush(): string {
    const out = this.decodeWindow().slice(this.returned);
    this.window = [];
    this.returned = 0;
    this.anchored = false;
    return out;
  }

  private decodeWindow(): string {
    if (this.window.length === 0) return '';
    if (!this.anchored) return this.tokenizer.decode(this.window);
    return this.tokenizer.decode([this.anchorId, ...this.window]).slice(this.anchorText.length);
  }

  /** Everything so far is returned and final: later ids no longer change it. */
  private startWindow(): void {
    if (!this.anchored) this.anchored = this.window.some((id) => !this.tokenizer.isControl(id));
    this.window = [];
    this.returned = 0;
  }
}

/** A plain piece (not control, unknown, unused or byte) whose text is not empty, to decode windows behind. */
function findAnchor(tokenizer: StreamTokenizer): number {
  for (let id = 0; id < tokenizer.vocabSize; id++) {
    if (tokenizer.isControl(id) || tokenizer.isUnknown(id) || tokenizer.isUnused(id) || tokenizer.isByte(id)) continue;
    const text = tokenizer.decode([id]);
    if (text !== '' && !text.includes(REPLACEMENT)) return id;
  }
  throw new TokenizerError('StreamDecoder: the tokenizer has no plain piece with text');
}

/** Decodes `ids` through a StreamDecoder and returns the pieces of text in order (the last one from flush()). */
export function streamDecode(tokenizer: StreamTokenizer, ids: readonly number[]): string[] {
  const decoder = new StreamDecoder(tokenizer);
  const pieces = ids.map((id) => decoder.push(id));
  pieces.push(decoder.flush());
  return pieces;
}
