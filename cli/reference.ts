/**
 * The default command: the reference's demo() and generate(), exactly as one_file_ref.py runs them.
 *
 *   one_file_ref.ts MODEL [--max-tokens N]
 *   one_file_ref.ts MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N] [--json] [--instruct]
 */
import { demo, DEMO_PROMPTS, generate, MAX_POSITIONS } from '../one_file_ref';
import { initBackend } from '../runtime/backend';
import { wrapInstruct } from '../tokenizer/instruct';
import { modelPath, parseCommandLine, parseIntFlag, UsageError } from './args';
import { loadForCommand, loadOptions, reportNonFiniteWeightsOf, reportSteps } from './load';
import { noteMaxTokens } from './max_tokens';

export const REFERENCE_HELP = `  npx ts-node one_file_ref.ts MODEL [--max-tokens N]
      The reference's demo: its three prompts, greedy, N steps (default 35).
  npx ts-node one_file_ref.ts MODEL --prompt TEXT [--prompt TEXT ...] [--max-tokens N] [--json]
                                    [--instruct]
      The reference's generate() on your prompts (batched its way: prefill on the shortest
      prompt, longer prompts teacher-forced, N steps per row counting the forced ones).
      --json      print {"texts", "logprobs", "generated_ids"} (ids fed at each step)
      --instruct  wrap each prompt as Mistral-7B-Instruct expects: [INST] TEXT [/INST]
`;

const OPTIONS = {
  'max-tokens': { type: 'string' },
  prompt: { type: 'string', multiple: true },
  json: { type: 'boolean' },
  instruct: { type: 'boolean' },
} as const;

export async function referenceCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseCommandLine(argv, OPTIONS);
  const model = modelPath(positionals);
  const maxTokens = parseIntFlag('max-tokens', values['max-tokens'], 35);
  if (maxTokens >= MAX_POSITIONS) throw new UsageError(`--max-tokens must be below ${MAX_POSITIONS}, the model's positions`);
  if (values.prompt === undefined) {
    if (values.json) throw new UsageError('--json needs at least one --prompt');
    if (values.instruct) throw new UsageError('--instruct needs at least one --prompt');
    await initBackend(values.backend, { quiet: values.quiet });
    const opts = loadOptions(values, DEMO_PROMPTS.length);
    await reportNonFiniteWeightsOf(() => demo(model, maxTokens, opts));
    reportSteps(values, maxTokens, DEMO_PROMPTS.length, opts.loadedAt());
    return;
  }

  const prompts = values.instruct ? values.prompt.map(wrapInstruct) : values.prompt;
  const { tokenizer, transformer } = await loadForCommand(model, values, prompts.length);
  noteMaxTokens(values, prompts.map((p) => tokenizer.encode(p).length), maxTokens);
  try {
    const start = Date.now();
    const { texts, logprobs, generatedIds } = await generate(prompts, transformer, tokenizer, maxTokens);
    if (values.json) {
      process.stdout.write(JSON.stringify({ texts, logprobs, generated_ids: generatedIds }) + '\n');
    } else {
      for (const x of texts) {
        console.log(x);
        console.log('=====================');
      }
    }
    reportSteps(values, maxTokens, prompts.length, start);
  } finally {
    transformer.dispose();
  }
}
