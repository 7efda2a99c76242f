/**
 * Optional: llama.cpp itself (through node-llama-cpp, never a dependency of the project) reads the
 * writer's GGUF files as the port does. Runs only when NODE_LLAMA_CPP_DIR names a folder where
 * node-llama-cpp is installed (`npm install node-llama-cpp` in a temporary folder); otherwise it is
 * skipped with a message.
 *
 * The tiny model written as F32 GGUF, 8 tokens (within its sliding window of 8, which llama.cpp's
 * "llama" architecture does not apply): llama.cpp's logits must match the port's to within llama.cpp's
 * own rounding (measured: 1.5e-3 of logits up to 8.9), while the same file with its q/k rows put in
 * Hugging Face's rotate-half order (the layout GGUF does NOT use) must be far off: this is the known
 * answer that shows GGUF's rows are the reference's interleaved-pair order.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, describe, expect, it } from 'vitest';
import { openGguf } from '../checkpoint/gguf';
import { encodeFloats, writeGguf, type GgufTensorToWrite } from '../checkpoint/gguf_write';
import { run } from '../cli/main';
import { loadModel } from '../one_file_ref';

const ROOT = path.resolve(__dirname, '..');
const NLC = process.env.NODE_LLAMA_CPP_DIR;
const available = NLC !== undefined && fs.existsSync(path.join(NLC, 'node_modules', 'node-llama-cpp'));
if (!available) console.warn('gguf_llamacpp.test.ts: skipped: set NODE_LLAMA_CPP_DIR to a folder with node-llama-cpp installed');

const IDS = [1, 17, 300, 42, 5, 511, 260, 99];

const SCRIPT = `
import { getLlama } from 'node-llama-cpp';
import fs from 'fs';
const [file, ids, out] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: 'never' });
const model = await llama.loadModel({ modelPath: file });
const ctx = await model.createContext({ contextSize: 64, batchSize: 64 });
const res = await ctx.getSequence().controlledEvaluate(JSON.parse(ids).map((t) => [t, { generateNext: { logits: true } }]));
fs.writeFileSync(out, JSON.stringify(res.map((r) => Array.from(r.next.logits.entries()))));
await ctx.dispose(); await model.dispose();
`;

describe.skipIf(!available)(available ? 'llama.cpp reads the writer\'s GGUF' : 'llama.cpp reads the writer\'s GGUF (skipped: NODE_LLAMA_CPP_DIR not set)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-llamacpp-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  function llamaLogits(file: string): Float32Array {
    const script = path.join(NLC!, 'logits.mjs');
    fs.writeFileSync(script, SCRIPT);
    const out = path.join(dir, 'out.json');
    execFileSync('node', [script, file, JSON.stringify(IDS), out], { cwd: NLC, stdio: 'ignore', timeout: 120_000 });
    const rows = JSON.parse(fs.readFileSync(out, 'utf8')) as [number, number][][];
    const logits = new Float32Array(IDS.length * 512).fill(NaN);
    rows.forEach((row, i) => row.forEach(([t, v]) => (logits[i * 512 + t] = v)));
    return logits;
  }

  it('same logits as the port for the reference layout; far off with HF-ordered q/k rows', async () => {
    const good = path.join(dir, 'tiny-f32.gguf');
    await run(['convert', path.join(ROOT, 'fixtures', 'tiny'), '--out', good, '--type', 'f32', '--quiet']);
    // The same file with each head's q/k rows in HF's order (HF row h*d + j*d/2 + i = row h*d + 2i + j).
    const g = openGguf(good);
    const tensors: GgufTensorToWrite[] = [...g.tensors].map(([name, info]) => ({
      name: info.ggufName,
      shape: info.shape,
      type: 'F32',
      data: () => {
        const w = g.read(name);
        if (!/attention\.w[qk]/.test(name)) return encodeFloats('F32', w);
        const [rows, cols] = info.shape;
        const d = 16;
        const out = new Float32Array(w.length);
        for (let r = 0; r < rows; r++) {
          const h = Math.floor(r / d);
          const j = Math.floor((r % d) / (d / 2));
          const i = r % (d / 2);
          out.set(w.subarray((h * d + 2 * i + j) * cols, (h * d + 2 * i + j + 1) * cols), r * cols);
        }
        return encodeFloats('F32', out);
      },
    }));
    const bad = path.join(dir, 'tiny-hf-order.gguf');
    writeGguf(bad, [...g.metadata], tensors, g.alignment);
    g.close();

    const { transformer } = await loadModel(good, { maxBatchSize: 1 });
    const port = tf.tidy(() =>
      transformer.forward(tf.tensor2d([IDS], [1, IDS.length], 'int32'), tf.range(0, IDS.length, 1, 'int32') as tf.Tensor1D).dataSync() as Float32Array,
    );
    transformer.dispose();
    const maxDiff = (a: Float32Array): number => a.reduce((m, v, i) => Math.max(m, Math.abs(v - port[i])), 0);
    const maxAbs = port.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    const right = maxDiff(llamaLogits(good));
    const wrong = maxDiff(llamaLogits(bad));
    console.log(`llama.cpp vs the port: max |diff| ${right} (reference q/k order), ${wrong} (HF order); max |logit| ${maxAbs}`);
    expect(right).toBeLessThan(5e-4 * maxAbs);
    expect(wrong).toBeGreaterThan(50 * right);
  });
});
