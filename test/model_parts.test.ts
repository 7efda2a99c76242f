/**
 * The building blocks of one_file_ref.ts against plain arithmetic written out independently here
 * (double-precision loops over the definitions in the reference), and ModelArgs validation.
 */
import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { applyRotaryEmb, ModelArgs, ModelArgsError, precomputeFreqsCis, repeatKV, RMSNorm, Transformer, Weight } from '../one_file_ref';
import { TINY } from './models';

function seeded(n: number, seed: number): number[] {
  // A small LCG: deterministic inputs without a dependency.
  let s = seed >>> 0;
  return Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  });
}

describe('repeatKV', () => {
  it('repeats each kv head consecutively, like torch.repeat_interleave on dim 2', () => {
    const before = tf.memory().numTensors;
    // keys[b, s, k, d] = 1000b + 100s + 10k + d
    const data = [];
    for (let b = 0; b < 2; b++) for (let s = 0; s < 3; s++) for (let k = 0; k < 2; k++) for (let d = 0; d < 2; d++) data.push(1000 * b + 100 * s + 10 * k + d);
    const keys = tf.tensor4d(data, [2, 3, 2, 2]);
    const [rk, rv] = repeatKV(keys, keys, 3);
    expect(rk.shape).toEqual([2, 3, 6, 2]);
    const out = rk.arraySync();
    for (let b = 0; b < 2; b++) for (let s = 0; s < 3; s++) for (let h = 0; h < 6; h++) for (let d = 0; d < 2; d++) {
      expect(out[b][s][h][d]).toBe(1000 * b + 100 * s + 10 * Math.floor(h / 3) + d);
    }
    expect(rv.arraySync()).toEqual(out);
    tf.dispose([keys, rk, rv]);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('rotary embeddings', () => {
  it('rotates interleaved pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d)', () => {
    const before = tf.memory().numTensors;
    const [b, t, h, d] = [1, 5, 2, 8];
    const x = seeded(b * t * h * d, 7);
    const positions = [0, 1, 2, 37, 1000];
    const table = precomputeFreqsCis(d, 1001, 10000);
    const cos = tf.gather(table.cos, positions) as tf.Tensor2D;
    const sin = tf.gather(table.sin, positions) as tf.Tensor2D;
    const xt = tf.tensor4d(x, [b, t, h, d]);
    const [q, k] = applyRotaryEmb(xt, xt, { cos, sin });
    const got = q.dataSync();
    for (let ti = 0; ti < t; ti++) for (let hi = 0; hi < h; hi++) for (let i = 0; i < d / 2; i++) {
      const angle = positions[ti] * Math.pow(10000, (-2 * i) / d);
      const base = (ti * h + hi) * d + 2 * i;
      const [re, im] = [x[base], x[base + 1]];
      expect(got[base]).toBeCloseTo(re * Math.cos(angle) - im * Math.sin(angle), 4);
      expect(got[base + 1]).toBeCloseTo(re * Math.sin(angle) + im * Math.cos(angle), 4);
    }
    expect(Array.from(k.dataSync())).toEqual(Array.from(got));
    tf.dispose([table.cos, table.sin, cos, sin, xt, q, k]);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('honours rope_theta', () => {
    const table = precomputeFreqsCis(4, 3, 1e6);
    // position 2, pair 1: angle = 2 / 1e6^(2/4) = 0.002
    expect(table.cos.arraySync()[2][1]).toBeCloseTo(Math.cos(0.002), 6);
    expect(table.sin.arraySync()[2][1]).toBeCloseTo(Math.sin(0.002), 6);
    tf.dispose([table.cos, table.sin]);
  });
});

describe('RMSNorm', () => {
  it('is x / sqrt(mean(x^2) + eps) * weight', () => {
    const x = seeded(2 * 3 * 4, 3);
    const w = [0.5, 1.5, -1, 2];
    const xt = tf.tensor3d(x, [2, 3, 4]);
    const wt = Weight.resident(Float32Array.from(w), [4]);
    const out = new RMSNorm(wt, 1e-5).forward(xt);
    const got = out.dataSync();
    for (let r = 0; r < 6; r++) {
      const row = x.slice(4 * r, 4 * r + 4);
      const rms = Math.sqrt(row.reduce((a, v) => a + v * v, 0) / 4 + 1e-5);
      row.forEach((v, i) => expect(got[4 * r + i]).toBeCloseTo((v / rms) * w[i], 5));
    }
    tf.dispose([xt, out]);
    wt.dispose();
  });
});

describe('ModelArgs', () => {
  const good = {
    dim: 64, n_layers: 2, head_dim: 16, hidden_dim: 160, n_heads: 4, n_kv_heads: 2,
    sliding_window: 8, norm_eps: 1e-5, vocab_size: 512,
  };

  it('reads params.json fields into camelCase, rope_theta 10000 when absent', () => {
    const args = ModelArgs.fromParams(good);
    expect([args.dim, args.nLayers, args.headDim, args.hiddenDim, args.nHeads, args.nKvHeads]).toEqual([64, 2, 16, 160, 4, 2]);
    expect([args.slidingWindow, args.normEps, args.vocabSize, args.ropeTheta]).toEqual([8, 1e-5, 512, 10000]);
    expect(ModelArgs.fromParams({ ...good, rope_theta: 1e6 }).ropeTheta).toBe(1e6);
  });

  it('allows dim different from n_heads * head_dim', () => {
    expect(ModelArgs.fromParams({ ...good, dim: 40 }).dim).toBe(40);
  });

  it.each([
    [{ ...good, dim: undefined }, /params.json: missing field "dim"/],
    [{ ...good, n_layers: '2' }, /"n_layers" must be a number/],
    [{ ...good, head_dim: 0 }, /"head_dim" must be positive/],
    [{ ...good, norm_eps: -1 }, /"norm_eps" must be positive/],
    [{ ...good, hidden_dim: 1.5 }, /"hidden_dim" must be an integer/],
    [{ ...good, n_kv_heads: 3 }, /"n_heads" \(4\) must be a multiple of "n_kv_heads" \(3\)/],
    [{ ...good, moe: {} }, /unknown field "moe"/],
    [[1, 2], /expected a JSON object/],
    [{ ...good, n_layers: 1e6 }, /params.json: field "n_layers" is 1000000, more than 1024/],
    [{ ...good, n_layers: 2e7 }, /params.json: field "n_layers" is 20000000, more than 1024/],
    [{ ...good, vocab_size: 2 ** 22, dim: 2 ** 17 }, /params.json: a weight of 549755813888 elements/],
  ])('rejects %j', (params, message) => {
    expect(() => ModelArgs.fromParams(params)).toThrow(message);
  });

  it('rejects a "__proto__" key like every other unknown key', () => {
    // JSON.parse makes "__proto__" an own key (an object literal would set the prototype instead)
    const parsed: unknown = JSON.parse(JSON.stringify(good).replace('{', '{"__proto__": {"dim": 1},'));
    expect(Object.keys(parsed as object)).toContain('__proto__');
    expect(() => ModelArgs.fromParams(parsed, 'x/params.json')).toThrow(/^x\/params.json: unknown field "__proto__"/);
    const constructorKey: unknown = JSON.parse(JSON.stringify(good).replace('{', '{"constructor": 1,'));
    expect(() => ModelArgs.fromParams(constructorKey)).toThrow(/unknown field "constructor"/);
  });

  it('a model folder whose params.json says n_layers 1e6 or 2e7 fails with one line naming the file and field, before loading weights', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'params-'));
    try {
      for (const f of ['consolidated.00.pth', 'tokenizer.model']) fs.symlinkSync(path.join(TINY, f), path.join(dir, f));
      for (const n of [1e6, 2e7]) {
        fs.writeFileSync(path.join(dir, 'params.json'), JSON.stringify({ ...good, n_layers: n }));
        const before = tf.memory().numTensors;
        const err = await Transformer.fromFolder(dir).then(() => null, (e: unknown) => e as Error);
        expect(err).toBeInstanceOf(ModelArgsError);
        expect(err!.message).toMatch(new RegExp(`params.json: field "n_layers" is ${n}`));
        expect(err!.message).not.toContain('\n');
        expect(tf.memory().numTensors).toBe(before);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
