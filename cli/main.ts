/**
 * The command line of `npx ts-node one_file_ref.ts ...`: picks the command and reports errors.
 *
 *   one_file_ref.ts MODEL [...]                the reference's demo and generate()   cli/reference.ts
 *   one_file_ref.ts logits MODEL [...]         raw logits as .npy                     cli/logits.ts
 *   one_file_ref.ts tokenize|detokenize PATH   ids <-> text, one JSON value a line    cli/tokenize.ts
 *   one_file_ref.ts generate MODEL [...]       sampling, stop strings, streaming      cli/generate.ts
 *   one_file_ref.ts interactive MODEL [...]    a prompt loop or an Instruct chat      cli/interactive.ts
 *
 * Errors are one line on stderr and exit code 1; `--verbose` adds the stack trace.
 */
import * as fs from 'fs';
import * as path from 'path';
import { closeComputePools } from '../model/pooled';
import { COMMON_HELP, UsageError } from './args';
import { maybeNoteBackend } from './backend_note';
import { CONVERT_HELP, convertCommand } from './convert';
import { PERPLEXITY_HELP, perplexityCommand } from './perplexity';
import { GENERATE_HELP, generateCommand } from './generate';
import { INTERACTIVE_HELP, interactiveCommand } from './interactive';
import { LOGITS_HELP, logitsCommand } from './logits';
import { MAX_TOKENS_MEANINGS } from './max_tokens';
import { REFERENCE_HELP, referenceCommand } from './reference';
import { SERVE_HELP, serveCommand } from './serve';
import { detokenizeCommand, TOKENIZE_HELP, tokenizeCommand } from './tokenize';

export const HELP = `Mistral 7B v0.1, a TypeScript port of mistral-src's one_file_ref.py

Usage:
${REFERENCE_HELP}${GENERATE_HELP}${INTERACTIVE_HELP}${SERVE_HELP}${LOGITS_HELP}${PERPLEXITY_HELP}${CONVERT_HELP}
${TOKENIZE_HELP.replace(/^Usage:\n/, '')}
${MAX_TOKENS_MEANINGS}
${COMMON_HELP}`;

/** Commands by their first word; anything else is a MODEL for the reference's demo. */
const COMMANDS: Record<string, (argv: string[]) => Promise<void>> = {
  logits: logitsCommand,
  tokenize: tokenizeCommand,
  detokenize: detokenizeCommand,
  generate: generateCommand,
  interactive: interactiveCommand,
  serve: serveCommand,
  perplexity: perplexityCommand,
  convert: convertCommand,
};

/** This package's version, from its package.json. */
export function packageVersion(): string {
  const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')) as { name: string; version: string };
  return `${pkg.name} ${pkg.version}`;
}

/** Edit distance with adjacent transpositions (optimal string alignment): "genreate" is 1 from "generate". */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/**
 * The command `word` was probably meant to be: one within a third of its length in edit distance
 * (at least 1), or that starts with `word` (3 letters or more); case is ignored. undefined if none.
 */
export function closestCommand(word: string, commands: string[] = Object.keys(COMMANDS)): string | undefined {
  const w = word.toLowerCase();
  if (w.length > 40) return undefined;
  let best: { command: string; distance: number } | undefined;
  for (const command of commands) {
    const distance = w.length >= 3 && command.startsWith(w) ? 0.5 : editDistance(w, command);
    if (distance <= Math.max(1, Math.floor(command.length / 3)) && (best === undefined || distance < best.distance)) {
      best = { command, distance };
    }
  }
  return best?.command;
}

/**
 * A first argument that is neither a command nor an existing path: a mistyped command (said so,
 * with the likely one) or a word that is neither. Paths that do not exist are left to MODEL's own
 * error, which names them.
 */
function checkFirstArgument(first: string): void {
  if (first.startsWith('-') || first in COMMANDS || fs.existsSync(first)) return;
  const guess = closestCommand(first);
  if (guess !== undefined) throw new UsageError(`unknown command ${first}; did you mean ${guess}?`);
  if (!/[/\\.]/.test(first)) {
    const shown = first.length > 60 ? `${first.slice(0, 60)}...` : first;
    throw new UsageError(`${shown}: not a command (${Object.keys(COMMANDS).join(', ')}) and no such file or folder; see --help`);
  }
}

export async function run(argv: string[]): Promise<void> {
  if (argv.length === 0) throw new UsageError('missing MODEL (a model folder or .tar); see --help');
  if (argv.includes('--version')) {
    process.stdout.write(`${packageVersion()}\n`);
    return;
  }
  if (argv.includes('--help') || argv.includes('-h')) {
    if (argv[0] in COMMANDS && argv[0] !== 'logits') return COMMANDS[argv[0]](argv.slice(1));
    process.stdout.write(HELP);
    return;
  }
  if (argv[0] === 'help') {
    process.stdout.write(HELP);
    return;
  }
  checkFirstArgument(argv[0]);
  const command = COMMANDS[argv[0]];
  if (command !== tokenizeCommand && command !== detokenizeCommand) maybeNoteBackend(argv);
  return command ? command(argv.slice(1)) : referenceCommand(argv);
}

/** Runs the command line and exits: 0 on success, 1 with a one-line error otherwise. */
export function main(argv: string[]): void {
  const verbose = argv.includes('--verbose');
  run(argv).then(
    () => closeComputePools().then(() => process.exit(0)),
    (err: unknown) => {
      void closeComputePools();
      const e = err instanceof Error ? err : new Error(String(err));
      process.stderr.write(`error: ${e.message.split('\n')[0]}\n`);
      if (verbose && e.stack) process.stderr.write(`${e.stack}\n`);
      process.exit(1);
    },
  );
}

// Run directly (npx ts-node cli/main.ts MODEL ...) as well as through one_file_ref.ts's script hook.
if (require.main === module) main(process.argv.slice(2));
