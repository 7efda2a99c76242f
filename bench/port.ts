/**
 * The port's side of the benchmark, in a process of its own so that its load time and peak RSS
 * are its own: loads a model folder, runs the workloads `--reps` times (each on fresh caches) and
 * prints one BENCH_RESULT line of JSON. run.ts starts it; it also runs alone:
 *
 *   npx ts-node --transpile-only bench/port.ts --model DIR [--prefill 128] [--decode 32]
 *       [--batch 4] [--batch-prefill 128] [--batch-decode 32] [--reps 3] [--low-memory] [--backend wasm]
 *       [--pool on|off|auto] [--threads N] [--quantize q8_0]
 */
import * as os from 'os';
import { initBackend } from '../runtime/backend';
import { Transformer } from '../one_file_ref';
import { closeComputePools } from '../model/pooled';
import { Q8_0_POOL_BYTES_PER_WEIGHT } from '../kernels/pool';
import { openModel } from '../checkpoint';
import { BYTES_PER_ELEMENT } from '../checkpoint/types';
import { emitResult, intFlag, paramsReadPerToken, parseFlags, peakRssBytes, type Params } from './common';
import { runWorkloads, type RunTimes } from './workloads';

export interface PortResult {
  side: 'port';
  backend: string;
  format: string;
  lowMemory: boolean;
  /** Threads of the compute pool that multiplies the layer and output weights; 0 on the tfjs path. */
  poolThreads: number;
  storedBytesPerParam: number;
  paramsPerToken: number;
  loadS: number;
  runs: RunTimes[];
  peakRssBytes: number;
  loadavg: number[];
}

const FLAGS = ['model', 'prefill', 'decode', 'batch', 'batch-prefill', 'batch-decode', 'reps', 'low-memory', 'backend', 'pool', 'threads', 'quantize'] as const;

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2), FLAGS);
  const model = flags.get('model');
  if (!model) throw new Error('--model DIR is required');
  const prefill = intFlag(flags, 'prefill', 128);
  const workload = {
    prefill,
    decode: intFlag(flags, 'decode', 32),
    batch: intFlag(flags, 'batch', 4),
    batchPrefill: intFlag(flags, 'batch-prefill', prefill),
    batchDecode: intFlag(flags, 'batch-decode', 32),
  };
  const reps = intFlag(flags, 'reps', 3);
  const backend = await initBackend(flags.get('backend') ?? 'wasm', { quiet: true });

  const files = await openModel(model);
  const format = `${files.format}, ${files.weights.tensors.get('output.weight')?.dtype}`;
  let storedBytesPerParam = BYTES_PER_ELEMENT[files.weights.tensors.get('layers.0.feed_forward.w1.weight')!.dtype];
  const params = files.params as Params;
  files.close();

  const t0 = performance.now();
  const transformer = await Transformer.fromFolder(model, {
    maxBatchSize: 1,
    lowMemory: flags.has('low-memory') ? true : 'auto',
    pool: (flags.get('pool') ?? 'auto') as 'on' | 'off' | 'auto',
    threads: flags.has('threads') ? intFlag(flags, 'threads', 1) : undefined,
    ...(flags.get('quantize') === 'q8_0' && { quantize: 'q8_0' as const }),
    onDecision: (line) => process.stderr.write(`${line}\n`),
  });
  const loadS = (performance.now() - t0) / 1000;
  const w1 = transformer.stateDict.get('layers.0.feed_forward.w1.weight');
  const poolThreads = w1?.pooled?.lease.pool.threads ?? 0;
  const lowMemory = poolThreads === 0 && w1?.transposed === null;
  // Q8_0 in the pool: 32 int8 and a float32 scale per 32 weights, the bytes each token reads.
  if (w1?.pooled?.handle.dtype === 'q8_0') storedBytesPerParam = Q8_0_POOL_BYTES_PER_WEIGHT;

  const runs: RunTimes[] = [];
  for (let r = 0; r < reps; r++) {
    runs.push(runWorkloads(transformer, workload));
    process.stderr.write(`port rep ${r + 1}/${reps}: prefill ${runs[r].prefillS.toFixed(2)} s, decode ${runs[r].decodeS.toFixed(2)} s, batch ${runs[r].batchDecodeS.toFixed(2)} s\n`);
  }
  const perToken = paramsReadPerToken(params);
  const result: PortResult = {
    side: 'port',
    backend,
    format,
    lowMemory,
    poolThreads,
    storedBytesPerParam,
    paramsPerToken: perToken.layers + perToken.output,
    loadS,
    runs,
    peakRssBytes: peakRssBytes(),
    loadavg: os.loadavg(),
  };
  transformer.dispose();
  await closeComputePools();
  emitResult(result);
}

main().catch((err: unknown) => {
  process.stderr.write(`error: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
