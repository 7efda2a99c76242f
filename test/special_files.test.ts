/**
 * Every loader reads regular files only (issue 10, finding 6: `tokenize /dev/zero` grew to 23 GB):
 * a FIFO, a character device (/dev/zero, through a symbolic link where the loader wants a name) or a
 * folder where a file belongs is a one-line error naming the path and what it is, at once (a FIFO
 * opened for reading would otherwise wait for a writer forever; each test has a 10 s limit), and
 * the files read whole have a size limit checked before anything is allocated.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { PassThrough, Readable } from 'stream';
import { describe, expect, it } from 'vitest';
import { tokenizeCommand } from '../cli/tokenize';
import { CheckpointError } from '../checkpoint/errors';
import { MAX_JSON_BYTES } from '../checkpoint/files';
import { openModel } from '../checkpoint/index';
import { readNpy } from '../checkpoint/npy';
import { openPth } from '../checkpoint/pth';
import { openSafetensors } from '../checkpoint/safetensors';
import { openTar } from '../checkpoint/tar';
import { MAX_MODEL_BYTES, SentencePieceProcessor, TokenizerError } from '../tokenizer/index';
import { caught, tempFolder } from './temp_files';

const ROOT = path.join(__dirname, '..');
const FIXTURES = path.join(ROOT, 'fixtures');
const TINY = path.join(FIXTURES, 'tiny');
const HF = path.join(FIXTURES, 'formats', 'tiny-hf');
const SHARDED = path.join(FIXTURES, 'formats', 'tiny-hf-sharded');
const LIMIT_MS = 10_000;

const { dir: TMP, path: tmpPath } = tempFolder('special-files-test-');

const canMakeFifo = process.platform !== 'win32' && spawnSync('mkfifo', ['--help']).status === 0;
const hasDevZero = fs.existsSync('/dev/zero');

function fifo(): string {
  const file = tmpPath('fifo');
  expect(spawnSync('mkfifo', [file]).status).toBe(0);
  return file;
}

/** A copy of `from` under TMP with `name` replaced by `kind` (a FIFO, or a link to /dev/zero). */
function folderWith(from: string, name: string, kind: 'fifo' | 'zero' | 'folder'): { folder: string; file: string } {
  const folder = tmpPath('model');
  fs.mkdirSync(folder);
  for (const f of fs.readdirSync(from)) fs.copyFileSync(path.join(from, f), path.join(folder, f));
  const file = path.join(folder, name);
  fs.rmSync(file, { force: true });
  if (kind === 'fifo') expect(spawnSync('mkfifo', [file]).status).toBe(0);
  else if (kind === 'zero') fs.symlinkSync('/dev/zero', file);
  else fs.mkdirSync(file);
  return { folder, file };
}

/** A CheckpointError on one line, starting with `file`, saying what it is. */
async function expectNotRegular(fn: () => unknown, file: string, kind: RegExp): Promise<void> {
  const err = await caught(fn);
  expect(err).toBeInstanceOf(CheckpointError);
  expect(err.message).not.toContain('\n');
  expect(err.message.startsWith(`${file}: `)).toBe(true);
  expect(err.message).toMatch(kind);
}

describe.skipIf(!canMakeFifo || !hasDevZero)('checkpoint readers refuse what is not a regular file', () => {
  it('each reader given a FIFO or /dev/zero', { timeout: LIMIT_MS }, async () => {
    for (const [open, what] of [
      [openPth, /a torch\.save checkpoint file/],
      [openSafetensors, /a \.safetensors file/],
      [readNpy, /a \.npy file/],
      [openTar, /a \.tar/],
    ] as const) {
      const f = fifo();
      await expectNotRegular(() => open(f), f, new RegExp(`is a FIFO \\(named pipe\\), expected ${what.source}`));
      await expectNotRegular(() => open('/dev/zero'), '/dev/zero', new RegExp(`is a character device, expected ${what.source}`));
    }
    await expectNotRegular(() => openPth(TMP), TMP, /is a folder, expected a torch\.save checkpoint file/);
  });

  it('openModel given a FIFO or a device', { timeout: LIMIT_MS }, async () => {
    const f = fifo();
    await expectNotRegular(() => openModel(f), f, /is a FIFO \(named pipe\), not a model: expected a model folder or a \.tar/);
    await expectNotRegular(() => openModel('/dev/zero'), '/dev/zero', /is a character device, not a model/);
  });

  it.each([
    ['official folder', 'consolidated.00.pth', TINY],
    ['official folder', 'params.json', TINY],
    ['official folder', 'tokenizer.model', TINY],
    ['HF folder', 'config.json', HF],
    ['HF folder', 'model.safetensors', HF],
    ['sharded HF folder', 'model.safetensors.index.json', SHARDED],
    ['sharded HF folder', 'model-00002-of-00002.safetensors', SHARDED],
  ])('%s with %s a FIFO, a link to /dev/zero, or a folder', { timeout: LIMIT_MS }, async (_label, name, from) => {
    for (const [kind, says] of [
      ['fifo', /is a FIFO \(named pipe\), expected/],
      ['zero', /is a character device, expected/],
      ['folder', /is a folder, expected/],
    ] as const) {
      const { folder, file } = folderWith(from, name, kind);
      await expectNotRegular(() => openModel(folder), file, says);
    }
  });
});

describe('files read whole have a size limit, checked before reading', () => {
  it('a params.json larger than MAX_JSON_BYTES (a sparse file: nothing is read)', async () => {
    const { folder } = folderWith(TINY, 'params.json', 'folder');
    const file = path.join(folder, 'params.json');
    fs.rmdirSync(file);
    fs.closeSync(fs.openSync(file, 'w'));
    fs.truncateSync(file, MAX_JSON_BYTES + 1);
    await expectNotRegular(() => openModel(folder), file, new RegExp(`is ${MAX_JSON_BYTES + 1} bytes, more than the ${MAX_JSON_BYTES} expected of a JSON file`));
  });
});

describe.skipIf(!canMakeFifo || !hasDevZero)('the tokenizer loader', () => {
  async function expectTokenizerError(file: string, problem: RegExp): Promise<void> {
    const err = await caught(() => SentencePieceProcessor.load(file));
    expect(err).toBeInstanceOf(TokenizerError);
    expect(err.message).not.toContain('\n');
    expect(err.message.startsWith(`${file}: `)).toBe(true);
    expect(err.message).toMatch(problem);
  }

  it('refuses /dev/zero, a link to it, a FIFO and a folder, naming the path', { timeout: LIMIT_MS }, async () => {
    await expectTokenizerError('/dev/zero', /is a character device, expected a SentencePiece tokenizer model file \(a regular file\)/);
    const link = tmpPath('zero.model');
    fs.symlinkSync('/dev/zero', link);
    await expectTokenizerError(link, /is a character device/);
    await expectTokenizerError(fifo(), /is a FIFO \(named pipe\)/);
    await expectTokenizerError(TMP, /is a folder/);
  });

  it('refuses a file over MAX_MODEL_BYTES before reading it (a sparse file)', async () => {
    const big = tmpPath('big.model');
    fs.closeSync(fs.openSync(big, 'w'));
    fs.truncateSync(big, MAX_MODEL_BYTES + 1);
    await expectTokenizerError(big, new RegExp(`is ${MAX_MODEL_BYTES + 1} bytes, more than the ${MAX_MODEL_BYTES}`));
  });

  it('`tokenize FIFO` fails at once, naming it', { timeout: LIMIT_MS }, async () => {
    const f = fifo();
    const err = await caught(() => tokenizeCommand([f], { input: Readable.from(['"Hello"\n']), output: new PassThrough() }));
    expect(err.message).toBe(`${f}: is a FIFO (named pipe), expected a SentencePiece tokenizer model file (a regular file)`);
  });

  // About 2 s on an idle machine (ts-node start-up); the limits allow for a loaded one.
  it('`tokenize /dev/zero` is a one-line error, exit code 1', { timeout: 120_000 }, () => {
    const run = spawnSync(process.execPath, ['-r', 'ts-node/register/transpile-only', path.join(ROOT, 'one_file_ref.ts'), 'tokenize', '/dev/zero'], {
      input: '"Hello"\n',
      encoding: 'utf8',
      timeout: 100_000,
      cwd: ROOT,
    });
    expect(run.status).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toBe('error: /dev/zero: is a character device, expected a SentencePiece tokenizer model file (a regular file)\n');
  });
});
