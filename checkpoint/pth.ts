/**
 * Reads a torch.save checkpoint (a zip holding `<prefix>/data.pkl` and one
 * raw little-endian record `<prefix>/data/<key>` per storage) holding a flat
 * state dict of bfloat16 / float16 / float32 tensors, e.g. Mistral 7B's
 * consolidated.00.pth.
 *
 * openPth reads only the zip central directory and the pickle; each tensor's
 * bytes are read at their offset when asked for and converted to float32, so
 * a 14.5 GB checkpoint is read with memory bounded by the largest tensor.
 *
 * parseStateDict, the pickle's tensors and their checks, is shared with
 * pth_stream.ts, which reads the same files from a stream.
 */
import * as os from 'os';
import { CheckpointError } from './errors';
import { PickleGlobal, PickleObject, PickleValue, unpickle } from './pickle';
import { ZipEntry, ZipReader } from './zip';
import { toFloat32 } from './dtypes';
import { BYTES_PER_ELEMENT, type RawTensor, type WeightDtype, type WeightInfo, type WeightReader } from './types';

export { CheckpointError } from './errors';

export type { WeightDtype } from './types';

/** What the pickle says about one tensor of the state dict. */
export interface TensorInfo extends WeightInfo {
  /** Storage key: the tensor's bytes live in record `<prefix>/data/<storageKey>`. */
  readonly storageKey: string;
  /** Offset of the first element within the storage, in elements. */
  readonly storageOffset: number;
}

/** One tensor of a state dict, as its pickle describes it (parseStateDict). */
export interface StateDictTensor extends TensorInfo {
  /** Elements in the whole storage (which may be shared with other tensors). */
  readonly storageNumel: number;
}

export interface PthCheckpoint extends WeightReader {
  /** The folder name inside the zip ("archive", or the stem of the file name torch.save wrote). */
  readonly prefix: string;
  /** Tensors in state-dict order. */
  readonly tensors: Map<string, TensorInfo>;
}

// ---------------------------------------------------------------------------
// What the pickle may reference.

interface StorageKind {
  /** torch dtype name, for messages. */
  readonly dtype: string;
  /** Set when we can read it as weights. */
  readonly weight?: WeightDtype;
}

/** torch.<Name>Storage -> dtype. Only the first three are readable; the rest give a clear error. */
const STORAGE_KINDS: ReadonlyMap<string, StorageKind> = new Map([
  ['BFloat16Storage', { dtype: 'bfloat16', weight: 'bfloat16' }],
  ['HalfStorage', { dtype: 'float16', weight: 'float16' }],
  ['FloatStorage', { dtype: 'float32', weight: 'float32' }],
  ['DoubleStorage', { dtype: 'float64' }],
  ['LongStorage', { dtype: 'int64' }],
  ['IntStorage', { dtype: 'int32' }],
  ['ShortStorage', { dtype: 'int16' }],
  ['CharStorage', { dtype: 'int8' }],
  ['ByteStorage', { dtype: 'uint8' }],
  ['BoolStorage', { dtype: 'bool' }],
  ['ComplexFloatStorage', { dtype: 'complex64' }],
  ['ComplexDoubleStorage', { dtype: 'complex128' }],
  ['QInt8Storage', { dtype: 'qint8' }],
  ['QUInt8Storage', { dtype: 'quint8' }],
  ['QInt32Storage', { dtype: 'qint32' }],
]);

/** A storage as named by a persistent id: ('storage', torch.XStorage, key, location, numel). */
class StorageRef extends PickleObject {
  constructor(
    readonly kind: StorageKind,
    readonly typeName: string,
    readonly key: string,
    readonly numel: number,
  ) {
    super();
  }
}

/** The result of torch._utils._rebuild_tensor_v2. */
class TensorRef extends PickleObject {
  constructor(
    readonly storage: StorageRef,
    readonly storageOffset: number,
    readonly shape: number[],
    readonly stride: number[],
  ) {
    super();
  }
}

function isCount(v: PickleValue): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function countTuple(v: PickleValue, file: string, what: string): number[] {
  if (!Array.isArray(v) || !v.every(isCount)) {
    throw new CheckpointError(file, `_rebuild_tensor_v2 ${what} is not a tuple of non-negative integers`);
  }
  return [...(v as number[])];
}

function rebuildTensor(args: readonly PickleValue[], file: string): PickleValue {
  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
  if (args.length < 4) throw new CheckpointError(file, `_rebuild_tensor_v2 got ${args.length} arguments, expected at least 4`);
  const [storage, offset, size, stride] = args;
  if (!(storage instanceof StorageRef)) throw new CheckpointError(file, '_rebuild_tensor_v2 storage argument is not a storage');
  if (!isCount(offset)) throw new CheckpointError(file, '_rebuild_tensor_v2 storage offset is not a non-negative integer');
  const shape = countTuple(size, file, 'size');
  const strides = countTuple(stride, file, 'stride');
  if (strides.length !== shape.length) {
    throw new CheckpointError(file, `_rebuild_tensor_v2 size has ${shape.length} dims but stride has ${strides.length}`);
  }
  return new TensorRef(storage, offset, shape, strides);
}

function rebuildParameter(args: readonly PickleValue[], file: string): PickleValue {
  // _rebuild_parameter(data, requires_grad, backward_hooks): a Parameter is just its tensor here.
  const data = args[0];
  if (!(data instanceof TensorRef)) throw new CheckpointError(file, '_rebuild_parameter argument is not a tensor');
  return data;
}

function newOrderedDict(args: readonly PickleValue[], file: string): PickleValue {
  if (args.length !== 0) throw new CheckpointError(file, 'collections.OrderedDict called with arguments (only OrderedDict() is supported)');
  return new Map();
}

const TORCH_GLOBALS: ReadonlyMap<string, PickleGlobal> = new Map([
  ['collections.OrderedDict', new PickleGlobal('collections', 'OrderedDict', newOrderedDict)],
  ['torch._utils._rebuild_tensor_v2', new PickleGlobal('torch._utils', '_rebuild_tensor_v2', rebuildTensor)],
  ['torch._utils._rebuild_parameter', new PickleGlobal('torch._utils', '_rebuild_parameter', rebuildParameter)],
  ...[...STORAGE_KINDS.keys()].map((name): [string, PickleGlobal] => [`torch.${name}`, new PickleGlobal('torch', name)]),
]);

function persistentLoad(file: string): (pid: PickleValue) => PickleValue {
  return (pid) => {
    if (!Array.isArray(pid) || pid.length !== 5 || pid[0] !== 'storage') {
      throw new CheckpointError(file, 'persistent id is not a (storage, type, key, location, numel) tuple');
    }
    const [, type, key, , numel] = pid;
    if (!(type instanceof PickleGlobal) || type.module !== 'torch' || !STORAGE_KINDS.has(type.name)) {
      throw new CheckpointError(file, 'persistent id does not name a torch storage type');
    }
    if (typeof key !== 'string' || !isCount(numel)) throw new CheckpointError(file, 'persistent id has a bad storage key or size');
    return new StorageRef(STORAGE_KINDS.get(type.name) as StorageKind, type.qualifiedName, key, numel);
  };
}

// ---------------------------------------------------------------------------
// The state dict.

/**
 * Unpickles a torch.save `data.pkl` holding a flat state dict of bfloat16 / float16 / float32
 * tensors, checking each is contiguous and lies inside its storage (whose record is not looked at
 * here). `file` names the checkpoint in errors, `pickleName` the pickle.
 */
export function parseStateDict(pickle: Uint8Array, file: string, pickleName: string): Map<string, StateDictTensor> {
  const root = unpickle(pickle, { file: pickleName, globals: TORCH_GLOBALS, persistentLoad: persistentLoad(file) });
  if (!(root instanceof Map)) throw new CheckpointError(file, 'pickle does not hold a dict (expected a state dict)');
  const tensors = new Map<string, StateDictTensor>();
  for (const [name, value] of root) {
    if (typeof name !== 'string') throw new CheckpointError(file, `state dict key ${String(name)} is not a string`);
    if (!(value instanceof TensorRef)) throw new CheckpointError(file, `state dict entry "${name}" is not a tensor`);
    tensors.set(name, checkTensor(name, value, file));
  }
  return tensors;
}

function checkTensor(name: string, t: TensorRef, file: string): StateDictTensor {
  const { storage } = t;
  const dtype = storage.kind.weight;
  if (!dtype) {
    throw new CheckpointError(
      file,
      `tensor "${name}" has unsupported dtype ${storage.kind.dtype} (${storage.typeName}); expected bfloat16, float16 or float32`,
    );
  }
  const numel = t.shape.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(numel)) throw new CheckpointError(file, `tensor "${name}" shape [${t.shape}] is too large`);
  // Row-major contiguity; a dimension of size 1 may have any stride (as in torch).
  let expected = 1;
  for (let d = t.shape.length - 1; d >= 0 && numel > 0; d--) {
    if (t.shape[d] !== 1 && t.stride[d] !== expected) {
      throw new CheckpointError(
        file,
        `tensor "${name}" is not contiguous (shape [${t.shape}], stride [${t.stride}]); save it with .contiguous()`,
      );
    }
    expected *= t.shape[d];
  }
  if (numel > 0 && t.storageOffset + numel > storage.numel) {
    throw new CheckpointError(
      file,
      `tensor "${name}" (offset ${t.storageOffset}, ${numel} elements) runs past the end of its storage of ${storage.numel} elements`,
    );
  }
  return { dtype, shape: t.shape, numel, storageKey: storage.key, storageOffset: t.storageOffset, storageNumel: storage.numel };
}

// ---------------------------------------------------------------------------
// The zip, read at random.

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
    this.zip.readInto(entry, info.storageOffset * BYTES_PER_ELEMENT[info.dtype], new Uint8Array(data.buffer));
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
    this.zip.readInto(this.storageEntry(info.storageKey), info.storageOffset * size + byteOffset, target);
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
    const order = this.zip.readAll(entry).toString('latin1').trim();
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
    const tensors = parseStateDict(this.zip.readAll(this.zip.entry(pickleName)), this.path, `${this.path} (${pickleName})`);
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
