/**
 * Running commands as a user types them, for the tests that check what a newcomer sees: the CLI
 * through `node_modules/.bin/ts-node one_file_ref.ts ...` (what `npx ts-node` runs), npm scripts,
 * and the README's own snippets.
 */
import { spawn } from 'child_process';
import * as path from 'path';

export const ROOT = path.resolve(__dirname, '..');
export const TS_NODE = path.join(ROOT, 'node_modules', '.bin', 'ts-node');
export const STORYTELLER = path.join(ROOT, 'fixtures', 'storyteller');
export const TINY = path.join(ROOT, 'fixtures', 'tiny');

export interface RunResult {
  command: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  /** Written to stdin, then stdin is closed; without it stdin is /dev/null. */
  input?: string | Buffer;
  /** Replaces the environment (default: this process's, on the wasm backend). */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  timeoutMs?: number;
}

/** The environment the CLI tests run in: the wasm backend, no colour, the first-run note silenced. */
export function cliEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, MISTRAL_BACKEND: 'wasm', NO_COLOR: '1', ...extra };
}

/** Runs `command args...`, killed after `timeoutMs` (a hang shows as signal SIGTERM). */
export function run(command: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      cwd: opts.cwd ?? ROOT,
      env: opts.env ?? cliEnv(),
      timeout: opts.timeoutMs ?? 120_000, // generous: the suite shares two cores with other work
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    if (opts.input !== undefined && child.stdin) {
      child.stdin.on('error', () => undefined); // the command may exit before reading it all
      child.stdin.end(opts.input);
    }
    const shown = [command, ...args].map((a) => (/^[\w./=:-]+$/.test(a) ? a : JSON.stringify(a))).join(' ');
    child.on('close', (code, signal) => resolve({ command: shown, code, signal, stdout, stderr }));
  });
}

/** `ts-node one_file_ref.ts args...` from the repository root, as `npx ts-node one_file_ref.ts` runs it. */
export function runCli(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(TS_NODE, ['one_file_ref.ts', ...args], opts);
}

/** What an assertion shows on failure: the command, its exit and everything it printed. */
export function describeRun(r: RunResult): string {
  return `${r.command}\nexit ${r.code} ${r.signal ?? ''}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

/** stderr without the status lines a model command prints (backend, loading summary, timings, stats). */
export function errorLines(r: RunResult): string[] {
  const status = /^(backend: \S+|loading weights: .*|\d+ steps in [\d.]+ s: .*|prompt: \d+ tokens.*|generated: \d+ tokens.*|peak memory: .*|seed: \d+)$/;
  return r.stderr.split('\n').filter((line) => line !== '' && !status.test(line));
}
