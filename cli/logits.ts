/**
 * `logits MODEL --tokens ID,ID,... [--tokens ...] --out FILE.npy [--start-pos P] [--prefill N]`:
 * float32 logits [B, T, V] as a NumPy .npy file, for parity checks against any Python dump.
 */
import * as fs from 'fs';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { writeNpy } from '../checkpoint/npy';
import { MAX_POSITIONS, prefillChunkLength, readBack } from '../one_file_ref';
import { modelPath, parseCommandLine, parseIntFlag, UsageError } from './args';
import { loadForCommand } from './load';

export const LOGITS_HELP = `  npx ts-node one_file_ref.ts logits MODEL --tokens ID,ID,... [--tokens ...] --out FILE.npy
                                     [--start-pos P] [--prefill N] [--chunk-size C]
      Writes float32 logits [B, T, V] as a NumPy .npy file. Rows must have equal length.
      --start-pos P   position of the first token, a fresh sequence placed there (default 0)
      --prefill N     the first N tokens prefilled, the rest one token per forward through
                      the rolling cache (default: all T prefilled)
      --chunk-size C  prefill in forwards of at most C tokens (default: the longest whose
                      attention scores fit 256 MiB; the logits are the same)
`;

const OPTIONS = {
  tokens: { type: 'string', multiple: true },
  'start-pos': { type: 'string' },
  prefill: { type: 'string' },
  'chunk-size': { type: 'string' },
  out: { type: 'string' },
} as const;

function parseTokens(rows: string[]): number[][] {
  if (rows.length === 0) throw new UsageError('logits needs at least one --tokens ID,ID,...');
  const parsed = rows.map((row, i) => {
    const ids = row.split(',').map((s) => s.trim());
    if (ids.some((s) => !/^\d+$/.test(s))) {
      throw new UsageError(`--tokens #${i + 1}: expected comma-separated token ids, got "${row}"`);
    }
    return ids.map(Number);
  });
  const ragged = parsed.findIndex((r) => r.length !== parsed[0].length);
  if (ragged >= 0) {
    throw new UsageError(
      `--tokens #${ragged + 1} has ${parsed[ragged].length} ids but #1 has ${parsed[0].length}: every row must have the same number of tokens`,
    );
  }
  return parsed;
}

/** Fails before any work when `out` cannot be a new file: its folder must exist and it must not be a folder. */
function checkOutFile(out: string): void {
  const dir = path.dirname(path.resolve(out));
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    throw new UsageError(`--out ${out}: folder ${dir} does not exist`);
  }
  if (fs.existsSync(out) && fs.statSync(out).isDirectory()) {
    throw new UsageError(`--out ${out}: is a folder, expected a file path such as logits.npy`);
  }
}

export async function logitsCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  const model = modelPath(positionals);
  const tokens = parseTokens(values.tokens ?? []);
  const out = values.out;
  if (out === undefined) throw new UsageError('logits needs --out FILE.npy');
  checkOutFile(out);
  const bsz = tokens.length;
  const seqlen = tokens[0].length;
  const startPos = parseIntFlag('start-pos', values['start-pos'], 0);
  const prefill = parseIntFlag('prefill', values.prefill, seqlen, 1);
  if (prefill > seqlen) throw new UsageError(`--prefill ${prefill} exceeds the ${seqlen} tokens given`);
  const chunkFlag = values['chunk-size'] === undefined ? undefined : parseIntFlag('chunk-size', values['chunk-size'], 1, 1);
  if (startPos + seqlen > MAX_POSITIONS) {
    throw new UsageError(
      `--start-pos ${startPos} with ${seqlen} tokens runs past position ${MAX_POSITIONS - 1}, the last the model has rotary angles for`,
    );
  }

  const { transformer } = await loadForCommand(model, values, bsz);
  try {
    const vocab = transformer.args.vocabSize;
    const bad = tokens.flat().find((id) => id >= vocab);
    if (bad !== undefined) throw new UsageError(`--tokens: id ${bad} is outside the vocabulary [0, ${vocab})`);
    const logits = new Float32Array(bsz * seqlen * vocab);
    // Runs tokens [from, to) in one forward and copies their logits into place. The logits are
    // read back after tf.tidy returns: an array handed out of tidy is walked element by element.
    const run = (from: number, to: number): void => {
      const chunk = readBack(() => {
        const ids = tf.tensor2d(tokens.map((r) => r.slice(from, to)), [bsz, to - from], 'int32');
        const positions = tf.range(startPos + from, startPos + to, 1, 'int32') as tf.Tensor1D;
        return transformer.forward(ids, positions);
      });
      for (let b = 0; b < bsz; b++) {
        const width = (to - from) * vocab;
        logits.set(chunk.subarray(b * width, (b + 1) * width), (b * seqlen + from) * vocab);
      }
    };
    const chunkSize = chunkFlag ?? prefillChunkLength(transformer.args, bsz);
    for (let from = 0; from < prefill; from += chunkSize) run(from, Math.min(prefill, from + chunkSize));
    for (let t = prefill; t < seqlen; t++) run(t, t + 1);
    try {
      writeNpy(out, logits, [bsz, seqlen, vocab]);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw code === undefined ? err : new UsageError(`--out ${out}: cannot write the file (${code})`);
    }
  } finally {
    transformer.dispose();
  }
}
