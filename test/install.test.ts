/**
 * What `npm ci` and the first run say (issue 11.7): package.json's engines and every locked
 * package's engines agree (no EBADENGINE on a supported Node), and the first model command on a
 * machine without the native backends says once which backend runs and how to get the native one.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { describe, expect, it, vi } from 'vitest';
import { backendNoteMarker, maybeNoteBackend, nativeBackendInstalled } from '../cli/backend_note';
import { cliEnv, describeRun, ROOT, runCli, TINY } from './spawn';

// semver is a devDependency (pinned); typed here for the two calls used.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const semver = require('semver') as { subset(sub: string, sup: string): boolean; satisfies(version: string, range: string): boolean };

const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { engines: { node: string } };
const lock = JSON.parse(fs.readFileSync(path.join(ROOT, 'package-lock.json'), 'utf8')) as {
  packages: Record<string, { version?: string; engines?: { node?: string } | string[] }>;
};

describe('engines', () => {
  it("every Node version package.json's engines allows satisfies every locked package's engines (no EBADENGINE)", () => {
    const ours = pkg.engines.node;
    const conflicts = Object.entries(lock.packages)
      .filter(([, p]) => p.engines !== undefined && !Array.isArray(p.engines) && p.engines.node !== undefined)
      .filter(([, p]) => !semver.subset(ours, (p.engines as { node: string }).node))
      .map(([name, p]) => `${name}@${p.version}: node ${(p.engines as { node: string }).node}`);
    expect(conflicts).toEqual([]);
    expect(semver.satisfies(process.version, ours)).toBe(true); // this machine's Node is one of them
    expect(semver.satisfies('20.19.0', ours)).toBe(true); // Node 20 keeps working
  });

  it('cookie (under fastify\'s light-my-request) is the Node-18+ release and still sets the cookies inject() sends', async () => {
    expect(lock.packages['node_modules/light-my-request/node_modules/cookie']?.version ?? lock.packages['node_modules/cookie']?.version).toBe('1.1.1');
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const inject = require('light-my-request') as (
      handler: (req: { headers: Record<string, string> }, res: { end(s: string): void }) => void,
      opts: { url: string; cookies: Record<string, string> },
    ) => Promise<{ payload: string }>;
    const res = await inject((req, res) => res.end(req.headers.cookie ?? ''), { url: '/', cookies: { a: 'b c', d: 'e' } });
    expect(res.payload).toBe('a=b%20c; d=e');
  });
});

describe('the first run without native backends', () => {
  it('says once, on stderr, which backend runs and how to get the native one; --quiet and MISTRAL_BACKEND say nothing', { timeout: 360_000 }, async () => {
    const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'mistral-cache-'));
    const env = cliEnv({ XDG_CACHE_HOME: cache });
    delete env.MISTRAL_BACKEND;
    delete env.CI;
    delete env.MISTRAL_NO_BACKEND_NOTE;
    const marker = backendNoteMarker(env);
    expect(marker.startsWith(cache)).toBe(true);
    const args = ['generate', TINY, '-p', 'hi', '-n', '1'];

    const quiet = await runCli([...args, '--quiet'], { env });
    expect(quiet.code, describeRun(quiet)).toBe(0);
    expect(quiet.stderr).toBe('');
    // A backend chosen on purpose, or CI: nothing said, nothing marked (in-process, same function).
    const write = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    try {
      maybeNoteBackend(args, { ...env, MISTRAL_BACKEND: 'wasm' });
      maybeNoteBackend([...args, '--backend', 'wasm'], env);
      maybeNoteBackend(args, { ...env, CI: 'true' });
      expect(write).not.toHaveBeenCalled();
    } finally {
      write.mockRestore();
    }
    expect(fs.existsSync(marker)).toBe(false);

    const first = await runCli(args, { env });
    const second = await runCli(args, { env });
    expect(first.code, describeRun(first)).toBe(0);
    expect(second.code, describeRun(second)).toBe(0);
    expect(second.stderr).not.toContain('note:');
    if (nativeBackendInstalled()) {
      expect(first.stderr).not.toContain('note:'); // nothing to say where the native backend is there
    } else {
      const notes = first.stderr.split('\n').filter((l) => l.startsWith('note:'));
      expect(notes, describeRun(first)).toHaveLength(2);
      expect(notes[0]).toMatch(/runs on the wasm backend.*@tensorflow\/tfjs-node.*optional dependencies.*libtensorflow/);
      expect(notes[1]).toContain('npm install @tensorflow/tfjs-node');
      expect(first.stderr).toContain('backend: wasm'); // and it is the backend that ran
      expect(fs.existsSync(marker)).toBe(true);
    }
  });
});
