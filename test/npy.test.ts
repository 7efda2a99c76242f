/**
 * readNpy / writeNpy against .npy files written by numpy.save
 * (fixtures/pth/*.npy, values in fixtures/pth/expected.json, made by
 * fixtures/make_pth_cases.py), round trips, and bad input.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { afterAll, describe, expect, it } from 'vitest';
import { readNpy, writeNpy } from '../checkpoint/npy';
import { expectCheckpointError } from './checkpoint_errors';

const FIXTURES = path.join(__dirname, '..', 'fixtures', 'pth');
const EXPECTED = JSON.parse(fs.readFileSync(path.join(FIXTURES, 'expected.json'), 'utf8')) as {
  npy: Record<string, { dtype: string; shape: number[]; values: number[] }>;
};

const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'npy-test-'));
afterAll(() => fs.rmSync(TMP, { recursive: true, force: true }));
const tmp = (name: string): string => path.join(TMP, name);

const bits = (a: Float32Array): number[] => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

describe('readNpy on numpy.save output', () => {
  for (const [name, want] of Object.entries(EXPECTED.npy)) {
    it(`${name}: dtype, shape and values`, () => {
      const arr = readNpy(path.join(FIXTURES, name));
      expect(arr.dtype).toBe(want.dtype);
      expect(arr.shape).toEqual(want.shape);
      const expectedType = { float32: Float32Array, float64: Float64Array, int32: Int32Array, int64: Int32Array }[arr.dtype];
      expect(arr.data).toBeInstanceOf(expectedType);
      expect(arr.data.length).toBe(want.values.length);
      // Object.is: -0 must stay -0.
      want.values.forEach((v, i) => expect(Object.is(arr.data[i], v), `${name}[${i}] = ${arr.data[i]}, want ${v}`).toBe(true));
    });
  }
});

describe('writeNpy', () => {
  it('writes byte-for-byte what numpy.save writes', () => {
    for (const name of ['small_f32.npy', 'small_f64.npy', 'small_i32.npy', 'scalar_f32.npy']) {
      const want = EXPECTED.npy[name];
      const data =
        want.dtype === 'float32'
          ? new Float32Array(want.values)
          : want.dtype === 'float64'
            ? new Float64Array(want.values)
            : new Int32Array(want.values);
      const out = tmp(name);
      writeNpy(out, data, want.shape);
      expect(fs.readFileSync(out).equals(fs.readFileSync(path.join(FIXTURES, name))), name).toBe(true);
    }
  });

  it('round-trips float32 (nan, inf, -0, subnormals) and int32 arrays of several shapes', () => {
    const f = new Float32Array([NaN, Infinity, -Infinity, -0, 1e-45, -3.4e38, 0.1, 7]);
    for (const shape of [[8], [2, 4], [2, 2, 2], [1, 8, 1]]) {
      const file = tmp(`f-${shape.join('x')}.npy`);
      writeNpy(file, f, shape);
      const back = readNpy(file);
      expect(back.dtype).toBe('float32');
      expect(back.shape).toEqual(shape);
      expect(bits(back.data as Float32Array)).toEqual(bits(f));
      expect((fs.statSync(file).size - f.byteLength) % 64).toBe(0); // header padded to 64 bytes
    }
    const ints = new Int32Array([0, -1, 2147483647, -2147483648, 5, 6]);
    writeNpy(tmp('i.npy'), ints, [3, 2]);
    const back = readNpy(tmp('i.npy'));
    expect(back.dtype).toBe('int32');
    expect(back.shape).toEqual([3, 2]);
    expect(Array.from(back.data)).toEqual(Array.from(ints));
    writeNpy(tmp('empty.npy'), new Float32Array(0), [0, 4]);
    expect(readNpy(tmp('empty.npy'))).toEqual({ dtype: 'float32', shape: [0, 4], data: new Float32Array(0) });
  });

  it('writes a subarray view, not its whole buffer', () => {
    const whole = new Float32Array([1, 2, 3, 4, 5]);
    writeNpy(tmp('view.npy'), whole.subarray(1, 3), [2]);
    expect(Array.from(readNpy(tmp('view.npy')).data)).toEqual([2, 3]);
  });

  it('rejects a shape that does not match the data', () => {
    expectCheckpointError(() => writeNpy(tmp('bad.npy'), new Float32Array(6), [4, 2]), tmp('bad.npy'), /shape \[4,2\] has 8 elements but data has 6/);
    expectCheckpointError(() => writeNpy(tmp('bad.npy'), new Float32Array(2), [-1, -2]), tmp('bad.npy'), /non-negative/);
  });
});

describe('readNpy on bad input', () => {
  const good = fs.readFileSync(path.join(FIXTURES, 'small_f32.npy'));
  const edited = (name: string, from: string, to: string): string => {
    const text = good.toString('latin1');
    expect(text).toContain(from);
    const file = tmp(name);
    fs.writeFileSync(file, Buffer.from(text.replace(from, to), 'latin1'));
    return file;
  };

  it('rejects Fortran order', () => {
    const file = edited('fortran.npy', "'fortran_order': False", "'fortran_order': True ");
    expectCheckpointError(() => readNpy(file), file, /Fortran-order/);
  });

  it('rejects other dtypes and big-endian data', () => {
    const big = edited('big.npy', "'<f4'", "'>f4'");
    expectCheckpointError(() => readNpy(big), big, /unsupported dtype '>f4'/);
    const half = edited('half.npy', "'<f4'", "'<f2'");
    expectCheckpointError(() => readNpy(half), half, /unsupported dtype '<f2'/);
  });

  it('rejects a truncated file, a wrong size, a non-.npy file and a missing file', () => {
    const truncated = tmp('truncated.npy');
    fs.writeFileSync(truncated, good.subarray(0, good.length - 1));
    expectCheckpointError(() => readNpy(truncated), truncated, /data is 23 bytes but shape \(2,3\) of float32 needs 24/);
    const headerOnly = tmp('header-only.npy');
    fs.writeFileSync(headerOnly, good.subarray(0, 40));
    expectCheckpointError(() => readNpy(headerOnly), headerOnly, /truncated \.npy header/);
    const text = tmp('text.npy');
    fs.writeFileSync(text, 'hello, world\n');
    expectCheckpointError(() => readNpy(text), text, /not a \.npy file/);
    expectCheckpointError(() => readNpy(tmp('missing.npy')), tmp('missing.npy'), /cannot open \(no such file\)/);
  });

  it('rejects int64 values that do not fit in int32', () => {
    const bytes = Buffer.from(fs.readFileSync(path.join(FIXTURES, 'small_i64.npy')));
    bytes.writeBigInt64LE(2n ** 40n, bytes.length - 8);
    const file = tmp('i64-big.npy');
    fs.writeFileSync(file, bytes);
    expectCheckpointError(() => readNpy(file), file, /int64 value 1099511627776 at index 3 does not fit in int32/);
  });
});
