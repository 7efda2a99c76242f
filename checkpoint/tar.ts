/**
 * Opens a model straight from its tar (e.g. the official mistral-7B-v0.1.tar: a top folder holding
 * params.json, consolidated.00.pth and tokenizer.model, in any order) without extracting anything:
 * tar-stream hands over each member's bytes once, front to back; params.json and tokenizer.model
 * are kept as bytes and consolidated.00.pth is parsed as it streams by (checkpoint/pth_stream.ts)
 * into one host buffer per storage. Peak memory is the checkpoint's own size plus small buffers.
 *
 * Members are found by name at the top of the tar or inside one top folder ("./" prefixes
 * allowed); anything else is skipped. Reading stops once all three are in.
 */
import * as fs from 'fs';
import { extract as tarExtract, type Header } from 'tar-stream';
import { CheckpointError } from './errors';
import { openRegularFile } from './files';
import { readPthStream } from './pth_stream';
import type { WeightReader } from './types';

/** The members we need, by role. */
const MEMBER_NAMES = { params: 'params.json', weights: 'consolidated.00.pth', tokenizer: 'tokenizer.model' } as const;
type Role = keyof typeof MEMBER_NAMES;
const ROLES = Object.keys(MEMBER_NAMES) as Role[];

/** Size limits for the members read whole (Mistral's are 202 bytes and 493 KB). */
const MAX_PARAMS_BYTES = 1 << 20;
const MAX_TOKENIZER_BYTES = 64 << 20;
/** Read size, and how often onProgress is called. */
const READ_CHUNK = 1 << 20;
const PROGRESS_STEP = 64 << 20;

export interface TarCheckpoint {
  /** params.json, parsed. */
  params: unknown;
  /** "<tar>:<member path>" of params.json, for messages. */
  paramsFile: string;
  /** consolidated.00.pth's tensors, in memory; close() drops them. */
  weights: WeightReader;
  tokenizerBytes: Uint8Array;
  /** "<tar>:<member path>" of tokenizer.model. */
  tokenizerName: string;
}

export interface OpenTarOptions {
  /** Called as the tar is read, every 64 MB and once at the end. */
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
}

/** Which member `name` is, if any: one of ours at the top or one folder down. */
function memberRole(name: string): { role: Role; folder: string } | null {
  const parts = name.split('/').filter((part) => part !== '' && part !== '.');
  if (parts.length === 0 || parts.length > 2) return null;
  const base = parts[parts.length - 1];
  const role = ROLES.find((r) => MEMBER_NAMES[r] === base);
  return role ? { role, folder: parts.length === 2 ? parts[0] : '' } : null;
}

/** Where the reader is, for messages about errors that tar-stream reports. */
interface Position {
  /** The member being read, or null between members. */
  member: string | null;
  /** The last member finished. */
  previous: string | null;
}

/** A member as tar-stream gives it: its header, and its data as a stream of chunks. */
type TarEntry = AsyncIterable<unknown> & { readonly header: Header };

/** The member's data chunks, as bytes. */
async function* bytesOf(entry: TarEntry): AsyncGenerator<Uint8Array> {
  for await (const chunk of entry) {
    if (!(chunk instanceof Uint8Array)) throw new Error(`tar-stream gave a ${typeof chunk} chunk, expected bytes`);
    yield chunk;
  }
}

async function drain(entry: TarEntry): Promise<void> {
  for await (const _chunk of entry) {
    // skipped
  }
}

/** A small member's bytes, after checking its size. */
async function readWhole(entry: TarEntry, size: number, limit: number, file: string): Promise<Buffer> {
  if (size > limit) throw new CheckpointError(file, `is ${size} bytes, more than the ${limit} expected`);
  const out = Buffer.alloc(size);
  let filled = 0;
  for await (const chunk of bytesOf(entry)) {
    if (filled + chunk.length > size) throw new CheckpointError(file, `holds more than its ${size} bytes`);
    out.set(chunk, filled);
    filled += chunk.length;
  }
  if (filled !== size) throw new CheckpointError(file, `ended after ${filled} of its ${size} bytes (truncated)`);
  return out;
}

interface Found {
  params?: { value: unknown; file: string };
  weights?: WeightReader;
  tokenizer?: { bytes: Uint8Array; file: string };
}

/** Reads members into `found` until all three are in; throws if the tar ends first. */
async function readMembers(entries: AsyncIterable<TarEntry>, tarPath: string, fileSize: number, at: Position, found: Found): Promise<void> {
  const names = new Map<Role, string>();
  let folder: string | null = null;
  let members = 0;
  for await (const entry of entries) {
    const header: Header & { byteOffset?: unknown } = entry.header;
    const size = header.size ?? 0;
    at.member = header.name;
    members++;
    // A pax header's size= overrides the header's: any text, so check it is a byte count.
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new CheckpointError(tarPath, `member "${header.name}" has size ${String(size)}, not a byte count (corrupt pax header?)`);
    }
    // tar-stream knows where the member's data starts: a size running past the file is caught now.
    if (typeof header.byteOffset === 'number' && header.byteOffset + size > fileSize) {
      throw new CheckpointError(
        tarPath,
        `member "${header.name}" says it holds ${size} bytes from byte ${header.byteOffset}, but the file ends at byte ${fileSize} (truncated, or a corrupt size field)`,
      );
    }
    const match = header.type === 'directory' ? null : memberRole(header.name);
    if (!match) {
      await drain(entry);
    } else {
      const { role } = match;
      const file = `${tarPath}:${header.name}`;
      if (header.type !== 'file' && header.type !== 'contiguous-file') {
        throw new CheckpointError(tarPath, `member "${header.name}" is a ${header.type ?? 'special file'}, expected a regular file`);
      }
      const earlier = names.get(role);
      if (earlier !== undefined) throw new CheckpointError(tarPath, `holds two ${MEMBER_NAMES[role]} members, "${earlier}" and "${header.name}"`);
      if (folder !== null && match.folder !== folder) {
        const first = [...names.values()][0];
        throw new CheckpointError(tarPath, `member "${header.name}" is not in the same folder as "${first}"`);
      }
      folder = match.folder;
      names.set(role, header.name);
      if (role === 'params') {
        const text = (await readWhole(entry, size, MAX_PARAMS_BYTES, file)).toString('utf8');
        try {
          found.params = { value: JSON.parse(text) as unknown, file };
        } catch (err) {
          throw new CheckpointError(file, `is not valid JSON: ${(err as Error).message}`);
        }
      } else if (role === 'tokenizer') {
        found.tokenizer = { bytes: await readWhole(entry, size, MAX_TOKENIZER_BYTES, file), file };
      } else {
        found.weights = await readPthStream(bytesOf(entry), size, file);
      }
    }
    at.previous = header.name;
    at.member = null;
    if (found.params && found.weights && found.tokenizer) return;
  }
  const missing = ROLES.filter((role) => !names.has(role)).map((role) => MEMBER_NAMES[role]);
  const where = folder === null || folder === '' ? 'at its top level or in one top folder' : `in its folder "${folder}"`;
  throw new CheckpointError(
    tarPath,
    `${members === 0 ? 'holds no members' : `has no ${missing.join(' or ')}`} (expected params.json, consolidated.00.pth and tokenizer.model ${where})`,
  );
}

/** A one-line CheckpointError for whatever went wrong. */
function asCheckpointError(err: unknown, tarPath: string, at: Position): CheckpointError {
  if (err instanceof CheckpointError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string') return new CheckpointError(tarPath, `cannot read: ${message}`);
  if (message === 'Unexpected end of data') {
    const where = at.member !== null ? `inside member "${at.member}"` : at.previous !== null ? `after member "${at.previous}"` : 'inside the first header';
    return new CheckpointError(tarPath, `truncated tar: the file ends ${where}`);
  }
  if (/invalid tar header|invalid header/i.test(message)) {
    const where = at.previous !== null ? ` after member "${at.previous}"` : '';
    return new CheckpointError(tarPath, `not a valid tar archive: bad header${where} (${message})`);
  }
  const where = at.member !== null ? ` (in member "${at.member}")` : '';
  return new CheckpointError(tarPath, `cannot read the tar${where}: ${message}`);
}

/**
 * Opens a model tar: params.json (parsed), consolidated.00.pth (loaded into memory) and
 * tokenizer.model (bytes). Throws CheckpointError naming the tar on anything missing or malformed;
 * the file is closed on every path.
 */
export async function openTar(path: string, opts: OpenTarOptions = {}): Promise<TarCheckpoint> {
  const { fd, size: fileSize } = openRegularFile(path, 'a .tar');
  const source = fs.createReadStream(path, { fd, highWaterMark: READ_CHUNK });
  const extract = tarExtract();
  // Listen for entries before any can arrive.
  const iterator = extract[Symbol.asyncIterator]();
  const entries: AsyncIterable<TarEntry> = { [Symbol.asyncIterator]: () => iterator };
  let bytesDone = 0;
  let reported = 0;
  source.on('data', (chunk) => {
    bytesDone += chunk.length;
    if (opts.onProgress && bytesDone - reported >= PROGRESS_STEP) {
      reported = bytesDone;
      opts.onProgress(bytesDone, fileSize);
    }
  });
  source.on('error', (err) => extract.destroy(err));
  source.pipe(extract);

  const at: Position = { member: null, previous: null };
  const found: Found = {};
  try {
    await readMembers(entries, path, fileSize, at, found);
  } catch (err) {
    found.weights?.close();
    throw asCheckpointError(err, path, at);
  } finally {
    extract.destroy();
    source.destroy();
    if (!source.closed) await new Promise<void>((resolve) => source.once('close', () => resolve()));
  }
  opts.onProgress?.(bytesDone, fileSize);
  const { params, weights, tokenizer } = found as Required<Found>;
  return { params: params.value, paramsFile: params.file, weights, tokenizerBytes: tokenizer.bytes, tokenizerName: tokenizer.file };
}
