/**
 * `npm run help-cache`: writes cli/help.json, the help texts cli/fast_path.ts prints without loading
 * the model's modules, from the live commands, with the key of the sources they came from. Run it
 * after changing a help text or a flag (test/fast_help.test.ts fails until it is).
 */
import * as fs from 'fs';
import { HELP_CACHE, HELP_COMMANDS, helpKey, type HelpCache } from './fast_path';
import { run } from './main';

/** What `one_file_ref.ts ...args` prints on stdout, run in this process. */
export async function capture(args: string[]): Promise<string> {
  let out = '';
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]): boolean => {
    out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    const done = rest.find((r): r is () => void => typeof r === 'function');
    if (done) process.nextTick(done);
    return true;
  }) as typeof process.stdout.write;
  try {
    await run(args);
  } finally {
    process.stdout.write = write;
  }
  return out;
}

/** Every help text, as the command line prints it now. */
export async function liveHelpTexts(): Promise<Record<string, string>> {
  const texts: Record<string, string> = { '': await capture(['--help']) };
  for (const command of HELP_COMMANDS) texts[command] = await capture([command, '--help']);
  return texts;
}

if (require.main === module) {
  void liveHelpTexts().then((texts) => {
    const cache: HelpCache = { key: helpKey(), texts };
    fs.writeFileSync(HELP_CACHE, JSON.stringify(cache, null, 1) + '\n');
    process.stdout.write(`wrote ${HELP_CACHE}\n`);
  });
}
