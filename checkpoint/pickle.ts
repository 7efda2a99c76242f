/**
 * A small, restricted unpickler for the pickles torch.save writes for a
 * state dict (protocol 2, plus the few protocol 4 opcodes a newer writer
 * could use). Nothing is ever evaluated: a GLOBAL opcode only resolves to an
 * entry of the allow-list the caller passes in, and anything else is a
 * CheckpointError naming the global. REDUCE calls the allow-listed
 * TypeScript function for that global.
 */
import { CheckpointError } from './errors';

/** Dict keys we accept (the hashable scalars a state dict can use). */
export type PickleKey = string | number | boolean | null;

/** A Python dict / OrderedDict; insertion order is kept. */
export type PickleDict = Map<PickleKey, PickleValue>;

/** Base class for objects made by allow-listed globals (e.g. a tensor reference). */
export abstract class PickleObject {}

/** An allow-listed `module.name` global. `call` is present when REDUCE may call it. */
export class PickleGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
    readonly call?: (args: readonly PickleValue[], file: string) => PickleValue,
  ) {}

  get qualifiedName(): string {
    return `${this.module}.${this.name}`;
  }
}

/**
 * Any unpickled value. Lists and tuples are both arrays; tuples are frozen.
 * Integers are JS numbers (an integer beyond 2^53 is an error).
 */
export type PickleValue = null | boolean | number | string | PickleValue[] | PickleDict | PickleGlobal | PickleObject;

export interface UnpickleOptions {
  /** Names the pickle in error messages, e.g. "model.pth". */
  file: string;
  /** Allowed globals, keyed by "module.name". */
  globals: ReadonlyMap<string, PickleGlobal>;
  /** Resolves a BINPERSID persistent id (torch uses it for storages). */
  persistentLoad?: (pid: PickleValue) => PickleValue;
}

/** Unpickles `data`, returning the value left by STOP. Throws CheckpointError on anything unsupported. */
export function unpickle(data: Uint8Array, options: UnpickleOptions): PickleValue {
  return new Unpickler(data, options).run();
}

/** LONG1 / LONG4 integers longer than this are refused (2^53 fits in 7 bytes). */
const MAX_LONG_BYTES = 16;

function isDict(v: PickleValue): v is PickleDict {
  return v instanceof Map;
}

function isKey(v: PickleValue): v is PickleKey {
  return v === null || typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean';
}

function describe(v: PickleValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return Object.isFrozen(v) ? 'tuple' : 'list';
  if (v instanceof Map) return 'dict';
  if (v instanceof PickleGlobal) return v.qualifiedName;
  if (v instanceof PickleObject) return v.constructor.name;
  return typeof v;
}

class Unpickler {
  private pos = 0;
  private opStart = 0;
  /** The values pushed since the last MARK; MARK saves the current stack on the metastack. */
  private stack: PickleValue[] = [];
  private readonly metastack: PickleValue[][] = [];
  private readonly memo = new Map<number, PickleValue>();
  private readonly view: DataView;

  constructor(
    private readonly data: Uint8Array,
    private readonly options: UnpickleOptions,
  ) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  private fail(problem: string): never {
    throw new CheckpointError(this.options.file, `pickle byte ${this.opStart}: ${problem}`);
  }

  private need(n: number): number {
    if (this.pos + n > this.data.length) this.fail('pickle ends in the middle of an opcode (truncated?)');
    const at = this.pos;
    this.pos += n;
    return at;
  }

  private u8(): number {
    return this.data[this.need(1)];
  }
  private u16(): number {
    return this.view.getUint16(this.need(2), true);
  }
  private u32(): number {
    return this.view.getUint32(this.need(4), true);
  }
  private i32(): number {
    return this.view.getInt32(this.need(4), true);
  }
  private u64(): number {
    const v = this.view.getBigUint64(this.need(8), true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) this.fail(`length ${v} is too large`);
    return Number(v);
  }
  private utf8(n: number): string {
    const at = this.need(n);
    return Buffer.from(this.data.buffer, this.data.byteOffset + at, n).toString('utf8');
  }
  /** A "\n"-terminated ASCII line (GLOBAL's operands). */
  private line(): string {
    const end = this.data.indexOf(0x0a, this.pos);
    if (end < 0) this.fail('GLOBAL operand has no end of line (truncated?)');
    const s = Buffer.from(this.data.buffer, this.data.byteOffset + this.pos, end - this.pos).toString('latin1');
    this.pos = end + 1;
    return s;
  }
  /** Little-endian two's complement integer of n bytes (LONG1 / LONG4). */
  private long(n: number): number {
    // Pickle writes the fewest bytes; a longer one cannot fit in 2^53 and would take quadratic time here.
    if (n > MAX_LONG_BYTES) this.fail(`integer of ${n} bytes is too large`);
    const at = this.need(n);
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(this.data[at + i]);
    if (n > 0 && this.data[at + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) this.fail(`integer ${v} is too large`);
    return Number(v);
  }

  private push(v: PickleValue): void {
    this.stack.push(v);
  }
  private pop(): PickleValue {
    if (this.stack.length === 0) this.fail('stack underflow');
    return this.stack.pop() as PickleValue;
  }
  private top(): PickleValue {
    if (this.stack.length === 0) this.fail('stack underflow');
    return this.stack[this.stack.length - 1];
  }
  /** Pops everything down to the last MARK (the items, in order). */
  private popMark(): PickleValue[] {
    const items = this.stack;
    const previous = this.metastack.pop();
    if (!previous) this.fail('no MARK to pop to');
    this.stack = previous;
    return items;
  }
  private tuple(items: PickleValue[]): PickleValue[] {
    return Object.freeze(items) as PickleValue[];
  }
  private memoPut(index: number): void {
    this.memo.set(index, this.top());
  }
  private memoGet(index: number): void {
    const v = this.memo.get(index);
    if (v === undefined) this.fail(`memo index ${index} was never stored`);
    this.push(v);
  }
  private setItems(dict: PickleValue, items: PickleValue[]): void {
    if (!isDict(dict)) this.fail(`SETITEM(S) on a ${describe(dict)}, expected a dict`);
    if (items.length % 2 !== 0) this.fail('SETITEMS with an odd number of items');
    for (let i = 0; i < items.length; i += 2) {
      const key = items[i];
      if (!isKey(key)) this.fail(`dict key of type ${describe(key)} is not supported`);
      dict.set(key, items[i + 1]);
    }
  }
  private append(list: PickleValue, items: PickleValue[]): void {
    if (!Array.isArray(list) || Object.isFrozen(list)) this.fail(`APPEND(S) on a ${describe(list)}, expected a list`);
    // One by one: list.push(...items) passes every item as an argument, and 500,000 of them
    // overflow the call stack.
    for (const item of items) list.push(item);
  }
  private global(module: string, name: string): void {
    const g = this.options.globals.get(`${module}.${name}`);
    if (!g) this.fail(`global ${module}.${name} is not allowed in a checkpoint`);
    this.push(g);
  }

  run(): PickleValue {
    for (;;) {
      this.opStart = this.pos;
      const op = this.u8();
      switch (op) {
        case 0x80: // PROTO
          if (this.u8() > 5) this.fail('unknown pickle protocol');
          break;
        case 0x95: // FRAME (protocol 4): just a length hint
          this.u64();
          break;
        case 0x2e: // STOP '.'
          if (this.stack.length !== 1 || this.metastack.length !== 0) this.fail('STOP with an unbalanced stack');
          return this.pop();
        case 0x28: // MARK '('
          this.metastack.push(this.stack);
          this.stack = [];
          break;
        case 0x7d: // EMPTY_DICT '}'
          this.push(new Map());
          break;
        case 0x5d: // EMPTY_LIST ']'
          this.push([]);
          break;
        case 0x29: // EMPTY_TUPLE ')'
          this.push(this.tuple([]));
          break;
        case 0x58: // BINUNICODE 'X'
          this.push(this.utf8(this.u32()));
          break;
        case 0x8c: // SHORT_BINUNICODE
          this.push(this.utf8(this.u8()));
          break;
        case 0x8d: // BINUNICODE8
          this.push(this.utf8(this.u64()));
          break;
        case 0x71: // BINPUT 'q'
          this.memoPut(this.u8());
          break;
        case 0x72: // LONG_BINPUT 'r'
          this.memoPut(this.u32());
          break;
        case 0x94: // MEMOIZE
          this.memoPut(this.memo.size);
          break;
        case 0x68: // BINGET 'h'
          this.memoGet(this.u8());
          break;
        case 0x6a: // LONG_BINGET 'j'
          this.memoGet(this.u32());
          break;
        case 0x63: {
          // GLOBAL 'c'
          const module = this.line();
          this.global(module, this.line());
          break;
        }
        case 0x93: {
          // STACK_GLOBAL
          const name = this.pop();
          const module = this.pop();
          if (typeof module !== 'string' || typeof name !== 'string') this.fail('STACK_GLOBAL needs two strings');
          this.global(module, name);
          break;
        }
        case 0x4a: // BININT 'J'
          this.push(this.i32());
          break;
        case 0x4b: // BININT1 'K'
          this.push(this.u8());
          break;
        case 0x4d: // BININT2 'M'
          this.push(this.u16());
          break;
        case 0x8a: // LONG1
          this.push(this.long(this.u8()));
          break;
        case 0x8b: // LONG4
          this.push(this.long(this.u32()));
          break;
        case 0x47: // BINFLOAT 'G' (big-endian double)
          this.push(this.view.getFloat64(this.need(8), false));
          break;
        case 0x88: // NEWTRUE
          this.push(true);
          break;
        case 0x89: // NEWFALSE
          this.push(false);
          break;
        case 0x4e: // NONE 'N'
          this.push(null);
          break;
        case 0x74: // TUPLE 't'
          this.push(this.tuple(this.popMark()));
          break;
        case 0x85: // TUPLE1
          this.push(this.tuple([this.pop()]));
          break;
        case 0x86: {
          // TUPLE2
          const b = this.pop();
          this.push(this.tuple([this.pop(), b]));
          break;
        }
        case 0x87: {
          // TUPLE3
          const c = this.pop();
          const b = this.pop();
          this.push(this.tuple([this.pop(), b, c]));
          break;
        }
        case 0x6c: // LIST 'l'
          this.push(this.popMark());
          break;
        case 0x64: {
          // DICT 'd'
          const dict: PickleDict = new Map();
          this.setItems(dict, this.popMark());
          this.push(dict);
          break;
        }
        case 0x73: {
          // SETITEM 's'
          const value = this.pop();
          const key = this.pop();
          this.setItems(this.top(), [key, value]);
          break;
        }
        case 0x75: {
          // SETITEMS 'u'
          const items = this.popMark();
          this.setItems(this.top(), items);
          break;
        }
        case 0x61: {
          // APPEND 'a'
          const item = this.pop();
          this.append(this.top(), [item]);
          break;
        }
        case 0x65: {
          // APPENDS 'e'
          const items = this.popMark();
          this.append(this.top(), items);
          break;
        }
        case 0x51: {
          // BINPERSID 'Q'
          const pid = this.pop();
          if (!this.options.persistentLoad) this.fail('persistent ids are not supported here');
          this.push(this.options.persistentLoad(pid));
          break;
        }
        case 0x52: {
          // REDUCE 'R'
          const args = this.pop();
          const callable = this.pop();
          if (!(callable instanceof PickleGlobal) || !callable.call) this.fail(`cannot call ${describe(callable)}`);
          if (!Array.isArray(args)) this.fail(`arguments of ${callable.qualifiedName} are a ${describe(args)}, expected a tuple`);
          this.push(callable.call(args, this.options.file));
          break;
        }
        case 0x62: {
          // BUILD 'b': sets Python attributes. The only one we meet is the `_metadata` attribute
          // that Module.state_dict() puts on its OrderedDict; attributes of a dict are not its
          // entries, so they are dropped. BUILD on anything else must be a no-op.
          const state = this.pop();
          const target = this.top();
          const empty = state === null || (isDict(state) && state.size === 0);
          if (!empty && !(isDict(target) && isDict(state))) {
            this.fail(`BUILD with state on a ${describe(target)} is not supported`);
          }
          break;
        }
        case 0x30: // POP '0'
          this.pop();
          break;
        case 0x31: // POP_MARK '1'
          this.popMark();
          break;
        case 0x32: // DUP '2'
          this.push(this.top());
          break;
        default:
          this.fail(`unsupported pickle opcode 0x${op.toString(16).padStart(2, '0')}`);
      }
    }
  }
}
