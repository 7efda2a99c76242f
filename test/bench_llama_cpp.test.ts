/**
 * The benchmark's node-llama-cpp plumbing (bench/llama_cpp.ts, bench/llama_cpp_child.ts), without
 * node-llama-cpp and without the network: the GGUF cache (reused while the model's files are the
 * same, rewritten when they change, never left half-written), the install's one-line reasons (npm
 * injected), the padded tokenizer the small model needs, and the child against a stand-in
 * node-llama-cpp that records what it is asked (CPU, prebuilt only, the port's prompt ids, the
 * number of steps).
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ensureNodeLlamaCpp, ggufOf, llamaCppModelFolder, NODE_LLAMA_CPP_VERSION, oneLineReason, padTokenizer, prebuiltPackage, probeNodeLlamaCpp } from '../bench/llama_cpp';
import { promptIds, RESULT_MARKER } from '../bench/common';
import { parseModelProto, PieceType } from '../tokenizer/model_proto';
import { SentencePieceProcessor } from '../tokenizer';
import { tempFolder } from './temp_files';

const ROOT = path.resolve(__dirname, '..');
const TINY_TOKENIZER = path.join(ROOT, 'fixtures', 'tiny', 'tokenizer.model');
const tmp = tempFolder('bench-llama-cpp-');

/** A model folder: params.json, a weights file and the tiny tokenizer. */
function modelFolder(vocab = 512): string {
  const dir = tmp.path('model');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'params.json'), JSON.stringify({ vocab_size: vocab }));
  fs.writeFileSync(path.join(dir, 'consolidated.safetensors'), Buffer.alloc(1000, 7));
  fs.copyFileSync(TINY_TOKENIZER, path.join(dir, 'tokenizer.model'));
  return dir;
}

describe('ggufOf: the cache of GGUF files', () => {
  it('converts once, reuses the file while the model is the same, converts again when a file changes', () => {
    const model = modelFolder();
    const cacheDir = tmp.path('cache');
    const calls: string[] = [];
    const convert = (m: string, out: string, type: string): number => {
      calls.push(`${m} ${type}`);
      fs.writeFileSync(out, `gguf of ${type}`);
      return 0.5;
    };
    const first = ggufOf(model, 'q8_0', { cacheDir, convert });
    expect(first).toMatchObject({ converted: true, convertS: 0.5, inputBytes: 1000 });
    expect(fs.readFileSync(first.file, 'utf8')).toBe('gguf of q8_0');
    expect(ggufOf(model, 'q8_0', { cacheDir, convert })).toMatchObject({ file: first.file, converted: false });
    expect(calls).toHaveLength(1);
    // Another type is another file; both stay.
    const f16 = ggufOf(model, 'f16', { cacheDir, convert });
    expect(f16.file).not.toBe(first.file);
    expect(calls).toHaveLength(2);

    // The weights rewritten (new mtime): converted again, the older q8_0 file removed, the f16 kept.
    const weights = path.join(model, 'consolidated.safetensors');
    fs.utimesSync(weights, new Date(), new Date(Date.now() + 5000));
    const second = ggufOf(model, 'q8_0', { cacheDir, convert });
    expect(second).toMatchObject({ converted: true });
    expect(second.file).not.toBe(first.file);
    expect(fs.existsSync(first.file)).toBe(false);
    expect(fs.readdirSync(cacheDir).sort()).toEqual([path.basename(f16.file), path.basename(second.file)].sort());
  });

  it('a conversion that fails, or stops half-way, leaves nothing under the final name and no temporary file', () => {
    const model = modelFolder();
    const cacheDir = tmp.path('cache');
    const failing = (_m: string, out: string): void => {
      fs.writeFileSync(`${out}.partial`, 'half a file'); // as convert writes before its rename
      fs.writeFileSync(out, 'half a file');
      throw new Error('disk full');
    };
    expect(() => ggufOf(model, 'f16', { cacheDir, convert: failing })).toThrow('disk full');
    expect(fs.readdirSync(cacheDir)).toEqual([]);
    // A temporary file of a run that died (a pid not alive) is cleared by the next conversion.
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }).stdout;
    const stale = path.join(cacheDir, `${path.basename(ggufOf(model, 'f16', { cacheDir, convert: (_m, out) => fs.writeFileSync(out, 'x') }).file, '.gguf')}.${dead}.tmp.gguf`);
    fs.writeFileSync(stale, 'left by a killed run');
    fs.utimesSync(path.join(model, 'params.json'), new Date(), new Date(Date.now() + 9000));
    ggufOf(model, 'f16', { cacheDir, convert: (_m, out) => fs.writeFileSync(out, 'y') });
    expect(fs.existsSync(stale)).toBe(false);
    expect(fs.readdirSync(cacheDir)).toHaveLength(1);
  });

  it('a convert that writes nothing is an error, not a cached empty file', () => {
    const cacheDir = tmp.path('cache');
    expect(() => ggufOf(modelFolder(), 'f16', { cacheDir, convert: () => undefined })).toThrow(/convert wrote no/);
    expect(fs.readdirSync(cacheDir)).toEqual([]);
  });
});

describe('ensureNodeLlamaCpp: a one-line reason when it cannot install', () => {
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env.BENCH_SKIP_LLAMA_CPP;
    delete process.env.BENCH_SKIP_LLAMA_CPP;
  });
  afterEach(() => {
    if (saved === undefined) delete process.env.BENCH_SKIP_LLAMA_CPP;
    else process.env.BENCH_SKIP_LLAMA_CPP = saved;
  });
  const quiet = (): void => undefined;
  /** An "npm" that prints `stderr` and exits with `code`, or runs `script` in the install folder (--prefix). */
  const fakeNpm = (script: string): string[] => [process.execPath, '-e', script];

  it('no network: the npm error code and message on one line, nothing left behind', () => {
    const dir = tmp.path('nlc');
    // A staging folder of an install killed two hours ago goes; one of a minute ago may be running: it stays.
    const killed = `${dir}.installing-old`;
    const running = `${dir}.installing-new`;
    fs.mkdirSync(killed);
    fs.mkdirSync(running);
    fs.utimesSync(killed, new Date(), new Date(Date.now() - 2 * 3600_000));
    fs.utimesSync(running, new Date(), new Date(Date.now() - 60_000));
    const npm = fakeNpm(`
      console.error('npm error code ENOTFOUND');
      console.error('npm error syscall getaddrinfo');
      console.error('npm error errno ENOTFOUND');
      console.error('npm error network request to https://registry.npmjs.org/node-llama-cpp failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org');
      console.error('npm error A complete log of this run can be found in: /root/.npm/_logs/x.log');
      process.exit(1);`);
    const got = ensureNodeLlamaCpp({ dir, npm, log: quiet, probe: () => null });
    expect(got).toEqual({
      reason: `npm install node-llama-cpp@${NODE_LLAMA_CPP_VERSION} failed (exit 1, ENOTFOUND): network request to https://registry.npmjs.org/node-llama-cpp failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org`,
    });
    expect(fs.existsSync(dir)).toBe(false);
    expect(fs.readdirSync(path.dirname(dir)).filter((f) => f.includes('installing'))).toEqual([path.basename(running)]);
    fs.rmSync(running, { recursive: true });
  });

  it('npm missing, or one that hangs, or one that installs nothing: each a one-line reason', () => {
    const dir = tmp.path('nlc');
    const missing = ensureNodeLlamaCpp({ dir, npm: [path.join(tmp.dir, 'no-such-npm')], log: quiet, probe: () => null });
    expect(missing).toEqual({ reason: `npm install node-llama-cpp@${NODE_LLAMA_CPP_VERSION} failed to start (ENOENT)` });
    const hangs = ensureNodeLlamaCpp({ dir, npm: fakeNpm('setTimeout(() => {}, 60000)'), timeoutMs: 300, log: quiet, probe: () => null });
    expect(hangs).toEqual({ reason: `npm install node-llama-cpp@${NODE_LLAMA_CPP_VERSION} timed out after 0.3 s` });
    const nothing = ensureNodeLlamaCpp({ dir, npm: fakeNpm(''), log: quiet, probe: () => null });
    expect(nothing).toEqual({ reason: `npm install gave node-llama-cpp (nothing), expected ${NODE_LLAMA_CPP_VERSION}` });
    expect(fs.existsSync(dir)).toBe(false);
  });

  /** An "npm install --prefix P" that puts node-llama-cpp `version` (and, if `binary`, its CPU package) under P. */
  const installs = (version: string, binary: boolean): string[] =>
    fakeNpm(`
      const fs = require('fs'), path = require('path');
      const args = process.argv.slice(1);
      if (!args.includes('--ignore-scripts') || !args.includes('--omit=optional')) { console.error('expected --ignore-scripts --omit=optional'); process.exit(2); }
      if (Object.keys(process.env).some((k) => /^npm_/i.test(k))) { console.error('npm_* variables leaked'); process.exit(3); }
      if (process.env.NODE_LLAMA_CPP_SKIP_DOWNLOAD !== 'true') { console.error('NODE_LLAMA_CPP_SKIP_DOWNLOAD not set'); process.exit(4); }
      const prefix = args[args.indexOf('--prefix') + 1];
      const pkg = JSON.parse(fs.readFileSync(path.join(prefix, 'package.json'), 'utf8'));
      const put = (name, v) => { const d = path.join(prefix, 'node_modules', ...name.split('/')); fs.mkdirSync(d, { recursive: true }); fs.writeFileSync(path.join(d, 'package.json'), JSON.stringify({ name, version: v })); };
      put('node-llama-cpp', ${JSON.stringify(version)});
      if (${binary}) for (const name of Object.keys(pkg.dependencies)) if (name.startsWith('@node-llama-cpp/')) put(name, pkg.dependencies[name]);`);

  it('installed but the binding does not load: the probe\'s reason; nothing kept', () => {
    const dir = tmp.path('nlc');
    process.env.npm_config_local_prefix = ROOT; // as `npm run bench` sets it: must not reach the install
    try {
      const got = ensureNodeLlamaCpp({ dir, npm: installs(NODE_LLAMA_CPP_VERSION, true), log: quiet, probe: () => 'loading node-llama-cpp failed (exit 1): error: no prebuilt binary' });
      expect(got).toEqual({ reason: 'loading node-llama-cpp failed (exit 1): error: no prebuilt binary' });
    } finally {
      delete process.env.npm_config_local_prefix;
    }
    expect(fs.existsSync(dir)).toBe(false);
    expect(ensureNodeLlamaCpp({ dir, npm: installs('3.0.0', true), log: quiet, probe: () => null })).toEqual({ reason: `npm install gave node-llama-cpp 3.0.0, expected ${NODE_LLAMA_CPP_VERSION}` });
    expect(ensureNodeLlamaCpp({ dir, npm: installs(NODE_LLAMA_CPP_VERSION, false), log: quiet, probe: () => null })).toEqual({
      reason: `npm install did not install ${prebuiltPackage()} (its prebuilt binary)`,
    });
  });

  it('installed and loading: kept, and a later run reuses it without npm; BENCH_SKIP_LLAMA_CPP=1 skips it', () => {
    const dir = tmp.path('nlc');
    expect(ensureNodeLlamaCpp({ dir, npm: installs(NODE_LLAMA_CPP_VERSION, true), log: quiet, probe: () => null })).toEqual({ dir, version: NODE_LLAMA_CPP_VERSION });
    expect(ensureNodeLlamaCpp({ dir, npm: fakeNpm('process.exit(1)'), log: quiet, probe: () => 'not called' })).toEqual({ dir, version: NODE_LLAMA_CPP_VERSION });
    process.env.BENCH_SKIP_LLAMA_CPP = '1';
    expect(ensureNodeLlamaCpp({ dir, log: quiet })).toEqual({ reason: 'BENCH_SKIP_LLAMA_CPP=1' });
  });

  it('oneLineReason: a signal, and a long message cut to one short line', () => {
    expect(oneLineReason('x', { status: null, signal: 'SIGKILL', stderr: 'Killed\n' })).toBe('x failed (signal SIGKILL): Killed');
    const long = oneLineReason('x', { status: 1, stderr: `${'e'.repeat(1000)}\n` });
    expect(long).toHaveLength(300);
    expect(long).not.toContain('\n');
  });
});

describe('the small model for llama.cpp: its tokenizer padded to vocab_size', () => {
  it('padTokenizer: SentencePiece itself reads the result; the original pieces and their encoding are unchanged', async () => {
    const bytes = fs.readFileSync(TINY_TOKENIZER);
    const padded = padTokenizer(bytes, 700);
    const { pieces } = parseModelProto(padded, 'padded');
    expect(pieces).toHaveLength(700);
    expect(pieces.slice(0, 512)).toEqual(parseModelProto(bytes, 'tiny').pieces);
    expect(pieces.slice(512).every((p, i) => p.type === PieceType.UNUSED && p.piece === `<unused_${512 + i}>`)).toBe(true);
    const [a, b] = [await SentencePieceProcessor.loadBytes(bytes, 'tiny'), await SentencePieceProcessor.loadBytes(padded, 'padded')];
    expect(b.vocabSize).toBe(700);
    const text = 'Once upon a time, a little dog <unused_600> ran.';
    expect(b.encode(text)).toEqual(a.encode(text));
    expect(padTokenizer(bytes, 512)).toEqual(bytes);
  });

  it('llamaCppModelFolder: links to the same files with the padded tokenizer; the folder itself when the sizes agree', () => {
    const same = modelFolder(512);
    expect(llamaCppModelFolder(same, tmp.path('links'))).toEqual({ folder: same, note: null });
    const model = modelFolder(600);
    const cache = tmp.path('links');
    const { folder, note } = llamaCppModelFolder(model, cache);
    expect(note).toMatch(/512 pieces\) padded .* to vocab_size 600/);
    expect(fs.readlinkSync(path.join(folder, 'consolidated.safetensors'))).toBe(path.join(model, 'consolidated.safetensors'));
    expect(fs.readlinkSync(path.join(folder, 'params.json'))).toBe(path.join(model, 'params.json'));
    expect(parseModelProto(fs.readFileSync(path.join(folder, 'tokenizer.model')), 't').pieces).toHaveLength(600);
    // Made again: the tokenizer is not rewritten (its mtime is part of the GGUF's cache key).
    const mtime = fs.statSync(path.join(folder, 'tokenizer.model')).mtimeMs;
    fs.utimesSync(path.join(folder, 'tokenizer.model'), new Date(), new Date(mtime - 60_000));
    const before = fs.statSync(path.join(folder, 'tokenizer.model')).mtimeMs;
    expect(llamaCppModelFolder(model, cache).folder).toBe(folder);
    expect(fs.statSync(path.join(folder, 'tokenizer.model')).mtimeMs).toBe(before);
  });
});

describe('the child against a stand-in node-llama-cpp', () => {
  /** A folder with a fake ESM node-llama-cpp whose getLlama runs `body` (it may record into LOG). */
  function fakeInstall(getLlama: string): { dir: string; log: string } {
    const dir = tmp.path('fake-nlc');
    const pkg = path.join(dir, 'node_modules', 'node-llama-cpp');
    fs.mkdirSync(path.join(pkg, 'dist'), { recursive: true });
    fs.writeFileSync(path.join(pkg, 'package.json'), JSON.stringify({ name: 'node-llama-cpp', version: NODE_LLAMA_CPP_VERSION, type: 'module', exports: { '.': { import: './dist/index.js' } } }));
    const log = path.join(dir, 'log.json');
    fs.writeFileSync(path.join(pkg, 'dist', 'index.js'), `import fs from 'fs';\nconst LOG = ${JSON.stringify(log)};\nconst record = (x) => fs.appendFileSync(LOG, JSON.stringify(x) + '\\n');\nexport async function getLlama(options) {\n${getLlama}\n}\n`);
    return { dir, log };
  }
  const child = (args: string[]): ReturnType<typeof spawnSync> =>
    spawnSync(process.execPath, ['-r', require.resolve('ts-node/register/transpile-only'), path.join(ROOT, 'bench', 'llama_cpp_child.ts'), ...args], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
  const records = (log: string): Record<string, unknown>[] => fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);

  it('no binary: the probe gives one line; a GPU build is refused; the options ask for the CPU and a prebuilt binary only', () => {
    const none = fakeInstall(`record(options); throw new Error('NoBinaryFoundError: no prebuilt binary for linux-x64\\n    at getLlama');`);
    expect(probeNodeLlamaCpp(none.dir)).toBe('loading node-llama-cpp failed (exit 1): error: NoBinaryFoundError: no prebuilt binary for linux-x64');
    expect(records(none.log)[0]).toMatchObject({ gpu: false, build: 'never', skipDownload: true });
    const gpu = fakeInstall(`return { gpu: 'vulkan', buildType: 'prebuilt', systemInfo: '', dispose: async () => {} };`);
    expect(probeNodeLlamaCpp(gpu.dir)).toBe('loading node-llama-cpp failed (exit 1): error: node-llama-cpp loaded a vulkan build, expected the CPU one');
  });

  it('a run: the port\'s prompt ids evaluated as ids, one prefill then `decode` steps, a fresh context per rep', () => {
    const { dir, log } = fakeInstall(`
      record({ getLlama: options });
      return { gpu: false, buildType: 'prebuilt', systemInfo: 'CPU : AVX2 = 1 |', dispose: async () => {},
        loadModel: async (o) => { record({ loadModel: o }); return { dispose: async () => {},
          createContext: async (c) => { record({ createContext: c }); let steps = 0; return { contextSize: c.contextSize, batchSize: c.batchSize, currentThreads: c.threads.ideal, dispose: async () => record({ disposed: steps }),
            getSequence: () => ({ evaluate: async function* (tokens, e) { record({ evaluate: tokens, options: e }); for (let t = 100; ; t++) { steps++; yield t; } } }) }; } }; } };`);
    const gguf = tmp.file('model.gguf', Buffer.alloc(123));
    const r = child(['--dir', dir, '--model', gguf, '--prefill', '7', '--decode', '5', '--reps', '2', '--threads', '3']);
    expect(r.status, String(r.stderr)).toBe(0);
    const line = String(r.stdout).split('\n').find((l) => l.startsWith(RESULT_MARKER))!;
    const result = JSON.parse(line.slice(RESULT_MARKER.length)) as Record<string, unknown>;
    expect(result).toMatchObject({ side: 'node-llama-cpp', version: NODE_LLAMA_CPP_VERSION, file: gguf, fileBytes: 123, threads: 3, batchSize: 7, systemInfo: 'CPU : AVX2 = 1 |' });
    expect(result.runs).toHaveLength(2);
    const calls = records(log);
    expect(calls[0]).toMatchObject({ getLlama: { gpu: false, build: 'never', maxThreads: 3 } });
    expect(calls[1]).toMatchObject({ loadModel: { modelPath: gguf, gpuLayers: 0, useMmap: false } });
    // Per rep: a context of at least prefill + decode tokens, batch >= prefill; the prompt ids; 1 + decode tokens taken.
    for (const rep of [0, 1]) {
      const [ctx, evaluate, disposed] = calls.slice(2 + 3 * rep, 5 + 3 * rep);
      expect((ctx.createContext as { contextSize: number }).contextSize).toBeGreaterThanOrEqual(12);
      expect(ctx.createContext).toMatchObject({ batchSize: 7, sequences: 1, threads: { ideal: 3, min: 3 } });
      expect(evaluate).toEqual({ evaluate: promptIds(7), options: { temperature: 0 } });
      expect(disposed).toEqual({ disposed: 6 });
    }
  });
});
