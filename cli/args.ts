/**
 * Command-line parsing shared by the commands: util.parseArgs with one-line errors that name the
 * flag, integer flags, the model path, and the options every command takes.
 */
import * as fs from 'fs';
import { parseArgs } from 'util';
import { BACKENDS } from '../runtime/backend';

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
  --threads N     the compute pool's threads (default: the machine's cores)
  --quiet         no progress bar or timings on stderr
  --verbose       print stack traces with errors
  --help          this text

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
    const name = arg.startsWith('--') ? arg.slice(2) : '';
    const next = argv[i + 1];
    const takesValue = name in options && options[name].type === 'string';
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

/** Parses `argv` against `options` (plus the common ones); bad flags become a UsageError. */
export function parseCommandLine<O extends OptionSpec>(argv: string[], options: O) {
  const all = { ...COMMON_OPTIONS, ...options };
  try {
    return parseArgs({ args: attachDashValues(argv, all), allowPositionals: true, strict: true, options: all });
  } catch (err) {
    const e = err as Error & { code?: string };
    if (e.code?.startsWith('ERR_PARSE_ARGS')) throw new UsageError(explainParseError(e));
    throw err;
  }
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
