/**
 * Reads a torch.save checkpoint (a zip) front to back from a stream of chunks, without seeking, into
 * host memory: what openTar needs to load consolidated.00.pth while tar-stream hands over its bytes.
 *
 * torch.save writes its records in order: `<prefix>/data.pkl` first, then (newer torch) `byteorder`,
 * then one raw record `<prefix>/data/<key>` per storage, then `version` and the central directory.
 * Each record has a local file header; torch's writer (miniz) pads it to 64-byte alignment with an
 * "FB" extra field, sets flag bit 3 and leaves the sizes in the local header at 0, writing them in a
 * data descriptor after the data instead (16 bytes, or 24 with 64-bit sizes once the record has a
 * zip64 extra field, which it gets past 4 GiB). So a storage's size comes from the pickle and is
 * checked against its descriptor; data.pkl's end is found by looking for a descriptor whose sizes
 * and CRC-32 match the bytes before it. Records that state their sizes up front (other writers,
 * zip64 extra fields included) are read by those sizes. The pickle is read, with the same checks
 * and messages, by state_dict.ts's parseStateDict,
 * as pth.ts reads it.
 *
 * Each storage the pickle references is copied into one typed array (Uint16Array for bfloat16 and
 * float16, Float32Array for float32); tensors are views into it. Every size is checked against the
 * bytes left in the stream before anything is allocated. Every record's CRC-32 is computed as its
 * bytes go by (zlib's, about 0.4 s per GB) and checked against its local header or data descriptor.
 */
import * as os from 'os';
import { toFloat32 } from './dtypes';
import { CheckpointError } from './errors';
import { MAX_PICKLE_BYTES, parseStateDict, type StateDictTensor } from './state_dict';
import { BYTES_PER_ELEMENT, type RawTensor, type WeightDtype, type WeightInfo, type WeightReader } from './types';
import { crc32 } from './crc32';
import { FLAG_DESCRIPTOR, FLAG_ENCRYPTED, LOCAL_HEADER_SIZE, SATURATED_32, ZIP64_EXTRA_ID, ZIP_SIG } from './zip_format';

/** A local file header after its 4-byte signature. */
const LOCAL_HEADER_REST = LOCAL_HEADER_SIZE - 4;
/** Largest record read whole (data.pkl, byteorder, version...): the pickle's limit. */
const MAX_SMALL_RECORD = MAX_PICKLE_BYTES;

/** Storage bytes are copied through byte views of at most this size. */
const COPY_PIECE = 1 << 30;

type StorageArray = Uint16Array | Float32Array;

// ---------------------------------------------------------------------------
// Pulling exact byte counts out of a stream of chunks.

function asBuffer(chunk: Uint8Array): Buffer {
  return Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

/** Reads a stream that must hold exactly `size` bytes; asking for more than is left is a CheckpointError. */
class ChunkReader {
  private chunk: Buffer = Buffer.alloc(0);
  private at = 0;
  /** Bytes consumed so far. */
  position = 0;

  constructor(
    private readonly chunks: AsyncIterator<Uint8Array>,
    readonly size: number,
    private readonly file: string,
  ) {}

  get remaining(): number {
    return this.size - this.position;
  }

  /** Throws unless `n` more bytes are left; call before allocating for them. */
  ensure(n: number, what: string): void {
    if (n > this.remaining) {
      throw new CheckpointError(
        this.file,
        `${what} needs ${n} bytes at byte ${this.position}, but only ${this.remaining} of the file's ${this.size} bytes are left (truncated or corrupt)`,
      );
    }
  }

  /** The unread rest of the current chunk (never empty), fetching the next chunk when needed. */
  async peek(): Promise<Buffer> {
    while (this.at >= this.chunk.length) {
      const next = await this.chunks.next();
      if (next.done) {
        throw new CheckpointError(this.file, `stream ended after ${this.position} of ${this.size} bytes (truncated)`);
      }
      this.chunk = asBuffer(next.value);
      this.at = 0;
    }
    return this.chunk.subarray(this.at);
  }

  consume(n: number): void {
    this.at += n;
    this.position += n;
  }

  /** `n` bytes, valid until the next read. */
  async read(n: number, what: string): Promise<Buffer> {
    this.ensure(n, what);
    if (n === 0) return Buffer.alloc(0);
    const first = await this.peek();
    if (first.length >= n) {
      this.consume(n);
      return first.subarray(0, n);
    }
    const out = Buffer.alloc(n);
    await this.readInto(out, what);
    return out;
  }

  async readInto(target: Uint8Array, what: string): Promise<void> {
    this.ensure(target.length, what);
    for (let done = 0; done < target.length; ) {
      const chunk = await this.peek();
      const take = Math.min(chunk.length, target.length - done);
      target.set(chunk.subarray(0, take), done);
      this.consume(take);
      done += take;
    }
  }

  /** Skips `n` bytes; with `crc`, returns the CRC-32 continued over them. */
  async skip(n: number, what: string, crc?: number): Promise<number> {
    this.ensure(n, what);
    let value = crc ?? 0;
    for (let left = n; left > 0; ) {
      const chunk = await this.peek();
      const take = Math.min(chunk.length, left);
      if (crc !== undefined) value = crc32(chunk.subarray(0, take), value);
      this.consume(take);
      left -= take;
    }
    return value;
  }

  /** Consumes the rest of the stream, which must end exactly at `size`. */
  async drain(): Promise<void> {
    await this.skip(this.remaining, 'the rest of the file');
    if (this.at < this.chunk.length || !(await this.chunks.next()).done) {
      throw new CheckpointError(this.file, `stream holds more than the expected ${this.size} bytes`);
    }
  }
}

// ---------------------------------------------------------------------------
// The zip, record by record.

/** What a local file header says. */
interface LocalRecord {
  readonly name: string;
  /** Data size, or null when it only comes in the data descriptor after the data (flag bit 3). */
  readonly size: number | null;
  /** CRC-32 of the data (meaningful when `size` is known). */
  readonly crc: number;
  /** The header has a zip64 extra field: a data descriptor then holds 64-bit sizes. */
  readonly zip64: boolean;
}

/** One storage the pickle references, and where its bytes go. */
interface StorageSpec {
  /** Its key: the record is `<prefix>/data/<key>`. */
  readonly key: string;
  readonly dtype: WeightDtype;
  readonly numel: number;
  data?: StorageArray;
}

class TorchZipStream {
  private prefix = '';
  private tensors: Map<string, StateDictTensor> | null = null;
  private readonly storages = new Map<string, StorageSpec>();

  constructor(
    private readonly reader: ChunkReader,
    private readonly file: string,
  ) {}

  private fail(problem: string): never {
    throw new CheckpointError(this.file, problem);
  }

  async run(): Promise<WeightReader> {
    if (os.endianness() !== 'LE') this.fail('reading checkpoints needs a little-endian machine');
    const { reader } = this;
    for (let index = 0; ; index++) {
      const offset = reader.position;
      if (reader.remaining < 4) {
        this.fail(
          index === 0
            ? `not a zip archive (${reader.size} bytes): expected a torch.save checkpoint`
            : `ends at byte ${offset} after ${index} records, before the zip's central directory (truncated?)`,
        );
      }
      const signature = (await reader.read(4, 'a zip record signature')).readUInt32LE(0);
      if (index === 0 && signature !== ZIP_SIG.local) {
        this.fail(`not a zip archive (starts with 0x${signature.toString(16).padStart(8, '0')}, not a local file header): expected a torch.save checkpoint`);
      }
      if (signature === ZIP_SIG.central || signature === ZIP_SIG.eocd64 || signature === ZIP_SIG.eocd) break;
      if (signature !== ZIP_SIG.local) {
        this.fail(`expected a zip local file header or the central directory at byte ${offset}, found 0x${signature.toString(16).padStart(8, '0')} (corrupt file)`);
      }
      const record = await this.readLocalHeader(offset);
      await this.readRecord(record, index);
    }
    // The central directory repeats what the local headers said; it is not needed.
    await reader.drain();
    return this.finish();
  }

  private async readLocalHeader(offset: number): Promise<LocalRecord> {
    const { reader } = this;
    const header = Buffer.from(await reader.read(LOCAL_HEADER_REST, `local file header at byte ${offset}`));
    const flags = header.readUInt16LE(2);
    const method = header.readUInt16LE(4);
    const crc = header.readUInt32LE(10);
    let compressedSize = header.readUInt32LE(14);
    let size = header.readUInt32LE(18);
    const nameLength = header.readUInt16LE(22);
    const extraLength = header.readUInt16LE(24);
    const name = (await reader.read(nameLength, `name of the record at byte ${offset}`)).toString('utf8');
    const extra = Buffer.from(await reader.read(extraLength, `extra fields of record "${name}"`));

    // Extra fields: zip64 sizes (id 1); torch's "FB" alignment padding and anything else is skipped.
    let zip64: Buffer | null = null;
    for (let at = 0; at + 4 <= extra.length; ) {
      const id = extra.readUInt16LE(at);
      const length = extra.readUInt16LE(at + 2);
      if (at + 4 + length > extra.length) this.fail(`extra field of record "${name}" runs past the end of its header (corrupt file)`);
      if (id === ZIP64_EXTRA_ID) zip64 = extra.subarray(at + 4, at + 4 + length);
      at += 4 + length;
    }

    if (flags & FLAG_ENCRYPTED) this.fail(`record "${name}" is encrypted`);
    if (method !== 0) {
      this.fail(`record "${name}" uses compression method ${method}; only stored (0) records, as torch.save writes them, can be read`);
    }
    if (flags & FLAG_DESCRIPTOR) return { name, size: null, crc: 0, zip64: zip64 !== null };

    // Sizes up front; saturated ones are in the zip64 field, uncompressed size first.
    let field = 0;
    const take = (what: string): number => {
      if (!zip64 || field + 8 > zip64.length) this.fail(`record "${name}" has a saturated ${what} but no zip64 value for it`);
      const value = zip64.readBigUInt64LE(field);
      field += 8;
      if (value > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`record "${name}" ${what} ${value} is too large`);
      return Number(value);
    };
    if (size === SATURATED_32) size = take('size');
    if (compressedSize === SATURATED_32) compressedSize = take('compressed size');
    if (compressedSize !== size) this.fail(`stored record "${name}" has compressed size ${compressedSize} != size ${size}`);
    return { name, size, crc, zip64: zip64 !== null };
  }

  private async readRecord(record: LocalRecord, index: number): Promise<void> {
    const { name } = record;
    if (index === 0) {
      const match = /^([^/]+)\/data\.pkl$/.exec(name);
      if (!match) {
        this.fail(
          `first record is "${name}", not "<prefix>/data.pkl": not a torch.save checkpoint in torch.save's order (a zip in another order cannot be read as a stream; extract the .pth and open it directly)`,
        );
      }
      this.prefix = match[1];
      const pickle = await this.readSmallRecord(record);
      this.tensors = parseStateDict(pickle, this.file, `${this.file} (${name})`);
      this.collectStorages(this.tensors);
      return;
    }
    if (name === `${this.prefix}/byteorder`) {
      const order = (await this.readSmallRecord(record)).toString('latin1').trim();
      if (order !== 'little') this.fail(`byte order is "${order}", only "little" is supported`);
      return;
    }
    const storagePrefix = `${this.prefix}/data/`;
    const spec = name.startsWith(storagePrefix) ? this.storages.get(name.slice(storagePrefix.length)) : undefined;
    if (spec) {
      if (spec.data) this.fail(`duplicate record "${name}"`);
      spec.data = await this.readStorage(record, spec);
      return;
    }
    // version, .data/serialization_id, storages no tensor uses...
    if (record.size === null) {
      await this.readSmallRecord(record);
    } else {
      const crc = await this.reader.skip(record.size, `record "${name}"`, 0);
      this.checkCrc(record, record.crc, crc);
    }
  }

  /** The storages the tensors use, each once, with the same dtype and size wherever named. */
  private collectStorages(tensors: Map<string, StateDictTensor>): void {
    for (const t of tensors.values()) {
      const known = this.storages.get(t.storageKey);
      if (!known) {
        this.storages.set(t.storageKey, { key: t.storageKey, dtype: t.dtype, numel: t.storageNumel });
      } else if (known.dtype !== t.dtype || known.numel !== t.storageNumel) {
        this.fail(`storage ${t.storageKey} is described as both ${known.numel} ${known.dtype} and ${t.storageNumel} ${t.dtype} elements`);
      }
    }
  }

  /** A whole record of at most MAX_SMALL_RECORD bytes, CRC-checked. */
  private async readSmallRecord(record: LocalRecord): Promise<Buffer> {
    if (record.size === null) return this.scanToDescriptor(record);
    if (record.size > MAX_SMALL_RECORD) this.fail(`record "${record.name}" of ${record.size} bytes is larger than the ${MAX_SMALL_RECORD} expected`);
    this.reader.ensure(record.size, `record "${record.name}"`);
    const data = Buffer.alloc(record.size);
    await this.reader.readInto(data, `record "${record.name}"`);
    this.checkCrc(record, record.crc, crc32(data));
    return data;
  }

  /**
   * Fails unless the CRC-32 the zip gives for `record` (`stored`) is that of its bytes (`computed`);
   * `what` says what the record holds ("tensor "w""), worked out only for the message.
   */
  private checkCrc(record: LocalRecord, stored: number, computed: number, what?: () => string): void {
    if (stored === computed) return;
    const hex = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;
    this.fail(
      `record "${record.name}"${what ? ` (${what()})` : ''} fails its CRC-32 check: the zip says ${hex(stored)}, the bytes give ${hex(computed)} (corrupt file)`,
    );
  }

  /** "tensor "a"" or "tensors "a", "b"": the tensors whose storage is `key`. */
  private tensorsIn(key: string): string {
    const names = [...(this.tensors ?? new Map<string, StateDictTensor>())].filter(([, t]) => t.storageKey === key).map(([name]) => `"${name}"`);
    const shown = names.length > 3 ? [...names.slice(0, 3), `and ${names.length - 3} more`] : names;
    return `${names.length === 1 ? 'tensor' : 'tensors'} ${shown.join(', ')}`;
  }

  /**
   * A record whose size is only in the descriptor after it: reads until a descriptor whose sizes
   * equal the bytes before it and whose CRC-32 matches them.
   */
  private async scanToDescriptor(record: LocalRecord): Promise<Buffer> {
    const { reader } = this;
    const descriptorLength = record.zip64 ? 24 : 16;
    let buf = Buffer.alloc(4096);
    let filled = 0;
    let searchFrom = 0;
    for (;;) {
      if (reader.remaining === 0) {
        this.fail(`record "${record.name}" (size in a data descriptor) has no valid data descriptor before the end of the file (truncated or corrupt file)`);
      }
      if (filled >= MAX_SMALL_RECORD) {
        this.fail(
          `record "${record.name}" (size in a data descriptor) has no valid data descriptor in its first ${MAX_SMALL_RECORD} bytes; a record this large that the pickle does not describe cannot be streamed (extract the .pth and open it directly)`,
        );
      }
      const chunk = await reader.peek();
      const take = Math.min(chunk.length, MAX_SMALL_RECORD - filled, reader.remaining);
      if (filled + take > buf.length) {
        const grown = Buffer.alloc(Math.min(MAX_SMALL_RECORD, Math.max(2 * buf.length, filled + take)));
        buf.copy(grown, 0, 0, filled);
        buf = grown;
      }
      chunk.copy(buf, filled, 0, take);
      const end = filled + take;
      for (let p = searchFrom; p + descriptorLength <= end; p++) {
        if (buf.readUInt32LE(p) !== ZIP_SIG.descriptor) continue;
        const [compressed, size] = record.zip64
          ? [Number(buf.readBigUInt64LE(p + 8)), Number(buf.readBigUInt64LE(p + 16))]
          : [buf.readUInt32LE(p + 8), buf.readUInt32LE(p + 12)];
        if (compressed !== p || size !== p || buf.readUInt32LE(p + 4) !== crc32(buf.subarray(0, p))) continue;
        reader.consume(p + descriptorLength - filled);
        return buf.subarray(0, p);
      }
      searchFrom = Math.max(searchFrom, end - descriptorLength + 1);
      reader.consume(take);
      filled = end;
    }
  }

  /** Copies storage bytes into a new typed array, after checking the record can hold them. */
  private async readStorage(record: LocalRecord, spec: StorageSpec): Promise<StorageArray> {
    const { reader } = this;
    const what = `record "${record.name}"`;
    const needBytes = spec.numel * BYTES_PER_ELEMENT[spec.dtype];
    if (record.size !== null && record.size < needBytes) {
      this.fail(`storage ${what} has ${record.size} bytes, but its ${spec.numel} ${spec.dtype} elements need ${needBytes}`);
    }
    const descriptorLength = record.size === null ? (record.zip64 ? 20 : 12) : 0; // at least, without its signature
    reader.ensure((record.size ?? needBytes) + descriptorLength, `${what} (${spec.numel} ${spec.dtype} elements)`);

    const data = spec.dtype === 'float32' ? new Float32Array(spec.numel) : new Uint16Array(spec.numel);
    // A Uint8Array can't span more than 4 GiB, so the bytes go in by pieces.
    let crc = 0;
    for (let at = 0; at < data.byteLength; at += COPY_PIECE) {
      const piece = new Uint8Array(data.buffer, at, Math.min(COPY_PIECE, data.byteLength - at));
      await reader.readInto(piece, what);
      crc = crc32(piece, crc);
    }
    if (record.size !== null) {
      crc = await reader.skip(record.size - needBytes, what, crc);
      this.checkCrc(record, record.crc, crc, () => this.tensorsIn(spec.key));
    } else {
      const descriptor = await this.readDescriptor(record);
      if (descriptor.compressed !== needBytes || descriptor.size !== needBytes) {
        this.fail(
          `${what} is not followed by a data descriptor for the ${needBytes} bytes of the pickle's ${spec.numel} ${spec.dtype} elements (found sizes ${descriptor.compressed} and ${descriptor.size}): corrupt file, or not written by torch.save`,
        );
      }
      this.checkCrc(record, descriptor.crc, crc, () => this.tensorsIn(spec.key));
    }
    return data;
  }

  /** The data descriptor after a record's data: [signature] crc32, compressed size, size. */
  private async readDescriptor(record: LocalRecord): Promise<{ crc: number; compressed: number; size: number }> {
    const what = `data descriptor of record "${record.name}"`;
    // The signature is optional: without it, the first four bytes are the CRC-32. (A CRC-32 that
    // happens to equal the signature is read as the signature; torch's writer always writes one.)
    let crc = (await this.reader.read(4, what)).readUInt32LE(0);
    if (crc === ZIP_SIG.descriptor) crc = (await this.reader.read(4, what)).readUInt32LE(0);
    if (!record.zip64) {
      const sizes = await this.reader.read(8, what);
      return { crc, compressed: sizes.readUInt32LE(0), size: sizes.readUInt32LE(4) };
    }
    const sizes = await this.reader.read(16, what);
    return { crc, compressed: Number(sizes.readBigUInt64LE(0)), size: Number(sizes.readBigUInt64LE(8)) };
  }

  private finish(): WeightReader {
    if (!this.tensors) this.fail('zip has no <prefix>/data.pkl record: not a torch.save checkpoint');
    const storages = new Map<string, StorageArray>();
    for (const [key, spec] of this.storages) {
      if (!spec.data) this.fail(`storage record ${this.prefix}/data/${key} is missing`);
      storages.set(key, spec.data);
    }
    return new InMemoryWeights(this.file, this.tensors, storages);
  }
}

/** Tensors held in host memory, as views into their storages. */
class InMemoryWeights implements WeightReader {
  readonly tensors: ReadonlyMap<string, WeightInfo>;
  /** Tensor name -> its elements (a view into its storage); null once closed. */
  private views: Map<string, StorageArray> | null;

  constructor(
    readonly path: string,
    tensors: Map<string, StateDictTensor>,
    storages: Map<string, StorageArray>,
  ) {
    const infos = new Map<string, WeightInfo>();
    const views = new Map<string, StorageArray>();
    for (const [name, t] of tensors) {
      infos.set(name, { dtype: t.dtype, shape: t.shape, numel: t.numel });
      const storage = storages.get(t.storageKey) as StorageArray;
      views.set(name, storage.subarray(t.storageOffset, t.storageOffset + t.numel));
    }
    this.tensors = infos;
    this.views = views;
  }

  readRaw(name: string): RawTensor {
    if (!this.views) throw new CheckpointError(this.path, 'read after close()');
    const info = this.tensors.get(name);
    const data = this.views.get(name);
    if (!info || !data) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    return { dtype: info.dtype, shape: info.shape, data };
  }

  read(name: string): Float32Array {
    return toFloat32(this.readRaw(name));
  }

  /** Copies from the stream's storage (already in memory) into `target`. */
  readRawInto(name: string, byteOffset: number, target: Uint8Array): void {
    const { data } = this.readRaw(name);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (byteOffset < 0 || byteOffset + target.length > bytes.length) {
      throw new CheckpointError(this.path, `tensor "${name}": bytes ${byteOffset}..${byteOffset + target.length} are outside its ${bytes.length}`);
    }
    target.set(bytes.subarray(byteOffset, byteOffset + target.length));
  }

  close(): void {
    this.views = null;
  }
}

/**
 * Reads a torch.save checkpoint of exactly `size` bytes from `chunks` into memory; `file` names it
 * in errors. Consumes the whole stream. Throws CheckpointError on anything unexpected.
 */
export async function readPthStream(chunks: AsyncIterable<Uint8Array>, size: number, file: string): Promise<WeightReader> {
  const reader = new ChunkReader(chunks[Symbol.asyncIterator](), size, file);
  return new TorchZipStream(reader, file).run();
}
