/**
 * `perplexity MODEL --file TEXT [--ctx N] [--json] [--save-logits BASE.json] [--kl-divergence BASE.json]`,
 * computed as llama.cpp's perplexity tool does (examples/perplexity, perplexity()):
 *
 *  - the text is tokenized once, with BOS first;
 *  - it is cut into floor(n_tokens / N) windows of N tokens (the tail is dropped), each run as its
 *    own sequence from position 0, with its first token replaced by BOS;
 *  - each window is scored on its second half: the logits at positions first = N/2 .. N-2 predict
 *    the tokens after them, N - 1 - N/2 tokens per window;
 *  - over all scored tokens, with nll = -log p(token): PPL = exp(mean nll), and its standard error
 *    PPL * sqrt((mean nll^2 - mean nll^2) / (count - 1)), as llama.cpp prints "PPL = x +/- y".
 *
 * --save-logits writes the scored tokens' log-probabilities for a later --kl-divergence run: the
 * full distribution when the vocabulary is small (at most 4096 pieces, e.g. the storyteller's 1024)
 * and the total stays under 2^24 values; otherwise the top 32 log-probabilities of each token.
 * --kl-divergence then reports, against that base, the mean KL(base || this run) per token with its
 * standard error (with top-k bases: the top-k terms plus one term for the rest of the mass, which
 * by the log-sum inequality is a lower bound of the full KL), how often both runs put the same token
 * first, and the ratio of the perplexities.
 */
import * as fs from 'fs';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { MAX_POSITIONS } from '../one_file_ref';
import { COMMON_HELP, modelPath, parseCommandLine, parseIntFlag, UsageError } from './args';
import { loadForCommand } from './load';

export const PERPLEXITY_HELP = `  npx ts-node one_file_ref.ts perplexity MODEL --file TEXT [--ctx N] [--json]
                                     [--save-logits BASE.json] [--kl-divergence BASE.json]
      Perplexity of a text as llama.cpp computes it: windows of N tokens (default 512), each
      scored on its second half; the running value per window on stderr, the final one with its
      standard error and tokens/s on stdout (--json: one JSON object).
      --save-logits F     keep this run's log-probabilities in F (full for small vocabularies,
                          else the top 32 per token; one file holds about 1.4 M scored tokens)
      --kl-divergence F   compare with a run saved by --save-logits: mean KL divergence, top-1
                          agreement and the perplexity ratio
`;

const OPTIONS = {
  file: { type: 'string' },
  ctx: { type: 'string' },
  json: { type: 'boolean' },
  'save-logits': { type: 'string' },
  'kl-divergence': { type: 'string' },
} as const;

export const DEFAULT_CTX = 512;
/** Full distributions are saved only for vocabularies up to this size... */
export const FULL_VOCAB_LIMIT = 4096;
/** ...and while the saved values stay under this count; else the top TOP_K per token. */
export const FULL_VALUES_LIMIT = 1 << 24;
export const TOP_K = 32;
/**
 * The --save-logits file is one JSON text, and V8's strings end at 2^29 - 24 characters: the
 * base64 of the saved values must stay under this (with room for the rest), checked before any
 * window runs rather than failing at the end. MISTRAL_PERPLEXITY_SAVE_LIMIT lowers it (tests).
 */
export const SAVE_CHARS_LIMIT = 500_000_000;
const SAVE_FORMAT = 'mistral-ts-perplexity-logprobs';

/** The windows llama.cpp scores: floor(n / ctx) of ctx tokens, each with BOS first. */
export function perplexityWindows(tokens: readonly number[], ctx: number, bos: number): number[][] {
  const windows: number[][] = [];
  for (let start = 0; start + ctx <= tokens.length; start += ctx) {
    const w = tokens.slice(start, start + ctx);
    w[0] = bos;
    windows.push(w);
  }
  return windows;
}

/** The first position whose logits are scored: ctx/2, as llama.cpp's `first`. */
export const firstScored = (ctx: number): number => Math.floor(ctx / 2);

/** log-softmax of row `row` of `logits` ([rows, vocab]) in float64. */
function logSoftmaxRow(logits: Float32Array, row: number, vocab: number, out: Float64Array): void {
  const at = row * vocab;
  let max = -Infinity;
  for (let v = 0; v < vocab; v++) max = Math.max(max, logits[at + v]);
  let sum = 0;
  for (let v = 0; v < vocab; v++) sum += Math.exp(logits[at + v] - max);
  const logSum = Math.log(sum) + max;
  for (let v = 0; v < vocab; v++) out[v] = logits[at + v] - logSum;
}

/** What one run keeps of each scored token's distribution. */
interface SavedLogprobs {
  format: string;
  version: 1;
  model: string;
  text: string;
  ctx: number;
  vocab: number;
  /** The scored tokens (what each distribution should have predicted). */
  targets: number[];
  ppl: number;
  kind: 'full' | 'top-k';
  k: number;
  /** base64 of float32 log-probs: [targets, vocab] (full) or [targets, k] (top-k, descending). */
  logprobs: string;
  /** top-k only: base64 of int32 ids [targets, k]. */
  ids?: string;
}

interface KlStats {
  base: string;
  mean_kl: number;
  kl_stderr: number;
  max_kl: number;
  top1_agreement: number;
  ppl_base: number;
  ppl_ratio: number;
  base_kind: 'full' | 'top-k';
}

const b64 = (a: Float32Array | Int32Array): string => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');
function fromB64<T extends Float32Array | Int32Array>(s: string, Type: { new (b: ArrayBuffer): T }, count: number, file: string): T {
  const bytes = Buffer.from(s, 'base64');
  if (bytes.length !== count * 4) throw new UsageError(`${file}: expected ${count} saved values, found ${bytes.length / 4}`);
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return new Type(copy.buffer);
}

function readBase(file: string): SavedLogprobs {
  let data: unknown;
  try {
    data = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new UsageError(`--kl-divergence ${file}: ${code ? `cannot read (${code})` : `not JSON (${(err as Error).message.split('\n')[0]})`}`);
  }
  const d = data as Partial<SavedLogprobs>;
  const ok =
    typeof d === 'object' && d !== null && d.format === SAVE_FORMAT && d.version === 1 &&
    typeof d.ctx === 'number' && typeof d.vocab === 'number' && Array.isArray(d.targets) &&
    typeof d.ppl === 'number' && (d.kind === 'full' || d.kind === 'top-k') && typeof d.k === 'number' &&
    typeof d.logprobs === 'string' && (d.kind === 'full' || typeof d.ids === 'string');
  if (!ok) throw new UsageError(`--kl-divergence ${file}: not a file written by perplexity --save-logits`);
  return d as SavedLogprobs;
}

/** Accumulates the KL statistics token by token against a base. */
class KlAccumulator {
  private sum = 0;
  private sum2 = 0;
  private max = 0;
  private agree = 0;
  private n = 0;
  private readonly logprobs: Float32Array;
  private readonly ids: Int32Array | null;
  private readonly width: number;

  constructor(
    private readonly base: SavedLogprobs,
    private readonly file: string,
  ) {
    this.width = base.kind === 'full' ? base.vocab : base.k;
    const count = base.targets.length * this.width;
    this.logprobs = fromB64(base.logprobs, Float32Array, count, file);
    this.ids = base.kind === 'top-k' ? fromB64(base.ids!, Int32Array, count, file) : null;
  }

  add(index: number, logprobs: Float64Array): void {
    const w = this.width;
    const at = index * w;
    let kl = 0;
    let baseTop: number;
    if (this.ids === null) {
      baseTop = 0;
      for (let v = 0; v < w; v++) {
        const lb = this.logprobs[at + v];
        if (lb > this.logprobs[at + baseTop]) baseTop = v;
        if (lb > -Infinity) kl += Math.exp(lb) * (lb - logprobs[v]);
      }
    } else {
      baseTop = this.ids[at];
      let restBase = 1;
      let restNew = 1;
      for (let j = 0; j < w; j++) {
        const lb = this.logprobs[at + j];
        const id = this.ids[at + j];
        const pb = Math.exp(lb);
        kl += pb * (lb - logprobs[id]);
        restBase -= pb;
        restNew -= Math.exp(logprobs[id]);
      }
      restBase = Math.max(restBase, 1e-30);
      restNew = Math.max(restNew, 1e-30);
      kl += restBase * Math.log(restBase / restNew);
    }
    let top = 0;
    for (let v = 1; v < logprobs.length; v++) if (logprobs[v] > logprobs[top]) top = v;
    kl = Math.max(kl, 0);
    this.sum += kl;
    this.sum2 += kl * kl;
    this.max = Math.max(this.max, kl);
    if (top === baseTop) this.agree++;
    this.n++;
  }

  result(ppl: number): KlStats {
    const mean = this.sum / this.n;
    const variance = this.n > 1 ? (this.sum2 / this.n - mean * mean) * (this.n / (this.n - 1)) : 0;
    return {
      base: this.file,
      mean_kl: mean,
      kl_stderr: Math.sqrt(Math.max(variance, 0) / this.n),
      max_kl: this.max,
      top1_agreement: this.agree / this.n,
      ppl_base: this.base.ppl,
      ppl_ratio: ppl / this.base.ppl,
      base_kind: this.base.kind,
    };
  }
}

function checkOut(flag: string, file: string): void {
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new UsageError(`--${flag} ${file}: folder ${dir} does not exist`);
  if (fs.existsSync(file) && fs.statSync(file).isDirectory()) throw new UsageError(`--${flag} ${file}: is a folder, expected a file path`);
}

export async function perplexityCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  if (values.help) {
    process.stdout.write(`Usage:\n${PERPLEXITY_HELP}\n${COMMON_HELP}`); // it loads the model as every model command
    return;
  }
  const model = modelPath(positionals);
  const textFile = values.file;
  if (textFile === undefined) throw new UsageError('perplexity needs --file TEXT');
  let text: string;
  try {
    text = fs.readFileSync(textFile, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new UsageError(`--file ${textFile}: cannot read (${code === 'ENOENT' ? 'no such file' : code ?? String(err)})`);
  }
  const ctxFlag = parseIntFlag('ctx', values.ctx, DEFAULT_CTX, 4);
  const saveFile = values['save-logits'];
  if (saveFile !== undefined) checkOut('save-logits', saveFile);
  const base = values['kl-divergence'] !== undefined ? readBase(values['kl-divergence']) : null;
  const quiet = values.quiet || values.json;

  const { tokenizer, transformer } = await loadForCommand(model, values, 1);
  try {
    const tokens = tokenizer.encode(text, true);
    const ctx = Math.min(ctxFlag, MAX_POSITIONS);
    if (ctx < ctxFlag && !quiet) process.stderr.write(`note: --ctx ${ctxFlag} capped at ${ctx}, the model's positions\n`);
    const windows = perplexityWindows(tokens, ctx, tokenizer.bosId);
    if (windows.length === 0) {
      throw new UsageError(`--file ${textFile}: ${tokens.length} tokens, fewer than one window of --ctx ${ctx}; give a longer text or a smaller --ctx`);
    }
    const vocab = transformer.args.vocabSize;
    const first = firstScored(ctx);
    const perWindow = ctx - 1 - first;
    const scored = windows.length * perWindow;
    const targets: number[] = [];
    for (let i = 0; i < windows.length; i++) for (let j = first; j < ctx - 1; j++) targets.push(tokens[i * ctx + j + 1]);

    if (base !== null) {
      const name = values['kl-divergence'];
      if (base.ctx !== ctx || base.vocab !== vocab || base.targets.length !== scored || base.targets.some((t, i) => t !== targets[i])) {
        throw new UsageError(
          `--kl-divergence ${name}: saved for ctx ${base.ctx}, vocabulary ${base.vocab}, ${base.targets.length} scored tokens; this run has ctx ${ctx}, vocabulary ${vocab}, ${scored} (the same text, tokenizer and --ctx are needed)`,
        );
      }
    }
    // MISTRAL_PERPLEXITY_FULL_VOCAB lowers the vocabulary limit (the tests use it to save top-k on the tiny model).
    const fullVocabLimit = Math.min(FULL_VOCAB_LIMIT, Number(process.env.MISTRAL_PERPLEXITY_FULL_VOCAB ?? FULL_VOCAB_LIMIT));
    const full = vocab <= fullVocabLimit && scored * vocab <= FULL_VALUES_LIMIT;
    const saveWidth = full ? vocab : Math.min(TOP_K, vocab);
    if (saveFile !== undefined) {
      const chars = Math.ceil((scored * saveWidth * 4) / 3) * 4 * (full ? 1 : 2); // base64 of the values (and ids)
      const limit = Math.min(SAVE_CHARS_LIMIT, Number(process.env.MISTRAL_PERPLEXITY_SAVE_LIMIT ?? SAVE_CHARS_LIMIT));
      if (chars > limit) {
        throw new UsageError(
          `--save-logits ${saveFile}: ${scored} scored tokens x ${saveWidth} values would take ${chars} characters, ` +
          `more than the ${limit} one file holds; give a shorter --file (at most ${Math.floor(scored * (limit / chars))} scored tokens)`,
        );
      }
    }
    const saved = saveFile !== undefined ? new Float32Array(scored * saveWidth) : null;
    const savedIds = saveFile !== undefined && !full ? new Int32Array(scored * saveWidth) : null;
    const kl = base !== null ? new KlAccumulator(base, values['kl-divergence']!) : null;

    let nll = 0;
    let nll2 = 0;
    let count = 0;
    const running: number[] = [];
    const logprobs = new Float64Array(vocab);
    const started = Date.now();
    windows.forEach((window, i) => {
      const logits = tf.tidy(() => {
        const ids = tf.tensor2d([window], [1, ctx], 'int32');
        const positions = tf.range(0, ctx, 1, 'int32') as tf.Tensor1D;
        return transformer.forward(ids, positions).dataSync() as Float32Array;
      });
      for (let j = first; j < ctx - 1; j++) {
        logSoftmaxRow(logits, j, vocab, logprobs);
        const target = tokens[i * ctx + j + 1];
        const v = -logprobs[target];
        nll += v;
        nll2 += v * v;
        if (saved !== null) {
          if (savedIds === null) {
            for (let t = 0; t < vocab; t++) saved[count * vocab + t] = logprobs[t];
          } else {
            const order = topK(logprobs, saveWidth);
            order.forEach((id, r) => {
              saved[count * saveWidth + r] = logprobs[id];
              savedIds[count * saveWidth + r] = id;
            });
          }
        }
        kl?.add(count, logprobs);
        count++;
      }
      running.push(Math.exp(nll / count));
      if (!quiet) process.stderr.write(`[${i + 1}/${windows.length}] ${running[i].toFixed(4)}\n`);
    });
    const seconds = (Date.now() - started) / 1000;
    const mean = nll / count;
    const ppl = Math.exp(mean);
    const variance = nll2 / count - mean * mean;
    const stderr = variance > 0 ? ppl * Math.sqrt(variance / (count - 1)) : 0;
    const tokensPerSecond = (windows.length * ctx) / seconds;
    const klStats = kl?.result(ppl);

    if (saveFile !== undefined && saved !== null) {
      const out: SavedLogprobs = {
        format: SAVE_FORMAT,
        version: 1,
        model,
        text: textFile,
        ctx,
        vocab,
        targets,
        ppl,
        kind: full ? 'full' : 'top-k',
        k: saveWidth,
        logprobs: b64(saved),
        ...(savedIds !== null ? { ids: b64(savedIds) } : {}),
      };
      try {
        fs.writeFileSync(saveFile, JSON.stringify(out));
      } catch (err) {
        throw new UsageError(`--save-logits ${saveFile}: cannot write the file (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
      }
    }

    if (values.json) {
      const result = {
        model,
        file: textFile,
        ctx,
        text_tokens: tokens.length,
        windows: windows.length,
        scored_tokens: count,
        nll_mean: mean,
        ppl,
        ppl_stderr: stderr,
        per_window: running,
        seconds,
        tokens_per_second: tokensPerSecond,
        ...(klStats ? { kl_divergence: klStats } : {}),
      };
      process.stdout.write(`${JSON.stringify(result)}\n`);
      return;
    }
    process.stdout.write(`Final estimate: PPL = ${ppl.toFixed(4)} +/- ${stderr.toFixed(5)}\n`);
    process.stdout.write(
      `${count} tokens scored in ${windows.length} windows of ${ctx} (${tokens.length} text tokens); ${seconds.toFixed(1)} s, ${tokensPerSecond.toFixed(1)} tokens/s\n`,
    );
    if (klStats) {
      process.stdout.write(`Mean KL divergence vs ${klStats.base}: ${klStats.mean_kl.toFixed(6)} +/- ${klStats.kl_stderr.toFixed(6)} (max ${klStats.max_kl.toFixed(6)}${klStats.base_kind === 'top-k' ? `, top-${base!.k} base: a lower bound` : ''})\n`);
      process.stdout.write(`Top-1 agreement: ${(100 * klStats.top1_agreement).toFixed(2)}%\n`);
      process.stdout.write(`PPL ratio: ${klStats.ppl_ratio.toFixed(6)} (base ${klStats.ppl_base.toFixed(4)})\n`);
    }
  } finally {
    transformer.dispose();
  }
}

/** Indices of the k largest values, largest first. */
function topK(values: Float64Array, k: number): number[] {
  const idx: number[] = [];
  for (let v = 0; v < values.length; v++) {
    if (idx.length < k || values[v] > values[idx[idx.length - 1]]) {
      let at = Math.min(idx.length, k - 1);
      if (idx.length < k) idx.push(v);
      while (at > 0 && values[idx[at - 1]] < values[v]) {
        idx[at] = idx[at - 1];
        at--;
      }
      idx[at] = v;
    }
  }
  return idx;
}
