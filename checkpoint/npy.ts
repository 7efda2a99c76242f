/**
 * Reads and writes NumPy .npy files (format versions 1, 2 and 3), little-endian
 * C-order float32 / float64 / int32 / int64 only, as used for the logits and
 * token ids dumped by the Python reference. Anything else is a CheckpointError.
 */
import * as fs from 'fs';
import * as os from 'os';
import { CheckpointError } from './errors';
import { openRegularFile, readExactly } from './files';

export type NpyDtype = 'float32' | 'float64' | 'int32' | 'int64';

export interface NpyArray {
  /** The dtype stored in the file. */
  dtype: NpyDtype;
  shape: number[];
  /** float32 -> Float32Array, float64 -> Float64Array, int32 and int64 -> Int32Array (int64 values must fit in int32). */
  data: Float32Array | Float64Array | Int32Array;
}

/** The longest header accepted (numpy's own reader stops at 10,000 bytes by default). */
const MAX_HEADER_BYTES = 1 << 20;

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // "\x93NUMPY"

const DESCR: Record<string, { dtype: NpyDtype; size: number }> = {
  '<f4': { dtype: 'float32', size: 4 },
  '<f8': { dtype: 'float64', size: 8 },
  '<i4': { dtype: 'int32', size: 4 },
  '<i8': { dtype: 'int64', size: 8 },
};

function checkLittleEndianHost(path: string): void {
  if (os.endianness() !== 'LE') throw new CheckpointError(path, '.npy support needs a little-endian machine');
}

/** Writes `data` with the given shape as a version 1.0 .npy file (version 2.0 if the header is huge). */
export function writeNpy(path: string, data: Float32Array | Float64Array | Int32Array, shape: readonly number[]): void {
  checkLittleEndianHost(path);
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new CheckpointError(path, `shape [${shape}] must be non-negative integers`);
  }
  const numel = shape.reduce((a, b) => a * b, 1);
  if (numel !== data.length) {
    throw new CheckpointError(path, `shape [${shape}] has ${numel} elements but data has ${data.length}`);
  }
  const descr = data instanceof Float32Array ? '<f4' : data instanceof Float64Array ? '<f8' : '<i4';
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(', ')})`;
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  // Header (magic, version, length field, dict, padding, "\n") is padded to a multiple of 64 bytes, as numpy does.
  let version = 1;
  let lengthBytes = 2;
  let total = Math.ceil((MAGIC.length + 2 + lengthBytes + dict.length + 1) / 64) * 64;
  if (total - MAGIC.length - 2 - lengthBytes > 0xffff) {
    version = 2;
    lengthBytes = 4;
    total = Math.ceil((MAGIC.length + 2 + lengthBytes + dict.length + 1) / 64) * 64;
  }
  const headerLength = total - MAGIC.length - 2 - lengthBytes;
  const header = Buffer.alloc(total, 0x20);
  MAGIC.copy(header, 0);
  header[6] = version;
  header[7] = 0;
  if (version === 1) header.writeUInt16LE(headerLength, 8);
  else header.writeUInt32LE(headerLength, 8);
  header.write(dict, MAGIC.length + 2 + lengthBytes, 'latin1');
  header[total - 1] = 0x0a;
  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  fs.writeFileSync(path, Buffer.concat([header, body]));
}

/** Parses the header dict, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } */
function parseHeader(path: string, text: string): { descr: string; fortranOrder: boolean; shape: number[] } {
  const trimmed = text.trim();
  const descr = /['"]descr['"]\s*:\s*['"]([^'"]*)['"]/.exec(trimmed);
  const fortran = /['"]fortran_order['"]\s*:\s*(True|False)/.exec(trimmed);
  const shape = /['"]shape['"]\s*:\s*\(([^)]*)\)/.exec(trimmed);
  if (!trimmed.startsWith('{') || !trimmed.endsWith('}') || !descr || !fortran || !shape) {
    throw new CheckpointError(path, `malformed .npy header ${JSON.stringify(trimmed)}`);
  }
  const dims = shape[1]
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  if (!dims.every((s) => /^\d+L?$/.test(s))) throw new CheckpointError(path, `malformed .npy shape (${shape[1]})`);
  return { descr: descr[1], fortranOrder: fortran[1] === 'True', shape: dims.map((s) => parseInt(s, 10)) };
}


/**
 * Reads a .npy file. Throws CheckpointError for other dtypes, big-endian data, Fortran order or a
 * truncated file. The header is read and checked against the file's size before the data is
 * allocated, so a header claiming a huge shape costs nothing.
 */
export function readNpy(path: string): NpyArray {
  checkLittleEndianHost(path);
  const { fd, size } = openRegularFile(path, 'a .npy file');
  try {
    return readNpyFrom(fd, size, path);
  } finally {
    fs.closeSync(fd);
  }
}

function readNpyFrom(fd: number, fileSize: number, path: string): NpyArray {
  const preamble = Buffer.alloc(Math.min(12, fileSize));
  readExactly(fd, preamble, 0, path, 'the header');
  if (preamble.length < 10 || !preamble.subarray(0, 6).equals(MAGIC)) throw new CheckpointError(path, 'not a .npy file (bad magic)');
  const major = preamble[6];
  let headerStart: number;
  let headerLength: number;
  if (major === 1) {
    headerStart = 10;
    headerLength = preamble.readUInt16LE(8);
  } else if (major === 2 || major === 3) {
    if (preamble.length < 12) throw new CheckpointError(path, 'truncated .npy header');
    headerStart = 12;
    headerLength = preamble.readUInt32LE(8);
  } else {
    throw new CheckpointError(path, `unsupported .npy format version ${major}.${preamble[7]}`);
  }
  if (headerLength > MAX_HEADER_BYTES) {
    throw new CheckpointError(path, `.npy header length ${headerLength} is over the ${MAX_HEADER_BYTES} bytes accepted`);
  }
  const dataStart = headerStart + headerLength;
  if (dataStart > fileSize) throw new CheckpointError(path, 'truncated .npy header');
  const headerBytes = Buffer.alloc(headerLength);
  readExactly(fd, headerBytes, headerStart, path, 'the header');
  const header = parseHeader(path, headerBytes.toString(major === 3 ? 'utf8' : 'latin1'));
  const kind = DESCR[header.descr];
  if (!kind) {
    throw new CheckpointError(path, `unsupported dtype '${header.descr}'; expected little-endian float32/float64/int32/int64 ('<f4', '<f8', '<i4', '<i8')`);
  }
  if (header.fortranOrder) throw new CheckpointError(path, 'Fortran-order arrays are not supported; save a C-order array');
  const numel = header.shape.reduce((a, b) => a * b, 1);
  const byteLength = numel * kind.size;
  if (fileSize - dataStart !== byteLength) {
    throw new CheckpointError(
      path,
      `data is ${fileSize - dataStart} bytes but shape (${header.shape}) of ${kind.dtype} needs ${byteLength} (truncated?)`,
    );
  }
  // Straight into a fresh, aligned buffer.
  const bytes = new Uint8Array(byteLength);
  readExactly(fd, bytes, dataStart, path, 'the data');
  let data: Float32Array | Float64Array | Int32Array;
  switch (kind.dtype) {
    case 'float32':
      data = new Float32Array(bytes.buffer);
      break;
    case 'float64':
      data = new Float64Array(bytes.buffer);
      break;
    case 'int32':
      data = new Int32Array(bytes.buffer);
      break;
    case 'int64': {
      const wide = new BigInt64Array(bytes.buffer);
      data = new Int32Array(numel);
      for (let i = 0; i < numel; i++) {
        const v = wide[i];
        if (v > 2147483647n || v < -2147483648n) {
          throw new CheckpointError(path, `int64 value ${v} at index ${i} does not fit in int32`);
        }
        data[i] = Number(v);
      }
      break;
    }
  }
  return { dtype: kind.dtype, shape: header.shape, data };
}
