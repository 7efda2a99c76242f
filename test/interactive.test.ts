/**
 * The `interactive` command end to end, as a person at a terminal runs it: `npx ts-node
 * one_file_ref.ts interactive fixtures/tiny --instruct` in a pseudo-terminal made by util-linux's
 * `script` (on every Debian machine: bsdutils is essential), typing lines, Ctrl-C and Ctrl-D.
 *
 * - A chat that runs well past sliding_window (8) tokens streams, for every turn, the answer that
 *   complete() gives to the same conversation's ids prefilled from scratch with that turn's seed.
 * - Ctrl-C stops an endless answer (greedy on the tiny model never emits EOS) and the session goes
 *   on; Ctrl-D during an answer exits with code 0.
 * - Without --instruct and without a terminal, each stdin line is completed from position 0.
 */
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { instructionTunedEvidence } from '../cli/instruct_check';
import { describeRun, runCli } from './spawn';
import { Transformer } from '../one_file_ref';
import { SentencePieceProcessor } from '../tokenizer';
import { encodeInstruct } from '../tokenizer/instruct';
import { complete } from '../generation/generate';

const ROOT = path.resolve(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const HAS_SCRIPT = spawnSync('script', ['--version']).status === 0;
const ENV = { ...process.env, MISTRAL_BACKEND: 'wasm', TERM: 'xterm' };

/** A running command and everything it printed so far. */
class Session {
  output = '';
  exit: Promise<number | null>;
  private waiters: (() => void)[] = [];

  constructor(readonly child: ChildProcessWithoutNullStreams) {
    const take = (s: string): void => {
      this.output += s;
      this.waiters.forEach((w) => w());
    };
    child.stdout.setEncoding('utf8').on('data', take);
    child.stderr.setEncoding('utf8').on('data', take);
    this.exit = new Promise((resolve) => child.on('close', (code) => resolve(code)));
  }

  /** Resolves when `test(output)` holds; fails with the output so far after `ms`. */
  waitFor(what: string, test: (output: string) => boolean, ms = 30_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!test(this.output)) return;
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== check);
        resolve();
      };
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}; output so far:\n${JSON.stringify(this.output)}`)), ms);
      this.waiters.push(check);
      check();
    });
  }

  type(keys: string): void {
    this.child.stdin.write(keys);
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

/** `npx ts-node one_file_ref.ts ARGS` in a pseudo-terminal (script -qfec CMD /dev/null). */
function inTerminal(args: string[]): Session {
  const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  const command = ['npx', 'ts-node', 'one_file_ref.ts', ...args].map(quote).join(' ');
  return new Session(spawn('script', ['-qfec', command, '/dev/null'], { cwd: ROOT, env: ENV }));
}

/** The per-answer stats line on stderr: tokens, finish reason, tokens in the conversation. */
const STATS = /\[(\d+) tokens, [\d.]+ tokens\/s, (\w+)(?:, (\d+) tokens in the conversation)?\]/g;
const statsLines = (output: string): RegExpMatchArray[] => [...output.matchAll(STATS)];
/** What a terminal shows, minus its line discipline's \r (text written with \n arrives as \r\n). */
const clean = (s: string): string => s.replace(/\r/g, '');

describe.skipIf(!HAS_SCRIPT)('interactive --instruct in a pseudo-terminal (needs util-linux `script`)', () => {
  let model: Transformer;
  let tokenizer: SentencePieceProcessor;
  beforeAll(async () => {
    model = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
    tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
  });
  afterAll(() => model.dispose());

  it('streams each answer of a chat far past sliding_window tokens, as from-scratch prefill gives it', async () => {
    const questions = ['Hello there', 'Tell me about the old sailor.', 'What did he say?', 'Thanks!'];
    const seed = 11;
    const maxTokens = 12;
    // The expected answers: each turn's conversation ids (tokenizer/instruct.ts's format, each
    // answer closed by EOS) completed from position 0 with seed + turn.
    const history: number[] = [];
    const expected: { text: string; tokens: number; reason: string; conversation: number }[] = [];
    for (const [k, q] of questions.entries()) {
      const turn = encodeInstruct(tokenizer, [{ role: 'user', content: q }]);
      history.push(...(k === 0 ? turn : turn.slice(1)));
      const c = await complete(model, tokenizer, [...history], { maxTokens, seed: seed + k });
      history.push(...c.generatedIds);
      if (c.finishReason !== 'eos') history.push(tokenizer.eosId);
      const answerIds = c.generatedIds.filter((id) => id !== tokenizer.eosId);
      expected.push({ text: tokenizer.decode(answerIds), tokens: c.generatedIds.length, reason: c.finishReason, conversation: history.length });
    }
    expect(history.length).toBeGreaterThan(4 * model.args.slidingWindow);

    const session = inTerminal(['interactive', 'fixtures/tiny', '--instruct', '--seed', String(seed), '--max-tokens', String(maxTokens)]);
    try {
      await session.waitFor('the first prompt', (o) => o.includes('> '), 60_000);
      for (const [k, q] of questions.entries()) {
        session.type(`${q}\r`);
        await session.waitFor(`answer ${k + 1}'s stats`, (o) => statsLines(o).length === k + 1);
        await session.waitFor(`prompt ${k + 2}`, (o) => o.lastIndexOf('> ') > o.lastIndexOf(']'));
      }
      session.type('\x04'); // Ctrl-D
      expect(await session.exit).toBe(0);
    } finally {
      session.kill();
    }
    const out = clean(session.output);
    let from = 0;
    for (const [k, e] of expected.entries()) {
      const at = out.indexOf(`${questions[k]}\n${e.text}\n`, from);
      expect(at, `answer ${k + 1} ${JSON.stringify(e.text)} in ${JSON.stringify(out.slice(from))}`).toBeGreaterThanOrEqual(0);
      from = at + 1;
    }
    const stats = statsLines(session.output);
    expect(stats.map((m) => [Number(m[1]), m[2], Number(m[3])])).toEqual(expected.map((e) => [e.tokens, e.reason, e.conversation]));
  });

  it('Ctrl-C stops the answer being streamed, not the program; Ctrl-D during an answer exits', async () => {
    // Greedy on the tiny model does not reach EOS (checked here for 300 tokens; the stats line
    // below, "abort" and not "eos", shows the answer was still going when Ctrl-C came).
    const ids = encodeInstruct(tokenizer, [{ role: 'user', content: 'Hello' }]);
    const greedy = await complete(model, tokenizer, ids, { maxTokens: 300, temperature: 0 });
    expect(greedy.finishReason).toBe('length');

    const session = inTerminal(['interactive', 'fixtures/tiny', '--instruct', '--temperature', '0', '--max-tokens', '100000']);
    try {
      await session.waitFor('the first prompt', (o) => o.includes('> '), 60_000);
      session.type('Hello\r');
      // Streaming: the answer's text shows up while it is still being generated.
      const start = greedy.text.slice(0, 40);
      await session.waitFor('the answer to start', (o) => clean(o).includes(`Hello\n${start}`));
      session.type('\x03'); // Ctrl-C
      await session.waitFor('the stopped answer', (o) => statsLines(o).length === 1);
      const [stats] = statsLines(session.output);
      expect(stats[2]).toBe('abort');
      expect(clean(session.output)).toContain(' [stopped]\n');
      // The stopped answer is a prefix of the greedy one.
      const shown = clean(session.output).split(`Hello\n`)[1].split(' [stopped]')[0];
      expect(greedy.text.startsWith(shown) || shown.startsWith(greedy.text)).toBe(true);

      await session.waitFor('the next prompt', (o) => o.lastIndexOf('> ') > o.lastIndexOf('[stopped]'));
      session.type('xyz\x03'); // Ctrl-C at the prompt drops the line and asks again
      await session.waitFor('the line to be dropped', (o) => o.includes('^C (Ctrl-D exits)'));
      session.type('Again\r');
      await session.waitFor('the second answer to start', (o) => clean(o).split('Again\n')[1]?.length > 20);
      session.type('\x04'); // Ctrl-D while answering: exits
      expect(await session.exit).toBe(0);
    } finally {
      session.kill();
    }
  });
});

describe('interactive without --instruct, stdin not a terminal', () => {
  it('completes each line from position 0, as generate does', async () => {
    const model = await Transformer.fromFolder(TINY, { maxBatchSize: 1 });
    const tokenizer = await SentencePieceProcessor.load(path.join(TINY, 'tokenizer.model'));
    const lines = ['Once upon a time', 'The old sailor said'];
    const expected: string[] = [];
    for (const [k, line] of lines.entries()) {
      const c = await complete(model, tokenizer, tokenizer.encode(line, true), { maxTokens: 10, seed: 5 + k });
      expected.push(`Prompt: ${line}${c.text}\n=====================\n`);
    }
    model.dispose();
    const child = spawn(path.join(ROOT, 'node_modules', '.bin', 'ts-node'), ['one_file_ref.ts', 'interactive', 'fixtures/tiny', '--seed', '5', '--max-tokens', '10', '--quiet'], { cwd: ROOT, env: ENV });
    const session = new Session(child);
    child.stdin.end(lines.map((l) => `${l}\n`).join(''));
    expect(await session.exit).toBe(0);
    expect(session.output).toBe(`${expected.join('')}Prompt: `);
  });
});

describe('--instruct on a model that is not instruction-tuned', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-heuristic-'));
  const folder = (name: string, files: Record<string, string> = {}): string => {
    const dir = path.join(tmp, name);
    fs.mkdirSync(dir, { recursive: true });
    for (const [file, text] of Object.entries(files)) fs.writeFileSync(path.join(dir, file), text);
    return dir;
  };

  it('the heuristic: a name with instruct/chat/-it, a chat_template, or a config naming an Instruct model', () => {
    expect(instructionTunedEvidence(folder('mistral-7B-instruct-v0.1'))).toContain('mistral-7B-instruct-v0.1');
    expect(instructionTunedEvidence(folder('zephyr-chat'))).toBeDefined();
    expect(instructionTunedEvidence(folder('gemma-7b-it'))).toBeDefined();
    expect(instructionTunedEvidence(path.join(folder('Mistral-7B-Instruct-v0.2', { 'consolidated.00.pth': '' }), 'consolidated.00.pth'))).toBeDefined(); // a file in it
    expect(instructionTunedEvidence(folder('hf-a', { 'tokenizer_config.json': '{"chat_template": "{{ bos_token }}"}' }))).toContain('chat_template');
    expect(instructionTunedEvidence(folder('hf-b', { 'config.json': '{"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.1"}' }))).toContain('_name_or_path');
    // Base models: Mistral-7B-v0.1's own names and configs, the fixtures, a broken config.
    expect(instructionTunedEvidence(folder('mistral-7B-v0.1', { 'params.json': '{"dim": 4096}' }))).toBeUndefined();
    expect(instructionTunedEvidence(folder('hf-c', { 'config.json': '{"_name_or_path": "mistralai/Mistral-7B-v0.1"}', 'tokenizer_config.json': '{' }))).toBeUndefined();
    expect(instructionTunedEvidence(path.join(ROOT, 'fixtures', 'storyteller'))).toBeUndefined();
    expect(instructionTunedEvidence(folder('split'))).toBeUndefined(); // "it" only as a word of its own
  });

  it('interactive --instruct warns once on the storyteller; not on the same weights in an "instruct" folder', { timeout: 300_000 }, async () => {
    const instructCopy = path.join(folder('renamed'), 'storyteller-instruct');
    fs.symlinkSync(path.join(ROOT, 'fixtures', 'storyteller'), instructCopy);
    const input = 'Hello\nAgain\n';
    const base = await runCli(['interactive', 'fixtures/storyteller', '--instruct', '-n', '3', '-s', '1'], { input });
    const tuned = await runCli(['interactive', instructCopy, '--instruct', '-n', '3', '-s', '1'], { input });
    for (const r of [base, tuned]) expect(r.code, describeRun(r)).toBe(0);
    const warnings = base.stderr.split('\n').filter((l) => l.startsWith('warning:'));
    expect(warnings, describeRun(base)).toHaveLength(1); // once per session, not per turn
    expect(warnings[0]).toMatch(/fixtures\/storyteller does not look instruction-tuned.*\[INST\].*leave --instruct out/);
    expect(tuned.stderr).not.toContain('warning:');
  });
});
