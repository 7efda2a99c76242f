/**
 * Command-line parsing shared by the commands: util.parseArgs with one-line errors that name the
 * flag, integer flags, the model path, and the options every command takes.
 */
import * as fs from 'fs';
import { parseArgs } from 'util';
import { BACKENDS } from '../runtime/backend';
import { readPromptFile } from './prompt_file';

/** A bad command line; main() prints its one-line message and exits 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

export type OptionSpec = Record<string, { type: 'string' | 'boolean'; multiple?: boolean; short?: string }>;

/** Flags every model command takes. */
export const COMMON_OPTIONS = {
  backend: { type: 'string' },
  'low-memory': { type: 'boolean' },
  pool: { type: 'string' },
  threads: { type: 'string' },
  quantize: { type: 'string' },
  quiet: { type: 'boolean' },
  verbose: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

export const COMMON_HELP = `Options for every model command:
  --backend NAME  one of ${BACKENDS.join(', ')} (default: the first that loads, in that
                  order; also MISTRAL_BACKEND=NAME)
  --low-memory    keep the layers' weights on the host as stored (bf16) and widen each to
                  float32 only while it runs (default: on when float32 weights would not fit
                  the backend and the compute pool is off or cannot start)
  --pool MODE     on, off or auto: the layer and output matrices in the compute pool
                  (multi-threaded WebAssembly kernels over the weights as stored); auto
                  (default) when float32 weights would not fit the backend, not on native ones
  -t, --threads N the compute pool's threads (default: the machine's cores)
  --quantize q8_0 quantize the layer and output matrices to 8 bits while loading
                  (llama.cpp's Q8_0) and run them on the compute pool: about half the
                  memory and faster decoding, within about 1% in perplexity (README)
  --quiet         no progress bar or timings on stderr
  --verbose       print stack traces with errors
  -h, --help      this text
  --version       the version of this package

Every command that takes --prompt also takes -f, --file PATH: the whole file is one prompt
(UTF-8; one final line end dropped), in order among the --prompt flags; PATH "-" reads stdin.
Short forms: -p --prompt, -f --file, -n --max-tokens, -s --seed, -c --chunk-size, -h --help.

MODEL is the official folder (params.json, consolidated.00.pth, tokenizer.model), the official
.tar of it, a folder with consolidated.safetensors instead, or a Hugging Face Mistral folder
(config.json, model*.safetensors or pytorch_model*.bin, tokenizer.model).
`;

/**
 * util.parseArgs refuses a value that starts with "-" after a flag that takes one ("argument is
 * ambiguous"). A value such as "-1", "-1,2" or "- item" cannot be a flag, so it is attached as
 * --flag=VALUE: `--max-tokens -1` then gets the flag's own "must be an integer >= 0" error.
 */
function attachDashValues(argv: string[], options: OptionSpec): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') return [...out, ...argv.slice(i)];
    const short = /^-[a-zA-Z]$/.test(arg) ? Object.keys(options).find((k) => options[k].short === arg[1]) : undefined;
    const name = arg.startsWith('--') ? arg.slice(2) : (short ?? '');
    const next = argv[i + 1];
    const takesValue = name in options && options[name].type === 'string';
    if (takesValue && next !== undefined && /^-([^-a-zA-Z]|$)/.test(next)) {
      out.push(short !== undefined ? `${arg}${next}` : `${arg}=${next}`); // -n-1 is -n with "-1"
      i++;
    } else {
      out.push(arg);
    }
  }
  return out;
}

/** util.parseArgs's errors (several lines, written for programmers) as one line naming the flag. */
function explainParseError(e: Error & { code?: string }): string {
  const flag = /Option '(?:-\w, )?(-[^' ]+)/.exec(e.message)?.[1] ?? /Unknown option '([^']+)'/.exec(e.message)?.[1];
  if (e.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION' && flag !== undefined) return `unknown flag ${flag}; see --help`;
  if (e.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE' && flag !== undefined) {
    if (/does not take an argument/.test(e.message)) return `${flag} takes no value; see --help`;
    return `${flag} needs a value (one that starts with "-" is written ${flag}=VALUE); see --help`;
  }
  return `${e.message.split('\n')[0]}; see --help`;
}

/** The short forms llama.cpp users type first, given to a command's flags of these names. */
const SHORT_FLAGS: Record<string, string> = { prompt: 'p', file: 'f', 'max-tokens': 'n', seed: 's', 'chunk-size': 'c', threads: 't', help: 'h' };

/** The options with their short forms, and -f/--file wherever there is a --prompt. */
function withShortFlags(options: OptionSpec): OptionSpec {
  const all: OptionSpec = { ...options };
  if ('prompt' in all) all.file = { type: 'string', multiple: true };
  for (const [name, short] of Object.entries(SHORT_FLAGS)) {
    if (name in all && all[name].short === undefined) all[name] = { ...all[name], short };
  }
  return all;
}

/**
 * Parses `argv` against `options` (plus the common ones); bad flags become a UsageError. Where
 * the command takes --prompt, each -f/--file PATH is read and put among the prompts in the order
 * the flags were given.
 */
export function parseCommandLine<O extends OptionSpec>(argv: string[], options: O) {
  const all = { ...COMMON_OPTIONS, ...options };
  const spec = withShortFlags(all);
  let parsed;
  try {
    parsed = parseArgs({ args: attachDashValues(argv, spec), allowPositionals: true, strict: true, options: spec, tokens: true });
  } catch (err) {
    const e = err as Error & { code?: string };
    if (e.code?.startsWith('ERR_PARSE_ARGS')) throw new UsageError(explainParseError(e));
    throw err;
  }
  const values = parsed.values as Record<string, unknown>;
  // -f/--file is a prompt file only where the command takes --prompt (perplexity's --file is its text).
  if ('prompt' in all && values.file !== undefined) {
    const files = values.file as string[];
    if (files.filter((f) => f === '-').length > 1) throw new UsageError('--file - (stdin) can be given once');
    const prompts: string[] = [];
    for (const token of parsed.tokens) {
      if (token.kind !== 'option' || token.value === undefined) continue;
      if (token.name === 'prompt') prompts.push(token.value);
      if (token.name === 'file') prompts.push(readPromptFile(token.value, token.rawName === '-f' ? '-f' : '--file'));
    }
    values.prompt = prompts;
    delete values.file;
  }
  return { values: parsed.values as ReturnType<typeof parseArgs<{ options: typeof all; allowPositionals: true; strict: true }>>['values'], positionals: parsed.positionals };
}

export function parseIntFlag(name: string, value: string | undefined, fallback: number, min = 0): number {
  if (value === undefined) return fallback;
  if (!/^\d+$/.test(value.trim()) || Number(value) < min) {
    throw new UsageError(`--${name} must be an integer >= ${min}, got "${value}"`);
  }
  return Number(value);
}

/** The one MODEL positional; which layout it is, checkpoint/openModel decides. */
export function modelPath(positionals: string[]): string {
  const [model, extra] = positionals;
  if (model === undefined) throw new UsageError('missing MODEL (a model folder or .tar); see --help');
  if (extra !== undefined) throw new UsageError(`unexpected argument "${extra}"; see --help`);
  if (!fs.existsSync(model)) throw new UsageError(`${model}: no such file or folder`);
  return model;
}
