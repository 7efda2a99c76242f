/**
 * The restricted unpickler on pickles written by CPython 3.11's pickle.dumps
 * (hex below), plus hand-made hostile ones.
 */
import { describe, expect, it } from 'vitest';
import { CheckpointError } from '../checkpoint/errors';
import { PickleGlobal, PickleValue, unpickle } from '../checkpoint/pickle';

const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s, 'hex'));

const ORDERED_DICT = new PickleGlobal('collections', 'OrderedDict', () => new Map());
const noGlobals = { file: 'test.pkl', globals: new Map<string, PickleGlobal>() };

// pickle.dumps(v, protocol=P) for
// v = {'ints': [0, 1, 255, 256, 65535, 65536, -1, -2**31, 2**31-1, 2**31, 2**40, -2**40, 2**53-1],
//      'floats': [1.5, -0.0, 1e300, float('inf')], 't': (1, 2, 3), 't1': ('x',), 't0': (),
//      'b': [True, False, None], 's': 'hé世'}
const PROTO2 =
  '80027d7100285804000000696e747371015d7102284b004b014bff4d00014dffff4a000001004affffffff4a000000804affffff7f8a05000000' +
  '80008a060000000000018a060000000000ff8a07ffffffffffff1f655806000000666c6f61747371035d710428473ff800000000000047800000' +
  '0000000000477e37e43c8800759c477ff00000000000006558010000007471054b014b024b03877106580200000074317107580100000078710885' +
  '710958020000007430710a29580100000062710b5d710c2888894e65580100000073710d580600000068c3a9e4b896710e752e';
const PROTO4 =
  '800495b6000000000000007d94288c04696e7473945d94284b004b014bff4d00014dffff4a000001004affffffff4a000000804affffff7f8a05' +
  '00000080008a060000000000018a060000000000ff8a07ffffffffffff1f658c06666c6f617473945d9428473ff800000000000047800000000000' +
  '0000477e37e43c8800759c477ff0000000000000658c0174944b014b024b0387948c027431948c01789485948c02743094298c0162945d94288889' +
  '4e658c0173948c0668c3a9e4b89694752e';

function expectPythonValue(v: PickleValue): void {
  expect(v).toBeInstanceOf(Map);
  const d = v as Map<string, PickleValue>;
  expect([...d.keys()]).toEqual(['ints', 'floats', 't', 't1', 't0', 'b', 's']);
  expect(d.get('ints')).toEqual([0, 1, 255, 256, 65535, 65536, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, 2 ** 40, -(2 ** 40), 2 ** 53 - 1]);
  const floats = d.get('floats') as number[];
  expect(floats[0]).toBe(1.5);
  expect(Object.is(floats[1], -0)).toBe(true);
  expect(floats[2]).toBe(1e300);
  expect(floats[3]).toBe(Infinity);
  expect(d.get('t')).toEqual([1, 2, 3]);
  expect(Object.isFrozen(d.get('t'))).toBe(true); // tuples are frozen arrays
  expect(d.get('t1')).toEqual(['x']);
  expect(d.get('t0')).toEqual([]);
  expect(d.get('b')).toEqual([true, false, null]);
  expect(Object.isFrozen(d.get('b'))).toBe(false); // lists are not
  expect(d.get('s')).toBe('hé世');
}

describe('unpickle', () => {
  it('reads a protocol 2 pickle from CPython', () => {
    expectPythonValue(unpickle(hex(PROTO2), noGlobals));
  });

  it('reads a protocol 4 pickle (FRAME, SHORT_BINUNICODE, MEMOIZE)', () => {
    expectPythonValue(unpickle(hex(PROTO4), noGlobals));
  });

  it('calls an allowed global through REDUCE', () => {
    // pickle.dumps(collections.OrderedDict([('a', 1)]), protocol=2)
    const bytes = hex('800263636f6c6c656374696f6e730a4f726465726564446963740a71002952710158010000006171024b01732e');
    const v = unpickle(bytes, { file: 'od.pkl', globals: new Map([['collections.OrderedDict', ORDERED_DICT]]) });
    expect(v).toEqual(new Map([['a', 1]]));
  });

  it("drops the attributes BUILD sets on a dict (state_dict()'s _metadata), keeping the entries", () => {
    // od = OrderedDict([('a', 1)]); od._metadata = {'x': 1}; pickle.dumps(od, protocol=2)
    const bytes = hex(
      '800263636f6c6c656374696f6e730a4f726465726564446963740a71002952710158010000006171024b01737d7103' +
        '58090000005f6d6574616461746171047d710558010000007871064b017373622e',
    );
    const v = unpickle(bytes, { file: 'od.pkl', globals: new Map([['collections.OrderedDict', ORDERED_DICT]]) });
    expect(v).toEqual(new Map([['a', 1]]));
    // BUILD with real state on a list: refused.
    expect(() => unpickle(hex('80025d' + '7d' + '4b01' + '4b02' + '73' + '62' + '2e'), noGlobals)).toThrowError(
      /test\.pkl: .*BUILD with state on a list is not supported/,
    );
  });

  it('refuses a global that is not on the allow-list, naming it and the file', () => {
    // cos\nsystem\n  X"ls"  TUPLE1  REDUCE  STOP: what a hostile pickle would do.
    const bytes = Buffer.concat([Buffer.from([0x80, 2]), Buffer.from('cos\nsystem\n', 'latin1'), Buffer.from('5802000000', 'hex'), Buffer.from('ls'), Buffer.from([0x85, 0x52, 0x2e])]);
    expect(() => unpickle(bytes, { file: 'evil.pkl', globals: new Map([['collections.OrderedDict', ORDERED_DICT]]) })).toThrowError(
      /^evil\.pkl: .*global os\.system is not allowed/,
    );
    expect(() => unpickle(bytes, noGlobals)).toThrowError(CheckpointError);
  });

  it('refuses to call an allowed global that is not callable', () => {
    const notCallable = new PickleGlobal('torch', 'FloatStorage');
    const bytes = Buffer.concat([Buffer.from([0x80, 2]), Buffer.from('ctorch\nFloatStorage\n)R.', 'latin1')]);
    expect(() => unpickle(bytes, { file: 'f.pkl', globals: new Map([['torch.FloatStorage', notCallable]]) })).toThrowError(
      /f\.pkl: .*cannot call torch\.FloatStorage/,
    );
  });

  it('rejects integers beyond 2^53, truncation, unknown opcodes and unbalanced stacks', () => {
    // pickle.dumps(2**63, protocol=2)
    expect(() => unpickle(hex('80028a090000000000000080002e'), noGlobals)).toThrowError(/test\.pkl: .*too large/);
    expect(() => unpickle(hex(PROTO2).subarray(0, 40), noGlobals)).toThrowError(/test\.pkl: .*truncated/);
    expect(() => unpickle(hex('8002' + '63'), noGlobals)).toThrowError(CheckpointError);
    expect(() => unpickle(hex('8002' + 'ff' + '2e'), noGlobals)).toThrowError(/test\.pkl: .*unsupported pickle opcode 0xff/);
    expect(() => unpickle(hex('8002' + '4b01' + '4b02' + '2e'), noGlobals)).toThrowError(/unbalanced/);
    expect(() => unpickle(hex('8002' + '2e'), noGlobals)).toThrowError(/unbalanced/);
    expect(() => unpickle(hex('8002' + '6805' + '2e'), noGlobals)).toThrowError(/memo index 5/);
    expect(() => unpickle(hex('8002' + '51' + '2e'), noGlobals)).toThrowError(CheckpointError); // BINPERSID on empty stack
  });
});
