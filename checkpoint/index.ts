/**
 * One entry point for every way a Mistral model is distributed: the official folder (params.json,
 * consolidated.00.pth or consolidated.safetensors, tokenizer.model), a Hugging Face folder
 * (config.json, model*.safetensors or pytorch_model*.bin, tokenizer.model), or a .tar of the official
 * folder. openModel looks at what the path holds and returns the hyperparameters under params.json's
 * names, a WeightReader under the reference's tensor names, and where the tokenizer is.
 */
import { AsyncLocalStorage } from 'async_hooks';
import * as fs from 'fs';
import * as path from 'path';
import { toFloat32 } from './dtypes';
import { CheckpointError } from './errors';
import { kindOf, openRegularFile } from './files';
import { findHfWeights, HF_WEIGHT_FILES, openHfFolder, readJson } from './hf';
import { openPth } from './pth';
import { findNonFinite, type NonFiniteWeights } from './finite';
import { openSafetensors } from './safetensors';
import { BYTES_PER_ELEMENT, Q8_0_BLOCK, Q8_0_BLOCK_BYTES, type RawTensor, type WeightReader } from './types';

export type ModelFormat = 'folder' | 'folder-safetensors' | 'tar' | 'hf' | 'gguf';

/** Where the SentencePiece model is: a file, or bytes read out of an archive. */
export type TokenizerSource = { path: string } | { bytes: Uint8Array; name: string };

export type ProgressCallback = (bytesDone: number, bytesTotal: number) => void;

export type { NonFiniteWeights } from './finite';

export interface OpenModelOptions {
  /** Called as weights are read (and, for a tar, as it is scanned). */
  onProgress?: ProgressCallback;
  /**
   * Called when a tensor read holds NaN or Inf (each tensor once, as it is read). Without it, the
   * listener of an enclosing reportNonFiniteWeights is called, if any; either way the findings
   * are also collected in ModelFiles.nonFinite.
   */
  onNonFinite?: (finding: NonFiniteWeights) => void;
  /** Told each note about the model (a GGUF's defaults for missing metadata), as "note: ..."; default: stderr. */
  onNote?: (line: string) => void;
}

export interface ModelFiles {
  format: ModelFormat;
  /** The path given to openModel. */
  path: string;
  /** params.json's object, or the HF config mapped to params.json's field names. */
  params: unknown;
  /** Names the params' source in errors. */
  paramsFile: string;
  weights: WeightReader;
  tokenizer: TokenizerSource;
  /** The tensors read so far that hold NaN or Inf, in the order they were read. */
  readonly nonFinite: readonly NonFiniteWeights[];
  /** Notes for stderr (a GGUF's defaults for missing metadata). */
  warnings?: readonly string[];
  /** Closes the weights. */
  close(): void;
}

const nonFiniteListener = new AsyncLocalStorage<(finding: NonFiniteWeights) => void>();

/**
 * Runs `work` with `listener` told of every tensor holding NaN or Inf that any openModel inside it
 * reads (however deep the call: loadModel, Transformer.fromFolder), unless that openModel was given
 * its own onNonFinite. The checkpoint layer only finds them; the caller decides how to report them.
 */
export function reportNonFiniteWeights<T>(listener: (finding: NonFiniteWeights) => void, work: () => Promise<T>): Promise<T> {
  return nonFiniteListener.run(listener, work);
}

const NOT_A_MODEL =
  'not a model: expected a folder with params.json and consolidated.00.pth or consolidated.safetensors, ' +
  'a Hugging Face folder with config.json and model*.safetensors or pytorch_model*.bin, ' +
  'or a .tar of the official folder';

/** The files whose presence decides a folder's format. */
const LOOKED_FOR = ['params.json', 'consolidated.00.pth', 'consolidated.safetensors', 'config.json', ...HF_WEIGHT_FILES];

const TAR_MAGIC_OFFSET = 257;

/** Shards of a Hugging Face folder, with or without their index. */
const HF_SHARD = /^(model-\d+-of-\d+\.safetensors|pytorch_model-\d+-of-\d+\.bin)$/;

const isFile = (file: string): boolean => fs.statSync(file, { throwIfNoEntry: false })?.isFile() ?? false;

/** What a file given as the model is, from its first bytes. */
type FileKind = 'tar' | 'gguf' | 'zip' | 'safetensors' | 'other';

function fileKind(file: string): FileKind {
  const { fd } = openRegularFile(file, 'a model folder or a .tar');
  try {
    const head = Buffer.alloc(TAR_MAGIC_OFFSET + 5);
    const got = fs.readSync(fd, head, 0, head.length, 0);
    // "ustar" at offset 257: POSIX, GNU and pax tars.
    if (got === head.length && head.toString('latin1', TAR_MAGIC_OFFSET) === 'ustar') return 'tar';
    if (got >= 4 && head.toString('latin1', 0, 4) === 'GGUF') return 'gguf';
    if (got >= 4 && head.readUInt32LE(0) === 0x04034b50) return 'zip';
    // safetensors: an 8-byte header length, then the header's JSON object.
    if (got >= 9 && head.readBigUInt64LE(0) < BigInt(1) << BigInt(32) && head[8] === 0x7b) return 'safetensors';
    return 'other';
  } finally {
    fs.closeSync(fd);
  }
}

/** The error for a model path that is a file but not a tar: say what it is and what to pass instead. */
function notAModelFile(file: string, kind: FileKind): CheckpointError {
  const folder = path.dirname(path.resolve(file));
  const name = path.basename(file);
  const what =
    kind === 'zip'
      ? 'a torch.save checkpoint'
      : kind === 'safetensors'
        ? 'a safetensors file'
        : name === 'params.json' || name === 'config.json' || /^tokenizer\.model(\.v\d+)?$/.test(name)
          ? `the model's ${name}`
          : null;
  const inModelFolder = LOOKED_FOR.some((f) => isFile(path.join(folder, f))) || fs.readdirSync(folder).some((f) => HF_SHARD.test(f));
  if (what !== null || inModelFolder) {
    return new CheckpointError(file, `is ${what ?? 'a file'} inside a model folder, not a model: pass the folder that holds this file (${folder})`);
  }
  return new CheckpointError(file, NOT_A_MODEL);
}

/** The error for a folder in no layout we know, naming what is missing where we can tell. */
function notAModelFolder(folder: string, has: (name: string) => boolean): CheckpointError {
  const shards = fs.readdirSync(folder).filter((f) => HF_SHARD.test(f));
  const hfWeights = [...HF_WEIGHT_FILES.filter(has), ...shards];
  if (hfWeights.length > 0 && !has('config.json')) {
    const shown = hfWeights.length > 2 ? `${hfWeights.slice(0, 2).join(', ')}...` : hfWeights.join(', ');
    return new CheckpointError(
      path.join(folder, 'config.json'),
      `missing config.json: the folder looks like a Hugging Face model (it has ${shown}), which needs its config.json beside the weights`,
    );
  }
  if (shards.length > 0) {
    const index = shards[0].endsWith('.bin') ? 'pytorch_model.bin.index.json' : 'model.safetensors.index.json';
    return new CheckpointError(path.join(folder, index), `missing: the folder has shards (${shards[0]}...) but not the index that says which tensor is in which`);
  }
  const present = LOOKED_FOR.filter(has);
  return new CheckpointError(folder, `${NOT_A_MODEL} (this folder has ${present.length ? present.join(', ') : 'none of those files'})`);
}

/** What a wrapping reader is told after each read: the tensor's name and what was read. */
interface ReadHooks {
  raw(name: string, raw: RawTensor): void;
  into(name: string, byteOffset: number, target: Uint8Array): void;
  q8(name: string, blocks: Uint8Array): void;
}

/**
 * `reader` with `hooks` told of every read. Every member is forwarded here, the optional ones as
 * the reader has them, so a wrapper cannot drop one (a new read method gets its hook here).
 */
function observeReads(reader: WeightReader, hooks: ReadHooks): WeightReader {
  const readRaw = (name: string): RawTensor => {
    const raw = reader.readRaw(name);
    hooks.raw(name, raw);
    return raw;
  };
  return {
    path: reader.path,
    tensors: reader.tensors,
    readRaw,
    read: (name: string): Float32Array => toFloat32(readRaw(name)),
    ...(reader.readRawInto && {
      readRawInto: (name: string, byteOffset: number, target: Uint8Array): void => {
        reader.readRawInto!(name, byteOffset, target);
        hooks.into(name, byteOffset, target);
      },
    }),
    ...(reader.readQ8_0Blocks && {
      readQ8_0Blocks: (name: string): Uint8Array => {
        const blocks = reader.readQ8_0Blocks!(name);
        hooks.q8(name, blocks);
        return blocks;
      },
    }),
    close: () => reader.close(),
  };
}

/**
 * `reader` with `onProgress(bytesDone, bytesTotal)` called after each tensor is read, counting each
 * tensor's stored bytes once; bytesTotal is the sum over all its tensors.
 */
export function withProgress(reader: WeightReader, onProgress: ProgressCallback): WeightReader {
  let total = 0;
  for (const info of reader.tensors.values()) total += info.numel * BYTES_PER_ELEMENT[info.dtype];
  const seen = new Set<string>();
  let done = 0;
  const count = (name: string): void => {
    if (seen.has(name)) return;
    seen.add(name);
    const info = reader.tensors.get(name);
    if (info) done += info.numel * BYTES_PER_ELEMENT[info.dtype];
    onProgress(done, total);
  };
  return observeReads(reader, { raw: count, into: count, q8: count });
}

/**
 * `reader` with each tensor scanned for NaN and Inf the first time it is read (from its stored
 * bits: about 0.3 s per GB), `report` called for each one that has some.
 */
export function withNonFiniteCheck(reader: WeightReader, report: (finding: NonFiniteWeights) => void): WeightReader {
  const scanned = new Set<string>();
  const raw = (name: string, tensor: RawTensor): void => {
    if (scanned.has(name)) return;
    scanned.add(name);
    const found = findNonFinite(tensor.dtype, tensor.data);
    if (found) report({ file: reader.path, tensor: name, numel: tensor.data.length, ...found });
  };
  // A tensor read in pieces (readRawInto: a shard per pool thread, or rows a few MB at a time) is
  // scanned piece by piece, the counts summed over its pieces and reported once all are read.
  const pieces = new Map<string, { nan: number; inf: number; first: number; bytes: number }>();
  const into = (name: string, byteOffset: number, target: Uint8Array): void => {
    const info = reader.tensors.get(name);
    if (info === undefined || scanned.has(name)) return;
    const size = BYTES_PER_ELEMENT[info.dtype];
    if (byteOffset % size !== 0 || target.byteOffset % size !== 0 || target.length % size !== 0) return;
    const view = info.dtype === 'float32'
      ? new Float32Array(target.buffer, target.byteOffset, target.length / 4)
      : new Uint16Array(target.buffer, target.byteOffset, target.length / 2);
    const found = findNonFinite(info.dtype, view);
    const sum = pieces.get(name) ?? { nan: 0, inf: 0, first: -1, bytes: 0 };
    pieces.set(name, sum);
    sum.bytes += target.length;
    if (found) {
      sum.nan += found.nan;
      sum.inf += found.inf;
      const first = found.first + byteOffset / size;
      if (sum.first < 0 || first < sum.first) sum.first = first;
    }
    if (sum.bytes >= info.numel * size) {
      scanned.add(name);
      pieces.delete(name);
      if (sum.first >= 0) report({ file: reader.path, tensor: name, numel: info.numel, nan: sum.nan, inf: sum.inf, first: sum.first });
    }
  };
  // Q8_0 blocks: a scale of Inf or NaN (f16 exponent 31) makes its weights non-finite.
  const q8 = (name: string, blocks: Uint8Array): void => {
    const count = { nan: 0, inf: 0, first: -1 };
    const [n, size] = [Q8_0_BLOCK, Q8_0_BLOCK_BYTES];
    for (let at = 0; at + size <= blocks.length; at += size) {
      const h = blocks[at] | (blocks[at + 1] << 8);
      if ((h & 0x7c00) !== 0x7c00) continue;
      if (count.first < 0) count.first = (at / size) * n;
      // A NaN scale makes n NaN; an infinite one makes Inf, except times q = 0, which is NaN.
      const zeros = h & 0x3ff ? n : blocks.subarray(at + 2, at + size).reduce((z, q) => z + (q === 0 ? 1 : 0), 0);
      count.nan += zeros;
      count.inf += n - zeros;
    }
    if (count.first >= 0) report({ file: reader.path, tensor: name, numel: (blocks.length / size) * n, ...count });
  };
  return observeReads(reader, { raw, into, q8 });
}

/** The folder's tokenizer.model, which every folder format needs. */
function folderTokenizer(folder: string): TokenizerSource {
  const file = path.join(folder, 'tokenizer.model');
  const stat = fs.statSync(file, { throwIfNoEntry: false });
  if (stat && !stat.isFile()) throw new CheckpointError(file, `is ${kindOf(stat)}, expected the SentencePiece tokenizer.model (a regular file)`);
  if (!stat) {
    // Later Mistral downloads name it tokenizer.model.v3 (etc.); HF folders may have only tokenizer.json.
    const versioned = fs.readdirSync(folder).filter((f) => /^tokenizer\.model\.v\d+$/.test(f));
    const hint = versioned.length
      ? ` (found ${versioned.join(', ')}: copy it to tokenizer.model if it is the one to use)`
      : isFile(path.join(folder, 'tokenizer.json'))
        ? ' (tokenizer.json alone is not supported)'
        : '';
    throw new CheckpointError(file, `missing: the model folder needs its SentencePiece tokenizer.model${hint}`);
  }
  return { path: file };
}

function modelFiles(
  format: ModelFormat,
  modelPath: string,
  params: unknown,
  paramsFile: string,
  weights: WeightReader,
  tokenizer: TokenizerSource,
  opts: OpenModelOptions,
): ModelFiles {
  const nonFinite: NonFiniteWeights[] = [];
  const listener = opts.onNonFinite ?? nonFiniteListener.getStore();
  const checked = withNonFiniteCheck(weights, (finding) => {
    nonFinite.push(finding);
    listener?.(finding);
  });
  const reader = opts.onProgress && format !== 'tar' ? withProgress(checked, opts.onProgress) : checked;
  return { format, path: modelPath, params, paramsFile, weights: reader, tokenizer, nonFinite, close: () => reader.close() };
}

/**
 * Opens the model at `modelPath`, whichever of the supported layouts it is in. Only headers and
 * indexes are read here; tensors are read on request through `weights`. Throws CheckpointError
 * naming the file and the problem.
 */
export async function openModel(modelPath: string, opts: OpenModelOptions = {}): Promise<ModelFiles> {
  const stat = fs.statSync(modelPath, { throwIfNoEntry: false });
  if (!stat) throw new CheckpointError(modelPath, 'no such file or folder');

  if (stat.isFile()) {
    const kind = fileKind(modelPath);
    if (kind === 'gguf' || /\.gguf$/i.test(modelPath)) {
      const gguf = (await import('./gguf_model')).openGgufModel(modelPath);
      // The defaults taken for missing metadata are said as notes, through the caller's channel.
      for (const warning of gguf.warnings) (opts.onNote ?? ((line: string) => process.stderr.write(`${line}\n`)))(`note: ${warning}`);
      return { ...modelFiles('gguf', modelPath, gguf.params, gguf.paramsFile, gguf.weights, gguf.tokenizer, opts), warnings: gguf.warnings };
    }
    if (kind !== 'tar') throw notAModelFile(modelPath, kind);
    // Loaded on first use: it brings in the tar-stream package, which the other formats do not need.
    const { openTar } = await import('./tar');
    const tar = await openTar(modelPath, { onProgress: opts.onProgress });
    const tokenizer = { bytes: tar.tokenizerBytes, name: tar.tokenizerName };
    return modelFiles('tar', modelPath, tar.params, tar.paramsFile, tar.weights, tokenizer, opts);
  }
  if (!stat.isDirectory()) throw new CheckpointError(modelPath, `is ${kindOf(stat)}, not a model: expected a model folder or a .tar`);

  const has = (name: string): boolean => isFile(path.join(modelPath, name));
  if (has('params.json') && (has('consolidated.00.pth') || has('consolidated.safetensors'))) {
    const paramsFile = path.join(modelPath, 'params.json');
    const params = readJson(paramsFile);
    const tokenizer = folderTokenizer(modelPath);
    const weights = has('consolidated.00.pth')
      ? openPth(path.join(modelPath, 'consolidated.00.pth'))
      : openSafetensors(path.join(modelPath, 'consolidated.safetensors'));
    const format = has('consolidated.00.pth') ? 'folder' : 'folder-safetensors';
    return modelFiles(format, modelPath, params, paramsFile, weights, tokenizer, opts);
  }
  if (has('config.json') && findHfWeights(modelPath) !== null) {
    const tokenizer = folderTokenizer(modelPath);
    const { params, paramsFile, weights } = openHfFolder(modelPath);
    return modelFiles('hf', modelPath, params, paramsFile, weights, tokenizer, opts);
  }
  // A file we look for that is not a regular file (a folder, a FIFO...): name it.
  for (const name of LOOKED_FOR) {
    const other = fs.statSync(path.join(modelPath, name), { throwIfNoEntry: false });
    if (other && !other.isFile()) {
      throw new CheckpointError(path.join(modelPath, name), `is ${kindOf(other)}, expected a file`);
    }
  }
  // Half an official folder: name what is missing.
  if (has('params.json') && !has('config.json')) {
    throw new CheckpointError(
      path.join(modelPath, 'consolidated.00.pth'),
      'missing (the folder has params.json; expected consolidated.00.pth or consolidated.safetensors beside it)',
    );
  }
  if (has('consolidated.00.pth') || has('consolidated.safetensors')) {
    throw new CheckpointError(path.join(modelPath, 'params.json'), 'missing (it gives the hyperparameters of the consolidated weights beside it)');
  }
  throw notAModelFolder(modelPath, has);
}
