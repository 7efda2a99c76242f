/**
 * What every checkpoint reader gives the model: tensor names, dtypes and shapes up front, and each
 * tensor's data on request, either raw (as stored) or widened to float32.
 */

/** Tensor dtypes we can read as weights. */
export type WeightDtype = 'bfloat16' | 'float16' | 'float32';

export const BYTES_PER_ELEMENT: Readonly<Record<WeightDtype, number>> = { bfloat16: 2, float16: 2, float32: 4 };

/** Q8_0 (llama.cpp's, in GGUF files): blocks of 32 weights, each an f16 scale d then 32 int8 q; weight = d * q. */
export const Q8_0_BLOCK = 32;
export const Q8_0_BLOCK_BYTES = 34;

/** A tensor's description, known before its data is read. */
export interface WeightInfo {
  readonly dtype: WeightDtype;
  readonly shape: number[];
  /** Number of elements (product of shape; 1 for a 0-d tensor). */
  readonly numel: number;
  /** Stored as llama.cpp's Q8_0 blocks (GGUF): read() and readRaw() give it dequantized, as float32. */
  readonly q8_0?: boolean;
}

/** A tensor's data as stored: bfloat16 and float16 as their 16-bit patterns, float32 as is. */
export interface RawTensor {
  readonly dtype: WeightDtype;
  readonly shape: number[];
  readonly data: Uint16Array | Float32Array;
}

/** A source of named weights: a .pth, a .safetensors, a sharded Hugging Face folder, a tar... */
export interface WeightReader {
  /** Names the source in error messages. */
  readonly path: string;
  /** Every tensor, in the source's order. */
  readonly tensors: ReadonlyMap<string, WeightInfo>;
  /** Tensor `name` as stored. */
  readRaw(name: string): RawTensor;
  /**
   * Bytes [byteOffset, byteOffset + target.length) of tensor `name` as stored (row-major), read
   * straight into `target` (e.g. a compute pool's memory), for readers that can without a copy.
   */
  readRawInto?(name: string, byteOffset: number, target: Uint8Array): void;
  /** A tensor stored as Q8_0 (info.q8_0): its blocks as stored, 34 bytes per 32 weights, row after row. */
  readQ8_0Blocks?(name: string): Uint8Array;
  /** Tensor `name` widened to float32 (exact: bf16 and f16 values all fit). */
  read(name: string): Float32Array;
  /** Releases files and buffers; reads fail afterwards. */
  close(): void;
}
