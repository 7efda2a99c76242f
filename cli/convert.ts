/**
 * `convert MODEL --out FILE.gguf [--type f32|f16|bf16|q8_0]`: any model layout the port reads, written
 * as a llama-architecture GGUF v3 file that llama.cpp (and node-llama-cpp) load, with the tokenizer
 * in its metadata. One tensor is held at a time.
 *
 * As llama.cpp's converter does, the 1-D norm weights stay F32 whatever --type says; the matrices
 * (embedding and output included) take --type. Q/K rows are written in the reference's order, the
 * order GGUF files have (see checkpoint/gguf.ts).
 */
import * as fs from 'fs';
import * as path from 'path';
import { openModel } from '../checkpoint';
import { CheckpointError } from '../checkpoint/errors';
import type { GgmlTypeName } from '../checkpoint/gguf';
import { ggufName } from '../checkpoint/gguf';
import { encodeFloats, llamaMetadata, quantizeQ8_0, writeGguf, type GgufTensorToWrite } from '../checkpoint/gguf_write';
import type { MistralParams } from '../checkpoint/hf';
import { ggufVocabFromSentencePiece } from '../tokenizer/from_gguf';
import { ModelArgs, stateDictShapes } from '../one_file_ref';
import { modelPath, parseCommandLine, UsageError } from './args';

export const CONVERT_HELP = `  npx ts-node one_file_ref.ts convert MODEL --out FILE.gguf [--type f32|f16|bf16|q8_0]
      Writes the model as a GGUF file (llama.cpp's format) with its tokenizer; norms stay f32.
      --type T        the matrices' type (default f16); q8_0 as llama.cpp quantizes it
`;

const OPTIONS = {
  out: { type: 'string' },
  type: { type: 'string' },
} as const;

const TYPES: Record<string, GgmlTypeName> = { f32: 'F32', f16: 'F16', bf16: 'BF16', q8_0: 'Q8_0' };

export async function convertCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  if (values.help) {
    process.stdout.write(`Usage:\n${CONVERT_HELP}`);
    return;
  }
  const model = modelPath(positionals);
  if (values.quantize !== undefined) throw new UsageError('convert takes --type q8_0; --quantize is for the commands that run the model');
  const out = values.out;
  if (out === undefined) throw new UsageError('convert needs --out FILE.gguf');
  const typeFlag = values.type ?? 'f16';
  const type = TYPES[typeFlag.toLowerCase()];
  if (type === undefined) throw new UsageError(`--type must be one of ${Object.keys(TYPES).join(', ')}, got "${typeFlag}"`);
  const dir = path.dirname(path.resolve(out));
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new UsageError(`--out ${out}: folder ${dir} does not exist`);
  if (fs.existsSync(out) && fs.statSync(out).isDirectory()) throw new UsageError(`--out ${out}: is a folder, expected a file path such as model.gguf`);
  if (path.resolve(out) === path.resolve(model)) throw new UsageError(`--out ${out}: is the model being converted`);

  const started = Date.now();
  const files = await openModel(model);
  try {
    const args = ModelArgs.fromParams(files.params, files.paramsFile);
    const params: MistralParams = {
      dim: args.dim,
      n_layers: args.nLayers,
      head_dim: args.headDim,
      hidden_dim: args.hiddenDim,
      n_heads: args.nHeads,
      n_kv_heads: args.nKvHeads,
      sliding_window: args.slidingWindow,
      norm_eps: args.normEps,
      vocab_size: args.vocabSize,
      rope_theta: args.ropeTheta,
    };
    const tokenizerBytes = 'bytes' in files.tokenizer ? files.tokenizer.bytes : fs.readFileSync(files.tokenizer.path);
    const tokenizerName = 'bytes' in files.tokenizer ? files.tokenizer.name : files.tokenizer.path;
    const vocab = ggufVocabFromSentencePiece(tokenizerBytes, tokenizerName);

    const tensors: GgufTensorToWrite[] = [];
    for (const [name, shape] of stateDictShapes(args)) {
      const info = files.weights.tensors.get(name);
      if (!info) throw new CheckpointError(files.weights.path, `missing weight "${name}" (${files.paramsFile} expects it)`);
      if (info.shape.join() !== shape.join()) {
        throw new CheckpointError(files.weights.path, `weight "${name}" has shape [${info.shape}], ${files.paramsFile} implies [${shape}]`);
      }
      let tensorType: GgmlTypeName = shape.length === 1 ? 'F32' : type;
      if (tensorType === 'Q8_0' && shape[shape.length - 1] % 32 !== 0) tensorType = 'F16'; // as llama.cpp falls back
      tensors.push({
        name: ggufName(name),
        shape,
        type: tensorType,
        data: () => {
          const values = files.weights.read(name);
          return tensorType === 'Q8_0' ? quantizeQ8_0(values) : encodeFloats(tensorType as 'F32' | 'F16' | 'BF16', values);
        },
      });
    }
    const metadata = llamaMetadata(path.basename(path.resolve(model)), params, vocab, type);
    const partial = `${out}.partial`;
    try {
      writeGguf(partial, metadata, tensors);
      fs.renameSync(partial, out);
    } catch (err) {
      fs.rmSync(partial, { force: true });
      const code = (err as NodeJS.ErrnoException).code;
      throw code === undefined ? err : new UsageError(`--out ${out}: cannot write the file (${code})`);
    }
    if (!values.quiet) {
      const size = fs.statSync(out).size;
      process.stderr.write(`wrote ${out}: ${tensors.length} tensors, ${type}, ${(size / 1e6).toFixed(1)} MB in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
    }
  } finally {
    files.close();
  }
}
