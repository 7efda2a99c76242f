/**
 * The README's first steps, run as a newcomer runs them: `npm run demo`, and (below) the serving
 * snippets and the test summary. Each spawns real processes from the repository root.
 */
import { describe, expect, it } from 'vitest';
import { describeRun, run } from './spawn';

/**
 * What the Python reference's own demo() printed for fixtures/storyteller: mistral-src's
 * one_file_ref.py at c18d5b9 called through fixtures/dump_reference.py's run_demo() (CPU,
 * float32, inside cuda_is_cpu()). Every sequence stays within the sliding window (64), so the
 * reference's two mask definitions agree here.
 */
const REFERENCE_DEMO_STDOUT = [
  'This is a test day, and Leo could not go outside. Max was sad because he wanted to go to the forest. "I am so bored," said Emma. "Soon," said Mom',
  'This is another test day, and Leo could not go outside. Max was sad because he wanted to go to the forest. "I am so bored," said Emma. "Soon," said Mom',
  'This is a third test, mistral AI is very good at testing.  "You all did well today," says Mr. Brown. One day, it rained all morning. Ben was',
].map((text) => `${text}\n=====================\n`).join('');

describe('npm run demo', () => {
  it("runs the storyteller, printing what the reference's demo() prints for it", async () => {
    const r = await run('npm', ['run', 'demo']);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout, describeRun(r)).toContain(REFERENCE_DEMO_STDOUT);
    expect(r.stdout).toMatch(/one_file_ref\.ts fixtures\/storyteller/); // npm echoes the script it runs
  });
});
