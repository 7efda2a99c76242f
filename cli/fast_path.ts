/**
 * `--help` and `--version` answered before the model file and tfjs load.
 *
 * one_file_ref.ts imports tfjs, the checkpoint readers and the tokenizer before its last lines hand
 * the command line to cli/main.ts, and ts-node transpiles each of those files first: about 3 s of
 * CPU for a help text. This module is preloaded by ts-node (tsconfig.json's "ts-node.require"), so
 * it runs before one_file_ref.ts; it imports nothing but node built-ins. When the script is
 * one_file_ref.ts and the arguments are exactly one of
 *
 *   --version | --help | -h | help | COMMAND --help | COMMAND -h
 *
 * it prints the answer and exits. Help texts come from cli/help.json, written by
 * `npm run help-cache` from the live commands and keyed by a hash of the sources they are built
 * from; when the key does not match (a source changed since), it does nothing and the command
 * line runs as usual, slower but never stale. MISTRAL_NO_FAST_HELP=1 turns it off.
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';

const ROOT = path.resolve(__dirname, '..');
export const HELP_CACHE = path.join(__dirname, 'help.json');
/** The commands with a help text of their own (cli/main.ts: logits shows the general one). */
export const HELP_COMMANDS = ['generate', 'interactive', 'serve', 'tokenize', 'detokenize'] as const;

/** What the help texts are made of: the command files, and the modules whose constants they print. */
export function helpSources(): string[] {
  const cli = fs.readdirSync(__dirname).filter((f) => f.endsWith('.ts')).sort().map((f) => path.join(__dirname, f));
  return [...cli, ...['runtime/backend.ts', 'generation/sampling.ts', 'server/app.ts'].map((f) => path.join(ROOT, f))];
}

/** sha256 over the sources' names and contents. */
export function helpKey(files: string[] = helpSources()): string {
  const hash = crypto.createHash('sha256');
  for (const file of files) {
    hash.update(path.relative(ROOT, file)).update('\0');
    try {
      hash.update(fs.readFileSync(file)).update('\0');
    } catch {
      hash.update('(missing)\0');
    }
  }
  return hash.digest('hex');
}

export interface HelpCache {
  key: string;
  /** "" is the general --help; the others are `COMMAND --help`. */
  texts: Record<string, string>;
}

export function packageVersionLine(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string };
  return `${pkg.name} ${pkg.version}\n`;
}

/**
 * The text to print for `args` (what follows the script), or undefined when the command line must
 * run as usual: not one of the forms above, or no cache whose key is `key`.
 */
export function quickAnswer(args: string[], cache: HelpCache | undefined, key: () => string): string | undefined {
  const isHelp = (a: string | undefined): boolean => a === '--help' || a === '-h';
  if (args.length === 1 && args[0] === '--version') return packageVersionLine();
  let topic: string;
  if (args.length === 1 && (isHelp(args[0]) || args[0] === 'help')) topic = '';
  else if (args.length === 2 && isHelp(args[1]) && (HELP_COMMANDS as readonly string[]).includes(args[0])) topic = args[0];
  else return undefined;
  if (cache === undefined || typeof cache.texts?.[topic] !== 'string' || cache.key !== key()) return undefined;
  return cache.texts[topic];
}

function readCache(): HelpCache | undefined {
  try {
    return JSON.parse(fs.readFileSync(HELP_CACHE, 'utf8')) as HelpCache;
  } catch {
    return undefined;
  }
}

/** The arguments after one_file_ref.ts in this process's command line, or undefined if it is not the script. */
function scriptArgs(argv: string[]): string[] | undefined {
  const script = path.join(ROOT, 'one_file_ref');
  const at = argv.findIndex((a, i) => i > 0 && !a.startsWith('-') && path.resolve(a).replace(/\.ts$/, '') === script);
  return at < 0 ? undefined : argv.slice(at + 1);
}

// As a preload: answer and exit, or do nothing.
if (process.env.MISTRAL_NO_FAST_HELP !== '1') {
  const args = scriptArgs(process.argv);
  const answer = args === undefined ? undefined : quickAnswer(args, readCache(), () => helpKey());
  if (answer !== undefined) {
    const bytes = Buffer.from(answer);
    for (let done = 0; done < bytes.length; ) {
      try {
        done += fs.writeSync(1, bytes, done);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') break; // e.g. EPIPE: the reader has gone
      }
    }
    process.exit(0);
  }
}
