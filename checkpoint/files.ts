/**
 * Opening the files of a model: regular files only. A FIFO would block the open (or the read) until
 * a writer comes, and /dev/zero or /dev/urandom never end, so every reader goes through here: the
 * path is looked at before it is opened, opened without blocking, and looked at again through the
 * descriptor (in case it was swapped in between). Files read whole also have a size limit, checked
 * before anything is allocated.
 */
import * as fs from 'fs';
import { CheckpointError } from './errors';

/** The largest JSON file read (params.json, config.json, an HF index: 7B's index is 24 KB). */
export const MAX_JSON_BYTES = 64 << 20;

/** The most bytes asked of one read (a single readSync is limited to about 2 GiB). */
const READ_CHUNK = 1 << 30;

/**
 * Reads `target.length` bytes at `position` of `fd`, in reads of at most 1 GiB, or throws naming
 * `file` and `what` when the file ends first (truncated, or shrank after it was opened).
 */
export function readExactly(fd: number, target: Uint8Array, position: number, file: string, what: string): void {
  for (let done = 0; done < target.length; ) {
    const got = fs.readSync(fd, target, done, Math.min(READ_CHUNK, target.length - done), position + done);
    if (got === 0) throw new CheckpointError(file, `unexpected end of file reading ${what} (truncated?)`);
    done += got;
  }
}

/** Opening with O_NONBLOCK: a FIFO swapped in after the stat does not block the open. */
const OPEN_FLAGS = fs.constants.O_RDONLY | (fs.constants.O_NONBLOCK ?? 0);

/** What kind of file `stat` describes, for messages ("a folder", "a FIFO (named pipe)"...). */
export function kindOf(stat: fs.Stats): string {
  if (stat.isFile()) return 'a regular file';
  if (stat.isDirectory()) return 'a folder';
  if (stat.isFIFO()) return 'a FIFO (named pipe)';
  if (stat.isCharacterDevice()) return 'a character device';
  if (stat.isBlockDevice()) return 'a block device';
  if (stat.isSocket()) return 'a socket';
  return 'a special file';
}

function notRegular(file: string, stat: fs.Stats, expected: string): CheckpointError {
  return new CheckpointError(file, `is ${kindOf(stat)}, expected ${expected} (a regular file)`);
}

function cannotOpen(file: string, err: unknown): CheckpointError {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return new CheckpointError(file, 'cannot open (no such file)');
  return new CheckpointError(file, `cannot open (${code ?? (err as Error).message ?? String(err)})`);
}

/**
 * Opens `file` for reading if it is a regular file (symbolic links followed); `expected` says what
 * it should be, for the message otherwise ("a torch.save checkpoint file"). Returns the descriptor
 * and the file's size; the caller closes it.
 */
export function openRegularFile(file: string, expected: string): { fd: number; size: number } {
  let stat: fs.Stats;
  try {
    stat = fs.statSync(file);
  } catch (err) {
    throw cannotOpen(file, err);
  }
  if (!stat.isFile()) throw notRegular(file, stat, expected);
  let fd: number;
  try {
    fd = fs.openSync(file, OPEN_FLAGS);
  } catch (err) {
    throw cannotOpen(file, err);
  }
  try {
    const opened = fs.fstatSync(fd);
    if (!opened.isFile()) throw notRegular(file, opened, expected);
    return { fd, size: opened.size };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** Reads the regular file `file` whole, if it holds at most `maxBytes` bytes. */
export function readRegularFile(file: string, maxBytes: number, expected: string): Buffer {
  const { fd, size } = openRegularFile(file, expected);
  try {
    if (size > maxBytes) throw new CheckpointError(file, `is ${size} bytes, more than the ${maxBytes} expected of ${expected}`);
    const out = Buffer.alloc(size);
    for (let done = 0; done < size; ) {
      const got = fs.readSync(fd, out, done, size - done, done);
      if (got === 0) throw new CheckpointError(file, `ended after ${done} of its ${size} bytes (the file shrank while being read)`);
      done += got;
    }
    return out;
  } finally {
    fs.closeSync(fd);
  }
}
