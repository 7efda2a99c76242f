/**
 * Widening 16-bit floats to float32. bfloat16 is the top half of a float32, so widening is a
 * 16-bit shift; float16 goes through a table of all 65536 patterns (subnormals, inf and NaN included).
 */
import * as os from 'os';
import type { RawTensor } from './types';

/** float16 bits -> float32 bits for all 65536 halves, built on first use (also the compute pool's Q8_0 scales). */
let halfTable: Uint32Array | null = null;

export function halfToFloatTable(): Uint32Array {
  if (halfTable) return halfTable;
  const table = new Uint32Array(65536);
  const asFloat = new Float32Array(table.buffer);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exponent = (h >> 10) & 0x1f;
    const mantissa = h & 0x3ff;
    if (exponent === 0) {
      // zero or subnormal: mantissa * 2^-24, exact in float32
      asFloat[h] = (sign ? -1 : 1) * mantissa * 2 ** -24;
    } else if (exponent === 0x1f) {
      // inf, or nan with its payload kept and the quiet bit set (what torch's .float() gives)
      table[h] = sign | 0x7f800000 | (mantissa << 13) | (mantissa ? 0x00400000 : 0);
    } else {
      table[h] = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
  }
  halfTable = table;
  return table;
}

/** Writes the float32 values of 16-bit `src` into `dst` (same length) from `dst[offset]` on. */
export function widen16(dtype: 'bfloat16' | 'float16', src: Uint16Array, dst: Float32Array, offset = 0): void {
  const bits = new Uint32Array(dst.buffer, dst.byteOffset + offset * 4, src.length);
  if (dtype === 'bfloat16' && os.endianness() === 'LE') {
    // In bulk, by native copies rather than a loop over JavaScript numbers (about 1.5x faster on
    // Mistral 7B's layers): each value into the low half of a 32-bit word, whose bytes are then
    // [lo, hi, 0, 0]; swap32 makes them [0, 0, hi, lo] and swap16 [0, 0, lo, hi], the bf16 on top.
    bits.set(src);
    const bytes = Buffer.from(bits.buffer, bits.byteOffset, bits.byteLength);
    bytes.swap32();
    bytes.swap16();
  } else if (dtype === 'bfloat16') {
    for (let i = 0; i < src.length; i++) bits[i] = src[i] << 16;
  } else {
    const table = halfToFloatTable();
    for (let i = 0; i < src.length; i++) bits[i] = table[src[i]];
  }
}

/** A raw tensor's values as float32 (a copy for 16-bit dtypes, the same array for float32). */
export function toFloat32(raw: RawTensor): Float32Array {
  if (raw.dtype === 'float32') return raw.data as Float32Array;
  const out = new Float32Array(raw.data.length);
  widen16(raw.dtype, raw.data as Uint16Array, out);
  return out;
}
