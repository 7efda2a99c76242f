/**
 * One entry point for every way a Mistral model is distributed: the official folder (params.json,
 * consolidated.00.pth or consolidated.safetensors, tokenizer.model), a Hugging Face folder
 * (config.json, model*.safetensors or pytorch_model*.bin, tokenizer.model), or a .tar of the official
 * folder. openModel looks at what the path holds and returns the hyperparameters under params.json's
 * names, a WeightReader under the reference's tensor names, and where the tokenizer is.
 */
import * as fs from 'fs';
import * as path from 'path';
import { CheckpointError } from './errors';
import { findHfWeights, HF_WEIGHT_FILES, openHfFolder, readJson } from './hf';
import { openPth } from './pth';
import { openSafetensors } from './safetensors';
import { BYTES_PER_ELEMENT, type RawTensor, type WeightReader } from './types';

export type ModelFormat = 'folder' | 'folder-safetensors' | 'tar' | 'hf';

/** Where the SentencePiece model is: a file, or bytes read out of an archive. */
export type TokenizerSource = { path: string } | { bytes: Uint8Array; name: string };

export type ProgressCallback = (bytesDone: number, bytesTotal: number) => void;

export interface OpenModelOptions {
  /** Called as weights are read (and, for a tar, as it is scanned). */
  onProgress?: ProgressCallback;
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
  /** Closes the weights. */
  close(): void;
}

const NOT_A_MODEL =
  'not a model: expected a folder with params.json and consolidated.00.pth or consolidated.safetensors, ' +
  'a Hugging Face folder with config.json and model*.safetensors or pytorch_model*.bin, ' +
  'or a .tar of the official folder';

/** The files whose presence decides a folder's format. */
const LOOKED_FOR = ['params.json', 'consolidated.00.pth', 'consolidated.safetensors', 'config.json', ...HF_WEIGHT_FILES];

const TAR_MAGIC_OFFSET = 257;

const isFile = (file: string): boolean => fs.statSync(file, { throwIfNoEntry: false })?.isFile() ?? false;

/** True when `file` starts with a tar header ("ustar" at offset 257: POSIX, GNU and pax tars). */
function isTar(file: string): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    const magic = Buffer.alloc(5);
    const got = fs.readSync(fd, magic, 0, 5, TAR_MAGIC_OFFSET);
    return got === 5 && magic.toString('latin1') === 'ustar';
  } finally {
    fs.closeSync(fd);
  }
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
  return {
    path: reader.path,
    tensors: reader.tensors,
    readRaw(name: string): RawTensor {
      const raw = reader.readRaw(name);
      count(name);
      return raw;
    },
    read(name: string): Float32Array {
      const data = reader.read(name);
      count(name);
      return data;
    },
    ...(reader.readRawInto && {
      readRawInto: (name: string, byteOffset: number, target: Uint8Array): void => {
        reader.readRawInto!(name, byteOffset, target);
        count(name);
      },
    }),
    close: () => reader.close(),
  };
}

/** The folder's tokenizer.model, which every folder format needs. */
function folderTokenizer(folder: string): TokenizerSource {
  const file = path.join(folder, 'tokenizer.model');
  if (!isFile(file)) {
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
  const reader = opts.onProgress && format !== 'tar' ? withProgress(weights, opts.onProgress) : weights;
  return { format, path: modelPath, params, paramsFile, weights: reader, tokenizer, close: () => reader.close() };
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
    if (!isTar(modelPath)) throw new CheckpointError(modelPath, NOT_A_MODEL);
    // Loaded on first use: it brings in the tar-stream package, which the other formats do not need.
    const { openTar } = await import('./tar');
    const tar = await openTar(modelPath, { onProgress: opts.onProgress });
    const tokenizer = { bytes: tar.tokenizerBytes, name: tar.tokenizerName };
    return modelFiles('tar', modelPath, tar.params, tar.paramsFile, tar.weights, tokenizer, opts);
  }
  if (!stat.isDirectory()) throw new CheckpointError(modelPath, NOT_A_MODEL);

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
  // Half an official folder: name what is missing or wrong.
  for (const name of ['params.json', 'consolidated.00.pth', 'consolidated.safetensors']) {
    if (fs.existsSync(path.join(modelPath, name)) && !has(name)) {
      throw new CheckpointError(path.join(modelPath, name), 'expected a file, found a folder');
    }
  }
  if (has('params.json') && !has('config.json')) {
    throw new CheckpointError(
      path.join(modelPath, 'consolidated.00.pth'),
      'missing (the folder has params.json; expected consolidated.00.pth or consolidated.safetensors beside it)',
    );
  }
  if (has('consolidated.00.pth') || has('consolidated.safetensors')) {
    throw new CheckpointError(path.join(modelPath, 'params.json'), 'missing (it gives the hyperparameters of the consolidated weights beside it)');
  }
  const present = LOOKED_FOR.filter(has);
  throw new CheckpointError(modelPath, `${NOT_A_MODEL} (this folder has ${present.length ? present.join(', ') : 'none of those files'})`);
}
