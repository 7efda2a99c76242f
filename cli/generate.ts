/**
 * The `generate` command: generation as people use it (generation/generate.ts), beside the
 * reference's greedy, batch-dependent generate() that the default command keeps for parity.
 *
 *   one_file_ref.ts generate MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N]
 *       [--temperature T] [--top-p P] [--top-k K] [--seed N] [--stop TEXT ...] [--chunk-size N]
 *       [--instruct] [--json]
 *
 * Prompts run one after another, each from position 0; the text streams to stdout as it comes.
 * Also home of what `interactive` shares with it: the sampling flags and loading a model with a
 * tokenizer that can stream.
 */
import { MAX_POSITIONS } from '../one_file_ref';
import { currentBackend } from '../runtime/backend';
import { formatBytes } from '../runtime/progress';
import { encodeInstruct } from '../tokenizer/instruct';
import { complete, type Completion, type GenerateOptions } from '../generation/generate';
import { DEFAULT_SAMPLING, randomSeed } from '../generation/sampling';
import { COMMON_HELP, modelPath, parseCommandLine, parseIntFlag, UsageError, type OptionSpec } from './args';
import { instructWarning } from './instruct_check';
import { loadForCommand } from './load';

/** The sampling and stopping flags of `generate` and `interactive`. */
export const SAMPLING_OPTIONS = {
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true },
  'chunk-size': { type: 'string' },
} as const satisfies OptionSpec;

export const SAMPLING_HELP = `      --temperature T  0 is greedy (argmax); higher is more random (default ${DEFAULT_SAMPLING.temperature}, main.py's)
      --top-p P        sample from the most likely tokens whose mass before them is at most P,
                       in (0, 1] (default ${DEFAULT_SAMPLING.topP}, main.py's)
      --top-k K        only the K most likely tokens, before top-p (default 0: off)
      --seed N         seed of the sampler, an integer in [0, 2^32): the same seed repeats a run on
                       the same backend (default: a random one, printed with the stats)
      --stop TEXT      stop when the text contains TEXT, cut before it (repeatable; default none)
      --chunk-size N   prefill the prompt N tokens a forward through the rolling cache
                       (main.py's chunk_size; default: the longest chunk whose attention
                       scores fit 256 MiB, at most 256 tokens)
`;

export const GENERATE_HELP = `  npx ts-node one_file_ref.ts generate MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N]
                      [--temperature T] [--top-p P] [--top-k K] [--seed N] [--stop TEXT ...]
                      [--chunk-size N] [--instruct] [--json]
      Generation as main.py does it, one prompt after another, each prefilled whole and
      stopped at EOS, N new tokens or a stop string; the text streams as it is generated.
      Stats on stderr at the end (backend, tokens/s, peak memory).
      --max-tokens N   new tokens per prompt at most (default 35); the prompt is not counted,
                       unlike the reference command's --max-tokens (see --help)
${SAMPLING_HELP}      --instruct       wrap each prompt as Mistral-7B-Instruct expects: <s>[INST] TEXT [/INST]
      --json           print {"completions": [{prompt, prompt_ids, generated_ids, text, logprobs,
                       finish_reason, seed, timings}]} instead of the text
`;

const OPTIONS = {
  ...SAMPLING_OPTIONS,
  prompt: { type: 'string', multiple: true },
  instruct: { type: 'boolean' },
  json: { type: 'boolean' },
} as const satisfies OptionSpec;

/** The sampling flags' values as parseCommandLine returns them. */
export interface SamplingFlags {
  'max-tokens'?: string;
  temperature?: string;
  'top-p'?: string;
  'top-k'?: string;
  seed?: string;
  stop?: string[];
  'chunk-size'?: string;
}

/** A number flag: `check` says whether the value is allowed and `expected` what is. */
function parseNumberFlag(name: string, value: string | undefined, fallback: number, check: (x: number) => boolean, expected: string): number {
  if (value === undefined) return fallback;
  const x = /^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$/.test(value) ? Number(value) : NaN;
  if (!check(x)) throw new UsageError(`--${name} must be ${expected}, got "${value}"`);
  return x;
}

/** The generation options from the flags, checked; `maxTokens` defaults to `defaultMaxTokens`. */
export function generateOptionsFromFlags(
  values: SamplingFlags,
  defaultMaxTokens: number,
): GenerateOptions & { seed: number } {
  const maxTokens = parseIntFlag('max-tokens', values['max-tokens'], defaultMaxTokens);
  if (maxTokens >= MAX_POSITIONS) throw new UsageError(`--max-tokens must be below ${MAX_POSITIONS}, the model's positions`);
  const temperature = parseNumberFlag('temperature', values.temperature, DEFAULT_SAMPLING.temperature, (x) => x >= 0 && Number.isFinite(x), 'a number >= 0');
  const topP = parseNumberFlag('top-p', values['top-p'], DEFAULT_SAMPLING.topP, (x) => x > 0 && x <= 1, 'a number in (0, 1]');
  const topK = parseIntFlag('top-k', values['top-k'], 0);
  const seed = parseIntFlag('seed', values.seed, randomSeed());
  if (seed >= 2 ** 32) throw new UsageError(`--seed must be an integer in [0, 2^32), got "${values.seed}"`);
  const chunkSize = values['chunk-size'] === undefined ? undefined : parseIntFlag('chunk-size', values['chunk-size'], 0, 1);
  const stop = values.stop ?? [];
  if (stop.some((s) => s === '')) throw new UsageError('--stop must not be empty');
  return { maxTokens, temperature, topP, topK, seed, stop, chunkSize };
}

/**
 * The model and its tokenizer as generation needs them: SentencePieceProcessor, which can stream
 * (one_file_ref's Tokenizer keeps it private). The same steps as one_file_ref's loadModel.
 */
/** Backend, prompt and generated tokens with their rates, peak memory and seed, on stderr. */
export function reportStats(completions: Completion[], sampled: boolean): void {
  const sum = (f: (c: Completion) => number): number => completions.reduce((a, c) => a + f(c), 0);
  const rate = (tokens: number, ms: number): string => (ms > 0 ? `${((1000 * tokens) / ms).toFixed(1)} tokens/s` : '-');
  const promptTokens = sum((c) => c.promptIds.length);
  const generated = sum((c) => c.generatedIds.length);
  const prefillMs = sum((c) => c.timings.prefillMs);
  const decodeMs = sum((c) => c.timings.decodeMs);
  const lines = [
    `backend: ${currentBackend() ?? 'unknown'}`,
    `prompt: ${promptTokens} tokens, prefill ${rate(promptTokens, prefillMs)} (${(prefillMs / 1000).toFixed(2)} s)`,
    `generated: ${generated} tokens, decode ${rate(generated, decodeMs)} (${(decodeMs / 1000).toFixed(2)} s)`,
    `peak memory: ${formatBytes(process.resourceUsage().maxRSS * 1024)} resident`,
  ];
  if (sampled && completions.length > 0) lines.push(`seed: ${completions[0].seed}`);
  process.stderr.write(lines.map((l) => `${l}\n`).join(''));
}

export async function generateCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  if (values.help) {
    process.stdout.write(`Usage:\n${GENERATE_HELP}\n${COMMON_HELP}`);
    return;
  }
  const model = modelPath(positionals);
  const opts = generateOptionsFromFlags(values, 35);
  const prompts = values.prompt;
  if (prompts === undefined) throw new UsageError('generate needs at least one --prompt TEXT');
  const warning = values.instruct && !values.quiet ? instructWarning(model) : undefined;
  if (warning !== undefined) process.stderr.write(`${warning}\n`);

  const loaded = await loadForCommand(model, values, 1);
  const [tokenizer, transformer] = [loaded.tokenizer.processor, loaded.transformer];
  try {
    const completions: Completion[] = [];
    for (const prompt of prompts) {
      const ids = values.instruct ? encodeInstruct(tokenizer, [{ role: 'user', content: prompt }]) : tokenizer.encode(prompt, true);
      if (!values.json && !values.instruct) process.stdout.write(prompt);
      const onText = values.json ? undefined : (text: string): void => void process.stdout.write(text);
      const completion = await complete(transformer, tokenizer, ids, { ...opts, onText });
      completions.push(completion);
      if (!values.json) process.stdout.write(prompts.length > 1 ? '\n=====================\n' : '\n');
    }
    if (values.json) {
      const out = completions.map((c, i) => ({
        prompt: prompts[i],
        prompt_ids: c.promptIds,
        generated_ids: c.generatedIds,
        text: c.text,
        logprobs: c.logprobs,
        finish_reason: c.finishReason,
        seed: c.seed,
        timings: { prefill_ms: c.timings.prefillMs, decode_ms: c.timings.decodeMs },
      }));
      process.stdout.write(JSON.stringify({ completions: out }) + '\n');
    }
    if (!values.quiet) reportStats(completions, opts.temperature !== 0);
  } finally {
    transformer.dispose();
  }
}
