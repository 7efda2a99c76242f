/**
 * A .gguf file as a model: its hyperparameters, its weights under the reference's names, and its
 * tokenizer rebuilt from the metadata, so the file alone runs (openModel's GGUF branch).
 */
import { sentencePieceFromGguf } from '../tokenizer/from_gguf';
import { openGguf } from './gguf';
import { withProgress, type ModelFiles, type OpenModelOptions } from './index';

export function openGgufModel(modelPath: string, opts: OpenModelOptions = {}): ModelFiles {
  const gguf = openGguf(modelPath);
  try {
    const bytes = sentencePieceFromGguf(gguf.vocab(), modelPath);
    const weights = opts.onProgress ? withProgress(gguf, opts.onProgress) : gguf;
    return {
      format: 'gguf',
      path: modelPath,
      params: gguf.params,
      paramsFile: `${modelPath} (metadata)`,
      weights,
      tokenizer: { bytes, name: `${modelPath} (tokenizer.ggml metadata)` },
      warnings: gguf.warnings,
      close: () => weights.close(),
    };
  } catch (err) {
    gguf.close();
    throw err;
  }
}
