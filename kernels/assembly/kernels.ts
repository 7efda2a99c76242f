/**
 * Matrix products y = W x on WebAssembly SIMD128, for the compute pool (kernels/pool.ts).
 *
 * AssemblyScript (TypeScript syntax); built by `npm run build:kernels` into kernels/kernels.wasm.
 * The module owns no data: every argument is a byte address in the imported memory, which the
 * host (the pool) lays out. No allocation, no runtime.
 *
 * Shapes and layouts
 *   W  [rows, cols], row-major, element type `dt`: bf16 (0), f16 (1) or f32 (2); W[r, c] at
 *      w + (r * cols + c) * size(dt).
 *   x  [T, cols] float32, row-major: token t's input at x + t * cols * 4.
 *   y  [T, rows] float32, row-major: y[t, r] = sum_c W[r, c] * x[t, c], at y + (t * rows + r) * 4.
 *   scratch  (T + 2) * cols * 4 bytes the kernel may overwrite: the rearranged input, and for T > 1
 *            a pair of rows widened to float32.
 *
 * Summation order (the same for every kernel below and every element type, so results are
 * reproducible, and bit-identical whether a row is computed by matvec or matmul, alone or in a
 * group, on whichever thread, and equal for a bf16 or f16 weight and its float32 widening):
 *   Let n8 = cols rounded down to a multiple of 8. Two float32x4 accumulators a and b start at 0.
 *   For c = 0, 8, 16, ... < n8 in increasing order, each group of 8 columns split even / odd:
 *     a[j] = a[j] + W[r, c + 2j] * x[t, c + 2j]            (j = 0..3; product rounded, then sum rounded)
 *     b[j] = b[j] + W[r, c + 2j + 1] * x[t, c + 2j + 1]
 *   s = a + b (lanewise), then  head = (s[0] + s[1]) + (s[2] + s[3]).
 *   tail = 0; for c = n8 .. cols-1 in increasing order: tail = tail + W[r, c] * x[t, c].
 *   y[t, r] = head + tail.
 * WebAssembly has no fused multiply-add in SIMD128 and forbids contracting mul and add, so every
 * product and every sum is rounded to float32 exactly where written above. Weights are widened to
 * float32 exactly (bf16 and f16 values are all representable in float32).
 *
 * Why even / odd: a 32-bit lane holds two 16-bit weights, W[c + 2j] in its low half and
 * W[c + 2j + 1] in its high half, so a bf16 pair becomes two float32 with one shift (low half up)
 * and one mask (high half kept): 2 operations per 8 weights instead of 4 with extend_low/high and
 * shifts; the kernels are compute-bound on a busy core, and this measured 1.3-1.7x faster there.
 * The input is rearranged to match, once per call: xp[c + j] = x[c + 2j], xp[c + 4 + j] = x[c + 2j + 1]
 * within each group of 8 (the tail columns stay in place).
 */

// Element types (the host uses the same numbers).
const BF16: i32 = 0;
const F16: i32 = 1;
const F32: i32 = 2;

/** log2 of the size in bytes of one element of type `dt`. */
// @ts-ignore: decorator
@inline function sizeLog2(dt: i32): i32 {
  return dt == F32 ? 2 : 1;
}

/**
 * Eight f16 values (as u16 lanes of an i32x4, already zero-extended) to float32 bit patterns, with
 * integer operations (SIMD128 has no f16):
 *   sign  moves from bit 15 to bit 31;
 *   normal numbers: exponent and mantissa shifted left by 13, exponent rebased from 15 to 127 (add 112 << 23);
 *   inf and nan (exponent 31): rebased to 255 (add 112 << 23 once more); the nan payload is kept;
 *   zero and subnormals (exponent 0): value = mantissa * 2^-24, computed as float32 from the integer
 *   mantissa (exact: an integer below 1024 times a power of two; the result is a normal float32).
 */
// @ts-ignore: decorator
@inline function f16ToF32Bits(h: v128): v128 {
  const sign = i32x4.shl(v128.and(h, i32x4.splat(0x8000)), 16);
  const em = v128.and(h, i32x4.splat(0x7fff));
  const exponent = v128.and(em, i32x4.splat(0x7c00));
  const infOrNan = i32x4.eq(exponent, i32x4.splat(0x7c00));
  const zeroOrSub = i32x4.eq(exponent, i32x4.splat(0));
  let bits = i32x4.add(i32x4.shl(em, 13), i32x4.splat(112 << 23));
  bits = i32x4.add(bits, v128.and(infOrNan, i32x4.splat(112 << 23)));
  const sub = f32x4.mul(f32x4.convert_i32x4_u(em), f32x4.splat(5.9604644775390625e-8)); // 2^-24
  return v128.or(v128.bitselect(sub, bits, zeroOrSub), sign);
}

/** Columns c, c+2, c+4, c+6 of the row at `p` (p = address of W[r, c]) as float32x4. */
// @ts-ignore: decorator
@inline function wEven(dt: i32, p: usize): v128 {
  if (dt == F32) return v128.shuffle<f32>(v128.load(p), v128.load(p, 16), 0, 2, 4, 6);
  const v = v128.load(p);
  if (dt == BF16) return i32x4.shl(v, 16); // the low half of each lane moved up: a float32
  return f16ToF32Bits(v128.and(v, i32x4.splat(0xffff)));
}

/** Columns c+1, c+3, c+5, c+7 of the row at `p` (p = address of W[r, c]) as float32x4. */
// @ts-ignore: decorator
@inline function wOdd(dt: i32, p: usize): v128 {
  if (dt == F32) return v128.shuffle<f32>(v128.load(p), v128.load(p, 16), 1, 3, 5, 7);
  const v = v128.load(p);
  if (dt == BF16) return v128.and(v, i32x4.splat(0xffff0000)); // the high half is a float32 already
  return f16ToF32Bits(i32x4.shr_u(v, 16));
}

/** x [T, cols] rearranged into xp for the even / odd split (see the top of the file). */
// @ts-ignore: decorator
@inline function rearrangeInput(x: usize, xp: usize, cols: i32, T: i32): void {
  const n8 = cols & ~7;
  const n = <usize>T * <usize>cols;
  for (let t: usize = 0; t < n; t += <usize>cols) {
    const src = x + (t << 2);
    const dst = xp + (t << 2);
    for (let c = 0; c < n8; c += 8) {
      const lo = v128.load(src + (<usize>c << 2));
      const hi = v128.load(src + (<usize>c << 2), 16);
      v128.store(dst + (<usize>c << 2), v128.shuffle<f32>(lo, hi, 0, 2, 4, 6));
      v128.store(dst + (<usize>c << 2), v128.shuffle<f32>(lo, hi, 1, 3, 5, 7), 16);
    }
    for (let c = n8; c < cols; c++) store<f32>(dst + (<usize>c << 2), load<f32>(src + (<usize>c << 2)));
  }
}

/** One f16 value (in the low 16 bits) to float32, the scalar twin of f16ToF32Bits. */
// @ts-ignore: decorator
@inline function f16ToF32(h: u32): f32 {
  const sign = (h & 0x8000) << 16;
  const em = h & 0x7fff;
  const exponent = em & 0x7c00;
  if (exponent == 0) return reinterpret<f32>(reinterpret<u32>(<f32>em * 5.9604644775390625e-8) | sign);
  let bits = (em << 13) + (112 << 23);
  if (exponent == 0x7c00) bits += 112 << 23;
  return reinterpret<f32>(bits | sign);
}

/** W[r, c] as float32, where `row` is the address of W[r, 0]. */
// @ts-ignore: decorator
@inline function wAt(dt: i32, row: usize, c: i32): f32 {
  if (dt == F32) return load<f32>(row + (<usize>c << 2));
  const h = <u32>load<u16>(row + (<usize>c << 1));
  if (dt == BF16) return reinterpret<f32>(h << 16);
  return f16ToF32(h);
}

/** a * b + acc on float32x4, rounded twice (no fma). */
// @ts-ignore: decorator
@inline function madd(acc: v128, a: v128, b: v128): v128 {
  return f32x4.add(acc, f32x4.mul(a, b));
}

/** head = (s[0] + s[1]) + (s[2] + s[3]) with s = a + b; then head + tail. */
// @ts-ignore: decorator
@inline function finish(a: v128, b: v128, tail: f32): f32 {
  const s = f32x4.add(a, b);
  const head = (f32x4.extract_lane(s, 0) + f32x4.extract_lane(s, 1)) + (f32x4.extract_lane(s, 2) + f32x4.extract_lane(s, 3));
  return head + tail;
}

/** The columns n8..cols-1 of one dot product, in order. */
// @ts-ignore: decorator
@inline function tailDot(dt: i32, row: usize, x: usize, n8: i32, cols: i32): f32 {
  let tail: f32 = 0;
  for (let c = n8; c < cols; c++) tail += wAt(dt, row, c) * load<f32>(x + (<usize>c << 2));
  return tail;
}

/** y[t, r] for one row and one token (x rearranged): the definition every other kernel reproduces. */
// @ts-ignore: decorator
@inline function dot1x1(dt: i32, row: usize, x: usize, cols: i32): f32 {
  const n8 = cols & ~7;
  let a = f32x4.splat(0);
  let b = f32x4.splat(0);
  for (let c = 0; c < n8; c += 8) {
    const p = row + (<usize>c << sizeLog2(dt));
    const q = x + (<usize>c << 2);
    a = madd(a, wEven(dt, p), v128.load(q));
    b = madd(b, wOdd(dt, p), v128.load(q, 16));
  }
  return finish(a, b, tailDot(dt, row, x, n8, cols));
}

/**
 * Matrix-vector (one token, x already rearranged): rows in groups of 4, each of the 4 rows with its
 * own two accumulators, sharing the loads of x; the last rows % 4 rows one at a time. The weights
 * stream from memory once.
 */
// @ts-ignore: decorator
@inline function matvec(dt: i32, w: usize, x: usize, y: usize, rows: i32, cols: i32): void {
  const n8 = cols & ~7;
  const rowBytes = <usize>cols << sizeLog2(dt);
  let r = 0;
  for (; r + 4 <= rows; r += 4) {
    const w0 = w + <usize>r * rowBytes;
    const w1 = w0 + rowBytes;
    const w2 = w1 + rowBytes;
    const w3 = w2 + rowBytes;
    let a0 = f32x4.splat(0), b0 = f32x4.splat(0);
    let a1 = f32x4.splat(0), b1 = f32x4.splat(0);
    let a2 = f32x4.splat(0), b2 = f32x4.splat(0);
    let a3 = f32x4.splat(0), b3 = f32x4.splat(0);
    for (let c = 0; c < n8; c += 8) {
      const off = <usize>c << sizeLog2(dt);
      const q = x + (<usize>c << 2);
      const xl = v128.load(q);
      const xh = v128.load(q, 16);
      a0 = madd(a0, wEven(dt, w0 + off), xl);
      b0 = madd(b0, wOdd(dt, w0 + off), xh);
      a1 = madd(a1, wEven(dt, w1 + off), xl);
      b1 = madd(b1, wOdd(dt, w1 + off), xh);
      a2 = madd(a2, wEven(dt, w2 + off), xl);
      b2 = madd(b2, wOdd(dt, w2 + off), xh);
      a3 = madd(a3, wEven(dt, w3 + off), xl);
      b3 = madd(b3, wOdd(dt, w3 + off), xh);
    }
    const out = y + (<usize>r << 2);
    store<f32>(out, finish(a0, b0, tailDot(dt, w0, x, n8, cols)));
    store<f32>(out, finish(a1, b1, tailDot(dt, w1, x, n8, cols)), 4);
    store<f32>(out, finish(a2, b2, tailDot(dt, w2, x, n8, cols)), 8);
    store<f32>(out, finish(a3, b3, tailDot(dt, w3, x, n8, cols)), 12);
  }
  for (; r < rows; r++) store<f32>(y + (<usize>r << 2), dot1x1(dt, w + <usize>r * rowBytes, x, cols));
}

/** Row `src` (cols elements of type dt) widened to float32 at `dst`, each group of 8 as even then odd columns. */
// @ts-ignore: decorator
@inline function widenRow(dt: i32, src: usize, dst: usize, cols: i32): void {
  const n8 = cols & ~7;
  for (let c = 0; c < n8; c += 8) {
    const p = src + (<usize>c << sizeLog2(dt));
    const q = dst + (<usize>c << 2);
    v128.store(q, wEven(dt, p));
    v128.store(q, wOdd(dt, p), 16);
  }
  for (let c = n8; c < cols; c++) store<f32>(dst + (<usize>c << 2), wAt(dt, src, c));
}

/**
 * Matrix-matrix (T tokens). Tokens go in blocks whose inputs fit in a core's L2 cache (about
 * 512 KiB of x). Within a block, rows go in pairs: the pair is widened to float32 once into
 * scratch (in the even / odd layout; float32 rows are rearranged alike), then meets the block's tokens
 * two at a time (a 2x2 tile: 8 accumulators, few enough for the 16 vector registers of x86-64), so
 * the weights are read from memory and widened once per block. An odd last token
 * is a 2x1 tile, an odd last row 1x1 tiles; every entry keeps the summation order at the top.
 */
// @ts-ignore: decorator
@inline function matmul(dt: i32, w: usize, xIn: usize, y: usize, rows: i32, cols: i32, T: i32, scratch: usize): void {
  const x = scratch; // the rearranged input, then the widened pair of rows
  const pair = scratch + <usize>T * (<usize>cols << 2);
  rearrangeInput(xIn, x, cols, T);
  if (T == 1) {
    matvec(dt, w, x, y, rows, cols);
    return;
  }
  const n8 = cols & ~7;
  const rowBytes = <usize>cols << sizeLog2(dt);
  const xBytes = <usize>cols << 2;
  let block = <i32>(<usize>(512 * 1024) / xBytes) & ~1;
  if (block < 2) block = 2;
  for (let t0 = 0; t0 < T; t0 += block) {
    const t1 = min(T, t0 + block);
    let r = 0;
    for (; r + 2 <= rows; r += 2) {
      widenRow(dt, w + <usize>r * rowBytes, pair, cols);
      widenRow(dt, w + <usize>(r + 1) * rowBytes, pair + xBytes, cols);
      const w0 = pair;
      const w1 = pair + xBytes;
      // w0 and w1: float32 rows in the even / odd layout of x.
      let t = t0;
      for (; t + 2 <= t1; t += 2) {
        const x0 = x + <usize>t * xBytes;
        const x1 = x0 + xBytes;
        let a00 = f32x4.splat(0), b00 = f32x4.splat(0); // row 0, token 0
        let a01 = f32x4.splat(0), b01 = f32x4.splat(0); // row 0, token 1
        let a10 = f32x4.splat(0), b10 = f32x4.splat(0); // row 1, token 0
        let a11 = f32x4.splat(0), b11 = f32x4.splat(0); // row 1, token 1
        for (let c = 0; c < n8; c += 8) {
          const off = <usize>c << 2;
          const x0l = v128.load(x0 + off), x0h = v128.load(x0 + off, 16);
          const x1l = v128.load(x1 + off), x1h = v128.load(x1 + off, 16);
          const w0l = v128.load(w0 + off);
          a00 = madd(a00, w0l, x0l);
          a01 = madd(a01, w0l, x1l);
          const w0h = v128.load(w0 + off, 16);
          b00 = madd(b00, w0h, x0h);
          b01 = madd(b01, w0h, x1h);
          const w1l = v128.load(w1 + off);
          a10 = madd(a10, w1l, x0l);
          a11 = madd(a11, w1l, x1l);
          const w1h = v128.load(w1 + off, 16);
          b10 = madd(b10, w1h, x0h);
          b11 = madd(b11, w1h, x1h);
        }
        const y0 = y + ((<usize>t * <usize>rows + <usize>r) << 2); // y[t, r]
        const y1 = y0 + (<usize>rows << 2); //                           y[t + 1, r]
        store<f32>(y0, finish(a00, b00, tailDot(F32, w0, x0, n8, cols)));
        store<f32>(y1, finish(a01, b01, tailDot(F32, w0, x1, n8, cols)));
        store<f32>(y0, finish(a10, b10, tailDot(F32, w1, x0, n8, cols)), 4);
        store<f32>(y1, finish(a11, b11, tailDot(F32, w1, x1, n8, cols)), 4);
      }
      if (t < t1) {
        // The block's odd last token: a 2x1 tile.
        const x0 = x + <usize>t * xBytes;
        let a0 = f32x4.splat(0), b0 = f32x4.splat(0);
        let a1 = f32x4.splat(0), b1 = f32x4.splat(0);
        for (let c = 0; c < n8; c += 8) {
          const off = <usize>c << 2;
          const xl = v128.load(x0 + off), xh = v128.load(x0 + off, 16);
          a0 = madd(a0, v128.load(w0 + off), xl);
          b0 = madd(b0, v128.load(w0 + off, 16), xh);
          a1 = madd(a1, v128.load(w1 + off), xl);
          b1 = madd(b1, v128.load(w1 + off, 16), xh);
        }
        const y0 = y + ((<usize>t * <usize>rows + <usize>r) << 2);
        store<f32>(y0, finish(a0, b0, tailDot(F32, w0, x0, n8, cols)));
        store<f32>(y0, finish(a1, b1, tailDot(F32, w1, x0, n8, cols)), 4);
      }
    }
    if (r < rows) {
      // The odd last row: 1x1 for each token of the block.
      const w0 = w + <usize>r * rowBytes;
      for (let t = t0; t < t1; t++) {
        store<f32>(y + ((<usize>t * <usize>rows + <usize>r) << 2), dot1x1(dt, w0, x + <usize>t * xBytes, cols));
      }
    }
  }
}

/** y = W x for T tokens of float32 input, W in bf16. See the top of the file for layouts and order. */
export function matmul_bf16(w: usize, x: usize, y: usize, rows: i32, cols: i32, T: i32, scratch: usize): void {
  matmul(BF16, w, x, y, rows, cols, T, scratch);
}

/** y = W x for T tokens of float32 input, W in f16 (IEEE binary16). */
export function matmul_f16(w: usize, x: usize, y: usize, rows: i32, cols: i32, T: i32, scratch: usize): void {
  matmul(F16, w, x, y, rows, cols, T, scratch);
}

/** y = W x for T tokens of float32 input, W in float32. */
export function matmul_f32(w: usize, x: usize, y: usize, rows: i32, cols: i32, T: i32, scratch: usize): void {
  matmul(F32, w, x, y, rows, cols, T, scratch);
}

// ---------------------------------------------------------------------------------------------
// Q8_0 weights (llama.cpp's values, in panels of 4 rows) with int16-quantized activations.
//
// Layouts
//   W  [rows, cols], cols a multiple of 32, nb = cols / 32 blocks per row. llama.cpp's block_q8_0
//      (an f16 scale d, then 32 int8 q; W[r, 32b + i] = d * q[i]) is repacked by the host (the pool)
//      into panels of 4 rows: panel p holds rows 4p .. 4p+3 (places past `rows` are never stored) and, for
//      each block b in order, 144 bytes: the 4 rows' scales d as float32 (decoded from f16 exactly),
//      then the 4 rows' 32 q each (row 4p+k at byte 16 + 32k). Panel p at w + p * nb * 144. The
//      values are llama.cpp's; only their places change, so that a block's loads are aligned and
//      the 4 rows' scales come in one load.
//   x  [T, cols] float32 as above; y [T, rows] float32 as above.
//   scratch  the quantized input: T * cols int16 (token t's at scratch + t * cols * 2), then T *
//            nb float32 scales, then 160 bytes of accumulators; under (T + 1) * cols * 4 bytes
//            for cols >= 32 (the pool gives (T + 2) * cols * 4).
//
// Activation quantization, per token and block of 32 values x[0..31] (float32 arithmetic):
//   amax = max |x[i]|;  dx = amax / 32767 (one rounded division);
//   if dx == 0: every xq[i] = 0 (and dx = 0), else xq[i] = nearest(x[i] / dx) as int16, the division
//   rounded to float32 and then rounded to an integer, ties to even (|x[i] / dx| <= 32767.002, so
//   the result is within int16; a saturating conversion guards the bound anyway).
//   Non-finite inputs are not meaningful here (amax = inf gives dx = inf and q = 0 or NaN -> 0).
//
// The product, per row r and token t, blocks b = 0 .. nb - 1 in increasing order:
//   P    = sum over i = 0..31 of wq[i] * xq[i]: an exact int32 (|P| <= 32 * 128 * 32767 < 2^31; computed
//          with i32x4.dot_i16x8_s on the int8 widened to int16, in any order, being integer)
//   s    = d_w * dx                            (rounded to float32)
//   acc  = acc + s * float32(P)                (P converted with rounding to nearest even, then the
//                                               product rounded, then the sum rounded; no fma)
//   with acc = 0 before block 0; y[t, r] = acc.
// So each output depends only on its row and its token's input: the same bits whichever thread
// computes the row, in whichever panel order, and whatever T is.
//
// Speed: the panels are walked several at a time, far apart in the matrix (several streams from
// memory at once); one stream at a time left the core waiting on memory (about 0.55x as fast).
// V8's compiler emits a block's loads in a run before the arithmetic that uses them, so a
// straight-line block over 8 panels held 128 loaded vectors at once and spilled most to the
// stack: 108 instructions per panel and block. So the accumulators live in memory, and each
// row's partial sum is stored as it is made, which makes V8 finish a row before loading the
// next: 72 instructions, no spills; 1.4x as fast in decode, 1.2x in prefill (at 7B shapes,
// 2 threads; the machine code is printed by `node --no-liftoff --print-wasm-code`).

const Q8_PANEL_BLOCK: usize = 144; // bytes of one block of a 4-row panel: 4 float32 scales, 4 x 32 int8

/** Quantizes x [T, cols] (cols a multiple of 32) into xq (int16) and its per-block scales dxs, as stated above. */
// @ts-ignore: decorator
@inline function quantizeInput(x: usize, xq: usize, dxs: usize, cols: i32, T: i32): void {
  const n = <usize>T * <usize>cols; // values
  for (let i: usize = 0; i < n; i += 32) {
    const p = x + (i << 2);
    const v0 = v128.load(p), v1 = v128.load(p, 16), v2 = v128.load(p, 32), v3 = v128.load(p, 48);
    const v4 = v128.load(p, 64), v5 = v128.load(p, 80), v6 = v128.load(p, 96), v7 = v128.load(p, 112);
    const m = f32x4.max(
      f32x4.max(f32x4.max(f32x4.abs(v0), f32x4.abs(v1)), f32x4.max(f32x4.abs(v2), f32x4.abs(v3))),
      f32x4.max(f32x4.max(f32x4.abs(v4), f32x4.abs(v5)), f32x4.max(f32x4.abs(v6), f32x4.abs(v7))),
    );
    const amax = max(max(f32x4.extract_lane(m, 0), f32x4.extract_lane(m, 1)), max(f32x4.extract_lane(m, 2), f32x4.extract_lane(m, 3)));
    const dx: f32 = amax / <f32>32767;
    const q = xq + (i << 1);
    store<f32>(dxs + ((i >> 5) << 2), dx);
    if (dx == 0) {
      const z = i32x4.splat(0);
      v128.store(q, z); v128.store(q, z, 16); v128.store(q, z, 32); v128.store(q, z, 48);
      continue;
    }
    const d = f32x4.splat(dx);
    v128.store(q, i16x8.narrow_i32x4_s(toInt(v0, d), toInt(v1, d)));
    v128.store(q, i16x8.narrow_i32x4_s(toInt(v2, d), toInt(v3, d)), 16);
    v128.store(q, i16x8.narrow_i32x4_s(toInt(v4, d), toInt(v5, d)), 32);
    v128.store(q, i16x8.narrow_i32x4_s(toInt(v6, d), toInt(v7, d)), 48);
  }
}

/** nearest(v / d) as int32 lanes (ties to even; NaN -> 0, out of range saturated). */
// @ts-ignore: decorator
@inline function toInt(v: v128, d: v128): v128 {
  return i32x4.trunc_sat_f32x4_s(f32x4.nearest(f32x4.div(v, d)));
}

/** Four int32 lanes whose sum is P of one block: 32 int8 at `wq`, the block's int16 input in x0..x3. */
// @ts-ignore: decorator
@inline function blockDot(wq: usize, x0: v128, x1: v128, x2: v128, x3: v128): v128 {
  // v128.load8x8_s: 8 int8 loaded and widened to int16 in one instruction.
  const a = i32x4.add(i32x4.dot_i16x8_s(v128.load8x8_s(wq), x0), i32x4.dot_i16x8_s(v128.load8x8_s(wq, 8), x1));
  const b = i32x4.add(i32x4.dot_i16x8_s(v128.load8x8_s(wq, 16), x2), i32x4.dot_i16x8_s(v128.load8x8_s(wq, 24), x3));
  return i32x4.add(a, b);
}

/** The four lanes of each of p0..p3 summed: [sum p0, sum p1, sum p2, sum p3] (exact, integer). */
// @ts-ignore: decorator
@inline function sum4x4(p0: v128, p1: v128, p2: v128, p3: v128): v128 {
  const a = i32x4.add(v128.shuffle<i32>(p0, p1, 0, 1, 4, 5), v128.shuffle<i32>(p0, p1, 2, 3, 6, 7));
  const b = i32x4.add(v128.shuffle<i32>(p2, p3, 0, 1, 4, 5), v128.shuffle<i32>(p2, p3, 2, 3, 6, 7));
  return i32x4.add(v128.shuffle<i32>(a, b, 0, 2, 4, 6), v128.shuffle<i32>(a, b, 1, 3, 5, 7));
}

/** Stores panel `p`'s four outputs at out = &y[t, 4p]: the rows that exist (rows may end mid-panel). */
// @ts-ignore: decorator
@inline function storePanel(out: usize, acc: v128, p: i32, rows: i32): void {
  const left = rows - (p << 2);
  if (left >= 4) {
    v128.store(out, acc);
    return;
  }
  store<f32>(out, f32x4.extract_lane(acc, 0));
  if (left > 1) store<f32>(out, f32x4.extract_lane(acc, 1), 4);
  if (left > 2) store<f32>(out, f32x4.extract_lane(acc, 2), 8);
}

/**
 * One block of one panel (at `p`) for one token: lane k of the accumulator at `accAt` (row 4p+k)
 * plus s_k * P_k, with the block's input in x0..x3 and its scale dx splatted in `dx`. Each row's P
 * is stored to `slot` as soon as it is computed, for V8's sake (see "Speed" above).
 */
// @ts-ignore: decorator
@inline function panelBlockStep(p: usize, x0: v128, x1: v128, x2: v128, x3: v128, dx: v128, accAt: usize, slot: usize): void {
  const p0 = blockDot(p + 16, x0, x1, x2, x3);
  v128.store(slot, p0);
  const p1 = blockDot(p + 48, x0, x1, x2, x3);
  v128.store(slot, p1);
  const p2 = blockDot(p + 80, x0, x1, x2, x3);
  v128.store(slot, p2);
  const p3 = blockDot(p + 112, x0, x1, x2, x3);
  const s = f32x4.mul(f32x4.mul(v128.load(p), dx), f32x4.convert_i32x4_s(sum4x4(p0, p1, p2, p3)));
  v128.store(accAt, f32x4.add(v128.load(accAt), s));
}

/**
 * One token's products with `streams` panels (w0, w0 + stride, ...; streams from memory at once),
 * all blocks b = 0 .. nb - 1 in order: panel k's four outputs end in accs + 16k (the accumulators
 * live in memory: in registers, with the input's four, they left too few for the rows' loads).
 */
// @ts-ignore: decorator
@inline function panelsDot(w0: usize, stride: usize, streams: i32, xt: usize, dt: usize, nb: i32, accs: usize): void {
  const slot = accs + 128;
  const end = accs + (<usize>streams << 4);
  for (let a = accs; a < end; a += 16) v128.store(a, f32x4.splat(0));
  for (let b = 0; b < nb; b++) {
    const at = w0 + <usize>b * Q8_PANEL_BLOCK;
    const xb = xt + (<usize>b << 6);
    const x0 = v128.load(xb), x1 = v128.load(xb, 16), x2 = v128.load(xb, 32), x3 = v128.load(xb, 48);
    const dx = v128.load32_splat(dt + (<usize>b << 2));
    panelBlockStep(at, x0, x1, x2, x3, dx, accs, slot);
    if (streams >= 4) { // streams is a constant where this is inlined: written out, the panels run faster than in a loop
      panelBlockStep(at + stride, x0, x1, x2, x3, dx, accs + 16, slot);
      panelBlockStep(at + 2 * stride, x0, x1, x2, x3, dx, accs + 32, slot);
      panelBlockStep(at + 3 * stride, x0, x1, x2, x3, dx, accs + 48, slot);
    }
    if (streams == 8) {
      panelBlockStep(at + 4 * stride, x0, x1, x2, x3, dx, accs + 64, slot);
      panelBlockStep(at + 5 * stride, x0, x1, x2, x3, dx, accs + 80, slot);
      panelBlockStep(at + 6 * stride, x0, x1, x2, x3, dx, accs + 96, slot);
      panelBlockStep(at + 7 * stride, x0, x1, x2, x3, dx, accs + 112, slot);
    }
  }
}

/**
 * y = W x for T tokens of float32 input, W in Q8_0 panels (see above). The T inputs are quantized
 * once. One token (decode) walks the panels eight at a time, an eighth of the matrix apart (eight
 * streams from memory). More tokens go in blocks whose quantized inputs fit a core's L2 cache
 * (about 512 KiB), and each group of four panels meets every token of the block while it is in
 * cache, so the weights are read from memory once per block of tokens. Panels left over after the
 * groups go one at a time. Every output is the same sum whichever way it is reached.
 */
export function matmul_q8_0(w: usize, x: usize, y: usize, rows: i32, cols: i32, T: i32, scratch: usize): void {
  const nb = cols >> 5;
  const xq = scratch;
  const xRow = <usize>cols << 1; // bytes of one token's quantized input
  const dxs = scratch + <usize>T * xRow;
  const accs = (dxs + ((<usize>T * <usize>nb) << 2) + 15) & ~15; // 8 accumulators and a slot: 144 bytes
  quantizeInput(x, xq, dxs, cols, T);
  const panelBytes = <usize>nb * Q8_PANEL_BLOCK;
  const panels = (rows + 3) >> 2;
  const streams = T == 1 ? 8 : 4;
  const group = panels / streams; // panels p, p + group, p + 2 group, ... go together
  const stride = <usize>group * panelBytes;
  const yRow = <usize>rows << 2;
  let block = <i32>(<usize>(512 * 1024) / xRow);
  if (block < 1) block = 1;
  for (let t0 = 0; t0 < T; t0 += block) {
    const t1 = min(T, t0 + block);
    for (let p = 0; p < group; p++) {
      for (let t = t0; t < t1; t++) {
        const xt = xq + <usize>t * xRow, dt = dxs + ((<usize>t * <usize>nb) << 2);
        if (T == 1) panelsDot(w + <usize>p * panelBytes, stride, 8, xt, dt, nb, accs);
        else panelsDot(w + <usize>p * panelBytes, stride, 4, xt, dt, nb, accs);
        const out = y + <usize>t * yRow + (<usize>p << 4);
        const g4 = <usize>group << 4; // bytes of y between the panels' outputs
        for (let k = 0; k < streams; k++) storePanel(out + <usize>k * g4, v128.load(accs + (<usize>k << 4)), p + k * group, rows);
      }
    }
    for (let p = group * streams; p < panels; p++) {
      for (let t = t0; t < t1; t++) {
        panelsDot(w + <usize>p * panelBytes, 0, 1, xq + <usize>t * xRow, dxs + ((<usize>t * <usize>nb) << 2), nb, accs);
        storePanel(y + <usize>t * yRow + (<usize>p << 4), v128.load(accs), p, rows);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Quantizing float weights to Q8_0 panels while loading (`--quantize q8_0`), as llama.cpp's
// quantize_row_q8_0_ref does, in float32, per row and block of 32 values x[0..31]:
//   amax = max |x[i]|;  d = amax / 127;  id = d != 0 ? 1 / d : 0  (each rounded to float32)
//   q[i] = roundf(x[i] * id): the product rounded to float32, then to the nearest integer with
//          halves away from zero;  the scale kept is d rounded to f16 (nearest even), as llama.cpp
//          stores it (the panel holds that f16 value as float32, exactly).
// NaN weights make the result meaningless here, as in llama.cpp (the loader warns about them).

/** Eight values of row `p` (element type dt) from column c as two float32x4, in column order. */
// @ts-ignore: decorator
@inline function load8(dt: i32, p: usize, c: i32, hi: bool): v128 {
  if (dt == F32) return v128.load(p + (<usize>c << 2) + (hi ? 16 : 0));
  const h = hi ? i32x4.extend_high_i16x8_u(v128.load(p + (<usize>c << 1))) : i32x4.extend_low_i16x8_u(v128.load(p + (<usize>c << 1)));
  if (dt == BF16) return i32x4.shl(h, 16);
  return f16ToF32Bits(h);
}

/** roundf(v) lanewise: truncate, then move halves and more away from zero (exact: |v| <= 127.5 here). */
// @ts-ignore: decorator
@inline function roundAway(v: v128): v128 {
  const t = f32x4.trunc(v);
  const frac = f32x4.abs(f32x4.sub(v, t));
  const one = v128.or(v128.and(v, i32x4.splat(0x80000000)), f32x4.splat(1)); // copysign(1, v)
  return f32x4.add(t, v128.and(one, f32x4.ge(frac, f32x4.splat(0.5))));
}

/** 8 float32 (two vectors) times id, rounded as roundf, as 8 int8 at `out`. */
// @ts-ignore: decorator
@inline function quantize8(a: v128, b: v128, id: v128, out: usize): void {
  const qa = i32x4.trunc_sat_f32x4_s(roundAway(f32x4.mul(a, id)));
  const qb = i32x4.trunc_sat_f32x4_s(roundAway(f32x4.mul(b, id)));
  const q16 = i16x8.narrow_i32x4_s(qa, qb);
  v128.store64_lane(out, i8x16.narrow_i16x8_s(q16, q16), 0);
}

/** max |v| over the 32 values of a row's block at `p` + column c (dt elements), as 4 lanes to be maxed. */
// @ts-ignore: decorator
@inline function absMax32(dt: i32, row: usize, c: i32): v128 {
  const m0 = f32x4.max(f32x4.abs(load8(dt, row, c, false)), f32x4.abs(load8(dt, row, c, true)));
  const m1 = f32x4.max(f32x4.abs(load8(dt, row, c + 8, false)), f32x4.abs(load8(dt, row, c + 8, true)));
  const m2 = f32x4.max(f32x4.abs(load8(dt, row, c + 16, false)), f32x4.abs(load8(dt, row, c + 16, true)));
  const m3 = f32x4.max(f32x4.abs(load8(dt, row, c + 24, false)), f32x4.abs(load8(dt, row, c + 24, true)));
  return f32x4.max(f32x4.max(m0, m1), f32x4.max(m2, m3));
}

/** [max of m0's lanes, of m1's, of m2's, of m3's] (max is exact: any order gives the same). */
// @ts-ignore: decorator
@inline function max4x4(m0: v128, m1: v128, m2: v128, m3: v128): v128 {
  const a = f32x4.max(v128.shuffle<f32>(m0, m1, 0, 1, 4, 5), v128.shuffle<f32>(m0, m1, 2, 3, 6, 7));
  const b = f32x4.max(v128.shuffle<f32>(m2, m3, 0, 1, 4, 5), v128.shuffle<f32>(m2, m3, 2, 3, 6, 7));
  return f32x4.max(v128.shuffle<f32>(a, b, 0, 2, 4, 6), v128.shuffle<f32>(a, b, 1, 3, 5, 7));
}

/**
 * d (>= 0 or NaN, float32 lanes) rounded to the nearest f16 value, ties to even, as float32: the
 * mantissa rounded to 10 bits for normal f16 (d >= 2^-14; a carry moves into the exponent), to a
 * multiple of 2^-24 below (d + 0.5 - 0.5, exact but for that rounding), 2^16 and up to infinity
 * (f16's largest is 65504), NaN kept. The same values as converting d to f16 bits and back.
 */
// @ts-ignore: decorator
@inline function roundToF16(d: v128): v128 {
  const odd = v128.and(i32x4.shr_u(d, 13), i32x4.splat(1));
  const normal = v128.and(i32x4.add(d, i32x4.add(i32x4.splat(0xfff), odd)), i32x4.splat(0xffffe000));
  const small = f32x4.sub(f32x4.add(d, f32x4.splat(0.5)), f32x4.splat(0.5));
  let r = v128.bitselect(normal, small, f32x4.ge(d, f32x4.splat(6.103515625e-5))); // 2^-14
  r = v128.bitselect(f32x4.splat(Infinity), r, f32x4.ge(r, f32x4.splat(65536)));
  return v128.bitselect(d, r, f32x4.ne(d, d));
}

/** Row k (0..3) of a panel's block: its 32 values at row + c times id, rounded, as int8 at `q`. */
// @ts-ignore: decorator
@inline function quantizeBlockRow(dt: i32, row: usize, c: i32, id: v128, q: usize): void {
  quantize8(load8(dt, row, c, false), load8(dt, row, c, true), id, q);
  quantize8(load8(dt, row, c + 8, false), load8(dt, row, c + 8, true), id, q + 8);
  quantize8(load8(dt, row, c + 16, false), load8(dt, row, c + 16, true), id, q + 16);
  quantize8(load8(dt, row, c + 24, false), load8(dt, row, c + 24, true), id, q + 24);
}

/**
 * Quantizes `rows` rows of `cols` values (element type dt: 0 bf16, 1 f16, 2 f32) at `src` into Q8_0
 * panels at `dst` (the layout of matmul_q8_0), as stated above. Row i goes to panel i / 4, place
 * i % 4: `dst` is the panel of the first row. The places of a last, partial panel past `rows` get
 * zero scales and zero q. The four rows of a panel go together, so that d, 1 / d and the f16
 * rounding of each block are done for the four at once, in vector lanes.
 */
export function quantize_q8_0(src: usize, dt: i32, rows: i32, cols: i32, dst: usize): void {
  const nb = cols >> 5;
  const panelBytes = <usize>nb * Q8_PANEL_BLOCK;
  const rowBytes = <usize>cols << sizeLog2(dt);
  const zero = f32x4.splat(0);
  for (let r0 = 0; r0 < rows; r0 += 4) {
    const panel = dst + <usize>(r0 >> 2) * panelBytes;
    const row0 = src + <usize>r0 * rowBytes;
    const have = min(4, rows - r0); // rows of this panel that exist
    for (let b = 0; b < nb; b++) {
      const at = panel + <usize>b * Q8_PANEL_BLOCK;
      const c = b << 5;
      const amax = max4x4(
        absMax32(dt, row0, c),
        have > 1 ? absMax32(dt, row0 + rowBytes, c) : zero,
        have > 2 ? absMax32(dt, row0 + 2 * rowBytes, c) : zero,
        have > 3 ? absMax32(dt, row0 + 3 * rowBytes, c) : zero,
      );
      const d = f32x4.div(amax, f32x4.splat(127));
      const id = v128.andnot(f32x4.div(f32x4.splat(1), d), f32x4.eq(d, zero)); // 1 / d, or 0 where d == 0
      v128.store(at, roundToF16(d));
      quantizeBlockRow(dt, row0, c, v128.shuffle<f32>(id, id, 0, 0, 0, 0), at + 16);
      if (have > 1) quantizeBlockRow(dt, row0 + rowBytes, c, v128.shuffle<f32>(id, id, 1, 1, 1, 1), at + 48);
      else { v128.store(at + 48, zero); v128.store(at + 64, zero); }
      if (have > 2) quantizeBlockRow(dt, row0 + 2 * rowBytes, c, v128.shuffle<f32>(id, id, 2, 2, 2, 2), at + 80);
      else { v128.store(at + 80, zero); v128.store(at + 96, zero); }
      if (have > 3) quantizeBlockRow(dt, row0 + 3 * rowBytes, c, v128.shuffle<f32>(id, id, 3, 3, 3, 3), at + 112);
      else { v128.store(at + 112, zero); v128.store(at + 128, zero); }
    }
  }
}

/**
 * Reads `bytes` bytes from `p` (a multiple of 64) as fast as the core can, for the bandwidth bound
 * the bench compares the products with; returns a value that depends on every byte, so the reads
 * cannot be optimized away.
 */
export function scan(p: usize, bytes: usize): i32 {
  let s0 = i32x4.splat(0), s1 = i32x4.splat(0), s2 = i32x4.splat(0), s3 = i32x4.splat(0);
  const end = p + (bytes & ~(<usize>63));
  for (let q = p; q < end; q += 64) {
    s0 = i32x4.add(s0, v128.load(q));
    s1 = i32x4.add(s1, v128.load(q, 16));
    s2 = i32x4.add(s2, v128.load(q, 32));
    s3 = i32x4.add(s3, v128.load(q, 48));
  }
  const s = i32x4.add(i32x4.add(s0, s1), i32x4.add(s2, s3));
  return i32x4.extract_lane(s, 0) ^ i32x4.extract_lane(s, 1) ^ i32x4.extract_lane(s, 2) ^ i32x4.extract_lane(s, 3);
}

/**
 * For the bench (bench/kernels.ts): the arithmetic ceiling of these kernels. `iters` rounds of 8
 * independent float32x4 multiply-then-add chains held in registers, 64 floating-point operations a
 * round (SIMD128 has no fused multiply-add); returns a value that depends on every chain.
 */
export function peak_f32(iters: i32): f32 {
  const m = f32x4.splat(0.999999);
  const c = f32x4.splat(1e-7);
  let a0 = f32x4.splat(1), a1 = f32x4.splat(2), a2 = f32x4.splat(3), a3 = f32x4.splat(4);
  let a4 = f32x4.splat(5), a5 = f32x4.splat(6), a6 = f32x4.splat(7), a7 = f32x4.splat(8);
  for (let i = 0; i < iters; i++) {
    a0 = f32x4.add(f32x4.mul(a0, m), c); a1 = f32x4.add(f32x4.mul(a1, m), c);
    a2 = f32x4.add(f32x4.mul(a2, m), c); a3 = f32x4.add(f32x4.mul(a3, m), c);
    a4 = f32x4.add(f32x4.mul(a4, m), c); a5 = f32x4.add(f32x4.mul(a5, m), c);
    a6 = f32x4.add(f32x4.mul(a6, m), c); a7 = f32x4.add(f32x4.mul(a7, m), c);
  }
  const s = f32x4.add(f32x4.add(f32x4.add(a0, a1), f32x4.add(a2, a3)), f32x4.add(f32x4.add(a4, a5), f32x4.add(a6, a7)));
  return f32x4.extract_lane(s, 0) + f32x4.extract_lane(s, 3);
}
