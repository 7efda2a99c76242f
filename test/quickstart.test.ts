/**
 * The README's first steps, run as a newcomer runs them: `npm run demo`, and (below) the serving
 * snippets and the test summary. Each spawns real processes from the repository root.
 */
import { spawn } from 'child_process';
import * as fs from 'fs';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliEnv, describeRun, ROOT, run, TS_NODE } from './spawn';

const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');

/** The README's fenced code blocks, in order, with their language. */
function codeBlocks(markdown: string): { lang: string; code: string; at: number }[] {
  return [...markdown.matchAll(/^```(\w*)\n([\s\S]*?)^```$/gm)].map((m) => ({ lang: m[1], code: m[2], at: m.index ?? 0 }));
}

/** The one code block for which `pick` holds; fails naming `what` otherwise. */
function oneBlock(what: string, pick: (b: { lang: string; code: string }) => boolean): { lang: string; code: string; at: number } {
  const found = codeBlocks(README).filter(pick);
  expect(found.length, `README.md: the ${what} block`).toBe(1);
  return found[0];
}

/** A port nobody listens on now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

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

describe("the README's Serving snippets, run as pasted against `serve fixtures/storyteller`", () => {
  let port = 0;
  let server: ReturnType<typeof spawn> | undefined;
  let serverLog = '';
  const onPort = (code: string): string => code.replace(/127\.0\.0\.1:8000/g, `127.0.0.1:${port}`);

  beforeAll(async () => {
    // The command the README says to run, on a free port instead of 8000 (which may be taken here).
    const command = /With `(npx ts-node one_file_ref\.ts serve [^`]+)` running/.exec(README)?.[1];
    expect(command, 'README.md: "With `npx ts-node one_file_ref.ts serve ...` running"').toBe('npx ts-node one_file_ref.ts serve fixtures/storyteller');
    port = await freePort();
    const args = command!.split(' ').slice(2); // after "npx ts-node"
    server = spawn(TS_NODE, [...args, '--port', String(port)], { cwd: ROOT, env: cliEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
    server.stdout!.on('data', (d: Buffer) => (serverLog += d.toString()));
    server.stderr!.on('data', (d: Buffer) => (serverLog += d.toString()));
    for (let i = 0; ; i++) {
      const up = await fetch(`http://127.0.0.1:${port}/health`).then((r) => r.ok, () => false);
      if (up) break;
      if (i > 1500 || server.exitCode !== null) throw new Error(`the server did not come up on port ${port}:\n${serverLog}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }, 200_000);
  afterAll(() => {
    server?.kill('SIGTERM');
  });

  it('curl prints the completion the README shows', async () => {
    const curl = oneBlock('curl', (b) => b.lang === 'sh' && b.code.trimStart().startsWith('curl http://127.0.0.1:8000/v1/completions'));
    const shown = codeBlocks(README).find((b) => b.at > curl.at && b.lang === 'json');
    expect(shown, 'README.md: the JSON after the curl block').toBeDefined();
    const r = await run('sh', ['-c', onPort(curl.code)]);
    expect(r.code, describeRun(r)).toBe(0);
    const got = JSON.parse(r.stdout) as Record<string, unknown>;
    const readme = JSON.parse(shown!.code) as Record<string, unknown>;
    expect(got.id).toMatch(/^cmpl-/);
    expect(typeof got.created).toBe('number');
    const { id: _a, created: _b, ...rest } = got;
    const { id: _c, created: _d, ...expected } = readme;
    expect(rest).toEqual(expected);
  });

  it('the openai snippet, saved as client.mjs in a fresh folder with openai installed, prints the stream, a newline, then the chat', async () => {
    const snippet = oneBlock('openai', (b) => b.code.includes("from 'openai'"));
    expect(snippet.lang).toBe('js');
    expect(snippet.code).toMatch(/^\/\/ client\.mjs/); // the file name the snippet says to use
    // A newcomer's folder: `npm init -y && npm install openai`, here with this repository's openai linked in.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-readme-client-'));
    fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name: 'client', version: '1.0.0' }));
    fs.mkdirSync(path.join(dir, 'node_modules'));
    fs.symlinkSync(path.join(ROOT, 'node_modules', 'openai'), path.join(dir, 'node_modules', 'openai'));
    fs.writeFileSync(path.join(dir, 'client.mjs'), onPort(snippet.code));
    const r = await run(process.execPath, ['client.mjs'], { cwd: dir, env: { ...process.env } });
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stderr, describeRun(r)).toBe('');

    // The streamed text is what the same request gives unstreamed (same seed, same backend), then a newline.
    const body = { model: 'storyteller', prompt: 'The little dog', max_tokens: 40, temperature: 0.7, seed: 42 };
    const res = await fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    const completion = (await res.json()) as { choices: { text: string }[] };
    const streamed = completion.choices[0].text;
    expect(streamed.length).toBeGreaterThan(0);
    expect(r.stdout.startsWith(`${streamed}\n`), describeRun(r)).toBe(true);
    // Then the chat's answer and its usage, as console.log prints an object.
    const rest = r.stdout.slice(streamed.length + 1);
    expect(rest).toMatch(/\S/);
    expect(rest).toMatch(/\{\s*prompt_tokens: \d+,\s*completion_tokens: \d+,\s*total_tokens: \d+\s*\}\n$/);
  });
});

describe("the README's tokenize example", () => {
  it('prints the ids the README shows', async () => {
    const line = /^npx ts-node one_file_ref\.ts (tokenize fixtures\/storyteller "Hello world") +# prints (\[[\d,]+\])$/m.exec(README);
    expect(line, 'README.md: the tokenize example').not.toBeNull();
    const r = await run(TS_NODE, ['one_file_ref.ts', 'tokenize', 'fixtures/storyteller', 'Hello world']);
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toBe(`${line![2]}\n`);
  });
});
