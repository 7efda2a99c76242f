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
    if (!fs.existsSync(path.join(model, file))) throw new UsageError(`${path.join(model, file)}: missing from the model folder`);
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
  if (parsed.some((r) => r.length !== parsed[0].length)) {
    throw new UsageError('every --tokens row must have the same number of tokens');
  }
  return parsed;
}

async function runLogits(model: string, values: Record<string, unknown>): Promise<void> {
  const tokens = parseTokens((values.tokens as string[] | undefined) ?? []);
  const out = values.out as string | undefined;
  if (out === undefined) throw new UsageError('logits needs --out FILE.npy');
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
    writeNpy(out, logits, [bsz, seqlen, vocab]);
  } finally {
    transformer.dispose();
  }
}

async function runGenerate(model: string, prompts: string[], maxTokens: number, json: boolean): Promise<void> {
  const tokenizer = await Tokenizer.load(path.join(model, 'tokenizer.model'));
  const transformer = await Transformer.fromFolder(model, { maxBatchSize: prompts.length });
  try {
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

export async function run(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
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
    },
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

  await initBackend(values.backend);
  if (command === 'logits') return runLogits(model, values);

  const maxTokens = parseIntFlag('max-tokens', values['max-tokens'], 35);
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
      const e = err instanceof Error ? err : new Error(String(err));
      const message = (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS') ? `${e.message}; see --help` : e.message;
      process.stderr.write(`error: ${message.split('\n')[0]}\n`);
      if (verbose && e.stack) process.stderr.write(`${e.stack}\n`);
      process.exit(1);
    },
  );
}
