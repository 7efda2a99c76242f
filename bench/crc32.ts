/**
 * What checking every zip record's CRC-32 and scanning the weights for NaN / Inf cost per GB on this
 * machine (issue 10 #8): `npx ts-node --transpile-only bench/crc32.ts [MiB]` (default 512).
 * Prints seconds per GB for zlib's crc32 (what checkpoint/crc32.ts uses when Node has it), the
 * slicing-by-8 JavaScript fallback, the byte-at-a-time table it replaced, and the bf16 / f32
 * non-finite scans (checkpoint/finite.ts); then the same at Mistral 7B's 14.48 GB of bf16 weights.
 */
import { crc32, crc32Js, CRC32_IMPLEMENTATION } from '../checkpoint/crc32';
import { findNonFinite } from '../checkpoint/finite';

const MIB = Number(process.argv[2] ?? 512);
const BYTES = MIB << 20;
const GB = 1e9;
const SEVEN_B_BYTES = 14.48e9;

function byteTable(data: Uint8Array): number {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  let crc = 0xffffffff;
  for (let i = 0; i < data.length; i++) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** Best of `runs` timings of fn over data, in seconds per GB. */
function secondsPerGb(fn: () => unknown, bytes: number, runs = 3): number {
  let best = Infinity;
  for (let r = 0; r < runs; r++) {
    const start = process.hrtime.bigint();
    fn();
    best = Math.min(best, Number(process.hrtime.bigint() - start) / 1e9);
  }
  return best / (bytes / GB);
}

const data = new Uint8Array(BYTES);
// Random-looking bf16 weights: small normal-ish values, no NaN or Inf.
const words = new Uint16Array(data.buffer);
for (let i = 0; i < words.length; i++) words[i] = 0x3c00 + ((i * 2654435761) >>> 20) % 0x600;
const f32 = new Float32Array(data.buffer);
const small = data.subarray(0, Math.min(BYTES, 64 << 20));

const rows: [string, number][] = [
  [`crc32 (${CRC32_IMPLEMENTATION}, used)`, secondsPerGb(() => crc32(data), BYTES)],
  ['crc32 slicing-by-8 JS (fallback)', secondsPerGb(() => crc32Js(data), BYTES)],
  ['crc32 byte table JS (before)', secondsPerGb(() => byteTable(small), small.length, 1)],
  ['NaN/Inf scan, bf16', secondsPerGb(() => findNonFinite('bfloat16', words), BYTES)],
  ['NaN/Inf scan, f32', secondsPerGb(() => findNonFinite('float32', f32), BYTES)],
];
console.log(`${MIB} MiB buffer, Node ${process.version}, best of 3`);
for (const [name, s] of rows) {
  console.log(`${name.padEnd(36)} ${s.toFixed(3)} s/GB   ${(s * SEVEN_B_BYTES / GB).toFixed(1)} s at 7B (14.48 GB)`);
}
