/**
 * --help and --version answered before ts-node transpiles the model's modules and tfjs loads
 * (issue 11.12): cli/fast_path.ts, preloaded through tsconfig.json, prints cli/help.json's texts.
 * Checked without timing anything: the texts are the live ones, and a spawned `ts-node
 * one_file_ref.ts --help` loads neither one_file_ref.ts nor any @tensorflow package.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { HELP_CACHE, helpKey, packageVersionLine, quickAnswer, type HelpCache } from '../cli/fast_path';
import { liveHelpTexts } from '../cli/help_cache';
import { cliEnv, describeRun, runCli } from './spawn';

const cache = JSON.parse(fs.readFileSync(HELP_CACHE, 'utf8')) as HelpCache;

describe('cli/help.json', () => {
  it('is up to date with the commands (if not: npm run help-cache)', async () => {
    expect(cache.key, 'cli/help.json is stale: run `npm run help-cache` and commit cli/help.json').toBe(helpKey());
    expect(cache.texts).toEqual(await liveHelpTexts());
  });

  it('quickAnswer: only the exact help and version forms, and only with a matching key', () => {
    const key = (): string => cache.key;
    expect(quickAnswer(['--version'], cache, key)).toBe(packageVersionLine());
    expect(quickAnswer(['--help'], cache, key)).toBe(cache.texts['']);
    expect(quickAnswer(['help'], cache, key)).toBe(cache.texts['']);
    expect(quickAnswer(['serve', '-h'], cache, key)).toBe(cache.texts.serve);
    expect(quickAnswer(['--help'], cache, () => 'another key')).toBeUndefined(); // a source changed: the slow path answers
    expect(quickAnswer(['--help'], undefined, key)).toBeUndefined();
    for (const args of [[], ['generate', '--prompt', 'x', '--help'], ['logits', '--help'], ['fixtures/tiny'], ['--help', '--verbose'], ['generate', '--bogus', '-h']]) {
      expect(quickAnswer(args, cache, key), args.join(' ')).toBeUndefined();
    }
  });
});

describe.concurrent('spawned: help and version without loading the model or tfjs', () => {
  const recorder = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-fast-help-')), 'record.js');
  fs.writeFileSync(
    recorder,
    "process.on('exit', () => require('fs').writeFileSync(process.env.RECORD_MODULES, JSON.stringify(Object.keys(require.cache))));\n",
  );

  const cases: [string[], () => string][] = [
    [['--version'], () => packageVersionLine()],
    [['--help'], () => cache.texts['']],
    [['-h'], () => cache.texts['']],
    [['help'], () => cache.texts['']],
    [['generate', '--help'], () => cache.texts.generate],
    [['tokenize', '-h'], () => cache.texts.tokenize],
  ];
  it.each(cases)('%j', async (args, expected) => {
    const out = `${recorder}.${args.join('_')}.json`;
    const r = await runCli(args, { env: cliEnv({ NODE_OPTIONS: `--require ${recorder}`, RECORD_MODULES: out }) });
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe(expected());
    const loaded = JSON.parse(fs.readFileSync(out, 'utf8')) as string[];
    expect(loaded.some((m) => m.endsWith('fast_path.ts'))).toBe(true); // the preload ran
    expect(loaded.filter((m) => /one_file_ref\.ts$|@tensorflow|cli[/\\]main\.ts$|fastify/.test(m))).toEqual([]);
  });
});
