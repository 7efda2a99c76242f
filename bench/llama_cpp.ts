/**
 * node-llama-cpp (llama.cpp's Node binding) beside the port, on the very same weights: what the
 * benchmark needs to run it without making it a dependency of the project.
 *
 * - ensureNodeLlamaCpp(): node-llama-cpp NODE_LLAMA_CPP_VERSION and its prebuilt CPU binary for this
 *   platform, installed with npm into $TMPDIR/mistral-ts-llama-cpp (reused by later runs), never into
 *   the project. Install scripts are not run and the binding is loaded with `build: 'never'`, so
 *   llama.cpp is never built from source; only the CPU package is installed (no CUDA/Vulkan). Any
 *   failure is a one-line reason the benchmark prints before going on.
 * - llamaCppModelFolder(): the model folder llama.cpp can load. llama.cpp requires as many tokenizer
 *   tokens as embedding rows; the benchmark's small model has the tiny fixture's 512-piece tokenizer
 *   beside a 32000-row embedding, so it gets a folder of links to the same weight files with the
 *   tokenizer padded by unused pieces (the benchmark feeds token ids; the tokenizer plays no part).
 * - ggufOf(): the model written as F16 or Q8_0 GGUF by the project's own `convert` command, cached
 *   under $TMPDIR/mistral-ts-bench/gguf by model path, file sizes and mtimes, and type.
 *
 * The child that loads a GGUF and times it is bench/llama_cpp_child.ts; run.ts compares.
 */
import { spawnSync } from 'child_process';
import { createHash } from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parseModelProto } from '../tokenizer/model_proto';
import { BENCH_DIR, REPO } from './common';
import { isAlive } from '../runtime/processes';

/** The pinned version: prebuilt linux-x64/arm64, macOS x64 and Windows CPU binaries; Node >= 20. */
export const NODE_LLAMA_CPP_VERSION = '3.22.1';

/** Where node-llama-cpp is installed (a cache: reused by later runs, never inside the repository). */
export const LLAMA_CPP_DIR = path.join(os.tmpdir(), 'mistral-ts-llama-cpp');

/** node-llama-cpp's package of prebuilt CPU binaries for a platform, or null when it has none. */
export function prebuiltPackage(platform: string = process.platform, arch: string = process.arch): string | null {
  const names: Record<string, string> = {
    'linux-x64': 'linux-x64',
    'linux-arm64': 'linux-arm64',
    'linux-arm': 'linux-armv7l',
    'darwin-x64': 'mac-x64',
    'win32-x64': 'win-x64',
    'win32-arm64': 'win-arm64',
  };
  const name = names[`${platform}-${arch}`];
  return name === undefined ? null : `@node-llama-cpp/${name}`;
}

/** What a child reports (bench/llama_cpp_child.ts). */
export interface LlamaCppResult {
  side: 'node-llama-cpp';
  version: string;
  llamaCppRelease: string;
  systemInfo: string;
  file: string;
  fileBytes: number;
  threads: number;
  contextSize: number;
  batchSize: number;
  /** Seconds to load the binding (getLlama), apart from loadS as the port's backend start is. */
  bindingS: number;
  /** Seconds to load the model (the weights read into memory). */
  loadS: number;
  runs: { prefillS: number; decodeS: number }[];
  peakRssBytes: number;
  loadavg: number[];
}

/** What the probe (the child with --probe) reports: the binding loads, CPU only. */
export interface LlamaCppProbe {
  side: 'node-llama-cpp-probe';
  version: string;
  gpu: string | false;
  buildType: string;
}

export type Ready = { dir: string; version: string } | { reason: string };

export interface InstallOptions {
  /** The install folder (default LLAMA_CPP_DIR). */
  dir?: string;
  /** The npm command and its leading arguments (default: the npm running `npm run`, else `npm`). */
  npm?: string[];
  /** The check that the installed binding loads; returns null or a one-line reason. */
  probe?: (dir: string) => string | null;
  timeoutMs?: number;
  /** Progress lines (default: stderr). */
  log?: (line: string) => void;
}

/** One line from a failed command's output: the npm error code where there is one, and the last message. */
export function oneLineReason(what: string, result: { status: number | null; signal?: string | null; error?: Error; stdout?: string; stderr?: string }, timeoutMs?: number): string {
  const err = result.error as NodeJS.ErrnoException | undefined;
  if (err?.code === 'ETIMEDOUT') return `${what} timed out after ${Number(((timeoutMs ?? 0) / 1000).toFixed(1))} s`;
  if (err) return `${what} failed to start (${err.code ?? err.message})`;
  const lines = `${result.stderr ?? ''}\n${result.stdout ?? ''}`
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/complete log of this run|^npm (error|ERR!)\s*$/i.test(l));
  const code = lines.map((l) => /^npm (?:error|ERR!) code (\S+)/i.exec(l)?.[1]).find((c) => c !== undefined);
  const messages = lines.filter((l) => !/^npm (?:error|ERR!) (code|syscall|errno|path|dest)\b/i.test(l));
  const last = (messages.pop() ?? lines.pop() ?? '').replace(/^npm (?:error|ERR!)\s*/i, '');
  const status = result.signal ? `signal ${result.signal}` : `exit ${result.status}`;
  const line = `${what} failed (${status}${code ? `, ${code}` : ''})${last ? `: ${last}` : ''}`;
  return line.length > 300 ? `${line.slice(0, 297)}...` : line;
}

/** The environment for npm: no npm_* variables of an enclosing `npm run` (they name the project). */
function installEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^npm_/i.test(k)) env[k] = v;
  // node-llama-cpp's own switches: no postinstall, no download of llama.cpp's source.
  env.NODE_LLAMA_CPP_SKIP_DOWNLOAD = 'true';
  env.NODE_LLAMA_CPP_POSTINSTALL = 'skip';
  return env;
}

function defaultNpm(): string[] {
  const cli = process.env.npm_execpath;
  return cli && /npm-cli\.js$/.test(cli) && fs.existsSync(cli) ? [process.execPath, cli] : ['npm'];
}

const installedVersion = (dir: string): string | null => {
  try {
    return (JSON.parse(fs.readFileSync(path.join(dir, 'node_modules', 'node-llama-cpp', 'package.json'), 'utf8')) as { version?: string }).version ?? null;
  } catch {
    return null;
  }
};

const COMPLETE = '.complete';

/** Runs the child in --probe mode: the binding loads from `dir`, prebuilt, CPU only. */
export function probeNodeLlamaCpp(dir: string): string | null {
  const register = require.resolve('ts-node/register/transpile-only');
  const r = spawnSync(process.execPath, ['-r', register, path.join(REPO, 'bench', 'llama_cpp_child.ts'), '--dir', dir, '--probe'], {
    cwd: REPO,
    encoding: 'utf8',
    timeout: 120_000,
  });
  if (r.status === 0 && !r.error) return null;
  return oneLineReason('loading node-llama-cpp', r, 120_000);
}

/**
 * node-llama-cpp, installed on first use into `dir` (a staging folder renamed into place once the
 * install and the probe succeeded, so a folder there is complete). Returns the folder, or a one-line
 * reason why it cannot run here. BENCH_SKIP_LLAMA_CPP=1 skips it.
 */
export function ensureNodeLlamaCpp(opts: InstallOptions = {}): Ready {
  if (process.env.BENCH_SKIP_LLAMA_CPP === '1') return { reason: 'BENCH_SKIP_LLAMA_CPP=1' };
  const dir = opts.dir ?? LLAMA_CPP_DIR;
  const log = opts.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const binary = prebuiltPackage();
  if (binary === null) return { reason: `no prebuilt CPU binary of node-llama-cpp for ${process.platform}-${process.arch} (and the benchmark never builds llama.cpp)` };
  const [major] = process.versions.node.split('.').map(Number);
  if (major < 20) return { reason: `node-llama-cpp ${NODE_LLAMA_CPP_VERSION} needs Node 20 or later (this is ${process.version})` };

  if (fs.existsSync(path.join(dir, COMPLETE)) && installedVersion(dir) === NODE_LLAMA_CPP_VERSION) return { dir, version: NODE_LLAMA_CPP_VERSION };
  // Anything else there is an older version or an interrupted install: replaced below.

  fs.mkdirSync(path.dirname(dir), { recursive: true });
  // Staging folders of installs killed half-way (an hour old: not one running now) go.
  for (const f of fs.readdirSync(path.dirname(dir))) {
    const old = path.join(path.dirname(dir), f);
    if (f.startsWith(`${path.basename(dir)}.installing-`) && Date.now() - fs.statSync(old).mtimeMs > 3600_000) fs.rmSync(old, { recursive: true, force: true });
  }
  const staging = fs.mkdtempSync(`${dir}.installing-`);
  try {
    fs.writeFileSync(
      path.join(staging, 'package.json'),
      JSON.stringify({ name: 'mistral-ts-llama-cpp', private: true, description: "npm run bench's copy of node-llama-cpp (a cache)", dependencies: { 'node-llama-cpp': NODE_LLAMA_CPP_VERSION, [binary]: NODE_LLAMA_CPP_VERSION } }, null, 2),
    );
    const [command, ...pre] = opts.npm ?? defaultNpm();
    const args = [...pre, 'install', '--prefix', staging, '--ignore-scripts', '--omit=optional', '--no-audit', '--no-fund', '--loglevel=error'];
    const timeoutMs = opts.timeoutMs ?? 600_000;
    log(`node-llama-cpp: installing ${NODE_LLAMA_CPP_VERSION} and ${binary} into ${dir} (once; npm ${args.slice(pre.length).join(' ')})`);
    const r = spawnSync(command, args, { cwd: staging, env: installEnv(), encoding: 'utf8', timeout: timeoutMs });
    if (r.status !== 0 || r.error) return { reason: oneLineReason(`npm install node-llama-cpp@${NODE_LLAMA_CPP_VERSION}`, r, timeoutMs) };
    const got = installedVersion(staging);
    if (got !== NODE_LLAMA_CPP_VERSION) return { reason: `npm install gave node-llama-cpp ${got ?? '(nothing)'}, expected ${NODE_LLAMA_CPP_VERSION}` };
    if (!fs.existsSync(path.join(staging, 'node_modules', ...binary.split('/'), 'package.json'))) return { reason: `npm install did not install ${binary} (its prebuilt binary)` };
    const failed = (opts.probe ?? probeNodeLlamaCpp)(staging);
    if (failed !== null) return { reason: failed };
    fs.writeFileSync(path.join(staging, COMPLETE), `${NODE_LLAMA_CPP_VERSION}\n`);
    fs.rmSync(dir, { recursive: true, force: true });
    try {
      fs.renameSync(staging, dir);
    } catch (err) {
      // Another benchmark finished the same install first: use its folder.
      if (!(fs.existsSync(path.join(dir, COMPLETE)) && installedVersion(dir) === NODE_LLAMA_CPP_VERSION)) throw err;
    }
    return { dir, version: NODE_LLAMA_CPP_VERSION };
  } catch (err) {
    return { reason: `installing node-llama-cpp into ${dir}: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}` };
  } finally {
    fs.rmSync(staging, { recursive: true, force: true });
  }
}

/** The varint of protobuf's wire format. */
function varint(v: number): number[] {
  const out: number[] = [];
  while (v > 127) {
    out.push((v & 127) | 128);
    v >>>= 7;
  }
  out.push(v);
  return out;
}

/**
 * A SentencePiece .model's bytes with UNUSED pieces "<unused_N>" appended up to `count` pieces:
 * protobuf lets repeated fields (ModelProto.pieces, field 1) continue after the others.
 */
export function padTokenizer(bytes: Uint8Array, count: number, file = 'tokenizer.model'): Uint8Array {
  const have = parseModelProto(bytes, file).pieces.length;
  const parts: Uint8Array[] = [bytes];
  for (let id = have; id < count; id++) {
    const piece = Buffer.from(`<unused_${id}>`, 'utf8');
    const score = Buffer.alloc(4);
    score.writeFloatLE(0);
    // SentencePiece { 1: piece, 2: score, 3: type = UNUSED (5) }
    const body = Buffer.concat([Buffer.from([0x0a, ...varint(piece.length)]), piece, Buffer.from([0x15]), score, Buffer.from([0x18, 5])]);
    parts.push(Buffer.from([0x0a, ...varint(body.length)]), body);
  }
  return Buffer.concat(parts);
}

const shortHash = (s: string): string => createHash('sha256').update(s).digest('hex').slice(0, 12);

/**
 * The model as llama.cpp can load it: the folder itself, or (where its tokenizer has fewer pieces
 * than params.json's vocab_size) a folder under `cacheDir` of links to its files with a padded
 * tokenizer.model. Returns the folder and a note saying what was done, or null for none.
 */
export function llamaCppModelFolder(model: string, cacheDir = path.join(BENCH_DIR, 'llama-cpp-models')): { folder: string; note: string | null } {
  const src = path.resolve(model);
  const tokenizer = path.join(src, 'tokenizer.model');
  const params = path.join(src, 'params.json');
  if (!fs.statSync(src).isDirectory() || !fs.existsSync(tokenizer) || !fs.existsSync(params)) return { folder: src, note: null };
  const vocab = (JSON.parse(fs.readFileSync(params, 'utf8')) as { vocab_size?: number }).vocab_size;
  const bytes = fs.readFileSync(tokenizer);
  const have = parseModelProto(bytes, tokenizer).pieces.length;
  if (typeof vocab !== 'number' || have >= vocab) return { folder: src, note: null };

  const folder = path.join(cacheDir, `${path.basename(src)}-${shortHash(src)}`);
  fs.mkdirSync(folder, { recursive: true });
  const names = fs.readdirSync(src).filter((f) => f !== 'tokenizer.model' && fs.statSync(path.join(src, f)).isFile());
  for (const f of fs.readdirSync(folder)) if (f !== 'tokenizer.model' && !names.includes(f)) fs.rmSync(path.join(folder, f), { force: true });
  for (const f of names) {
    const link = path.join(folder, f);
    const target = path.join(src, f);
    if (fs.lstatSync(link, { throwIfNoEntry: false })?.isSymbolicLink() && fs.readlinkSync(link) === target) continue;
    fs.rmSync(link, { force: true });
    fs.symlinkSync(target, link);
  }
  const padded = padTokenizer(bytes, vocab, tokenizer);
  const out = path.join(folder, 'tokenizer.model');
  // Rewritten only when it changes, so its mtime (part of the GGUF's cache key) stays put.
  if (!fs.existsSync(out) || !fs.readFileSync(out).equals(Buffer.from(padded))) {
    fs.writeFileSync(`${out}.partial`, padded);
    fs.renameSync(`${out}.partial`, out);
  }
  return {
    folder,
    note: `its tokenizer (${have} pieces) padded with unused pieces to vocab_size ${vocab} in ${folder}, which links to the same weight files: llama.cpp requires as many tokens as embedding rows`,
  };
}

export type GgufType = 'f16' | 'q8_0';

export interface GgufOptions {
  /** Where the GGUF files are kept (default $BENCH_DIR/gguf). */
  cacheDir?: string;
  /**
   * Writes the model as `type` GGUF at `out` (default: the project's convert command, in a child);
   * may return the seconds the conversion itself took (without the command's start).
   */
  convert?: (model: string, out: string, type: GgufType) => number | void;
}

export interface Gguf {
  file: string;
  /** Whether it was written now (false: reused from an earlier run). */
  converted: boolean;
  /** Wall seconds of the conversion, the command's start included (0 when reused). */
  seconds: number;
  /** Seconds the conversion itself took, as convert reports them (else `seconds`). */
  convertS: number;
  /** Bytes of the model's weight files (what convert read). */
  inputBytes: number;
}

/** The model's files (the file itself, or the regular files of its folder, links followed), with sizes and mtimes. */
function modelFiles(model: string): { name: string; size: number; mtimeMs: number }[] {
  const stat = fs.statSync(model);
  if (!stat.isDirectory()) return [{ name: path.basename(model), size: stat.size, mtimeMs: stat.mtimeMs }];
  return fs
    .readdirSync(model)
    .sort()
    .map((name) => ({ name, stat: fs.statSync(path.join(model, name), { throwIfNoEntry: false }) }))
    .filter((f) => f.stat?.isFile())
    .map((f) => ({ name: f.name, size: f.stat!.size, mtimeMs: f.stat!.mtimeMs }));
}

/** The cache's file name of `model` as `type`: a stem per model path and type, a key of its files' sizes and mtimes. */
export function ggufCacheName(model: string, type: GgufType): { stem: string; name: string } {
  const src = path.resolve(model);
  const stem = `${path.basename(src).replace(/[^\w.-]/g, '_')}-${shortHash(src)}-${type}`;
  return { stem, name: `${stem}-${shortHash(JSON.stringify(modelFiles(src)))}.gguf` };
}

function projectConvert(model: string, out: string, type: GgufType): number | void {
  const register = require.resolve('ts-node/register/transpile-only');
  const r = spawnSync(process.execPath, ['-r', register, path.join(REPO, 'one_file_ref.ts'), 'convert', model, '--out', out, '--type', type], {
    cwd: REPO,
    stdio: ['ignore', 'inherit', 'pipe'],
    encoding: 'utf8',
  });
  if (r.stderr) process.stderr.write(r.stderr.split('\n').filter(Boolean).map((l) => `  ${l}\n`).join(''));
  if (r.status !== 0 || r.error) throw new Error(oneLineReason(`convert ${model} --type ${type}`, r));
  // "wrote FILE: 39 tensors, F16, 93.8 MB in 1.3 s"
  const took = /^wrote .* in ([\d.]+) s$/m.exec(r.stderr ?? '');
  if (took) return Number(took[1]);
}


/**
 * `model` written as `type` GGUF by the project's writer, in the cache: reused when a file of the
 * same model path, files (sizes, mtimes) and type is there, else written under a temporary name and
 * renamed into place (so a file under the final name is complete), replacing older versions.
 */
export function ggufOf(model: string, type: GgufType, opts: GgufOptions = {}): Gguf {
  const cacheDir = opts.cacheDir ?? path.join(BENCH_DIR, 'gguf');
  fs.mkdirSync(cacheDir, { recursive: true });
  const { stem, name } = ggufCacheName(model, type);
  const file = path.join(cacheDir, name);
  const files = modelFiles(path.resolve(model));
  // What convert reads: the consolidated file the loader prefers, else every file but the tokenizer and params.
  const consolidated = files.find((f) => f.name === 'consolidated.00.pth') ?? files.find((f) => f.name === 'consolidated.safetensors');
  const inputBytes = consolidated?.size ?? files.filter((f) => !/^(tokenizer|params)/.test(f.name)).reduce((n, f) => n + f.size, 0);
  if (fs.existsSync(file)) return { file, converted: false, seconds: 0, convertS: 0, inputBytes };

  // Older versions of this model and type, and temporary files of runs no longer alive, go.
  for (const f of fs.readdirSync(cacheDir)) {
    if (!f.startsWith(`${stem}-`)) continue;
    const tmp = /\.(\d+)\.tmp\.gguf(\.partial)?$/.exec(f);
    if (tmp === null ? f !== name : !isAlive(Number(tmp[1]))) fs.rmSync(path.join(cacheDir, f), { force: true });
  }
  const tmp = path.join(cacheDir, `${name.replace(/\.gguf$/, '')}.${process.pid}.tmp.gguf`);
  const t0 = performance.now();
  let convertS: number | void;
  try {
    convertS = (opts.convert ?? projectConvert)(path.resolve(model), tmp, type);
    if (!fs.existsSync(tmp)) throw new Error(`convert wrote no ${tmp}`);
    fs.renameSync(tmp, file);
  } finally {
    fs.rmSync(tmp, { force: true });
    fs.rmSync(`${tmp}.partial`, { force: true });
  }
  const seconds = (performance.now() - t0) / 1000;
  return { file, converted: true, seconds, convertS: typeof convertS === 'number' ? convertS : seconds, inputBytes };
}
