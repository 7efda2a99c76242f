/**
 * A read-only reader for the zip archives written by torch.save.
 *
 * It reads only the end-of-central-directory records (zip64 included) and
 * the central directory up front, through positioned reads on a file
 * descriptor, so it works on checkpoints far larger than a Node Buffer can
 * hold. Entry bytes are read on demand at their offsets, and each record's
 * CRC-32 is checked the first time any of it is read (verify). torch stores
 * every record uncompressed ("stored", method 0); any other method is an error.
 */
import * as fs from 'fs';
import { crc32, crc32Combine } from './crc32';
import { CheckpointError } from './errors';
import { openRegularFile, readExactly } from './files';
import {
  CENTRAL_HEADER_SIZE,
  EOCD64_LOCATOR_SIZE,
  EOCD64_MIN_SIZE,
  EOCD_SIZE,
  FLAG_ENCRYPTED,
  LOCAL_HEADER_SIZE,
  MAX_COMMENT,
  SATURATED_32,
  ZIP64_EXTRA_ID,
  ZIP_SIG,
} from './zip_format';

/** One file inside the archive, as described by its central directory entry. */
export interface ZipEntry {
  readonly name: string;
  /** Uncompressed (= stored) size in bytes. */
  readonly size: number;
  readonly crc32: number;
  /** Offset of the entry's local file header within the archive. */
  readonly localHeaderOffset: number;
}

/**
 * The largest central directory read: about 100 bytes a record, so some 600,000 records (torch
 * writes one per storage: 7B has 291).
 */
const MAX_CENTRAL_DIRECTORY = 64 << 20;
/** The rest of a record that a tensor does not cover is read in pieces this large to check the CRC. */
const CRC_PIECE = 16 << 20;

/** Reads a little-endian unsigned 64-bit value, which must fit in a JS number. */
function readU64(buf: Buffer, at: number, file: string, what: string): number {
  const value = buf.readBigUInt64LE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CheckpointError(file, `zip ${what} ${value} is too large`);
  }
  return Number(value);
}

export class ZipReader {
  readonly path: string;
  /** File size in bytes. */
  readonly fileSize: number;
  /** Entries in central directory order, keyed by name. */
  readonly entries: ReadonlyMap<string, ZipEntry>;
  private fd: number | null;
  /** Byte offset where the central directory starts: entry data must end before it. */
  private readonly centralDirOffset: number;
  private readonly dataOffsets = new Map<string, number>();
  /** Records whose CRC-32 has been checked. */
  private readonly verified = new Set<string>();
  private readonly pieces = new Map<string, { start: number; length: number; crc: number }[]>();

  private constructor(path: string, fd: number, fileSize: number) {
    this.path = path;
    this.fd = fd;
    this.fileSize = fileSize;
    const { cdOffset, cdSize, count } = this.readEndOfCentralDirectory();
    this.centralDirOffset = cdOffset;
    this.entries = this.readCentralDirectory(cdOffset, cdSize, count);
  }

  /** Opens `path` and reads its central directory; throws CheckpointError if it is not a usable zip. */
  static open(path: string): ZipReader {
    const { fd, size } = openRegularFile(path, 'a torch.save checkpoint file');
    try {
      return new ZipReader(path, fd, size);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  close(): void {
    if (this.fd !== null) {
      fs.closeSync(this.fd);
      this.fd = null;
    }
  }

  /** The entry called `name`, or a CheckpointError saying it is missing. */
  entry(name: string): ZipEntry {
    const e = this.entries.get(name);
    if (!e) throw new CheckpointError(this.path, `zip has no record "${name}"`);
    return e;
  }

  /** Reads `length` bytes of `entry` starting `start` bytes into it, into `target` (at its start). */
  readInto(entry: ZipEntry, start: number, target: Uint8Array): void {
    if (start < 0 || start + target.length > entry.size) {
      throw new CheckpointError(
        this.path,
        `read of bytes ${start}..${start + target.length} is outside record "${entry.name}" of ${entry.size} bytes`,
      );
    }
    this.readAt(this.dataOffset(entry) + start, target, `record "${entry.name}"`);
  }

  /** Reads a whole (small) entry of at most `limit` bytes, checking its CRC-32. */
  readAll(entry: ZipEntry, limit: number): Buffer {
    if (entry.size > limit) {
      throw new CheckpointError(this.path, `record "${entry.name}" is ${entry.size} bytes, more than the ${limit} expected`);
    }
    const buf = Buffer.alloc(entry.size);
    this.readInto(entry, 0, buf);
    this.verify(entry, 0, buf);
    return buf;
  }

  /**
   * Checks the CRC-32 of `entry`, of which `bytes` (just read by readInto) start `start` bytes in;
   * the rest of the record, if any, is read for it. Each record is checked once: later calls for it
   * return at once. `what` names what was being read, for the message ("tensor "w"").
   */
  verify(entry: ZipEntry, start: number, bytes: Uint8Array, what?: string): void {
    if (this.verified.has(entry.name)) return;
    let crc = this.crcOfRange(entry, 0, start, 0);
    crc = crc32(bytes, crc);
    this.check(entry, this.crcOfRange(entry, start + bytes.length, entry.size, crc), what);
  }

  /**
   * verify() for a record read in pieces, in any order (a weight read straight into the compute
   * pool: a shard per thread, or rows a few MB at a time): `bytes`, read by readInto from `start`,
   * is one piece of the `expected` bytes a reader takes from the record. Each piece's CRC is kept;
   * once `expected` bytes have come, the record's CRC is made of theirs (crc32Combine) and of the
   * bytes the pieces left out, read from the file, and checked as verify() does. Pieces that
   * overlap make it read the whole record instead. No byte is read twice otherwise.
   */
  verifyPiece(entry: ZipEntry, start: number, bytes: Uint8Array, expected: number, what?: string): void {
    if (this.verified.has(entry.name)) return;
    let pieces = this.pieces.get(entry.name);
    if (pieces === undefined) this.pieces.set(entry.name, (pieces = []));
    pieces.push({ start, length: bytes.length, crc: crc32(bytes) });
    if (pieces.reduce((n, p) => n + p.length, 0) < expected) return;
    this.pieces.delete(entry.name);
    pieces.sort((a, b) => a.start - b.start);
    let crc = 0;
    let at = 0;
    for (const p of pieces) {
      if (p.start < at) { // overlapping pieces: the whole record from the file
        this.verify(entry, 0, new Uint8Array(0), what);
        return;
      }
      crc = crc32Combine(this.crcOfRange(entry, at, p.start, crc), p.crc, p.length);
      at = p.start + p.length;
    }
    this.check(entry, this.crcOfRange(entry, at, entry.size, crc), what);
  }

  private check(entry: ZipEntry, crc: number, what?: string): void {
    if (crc !== entry.crc32) {
      const hex = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;
      throw new CheckpointError(
        this.path,
        `record "${entry.name}"${what ? ` (${what})` : ''} fails its CRC-32 check: the central directory says ${hex(entry.crc32)}, the bytes give ${hex(crc)} (corrupt file)`,
      );
    }
    this.verified.add(entry.name);
  }

  /** The CRC-32 of bytes [from, to) of `entry`, continuing `crc`, read in pieces. */
  private crcOfRange(entry: ZipEntry, from: number, to: number, crc: number): number {
    if (from >= to) return crc;
    const piece = Buffer.alloc(Math.min(CRC_PIECE, to - from));
    for (let at = from; at < to; at += piece.length) {
      const part = piece.subarray(0, Math.min(piece.length, to - at));
      this.readInto(entry, at, part);
      crc = crc32(part, crc);
    }
    return crc;
  }

  /** Absolute file offset of the entry's first data byte (parses its local header once). */
  dataOffset(entry: ZipEntry): number {
    const cached = this.dataOffsets.get(entry.name);
    if (cached !== undefined) return cached;
    const header = Buffer.alloc(LOCAL_HEADER_SIZE);
    this.readAt(entry.localHeaderOffset, header, `local header of "${entry.name}"`);
    if (header.readUInt32LE(0) !== ZIP_SIG.local) {
      throw new CheckpointError(this.path, `record "${entry.name}" has no local file header at offset ${entry.localHeaderOffset}`);
    }
    const nameLength = header.readUInt16LE(26);
    const extraLength = header.readUInt16LE(28);
    const start = entry.localHeaderOffset + LOCAL_HEADER_SIZE + nameLength + extraLength;
    if (start + entry.size > this.centralDirOffset) {
      throw new CheckpointError(
        this.path,
        `record "${entry.name}" (${entry.size} bytes at offset ${start}) runs past the start of the central directory at ${this.centralDirOffset}`,
      );
    }
    const localName = Buffer.alloc(nameLength);
    this.readAt(entry.localHeaderOffset + LOCAL_HEADER_SIZE, localName, `local header of "${entry.name}"`);
    if (localName.toString('utf8') !== entry.name) {
      throw new CheckpointError(this.path, `local header at offset ${entry.localHeaderOffset} names "${localName.toString('utf8')}", central directory says "${entry.name}"`);
    }
    this.dataOffsets.set(entry.name, start);
    return start;
  }

  /** Positioned read that fills `target` completely or throws (truncated file). */
  private readAt(position: number, target: Uint8Array, what: string): void {
    if (this.fd === null) throw new CheckpointError(this.path, 'read after close()');
    if (position < 0 || position + target.length > this.fileSize) {
      throw new CheckpointError(
        this.path,
        `${what} (bytes ${position}..${position + target.length}) lies outside the file of ${this.fileSize} bytes (truncated?)`,
      );
    }
    readExactly(this.fd, target, position, this.path, what);
  }

  /** Finds the (zip64) end of central directory; returns where the directory is and how many entries it has. */
  private readEndOfCentralDirectory(): { cdOffset: number; cdSize: number; count: number } {
    if (this.fileSize < EOCD_SIZE) {
      throw new CheckpointError(this.path, `not a zip archive (only ${this.fileSize} bytes, no end of central directory)`);
    }
    const tailLength = Math.min(this.fileSize, EOCD_SIZE + MAX_COMMENT);
    const tailStart = this.fileSize - tailLength;
    const tail = Buffer.alloc(tailLength);
    this.readAt(tailStart, tail, 'end of file');
    let eocd = -1;
    for (let i = tailLength - EOCD_SIZE; i >= 0; i--) {
      // The signature must be followed by a comment that reaches exactly to the end of the file.
      if (tail.readUInt32LE(i) === ZIP_SIG.eocd && i + EOCD_SIZE + tail.readUInt16LE(i + 20) === tailLength) {
        eocd = i;
        break;
      }
    }
    if (eocd < 0) {
      throw new CheckpointError(this.path, 'not a zip archive or truncated (no end-of-central-directory record)');
    }
    let count = tail.readUInt16LE(eocd + 10);
    let cdSize = tail.readUInt32LE(eocd + 12);
    let cdOffset = tail.readUInt32LE(eocd + 16);
    const eocdPosition = tailStart + eocd;

    // A zip64 archive puts a locator just before the classic record, pointing at the zip64 record.
    let cdLimit = eocdPosition; // the central directory must end before this
    const locatorPosition = eocdPosition - EOCD64_LOCATOR_SIZE;
    const locator = Buffer.alloc(EOCD64_LOCATOR_SIZE);
    if (locatorPosition >= 0) this.readAt(locatorPosition, locator, 'zip64 locator');
    if (locatorPosition >= 0 && locator.readUInt32LE(0) === ZIP_SIG.eocd64Locator) {
      const eocd64Position = readU64(locator, 8, this.path, 'zip64 end-of-central-directory offset');
      if (eocd64Position + EOCD64_MIN_SIZE > locatorPosition) {
        throw new CheckpointError(this.path, `zip64 end-of-central-directory offset ${eocd64Position} is outside the file`);
      }
      const record = Buffer.alloc(EOCD64_MIN_SIZE);
      this.readAt(eocd64Position, record, 'zip64 end-of-central-directory record');
      if (record.readUInt32LE(0) !== ZIP_SIG.eocd64) {
        throw new CheckpointError(this.path, `no zip64 end-of-central-directory record at offset ${eocd64Position}`);
      }
      count = readU64(record, 32, this.path, 'entry count');
      cdSize = readU64(record, 40, this.path, 'central directory size');
      cdOffset = readU64(record, 48, this.path, 'central directory offset');
      cdLimit = eocd64Position;
    } else if (count === 0xffff || cdSize === SATURATED_32 || cdOffset === SATURATED_32) {
      throw new CheckpointError(this.path, 'zip64 archive without a zip64 end-of-central-directory locator (truncated?)');
    }
    if (cdOffset + cdSize > cdLimit) {
      throw new CheckpointError(
        this.path,
        `central directory (${cdSize} bytes at offset ${cdOffset}) lies outside the file of ${this.fileSize} bytes (truncated?)`,
      );
    }
    return { cdOffset, cdSize, count };
  }

  private readCentralDirectory(cdOffset: number, cdSize: number, count: number): Map<string, ZipEntry> {
    if (cdSize > MAX_CENTRAL_DIRECTORY) {
      throw new CheckpointError(this.path, `central directory of ${cdSize} bytes is larger than the ${MAX_CENTRAL_DIRECTORY} accepted (corrupt file?)`);
    }
    if (count * CENTRAL_HEADER_SIZE > cdSize) {
      throw new CheckpointError(this.path, `zip says it has ${count} records, more than its central directory of ${cdSize} bytes can describe (corrupt file)`);
    }
    const cd = Buffer.alloc(cdSize);
    this.readAt(cdOffset, cd, 'central directory');
    const entries = new Map<string, ZipEntry>();
    let at = 0;
    for (let index = 0; index < count; index++) {
      if (at + CENTRAL_HEADER_SIZE > cdSize || cd.readUInt32LE(at) !== ZIP_SIG.central) {
        throw new CheckpointError(this.path, `central directory entry ${index} of ${count} is missing or corrupt`);
      }
      const flags = cd.readUInt16LE(at + 8);
      const method = cd.readUInt16LE(at + 10);
      const crc = cd.readUInt32LE(at + 16);
      let compressedSize = cd.readUInt32LE(at + 20);
      let size = cd.readUInt32LE(at + 24);
      const nameLength = cd.readUInt16LE(at + 28);
      const extraLength = cd.readUInt16LE(at + 30);
      const commentLength = cd.readUInt16LE(at + 32);
      let localHeaderOffset = cd.readUInt32LE(at + 42);
      const next = at + CENTRAL_HEADER_SIZE + nameLength + extraLength + commentLength;
      if (next > cdSize) {
        throw new CheckpointError(this.path, `central directory entry ${index} runs past the end of the directory`);
      }
      const name = cd.toString('utf8', at + CENTRAL_HEADER_SIZE, at + CENTRAL_HEADER_SIZE + nameLength);

      // zip64 extra field: the 64-bit values of whichever fields were saturated, in this order.
      let extra = at + CENTRAL_HEADER_SIZE + nameLength;
      const extraEnd = extra + extraLength;
      while (extra + 4 <= extraEnd) {
        const id = cd.readUInt16LE(extra);
        const length = cd.readUInt16LE(extra + 2);
        if (extra + 4 + length > extraEnd) break;
        if (id === ZIP64_EXTRA_ID) {
          let field = extra + 4;
          const take = (what: string): number => {
            if (field + 8 > extra + 4 + length) {
              throw new CheckpointError(this.path, `zip64 extra field of "${name}" is too short for its ${what}`);
            }
            const v = readU64(cd, field, this.path, `${what} of "${name}"`);
            field += 8;
            return v;
          };
          if (size === SATURATED_32) size = take('size');
          if (compressedSize === SATURATED_32) compressedSize = take('compressed size');
          if (localHeaderOffset === SATURATED_32) localHeaderOffset = take('header offset');
        }
        extra += 4 + length;
      }

      if (flags & FLAG_ENCRYPTED) throw new CheckpointError(this.path, `record "${name}" is encrypted`);
      if (method !== 0) {
        throw new CheckpointError(this.path, `record "${name}" uses compression method ${method}; only stored (0) records are supported`);
      }
      if (compressedSize !== size) {
        throw new CheckpointError(this.path, `stored record "${name}" has compressed size ${compressedSize} != size ${size}`);
      }
      if (localHeaderOffset + LOCAL_HEADER_SIZE + nameLength + size > cdOffset) {
        throw new CheckpointError(
          this.path,
          `record "${name}" (${size} bytes at offset ${localHeaderOffset}) lies outside the data area of the file (${cdOffset} bytes)`,
        );
      }
      if (entries.has(name)) throw new CheckpointError(this.path, `duplicate record "${name}"`);
      entries.set(name, { name, size, crc32: crc, localHeaderOffset });
      at = next;
    }
    return entries;
  }
}
