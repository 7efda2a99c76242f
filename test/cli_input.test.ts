/**
 * Where prompts come from and how flags are typed (issue 11): -f/--file PATH and stdin, the short
 * flags llama.cpp users type, --version, and prompt files that are not UTF-8. The CLI runs as a
 * process, as users run it; expected ids and texts come from the Python reference's dumps.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';
import { maxTokensNote } from '../cli/max_tokens';
import { decodeUtf8, firstInvalidUtf8, PromptFileError, readPromptFile } from '../cli/prompt_file';
import { parseCommandLine } from '../cli/args';
import { generateOptionsFromFlags } from '../cli/generate';
import { capture } from '../cli/help_cache';
import { closestCommand, editDistance, HELP, packageVersion, run as runMain } from '../cli/main';
import { describeRun, errorLines, ROOT, run, runCli, TINY, TS_NODE, type RunResult } from './spawn';

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-cli-input-'));
const tmpFile = (name: string, data: string | Buffer): string => {
  const file = path.join(TMP, name);
  fs.writeFileSync(file, data);
  return file;
};

interface GenerateCase {
  name: string;
  prompts: string[];
  max_tokens: number;
  encoded_prompts: number[][];
  generated_ids: number[][];
  texts: string[];
}
const REFERENCE = JSON.parse(fs.readFileSync(path.join(ROOT, 'fixtures/reference/tiny/index.json'), 'utf8')) as { cases: GenerateCase[] };
const refCase = (name: string): GenerateCase => REFERENCE.cases.find((c) => c.name === name)!;

/** Exit 1, nothing on stdout, one line `error: ...` containing each of `mentions`, no stack trace. */
function expectOneLineError(r: RunResult, mentions: string[]): void {
  const what = describeRun(r);
  expect(r.code, what).toBe(1);
  expect(r.stdout, what).toBe('');
  const lines = errorLines(r);
  expect(lines, what).toHaveLength(1);
  expect(lines[0], what).toMatch(/^error: /);
  for (const m of mentions) expect(lines[0], what).toContain(m);
}

describe('firstInvalidUtf8: where Python reports the first bad byte', () => {
  // Positions as Python's bytes.decode('utf-8') reports them (UnicodeDecodeError.start).
  const cases: [string, number[], number][] = [
    ['Latin-1 é', [...Buffer.from('caf'), 0xe9, ...Buffer.from(' au lait')], 3],
    ['a lead byte without its continuation', [0x61, 0xc3, 0x28], 1],
    ['an overlong 3-byte form', [0xe0, 0x80, 0x80], 0],
    ['a surrogate', [0x6f, 0x6b, 0xed, 0xa0, 0x80], 2],
    ['a sequence cut short at the end', [0x61, 0x62, 0xe2, 0x82], 2],
    ['past U+10FFFF', [0xf4, 0x90, 0x80, 0x80], 0],
    ['an overlong 2-byte form', [0xc0, 0xaf], 0],
    ['0xff after an emoji', [0x78, 0xf0, 0x9f, 0x99, 0x82, 0xff], 5],
    ['a stray continuation byte after a BOM', [0xef, 0xbb, 0xbf, 0x68, 0x69, 0x80], 5],
  ];
  it.each(cases)('%s', (_name, bytes, at) => {
    expect(firstInvalidUtf8(Uint8Array.from(bytes))).toBe(at);
    expect(() => decodeUtf8(Uint8Array.from(bytes), 'p.txt')).toThrow(`p.txt: prompt file is not valid UTF-8 at byte ${at}`);
  });

  it('agrees with TextDecoder (fatal) on 20,000 random byte strings: valid before the position, invalid at it', () => {
    let seed = 12345;
    const rand = (): number => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const fatal = new TextDecoder('utf-8', { fatal: true });
    const valid = (b: Uint8Array): boolean => {
      try {
        fatal.decode(b);
        return true;
      } catch {
        return false;
      }
    };
    let invalid = 0;
    for (let n = 0; n < 20_000; n++) {
      // Mostly bytes that make multi-byte sequences, some ASCII, so that both outcomes are common.
      const bytes = Uint8Array.from({ length: 1 + Math.floor(rand() * 8) }, () =>
        rand() < 0.2 ? Math.floor(rand() * 0x80) : 0x80 + Math.floor(rand() * 0x80),
      );
      const at = firstInvalidUtf8(bytes);
      expect(at === -1, Buffer.from(bytes).toString('hex')).toBe(valid(bytes));
      if (at >= 0) {
        invalid++;
        expect(valid(bytes.subarray(0, at)), Buffer.from(bytes).toString('hex')).toBe(true);
        // The sequence starting at `at` is bad: no continuation of the bytes from there on makes it valid.
        expect(valid(bytes.subarray(0, at + 1)), Buffer.from(bytes).toString('hex')).toBe(false);
      }
    }
    expect(invalid).toBeGreaterThan(1000);
    expect(invalid).toBeLessThan(20_000);
  });

  it('readPromptFile drops a BOM and one final line end, and names a folder or a missing file', () => {
    expect(readPromptFile(tmpFile('bom.txt', '\ufeffHello\r\n'))).toBe('Hello');
    expect(readPromptFile(tmpFile('two.txt', 'Hello\n\n'))).toBe('Hello\n');
    expect(readPromptFile(tmpFile('empty.txt', ''))).toBe('');
    expect(() => readPromptFile(TMP)).toThrow(PromptFileError);
    expect(() => readPromptFile(TMP)).toThrow(`--file ${TMP}: is a folder`);
    expect(() => readPromptFile(path.join(TMP, 'nope.txt'), '-f')).toThrow(`-f ${path.join(TMP, 'nope.txt')}: no such file`);
    expect(() => readPromptFile(tmpFile('big.txt', 'x'.repeat(100)), '--file', 99)).toThrow('more than 99 bytes');
  });
});

// Spawned one at a time (each loads ts-node, tfjs and a model): the suite runs beside other files.
describe('prompts from files and stdin, short flags, --version (spawned)', () => {
  it("the reference command reads -f files and stdin among -p prompts, in order, as the reference's generate() (generate_0)", async () => {
    const ref = refCase('generate_0');
    expect(ref.prompts).toHaveLength(3);
    const [empty, once, zoe] = ref.prompts;
    expect(empty).toBe('');
    // A CRLF file with a BOM for the second prompt; the third from stdin, ended by a newline as `echo` ends it.
    const file = tmpFile('once.txt', `\ufeff${once}\r\n`);
    const r = await runCli([TINY, '-p', empty, '-f', file, '--file', '-', '-n', String(ref.max_tokens), '--json'], { input: `${zoe}\n` });
    expect(r.code, describeRun(r)).toBe(0);
    const out = JSON.parse(r.stdout) as { texts: string[]; generated_ids: number[][] };
    expect(out.texts).toEqual(ref.texts);
    expect(out.generated_ids).toEqual(ref.generated_ids);
  });

  it('generate -f - takes its prompt from a pipe; -n, -s, -c are --max-tokens, --seed, --chunk-size', async () => {
    const ref = refCase('generate_0');
    const once = ref.prompts[1];
    const r = await runCli(['generate', TINY, '-f', '-', '-n', '4', '-s', '7', '-c', '3', '--json', '--quiet'], { input: `${once}\n` });
    expect(r.code, describeRun(r)).toBe(0);
    const { completions } = JSON.parse(r.stdout) as { completions: { prompt: string; prompt_ids: number[]; generated_ids: number[]; seed: number; finish_reason: string }[] };
    expect(completions).toHaveLength(1);
    expect(completions[0].prompt).toBe(once);
    expect(completions[0].prompt_ids).toEqual(ref.encoded_prompts[1]); // the reference's encoding of the same text
    expect(completions[0].seed).toBe(7);
    expect(completions[0].generated_ids.length).toBeLessThanOrEqual(4);
    if (completions[0].generated_ids.length < 4) expect(completions[0].finish_reason).toBe('stop');
  });

  it('-c 0 is --chunk-size 0: refused by name', async () => {
    expectOneLineError(await runCli(['generate', TINY, '-p', 'hi', '-c', '0']), ['--chunk-size', '"0"']);
  });

  it('a prompt file that is not UTF-8 is an error naming the file and the byte', async () => {
    const latin1 = Buffer.from('Il était une fois', 'latin1'); // "Il " is 3 bytes, then é is the one byte 0xe9, at offset 3
    const file = tmpFile('latin1.txt', latin1);
    expectOneLineError(await runCli(['generate', TINY, '-f', file]), [`-f ${file}`, 'not valid UTF-8 at byte 3']);
  });

  it('a missing prompt file is a one-line error naming it', async () => {
    const missing = path.join(TMP, 'missing.txt');
    expectOneLineError(await runCli(['generate', TINY, '-f', missing]), [missing, 'no such file']);
  });
});

describe('the flags as parsed (in-process)', () => {
  it('-n -1 is --max-tokens -1; stdin twice and -f without --prompt are refused by name', () => {
    const options = { prompt: { type: 'string', multiple: true }, 'max-tokens': { type: 'string' } } as const;
    expect(() => generateOptionsFromFlags(parseCommandLine(['-p', 'hi', '-n', '-1'], options).values, 35)).toThrow('--max-tokens must be an integer >= 0, got "-1"');
    expect(() => parseCommandLine(['-f', '-', '--file', '-'], options)).toThrow('--file - (stdin) can be given once');
    expect(() => parseCommandLine(['-f', 'x.txt'], { port: { type: 'string' } })).toThrow('unknown flag -f');
    expect(parseCommandLine(['-n5', '-p', 'a', '--prompt=b'], options).values).toMatchObject({ 'max-tokens': '5', prompt: ['a', 'b'] });
  });

  it('--version and -h: the package version, and the short forms in the help', async () => {
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string };
    expect(packageVersion()).toBe(`${pkg.name} ${pkg.version}`); // spawned in test/fast_help.test.ts
    const help = await capture(['generate', '-h']);
    expect(help).toMatch(/^Usage:\n {2}npx ts-node one_file_ref.ts generate MODEL/);
    for (const flag of ['-f, --file PATH', '-p --prompt', '-n --max-tokens', '-s --seed', '-c --chunk-size', '--version']) {
      expect(help, flag).toContain(flag);
    }
  });
});

describe("--max-tokens's two meanings", () => {
  it('maxTokensNote: a note exactly when some row spends every step on its own prompt', () => {
    // Prefill covers the shortest prompt (4 tokens); the 10-token row spends 6 steps on its prompt.
    expect(maxTokensNote([4, 10], 7)).toBeUndefined(); // 6 forced steps, then 1 new token
    expect(maxTokensNote([4, 10], 6)).toMatch(/prompt 2 is 6 tokens longer than the shortest \(4 tokens\).*--max-tokens 7 or more/);
    expect(maxTokensNote([4, 10, 9], 5)).toMatch(/prompts 2, 3 are up to 6 tokens longer.*their texts stop/);
    expect(maxTokensNote([10], 3)).toBeUndefined(); // one prompt: every step is a new token
    expect(maxTokensNote([4, 10], 0)).toBeUndefined(); // no texts at all, as the reference
  });

  it('--help states both meanings; the reference command notes a prompt cut short (generate_0), not otherwise', { timeout: 300_000 }, async () => {
    expect(HELP).toContain('--max-tokens N: with the reference command (MODEL --prompt ...) N counts steps per row');
    expect(HELP).toContain('With generate and interactive, N counts new tokens only');

    const ref = refCase('generate_0');
    const lengths = ref.encoded_prompts.map((ids) => ids.length); // the reference's own encodings
    const longest = Math.max(...lengths) - Math.min(...lengths);
    expect(lengths[1] - lengths[0]).toBeGreaterThanOrEqual(ref.max_tokens); // both longer prompts are cut: the case this test is about
    const args = [TINY, ...ref.prompts.flatMap((p) => ['-p', p]), '--json'];
    const cut = await runCli([...args, '-n', String(ref.max_tokens)]);
    expect(cut.code, describeRun(cut)).toBe(0);
    expect((JSON.parse(cut.stdout) as { texts: string[] }).texts).toEqual(ref.texts); // 'Once upon a tim': cut inside the prompt
    const notes = cut.stderr.split('\n').filter((l) => l.startsWith('note: --max-tokens'));
    expect(notes, describeRun(cut)).toEqual([expect.stringContaining(`prompts 2, 3 are up to ${longest} tokens longer`)]);
    expect(notes[0]).toContain(`--max-tokens ${longest + 1} or more`);

    const enough = await runCli([...args, '-n', String(longest + 1)]);
    expect(enough.code, describeRun(enough)).toBe(0);
    expect(enough.stderr).not.toContain('note:');
  });
});

describe('a mistyped command', () => {
  it('closestCommand: typos, transpositions, prefixes and case, nothing for unrelated words', () => {
    const cases: [string, string | undefined][] = [
      ['generat', 'generate'], ['genreate', 'generate'], ['Generate', 'generate'], ['gen', 'generate'],
      ['serv', 'serve'], ['tokenise', 'tokenize'], ['detok', 'detokenize'], ['intractive', 'interactive'],
      ['lgoits', 'logits'], ['hello', undefined], ['storyteller', undefined], ['x'.repeat(10_000), undefined],
    ];
    for (const [word, expected] of cases) expect(closestCommand(word), word).toBe(expected);
    expect(editDistance('kitten', 'sitting')).toBe(3);
    expect(editDistance('ab', 'ba')).toBe(1);
  });

  it('says "unknown command generat; did you mean generate?" instead of taking it for a model', async () => {
    expectOneLineError(await runCli(['generat', 'fixtures/storyteller', '--prompt', 'hi']), ['unknown command generat; did you mean generate?']);
    // The same check in-process: a word that is no command, and a path that does not exist.
    await expect(runMain(['hello', 'fixtures/storyteller'])).rejects.toThrow(/^hello: not a command \(.*generate.*\) and no such file or folder/);
    await expect(runMain(['fixtures/storytellr'])).rejects.toThrow('fixtures/storytellr: no such file or folder');
  });

  it('a model folder that happens to be named like a command typo is still a model', async () => {
    const cwd = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-typo-'));
    fs.symlinkSync(TINY, path.join(cwd, 'generat'));
    const r = await run(TS_NODE, [path.join(ROOT, 'one_file_ref.ts'), 'generat', '-p', 'hi', '-n', '2', '--quiet'], { cwd });
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout.split('\n')[1]).toBe('====================='); // the reference command's output
  });
});
