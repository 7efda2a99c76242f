/**
 * Input as deep or as large as an attacker likes (issue 10, finding 7): nothing reads it with
 * unbounded recursion (a pickle with 500,000 APPENDS items or 200,000 levels of nesting, JSON
 * nested 100,000 deep, gives the usual one-line error naming the file, never "Maximum call stack
 * size exceeded"), and absurd sizes (shapes, element counts, records, header lengths) are refused
 * by what they claim, before anything that size is allocated.
 */
import * as fs from 'fs';
import * as path from 'path';
import { pack as tarPack } from 'tar-stream';
import { describe, expect, it } from 'vitest';
import { CheckpointError, showValue } from '../checkpoint/errors';
import { paramsFromHfConfig } from '../checkpoint/hf';
import { openModel } from '../checkpoint/index';
import { readNpy } from '../checkpoint/npy';
import { openPth } from '../checkpoint/pth';
import { readPthStream } from '../checkpoint/pth_stream';
import { openSafetensors } from '../checkpoint/safetensors';
import { openTar } from '../checkpoint/tar';
import { PickleGlobal, type PickleValue, unpickle } from '../checkpoint/pickle';
import { f32Bytes, manyAppends, nestedLists, nestedTuples, op, pInt, pStr, stateDictPickle, u32, u64, writeZip } from './torch_zip';
import { caught, tempFolder } from './temp_files';

const FIXTURES = path.join(__dirname, '..', 'fixtures');
const { path: tmpPath, file: tmpFile } = tempFolder('hostile-input-test-');

/** A CheckpointError, one line, starting with `file`, matching `problem`. */
async function expectError(fn: () => unknown, file: string, problem: RegExp): Promise<string> {
  const err = await caught(fn);
  expect(err.message).not.toMatch(/call stack/);
  expect(err).toBeInstanceOf(CheckpointError);
  expect(err.message).not.toContain('\n');
  expect(err.message.startsWith(`${file}: `) || err.message.startsWith(`${file} (`)).toBe(true);
  expect(err.message).toMatch(problem);
  return err.message;
}

const N = 500_000;
const DEPTH = 200_000;
const noGlobals = { file: 'test.pkl', globals: new Map<string, PickleGlobal>() };
const pickle = (...parts: (Buffer | string)[]): Buffer =>
  Buffer.concat([Buffer.from([0x80, 2]), ...parts.map((p) => (typeof p === 'string' ? op(p) : p)), op('.')]);

function depthOf(value: PickleValue): number {
  let depth = 0;
  for (let v = value; Array.isArray(v); v = v[0]) depth++;
  return depth;
}

/** A one-tensor state dict plus an entry "extra" whose value is `value` (pickle bytes). */
function stateDictWith(value: Buffer): Buffer {
  const base = stateDictPickle([{ name: 'w', storageType: 'FloatStorage', key: '0', storageNumel: 2, offset: 0, shape: [2], stride: [1] }]);
  // base ends with "u." (SETITEMS, STOP): add the extra entry inside the same SETITEMS.
  return Buffer.concat([base.subarray(0, base.length - 2), pStr('extra'), value, op('u.')]);
}

function pthWith(name: string, pkl: Buffer): string {
  const file = tmpPath(name);
  writeZip(file, [{ name: 'ckpt/data.pkl', data: pkl }, { name: 'ckpt/data/0', data: f32Bytes([1, 2]) }], false);
  return file;
}

async function* chunksOf(bytes: Buffer, size = 1 << 16): AsyncGenerator<Uint8Array> {
  for (let at = 0; at < bytes.length; at += size) yield bytes.subarray(at, at + size);
}

describe('the unpickler holds any depth and length without recursion', () => {
  it(`a list of ${N} items from one APPENDS`, () => {
    const list = unpickle(pickle(manyAppends(N)), noGlobals) as number[];
    expect(list.length).toBe(N);
    expect(list[0]).toBe(0);
    expect(list[N - 1]).toBe((N - 1) % 256);
  });

  it(`lists and tuples nested ${DEPTH} deep`, () => {
    expect(depthOf(unpickle(pickle(nestedLists(DEPTH)), noGlobals))).toBe(DEPTH);
    const tuples = unpickle(pickle(nestedTuples(DEPTH)), noGlobals);
    // The innermost is the empty tuple: DEPTH arrays, the last one empty.
    expect(depthOf(tuples)).toBe(DEPTH);
  });

  it('a 4,000,000-byte LONG4 is refused at once, not parsed in quadratic time', () => {
    const long = Buffer.concat([op('\x8b'), u32(4_000_000), Buffer.alloc(4_000_000)]);
    expect(() => unpickle(pickle(long), noGlobals)).toThrowError(/^test\.pkl: pickle byte 2: integer of 4000000 bytes is too large$/);
  });

  it.each([
    ['500,000 APPENDS items', manyAppends(N)],
    ['lists nested 200,000 deep', nestedLists(DEPTH)],
    ['tuples nested 200,000 deep', nestedTuples(DEPTH)],
  ])('a state dict holding %s: "not a tensor", from the file and from a stream', async (_label, value) => {
    const bytes = stateDictWith(value);
    const file = pthWith('deep.pth', bytes);
    await expectError(() => openPth(file), file, /state dict entry "extra" is not a tensor$/);
    const zip = fs.readFileSync(file);
    await expectError(() => readPthStream(chunksOf(zip), zip.length, 'deep.pth'), 'deep.pth', /state dict entry "extra" is not a tensor$/);
  });
});

describe('zip: absurd sizes are refused before allocating', () => {
  /** A torch-style zip of one tensor, with its end-of-central-directory record's fields. */
  function smallZip(): { bytes: Buffer; eocd: number } {
    const file = pthWith('small.pth', stateDictWith(pInt(1)));
    const bytes = fs.readFileSync(file);
    const eocd = bytes.length - 22;
    expect(bytes.readUInt32LE(eocd)).toBe(0x06054b50);
    return { bytes, eocd };
  }

  it('an entry count the central directory cannot hold', async () => {
    const { bytes, eocd } = smallZip();
    bytes.writeUInt16LE(0xfffe, eocd + 8);
    bytes.writeUInt16LE(0xfffe, eocd + 10);
    const file = tmpFile('count.pth', bytes);
    await expectError(() => openPth(file), file, /zip says it has 65534 records, more than its central directory of \d+ bytes can describe/);
  });

  it('a central directory over 64 MiB, and a data.pkl over 64 MiB (sparse files)', async () => {
    const big = 80 << 20;
    const file = tmpPath('big-cd.pth');
    writeZip(file, [{ name: 'ckpt/data.pkl', holeSize: big }, { name: 'ckpt/version', data: Buffer.from('3\n') }], false);
    try {
      await expectError(() => openPth(file), file, new RegExp(`record "ckpt/data\\.pkl" is ${big} bytes, more than the ${64 << 20} expected`));
      // The same file, its directory said to start at byte 0: 80 MiB of "directory".
      const fd = fs.openSync(file, 'r+');
      const size = fs.fstatSync(fd).size;
      const eocd = Buffer.alloc(22);
      fs.readSync(fd, eocd, 0, 22, size - 22);
      const cdEnd = eocd.readUInt32LE(16) + eocd.readUInt32LE(12);
      eocd.writeUInt32LE(cdEnd, 12);
      eocd.writeUInt32LE(0, 16);
      fs.writeSync(fd, eocd, 0, 22, size - 22);
      fs.closeSync(fd);
      await expectError(() => openPth(file), file, new RegExp(`central directory of ${cdEnd} bytes is larger than the ${64 << 20} accepted`));
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('tensors whose shape claims 2^60 or 2^40 elements, and a storage of 2^50 elements', async () => {
    const tensor = (shape: number[], storageNumel = 2) =>
      stateDictPickle([{ name: 'w', storageType: 'FloatStorage', key: '0', storageNumel, offset: 0, shape, stride: [shape[1], 1] }]);
    const huge = pthWith('huge-shape.pth', tensor([2 ** 30, 2 ** 30]));
    await expectError(() => openPth(huge), huge, /tensor "w" shape \[1073741824,1073741824\] is too large/);
    const large = pthWith('large-shape.pth', tensor([2 ** 20, 2 ** 20]));
    await expectError(() => openPth(large), large, /tensor "w" \(offset 0, 1099511627776 elements\) runs past the end of its storage of 2 elements/);
    const storage = pthWith(
      'huge-storage.pth',
      stateDictPickle([{ name: 'w', storageType: 'FloatStorage', key: '0', storageNumel: 2 ** 50, offset: 0, shape: [2], stride: [1] }]),
    );
    await expectError(() => openPth(storage), storage, /storage record ckpt\/data\/0 has 8 bytes, but its 1125899906842624 float32 elements need/);
  });
});

describe('JSON and safetensors headers: deep values in messages, absurd shapes', () => {
  const deep = (depth: number): string => `${'['.repeat(depth)}${']'.repeat(depth)}`;

  it('showValue writes a few levels of any value, however deep', () => {
    let v: unknown = [];
    for (let i = 0; i < 100_000; i++) v = [v];
    expect(showValue(v)).toBe('[[[[...]]]]');
    expect(showValue({ a: [1, 'x'], b: null, c: 1e400 })).toBe('{"a":[1,"x"],"b":null,"c":Infinity}');
    expect(showValue(Array.from({ length: 20 }, (_, i) => i))).toBe('[0,1,2,3,4,5,6,7,... 12 more]');
  });

  it('a config.json field nested 100,000 deep', () => {
    const config = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'formats', 'tiny-hf', 'config.json'), 'utf8')) as Record<string, unknown>;
    config.rope_scaling = JSON.parse(deep(100_000));
    expect(() => paramsFromHfConfig(config, 'config.json')).toThrowError(/^config\.json: rope_scaling \[\[\[\[\.\.\.\]\]\]\] is not supported/);
  });

  /** A safetensors file whose header is `header` (JSON text) and no data. */
  const safetensors = (header: string): string => {
    const text = Buffer.from(header, 'utf8');
    return tmpFile('h.safetensors', Buffer.concat([u64(text.length), text]));
  };

  it('a safetensors shape nested 100,000 deep, and shapes whose element count is absurd', async () => {
    let file = safetensors(`{"w":{"dtype":"F32","shape":${deep(100_000)},"data_offsets":[0,0]}}`);
    await expectError(() => openSafetensors(file), file, /tensor "w" has shape \[\[\[\[\.\.\.\]\]\]\]: dims must be non-negative integers/);
    file = safetensors('{"w":{"dtype":"F32","shape":[1073741824,1073741824,1073741824],"data_offsets":[0,0]}}');
    await expectError(() => openSafetensors(file), file, /tensor "w" has shape \[1073741824,1073741824,1073741824\], too large/);
    file = safetensors('{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}');
    await expectError(() => openSafetensors(file), file, /past the end of the data \(0 bytes after the header\)/);
  });

  it('an HF index whose shard is a value nested 100,000 deep', async () => {
    const dir = tmpPath('hf');
    fs.mkdirSync(dir);
    for (const f of ['config.json', 'tokenizer.model']) fs.copyFileSync(path.join(FIXTURES, 'formats', 'tiny-hf', f), path.join(dir, f));
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), `{"weight_map":{"lm_head.weight":${deep(100_000)}}}`);
    await expectError(() => openModel(dir), path.join(dir, 'model.safetensors.index.json'), /the shard \[\[\[\[\.\.\.\]\]\]\]; expected a file name/);
  });
});

describe('npy and tar: absurd header lengths and sizes', () => {
  it('an .npy header length of 4 GiB, and a shape of 10^20 x 10^20 elements in a small file', async () => {
    const magic = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]);
    let file = tmpFile('long.npy', Buffer.concat([magic, Buffer.from([2, 0]), u32(0xffffffff), Buffer.alloc(100)]));
    await expectError(() => readNpy(file), file, /\.npy header length 4294967295 is over the 1048576 bytes accepted/);
    const dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000000000000, 100000000000000000000), }\n";
    const header = Buffer.concat([magic, Buffer.from([1, 0, dict.length, 0]), Buffer.from(dict, 'latin1')]);
    file = tmpFile('huge.npy', Buffer.concat([header, Buffer.alloc(16)]));
    await expectError(() => readNpy(file), file, /data is 16 bytes but shape \(100000000000000000000,100000000000000000000\) of float32 needs 4e\+40/);
  });

  it('a tar member whose pax size is 10^23 bytes', async () => {
    const p = tarPack();
    p.entry({ name: 'm/params.json', mtime: new Date(0), pax: { size: '99999999999999999999999' } }, Buffer.from('{}'));
    p.finalize();
    const chunks: Buffer[] = [];
    for await (const chunk of p) chunks.push(chunk as Buffer);
    const file = tmpFile('pax.tar', Buffer.concat(chunks));
    await expectError(() => openTar(file), file, /member "m\/params\.json" has size 1e\+23, not a byte count \(corrupt pax header\?\)/);
  });
});
