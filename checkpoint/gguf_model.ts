/**
 * A .gguf file as a model: its hyperparameters, its weights under the reference's names, and its
 * tokenizer rebuilt from the metadata, so the file alone runs (openModel's GGUF branch).
 */
import { sentencePieceFromGguf } from '../tokenizer/from_gguf';
import { openGguf } from './gguf';
import type { MistralParams } from './hf';
import type { WeightReader } from './types';

export interface GgufModel {
  params: MistralParams;
  paramsFile: string;
  weights: WeightReader;
  tokenizer: { bytes: Uint8Array; name: string };
  /** Notes for stderr (defaults taken for missing metadata). */
  warnings: readonly string[];
}

export function openGgufModel(modelPath: string): GgufModel {
  const gguf = openGguf(modelPath);
  try {
    const bytes = sentencePieceFromGguf(gguf.vocab(), modelPath);
    return {
      params: gguf.params,
      paramsFile: `${modelPath} (metadata)`,
      weights: gguf,
      tokenizer: { bytes, name: `${modelPath} (tokenizer.ggml metadata)` },
      warnings: gguf.warnings,
    };
  } catch (err) {
    gguf.close();
    throw err;
  }
}
