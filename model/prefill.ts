/**
 * How long a prefill chunk may be. A forward of T tokens that continues a sequence builds scores
 * of [bsz, nHeads, T, earlier + T] float32 (earlier <= W-1 cached positions), and as many again
 * for the mask's sum and the softmax: quadratic in T. one_file_ref.py prefills the whole prompt in
 * one forward; on wasm (4 GiB in all) a prompt of ~6,000 tokens already runs out of memory that
 * way. Prefilling in chunks through the rolling cache gives the same logits (a chunk attends to the
 * W-1 positions before it, as the sliding-window mask of the whole forward does), so every prefill
 * of the port (the reference's generate(), the logits command, generation/ and the server) is cut
 * into chunks of at most prefillChunkLength() tokens.
 */
import { MAX_POSITIONS } from './params';

/** The most bytes one forward's attention scores may take: 256 MiB. */
export const PREFILL_SCORES_BUDGET_BYTES = 256 * 1024 ** 2;

/** The hyperparameters the chunk length depends on (ModelArgs has them). */
export interface ScoresShape {
  readonly nHeads: number;
  readonly slidingWindow: number;
}

/** Bytes of float32 scores [bsz, nHeads, chunk, earlier + chunk] for a chunk after `earlier` cached positions. */
export function scoresBytes(args: ScoresShape, bsz: number, chunk: number, earlier = Math.min(args.slidingWindow - 1, MAX_POSITIONS)): number {
  return 4 * bsz * args.nHeads * chunk * (earlier + chunk);
}

/**
 * The longest prefill chunk whose scores fit `budgetBytes` for `bsz` rows, counting the W-1
 * earlier positions a continuing chunk attends to; at least 1, at most MAX_POSITIONS. Mistral 7B
 * (32 heads, W = 4096), batch 1: 460 tokens; 8 heads and W = 4096: 1,499; storyteller (8 heads, W = 64): 2,864.
 */
export function prefillChunkLength(args: ScoresShape, bsz: number, budgetBytes = PREFILL_SCORES_BUDGET_BYTES): number {
  const earlier = Math.min(args.slidingWindow - 1, MAX_POSITIONS);
  // chunk^2 + earlier * chunk <= budget / (4 * bsz * nHeads)
  const room = budgetBytes / (4 * Math.max(1, bsz) * args.nHeads);
  let chunk = Math.floor((-earlier + Math.sqrt(earlier * earlier + 4 * room)) / 2);
  while (chunk > 1 && scoresBytes(args, bsz, chunk, earlier) > budgetBytes) chunk--;
  while (scoresBytes(args, bsz, chunk + 1, earlier) <= budgetBytes) chunk++;
  return Math.min(MAX_POSITIONS, Math.max(1, chunk));
}

/** [from, to) ranges of at most `chunk` tokens covering 0..length-1. */
export function chunkRanges(length: number, chunk: number): [number, number][] {
  const ranges: [number, number][] = [];
  for (let from = 0; from < length; from += chunk) ranges.push([from, Math.min(length, from + chunk)]);
  return ranges;
}
