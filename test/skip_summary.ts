/**
 * A vitest reporter (after the default one, vitest.config.mts) that ends `npm test` with what was
 * skipped and why, so that a green run on a fresh clone does not hide ~740 tests that did not run.
 *
 * The reason of a skipped test is read from its title or a suite's: "(skipped: ...)", "(skipped
 * when ...)" or "(needs ...)", as the suites that skip on a condition write it. Those that need
 * the genuine Mistral tokenizers (../shared/mistral-tokenizer, or $MISTRAL_SHARED/mistral-tokenizer)
 * are counted together, and the line says where they were looked for and where the README says
 * how to get them. Skips without a reason in the title (a -t filter, .skip) are counted as such.
 */
import * as fs from 'fs';
import * as path from 'path';
import type { Reporter, TestCase, TestModule, Vitest } from 'vitest/node';
import { SHARED_TOKENIZERS } from './tokenizer_cases';

const GENUINE = 'genuine-tokenizers';

/** The reason a skipped test gives in its title or its suites' titles, or undefined. */
export function skipReason(titles: string[]): string | undefined {
  for (const title of titles) {
    const m = /\((skipped(?::| when) [^)]*|needs [^)]*)\)/.exec(title);
    if (m === null) continue;
    return m[1].includes(SHARED_TOKENIZERS) ? GENUINE : m[1].replace(/^skipped: /, '');
  }
  return undefined;
}

function titlesOf(test: TestCase): string[] {
  const titles = [test.name];
  for (let p: TestCase['parent'] | undefined = test.parent; p !== undefined && p.type === 'suite'; p = p.parent) titles.push(p.name);
  return titles;
}

/** The summary lines for these counts (reason -> tests), and whether the genuine tokenizers are there. */
export function summaryLines(counts: Map<string, number>, sharedPresent: boolean): string[] {
  const relative = path.relative(process.cwd(), SHARED_TOKENIZERS);
  const shared = relative.startsWith(`..${path.sep}..`) || path.isAbsolute(relative) ? SHARED_TOKENIZERS : relative;
  const total = [...counts.values()].reduce((a, b) => a + b, 0);
  const lines: string[] = [];
  if (sharedPresent) lines.push(`Genuine Mistral tokenizers: found in ${shared}; the tests that compare against them ran.`);
  if (total === 0) {
    lines.push('Skipped: none.');
    return lines;
  }
  lines.push(`Skipped: ${total} test${total === 1 ? '' : 's'}, which did not run:`);
  const sorted = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  const width = String(sorted[0][1]).length;
  for (const [reason, n] of sorted) {
    const why =
      reason === GENUINE
        ? `need the genuine Mistral v0.1/v0.3 tokenizers, not found in ${shared} (README, "Quick start": what that folder is and how to fill it)`
        : reason === ''
          ? 'skipped without a reason in their titles (a -t filter, .skip or .todo)'
          : reason;
    lines.push(`  ${String(n).padStart(width)}  ${why}`);
  }
  return lines;
}

export default class SkipSummary implements Reporter {
  private vitest: Vitest | undefined;

  onInit(vitest: Vitest): void {
    this.vitest = vitest;
  }

  onTestRunEnd(testModules: ReadonlyArray<TestModule>): void {
    const counts = new Map<string, number>();
    for (const module of testModules) {
      for (const test of module.children.allTests('skipped')) {
        const reason = skipReason(titlesOf(test)) ?? '';
        counts.set(reason, (counts.get(reason) ?? 0) + 1);
      }
    }
    const lines = summaryLines(counts, fs.existsSync(SHARED_TOKENIZERS));
    const log = (s: string): void => (this.vitest ? this.vitest.logger.log(s) : void process.stdout.write(`${s}\n`));
    log('');
    for (const line of lines) log(` ${line}`);
    log('');
  }
}
