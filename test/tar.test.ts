/**
 * openTar (checkpoint/tar.ts) against tars made here at test time with tar-stream's pack: members
 * in several orders, at the root or under a top folder, with extra members; every tensor must
 * equal openPth's reading of the same .pth bit for bit (and torch's own values in
 * fixtures/pth/expected.json), params and tokenizer bytes must equal the files. Then broken tars
 * and broken .pth members, each of which must fail fast with a one-line CheckpointError naming
 * the tar, and leave no file open.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { pack as tarPack } from 'tar-stream';
import { afterAll, describe, expect, it } from 'vitest';
import { CheckpointError, openPth } from '../checkpoint/pth';
import { openTar } from '../checkpoint/tar';
import type { WeightReader } from '../checkpoint/types';
import { crc32 } from '../checkpoint/crc32';
import { ZipReader } from '../checkpoint/zip';

const ROOT = path.join(__dirname, '..');
const TINY = path.join(ROOT, 'fixtures', 'tiny');
const PTH = path.join(ROOT, 'fixtures', 'pth');
const TINY_TAR = path.join(ROOT, 'fixtures', 'tiny.tar');

const tinyPth = fs.readFileSync(path.join(TINY, 'consolidated.00.pth'));
const tinyParams = fs.readFileSync(path.join(TINY, 'params.json'));
const tinyTokenizer = fs.readFileSync(path.join(TINY, 'tokenizer.model'));

interface ExpectedTensor {
  dtype: string;
  shape: number[];
  f32_bits: number[];
}
const EXPECTED = JSON.parse(fs.readFileSync(path.join(PTH, 'expected.json'), 'utf8')) as {
  files: Record<string, { tensors: Record<string, ExpectedTensor> }>;
};

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'tar-test-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));
let tmpCount = 0;
const tmpFile = (bytes: Uint8Array, name = `t${tmpCount++}.tar`): string => {
  const p = path.join(TMP, name);
  fs.writeFileSync(p, bytes);
  return p;
};

// ---------------------------------------------------------------------------
// Making tars.

interface Member {
  name: string;
  data?: Uint8Array;
  type?: 'file' | 'directory' | 'symlink';
  linkname?: string;
}

/** A tar of `members`, in order, written by tar-stream's pack. */
async function makeTar(members: Member[]): Promise<Buffer> {
  const pack = tarPack();
  for (const m of members) {
    const type = m.type ?? 'file';
    if (type === 'file') pack.entry({ name: m.name, mode: 0o644, mtime: new Date(0) }, Buffer.from(m.data ?? []));
    else pack.entry({ name: m.name, type, linkname: m.linkname, mode: 0o755, mtime: new Date(0) });
  }
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const chunk of pack) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

const tinyMembers = (folder: string, pth: Uint8Array = tinyPth): Record<'params' | 'pth' | 'tok', Member> => ({
  params: { name: `${folder}params.json`, data: tinyParams },
  pth: { name: `${folder}consolidated.00.pth`, data: pth },
  tok: { name: `${folder}tokenizer.model`, data: tinyTokenizer },
});

/** Where each member of a plain ustar tar (no pax / long names) starts. */
function tarLayout(tar: Buffer): { name: string; header: number; data: number; size: number }[] {
  const out: { name: string; header: number; data: number; size: number }[] = [];
  for (let at = 0; at + 512 <= tar.length; ) {
    const block = tar.subarray(at, at + 512);
    if (block.every((b) => b === 0)) break;
    const field = (from: number, len: number): string => block.toString('latin1', from, from + len).replace(/\0.*$/s, '');
    const prefix = field(345, 155);
    const name = (prefix ? `${prefix}/` : '') + field(0, 100);
    const size = parseInt(field(124, 12).trim(), 8);
    out.push({ name, header: at, data: at + 512, size });
    at += 512 + Math.ceil(size / 512) * 512;
  }
  return out;
}

/** Rewrites a tar header's checksum after an edit. */
function fixChecksum(tar: Buffer, header: number): void {
  tar.fill(0x20, header + 148, header + 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += tar[header + i];
  tar.write(sum.toString(8).padStart(6, '0') + '\0 ', header + 148, 'latin1');
}

// ---------------------------------------------------------------------------
// A small zip writer laid out like torch.save's (miniz) records, independent of checkpoint/.
//
// torch 1.13 writes each record with flag bit 3 (sizes 0 in the local header, a data descriptor
// after the data) and an "FB" extra field padding the data to 64 bytes. Checked on a 4.3 GB
// torch.save: once a record starts past 4 GiB its local header also gets a zip64 extra field
// holding the header's offset (8 bytes), a record of 4 GiB or more gets one holding its size and
// a compressed size of 0 (16 bytes), and the descriptor then has 64-bit sizes (24 bytes).

const u16 = (n: number): Buffer => {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(n);
  return b;
};
const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0);
  return b;
};
const u64 = (n: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
};

type Zip64Local = 'none' | 'offset' | 'size';

/** A zip of `records`, torch style; `zip64` picks the zip64 extra field each record's local header gets. */
function torchStyleZip(records: { name: string; data: Buffer }[], zip64: (index: number) => Zip64Local): Buffer {
  const parts: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  records.forEach(({ name, data }, index) => {
    const nameBytes = Buffer.from(name, 'utf8');
    const crc = crc32(data);
    const kind = zip64(index);
    const zipExtra =
      kind === 'offset'
        ? Buffer.concat([u16(1), u16(8), u64(offset)])
        : kind === 'size'
          ? Buffer.concat([u16(1), u16(16), u64(data.length), u64(0)])
          : Buffer.alloc(0);
    const unpadded = offset + 30 + nameBytes.length + zipExtra.length + 4;
    const pad = (64 - (unpadded % 64)) % 64;
    const extra = Buffer.concat([zipExtra, Buffer.from('FB'), u16(pad), Buffer.alloc(pad, 'Z')]);
    const header = Buffer.concat([
      u32(0x04034b50), u16(45), u16(0x808), u16(0), u16(0), u16(0),
      u32(0), u32(0), u32(0), u16(nameBytes.length), u16(extra.length),
    ]);
    const descriptor =
      kind === 'none'
        ? Buffer.concat([u32(0x08074b50), u32(crc), u32(data.length), u32(data.length)])
        : Buffer.concat([u32(0x08074b50), u32(crc), u64(data.length), u64(data.length)]);
    central.push(
      Buffer.concat([
        u32(0x02014b50), u16(45), u16(45), u16(0x808), u16(0), u16(0), u16(0),
        u32(crc), u32(data.length), u32(data.length), u16(nameBytes.length), u16(0), u16(0),
        u16(0), u16(0), u32(0), u32(offset), nameBytes,
      ]),
    );
    const record = Buffer.concat([header, nameBytes, extra, data, descriptor]);
    parts.push(record);
    offset += record.length;
  });
  const cd = Buffer.concat(central);
  const eocd = Buffer.concat([u32(0x06054b50), u16(0), u16(0), u16(records.length), u16(records.length), u32(cd.length), u32(offset), u16(0)]);
  return Buffer.concat([...parts, cd, eocd]);
}

/** The records of a .pth, in order, read with checkpoint/zip.ts. */
function zipRecords(file: string): { name: string; data: Buffer }[] {
  const zip = ZipReader.open(file);
  try {
    return [...zip.entries.values()].map((e) => ({ name: e.name, data: zip.readAll(e, e.size) }));
  } finally {
    zip.close();
  }
}

/** Offsets of each local header in a torch-written .pth (from its central directory). */
function localHeaders(file: string): Map<string, number> {
  const zip = ZipReader.open(file);
  try {
    return new Map([...zip.entries.values()].map((e) => [e.name, e.localHeaderOffset]));
  } finally {
    zip.close();
  }
}

// ---------------------------------------------------------------------------
// Checks.

const rawBytes = (a: Uint16Array | Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

/** `weights` holds exactly what openPth reads from `pthFile`: same names in order, dtypes, shapes and bits. */
function expectSameAsPth(weights: WeightReader, pthFile: string): void {
  const ref = openPth(pthFile);
  try {
    expect([...weights.tensors.keys()]).toEqual([...ref.tensors.keys()]);
    for (const [name, info] of ref.tensors) {
      const got = weights.readRaw(name);
      const want = ref.readRaw(name);
      const gotInfo = weights.tensors.get(name);
      expect([gotInfo?.dtype, gotInfo?.shape, gotInfo?.numel]).toEqual([info.dtype, info.shape, info.numel]);
      expect(got.dtype).toBe(want.dtype);
      expect(got.shape).toEqual(want.shape);
      expect(got.data.constructor).toBe(want.data.constructor);
      expect(rawBytes(got.data).equals(rawBytes(want.data)), name).toBe(true);
      expect(rawBytes(weights.read(name)).equals(rawBytes(ref.read(name))), name).toBe(true);
    }
  } finally {
    ref.close();
  }
}

/** `weights` holds torch's own values for fixture `fixtureName` (float32 bits of tensor.float()). */
function expectTorchValues(weights: WeightReader, fixtureName: string): void {
  const expected = EXPECTED.files[fixtureName].tensors;
  expect([...weights.tensors.keys()]).toEqual(Object.keys(expected));
  for (const [name, want] of Object.entries(expected)) {
    const info = weights.tensors.get(name);
    expect(info?.dtype).toBe(want.dtype);
    expect(info?.shape).toEqual(want.shape);
    const f = weights.read(name);
    expect(Array.from(new Uint32Array(f.buffer, f.byteOffset, f.length)), name).toEqual(want.f32_bits);
  }
}

/** openTar(file) must reject quickly with a one-line CheckpointError starting with `file` and matching `problem`. */
async function expectTarError(file: string, problem: RegExp): Promise<void> {
  const start = Date.now();
  let caught: unknown;
  try {
    const opened = await openTar(file);
    opened.weights.close();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CheckpointError);
  const message = (caught as Error).message;
  expect(message).not.toContain('\n');
  expect(message.startsWith(file), message).toBe(true);
  expect(message).toMatch(problem);
  expect(Date.now() - start).toBeLessThan(5000);
}

// ---------------------------------------------------------------------------

describe('openTar reads the model from the tar', () => {
  const layouts: [string, (m: ReturnType<typeof tinyMembers>) => Member[], string][] = [
    ['top folder, official order', (m) => [{ name: 'mistral-7B-v0.1/', type: 'directory' }, m.params, m.pth, m.tok], 'mistral-7B-v0.1/'],
    ['top folder, checkpoint first', (m) => [m.pth, m.tok, m.params], 'mistral-7B-v0.1/'],
    ['top folder, params last, extra members', (m) => [
      { name: 'mistral-7B-v0.1/README.md', data: Buffer.from('hello') },
      m.tok,
      { name: 'mistral-7B-v0.1/._params.json', data: Buffer.from('AppleDouble junk') },
      { name: 'mistral-7B-v0.1/sub/params.json', data: Buffer.from('not these: too deep') },
      m.pth,
      { name: 'mistral-7B-v0.1/link', type: 'symlink', linkname: 'tokenizer.model' },
      m.params,
      { name: 'mistral-7B-v0.1/consolidated.01.pth', data: Buffer.alloc(3000, 7) },
    ], 'mistral-7B-v0.1/'],
    ['root', (m) => [m.tok, m.params, m.pth], ''],
    ['./ prefix', (m) => [{ name: './', type: 'directory' }, { name: './m/', type: 'directory' }, m.params, m.tok, m.pth], './m/'],
    ['long folder name (pax header)', (m) => [m.pth, m.params, m.tok], `${'m'.repeat(160)}/`],
  ];

  it.each(layouts)('%s', async (_label, arrange, folder) => {
    const members = arrange(tinyMembers(folder));
    const file = tmpFile(await makeTar(members));
    const progress: [number, number][] = [];
    const opened = await openTar(file, { onProgress: (done, total) => progress.push([done, total]) });
    try {
      expect(opened.params).toEqual(JSON.parse(tinyParams.toString('utf8')));
      expect(opened.paramsFile).toBe(`${file}:${folder}params.json`);
      expect(opened.tokenizerName).toBe(`${file}:${folder}tokenizer.model`);
      expect(Buffer.from(opened.tokenizerBytes).equals(tinyTokenizer)).toBe(true);
      expect(opened.weights.path).toBe(`${file}:${folder}consolidated.00.pth`);
      expectSameAsPth(opened.weights, path.join(TINY, 'consolidated.00.pth'));
      // Progress: at least the final call, counts never decrease, against the tar's size.
      const size = fs.statSync(file).size;
      expect(progress.length).toBeGreaterThan(0);
      expect(progress.every(([, total]) => total === size)).toBe(true);
      expect(progress.every(([done], i) => i === 0 || done >= progress[i - 1][0])).toBe(true);
      expect(progress[progress.length - 1][0]).toBeGreaterThan(0);
      expect(progress[progress.length - 1][0]).toBeLessThanOrEqual(size);
    } finally {
      opened.weights.close();
    }
    expect(() => opened.weights.readRaw('norm.weight')).toThrow(CheckpointError);
  });

  it('reads member sizes written in GNU base-256 (how tar stores members of 8 GiB and more)', async () => {
    const m = tinyMembers('mistral-7B-v0.1/');
    const tar = await makeTar([m.params, m.pth, m.tok]);
    for (const entry of tarLayout(tar)) {
      // 0x80 then the size big-endian in the other 11 bytes of the field.
      const field = Buffer.alloc(12);
      field[0] = 0x80;
      field.writeUIntBE(entry.size, 6, 6);
      field.copy(tar, entry.header + 124);
      fixChecksum(tar, entry.header);
    }
    const opened = await openTar(tmpFile(tar));
    try {
      expect(Buffer.from(opened.tokenizerBytes).equals(tinyTokenizer)).toBe(true);
      expectSameAsPth(opened.weights, path.join(TINY, 'consolidated.00.pth'));
    } finally {
      opened.weights.close();
    }
  });

  // Every torch-written fixture (bf16 with shared-storage views, a 0-d and an empty tensor, f16,
  // f32, 300 views of one storage, an nn.Module state dict) and the zip64 re-packing, as the
  // tar's checkpoint: same as openPth, and the values torch itself dumped.
  it.each(Object.keys(EXPECTED.files))('fixtures/pth/%s inside a tar', async (fixtureName) => {
    const pthFile = path.join(PTH, fixtureName);
    const m = tinyMembers('model/', fs.readFileSync(pthFile));
    const opened = await openTar(tmpFile(await makeTar([m.params, m.pth, m.tok])));
    try {
      expectSameAsPth(opened.weights, pthFile);
      expectTorchValues(opened.weights, fixtureName);
    } finally {
      opened.weights.close();
    }
  });

  it('reads the record layout torch.save uses past 4 GiB (zip64 extra fields, 24-byte descriptors)', async () => {
    const records = zipRecords(path.join(TINY, 'consolidated.00.pth'));
    // data.pkl and the first storage plain, then one "4 GiB or more" record, then "past 4 GiB" ones.
    const zip = torchStyleZip(records, (i) => (i < 2 ? 'none' : i === 2 ? 'size' : 'offset'));
    const rebuilt = tmpFile(zip, 'rebuilt.pth');
    const direct = openPth(rebuilt); // the writer is sound: openPth reads it by its central directory
    try {
      expectSameAsPth(direct, path.join(TINY, 'consolidated.00.pth'));
    } finally {
      direct.close();
    }
    const m = tinyMembers('x/', zip);
    const opened = await openTar(tmpFile(await makeTar([m.tok, m.pth, m.params])));
    try {
      expectSameAsPth(opened.weights, path.join(TINY, 'consolidated.00.pth'));
    } finally {
      opened.weights.close();
    }
  });

  it.skipIf(!fs.existsSync(TINY_TAR))('fixtures/tiny.tar (skipped when fixtures/tiny.tar is absent)', async () => {
    const opened = await openTar(TINY_TAR);
    try {
      expect(opened.params).toEqual(JSON.parse(tinyParams.toString('utf8')));
      expect(Buffer.from(opened.tokenizerBytes).equals(tinyTokenizer)).toBe(true);
      expectSameAsPth(opened.weights, path.join(TINY, 'consolidated.00.pth'));
    } finally {
      opened.weights.close();
    }
  });
});

describe('openTar rejects broken input with a one-line error naming the tar', () => {
  /** The tiny model in `order`, under a top folder, and the member layout. */
  async function tinyTar(order: ('params' | 'pth' | 'tok')[], pth: Uint8Array = tinyPth) {
    const m = tinyMembers('mistral-7B-v0.1/', pth);
    const tar = await makeTar(order.map((k) => m[k]));
    const at = (suffix: string) => tarLayout(tar).find((e) => e.name.endsWith(suffix)) as ReturnType<typeof tarLayout>[number];
    return { tar, at };
  }

  it('truncated tars', async () => {
    const { tar, at } = await tinyTar(['params', 'pth', 'tok']);
    const cuts: [string, number, RegExp][] = [
      ['empty file', 0, /holds no members/],
      ['inside the first header', 300, /truncated tar: the file ends inside the first header/],
      ['inside the last header', at('tokenizer.model').header + 100, /truncated tar: the file ends after member ".*consolidated\.00\.pth"/],
      ['between members', at('tokenizer.model').header, /has no tokenizer\.model/],
      ['inside params.json', at('params.json').data + 50, /truncated/],
      ['inside the .pth', at('consolidated.00.pth').data + 150_000, /consolidated\.00\.pth" says it holds 310238 bytes .*\(truncated/],
      ['inside tokenizer.model', at('tokenizer.model').data + 1000, /tokenizer\.model" says it holds 7625 bytes .*\(truncated/],
    ];
    for (const [label, cut, problem] of cuts) {
      await expectTarError(tmpFile(tar.subarray(0, cut), `cut-${label.replace(/\W+/g, '-')}.tar`), problem);
    }
    // The checkpoint last: cut inside it, and inside its header.
    const last = await tinyTar(['tok', 'params', 'pth']);
    await expectTarError(tmpFile(last.tar.subarray(0, last.at('consolidated.00.pth').data + 4096)), /truncated/);
    await expectTarError(tmpFile(last.tar.subarray(0, last.at('consolidated.00.pth').header + 511)), /truncated tar/);
  });

  it('a member-size field larger than the file, or out of step with the data', async () => {
    const { tar, at } = await tinyTar(['params', 'pth', 'tok']);
    const header = at('consolidated.00.pth').header;
    const bigger = Buffer.from(tar);
    bigger.write('77777777777\0', header + 124, 'latin1');
    fixChecksum(bigger, header);
    await expectTarError(tmpFile(bigger), /says it holds 8589934591 bytes .* corrupt size field/);
    // 1000 bytes short: the .pth then ends inside its central directory (still readable), and the
    // next header is not where tar expects it.
    const smaller = Buffer.from(tar);
    smaller.write((310238 - 1000).toString(8).padStart(11, '0') + '\0', header + 124, 'latin1');
    fixChecksum(smaller, header);
    await expectTarError(tmpFile(smaller), /not a valid tar archive: bad header after member/);
  });

  it('bad magic or checksum', async () => {
    const { tar, at } = await tinyTar(['params', 'pth', 'tok']);
    const flipped = Buffer.from(tar);
    flipped.write('xstar', 257, 'latin1');
    await expectTarError(tmpFile(flipped), /not a valid tar archive: bad header \(Invalid tar header/);
    fixChecksum(flipped, 0); // valid checksum, unknown format
    await expectTarError(tmpFile(flipped), /not a valid tar archive: bad header \(.*unknown format/);
    const corrupt = Buffer.from(tar);
    corrupt[at('tokenizer.model').header + 5] ^= 0x55;
    await expectTarError(tmpFile(corrupt), /not a valid tar archive: bad header after member ".*consolidated\.00\.pth"/);
    await expectTarError(tmpFile(Buffer.alloc(4096, 0x41)), /not a valid tar archive/);
  });

  it('missing, duplicate, misplaced and invalid members', async () => {
    const m = tinyMembers('top/');
    const cases: [Member[], RegExp][] = [
      [[m.pth, m.tok], /has no params\.json \(expected params\.json, consolidated\.00\.pth and tokenizer\.model in its folder "top"\)/],
      [[m.params, m.tok], /has no consolidated\.00\.pth/],
      [[m.pth, m.params], /has no tokenizer\.model/],
      [[{ name: 'README', data: Buffer.from('x') }], /has no params\.json or consolidated\.00\.pth or tokenizer\.model \(expected .* at its top level or in one top folder\)/],
      [[{ ...m.params, name: 'a/b/params.json' }, m.pth, m.tok], /has no params\.json/],
      [[m.params, m.pth, { ...m.params }, m.tok], /holds two params\.json members, "top\/params\.json" and "top\/params\.json"/],
      [[m.params, { ...m.tok, name: 'other/tokenizer.model' }, m.pth], /member "other\/tokenizer\.model" is not in the same folder as "top\/params\.json"/],
      [[{ name: 'top/params.json', type: 'symlink', linkname: 'x.json' }, m.pth, m.tok], /member "top\/params\.json" is a symlink, expected a regular file/],
      [[{ ...m.params, data: Buffer.from('{"dim": 4096,') }, m.pth, m.tok], /top\/params\.json: is not valid JSON/],
    ];
    for (const [members, problem] of cases) await expectTarError(tmpFile(await makeTar(members)), problem);
    await expectTarError(path.join(TMP, 'no-such.tar'), /cannot open/);
    await expectTarError(TMP, /is a folder, expected a \.tar \(a regular file\)/);
  });

  it('a .pth member that is not a torch zip', async () => {
    const cases: [Uint8Array, RegExp][] = [
      [tinyParams, /consolidated\.00\.pth: not a zip archive \(starts with/],
      [Buffer.from('PK'), /consolidated\.00\.pth: not a zip archive \(2 bytes\)/],
      [Buffer.alloc(0), /not a zip archive \(0 bytes\)/],
      // a zip whose first record is not the pickle
      [torchStyleZip([{ name: 'archive/version', data: Buffer.from('3\n') }], () => 'none'), /first record is "archive\/version", not "<prefix>\/data\.pkl"/],
    ];
    for (const [pth, problem] of cases) {
      const { tar } = await tinyTar(['params', 'pth', 'tok'], pth);
      await expectTarError(tmpFile(tar), problem);
    }
  });

  it('a truncated .pth inside a well-formed tar', async () => {
    const headers = localHeaders(path.join(TINY, 'consolidated.00.pth'));
    const storage = headers.get('consolidated.00/data/1') as number;
    const cuts: [number, RegExp][] = [
      [40, /consolidated\.00\.pth: .*needs \d+ bytes at byte \d+, but only \d+ .* left/], // inside the first local header
      [200, /record "consolidated\.00\/data\.pkl" \(size in a data descriptor\) has no valid data descriptor/],
      [storage + 10, /needs \d+ bytes .* left \(truncated or corrupt\)/], // inside a local header
      [storage + 200, /record "consolidated\.00\/data\/1" \(\d+ bfloat16 elements\) needs \d+ bytes/], // inside the data
      [headers.get('consolidated.00/version') as number, /ends at byte \d+ after \d+ records, before the zip's central directory/],
    ];
    for (const [cut, problem] of cuts) {
      const { tar } = await tinyTar(['tok', 'pth', 'params'], tinyPth.subarray(0, cut));
      await expectTarError(tmpFile(tar), problem);
    }
  });

  it('zip records the stream cannot read, or whose sizes disagree with the member', async () => {
    const headers = localHeaders(path.join(TINY, 'consolidated.00.pth'));
    const edit = (fn: (pth: Buffer) => void): Buffer => {
      const pth = Buffer.from(tinyPth);
      fn(pth);
      return pth;
    };
    const storage1 = headers.get('consolidated.00/data/1') as number;
    const cases: [Buffer, RegExp][] = [
      [edit((p) => p.writeUInt16LE(8, 8)), /record "consolidated\.00\/data\.pkl" uses compression method 8; only stored \(0\) records/],
      [edit((p) => p.writeUInt16LE(0x809, storage1 + 6)), /record "consolidated\.00\/data\/1" is encrypted/],
      // data.pkl's descriptor CRC no longer matches: its end cannot be found
      [edit((p) => (p[64 + 1941 + 4] ^= 1)), /data\.pkl" \(size in a data descriptor\) has no valid data descriptor/],
    ];
    // A storage whose descriptor disagrees with the pickle's size for it.
    const recordsPth = zipRecords(path.join(TINY, 'consolidated.00.pth'));
    const wrongSize = torchStyleZip(
      recordsPth.map((r) => (r.name === 'consolidated.00/data/1' ? { ...r, data: Buffer.concat([r.data, Buffer.alloc(2)]) } : r)),
      () => 'none',
    );
    cases.push([wrongSize, /record "consolidated\.00\/data\/1" is not followed by a data descriptor for the 8192 bytes of the pickle's 4096 bfloat16 elements/]);
    // zip64 sizes far beyond the member: refused before anything is allocated.
    const zip64 = fs.readFileSync(path.join(PTH, 'zip64_bf16.pth'));
    const data0 = localHeaders(path.join(PTH, 'zip64_bf16.pth')).get('archive/data/0') as number;
    const huge = Buffer.from(zip64);
    huge.writeBigUInt64LE(1n << 40n, data0 + 30 + 'archive/data/0'.length + 4);
    huge.writeBigUInt64LE(1n << 40n, data0 + 30 + 'archive/data/0'.length + 12);
    cases.push([huge, /record "archive\/data\/0" \(20 bfloat16 elements\) needs 1099511627776 bytes at byte \d+, but only \d+ of the file's 2353 bytes are left/]);
    const mismatch = Buffer.from(zip64);
    mismatch.writeBigUInt64LE(1n << 40n, data0 + 30 + 'archive/data/0'.length + 12);
    cases.push([mismatch, /stored record "archive\/data\/0" has compressed size 1099511627776 != size 40/]);
    for (const [pth, problem] of cases) {
      const { tar } = await tinyTar(['params', 'pth', 'tok'], pth);
      await expectTarError(tmpFile(tar), problem);
    }
  });

  it('leaves no file open', () => {
    if (process.platform !== 'linux') return; // /proc/self/fd is Linux's
    const open = fs.readdirSync('/proc/self/fd').flatMap((fd) => {
      try {
        return [fs.readlinkSync(`/proc/self/fd/${fd}`)];
      } catch {
        return [];
      }
    });
    expect(open.filter((target) => target.startsWith(TMP))).toEqual([]);
  });
});
