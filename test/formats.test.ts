/**
 * openModel on every layout of the tiny model (fixtures/formats and fixtures/tiny.tar, written by
 * fixtures/make_formats.py from fixtures/tiny): the same params and, bit for bit, the same weights as
 * fixtures/tiny's consolidated.00.pth; HF's q/k row permutation against an independent formula and
 * against the rows Python's torch permuted; and broken safetensors files, HF configs, indexes and
 * folders crafted here at runtime, each a one-line error naming the file and the problem.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError } from '../checkpoint/errors';
import { paramsFromHfConfig, permuteRowsToHf, unpermuteRowsFromHf } from '../checkpoint/hf';
import { openModel, type ModelFiles } from '../checkpoint/index';
import { openPth } from '../checkpoint/pth';
import { openSafetensors } from '../checkpoint/safetensors';
import type { WeightReader } from '../checkpoint/types';
import { ModelArgs } from '../one_file_ref';

const FIXTURES = path.join(__dirname, '..', 'fixtures');
const TINY = path.join(FIXTURES, 'tiny');
const FORMATS = path.join(FIXTURES, 'formats');
const TAR = path.join(FIXTURES, 'tiny.tar');
const TINY_PARAMS = JSON.parse(fs.readFileSync(path.join(TINY, 'params.json'), 'utf8')) as Record<string, number>;
const TINY_TOKENIZER = fs.readFileSync(path.join(TINY, 'tokenizer.model'));

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'formats-test-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));

/** A fresh folder under TMP holding copies of `files` from `from`. */
let folders = 0;
function tmpFolder(from?: string, files: string[] = []): string {
  const dir = path.join(TMP, `m${folders++}`);
  fs.mkdirSync(dir);
  for (const f of files) fs.copyFileSync(path.join(from as string, f), path.join(dir, f));
  return dir;
}

/** Asserts that `fn` rejects or throws a CheckpointError whose one-line message starts with `file` and matches `problem`. */
async function expectError(fn: () => unknown, file: string, problem: RegExp): Promise<string> {
  let caught: unknown;
  try {
    await fn();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CheckpointError);
  const message = (caught as Error).message;
  expect(message).not.toContain('\n');
  expect(message.startsWith(`${file}: `)).toBe(true);
  expect(message).toMatch(problem);
  return message;
}

const bitsOf = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

// ---------------------------------------------------------------------------------------------
// The reference: fixtures/tiny's checkpoint as openPth reads it (itself checked against torch in
// checkpoint.test.ts).

const reference = openPth(path.join(TINY, 'consolidated.00.pth'));
afterAll(() => reference.close());

/** Every tensor of `weights` has the reference's name set, dtype, shape and float32 bits. */
function expectSameWeights(weights: WeightReader): void {
  expect([...weights.tensors.keys()].sort()).toEqual([...reference.tensors.keys()].sort());
  for (const [name, info] of reference.tensors) {
    const got = weights.tensors.get(name);
    expect(got?.dtype, name).toBe(info.dtype);
    expect(got?.shape, name).toEqual(info.shape);
    expect(got?.numel, name).toBe(info.numel);
    expect(bitsOf(weights.read(name)).equals(bitsOf(reference.read(name))), name).toBe(true);
    const raw = weights.readRaw(name);
    const refRaw = reference.readRaw(name);
    expect(raw.dtype).toBe('bfloat16');
    expect(Buffer.from(raw.data.buffer).equals(Buffer.from(refRaw.data.buffer)), name).toBe(true);
  }
}

// ---------------------------------------------------------------------------------------------

describe('openModel on every layout of fixtures/tiny', () => {
  const cases: { name: string; at: string; format: ModelFiles['format']; paramsFile: string; params: object }[] = [
    { name: 'official folder', at: TINY, format: 'folder', paramsFile: 'params.json', params: TINY_PARAMS },
    {
      name: 'official folder, safetensors',
      at: path.join(FORMATS, 'tiny-safetensors'),
      format: 'folder-safetensors',
      paramsFile: 'params.json',
      params: TINY_PARAMS,
    },
    // config.json has rope_theta 10000.0, the value the reference uses when params.json has none.
    ...['tiny-hf', 'tiny-hf-sharded', 'tiny-hf-bin'].map((name) => ({
      name,
      at: path.join(FORMATS, name),
      format: 'hf' as const,
      paramsFile: 'config.json',
      params: { ...TINY_PARAMS, rope_theta: 10000 },
    })),
  ];

  for (const c of cases) {
    it(`${c.name}: same params, tokenizer and weights (bit for bit) as fixtures/tiny`, async () => {
      const model = await openModel(c.at);
      try {
        expect(model.format).toBe(c.format);
        expect(model.path).toBe(c.at);
        expect(model.paramsFile).toBe(path.join(c.at, c.paramsFile));
        expect(model.params).toEqual(c.params);
        expect(ModelArgs.fromParams(model.params, model.paramsFile)).toEqual(ModelArgs.fromParams(TINY_PARAMS));
        expect(model.tokenizer).toEqual({ path: path.join(c.at, 'tokenizer.model') });
        expect(fs.readFileSync(path.join(c.at, 'tokenizer.model')).equals(TINY_TOKENIZER)).toBe(true);
        expectSameWeights(model.weights);
      } finally {
        model.close();
      }
    });
  }

  it('sharded pytorch_model-0000N-of-0000M.bin with its index', async () => {
    // Shards made here from pytorch_model.bin: each is a full copy, and the index decides which
    // tensors come from which (a tensor the index does not place in a shard is not read from it).
    const bin = path.join(FORMATS, 'tiny-hf-bin');
    const dir = tmpFolder(bin, ['config.json', 'tokenizer.model']);
    const shards = ['pytorch_model-00001-of-00002.bin', 'pytorch_model-00002-of-00002.bin'];
    for (const s of shards) fs.copyFileSync(path.join(bin, 'pytorch_model.bin'), path.join(dir, s));
    const hfNames = Object.keys(
      (JSON.parse(fs.readFileSync(path.join(FORMATS, 'tiny-hf-sharded', 'model.safetensors.index.json'), 'utf8')) as {
        weight_map: Record<string, string>;
      }).weight_map,
    );
    const weightMap = Object.fromEntries(hfNames.map((n, i) => [n, shards[i % 2]]));
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const model = await openModel(dir);
    try {
      expect(model.format).toBe('hf');
      expectSameWeights(model.weights);
    } finally {
      model.close();
    }
  });

  it('reports progress as tensors are read, ending at the total bytes (the HF index total_size)', async () => {
    const index = JSON.parse(fs.readFileSync(path.join(FORMATS, 'tiny-hf-sharded', 'model.safetensors.index.json'), 'utf8')) as {
      metadata: { total_size: number };
    };
    for (const at of [TINY, path.join(FORMATS, 'tiny-safetensors'), path.join(FORMATS, 'tiny-hf-sharded')]) {
      const calls: [number, number][] = [];
      const model = await openModel(at, { onProgress: (done, total) => calls.push([done, total]) });
      try {
        for (const name of model.weights.tensors.keys()) model.weights.read(name);
      } finally {
        model.close();
      }
      expect(calls.length).toBe(reference.tensors.size);
      expect(calls[calls.length - 1]).toEqual([index.metadata.total_size, index.metadata.total_size]);
      for (let i = 1; i < calls.length; i++) expect(calls[i][0]).toBeGreaterThan(calls[i - 1][0]);
    }
  });

  it('fixtures/tiny.tar (members out of order): same params, tokenizer and weights', async () => {
    const model = await openModel(TAR);
    try {
      expect(model.format).toBe('tar');
      expect(model.params).toEqual(TINY_PARAMS);
      expect('bytes' in model.tokenizer && Buffer.from(model.tokenizer.bytes).equals(TINY_TOKENIZER)).toBe(true);
      expectSameWeights(model.weights);
    } finally {
      model.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe("HF's q/k row permutation", () => {
  /** HF row h*d + j*d/2 + i holds Mistral row h*d + 2i + j: written out row by row. */
  function permuteByFormula(rows: number[][], nHeads: number): number[][] {
    const d = rows.length / nHeads;
    const out: number[][] = new Array(rows.length);
    for (let h = 0; h < nHeads; h++) {
      for (let j = 0; j < 2; j++) {
        for (let i = 0; i < d / 2; i++) out[h * d + j * (d / 2) + i] = rows[h * d + 2 * i + j];
      }
    }
    return out;
  }

  for (const [nRows, cols, nHeads] of [
    [32, 3, 4],
    [8, 5, 1],
    [12, 2, 6],
    [64, 7, 2],
  ]) {
    it(`[${nRows}, ${cols}] in ${nHeads} heads: matches the formula, and un-permuting gives the original`, () => {
      const rows = Array.from({ length: nRows }, (_, r) => Array.from({ length: cols }, (_, c) => r * 100 + c));
      const flat = new Float32Array(rows.flat());
      const expected = new Float32Array(permuteByFormula(rows, nHeads).flat());
      const permuted = permuteRowsToHf(flat, [nRows, cols], nHeads);
      expect(permuted).toBeInstanceOf(Float32Array);
      expect([...permuted]).toEqual([...expected]);
      if (nRows / nHeads > 2) expect([...permuted]).not.toEqual([...flat]); // heads of 2 rows stay as they are
      expect([...unpermuteRowsFromHf(permuted, [nRows, cols], nHeads)]).toEqual([...flat]);
      // The same on 16-bit patterns.
      const half = new Uint16Array(flat);
      const back = unpermuteRowsFromHf(permuteRowsToHf(half, [nRows, cols], nHeads), [nRows, cols], nHeads);
      expect(back).toBeInstanceOf(Uint16Array);
      expect([...back]).toEqual([...half]);
    });
  }

  it('rejects rows that do not split into heads of an even size', () => {
    expect(() => permuteRowsToHf(new Float32Array(12), [6, 2], 2)).toThrow(/heads of an even size/);
    expect(() => unpermuteRowsFromHf(new Float32Array(12), [6, 2], 4)).toThrow(/heads of an even size/);
  });

  it("the rows torch permuted in tiny-hf/model.safetensors un-permute to tiny's wq and wk", () => {
    const hf = openSafetensors(path.join(FORMATS, 'tiny-hf', 'model.safetensors'));
    try {
      for (let layer = 0; layer < TINY_PARAMS.n_layers; layer++) {
        for (const [hfPart, part, heads] of [
          ['q_proj', 'wq', TINY_PARAMS.n_heads],
          ['k_proj', 'wk', TINY_PARAMS.n_kv_heads],
        ] as const) {
          const stored = hf.readRaw(`model.layers.${layer}.self_attn.${hfPart}.weight`);
          const original = reference.readRaw(`layers.${layer}.attention.${part}.weight`);
          expect(stored.shape).toEqual(original.shape);
          expect([...stored.data]).not.toEqual([...original.data]);
          expect([...unpermuteRowsFromHf(stored.data, stored.shape, heads)]).toEqual([...original.data]);
          expect([...permuteRowsToHf(original.data, original.shape, heads)]).toEqual([...stored.data]);
        }
      }
    } finally {
      hf.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// A small safetensors writer, independent of checkpoint/.

interface StEntry {
  dtype: string;
  shape: unknown;
  data_offsets: unknown;
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

/** 8-byte length, `header` (a string is written as is), then `data`. */
function safetensorsBytes(header: Record<string, StEntry | Record<string, string>> | string, data: Uint8Array = new Uint8Array()): Buffer {
  const text = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(text.length));
  return Buffer.concat([length, text, data]);
}

/** A well-formed file of F32 tensors laid out one after another. */
function f32File(tensors: Record<string, number[]>): Buffer {
  const header: Record<string, StEntry> = {};
  const chunks: Buffer[] = [];
  let offset = 0;
  for (const [name, values] of Object.entries(tensors)) {
    const bytes = Buffer.from(new Float32Array(values).buffer);
    header[name] = { dtype: 'F32', shape: [values.length], data_offsets: [offset, offset + bytes.length] };
    chunks.push(bytes);
    offset += bytes.length;
  }
  return safetensorsBytes(header, Buffer.concat(chunks));
}

let files = 0;
function tmpFile(bytes: Uint8Array, name = `f${files++}.safetensors`): string {
  const p = path.join(TMP, name);
  fs.writeFileSync(p, bytes);
  return p;
}

describe('openSafetensors', () => {
  it('reads BF16, F16 and F32 values, zero-size tensors and metadata', () => {
    // bf16 0x3f80 = 1, 0xc000 = -2, 0x7f80 = inf; f16 0x3c00 = 1, 0x7bff = 65504, 0x0001 = 2^-24, 0xc400 = -4.
    const bf16 = new Uint16Array([0x3f80, 0xc000, 0x7f80]);
    const f16 = new Uint16Array([0x3c00, 0x7bff, 0x0001, 0xc400]);
    const f32 = new Float32Array([0.5, -0.25]);
    const data = Buffer.concat([Buffer.from(f32.buffer), Buffer.from(bf16.buffer), Buffer.from(f16.buffer)]);
    const file = tmpFile(
      safetensorsBytes(
        {
          __metadata__: { format: 'pt' },
          h: { dtype: 'F16', shape: [2, 2], data_offsets: [14, 22] },
          b: { dtype: 'BF16', shape: [3], data_offsets: [8, 14] },
          empty: { dtype: 'F32', shape: [0, 5], data_offsets: [8, 8] },
          f: { dtype: 'F32', shape: [1, 2], data_offsets: [0, 8] },
        },
        data,
      ),
    );
    const st = openSafetensors(file);
    try {
      expect(st.metadata).toEqual({ format: 'pt' });
      expect([...st.tensors.keys()]).toEqual(['f', 'b', 'empty', 'h']); // in file order
      expect([...st.read('b')]).toEqual([1, -2, Infinity]);
      expect([...st.read('h')]).toEqual([1, 65504, 2 ** -24, -4]);
      expect(st.tensors.get('h')).toMatchObject({ dtype: 'float16', shape: [2, 2], numel: 4 });
      expect([...st.read('f')]).toEqual([0.5, -0.25]);
      expect(st.read('empty').length).toBe(0);
      expect([...st.readRaw('b').data]).toEqual([...bf16]);
      expect(() => st.read('nope')).toThrow(/no tensor named "nope"/);
    } finally {
      st.close();
    }
    expect(() => st.read('f')).toThrow(CheckpointError);
  });

  it('reads a tensor more than 4 GiB into the file (sparse file)', () => {
    const big = 2_415_919_104; // bf16 elements: 4.5 GiB, never read
    const header = safetensorsBytes({
      big: { dtype: 'BF16', shape: [big], data_offsets: [0, 2 * big] },
      tail: { dtype: 'F32', shape: [2], data_offsets: [2 * big, 2 * big + 8] },
    });
    const file = tmpFile(header);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from(new Float32Array([1.5, -7]).buffer), 0, 8, header.length + 2 * big);
    fs.closeSync(fd);
    const st = openSafetensors(file);
    try {
      expect(st.tensors.get('big')?.numel).toBe(big);
      expect([...st.read('tail')]).toEqual([1.5, -7]);
    } finally {
      st.close();
      fs.rmSync(file);
    }
  });

  it('accepts a header padded with spaces', () => {
    const st = openSafetensors(tmpFile(safetensorsBytes(`${JSON.stringify({ a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } })}      `, Buffer.from(new Float32Array([3]).buffer))));
    expect([...st.read('a')]).toEqual([3]);
    st.close();
  });

  const valid = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };
  const eightBytes = Buffer.alloc(8);
  const bad: [string, () => Buffer, RegExp][] = [
    ['a file shorter than the header length', () => Buffer.from([1, 0, 0]), /3 bytes, too short/],
    ['a header length past the end of the file', () => Buffer.concat([u64(1000), Buffer.from('{}')]), /header length 1000 runs past the end of the 10-byte file/],
    ['a header length of 2^64 - 1', () => Buffer.concat([Buffer.alloc(8, 0xff), Buffer.from('{}')]), /header length 18446744073709551615 is over the 100 MB limit/],
    ['a header that is not JSON', () => safetensorsBytes('{"a": {"dtype": "F32",', eightBytes), /header is not valid JSON/],
    ['a header that is not UTF-8', () => safetensorsBytes('{}').fill(0xff, 8, 9), /header is not UTF-8/],
    ['a header that is a JSON array', () => safetensorsBytes('[1, 2]', eightBytes), /header is not a JSON object/],
    ['a header entry without data_offsets', () => safetensorsBytes({ a: { dtype: 'F32', shape: [2] } as unknown as StEntry }, eightBytes), /tensor "a": header entry must be/],
    ['a negative dim', () => safetensorsBytes({ a: { ...valid, shape: [-2] } }, eightBytes), /tensor "a" has shape \[-2\]: dims must be non-negative integers/],
    ['a fractional dim', () => safetensorsBytes({ a: { ...valid, shape: [1.5, 2] } }, eightBytes), /tensor "a" has shape \[1.5,2\]/],
    ['a dim that is a string', () => safetensorsBytes({ a: { ...valid, shape: ['2'] } }, eightBytes), /tensor "a" has shape \["2"\]/],
    ['data_offsets that are not a pair', () => safetensorsBytes({ a: { ...valid, data_offsets: [0, 4, 8] } }, eightBytes), /tensor "a" has data_offsets \[0,4,8\]/],
    ['data_offsets with end before begin', () => safetensorsBytes({ a: { ...valid, data_offsets: [8, 0] } }, eightBytes), /tensor "a" has data_offsets \[8,0\]/],
    ['data_offsets shorter than dtype x numel', () => safetensorsBytes({ a: { ...valid, data_offsets: [0, 4] } }, eightBytes), /tensor "a" has data_offsets \[0, 4\] \(4 bytes\), but F32 shape \[2\] needs 8 bytes/],
    ['data_offsets longer than dtype x numel', () => safetensorsBytes({ a: { dtype: 'BF16', shape: [2], data_offsets: [0, 8] } }, eightBytes), /BF16 shape \[2\] needs 4 bytes/],
    ['data_offsets past the end of the file', () => safetensorsBytes({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, eightBytes), /tensor "a" has data_offsets \[0, 16\] past the end of the data \(8 bytes after the header\)/],
    [
      'overlapping tensors',
      () => safetensorsBytes({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, Buffer.alloc(12)),
      /tensors "a" \(bytes 0..8\) and "b" \(bytes 4..12\) overlap/,
    ],
    ['an I64 tensor', () => safetensorsBytes({ ids: { dtype: 'I64', shape: [1], data_offsets: [0, 8] } }, eightBytes), /tensor "ids" has dtype I64, which cannot be used as weights; expected BF16, F16 or F32/],
    ['an F8_E4M3 tensor', () => safetensorsBytes({ q: { dtype: 'F8_E4M3', shape: [8], data_offsets: [0, 8] } }, eightBytes), /tensor "q" has dtype F8_E4M3/],
    ['an unknown dtype', () => safetensorsBytes({ a: { dtype: 'F31', shape: [2], data_offsets: [0, 8] } }, eightBytes), /tensor "a" has unknown dtype "F31"/],
    ['metadata that is not strings', () => safetensorsBytes({ __metadata__: { n: 1 } as unknown as Record<string, string> }), /"__metadata__" must be an object of strings/],
  ];
  for (const [what, bytes, problem] of bad) {
    it(`rejects ${what}`, async () => {
      const file = tmpFile(bytes());
      await expectError(() => openSafetensors(file), file, problem);
    });
  }

  it('rejects a header length over 100 MB even when the file is that large', async () => {
    const file = tmpFile(Buffer.concat([u64(150_000_000), Buffer.from('{}')]));
    fs.truncateSync(file, 200_000_000); // sparse: no disk used
    await expectError(() => openSafetensors(file), file, /header length 150000000 is over the 100 MB limit/);
  });

  it('rejects a truncated file (tiny-safetensors cut short) naming the tensor that runs past the end', async () => {
    const whole = fs.readFileSync(path.join(FORMATS, 'tiny-safetensors', 'consolidated.safetensors'));
    const file = tmpFile(whole.subarray(0, whole.length - 100));
    // The file's last tensor in byte order is the last by name: tok_embeddings.weight.
    await expectError(() => openSafetensors(file), file, /tensor "tok_embeddings.weight" has data_offsets \[\d+, \d+\] past the end/);
    const cutInHeader = tmpFile(whole.subarray(0, 100));
    await expectError(() => openSafetensors(cutInHeader), cutInHeader, /header length \d+ runs past the end of the 100-byte file/);
  });

  it('a missing file', async () => {
    const file = path.join(TMP, 'absent.safetensors');
    await expectError(() => openSafetensors(file), file, /cannot open \(no such file\)/);
  });
});

// ---------------------------------------------------------------------------------------------

describe('Hugging Face config.json', () => {
  const HF = path.join(FORMATS, 'tiny-hf');
  const CONFIG = JSON.parse(fs.readFileSync(path.join(HF, 'config.json'), 'utf8')) as Record<string, unknown>;

  it('maps the fields; head_dim null or absent is hidden_size / num_attention_heads', () => {
    const expected = { ...TINY_PARAMS, rope_theta: 10000 };
    expect(paramsFromHfConfig(CONFIG, 'config.json')).toEqual(expected);
    expect(paramsFromHfConfig({ ...CONFIG, head_dim: null }, 'config.json')).toEqual(expected);
    const { head_dim: _, ...noHeadDim } = CONFIG;
    expect(paramsFromHfConfig(noHeadDim, 'config.json')).toEqual(expected);
    // A head_dim that is not hidden_size / heads (as in Mistral NeMo) is taken as written.
    expect(paramsFromHfConfig({ ...CONFIG, head_dim: 32 }, 'config.json').head_dim).toBe(32);
    const { rope_theta: __, ...noTheta } = CONFIG;
    expect(paramsFromHfConfig(noTheta, 'config.json')).toEqual(TINY_PARAMS);
  });

  it('sliding_window null (no window) becomes max_position_embeddings', () => {
    expect(paramsFromHfConfig({ ...CONFIG, sliding_window: null }, 'config.json').sliding_window).toBe(32768);
    expect(paramsFromHfConfig({ ...CONFIG, sliding_window: null, max_position_embeddings: 100 }, 'config.json').sliding_window).toBe(100);
  });

  const bad: [string, Record<string, unknown>, RegExp][] = [
    ['hidden_size as a string', { hidden_size: '64' }, /field "hidden_size" must be a positive integer, got "64"/],
    ['num_hidden_layers fractional', { num_hidden_layers: 2.5 }, /field "num_hidden_layers" must be a positive integer, got 2.5/],
    ['rms_norm_eps negative', { rms_norm_eps: -1 }, /field "rms_norm_eps" must be a positive number, got -1/],
    ['rope_theta a string', { rope_theta: '1e4' }, /field "rope_theta" must be a positive number/],
    ['sliding_window false', { sliding_window: false }, /field "sliding_window" must be a positive integer, got false/],
    ['head_dim zero', { head_dim: 0 }, /field "head_dim" must be a positive integer, got 0/],
    ['vocab_size missing', { vocab_size: undefined }, /missing field "vocab_size"/],
    ['a llama model', { model_type: 'llama', architectures: ['LlamaForCausalLM'] }, /model_type "llama" .*is not supported: expected a Mistral model/],
    ['a mixtral model', { model_type: 'mixtral', architectures: ['MixtralForCausalLM'] }, /model_type "mixtral" .*is not supported/],
    ['gelu', { hidden_act: 'gelu' }, /hidden_act "gelu" is not supported/],
    ['tied embeddings', { tie_word_embeddings: true }, /tie_word_embeddings true is not supported/],
    ['tie_word_embeddings a string', { tie_word_embeddings: 'no' }, /field "tie_word_embeddings" must be true or false/],
    ['rope scaling', { rope_scaling: { type: 'linear', factor: 2 } }, /rope_scaling .* is not supported/],
  ];
  for (const [what, change, problem] of bad) {
    it(`openModel rejects ${what}, naming config.json`, async () => {
      const dir = tmpFolder(HF, ['model.safetensors', 'tokenizer.model']);
      fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...CONFIG, ...change }));
      await expectError(() => openModel(dir), path.join(dir, 'config.json'), problem);
    });
  }

  it('accepts a config naming only MistralForCausalLM, and one with model_type mistral only', () => {
    const { model_type: _, ...byArchitecture } = CONFIG;
    expect(paramsFromHfConfig(byArchitecture, 'config.json').dim).toBe(64);
    const { architectures: __, ...byType } = CONFIG;
    expect(paramsFromHfConfig(byType, 'config.json').dim).toBe(64);
  });

  it('rejects config.json that is not JSON', async () => {
    const dir = tmpFolder(HF, ['model.safetensors', 'tokenizer.model']);
    fs.writeFileSync(path.join(dir, 'config.json'), '{"hidden_size": 64,');
    await expectError(() => openModel(dir), path.join(dir, 'config.json'), /not valid JSON/);
  });
});

describe('Hugging Face weights', () => {
  const SHARDED = path.join(FORMATS, 'tiny-hf-sharded');
  const SHARD_FILES = ['config.json', 'tokenizer.model', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'];
  const INDEX = JSON.parse(fs.readFileSync(path.join(SHARDED, 'model.safetensors.index.json'), 'utf8')) as {
    weight_map: Record<string, string>;
  };
  const CONFIG = fs.readFileSync(path.join(FORMATS, 'tiny-hf', 'config.json'));

  function shardedFolder(weightMap: Record<string, string>, drop?: string): string {
    const dir = tmpFolder(SHARDED, SHARD_FILES.filter((f) => f !== drop));
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    return dir;
  }

  it('an index naming a shard that is not there', async () => {
    const dir = shardedFolder(INDEX.weight_map, 'model-00002-of-00002.safetensors');
    await expectError(
      () => openModel(dir),
      path.join(dir, 'model.safetensors.index.json'),
      /weight_map names shard "model-00002-of-00002.safetensors" \(for "[^"]+"\), which is not in /,
    );
  });

  it('an index putting a tensor in a shard that does not hold it', async () => {
    const dir = shardedFolder({ ...INDEX.weight_map, 'lm_head.weight': 'model-00001-of-00002.safetensors' });
    await expectError(
      () => openModel(dir),
      path.join(dir, 'model.safetensors.index.json'),
      /weight_map puts "lm_head.weight" in model-00001-of-00002.safetensors, which has no such tensor/,
    );
  });

  it('an index naming a shard outside the folder', async () => {
    const dir = shardedFolder({ ...INDEX.weight_map, 'lm_head.weight': '../model-00002-of-00002.safetensors' });
    await expectError(() => openModel(dir), path.join(dir, 'model.safetensors.index.json'), /expected a file name in the same folder/);
  });

  it('an index without weight_map', async () => {
    const dir = tmpFolder(SHARDED, SHARD_FILES);
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {} }));
    await expectError(() => openModel(dir), path.join(dir, 'model.safetensors.index.json'), /"weight_map"/);
  });

  /** An HF folder whose model.safetensors holds `names`, each a [1, 64] F32 row of zeros. */
  function hfFolderWith(names: string[]): string {
    const dir = tmpFolder(path.join(FORMATS, 'tiny-hf'), ['tokenizer.model']);
    fs.writeFileSync(path.join(dir, 'config.json'), CONFIG);
    fs.writeFileSync(path.join(dir, 'model.safetensors'), f32File(Object.fromEntries(names.map((n) => [n, new Array(64).fill(0)]))));
    return dir;
  }

  it('an unknown weight name', async () => {
    const dir = hfFolderWith(['model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.bias']);
    await expectError(
      () => openModel(dir),
      path.join(dir, 'model.safetensors'),
      /unknown weight "model.layers.0.self_attn.q_proj.bias" for a Mistral model \(expected model.embed_tokens.weight, /,
    );
    const dir2 = hfFolderWith(['model.layers.0.block_sparse_moe.gate.weight']);
    await expectError(() => openModel(dir2), path.join(dir2, 'model.safetensors'), /unknown weight "model.layers.0.block_sparse_moe.gate.weight"/);
  });

  it('skips rotary inv_freq buffers and maps the other names', async () => {
    const dir = hfFolderWith(['model.layers.1.self_attn.rotary_emb.inv_freq', 'model.embed_tokens.weight', 'model.layers.1.mlp.down_proj.weight', 'lm_head.weight']);
    const model = await openModel(dir);
    try {
      expect([...model.weights.tensors.keys()].sort()).toEqual(['layers.1.feed_forward.w2.weight', 'output.weight', 'tok_embeddings.weight']);
    } finally {
      model.close();
    }
  });

  it('a q_proj whose rows are not n_heads * head_dim', async () => {
    const dir = hfFolderWith(['model.layers.0.self_attn.q_proj.weight']);
    await expectError(() => openModel(dir), path.join(dir, 'model.safetensors'), /"model.layers.0.self_attn.q_proj.weight" has shape \[64\], expected 64 rows/);
  });
});

describe('openModel on what is not a model', () => {
  const LISTS = /not a model: expected a folder with params.json and consolidated.00.pth or consolidated.safetensors, a Hugging Face folder with config.json and model\*.safetensors or pytorch_model\*.bin, or a .tar of the official folder/;

  it('an empty folder: the message lists what was looked for', async () => {
    const dir = tmpFolder();
    const message = await expectError(() => openModel(dir), dir, LISTS);
    expect(message).toMatch(/this folder has none of those files/);
  });

  it('a folder with params.json but no weights, and one with config.json but no weights', async () => {
    // Half an official folder: the error names the missing weights file.
    const a = tmpFolder(TINY, ['params.json', 'tokenizer.model']);
    const missing = path.join(a, 'consolidated.00.pth');
    expect(await expectError(() => openModel(a), missing, /missing/)).toMatch(/consolidated.00.pth or consolidated.safetensors/);
    const b = tmpFolder(path.join(FORMATS, 'tiny-hf'), ['config.json', 'tokenizer.model']);
    expect(await expectError(() => openModel(b), b, LISTS)).toMatch(/this folder has config.json\)$/);
  });

  it('a file of a model folder given instead of the folder: "pass the folder that holds this file"', async () => {
    const tiny = path.resolve(TINY);
    const pass = (folder: string): RegExp => new RegExp(`not a model: pass the folder that holds this file \\(${folder.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}\\)$`);
    const pth = path.join(TINY, 'consolidated.00.pth');
    expect(await expectError(() => openModel(pth), pth, pass(tiny))).toMatch(/is a torch\.save checkpoint inside a model folder/);
    const st = path.join(FORMATS, 'tiny-hf', 'model.safetensors');
    expect(await expectError(() => openModel(st), st, pass(path.resolve(FORMATS, 'tiny-hf')))).toMatch(/is a safetensors file inside/);
    for (const name of ['params.json', 'tokenizer.model']) {
      const file = path.join(TINY, name);
      expect(await expectError(() => openModel(file), file, pass(tiny))).toMatch(new RegExp(`is the model's ${name.replace('.', '\\.')} inside`));
    }
    // Any other file beside a model's files, given by a relative path: the folder is named in full.
    const dir = tmpFolder(TINY, ['params.json', 'consolidated.00.pth', 'tokenizer.model']);
    fs.writeFileSync(path.join(dir, 'README.md'), '# a model\n');
    const relative = path.relative(process.cwd(), path.join(dir, 'README.md'));
    expect(await expectError(() => openModel(relative), relative, pass(dir))).toMatch(/is a file inside a model folder/);
  });

  it('a file that is none of these, alone in its folder: the message lists what a model is', async () => {
    const dir = tmpFolder();
    const file = path.join(dir, 'notes.txt');
    fs.writeFileSync(file, 'hello');
    await expectError(() => openModel(file), file, LISTS);
  });

  it('a GGUF file goes to the GGUF reader by its magic, whatever its name', async () => {
    const dir = tmpFolder();
    // GGUF's header: magic "GGUF", version 3, tensor count 0, metadata count 0.
    const gguf = Buffer.concat([Buffer.from('GGUF', 'latin1'), Buffer.from([3, 0, 0, 0]), Buffer.alloc(16)]);
    for (const name of ['mistral-7b-v0.1.Q4_K_M.gguf', 'model.bin']) {
      const file = path.join(dir, name);
      fs.writeFileSync(file, gguf);
      await expectError(() => openModel(file), file, /metadata key "general\.architecture" is missing/);
    }
  });

  it('a Hugging Face folder without config.json: "missing config.json", naming its path', async () => {
    for (const [from, files, shown] of [
      [path.join(FORMATS, 'tiny-hf'), ['model.safetensors', 'tokenizer.model'], 'model.safetensors'],
      [path.join(FORMATS, 'tiny-hf-bin'), ['pytorch_model.bin', 'tokenizer.model'], 'pytorch_model.bin'],
      [path.join(FORMATS, 'tiny-hf-sharded'), ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json'], 'model.safetensors.index.json, model-00001-of-00002.safetensors...'],
      [path.join(FORMATS, 'tiny-hf-sharded'), ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'], 'model-00001-of-00002.safetensors, model-00002-of-00002.safetensors'],
    ] as const) {
      const dir = tmpFolder(from, [...files]);
      const message = await expectError(() => openModel(dir), path.join(dir, 'config.json'), /missing config\.json: the folder looks like a Hugging Face model/);
      expect(message).toContain(`(it has ${shown})`);
    }
  });

  it('HF shards with config.json but without their index: names the index', async () => {
    const dir = tmpFolder(path.join(FORMATS, 'tiny-hf-sharded'), ['config.json', 'tokenizer.model', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']);
    await expectError(() => openModel(dir), path.join(dir, 'model.safetensors.index.json'), /missing: the folder has shards \(model-00001-of-00002\.safetensors\.\.\.\) but not the index/);
  });

  it('a path that does not exist', async () => {
    const p = path.join(TMP, 'no-such-model');
    await expectError(() => openModel(p), p, /no such file or folder/);
  });

  for (const [name, from, files] of [
    ['an official folder', TINY, ['params.json', 'consolidated.00.pth']],
    ['a safetensors folder', path.join(FORMATS, 'tiny-safetensors'), ['params.json', 'consolidated.safetensors']],
    ['an HF folder', path.join(FORMATS, 'tiny-hf'), ['config.json', 'model.safetensors']],
  ] as const) {
    it(`${name} without tokenizer.model`, async () => {
      const dir = tmpFolder(from, [...files]);
      await expectError(() => openModel(dir), path.join(dir, 'tokenizer.model'), /missing: the model folder needs its SentencePiece tokenizer.model/);
    });
  }

  it('a folder with tokenizer.model.v3 instead: the message says so', async () => {
    const dir = tmpFolder(TINY, ['params.json', 'consolidated.00.pth']);
    fs.copyFileSync(path.join(TINY, 'tokenizer.model'), path.join(dir, 'tokenizer.model.v3'));
    await expectError(() => openModel(dir), path.join(dir, 'tokenizer.model'), /\(found tokenizer.model.v3: copy it to tokenizer.model/);
  });

  it('params.json that is not JSON', async () => {
    const dir = tmpFolder(TINY, ['consolidated.00.pth', 'tokenizer.model']);
    fs.writeFileSync(path.join(dir, 'params.json'), '{"dim": ');
    await expectError(() => openModel(dir), path.join(dir, 'params.json'), /not valid JSON/);
  });
});
