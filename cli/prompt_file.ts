/**
 * Prompts from files and stdin: `-f/--file PATH` (`-` for stdin), as llama.cpp's `-f`.
 *
 * The whole file is one prompt, read as UTF-8 (a byte-order mark is dropped, and one final line
 * end, so that `echo text | ... -f -` gives "text"). Bytes that are not UTF-8 are an error naming
 * the first bad byte, never a silent U+FFFD. Kept free of heavy imports: tokenize uses it too.
 */
import * as fs from 'fs';

/** A prompt file that cannot be used; main() prints the one-line message and exits 1. */
export class PromptFileError extends Error {
  override name = 'PromptFileError';
}

/** More than this is refused before it is all read: 128,000 tokens of text are a few MB at most. */
export const MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024;

/**
 * The offset of the first byte that does not start a valid UTF-8 sequence (or of the sequence
 * that is cut short or malformed), as Python's UnicodeDecodeError reports its position; -1 when
 * every byte is valid. Overlong forms, surrogates (U+D800..U+DFFF) and values past U+10FFFF are
 * invalid, as for TextDecoder with fatal: true.
 */
export function firstInvalidUtf8(bytes: Uint8Array): number {
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i];
    if (b < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let lo = 0x80;
    let hi = 0xbf; // allowed range of the second byte
    if (b >= 0xc2 && b <= 0xdf) need = 1;
    else if (b >= 0xe0 && b <= 0xef) {
      need = 2;
      if (b === 0xe0) lo = 0xa0; // overlong
      if (b === 0xed) hi = 0x9f; // surrogates
    } else if (b >= 0xf0 && b <= 0xf4) {
      need = 3;
      if (b === 0xf0) lo = 0x90; // overlong
      if (b === 0xf4) hi = 0x8f; // past U+10FFFF
    } else return i;
    for (let k = 1; k <= need; k++) {
      const c = bytes[i + k];
      if (c === undefined) return i;
      if (k === 1 ? c < lo || c > hi : c < 0x80 || c > 0xbf) return i;
    }
    i += need + 1;
  }
  return -1;
}

/** `bytes` as text; a PromptFileError naming `what` and the first bad byte when they are not UTF-8. */
export function decodeUtf8(bytes: Uint8Array, what: string): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes); // drops a leading BOM
  } catch {
    const at = firstInvalidUtf8(bytes);
    throw new PromptFileError(`${what}: prompt file is not valid UTF-8 at byte ${at} (counting from 0)`);
  }
}

/** Reads all of file descriptor `fd`, at most `limit` bytes (more is an error naming `what`). */
function readAll(fd: number, what: string, limit: number): Buffer {
  const chunks: Buffer[] = [];
  let total = 0;
  const chunk = Buffer.allocUnsafe(1 << 16);
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, chunk, 0, chunk.length, null);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN') {
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10); // non-blocking stdin: wait for data
        continue;
      }
      if (code === 'EOF') break;
      throw new PromptFileError(`${what}: cannot read (${code ?? (err as Error).message})`);
    }
    if (n === 0) break;
    total += n;
    if (total > limit) throw new PromptFileError(`${what}: more than ${limit} bytes, too long for a prompt`);
    chunks.push(Buffer.from(chunk.subarray(0, n)));
  }
  return Buffer.concat(chunks, total);
}

/** Drops one final "\n" or "\r\n", as llama.cpp does for -f. */
function dropFinalNewline(text: string): string {
  if (text.endsWith('\r\n')) return text.slice(0, -2);
  if (text.endsWith('\n')) return text.slice(0, -1);
  return text;
}

/**
 * The prompt in `file` (`-`: stdin), for the flag `flag` (named in errors). On a terminal, stdin
 * gets a hint on stderr first, instead of waiting without a word.
 */
export function readPromptFile(file: string, flag = '--file', limit = MAX_PROMPT_FILE_BYTES): string {
  if (file === '-') {
    if (process.stdin.isTTY) process.stderr.write(`${flag} -: reading the prompt from stdin; end it with Ctrl-D\n`);
    return dropFinalNewline(decodeUtf8(readAll(0, `${flag} - (stdin)`, limit), `${flag} - (stdin)`));
  }
  const what = `${flag} ${file}`;
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new PromptFileError(`${what}: no such file`);
    if (code === 'EISDIR') throw new PromptFileError(`${what}: is a folder, expected a text file`);
    throw new PromptFileError(`${what}: cannot open (${code ?? (err as Error).message})`);
  }
  try {
    if (fs.fstatSync(fd).isDirectory()) throw new PromptFileError(`${what}: is a folder, expected a text file`);
    return dropFinalNewline(decodeUtf8(readAll(fd, what, limit), what));
  } finally {
    fs.closeSync(fd);
  }
}
