/**
 * CRC-32 (the zip / zlib polynomial), as zip records store it, computed incrementally: zlib's own
 * (zlib.crc32, in Node >= 20.15 and 22, native and vectorised) when Node has it, else a
 * slicing-by-8 table in JavaScript. `crc32(data, previous)` continues a CRC over more bytes, so a
 * record can be checked piece by piece as it is read.
 */
import * as zlib from 'zlib';

type Crc32 = (data: Uint8Array, previous?: number) => number;

let tables: Uint32Array[] | null = null;

/** The eight 256-entry tables of slicing-by-8 (table 0 is the classic byte-at-a-time table). */
function slicingTables(): Uint32Array[] {
  if (tables) return tables;
  const t = Array.from({ length: 8 }, () => new Uint32Array(256));
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[0][n] = c >>> 0;
  }
  for (let n = 0; n < 256; n++) {
    for (let k = 1; k < 8; k++) t[k][n] = (t[0][t[k - 1][n] & 0xff] ^ (t[k - 1][n] >>> 8)) >>> 0;
  }
  tables = t;
  return t;
}

/** CRC-32 in JavaScript, eight bytes a step (slicing-by-8). */
export function crc32Js(data: Uint8Array, previous = 0): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = slicingTables();
  let crc = ~previous >>> 0;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  for (; i < end8; i += 8) {
    const a = (crc ^ (data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24))) >>> 0;
    crc =
      t7[a & 0xff] ^
      t6[(a >>> 8) & 0xff] ^
      t5[(a >>> 16) & 0xff] ^
      t4[a >>> 24] ^
      t3[data[i + 4]] ^
      t2[data[i + 5]] ^
      t1[data[i + 6]] ^
      t0[data[i + 7]];
  }
  for (; i < data.length; i++) crc = t0[(crc ^ data[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}

const native = (zlib as { crc32?: (data: Uint8Array, value?: number) => number }).crc32;

/** zlib's CRC-32, fed in pieces of at most 1 GiB (its length argument is 32-bit). */
function crc32Native(data: Uint8Array, previous = 0): number {
  const fn = native as (data: Uint8Array, value?: number) => number;
  const PIECE = 1 << 30;
  if (data.length <= PIECE) return fn(data, previous);
  let crc = previous;
  for (let at = 0; at < data.length; at += PIECE) crc = fn(data.subarray(at, Math.min(at + PIECE, data.length)), crc);
  return crc;
}

/** CRC-32 of `data`, continuing `previous` (the CRC of the bytes before it; 0 to start). */
export const crc32: Crc32 = typeof native === 'function' ? crc32Native : crc32Js;

/** Which implementation crc32 is, for the record. */
export const CRC32_IMPLEMENTATION: 'zlib' | 'javascript' = typeof native === 'function' ? 'zlib' : 'javascript';

// Combining the CRCs of adjacent pieces (zlib's crc32_combine, by its method: multiplication of
// polynomials over GF(2) modulo the CRC's, bit-reflected as the CRC is). The CRC of A followed by
// B is crc(A) times x^(8 * length of B), plus crc(B). It lets a record read in pieces, in any
// order, be checked from the pieces' own CRCs.

const POLY = 0xedb88320;

/** a(x) * b(x) modulo the CRC polynomial (reflected: x^0 is the top bit). */
function multModP(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ POLY : b >>> 1;
  }
  return p >>> 0;
}

/** x^(2^k) modulo the polynomial for k = 0..31 (indexed modulo 32 for larger k, as zlib's x2nmodp does). */
const X2N: number[] = (() => {
  const t = [0x40000000]; // x^1
  for (let k = 1; k < 32; k++) t.push(multModP(t[k - 1], t[k - 1]));
  return t;
})();

/** x^(8 * bytes) modulo the polynomial. */
function xPow8n(bytes: number): number {
  let p = 0x80000000; // x^0
  let k = 3; // 8 * bytes = bytes * 2^3
  for (let n = bytes; n > 0; n = Math.floor(n / 2), k++) {
    if (n % 2 === 1) p = multModP(X2N[k & 31], p);
  }
  return p;
}

/** The CRC-32 of A followed by B, from crc(A), crc(B) and B's length in bytes. */
export function crc32Combine(crcA: number, crcB: number, lengthB: number): number {
  return (multModP(xPow8n(lengthB), crcA) ^ crcB) >>> 0;
}
