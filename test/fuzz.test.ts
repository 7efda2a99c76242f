/**
 * Fuzzing the checkpoint readers (issue 3): the tiny model in every layout openModel reads (official
 * folder with consolidated.00.pth or consolidated.safetensors, HF model.safetensors and
 * pytorch_model.bin, the official .tar) is corrupted in several hundred ways, deterministic from one
 * seed: random byte flips (in the file's structure, in tensor data, anywhere), flips inside the
 * state-dict pickle with its CRC-32 made to match again (so they reach the unpickler), truncations,
 * and edits of the length and offset fields found by parsing each file here (zip local and central
 * headers, data descriptors, end-of-central-directory and zip64 records, pickle BINUNICODE lengths
 * and integers, the safetensors header length and its shape / data_offsets numbers and dtypes, tar
 * size fields, type flags and names), plus flips, truncations and value edits of params.json /
 * config.json.
 *
 * Each case opens the model with openModel, reads every tensor and validates the params. It must
 * either succeed (a flip inside tensor data is undetectable: then only the flipped values differ,
 * and a flip confined to tensor data must succeed) or throw the project's own error -- a
 * CheckpointError, or a ModelArgsError where the params were touched -- whose message is one line
 * and starts with the file it is about. Any other exception (RangeError, TypeError, Node's ERR_*),
 * a case taking over CASE_LIMIT_MS (an open that never settles is cut off there; a synchronous
 * endless loop would hang the file instead), a tensor larger than the file, or memory growing past
 * the limits below fails the test, and the failing cases are listed by seed, number and mutation.
 * The corruptions that found bugs are also kept as cases of their own at the end.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError } from '../checkpoint/errors';
import { openModel } from '../checkpoint/index';
import { crc32 } from '../checkpoint/zip';
import { BYTES_PER_ELEMENT, type RawTensor } from '../checkpoint/types';
import { ModelArgs, ModelArgsError } from '../one_file_ref';

/** The seed of the committed run; FUZZ_SEED=<n> explores another (then FUZZ_SCALE=<k> runs k times as many cases). */
const SEED = Number(process.env.FUZZ_SEED ?? 20231114);
const SCALE = Number(process.env.FUZZ_SCALE ?? 1);

const FIXTURES = path.join(__dirname, '..', 'fixtures');
/** Wall time one case may take (open, read every tensor, validate the params). Tiny files take milliseconds. */
const CASE_LIMIT_MS = 3000;
/** How much one case may add to ArrayBuffer memory (the files are about 0.3 MB). */
const CASE_ARRAY_BUFFER_LIMIT = 32 << 20;
/** Longest error message accepted, after the file name (names read from a corrupt file can be 64 KB). */
const MAX_MESSAGE = 1200;
/** How much the whole run may add to the process's peak resident memory and to ArrayBuffer memory. */
const RUN_MEMORY_LIMIT = 1 << 30;

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'fuzz-test-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));

// ---------------------------------------------------------------------------------------------
// A seeded random source (mulberry32).

class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
}

// ---------------------------------------------------------------------------------------------
// Where things are in each file, found by parsing it here (independently of checkpoint/).

type Range = readonly [start: number, end: number];

/** A number stored in the file that says how long or where something is. */
interface Field {
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
interface Anatomy {
  /** Byte ranges holding tensor elements. */
  readonly data: Range[];
  /** Groups of fields; a field edit picks a group, then a field in it. */
  readonly fieldGroups: Map<string, Field[]>;
  /** The state-dict pickle (zip formats), and how to make its CRC-32 match after an edit. */
  readonly pickle?: { range: Range; recrc: (bytes: Buffer) => void };
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

function writeLE(buf: Buffer, at: number, width: 1 | 2 | 4 | 8, value: bigint): void {
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
function zipAnatomy(file: Buffer, base: number, zipLength: number): Anatomy {
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
  return { data, fieldGroups: groups, pickle };
}

function safetensorsAnatomy(file: Buffer): Anatomy {
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
function tarAnatomy(file: Buffer): TarAnatomy {
  const sizes: Field[] = [];
  const headers: Field[] = [];
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
    if (name.endsWith('consolidated.00.pth')) pth = zipAnatomy(file, start, size);
    if (name.endsWith('params.json')) params = [start, start + size];
    header = start + Math.ceil(size / TAR_BLOCK) * TAR_BLOCK;
  }
  if (!pth || !params) throw new Error('fuzz setup: tiny.tar lacks consolidated.00.pth or params.json');
  const groups = new Map(pth.fieldGroups);
  groups.set('tar size fields', sizes);
  groups.set('tar type flags and names', headers);
  return { data: pth.data, fieldGroups: groups, pickle: pth.pickle, params };
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/** A uniformly chosen offset in `ranges` (half-open, not empty). */
function offsetIn(rng: Rng, ranges: readonly Range[]): number {
  const total = ranges.reduce((n, [a, b]) => n + (b - a), 0);
  let k = rng.int(total);
  for (const [a, b] of ranges) {
    if (k < b - a) return a + k;
    k -= b - a;
  }
  throw new Error('unreachable');
}

/** [0, size) minus `data`. */
function complement(data: readonly Range[], size: number): Range[] {
  const out: Range[] = [];
  let at = 0;
  for (const [a, b] of [...data].sort((x, y) => x[0] - y[0])) {
    if (a > at) out.push([at, a]);
    at = Math.max(at, b);
  }
  if (at < size) out.push([at, size]);
  return out;
}

/** XORs 1 to 8 distinct bytes chosen in `ranges` with non-zero values; returns their offsets. */
function flipBytes(rng: Rng, bytes: Buffer, ranges: readonly Range[], most = 8): number[] {
  const count = 1 + rng.int(most);
  const offsets = new Set<number>();
  while (offsets.size < count) offsets.add(offsetIn(rng, ranges));
  for (const at of offsets) bytes[at] ^= 1 + rng.int(255);
  return [...offsets].sort((a, b) => a - b);
}

/** Values worth trying in a field that holds `value`. */
function candidateValues(rng: Rng, value: bigint, width: 1 | 2 | 4 | 8, fileSize: number): bigint[] {
  const max = (1n << BigInt(8 * width)) - 1n;
  const size = BigInt(fileSize);
  const values = [0n, 1n, value - 1n, value + 1n, value * 2n, value / 2n, max, max - 1n, max >> 1n, (max >> 1n) + 1n, size, size + 1n, size - value];
  if (width === 8) values.push(1n << 32n, 1n << 53n, (1n << 53n) + 1n, 1n << 62n);
  values.push(BigInt(rng.int(2 ** 31)) & max);
  return [...new Set(values)].filter((v) => v >= 0n && v <= max && v !== value);
}

/** Writes `value` into a tar size field in one of the encodings tar readers meet (or garbage). */
function writeTarSize(rng: Rng, bytes: Buffer, at: number, value: bigint): string {
  const style = rng.int(10);
  if (style === 0) {
    const garbage = rng.pick(['zzzzzzzzzzz\0', '           \0', '-0000000001\0', '\0\0\0\0\0\0\0\0\0\0\0\0', '0x100000000\0']);
    bytes.write(garbage, at, 'latin1');
    return JSON.stringify(garbage);
  }
  const octal = value.toString(8);
  if (style === 1 || octal.length > 11) {
    // base-256 (GNU): 0x80, then the value big-endian in the other 11 bytes
    bytes[at] = 0x80;
    for (let i = 0; i < 11; i++) bytes[at + 11 - i] = Number((value >> BigInt(8 * i)) & 0xffn);
    return `${value} (base-256)`;
  }
  bytes.write(`${octal.padStart(11, '0')}\0`, at, 'latin1');
  return `${value}`;
}

function editField(rng: Rng, bytes: Buffer, field: Field, fileSize: number): string {
  let change: string;
  if (field.kind === 'tar-type') {
    // regular, hard link, symlink, folder, FIFO, contiguous, pax, pax global, GNU long name / link, GNU sparse, NUL
    const type = rng.pick(['0', '1', '2', '5', '6', '7', 'x', 'g', 'L', 'K', 'S', '\0']);
    bytes.write(type, field.at, 'latin1');
    change = JSON.stringify(type);
  } else if (field.kind === 'tar-name') {
    const name = rng.pick(['tiny/params.json', 'tiny/consolidated.00.pth', 'tiny/tokenizer.model', 'params.json', 'other/params.json', './tiny/consolidated.00.pth', 'a/b/params.json', '', '/']);
    bytes.fill(0, field.at, field.at + 100);
    bytes.write(name, field.at, 'latin1');
    change = JSON.stringify(name);
  } else if (field.kind === 'tar-size') {
    const v = field.value;
    const value = rng.pick([0n, v - 1n, v + 1n, v + 511n, v + 512n, v > 512n ? v - 512n : 1n, BigInt(fileSize), 8n ** 11n - 1n, 1n << 40n, 1n << 62n]);
    change = writeTarSize(rng, bytes, field.at, value);
  } else {
    const value = rng.pick(candidateValues(rng, field.value, field.kind as 1 | 2 | 4 | 8, fileSize));
    writeLE(bytes, field.at, field.kind as 1 | 2 | 4 | 8, value);
    change = `${value}`;
  }
  return `${field.what} ${field.value} -> ${change}${field.fixup ? field.fixup(bytes, rng) : ''}`;
}

/**
 * Rewrites one number or dtype in a safetensors header (shape, data_offsets or dtype), padding the
 * header with spaces to its old length when the text got shorter and moving the data when longer.
 */
function editSafetensorsHeader(rng: Rng, file: Buffer): { bytes: Buffer; what: string } {
  const length = Number(file.readBigUInt64LE(0));
  const text = file.toString('utf8', 8, 8 + length);
  const spots: { at: number; old: string; kind: string }[] = [];
  for (const m of text.matchAll(/"(shape|data_offsets)":\[([0-9,]*)\]/g)) {
    let at = (m.index ?? 0) + m[0].indexOf('[') + 1;
    for (const number of m[2].split(',')) {
      if (number !== '') spots.push({ at, old: number, kind: m[1] });
      at += number.length + 1;
    }
  }
  for (const m of text.matchAll(/"dtype":"([A-Z0-9_]+)"/g)) spots.push({ at: (m.index ?? 0) + 9, old: m[1], kind: 'dtype' });
  const spot = rng.pick(spots);
  let replacement: string;
  if (spot.kind === 'dtype') {
    replacement = rng.pick(['BF16', 'F16', 'F32', 'F64', 'I64', 'U8', 'F8_E4M3', 'bf16', 'X']);
  } else {
    const v = Number(spot.old);
    const dataSize = file.length - 8 - length;
    replacement = rng.pick([
      '-1', '0', '1', `${v - 1}`, `${v + 1}`, `${v * 2}`, `${dataSize}`, `${dataSize + 1}`, '4294967296',
      '9007199254740991', '9007199254740993', '1e308', '0.5', '"1"', 'null', '[]', `${v}0`,
    ]);
  }
  let header = text.slice(0, spot.at) + replacement + text.slice(spot.at + spot.old.length);
  if (header.length < length) header = header.padEnd(length, ' ');
  const headerBytes = Buffer.from(header, 'utf8');
  const bytes = Buffer.alloc(8 + headerBytes.length + file.length - 8 - length);
  bytes.writeBigUInt64LE(BigInt(headerBytes.length), 0);
  headerBytes.copy(bytes, 8);
  file.copy(bytes, 8 + headerBytes.length, 8 + length);
  return { bytes, what: `header ${spot.kind} "${spot.old}" -> ${replacement}` };
}

/** Sets one number of params.json / config.json to another value (or another type). */
function editJsonNumber(rng: Rng, json: Buffer, name: string): { bytes: Buffer; what: string } {
  const text = json.toString('utf8');
  const spot = rng.pick([...text.matchAll(/"(\w+)":\s*(-?[0-9][0-9.e+-]*)/g)]);
  const old = spot[2];
  const v = Number(old);
  const replacement = rng.pick(['0', '-1', '1', '2', '3', '1.5', `${v * 2}`, `${v / 2}`, `${v + 1}`, '1e308', '9007199254740993', '"16"', 'null', 'true', '[]']);
  const at = (spot.index ?? 0) + spot[0].length - old.length;
  const bytes = Buffer.from(text.slice(0, at) + replacement + text.slice(at + old.length), 'utf8');
  return { bytes, what: `${name} "${spot[1]}": ${old} -> ${replacement}` };
}

// ---------------------------------------------------------------------------------------------
// The formats and their cases.

interface Format {
  readonly name: string;
  /** Where openModel is pointed: a folder under TMP, or the tar there. */
  readonly modelPath: string;
  /** The weights file that gets mutated (the tar itself for the tar). */
  readonly weightsFile: string;
  readonly weights: Buffer;
  /** params.json / config.json: its own file, or (in the tar) a range of the tar. */
  readonly paramsFile: string;
  readonly params: Buffer | Range;
  readonly anatomy: Anatomy;
  readonly safetensors: boolean;
}

/** Each format gets its own copy under TMP. */
let copies = 0;

function folderFormat(name: string, fixture: string, weightsName: string, paramsName: string): Format {
  const dir = path.join(TMP, `${path.basename(fixture)}-${copies++}`);
  fs.mkdirSync(dir);
  for (const f of fs.readdirSync(fixture)) fs.copyFileSync(path.join(fixture, f), path.join(dir, f));
  const weights = fs.readFileSync(path.join(fixture, weightsName));
  const safetensors = weightsName.endsWith('.safetensors');
  return {
    name,
    modelPath: dir,
    weightsFile: path.join(dir, weightsName),
    weights,
    paramsFile: path.join(dir, paramsName),
    params: fs.readFileSync(path.join(fixture, paramsName)),
    anatomy: safetensors ? safetensorsAnatomy(weights) : zipAnatomy(weights, 0, weights.length),
    safetensors,
  };
}

const TAR_NAME = 'official .tar';

function tarFormat(): Format {
  const tar = path.join(TMP, `tiny-${copies++}.tar`);
  const weights = fs.readFileSync(path.join(FIXTURES, 'tiny.tar'));
  const anatomy = tarAnatomy(weights);
  return { name: TAR_NAME, modelPath: tar, weightsFile: tar, weights, paramsFile: tar, params: anatomy.params, anatomy, safetensors: false };
}

/** One corrupted model: what to write, and what the outcome may be. */
interface Case {
  readonly what: string;
  readonly kind: string;
  /** The weights file (or tar) to write. */
  readonly weights: Buffer;
  /** params.json / config.json to write (folder formats). */
  readonly params?: Buffer;
  readonly paramsTouched: boolean;
  /** Every flipped byte lies in tensor data: the model must open, and at most this many elements differ. */
  readonly dataFlips?: number;
}

/** How many cases of each kind, per format. */
const COUNTS = {
  flipsInStructure: 16,
  flipsInData: 8,
  flipsAnywhere: 12,
  pickleFlips: 12,
  truncations: 24,
  fieldEditsPerGroup: 12,
  headerEdits: 48,
  paramsEdits: 12,
};

function* casesFor(format: Format, rng: Rng): Generator<Case> {
  for (let round = 0; round < SCALE; round++) yield* roundOfCases(format, rng);
}

function* roundOfCases(format: Format, rng: Rng): Generator<Case> {
  const original = format.weights;
  const size = original.length;
  const { anatomy } = format;
  const structure = complement(anatomy.data, size);
  const show = (offsets: number[]): string => offsets.join(',');
  // In the tar, params.json is a member among the bytes flipped.
  const paramsRange = Buffer.isBuffer(format.params) ? null : format.params;
  const inParams = (offsets: number[]): boolean => paramsRange !== null && offsets.some((o) => o >= paramsRange[0] && o < paramsRange[1]);

  for (let i = 0; i < COUNTS.flipsInStructure; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, structure);
    yield { kind: 'flip (structure)', what: `flip bytes ${show(offsets)} outside tensor data`, weights: bytes, paramsTouched: inParams(offsets) };
  }
  for (let i = 0; i < COUNTS.flipsInData; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, anatomy.data);
    yield { kind: 'flip (tensor data)', what: `flip bytes ${show(offsets)} in tensor data`, weights: bytes, paramsTouched: false, dataFlips: offsets.length };
  }
  for (let i = 0; i < COUNTS.flipsAnywhere; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, [[0, size]]);
    yield { kind: 'flip (anywhere)', what: `flip bytes ${show(offsets)}`, weights: bytes, paramsTouched: inParams(offsets) };
  }
  if (anatomy.pickle) {
    const { range, recrc } = anatomy.pickle;
    for (let i = 0; i < COUNTS.pickleFlips; i++) {
      const bytes = Buffer.from(original);
      const offsets = flipBytes(rng, bytes, [range], 4);
      recrc(bytes);
      yield { kind: 'flip (pickle, CRC-32 updated)', what: `flip pickle bytes ${show(offsets.map((o) => o - range[0]))} (CRC-32 updated)`, weights: bytes, paramsTouched: false };
    }
  }
  for (let i = 0; i < COUNTS.truncations; i++) {
    const at = i % 2 === 0 ? rng.int(size) : offsetIn(rng, structure);
    yield { kind: 'truncation', what: `truncate to ${at} of ${size} bytes`, weights: original.subarray(0, at), paramsTouched: false };
  }
  const groups = [...anatomy.fieldGroups].filter(([, fields]) => fields.length > 0);
  for (let i = 0; i < COUNTS.fieldEditsPerGroup * groups.length; i++) {
    const [group, fields] = groups[i % groups.length];
    const bytes = Buffer.from(original);
    yield { kind: `length field (${group})`, what: editField(rng, bytes, rng.pick(fields), size), weights: bytes, paramsTouched: false };
  }
  if (format.safetensors) {
    for (let i = 0; i < COUNTS.headerEdits; i++) {
      const { bytes, what } = editSafetensorsHeader(rng, original);
      yield { kind: 'header shape/data_offsets/dtype', what, weights: bytes, paramsTouched: false };
    }
  }
  for (let i = 0; i < COUNTS.paramsEdits; i++) {
    if (Buffer.isBuffer(format.params)) {
      const params = format.params;
      const name = path.basename(format.paramsFile);
      let bytes: Buffer = Buffer.from(params);
      let what: string;
      if (i % 3 === 0) {
        what = `flip ${name} bytes ${show(flipBytes(rng, bytes, [[0, params.length]], 3))}`;
      } else if (i % 3 === 1) {
        const at = rng.int(params.length);
        bytes = bytes.subarray(0, at);
        what = `truncate ${name} to ${at} bytes`;
      } else {
        ({ bytes, what } = editJsonNumber(rng, params, name));
      }
      yield { kind: 'params', what, weights: original, params: bytes, paramsTouched: true };
    } else {
      const bytes = Buffer.from(original);
      const offsets = flipBytes(rng, bytes, [format.params], 3);
      yield { kind: 'params', what: `flip params.json member bytes ${show(offsets.map((o) => o - (format.params as Range)[0]))}`, weights: bytes, paramsTouched: true };
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Running a case.

type Outcome = 'opened' | 'clean error';

class Hang extends Error {}

async function withinLimit<T>(work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Hang(`no answer after ${CASE_LIMIT_MS} ms`)), CASE_LIMIT_MS);
  });
  try {
    return await Promise.race([work, limit]);
  } finally {
    clearTimeout(timer);
  }
}

/** Elements whose bits differ between two reads of a tensor. */
function differing(a: RawTensor, b: RawTensor): number {
  if (a.dtype !== b.dtype || a.data.length !== b.data.length) return Number.POSITIVE_INFINITY;
  let n = 0;
  const x = a.dtype === 'float32' ? new Uint32Array(a.data.buffer, a.data.byteOffset, a.data.length) : a.data;
  const y = b.dtype === 'float32' ? new Uint32Array(b.data.buffer, b.data.byteOffset, b.data.length) : b.data;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) n++;
  return n;
}

/** Opens the model, reads every tensor raw and widened, and validates the params. Returns the elements that differ from `reference`. */
async function openAndRead(format: Format, fileSize: number, reference: Map<string, RawTensor> | null, memory: MemoryWatch): Promise<number> {
  const model = await withinLimit(openModel(format.modelPath));
  memory.sample();
  let changed = 0;
  try {
    for (const [name, info] of model.weights.tensors) {
      const raw = model.weights.readRaw(name);
      if (raw.data.length !== info.numel) throw new Error(`tensor "${name}" read ${raw.data.length} elements, its info says ${info.numel}`);
      if (info.numel * BYTES_PER_ELEMENT[info.dtype] > fileSize) throw new Error(`tensor "${name}" of ${info.numel} ${info.dtype} is larger than the ${fileSize}-byte file`);
      if (model.weights.read(name).length !== info.numel) throw new Error(`tensor "${name}" widened to the wrong length`);
      const ref = reference?.get(name);
      changed += ref ? differing(ref, raw) : raw.data.length;
      memory.sample();
    }
    ModelArgs.fromParams(model.params, model.paramsFile);
  } finally {
    model.close();
  }
  return changed;
}

/** Process memory: the peak over the run, and the growth within one case. */
class MemoryWatch {
  private readonly startRss = process.resourceUsage().maxRSS * 1024;
  private readonly startArrayBuffers = process.memoryUsage().arrayBuffers;
  peakArrayBuffers = this.startArrayBuffers;
  private caseStart = 0;
  caseGrowth = 0;

  startCase(): void {
    this.caseStart = process.memoryUsage().arrayBuffers;
    this.caseGrowth = 0;
  }

  sample(): void {
    const now = process.memoryUsage().arrayBuffers;
    this.peakArrayBuffers = Math.max(this.peakArrayBuffers, now);
    this.caseGrowth = Math.max(this.caseGrowth, now - this.caseStart);
  }

  get runGrowth(): { rss: number; arrayBuffers: number } {
    return { rss: process.resourceUsage().maxRSS * 1024 - this.startRss, arrayBuffers: this.peakArrayBuffers - this.startArrayBuffers };
  }
}

interface Tally {
  cases: number;
  opened: number;
  cleanErrors: number;
  byKind: Map<string, { cases: number; opened: number }>;
  slowestMs: number;
  /** Elements found changed over the cases that flipped bytes in tensor data only. */
  dataFlipChanges: number;
}

const tallies = new Map<string, Tally>();
const memory = new MemoryWatch();

/** Runs the cases of `format`; returns a line per failure. */
async function fuzz(format: Format, seed: number): Promise<string[]> {
  fs.writeFileSync(format.weightsFile, format.weights);
  const pristine = await openModel(format.modelPath);
  const reference = new Map<string, RawTensor>();
  for (const name of pristine.weights.tensors.keys()) {
    const raw = pristine.weights.readRaw(name);
    reference.set(name, { dtype: raw.dtype, shape: raw.shape, data: raw.data.slice() });
  }
  pristine.close();

  const failures: string[] = [];
  const tally: Tally = { cases: 0, opened: 0, cleanErrors: 0, byKind: new Map(), slowestMs: 0, dataFlipChanges: 0 };
  tallies.set(format.name, tally);
  const rng = new Rng(seed);
  let index = 0;
  for (const c of casesFor(format, rng)) {
    const label = `${format.name}, seed ${seed}, case ${index++}: ${c.what}`;
    fs.writeFileSync(format.weightsFile, c.weights);
    if (Buffer.isBuffer(format.params)) fs.writeFileSync(format.paramsFile, c.params ?? format.params);
    // An error must name the file it is about: the mutated one (either file of the pair when config.json was touched).
    const files = c.paramsTouched ? [format.paramsFile, format.weightsFile] : [format.weightsFile];

    memory.startCase();
    const started = performance.now();
    let outcome: Outcome | null = null;
    try {
      const changed = await openAndRead(format, c.weights.length, reference, memory);
      outcome = 'opened';
      if (c.dataFlips !== undefined) {
        tally.dataFlipChanges += changed;
        if (changed > c.dataFlips) failures.push(`${label}: ${changed} elements differ after ${c.dataFlips} flipped bytes`);
      }
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      const shown = JSON.stringify(message.length > 400 ? `${message.slice(0, 400)}...` : message);
      const ours = err instanceof CheckpointError || (c.paramsTouched && err instanceof ModelArgsError);
      if (!ours) {
        failures.push(`${label}: threw ${err instanceof Error ? err.name : typeof err} (not a CheckpointError): ${shown}`);
      } else if (/[\r\n\v\f\u0085\u2028\u2029]/.test(message)) {
        failures.push(`${label}: message is not one line: ${shown}`);
      } else if (message.length > MAX_MESSAGE + files[0].length) {
        failures.push(`${label}: message of ${message.length} characters: ${shown}`);
      } else if (!files.some((f) => message.startsWith(`${f}:`) || message.startsWith(`${f} (`))) {
        failures.push(`${label}: message does not start with the file (${files.join(' or ')}): ${shown}`);
      } else {
        outcome = 'clean error';
      }
      if (c.dataFlips !== undefined) failures.push(`${label}: a flip inside tensor data must not be an error, got: ${shown}`);
    }
    const elapsed = performance.now() - started;
    memory.sample();
    if (elapsed > CASE_LIMIT_MS) failures.push(`${label}: took ${Math.round(elapsed)} ms (limit ${CASE_LIMIT_MS})`);
    if (memory.caseGrowth > CASE_ARRAY_BUFFER_LIMIT) failures.push(`${label}: ArrayBuffer memory grew ${memory.caseGrowth} bytes in one case`);

    tally.cases++;
    tally.slowestMs = Math.max(tally.slowestMs, elapsed);
    if (outcome === 'opened') tally.opened++;
    if (outcome === 'clean error') tally.cleanErrors++;
    const kind = tally.byKind.get(c.kind) ?? { cases: 0, opened: 0 };
    kind.cases++;
    if (outcome === 'opened') kind.opened++;
    tally.byKind.set(c.kind, kind);
  }
  return failures;
}

// ---------------------------------------------------------------------------------------------

const FORMATS: (() => Format)[] = [
  () => folderFormat('official folder (consolidated.00.pth)', path.join(FIXTURES, 'tiny'), 'consolidated.00.pth', 'params.json'),
  () => folderFormat('official folder (consolidated.safetensors)', path.join(FIXTURES, 'formats', 'tiny-safetensors'), 'consolidated.safetensors', 'params.json'),
  () => folderFormat('HF folder (model.safetensors)', path.join(FIXTURES, 'formats', 'tiny-hf'), 'model.safetensors', 'config.json'),
  () => folderFormat('HF folder (pytorch_model.bin)', path.join(FIXTURES, 'formats', 'tiny-hf-bin'), 'pytorch_model.bin', 'config.json'),
  tarFormat,
];

describe(`fuzzing every checkpoint layout (seed ${SEED})`, () => {
  FORMATS.forEach((makeFormat, i) => {
    it(`format ${i}: every corruption opens, or fails with a one-line error naming the file, in time and bounded memory`, async () => {
      const format = makeFormat();
      const failures = await fuzz(format, SEED + i);
      expect(failures).toEqual([]);
      const tally = tallies.get(format.name) as Tally;
      // A flip inside tensor data changes what is read (the check above bounds how much).
      expect(tally.dataFlipChanges).toBeGreaterThan(0);
      // Truncated files never open; a tar may, when cut after the last member it needs.
      if (format.name !== TAR_NAME) expect(tally.byKind.get('truncation')?.opened).toBe(0);
    });
  });

  it('ran at least 500 cases, every flip inside tensor data opened, and memory stayed bounded', () => {
    const lines: string[] = [`fuzz summary (seed ${SEED}):`];
    let total = 0;
    const kinds = new Map<string, { cases: number; opened: number }>();
    for (const [name, t] of tallies) {
      total += t.cases;
      lines.push(`  ${name}: ${t.cases} cases, ${t.opened} opened, ${t.cleanErrors} clean errors, slowest ${t.slowestMs.toFixed(0)} ms`);
      for (const [kind, k] of t.byKind) {
        const sum = kinds.get(kind) ?? { cases: 0, opened: 0 };
        kinds.set(kind, { cases: sum.cases + k.cases, opened: sum.opened + k.opened });
      }
    }
    for (const [kind, k] of kinds) lines.push(`    ${kind}: ${k.cases} cases, ${k.opened} opened`);
    const growth = memory.runGrowth;
    lines.push(`  peak RSS growth ${(growth.rss / 2 ** 20).toFixed(0)} MiB, peak ArrayBuffer growth ${(growth.arrayBuffers / 2 ** 20).toFixed(1)} MiB`);
    console.log(lines.join('\n'));

    expect(tallies.size).toBe(FORMATS.length);
    expect(total).toBeGreaterThanOrEqual(500);
    const dataFlips = kinds.get('flip (tensor data)') as { cases: number; opened: number };
    expect(dataFlips.opened).toBe(dataFlips.cases);
    expect(growth.rss).toBeLessThan(RUN_MEMORY_LIMIT);
    expect(growth.arrayBuffers).toBeLessThan(RUN_MEMORY_LIMIT);
  });
});

// ---------------------------------------------------------------------------------------------
// What the fuzzer found (seed 20231114), kept as cases of their own.

describe('corruptions the fuzzer found', () => {
  /** Opens the model with the field `what` of its weights set to `value` and reads every tensor; returns the error message. */
  async function messageWith(format: Format, what: string, value: bigint): Promise<string> {
    const field = [...format.anatomy.fieldGroups.values()].flat().find((f) => f.what === what);
    if (!field || typeof field.kind !== 'number') throw new Error(`no field ${what}`);
    const bytes = Buffer.from(format.weights);
    writeLE(bytes, field.at, field.kind, value);
    fs.writeFileSync(format.weightsFile, bytes);
    let caught: unknown;
    try {
      const model = await openModel(format.modelPath);
      try {
        for (const name of model.weights.tensors.keys()) model.weights.read(name);
      } finally {
        model.close();
      }
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(CheckpointError);
    const message = (caught as Error).message;
    expect(message.startsWith(`${format.weightsFile}:`)).toBe(true);
    expect(message).not.toMatch(/[\r\n\v\f\u0085\u2028\u2029\u0000-\u0008]/);
    expect(message.length).toBeLessThan(format.weightsFile.length + MAX_MESSAGE);
    return message;
  }

  it('a local header name length of 62249: the name read from the corrupt header (storage bytes, CR and NUL) is shown on one short line', async () => {
    const format = folderFormat('regression .bin', path.join(FIXTURES, 'formats', 'tiny-hf-bin'), 'pytorch_model.bin', 'config.json');
    const message = await messageWith(format, 'local "pytorch_model/data/10" name length', 62249n);
    // zip.ts compares the local header's name with the central directory's.
    expect(message).toMatch(/local header at offset \d+ names "pytorch_model\/data\/10FB.*\[\.\.\. \d+ characters left out \.\.\.\]/);
  });

  it('the same in the tar, where the stream reader meets the name first', async () => {
    const tar = tarFormat();
    const message = await messageWith(tar, 'local "consolidated.00/data/19" name length', 65534n);
    expect(message).toMatch(/^\S+tiny-\d+\.tar:tiny\/consolidated\.00\.pth: .*record "consolidated\.00\/data\/19FB.*characters left out/);
  });

  it('CheckpointError folds every line break and escapes other control characters', () => {
    const err = new CheckpointError('model.pth', 'record "a\r\nb\u2028c\x1b[2Jd\u0000" is bad');
    expect(err.message).toBe('model.pth: record "a b c\\x1b[2Jd\\x00" is bad');
  });
});
