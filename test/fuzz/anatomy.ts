/**
 * Where things are in each checkpoint file, found by parsing it here (independently of checkpoint/):
 * tensor data ranges, the length and offset fields of zip, pickle and tar headers, and where the
 * state-dict pickle is (with a way to make its CRC-32 match again after an edit).
 */
import { expect } from 'vitest';
import { crc32 } from '../../checkpoint/crc32';
import { storedZip } from '../torch_zip';
import type { Rng } from './rng';

export type Range = readonly [start: number, end: number];

/** A number stored in the file that says how long or where something is. */
export interface Field {
  readonly what: string;
  /** Absolute offset in the file being mutated. */
  readonly at: number;
  /** Little-endian unsigned of 1, 2, 4 or 8 bytes, or a tar header's 12-byte size field, type flag or 100-byte name. */
  readonly kind: 1 | 2 | 4 | 8 | 'tar-size' | 'tar-type' | 'tar-name';
  readonly value: bigint;
  /** Run after the edit: re-CRC the pickle, or redo the tar header checksum. */
  readonly fixup?: (bytes: Buffer, rng: Rng) => string;
}

/** A file's mutable anatomy. */
export interface Anatomy {
  /** Byte ranges holding tensor elements. */
  readonly data: Range[];
  /** Groups of fields; a field edit picks a group, then a field in it. */
  readonly fieldGroups: Map<string, Field[]>;
  /** The state-dict pickle (zip formats), and how to make its CRC-32 match after an edit. */
  readonly pickle?: { range: Range; recrc: (bytes: Buffer) => void };
  /** How to write the same file with another pickle (zip formats): rebuilt around it. */
  readonly withPickle?: (pickle: Buffer) => Buffer;
}

/** A zip record or tar member: its name and where its data is. */
interface Part {
  readonly name: string;
  readonly range: Range;
}

const SIG = {
  local: 0x04034b50,
  central: 0x02014b50,
  eocd: 0x06054b50,
  eocd64: 0x06064b50,
  locator: 0x07064b50,
  descriptor: 0x08074b50,
};

function sigBytes(sig: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(sig);
  return b;
}

function readLE(buf: Buffer, at: number, width: 1 | 2 | 4 | 8): bigint {
  let v = 0n;
  for (let i = width - 1; i >= 0; i--) v = (v << 8n) | BigInt(buf[at + i]);
  return v;
}

export function writeLE(buf: Buffer, at: number, width: 1 | 2 | 4 | 8, value: bigint): void {
  for (let i = 0; i < width; i++) buf[at + i] = Number((value >> BigInt(8 * i)) & 0xffn);
}

/** Pickle opcodes torch.save uses, with the size of their operand (u4/u1: a length-prefixed string; line: GLOBAL's two lines). */
const PICKLE_OPERANDS: ReadonlyMap<number, number | 'u4' | 'u1' | 'lines'> = new Map<number, number | 'u4' | 'u1' | 'lines'>([
  [0x80, 1], [0x95, 8], [0x7d, 0], [0x5d, 0], [0x29, 0], [0x28, 0], [0x58, 'u4'], [0x8c, 'u1'], [0x71, 1], [0x72, 4],
  [0x94, 0], [0x68, 1], [0x6a, 4], [0x63, 'lines'], [0x93, 0], [0x4a, 4], [0x4b, 1], [0x4d, 2], [0x74, 0], [0x85, 0],
  [0x86, 0], [0x87, 0], [0x6c, 0], [0x64, 0], [0x73, 0], [0x75, 0], [0x61, 0], [0x65, 0], [0x51, 0], [0x52, 0],
  [0x62, 0], [0x88, 0], [0x89, 0], [0x4e, 0], [0x30, 0], [0x31, 0], [0x32, 0], [0x2e, 0],
]);
const PICKLE_FIELD_NAMES: ReadonlyMap<number, string> = new Map([
  [0x58, 'BINUNICODE length'], [0x4a, 'BININT'], [0x4b, 'BININT1'], [0x4d, 'BININT2'], [0x71, 'BINPUT index'],
  [0x68, 'BINGET index'], [0x72, 'LONG_BINPUT index'], [0x6a, 'LONG_BINGET index'], [0x80, 'PROTO'],
]);

/** The integer and length operands of a pickle at `base` in the file. */
function pickleFields(pickle: Buffer, base: number, fixup: Field['fixup']): Field[] {
  const fields: Field[] = [];
  for (let at = 0; at < pickle.length; ) {
    const op = pickle[at];
    const operand = PICKLE_OPERANDS.get(op);
    if (operand === undefined) throw new Error(`fuzz setup: pickle opcode 0x${op.toString(16)} at ${at} not known here`);
    const name = PICKLE_FIELD_NAMES.get(op);
    if (typeof operand === 'number') {
      if (name) fields.push({ what: `pickle ${name} at pickle byte ${at}`, at: base + at + 1, kind: operand as 1 | 2 | 4, value: readLE(pickle, at + 1, operand as 1 | 2 | 4), fixup });
      at += 1 + operand;
    } else if (operand === 'u4') {
      const n = pickle.readUInt32LE(at + 1);
      fields.push({ what: `pickle ${name} of "${pickle.toString('utf8', at + 5, at + 5 + n)}"`, at: base + at + 1, kind: 4, value: BigInt(n), fixup });
      at += 5 + n;
    } else if (operand === 'u1') {
      at += 2 + pickle[at + 1];
    } else {
      at = pickle.indexOf(0x0a, pickle.indexOf(0x0a, at + 1) + 1) + 1;
    }
    if (op === 0x2e) break;
  }
  return fields;
}

/**
 * The fields of a zip (a torch.save file) lying at `base` in the file: the end records, each
 * central and local header, each data descriptor, and the pickle's integers.
 */
export function zipAnatomy(file: Buffer, base: number, zipLength: number): Anatomy {
  const zip = file.subarray(base, base + zipLength);
  const groups = new Map<string, Field[]>([['end records', []], ['central headers', []], ['local headers', []], ['data descriptors', []]]);
  const add = (group: string, what: string, at: number, kind: 1 | 2 | 4 | 8): void => {
    groups.get(group)?.push({ what, at: base + at, kind, value: readLE(zip, at, kind) });
  };
  const eocd = zip.lastIndexOf(sigBytes(SIG.eocd));
  if (eocd < 0) throw new Error('fuzz setup: no end of central directory');
  add('end records', 'EOCD entries on this disk', eocd + 8, 2);
  add('end records', 'EOCD entry count', eocd + 10, 2);
  add('end records', 'EOCD central directory size', eocd + 12, 4);
  add('end records', 'EOCD central directory offset', eocd + 16, 4);
  add('end records', 'EOCD comment length', eocd + 20, 2);
  let cdOffset = zip.readUInt32LE(eocd + 16);
  let count = zip.readUInt16LE(eocd + 10);
  if (zip.readUInt32LE(eocd - 20) === SIG.locator) {
    add('end records', 'zip64 locator: record offset', eocd - 20 + 8, 8);
    const record = Number(zip.readBigUInt64LE(eocd - 20 + 8));
    expect(zip.readUInt32LE(record)).toBe(SIG.eocd64);
    add('end records', 'zip64 EOCD record size', record + 4, 8);
    add('end records', 'zip64 EOCD entries on this disk', record + 24, 8);
    add('end records', 'zip64 EOCD entry count', record + 32, 8);
    add('end records', 'zip64 EOCD central directory size', record + 40, 8);
    add('end records', 'zip64 EOCD central directory offset', record + 48, 8);
    cdOffset = Number(zip.readBigUInt64LE(record + 48));
    count = Number(zip.readBigUInt64LE(record + 32));
  }

  const data: Range[] = [];
  const records: Part[] = [];
  let pickle: Anatomy['pickle'];
  for (let i = 0, at = cdOffset; i < count; i++) {
    expect(zip.readUInt32LE(at)).toBe(SIG.central);
    const nameLength = zip.readUInt16LE(at + 28);
    const name = zip.toString('utf8', at + 46, at + 46 + nameLength);
    const flags = zip.readUInt16LE(at + 8);
    const size = zip.readUInt32LE(at + 24);
    const local = zip.readUInt32LE(at + 42);
    add('central headers', `central "${name}" compressed size`, at + 20, 4);
    add('central headers', `central "${name}" size`, at + 24, 4);
    add('central headers', `central "${name}" name length`, at + 28, 2);
    add('central headers', `central "${name}" extra length`, at + 30, 2);
    add('central headers', `central "${name}" comment length`, at + 32, 2);
    add('central headers', `central "${name}" local header offset`, at + 42, 4);
    expect(zip.readUInt16LE(at + 30)).toBe(0); // no zip64 extra fields in these small files
    const centralCrcAt = at + 16;

    expect(zip.readUInt32LE(local)).toBe(SIG.local);
    add('local headers', `local "${name}" compressed size`, local + 18, 4);
    add('local headers', `local "${name}" size`, local + 22, 4);
    add('local headers', `local "${name}" name length`, local + 26, 2);
    add('local headers', `local "${name}" extra length`, local + 28, 2);
    const start = local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28);
    let descriptorCrcAt = -1;
    if (flags & 0x8) {
      expect(zip.readUInt32LE(start + size)).toBe(SIG.descriptor);
      descriptorCrcAt = start + size + 4;
      add('data descriptors', `descriptor of "${name}" compressed size`, start + size + 8, 4);
      add('data descriptors', `descriptor of "${name}" size`, start + size + 12, 4);
    }
    if (/\/data\/[^/]+$/.test(name)) data.push([base + start, base + start + size]);
    records.push({ name, range: [start, start + size] });
    if (name.endsWith('/data.pkl')) {
      const range: Range = [base + start, base + start + size];
      const recrc = (bytes: Buffer): void => {
        const crc = crc32(bytes.subarray(range[0], range[1]));
        bytes.writeUInt32LE(crc, base + centralCrcAt);
        if (descriptorCrcAt >= 0) bytes.writeUInt32LE(crc, base + descriptorCrcAt);
      };
      pickle = { range, recrc };
      const fixup = (bytes: Buffer): string => {
        recrc(bytes);
        return ' (CRC-32 updated)';
      };
      groups.set('pickle', pickleFields(zip.subarray(start, start + size), base + start, fixup));
    }
    at += 46 + nameLength + zip.readUInt16LE(at + 30) + zip.readUInt16LE(at + 32);
  }
  expect(pickle).toBeDefined();
  // Another pickle: the same records in the same order, rewritten with sizes in the local headers.
  const withPickle = (newPickle: Buffer): Buffer =>
    storedZip(records.map((r) => ({ name: r.name, data: r.name.endsWith('/data.pkl') ? newPickle : zip.subarray(r.range[0], r.range[1]) })));
  return { data, fieldGroups: groups, pickle, withPickle };
}

export function safetensorsAnatomy(file: Buffer): Anatomy {
  const headerLength = Number(file.readBigUInt64LE(0));
  const headerLengthField: Field = { what: 'safetensors header length', at: 0, kind: 8, value: BigInt(headerLength) };
  return { data: [[8 + headerLength, file.length]], fieldGroups: new Map([['header length', [headerLengthField]]]) };
}

const TAR_BLOCK = 512;

/** Rewrites a tar header's checksum (the sum of its bytes, the checksum field counted as spaces). */
function tarChecksum(bytes: Buffer, header: number): void {
  bytes.fill(0x20, header + 148, header + 156);
  let sum = 0;
  for (let i = header; i < header + TAR_BLOCK; i++) sum += bytes[i];
  bytes.write(`${sum.toString(8).padStart(6, '0')}\0 `, header + 148, 'latin1');
}

interface TarAnatomy extends Anatomy {
  /** Where params.json's bytes are. */
  readonly params: Range;
}

/** The tar's member size fields, and the zip anatomy of its consolidated.00.pth. */
export function tarAnatomy(file: Buffer): TarAnatomy {
  const sizes: Field[] = [];
  const headers: Field[] = [];
  const members: Part[] = [];
  let pth: Anatomy | null = null;
  let params: Range | null = null;
  for (let header = 0; header + TAR_BLOCK <= file.length && file[header] !== 0; ) {
    const name = file.toString('latin1', header, header + 100).replace(/\0.*$/s, '');
    const size = parseInt(file.toString('latin1', header + 124, header + 136).replace(/\0.*$/s, ''), 8);
    const fixup = (bytes: Buffer, rng: Rng): string => {
      if (rng.next() < 0.15) return ' (checksum left stale)';
      tarChecksum(bytes, header);
      return ' (checksum updated)';
    };
    sizes.push({ what: `tar size of "${name}"`, at: header + 124, kind: 'tar-size', value: BigInt(size), fixup });
    headers.push({ what: `tar type of "${name}"`, at: header + 156, kind: 'tar-type', value: BigInt(file[header + 156]), fixup });
    headers.push({ what: `tar name "${name}"`, at: header, kind: 'tar-name', value: 0n, fixup });
    const start = header + TAR_BLOCK;
    members.push({ name, range: [start, start + size] });
    if (name.endsWith('consolidated.00.pth')) pth = zipAnatomy(file, start, size);
    if (name.endsWith('params.json')) params = [start, start + size];
    header = start + Math.ceil(size / TAR_BLOCK) * TAR_BLOCK;
  }
  if (!pth || !params) throw new Error('fuzz setup: tiny.tar lacks consolidated.00.pth or params.json');
  const groups = new Map(pth.fieldGroups);
  groups.set('tar size fields', sizes);
  groups.set('tar type flags and names', headers);
  const pthWithPickle = pth.withPickle as (pickle: Buffer) => Buffer;
  const withPickle = (pickle: Buffer): Buffer =>
    ustar(members.map((m) => ({ name: m.name, data: m.name.endsWith('consolidated.00.pth') ? pthWithPickle(pickle) : file.subarray(m.range[0], m.range[1]) })));
  return { data: pth.data, fieldGroups: groups, pickle: pth.pickle, withPickle, params };
}

/** A plain ustar archive of regular files (names under 100 bytes), ending in two zero blocks. */
function ustar(members: { name: string; data: Uint8Array }[]): Buffer {
  const parts: Buffer[] = [];
  for (const m of members) {
    const header = Buffer.alloc(TAR_BLOCK);
    header.write(m.name, 0, 'latin1');
    header.write('0000644\0', 100, 'latin1');
    header.write('0000000\0', 108, 'latin1');
    header.write('0000000\0', 116, 'latin1');
    header.write(`${m.data.length.toString(8).padStart(11, '0')}\0`, 124, 'latin1');
    header.write('00000000000\0', 136, 'latin1');
    header.write('0', 156, 'latin1');
    header.write('ustar\x0000', 257, 'latin1');
    tarChecksum(header, 0);
    parts.push(header, Buffer.from(m.data), Buffer.alloc((TAR_BLOCK - (m.data.length % TAR_BLOCK)) % TAR_BLOCK));
  }
  parts.push(Buffer.alloc(2 * TAR_BLOCK));
  return Buffer.concat(parts);
}
