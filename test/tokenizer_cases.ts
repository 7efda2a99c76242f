/**
 * The tokenizer models the tests run on and the case files fixtures/dump_tokenizer_cases.py wrote
 * for them with Python's sentencepiece (shared by the tokenizer, streaming, Instruct and CLI tests).
 * The genuine Mistral models are read from ../shared/mistral-tokenizer/; where that folder is absent
 * their tests skip with a message naming the path.
 */
import * as fs from 'fs';
import * as path from 'path';

export const ROOT = path.resolve(__dirname, '..');
export const CASES_DIR = path.join(ROOT, 'fixtures/tokenizer_cases');
/** ../shared, or $MISTRAL_SHARED (the tests of the test summary point it elsewhere). */
export const SHARED_TOKENIZERS = path.resolve(ROOT, process.env.MISTRAL_SHARED || '../shared', 'mistral-tokenizer');
export const TINY_TOKENIZER = path.join(ROOT, 'fixtures/tiny/tokenizer.model');

export interface Documented {
  vocabSize: number;
  bosId: number;
  eosId: number;
  unkId: number;
  padId: number;
  /** Known encodings with BOS, from Mistral's own documentation and examples. */
  known: [string, number[]][];
}

export interface TokenizerModel {
  name: string;
  model: string;
  documented?: Documented;
}

/** Each model with its case files; the same table as DEFAULT_MODELS in fixtures/dump_tokenizer_cases.py. */
export const MODELS: TokenizerModel[] = [
  {
    name: 'mistral-v1',
    model: path.join(SHARED_TOKENIZERS, 'tokenizer.model.v1'),
    documented: { vocabSize: 32000, bosId: 1, eosId: 2, unkId: 0, padId: -1, known: [['Hello world!', [1, 22557, 1526, 28808]]] },
  },
  {
    name: 'mistral-v3',
    model: path.join(SHARED_TOKENIZERS, 'tokenizer.model.v3'),
    documented: { vocabSize: 32768, bosId: 1, eosId: 2, unkId: 0, padId: -1, known: [] },
  },
  { name: 'tiny', model: TINY_TOKENIZER },
];

export interface EncodeCase {
  name: string;
  text: string;
  /** Python's sp.encode(text): no BOS. */
  ids: number[];
  /** sp.decode(ids). */
  decoded: string;
  /** sp.decode([id]) for each id. */
  decoded_each: string[];
}

export interface CaseFile {
  model_path: string;
  model_sha256: string;
  sentencepiece_version: string;
  vocab_size: number;
  bos_id: number;
  eos_id: number;
  unk_id: number;
  pad_id: number;
  /** The ids for which Python's sp.is_control(), is_unknown(), is_unused(), is_byte() are true. */
  control_ids: number[];
  unknown_ids: number[];
  unused_ids: number[];
  byte_ids: number[];
  cases: EncodeCase[];
  /** Only in <name>.json, not in <name>.heldout.json. */
  decode_cases?: { name: string; ids: number[]; decoded: string }[];
}

/**
 * fixtures/tokenizer_cases/<name>.json (the corpus of strings.json), or with `heldout`
 * <name>.heldout.json (the seeded random strings); undefined when the file is absent.
 */
export function readCases(name: string, heldout = false): CaseFile | undefined {
  const file = caseFilePath(name, heldout);
  return fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as CaseFile) : undefined;
}

export function caseFilePath(name: string, heldout = false): string {
  return path.join(CASES_DIR, `${name}${heldout ? '.heldout' : ''}.json`);
}

/** The model's availability, with a console warning naming the missing path (for describe.skipIf). */
export function modelAvailable(model: TokenizerModel, testFile: string): boolean {
  const available = fs.existsSync(model.model);
  if (!available) console.warn(`${testFile}: skipping the ${model.name} tests: tokenizer model ${model.model} not found`);
  return available;
}

/** A describe() title that says why it is skipped when the model is absent. */
export function modelTitle(model: TokenizerModel, available: boolean): string {
  return available ? model.name : `${model.name} (skipped: tokenizer model ${model.model} not found)`;
}
