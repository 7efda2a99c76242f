/**
 * `--quantize q8_0` and Q8_0 GGUF files on the compute pool.
 *  - Quantizing while loading gives the blocks llama.cpp's rule gives: the pool's products for the
 *    tiny model loaded with --quantize q8_0 equal, bit for bit, those for the Q8_0 GGUF that the
 *    convert command writes (whose blocks test/gguf.test.ts checks against numpy's
 *    quantize_row_q8_0_ref); and that GGUF's Q8_0 tensors go to the pool as they are.
 *  - What it costs, on the shipped storyteller model and its held-out text (issue 14): perplexity
 *    within 1% of float32's, top-1 agreement at least 97%, the KL divergence small.
 *  - One-line errors for the flag.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openModel, reportNonFiniteWeights, type NonFiniteWeights } from '../checkpoint';
import { openGguf } from '../checkpoint/gguf';
import { loadModel, Transformer } from '../one_file_ref';
import { closeComputePools } from '../model/pooled';
import { runCommand } from './run_command';

const ROOT = path.resolve(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const STORYTELLER = path.join(ROOT, 'fixtures', 'storyteller');

let dir: string;

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'quantize-test-'));
  await runCommand(['convert', TINY, '--out', path.join(dir, 'tiny-q8_0.gguf'), '--type', 'q8_0', '--quiet']);
});

afterAll(async () => {
  await closeComputePools();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('--quantize q8_0', () => {
  it('holds the blocks of the Q8_0 GGUF written by convert (llama.cpp\'s rule): the same products, bit for bit; the GGUF\'s go in as they are', async () => {
    const quantized = await loadModel(TINY, { maxBatchSize: 1, quantize: 'q8_0', threads: 2 });
    const gguf = await loadModel(path.join(dir, 'tiny-q8_0.gguf'), { maxBatchSize: 1, pool: 'on', threads: 3 });
    try {
      let compared = 0;
      for (const [name, w] of quantized.transformer.stateDict) {
        if (w.pooled === null) continue;
        const other = gguf.transformer.stateDict.get(name)!.pooled!;
        expect(w.pooled.handle.dtype, name).toBe('q8_0');
        expect(other.handle.dtype, name).toBe('q8_0');
        const cols = w.pooled.handle.cols;
        const x = new Float32Array(3 * cols).map((_, i) => Math.sin(i * 0.7) + (i % 11 === 0 ? 5 : 0));
        const a = w.pooled.lease.pool.matmul(w.pooled.handle, x, 3);
        const b = other.lease.pool.matmul(other.handle, x, 3);
        expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer)), name).toBe(true);
        compared++;
      }
      const nLayers = JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8')).n_layers as number;
      expect(compared).toBe(nLayers * 7 + 1); // every layer matrix and the output
    } finally {
      quantized.transformer.dispose();
      gguf.transformer.dispose();
    }
  });

  it('storyteller, held-out text: perplexity within 1% of float32\'s, top-1 agreement >= 97%, KL printed', async () => {
    const text = path.join(dir, 'heldout.txt');
    fs.writeFileSync(text, fs.readFileSync(path.join(ROOT, 'fixtures', 'storyteller_heldout.txt'), 'utf8').split('\n').slice(0, 40).join('\n'));
    const base = path.join(dir, 'base.json');
    const float = JSON.parse((await runCommand(['perplexity', STORYTELLER, '--file', text, '--ctx', '128', '--save-logits', base, '--json', '--quiet'])).stdout);
    const q8 = JSON.parse((await runCommand(['perplexity', STORYTELLER, '--file', text, '--ctx', '128', '--quantize', 'q8_0', '--kl-divergence', base, '--json', '--quiet'])).stdout);
    expect(float.windows).toBeGreaterThanOrEqual(8);
    expect(Math.abs(q8.ppl / float.ppl - 1)).toBeLessThan(0.01);
    expect(q8.kl_divergence.ppl_ratio).toBeCloseTo(q8.ppl / float.ppl, 6);
    expect(q8.kl_divergence.top1_agreement).toBeGreaterThanOrEqual(0.97);
    expect(q8.kl_divergence.mean_kl).toBeGreaterThan(0); // the weights really are quantized
    expect(q8.kl_divergence.mean_kl).toBeLessThan(1e-3);
  });

  it('convert refuses --quantize (its own --type q8_0 does that); a loader without a pool refuses quantize', async () => {
    await expect(runCommand(['convert', TINY, '--out', path.join(dir, 'x.gguf'), '--quantize', 'q8_0'])).rejects.toThrow(
      /^convert takes --type q8_0; --quantize is for the commands that run the model$/,
    );
    expect(fs.existsSync(path.join(dir, 'x.gguf'))).toBe(false);
    const files = await openModel(TINY);
    try {
      expect(() => Transformer.fromCheckpoint(files.params, files.paramsFile, files.weights, { quantize: 'q8_0' })).toThrow(
        /^quantize q8_0 runs on the compute pool: load through Transformer.fromFolder or loadModel \(withComputePool\), not with computePool null$/,
      );
    } finally {
      files.close();
    }
  });

  it('an infinite Q8_0 scale: the same NaN/Inf counts whether the blocks go to the pool as they are or are widened (Inf x 0 is NaN)', async () => {
    const file = path.join(dir, 'inf-scale.gguf');
    const bytes = fs.readFileSync(path.join(dir, 'tiny-q8_0.gguf'));
    const g = openGguf(path.join(dir, 'tiny-q8_0.gguf'));
    const at = g.tensors.get('layers.0.attention.wq.weight')!.fileOffset + 34; // the second block
    g.close();
    bytes.writeUInt16LE(0x7c00, at); // +Inf
    bytes.fill(0, at + 2, at + 5); // three q = 0
    fs.writeFileSync(file, bytes);
    const counts = async (pool: 'on' | 'off'): Promise<number[][]> => {
      const heard: NonFiniteWeights[] = [];
      const loaded = await reportNonFiniteWeights((f) => heard.push(f), () => loadModel(file, { pool, onDecision: () => undefined }));
      loaded.transformer.dispose();
      return heard.map((f) => [f.nan, f.inf, f.first]);
    };
    expect(await counts('off')).toEqual([[3, 29, 32]]);
    expect(await counts('on')).toEqual([[3, 29, 32]]);
  });

  it('every command that loads a model lists --quantize in its --help', async () => {
    for (const command of ['generate', 'interactive', 'serve', 'logits', 'perplexity']) {
      const { stdout } = await runCommand([command, '--help']);
      expect(stdout, command).toContain('--quantize q8_0');
    }
  });

  it('bad flags: one line each', async () => {
    await expect(runCommand(['generate', TINY, '-p', 'a', '--quantize', 'q4_0'])).rejects.toThrow(/^--quantize must be q8_0, got "q4_0"$/);
    await expect(runCommand(['generate', TINY, '-p', 'a', '--quantize', 'q8_0', '--pool', 'off'])).rejects.toThrow(
      /^--quantize q8_0 runs on the compute pool: it cannot be used with --pool off$/,
    );
    await expect(runCommand(['generate', TINY, '-p', 'a', '--quantize', 'q8_0', '--low-memory'])).rejects.toThrow(
      /^--quantize q8_0 runs on the compute pool: it cannot be used with --low-memory$/,
    );
  });
});
