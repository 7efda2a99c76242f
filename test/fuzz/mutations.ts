/**
 * The corruptions: a seeded random source, byte flips in chosen ranges, edits of a length or offset
 * field to values worth trying, and edits of the numbers in a safetensors header or a JSON file.
 */
import { type Field, type Range, writeLE } from './anatomy';
import type { Rng } from './rng';

/** A uniformly chosen offset in `ranges` (half-open, not empty). */
export function offsetIn(rng: Rng, ranges: readonly Range[]): number {
  const total = ranges.reduce((n, [a, b]) => n + (b - a), 0);
  let k = rng.int(total);
  for (const [a, b] of ranges) {
    if (k < b - a) return a + k;
    k -= b - a;
  }
  throw new Error('unreachable');
}

/** [0, size) minus `data`. */
export function complement(data: readonly Range[], size: number): Range[] {
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
export function flipBytes(rng: Rng, bytes: Buffer, ranges: readonly Range[], most = 8): number[] {
  const count = 1 + rng.int(most);
  const offsets = new Set<number>();
  while (offsets.size < count) offsets.add(offsetIn(rng, ranges));
  for (const at of offsets) bytes[at] ^= 1 + rng.int(255);
  return [...offsets].sort((a, b) => a - b);
}

/** Flips 1 to `most` distinct single bits in `ranges`; returns them as "byte.bit". */
export function flipBits(rng: Rng, bytes: Buffer, ranges: readonly Range[], most = 8): string[] {
  const count = 1 + rng.int(most);
  const bits = new Map<string, [number, number]>();
  while (bits.size < count) {
    const at = offsetIn(rng, ranges);
    const bit = rng.int(8);
    bits.set(`${at}.${bit}`, [at, bit]);
  }
  for (const [at, bit] of bits.values()) bytes[at] ^= 1 << bit;
  return [...bits.keys()];
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

export function editField(rng: Rng, bytes: Buffer, field: Field, fileSize: number): string {
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
export function editSafetensorsHeader(rng: Rng, file: Buffer): { bytes: Buffer; what: string } {
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
export function editJsonNumber(rng: Rng, json: Buffer, name: string): { bytes: Buffer; what: string } {
  const text = json.toString('utf8');
  const spot = rng.pick([...text.matchAll(/"(\w+)":\s*(-?[0-9][0-9.e+-]*)/g)]);
  const old = spot[2];
  const v = Number(old);
  const replacement = rng.pick(['0', '-1', '1', '2', '3', '1.5', `${v * 2}`, `${v / 2}`, `${v + 1}`, '1e308', '9007199254740993', '"16"', 'null', 'true', '[]']);
  const at = (spot.index ?? 0) + spot[0].length - old.length;
  const bytes = Buffer.from(text.slice(0, at) + replacement + text.slice(at + old.length), 'utf8');
  return { bytes, what: `${name} "${spot[1]}": ${old} -> ${replacement}` };
}
