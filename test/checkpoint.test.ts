/**
 * openPth against checkpoints written by torch.save (fixtures/pth, made by
 * fixtures/make_pth_cases.py, with torch's own float32 values in
 * expected.json), and against broken / hostile / zip64 / >4 GB archives made
 * here at runtime with a small independent zip writer.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { openPth } from '../checkpoint/pth';
import { crc32 } from '../checkpoint/crc32';
import { expectCheckpointError } from './checkpoint_errors';
import { f32Bytes, op, type PickledTensor, pGlobal, pStr, stateDictPickle, writeZip } from './torch_zip';

const FIXTURES = path.join(__dirname, '..', 'fixtures', 'pth');
const fixture = (name: string): string => path.join(FIXTURES, name);

interface ExpectedTensor {
  dtype: string;
  shape: number[];
  f32_bits: number[];
}
const EXPECTED = JSON.parse(fs.readFileSync(fixture('expected.json'), 'utf8')) as {
  files: Record<string, { prefix: string; tensors: Record<string, ExpectedTensor> }>;
};

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'checkpoint-test-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));
const tmpFile = (name: string, bytes: Uint8Array): string => {
  const p = path.join(TMP, name);
  fs.writeFileSync(p, bytes);
  return p;
};

/** A one-tensor float32 checkpoint {w: storage[offset : offset+numel] viewed as shape}. */
function oneTensorCheckpoint(name: string, t: Partial<PickledTensor> & { storage: number[] }, zip64 = false): string {
  const file = path.join(TMP, name);
  const pickle = stateDictPickle([
    {
      name: 'w',
      storageType: t.storageType ?? 'FloatStorage',
      key: '0',
      storageNumel: t.storageNumel ?? t.storage.length,
      offset: t.offset ?? 0,
      shape: t.shape ?? [t.storage.length],
      stride: t.stride ?? [1],
    },
  ]);
  writeZip(
    file,
    [
      { name: 'ckpt/data.pkl', data: pickle },
      { name: 'ckpt/data/0', data: f32Bytes(t.storage) },
      { name: 'ckpt/version', data: Buffer.from('3\n') },
    ],
    zip64,
  );
  return file;
}

// ---------------------------------------------------------------------------

describe('openPth on torch.save output', () => {
  for (const [fileName, expected] of Object.entries(EXPECTED.files)) {
    it(`${fileName}: names, dtypes, shapes and float32 values match torch exactly`, () => {
      const ckpt = openPth(fixture(fileName));
      try {
        expect(ckpt.prefix).toBe(expected.prefix);
        expect([...ckpt.tensors.keys()]).toEqual(Object.keys(expected.tensors));
        for (const [name, want] of Object.entries(expected.tensors)) {
          const info = ckpt.tensors.get(name);
          expect(info?.dtype, name).toBe(want.dtype);
          expect(info?.shape, name).toEqual(want.shape);
          expect(info?.numel, name).toBe(want.shape.reduce((a, b) => a * b, 1));
          const values = ckpt.read(name);
          expect(values).toBeInstanceOf(Float32Array);
          // Bit patterns, so -0, inf and nan payloads are compared too.
          expect(Array.from(new Uint32Array(values.buffer, values.byteOffset, values.length)), name).toEqual(want.f32_bits);
        }
      } finally {
        ckpt.close();
      }
    });
  }

  it('reads a view at its storage offset (shared storage)', () => {
    const ckpt = openPth(fixture('bf16_state_dict.pth'));
    const tail = ckpt.tensors.get('shared.tail');
    expect(tail?.storageOffset).toBe(6);
    expect(tail?.storageKey).toBe(ckpt.tensors.get('shared.base')?.storageKey);
    expect(Array.from(ckpt.read('shared.tail'))).toEqual(Array.from(ckpt.read('shared.base').subarray(6)));
    ckpt.close();
  });

  it('gives clear errors for an unknown tensor name and for reads after close()', () => {
    const file = fixture('f16_model.pth');
    const ckpt = openPth(file);
    expectCheckpointError(() => ckpt.read('nope.weight'), file, /no tensor named "nope\.weight"/);
    ckpt.close();
    expectCheckpointError(() => ckpt.read('norm.weight'), file, /after close/);
  });
});

describe('openPth on bad input', () => {
  const good = fs.readFileSync(fixture('bf16_state_dict.pth'));

  it('rejects truncated files', () => {
    for (const keep of [good.length - 1, good.length - 30, Math.floor(good.length / 2), 10, 0]) {
      const file = tmpFile(`truncated-${keep}.pth`, good.subarray(0, keep));
      expectCheckpointError(() => openPth(file), file, /end-of-central-directory|not a zip|truncated/);
    }
  });

  it('rejects a file that is not a zip, and a missing file', () => {
    const text = tmpFile('notes.pth', Buffer.from('these are not the weights you are looking for\n'.repeat(20)));
    expectCheckpointError(() => openPth(text), text, /not a zip archive/);
    const missing = path.join(TMP, 'does-not-exist.pth');
    expectCheckpointError(() => openPth(missing), missing, /cannot open/);
  });

  it('rejects a zip without <prefix>/data.pkl', () => {
    const file = path.join(TMP, 'nopickle.pth');
    writeZip(file, [{ name: 'archive/data/0', data: f32Bytes([1, 2]) }, { name: 'archive/version', data: Buffer.from('3\n') }], false);
    expectCheckpointError(() => openPth(file), file, /no archive\/data\.pkl record/);
    const flat = path.join(TMP, 'flat.zip');
    writeZip(flat, [{ name: 'readme.txt', data: Buffer.from('hi') }], false);
    expectCheckpointError(() => openPth(flat), flat, /data\.pkl/);
  });

  it('rejects a pickle that calls a forbidden global (os.system), without running anything', () => {
    const file = path.join(TMP, 'evil.pth');
    const pickle = Buffer.concat([Buffer.from([0x80, 2]), pGlobal('os', 'system'), pStr('echo pwned'), Buffer.from([0x85]), op('R.')]);
    writeZip(file, [{ name: 'archive/data.pkl', data: pickle }], false);
    expectCheckpointError(() => openPth(file), file, /global os\.system is not allowed/);
    // The same as the tensor rebuild function.
    const sneaky = path.join(TMP, 'sneaky.pth');
    const pickle2 = stateDictPickle(
      [{ name: 'w', storageType: 'FloatStorage', key: '0', storageNumel: 1, offset: 0, shape: [1], stride: [1] }],
      pGlobal('builtins', 'eval'),
    );
    writeZip(sneaky, [{ name: 'archive/data.pkl', data: pickle2 }, { name: 'archive/data/0', data: f32Bytes([1]) }], false);
    expectCheckpointError(() => openPth(sneaky), sneaky, /global builtins\.eval is not allowed/);
  });

  it('rejects storage dtypes that are not weight dtypes (int64, float64), naming the tensor and dtype', () => {
    expectCheckpointError(() => openPth(fixture('int64.pth')), fixture('int64.pth'), /tensor "positions" has unsupported dtype int64/);
    expectCheckpointError(() => openPth(fixture('float64.pth')), fixture('float64.pth'), /tensor "freqs" has unsupported dtype float64/);
  });

  it('rejects a non-contiguous tensor', () => {
    const file = fixture('noncontiguous.pth');
    expectCheckpointError(() => openPth(file), file, /tensor "transposed" is not contiguous \(shape \[2,3\], stride \[1,2\]\)/);
  });

  it('rejects a tensor running past the end of its storage, and a storage record that is too short', () => {
    const past = oneTensorCheckpoint('past-storage.pth', { storage: [1, 2, 3, 4], offset: 2, shape: [3] });
    expectCheckpointError(() => openPth(past), past, /runs past the end of its storage of 4 elements/);
    const short = oneTensorCheckpoint('short-record.pth', { storage: [1, 2, 3], storageNumel: 4, shape: [4] });
    expectCheckpointError(() => openPth(short), short, /has 12 bytes, but its 4 float32 elements need 16/);
  });

  it('rejects a central directory entry whose record offset is past the end of the file', () => {
    const bytes = Buffer.from(good);
    // Find the central directory header of archive/data/0 and point it beyond EOF.
    const name = Buffer.from('archive/data/0');
    let at = -1;
    for (let i = bytes.indexOf(name); i >= 0; i = bytes.indexOf(name, i + 1)) {
      if (i >= 46 && bytes.readUInt32LE(i - 46) === 0x02014b50 && bytes.readUInt16LE(i - 46 + 28) === name.length) at = i - 46;
    }
    expect(at).toBeGreaterThan(0);
    bytes.writeUInt32LE(bytes.length + 1000, at + 42);
    const file = tmpFile('offset-past-eof.pth', bytes);
    expectCheckpointError(() => openPth(file), file, /record "archive\/data\/0" .* lies outside/);
  });

  it('rejects compressed records', () => {
    const bytes = Buffer.from(good);
    const cdSig = Buffer.from([0x50, 0x4b, 0x01, 0x02]);
    const at = bytes.indexOf(cdSig);
    bytes.writeUInt16LE(8, at + 10); // method 8 = deflate
    const file = tmpFile('deflated.pth', bytes);
    expectCheckpointError(() => openPth(file), file, /compression method 8/);
  });

  it('rejects a corrupted pickle (CRC mismatch)', () => {
    const bytes = Buffer.from(good);
    const at = bytes.indexOf(Buffer.from('tok_embeddings.weight'));
    bytes[at] = 'T'.charCodeAt(0);
    const file = tmpFile('corrupt-pickle.pth', bytes);
    expectCheckpointError(() => openPth(file), file, /CRC-32/);
  });
});

describe('zip64', () => {
  it('computes the standard CRC-32 check value', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
  });

  it('reads a hand-made zip64 archive with small offsets', () => {
    const file = oneTensorCheckpoint('zip64-small.pth', { storage: [1.5, -2, 0.25, 1e-40, 7, 8], offset: 2, shape: [2, 2], stride: [2, 1] }, true);
    const ckpt = openPth(file);
    expect(ckpt.prefix).toBe('ckpt');
    expect(ckpt.tensors.get('w')?.shape).toEqual([2, 2]);
    expect(Array.from(ckpt.read('w'))).toEqual([0.25, Math.fround(1e-40), 7, 8]);
    ckpt.close();
  });

  // A real 7B checkpoint is 14.5 GB: records lie past 4 GiB. Put a 4.5 GiB sparse hole before the
  // weights, so offsets only fit in zip64 fields (and the file could not be held in one Buffer).
  it.skipIf(process.platform === 'win32')('reads a tensor stored past 4 GiB, in a sparse file', () => {
    const file = path.join(TMP, 'past-4gib.pth');
    const hole = 4.5 * 2 ** 30;
    const values = [3.5, -1, 0.125, 2 ** -130, -0, 42];
    const pickle = stateDictPickle([{ name: 'layers.0.w', storageType: 'FloatStorage', key: '7', storageNumel: 6, offset: 1, shape: [5], stride: [1] }]);
    writeZip(
      file,
      [
        { name: 'big/data.pkl', data: pickle },
        { name: 'big/padding', holeSize: hole },
        { name: 'big/data/7', data: f32Bytes(values) },
        { name: 'big/version', data: Buffer.from('3\n') },
      ],
      true,
    );
    try {
      expect(fs.statSync(file).size).toBeGreaterThan(hole);
      const ckpt = openPth(file);
      const out = ckpt.read('layers.0.w');
      expect(Array.from(out)).toEqual([-1, 0.125, Math.fround(2 ** -130), -0, 42]);
      expect(Object.is(out[3], -0)).toBe(true);
      ckpt.close();
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('rejects a zip64 end record that points outside the file', () => {
    const file = oneTensorCheckpoint('zip64-bad.pth', { storage: [1] }, true);
    const bytes = fs.readFileSync(file);
    const locator = bytes.length - 22 - 20;
    expect(bytes.readUInt32LE(locator)).toBe(0x07064b50);
    bytes.writeBigUInt64LE(BigInt(bytes.length) * 2n, locator + 8);
    const bad = tmpFile('zip64-bad-locator.pth', bytes);
    expectCheckpointError(() => openPth(bad), bad, /zip64 end-of-central-directory offset/);
  });
});
