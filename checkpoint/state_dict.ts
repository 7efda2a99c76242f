/**
 * The pickle-to-state-dict step shared by both .pth readers (pth.ts, seekable; pth_stream.ts,
 * streamed): torch.save's `data.pkl` unpickled with only the globals a state dict needs, each tensor
 * checked to be a contiguous bfloat16 / float16 / float32 view lying inside its storage. Where the
 * storages' bytes are, and whether their records are long enough, is the readers' business.
 */
import { CheckpointError } from './errors';
import { PickleGlobal, PickleObject, type PickleValue, unpickle } from './pickle';
import type { WeightDtype, WeightInfo } from './types';

/**
 * The largest data.pkl read: Mistral 7B's is about 30 KB for 291 tensors (some 100 bytes a tensor),
 * so this allows some 600,000 tensors while bounding what a hostile pickle can make us allocate.
 */
export const MAX_PICKLE_BYTES = 64 << 20;

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
