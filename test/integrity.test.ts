/**
 * Corrupted weights do not load silently (issue 10, finding 8): the CRC-32 of every zip record is
 * checked as it is read, in the seekable .pth (and HF pytorch_model.bin) and in the .pth streamed
 * out of a .tar, and a corrupt record is a one-line error naming the record and its tensor; NaN and
 * Inf among weights (which a file without checksums, or a checkpoint saved that way, can hold) are
 * found as tensors are read and reported in one warning line on stderr naming the tensor.
 */
import * as fs from 'fs';
import * as path from 'path';
import { describe, expect, it, vi } from 'vitest';
import { openModel, reportNonFiniteWeights, type NonFiniteWeights } from '../checkpoint/index';
import { crc32, crc32Combine, crc32Js } from '../checkpoint/crc32';
import { CheckpointError } from '../checkpoint/errors';
import { findNonFinite } from '../checkpoint/finite';
import { openPth } from '../checkpoint/pth';
import { readPthStream } from '../checkpoint/pth_stream';
import { openTar } from '../checkpoint/tar';
import { ZipReader } from '../checkpoint/zip';
import { loadForCommand, nonFiniteWarning } from '../cli/load';
import { loadModel } from '../one_file_ref';
import { f32Bytes, stateDictPickle, writeZip } from './torch_zip';
import { caught, tempFolder } from './temp_files';

const FIXTURES = path.join(__dirname, '..', 'fixtures');
const { path: tmpPath, file: tmpFile } = tempFolder('integrity-test-');

/** Where record `name`'s data starts in a zip (a .pth), from its central directory entry. */
function recordData(zip: Buffer, name: string): { start: number; size: number } {
  const wanted = Buffer.from(name);
  for (let at = zip.lastIndexOf(Buffer.from([0x50, 0x4b, 0x05, 0x06])), cd = zip.readUInt32LE(at + 16); zip.readUInt32LE(cd) === 0x02014b50; ) {
    const nameLength = zip.readUInt16LE(cd + 28);
    if (zip.subarray(cd + 46, cd + 46 + nameLength).equals(wanted)) {
      const local = zip.readUInt32LE(cd + 42);
      return { start: local + 30 + zip.readUInt16LE(local + 26) + zip.readUInt16LE(local + 28), size: zip.readUInt32LE(cd + 24) };
    }
    cd += 46 + nameLength + zip.readUInt16LE(cd + 30) + zip.readUInt16LE(cd + 32);
    at = cd;
  }
  throw new Error(`no record ${name}`);
}

describe('CRC-32', () => {
  it('the standard check value, in one piece and continued piece by piece, zlib and the JavaScript fallback alike', () => {
    const data = Buffer.from('123456789');
    for (const f of [crc32, crc32Js]) {
      expect(f(data)).toBe(0xcbf43926);
      expect(f(data.subarray(4), f(data.subarray(0, 4)))).toBe(0xcbf43926);
      expect(f(new Uint8Array(0))).toBe(0);
    }
    // The JavaScript fallback against zlib on every length 0..64 and a 1 MB buffer, at odd offsets.
    const random = new Uint8Array(1 << 20).map((_, i) => (i * 2654435761) >>> 24);
    for (let n = 0; n <= 64; n++) expect(crc32Js(random.subarray(3, 3 + n))).toBe(crc32(random.subarray(3, 3 + n)));
    expect(crc32Js(random.subarray(1))).toBe(crc32(random.subarray(1)));
  });
});

describe('CRC-32 of pieces', () => {
  it('crc32Combine(crc(A), crc(B), |B|) is crc(A then B), for cuts anywhere, empty pieces included', () => {
    const data = new Uint8Array(300_000).map((_, i) => (i * 2654435761) >>> 24);
    for (const cut of [0, 1, 2, 3, 8, 255, 4096, 65_537, 150_000, 299_999, 300_000]) {
      expect(crc32Combine(crc32(data.subarray(0, cut)), crc32(data.subarray(cut)), data.length - cut), `cut ${cut}`).toBe(crc32(data));
    }
    // Three pieces, combined left to right.
    const [a, b, c] = [data.subarray(0, 1000), data.subarray(1000, 201_000), data.subarray(201_000)];
    expect(crc32Combine(crc32Combine(crc32(a), crc32(b), b.length), crc32(c), c.length)).toBe(crc32(data));
  });

  it('verifyPiece: pieces in any order, a part of the record no piece covers, overlaps; a flipped byte in a piece or in the rest', () => {
    const file = path.join(FIXTURES, 'pth', 'bf16_state_dict.pth');
    const good = fs.readFileSync(file);
    const probe = ZipReader.open(file);
    const entry = [...probe.entries.values()].reduce((a, b) => (b.size > a.size ? b : a));
    probe.close();
    const size = entry.size;
    /** Reads pieces [start, end) of the record from `bytes` (a copy of the file) through verifyPiece. */
    const readPieces = (bytes: Buffer, pieces: [number, number][], expected: number): void => {
      const zip = ZipReader.open(tmpFile(`pieces-${pieces.length}-${expected}.pth`, bytes));
      try {
        for (const [start, end] of pieces) {
          const target = new Uint8Array(end - start);
          zip.readInto(entry, start, target);
          zip.verifyPiece(entry, start, target, expected, 'tensor "t"');
        }
      } finally {
        zip.close();
      }
    };
    const third = Math.floor(size / 3);
    const orders: [number, number][][] = [
      [[0, third], [third, 2 * third], [2 * third, size]],
      [[2 * third, size], [0, third], [third, 2 * third]], // out of order
      [[third, 2 * third], [8, third]], // bytes 0..7 and the end never read: taken from the file
      [[0, third + 9], [third, size]], // overlapping: the whole record read instead
    ];
    for (const pieces of orders) {
      const expected = pieces.reduce((n, [a, b]) => n + b - a, 0);
      expect(() => readPieces(good, pieces, expected)).not.toThrow();
      const { start } = recordData(good, entry.name);
      for (const at of [third + 5, 3, size - 1]) { // inside a piece, before the pieces, after them
        const bytes = Buffer.from(good);
        bytes[start + at] ^= 0x20;
        expect(() => readPieces(bytes, pieces, expected), `${JSON.stringify(pieces)}, byte ${at}`).toThrow(
          new RegExp(`record "${entry.name}" \\(tensor "t"\\) fails its CRC-32 check`),
        );
      }
    }
  });
});

describe('the seekable .pth checks each record it reads', () => {
  const file = path.join(FIXTURES, 'pth', 'bf16_state_dict.pth');
  const good = fs.readFileSync(file);

  it('a bit flipped in a tensor: opening works, reading that tensor fails naming record and tensor; the others read', async () => {
    const ckpt = openPth(file);
    const name = 'tok_embeddings.weight';
    const key = ckpt.tensors.get(name)?.storageKey as string;
    ckpt.close();
    const record = `${ckpt.prefix}/data/${key}`;
    const bytes = Buffer.from(good);
    const { start, size } = recordData(bytes, record);
    bytes[start + Math.floor(size / 2)] ^= 0x04;
    const bad = tmpFile('flipped.pth', bytes);
    const flipped = openPth(bad);
    try {
      for (const other of flipped.tensors.keys()) {
        if (flipped.tensors.get(other)?.storageKey !== key) expect(flipped.read(other).length).toBe(flipped.tensors.get(other)?.numel);
      }
      const err = await caught(() => flipped.read(name));
      expect(err).toBeInstanceOf(CheckpointError);
      expect(err.message).toMatch(
        new RegExp(`^${bad.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: record "${record}" \\(tensor "${name}"\\) fails its CRC-32 check: the central directory says 0x[0-9a-f]{8}, the bytes give 0x[0-9a-f]{8} \\(corrupt file\\)$`),
      );
    } finally {
      flipped.close();
    }
  });

  it('a view of part of a storage: a flip in the part it does not cover is caught too', () => {
    // shared.tail is elements 6.. of the storage shared.base covers whole.
    const ckpt = openPth(file);
    const tail = ckpt.tensors.get('shared.tail');
    ckpt.close();
    const record = `${ckpt.prefix}/data/${tail?.storageKey}`;
    const bytes = Buffer.from(good);
    bytes[recordData(bytes, record).start] ^= 0x80; // element 0: outside the tail
    const flipped = openPth(tmpFile('flipped-head.pth', bytes));
    try {
      expect(() => flipped.read('shared.tail')).toThrowError(new RegExp(`record "${record}" \\(tensor "shared\\.tail"\\) fails its CRC-32 check`));
    } finally {
      flipped.close();
    }
  });

  it('read straight into the compute pool (--pool on, --quantize q8_0, 1 to 3 threads): a flipped byte in a layer weight fails the load', async () => {
    const dir = tmpPath('pool-flip');
    fs.cpSync(path.join(FIXTURES, 'tiny'), dir, { recursive: true });
    const pth = path.join(dir, 'consolidated.00.pth');
    const name = 'layers.1.feed_forward.w2.weight';
    const ckpt = openPth(pth);
    const record = `${ckpt.prefix}/data/${ckpt.tensors.get(name)?.storageKey}`;
    ckpt.close();
    const bytes = fs.readFileSync(pth);
    const { start, size } = recordData(bytes, record);
    bytes[start + size - 3] ^= 0x01; // in the last thread's rows, the last piece
    fs.writeFileSync(pth, bytes);
    for (const opts of [{ pool: 'on' as const, threads: 1 }, { pool: 'on' as const, threads: 3 }, { quantize: 'q8_0' as const, threads: 2 }]) {
      const err = await caught(() => loadModel(dir, { ...opts, onDecision: () => undefined }));
      expect(err.message, JSON.stringify(opts)).toMatch(
        new RegExp(`^\\S+consolidated\\.00\\.pth: record "${record}" \\(tensor "${name.replace(/\./g, '\\.')}"\\) fails its CRC-32 check: the central directory says 0x[0-9a-f]{8}, the bytes give 0x[0-9a-f]{8} \\(corrupt file\\)$`),
      );
    }
  });

  it('through openModel: an HF pytorch_model.bin with a flipped bit', async () => {
    const dir = tmpPath('hf-bin');
    fs.cpSync(path.join(FIXTURES, 'formats', 'tiny-hf-bin'), dir, { recursive: true });
    const bin = path.join(dir, 'pytorch_model.bin');
    const bytes = fs.readFileSync(bin);
    const { start } = recordData(bytes, 'pytorch_model/data/0');
    bytes[start + 1] ^= 0x01;
    fs.writeFileSync(bin, bytes);
    const model = await openModel(dir);
    try {
      const err = await caught(() => {
        for (const name of model.weights.tensors.keys()) model.weights.read(name);
      });
      expect(err.message).toMatch(/^\S+pytorch_model\.bin: record "pytorch_model\/data\/0" \(tensor "[^"]+"\) fails its CRC-32 check/);
    } finally {
      model.close();
    }
  });
});

describe('the .pth streamed from a .tar checks every record as it goes by', () => {
  const tar = fs.readFileSync(path.join(FIXTURES, 'tiny.tar'));
  /** Where tiny.tar's consolidated.00.pth starts, by its ustar header. */
  const pthStart = (): number => {
    for (let at = 0; at + 512 <= tar.length; ) {
      const name = tar.toString('latin1', at, at + 100).replace(/\0.*$/s, '');
      const size = parseInt(tar.toString('latin1', at + 124, at + 136), 8);
      if (name.endsWith('consolidated.00.pth')) return at + 512;
      at += 512 + Math.ceil(size / 512) * 512;
    }
    throw new Error('no consolidated.00.pth in tiny.tar');
  };

  it('a bit flipped in a tensor (a record with a data descriptor, as torch writes it): the error names record and tensor', async () => {
    const base = pthStart();
    const pth = tar.subarray(base);
    const { start } = recordData(Buffer.from(pth.subarray(0, pth.length)), 'consolidated.00/data/3');
    const bytes = Buffer.from(tar);
    bytes[base + start + 7] ^= 0x10;
    const file = tmpFile('flipped.tar', bytes);
    const err = await caught(() => openTar(file));
    expect(err).toBeInstanceOf(CheckpointError);
    expect(err.message).toMatch(
      /^\S+flipped\.tar:tiny\/consolidated\.00\.pth: record "consolidated\.00\/data\/3" \(tensor "[^"]+"\) fails its CRC-32 check: the zip says 0x[0-9a-f]{8}, the bytes give 0x[0-9a-f]{8} \(corrupt file\)$/,
    );
  });

  it('records with sizes up front: a storage, and a record no tensor uses, each checked', async () => {
    const pickle = stateDictPickle([{ name: 'w', storageType: 'FloatStorage', key: '0', storageNumel: 2, offset: 0, shape: [2], stride: [1] }]);
    const file = tmpPath('upfront.pth');
    writeZip(file, [{ name: 'a/data.pkl', data: pickle }, { name: 'a/data/0', data: f32Bytes([1.5, -2]) }, { name: 'a/version', data: Buffer.from('3\n') }], false);
    const good = fs.readFileSync(file);
    const stream = async function* (bytes: Buffer): AsyncGenerator<Uint8Array> {
      yield bytes;
    };
    const ok = await readPthStream(stream(good), good.length, 'up.pth');
    expect(Array.from(ok.read('w'))).toEqual([1.5, -2]);
    for (const [record, what] of [['a/data/0', ' \\(tensor "w"\\)'], ['a/version', '']]) {
      const bytes = Buffer.from(good);
      bytes[recordData(bytes, record).start] ^= 0x01;
      const err = await caught(() => readPthStream(stream(bytes), bytes.length, 'up.pth'));
      expect(err.message).toMatch(new RegExp(`^up\\.pth: record "${record}"${what} fails its CRC-32 check`));
    }
  });
});

describe('NaN and Inf among the weights', () => {
  const BF16_NAN = 0x7fc0;
  const BF16_INF = 0x7f80;
  const BF16_NEG_INF = 0xff80;
  const BF16_MAX = 0x7f7f; // largest finite

  it('findNonFinite counts them by their exponent bits, at any alignment and length', () => {
    for (const n of [0, 1, 2, 3, 7, 8, 9, 33]) {
      for (const offset of [0, 1]) {
        const all = new Uint16Array(n + 1).fill(0x3f80); // 1.0
        const data = all.subarray(offset, offset + n);
        expect(findNonFinite('bfloat16', data)).toBeNull();
        if (n === 0) continue;
        data[n - 1] = BF16_NAN;
        expect(findNonFinite('bfloat16', data)).toEqual({ nan: 1, inf: 0, first: n - 1 });
        data[0] = BF16_NEG_INF;
        expect(findNonFinite('bfloat16', data)).toEqual(n === 1 ? { nan: 0, inf: 1, first: 0 } : { nan: 1, inf: 1, first: 0 });
      }
    }
    // Finite extremes are not flagged: the largest, subnormals, -0.
    expect(findNonFinite('bfloat16', Uint16Array.from([BF16_MAX, 0xff7f, 0x0001, 0x8000, 0x0080]))).toBeNull();
    expect(findNonFinite('float16', Uint16Array.from([0x7bff, 0xfbff, 0x0001, 0x8000]))).toBeNull();
    expect(findNonFinite('float16', Uint16Array.from([0x3c00, 0x7c00, 0x7e00, 0xfc01]))).toEqual({ nan: 2, inf: 1, first: 1 });
    const f32 = Float32Array.from([1, -3.4028234663852886e38, 1e-45, -0]);
    expect(findNonFinite('float32', f32)).toBeNull();
    f32[2] = Number.NaN;
    f32[3] = Number.NEGATIVE_INFINITY;
    expect(findNonFinite('float32', f32)).toEqual({ nan: 1, inf: 1, first: 2 });
    expect(findNonFinite('bfloat16', Uint16Array.from([BF16_INF]))).toEqual({ nan: 0, inf: 1, first: 0 });
  });

  /** fixtures/formats/tiny-safetensors with a NaN and an Inf in one tensor and an Inf in another. */
  function corruptedModel(): { dir: string; first: string; second: string } {
    const dir = tmpPath('nan');
    fs.cpSync(path.join(FIXTURES, 'formats', 'tiny-safetensors'), dir, { recursive: true });
    const file = path.join(dir, 'consolidated.safetensors');
    const bytes = fs.readFileSync(file);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.toString('utf8', 8, 8 + headerLength)) as Record<string, { dtype: string; data_offsets: [number, number] }>;
    const poke = (tensor: string, index: number, bits: number): void => {
      expect(header[tensor].dtype).toBe('BF16');
      bytes.writeUInt16LE(bits, 8 + headerLength + header[tensor].data_offsets[0] + 2 * index);
    };
    const first = 'layers.0.attention.wq.weight';
    const second = 'norm.weight';
    poke(first, 5, BF16_NAN);
    poke(first, 9, BF16_INF);
    poke(second, 0, BF16_NEG_INF);
    fs.writeFileSync(file, bytes);
    return { dir, first, second };
  }

  it('openModel collects them as tensors are read, and tells onNonFinite', async () => {
    const { dir, first, second } = corruptedModel();
    const told: NonFiniteWeights[] = [];
    const model = await openModel(dir, { onNonFinite: (f) => told.push(f) });
    try {
      for (const name of model.weights.tensors.keys()) model.weights.read(name);
      model.weights.readRaw(first); // each tensor reported once
      const file = path.join(dir, 'consolidated.safetensors');
      const numel = model.weights.tensors.get(first)?.numel as number;
      expect(model.nonFinite.map((f) => [f.tensor, f.nan, f.inf, f.first])).toEqual([
        [first, 1, 1, 5],
        [second, 0, 1, 0],
      ]);
      expect(model.nonFinite[0]).toMatchObject({ file, numel });
      expect(told).toEqual(model.nonFinite);
    } finally {
      model.close();
    }
  });

  it('reportNonFiniteWeights hears them through loadModel; the command prints one warning line naming the tensor', async () => {
    const { dir, first } = corruptedModel();
    const heard: NonFiniteWeights[] = [];
    const loaded = await reportNonFiniteWeights((f) => heard.push(f), () => loadModel(dir));
    loaded.transformer.dispose();
    expect(heard.map((f) => f.tensor)).toEqual([first, 'norm.weight']);

    const written: string[] = [];
    const spy = vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => {
      written.push(String(chunk));
      return true;
    });
    try {
      const again = await loadForCommand(dir, { quiet: true }, 1);
      again.transformer.dispose();
    } finally {
      spy.mockRestore();
    }
    const file = path.join(dir, 'consolidated.safetensors');
    const numel = heard[0].numel;
    expect(written).toEqual([
      `warning: ${file}: tensor "${first}" holds 1 NaN and 1 Inf among its ${numel} values; 1 more tensor too (corrupt weights: the output will be meaningless)\n`,
    ]);
    expect(nonFiniteWarning([])).toBeNull();
  });

  it('read in pieces straight into the compute pool (shards, --quantize pieces): the same counts as read whole, for any thread count', async () => {
    const { dir, first } = corruptedModel();
    const file = path.join(dir, 'consolidated.safetensors');
    const bytes = fs.readFileSync(file);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.toString('utf8', 8, 8 + headerLength)) as Record<string, { data_offsets: [number, number] }>;
    const [start, end] = header[first].data_offsets;
    bytes.writeUInt16LE(BF16_NAN, 8 + headerLength + end - 2); // the last value: in the last shard and piece
    fs.writeFileSync(file, bytes);
    const numel = (end - start) / 2;
    const counts = async (opts: Parameters<typeof loadModel>[1]): Promise<number[][]> => {
      const heard: NonFiniteWeights[] = [];
      const loaded = await reportNonFiniteWeights((f) => heard.push(f), () => loadModel(dir, { ...opts, onDecision: () => undefined }));
      loaded.transformer.dispose();
      return heard.filter((f) => f.tensor === first).map((f) => [f.nan, f.inf, f.first, f.numel]);
    };
    const whole = await counts({ pool: 'off' });
    expect(whole).toEqual([[2, 1, 5, numel]]);
    for (const threads of [1, 2, 3]) {
      expect(await counts({ pool: 'on', threads }), `pool, ${threads} threads`).toEqual(whole);
      expect(await counts({ quantize: 'q8_0', threads }), `--quantize q8_0, ${threads} threads`).toEqual(whole);
    }
  });

  it('a clean model: no findings and no warning', async () => {
    const heard: NonFiniteWeights[] = [];
    const loaded = await reportNonFiniteWeights((f) => heard.push(f), () => loadModel(path.join(FIXTURES, 'tiny')));
    loaded.transformer.dispose();
    expect(heard).toEqual([]);
  });
});
