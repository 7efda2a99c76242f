/**
 * Whether a model looks instruction-tuned, to warn before `--instruct` feeds [INST] turns to a base
 * model (which answers them with nonsense).
 *
 * The weights cannot tell, and neither can the tokenizer: Mistral-7B-v0.1 and its Instruct model
 * share tokenizer.model.v1, where "[INST]" is plain text, and v0.3's control tokens exist in both
 * of its models too. So the heuristic reads what names and configs say. A model counts as tuned
 * when any of these holds:
 *   - its folder's name (or, for a file, its name or its folder's) contains "instruct", "chat",
 *     "-it" (as in gemma-7b-it) or "sft" (Mistral's downloads are named mistral-7B-instruct-v0.1...);
 *   - a Hugging Face folder's tokenizer_config.json has a "chat_template" (base models have none);
 *   - its config.json or params.json names an Instruct model (e.g. "_name_or_path" of
 *     "mistralai/Mistral-7B-Instruct-v0.1").
 * It errs towards silence: a tuned model in a folder named e.g. "model" gets the warning, which says
 * how to avoid it (a name with "instruct").
 */
import * as fs from 'fs';
import * as path from 'path';

const TUNED_NAME = /instruct|chat|(^|[-_.])it($|[-_.])|(^|[-_.])sft($|[-_.])/i;

function readJson(file: string): Record<string, unknown> | undefined {
  try {
    const stat = fs.statSync(file);
    if (!stat.isFile() || stat.size > 16 * 1024 * 1024) return undefined;
    const value: unknown = JSON.parse(fs.readFileSync(file, 'utf8'));
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** What says `model` is instruction-tuned (for the report), or undefined when nothing does. */
export function instructionTunedEvidence(model: string): string | undefined {
  const resolved = path.resolve(model);
  let folder = resolved;
  try {
    if (!fs.statSync(resolved).isDirectory()) folder = path.dirname(resolved);
  } catch {
    return undefined;
  }
  for (const name of new Set([path.basename(resolved), path.basename(folder)])) {
    if (TUNED_NAME.test(name)) return `its name "${name}"`;
  }
  const tokenizerConfig = readJson(path.join(folder, 'tokenizer_config.json'));
  if (tokenizerConfig && tokenizerConfig.chat_template !== undefined) return 'the chat_template in tokenizer_config.json';
  for (const file of ['config.json', 'params.json']) {
    const config = readJson(path.join(folder, file));
    for (const key of ['_name_or_path', 'name', 'model_name']) {
      const value = config?.[key];
      if (typeof value === 'string' && TUNED_NAME.test(value)) return `${file}'s ${key} "${value}"`;
    }
  }
  return undefined;
}

/** The warning for `--instruct` on `model`, or undefined when it looks instruction-tuned. */
export function instructWarning(model: string): string | undefined {
  if (instructionTunedEvidence(model) !== undefined) return undefined;
  return (
    `warning: ${model} does not look instruction-tuned (no "instruct" or "chat" in its name or config, no chat_template): ` +
    "--instruct speaks Mistral-7B-Instruct's [INST] format, which a base model answers with nonsense; " +
    'leave --instruct out for a base model (if it is an Instruct model, a folder name with "instruct" silences this)'
  );
}
