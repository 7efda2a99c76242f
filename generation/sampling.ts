/**
 * Choosing the next token from a row of logits: greedy (temperature 0) or sampled with
 * temperature, top-k and top-p, from a seeded pseudo-random generator so that a run repeats.
 *
 * Sampling follows mistral-src's main.py: probs = softmax(logits / temperature), then
 * sample_top_p: sort descending, drop every token whose probability mass before it already
 * exceeds p, renormalise, draw. Top-k (not in main.py; as Hugging Face and llama.cpp order it)
 * keeps the k most likely tokens before top-p. Everything runs on the host in float64: a row of
 * 32000 logits is cheap next to a forward of the model.
 */

export interface SamplingOptions {
  /** 0 is greedy (argmax); larger flattens the distribution. main.py's default: 0.7. */
  temperature: number;
  /** Nucleus sampling: keep the most likely tokens whose mass before them is at most p, in (0, 1]. main.py's default: 0.8. */
  topP: number;
  /** Keep only the k most likely tokens (0 or undefined: all). */
  topK?: number;
  /** Seed of the generator (an integer in [0, 2^32)); the same seed on the same backend gives the same tokens. */
  seed?: number;
}

/** main.py's defaults. */
export const DEFAULT_SAMPLING: Readonly<SamplingOptions> = { temperature: 0.7, topP: 0.8 };

export class SamplingError extends RangeError {
  override name = 'SamplingError';
}

/**
 * mulberry32 (Tommy Ettinger, 2017, public domain): a 32-bit state advanced by a Weyl sequence
 * (+0x6D2B79F5) and mixed by two multiply-xorshift rounds. Small, fast, passes gjrand and
 * PractRand to 2^32 outputs, plenty to draw tokens. Returns floats in [0, 1), 32 bits each.
 */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
}

/** A seed for runs that do not name one. */
export function randomSeed(): number {
  return Math.floor(Math.random() * 4294967296);
}

/** Checks sampling options; throws a SamplingError naming the bad field. */
export function checkSamplingOptions(opts: Partial<SamplingOptions>): void {
  const { temperature, topP, topK, seed } = opts;
  if (temperature !== undefined && !(Number.isFinite(temperature) && temperature >= 0)) {
    throw new SamplingError(`temperature must be a number >= 0, got ${temperature}`);
  }
  if (topP !== undefined && !(Number.isFinite(topP) && topP > 0 && topP <= 1)) {
    throw new SamplingError(`topP must be in (0, 1], got ${topP}`);
  }
  if (topK !== undefined && !(Number.isInteger(topK) && topK >= 0)) {
    throw new SamplingError(`topK must be an integer >= 0 (0: off), got ${topK}`);
  }
  if (seed !== undefined && !(Number.isInteger(seed) && seed >= 0 && seed < 2 ** 32)) {
    throw new SamplingError(`seed must be an integer in [0, 2^32), got ${seed}`);
  }
}

/** The index of the largest value, the first one on ties (as torch.argmax on the CPU). */
export function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** log softmax(row)[id], in float64: the logprob main.py records for a token. */
export function logprobOf(row: ArrayLike<number>, id: number): number {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i] > max) max = row[i];
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i] - max);
  return row[id] - max - Math.log(sum);
}

/** The distribution a token is drawn from: candidate ids, most likely first, and their probabilities (summing to 1). */
export interface Candidates {
  ids: number[];
  probs: number[];
}

/**
 * softmax(logits / temperature), cut to the top k, then to the top-p nucleus, renormalised.
 * temperature must be > 0. Ties are ordered by id, so the result does not depend on the sort.
 * Tokens of probability 0 (underflow) are never candidates.
 */
export function candidates(logits: ArrayLike<number>, opts: Omit<SamplingOptions, 'seed'>): Candidates {
  const { temperature, topP } = opts;
  const topK = opts.topK ?? 0;
  if (!(temperature > 0)) throw new SamplingError(`candidates: temperature must be > 0, got ${temperature}`);
  const V = logits.length;

  // softmax(logits / temperature) over the whole vocabulary, unnormalised: weights / total
  let max = -Infinity;
  for (let i = 0; i < V; i++) if (logits[i] > max) max = logits[i];
  const weights = new Float64Array(V);
  let total = 0;
  for (let i = 0; i < V; i++) total += weights[i] = Math.exp((logits[i] - max) / temperature);

  // Only tokens of probability >= (1 - p) / V can be in the nucleus: all the others together hold
  // less than 1 - p and come after every one of them, so the mass before each is > p. Sorting
  // just these is exact and keeps a step cheap (32000 logits, a few hundred candidates).
  const threshold = ((1 - topP) / V) * total;
  let pool: number[] = [];
  for (let i = 0; i < V; i++) if (weights[i] > 0 && weights[i] >= threshold) pool.push(i);
  if (topK > 0 && pool.length < topK) pool = Array.from({ length: V }, (_, i) => i).filter((i) => weights[i] > 0);
  pool.sort((a, b) => logits[b] - logits[a] || a - b);

  // Top-k first (as Hugging Face and llama.cpp order it), renormalised over the k.
  let norm = total;
  if (topK > 0 && topK < pool.length) {
    pool = pool.slice(0, topK);
    norm = pool.reduce((sum, id) => sum + weights[id], 0);
  }

  // main.py's sample_top_p: drop a token when the mass of those before it exceeds p. (p = 1
  // keeps them all: a cumulative sum that rounds above 1 does not drop the tail.)
  let n = topP >= 1 ? pool.length : 0;
  let before = 0;
  while (n < pool.length && before <= topP) before += weights[pool[n++]] / norm;
  const ids = pool.slice(0, n);
  const mass = ids.reduce((sum, id) => sum + weights[id], 0);
  return { ids, probs: ids.map((id) => weights[id] / mass) };
}

/** Draws from `c` with u in [0, 1): the first candidate whose cumulative probability exceeds u. */
export function draw(c: Candidates, u: number): number {
  let cumulative = 0;
  for (let i = 0; i < c.ids.length; i++) {
    cumulative += c.probs[i];
    if (u < cumulative) return c.ids[i];
  }
  return c.ids[c.ids.length - 1]; // u within rounding of 1
}

/** Picks tokens for one sequence: greedy at temperature 0, else sampled from its own seeded generator. */
export class Sampler {
  private readonly random: () => number;
  readonly seed: number;

  constructor(private readonly opts: SamplingOptions) {
    checkSamplingOptions(opts);
    this.seed = opts.seed ?? randomSeed();
    this.random = mulberry32(this.seed);
  }

  /** The next token for a row of logits (the raw ones, before any temperature). */
  sample(logits: ArrayLike<number>): number {
    if (this.opts.temperature === 0) return argmax(logits);
    return draw(candidates(logits, this.opts), this.random());
  }
}
