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
import { closeComputePools } from '../model/pooled';
import { COMMON_HELP, UsageError } from './args';
import { GENERATE_HELP, generateCommand } from './generate';
import { INTERACTIVE_HELP, interactiveCommand } from './interactive';
import { LOGITS_HELP, logitsCommand } from './logits';
import { REFERENCE_HELP, referenceCommand } from './reference';
import { SERVE_HELP, serveCommand } from './serve';
import { detokenizeCommand, TOKENIZE_HELP, tokenizeCommand } from './tokenize';

export const HELP = `Mistral 7B v0.1, a TypeScript port of mistral-src's one_file_ref.py

Usage:
${REFERENCE_HELP}${GENERATE_HELP}${INTERACTIVE_HELP}${SERVE_HELP}${LOGITS_HELP}
${TOKENIZE_HELP.replace(/^Usage:\n/, '')}
${COMMON_HELP}`;

/** Commands by their first word; anything else is a MODEL for the reference's demo. */
const COMMANDS: Record<string, (argv: string[]) => Promise<void>> = {
  logits: logitsCommand,
  tokenize: tokenizeCommand,
  detokenize: detokenizeCommand,
  generate: generateCommand,
  interactive: interactiveCommand,
  serve: serveCommand,
};

export async function run(argv: string[]): Promise<void> {
  if (argv.length === 0) throw new UsageError('missing MODEL (a model folder or .tar); see --help');
  if (argv.includes('--help') || argv.includes('-h')) {
    if (argv[0] in COMMANDS && argv[0] !== 'logits') return COMMANDS[argv[0]](argv.slice(1));
    process.stdout.write(HELP);
    return;
  }
  const command = COMMANDS[argv[0]];
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
