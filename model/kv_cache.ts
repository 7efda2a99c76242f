/**
 * The rolling KV cache of one attention layer, and the book of which position each slot holds.
 *
 * one_file_ref.py allocates `cache_k`, `cache_v` of [max_batch_size, sliding_window, n_kv_heads,
 * head_dim] up front and writes position p into slot p % W with one scatter. Here the buffers grow
 * with the slots written, up to W (same results; memory for only what is used: Mistral 7B's full
 * window is 1 GiB per batch row), and a `SlotBook` shared by all layers (they are written together)
 * records which position each slot holds. That record answers the one question the reference
 * answers from the position alone: how many positions right before a forward's first token are in
 * the cache, to attend to. From the record, not the position: a fresh sequence placed at position
 * P (nothing before it written) attends to its own tokens only, as the reference's prefill does.
 *
 * Rolling buffer, W = 4: after a prefill of positions 0..5 only the last W were written; a decode
 * step at 6 then overwrites the slot of position 2:
 *
 *     slot:                      0   1   2   3
 *     after prefill 0..5:        4   5   2   3     (positions 0, 1 were overwritten by 4, 5)
 *     after decode step at 6:    4   5   6   3     (6 % 4 = 2; it attends to 3, 4, 5 and itself)
 */
import * as tf from '@tensorflow/tfjs-core';

/** Which position each slot holds (-1: never written), for a window of W slots. */
export class SlotBook {
  private held: number[] = [];

  constructor(readonly window: number) {}

  /** Slots the buffers need so far (the highest slot written + 1, at most W). */
  get size(): number {
    return this.held.length;
  }

  slot(position: number): number {
    return position % this.window;
  }

  /**
   * How many positions right before `first` the cache holds in order, at most W-1: the keys a
   * forward starting at `first` attends to besides its own tokens. Worked out once per forward and
   * shared by the mask and every layer's keys.
   */
  earlierKeys(first: number): number {
    let n = 0;
    while (n < this.window - 1 && first - n - 1 >= 0 && this.held[this.slot(first - n - 1)] === first - n - 1) n++;
    return n;
  }

  /** The slots the last min(T, W) of `positions` go to, and records them as held. */
  write(positions: readonly number[]): number[] {
    const written = positions.slice(Math.max(0, positions.length - this.window));
    const slots = written.map((p) => this.slot(p));
    for (const s of slots) while (this.held.length <= s) this.held.push(-1);
    slots.forEach((s, i) => (this.held[s] = written[i]));
    return slots;
  }

  copy(): SlotBook {
    const c = new SlotBook(this.window);
    c.held = [...this.held];
    return c;
  }

  /** Forgets every position: the next forward starts a fresh sequence wherever it is placed. */
  clear(): void {
    this.held = [];
  }
}

/** Swaps a long-lived tensor for its new value: frees the old one, keeps the new one out of tf.tidy. */
export function replace<T extends tf.Tensor>(old: T, next: T): T {
  old.dispose();
  return tf.keep(next);
}

/** One layer's keys and values: k, v: [maxBatchSize, slots, K, d]. */
export class KVCache {
  k: tf.Tensor4D;
  v: tf.Tensor4D;

  constructor(maxBatchSize: number, nKvHeads: number, headDim: number) {
    this.k = tf.zeros([maxBatchSize, 0, nKvHeads, headDim]);
    this.v = tf.zeros([maxBatchSize, 0, nKvHeads, headDim]);
  }

  /**
   * cache[b, slots[i]] = x[b, i] for the first B rows (the reference's scatter_ on dim 1), after
   * making room: the buffers grow to the slots the book has seen, doubling, up to W.
   */
  write(book: SlotBook, slots: readonly number[], xk: tf.Tensor4D, xv: tf.Tensor4D): void {
    const have = this.k.shape[1];
    if (book.size > have) {
      const grown = Math.min(book.window, Math.max(book.size, 2 * have));
      const padding: [number, number][] = [[0, 0], [0, grown - have], [0, 0], [0, 0]];
      this.k = replace(this.k, tf.pad(this.k, padding));
      this.v = replace(this.v, tf.pad(this.v, padding));
    }
    const bsz = xk.shape[0];
    const pairs = tf.tidy(() => tf.tensor3d(Array.from({ length: bsz }, (_, b) => slots.flatMap((s) => [b, s])).flat(), [bsz, slots.length, 2], 'int32'));
    const k = tf.tensorScatterUpdate(this.k, pairs, xk);
    const v = tf.tensorScatterUpdate(this.v, pairs, xv);
    pairs.dispose();
    this.k = replace(this.k, k);
    this.v = replace(this.v, v);
  }

  /**
   * The keys and values of the `count` positions from `from` on, for the first `bsz` rows: [bsz,
   * count, K, d] each, in position order (one slice, or two when they wrap past the last slot).
   * With `anyOrder` (a decode step: no mask, so the order of the keys does not matter), a full
   * buffer or a run from slot 0 is one slice in slot order.
   */
  read(bsz: number, book: SlotBook, from: number, count: number, anyOrder = false): [tf.Tensor4D, tf.Tensor4D] {
    const size = this.k.shape[1];
    const first = anyOrder && count === size ? 0 : book.slot(from);
    const take = (cache: tf.Tensor4D): tf.Tensor4D =>
      tf.tidy(() => {
        if (first + count <= size) return tf.slice(cache, [0, first], [bsz, count]);
        const head = tf.slice(cache, [0, first], [bsz, size - first]);
        return tf.concat([head, tf.slice(cache, [0, 0], [bsz, count - (size - first)])], 1);
      });
    return [take(this.k), take(this.v)];
  }

  dispose(): void {
    this.k.dispose();
    this.v.dispose();
  }
}

/** What a forward tells each layer about the cache: earlier positions to attend to, slots to write. */
export interface CacheStep {
  /** How many positions right before this forward's first the cache holds and its tokens attend to (<= W-1). */
  readonly earlier: number;
  /** The slots the last min(T, W) positions go to. */
  readonly slots: number[];
  readonly book: SlotBook;
}
