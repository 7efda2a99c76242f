/**
 * The formats fuzzed (the tiny model in each layout, copied under a temporary folder) and the cases
 * generated for each: how many of each kind, and what each case writes and allows as an outcome.
 */
import * as fs from 'fs';
import * as path from 'path';
import { type Anatomy, type Range, safetensorsAnatomy, tarAnatomy, zipAnatomy } from './anatomy';
import { manyAppends, nestedLists, nestedTuples } from '../torch_zip';
import { complement, editField, editJsonNumber, editSafetensorsHeader, flipBits, flipBytes, offsetIn } from './mutations';
import type { Rng } from './rng';

/** FUZZ_SCALE=<k> runs k rounds of cases instead of one. */
const SCALE = Number(process.env.FUZZ_SCALE ?? 1);

export const FIXTURES = path.join(__dirname, '..', '..', 'fixtures');

export interface Format {
  readonly name: string;
  /** Where openModel is pointed: a folder under TMP, or the tar there. */
  readonly modelPath: string;
  /** The weights file that gets mutated (the tar itself for the tar). */
  readonly weightsFile: string;
  readonly weights: Buffer;
  /** params.json / config.json: its own file, or (in the tar) a range of the tar. */
  readonly paramsFile: string;
  readonly params: Buffer | Range;
  readonly anatomy: Anatomy;
  readonly safetensors: boolean;
  /** Zip records carry a CRC-32 of their data (every format but safetensors). */
  readonly checksummed: boolean;
}

/** Each format gets its own copy under the caller's temporary folder `tmp`. */
let copies = 0;

export function folderFormat(tmp: string, name: string, fixture: string, weightsName: string, paramsName: string): Format {
  const dir = path.join(tmp, `${path.basename(fixture)}-${copies++}`);
  fs.mkdirSync(dir);
  for (const f of fs.readdirSync(fixture)) fs.copyFileSync(path.join(fixture, f), path.join(dir, f));
  const weights = fs.readFileSync(path.join(fixture, weightsName));
  const safetensors = weightsName.endsWith('.safetensors');
  return {
    name,
    modelPath: dir,
    weightsFile: path.join(dir, weightsName),
    weights,
    paramsFile: path.join(dir, paramsName),
    params: fs.readFileSync(path.join(fixture, paramsName)),
    anatomy: safetensors ? safetensorsAnatomy(weights) : zipAnatomy(weights, 0, weights.length),
    safetensors,
    checksummed: !safetensors,
  };
}

export const TAR_NAME = 'official .tar';

export function tarFormat(tmp: string): Format {
  const tar = path.join(tmp, `tiny-${copies++}.tar`);
  const weights = fs.readFileSync(path.join(FIXTURES, 'tiny.tar'));
  const anatomy = tarAnatomy(weights);
  return { name: TAR_NAME, modelPath: tar, weightsFile: tar, weights, paramsFile: tar, params: anatomy.params, anatomy, safetensors: false, checksummed: true };
}

/** One corrupted model: what to write, and what the outcome may be. */
export interface Case {
  readonly what: string;
  readonly kind: string;
  /** The weights file (or tar) to write. */
  readonly weights: Buffer;
  /** params.json / config.json to write (folder formats). */
  readonly params?: Buffer;
  readonly paramsTouched: boolean;
  /**
   * Every flipped byte lies in tensor data: in a zip the record's CRC-32 must catch it; in a
   * safetensors file (no checksums) the model must open, and at most this many elements differ.
   */
  readonly dataFlips?: number;
  /** The corruption leaves the weights as they were: the model must open with every tensor unchanged. */
  readonly sameWeights?: boolean;
  /** The model must not open: the error must match this. */
  readonly error?: RegExp;
}

/** Pickles as long or as deep as issue 10 found breaking the unpickler's call stack. */
const APPENDS = 500_000;
const DEPTH = 200_000;

/** How many cases of each kind, per format. */
const COUNTS = {
  flipsInStructure: 16,
  flipsInData: 8,
  flipsAnywhere: 12,
  pickleFlips: 12,
  truncations: 24,
  fieldEditsPerGroup: 12,
  headerEdits: 48,
  paramsEdits: 12,
  bitFlipsInData: 8,
};

export function* casesFor(format: Format, rng: Rng): Generator<Case> {
  for (let round = 0; round < SCALE; round++) yield* roundOfCases(format, rng);
}

function* roundOfCases(format: Format, rng: Rng): Generator<Case> {
  const original = format.weights;
  const size = original.length;
  const { anatomy } = format;
  const structure = complement(anatomy.data, size);
  const show = (offsets: number[]): string => offsets.join(',');
  // In the tar, params.json is a member among the bytes flipped.
  const paramsRange = Buffer.isBuffer(format.params) ? null : format.params;
  const inParams = (offsets: number[]): boolean => paramsRange !== null && offsets.some((o) => o >= paramsRange[0] && o < paramsRange[1]);

  for (let i = 0; i < COUNTS.flipsInStructure; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, structure);
    yield { kind: 'flip (structure)', what: `flip bytes ${show(offsets)} outside tensor data`, weights: bytes, paramsTouched: inParams(offsets) };
  }
  for (let i = 0; i < COUNTS.flipsInData; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, anatomy.data);
    yield { kind: 'flip (tensor data)', what: `flip bytes ${show(offsets)} in tensor data`, weights: bytes, paramsTouched: false, dataFlips: offsets.length };
  }
  for (let i = 0; i < COUNTS.flipsAnywhere; i++) {
    const bytes = Buffer.from(original);
    const offsets = flipBytes(rng, bytes, [[0, size]]);
    yield { kind: 'flip (anywhere)', what: `flip bytes ${show(offsets)}`, weights: bytes, paramsTouched: inParams(offsets) };
  }
  if (anatomy.pickle) {
    const { range, recrc } = anatomy.pickle;
    for (let i = 0; i < COUNTS.pickleFlips; i++) {
      const bytes = Buffer.from(original);
      const offsets = flipBytes(rng, bytes, [range], 4);
      recrc(bytes);
      yield { kind: 'flip (pickle, CRC-32 updated)', what: `flip pickle bytes ${show(offsets.map((o) => o - range[0]))} (CRC-32 updated)`, weights: bytes, paramsTouched: false };
    }
  }
  for (let i = 0; i < COUNTS.truncations; i++) {
    const at = i % 2 === 0 ? rng.int(size) : offsetIn(rng, structure);
    yield { kind: 'truncation', what: `truncate to ${at} of ${size} bytes`, weights: original.subarray(0, at), paramsTouched: false };
  }
  const groups = [...anatomy.fieldGroups].filter(([, fields]) => fields.length > 0);
  for (let i = 0; i < COUNTS.fieldEditsPerGroup * groups.length; i++) {
    const [group, fields] = groups[i % groups.length];
    const bytes = Buffer.from(original);
    yield { kind: `length field (${group})`, what: editField(rng, bytes, rng.pick(fields), size), weights: bytes, paramsTouched: false };
  }
  if (format.safetensors) {
    for (let i = 0; i < COUNTS.headerEdits; i++) {
      const { bytes, what } = editSafetensorsHeader(rng, original);
      yield { kind: 'header shape/data_offsets/dtype', what, weights: bytes, paramsTouched: false };
    }
  }
  for (let i = 0; i < COUNTS.paramsEdits; i++) {
    if (Buffer.isBuffer(format.params)) {
      const params = format.params;
      const name = path.basename(format.paramsFile);
      let bytes: Buffer = Buffer.from(params);
      let what: string;
      if (i % 3 === 0) {
        what = `flip ${name} bytes ${show(flipBytes(rng, bytes, [[0, params.length]], 3))}`;
      } else if (i % 3 === 1) {
        const at = rng.int(params.length);
        bytes = bytes.subarray(0, at);
        what = `truncate ${name} to ${at} bytes`;
      } else {
        ({ bytes, what } = editJsonNumber(rng, params, name));
      }
      yield { kind: 'params', what, weights: original, params: bytes, paramsTouched: true };
    } else {
      const bytes = Buffer.from(original);
      const offsets = flipBytes(rng, bytes, [format.params], 3);
      yield { kind: 'params', what: `flip params.json member bytes ${show(offsets.map((o) => o - (format.params as Range)[0]))}`, weights: bytes, paramsTouched: true };
    }
  }
  // Single bits, as storage and transfers flip them (issue 10 flipped 8 random bits of a checkpoint).
  for (let i = 0; i < COUNTS.bitFlipsInData; i++) {
    const bytes = Buffer.from(original);
    const bits = flipBits(rng, bytes, anatomy.data);
    yield { kind: 'bit flips (tensor data)', what: `flip bits ${bits.join(',')} (byte.bit) in tensor data`, weights: bytes, paramsTouched: false, dataFlips: bits.length };
  }
  if (anatomy.pickle && anatomy.withPickle) yield* deepPickleCases(rng, original.subarray(...anatomy.pickle.range), anatomy.withPickle);
}

/**
 * The state dict's pickle with a list of 500,000 items built and dropped (POP) before it: the model
 * must open unchanged; or a structure 200,000 deep instead of the state dict: a clean error. The file is rebuilt around the longer pickle (a new zip, and in the tar a new tar).
 */
function* deepPickleCases(rng: Rng, pickle: Buffer, withPickle: (pickle: Buffer) => Buffer): Generator<Case> {
  if (pickle[0] !== 0x80) throw new Error('fuzz setup: the state dict pickle does not start with PROTO');
  const proto = pickle.subarray(0, 2);
  const before = (value: Buffer): Buffer => Buffer.concat([proto, value, Buffer.from('0'), pickle.subarray(2)]);
  const instead = (value: Buffer): Buffer => Buffer.concat([proto, value, Buffer.from('.')]);
  const kind = 'deep pickle (APPENDS, nesting)';
  const notADict = /pickle does not hold a dict/;
  // Two cases per format, to keep the run short: the long list (the finding) dropped, and a deep
  // structure (lists or tuples, by the seed) where the state dict should be.
  yield { kind, what: `${APPENDS} APPENDS items popped before the state dict`, weights: withPickle(before(manyAppends(APPENDS))), paramsTouched: false, sameWeights: true };
  const [shape, deep] = rng.next() < 0.5 ? ['lists', nestedLists(DEPTH)] : ['tuples', nestedTuples(DEPTH)];
  yield { kind, what: `${shape} nested ${DEPTH} deep instead of the state dict`, weights: withPickle(instead(deep)), paramsTouched: false, error: notADict };
}
