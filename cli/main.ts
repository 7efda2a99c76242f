/**
 * The command line of `npx ts-node one_file_ref.ts ...`.
 *
 *   one_file_ref.ts MODEL [--max-tokens N]                           the reference's demo
 *   one_file_ref.ts MODEL --prompt TEXT [--prompt TEXT ...] [--json]  the reference's generate()
 *   one_file_ref.ts logits MODEL --tokens 1,2,3 [...] --out FILE.npy  raw logits for parity checks
 *
 * Errors are one line on stderr and exit code 1; `--verbose` adds the stack trace.
 */
import * as fs from 'fs';
import * as path from 'path';
import { parseArgs } from 'util';
import * as tf from '@tensorflow/tfjs-core';
import { demo, generate, Tokenizer, Transformer } from '../one_file_ref';
import { initBackend, BACKENDS } from '../runtime/backend';
import { writeNpy } from '../checkpoint/npy';

export class UsageError extends Error {
  override name = 'UsageError';
}

export const HELP = `Mistral 7B v0.1, a TypeScript port of mistral-src's one_file_ref.py

Usage:
  npx ts-node one_file_ref.ts MODEL [--max-tokens N]
      The reference's demo: its three prompts, greedy, N steps (default 35).
  npx ts-node one_file_ref.ts MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N] [--json]
      The reference's generate() on your prompts (batched its way: prefill on the shortest
      prompt, longer prompts teacher-forced, N steps per row counting the forced ones).
      --json prints {"texts", "logprobs", "generated_ids"}.
  npx ts-node one_file_ref.ts logits MODEL --tokens ID,ID,... [--tokens ...] --out FILE.npy
                                     [--start-pos P] [--prefill N]
      Writes float32 logits [B, T, V] as a NumPy .npy file. Rows must have equal length.
      --start-pos P   position of the first token (default 0)
      --prefill N     the first N tokens in one forward, the rest one token per forward
                      through the rolling cache (default: all T in one forward)

MODEL is a folder with params.json, consolidated.00.pth and tokenizer.model.

Options for every command:
  --backend NAME  one of ${BACKENDS.join(', ')} (default: the first that loads, in that
                  order; also MISTRAL_BACKEND=NAME)
  --verbose       print stack traces with errors
  --help          this text
`;

function parseIntFlag(name: string, value: string | undefined, fallback: number, min = 0): number {
  if (value === undefined) return fallback;
  if (!/^\d+$/.test(value.trim()) || Number(value) < min) {
    throw new UsageError(`--${name} must be an integer >= ${min}, got "${value}"`);
  }
  return Number(value);
}

function checkModelFolder(model: string | undefined): string {
  if (model === undefined) throw new UsageError('missing MODEL (a model folder); see --help');
  if (!fs.existsSync(model)) throw new UsageError(`${model}: no such file or folder`);
  if (!fs.statSync(model).isDirectory()) {
    throw new UsageError(`${model}: expected a model folder (params.json, consolidated.00.pth, tokenizer.model)`);
  }
  for (const file of ['params.json', 'consolidated.00.pth', 'tokenizer.model']) {
    const filePath = path.join(model, file);
    if (!fs.existsSync(filePath)) throw new UsageError(`${filePath}: missing from the model folder`);
    if (!fs.statSync(filePath).isFile()) {
      throw new UsageError(`${filePath}: expected a file, found ${fs.statSync(filePath).isDirectory() ? 'a folder' : 'something else'}`);
    }
  }
  return model;
}

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

async function runLogits(model: string, values: Record<string, unknown>): Promise<void> {
  const tokens = parseTokens((values.tokens as string[] | undefined) ?? []);
  const out = values.out as string | undefined;
  if (out === undefined) throw new UsageError('logits needs --out FILE.npy');
  checkOutFile(out);
  const bsz = tokens.length;
  const seqlen = tokens[0].length;
  const startPos = parseIntFlag('start-pos', values['start-pos'] as string | undefined, 0);
  const prefill = parseIntFlag('prefill', values.prefill as string | undefined, seqlen, 1);
  if (prefill > seqlen) throw new UsageError(`--prefill ${prefill} exceeds the ${seqlen} tokens given`);
  if (prefill < seqlen && startPos !== 0) {
    throw new UsageError('--prefill below the token count needs --start-pos 0: decode steps read the cache from position 0');
  }

  const transformer = await Transformer.fromFolder(model, { maxBatchSize: bsz });
  try {
    const vocab = transformer.args.vocabSize;
    const bad = tokens.flat().find((id) => id >= vocab);
    if (bad !== undefined) throw new UsageError(`--tokens: id ${bad} is outside the vocabulary [0, ${vocab})`);
    const maxPositions = transformer.freqsCis.cos.shape[0]; // the rotary table's length
    if (startPos + seqlen > maxPositions) {
      throw new UsageError(
        `--start-pos ${startPos} with ${seqlen} tokens runs past position ${maxPositions - 1}, the last the model has rotary angles for`,
      );
    }
    const logits = new Float32Array(bsz * seqlen * vocab);
    // Runs tokens [from, to) in one forward and copies their logits into place.
    const run = (from: number, to: number): void => {
      const chunk = tf.tidy(() => {
        const ids = tf.tensor2d(tokens.map((r) => r.slice(from, to)), [bsz, to - from], 'int32');
        const positions = tf.range(startPos + from, startPos + to, 1, 'int32') as tf.Tensor1D;
        return transformer.forward(ids, positions).dataSync() as Float32Array;
      });
      for (let b = 0; b < bsz; b++) {
        const width = (to - from) * vocab;
        logits.set(chunk.subarray(b * width, (b + 1) * width), (b * seqlen + from) * vocab);
      }
    };
    run(0, prefill);
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

async function runGenerate(model: string, prompts: string[], maxTokens: number, json: boolean): Promise<void> {
  const tokenizer = await Tokenizer.load(path.join(model, 'tokenizer.model'));
  const transformer = await Transformer.fromFolder(model, { maxBatchSize: prompts.length });
  try {
    // generate() prefills the shortest prompt, then takes maxTokens steps of one position each.
    const shortest = Math.min(...prompts.map((p) => tokenizer.encode(p).length));
    const maxPositions = transformer.freqsCis.cos.shape[0]; // the rotary table's length
    if (shortest + maxTokens > maxPositions) {
      throw new UsageError(
        `--max-tokens ${maxTokens} after a ${shortest}-token prompt runs past position ${maxPositions - 1}, the last the model has rotary angles for`,
      );
    }
    const { texts, logprobs, generatedIds } = await generate(prompts, transformer, tokenizer, maxTokens);
    if (json) {
      process.stdout.write(JSON.stringify({ texts, logprobs, generated_ids: generatedIds }) + '\n');
    } else {
      for (const x of texts) {
        console.log(x);
        console.log('=====================');
      }
    }
  } finally {
    transformer.dispose();
  }
}

const OPTIONS = {
  'max-tokens': { type: 'string' },
  prompt: { type: 'string', multiple: true },
  json: { type: 'boolean' },
  tokens: { type: 'string', multiple: true },
  'start-pos': { type: 'string' },
  prefill: { type: 'string' },
  out: { type: 'string' },
  backend: { type: 'string' },
  verbose: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

/**
 * util.parseArgs refuses a value that starts with "-" after a flag that takes one ("argument is
 * ambiguous"). A value such as "-1", "-1,2" or "- item" cannot be a flag, so it is attached as
 * --flag=VALUE: `--max-tokens -1` then gets the flag's own "must be an integer >= 0" error.
 */
function attachDashValues(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') return [...out, ...argv.slice(i)];
    const name = arg.startsWith('--') ? arg.slice(2) : '';
    const next = argv[i + 1];
    const takesValue = name in OPTIONS && OPTIONS[name as keyof typeof OPTIONS].type === 'string';
    if (takesValue && next !== undefined && /^-([^-a-zA-Z]|$)/.test(next)) {
      out.push(`${arg}=${next}`);
      i++;
    } else {
      out.push(arg);
    }
  }
  return out;
}

/** util.parseArgs's errors (several lines, written for programmers) as one line naming the flag. */
function explainParseError(e: Error & { code?: string }): string {
  const flag = /Option '(-[^' ]+)/.exec(e.message)?.[1] ?? /Unknown option '([^']+)'/.exec(e.message)?.[1];
  if (e.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' && flag !== undefined) return `unknown flag ${flag}; see --help`;
  if (e.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE' && flag !== undefined) {
    if (/does not take an argument/.test(e.message)) return `${flag} takes no value; see --help`;
    return `${flag} needs a value (one that starts with "-" is written ${flag}=VALUE); see --help`;
  }
  return `${e.message.split('\n')[0]}; see --help`;
}

export async function run(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: attachDashValues(argv),
    allowPositionals: true,
    strict: true,
    options: OPTIONS,
  });
  if (values.help) {
    process.stdout.write(HELP);
    return;
  }
  const [first, ...rest] = positionals;
  const command = first === 'logits' ? 'logits' : 'demo';
  const modelArg = command === 'logits' ? rest[0] : first;
  const extra = command === 'logits' ? rest.slice(1) : rest;
  if (extra.length > 0) throw new UsageError(`unexpected argument "${extra[0]}"; see --help`);
  const model = checkModelFolder(modelArg);
  if (command === 'demo') {
    for (const flag of ['tokens', 'start-pos', 'prefill', 'out'] as const) {
      if (values[flag] !== undefined) throw new UsageError(`--${flag} belongs to the logits command`);
    }
  } else {
    for (const flag of ['prompt', 'json', 'max-tokens'] as const) {
      if (values[flag] !== undefined) throw new UsageError(`--${flag} does not apply to the logits command`);
    }
  }

  const maxTokens = parseIntFlag('max-tokens', values['max-tokens'], 35);
  await initBackend(values.backend);
  if (command === 'logits') return runLogits(model, values);

  if (values.prompt !== undefined) return runGenerate(model, values.prompt, maxTokens, values.json === true);
  if (values.json) throw new UsageError('--json needs at least one --prompt');
  return demo(model, maxTokens);
}

/** Runs the command line and exits: 0 on success, 1 with a one-line error otherwise. */
export function main(argv: string[]): void {
  const verbose = argv.includes('--verbose');
  run(argv).then(
    () => process.exit(0),
    (err: unknown) => {
      const e: Error & { code?: string } = err instanceof Error ? err : new Error(String(err));
      const message = e.code?.startsWith('ERR_PARSE_ARGS') ? explainParseError(e) : e.message;
      process.stderr.write(`error: ${message.split('\n')[0]}\n`);
      if (verbose && e.stack) process.stderr.write(`${e.stack}\n`);
      process.exit(1);
    },
  );
}
