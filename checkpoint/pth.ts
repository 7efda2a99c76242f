/**
 * Reads a torch.save checkpoint (a zip holding `<prefix>/data.pkl` and one
 * raw little-endian record `<prefix>/data/<key>` per storage) holding a flat
 * state dict of bfloat16 / float16 / float32 tensors, e.g. Mistral 7B's
 * consolidated.00.pth.
 *
 * openPth reads only the zip central directory and the pickle; each tensor's
 * bytes are read at their offset when asked for, their record's CRC-32
 * checked, and converted to float32, so a 14.5 GB checkpoint is read with
 * memory bounded by the largest tensor.
 *
 * The pickle's tensors and their checks (state_dict.ts) are shared with pth_stream.ts, which reads
 * the same files from a stream.
 */
import * as os from 'os';
import { toFloat32 } from './dtypes';
import { CheckpointError } from './errors';
import { MAX_PICKLE_BYTES, parseStateDict, type TensorInfo } from './state_dict';
import { BYTES_PER_ELEMENT, type RawTensor, type WeightReader } from './types';
import { type ZipEntry, ZipReader } from './zip';

/** The byteorder record holds "little" or "big". */
const MAX_BYTEORDER_BYTES = 64;

export { CheckpointError } from './errors';
export type { TensorInfo } from './state_dict';
export type { WeightDtype } from './types';

export interface PthCheckpoint extends WeightReader {
  /** The folder name inside the zip ("archive", or the stem of the file name torch.save wrote). */
  readonly prefix: string;
  /** Tensors in state-dict order. */
  readonly tensors: Map<string, TensorInfo>;
}

class PthFile implements PthCheckpoint {
  readonly path: string;
  readonly prefix: string;
  readonly tensors: Map<string, TensorInfo>;
  private readonly zip: ZipReader;

  constructor(path: string, zip: ZipReader) {
    this.path = path;
    this.zip = zip;
    this.prefix = this.findPrefix();
    this.checkByteOrder();
    this.tensors = this.readStateDict();
  }

  close(): void {
    this.zip.close();
  }

  readRaw(name: string): RawTensor {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    const entry = this.storageEntry(info.storageKey);
    const data = info.dtype === 'float32' ? new Float32Array(info.numel) : new Uint16Array(info.numel);
    const start = info.storageOffset * BYTES_PER_ELEMENT[info.dtype];
    const bytes = new Uint8Array(data.buffer);
    this.zip.readInto(entry, start, bytes);
    this.zip.verify(entry, start, bytes, `tensor "${name}"`);
    return { dtype: info.dtype, shape: info.shape, data };
  }

  read(name: string): Float32Array {
    return toFloat32(this.readRaw(name));
  }

  readRawInto(name: string, byteOffset: number, target: Uint8Array): void {
    const info = this.tensors.get(name);
    if (!info) throw new CheckpointError(this.path, `no tensor named "${name}"`);
    const size = BYTES_PER_ELEMENT[info.dtype];
    if (byteOffset < 0 || byteOffset + target.length > info.numel * size) {
      throw new CheckpointError(this.path, `tensor "${name}": bytes ${byteOffset}..${byteOffset + target.length} are outside its ${info.numel * size}`);
    }
    const entry = this.storageEntry(info.storageKey);
    const start = info.storageOffset * size + byteOffset;
    this.zip.readInto(entry, start, target);
    this.zip.verifyPiece(entry, start, target, info.numel * size, `tensor "${name}"`);
  }

  /** torch names the zip's top folder after the file it saved to; the first record is always in it. */
  private findPrefix(): string {
    const first = this.zip.entries.keys().next();
    const slash = first.done ? -1 : first.value.indexOf('/');
    if (first.done || slash <= 0) {
      throw new CheckpointError(this.path, 'zip has no <prefix>/data.pkl record: not a torch.save checkpoint');
    }
    const prefix = first.value.slice(0, slash);
    if (!this.zip.entries.has(`${prefix}/data.pkl`)) {
      throw new CheckpointError(this.path, `zip has no ${prefix}/data.pkl record: not a torch.save checkpoint`);
    }
    return prefix;
  }

  /** Newer torch writes `<prefix>/byteorder`; older files are little-endian. */
  private checkByteOrder(): void {
    if (os.endianness() !== 'LE') throw new CheckpointError(this.path, 'reading checkpoints needs a little-endian machine');
    const entry = this.zip.entries.get(`${this.prefix}/byteorder`);
    if (!entry) return;
    const order = this.zip.readAll(entry, MAX_BYTEORDER_BYTES).toString('latin1').trim();
    if (order !== 'little') throw new CheckpointError(this.path, `byte order is "${order}", only "little" is supported`);
  }

  private storageEntry(key: string): ZipEntry {
    const entry = this.zip.entries.get(`${this.prefix}/data/${key}`);
    if (!entry) throw new CheckpointError(this.path, `storage record ${this.prefix}/data/${key} is missing`);
    return entry;
  }

  /** The pickle's tensors, each checked against the size of its storage record. */
  private readStateDict(): Map<string, TensorInfo> {
    const pickleName = `${this.prefix}/data.pkl`;
    const tensors = parseStateDict(this.zip.readAll(this.zip.entry(pickleName), MAX_PICKLE_BYTES), this.path, `${this.path} (${pickleName})`);
    for (const t of tensors.values()) {
      const entry = this.storageEntry(t.storageKey);
      const needBytes = t.storageNumel * BYTES_PER_ELEMENT[t.dtype];
      if (entry.size < needBytes) {
        throw new CheckpointError(
          this.path,
          `storage record ${entry.name} has ${entry.size} bytes, but its ${t.storageNumel} ${t.dtype} elements need ${needBytes}`,
        );
      }
    }
    return tensors;
  }
}

/** Opens a torch.save checkpoint holding a flat state dict. Throws CheckpointError on anything unexpected. */
export function openPth(path: string): PthCheckpoint {
  const zip = ZipReader.open(path);
  try {
    return new PthFile(path, zip);
  } catch (err) {
    zip.close();
    throw err;
  }
}
