/**
 * GGUF files made by the project's writer (`convert`) from the tiny fixtures, checked against the
 * folders they came from and against an independent reading in Python:
 *  - F32 GGUF: bit-for-bit the folder's logits; F16 and BF16: within their rounding, with every
 *    stored value equal to numpy's/torch's rounding of the source weights;
 *  - Q8_0: the blocks equal llama.cpp's quantize_row_q8_0_ref computed in numpy (float32
 *    arithmetic) from the source weights, and the reader's float32 values equal numpy's dequantizing
 *    of the file's blocks (a Python GGUF parser written in this test, not the port's);
 *  - the q/k row order: the Hugging Face fixture (rows permuted for HF's rotary) converted to GGUF
 *    gives the official folder's logits bit for bit, and its attn_q/attn_k rows are llama.cpp's
 *    convert_hf_to_gguf.py permute() of the HF rows, which equal the reference's rows.
 */
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openModel } from '../checkpoint';
import { dequantizeQ8_0, GgufType, openGguf, type GgufEntry } from '../checkpoint/gguf';
import { floatToBfloat16, floatToHalf, quantizeQ8_0, writeGguf } from '../checkpoint/gguf_write';
import { writeNpy } from '../checkpoint/npy';
import { loadModel } from '../one_file_ref';
import { runCommand } from './run_command';

const ROOT = path.resolve(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const TINY_HF_BIN = path.join(ROOT, 'fixtures', 'formats', 'tiny-hf-bin');
const PYTHON = '/usr/bin/python3';

let dir: string;

/** Logits [T, V] of `ids` from the model at `modelPath`. */
async function logitsOf(modelPath: string, ids: number[]): Promise<Float32Array> {
  const { transformer } = await loadModel(modelPath, { maxBatchSize: 1 });
  try {
    return tf.tidy(() => {
      const input = tf.tensor2d([ids], [1, ids.length], 'int32');
      const positions = tf.range(0, ids.length, 1, 'int32') as tf.Tensor1D;
      return transformer.forward(input, positions).dataSync() as Float32Array;
    });
  } finally {
    transformer.dispose();
  }
}

const IDS = [1, 17, 300, 42, 5, 511, 260, 99, 7, 128, 3, 64];

/** A GGUF parser and the Q8_0/f16 conversions in numpy, independent of the port's TypeScript. */
const PY_GGUF = String.raw`
import struct, sys, json
import numpy as np

def read_gguf(path):
    b = open(path, 'rb').read()
    pos = 0
    def take(fmt):
        nonlocal pos
        v = struct.unpack_from('<' + fmt, b, pos); pos += struct.calcsize('<' + fmt); return v[0]
    def string():
        nonlocal pos
        n = take('Q'); s = b[pos:pos + n].decode(); pos += n; return s
    fmts = {0:'B',1:'b',2:'H',3:'h',4:'I',5:'i',6:'f',7:'?',10:'Q',11:'q',12:'d'}
    def value(t):
        if t == 8: return string()
        if t == 9:
            it = take('I'); n = take('Q'); return [value(it) for _ in range(n)]
        return take(fmts[t])
    assert b[:4] == b'GGUF'; pos = 4
    version = take('I'); nt = take('Q'); nkv = take('Q')
    meta = {}
    for _ in range(nkv):
        k = string(); t = take('I'); meta[k] = value(t)
    infos = []
    for _ in range(nt):
        name = string(); nd = take('I'); ne = [take('Q') for _ in range(nd)]; t = take('I'); off = take('Q')
        infos.append((name, ne, t, off))
    align = meta.get('general.alignment', 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, ne, t, off in infos:
        n = int(np.prod(ne)); at = start + off
        shape = ne[::-1]
        if t == 0: a = np.frombuffer(b, np.float32, n, at).reshape(shape)
        elif t == 1: a = np.frombuffer(b, np.float16, n, at).reshape(shape)
        elif t == 30: a = np.frombuffer(b, np.uint16, n, at).reshape(shape)
        elif t == 8: a = np.frombuffer(b, np.uint8, n // 32 * 34, at).reshape(-1, 34)
        tensors[name] = (t, shape, a)
    return meta, tensors

def dequant_q8_0(blocks):
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)   # [nb, 1]
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)      # [nb, 32]
    return (d * q).reshape(-1)

def quant_q8_0(x):
    # llama.cpp's quantize_row_q8_0_ref, in float32: d = amax/127, id = 1/d, q = roundf(x*id)
    x = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide='ignore'):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    x0 = (x * idd).astype(np.float32)
    q = (np.sign(x0) * np.floor(np.abs(x0) + np.float32(0.5))).astype(np.int8)
    out = np.zeros((x.shape[0], 34), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out
`;

function python(script: string, args: string[]): string {
  return execFileSync(PYTHON, ['-c', PY_GGUF + script, ...args], { encoding: 'utf8', maxBuffer: 1 << 26 });
}

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gguf-test-'));
  for (const type of ['f32', 'f16', 'bf16', 'q8_0']) {
    await runCommand(['convert', TINY, '--out', path.join(dir, `tiny-${type}.gguf`), '--type', type, '--quiet']);
  }
  await runCommand(['convert', TINY_HF_BIN, '--out', path.join(dir, 'tiny-hf-f32.gguf'), '--type', 'f32', '--quiet']);
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('GGUF written from fixtures/tiny', () => {
  it('reads back the hyperparameters, names, shapes and types', async () => {
    const files = await openModel(path.join(dir, 'tiny-q8_0.gguf'));
    try {
      expect(files.format).toBe('gguf');
      expect(files.params).toEqual({
        dim: 64, n_layers: 2, head_dim: 16, hidden_dim: 160, n_heads: 4, n_kv_heads: 2,
        sliding_window: 8, norm_eps: Math.fround(1e-5), vocab_size: 512, rope_theta: 10000,
      });
      expect(files.warnings).toEqual([]);
      const wq = files.weights.tensors.get('layers.1.attention.wq.weight');
      expect(wq).toMatchObject({ shape: [64, 64], ggmlType: 'Q8_0', ne: [64, 64], ggufName: 'blk.1.attn_q.weight' });
      expect(files.weights.tensors.get('layers.0.feed_forward.w2.weight')).toMatchObject({ shape: [64, 160], ne: [160, 64], ggufName: 'blk.0.ffn_down.weight' });
      expect(files.weights.tensors.get('layers.0.feed_forward.w1.weight')).toMatchObject({ shape: [160, 64], ggufName: 'blk.0.ffn_gate.weight' });
      expect(files.weights.tensors.get('layers.0.feed_forward.w3.weight')).toMatchObject({ ggufName: 'blk.0.ffn_up.weight' });
      expect(files.weights.tensors.get('norm.weight')).toMatchObject({ shape: [64], ggmlType: 'F32', ggufName: 'output_norm.weight' });
      expect(files.weights.tensors.get('tok_embeddings.weight')).toMatchObject({ shape: [512, 64], ggufName: 'token_embd.weight' });
      expect(files.weights.tensors.size).toBe(21);
    } finally {
      files.close();
    }
  });

  it('F32 GGUF: bit-for-bit the logits of the folder it came from', async () => {
    const folder = await logitsOf(TINY, IDS);
    const gguf = await logitsOf(path.join(dir, 'tiny-f32.gguf'), IDS);
    expect(gguf.length).toBe(IDS.length * 512);
    expect(Buffer.from(gguf.buffer).equals(Buffer.from(folder.buffer))).toBe(true);
  });

  it('F16 and BF16 GGUF: every value as numpy/torch round the source; logits within that rounding', async () => {
    // The source is bf16, so the BF16 file holds the same bits and gives the same logits;
    // F16 has 3 more mantissa bits but a narrower exponent: tiny values lose bits.
    const out = python(
      String.raw`
import torch
sd = torch.load(sys.argv[1])
names = {'tok_embeddings.weight': 'token_embd.weight', 'layers.0.attention.wk.weight': 'blk.0.attn_k.weight',
         'layers.1.feed_forward.w2.weight': 'blk.1.ffn_down.weight', 'output.weight': 'output.weight', 'norm.weight': 'output_norm.weight'}
_, t16 = read_gguf(sys.argv[2]); _, tb16 = read_gguf(sys.argv[3])
bad = []
for ref, g in names.items():
    src = sd[ref].float().numpy()
    t, shape, a = t16[g]
    expect16 = src if src.ndim == 1 else src.astype(np.float16)
    if list(a.shape) != list(src.shape) or not np.array_equal(a.astype(np.float32), expect16.astype(np.float32)): bad.append('f16 ' + g)
    t, shape, a = tb16[g]
    expectb = src if src.ndim == 1 else sd[ref].view(torch.int16).numpy().view(np.uint16)
    if not np.array_equal(a, expectb): bad.append('bf16 ' + g)
print(json.dumps(bad))
`,
      [path.join(TINY, 'consolidated.00.pth'), path.join(dir, 'tiny-f16.gguf'), path.join(dir, 'tiny-bf16.gguf')],
    );
    expect(JSON.parse(out)).toEqual([]);

    const folder = await logitsOf(TINY, IDS);
    const bf16 = await logitsOf(path.join(dir, 'tiny-bf16.gguf'), IDS);
    expect(Buffer.from(bf16.buffer).equals(Buffer.from(folder.buffer))).toBe(true);
    const f16 = await logitsOf(path.join(dir, 'tiny-f16.gguf'), IDS);
    let maxDiff = 0;
    let maxAbs = 0;
    for (let i = 0; i < folder.length; i++) {
      maxDiff = Math.max(maxDiff, Math.abs(f16[i] - folder[i]));
      maxAbs = Math.max(maxAbs, Math.abs(folder[i]));
    }
    // f16 keeps 11 significant bits (relative error <= 2^-11 = 4.9e-4 per weight).
    expect(maxDiff).toBeLessThan(2e-3 * maxAbs);
  });

  it('Q8_0: blocks as llama.cpp quantizes them, read back as numpy dequantizes them', async () => {
    const gguf = openGguf(path.join(dir, 'tiny-q8_0.gguf'));
    const names = ['tok_embeddings.weight', 'layers.0.attention.wq.weight', 'layers.1.feed_forward.w2.weight', 'output.weight'];
    try {
      names.forEach((name, i) => writeNpy(path.join(dir, `read${i}.npy`), gguf.read(name), gguf.tensors.get(name)!.shape));
      // The raw accessor gives the file's 34-byte blocks.
      const wq = gguf.readQ8_0Blocks('layers.0.attention.wq.weight');
      expect(wq.length).toBe((64 * 64 / 32) * 34);
      expect(() => gguf.readQ8_0Blocks('norm.weight')).toThrow(/output_norm.weight" is F32, not Q8_0/);
    } finally {
      gguf.close();
    }
    const out = python(
      String.raw`
import torch
sd = torch.load(sys.argv[1])
_, t = read_gguf(sys.argv[2])
names = ['tok_embeddings.weight', 'layers.0.attention.wq.weight', 'layers.1.feed_forward.w2.weight', 'output.weight']
gnames = ['token_embd.weight', 'blk.0.attn_q.weight', 'blk.1.ffn_down.weight', 'output.weight']
res = []
for i, (ref, g) in enumerate(zip(names, gnames)):
    typ, shape, blocks = t[g]
    src = sd[ref].float().numpy()
    same_blocks = typ == 8 and np.array_equal(blocks, quant_q8_0(src))
    read = np.load(sys.argv[3] + '/read%d.npy' % i)
    deq = dequant_q8_0(blocks).reshape(src.shape)
    res.append([ref, bool(same_blocks), bool(np.array_equal(read, deq)), float(np.abs(deq - src).max() / np.abs(src).max())])
print(json.dumps(res))
`,
      [path.join(TINY, 'consolidated.00.pth'), path.join(dir, 'tiny-q8_0.gguf'), dir],
    );
    for (const [name, sameBlocks, sameRead, relErr] of JSON.parse(out) as [string, boolean, boolean, number][]) {
      expect({ name, sameBlocks, sameRead }).toEqual({ name, sameBlocks: true, sameRead: true });
      // int8 with a per-block scale: half a step of amax/127 per weight, plus the scale's f16
      // rounding (2^-11 relative, times |q| <= 127 steps).
      expect(relErr).toBeGreaterThan(0);
      expect(relErr).toBeLessThanOrEqual(0.5 / 127 + 2 ** -11);
    }
  });

  it('q/k rows: the Hugging Face checkpoint converted to GGUF gives the reference layout and logits', async () => {
    const folder = await logitsOf(TINY, IDS);
    const fromHf = await logitsOf(path.join(dir, 'tiny-hf-f32.gguf'), IDS);
    expect(Buffer.from(fromHf.buffer).equals(Buffer.from(folder.buffer))).toBe(true);
    // llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, applied to the HF rows, gives this file's
    // rows, which are the reference's: a file converted by llama.cpp from the HF checkpoint is the same.
    const out = python(
      String.raw`
import torch
def permute(w, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
hf = torch.load(sys.argv[1]); ref = torch.load(sys.argv[2])
_, t = read_gguf(sys.argv[3])
res = []
for layer in range(2):
    for proj, g, r, kv in (('q_proj', 'attn_q', 'wq', None), ('k_proj', 'attn_k', 'wk', 2)):
        w = hf['model.layers.%d.self_attn.%s.weight' % (layer, proj)].float().numpy()
        mine = t['blk.%d.%s.weight' % (layer, g)][2]
        reference = ref['layers.%d.attention.%s.weight' % (layer, r)].float().numpy()
        res.append([bool(np.array_equal(permute(w, 4, kv), mine)), bool(np.array_equal(mine, reference)), bool(np.array_equal(w, reference))])
print(json.dumps(res))
`,
      [path.join(TINY_HF_BIN, 'pytorch_model.bin'), path.join(TINY, 'consolidated.00.pth'), path.join(dir, 'tiny-hf-f32.gguf')],
    );
    // [llama.cpp's permute(HF) == GGUF rows, GGUF rows == reference rows, HF rows == reference rows (false: HF is permuted)]
    expect(JSON.parse(out)).toEqual([[true, true, false], [true, true, false], [true, true, false], [true, true, false]]);
  });

  it('the tokenizer rebuilt from the metadata gives the folder tokenizer\'s ids', async () => {
    const a = await loadModel(TINY, { maxBatchSize: 1 });
    const b = await loadModel(path.join(dir, 'tiny-q8_0.gguf'), { maxBatchSize: 1 });
    try {
      const text = 'Hello world! Zoë paid $12.50 for a naïve crème brûlée 🙂\n\ttabs  and   spaces';
      expect(b.tokenizer.encode(text)).toEqual(a.tokenizer.encode(text));
      expect(b.tokenizer.nWords).toBe(512);
    } finally {
      a.transformer.dispose();
      b.transformer.dispose();
    }
  });

  it('a GGUF converted again holds the same metadata and tensors (GGUF in, GGUF out)', async () => {
    await runCommand(['convert', path.join(dir, 'tiny-f32.gguf'), '--out', path.join(dir, 'again.gguf'), '--type', 'f32', '--quiet']);
    const first = openGguf(path.join(dir, 'tiny-f32.gguf'));
    const again = openGguf(path.join(dir, 'again.gguf'));
    try {
      const strip = (m: ReadonlyMap<string, unknown>) => [...m].filter(([k]) => k !== 'general.name');
      expect(strip(again.metadata)).toEqual(strip(first.metadata));
      expect(again.metadata.get('general.name')).toEqual({ type: 8, value: 'tiny-f32.gguf' });
      expect([...again.tensors.keys()]).toEqual([...first.tensors.keys()]);
      for (const name of first.tensors.keys()) expect(again.read(name)).toEqual(first.read(name));
    } finally {
      first.close();
      again.close();
    }
  });
});

describe('GGUF metadata of every value type, and a non-default alignment', () => {
  it('round-trips through the writer and reader, and Python\'s parser reads the same values and tensor', () => {
    const T = GgufType;
    const entries: [string, GgufEntry][] = [
      ['general.architecture', { type: T.STRING, value: 'llama' }],
      ['general.alignment', { type: T.UINT32, value: 64 }],
      ['t.u8', { type: T.UINT8, value: 255 }],
      ['t.i8', { type: T.INT8, value: -128 }],
      ['t.u16', { type: T.UINT16, value: 65535 }],
      ['t.i16', { type: T.INT16, value: -32768 }],
      ['t.u32', { type: T.UINT32, value: 4294967295 }],
      ['t.i32', { type: T.INT32, value: -2147483648 }],
      ['t.f32', { type: T.FLOAT32, value: 0.5 }],
      ['t.bool', { type: T.BOOL, value: true }],
      ['t.str', { type: T.STRING, value: 'Zoë \ufeff🙂' }],
      ['t.u64', { type: T.UINT64, value: 18446744073709551615n }],
      ['t.i64', { type: T.INT64, value: -9223372036854775808n }],
      ['t.f64', { type: T.FLOAT64, value: 0.1 }],
      ['t.arr', { type: T.ARRAY, itemType: T.INT16, value: { itemType: T.INT16, values: [1, -2, 3] } }],
      ['t.nested', { type: T.ARRAY, itemType: T.ARRAY, value: { itemType: T.ARRAY, values: [{ itemType: T.STRING, values: ['a', ''] }, { itemType: T.BOOL, values: [] }] } }],
      ['llama.embedding_length', { type: T.UINT64, value: 32n }],
      ['llama.block_count', { type: T.INT32, value: 1 }],
      ['llama.attention.head_count', { type: T.UINT16, value: 4 }],
      ['llama.feed_forward_length', { type: T.UINT8, value: 64 }],
      ['llama.attention.layer_norm_rms_epsilon', { type: T.FLOAT64, value: 1e-6 }],
      ['llama.vocab_size', { type: T.UINT32, value: 8 }],
    ];
    const norm = Float32Array.from({ length: 32 }, (_, i) => i / 7);
    const f = path.join(dir, 'types.gguf');
    writeGguf(f, entries, [
      { name: 'output_norm.weight', shape: [32], type: 'F32', data: () => new Uint8Array(norm.buffer) },
      { name: 'blk.0.ffn_norm.weight', shape: [32], type: 'F16', data: () => new Uint8Array(64).fill(0x3c).map((v, i) => (i % 2 ? v : 0)) },
    ], 64);
    const g = openGguf(f);
    try {
      for (const [key, entry] of entries) expect(g.metadata.get(key), key).toEqual(entry);
      expect(g.alignment).toBe(64);
      expect(g.tensors.get('layers.0.ffn_norm.weight')!.fileOffset % 64).toBe(0);
      expect(g.read('norm.weight')).toEqual(norm);
      expect(Array.from(g.read('layers.0.ffn_norm.weight'))).toEqual(new Array(32).fill(1));
      // Defaults where keys are absent: n_kv_heads = n_heads, head_dim = dim / n_heads, theta 10000, window 4096 (noted).
      expect(g.params).toEqual({ dim: 32, n_layers: 1, head_dim: 8, hidden_dim: 64, n_heads: 4, n_kv_heads: 4, sliding_window: 4096, norm_eps: 1e-6, vocab_size: 8, rope_theta: 10000 });
      expect(g.warnings.length).toBe(1);
    } finally {
      g.close();
    }
    const out = python(
      String.raw`
meta, t = read_gguf(sys.argv[1])
print(json.dumps({'meta': {k: v for k, v in meta.items() if k.startswith('t.')}, 'norm': t['output_norm.weight'][2].tolist(), 'ffn': t['blk.0.ffn_norm.weight'][2].astype(float).tolist()}))
`,
      [f],
    );
    const py = JSON.parse(out) as { meta: Record<string, unknown>; norm: number[]; ffn: number[] };
    expect(py.meta).toEqual({
      't.u8': 255, 't.i8': -128, 't.u16': 65535, 't.i16': -32768, 't.u32': 4294967295, 't.i32': -2147483648, 't.f32': 0.5,
      't.bool': true, 't.str': 'Zoë \ufeff🙂', 't.u64': 18446744073709551615, 't.i64': -9223372036854775808, 't.f64': 0.1,
      't.arr': [1, -2, 3], 't.nested': [['a', ''], []],
    });
    expect(py.norm).toEqual(Array.from(norm));
    expect(py.ffn).toEqual(new Array(32).fill(1));
  });
});

describe('float conversions against known values', () => {
  it('float16: rounding to nearest even, subnormals, overflow', () => {
    expect(floatToHalf(1)).toBe(0x3c00);
    expect(floatToHalf(-2)).toBe(0xc000);
    expect(floatToHalf(65504)).toBe(0x7bff);
    expect(floatToHalf(65520)).toBe(0x7c00); // halfway to the next binade: rounds to even = inf
    expect(floatToHalf(65519)).toBe(0x7bff);
    expect(floatToHalf(2 ** -24)).toBe(0x0001);
    expect(floatToHalf(2 ** -25)).toBe(0x0000); // tie -> even (0)
    expect(floatToHalf(3 * 2 ** -25)).toBe(0x0002); // 1.5 ulp -> 2
    expect(floatToHalf(1 + 2 ** -11)).toBe(0x3c00); // tie -> even
    expect(floatToHalf(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(floatToHalf(2 ** -14 - 2 ** -25)).toBe(0x0400); // largest subnormal rounds up into the normals
    expect(floatToHalf(Infinity)).toBe(0x7c00);
    expect(floatToHalf(NaN) & 0x7c00).toBe(0x7c00);
    expect(floatToHalf(NaN) & 0x3ff).not.toBe(0);
  });

  it('bfloat16: rounding to nearest even', () => {
    expect(floatToBfloat16(1)).toBe(0x3f80);
    expect(floatToBfloat16(1 + 2 ** -8)).toBe(0x3f80); // tie -> even
    expect(floatToBfloat16(1 + 3 * 2 ** -8)).toBe(0x3f82);
    expect(floatToBfloat16(-0)).toBe(0x8000);
    expect(floatToBfloat16(NaN) & 0x7fff).toBeGreaterThan(0x7f80);
  });

  it('Q8_0 of a hand-made block: d = amax/127, q = round(x/d) half away from zero; zeros stay zero', () => {
    const x = new Float32Array(64);
    x[0] = 127;
    x[1] = -63.5; // exactly half a step: away from zero -> -64
    x[2] = 0.49;
    x[3] = -127;
    // second block all zeros: d = 0, q = 0
    const blocks = quantizeQ8_0(x);
    expect(blocks.length).toBe(68);
    expect(blocks[0] | (blocks[1] << 8)).toBe(0x3c00); // d = 1 as f16
    const q = new Int8Array(blocks.buffer, 2, 32);
    expect([q[0], q[1], q[2], q[3], q[4]]).toEqual([127, -64, 0, -127, 0]);
    expect(Array.from(blocks.subarray(34))).toEqual(new Array(34).fill(0));
    const back = dequantizeQ8_0(blocks);
    expect([back[0], back[1], back[3], back[40]]).toEqual([127, -64, -127, 0]);
  });
});
