/**
 * A minimal torch-style pickle writer and zip writer for tests, independent of checkpoint/ (except
 * crc32, itself checked against the standard check value and torch's own files).
 */
import * as fs from 'fs';
import { crc32 } from '../checkpoint/crc32';

export const op = (s: string): Buffer => Buffer.from(s, 'latin1');
export const u16 = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(n);
  return b;
};
export const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};
export const u64 = (n: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};
export const pStr = (s: string): Buffer => Buffer.concat([op('X'), u32(Buffer.byteLength(s)), Buffer.from(s, 'utf8')]);
/** BININT1, BININT2, BININT (below 2^31) or LONG1 (larger), as pickle writes a non-negative int. */
export const pInt = (n: number): Buffer => {
  if (n < 256) return Buffer.from([0x4b, n]);
  if (n < 65536) return Buffer.concat([op('M'), u16(n)]);
  if (n < 2 ** 31) return Buffer.concat([op('J'), u32(n)]);
  const bytes: number[] = [];
  for (let v = BigInt(n); v > 0n; v >>= 8n) bytes.push(Number(v & 0xffn));
  if (bytes[bytes.length - 1] & 0x80) bytes.push(0); // keep it positive
  return Buffer.from([0x8a, bytes.length, ...bytes]);
};
export const pGlobal = (module: string, name: string): Buffer => op(`c${module}\n${name}\n`);

export interface PickledTensor {
  name: string;
  storageType: string;
  key: string;
  storageNumel: number;
  offset: number;
  shape: number[];
  stride: number[];
}

/** The pickle torch.save writes for {name: tensor, ...} (without memo opcodes). */
export function stateDictPickle(tensors: PickledTensor[], rebuild = pGlobal('torch._utils', '_rebuild_tensor_v2')): Buffer {
  const parts = [Buffer.from([0x80, 2]), op('}(')];
  for (const t of tensors) {
    parts.push(pStr(t.name), rebuild, op('(('), pStr('storage'), pGlobal('torch', t.storageType), pStr(t.key), pStr('cpu'));
    parts.push(pInt(t.storageNumel), op('tQ'), pInt(t.offset));
    parts.push(op('('), ...t.shape.map(pInt), op('t('), ...t.stride.map(pInt), op('t'));
    parts.push(Buffer.from([0x89]), pGlobal('collections', 'OrderedDict'), op(')RtR'));
  }
  parts.push(op('u.'));
  return Buffer.concat(parts);
}

export interface ZipRecord {
  name: string;
  /** Record contents; or omit and give holeSize for a record of zeros left as a sparse hole. */
  data?: Uint8Array;
  holeSize?: number;
}

/**
 * A "stored" zip of `records`, emitted through `write` (and `skip` for hole records); zip64 puts
 * every size / offset in zip64 extra fields and adds the zip64 end records.
 */
function emitZip(records: ZipRecord[], zip64: boolean, write: (b: Buffer) => void, skip: (n: number) => void, at: () => number): void {
  const central: Buffer[] = [];
  for (const r of records) {
    const name = Buffer.from(r.name, 'utf8');
    const size = r.data ? r.data.length : (r.holeSize as number);
    const crc = r.data ? crc32(r.data) : 0; // crc32 is itself checked on torch's files above
    const offset = at();
    const big = zip64 ? 0xffffffff : size;
    const localExtra = zip64 ? Buffer.concat([u16(1), u16(16), u64(size), u64(size)]) : Buffer.alloc(0);
    write(Buffer.concat([u32(0x04034b50), u16(45), u16(0x0800), u16(0), u16(0), u16(0x21), u32(crc), u32(big), u32(big)]));
    write(Buffer.concat([u16(name.length), u16(localExtra.length), name, localExtra]));
    if (r.data) write(Buffer.from(r.data));
    else skip(size);
    const centralExtra = zip64 ? Buffer.concat([u16(1), u16(24), u64(size), u64(size), u64(offset)]) : Buffer.alloc(0);
    central.push(
      Buffer.concat([u32(0x02014b50), u16(45), u16(45), u16(0x0800), u16(0), u16(0), u16(0x21), u32(crc), u32(big), u32(big)]),
      Buffer.concat([u16(name.length), u16(centralExtra.length), u16(0), u16(0), u16(0), u32(0), u32(zip64 ? 0xffffffff : offset)]),
      name,
      centralExtra,
    );
  }
  const cdOffset = at();
  const cd = Buffer.concat(central);
  write(cd);
  const n = records.length;
  if (zip64) {
    const eocd64 = at();
    write(Buffer.concat([u32(0x06064b50), u64(44), u16(45), u16(45), u32(0), u32(0), u64(n), u64(n), u64(cd.length), u64(cdOffset)]));
    write(Buffer.concat([u32(0x07064b50), u32(0), u64(eocd64), u32(1)]));
    write(Buffer.concat([u32(0x06054b50), u16(0xffff), u16(0xffff), u16(0xffff), u16(0xffff), u32(0xffffffff), u32(0xffffffff), u16(0)]));
  } else {
    write(Buffer.concat([u32(0x06054b50), u16(0), u16(0), u16(n), u16(n), u32(cd.length), u32(cdOffset), u16(0)]));
  }
}

/** Writes a "stored" zip to `file` (hole records left as sparse holes); see emitZip. */
export function writeZip(file: string, records: ZipRecord[], zip64: boolean): void {
  const fd = fs.openSync(file, 'w');
  let pos = 0;
  const write = (b: Buffer): void => {
    fs.writeSync(fd, b, 0, b.length, pos);
    pos += b.length;
  };
  try {
    emitZip(records, zip64, write, (n) => (pos += n), () => pos);
  } finally {
    fs.closeSync(fd);
  }
}

/** The bytes of a "stored" zip of `records` (each with its data), sizes in the local headers. */
export function storedZip(records: ZipRecord[]): Buffer {
  const parts: Buffer[] = [];
  let pos = 0;
  const write = (b: Buffer): void => {
    parts.push(b);
    pos += b.length;
  };
  emitZip(records, false, write, () => {
    throw new Error('storedZip: every record needs its data');
  }, () => pos);
  return Buffer.concat(parts);
}

// Pickles as deep or as long as an attacker likes (issue 10, finding 7), each a complete value.

/** EMPTY_LIST MARK (BININT1 i % 256) x n APPENDS: a list of n small integers. */
export function manyAppends(n: number): Buffer {
  const items = Buffer.alloc(2 * n);
  for (let i = 0; i < n; i++) {
    items[2 * i] = 0x4b;
    items[2 * i + 1] = i % 256;
  }
  return Buffer.concat([op(']('), items, op('e')]);
}

/** `depth` empty lists, each appended into the one below it: [[[...]]] `depth` deep. */
export const nestedLists = (depth: number): Buffer => Buffer.concat([Buffer.alloc(depth, ']'), Buffer.alloc(depth - 1, 'a')]);

/** `depth` MARKs, then `depth` TUPLEs: ((((),),),) `depth` deep, through the mark stack. */
export const nestedTuples = (depth: number): Buffer => Buffer.concat([Buffer.alloc(depth, '('), Buffer.alloc(depth, 't')]);

export const f32Bytes = (values: number[]): Uint8Array => new Uint8Array(new Float32Array(values).buffer);
