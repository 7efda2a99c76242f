/**
 * Loading a model for a command: the backend, a progress bar, low-memory mode, timings on stderr,
 * and a warning when the weights hold NaN or Inf.
 */
import { type NonFiniteWeights, reportNonFiniteWeights } from '../checkpoint';
import { loadModel, type LoadOptions, type Tokenizer, type Transformer } from '../one_file_ref';
import { quantizeConflict } from '../model/load';
import { initBackend } from '../runtime/backend';
import { createProgress } from '../runtime/progress';
import { parseIntFlag, UsageError } from './args';

/** The common flags, as parseCommandLine returns them. */
export interface CommonFlags {
  backend?: string;
  'low-memory'?: boolean;
  pool?: string;
  threads?: string;
  quantize?: string;
  quiet?: boolean;
}

/** The loading flags checked (one-line UsageErrors), before anything starts: serve calls it before binding. */
export function checkLoadFlags(flags: CommonFlags): Pick<LoadOptions, 'pool' | 'threads' | 'quantize'> {
  const pool = flags.pool ?? 'auto';
  if (pool !== 'on' && pool !== 'off' && pool !== 'auto') throw new UsageError(`--pool must be on, off or auto, got "${pool}"`);
  const quantize = flags.quantize;
  if (quantize !== undefined && quantize !== 'q8_0') throw new UsageError(`--quantize must be q8_0, got "${quantize}"`);
  const conflict = quantize === undefined ? null : quantizeConflict(pool, flags['low-memory'] === true);
  if (conflict !== null) throw new UsageError(conflict);
  return {
    pool,
    threads: flags.threads === undefined ? undefined : parseIntFlag('threads', flags.threads, 0, 1),
    ...(quantize !== undefined && { quantize }),
  };
}

/** Options for loadModel/demo from the common flags; `loaded()` tells when the weights were all read. */
export function loadOptions(flags: CommonFlags, maxBatchSize: number): LoadOptions & { loadedAt: () => number } {
  const checked = checkLoadFlags(flags);
  const progress = createProgress('loading weights', { quiet: flags.quiet });
  let loadedAt = 0;
  return {
    maxBatchSize,
    lowMemory: flags['low-memory'] ? true : 'auto',
    ...checked,
    onDecision: (line) => {
      if (!flags.quiet) process.stderr.write(`${line}\n`);
    },
    onProgress: (done, total) => {
      progress.update(done, total);
      if (done >= total && loadedAt === 0) {
        loadedAt = Date.now();
        progress.finish();
      }
    },
    loadedAt: () => loadedAt || Date.now(),
  };
}

export async function loadForCommand(
  model: string,
  flags: CommonFlags,
  maxBatchSize: number,
): Promise<{ tokenizer: Tokenizer; transformer: Transformer }> {
  const opts = loadOptions(flags, maxBatchSize); // flags checked before the backend starts
  await initBackend(flags.backend, { quiet: flags.quiet });
  return reportNonFiniteWeightsOf(() => loadModel(model, opts));
}

/**
 * Runs `load` (anything that loads a model) and then prints one warning line if the weights it read
 * hold NaN or Inf: even with --quiet, since the model's output will be garbage and this says why.
 */
export async function reportNonFiniteWeightsOf<T>(load: () => Promise<T>): Promise<T> {
  const findings: NonFiniteWeights[] = [];
  const loaded = await reportNonFiniteWeights((finding) => findings.push(finding), load);
  const warning = nonFiniteWarning(findings);
  if (warning) process.stderr.write(`${warning}\n`);
  return loaded;
}

/**
 * One line for weights holding NaN or Inf, naming the first tensor that does (and how many others),
 * or null when there are none.
 */
export function nonFiniteWarning(findings: readonly NonFiniteWeights[]): string | null {
  if (findings.length === 0) return null;
  const [first] = findings;
  const counts = [first.nan ? `${first.nan} NaN` : '', first.inf ? `${first.inf} Inf` : ''].filter(Boolean).join(' and ');
  const others = findings.length > 1 ? `; ${findings.length - 1} more tensor${findings.length > 2 ? 's' : ''} too` : '';
  return `warning: ${first.file}: tensor "${first.tensor}" holds ${counts} among its ${first.numel} values${others} (corrupt weights: the output will be meaningless)`;
}

/** "35 steps in 12.3 s: 0.35 s/step, batch of 3" on stderr, unless quiet. */
export function reportSteps(flags: CommonFlags, steps: number, batch: number, startMs: number): void {
  if (flags.quiet || steps === 0) return;
  const seconds = (Date.now() - startMs) / 1000;
  process.stderr.write(`${steps} steps in ${seconds.toFixed(1)} s: ${(seconds / steps).toFixed(3)} s/step, batch of ${batch}\n`);
}
