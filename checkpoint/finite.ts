/**
 * Finding NaN and Inf among weights as they are read, cheaply: a value is not finite when its
 * exponent bits are all ones (bf16: 0x7f80 of each 16 bits, f16: 0x7c00, f32: 0x7f800000), so the
 * scan looks only at bits, two 16-bit values per 32-bit word, without branching: adding one to the
 * lowest exponent bit carries into the sign bit exactly when the exponent is all ones, and the
 * carries of a whole tensor are OR-ed together. Only a tensor that has some is scanned again to
 * count them.
 */
import type { WeightDtype } from './types';

/** What a tensor holds that is not a finite number. */
export interface NonFiniteCount {
  nan: number;
  inf: number;
  /** Index of the first one. */
  first: number;
}

/** A tensor of a checkpoint with NaN or Inf values. */
export interface NonFiniteWeights extends NonFiniteCount {
  /** The checkpoint (file, folder or tar) it was read from. */
  readonly file: string;
  readonly tensor: string;
  readonly numel: number;
}

/** Per dtype: the exponent mask of one value, and the lowest exponent bit. */
const EXPONENT: Record<WeightDtype, { mask: number; low: number; mantissa: number }> = {
  bfloat16: { mask: 0x7f80, low: 0x0080, mantissa: 0x007f },
  float16: { mask: 0x7c00, low: 0x0400, mantissa: 0x03ff },
  float32: { mask: 0x7f800000, low: 0x00800000, mantissa: 0x007fffff },
};

/** True when some 16-bit value of `data` has an all-ones exponent (`mask`, lowest bit `low`). */
function any16(data: Uint16Array, mask: number, low: number): boolean {
  if (data.length === 0) return false;
  let i = 0;
  let carries = 0;
  // Leading value when the array does not start on a 4-byte boundary.
  if (data.byteOffset % 4 !== 0 && data.length > 0) carries |= (data[i++] & mask) + low;
  const words = (data.length - i) >> 1;
  const u32 = new Uint32Array(data.buffer, data.byteOffset + 2 * i, words);
  const mask2 = (mask | (mask << 16)) >>> 0;
  const low2 = (low | (low << 16)) >>> 0;
  // Four accumulators: about 15% faster than one in V8.
  let c1 = 0;
  let c2 = 0;
  let c3 = 0;
  const end4 = words & ~3;
  let w = 0;
  for (; w < end4; w += 4) {
    carries |= (u32[w] & mask2) + low2;
    c1 |= (u32[w + 1] & mask2) + low2;
    c2 |= (u32[w + 2] & mask2) + low2;
    c3 |= (u32[w + 3] & mask2) + low2;
  }
  for (; w < words; w++) carries |= (u32[w] & mask2) + low2;
  carries |= c1 | c2 | c3;
  for (i += 2 * words; i < data.length; i++) carries |= (data[i] & mask) + low;
  return (carries & 0x80008000) !== 0;
}

function any32(data: Float32Array): boolean {
  const u32 = new Uint32Array(data.buffer, data.byteOffset, data.length);
  let carries = 0;
  for (let w = 0; w < u32.length; w++) carries |= (u32[w] & 0x7f800000) + 0x00800000;
  return (carries & 0x80000000) !== 0;
}

/** The NaN and Inf values of `data` (raw bits of `dtype`), or null when every value is finite. */
export function findNonFinite(dtype: WeightDtype, data: Uint16Array | Float32Array): NonFiniteCount | null {
  const { mask, low, mantissa } = EXPONENT[dtype];
  const found = dtype === 'float32' ? any32(data as Float32Array) : any16(data as Uint16Array, mask, low);
  if (!found) return null;
  const bits = dtype === 'float32' ? new Uint32Array(data.buffer, data.byteOffset, data.length) : (data as Uint16Array);
  const count: NonFiniteCount = { nan: 0, inf: 0, first: -1 };
  for (let i = 0; i < bits.length; i++) {
    const v = bits[i];
    if ((v & mask) !== mask) continue;
    if (count.first < 0) count.first = i;
    if (v & mantissa) count.nan++;
    else count.inf++;
  }
  return count;
}
