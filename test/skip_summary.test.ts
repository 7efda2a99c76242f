/**
 * The summary at the end of `npm test` (test/skip_summary.ts): how many tests were skipped and
 * why, with and without the genuine tokenizers. Runs vitest itself on test/instruct.test.ts (a
 * fast file with two tests that need them), pointing MISTRAL_SHARED at an empty folder and at one
 * holding the two tokenizers, as a user's clone without and with ../shared.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { skipReason, summaryLines } from './skip_summary';
import { describeRun, ROOT, run } from './spawn';
import { SHARED_TOKENIZERS } from './tokenizer_cases';

const VITEST = path.join(ROOT, 'node_modules', '.bin', 'vitest');
const haveTokenizers = fs.existsSync(path.join(SHARED_TOKENIZERS, 'tokenizer.model.v1'));

/** `vitest run test/instruct.test.ts` with MISTRAL_SHARED=shared, in an environment without this run's vitest variables. */
function vitestWithShared(shared: string) {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^VITEST|^TEST$|^NODE_ENV$/.test(k)) env[k] = v;
  return run(VITEST, ['run', 'test/instruct.test.ts'], { env: { ...env, MISTRAL_SHARED: shared, NO_COLOR: '1' }, timeoutMs: 120_000 });
}

describe('skip reasons', () => {
  it('are read from titles; those naming the shared tokenizers count together', () => {
    expect(skipReason([`encodeInstruct with mistral-v1 (skipped: tokenizer model ${SHARED_TOKENIZERS}/tokenizer.model.v1 not found)`])).toBe('genuine-tokenizers');
    expect(skipReason(['a test', 'interactive in a pseudo-terminal (needs util-linux `script`)'])).toBe('needs util-linux `script`');
    expect(skipReason(['fixtures/tiny.tar (skipped when fixtures/tiny.tar is absent)'])).toBe('skipped when fixtures/tiny.tar is absent');
    expect(skipReason(['plain title'])).toBeUndefined();
    const lines = summaryLines(new Map([['genuine-tokenizers', 738], ['needs util-linux `script`', 3], ['', 1]]), false);
    expect(lines[0]).toBe('Skipped: 742 tests, which did not run:');
    expect(lines[1]).toMatch(/^ {2}738 {2}need the genuine Mistral v0\.1\/v0\.3 tokenizers, not found in .*mistral-tokenizer \(README, "Quick start"/);
    expect(lines[2]).toBe('    3  needs util-linux `script`');
    expect(lines[3]).toMatch(/^ {4}1 {2}skipped without a reason/);
    expect(summaryLines(new Map(), true)).toEqual([expect.stringMatching(/^Genuine Mistral tokenizers: found in .*; the tests that compare against them ran\.$/), 'Skipped: none.']);
  });
});

describe.concurrent('vitest ends with the summary (spawned)', () => {
  it('without the shared tokenizers: how many tests were skipped, why, and where they were looked for', async () => {
    const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'no-shared-'));
    const r = await vitestWithShared(empty);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout, describeRun(r)).toMatch(/Tests {2}17 passed \| 2 skipped \(19\)/);
    const tail = r.stdout.slice(r.stdout.lastIndexOf('Tests '));
    expect(tail).toContain('Skipped: 2 tests, which did not run:');
    expect(tail).toContain(`2  need the genuine Mistral v0.1/v0.3 tokenizers, not found in ${path.join(empty, 'mistral-tokenizer')}`);
  });

  it.skipIf(!haveTokenizers)(`with them: they ran, and nothing was skipped${haveTokenizers ? '' : ` (skipped: ${SHARED_TOKENIZERS} not found)`}`, async () => {
    const shared = fs.mkdtempSync(path.join(os.tmpdir(), 'shared-'));
    fs.mkdirSync(path.join(shared, 'mistral-tokenizer'));
    for (const f of ['tokenizer.model.v1', 'tokenizer.model.v3']) fs.symlinkSync(path.join(SHARED_TOKENIZERS, f), path.join(shared, 'mistral-tokenizer', f));
    const r = await vitestWithShared(shared);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout, describeRun(r)).toMatch(/Tests {2}19 passed \(19\)/);
    const tail = r.stdout.slice(r.stdout.lastIndexOf('Tests '));
    expect(tail).toContain(`Genuine Mistral tokenizers: found in ${path.join(shared, 'mistral-tokenizer')}; the tests that compare against them ran.`);
    expect(tail).toContain('Skipped: none.');
  });
});
