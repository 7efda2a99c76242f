/**
 * Reads a .safetensors file: an 8-byte little-endian header length N, N bytes of JSON mapping each
 * tensor name to {dtype, shape, data_offsets: [begin, end]} (plus an optional "__metadata__" object
 * of strings), then the tensors' bytes, little-endian and row-major, with offsets counted from the
 * first byte after the header.
 *
 * Only the header is read when the file is opened, and every number in it is checked against the
 * file before anything is read; each tensor's bytes are read at their offset on request, through a
 * file descriptor, so a 14 GB file is read with memory bounded by its largest tensor.
 */
import * as fs from 'fs';
import * as os from 'os';
import { toFloat32 } from './dtypes';
import { CheckpointError, showValue } from './errors';
import { openRegularFile, readExactly } from './files';
import { BYTES_PER_ELEMENT, type RawTensor, type WeightDtype, type WeightInfo, type WeightReader } from './types';

/** The largest header accepted; the reference implementation uses the same limit. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** safetensors dtype names we can read as weights. */
const READABLE: Readonly<Record<string, WeightDtype>> = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' };

/** The other dtypes the format defines: known, but not weights we can use. */
const UNREADABLE = new Set([
  'BOOL', 'U8', 'I8', 'I16', 'U16', 'I32', 'U32', 'I64', 'U64', 'F64', 'C64',
  'F8_E4M3', 'F8_E5M2', 'F8_E8M0', 'F6_E2M3', 'F6_E3M2', 'F4',
]);

/** A tensor as the header describes it. */
export interface SafetensorsTensorInfo extends WeightInfo {
  /** Absolute byte offset of its first byte in the file. */
  readonly fileOffset: number;
  /** Its byte length (numel times the element size). */
  readonly byteLength: number;
}

export interface SafetensorsFile extends WeightReader {
  /** Tensors in the order of their bytes in the file. */
  readonly tensors: ReadonlyMap<string, SafetensorsTensorInfo>;
  /** The header's "__metadata__" (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

class Safetensors implements SafetensorsFile {
  readonly path: string;
  readonly tensors: Map<string, SafetensorsTensorInfo>;
  readonly metadata: Record<string, string>;
  private fd: number | null;

  constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
    const fileSize = fs.fstatSync(fd).size;
    const { header, dataStart } = this.readHeader(fd, fileSize);
    this.metadata = this.checkMetadata(header.__metadata__);
    this.tensors = this.checkTensors(header, dataStart, fileSize - dataStart);
  }

  readRaw(name: string): RawTensor {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    const data = info.dtype === 'float32' ? new Float32Array(info.numel) : new Uint16Array(info.numel);
    this.readAt(info.fileOffset, new Uint8Array(data.buffer), `tensor "${name}"`);
    return { dtype: info.dtype, shape: info.shape, data };
  }

  read(name: string): Float32Array {
    return toFloat32(this.readRaw(name));
  }

  readRawInto(name: string, byteOffset: number, target: Uint8Array): void {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    const bytes = info.numel * BYTES_PER_ELEMENT[info.dtype];
    if (byteOffset < 0 || byteOffset + target.length > bytes) {
      throw new CheckpointError(this.path, `tensor "${name}": bytes ${byteOffset}..${byteOffset + target.length} are outside its ${bytes}`);
    }
    this.readAt(info.fileOffset + byteOffset, target, `tensor "${name}"`);
  }

  close(): void {
    if (this.fd !== null) fs.closeSync(this.fd);
    this.fd = null;
  }

  private readAt(position: number, target: Uint8Array, what: string): void {
    if (this.fd === null) throw new CheckpointError(this.path, `cannot read ${what}: the file is closed`);
    readExactly(this.fd, target, position, this.path, what);
  }

  private readHeader(fd: number, fileSize: number): { header: Record<string, unknown>; dataStart: number } {
    if (os.endianness() !== 'LE') throw new CheckpointError(this.path, 'reading safetensors needs a little-endian machine');
    if (fileSize < 8) {
      throw new CheckpointError(this.path, `file is ${fileSize} bytes, too short for a safetensors header length (8 bytes): truncated or not a safetensors file`);
    }
    const lengthBytes = Buffer.alloc(8);
    this.readAt(0, lengthBytes, 'the header length');
    const length = lengthBytes.readBigUInt64LE(0);
    if (length > BigInt(MAX_HEADER_BYTES)) {
      throw new CheckpointError(this.path, `header length ${length} is over the 100 MB limit: not a safetensors file`);
    }
    if (length > BigInt(fileSize - 8)) {
      throw new CheckpointError(
        this.path,
        `header length ${length} runs past the end of the ${fileSize}-byte file: truncated or not a safetensors file`,
      );
    }
    const headerBytes = Buffer.alloc(Number(length));
    this.readAt(8, headerBytes, 'the header');
    let text: string;
    let header: unknown;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
    } catch {
      throw new CheckpointError(this.path, 'header is not UTF-8 text: not a safetensors file');
    }
    try {
      header = JSON.parse(text);
    } catch (err) {
      throw new CheckpointError(this.path, `header is not valid JSON (${(err as Error).message}): not a safetensors file`);
    }
    if (!isObject(header)) throw new CheckpointError(this.path, 'header is not a JSON object of tensors: not a safetensors file');
    return { header, dataStart: 8 + Number(length) };
  }

  private checkMetadata(value: unknown): Record<string, string> {
    if (value === undefined) return {};
    if (!isObject(value) || !Object.values(value).every((v) => typeof v === 'string')) {
      throw new CheckpointError(this.path, 'header "__metadata__" must be an object of strings');
    }
    return { ...(value as Record<string, string>) };
  }

  private checkTensors(header: Record<string, unknown>, dataStart: number, dataSize: number): Map<string, SafetensorsTensorInfo> {
    const found: { name: string; begin: number; info: SafetensorsTensorInfo }[] = [];
    for (const [name, entry] of Object.entries(header)) {
      if (name === '__metadata__') continue;
      const where = `tensor "${name}"`;
      if (!isObject(entry) || typeof entry.dtype !== 'string' || !Array.isArray(entry.shape) || !Array.isArray(entry.data_offsets)) {
        throw new CheckpointError(this.path, `${where}: header entry must be {"dtype": string, "shape": [...], "data_offsets": [begin, end]}`);
      }
      const { dtype: stDtype, shape, data_offsets: offsets } = entry;
      if (!shape.every(isCount)) {
        throw new CheckpointError(this.path, `${where} has shape ${showValue(shape)}: dims must be non-negative integers`);
      }
      const numel = (shape as number[]).reduce((a, b) => a * b, 1);
      if (!Number.isSafeInteger(numel)) throw new CheckpointError(this.path, `${where} has shape ${showValue(shape)}, too large`);
      if (offsets.length !== 2 || !offsets.every(isCount) || offsets[0] > offsets[1]) {
        throw new CheckpointError(
          this.path,
          `${where} has data_offsets ${showValue(offsets)}: expected [begin, end], integers with 0 <= begin <= end`,
        );
      }
      const dtype = READABLE[stDtype];
      if (dtype === undefined) {
        const kind = UNREADABLE.has(stDtype) ? `dtype ${stDtype}, which cannot be used as weights` : `unknown dtype "${stDtype}"`;
        throw new CheckpointError(this.path, `${where} has ${kind}; expected BF16, F16 or F32`);
      }
      const [begin, end] = offsets as number[];
      const byteLength = numel * BYTES_PER_ELEMENT[dtype];
      if (end - begin !== byteLength) {
        throw new CheckpointError(
          this.path,
          `${where} has data_offsets [${begin}, ${end}] (${end - begin} bytes), but ${stDtype} shape [${shape}] needs ${byteLength} bytes`,
        );
      }
      if (end > dataSize) {
        throw new CheckpointError(
          this.path,
          `${where} has data_offsets [${begin}, ${end}] past the end of the data (${dataSize} bytes after the header): truncated file?`,
        );
      }
      found.push({ name, begin, info: { dtype, shape: [...(shape as number[])], numel, fileOffset: dataStart + begin, byteLength } });
    }
    // In file order; then no two non-empty tensors may share a byte.
    found.sort((a, b) => a.begin - b.begin);
    let previous: { name: string; begin: number; info: SafetensorsTensorInfo } | null = null;
    for (const t of found) {
      if (t.info.byteLength === 0) continue;
      if (previous && t.begin < previous.begin + previous.info.byteLength) {
        throw new CheckpointError(
          this.path,
          `tensors "${previous.name}" (bytes ${previous.begin}..${previous.begin + previous.info.byteLength}) and "${t.name}" (bytes ${t.begin}..${t.begin + t.info.byteLength}) overlap`,
        );
      }
      previous = t;
    }
    return new Map(found.map((t) => [t.name, t.info]));
  }
}

/** Opens a .safetensors file, reading and checking only its header. Throws CheckpointError on anything unexpected. */
export function openSafetensors(path: string): SafetensorsFile {
  const { fd } = openRegularFile(path, 'a .safetensors file');
  try {
    return new Safetensors(path, fd);
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}
