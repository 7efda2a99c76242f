import { mulberry32 } from '../../generation/sampling';

/**
 * A deterministic generator, so a failure repeats: the sampler's own mulberry32 (checked against
 * the C original in test/generation.test.ts), floats in [0, 1).
 */
export function rng(seed: number): () => number {
  return mulberry32(seed);
}

/** A seeded random source (mulberry32): the same seed gives the same cases. */
export class Rng {
  private readonly source: () => number;

  constructor(seed: number) {
    this.source = mulberry32(seed);
  }

  /** Uniform in [0, 1). */
  next(): number {
    return this.source();
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
}
