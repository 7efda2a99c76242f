/**
 * Running the cases of one format: open the model, read every tensor raw and widened, validate the
 * params; classify the outcome (opened, or the project's own one-line error naming the file) and
 * check time and memory limits. Failures come back as one line each, naming seed, case and mutation.
 */
import * as fs from 'fs';
import { CheckpointError } from '../../checkpoint/errors';
import { openModel } from '../../checkpoint/index';
import { BYTES_PER_ELEMENT, type RawTensor } from '../../checkpoint/types';
import { ModelArgs, ModelArgsError } from '../../one_file_ref';
import { casesFor, type Format } from './cases';
import { Rng } from './rng';

/** Wall time one case may take (open, read every tensor, validate the params). Tiny files take milliseconds. */
const CASE_LIMIT_MS = 3000;
/** How much one case may add to ArrayBuffer memory (the files are about 0.3 MB). */
const CASE_ARRAY_BUFFER_LIMIT = 32 << 20;
/** Longest error message accepted, after the file name (names read from a corrupt file can be 64 KB). */
export const MAX_MESSAGE = 1200;
/** How much the whole run may add to the process's peak resident memory and to ArrayBuffer memory. */
export const RUN_MEMORY_LIMIT = 1 << 30;

type Outcome = 'opened' | 'clean error';

class Hang extends Error {}

async function withinLimit<T>(work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Hang(`no answer after ${CASE_LIMIT_MS} ms`)), CASE_LIMIT_MS);
  });
  try {
    return await Promise.race([work, limit]);
  } finally {
    clearTimeout(timer);
  }
}

/** Elements whose bits differ between two reads of a tensor. */
function differing(a: RawTensor, b: RawTensor): number {
  if (a.dtype !== b.dtype || a.data.length !== b.data.length) return Number.POSITIVE_INFINITY;
  let n = 0;
  const x = a.dtype === 'float32' ? new Uint32Array(a.data.buffer, a.data.byteOffset, a.data.length) : a.data;
  const y = b.dtype === 'float32' ? new Uint32Array(b.data.buffer, b.data.byteOffset, b.data.length) : b.data;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) n++;
  return n;
}

/** Opens the model, reads every tensor raw and widened, and validates the params. Returns the elements that differ from `reference`. */
async function openAndRead(format: Format, fileSize: number, reference: Map<string, RawTensor> | null, memory: MemoryWatch): Promise<number> {
  const model = await withinLimit(openModel(format.modelPath));
  memory.sample();
  let changed = 0;
  try {
    for (const [name, info] of model.weights.tensors) {
      const raw = model.weights.readRaw(name);
      if (raw.data.length !== info.numel) throw new Error(`tensor "${name}" read ${raw.data.length} elements, its info says ${info.numel}`);
      if (info.numel * BYTES_PER_ELEMENT[info.dtype] > fileSize) throw new Error(`tensor "${name}" of ${info.numel} ${info.dtype} is larger than the ${fileSize}-byte file`);
      if (model.weights.read(name).length !== info.numel) throw new Error(`tensor "${name}" widened to the wrong length`);
      const ref = reference?.get(name);
      changed += ref ? differing(ref, raw) : raw.data.length;
      memory.sample();
    }
    ModelArgs.fromParams(model.params, model.paramsFile);
  } finally {
    model.close();
  }
  return changed;
}

/** Process memory: the peak over the run, and the growth within one case. */
class MemoryWatch {
  private readonly startRss = process.resourceUsage().maxRSS * 1024;
  private readonly startArrayBuffers = process.memoryUsage().arrayBuffers;
  peakArrayBuffers = this.startArrayBuffers;
  private caseStart = 0;
  caseGrowth = 0;

  startCase(): void {
    this.caseStart = process.memoryUsage().arrayBuffers;
    this.caseGrowth = 0;
  }

  sample(): void {
    const now = process.memoryUsage().arrayBuffers;
    this.peakArrayBuffers = Math.max(this.peakArrayBuffers, now);
    this.caseGrowth = Math.max(this.caseGrowth, now - this.caseStart);
  }

  get runGrowth(): { rss: number; arrayBuffers: number } {
    return { rss: process.resourceUsage().maxRSS * 1024 - this.startRss, arrayBuffers: this.peakArrayBuffers - this.startArrayBuffers };
  }
}

export interface Tally {
  cases: number;
  opened: number;
  cleanErrors: number;
  byKind: Map<string, { cases: number; opened: number }>;
  slowestMs: number;
  /** Elements found changed over the cases that flipped bytes in tensor data only. */
  dataFlipChanges: number;
}

export const tallies = new Map<string, Tally>();
export const memory = new MemoryWatch();

/** Runs the cases of `format`; returns a line per failure. */
export async function fuzz(format: Format, seed: number): Promise<string[]> {
  fs.writeFileSync(format.weightsFile, format.weights);
  const pristine = await openModel(format.modelPath);
  const reference = new Map<string, RawTensor>();
  for (const name of pristine.weights.tensors.keys()) {
    const raw = pristine.weights.readRaw(name);
    reference.set(name, { dtype: raw.dtype, shape: raw.shape, data: raw.data.slice() });
  }
  pristine.close();

  const failures: string[] = [];
  const tally: Tally = { cases: 0, opened: 0, cleanErrors: 0, byKind: new Map(), slowestMs: 0, dataFlipChanges: 0 };
  tallies.set(format.name, tally);
  const rng = new Rng(seed);
  let index = 0;
  for (const c of casesFor(format, rng)) {
    const label = `${format.name}, seed ${seed}, case ${index++}: ${c.what}`;
    fs.writeFileSync(format.weightsFile, c.weights);
    if (Buffer.isBuffer(format.params)) fs.writeFileSync(format.paramsFile, c.params ?? format.params);
    // An error must name the file it is about: the mutated one (either file of the pair when config.json was touched).
    const files = c.paramsTouched ? [format.paramsFile, format.weightsFile] : [format.weightsFile];

    memory.startCase();
    const started = performance.now();
    let outcome: Outcome | null = null;
    try {
      const changed = await openAndRead(format, c.weights.length, reference, memory);
      outcome = 'opened';
      if (c.error) failures.push(`${label}: opened; expected an error matching ${c.error}`);
      if (c.sameWeights && changed !== 0) failures.push(`${label}: opened with ${changed} elements changed; expected the same weights`);
      if (c.dataFlips !== undefined && format.checksummed) {
        failures.push(`${label}: a flip inside tensor data opened; the record's CRC-32 must catch it`);
      } else if (c.dataFlips !== undefined) {
        tally.dataFlipChanges += changed;
        if (changed > c.dataFlips) failures.push(`${label}: ${changed} elements differ after ${c.dataFlips} flipped bytes`);
      }
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      const shown = JSON.stringify(message.length > 400 ? `${message.slice(0, 400)}...` : message);
      const ours = err instanceof CheckpointError || (c.paramsTouched && err instanceof ModelArgsError);
      if (!ours) {
        failures.push(`${label}: threw ${err instanceof Error ? err.name : typeof err} (not a CheckpointError): ${shown}`);
      } else if (/[\r\n\v\f\u0085\u2028\u2029]/.test(message)) {
        failures.push(`${label}: message is not one line: ${shown}`);
      } else if (message.length > MAX_MESSAGE + files[0].length) {
        failures.push(`${label}: message of ${message.length} characters: ${shown}`);
      } else if (!files.some((f) => message.startsWith(`${f}:`) || message.startsWith(`${f} (`))) {
        failures.push(`${label}: message does not start with the file (${files.join(' or ')}): ${shown}`);
      } else {
        outcome = 'clean error';
      }
      if (c.sameWeights) failures.push(`${label}: a corruption that leaves the weights as they were must open, got: ${shown}`);
      if (c.error && !c.error.test(message)) failures.push(`${label}: expected an error matching ${c.error}, got: ${shown}`);
      if (c.dataFlips !== undefined && !format.checksummed) {
        failures.push(`${label}: a flip inside tensor data of a file without checksums must not be an error, got: ${shown}`);
      } else if (c.dataFlips !== undefined && !/record "[^"]+\/data\/\d+" \([^)]*tensor "[^"]+"[^)]*\) fails its CRC-32 check/.test(message)) {
        failures.push(`${label}: a flip inside tensor data must fail the CRC-32 check of its record, naming the tensor; got: ${shown}`);
      }
    }
    const elapsed = performance.now() - started;
    memory.sample();
    if (elapsed > CASE_LIMIT_MS) failures.push(`${label}: took ${Math.round(elapsed)} ms (limit ${CASE_LIMIT_MS})`);
    if (memory.caseGrowth > CASE_ARRAY_BUFFER_LIMIT) failures.push(`${label}: ArrayBuffer memory grew ${memory.caseGrowth} bytes in one case`);

    tally.cases++;
    tally.slowestMs = Math.max(tally.slowestMs, elapsed);
    if (outcome === 'opened') tally.opened++;
    if (outcome === 'clean error') tally.cleanErrors++;
    const kind = tally.byKind.get(c.kind) ?? { cases: 0, opened: 0 };
    kind.cases++;
    if (outcome === 'opened') kind.opened++;
    tally.byKind.set(c.kind, kind);
  }
  return failures;
}
